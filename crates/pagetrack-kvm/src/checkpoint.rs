//! Snapshot reset (`docs/RELAXED.md`, "Checkpoint and restore"): [`Vm::checkpoint`] keeps an
//! image of all guest RAM, and [`Vm::restore`] writes back exactly the pages written since,
//! as a snapshot fuzzer does between runs.
//!
//! Which pages were written since the checkpoint is known from the dirty log, shared with
//! the VMM's ([`DirtyBits`] has one bit set per consumer): KVM's log of every writable
//! fragment (guest stores to untracked and relaxed frames, and KVM's own writes), harvested
//! into both; and the stores pagetrack applies in userspace (trapped stores to strict
//! frames, stores it completes, device writes through [`crate::TrackedMemory`]), marked in
//! both. So the VM needs [`crate::VmConfig::with_dirty_log`].
//!
//! The image is an eager copy of every RAM region, taken with the vCPUs paused. A lazy
//! copy-on-first-write would need the first store to each page to exit to userspace before it
//! lands; KVM's dirty logging write-protects pages in the kernel and handles their first
//! write there (the log only says afterwards that it happened), so the old bytes are gone
//! by the time pagetrack learns of the store. Trapping every page instead (read-only
//! memslots) costs an exit per first store (about 20 µs here) on every page of every run.
//! The eager copy costs one pass over RAM per checkpoint (`docs/PERFORMANCE.md`), and a
//! fuzzer takes one checkpoint and restores it many times.
//!
//! A restore is a write by the VMM, applied through the one tracked write path
//! (`memory::apply_write`): frame locks, old bytes, relaxed shadows settled, page-table
//! coherence, the VMM's dirty log, and an exact event with [`pagetrack::Source::Device`] for tracked
//! frames. On shadow-paging hosts KVM may shadow any restored page as a guest page table
//! and does not see userspace writes, so the fragments of restored frames are re-created
//! ([`crate::Vm::invalidate_translations`]'s mechanism), whatever the frames hold.

use std::sync::Arc;

use pagetrack::{AsId, Gfn, SlotId};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use crate::dirty::DirtyBits;
use crate::error::{Error, Result};
use crate::vm::{Vm, VmInner};

const PAGE: u64 = 4096;
const PAGE_BYTES: usize = 4096;

/// The checkpoint of a VM: one image per RAM region.
#[derive(Debug)]
pub(crate) struct Image {
    regions: Vec<RegionImage>,
}

#[derive(Debug)]
struct RegionImage {
    slot: SlotId,
    gpa: u64,
    /// The region's dirty log (identity: a region removed and added again has a new one).
    log: Arc<DirtyBits>,
    bytes: Vec<u8>,
}

/// What [`Vm::checkpoint`] took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckpointReport {
    /// RAM regions in the image.
    pub regions: usize,
    /// Bytes copied (all guest RAM).
    pub bytes: u64,
}

/// What [`Vm::restore`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreReport {
    /// Pages the dirty log said were written since the checkpoint (or the last restore).
    pub dirty_pages: u64,
    /// Pages among them written back: every untracked one (whole, without comparing
    /// first), and the tracked ones whose bytes differed from the image.
    pub restored_pages: u64,
    /// Bytes written back (whole pages for untracked frames; the changed 8-byte words for
    /// tracked ones, one event per run of them).
    pub restored_bytes: u64,
    /// KVM memslot fragments re-created so that KVM drops shadows of restored frames
    /// (shadow-paging hosts only; 0 on TDP hosts).
    pub invalidated_fragments: usize,
}

/// Which KVM shadows a restore drops on shadow-paging hosts ([`Vm::restore_with`]).
/// Nothing is dropped on TDP hosts, where KVM shadows no guest page table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Invalidate {
    /// The fragments of every restored frame are re-created (KVM may shadow any of them as
    /// a guest page table, and does not see userspace writes): always correct, at the cost
    /// of one memslot delete and create per fragment touched (`docs/PERFORMANCE.md`) and
    /// the guest's refaults in them.
    #[default]
    Restored,
    /// Only frames marked as page tables ([`Vm::mark_page_tables`],
    /// [`Vm::mark_page_table_tree`]) are checked, as for every store pagetrack applies. Correct
    /// only if every frame that held a guest page table since the checkpoint is marked and
    /// tracked (so that pagetrack sees the guest's stores to it, and marks the tables it
    /// installs); an unmarked page table restored keeps KVM's stale shadow.
    MarkedTables,
}

impl Vm {
    /// Takes a checkpoint: an image of all guest RAM now, which [`Vm::restore`] puts back.
    /// It replaces the previous checkpoint. With every vCPU paused (and no store completion
    /// in progress, as for [`Vm::page_table_update`]): relaxed frames are synced (their
    /// coalesced events are delivered, so the event stream is cut at the checkpoint), every
    /// fragment's dirty log is harvested into the VMM's log and the checkpoint's, the
    /// checkpoint's is cleared, then RAM is copied. The VMM's own dirty log
    /// ([`Vm::take_dirty_log`]) loses nothing.
    ///
    /// The image is an eager copy (a lazy one needs write faults that dirty logging does not
    /// give): it costs the RAM's size in memory and one pass over it.
    ///
    /// ```no_run
    /// use pagetrack_kvm::{Vm, VmConfig};
    /// use vm_memory::{Bytes, GuestAddress};
    ///
    /// let vm = Vm::new(VmConfig::default().with_ram(16 << 20).with_dirty_log())?;
    /// vm.add_ram(0, 16 << 20)?;
    /// // ... load the target, run it to the point to fuzz from ...
    /// vm.checkpoint()?;
    /// for input in [&b"first"[..], b"second"] {
    ///     vm.memory().write_slice(input, GuestAddress(0x8000))?; // tracked, and logged
    ///     // ... set the vCPU registers saved at the checkpoint, run the vCPUs ...
    ///     let r = vm.restore()?; // vCPUs paused: RAM is the checkpoint's again
    ///     println!("restored {} of {} dirty pages", r.restored_pages, r.dirty_pages);
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// Writes that bypass tracking ([`Vm::untracked_memory`], the VMM's own mapping of a
    /// region from [`Vm::add_region`]) are not in the dirty log and are not restored; vCPU
    /// registers and device state are the VMM's to save.
    ///
    /// # Errors
    /// [`Error::DirtyLogOff`] without [`crate::VmConfig::with_dirty_log`];
    /// [`pagetrack::Error::InCallback`] from inside a notifier; [`Error::CheckpointAlloc`];
    /// a failed `KVM_GET_DIRTY_LOG`. The previous checkpoint is kept on error.
    pub fn checkpoint(&self) -> Result<CheckpointReport> {
        checkpoint(&self.inner)
    }

    /// Puts back the checkpoint's bytes in every page written since [`Vm::checkpoint`] (or
    /// since the last restore), with every vCPU paused; the checkpoint stays, so restores
    /// repeat (a fuzzer's loop). Exact for untracked, strict and relaxed frames:
    ///
    /// - The written pages are the dirty log's (harvested first, shared with the VMM's log,
    ///   which gets the restored pages too: they were written).
    /// - Relaxed frames are synced first, so their coalesced events come before the
    ///   restore's, and their shadows take the restored bytes.
    /// - Each restored run of bytes in a tracked frame is an exact event with its old bytes
    ///   and [`pagetrack::Source::Device`] (a restore is the VMM writing guest memory, as a device
    ///   write through [`Vm::memory`] is); untracked pages are written whole.
    /// - Frames marked as page tables ([`Vm::mark_page_tables`]) are checked as for any
    ///   store pagetrack applies, and on shadow-paging hosts the fragments of all restored
    ///   frames are re-created, so KVM drops any shadow of a restored page table
    ///   ([`Invalidate::Restored`]; [`Vm::restore_with`] can skip this).
    ///
    /// Call it between runs, not from inside an [`crate::ExitHandler`]'s `run`/`handle`
    /// pair nor from a notifier.
    ///
    /// # Errors
    /// [`Error::DirtyLogOff`]; [`Error::NoCheckpoint`]; [`Error::CheckpointStale`] if a RAM
    /// region was added or removed since the checkpoint; [`pagetrack::Error::InCallback`];
    /// a failed `KVM_GET_DIRTY_LOG` or relaxed sync (nothing written yet). A failure
    /// re-creating fragments afterwards is returned once memory is restored.
    pub fn restore(&self) -> Result<RestoreReport> {
        restore(&self.inner, Invalidate::Restored)
    }

    /// [`Vm::restore`], choosing which KVM translations are dropped afterwards on
    /// shadow-paging hosts ([`Invalidate`]).
    ///
    /// # Errors
    /// As [`Vm::restore`].
    pub fn restore_with(&self, invalidate: Invalidate) -> Result<RestoreReport> {
        restore(&self.inner, invalidate)
    }

    /// Drops the checkpoint (and its memory); true if there was one.
    pub fn discard_checkpoint(&self) -> bool {
        lock(&self.inner).take().is_some()
    }
}

fn lock(vm: &VmInner) -> std::sync::MutexGuard<'_, Option<Image>> {
    vm.checkpoint.lock().unwrap_or_else(|e| e.into_inner())
}

fn refuse_unless_usable(vm: &VmInner, op: &'static str) -> Result<()> {
    if !vm.dirty_log() {
        return Err(Error::DirtyLogOff);
    }
    if vm.tracker.in_callback() {
        return Err(pagetrack::Error::InCallback { op }.into());
    }
    Ok(())
}

/// Harvests KVM's dirty log of every fragment of every region into both consumers.
fn harvest_all(vm: &VmInner, gpas: &[u64]) -> Result<()> {
    let mut frags = vm.backend.frags();
    for &gpa in gpas {
        frags.harvest(&vm.backend.vm_fd, gpa)?;
    }
    Ok(())
}

fn checkpoint(vm: &VmInner) -> Result<CheckpointReport> {
    refuse_unless_usable(vm, "checkpoint")?;
    let mut slot = lock(vm);
    let rams = vm.rams();
    let mut regions = Vec::with_capacity(rams.len());
    for r in rams.iter() {
        let mut bytes = Vec::new();
        let len = usize::try_from(r.size).expect("a mapped region's size fits usize");
        bytes
            .try_reserve_exact(len)
            .map_err(|source| Error::CheckpointAlloc {
                bytes: r.size,
                source,
            })?;
        bytes.resize(len, 0);
        regions.push(RegionImage {
            slot: r.slot,
            gpa: r.gpa,
            log: Arc::clone(
                r.dirty
                    .as_ref()
                    .expect("every region has a log when dirty logging is on"),
            ),
            bytes,
        });
    }
    let gpas: Vec<u64> = regions.iter().map(|r| r.gpa).collect();
    let _update = vm.backend.updates.update(&vm.backend.gate);
    crate::relaxed::sync(vm)?;
    // Harvest (and re-protect) first, then clear the checkpoint's bits, then copy: a write
    // that lands after the clear is logged again, and one before it is in the copy.
    harvest_all(vm, &gpas)?;
    let mem = vm.mem.memory();
    let mut total = 0;
    for img in &mut regions {
        img.log.take_since_checkpoint();
        mem.read_slice(&mut img.bytes, GuestAddress(img.gpa))
            .expect("the region is RAM: the regions are locked");
        total += img.bytes.len() as u64;
    }
    let report = CheckpointReport {
        regions: regions.len(),
        bytes: total,
    };
    *slot = Some(Image { regions });
    Ok(report)
}

/// The maximal runs `[start, end)` (in bytes, 8-byte aligned) of words where `a` and `b`
/// differ.
fn changed_runs(a: &[u8], b: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, (x, y)) in a.chunks_exact(8).zip(b.chunks_exact(8)).enumerate() {
        if x == y {
            continue;
        }
        match runs.last_mut() {
            Some(r) if r.1 == i * 8 => r.1 += 8,
            _ => runs.push((i * 8, i * 8 + 8)),
        }
    }
    runs
}

fn restore(vm: &VmInner, invalidate: Invalidate) -> Result<RestoreReport> {
    refuse_unless_usable(vm, "restore")?;
    let slot = lock(vm);
    let image = slot.as_ref().ok_or(Error::NoCheckpoint)?;
    let rams = vm.rams();
    let same = rams.len() == image.regions.len()
        && rams.iter().zip(&image.regions).all(|(r, i)| {
            r.slot == i.slot
                && r.gpa == i.gpa
                && r.dirty.as_ref().is_some_and(|d| Arc::ptr_eq(d, &i.log))
        });
    if !same {
        return Err(Error::CheckpointStale {
            reason: "a RAM region was added or removed since the checkpoint",
        });
    }
    let gpas: Vec<u64> = image.regions.iter().map(|r| r.gpa).collect();
    let _update = vm.backend.updates.update(&vm.backend.gate);
    // Every written page is in the logs, and the relaxed frames' changes are delivered
    // (their shadows equal memory), before anything is written back.
    harvest_all(vm, &gpas)?;
    crate::relaxed::sync(vm)?;
    let mut report = RestoreReport::default();
    let mut restored: Vec<u64> = Vec::new();
    let mut now = [0u8; PAGE_BYTES];
    // The restore's own writes mark only the VMM's log (the bytes are the checkpoint's). A
    // device write racing the restore marks both: if it lands before the restore's write of
    // its page, that page is looked at again by the next restore (and found equal); if
    // after, it is restored then.
    for img in &image.regions {
        let dirty = img.log.take_since_checkpoint();
        for page in crate::dirty::set_bits(&dirty) {
            report.dirty_pages += 1;
            let gpa = img.gpa + page * PAGE;
            let off = usize::try_from(page * PAGE).expect("inside the image");
            let want = &img.bytes[off..off + PAGE_BYTES];
            if !vm.tracker.is_write_tracked(AsId::NORMAL, Gfn(gpa / PAGE)) {
                // No event to build: the whole page, without comparing first.
                write(vm, gpa, want);
                report.restored_pages += 1;
                report.restored_bytes += PAGE;
                restored.push(gpa);
                continue;
            }
            vm.mem
                .memory()
                .read_slice(&mut now, GuestAddress(gpa))
                .expect("the region is RAM: the regions are locked");
            let runs = changed_runs(&now, want);
            if runs.is_empty() {
                continue;
            }
            report.restored_pages += 1;
            restored.push(gpa);
            for (a, b) in runs {
                write(vm, gpa + a as u64, &want[a..b]);
                report.restored_bytes += (b - a) as u64;
            }
        }
    }
    if invalidate == Invalidate::Restored && vm.caps.shadow_paging && !restored.is_empty() {
        report.invalidated_fragments = vm.backend.frags().recreate(&vm.backend.vm_fd, &restored)?;
    }
    Ok(report)
}

/// Writes `data` at `gpa` through the tracked write path, as a device write.
fn write(vm: &VmInner, gpa: u64, data: &[u8]) {
    let ram = crate::memory::apply_restore(vm, gpa, data);
    assert!(ram, "the region is RAM: the regions are locked");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_lists_set_bits_in_order() {
        let got: Vec<u64> = crate::dirty::set_bits(&[0b1001, 0, 1 << 63]).collect();
        assert_eq!(got, vec![0, 3, 191]);
    }

    #[test]
    fn changed_runs_of_equal_pages_are_empty() {
        let a = [7u8; 64];
        assert!(changed_runs(&a, &a).is_empty());
    }

    #[test]
    fn changed_runs_merge_adjacent_words_and_split_at_equal_ones() {
        let a = [0u8; 64];
        let mut b = a;
        b[1] = 1; // word 0
        b[15] = 1; // word 1
        b[40] = 1; // word 5
        assert_eq!(changed_runs(&a, &b), vec![(0, 16), (40, 48)]);
    }
}
