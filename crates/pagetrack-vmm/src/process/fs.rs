//! Containment of the program's file access, and its open files.
//!
//! The program sees the host's file system through one rule: it may read files under the
//! `--dir` directory (default: the current one) and the files named on its command line, and
//! may create or write files only under an `--allow-write` directory.
//!
//! The rule is enforced by the host kernel, not by checking paths: each allowed directory is
//! opened once (a *root*), and every path the program passes is resolved with
//! `openat2(root, rest, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`, so no symlink, `..` or
//! rename made at any moment can take the lookup outside the root (the kernel fails it with
//! `EXDEV`, which the program sees as `EACCES`, whether or not the outside target exists).
//! The call is then made on the resulting descriptor: `fstat` on it, `getdents64` from it,
//! and `unlinkat`/`renameat`/`mkdirat`/`linkat`/`symlinkat` on a confined descriptor of the
//! parent directory with a single final name. A path the program gives is first folded
//! lexically (relative paths against the host's current directory, or the `*at` directory,
//! `..` folded) only to choose the root it starts from. Relative paths under an open
//! directory descriptor without `..` are resolved beneath that descriptor itself.
//!
//! Roots whose subtree holds a procfs mount (`--dir /`, `--allow-write /proc`) are refused at
//! start, and any descriptor that lands on procfs is refused (`EACCES`), so the VMM's own
//! `/proc/self/mem` is never reachable. Hard links made on the host inside a root to files
//! outside it do reach those files: a hard link is the file itself, and no path check can
//! tell (keep such links out of the directories you allow).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, ResolveFlags};

use super::abi::{
    EACCES, EBADF, EEXIST, EINVAL, EISDIR, ENOENT, ENOTDIR, EPERM, ESPIPE, Errno, O_ACCMODE,
    O_CREAT, O_RDWR, O_TRUNC, O_WRONLY, SysResult,
};
use crate::error::{Error, Result};

/// What the program's standard input reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Input {
    /// pagetrack's own standard input.
    #[default]
    Inherit,
    /// Nothing (end of file at once).
    Null,
    /// These bytes, then end of file.
    Bytes(Vec<u8>),
    /// This file, opened as `< FILE` would (seekable); the VMM opens it, so containment
    /// does not apply to it.
    File(PathBuf),
}

/// Where the program's standard output or error goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Output {
    /// pagetrack's own standard output or error, unchanged.
    #[default]
    Inherit,
    /// Kept in memory and returned in the outcome.
    Capture,
    /// Discarded.
    Null,
}

/// What the kind of access a path is resolved for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reading or stat: under `--dir`, a write directory, or a named file.
    Read,
    /// Writing, creating, removing: under a write directory.
    Write,
}

/// `EBUSY`: renaming `.` or `/`.
const EBUSY: Errno = Errno(16);

/// `PROC_SUPER_MAGIC` (`statfs(2)`).
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

/// Every lookup: beneath the starting directory, never through `/proc`-style magic links.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);

/// How often a confined open is retried when the kernel answers `EAGAIN`.
const OPENAT2_RETRIES: u32 = 10_000;

/// `openat2`, retried while the kernel reports `EAGAIN`: with `RESOLVE_BENEATH` it does so
/// when a rename or mount anywhere on the host raced the resolution of a `..` component (it
/// cannot then prove the walk stayed beneath), so another process renaming files must not turn
/// into a spurious `EAGAIN` for the program. Each retry resolves afresh under the same
/// confinement; after [`OPENAT2_RETRIES`] the `EAGAIN` is the answer.
fn openat2(
    dirfd: impl AsFd,
    path: &Path,
    oflags: OFlags,
    mode: Mode,
    resolve: ResolveFlags,
) -> rustix::io::Result<OwnedFd> {
    let mut tries = 0;
    loop {
        match rfs::openat2(&dirfd, path, oflags, mode, resolve) {
            Err(rustix::io::Errno::AGAIN) if tries < OPENAT2_RETRIES => {
                tries += 1;
                std::thread::yield_now();
            }
            r => return r,
        }
    }
}

/// The devices the VMM serves by their usual paths, whatever `--dir` says: the host's own
/// (checked to be the character devices they should be), never a file at that path.
const DEVICES: [(&str, (u32, u32)); 4] = [
    ("/dev/null", (1, 3)),
    ("/dev/zero", (1, 5)),
    ("/dev/random", (1, 8)),
    ("/dev/urandom", (1, 9)),
];

/// The setuid and setgid bits: never set on a host file by the program.
const SET_ID_BITS: u32 = 0o6000;

/// An allowed directory, open.
#[derive(Debug)]
struct Root {
    path: PathBuf,
    fd: OwnedFd,
    write: bool,
}

/// A file named on the command line: readable by its own path (lexical or resolved) only.
#[derive(Debug)]
struct Named {
    paths: [PathBuf; 2],
    parent: OwnedFd,
    name: OsString,
}

/// The directory a `*at` call's relative path starts from: one the program opened.
#[derive(Debug)]
pub struct Base {
    /// Its path when it was opened (used only to choose a root for paths with `..`).
    pub path: PathBuf,
    /// The open directory.
    pub fd: OwnedFd,
    /// It lies under a write directory.
    pub write: bool,
}

/// The containment rule.
#[derive(Debug)]
pub struct Sandbox {
    /// Longest path first, so a write directory inside `--dir` is chosen for paths under it.
    roots: Vec<Root>,
    /// The directories on the way to each root (its strict ancestors), with the device and
    /// inode each had at the start.
    ancestors: std::collections::HashMap<PathBuf, (u64, u64)>,
    named: Vec<Named>,
    cwd: PathBuf,
    exe: PathBuf,
    euid: u32,
    egid: u32,
}

/// The errno of a host call.
pub(crate) fn sys(e: rustix::io::Errno) -> Errno {
    if e == rustix::io::Errno::XDEV {
        // The lookup would have left its root.
        EACCES
    } else {
        Errno(i64::from(e.raw_os_error()))
    }
}

/// Folds `.` and `..` without touching the file system (`..` at the root stays there).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    out
}

/// Undoes `/proc/self/mountinfo`'s octal escapes (`\040` for a space).
fn unescape_mount(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(Ok(v)) = b
                .get(i + 1..i + 4)
                .and_then(|o| std::str::from_utf8(o).ok())
                .map(|o| u8::from_str_radix(o, 8))
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(OsString::from(OsStr::from_bytes(&out)))
}

/// The mount points of procfs file systems, from `/proc/self/mountinfo` (none if it cannot
/// be read: then no procfs is mounted where the VMM can see it).
fn proc_mounts() -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            let mount = left.split(' ').nth(4)?;
            (fstype == "proc").then(|| unescape_mount(mount))
        })
        .collect()
}

fn open_root(p: &Path, option: &'static str, write: bool, procs: &[PathBuf]) -> Result<Root> {
    let dir_err = |source: std::io::Error| Error::SandboxDir {
        option,
        path: p.to_owned(),
        source,
    };
    let path = p.canonicalize().map_err(dir_err)?;
    let fd = rfs::open(
        &path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| dir_err(e.into()))?;
    let on_proc = rfs::fstatfs(&fd).is_ok_and(|s| s.f_type == PROC_SUPER_MAGIC);
    let under = procs.iter().find(|m| m.starts_with(&path));
    if on_proc || under.is_some() {
        return Err(Error::ProcUnderRoot {
            option,
            path: p.to_owned(),
            mount: under.cloned().unwrap_or_else(|| path.clone()),
        });
    }
    Ok(Root { path, fd, write })
}

/// The kernel's interface file systems (`statfs` magic numbers), never served: procfs,
/// sysfs, debugfs, tracefs, securityfs, cgroup and cgroup2, configfs, bpf, efivarfs.
const KERNEL_FS_MAGIC: [i64; 10] = [
    PROC_SUPER_MAGIC,
    0x6265_6572,
    0x6462_6720,
    0x7472_6163,
    0x7363_6673,
    0x0027_e0eb,
    0x6367_7270,
    0x6265_6570,
    0xcafe_4a11,
    0xde5e_81e4,
];

/// Refuses a descriptor on procfs or another kernel interface file system (a mount made
/// inside a root after the start included).
fn not_proc(fd: OwnedFd) -> SysResult<OwnedFd> {
    match rfs::fstatfs(&fd) {
        Ok(s) if KERNEL_FS_MAGIC.contains(&s.f_type) => Err(EACCES),
        Ok(_) => Ok(fd),
        Err(e) => Err(sys(e)),
    }
}

/// The `open` flags Linux knows (`O_ACCMODE` to `O_TMPFILE`); `openat` ignores the others,
/// while `openat2` would refuse them with `EINVAL`.
const KNOWN_OPEN_FLAGS: u32 = 0o3
    | 0o100
    | 0o200
    | 0o400
    | 0o1000
    | 0o2000
    | 0o4000
    | 0o10000
    | 0o20000
    | 0o40000
    | 0o100000
    | 0o200000
    | 0o400000
    | 0o1000000
    | 0o2000000
    | 0o4000000
    | 0o10000000
    | 0o20000000;

/// The guest's `O_*` flags as the host's (the same ABI), unknown bits dropped as `openat`
/// does, with `O_CLOEXEC` for the VMM.
pub(crate) fn host_flags(flags: u64) -> OFlags {
    let known = u32::try_from(flags & 0xffff_ffff).unwrap_or(0) & KNOWN_OPEN_FLAGS;
    OFlags::from_bits_retain(known) | OFlags::CLOEXEC
}

/// Whether `want` (`R_OK` 4, `W_OK` 2, `X_OK` 1) is allowed on a file of `m` to `uid`/`gid`,
/// as the kernel decides it (supplementary groups aside).
fn permits(m: &std::fs::Metadata, uid: u32, gid: u32, want: u32) -> bool {
    let mode = m.mode();
    if uid == 0 {
        // Root may search any directory, and execute a file with one execute bit.
        return want & 1 == 0 || m.is_dir() || mode & 0o111 != 0;
    }
    let bits = if m.uid() == uid {
        mode >> 6
    } else if m.gid() == gid {
        mode >> 3
    } else {
        mode
    } & 7;
    bits & want == want
}

/// `chmod` of the object `fd` refers to, even an `O_PATH` descriptor: through the VMM's own
/// `/proc/self/fd/N` magic link, which names exactly that inode (the program cannot reach
/// the VMM's procfs; `fchmodat2` with `AT_EMPTY_PATH` is not in rustix yet).
fn chmod_fd(fd: std::os::fd::BorrowedFd<'_>, mode: u32) -> SysResult<()> {
    use std::os::fd::AsRawFd;
    let mode = Mode::from_bits_truncate(mode & 0o7777 & !SET_ID_BITS);
    rfs::chmod(format!("/proc/self/fd/{}", fd.as_raw_fd()), mode).map_err(sys)
}

/// `chown` allowed only as a no-op (the owner and group it has, or -1): the program never
/// gives a host file away.
fn chown_fd(fd: std::os::fd::BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> SysResult<()> {
    let st = rfs::fstat(fd).map_err(sys)?;
    if uid.is_some_and(|u| u != st.st_uid) || gid.is_some_and(|g| g != st.st_gid) {
        return Err(EPERM);
    }
    Ok(())
}

impl Sandbox {
    /// A sandbox reading under `dir` and the existing `files`, writing under `write_dirs`;
    /// relative paths start at `cwd`. `exe` is what `/proc/self/exe` names.
    ///
    /// # Errors
    /// [`Error::SandboxDir`] for a directory that does not exist or cannot be opened,
    /// [`Error::ProcUnderRoot`] for one whose subtree holds a procfs mount.
    pub fn new(
        dir: &Path,
        write_dirs: &[PathBuf],
        files: &[PathBuf],
        cwd: &Path,
        exe: &Path,
    ) -> Result<Sandbox> {
        let procs = proc_mounts();
        let mut roots = vec![open_root(dir, "--dir", false, &procs)?];
        for d in write_dirs {
            roots.push(open_root(d, "--allow-write", true, &procs)?);
        }
        // A directory given as both --dir and --allow-write is the write root's.
        roots.sort_by_key(|r| (std::cmp::Reverse(r.path.as_os_str().len()), !r.write));
        let ancestors = roots
            .iter()
            .flat_map(|r| r.path.ancestors().skip(1))
            .filter_map(|a| {
                let m = std::fs::symlink_metadata(a).ok()?;
                Some((a.to_owned(), (m.dev(), m.ino())))
            })
            .collect();
        let cwd = cwd.canonicalize().map_err(|source| Error::SandboxDir {
            option: "current directory",
            path: cwd.to_owned(),
            source,
        })?;
        // Each named file by its lexical and its resolved path (they differ through symlinks).
        let mut named = Vec::new();
        for f in files {
            let joined = cwd.join(f);
            let Ok(c) = joined.canonicalize() else {
                continue;
            };
            let (Some(parent), Some(name)) = (c.parent(), c.file_name()) else {
                continue;
            };
            let Ok(parent) = rfs::open(
                parent,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            ) else {
                continue;
            };
            if c.is_file()
                && not_proc(parent.try_clone().map_err(|source| Error::SandboxDir {
                    option: "a named file's directory",
                    path: c.clone(),
                    source,
                })?)
                .is_ok()
            {
                named.push(Named {
                    paths: [lexical(&joined), c.clone()],
                    parent,
                    name: name.to_owned(),
                });
            }
        }
        Ok(Sandbox {
            roots,
            ancestors,
            named,
            cwd,
            exe: exe.to_owned(),
            euid: rustix::process::geteuid().as_raw(),
            egid: rustix::process::getegid().as_raw(),
        })
    }

    /// The directory relative paths start from.
    pub fn cwd(&self) -> &Path {
        &self.cwd
    }

    /// What `/proc/self/exe` names.
    pub fn exe(&self) -> &Path {
        &self.exe
    }

    /// Opens the program's `path` (relative to `base`, else the current directory) with host
    /// flags `oflags`, confined for `access`. Returns the descriptor, whether it lies under a
    /// write directory, and the path it was reached by (`..` folded).
    ///
    /// # Errors
    /// `EACCES` if the path leaves the allowed directories (at any moment of the lookup) or
    /// lands on procfs; `ENOENT` and others from the host.
    pub fn open_fd(
        &self,
        base: Option<&Base>,
        path: &[u8],
        access: Access,
        oflags: OFlags,
        mode: u32,
    ) -> SysResult<(OwnedFd, bool, PathBuf)> {
        if path.is_empty() {
            return Err(ENOENT);
        }
        let raw = Path::new(OsStr::from_bytes(path));
        let mut oflags = oflags | OFlags::CLOEXEC;
        if Self::names_dir(path) {
            // Only a directory, as natively (the lexical folding drops the trailing name).
            if oflags.contains(OFlags::CREATE) {
                return Err(EISDIR);
            }
            oflags |= OFlags::DIRECTORY;
        }
        let mode = Mode::from_bits_truncate(mode);
        let joined = if raw.is_absolute() {
            raw.to_path_buf()
        } else {
            base.map_or(&self.cwd, |b| &b.path).join(raw)
        };
        let lex = lexical(&joined);
        // Beneath the program's own directory descriptor, when the path stays below it.
        if let Some(b) = base
            && raw.is_relative()
            && !raw.components().any(|c| c == Component::ParentDir)
            && (access == Access::Read || b.write)
        {
            match openat2(&b.fd, raw, oflags, mode, RESOLVE) {
                // A symlink leading above it: try from the roots, which may allow it.
                Err(rustix::io::Errno::XDEV) => {}
                r => return Ok((not_proc(r.map_err(sys)?)?, b.write, lex)),
            }
        }
        for root in self
            .roots
            .iter()
            .filter(|r| access == Access::Read || r.write)
        {
            let Ok(rel) = lex.strip_prefix(&root.path) else {
                continue;
            };
            let rel = if rel.as_os_str().is_empty() {
                Path::new(".")
            } else {
                rel
            };
            match openat2(&root.fd, rel, oflags, mode, RESOLVE) {
                Err(rustix::io::Errno::XDEV) => {}
                r => return Ok((not_proc(r.map_err(sys)?)?, root.write, lex)),
            }
        }
        if access == Access::Read
            && let Some(n) = self.named.iter().find(|n| n.paths.contains(&lex))
        {
            let fd = openat2(
                &n.parent,
                Path::new(&n.name),
                oflags,
                mode,
                RESOLVE | ResolveFlags::NO_SYMLINKS,
            )
            .map_err(sys)?;
            return Ok((not_proc(fd)?, false, lex));
        }
        Err(EACCES)
    }

    /// The confined parent directory of `path` and its last name, for calls that act on a
    /// name in a directory (unlink, rename, mkdir, link, symlink). `last` is the errno for a
    /// path whose last component is `.` (or `/`), and for `..`. The name keeps its trailing
    /// slashes, so the kernel decides what they mean for the call (`unlink("f/")` is
    /// `ENOTDIR`), as natively: the path is split as bytes, never by `Path::components`,
    /// which drops a trailing `/.` and `/`.
    ///
    /// # Errors
    /// As [`Sandbox::open_fd`] for the parent; `last` as above.
    pub fn parent(
        &self,
        base: Option<&Base>,
        path: &[u8],
        access: Access,
        last: (Errno, Errno),
    ) -> SysResult<(OwnedFd, OsString)> {
        if path.is_empty() {
            return Err(ENOENT);
        }
        let end = path.iter().rposition(|&c| c != b'/').map_or(0, |i| i + 1);
        let start = path[..end]
            .iter()
            .rposition(|&c| c == b'/')
            .map_or(0, |i| i + 1);
        match &path[start..end] {
            b"" | b"." => return Err(last.0),
            b".." => return Err(last.1),
            _ => {}
        }
        let parent: &[u8] = if start == 0 { b"." } else { &path[..start] };
        let (fd, ..) = self.open_fd(base, parent, access, OFlags::PATH | OFlags::DIRECTORY, 0)?;
        Ok((fd, OsStr::from_bytes(&path[start..]).to_owned()))
    }

    /// `path` names a directory by its form: a trailing `/`, `/.` or `/..` (which the
    /// lexical folding would drop).
    fn names_dir(path: &[u8]) -> bool {
        path.ends_with(b"/") || path.ends_with(b"/.") || path.ends_with(b"/..")
    }

    /// The metadata of the directory `path` names if it is on the way to an allowed one
    /// (`..` of it, `mkdir -p`'s walk) and lies in no root: only while it is still the
    /// directory recorded at the start, looked up without following any symlink. Never by
    /// path alone: a program that renames an ancestor of a nested root away and puts a
    /// symlink in its place gets nothing.
    fn ancestor(&self, base: Option<&Base>, path: &[u8]) -> Option<std::fs::Metadata> {
        let raw = Path::new(OsStr::from_bytes(path));
        let joined = if raw.is_absolute() {
            raw.to_path_buf()
        } else {
            base.map_or(&self.cwd, |b| &b.path).join(raw)
        };
        let lex = lexical(&joined);
        let &(dev, ino) = self.ancestors.get(&lex)?;
        // One inside a root is the root's to answer for (the program may have changed it).
        if self.roots.iter().any(|r| lex.starts_with(&r.path)) {
            return None;
        }
        let fd = openat2(
            rfs::CWD,
            &lex,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .ok()?;
        let m = File::from(fd).metadata().ok()?;
        (m.dev() == dev && m.ino() == ino).then_some(m)
    }

    /// The device the VMM serves at `path` (as the program names it), if any.
    fn device(&self, base: Option<&Base>, path: &[u8]) -> Option<&'static str> {
        let raw = Path::new(OsStr::from_bytes(path));
        let joined = if raw.is_absolute() {
            raw.to_path_buf()
        } else {
            base.map_or(&self.cwd, |b| &b.path).join(raw)
        };
        let lex = lexical(&joined);
        let &(p, (major, minor)) = DEVICES.iter().find(|(p, _)| lex == Path::new(p))?;
        let m = std::fs::symlink_metadata(p).ok()?;
        let ok = std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type())
            && rfs::major(m.rdev()) == major
            && rfs::minor(m.rdev()) == minor;
        ok.then_some(p)
    }

    /// `chmod` of `path` (followed) under a write directory; setuid and setgid are dropped.
    ///
    /// # Errors
    /// As [`Sandbox::open_fd`] for writing.
    pub fn chmod(&self, base: Option<&Base>, path: &[u8], mode: u32) -> SysResult<()> {
        let (fd, ..) = self.open_fd(base, path, Access::Write, OFlags::PATH, 0)?;
        chmod_fd(fd.as_fd(), mode)
    }

    /// `chown` of `path`: allowed only when it changes nothing.
    ///
    /// # Errors
    /// `EPERM` for a change; as [`Sandbox::open_fd`] for writing.
    pub fn chown(
        &self,
        base: Option<&Base>,
        path: &[u8],
        ids: (Option<u32>, Option<u32>),
        follow: bool,
    ) -> SysResult<()> {
        let mut fl = OFlags::PATH;
        if !follow {
            fl |= OFlags::NOFOLLOW;
        }
        let (fd, ..) = self.open_fd(base, path, Access::Write, fl, 0)?;
        chown_fd(fd.as_fd(), ids.0, ids.1)
    }

    /// `utimensat` of `path` under a write directory.
    ///
    /// # Errors
    /// As [`Sandbox::open_fd`] for writing; host errors.
    pub fn utimens(
        &self,
        base: Option<&Base>,
        path: &[u8],
        times: &rfs::Timestamps,
        follow: bool,
    ) -> SysResult<()> {
        let mut fl = OFlags::PATH;
        if !follow {
            fl |= OFlags::NOFOLLOW;
        }
        let (fd, ..) = self.open_fd(base, path, Access::Write, fl, 0)?;
        rfs::utimensat(&fd, "", times, AtFlags::EMPTY_PATH).map_err(sys)
    }

    /// `stat` (`follow`) or `lstat` of `path`, on the descriptor the confined lookup gives.
    ///
    /// # Errors
    /// As [`Sandbox::open_fd`].
    pub fn stat(
        &self,
        base: Option<&Base>,
        path: &[u8],
        follow: bool,
    ) -> SysResult<std::fs::Metadata> {
        if let Some(dev) = self.device(base, path) {
            return std::fs::metadata(dev).map_err(|e| Errno::from_io(&e));
        }
        let mut fl = OFlags::PATH;
        if !follow {
            fl |= OFlags::NOFOLLOW;
        }
        match self.open_fd(base, path, Access::Read, fl, 0) {
            Ok((fd, ..)) => File::from(fd).metadata().map_err(|e| Errno::from_io(&e)),
            // The directories on the way to an allowed one, as recorded at the start.
            Err(EACCES) => self.ancestor(base, path).ok_or(EACCES),
            Err(e) => Err(e),
        }
    }

    /// `access(path, mode)`: `W_OK` needs a write directory.
    ///
    /// # Errors
    /// As [`Sandbox::open_fd`]; `EACCES` if the file's mode does not allow `mode`.
    pub fn access(&self, base: Option<&Base>, path: &[u8], mode: u32) -> SysResult<()> {
        let access = if mode & 2 != 0 {
            Access::Write
        } else {
            Access::Read
        };
        let m = if let Some(dev) = self.device(base, path) {
            std::fs::metadata(dev).map_err(|e| Errno::from_io(&e))?
        } else {
            let (fd, ..) = self.open_fd(base, path, access, OFlags::PATH, 0)?;
            File::from(fd).metadata().map_err(|e| Errno::from_io(&e))?
        };
        if permits(&m, self.euid, self.egid, mode & 7) {
            Ok(())
        } else {
            Err(EACCES)
        }
    }

    /// The target of the symlink `path`.
    ///
    /// # Errors
    /// `EINVAL` if it is not a symlink; as [`Sandbox::open_fd`].
    pub fn readlink(&self, base: Option<&Base>, path: &[u8]) -> SysResult<Vec<u8>> {
        let (fd, ..) =
            self.open_fd(base, path, Access::Read, OFlags::PATH | OFlags::NOFOLLOW, 0)?;
        let st = rfs::fstat(&fd).map_err(sys)?;
        if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::Symlink {
            return Err(EINVAL);
        }
        rfs::readlinkat(&fd, "", Vec::new())
            .map(std::ffi::CString::into_bytes)
            .map_err(sys)
    }

    /// `unlinkat(path, flags)` (`AT_REMOVEDIR` 0x200 removes a directory).
    ///
    /// # Errors
    /// `EACCES` outside a write directory; host errors.
    pub fn unlink(&self, base: Option<&Base>, path: &[u8], flags: u64) -> SysResult<()> {
        const ENOTEMPTY: Errno = Errno(39);
        let rmdir = flags & 0x200 != 0;
        let last = if rmdir {
            (EINVAL, ENOTEMPTY)
        } else {
            (EISDIR, EISDIR)
        };
        let (dir, name) = self.parent(base, path, Access::Write, last)?;
        let fl = if rmdir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        rfs::unlinkat(&dir, &name, fl).map_err(sys)
    }

    /// `mkdirat(path, mode)`.
    ///
    /// # Errors
    /// `EACCES` outside a write directory; host errors.
    pub fn mkdir(&self, base: Option<&Base>, path: &[u8], mode: u32) -> SysResult<()> {
        let (dir, name) = match self.parent(base, path, Access::Write, (EEXIST, EEXIST)) {
            // An allowed directory or one on the way to it (`mkdir -p` walks through them):
            // it exists, and saying so tells nothing about the outside.
            Err(EACCES) if self.stat(base, path, false).is_ok() => {
                return Err(EEXIST);
            }
            r => r?,
        };
        rfs::mkdirat(&dir, &name, Mode::from_bits_truncate(mode & !SET_ID_BITS)).map_err(sys)
    }

    /// `renameat2(old, new, flags)`, both under write directories.
    ///
    /// # Errors
    /// `EACCES` outside a write directory; host errors.
    pub fn rename(
        &self,
        (ob, old): (Option<&Base>, &[u8]),
        (nb, new): (Option<&Base>, &[u8]),
        flags: u64,
    ) -> SysResult<()> {
        const RENAME_WHITEOUT: u64 = 4;
        if flags & RENAME_WHITEOUT != 0 {
            // It would make a character device node (0, 0) in the directory: refused as
            // for a process without CAP_MKNOD.
            return Err(EPERM);
        }
        let (od, on) = self.parent(ob, old, Access::Write, (EBUSY, EBUSY))?;
        let (nd, nn) = self.parent(nb, new, Access::Write, (EBUSY, EBUSY))?;
        let fl =
            rfs::RenameFlags::from_bits(u32::try_from(flags).map_err(|_| EINVAL)?).ok_or(EINVAL)?;
        rfs::renameat_with(&od, &on, &nd, &nn, fl).map_err(sys)
    }

    /// `symlinkat(target, path)`: the link's text is the program's, and whatever it says,
    /// every later lookup through it stays confined.
    ///
    /// # Errors
    /// `EACCES` outside a write directory; host errors.
    pub fn symlink(&self, target: &[u8], base: Option<&Base>, path: &[u8]) -> SysResult<()> {
        let (dir, name) = self.parent(base, path, Access::Write, (EEXIST, EEXIST))?;
        rfs::symlinkat(OsStr::from_bytes(target), &dir, &name).map_err(sys)
    }

    /// `linkat(old, new)`: a new name for a file under a write directory (the old name's
    /// last component itself, not what a symlink there points to).
    ///
    /// # Errors
    /// `EACCES` outside a write directory; host errors.
    pub fn link(
        &self,
        (ob, old): (Option<&Base>, &[u8]),
        (nb, new): (Option<&Base>, &[u8]),
    ) -> SysResult<()> {
        if Self::names_dir(old) {
            // A trailing slash makes the kernel follow a symlink there: decide it confined
            // (a directory is never linked).
            self.open_fd(ob, old, Access::Read, OFlags::PATH | OFlags::DIRECTORY, 0)?;
            return Err(EPERM);
        }
        let (od, on) = self.parent(ob, old, Access::Write, (EPERM, EPERM))?;
        let (nd, nn) = self.parent(nb, new, Access::Write, (EEXIST, EEXIST))?;
        rfs::linkat(&od, &on, &nd, &nn, AtFlags::empty()).map_err(sys)
    }

    /// Opens an existing `path` without ever opening a device node (its driver's open would
    /// run): the confined lookup is made with `O_PATH`, its type checked, then the same inode
    /// reopened through the VMM's own `/proc/self/fd/N` with the `real` flags. With
    /// `O_CREAT` a missing file is then created with `O_EXCL` (retried if one appears).
    fn open_existing(
        &self,
        base: Option<&Base>,
        path: &[u8],
        access: Access,
        (flags, real): (u64, OFlags),
        mode: u32,
    ) -> SysResult<(File, bool, PathBuf)> {
        use std::os::fd::AsRawFd;
        const ELOOP: Errno = Errno(40);
        let lookup = OFlags::PATH | (real & (OFlags::DIRECTORY | OFlags::NOFOLLOW));
        for _ in 0..4 {
            let (fd, write, lex) = match self.open_fd(base, path, access, lookup, 0) {
                Err(ENOENT) if flags & O_CREAT != 0 => {
                    match self.open_fd(base, path, access, real | OFlags::EXCL, mode) {
                        // A dangling symlink: create its target, as open(2) does (confined;
                        // refused below if a device node was renamed there meanwhile).
                        Err(EEXIST) if self.is_symlink(base, path) => {
                            let (fd, w, p) = self.open_fd(base, path, access, real, mode)?;
                            if rfs::fstat(&fd).is_ok_and(|st| {
                                matches!(
                                    rfs::FileType::from_raw_mode(st.st_mode),
                                    rfs::FileType::CharacterDevice | rfs::FileType::BlockDevice
                                )
                            }) {
                                return Err(EACCES);
                            }
                            return Ok((File::from(fd), w, p));
                        }
                        // Made between the two lookups: look again.
                        Err(EEXIST) => continue,
                        r => {
                            let (fd, w, p) = r?;
                            return Ok((File::from(fd), w, p));
                        }
                    }
                }
                r => r?,
            };
            let st = rfs::fstat(&fd).map_err(sys)?;
            match rfs::FileType::from_raw_mode(st.st_mode) {
                // Device nodes under an allowed directory (`--dir /dev`) are the host's
                // hardware: only the VMM's own devices are served.
                rfs::FileType::CharacterDevice | rfs::FileType::BlockDevice => return Err(EACCES),
                // O_NOFOLLOW on a symlink.
                rfs::FileType::Symlink => return Err(ELOOP),
                _ => {}
            }
            let reopen = real - OFlags::CREATE - OFlags::EXCL - OFlags::NOFOLLOW;
            let f = rfs::open(
                format!("/proc/self/fd/{}", fd.as_raw_fd()),
                reopen,
                Mode::empty(),
            )
            .map_err(sys)?;
            return Ok((File::from(f), write, lex));
        }
        // A file made and removed again and again under the program's own feet.
        Err(EEXIST)
    }

    /// The last component of `path` is a symlink (confined lookup).
    fn is_symlink(&self, base: Option<&Base>, path: &[u8]) -> bool {
        self.open_fd(base, path, Access::Read, OFlags::PATH | OFlags::NOFOLLOW, 0)
            .ok()
            .and_then(|(fd, ..)| rfs::fstat(&fd).ok())
            .is_some_and(|st| rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Symlink)
    }

    /// Opens `path` with the program's `flags` (`O_*`) and `mode`, under containment.
    ///
    /// # Errors
    /// `EACCES` outside the allowed directories (writes outside a write directory included);
    /// host errors otherwise.
    pub fn open(
        &self,
        base: Option<&Base>,
        path: &[u8],
        flags: u64,
        mode: u32,
    ) -> SysResult<OpenFile> {
        const O_TMPFILE: u64 = 0o20_200_000;
        let acc = flags & O_ACCMODE;
        if let Some(dev) = self.device(base, path) {
            // The VMM's own device: reads and writes as the host's (`> /dev/null` works).
            let file = std::fs::OpenOptions::new()
                .read(acc != O_WRONLY)
                .write(acc == O_WRONLY || acc == O_RDWR)
                .custom_flags(libc::O_NOCTTY)
                .open(dev)
                .map_err(|e| Errno::from_io(&e))?;
            return Ok(OpenFile {
                path: PathBuf::from(dev),
                flags,
                ..OpenFile::stream(Node::File(file), 0)
            });
        }
        const O_PATH: u64 = 0o10_000_000;
        const O_EXCL: u64 = 0o200;
        if flags & O_PATH != 0 {
            // As open(2): every flag but these is ignored with O_PATH (openat2 would refuse
            // them), and no file is opened, so no device's driver runs.
            let keep = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW;
            let (fd, write, path) =
                self.open_fd(base, path, Access::Read, host_flags(flags) & keep, 0)?;
            let is_dir =
                rfs::fstat(&fd).is_ok_and(|st| rfs::FileType::from_raw_mode(st.st_mode).is_dir());
            return Ok(OpenFile {
                path,
                flags: flags & (O_PATH | 0o200_000 | 0o400_000 | 0o2_000_000),
                is_dir,
                write_root: write,
                ..OpenFile::stream(Node::File(File::from(fd)), 0)
            });
        }
        let writes = acc == O_WRONLY
            || acc == O_RDWR
            || flags & (O_CREAT | O_TRUNC) != 0
            || flags & O_TMPFILE == O_TMPFILE;
        let access = if writes { Access::Write } else { Access::Read };
        // The mode counts only when creating (`openat2` refuses one otherwise).
        let mode = if flags & O_CREAT != 0 || flags & O_TMPFILE == O_TMPFILE {
            mode & 0o7777 & !SET_ID_BITS
        } else {
            0
        };
        // Never block the VMM on a FIFO without a writer: open non-blocking, then give the
        // descriptor the program's own blocking mode (a FIFO stays non-blocking). Never
        // make a terminal the controlling one.
        let real = host_flags(flags) | OFlags::NONBLOCK | OFlags::NOCTTY;
        let creates_new =
            flags & O_TMPFILE == O_TMPFILE || flags & (O_CREAT | O_EXCL) == O_CREAT | O_EXCL;
        let (file, write, path) = if creates_new {
            // A new file (or an unnamed one): never an existing node, so never a device.
            let (fd, w, p) = self.open_fd(base, path, access, real, mode)?;
            (File::from(fd), w, p)
        } else {
            self.open_existing(base, path, access, (flags, real), mode)?
        };
        let ft = file.metadata().map_err(|e| Errno::from_io(&e))?.file_type();
        if !std::os::unix::fs::FileTypeExt::is_fifo(&ft) && flags & 0o4000 == 0 {
            let fl = rfs::fcntl_getfl(&file).map_err(sys)?;
            rfs::fcntl_setfl(&file, fl - OFlags::NONBLOCK).map_err(sys)?;
        }
        Ok(OpenFile {
            node: Node::File(file),
            path,
            flags,
            is_dir: ft.is_dir(),
            write_root: write,
            fifo: std::os::unix::fs::FileTypeExt::is_fifo(&ft),
            dir: None,
            dir_pending: None,
            dir_off: 0,
        })
    }
}

/// What an open descriptor refers to.
#[derive(Debug)]
pub enum Node {
    /// The program's standard input.
    Stdin(StdinState),
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// A host file or directory.
    File(File),
}

/// The `fcntl` record-lock commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordLock {
    /// `F_GETLK`.
    Get,
    /// `F_SETLK`.
    Set,
    /// `F_SETLKW` (blocks in the host until the lock is free).
    SetWait,
    /// `F_OFD_GETLK`.
    OfdGet,
    /// `F_OFD_SETLK`.
    OfdSet,
    /// `F_OFD_SETLKW`.
    OfdSetWait,
}

/// Whether a descriptor is ready, for `poll` and `select`.
#[derive(Debug)]
pub enum Readiness {
    /// Ready now for these `POLL*` events.
    Now(i16),
    /// Ask the host: a duplicate of the host descriptor (a FIFO, a terminal, a device).
    Host(OwnedFd),
}

/// The state of standard input.
#[derive(Debug)]
pub enum StdinState {
    /// pagetrack's standard input.
    Host,
    /// Bytes not yet read.
    Bytes(std::collections::VecDeque<u8>),
}

/// An open file description.
#[derive(Debug)]
pub struct OpenFile {
    /// What it is.
    pub node: Node,
    /// The path it was opened by, `..` folded (empty for the standard streams); only to
    /// choose a root for `*at` paths with `..` under it.
    pub path: PathBuf,
    /// The `open` flags.
    pub flags: u64,
    /// A directory.
    pub is_dir: bool,
    /// It lies under a write directory.
    pub write_root: bool,
    /// A FIFO (its host descriptor is always non-blocking; a blocking read by the program
    /// waits in `poll`, never past the run's deadline).
    pub fifo: bool,
    /// A directory's entries, read from its descriptor.
    dir: Option<rfs::Dir>,
    /// An entry read but not handed out (the program's buffer was full).
    dir_pending: Option<DirEntry>,
    /// The `d_off` of the last entry handed out.
    dir_off: i64,
}

/// One directory entry for `getdents64`.
#[derive(Debug)]
struct DirEntry {
    name: Vec<u8>,
    ino: u64,
    off: i64,
    kind: u8,
}

/// `d_type` of `t`.
fn d_type(t: rfs::FileType) -> u8 {
    match t {
        rfs::FileType::Fifo => 1,
        rfs::FileType::CharacterDevice => 2,
        rfs::FileType::Directory => 4,
        rfs::FileType::BlockDevice => 6,
        rfs::FileType::RegularFile => 8,
        rfs::FileType::Symlink => 10,
        rfs::FileType::Socket => 12,
        _ => 0,
    }
}

impl OpenFile {
    /// A standard stream.
    pub fn stream(node: Node, flags: u64) -> OpenFile {
        OpenFile {
            node,
            path: PathBuf::new(),
            flags,
            is_dir: false,
            write_root: false,
            fifo: false,
            dir: None,
            dir_pending: None,
            dir_off: 0,
        }
    }

    /// A file the VMM opened itself (`Input::File` as standard input).
    pub fn host_file(file: File, path: PathBuf) -> OpenFile {
        OpenFile {
            path,
            ..OpenFile::stream(Node::File(file), 0)
        }
    }

    /// `getdents64`: as many entries as fit in `count` bytes, in the host's order, read
    /// from the open directory itself (never by its path).
    ///
    /// # Errors
    /// `ENOTDIR`, `EINVAL` if not even one entry fits, host errors.
    pub fn getdents(&mut self, count: u64) -> SysResult<Vec<u8>> {
        let Node::File(file) = &self.node else {
            return Err(ENOTDIR);
        };
        if !self.is_dir {
            return Err(ENOTDIR);
        }
        if self.dir.is_none() {
            self.dir = Some(rfs::Dir::read_from(file).map_err(sys)?);
        }
        let Some(dir) = self.dir.as_mut() else {
            return Err(EBADF);
        };
        let mut out = Vec::new();
        loop {
            let e = match self.dir_pending.take() {
                Some(e) => e,
                None => match dir.read() {
                    None => break,
                    Some(Err(e)) if out.is_empty() => return Err(sys(e)),
                    Some(Err(_)) => break,
                    Some(Ok(d)) => DirEntry {
                        name: d.file_name().to_bytes().to_vec(),
                        ino: d.ino(),
                        off: d.offset(),
                        kind: d_type(d.file_type()),
                    },
                },
            };
            let reclen = (19 + e.name.len() + 1).next_multiple_of(8);
            if (out.len() + reclen) as u64 > count {
                self.dir_pending = Some(e);
                break;
            }
            let start = out.len();
            out.extend_from_slice(&e.ino.to_le_bytes());
            out.extend_from_slice(&e.off.to_le_bytes());
            out.extend_from_slice(&u16::try_from(reclen).unwrap_or(u16::MAX).to_le_bytes());
            out.push(e.kind);
            out.extend_from_slice(&e.name);
            out.resize(start + reclen, 0);
            self.dir_off = e.off;
        }
        if out.is_empty() && self.dir_pending.is_some() {
            return Err(EINVAL);
        }
        Ok(out)
    }

    /// The host file for a metadata change through the descriptor (`fchmod`, `fchown`,
    /// `futimens`): only one opened under a write directory.
    fn meta_file(&self) -> SysResult<&File> {
        match &self.node {
            Node::File(f) if self.write_root => Ok(f),
            Node::File(_) => Err(EACCES),
            _ => Err(EPERM),
        }
    }

    /// `fchmod`; setuid and setgid are dropped.
    ///
    /// # Errors
    /// `EACCES` outside a write directory, `EPERM` for the streams, host errors.
    pub fn chmod(&self, mode: u32) -> SysResult<()> {
        chmod_fd(self.meta_file()?.as_fd(), mode)
    }

    /// `fchown`: only as a no-op.
    ///
    /// # Errors
    /// As [`OpenFile::chmod`]; `EPERM` for a change.
    pub fn chown(&self, uid: Option<u32>, gid: Option<u32>) -> SysResult<()> {
        chown_fd(self.meta_file()?.as_fd(), uid, gid)
    }

    /// `futimens`.
    ///
    /// # Errors
    /// As [`OpenFile::chmod`].
    pub fn utimens(&self, times: &rfs::Timestamps) -> SysResult<()> {
        rfs::utimensat(self.meta_file()?, "", times, AtFlags::EMPTY_PATH).map_err(sys)
    }

    /// How `poll` learns whether it is ready: at once, or from the host descriptor.
    ///
    /// # Errors
    /// Host errors (duplicating the descriptor, `fstat`).
    pub fn readiness(&self) -> SysResult<Readiness> {
        const IN: i16 = 0x1 | 0x40; // POLLIN | POLLRDNORM
        const OUT: i16 = 0x4 | 0x100; // POLLOUT | POLLWRNORM
        let dup = |fd: std::os::fd::BorrowedFd<'_>| {
            fd.try_clone_to_owned()
                .map(Readiness::Host)
                .map_err(|e| Errno::from_io(&e))
        };
        match &self.node {
            Node::Stdin(StdinState::Bytes(_)) => Ok(Readiness::Now(IN)),
            Node::Stdin(StdinState::Host) => dup(std::io::stdin().as_fd()),
            Node::Stdout | Node::Stderr => Ok(Readiness::Now(OUT)),
            Node::File(f) => {
                let ft = f.metadata().map_err(|e| Errno::from_io(&e))?.file_type();
                if ft.is_file() || ft.is_dir() || ft.is_symlink() {
                    // Regular files and directories are always ready, as on Linux.
                    Ok(Readiness::Now(IN | OUT))
                } else {
                    dup(f.as_fd())
                }
            }
        }
    }

    /// Reads up to `n` bytes at the current position.
    ///
    /// # Errors
    /// `EBADF` if not readable, `EISDIR`, host errors.
    pub fn read(&mut self, n: usize) -> SysResult<Vec<u8>> {
        if self.flags & O_ACCMODE == O_WRONLY {
            return Err(EBADF);
        }
        let mut buf = vec![0u8; n];
        let got = match &mut self.node {
            // Straight from the descriptor, never buffered ahead: what the program does not
            // read stays for whoever reads pagetrack's standard input next.
            Node::Stdin(StdinState::Host) => {
                rustix::io::read(std::io::stdin().as_fd(), &mut buf).map_err(std::io::Error::from)
            }
            Node::Stdin(StdinState::Bytes(q)) => {
                let k = n.min(q.len());
                for (d, s) in buf.iter_mut().zip(q.drain(..k)) {
                    *d = s;
                }
                Ok(k)
            }
            Node::File(_) if self.is_dir => return Err(EISDIR),
            // A FIFO returns what it holds, as Linux: reading on for the rest would wait
            // for more (in the host, holding the kernel's lock) that may never come.
            Node::File(f) if self.fifo => loop {
                match f.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    r => break r,
                }
            },
            Node::File(f) => read_full(f, &mut buf),
            Node::Stdout | Node::Stderr => return Err(EBADF),
        }
        .map_err(|e| Errno::from_io(&e))?;
        buf.truncate(got);
        Ok(buf)
    }

    /// Reads up to `n` bytes at `offset` without moving the position.
    ///
    /// # Errors
    /// `ESPIPE` for streams, as [`OpenFile::read`] otherwise.
    pub fn pread(&mut self, n: usize, offset: u64) -> SysResult<Vec<u8>> {
        if self.flags & O_ACCMODE == O_WRONLY {
            return Err(EBADF);
        }
        let Node::File(f) = &self.node else {
            return Err(ESPIPE);
        };
        if self.is_dir {
            return Err(EISDIR);
        }
        let mut buf = vec![0u8; n];
        let mut got = 0;
        while got < n {
            match f.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Errno::from_io(&e)),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    /// Writes `data` to a file opened for writing (to a FIFO: one non-blocking write, which
    /// may be short or `EAGAIN`).
    ///
    /// # Errors
    /// `EBADF` if not open for writing; host errors.
    pub fn write_file(&mut self, data: &[u8]) -> SysResult<usize> {
        let acc = self.flags & O_ACCMODE;
        match &mut self.node {
            Node::File(f) if self.fifo && (acc == O_WRONLY || acc == O_RDWR) => {
                f.write(data).map_err(|e| Errno::from_io(&e))
            }
            Node::File(f) if acc == O_WRONLY || acc == O_RDWR => {
                f.write_all(data).map_err(|e| Errno::from_io(&e))?;
                Ok(data.len())
            }
            _ => Err(EBADF),
        }
    }

    /// Writes `data` at `offset` without moving the position (at the end for `O_APPEND`, as
    /// Linux's `pwrite` does).
    ///
    /// # Errors
    /// `EBADF` if not open for writing, `ESPIPE` for streams; host errors.
    pub fn pwrite(&mut self, data: &[u8], offset: u64) -> SysResult<usize> {
        let acc = self.flags & O_ACCMODE;
        let Node::File(f) = &self.node else {
            return Err(if acc == O_WRONLY || acc == O_RDWR {
                ESPIPE
            } else {
                EBADF
            });
        };
        if acc != O_WRONLY && acc != O_RDWR {
            return Err(EBADF);
        }
        f.write_all_at(data, offset)
            .map_err(|e| Errno::from_io(&e))?;
        Ok(data.len())
    }

    /// `fsync` (`data_only`: `fdatasync`) of a host file; streams have nothing to flush.
    ///
    /// # Errors
    /// Host errors.
    pub fn sync(&self, data_only: bool) -> SysResult<()> {
        match &self.node {
            Node::File(f) if data_only => f.sync_data(),
            Node::File(f) => f.sync_all(),
            _ => Ok(()),
        }
        .map_err(|e| Errno::from_io(&e))
    }

    /// A POSIX record lock (`F_GETLK`, `F_SETLK`, `F_OFD_*`; never blocking) on the host
    /// file, held by pagetrack's process: the program is that process, so its own locks
    /// never conflict, and other processes on the host see them, as natively.
    ///
    /// # Errors
    /// `EBADF` for the standard streams (or as the host says), host errors (`EAGAIN`,
    /// `EACCES` for a conflict, `EINVAL`).
    pub fn record_lock(&self, cmd: RecordLock, fl: &mut libc::flock) -> SysResult<()> {
        use nix::fcntl::{FcntlArg, fcntl};
        let Node::File(f) = &self.node else {
            return Err(EBADF);
        };
        let arg = match cmd {
            RecordLock::Get => FcntlArg::F_GETLK(fl),
            RecordLock::Set => FcntlArg::F_SETLK(fl),
            RecordLock::SetWait => FcntlArg::F_SETLKW(fl),
            RecordLock::OfdGet => FcntlArg::F_OFD_GETLK(fl),
            RecordLock::OfdSet => FcntlArg::F_OFD_SETLK(fl),
            RecordLock::OfdSetWait => FcntlArg::F_OFD_SETLKW(fl),
        };
        fcntl(f, arg)
            .map(|_| ())
            .map_err(|e| Errno(i64::from(e as i32)))
    }

    /// `lseek`.
    ///
    /// # Errors
    /// `ESPIPE` for streams, `EINVAL` for a bad whence or a negative result.
    pub fn seek(&mut self, offset: i64, whence: u64) -> SysResult<u64> {
        let Node::File(f) = &mut self.node else {
            return Err(ESPIPE);
        };
        if self.is_dir {
            // rewinddir, seekdir to a d_off handed out, telldir.
            return match (whence, offset) {
                (1, 0) => Ok(self.dir_off.cast_unsigned()),
                (0, 0) => {
                    self.dir_pending = None;
                    self.dir_off = 0;
                    if let Some(d) = &mut self.dir {
                        d.rewind();
                    }
                    Ok(0)
                }
                (0, off) => {
                    self.dir_pending = None;
                    self.dir_off = off;
                    if let Some(d) = &mut self.dir {
                        d.seek(off).map_err(sys)?;
                    } else {
                        let mut d = rfs::Dir::read_from(&*f).map_err(sys)?;
                        d.seek(off).map_err(sys)?;
                        self.dir = Some(d);
                    }
                    Ok(off.cast_unsigned())
                }
                _ => Err(EINVAL),
            };
        }
        let to = match whence {
            0 => SeekFrom::Start(u64::try_from(offset).map_err(|_| EINVAL)?),
            1 => SeekFrom::Current(offset),
            2 => SeekFrom::End(offset),
            _ => return Err(EINVAL),
        };
        f.seek(to).map_err(|e| Errno::from_io(&e))
    }
}

/// Reads until `buf` is full or end of file: a regular file returns what it has.
fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pagetrack-fs-{name}-{}", std::process::id()));
        if d.exists() {
            std::fs::remove_dir_all(&d).unwrap();
        }
        std::fs::create_dir_all(d.join("root/sub")).unwrap();
        std::fs::write(d.join("root/a.txt"), b"a").unwrap();
        std::fs::write(d.join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(d.join("secret"), d.join("root/link")).unwrap();
        std::os::unix::fs::symlink(d.join("missing"), d.join("root/dangling")).unwrap();
        std::os::unix::fs::symlink("../../secret", d.join("root/sub/rel")).unwrap();
        std::os::unix::fs::symlink("../a.txt", d.join("root/sub/up")).unwrap();
        d
    }

    fn stat(sb: &Sandbox, p: &[u8]) -> SysResult<()> {
        sb.stat(None, p, true).map(|_| ())
    }

    #[test]
    fn lookups_inside_are_allowed_and_escapes_are_eacces() {
        let d = tmp("resolve");
        let root = d.join("root");
        let sb = Sandbox::new(&root, &[], &[], &root, Path::new("/bin/x")).unwrap();
        assert_eq!(stat(&sb, b"a.txt"), Ok(()));
        assert_eq!(stat(&sb, b"sub/../a.txt"), Ok(()));
        assert_eq!(stat(&sb, b"sub/up"), Ok(()), "a symlink that stays inside");
        for p in [
            &b"../secret"[..],
            b"sub/../../secret",
            b"/etc/passwd",
            b"link",
            b"sub/rel",
        ] {
            assert_eq!(stat(&sb, p), Err(EACCES), "{}", String::from_utf8_lossy(p));
        }
        // An outward symlink says nothing about whether its target exists.
        assert_eq!(stat(&sb, b"dangling"), Err(EACCES));
        assert!(
            sb.stat(None, b"dangling", false).is_ok(),
            "lstat sees the link"
        );
        assert_eq!(stat(&sb, b"missing"), Err(ENOENT));
        assert_eq!(
            sb.readlink(None, b"link").unwrap(),
            d.join("secret").as_os_str().as_bytes()
        );
        // Writing needs --allow-write.
        assert_eq!(
            sb.open(None, b"new.txt", O_WRONLY | O_CREAT, 0o644).err(),
            Some(EACCES)
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn open_for_write_only_under_allow_write() {
        let d = tmp("write");
        let root = d.join("root");
        let out = d.join("root/sub");
        let sb = Sandbox::new(
            &root,
            std::slice::from_ref(&out),
            &[],
            &root,
            Path::new("/bin/x"),
        )
        .unwrap();
        let f = sb.open(None, b"sub/new.txt", O_WRONLY | O_CREAT, 0o644);
        assert!(f.is_ok_and(|f| f.write_root));
        assert_eq!(sb.open(None, b"a.txt", O_WRONLY, 0).err(), Some(EACCES));
        assert!(sb.open(None, b"a.txt", 0, 0).is_ok_and(|f| !f.write_root));
        // A stray mode without O_CREAT and unknown flag bits are ignored, as openat does.
        assert!(sb.open(None, b"a.txt", 0x4000_0000, 0o7777).is_ok());
        // Creating through an outward symlink inside the write directory is refused.
        std::os::unix::fs::symlink(d.join("made"), out.join("out")).unwrap();
        assert_eq!(
            sb.open(None, b"sub/out", O_WRONLY | O_CREAT, 0o644).err(),
            Some(EACCES)
        );
        assert!(!d.join("made").exists());
        assert_eq!(sb.unlink(None, b"a.txt", 0), Err(EACCES));
        assert_eq!(sb.unlink(None, b"sub/out", 0), Ok(()));
        assert_eq!(
            sb.unlink(None, b"sub", 0x200),
            Err(EACCES),
            "the root itself"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn metadata_changes_stay_inside_and_drop_set_id_bits() {
        use std::os::unix::fs::PermissionsExt;
        let d = tmp("meta");
        let root = d.join("root");
        let sb = Sandbox::new(
            &root,
            std::slice::from_ref(&root),
            &[],
            &root,
            Path::new("/bin/x"),
        )
        .unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let before = mode(&d.join("secret"));
        // `link` points outside: chmod, chown, utimens through it are refused.
        assert_eq!(sb.chmod(None, b"link", 0o777), Err(EACCES));
        let now = rfs::Timespec {
            tv_sec: 0,
            tv_nsec: (1 << 30) - 1,
        };
        let times = rfs::Timestamps {
            last_access: now,
            last_modification: now,
        };
        assert_eq!(sb.utimens(None, b"link", &times, true), Err(EACCES));
        assert_eq!(mode(&d.join("secret")), before);
        // Inside: applied, without setuid/setgid.
        assert_eq!(sb.chmod(None, b"a.txt", 0o4755), Ok(()));
        assert_eq!(mode(&root.join("a.txt")), 0o755);
        assert_eq!(sb.utimens(None, b"a.txt", &times, true), Ok(()));
        // chown only as a no-op.
        let uid = std::fs::metadata(root.join("a.txt")).unwrap().uid();
        assert_eq!(sb.chown(None, b"a.txt", (Some(uid), None), true), Ok(()));
        assert_eq!(
            sb.chown(None, b"a.txt", (Some(uid + 1), None), true),
            Err(EPERM)
        );
        // The devices are the VMM's, whatever the directory holds.
        let null = sb.open(None, b"/dev/null", O_WRONLY | O_CREAT | O_TRUNC, 0o644);
        assert!(null.is_ok_and(|f| f.path == Path::new("/dev/null")));
        assert!(sb.stat(None, b"/dev/zero", true).is_ok());
        assert_eq!(stat(&sb, b"/dev/sda"), Err(EACCES));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn host_devices_and_kernel_file_systems_are_not_served() {
        // /dev as --dir: the VMM's /dev/null, never the host's other devices.
        let sb = Sandbox::new(
            Path::new("/dev"),
            &[],
            &[],
            Path::new("/dev"),
            Path::new("/x"),
        )
        .unwrap();
        assert!(sb.open(None, b"/dev/null", 0, 0).is_ok());
        assert_eq!(sb.open(None, b"/dev/full", O_RDWR, 0).err(), Some(EACCES));
        assert!(sb.open(None, b"/dev/tty", O_RDWR, 0).is_err());
        assert!(
            sb.stat(None, b"/dev/full", true).is_ok(),
            "stat is harmless"
        );
        if Path::new("/sys/kernel").is_dir() {
            let sb = Sandbox::new(
                Path::new("/sys"),
                &[],
                &[],
                Path::new("/sys"),
                Path::new("/x"),
            )
            .unwrap();
            assert_eq!(sb.open(None, b"/sys/kernel", 0, 0).err(), Some(EACCES));
        }
    }

    #[test]
    fn trailing_slash_and_dot_names_mean_a_directory_as_natively() {
        let d = tmp("trailing");
        let root = d.join("root");
        let sb = Sandbox::new(
            &root,
            std::slice::from_ref(&root),
            &[],
            &root,
            Path::new("/bin/x"),
        )
        .unwrap();
        const ENOTEMPTY: Errno = Errno(39);
        assert_eq!(sb.open(None, b"a.txt/", 0, 0).err(), Some(ENOTDIR));
        assert_eq!(sb.open(None, b"a.txt/.", 0, 0).err(), Some(ENOTDIR));
        assert_eq!(
            sb.open(None, b"new/", O_WRONLY | O_CREAT, 0o644).err(),
            Some(EISDIR)
        );
        assert!(sb.open(None, b"sub/", 0, 0).is_ok_and(|f| f.is_dir));
        assert_eq!(sb.unlink(None, b"a.txt/", 0), Err(ENOTDIR));
        assert_eq!(sb.unlink(None, b"sub/.", 0x200), Err(EINVAL));
        assert_eq!(sb.unlink(None, b"sub/..", 0x200), Err(ENOTEMPTY));
        assert_eq!(sb.unlink(None, b"sub/.", 0), Err(EISDIR));
        assert_eq!(sb.mkdir(None, b"sub/.", 0o755), Err(EEXIST));
        assert_eq!(sb.link((None, b"a.txt/"), (None, b"b.txt")), Err(ENOTDIR));
        assert_eq!(sb.link((None, b"sub/"), (None, b"b.txt")), Err(EPERM));
        // A trailing slash through an outward symlink is decided confined.
        assert_eq!(sb.link((None, b"link/"), (None, b"b.txt")), Err(EACCES));
        assert!(root.join("a.txt").is_file() && root.join("sub").is_dir());
        assert_eq!(sb.mkdir(None, b"made/", 0o755), Ok(()));
        assert!(root.join("made").is_dir());
        // RENAME_WHITEOUT would leave a device node behind.
        assert_eq!(sb.rename((None, b"a.txt"), (None, b"w.txt"), 4), Err(EPERM));
        assert!(root.join("a.txt").is_file() && !root.join("w.txt").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn named_files_are_readable_outside_dir() {
        let d = tmp("named");
        let root = d.join("root");
        let secret = d.join("secret");
        let sb = Sandbox::new(
            &root,
            &[],
            std::slice::from_ref(&secret),
            &root,
            Path::new("/bin/x"),
        )
        .unwrap();
        let p = secret.to_str().unwrap().as_bytes();
        assert!(sb.open(None, p, 0, 0).is_ok());
        assert_eq!(sb.open(None, p, O_WRONLY, 0).err(), Some(EACCES));
        // Only by its own path: a symlink to it in the directory is still an escape.
        assert_eq!(stat(&sb, b"link"), Err(EACCES));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn roots_exposing_procfs_are_refused() {
        let d = tmp("proc");
        let root = d.join("root");
        let refused = |r: Result<Sandbox>| match r {
            Err(Error::ProcUnderRoot { mount, .. }) => mount,
            other => panic!("expected ProcUnderRoot, got {other:?}"),
        };
        assert_eq!(
            refused(Sandbox::new(
                Path::new("/"),
                &[],
                &[],
                &root,
                Path::new("/x")
            )),
            Path::new("/proc")
        );
        refused(Sandbox::new(
            &root,
            &[PathBuf::from("/proc")],
            &[],
            &root,
            Path::new("/x"),
        ));
        refused(Sandbox::new(
            Path::new("/proc/self"),
            &[],
            &[],
            &root,
            Path::new("/x"),
        ));
        // A named file on procfs is not readable either.
        let sb = Sandbox::new(
            &root,
            &[],
            &[PathBuf::from("/proc/self/status")],
            &root,
            Path::new("/x"),
        )
        .unwrap();
        assert_eq!(
            sb.open(None, b"/proc/self/status", 0, 0).err(),
            Some(EACCES)
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mount("/a\\040b\\134c"), Path::new("/a b\\c"));
        assert_eq!(unescape_mount("/tail\\04"), Path::new("/tail\\04"));
    }
}
