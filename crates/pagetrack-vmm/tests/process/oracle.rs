//! The replay oracle, checked online: every tracked frame's contents when tracking starts,
//! plus the write events in delivery order, must equal its contents when tracking stops; an
//! event's old bytes must equal the replayed state; no event may name an untracked frame.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pagetrack::{Gfn, Source, TrackNotifier, WriteEvent};
use pagetrack_vmm::process::{FrameObserver, PageKind};

#[derive(Debug, Default)]
struct State {
    frames: HashMap<u64, Vec<u8>>,
    kinds: HashMap<u64, PageKind>,
    report: OracleReport,
}

/// What the oracle saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OracleReport {
    /// Frames that started being tracked (reuse counts again).
    pub frames: u64,
    /// Page-table frames among them.
    pub table_frames: u64,
    /// Events from vCPU stores.
    pub vcpu_events: u64,
    /// Events from device (VMM) writes.
    pub device_events: u64,
    /// Device events into page-table frames.
    pub table_events: u64,
    /// Frames whose replay matched when tracking stopped.
    pub replayed: u64,
    /// The first few violations (empty if the oracle held).
    pub errors: Vec<String>,
}

impl OracleReport {
    /// Asserts that the oracle held and events came from both sources.
    pub fn assert_holds(&self, what: &str) {
        assert!(
            self.errors.is_empty(),
            "{what}: replay oracle violated: {:#?}",
            self.errors
        );
        assert_eq!(
            self.replayed, self.frames,
            "{what}: every tracked frame replayed"
        );
        assert!(self.vcpu_events > 0, "{what}: no vcpu events: {self:?}");
        assert!(self.device_events > 0, "{what}: no device events: {self:?}");
    }
}

/// Notifier and frame observer in one.
#[derive(Debug, Default)]
pub struct Oracle(Mutex<State>);

impl Oracle {
    pub fn new() -> Arc<Oracle> {
        Arc::new(Oracle::default())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The verdict (call after the run, with the notifier unregistered).
    pub fn report(&self) -> OracleReport {
        let s = self.state();
        let mut r = s.report.clone();
        if !s.frames.is_empty() {
            r.errors.push(format!(
                "{} frames never reported untracked",
                s.frames.len()
            ));
        }
        r
    }
}

fn fail(r: &mut OracleReport, msg: String) {
    if r.errors.len() < 10 {
        r.errors.push(msg);
    }
}

impl TrackNotifier for Oracle {
    fn track_write(&self, e: &WriteEvent<'_>) {
        let mut s = self.state();
        let s = &mut *s;
        let gfn = e.gpa.0 >> 12;
        let off = usize::try_from(e.gpa.0 & 0xfff).unwrap();
        match e.source {
            // Coalesced events (relaxed frames) are the guest's stores too.
            Source::Vcpu(_) | Source::Guest => s.report.vcpu_events += 1,
            _ => {
                s.report.device_events += 1;
                if s.kinds.get(&gfn) == Some(&PageKind::PageTable) {
                    s.report.table_events += 1;
                }
            }
        }
        let Some(frame) = s.frames.get_mut(&gfn) else {
            fail(
                &mut s.report,
                format!("event for untracked frame {gfn:#x} ({:?})", e.source),
            );
            return;
        };
        let end = off + e.new.len();
        if end > 4096 {
            fail(
                &mut s.report,
                format!("event at {:#x} spans two frames", e.gpa.0),
            );
            return;
        }
        if let Some(old) = e.old
            && old != &frame[off..end]
        {
            fail(
                &mut s.report,
                format!(
                    "event at {:#x}: old bytes {old:02x?} but replay has {:02x?}",
                    e.gpa.0,
                    &frame[off..end]
                ),
            );
        }
        frame[off..end].copy_from_slice(e.new);
    }
}

impl FrameObserver for Oracle {
    fn tracked(&self, gfn: Gfn, kind: PageKind, contents: &[u8]) {
        let mut s = self.state();
        s.report.frames += 1;
        if kind == PageKind::PageTable {
            s.report.table_frames += 1;
        }
        if s.frames.insert(gfn.0, contents.to_vec()).is_some() {
            fail(&mut s.report, format!("frame {:#x} tracked twice", gfn.0));
        }
        s.kinds.insert(gfn.0, kind);
    }

    fn untracked(&self, gfn: Gfn, contents: &[u8]) {
        let mut s = self.state();
        match s.frames.remove(&gfn.0) {
            None => fail(
                &mut s.report,
                format!("frame {:#x} untracked but not tracked", gfn.0),
            ),
            Some(replayed) if replayed == contents => s.report.replayed += 1,
            Some(replayed) => {
                let at = replayed
                    .iter()
                    .zip(contents)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                let kind = s.kinds.get(&gfn.0).copied();
                fail(
                    &mut s.report,
                    format!(
                        "frame {:#x} ({kind:?}) differs from its replay at offset {at:#x}: replay {:02x} memory {:02x}",
                        gfn.0, replayed[at], contents[at]
                    ),
                );
            }
        }
    }
}
