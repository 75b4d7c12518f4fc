//! A process VM: unmodified static x86-64 Linux programs run at CPL3 in a KVM guest, and the
//! VMM serves their system calls, the way gVisor's KVM platform works. Their memory can be
//! write-tracked by named region (stack, heap, data, text, mmap, page tables, a virtual
//! range), and the regions follow the program as it grows its heap and maps memory.
//!
//! ```no_run
//! use pagetrack_vmm::process::{Output, Process, ProcessConfig, Region};
//!
//! let config = ProcessConfig::new("/bin/busybox")
//!     .args(["sha256sum", "input.bin"])
//!     .track([Region::Stack, Region::Heap])
//!     .stdout(Output::Capture);
//! let outcome = Process::new(config)?.run()?;
//! println!("{}", String::from_utf8_lossy(&outcome.stdout));
//! std::process::exit(i32::from(outcome.end.status()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The guest
//!
//! - **Address space.** The VMM builds 4-level page tables with 4 KiB pages, user and NX bits,
//!   accessed and dirty bits preset, in frames from a pool of guest RAM kept for page tables;
//!   every entry is written through [`pagetrack_kvm::TrackedMemory`], so tracked page-table
//!   frames report the VMM's updates as device writes. The image's `PT_LOAD` segments sit at
//!   their addresses (`ET_EXEC`; static-pie at `0x5555_5555_4000`), the program break starts
//!   after them, mmap places areas top-down below `0x7fff_0000_0000`, the stack ends at
//!   `0x7fff_ff00_0000` (128 KiB mapped, growing on page faults up to 8 MiB). The CPL0
//!   structures of [`crate::x86::LongModeLayout`] (GDT, TSS, IDT, exception stubs and stacks)
//!   are mapped at their guest-physical addresses as supervisor pages.
//! - **Entry.** CPL3 at `AT_ENTRY` with the stack Linux builds: `argc`, `argv`, `envp` and the
//!   auxiliary vector (`AT_PHDR`, `AT_PHENT`, `AT_PHNUM`, `AT_PAGESZ`, `AT_ENTRY`, `AT_RANDOM`,
//!   `AT_HWCAP`, `AT_CLKTCK`, `AT_UID`/`EUID`/`GID`/`EGID`, `AT_EXECFN`, `AT_PLATFORM`,
//!   `AT_SYSINFO_EHDR`).
//! - **vDSO.** A one-page shared object at `0x7fff_ffff_e000` exports
//!   `__vdso_clock_gettime` (`CLOCK_REALTIME`, `CLOCK_MONOTONIC`), `__vdso_gettimeofday` and
//!   `__vdso_time`, which glibc and musl static programs call instead of the system call.
//!   They read KVM's kvmclock from a read-only time page at `0x7fff_ffff_d000` and the TSC,
//!   without an exit; the VMM's own time calls read the same clock (`KVM_GET_CLOCK`), so both
//!   paths agree. Other clocks, a time zone, or a clock KVM does not mark TSC-stable take the
//!   system call (see the `vdso` module).
//! - **System calls.** `MSR_LSTAR` points at a user page holding `out 0xf6, al; sysretq`. On
//!   hosts whose KVM runs CPL3 code natively and CPL0 code in an emulator (PVM), `syscall`
//!   jumps there but stays at CPL3; the `out` (allowed by the TSS I/O bitmap, which allows only
//!   that port) exits to the VMM, which reads and writes the registers through `kvm_run`'s
//!   `sync_regs` and resumes at RCX with RFLAGS from R11. On VT-x/SVM hosts `syscall` enters
//!   CPL0, and the stub's `sysretq` returns after the exit. The first system call tells which.
//! - **Exceptions** reach the CPL0 stubs, which exit; a page fault just below the stack grows
//!   it, anything else ends the run with the vector, RIP, error code and address, reported as
//!   the signal Linux would send (status 128 + signal).
//! - **Signals** the program sends itself (`kill`, `tgkill`, `raise`), `SIGALRM` from
//!   `alarm`/`setitimer(ITIMER_REAL)` and `SIGPIPE` for a write to a closed pipe are delivered
//!   when a system call returns: to a handler on a Linux x86-64 signal frame (`SA_SIGINFO`,
//!   `SA_ONSTACK` with `sigaltstack`, `SA_RESETHAND`, `SA_NODEFER`, the handler's mask) that
//!   `rt_sigreturn` restores, ignored (`SIG_IGN`, default-ignore signals), or ending the run
//!   with status 128 + signal. `pause`, `rt_sigsuspend` and `nanosleep` wait for them. A timer expiring while
//!   the program computes without system calls interrupts it between two instructions on
//!   PVM, and waits for its next system call on VT-x/SVM (see the `signal` module).
//! - **Threads.** `clone`/`clone3` with `CLONE_VM | CLONE_THREAD` (what `pthread_create`
//!   issues) start another vCPU of the VM on its own host thread, in the same address space,
//!   with its own TLS, tid, `set_tid_address`/`CLONE_CHILD_CLEARTID`, signal mask and
//!   thread-directed signals; `futex` (wait, wake, bitsets, requeue, timeouts) lets glibc's
//!   mutexes, condition variables and `pthread_join` work; `exit_group`, a fatal signal or the
//!   timeout end every thread. Up to 64 threads at once; tracking stays exact across vCPUs
//!   (see the `thread` module).
//! - **Page tables and KVM.** When an operation changes or removes a present translation
//!   (munmap, mprotect, a brk shrink, mremap), the VMM has KVM drop its shadows of the
//!   page-table frames concerned ([`pagetrack_kvm::Vm::invalidate_translations`]) before the
//!   program runs again, and only then reuses the freed frames.
//!
//! # Containment
//!
//! See [`ProcessConfig::dir`] and [`ProcessConfig::allow_write`]: the program reads only under
//! the `--dir` directory and the files named in its arguments, writes only its standard
//! streams unless a write directory is given, and paths that escape (`..`, symlinks) fail with
//! `EACCES`. The host kernel enforces it: every path is resolved beneath an open descriptor of
//! an allowed directory with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` and the call
//! is made on the resulting descriptor, so renames and symlink swaps racing the lookup cannot
//! lead outside (see the `fs` module). Directories with procfs below them are refused as
//! roots. fork, vfork, a `clone` that is not a thread, exec, sockets and signals to other processes are refused
//! (`EPERM`/`EACCES`); calls the VMM does not implement return `-ENOSYS` and are counted.
//!
//! The program itself must be what `execve` accepts: a regular file with execute permission
//! ([`crate::Error::ProgramRefused`] otherwise, before anything is read from it).

mod abi;
mod elf;
mod fs;
mod mm;
mod mmcalls;
mod signal;
mod stack;
mod syscall;
mod thread;
mod track;
mod vdso;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use iced_x86::code_asm::{CodeAssembler, al};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, Msrs, kvm_msr_entry};
use kvm_ioctls::{Kvm, SyncReg};
use pagetrack_kvm::{Vcpu, Vm, VmConfig, VmStats};
use vm_memory::{Bytes, GuestAddress};

use crate::error::{ConfigProblem, Error, ImageProblem, ProgramRefusal, Result};
use crate::x86::{self, GuestException, LongModeLayout};

pub use abi::syscall_name;
pub use fs::{Input, Output};
pub use mm::PageKind;
pub use syscall::SyscallCounts;
pub use track::{FrameObserver, Region, TrackStats};

use abi::{PROT_EXEC, PROT_READ, PROT_WRITE};
use mm::{AddressSpace, Frames, PAGE, STACK_INITIAL, STACK_TOP, STUB_VA};
use syscall::{Kernel, KernelSetup};

/// The port the system-call stub writes to (`out 0xf6, al`); the TSS I/O bitmap allows only
/// this port at CPL3.
pub const SYSCALL_PORT: u16 = 0xf6;

/// Guest RAM by default: 256 MiB.
pub const DEFAULT_MEM: u64 = 256 << 20;
/// The least guest RAM a process VM takes.
pub const MIN_MEM: u64 = 16 << 20;
/// The most guest RAM a process VM takes (the CPL0 structures sit below 4 GiB).
pub const MAX_MEM: u64 = 4 << 30;

/// The guest frame holding the system-call stub.
const STUB_GFN: u64 = 1;
/// Frames kept for page tables: 2–4 MiB, so their KVM fragments are few.
const TABLE_POOL: (u64, u64) = (0x200, 0x400);
/// General frames start above the page-table pool.
const GENERAL_START: u64 = 0x400;

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// SYSCALL loads CS 0x08 / SS 0x10; 64-bit SYSRET loads CS 0x23 / SS 0x1b.
const STAR: u64 = 0x0010_0008_0000_0000;
/// RFLAGS bits `syscall` clears (TF, DF, IF, NT, AC), as Linux sets it.
const SYSCALL_MASK: u64 = 0x4_7700;
/// RFLAGS at entry: IF and the reserved bit; IOPL 0 (port I/O goes by the bitmap).
const ENTRY_RFLAGS: u64 = 0x202;

/// How to run a program.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcessConfig {
    /// The executable (a static x86-64 ELF file on the host).
    pub program: PathBuf,
    /// `argv[0]`; the program path as given if `None`.
    pub argv0: Option<String>,
    /// `argv[1..]`.
    pub args: Vec<String>,
    /// The environment, `NAME=value` each.
    pub env: Vec<String>,
    /// Guest RAM in bytes.
    pub mem: u64,
    /// The directory the program may read under; the current directory if `None`.
    pub dir: Option<PathBuf>,
    /// Directories the program may create and write files under.
    pub allow_write: Vec<PathBuf>,
    /// Regions to track from the start (they follow the program).
    pub track: Vec<Region>,
    /// Standard input.
    pub stdin: Input,
    /// Standard output.
    pub stdout: Output,
    /// Standard error.
    pub stderr: Output,
    /// Ends the run after this long.
    pub timeout: Option<Duration>,
    /// Relaxed mode of tracked frames (off by default: one exact event per store).
    pub relaxed: pagetrack_kvm::RelaxedConfig,
    /// The VM's dirty ring instead of the dirty bitmaps (`None`, the default: bitmaps).
    pub dirty_ring: Option<pagetrack_kvm::DirtyRing>,
}

impl ProcessConfig {
    /// Runs `program` with no arguments, an empty environment, 256 MiB of RAM, the current
    /// directory readable, inherited standard streams, nothing tracked, no timeout.
    pub fn new(program: impl Into<PathBuf>) -> ProcessConfig {
        ProcessConfig {
            program: program.into(),
            argv0: None,
            args: Vec::new(),
            env: Vec::new(),
            mem: DEFAULT_MEM,
            dir: None,
            allow_write: Vec::new(),
            track: Vec::new(),
            stdin: Input::Inherit,
            stdout: Output::Inherit,
            stderr: Output::Inherit,
            timeout: None,
            relaxed: pagetrack_kvm::RelaxedConfig::default(),
            dirty_ring: None,
        }
    }

    /// With these arguments after `argv[0]`.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> ProcessConfig {
        self.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// With this `argv[0]`.
    pub fn argv0(mut self, argv0: impl Into<String>) -> ProcessConfig {
        self.argv0 = Some(argv0.into());
        self
    }

    /// With this environment (`NAME=value` each).
    pub fn env<I: IntoIterator<Item = S>, S: Into<String>>(mut self, env: I) -> ProcessConfig {
        self.env = env.into_iter().map(Into::into).collect();
        self
    }

    /// With `bytes` of guest RAM.
    pub fn mem(mut self, bytes: u64) -> ProcessConfig {
        self.mem = bytes;
        self
    }

    /// Reading under `dir` (and the files named in the arguments) only.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> ProcessConfig {
        self.dir = Some(dir.into());
        self
    }

    /// Also creating and writing files under `dir`.
    pub fn allow_write(mut self, dir: impl Into<PathBuf>) -> ProcessConfig {
        self.allow_write.push(dir.into());
        self
    }

    /// Tracking these regions.
    pub fn track<I: IntoIterator<Item = Region>>(mut self, regions: I) -> ProcessConfig {
        self.track = regions.into_iter().collect();
        self
    }

    /// With this standard input.
    pub fn stdin(mut self, input: Input) -> ProcessConfig {
        self.stdin = input;
        self
    }

    /// With this standard output.
    pub fn stdout(mut self, output: Output) -> ProcessConfig {
        self.stdout = output;
        self
    }

    /// With this standard error.
    pub fn stderr(mut self, output: Output) -> ProcessConfig {
        self.stderr = output;
        self
    }

    /// Ending after `t`.
    pub fn timeout(mut self, t: Option<Duration>) -> ProcessConfig {
        self.timeout = t;
        self
    }

    /// With relaxed mode set up as `relaxed` (the notifiers must accept coalesced events for
    /// frames to run relaxed).
    pub fn relaxed(mut self, relaxed: pagetrack_kvm::RelaxedConfig) -> ProcessConfig {
        self.relaxed = relaxed;
        self
    }

    /// With the VM's dirty ring of `ring` (see [`pagetrack_kvm::DirtyRing`]), or without.
    pub fn dirty_ring(mut self, ring: Option<pagetrack_kvm::DirtyRing>) -> ProcessConfig {
        self.dirty_ring = ring;
        self
    }
}

/// How the program ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProcessEnd {
    /// It called `exit` or `exit_group` with this status.
    Exited(u8),
    /// It was ended by a signal: a CPU exception (no handler ever runs for those), or a
    /// signal without a handler whose default action ends the program (`abort`, `raise`,
    /// a timer's `SIGALRM`, `SIGPIPE`).
    Signaled {
        /// The signal number Linux would have sent (SIGSEGV 11, SIGILL 4, SIGFPE 8...).
        signal: u8,
        /// The exception, if one caused it.
        exception: Option<GuestException>,
        /// What happened, in words.
        detail: String,
    },
    /// The timeout passed.
    Timeout(Duration),
    /// The guest could not go on: an exit pagetrack cannot serve (a store it cannot
    /// emulate, a triple fault, port I/O outside the stub).
    Crashed(String),
}

impl ProcessEnd {
    /// The status a shell would report: the exit status, 128 + signal, 124 for a timeout
    /// (as `timeout(1)`), 125 for a crash.
    pub fn status(&self) -> u8 {
        match self {
            ProcessEnd::Exited(c) => *c,
            ProcessEnd::Signaled { signal, .. } => 128 + signal,
            ProcessEnd::Timeout(_) => 124,
            ProcessEnd::Crashed(_) => 125,
        }
    }

    /// True if the program ended itself (exit or a signal of its own doing).
    pub fn is_program_end(&self) -> bool {
        matches!(self, ProcessEnd::Exited(_) | ProcessEnd::Signaled { .. })
    }
}

impl std::fmt::Display for ProcessEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcessEnd::Exited(c) => write!(f, "exited with status {c}"),
            ProcessEnd::Signaled { detail, .. } => f.write_str(detail),
            ProcessEnd::Timeout(t) => write!(f, "did not finish within {t:?}"),
            ProcessEnd::Crashed(d) => f.write_str(d),
        }
    }
}

/// Counters and timings of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcessStats {
    /// System calls by number, unknown ones, refused ones.
    pub syscalls: SyscallCounts,
    /// Exits the VMM handled: system calls and exceptions (trapped stores are in `vm`).
    pub exits: u64,
    /// Page faults that grew the stack.
    pub stack_faults: u64,
    /// Tracking counters.
    pub tracking: TrackStats,
    /// The backend's counters (trapped and emulated stores, device writes, slot changes).
    pub vm: VmStats,
    /// Most guest frames in use at once.
    pub peak_frames: u64,
    /// Building the VM and loading the program.
    pub load_time: Duration,
    /// The whole run, from the first instruction to the end.
    pub run_time: Duration,
    /// Time inside the vCPU's run loop: guest code, exit round trips, trapped stores.
    pub guest_time: Duration,
    /// Time serving system calls, tracking changes included.
    pub syscall_time: Duration,
    /// True if `syscall` entered CPL0 (VT-x/SVM); false if it stayed at CPL3 (PVM).
    pub syscall_enters_cpl0: bool,
    /// Host calls of the VMM's own that failed where no caller could be told (a thread's
    /// eventfd wake-up, a wait's `poll`, a helper thread that panicked): 0 in a healthy
    /// run; the run goes on (each such failure only ends a wait early or late).
    pub host_errors: u64,
}

/// The result of [`Process::run`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcessOutcome {
    /// How it ended.
    pub end: ProcessEnd,
    /// Standard output, if captured.
    pub stdout: Vec<u8>,
    /// Standard error, if captured.
    pub stderr: Vec<u8>,
    /// Counters and timings.
    pub stats: ProcessStats,
}

/// A program loaded into a fresh VM, ready to run.
#[derive(Debug)]
pub struct Process {
    vm: Vm,
    vcpu: Vcpu,
    kernel: Kernel,
    layout: LongModeLayout,
    tracking: track::Tracking,
    timeout: Option<Duration>,
    load_time: Duration,
}

fn bad_image(program: &Path, reason: impl Into<ImageProblem>) -> Error {
    Error::InvalidGuestImage {
        program: Some(program.to_owned()),
        reason: reason.into(),
        source: None,
    }
}

/// The program cannot be opened or read (`reason`) because of `source`.
fn unreadable(program: &Path, reason: ImageProblem, source: std::io::Error) -> Error {
    Error::InvalidGuestImage {
        program: Some(program.to_owned()),
        reason,
        source: Some(source),
    }
}

fn bad_config(reason: ConfigProblem) -> Error {
    Error::InvalidConfig {
        reason,
        source: None,
    }
}

/// Reads the program as `execve` would accept it: a regular file (never a device or a FIFO,
/// which would read forever or block), executable by pagetrack's user, and no larger than
/// guest memory.
fn read_program(program: &Path, mem: u64) -> Result<Vec<u8>> {
    use rustix::fs::{Access, AtFlags, CWD, Mode, OFlags};
    use std::io::Read;
    let refused = |reason, source: Option<std::io::Error>| Error::ProgramRefused {
        path: program.to_owned(),
        reason,
        source,
    };
    // Non-blocking, so a FIFO without a writer does not hang the open.
    let fd = rustix::fs::open(
        program,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| unreadable(program, ImageProblem::Open, e.into()))?;
    let file = std::fs::File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| unreadable(program, ImageProblem::Read, e))?;
    if !meta.is_file() {
        return Err(refused(ProgramRefusal::NotRegular, None));
    }
    // execve's rule (root too needs one execute bit), with the effective ids.
    rustix::fs::accessat(CWD, program, Access::EXEC_OK, AtFlags::EACCESS)
        .map_err(|e| refused(ProgramRefusal::NotExecutable, Some(e.into())))?;
    if meta.len() > mem {
        return Err(refused(ProgramRefusal::TooLarge, None));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(mem)
        .read_to_end(&mut bytes)
        .map_err(|e| unreadable(program, ImageProblem::Read, e))?;
    Ok(bytes)
}

/// The signal Linux sends for exception `vector`, with its name.
fn signal_of(vector: u8) -> (u8, &'static str) {
    match vector {
        0 | 16 | 19 => (8, "Floating point exception (SIGFPE)"),
        1 | 3 => (5, "Trace/breakpoint trap (SIGTRAP)"),
        6 => (4, "Illegal instruction (SIGILL)"),
        // #NP, #SS (a non-canonical stack), #AC: SIGBUS, as Linux's traps.
        11 | 12 | 17 => (7, "Bus error (SIGBUS)"),
        _ => (11, "Segmentation fault (SIGSEGV)"),
    }
}

fn signal_name(sig: u8) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => "a fatal signal",
    }
}

/// The uid and gid the program sees: pagetrack's own (the owner of `/proc/self`).
fn host_ids() -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or((0, 0), |m| (m.uid(), m.gid()))
}

fn random16() -> [u8; 16] {
    use std::io::Read;
    let mut r = [0u8; 16];
    let filled = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut r));
    if filled.is_err() {
        // Not a security boundary: glibc only seeds its stack guard from it.
        let t = Instant::now().elapsed().as_nanos().to_le_bytes();
        r.copy_from_slice(&t);
    }
    r
}

impl Process {
    /// Loads `config.program` into a new VM.
    ///
    /// # Errors
    /// [`Error::InvalidGuestImage`] for a missing, unreadable, non-ELF, 32-bit, dynamic or
    /// malformed program; [`Error::InvalidConfig`] for bad memory sizes, directories or
    /// standard input; KVM failures.
    pub fn new(config: ProcessConfig) -> Result<Process> {
        let kvm = Kvm::new().map_err(|source| Error::Kvm {
            op: "open /dev/kvm",
            source,
        })?;
        Process::with_kvm(kvm, config)
    }

    /// As [`Process::new`] on an open `/dev/kvm`.
    ///
    /// # Errors
    /// As [`Process::new`].
    pub fn with_kvm(kvm: Kvm, config: ProcessConfig) -> Result<Process> {
        let started = Instant::now();
        if config.mem < MIN_MEM || config.mem > MAX_MEM || !config.mem.is_multiple_of(2 << 20) {
            return Err(bad_config(ConfigProblem::ProcessMemory { mem: config.mem }));
        }
        let program = &config.program;
        let file = read_program(program, config.mem)?;
        let exe = elf::parse(&file).map_err(|e| bad_image(program, e))?;
        let cwd = std::env::current_dir().map_err(|e| Error::InvalidConfig {
            reason: ConfigProblem::CurrentDir,
            source: Some(e),
        })?;
        let named: Vec<PathBuf> = config.args.iter().map(PathBuf::from).collect();
        let exe_path = program.canonicalize().unwrap_or_else(|_| program.clone());
        let sandbox = fs::Sandbox::new(
            config.dir.as_deref().unwrap_or(&cwd),
            &config.allow_write,
            &named,
            &cwd,
            &exe_path,
        )?;

        let vm = Vm::with_kvm(
            kvm,
            VmConfig::default()
                .with_ram(config.mem)
                .with_relaxed(config.relaxed)
                .with_dirty_ring_if(config.dirty_ring),
        )?;
        vm.add_ram(0, config.mem)?;
        let layout = LongModeLayout::new(config.mem)?;
        let mut vcpu = vm.create_vcpu(0)?;
        x86::setup_long_mode(
            vm.kvm(),
            vcpu.fd(),
            &*vm.untracked_memory(),
            &layout,
            exe.entry,
            0,
        )?;

        let cpuid = vm
            .kvm()
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| Error::Kvm {
                op: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        let leaf = |f: u32| {
            cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == f && e.index == 0)
                .copied()
        };
        let hwcap = leaf(1).map_or(0, |e| u64::from(e.edx));
        let nx = leaf(0x8000_0001).is_some_and(|e| e.edx & (1 << 20) != 0);

        let mem = vm.memory();
        // Only the system-call port is open to CPL3.
        let (bitmap, bitmap_end) = layout.io_bitmap();
        let bitmap_len = usize::try_from(bitmap_end - bitmap)
            .expect("x86-64 only (pagetrack-x86): a usize holds any u64");
        let mut bits = vec![0xffu8; bitmap_len];
        bits[usize::from(SYSCALL_PORT / 8)] &= !(1 << (SYSCALL_PORT % 8));
        mem.write_slice(&bits, GuestAddress(bitmap))?;
        mem.write_slice(&syscall_stub()?, GuestAddress(STUB_GFN * PAGE))?;
        mem.write_slice(&vdso::image()?, GuestAddress(vdso::VDSO_GFN * PAGE))?;

        let (reserved, reserved_end) = layout.reserved_range();
        let general_end = (reserved - x86::USER_STACK_SIZE) / PAGE;
        let frames = Frames::new(TABLE_POOL, (GENERAL_START, general_end));
        let no_frames = |what| bad_config(ConfigProblem::MemoryTooSmall { what });
        let mut mm =
            AddressSpace::new(mem, frames, nx).map_err(|_| no_frames("the page tables"))?;
        for page in (reserved..reserved_end).step_by(4096) {
            mm.map_fixed_frame(
                page,
                page / PAGE,
                PROT_READ | PROT_WRITE | PROT_EXEC,
                PageKind::System,
            )
            .map_err(|_| no_frames("the page tables"))?;
        }
        mm.map_fixed_frame(STUB_VA, STUB_GFN, PROT_READ | PROT_EXEC, PageKind::Stub)
            .map_err(|_| no_frames("the page tables"))?;
        // The vDSO and its time page (KVM writes the kvmclock part by guest-physical address).
        mm.map_fixed_frame(
            vdso::VDSO_VA,
            vdso::VDSO_GFN,
            PROT_READ | PROT_EXEC,
            PageKind::Stub,
        )
        .map_err(|_| no_frames("the page tables"))?;
        mm.map_fixed_frame(vdso::VVAR_VA, vdso::VVAR_GFN, PROT_READ, PageKind::Stub)
            .map_err(|_| no_frames("the page tables"))?;
        load_segments(&mut mm, &exe, &file, program)?;
        mm.init_brk(exe.end());

        // argv, envp, auxv.
        let argv0 = config
            .argv0
            .clone()
            .unwrap_or_else(|| program.display().to_string());
        let mut argv: Vec<Vec<u8>> = vec![argv0.clone().into_bytes()];
        argv.extend(config.args.iter().map(|a| a.clone().into_bytes()));
        let envp: Vec<Vec<u8>> = config.env.iter().map(|e| e.clone().into_bytes()).collect();
        let (uid, gid) = host_ids();
        let aux = [
            (stack::AT_PHDR, exe.phdr),
            (stack::AT_PHENT, 56),
            (stack::AT_PHNUM, exe.phnum),
            (stack::AT_PAGESZ, PAGE),
            (stack::AT_BASE, 0),
            (stack::AT_FLAGS, 0),
            (stack::AT_ENTRY, exe.entry),
            (stack::AT_UID, u64::from(uid)),
            (stack::AT_EUID, u64::from(uid)),
            (stack::AT_GID, u64::from(gid)),
            (stack::AT_EGID, u64::from(gid)),
            (stack::AT_HWCAP, hwcap),
            (stack::AT_HWCAP2, 0),
            (stack::AT_CLKTCK, 100),
            (stack::AT_SECURE, 0),
            (stack::AT_SYSINFO_EHDR, vdso::VDSO_VA),
        ];
        let execfn = program.as_os_str().as_encoded_bytes().to_vec();
        let init = stack::build(STACK_TOP, &argv, &envp, &execfn, random16(), &aux);
        let need = (init.bytes.len() as u64 + (16 << 10)).next_multiple_of(PAGE);
        if need > mm::STACK_MAX / 2 {
            return Err(bad_config(ConfigProblem::ArgumentsTooLarge));
        }
        let stack_prot = PROT_READ | PROT_WRITE | if exe.exec_stack { PROT_EXEC } else { 0 };
        mm.map_stack(need.max(STACK_INITIAL), stack_prot)
            .map_err(|_| no_frames("the stack"))?;
        mm.poke(init.sp, &init.bytes)
            .map_err(|_| no_frames("the stack"))?;

        // Registers: our page tables, the syscall MSRs, the entry state.
        let fd = vcpu.fd();
        let kvm_err = |op: &'static str| move |source| Error::Kvm { op, source };
        let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        sregs.cr3 = mm.cr3();
        fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        set_syscall_msrs(fd)?;
        let mut regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        regs = kvm_bindings::kvm_regs {
            rip: exe.entry,
            rsp: init.sp,
            rflags: ENTRY_RFLAGS,
            ..regs
        };
        regs.rdx = 0;
        fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        vcpu.fd_mut().set_sync_valid_reg(SyncReg::Register);

        let comm = Path::new(&argv0)
            .file_name()
            .map(|n| n.as_encoded_bytes().to_vec())
            .unwrap_or_default();
        let kernel = Kernel::new(
            mm,
            sandbox,
            KernelSetup {
                stdin: config.stdin.clone(),
                stdout: config.stdout,
                stderr: config.stderr,
                uid,
                gid,
                comm,
                mem_bytes: config.mem,
            },
        )?;
        let mut kernel = kernel;
        let clock = vdso::GuestClock::setup(vm.vm_fd(), vcpu.fd(), kernel.monotonic_now());
        let (at, bytes) = clock.page().bytes();
        vm.memory()
            .write_slice(&bytes, GuestAddress(vdso::VVAR_GFN * PAGE + at))?;
        kernel.set_clock(clock);
        Ok(Process {
            vm,
            vcpu,
            kernel,
            layout,
            tracking: track::Tracking::new(config.track.clone()),
            timeout: config.timeout,
            load_time: started.elapsed(),
        })
    }

    /// The VM: register notifiers through `vm().tracker()` before running.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Tells `observer` when frames start and stop being tracked, with their contents.
    pub fn set_observer(&mut self, observer: Arc<dyn FrameObserver>) {
        self.tracking.set_observer(observer);
    }

    /// Runs the program to its end.
    ///
    /// # Errors
    /// Host failures only (a KVM ioctl, a tracking batch the backend refused); the program's
    /// own failures are in [`ProcessOutcome::end`].
    pub fn run(mut self) -> Result<ProcessOutcome> {
        self.tracking.start(&self.vm, &mut self.kernel.mm)?;
        let started = Instant::now();
        let deadline = self.timeout.map(|t| started + t);
        self.kernel.set_deadline(deadline);
        let main = thread::GuestThread::new(self.vcpu, syscall::PID);
        let main_stopper = main.vcpu.stopper();
        let ctx = Arc::new(thread::Ctx::new(
            self.vm,
            self.layout,
            self.timeout,
            deadline,
            self.kernel,
            self.tracking,
            &main,
        ));
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let watchdog = self.timeout.map(|t| {
            let ctx = Arc::clone(&ctx);
            std::thread::spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(t) {
                    ctx.time_out();
                }
            })
        });
        // The alarm kicker: stops the main vCPU when the program's timer is due, so that
        // SIGALRM reaches a program that computes without system calls.
        let (alarm_tx, alarm_rx) = mpsc::channel::<Option<Instant>>();
        let kicker = std::thread::spawn(move || {
            let mut next: Option<Instant> = None;
            loop {
                let msg = match next {
                    Some(at) => alarm_rx.recv_timeout(at.saturating_duration_since(Instant::now())),
                    None => alarm_rx
                        .recv()
                        .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                };
                match msg {
                    Ok(at) => next = at,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        main_stopper.stop();
                        next = None;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        });
        thread::run_thread(&ctx, main, Some(&alarm_tx), false);
        let end = ctx.wait_end();
        drop(done_tx);
        drop(alarm_tx);
        // The helpers only stop vCPUs; one that panicked (a bug) missed a stop, which the
        // run's end already shows (a timeout not taken, an alarm late), so it is counted.
        let helpers_failed = u64::from(watchdog.is_some_and(|w| w.join().is_err()))
            + u64::from(kicker.join().is_err());
        let run_time = started.elapsed();
        let end = end?;
        let mut g = ctx.lock();
        let g = &mut *g;
        g.tracking.finish(&ctx.vm)?;
        let mut stats = std::mem::take(&mut g.stats);
        stats.run_time = run_time;
        stats.syscalls = g.kernel.counts.clone();
        stats.tracking = g.tracking.stats;
        stats.vm = ctx.vm.stats();
        stats.peak_frames = g.kernel.mm.peak_frames();
        stats.load_time = self.load_time;
        // Every thread has been joined: Relaxed, as the join ordered their counts before.
        stats.host_errors =
            ctx.host_errors.load(std::sync::atomic::Ordering::Relaxed) + helpers_failed;
        let (stdout, stderr) = g.kernel.take_output();
        Ok(ProcessOutcome {
            end,
            stdout,
            stderr,
            stats,
        })
    }
}

/// Points the system-call MSRs of `fd` at the stub.
fn set_syscall_msrs(fd: &kvm_ioctls::VcpuFd) -> Result<()> {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let msrs = Msrs::from_entries(&[
        msr(MSR_STAR, STAR),
        msr(MSR_LSTAR, STUB_VA),
        msr(MSR_SYSCALL_MASK, SYSCALL_MASK),
    ])
    .expect("3 MSRs are within KVM_MAX_MSR_ENTRIES");
    let set = fd.set_msrs(&msrs).map_err(|source| Error::Kvm {
        op: "KVM_SET_MSRS",
        source,
    })?;
    let wanted = [MSR_STAR, MSR_LSTAR, MSR_SYSCALL_MASK];
    if let Some(&index) = wanted.get(set) {
        // KVM_SET_MSRS stops at the first MSR it refuses.
        return Err(Error::MsrRefused { index });
    }
    Ok(())
}

/// The end of a program whose signal frame cannot be read or written: SIGSEGV, as Linux's
/// `force_sigsegv`.
fn bad_frame(at: u64) -> ProcessEnd {
    ProcessEnd::Signaled {
        signal: 11,
        exception: None,
        detail: format!("Segmentation fault (SIGSEGV): no room for a signal frame at {at:#x}"),
    }
}

/// `out SYSCALL_PORT, al; sysretq; ud2` assembled at [`STUB_VA`].
fn syscall_stub() -> Result<Vec<u8>> {
    let build = || -> std::result::Result<Vec<u8>, iced_x86::IcedError> {
        let mut a = CodeAssembler::new(64)?;
        // Exit to the VMM, which serves the call (RAX, RDI, RSI, RDX, R10, R8, R9).
        a.out(i32::from(SYSCALL_PORT), al)?;
        // Reached only where `syscall` entered CPL0: back to RCX at CPL3.
        a.sysretq()?;
        a.ud2()?;
        a.assemble(STUB_VA)
    };
    build().map_err(|source| Error::Assemble { source })
}

/// Maps the image's segments (pages shared by two segments get both permissions) and copies
/// their file bytes.
fn load_segments(
    mm: &mut AddressSpace,
    exe: &elf::Executable,
    file: &[u8],
    program: &Path,
) -> Result<()> {
    // What the segments span, before any per-page bookkeeping: a huge p_memsz is refused
    // here, within guest memory, not by exhausting the host. Segments are sorted and do not
    // overlap (elf::parse), so only a page shared at a boundary is counted once.
    let mut need = 0u64;
    let mut last_end = 0u64;
    for s in &exe.segments {
        let first = (s.vaddr & !(PAGE - 1)).max(last_end);
        let end = (s.vaddr + s.mem_size).next_multiple_of(PAGE);
        need += end.saturating_sub(first) / PAGE;
        last_end = last_end.max(end);
    }
    // One page-table frame per 2 MiB spanned, and the levels above.
    let need = need + need.div_ceil(512) + 3 * exe.segments.len() as u64;
    let free = mm.free_frames();
    if need > free {
        return Err(Error::ImageTooLarge {
            path: program.to_owned(),
            need: need.saturating_mul(PAGE),
            free: free * PAGE,
        });
    }
    let mut pages: std::collections::BTreeMap<u64, (u32, PageKind)> =
        std::collections::BTreeMap::new();
    for s in &exe.segments {
        let mut prot = 0;
        if s.flags & elf::PF_R != 0 {
            prot |= PROT_READ;
        }
        if s.flags & elf::PF_W != 0 {
            prot |= PROT_WRITE;
        }
        if s.flags & elf::PF_X != 0 {
            prot |= PROT_EXEC;
        }
        let kind = if prot & PROT_WRITE != 0 {
            PageKind::Data
        } else {
            PageKind::Text
        };
        let first = s.vaddr & !(PAGE - 1);
        let end = (s.vaddr + s.mem_size).next_multiple_of(PAGE);
        for page in (first..end).step_by(4096) {
            let e = pages.entry(page).or_insert((0, kind));
            e.0 |= prot;
            if kind == PageKind::Data {
                e.1 = PageKind::Data;
            }
        }
    }
    let mut run: Option<(u64, u64, u32, PageKind)> = None;
    let mut runs = Vec::new();
    for (&page, &(prot, kind)) in &pages {
        match &mut run {
            Some((_, end, p, k)) if *end == page && *p == prot && *k == kind => *end += PAGE,
            _ => {
                runs.extend(run.take());
                run = Some((page, page + PAGE, prot, kind));
            }
        }
    }
    runs.extend(run);
    for (start, end, prot, kind) in runs {
        if !mm.is_free(start, end) {
            return Err(bad_image(
                program,
                ImageProblem::SegmentsOverlapVmm { start, end },
            ));
        }
        mm.map(start, end - start, prot, kind)
            .map_err(|_| bad_image(program, ImageProblem::NoFramesForImage))?;
    }
    for s in &exe.segments {
        let copy = || bad_image(program, ImageProblem::SegmentCopy { vaddr: s.vaddr });
        // elf::parse checked that the bytes lie inside the file.
        let from = usize::try_from(s.offset).map_err(|_| copy())?;
        let n = usize::try_from(s.file_size).map_err(|_| copy())?;
        let bytes = from
            .checked_add(n)
            .and_then(|end| file.get(from..end))
            .ok_or_else(copy)?;
        mm.poke(s.vaddr, bytes).map_err(|_| copy())?;
    }
    Ok(())
}
