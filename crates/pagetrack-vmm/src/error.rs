//! The crate's error type.

/// Errors of pagetrack-vmm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{op} failed")]
    Kvm {
        /// The ioctl, by its kernel name (e.g. `KVM_SET_SREGS`).
        op: &'static str,
        /// The errno KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be read or written.
    #[error("cannot access guest memory for the {what} at {addr:#x}")]
    GuestMemory {
        /// What was being read or written (e.g. "exception frame").
        what: &'static str,
        /// The guest-physical address of the access.
        addr: u64,
        /// The accessor's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The RAM size cannot hold the long-mode layout.
    #[error("guest ram size {size:#x} is unusable: {reason}")]
    InvalidRamSize {
        /// The RAM size in bytes.
        size: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A vCPU index beyond what the layout provides for.
    #[error("vcpu index {index} is out of range (the layout has {max} vcpu slots)")]
    VcpuIndexOutOfRange {
        /// The index asked for.
        index: u32,
        /// The number of per-vCPU slots (TSS, CPL0 stack, user stack).
        max: u32,
    },
    /// The vCPU is not stopped inside one of the exception-report stubs.
    #[error("vcpu is not stopped in an exception stub (rip {rip:#x})")]
    NotAnExceptionReport {
        /// The vCPU's RIP.
        rip: u64,
    },
    /// KVM did not take an MSR value (`KVM_SET_MSRS` stopped before it).
    #[error("kvm refused msr {index:#x}")]
    MsrRefused {
        /// The MSR index.
        index: u32,
    },
    /// Assembling the CPL0 exception stubs failed.
    #[error("cannot assemble the exception stubs")]
    Assemble {
        /// iced-x86's error.
        #[source]
        source: iced_x86::IcedError,
    },
    /// Building the boot structures failed in a way none of the variants above names.
    #[error(transparent)]
    Boot(pagetrack_x86::Error),
    /// The tracking backend failed.
    #[error(transparent)]
    Backend(#[from] pagetrack_kvm::Error),
    /// The core refused a tracking request.
    #[error(transparent)]
    Track(#[from] pagetrack::Error),
    /// A guest image or its placement is unusable.
    #[error("invalid guest image: {reason}")]
    InvalidGuestImage {
        /// Why.
        reason: String,
    },
    /// A directory given for containment cannot be opened.
    #[error("{option} {}: {source}", path.display())]
    SandboxDir {
        /// The option it came from (`--dir`, `--allow-write`).
        option: &'static str,
        /// The directory as given.
        path: std::path::PathBuf,
        /// The host's error.
        #[source]
        source: std::io::Error,
    },
    /// A directory given for containment has procfs in its subtree: the program could
    /// reach the VMM's own `/proc/self/mem`.
    #[error(
        "{option} {}: refused, procfs is mounted at {} under it (the program could reach pagetrack's own /proc/self/mem); give a directory without /proc below it",
        path.display(),
        mount.display()
    )]
    ProcUnderRoot {
        /// The option it came from (`--dir`, `--allow-write`).
        option: &'static str,
        /// The directory as given.
        path: std::path::PathBuf,
        /// The procfs mount point in its subtree.
        mount: std::path::PathBuf,
    },
    /// The program cannot be executed (as `execve` would refuse it).
    #[error("{}: {reason}", path.display())]
    ProgramRefused {
        /// The program as given.
        path: std::path::PathBuf,
        /// Why.
        reason: ProgramRefusal,
        /// The host's error, if one was the cause.
        #[source]
        source: Option<std::io::Error>,
    },
    /// The image's segments need more guest memory than `--mem` gives.
    #[error(
        "{}: the image needs {} MiB of guest memory for its segments, {} MiB are free (use more --mem)",
        path.display(),
        need.div_ceil(1 << 20),
        free >> 20
    )]
    ImageTooLarge {
        /// The program.
        path: std::path::PathBuf,
        /// Bytes its segments span (pages, with the page tables they need).
        need: u64,
        /// Bytes of guest memory free for them.
        free: u64,
    },
    /// A configuration value is unusable.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// Why.
        reason: String,
    },
}

impl Error {
    /// The errno of a failed KVM ioctl, if this error is one.
    #[must_use]
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kvm { source, .. } => Some(source.errno()),
            _ => None,
        }
    }
}

impl From<pagetrack_x86::Error> for Error {
    /// The boot structures' errors as this crate has always reported them.
    fn from(e: pagetrack_x86::Error) -> Self {
        use pagetrack_x86::Error as X;
        match e {
            X::InvalidRamSize { size, reason } => Self::InvalidRamSize { size, reason },
            X::VcpuIndexOutOfRange { index, max } => Self::VcpuIndexOutOfRange { index, max },
            X::Assemble { source } => Self::Assemble { source },
            X::GuestMemory { what, addr, source } => Self::GuestMemory { what, addr, source },
            other => Self::Boot(other),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a program is refused before it is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProgramRefusal {
    /// It cannot be opened (missing, unreadable).
    #[error("cannot open it")]
    Open,
    /// It is not a regular file (a directory, a device such as /dev/zero, a FIFO, a socket).
    #[error("not a regular file (permission denied, as execve says: EACCES)")]
    NotRegular,
    /// It has no execute permission for pagetrack's user.
    #[error("no execute permission (permission denied, as execve says: EACCES)")]
    NotExecutable,
    /// It is larger than guest memory could hold.
    #[error("larger than the guest memory (use more --mem)")]
    TooLarge,
}
