//! Threaded stress tests of the concurrency guarantees: unregister against blocked callbacks,
//! concurrent add/remove/query with exact final counts, and "after the last remove returns,
//! no event for the frame is delivered". Synchronisation uses barriers, channels and atomics;
//! the only timeout is a watchdog that turns a deadlock into a failure.

mod common;
#[cfg(feature = "notifiers")]
use common::{spin, write};
use common::{tracker_with_slot, watchdog};

/// (a) Unregister while callbacks block.
#[cfg(feature = "notifiers")]
mod unregister {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    use pagetrack::{AsId, Gfn, NoEnforcement, NotifierClass, TrackNotifier, WriteEvent};

    use super::{spin, tracker_with_slot, watchdog, write};

    /// A notifier whose first call blocks on a barrier (so unregistration starts while it runs),
    /// then every call spins briefly; it counts calls that start, or are still running, after
    /// `unregister` returned.
    struct Blocking {
        barrier: Barrier,
        first: AtomicBool,
        active: AtomicUsize,
        calls: AtomicUsize,
        unregistered: AtomicBool,
        late: AtomicUsize,
    }

    impl TrackNotifier for Blocking {
        fn track_write(&self, _: &WriteEvent<'_>) {
            if self.unregistered.load(Ordering::SeqCst) {
                self.late.fetch_add(1, Ordering::SeqCst);
            }
            self.active.fetch_add(1, Ordering::SeqCst);
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.first.swap(false, Ordering::SeqCst) {
                self.barrier.wait();
            }
            spin(2_000);
            self.active.fetch_sub(1, Ordering::SeqCst);
            if self.unregistered.load(Ordering::SeqCst) {
                self.late.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// T8, B27: 200 times: two writers keep a callback busy (the first call blocks until the
    /// unregistering thread is ready); once `unregister` returns, no call of the notifier is
    /// running and none starts, while writes go on.
    #[test]
    fn unregister_with_blocked_callbacks_no_call_after_return() {
        watchdog(300, || {
            for _ in 0..200 {
                let t = tracker_with_slot(16, Arc::new(NoEnforcement));
                t.add_gfns(AsId::NORMAL, &[Gfn(1), Gfn(2)]).unwrap();
                let n = Arc::new(Blocking {
                    barrier: Barrier::new(2),
                    first: AtomicBool::new(true),
                    active: AtomicUsize::new(0),
                    calls: AtomicUsize::new(0),
                    unregistered: AtomicBool::new(false),
                    late: AtomicUsize::new(0),
                });
                let h = t.register(n.clone(), NotifierClass::Ordinary).unwrap();
                let stop = Arc::new(AtomicBool::new(false));
                let progress = Arc::new(AtomicUsize::new(0));
                let writers: Vec<_> = (0..2u64)
                    .map(|w| {
                        let (t, stop, progress) = (t.clone(), stop.clone(), progress.clone());
                        std::thread::spawn(move || {
                            while !stop.load(Ordering::SeqCst) {
                                // Inside frame 1, or spanning frames 1 and 2.
                                write(&t, if w == 0 { 0x1008 } else { 0x1ffc }, 8);
                                progress.fetch_add(1, Ordering::SeqCst);
                            }
                        })
                    })
                    .collect();

                n.barrier.wait();
                h.unregister().unwrap();
                n.unregistered.store(true, Ordering::SeqCst);
                let active_at_return = n.active.load(Ordering::SeqCst);
                let seen = progress.load(Ordering::SeqCst);
                while progress.load(Ordering::SeqCst) < seen + 20 {
                    std::thread::yield_now();
                }
                stop.store(true, Ordering::SeqCst);
                for w in writers {
                    w.join().unwrap();
                }

                assert_eq!(active_at_return, 0);
                assert_eq!(n.late.load(Ordering::SeqCst), 0);
                assert!(n.calls.load(Ordering::SeqCst) >= 1);
                assert_eq!(t.notifier_count(), 0);
            }
        });
    }
}

/// (b) Concurrent add/remove/query.
mod counts {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

    use pagetrack::{AsId, BackendError, Enforcement, FrameRun, Gfn};

    use super::{tracker_with_slot, watchdog};

    /// A backend that checks the transitions it is told about stay consistent per frame: protect
    /// only an unprotected frame, unprotect only a protected one.
    #[derive(Default)]
    struct Transitions {
        state: [AtomicI64; FRAMES],
        errors: AtomicUsize,
    }

    const FRAMES: usize = 8;

    impl Transitions {
        fn flip(&self, frames: &[FrameRun], from: i64, to: i64) {
            for (_, g) in FrameRun::pairs(frames) {
                let s = &self.state[usize::try_from(g.0).expect("small frame")];
                if s.compare_exchange(from, to, Ordering::SeqCst, Ordering::SeqCst)
                    .is_err()
                {
                    self.errors.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }

    impl Enforcement for Transitions {
        fn protect(&self, frames: &[FrameRun]) -> Result<(), BackendError> {
            self.flip(frames, 0, 1);
            Ok(())
        }
        fn unprotect(&self, frames: &[FrameRun]) -> Result<(), BackendError> {
            self.flip(frames, 1, 0);
            Ok(())
        }
    }

    /// B14, B19, T1: three threads add and remove (single and batched, with duplicates) on the same
    /// eight frames, each removing only references it added. A frame a thread holds is always seen
    /// tracked; the final counts are exactly the sums of what each thread still holds, and the
    /// backend saw a consistent 0 → 1 / 1 → 0 sequence per frame.
    #[test]
    fn concurrent_add_remove_query_final_counts_exact() {
        watchdog(300, || {
            let backend = Arc::new(Transitions::default());
            let t = tracker_with_slot(FRAMES as u64, backend.clone());
            let threads: Vec<_> = (0..3u64)
                .map(|seed| {
                    let t = t.clone();
                    std::thread::spawn(move || {
                        let mut held = [0u16; FRAMES];
                        let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ (seed + 1);
                        let mut next = move || {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            x
                        };
                        let mut missed = 0usize;
                        for _ in 0..20_000 {
                            let r = next();
                            let g = r % FRAMES as u64;
                            let i = usize::try_from(g).unwrap();
                            match (r >> 8) % 6 {
                                0 | 1 => {
                                    t.add_gfn(Gfn(g)).unwrap();
                                    held[i] += 1;
                                }
                                2 if held[i] > 0 => {
                                    t.remove_gfn(Gfn(g)).unwrap();
                                    held[i] -= 1;
                                }
                                3 => {
                                    let h = (g + 1) % FRAMES as u64;
                                    t.add_gfns(AsId::NORMAL, &[Gfn(g), Gfn(h), Gfn(g)]).unwrap();
                                    held[i] += 2;
                                    held[usize::try_from(h).unwrap()] += 1;
                                }
                                4 if held[i] >= 2 => {
                                    t.remove_gfns(AsId::NORMAL, &[Gfn(g), Gfn(g)]).unwrap();
                                    held[i] -= 2;
                                }
                                _ => {}
                            }
                            for (f, &n) in held.iter().enumerate() {
                                if n > 0 && !t.is_write_tracked(AsId::NORMAL, Gfn(f as u64)) {
                                    missed += 1;
                                }
                            }
                        }
                        (held, missed)
                    })
                })
                .collect();
            let mut total = [0u64; FRAMES];
            for th in threads {
                let (held, missed) = th.join().unwrap();
                assert_eq!(missed, 0, "a held frame was seen untracked");
                for (t, h) in total.iter_mut().zip(held) {
                    *t += u64::from(h);
                }
            }

            for (g, (&held, protected)) in (0u64..).zip(total.iter().zip(&backend.state)) {
                assert_eq!(
                    u64::from(t.track_count(AsId::NORMAL, Gfn(g)).unwrap()),
                    held
                );
                assert_eq!(t.is_write_tracked(AsId::NORMAL, Gfn(g)), held > 0);
                assert_eq!(protected.load(Ordering::SeqCst), i64::from(held > 0));
            }
            assert_eq!(backend.errors.load(Ordering::SeqCst), 0);
        });
    }
}

/// (c) The last remove stops events.
#[cfg(feature = "notifiers")]
mod last_remove {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use pagetrack::{Gfn, NoEnforcement, NotifierClass};

    use super::common::{Finish, SEQ};
    use super::{tracker_with_slot, watchdog, write};

    const ROUNDS: u64 = 200;

    /// After the last `remove_gfn` of a frame returns, no `track_write` for it starts or is still
    /// running. Frame i is tracked in round i only: it is added, written by two threads until a
    /// callback was seen, removed, and then a sequence number r_i is taken. Every callback for
    /// frame i takes its number as it finishes; if one finished (or ran) after the remove returned,
    /// its number would follow r_i in the single modification order of `SEQ`. The check is sound:
    /// a number below r_i cannot come from a callback that finished after the remove returned.
    #[test]
    fn last_remove_returned_no_event_for_frame_after() {
        watchdog(300, || {
            let t = tracker_with_slot(ROUNDS + 2, Arc::new(NoEnforcement));
            let n = Finish::new(ROUNDS + 2, 500);
            let _h = t.register(n.clone(), NotifierClass::Ordinary).unwrap();
            let current = Arc::new(AtomicU64::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let writers: Vec<_> = (0..2u64)
                .map(|w| {
                    let (t, current, stop) = (t.clone(), current.clone(), stop.clone());
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::SeqCst) {
                            let g = current.load(Ordering::SeqCst);
                            if w == 0 {
                                write(&t, g * 0x1000 + 8, 8);
                            } else {
                                // Spans the previous frame (already removed) into this one.
                                write(&t, (g * 0x1000).saturating_sub(4), 16);
                            }
                        }
                    })
                })
                .collect();

            let mut removed_at = Vec::new();
            for i in 0..ROUNDS {
                t.add_gfn(Gfn(i)).unwrap();
                current.store(i, Ordering::SeqCst);
                let idx = usize::try_from(i).unwrap();
                while n.hits[idx].load(Ordering::SeqCst) == 0 {
                    std::thread::yield_now();
                }
                t.remove_gfn(Gfn(i)).unwrap();
                removed_at.push(SEQ.fetch_add(1, Ordering::SeqCst));
            }
            stop.store(true, Ordering::SeqCst);
            for w in writers {
                w.join().unwrap();
            }

            for (i, &r) in removed_at.iter().enumerate() {
                let last = n.last[i].load(Ordering::SeqCst);
                assert!(n.hits[i].load(Ordering::SeqCst) > 0);
                assert!(
                    last < r,
                    "frame {i}: callback finished at {last}, remove returned at {r}"
                );
            }
        });
    }
}
