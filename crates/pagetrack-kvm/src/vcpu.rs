//! vCPUs: the run loop that applies trapped stores, reports them, and hands everything else
//! back to the VMM as a typed [`Exit`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::error::Result;
use crate::handler::{ExitHandler, Handled, Ran};
use crate::vm::VmInner;

/// Port or MMIO data, copied out of `kvm_run` whole: the 1, 2, 4 or 8 bytes of one access,
/// or all `size * count` bytes of a `rep outs` that KVM hands over in one exit (up to a
/// page). Up to 8 bytes are held inline (no allocation on the common exit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoData(Repr);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Repr {
    Inline { bytes: [u8; 8], len: u8 },
    Heap(Box<[u8]>),
}

impl Default for IoData {
    fn default() -> IoData {
        IoData(Repr::Inline {
            bytes: [0; 8],
            len: 0,
        })
    }
}

impl IoData {
    pub(crate) fn new(data: &[u8]) -> IoData {
        if data.len() > 8 {
            return IoData(Repr::Heap(data.into()));
        }
        let mut bytes = [0; 8];
        bytes[..data.len()].copy_from_slice(data);
        IoData(Repr::Inline {
            bytes,
            len: u8::try_from(data.len()).expect("at most 8"),
        })
    }

    /// The bytes (all of them).
    pub fn as_slice(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { bytes, len } => &bytes[..usize::from(*len)],
            Repr::Heap(b) => b,
        }
    }

    /// The first byte (0 if empty).
    pub fn first(&self) -> u8 {
        self.as_slice().first().copied().unwrap_or(0)
    }

    /// The first 8 bytes (or fewer) as a little-endian integer.
    pub fn value(&self) -> u64 {
        let mut b = [0u8; 8];
        let d = self.as_slice();
        let n = d.len().min(8);
        b[..n].copy_from_slice(&d[..n]);
        u64::from_le_bytes(b)
    }
}

/// Why [`Vcpu::run`] returned. Stores to guest RAM never show up here: they are applied and
/// reported inside `run`. Reads the VMM answers (port and MMIO reads, `rdmsr`, hypercalls)
/// go to its [`IoHandler`] inside `run`, answered in `kvm_run` in place; every other exit
/// comes back with its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Exit {
    /// `out` to a port (`rep outs`: all its bytes, `size * count` of them).
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
    /// `KVM_EXIT_SYSTEM_EVENT`: the guest asked for a shutdown, reset or crash report.
    SystemEvent {
        /// `KVM_SYSTEM_EVENT_*`.
        kind: u32,
        /// KVM's data words (`ndata` of them).
        data: Vec<u64>,
    },
    /// `KVM_EXIT_DEBUG` (guest debugging the VMM enabled).
    Debug {
        /// The exception vector (1: #DB, 3: #BP).
        exception: u32,
        /// Guest RIP.
        pc: u64,
        /// DR6.
        dr6: u64,
        /// DR7.
        dr7: u64,
    },
    /// `KVM_EXIT_MEMORY_FAULT`: KVM could not resolve a guest access (private memory).
    MemoryFault {
        /// `KVM_MEMORY_EXIT_FLAG_*`.
        flags: u64,
        /// Guest-physical address.
        gpa: u64,
        /// Size of the access.
        size: u64,
    },
    /// `KVM_EXIT_IOAPIC_EOI` (split irqchip).
    IoapicEoi {
        /// The vector.
        vector: u8,
    },
    /// An exit kvm-ioctls does not decode, by its `KVM_EXIT_*` number.
    Unsupported(u32),
    /// Any other exit KVM reported, by name (exits that carry no payload).
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

    /// `rdmsr` of an MSR the VMM filtered to userspace (`KVM_EXIT_X86_RDMSR`): its value, or
    /// `None` for #GP (the default).
    fn rdmsr(&mut self, index: u32) -> Option<u64> {
        let _ = index;
        None
    }

    /// A hypercall (`KVM_EXIT_HYPERCALL`, with `KVM_CAP_EXIT_HYPERCALL` enabled): the value
    /// the guest gets in RAX (default: `-KVM_ENOSYS`).
    fn hypercall(&mut self, nr: u64, args: [u64; 6], longmode: bool) -> u64 {
        let _ = (nr, args, longmode);
        (-1000i64).cast_unsigned()
    }
}

#[derive(Debug, Default)]
struct AbsentDevices;
impl IoHandler for AbsentDevices {}

/// Stops a running vCPU from another thread.
#[derive(Debug, Clone)]
pub struct VcpuStopper {
    pub(crate) vm: Arc<VmInner>,
    pub(crate) index: u32,
    pub(crate) flag: Arc<AtomicBool>,
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

    pub(crate) fn reserve(&self) -> bool {
        self.inner
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
            .is_ok()
    }

    pub(crate) fn refund(&self) {
        self.inner.left.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn spend(&self) {
        self.inner.used.fetch_add(1, Ordering::SeqCst);
    }
}

/// One vCPU. Run it on one thread (`run(&mut self)`); it is `Send`.
///
/// The ready-made run loop on an [`ExitHandler`]: [`Vcpu::run`] handles pagetrack's exits
/// and returns the others as an [`Exit`].
pub struct Vcpu {
    fd: VcpuFd,
    io: Box<dyn IoHandler>,
    handler: ExitHandler,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("index", &self.handler.index())
            .finish_non_exhaustive()
    }
}

impl Vcpu {
    pub(crate) fn new(index: u32, mut fd: VcpuFd, vm: Arc<VmInner>) -> Vcpu {
        let handler = ExitHandler::new(index, &mut fd, vm, true);
        Vcpu {
            fd,
            io: Box::new(AbsentDevices),
            handler,
        }
    }

    /// The vCPU index (the event [`Source::Vcpu`](pagetrack::Source::Vcpu) number).
    pub fn index(&self) -> u32 {
        self.handler.index()
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
        self.handler.set_exit_budget(budget);
    }

    /// A handle that stops this vCPU from another thread.
    pub fn stopper(&self) -> VcpuStopper {
        self.handler.stopper()
    }

    /// Runs the guest until an exit the VMM must see. Stores to guest RAM that exit (tracked
    /// frames) are applied and reported here, with source `Vcpu(index)`; loads of RAM that exit
    /// (during a slot change) are served from guest memory.
    ///
    /// A vCPU that KVM keeps inside `KVM_RUN` without an exit and without moving RIP (pagetrack
    /// kicks it out every 50 ms to look) on an instruction that stores into a tracked frame
    /// (KVM retries an `sgdt` into a read-only slot forever) has that store completed here,
    /// or the run stops with [`Error::Unemulatable`](crate::Error::Unemulatable): it never
    /// stalls unnoticed.
    ///
    /// # Errors
    /// A failed `KVM_RUN`, or a store that cannot be completed.
    pub fn run(&mut self) -> Result<Exit> {
        let idx = usize::try_from(self.handler.index()).expect("u32 fits usize on x86_64");
        let vm = Arc::clone(self.handler.vm());
        // Until `run` returns: pauses taken by this thread's notifiers do not wait for this
        // vCPU's continuation, and returning drops it (see `gate.rs`).
        let _here = vm.backend.gate.running_here(idx);
        // The previous exit was an MMIO exit handled here: KVM may continue its instruction
        // at this entry, which therefore happens even when stopped or out of budget.
        self.handler.continuing = false;
        loop {
            let exit = match self.handler.run(&mut self.fd)? {
                Ran::Tracked(t) => match self.handler.handle(t, &mut self.fd)? {
                    Handled::Done => continue,
                    Handled::NotMine(exit) => return Ok(exit),
                },
                Ran::Stopped => return Ok(Exit::Stopped),
                Ran::ExitLimit => return Ok(Exit::ExitLimit),
                Ran::Exit(exit) => exit,
            };
            match exit {
                VcpuExit::MmioWrite(gpa, data) => {
                    return Ok(Exit::MmioWrite {
                        gpa,
                        data: IoData::new(data),
                    });
                }
                VcpuExit::MmioRead(gpa, data) => self.io.mmio_read(gpa, data),
                VcpuExit::IoIn(port, data) => self.io.io_in(port, data),
                VcpuExit::IoOut(port, data) => {
                    return Ok(Exit::IoOut {
                        port,
                        data: IoData::new(data),
                    });
                }
                VcpuExit::Hlt => return Ok(Exit::Hlt),
                VcpuExit::Shutdown => {
                    self.handler.check_shutdown(&mut self.fd)?;
                    return Ok(Exit::Shutdown);
                }
                VcpuExit::FailEntry(reason, _) => return Ok(Exit::FailEntry { reason }),
                VcpuExit::X86Rdmsr(msr) => match self.io.rdmsr(msr.index) {
                    Some(v) => {
                        *msr.data = v;
                        *msr.error = 0;
                    }
                    None => *msr.error = 1,
                },
                VcpuExit::Hypercall(h) => {
                    *h.ret = self.io.hypercall(h.nr, h.args, h.longmode != 0);
                }
                VcpuExit::SystemEvent(kind, data) => {
                    return Ok(Exit::SystemEvent {
                        kind,
                        data: data.to_vec(),
                    });
                }
                VcpuExit::Debug(d) => {
                    return Ok(Exit::Debug {
                        exception: d.exception,
                        pc: d.pc,
                        dr6: d.dr6,
                        dr7: d.dr7,
                    });
                }
                VcpuExit::MemoryFault { flags, gpa, size } => {
                    return Ok(Exit::MemoryFault { flags, gpa, size });
                }
                VcpuExit::IoapicEoi(vector) => return Ok(Exit::IoapicEoi { vector }),
                VcpuExit::Unsupported(n) => return Ok(Exit::Unsupported(n)),
                other => return Ok(Exit::Other(exit_name(&other))),
            }
        }
    }
}

fn exit_name(e: &VcpuExit<'_>) -> &'static str {
    match e {
        VcpuExit::Unknown => "unknown",
        VcpuExit::Exception => "exception",
        VcpuExit::IrqWindowOpen => "irq-window-open",
        VcpuExit::Nmi => "nmi",
        VcpuExit::Intr => "intr",
        VcpuExit::SetTpr => "set-tpr",
        VcpuExit::TprAccess => "tpr-access",
        VcpuExit::Watchdog => "watchdog",
        VcpuExit::Hyperv => "hyperv",
        VcpuExit::InternalError => "internal-error",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_data_of_a_rep_outs_keeps_every_byte() {
        // KVM hands a `rep outs` over as `size * count` bytes in one exit (up to a page).
        let data: Vec<u8> = (0..=255).cycle().take(4000).collect();

        let io = IoData::new(&data);

        assert_eq!(io.as_slice(), &data[..]);
        assert_eq!(io.first(), 0);
        assert_eq!(io.value(), u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]));
    }

    #[test]
    fn io_data_of_one_access_is_its_bytes() {
        let io = IoData::new(&[0x34, 0x12]);

        assert_eq!(
            (io.as_slice(), io.first(), io.value()),
            (&[0x34, 0x12][..], 0x34, 0x1234)
        );
        assert_eq!(IoData::default().as_slice(), &[] as &[u8]);
        assert_eq!(IoData::default().first(), 0);
    }
}
