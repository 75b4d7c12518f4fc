//! x86 vCPU set-up for flat guest images: 64-bit long mode at CPL3 and 16-bit real mode.
//!
//! This module only prepares a vCPU and the guest memory it needs (page tables, GDT, TSS, IDT,
//! exception stubs); it knows nothing of how guest memory is tracked, so it works on any
//! [`vm_memory::Bytes`] accessor (a plain [`vm_memory::GuestMemoryMmap`] or a tracking one).
//!
//! # Long mode
//!
//! The guest program runs at **CPL3** in 64-bit mode over an identity map of guest-physical
//! memory. CPL3 is the representative place for guest work: on hosts whose KVM is software
//! based (PVM) CPL3 code runs natively while CPL0 code is emulated instruction by instruction;
//! on VT-x/SVM hosts both run natively. The CPL0 part is reduced to exception-report stubs.
//!
//! All system structures live in a reserved region at the top of RAM (see
//! [`LongModeLayout`]); low memory belongs to the guest image. Offsets from the region's start
//! `R = min(ram_size, 4 GiB) - 0x2_0000`:
//!
//! | offset from `R` | size | content |
//! | --- | --- | --- |
//! | `0x0_0000` | 4 KiB | PML4 (entry 0 only) |
//! | `0x0_1000` | 4 KiB | PDPT (one entry per mapped GiB) |
//! | `0x0_2000` | 16 KiB | 4 page directories of 2 MiB pages |
//! | `0x0_6000` | `0x428` | GDT: null, `0x08` CPL0 code64, `0x10` CPL0 data, `0x18` CPL3 data, `0x20` CPL3 code64, then 64 TSS descriptors from `0x28` (vCPU `n`: `0x28 + 16n`) |
//! | `0x0_7000` | `0x200` | IDT: 32 interrupt gates, vectors 0–31 (DPL0; DPL3 for #BP and #OF so `int3`/`into` work) |
//! | `0x0_7800` | `0x200` | exception stubs, 16 bytes per vector |
//! | `0x0_8000` | `0x2000` | 64 TSSs of `0x80` bytes (vCPU `n` at `0x8000 + 0x80n`) |
//! | `0x0_a000` | `0x2001` | the shared I/O permission bitmap: 8 KiB of zero bits (all ports allowed) and the `0xff` terminator |
//! | `0x1_0000` | 64 KiB | 64 CPL0 exception stacks of 1 KiB (vCPU `n`'s `RSP0` = `R + 0x1_0000 + 0x400(n+1)`) |
//!
//! Below `R` are the CPL3 user stacks, [`USER_STACK_SIZE`] each: vCPU `n`'s stack top is
//! `R - n * USER_STACK_SIZE` (16-byte aligned). They are guest memory the program may use as it
//! likes, not part of [`LongModeLayout::reserved_range`].
//!
//! Segment selectors follow the `SYSCALL`/`SYSRET` convention: [`setup_long_mode`] sets
//! `MSR_STAR` = [`STAR`] (`SYSCALL` loads `0x08`/`0x10`, 64-bit `SYSRET` loads `0x23`/`0x1b`)
//! and `MSR_LSTAR` = [`SYSCALL_TRAP_RIP`], an unmapped address, so a stray `syscall` reports a
//! #PF instead of running the program from address 0. A VMM serving system calls sets
//! `MSR_LSTAR` itself.
//!
//! Every page is mapped present, writable and user-accessible with the accessed and dirty bits
//! preset, including the reserved region: this is a test environment, not an isolation
//! boundary, and the guest can overwrite its own IDT. Because the CPL0 stubs and stacks sit on
//! user pages, SMEP and SMAP stay off.
//!
//! # Exceptions
//!
//! Exception vector `V` (0–31) enters stub `V` at CPL0 on the vCPU's own CPL0 stack (`RSP0` of
//! its TSS). The stub executes `out 0xf5, al` ([`EXCEPTION_PORT`]), which exits to the VMM with
//! no register changed: the vector is told by the stub's address (RIP), not by the port data.
//! [`decode_exception`] reads the frame. If the VMM runs the vCPU again, the stub drops the
//! error code (for vectors that push one) and returns with `iretq` to the frame's RIP, so the
//! VMM may fix the cause (map a page, patch the frame's RIP) and resume; resuming unchanged
//! re-executes the faulting instruction.
//!
//! # Port I/O from CPL3
//!
//! The guest's RFLAGS.IOPL is 3, but PVM ignores IOPL at CPL3, so port I/O is allowed by the
//! TSS I/O permission bitmap, which allows every port. [`GUEST_EXIT_PORT`] is this crate's
//! convention for "the guest program is done": `out 0xf4, al` with the exit code in `al`, as
//! QEMU's isa-debug-exit.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_xcrs};
use kvm_ioctls::{Kvm, VcpuFd};
use pagetrack_x86::boot::{
    CpuFeatures, load_real_mode_sregs, long_mode_fpu, long_mode_msrs, real_mode_regs, set_apic_ids,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::error::{Error, Result};

pub use pagetrack_x86::boot::{
    EXCEPTION_PORT, EXCEPTION_VECTORS, GUEST_EXIT_PORT, GuestException, KERNEL_CS, KERNEL_DS,
    LONG_MODE_RFLAGS, LongModeLayout, MAX_IDENTITY_MAP, MAX_VCPUS, MIN_RAM_SIZE, RESERVED_SIZE,
    STAR, SYSCALL_TRAP_RIP, TSS_SELECTOR_BASE, USER_CS, USER_DS, USER_STACK_SIZE, XCR0_WANTED,
};

/// Sets `vcpu` up to run a flat 64-bit program at CPL3 from `entry`, and writes the layout's
/// tables into `mem`.
///
/// - CPUID: KVM's supported CPUID, with the initial APIC id (leaf 1) and x2APIC id
///   (leaves 0xB, 0x1F) set to `vcpu_index`. The features below are then read from the
///   vCPU's effective CPUID (`KVM_GET_CPUID2`): on PVM it reports more than the supported
///   CPUID (XSAVE, AVX, AVX-512, FSGSBASE).
/// - Special registers: CR0 = PE|MP|ET|NE|WP|PG, CR4 = PAE|OSFXSR|OSXMMEXCPT, plus OSXSAVE
///   and FSGSBASE where CPUID has them, EFER = SCE|LME|LMA (|NXE where supported),
///   CR3 = [`LongModeLayout::pml4`], CS = [`USER_CS`], SS/DS/ES/FS/GS = [`USER_DS`] (bases 0),
///   TR = this vCPU's TSS, GDTR/IDTR from the layout.
/// - XCR0: x87|SSE|AVX|opmask|ZMM_Hi256|Hi16_ZMM as far as the host supports them
///   ([`XCR0_WANTED`] masked by CPUID leaf 0xD; AVX-512 only if all three parts are there).
/// - Registers: RIP = `entry`, RSP = [`LongModeLayout::user_stack_top`]`(vcpu_index)`,
///   RFLAGS = [`LONG_MODE_RFLAGS`], everything else 0; FPU: FCW 0x37f, MXCSR 0x1f80.
/// - MSRs: `STAR` = [`STAR`], `LSTAR` = [`SYSCALL_TRAP_RIP`].
///
/// Writing the tables is idempotent (same bytes every time, CPL0 stacks untouched), so every
/// vCPU of a VM may call this, also while others run. Each vCPU gets its own TSS, CPL0 stack
/// and user stack, so several may take exceptions at once.
///
/// # Errors
///
/// [`Error::VcpuIndexOutOfRange`], [`Error::GuestMemory`] if the tables cannot be written,
/// [`Error::Kvm`] naming the ioctl that failed, [`Error::MsrRefused`].
pub fn setup_long_mode<M>(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    mem: &M,
    layout: &LongModeLayout,
    entry: u64,
    vcpu_index: u32,
) -> Result<()>
where
    M: Bytes<GuestAddress, E = GuestMemoryError> + ?Sized,
{
    // Every vCPU-index check before anything is written.
    let regs = layout.regs(entry, vcpu_index)?;
    layout.tss(vcpu_index)?;

    let reserved_start = layout.reserved_range().0;
    mem.write_slice(layout.tables(), GuestAddress(reserved_start))
        .map_err(|source| Error::GuestMemory {
            what: "long-mode tables",
            addr: reserved_start,
            source,
        })?;

    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    set_apic_ids(cpuid.as_mut_slice(), vcpu_index);
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    // Decide from the CPUID the vCPU ended up with, which is what KVM checks CR4 and XCR0
    // against and what the guest sees: PVM's KVM_GET_SUPPORTED_CPUID hides XSAVE, AVX,
    // FSGSBASE... that its vCPUs then report (they run CPL3 code on the host's features).
    let effective: CpuId = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_CPUID2"))?;
    let features = CpuFeatures::from_cpuid(effective.as_slice());

    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    layout.load_sregs(&mut sregs, &features, vcpu_index)?;
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;

    if features.xsave {
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = features.xcr0();
        vcpu.set_xcrs(&xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
    }

    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    let msrs =
        Msrs::from_entries(&long_mode_msrs()).expect("2 entries are within KVM_MAX_MSR_ENTRIES");
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if let Some(refused) = msrs.as_slice().get(set) {
        return Err(Error::MsrRefused {
            index: refused.index,
        });
    }
    vcpu.set_fpu(&long_mode_fpu())
        .map_err(kvm_err("KVM_SET_FPU"))?;
    Ok(())
}

/// Sets `vcpu` up for 16-bit real mode at CPL0: CS = DS = ES = SS = FS = GS = selector 0 with
/// base 0 and limit 0xffff, CR0.PE/PG, CR4 and EFER clear, IP = `entry_ip`, SP = 0 (the first
/// push writes 0xfffe), RFLAGS = 2.
///
/// Real-mode code is emulated by KVM on PVM hosts (about 2 µs an instruction).
///
/// # Errors
///
/// [`Error::Kvm`] naming the ioctl that failed.
pub fn setup_real_mode(vcpu: &VcpuFd, entry_ip: u16) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    load_real_mode_sregs(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&real_mode_regs(entry_ip))
        .map_err(kvm_err("KVM_SET_REGS"))
}

fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

/// Decodes the exception a vCPU reported, after its run ended with an `out` to
/// [`EXCEPTION_PORT`].
///
/// The vector comes from RIP (which exception stub the vCPU is in), the frame
/// (`[error code,] rip, cs, rflags, rsp, ss`) from the vCPU's CPL0 stack at RSP, read through
/// `mem` (the stack is identity-mapped), and CR2 from the special registers for #PF.
/// All registers are as the program left them (the stubs change none), so the VMM may read
/// them too.
///
/// # Errors
///
/// [`Error::NotAnExceptionReport`] if RIP is not inside an exception stub (e.g. the CPL3
/// program itself wrote to the port), [`Error::GuestMemory`] if the frame cannot be read,
/// [`Error::Kvm`] naming the ioctl that failed.
pub fn decode_exception<M>(
    vcpu: &VcpuFd,
    mem: &M,
    layout: &LongModeLayout,
) -> Result<GuestException>
where
    M: Bytes<GuestAddress, E = GuestMemoryError> + ?Sized,
{
    let regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let vector = layout
        .exception_vector(regs.rip)
        .ok_or(Error::NotAnExceptionReport { rip: regs.rip })?;
    let cr2 = if vector == 14 {
        vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?.cr2
    } else {
        0
    };
    Ok(GuestException::from_frame(mem, vector, regs.rsp, cr2)?)
}
