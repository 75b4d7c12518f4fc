//! vCPUs: the run loop that applies trapped stores, reports them, and hands everything else
//! back to the VMM as a typed [`Exit`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use pagetrack::Source;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemory, Permissions};

use crate::atomic;

use crate::error::{Error, Result};
use crate::memory::{apply_write, read_ram};
use crate::vm::VmInner;

/// Up to 8 bytes of port or MMIO data, copied out of `kvm_run`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoData {
    bytes: [u8; 8],
    len: u8,
}

impl IoData {
    fn new(data: &[u8]) -> IoData {
        let mut d = IoData::default();
        let n = data.len().min(8);
        d.bytes[..n].copy_from_slice(&data[..n]);
        d.len = u8::try_from(n).expect("at most 8");
        d
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The first byte (0 if empty).
    pub fn first(&self) -> u8 {
        self.bytes[0]
    }

    /// The bytes as a little-endian integer.
    pub fn value(&self) -> u64 {
        u64::from_le_bytes(self.bytes)
    }
}

/// Why [`Vcpu::run`] returned. Stores to guest RAM never show up here: they are applied and
/// reported inside `run`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Exit {
    /// `out` to a port.
    IoOut {
        /// Port.
        port: u16,
        /// Data.
        data: IoData,
    },
    /// A store to guest-physical memory that is not RAM.
    MmioWrite {
        /// Address.
        gpa: u64,
        /// Data.
        data: IoData,
    },
    /// `hlt`.
    Hlt,
    /// Triple fault or similar.
    Shutdown,
    /// [`VcpuStopper::stop`] was called.
    Stopped,
    /// The vCPU's [`ExitBudget`] is spent: `run` returned without entering the guest.
    ExitLimit,
    /// `KVM_EXIT_FAIL_ENTRY`.
    FailEntry {
        /// Hardware reason.
        reason: u64,
    },
    /// `KVM_EXIT_INTERNAL_ERROR` that is not a store pagetrack could complete.
    InternalError {
        /// KVM's suberror.
        suberror: u32,
    },
    /// Any other exit KVM reported, by name.
    Other(&'static str),
}

/// What a VMM supplies for reads that are not guest RAM.
pub trait IoHandler: Send {
    /// `in` from `port`: fill `data` (default: all ones, an absent device).
    fn io_in(&mut self, port: u16, data: &mut [u8]) {
        let _ = port;
        data.fill(0xff);
    }

    /// A load from non-RAM `gpa`: fill `data` (default: all ones).
    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        let _ = gpa;
        data.fill(0xff);
    }
}

#[derive(Debug, Default)]
struct AbsentDevices;
impl IoHandler for AbsentDevices {}

/// Stops a running vCPU from another thread.
#[derive(Debug, Clone)]
pub struct VcpuStopper {
    vm: Arc<VmInner>,
    index: u32,
    flag: Arc<AtomicBool>,
}

impl VcpuStopper {
    /// Makes the vCPU's `run` return [`Exit::Stopped`] (now, or at its next call) and waits
    /// until it is outside `KVM_RUN`.
    pub fn stop(&self) {
        self.vm.backend.gate.stop(
            usize::try_from(self.index).unwrap_or(usize::MAX),
            &self.flag,
        );
    }
}

/// A limit on KVM exits, shared by the vCPUs it is given to ([`Vcpu::set_exit_budget`]).
///
/// Every exit from `KVM_RUN` counts, those `run` handles itself (trapped stores) included. A
/// vCPU takes one unit before it enters the guest and gives it back if `KVM_RUN` returns
/// without an exit (a signal), so the exits never exceed the limit; once it is spent, `run`
/// returns [`Exit::ExitLimit`] before entering the guest. With several vCPUs, one may be
/// refused while another holds the last unit inside the guest.
#[derive(Debug, Clone)]
pub struct ExitBudget {
    inner: Arc<BudgetInner>,
}

#[derive(Debug)]
struct BudgetInner {
    left: AtomicU64,
    used: AtomicU64,
}

impl ExitBudget {
    /// A budget of `max` exits.
    #[must_use]
    pub fn new(max: u64) -> ExitBudget {
        ExitBudget {
            inner: Arc::new(BudgetInner {
                left: AtomicU64::new(max),
                used: AtomicU64::new(0),
            }),
        }
    }

    /// The exits taken so far.
    #[must_use]
    pub fn used(&self) -> u64 {
        self.inner.used.load(Ordering::SeqCst)
    }

    fn reserve(&self) -> bool {
        self.inner
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
            .is_ok()
    }

    fn refund(&self) {
        self.inner.left.fetch_add(1, Ordering::SeqCst);
    }

    fn spend(&self) {
        self.inner.used.fetch_add(1, Ordering::SeqCst);
    }
}

/// One vCPU. Run it on one thread (`run(&mut self)`); it is `Send`.
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    vm: Arc<VmInner>,
    io: Box<dyn IoHandler>,
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
    /// queued it (see [`Vcpu::deliver_single_step`]).
    single_step: bool,
}

/// RFLAGS.TF.
const RFLAGS_TF: u64 = 1 << 8;
/// DR6.BS: the #DB came from single-stepping.
const DR6_BS: u64 = 1 << 14;

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Vcpu {
    pub(crate) fn new(index: u32, mut fd: VcpuFd, vm: Arc<VmInner>) -> Vcpu {
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
        Vcpu {
            index,
            fd,
            vm,
            io: Box::new(AbsentDevices),
            stop: Arc::new(AtomicBool::new(false)),
            sync_regs,
            sync_sregs,
            budget: None,
            exits: 0,
            last_interrupt: None,
            single_step: false,
        }
    }

    /// The vCPU index (the event [`Source::Vcpu`] number).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The KVM vCPU fd, for register set-up.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The KVM vCPU fd, mutably.
    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// Installs the handler for port and MMIO reads that are not guest RAM.
    pub fn set_io_handler(&mut self, io: Box<dyn IoHandler>) {
        self.io = io;
    }

    /// Limits the exits of this vCPU (and of every vCPU given a clone of `budget`).
    pub fn set_exit_budget(&mut self, budget: Option<ExitBudget>) {
        self.budget = budget;
    }

    /// A handle that stops this vCPU from another thread.
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

    /// Runs the guest until an exit the VMM must see. Stores to guest RAM that exit (tracked
    /// frames) are applied and reported here, with source `Vcpu(index)`; loads of RAM that exit
    /// (during a slot change) are served from guest memory.
    ///
    /// A vCPU that KVM keeps inside `KVM_RUN` without an exit and without moving RIP (pagetrack
    /// kicks it out every 50 ms to look) on an instruction that stores into a tracked frame
    /// (KVM retries an `sgdt` into a read-only slot forever) has that store completed here,
    /// or the run stops with [`Error::Unemulatable`]: it never stalls unnoticed.
    ///
    /// # Errors
    /// A failed `KVM_RUN`, or a store that cannot be completed ([`Error::Unemulatable`]).
    pub fn run(&mut self) -> Result<Exit> {
        let idx = self.gate_index();
        let here_vm = Arc::clone(&self.vm);
        // Until `run` returns: pauses taken by this thread's notifiers do not wait for this
        // vCPU's continuation, and returning drops it (see `gate.rs`).
        let _here = here_vm.backend.gate.running_here(idx);
        // The previous exit was an MMIO exit handled here: KVM may continue its instruction
        // at this entry, which therefore happens even when stopped or out of budget.
        let mut continuing = false;
        loop {
            // Out of budget with an instruction to finish: this entry only finishes it
            // (`immediate_exit`), uncounted, and the next one returns `ExitLimit`.
            let (budgeted, finish_only) = match &self.budget {
                Some(b) if !b.reserve() => {
                    if !continuing {
                        return Ok(Exit::ExitLimit);
                    }
                    (false, true)
                }
                Some(_) => (true, false),
                None => (false, false),
            };
            let kick = crate::sys::VcpuKick::current(&mut self.fd);
            if self.single_step || finish_only {
                kick.arm();
            }
            let Some(mut inside) = self.vm.backend.gate.enter(idx, &self.stop, kick) else {
                if let (Some(b), true) = (&self.budget, budgeted) {
                    b.refund();
                }
                self.stop.store(false, Ordering::SeqCst);
                return Ok(Exit::Stopped);
            };
            let vm = Arc::clone(&self.vm);
            let entered = std::time::Instant::now();
            let res = self.fd.run();
            let ran = entered.elapsed();
            // Still inside the gate: a page-table update waits for this exit's completion
            // (held until the exit is handled; see `update.rs`).
            let completing = vm.backend.updates.completing();
            // An MMIO exit may be one fragment of a store or load KVM finishes at the next
            // entry: until then, pauses wait for this vCPU (`gate.rs`).
            continuing = matches!(res, Ok(VcpuExit::MmioWrite(..) | VcpuExit::MmioRead(..)));
            if continuing {
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
            let exit = match res {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    if std::mem::take(&mut self.single_step) {
                        // The trapped instruction (one `rep` element) is complete: the CPU
                        // raises the single-step #DB now. KVM's emulator queues it itself on
                        // hardware hosts; PVM's does not (observed: the trap after every
                        // trapped store was lost, and a `rep` ran to its end unstepped).
                        if !self.rep_left_at_zero()? {
                            self.deliver_single_step()?;
                        }
                    } else {
                        self.check_stall(ran)?;
                    }
                    continue;
                }
                Err(e) => {
                    return Err(Error::Kvm {
                        op: "KVM_RUN",
                        source: e,
                    });
                }
                Ok(exit) => exit,
            };
            self.exits += 1;
            let source = Source::Vcpu(self.index);
            let counters = &vm.backend.counters;
            match exit {
                VcpuExit::MmioWrite(gpa, data) => {
                    let data = IoData::new(data);
                    let stepping = self.stepping();
                    if self.locked_rmw(gpa, data.as_slice())? {
                        self.single_step |= stepping;
                        continue;
                    }
                    if apply_write(&self.vm, gpa, data.as_slice(), source) {
                        counters.trapped_writes.fetch_add(1, Ordering::Relaxed);
                        counters
                            .trapped_bytes
                            .fetch_add(u64::from(data.len), Ordering::Relaxed);
                        if stepping {
                            // One element at a time, as the CPU: no completion ahead of it.
                            self.single_step = true;
                        } else {
                            self.continue_string_store(gpa, data.as_slice());
                        }
                        continue;
                    }
                    return Ok(Exit::MmioWrite { gpa, data });
                }
                VcpuExit::MmioRead(gpa, data) => {
                    if read_ram(&self.vm, gpa, data) {
                        counters.ram_reads_served.fetch_add(1, Ordering::Relaxed);
                    } else {
                        drop(completing); // the VMM's callback may update page tables
                        self.io.mmio_read(gpa, data);
                    }
                }
                VcpuExit::IoIn(port, data) => {
                    drop(completing);
                    self.io.io_in(port, data);
                }
                VcpuExit::IoOut(port, data) => {
                    return Ok(Exit::IoOut {
                        port,
                        data: IoData::new(data),
                    });
                }
                VcpuExit::Hlt => return Ok(Exit::Hlt),
                VcpuExit::Shutdown => {
                    self.check_delivery_stacks()?;
                    return Ok(Exit::Shutdown);
                }
                VcpuExit::FailEntry(reason, _) => return Ok(Exit::FailEntry { reason }),
                VcpuExit::InternalError => {
                    let suberror = crate::sys::internal_error_suberror(&mut self.fd);
                    if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
                        let stepping = self.stepping_now()?;
                        crate::store::complete(&self.vm, &self.fd, self.index)?;
                        if stepping {
                            self.deliver_single_step()?;
                        }
                        continue;
                    }
                    return Ok(Exit::InternalError { suberror });
                }
                VcpuExit::X86Wrmsr(msr) => {
                    let (index, value) = (msr.index, msr.data);
                    self.wrmsr(index, value)?;
                }
                VcpuExit::Intr => {}
                other => return Ok(Exit::Other(exit_name(&other))),
            }
        }
    }
}

impl Vcpu {
    /// At a store exit: whether the instruction runs with RFLAGS.TF (from `kvm_run`, no
    /// ioctl; false on hosts without synced registers, where single-step traps after trapped
    /// stores are left to KVM).
    fn stepping(&mut self) -> bool {
        self.sync_regs && self.fd.sync_regs().regs.rflags & RFLAGS_TF != 0
    }

    /// Whether the instruction at this exit runs with RFLAGS.TF (an ioctl without synced
    /// registers).
    fn stepping_now(&mut self) -> Result<bool> {
        let rflags = if self.sync_regs {
            self.fd.sync_regs().regs.rflags
        } else {
            self.fd
                .get_regs()
                .map_err(Error::kvm("KVM_GET_REGS"))?
                .rflags
        };
        Ok(rflags & RFLAGS_TF != 0)
    }

    /// Whether RIP is on a `rep` string instruction with RCX = 0: KVM's emulator leaves the
    /// last element's instruction there (it finishes it when it runs again, with no element
    /// left), where the CPU has finished it. Running it on, the CPU finishes it at once and
    /// raises its own single-step #DB after it, which is where the native trap comes; a #DB
    /// injected here would be one too many. Decided in 64-bit mode only (elsewhere the trap
    /// is injected).
    fn rep_left_at_zero(&mut self) -> Result<bool> {
        use iced_x86::{Decoder, DecoderOptions};
        let regs = self.fd.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
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
    fn deliver_single_step(&mut self) -> Result<()> {
        let mut events = self
            .fd
            .get_vcpu_events()
            .map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))?;
        if events.exception.injected != 0 || events.exception.pending != 0 {
            return Ok(());
        }
        let mut dr = self
            .fd
            .get_debug_regs()
            .map_err(Error::kvm("KVM_GET_DEBUGREGS"))?;
        dr.dr6 |= DR6_BS;
        self.fd
            .set_debug_regs(&dr)
            .map_err(Error::kvm("KVM_SET_DEBUGREGS"))?;
        events.exception.injected = 1;
        events.exception.nr = 1;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        events.exception_has_payload = 0;
        self.fd
            .set_vcpu_events(&events)
            .map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))
    }

    /// At a shutdown (triple fault): if a stack that exception delivery writes lies on a
    /// tracked frame, the shutdown is pagetrack's doing (KVM cannot write the frame into a
    /// read-only memslot), so `run` stops with [`Error::EventDeliveryToTracked`] naming RIP
    /// and the frame. The stacks: in long mode the TSS's RSP0 and IST1-7 and, at CPL0, the
    /// current RSP (the 64 bytes below each, 16-byte aligned); in real mode the 6 bytes
    /// below SS:SP. Other modes are not checked.
    fn check_delivery_stacks(&mut self) -> Result<()> {
        use crate::walk::{read_virt, translate};
        let regs = self.fd.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        let mem = self.vm.mem.memory();
        let tracked = |gpa: u64| {
            self.vm
                .tracker
                .is_write_tracked(pagetrack::AsId::NORMAL, pagetrack::Gfn(gpa >> 12))
        };
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
    fn wrmsr(&mut self, msr: u32, data: u64) -> Result<()> {
        let rip = if self.sync_regs {
            self.fd.sync_regs().regs.rip
        } else {
            self.fd.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?.rip
        };
        let vm = Arc::clone(&self.vm);
        let res = crate::pvmsr::handle_wrmsr(
            &vm.backend.kvm_written,
            &vm.tracker,
            &self.fd,
            self.index,
            rip,
            msr,
            data,
        );
        let failed = !matches!(res, Ok(crate::pvmsr::Wrmsr::Done));
        crate::sys::set_msr_exit_error(&mut self.fd, failed);
        res.map(drop)
    }

    /// After a trapped element of a `rep stos`/`rep movs`, completes the rest of that page
    /// in userspace (see [`crate::string`]).
    fn continue_string_store(&mut self, gpa: u64, data: &[u8]) {
        if !self.sync_regs {
            return;
        }
        let regs = self.fd.sync_regs().regs;
        let Ok(sys) = self.sys_state() else {
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
            self.fd.sync_regs_mut().regs = regs;
            self.fd.set_sync_dirty_reg(SyncReg::Register);
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
    fn check_stall(&mut self, ran: std::time::Duration) -> Result<()> {
        if ran < crate::vm::STALL_PERIOD / 2 {
            return Ok(());
        }
        let regs = self.fd.get_regs().map_err(Error::kvm("KVM_GET_REGS"))?;
        let now = (regs.rip, self.exits);
        if self.last_interrupt.replace(now) != Some(now) {
            return Ok(());
        }
        let sregs = self.fd.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
        if !crate::store::stores_into_tracked(&self.vm, &regs, &sregs) {
            return Ok(());
        }
        self.last_interrupt = None;
        let stepping = regs.rflags & RFLAGS_TF != 0;
        crate::store::complete(&self.vm, &self.fd, self.index).map_err(|e| match e {
            Error::Unemulatable {
                vcpu,
                rip,
                bytes,
                reason,
            } => Error::Unemulatable {
                vcpu,
                rip,
                bytes,
                reason: format!(
                    "KVM retries this store into a tracked frame without an exit, and \
                     pagetrack cannot complete it: {reason}"
                ),
            },
            other => other,
        })?;
        if stepping {
            self.deliver_single_step()?;
        }
        Ok(())
    }

    /// The system registers at this exit: from `kvm_run` (no ioctl) where KVM syncs them.
    fn sys_state(&mut self) -> Result<atomic::SysCache> {
        if self.sync_sregs {
            return Ok(atomic::SysCache::from_sregs(&self.fd.sync_regs().sregs));
        }
        self.fd
            .get_sregs()
            .map(|s| atomic::SysCache::from_sregs(&s))
            .map_err(Error::kvm("KVM_GET_SREGS"))
    }

    /// Handles a trapped store that came from a locked read-modify-write: true if it was one
    /// (applied atomically, or a compare-exchange that failed), false for a plain store.
    fn locked_rmw(&mut self, gpa: u64, data: &[u8]) -> Result<bool> {
        let mem = self.vm.mem.memory();
        if !mem.check_range(GuestAddress(gpa), data.len(), Permissions::ReadWrite) {
            return Ok(false);
        }
        let regs = if self.sync_regs {
            self.fd.sync_regs().regs
        } else {
            self.fd.get_regs().map_err(|source| Error::Kvm {
                op: "KVM_GET_REGS",
                source,
            })?
        };
        let sys = self.sys_state()?;
        let vm = Arc::clone(&self.vm);
        let outcome = atomic::handle(&vm, &mem, &sys, &regs, gpa, data);
        let counters = &vm.backend.counters;
        match outcome {
            atomic::Outcome::Plain => Ok(false),
            atomic::Outcome::FailedCompare => {
                counters.atomic_rmws.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            atomic::Outcome::Done(done, regs, _held) => {
                if self.sync_regs {
                    self.fd.sync_regs_mut().regs = *regs;
                    self.fd.set_sync_dirty_reg(SyncReg::Register);
                } else {
                    self.fd.set_regs(&regs).map_err(|source| Error::Kvm {
                        op: "KVM_SET_REGS",
                        source,
                    })?;
                }
                counters.atomic_rmws.fetch_add(1, Ordering::Relaxed);
                counters.trapped_writes.fetch_add(1, Ordering::Relaxed);
                crate::store::report_writes(&vm, &done.writes, self.index);
                Ok(true)
            }
        }
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

fn exit_name(e: &VcpuExit<'_>) -> &'static str {
    match e {
        VcpuExit::Unknown => "unknown",
        VcpuExit::Exception => "exception",
        VcpuExit::Hypercall(_) => "hypercall",
        VcpuExit::Debug(_) => "debug",
        VcpuExit::IrqWindowOpen => "irq-window-open",
        VcpuExit::SystemEvent(..) => "system-event",
        VcpuExit::Nmi => "nmi",
        _ => "other",
    }
}
