//! Instructions KVM's emulator stores more than once for, of which only the last store reaches
//! userspace (issue 10 item 3).
//!
//! KVM's `emulator_read_write` resets the vCPU's MMIO fragment list at every emulated write
//! of one instruction, and a write to a read-only (tracked) frame becomes a fragment: when an
//! instruction makes several stores to tracked frames, only the last one exits; the earlier
//! ones are silently dropped (stores to writable frames land directly). The cases: `pusha` /
//! `pushad` (eight pushes), `call far` (CS, then the return offset) and real-mode `int n`,
//! `int3`, `into` (FLAGS, CS, IP). [`check`] looks at every trapped store that lands on the
//! stack slots at the stack pointer KVM left and decides, by proof from the exit (address,
//! size, data, registers) and the instruction bytes:
//!
//! - [`Verdict::Complete`]: the exit is one push of a `pusha`, the unique explanation of the
//!   exit among the decodings ending at RIP (and no call into RIP or string at RIP could
//!   have made it). Every pushed value is a post-state register (the pushed SP is the post
//!   SP + 16 or 32), so the other seven pushes are determined: the caller writes those that
//!   lie on frames KVM could not write, with their events.
//! - [`Verdict::Refuse`]: a far call (its memory operand, or the `9a` pointer, holds the
//!   current CS:IP and the exit is its return-offset push) or an interrupt frame (real mode:
//!   CS:IP is an interrupt vector, IF and TF clear): the dropped pushes (the caller's CS,
//!   the old FLAGS) are not determined by the post-state. So is an ambiguous `pusha`. With
//!   paging off (real mode and unpaged protected mode, where KVM emulates every instruction),
//!   also a push into the slot that no single-store instruction in the current code segment
//!   explains (a far call from another segment, whose bytes pagetrack cannot locate).
//! - [`Verdict::Single`]: none of these: apply the exit as reported.

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, MemorySize,
    Mnemonic, OpAccess, OpKind, Register,
};
use kvm_bindings::kvm_regs;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::bytes::{read_le, size_mask};
use crate::mode::{CpuMode, Paging};
use crate::regs::read_gpr;

/// One store to complete: never crosses a 4 KiB page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    /// Linear address.
    pub gva: u64,
    /// Guest-physical address.
    pub gpa: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// What to do with a trapped store (module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Apply the exit as reported.
    Single,
    /// The exit is one push of a `pusha`/`pushad`; these are its other pushes, in push
    /// order. Write those on frames KVM could not write, then apply the exit.
    Complete {
        /// The instruction's address (its start).
        rip: u64,
        /// The other pushes.
        stores: Vec<Store>,
    },
    /// Stop the vCPU: stores of this instruction were dropped and cannot be rebuilt.
    Refuse {
        /// The instruction's address when known, else the current IP.
        rip: u64,
        /// The instruction's bytes (or those at the current IP).
        bytes: Vec<u8>,
        /// Why.
        reason: &'static str,
    },
}

const IF: u64 = 1 << 9;
const TF: u64 = 1 << 8;

/// Decides what to do with a trapped store of `data` at `gpa` (module docs). `regs` are the
/// registers after KVM's emulation, `mode` the exit's mode.
pub fn check<M: GuestMemory + ?Sized>(
    mem: &M,
    mode: &CpuMode,
    regs: &kvm_regs,
    gpa: u64,
    data: &[u8],
) -> Verdict {
    let len = data.len() as u64;
    if len == 0 || mode.paging == Paging::Legacy {
        return Verdict::Single;
    }
    let sp = regs.rsp & mode.sp_mask();
    let at_sp = mode.stack(sp, 0);
    // Cheap filter: the exit lies in the 32 bytes above the stack pointer (page offsets).
    let off = gpa.wrapping_sub(at_sp) & 0xfff;
    if off >= 32 {
        return Verdict::Single;
    }
    let exit = Exit { gpa, data };
    let cx = Cx {
        mem,
        mode,
        regs,
        sp,
    };
    let Some(_) = mode.legacy else {
        // 64-bit mode: only a far call stores twice.
        return if off == 0 && matches!(len, 2 | 4 | 8) && cx.slot_is(0, &exit) {
            cx.far_call(&exit).unwrap_or(Verdict::Single)
        } else {
            Verdict::Single
        };
    };
    if let Some(v) = cx.pusha(&exit) {
        return v;
    }
    // In long mode a far call from 64-bit code may land in compatibility mode (8-byte pushes).
    let long = matches!(mode.paging, Paging::FourLevel(_));
    if off != 0 || !(matches!(len, 2 | 4) || (long && len == 8)) || !cx.slot_is(0, &exit) {
        return Verdict::Single;
    }
    if let Some(v) = cx.far_call(&exit) {
        return v;
    }
    if let Some(v) = cx.interrupt(&exit) {
        return v;
    }
    if mode.paging == Paging::Off && !cx.single_store_explains(&exit) {
        return Verdict::Refuse {
            rip: regs.rip,
            bytes: mode.fetch(mem, regs.rip),
            reason: "no single-store instruction in this code segment explains this push: \
                     a far call or interrupt whose other pushes KVM dropped",
        };
    }
    Verdict::Single
}

struct Exit<'d> {
    gpa: u64,
    data: &'d [u8],
}

struct Cx<'a, M: ?Sized> {
    mem: &'a M,
    mode: &'a CpuMode,
    regs: &'a kvm_regs,
    /// The post stack pointer, masked.
    sp: u64,
}

impl<M: GuestMemory + ?Sized> Cx<'_, M> {
    /// The pieces (split at pages, translated) of `bytes` stored at `SS:(sp + delta)`.
    fn pieces(&self, delta: u64, bytes: &[u8]) -> Option<Vec<Store>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let gva = self.mode.stack(self.sp, delta + i as u64);
            let room = usize::try_from(0x1000 - (gva & 0xfff)).unwrap_or(1);
            // A 16-bit SP wraps inside the slot: one byte at a time there.
            let n = room
                .min(bytes.len() - i)
                .min(if self.mode.sp_mask() == 0xffff {
                    usize::try_from(0x1_0000 - ((self.sp + delta + i as u64) & 0xffff)).unwrap_or(1)
                } else {
                    usize::MAX
                });
            let gpa = self.mode.translate(self.mem, gva)?;
            out.push(Store {
                gva,
                gpa,
                bytes: bytes[i..i + n].to_vec(),
            });
            i += n;
        }
        Some(out)
    }

    /// Whether the exit is exactly the slot at `SS:(sp + delta)` (its first piece).
    fn slot_is(&self, delta: u64, exit: &Exit<'_>) -> bool {
        self.mode
            .translate(self.mem, self.mode.stack(self.sp, delta))
            == Some(exit.gpa)
    }

    fn decode(&self, bytes: &[u8], ip: u64) -> Instruction {
        Decoder::with_ip(self.mode.bitness(), bytes, ip, DecoderOptions::NONE).decode()
    }

    /// Every valid decoding of the bytes before `CS:ip` that ends exactly at `ip`, with its
    /// bytes.
    fn ending_at(&self, ip: u64) -> Vec<(Instruction, Vec<u8>)> {
        let before = self.mode.bytes_before(self.mem, ip);
        (1..=before.len())
            .filter_map(|k| {
                let b = &before[before.len() - k..];
                let insn = self.decode(b, ip - k as u64);
                (!insn.is_invalid() && insn.len() == k).then(|| (insn, b.to_vec()))
            })
            .collect()
    }

    /// The value of a register for an address, with RSP replaced by `pre_sp`.
    fn reg(&self, r: Register, pre_sp: u64) -> Option<u64> {
        if r.is_segment_register() {
            return Some(self.mode.base(r));
        }
        if r.full_register() == Register::RSP {
            return Some(pre_sp & size_mask(r.size()));
        }
        read_gpr(self.regs, r)
    }

    fn read_linear(&self, la: u64, n: usize) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; n];
        (self.mode.read_prefix(self.mem, la, &mut buf) == n).then_some(buf)
    }

    /// `pusha`/`pushad` candidates (legacy modes): None if no decoding ending at RIP is one
    /// whose pushes include the exit.
    fn pusha(&self, exit: &Exit<'_>) -> Option<Verdict> {
        let ip = self.regs.rip;
        let decodings = self.ending_at(ip);
        let (insn, bytes, slots, hit) = decodings.iter().find_map(|(insn, bytes)| {
            let (slots, hit) = self.pusha_slots(insn, exit)?;
            Some((insn, bytes, slots, hit))
        })?;
        let refuse = |reason| Verdict::Refuse {
            rip: insn.ip(),
            bytes: bytes.clone(),
            reason,
        };
        // Unique among the explanations: no other decoding ending at RIP stores (same
        // operation with redundant prefixes aside), no call into RIP, no string at RIP.
        let mut factory = InstructionInfoFactory::new();
        let other = decodings.iter().any(|(d, _)| {
            d.mnemonic() != insn.mnemonic()
                && if matches!(d.mnemonic(), Mnemonic::Pusha | Mnemonic::Pushad) {
                    self.pusha_slots(d, exit).is_some()
                } else {
                    self.may_explain(&mut factory, d, exit)
                }
        });
        if other || self.call_into_rip(exit) || self.string_at_rip() {
            return Some(refuse(
                "the exit matches a pusha push, but other instructions could have made it",
            ));
        }
        let stores = slots
            .into_iter()
            .flatten()
            .enumerate()
            .filter(|&(i, _)| i != hit)
            .map(|(_, s)| s)
            .collect();
        Some(Verdict::Complete {
            rip: insn.ip(),
            stores,
        })
    }

    /// The pushes of `insn` if it is a `pusha`/`pushad` ending at RIP (each slot's pieces,
    /// in push order) and the index of the piece that is the exit.
    fn pusha_slots(&self, insn: &Instruction, exit: &Exit<'_>) -> Option<(Vec<Vec<Store>>, usize)> {
        let o: usize = match insn.mnemonic() {
            Mnemonic::Pushad => 4,
            Mnemonic::Pusha => 2,
            _ => return None,
        };
        let pre_sp = self.sp.wrapping_add(8 * o as u64) & self.mode.sp_mask();
        let r = self.regs;
        // The pushed (E)SP keeps the bits above the stack pointer's size.
        let pushed_sp = (r.rsp & !self.mode.sp_mask()) | pre_sp;
        let values = [r.rax, r.rcx, r.rdx, r.rbx, pushed_sp, r.rbp, r.rsi, r.rdi];
        let mut slots = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let delta = (7 - i as u64) * o as u64;
            let b = (v & size_mask(o)).to_le_bytes();
            slots.push(self.pieces(delta, &b[..o])?);
        }
        let hit = slots
            .iter()
            .flatten()
            .position(|p| p.gpa == exit.gpa && p.bytes == exit.data)?;
        Some((slots, hit))
    }

    /// A far call whose return-offset push is the exit and whose target (`9a` pointer or
    /// memory operand) is the current CS:IP, located in the current code segment.
    fn far_call(&self, exit: &Exit<'_>) -> Option<Verdict> {
        let o = exit.data.len();
        let ret = read_le(exit.data);
        let before = self.mode.bytes_before(self.mem, ret);
        // Cheap filter: a far call is `9a` (legacy modes) or `ff /3`.
        let maybe = before.iter().enumerate().any(|(i, &b)| {
            (b == 0x9a && self.mode.legacy.is_some())
                || (b == 0xff && before.get(i + 1).is_some_and(|m| (m >> 3) & 7 == 3))
        });
        if !maybe {
            return None;
        }
        let ip = self.regs.rip;
        let cs = self.mode.cs_selector;
        // The caller's code size may differ from the target's (a far call between 64-bit and
        // compatibility mode, or between 16- and 32-bit segments).
        let sizes: &[u32] = if matches!(self.mode.paging, Paging::FourLevel(_)) {
            &[64, 32]
        } else {
            &[16, 32]
        };
        for (k, &bits) in (1..=before.len()).flat_map(|k| sizes.iter().map(move |b| (k, b))) {
            let b = &before[before.len() - k..];
            let insn = Decoder::with_ip(bits, b, ret.wrapping_sub(k as u64), DecoderOptions::NONE)
                .decode();
            if insn.is_invalid() || insn.len() != k || insn.mnemonic() != Mnemonic::Call {
                continue;
            }
            let consistent = match insn.op0_kind() {
                OpKind::FarBranch16 => {
                    o == 2
                        && u64::from(insn.far_branch16()) == ip
                        && insn.far_branch_selector() == cs
                }
                OpKind::FarBranch32 => {
                    o == 4
                        && u64::from(insn.far_branch32()) == ip
                        && insn.far_branch_selector() == cs
                }
                OpKind::Memory => {
                    let width = match insn.memory_size() {
                        MemorySize::SegPtr16 => 2,
                        MemorySize::SegPtr32 => 4,
                        MemorySize::SegPtr64 => 8,
                        _ => continue,
                    };
                    // The pushes: CS and the offset, each of the exit's size.
                    let pre_sp = self.sp.wrapping_add(2 * o as u64) & self.mode.sp_mask();
                    let Some(la) = insn.virtual_address(0, 0, |r, _, _| self.reg(r, pre_sp)) else {
                        continue;
                    };
                    let la = if bits == 64 { la } else { la & 0xffff_ffff };
                    width == o
                        && self.read_linear(la, width + 2).is_some_and(|m| {
                            read_le(&m[..width]) == ip
                                && u16::from_le_bytes([m[width], m[width + 1]]) == cs
                        })
                }
                _ => false,
            };
            if consistent {
                return Some(Verdict::Refuse {
                    rip: insn.ip(),
                    bytes: b.to_vec(),
                    reason: "call far: KVM dropped the push of the caller's CS, which the \
                             state after the call does not determine",
                });
            }
        }
        None
    }

    /// Real mode: the exit is the IP push of an interrupt frame (CS:IP is an interrupt
    /// vector's entry, IF and TF clear, as `int n`, `int3`, `into` and delivered events leave
    /// them).
    fn interrupt(&self, exit: &Exit<'_>) -> Option<Verdict> {
        if !self.mode.real || exit.data.len() != 2 || self.regs.rflags & (IF | TF) != 0 {
            return None;
        }
        let ip = u32::from(u16::try_from(self.regs.rip & 0xffff).unwrap_or(0));
        let want = (u32::from(self.mode.cs_selector) << 16) | ip;
        let mut ivt = [0u8; 1024];
        let base = self.mode.idt_base & 0xffff_ffff;
        self.mem.read_slice(&mut ivt, GuestAddress(base)).ok()?;
        let vector = ivt
            .chunks_exact(4)
            .position(|e| u32::from_le_bytes([e[0], e[1], e[2], e[3]]) == want)?;
        let _ = vector;
        Some(Verdict::Refuse {
            rip: self.regs.rip,
            bytes: self.mode.fetch(self.mem, self.regs.rip),
            reason: "an interrupt frame (int n, int3, into or a delivered event): KVM \
                     dropped the FLAGS and CS pushes, which the handler's state does not \
                     determine",
        })
    }

    /// Whether a decoding could have made the exit's store (over-approximated: an address
    /// that cannot be computed counts as possible).
    fn may_explain(
        &self,
        factory: &mut InstructionInfoFactory,
        insn: &Instruction,
        exit: &Exit<'_>,
    ) -> bool {
        if insn.flow_control() == FlowControl::Call
            && matches!(
                insn.op0_kind(),
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
            )
            && insn.near_branch_target() != self.regs.rip
        {
            return false;
        }
        let info = factory.info(insn);
        let written = |a: OpAccess| {
            matches!(
                a,
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            )
        };
        let changes = |r: Register| {
            r != Register::None
                && info.used_registers().iter().any(|u| {
                    u.register().full_register() == r.full_register() && written(u.access())
                })
        };
        info.used_memory()
            .iter()
            .filter(|m| written(m.access()))
            .any(|m| {
                let size = m.memory_size().size() as u64;
                if size == 0 {
                    return true;
                }
                let la = if changes(m.base()) || changes(m.index()) {
                    if m.base().full_register() == Register::RSP
                        && matches!(insn.mnemonic(), Mnemonic::Push | Mnemonic::Call)
                    {
                        self.mode.stack(self.sp, 0)
                    } else {
                        return true;
                    }
                } else {
                    match m.virtual_address(0, |r, _, _| self.reg(r, self.sp)) {
                        Some(la) if self.mode.legacy.is_some() => la & 0xffff_ffff,
                        Some(la) => la,
                        None => return true,
                    }
                };
                (0..size)
                    .any(|i| self.mode.translate(self.mem, la.wrapping_add(i)) == Some(exit.gpa))
            })
    }

    /// Whether the store may be a near call's push with RIP its target: the bytes before the
    /// return address (the exit's data) in this code segment end with a call to RIP or an
    /// indirect near call.
    fn call_into_rip(&self, exit: &Exit<'_>) -> bool {
        if !self.slot_is(0, exit) {
            return false;
        }
        let ret = read_le(exit.data);
        self.ending_at(ret)
            .iter()
            .any(|(insn, _)| match insn.flow_control() {
                FlowControl::Call => insn.near_branch_target() == self.regs.rip,
                FlowControl::IndirectCall => true,
                _ => false,
            })
    }

    /// Whether the instruction at RIP is a repeated string store (KVM leaves RIP on it).
    fn string_at_rip(&self) -> bool {
        let bytes = self.mode.fetch(self.mem, self.regs.rip);
        let insn = self.decode(&bytes, self.regs.rip);
        insn.is_invalid()
            || ((insn.has_rep_prefix() || insn.has_repne_prefix())
                && (0..insn.op_count()).any(|i| {
                    matches!(
                        insn.op_kind(i),
                        OpKind::MemoryESDI | OpKind::MemoryESEDI | OpKind::MemoryESRDI
                    )
                }))
    }

    /// With paging off: whether an instruction that stores once explains the exit (a push
    /// or store ending at RIP, a near call into RIP, a string at RIP).
    fn single_store_explains(&self, exit: &Exit<'_>) -> bool {
        let mut factory = InstructionInfoFactory::new();
        self.ending_at(self.regs.rip).iter().any(|(d, _)| {
            !matches!(d.code(), Code::Pushaw | Code::Pushad)
                && self.may_explain(&mut factory, d, exit)
        }) || self.call_into_rip(exit)
            || self.string_at_rip()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testmem::{CR3, identity};
    use kvm_bindings::kvm_sregs;
    use vm_memory::GuestMemoryMmap;

    fn real_mode() -> CpuMode {
        let mut s = kvm_sregs::default();
        crate::boot::load_real_mode_sregs(&mut s);
        CpuMode::from_sregs(&s)
    }

    fn long_mode() -> CpuMode {
        let mut s = kvm_sregs {
            cr0: 1 | 1 << 31,
            efer: 1 << 10,
            cr3: CR3,
            ..Default::default()
        };
        s.cs.l = 1;
        s.cs.selector = 0x23;
        CpuMode::from_sregs(&s)
    }

    /// Real-mode memory with `code` ending at 0x1010 (nops before it).
    fn real_code(code: &[u8]) -> GuestMemoryMmap {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        m.write_slice(&[0x90; 32], GuestAddress(0x1010 - 32))
            .unwrap();
        m.write_slice(code, GuestAddress(0x1010 - code.len() as u64))
            .unwrap();
        m
    }

    /// Registers after a real-mode `pusha` at SP = 0x7800.
    fn after_pusha() -> kvm_regs {
        kvm_regs {
            rax: 0x1111,
            rcx: 0x2222,
            rdx: 0x3333,
            rbx: 0x4444,
            rbp: 0x5555,
            rsi: 0x6666,
            rdi: 0x7777,
            rsp: 0x7800 - 16,
            rip: 0x1010,
            rflags: 2,
            ..Default::default()
        }
    }

    #[test]
    fn pusha_is_completed_from_the_registers() {
        let m = real_code(&[0x60]);
        let r = after_pusha();
        let Verdict::Complete { rip, stores } = check(&m, &real_mode(), &r, 0x77f0, &[0x77, 0x77])
        else {
            panic!("pusha not completed");
        };
        assert_eq!(rip, 0x100f);
        let got: Vec<_> = stores.iter().map(|s| (s.gpa, s.bytes.clone())).collect();
        let want: Vec<(u64, Vec<u8>)> = [0x1111u16, 0x2222, 0x3333, 0x4444, 0x7800, 0x5555, 0x6666]
            .iter()
            .enumerate()
            .map(|(i, v)| (0x77fe - 2 * i as u64, v.to_le_bytes().to_vec()))
            .collect();
        assert_eq!(
            got, want,
            "AX first, the SP before the instruction, DI (the exit) left out"
        );
    }

    #[test]
    fn a_store_that_is_no_pusha_push_is_single() {
        let m = real_code(&[0x60]);
        let r = after_pusha();
        // A store elsewhere is never looked at.
        assert_eq!(
            check(&m, &real_mode(), &r, 0x9000, &[0x77, 0x77]),
            Verdict::Single
        );
        // Another value at the DI slot: no pusha push. With paging off and nothing else
        // ending at RIP that stores there, it is refused (a far call from another segment
        // or an interrupt could have made it)...
        assert!(matches!(
            check(&m, &real_mode(), &r, 0x77f0, &[1, 2]),
            Verdict::Refuse { .. }
        ));
        // ... and applied as reported when `push di` ends at RIP.
        let m = real_code(&[0x57]);
        assert_eq!(
            check(&m, &real_mode(), &r, 0x77f0, &[1, 2]),
            Verdict::Single
        );
    }

    #[test]
    fn a_pusha_with_another_explanation_is_refused() {
        // mov [bp+0x60], di (89 7e 60): its displacement spells pusha.
        let m = real_code(&[0x89, 0x7e, 0x60]);
        let mut r = after_pusha();
        r.rbp = r.rsp - 0x60;
        assert!(matches!(
            check(&m, &real_mode(), &r, 0x77f0, &[0x77, 0x77]),
            Verdict::Refuse { rip: 0x100f, .. }
        ));
    }

    #[test]
    fn a_real_mode_interrupt_frame_is_refused() {
        let m: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        m.write_obj(0x2000u32, GuestAddress(4 * 0x40)).unwrap(); // IVT[0x40] = 0:0x2000
        let r = kvm_regs {
            rip: 0x2000,
            rsp: 0x77fa,
            rflags: 2,
            ..Default::default()
        };
        assert!(matches!(
            check(&m, &real_mode(), &r, 0x77fa, &0x1005u16.to_le_bytes()),
            Verdict::Refuse { rip: 0x2000, .. }
        ));
        // IF set: not what an interrupt leaves. The store still has no single-store
        // explanation in this segment, so with paging off it is refused all the same.
        let r = kvm_regs { rflags: 0x202, ..r };
        assert!(matches!(
            check(&m, &real_mode(), &r, 0x77fa, &0x1005u16.to_le_bytes()),
            Verdict::Refuse { .. }
        ));
        // A near call at 0x1002 to 0x2000 explains it: applied as reported.
        m.write_slice(&[0xe8, 0xfb, 0x0f], GuestAddress(0x1002))
            .unwrap();
        assert_eq!(
            check(&m, &real_mode(), &r, 0x77fa, &0x1005u16.to_le_bytes()),
            Verdict::Single
        );
    }

    #[test]
    fn a_64_bit_far_call_is_refused_only_when_its_operand_holds_cs_rip() {
        let m = identity();
        // call far [rdi] (48 ff 1f) ending at 0x1_0010; RIP now 0x1_2000, RSP 0x8ff0.
        m.write_slice(&[0x48, 0xff, 0x1f], GuestAddress(0x1_000d))
            .unwrap();
        m.write_obj(0x1_2000u64, GuestAddress(0x5000)).unwrap();
        m.write_obj(0x23u16, GuestAddress(0x5008)).unwrap();
        let r = kvm_regs {
            rip: 0x1_2000,
            rsp: 0x8ff0,
            rdi: 0x5000,
            ..Default::default()
        };
        let data = 0x1_0010u64.to_le_bytes();
        assert!(matches!(
            check(&m, &long_mode(), &r, 0x8ff0, &data),
            Verdict::Refuse { rip: 0x1_000d, .. }
        ));
        // Another selector in memory: not this far call; a plain push in 64-bit mode.
        m.write_obj(0x2bu16, GuestAddress(0x5008)).unwrap();
        assert_eq!(check(&m, &long_mode(), &r, 0x8ff0, &data), Verdict::Single);
        // Not at RSP: never looked at.
        m.write_obj(0x23u16, GuestAddress(0x5008)).unwrap();
        assert_eq!(check(&m, &long_mode(), &r, 0x8ff8, &data), Verdict::Single);
    }
}
