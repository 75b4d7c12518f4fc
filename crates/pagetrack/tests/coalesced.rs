//! Coalesced events: the opt-in per notifier and the epoch mark through dispatch.
#![cfg(feature = "notifiers")]

use std::sync::{Arc, Mutex};

use pagetrack::{
    Delivery, Gfn, Gpa, MemoryRegion, NoEnforcement, NotifierClass, PageTracker, RegisterOptions,
    SlotId, Source, TrackNotifier, TrackerConfig, WriteEvent,
};

/// One delivered event: address, new bytes, epoch, source.
type Seen = (u64, Vec<u8>, Option<u64>, Source);

#[derive(Default)]
struct Log(Mutex<Vec<Seen>>);

impl TrackNotifier for Log {
    fn track_write(&self, e: &WriteEvent<'_>) {
        self.0
            .lock()
            .expect("not poisoned")
            .push((e.gpa.0, e.new.to_vec(), e.coalesced, e.source));
    }
}

fn tracker() -> Arc<PageTracker> {
    let t = PageTracker::new(TrackerConfig::default(), Arc::new(NoEnforcement));
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 64))
        .expect("a slot");
    t
}

#[test]
fn accepts_coalesced_only_while_every_notifier_opted_in() {
    let t = tracker();
    assert!(!t.accepts_coalesced(), "no notifier: nobody to deliver to");
    let relaxed = RegisterOptions::new(NotifierClass::Ordinary).with_delivery(Delivery::Coalesced);
    let a = t
        .register(Arc::new(Log::default()), relaxed)
        .expect("register");
    assert!(t.accepts_coalesced());
    let strict = t
        .register(Arc::new(Log::default()), NotifierClass::Coherence)
        .expect("register");
    assert!(
        !t.accepts_coalesced(),
        "an exact notifier pins everything strict"
    );
    drop(strict);
    assert!(t.accepts_coalesced());
    drop(a);
    assert!(!t.accepts_coalesced());
}

#[test]
fn a_coalesced_event_keeps_its_epoch_in_every_piece_and_strict_ones_have_none() {
    let t = tracker();
    let log = Arc::new(Log::default());
    let _h = t
        .register(
            log.clone(),
            RegisterOptions::new(NotifierClass::Ordinary).with_delivery(Delivery::Coalesced),
        )
        .expect("register");
    t.add_gfn(Gfn(1)).expect("track");
    t.add_gfn(Gfn(2)).expect("track");
    let bytes = [7u8; 8];
    let old = [0u8; 8];
    t.report_write(
        &WriteEvent::new(Gpa(0x1ffc), &bytes, Source::Guest)
            .with_old(&old)
            .in_epoch(9),
    );
    t.report_write(&WriteEvent::new(Gpa(0x1000), &bytes[..1], Source::Vcpu(0)));
    let got = log.0.lock().expect("not poisoned").clone();
    assert_eq!(
        got,
        vec![
            (0x1ffc, vec![7; 4], Some(9), Source::Guest),
            (0x2000, vec![7; 4], Some(9), Source::Guest),
            (0x1000, vec![7], None, Source::Vcpu(0)),
        ]
    );
    assert_eq!(Source::Guest.to_string(), "guest");
}
