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

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
