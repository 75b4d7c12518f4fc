//! A multi-threaded model test: proptest generates a short program per thread (single and
//! batched adds and removes that may fail, on two shared frames, a frame outside every slot,
//! and queries), three threads run them at once against one tracker, and the recorded history
//! (each operation's invocation and response in one global order, and its result) must be
//! linearizable against the sequential oracle: some order of the operations, consistent with
//! real time, in which the oracle (a map of counts) gives every result that was observed, and
//! ends in the counts and backend state that the tracker ends in.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns: a failed lock or set-up is a test failure"
)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};

use pagetrack::{
    AsId, BackendError, Enforcement, Error, FrameRun, Gfn, MemoryRegion, PageTracker, SlotId,
    TrackerConfig,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

const THREADS: usize = 3;
/// Frames 1 and 2 are in the slot; 9 is not.
const FRAMES: [u64; 3] = [1, 2, 9];

#[derive(Clone, Debug)]
enum Op {
    Add(u64),
    Remove(u64),
    AddBatch(Vec<u64>),
    RemoveBatch(Vec<u64>),
    Query(u64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Done(Result<(), Error>),
    Tracked(bool),
}

fn op() -> impl Strategy<Value = Op> {
    let frame = proptest::sample::select(&FRAMES[..]);
    let batch = proptest::collection::vec(proptest::sample::select(&FRAMES[..2]), 1..3);
    prop_oneof![
        3 => frame.clone().prop_map(Op::Add),
        3 => frame.clone().prop_map(Op::Remove),
        1 => batch.clone().prop_map(Op::AddBatch),
        1 => batch.prop_map(Op::RemoveBatch),
        2 => frame.prop_map(Op::Query),
    ]
}

fn run(t: &PageTracker, op: &Op) -> Outcome {
    let gfns = |v: &[u64]| v.iter().map(|&g| Gfn(g)).collect::<Vec<_>>();
    match op {
        Op::Add(g) => Outcome::Done(t.add_gfn(Gfn(*g))),
        Op::Remove(g) => Outcome::Done(t.remove_gfn(Gfn(*g))),
        Op::AddBatch(v) => Outcome::Done(t.add_gfns(AsId::NORMAL, &gfns(v))),
        Op::RemoveBatch(v) => Outcome::Done(t.remove_gfns(AsId::NORMAL, &gfns(v))),
        Op::Query(g) => Outcome::Tracked(t.is_write_tracked(AsId::NORMAL, Gfn(*g))),
    }
}

/// The sequential oracle: counts per frame; returns the outcome and applies it.
fn oracle(counts: &mut BTreeMap<u64, u16>, op: &Op) -> Outcome {
    let unknown = |g: u64| Error::UnknownGfn {
        as_id: AsId::NORMAL,
        gfn: Gfn(g),
    };
    let apply = |counts: &mut BTreeMap<u64, u16>, v: &[u64], add: bool| -> Result<(), Error> {
        if let Some(&g) = v.iter().find(|&&g| g == 9) {
            return Err(unknown(g));
        }
        let mut next = counts.clone();
        let mut sorted = v.to_vec();
        sorted.sort_unstable();
        for &g in &sorted {
            let c = next.entry(g).or_insert(0);
            if add {
                *c += 1;
            } else if *c == 0 {
                return Err(Error::NotTracked {
                    as_id: AsId::NORMAL,
                    gfn: Gfn(g),
                });
            } else {
                *c -= 1;
            }
        }
        next.retain(|_, c| *c > 0);
        *counts = next;
        Ok(())
    };
    match op {
        Op::Add(g) => Outcome::Done(apply(counts, &[*g], true)),
        Op::Remove(g) => Outcome::Done(apply(counts, &[*g], false)),
        Op::AddBatch(v) => Outcome::Done(apply(counts, v, true)),
        Op::RemoveBatch(v) => Outcome::Done(apply(counts, v, false)),
        Op::Query(g) => Outcome::Tracked(counts.get(g).is_some_and(|&c| c > 0)),
    }
}

#[derive(Clone, Debug)]
struct Event {
    op: Op,
    outcome: Outcome,
    invoked: u64,
    returned: u64,
}

/// Wing & Gong's search: pick any pending operation invoked before every pending operation's
/// response, check its outcome against the oracle, recurse.
fn linearizable(
    events: &[Event],
    done: &mut Vec<bool>,
    counts: &mut BTreeMap<u64, u16>,
    end: &BTreeMap<u64, u16>,
) -> bool {
    if done.iter().all(|&d| d) {
        return counts == end;
    }
    let horizon = events
        .iter()
        .zip(done.iter())
        .filter(|(_, d)| !**d)
        .map(|(e, _)| e.returned)
        .min()
        .expect("something pending");
    for i in 0..events.len() {
        if done[i] || events[i].invoked > horizon {
            continue;
        }
        let mut next = counts.clone();
        if oracle(&mut next, &events[i].op) != events[i].outcome {
            continue;
        }
        done[i] = true;
        if linearizable(events, done, &mut next, end) {
            return true;
        }
        done[i] = false;
    }
    false
}

/// Records what the backend enforces, so the end state can be compared with the counts.
#[derive(Default)]
struct Protected(Mutex<BTreeMap<u64, bool>>);

impl Enforcement for Protected {
    fn protect(&self, runs: &[FrameRun]) -> Result<(), BackendError> {
        let mut p = self.0.lock().unwrap();
        for (_, g) in FrameRun::pairs(runs) {
            assert!(
                !p.insert(g.0, true).unwrap_or(false),
                "{g:?} protected twice"
            );
        }
        Ok(())
    }
    fn unprotect(&self, runs: &[FrameRun]) -> Result<(), BackendError> {
        let mut p = self.0.lock().unwrap();
        for (_, g) in FrameRun::pairs(runs) {
            assert!(
                p.insert(g.0, false).unwrap_or(false),
                "{g:?} unprotected while not protected"
            );
        }
        Ok(())
    }
}

fn check(programs: &[Vec<Op>]) -> Result<(), TestCaseError> {
    let backend = Arc::new(Protected::default());
    let t = PageTracker::new(TrackerConfig::default(), backend.clone());
    t.set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 8))
        .unwrap();
    t.enable_write_tracking().unwrap();
    let clock = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = programs
        .iter()
        .cloned()
        .map(|prog| {
            let (t, clock, start) = (t.clone(), clock.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                prog.into_iter()
                    .map(|op| {
                        // SeqCst: one global order of invocations and responses.
                        let invoked = clock.fetch_add(1, Ordering::SeqCst);
                        let outcome = run(&t, &op);
                        let returned = clock.fetch_add(1, Ordering::SeqCst);
                        Event {
                            op,
                            outcome,
                            invoked,
                            returned,
                        }
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let events: Vec<Event> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("no thread panicked"))
        .collect();
    let end: BTreeMap<u64, u16> = [1u64, 2]
        .into_iter()
        .map(|g| (g, t.track_count(AsId::NORMAL, Gfn(g)).unwrap()))
        .filter(|&(_, c)| c > 0)
        .collect();
    for g in [1u64, 2] {
        let protected = backend.0.lock().unwrap().get(&g).copied().unwrap_or(false);
        prop_assert_eq!(
            protected,
            end.contains_key(&g),
            "backend and counts disagree on {}",
            g
        );
    }
    let mut done = vec![false; events.len()];
    prop_assert!(
        linearizable(&events, &mut done, &mut BTreeMap::new(), &end),
        "not linearizable: {:#?}",
        events
    );
    Ok(())
}

/// 3 threads × up to 5 operations, 2,000 generated programs, each run 4 times.
#[test]
fn concurrent_histories_linearizable_against_oracle() {
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: 2000,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let programs = proptest::collection::vec(proptest::collection::vec(op(), 1..6), THREADS);
    runner
        .run(&programs, |p| {
            for _ in 0..4 {
                check(&p)?;
            }
            Ok(())
        })
        .unwrap();
}
