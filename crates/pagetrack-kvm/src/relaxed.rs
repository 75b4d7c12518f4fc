//! Relaxed mode: hot tracked frames without a trap per store (`docs/RELAXED.md`).
//!
//! A *strict* frame lies in a read-only fragment: every guest store exits and is an exact
//! event. A *relaxed* frame lies in a writable fragment with `KVM_MEM_LOG_DIRTY_PAGES`, and
//! pagetrack keeps a shadow copy of it: at a sync the frames KVM logged dirty are diffed
//! against their shadows and delivered as coalesced events ([`pagetrack::WriteEvent::coalesced`],
//! old bytes from the shadow, new bytes from memory, source [`pagetrack::Source::Guest`]).
//!
//! The sync protocol (design note 3.7): **harvest and re-protect, then read and diff**. Plain
//! `KVM_GET_DIRTY_LOG` does both in one step inside the ioctl (it write-protects exactly the
//! pages it reports, and flushes TLBs, before returning); with manual protect
//! ([`crate::DirtyProtect`]) `KVM_CLEAR_DIRTY_LOG` of exactly the harvested bits follows the
//! GET, before any diff. Either way a store that lands after the re-protect is logged again
//! and found by the next sync; a store before it is visible to the diff. Diffing first would
//! lose a store made between the diff and the re-protect.
//!
//! Cold demotion (auto policy, `cooling.rs`): at sync points, relaxed frames that stayed
//! clean long enough are demoted like a pin demotes them, after a final sync.
//!
//! Mode switches happen with every vCPU paused (the gate):
//! - strict → relaxed: the frame is read-only (or untracked) until the switch, so its memory
//!   holds every change already reported; the shadow is copied from it while paused, then
//!   the fragment becomes writable and logged.
//! - relaxed → strict: paused, a final sync (harvest, diff, deliver), then the fragment
//!   becomes read-only and the shadow goes.
//!
//! Locks, in order: the sync lock, a frame's stripe lock (`store.rs`), the fragment table,
//! the shadows. A write pagetrack applies to a relaxed frame takes the sync lock before the
//! stripes ([`lock_for_write`]: the delivering thread holds the sync lock and its notifier
//! may write memory); a promotion takes stripes but not the sync lock. Stores pagetrack
//! emulates take it before their stripes too (`VmInner::lock_for_store`, for relaxed frames
//! a squeezed layout made read-only), so [`applied`] runs under it. Events are delivered
//! with the sync lock held (so batches and device writes to relaxed frames are delivered in
//! memory order), never with the fragment table or shadows locked.

use std::cell::Cell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use pagetrack::{FrameRun, Gpa, PageTracker, Source, WriteEvent};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use crate::error::{Error, Result};
use crate::slots::Fragments;
use crate::vm::VmInner;

const PAGE: u64 = 4096;
/// [`PAGE`] as a `usize`.
const PAGE_BYTES: usize = 4096;
const WORDS: usize = 512;

/// When tracked frames may run relaxed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RelaxedMode {
    /// Never: every frame strict, one exact event per store.
    #[default]
    Off,
    /// A strict frame is promoted once it took [`RelaxedConfig::promote_after`] trapped
    /// stores within [`RelaxedConfig::window`].
    Auto,
    /// Every frame is relaxed as soon as it is tracked.
    Always,
}

/// Relaxed-mode settings ([`crate::VmConfig::with_relaxed`]). Frames run relaxed only while
/// every registered notifier accepts coalesced events
/// ([`pagetrack::PageTracker::accepts_coalesced`]) and no [`crate::Vm::pin_strict`] holds
/// them, and at most [`RelaxedConfig::max_frames`] at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelaxedConfig {
    /// The policy.
    pub mode: RelaxedMode,
    /// Auto: trapped stores to one frame within [`RelaxedConfig::window`] that promote it.
    pub promote_after: u32,
    /// Auto: the window the trapped stores are counted in.
    pub window: Duration,
    /// The most frames relaxed at once (each holds a 4 KiB shadow).
    pub max_frames: usize,
    /// Auto: a hot frame is promoted together with the other tracked frames of its aligned
    /// group of this many frames (a power of two; 1 = alone), so that neighbours share one
    /// fragment and one re-cut instead of one each.
    pub group_frames: u64,
    /// Sync at least this often while vCPUs run. Checked at pagetrack's own exits (trapped
    /// stores, and the stall monitor's kicks, which come every 50 ms to a vCPU that does not
    /// exit), besides the sync at every exit to the VMM.
    pub period: Duration,
    /// Auto: a relaxed frame that no sync found dirty for this many consecutive syncs, and
    /// for [`RelaxedConfig::demote_window`], is demoted back to strict (after a final sync);
    /// 0 never demotes a cold frame.
    pub demote_after_syncs: u32,
    /// Auto: and for at least this long (see [`RelaxedConfig::demote_after_syncs`]).
    pub demote_window: Duration,
    /// Auto: hysteresis. For this long after a cold demotion the frame's own trapped stores
    /// promote it only after four times [`RelaxedConfig::promote_after`]; if it is promoted
    /// again within this time (by its stores or with its group), it must stay cold twice as
    /// long before its next demotion (doubling each time, up to 64x).
    pub demote_cooldown: Duration,
    /// Auto and always: a trapped `rep stos`/`rep movs` with at least this many elements
    /// left promotes the tracked frames its destination will reach (with their groups) before
    /// pagetrack would complete it one exact event per element, and the CPU then runs it on
    /// the relaxed frames (one coalesced change per frame instead of an event per element).
    /// Frames that may not relax (pinned, the budget spent, a notifier that needs exact
    /// events) are completed exactly as before; 0 never promotes for a `rep`.
    pub rep_promote_elements: u64,
    /// Manual protect only ([`crate::DirtyProtect`]): a relaxed frame found dirty in this
    /// many consecutive syncs becomes *hot*: harvests leave its KVM dirty bit set, so it
    /// stays writable (no write fault after each sync's re-protect) and every sync diffs it
    /// (`docs/RELAXED.md`, "Hot frames"); 0 never makes a frame hot.
    pub hot_after_syncs: u32,
    /// A hot frame whose diff found no change in this many consecutive syncs is cooled:
    /// the next harvest clears and re-protects it (at least 1).
    pub hot_idle_syncs: u32,
}

impl Default for RelaxedConfig {
    fn default() -> RelaxedConfig {
        RelaxedConfig {
            mode: RelaxedMode::Off,
            // Measured (docs/PERFORMANCE.md, "Relaxed mode"): on this host a strict store
            // costs about as much as a third of a promotion, and busybox's hot frames take
            // few stores each, so every threshold above 1 cost bzip2 2-100x.
            promote_after: 1,
            window: Duration::from_secs(1),
            max_frames: 16_384,
            group_frames: 16,
            period: Duration::from_millis(10),
            // Measured (docs/PERFORMANCE.md, "Relaxed mode: cold demotion").
            demote_after_syncs: 32,
            demote_window: Duration::from_secs(1),
            demote_cooldown: Duration::from_secs(2),
            // docs/PERFORMANCE.md ("promotion before a rep completion"): an element completed
            // exactly costs 0.3-1 us, a promotion 50-300 us (pause, re-cut), so a page of
            // qwords (511 left after its first) is well past where they cross.
            rep_promote_elements: 256,
            // Measured (docs/PERFORMANCE.md, "Hot frames").
            hot_after_syncs: 2,
            hot_idle_syncs: 16,
        }
    }
}

impl RelaxedConfig {
    /// The default settings with `mode`.
    pub fn new(mode: RelaxedMode) -> RelaxedConfig {
        RelaxedConfig {
            mode,
            ..RelaxedConfig::default()
        }
    }
}

/// Counters of relaxed mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelaxedStats {
    /// Frames relaxed now.
    pub relaxed_now: u64,
    /// Distinct frames that ran relaxed at some time.
    pub frames_relaxed: u64,
    /// Strict → relaxed switches.
    pub promotions: u64,
    /// Relaxed → strict switches.
    pub demotions: u64,
    /// Those of them made because the frame stayed cold (auto policy).
    pub cold_demotions: u64,
    /// Syncs that found relaxed frames to harvest.
    pub syncs: u64,
    /// Coalesced events delivered.
    pub coalesced_events: u64,
    /// Bytes of those events.
    pub coalesced_bytes: u64,
    /// Time spent in syncs (harvest, diff and delivery), nanoseconds.
    pub sync_ns: u64,
    /// The part of [`RelaxedStats::sync_ns`] spent harvesting and re-protecting (the dirty-log
    /// ioctls and the dispatch of their bits), nanoseconds.
    pub harvest_ns: u64,
    /// Trapped `rep` string stores whose destination was promoted before pagetrack would
    /// have completed them exactly ([`RelaxedConfig::rep_promote_elements`]), left to the CPU.
    pub rep_promotions: u64,
    /// Hot frames now ([`RelaxedConfig::hot_after_syncs`]).
    pub hot_now: u64,
    /// Times a relaxed frame became hot.
    pub hot_promotions: u64,
    /// Times a hot frame was cooled for staying unchanged.
    pub hot_cooled: u64,
    /// Syncs that returned at once: no vCPU had entered `KVM_RUN` since the last sync
    /// began, and none was inside (a device write into a relaxed frame right after the
    /// exit's own sync, say), so there was nothing to harvest.
    pub skipped_syncs: u64,
}

/// What one [`crate::Vm::sync`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyncReport {
    /// The epoch the delivered events carry (0: nothing was relaxed, no epoch ended).
    pub epoch: u64,
    /// Relaxed frames KVM logged dirty since their last sync.
    pub dirty_frames: usize,
    /// Coalesced events delivered.
    pub events: usize,
}

/// A relaxed frame's run of dirty syncs, and as a hot frame its run of unchanged ones.
#[derive(Debug, Default)]
struct Streak {
    /// The sync (`Relaxed::harvests`) that last found the frame dirty.
    last: u64,
    /// Consecutive syncs that found it dirty, up to that one.
    dirty: u32,
    /// Hot: consecutive syncs whose diff found it unchanged.
    idle: u32,
}

#[derive(Debug, Default)]
struct Heat {
    traps: u32,
    since: Option<Instant>,
}

/// What the sync lock guards: a harvest and diff, and the queueing of their changes
/// (`Relaxed::queue`), happen under it, so changes of one frame are queued in memory order.
#[derive(Debug, Default)]
pub(crate) struct SyncState;

thread_local! {
    /// This thread is delivering a sync's events, and so holds the sync lock in an outer
    /// frame: a sync a notifier causes (a device write into a relaxed frame, an untrack, a
    /// demotion) runs without taking the lock again, and its changes queue behind the ones
    /// still undelivered.
    static DELIVERING: Cell<bool> = const { Cell::new(false) };
}

struct Delivering;

impl Delivering {
    fn enter() -> Delivering {
        DELIVERING.with(|d| d.set(true));
        Delivering
    }
}

impl Drop for Delivering {
    fn drop(&mut self) {
        DELIVERING.with(|d| d.set(false));
    }
}

/// The relaxed-mode state of a VM (in its backend).
#[derive(Debug)]
pub(crate) struct Relaxed {
    pub(crate) config: RelaxedConfig,
    tracker: OnceLock<Weak<PageTracker>>,
    /// The VM (for the untrack hook, which the core calls on the backend).
    vm: OnceLock<Weak<VmInner>>,
    sync: Mutex<SyncState>,
    /// The epoch of the last sync (written under the sync lock).
    epoch: AtomicU64,
    /// Changes found (under the sync lock) and not yet delivered, in order, with their
    /// epochs. Whoever queues drains: a nested sync on a delivering thread queues behind the
    /// outer one's remaining changes, so each frame's events stay in memory order.
    queue: Mutex<VecDeque<(Change, u64)>>,
    /// Guest-address ranges `[start, end)` of frames being untracked
    /// (`Enforcement::before_untrack` to `after_untrack`, one entry per call): they are not
    /// relaxed meanwhile, so their last changes cannot be held past the untrack.
    leaving: Mutex<Vec<(u64, u64)>>,
    /// Registrations of notifiers that need exact events in progress
    /// (`Enforcement::before_register` to `after_register`): no frame is relaxed meanwhile.
    joining: AtomicUsize,
    /// Shadow of each relaxed frame, by guest address: its contents at the last delivery.
    shadows: Mutex<HashMap<u64, Box<[u64; WORDS]>>>,
    ever: Mutex<HashSet<u64>>,
    pins: Mutex<HashMap<u64, u32>>,
    heat: Mutex<HashMap<u64, Heat>>,
    /// Dirty streaks of relaxed frames, for hot frames (under the sync lock).
    streaks: Mutex<HashMap<u64, Streak>>,
    /// Syncs that harvested (every `sync_locked`), numbering the streaks.
    harvests: AtomicU64,
    hot_promotions: AtomicU64,
    hot_cooled: AtomicU64,
    /// `Gate::quiescent` when the last successful sync began, or `u64::MAX`: a sync that
    /// finds the same value has nothing to find (no guest instruction ran since that sync's
    /// harvest, and pagetrack's own writes keep the shadows current) and returns at once.
    quiet_at: AtomicU64,
    /// Syncs skipped so.
    skipped_syncs: AtomicU64,
    /// Coldness of relaxed frames and backoff of demoted ones (auto policy).
    cooling: Mutex<crate::cooling::Cooling>,
    active: AtomicUsize,
    born: Instant,
    last_sync_ns: AtomicU64,
    /// A sync was asked for ([`request_sync`]) and not served yet.
    requested: AtomicBool,
    promotions: AtomicU64,
    demotions: AtomicU64,
    cold_demotions: AtomicU64,
    rep_promotions: AtomicU64,
    syncs: AtomicU64,
    coalesced_events: AtomicU64,
    coalesced_bytes: AtomicU64,
    sync_ns: AtomicU64,
    harvest_ns: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Relaxed {
    pub(crate) fn new(config: RelaxedConfig) -> Relaxed {
        Relaxed {
            config,
            tracker: OnceLock::new(),
            vm: OnceLock::new(),
            sync: Mutex::default(),
            epoch: AtomicU64::new(0),
            queue: Mutex::default(),
            leaving: Mutex::default(),
            joining: AtomicUsize::new(0),
            shadows: Mutex::default(),
            ever: Mutex::default(),
            pins: Mutex::default(),
            heat: Mutex::default(),
            streaks: Mutex::default(),
            harvests: AtomicU64::new(0),
            hot_promotions: AtomicU64::new(0),
            hot_cooled: AtomicU64::new(0),
            quiet_at: AtomicU64::new(u64::MAX),
            skipped_syncs: AtomicU64::new(0),
            cooling: Mutex::default(),
            active: AtomicUsize::new(0),
            born: Instant::now(),
            last_sync_ns: AtomicU64::new(0),
            requested: AtomicBool::new(false),
            promotions: AtomicU64::new(0),
            demotions: AtomicU64::new(0),
            cold_demotions: AtomicU64::new(0),
            rep_promotions: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            coalesced_events: AtomicU64::new(0),
            coalesced_bytes: AtomicU64::new(0),
            sync_ns: AtomicU64::new(0),
            harvest_ns: AtomicU64::new(0),
        }
    }

    pub(crate) fn set_tracker(&self, tracker: Weak<PageTracker>) {
        self.tracker
            .set(tracker)
            .expect("the tracker is set once, as the VM is made");
    }

    pub(crate) fn set_vm(&self, vm: Weak<VmInner>) {
        self.vm.set(vm).expect("the VM is set once, as it is made");
    }

    /// The next epoch (under the sync lock, or on a delivering thread that holds it).
    fn next_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::AcqRel) + 1
    }

    fn is_leaving(leaving: &[(u64, u64)], gpa: u64) -> bool {
        leaving.iter().any(|&(a, b)| (a..b).contains(&gpa))
    }

    /// True if cold frames are demoted (auto policy with `demote_after_syncs` set).
    fn demotes(&self) -> bool {
        self.config.mode == RelaxedMode::Auto && self.config.demote_after_syncs > 0
    }

    fn thresholds(&self) -> crate::cooling::Thresholds {
        crate::cooling::Thresholds {
            syncs: self.config.demote_after_syncs,
            window: self.config.demote_window,
            cooldown: self.config.demote_cooldown,
        }
    }

    /// Frames relaxed now (a lock-free hint for the fast paths).
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    fn accepts(&self) -> bool {
        self.config.mode != RelaxedMode::Off
            && self.joining.load(Ordering::Acquire) == 0
            && self
                .tracker
                .get()
                .and_then(Weak::upgrade)
                .is_some_and(|t| t.accepts_coalesced())
    }

    pub(crate) fn stats(&self) -> RelaxedStats {
        RelaxedStats {
            relaxed_now: self.active() as u64,
            frames_relaxed: lock(&self.ever).len() as u64,
            promotions: self.promotions.load(Ordering::Relaxed),
            demotions: self.demotions.load(Ordering::Relaxed),
            cold_demotions: self.cold_demotions.load(Ordering::Relaxed),
            rep_promotions: self.rep_promotions.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
            coalesced_events: self.coalesced_events.load(Ordering::Relaxed),
            coalesced_bytes: self.coalesced_bytes.load(Ordering::Relaxed),
            sync_ns: self.sync_ns.load(Ordering::Relaxed),
            harvest_ns: self.harvest_ns.load(Ordering::Relaxed),
            hot_now: 0,
            hot_promotions: self.hot_promotions.load(Ordering::Relaxed),
            hot_cooled: self.hot_cooled.load(Ordering::Relaxed),
            skipped_syncs: self.skipped_syncs.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn is_shadowed(&self, gpa: u64) -> bool {
        self.active() > 0 && lock(&self.shadows).contains_key(&(gpa & !(PAGE - 1)))
    }

    /// True if `[gpa, gpa + len)` touches a relaxed frame.
    pub(crate) fn touches(&self, gpa: u64, len: u64) -> bool {
        if self.active() == 0 || len == 0 {
            return false;
        }
        let first = gpa & !(PAGE - 1);
        let last = (gpa + len - 1) & !(PAGE - 1);
        let shadows = lock(&self.shadows);
        (first..=last)
            .step_by(PAGE_BYTES)
            .any(|f| shadows.contains_key(&f))
    }

    pub(crate) fn is_pinned(&self, gpa: u64) -> bool {
        lock(&self.pins).contains_key(&(gpa & !(PAGE - 1)))
    }

    /// The frames of `gpas` that may become relaxed now, within the budget.
    fn eligible(&self, gpas: impl Iterator<Item = u64>, frags: &Fragments) -> Vec<u64> {
        if !self.accepts() {
            return Vec::new();
        }
        let room = self.config.max_frames.saturating_sub(self.active());
        let pins = lock(&self.pins);
        let leaving = lock(&self.leaving);
        gpas.map(|g| g & !(PAGE - 1))
            .filter(|g| {
                !pins.contains_key(g) && !frags.is_relaxed(*g) && !Self::is_leaving(&leaving, *g)
            })
            .take(room)
            .collect()
    }

    /// Relaxes the frames of `gpas` that are eligible ([`RelaxedConfig`]), with vCPUs
    /// paused by the caller (which holds `frags` and re-cuts the returned chunks): takes
    /// their shadows from memory and sets their relaxed bits. Used by the `Always` policy
    /// when frames become tracked (their fragment is then created writable and logged at
    /// once), and by promotions.
    pub(crate) fn relax_paused(
        &self,
        frags: &mut Fragments,
        gpas: impl Iterator<Item = u64>,
    ) -> (Vec<u64>, Vec<(usize, usize)>) {
        let want = self.eligible(gpas, frags);
        if want.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let (frames, chunks) = frags.set_relaxed(want.into_iter(), true);
        let mut shadows = lock(&self.shadows);
        for &f in &frames {
            let mut sh = Box::new([0u64; WORDS]);
            frags.read_frame(f, &mut sh[..]);
            shadows.insert(f, sh);
        }
        drop(shadows);
        lock(&self.ever).extend(frames.iter().copied());
        if self.demotes() {
            lock(&self.cooling).promoted(&frames, Instant::now(), &self.thresholds());
        }
        self.active.fetch_add(frames.len(), Ordering::AcqRel);
        self.promotions
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        (frames, chunks)
    }

    /// Forgets the shadows of frames that are no longer relaxed (untracked, or demoted).
    pub(crate) fn forget(&self, frames: &[u64]) {
        if self.demotes() {
            lock(&self.cooling).forgotten(frames);
        }
        {
            let mut streaks = lock(&self.streaks);
            for f in frames {
                streaks.remove(f);
            }
        }
        let mut shadows = lock(&self.shadows);
        let mut n = 0;
        for f in frames {
            n += usize::from(shadows.remove(f).is_some());
        }
        self.active.fetch_sub(n, Ordering::AcqRel);
    }

    /// After a sync's diff (under the sync lock): the streaks of the `dirty` frames (the
    /// sync numbered `now`; `changed`: those whose diff found a change, a subset, both in
    /// address order), which make frames hot or cool them (`frags`). Returns the frames hot
    /// at the harvest or in `cooled` (just re-protected after being hot) whose diff found a
    /// change: the dirty logs get them from the sync, not the harvest.
    fn update_hot(
        &self,
        frags: &mut Fragments,
        now: u64,
        dirty: &[u64],
        changed: &[u64],
        cooled: &[u64],
    ) -> (Vec<u64>, Vec<u64>) {
        let after = self.config.hot_after_syncs;
        let mut marks = Vec::new();
        let mut active = Vec::with_capacity(dirty.len());
        // A frame cooled by an earlier sync (or hot when `hot_after_syncs` was set), whose
        // bit this harvest cleared: marked if changed, like a hot one.
        let cooled: HashSet<u64> = cooled.iter().copied().collect();
        let on = after > 0 && frags.manual_protect();
        let mut streaks = lock(&self.streaks);
        let mut ch = changed.iter().peekable();
        for &f in dirty {
            let mut was_changed = false;
            while let Some(&&c) = ch.peek() {
                if c > f {
                    break;
                }
                was_changed |= c == f;
                ch.next();
            }
            // Hot and cooled frames are reported whether written or not: for cold demotion
            // they count as written only if changed.
            let quiet = cooled.contains(&f) || frags.is_hot(f);
            if !quiet || was_changed {
                active.push(f);
            }
            if !on {
                if cooled.contains(&f) && was_changed {
                    marks.push(f);
                }
                continue;
            }
            let s = streaks.entry(f).or_default();
            s.dirty = if s.last + 1 == now {
                s.dirty.saturating_add(1)
            } else {
                1
            };
            s.last = now;
            if cooled.contains(&f) && was_changed {
                marks.push(f);
            }
            if frags.is_hot(f) {
                if was_changed {
                    marks.push(f);
                    s.idle = 0;
                } else {
                    s.idle += 1;
                    if s.idle >= self.config.hot_idle_syncs.max(1) {
                        frags.set_hot(f, false);
                        s.dirty = 0;
                        s.idle = 0;
                        self.hot_cooled.fetch_add(1, Ordering::Relaxed);
                    }
                }
            } else if s.dirty >= after && frags.set_hot(f, true) {
                s.idle = 0;
                self.hot_promotions.fetch_add(1, Ordering::Relaxed);
            }
        }
        (marks, active)
    }

    /// Auto policy, after a trapped store to the frame at `gpa`: true if the frame just
    /// became hot enough to promote.
    fn heat_up(&self, gpa: u64) -> bool {
        if self.config.mode != RelaxedMode::Auto {
            return false;
        }
        let now = Instant::now();
        // Hysteresis: a frame demoted for coldness a short while ago needs more heat.
        let factor = if self.demotes() {
            lock(&self.cooling).promote_factor(gpa & !(PAGE - 1), now, &self.thresholds())
        } else {
            1
        };
        let mut heat = lock(&self.heat);
        let h = heat.entry(gpa & !(PAGE - 1)).or_default();
        match h.since {
            Some(t) if now.duration_since(t) <= self.config.window => h.traps += 1,
            _ => {
                h.since = Some(now);
                h.traps = 1;
            }
        }
        if h.traps >= self.config.promote_after.saturating_mul(factor) {
            heat.remove(&(gpa & !(PAGE - 1)));
            return true;
        }
        false
    }
}

/// Syncs every relaxed frame of `vm` (see the module docs). Inside a notifier that is
/// receiving a sync's events (this thread holds the sync lock already) the changes queue
/// behind the ones still undelivered, and all are delivered before this returns.
pub(crate) fn sync(vm: &VmInner) -> Result<SyncReport> {
    let r = &vm.backend.relaxed;
    if r.active() == 0 {
        return Ok(SyncReport::default());
    }
    let _st = sync_lock(vm);
    sync_locked(vm)
}

/// The sync lock held; while it lives this thread counts as holding it (`DELIVERING`), so
/// what a notifier called meanwhile does on this thread (a sync, a device write into a
/// relaxed frame) runs without taking it again instead of waiting for itself.
pub(crate) struct SyncHeld<'a> {
    _guard: MutexGuard<'a, SyncState>,
}

impl Drop for SyncHeld<'_> {
    fn drop(&mut self) {
        DELIVERING.with(|d| d.set(false));
    }
}

/// The sync lock, unless this thread holds it already (it is delivering, or holds a
/// [`SyncHeld`]).
fn sync_lock(vm: &VmInner) -> Option<SyncHeld<'_>> {
    if DELIVERING.with(Cell::get) {
        return None;
    }
    let guard = lock_sync(vm);
    DELIVERING.with(|d| d.set(true));
    Some(SyncHeld { _guard: guard })
}

/// True if `[gpa, gpa + len)` touches a relaxed frame's shadow and this thread does not
/// hold the sync lock: a write pagetrack applies there needs the sync lock.
fn needs_sync_lock(vm: &VmInner, gpa: u64, len: u64) -> bool {
    !DELIVERING.with(Cell::get) && touches_shadow(vm, gpa, len)
}

/// True if `[gpa, gpa + len)` touches a relaxed frame's shadow.
fn touches_shadow(vm: &VmInner, gpa: u64, len: u64) -> bool {
    vm.backend.relaxed.touches(gpa, len)
}

/// For a write pagetrack applies to `[gpa, gpa + len)` (`memory.rs`): takes the frames'
/// stripe locks with `lock_frames`, and first the sync lock if the range touches a relaxed
/// frame. The sync lock comes before the stripe locks: the thread delivering a sync's events
/// holds the sync lock, and its notifier may write guest memory (stripe locks); a writer that
/// waited for the sync lock with a stripe held deadlocked against it. Retried if a frame was
/// promoted between the check and the stripe locks (a promotion takes them).
pub(crate) fn lock_for_write<'a, L>(
    vm: &'a VmInner,
    gpa: u64,
    len: u64,
    lock_frames: impl Fn() -> L,
) -> (Option<SyncHeld<'a>>, L) {
    lock_for_write_spans(vm, &[(gpa, len)], lock_frames)
}

/// [`lock_for_write`] for a write to several ranges `(gpa, len)` (a store pagetrack
/// emulates: one or two targets).
pub(crate) fn lock_for_write_spans<'a, L>(
    vm: &'a VmInner,
    spans: &[(u64, u64)],
    lock_frames: impl Fn() -> L,
) -> (Option<SyncHeld<'a>>, L) {
    let needs = || {
        spans
            .iter()
            .any(|&(gpa, len)| needs_sync_lock(vm, gpa, len))
    };
    loop {
        let sync = needs().then(|| sync_lock(vm)).flatten();
        let frames = lock_frames();
        if sync.is_some() || !needs() {
            return (sync, frames);
        }
    }
}

/// Takes the sync lock. Its holder may be delivering to a notifier that pauses (tracks from
/// its callback), and a pause waits for vCPUs with a continuation: on a vCPU thread with
/// one (any trapped store is an MMIO exit KVM continues), blocking here would deadlock, so
/// the continuation is parked first (`Gate::park_here`).
fn lock_sync(vm: &VmInner) -> MutexGuard<'_, SyncState> {
    match vm.backend.relaxed.sync.try_lock() {
        Ok(g) => g,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => {
            vm.backend.gate.park_here();
            lock(&vm.backend.relaxed.sync)
        }
    }
}

/// Delivers every queued change, in order (the caller holds the sync lock, or is
/// delivering). A notifier's nested sync drains the rest itself; this loop then finds the
/// queue empty.
fn drain(vm: &VmInner) {
    let r = &vm.backend.relaxed;
    let _delivering = (!DELIVERING.with(Cell::get)).then(Delivering::enter);
    loop {
        let Some((c, epoch)) = lock(&r.queue).pop_front() else {
            return;
        };
        let event = WriteEvent::new(Gpa(c.gpa), &c.new, Source::Guest)
            .with_old(&c.old)
            .in_epoch(epoch);
        vm.tracker.report_write(&match c.first_writer {
            Some(v) => event.first_written_by(v),
            None => event,
        });
    }
}

/// One changed run of a relaxed frame.
#[derive(Debug)]
struct Change {
    gpa: u64,
    old: Vec<u8>,
    new: Vec<u8>,
    /// The frame's first writer in the epoch, where the dirty ring says.
    first_writer: Option<u32>,
}

/// A sync; the caller holds the sync lock (or is delivering, see [`sync`]).
fn sync_locked(vm: &VmInner) -> Result<SyncReport> {
    let r = &vm.backend.relaxed;
    let start = Instant::now();
    // Nothing ran since the last sync began (every vCPU outside `KVM_RUN` then and since):
    // KVM logged nothing new, and every write pagetrack applied meanwhile updated the shadows
    // (`settle`), so this sync would find nothing.
    let quiet = vm.backend.gate.quiescent();
    if let Some(q) = quiet
        && r.quiet_at.load(Ordering::Acquire) == q
    {
        r.skipped_syncs.fetch_add(1, Ordering::Relaxed);
        if r.demotes() {
            lock(&r.cooling).synced(&[], Instant::now());
        }
        return Ok(SyncReport::default());
    }
    // Until this sync succeeds, the next one is not skipped.
    r.quiet_at.store(u64::MAX, Ordering::Release);
    // 1 + 2: harvest and re-protect (per relaxed fragment: GET, then with manual protect
    // CLEAR of exactly the harvested bits; `sys::KvmSlot::take_dirty_log`; with the dirty
    // ring, every vCPU's ring, then one KVM_RESET_DIRTY_RINGS: `ring.rs`).
    let (dirty, cooled) = vm.backend.frags().harvest_relaxed(&vm.backend.vm_fd)?;
    let harvested = start.elapsed();
    let now = r.harvests.fetch_add(1, Ordering::Relaxed) + 1;
    r.last_sync_ns
        .store(nanos(r.born.elapsed()), Ordering::Relaxed);
    if dirty.is_empty() {
        if r.demotes() {
            lock(&r.cooling).synced(&[], Instant::now());
        }
        r.quiet_at
            .store(quiet.unwrap_or(u64::MAX), Ordering::Release);
        return Ok(SyncReport::default());
    }
    r.harvest_ns.fetch_add(nanos(harvested), Ordering::Relaxed);
    let epoch = r.next_epoch();
    // 3: read and diff, word by word (aligned 8-byte loads: a naturally aligned guest store
    // is never torn), against the shadow; the shadow takes what was read.
    let (changes, changed) = diff(vm, &dirty);
    // Hot frames: KVM keeps reporting them, so the dirty logs learn of them from the diff
    // (content changed, a subset of written: what the VMM's log and the checkpoint restore
    // act on). Marked before delivery, as a trapped store marks before its event.
    let gpas: Vec<u64> = dirty.iter().map(|d| d.gpa).collect();
    let (marks, active) = r.update_hot(&mut vm.backend.frags(), now, &gpas, &changed, &cooled);
    for f in marks {
        vm.ram.mark_dirty_for(f, PAGE_BYTES, true);
    }
    if r.demotes() {
        lock(&r.cooling).synced(&active, Instant::now());
    }
    // 4: deliver, in address order (behind changes still queued by an outer sync).
    let events = changes.len();
    let bytes: u64 = changes.iter().map(|c| c.new.len() as u64).sum();
    lock(&r.queue).extend(changes.into_iter().map(|c| (c, epoch)));
    drain(vm);
    r.syncs.fetch_add(1, Ordering::Relaxed);
    r.coalesced_events
        .fetch_add(events as u64, Ordering::Relaxed);
    r.coalesced_bytes.fetch_add(bytes, Ordering::Relaxed);
    r.sync_ns
        .fetch_add(nanos(start.elapsed()), Ordering::Relaxed);
    r.quiet_at
        .store(quiet.unwrap_or(u64::MAX), Ordering::Release);
    Ok(SyncReport {
        epoch,
        dirty_frames: dirty.len(),
        events,
    })
}

/// The changed runs of the `dirty` frames (with their first writers), and the frames with a
/// change (in order).
fn diff(vm: &VmInner, dirty: &[crate::slots::DirtyFrame]) -> (Vec<Change>, Vec<u64>) {
    let mem = vm.mem.memory();
    let mut shadows = lock(&vm.backend.relaxed.shadows);
    let mut out = Vec::new();
    let mut changed = Vec::new();
    for &crate::slots::DirtyFrame {
        gpa: f,
        first_writer,
    } in dirty
    {
        let before = out.len();
        let Some(sh) = shadows.get_mut(&f) else {
            continue;
        };
        let Ok(slice) = mem.get_slice(GuestAddress(f), PAGE_BYTES) else {
            continue;
        };
        let Some(words) = crate::sys::slice_words(&slice) else {
            continue;
        };
        let mut run: Option<(usize, Vec<u8>, Vec<u8>)> = None;
        for (w, (old, word)) in sh.iter_mut().zip(words).enumerate() {
            let new = word.load(Ordering::Relaxed);
            if new == *old {
                if let Some((at, o, n)) = run.take() {
                    out.push(Change {
                        gpa: f + at as u64 * 8,
                        old: o,
                        new: n,
                        first_writer,
                    });
                }
                continue;
            }
            let r = run.get_or_insert_with(|| (w, Vec::new(), Vec::new()));
            r.1.extend_from_slice(&old.to_le_bytes());
            r.2.extend_from_slice(&new.to_le_bytes());
            *old = new;
        }
        if let Some((at, o, n)) = run {
            out.push(Change {
                gpa: f + at as u64 * 8,
                old: o,
                new: n,
                first_writer,
            });
        }
        if out.len() > before {
            changed.push(f);
        }
    }
    (out, changed)
}

/// A write pagetrack applies to guest memory (a device write, or a trapped store to a
/// relaxed frame that a squeezed layout made read-only): `write` changes memory, and the
/// shadows of relaxed frames in `[gpa, gpa + len)` take the same bytes. For a relaxed frame
/// the caller gets the sync lock held (after a sync, so the frame's earlier guest changes
/// are delivered first) until it has delivered its own exact event: keep the returned guard
/// until then.
pub(crate) fn before_apply(vm: &VmInner, gpa: u64, len: u64) -> Option<SyncHeld<'_>> {
    if !touches_shadow(vm, gpa, len) {
        return None;
    }
    // On a delivering thread (a notifier's write) the lock is this thread's already.
    let st = sync_lock(vm);
    // A failed harvest leaves the frame's changes pending for the next sync (counted in
    // `VmStats::restore_errors`); the write below is exact either way, and `settle` delivers
    // the guest's unseen bytes in its range before its event.
    if sync_locked(vm).is_err() {
        vm.backend.count_restore_error();
    }
    st
}

/// After `before_apply` and the memory write that changed `old` into `data` at `gpa`: see
/// [`settle`] (a guest store racing the write after the sync is delivered before its event).
pub(crate) fn after_apply(
    vm: &VmInner,
    // Under the sync lock when this holds it, else on a delivering thread.
    _held: &mut Option<SyncHeld<'_>>,
    gpa: u64,
    old: &[u8],
    data: &[u8],
) {
    if vm.backend.relaxed.active() == 0 {
        return;
    }
    settle(vm, gpa, old, data);
}

/// A store pagetrack applied to guest memory itself, outside [`crate::memory::apply_write`]
/// (an instruction it emulates, a locked read-modify-write it re-executes), `old` → `new`
/// at `gpa`, already in memory: for bytes in relaxed frames, the guest's undelivered change
/// of those bytes (shadow → `old`) is delivered first as a coalesced event, and the shadow
/// takes `new`, so that the exact event that follows chains (its old bytes are the replay's).
/// The sync lock is returned held: keep it until that exact event is delivered.
pub(crate) fn applied<'a>(
    vm: &'a VmInner,
    gpa: u64,
    old: &[u8],
    new: &[u8],
) -> Option<SyncHeld<'a>> {
    // Only bytes of relaxed frames have a shadow to settle (the caller holds the frames'
    // stripe locks, so none becomes relaxed meanwhile).
    if new.is_empty() || !touches_shadow(vm, gpa, new.len() as u64) {
        return None;
    }
    let guard = sync_lock(vm);
    settle(vm, gpa, old, new);
    guard
}

/// The shadow side of a write to relaxed frames that changed `old` into `new` at `gpa`
/// (already in memory): the guest's undelivered change of exactly these bytes (shadow →
/// `old`: a store that landed after the last sync, even one racing this write) is delivered
/// first as a coalesced event, and the shadow takes `new`. The caller holds the sync lock
/// (or is delivering).
fn settle(vm: &VmInner, gpa: u64, old: &[u8], new: &[u8]) {
    let r = &vm.backend.relaxed;
    let mut pending: Vec<Change> = Vec::new();
    {
        let mut shadows = lock(&r.shadows);
        // Page by page: one shadow lookup per page (a lookup per byte was half of a
        // `pagetrack exec` that reads files into relaxed frames).
        let mut i = 0usize;
        while i < old.len().min(new.len()) {
            let at = gpa + i as u64;
            let in_page = usize::try_from(PAGE - at % PAGE).expect("at most 4096");
            let end = (i + in_page).min(old.len()).min(new.len());
            if let Some(sh) = shadows.get_mut(&(at & !(PAGE - 1))) {
                settle_page(sh, at, &old[i..end], &new[i..end], &mut pending);
            }
            i = end;
        }
    }
    if pending.is_empty() {
        return;
    }
    let epoch = r.next_epoch();
    let n = pending.len() as u64;
    lock(&r.queue).extend(pending.into_iter().map(|c| (c, epoch)));
    drain(vm);
    r.coalesced_events.fetch_add(n, Ordering::Relaxed);
}

/// [`settle`] within one page: `old` and `new` start at `at` and end in its page. Bytes whose
/// shadow differs from `old` (a guest store the last sync did not see) become changes, runs
/// of adjacent bytes one change; the shadow takes `new`.
fn settle_page(sh: &mut [u64; WORDS], at: u64, old: &[u8], new: &[u8], pending: &mut Vec<Change>) {
    let first = usize::try_from(at % PAGE).expect("below 4096");
    let len = old.len().min(new.len());
    let mut k = 0;
    while k < len {
        let off = first + k;
        // A whole aligned word whose shadow equals `old` (the common case: nothing unseen)
        // takes `new` at once; one that differs, and the edges, go byte by byte.
        if off % 8 == 0 && k + 8 <= len {
            let o = u64::from_le_bytes(old[k..k + 8].try_into().expect("8 bytes"));
            if sh[off / 8] == o {
                sh[off / 8] = u64::from_le_bytes(new[k..k + 8].try_into().expect("8 bytes"));
                k += 8;
                continue;
            }
        }
        let shift = (off % 8) * 8;
        let word = &mut sh[off / 8];
        let was = u8::try_from((*word >> shift) & 0xff).expect("a byte");
        let (o, n) = (old[k], new[k]);
        if was != o {
            let byte_at = at + k as u64;
            match pending.last_mut() {
                Some(c) if c.gpa + c.new.len() as u64 == byte_at && k > 0 => {
                    c.old.push(was);
                    c.new.push(o);
                }
                _ => pending.push(Change {
                    gpa: byte_at,
                    old: vec![was],
                    new: vec![o],
                    first_writer: None,
                }),
            }
        }
        *word = (*word & !(0xff << shift)) | (u64::from(n) << shift);
        k += 1;
    }
}

/// Auto policy after a trapped store at `gpa` on a vCPU thread (no lock held): promotes the
/// frame if it is hot; and a periodic sync if one is due.
pub(crate) fn after_trap(vm: &VmInner, gpa: u64) -> Result<()> {
    let r = &vm.backend.relaxed;
    if r.config.mode == RelaxedMode::Off {
        return Ok(());
    }
    // Always: a frame tracked before a coalesced notifier registered is relaxed at its
    // first trapped store.
    let hot = r.config.mode == RelaxedMode::Always || r.heat_up(gpa);
    if hot && !r.is_pinned(gpa) {
        let g = r.config.group_frames.max(1).next_power_of_two() * PAGE;
        let first = gpa & !(g - 1);
        let group: Vec<u64> = (first..first + g).step_by(PAGE_BYTES).collect();
        promote(vm, &group)?;
    }
    periodic(vm)
}

/// Auto policy, at a sync point with no lock held: demotes the relaxed frames that stayed
/// cold ([`RelaxedConfig::demote_after_syncs`], [`RelaxedConfig::demote_window`]), with vCPUs
/// paused and after a final sync; one the final sync finds dirty stays relaxed.
pub(crate) fn demote_cold(vm: &VmInner) -> Result<()> {
    let r = &vm.backend.relaxed;
    if !r.demotes() || r.active() == 0 {
        return Ok(());
    }
    let due = lock(&r.cooling).due(Instant::now(), &r.thresholds());
    if due.is_empty() {
        return Ok(());
    }
    demote_with(vm, &due, true)
}

/// A sync if the period since the last one has passed (and then the cold demotions due);
/// and, as at an exit, every frame back to strict mode if some notifier no longer accepts
/// coalesced events (a guest that never exits to the VMM would otherwise keep its frames
/// relaxed under such a notifier forever).
pub(crate) fn periodic(vm: &VmInner) -> Result<()> {
    let r = &vm.backend.relaxed;
    if r.active() == 0 {
        return Ok(());
    }
    let now = nanos(r.born.elapsed());
    let asked = r.requested.swap(false, Ordering::AcqRel);
    if asked || now.saturating_sub(r.last_sync_ns.load(Ordering::Relaxed)) >= nanos(r.config.period)
    {
        if !r.accepts() {
            let all = vm.backend.frags().relaxed_frames();
            return demote(vm, &all);
        }
        sync(vm)?;
        demote_cold(vm)?;
    }
    Ok(())
}

/// A sync asked for from anywhere, a notifier's callback included ([`crate::SyncRequester`]):
/// takes no lock pagetrack delivers events under and never waits. Running vCPUs are kicked
/// out of `KVM_RUN`; the first vCPU thread to leave it (kicked, or at an exit of its own)
/// syncs before it enters again, with no lock held. With no vCPU running, the next sync
/// point serves it.
pub(crate) fn request_sync(vm: &VmInner) {
    let r = &vm.backend.relaxed;
    if r.active() == 0 {
        return;
    }
    r.requested.store(true, Ordering::Release);
    vm.backend.gate.kick_inside();
}

/// At an exit to the VMM (memory becomes observable): syncs; and if some notifier no longer
/// accepts coalesced events, returns every frame to strict mode.
pub(crate) fn at_exit(vm: &VmInner) -> Result<()> {
    let r = &vm.backend.relaxed;
    if r.active() == 0 {
        return Ok(());
    }
    // This sync serves a pending request too.
    r.requested.store(false, Ordering::Release);
    if !r.accepts() {
        let all = vm.backend.frags().relaxed_frames();
        return demote(vm, &all);
    }
    sync(vm)?;
    demote_cold(vm)
}

/// The most destination pages a trapped `rep` promotes at once (16 MiB: a quarter of the
/// default budget); a longer one traps again where this range ends, and promotes the next.
const REP_PAGES: usize = 4096;

/// Before pagetrack completes a trapped `rep stos`/`rep movs` in userspace (on a vCPU thread,
/// no lock held, as [`after_trap`]): if it has at least
/// [`RelaxedConfig::rep_promote_elements`] elements left, the tracked frames of `dest` (the
/// guest-physical frames its destination reaches, the next element's first), each with its
/// aligned group, are promoted. True if the next element's frame is relaxed now: the caller
/// then leaves the instruction to KVM and the CPU, which store into the relaxed frames like
/// any guest store (found by the next sync), with nothing changed in the registers. False:
/// complete it exactly as before (a pinned or leaving frame, the budget spent, a notifier
/// that needs exact events, a failed re-cut, which left the frames strict).
pub(crate) fn before_rep(vm: &VmInner, elements: u64, dest: &[u64]) -> bool {
    let r = &vm.backend.relaxed;
    let threshold = r.config.rep_promote_elements;
    let Some(&next) = dest.first() else {
        return false;
    };
    if r.config.mode == RelaxedMode::Off || threshold == 0 || elements < threshold {
        return false;
    }
    {
        let frags = vm.backend.frags();
        if frags.is_relaxed(next) {
            // Relaxed already (the trapped element ended a strict page, or another vCPU's
            // `rep` promoted it): the CPU stores there without a trap.
            return true;
        }
        if !frags.is_protected(next) {
            return false; // untracked: the completion costs no event there
        }
    }
    if r.active() >= r.config.max_frames || r.is_pinned(next) {
        return false; // the budget is spent, or pinned strict: exact events, no pause
    }
    let g = r.config.group_frames.max(1).next_power_of_two() * PAGE;
    let mut seen = HashSet::new();
    let mut frames = Vec::new();
    for &gpa in dest {
        let first = gpa & !(g - 1);
        if seen.insert(first) {
            // The next element's frame first, so a budget too small for all still takes it.
            let own = gpa & !(PAGE - 1);
            frames.push(own);
            frames.extend((first..first + g).step_by(PAGE_BYTES).filter(|&f| f != own));
        }
    }
    if promote(vm, &frames).is_err() {
        // The re-cut KVM refused was undone (`promote`): the frames are strict, and the
        // completion below is exact as it always was.
        return false;
    }
    let relaxed = vm.backend.frags().is_relaxed(next);
    if relaxed {
        r.rep_promotions.fetch_add(1, Ordering::Relaxed);
    }
    relaxed
}

/// The most destination pages [`before_rep`] is given.
pub(crate) fn rep_pages_max() -> usize {
    REP_PAGES
}

/// Strict → relaxed for the eligible frames of `gpas` that are tracked.
pub(crate) fn promote(vm: &VmInner, gpas: &[u64]) -> Result<usize> {
    let r = &vm.backend.relaxed;
    if gpas.is_empty() || !r.accepts() {
        return Ok(0);
    }
    // The frames' stripe locks: no completion or device write is half done on them.
    let _held = vm.lock_frames(gpas.iter().copied());
    let mut frags = vm.backend.frags();
    let tracked: Vec<u64> = gpas
        .iter()
        .copied()
        .filter(|&g| frags.is_protected(g) && !frags.is_relaxed(g))
        .collect();
    if tracked.is_empty() {
        return Ok(0); // nothing to switch: no pause
    }
    let _paused = vm.backend.gate.pause();
    let (relaxed, chunks) = r.relax_paused(&mut frags, tracked.iter().copied());
    if chunks.is_empty() {
        return Ok(0);
    }
    if let Err(e) = frags.relayout(&vm.backend.vm_fd, &chunks) {
        // Back to strict: the frames were read-only until now, nothing was missed.
        let (frames, back) = frags.set_relaxed(relaxed.iter().copied(), false);
        r.forget(&frames);
        if frags.relayout(&vm.backend.vm_fd, &back).is_err() {
            vm.backend.count_restore_error();
        }
        return Err(e);
    }
    Ok(relaxed.len())
}

/// Relaxed → strict for the relaxed frames of `gpas`: with vCPUs paused, a final sync
/// delivers their last changes, then their fragments become read-only.
pub(crate) fn demote(vm: &VmInner, gpas: &[u64]) -> Result<()> {
    demote_with(vm, gpas, false)
}

/// [`demote`]; `cold`: a cold demotion ([`demote_cold`]), which leaves relaxed the frames
/// the final sync found dirty and records the others' backoff.
fn demote_with(vm: &VmInner, gpas: &[u64], cold: bool) -> Result<()> {
    let r = &vm.backend.relaxed;
    if gpas.is_empty() || r.active() == 0 {
        return Ok(());
    }
    // Paused first, then the sync lock: a vCPU finishing a continuation may need the sync
    // lock (a store into a relaxed frame it completes), and the pause waits for it.
    let _paused = vm.backend.gate.pause();
    let _st = sync_lock(vm);
    // Nothing writes guest memory from here on but device writes, which sync first and take
    // the sync lock this thread holds.
    sync_locked(vm)?;
    let still_cold: Vec<u64>;
    let gpas = if cold {
        let cooling = lock(&r.cooling);
        still_cold = gpas
            .iter()
            .copied()
            .filter(|&f| !cooling.dirty_in_last_sync(f))
            .collect();
        &still_cold[..]
    } else {
        gpas
    };
    let mut frags = vm.backend.frags();
    let (frames, chunks) = frags.set_relaxed(gpas.iter().copied(), false);
    if frames.is_empty() {
        return Ok(());
    }
    if cold {
        lock(&r.cooling).demoted(&frames, Instant::now());
        r.cold_demotions
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
    }
    r.forget(&frames);
    r.demotions
        .fetch_add(frames.len() as u64, Ordering::Relaxed);
    frags.relayout(&vm.backend.vm_fd, &chunks)
}

/// Strict pins: a frame with a pin never runs relaxed (a pin on a relaxed frame demotes it
/// before returning).
pub(crate) fn pin(vm: &VmInner, gpa: u64, on: bool) -> Result<()> {
    let r = &vm.backend.relaxed;
    let f = gpa & !(PAGE - 1);
    {
        let mut pins = lock(&r.pins);
        let gfn = f / PAGE;
        if on {
            let n = pins.get(&f).copied().unwrap_or(0);
            let n = n.checked_add(1).ok_or(Error::PinOverflow { gfn })?;
            pins.insert(f, n);
        } else {
            match pins.get_mut(&f) {
                None => return Err(Error::NotPinned { gfn }),
                Some(n) if *n > 1 => *n -= 1,
                Some(_) => {
                    pins.remove(&f);
                }
            }
        }
    }
    if on && r.is_shadowed(f) {
        demote(vm, &[f])?;
    }
    Ok(())
}

/// `Enforcement::before_untrack`: the frames of `runs` are about to be untracked (core
/// `remove_*`, with no lock of the tracker held). They are marked leaving (no promotion
/// relaxes them until [`after_untrack`]), and if some are relaxed a sync delivers their
/// changes up to now while they are still tracked. They stay relaxed until the untrack
/// itself (`Backend::change`), which drops their shadows and leaves them writable in the
/// logged fragment they had (`Fragments::mark`: no re-cut, so the guest keeps its mappings;
/// before, they were demoted here, a re-cut to read-only and another back to writable at the
/// untrack). A store another vCPU makes between this sync and the untrack is not reported:
/// it is concurrent with the untrack, and ordered after it (`docs/RELAXED.md`).
pub(crate) fn before_untrack(backend: &crate::vm::Backend, runs: &[FrameRun]) {
    let r = &backend.relaxed;
    if r.config.mode == RelaxedMode::Off || runs.is_empty() {
        return;
    }
    let ranges = runs.iter().filter_map(|run| {
        let start = run.first.0.checked_mul(PAGE)?;
        Some((start, start.saturating_add(run.count.saturating_mul(PAGE))))
    });
    lock(&r.leaving).extend(ranges.clone());
    // Under the fragment table: a promotion checks `leaving` and sets relaxed bits under it,
    // so a frame is either relaxed now (and found here) or never relaxed until after.
    let any_relaxed = r.active() > 0
        && backend
            .frags()
            .relaxed_frames()
            .into_iter()
            .any(|f| ranges.clone().any(|(a, b)| (a..b).contains(&f)));
    if any_relaxed {
        // A harvest KVM refused: the frames' changes since the last sync may be lost at the
        // untrack.
        sync_from_hook(backend);
    }
}

/// A sync from a hook the core calls on the backend (no tracker lock held); a failed one is
/// counted in `VmStats::restore_errors`, as the hook cannot return it.
fn sync_from_hook(backend: &crate::vm::Backend) {
    let Some(vm) = backend.relaxed.vm.get().and_then(Weak::upgrade) else {
        return;
    };
    if sync(&vm).is_err() {
        backend.count_restore_error();
    }
}

/// `Enforcement::before_unregister`: a notifier that accepts coalesced events is leaving;
/// the relaxed frames' changes since the last sync are delivered first (review 12, U1: they
/// went to whoever was registered at the next sync, or to nobody).
pub(crate) fn before_unregister(backend: &crate::vm::Backend) {
    if backend.relaxed.active() > 0 {
        // A harvest KVM refused: the changes stay logged and reach the notifiers still
        // registered at the next sync.
        sync_from_hook(backend);
    }
}

/// `Enforcement::before_register`: a notifier is about to be registered. If it needs exact
/// events (review 12, U2: it got coalesced ones until the next sync point), no frame is
/// relaxed until [`after_register`] (then it is registered and nothing is), and every relaxed
/// frame is demoted now: the final sync delivers their changes since the last sync to the
/// notifiers registered already, and the new one's first event is exact.
pub(crate) fn before_register(backend: &crate::vm::Backend, delivery: pagetrack::Delivery) {
    let r = &backend.relaxed;
    if r.config.mode == RelaxedMode::Off || delivery == pagetrack::Delivery::Coalesced {
        return;
    }
    r.joining.fetch_add(1, Ordering::AcqRel);
    // Under the fragment table: a promotion asks `accepts` and sets relaxed bits under it,
    // so a frame is either relaxed now (and found here) or not relaxed until after.
    let relaxed = backend.frags().relaxed_frames();
    if relaxed.is_empty() {
        return;
    }
    let Some(vm) = r.vm.get().and_then(Weak::upgrade) else {
        return;
    };
    if demote(&vm, &relaxed).is_err() {
        // A harvest or re-cut KVM refused: a frame left relaxed is demoted at the next sync
        // point (the new notifier may see coalesced events until then). Counted in
        // `VmStats::restore_errors`.
        backend.count_restore_error();
    }
}

/// `Enforcement::after_register`: the registration [`before_register`] announced ended.
pub(crate) fn after_register(backend: &crate::vm::Backend, delivery: pagetrack::Delivery) {
    let r = &backend.relaxed;
    if r.config.mode == RelaxedMode::Off || delivery == pagetrack::Delivery::Coalesced {
        return;
    }
    r.joining.fetch_sub(1, Ordering::AcqRel);
}

/// `Enforcement::after_untrack`: the untrack [`before_untrack`] announced has returned.
pub(crate) fn after_untrack(backend: &crate::vm::Backend, runs: &[FrameRun]) {
    let r = &backend.relaxed;
    if r.config.mode == RelaxedMode::Off || runs.is_empty() {
        return;
    }
    let mut leaving = lock(&r.leaving);
    for run in runs {
        let Some(start) = run.first.0.checked_mul(PAGE) else {
            continue;
        };
        let range = (start, start.saturating_add(run.count.saturating_mul(PAGE)));
        if let Some(i) = leaving.iter().position(|&x| x == range) {
            leaving.swap_remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shadow whose byte i is `i as u8` (`at` 0x5000: byte i is at 0x5000 + i).
    fn shadow() -> Box<[u64; WORDS]> {
        let mut sh = Box::new([0u64; WORDS]);
        for (w, word) in sh.iter_mut().enumerate() {
            let bytes: [u8; 8] = std::array::from_fn(|b| u8::try_from((w * 8 + b) % 256).unwrap());
            *word = u64::from_le_bytes(bytes);
        }
        sh
    }

    fn byte(sh: &[u64; WORDS], off: usize) -> u8 {
        sh[off / 8].to_le_bytes()[off % 8]
    }

    #[test]
    fn settle_page_turns_unseen_guest_bytes_into_runs_and_takes_the_new_bytes() {
        let mut sh = shadow();
        // A write of 6 bytes at offset 10: the guest changed offsets 11 and 12 (one run) and
        // 14 (another) since the last sync; the shadow holds the old values there.
        let old: Vec<u8> = (10u8..16)
            .map(|b| {
                if matches!(b, 11 | 12 | 14) {
                    b ^ 0xff
                } else {
                    b
                }
            })
            .collect();
        let new = [0xa0u8; 6];
        let mut pending = Vec::new();
        settle_page(&mut sh, 0x5000 + 10, &old, &new, &mut pending);
        let got: Vec<(u64, Vec<u8>, Vec<u8>)> =
            pending.into_iter().map(|c| (c.gpa, c.old, c.new)).collect();
        assert_eq!(
            got,
            [
                (0x500b, vec![11, 12], vec![11 ^ 0xff, 12 ^ 0xff]),
                (0x500e, vec![14], vec![14 ^ 0xff]),
            ]
        );
        for off in 10..16 {
            assert_eq!(byte(&sh, off), 0xa0, "offset {off} took the new byte");
        }
        assert_eq!(
            (byte(&sh, 9), byte(&sh, 16)),
            (9, 16),
            "neighbours unchanged"
        );
    }

    /// The byte-by-byte `settle_page` the word fast path replaced.
    fn settle_page_bytes(
        sh: &mut [u64; WORDS],
        at: u64,
        old: &[u8],
        new: &[u8],
        pending: &mut Vec<Change>,
    ) {
        let first = usize::try_from(at % PAGE).unwrap();
        for (k, (&o, &n)) in old.iter().zip(new).enumerate() {
            let off = first + k;
            let shift = (off % 8) * 8;
            let word = &mut sh[off / 8];
            let was = u8::try_from((*word >> shift) & 0xff).unwrap();
            if was != o {
                let byte_at = at + k as u64;
                match pending.last_mut() {
                    Some(c) if c.gpa + c.new.len() as u64 == byte_at && k > 0 => {
                        c.old.push(was);
                        c.new.push(o);
                    }
                    _ => pending.push(Change {
                        gpa: byte_at,
                        old: vec![was],
                        new: vec![o],
                        first_writer: None,
                    }),
                }
            }
            *word = (*word & !(0xff << shift)) | (u64::from(n) << shift);
        }
    }

    #[test]
    fn settle_page_word_by_word_matches_byte_by_byte() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for case in 0..300 {
            let start = usize::try_from(next() % 4096).unwrap();
            let len = usize::try_from(next() % 4097).unwrap().min(4096 - start);
            let base = shadow();
            // `old`: the shadow's bytes, with a few unseen guest changes (single bytes, and
            // runs across word boundaries).
            let mut old: Vec<u8> = (start..start + len).map(|o| byte(&base, o)).collect();
            for _ in 0..next() % 6 {
                if len == 0 {
                    break;
                }
                let at = usize::try_from(next()).unwrap() % len;
                let run = (usize::try_from(next() % 12).unwrap() + 1).min(len - at);
                for b in &mut old[at..at + run] {
                    *b ^= 0x5a;
                }
            }
            let new: Vec<u8> = (0..len)
                .map(|_| u8::try_from(next() % 256).unwrap())
                .collect();
            let at = 0x5000 + start as u64;
            let (mut a, mut b) = (base.clone(), base.clone());
            let (mut pa, mut pb) = (Vec::new(), Vec::new());
            settle_page(&mut a, at, &old, &new, &mut pa);
            settle_page_bytes(&mut b, at, &old, &new, &mut pb);
            let runs = |p: Vec<Change>| -> Vec<(u64, Vec<u8>, Vec<u8>)> {
                p.into_iter().map(|c| (c.gpa, c.old, c.new)).collect()
            };
            assert_eq!(runs(pa), runs(pb), "case {case}");
            assert!(a[..] == b[..], "case {case}: shadows differ");
        }
    }

    #[test]
    fn settle_page_with_nothing_unseen_has_no_change() {
        let mut sh = shadow();
        let old: Vec<u8> = (0u8..8).collect();
        let mut pending = Vec::new();
        settle_page(&mut sh, 0x5000, &old, &[7; 8], &mut pending);
        assert!(pending.is_empty());
        assert_eq!(sh[0], u64::from_le_bytes([7; 8]));
    }
}
