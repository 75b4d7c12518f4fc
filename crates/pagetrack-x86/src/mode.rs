//! The vCPU's execution mode, as the decoders of trapped stores need it: the code size
//! (16, 32 or 64 bits, from CR0.PE, EFER.LMA, CS.L and CS.D), the segment bases and limits,
//! and how linear addresses become guest-physical ones (4-level paging, or none when CR0.PG
//! is clear). Read from the exit's special registers, never cached.

use iced_x86::Register;
use kvm_bindings::kvm_sregs;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::walk;

const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;
const EFER_LMA: u64 = 1 << 10;

/// One segment register's hidden part.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Base (linear).
    pub base: u64,
    /// Limit in bytes (the highest valid offset), granularity applied.
    pub limit: u32,
    /// An expand-down data segment (valid offsets lie *above* the limit).
    pub expand_down: bool,
}

/// The segments of a mode other than 64-bit, in ES, CS, SS, DS, FS, GS order.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LegacySegments {
    /// Code size: 16 or 32 (CS.D; 16 in real mode).
    pub bitness: u32,
    /// ES, CS, SS, DS, FS, GS.
    pub segments: [Segment; 6],
    /// SS.B: the stack pointer is ESP (32 bits) rather than SP.
    pub stack32: bool,
}

impl LegacySegments {
    /// The segment `r` names (DS for anything that is not a segment register).
    #[must_use]
    pub fn get(&self, r: Register) -> Segment {
        let i = match r {
            Register::ES => 0,
            Register::CS => 1,
            Register::SS => 2,
            Register::FS => 4,
            Register::GS => 5,
            _ => 3,
        };
        self.segments[i]
    }
}

/// How linear addresses translate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paging {
    /// CR0.PG clear: linear = physical (32 bits).
    Off,
    /// 4-level paging (long mode) rooted at this CR3.
    FourLevel(u64),
    /// 32-bit or PAE paging without long mode: not walked by pagetrack.
    Legacy,
}

/// The mode facts of one exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuMode {
    /// None in 64-bit mode; the segments (and code size) otherwise.
    pub legacy: Option<LegacySegments>,
    /// FS base (also in `legacy`).
    pub fs_base: u64,
    /// GS base.
    pub gs_base: u64,
    /// Translation.
    pub paging: Paging,
    /// CS selector.
    pub cs_selector: u16,
    /// Real mode (CR0.PE clear).
    pub real: bool,
    /// IDTR.base (the interrupt vector table in real mode).
    pub idt_base: u64,
    /// GDTR (base, limit).
    pub gdt: (u64, u16),
    /// The LDT's (base, limit) when LDTR holds a usable one.
    pub ldt: Option<(u64, u32)>,
}

/// `s.limit` is already in bytes: KVM_GET_SREGS (and the sync sregs) report the limit with
/// the granularity applied (`G = 1`: `(field << 12) | 0xfff`), and KVM_SET_SREGS takes it so.
fn segment(s: &kvm_bindings::kvm_segment, real: bool) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        // Data segment (bit 3 clear) with the expand-down bit (2).
        expand_down: !real && s.s != 0 && s.type_ & 0b1100 == 0b0100,
    }
}

impl CpuMode {
    /// The mode of `s` (`kvm_run`'s sync sregs or KVM_GET_SREGS).
    #[must_use]
    pub fn from_sregs(s: &kvm_sregs) -> CpuMode {
        let real = s.cr0 & CR0_PE == 0;
        let long = s.efer & EFER_LMA != 0;
        let paging = if s.cr0 & CR0_PG == 0 {
            Paging::Off
        } else if long {
            Paging::FourLevel(s.cr3)
        } else {
            Paging::Legacy
        };
        let legacy = (!(long && s.cs.l == 1) || real).then(|| LegacySegments {
            bitness: if !real && s.cs.db == 1 { 32 } else { 16 },
            segments: [&s.es, &s.cs, &s.ss, &s.ds, &s.fs, &s.gs].map(|g| segment(g, real)),
            stack32: !real && s.ss.db == 1,
        });
        CpuMode {
            legacy,
            fs_base: s.fs.base,
            gs_base: s.gs.base,
            paging,
            cs_selector: s.cs.selector,
            real,
            idt_base: s.idt.base,
            gdt: (s.gdt.base, s.gdt.limit),
            ldt: (s.ldt.unusable == 0 && s.ldt.present != 0).then_some((s.ldt.base, s.ldt.limit)),
        }
    }

    /// The code size: 16, 32 or 64.
    #[must_use]
    pub fn bitness(&self) -> u32 {
        self.legacy.map_or(64, |l| l.bitness)
    }

    /// The mask of an instruction pointer of this code size.
    #[must_use]
    pub fn ip_mask(&self) -> u64 {
        match self.bitness() {
            16 => 0xffff,
            32 => 0xffff_ffff,
            _ => u64::MAX,
        }
    }

    /// The mask of the stack pointer (SP, ESP or RSP).
    #[must_use]
    pub fn sp_mask(&self) -> u64 {
        match self.legacy {
            None => u64::MAX,
            Some(l) if l.stack32 => 0xffff_ffff,
            Some(_) => 0xffff,
        }
    }

    /// The base of segment `r` (0 for CS/DS/ES/SS in 64-bit mode).
    #[must_use]
    pub fn base(&self, r: Register) -> u64 {
        match (self.legacy, r) {
            (_, Register::FS) => self.fs_base,
            (_, Register::GS) => self.gs_base,
            (None, _) => 0,
            (Some(l), r) => l.get(r).base,
        }
    }

    /// The linear address of `seg:offset` (32-bit wrap outside 64-bit mode).
    #[must_use]
    pub fn linear(&self, seg: Register, offset: u64) -> u64 {
        let a = self.base(seg).wrapping_add(offset);
        if self.legacy.is_some() && !self.real {
            a & 0xffff_ffff
        } else {
            a
        }
    }

    /// The linear address of the stack slot at `SS:(sp + delta)` (the offset wraps at the
    /// stack pointer's size).
    #[must_use]
    pub fn stack(&self, sp: u64, delta: u64) -> u64 {
        self.linear(Register::SS, sp.wrapping_add(delta) & self.sp_mask())
    }

    /// The guest-physical address of linear `la`, if it translates.
    pub fn translate<M: GuestMemory + ?Sized>(&self, mem: &M, la: u64) -> Option<u64> {
        match self.paging {
            Paging::Off => Some(la & 0xffff_ffff),
            Paging::FourLevel(cr3) => walk::translate(mem, cr3, la).ok().map(|t| t.gpa),
            Paging::Legacy => None,
        }
    }

    /// Reads up to `buf.len()` bytes at linear `la`, stopping at the first byte that does
    /// not translate or is not guest memory; returns how many were read.
    pub fn read_prefix<M: GuestMemory + ?Sized>(&self, mem: &M, la: u64, buf: &mut [u8]) -> usize {
        if let Paging::FourLevel(cr3) = self.paging {
            return walk::read_virt_prefix(mem, cr3, la, buf);
        }
        let mut n = 0;
        while n < buf.len() {
            let Some(gpa) = self.translate(mem, la.wrapping_add(n as u64)) else {
                break;
            };
            if mem.read_slice(&mut buf[n..=n], GuestAddress(gpa)).is_err() {
                break;
            }
            n += 1;
        }
        n
    }

    /// The instruction bytes at `CS:ip` (up to 15).
    pub fn fetch<M: GuestMemory + ?Sized>(&self, mem: &M, ip: u64) -> Vec<u8> {
        let mut buf = [0u8; 15];
        let n = self.read_prefix(mem, self.linear(Register::CS, ip), &mut buf);
        buf[..n].to_vec()
    }

    /// The bytes `[CS:ip - n, CS:ip)` for the largest `n <= 15` that is readable (and does
    /// not wrap below offset 0). At most two translations: the page of the last byte, then
    /// the page below it.
    pub fn bytes_before<M: GuestMemory + ?Sized>(&self, mem: &M, ip: u64) -> Vec<u8> {
        let n = 15u64.min(ip);
        if n == 0 {
            return Vec::new();
        }
        let last = self.linear(Register::CS, ip - 1);
        let tail = n.min((last & 0xfff) + 1);
        let mut buf = vec![0u8; usize::try_from(n).unwrap_or(0)];
        let split = usize::try_from(n - tail).unwrap_or(0);
        let at = self.linear(Register::CS, ip - tail);
        if self.read_prefix(mem, at, &mut buf[split..]) != buf.len() - split {
            return Vec::new();
        }
        if split > 0 {
            let head = self.linear(Register::CS, ip - n);
            if self.read_prefix(mem, head, &mut buf[..split]) != split {
                return buf.split_off(split);
            }
        }
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real() -> kvm_sregs {
        let mut s = kvm_sregs::default();
        crate::boot::load_real_mode_sregs(&mut s);
        s
    }

    #[test]
    fn real_mode_is_16_bit_with_segment_bases_and_no_paging() {
        let mut s = real();
        s.ds.base = 0x9000;
        s.ss.base = 0x7_0000;
        let m = CpuMode::from_sregs(&s);
        assert_eq!((m.bitness(), m.real, m.paging), (16, true, Paging::Off));
        assert_eq!(m.linear(Register::DS, 0x120), 0x9120);
        assert_eq!(m.stack(0xfffe, 4), 0x7_0002, "SP wraps at 16 bits");
        assert_eq!(m.ip_mask(), 0xffff);
    }

    #[test]
    fn bytes_before_stop_at_an_unreadable_page_and_at_offset_0() {
        use vm_memory::GuestMemoryMmap;
        let m: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x3000)]).unwrap();
        let bytes: Vec<u8> = (0..32).collect();
        m.write_slice(&bytes, GuestAddress(0x1ff0)).unwrap();
        let mode = CpuMode::from_sregs(&real());
        assert_eq!(mode.bytes_before(&m, 0x2005), bytes[6..21].to_vec());
        assert_eq!(mode.bytes_before(&m, 3).len(), 3);
        // The page below RAM's start does not exist for a 4-level walk either; with paging
        // off, a range ending beyond RAM reads nothing.
        assert!(mode.bytes_before(&m, 0x3005).is_empty());
    }

    #[test]
    fn a_page_granular_limit_is_taken_as_kvm_reports_it_in_bytes() {
        let mut s = real();
        s.cr0 |= CR0_PE;
        s.ds.g = 1;
        s.ds.limit = 0x8fff; // field 8, G = 1, as KVM_GET_SREGS reports it
        let m = CpuMode::from_sregs(&s);
        assert_eq!(m.legacy.unwrap().get(Register::DS).limit, 0x8fff);
    }

    #[test]
    fn long_mode_is_64_bit_and_compatibility_mode_is_32() {
        let mut s = kvm_sregs {
            cr0: CR0_PE | CR0_PG,
            efer: EFER_LMA,
            cr3: 0x1000,
            ..Default::default()
        };
        s.cs.l = 1;
        s.ds.base = 0x1234; // ignored in 64-bit mode
        let m = CpuMode::from_sregs(&s);
        assert_eq!((m.bitness(), m.paging), (64, Paging::FourLevel(0x1000)));
        assert_eq!(m.linear(Register::DS, 8), 8);
        s.cs.l = 0;
        s.cs.db = 1;
        s.ss.db = 1;
        let m = CpuMode::from_sregs(&s);
        assert_eq!((m.bitness(), m.sp_mask()), (32, 0xffff_ffff));
        assert_eq!(m.linear(Register::DS, u64::from(u32::MAX)), 0x1233);
        s.efer = 0;
        assert_eq!(CpuMode::from_sregs(&s).paging, Paging::Legacy);
    }
}
