//! Threads: `clone(CLONE_VM | CLONE_THREAD | ...)` and `clone3` start another vCPU of the
//! same VM, on its own host thread, in the same address space.
//!
//! - **Shared state.** The kernel (fd table, address space, signal actions), the tracking
//!   and the thread table sit behind one mutex ([`Ctx::lock`]); a thread holds it while it
//!   serves a system call, never while its vCPU runs. A thread that waits (`futex`,
//!   `rt_sigtimedwait`, and with more than one thread `nanosleep`, `clock_nanosleep`
//!   (relative or `TIMER_ABSTIME`), `pause`, `rt_sigsuspend`) waits on the condition variable [`Ctx::wake`], which releases the mutex. An address-space change
//!   one thread makes (`mmap`, `munmap`, `mprotect`, `mremap`, `brk`, `madvise`) runs inside
//!   one [`Vm::page_table_update`], taken under the mutex, until its frames are released:
//!   every other vCPU is outside `KVM_RUN`, and every store pagetrack completes in userspace
//!   for another thread happens entirely before the change or translates through the new
//!   tables after it, never into a frame the change freed.
//! - **Per thread.** Its vCPU (FS base from `CLONE_SETTLS`, registers of the `clone` caller
//!   with RAX 0 and the new stack), tid (the main thread's is the pid, 1000; then 1001,
//!   1002...), `set_tid_address`/`CLONE_CHILD_CLEARTID` address (zeroed and woken as a futex
//!   when the thread exits, which `pthread_join` waits for), blocked mask, alternate stack and
//!   thread-directed pending signals ([`ThreadSignals`], swapped into the kernel's
//!   [`super::signal::Signals`] while the thread serves a call), and the FPU states of its
//!   signal frames.
//! - **Futexes.** `FUTEX_WAIT`, `FUTEX_WAKE`, `FUTEX_WAIT_BITSET`, `FUTEX_WAKE_BITSET`,
//!   `FUTEX_REQUEUE`, `FUTEX_CMP_REQUEUE`, private or not (one address space, so the key is
//!   the virtual address), with relative (`WAIT`) or absolute (`WAIT_BITSET`, monotonic or
//!   `FUTEX_CLOCK_REALTIME`) timeouts. The value is compared with the waiter queued under the
//!   same mutex a waker takes, so no wake is lost. PI futexes and `FUTEX_WAKE_OP` are
//!   `ENOSYS`.
//! - **Ends.** `exit` ends one thread (the last one's status is the process's);
//!   `exit_group`, a fatal signal, an exception, a crash, a host failure or the timeout end
//!   them all: every vCPU is stopped and every waiter woken, and the run returns once every
//!   host thread has been joined. At most [`MAX_THREADS`] threads live at once (`EAGAIN`
//!   beyond); the vCPU of a thread that exited serves the next one.
//! - **Waits in the kernel.** With more than one thread, a call that would wait (`read`,
//!   `readv`, `write`/`writev` to a full FIFO or pipe, `poll`, `ppoll`, `select`,
//!   `pselect6`, `F_SETLKW`/`F_OFD_SETLKW`) does not wait under the mutex: it hands back the
//!   host descriptors and the timeout it waits for, the thread waits in the host without the
//!   mutex (a waiting record lock is tried again every 5 ms), woken also by the end of the
//!   process and by its own eventfd, which a signal for it (`tgkill`, `kill`) writes to; then
//!   the call is served again. A signal the thread may take ends the wait with `EINTR` (a
//!   write that wrote some returns its count), so `exit_group` or a signal from another
//!   thread ends it. As on Linux, an interrupted `read`, `readv`, `write`, `writev`, waiting
//!   record lock or `FUTEX_WAIT` without a timeout (the calls Linux ends with
//!   `ERESTARTSYS`) is restarted instead when the handler has `SA_RESTART` or no handler
//!   runs: the program resumes on its `syscall` with the call's number.
//! - **Limits.** `SIGALRM` between two instructions reaches the main thread only; other threads take signals when a system call returns.
//!   Only the main vCPU keeps the kvmclock page up to date; the others read it with their
//!   own TSC, which KVM keeps synchronized.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::SyncReg;
use pagetrack_kvm::{Exit, PageTableUpdate, Vcpu, VcpuStopper, Vm};

use super::abi::{
    E2BIG, EAGAIN, EFAULT, EINTR, EINTR_RESTARTABLE, EINVAL, ENOSYS, EPERM, ERESTARTSYS, ESRCH,
    ETIMEDOUT, Errno, SysResult, nr,
};
use super::mm::{PAGE, STUB_VA};
use super::signal::{self, ThreadSignals};
use super::syscall::{Flow, Kernel, KvmCaller, PID};
use super::track::Tracking;
use super::{ProcessEnd, ProcessStats, SYSCALL_PORT, bad_frame, host_ids, signal_name, signal_of};
use crate::error::{Error, Result};
use crate::x86::{self, EXCEPTION_PORT, LongModeLayout};

/// Most threads alive at once (the main thread included); `clone` beyond is `EAGAIN`.
pub const MAX_THREADS: usize = 64;

const CLONE_VM: u64 = 0x100;
const CLONE_FS: u64 = 0x200;
const CLONE_FILES: u64 = 0x400;
const CLONE_SIGHAND: u64 = 0x800;
const CLONE_THREAD: u64 = 0x1_0000;
const CLONE_SYSVSEM: u64 = 0x4_0000;
const CLONE_SETTLS: u64 = 0x8_0000;
const CLONE_PARENT_SETTID: u64 = 0x10_0000;
const CLONE_CHILD_CLEARTID: u64 = 0x20_0000;
const CLONE_DETACHED: u64 = 0x40_0000;
const CLONE_UNTRACED: u64 = 0x80_0000;
const CLONE_CHILD_SETTID: u64 = 0x100_0000;
/// What a thread must share: everything the VMM has only once.
const CLONE_SHARED: u64 = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD;
/// Flags a thread may add.
const CLONE_EXTRA: u64 = CLONE_SYSVSEM
    | CLONE_SETTLS
    | CLONE_PARENT_SETTID
    | CLONE_CHILD_CLEARTID
    | CLONE_DETACHED
    | CLONE_UNTRACED
    | CLONE_CHILD_SETTID;

const FUTEX_WAIT: u64 = 0;
const FUTEX_WAKE: u64 = 1;
const FUTEX_REQUEUE: u64 = 3;
const FUTEX_CMP_REQUEUE: u64 = 4;
const FUTEX_WAIT_BITSET: u64 = 9;
const FUTEX_WAKE_BITSET: u64 = 10;
const FUTEX_CLOCK_REALTIME: u64 = 256;
/// `clock_nanosleep`'s absolute flag.
const TIMER_ABSTIME: u64 = 1;
const CLOCK_REALTIME: u64 = 0;
/// The end of user space (`TASK_SIZE_MAX`): no FS base at or above it.
const TASK_SIZE_MAX: u64 = 0x7fff_ffff_f000;
const FUTEX_CMD_MASK: u64 = 0x7f;

/// What every thread shares, behind [`Ctx::lock`].
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) kernel: Kernel,
    pub(crate) tracking: Tracking,
    threads: BTreeMap<u64, Entry>,
    futex: Vec<Waiter>,
    /// vCPUs of threads that exited, for the next ones, with the system registers their
    /// first set-up gave them (KVM refuses a second `KVM_SET_CPUID2` once a vCPU ran).
    free_vcpus: Vec<(Vcpu, kvm_sregs)>,
    next_tid: u64,
    next_index: u32,
    /// How the process ended, once it did (the first end wins).
    end: Option<Result<ProcessEnd>>,
    handles: Vec<JoinHandle<()>>,
    /// The threads' counters, added as each one leaves.
    pub(crate) stats: ProcessStats,
}

/// A live thread, as the others see it.
#[derive(Debug)]
struct Entry {
    stopper: VcpuStopper,
    signals: ThreadSignals,
    /// `set_tid_address` / `CLONE_CHILD_CLEARTID`: zeroed and woken at exit.
    clear_tid: u64,
    /// Set by a futex wake of this thread's wait.
    woken: bool,
    /// An eventfd a signal for this thread writes to, ending its wait in the host.
    wake_fd: Option<Arc<OwnedFd>>,
}

/// A thread's [`Entry::wake_fd`] (none if the host has no eventfd: then a signal is taken
/// when the wait ends).
fn new_wake_fd() -> Option<Arc<OwnedFd>> {
    rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
    )
    .ok()
    .map(Arc::new)
}

/// Makes the eventfd `fd` readable; a full counter (`EAGAIN`) is readable already. Any
/// other failure (none is expected on an eventfd this process owns) is counted in
/// `errors`: the caller cannot undo the signal or end it wakes for, and the waiter still
/// wakes at its timeout, the run's deadline or the end of the process.
fn poke(fd: Option<&OwnedFd>, errors: &AtomicU64) {
    if let Some(fd) = fd {
        match rustix::io::write(fd, &1u64.to_ne_bytes()) {
            Ok(_) | Err(rustix::io::Errno::AGAIN) => {}
            // Relaxed: a statistic, read once every thread has been joined.
            Err(_) => _ = errors.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// Empties the eventfd `fd`; it was readable or it was not (`EAGAIN`), either is fine.
/// Another failure is counted in `errors`: the next wait may then end at once, and the
/// call it serves is simply served again.
fn drain(fd: Option<&OwnedFd>, errors: &AtomicU64) {
    if let Some(fd) = fd {
        match rustix::io::read(fd, &mut [0u8; 8]) {
            Ok(_) | Err(rustix::io::Errno::AGAIN) => {}
            // Relaxed: a statistic, read once every thread has been joined.
            Err(_) => _ = errors.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// A thread waiting in `FUTEX_WAIT*`.
#[derive(Clone, Copy, Debug)]
struct Waiter {
    tid: u64,
    addr: u64,
    bitset: u32,
}

/// The process while it runs: the VM and the shared state.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) vm: Vm,
    pub(crate) layout: LongModeLayout,
    pub(crate) timeout: Option<Duration>,
    pub(crate) deadline: Option<Instant>,
    state: Mutex<Shared>,
    /// Wakes waiters: futex wakes, signals to other threads, the end of the process.
    pub(crate) wake: Condvar,
    /// Readable once the process ends: wakes threads waiting for input in the host.
    ended_fd: Option<OwnedFd>,
    /// Host calls that failed where no one could be told (eventfd wake-ups, waits):
    /// [`ProcessStats::host_errors`].
    pub(crate) host_errors: AtomicU64,
}

type Guard<'a> = MutexGuard<'a, Shared>;

/// One guest thread: its vCPU and what only it uses.
#[derive(Debug)]
pub(crate) struct GuestThread {
    pub(crate) vcpu: Vcpu,
    pub(crate) tid: u64,
    /// FPU state at the delivery of each signal frame, by frame address, restored by its
    /// `rt_sigreturn` (at most 64).
    fpu_stash: Vec<(u64, kvm_fpu)>,
    /// True if `syscall` entered CPL0 (VT-x/SVM), once the first call told.
    cpl0_entry: Option<bool>,
    /// The system registers of the vCPU's first set-up (threads `clone` made).
    initial: Option<kvm_sregs>,
    stats: ProcessStats,
}

impl GuestThread {
    pub(crate) fn new(vcpu: Vcpu, tid: u64) -> GuestThread {
        GuestThread {
            vcpu,
            tid,
            fpu_stash: Vec::new(),
            cpl0_entry: None,
            initial: None,
            stats: ProcessStats::default(),
        }
    }
}

/// Why a thread's run loop ended.
enum Leave {
    /// The thread called `exit` with this status.
    Exit(i32),
    /// The process ends (this thread ended it, or saw another's end).
    Process(Option<ProcessEnd>),
}

/// What serving one call led to.
enum Served {
    Kernel(Flow),
    /// `exit`: this thread ends.
    ThreadExit(i32),
    /// The process is ending; the thread leaves without returning to the guest.
    Leave,
}

/// How a wait ended.
enum WaitEnd {
    Done,
    TimedOut,
    Signal,
    Deadline,
    Leave,
}

fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

fn ret(v: SysResult) -> u64 {
    match v {
        Ok(v) => v,
        Err(Errno(e)) => (-e).cast_unsigned(),
    }
}

impl Ctx {
    /// The running process: `main` (tid [`PID`]) is its only thread so far.
    pub(crate) fn new(
        vm: Vm,
        layout: LongModeLayout,
        timeout: Option<Duration>,
        deadline: Option<Instant>,
        kernel: Kernel,
        tracking: Tracking,
        main: &GuestThread,
    ) -> Ctx {
        let mut threads = BTreeMap::new();
        threads.insert(
            main.tid,
            Entry {
                stopper: main.vcpu.stopper(),
                signals: ThreadSignals::inherit(0),
                clear_tid: 0,
                woken: false,
                wake_fd: new_wake_fd(),
            },
        );
        Ctx {
            vm,
            layout,
            timeout,
            deadline,
            state: Mutex::new(Shared {
                kernel,
                tracking,
                threads,
                futex: Vec::new(),
                free_vcpus: Vec::new(),
                next_tid: PID + 1,
                next_index: main.vcpu.index() + 1,
                end: None,
                handles: Vec::new(),
                stats: ProcessStats::default(),
            }),
            wake: Condvar::new(),
            // Without it (no eventfd), a thread waiting for input holds the kernel's lock.
            ended_fd: rustix::event::eventfd(
                0,
                rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
            )
            .ok(),
            host_errors: AtomicU64::new(0),
        }
    }

    /// The shared state.
    pub(crate) fn lock(&self) -> Guard<'_> {
        // A poisoned lock only means a thread panicked; the state itself stays consistent
        // call by call.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the process with `end` (unless it already ended): stops every vCPU but the
    /// caller's (`me`) and wakes every waiter.
    fn end_process(&self, g: &mut Shared, end: Result<ProcessEnd>, me: Option<u64>) {
        if g.end.is_none() {
            g.end = Some(end);
            poke(self.ended_fd.as_ref(), &self.host_errors);
        }
        for (tid, e) in &g.threads {
            if Some(*tid) != me {
                e.stopper.stop();
            }
        }
        self.wake.notify_all();
    }

    /// Waits until one of `fds` has one of its `POLL*` events (or an error or hang-up),
    /// `until`, the run's deadline, or the end of the process.
    fn wait_fds(&self, fds: &[(OwnedFd, i16)], wake: Option<&OwnedFd>, until: Option<Instant>) {
        use rustix::event::{PollFd, PollFlags, Timespec};
        let Some(ended) = &self.ended_fd else {
            return;
        };
        let left = [until, self.deadline]
            .into_iter()
            .flatten()
            .min()
            .map(|d| d.saturating_duration_since(Instant::now()));
        let ts = left.map(|d| Timespec {
            tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(d.subsec_nanos()),
        });
        let mut p: Vec<PollFd<'_>> = fds
            .iter()
            .map(|(h, ev)| PollFd::new(h, PollFlags::from_bits_truncate(ev.cast_unsigned())))
            .collect();
        p.push(PollFd::new(ended, PollFlags::IN));
        if let Some(w) = wake {
            p.push(PollFd::new(w, PollFlags::IN));
        }
        match rustix::event::poll(&mut p, ts.as_ref()) {
            // EINTR, or ready, or the time is up: the call served next decides what happens.
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            // Anything else ends the wait early, which is safe (the call is served again and
            // waits again); it is counted, since it would make the wait a busy loop.
            // Relaxed: a statistic, read once every thread has been joined.
            Err(_) => _ = self.host_errors.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The timeout passed: ends the process with [`ProcessEnd::Timeout`].
    pub(crate) fn time_out(&self) {
        let mut g = self.lock();
        let t = self.timeout.unwrap_or_default();
        self.end_process(&mut g, Ok(ProcessEnd::Timeout(t)), None);
    }

    /// Waits until the process has ended and every host thread is joined; returns the end.
    pub(crate) fn wait_end(&self) -> Result<ProcessEnd> {
        let mut g = self.lock();
        while g.end.is_none() {
            g = self.wake.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        loop {
            let handles = std::mem::take(&mut g.handles);
            if handles.is_empty() {
                break;
            }
            drop(g);
            for h in handles {
                if h.join().is_err() {
                    // Each thread catches its own panic and records the end (a crash), so
                    // this is a panic in that handling; the count keeps it visible.
                    // Relaxed: a statistic, read once every thread has been joined.
                    self.host_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            g = self.lock();
        }
        g.end
            .take()
            .unwrap_or_else(|| Ok(ProcessEnd::Crashed("the process ended twice".into())))
    }
}

impl Shared {
    fn swap_in(&mut self, tid: u64) {
        if let Some(e) = self.threads.get_mut(&tid) {
            self.kernel.signals.swap_thread(&mut e.signals);
        }
    }

    fn swap_out(&mut self, tid: u64) {
        // The same exchange: swapping twice puts everything back.
        self.swap_in(tid);
    }

    /// Wakes up to `n` waiters on `addr` whose bitset meets `bitset`.
    fn futex_wake(&mut self, addr: u64, n: u64, bitset: u32) -> u64 {
        let mut woken = 0;
        let mut i = 0;
        while i < self.futex.len() && woken < n {
            let w = self.futex[i];
            if w.addr == addr && w.bitset & bitset != 0 {
                self.futex.remove(i);
                if let Some(e) = self.threads.get_mut(&w.tid) {
                    e.woken = true;
                }
                woken += 1;
            } else {
                i += 1;
            }
        }
        woken
    }
}

/// Runs thread `t` until it exits or the process ends, then leaves the thread table (and,
/// for a thread `clone` made, returns its vCPU for the next one).
pub(crate) fn run_thread(
    ctx: &Arc<Ctx>,
    mut t: GuestThread,
    kick: Option<&mpsc::Sender<Option<Instant>>>,
    pool: bool,
) {
    let left = drive(ctx, &mut t, kick);
    let mut g = ctx.lock();
    let s = &mut g.stats;
    s.exits += t.stats.exits;
    s.stack_faults += t.stats.stack_faults;
    s.guest_time += t.stats.guest_time;
    s.syscall_time += t.stats.syscall_time;
    if t.tid == PID {
        s.syscall_enters_cpl0 = t.cpl0_entry == Some(true);
    }
    match left {
        Ok(Leave::Exit(code)) => {
            if let Some(e) = g.threads.remove(&t.tid)
                && e.clear_tid != 0
                && g.end.is_none()
            {
                // CLONE_CHILD_CLEARTID: what pthread_join waits for.
                if g.kernel
                    .mm
                    .write_user(e.clear_tid, &0u32.to_le_bytes())
                    .is_ok()
                {
                    g.futex_wake(e.clear_tid, 1, u32::MAX);
                }
                ctx.wake.notify_all();
            }
            g.futex.retain(|w| w.tid != t.tid);
            if g.threads.is_empty() {
                let end = ProcessEnd::Exited(code.to_le_bytes()[0]);
                ctx.end_process(&mut g, Ok(end), Some(t.tid));
            }
        }
        Ok(Leave::Process(Some(end))) => ctx.end_process(&mut g, Ok(end), Some(t.tid)),
        Ok(Leave::Process(None)) => {}
        Err(e) => ctx.end_process(&mut g, Err(e), Some(t.tid)),
    }
    if g.end.is_none() {
        let s = &mut *g;
        if let Err(e) = s.tracking.commit(&ctx.vm, &mut s.kernel.mm, None) {
            ctx.end_process(s, Err(e), Some(t.tid));
        }
    }
    if pool && let Some(sregs) = t.initial {
        g.free_vcpus.push((t.vcpu, sregs));
    }
}

/// The run loop of one thread.
fn drive(
    ctx: &Arc<Ctx>,
    t: &mut GuestThread,
    kick: Option<&mpsc::Sender<Option<Instant>>>,
) -> Result<Leave> {
    let mut alarm_sent: Option<Instant> = None;
    loop {
        let t0 = Instant::now();
        let exit = t.vcpu.run();
        let t1 = Instant::now();
        t.stats.guest_time += t1 - t0;
        let exit = match exit {
            Ok(e) => e,
            // A store pagetrack could not complete is the guest's dead end, not the host's.
            Err(e @ pagetrack_kvm::Error::Unemulatable { .. }) => {
                return Ok(Leave::Process(Some(ProcessEnd::Crashed(e.to_string()))));
            }
            Err(e) => return Err(e.into()),
        };
        t.stats.exits += 1;
        match exit {
            Exit::IoOut {
                port: SYSCALL_PORT, ..
            } => {
                let regs = t.vcpu.fd().sync_regs().regs;
                if regs.rip != STUB_VA + 2 {
                    return Ok(Leave::Process(Some(ProcessEnd::Crashed(format!(
                        "port I/O to {SYSCALL_PORT:#x} outside the system-call stub at rip {:#x}",
                        regs.rip
                    )))));
                }
                let enters_cpl0 = match t.cpl0_entry {
                    Some(c) => c,
                    None => {
                        let s = t.vcpu.fd().get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                        let c = s.cs.dpl == 0;
                        t.cpl0_entry = Some(c);
                        c
                    }
                };
                let mut g = ctx.lock();
                if g.end.is_some() {
                    return Ok(Leave::Process(None));
                }
                g.swap_in(t.tid);
                // A call that edits the page tables or frees frames runs as one page-table
                // update, from its first edit to the release of its frames in the commit:
                // no store another thread's vCPU completes in userspace overlaps it.
                let update = edits_address_space(regs.rax).then(|| ctx.vm.page_table_update());
                let (mut g, served) = serve(ctx, g, t, &regs);
                let result =
                    finish_call(ctx, &mut g, t, &regs, served, enters_cpl0, update.as_ref());
                drop(update);
                g.swap_out(t.tid);
                if let Some(tx) = kick {
                    let alarm = g.kernel.alarm_at();
                    if alarm != alarm_sent {
                        tx.send(alarm)
                            .expect("the alarm kicker receives until the run has ended");
                        alarm_sent = alarm;
                    }
                }
                drop(g);
                t.stats.syscall_time += t1.elapsed();
                if let Some(leave) = result? {
                    return Ok(leave);
                }
            }
            Exit::IoOut {
                port: EXCEPTION_PORT,
                ..
            } => {
                let ex =
                    x86::decode_exception(t.vcpu.fd(), &*ctx.vm.untracked_memory(), &ctx.layout)?;
                let not_present = ex.error_code.is_some_and(|e| e & 1 == 0);
                if ex.vector == 14
                    && not_present
                    && let Some(addr) = ex.cr2
                {
                    let mut g = ctx.lock();
                    if g.end.is_some() {
                        return Ok(Leave::Process(None));
                    }
                    if g.kernel.mm.grow_stack(addr) {
                        let g = &mut *g;
                        g.tracking.commit(&ctx.vm, &mut g.kernel.mm, None)?;
                        t.stats.stack_faults += 1;
                        continue;
                    }
                }
                let (signal, name) = signal_of(ex.vector);
                return Ok(Leave::Process(Some(ProcessEnd::Signaled {
                    signal,
                    exception: Some(ex),
                    detail: format!("{name}: {ex}"),
                })));
            }
            Exit::Stopped => {
                let mut g = ctx.lock();
                if g.end.is_some() {
                    return Ok(Leave::Process(None));
                }
                if ctx.deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(Leave::Process(Some(ProcessEnd::Timeout(
                        ctx.timeout.unwrap_or_default(),
                    ))));
                }
                if kick.is_some() {
                    // The alarm kicker: deliver SIGALRM between two instructions, where the
                    // program is at CPL3 and returns with every register (PVM only: on
                    // VT-x/SVM the return path is sysretq, which cannot restore RCX/R11).
                    g.swap_in(t.tid);
                    let r = alarm_between_instructions(ctx, &mut g, t, t.cpl0_entry == Some(false));
                    g.swap_out(t.tid);
                    if let Some(end) = r? {
                        return Ok(Leave::Process(Some(end)));
                    }
                    alarm_sent = None;
                    if let Some(tx) = kick {
                        let alarm = g.kernel.alarm_at();
                        tx.send(alarm)
                            .expect("the alarm kicker receives until the run has ended");
                        alarm_sent = alarm;
                    }
                }
            }
            other => {
                let rip = t.vcpu.fd().get_regs().map(|r| r.rip).unwrap_or_default();
                return Ok(Leave::Process(Some(ProcessEnd::Crashed(format!(
                    "the guest stopped with {other:?} at rip {rip:#x}"
                )))));
            }
        }
    }
}

/// Whether system call `n` may change or remove present translations or free frames (the
/// failure path of any `mmap` unmaps what it mapped; `MADV_DONTNEED` zeroes pages in place).
fn edits_address_space(n: u64) -> bool {
    matches!(
        n,
        nr::MMAP | nr::MUNMAP | nr::MPROTECT | nr::MREMAP | nr::BRK | nr::MADVISE
    )
}

/// After a call: commits tracking, sets the registers the program resumes with and delivers
/// signals; `Some` if the thread leaves.
fn finish_call(
    ctx: &Ctx,
    g: &mut Shared,
    t: &mut GuestThread,
    regs: &kvm_regs,
    served: Served,
    enters_cpl0: bool,
    update: Option<&PageTableUpdate<'_>>,
) -> Result<Option<Leave>> {
    g.tracking.commit(&ctx.vm, &mut g.kernel.mm, update)?;
    let flow = match served {
        Served::Kernel(f) => f,
        Served::ThreadExit(code) => return Ok(Some(Leave::Exit(code))),
        Served::Leave => return Ok(Some(Leave::Process(None))),
    };
    // Where the program resumes: after its `syscall`, as sysretq returns.
    let mut user = kvm_regs {
        rip: regs.rcx,
        rflags: regs.r11,
        ..*regs
    };
    // A restartable wait a signal ended: EINTR unless the signal's handler has SA_RESTART
    // or no handler runs; then the program re-executes its `syscall` (2 bytes) with the
    // call's number, as Linux restarts an ERESTARTSYS call.
    let mut restart = None;
    match flow {
        Flow::Return(v) if v == ret(Err(EINTR_RESTARTABLE)) => {
            user.rax = ret(Err(EINTR));
            restart = Some((regs.rcx.wrapping_sub(2), regs.rax));
        }
        Flow::Return(v) => user.rax = v,
        Flow::SigReturn => {
            let mut frame =
                vec![0u8; usize::try_from(signal::FRAME_SIZE).expect("a small constant")];
            let at = regs.rsp.wrapping_sub(8);
            if g.kernel.mm.read_user(at, &mut frame).is_err() {
                return Ok(Some(Leave::Process(Some(bad_frame(at)))));
            }
            user = g.kernel.signals.restore(&frame, &user);
            if let Some(i) = t.fpu_stash.iter().rposition(|(f, _)| *f == at) {
                let (_, fpu) = t.fpu_stash[i];
                t.fpu_stash.truncate(i);
                t.vcpu.fd().set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
            }
        }
        Flow::Exit(code) => {
            return Ok(Some(Leave::Process(Some(ProcessEnd::Exited(
                code.to_le_bytes()[0],
            )))));
        }
        Flow::Timeout => {
            return Ok(Some(Leave::Process(Some(ProcessEnd::Timeout(
                ctx.timeout.unwrap_or_default(),
            )))));
        }
    }
    if let Some(end) = deliver(g, t, &mut user, restart) {
        return Ok(Some(Leave::Process(Some(end))));
    }
    g.tracking.commit(&ctx.vm, &mut g.kernel.mm, update)?;
    let fd = t.vcpu.fd_mut();
    let r = &mut fd.sync_regs_mut().regs;
    *r = if enters_cpl0 {
        // sysretq, still ahead in the stub, jumps to RCX with R11.
        kvm_regs {
            rip: r.rip,
            rflags: r.rflags,
            rcx: user.rip,
            r11: user.rflags,
            ..user
        }
    } else {
        // Still at CPL3 in the stub: return as sysretq would.
        user
    };
    fd.set_sync_dirty_reg(SyncReg::Register);
    Ok(None)
}

/// Delivers the pending signals the thread does not block to `user`, the registers it
/// resumes with: ignored ones are dropped, a handler gets its frame on the stack (one at a
/// time; the next comes when the handler returns), a default action that ends the program
/// ends the run.
///
/// `restart` (RIP of the `syscall` and the call's number) is a call a signal interrupted
/// that Linux restarts after a handler with `SA_RESTART`, or when no handler runs; `user`
/// then returns `EINTR` otherwise.
fn deliver(
    g: &mut Shared,
    t: &mut GuestThread,
    user: &mut kvm_regs,
    restart: Option<(u64, u64)>,
) -> Option<ProcessEnd> {
    let restart_at = |user: &mut kvm_regs| {
        if let Some((rip, nr)) = restart {
            user.rip = rip;
            user.rax = nr;
        }
    };
    while let Some(d) = g.kernel.signals.take() {
        match d.disposition {
            signal::Disposition::Ignore => {}
            signal::Disposition::Terminate => {
                let sig = u8::try_from(d.sig).unwrap_or(6);
                return Some(ProcessEnd::Signaled {
                    signal: sig,
                    exception: None,
                    detail: format!("killed by {} (signal {sig})", signal_name(sig)),
                });
            }
            signal::Disposition::Handle(act) => {
                if act.flags & signal::SA_RESTART != 0 {
                    restart_at(user);
                }
                let (uid, _) = host_ids();
                let (at, bytes, handler) =
                    g.kernel
                        .signals
                        .frame(d, act, user, u32::try_from(PID).unwrap_or(1000), uid);
                let mm = &mut g.kernel.mm;
                mm.grow_stack(at);
                if mm.write_user(at, &bytes).is_err() {
                    return Some(bad_frame(at));
                }
                // The FPU state the handler will change, for its rt_sigreturn: the context
                // may be one interrupted between two instructions (or a frame delivered at
                // another handler's return to such a context). A frame address seen again
                // is a new frame; the oldest go beyond 64, as a handler that never returns
                // (siglongjmp) leaves its entry behind.
                if let Ok(fpu) = t.vcpu.fd().get_fpu() {
                    t.fpu_stash.retain(|(f, _)| *f != at);
                    t.fpu_stash.push((at, fpu));
                    if t.fpu_stash.len() > 64 {
                        t.fpu_stash.remove(0);
                    }
                }
                *user = handler;
                return None;
            }
        }
    }
    g.kernel.signals.end_suspend();
    restart_at(user);
    None
}

/// A kick of the alarm kicker: raises a due SIGALRM and, if the program is at CPL3 and may
/// take it now, delivers it; else it waits for the next system call.
fn alarm_between_instructions(
    ctx: &Ctx,
    g: &mut Shared,
    t: &mut GuestThread,
    at_cpl3_path: bool,
) -> Result<Option<ProcessEnd>> {
    g.kernel.check_alarm();
    if !at_cpl3_path || !g.kernel.signals.deliverable() {
        return Ok(None);
    }
    let sregs = t.vcpu.fd().get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    // The registers are kvm_run's copy if the VMM changed it and KVM has not taken the
    // change yet (a stop before the next KVM_RUN); else KVM's own, which the backend may
    // have set by ioctl (an emulated store) after kvm_run's copy was made.
    let pending = t.vcpu.fd_mut().get_kvm_run().kvm_dirty_regs
        & u64::from(kvm_bindings::KVM_SYNC_X86_REGS)
        != 0;
    let mut user = if pending {
        t.vcpu.fd().sync_regs().regs
    } else {
        t.vcpu.fd().get_regs().map_err(kvm_err("KVM_GET_REGS"))?
    };
    if sregs.cs.dpl != 3 || user.rip & !(PAGE - 1) == STUB_VA {
        return Ok(None);
    }
    if let Some(end) = deliver(g, t, &mut user, None) {
        return Ok(Some(end));
    }
    g.tracking.commit(&ctx.vm, &mut g.kernel.mm, None)?;
    let fd = t.vcpu.fd_mut();
    if pending {
        fd.sync_regs_mut().regs = user;
        fd.set_sync_dirty_reg(SyncReg::Register);
    } else {
        fd.set_regs(&user).map_err(kvm_err("KVM_SET_REGS"))?;
    }
    Ok(None)
}

/// Serves one call: the thread calls here, the rest in the kernel.
fn serve<'a>(
    ctx: &'a Arc<Ctx>,
    mut g: Guard<'a>,
    t: &GuestThread,
    regs: &kvm_regs,
) -> (Guard<'a>, Served) {
    let n = regs.rax;
    let a = [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9];
    let threaded = g.threads.len() > 1;
    let mine = matches!(
        n,
        nr::EXIT
            | nr::EXIT_GROUP
            | nr::GETTID
            | nr::SET_TID_ADDRESS
            | nr::CLONE
            | nr::CLONE3
            | nr::FUTEX
            | nr::TKILL
            | nr::TGKILL
            | nr::SCHED_YIELD
            | nr::RT_SIGTIMEDWAIT
    ) || (threaded
        && matches!(
            n,
            nr::NANOSLEEP | nr::CLOCK_NANOSLEEP | nr::PAUSE | nr::RT_SIGSUSPEND
        ));
    if !mine {
        return deferring(ctx, g, t, n, a, threaded);
    }
    *g.kernel.counts.by_number.entry(n).or_default() += 1;
    let res: SysResult = match n {
        nr::EXIT => return (g, Served::ThreadExit(i32::from(a[0].to_le_bytes()[0]))),
        nr::EXIT_GROUP => {
            return (
                g,
                Served::Kernel(Flow::Exit(i32::from(a[0].to_le_bytes()[0]))),
            );
        }
        nr::GETTID => Ok(t.tid),
        nr::SET_TID_ADDRESS => {
            if let Some(e) = g.threads.get_mut(&t.tid) {
                e.clear_tid = a[0];
            }
            Ok(t.tid)
        }
        nr::CLONE => clone(ctx, &mut g, t, regs, a[0], a[1], a[2], a[3], a[4]),
        nr::CLONE3 => clone3(ctx, &mut g, t, regs, a[0], a[1]),
        nr::TKILL => tgkill(ctx, &mut g, t, PID, a[0], a[1]),
        nr::TGKILL => tgkill(ctx, &mut g, t, a[0], a[1], a[2]),
        nr::SCHED_YIELD => {
            g.swap_out(t.tid);
            drop(g);
            std::thread::yield_now();
            g = ctx.lock();
            g.swap_in(t.tid);
            if g.end.is_some() {
                return (g, Served::Leave);
            }
            Ok(0)
        }
        nr::RT_SIGTIMEDWAIT => {
            let (g2, r) = sigtimedwait(ctx, g, t, a);
            g = g2;
            match r {
                Err(stop) => return (g, stop.into()),
                Ok(v) => v,
            }
        }
        nr::FUTEX => {
            let (g2, r) = futex(ctx, g, t, a);
            g = g2;
            match r {
                Err(stop) => return (g, stop.into()),
                Ok(v) => v,
            }
        }
        _ => {
            let (g2, r) = threaded_wait(ctx, g, t, n, a);
            g = g2;
            match r {
                Err(stop) => return (g, stop.into()),
                Ok(v) => v,
            }
        }
    };
    match res {
        Err(ENOSYS) => *g.kernel.counts.unknown.entry(n).or_default() += 1,
        Err(EPERM) => *g.kernel.counts.refused.entry(n).or_default() += 1,
        _ => {}
    }
    if ctx.deadline.is_some_and(|d| Instant::now() >= d) {
        return (g, Served::Kernel(Flow::Timeout));
    }
    (g, Served::Kernel(Flow::Return(ret(res))))
}

/// A call the kernel serves. With more than one thread, a call that would wait (`read`,
/// `write`, `poll`, `select`, a waiting record lock...) defers its wait: the thread waits
/// here without the lock, for the call's descriptors, its timeout, a signal (its wake fd)
/// or the end of the process, then the call is served again. A signal this thread may take
/// ends the wait with `EINTR` (a write that wrote some returns that count).
fn deferring<'a>(
    ctx: &'a Ctx,
    mut g: Guard<'a>,
    t: &GuestThread,
    n: u64,
    a: [u64; 6],
    threaded: bool,
) -> (Guard<'a>, Served) {
    let mut retry = None;
    loop {
        // Set at each turn: other threads serve calls while this one waits.
        g.kernel.defer_waits = threaded && ctx.ended_fd.is_some();
        g.kernel.retry_until = retry;
        let flow = g.kernel.syscall(
            n,
            a,
            &KvmCaller {
                vcpu: t.vcpu.fd(),
                vm: ctx.vm.vm_fd(),
            },
        );
        g.kernel.retry_until = None;
        g.kernel.write_resume = 0;
        if retry.is_some() {
            // Counted once, as the call the program made.
            let counts = &mut g.kernel.counts.by_number;
            if let Some(c) = counts.get_mut(&n) {
                *c = c.saturating_sub(1);
            }
        }
        if n == nr::KILL {
            // A signal for the process may end another thread's wait.
            for e in g.threads.values() {
                poke(e.wake_fd.as_deref(), &ctx.host_errors);
            }
            ctx.wake.notify_all();
        }
        let deferred = matches!(flow, Flow::Return(v) if v == ret(Err(ERESTARTSYS)));
        let pending = g.kernel.pending.take();
        let Some(p) = pending.filter(|_| deferred) else {
            // A call that deferred a wait and then returned anyway (readv with some data)
            // is done; ERESTARTSYS never reaches the program.
            g.kernel.defer_waits = false;
            let flow = if deferred {
                Flow::Return(ret(Err(EINTR)))
            } else {
                flow
            };
            return (g, Served::Kernel(flow));
        };
        let wake = g.threads.get(&t.tid).and_then(|e| e.wake_fd.clone());
        drain(wake.as_deref(), &ctx.host_errors);
        g.kernel.check_alarm();
        if g.kernel.signals.deliverable() {
            g.kernel.defer_waits = false;
            let r = if p.written > 0 {
                Ok(p.written as u64)
            } else if matches!(n, nr::READ | nr::READV | nr::WRITE | nr::WRITEV | nr::FCNTL) {
                // Linux's ERESTARTSYS calls; poll and select end with EINTR after a handler.
                Err(EINTR_RESTARTABLE)
            } else {
                Err(EINTR)
            };
            return (g, Served::Kernel(Flow::Return(ret(r))));
        }
        let until = [p.until, g.kernel.alarm_at()].into_iter().flatten().min();
        g.swap_out(t.tid);
        drop(g);
        ctx.wait_fds(&p.fds, wake.as_deref(), until);
        g = ctx.lock();
        g.swap_in(t.tid);
        if g.end.is_some() {
            g.kernel.defer_waits = false;
            return (g, Served::Leave);
        }
        if ctx.deadline.is_some_and(|d| Instant::now() >= d) {
            g.kernel.defer_waits = false;
            return (g, Served::Kernel(Flow::Timeout));
        }
        g.kernel.write_resume = p.written;
        retry = Some(p.until);
    }
}

/// A wait that did not end with a result for the program.
enum Stop {
    /// The process is ending.
    Leave,
    /// The run's deadline passed.
    Deadline,
}

impl From<Stop> for Served {
    fn from(stop: Stop) -> Served {
        match stop {
            Stop::Leave => Served::Leave,
            Stop::Deadline => Served::Kernel(Flow::Timeout),
        }
    }
}

/// Waits on [`Ctx::wake`] until `done`, `until`, a signal this thread may take, the run's
/// deadline or the end of the process. The thread's signal state is swapped out while it
/// waits (another thread may serve a call meanwhile).
fn wait_for<'a>(
    ctx: &'a Ctx,
    mut g: Guard<'a>,
    tid: u64,
    until: Option<Instant>,
    done: impl Fn(&Shared) -> bool,
) -> (Guard<'a>, WaitEnd) {
    loop {
        if g.end.is_some() {
            return (g, WaitEnd::Leave);
        }
        if done(&g) {
            return (g, WaitEnd::Done);
        }
        g.kernel.check_alarm();
        if g.kernel.signals.deliverable() {
            return (g, WaitEnd::Signal);
        }
        let now = Instant::now();
        if ctx.deadline.is_some_and(|d| now >= d) {
            return (g, WaitEnd::Deadline);
        }
        if until.is_some_and(|u| now >= u) {
            return (g, WaitEnd::TimedOut);
        }
        let limit = [until, ctx.deadline, g.kernel.alarm_at()]
            .into_iter()
            .flatten()
            .min();
        g.swap_out(tid);
        g = match limit {
            Some(l) => {
                ctx.wake
                    .wait_timeout(g, l.saturating_duration_since(now))
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => ctx.wake.wait(g).unwrap_or_else(|e| e.into_inner()),
        };
        g.swap_in(tid);
    }
}

/// A `struct timespec` at `va`: `EINVAL` for a negative or non-normal one.
fn read_timespec(g: &Shared, va: u64) -> SysResult<Duration> {
    let mut b = [0u8; 16];
    g.kernel.mm.read_user(va, &mut b)?;
    let secs = i64::from_le_bytes(b[..8].try_into().map_err(|_| EFAULT)?);
    let nanos = i64::from_le_bytes(b[8..].try_into().map_err(|_| EFAULT)?);
    if secs < 0 || !(0..1_000_000_000).contains(&nanos) {
        return Err(EINVAL);
    }
    Ok(Duration::from_secs(secs.cast_unsigned()) + Duration::from_nanos(nanos.cast_unsigned()))
}

/// `futex(uaddr, op, val, timeout, uaddr2, val3)`.
fn futex<'a>(
    ctx: &'a Ctx,
    mut g: Guard<'a>,
    t: &GuestThread,
    a: [u64; 6],
) -> (Guard<'a>, Result<SysResult, Stop>) {
    let (addr, op) = (a[0], a[1]);
    let val = a[2] & 0xffff_ffff;
    let cmd = op & FUTEX_CMD_MASK;
    if op & FUTEX_CLOCK_REALTIME != 0 && cmd != FUTEX_WAIT_BITSET {
        // Linux's do_futex: the flag goes with the absolute waits only (the PI ones are
        // ENOSYS here anyway).
        return (g, Ok(Err(ENOSYS)));
    }
    if !addr.is_multiple_of(4) {
        return (g, Ok(Err(EINVAL)));
    }
    let word = |g: &Shared, at: u64| -> SysResult<u64> {
        let mut b = [0u8; 4];
        g.kernel.mm.read_user(at, &mut b)?;
        Ok(u64::from(u32::from_le_bytes(b)))
    };
    let bitset = u32::try_from(a[5] & 0xffff_ffff).unwrap_or(u32::MAX);
    match cmd {
        FUTEX_WAIT | FUTEX_WAIT_BITSET => {
            let bitset = if cmd == FUTEX_WAIT { u32::MAX } else { bitset };
            if bitset == 0 {
                return (g, Ok(Err(EINVAL)));
            }
            let until = if a[3] == 0 {
                None
            } else {
                let d = match read_timespec(&g, a[3]) {
                    Ok(d) => d,
                    Err(e) => return (g, Ok(Err(e))),
                };
                let now = Instant::now();
                if cmd == FUTEX_WAIT {
                    Some(now.checked_add(d))
                } else if op & FUTEX_CLOCK_REALTIME != 0 {
                    let real = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default();
                    Some(now.checked_add(d.saturating_sub(real)))
                } else {
                    let mono = g.kernel.monotonic_now();
                    Some(now.checked_add(d.saturating_sub(mono)))
                }
            };
            // Beyond what an Instant holds, the wait is forever.
            let until = until.flatten();
            match word(&g, addr) {
                Ok(v) if v != val => return (g, Ok(Err(EAGAIN))),
                Ok(_) => {}
                Err(e) => return (g, Ok(Err(e))),
            }
            let tid = t.tid;
            if let Some(e) = g.threads.get_mut(&tid) {
                e.woken = false;
            }
            g.futex.push(Waiter { tid, addr, bitset });
            let (mut g, how) = wait_for(ctx, g, tid, until, |s| {
                s.threads.get(&tid).is_none_or(|e| e.woken)
            });
            g.futex.retain(|w| w.tid != tid);
            let r = match how {
                WaitEnd::Done => Ok(Ok(0)),
                WaitEnd::TimedOut => Ok(Err(ETIMEDOUT)),
                // Linux: ERESTARTSYS without a timeout, else a restart block (EINTR after a
                // handler).
                WaitEnd::Signal if until.is_none() => Ok(Err(EINTR_RESTARTABLE)),
                WaitEnd::Signal => Ok(Err(EINTR)),
                WaitEnd::Deadline => Err(Stop::Deadline),
                WaitEnd::Leave => Err(Stop::Leave),
            };
            (g, r)
        }
        FUTEX_WAKE | FUTEX_WAKE_BITSET => {
            let bitset = if cmd == FUTEX_WAKE { u32::MAX } else { bitset };
            if bitset == 0 {
                return (g, Ok(Err(EINVAL)));
            }
            let n = g.futex_wake(addr, val, bitset);
            if n > 0 {
                ctx.wake.notify_all();
            }
            (g, Ok(Ok(n)))
        }
        FUTEX_REQUEUE | FUTEX_CMP_REQUEUE => {
            let (to, requeue) = (a[4], a[3] & 0xffff_ffff);
            if !to.is_multiple_of(4) {
                return (g, Ok(Err(EINVAL)));
            }
            if cmd == FUTEX_CMP_REQUEUE {
                match word(&g, addr) {
                    Ok(v) if v != a[5] & 0xffff_ffff => return (g, Ok(Err(EAGAIN))),
                    Ok(_) => {}
                    Err(e) => return (g, Ok(Err(e))),
                }
            }
            let n = g.futex_wake(addr, val, u32::MAX);
            let mut moved = 0;
            for w in g.futex.iter_mut() {
                if moved == requeue {
                    break;
                }
                if w.addr == addr {
                    w.addr = to;
                    moved += 1;
                }
            }
            if n > 0 {
                ctx.wake.notify_all();
            }
            // Both return the waiters woken plus those requeued, as Linux's futex_requeue.
            (g, Ok(Ok(n + moved)))
        }
        _ => (g, Ok(Err(ENOSYS))),
    }
}

/// `rt_sigtimedwait(set, info, timeout, sigsetsize)`: takes a pending signal of `set`
/// (blocked or not), waiting without the lock up to `timeout` (`NULL`: forever) for one;
/// another signal the thread may take ends the wait with `EINTR`.
fn sigtimedwait<'a>(
    ctx: &'a Ctx,
    g: Guard<'a>,
    t: &GuestThread,
    a: [u64; 6],
) -> (Guard<'a>, Result<SysResult, Stop>) {
    // SIGKILL and SIGSTOP are never waited for.
    const UNWAITABLE: u64 = (1 << 8) | (1 << 18);
    if a[3] != 8 {
        return (g, Ok(Err(EINVAL)));
    }
    let mut b = [0u8; 8];
    if let Err(e) = g.kernel.mm.read_user(a[0], &mut b) {
        return (g, Ok(Err(e)));
    }
    let set = u64::from_le_bytes(b) & !UNWAITABLE;
    let until = if a[2] == 0 {
        None
    } else {
        match read_timespec(&g, a[2]) {
            // Beyond what an Instant holds, the wait is forever.
            Ok(d) => Instant::now().checked_add(d),
            Err(e) => return (g, Ok(Err(e))),
        }
    };
    let (mut g, how) = wait_for(ctx, g, t.tid, until, |s| s.kernel.signals.pending_in(set));
    let r = match how {
        WaitEnd::Done | WaitEnd::Signal => match g.kernel.signals.take_in(set) {
            Some((sig, code)) => {
                if a[1] != 0 {
                    // siginfo_t: si_signo, si_errno, si_code, then the sender's pid and uid.
                    let (uid, _) = host_ids();
                    let mut info = [0u8; 128];
                    info[..4].copy_from_slice(&sig.to_le_bytes());
                    info[8..12].copy_from_slice(&code.to_le_bytes());
                    info[16..20].copy_from_slice(&u32::try_from(PID).unwrap_or(1000).to_le_bytes());
                    info[20..24].copy_from_slice(&uid.to_le_bytes());
                    match g.kernel.mm.write_user(a[1], &info) {
                        Ok(()) => Ok(Ok(u64::from(sig))),
                        Err(e) => Ok(Err(e)),
                    }
                } else {
                    Ok(Ok(u64::from(sig)))
                }
            }
            None => Ok(Err(EINTR)),
        },
        WaitEnd::TimedOut => Ok(Err(EAGAIN)),
        WaitEnd::Deadline => Err(Stop::Deadline),
        WaitEnd::Leave => Err(Stop::Leave),
    };
    (g, r)
}

/// `nanosleep`, `clock_nanosleep`, `pause` and `rt_sigsuspend` of a thread among others: the
/// wait releases the shared state.
fn threaded_wait<'a>(
    ctx: &'a Ctx,
    mut g: Guard<'a>,
    t: &GuestThread,
    n: u64,
    a: [u64; 6],
) -> (Guard<'a>, Result<SysResult, Stop>) {
    let (until, rem) = match n {
        nr::NANOSLEEP | nr::CLOCK_NANOSLEEP => {
            let (req, rem, flags) = if n == nr::NANOSLEEP {
                (a[0], a[1], 0)
            } else {
                (a[2], a[3], a[1])
            };
            let d = match read_timespec(&g, req) {
                Ok(d) => d,
                Err(e) => return (g, Ok(Err(e))),
            };
            if flags & TIMER_ABSTIME != 0 {
                // Until the clock reads `d` (CLOCK_REALTIME: the host's; the others: the
                // guest's monotonic clock); `rem` is not written.
                let now = if a[0] == CLOCK_REALTIME {
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default()
                } else {
                    g.kernel.monotonic_now()
                };
                (Some(Instant::now().checked_add(d.saturating_sub(now))), 0)
            } else {
                (Some(Instant::now().checked_add(d)), rem)
            }
        }
        nr::RT_SIGSUSPEND => {
            if a[1] != 8 {
                return (g, Ok(Err(EINVAL)));
            }
            let mut b = [0u8; 8];
            if let Err(e) = g.kernel.mm.read_user(a[0], &mut b) {
                return (g, Ok(Err(e)));
            }
            g.kernel.signals.suspend(u64::from_le_bytes(b));
            (None, 0)
        }
        _ => (None, 0),
    };
    let end = until.flatten();
    let forever = until.is_none() || end.is_none();
    let (mut g, how) = wait_for(ctx, g, t.tid, if forever { None } else { end }, |_| false);
    let r = match how {
        WaitEnd::Signal if rem != 0 && !forever => {
            let left = end.map_or(Duration::ZERO, |e| {
                e.saturating_duration_since(Instant::now())
            });
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&left.as_secs().to_le_bytes());
            b[8..].copy_from_slice(&u64::from(left.subsec_nanos()).to_le_bytes());
            Ok(g.kernel.mm.write_user(rem, &b).and(Err(EINTR)))
        }
        WaitEnd::Signal | WaitEnd::Done => Ok(Err(EINTR)),
        WaitEnd::TimedOut => Ok(Ok(0)),
        WaitEnd::Deadline => Err(Stop::Deadline),
        WaitEnd::Leave => Err(Stop::Leave),
    };
    if n == nr::RT_SIGSUSPEND && !matches!(how, WaitEnd::Signal) {
        g.kernel.signals.end_suspend();
    }
    (g, r)
}

/// `tgkill(tgid, tid, sig)` (`tkill` with the pid as `tgid`).
fn tgkill(ctx: &Ctx, g: &mut Shared, t: &GuestThread, tgid: u64, tid: u64, sig: u64) -> SysResult {
    let (tgid, tid, sig) = (int(tgid), int(tid), int(sig));
    if !(0..=64).contains(&sig) || tid <= 0 {
        return Err(EINVAL);
    }
    if tgid != PID.cast_signed() {
        // No signal reaches another process, on the host or anywhere.
        return Err(EPERM);
    }
    let tid = tid.cast_unsigned();
    if !g.threads.contains_key(&tid) {
        return Err(ESRCH);
    }
    let Ok(sig) = u32::try_from(sig) else {
        return Err(EINVAL);
    };
    if sig == 0 {
        return Ok(0);
    }
    if tid == t.tid {
        g.kernel.signals.raise_thread(sig);
    } else {
        let signals = &g.kernel.signals;
        if let Some(e) = g.threads.get_mut(&tid) {
            // Even a blocked one: the thread may wait for it in rt_sigtimedwait.
            signals.raise_other(&mut e.signals, sig);
            poke(e.wake_fd.as_deref(), &ctx.host_errors);
            ctx.wake.notify_all();
        }
    }
    Ok(0)
}

/// An `int` argument: the low 32 bits, sign-extended.
fn int(v: u64) -> i64 {
    let b = v.to_le_bytes();
    i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// `clone3(args, size)`: `struct clone_args` (at least its first 64 bytes).
fn clone3(
    ctx: &Arc<Ctx>,
    g: &mut Shared,
    t: &GuestThread,
    regs: &kvm_regs,
    args: u64,
    size: u64,
) -> SysResult {
    // As Linux's copy_clone_args_from_user: larger than a page is E2BIG, smaller than the
    // first version EINVAL, and bytes past the struct this kernel knows must be zero.
    if size > 4096 {
        return Err(E2BIG);
    }
    if size < 64 {
        return Err(EINVAL);
    }
    let mut b = [0u8; 88];
    let n = usize::try_from(size.min(88)).map_err(|_| EINVAL)?;
    g.kernel.mm.read_user(args, &mut b[..n])?;
    if size > 88 {
        let mut rest = vec![0u8; usize::try_from(size - 88).map_err(|_| EINVAL)?];
        g.kernel.mm.read_user(args + 88, &mut rest)?;
        if rest.iter().any(|&x| x != 0) {
            return Err(E2BIG);
        }
    }
    let f = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let (flags, child_tid, parent_tid, stack, stack_size, tls) =
        (f(0), f(2), f(3), f(5), f(6), f(7));
    // pidfd is read only with CLONE_PIDFD (glibc fills it in anyway); set_tid is not for
    // threads.
    if f(8) != 0 || f(9) != 0 {
        return Err(EINVAL);
    }
    // clone3_stack_valid: a stack has a size, and a size a stack.
    if (stack == 0) != (stack_size == 0) {
        return Err(EINVAL);
    }
    let sp = if stack == 0 {
        0
    } else {
        stack.checked_add(stack_size).ok_or(EINVAL)?
    };
    clone(ctx, g, t, regs, flags, sp, parent_tid, child_tid, tls)
}

/// `clone(flags, stack, parent_tid, child_tid, tls)`: a thread (anything else is `EPERM`,
/// as the VMM runs no second process).
#[expect(clippy::too_many_arguments, reason = "the system call's own arguments")]
fn clone(
    ctx: &Arc<Ctx>,
    g: &mut Shared,
    t: &GuestThread,
    regs: &kvm_regs,
    flags: u64,
    stack: u64,
    parent_tid: u64,
    child_tid: u64,
    tls: u64,
) -> SysResult {
    let flags = flags & !0xff;
    if flags & CLONE_THREAD == 0 {
        // fork, vfork, posix_spawn's CLONE_VM|CLONE_VFORK: a new process.
        return Err(EPERM);
    }
    if flags & CLONE_SHARED != CLONE_SHARED || flags & !(CLONE_SHARED | CLONE_EXTRA) != 0 {
        return Err(EINVAL);
    }
    if flags & CLONE_SETTLS != 0 && tls >= TASK_SIZE_MAX {
        // An FS base outside user space, as Linux's ARCH_SET_FS refuses it.
        return Err(EPERM);
    }
    if g.threads.len() >= MAX_THREADS {
        return Err(EAGAIN);
    }
    let tid = g.next_tid;
    let (mut vcpu, initial) = match g.free_vcpus.pop() {
        Some((v, s)) => (v, Some(s)),
        None => {
            let index = g.next_index;
            if index >= x86::MAX_VCPUS {
                return Err(EAGAIN);
            }
            let v = ctx.vm.create_vcpu(index).map_err(|_| EAGAIN)?;
            g.next_index += 1;
            (v, None)
        }
    };
    let child = kvm_regs {
        rip: regs.rcx,
        rflags: regs.r11,
        rax: 0,
        rsp: if stack == 0 { regs.rsp } else { stack },
        ..*regs
    };
    let tls = (flags & CLONE_SETTLS != 0).then_some(tls);
    let initial = match set_up_vcpu(ctx, g, t, &mut vcpu, initial, &child, tls) {
        Ok(s) => s,
        // A vCPU that could not be set up is not used again.
        Err(_) => return Err(EAGAIN),
    };
    let tid32 = u32::try_from(tid).map_err(|_| EAGAIN)?.to_le_bytes();
    if flags & CLONE_PARENT_SETTID != 0
        && let Err(e) = g.kernel.mm.write_user(parent_tid, &tid32)
    {
        // As Linux's copy_process: a store that faults is ignored, the thread still starts
        // (the program passed a bad pointer; it is told nothing either way).
        debug_assert_eq!(e, EFAULT);
    }
    if flags & CLONE_CHILD_SETTID != 0 && g.kernel.mm.write_user(child_tid, &tid32).is_err() {
        g.free_vcpus.push((vcpu, initial));
        return Err(EFAULT);
    }
    let blocked = g.kernel.signals.blocked;
    g.threads.insert(
        tid,
        Entry {
            stopper: vcpu.stopper(),
            signals: ThreadSignals::inherit(blocked),
            clear_tid: if flags & CLONE_CHILD_CLEARTID != 0 {
                child_tid
            } else {
                0
            },
            woken: false,
            wake_fd: new_wake_fd(),
        },
    );
    let mut thread = GuestThread::new(vcpu, tid);
    thread.initial = Some(initial);
    let ctx2 = Arc::clone(ctx);
    let spawned = std::thread::Builder::new()
        .name(format!("pagetrack-tid{tid}"))
        .spawn(move || {
            let run = std::panic::AssertUnwindSafe(|| run_thread(&ctx2, thread, None, true));
            if std::panic::catch_unwind(run).is_err() {
                // A bug, not the guest's doing: end the process rather than leave the others
                // waiting for this thread.
                let mut g = ctx2.lock();
                let end = ProcessEnd::Crashed(format!("the VMM's thread for tid {tid} panicked"));
                ctx2.end_process(&mut g, Ok(end), None);
            }
        });
    match spawned {
        Ok(h) => {
            g.handles.push(h);
            g.next_tid += 1;
            Ok(tid)
        }
        Err(_) => {
            // The closure, and the vCPU in it, are gone; the next thread takes a new one.
            g.threads.remove(&tid);
            Err(EAGAIN)
        }
    }
}

/// Makes `vcpu` start where the `clone` caller `t` returns, with registers `child` and the
/// caller's FPU state, FS base `tls` (or the caller's). A new vCPU (`initial` none) gets the
/// long-mode set-up; a reused one its first set-up's system registers again. Returns those.
fn set_up_vcpu(
    ctx: &Ctx,
    g: &Shared,
    t: &GuestThread,
    vcpu: &mut Vcpu,
    initial: Option<kvm_sregs>,
    child: &kvm_regs,
    tls: Option<u64>,
) -> Result<kvm_sregs> {
    let parent = t.vcpu.fd();
    let psregs = parent.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let fpu = parent.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
    let initial = match initial {
        Some(s) => s,
        None => {
            x86::setup_long_mode(
                ctx.vm.kvm(),
                vcpu.fd(),
                &*ctx.vm.untracked_memory(),
                &ctx.layout,
                child.rip,
                vcpu.index(),
            )?;
            vcpu.fd().get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?
        }
    };
    let fd = vcpu.fd_mut();
    // Nothing of the vCPU's previous thread may reach KVM with the next run.
    fd.get_kvm_run().kvm_dirty_regs = 0;
    let mut sregs = initial;
    sregs.cr3 = g.kernel.mm.cr3();
    sregs.fs.base = tls.unwrap_or(psregs.fs.base);
    sregs.gs.base = psregs.gs.base;
    fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    super::set_syscall_msrs(fd)?;
    fd.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
    fd.set_regs(child).map_err(kvm_err("KVM_SET_REGS"))?;
    fd.set_sync_valid_reg(SyncReg::Register);
    Ok(initial)
}
