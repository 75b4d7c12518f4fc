//! `rep stos` / `rep movs` into tracked frames, completed in userspace a page at a time.
//!
//! KVM emulates a string store into a read-only fragment one element per exit (17 µs each
//! here: 4,096 exits for a `rep stosb` over one page). After the exit's own element is
//! applied, pagetrack runs the remaining elements that fall in the same destination page
//! itself, each applied and reported exactly as a trapped store would be (one event per
//! element, in order), then updates RCX/RDI/RSI (and RIP when the count reaches zero). It stops
//! early, leaving the rest to the CPU, at a page boundary, an untranslatable or read-only
//! destination, an unreadable source, or anything it does not recognise.

use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use kvm_bindings::kvm_regs;
use pagetrack::Source;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use crate::atomic::SysCache;
use crate::memory::apply_write;
use crate::vm::VmInner;
use crate::walk;

const DF: u64 = 1 << 10;

/// Continues the string store whose element at `gpa` (`len` bytes) was just applied. Returns
/// the registers to load and the number of elements completed, or None to leave it to the CPU.
pub(crate) fn continue_rep(
    vm: &VmInner,
    mem: &GuestMemoryMmap,
    sys: &SysCache,
    regs: &kvm_regs,
    gpa: u64,
    len: usize,
    vcpu: u32,
) -> Option<(kvm_regs, u64)> {
    if regs.rcx == 0 || !sys.long64 {
        return None;
    }
    let cr3 = sys.cr3;
    let mut bytes = [0u8; 15];
    let n = walk::read_virt_prefix(mem, cr3, regs.rip, &mut bytes);
    if !bytes[..n.min(4)].contains(&0xf3) {
        return None; // no rep prefix where one would be: not a rep string store
    }
    let insn = Decoder::with_ip(64, &bytes[..n], regs.rip, DecoderOptions::NONE).decode();
    let size: u64 = match insn.mnemonic() {
        Mnemonic::Stosb | Mnemonic::Movsb => 1,
        Mnemonic::Stosw | Mnemonic::Movsw => 2,
        Mnemonic::Stosd | Mnemonic::Movsd => 4,
        Mnemonic::Stosq | Mnemonic::Movsq => 8,
        _ => return None,
    };
    let movs = matches!(
        insn.mnemonic(),
        Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq
    );
    // 64-bit addressing, no segment override (FS/GS bases would apply), a plain rep prefix.
    if !insn.has_rep_prefix()
        || insn.is_invalid()
        || insn.memory_size().size() == 0
        || insn.segment_prefix() != iced_x86::Register::None
        || bytes[..n.min(4)].contains(&0x67)
        || len as u64 != size
    {
        return None;
    }
    let down = regs.rflags & DF != 0;
    let step = |v: u64| {
        if down {
            v.wrapping_sub(size)
        } else {
            v.wrapping_add(size)
        }
    };
    let back = |v: u64| {
        if down {
            v.wrapping_add(size)
        } else {
            v.wrapping_sub(size)
        }
    };
    // The exit must be the element just done: [rdi - size] (or + size going down).
    let done_gva = back(regs.rdi);
    if walk::translate(mem, cr3, done_gva).ok()?.gpa != gpa {
        return None;
    }
    let mut r = *regs;
    let page = r.rdi & !0xfff;
    let mut count = 0u64;
    while r.rcx > 0 {
        let dst = r.rdi;
        if dst & !0xfff != page || (dst & 0xfff) + size > 0x1000 {
            break; // next page (or a straddling element): back to the CPU
        }
        let Ok(t) = walk::translate(mem, cr3, dst) else {
            break;
        };
        if !t.writable
            || !t.user
            || !mem.check_range(GuestAddress(t.gpa), len, Permissions::ReadWrite)
        {
            break;
        }
        let mut value = [0u8; 8];
        let value = &mut value[..len];
        if movs {
            // The source must be user-readable (the CPU checks U/S at CPL3; at CPL0 the
            // element is then left to the CPU, which is never wrong).
            let user = |at: u64| walk::translate(mem, cr3, at).is_ok_and(|t| t.user);
            if !user(r.rsi) || !user(r.rsi.wrapping_add(size - 1)) {
                break;
            }
            if !walk::read_virt(mem, cr3, r.rsi, value) {
                break;
            }
        } else {
            value.copy_from_slice(&r.rax.to_le_bytes()[..len]);
        }
        apply_write(vm, t.gpa, value, Source::Vcpu(vcpu));
        r.rcx -= 1;
        r.rdi = step(r.rdi);
        if movs {
            r.rsi = step(r.rsi);
        }
        count += 1;
    }
    if count == 0 {
        return None;
    }
    if r.rcx == 0 {
        r.rip = insn.next_ip();
    }
    Some((r, count))
}
