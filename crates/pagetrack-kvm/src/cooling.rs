//! Cold demotion for the auto policy (issue 12 item 4, `docs/RELAXED.md`): which relaxed
//! frames have stayed clean long enough to go back to strict, and the hysteresis that keeps a
//! frame from flapping. Pure bookkeeping (time is passed in); `relaxed.rs` does the switches.
//!
//! - A relaxed frame is *cold* once no sync found it dirty for `syncs` consecutive syncs
//!   **and** for `window` of time since it was last dirty (or promoted), both scaled by
//!   `2^level` (below). Bookkeeping is O(dirty frames) per sync: every dirty frame pushes one
//!   entry on a queue ordered by sync number; a due check pops entries from the front while
//!   they are old enough and skips those a later dirty entry superseded.
//! - Hysteresis: a demoted frame is remembered for `cooldown`. While remembered, its own
//!   trapped stores promote it only after [`REPROMOTE_FACTOR`] times the usual number; if it
//!   is promoted again within the cooldown (by its own stores or with a hot neighbour's
//!   group), its `level` rises by one (at most [`MAX_LEVEL`]), so it must stay cold twice as
//!   long before its next demotion. A frame demoted and not re-promoted within `cooldown` is
//!   forgotten (level 0).
//!
//! Measured (docs/PERFORMANCE.md, "cold demotion"): a promotion factor that grew with the
//! level (`4 << level`) and group promotions that passed demoted neighbours over made bzip2,
//! whose work arrays go cold between passes, tip into a cascade on the loaded host (95 s
//! instead of 0.5 s: 7,577 promotions, 404k exact events, each demoted frame earning its way
//! back alone, at up to 256 trapped stores): the backoff is on the demotion side only.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The highest backoff level (demotion needs `2^6 = 64` times the base coldness).
pub(crate) const MAX_LEVEL: u8 = 6;

/// Within the cooldown of its demotion, a frame's own trapped stores promote it only after
/// this many times the usual number.
pub(crate) const REPROMOTE_FACTOR: u32 = 4;

/// Coldness thresholds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Thresholds {
    /// Consecutive syncs without a dirty bit (0: never demote).
    pub(crate) syncs: u32,
    /// And at least this long without one.
    pub(crate) window: Duration,
    /// How long a demoted frame's backoff is remembered.
    pub(crate) cooldown: Duration,
}

#[derive(Clone, Copy, Debug)]
struct Hot {
    /// The sync that last found the frame dirty (or the sync count at its promotion).
    sync: u64,
    at: Instant,
    level: u8,
}

#[derive(Clone, Copy, Debug)]
struct Demoted {
    at: Instant,
    level: u8,
}

/// Per-frame coldness of relaxed frames and backoff of demoted ones.
#[derive(Debug, Default)]
pub(crate) struct Cooling {
    /// Syncs counted so far.
    syncs: u64,
    /// Relaxed frames, by guest address.
    hot: HashMap<u64, Hot>,
    /// `(sync, time, frame)` in sync order; an entry is current iff `hot[frame].sync == sync`.
    queue: VecDeque<(u64, Instant, u64)>,
    /// Recently demoted frames.
    demoted: HashMap<u64, Demoted>,
}

fn scaled(d: Duration, level: u8) -> Duration {
    d.saturating_mul(1 << level)
}

impl Cooling {
    /// Frames just promoted at `now`: cold-counting starts afresh; a frame demoted within
    /// the cooldown comes back one level higher.
    pub(crate) fn promoted(&mut self, frames: &[u64], now: Instant, t: &Thresholds) {
        for &f in frames {
            let level = match self.demoted.remove(&f) {
                Some(d) if now.duration_since(d.at) < t.cooldown => (d.level + 1).min(MAX_LEVEL),
                _ => 0,
            };
            self.hot.insert(
                f,
                Hot {
                    sync: self.syncs,
                    at: now,
                    level,
                },
            );
            self.queue.push_back((self.syncs, now, f));
        }
    }

    /// A sync at `now` found `dirty` (relaxed frames) dirty.
    pub(crate) fn synced(&mut self, dirty: &[u64], now: Instant) {
        self.syncs += 1;
        for &f in dirty {
            if let Some(h) = self.hot.get_mut(&f) {
                h.sync = self.syncs;
                h.at = now;
                self.queue.push_back((self.syncs, now, f));
            }
        }
    }

    /// True if `frame` is relaxed and was found dirty by the latest sync.
    pub(crate) fn dirty_in_last_sync(&self, frame: u64) -> bool {
        self.hot.get(&frame).is_some_and(|h| h.sync == self.syncs)
    }

    /// True if `frame` is relaxed and still cold at `now` (see the module docs).
    fn is_cold(&self, frame: u64, now: Instant, t: &Thresholds) -> bool {
        self.hot.get(&frame).is_some_and(|h| {
            self.syncs - h.sync >= u64::from(t.syncs) << h.level
                && now.duration_since(h.at) >= scaled(t.window, h.level)
        })
    }

    /// The relaxed frames cold at `now`, in the order they went cold; each is reported once
    /// (until it is dirty or promoted again). Empty if demotion is off (`t.syncs == 0`).
    pub(crate) fn due(&mut self, now: Instant, t: &Thresholds) -> Vec<u64> {
        let mut out = Vec::new();
        if t.syncs == 0 {
            return out;
        }
        let mut later = Vec::new();
        while let Some(&(sync, at, f)) = self.queue.front() {
            // Not old enough even at level 0: neither is anything behind it.
            if self.syncs - sync < u64::from(t.syncs) || now.duration_since(at) < t.window {
                break;
            }
            self.queue.pop_front();
            if self.hot.get(&f).is_none_or(|h| h.sync != sync) {
                continue; // superseded or no longer relaxed
            }
            if self.is_cold(f, now, t) {
                out.push(f);
            } else {
                later.push((sync, at, f)); // a backed-off frame: look again later
            }
        }
        self.queue.extend(later);
        out
    }

    /// Frames demoted (cold) at `now`: their backoff is remembered for the cooldown.
    pub(crate) fn demoted(&mut self, frames: &[u64], now: Instant) {
        for &f in frames {
            if let Some(h) = self.hot.remove(&f) {
                self.demoted.insert(
                    f,
                    Demoted {
                        at: now,
                        level: h.level,
                    },
                );
            }
        }
    }

    /// Frames no longer relaxed for another reason (a pin, an untrack, `make_strict`):
    /// forgotten, with no backoff.
    pub(crate) fn forgotten(&mut self, frames: &[u64]) {
        for f in frames {
            self.hot.remove(f);
        }
    }

    /// The factor on the promotion threshold of `frame` at `now`: [`REPROMOTE_FACTOR`]
    /// within the cooldown of its demotion, else 1 (and the backoff is forgotten).
    pub(crate) fn promote_factor(&mut self, frame: u64, now: Instant, t: &Thresholds) -> u32 {
        match self.demoted.get(&frame) {
            Some(d) if now.duration_since(d.at) < t.cooldown => REPROMOTE_FACTOR,
            Some(_) => {
                self.demoted.remove(&frame);
                1
            }
            None => 1,
        }
    }

    /// The backoff level of `frame` (relaxed or demoted), 0 if none (tests).
    #[cfg(test)]
    fn level(&self, frame: u64) -> u8 {
        self.hot
            .get(&frame)
            .map(|h| h.level)
            .or_else(|| self.demoted.get(&frame).map(|d| d.level))
            .unwrap_or(0)
    }

    /// Queue entries held (for tests of the O(dirty) bound).
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn t(syncs: u32, window_ms: u64) -> Thresholds {
        Thresholds {
            syncs,
            window: MS * u32::try_from(window_ms).expect("small"),
            cooldown: MS * 1000,
        }
    }

    #[test]
    fn a_frame_is_due_only_after_both_enough_syncs_and_enough_time() {
        let th = t(3, 10);
        let t0 = Instant::now();
        let mut c = Cooling::default();
        c.promoted(&[0x1000, 0x2000], t0, &th);
        // Three syncs quickly: enough syncs, not enough time.
        for i in 1..=3 {
            c.synced(&[0x2000], t0 + MS * i);
            assert!(c.due(t0 + MS * i, &th).is_empty());
        }
        // Time enough for 0x1000 (promoted at t0, never dirty); 0x2000 was dirty at 3 ms.
        assert_eq!(c.due(t0 + MS * 11, &th), vec![0x1000]);
        // Reported once.
        assert!(c.due(t0 + MS * 12, &th).is_empty());
        // 0x2000: needs 3 syncs after its last dirty one as well as 10 ms.
        assert!(c.due(t0 + MS * 100, &th).is_empty());
        for i in 0..3 {
            c.synced(&[], t0 + MS * (101 + i));
        }
        assert_eq!(c.due(t0 + MS * 104, &th), vec![0x2000]);
    }

    #[test]
    fn a_dirty_frame_stays_hot_and_the_queue_stays_bounded_by_dirty_frames() {
        let th = t(2, 0);
        let t0 = Instant::now();
        let mut c = Cooling::default();
        c.promoted(&[1 << 12], t0, &th);
        for i in 1..1000u32 {
            c.synced(&[1 << 12], t0 + MS * i);
            assert!(c.due(t0 + MS * i, &th).is_empty(), "sync {i}");
            // One entry per dirty frame per sync, popped once `syncs` old.
            assert!(c.queued() <= 3, "{} entries", c.queued());
        }
        c.synced(&[], t0 + MS * 1000);
        c.synced(&[], t0 + MS * 1001);
        assert_eq!(c.due(t0 + MS * 1001, &th), vec![1 << 12]);
    }

    #[test]
    fn demotion_off_reports_nothing() {
        let th = t(0, 0);
        let t0 = Instant::now();
        let mut c = Cooling::default();
        c.promoted(&[0x1000], t0, &th);
        for i in 1..10 {
            c.synced(&[], t0 + MS * i);
        }
        assert!(c.due(t0 + MS * 1000, &th).is_empty());
    }

    #[test]
    fn a_demoted_frame_backs_off_and_a_quick_repromotion_doubles_its_coldness() {
        let th = t(2, 10);
        let t0 = Instant::now();
        let mut c = Cooling::default();
        c.promoted(&[0x1000], t0, &th);
        c.synced(&[], t0 + MS * 5);
        c.synced(&[], t0 + MS * 10);
        assert_eq!(c.due(t0 + MS * 10, &th), vec![0x1000]);
        c.demoted(&[0x1000], t0 + MS * 10);
        // Within the cooldown: four times the trapped stores.
        assert_eq!(
            c.promote_factor(0x1000, t0 + MS * 20, &th),
            REPROMOTE_FACTOR
        );
        assert_eq!(c.promote_factor(0x2000, t0 + MS * 20, &th), 1);
        // Re-promoted all the same: level 1, so 4 syncs and 20 ms of coldness now.
        c.promoted(&[0x1000], t0 + MS * 20, &th);
        c.synced(&[], t0 + MS * 25);
        c.synced(&[], t0 + MS * 30);
        assert!(c.due(t0 + MS * 31, &th).is_empty(), "level 0 thresholds");
        c.synced(&[], t0 + MS * 35);
        c.synced(&[], t0 + MS * 39);
        assert!(c.due(t0 + MS * 39, &th).is_empty(), "4 syncs but 19 ms");
        assert_eq!(c.due(t0 + MS * 40, &th), vec![0x1000]);
        c.demoted(&[0x1000], t0 + MS * 40);
        assert_eq!(c.level(0x1000), 1);
        assert_eq!(
            c.promote_factor(0x1000, t0 + MS * 41, &th),
            REPROMOTE_FACTOR
        );
        // After the cooldown the backoff is forgotten.
        assert_eq!(c.promote_factor(0x1000, t0 + MS * 1041, &th), 1);
        assert_eq!(c.level(0x1000), 0);
        c.promoted(&[0x1000], t0 + MS * 1042, &th);
        c.synced(&[], t0 + MS * 1043);
        c.synced(&[], t0 + MS * 1052);
        assert_eq!(c.due(t0 + MS * 1052, &th), vec![0x1000], "level 0 again");
    }

    #[test]
    fn levels_stop_at_the_maximum() {
        let th = t(1, 0);
        let t0 = Instant::now();
        let mut c = Cooling::default();
        for round in 0..20u32 {
            c.promoted(&[0x1000], t0 + MS * round, &th);
            c.demoted(&[0x1000], t0 + MS * round);
        }
        assert_eq!(c.level(0x1000), MAX_LEVEL);
        assert_eq!(
            c.promote_factor(0x1000, t0 + MS * 20, &th),
            REPROMOTE_FACTOR
        );
    }

    #[test]
    fn forgotten_and_superseded_frames_are_not_due() {
        let th = t(1, 0);
        let t0 = Instant::now();
        let mut c = Cooling::default();
        c.promoted(&[0x1000, 0x2000], t0, &th);
        c.forgotten(&[0x1000]);
        c.synced(&[0x2000], t0 + MS);
        assert!(c.dirty_in_last_sync(0x2000) && !c.dirty_in_last_sync(0x1000));
        assert!(c.due(t0 + MS, &th).is_empty());
        c.synced(&[], t0 + MS * 2);
        assert_eq!(c.due(t0 + MS * 2, &th), vec![0x2000]);
        // A forgotten frame has no backoff.
        assert_eq!(c.promote_factor(0x1000, t0 + MS * 3, &th), 1);
    }
}
