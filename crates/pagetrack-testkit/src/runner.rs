//! A bounded vCPU runner and a watchdog, so that a broken guest fails a test instead of
//! hanging it.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};
use pagetrack_vmm::x86::{EXCEPTION_PORT, GUEST_EXIT_PORT};

/// How a [`run_bounded`] run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stop {
    /// The guest wrote this exit code to [`GUEST_EXIT_PORT`].
    Exit(u8),
    /// The guest took an exception and its stub wrote to [`EXCEPTION_PORT`]; decode it with
    /// [`pagetrack_vmm::x86::decode_exception`].
    Exception,
    /// `KVM_EXIT_HLT`.
    Hlt,
    /// `KVM_EXIT_SHUTDOWN` (e.g. a triple fault).
    Shutdown,
    /// `KVM_EXIT_INTERNAL_ERROR` (e.g. an instruction KVM's emulator cannot run).
    InternalError,
    /// An MMIO access: the guest touched guest-physical memory with no memslot.
    Mmio {
        /// The guest-physical address.
        gpa: u64,
        /// Whether it was a write.
        write: bool,
    },
    /// Any other exit, as its debug text.
    Other(String),
    /// `max_exits` exits went by without any of the above.
    ExitLimit,
}

/// Runs `vcpu` until it stops (see [`Stop`]), for at most `max_exits` exits.
///
/// Port writes other than to [`GUEST_EXIT_PORT`] and [`EXCEPTION_PORT`] and port reads
/// (answered with `0xff` bytes) are counted and resumed; so is `EINTR` from `KVM_RUN`.
///
/// # Errors
///
/// Any other error of `KVM_RUN`.
pub fn run_bounded(vcpu: &mut VcpuFd, max_exits: usize) -> Result<Stop, kvm_ioctls::Error> {
    for _ in 0..max_exits {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(e),
        };
        let stop = match exit {
            VcpuExit::IoOut(GUEST_EXIT_PORT, data) => {
                Stop::Exit(data.first().copied().unwrap_or(0))
            }
            VcpuExit::IoOut(EXCEPTION_PORT, _) => Stop::Exception,
            VcpuExit::IoOut(..) => continue,
            VcpuExit::IoIn(_, data) => {
                data.fill(0xff);
                continue;
            }
            VcpuExit::Hlt => Stop::Hlt,
            VcpuExit::Shutdown => Stop::Shutdown,
            VcpuExit::InternalError => Stop::InternalError,
            VcpuExit::MmioRead(gpa, _) => Stop::Mmio { gpa, write: false },
            VcpuExit::MmioWrite(gpa, _) => Stop::Mmio { gpa, write: true },
            other => Stop::Other(format!("{other:?}")),
        };
        return Ok(stop);
    }
    Ok(Stop::ExitLimit)
}

/// Runs `f` on its own thread and returns its result, or panics if it takes longer than
/// `timeout` (a guest spinning without exits never reaches an exit limit).
///
/// On timeout the thread is left running (a vCPU thread cannot be stopped safely from here);
/// the test process ends it when it exits.
///
/// # Panics
///
/// On timeout, and with `f`'s panic if `f` panics.
pub fn with_watchdog<T, F>(timeout: Duration, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let handle = thread::Builder::new()
        .name("vcpu-watchdog".into())
        .spawn(move || {
            // The receiver is gone only after a timeout, when the result no longer matters.
            let _ignored = tx.send(f());
        })
        .expect("spawning a thread");
    match rx.recv_timeout(timeout) {
        Ok(value) => {
            // The thread has sent its value and is ending; a panic is impossible past send.
            let _ignored = handle.join();
            value
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the thread sends before it ends"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("watchdog: the guest did not finish within {timeout:?}")
        }
    }
}
