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
    /// order. Write those on frames KVM could not write, then apply the exit, unless a piece
    /// in `before` lies on a frame KVM could not write: the slot's earlier piece was then an
    /// exit of its own (KVM passes on a straddling slot's pieces one exit each, in address
    /// order), at which the other pushes were written; apply this exit only.
    Complete {
        /// The instruction's address (its start).
        rip: u64,
        /// The other pushes (the exit's slot left out).
        stores: Vec<Store>,
        /// The pieces of the exit's slot below the exit (it straddles two pages).
        before: Vec<Store>,
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
    check_with(mem, mode, regs, gpa, data, &|_| false)
}

/// [`check`], told by `tracked` whether the frame of a guest-physical address is
/// write-tracked (KVM passes on stores to it as exits, and writes the others itself).
/// [`check`] assumes no frame is: each hypothesis that needs a store to have landed on a
/// writable frame is then kept (the safe side).
pub fn check_with<M: GuestMemory + ?Sized>(
    mem: &M,
    mode: &CpuMode,
    regs: &kvm_regs,
    gpa: u64,
    data: &[u8],
    tracked: &dyn Fn(u64) -> bool,
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
        tracked,
    };
    let Some(_) = mode.legacy else {
        // 64-bit mode: only a far call stores twice.
        return if off == 0 && matches!(len, 2 | 4 | 8) && cx.slot_is(0, &exit) {
            cx.far_call(&exit).unwrap_or(Verdict::Single)
        } else {
            Verdict::Single
        };
    };
    // A far transfer into CS:IP (an interrupt, a far call) writes the slots at SS:SP
    // whatever the bytes before IP spell: it is ruled out by proof, or refused, before any
    // instruction ending at IP is taken as the explanation.
    let transfer = cx.far_transfer(&exit, off);
    if let Transfer::Drops(v) = transfer {
        return v;
    }
    if let Some(v) = cx.pusha(&exit, matches!(transfer, Transfer::First)) {
        return v;
    }
    if off != 0 || !matches!(len, 2 | 4) || !cx.slot_is(0, &exit) {
        return Verdict::Single;
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

/// Where the exit lies among a `pusha`'s pushes: (slot, piece).
type Hit = (usize, usize);

/// Whether a far transfer into CS:IP could have made the exit.
enum Transfer {
    /// Ruled out.
    No,
    /// Possible, with the exit its first push (a far call's CS, an interrupt's FLAGS, the
    /// later pushes on frames KVM wrote): nothing of it was dropped, but the exit is no
    /// proof of an instruction ending at IP either.
    First,
    /// Possible, and KVM dropped its earlier pushes: refuse.
    Drops(Verdict),
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
    tracked: &'a dyn Fn(u64) -> bool,
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
    /// whose pushes include the exit. `transfer`: a far transfer into CS:IP could have made
    /// the exit (a competing explanation).
    fn pusha(&self, exit: &Exit<'_>, transfer: bool) -> Option<Verdict> {
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
        if other || transfer || self.call_into_rip(exit) || self.string_at_rip() {
            return Some(refuse(
                "the exit matches a pusha push, but other instructions could have made it",
            ));
        }
        // The exit's own slot is left out whole: KVM wrote its pieces on writable frames and
        // passes on each piece on a tracked frame as an exit of its own, in address order.
        let (slot, piece) = hit;
        let before = slots[slot][..piece].to_vec();
        let stores = slots
            .into_iter()
            .enumerate()
            .filter(|&(i, _)| i != slot)
            .flat_map(|(_, s)| s)
            .collect();
        Some(Verdict::Complete {
            rip: insn.ip(),
            stores,
            before,
        })
    }

    /// The pushes of `insn` if it is a `pusha`/`pushad` ending at RIP (each slot's pieces,
    /// in push order) and the exit's (slot, piece) indices.
    fn pusha_slots(&self, insn: &Instruction, exit: &Exit<'_>) -> Option<(Vec<Vec<Store>>, Hit)> {
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
        let hit = slots.iter().enumerate().find_map(|(i, slot)| {
            slot.iter()
                .position(|p| p.gpa == exit.gpa && p.bytes == exit.data)
                .map(|j| (i, j))
        })?;
        Some((slots, hit))
    }

    /// Whether a far transfer into CS:IP could have made the exit at `SS:(SP + off)`
    /// ([`Transfer`]). The bytes before IP are never evidence against one: the transfer's
    /// target is the guest's choice, and it may follow bytes that spell any instruction.
    fn far_transfer(&self, exit: &Exit<'_>, off: u64) -> Transfer {
        let o = exit.data.len() as u64;
        let long = matches!(self.mode.paging, Paging::FourLevel(_));
        let mut first = false;
        // Real-mode interrupt frame: FLAGS at SP+4, CS at SP+2, IP at SP. The exit is the
        // IP push, or (the lower slots on frames KVM wrote) the CS or the FLAGS push, or a
        // piece of one (a slot straddling a page: with paging off, `off` is the exit's
        // exact distance from SS:SP).
        // A piece of a straddling slot begins or ends at a page boundary.
        let piece = self.mode.paging == Paging::Off
            && (exit.gpa & 0xfff == 0 || (exit.gpa + o) & 0xfff == 0);
        if self.mode.real
            && off < 6
            && ((o == 2 && off.is_multiple_of(2) && self.slot_is(off, exit)) || (o == 1 && piece))
            && self.interrupt_possible()
        {
            if off < 4 {
                return Transfer::Drops(Verdict::Refuse {
                    rip: self.regs.rip,
                    bytes: self.mode.fetch(self.mem, self.regs.rip),
                    reason: "an interrupt frame (int n, int3, into or a delivered event): KVM \
                             dropped the FLAGS (and CS) pushes, which the handler's state \
                             does not determine",
                });
            }
            first = true;
        }
        match piece.then(|| self.far_call_piece(exit, off)).flatten() {
            Some(Transfer::Drops(v)) => return Transfer::Drops(v),
            Some(_) => first = true,
            None => {}
        }
        // Far call: CS at SP+o, the return offset at SP.
        if off == 0 && (matches!(o, 2 | 4) || (long && o == 8)) && self.slot_is(0, exit) {
            if let Some(v) = self.far_call(exit) {
                return Transfer::Drops(v);
            }
            if self.mode.paging == Paging::Off
                && let Some(v) = self.far_call_from_any_segment(read_le(exit.data), exit.data.len())
            {
                return Transfer::Drops(v);
            }
        }
        if self.mode.paging == Paging::Off
            && matches!(o, 2 | 4)
            && off == o
            && self.slot_is(off, exit)
            && self.far_call_cs_push(exit)
        {
            first = true;
        }
        if first { Transfer::First } else { Transfer::No }
    }

    /// A far call located in the current code segment whose return-offset push is the exit.
    fn far_call(&self, exit: &Exit<'_>) -> Option<Verdict> {
        let ret = read_le(exit.data);
        let before = self.mode.bytes_before(self.mem, ret);
        self.far_call_ending(&before, ret, exit.data.len(), self.mode.base(Register::CS))
    }

    /// Paging off: the exit (beginning or ending at a page boundary) is a proper piece of a
    /// far call's return-offset slot at SS:SP (`o` = 2 or 4 bytes straddling a page; KVM passes on each piece on a tracked frame as
    /// an exit of its own, lowest first). The bytes below the exit are read back (an earlier
    /// exit applied them, or KVM wrote them); the bytes above it are not known yet: their
    /// values up to the caller's CS limit + 1 are tried if there are at most 257 (a full
    /// search each), else it refuses (no far call can be ruled out). A piece of the CS slot
    /// counts as possible (competing) when the offset slot lies on frames KVM wrote. None:
    /// not such a piece.
    fn far_call_piece(&self, exit: &Exit<'_>, off: u64) -> Option<Transfer> {
        let len = exit.data.len() as u64;
        let mut first = false;
        for (o, size) in [(2u64, 2usize), (4, 4)] {
            if off + len > 2 * o || (off.is_multiple_of(o) && len == o) {
                continue;
            }
            if off >= o {
                // The CS push's pieces exit only if the later offset push landed on frames
                // KVM wrote.
                let offset_written = (0..o).all(|i| {
                    self.mode
                        .translate(self.mem, self.mode.stack(self.sp, i))
                        .is_none_or(|g| !(self.tracked)(g))
                });
                first |= offset_written;
                continue;
            }
            if off + len > o {
                continue;
            }
            let below: Vec<u8> = (0..off)
                .map(|i| {
                    let mut b = [0u8; 1];
                    (self
                        .mode
                        .read_prefix(self.mem, self.mode.stack(self.sp, i), &mut b)
                        == 1)
                        .then_some(b[0])
                })
                .collect::<Option<_>>()?;
            let known = [&below[..], exit.data].concat();
            // The offset is at most the caller's CS limit + 1. In real mode that is the
            // current CS limit: KVM's real-mode far call changes only CS's base
            // (`__load_segment_descriptor` keeps the limit, for unreal mode).
            let bound = match self.mode.legacy {
                Some(l) if self.mode.real => u64::from(l.get(Register::CS).limit) + 1,
                _ => size_mask(size),
            };
            let highs = if known.len() == size {
                0
            } else {
                bound >> (8 * known.len())
            };
            if highs > 0x100 {
                return Some(Transfer::Drops(Verdict::Refuse {
                    rip: self.regs.rip,
                    bytes: self.mode.fetch(self.mem, self.regs.rip),
                    reason: "a piece of a push straddling two pages at the stack pointer: \
                             a far call whose other pushes KVM dropped cannot be ruled out",
                }));
            }
            for high in 0..=highs {
                let ret = read_le(&known) | (high << (8 * known.len()));
                if ret > bound {
                    continue;
                }
                let before = self.mode.bytes_before(self.mem, ret);
                let found = self
                    .far_call_ending(&before, ret, size, self.mode.base(Register::CS))
                    .or_else(|| self.far_call_from_any_segment(ret, size));
                if let Some(v) = found {
                    return Some(Transfer::Drops(v));
                }
            }
        }
        first.then_some(Transfer::First)
    }

    /// A far call whose return offset is `ret` (the exit's size `o`) and whose target (`9a`
    /// pointer or memory operand) is the current CS:IP, `before` the bytes before `ret` in
    /// the caller's code segment (base `caller_base`).
    fn far_call_ending(
        &self,
        before: &[u8],
        ret: u64,
        o: usize,
        caller_base: u64,
    ) -> Option<Verdict> {
        // Cheap filter: a far call is `9a` (legacy modes) or `ff /3`.
        let maybe = before.iter().enumerate().any(|(i, &b)| {
            (b == 0x9a && self.mode.legacy.is_some())
                || (b == 0xff && before.get(i + 1).is_some_and(|m| (m >> 3) & 7 == 3))
        });
        if !maybe {
            return None;
        }
        self.far_call_decoded(before, ret, o, caller_base)
    }

    fn far_call_decoded(
        &self,
        before: &[u8],
        ret: u64,
        o: usize,
        caller_base: u64,
    ) -> Option<Verdict> {
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
                    // The pushes: CS and the offset, each of the exit's size. The caller's
                    // registers are the current ones but for SP and CS.
                    let pre_sp = self.sp.wrapping_add(2 * o as u64) & self.mode.sp_mask();
                    let Some(la) = insn.virtual_address(0, 0, |r, _, _| {
                        if r == Register::CS {
                            Some(caller_base)
                        } else {
                            self.reg(r, pre_sp)
                        }
                    }) else {
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

    /// Paging off: a far call to CS:IP returning to `ret` from any code segment the caller
    /// could have been in. Real mode: every base `16 * s` (one read of the 1 MiB they span,
    /// then a byte filter per base: `9a` where the pointer must lie, or an `ff /3` with a
    /// memory operand ending there). Protected mode: the code segments of the GDT and LDT; a
    /// descriptor table that cannot be read refuses (the caller cannot be ruled out).
    fn far_call_from_any_segment(&self, ret: u64, o: usize) -> Option<Verdict> {
        let unknown = || Verdict::Refuse {
            rip: self.regs.rip,
            bytes: self.mode.fetch(self.mem, self.regs.rip),
            reason: "a far call from another code segment cannot be ruled out (its \
                     descriptor table is not readable)",
        };
        let n = usize::try_from(15.min(ret)).unwrap_or(15);
        if !self.mode.real {
            let Some(bases) = self.code_segment_bases() else {
                return Some(unknown());
            };
            return bases.into_iter().find_map(|base| {
                let end = (base + ret) & 0xffff_ffff;
                let before = self.read_linear(end.wrapping_sub(n as u64), n)?;
                self.far_call_ending(&before, ret, o, base)
            });
        }
        // [ret - n, 0xffff0 + ret): the bytes before every candidate end 16 * s + ret.
        let lo = ret - n as u64;
        let span = 0xf_fff0 + n;
        let mut buf = vec![0u8; span];
        // Page-wise (RAM ends at page boundaries); an unreadable page reads as zeros, which
        // spell no call (code cannot be fetched from it).
        let mut at = 0usize;
        while at < span {
            let gpa = lo + at as u64;
            let chunk = usize::try_from(0x1000 - (gpa & 0xfff))
                .unwrap_or(1)
                .min(span - at);
            let _ = self
                .mem
                .read_slice(&mut buf[at..at + chunk], GuestAddress(gpa));
            at += chunk;
        }
        let (ptr_at, ptr): (usize, Vec<u8>) = {
            let cs = self.mode.cs_selector.to_le_bytes();
            let ip = self.regs.rip.to_le_bytes();
            if o == 2 {
                (5, [&ip[..2], &cs[..]].concat())
            } else {
                (7, [&ip[..4], &cs[..]].concat())
            }
        };
        (0..=0xffffu64).find_map(|s| {
            let end = n + usize::try_from(s << 4).unwrap_or(0);
            let before = &buf[end - n..end];
            // First a word-wide look at the 8 bytes before the end: neither the `9a` where
            // its pointer must begin nor an `ff` 2 to 7 bytes back: no far call (the bytes
            // equal to 0xff are the zero bytes of the complement; the test may flag a byte
            // that is not, never miss one that is).
            if let Some(w) = end
                .checked_sub(8)
                .and_then(|at| buf.get(at..end))
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
            {
                let t = !u64::from_le_bytes(w);
                let ff = t.wrapping_sub(0x0101_0101_0101_0101) & !t & 0x0080_8080_8080_8000;
                if ff == 0 && w[8 - ptr_at] != 0x9a {
                    return None;
                }
            }
            let direct =
                n >= ptr_at && before[n - ptr_at] == 0x9a && before[n - ptr_at + 1..] == ptr[..];
            // `ff /3` with a memory operand whose ModRM (16- or 32-bit addressing) makes it
            // end exactly here.
            let indirect = (2..=7.min(n)).any(|k| {
                let m = before[n - k + 1];
                let sib = before.get(n - k + 2).copied().unwrap_or(0);
                before[n - k] == 0xff
                    && (m >> 3) & 7 == 3
                    && m >> 6 != 3
                    && (k == modrm_len(m, sib, 16) || k == modrm_len(m, sib, 32))
            });
            (direct || indirect)
                .then(|| self.far_call_decoded(before, ret, o, s << 4))
                .flatten()
        })
    }

    /// Unpaged protected mode: the bases of the code segments of the GDT and LDT; None if a
    /// table cannot be read.
    fn code_segment_bases(&self) -> Option<Vec<u64>> {
        let mut bases = Vec::new();
        let (gdt, glimit) = self.mode.gdt;
        let tables = [(gdt, u32::from(glimit))].into_iter().chain(self.mode.ldt);
        for (base, limit) in tables {
            let count = (u64::from(limit) + 1) / 8;
            for i in 0..count.min(8192) {
                let d = read_le(&self.read_linear((base + 8 * i) & 0xffff_ffff, 8)?);
                // S = 1, code (type bit 3), present.
                if d & (1 << 44) != 0 && d & (1 << 43) != 0 && d & (1 << 47) != 0 {
                    let b = ((d >> 16) & 0xff_ffff) | ((d >> 56) << 24);
                    if !bases.contains(&b) {
                        bases.push(b);
                    }
                }
            }
        }
        Some(bases)
    }

    /// Paging off: whether the exit at `SS:(SP + o)` may be the CS push of a far call whose
    /// return-offset push (at SS:SP) landed on a frame KVM wrote: the caller's CS is the
    /// exit, the offset is read back, and the caller is looked for at CS:offset.
    fn far_call_cs_push(&self, exit: &Exit<'_>) -> bool {
        let o = exit.data.len();
        let selector = read_le(exit.data) & 0xffff;
        let Some(ret) = self
            .read_linear(self.mode.stack(self.sp, 0), o)
            .map(|b| read_le(&b))
        else {
            return true;
        };
        let base = if self.mode.real {
            selector << 4
        } else {
            let (table, limit) = if selector & 4 != 0 {
                match self.mode.ldt {
                    Some(t) => t,
                    None => return false,
                }
            } else {
                (self.mode.gdt.0, u32::from(self.mode.gdt.1))
            };
            let at = selector & !7;
            if at + 7 > u64::from(limit) {
                return false;
            }
            let Some(d) = self.read_linear((table + at) & 0xffff_ffff, 8) else {
                return true;
            };
            let d = read_le(&d);
            ((d >> 16) & 0xff_ffff) | ((d >> 56) << 24)
        };
        let n = usize::try_from(15.min(ret)).unwrap_or(15);
        let end = (base + ret) & 0xffff_ffff;
        self.read_linear(end.wrapping_sub(n as u64), n)
            .is_none_or(|before| self.far_call_ending(&before, ret, o, base).is_some())
    }

    /// Real mode: whether the current CS:IP is the entry of an interrupt vector and IF and
    /// TF are clear (as `int n`, `int3`, `into` and delivered events leave them). If the
    /// table does not read whole, each entry is read on its own; one that cannot be read
    /// cannot be ruled out (KVM would have read it from a device).
    fn interrupt_possible(&self) -> bool {
        if self.regs.rflags & (IF | TF) != 0 {
            return false;
        }
        let ip = u32::from(u16::try_from(self.regs.rip & 0xffff).unwrap_or(0));
        let want = (u32::from(self.mode.cs_selector) << 16) | ip;
        let base = self.mode.idt_base & 0xffff_ffff;
        // All 256 entries whatever IDTR.limit: KVM's real-mode delivery
        // (`__emulate_int_real`) does not check the limit.
        let count = 256;
        let mut ivt = [0u8; 1024];
        if self.mem.read_slice(&mut ivt, GuestAddress(base)).is_ok() {
            return ivt
                .chunks_exact(4)
                .any(|e| u32::from_le_bytes([e[0], e[1], e[2], e[3]]) == want);
        }
        (0..count).any(|v| {
            let mut e = [0u8; 4];
            self.mem
                .read_slice(&mut e, GuestAddress(base + 4 * v))
                .map_or(true, |()| u32::from_le_bytes(e) == want)
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
        // A push of a register or an immediate stores that value (the register is unchanged
        // by it): a whole slot of other data is not its store.
        if insn.mnemonic() == Mnemonic::Push
            && usize::try_from(insn.stack_pointer_increment().unsigned_abs()).ok()
                == Some(exit.data.len())
        {
            let value = match insn.op0_kind() {
                OpKind::Register
                    if insn.op0_register().is_gpr()
                        && insn.op0_register().full_register() != Register::RSP =>
                {
                    read_gpr(self.regs, insn.op0_register())
                }
                OpKind::Immediate8to16
                | OpKind::Immediate16
                | OpKind::Immediate8to32
                | OpKind::Immediate32
                | OpKind::Immediate8to64
                | OpKind::Immediate32to64 => Some(insn.immediate(0)),
                _ => None,
            };
            if value.is_some_and(|v| v & size_mask(exit.data.len()) != read_le(exit.data)) {
                return false;
            }
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

/// The length of `ff` + ModRM (+ SIB) + displacement for a memory operand (mod != 3) with
/// 16- or 32-bit addressing.
fn modrm_len(modrm: u8, sib: u8, addressing: u32) -> usize {
    let (md, rm) = (modrm >> 6, modrm & 7);
    if addressing == 16 {
        return 2 + match (md, rm) {
            (0, 6) | (2, _) => 2,
            (1, _) => 1,
            _ => 0,
        };
    }
    let sib_len = usize::from(rm == 4);
    let disp = match (md, rm) {
        (0, 5) => 4,
        (0, 4) if sib & 7 == 5 => 4,
        (1, _) => 1,
        (2, _) => 4,
        _ => 0,
    };
    2 + sib_len + disp
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
        let Verdict::Complete { rip, stores, .. } =
            check(&m, &real_mode(), &r, 0x77f0, &[0x77, 0x77])
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
    fn a_straddling_slot_is_completed_at_its_first_piece_only() {
        // pushad at SP = 0x701d: EDI's slot 0x6ffd..0x7001 straddles two frames (3 + 1).
        let m = real_code(&[0x66, 0x60]);
        let mut r = after_pusha();
        r.rdi = 0x7777_0101;
        r.rsp = 0x701d - 32;
        let edi = 0x7777_0101u32.to_le_bytes();
        let Verdict::Complete { stores, before, .. } =
            check(&m, &real_mode(), &r, 0x6ffd, &edi[..3])
        else {
            panic!("pushad not completed at EDI's first piece");
        };
        assert!(before.is_empty());
        assert_eq!(
            stores.len(),
            7,
            "the seven other pushes, EDI's pieces left out"
        );
        assert!(stores.iter().all(|s| s.gpa >= 0x7001));
        let all = |_| true;
        let Verdict::Complete { before, .. } =
            check_with(&m, &real_mode(), &r, 0x7000, &edi[3..], &all)
        else {
            panic!("EDI's second piece is a pushad piece too");
        };
        assert_eq!(
            before.iter().map(|s| s.gpa).collect::<Vec<_>>(),
            [0x6ffd],
            "the piece whose exit came first"
        );
    }

    #[test]
    fn modrm_lengths_match_the_decoder() {
        for modrm in (0u8..=0xff).filter(|m| m >> 6 != 3 && (m >> 3) & 7 == 3) {
            for sib in [0u8, 5, 0x25] {
                for (bits, prefix) in [(16u32, &[][..]), (32, &[0x67][..])] {
                    let mut b = prefix.to_vec();
                    b.extend([0xff, modrm, sib, 0, 0, 0, 0, 0]);
                    let insn = Decoder::with_ip(16, &b, 0, DecoderOptions::NONE).decode();
                    assert_eq!(
                        insn.len() - prefix.len(),
                        modrm_len(modrm, sib, bits),
                        "ff {modrm:02x} {sib:02x}, {bits}-bit addressing"
                    );
                }
            }
        }
    }

    #[test]
    fn pieces_of_a_far_transfer_slot_straddling_a_page_are_refused() {
        // call far 0:0x2101 at 0:0x1000; post SP = 0x6fff: the return offset 0x1005 is
        // split 1 + 1 at 0x7000 (two exits), the CS push at 0x7001 was dropped.
        let m: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        m.write_slice(&[0x9a, 0x01, 0x21, 0x00, 0x00], GuestAddress(0x1000))
            .unwrap();
        let r = kvm_regs {
            rip: 0x2101,
            rsp: 0x6fff,
            rflags: 0x202,
            ..Default::default()
        };
        for (gpa, byte) in [(0x6fff, 0x05u8), (0x7000, 0x10)] {
            let v = check(&m, &real_mode(), &r, gpa, &[byte]);
            // Found at 0:0x1000 or as 0x100:0 (the same bytes).
            assert!(
                matches!(&v, Verdict::Refuse { bytes, .. } if bytes[0] == 0x9a),
                "piece at {gpa:#x}: {v:?}"
            );
            m.write_slice(&[byte], GuestAddress(gpa)).unwrap(); // applied (or refused)
        }
        // An interrupt frame's IP slot split the same way (IVT[0x40] = 0:0x2101).
        m.write_slice(&[0x90; 5], GuestAddress(0x1000)).unwrap();
        m.write_obj(0x2101u32, GuestAddress(4 * 0x40)).unwrap();
        let r = kvm_regs { rflags: 2, ..r };
        for gpa in [0x6fff, 0x7000] {
            assert!(matches!(
                check(&m, &real_mode(), &r, gpa, &[0]),
                Verdict::Refuse { rip: 0x2101, .. }
            ));
        }
        // A byte store at SP away from a page boundary is no piece: never searched.
        let r = kvm_regs { rsp: 0x6ff0, ..r };
        m.write_obj(0u32, GuestAddress(4 * 0x40)).unwrap();
        m.write_slice(&[0x88, 0x06, 0xf0, 0x6f], GuestAddress(0x2101 - 4))
            .unwrap(); // mov [0x6ff0], al
        assert_eq!(check(&m, &real_mode(), &r, 0x6ff0, &[0]), Verdict::Single);
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
        // ... and applied as reported when `push di` ends at RIP and the store is DI...
        let m = real_code(&[0x57]);
        assert_eq!(
            check(&m, &real_mode(), &r, 0x77f0, &[0x77, 0x77]),
            Verdict::Single
        );
        // ... but not another value: `push di` would have stored DI.
        assert!(matches!(
            check(&m, &real_mode(), &r, 0x77f0, &[1, 2]),
            Verdict::Refuse { .. }
        ));
    }

    #[test]
    fn a_far_call_from_another_real_mode_segment_is_found_and_refused() {
        // call far 0x0200:0x0101 at 0:0x1000 (return offset 0x1005); the target 0x2101
        // follows a `push ax` byte and AX equals the return offset.
        let m: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        m.write_slice(&[0x9a, 0x01, 0x01, 0x00, 0x02], GuestAddress(0x1000))
            .unwrap();
        m.write_slice(&[0x50], GuestAddress(0x2100)).unwrap();
        let mut s = kvm_sregs::default();
        crate::boot::load_real_mode_sregs(&mut s);
        s.cs.selector = 0x200;
        s.cs.base = 0x2000;
        let mode = CpuMode::from_sregs(&s);
        let r = kvm_regs {
            rax: 0x1005,
            rip: 0x101,
            rsp: 0x77fc,
            rflags: 2,
            ..Default::default()
        };
        let v = check(&m, &mode, &r, 0x77fc, &0x1005u16.to_le_bytes());
        assert!(
            matches!(v, Verdict::Refuse { rip: 0x1000, .. }),
            "the far call at 0:0x1000, not `push ax`: {v:?}"
        );
        // Without the far call, `push ax` (AX = the store) explains it.
        m.write_slice(&[0x90; 5], GuestAddress(0x1000)).unwrap();
        assert_eq!(
            check(&m, &mode, &r, 0x77fc, &0x1005u16.to_le_bytes()),
            Verdict::Single
        );
    }

    #[test]
    fn an_interrupt_is_checked_before_pusha_and_an_unreadable_ivt_entry_is_not_ruled_out() {
        // The handler at 0x1010 follows a 0x60 byte; DI equals the IP pushed.
        let m = real_code(&[0x60]);
        m.write_obj(0x1010u32, GuestAddress(4 * 0x40)).unwrap(); // IVT[0x40] = 0:0x1010
        let mut r = after_pusha();
        r.rdi = 0x0502;
        let data = 0x0502u16.to_le_bytes();
        assert!(matches!(
            check(&m, &real_mode(), &r, 0x77f0, &data),
            Verdict::Refuse { rip: 0x1010, .. }
        ));
        // No vector points there: the pusha is completed.
        m.write_obj(0u32, GuestAddress(4 * 0x40)).unwrap();
        assert!(matches!(
            check(&m, &real_mode(), &r, 0x77f0, &data),
            Verdict::Complete { .. }
        ));
        // The IVT moved so that its upper entries lie beyond RAM: not ruled out.
        let mut s = kvm_sregs::default();
        crate::boot::load_real_mode_sregs(&mut s);
        s.idt.base = 0xffe00;
        s.idt.limit = 0x3ff;
        assert!(matches!(
            check(&m, &CpuMode::from_sregs(&s), &r, 0x77f0, &data),
            Verdict::Refuse { .. }
        ));
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
