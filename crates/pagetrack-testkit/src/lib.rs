//! pagetrack test support (not published): the KVM test gate, guest-program builders and a
//! bounded vCPU runner.
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
//! [`pagetrack_vmm::x86`].
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
