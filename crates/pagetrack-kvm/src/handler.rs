//! The exit handler: the part of a vCPU's run loop that is pagetrack's, for a VMM that keeps
//! its own loop, threads and device dispatch ([`crate::Vcpu::run`] is built on it too).
//!
//! One [`ExitHandler`] per vCPU, used on the thread that runs the vCPU. In place of
//! `vcpu_fd.run()` the VMM calls [`ExitHandler::run`], which passes the vCPU gate (so pauses
//! for memslot changes can kick it: `immediate_exit` plus a signal), runs `KVM_RUN` once and
//! sorts the exit:
//!
//! - [`Ran::Tracked`]: an exit that is pagetrack's (a store to a tracked frame, a load of RAM
//!   during a re-cut, an emulation failure, a kick, an MSR write pagetrack filters). The VMM
//!   passes it to [`ExitHandler::handle`], which completes and reports the store (locked
//!   read-modify-writes, `rep` continuations, refused-store completions, single-stepping)
//!   and returns [`Handled::Done`], then calls `run` again. Until `handle` returns, the
//!   address-space lock is held shared ([`crate::update`]): page-table updates wait.
//! - [`Ran::Exit`]: kvm-ioctls' own [`VcpuExit`], borrowing `kvm_run` (port and MMIO data are
//!   answered in place), for the VMM's device dispatch.
//! - [`Ran::Stopped`], [`Ran::ExitLimit`]: [`crate::VcpuStopper::stop`] or the
//!   [`ExitBudget`].
//!
//! Ordering, as the gate and the address-space lock need it (see `gate.rs`, `update.rs`): the
//! shared lock is taken right after `KVM_RUN` returns, still inside the gate; an MMIO exit
//! pagetrack handles leaves the gate with a continuation (KVM may finish the instruction at
//! the next entry, so pauses wait for that entry, which is kicked); the budget is taken
//! before the entry and settled after it; single-stepping re-enters kicked.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use pagetrack::Source;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemory, Permissions};

use crate::atomic;
use crate::error::{Error, Result, StopReason};
use crate::memory::{apply_write, read_ram};
use crate::vcpu::{Exit, ExitBudget, IoData, VcpuStopper};
use crate::vm::VmInner;

/// RFLAGS.TF.
const RFLAGS_TF: u64 = 1 << 8;
/// DR6.BS: the #DB came from single-stepping.
const DR6_BS: u64 = 1 << 14;

/// pagetrack's share of one vCPU's run loop (module docs). Made by
/// [`Vm::exit_handler`](crate::Vm::exit_handler); use it on the thread that runs the vCPU.
pub struct ExitHandler {
    index: u32,
    vm: Arc<VmInner>,
    stop: Arc<AtomicBool>,
    sync_regs: bool,
    sync_sregs: bool,
    budget: Option<ExitBudget>,
    /// Exits so far (for the stall check).
    exits: u64,
    /// RIP and exit count at the last interrupted `KVM_RUN`.
    last_interrupt: Option<(u64, u64)>,
    /// A trapped store ran with RFLAGS.TF set: the next `KVM_RUN` completes it and returns
    /// at once (`immediate_exit`), and the single-step #DB is delivered then unless KVM
    /// queued it (see [`ExitHandler::deliver_single_step`]).
    single_step: bool,
    /// The previous exit left the gate with a continuation: the next entry happens even
    /// when stopped or out of budget.
    pub(crate) continuing: bool,
    /// MMIO exits returned to the caller keep their continuation too ([`crate::Vcpu`], whose
    /// `run` handles device reads itself and drops the continuation when it returns).
    device_continues: bool,
    /// The first fragment of what may be a locked read-modify-write straddling two frames,
    /// held back: the next `KVM_RUN` is entered with `immediate_exit`, and either brings the
    /// second fragment (then both are handled as one store) or none (then this is handled
    /// alone). See [`ExitHandler::hold_split`].
    split: Option<Held>,
}

/// A trapped store fragment held back by [`ExitHandler::hold_split`].
#[derive(Debug)]
struct Held {
    gpa: u64,
    data: IoData,
}

impl std::fmt::Debug for ExitHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitHandler")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// What one [`ExitHandler::run`] came back with.
#[derive(Debug)]
#[must_use]
pub enum Ran<'f> {
    /// pagetrack's exit: pass it to [`ExitHandler::handle`], then run again.
    Tracked(Tracked),
    /// An exit for the VMM (port I/O, device MMIO, `hlt`, shutdown, ...), as kvm-ioctls
    /// decoded it.
    Exit(VcpuExit<'f>),
    /// [`VcpuStopper::stop`] was called; the vCPU did not enter.
    Stopped,
    /// The [`ExitBudget`] is spent; the vCPU did not enter.
    ExitLimit,
}

/// An exit [`ExitHandler::handle`] completes. While it exists, page-table updates
/// ([`crate::Vm::page_table_update`]) wait: handle it at once.
#[derive(Debug)]
#[must_use = "pass it to ExitHandler::handle"]
pub struct Tracked {
    kind: Kind,
    _completion: Completion,
}

#[derive(Debug)]
enum Kind {
    /// `KVM_RUN` returned EINTR/EAGAIN (a kick) after running `ran`: single-step or stall
    /// check.
    Interrupted { ran: std::time::Duration },
    /// A store to guest RAM (a tracked frame, or one in a re-cut).
    Store { gpa: u64, data: IoData },
    /// The two fragments of one store straddling two tracked frames: the one held back at
    /// the previous exit, then this exit's.
    SplitStore { first: Held, gpa: u64, data: IoData },
    /// Nothing left to do (a RAM load served in place, `KVM_EXIT_INTR`).
    Served,
    /// `KVM_EXIT_INTERNAL_ERROR`: a store KVM could not emulate, if its suberror says so.
    Internal,
    /// A filtered `wrmsr` (see `pvmsr.rs`).
    Wrmsr { index: u32, data: u64 },
    /// `KVM_EXIT_DIRTY_RING_FULL`: the rings are harvested and reset before the vCPU may
    /// enter again (`ring.rs`).
    RingFull,
}

/// The address-space lock held shared, without a borrow (see `update.rs`).
#[derive(Debug)]
struct Completion {
    vm: Arc<VmInner>,
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.vm.backend.updates.release_shared();
    }
}

/// What [`ExitHandler::handle`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
#[non_exhaustive]
pub enum Handled {
    /// Completed (and reported); run the vCPU again.
    Done,
    /// Not pagetrack's after all, for the VMM: an emulation failure that is not a store
    /// ([`Exit::InternalError`]), or a store to memory that stopped being RAM meanwhile
    /// ([`Exit::MmioWrite`]).
    NotMine(Exit),
}

impl ExitHandler {
    pub(crate) fn new(
        index: u32,
        fd: &mut VcpuFd,
        vm: Arc<VmInner>,
        device_continues: bool,
    ) -> ExitHandler {
        // Registers come with every exit through kvm_run where KVM offers it (no ioctl).
        let sync_regs = vm.caps.sync_regs & kvm_bindings::KVM_SYNC_X86_REGS != 0;
        if sync_regs {
            fd.set_sync_valid_reg(SyncReg::Register);
        }
        // And the system registers (CR3, FS/GS bases, mode), fresh with every exit.
        let sync_sregs = vm.caps.sync_regs & kvm_bindings::KVM_SYNC_X86_SREGS != 0;
        if sync_sregs {
            fd.set_sync_valid_reg(SyncReg::SystemRegister);
        }
        ExitHandler {
            index,
            vm,
            stop: Arc::new(AtomicBool::new(false)),
            sync_regs,
            sync_sregs,
            budget: None,
            exits: 0,
            last_interrupt: None,
            single_step: false,
            continuing: false,
            device_continues,
            split: None,
        }
    }

    pub(crate) fn vm(&self) -> &Arc<VmInner> {
        &self.vm
    }

    /// The vCPU index (the event [`Source::Vcpu`] number).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Limits the exits of this vCPU (and of every vCPU given a clone of `budget`).
    pub fn set_exit_budget(&mut self, budget: Option<ExitBudget>) {
        self.budget = budget;
    }

    /// A handle that stops this vCPU from another thread: its next [`ExitHandler::run`]
    /// returns [`Ran::Stopped`].
    pub fn stopper(&self) -> VcpuStopper {
        VcpuStopper {
            vm: Arc::clone(&self.vm),
            index: self.index,
            flag: Arc::clone(&self.stop),
        }
    }

    fn gate_index(&self) -> usize {
        usize::try_from(self.index).expect("u32 fits usize on x86_64")
    }

    /// Runs `fd` (this handler's vCPU) once through the gate: `KVM_RUN` and the sorting of
    /// its exit (module docs). Call it on the thread that runs the vCPU, in place of
    /// `fd.run()`.
    ///
    /// # Errors
    /// A failed `KVM_RUN` (but EINTR/EAGAIN, which are [`Ran::Tracked`]).
    pub fn run<'f>(&mut self, fd: &'f mut VcpuFd) -> Result<Ran<'f>> {
        let idx = self.gate_index();
        // Out of budget with an instruction to finish: this entry only finishes it
        // (`immediate_exit`), uncounted, and the next one returns `ExitLimit`.
        let (budgeted, finish_only) = match &self.budget {
            Some(b) if !b.reserve() => {
                if !self.continuing {
                    return Ok(Ran::ExitLimit);
                }
                (false, true)
            }
            Some(_) => (true, false),
            None => (false, false),
        };
        let kick = crate::sys::VcpuKick::current(fd, self.vm.kick_signal);
        if self.single_step || finish_only || self.split.is_some() {
            kick.arm();
        }
        let vm = Arc::clone(&self.vm);
        let Some(mut inside) = vm.backend.gate.enter(idx, &self.stop, kick) else {
            if let (Some(b), true) = (&self.budget, budgeted) {
                b.refund();
            }
            self.stop.store(false, Ordering::SeqCst);
            self.continuing = false;
            return Ok(Ran::Stopped);
        };
        let entered = std::time::Instant::now();
        let mut res = fd.run();
        let ran = entered.elapsed();
        // Still inside the gate: a page-table update waits for this exit's completion
        // (held until the exit is handled; see `update.rs`).
        vm.backend.updates.acquire_shared();
        let completion = Completion {
            vm: Arc::clone(&vm),
        };
        let mut kind = match &mut res {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Some(Kind::Interrupted { ran })
            }
            Err(_) => None,
            Ok(VcpuExit::MmioWrite(gpa, data)) => vm
                .mem
                .memory()
                .check_range(GuestAddress(*gpa), data.len(), Permissions::ReadWrite)
                .then(|| Kind::Store {
                    gpa: *gpa,
                    data: IoData::new(data),
                }),
            Ok(VcpuExit::MmioRead(gpa, data)) => read_ram(&vm, *gpa, data).then(|| {
                vm.backend
                    .counters
                    .ram_reads_served
                    .fetch_add(1, Ordering::Relaxed);
                Kind::Served
            }),
            Ok(VcpuExit::InternalError) => Some(Kind::Internal),
            Ok(VcpuExit::X86Wrmsr(msr)) => Some(Kind::Wrmsr {
                index: msr.index,
                data: msr.data,
            }),
            Ok(VcpuExit::Intr) => Some(Kind::Served),
            // kvm-ioctls 0.25 does not decode exit 31.
            Ok(VcpuExit::Unsupported(reason))
                if *reason == kvm_bindings::KVM_EXIT_DIRTY_RING_FULL
                    && vm.backend.rings.is_some() =>
            {
                Some(Kind::RingFull)
            }
            Ok(_) => None,
        };
        if let Some(first) = self.split.take() {
            kind = self.join_split(first, kind);
        }
        // An MMIO exit may be one fragment of a store or load KVM finishes at the next
        // entry: until then, pauses wait for this vCPU (`gate.rs`).
        let mmio = matches!(res, Ok(VcpuExit::MmioWrite(..) | VcpuExit::MmioRead(..)));
        self.continuing = mmio && (kind.is_some() || self.device_continues);
        if self.continuing {
            inside.continues();
        }
        // Leaves the gate (and resets `immediate_exit`); a panic in `run` leaves it too.
        drop(inside);
        if let (Some(b), true) = (&self.budget, budgeted) {
            match &res {
                Err(_) => b.refund(),
                Ok(_) => b.spend(),
            }
        }
        if res.is_ok() {
            self.exits += 1;
        }
        match kind {
            Some(kind) => Ok(Ran::Tracked(Tracked {
                kind,
                _completion: completion,
            })),
            None => {
                // The VMM's exit: its handling may update page tables.
                drop(completion);
                if res.is_ok() {
                    // Memory becomes observable to the VMM (a system call, `out` to a
                    // device, the end of the run): relaxed frames' changes are delivered
                    // first (`relaxed.rs`).
                    crate::relaxed::at_exit(&vm)?;
                }
                res.map(Ran::Exit).map_err(|source| Error::Kvm {
                    op: "KVM_RUN",
                    source,
                })
            }
        }
    }

    /// Completes and reports a [`Ran::Tracked`] exit of `fd` (the vCPU [`ExitHandler::run`]
    /// ran). Notifiers run here, on this thread.
    ///
    /// # Errors
    /// A store that cannot be completed ([`Error::Unemulatable`]), an MSR write naming a
    /// tracked frame ([`Error::KvmWritesTracked`]), a failed ioctl.
    pub fn handle(&mut self, tracked: Tracked, fd: &mut VcpuFd) -> Result<Handled> {
        let vm = Arc::clone(&self.vm);
        // Pauses taken here (a notifier adding a track) do not wait for this vCPU's own
        // continuation (`gate.rs`).
        let _here = vm.backend.gate.here(self.gate_index());
        match tracked.kind {
            Kind::Interrupted { .. } if self.split.is_some() => {
                // KVM had no further fragment: the held store was the whole store.
                if let Some(Held { gpa, data }) = self.split.take() {
                    return self.store(fd, gpa, data);
                }
            }
            Kind::Interrupted { ran } => {
                if std::mem::take(&mut self.single_step) {
                    // The trapped instruction (one `rep` element) is complete: the CPU
                    // raises the single-step #DB now. KVM's emulator queues it itself on
                    // hardware hosts; PVM's does not (observed: the trap after every
                    // trapped store was lost, and a `rep` ran to its end unstepped).
                    if !self.rep_left_at_zero(fd)? {
                        self.deliver_single_step(fd)?;
                    }
                } else {
                    self.check_stall(fd, ran)?;
                }
                // The stall monitor's kicks double as the relaxed frames' periodic sync.
                crate::relaxed::periodic(&vm)?;
            }
            Kind::Store { gpa, data } => {
                self.multi_store(fd, gpa, data.as_slice())?;
                if self.hold_split(fd, gpa, &data)? {
                    self.split = Some(Held { gpa, data });
                    return Ok(Handled::Done);
                }
                return self.store(fd, gpa, data);
            }
            Kind::SplitStore { first, gpa, data } => {
                self.multi_store(fd, gpa, data.as_slice())?;
                self.split_store(fd, first, gpa, data)?;
            }
            Kind::Served => {}
            Kind::Internal => {
                let suberror = crate::sys::internal_error_suberror(fd);
                if suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
                    return Ok(Handled::NotMine(Exit::InternalError { suberror }));
                }
                let stepping = self.stepping_now(fd)?;
                crate::store::complete(&vm, fd, self.index)?;
                if stepping {
                    self.deliver_single_step(fd)?;
                }
            }
            Kind::Wrmsr { index, data } => self.wrmsr(fd, index, data)?,
            Kind::RingFull => {
                if let Some(rings) = &vm.backend.rings {
                    rings.collect_full(&vm.backend.vm_fd)?;
                }
            }
        }
        Ok(Handled::Done)
    }

    /// A trapped store of one fragment, as KVM reported it: a locked read-modify-write made
    /// atomic, or applied and reported as it is (then the `rep` completion may continue it).
    fn store(&mut self, fd: &mut VcpuFd, gpa: u64, data: IoData) -> Result<Handled> {
        let vm = Arc::clone(&self.vm);
        let source = Source::Vcpu(self.index);
        let counters = &vm.backend.counters;
        let stepping = self.stepping(fd);
        if self.locked_rmw(fd, &[(gpa, data.as_slice())])? {
            self.single_step |= stepping;
            return Ok(Handled::Done);
        }
        if !apply_write(&vm, gpa, data.as_slice(), source) {
            self.not_mine();
            return Ok(Handled::NotMine(Exit::MmioWrite { gpa, data }));
        }
        counters.trapped_writes.fetch_add(1, Ordering::Relaxed);
        counters
            .trapped_bytes
            .fetch_add(data.as_slice().len() as u64, Ordering::Relaxed);
        if stepping {
            // One element at a time, as the CPU: no completion ahead of it.
            self.single_step = true;
        } else if !self.promote_rep(fd) {
            self.continue_string_store(fd, gpa, data.as_slice());
        }
        // Relaxed mode's auto policy (a hot frame is promoted here, as a notifier adding a
        // track would pause) and periodic sync.
        crate::relaxed::after_trap(&vm, gpa)?;
        Ok(Handled::Done)
    }

    /// Whether to hold a trapped store back as the possible first fragment of a locked
    /// read-modify-write straddling two frames (issue 10 item 6). KVM emulates such an
    /// instruction against read-only fragments as a read, then a store it splits at the page
    /// boundary into one MMIO exit per tracked page; the second comes only at the next entry
    /// (`complete_emulated_mmio`), and neither alone is the operand the instruction names.
    /// Held: a fragment shorter than 8 bytes that ends exactly at a page end, with a lock or
    /// xchg byte before RIP (64-bit mode, synced registers). Anything else costs one compare.
    fn hold_split(&mut self, fd: &mut VcpuFd, gpa: u64, data: &IoData) -> Result<bool> {
        let len = data.as_slice().len() as u64;
        if !self.sync_regs || len >= 8 || (gpa & 0xfff) + len != 0x1000 {
            return Ok(false);
        }
        let rip = fd.sync_regs().regs.rip;
        let sys = self.sys_state(fd)?;
        let mem = self.vm.mem.memory();
        Ok(pagetrack_x86::atomic::lock_byte_before(&*mem, &sys, rip))
    }

    /// At the exit after a held fragment (entered with `immediate_exit`, so KVM only
    /// finished the pending instruction): a store at the start of a page whose length
    /// completes the held one at most 8 bytes is its second fragment, and both become one
    /// [`Kind::SplitStore`]. KVM returning EINTR means no further fragment: the held store is
    /// handled alone when the interruption is ([`ExitHandler::handle`]). Any other exit
    /// cannot follow a pending fragment, but if it does, the held store is applied first, as
    /// KVM reported it, so that nothing is lost.
    fn join_split(&mut self, first: Held, kind: Option<Kind>) -> Option<Kind> {
        match kind {
            Some(Kind::Store { gpa, data })
                if gpa & 0xfff == 0 && first.data.as_slice().len() + data.as_slice().len() <= 8 =>
            {
                Some(Kind::SplitStore { first, gpa, data })
            }
            Some(Kind::Interrupted { ran }) => {
                self.split = Some(first);
                Some(Kind::Interrupted { ran })
            }
            other => {
                self.apply_held(&first);
                other
            }
        }
    }

    /// Applies and reports a held fragment as KVM reported it.
    fn apply_held(&self, held: &Held) {
        let vm = &self.vm;
        if apply_write(vm, held.gpa, held.data.as_slice(), Source::Vcpu(self.index)) {
            let c = &vm.backend.counters;
            c.trapped_writes.fetch_add(1, Ordering::Relaxed);
            c.trapped_bytes
                .fetch_add(held.data.as_slice().len() as u64, Ordering::Relaxed);
        }
    }

    /// Both fragments of a store straddling two tracked frames: a locked read-modify-write
    /// proven to be exactly this store is re-executed under both frames' locks against the
    /// current memory (KVM's two fragments are not applied); otherwise both fragments are
    /// applied and reported as KVM reported them.
    fn split_store(&mut self, fd: &mut VcpuFd, first: Held, gpa: u64, data: IoData) -> Result<()> {
        let stepping = self.stepping(fd);
        let first_gpa = first.gpa;
        let frags = [(first.gpa, first.data.as_slice()), (gpa, data.as_slice())];
        if !self.locked_rmw(fd, &frags)? {
            self.apply_held(&first);
            self.apply_held(&Held { gpa, data });
        }
        self.single_step |= stepping;
        crate::relaxed::after_trap(&Arc::clone(&self.vm), first_gpa)?;
        Ok(())
    }

    /// A handled MMIO exit goes back to the caller: it no longer keeps pauses waiting
    /// (unless the façade's run loop, which drops it when it returns).
    fn not_mine(&mut self) {
        if !self.device_continues && std::mem::take(&mut self.continuing) {
            self.vm.backend.gate.end_continuation(self.gate_index());
        }
    }

    /// On `KVM_EXIT_SHUTDOWN` (triple fault): whether pagetrack caused it, a stack that
    /// exception delivery writes lying on a tracked frame ([`Error::EventDeliveryToTracked`]).
    ///
    /// # Errors
    /// That error, or a failed ioctl.
    pub fn check_shutdown(&mut self, fd: &mut VcpuFd) -> Result<()> {
        self.check_delivery_stacks(fd)
    }
}

impl Drop for ExitHandler {
    fn drop(&mut self) {
        // A held fragment is applied: never lost.
        if let Some(held) = self.split.take() {
            self.apply_held(&held);
        }
        // A vCPU that is never run again must not keep pauses waiting.
        if self.continuing {
            self.vm.backend.gate.end_continuation(self.gate_index());
        }
    }
}

impl ExitHandler {
    /// At a store exit: whether the instruction runs with RFLAGS.TF (from `kvm_run`, no
    /// ioctl; false on hosts without synced registers, where single-step traps after trapped
    /// stores are left to KVM).
    fn stepping(&mut self, fd: &mut VcpuFd) -> bool {
        self.sync_regs && fd.sync_regs().regs.rflags & RFLAGS_TF != 0
    }

    /// Whether the instruction at this exit runs with RFLAGS.TF (an ioctl without synced
    /// registers).
    fn stepping_now(&mut self, fd: &mut VcpuFd) -> Result<bool> {
        let rflags = self.exit_regs(fd)?.rflags;
        Ok(rflags & RFLAGS_TF != 0)
    }

    /// Whether RIP is on a `rep` string instruction with RCX = 0: KVM's emulator leaves the
    /// last element's instruction there (it finishes it when it runs again, with no element
    /// left), where the CPU has finished it. Running it on, the CPU finishes it at once and
    /// raises its own single-step #DB after it, which is where the native trap comes; a #DB
    /// injected here would be one too many. Decided in 64-bit mode only (elsewhere the trap
    /// is injected).
    fn rep_left_at_zero(&mut self, fd: &mut VcpuFd) -> Result<bool> {
        use iced_x86::{Decoder, DecoderOptions};
        let regs = fd.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        let sys = atomic::SysCache::from_sregs(&sregs);
        if !sys.long64 {
            return Ok(false);
        }
        let mut bytes = [0u8; 15];
        let n =
            crate::walk::read_virt_prefix(&*self.vm.mem.memory(), sys.cr3, regs.rip, &mut bytes);
        let insn = Decoder::with_ip(64, &bytes[..n], regs.rip, DecoderOptions::NONE).decode();
        if insn.is_invalid() || !insn.is_string_instruction() {
            return Ok(false);
        }
        let rep = insn.has_rep_prefix() || insn.has_repe_prefix() || insn.has_repne_prefix();
        // An address-size prefix (0x67) makes the count ECX.
        let prefixes = insn.len().saturating_sub(1).min(n);
        let count = if bytes[..prefixes].contains(&0x67) {
            regs.rcx & 0xffff_ffff
        } else {
            regs.rcx
        };
        Ok(rep && count == 0)
    }

    /// Raises the single-step #DB trap (DR6.BS set) at the current RIP, unless an exception
    /// is already pending or being delivered (a #PF the store raised, or KVM's own #DB).
    fn deliver_single_step(&mut self, fd: &mut VcpuFd) -> Result<()> {
        let mut events = fd
            .get_vcpu_events()
            .map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?;
        if events.exception.injected != 0 || events.exception.pending != 0 {
            return Ok(());
        }
        let mut dr = fd
            .get_debug_regs()
            .map_err(Error::kvm("KVM_GET_DEBUGREGS"))?;
        dr.dr6 |= DR6_BS;
        fd.set_debug_regs(&dr)
            .map_err(Error::kvm("KVM_SET_DEBUGREGS"))?;
        events.exception.injected = 1;
        events.exception.nr = 1;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        events.exception_has_payload = 0;
        fd.set_vcpu_events(&events)
            .map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))
    }

    /// At a shutdown (triple fault): if a stack that exception delivery writes lies on a
    /// tracked frame, the shutdown is pagetrack's doing (KVM cannot write the frame into a
    /// read-only memslot), so `run` stops with [`Error::EventDeliveryToTracked`] naming RIP
    /// and the frame. The stacks: in long mode the TSS's RSP0 and IST1-7 and, at CPL0, the
    /// current RSP (the 64 bytes below each, 16-byte aligned); in real mode the 6 bytes
    /// below SS:SP. Other modes are not checked.
    fn check_delivery_stacks(&mut self, fd: &mut VcpuFd) -> Result<()> {
        use crate::walk::{read_virt, translate};
        let regs = fd.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        let mem = self.vm.mem.memory();
        let tracked = |gpa: u64| self.vm.traps_stores(gpa);
        let mut frames: Vec<u64> = Vec::new(); // guest-physical bytes of candidate frames
        let sys = atomic::SysCache::from_sregs(&sregs);
        if sys.long64 {
            let tss = sregs.tr.base;
            let mut tops = Vec::new();
            for off in std::iter::once(4u64).chain((0..7).map(|i| 0x24 + 8 * i)) {
                let mut b = [0u8; 8];
                if read_virt(&*mem, sys.cr3, tss.wrapping_add(off), &mut b) {
                    tops.push(u64::from_le_bytes(b));
                }
            }
            if sregs.cs.dpl == 0 {
                tops.push(regs.rsp);
            }
            for top in tops.into_iter().filter(|&t| t != 0) {
                let top = top & !0xf;
                for at in [top.wrapping_sub(64), top.wrapping_sub(1)] {
                    if let Ok(t) = translate(&*mem, sys.cr3, at) {
                        frames.push(t.gpa);
                    }
                }
            }
        } else if sregs.cr0 & 1 == 0 {
            let sp = regs.rsp & 0xffff;
            for back in [6u64, 1] {
                frames.push(sregs.ss.base.wrapping_add(sp.wrapping_sub(back) & 0xffff));
            }
        }
        match frames.into_iter().find(|&g| tracked(g)) {
            Some(gpa) => Err(Error::EventDeliveryToTracked {
                vcpu: self.index,
                rip: regs.rip,
                gpa,
                gfn: gpa >> 12,
            }),
            None => Ok(()),
        }
    }

    /// A guest `wrmsr` that the MSR filter sent here: one of the MSRs that make KVM write
    /// guest memory itself (see [`crate::pvmsr`]). Forwarded to KVM, or refused with
    /// [`Error::KvmWritesTracked`] when it names a tracked frame (the guest then gets #GP if
    /// the VMM runs it on).
    fn wrmsr(&mut self, fd: &mut VcpuFd, msr: u32, data: u64) -> Result<()> {
        let rip = self.exit_regs(fd)?.rip;
        let vm = Arc::clone(&self.vm);
        let res = crate::pvmsr::handle_wrmsr(
            &vm.backend.kvm_written,
            &vm.tracker,
            fd,
            self.index,
            rip,
            msr,
            data,
        );
        let failed = !matches!(res, Ok(crate::pvmsr::Wrmsr::Done));
        crate::sys::set_msr_exit_error(fd, failed);
        res.map(drop)
    }

    /// After a trapped element of a `rep stos`/`rep movs` with many elements left: promotes
    /// the tracked frames its destination reaches (relaxed mode, [`crate::relaxed::before_rep`])
    /// instead of completing the page one exact event per element. True if the next
    /// element's frame is relaxed now: the instruction is left to KVM and the CPU as it
    /// stands (registers untouched, so DF, 32-bit addressing, segment overrides and the
    /// iterations KVM did are the CPU's business), and its stores become coalesced changes.
    /// Only the destination is decoded here; a wrong guess costs a promotion, never an
    /// element. The pages are walked in the order the CPU reaches them, up to the first one
    /// it could not store to (it faults there).
    fn promote_rep(&mut self, fd: &mut VcpuFd) -> bool {
        let vm = Arc::clone(&self.vm);
        let config = &vm.backend.relaxed.config;
        if !self.sync_regs
            || config.mode == crate::RelaxedMode::Off
            || config.rep_promote_elements == 0
        {
            return false;
        }
        let regs = fd.sync_regs().regs;
        let Ok(sys) = self.sys_state(fd) else {
            return false;
        };
        let mem = vm.mem.memory();
        let Some(span) = pagetrack_x86::rep::RepSpan::at(&*mem, &sys, &regs) else {
            return false;
        };
        if span.elements < config.rep_promote_elements {
            return false;
        }
        let dest: Vec<u64> = span
            .pages(crate::relaxed::rep_pages_max())
            .into_iter()
            .map_while(|page| {
                crate::walk::translate(&*mem, sys.cr3, page)
                    .ok()
                    .filter(|t| t.writable)
                    .map(|t| t.gpa & !0xfff)
            })
            .collect();
        drop(mem);
        crate::relaxed::before_rep(&vm, span.elements, &dest)
    }

    /// After a trapped element of a `rep stos`/`rep movs`, completes the rest of that page
    /// in userspace (see [`crate::string`]).
    fn continue_string_store(&mut self, fd: &mut VcpuFd, gpa: u64, data: &[u8]) {
        if !self.sync_regs {
            return;
        }
        let regs = fd.sync_regs().regs;
        let Ok(sys) = self.sys_state(fd) else {
            return; // left to the CPU
        };
        let mem = self.vm.mem.memory();
        if !code_fetchable(&*mem, sys.cr3, regs.rip) {
            return; // the CPU cannot fetch what is at RIP: it faults, pagetrack runs nothing
        }
        let vm = Arc::clone(&self.vm);
        if let Some((regs, n)) =
            crate::string::continue_rep(&vm, &mem, &sys, &regs, gpa, data.len(), self.index)
        {
            fd.sync_regs_mut().regs = regs;
            fd.set_sync_dirty_reg(SyncReg::Register);
            let c = &vm.backend.counters;
            c.string_elements.fetch_add(n, Ordering::Relaxed);
            c.trapped_bytes
                .fetch_add(n * data.len() as u64, Ordering::Relaxed);
        }
    }

    /// After an interrupted `KVM_RUN`: if the previous interruption found the same RIP and no
    /// exit happened since, and the instruction at RIP stores into a tracked frame, KVM is
    /// retrying it without ever exiting. Its state is the one before the instruction, so
    /// pagetrack completes the store itself, or stops with a typed error.
    ///
    /// Only a `KVM_RUN` that lasted at least half a [`crate::vm::STALL_PERIOD`] counts: the
    /// stall monitor kicks a vCPU only after a whole period inside one `KVM_RUN`, while the
    /// kicks of a pause (an address-space change on another thread, a track) can interrupt
    /// a vCPU twice before it ran a single instruction, which is no stall.
    fn check_stall(&mut self, fd: &mut VcpuFd, ran: std::time::Duration) -> Result<()> {
        if ran < crate::vm::STALL_PERIOD / 2 {
            return Ok(());
        }
        let regs = fd.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
        let now = (regs.rip, self.exits);
        if self.last_interrupt.replace(now) != Some(now) {
            return Ok(());
        }
        let sregs = fd.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        if !crate::store::stores_into_tracked(&self.vm, &regs, &sregs) {
            return Ok(());
        }
        self.last_interrupt = None;
        let stepping = regs.rflags & RFLAGS_TF != 0;
        crate::store::complete(&self.vm, fd, self.index).map_err(|e| match e {
            // Completed, then refused: the same error as when KVM stores the relaxed part
            // of a split lock itself (`store::complete`).
            e @ Error::Unemulatable {
                reason: crate::error::StopReason::SplitLockHalfTracked,
                ..
            } => e,
            Error::Unemulatable {
                vcpu,
                rip,
                bytes,
                reason,
            } => Error::Unemulatable {
                vcpu,
                rip,
                bytes,
                reason: crate::error::StopReason::RetriedWithoutExit(Box::new(reason)),
            },
            other => other,
        })?;
        if stepping {
            self.deliver_single_step(fd)?;
        }
        Ok(())
    }

    /// The system registers at this exit: from `kvm_run` (no ioctl) where KVM syncs them.
    fn sys_state(&mut self, fd: &mut VcpuFd) -> Result<atomic::SysCache> {
        Ok(atomic::SysCache::from_sregs(&self.exit_sregs(fd)?))
    }

    /// The general registers at this exit: from `kvm_run` (no ioctl) where KVM syncs them.
    fn exit_regs(&self, fd: &mut VcpuFd) -> Result<kvm_bindings::kvm_regs> {
        if self.sync_regs {
            Ok(fd.sync_regs().regs)
        } else {
            fd.get_regs().map_err(Error::kvm("KVM_GET_REGS"))
        }
    }

    /// The special registers at this exit: from `kvm_run` (no ioctl) where KVM syncs them.
    fn exit_sregs(&self, fd: &mut VcpuFd) -> Result<kvm_bindings::kvm_sregs> {
        if self.sync_sregs {
            Ok(fd.sync_regs().sregs)
        } else {
            fd.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))
        }
    }

    /// Before a trapped store is applied: if it is one push of an instruction KVM stored
    /// several times for (see [`pagetrack_x86::multistore`]), writes the pushes KVM dropped
    /// (a `pusha`: they lie on tracked frames, each with its event, in push order), or stops
    /// with [`Error::StoresLost`] when they cannot be rebuilt. The exit itself is applied by
    /// the caller.
    fn multi_store(&mut self, fd: &mut VcpuFd, gpa: u64, data: &[u8]) -> Result<()> {
        use pagetrack_x86::multistore::{Verdict, check_with};
        let regs = self.exit_regs(fd)?;
        let sregs = self.exit_sregs(fd)?;
        let mode = pagetrack_x86::mode::CpuMode::from_sregs(&sregs);
        let mem = self.vm.mem.memory();
        let frame_tracked = |g: u64| self.vm.traps_stores(g);
        match check_with(&*mem, &mode, &regs, gpa, data, &frame_tracked) {
            Verdict::Single => Ok(()),
            Verdict::Refuse { rip, bytes, reason } => Err(Error::StoresLost {
                vcpu: self.index,
                rip,
                bytes,
                reason,
            }),
            Verdict::Complete { stores, before, .. } => {
                let vm = Arc::clone(&self.vm);
                // Pushes KVM dropped are those into frames whose stores trap (a relaxed
                // frame is tracked but KVM wrote it).
                let tracked = |s: &pagetrack_x86::multistore::Store| {
                    (s.gpa >> 12..=(s.gpa + s.bytes.len() as u64 - 1) >> 12)
                        .any(|f| vm.traps_stores(f << 12))
                };
                // The exit's slot straddles two frames and its lower piece was an exit of its
                // own, at which the other pushes were written: this exit is only its piece.
                if before.iter().any(tracked) {
                    return Ok(());
                }
                for s in stores {
                    // Pushes to frames KVM can write landed there; the others were dropped.
                    if tracked(&s) && apply_write(&vm, s.gpa, &s.bytes, Source::Vcpu(self.index)) {
                        let c = &vm.backend.counters;
                        c.trapped_writes.fetch_add(1, Ordering::Relaxed);
                        c.trapped_bytes
                            .fetch_add(s.bytes.len() as u64, Ordering::Relaxed);
                    }
                }
                Ok(())
            }
        }
    }

    /// Handles a trapped store that came from a locked read-modify-write: true if it was one
    /// (applied atomically, or a compare-exchange that failed), false for a plain store.
    fn locked_rmw(&mut self, fd: &mut VcpuFd, frags: &[(u64, &[u8])]) -> Result<bool> {
        let mem = self.vm.mem.memory();
        if !frags.iter().all(|(gpa, data)| {
            mem.check_range(GuestAddress(*gpa), data.len(), Permissions::ReadWrite)
        }) {
            return Ok(false);
        }
        let regs = self.exit_regs(fd)?;
        let sys = self.sys_state(fd)?;
        if !sys.long64 {
            self.refuse_compat_locked(fd, &regs, frags)?;
        }
        let vm = Arc::clone(&self.vm);
        let outcome = atomic::handle(&vm, &mem, &sys, &regs, frags, self.index);
        let counters = &vm.backend.counters;
        match outcome {
            atomic::Outcome::Plain => Ok(false),
            atomic::Outcome::Partial { rip, bytes } => {
                // KVM stored the other part itself, outside any lock, from its own read:
                // atomicity is lost already.
                Err(self.apply_and_stop(frags, rip, bytes, StopReason::SplitLockHalfTracked))
            }
            atomic::Outcome::FailedCompare => {
                counters.atomic_rmws.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            atomic::Outcome::Done(done, regs, _held) => {
                if self.sync_regs {
                    fd.sync_regs_mut().regs = *regs;
                    fd.set_sync_dirty_reg(SyncReg::Register);
                } else {
                    fd.set_regs(&regs).map_err(|source| Error::Kvm {
                        op: "KVM_SET_REGS",
                        source,
                    })?;
                }
                counters.atomic_rmws.fetch_add(1, Ordering::Relaxed);
                counters.trapped_writes.fetch_add(1, Ordering::Relaxed);
                let bytes: usize = done.writes.iter().map(|w| w.new.len()).sum();
                counters
                    .trapped_bytes
                    .fetch_add(bytes as u64, Ordering::Relaxed);
                Ok(true)
            }
        }
    }
}

impl ExitHandler {
    /// Outside 64-bit mode the locked path does not run. In compatibility mode a locked
    /// read-modify-write that provably made this store would lose its atomicity (KVM read
    /// and stored without a lock), so the store is applied as KVM reported it and the vCPU
    /// stops with [`Error::Unemulatable`] naming the instruction: never a silent lost update.
    fn refuse_compat_locked(
        &mut self,
        fd: &mut VcpuFd,
        regs: &kvm_bindings::kvm_regs,
        frags: &[(u64, &[u8])],
    ) -> Result<()> {
        let &[(gpa, data)] = frags else {
            return Ok(());
        };
        let sregs = self.exit_sregs(fd)?;
        let mem = self.vm.mem.memory();
        let Some((rip, bytes)) =
            pagetrack_x86::atomic::compat_locked(&*mem, &sregs, regs, gpa, data.len())
        else {
            return Ok(());
        };
        Err(self.apply_and_stop(frags, rip, bytes, StopReason::CompatLocked))
    }

    /// A locked read-modify-write that cannot be made atomic: KVM's store is applied as
    /// reported (the vCPU's own view stays right) and the vCPU stops with `reason`, rather
    /// than lose other vCPUs' updates silently.
    fn apply_and_stop(
        &mut self,
        frags: &[(u64, &[u8])],
        rip: u64,
        bytes: Vec<u8>,
        reason: StopReason,
    ) -> Error {
        for &(gpa, data) in frags {
            self.apply_held(&Held {
                gpa,
                data: IoData::new(data),
            });
        }
        Error::unemulatable(self.index, rip, bytes, reason)
    }
}

/// Whether the CPU can fetch an instruction at `rip` (its 15 bytes at most, so both pages
/// they may touch): every page-table level present and user-accessible, and none with the
/// NX bit (with EFER.NXE clear the bit is reserved and faults too). The `rep` completion
/// acts only on instructions the CPU would run itself. User-accessible is required at any
/// CPL (stricter than the CPU at CPL0, where the completion is then left to the CPU).
fn code_fetchable<M: GuestMemory + ?Sized>(mem: &M, cr3: u64, rip: u64) -> bool {
    [rip, rip.wrapping_add(14)].into_iter().all(|at| {
        crate::walk::translate(mem, cr3, at).is_ok_and(|t| {
            t.user
                && t.entries.iter().filter(|&&e| e != 0).all(|&e| {
                    mem.read_obj::<u64>(GuestAddress(e))
                        .is_ok_and(|v| v & crate::walk::pte::NX == 0)
                })
        })
    })
}
