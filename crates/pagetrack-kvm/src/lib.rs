//! # pagetrack-kvm: exact guest write tracking on real KVM
//!
//! Work in progress; see the crate README and `docs/DESIGN-kvm.md`.
//!
//! ## Pausing vCPUs
//!
//! Tracking a frame re-cuts KVM memslots with every vCPU outside `KVM_RUN`. vCPUs are kicked
//! out by KVM's documented protocol: `kvm_run.immediate_exit` is set, then the thread gets a
//! real-time signal (`SIGRTMIN + 5`, with a no-op handler pagetrack installs once per
//! process). One kick per vCPU suffices; nothing polls.
//!
//! ## Page-table updates
//!
//! Stores to tracked frames are completed in userspace after `KVM_RUN` returned. A VMM that
//! edits guest page tables from userspace, or frees or reuses frames a translation led to,
//! does so inside [`Vm::page_table_update`]: each completion then happens entirely before
//! the update (through the old tables, to a frame still behind them) or entirely after it
//! (through the new ones). The argument is in `docs/DESIGN-kvm.md` and `update.rs`.
//!
//! ## Dirty logging
//!
//! With [`VmConfig::with_dirty_log`], every memslot fragment carries
//! `KVM_MEM_LOG_DIRTY_PAGES`, re-cuts harvest a fragment's log before deleting it, and stores
//! pagetrack applies itself (trapped stores, device writes through [`TrackedMemory`]) are
//! logged too: [`Vm::take_dirty_log`] returns one RAM region's pages written since the last
//! call.
//!
//! The KVM integration tests live in `pagetrack-testkit/tests/kvm` (they boot guests with
//! pagetrack-vmm, which depends on this crate).
#![deny(unsafe_code)]
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
compile_error!("pagetrack-kvm supports x86_64 Linux hosts only");

mod atomic;
mod dirty;
mod error;
mod gate;
mod handler;
mod memory;
mod pvmsr;
mod slots;
mod store;
mod string;
mod sys;
mod update;
mod vcpu;
mod vm;

pub use error::{Error, Result};
pub use handler::{ExitHandler, Handled, Ran, Tracked};
pub use memory::TrackedMemory;
/// The store emulator (moved to [`pagetrack_x86::emulate`]).
pub use pagetrack_x86::emulate;
/// The guest page walker (moved to [`pagetrack_x86::walk`]).
pub use pagetrack_x86::walk;
pub use slots::FragmentStats;
pub use update::PageTableUpdate;
pub use vcpu::{Exit, ExitBudget, IoData, IoHandler, Vcpu, VcpuStopper};
pub use vm::{HostCaps, KvmSlotIds, Vm, VmConfig, VmStats};
