//! Model checks of the two hand-written concurrency protocols with `loom`, which runs every
//! interleaving (up to a preemption bound) under the C11 memory model. Built only with
//! `RUSTFLAGS="--cfg loom"`; `scripts/test` runs them:
//!
//! ```sh
//! RUSTFLAGS="--cfg loom" cargo test -p pagetrack --release --lib loom
//! ```
//!
//! Each model checks its guarantee with a mutex-protected witness, so a violation is caught in
//! whichever order the two sides reach the witness:
//! - grace: two removers (each untracks its own frame, then waits) and two dispatchers (each a
//!   read section that delivers for frames it sees tracked): no delivery is running or starts
//!   once a remover returned;
//! - unregister: two dispatchers calling a notifier and a third thread unregistering it, and
//!   unregistering from inside the notifier's own callback while another dispatcher is in it:
//!   no call runs or starts once unregistration returned, and nothing hangs (loom reports a
//!   deadlock as a failure).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use loom::sync::Mutex;
use loom::sync::atomic::AtomicBool;
use loom::thread;

use crate::grace::Grace;
use crate::notifier::{Entry, RegisterOptions, TrackNotifier};

/// A bounded model: loom's exhaustive search with at most `bound` preemptions per execution.
fn model(bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(bound);
    b.check(f);
}

/// What a remover has done and what dispatchers are doing, per frame.
#[derive(Debug, Default)]
struct Witness {
    returned: [bool; 2],
    delivering: [u32; 2],
}

#[test]
fn grace_two_removers_two_dispatchers_no_delivery_after_return() {
    model(3, || {
        let grace = Arc::new(Grace::new());
        let tracked = Arc::new([AtomicBool::new(true), AtomicBool::new(true)]);
        let witness = Arc::new(Mutex::new(Witness::default()));
        let mut threads = Vec::new();
        for f in 0..2 {
            let (grace, tracked, witness) = (grace.clone(), tracked.clone(), witness.clone());
            threads.push(thread::spawn(move || {
                // The count store of a last remove: Relaxed, as in `apply_frame`.
                tracked[f].store(false, Ordering::Relaxed);
                grace.synchronize();
                let mut w = witness.lock().expect("not poisoned");
                assert_eq!(
                    w.delivering[f], 0,
                    "remover of frame {f} returned during a delivery"
                );
                w.returned[f] = true;
            }));
        }
        for _ in 0..2 {
            let (grace, tracked, witness) = (grace.clone(), tracked.clone(), witness.clone());
            threads.push(thread::spawn(move || {
                let _section = grace.read();
                for f in 0..2 {
                    if tracked[f].load(Ordering::Relaxed) {
                        let mut w = witness.lock().expect("not poisoned");
                        assert!(
                            !w.returned[f],
                            "delivery for frame {f} after its remove returned"
                        );
                        w.delivering[f] += 1;
                        drop(w);
                        witness.lock().expect("not poisoned").delivering[f] -= 1;
                    }
                }
            }));
        }
        for t in threads {
            t.join().expect("no thread panicked");
        }
    });
}

/// A remover and a stream of two back-to-back sections on another thread: the remover waits
/// only for sections that began before it, so it returns (loom fails a livelock or deadlock).
#[test]
fn grace_remover_does_not_wait_for_later_sections() {
    model(3, || {
        let grace = Arc::new(Grace::new());
        let tracked = Arc::new(AtomicBool::new(true));
        let g2 = grace.clone();
        let t2 = tracked.clone();
        let reader = thread::spawn(move || {
            for _ in 0..2 {
                let _s = g2.read();
                let _ = t2.load(Ordering::Relaxed);
            }
        });
        tracked.store(false, Ordering::Relaxed);
        grace.synchronize();
        reader.join().expect("reader ran");
    });
}

struct Quiet;
impl TrackNotifier for Quiet {}

#[derive(Debug, Default)]
struct Calls {
    unregistered: bool,
    running: u32,
}

fn entry() -> Arc<Entry> {
    Arc::new(Entry::new(Arc::new(Quiet), RegisterOptions::default()))
}

/// One callback body: no call may run once unregistration returned.
fn callback(calls: &Mutex<Calls>) {
    let mut c = calls.lock().expect("not poisoned");
    assert!(
        !c.unregistered,
        "callback started after unregister returned"
    );
    c.running += 1;
    drop(c);
    calls.lock().expect("not poisoned").running -= 1;
}

#[test]
fn unregister_two_dispatchers_no_call_after_return() {
    model(3, || {
        let e = entry();
        let calls = Arc::new(Mutex::new(Calls::default()));
        let dispatchers: Vec<_> = (0..2)
            .map(|_| {
                let (e, calls) = (e.clone(), calls.clone());
                thread::spawn(move || e.call(1, |_| callback(&calls)))
            })
            .collect();
        e.retire(0);
        let mut c = calls.lock().expect("not poisoned");
        assert_eq!(c.running, 0, "unregister returned during a call");
        c.unregistered = true;
        drop(c);
        for d in dispatchers {
            d.join().expect("dispatcher ran");
        }
    });
}

/// Unregistering from inside the notifier's own callback while another thread is inside the
/// same notifier: waits for that thread only (the bug: only a count reaching 0 woke the
/// waiter, so this hung forever).
#[test]
fn unregister_from_own_callback_while_other_thread_inside_returns() {
    model(3, || {
        let e = entry();
        let calls = Arc::new(Mutex::new(Calls::default()));
        let (e2, calls2) = (e.clone(), calls.clone());
        let other = thread::spawn(move || e2.call(1, |_| callback(&calls2)));
        let e3 = e.clone();
        e.call(1, |_| {
            e3.retire(1);
            let mut c = calls.lock().expect("not poisoned");
            assert_eq!(
                c.running, 0,
                "own unregister returned while another call ran"
            );
            c.unregistered = true;
        });
        other.join().expect("other dispatcher ran");
    });
}

/// A panicking callback still ends its in-flight call: unregistering afterwards returns.
#[test]
fn unregister_after_panicking_callback_returns() {
    model(3, || {
        let e = entry();
        let e2 = e.clone();
        let t = thread::spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                e2.call(1, |_| panic!("callback panics"));
            }));
            assert!(r.is_err());
        });
        t.join().expect("thread ran");
        e.retire(0);
    });
}

// ---- Models added by the review of issue 9. ----

/// Review: three removers (each its own frame) against one dispatcher with two back-to-back
/// sections, preemption bound 2: the serialized slow path and the unserialized fast path
/// interleave in every order. Held.
#[test]
fn review_grace_three_removers_reader_two_sections() {
    model(2, || {
        let grace = Arc::new(Grace::new());
        let tracked = Arc::new([
            AtomicBool::new(true),
            AtomicBool::new(true),
            AtomicBool::new(true),
        ]);
        let returned = Arc::new([
            AtomicBool::new(false),
            AtomicBool::new(false),
            AtomicBool::new(false),
        ]);
        let mut threads = Vec::new();
        for f in 0..3 {
            let (grace, tracked, returned) = (grace.clone(), tracked.clone(), returned.clone());
            threads.push(thread::spawn(move || {
                tracked[f].store(false, Ordering::Relaxed);
                grace.synchronize();
                returned[f].store(true, Ordering::SeqCst);
            }));
        }
        for _ in 0..2 {
            let _s = grace.read();
            for f in 0..3 {
                if tracked[f].load(Ordering::Relaxed) {
                    // A delivery: its remover must not have returned, neither now nor at the
                    // end of the delivery.
                    assert!(!returned[f].load(Ordering::SeqCst), "delivery after return");
                    thread::yield_now();
                    assert!(
                        !returned[f].load(Ordering::SeqCst),
                        "return during delivery"
                    );
                }
            }
        }
        for t in threads {
            t.join().expect("no thread panicked");
        }
    });
}

/// Review: a dispatch (read section around a notifier call) against a remover and an
/// unregisterer at once: no delivery after the remove returned, no call after the unregister
/// returned, no hang. Held.
#[test]
fn review_grace_and_unregister_together() {
    model(2, || {
        let grace = Arc::new(Grace::new());
        let e = entry();
        let tracked = Arc::new(AtomicBool::new(true));
        let removed = Arc::new(AtomicBool::new(false));
        let unregistered = Arc::new(AtomicBool::new(false));
        let (g2, t2) = (grace.clone(), tracked.clone());
        let (r2, u2) = (removed.clone(), unregistered.clone());
        let remover = thread::spawn(move || {
            t2.store(false, Ordering::Relaxed);
            g2.synchronize();
            r2.store(true, Ordering::SeqCst);
        });
        let e2 = e.clone();
        let unreg = thread::spawn(move || {
            e2.retire(0);
            u2.store(true, Ordering::SeqCst);
        });
        {
            let _s = grace.read();
            if tracked.load(Ordering::Relaxed) {
                e.call(1, |_| {
                    assert!(
                        !removed.load(Ordering::SeqCst),
                        "delivery after remove returned"
                    );
                    assert!(
                        !unregistered.load(Ordering::SeqCst),
                        "call after unregister"
                    );
                    thread::yield_now();
                    assert!(
                        !removed.load(Ordering::SeqCst),
                        "remove returned mid-delivery"
                    );
                    assert!(
                        !unregistered.load(Ordering::SeqCst),
                        "unregister returned mid-call"
                    );
                });
            }
        }
        remover.join().expect("remover ran");
        unreg.join().expect("unregisterer ran");
    });
}
