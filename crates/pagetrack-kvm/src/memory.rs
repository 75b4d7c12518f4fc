//! Guest memory access that keeps tracking exact: every write applied here (a guest store that
//! exited, or a device write) reaches the tracker with its old bytes.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use pagetrack::{AsId, Gpa, PAGE_SIZE, Source, WriteEvent};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestAddressSpace, GuestMemory, Permissions};

use crate::error::{Error, Result};
use crate::vm::VmInner;

/// Applies `data` at `gpa` if the whole range is guest RAM, then reports it; false if not RAM.
pub(crate) fn apply_write(vm: &VmInner, gpa: u64, data: &[u8], source: Source) -> bool {
    let mem = vm.mem.memory();
    if !mem.check_range(GuestAddress(gpa), data.len(), Permissions::ReadWrite) {
        return false;
    }
    let tracker = &vm.tracker;
    let last = gpa + data.len() as u64 - 1;
    // Serialize with read-modify-writes that pagetrack completes on the same frames, and keep
    // event order per frame equal to memory order: held until the event is delivered.
    let _locks = vm
        .frame_locks
        .lock((gpa >> 12..=last >> 12).map(|f| f << 12));
    let pt = vm.page_table_entries(&mem, gpa, data.len());
    let any_tracked = tracker.is_enabled() && {
        (gpa / PAGE_SIZE..=last / PAGE_SIZE)
            .any(|f| tracker.is_write_tracked(AsId::NORMAL, pagetrack::Gfn(f)))
    };
    if !any_tracked {
        mem.write_slice(data, GuestAddress(gpa))
            .expect("the range was checked above, and `mem` holds its regions");
        vm.mark_dirty(gpa, data.len());
        vm.after_page_table_store(&mem, pt);
        // Still reported: a frame may have become tracked in between (report_write filters).
        tracker.report_write(&WriteEvent::new(Gpa(gpa), data, source));
        return true;
    }
    // A relaxed frame: its guest changes so far are delivered first, and its shadow takes
    // these bytes (`relaxed.rs`); held until this write's event is delivered.
    let mut relaxed = crate::relaxed::before_apply(vm, gpa, data.len() as u64);
    let mut small = [0u8; 64];
    let mut big = Vec::new();
    let old: &mut [u8] = if data.len() <= small.len() {
        &mut small[..data.len()]
    } else {
        big.resize(data.len(), 0);
        &mut big
    };
    mem.read_slice(old, GuestAddress(gpa))
        .expect("the range was checked above, and `mem` holds its regions");
    mem.write_slice(data, GuestAddress(gpa))
        .expect("the range was checked above, and `mem` holds its regions");
    crate::relaxed::after_apply(vm, &mut relaxed, gpa, old, data);
    vm.mark_dirty(gpa, data.len());
    vm.after_page_table_store(&mem, pt);
    tracker.report_write(&WriteEvent::new(Gpa(gpa), data, source).with_old(old));
    drop(relaxed);
    true
}

/// Reads guest RAM into `buf`; false if the range is not RAM.
pub(crate) fn read_ram(vm: &VmInner, gpa: u64, buf: &mut [u8]) -> bool {
    let mem = vm.mem.memory();
    mem.check_range(GuestAddress(gpa), buf.len(), Permissions::Read)
        && mem.read_slice(buf, GuestAddress(gpa)).is_ok()
}

/// Guest memory for device models (DMA) and the VMM, in vm-memory's `Bytes` style. Writes to
/// tracked frames produce events with [`Source::Device`], exactly like guest stores.
#[derive(Debug, Clone)]
pub struct TrackedMemory {
    vm: Arc<VmInner>,
}

impl TrackedMemory {
    pub(crate) fn new(vm: Arc<VmInner>) -> TrackedMemory {
        TrackedMemory { vm }
    }

    /// Writes `buf` at guest-physical `gpa`.
    ///
    /// # Errors
    /// [`Error::NotRam`] if any byte of the range is not guest RAM; nothing is written then.
    pub fn write_slice(&self, buf: &[u8], gpa: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if !apply_write(&self.vm, gpa, buf, Source::Device) {
            return Err(Error::NotRam {
                gpa,
                len: buf.len(),
            });
        }
        self.vm
            .backend
            .counters
            .device_writes
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Reads guest-physical `[gpa, gpa + buf.len())` into `buf`.
    ///
    /// # Errors
    /// [`Error::NotRam`] if any byte of the range is not guest RAM.
    pub fn read_slice(&self, buf: &mut [u8], gpa: u64) -> Result<()> {
        if read_ram(&self.vm, gpa, buf) {
            Ok(())
        } else {
            Err(Error::NotRam {
                gpa,
                len: buf.len(),
            })
        }
    }

    /// Writes a plain-data value at `gpa`.
    ///
    /// # Errors
    /// As [`write_slice`](Self::write_slice).
    pub fn write_obj<T: ByteValued>(&self, val: T, gpa: u64) -> Result<()> {
        self.write_slice(val.as_slice(), gpa)
    }

    /// Reads a plain-data value at `gpa`.
    ///
    /// # Errors
    /// As [`read_slice`](Self::read_slice).
    pub fn read_obj<T: ByteValued + Default>(&self, gpa: u64) -> Result<T> {
        let mut v = T::default();
        self.read_slice(v.as_mut_slice(), gpa)?;
        Ok(v)
    }

    /// True if every byte of the range is guest RAM.
    pub fn is_ram(&self, gpa: u64, len: usize) -> bool {
        self.vm
            .mem
            .memory()
            .check_range(GuestAddress(gpa), len, Permissions::ReadWrite)
    }
}
