//! # pagetrack-kvm: exact guest write tracking on real KVM
//!
//! Work in progress; see the crate README and `docs/DESIGN-kvm.md`.
//!
//! Two ways in: the ready-made façade ([`Vm::new`], [`Vm::add_ram`], [`Vm::create_vcpu`],
//! [`Vcpu::run`]), or embedded in a VMM that keeps its own KVM set-up (below).
//!
//! ## Embedding: the contract
//!
//! `examples/embed.rs` is a complete VMM written this way (a test runs it).
//!
//! 1. **VM**: the VMM creates its `VmFd` and passes it shared to [`Vm::from_vm_fd`], with the
//!    [`HostCaps`] it determined ([`HostCaps::probe`] reads `/proc` and `/sys`;
//!    [`HostCaps::from_kvm`] asks only `/dev/kvm` and takes the rest from a jailed VMM) and
//!    the KVM memslot ids pagetrack may use ([`VmConfig::with_kvm_slots`]; its fragments never
//!    use another id, so the VMM's own memslots keep theirs). pagetrack installs its MSR
//!    filter on the VM (`pvmsr.rs`) and, once per process, a no-op handler for its kick
//!    signal (`SIGRTMIN + 5`). When the [`Vm`] and its clones are gone, pagetrack's memslots
//!    are deleted and the VM is left to the VMM.
//! 2. **Memory**: the VMM maps its guest memory (memfd, hugetlbfs, a snapshot file) as
//!    `vm_memory::GuestRegionMmap`s and registers each with [`Vm::add_region`] (pagetrack
//!    maps nothing; KVM's memslots for the range are pagetrack's, in the id range above).
//!    Guest memory the VMM writes must go through [`Vm::memory`] to be tracked; writes
//!    through its own mapping bypass tracking.
//! 3. **vCPUs**: the VMM creates each vCPU fd, then [`Vm::exit_handler`] (once per index,
//!    before the first run). On the thread that runs the vCPU, in place of `vcpu_fd.run()` it
//!    calls [`ExitHandler::run`]: [`Ran::Tracked`] goes to [`ExitHandler::handle`] at once
//!    (it completes and reports the store; notifiers run there), then the loop runs again;
//!    [`Ran::Exit`] is kvm-ioctls' `VcpuExit` for the VMM's own dispatch (port I/O and MMIO
//!    data answered in place); [`Ran::Stopped`] follows a [`VcpuStopper::stop`]. After a
//!    handled exit, run again before doing anything on that thread that pauses vCPUs
//!    (tracking changes, [`Vm::page_table_update`]): KVM may still have to finish the
//!    instruction, and pauses wait for that. `KVM_RUN` returning EINTR is
//!    [`Ran::Tracked`] (pagetrack kicks vCPUs for pauses and its stall check): a VMM that
//!    kicks its vCPUs itself (`immediate_exit` and a signal) finds its kick handled as a
//!    no-op and checks its own flags at the top of its loop, as it does anyway; pagetrack
//!    clears `immediate_exit` whenever `KVM_RUN` returns.
//!    Run each vCPU through its own handler and the fd it was made for; drop the handler
//!    of a vCPU that will not run again (an error from `handle` included), so that pauses
//!    do not wait for an instruction it left unfinished.
//! 4. **Page tables**: a VMM that edits guest page tables from userspace does so inside
//!    [`Vm::page_table_update`], as with the façade (below).
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
mod relaxed;
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
pub use relaxed::{RelaxedConfig, RelaxedMode, RelaxedStats, SyncReport};
pub use slots::FragmentStats;
pub use update::PageTableUpdate;
pub use vcpu::{Exit, ExitBudget, IoData, IoHandler, Vcpu, VcpuStopper};
pub use vm::{HostCaps, KvmSlotIds, Vm, VmConfig, VmStats};
