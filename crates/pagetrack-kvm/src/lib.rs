//! # pagetrack-kvm: exact guest write tracking on real KVM
//!
//! Work in progress; see the crate README.
#![deny(unsafe_code)]
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
compile_error!("pagetrack-kvm supports x86_64 Linux hosts only");

mod atomic;
mod dirty;
pub mod emulate;
mod error;
mod gate;
mod memory;
mod slots;
mod store;
mod string;
mod sys;
mod vcpu;
mod vm;
pub mod walk;

pub use error::{Error, Result};
pub use memory::TrackedMemory;
pub use slots::FragmentStats;
pub use vcpu::{Exit, ExitBudget, IoData, IoHandler, Vcpu, VcpuStopper};
pub use vm::{HostCaps, Vm, VmConfig, VmStats};
