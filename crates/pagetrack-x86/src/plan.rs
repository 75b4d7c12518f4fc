//! The store plan: a decoded, translated store ([`StorePlan::new`]) executed against the
//! current memory under the caller's frame locks ([`StorePlan::execute`]).

use iced_x86::{Decoder, DecoderOptions, Mnemonic, Register};
use kvm_bindings::kvm_regs;

use crate::alu::{AluOp, CF, ZF, alu};
use crate::bytes::{le_bytes, read_le, sub, sub_mut};
use crate::classify::{Op, Src};
use crate::emulate::{CpuAccess, CpuState, EmulateError, Emulated, GP_VECTOR, MemWrite, Target};
use crate::regs::{vector_register, write_gpr};
use crate::xsave::{LEGACY_USED, narrow_fpu_pointers, xsave_area, xsave_image};

pub(crate) const PAGE_SIZE: u64 = 4096;
pub(crate) const MAX_INSN_LEN: usize = 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) gva: u64,
    pub(crate) gpa: u64,
    /// Offset within the operand.
    pub(crate) offset: usize,
    pub(crate) len: usize,
}

/// A decoded and translated store, ready to execute under the caller's frame locks.
#[derive(Debug, Clone)]
pub struct StorePlan {
    pub(crate) rip: u64,
    pub(crate) next_ip: u64,
    pub(crate) bytes: Vec<u8>,
    pub(crate) mnemonic: Mnemonic,
    pub(crate) op: Op,
    /// Extent of the destination operand in bytes.
    pub(crate) size: usize,
    /// Accessed parts of the destination, in memory order (a scatter's: in element order).
    pub(crate) pieces: Vec<Piece>,
    /// Source memory operand (movdir64b).
    pub(crate) source: Vec<Piece>,
    pub(crate) locked: bool,
    /// The operand image of an [`Op::Computed`] store.
    pub(crate) computed: Vec<u8>,
    /// The XSAVE area after the instruction, when it changes FPU state.
    pub(crate) new_xsave: Option<Box<[u8]>>,
}

impl StorePlan {
    /// Decodes the instruction at `state.regs.rip`, computes its destination, checks alignment
    /// and translates every page it touches (`movdir64b`'s source too). Reads no memory.
    pub fn new<C: CpuAccess + ?Sized>(
        state: &CpuState,
        insn_bytes: &[u8],
        cpu: &mut C,
    ) -> Result<Self, EmulateError> {
        let rip = state.regs.rip;
        let given = &insn_bytes[..insn_bytes.len().min(MAX_INSN_LEN)];
        let bitness = state.legacy.map_or(64, |l| l.bitness);
        let mut decoder = Decoder::with_ip(bitness, given, rip, DecoderOptions::NONE);
        let insn = decoder.decode();
        let ip_mask = match bitness {
            16 => 0xffff,
            32 => 0xffff_ffff,
            _ => u64::MAX,
        };
        let bytes = if insn.is_invalid() {
            given
        } else {
            given.get(..insn.len()).unwrap_or(given)
        };
        let mut plan = StorePlan {
            rip,
            next_ip: insn.next_ip() & ip_mask,
            bytes: bytes.to_vec(),
            mnemonic: insn.mnemonic(),
            op: Op::Movdir64b,
            size: 0,
            pieces: Vec::new(),
            source: Vec::new(),
            locked: insn.has_lock_prefix() || insn.mnemonic() == Mnemonic::Xchg,
            computed: Vec::new(),
            new_xsave: None,
        };
        if insn.is_invalid() {
            return Err(plan.unsupported("the bytes do not decode"));
        }
        let mut d = plan.classify(&insn, state)?;
        if let Some(legacy) = &state.legacy {
            plan.check_legacy(&insn, &d, legacy)?;
        }
        if let Some((bytes, xsave)) = d.computed.take() {
            plan.computed = bytes;
            plan.new_xsave = xsave;
        }
        if d.align > 1 && d.gva % d.align != 0 {
            return Err(EmulateError::Fault { vector: GP_VECTOR });
        }
        plan.op = d.op;
        plan.size = d.ranges.iter().map(|&(s, l)| s + l).max().unwrap_or(0);
        let mut cache = Vec::new();
        if d.op == Op::Scatter {
            // Element order, not memory order: a later element overwrites an earlier one.
            for (i, &(gva, offset, len)) in d.elements.iter().enumerate() {
                let at = gva.wrapping_sub(offset as u64);
                match split(at, offset, len, true, cpu, &mut cache, &mut plan.pieces) {
                    // A fault on the first selected element: nothing stored, mask unchanged.
                    Err(e) if i == 0 => return Err(e),
                    // Later: the CPU stores the earlier elements and clears their mask bits
                    // before the fault (partial completion), which is not modelled.
                    Err(_) => {
                        return Err(plan.unsupported("scatter faulting after its first element"));
                    }
                    Ok(()) => {}
                }
            }
        } else {
            for &(start, len) in &d.ranges {
                split(d.gva, start, len, true, cpu, &mut cache, &mut plan.pieces)?;
            }
        }
        if let Some((src, len)) = d.source {
            let mut cache = Vec::new();
            split(src, 0, len, false, cpu, &mut cache, &mut plan.source)?;
        }
        Ok(plan)
    }

    /// The guest-physical ranges the instruction will read and possibly write, in memory order.
    pub fn targets(&self) -> impl Iterator<Item = Target> + '_ {
        self.pieces.iter().map(|p| Target {
            gva: p.gva,
            gpa: p.gpa,
            len: p.len,
        })
    }

    /// The instruction's mnemonic.
    #[must_use]
    pub fn mnemonic(&self) -> Mnemonic {
        self.mnemonic
    }

    /// The instruction's length in bytes.
    #[must_use]
    pub fn insn_len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the guest expects the read-modify-write to be atomic (`lock` prefix or `xchg`).
    #[must_use]
    pub fn locked(&self) -> bool {
        self.locked
    }

    /// Reads the current bytes of [`targets`](Self::targets) (once, through `read_phys`),
    /// computes the stored bytes and the register and flag results from them, updates
    /// `state.regs` (RIP advances) and returns the writes for the caller to apply. `state` must be
    /// the state this plan was made from. On error `state` is unchanged.
    pub fn execute<C: CpuAccess + ?Sized>(
        &self,
        state: &mut CpuState,
        cpu: &mut C,
    ) -> Result<Emulated, EmulateError> {
        let mut old = vec![0u8; self.size];
        for p in &self.pieces {
            cpu.read_phys(p.gpa, sub_mut(&mut old, p.offset, p.len)?)?;
        }
        let source_len = self.source.iter().map(|p| p.offset + p.len).max();
        let mut source = vec![0u8; source_len.unwrap_or(0)];
        for p in &self.source {
            cpu.read_phys(p.gpa, sub_mut(&mut source, p.offset, p.len)?)?;
        }
        let mut regs = state.regs;
        let new = self.compute(state, &mut regs, &old, &source)?;
        let mut writes = Vec::new();
        if let Some(new) = new {
            for p in &self.pieces {
                writes.push(MemWrite {
                    gva: p.gva,
                    gpa: p.gpa,
                    old: sub(&old, p.offset, p.len)?.to_vec(),
                    new: sub(&new, p.offset, p.len)?.to_vec(),
                });
            }
        }
        if self.op == Op::Scatter {
            // Overlapping elements: a later element's old bytes are what the earlier stored.
            for i in 1..writes.len() {
                let (done, rest) = writes.split_at_mut(i);
                let w = &mut rest[0];
                for earlier in done.iter() {
                    for (b, old) in w.old.iter_mut().enumerate() {
                        let gpa = w.gpa.wrapping_add(b as u64);
                        if let Some(d) = gpa.checked_sub(earlier.gpa)
                            && let Some(&v) =
                                usize::try_from(d).ok().and_then(|d| earlier.new.get(d))
                        {
                            *old = v;
                        }
                    }
                }
            }
        }
        let regs_changed = regs != state.regs;
        regs.rip = self.next_ip;
        state.regs = regs;
        Ok(Emulated {
            writes,
            regs_changed,
            len: self.bytes.len(),
            mnemonic: self.mnemonic,
            locked: self.locked,
            xsave: self.new_xsave.clone(),
        })
    }

    pub(crate) fn unsupported(&self, reason: &'static str) -> EmulateError {
        EmulateError::Unsupported {
            rip: self.rip,
            bytes: self.bytes.clone(),
            mnemonic: self.mnemonic,
            reason,
        }
    }

    /// Computes the new operand bytes (None: no store) and updates `regs`.
    fn compute(
        &self,
        state: &CpuState,
        regs: &mut kvm_regs,
        old: &[u8],
        source: &[u8],
    ) -> Result<Option<Vec<u8>>, EmulateError> {
        let size = self.size;
        let old_val = read_le(old);
        let new_val = match self.op {
            Op::Store(Src::Vector { reg, byte }) => {
                let value = vector_register(state, reg)?;
                return Ok(Some(sub(&value, byte, size)?.to_vec()));
            }
            Op::Store(src) => self.src_value(regs, src)?,
            Op::Alu(op, src) => {
                let (res, flags) = alu(op, size, old_val, self.src_value(regs, src)?, regs.rflags);
                regs.rflags = flags;
                res
            }
            Op::Unary(Mnemonic::Not) => !old_val,
            Op::Unary(Mnemonic::Neg) => {
                let (res, flags) = alu(AluOp::Sub, size, 0, old_val, regs.rflags);
                regs.rflags = flags;
                res
            }
            Op::Unary(m) => {
                let op = if m == Mnemonic::Inc {
                    AluOp::Add
                } else {
                    AluOp::Sub
                };
                let (res, flags) = alu(op, size, old_val, 1, regs.rflags);
                regs.rflags = (flags & !CF) | (regs.rflags & CF); // inc/dec keep CF
                res
            }
            Op::Xadd(reg) => {
                let src = self.gpr_value(regs, reg)?;
                let (res, flags) = alu(AluOp::Add, size, old_val, src, regs.rflags);
                self.set_gpr(regs, reg, old_val)?;
                regs.rflags = flags;
                res
            }
            Op::Xchg(reg) => {
                let src = self.gpr_value(regs, reg)?;
                self.set_gpr(regs, reg, old_val)?;
                src
            }
            Op::Cmpxchg(reg) => {
                let acc_reg = match size {
                    1 => Register::AL,
                    2 => Register::AX,
                    4 => Register::EAX,
                    _ => Register::RAX,
                };
                let acc = self.gpr_value(regs, acc_reg)?;
                let (_, flags) = alu(AluOp::Sub, size, acc, old_val, regs.rflags);
                regs.rflags = flags;
                if acc != old_val {
                    self.set_gpr(regs, acc_reg, old_val)?;
                    return Ok(None);
                }
                self.gpr_value(regs, reg)?
            }
            Op::CmpxchgPair => {
                let half = size / 2;
                let (lo_reg, hi_reg, new_lo, new_hi) = if half == 8 {
                    (Register::RAX, Register::RDX, Register::RBX, Register::RCX)
                } else {
                    (Register::EAX, Register::EDX, Register::EBX, Register::ECX)
                };
                let old_lo = read_le(sub(old, 0, half)?);
                let old_hi = read_le(sub(old, half, half)?);
                let equal = self.gpr_value(regs, lo_reg)? == old_lo
                    && self.gpr_value(regs, hi_reg)? == old_hi;
                if !equal {
                    regs.rflags &= !ZF;
                    self.set_gpr(regs, lo_reg, old_lo)?;
                    self.set_gpr(regs, hi_reg, old_hi)?;
                    return Ok(None);
                }
                regs.rflags |= ZF;
                let mut new = le_bytes(self.gpr_value(regs, new_lo)?, half);
                new.extend(le_bytes(self.gpr_value(regs, new_hi)?, half));
                return Ok(Some(new));
            }
            Op::Bit(op, bit) => {
                let mask = 1u64 << bit;
                regs.rflags = (regs.rflags & !CF) | u64::from(old_val & mask != 0);
                match op {
                    Mnemonic::Bts => old_val | mask,
                    Mnemonic::Btr => old_val & !mask,
                    _ => old_val ^ mask,
                }
            }
            Op::Fxsave { rex_w } => {
                let area = xsave_area(state)?;
                let mut new = sub(area, 0, LEGACY_USED)?.to_vec();
                if !rex_w {
                    narrow_fpu_pointers(&mut new);
                }
                return Ok(Some(new));
            }
            Op::Xsave { rfbm, rex_w } => return xsave_image(state, &self.pieces, rfbm, rex_w, old),
            Op::Movdir64b => return Ok(Some(source.to_vec())),
            Op::Computed | Op::Scatter => return Ok(Some(self.computed.clone())),
            Op::Enter { level, frame } => return Ok(Some(enter(regs, old, source, level, frame))),
            Op::DescriptorTable { idt } => {
                let (base, limit) = if idt { state.idtr } else { state.gdtr };
                let mut v = limit.to_le_bytes().to_vec();
                v.extend_from_slice(&base.to_le_bytes());
                return Ok(Some(v));
            }
        };
        Ok(Some(le_bytes(new_val, size)))
    }

    fn src_value(&self, regs: &kvm_regs, src: Src) -> Result<u64, EmulateError> {
        match src {
            Src::Gpr(reg) => self.gpr_value(regs, reg),
            Src::Imm(v) => Ok(v),
            Src::Vector { .. } => Err(self.unsupported("vector source in integer operation")),
        }
    }

    fn set_gpr(&self, regs: &mut kvm_regs, reg: Register, value: u64) -> Result<(), EmulateError> {
        write_gpr(regs, reg, value)
            .ok_or_else(|| self.unsupported("operand is not a general register"))
    }
}

/// Executes `enter frame, level` (level >= 1, 64-bit operands) over `old`, the bytes of the
/// pushed slots [RSP - 8 * (level + 1), RSP), and `source`, the bytes of
/// [RBP - 8 * (level - 1), RBP) before the instruction. A frame pointer read from a slot this
/// instruction already pushed sees the pushed bytes, as on the CPU. Updates RBP and RSP.
fn enter(regs: &mut kvm_regs, old: &[u8], source: &[u8], level: u64, frame: u64) -> Vec<u8> {
    let base = regs.rsp.wrapping_sub(8 * (level + 1));
    let src_base = regs.rbp.wrapping_sub(8 * level.saturating_sub(1));
    let mut new = old.to_vec();
    let mut written = vec![false; new.len()];
    let push = |new: &mut [u8], written: &mut [bool], slot: u64, value: [u8; 8]| {
        // Slot k (0 = the first push) sits at RSP - 8 * (k + 1).
        let at = usize::try_from(8 * (level - slot)).unwrap_or(0);
        new[at..at + 8].copy_from_slice(&value);
        written[at..at + 8].fill(true);
    };
    push(&mut new, &mut written, 0, regs.rbp.to_le_bytes());
    for i in 1..level {
        let addr = regs.rbp.wrapping_sub(8 * i);
        let mut value = [0u8; 8];
        for (b, v) in value.iter_mut().enumerate() {
            let a = addr.wrapping_add(b as u64);
            let d = usize::try_from(a.wrapping_sub(base)).unwrap_or(usize::MAX);
            *v = if d < new.len() && written[d] {
                new[d]
            } else {
                let s = usize::try_from(a.wrapping_sub(src_base)).unwrap_or(0);
                source.get(s).copied().unwrap_or(0)
            };
        }
        push(&mut new, &mut written, i, value);
    }
    let frame_temp = regs.rsp.wrapping_sub(8);
    push(&mut new, &mut written, level, frame_temp.to_le_bytes());
    regs.rbp = frame_temp;
    regs.rsp = base.wrapping_sub(frame);
    new
}

/// Splits `len` bytes at `gva + offset` at page boundaries and translates each part.
fn split<C: CpuAccess + ?Sized>(
    gva: u64,
    offset: usize,
    len: usize,
    write: bool,
    cpu: &mut C,
    cache: &mut Vec<(u64, u64)>,
    out: &mut Vec<Piece>,
) -> Result<(), EmulateError> {
    let mut done = 0;
    while done < len {
        let addr = gva.wrapping_add((offset + done) as u64);
        let in_page = addr & (PAGE_SIZE - 1);
        let n = usize::try_from(PAGE_SIZE - in_page)
            .unwrap_or(len)
            .min(len - done);
        let page = addr - in_page;
        let gpa_page = match cache.iter().find(|(p, _)| *p == page) {
            Some(&(_, g)) => g,
            None => {
                let g = cpu.translate(addr, write)?.wrapping_sub(in_page);
                cache.push((page, g));
                g
            }
        };
        out.push(Piece {
            gva: addr,
            gpa: gpa_page.wrapping_add(in_page),
            offset: offset + done,
            len: n,
        });
        done += n;
    }
    Ok(())
}
