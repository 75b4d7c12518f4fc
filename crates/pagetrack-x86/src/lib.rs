//! # pagetrack-x86: the pure x86-64 logic of pagetrack
//!
//! What pagetrack knows about x86-64, with no KVM ioctl, no host state and no `unsafe`:
//! everything here runs and is tested without `/dev/kvm`. `pagetrack-kvm` builds its store
//! completion, atomic path and rep-string path on it (and re-exports [`emulate`] and
//! [`walk`]); `pagetrack-vmm` builds its vCPU set-up on [`boot`].
//!
//! | module | concept |
//! | --- | --- |
//! | [`walk`] | the software walk of 4-level page tables (4 KiB, 2 MiB, 1 GiB pages) |
//! | [`guest`] | the emulator's memory view over guest memory: [`walk`] plus physical reads |
//! | [`emulate`] | the store emulator's API: [`emulate::StorePlan`], [`emulate::emulate_store`] |
//! | `classify` | which store an instruction is and where its destination is |
//! | `plan` | the store plan: translate, then execute against current memory |
//! | `alu` | integer results and the status flags |
//! | `xsave` | the XSAVE area: layout from CPUID, component reads, `fxsave`/`xsave` images |
//! | `regs` | the one set of register accessors (general, vector, opmask, MMX) |
//! | `simd`, `x87` | vector, MMX, opmask and x87 stores computed from registers |
//! | [`atomic`] | identifying a trapped locked read-modify-write, by proof |
//! | [`rep`] | planning the rest of a trapped `rep stos`/`rep movs` |
//! | [`sysregs`] | the system-register facts the decoders need |
//! | [`mode`] | the vCPU's mode: code size, segments, paging |
//! | [`multistore`] | instructions KVM stores more than once for, completed or refused |
//! | [`boot`] | long-mode page tables, GDT, TSS, IDT, stubs and initial vCPU state |
//!
//! ## Walk-through
//!
//! 1. **Walk a page table.** Build a 4-level table in guest memory and translate through it;
//!    the translation says whether every level allows writes and user access, and which
//!    entries it read (the frames a translation depends on).
//!
//! ```
//! use pagetrack_x86::walk::{self, pte};
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)])?;
//! let rwu = pte::PRESENT | pte::WRITABLE | pte::USER;
//! mem.write_obj(0x2000 | rwu, GuestAddress(0x1000))?; // PML4[0] -> PDPT at 0x2000
//! mem.write_obj(0x3000 | rwu, GuestAddress(0x2000))?; // PDPT[0] -> PD at 0x3000
//! mem.write_obj(0x4000 | rwu, GuestAddress(0x3000))?; // PD[0]   -> PT at 0x4000
//! mem.write_obj(0x9000 | pte::PRESENT | pte::USER, GuestAddress(0x4008))?; // PT[1]: read-only
//!
//! let t = walk::translate(&mem, 0x1000, 0x1234).expect("mapped");
//! assert_eq!(t.gpa, 0x9234);
//! assert!(!t.writable && t.user);
//! assert_eq!(t.entries, [0x1000, 0x2000, 0x3000, 0x4008]);
//! assert!(walk::translate(&mem, 0x1000, 0x2000).is_err()); // PT[2] is absent
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! 2. **Decode a store and plan it against a fake CPU.** The emulator reaches memory only
//!    through [`emulate::CpuAccess`]; here it is a `Vec` with identity translation. The plan
//!    lists the guest-physical ranges to lock, then executes against the bytes there now and
//!    returns the writes for the caller to apply.
//!
//! ```
//! use pagetrack_x86::emulate::{CpuAccess, CpuState, EmulateError, Mnemonic, StorePlan};
//!
//! struct Flat(Vec<u8>);
//! impl CpuAccess for Flat {
//!     fn translate(&mut self, gva: u64, _write: bool) -> Result<u64, EmulateError> {
//!         Ok(gva)
//!     }
//!     fn read_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), EmulateError> {
//!         let at = usize::try_from(gpa).expect("small");
//!         buf.copy_from_slice(&self.0[at..at + buf.len()]);
//!         Ok(())
//!     }
//! }
//!
//! let mut mem = Flat(vec![0; 0x2000]);
//! mem.0[0x1000..0x1008].copy_from_slice(&100u64.to_le_bytes());
//! let mut state = CpuState::default();
//! state.regs.rip = 0x40_0000;
//! state.regs.rdi = 0x1000;
//! state.regs.rax = 23;
//!
//! // lock xadd [rdi], rax
//! let plan = StorePlan::new(&state, &[0xf0, 0x48, 0x0f, 0xc1, 0x07], &mut mem)?;
//! assert_eq!(plan.mnemonic(), Mnemonic::Xadd);
//! assert!(plan.locked());
//! let targets: Vec<_> = plan.targets().map(|t| (t.gpa, t.len)).collect();
//! assert_eq!(targets, [(0x1000, 8)]); // lock this frame, then:
//! let done = plan.execute(&mut state, &mut mem)?;
//! assert_eq!(done.writes[0].new, 123u64.to_le_bytes());
//! assert_eq!(state.regs.rax, 100); // xadd returns the old value
//! assert_eq!(state.regs.rip, 0x40_0005);
//! # Ok::<(), EmulateError>(())
//! ```
//!
//! 3. **Identify a trapped store.** KVM reports a store to a read-only frame with RIP past
//!    the instruction; [`atomic::identify`] says whether it was a locked read-modify-write
//!    (and with which registers it started), only when no other decoding could explain it.
//!
//! ```
//! use kvm_bindings::kvm_regs;
//! use pagetrack_x86::atomic::{Identified, identify};
//! use pagetrack_x86::sysregs::SysCache;
//! use pagetrack_x86::walk::pte;
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! // 2 MiB identity map, then `lock xadd [rdi], rax` ending at 0x10_005.
//! let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)])?;
//! let rwu = pte::PRESENT | pte::WRITABLE | pte::USER;
//! mem.write_obj(0x2000 | rwu, GuestAddress(0x1000))?;
//! mem.write_obj(0x3000 | rwu, GuestAddress(0x2000))?;
//! mem.write_obj(rwu | pte::HUGE, GuestAddress(0x3000))?;
//! mem.write_slice(&[0xf0, 0x48, 0x0f, 0xc1, 0x07, 0xf4], GuestAddress(0x1_0000))?;
//!
//! let sys = SysCache { cr3: 0x1000, fs_base: 0, gs_base: 0, long64: true };
//! // After KVM's emulation: RAX holds the old value 100, memory got 123.
//! let regs = kvm_regs { rip: 0x1_0005, rdi: 0x8000, rax: 100, ..Default::default() };
//! let Identified::Locked(op) = identify(&mem, &sys, &regs, 0x8000, &123u64.to_le_bytes())
//! else {
//!     panic!("a lone lock xadd is identified");
//! };
//! assert_eq!((op.pre.rip, op.pre.rax), (0x1_0000, 23)); // re-execute from here, atomically
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! 4. **Build the boot structures.** [`boot::LongModeLayout`] computes where the page
//!    tables, GDT, TSSs, IDT and exception stubs live and builds their bytes; it also fills
//!    in the special and general registers a vCPU starts with.
//!
//! ```
//! use kvm_bindings::kvm_sregs;
//! use pagetrack_x86::boot::{CpuFeatures, LongModeLayout, USER_CS};
//!
//! let layout = LongModeLayout::new(64 << 20)?;
//! assert_eq!(layout.reserved_range(), ((64 << 20) - 0x2_0000, 64 << 20));
//! let tables = layout.tables(); // written at reserved_range().0
//! assert_eq!(&tables[..8], &((layout.pml4() + 0x1000) | 0x27).to_le_bytes());
//!
//! let mut sregs = kvm_sregs::default();
//! layout.load_sregs(&mut sregs, &CpuFeatures::default(), 0)?;
//! assert_eq!((sregs.cr3, sregs.cs.selector), (layout.pml4(), USER_CS));
//! let regs = layout.regs(0x1000, 0)?;
//! assert_eq!(regs.rsp, layout.user_stack_top(0)?);
//! # Ok::<(), pagetrack_x86::Error>(())
//! ```
#![forbid(unsafe_code)]

mod alu;
pub mod atomic;
pub mod boot;
mod bytes;
mod classify;
pub mod emulate;
mod error;
pub mod guest;
pub mod mode;
pub mod multistore;
mod plan;
mod regs;
pub mod rep;
mod simd;
pub mod sysregs;
#[cfg(test)]
mod testmem;
pub mod walk;
mod x87;
mod xsave;

pub use error::{Error, Result};
