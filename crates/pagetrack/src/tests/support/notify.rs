//! Recording and closure-based notifiers, and a deadlock watchdog (feature `notifiers`).

use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use crate::{AsId, Gfn, PAGE_SIZE, Source, TrackNotifier, WriteEvent};

/// What a recording notifier saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(in crate::tests) enum Seen {
    Write {
        as_id: AsId,
        gpa: u64,
        new: Vec<u8>,
        old: Option<Vec<u8>>,
        source: Source,
    },
    RemoveRegion {
        as_id: AsId,
        base: Gfn,
        npages: u64,
    },
}

impl Seen {
    /// A write without old bytes in address space 0.
    pub(in crate::tests) fn write(gpa: u64, new: &[u8], source: Source) -> Seen {
        Seen::Write {
            as_id: AsId::NORMAL,
            gpa,
            new: new.to_vec(),
            old: None,
            source,
        }
    }
}

/// A log several notifiers can share, so the dispatch order is visible.
pub(in crate::tests) type Sink = Arc<Mutex<Vec<(usize, Seen)>>>;

/// A notifier that records what it sees under its id.
#[derive(Debug)]
pub(in crate::tests) struct Log {
    id: usize,
    sink: Sink,
}

impl Log {
    /// A notifier with its own sink.
    pub(in crate::tests) fn new() -> Arc<Log> {
        Arc::new(Log {
            id: 0,
            sink: Sink::default(),
        })
    }

    /// A notifier writing to a shared sink under `id`.
    pub(in crate::tests) fn shared(id: usize, sink: &Sink) -> Arc<Log> {
        Arc::new(Log {
            id,
            sink: Arc::clone(sink),
        })
    }

    /// What this notifier saw, in order.
    pub(in crate::tests) fn seen(&self) -> Vec<Seen> {
        self.sink
            .lock()
            .unwrap()
            .iter()
            .filter(|(id, _)| *id == self.id)
            .map(|(_, s)| s.clone())
            .collect()
    }
}

impl TrackNotifier for Log {
    fn track_write(&self, e: &WriteEvent<'_>) {
        let seen = Seen::Write {
            as_id: e.as_id,
            gpa: e.gpa.0,
            new: e.new.to_vec(),
            old: e.old.map(<[u8]>::to_vec),
            source: e.source,
        };
        self.sink.lock().unwrap().push((self.id, seen));
    }

    fn track_remove_region(&self, as_id: AsId, base: Gfn, npages: u64) {
        let seen = Seen::RemoveRegion {
            as_id,
            base,
            npages,
        };
        self.sink.lock().unwrap().push((self.id, seen));
    }
}

type WriteFn = Box<dyn Fn(&WriteEvent<'_>) + Send + Sync>;
type RemoveFn = Box<dyn Fn(AsId, Gfn, u64) + Send + Sync>;

/// A notifier built from closures.
pub(in crate::tests) struct Hook {
    write: WriteFn,
    remove: RemoveFn,
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

impl Hook {
    pub(in crate::tests) fn on_write(
        f: impl Fn(&WriteEvent<'_>) + Send + Sync + 'static,
    ) -> Arc<Hook> {
        Arc::new(Hook {
            write: Box::new(f),
            remove: Box::new(|_, _, _| {}),
        })
    }

    pub(in crate::tests) fn on_remove(
        f: impl Fn(AsId, Gfn, u64) + Send + Sync + 'static,
    ) -> Arc<Hook> {
        Arc::new(Hook {
            write: Box::new(|_| {}),
            remove: Box::new(f),
        })
    }
}

impl TrackNotifier for Hook {
    fn track_write(&self, event: &WriteEvent<'_>) {
        (self.write)(event);
    }

    fn track_remove_region(&self, as_id: AsId, base: Gfn, npages: u64) {
        (self.remove)(as_id, base, npages);
    }
}

/// First byte of frame `g`.
pub(in crate::tests) const fn gpa_of(g: u64) -> u64 {
    g * PAGE_SIZE
}

/// Runs `f` on another thread and fails the test if it does not finish in 30 s: a deadlock
/// becomes a failure instead of a hung test run. The timeout is a watchdog, not synchronisation.
pub(in crate::tests) fn within_watchdog<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the operation deadlocked (or panicked)")
}
