//! The vCPU gate: memslot surgery happens with every vCPU outside `KVM_RUN`.
//!
//! A vCPU passes the gate before each `KVM_RUN` ([`Gate::enter`], which returns an [`Inside`]
//! guard) and leaves it when `KVM_RUN` returns (the guard's drop, so a panic between the two
//! cannot leave the vCPU counted inside and wedge every later pause). A pauser closes the gate,
//! kicks every vCPU inside `KVM_RUN` once, and waits until none is inside. vCPU threads
//! handling an exit are outside, so a notifier running on a vCPU thread may add or remove
//! tracks (which pauses) without deadlock.
//!
//! Kicks follow the protocol KVM documents for `kvm_run.immediate_exit` (Documentation/
//! virt/kvm/api.rst): the kicker sets `immediate_exit` in the vCPU's `kvm_run`, then signals
//! its thread. A vCPU already inside `KVM_RUN` returns with EINTR on the signal; one that has
//! passed the gate but not yet issued the ioctl finds `immediate_exit` set and KVM returns
//! EINTR at once. So one kick always suffices, and the pauser waits without polling (it used to
//! re-send the signal every 100 µs to cover a signal that landed just before the ioctl).
//! `immediate_exit` is reset when the vCPU leaves, under the gate lock, while no kicker can
//! reach it.
//!
//! ## Continuations: a pause also waits for instructions KVM has not finished
//!
//! A store that KVM splits into several MMIO exits (one per page it straddles, 8 bytes per
//! exit for wider stores) is translated once, before the first exit; KVM sends each further
//! fragment's GPA at the next `KVM_RUN`, without walking again, and finishes the instruction
//! only then. A vCPU between two such exits is outside `KVM_RUN`, yet its instruction is
//! half done on translations that may be stale after the pause (a VMM's page-table update
//! that freed the frame behind the second fragment). So a vCPU leaves the gate *with a
//! continuation* after an MMIO exit that [`crate::Vcpu::run`] handles itself and re-enters
//! for, and a pause returns only when no vCPU has one (but the pauser's own, see below):
//! such a vCPU may enter while the gate is closed, with `immediate_exit` set, which makes
//! KVM finish the pending operation and return without running a guest instruction
//! (Documentation/virt/kvm/api.rst, `immediate_exit`); a further fragment is one more exit,
//! handled the same way. `Vcpu::run` never returns to its caller with a continuation
//! counted: a stopped or budget-exhausted vCPU flushes first, and an exit returned to the
//! VMM (device MMIO) drops the count (the VMM completes it by running the vCPU again).
//!
//! A pause taken on a vCPU's own thread while it handles an exit (a notifier that adds a
//! track) does not wait for that vCPU's continuation: the vCPU cannot enter until the pause
//! is over, and nothing a re-cut changes invalidates a fragment's GPA.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

/// How the gate makes one vCPU leave `KVM_RUN` ([`crate::sys::VcpuKick`] on real KVM).
pub(crate) trait Kick: std::fmt::Debug + Send {
    /// Makes the vCPU's current `KVM_RUN`, or its next one if it has not issued it yet,
    /// return at once.
    fn kick(&self);
    /// Undoes [`Kick::kick`] for later `KVM_RUN`s. Called as the vCPU leaves.
    fn reset(&self);
}

#[derive(Debug)]
struct State<K> {
    /// Open pause requests; the gate is closed while non-zero.
    pauses: u32,
    /// How many of `pauses` wait for parked continuations too ([`Gate::pause_all`]): while
    /// every pause is one of those, a parked continuation may enter to finish (they wait
    /// for it), which a plain pause (that did not wait for it) never lets happen.
    pauses_all: u32,
    /// Kick handle of each vCPU now inside `KVM_RUN`, by vCPU index.
    inside: Vec<Option<K>>,
    /// How many entries of `inside` are set.
    running: usize,
    /// Threads inside [`Gate::stop`].
    stopping: usize,
    /// How many times each vCPU entered `KVM_RUN`, by vCPU index.
    entries: Vec<u64>,
    /// Per vCPU: it left `KVM_RUN` with an instruction KVM may continue at the next entry
    /// (module docs).
    continuation: Vec<bool>,
    /// How many entries of `continuation` are set, but for parked ones.
    continuing: usize,
    /// Per vCPU: its continuation is *parked* ([`Gate::park_here`]): its thread waits for a
    /// lock a pauser may hold, so re-cut pauses do not wait for it, and it enters again only
    /// with the gate open.
    parked: Vec<bool>,
    /// How many entries of `parked` are set.
    parked_count: usize,
}

impl<K> Default for State<K> {
    fn default() -> State<K> {
        State {
            pauses: 0,
            pauses_all: 0,
            inside: Vec::new(),
            running: 0,
            stopping: 0,
            entries: Vec::new(),
            continuation: Vec::new(),
            continuing: 0,
            parked: Vec::new(),
            parked_count: 0,
        }
    }
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Gate<K: Kick = crate::sys::VcpuKick> {
    state: Mutex<State<K>>,
    cv: Condvar,
}

impl<K: Kick> Default for Gate<K> {
    fn default() -> Gate<K> {
        Gate {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        }
    }
}

/// How the enforcer holds every vCPU outside `KVM_RUN` while it changes memslots: until the
/// returned guard drops. The built-in implementation is the [`Gate`]; the enforcer's unit
/// tests use one that records its pauses.
pub(crate) trait Pauser {
    /// Held while the vCPUs are paused.
    type Paused<'a>
    where
        Self: 'a;

    /// Pauses every vCPU: returns once none is inside `KVM_RUN`.
    fn pause(&self) -> Self::Paused<'_>;
}

impl<K: Kick> Pauser for Gate<K> {
    type Paused<'a>
        = Paused<'a, K>
    where
        K: 'a;

    fn pause(&self) -> Paused<'_, K> {
        Gate::pause(self)
    }
}

/// Closed gate; reopens on drop.
#[derive(Debug)]
pub(crate) struct Paused<'a, K: Kick> {
    gate: &'a Gate<K>,
    /// A [`Gate::pause_all`].
    all: bool,
}

/// A vCPU inside the gate (about to enter, or in, `KVM_RUN`); leaves on drop, with a
/// continuation if [`Inside::continues`] said so.
#[derive(Debug)]
pub(crate) struct Inside<'a, K: Kick> {
    gate: &'a Gate<K>,
    index: usize,
    continuation: bool,
}

thread_local! {
    /// The gate (by address) and vCPU index this thread runs ([`Gate::running_here`]): a
    /// pause taken here does not wait for that vCPU's continuation.
    static HERE: std::cell::Cell<Option<(usize, usize)>> = const { std::cell::Cell::new(None) };
}

/// Marks the current thread as running one vCPU of a gate until it drops, and then drops
/// that vCPU's continuation.
#[derive(Debug)]
pub(crate) struct RunningHere<'a, K: Kick> {
    gate: &'a Gate<K>,
    index: usize,
    _here: Here,
}

/// [`Gate::here`]'s guard: restores the thread's previous mark on drop.
#[derive(Debug)]
pub(crate) struct Here {
    outer: Option<(usize, usize)>,
}

impl Drop for Here {
    fn drop(&mut self) {
        HERE.with(|h| h.set(self.outer));
    }
}

impl<K: Kick> Gate<K> {
    fn lock(&self) -> MutexGuard<'_, State<K>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'g>(&self, s: MutexGuard<'g, State<K>>) -> MutexGuard<'g, State<K>> {
        self.cv.wait(s).unwrap_or_else(|e| e.into_inner())
    }

    fn addr(&self) -> usize {
        std::ptr::from_ref(self).addr()
    }

    /// Marks this thread as the one running vCPU `index` until the guard drops; the guard
    /// also drops the vCPU's continuation, if any, when [`crate::Vcpu::run`] returns.
    pub(crate) fn running_here(&self, index: usize) -> RunningHere<'_, K> {
        RunningHere {
            gate: self,
            index,
            _here: self.here(index),
        }
    }

    /// Marks this thread as the one running vCPU `index` until the guard drops, without
    /// touching its continuation ([`crate::ExitHandler::handle`]: notifiers' pauses there do
    /// not wait for it).
    pub(crate) fn here(&self, index: usize) -> Here {
        Here {
            outer: HERE.with(|h| h.replace(Some((self.addr(), index)))),
        }
    }

    /// Drops vCPU `index`'s continuation: its owner will not run it again (or not soon),
    /// so pauses must not wait for it.
    pub(crate) fn end_continuation(&self, index: usize) {
        let mut s = self.lock();
        Self::set_continuation(&mut s, index, false);
        let wake = s.pauses > 0;
        drop(s);
        if wake {
            self.cv.notify_all();
        }
    }

    fn has_continuation(s: &State<K>, index: usize) -> bool {
        s.continuation.get(index).copied().unwrap_or(false)
    }

    fn is_parked(s: &State<K>, index: usize) -> bool {
        s.parked.get(index).copied().unwrap_or(false)
    }

    /// Parks this thread's vCPU's continuation, if it has one, before the thread blocks on a
    /// lock that a pauser may hold while it pauses (the relaxed sync lock: a notifier that
    /// tracks from inside a sync's delivery). [`Gate::pause`] then does not wait for it (as
    /// for the pauser's own vCPU: nothing a re-cut changes invalidates a pending fragment's
    /// GPA), [`Gate::pause_all`] still does, and the vCPU's next [`Gate::enter`] waits until
    /// every pause on is a `pause_all` (or none is) before KVM may finish the instruction,
    /// so it never runs during a pause that did not wait for it.
    pub(crate) fn park_here(&self) {
        let Some(index) = HERE
            .with(std::cell::Cell::get)
            .and_then(|(gate, index)| (gate == self.addr()).then_some(index))
        else {
            return;
        };
        let mut s = self.lock();
        if !Self::has_continuation(&s, index) || Self::is_parked(&s, index) {
            return;
        }
        if s.parked.len() <= index {
            s.parked.resize(index + 1, false);
        }
        s.parked[index] = true;
        s.parked_count += 1;
        s.continuing -= 1;
        let wake = s.pauses > 0;
        drop(s);
        if wake {
            self.cv.notify_all();
        }
    }

    /// Un-parks vCPU `index` (its continuation counts again, or is gone).
    fn unpark(s: &mut State<K>, index: usize) {
        if Self::is_parked(s, index) {
            s.parked[index] = false;
            s.parked_count -= 1;
            if Self::has_continuation(s, index) {
                s.continuing += 1;
            }
        }
    }

    /// If no vCPU is inside `KVM_RUN` now: how many entries into `KVM_RUN` all vCPUs made so
    /// far. Two calls that return the same `Some` saw no guest instruction run between them
    /// (relaxed mode skips a sync that could find nothing new: `relaxed.rs`).
    pub(crate) fn quiescent(&self) -> Option<u64> {
        let s = self.lock();
        (s.running == 0).then(|| s.entries.iter().sum())
    }

    /// Waits for the gate to be open, then marks vCPU `index` as inside `KVM_RUN` until the
    /// returned guard drops; `kick` is how pausers reach it meanwhile. Returns `None` instead
    /// if `stop` is set (checked under the gate lock, see [`Gate::stop`]).
    ///
    /// A vCPU with a continuation enters at once, closed gate or `stop` notwithstanding, but
    /// then kicked: its `KVM_RUN` only finishes the pending instruction (module docs).
    pub(crate) fn enter(&self, index: usize, stop: &AtomicBool, kick: K) -> Option<Inside<'_, K>> {
        let mut s = self.lock();
        let flush = loop {
            // A parked continuation waits until no pause that did not wait for it is on
            // (`park_here`): the gate open, or only `pause_all`s, which wait for it (a parked
            // vCPU waiting for the gate to open while a `pause_all` waited for it deadlocked
            // both: a page-table update against a vCPU that parked on a frame lock).
            if Self::has_continuation(&s, index)
                && (!Self::is_parked(&s, index) || s.pauses == s.pauses_all)
            {
                Self::unpark(&mut s, index);
                // SeqCst: as below.
                break s.pauses > 0 || stop.load(Ordering::SeqCst);
            }
            if s.pauses == 0 {
                break false;
            }
            s = self.wait(s);
        };
        // SeqCst: pairs with the store in `stop`; the gate lock orders it against `inside`.
        if !flush && stop.load(Ordering::SeqCst) {
            return None;
        }
        if flush {
            kick.kick();
        }
        if s.inside.len() <= index {
            s.inside.resize_with(index + 1, || None);
            s.entries.resize(index + 1, 0);
            s.continuation.resize(index + 1, false);
        }
        s.entries[index] += 1;
        debug_assert!(s.inside[index].is_none(), "vCPU {index} entered twice");
        s.inside[index] = Some(kick);
        s.running += 1;
        Some(Inside {
            gate: self,
            index,
            continuation: false,
        })
    }

    fn set_continuation(s: &mut State<K>, index: usize, on: bool) {
        // A parked continuation is not counted in `continuing`: count it again first.
        Self::unpark(s, index);
        if let Some(c) = s.continuation.get_mut(index)
            && *c != on
        {
            *c = on;
            if on {
                s.continuing += 1;
            } else {
                s.continuing -= 1;
            }
        }
    }

    /// Marks vCPU `index` as outside `KVM_RUN` (the [`Inside`] guard's drop), with or without
    /// a continuation.
    fn leave(&self, index: usize, continuation: bool) {
        let mut s = self.lock();
        if let Some(k) = s.inside.get_mut(index).and_then(Option::take) {
            // Under the lock: no kicker can set it again before the next `enter`.
            k.reset();
            s.running -= 1;
        }
        Self::set_continuation(&mut s, index, continuation);
        let wake = s.pauses > 0 || s.stopping > 0;
        drop(s);
        if wake {
            self.cv.notify_all();
        }
    }

    /// Sets `stop` and returns once vCPU `index` has left the `KVM_RUN` it is in, if any;
    /// its next [`Gate::enter`] then returns `None`.
    pub(crate) fn stop(&self, index: usize, stop: &AtomicBool) {
        stop.store(true, Ordering::SeqCst);
        let mut s = self.lock();
        let Some(Some(k)) = s.inside.get(index) else {
            return;
        };
        k.kick();
        let entry = s.entries[index];
        s.stopping += 1;
        // Until that entry is over: a later entry (after the vCPU returned `Stopped` and its
        // owner ran it again) is not this call's business.
        while matches!(s.inside.get(index), Some(Some(_))) && s.entries[index] == entry {
            s = self.wait(s);
        }
        s.stopping -= 1;
    }

    /// Kicks every vCPU that has stayed inside the same `KVM_RUN` since the previous call
    /// (`seen` keeps, per vCPU, the entry count of that call), so that [`crate::Vcpu::run`]
    /// can look at a vCPU KVM keeps busy without an exit.
    pub(crate) fn kick_unchanged(&self, seen: &mut Vec<u64>) {
        let s = self.lock();
        seen.resize(s.entries.len(), 0);
        for (i, k) in s.inside.iter().enumerate() {
            if let Some(k) = k
                && seen[i] == s.entries[i]
            {
                k.kick();
            }
            seen[i] = s.entries[i];
        }
    }

    /// Kicks every vCPU inside `KVM_RUN` now (each leaves it once and enters again); waits
    /// for nothing.
    pub(crate) fn kick_inside(&self) {
        let s = self.lock();
        for k in s.inside.iter().flatten() {
            k.kick();
        }
    }

    /// Closes the gate and returns once no vCPU is inside `KVM_RUN` and none but this
    /// thread's own has a continuation (module docs); the gate reopens when the returned
    /// guard drops.
    pub(crate) fn pause(&self) -> Paused<'_, K> {
        self.pause_waiting(false)
    }

    /// As [`Gate::pause`], and waits for parked continuations too ([`Gate::park_here`]):
    /// for surgery that may invalidate a pending instruction's translations (page-table
    /// updates, `update.rs`).
    pub(crate) fn pause_all(&self) -> Paused<'_, K> {
        self.pause_waiting(true)
    }

    fn pause_waiting(&self, parked_too: bool) -> Paused<'_, K> {
        let own = HERE
            .with(std::cell::Cell::get)
            .and_then(|(gate, index)| (gate == self.addr()).then_some(index));
        let mut s = self.lock();
        s.pauses += 1;
        if parked_too {
            s.pauses_all += 1;
        }
        // Only vCPUs with a continuation enter while `pauses > 0`, and those enter kicked;
        // so each one inside now needs one kick.
        for k in s.inside.iter().flatten() {
            k.kick();
        }
        while s.running > 0
            || s.continuing + if parked_too { s.parked_count } else { 0 }
                > usize::from(own.is_some_and(|i| Self::has_continuation(&s, i)))
        {
            s = self.wait(s);
        }
        Paused {
            gate: self,
            all: parked_too,
        }
    }
}

impl<K: Kick> Inside<'_, K> {
    /// The `KVM_RUN` returned an exit that [`crate::Vcpu::run`] handles and re-enters for,
    /// after which KVM may continue the instruction: the vCPU leaves with a continuation.
    pub(crate) fn continues(&mut self) {
        self.continuation = true;
    }
}

impl<K: Kick> Drop for RunningHere<'_, K> {
    fn drop(&mut self) {
        // `_here` restores the thread's previous mark after this.
        self.gate.end_continuation(self.index);
    }
}

impl<K: Kick> Drop for Paused<'_, K> {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        s.pauses -= 1;
        if self.all {
            s.pauses_all -= 1;
        }
        // Open, or only `pause_all`s left: a parked continuation may enter (`enter`).
        if s.pauses == s.pauses_all {
            self.gate.cv.notify_all();
        }
    }
}

impl<K: Kick> Drop for Inside<'_, K> {
    fn drop(&mut self) {
        self.gate.leave(self.index, self.continuation);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;
    use std::sync::mpsc;

    use super::*;

    /// A fake vCPU's `kvm_run` and thread: `immediate_exit` is a flag, the signal a message.
    #[derive(Debug, Default)]
    struct FakeRun {
        immediate_exit: AtomicBool,
        kicks: AtomicU32,
        resets: AtomicU32,
    }

    #[derive(Debug)]
    struct FakeKick {
        run: Arc<FakeRun>,
        signal: mpsc::Sender<()>,
    }

    impl Kick for FakeKick {
        fn kick(&self) {
            self.run.kicks.fetch_add(1, Ordering::SeqCst);
            self.run.immediate_exit.store(true, Ordering::SeqCst);
            // The receiver may be gone (a vCPU that already left); a lost signal is exactly
            // what `immediate_exit` covers.
            self.signal.send(()).ok();
        }
        fn reset(&self) {
            self.run.resets.fetch_add(1, Ordering::SeqCst);
            self.run.immediate_exit.store(false, Ordering::SeqCst);
        }
    }

    fn fake() -> (Arc<FakeRun>, FakeKick, mpsc::Receiver<()>) {
        let run = Arc::new(FakeRun::default());
        let (tx, rx) = mpsc::channel();
        let kick = FakeKick {
            run: Arc::clone(&run),
            signal: tx,
        };
        (run, kick, rx)
    }

    #[test]
    fn pause_with_vcpu_in_run_kicks_it_once_and_returns_after_it_left() {
        let gate = Arc::new(Gate::<FakeKick>::default());
        let stop = AtomicBool::new(false);
        let (run, kick, signal) = fake();
        let (entered_tx, entered) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let signal = signal; // moved: a Receiver is not Sync
                let inside = gate.enter(0, &stop, kick).expect("not stopped");
                entered_tx.send(()).expect("test thread waits");
                // "KVM_RUN": blocks until the signal.
                signal.recv().expect("the pauser kicks");
                drop(inside);
            });
            entered.recv().expect("vCPU thread enters");
            let paused = gate.pause();
            assert_eq!(run.kicks.load(Ordering::SeqCst), 1);
            assert_eq!(gate.lock().running, 0);
            drop(paused);
        });
        assert!(!run.immediate_exit.load(Ordering::SeqCst), "reset on leave");
    }

    #[test]
    fn pause_kick_before_the_ioctl_is_not_lost() {
        let gate = Arc::new(Gate::<FakeKick>::default());
        let stop = AtomicBool::new(false);
        let (run, kick, signal) = fake();
        let (entered_tx, entered) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let signal = signal; // moved: a Receiver is not Sync
                let inside = gate.enter(0, &stop, kick).expect("not stopped");
                entered_tx.send(()).expect("test thread waits");
                // The signal lands after the gate but before the ioctl: the no-op handler
                // consumes it and there is no KVM_RUN to interrupt.
                signal.recv().expect("the pauser kicks");
                // "KVM_RUN": KVM returns EINTR at once when immediate_exit is set; without it
                // the vCPU would run on with no second kick coming.
                assert!(
                    run.immediate_exit.load(Ordering::SeqCst),
                    "KVM_RUN would block: the kick was lost"
                );
                drop(inside);
            });
            entered.recv().expect("vCPU thread enters");
            drop(gate.pause());
        });
        assert_eq!(run.kicks.load(Ordering::SeqCst), 1);
        assert_eq!(run.resets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn enter_while_paused_waits_for_reopen() {
        let gate = Arc::new(Gate::<FakeKick>::default());
        let stop = AtomicBool::new(false);
        let (run, kick, _signal) = fake();
        let paused = gate.pause();
        let (entered_tx, entered) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let inside = gate.enter(0, &stop, kick).expect("not stopped");
                entered_tx.send(()).expect("test thread waits");
                drop(inside);
            });
            assert!(entered.try_recv().is_err(), "entered a closed gate");
            drop(paused);
            entered.recv().expect("enters once reopened");
        });
        assert_eq!(run.kicks.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn panic_inside_run_does_not_wedge_later_pauses() {
        let gate = Arc::new(Gate::<FakeKick>::default());
        let stop = AtomicBool::new(false);
        let (_run, kick, _signal) = fake();
        let res = std::thread::scope(|s| {
            s.spawn(|| {
                let _inside = gate.enter(0, &stop, kick).expect("not stopped");
                panic!("a handler panics between enter and leave");
            })
            .join()
        });
        assert!(res.is_err(), "the vCPU thread panicked");
        // Returns: the guard left the gate during unwinding.
        drop(gate.pause());
        assert_eq!(gate.lock().running, 0);
    }

    #[test]
    fn stop_with_vcpu_in_run_kicks_it_and_next_enter_is_refused() {
        let gate = Arc::new(Gate::<FakeKick>::default());
        let stop = AtomicBool::new(false);
        let (run, kick, signal) = fake();
        let (entered_tx, entered) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let signal = signal; // moved: a Receiver is not Sync
                let inside = gate.enter(0, &stop, kick).expect("not stopped");
                entered_tx.send(()).expect("test thread waits");
                signal.recv().expect("stop kicks");
                drop(inside);
            });
            entered.recv().expect("vCPU thread enters");
            gate.stop(0, &stop);
            assert_eq!(gate.lock().running, 0);
        });
        assert_eq!(run.kicks.load(Ordering::SeqCst), 1);
        let (_run2, kick2, _signal2) = fake();
        assert!(gate.enter(0, &stop, kick2).is_none());
    }

    /// A vCPU that left with a continuation keeps a pause waiting; it enters the closed
    /// gate kicked (so KVM only finishes the instruction), and the pause returns once it
    /// left without one.
    #[test]
    fn pause_waits_for_a_continuation_which_enters_the_closed_gate_kicked() {
        let gate = Arc::new(Gate::<FakeKick>::default());
        let stop = AtomicBool::new(false);
        let (run, kick, _signal) = fake();
        let (run2, kick2, _signal2) = fake();
        let mut inside = gate.enter(0, &stop, kick).expect("not stopped");
        inside.continues();
        drop(inside);
        let (paused_tx, paused) = mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let p = gate.pause();
                paused_tx.send(()).expect("test thread waits");
                drop(p);
            });
            // The pause cannot return while vCPU 0 has a continuation. Wait until it has
            // closed the gate, then check it is still waiting.
            while gate.lock().pauses == 0 {
                std::thread::yield_now();
            }
            assert!(paused.try_recv().is_err(), "paused over a continuation");
            // The flush entry: allowed although the gate is closed, and kicked.
            let flush = gate.enter(0, &stop, kick2).expect("a continuation enters");
            assert!(
                run2.immediate_exit.load(Ordering::SeqCst),
                "flush entry not kicked"
            );
            assert!(paused.try_recv().is_err(), "paused with the vCPU inside");
            drop(flush); // "KVM_RUN" returned EINTR: no continuation any more
            paused.recv().expect("the pause returns");
        });
        assert_eq!(run.kicks.load(Ordering::SeqCst), 0);
        assert_eq!(run2.kicks.load(Ordering::SeqCst), 1);
        assert_eq!(gate.lock().continuing, 0);
    }

    /// A vCPU whose continuation is parked (its thread waited for a frame lock) enters to
    /// finish it while a `pause_all` waits for it, kicked; a plain pause, which does not wait
    /// for it, keeps it out. (It used to wait for the gate to open while the `pause_all`
    /// waited for it: a page-table update deadlocked against two vCPUs.)
    #[test]
    fn a_parked_continuation_enters_for_a_pause_all_but_not_for_a_plain_pause() {
        let gate = Gate::<FakeKick>::default();
        let stop = AtomicBool::new(false);
        let (_run, kick, _signal) = fake();
        let (run2, kick2, _signal2) = fake();
        let mut inside = gate.enter(0, &stop, kick).expect("not stopped");
        inside.continues();
        drop(inside);
        let (paused_tx, paused) = mpsc::channel();
        std::thread::scope(|s| {
            let _here = gate.here(0);
            gate.park_here();
            assert_eq!(gate.lock().parked_count, 1);
            let plain = gate.pause(); // does not wait for the parked continuation
            s.spawn(|| {
                let p = gate.pause_all();
                paused_tx.send(()).expect("test thread waits");
                drop(p);
            });
            while gate.lock().pauses_all == 0 {
                std::thread::yield_now();
            }
            assert!(
                paused.try_recv().is_err(),
                "pause_all over a parked continuation"
            );
            {
                let s = gate.lock();
                let index = 0;
                assert!(
                    !(Gate::has_continuation(&s, index)
                        && (!Gate::is_parked(&s, index) || s.pauses == s.pauses_all)),
                    "a parked continuation may not enter during a plain pause"
                );
            }
            drop(plain);
            let flush = gate
                .enter(0, &stop, kick2)
                .expect("the parked continuation enters");
            assert!(
                run2.immediate_exit.load(Ordering::SeqCst),
                "entered without a kick"
            );
            assert!(paused.try_recv().is_err(), "paused with the vCPU inside");
            drop(flush);
            paused
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("the pause_all returns once the continuation finished");
        });
        assert_eq!(gate.lock().parked_count, 0);
    }

    /// A pause taken on the thread running the vCPU (a notifier inside an exit) does not
    /// wait for that vCPU's own continuation; returning from the run drops it.
    #[test]
    fn own_continuation_does_not_block_a_pause_and_is_dropped_on_return() {
        let gate = Gate::<FakeKick>::default();
        let stop = AtomicBool::new(false);
        let (_run, kick, _signal) = fake();
        {
            let _here = gate.running_here(0);
            let mut inside = gate.enter(0, &stop, kick).expect("not stopped");
            inside.continues();
            drop(inside);
            drop(gate.pause()); // returns: its own continuation
            assert_eq!(gate.lock().continuing, 1);
        }
        assert_eq!(gate.lock().continuing, 0, "dropped when the run returned");
        // Another thread's pause now returns at once.
        std::thread::scope(|s| {
            s.spawn(|| drop(gate.pause()));
        });
    }

    /// A stopped vCPU with a continuation still enters once (kicked) to finish it; the
    /// entry after that is refused.
    #[test]
    fn stop_lets_a_continuation_finish_first() {
        let gate = Gate::<FakeKick>::default();
        let stop = AtomicBool::new(false);
        let (_run, kick, _signal) = fake();
        let (run2, kick2, _signal2) = fake();
        let (_run3, kick3, _signal3) = fake();
        let mut inside = gate.enter(0, &stop, kick).expect("not stopped");
        inside.continues();
        drop(inside);
        gate.stop(0, &stop);
        let flush = gate
            .enter(0, &stop, kick2)
            .expect("the continuation finishes");
        assert!(
            run2.immediate_exit.load(Ordering::SeqCst),
            "flush entry not kicked"
        );
        drop(flush);
        assert!(gate.enter(0, &stop, kick3).is_none(), "stopped");
    }

    #[test]
    fn stop_of_vcpu_outside_run_returns_without_kicking() {
        let gate = Gate::<FakeKick>::default();
        let stop = AtomicBool::new(false);
        gate.stop(3, &stop);
        assert!(stop.load(Ordering::SeqCst));
    }
}
