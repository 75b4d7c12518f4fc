//! The long-mode (and real-mode) boot structures of a flat guest, as pure data: the page
//! tables, GDT, TSSs, IDT and exception stubs ([`LongModeLayout`]), the special and general
//! registers, MSRs and FPU state a vCPU starts with, and the exception frames the stubs
//! report ([`GuestException`]). No ioctl is made here: `pagetrack_vmm::x86` loads these into
//! KVM (`setup_long_mode`, `setup_real_mode`, `decode_exception`).
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
//! Segment selectors follow the `SYSCALL`/`SYSRET` convention: `setup_long_mode` sets
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
//! `decode_exception` reads the frame. If the VMM runs the vCPU again, the stub drops the
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

use std::fmt;

use iced_x86::code_asm::{CodeAssembler, al, rsp};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_dtable, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::error::{Error, Result};

/// The port the exception stubs write to (`out 0xf5, al` at CPL0).
pub const EXCEPTION_PORT: u16 = 0xf5;

/// The port a guest program writes its exit code to (`out 0xf4, al`), like QEMU's
/// isa-debug-exit. A convention of this crate; nothing in the set-up depends on it.
pub const GUEST_EXIT_PORT: u16 = 0xf4;

/// The most vCPUs a [`LongModeLayout`] has TSS, CPL0-stack and user-stack slots for.
pub const MAX_VCPUS: u32 = 64;

/// Size of the reserved region at the top of RAM.
pub const RESERVED_SIZE: u64 = 0x2_0000;

/// Size of each vCPU's CPL3 stack below the reserved region.
pub const USER_STACK_SIZE: u64 = 0x1_0000;

/// The smallest RAM a [`LongModeLayout`] accepts (the reserved region plus one user stack,
/// rounded up to 1 MiB).
pub const MIN_RAM_SIZE: u64 = 0x10_0000;

/// The part of guest-physical space the page tables identity-map at most.
pub const MAX_IDENTITY_MAP: u64 = 4 << 30;

/// Number of IDT gates and exception stubs (the architectural exception vectors).
pub const EXCEPTION_VECTORS: u8 = 32;

/// GDT selector of the CPL0 64-bit code segment.
pub const KERNEL_CS: u16 = 0x08;
/// GDT selector of the CPL0 data segment.
pub const KERNEL_DS: u16 = 0x10;
/// Selector (RPL 3) of the CPL3 data segment.
pub const USER_DS: u16 = 0x18 | 3;
/// Selector (RPL 3) of the CPL3 64-bit code segment.
pub const USER_CS: u16 = 0x20 | 3;
/// GDT selector of vCPU 0's TSS; vCPU `n` uses `TSS_SELECTOR_BASE + 16 * n`.
pub const TSS_SELECTOR_BASE: u16 = 0x28;

/// `MSR_LSTAR`: where `syscall` jumps. It is an unmapped canonical address, so a `syscall`
/// the VMM has not prepared for reports a #PF (fetch) at this RIP instead of running off into
/// memory. On PVM `syscall` stays at CPL3 (frame CS = [`USER_CS`], error code 0x14); on
/// VT-x/SVM it enters CPL0 (CS = [`KERNEL_CS`], frame on the user stack).
pub const SYSCALL_TRAP_RIP: u64 = 0x7fff_ffff_f000;

/// `MSR_STAR` as set: `SYSCALL` loads CS/SS [`KERNEL_CS`]/[`KERNEL_DS`]; 64-bit `SYSRET`
/// loads [`USER_CS`]/[`USER_DS`].
pub const STAR: u64 = (0x10 << 48) | (0x08 << 32);
/// The `STAR` MSR (segment selectors of `syscall`/`sysret`).
pub const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;

/// RFLAGS at entry: IOPL 3 and the reserved bit 1 (IF clear; no interrupts are delivered).
pub const LONG_MODE_RFLAGS: u64 = 0x3002;

// Offsets inside the reserved region.
const PML4_OFFSET: u64 = 0x0;
const PDPT_OFFSET: u64 = 0x1000;
const PD_OFFSET: u64 = 0x2000;
const PD_COUNT: u64 = 4;
const GDT_OFFSET: u64 = 0x6000;
const IDT_OFFSET: u64 = 0x7000;
const STUBS_OFFSET: u64 = 0x7800;
const STUB_SIZE: u64 = 16;
const TSS_OFFSET: u64 = 0x8000;
const TSS_STRIDE: u64 = 0x80;
const IOMAP_OFFSET: u64 = 0xa000;
const IOMAP_BYTES: u64 = 0x2000;
/// The tables image (everything below the CPL0 stacks) ends here, terminator included.
const TABLES_END: u64 = IOMAP_OFFSET + IOMAP_BYTES + 1;
const KSTACKS_OFFSET: u64 = 0x1_0000;
const KSTACK_SIZE: u64 = 0x400;

const GDT_LIMIT: u16 = 0x28 + 16 * 64 - 1;
const IDT_LIMIT: u16 = 16 * 32 - 1;
/// The architectural 64-bit TSS is 104 bytes; bytes 102–103 hold the I/O map base.
const TSS_IOMAP_BASE_FIELD: u64 = 102;
const TSS_RSP0_FIELD: u64 = 4;

// Page-table entry bits.
use crate::walk::pte::{
    ACCESSED as PTE_ACCESSED, DIRTY as PTE_DIRTY, HUGE as PTE_HUGE, PRESENT as PTE_PRESENT,
    USER as PTE_USER, WRITABLE as PTE_WRITABLE,
};
const TABLE_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_ACCESSED;
const LEAF_2M_FLAGS: u64 = TABLE_FLAGS | PTE_DIRTY | PTE_HUGE;
const PAGE_2M: u64 = 2 << 20;
const PAGE_1G: u64 = 1 << 30;

// Control registers.
const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_FSGSBASE: u64 = 1 << 16;
const CR4_OSXSAVE: u64 = 1 << 18;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

// CPUID bits.
const CPUID1_ECX_XSAVE: u32 = 1 << 26;
const CPUID7_EBX_FSGSBASE: u32 = 1 << 0;
const CPUID80000001_EDX_NX: u32 = 1 << 20;

/// XCR0 components this module enables when the host supports them: x87, SSE, AVX, opmask,
/// ZMM_Hi256, Hi16_ZMM.
pub const XCR0_WANTED: u64 = 0xe7;
const XCR0_X87_SSE: u64 = 0x3;
const XCR0_AVX: u64 = 0x4;
const XCR0_AVX512: u64 = 0xe0;

/// Vectors whose exception frame carries an error code.
pub const fn pushes_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// Where the long-mode system structures live in guest-physical memory, computed from the RAM
/// size (see the [module docs](self) for the table of offsets).
///
/// The layout assumes RAM starts at guest-physical 0 and is identity-mapped: the page tables
/// map `[0, identity_map_size())` with 2 MiB pages, and the reserved region is the last
/// [`RESERVED_SIZE`] bytes of `min(ram_size, 4 GiB)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LongModeLayout {
    ram_size: u64,
    reserved_start: u64,
    identity_map_size: u64,
    /// Pre-built bytes of `[reserved_start, reserved_start + TABLES_END)`.
    tables: Vec<u8>,
}

impl LongModeLayout {
    /// Computes the layout for `ram_size` bytes of RAM at guest-physical 0 and builds its
    /// tables (page tables, GDT, TSSs, I/O bitmap, IDT, exception stubs) in memory.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRamSize`] if `ram_size` is below [`MIN_RAM_SIZE`] or not a multiple of
    /// 4 KiB; [`Error::Assemble`] if the stubs cannot be assembled (an internal bug).
    pub fn new(ram_size: u64) -> Result<Self> {
        if ram_size < MIN_RAM_SIZE {
            return Err(Error::InvalidRamSize {
                size: ram_size,
                reason: "smaller than 1 MiB",
            });
        }
        if !ram_size.is_multiple_of(0x1000) {
            return Err(Error::InvalidRamSize {
                size: ram_size,
                reason: "not a multiple of 4 KiB",
            });
        }
        let top = ram_size.min(MAX_IDENTITY_MAP);
        let identity_map_size = top.next_multiple_of(PAGE_2M);
        let mut layout = Self {
            ram_size,
            reserved_start: top - RESERVED_SIZE,
            identity_map_size,
            tables: Vec::new(),
        };
        layout.tables = layout.build_tables()?;
        Ok(layout)
    }

    /// The RAM size this layout was computed for.
    #[must_use]
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// The reserved region `[start, end)` holding page tables, GDT, IDT, TSSs, exception stubs
    /// and CPL0 stacks. A guest image must not overlap it.
    #[must_use]
    pub fn reserved_range(&self) -> (u64, u64) {
        (self.reserved_start, self.reserved_start + RESERVED_SIZE)
    }

    /// The I/O permission bitmap every vCPU's TSS points at: `[start, end)`, one bit per
    /// port (0 = allowed), followed by the `0xff` terminator byte at `end`. The tables allow
    /// every port; a VMM may write other bits before the guest runs.
    #[must_use]
    pub fn io_bitmap(&self) -> (u64, u64) {
        let start = self.reserved_start + IOMAP_OFFSET;
        (start, start + IOMAP_BYTES)
    }

    /// How much of guest-physical space, from 0, the page tables identity-map:
    /// `min(ram_size, 4 GiB)` rounded up to 2 MiB. Accesses above it fault with #PF.
    #[must_use]
    pub fn identity_map_size(&self) -> u64 {
        self.identity_map_size
    }

    /// Guest-physical address of the PML4 (the value of CR3).
    #[must_use]
    pub fn pml4(&self) -> u64 {
        self.reserved_start + PML4_OFFSET
    }

    /// Guest-physical (and linear) address of the GDT.
    #[must_use]
    pub fn gdt(&self) -> u64 {
        self.reserved_start + GDT_OFFSET
    }

    /// Guest-physical (and linear) address of the IDT.
    #[must_use]
    pub fn idt(&self) -> u64 {
        self.reserved_start + IDT_OFFSET
    }

    /// Address of the exception stub for `vector`, or `None` if `vector` is 32 or more.
    #[must_use]
    pub fn exception_stub(&self, vector: u8) -> Option<u64> {
        (vector < EXCEPTION_VECTORS)
            .then(|| self.reserved_start + STUBS_OFFSET + u64::from(vector) * STUB_SIZE)
    }

    /// Address of vCPU `vcpu_index`'s TSS.
    ///
    /// # Errors
    ///
    /// [`Error::VcpuIndexOutOfRange`] if `vcpu_index >= MAX_VCPUS`.
    pub fn tss(&self, vcpu_index: u32) -> Result<u64> {
        check_vcpu_index(vcpu_index)?;
        Ok(self.reserved_start + TSS_OFFSET + u64::from(vcpu_index) * TSS_STRIDE)
    }

    /// vCPU `vcpu_index`'s CPL0 exception stack top (its TSS's `RSP0`).
    ///
    /// # Errors
    ///
    /// [`Error::VcpuIndexOutOfRange`] if `vcpu_index >= MAX_VCPUS`.
    pub fn kernel_stack_top(&self, vcpu_index: u32) -> Result<u64> {
        check_vcpu_index(vcpu_index)?;
        Ok(self.reserved_start + KSTACKS_OFFSET + (u64::from(vcpu_index) + 1) * KSTACK_SIZE)
    }

    /// vCPU `vcpu_index`'s CPL3 stack top: `reserved_range().0 - vcpu_index * USER_STACK_SIZE`.
    /// The stack occupies the [`USER_STACK_SIZE`] bytes below it.
    ///
    /// # Errors
    ///
    /// [`Error::VcpuIndexOutOfRange`] if `vcpu_index >= MAX_VCPUS` or if RAM is too small to
    /// hold that many stacks.
    pub fn user_stack_top(&self, vcpu_index: u32) -> Result<u64> {
        check_vcpu_index(vcpu_index)?;
        let below = (u64::from(vcpu_index) + 1) * USER_STACK_SIZE;
        if below > self.reserved_start {
            let max = u32::try_from(self.reserved_start / USER_STACK_SIZE).unwrap_or(MAX_VCPUS);
            return Err(Error::VcpuIndexOutOfRange {
                index: vcpu_index,
                max,
            });
        }
        Ok(self.reserved_start - u64::from(vcpu_index) * USER_STACK_SIZE)
    }

    /// The GDT selector of vCPU `vcpu_index`'s TSS.
    ///
    /// # Errors
    ///
    /// [`Error::VcpuIndexOutOfRange`] if `vcpu_index >= MAX_VCPUS`.
    pub fn tss_selector(vcpu_index: u32) -> Result<u16> {
        check_vcpu_index(vcpu_index)?;
        let index = u16::try_from(vcpu_index).map_err(|_| Error::VcpuIndexOutOfRange {
            index: vcpu_index,
            max: MAX_VCPUS,
        })?;
        Ok(TSS_SELECTOR_BASE + 16 * index)
    }

    /// The bytes of the reserved region up to the CPL0 stacks (page tables, GDT, TSSs, I/O
    /// bitmap, IDT, exception stubs), to be written at [`reserved_range`](Self::reserved_range)`.0`.
    #[must_use]
    pub fn tables(&self) -> &[u8] {
        &self.tables
    }

    /// The exception vector whose stub contains `rip`, or None if `rip` is in no stub.
    #[must_use]
    pub fn exception_vector(&self, rip: u64) -> Option<u8> {
        let stubs = self.reserved_start + STUBS_OFFSET;
        rip.checked_sub(stubs)
            .map(|offset| offset / STUB_SIZE)
            .and_then(|v| u8::try_from(v).ok())
            .filter(|&v| v < EXCEPTION_VECTORS)
    }

    /// Loads the long-mode system state of vCPU `vcpu_index` into `sregs` (the vCPU's
    /// current special registers; fields not listed are kept): CR0 = PE|MP|ET|NE|WP|PG,
    /// CR4 = PAE|OSFXSR|OSXMMEXCPT plus OSXSAVE and FSGSBASE where `features` has them,
    /// EFER = SCE|LME|LMA (|NXE where supported), CR3 = [`pml4`](Self::pml4),
    /// CS = [`USER_CS`], SS/DS/ES/FS/GS = [`USER_DS`] (bases 0), TR = this vCPU's TSS,
    /// GDTR/IDTR from the layout.
    ///
    /// # Errors
    ///
    /// [`Error::VcpuIndexOutOfRange`] if `vcpu_index >= MAX_VCPUS`; `sregs` is then unchanged.
    pub fn load_sregs(
        &self,
        sregs: &mut kvm_sregs,
        features: &CpuFeatures,
        vcpu_index: u32,
    ) -> Result<()> {
        let tss = self.tss(vcpu_index)?;
        let tss_limit = self.tss_limit(vcpu_index)?;
        let tss_selector = Self::tss_selector(vcpu_index)?;
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
        sregs.cr3 = self.pml4();
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
        if features.xsave {
            sregs.cr4 |= CR4_OSXSAVE;
        }
        if features.fsgsbase {
            sregs.cr4 |= CR4_FSGSBASE;
        }
        sregs.efer = EFER_SCE | EFER_LME | EFER_LMA;
        if features.nx {
            sregs.efer |= EFER_NXE;
        }
        sregs.cs = flat_segment(USER_CS, 0xb, true);
        let data = flat_segment(USER_DS, 0x3, false);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment {
            base: tss,
            limit: tss_limit,
            selector: tss_selector,
            type_: 0xb,
            present: 1,
            ..Default::default()
        };
        sregs.gdt = kvm_dtable {
            base: self.gdt(),
            limit: GDT_LIMIT,
            ..Default::default()
        };
        sregs.idt = kvm_dtable {
            base: self.idt(),
            limit: IDT_LIMIT,
            ..Default::default()
        };
        Ok(())
    }

    /// The general registers vCPU `vcpu_index` starts a program at `entry` with: RIP =
    /// `entry`, RSP = [`user_stack_top`](Self::user_stack_top), RFLAGS = [`LONG_MODE_RFLAGS`],
    /// everything else 0.
    ///
    /// # Errors
    ///
    /// As [`user_stack_top`](Self::user_stack_top).
    pub fn regs(&self, entry: u64, vcpu_index: u32) -> Result<kvm_regs> {
        Ok(kvm_regs {
            rip: entry,
            rsp: self.user_stack_top(vcpu_index)?,
            rflags: LONG_MODE_RFLAGS,
            ..Default::default()
        })
    }

    /// Builds the bytes of the reserved region up to the CPL0 stacks.
    fn build_tables(&self) -> Result<Vec<u8>> {
        let r = self.reserved_start;
        let mut t = vec![0u8; usize_of(TABLES_END)];
        let mut put = |offset: u64, bytes: &[u8]| {
            let start = usize_of(offset);
            t[start..start + bytes.len()].copy_from_slice(bytes);
        };

        // Page tables: PML4[0] -> PDPT, PDPT[i] -> PD i, PD entries are 2 MiB identity pages.
        put(
            PML4_OFFSET,
            &((r + PDPT_OFFSET) | TABLE_FLAGS).to_le_bytes(),
        );
        let gibs = self.identity_map_size.div_ceil(PAGE_1G);
        debug_assert!(gibs <= PD_COUNT, "the identity map is capped at 4 GiB");
        for gib in 0..gibs {
            let pd = r + PD_OFFSET + gib * 0x1000;
            put(PDPT_OFFSET + gib * 8, &(pd | TABLE_FLAGS).to_le_bytes());
        }
        for page in 0..self.identity_map_size / PAGE_2M {
            let entry = (page * PAGE_2M) | LEAF_2M_FLAGS;
            put(PD_OFFSET + page * 8, &entry.to_le_bytes());
        }

        // GDT.
        let gdt = GDT_OFFSET;
        put(
            gdt + u64::from(KERNEL_CS),
            &0x00af_9b00_0000_ffff_u64.to_le_bytes(),
        );
        put(
            gdt + u64::from(KERNEL_DS),
            &0x00cf_9300_0000_ffff_u64.to_le_bytes(),
        );
        put(
            gdt + u64::from(USER_DS & !3),
            &0x00cf_f300_0000_ffff_u64.to_le_bytes(),
        );
        put(
            gdt + u64::from(USER_CS & !3),
            &0x00af_fb00_0000_ffff_u64.to_le_bytes(),
        );
        for n in 0..MAX_VCPUS {
            let tss = self.tss(n)?;
            let selector = Self::tss_selector(n)?;
            put(
                gdt + u64::from(selector),
                &tss_descriptor(tss, self.tss_limit(n)?),
            );
            // TSS: RSP0 and the I/O map base pointing at the shared bitmap.
            let offset = tss - r;
            put(
                offset + TSS_RSP0_FIELD,
                &self.kernel_stack_top(n)?.to_le_bytes(),
            );
            put(
                offset + TSS_IOMAP_BASE_FIELD,
                &self.iomap_base(n)?.to_le_bytes(),
            );
        }

        // The I/O bitmap is all zero (every port allowed); the byte after it must be 0xff.
        put(IOMAP_OFFSET + IOMAP_BYTES, &[0xff]);

        // IDT and stubs.
        for vector in 0..EXCEPTION_VECTORS {
            let stub = self
                .exception_stub(vector)
                .expect("vector < EXCEPTION_VECTORS");
            // #BP and #OF get DPL3 gates so `int3`/`into` at CPL3 report them (a DPL0 gate
            // makes them #GP on VT-x/SVM; PVM delivers #BP either way).
            let dpl = if matches!(vector, 3 | 4) { 3 } else { 0 };
            put(
                IDT_OFFSET + u64::from(vector) * 16,
                &interrupt_gate(stub, dpl),
            );
            let code = assemble_stub(vector, stub)?;
            debug_assert!(code.len() <= usize_of(STUB_SIZE), "a stub fits its slot");
            put(stub - r, &code);
        }
        Ok(t)
    }

    /// Offset from vCPU `n`'s TSS to the shared I/O bitmap.
    fn iomap_base(&self, vcpu_index: u32) -> Result<u16> {
        let tss = self.tss(vcpu_index)?;
        let base = self.reserved_start + IOMAP_OFFSET - tss;
        Ok(u16::try_from(base).expect("the bitmap is less than 64 KiB above every TSS"))
    }

    /// vCPU `n`'s TSS limit: it covers the shared bitmap and its terminator byte.
    ///
    /// # Errors
    ///
    /// [`Error::VcpuIndexOutOfRange`] if `vcpu_index >= MAX_VCPUS`.
    pub fn tss_limit(&self, vcpu_index: u32) -> Result<u32> {
        let base = u32::from(self.iomap_base(vcpu_index)?);
        Ok(base + u32::try_from(IOMAP_BYTES).expect("8 KiB fits u32"))
    }
}

fn check_vcpu_index(vcpu_index: u32) -> Result<()> {
    if vcpu_index >= MAX_VCPUS {
        return Err(Error::VcpuIndexOutOfRange {
            index: vcpu_index,
            max: MAX_VCPUS,
        });
    }
    Ok(())
}

/// `usize` of an offset inside the reserved region (always far below `usize::MAX`).
fn usize_of(offset: u64) -> usize {
    usize::try_from(offset).expect("reserved-region offsets fit usize")
}

/// A 16-byte 64-bit TSS descriptor (type 0xb: busy, as after `ltr`; present; DPL0).
fn tss_descriptor(base: u64, limit: u32) -> [u8; 16] {
    let low = u64::from(limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | 0x8b << 40
        | u64::from((limit >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56;
    let high = base >> 32;
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&low.to_le_bytes());
    d[8..].copy_from_slice(&high.to_le_bytes());
    d
}

/// A 16-byte 64-bit interrupt gate to `handler` through the CPL0 code segment (no IST), with
/// descriptor privilege level `dpl` (who may reach it with `int n`).
fn interrupt_gate(handler: u64, dpl: u64) -> [u8; 16] {
    let low = (handler & 0xffff)
        | u64::from(KERNEL_CS) << 16
        | (0x8e | (dpl & 3) << 5) << 40
        | ((handler >> 16) & 0xffff) << 48;
    let high = handler >> 32;
    let mut g = [0u8; 16];
    g[..8].copy_from_slice(&low.to_le_bytes());
    g[8..].copy_from_slice(&high.to_le_bytes());
    g
}

/// The stub for `vector`: report, then (if resumed) drop the error code and return.
fn assemble_stub(vector: u8, ip: u64) -> Result<Vec<u8>> {
    let build = || -> std::result::Result<Vec<u8>, iced_x86::IcedError> {
        let mut a = CodeAssembler::new(64)?;
        // Exit to the VMM; the vector is this stub's address, so no register is touched.
        a.out(i32::from(EXCEPTION_PORT), al)?;
        if pushes_error_code(vector) {
            // Drop the error code so the frame starts at the return RIP.
            a.add(rsp, 8)?;
        }
        // Back to the frame's RIP (the faulting instruction unless the VMM patched it).
        a.iretq()?;
        a.assemble(ip)
    };
    build().map_err(|source| Error::Assemble { source })
}

/// The MSRs a long-mode vCPU starts with: `STAR` = [`STAR`], `LSTAR` = [`SYSCALL_TRAP_RIP`].
#[must_use]
pub fn long_mode_msrs() -> [kvm_msr_entry; 2] {
    [
        kvm_msr_entry {
            index: MSR_STAR,
            data: STAR,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_LSTAR,
            data: SYSCALL_TRAP_RIP,
            ..Default::default()
        },
    ]
}

/// The FPU state a long-mode vCPU starts with: FCW 0x37f, MXCSR 0x1f80.
#[must_use]
pub fn long_mode_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Loads 16-bit real mode at CPL0 into `sregs`: CS = DS = ES = SS = FS = GS = selector 0 with
/// base 0 and limit 0xffff, CR0.PE/PG, CR4 and EFER clear (other CR0 bits kept).
pub fn load_real_mode_sregs(sregs: &mut kvm_sregs) {
    let segment = |type_| kvm_segment {
        base: 0,
        limit: 0xffff,
        selector: 0,
        type_,
        present: 1,
        s: 1,
        ..Default::default()
    };
    sregs.cs = segment(0xb);
    sregs.ds = segment(0x3);
    sregs.es = segment(0x3);
    sregs.fs = segment(0x3);
    sregs.gs = segment(0x3);
    sregs.ss = segment(0x3);
    sregs.cr0 &= !(CR0_PE | CR0_PG);
    sregs.cr4 = 0;
    sregs.efer = 0;
}

/// The general registers of real mode at `entry_ip`: SP = 0 (the first push writes 0xfffe),
/// RFLAGS = 2.
#[must_use]
pub fn real_mode_regs(entry_ip: u16) -> kvm_regs {
    kvm_regs {
        rip: u64::from(entry_ip),
        rflags: 2,
        ..Default::default()
    }
}

/// A flat 4 GiB segment at CPL3 (`selector`'s RPL), code (`long`) or data.
fn flat_segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}
/// The CPUID facts the set-up depends on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    /// XSAVE (`CPUID.1:ECX[26]`).
    pub xsave: bool,
    /// FSGSBASE (`CPUID.(7,0):EBX[0]`).
    pub fsgsbase: bool,
    /// NX (`CPUID.80000001h:EDX[20]`).
    pub nx: bool,
    /// The XCR0 bits CPUID.(0xD,0) EDX:EAX reports.
    pub xcr0_supported: u64,
}

impl CpuFeatures {
    /// Reads the facts from CPUID entries (the vCPU's effective CPUID).
    #[must_use]
    pub fn from_cpuid(cpuid: &[kvm_cpuid_entry2]) -> Self {
        let mut f = Self::default();
        for e in cpuid {
            match (e.function, e.index) {
                (1, _) => f.xsave = e.ecx & CPUID1_ECX_XSAVE != 0,
                (7, 0) => f.fsgsbase = e.ebx & CPUID7_EBX_FSGSBASE != 0,
                (0x8000_0001, _) => f.nx = e.edx & CPUID80000001_EDX_NX != 0,
                (0xd, 0) => f.xcr0_supported = u64::from(e.eax) | u64::from(e.edx) << 32,
                _ => {}
            }
        }
        f
    }

    /// XCR0 to load: the wanted components the host supports, keeping the architectural
    /// dependencies (AVX needs SSE; the three AVX-512 components come together, with AVX).
    #[must_use]
    pub fn xcr0(self) -> u64 {
        let mut xcr0 = XCR0_X87_SSE | (self.xcr0_supported & XCR0_WANTED);
        if xcr0 & XCR0_AVX == 0 || xcr0 & XCR0_AVX512 != XCR0_AVX512 {
            xcr0 &= !XCR0_AVX512;
        }
        xcr0
    }
}

/// Sets the initial APIC id (leaf 1 `EBX[31:24]`) and the x2APIC id (leaves 0xB and 0x1F EDX)
/// to `vcpu_index`.
pub fn set_apic_ids(cpuid: &mut [kvm_cpuid_entry2], vcpu_index: u32) {
    for e in cpuid {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (vcpu_index & 0xff) << 24,
            0xb | 0x1f => e.edx = vcpu_index,
            _ => {}
        }
    }
}

/// An exception a long-mode guest took, as reported by the exception stubs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestException {
    /// The exception vector (0–31).
    pub vector: u8,
    /// The error code, for the vectors that push one (8, 10–14, 17, 21, 29, 30).
    pub error_code: Option<u64>,
    /// RIP of the frame: the faulting instruction for faults, the next one for traps.
    pub rip: u64,
    /// CS of the frame ([`USER_CS`] for faults in the CPL3 program).
    pub cs: u64,
    /// RFLAGS of the frame.
    pub rflags: u64,
    /// RSP of the frame (the program's stack pointer at the exception).
    pub rsp: u64,
    /// SS of the frame.
    pub ss: u64,
    /// CR2, the faulting linear address, for #PF (vector 14) only.
    pub cr2: Option<u64>,
}

impl GuestException {
    /// The mnemonic of the vector (`"#PF"`, `"#UD"`, `"NMI"`), or `"exception"` for reserved
    /// vectors.
    #[must_use]
    pub fn mnemonic(&self) -> &'static str {
        vector_mnemonic(self.vector)
    }
}

/// The mnemonic of an exception vector.
fn vector_mnemonic(vector: u8) -> &'static str {
    match vector {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        20 => "#VE",
        21 => "#CP",
        28 => "#HV",
        29 => "#VC",
        30 => "#SX",
        _ => "exception",
    }
}

impl fmt::Display for GuestException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (vector {}) at rip {:#x}",
            self.mnemonic(),
            self.vector,
            self.rip
        )?;
        if let Some(code) = self.error_code {
            write!(f, ", error code {code:#x}")?;
        }
        if let Some(addr) = self.cr2 {
            write!(f, ", address {addr:#x}")?;
        }
        Ok(())
    }
}

impl GuestException {
    /// Reads the frame of exception `vector` (`[error code,] rip, cs, rflags, rsp, ss`) from
    /// the CPL0 stack at `stack` (the vCPU's RSP), through `mem` (the stack is identity-mapped). `cr2` is the
    /// faulting address, kept for #PF (vector 14) only.
    ///
    /// # Errors
    ///
    /// [`Error::GuestMemory`] if the frame cannot be read.
    pub fn from_frame<M>(mem: &M, vector: u8, stack: u64, cr2: u64) -> Result<Self>
    where
        M: Bytes<GuestAddress, E = GuestMemoryError> + ?Sized,
    {
        let read = |slot: u64| -> Result<u64> {
            let addr = stack.wrapping_add(slot * 8);
            mem.read_obj::<u64>(GuestAddress(addr))
                .map_err(|source| Error::GuestMemory {
                    what: "exception frame",
                    addr,
                    source,
                })
        };
        let (error_code, first) = if pushes_error_code(vector) {
            (Some(read(0)?), 1)
        } else {
            (None, 0)
        };
        Ok(GuestException {
            vector,
            error_code,
            rip: read(first)?,
            cs: read(first + 1)?,
            rflags: read(first + 2)?,
            rsp: read(first + 3)?,
            ss: read(first + 4)?,
            cr2: (vector == 14).then_some(cr2),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_small_ram_is_refused() {
        let err = LongModeLayout::new(0x8_0000).unwrap_err();
        assert!(matches!(err, Error::InvalidRamSize { size: 0x8_0000, .. }));
    }

    #[test]
    fn new_unaligned_ram_is_refused() {
        let err = LongModeLayout::new(0x10_0800).unwrap_err();
        assert!(matches!(err, Error::InvalidRamSize { .. }));
    }

    #[test]
    fn new_64mib_reserves_the_top_128kib() {
        let l = LongModeLayout::new(64 << 20).unwrap();
        assert_eq!(l.reserved_range(), ((64 << 20) - 0x2_0000, 64 << 20));
        assert_eq!(l.identity_map_size(), 64 << 20);
        assert_eq!(l.pml4(), (64 << 20) - 0x2_0000);
        assert_eq!(l.user_stack_top(0).unwrap(), (64 << 20) - 0x2_0000);
        assert_eq!(
            l.user_stack_top(3).unwrap(),
            (64 << 20) - 0x2_0000 - 0x3_0000
        );
        assert_eq!(
            l.kernel_stack_top(0).unwrap(),
            (64 << 20) - 0x1_0000 + 0x400
        );
        assert_eq!(l.kernel_stack_top(63).unwrap(), 64 << 20);
    }

    #[test]
    fn new_8gib_caps_the_identity_map_at_4gib() {
        let l = LongModeLayout::new(8 << 30).unwrap();
        assert_eq!(l.identity_map_size(), 4 << 30);
        assert_eq!(l.reserved_range(), ((4 << 30) - 0x2_0000, 4 << 30));
    }

    #[test]
    fn odd_ram_is_mapped_up_to_the_next_2mib() {
        let l = LongModeLayout::new(0x30_1000).unwrap();
        assert_eq!(l.identity_map_size(), 0x40_0000);
    }

    #[test]
    fn vcpu_index_64_is_out_of_range() {
        let l = LongModeLayout::new(64 << 20).unwrap();
        assert!(matches!(
            l.tss(64),
            Err(Error::VcpuIndexOutOfRange { index: 64, max: 64 })
        ));
        assert!(l.user_stack_top(64).is_err());
    }

    #[test]
    fn user_stack_top_beyond_small_ram_is_refused() {
        let l = LongModeLayout::new(MIN_RAM_SIZE).unwrap();
        assert!(l.user_stack_top(0).is_ok());
        assert!(matches!(
            l.user_stack_top(20),
            Err(Error::VcpuIndexOutOfRange { index: 20, .. })
        ));
    }

    #[test]
    fn tables_map_every_2mib_page_user_writable() {
        let l = LongModeLayout::new(64 << 20).unwrap();
        let r = l.reserved_range().0;
        let q = |off: u64| {
            let i = usize_of(off);
            u64::from_le_bytes(l.tables[i..i + 8].try_into().unwrap())
        };
        assert_eq!(q(PML4_OFFSET), (r + PDPT_OFFSET) | 0x27);
        assert_eq!(q(PDPT_OFFSET), (r + PD_OFFSET) | 0x27);
        assert_eq!(q(PDPT_OFFSET + 8), 0);
        assert_eq!(q(PD_OFFSET), 0xe7);
        assert_eq!(q(PD_OFFSET + 31 * 8), (31 * PAGE_2M) | 0xe7);
        assert_eq!(q(PD_OFFSET + 32 * 8), 0);
    }

    #[test]
    fn tss_points_at_its_stack_and_the_shared_bitmap() {
        let l = LongModeLayout::new(64 << 20).unwrap();
        let r = l.reserved_range().0;
        for n in [0, 1, 63] {
            let off = usize_of(l.tss(n).unwrap() - r);
            let rsp0 = u64::from_le_bytes(l.tables[off + 4..off + 12].try_into().unwrap());
            assert_eq!(rsp0, l.kernel_stack_top(n).unwrap());
            let iomap = u16::from_le_bytes(l.tables[off + 102..off + 104].try_into().unwrap());
            assert_eq!(l.tss(n).unwrap() + u64::from(iomap), r + IOMAP_OFFSET);
        }
        assert_eq!(l.tables[usize_of(IOMAP_OFFSET + IOMAP_BYTES)], 0xff);
        assert!(
            l.tables[usize_of(IOMAP_OFFSET)..usize_of(IOMAP_OFFSET + IOMAP_BYTES)]
                .iter()
                .all(|&b| b == 0)
        );
    }

    #[test]
    fn stubs_fit_their_slots_and_start_with_out_0xf5() {
        let l = LongModeLayout::new(64 << 20).unwrap();
        let r = l.reserved_range().0;
        for v in 0..EXCEPTION_VECTORS {
            let off = usize_of(l.exception_stub(v).unwrap() - r);
            assert_eq!(&l.tables[off..off + 2], &[0xe6, 0xf5]);
        }
        assert_eq!(l.exception_stub(32), None);
    }

    #[test]
    fn idt_gates_are_dpl0_except_breakpoint_and_overflow() {
        let l = LongModeLayout::new(64 << 20).unwrap();
        let attr = |v: u64| l.tables[usize_of(IDT_OFFSET + v * 16 + 5)];
        assert_eq!(attr(3), 0xee);
        assert_eq!(attr(4), 0xee);
        assert_eq!(attr(6), 0x8e);
        assert_eq!(attr(14), 0x8e);
    }

    #[test]
    fn display_page_fault_names_code_and_address() {
        let e = GuestException {
            vector: 14,
            error_code: Some(6),
            rip: 0x1234,
            cs: 0x23,
            rflags: 0x202,
            rsp: 0x8000,
            ss: 0x1b,
            cr2: Some(0x5000),
        };
        assert_eq!(
            e.to_string(),
            "#PF (vector 14) at rip 0x1234, error code 0x6, address 0x5000"
        );
    }

    #[test]
    fn display_invalid_opcode_has_no_code() {
        let e = GuestException {
            vector: 6,
            error_code: None,
            rip: 0x1001,
            cs: 0x23,
            rflags: 0x202,
            rsp: 0x8000,
            ss: 0x1b,
            cr2: None,
        };
        assert_eq!(e.to_string(), "#UD (vector 6) at rip 0x1001");
    }

    #[test]
    fn xcr0_drops_partial_avx512() {
        let f = CpuFeatures {
            xcr0_supported: 0x27,
            ..Default::default()
        };
        assert_eq!(f.xcr0(), 0x7);
        let f = CpuFeatures {
            xcr0_supported: 0x2e7,
            ..Default::default()
        };
        assert_eq!(f.xcr0(), 0xe7);
    }

    #[test]
    fn exception_vector_is_told_by_the_stub_address() {
        let l = LongModeLayout::new(64 << 20).unwrap();
        let stub14 = l.exception_stub(14).unwrap();
        assert_eq!(l.exception_vector(stub14), Some(14));
        assert_eq!(l.exception_vector(stub14 + STUB_SIZE - 1), Some(14));
        assert_eq!(l.exception_vector(l.exception_stub(0).unwrap() - 1), None);
        let end = l.exception_stub(31).unwrap() + STUB_SIZE;
        assert_eq!(l.exception_vector(end - 1), Some(31));
        assert_eq!(l.exception_vector(end), None);
        assert_eq!(l.exception_vector(0x1000), None);
    }

    #[test]
    fn from_frame_reads_the_error_code_only_where_pushed() {
        use vm_memory::GuestMemoryMmap;
        let m: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let frame = [6u64, 0x1234, 0x23, 0x202, 0x8000, 0x1b];
        for (i, v) in frame.iter().enumerate() {
            m.write_obj(*v, GuestAddress(0x5000 + 8 * i as u64))
                .unwrap();
        }
        let pf = GuestException::from_frame(&m, 14, 0x5000, 0xdead).unwrap();
        assert_eq!(
            pf,
            GuestException {
                vector: 14,
                error_code: Some(6),
                rip: 0x1234,
                cs: 0x23,
                rflags: 0x202,
                rsp: 0x8000,
                ss: 0x1b,
                cr2: Some(0xdead),
            }
        );
        let ud = GuestException::from_frame(&m, 6, 0x5008, 0xdead).unwrap();
        assert_eq!(
            (ud.error_code, ud.rip, ud.ss, ud.cr2),
            (None, 0x1234, 0x1b, None)
        );
        let err = GuestException::from_frame(&m, 6, (1 << 20) - 16, 0).unwrap_err();
        assert!(matches!(
            err,
            Error::GuestMemory {
                what: "exception frame",
                ..
            }
        ));
    }

    #[test]
    fn load_sregs_follows_the_features_and_the_vcpu() {
        let l = LongModeLayout::new(64 << 20).unwrap();
        let mut s = kvm_sregs::default();
        l.load_sregs(&mut s, &CpuFeatures::default(), 2).unwrap();
        assert_eq!(s.cr3, l.pml4());
        assert_eq!(s.cr4 & (CR4_OSXSAVE | CR4_FSGSBASE), 0);
        assert_eq!(s.efer, EFER_SCE | EFER_LME | EFER_LMA);
        assert_eq!((s.tr.base, s.tr.selector), (l.tss(2).unwrap(), 0x28 + 32));
        assert_eq!((s.cs.selector, s.cs.l, s.cs.dpl), (USER_CS, 1, 3));
        assert_eq!((s.gdt.base, s.idt.base), (l.gdt(), l.idt()));
        let all = CpuFeatures {
            xsave: true,
            fsgsbase: true,
            nx: true,
            xcr0_supported: 0xe7,
        };
        l.load_sregs(&mut s, &all, 0).unwrap();
        assert_eq!(
            s.cr4 & (CR4_OSXSAVE | CR4_FSGSBASE),
            CR4_OSXSAVE | CR4_FSGSBASE
        );
        assert_eq!(s.efer & EFER_NXE, EFER_NXE);
        let before = s;
        assert!(l.load_sregs(&mut s, &all, MAX_VCPUS).is_err());
        assert_eq!(s.tr.selector, before.tr.selector, "unchanged on error");
    }

    #[test]
    fn cpuid_facts_and_apic_ids() {
        let entry = |function, index, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        let mut cpuid = [
            entry(1, 0, 0, 0x0012_3456, CPUID1_ECX_XSAVE, 0),
            entry(7, 0, 0, CPUID7_EBX_FSGSBASE, 0, 0),
            entry(0xd, 0, 0x2e7, 0, 0, 0),
            entry(0x8000_0001, 0, 0, 0, 0, CPUID80000001_EDX_NX),
            entry(0xb, 0, 0, 0, 0, 0),
        ];
        let f = CpuFeatures::from_cpuid(&cpuid);
        assert!(f.xsave && f.fsgsbase && f.nx);
        assert_eq!(f.xcr0(), 0xe7);
        set_apic_ids(&mut cpuid, 5);
        assert_eq!(cpuid[0].ebx, 0x0512_3456);
        assert_eq!(cpuid[4].edx, 5);
        assert_eq!(CpuFeatures::from_cpuid(&[]), CpuFeatures::default());
    }
}
