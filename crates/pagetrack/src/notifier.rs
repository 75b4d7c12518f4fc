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
    /// Guest stores whose writer is not known: a coalesced event
    /// ([`WriteEvent::coalesced`]) found by a dirty-log diff, which says only that some vCPU
    /// (or KVM itself on the guest's behalf) changed these bytes during its epoch.
    Guest,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Vcpu(n) => write!(f, "vcpu {n}"),
            Source::Device => f.write_str("device"),
            Source::Guest => f.write_str("guest"),
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
    /// `Some(epoch)` for a coalesced event: the net change of these bytes during relaxed
    /// epoch `epoch` of a backend that diffs a dirty log against a shadow copy (pagetrack-kvm's
    /// relaxed mode). `old` is the value at the previous sync, `new` the value read at this
    /// one: intermediate values, the store count and size, the exact writer and the order
    /// inside the epoch are lost. `None` (every event of a strict frame) is an exact event:
    /// one store, as it happened. Only notifiers registered with [`Delivery::Coalesced`]
    /// make a backend relax frames; see [`Delivery`].
    pub coalesced: Option<u64>,
    /// For a coalesced event, the vCPU that dirtied its frame first during the epoch, where
    /// the backend knows it (pagetrack-kvm's dirty ring: the vCPU whose ring logged the
    /// frame, when only one did); `None` otherwise (the dirty bitmap says no writer, and
    /// every exact event names its writer in [`WriteEvent::source`]). A hint, not the writer
    /// of these bytes: later stores in the epoch, by any vCPU, are not logged.
    pub first_writer: Option<u32>,
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
            coalesced: None,
            first_writer: None,
        }
    }

    /// The same event marked coalesced, belonging to relaxed epoch `epoch` (see
    /// [`WriteEvent::coalesced`]).
    pub fn in_epoch(mut self, epoch: u64) -> WriteEvent<'a> {
        self.coalesced = Some(epoch);
        self
    }

    /// The same event with vCPU `vcpu` as the first writer of its frame in the epoch (see
    /// [`WriteEvent::first_writer`]).
    pub fn first_written_by(mut self, vcpu: u32) -> WriteEvent<'a> {
        self.first_writer = Some(vcpu);
        self
    }

    /// True for a coalesced event (see [`WriteEvent::coalesced`]).
    pub fn is_coalesced(&self) -> bool {
        self.coalesced.is_some()
    }

    /// The same event with the replaced bytes.
    ///
    /// # Panics
    /// If `old.len() != new.len()`: old bytes of another length cannot describe this write,
    /// and dropping them silently would hide a backend bug.
    pub fn with_old(mut self, old: &'a [u8]) -> WriteEvent<'a> {
        assert_eq!(
            old.len(),
            self.new.len(),
            "WriteEvent::with_old: {} old bytes for a {}-byte write",
            old.len(),
            self.new.len()
        );
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
    /// table): dispatched before every ordinary notifier, so that ordinary notifiers already
    /// see the structure updated. (KVM calls its own MMU write hook, `kvm_mmu_track_write`,
    /// *after* the external notifiers; pagetrack runs coherence consumers first on purpose.)
    Coherence,
    /// Everything else.
    #[default]
    Ordinary,
}

/// How events reach a notifier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Delivery {
    /// One `track_write` per store (per page-sized piece of it), in delivery order. A
    /// notifier registered this way needs exact events: while it is registered, a backend
    /// keeps every frame strict ([`PageTracker::accepts_coalesced`](crate::PageTracker::accepts_coalesced)
    /// is false).
    #[default]
    EachWrite,
    /// Exact events, and also coalesced ones ([`WriteEvent::coalesced`]) for frames a backend
    /// runs relaxed. Frames may be relaxed only while every registered notifier accepts this.
    /// A notifier registered `EachWrite` while frames are relaxed may still see coalesced
    /// events (marked) until the backend's next sync point returns them to strict mode: never
    /// fewer changes, only coarser ones.
    Coalesced,
}

/// Options for [`PageTracker::register`](crate::PageTracker::register).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct RegisterOptions {
    /// Dispatch group.
    pub class: NotifierClass,
    /// Delivery mode.
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

impl RegisterOptions {
    /// The same options with `delivery`.
    pub fn with_delivery(mut self, delivery: Delivery) -> RegisterOptions {
        self.delivery = delivery;
        self
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
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use arc_swap::ArcSwap;

    use super::{NotifierClass, RegisterOptions, TrackNotifier};
    use crate::context;
    use crate::sync::{
        AtomicBool, AtomicUsize, Condvar, Mutex, dekker, dekker_fence, fence, lock, wait,
    };

    static NEXT_ID: AtomicU64 = AtomicU64::new(1);

    /// One registered notifier and its in-flight bookkeeping.
    ///
    /// The protocol (model-checked with `loom`, `src/loom.rs`): a call increments `inflight`,
    /// then runs the callback only if `removed` is still clear; retiring sets `removed`, then
    /// waits until `inflight` is at most the number of calls of the retiring thread itself.
    /// Both sides are a Dekker pair (`SeqCst` accesses, or the loom build's fences: see
    /// `sync::dekker`), so either the call sees `removed` (and skips the callback) or the
    /// retirer sees the call in flight. Every
    /// decrement made while `removed` is set wakes the retirer (not only the one that reaches
    /// 0: a retirer inside its own callback waits for `inflight == 1`), and the decrement runs
    /// in a drop guard, so a panicking callback is accounted for too.
    pub(crate) struct Entry {
        pub(crate) id: u64,
        pub(crate) notifier: Arc<dyn TrackNotifier>,
        pub(crate) options: RegisterOptions,
        /// Callbacks of this entry running now (or about to check `removed`).
        inflight: AtomicUsize,
        /// Set once unregistration started.
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

    /// Ends one in-flight call when dropped, on return and on unwind alike.
    struct InFlight<'a>(&'a Entry);

    impl Drop for InFlight<'_> {
        fn drop(&mut self) {
            let e = self.0;
            // Release (at least): the callback's effects happen before the retirer's Acquire
            // load. Dekker with `retire` on `removed` / `inflight` (see `sync::dekker`): the
            // retirer sees this decrement, or this thread sees `removed` and wakes it.
            e.inflight.fetch_sub(1, dekker(Ordering::Release));
            dekker_fence();
            if e.removed.load(dekker(Ordering::Relaxed)) {
                // Under the lock: the retirer is either before its check or inside wait().
                let _g = lock(&e.idle);
                e.idle_cv.notify_all();
            }
        }
    }

    impl Entry {
        pub(crate) fn new(notifier: Arc<dyn TrackNotifier>, options: RegisterOptions) -> Entry {
            Entry {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                notifier,
                options,
                inflight: AtomicUsize::new(0),
                removed: AtomicBool::new(false),
                idle: Mutex::new(()),
                idle_cv: Condvar::new(),
            }
        }

        /// Runs `f` on the notifier unless unregistration has begun; marks the call in flight.
        /// A panic in `f` propagates after the accounting is restored.
        #[inline]
        pub(crate) fn call(&self, tracker: u64, f: impl FnOnce(&dyn TrackNotifier)) {
            // Dekker with `retire` (see `sync::dekker`): this call sees `removed`, or the
            // retirer sees it in flight.
            self.inflight.fetch_add(1, dekker(Ordering::Relaxed));
            let _inflight = InFlight(self);
            dekker_fence();
            if !self.removed.load(dekker(Ordering::Relaxed)) {
                let _frame = context::CallbackFrame::enter(tracker, self.id);
                f(&*self.notifier);
            }
        }

        /// Stops new calls without waiting for running ones.
        pub(crate) fn stop(&self) {
            // Dekker with `call`: a call that misses this store was in flight. (The fence is
            // the loom form's; this path is cold.)
            self.removed.store(true, dekker(Ordering::Relaxed));
            fence(Ordering::SeqCst);
        }

        /// Stops new calls and waits until at most `own` calls (those of this thread) remain.
        pub(crate) fn retire(&self, own: usize) {
            // Dekker with `call` and with `InFlight::drop` (see `sync::dekker`; the fence is
            // the loom form's, this path is cold).
            self.removed.store(true, dekker(Ordering::Relaxed));
            fence(Ordering::SeqCst);
            let mut g = lock(&self.idle);
            // Acquire (at least) pairs with the decrement in `InFlight::drop`.
            while self.inflight.load(dekker(Ordering::Acquire)) > own {
                g = wait(&self.idle_cv, g);
            }
        }
    }

    /// The notifier list: an `ArcSwap` snapshot for readers (the kernel's `track_srcu`) and a
    /// writer mutex (its `mmu_lock`).
    #[derive(Debug, Default)]
    pub(crate) struct Registry {
        list: ArcSwap<Vec<Arc<Entry>>>,
        writer: std::sync::Mutex<()>,
    }

    impl Registry {
        pub(crate) fn insert(&self, entry: Arc<Entry>) {
            let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            let cur = self.list.load();
            let mut next: Vec<Arc<Entry>> = Vec::with_capacity(cur.len() + 1);
            // Coherence consumers first, then ordinary ones; newest first inside each (B26).
            let coherence = |e: &Arc<Entry>| e.options.class == NotifierClass::Coherence;
            if entry.options.class == NotifierClass::Coherence {
                next.push(entry);
                next.extend(cur.iter().cloned());
            } else {
                next.extend(cur.iter().filter(|e| coherence(e)).cloned());
                next.push(entry);
                next.extend(cur.iter().filter(|e| !coherence(e)).cloned());
            }
            self.list.store(Arc::new(next));
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
