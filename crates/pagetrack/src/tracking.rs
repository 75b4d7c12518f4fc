//! The consumer's view of a tracker: what a user of write tracking may do (track, untrack,
//! register notifiers, ask), without the owner's half (memslot changes, reporting writes).

use std::sync::Arc;

use crate::addr::{AsId, Gfn, PageLevel};
use crate::error::Result;
use crate::memslot::Memslots;
use crate::track::{PageTracker, TrackerConfig, TrackerStats};
#[cfg(feature = "notifiers")]
use crate::{notifier::RegisterOptions, notifier::TrackNotifier, track::NotifierHandle};

/// A [`PageTracker`] as its consumers see it: track and untrack frames, register notifiers,
/// query counts and statistics. Cheap to clone.
///
/// The owner's half is not here: [`PageTracker::set_memory_region`] (memslots mirror what the
/// backend registered with the hypervisor, and only the backend may change them) and
/// [`PageTracker::report_write`] / [`PageTracker::reader`] (writes are reported by whoever
/// applied them). A backend that owns its tracker (pagetrack-kvm's `Vm`) hands out this
/// view, so a consumer cannot desynchronise the core from what the backend enforces.
///
/// ```
/// use std::sync::Arc;
/// use pagetrack::{Gfn, MemoryRegion, NoEnforcement, PageTracker, SlotId, Tracking, TrackerConfig};
///
/// let owner = PageTracker::new(TrackerConfig::default(), Arc::new(NoEnforcement));
/// owner.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 16))?;
/// let view = Tracking::new(Arc::clone(&owner)); // what consumers get
/// view.enable_write_tracking()?;
/// view.add_gfn(Gfn(3))?;
/// assert!(view.is_write_tracked(pagetrack::AsId::NORMAL, Gfn(3)));
/// # Ok::<(), pagetrack::Error>(())
/// ```
///
/// Reporting is the owner's too:
///
/// ```compile_fail,E0599
/// use pagetrack::{Gpa, Source, Tracking, WriteEvent};
/// fn forge(view: &Tracking) {
///     view.report_write(&WriteEvent::new(Gpa(0x3000), &[1], Source::Device));
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Tracking {
    tracker: Arc<PageTracker>,
}

impl Tracking {
    /// The consumer view of `tracker` (for its owner to hand out).
    pub fn new(tracker: Arc<PageTracker>) -> Tracking {
        Tracking { tracker }
    }

    /// [`PageTracker::register`].
    ///
    /// # Errors
    /// As [`PageTracker::register`].
    #[cfg(feature = "notifiers")]
    pub fn register(
        &self,
        notifier: Arc<dyn TrackNotifier>,
        options: impl Into<RegisterOptions>,
    ) -> Result<NotifierHandle> {
        self.tracker.register(notifier, options)
    }

    /// [`PageTracker::add_gfn`].
    ///
    /// # Errors
    /// As [`PageTracker::add_gfn`].
    pub fn add_gfn(&self, gfn: Gfn) -> Result<()> {
        self.tracker.add_gfn(gfn)
    }

    /// [`PageTracker::remove_gfn`].
    ///
    /// # Errors
    /// As [`PageTracker::remove_gfn`].
    pub fn remove_gfn(&self, gfn: Gfn) -> Result<()> {
        self.tracker.remove_gfn(gfn)
    }

    /// [`PageTracker::add_gfns`].
    ///
    /// # Errors
    /// As [`PageTracker::add_gfns`].
    pub fn add_gfns(&self, as_id: AsId, gfns: &[Gfn]) -> Result<()> {
        self.tracker.add_gfns(as_id, gfns)
    }

    /// [`PageTracker::remove_gfns`].
    ///
    /// # Errors
    /// As [`PageTracker::remove_gfns`].
    pub fn remove_gfns(&self, as_id: AsId, gfns: &[Gfn]) -> Result<()> {
        self.tracker.remove_gfns(as_id, gfns)
    }

    /// [`PageTracker::add_range`].
    ///
    /// # Errors
    /// As [`PageTracker::add_range`].
    pub fn add_range(&self, as_id: AsId, first: Gfn, n: u64) -> Result<()> {
        self.tracker.add_range(as_id, first, n)
    }

    /// [`PageTracker::remove_range`].
    ///
    /// # Errors
    /// As [`PageTracker::remove_range`].
    pub fn remove_range(&self, as_id: AsId, first: Gfn, n: u64) -> Result<()> {
        self.tracker.remove_range(as_id, first, n)
    }

    /// [`PageTracker::enable_write_tracking`].
    ///
    /// # Errors
    /// As [`PageTracker::enable_write_tracking`].
    pub fn enable_write_tracking(&self) -> Result<()> {
        self.tracker.enable_write_tracking()
    }

    /// [`PageTracker::track_count`].
    ///
    /// # Errors
    /// As [`PageTracker::track_count`].
    pub fn track_count(&self, as_id: AsId, gfn: Gfn) -> Result<u16> {
        self.tracker.track_count(as_id, gfn)
    }

    /// [`PageTracker::is_write_tracked`].
    pub fn is_write_tracked(&self, as_id: AsId, gfn: Gfn) -> bool {
        self.tracker.is_write_tracked(as_id, gfn)
    }

    /// [`PageTracker::max_mapping_level`].
    ///
    /// # Errors
    /// As [`PageTracker::max_mapping_level`].
    pub fn max_mapping_level(&self, as_id: AsId, gfn: Gfn) -> Result<PageLevel> {
        self.tracker.max_mapping_level(as_id, gfn)
    }

    /// [`PageTracker::is_enabled`].
    pub fn is_enabled(&self) -> bool {
        self.tracker.is_enabled()
    }

    /// [`PageTracker::in_callback`].
    pub fn in_callback(&self) -> bool {
        self.tracker.in_callback()
    }

    /// [`PageTracker::write_track_bytes`].
    pub fn write_track_bytes(&self) -> usize {
        self.tracker.write_track_bytes()
    }

    /// [`PageTracker::memslots`] (a read-only snapshot).
    pub fn memslots(&self) -> Arc<Memslots> {
        self.tracker.memslots()
    }

    /// [`PageTracker::config`].
    pub fn config(&self) -> TrackerConfig {
        self.tracker.config()
    }

    /// [`PageTracker::stats`].
    pub fn stats(&self) -> TrackerStats {
        self.tracker.stats()
    }

    /// [`PageTracker::has_external_user`].
    pub fn has_external_user(&self) -> bool {
        self.tracker.has_external_user()
    }

    /// [`PageTracker::notifier_count`].
    pub fn notifier_count(&self) -> usize {
        self.tracker.notifier_count()
    }

    /// [`PageTracker::external_tracking_enabled`].
    pub fn external_tracking_enabled(&self) -> bool {
        self.tracker.external_tracking_enabled()
    }
}
