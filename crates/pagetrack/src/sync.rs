//! The synchronisation primitives of the two hand-written protocols (the grace domain and the
//! notifier in-flight accounting): `std`'s, or `loom`'s when the crate is built with
//! `--cfg loom` for the model-checking tests (`scripts/test` runs them).

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicUsize, fence};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicUsize, fence};
#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};

/// The ordering of one access of a Dekker pair (each side stores to its own variable, then
/// loads the other's; at least one side must see the other). Outside loom every such access is
/// `SeqCst` and no fence is needed: C++20 [atomics.order] p4.1 puts two `SeqCst` accesses of
/// one object in the single total order `S` in coherence order, so if each side's load missed
/// the other's store, `S` would contain a cycle. On x86 a `SeqCst` RMW is one locked
/// instruction and a `SeqCst` load a plain load, while a `SeqCst` fence is one more locked
/// instruction: this form costs a locked instruction less on each side than the fence form.
/// Under loom, which models `SeqCst` accesses only as `AcqRel` but fences exactly, the access
/// keeps the weaker ordering `loom` given here and [`dekker_fence`] supplies the fence, so the
/// models check the fence form (the two forms are each sufficient; see `grace.rs`).
#[inline(always)]
pub(crate) const fn dekker(loom: std::sync::atomic::Ordering) -> std::sync::atomic::Ordering {
    if cfg!(loom) {
        loom
    } else {
        std::sync::atomic::Ordering::SeqCst
    }
}

/// The fence between the two accesses of one side of a Dekker pair, in the loom build only
/// (see [`dekker`]).
#[inline(always)]
pub(crate) fn dekker_fence() {
    #[cfg(loom)]
    fence(std::sync::atomic::Ordering::SeqCst);
}

/// Locks `m`, ignoring poison: the protocols' state lives in atomics that every path (panics
/// included, through drop guards) leaves consistent, and the mutexes guard no data.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits on `cv`, ignoring poison as [`lock`] does.
pub(crate) fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(g).unwrap_or_else(|e| e.into_inner())
}
