//! The register accessors: general registers of every width (AH..BH included) in `kvm_regs`,
//! and vector, opmask and MMX registers out of the XSAVE area. The one set in pagetrack: the
//! store plan, the SIMD/x87 completions, the atomic path's register rebuild and
//! pagetrack-kvm's store path ([`gpr`]) all use these.

use iced_x86::Register;
use kvm_bindings::kvm_regs;

use crate::bytes::{read_le, size_mask, sub};
use crate::emulate::{CpuState, EmulateError};
use crate::xsave::{component_bytes, xsave_area};

fn is_high8(reg: Register) -> bool {
    matches!(
        reg,
        Register::AH | Register::CH | Register::DH | Register::BH
    )
}

fn gpr_slot(regs: &mut kvm_regs, full: Register) -> Option<&mut u64> {
    Some(match full {
        Register::RAX => &mut regs.rax,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RBX => &mut regs.rbx,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return None,
    })
}

/// Value of a general register of any size (AH..BH included), zero-extended; RIP as is.
pub fn gpr(regs: &kvm_regs, reg: Register) -> Option<u64> {
    if reg == Register::RIP {
        return Some(regs.rip);
    }
    read_gpr(regs, reg)
}

/// Value of a general register of any size (AH..BH included), zero-extended.
pub(crate) fn read_gpr(regs: &kvm_regs, reg: Register) -> Option<u64> {
    if !reg.is_gpr() {
        return None;
    }
    let mut copy = *regs;
    let full = *gpr_slot(&mut copy, reg.full_register())?;
    Some(if is_high8(reg) {
        (full >> 8) & 0xff
    } else {
        full & size_mask(reg.size())
    })
}

/// Writes a general register as x86 does: 8/16-bit writes keep the other bits, 32-bit writes
/// zero-extend.
pub(crate) fn write_gpr(regs: &mut kvm_regs, reg: Register, value: u64) -> Option<()> {
    if !reg.is_gpr() {
        return None;
    }
    let slot = gpr_slot(regs, reg.full_register())?;
    *slot = if is_high8(reg) {
        (*slot & !0xff00) | ((value & 0xff) << 8)
    } else {
        match reg.size() {
            1 => (*slot & !0xff) | (value & 0xff),
            2 => (*slot & !0xffff) | (value & 0xffff),
            4 => value & 0xffff_ffff,
            _ => value,
        }
    };
    Some(())
}

/// The 64 bytes of the zmm register containing `reg` (only `reg.size()` of them filled).
pub(crate) fn vector_register(state: &CpuState, reg: Register) -> Result<[u8; 64], EmulateError> {
    let (n, size) = (reg.number(), reg.size().min(64));
    let mut out = [0u8; 64];
    if n < 16 {
        out[..16].copy_from_slice(sub(xsave_area(state)?, 160 + 16 * n, 16)?);
        if size >= 32 {
            out[16..32].copy_from_slice(&component_bytes(state, 2, 16 * n, 16)?);
        }
        if size >= 64 {
            out[32..64].copy_from_slice(&component_bytes(state, 6, 32 * n, 32)?);
        }
    } else {
        out[..size].copy_from_slice(&component_bytes(state, 7, 64 * (n - 16), size)?);
    }
    Ok(out)
}

/// The value of opmask register `k` (K0..K7), from XSAVE component 5.
pub(crate) fn opmask_register(state: &CpuState, k: Register) -> Result<u64, EmulateError> {
    let n = k.number() - Register::K0.number();
    Ok(read_le(&component_bytes(state, 5, 8 * n, 8)?))
}

/// MMX register `n` (physical x87 register `n`, stored in the legacy region `area` in ST
/// order).
pub(crate) fn mmx_register(area: &[u8], n: usize) -> Result<Vec<u8>, EmulateError> {
    let top = usize::from(area.get(2).copied().unwrap_or(0) >> 3 & 7);
    let slot = (n + 8 - top) % 8;
    Ok(sub(area, 32 + 16 * slot, 8)?.to_vec())
}
