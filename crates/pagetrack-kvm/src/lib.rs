//! # pagetrack-kvm: exact guest write tracking on real KVM
//!
//! Every guest store to a tracked 4 KiB frame, and every device write through
//! [`TrackedMemory`], reaches the notifiers of the core tracker ([`pagetrack`]) as one
//! [`WriteEvent`](pagetrack::WriteEvent) with its old and new bytes and who wrote, while
//! untracked frames run at full speed. Tracked frames sit in read-only KVM memslots, so a
//! store to them exits to userspace, where pagetrack completes it (`docs/DESIGN-kvm.md`).
//!
//! Two ways in: the ready-made façade ([`Vm::new`], [`Vm::add_ram`], [`Vm::create_vcpu`],
//! [`Vcpu::run`]), walked through below, or embedded in a VMM that keeps its own KVM set-up
//! ("Embedding: the contract").
//!
//! ## Walk-through: the façade
//!
//! `pagetrack-vmm/examples/watch.rs` is this walk-through as a complete program (a test runs
//! it: `cargo run --release -p pagetrack-vmm --example watch`).
//!
//! 1. **Create the VM** ([`Vm::new`] opens `/dev/kvm`; [`HostCaps`] says what the host offers)
//!    and give it RAM ([`Vm::add_ram`]: anonymous memory at a guest-physical address).
//! 2. **Load the guest** through [`Vm::untracked_memory`] (nothing is tracked yet) and set up a
//!    vCPU ([`Vm::create_vcpu`]; [`Vcpu::fd`] is kvm-ioctls' `VcpuFd` for registers).
//! 3. **Register a notifier** on the consumer view [`Vm::tracker`] and **track frames**
//!    (`add_gfn`): from now on the guest's stores to them exit and are reported.
//! 4. **Run** ([`Vcpu::run`]): trapped stores are completed and reported inside it; port I/O,
//!    MMIO and other exits come back as an [`Exit`] (or go to an [`IoHandler`]).
//! 5. **Write as a device** through [`Vm::memory`] (vm-memory's `Bytes`): tracked frames get
//!    an event with [`Source::Device`](pagetrack::Source::Device).
//!
//! ```no_run
//! use std::sync::Arc;
//! use pagetrack::{Gfn, NotifierClass, TrackNotifier, WriteEvent};
//! use pagetrack_kvm::{Exit, Vm, VmConfig};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! struct Print;
//! impl TrackNotifier for Print {
//!     fn track_write(&self, e: &WriteEvent<'_>) {
//!         println!("{} wrote {:02x?} at {:#x} (was {:02x?})", e.source, e.new, e.gpa.0, e.old);
//!     }
//! }
//!
//! // 1. The VM and 16 MiB of RAM at 0.
//! let vm = Vm::new(VmConfig::default().with_ram(16 << 20))?;
//! vm.add_ram(0, 16 << 20)?;
//! // 2. The guest, loaded before anything is tracked (here: `hlt`), and its vCPU.
//! vm.untracked_memory().write_slice(&[0xf4], GuestAddress(0x1000))?;
//! let mut vcpu = vm.create_vcpu(0)?;
//! // ... set the vCPU's registers through `vcpu.fd()` (pagetrack-vmm's x86 module does) ...
//! // 3. A notifier, and frame 0x5 tracked.
//! let _handle = vm.tracker().register(Arc::new(Print), NotifierClass::Ordinary)?;
//! vm.tracker().add_gfn(Gfn(0x5))?;
//! // 4. Run until an exit pagetrack does not handle itself.
//! let exit: Exit = vcpu.run()?;
//! println!("{exit:?}");
//! // 5. A device (DMA) write into the tracked frame: reported too.
//! vm.memory().write_slice(&[0xde, 0xad], GuestAddress(0x5100))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## How it is built
//!
//! Three parts, and the façade ([`Vm`], [`Vcpu`]) on top of them:
//!
//! - **The enforcer** (`vm.rs` `Backend`, `slots.rs`): implements
//!   [`pagetrack::Enforcement`] and owns the fragment table (which KVM memslot covers which
//!   frames, read-only or writable). It reaches KVM only through a small slot-operations
//!   seam (create and delete a memslot, take its dirty log) and pauses vCPUs through a
//!   pauser whose built-in implementation is the gate (`gate.rs`); its re-cut and undo are
//!   unit-tested against a fake KVM that fails any chosen ioctl.
//! - **TrackedRam** (`ram.rs`): guest memory, the frame locks, page-table coherence and the
//!   dirty log of the stores pagetrack applies. Its commit is the only code that writes guest
//!   memory: it takes the planned writes (address, old bytes, new bytes), stores them,
//!   reports them to the core and returns the frames whose translations went stale, which the
//!   caller has the enforcer invalidate. Trapped stores, `rep` elements, re-executed locked
//!   read-modify-writes, emulated stores and device writes ([`TrackedMemory`]) all end there.
//! - **The exit handler** ([`ExitHandler`]): what a VMM's own run loop calls; it completes
//!   trapped stores (planning them with `pagetrack-x86`, committing through TrackedRam) and
//!   hands every other exit back ([`Ran::Exit`]). [`Vcpu::run`] is the façade's loop around it.
//!
//! Either way the [`Vm`] owns the core tracker: it changes its memslots (as it registers
//! RAM with KVM) and reports the writes it applies. Consumers get the
//! [`Tracking`](pagetrack::Tracking) view from [`Vm::tracker`] (register notifiers, add and
//! remove tracked frames, query), which cannot change memslots or forge reports.
//!
//! Exits reach the VMM with their payload: the façade's [`Exit`] carries every byte of port
//! output (a `rep outs` included) and KVM's data for system-event, debug and memory-fault
//! exits, and its [`IoHandler`] answers port and MMIO reads, `rdmsr` and hypercalls in
//! `kvm_run` in place; an embedding VMM gets kvm-ioctls' borrowed `VcpuExit` itself
//! ([`Ran::Exit`]).
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
//!    signal (`SIGRTMIN + 5`), unless the VMM hands it its own kick signal
//!    ([`VmConfig::with_kick_signal`] with [`KickSignal::Vmm`]: pagetrack then installs
//!    nothing and sends that). When the [`Vm`] and its clones are gone, pagetrack's memslots
//!    are deleted and the VM is left to the VMM.
//! 2. **Memory**: the VMM maps its guest memory (memfd, hugetlbfs, a snapshot file) as
//!    `vm_memory::GuestRegionMmap`s and registers each with [`Vm::add_region`] (pagetrack
//!    maps nothing; KVM's memslots for the range are pagetrack's, in the id range above).
//!    Guest memory the VMM and its devices write must go through [`Vm::memory`] to be
//!    tracked (see "Device writes" below); writes through its own mapping bypass tracking.
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
//! ## Device writes
//!
//! [`Vm::memory`] is a [`TrackedMemory`]: it implements vm-memory's
//! [`Bytes<GuestAddress>`](vm_memory::Bytes), every method of it, so a device model written
//! against that trait (as rust-vmm device crates are) writes guest memory through tracking
//! without a change: slices and objects, [`read_volatile_from`](vm_memory::Bytes::read_volatile_from)
//! a file or socket (through a bounce buffer), atomic [`store`](vm_memory::Bytes::store). Each
//! write to a tracked frame is reported with its old and new bytes and
//! [`Source::Device`](pagetrack::Source::Device), under the same frame locks as guest stores.
//!
//! ```no_run
//! use vm_memory::{Bytes, GuestAddress};
//!
//! /// A device model that knows nothing of pagetrack.
//! fn complete<M: Bytes<GuestAddress>>(mem: &M, used: GuestAddress, idx: u16) -> Result<(), M::E> {
//!     mem.write_obj(512u32, GuestAddress(used.0 + 4))?;
//!     mem.store(idx, used, std::sync::atomic::Ordering::Release)
//! }
//!
//! let vm = pagetrack_kvm::Vm::new(pagetrack_kvm::VmConfig::default().with_ram(16 << 20))?;
//! vm.add_ram(0, 16 << 20)?;
//! complete(&vm.memory(), GuestAddress(0x5000), 1)?; // tracked frames get their events
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`TrackedMemory`] is **not** a [`vm_memory::GuestMemory`], and cannot soundly be one:
//! that trait's [`get_slices`](vm_memory::GuestMemory::get_slices) (and a backend's regions)
//! hand out `VolatileSlice`s whose writes, and raw pointers, go straight to the mapping with
//! no frame lock, no old bytes and no event, and vm-memory implements `Bytes` for every
//! `GuestMemory` on top of them (so it could not even keep the tracked `Bytes` above). A
//! crate that requires `M: GuestMemory`, such as virtio-queue's `Queue` (descriptor
//! chains, used-ring updates), therefore runs on the VMM's own `GuestMemoryMmap` or
//! [`Vm::untracked_memory`], and its writes are not tracked. The supported route: keep
//! virtqueue rings in frames that are not tracked, let the queue crate parse descriptors
//! there, and move buffer data (what a device writes into guest buffers) through
//! [`TrackedMemory`]'s `Bytes` methods. [`Vm::untracked_memory`] is the one view that bypasses
//! tracking, and says so in its name.
//!
//! ## Pausing vCPUs
//!
//! Tracking a frame re-cuts KVM memslots with every vCPU outside `KVM_RUN`. vCPUs are kicked
//! out by KVM's documented protocol: `kvm_run.immediate_exit` is set, then the thread gets a
//! real-time signal (`SIGRTMIN + 5`, with a no-op handler pagetrack installs once per
//! process, or the signal [`VmConfig::kick`] names). One kick per vCPU suffices; nothing
//! polls.
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
//! call. [`Vm::checkpoint`] and [`Vm::restore`] share that harvest (snapshot reset: restore
//! writes back exactly the pages written since the checkpoint, tracked frames with events).
//!
//! With [`VmConfig::with_dirty_ring`] every one of those harvests reads the vCPUs' dirty
//! rings instead (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL` where offered: every ring, then
//! `KVM_RESET_DIRTY_RINGS`, then the entries are dispatched by memslot id to every consumer),
//! and relaxed frames' coalesced events name their first writer
//! ([`pagetrack::WriteEvent::first_writer`]). KVM then keeps no bitmap for any memslot: a
//! VMM's own slots get their pages from [`Vm::take_vmm_ring_dirty`], and its run loop must go
//! through [`ExitHandler::run`], which handles `KVM_EXIT_DIRTY_RING_FULL` itself.
//!
//! The KVM integration tests live in `pagetrack-testkit/tests/kvm` (they boot guests with
//! pagetrack-vmm, which depends on this crate).
#![deny(unsafe_code)]
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
compile_error!("pagetrack-kvm supports x86_64 Linux hosts only");

mod atomic;
mod checkpoint;
mod cooling;
mod dirty;
mod error;
mod gate;
mod handler;
mod memory;
mod pvmsr;
mod ram;
mod relaxed;
mod ring;
mod slots;
mod store;
mod string;
mod sys;
mod update;
mod vcpu;
mod vm;

pub use checkpoint::{CheckpointReport, Invalidate, RestoreReport};
pub use error::{Error, InstructionBytes, Result, StopReason};
pub use handler::{ExitHandler, Handled, Ran, Tracked};
pub use memory::TrackedMemory;
/// The store emulator (moved to [`pagetrack_x86::emulate`]).
pub use pagetrack_x86::emulate;
/// The guest page walker (moved to [`pagetrack_x86::walk`]).
pub use pagetrack_x86::walk;
pub use relaxed::{RelaxedConfig, RelaxedMode, RelaxedStats, SyncReport};
pub use ring::RingStats;
pub use slots::FragmentStats;
pub use update::PageTableUpdate;
pub use vcpu::{Exit, ExitBudget, IoData, IoHandler, Vcpu, VcpuStopper};
pub use vm::{
    DirtyHarvester, DirtyProtect, DirtyRing, HostCaps, KickSignal, KvmSlotIds, SyncRequester, Vm,
    VmConfig, VmStats,
};
