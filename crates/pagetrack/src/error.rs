//! The core's error type.

use crate::addr::{AsId, Gfn, SlotId};

/// Everything that can go wrong in the core. A call that returns an error changed nothing.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// No memslot of the address space contains the frame (the kernel's `-EINVAL`).
    #[error("{gfn} is not in any memslot of {as_id}")]
    UnknownGfn {
        /// Address space searched.
        as_id: AsId,
        /// The frame.
        gfn: Gfn,
    },
    /// Adding would take the frame's count past 65535 (the kernel warns and keeps it; R1).
    #[error("write-track count of {gfn} in {as_id} would exceed 65535")]
    TrackCountOverflow {
        /// Address space of the frame.
        as_id: AsId,
        /// The frame.
        gfn: Gfn,
    },
    /// Removing a track that is not there: the count would go below zero.
    #[error("{gfn} in {as_id} is not write-tracked")]
    NotTracked {
        /// Address space of the frame.
        as_id: AsId,
        /// The frame.
        gfn: Gfn,
    },
    /// add/remove before write tracking was enabled (the kernel bugs the VM, B15).
    #[error(
        "write tracking is not enabled: register a notifier or call enable_write_tracking first"
    )]
    TrackingDisabled,
    /// The address space id is not below the tracker's number of address spaces.
    #[error("{as_id} does not exist (the tracker has {count})")]
    InvalidAddressSpace {
        /// The id given.
        as_id: AsId,
        /// How many address spaces exist.
        count: u16,
    },
    /// The slot id is not below the per-address-space slot limit.
    #[error("{slot} is out of range (at most {max} slots per address space)")]
    InvalidSlot {
        /// The id given.
        slot: SlotId,
        /// The limit.
        max: u16,
    },
    /// Deleting, or changing, a slot that does not exist.
    #[error("{slot} of {as_id} does not exist")]
    UnknownSlot {
        /// Address space.
        as_id: AsId,
        /// The slot id.
        slot: SlotId,
    },
    /// A new or moved slot would overlap an existing one (the kernel's `-EEXIST`).
    #[error("{new} overlaps {existing} in {as_id}")]
    MemslotOverlap {
        /// Address space.
        as_id: AsId,
        /// The slot being created or moved.
        new: SlotId,
        /// The slot it would overlap.
        existing: SlotId,
    },
    /// A malformed region: size change, address overflow, too many pages, bad flags.
    #[error("invalid memory region for {slot}: {reason}")]
    InvalidRegion {
        /// The slot id.
        slot: SlotId,
        /// What is wrong.
        reason: &'static str,
    },
    /// MOVE while a notifier is registered (B47; the kernel's `-EINVAL`).
    #[error("cannot move {slot} of {as_id} while a write-track notifier is registered")]
    MoveWithNotifiers {
        /// Address space.
        as_id: AsId,
        /// The slot.
        slot: SlotId,
    },
    /// Allocating write-track metadata failed (the kernel's `-ENOMEM`); partial allocations are kept.
    #[error("out of memory allocating {bytes} bytes of write-track metadata")]
    OutOfMemory {
        /// Size of the allocation that failed.
        bytes: usize,
    },
    /// The operation is not allowed from inside a notifier callback (it would deadlock).
    #[error("{op} is not allowed from inside a notifier callback")]
    InCallback {
        /// The refused operation.
        op: &'static str,
    },
    /// The enforcement backend failed; the count change was rolled back.
    #[error("backend could not {op}")]
    Backend {
        /// What the core asked for ("protect" or "unprotect").
        op: &'static str,
        /// The backend's error.
        #[source]
        source: crate::BackendError,
    },
}

/// `Result` with the core's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
