//! Containment of the program's file access, and its open files.
//!
//! The program sees the host's file system through one rule: it may read files under the
//! `--dir` directory (default: the current one) and the files named on its command line, and
//! may create or write files only under an `--allow-write` directory. A path is resolved
//! lexically first (relative paths against the host's current directory, `..` folded), then
//! with symlinks followed; if either form leaves the allowed directories the call fails with
//! `EACCES`. After opening, the descriptor's own path (`/proc/self/fd/N`) is checked again,
//! so a symlink swapped in between does not escape either.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Component, Path, PathBuf};

use super::abi::{
    EACCES, EBADF, EISDIR, ENOENT, ENOTDIR, ESPIPE, Errno, O_ACCMODE, O_APPEND, O_CREAT,
    O_DIRECTORY, O_EXCL, O_NOFOLLOW, O_RDWR, O_TRUNC, O_WRONLY, SysResult,
};

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

/// The containment rule.
#[derive(Clone, Debug)]
pub struct Sandbox {
    read_dirs: Vec<PathBuf>,
    write_dirs: Vec<PathBuf>,
    files: Vec<PathBuf>,
    cwd: PathBuf,
    exe: PathBuf,
}

fn canonical_dir(p: &Path, what: &str) -> Result<PathBuf, String> {
    let c = p
        .canonicalize()
        .map_err(|e| format!("{what} {}: {e}", p.display()))?;
    if !c.is_dir() {
        return Err(format!("{what} {} is not a directory", p.display()));
    }
    Ok(c)
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

impl Sandbox {
    /// A sandbox reading under `dir` and the existing `files`, writing under `write_dirs`;
    /// relative paths start at `cwd`. `exe` is what `/proc/self/exe` names.
    ///
    /// # Errors
    /// A directory that does not exist or cannot be resolved (a sentence for the user).
    pub fn new(
        dir: &Path,
        write_dirs: &[PathBuf],
        files: &[PathBuf],
        cwd: &Path,
        exe: &Path,
    ) -> Result<Sandbox, String> {
        let read_dir = canonical_dir(dir, "--dir")?;
        let write_dirs = write_dirs
            .iter()
            .map(|d| canonical_dir(d, "--allow-write"))
            .collect::<Result<Vec<_>, _>>()?;
        let cwd = cwd
            .canonicalize()
            .map_err(|e| format!("current directory {}: {e}", cwd.display()))?;
        // Each named file by its lexical and its resolved path (they differ through symlinks).
        let mut named = Vec::new();
        for f in files {
            let joined = cwd.join(f);
            if let Ok(c) = joined.canonicalize()
                && c.is_file()
            {
                named.push(lexical(&joined));
                named.push(c);
            }
        }
        let mut read_dirs = vec![read_dir];
        read_dirs.extend(write_dirs.iter().cloned());
        Ok(Sandbox {
            read_dirs,
            write_dirs,
            files: named,
            cwd,
            exe: exe.to_owned(),
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

    fn allows(&self, p: &Path, access: Access) -> bool {
        match access {
            Access::Read => {
                self.read_dirs.iter().any(|d| p.starts_with(d)) || self.files.iter().any(|f| f == p)
            }
            Access::Write => self.write_dirs.iter().any(|d| p.starts_with(d)),
        }
    }

    /// Resolves the program's `path` (relative to `base`, else the current directory) for
    /// `access`. With `follow` false the last component is not followed (lstat, readlink).
    /// Returns the host path to use; for a path that does not exist yet, its resolved parent
    /// joined with the name (creation).
    ///
    /// # Errors
    /// `EACCES` if the path leaves the allowed directories; `ENOENT` and others from the host.
    pub fn resolve(
        &self,
        base: Option<&Path>,
        path: &[u8],
        access: Access,
        follow: bool,
    ) -> SysResult<PathBuf> {
        if path.is_empty() {
            return Err(ENOENT);
        }
        let raw = Path::new(std::ffi::OsStr::from_bytes(path));
        let joined = if raw.is_absolute() {
            raw.to_path_buf()
        } else {
            base.unwrap_or(&self.cwd).join(raw)
        };
        let lex = lexical(&joined);
        // The lexical form must be inside already: this refuses `../..` escapes without
        // saying whether the outside path exists.
        if !self.allows(&lex, access) {
            return Err(EACCES);
        }
        let resolved = match (follow, lex.file_name()) {
            (false, Some(name)) => {
                let parent = lex.parent().unwrap_or(Path::new("/"));
                parent
                    .canonicalize()
                    .map_err(|e| Errno::from_io(&e))?
                    .join(name)
            }
            _ => match lex.canonicalize() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && access == Access::Write => {
                    let name = lex.file_name().ok_or(ENOENT)?;
                    let parent = lex.parent().unwrap_or(Path::new("/"));
                    parent
                        .canonicalize()
                        .map_err(|e| Errno::from_io(&e))?
                        .join(name)
                }
                Err(e) => return Err(Errno::from_io(&e)),
            },
        };
        if !self.allows(&resolved, access) {
            return Err(EACCES);
        }
        Ok(resolved)
    }

    /// Checks that an opened file is where containment allows (the symlink-swap guard).
    fn check_opened(&self, file: &File, access: Access) -> SysResult<()> {
        let at = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|e| Errno::from_io(&e))?;
        if self.allows(&at, access) {
            Ok(())
        } else {
            Err(EACCES)
        }
    }

    /// Opens `path` with the program's `flags` (`O_*`), under containment.
    ///
    /// # Errors
    /// `EACCES` outside the allowed directories (writes outside a write directory included);
    /// host errors otherwise.
    pub fn open(
        &self,
        base: Option<&Path>,
        path: &[u8],
        flags: u64,
        mode: u32,
    ) -> SysResult<OpenFile> {
        let acc = flags & O_ACCMODE;
        let writes = acc == O_WRONLY || acc == O_RDWR || flags & (O_CREAT | O_TRUNC) != 0;
        let access = if writes { Access::Write } else { Access::Read };
        let host = self.resolve(base, path, access, flags & O_NOFOLLOW == 0)?;
        let mut o = OpenOptions::new();
        o.read(acc != O_WRONLY)
            .write(acc == O_WRONLY || acc == O_RDWR)
            .append(flags & O_APPEND != 0)
            .truncate(flags & O_TRUNC != 0)
            .mode(mode & 0o7777);
        if flags & O_CREAT != 0 {
            if flags & O_EXCL != 0 {
                o.create_new(true);
            } else {
                o.create(true);
            }
        }
        let is_dir = host.is_dir();
        if flags & O_DIRECTORY != 0 && !is_dir {
            return Err(ENOTDIR);
        }
        if is_dir && writes {
            return Err(EISDIR);
        }
        // The resolved path has no symlink left; refuse one swapped in since.
        o.custom_flags(libc::O_NOFOLLOW);
        let file = o.open(&host).map_err(|e| Errno::from_io(&e))?;
        self.check_opened(&file, access)?;
        Ok(OpenFile {
            node: Node::File(file),
            path: host,
            flags,
            is_dir,
            dir_pos: 0,
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
    /// Its host path (empty for the standard streams).
    pub path: PathBuf,
    /// The `open` flags.
    pub flags: u64,
    /// A directory.
    pub is_dir: bool,
    /// Entries of a directory handed out by `getdents64` so far.
    pub dir_pos: usize,
}

impl OpenFile {
    /// A standard stream.
    pub fn stream(node: Node, flags: u64) -> OpenFile {
        OpenFile {
            node,
            path: PathBuf::new(),
            flags,
            is_dir: false,
            dir_pos: 0,
        }
    }

    /// A file the VMM opened itself (`Input::File` as standard input).
    pub fn host_file(file: File, path: PathBuf) -> OpenFile {
        OpenFile {
            node: Node::File(file),
            path,
            flags: 0,
            is_dir: false,
            dir_pos: 0,
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
            Node::Stdin(StdinState::Host) => std::io::stdin().lock().read(&mut buf),
            Node::Stdin(StdinState::Bytes(q)) => {
                let k = n.min(q.len());
                for (d, s) in buf.iter_mut().zip(q.drain(..k)) {
                    *d = s;
                }
                Ok(k)
            }
            Node::File(_) if self.is_dir => return Err(EISDIR),
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

    /// Writes `data` to a file opened for writing.
    ///
    /// # Errors
    /// `EBADF` if not open for writing; host errors.
    pub fn write_file(&mut self, data: &[u8]) -> SysResult<usize> {
        let acc = self.flags & O_ACCMODE;
        match &mut self.node {
            Node::File(f) if acc == O_WRONLY || acc == O_RDWR => {
                f.write_all(data).map_err(|e| Errno::from_io(&e))?;
                Ok(data.len())
            }
            _ => Err(EBADF),
        }
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
            if offset == 0 && whence == 0 {
                self.dir_pos = 0;
            }
            return Ok(0);
        }
        let to = match whence {
            0 => SeekFrom::Start(u64::try_from(offset).map_err(|_| super::abi::EINVAL)?),
            1 => SeekFrom::Current(offset),
            2 => SeekFrom::End(offset),
            _ => return Err(super::abi::EINVAL),
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
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("root/sub")).unwrap();
        std::fs::write(d.join("root/a.txt"), b"a").unwrap();
        std::fs::write(d.join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(d.join("secret"), d.join("root/link")).unwrap();
        d
    }

    #[test]
    fn resolve_inside_is_allowed_and_escapes_are_eacces() {
        let d = tmp("resolve");
        let root = d.join("root");
        let sb = Sandbox::new(&root, &[], &[], &root, Path::new("/bin/x")).unwrap();
        assert!(sb.resolve(None, b"a.txt", Access::Read, true).is_ok());
        assert!(
            sb.resolve(None, b"sub/../a.txt", Access::Read, true)
                .is_ok()
        );
        assert_eq!(
            sb.resolve(None, b"../secret", Access::Read, true),
            Err(EACCES)
        );
        assert_eq!(
            sb.resolve(None, b"sub/../../secret", Access::Read, true),
            Err(EACCES)
        );
        assert_eq!(
            sb.resolve(None, b"/etc/passwd", Access::Read, true),
            Err(EACCES)
        );
        assert_eq!(sb.resolve(None, b"link", Access::Read, true), Err(EACCES));
        assert_eq!(
            sb.resolve(None, b"missing", Access::Read, true),
            Err(ENOENT)
        );
        // Writing needs --allow-write.
        assert_eq!(
            sb.resolve(None, b"new.txt", Access::Write, true),
            Err(EACCES)
        );
        let _ = std::fs::remove_dir_all(&d);
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
        assert!(f.is_ok());
        assert_eq!(sb.open(None, b"a.txt", O_WRONLY, 0).err(), Some(EACCES));
        assert!(sb.open(None, b"a.txt", 0, 0).is_ok());
        let _ = std::fs::remove_dir_all(&d);
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
        assert!(sb.resolve(None, p, Access::Read, true).is_ok());
        // ... which also makes the symlink to it readable, and nothing else.
        assert!(sb.resolve(None, b"link", Access::Read, true).is_ok());
        let _ = std::fs::remove_dir_all(&d);
    }
}
