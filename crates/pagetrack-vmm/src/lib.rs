//! pagetrack-vmm: a small VMM to run guests on pagetrack-kvm.
//!
//! It runs flat guest images in 64-bit long mode (at CPL3, behind minimal CPL0 exception
//! stubs) or in 16-bit real mode. The [`x86`] module prepares vCPUs and the guest-memory
//! structures they need (page tables, GDT, TSS, IDT) and decodes the exceptions a guest
//! reports; it works on any `vm_memory::Bytes` accessor, so it does not depend on how guest
//! memory is tracked.
#![forbid(unsafe_code)]

pub mod error;
pub mod flat;
pub mod process;
pub mod x86;

pub use error::{Error, ProgramRefusal, Result};
pub use flat::{EndReason, FlatConfig, FlatGuest, Mode, RunOutcome};
pub use x86::{GuestException, LongModeLayout, decode_exception, setup_long_mode, setup_real_mode};
