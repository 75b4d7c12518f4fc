//! Fault classification for backends that own an MMU or an instruction emulator (B34–B41).

/// What the faulting access was, from the hardware error code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct FaultInfo {
    /// An existing translation denied the access (error code bit 0).
    pub present: bool,
    /// A write (bit 1).
    pub write: bool,
    /// An instruction fetch (bit 4).
    pub fetch: bool,
    /// A reserved-bit fault, i.e. an MMIO mapping (bit 3).
    pub reserved: bool,
}

impl FaultInfo {
    /// Decodes an x86 page-fault error code.
    pub const fn from_error_code(code: u64) -> FaultInfo {
        FaultInfo {
            present: code & 1 != 0,
            write: code & 2 != 0,
            reserved: code & 8 != 0,
            fetch: code & 16 != 0,
        }
    }
}

/// What the backend should do with a fault on a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultAction {
    /// Do not fix the fault: emulate the write and report it (B34).
    Emulate,
    /// Build the mapping without write permission; since the access was a write, then emulate
    /// it (B35).
    MapReadOnlyThenEmulate,
    /// Build the mapping present, readable and executable, but not writable (B36).
    MapReadOnly,
    /// Not a page-track matter: handle as usual (B41: writable again after the last remove).
    Normal,
}

/// Classifies a fault on a frame whose tracked state is `tracked`.
pub const fn classify_fault(tracked: bool, fault: FaultInfo) -> FaultAction {
    if !tracked || fault.reserved {
        return FaultAction::Normal;
    }
    match (fault.present, fault.write) {
        (true, true) => FaultAction::Emulate,
        (false, true) => FaultAction::MapReadOnlyThenEmulate,
        (_, false) => FaultAction::MapReadOnly,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b34_present_write_tracked_emulates() {
        let f = FaultInfo::from_error_code(0b11);
        assert_eq!(classify_fault(true, f), FaultAction::Emulate);
    }

    #[test]
    fn b34_reserved_bit_fault_is_not_page_track() {
        let f = FaultInfo::from_error_code(0b1011);
        assert_eq!(classify_fault(true, f), FaultAction::Normal);
    }

    #[test]
    fn b35_not_present_write_maps_readonly_then_emulates() {
        let f = FaultInfo::from_error_code(0b10);
        assert_eq!(classify_fault(true, f), FaultAction::MapReadOnlyThenEmulate);
    }

    #[test]
    fn b36_read_and_fetch_map_readonly() {
        assert_eq!(
            classify_fault(true, FaultInfo::from_error_code(0)),
            FaultAction::MapReadOnly
        );
        assert_eq!(
            classify_fault(true, FaultInfo::from_error_code(0b10001)),
            FaultAction::MapReadOnly
        );
    }

    #[test]
    fn b41_untracked_write_is_normal() {
        assert_eq!(
            classify_fault(false, FaultInfo::from_error_code(0b11)),
            FaultAction::Normal
        );
    }
}
