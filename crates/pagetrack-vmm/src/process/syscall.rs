//! The system calls the VMM serves for the program: what a static busybox or glibc program
//! needs for file filters (read/write, open/stat/seek on contained files, memory management,
//! time, identity), `-ENOSYS` for everything else (counted), and refusals (`EPERM`, `EACCES`)
//! for what would reach the host (fork, exec, sockets, signals to other processes, paths
//! outside the allowed directories). Threads (`clone`, `futex`, `exit`, tids) are served by
//! the `thread` module, which holds this kernel behind a mutex.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use rustix::event::{PollFd, PollFlags};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvm_ioctls::{VcpuFd, VmFd};

use super::abi::{
    AT_EMPTY_PATH, AT_FDCWD, AT_SYMLINK_NOFOLLOW, EACCES, EAGAIN, EBADF, ECHILD, EFAULT, EINTR,
    EINTR_RESTARTABLE, EINVAL, EIO, EMFILE, ENOENT, ENOMEM, ENOSYS, ENOTDIR, ENOTTY, EPERM, EPIPE,
    ERANGE, ERESTARTSYS, ESRCH, Errno, O_ACCMODE, O_CLOEXEC, O_RDWR, O_WRONLY, PROT_READ,
    PROT_WRITE, SysResult, nr,
};
use super::fs::{Base, Input, Node, OpenFile, Output, Readiness, RecordLock, Sandbox, StdinState};
use super::mm::{AddressSpace, GuestRam, PAGE, USER_END};
use super::mmcalls;
use super::signal::{self, SI_KERNEL, SI_TKILL, SI_USER, SIGALRM, SIGPIPE, Signals};
use super::vdso::GuestClock;
use pagetrack_kvm::TrackedMemory;

/// `O_NONBLOCK`.
const O_NONBLOCK: u64 = 0o4000;
/// Largest transfer of one read or write (a short count beyond it, as Linux allows).
const MAX_IO: u64 = 4 << 20;
/// Largest path the program may pass.
const PATH_MAX: usize = 4096;
/// Most descriptors open at once.
const MAX_FDS: i64 = 1024;
/// Most iovec entries (`UIO_MAXIOV`).
const IOV_MAX: u64 = 1024;
/// The program's process id.
pub const PID: u64 = 1000;

/// What a system call reads or changes of the vCPU and VM it came from, beyond guest
/// memory: the stack pointer, the FS and GS bases, the VM's kvmclock. [`KvmCaller`] in a
/// VM; the unit tests use a plain value, so the dispatcher runs without `/dev/kvm`.
pub trait Caller {
    /// The calling thread's stack pointer.
    fn stack_pointer(&self) -> u64;

    /// The FS and GS bases.
    ///
    /// # Errors
    /// `EIO` if they cannot be read.
    fn segment_bases(&self) -> SysResult<(u64, u64)>;

    /// Sets the FS base (`gs == false`) or the GS base.
    ///
    /// # Errors
    /// `EIO` if it cannot be set.
    fn set_segment_base(&self, gs: bool, base: u64) -> SysResult<()>;

    /// The VM's kvmclock in nanoseconds, if it can be read.
    fn kvmclock(&self) -> Option<u64>;
}

/// The vCPU and VM of a call in a real VM.
#[derive(Clone, Copy, Debug)]
pub struct KvmCaller<'a> {
    /// The calling vCPU.
    pub vcpu: &'a VcpuFd,
    /// Its VM.
    pub vm: &'a VmFd,
}

impl Caller for KvmCaller<'_> {
    fn stack_pointer(&self) -> u64 {
        self.vcpu.sync_regs().regs.rsp
    }

    fn segment_bases(&self) -> SysResult<(u64, u64)> {
        let s = self.vcpu.get_sregs().map_err(|_| EIO)?;
        Ok((s.fs.base, s.gs.base))
    }

    fn set_segment_base(&self, gs: bool, base: u64) -> SysResult<()> {
        let mut s = self.vcpu.get_sregs().map_err(|_| EIO)?;
        if gs {
            s.gs.base = base;
        } else {
            s.fs.base = base;
        }
        self.vcpu.set_sregs(&s).map_err(|_| EIO)
    }

    fn kvmclock(&self) -> Option<u64> {
        self.vm.get_clock().ok().map(|c| c.clock)
    }
}

/// What the run loop does after a system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Return this value (a negative errno as two's complement) to the program.
    Return(u64),
    /// The program called exit or exit_group with this status.
    Exit(i32),
    /// `rt_sigreturn`: restore the registers saved in the signal frame below RSP.
    SigReturn,
    /// The run's timeout passed while the call was served (a sleep, a wait for input).
    Timeout,
}

/// Where standard output or error goes.
#[derive(Debug)]
struct Sink {
    mode: Output,
    err: bool,
    captured: Vec<u8>,
}

impl Sink {
    /// Writes `data`; with a run `deadline`, never blocks past it (a short count then).
    fn write(&mut self, data: &[u8], deadline: Option<Instant>) -> SysResult<usize> {
        match self.mode {
            Output::Inherit if let Some(end) = deadline => {
                return if self.err {
                    write_until(std::io::stderr().lock().as_fd(), data, end)
                } else {
                    write_until(std::io::stdout().lock().as_fd(), data, end)
                };
            }
            Output::Inherit => {
                let res = if self.err {
                    let mut e = std::io::stderr().lock();
                    e.write_all(data).and_then(|()| e.flush())
                } else {
                    let mut o = std::io::stdout().lock();
                    o.write_all(data).and_then(|()| o.flush())
                };
                res.map_err(|e| {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        EPIPE
                    } else {
                        Errno::from_io(&e)
                    }
                })?;
            }
            Output::Capture => self.captured.extend_from_slice(data),
            Output::Null => {}
        }
        Ok(data.len())
    }
}

/// Writes `data` to `fd` (pagetrack's standard output or error) until `end` at the
/// latest: waits for room with `poll`, then writes at most `PIPE_BUF` bytes, which a pipe
/// with room takes without blocking. Returns how much was written.
fn write_until(fd: std::os::fd::BorrowedFd<'_>, data: &[u8], end: Instant) -> SysResult<usize> {
    const PIPE_BUF: usize = 4096;
    let mut done = 0;
    while done < data.len() {
        let left = end.saturating_duration_since(Instant::now());
        let ts = rustix::event::Timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut p = [PollFd::new(&fd, PollFlags::OUT)];
        let r = match rustix::event::poll(&mut p, Some(&ts)) {
            Ok(0) if Instant::now() >= end => break,
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {
                let n = (data.len() - done).min(PIPE_BUF);
                rustix::io::write(fd, &data[done..done + n])
            }
            Err(e) => Err(e),
        };
        match r {
            Ok(k) => done += k,
            Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
            Err(_) if done > 0 => break,
            Err(e) => return Err(super::fs::sys(e)),
        }
    }
    Ok(done)
}

/// One descriptor.
#[derive(Debug, Clone)]
struct Fd {
    file: Arc<Mutex<OpenFile>>,
    cloexec: bool,
}

fn lock(f: &Arc<Mutex<OpenFile>>) -> MutexGuard<'_, OpenFile> {
    // Threads serve system calls one at a time (the kernel's mutex); a poisoned lock only
    // means an earlier panic.
    f.lock().unwrap_or_else(|e| e.into_inner())
}

/// `EBADF` for an `O_PATH` descriptor: `fchmod` and `fchown` refuse one (the `*at` calls
/// with `AT_EMPTY_PATH` take it).
fn opath_ebadf(f: &Arc<Mutex<OpenFile>>) -> SysResult<()> {
    const O_PATH: u64 = 0o10_000_000;
    if lock(f).flags & O_PATH != 0 {
        Err(EBADF)
    } else {
        Ok(())
    }
}

/// Counts of system calls.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyscallCounts {
    /// Calls served, by number (every call, whatever its result).
    pub by_number: BTreeMap<u64, u64>,
    /// Calls the VMM does not implement: `-ENOSYS`, by number.
    pub unknown: BTreeMap<u64, u64>,
    /// Calls refused by containment (fork, exec, clone, sockets, signals to others, paths
    /// outside the allowed directories), by number.
    pub refused: BTreeMap<u64, u64>,
}

impl SyscallCounts {
    /// Every call.
    pub fn total(&self) -> u64 {
        self.by_number.values().sum()
    }
}

/// The VMM's side of the process: its memory, files and identity.
#[derive(Debug)]
pub struct Kernel<M: GuestRam = TrackedMemory> {
    pub(crate) mm: AddressSpace<M>,
    sandbox: Sandbox,
    fds: BTreeMap<i64, Fd>,
    stdout: Sink,
    stderr: Sink,
    pub(crate) counts: SyscallCounts,
    start: Instant,
    clock: GuestClock,
    /// Signal actions, the blocked mask, pending signals.
    pub(crate) signals: Signals,
    /// `ITIMER_REAL`: when it fires next, and its interval.
    alarm: Option<(Instant, Option<Duration>)>,
    deadline: Option<Instant>,
    urandom: Option<File>,
    uid: u32,
    gid: u32,
    umask: u32,
    comm: [u8; 16],
    mem_bytes: u64,
    /// With more than one thread: a call that would wait does not, but ends with
    /// `ERESTARTSYS` and leaves what it waits for in `pending`; the thread waits without the
    /// kernel's lock and serves the call again.
    pub(crate) defer_waits: bool,
    /// What the deferred call waits for.
    pub(crate) pending: Option<PendingWait>,
    /// A call served again after a deferred wait: when its wait ends (`Some(None)`: never),
    /// instead of its own timeout.
    pub(crate) retry_until: Option<Option<Instant>>,
    /// A blocking write served again: the bytes its first turns wrote.
    pub(crate) write_resume: usize,
}

/// A wait a call deferred ([`Kernel::defer_waits`]).
#[derive(Debug)]
pub(crate) struct PendingWait {
    /// Host descriptors, each with its `POLL*` events.
    pub(crate) fds: Vec<(OwnedFd, i16)>,
    /// When the wait ends at the latest (`None`: never).
    pub(crate) until: Option<Instant>,
    /// The bytes a blocking write wrote before it deferred.
    pub(crate) written: usize,
}

/// What the kernel needs to start.
#[derive(Debug)]
pub struct KernelSetup {
    pub(crate) stdin: Input,
    pub(crate) stdout: Output,
    pub(crate) stderr: Output,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) comm: Vec<u8>,
    pub(crate) mem_bytes: u64,
}

fn ret(v: SysResult) -> u64 {
    match v {
        Ok(v) => v,
        Err(Errno(e)) => (-e).cast_unsigned(),
    }
}

/// `d` from now, or as far as an `Instant` reaches (a century on): a program's timer of
/// any length must not overflow, which would panic the VMM's thread.
fn later(d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 86_400);
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(FAR))
        .unwrap_or(now)
}

/// An `int` argument: the low 32 bits of the register, sign-extended.
fn int(v: u64) -> i64 {
    let b = v.to_le_bytes();
    i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn page_up(len: u64) -> SysResult<u64> {
    len.checked_next_multiple_of(PAGE).ok_or(ENOMEM)
}

/// `struct stat` (x86-64, 144 bytes) of `m`.
fn stat_bytes(m: &std::fs::Metadata) -> [u8; 144] {
    let mut b = [0u8; 144];
    let mut put = |at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put(0, m.dev());
    put(8, m.ino());
    put(16, m.nlink());
    put(40, m.rdev());
    put(48, m.size());
    put(56, m.blksize());
    put(64, m.blocks());
    put(72, m.atime().cast_unsigned());
    put(80, m.atime_nsec().cast_unsigned());
    put(88, m.mtime().cast_unsigned());
    put(96, m.mtime_nsec().cast_unsigned());
    put(104, m.ctime().cast_unsigned());
    put(112, m.ctime_nsec().cast_unsigned());
    b[24..28].copy_from_slice(&m.mode().to_le_bytes());
    b[28..32].copy_from_slice(&m.uid().to_le_bytes());
    b[32..36].copy_from_slice(&m.gid().to_le_bytes());
    b
}

/// `struct stat` of a standard stream: a FIFO owned by the program, 4 KiB blocks.
fn stream_stat(uid: u32, gid: u32) -> [u8; 144] {
    let mut b = [0u8; 144];
    b[16..24].copy_from_slice(&1u64.to_le_bytes());
    b[24..28].copy_from_slice(&(0o010_000u32 | 0o600).to_le_bytes());
    b[28..32].copy_from_slice(&uid.to_le_bytes());
    b[32..36].copy_from_slice(&gid.to_le_bytes());
    b[56..64].copy_from_slice(&4096u64.to_le_bytes());
    b
}

fn utsname() -> [u8; 390] {
    let mut b = [0u8; 390];
    for (i, s) in [
        "Linux",
        "pagetrack",
        "6.1.0-pagetrack",
        "#1 SMP pagetrack process VM",
        "x86_64",
        "(none)",
    ]
    .iter()
    .enumerate()
    {
        b[i * 65..i * 65 + s.len()].copy_from_slice(s.as_bytes());
    }
    b
}

fn timespec(d: Duration) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&d.as_secs().to_le_bytes());
    b[8..].copy_from_slice(&u64::from(d.subsec_nanos()).to_le_bytes());
    b
}

/// A `mode_t` argument.
fn mode_arg(v: u64) -> u32 {
    u32::try_from(v & 0o7777).unwrap_or(0)
}

/// A `uid_t`/`gid_t` argument: -1 (as 32 bits) leaves it unchanged.
fn id_arg(v: u64) -> Option<u32> {
    let id = u32::try_from(v & 0xffff_ffff).unwrap_or(u32::MAX);
    (id != u32::MAX).then_some(id)
}

/// `POLLIN`.
const POLLIN: i16 = 0x1;
/// `POLLERR`.
const POLLERR: i16 = 0x8;
/// `POLLHUP`.
const POLLHUP: i16 = 0x10;
/// `POLLNVAL`.
const POLLNVAL: i16 = 0x20;

/// How long `poll` or `select` may wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// Until something is ready.
    Forever,
    /// At most this long.
    For(Duration),
}

impl Wait {
    /// `poll`'s milliseconds: negative is forever.
    fn from_ms(ms: i64) -> Wait {
        u64::try_from(ms).map_or(Wait::Forever, |m| Wait::For(Duration::from_millis(m)))
    }

    fn limit(self) -> Option<Duration> {
        match self {
            Wait::Forever => None,
            Wait::For(d) => Some(d),
        }
    }
}

/// Signals whose default action ends the process.
impl<M: GuestRam> Kernel<M> {
    /// A kernel for `mm`, with the standard streams and identity of `setup`.
    ///
    /// # Errors
    /// [`crate::Error::InvalidConfig`] for an `Input::File` standard input that cannot be
    /// opened.
    pub fn new(
        mm: AddressSpace<M>,
        sandbox: Sandbox,
        setup: KernelSetup,
    ) -> crate::Result<Kernel<M>> {
        let stdin = match setup.stdin {
            Input::Inherit => OpenFile::stream(Node::Stdin(StdinState::Host), 0),
            Input::Null => OpenFile::stream(Node::Stdin(StdinState::Bytes(Default::default())), 0),
            Input::Bytes(b) => OpenFile::stream(Node::Stdin(StdinState::Bytes(b.into())), 0),
            Input::File(p) => {
                let f = File::open(&p).map_err(|e| crate::Error::InvalidConfig {
                    reason: crate::ConfigProblem::Stdin { path: p.clone() },
                    source: Some(e),
                })?;
                OpenFile::host_file(f, p)
            }
        };
        let mut fds = BTreeMap::new();
        for (n, f) in [
            (0, stdin),
            (1, OpenFile::stream(Node::Stdout, O_WRONLY)),
            (2, OpenFile::stream(Node::Stderr, O_WRONLY)),
        ] {
            fds.insert(
                n,
                Fd {
                    file: Arc::new(Mutex::new(f)),
                    cloexec: false,
                },
            );
        }
        let mut comm = [0u8; 16];
        let n = setup.comm.len().min(15);
        comm[..n].copy_from_slice(&setup.comm[..n]);
        Ok(Kernel {
            mm,
            sandbox,
            fds,
            stdout: Sink {
                mode: setup.stdout,
                err: false,
                captured: Vec::new(),
            },
            stderr: Sink {
                mode: setup.stderr,
                err: true,
                captured: Vec::new(),
            },
            counts: SyscallCounts::default(),
            start: Instant::now(),
            clock: GuestClock::default(),
            signals: Signals::default(),
            alarm: None,
            deadline: None,
            urandom: None,
            uid: setup.uid,
            gid: setup.gid,
            umask: 0o022,
            comm,
            mem_bytes: setup.mem_bytes,
            defer_waits: false,
            pending: None,
            retry_until: None,
            write_resume: 0,
        })
    }

    /// Sleeps end here at the latest (the run's timeout).
    pub(crate) fn set_deadline(&mut self, d: Option<Instant>) {
        self.deadline = d;
    }

    /// The captured standard output and error.
    pub(crate) fn take_output(&mut self) -> (Vec<u8>, Vec<u8>) {
        (
            std::mem::take(&mut self.stdout.captured),
            std::mem::take(&mut self.stderr.captured),
        )
    }

    /// The monotonic clock as the program sees it now: 1000 s at the start.
    pub fn monotonic_now(&self) -> Duration {
        self.start.elapsed() + Duration::from_secs(1000)
    }

    /// Reads time from `clock` (the vDSO's kvmclock) from now on.
    pub fn set_clock(&mut self, clock: GuestClock) {
        self.clock = clock;
    }

    /// Serves system call `n` with arguments `a` from `caller` (its stack pointer, FS/GS
    /// bases and kvmclock).
    pub fn syscall(&mut self, n: u64, a: [u64; 6], caller: &impl Caller) -> Flow {
        *self.counts.by_number.entry(n).or_default() += 1;
        let res = match n {
            nr::EXIT | nr::EXIT_GROUP => return Flow::Exit(i32::from(a[0].to_le_bytes()[0])),
            nr::KILL | nr::TKILL | nr::TGKILL => self.kill(n, a),
            nr::RT_SIGRETURN => return Flow::SigReturn,
            // Answered as a kernel without rseq would: served, not unknown.
            nr::RSEQ => return Flow::Return(ret(Err(ENOSYS))),
            _ => self.dispatch(n, a, caller),
        };
        // A write to a pipe no one reads raises SIGPIPE, as the kernel does.
        if res == Err(EPIPE) && matches!(n, nr::WRITE | nr::WRITEV | nr::PWRITE64 | nr::SENDFILE) {
            self.signals.raise(SIGPIPE, SI_USER);
        }
        self.check_alarm();
        match res {
            Err(ENOSYS) => *self.counts.unknown.entry(n).or_default() += 1,
            Err(EACCES | EPERM) => *self.counts.refused.entry(n).or_default() += 1,
            _ => {}
        }
        // A timeout is a timeout whether the program computes or waits in a call.
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Flow::Timeout;
        }
        Flow::Return(ret(res))
    }

    fn dispatch(&mut self, n: u64, a: [u64; 6], caller: &impl Caller) -> SysResult {
        // File descriptors and other `int` arguments: the kernel reads the low 32 bits.
        let signed = int;
        match n {
            nr::READ => self.read(signed(a[0]), a[1], a[2]),
            nr::POLL => self.poll(a[0], a[1], Wait::from_ms(int(a[2]))),
            nr::PPOLL => {
                let wait = self.wait_timespec(a[2])?;
                let mask = if a[3] == 0 {
                    None
                } else if a[4] != 8 {
                    return Err(EINVAL);
                } else {
                    Some(a[3])
                };
                self.with_wait_mask(mask, wait, |k, wait| k.poll(a[0], a[1], wait))
            }
            nr::SELECT => {
                let wait = self.wait_timeval(a[4])?;
                self.select(signed(a[0]), [a[1], a[2], a[3]], wait)
            }
            nr::PSELECT6 => {
                let wait = self.wait_timespec(a[4])?;
                // The sixth argument: { const sigset_t *ss; size_t ss_len; }.
                let mask = if a[5] == 0 {
                    None
                } else {
                    let mut b = [0u8; 16];
                    self.mm.read_user(a[5], &mut b)?;
                    let ss = u64::from_le_bytes(b[..8].try_into().map_err(|_| EFAULT)?);
                    let len = u64::from_le_bytes(b[8..].try_into().map_err(|_| EFAULT)?);
                    if ss != 0 && len != 8 {
                        return Err(EINVAL);
                    }
                    (ss != 0).then_some(ss)
                };
                self.with_wait_mask(mask, wait, |k, wait| {
                    k.select(signed(a[0]), [a[1], a[2], a[3]], wait)
                })
            }
            nr::WRITE => self.write(signed(a[0]), a[1], a[2]),
            nr::READV => self.readv(signed(a[0]), a[1], a[2]),
            nr::WRITEV => self.writev(signed(a[0]), a[1], a[2]),
            nr::PREAD64 => self.pread(signed(a[0]), a[1], a[2], a[3]),
            nr::PWRITE64 => self.pwrite(signed(a[0]), a[1], a[2], a[3]),
            nr::OPEN => self.openat(AT_FDCWD, a[0], a[1], a[2]),
            nr::OPENAT => self.openat(signed(a[0]), a[1], a[2], a[3]),
            nr::CLOSE => self.fds.remove(&signed(a[0])).map(|_| 0).ok_or(EBADF),
            nr::FSTAT => self.fstat(signed(a[0]), a[1]),
            nr::STAT => self.fstatat(AT_FDCWD, a[0], a[1], 0),
            nr::LSTAT => self.fstatat(AT_FDCWD, a[0], a[1], AT_SYMLINK_NOFOLLOW),
            nr::NEWFSTATAT => self.fstatat(signed(a[0]), a[1], a[2], a[3]),
            nr::LSEEK => {
                let f = self.fd(signed(a[0]))?;
                lock(&f).seek(a[1].cast_signed(), a[2])
            }
            nr::MMAP => self.mmap(a),
            nr::MUNMAP => self.munmap(a[0], a[1]),
            nr::MPROTECT => self.mprotect(a[0], a[1], a[2]),
            nr::MREMAP => self.mremap(a),
            nr::MADVISE => self.madvise(a[0], a[1], a[2]),
            nr::BRK => Ok(self.mm.set_brk(a[0])),
            nr::RT_SIGACTION => self.sigaction(a[0], a[1], a[2], a[3]),
            nr::RT_SIGPROCMASK => self.sigprocmask(a[0], a[1], a[2], a[3]),
            nr::RT_SIGPENDING => {
                // Linux copies `sigsetsize` bytes, at most a sigset_t's 8.
                let n = usize::try_from(a[1])
                    .ok()
                    .filter(|&n| n <= 8)
                    .ok_or(EINVAL)?;
                let set = self.signals.pending_blocked().to_le_bytes();
                self.mm.write_user(a[0], &set[..n]).map(|()| 0)
            }
            nr::SIGALTSTACK => self.sigaltstack(a[0], a[1], caller),
            nr::PAUSE => self.pause(),
            nr::RT_SIGSUSPEND => {
                if a[1] != 8 {
                    return Err(EINVAL);
                }
                let mut b = [0u8; 8];
                self.mm.read_user(a[0], &mut b)?;
                self.signals.suspend(u64::from_le_bytes(b));
                self.pause()
            }
            nr::ALARM => self.alarm(a[0]),
            nr::SETITIMER => self.setitimer(a[0], a[1], a[2]),
            nr::GETITIMER => self.setitimer(a[0], 0, a[1]),
            nr::IOCTL => self.fd(signed(a[0])).and(Err(ENOTTY)),
            nr::ACCESS => self.access(AT_FDCWD, a[0], a[1]),
            nr::FACCESSAT | nr::FACCESSAT2 => self.access(signed(a[0]), a[1], a[2]),
            nr::DUP => self.dup(signed(a[0]), 0, false),
            nr::DUP2 => self.dup2(signed(a[0]), signed(a[1]), 0),
            nr::DUP3 => self.dup2(signed(a[0]), signed(a[1]), a[2]),
            nr::FCNTL => self.fcntl(signed(a[0]), a[1], a[2]),
            nr::GETCWD => self.getcwd(a[0], a[1]),
            nr::READLINK => self.readlinkat(AT_FDCWD, a[0], a[1], a[2]),
            nr::READLINKAT => self.readlinkat(signed(a[0]), a[1], a[2], a[3]),
            nr::GETDENTS64 => self.getdents64(signed(a[0]), a[1], a[2]),
            nr::UNAME => self.mm.write_user(a[0], &utsname()).map(|()| 0),
            nr::GETPID | nr::GETTID | nr::SET_TID_ADDRESS | nr::GETPGRP | nr::SETSID => Ok(PID),
            nr::SETPGID => Ok(0),
            nr::GETPPID => Ok(1),
            nr::GETUID | nr::GETEUID => Ok(u64::from(self.uid)),
            nr::GETGID | nr::GETEGID => Ok(u64::from(self.gid)),
            nr::SETUID => self.set_id(a[0] & 0xffff_ffff, self.uid),
            nr::SETGID => self.set_id(a[0] & 0xffff_ffff, self.gid),
            nr::GETGROUPS => Ok(0),
            nr::UMASK => {
                let old = self.umask;
                self.umask = u32::try_from(a[0] & 0o777).unwrap_or(0o022);
                Ok(u64::from(old))
            }
            nr::PRCTL => self.prctl(a[0], a[1]),
            nr::ARCH_PRCTL => self.arch_prctl(a[0], a[1], caller),
            nr::SET_ROBUST_LIST => {
                if a[1] == 24 {
                    Ok(0)
                } else {
                    Err(EINVAL)
                }
            }
            nr::PRLIMIT64 => self.prlimit(a[0], a[1], a[3]),
            nr::GETRLIMIT => self.prlimit(0, a[0], a[1]),
            nr::SETRLIMIT => Ok(0),
            nr::GETRANDOM => self.getrandom(a[0], a[1]),
            nr::CLOCK_GETTIME => self.clock_gettime(a[0], a[1], caller),
            nr::CLOCK_GETRES => self.put(a[1], &timespec(Duration::from_nanos(1))),
            nr::GETTIMEOFDAY => self.gettimeofday(a[0], caller),
            nr::TIME => {
                let now = self.realtime(caller).as_secs();
                if a[0] != 0 {
                    self.mm.write_user(a[0], &now.to_le_bytes())?;
                }
                Ok(now)
            }
            nr::NANOSLEEP => self.sleep(a[0], a[1]),
            nr::CLOCK_NANOSLEEP => {
                // Relative sleeps only (flags 0); an absolute one ends at once.
                if a[1] == 0 {
                    self.sleep(a[2], a[3])
                } else {
                    Ok(0)
                }
            }
            nr::SCHED_YIELD | nr::FADVISE64 => Ok(0),
            nr::FSYNC | nr::FDATASYNC => {
                let f = self.fd(signed(a[0]))?;
                lock(&f).sync(n == nr::FDATASYNC).map(|()| 0)
            }
            nr::SCHED_GETAFFINITY => {
                if a[1] < 8 {
                    return Err(EINVAL);
                }
                self.mm.write_user(a[2], &1u64.to_le_bytes()).map(|()| 8)
            }
            nr::SYSINFO => self.sysinfo(a[0]),
            nr::WAIT4 => Err(ECHILD),
            nr::FTRUNCATE => {
                let f = self.fd(signed(a[0]))?;
                let g = lock(&f);
                match &g.node {
                    Node::File(file) if matches!(g.flags & O_ACCMODE, O_WRONLY | O_RDWR) => file
                        .set_len(a[1])
                        .map(|()| 0)
                        .map_err(|e| Errno::from_io(&e)),
                    _ => Err(EINVAL),
                }
            }
            nr::UNLINK => self.unlinkat(AT_FDCWD, a[0], 0),
            nr::RMDIR => self.unlinkat(AT_FDCWD, a[0], 0x200),
            nr::UNLINKAT => self.unlinkat(signed(a[0]), a[1], a[2]),
            nr::RENAME => self.renameat(AT_FDCWD, a[0], AT_FDCWD, a[1], 0),
            nr::RENAMEAT => self.renameat(signed(a[0]), a[1], signed(a[2]), a[3], 0),
            nr::RENAMEAT2 => self.renameat(signed(a[0]), a[1], signed(a[2]), a[3], a[4]),
            nr::MKDIR => self.mkdirat(AT_FDCWD, a[0], a[1]),
            nr::CHMOD => self.chmodat(AT_FDCWD, a[0], a[1], 0),
            nr::FCHMODAT => self.chmodat(signed(a[0]), a[1], a[2], 0),
            nr::FCHMODAT2 => self.chmodat(signed(a[0]), a[1], a[2], a[3]),
            nr::FCHMOD => {
                let f = self.fd(signed(a[0]))?;
                opath_ebadf(&f)?;
                lock(&f).chmod(mode_arg(a[1])).map(|()| 0)
            }
            nr::CHOWN => self.chownat(AT_FDCWD, a[0], [a[1], a[2]], 0),
            nr::LCHOWN => self.chownat(AT_FDCWD, a[0], [a[1], a[2]], AT_SYMLINK_NOFOLLOW),
            nr::FCHOWNAT => self.chownat(signed(a[0]), a[1], [a[2], a[3]], a[4]),
            nr::FCHOWN => {
                let f = self.fd(signed(a[0]))?;
                opath_ebadf(&f)?;
                lock(&f).chown(id_arg(a[1]), id_arg(a[2])).map(|()| 0)
            }
            nr::UTIMENSAT => self.utimensat(signed(a[0]), a[1], a[2], a[3]),
            nr::UTIMES => self.utimes(a[0], a[1]),
            nr::SENDFILE => self.sendfile(signed(a[0]), signed(a[1]), a[2], a[3]),
            nr::SYMLINK => self.symlinkat(a[0], AT_FDCWD, a[1]),
            nr::SYMLINKAT => self.symlinkat(a[0], signed(a[1]), a[2]),
            nr::LINK => self.linkat(AT_FDCWD, a[0], AT_FDCWD, a[1], 0),
            nr::LINKAT => self.linkat(signed(a[0]), a[1], signed(a[2]), a[3], a[4]),
            nr::MKDIRAT => self.mkdirat(signed(a[0]), a[1], a[2]),
            // What would reach the host: refused.
            // A run serves clone and clone3 in the thread module, before this kernel.
            nr::FORK | nr::VFORK | nr::CLONE | nr::CLONE3 | nr::EXECVE | nr::EXECVEAT => Err(EPERM),
            nr::SOCKET | nr::SOCKETPAIR | nr::CONNECT | nr::BIND | nr::ACCEPT => Err(EACCES),
            _ => Err(ENOSYS),
        }
    }

    fn fd(&self, fd: i64) -> SysResult<Arc<Mutex<OpenFile>>> {
        self.fds.get(&fd).map(|f| Arc::clone(&f.file)).ok_or(EBADF)
    }

    fn put(&self, va: u64, data: &[u8]) -> SysResult {
        self.mm.write_user(va, data).map(|()| 0)
    }

    fn path(&self, va: u64) -> SysResult<Vec<u8>> {
        if va == 0 {
            return Err(EFAULT);
        }
        self.mm.read_cstr(va, PATH_MAX)
    }

    /// The directory a `*at` call's relative path starts from: `None` for the current one.
    fn base(&self, dirfd: i64) -> SysResult<Option<Base>> {
        if dirfd == AT_FDCWD {
            return Ok(None);
        }
        let f = self.fd(dirfd)?;
        let g = lock(&f);
        let Node::File(file) = &g.node else {
            return Err(ENOTDIR);
        };
        if !g.is_dir {
            return Err(ENOTDIR);
        }
        Ok(Some(Base {
            path: g.path.clone(),
            fd: file
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Errno::from_io(&e))?,
            write: g.write_root,
        }))
    }

    /// The `*at` directory and the path of a call.
    fn at(&self, dirfd: i64, va: u64) -> SysResult<(Option<Base>, Vec<u8>)> {
        let p = self.path(va)?;
        Ok((self.base(dirfd)?, p))
    }

    fn sink(&mut self, node: &Node) -> Option<&mut Sink> {
        match node {
            Node::Stdout => Some(&mut self.stdout),
            Node::Stderr => Some(&mut self.stderr),
            _ => None,
        }
    }

    fn read(&mut self, fd: i64, buf: u64, count: u64) -> SysResult {
        let f = self.fd(fd)?;
        if count == 0 {
            return Ok(0);
        }
        let n = self.mm.accessible(buf, count.min(MAX_IO), PROT_WRITE);
        if n == 0 {
            return Err(EFAULT);
        }
        let (host_stdin, blocking_fifo) = {
            let g = lock(&f);
            let stdin = matches!(g.node, Node::Stdin(StdinState::Host));
            (stdin, g.fifo && g.flags & O_NONBLOCK == 0)
        };
        let data = loop {
            if (self.deadline.is_some() && host_stdin) || blocking_fifo {
                // Wait for input no longer than the run may last.
                // A signal ends the wait: restarted after an SA_RESTART handler, as Linux.
                let r = self
                    .ready(&[(fd, POLLIN)], Wait::Forever)
                    .map_err(|e| if e == EINTR { EINTR_RESTARTABLE } else { e })?;
                if r[0] == 0 {
                    return Err(EINTR);
                }
            }
            match lock(&f).read(usize::try_from(n).map_err(|_| EINVAL)?) {
                // Another reader of the FIFO took it first: wait again, as a blocking read.
                Err(EAGAIN) if blocking_fifo => {}
                r => break r?,
            }
        };
        self.mm.write_user(buf, &data)?;
        Ok(data.len() as u64)
    }

    /// The `POLL*` events ready on each `(fd, events)`, waiting up to `wait` (and never past
    /// the run's deadline) when none is. A negative fd is skipped, an unknown one `POLLNVAL`.
    fn ready(&mut self, set: &[(i64, i16)], wait: Wait) -> SysResult<Vec<i16>> {
        let mut out = vec![0i16; set.len()];
        let mut host: Vec<(usize, OwnedFd, i16)> = Vec::new();
        for (i, &(fd, events)) in set.iter().enumerate() {
            if fd < 0 {
                continue;
            }
            let Some(f) = self.fds.get(&fd) else {
                out[i] = POLLNVAL;
                continue;
            };
            match lock(&f.file).readiness()? {
                Readiness::Now(r) => out[i] = r & (events | POLLERR | POLLHUP),
                Readiness::Host(h) => host.push((i, h, events)),
            }
        }
        let any = out.iter().any(|&r| r != 0);
        let own = match self.retry_until {
            Some(until) => until.map(|u| u.saturating_duration_since(Instant::now())),
            None => wait.limit(),
        };
        let mut limit = if any { Some(Duration::ZERO) } else { own };
        if let Some(end) = self.deadline {
            let left = end.saturating_duration_since(Instant::now());
            limit = Some(limit.map_or(left, |l| l.min(left)));
        }
        if self.defer_waits && !any && limit != Some(Duration::ZERO) {
            // Wait without the kernel's lock: ready now, or deferred.
            let zero = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            if !host.is_empty() && poll_into(&host, &mut out, Some(&zero)).is_ok_and(|k| k > 0) {
                return Ok(out);
            }
            self.pending = Some(PendingWait {
                fds: host.into_iter().map(|(_, h, ev)| (h, ev)).collect(),
                until: limit.and_then(|l| Instant::now().checked_add(l)),
                written: 0,
            });
            return Err(ERESTARTSYS);
        }
        // Waiting here (one thread), the program's own timer is the only signal that can
        // come: the wait is cut where it fires, and a signal to deliver ends the call with
        // EINTR; a timer whose signal is blocked or ignored lets the wait go on.
        // A limit beyond what an Instant holds is no limit (as a sleep of that length).
        let end = limit.and_then(|l| Instant::now().checked_add(l));
        loop {
            let now = Instant::now();
            let left = end.map(|e| e.saturating_duration_since(now));
            let cut = self.alarm_at().map_or(left, |at| {
                let to_alarm = at.saturating_duration_since(now);
                Some(left.map_or(to_alarm, |l| l.min(to_alarm)))
            });
            if host.is_empty() {
                if any {
                    return Ok(out);
                }
                match cut {
                    Some(d) => std::thread::sleep(d),
                    // Nothing can ever become ready, no deadline, no timer: as Linux, wait
                    // forever; here, until the process is ended from outside.
                    None => loop {
                        std::thread::park();
                    },
                }
            } else {
                let ts = cut.map(|d| rustix::event::Timespec {
                    tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                    tv_nsec: i64::from(d.subsec_nanos()),
                });
                match poll_into(&host, &mut out, ts.as_ref()) {
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => return Ok(out),
                    Err(e) => return Err(super::fs::sys(e)),
                }
                if any || out.iter().any(|&r| r != 0) {
                    return Ok(out);
                }
            }
            self.check_alarm();
            if self.signals.deliverable() {
                return Err(EINTR);
            }
            if end.is_some_and(|e| Instant::now() >= e) {
                return Ok(out);
            }
        }
    }

    /// `ppoll`/`pselect6` with signal mask `mask` (the address of a `sigset_t`): the mask
    /// is the thread's for the call, as `rt_sigsuspend`'s; the old one comes back when the
    /// call returns, or when the handler of a signal the mask let in returns. As Linux, the
    /// descriptors are looked at first; if none is ready and a signal may be taken, the
    /// call fails with `EINTR` instead of waiting.
    fn with_wait_mask(
        &mut self,
        mask: Option<u64>,
        mut wait: Wait,
        call: impl FnOnce(&mut Kernel<M>, Wait) -> SysResult,
    ) -> SysResult {
        if let Some(va) = mask {
            let mut b = [0u8; 8];
            self.mm.read_user(va, &mut b)?;
            self.signals.suspend_keep(u64::from_le_bytes(b));
        }
        self.check_alarm();
        let interrupted = self.signals.deliverable();
        if interrupted {
            wait = Wait::For(Duration::ZERO);
        }
        let r = match call(self, wait) {
            Ok(0) if interrupted => Err(EINTR),
            r => r,
        };
        // Linux restores the old mask at once unless the call was interrupted (a handler
        // then runs under the call's mask, and its frame brings the old one back); a
        // deferred wait keeps the call's mask until it is served again.
        if mask.is_some() && !matches!(r, Err(EINTR | ERESTARTSYS)) {
            self.signals.end_suspend();
        }
        r
    }

    fn poll(&mut self, fds: u64, nfds: u64, wait: Wait) -> SysResult {
        if nfds > MAX_FDS.cast_unsigned() {
            return Err(EINVAL);
        }
        let n = usize::try_from(nfds).map_err(|_| EINVAL)?;
        let mut raw = vec![0u8; n * 8];
        self.mm.read_user(fds, &mut raw)?;
        let set: Vec<(i64, i16)> = raw
            .chunks_exact(8)
            .map(|c| {
                (
                    i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                    i16::from_le_bytes([c[4], c[5]]),
                )
            })
            .collect();
        let got = self.ready(&set, wait)?;
        for (c, r) in raw.chunks_exact_mut(8).zip(&got) {
            c[6..8].copy_from_slice(&r.to_le_bytes());
        }
        self.mm.write_user(fds, &raw)?;
        Ok(got.iter().filter(|&&r| r != 0).count() as u64)
    }

    fn select(&mut self, nfds: i64, sets: [u64; 3], wait: Wait) -> SysResult {
        // What select's read, write and except sets mean in POLL* events (fs/select.c).
        const IN_SET: i16 = POLLIN | 0x40 | 0x80 | POLLHUP | POLLERR;
        const OUT_SET: i16 = 0x4 | 0x100 | 0x200 | POLLERR;
        const EX_SET: i16 = 0x2;
        // Linux looks at no more descriptors than its table has (the VMM's: MAX_FDS).
        let n = usize::try_from(nfds.min(MAX_FDS)).map_err(|_| EINVAL)?;
        let bytes = n.div_ceil(64) * 8;
        let mut bits = [vec![0u8; bytes], vec![0u8; bytes], vec![0u8; bytes]];
        for (b, &va) in bits.iter_mut().zip(&sets) {
            if va != 0 {
                self.mm.read_user(va, b)?;
            }
        }
        let has = |b: &[u8], fd: usize| b[fd / 8] & (1 << (fd % 8)) != 0;
        let mut set = Vec::new();
        for fd in 0..n {
            let mut ev = 0;
            for (k, mask) in [POLLIN, 0x4, EX_SET].into_iter().enumerate() {
                if has(&bits[k], fd) {
                    ev |= mask;
                }
            }
            if ev != 0 {
                if !self.fds.contains_key(&(fd as i64)) {
                    return Err(EBADF);
                }
                set.push((fd as i64, ev));
            }
        }
        let got = self.ready(&set, wait)?;
        let mut out = [vec![0u8; bytes], vec![0u8; bytes], vec![0u8; bytes]];
        let mut count = 0;
        for (&(fd, ev), &r) in set.iter().zip(&got) {
            let fd = usize::try_from(fd).map_err(|_| EINVAL)?;
            for (k, (want, mask)) in [(POLLIN, IN_SET), (0x4, OUT_SET), (EX_SET, EX_SET)]
                .into_iter()
                .enumerate()
            {
                if ev & want != 0 && r & mask != 0 {
                    out[k][fd / 8] |= 1 << (fd % 8);
                    count += 1;
                }
            }
        }
        for (b, &va) in out.iter().zip(&sets) {
            if va != 0 {
                self.mm.write_user(va, b)?;
            }
        }
        Ok(count)
    }

    /// A `struct timespec` timeout (`NULL`: forever).
    fn wait_timespec(&self, va: u64) -> SysResult<Wait> {
        self.wait_at(va, 1)
    }

    /// A `struct timeval` timeout (`NULL`: forever).
    fn wait_timeval(&self, va: u64) -> SysResult<Wait> {
        self.wait_at(va, 1000)
    }

    fn wait_at(&self, va: u64, nanos_per_unit: u64) -> SysResult<Wait> {
        if va == 0 {
            return Ok(Wait::Forever);
        }
        let mut b = [0u8; 16];
        self.mm.read_user(va, &mut b)?;
        let mut secs = i64::from_le_bytes(b[..8].try_into().map_err(|_| EFAULT)?);
        let mut frac = i64::from_le_bytes(b[8..].try_into().map_err(|_| EFAULT)?);
        let max = i64::try_from(1_000_000_000 / nanos_per_unit).map_err(|_| EINVAL)?;
        if nanos_per_unit != 1 {
            // select's timeval: microseconds beyond a second carry over, as Linux does.
            secs = secs.checked_add(frac / max).ok_or(EINVAL)?;
            frac %= max;
        }
        if secs < 0 || !(0..max).contains(&frac) {
            return Err(EINVAL);
        }
        Ok(Wait::For(
            Duration::from_secs(secs.cast_unsigned())
                + Duration::from_nanos(frac.cast_unsigned() * nanos_per_unit),
        ))
    }

    /// The checks `pread64` and `pwrite64` share, in Linux's order: the descriptor, a negative
    /// offset (`EINVAL`), a zero count (`None`: the call returns 0), then how much of `buf`
    /// the program may access with `prot` (none: `EFAULT`).
    fn positioned(
        &self,
        fd: i64,
        buf: u64,
        count: u64,
        offset: u64,
        prot: u32,
    ) -> SysResult<Option<(Arc<Mutex<OpenFile>>, usize)>> {
        let f = self.fd(fd)?;
        if offset.cast_signed() < 0 {
            return Err(EINVAL);
        }
        if count == 0 {
            return Ok(None);
        }
        let n = self.mm.accessible(buf, count.min(MAX_IO), prot);
        if n == 0 {
            return Err(EFAULT);
        }
        Ok(Some((f, usize::try_from(n).map_err(|_| EINVAL)?)))
    }

    fn pread(&mut self, fd: i64, buf: u64, count: u64, offset: u64) -> SysResult {
        let Some((f, n)) = self.positioned(fd, buf, count, offset, PROT_WRITE)? else {
            return Ok(0);
        };
        let data = lock(&f).pread(n, offset)?;
        self.mm.write_user(buf, &data)?;
        Ok(data.len() as u64)
    }

    fn pwrite(&mut self, fd: i64, buf: u64, count: u64, offset: u64) -> SysResult {
        let Some((f, n)) = self.positioned(fd, buf, count, offset, PROT_READ)? else {
            return Ok(0);
        };
        let mut data = vec![0u8; n];
        self.mm.read_user(buf, &mut data)?;
        lock(&f).pwrite(&data, offset).map(|k| k as u64)
    }

    fn write_bytes(&mut self, fd: i64, data: &[u8]) -> SysResult {
        let f = self.fd(fd)?;
        let blocking_fifo = {
            let g = lock(&f);
            g.fifo && g.flags & O_NONBLOCK == 0
        };
        if blocking_fifo {
            // All of it, as a blocking write: the VMM waits for room in poll, never past
            // the run's deadline (then a short count).
            let mut done = std::mem::take(&mut self.write_resume).min(data.len());
            while done < data.len() {
                // The guard goes before waiting: readiness locks the file too.
                let r = lock(&f).write_file(&data[done..]);
                match r {
                    Ok(k) => done += k,
                    Err(EAGAIN) => match self.ready(&[(fd, 0x4)], Wait::Forever) {
                        Ok(r) if r[0] == 0 => break,
                        Ok(_) => {}
                        Err(ERESTARTSYS) => {
                            if let Some(p) = &mut self.pending {
                                p.written = done;
                            }
                            return Err(ERESTARTSYS);
                        }
                        // A signal: what was written, else restarted after an SA_RESTART
                        // handler, as Linux.
                        Err(EINTR) if done > 0 => break,
                        Err(EINTR) => return Err(EINTR_RESTARTABLE),
                        Err(e) => return Err(e),
                    },
                    Err(_) if done > 0 => break,
                    Err(e) => return Err(e),
                }
            }
            return if done == 0 {
                Err(EINTR)
            } else {
                Ok(done as u64)
            };
        }
        let mut g = lock(&f);
        let deadline = self.deadline;
        let n = match self.sink(&g.node) {
            Some(s) => s.write(data, deadline)?,
            None => g.write_file(data)?,
        };
        Ok(n as u64)
    }

    fn write(&mut self, fd: i64, buf: u64, count: u64) -> SysResult {
        self.fd(fd)?;
        if count == 0 {
            return Ok(0);
        }
        let n = self.mm.accessible(buf, count.min(MAX_IO), PROT_READ);
        if n == 0 {
            return Err(EFAULT);
        }
        let mut data = vec![0u8; usize::try_from(n).map_err(|_| EINVAL)?];
        self.mm.read_user(buf, &mut data)?;
        self.write_bytes(fd, &data)
    }

    fn iovecs(&self, iov: u64, count: u64) -> SysResult<Vec<(u64, u64)>> {
        if count > IOV_MAX {
            return Err(EINVAL);
        }
        let mut raw = vec![0u8; usize::try_from(count * 16).map_err(|_| EINVAL)?];
        self.mm.read_user(iov, &mut raw)?;
        Ok(raw
            .chunks_exact(16)
            .map(|c| {
                let w = |i: usize| {
                    u64::from_le_bytes([
                        c[i],
                        c[i + 1],
                        c[i + 2],
                        c[i + 3],
                        c[i + 4],
                        c[i + 5],
                        c[i + 6],
                        c[i + 7],
                    ])
                };
                (w(0), w(8))
            })
            .collect())
    }

    fn readv(&mut self, fd: i64, iov: u64, count: u64) -> SysResult {
        let vecs = self.iovecs(iov, count)?;
        let mut total = 0;
        for (base, len) in vecs {
            if len == 0 {
                continue;
            }
            match self.read(fd, base, len) {
                Ok(n) => {
                    total += n;
                    if n < len {
                        break;
                    }
                }
                Err(e) if total == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(total)
    }

    fn writev(&mut self, fd: i64, iov: u64, count: u64) -> SysResult {
        let vecs = self.iovecs(iov, count)?;
        self.fd(fd)?;
        let mut data = Vec::new();
        for (base, len) in vecs {
            // At most MAX_IO in all (a short count, as Linux allows), however many iovecs
            // name the same buffer.
            let room = MAX_IO - data.len() as u64;
            if room == 0 {
                break;
            }
            let len = len.min(room);
            let n = self.mm.accessible(base, len, PROT_READ);
            let start = data.len();
            data.resize(start + usize::try_from(n).map_err(|_| EINVAL)?, 0);
            self.mm.read_user(base, &mut data[start..])?;
            if n < len {
                if data.is_empty() {
                    return Err(EFAULT);
                }
                break;
            }
        }
        if data.is_empty() {
            return Ok(0);
        }
        self.write_bytes(fd, &data)
    }

    fn lowest_free_fd(&self, from: i64) -> SysResult<i64> {
        (from.max(0)..MAX_FDS)
            .find(|n| !self.fds.contains_key(n))
            .ok_or(EMFILE)
    }

    fn openat(&mut self, dirfd: i64, path: u64, flags: u64, mode: u64) -> SysResult {
        let (base, p) = self.at(dirfd, path)?;
        let mode = u32::try_from(mode & 0o7777).unwrap_or(0) & !self.umask;
        let file = self.sandbox.open(base.as_ref(), &p, flags, mode)?;
        let n = self.lowest_free_fd(0)?;
        self.fds.insert(
            n,
            Fd {
                file: Arc::new(Mutex::new(file)),
                cloexec: flags & O_CLOEXEC != 0,
            },
        );
        Ok(n.cast_unsigned())
    }

    fn fstat(&mut self, fd: i64, buf: u64) -> SysResult {
        let f = self.fd(fd)?;
        let bytes = match &lock(&f).node {
            Node::File(file) => stat_bytes(&file.metadata().map_err(|e| Errno::from_io(&e))?),
            _ => stream_stat(self.uid, self.gid),
        };
        self.put(buf, &bytes)
    }

    fn fstatat(&mut self, dirfd: i64, path: u64, buf: u64, flags: u64) -> SysResult {
        if flags & AT_EMPTY_PATH != 0 && self.path(path)?.is_empty() {
            return self.fstat(dirfd, buf);
        }
        let follow = flags & AT_SYMLINK_NOFOLLOW == 0;
        let (base, p) = self.at(dirfd, path)?;
        let m = self.sandbox.stat(base.as_ref(), &p, follow)?;
        self.put(buf, &stat_bytes(&m))
    }

    fn access(&mut self, dirfd: i64, path: u64, mode: u64) -> SysResult {
        let (base, p) = self.at(dirfd, path)?;
        let mode = u32::try_from(mode & 7).map_err(|_| EINVAL)?;
        self.sandbox.access(base.as_ref(), &p, mode).map(|()| 0)
    }

    fn getcwd(&mut self, buf: u64, size: u64) -> SysResult {
        let mut p = self.sandbox.cwd().as_os_str().as_encoded_bytes().to_vec();
        p.push(0);
        if (p.len() as u64) > size {
            return Err(ERANGE);
        }
        self.mm.write_user(buf, &p)?;
        Ok(p.len() as u64)
    }

    fn readlinkat(&mut self, dirfd: i64, path: u64, buf: u64, size: u64) -> SysResult {
        if size.cast_signed() <= 0 {
            return Err(EINVAL);
        }
        let p = self.path(path)?;
        let target: Vec<u8> = if p == b"/proc/self/exe" {
            self.sandbox.exe().as_os_str().as_encoded_bytes().to_vec()
        } else {
            let base = self.base(dirfd)?;
            self.sandbox.readlink(base.as_ref(), &p)?
        };
        let n = target
            .len()
            .min(usize::try_from(size).unwrap_or(usize::MAX));
        self.mm.write_user(buf, &target[..n])?;
        Ok(n as u64)
    }

    fn getdents64(&mut self, fd: i64, buf: u64, count: u64) -> SysResult {
        let f = self.fd(fd)?;
        let n = self.mm.accessible(buf, count.min(MAX_IO), PROT_WRITE);
        if n == 0 && count > 0 {
            return Err(EFAULT);
        }
        let out = lock(&f).getdents(n)?;
        self.mm.write_user(buf, &out)?;
        Ok(out.len() as u64)
    }

    fn dup(&mut self, old: i64, from: i64, cloexec: bool) -> SysResult {
        let file = self.fd(old)?;
        let n = self.lowest_free_fd(from)?;
        self.fds.insert(n, Fd { file, cloexec });
        Ok(n.cast_unsigned())
    }

    fn dup2(&mut self, old: i64, new: i64, flags: u64) -> SysResult {
        let file = self.fd(old)?;
        if !(0..MAX_FDS).contains(&new) {
            return Err(EBADF);
        }
        if old == new {
            return if flags != 0 {
                Err(EINVAL)
            } else {
                Ok(new.cast_unsigned())
            };
        }
        self.fds.insert(
            new,
            Fd {
                file,
                cloexec: flags & O_CLOEXEC != 0,
            },
        );
        Ok(new.cast_unsigned())
    }

    fn fcntl(&mut self, fd: i64, cmd: u64, arg: u64) -> SysResult {
        const F_DUPFD: u64 = 0;
        const F_GETFD: u64 = 1;
        const F_SETFD: u64 = 2;
        const F_GETFL: u64 = 3;
        const F_SETFL: u64 = 4;
        const F_DUPFD_CLOEXEC: u64 = 1030;
        let f = self.fds.get_mut(&fd).ok_or(EBADF)?;
        match cmd {
            F_DUPFD | F_DUPFD_CLOEXEC => self.dup(fd, int(arg), cmd == F_DUPFD_CLOEXEC),
            F_GETFD => Ok(u64::from(f.cloexec)),
            F_SETFD => {
                f.cloexec = arg & 1 != 0;
                Ok(0)
            }
            F_GETFL => Ok(lock(&f.file).flags),
            F_SETFL => {
                // Only O_NONBLOCK is kept (it decides whether a FIFO read waits).
                let mut g = lock(&f.file);
                g.flags = (g.flags & !O_NONBLOCK) | (arg & O_NONBLOCK);
                Ok(0)
            }
            5 => self.record_lock(fd, RecordLock::Get, arg),
            6 => self.record_lock(fd, RecordLock::Set, arg),
            7 => self.record_lock(fd, RecordLock::SetWait, arg),
            36 => self.record_lock(fd, RecordLock::OfdGet, arg),
            37 => self.record_lock(fd, RecordLock::OfdSet, arg),
            38 => self.record_lock(fd, RecordLock::OfdSetWait, arg),
            _ => Err(EINVAL),
        }
    }

    /// `fcntl` record locks with the program's `struct flock` at `arg`. A waiting lock
    /// waits in the host only without a timeout; with one, it retries until the deadline.
    fn record_lock(&mut self, fd: i64, cmd: RecordLock, arg: u64) -> SysResult {
        let f = self.fd(fd)?;
        let mut b = [0u8; 32];
        self.mm.read_user(arg, &mut b)?;
        let word = |at: usize| i64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let mut fl = libc::flock {
            l_type: i16::from_le_bytes([b[0], b[1]]),
            l_whence: i16::from_le_bytes([b[2], b[3]]),
            l_start: word(8),
            l_len: word(16),
            l_pid: i32::from_le_bytes(b[24..28].try_into().expect("4 bytes")),
        };
        let g = lock(&f);
        let waits = matches!(cmd, RecordLock::SetWait | RecordLock::OfdSetWait);
        match (cmd, self.deadline) {
            _ if waits && self.defer_waits => {
                // Tried without waiting; while the lock is taken, tried again every 5 ms
                // by the thread, without the kernel's lock.
                let try_cmd = if cmd == RecordLock::SetWait {
                    RecordLock::Set
                } else {
                    RecordLock::OfdSet
                };
                match g.record_lock(try_cmd, &mut fl) {
                    Err(EAGAIN | EACCES) => {
                        self.pending = Some(PendingWait {
                            fds: Vec::new(),
                            until: Instant::now().checked_add(Duration::from_millis(5)),
                            written: 0,
                        });
                        Err(ERESTARTSYS)
                    }
                    other => other,
                }
            }
            (RecordLock::SetWait | RecordLock::OfdSetWait, Some(deadline)) => {
                let try_cmd = if cmd == RecordLock::SetWait {
                    RecordLock::Set
                } else {
                    RecordLock::OfdSet
                };
                loop {
                    match g.record_lock(try_cmd, &mut fl) {
                        Err(EAGAIN | EACCES) => {}
                        other => break other,
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break Err(EINTR);
                    }
                    std::thread::sleep(left.min(Duration::from_millis(5)));
                }
            }
            _ => g.record_lock(cmd, &mut fl),
        }?;
        drop(g);
        if matches!(cmd, RecordLock::Get | RecordLock::OfdGet) {
            b[..2].copy_from_slice(&fl.l_type.to_le_bytes());
            b[2..4].copy_from_slice(&fl.l_whence.to_le_bytes());
            b[8..16].copy_from_slice(&fl.l_start.to_le_bytes());
            b[16..24].copy_from_slice(&fl.l_len.to_le_bytes());
            b[24..28].copy_from_slice(&fl.l_pid.to_le_bytes());
            self.mm.write_user(arg, &b)?;
        }
        Ok(0)
    }

    fn unlinkat(&mut self, dirfd: i64, path: u64, flags: u64) -> SysResult {
        const AT_REMOVEDIR: u64 = 0x200;
        if flags & !AT_REMOVEDIR != 0 {
            return Err(EINVAL);
        }
        let (base, p) = self.at(dirfd, path)?;
        self.sandbox.unlink(base.as_ref(), &p, flags).map(|()| 0)
    }

    fn renameat(&mut self, olddir: i64, old: u64, newdir: i64, new: u64, flags: u64) -> SysResult {
        let (ob, op) = self.at(olddir, old)?;
        let (nb, np) = self.at(newdir, new)?;
        self.sandbox
            .rename((ob.as_ref(), &op), (nb.as_ref(), &np), flags)
            .map(|()| 0)
    }

    /// `sendfile`: from a file (at `*offset` when given) to any descriptor, at most
    /// `MAX_IO` at a time.
    /// `sendfile`. The input is read where it stands without moving (`pread`) and advanced
    /// by what was written, so that a write that must wait for room (a full FIFO) defers its
    /// wait like any blocking call (the thread waits without the kernel's lock) and is
    /// served again from where it stopped: `write_resume` then counts the bytes already
    /// sent, whose input is consumed.
    fn sendfile(&mut self, out: i64, inp: i64, offset: u64, count: u64) -> SysResult {
        let sent = std::mem::take(&mut self.write_resume);
        let fin = self.fd(inp)?;
        self.fd(out)?;
        // From a FIFO: EINVAL, as Linux (its data would be read without waiting for it).
        if !matches!(lock(&fin).node, Node::File(_)) || lock(&fin).fifo {
            return Err(EINVAL);
        }
        let n = usize::try_from(count.min(MAX_IO))
            .map_err(|_| EINVAL)?
            .saturating_sub(sent);
        if n == 0 {
            return Ok(sent as u64);
        }
        let at = if offset != 0 {
            let mut b = [0u8; 8];
            self.mm.read_user(offset, &mut b)?;
            let at = u64::from_le_bytes(b);
            if at.cast_signed() < 0 {
                return Err(EINVAL);
            }
            at
        } else {
            lock(&fin).seek(0, 1)?
        };
        let data = lock(&fin).pread(n, at)?;
        if data.is_empty() {
            return Ok(sent as u64);
        }
        let r = self.write_bytes(out, &data);
        let wrote = match &r {
            Ok(k) => usize::try_from(*k).unwrap_or(0),
            Err(ERESTARTSYS) => self.pending.as_ref().map_or(0, |p| p.written),
            Err(_) => 0,
        };
        let to = at + wrote as u64;
        if offset != 0 {
            self.mm.write_user(offset, &to.to_le_bytes())?;
        } else {
            lock(&fin).seek(i64::try_from(to).map_err(|_| EINVAL)?, 0)?;
        }
        match r {
            Ok(_) => Ok((sent + wrote) as u64),
            Err(ERESTARTSYS) => {
                if let Some(p) = &mut self.pending {
                    p.written = sent + wrote;
                }
                Err(ERESTARTSYS)
            }
            Err(_) if sent > 0 => Ok(sent as u64),
            Err(e) => Err(e),
        }
    }

    fn chmodat(&mut self, dirfd: i64, path: u64, mode: u64, flags: u64) -> SysResult {
        if flags & AT_SYMLINK_NOFOLLOW != 0 {
            return Err(Errno(95)); // EOPNOTSUPP, as Linux for symlinks
        }
        if flags & !AT_EMPTY_PATH != 0 {
            return Err(EINVAL);
        }
        if flags & AT_EMPTY_PATH != 0 && self.path(path)?.is_empty() {
            let f = self.fd(dirfd)?;
            return lock(&f).chmod(mode_arg(mode)).map(|()| 0);
        }
        let (base, p) = self.at(dirfd, path)?;
        self.sandbox
            .chmod(base.as_ref(), &p, mode_arg(mode))
            .map(|()| 0)
    }

    fn chownat(&mut self, dirfd: i64, path: u64, ids: [u64; 2], flags: u64) -> SysResult {
        if flags & !(AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0 {
            return Err(EINVAL);
        }
        let (uid, gid) = (id_arg(ids[0]), id_arg(ids[1]));
        if flags & AT_EMPTY_PATH != 0 && self.path(path)?.is_empty() {
            let f = self.fd(dirfd)?;
            return lock(&f).chown(uid, gid).map(|()| 0);
        }
        let (base, p) = self.at(dirfd, path)?;
        let follow = flags & AT_SYMLINK_NOFOLLOW == 0;
        self.sandbox
            .chown(base.as_ref(), &p, (uid, gid), follow)
            .map(|()| 0)
    }

    /// Two `struct timespec`s at `va` (`NULL`: both now), with `UTIME_NOW`/`UTIME_OMIT`.
    fn timestamps(&self, va: u64, micros: bool) -> SysResult<rustix::fs::Timestamps> {
        const UTIME_NOW: i64 = (1 << 30) - 1;
        if va == 0 {
            let now = rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: UTIME_NOW,
            };
            return Ok(rustix::fs::Timestamps {
                last_access: now,
                last_modification: now,
            });
        }
        let mut b = [0u8; 32];
        self.mm.read_user(va, &mut b)?;
        let w = |i: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[i..i + 8]);
            i64::from_le_bytes(v)
        };
        let ts = |sec: i64, frac: i64| -> SysResult<rustix::fs::Timespec> {
            let nsec = if micros {
                if !(0..1_000_000).contains(&frac) {
                    return Err(EINVAL);
                }
                frac * 1000
            } else {
                frac
            };
            Ok(rustix::fs::Timespec {
                tv_sec: sec,
                tv_nsec: nsec,
            })
        };
        Ok(rustix::fs::Timestamps {
            last_access: ts(w(0), w(8))?,
            last_modification: ts(w(16), w(24))?,
        })
    }

    fn utimensat(&mut self, dirfd: i64, path: u64, times: u64, flags: u64) -> SysResult {
        if flags & !(AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0 {
            return Err(EINVAL);
        }
        let t = self.timestamps(times, false)?;
        // A NULL path (futimens) or an empty one with AT_EMPTY_PATH: the descriptor itself.
        if path == 0 || (flags & AT_EMPTY_PATH != 0 && self.path(path)?.is_empty()) {
            let f = self.fd(dirfd)?;
            return lock(&f).utimens(&t).map(|()| 0);
        }
        let (base, p) = self.at(dirfd, path)?;
        let follow = flags & AT_SYMLINK_NOFOLLOW == 0;
        self.sandbox
            .utimens(base.as_ref(), &p, &t, follow)
            .map(|()| 0)
    }

    fn utimes(&mut self, path: u64, times: u64) -> SysResult {
        let t = self.timestamps(times, true)?;
        let (base, p) = self.at(AT_FDCWD, path)?;
        self.sandbox
            .utimens(base.as_ref(), &p, &t, true)
            .map(|()| 0)
    }

    fn symlinkat(&mut self, target: u64, dirfd: i64, path: u64) -> SysResult {
        let target = self.path(target)?;
        if target.is_empty() {
            return Err(ENOENT);
        }
        let (base, p) = self.at(dirfd, path)?;
        self.sandbox.symlink(&target, base.as_ref(), &p).map(|()| 0)
    }

    fn linkat(&mut self, olddir: i64, old: u64, newdir: i64, new: u64, flags: u64) -> SysResult {
        // AT_SYMLINK_FOLLOW and AT_EMPTY_PATH are not served: an honest EINVAL.
        if flags != 0 {
            return Err(EINVAL);
        }
        let (ob, op) = self.at(olddir, old)?;
        let (nb, np) = self.at(newdir, new)?;
        self.sandbox
            .link((ob.as_ref(), &op), (nb.as_ref(), &np))
            .map(|()| 0)
    }

    fn mkdirat(&mut self, dirfd: i64, path: u64, mode: u64) -> SysResult {
        let (base, p) = self.at(dirfd, path)?;
        let mode = u32::try_from(mode & 0o7777).unwrap_or(0) & !self.umask;
        self.sandbox.mkdir(base.as_ref(), &p, mode).map(|()| 0)
    }

    fn mmap(&mut self, a: [u64; 6]) -> SysResult {
        const MAP_TYPE: u64 = 0xf;
        const ENODEV: Errno = Errno(19);
        let [addr, len, prot, flags, fd, off] = a;
        let (len, prot) = mmcalls::mmap_args(len, prot, flags, off)?;
        // The file whose bytes the mapping starts with; `/dev/zero` maps as anonymous memory.
        let source = if flags & mmcalls::MAP_ANONYMOUS == 0 {
            let f = self.fd(int(fd))?;
            let g = lock(&f);
            let Node::File(file) = &g.node else {
                return Err(ENODEV);
            };
            if g.is_dir {
                return Err(ENODEV);
            }
            let m = file.metadata().map_err(|e| Errno::from_io(&e))?;
            let zero = std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type())
                && (rustix::fs::major(m.rdev()), rustix::fs::minor(m.rdev())) == (1, 5);
            if !zero && !m.is_file() {
                return Err(ENODEV);
            }
            if g.flags & O_ACCMODE == O_WRONLY {
                return Err(EACCES);
            }
            if !zero && flags & MAP_TYPE != 2 && prot & PROT_WRITE != 0 {
                // A shared writable file mapping would write to the host behind write().
                return Err(EACCES);
            }
            drop(g);
            (!zero).then_some(f)
        } else {
            None
        };
        let at = self.mm.mmap_place(addr, len, prot, flags)?;
        if let Some(f) = source
            && prot != 0
            && let Err(e) = self.fill_from(&f, at, len, off)
        {
            // Linux leaves nothing mapped when the file cannot be read (and, with
            // `MAP_FIXED`, what was there is gone).
            self.mm.undo_map(at, len);
            return Err(e);
        }
        Ok(at)
    }

    /// Copies the file's bytes from `off` into the mapped `[at, at + len)`, `MAX_IO` at a
    /// time, up to its end (the rest stays zero): host memory stays bounded whatever the
    /// length.
    fn fill_from(&self, f: &Arc<Mutex<OpenFile>>, at: u64, len: u64, off: u64) -> SysResult<()> {
        let mut done = 0;
        while done < len {
            let n = usize::try_from((len - done).min(MAX_IO)).map_err(|_| ENOMEM)?;
            let d = lock(f).pread(n, off.checked_add(done).ok_or(EINVAL)?)?;
            self.mm.poke(at + done, &d)?;
            if d.len() < n {
                break;
            }
            done += d.len() as u64;
        }
        Ok(())
    }

    fn munmap(&mut self, addr: u64, len: u64) -> SysResult {
        self.mm.munmap_call(addr, len)
    }

    fn mprotect(&mut self, addr: u64, len: u64, prot: u64) -> SysResult {
        self.mm.mprotect_call(addr, len, prot)
    }

    fn mremap(&mut self, a: [u64; 6]) -> SysResult {
        self.mm.mremap_call(a)
    }

    fn madvise(&mut self, addr: u64, len: u64, advice: u64) -> SysResult {
        const MADV_DONTNEED: u64 = 4;
        if !addr.is_multiple_of(PAGE) {
            return Err(EINVAL);
        }
        let len = page_up(len)?;
        let end = addr.checked_add(len).ok_or(EINVAL)?;
        if len == 0 {
            return Ok(0);
        }
        // Only the pages that have frames, never the length (a 1 TiB range is answered at
        // once); a range with unmapped parts is ENOMEM after the mapped ones, as Linux.
        let (pages, gap) = self.mm.framed_pages(addr, end);
        if advice == MADV_DONTNEED {
            // Anonymous private memory reads as zero afterwards.
            let zero = vec![0u8; 4096];
            for page in pages {
                // The page has a frame, so only a failed guest-memory write (a frame outside
                // RAM, a broken invariant) can stop this: the program is told, never left
                // with stale bytes it was promised were zero.
                self.mm.poke(page, &zero)?;
            }
        }
        if gap { Err(ENOMEM) } else { Ok(0) }
    }

    fn sigaction(&mut self, sig: u64, act: u64, old: u64, size: u64) -> SysResult {
        if sig == 0 || sig > 64 || size != 8 {
            return Err(EINVAL);
        }
        let sig = u32::try_from(sig).map_err(|_| EINVAL)?;
        let new = if act != 0 {
            let mut b = [0u8; 32];
            self.mm.read_user(act, &mut b)?;
            Some(signal::Action::from_bytes(&b))
        } else {
            None
        };
        if old != 0 {
            self.mm
                .write_user(old, &self.signals.action(sig).to_bytes())?;
        }
        if let Some(new) = new
            && !self.signals.set_action(sig, new)
        {
            return Err(EINVAL);
        }
        Ok(0)
    }

    fn sigprocmask(&mut self, how: u64, set: u64, old: u64, size: u64) -> SysResult {
        if size != 8 {
            return Err(EINVAL);
        }
        let cur = self.signals.blocked;
        let new = if set != 0 {
            let mut b = [0u8; 8];
            self.mm.read_user(set, &mut b)?;
            let m = u64::from_le_bytes(b);
            Some(match how {
                0 => cur | m,
                1 => cur & !m,
                2 => m,
                _ => return Err(EINVAL),
            })
        } else {
            None
        };
        if old != 0 {
            self.mm.write_user(old, &cur.to_le_bytes())?;
        }
        if let Some(m) = new {
            self.signals.set_blocked(m);
        }
        Ok(0)
    }

    fn sigaltstack(&mut self, new: u64, old: u64, caller: &impl Caller) -> SysResult {
        let sp = caller.stack_pointer();
        let prev = self.signals.altstack_bytes(sp);
        if new != 0 {
            // Not while running on it.
            if prev[8] & 1 != 0 {
                return Err(EPERM);
            }
            let mut b = [0u8; 24];
            self.mm.read_user(new, &mut b)?;
            self.signals.set_altstack(&b).map_err(|()| {
                if u32::from_le_bytes(b[8..12].try_into().unwrap_or_default()) & !0x8000_0003 != 0 {
                    EINVAL
                } else {
                    ENOMEM
                }
            })?;
        }
        if old != 0 {
            self.mm.write_user(old, &prev)?;
        }
        Ok(0)
    }

    fn kill(&mut self, n: u64, a: [u64; 6]) -> SysResult {
        let (pid, sig) = match n {
            nr::TGKILL => (int(a[0]), int(a[2])),
            _ => (int(a[0]), int(a[1])),
        };
        if !(0..=64).contains(&sig) {
            return Err(EINVAL);
        }
        let own = pid == PID.cast_signed() || (n == nr::KILL && pid == 0);
        if !own {
            // No signal reaches another process, on the host or anywhere.
            return Err(EPERM);
        }
        if sig != 0 {
            let code = if n == nr::KILL { SI_USER } else { SI_TKILL };
            self.signals
                .raise(u32::try_from(sig).map_err(|_| EINVAL)?, code);
        }
        Ok(0)
    }

    /// When the program's timer fires next.
    pub fn alarm_at(&self) -> Option<Instant> {
        self.alarm.map(|(at, _)| at)
    }

    /// Raises SIGALRM if the timer is due, and re-arms an interval timer.
    pub fn check_alarm(&mut self) {
        if let Some((at, interval)) = self.alarm
            && Instant::now() >= at
        {
            self.signals.raise(SIGALRM, SI_KERNEL);
            self.alarm = interval.map(|i| (later(i), Some(i)));
        }
    }

    /// Waits until a signal can be delivered, `until` passes, or the run's deadline:
    /// true if a signal came.
    fn wait_signal(&mut self, until: Option<Instant>) -> bool {
        loop {
            self.check_alarm();
            if self.signals.deliverable() {
                return true;
            }
            let now = Instant::now();
            let mut end = [until, self.deadline, self.alarm.map(|(at, _)| at)]
                .into_iter()
                .flatten()
                .min();
            if until.is_some_and(|u| now >= u) || self.deadline.is_some_and(|d| now >= d) {
                return false;
            }
            // Nothing can wake the program: it waits as long as it asked, as natively.
            let t = end
                .get_or_insert(now + Duration::from_secs(3600))
                .saturating_duration_since(now);
            std::thread::sleep(t);
        }
    }

    fn pause(&mut self) -> SysResult {
        self.wait_signal(None);
        Err(EINTR)
    }

    fn alarm(&mut self, secs: u64) -> SysResult {
        let left = self.alarm.map_or(0, |(at, _)| {
            let d = at.saturating_duration_since(Instant::now());
            // Rounded as Linux does: a pending alarm never reads as 0.
            (d.as_secs() + u64::from(d.subsec_nanos() >= 500_000_000)).max(1)
        });
        // `alarm(unsigned int)`: the low 32 bits.
        let secs = secs & 0xffff_ffff;
        self.alarm = (secs != 0).then(|| (later(Duration::from_secs(secs)), None));
        Ok(left)
    }

    /// `setitimer(ITIMER_REAL, new, old)`; `getitimer` with `new` 0.
    fn setitimer(&mut self, which: u64, new: u64, old: u64) -> SysResult {
        if which != 0 {
            // ITIMER_VIRTUAL and ITIMER_PROF count CPU time, which the VMM does not.
            return Err(EINVAL);
        }
        let tv = |d: Duration| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&d.as_secs().to_le_bytes());
            b[8..].copy_from_slice(&u64::from(d.subsec_micros()).to_le_bytes());
            b
        };
        let mut b = [0u8; 32];
        let parsed = if new != 0 {
            self.mm.read_user(new, &mut b)?;
            let val = |at: usize| -> SysResult<Duration> {
                let s = i64::from_le_bytes(b[at..at + 8].try_into().map_err(|_| EFAULT)?);
                let us = i64::from_le_bytes(b[at + 8..at + 16].try_into().map_err(|_| EFAULT)?);
                if s < 0 || !(0..1_000_000).contains(&us) {
                    return Err(EINVAL);
                }
                Ok(Duration::from_secs(s.cast_unsigned())
                    + Duration::from_micros(us.cast_unsigned()))
            };
            Some((val(0)?, val(16)?))
        } else {
            None
        };
        if old != 0 {
            let (value, interval) =
                self.alarm
                    .map_or((Duration::ZERO, Duration::ZERO), |(at, i)| {
                        (
                            at.saturating_duration_since(Instant::now())
                                .max(Duration::from_micros(1)),
                            i.unwrap_or_default(),
                        )
                    });
            let mut o = [0u8; 32];
            o[..16].copy_from_slice(&tv(interval));
            o[16..].copy_from_slice(&tv(value));
            self.mm.write_user(old, &o)?;
        }
        if let Some((interval, value)) = parsed {
            self.alarm = (!value.is_zero())
                .then(|| (later(value), (!interval.is_zero()).then_some(interval)));
        }
        Ok(0)
    }

    fn set_id(&self, want: u64, have: u32) -> SysResult {
        if want == u64::from(have) || want == u64::from(u32::MAX) {
            Ok(0)
        } else {
            Err(EPERM)
        }
    }

    fn prctl(&mut self, option: u64, arg: u64) -> SysResult {
        const PR_SET_NAME: u64 = 15;
        const PR_GET_NAME: u64 = 16;
        match option {
            PR_SET_NAME => {
                let name = self.mm.read_cstr(arg, 4096)?;
                self.comm = [0; 16];
                let n = name.len().min(15);
                self.comm[..n].copy_from_slice(&name[..n]);
                Ok(0)
            }
            PR_GET_NAME => self.put(arg, &self.comm.clone()),
            _ => Err(EINVAL),
        }
    }

    fn arch_prctl(&mut self, code: u64, addr: u64, caller: &impl Caller) -> SysResult {
        const SET_GS: u64 = 0x1001;
        const SET_FS: u64 = 0x1002;
        const GET_FS: u64 = 0x1003;
        const GET_GS: u64 = 0x1004;
        match code {
            SET_FS | SET_GS => {
                if addr >= USER_END {
                    return Err(EPERM);
                }
                caller.set_segment_base(code == SET_GS, addr)?;
                Ok(0)
            }
            GET_FS => self.put(addr, &caller.segment_bases()?.0.to_le_bytes()),
            GET_GS => self.put(addr, &caller.segment_bases()?.1.to_le_bytes()),
            _ => Err(EINVAL),
        }
    }

    fn prlimit(&mut self, pid: u64, resource: u64, old: u64) -> SysResult {
        const RLIMIT_STACK: u64 = 3;
        const RLIMIT_NOFILE: u64 = 7;
        if int(pid) != 0 && int(pid) != PID.cast_signed() {
            return Err(ESRCH);
        }
        if resource >= 16 {
            return Err(EINVAL);
        }
        let (cur, max) = match resource {
            RLIMIT_STACK => (super::mm::STACK_MAX, u64::MAX),
            RLIMIT_NOFILE => (MAX_FDS.cast_unsigned(), MAX_FDS.cast_unsigned()),
            _ => (u64::MAX, u64::MAX),
        };
        if old != 0 {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&cur.to_le_bytes());
            b[8..].copy_from_slice(&max.to_le_bytes());
            self.mm.write_user(old, &b)?;
        }
        Ok(0)
    }

    fn getrandom(&mut self, buf: u64, len: u64) -> SysResult {
        let n = usize::try_from(len.min(MAX_IO)).map_err(|_| EINVAL)?;
        if n == 0 {
            return Ok(0);
        }
        if self.urandom.is_none() {
            self.urandom = Some(File::open("/dev/urandom").map_err(|e| Errno::from_io(&e))?);
        }
        let mut b = vec![0u8; n];
        if let Some(u) = &mut self.urandom {
            u.read_exact(&mut b).map_err(|e| Errno::from_io(&e))?;
        }
        self.mm.write_user(buf, &b)?;
        Ok(n as u64)
    }

    /// Real time: the vDSO's (kvmclock), else the host's.
    fn realtime(&self, caller: &impl Caller) -> Duration {
        self.clock
            .realtime(|| caller.kvmclock())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
            })
    }

    fn clock_gettime(&mut self, clock: u64, tp: u64, caller: &impl Caller) -> SysResult {
        let d = match clock {
            0 | 5 | 8 | 11 => self.realtime(caller),
            // Monotonic clocks count from the process start, plus a boot-like offset; the
            // vDSO's where it serves the call, so that both agree.
            1 | 4 | 6 | 7 | 9 => self
                .clock
                .monotonic(|| caller.kvmclock())
                .unwrap_or_else(|| self.monotonic_now()),
            2 | 3 => self.start.elapsed(),
            _ => return Err(EINVAL),
        };
        self.put(tp, &timespec(d))
    }

    fn gettimeofday(&mut self, tv: u64, caller: &impl Caller) -> SysResult {
        if tv != 0 {
            let d = self.realtime(caller);
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&d.as_secs().to_le_bytes());
            b[8..].copy_from_slice(&u64::from(d.subsec_micros()).to_le_bytes());
            self.mm.write_user(tv, &b)?;
        }
        Ok(0)
    }

    fn sleep(&mut self, req: u64, rem: u64) -> SysResult {
        let mut b = [0u8; 16];
        self.mm.read_user(req, &mut b)?;
        let secs = u64::from_le_bytes(b[..8].try_into().map_err(|_| EFAULT)?);
        let nanos = u64::from_le_bytes(b[8..].try_into().map_err(|_| EFAULT)?);
        // A negative tv_sec or tv_nsec is EINVAL, as Linux (not a sleep of 2^64 s).
        if secs.cast_signed() < 0 || nanos >= 1_000_000_000 {
            return Err(EINVAL);
        }
        let asked = Duration::from_secs(secs) + Duration::from_nanos(nanos);
        // Beyond what an Instant holds, the sleep is forever, until a signal.
        let end = Instant::now().checked_add(asked);
        if self.wait_signal(end) {
            // A signal interrupts the sleep: EINTR and the time left.
            if rem != 0 {
                let left = end.map_or(asked, |e| e.saturating_duration_since(Instant::now()));
                self.mm.write_user(rem, &timespec(left))?;
            }
            return Err(EINTR);
        }
        Ok(0)
    }

    fn sysinfo(&mut self, buf: u64) -> SysResult {
        let mut b = [0u8; 112];
        b[..8].copy_from_slice(&(self.start.elapsed().as_secs() + 1000).to_le_bytes());
        b[32..40].copy_from_slice(&self.mem_bytes.to_le_bytes());
        b[40..48].copy_from_slice(&(self.mem_bytes / 2).to_le_bytes());
        b[80..82].copy_from_slice(&1u16.to_le_bytes());
        b[104..108].copy_from_slice(&1u32.to_le_bytes());
        self.put(buf, &b)
    }
}

/// Polls the host descriptors of [`Kernel::ready`] (`(index into out, fd, POLL* events)`)
/// for up to `timeout` and stores each one's `revents` at its index: how many are ready.
fn poll_into(
    host: &[(usize, OwnedFd, i16)],
    out: &mut [i16],
    timeout: Option<&rustix::event::Timespec>,
) -> rustix::io::Result<usize> {
    let mut pfds: Vec<PollFd<'_>> = host
        .iter()
        .map(|(_, h, ev)| PollFd::new(h, PollFlags::from_bits_truncate(ev.cast_unsigned())))
        .collect();
    let n = rustix::event::poll(&mut pfds, timeout)?;
    for (p, (i, _, _)) in pfds.iter().zip(host) {
        out[*i] = p.revents().bits().cast_signed();
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    //! System calls served on plain memory, without a VM: the kernel over an address space
    //! on `GuestMemoryMmap`, called at the handlers below the register decoding (which needs
    //! a vCPU).

    use std::path::{Path, PathBuf};

    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use std::collections::BTreeSet;

    use proptest::prelude::{Just, Strategy, any, prop_oneof};

    use super::super::abi::{EEXIST, ENAMETOOLONG};
    use super::super::mm::Frames;
    use super::*;

    const BUF: u64 = 0x4000_0000;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pagetrack-sys-{name}-{}", std::process::id()));
        if d.exists() {
            std::fs::remove_dir_all(&d).unwrap();
        }
        std::fs::create_dir_all(d.join("root")).unwrap();
        std::fs::write(d.join("root/a.txt"), b"abc").unwrap();
        std::fs::write(d.join("secret"), b"s").unwrap();
        d
    }

    /// A kernel whose program reads under `root`, with two pages mapped at [`BUF`]: the first
    /// read-write, the second read-only.
    fn kernel(root: &Path) -> Kernel<GuestMemoryMmap> {
        kernel_on(root, &[]).0
    }

    /// As [`kernel`], with `writable` directories, and a handle on its guest memory.
    fn kernel_on(root: &Path, writable: &[PathBuf]) -> (Kernel<GuestMemoryMmap>, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mut mm =
            AddressSpace::new(mem.clone(), Frames::new((1, 65), (65, 1024)), true).unwrap();
        mm.map(BUF, PAGE, PROT_READ | PROT_WRITE, PageKind::Mmap)
            .unwrap();
        mm.map(BUF + PAGE, PAGE, PROT_READ, PageKind::Mmap).unwrap();
        let sandbox = Sandbox::new(root, writable, &[], root, Path::new("/bin/x")).unwrap();
        let setup = KernelSetup {
            stdin: Input::Null,
            stdout: Output::Capture,
            stderr: Output::Capture,
            uid: 1000,
            gid: 1000,
            comm: b"x".to_vec(),
            mem_bytes: 4 << 20,
        };
        (Kernel::new(mm, sandbox, setup).unwrap(), mem)
    }

    use super::super::mm::PageKind;

    #[test]
    fn write_copies_user_bytes_out_and_faults_only_where_unmapped() {
        let d = tmp("write");
        let mut k = kernel(&d.join("root"));
        k.mm.poke(BUF, b"hello").unwrap();
        assert_eq!(k.write(1, BUF, 5), Ok(5));
        // A buffer running off the mapped pages: the readable part is written (as Linux).
        k.mm.poke(BUF + 2 * PAGE - 2, b"yz").unwrap();
        assert_eq!(k.write(2, BUF + 2 * PAGE - 2, 10), Ok(2));
        assert_eq!(
            k.write(1, BUF + 2 * PAGE, 5),
            Err(EFAULT),
            "unmapped buffer"
        );
        assert_eq!(k.write(7, BUF, 5), Err(EBADF));
        assert_eq!(k.take_output(), (b"hello".to_vec(), b"yz".to_vec()));
    }

    #[test]
    fn openat_and_read_fill_user_memory_and_refuse_escapes_and_read_only_buffers() {
        let d = tmp("read");
        let mut k = kernel(&d.join("root"));
        k.mm.poke(BUF + 0x100, b"a.txt\0../secret\0").unwrap();
        let fd = k.openat(AT_FDCWD, BUF + 0x100, 0, 0).unwrap();
        assert_eq!(fd, 3, "the lowest free descriptor");
        assert_eq!(
            k.openat(AT_FDCWD, BUF + 0x106, 0, 0),
            Err(EACCES),
            "escapes --dir"
        );
        assert_eq!(k.read(3, BUF + PAGE, 10), Err(EFAULT), "read-only buffer");
        assert_eq!(
            k.read(3, BUF + PAGE - 2, 10),
            Ok(2),
            "up to the read-only page"
        );
        assert_eq!(k.read(3, BUF, 10), Ok(1));
        let mut got = [0u8; 3];
        k.mm.read_user(BUF + PAGE - 2, &mut got[..2]).unwrap();
        k.mm.read_user(BUF, &mut got[2..]).unwrap();
        assert_eq!(&got, b"abc");
        assert_eq!(k.read(3, BUF, 10), Ok(0), "end of file");
        assert_eq!(k.read(9, BUF, 10), Err(EBADF));
    }

    /// The calling vCPU of the dispatcher tests: a stack pointer and FS/GS bases, no
    /// kvmclock (the host's clocks answer).
    #[derive(Debug, Default)]
    struct FakeCaller {
        rsp: u64,
        bases: std::cell::Cell<(u64, u64)>,
    }

    impl Caller for FakeCaller {
        fn stack_pointer(&self) -> u64 {
            self.rsp
        }

        fn segment_bases(&self) -> SysResult<(u64, u64)> {
            Ok(self.bases.get())
        }

        fn set_segment_base(&self, gs: bool, base: u64) -> SysResult<()> {
            let (fs, g) = self.bases.get();
            self.bases.set(if gs { (fs, base) } else { (base, g) });
            Ok(())
        }

        fn kvmclock(&self) -> Option<u64> {
            None
        }
    }

    /// Serves `n(a)` through the dispatcher, as the program would see it: the value, or a
    /// negative errno.
    fn call(k: &mut Kernel<GuestMemoryMmap>, n: u64, a: [u64; 6]) -> i64 {
        match k.syscall(n, a, &FakeCaller::default()) {
            Flow::Return(v) => v.cast_signed(),
            other => panic!("{n}: {other:?}"),
        }
    }

    fn neg(e: Errno) -> i64 {
        -e.0
    }

    /// The address space's areas over `[from, to)`, page by page: what a call changed.
    fn areas(
        k: &Kernel<GuestMemoryMmap>,
        from: u64,
        to: u64,
    ) -> Vec<Option<(u64, u64, u32, PageKind)>> {
        (from..to).step_by(4096).map(|va| k.mm.area(va)).collect()
    }

    const RW: u64 = (PROT_READ | PROT_WRITE) as u64;
    const PRIVATE_ANON: u64 = 0x2 | mmcalls::MAP_ANONYMOUS;

    #[test]
    fn syscall_unknown_numbers_are_enosys_and_counted() {
        let d = tmp("enosys");
        let mut k = kernel(&d.join("root"));
        for n in [500, 335, 1 << 32, u64::MAX] {
            assert_eq!(call(&mut k, n, [0; 6]), neg(ENOSYS), "{n}");
        }
        assert_eq!(k.counts.unknown.get(&500), Some(&1));
        assert_eq!(k.counts.unknown.get(&u64::MAX), Some(&1));
        assert_eq!(k.counts.unknown.len(), 4);
    }

    #[test]
    fn syscall_mmap_bad_lengths_and_addresses_are_refused_and_change_nothing() {
        let d = tmp("mmapbad");
        let mut k = kernel(&d.join("root"));
        let before = (areas(&k, BUF, BUF + 4 * PAGE), k.mm.free_frames());
        let fixed = PRIVATE_ANON | mmcalls::MAP_FIXED;
        for (a, want) in [
            ([0, 0, RW, PRIVATE_ANON, u64::MAX, 0], EINVAL), // zero length
            ([0, u64::MAX, RW, PRIVATE_ANON, u64::MAX, 0], ENOMEM), // rounds past 2^64
            ([0, 1 << 62, RW, PRIVATE_ANON, u64::MAX, 0], ENOMEM), // more than there is
            ([BUF + 1, PAGE, RW, fixed, u64::MAX, 0], EINVAL), // unaligned MAP_FIXED
            ([USER_END, PAGE, RW, fixed, u64::MAX, 0], ENOMEM), // past the user half
            ([USER_END - PAGE, 2 * PAGE, RW, fixed, u64::MAX, 0], ENOMEM), // across its end
            ([u64::MAX - PAGE + 1, PAGE, RW, fixed, u64::MAX, 0], ENOMEM), // wraps
            ([0, PAGE, RW, 0x20, u64::MAX, 0], EINVAL),      // no mapping type
            ([0, PAGE, 0x8, PRIVATE_ANON, u64::MAX, 0], EINVAL), // unknown prot bit
            ([0, PAGE, RW, PRIVATE_ANON, u64::MAX, 1], EINVAL), // unaligned offset
            ([0, PAGE, RW, 0x2, 77, 0], EBADF),              // no such fd
            (
                [
                    BUF,
                    PAGE,
                    RW,
                    PRIVATE_ANON | mmcalls::MAP_FIXED_NOREPLACE,
                    u64::MAX,
                    0,
                ],
                EEXIST,
            ),
        ] {
            assert_eq!(call(&mut k, nr::MMAP, a), neg(want), "{a:x?}");
            assert_eq!(
                (areas(&k, BUF, BUF + 4 * PAGE), k.mm.free_frames()),
                before,
                "{a:x?}"
            );
        }
        assert_eq!(k.mm.inconsistency(), None);
    }

    #[test]
    fn syscall_mmap_fixed_over_a_mapping_replaces_it_with_zeroed_memory() {
        let d = tmp("mmapfixed");
        let mut k = kernel(&d.join("root"));
        k.mm.poke(BUF, b"old").unwrap();
        let fixed = PRIVATE_ANON | mmcalls::MAP_FIXED;
        // Over both pages (read-write and read-only), and one more beyond.
        let got = call(
            &mut k,
            nr::MMAP,
            [BUF, 3 * PAGE, PROT_READ as u64, fixed, u64::MAX, 0],
        );
        assert_eq!(got, BUF.cast_signed());
        assert_eq!(
            k.mm.area(BUF),
            Some((BUF, BUF + 3 * PAGE, PROT_READ, PageKind::Mmap))
        );
        let mut b = [9u8; 3];
        k.mm.read_user(BUF, &mut b).unwrap();
        assert_eq!(b, [0; 3], "the old bytes are gone");
        // Read-only now: a read(2) into it faults.
        assert_eq!(call(&mut k, nr::READ, [0, BUF, 3, 0, 0, 0]), neg(EFAULT));
    }

    #[test]
    fn syscall_munmap_mprotect_edge_cases_return_linux_errnos() {
        let d = tmp("munmap");
        let mut k = kernel(&d.join("root"));
        let before = areas(&k, BUF, BUF + 4 * PAGE);
        for (n, a, want) in [
            (nr::MUNMAP, [BUF + 1, PAGE, 0, 0, 0, 0], neg(EINVAL)), // unaligned
            (nr::MUNMAP, [BUF, 0, 0, 0, 0, 0], neg(EINVAL)),        // zero length
            (nr::MUNMAP, [BUF, u64::MAX, 0, 0, 0, 0], neg(ENOMEM)), // rounds past 2^64
            (nr::MUNMAP, [BUF, 1 << 63, 0, 0, 0, 0], neg(EINVAL)),  // past the user half
            (nr::MPROTECT, [BUF + 1, PAGE, 1, 0, 0, 0], neg(EINVAL)), // unaligned
            (nr::MPROTECT, [BUF, PAGE, 0x10, 0, 0, 0], neg(EINVAL)), // unknown prot bit
            (nr::MPROTECT, [BUF, 3 * PAGE, 1, 0, 0, 0], neg(ENOMEM)), // runs off the mapping
            (nr::MPROTECT, [BUF, u64::MAX, 1, 0, 0, 0], neg(ENOMEM)),
            (nr::MPROTECT, [BUF, 0, 1, 0, 0, 0], 0), // zero length: nothing
            // Unmapping what is not mapped is fine.
            (nr::MUNMAP, [BUF + 8 * PAGE, PAGE, 0, 0, 0, 0], 0),
        ] {
            assert_eq!(call(&mut k, n, a), want, "{n} {a:x?}");
            assert_eq!(areas(&k, BUF, BUF + 4 * PAGE), before, "{n} {a:x?}");
        }
        // A partial munmap splits the area and frees exactly that page.
        assert_eq!(call(&mut k, nr::MUNMAP, [BUF + PAGE, PAGE, 0, 0, 0, 0]), 0);
        assert_eq!(k.mm.area(BUF + PAGE), None);
        assert_eq!(k.mm.take_pending().freed.len(), 1);
        assert_eq!(
            call(&mut k, nr::WRITE, [1, BUF + PAGE, 1, 0, 0, 0]),
            neg(EFAULT)
        );
    }

    #[test]
    fn syscall_brk_refuses_what_it_cannot_do_and_returns_the_break() {
        let d = tmp("brk");
        let mut k = kernel(&d.join("root"));
        let start = 0x60_0000;
        k.mm.init_brk(start);
        assert_eq!(
            call(&mut k, nr::BRK, [0; 6]),
            start.cast_signed(),
            "brk(0) asks"
        );
        for huge in [u64::MAX, 1 << 63, start + (2 << 40)] {
            assert_eq!(
                call(&mut k, nr::BRK, [huge, 0, 0, 0, 0, 0]),
                start.cast_signed()
            );
        }
        // More than the frames: unchanged, nothing left mapped.
        let frames = k.mm.free_frames();
        let want = start + (frames + 1) * PAGE;
        assert_eq!(
            call(&mut k, nr::BRK, [want, 0, 0, 0, 0, 0]),
            start.cast_signed()
        );
        assert_eq!(k.mm.area(start), None);
        assert_eq!(k.mm.inconsistency(), None);
        // The undone growth's frames are parked until the commit releases them, as the VM's
        // run loop does after every call.
        let freed = k.mm.take_pending().freed;
        assert!(
            !freed.is_empty() && freed.len() as u64 <= frames,
            "{}",
            freed.len()
        );
        k.mm.release(&freed);
        let end = start + 2 * PAGE + 5;
        assert_eq!(
            call(&mut k, nr::BRK, [end, 0, 0, 0, 0, 0]),
            end.cast_signed()
        );
        assert_eq!(
            k.mm.area(start),
            Some((
                start,
                start + 3 * PAGE,
                PROT_READ | PROT_WRITE,
                PageKind::Heap
            ))
        );
    }

    #[test]
    fn syscall_mremap_through_the_dispatcher_grows_moves_and_refuses() {
        let d = tmp("mremap");
        let mut k = kernel(&d.join("root"));
        k.mm.poke(BUF, b"keep").unwrap();
        // The read-only page after BUF is in the way: growing needs MREMAP_MAYMOVE.
        assert_eq!(
            call(&mut k, nr::MREMAP, [BUF, PAGE, 2 * PAGE, 0, 0, 0]),
            neg(ENOMEM)
        );
        assert_eq!(
            call(&mut k, nr::MREMAP, [BUF, PAGE, 0, 1, 0, 0]),
            neg(EINVAL)
        );
        assert_eq!(
            call(&mut k, nr::MREMAP, [BUF + 1, PAGE, PAGE, 1, 0, 0]),
            neg(EINVAL)
        );
        assert_eq!(
            call(&mut k, nr::MREMAP, [BUF, PAGE, PAGE, 4, 0, 0]),
            neg(EINVAL)
        );
        assert_eq!(
            call(&mut k, nr::MREMAP, [BUF, 2 * PAGE, PAGE, 1, 0, 0]),
            neg(EFAULT),
            "two areas"
        );
        assert_eq!(
            call(&mut k, nr::MREMAP, [0x1000, PAGE, PAGE, 1, 0, 0]),
            neg(EFAULT),
            "unmapped"
        );
        let to = call(&mut k, nr::MREMAP, [BUF, PAGE, 2 * PAGE, 1, 0, 0]);
        let to = u64::try_from(to).expect("moved");
        assert_ne!(to, BUF);
        assert_eq!(k.mm.area(BUF), None);
        let mut b = [0u8; 4];
        k.mm.read_user(to, &mut b).unwrap();
        assert_eq!(&b, b"keep", "the frame moved with its bytes");
        assert_eq!(
            call(&mut k, nr::WRITE, [1, to + PAGE, 1, 0, 0, 0]),
            1,
            "the growth is mapped"
        );
    }

    #[test]
    fn syscall_bad_guest_pointers_are_efault_never_a_panic() {
        let d = tmp("efault");
        let mut k = kernel(&d.join("root"));
        for p in [
            0,
            0x1000,
            USER_END - 1,
            USER_END,
            1 << 63,
            u64::MAX - 3,
            u64::MAX,
        ] {
            assert_eq!(
                call(&mut k, nr::WRITE, [1, p, 8, 0, 0, 0]),
                neg(EFAULT),
                "write {p:#x}"
            );
            assert_eq!(
                call(&mut k, nr::READ, [0, p, 8, 0, 0, 0]),
                neg(EFAULT),
                "read {p:#x}: the buffer is checked before the (empty) standard input"
            );
            assert_eq!(
                call(
                    &mut k,
                    nr::OPENAT,
                    [AT_FDCWD.cast_unsigned(), p, 0, 0, 0, 0]
                ),
                neg(EFAULT),
                "openat {p:#x}"
            );
            assert_eq!(
                call(&mut k, nr::UNAME, [p, 0, 0, 0, 0, 0]),
                neg(EFAULT),
                "uname {p:#x}"
            );
            assert_eq!(
                call(&mut k, nr::CLOCK_GETTIME, [1, p, 0, 0, 0, 0]),
                neg(EFAULT)
            );
            assert_eq!(
                call(&mut k, nr::WRITEV, [1, p, 1, 0, 0, 0]),
                neg(EFAULT),
                "iovec {p:#x}"
            );
            assert_eq!(call(&mut k, nr::GETRANDOM, [p, 8, 0, 0, 0, 0]), neg(EFAULT));
        }
        // An iovec that is readable but points nowhere.
        let mut iov = [0u8; 16];
        iov[..8].copy_from_slice(&0x1000u64.to_le_bytes());
        iov[8..].copy_from_slice(&8u64.to_le_bytes());
        k.mm.poke(BUF, &iov).unwrap();
        assert_eq!(call(&mut k, nr::WRITEV, [1, BUF, 1, 0, 0, 0]), neg(EFAULT));
        assert_eq!(
            call(&mut k, nr::WRITEV, [1, BUF, 1 << 40, 0, 0, 0]),
            neg(EINVAL),
            "huge count"
        );
        // A write that starts mapped and runs off the end: the mapped part.
        k.mm.poke(BUF + 2 * PAGE - 3, b"end").unwrap();
        assert_eq!(
            call(
                &mut k,
                nr::WRITE,
                [1, BUF + 2 * PAGE - 3, u64::MAX, 0, 0, 0]
            ),
            3
        );
        assert_eq!(k.take_output().0, b"end".to_vec());
    }

    #[test]
    fn syscall_openat_refuses_dotdot_absolute_and_symlink_escapes() {
        let d = tmp("escape");
        let root = d.join("root");
        std::fs::create_dir(root.join("sub")).unwrap();
        std::os::unix::fs::symlink(d.join("secret"), root.join("out")).unwrap();
        std::os::unix::fs::symlink("a.txt", root.join("in")).unwrap();
        std::os::unix::fs::symlink("../../secret", root.join("sub/up")).unwrap();
        let mut k = kernel(&root);
        let at = AT_FDCWD.cast_unsigned();
        let open = |k: &mut Kernel<GuestMemoryMmap>, path: &[u8]| {
            let mut p = path.to_vec();
            p.push(0);
            k.mm.poke(BUF, &p).unwrap();
            call(k, nr::OPENAT, [at, BUF, 0, 0, 0, 0])
        };
        for path in [
            &b"../secret"[..],
            b"sub/../../secret",
            b"out",
            b"sub/up",
            b"/proc/self/mem",
        ] {
            assert_eq!(
                open(&mut k, path),
                neg(EACCES),
                "{}",
                String::from_utf8_lossy(path)
            );
        }
        assert_eq!(open(&mut k, b"nothere"), neg(ENOENT));
        assert_eq!(open(&mut k, b""), neg(ENOENT));
        // Inside the root: `..` that stays inside, and a symlink that does.
        assert_eq!(open(&mut k, b"sub/../a.txt"), 3);
        assert_eq!(open(&mut k, b"in"), 4);
        assert_eq!(call(&mut k, nr::READ, [4, BUF, 10, 0, 0, 0]), 3);
        let mut b = [0u8; 3];
        k.mm.read_user(BUF, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        // A path longer than PATH_MAX (it runs on into the read-only page, then a NUL).
        let mut long = vec![b'a'; PATH_MAX + 10];
        long.push(0);
        k.mm.poke(BUF, &long).unwrap();
        assert_eq!(
            call(&mut k, nr::OPENAT, [at, BUF, 0, 0, 0, 0]),
            neg(ENAMETOOLONG)
        );
        // Unterminated up to the end of the mapping: a fault, not a read beyond it.
        k.mm.poke(BUF + PAGE, &[b'a'; 4096]).unwrap();
        assert_eq!(
            call(&mut k, nr::OPENAT, [at, BUF + PAGE, 0, 0, 0, 0]),
            neg(EFAULT)
        );
    }

    #[test]
    fn syscall_arch_prctl_sets_the_callers_bases_and_refuses_kernel_addresses() {
        let d = tmp("prctl");
        let mut k = kernel(&d.join("root"));
        let cpu = FakeCaller::default();
        let flow = |k: &mut Kernel<GuestMemoryMmap>, a| match k.syscall(nr::ARCH_PRCTL, a, &cpu) {
            Flow::Return(v) => v.cast_signed(),
            other => panic!("{other:?}"),
        };
        assert_eq!(flow(&mut k, [0x1002, 0x1234_5000, 0, 0, 0, 0]), 0);
        assert_eq!(flow(&mut k, [0x1001, USER_END, 0, 0, 0, 0]), neg(EPERM));
        assert_eq!(cpu.bases.get(), (0x1234_5000, 0));
        assert_eq!(flow(&mut k, [0x1003, BUF, 0, 0, 0, 0]), 0);
        let mut b = [0u8; 8];
        k.mm.read_user(BUF, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0x1234_5000);
        assert_eq!(
            flow(&mut k, [0x1003, BUF + PAGE, 0, 0, 0, 0]),
            neg(EFAULT),
            "read-only"
        );
        assert_eq!(flow(&mut k, [0x9999, BUF, 0, 0, 0, 0]), neg(EINVAL));
    }

    /// What the address space must satisfy after any call: no failed page-table access,
    /// every framed page its own frame inside guest RAM, the page tables (walked in guest
    /// memory) mapping exactly the accessible pages to their frames with their
    /// permissions, and no frame both mapped and parked as freed.
    fn assert_sound(k: &mut Kernel<GuestMemoryMmap>, mem: &GuestMemoryMmap, probe: &[u64]) {
        assert_eq!(k.mm.inconsistency(), None);
        let pages = k.mm.mapped_pages();
        let gfns: BTreeSet<u64> = pages.iter().map(|p| p.1).collect();
        assert_eq!(gfns.len(), pages.len(), "a frame shared by two pages");
        assert!(gfns.iter().all(|&g| (65..1024).contains(&g)), "{gfns:?}");
        for &(va, gfn, _, prot) in &pages {
            match pagetrack_kvm::walk::translate(mem, k.mm.cr3(), va) {
                Ok(t) if prot != 0 => {
                    assert_eq!(t.gpa, gfn * PAGE, "translation of {va:#x}");
                    assert_eq!(t.writable, prot & PROT_WRITE != 0, "W of {va:#x}");
                    assert!(t.user, "U of {va:#x}");
                }
                Ok(t) => panic!("PROT_NONE page {va:#x} translates to {:#x}", t.gpa),
                Err(_) => assert_eq!(prot, 0, "accessible page {va:#x} does not translate"),
            }
        }
        let framed: BTreeSet<u64> = pages.iter().map(|p| p.0).collect();
        for &va in probe {
            if !framed.contains(&va) {
                assert!(
                    pagetrack_kvm::walk::translate(mem, k.mm.cr3(), va).is_err(),
                    "{va:#x} has no frame but translates"
                );
            }
        }
        // The VM's commit: parked frames are released once no translation can use them.
        let freed = k.mm.take_pending().freed;
        assert!(
            freed.iter().all(|g| !gfns.contains(g)),
            "a freed frame is still mapped"
        );
        k.mm.release(&freed);
    }

    /// A system-call number: mostly real ones, some anything.
    fn number() -> impl Strategy<Value = u64> {
        prop_oneof![
            8 => 0u64..336,
            1 => Just(nr::MMAP),
            1 => Just(nr::MREMAP),
            1 => Just(nr::MUNMAP),
            1 => Just(nr::MPROTECT),
            1 => any::<u64>(),
        ]
    }

    /// An argument: the values that find edge cases (zero, small ints, the buffer and the
    /// bytes around its pages, the end of the user half, all ones), or anything.
    fn arg() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            0u64..64,
            Just(u64::MAX),
            Just(AT_FDCWD.cast_unsigned()),
            (0u64..32).prop_map(|p| BUF + p * PAGE),
            (0u64..0x20).prop_map(|o| BUF + o),
            (0u64..0x20).prop_map(|o| BUF + 2 * PAGE - o),
            (1u64..64).prop_map(|n| n * PAGE),
            Just(USER_END - PAGE),
            Just(USER_END),
            Just(1u64 << 63),
            any::<u64>(),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 64,
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Random calls with hostile arguments straight into the dispatcher: none panics,
        /// every result is a value or an errno, the address space stays sound after each,
        /// and nothing outside the root changes.
        #[test]
        fn syscall_random_hostile_calls_never_panic_and_keep_the_process_sound(
            calls in proptest::collection::vec((number(), proptest::array::uniform6(arg())), 1..32)
        ) {
            let d = tmp("sweep");
            let root = d.join("root");
            let (mut k, mem) = kernel_on(&root, std::slice::from_ref(&root));
            // Paths for the calls that take one, at the buffer's start.
            k.mm.poke(BUF, b"a.txt\0../secret\0new\0/etc/passwd\0").unwrap();
            // Every wait ends at once (the run's deadline has passed).
            k.set_deadline(Some(Instant::now()));
            let cpu = FakeCaller::default();
            let probe: Vec<u64> = (0..40).map(|p| BUF + p * PAGE).collect();
            for (n, a) in calls {
                match k.syscall(n, a, &cpu) {
                    Flow::Return(v) if v.cast_signed() < 0 => {
                        let e = -v.cast_signed();
                        proptest::prop_assert!(
                            (1..4096).contains(&e) || e == EINTR_RESTARTABLE.0,
                            "{n}({a:x?}) = -{e}"
                        );
                    }
                    Flow::Return(_) | Flow::Exit(_) | Flow::SigReturn | Flow::Timeout => {}
                }
                assert_sound(&mut k, &mem, &probe);
            }
            drop(k);
            let mut outside: Vec<String> = std::fs::read_dir(&d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            outside.sort();
            proptest::prop_assert_eq!(outside, vec!["root".to_owned(), "secret".to_owned()]);
            proptest::prop_assert_eq!(std::fs::read(d.join("secret")).unwrap(), b"s".to_vec());
            std::fs::remove_dir_all(&d).unwrap();
        }
    }
}
