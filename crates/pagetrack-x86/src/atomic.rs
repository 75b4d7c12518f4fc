//! Locked read-modify-writes on tracked frames, made atomic: the identification half.
//!
//! KVM emulates `lock xadd`, `lock cmpxchg`, `xchg`, `lock add`… against a read-only fragment as
//! a read (inside KVM) followed by a plain write exit computed from that read: another vCPU's
//! update in between is lost, and the registers KVM wrote back (RIP already advanced) come from
//! the stale read. The exit does not say which instruction stored, and the bytes before RIP can
//! be decoded many ways (an immediate can spell `lock cmpxchg`; after a `call`, RIP is the
//! target, not the end of the call). So pagetrack identifies the instruction only by proof
//! ([`identify`]; docs/DESIGN-kvm.md): it enumerates every explanation of the exit and acts only
//! when all of them are one locked read-modify-write. It then rebuilds the registers the
//! instruction started from, re-executes it against the *current* memory under the frame lock,
//! applies the true result, and fixes the destination register and flags. A compare-exchange
//! that KVM saw fail is a failure linearized at KVM's read: nothing is written and no event
//! goes out (spec B31). Any other exit is applied exactly as KVM reported it.

//!
//! This module decides; it reads guest memory but never writes it. pagetrack-kvm re-executes
//! an [`Identified::Locked`] store under its frame lock and applies the result.

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess,
    OpKind, Register,
};
use kvm_bindings::kvm_regs;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::alu::ZF;
use crate::bytes::{read_le, size_mask};
use crate::emulate::{CpuState, StorePlan};
use crate::guest::GuestCpu;
use crate::regs::{read_gpr, write_gpr};
use crate::sysregs::SysCache;
use crate::walk;

/// The bytes `[rip - n, rip)` for the largest `n <= 15` that is readable.
fn bytes_before<M: GuestMemory + ?Sized>(mem: &M, cr3: u64, rip: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(15);
    // Walk backwards page by page.
    let mut end = rip;
    if end == 0 {
        return out;
    }
    while out.len() < 15 {
        let want = 15 - out.len();
        let page_start = (end - 1) & !0xfff;
        let n = usize::try_from((end - page_start).min(want as u64)).unwrap_or(0);
        let start = end - n as u64;
        let Ok(t) = walk::translate(mem, cr3, start) else {
            break;
        };
        let mut buf = vec![0u8; n];
        if mem.read_slice(&mut buf, GuestAddress(t.gpa)).is_err() {
            break;
        }
        buf.extend_from_slice(&out);
        out = buf;
        end = start;
        if end == 0 {
            break;
        }
    }
    out
}

fn is_rmw(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Xadd | Xchg
            | Cmpxchg
            | Cmpxchg8b
            | Add
            | Sub
            | And
            | Or
            | Xor
            | Inc
            | Dec
            | Not
            | Neg
            | Bts
            | Btr
            | Btc
    )
}

/// How a trapped store was identified.
#[derive(Debug, Clone, PartialEq)]
pub enum Identified {
    /// Not a locked read-modify-write (or not one pagetrack can rebuild): apply KVM's data.
    Plain,
    /// A compare-exchange that failed at KVM's read: nothing to write, registers are right.
    FailedCompare,
    /// Proven to be this locked read-modify-write: re-execute it from [`Locked::pre`] against
    /// the current memory, under the frame lock.
    Locked(Box<Locked>),
    /// Proven to be this locked read-modify-write, but the exit is only part of its operand:
    /// the operand straddles two frames and KVM stored the rest itself (into a frame that is
    /// not trapped), outside any lock, from its own stale read. It cannot be made atomic;
    /// [`Locked::pre`] is reliable for RIP only.
    Partial(Box<Locked>),
}

/// The locked read-modify-write that alone explains a trapped store.
#[derive(Debug, Clone, PartialEq)]
pub struct Locked {
    /// The instruction's bytes.
    pub bytes: Vec<u8>,
    /// The registers it started from (RIP at the instruction), rebuilt from KVM's post-state.
    pub pre: kvm_regs,
}

/// Identifies the instruction behind a trapped store of `data` at `gpa`. `regs` are the
/// registers after KVM's emulation (RIP past the instruction).
///
/// The instruction is identified only by proof (see docs/DESIGN-kvm.md): every decoding of
/// the bytes before RIP that ends exactly at RIP and writes the exit's bytes is a possible
/// explanation, and so are a string instruction at RIP still iterating and a call whose
/// target is RIP (RIP then does not follow the instruction). The answer is
/// [`Identified::Locked`] only when all possible explanations are that same operation;
/// otherwise [`Identified::Plain`]: apply exactly what KVM reported, which is what the CPU
/// stored whatever the instruction was, at worst without the atomicity against other vCPUs.
pub fn identify<M: GuestMemory + ?Sized>(
    mem: &M,
    cache: &SysCache,
    regs: &kvm_regs,
    gpa: u64,
    data: &[u8],
) -> Identified {
    identify_fragments(mem, cache, regs, &[(gpa, data)])
}

/// Whether the bytes before RIP hold a lock prefix or an xchg opcode byte, the filter of
/// [`identify`]: without one, no locked read-modify-write can have made the store. Always
/// false outside 64-bit mode.
pub fn lock_byte_before<M: GuestMemory + ?Sized>(mem: &M, cache: &SysCache, rip: u64) -> bool {
    cache.long64
        && bytes_before(mem, cache.cr3, rip)
            .iter()
            .any(|&b| matches!(b, 0xf0 | 0x86 | 0x87))
}

/// As [`identify`], for a store KVM delivered as consecutive MMIO fragments of one
/// instruction (a store straddling two frames: `[gpa, page end)` then the next page's
/// start), in order. A locked read-modify-write is identified only if its operand is
/// exactly these fragments, with their data concatenated as its stored value.
pub fn identify_fragments<M: GuestMemory + ?Sized>(
    mem: &M,
    cache: &SysCache,
    regs: &kvm_regs,
    frags: &[(u64, &[u8])],
) -> Identified {
    if !cache.long64 || frags.is_empty() {
        return Identified::Plain; // the decoders here are 64-bit only
    }
    let before = bytes_before(mem, cache.cr3, regs.rip);
    // A locked read-modify-write carries a lock prefix (0xf0) or is xchg (0x86/0x87): without
    // either byte before RIP, no explanation can be one, and no decoding is needed (most
    // trapped stores).
    if !before.iter().any(|&b| matches!(b, 0xf0 | 0x86 | 0x87)) {
        return Identified::Plain;
    }
    let data: Vec<u8> = frags.iter().flat_map(|f| f.1.iter().copied()).collect();
    if data.len() > 8 {
        return Identified::Plain;
    }
    let exit = Exit { frags, data: &data };
    let mut factory = InstructionInfoFactory::new();
    let mut locked: Vec<Candidate> = Vec::new();
    let mut others: Vec<Instruction> = Vec::new();
    for k in 1..=before.len() {
        let insn_bytes = &before[before.len() - k..];
        let start = regs.rip - k as u64;
        let insn = Decoder::with_ip(64, insn_bytes, start, DecoderOptions::NONE).decode();
        if insn.is_invalid() || insn.len() != k {
            continue;
        }
        let has_mem = (0..insn.op_count()).any(|i| insn.op_kind(i) == OpKind::Memory);
        let lockable = insn.has_lock_prefix() || insn.mnemonic() == Mnemonic::Xchg;
        if lockable && has_mem && is_rmw(insn.mnemonic()) {
            if let Some(c) = rebuild(mem, cache, regs, &insn, insn_bytes, start, &exit) {
                locked.push(c);
            }
            // A locked decoding that does not explain the exit is not a candidate.
            continue;
        }
        if may_explain(&mut factory, mem, cache, regs, &insn, &exit) {
            others.push(insn);
        }
    }
    let Some(first) = locked.first() else {
        return Identified::Plain;
    };
    // A locked decoding whose operand is this exit and a piece in a frame KVM stored itself:
    // whatever else may explain the exit, atomicity may be lost already, so the answer is
    // the refusal, not a silent plain store.
    if let Some(p) = locked.iter().find(|c| c.partial) {
        return Identified::Partial(Box::new(Locked {
            bytes: p.bytes.clone(),
            pre: p.pre,
        }));
    }
    // Unique up to equivalence: the same operation on the same operands (a decoding without
    // the lock prefix, or with a redundant prefix, is the same instruction's suffix).
    let unique = locked.iter().all(|c| same_operation(&c.insn, &first.insn))
        && others.iter().all(|o| same_operation(o, &first.insn))
        && !string_at_rip(mem, cache, regs)
        && !call_into_rip(mem, cache, regs, &exit);
    if !unique {
        return Identified::Plain;
    }
    let Some(c) = locked.into_iter().next() else {
        return Identified::Plain;
    };
    if c.failed_compare {
        return Identified::FailedCompare;
    }
    Identified::Locked(Box::new(Locked {
        bytes: c.bytes,
        pre: c.pre,
    }))
}

/// In compatibility mode (long mode, a 32-bit code segment), whether a locked
/// read-modify-write decoded in 32-bit mode ends at RIP and stores exactly the exit's `len`
/// bytes at `gpa` (its address from the post-state registers and the segment bases). The
/// re-execution is 64-bit only, so such a store cannot be made atomic: pagetrack-kvm stops
/// the vCPU instead of losing updates silently. Returns the instruction's address and bytes.
/// `None` outside compatibility mode and for every other store.
pub fn compat_locked<M: GuestMemory + ?Sized>(
    mem: &M,
    sregs: &kvm_bindings::kvm_sregs,
    regs: &kvm_regs,
    gpa: u64,
    len: usize,
) -> Option<(u64, Vec<u8>)> {
    const EFER_LMA: u64 = 1 << 10;
    if sregs.efer & EFER_LMA == 0 || sregs.cs.l != 0 || sregs.cs.db == 0 {
        return None;
    }
    let eip = regs.rip & 0xffff_ffff;
    let linear = sregs.cs.base.wrapping_add(eip) & 0xffff_ffff;
    let before = bytes_before(mem, sregs.cr3, linear);
    if !before.iter().any(|&b| matches!(b, 0xf0 | 0x86 | 0x87)) {
        return None;
    }
    let seg_base = |r: Register| match r {
        Register::FS => sregs.fs.base,
        Register::GS => sregs.gs.base,
        Register::ES => sregs.es.base,
        Register::CS => sregs.cs.base,
        Register::SS => sregs.ss.base,
        _ => sregs.ds.base,
    };
    (1..=before.len()).find_map(|k| {
        let insn_bytes = &before[before.len() - k..];
        let start = eip.wrapping_sub(k as u64) & 0xffff_ffff;
        let insn = Decoder::with_ip(32, insn_bytes, start, DecoderOptions::NONE).decode();
        let lockable = insn.has_lock_prefix() || insn.mnemonic() == Mnemonic::Xchg;
        let mem_op = (0..insn.op_count()).any(|i| insn.op_kind(i) == OpKind::Memory);
        if insn.is_invalid() || insn.len() != k || !lockable || !mem_op || !is_rmw(insn.mnemonic())
        {
            return None;
        }
        let ea = insn.virtual_address(0, 0, |r, _, _| {
            if r.is_segment_register() {
                Some(0)
            } else {
                read_gpr(regs, r)
            }
        })?;
        let found = Some((start, insn_bytes.to_vec()));
        // An address formed from a register the instruction itself changes (`lock xadd
        // [eax], eax`, a `cmpxchg` through EAX) cannot be rebuilt from the post-state: it
        // cannot be ruled out.
        let mut factory = InstructionInfoFactory::new();
        let used = factory.info(&insn).used_registers().to_vec();
        let changed = |r: Register| {
            r != Register::None
                && used.iter().any(|u| {
                    u.register().full_register() == r.full_register()
                        && matches!(
                            u.access(),
                            OpAccess::Write
                                | OpAccess::CondWrite
                                | OpAccess::ReadWrite
                                | OpAccess::ReadCondWrite
                        )
                })
        };
        if changed(insn.memory_base()) || changed(insn.memory_index()) {
            return found;
        }
        let size = insn.memory_size().size() as u64;
        let la = seg_base(insn.memory_segment()).wrapping_add(ea) & 0xffff_ffff;
        let t = walk::translate(mem, sregs.cr3, la).ok()?;
        if t.gpa == gpa && size == len as u64 {
            return found;
        }
        // An operand straddling two pages reaches KVM as two pieces, one exit each (or one
        // exit, when KVM writes the other page itself): either piece is this instruction.
        let end = la.wrapping_add(size - 1) & 0xffff_ffff;
        if size > 1 && la >> 12 != end >> 12 {
            let low = 0x1000 - (la & 0xfff);
            let second = walk::translate(mem, sregs.cr3, end & !0xfff).ok()?;
            if (t.gpa == gpa && low == len as u64)
                || (second.gpa == gpa && size - low == len as u64)
            {
                return found;
            }
        }
        None
    })
}

/// The trapped store as KVM reported it: its fragments (one exit each) and their data
/// concatenated.
struct Exit<'d> {
    frags: &'d [(u64, &'d [u8])],
    data: &'d [u8],
}

impl Exit<'_> {
    fn value(&self) -> u64 {
        read_le(self.data)
    }
}

/// A locked read-modify-write that explains the exit, with the registers it started from.
struct Candidate {
    insn: Instruction,
    bytes: Vec<u8>,
    pre: kvm_regs,
    /// A compare-exchange KVM saw fail: nothing to write, the registers are right.
    failed_compare: bool,
    /// The exit is some but not all of the operand's pieces ([`Identified::Partial`]).
    partial: bool,
}

/// Rebuilds the registers a locked read-modify-write started with from the post-state KVM
/// wrote back, and keeps it only if it stores exactly the exit's bytes at the exit's address.
fn rebuild<M: GuestMemory + ?Sized>(
    mem: &M,
    cache: &SysCache,
    regs: &kvm_regs,
    insn: &Instruction,
    insn_bytes: &[u8],
    start: u64,
    exit: &Exit<'_>,
) -> Option<Candidate> {
    let mut pre = *regs;
    pre.rip = start;
    let reg_op = (0..insn.op_count())
        .find(|&i| insn.op_kind(i) == OpKind::Register)
        .map(|i| insn.op_register(i));
    let size = exit.data.len();
    let d = exit.value();
    let mut failed_compare = false;
    match insn.mnemonic() {
        Mnemonic::Xadd => {
            let r = reg_op?;
            let s = read_gpr(&pre, r)?;
            write_gpr(&mut pre, r, d.wrapping_sub(s) & size_mask(size))?;
        }
        Mnemonic::Xchg => write_gpr(&mut pre, reg_op?, d & size_mask(size))?,
        Mnemonic::Cmpxchg | Mnemonic::Cmpxchg8b if regs.rflags & ZF == 0 => {
            failed_compare = true;
            if let Some(c) = failed_compare_of_lost_address(insn, insn_bytes, regs, start, exit) {
                return Some(c);
            }
        }
        _ => {}
    }
    let (state, mut cpu) = start_state(mem, cache, &pre);
    let plan = StorePlan::new(&state, insn_bytes, &mut cpu).ok()?;
    let targets: Vec<_> = plan.targets().collect();
    let is = |t: &crate::emulate::Target, (gpa, data): &(u64, &[u8])| {
        t.gpa == *gpa && t.len == data.len()
    };
    let whole =
        targets.len() == exit.frags.len() && targets.iter().zip(exit.frags).all(|(t, f)| is(t, f));
    // One piece of a two-piece operand (the other lies in a frame KVM writes itself).
    let partial = targets.len() == 2
        && exit.frags.len() == 1
        && targets.iter().any(|t| is(t, &exit.frags[0]));
    (plan.locked() && (whole || partial)).then(|| Candidate {
        insn: *insn,
        bytes: insn_bytes.to_vec(),
        pre,
        failed_compare,
        partial: !whole,
    })
}

/// A compare-exchange KVM saw fail whose address came from a register the failure
/// overwrote (`lock cmpxchg [rax], ...`: RAX is the base and the comparand, and now holds
/// the old value; `cmpxchg8b` likewise with EDX:EAX): the address cannot be rebuilt. It
/// explains the exit when the store is as wide as its operand and is exactly the value the
/// failure loaded (a failed compare-exchange writes the old value back and loads it), and
/// then nothing is to be applied.
fn failed_compare_of_lost_address(
    insn: &Instruction,
    insn_bytes: &[u8],
    regs: &kvm_regs,
    start: u64,
    exit: &Exit<'_>,
) -> Option<Candidate> {
    let eight_b = insn.mnemonic() == Mnemonic::Cmpxchg8b;
    let lost = |r: Register| {
        let r = r.full_register();
        r == Register::RAX || (eight_b && r == Register::RDX)
    };
    if !(lost(insn.memory_base()) || lost(insn.memory_index())) {
        return None;
    }
    let size = insn.memory_size().size();
    let loaded = if eight_b {
        (regs.rdx & 0xffff_ffff) << 32 | (regs.rax & 0xffff_ffff)
    } else {
        regs.rax & size_mask(size)
    };
    let len = exit.data.len();
    let whole = size == len && loaded == exit.value();
    // One page piece of an operand straddling into a frame KVM wrote itself (a single
    // fragment shorter than the operand, ending at a page end or starting at a page start):
    // the failure's write-back of that piece. It cannot be made atomic (KVM wrote the other
    // piece from its own read), so it is a partial candidate and the vCPU stops.
    let piece = !whole && exit.frags.len() == 1 && len < size && len <= 8 && {
        let gpa = exit.frags[0].0;
        let bytes = loaded.to_le_bytes();
        let low = (gpa + len as u64).is_multiple_of(0x1000) && exit.data == &bytes[..len];
        let high = gpa.is_multiple_of(0x1000) && exit.data == &bytes[size - len..size];
        low || high
    };
    (whole || piece).then(|| Candidate {
        insn: *insn,
        bytes: insn_bytes.to_vec(),
        pre: kvm_regs {
            rip: start,
            ..*regs
        },
        failed_compare: true,
        partial: piece,
    })
}

/// Whether a decoding that is not a locked read-modify-write could have made this store. Over-
/// approximates: whatever cannot be ruled out exactly counts as possible.
fn may_explain<M: GuestMemory + ?Sized>(
    factory: &mut InstructionInfoFactory,
    mem: &M,
    cache: &SysCache,
    regs: &kvm_regs,
    insn: &Instruction,
    exit: &Exit<'_>,
) -> bool {
    // A direct call ends at RIP only when its target is RIP (a call to the next instruction).
    if insn.flow_control() == FlowControl::Call && insn.near_branch_target() != regs.rip {
        return false;
    }
    let info = factory.info(insn);
    let written = |a: OpAccess| {
        matches!(
            a,
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        )
    };
    let changes = |r: Register| {
        r != Register::None
            && info
                .used_registers()
                .iter()
                .any(|u| u.register().full_register() == r.full_register() && written(u.access()))
    };
    let stores: Vec<_> = info
        .used_memory()
        .iter()
        .filter(|m| written(m.access()))
        .collect();
    stores.iter().any(|m| {
        let size = m.memory_size().size() as u64;
        let base_changes = changes(m.base()) || changes(m.index());
        let va = if base_changes {
            if m.base().full_register() == Register::RSP
                && matches!(insn.mnemonic(), Mnemonic::Push | Mnemonic::Call)
            {
                // Pushes write at the RSP they leave behind.
                Some(regs.rsp)
            } else {
                // The address came from registers the instruction changed: cannot rule out,
                // unless the store is too narrow for the exit (its fragments total at most
                // its size; 0 is an unknown extent).
                return size == 0 || exit.data.len() as u64 <= size;
            }
        } else {
            m.virtual_address(0, |r, _, _| reg_value(regs, cache, r))
        };
        let Some(va) = va else {
            return true;
        };
        if size == 0 {
            return true; // xsave-like: extent unknown here
        }
        covers(mem, cache.cr3, va, size, exit)
    })
}

/// Whether a store of `[va, va + size)` could give this exit: KVM splits a store at page
/// boundaries and each part into MMIO fragments of at most 8 bytes, one exit each, so the exit
/// must be exactly one such fragment.
fn covers<M: GuestMemory + ?Sized>(mem: &M, cr3: u64, va: u64, size: u64, exit: &Exit<'_>) -> bool {
    // Several fragments come from one store: each of them is one of its fragments.
    exit.frags
        .iter()
        .all(|&(gpa, data)| covers_fragment(mem, cr3, va, size, gpa, data.len() as u64))
}

/// Whether the MMIO fragment of `len` bytes at `gpa` is one of those KVM makes of a store of
/// `[va, va + size)`.
fn covers_fragment<M: GuestMemory + ?Sized>(
    mem: &M,
    cr3: u64,
    va: u64,
    size: u64,
    gpa: u64,
    len: u64,
) -> bool {
    // A range that wraps around the address space is not a store KVM made.
    let Some(end) = va.checked_add(size) else {
        return false;
    };
    let mut from = va;
    while from < end {
        let to = (from & !0xfff)
            .checked_add(0x1000)
            .map_or(end, |next| end.min(next));
        if let Ok(t) = walk::translate(mem, cr3, from) {
            let piece = to - from;
            if let Some(off) = gpa.checked_sub(t.gpa)
                && off < piece
                && off % 8 == 0
                && len == (piece - off).min(8)
            {
                return true;
            }
        }
        from = to;
    }
    false
}

/// A register's value for address computation: GPRs from `regs`, FS/GS bases from the cache,
/// other segment bases 0 (64-bit mode).
fn reg_value(regs: &kvm_regs, cache: &SysCache, r: Register) -> Option<u64> {
    match r {
        Register::FS => Some(cache.fs_base),
        Register::GS => Some(cache.gs_base),
        r if r.is_segment_register() => Some(0),
        Register::RIP => Some(regs.rip),
        r => read_gpr(regs, r),
    }
}

/// Whether two decodings are the same operation on the same operands (prefixes aside).
fn same_operation(a: &Instruction, b: &Instruction) -> bool {
    a.mnemonic() == b.mnemonic()
        && a.op_count() == b.op_count()
        && (0..a.op_count()).all(|i| {
            a.op_kind(i) == b.op_kind(i)
                && match a.op_kind(i) {
                    OpKind::Register => a.op_register(i) == b.op_register(i),
                    OpKind::Memory => {
                        a.memory_base() == b.memory_base()
                            && a.memory_index() == b.memory_index()
                            && a.memory_index_scale() == b.memory_index_scale()
                            && a.memory_displacement64() == b.memory_displacement64()
                            && a.memory_segment() == b.memory_segment()
                            && a.memory_size() == b.memory_size()
                    }
                    _ => a.try_immediate(i).ok() == b.try_immediate(i).ok(),
                }
        })
}

/// Whether the instruction *at* RIP is a repeated string instruction that stores: KVM leaves
/// RIP on it until the count runs out, so the store may be one of its elements.
fn string_at_rip<M: GuestMemory + ?Sized>(mem: &M, cache: &SysCache, regs: &kvm_regs) -> bool {
    let mut bytes = [0u8; 15];
    let n = walk::read_virt_prefix(mem, cache.cr3, regs.rip, &mut bytes);
    let insn = Decoder::with_ip(64, &bytes[..n], regs.rip, DecoderOptions::NONE).decode();
    if insn.is_invalid() {
        // Unreadable or undecodable: cannot rule it out.
        return true;
    }
    (insn.has_rep_prefix() || insn.has_repne_prefix())
        && (0..insn.op_count()).any(|i| {
            matches!(
                insn.op_kind(i),
                OpKind::MemoryESDI | OpKind::MemoryESEDI | OpKind::MemoryESRDI
            )
        })
}

/// Whether the store may be a call's push of its return address with RIP the call's target
/// (RIP then does not follow the storing instruction): the exit lies in the slot at the RSP
/// KVM left, and a call instruction ends at the stored return address.
fn call_into_rip<M: GuestMemory + ?Sized>(
    mem: &M,
    cache: &SysCache,
    regs: &kvm_regs,
    exit: &Exit<'_>,
) -> bool {
    if !covers(mem, cache.cr3, regs.rsp, 8, exit) {
        return false;
    }
    if exit.data.len() != 8 || exit.frags.len() != 1 {
        return true; // a partial slot (straddling a page): the return address is unknown
    }
    let ret = exit.value();
    let before = bytes_before(mem, cache.cr3, ret);
    (1..=before.len()).any(|k| {
        let insn = Decoder::with_ip(
            64,
            &before[before.len() - k..],
            ret - k as u64,
            DecoderOptions::NONE,
        )
        .decode();
        !insn.is_invalid()
            && insn.len() == k
            && match insn.flow_control() {
                FlowControl::Call => insn.near_branch_target() == regs.rip,
                FlowControl::IndirectCall => true,
                _ => false,
            }
    })
}

/// The emulator's state and memory view for registers `pre` under the system state `cache`:
/// translations only, no permission checks (KVM already performed the store with the guest's
/// permissions).
pub fn start_state<'m, M: GuestMemory + ?Sized>(
    mem: &'m M,
    cache: &SysCache,
    pre: &kvm_regs,
) -> (CpuState, GuestCpu<'m, M>) {
    let state = CpuState {
        regs: *pre,
        fs_base: cache.fs_base,
        gs_base: cache.gs_base,
        ..CpuState::default()
    };
    // KVM already performed this store with the guest's permissions: translate only.
    let cpu = GuestCpu {
        mem,
        cr3: cache.cr3,
        user: false,
        check_access: false,
    };
    (state, cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testmem::{CR3, identity};
    use vm_memory::GuestMemoryMmap;

    /// Where the instruction bytes end (KVM's RIP after the store).
    const RIP: u64 = 0x1_0010;
    const DST: u64 = 0x8000;

    fn sys() -> SysCache {
        SysCache {
            cr3: CR3,
            fs_base: 0,
            gs_base: 0,
            long64: true,
        }
    }

    /// Memory with `code` ending at RIP (nops before it, `hlt` at RIP).
    fn with_code(code: &[u8]) -> GuestMemoryMmap {
        let m = identity();
        m.write_slice(&[0x90; 32], GuestAddress(RIP - 32)).unwrap();
        m.write_slice(code, GuestAddress(RIP - code.len() as u64))
            .unwrap();
        m.write_slice(&[0xf4], GuestAddress(RIP)).unwrap();
        m
    }

    fn regs() -> kvm_regs {
        kvm_regs {
            rip: RIP,
            rdi: DST,
            rsp: 0x2_0000,
            rflags: 0x202,
            ..Default::default()
        }
    }

    #[test]
    fn lock_xadd_is_identified_and_its_registers_rebuilt() {
        // lock xadd [rdi], rax: KVM stored old + rax and left old in RAX.
        let m = with_code(&[0xf0, 0x48, 0x0f, 0xc1, 0x07]);
        let mut r = regs();
        let (old, addend) = (1000u64, 42u64);
        r.rax = old;
        let data = (old + addend).to_le_bytes();
        let Identified::Locked(l) = identify(&m, &sys(), &r, DST, &data) else {
            panic!("lock xadd not identified");
        };
        assert_eq!(l.bytes, [0xf0, 0x48, 0x0f, 0xc1, 0x07]);
        assert_eq!(l.pre.rip, RIP - 5);
        assert_eq!(l.pre.rax, addend, "RAX before the instruction");
        assert_eq!(l.pre.rdi, DST);
    }

    #[test]
    fn lock_xadd_at_32_bits_rebuilds_the_low_half() {
        // lock xadd [rdi], eax; KVM's data: old + eax (wrapping at 32 bits).
        let m = with_code(&[0xf0, 0x0f, 0xc1, 0x07]);
        let mut r = regs();
        r.rax = 0xffff_fff0;
        let data = 0x0000_0010u32.to_le_bytes();
        let Identified::Locked(l) = identify(&m, &sys(), &r, DST, &data) else {
            panic!("lock xadd not identified");
        };
        assert_eq!(l.pre.rax, 0x20);
    }

    #[test]
    fn a_locked_op_spelled_by_a_plain_stores_immediate_is_plain() {
        // mov dword [rdi], 0x07b10ff0 (c7 07 f0 0f b1 07): its last 4 bytes also decode as
        // lock cmpxchg [rdi], eax, which would store the same 4 bytes at the same address.
        let m = with_code(&[0xc7, 0x07, 0xf0, 0x0f, 0xb1, 0x07]);
        let mut r = regs();
        r.rflags |= ZF; // as after a successful compare-exchange
        r.rax = 0x07b1_0ff0;
        let data = 0x07b1_0ff0u32.to_le_bytes();
        assert_eq!(identify(&m, &sys(), &r, DST, &data), Identified::Plain);
        // The same locked bytes alone (nops before them) are identified.
        let m = with_code(&[0xf0, 0x0f, 0xb1, 0x07]);
        assert!(matches!(
            identify(&m, &sys(), &r, DST, &data),
            Identified::Locked(_)
        ));
    }

    #[test]
    fn failed_compare_exchange_is_reported_as_such() {
        let m = with_code(&[0xf0, 0x0f, 0xb1, 0x0f]); // lock cmpxchg [rdi], ecx
        let r = regs(); // ZF clear: KVM's compare failed
        let data = 7u32.to_le_bytes();
        assert_eq!(
            identify(&m, &sys(), &r, DST, &data),
            Identified::FailedCompare
        );
    }

    #[test]
    fn exit_elsewhere_or_of_another_size_is_plain() {
        let m = with_code(&[0xf0, 0x48, 0x0f, 0xc1, 0x07]);
        let r = regs();
        let data = 5u64.to_le_bytes();
        assert_eq!(identify(&m, &sys(), &r, DST + 8, &data), Identified::Plain);
        assert_eq!(identify(&m, &sys(), &r, DST, &data[..4]), Identified::Plain);
    }

    #[test]
    fn without_a_lock_or_xchg_byte_nothing_is_decoded() {
        let m = with_code(&[0x48, 0x89, 0x07]); // mov [rdi], rax
        let data = 5u64.to_le_bytes();
        assert_eq!(identify(&m, &sys(), &regs(), DST, &data), Identified::Plain);
    }

    #[test]
    fn rep_string_at_rip_makes_it_ambiguous() {
        let m = with_code(&[0xf0, 0x48, 0x0f, 0xc1, 0x07]);
        let mut r = regs();
        r.rax = 1;
        let data = 3u64.to_le_bytes();
        assert!(matches!(
            identify(&m, &sys(), &r, DST, &data),
            Identified::Locked(_)
        ));
        // A rep stosq at RIP may be the instruction that stored (KVM leaves RIP on it).
        m.write_slice(&[0xf3, 0x48, 0xab], GuestAddress(RIP))
            .unwrap();
        assert_eq!(identify(&m, &sys(), &r, DST, &data), Identified::Plain);
    }

    #[test]
    fn a_call_whose_push_is_the_exit_makes_it_ambiguous() {
        // The exit is the 8-byte slot at RSP and holds a return address right after a call
        // to RIP: the store may be that call's push.
        let m = with_code(&[0xf0, 0x48, 0x0f, 0xc1, 0x07]);
        let call_at = 0x1_8000u64;
        let rel = i32::try_from(RIP as i64 - (call_at as i64 + 5)).unwrap();
        let mut call = vec![0xe8];
        call.extend_from_slice(&rel.to_le_bytes());
        m.write_slice(&call, GuestAddress(call_at)).unwrap();
        let mut r = regs();
        r.rdi = 0x9000;
        r.rsp = 0x9000;
        let data = (call_at + 5).to_le_bytes();
        assert_eq!(identify(&m, &sys(), &r, 0x9000, &data), Identified::Plain);
        // Without the call before that return address, the locked op alone explains it.
        m.write_slice(&[0u8; 5], GuestAddress(call_at)).unwrap();
        assert!(matches!(
            identify(&m, &sys(), &r, 0x9000, &data),
            Identified::Locked(_)
        ));
    }

    #[test]
    fn split_lock_xadd_is_identified_from_both_fragments_only() {
        // lock xadd [rdi], rax on a word at 0x8ffc: 4 bytes end one page, 4 start the next.
        let m = with_code(&[0xf0, 0x48, 0x0f, 0xc1, 0x07]);
        let mut r = regs();
        r.rdi = 0x8ffc;
        let (old, addend) = (0xffff_fff0u64, 0x20u64);
        r.rax = old;
        let data = (old + addend).to_le_bytes();
        let frags = [(0x8ffc, &data[..4]), (0x9000, &data[4..])];
        let Identified::Locked(l) = identify_fragments(&m, &sys(), &r, &frags) else {
            panic!("split lock xadd not identified");
        };
        assert_eq!(l.pre.rax, addend, "RAX rebuilt from the combined data");
        // Either fragment alone is one piece of the operand: proven, but only partial.
        assert!(matches!(
            identify(&m, &sys(), &r, 0x8ffc, &data[..4]),
            Identified::Partial(_)
        ));
        assert!(matches!(
            identify(&m, &sys(), &r, 0x9000, &data[4..]),
            Identified::Partial(_)
        ));
        // A plain 4-byte xadd at the same place explains the first fragment only, and a
        // mismatched second fragment explains nothing.
        let other = [(0x8ffc, &data[..4]), (0x9004, &data[4..])];
        assert_eq!(
            identify_fragments(&m, &sys(), &r, &other),
            Identified::Plain
        );
    }

    #[test]
    fn failing_cmpxchg_with_rax_as_base_and_comparand_is_a_failed_compare() {
        // lock cmpxchg [rax], rcx failed: KVM loaded the old value into RAX and wrote it back.
        let m = with_code(&[0xf0, 0x48, 0x0f, 0xb1, 0x08]);
        let mut r = regs();
        r.rax = 0x1234;
        let data = 0x1234u64.to_le_bytes();
        assert_eq!(
            identify(&m, &sys(), &r, DST, &data),
            Identified::FailedCompare
        );
        // A write-back that is not the loaded value is not this instruction's.
        let other = 0x1235u64.to_le_bytes();
        assert_eq!(identify(&m, &sys(), &r, DST, &other), Identified::Plain);
        // ZF set (a success) keeps RAX: its address is checked as usual.
        r.rflags |= ZF;
        assert_eq!(identify(&m, &sys(), &r, DST, &data), Identified::Plain);
    }

    #[test]
    fn legacy_mode_is_never_decoded() {
        let m = with_code(&[0xf0, 0x48, 0x0f, 0xc1, 0x07]);
        let cache = SysCache {
            long64: false,
            ..sys()
        };
        let data = 3u64.to_le_bytes();
        assert_eq!(identify(&m, &cache, &regs(), DST, &data), Identified::Plain);
    }
}
