//! vCPUs: the run loop that applies trapped stores, reports them, and hands everything else
//! back to the VMM as a typed [`Exit`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use pagetrack::Source;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemory, Permissions};

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
}

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
        loop {
            if let Some(b) = &self.budget
                && !b.reserve()
            {
                return Ok(Exit::ExitLimit);
            }
            let kick = crate::sys::VcpuKick::current(&mut self.fd);
            let Some(inside) = self.vm.backend.gate.enter(idx, &self.stop, kick) else {
                if let Some(b) = &self.budget {
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
            // Leaves the gate (and resets `immediate_exit`); a panic in `run` leaves it too.
            drop(inside);
            if let Some(b) = &self.budget {
                match &res {
                    Err(_) => b.refund(),
                    Ok(_) => b.spend(),
                }
            }
            let exit = match res {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.check_stall(ran)?;
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
                    if self.locked_rmw(gpa, data.as_slice())? {
                        continue;
                    }
                    if apply_write(&self.vm, gpa, data.as_slice(), source) {
                        counters.trapped_writes.fetch_add(1, Ordering::Relaxed);
                        counters
                            .trapped_bytes
                            .fetch_add(u64::from(data.len), Ordering::Relaxed);
                        self.continue_string_store(gpa, data.as_slice());
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
                VcpuExit::Shutdown => return Ok(Exit::Shutdown),
                VcpuExit::FailEntry(reason, _) => return Ok(Exit::FailEntry { reason }),
                VcpuExit::InternalError => {
                    let suberror = crate::sys::internal_error_suberror(&mut self.fd);
                    if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
                        crate::store::complete(&self.vm, &self.fd, self.index)?;
                        continue;
                    }
                    return Ok(Exit::InternalError { suberror });
                }
                VcpuExit::Intr => {}
                other => return Ok(Exit::Other(exit_name(&other))),
            }
        }
    }
}

impl Vcpu {
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
        })
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
