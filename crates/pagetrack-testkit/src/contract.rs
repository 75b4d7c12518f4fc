//! One conformance suite for the notifier contract, run against every way writes reach the
//! core: the core with a fake backend, KVM device writes, and KVM guest stores.

use std::sync::{Arc, Mutex};

use pagetrack::{AsId, Gfn, NotifierClass, Source, TrackNotifier, Tracking, WriteEvent};

/// What the suite needs from a backend under test.
pub trait Harness {
    /// The tracker events go through, as its consumers see it.
    fn tracker(&self) -> &Tracking;
    /// Writes `bytes` (1 to 8 of them) at `gpa` the way this backend's writers do, and
    /// returns once the write is in memory and reported.
    fn write(&mut self, gpa: u64, bytes: &[u8]);
    /// The source events from [`Harness::write`] carry.
    fn source(&self) -> Source;
    /// Whether events carry the old bytes.
    fn knows_old_bytes(&self) -> bool;
    /// Two frames of RAM the suite may use freely (not adjacent to each other).
    fn frames(&self) -> (Gfn, Gfn);
}

/// One recorded event: gpa, new bytes, old bytes, source, notifier name.
type Seen = (u64, Vec<u8>, Option<Vec<u8>>, Source, &'static str);

#[derive(Debug, Default)]
struct Log {
    events: Mutex<Vec<Seen>>,
    name: &'static str,
    /// Exact events that carried a first-writer hint (the contract: only coalesced ones may).
    hinted_exact: std::sync::atomic::AtomicUsize,
}

impl TrackNotifier for Log {
    fn track_write(&self, e: &WriteEvent<'_>) {
        if !e.is_coalesced() && e.first_writer.is_some() {
            self.hinted_exact
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if let Ok(mut v) = self.events.lock() {
            v.push((
                e.gpa.0,
                e.new.to_vec(),
                e.old.map(<[u8]>::to_vec),
                e.source,
                self.name,
            ));
        }
    }
}

impl Log {
    fn named(name: &'static str) -> Arc<Log> {
        Arc::new(Log {
            events: Mutex::default(),
            name,
            hinted_exact: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn take(&self) -> Vec<Seen> {
        self.events
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

/// Runs the notifier contract against a fresh harness from `make`, panicking on the first
/// violation:
/// - a write to an untracked frame gives no event; to a tracked frame exactly one per
///   notifier, with the address, the new bytes, the old bytes (where the backend knows them)
///   and the source;
/// - writes straddling into a tracked frame report only the tracked part;
/// - counts are references: two adds and one remove keep the frame tracked, the second
///   remove stops its events;
/// - coherence notifiers run before ordinary ones, newest first inside a class;
/// - a dropped handle is never called again.
///
/// # Panics
/// On any violation (this is a test helper).
pub fn assert_notifier_contract<H: Harness>(make: impl Fn() -> H) {
    let mut h = make();
    let t = h.tracker().clone();
    let (a, b) = h.frames();
    let old_log = Log::named("ordinary-old");
    let new_log = Log::named("ordinary-new");
    let coh = Log::named("coherence");
    let h1 = t
        .register(old_log.clone(), NotifierClass::Ordinary)
        .expect("register");
    let h2 = t
        .register(new_log.clone(), NotifierClass::Ordinary)
        .expect("register");
    let h3 = t
        .register(coh.clone(), NotifierClass::Coherence)
        .expect("register");
    let order = Arc::new(Mutex::new(Vec::new()));
    struct Order(Arc<Mutex<Vec<&'static str>>>, &'static str);
    impl TrackNotifier for Order {
        fn track_write(&self, _: &WriteEvent<'_>) {
            if let Ok(mut v) = self.0.lock() {
                v.push(self.1);
            }
        }
    }
    let o1 = t
        .register(
            Arc::new(Order(order.clone(), "ordinary-1")),
            NotifierClass::Ordinary,
        )
        .expect("register");
    let o2 = t
        .register(
            Arc::new(Order(order.clone(), "coherence-1")),
            NotifierClass::Coherence,
        )
        .expect("register");
    let o3 = t
        .register(
            Arc::new(Order(order.clone(), "ordinary-2")),
            NotifierClass::Ordinary,
        )
        .expect("register");

    // Untracked: nothing.
    h.write(a.gpa().0 + 8, &[1, 2, 3, 4]);
    assert!(new_log.take().is_empty(), "event for an untracked frame");

    // Tracked: one event per notifier, exact.
    t.add_gfn(a).expect("add");
    h.write(a.gpa().0 + 8, &[5, 6, 7, 8]);
    let ev = new_log.take();
    assert_eq!(ev.len(), 1, "one event per write: {ev:?}");
    let (gpa, new, old, source, _) = &ev[0];
    assert_eq!(
        (*gpa, new.as_slice(), *source),
        (a.gpa().0 + 8, &[5u8, 6, 7, 8][..], h.source())
    );
    if h.knows_old_bytes() {
        assert_eq!(old.as_deref(), Some(&[1u8, 2, 3, 4][..]), "old bytes");
    }
    assert_eq!(
        new_log
            .hinted_exact
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "an exact event carries a first-writer hint (only coalesced events may)"
    );
    assert_eq!(old_log.take().len(), 1);
    assert_eq!(coh.take().len(), 1);
    assert_eq!(
        *order.lock().expect("not poisoned"),
        ["coherence-1", "ordinary-2", "ordinary-1"],
        "coherence first, newest first within a class"
    );
    drop((o1, o2, o3));

    // Straddling into the tracked frame from below: only the tracked part.
    let below = a.gpa().0 - 4;
    if t.memslots().region_of(AsId::NORMAL, Gfn(a.0 - 1)).is_some() {
        h.write(below, &[9; 8]);
        let ev = new_log.take();
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            (ev[0].0, ev[0].1.len()),
            (a.gpa().0, 4),
            "only the tracked half"
        );
        old_log.take();
        coh.take();
    }

    // References: add twice, remove once: still tracked; remove again: silent.
    t.add_gfn(a).expect("add");
    t.remove_gfn(a).expect("remove");
    h.write(a.gpa().0, &[1]);
    assert_eq!(
        new_log.take().len(),
        1,
        "still tracked after one of two removes"
    );
    t.remove_gfn(a).expect("remove");
    h.write(a.gpa().0, &[2]);
    assert!(
        new_log.take().is_empty(),
        "event after the last remove returned"
    );

    // A dropped handle is never called again.
    old_log.take();
    coh.take();
    t.add_gfn(b).expect("add");
    drop(h2);
    h.write(b.gpa().0, &[3, 3]);
    assert!(new_log.take().is_empty(), "dropped notifier called");
    assert_eq!(old_log.take().len(), 1);
    t.remove_gfn(b).expect("remove");
    drop((h1, h3));
    assert!(!t.has_external_user());
}
