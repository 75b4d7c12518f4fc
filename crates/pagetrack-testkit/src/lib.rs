//! # pagetrack-testkit: test support for pagetrack (not published)
//!
//! The KVM test gate, guest-program builders, a bounded vCPU runner, the notifier-contract
//! suite every backend runs, and the two-pass harness.
//!
//! - [`kvm_or_skip!`]: opens `/dev/kvm` or skips the test loudly (or fails it, with
//!   `PAGETRACK_REQUIRE_KVM=1` or when `/dev/kvm` exists but cannot be opened).
//! - [`assemble`], [`assemble16`], [`exit_with`]: guest programs written with iced-x86's
//!   `CodeAssembler`; the exit convention is `out 0xf4, al` with the exit code in `al`.
//! - [`run_bounded`], [`with_watchdog`]: a broken guest fails the test instead of hanging it.
//! - [`assert_notifier_contract`]: the notifier contract, run against every backend.
//! - [`TwoPass`]: the two-pass harness (a body on untracked, then tracked memory; compare
//!   and replay).
//!
//! The vCPU set-up itself (page tables, GDT, TSS, IDT, exception stubs) is
//! [`pagetrack_vmm::x86`]; the kernel names of what the tests exercise are in
//! [`pagetrack::kernel_names`].
//!
//! ## Walk-through
//!
//! Each step is a doc-test (`cargo test --doc -p pagetrack-testkit`); the KVM steps print a
//! `SKIPPED` line and return when `/dev/kvm` is absent, as the tests do.
//!
//! 1. **Gate a KVM test.** [`kvm_or_skip!`] evaluates to a `kvm_ioctls::Kvm`, or writes
//!    `SKIPPED (no /dev/kvm): <module>` and returns from the function (which returns `()`).
//!
//! ```
//! fn a_kvm_test() {
//!     let kvm = pagetrack_testkit::kvm_or_skip!();
//!     assert_eq!(kvm.get_api_version(), 12); // KVM_API_VERSION, stable since 2.6.22
//! }
//! a_kvm_test();
//! ```
//!
//! 2. **Write a guest program.** [`assemble`] runs iced-x86's assembler at a base address;
//!    [`exit_with`] ends the program the way the runners expect.
//!
//! ```
//! use iced_x86::code_asm::{byte_ptr, rdi};
//! use pagetrack_testkit::{assemble, exit_with};
//!
//! let code = assemble(0x1000, |a| {
//!     a.mov(rdi, 0x20_0000u64)?;
//!     a.mov(byte_ptr(rdi), 7)?; // one store into guest memory
//!     exit_with(a, 0)
//! });
//! assert!(code.ends_with(&[0xb0, 0x00, 0xe6, 0xf4])); // mov al, 0; out 0xf4, al
//! ```
//!
//! 3. **Run it with a bound.** [`run_bounded`] runs a bare vCPU (here one of a
//!    `pagetrack_kvm::Vm`, set up by [`pagetrack_vmm::x86::setup_long_mode`]) until it exits
//!    on the exit port, faults, halts or uses up its exits.
//!
//! ```
//! use iced_x86::code_asm::{byte_ptr, rdi};
//! use pagetrack_kvm::{Vm, VmConfig};
//! use pagetrack_testkit::{Stop, assemble, exit_with, run_bounded};
//! use pagetrack_vmm::x86::{LongModeLayout, setup_long_mode};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! if !std::path::Path::new("/dev/kvm").exists() {
//!     println!("SKIPPED: no /dev/kvm");
//!     return Ok(());
//! }
//! let code = assemble(0x1000, |a| {
//!     a.mov(rdi, 0x20_0000u64)?;
//!     a.mov(byte_ptr(rdi), 7)?;
//!     exit_with(a, 3)
//! });
//! let vm = Vm::new(VmConfig::default().with_ram(16 << 20))?;
//! vm.add_ram(0, 16 << 20)?;
//! let layout = LongModeLayout::new(16 << 20)?;
//! vm.untracked_memory().write_slice(&code, GuestAddress(0x1000))?;
//! let mut vcpu = vm.create_vcpu(0)?;
//! setup_long_mode(vm.kvm(), vcpu.fd(), &*vm.untracked_memory(), &layout, 0x1000, 0)?;
//! assert_eq!(run_bounded(vcpu.fd_mut(), 100)?, Stop::Exit(3));
//! assert_eq!(vm.untracked_memory().read_obj::<u8>(GuestAddress(0x20_0000))?, 7);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! 4. **Check a backend against the notifier contract.** A [`Harness`] says how a backend
//!    writes; [`assert_notifier_contract`] checks delivery, straddling writes, reference
//!    counts, dispatch order and unregistering. Here the core alone, with writes applied to
//!    a `Vec` and reported (no KVM needed).
//!
//! ```
//! use std::sync::Arc;
//! use pagetrack::{Gfn, Gpa, MemoryRegion, NoEnforcement, PageTracker, SlotId, Source};
//! use pagetrack::{TrackerConfig, Tracking, WriteEvent};
//! use pagetrack_testkit::{Harness, assert_notifier_contract};
//!
//! // The backend owns the tracker (it reports writes); the suite gets the consumer view.
//! struct Fake { tracker: Arc<PageTracker>, view: Tracking, mem: Vec<u8> }
//! impl Harness for Fake {
//!     fn tracker(&self) -> &Tracking { &self.view }
//!     fn write(&mut self, gpa: u64, bytes: &[u8]) {
//!         let at = usize::try_from(gpa).expect("small");
//!         let old = self.mem[at..at + bytes.len()].to_vec();
//!         self.mem[at..at + bytes.len()].copy_from_slice(bytes);
//!         let event = WriteEvent::new(Gpa(gpa), bytes, Source::Device).with_old(&old);
//!         self.tracker.report_write(&event);
//!     }
//!     fn source(&self) -> Source { Source::Device }
//!     fn knows_old_bytes(&self) -> bool { true }
//!     fn frames(&self) -> (Gfn, Gfn) { (Gfn(2), Gfn(6)) }
//! }
//!
//! assert_notifier_contract(|| {
//!     let tracker = PageTracker::new(TrackerConfig::default(), Arc::new(NoEnforcement));
//!     tracker.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 8)).expect("slot");
//!     Fake { view: Tracking::new(Arc::clone(&tracker)), tracker, mem: vec![0; 8 * 4096] }
//! });
//! ```
//!
//! 5. **Compare a tracked run with an untracked one.** [`TwoPass`] runs one body over
//!    untracked and then tracked memory in one VM; [`TwoPassRun::assert_exact`] checks the
//!    memory, registers and flags agree and that replaying the events gives the guest's own
//!    view of the result.
//!
//! ```
//! use iced_x86::code_asm::{dword_ptr, rdi};
//!
//! fn body(a: &mut iced_x86::code_asm::CodeAssembler) -> Result<(), iced_x86::IcedError> {
//!     a.add(dword_ptr(rdi + 0xffe), 0x1234_5678)?; // straddles into the next frame
//!     a.mov(dword_ptr(rdi + 0x10), 5)
//! }
//!
//! if !std::path::Path::new("/dev/kvm").exists() {
//!     println!("SKIPPED: no /dev/kvm");
//!     return;
//! }
//! let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
//! let run = pagetrack_testkit::TwoPass::new(&body).frames(2).run(kvm);
//! run.assert_exact();
//! assert!(!run.events.is_empty());
//! ```
#![forbid(unsafe_code)]

pub mod asm;
pub mod contract;
pub mod gate;
pub mod runner;
pub mod twopass;

pub use asm::{EXIT0_CODE, assemble, assemble16, exit_with, static_elf64};
pub use contract::{Harness, assert_notifier_contract};
pub use runner::{Stop, run_bounded, with_watchdog};
pub use twopass::{Ending, TwoPass, TwoPassRun};
