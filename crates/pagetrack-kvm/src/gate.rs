//! The vCPU gate: memslot surgery happens with every vCPU outside `KVM_RUN`.
//!
//! A vCPU passes the gate before each `KVM_RUN` and leaves it when `KVM_RUN` returns. A pauser
//! closes the gate, kicks every vCPU inside `KVM_RUN` with a signal (again every 100 µs, which
//! closes the race with a signal that lands just before the ioctl), and waits until none is
//! inside. vCPU threads handling an exit are outside, so a notifier running on a vCPU thread may
//! add or remove tracks (which pauses) without deadlock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::sys::ThreadHandle;

#[derive(Debug, Default)]
struct State {
    /// Open pause requests; the gate is closed while non-zero.
    pauses: u32,
    /// Thread of each vCPU now inside `KVM_RUN`, by vCPU index.
    inside: Vec<Option<ThreadHandle>>,
    /// How many entries of `inside` are set.
    running: usize,
    /// Threads inside [`Gate::stop`].
    stopping: usize,
    /// How many times each vCPU entered `KVM_RUN`, by vCPU index.
    entries: Vec<u64>,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    state: Mutex<State>,
    cv: Condvar,
}

/// Closed gate; reopens on drop.
#[derive(Debug)]
pub(crate) struct Paused<'a> {
    gate: &'a Gate,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for the gate to be open, then marks vCPU `index` as inside `KVM_RUN`; returns
    /// false instead if `stop` is set (checked under the gate lock, see [`Gate::stop`]).
    pub(crate) fn enter(&self, index: usize, stop: &AtomicBool) -> bool {
        let mut s = self.lock();
        while s.pauses > 0 {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        // SeqCst: pairs with the store in `stop`; the gate lock orders it against `inside`.
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        if s.inside.len() <= index {
            s.inside.resize(index + 1, None);
            s.entries.resize(index + 1, 0);
        }
        s.entries[index] += 1;
        debug_assert!(s.inside[index].is_none());
        s.inside[index] = Some(ThreadHandle::current());
        s.running += 1;
        true
    }

    /// Marks vCPU `index` as outside `KVM_RUN`.
    pub(crate) fn leave(&self, index: usize) {
        let mut s = self.lock();
        if s.inside.get_mut(index).and_then(Option::take).is_some() {
            s.running -= 1;
        }
        let wake = s.pauses > 0 || s.stopping > 0;
        drop(s);
        if wake {
            self.cv.notify_all();
        }
    }

    /// Sets `stop` and returns once vCPU `index` is outside `KVM_RUN`; its next
    /// [`Gate::enter`] then returns false.
    pub(crate) fn stop(&self, index: usize, stop: &AtomicBool) {
        stop.store(true, Ordering::SeqCst);
        let mut s = self.lock();
        s.stopping += 1;
        while let Some(Some(t)) = s.inside.get(index) {
            t.kick();
            s = self.wait_a_little(s);
        }
        s.stopping -= 1;
    }

    /// Waits for a vCPU to leave, or 100 µs: a kick that landed just before `KVM_RUN` was
    /// entered is lost, so the caller kicks again.
    fn wait_a_little<'g>(&self, s: MutexGuard<'g, State>) -> MutexGuard<'g, State> {
        self.cv
            .wait_timeout(s, Duration::from_micros(100))
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0)
    }

    /// Kicks every vCPU that has stayed inside the same `KVM_RUN` since the previous call
    /// (`seen` keeps, per vCPU, the entry count of that call), so that [`crate::Vcpu::run`]
    /// can look at a vCPU KVM keeps busy without an exit.
    pub(crate) fn kick_unchanged(&self, seen: &mut Vec<u64>) {
        let s = self.lock();
        seen.resize(s.entries.len(), 0);
        for (i, t) in s.inside.iter().enumerate() {
            if let Some(t) = t
                && seen[i] == s.entries[i]
            {
                t.kick();
            }
            seen[i] = s.entries[i];
        }
    }

    /// Closes the gate and returns once no vCPU is inside `KVM_RUN`.
    pub(crate) fn pause(&self) -> Paused<'_> {
        let mut s = self.lock();
        s.pauses += 1;
        while s.running > 0 {
            for t in s.inside.iter().flatten() {
                t.kick();
            }
            s = self.wait_a_little(s);
        }
        Paused { gate: self }
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        s.pauses -= 1;
        if s.pauses == 0 {
            self.gate.cv.notify_all();
        }
    }
}
