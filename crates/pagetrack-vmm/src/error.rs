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
    #[error(
        "invalid guest image: {}{reason}",
        program.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default()
    )]
    InvalidGuestImage {
        /// The program, when the image is a file (the process VM).
        program: Option<std::path::PathBuf>,
        /// Why.
        reason: ImageProblem,
        /// The host's error, when reading the file failed.
        #[source]
        source: Option<std::io::Error>,
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
    /// A page-table access of the process VM's memory manager failed while it changed the
    /// address space, so its records and the page tables the vCPUs walk may disagree: the
    /// process is stopped before it runs again.
    #[error(
        "the program's page tables may no longer match its address space: a page-table {access} at {gpa:#x} failed"
    )]
    AddressSpaceInconsistent {
        /// The access that failed.
        access: PageTableAccess,
        /// Its guest-physical address.
        gpa: u64,
    },
    /// A configuration value is unusable.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// Why.
        reason: ConfigProblem,
        /// The host's error, when one was the cause (the current directory, a standard
        /// input file).
        #[source]
        source: Option<std::io::Error>,
    },
}

/// A page-table access the process VM's memory manager made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PageTableAccess {
    /// A read of a table entry.
    Read,
    /// A write of a table entry or a zeroed frame.
    Write,
}

impl std::fmt::Display for PageTableAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Read => "read",
            Self::Write => "write",
        })
    }
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

/// Why a guest image is unusable ([`Error::InvalidGuestImage`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImageProblem {
    /// The program cannot be opened (the host's error is the source).
    #[error("cannot open it")]
    Open,
    /// The program cannot be read (the host's error is the source).
    #[error("cannot read it")]
    Read,
    /// The program is not a static x86-64 executable, or its headers are unusable.
    #[error(transparent)]
    Elf(#[from] ElfProblem),
    /// The pages of its segments overlap the VMM's own mappings.
    #[error(
        "segment pages [{start:#x}, {end:#x}) overlap the VMM's own mappings; use more --mem or a different link address"
    )]
    SegmentsOverlapVmm {
        /// First address of the overlapping pages.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// Guest memory has too few frames for its segments.
    #[error("guest memory is too small for the image (use more --mem)")]
    NoFramesForImage,
    /// A segment's bytes could not be copied to its pages.
    #[error("cannot copy the segment at {vaddr:#x}")]
    SegmentCopy {
        /// The segment's virtual address.
        vaddr: u64,
    },
    /// A flat image without bytes.
    #[error("the image is empty")]
    Empty,
    /// A flat image that does not fit in RAM at its load address.
    #[error("{len} bytes at {load:#x} do not fit in {mem:#x} bytes of RAM")]
    DoesNotFit {
        /// Image size in bytes.
        len: u64,
        /// Load address.
        load: u64,
        /// RAM size in bytes.
        mem: u64,
    },
    /// A long-mode flat image that ends beyond the identity map.
    #[error("image ends at {end:#x}, beyond the identity map (the first {limit:#x} bytes)")]
    BeyondIdentityMap {
        /// Where the image ends (exclusive).
        end: u64,
        /// Bytes the identity map covers.
        limit: u64,
    },
    /// A long-mode flat image over the vCPU stacks and system tables.
    #[error(
        "image [{start:#x}, {end:#x}) overlaps the stacks and system tables at [{low:#x}, {high:#x})"
    )]
    OverlapsSystem {
        /// Load address.
        start: u64,
        /// Where the image ends (exclusive).
        end: u64,
        /// Start of the stacks and tables.
        low: u64,
        /// Their end (exclusive).
        high: u64,
    },
    /// A real-mode flat image placed where real mode cannot reach it.
    #[error("a real-mode image must load below 64 KiB and end below 1 MiB")]
    RealModePlacement,
}

/// Why an ELF file cannot run in the process VM ([`ImageProblem::Elf`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ElfProblem {
    /// No ELF magic.
    #[error("not an ELF file")]
    NotElf,
    /// Shorter than an ELF64 header.
    #[error("truncated ELF header")]
    Truncated,
    /// ELFCLASS32.
    #[error("a 32-bit ELF executable; only x86-64 (ELF64) programs run here")]
    Elf32,
    /// An `EI_CLASS` that is neither 32- nor 64-bit.
    #[error("unknown ELF class {class}")]
    UnknownClass {
        /// `EI_CLASS`.
        class: u8,
    },
    /// ELFDATA2MSB.
    #[error("a big-endian ELF file; only little-endian x86-64 programs run here")]
    BigEndian,
    /// Another architecture.
    #[error("ELF machine {machine} is not x86-64 (62)")]
    Machine {
        /// `e_machine`.
        machine: u16,
    },
    /// Neither `ET_EXEC` nor `ET_DYN`.
    #[error("ELF type {kind} is not an executable (relocatable object or core file?)")]
    NotExecutable {
        /// `e_type`.
        kind: u16,
    },
    /// An `e_phentsize` other than 56.
    #[error("program header size {size}, expected {expected}")]
    HeaderSize {
        /// `e_phentsize`.
        size: usize,
        /// The ELF64 size.
        expected: usize,
    },
    /// No program headers, or more than any real executable has.
    #[error("{count} program headers (expected 1 to {max})")]
    HeaderCount {
        /// `e_phnum`.
        count: usize,
        /// The most accepted.
        max: usize,
    },
    /// The program header table runs past the file.
    #[error("program headers lie outside the file")]
    HeadersOutsideFile,
    /// A `PT_INTERP` header: the program needs a dynamic loader.
    #[error(
        "a dynamically linked executable (interpreter {interpreter}); only static programs run here"
    )]
    Dynamic {
        /// The interpreter it names (lossily decoded).
        interpreter: String,
    },
    /// A segment with more file bytes than memory bytes.
    #[error("segment {index}: file size above memory size")]
    FileSizeAboveMemSize {
        /// The segment's index among the program headers.
        index: usize,
    },
    /// A segment whose bytes run past the file.
    #[error("segment {index}: its bytes lie outside the file")]
    SegmentOutsideFile {
        /// The segment's index among the program headers.
        index: usize,
    },
    /// A segment whose address and file offset differ modulo the page size.
    #[error(
        "segment {index}: address {vaddr:#x} and offset {offset:#x} differ modulo the page size"
    )]
    Misaligned {
        /// The segment's index among the program headers.
        index: usize,
        /// `p_vaddr`.
        vaddr: u64,
        /// `p_offset`.
        offset: u64,
    },
    /// No `PT_LOAD` segment with memory.
    #[error("no loadable segment")]
    NoLoadSegment,
    /// A segment whose (relocated) end overflows.
    #[error("segment {index}: address overflows")]
    AddressOverflow {
        /// The segment's index among the loadable ones.
        index: usize,
    },
    /// A segment outside the user half of the address space.
    #[error("segment {index} at [{start:#x}, {end:#x}) lies outside the user address space")]
    OutsideUserSpace {
        /// The segment's index among the loadable ones.
        index: usize,
        /// Its first address.
        start: u64,
        /// Its end (exclusive).
        end: u64,
    },
    /// Two segments share memory.
    #[error("segments at {first:#x} and {second:#x} overlap")]
    Overlap {
        /// The lower segment's address.
        first: u64,
        /// The higher one's.
        second: u64,
    },
    /// The entry point lies in no executable segment.
    #[error("entry point {entry:#x} is not in an executable segment")]
    EntryNotExecutable {
        /// The (relocated) entry point.
        entry: u64,
    },
}

/// Why a configuration is unusable ([`Error::InvalidConfig`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigProblem {
    /// The process VM's memory size.
    #[error("guest memory {mem:#x} must be a multiple of 2 MiB from 16 MiB to 4 GiB")]
    ProcessMemory {
        /// The size asked for, in bytes.
        mem: u64,
    },
    /// A flat guest's memory size.
    #[error("--mem {mem:#x} must be at least {min:#x} and a multiple of 4 KiB")]
    FlatMemory {
        /// The size asked for, in bytes.
        mem: u64,
        /// The least accepted.
        min: u64,
    },
    /// A flat guest's vCPU count.
    #[error("--vcpus must be 1 to {max}")]
    VcpuCount {
        /// The count asked for.
        vcpus: u32,
        /// The most accepted.
        max: u32,
    },
    /// The vCPU stacks do not fit below the long-mode tables.
    #[error("{vcpus} vCPU stacks of {stack:#x} bytes do not fit in {mem:#x} bytes of RAM")]
    StacksDoNotFit {
        /// vCPUs asked for.
        vcpus: u32,
        /// Bytes per stack.
        stack: u64,
        /// RAM size in bytes.
        mem: u64,
    },
    /// The current directory cannot be read (the host's error is the source).
    #[error("current directory")]
    CurrentDir,
    /// A standard-input file cannot be opened (the host's error is the source).
    #[error("standard input {}", path.display())]
    Stdin {
        /// The file.
        path: std::path::PathBuf,
    },
    /// Guest memory has too few frames for a part of the process.
    #[error("guest memory is too small for {what}")]
    MemoryTooSmall {
        /// What did not fit (e.g. "the stack").
        what: &'static str,
    },
    /// argv, envp and the auxiliary vector need more than half the stack limit.
    #[error("arguments and environment are too large (over 4 MiB)")]
    ArgumentsTooLarge,
}

/// Why a process VM `--track` region does not parse ([`crate::process::Region`]'s
/// `FromStr`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegionError {
    /// An address or length that is not a number.
    #[error("'{text}' is not a number (use 4096 or 0x1000)")]
    NotANumber {
        /// The text as given.
        text: String,
    },
    /// `ADDR+LEN` past the end of the address space.
    #[error("range overflows")]
    Overflow,
    /// Neither a region name nor a range.
    #[error(
        "'{text}' is not a region: use stack, heap, data, text, mmap, page-tables, writable, ADDR-END or ADDR+LEN"
    )]
    Unknown {
        /// The text as given.
        text: String,
    },
    /// A range whose end is not above its start.
    #[error("'{text}' is empty (END is exclusive)")]
    Empty {
        /// The text as given.
        text: String,
    },
}
