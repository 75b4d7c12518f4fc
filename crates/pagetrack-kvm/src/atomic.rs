//! Locked read-modify-writes on tracked frames, made atomic.
//!
//! KVM emulates `lock xadd`, `lock cmpxchg`, `xchg`, `lock add`… against a read-only fragment as
//! a read (inside KVM) followed by a plain write exit computed from that read: another vCPU's
//! update in between is lost, and the registers KVM wrote back (RIP already advanced) come from
//! the stale read. At each trapped store, pagetrack decodes the instruction that ended at RIP
//! (decoding backwards and checking each candidate against the exit's address and size), and
//! for a locked read-modify-write it rebuilds the registers the instruction started from,
//! re-executes it against the *current* memory under the frame lock, applies the true result,
//! and fixes the destination register and flags. A compare-exchange that KVM saw fail is a
//! failure linearized at KVM's read: nothing is written and no event goes out (spec B31).

use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
use kvm_bindings::kvm_regs;
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::emulate::{CpuState, Emulated, StorePlan};
use crate::store::GuestCpu;
use crate::walk;

const ZF: u64 = 1 << 6;

/// Per-vCPU cache of what the backward decode needs from the system registers.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SysCache {
    cr3: u64,
    fs_base: u64,
    gs_base: u64,
    valid: bool,
}

impl SysCache {
    pub(crate) fn is_valid(&self) -> bool {
        self.valid
    }

    pub(crate) fn cr3(&self) -> u64 {
        self.cr3
    }

    pub(crate) fn refresh(&mut self, fd: &VcpuFd) -> bool {
        match fd.get_sregs() {
            Ok(s) => {
                *self = SysCache {
                    cr3: s.cr3,
                    fs_base: s.fs.base,
                    gs_base: s.gs.base,
                    valid: true,
                };
                true
            }
            Err(_) => false,
        }
    }
}

/// The bytes `[rip - n, rip)` for the largest `n <= 15` that is readable.
fn bytes_before(mem: &GuestMemoryMmap, cr3: u64, rip: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(15);
    // Walk backwards page by page.
    let mut end = rip;
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

/// (gpr index, bit shift, width in bytes) of an iced general register.
fn gpr_slot(r: Register) -> Option<(usize, u32, usize)> {
    let full = r.full_register();
    let idx = full.number().checked_sub(Register::RAX.number())?;
    if idx >= 16 {
        return None;
    }
    let shift = if matches!(r, Register::AH | Register::BH | Register::CH | Register::DH) {
        8
    } else {
        0
    };
    Some((idx, shift, r.size()))
}

fn gpr_mut(regs: &mut kvm_regs, idx: usize) -> &mut u64 {
    match idx {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    }
}

fn mask(bytes: usize) -> u64 {
    if bytes >= 8 {
        u64::MAX
    } else {
        (1u64 << (bytes * 8)) - 1
    }
}

fn read_reg(regs: &mut kvm_regs, r: Register) -> Option<u64> {
    let (idx, shift, size) = gpr_slot(r)?;
    Some((*gpr_mut(regs, idx) >> shift) & mask(size))
}

fn write_reg_low(regs: &mut kvm_regs, r: Register, v: u64) -> Option<()> {
    let (idx, shift, size) = gpr_slot(r)?;
    let slot = gpr_mut(regs, idx);
    let m = mask(size) << shift;
    *slot = (*slot & !m) | ((v << shift) & m);
    Some(())
}

/// What to do with a trapped store.
#[derive(Debug)]
pub(crate) enum Outcome<'a> {
    /// RIP did not translate with the cached CR3: refresh it and ask again.
    Stale,
    /// Not a locked read-modify-write (or not one pagetrack can rebuild): apply KVM's data.
    Plain,
    /// A compare-exchange that failed at KVM's read: nothing to write, registers are right.
    FailedCompare,
    /// Re-executed atomically: writes already applied, registers to load; the frame stays
    /// locked until the events are delivered.
    Done(Box<Emulated>, Box<kvm_regs>, crate::store::Held<'a>),
}

/// Decides and, for a locked read-modify-write, performs the atomic re-execution. `regs` are
/// the registers after KVM's emulation (RIP past the instruction).
pub(crate) fn handle<'a>(
    vm: &'a crate::vm::VmInner,
    mem: &GuestMemoryMmap,
    cache: &SysCache,
    regs: &kvm_regs,
    gpa: u64,
    data: &[u8],
) -> Outcome<'a> {
    if !cache.valid {
        return Outcome::Plain;
    }
    let before = bytes_before(mem, cache.cr3, regs.rip);
    if before.is_empty() {
        return Outcome::Stale;
    }
    // A locked read-modify-write carries a lock prefix (0xf0) or is xchg (0x86/0x87): without
    // either byte before RIP, this was a plain store (most trapped stores), and no decoding is
    // needed.
    if !before.iter().any(|&b| matches!(b, 0xf0 | 0x86 | 0x87)) {
        return Outcome::Plain;
    }
    let d = {
        let mut b = [0u8; 8];
        b[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
        u64::from_le_bytes(b)
    };
    for k in 1..=before.len() {
        let insn_bytes = &before[before.len() - k..];
        let start = regs.rip - k as u64;
        let mut dec = Decoder::with_ip(64, insn_bytes, start, DecoderOptions::NONE);
        let insn = dec.decode();
        if insn.is_invalid() || insn.len() != k || !is_rmw(insn.mnemonic()) {
            continue;
        }
        let locked = insn.has_lock_prefix() || insn.mnemonic() == Mnemonic::Xchg;
        if !locked || !(0..insn.op_count()).any(|i| insn.op_kind(i) == OpKind::Memory) {
            continue;
        }
        // Rebuild the registers the instruction started with.
        let mut pre = *regs;
        pre.rip = start;
        let reg_op = (0..insn.op_count())
            .find(|&i| insn.op_kind(i) == OpKind::Register)
            .map(|i| insn.op_register(i));
        let size = data.len();
        match insn.mnemonic() {
            Mnemonic::Xadd => {
                let Some(r) = reg_op else { continue };
                let Some(s) = read_reg(&mut pre, r) else {
                    continue;
                };
                if write_reg_low(&mut pre, r, d.wrapping_sub(s) & mask(size)).is_none() {
                    continue;
                }
            }
            Mnemonic::Xchg => {
                let Some(r) = reg_op else { continue };
                if write_reg_low(&mut pre, r, d & mask(size)).is_none() {
                    continue;
                }
            }
            Mnemonic::Cmpxchg | Mnemonic::Cmpxchg8b if regs.rflags & ZF == 0 => {
                // Check that this candidate really addresses the exit before trusting it.
                if !addresses(mem, cache, &pre, insn_bytes, gpa, size) {
                    continue;
                }
                return Outcome::FailedCompare;
            }
            _ => {}
        }
        let (mut state, mut cpu) = start_state(mem, cache, &pre);
        let Ok(plan) = StorePlan::new(&state, insn_bytes, &mut cpu) else {
            continue;
        };
        let targets: Vec<_> = plan.targets().collect();
        if !plan.locked() || targets.len() != 1 || targets[0].gpa != gpa || targets[0].len != size {
            continue;
        }
        let guard = vm.frame_locks.lock(std::iter::once(gpa));
        let pt = vm.page_table_entries(mem, gpa, size);
        let Ok(done) = plan.execute(&mut state, &mut cpu) else {
            continue;
        };
        for w in &done.writes {
            let _ = mem.write_slice(&w.new, GuestAddress(w.gpa));
        }
        vm.after_page_table_store(mem, pt);
        return Outcome::Done(Box::new(done), Box::new(state.regs), guard);
    }
    Outcome::Plain
}

/// The emulator's state and memory view for registers `pre` under the cached system state.
fn start_state<'m>(
    mem: &'m GuestMemoryMmap,
    cache: &SysCache,
    pre: &kvm_regs,
) -> (CpuState, GuestCpu<'m>) {
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

fn addresses(
    mem: &GuestMemoryMmap,
    cache: &SysCache,
    pre: &kvm_regs,
    bytes: &[u8],
    gpa: u64,
    size: usize,
) -> bool {
    let (state, mut cpu) = start_state(mem, cache, pre);
    StorePlan::new(&state, bytes, &mut cpu).is_ok_and(|p| {
        let t: Vec<_> = p.targets().collect();
        t.len() == 1 && t[0].gpa == gpa && t[0].len == size
    })
}
