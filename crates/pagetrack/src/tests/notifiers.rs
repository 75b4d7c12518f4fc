//! The notifier registry and write dispatch: B24–B32, K9, T6 (as adapted: tracked frames
//! only), T8, T9.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak, mpsc};

use super::support::{
    Hook, Log, Seen, Sink, enabled_tracker, gpa_of, tracker, within_watchdog, write_frame,
};
use crate::{
    AsId, Gfn, Gpa, MemoryRegion, NotifierClass, NotifierHandle, PageTracker, RegisterOptions,
    SlotId, Source, WriteEvent,
};

/// B25, B6, B28: the first registration enables tracking (allocating counts for every slot),
/// sets the sticky external flag, and makes `has_external_user` true.
#[test]
fn register_first_notifier_enables_tracking() {
    let (t, _) = tracker();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 32))
        .unwrap();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 8).in_address_space(AsId::SMM))
        .unwrap();

    let h = t.register(Log::new(), NotifierClass::Ordinary).unwrap();

    assert!(t.is_enabled());
    assert!(t.external_tracking_enabled());
    assert!(t.has_external_user());
    assert_eq!(t.notifier_count(), 1);
    assert_eq!(t.write_track_bytes(), (32 + 8) * 2);
    drop(h);
}

/// B28: `has_external_user` is true exactly while a notifier is registered.
#[test]
fn has_external_user_follows_registrations() {
    let (t, _) = tracker();
    let a = t.register(Log::new(), NotifierClass::Ordinary).unwrap();
    let b = t.register(Log::new(), NotifierClass::Coherence).unwrap();

    drop(a);
    let with_one = t.has_external_user();
    b.unregister().unwrap();

    assert!(with_one);
    assert!(!t.has_external_user());
    assert_eq!(t.notifier_count(), 0);
}

/// B26: coherence notifiers run first, then ordinary ones; newest first inside each class.
#[test]
fn report_write_dispatch_order_coherence_first_lifo_within_class() {
    let (t, _) = enabled_tracker(16);
    let sink = Sink::default();
    let _o1 = t
        .register(Log::shared(1, &sink), NotifierClass::Ordinary)
        .unwrap();
    let _c1 = t
        .register(Log::shared(2, &sink), NotifierClass::Coherence)
        .unwrap();
    let _o2 = t
        .register(
            Log::shared(3, &sink),
            RegisterOptions::new(NotifierClass::Ordinary),
        )
        .unwrap();
    let _c2 = t
        .register(Log::shared(4, &sink), NotifierClass::Coherence)
        .unwrap();
    t.add_gfn(Gfn(1)).unwrap();

    write_frame(&t, Gfn(1), 1);

    let order: Vec<usize> = sink.lock().unwrap().iter().map(|(id, _)| *id).collect();
    assert_eq!(order, vec![4, 2, 3, 1]);
}

/// B25, K9: each handle holds one reference on the tracker; dropping it gives it back.
/// (Registration can only fail on allocation failure while enabling, which cannot be injected
/// here; the code takes the reference only after enabling succeeded, see `register`.)
#[test]
fn register_handle_holds_one_tracker_reference() {
    let (t, _) = tracker();
    let base = Arc::strong_count(&t);

    let a = t.register(Log::new(), NotifierClass::Ordinary).unwrap();
    let b = t.register(Log::new(), NotifierClass::Ordinary).unwrap();
    let with_two = Arc::strong_count(&t);
    drop(a);
    let with_one = Arc::strong_count(&t);
    b.unregister().unwrap();

    assert_eq!(with_two, base + 2);
    assert_eq!(with_one, base + 1);
    assert_eq!(Arc::strong_count(&t), base);
}

/// B25: the handle alone keeps the tracker alive and usable.
#[test]
fn register_drop_tracker_arc_handle_keeps_tracker_alive() {
    let (t, _) = tracker();
    let weak = Arc::downgrade(&t);
    let h = t.register(Log::new(), NotifierClass::Ordinary).unwrap();

    drop(t);
    let alive = weak.upgrade().is_some();
    assert!(h.tracker().is_enabled());
    drop(h);

    assert!(alive);
    assert!(weak.upgrade().is_none());
}

/// B27: after unregistering, the notifier is never called again; the others still are.
#[test]
fn unregister_notifier_never_called_again() {
    let (t, _) = enabled_tracker(16);
    let gone = Log::new();
    let kept = Log::new();
    let h = t.register(gone.clone(), NotifierClass::Ordinary).unwrap();
    let _k = t.register(kept.clone(), NotifierClass::Ordinary).unwrap();
    t.add_gfn(Gfn(2)).unwrap();
    write_frame(&t, Gfn(2), 1);

    h.unregister().unwrap();
    write_frame(&t, Gfn(2), 1);
    t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(0)))
        .unwrap();

    assert_eq!(gone.seen().len(), 1);
    assert_eq!(kept.seen().len(), 3);
}

/// B27: unregistering leaves the notifier's tracks in place (they are the caller's to remove).
#[test]
fn unregister_tracks_stay() {
    let (t, _) = enabled_tracker(16);
    let h = t.register(Log::new(), NotifierClass::Ordinary).unwrap();
    t.add_gfn(Gfn(2)).unwrap();

    drop(h);

    assert!(t.is_write_tracked(AsId::NORMAL, Gfn(2)));
}

/// B31, B32: a write is split at frame boundaries, each tracked piece is delivered with its
/// own address, bytes and slice of the old bytes; untracked pieces are not delivered.
#[test]
fn report_write_spanning_frames_split_and_filtered() {
    let (t, _) = enabled_tracker(16);
    let log = Log::new();
    let _h = t.register(log.clone(), NotifierClass::Ordinary).unwrap();
    t.add_gfns(AsId::NORMAL, &[Gfn(5), Gfn(7)]).unwrap();
    // 4 bytes in frame 4, all of frames 5 and 6, 4 bytes of frame 7.
    let new: Vec<u8> = (0..4096 * 2 + 8_u32)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    let old: Vec<u8> = new.iter().map(|b| !b).collect();
    let start = gpa_of(5) - 4;

    t.report_write(&WriteEvent::new(Gpa(start), &new, Source::Vcpu(3)).with_old(&old));

    let piece = |gpa: u64, from: usize, to: usize| Seen::Write {
        as_id: AsId::NORMAL,
        gpa,
        new: new[from..to].to_vec(),
        old: Some(old[from..to].to_vec()),
        source: Source::Vcpu(3),
    };
    assert_eq!(
        log.seen(),
        vec![
            piece(gpa_of(5), 4, 4 + 4096),
            piece(gpa_of(7), 4 + 8192, 8 + 8192),
        ]
    );
    let stats = t.stats();
    assert_eq!((stats.writes_reported, stats.writes_tracked), (4, 2));
    assert_eq!(stats.bytes_tracked, 4096 + 4);
}

/// B32: only tracked frames are delivered; writes to untracked ones, to frames outside every
/// slot and empty writes are not.
#[test]
fn report_write_untracked_or_empty_not_delivered() {
    let (t, _) = enabled_tracker(16);
    let log = Log::new();
    let _h = t.register(log.clone(), NotifierClass::Ordinary).unwrap();
    t.add_gfn(Gfn(5)).unwrap();

    write_frame(&t, Gfn(6), 8);
    write_frame(&t, Gfn(100), 8);
    write_frame(&t, Gfn(5), 0);

    assert!(log.seen().is_empty());
}

/// B32: the event carries its source and address space, and old bytes only when given.
#[test]
fn report_write_smm_device_event_fields_delivered() {
    let (t, _) = tracker();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 16).in_address_space(AsId::SMM))
        .unwrap();
    let log = Log::new();
    let _h = t.register(log.clone(), NotifierClass::Ordinary).unwrap();
    t.add_gfns(AsId::SMM, &[Gfn(2)]).unwrap();

    t.report_write(
        &WriteEvent::new(Gpa(gpa_of(2) + 16), &[1, 2], Source::Device).in_address_space(AsId::SMM),
    );

    assert_eq!(
        log.seen(),
        vec![Seen::Write {
            as_id: AsId::SMM,
            gpa: gpa_of(2) + 16,
            new: vec![1, 2],
            old: None,
            source: Source::Device,
        }]
    );
}

/// Per-address-space tracking in dispatch: a write through address space 1 to a frame tracked
/// only in address space 0 is not delivered; tracked in address space 1 too, it is, with
/// address space 1.
#[test]
fn report_write_via_other_address_space_needs_its_own_track() {
    let (t, _) = tracker();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 16))
        .unwrap();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 16).in_address_space(AsId::SMM))
        .unwrap();
    let log = Log::new();
    let _h = t.register(log.clone(), NotifierClass::Ordinary).unwrap();
    t.add_gfn(Gfn(2)).unwrap();

    let smm_write = || {
        t.report_write(
            &WriteEvent::new(Gfn(2).gpa(), &[9], Source::Vcpu(0)).in_address_space(AsId::SMM),
        )
    };

    smm_write();
    assert!(log.seen().is_empty());
    t.add_gfns(AsId::SMM, &[Gfn(2)]).unwrap();
    smm_write();
    assert!(matches!(
        log.seen().as_slice(),
        [Seen::Write {
            as_id: AsId::SMM,
            gpa: 0x2000,
            ..
        }]
    ));
}

/// B32: the core delivers exactly the bytes the backend reported (the backend owns memory and
/// calls `report_write` after updating it; nothing is re-read or written here).
#[test]
fn report_write_bytes_delivered_verbatim() {
    let (t, _) = enabled_tracker(16);
    let log = Log::new();
    let _h = t.register(log.clone(), NotifierClass::Ordinary).unwrap();
    t.add_gfn(Gfn(1)).unwrap();

    t.report_write(&WriteEvent::new(
        Gpa(gpa_of(1) + 3),
        &[0xde, 0xad],
        Source::Vcpu(1),
    ));

    assert_eq!(
        log.seen(),
        vec![Seen::write(gpa_of(1) + 3, &[0xde, 0xad], Source::Vcpu(1))]
    );
}

/// Writes before tracking is enabled are counted but never delivered (no notifier can exist).
#[test]
fn report_write_tracking_disabled_only_counted() {
    let (t, _) = tracker();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 4))
        .unwrap();

    write_frame(&t, Gfn(1), 8);

    assert_eq!(t.stats().writes_reported, 1);
    assert_eq!(t.stats().writes_tracked, 0);
}

/// T8: unregister on one thread waits for a callback blocked on another thread; once it
/// returns, the callback has finished and is never invoked again.
#[test]
fn unregister_callback_running_elsewhere_waits_for_it() {
    let (t, _) = enabled_tracker(16);
    t.add_gfn(Gfn(1)).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let entered_tx = Mutex::new(entered_tx);
    let release_rx = Mutex::new(release_rx);
    let (c, f) = (calls.clone(), finished.clone());
    let hook = Hook::on_write(move |_| {
        if c.fetch_add(1, Ordering::SeqCst) == 0 {
            entered_tx.lock().unwrap().send(()).unwrap();
            release_rx.lock().unwrap().recv().unwrap();
        }
        f.fetch_add(1, Ordering::SeqCst);
    });
    let h = t.register(hook, NotifierClass::Ordinary).unwrap();
    let writer = {
        let t = t.clone();
        std::thread::spawn(move || write_frame(&t, Gfn(1), 4))
    };
    entered_rx.recv().unwrap();

    let (done_tx, done_rx) = mpsc::channel();
    let f = finished.clone();
    let unregisterer = std::thread::spawn(move || {
        h.unregister().unwrap();
        let finished_at_return = f.load(Ordering::SeqCst);
        done_tx.send(()).unwrap();
        finished_at_return
    });
    // Wait (without sleeping) until the unregistering thread has unlinked the notifier, i.e.
    // is inside unregister; the callback is still blocked, so it cannot have returned.
    while t.notifier_count() != 0 {
        std::thread::yield_now();
    }
    let returned_early = done_rx.try_recv().is_ok();
    release_tx.send(()).unwrap();
    let finished_at_return = unregisterer.join().unwrap();
    writer.join().unwrap();
    write_frame(&t, Gfn(1), 4);

    assert!(!returned_early);
    assert_eq!(finished_at_return, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// T9: a callback may add and remove tracks (including removing the last track of the frame
/// being delivered) without deadlock.
#[test]
fn track_write_callback_adds_and_removes_no_deadlock() {
    let (t, _) = enabled_tracker(16);
    t.add_gfn(Gfn(1)).unwrap();
    let weak: Weak<PageTracker> = Arc::downgrade(&t);
    let results = Arc::new(Mutex::new(Vec::new()));
    let r = results.clone();
    let hook = Hook::on_write(move |e| {
        let t = weak.upgrade().unwrap();
        let mut r = r.lock().unwrap();
        r.push(t.add_gfn(Gfn(9)));
        r.push(t.add_gfns(AsId::NORMAL, &[Gfn(10), Gfn(10)]));
        r.push(t.remove_gfn(e.gfn()));
        r.push(t.remove_gfn(Gfn(10)));
    });
    let _h = t.register(hook, NotifierClass::Ordinary).unwrap();

    let t2 = t.clone();
    within_watchdog(move || write_frame(&t2, Gfn(1), 4));

    assert_eq!(*results.lock().unwrap(), vec![Ok(()); 4]);
    assert!(!t.is_write_tracked(AsId::NORMAL, Gfn(1)));
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(9)), Ok(1));
    assert_eq!(t.track_count(AsId::NORMAL, Gfn(10)), Ok(1));
}

/// A callback may report a nested write (a device model writing in response) and register
/// another notifier; the nested write is delivered too.
#[test]
fn track_write_callback_nested_write_and_register_no_deadlock() {
    let (t, _) = enabled_tracker(16);
    t.add_gfns(AsId::NORMAL, &[Gfn(1), Gfn(2)]).unwrap();
    let weak: Weak<PageTracker> = Arc::downgrade(&t);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handles: Arc<Mutex<Vec<NotifierHandle>>> = Arc::default();
    let (s, hs) = (seen.clone(), handles.clone());
    let hook = Hook::on_write(move |e| {
        s.lock().unwrap().push(e.gfn());
        let t = weak.upgrade().unwrap();
        if e.gfn() == Gfn(1) {
            write_frame(&t, Gfn(2), 1);
            hs.lock()
                .unwrap()
                .push(t.register(Log::new(), NotifierClass::Ordinary).unwrap());
        }
    });
    let _h = t.register(hook, NotifierClass::Ordinary).unwrap();

    let t2 = t.clone();
    within_watchdog(move || write_frame(&t2, Gfn(1), 1));

    assert_eq!(*seen.lock().unwrap(), vec![Gfn(1), Gfn(2)]);
    assert_eq!(t.notifier_count(), 2);
    handles.lock().unwrap().clear();
}

/// R4: dropping the handle from inside its own callback does not deadlock, and the notifier is
/// not called again afterwards.
#[test]
fn drop_handle_inside_own_callback_no_deadlock() {
    let (t, _) = enabled_tracker(16);
    t.add_gfn(Gfn(1)).unwrap();
    let slot: Arc<OnceLock<Mutex<Option<NotifierHandle>>>> = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let (s, c) = (slot.clone(), calls.clone());
    let hook = Hook::on_write(move |_| {
        c.fetch_add(1, Ordering::SeqCst);
        let handle = s.get().unwrap().lock().unwrap().take();
        drop(handle);
    });
    let h = t.register(hook, NotifierClass::Ordinary).unwrap();
    slot.set(Mutex::new(Some(h))).unwrap();

    let t2 = t.clone();
    within_watchdog(move || {
        write_frame(&t2, Gfn(1), 1);
        write_frame(&t2, Gfn(1), 1);
    });

    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(t.notifier_count(), 0);
}

/// A callback that unregisters a *different* notifier waits only for that one's other calls.
#[test]
fn unregister_other_notifier_inside_callback_no_deadlock() {
    let (t, _) = enabled_tracker(16);
    t.add_gfn(Gfn(1)).unwrap();
    let other = Log::new();
    let other_handle = t.register(other.clone(), NotifierClass::Ordinary).unwrap();
    let slot = Arc::new(Mutex::new(Some(other_handle)));
    let done = Arc::new(AtomicBool::new(false));
    let (s, d) = (slot.clone(), done.clone());
    // Registered later, so it runs first and removes `other` before its turn.
    let hook = Hook::on_write(move |_| {
        if let Some(h) = s.lock().unwrap().take() {
            h.unregister().unwrap();
            d.store(true, Ordering::SeqCst);
        }
    });
    let _h = t.register(hook, NotifierClass::Ordinary).unwrap();

    let t2 = t.clone();
    within_watchdog(move || write_frame(&t2, Gfn(1), 1));

    assert!(done.load(Ordering::SeqCst));
    assert!(other.seen().is_empty());
    assert_eq!(t.notifier_count(), 1);
}

/// The per-thread reader answers and dispatches exactly like the tracker, and sees slots and
/// tracks that change after it was made.
#[test]
fn reader_matches_tracker_across_changes() {
    let (t, _) = enabled_tracker(16);
    let log = Log::new();
    let _h = t.register(log.clone(), NotifierClass::Ordinary).unwrap();
    let mut r = t.reader();
    assert!(!r.is_write_tracked(AsId::NORMAL, Gfn(3)));

    t.add_gfn(Gfn(3)).unwrap();
    t.set_memory_region(MemoryRegion::new(SlotId(1), Gfn(100), 4))
        .unwrap();
    t.add_gfn(Gfn(101)).unwrap();

    assert!(r.is_write_tracked(AsId::NORMAL, Gfn(3)));
    assert!(r.is_write_tracked(AsId::NORMAL, Gfn(101)));
    assert!(!r.is_write_tracked(AsId::NORMAL, Gfn(4)));
    r.report_write(&WriteEvent::new(Gfn(101).gpa(), &[7; 4], Source::Vcpu(1)));
    r.report_write(&WriteEvent::new(Gfn(4).gpa(), &[7; 4], Source::Vcpu(1)));
    assert_eq!(log.seen().len(), 1);
    assert_eq!(t.stats().writes_reported, 2);
}

/// The reader's slot hint is only a guess: across slots of both address spaces, deletions that
/// shrink the slot list and re-creations that move a slot's position, every answer equals the
/// tracker's.
#[test]
fn reader_slot_hint_never_wrong_across_slot_changes() {
    let (t, _) = tracker();
    for (i, base) in [(0u16, 0u64), (1, 100), (2, 200)] {
        t.set_memory_region(MemoryRegion::new(SlotId(i), Gfn(base), 8))
            .unwrap();
    }
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(100), 8).in_address_space(AsId::SMM))
        .unwrap();
    t.enable_write_tracking().unwrap();
    t.add_gfns(AsId::NORMAL, &[Gfn(1), Gfn(201)]).unwrap();
    t.add_gfns(AsId::SMM, &[Gfn(102)]).unwrap();
    let mut r = t.reader();
    let probes = [0u64, 1, 101, 102, 201, 202, 300, 7, 107];
    let check = |r: &mut crate::TrackReader| {
        for as_id in [AsId::NORMAL, AsId::SMM, AsId(5)] {
            for &g in &probes {
                assert_eq!(
                    r.is_write_tracked(as_id, Gfn(g)),
                    t.is_write_tracked(as_id, Gfn(g)),
                    "{as_id} gfn {g}"
                );
            }
        }
    };
    check(&mut r);
    t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(0)))
        .unwrap();
    check(&mut r);
    t.set_memory_region(MemoryRegion::delete(AsId::NORMAL, SlotId(2)))
        .unwrap();
    check(&mut r);
    t.set_memory_region(MemoryRegion::new(SlotId(2), Gfn(0), 8))
        .unwrap();
    t.add_gfn(Gfn(1)).unwrap();
    check(&mut r);
}

/// `Enforcement::before_unregister` runs once when a handle of a notifier that accepts
/// coalesced events is dropped (so a coalescing backend reports what it holds while that
/// notifier is still registered), and not for a notifier of exact events.
#[test]
fn dropping_a_coalesced_notifier_asks_the_backend_to_report_first() {
    let (t, backend) = tracker();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 8))
        .unwrap();
    let exact = t.register(Log::new(), NotifierClass::Ordinary).unwrap();
    let coalesced = t
        .register(
            Log::new(),
            RegisterOptions::new(NotifierClass::Ordinary).with_delivery(crate::Delivery::Coalesced),
        )
        .unwrap();
    drop(exact);
    assert_eq!(backend.unregisters.load(Ordering::SeqCst), 0);
    drop(coalesced);
    assert_eq!(backend.unregisters.load(Ordering::SeqCst), 1);
    assert_eq!(t.notifier_count(), 0);
}

/// A backend that holds one write back (as a coalescing backend does) and reports it at
/// `before_register`, and records the hook calls with the notifier count at each.
#[derive(Default)]
struct Holding {
    tracker: OnceLock<Weak<PageTracker>>,
    calls: Mutex<Vec<(&'static str, crate::Delivery, usize)>>,
}

impl crate::Enforcement for Holding {
    fn protect(&self, _: &[crate::FrameRun]) -> Result<(), crate::BackendError> {
        Ok(())
    }

    fn unprotect(&self, _: &[crate::FrameRun]) -> Result<(), crate::BackendError> {
        Ok(())
    }

    fn before_register(&self, delivery: crate::Delivery) {
        let t = self.tracker.get().and_then(Weak::upgrade).unwrap();
        self.calls
            .lock()
            .unwrap()
            .push(("before", delivery, t.notifier_count()));
        t.report_write(&WriteEvent::new(Gpa(gpa_of(1)), &[7], Source::Guest));
    }

    fn after_register(&self, delivery: crate::Delivery) {
        let t = self.tracker.get().and_then(Weak::upgrade).unwrap();
        self.calls
            .lock()
            .unwrap()
            .push(("after", delivery, t.notifier_count()));
    }
}

/// `Enforcement::before_register` runs before the new notifier is visible (what the backend
/// reports there reaches only the notifiers registered already), `after_register` once it
/// is; from inside a callback neither runs.
#[test]
fn a_backend_reports_what_it_holds_before_a_notifier_registers() {
    let backend = Arc::new(Holding::default());
    let t = PageTracker::new(crate::TrackerConfig::default(), backend.clone());
    backend.tracker.set(Arc::downgrade(&t)).unwrap();
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 8))
        .unwrap();
    t.enable_write_tracking().unwrap();
    t.add_gfn(Gfn(1)).unwrap();
    let old = Log::new();
    let old_h = t
        .register(
            old.clone(),
            RegisterOptions::new(NotifierClass::Ordinary).with_delivery(crate::Delivery::Coalesced),
        )
        .unwrap();
    // The first registration's report went to nobody.
    assert!(old.seen().is_empty());
    let new = Log::new();
    let new_h = t.register(new.clone(), NotifierClass::Ordinary).unwrap();
    assert_eq!(old.seen(), [Seen::write(gpa_of(1), &[7], Source::Guest)]);
    assert!(
        new.seen().is_empty(),
        "the held write reached the new notifier"
    );
    use crate::Delivery::{Coalesced, EachWrite};
    assert_eq!(
        *backend.calls.lock().unwrap(),
        [
            ("before", Coalesced, 0),
            ("after", Coalesced, 1),
            ("before", EachWrite, 1),
            ("after", EachWrite, 2)
        ]
    );
    // From a callback: no hook (the backend must not report from inside a delivery).
    let inner: Arc<Mutex<Vec<NotifierHandle>>> = Arc::default();
    let (t2, inner2) = (Arc::downgrade(&t), inner.clone());
    let registering = Hook::on_write(move |_| {
        if let Some(t) = t2.upgrade() {
            inner2
                .lock()
                .unwrap()
                .push(t.register(Log::new(), NotifierClass::Ordinary).unwrap());
        }
    });
    let reg_h = t.register(registering, NotifierClass::Ordinary).unwrap();
    let before = backend.calls.lock().unwrap().len();
    write_frame(&t, Gfn(1), 1);
    assert_eq!(
        inner.lock().unwrap().len(),
        1,
        "registered from the callback"
    );
    assert_eq!(backend.calls.lock().unwrap().len(), before);
    drop((old_h, new_h, reg_h));
    inner.lock().unwrap().clear();
}
