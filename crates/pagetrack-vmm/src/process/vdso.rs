//! The guest's vDSO: a one-page ELF shared object, found by the C library through
//! `AT_SYSINFO_EHDR`, whose `__vdso_clock_gettime`, `__vdso_gettimeofday` and `__vdso_time`
//! read the time inside the guest, without an exit, and a time page beside it.
//!
//! The clock is KVM's: the VMM points the vCPU's `MSR_KVM_SYSTEM_TIME_NEW` at the start of
//! the time page, and KVM keeps a `pvclock_vcpu_time_info` there (a TSC timestamp, the
//! kvmclock nanoseconds at that TSC, and the TSC-to-nanoseconds scale). The vDSO reads the
//! TSC and scales the delta, as Linux's own vDSO does on a KVM guest; the VMM adds two
//! offsets it wrote once at the start ([`TimePage`]), so that `CLOCK_REALTIME` is the host's
//! real time and `CLOCK_MONOTONIC` is the process VM's monotonic clock. The VMM's system
//! calls read the same kvmclock (`KVM_GET_CLOCK`), so the fast and slow paths agree.
//!
//! The vDSO never guesses: it makes the real system call for any other clock, for a
//! `gettimeofday` time zone, while KVM has not published a clock, when the clock is not
//! marked TSC-stable (the only case in which kvmclock is guaranteed monotonic across
//! updates), or when the VMM could not set the clock up.
//!
//! | offset | time page |
//! | --- | --- |
//! | 0 | `pvclock_vcpu_time_info` (32 bytes, written by KVM) |
//! | 64 | `u32` 1 if the VMM set kvmclock up |
//! | 72 | `i64` realtime offset (ns, wrapping add to kvmclock) |
//! | 80 | `i64` monotonic offset |

use iced_x86::BlockEncoderOptions;
use iced_x86::code_asm::{
    CodeAssembler, CodeLabel, byte_ptr, dword_ptr, eax, ecx, edi, qword_ptr, r8, r9d, r10, r10d,
    rax, rcx, rdi, rdx, rsi,
};

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kvm_bindings::{KVM_CLOCK_REALTIME, Msrs, kvm_msr_entry};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::error::{Error, Result};

/// Where the vDSO image is mapped (read and execute).
pub const VDSO_VA: u64 = 0x7fff_ffff_e000;
/// Where the time page is mapped (read only).
pub const VVAR_VA: u64 = 0x7fff_ffff_d000;
/// The guest frame holding the vDSO image.
pub const VDSO_GFN: u64 = 2;
/// The guest frame holding the time page.
pub const VVAR_GFN: u64 = 3;

/// `MSR_KVM_SYSTEM_TIME_NEW`.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// Offsets in the time page.
const PV_VERSION: u64 = 0;
const PV_TSC_TIMESTAMP: u64 = 8;
const PV_SYSTEM_TIME: u64 = 16;
const PV_MUL: u64 = 24;
const PV_SHIFT: u64 = 28;
const PV_FLAGS: u64 = 29;
/// `PVCLOCK_TSC_STABLE_BIT`.
const PVCLOCK_TSC_STABLE: u8 = 1;
const ENABLED: u64 = 64;
const OFFSETS: u64 = 72;

const NR_GETTIMEOFDAY: i32 = 96;
const NR_TIME: i32 = 201;
const NR_CLOCK_GETTIME: i32 = 228;

/// What the VMM writes into the time page once, before the program runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimePage {
    /// kvmclock is set up: the vDSO may read it.
    pub enabled: bool,
    /// Added to kvmclock nanoseconds for `CLOCK_REALTIME`.
    pub realtime_offset: i64,
    /// Added to kvmclock nanoseconds for `CLOCK_MONOTONIC`.
    pub monotonic_offset: i64,
}

impl TimePage {
    /// The bytes to write at offset 64 of the time page.
    pub fn bytes(&self) -> (u64, [u8; 24]) {
        let mut b = [0u8; 24];
        b[..4].copy_from_slice(&u32::from(self.enabled).to_le_bytes());
        b[8..16].copy_from_slice(&self.realtime_offset.to_le_bytes());
        b[16..].copy_from_slice(&self.monotonic_offset.to_le_bytes());
        (ENABLED, b)
    }
}

/// The guest's clocks, as the vDSO computes them from kvmclock; `None` fields when kvmclock
/// could not be set up (the vDSO then always makes the system call, and the VMM answers
/// from the host's clocks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestClock {
    page: TimePage,
}

impl GuestClock {
    /// Points `vcpu`'s kvmclock at the time page and computes the offsets: `CLOCK_REALTIME`
    /// is the host's real time, `CLOCK_MONOTONIC` reads `monotonic_now` at this moment.
    /// Any failure leaves the clock disabled, never wrong.
    pub fn setup(vm: &VmFd, vcpu: &VcpuFd, monotonic_now: Duration) -> GuestClock {
        let entry = kvm_msr_entry {
            index: MSR_KVM_SYSTEM_TIME_NEW,
            data: (VVAR_GFN * 4096) | 1,
            ..Default::default()
        };
        let set = Msrs::from_entries(&[entry])
            .ok()
            .and_then(|m| vcpu.set_msrs(&m).ok());
        if set != Some(1) {
            return GuestClock::default();
        }
        let before = SystemTime::now();
        let Ok(data) = vm.get_clock() else {
            return GuestClock::default();
        };
        let after = SystemTime::now();
        let realtime = if data.flags & KVM_CLOCK_REALTIME != 0 {
            Some(data.realtime)
        } else {
            let ns = |t: SystemTime| t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_nanos());
            match (ns(before), ns(after)) {
                (Some(b), Some(a)) => u64::try_from(b + (a.saturating_sub(b)) / 2).ok(),
                _ => None,
            }
        };
        let mono = u64::try_from(monotonic_now.as_nanos()).ok();
        let (Some(realtime), Some(mono)) = (realtime, mono) else {
            return GuestClock::default();
        };
        GuestClock {
            page: TimePage {
                enabled: true,
                realtime_offset: realtime.wrapping_sub(data.clock).cast_signed(),
                monotonic_offset: mono.wrapping_sub(data.clock).cast_signed(),
            },
        }
    }

    /// What the VMM writes into the time page.
    pub fn page(&self) -> TimePage {
        self.page
    }

    /// `kvmclock` reads the VM's kvmclock in nanoseconds (`KVM_GET_CLOCK`); it is called
    /// only if the clock is set up.
    fn read(&self, kvmclock: impl FnOnce() -> Option<u64>, offset: i64) -> Option<Duration> {
        if !self.page.enabled {
            return None;
        }
        let clock = kvmclock()?;
        Some(Duration::from_nanos(clock.wrapping_add_signed(offset)))
    }

    /// `CLOCK_REALTIME` as the vDSO reads it, if kvmclock is set up.
    pub fn realtime(&self, kvmclock: impl FnOnce() -> Option<u64>) -> Option<Duration> {
        self.read(kvmclock, self.page.realtime_offset)
    }

    /// `CLOCK_MONOTONIC` as the vDSO reads it, if kvmclock is set up.
    pub fn monotonic(&self, kvmclock: impl FnOnce() -> Option<u64>) -> Option<Duration> {
        self.read(kvmclock, self.page.monotonic_offset)
    }
}

/// The exported functions, in symbol-table order.
const SYMBOLS: [&str; 3] = ["__vdso_clock_gettime", "__vdso_gettimeofday", "__vdso_time"];
const SONAME: &str = "linux-vdso.so.1";
/// Where the code starts in the image.
const CODE_OFFSET: u64 = 0x400;

/// Emits: RAX = kvmclock nanoseconds, or a jump to `fallback`. Clobbers RAX, RCX, RDX,
/// R8–R10; leaves RDI and RSI.
fn read_kvmclock(a: &mut CodeAssembler, fallback: CodeLabel) -> Result<(), iced_x86::IcedError> {
    let mut retry = a.create_label();
    let mut negative_shift = a.create_label();
    let mut scaled = a.create_label();
    a.mov(r8, VVAR_VA)?;
    a.cmp(dword_ptr(r8 + ENABLED), 0)?;
    a.je(fallback)?;
    a.set_label(&mut retry)?;
    a.mov(r9d, dword_ptr(r8 + PV_VERSION))?;
    // An odd version is an update in progress.
    a.test(r9d, 1)?;
    a.jnz(retry)?;
    a.lfence()?;
    a.test(byte_ptr(r8 + PV_FLAGS), u32::from(PVCLOCK_TSC_STABLE))?;
    a.jz(fallback)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.sub(rax, qword_ptr(r8 + PV_TSC_TIMESTAMP))?;
    // A TSC before KVM's timestamp cannot be scaled; the kernel decides.
    a.js(fallback)?;
    a.movsx(ecx, byte_ptr(r8 + PV_SHIFT))?;
    a.test(ecx, ecx)?;
    a.js(negative_shift)?;
    a.shl(rax, iced_x86::code_asm::cl)?;
    a.jmp(scaled)?;
    a.set_label(&mut negative_shift)?;
    a.neg(ecx)?;
    a.shr(rax, iced_x86::code_asm::cl)?;
    a.set_label(&mut scaled)?;
    a.mov(r10d, dword_ptr(r8 + PV_MUL))?;
    a.mul(r10)?;
    a.shrd(rax, rdx, 32)?;
    a.add(rax, qword_ptr(r8 + PV_SYSTEM_TIME))?;
    // x86 keeps loads in order: the version check needs no fence.
    a.cmp(r9d, dword_ptr(r8 + PV_VERSION))?;
    a.jne(retry)?;
    Ok(())
}

/// `x / 1e9` as gcc computes it: `((x >> 9) * SEC_MAGIC) >> 64 >> 11`, exact for every u64.
const SEC_MAGIC: u64 = 19_342_813_113_834_067;
/// `x / 1000`: `((x >> 3) * USEC_MAGIC) >> 64 >> 4`.
const USEC_MAGIC: u64 = 2_361_183_241_434_822_607;

/// Emits: RAX = RAX / 1e9 (seconds), RCX = RAX % 1e9 (nanoseconds). Clobbers RDX.
fn split_seconds(a: &mut CodeAssembler) -> Result<(), iced_x86::IcedError> {
    a.mov(rcx, rax)?;
    a.shr(rax, 9)?;
    a.mov(rdx, SEC_MAGIC)?;
    a.mul(rdx)?;
    a.shr(rdx, 11)?;
    a.mov(rax, rdx)?;
    a.imul_3(rdx, rdx, 1_000_000_000)?;
    a.sub(rcx, rdx)?;
    Ok(())
}

/// The code, assembled at `VDSO_VA + CODE_OFFSET`, and each symbol's offset in the image.
fn code() -> Result<(Vec<u8>, [u64; 3]), iced_x86::IcedError> {
    let mut a = CodeAssembler::new(64)?;

    // int clock_gettime(clockid_t clk, struct timespec *tp): REALTIME (0), MONOTONIC (1).
    let mut clock_gettime = a.create_label();
    let mut cg_fallback = a.create_label();
    a.set_label(&mut clock_gettime)?;
    a.cmp(edi, 1)?;
    a.ja(cg_fallback)?;
    read_kvmclock(&mut a, cg_fallback)?;
    a.add(rax, qword_ptr(r8 + rdi * 8 + OFFSETS))?;
    split_seconds(&mut a)?;
    a.mov(qword_ptr(rsi), rax)?;
    a.mov(qword_ptr(rsi + 8), rcx)?;
    a.xor(eax, eax)?;
    a.ret()?;
    a.set_label(&mut cg_fallback)?;
    a.mov(eax, NR_CLOCK_GETTIME)?;
    a.syscall()?;
    a.ret()?;

    // int gettimeofday(struct timeval *tv, struct timezone *tz).
    let mut gettimeofday = a.create_label();
    let mut gt_fallback = a.create_label();
    let mut gt_done = a.create_label();
    a.set_label(&mut gettimeofday)?;
    a.test(rsi, rsi)?;
    a.jnz(gt_fallback)?;
    a.test(rdi, rdi)?;
    a.jz(gt_done)?;
    read_kvmclock(&mut a, gt_fallback)?;
    a.add(rax, qword_ptr(r8 + OFFSETS))?;
    split_seconds(&mut a)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(rax, rcx)?;
    a.shr(rax, 3)?;
    a.mov(rdx, USEC_MAGIC)?;
    a.mul(rdx)?;
    a.shr(rdx, 4)?;
    a.mov(qword_ptr(rdi + 8), rdx)?;
    a.set_label(&mut gt_done)?;
    a.xor(eax, eax)?;
    a.ret()?;
    a.set_label(&mut gt_fallback)?;
    a.mov(eax, NR_GETTIMEOFDAY)?;
    a.syscall()?;
    a.ret()?;

    // time_t time(time_t *t).
    let mut time = a.create_label();
    let mut t_fallback = a.create_label();
    let mut t_done = a.create_label();
    a.set_label(&mut time)?;
    read_kvmclock(&mut a, t_fallback)?;
    a.add(rax, qword_ptr(r8 + OFFSETS))?;
    split_seconds(&mut a)?;
    a.test(rdi, rdi)?;
    a.jz(t_done)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.set_label(&mut t_done)?;
    a.ret()?;
    a.set_label(&mut t_fallback)?;
    a.mov(eax, NR_TIME)?;
    a.syscall()?;
    a.ret()?;

    let base = VDSO_VA + CODE_OFFSET;
    let out = a.assemble_options(base, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let at = |l: &CodeLabel| out.label_ip(l).map(|ip| ip - VDSO_VA);
    let offsets = [at(&clock_gettime)?, at(&gettimeofday)?, at(&time)?];
    Ok((out.inner.code_buffer, offsets))
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// The vDSO image: one page, loaded at [`VDSO_VA`] (its `p_vaddr` is 0, as Linux's).
///
/// # Errors
/// [`Error::Assemble`] if iced-x86 refuses the code (a bug).
pub fn image() -> Result<Vec<u8>> {
    const PAGE: usize = 4096;
    const PHOFF: usize = 64;
    const DYN: usize = PHOFF + 2 * 56;
    const DYN_ENTRIES: usize = 7;
    const HASH: usize = DYN + DYN_ENTRIES * 16;
    let (code, offsets) = code().map_err(|source| Error::Assemble { source })?;
    let nsyms = SYMBOLS.len() + 1;
    // SysV hash: one bucket, every symbol on its chain.
    let hash_words = 2 + 1 + nsyms;
    let symtab = (HASH + hash_words * 4).next_multiple_of(8);
    let strtab = symtab + nsyms * 24;
    let mut strings = vec![0u8];
    let soname_at = strings.len();
    strings.extend_from_slice(SONAME.as_bytes());
    strings.push(0);
    let mut name_at = Vec::new();
    for s in SYMBOLS {
        name_at.push(strings.len());
        strings.extend_from_slice(s.as_bytes());
        strings.push(0);
    }
    let code_at = usize::try_from(CODE_OFFSET).expect("a small constant");
    assert!(
        strtab + strings.len() <= code_at && code_at + code.len() <= PAGE,
        "the vDSO fits its page"
    );

    let mut b = vec![0u8; PAGE];
    // ELF header: ELFCLASS64, little endian, ET_DYN, x86-64.
    b[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1]);
    put16(&mut b, 16, 3);
    put16(&mut b, 18, 62);
    put32(&mut b, 20, 1);
    put64(&mut b, 32, PHOFF as u64);
    put16(&mut b, 52, 64);
    put16(&mut b, 54, 56);
    put16(&mut b, 56, 2);
    // PT_LOAD of the page, R+X.
    let ph = PHOFF;
    put32(&mut b, ph, 1);
    put32(&mut b, ph + 4, 5);
    put64(&mut b, ph + 32, PAGE as u64);
    put64(&mut b, ph + 40, PAGE as u64);
    put64(&mut b, ph + 48, PAGE as u64);
    // PT_DYNAMIC.
    let ph = PHOFF + 56;
    put32(&mut b, ph, 2);
    put32(&mut b, ph + 4, 4);
    for field in [8, 16] {
        put64(&mut b, ph + field, DYN as u64);
    }
    for field in [32, 40] {
        put64(&mut b, ph + field, (DYN_ENTRIES * 16) as u64);
    }
    put64(&mut b, ph + 48, 8);
    // DT_HASH, DT_STRTAB, DT_SYMTAB, DT_STRSZ, DT_SYMENT, DT_SONAME, DT_NULL.
    let dynamic = [
        (4, HASH as u64),
        (5, strtab as u64),
        (6, symtab as u64),
        (10, strings.len() as u64),
        (11, 24),
        (14, soname_at as u64),
        (0, 0),
    ];
    for (i, (tag, val)) in dynamic.into_iter().enumerate() {
        put64(&mut b, DYN + i * 16, tag);
        put64(&mut b, DYN + i * 16 + 8, val);
    }
    // nbucket 1, nchain; bucket[0] = the last symbol; chain[i] = i - 1.
    let n = u32::try_from(nsyms).expect("three symbols");
    put32(&mut b, HASH, 1);
    put32(&mut b, HASH + 4, n);
    put32(&mut b, HASH + 8, n - 1);
    for i in 0..n {
        put32(&mut b, HASH + 12 + 4 * i as usize, i.saturating_sub(1));
    }
    // Symbols: STB_GLOBAL | STT_FUNC, in a (nominal) section 1 so lookups do not skip them.
    for (i, (&name, &value)) in name_at.iter().zip(&offsets).enumerate() {
        let s = symtab + (i + 1) * 24;
        put32(&mut b, s, u32::try_from(name).expect("short strings"));
        b[s + 4] = 0x12;
        put16(&mut b, s + 6, 1);
        put64(&mut b, s + 8, value);
    }
    b[strtab..strtab + strings.len()].copy_from_slice(&strings);
    b[code_at..code_at + code.len()].copy_from_slice(&code);
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// Looks `name` up the way musl's `__vdsosym` does: PT_DYNAMIC, then DT_STRTAB,
    /// DT_SYMTAB and DT_HASH's chain count.
    fn lookup(b: &[u8], name: &str) -> Option<u64> {
        let phoff = usize::try_from(u64_at(b, 32)).unwrap();
        let phnum = usize::from(u16_at(b, 56));
        let mut dynamic = None;
        for i in 0..phnum {
            let ph = phoff + i * usize::from(u16_at(b, 54));
            if u32::from_le_bytes(b[ph..ph + 4].try_into().unwrap()) == 2 {
                dynamic = Some(usize::try_from(u64_at(b, ph + 8)).unwrap());
            }
        }
        let mut at = dynamic?;
        let (mut strtab, mut symtab, mut hash) = (0, 0, 0);
        loop {
            let (tag, val) = (u64_at(b, at), usize::try_from(u64_at(b, at + 8)).unwrap());
            match tag {
                0 => break,
                4 => hash = val,
                5 => strtab = val,
                6 => symtab = val,
                _ => {}
            }
            at += 16;
        }
        let nchain = u32::from_le_bytes(b[hash + 4..hash + 8].try_into().unwrap());
        (0..usize::try_from(nchain).unwrap()).find_map(|i| {
            let s = symtab + i * 24;
            let n = usize::try_from(u32::from_le_bytes(b[s..s + 4].try_into().unwrap())).unwrap();
            let end = b[strtab + n..].iter().position(|&c| c == 0).unwrap();
            (b[s + 4] == 0x12 && &b[strtab + n..strtab + n + end] == name.as_bytes())
                .then(|| u64_at(b, s + 8))
        })
    }

    #[test]
    fn image_exports_the_time_functions_inside_its_page() {
        let b = image().unwrap();
        assert_eq!(b.len(), 4096);
        assert_eq!(&b[..4], b"\x7fELF");
        let mut seen = Vec::new();
        for name in SYMBOLS {
            let v = lookup(&b, name).unwrap_or_else(|| panic!("{name} missing"));
            assert!((CODE_OFFSET..4096).contains(&v), "{name} at {v:#x}");
            seen.push(v);
        }
        seen.dedup();
        assert_eq!(seen.len(), 3);
        assert_eq!(lookup(&b, "__vdso_getcpu"), None);
    }

    /// The vDSO's divisions, done as its code does them, against `/` and `%`.
    #[test]
    fn reciprocal_divisions_are_exact() {
        let sec = |x: u64| ((u128::from(x >> 9) * u128::from(SEC_MAGIC)) >> 64 >> 11) as u64;
        let usec = |x: u64| ((u128::from(x >> 3) * u128::from(USEC_MAGIC)) >> 64 >> 4) as u64;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let edges = [
            0,
            1,
            999,
            1000,
            999_999_999,
            1_000_000_000,
            u64::MAX,
            u64::MAX - 1,
        ];
        for i in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = edges
                .get(usize::try_from(i).unwrap())
                .copied()
                .unwrap_or(x >> (i % 64));
            assert_eq!(sec(v), v / 1_000_000_000, "{v}");
            assert_eq!(usec(v), v / 1000, "{v}");
            let k = (v / 1_000_000_000) * 1_000_000_000;
            for w in [Some(k), k.checked_add(999_999_999)].into_iter().flatten() {
                assert_eq!(sec(w), w / 1_000_000_000, "{w}");
            }
        }
    }

    #[test]
    fn time_page_offsets_are_where_the_code_reads_them() {
        let t = TimePage {
            enabled: true,
            realtime_offset: -2,
            monotonic_offset: 3,
        };
        let (at, b) = t.bytes();
        assert_eq!(at, ENABLED);
        assert_eq!(OFFSETS, ENABLED + 8);
        assert_eq!(u32::from_le_bytes(b[..4].try_into().unwrap()), 1);
        assert_eq!(i64::from_le_bytes(b[8..16].try_into().unwrap()), -2);
        assert_eq!(i64::from_le_bytes(b[16..].try_into().unwrap()), 3);
    }
}
