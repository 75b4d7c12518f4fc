//! The Linux x86-64 user ABI the process VM speaks: errno values, system-call numbers and
//! names, and flag values, as `include/uapi` and `arch/x86/entry/syscalls/syscall_64.tbl`
//! define them.

/// A positive Linux errno; a system call returns its negation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i64);

/// A system call's result: a value, or an errno.
pub type SysResult<T = u64> = Result<T, Errno>;

macro_rules! errnos {
    ($($name:ident = $v:expr),* $(,)?) => {
        $(#[doc = concat!("`", stringify!($name), "`.")] pub const $name: Errno = Errno($v);)*
    };
}

errnos! {
    EPERM = 1, ENOENT = 2, ESRCH = 3, EIO = 5, E2BIG = 7, EBADF = 9, ECHILD = 10,
    ENOMEM = 12, EACCES = 13, EFAULT = 14, EEXIST = 17, ENOTDIR = 20, EISDIR = 21,
    EINVAL = 22, EMFILE = 24, ENOTTY = 25, ESPIPE = 29, EPIPE = 32, ERANGE = 34,
    ENAMETOOLONG = 36, ENOSYS = 38, EINTR = 4, ERESTARTSYS = 512, EAGAIN = 11, ETIMEDOUT = 110,
}

/// A wait a signal interrupted, of a call Linux ends with `ERESTARTSYS` (`read`, `write`,
/// `readv`, `writev`, a waiting record lock, `FUTEX_WAIT` without a timeout): after the signal
/// is delivered, the call is restarted if the handler has `SA_RESTART` (or no handler runs),
/// else it returns `EINTR`. Internal: it never reaches the program.
pub const EINTR_RESTARTABLE: Errno = Errno(0x1_0000 | EINTR.0);

impl Errno {
    /// The errno of a host I/O error (the host is Linux, so the numbers are the guest's).
    pub fn from_io(e: &std::io::Error) -> Errno {
        Errno(e.raw_os_error().map_or(EIO.0, i64::from))
    }
}

/// `PROT_READ`.
pub const PROT_READ: u32 = 1;
/// `PROT_WRITE`.
pub const PROT_WRITE: u32 = 2;
/// `PROT_EXEC`.
pub const PROT_EXEC: u32 = 4;

/// `AT_FDCWD`.
pub const AT_FDCWD: i64 = -100;
/// `AT_SYMLINK_NOFOLLOW`.
pub const AT_SYMLINK_NOFOLLOW: u64 = 0x100;
/// `AT_EMPTY_PATH`.
pub const AT_EMPTY_PATH: u64 = 0x1000;

/// `O_ACCMODE`.
pub const O_ACCMODE: u64 = 3;
/// `O_WRONLY`.
pub const O_WRONLY: u64 = 1;
/// `O_RDWR`.
pub const O_RDWR: u64 = 2;
/// `O_CREAT`.
pub const O_CREAT: u64 = 0o100;
/// `O_TRUNC`.
pub const O_TRUNC: u64 = 0o1000;
/// `O_CLOEXEC`.
pub const O_CLOEXEC: u64 = 0o2_000_000;

/// System-call numbers the VMM serves or refuses by name.
pub mod nr {
    pub const READ: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const OPEN: u64 = 2;
    pub const CLOSE: u64 = 3;
    pub const STAT: u64 = 4;
    pub const FSTAT: u64 = 5;
    pub const LSTAT: u64 = 6;
    pub const LSEEK: u64 = 8;
    pub const MMAP: u64 = 9;
    pub const MPROTECT: u64 = 10;
    pub const MUNMAP: u64 = 11;
    pub const BRK: u64 = 12;
    pub const RT_SIGACTION: u64 = 13;
    pub const RT_SIGPROCMASK: u64 = 14;
    pub const IOCTL: u64 = 16;
    pub const PREAD64: u64 = 17;
    pub const PWRITE64: u64 = 18;
    pub const READV: u64 = 19;
    pub const WRITEV: u64 = 20;
    pub const POLL: u64 = 7;
    pub const SELECT: u64 = 23;
    pub const ACCESS: u64 = 21;
    pub const SCHED_YIELD: u64 = 24;
    pub const MREMAP: u64 = 25;
    pub const MADVISE: u64 = 28;
    pub const DUP: u64 = 32;
    pub const DUP2: u64 = 33;
    pub const NANOSLEEP: u64 = 35;
    pub const RT_SIGRETURN: u64 = 15;
    pub const PAUSE: u64 = 34;
    pub const GETITIMER: u64 = 36;
    pub const ALARM: u64 = 37;
    pub const SETITIMER: u64 = 38;
    pub const GETPID: u64 = 39;
    pub const SENDFILE: u64 = 40;
    pub const SOCKET: u64 = 41;
    pub const CONNECT: u64 = 42;
    pub const ACCEPT: u64 = 43;
    pub const BIND: u64 = 49;
    pub const SOCKETPAIR: u64 = 53;
    pub const CLONE: u64 = 56;
    pub const FORK: u64 = 57;
    pub const VFORK: u64 = 58;
    pub const EXECVE: u64 = 59;
    pub const EXIT: u64 = 60;
    pub const WAIT4: u64 = 61;
    pub const KILL: u64 = 62;
    pub const UNAME: u64 = 63;
    pub const FCNTL: u64 = 72;
    pub const FSYNC: u64 = 74;
    pub const FDATASYNC: u64 = 75;
    pub const FTRUNCATE: u64 = 77;
    pub const GETCWD: u64 = 79;
    pub const RENAME: u64 = 82;
    pub const MKDIR: u64 = 83;
    pub const RMDIR: u64 = 84;
    pub const LINK: u64 = 86;
    pub const UNLINK: u64 = 87;
    pub const SYMLINK: u64 = 88;
    pub const READLINK: u64 = 89;
    pub const CHMOD: u64 = 90;
    pub const FCHMOD: u64 = 91;
    pub const CHOWN: u64 = 92;
    pub const FCHOWN: u64 = 93;
    pub const LCHOWN: u64 = 94;
    pub const UMASK: u64 = 95;
    pub const GETTIMEOFDAY: u64 = 96;
    pub const GETRLIMIT: u64 = 97;
    pub const SYSINFO: u64 = 99;
    pub const GETUID: u64 = 102;
    pub const GETGID: u64 = 104;
    pub const SETUID: u64 = 105;
    pub const SETGID: u64 = 106;
    pub const GETEUID: u64 = 107;
    pub const GETEGID: u64 = 108;
    pub const SETPGID: u64 = 109;
    pub const GETPPID: u64 = 110;
    pub const GETPGRP: u64 = 111;
    pub const SETSID: u64 = 112;
    pub const GETGROUPS: u64 = 115;
    pub const RT_SIGPENDING: u64 = 127;
    pub const RT_SIGTIMEDWAIT: u64 = 128;
    pub const RT_SIGSUSPEND: u64 = 130;
    pub const SIGALTSTACK: u64 = 131;
    pub const PRCTL: u64 = 157;
    pub const ARCH_PRCTL: u64 = 158;
    pub const SETRLIMIT: u64 = 160;
    pub const GETTID: u64 = 186;
    pub const FUTEX: u64 = 202;
    pub const TKILL: u64 = 200;
    pub const TIME: u64 = 201;
    pub const SCHED_GETAFFINITY: u64 = 204;
    pub const GETDENTS64: u64 = 217;
    pub const SET_TID_ADDRESS: u64 = 218;
    pub const FADVISE64: u64 = 221;
    pub const CLOCK_GETTIME: u64 = 228;
    pub const CLOCK_GETRES: u64 = 229;
    pub const CLOCK_NANOSLEEP: u64 = 230;
    pub const EXIT_GROUP: u64 = 231;
    pub const TGKILL: u64 = 234;
    pub const UTIMES: u64 = 235;
    pub const OPENAT: u64 = 257;
    pub const MKDIRAT: u64 = 258;
    pub const FCHOWNAT: u64 = 260;
    pub const NEWFSTATAT: u64 = 262;
    pub const UNLINKAT: u64 = 263;
    pub const RENAMEAT: u64 = 264;
    pub const LINKAT: u64 = 265;
    pub const SYMLINKAT: u64 = 266;
    pub const READLINKAT: u64 = 267;
    pub const FCHMODAT: u64 = 268;
    pub const FACCESSAT: u64 = 269;
    pub const SET_ROBUST_LIST: u64 = 273;
    pub const PSELECT6: u64 = 270;
    pub const PPOLL: u64 = 271;
    pub const DUP3: u64 = 292;
    pub const UTIMENSAT: u64 = 280;
    pub const PRLIMIT64: u64 = 302;
    pub const RENAMEAT2: u64 = 316;
    pub const FCHMODAT2: u64 = 452;
    pub const GETRANDOM: u64 = 318;
    pub const EXECVEAT: u64 = 322;
    pub const RSEQ: u64 = 334;
    pub const CLONE3: u64 = 435;
    pub const FACCESSAT2: u64 = 439;
}

/// The name of system call `n` (x86-64 numbering), for the summary; `None` for numbers this
/// table does not know.
pub fn syscall_name(n: u64) -> Option<&'static str> {
    const NAMES: &[(u64, &str)] = &[
        (0, "read"),
        (1, "write"),
        (2, "open"),
        (3, "close"),
        (4, "stat"),
        (5, "fstat"),
        (6, "lstat"),
        (7, "poll"),
        (8, "lseek"),
        (9, "mmap"),
        (10, "mprotect"),
        (11, "munmap"),
        (12, "brk"),
        (13, "rt_sigaction"),
        (14, "rt_sigprocmask"),
        (15, "rt_sigreturn"),
        (16, "ioctl"),
        (17, "pread64"),
        (18, "pwrite64"),
        (19, "readv"),
        (20, "writev"),
        (21, "access"),
        (22, "pipe"),
        (23, "select"),
        (24, "sched_yield"),
        (25, "mremap"),
        (26, "msync"),
        (27, "mincore"),
        (28, "madvise"),
        (32, "dup"),
        (33, "dup2"),
        (35, "nanosleep"),
        (39, "getpid"),
        (41, "socket"),
        (42, "connect"),
        (43, "accept"),
        (44, "sendto"),
        (45, "recvfrom"),
        (49, "bind"),
        (50, "listen"),
        (53, "socketpair"),
        (56, "clone"),
        (57, "fork"),
        (58, "vfork"),
        (59, "execve"),
        (60, "exit"),
        (61, "wait4"),
        (62, "kill"),
        (63, "uname"),
        (72, "fcntl"),
        (73, "flock"),
        (74, "fsync"),
        (75, "fdatasync"),
        (76, "truncate"),
        (77, "ftruncate"),
        (78, "getdents"),
        (79, "getcwd"),
        (80, "chdir"),
        (81, "fchdir"),
        (82, "rename"),
        (83, "mkdir"),
        (84, "rmdir"),
        (86, "link"),
        (87, "unlink"),
        (88, "symlink"),
        (89, "readlink"),
        (90, "chmod"),
        (91, "fchmod"),
        (92, "chown"),
        (93, "fchown"),
        (94, "lchown"),
        (95, "umask"),
        (96, "gettimeofday"),
        (97, "getrlimit"),
        (98, "getrusage"),
        (99, "sysinfo"),
        (100, "times"),
        (101, "ptrace"),
        (102, "getuid"),
        (104, "getgid"),
        (105, "setuid"),
        (106, "setgid"),
        (107, "geteuid"),
        (108, "getegid"),
        (109, "setpgid"),
        (110, "getppid"),
        (111, "getpgrp"),
        (112, "setsid"),
        (115, "getgroups"),
        (130, "rt_sigsuspend"),
        (131, "sigaltstack"),
        (137, "statfs"),
        (138, "fstatfs"),
        (157, "prctl"),
        (158, "arch_prctl"),
        (160, "setrlimit"),
        (186, "gettid"),
        (200, "tkill"),
        (201, "time"),
        (202, "futex"),
        (204, "sched_getaffinity"),
        (217, "getdents64"),
        (218, "set_tid_address"),
        (221, "fadvise64"),
        (228, "clock_gettime"),
        (229, "clock_getres"),
        (230, "clock_nanosleep"),
        (231, "exit_group"),
        (234, "tgkill"),
        (257, "openat"),
        (258, "mkdirat"),
        (262, "newfstatat"),
        (263, "unlinkat"),
        (264, "renameat"),
        (267, "readlinkat"),
        (269, "faccessat"),
        (270, "pselect6"),
        (271, "ppoll"),
        (273, "set_robust_list"),
        (280, "utimensat"),
        (285, "fallocate"),
        (292, "dup3"),
        (293, "pipe2"),
        (302, "prlimit64"),
        (316, "renameat2"),
        (318, "getrandom"),
        (322, "execveat"),
        (332, "statx"),
        (334, "rseq"),
        (435, "clone3"),
        (439, "faccessat2"),
    ];
    NAMES
        .binary_search_by_key(&n, |&(k, _)| k)
        .ok()
        .map(|i| NAMES[i].1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscall_name_knows_common_calls_and_not_others() {
        assert_eq!(syscall_name(0), Some("read"));
        assert_eq!(syscall_name(231), Some("exit_group"));
        assert_eq!(syscall_name(439), Some("faccessat2"));
        assert_eq!(syscall_name(9999), None);
    }
}
