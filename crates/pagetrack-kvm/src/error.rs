//! pagetrack-kvm's error type.

/// Everything pagetrack-kvm can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{op} failed")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A configuration pagetrack cannot honour (it is rejected rather than ignored).
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: &'static str,
    },
    /// A dirty ring ([`crate::VmConfig::with_dirty_ring`]) on a host whose KVM offers neither
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` nor `KVM_CAP_DIRTY_LOG_RING`.
    #[error("KVM offers no dirty ring (asked for {entries} entries per vCPU)")]
    DirtyRingUnsupported {
        /// The entries asked for.
        entries: u32,
    },
    /// A dirty ring size KVM would refuse: not a power of two, or outside `min..=max`.
    #[error("dirty ring of {entries} entries: must be a power of two in {min}..={max}")]
    DirtyRingSize {
        /// The entries asked for.
        entries: u32,
        /// The smallest ring (a page).
        min: u32,
        /// The largest ring KVM offers.
        max: u32,
    },
    /// KVM refused to enable the dirty ring: the VM already has vCPUs (KVM accepts the
    /// ring only before the first one exists; a VM brought with [`crate::Vm::from_vm_fd`]
    /// after the VMM created its vCPUs), or the host reserves more entries than asked (PML).
    #[error("KVM refused a dirty ring of {entries} entries (vCPUs already created?)")]
    DirtyRingRefused {
        /// The entries asked for.
        entries: u32,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// `/dev/kvm` lacks something pagetrack needs.
    #[error("KVM lacks {what}")]
    MissingCapability {
        /// What is missing.
        what: &'static str,
    },
    /// The core refused (unknown gfn, overflow, ...).
    #[error(transparent)]
    Track(#[from] pagetrack::Error),
    /// Mapping guest RAM failed.
    #[error("cannot map {size:#x} bytes of guest RAM at {gpa:#x}")]
    Mmap {
        /// Guest-physical start.
        gpa: u64,
        /// Size.
        size: u64,
        /// vm-memory's error (with the OS error).
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// Adding a region to, or removing one from, the guest memory map failed.
    #[error("cannot {op} the guest memory region")]
    GuestMemory {
        /// "insert" or "remove".
        op: &'static str,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestRegionCollectionError,
    },
    /// The vCPU kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    KickSignal {
        /// The OS error.
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    /// [`crate::KickSignal::Vmm`] names a signal without a handler.
    #[error(
        "the VMM's kick signal {signal} has no handler installed \
         (its default action would end the process; an ignored signal does not interrupt KVM_RUN)"
    )]
    KickSignalUnhandled {
        /// The signal number.
        signal: i32,
    },
    /// A guest RAM range is invalid (unaligned, empty, overlapping, out of slots).
    #[error("invalid RAM region at {gpa:#x} (+{size:#x}): {reason}")]
    InvalidRam {
        /// Start.
        gpa: u64,
        /// Size.
        size: u64,
        /// Why.
        reason: &'static str,
    },
    /// A guest-physical access outside guest RAM through the accessor.
    #[error("{len} bytes at gpa {gpa:#x} are not guest RAM")]
    NotRam {
        /// Address.
        gpa: u64,
        /// Length.
        len: usize,
    },
    /// A device transfer's source or destination failed ([`crate::TrackedMemory`]'s
    /// `read_volatile_from`, `write_volatile_to`).
    #[error("device transfer at gpa {gpa:#x} failed")]
    DeviceIo {
        /// Guest-physical address of the step that failed.
        gpa: u64,
        /// The file's, socket's or buffer's error.
        #[source]
        source: vm_memory::VolatileMemoryError,
    },
    /// A device transfer that had to move a whole range moved less (its source ended, its
    /// destination took less).
    #[error("{completed} of {expected} bytes transferred at gpa {gpa:#x}")]
    ShortTransfer {
        /// Guest-physical start.
        gpa: u64,
        /// Bytes asked for.
        expected: usize,
        /// Bytes moved.
        completed: usize,
    },
    /// vm-memory refused an access to guest RAM (an atomic access that is misaligned).
    #[error("guest memory access at gpa {gpa:#x} refused")]
    GuestAccess {
        /// Guest-physical address.
        gpa: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// KVM memslots ran out even after merging tracked fragments.
    #[error("out of KVM memslots ({budget} available)")]
    SlotBudget {
        /// The budget.
        budget: usize,
    },
    /// A guest store that neither KVM nor pagetrack can emulate: the vCPU stops.
    ///
    /// The message names the reason; the reason's own cause (the emulator's error, the
    /// guest-memory error) stays reachable as `reason`'s [`source`](std::error::Error::source).
    #[error("vcpu {vcpu} cannot continue at rip {rip:#x} (bytes {bytes}): {reason}")]
    Unemulatable {
        /// vCPU index.
        vcpu: u32,
        /// Guest RIP.
        rip: u64,
        /// The instruction's bytes (as many as could be fetched; shown as hex).
        bytes: InstructionBytes,
        /// Why.
        reason: StopReason,
    },
    /// [`crate::Vm::unpin_strict`] of a frame with no strict pin: nothing changed.
    #[error("frame {gfn:#x} has no strict pin to drop")]
    NotPinned {
        /// The frame.
        gfn: u64,
    },
    /// [`crate::Vm::pin_strict`] would overflow the frame's pin count: nothing changed.
    #[error("frame {gfn:#x} already has the most strict pins a frame can hold")]
    PinOverflow {
        /// The frame.
        gfn: u64,
    },
    /// [`crate::Vm::take_dirty_log`], [`crate::Vm::checkpoint`] or [`crate::Vm::restore`] on
    /// a VM created without dirty logging.
    #[error("dirty logging is off (VmConfig::with_dirty_log)")]
    DirtyLogOff,
    /// [`crate::Vm::restore`] with no checkpoint taken ([`crate::Vm::checkpoint`]).
    #[error("no checkpoint to restore (Vm::checkpoint)")]
    NoCheckpoint,
    /// The memory for a checkpoint image ([`crate::Vm::checkpoint`]) could not be allocated;
    /// the previous checkpoint, if any, is kept.
    #[error("cannot allocate {bytes} bytes for the checkpoint image")]
    CheckpointAlloc {
        /// The bytes asked for (the guest RAM's size).
        bytes: u64,
        /// The allocator's refusal.
        #[source]
        source: std::collections::TryReserveError,
    },
    /// [`crate::Vm::restore`] after the guest RAM regions changed since the checkpoint (a
    /// region added or removed): the image no longer describes the RAM.
    #[error("the checkpoint is stale: {reason}")]
    CheckpointStale {
        /// What changed.
        reason: &'static str,
    },
    /// A thread pagetrack needs could not be started.
    #[error("cannot start the {what} thread")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The guest named a tracked frame in an MSR that makes KVM write guest memory itself
    /// (kvmclock, wall clock, steal time, async PF, PV EOI, Hyper-V pages): KVM's writes
    /// would bypass tracking and be lost, so the `wrmsr` is refused. It takes no effect; a
    /// VMM that runs the vCPU on gives the guest #GP(0) for it.
    #[error(
        "vcpu {vcpu} at rip {rip:#x}: wrmsr {msr:#x} points KVM's own writes at {gpa:#x}, \
         on tracked frame {gfn:#x}; refused"
    )]
    KvmWritesTracked {
        /// vCPU index.
        vcpu: u32,
        /// Guest RIP of the `wrmsr`.
        rip: u64,
        /// The MSR.
        msr: u32,
        /// Guest-physical address of the structure KVM would write.
        gpa: u64,
        /// The tracked frame it overlaps.
        gfn: u64,
    },
    /// A frame cannot be tracked: KVM writes it itself, because the guest named it in an MSR
    /// (see [`Error::KvmWritesTracked`]); tracking would lose those writes.
    #[error("frame {gfn:#x} is written by KVM itself (MSR {msr:#x}{}); it cannot be tracked",
        .vcpu.map(|v| format!(" of vcpu {v}")).unwrap_or_default())]
    FrameWrittenByKvm {
        /// The frame.
        gfn: u64,
        /// The MSR that names it.
        msr: u32,
        /// The vCPU that wrote the MSR (`None` for partition-wide MSRs).
        vcpu: Option<u32>,
    },
    /// The vCPU shut down (triple fault) while a stack that exception delivery writes lies on
    /// a tracked frame: KVM cannot write an exception frame into a read-only memslot, so
    /// the exception raised at `rip` never reached the guest. Returned instead of
    /// [`crate::Exit::Shutdown`], which would differ from the untracked run without a word.
    #[error(
        "vcpu {vcpu}: exception at rip {rip:#x} could not be delivered: its stack frame at \
         {gpa:#x} lies on tracked frame {gfn:#x} (KVM shut the vCPU down)"
    )]
    EventDeliveryToTracked {
        /// vCPU index.
        vcpu: u32,
        /// Guest RIP where the exception was raised.
        rip: u64,
        /// Guest-physical address of the stack frame (its tracked part).
        gpa: u64,
        /// The tracked frame.
        gfn: u64,
    },
    /// An instruction made several stores to tracked frames and KVM passed on only the last
    /// (its emulator keeps one MMIO write per instruction); the dropped ones are not
    /// determined by the state after it (the caller's CS of a far call, the FLAGS and CS of
    /// an interrupt frame), or the exit has more than one explanation. Nothing of the
    /// instruction is applied; the vCPU must not be run on.
    #[error(
        "vcpu {vcpu} at rip {rip:#x} (bytes {}): stores of one instruction were lost: {reason}",
        pagetrack_x86::emulate::hex(.bytes)
    )]
    StoresLost {
        /// vCPU index.
        vcpu: u32,
        /// The instruction's address (the current IP when it cannot be located).
        rip: u64,
        /// Its bytes.
        bytes: Vec<u8>,
        /// Why it cannot be completed.
        reason: &'static str,
    },
    /// A vCPU index that does not exist, or a second vCPU with the same index.
    #[error("vcpu {index}: {reason}")]
    Vcpu {
        /// Index.
        index: u32,
        /// Why.
        reason: &'static str,
    },
}

/// The bytes of a guest instruction, shown as space-separated lowercase hex
/// (`c4 e3 79 1d 47 40 00`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstructionBytes(pub Vec<u8>);

impl InstructionBytes {
    /// The raw bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Display for InstructionBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl From<&[u8]> for InstructionBytes {
    fn from(bytes: &[u8]) -> InstructionBytes {
        InstructionBytes(bytes.to_vec())
    }
}

impl From<Vec<u8>> for InstructionBytes {
    fn from(bytes: Vec<u8>) -> InstructionBytes {
        InstructionBytes(bytes)
    }
}

/// Why a store could not be completed ([`Error::Unemulatable`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StopReason {
    /// The store emulator refused or failed (an instruction it does not handle, a state it
    /// cannot rebuild).
    /// (Boxed: it is large, and errors travel by value.)
    #[error(transparent)]
    Emulate(Box<pagetrack_x86::emulate::EmulateError>),
    /// The store targets guest-physical memory that is not RAM.
    #[error("store to {gpa:#x} is not guest RAM")]
    NotRam {
        /// The target address.
        gpa: u64,
    },
    /// Writing the result to guest RAM failed.
    #[error("cannot write {gpa:#x}")]
    Write {
        /// The target address.
        gpa: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The store raises an exception while another one is being delivered (pagetrack
    /// does not model the double fault).
    #[error("the store raises exception {vector} while exception {delivering} is being delivered")]
    ExceptionDuringDelivery {
        /// The exception the store raises.
        vector: u8,
        /// The exception KVM is delivering.
        delivering: u8,
    },
    /// KVM retries a store into a tracked frame without ever exiting, and pagetrack cannot
    /// complete it (the inner reason says why).
    #[error(
        "KVM retries this store into a tracked frame without an exit, and pagetrack cannot \
         complete it: {0}"
    )]
    RetriedWithoutExit(Box<StopReason>),
    /// The vCPU runs with 32-bit or PAE paging outside long mode, which pagetrack does not
    /// walk.
    #[error("32-bit or PAE paging without long mode is not walked by pagetrack")]
    LegacyPaging,
    /// A locked read-modify-write whose operand straddles a strict tracked frame and a frame
    /// KVM lets the guest write (untracked, or relaxed): KVM, or another vCPU natively, may
    /// write that part outside any lock, so it cannot be made atomic. Refused whichever part
    /// KVM stored itself this time (review 13, U5: with a relaxed part it depended on timing).
    #[error(
        "a locked read-modify-write whose operand straddles a tracked and an untracked frame \
         (or a relaxed one) cannot be made atomic (KVM or the guest writes that part itself); \
         track both frames, strict"
    )]
    SplitLockHalfTracked,
    /// A locked read-modify-write in compatibility mode (pagetrack re-executes locked
    /// instructions in 64-bit code only).
    #[error(
        "a locked read-modify-write in compatibility mode cannot be made atomic (pagetrack \
         re-executes 64-bit code only)"
    )]
    CompatLocked,
}

impl From<pagetrack_x86::emulate::EmulateError> for StopReason {
    fn from(e: pagetrack_x86::emulate::EmulateError) -> StopReason {
        StopReason::Emulate(Box::new(e))
    }
}

impl Error {
    /// [`Error::Unemulatable`] for vCPU `vcpu` stopped at `rip` on the instruction `bytes`.
    pub fn unemulatable(
        vcpu: u32,
        rip: u64,
        bytes: impl Into<InstructionBytes>,
        reason: impl Into<StopReason>,
    ) -> Error {
        Error::Unemulatable {
            vcpu,
            rip,
            bytes: bytes.into(),
            reason: reason.into(),
        }
    }

    /// The errno of a failed KVM ioctl.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kvm { source, .. } => Some(source.errno()),
            _ => None,
        }
    }

    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }
}

/// `Result` with pagetrack-kvm's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
