//! The crate's error type, for the boot structures ([`crate::boot`]).
//!
//! The store emulator reports through its own [`crate::emulate::EmulateError`]: its variants
//! are outcomes the caller acts on (inject #GP, stop with the instruction's bytes), not
//! failures of this crate, and they are matched apart.

/// Errors of pagetrack-x86's boot structures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
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
    /// Assembling the CPL0 exception stubs failed.
    #[error("cannot assemble the exception stubs")]
    Assemble {
        /// iced-x86's error.
        #[source]
        source: iced_x86::IcedError,
    },
    /// Guest memory could not be read.
    #[error("cannot access guest memory for the {what} at {addr:#x}")]
    GuestMemory {
        /// What was being read (e.g. "exception frame").
        what: &'static str,
        /// The guest-physical address of the access.
        addr: u64,
        /// The accessor's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
