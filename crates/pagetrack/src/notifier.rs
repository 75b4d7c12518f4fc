//! Write events, the notifier trait, and (with feature `notifiers`) the registry that delivers
//! events to registered notifiers with the kernel's guarantees (B24–B30, R3–R5).

use std::fmt;

use crate::addr::{AsId, Gfn, Gpa};

/// Who wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Source {
    /// A guest store by vCPU `n`.
    Vcpu(u32),
    /// A write by the VMM or one of its device models (DMA), through the backend's accessor.
    Device,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Vcpu(n) => write!(f, "vcpu {n}"),
            Source::Device => f.write_str("device"),
        }
    }
}

/// One write to guest memory, as delivered to [`TrackNotifier::track_write`].
///
/// Delivered events never span two 4 KiB frames ([`PageTracker::report_write`](crate::PageTracker::report_write)
/// splits them), and are delivered after guest memory was updated. The byte slices borrow the
/// backend's buffers: copy what you need to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteEvent<'a> {
    /// Address space of the write.
    pub as_id: AsId,
    /// First byte written.
    pub gpa: Gpa,
    /// The bytes written, in memory order.
    pub new: &'a [u8],
    /// The bytes they replaced, where the backend knows them (pagetrack-kvm always does).
    pub old: Option<&'a [u8]>,
    /// Who wrote.
    pub source: Source,
}

impl<'a> WriteEvent<'a> {
    /// An event in address space 0 without old bytes.
    pub fn new(gpa: Gpa, new: &'a [u8], source: Source) -> WriteEvent<'a> {
        WriteEvent {
            as_id: AsId::NORMAL,
            gpa,
            new,
            old: None,
            source,
        }
    }

    /// The same event with the replaced bytes (`old.len()` must equal `new.len()`).
    pub fn with_old(mut self, old: &'a [u8]) -> WriteEvent<'a> {
        self.old = Some(old);
        self
    }

    /// The same event in another address space.
    pub fn in_address_space(mut self, as_id: AsId) -> WriteEvent<'a> {
        self.as_id = as_id;
        self
    }

    /// The frame the event starts in.
    pub fn gfn(&self) -> Gfn {
        self.gpa.gfn()
    }

    /// Number of bytes written.
    pub fn len(&self) -> usize {
        self.new.len()
    }

    /// True for a zero-length write (never delivered).
    pub fn is_empty(&self) -> bool {
        self.new.is_empty()
    }
}

/// A consumer of write-tracking events (the kernel's `kvm_page_track_notifier_node`).
///
/// Both methods have empty defaults. They run on the writer's thread (a vCPU thread, or the
/// thread that made a device write or deleted a memslot), with no pagetrack lock held: they may
/// sleep and may call [`add_gfn`](crate::PageTracker::add_gfn)/[`remove_gfn`](crate::PageTracker::remove_gfn).
pub trait TrackNotifier: Send + Sync {
    /// A write to a tracked frame.
    fn track_write(&self, event: &WriteEvent<'_>) {
        let _ = event;
    }

    /// Slot `[base, base + npages)` of `as_id` was deleted: its counts are gone (R3 adds `as_id`).
    /// Delivered once, after the deletion can no longer fail (B46, K8). Must not change memslots.
    fn track_remove_region(&self, as_id: AsId, base: Gfn, npages: u64) {
        let _ = (as_id, base, npages);
    }
}

/// Which group a notifier is dispatched in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NotifierClass {
    /// Keeps a structure derived from guest memory coherent (a translation cache, a shadow
    /// table): dispatched before every ordinary notifier, like KVM's own MMU write hook.
    Coherence,
    /// Everything else.
    #[default]
    Ordinary,
}

/// How events reach a notifier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Delivery {
    /// One `track_write` per store (per page-sized piece of it), in delivery order.
    #[default]
    EachWrite,
}

/// Options for [`PageTracker::register`](crate::PageTracker::register).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct RegisterOptions {
    /// Dispatch group.
    pub class: NotifierClass,
    /// Delivery mode (room for coalesced summaries later).
    pub delivery: Delivery,
}

impl RegisterOptions {
    /// Options for a notifier of `class` with per-store delivery.
    pub fn new(class: NotifierClass) -> RegisterOptions {
        RegisterOptions {
            class,
            delivery: Delivery::EachWrite,
        }
    }
}

impl From<NotifierClass> for RegisterOptions {
    fn from(class: NotifierClass) -> RegisterOptions {
        RegisterOptions::new(class)
    }
}

#[cfg(feature = "notifiers")]
pub(crate) use registry::{Entry, Registry};

#[cfg(feature = "notifiers")]
mod registry {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Arc, Condvar, Mutex};

    use arc_swap::ArcSwap;

    use super::{NotifierClass, RegisterOptions, TrackNotifier};
    use crate::context;

    static NEXT_ID: AtomicU64 = AtomicU64::new(1);

    /// One registered notifier and its in-flight bookkeeping.
    pub(crate) struct Entry {
        pub(crate) id: u64,
        pub(crate) notifier: Arc<dyn TrackNotifier>,
        pub(crate) options: RegisterOptions,
        /// Callbacks of this entry running now.
        inflight: AtomicUsize,
        /// Set once unregistration started; pairs (SeqCst, Dekker-style) with `inflight`.
        removed: AtomicBool,
        idle: Mutex<()>,
        idle_cv: Condvar,
    }

    impl std::fmt::Debug for Entry {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Entry")
                .field("id", &self.id)
                .field("options", &self.options)
                .field("inflight", &self.inflight.load(Ordering::Relaxed))
                .finish_non_exhaustive()
        }
    }

    impl Entry {
        /// Runs `f` on the notifier unless unregistration has begun; marks the call in flight.
        #[inline]
        pub(crate) fn call(&self, tracker: u64, f: impl FnOnce(&dyn TrackNotifier)) {
            // SeqCst increment, then SeqCst load of `removed`: with unregister's SeqCst store of
            // `removed` then SeqCst load of `inflight`, at least one side sees the other.
            self.inflight.fetch_add(1, Ordering::SeqCst);
            if !self.removed.load(Ordering::SeqCst) {
                let _frame = context::CallbackFrame::enter(tracker, self.id);
                f(&*self.notifier);
            }
            let before = self.inflight.fetch_sub(1, Ordering::SeqCst);
            if before == 1 && self.removed.load(Ordering::SeqCst) {
                // Take the lock so the waiter is either before its check or inside wait().
                let _g = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                self.idle_cv.notify_all();
            }
        }

        /// Stops new calls and waits until at most `own` calls (those of this thread) remain.
        pub(crate) fn retire(&self, own: usize) {
            self.removed.store(true, Ordering::SeqCst);
            let mut g = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            while self.inflight.load(Ordering::SeqCst) > own {
                g = self.idle_cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    /// The notifier list: an `ArcSwap` snapshot for readers (the kernel's `track_srcu`) and a
    /// writer mutex (its `mmu_lock`).
    #[derive(Debug, Default)]
    pub(crate) struct Registry {
        list: ArcSwap<Vec<Arc<Entry>>>,
        writer: Mutex<()>,
    }

    impl Registry {
        pub(crate) fn insert(
            &self,
            notifier: Arc<dyn TrackNotifier>,
            options: RegisterOptions,
        ) -> Arc<Entry> {
            let entry = Arc::new(Entry {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                notifier,
                options,
                inflight: AtomicUsize::new(0),
                removed: AtomicBool::new(false),
                idle: Mutex::new(()),
                idle_cv: Condvar::new(),
            });
            let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            let cur = self.list.load();
            let mut next: Vec<Arc<Entry>> = Vec::with_capacity(cur.len() + 1);
            // Coherence consumers first, then ordinary ones; newest first inside each (B26).
            let coherence = |e: &Arc<Entry>| e.options.class == NotifierClass::Coherence;
            if options.class == NotifierClass::Coherence {
                next.push(Arc::clone(&entry));
                next.extend(cur.iter().cloned());
            } else {
                next.extend(cur.iter().filter(|e| coherence(e)).cloned());
                next.push(Arc::clone(&entry));
                next.extend(cur.iter().filter(|e| !coherence(e)).cloned());
            }
            self.list.store(Arc::new(next));
            entry
        }

        pub(crate) fn unlink(&self, id: u64) {
            let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            let cur = self.list.load();
            let next: Vec<Arc<Entry>> = cur.iter().filter(|e| e.id != id).cloned().collect();
            self.list.store(Arc::new(next));
        }

        #[inline]
        pub(crate) fn snapshot(&self) -> arc_swap::Guard<Arc<Vec<Arc<Entry>>>> {
            self.list.load()
        }

        #[inline]
        pub(crate) fn is_empty(&self) -> bool {
            self.list.load().is_empty()
        }

        pub(crate) fn len(&self) -> usize {
            self.list.load().len()
        }
    }
}
