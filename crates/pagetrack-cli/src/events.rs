//! The event sink: a [`TrackNotifier`] that numbers write events in delivery order, keeps
//! per-frame counts for the human view, and hands each event to a writer thread that prints
//! it as one JSON line.
//!
//! The callback runs on the vCPU thread inside the trapped store's round trip, so it does only
//! memory work: under one short mutex it takes the next sequence number, updates the frame's
//! counters and appends a copy of the bytes (inline, no allocation for stores of up to 8
//! bytes) to a pending batch. Appending under the same lock keeps the stream in sequence order
//! with several vCPUs. It makes no system call: the writer thread wakes on its own every
//! [`TICK`] (or when a batch grows large), swaps the batch out, formats it and writes it with
//! one flush. A reader slower than the guest makes callbacks wait once [`MAX_PENDING`] events
//! are pending: the stream is never lossy.
//!
//! # JSON Lines
//!
//! ```text
//! {"type":"write","seq":1,"source":"vcpu","vcpu":0,"gpa":"0x5000","len":1,"old":"00","new":"11"}
//! {"type":"write","seq":2,"source":"device","vcpu":null,"gpa":"0x5008","len":2,"old":"0000","new":"abcd"}
//! {"type":"exit","reason":"debug-exit","code":0,"detail":"vcpu 0 wrote 0 to port 0xf4"}
//! {"type":"summary","tracked_writes":2,"tracked_bytes":3,"exits":2,"slot_changes":2,"elapsed_ms":1.234}
//! ```
//!
//! With `--relaxed auto|always`, write events of relaxed frames are coalesced (the net change
//! of a run of words over one epoch, found by a dirty-log diff): they carry `"source":"guest"`
//! with a null `vcpu`, and two more keys at the end, `"coalesced":true,"epoch":N`; the
//! summary then ends with `"relaxed_frames"` and `"coalesced_writes"`. With `--dirty-ring N`
//! a coalesced line whose frame's first writer the ring names ends with one more key,
//! `"first_writer":N` (the vCPU that dirtied the frame first in the epoch; absent when
//! unknown), and the summary ends with `"dirty_harvester"` (`"ring-acq-rel"` or `"ring"`).
//! Lines of strict frames, and every line with `--relaxed off` and no `--dirty-ring`, are
//! exactly as above.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use pagetrack::{PAGE_SIZE, Source, TrackNotifier, WriteEvent};
use serde::{Serialize, Serializer};

use crate::UsageError;

/// How often the writer thread takes the pending batch when nothing wakes it earlier.
const TICK: Duration = Duration::from_millis(20);
/// A batch this large wakes the writer thread at once.
const WAKE_AT: usize = 1 << 14;
/// Pending events at most; a callback finding this many waits for the writer.
const MAX_PENDING: usize = 1 << 18;
/// Size of the output buffer (one write system call per this many bytes under load).
const OUTPUT_BUFFER: usize = 1 << 16;

/// Where `--events` goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `--events -`: standard output.
    Stdout,
    /// `--events FILE`: created or truncated.
    File(PathBuf),
}

impl Target {
    /// Parses the `--events` value (`-` is standard output).
    pub fn parse(s: &str) -> Result<Target, String> {
        match s {
            "" => Err("an empty file name (use - for standard output)".into()),
            "-" => Ok(Target::Stdout),
            path => Ok(Target::File(PathBuf::from(path))),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Stdout => f.write_str("standard output"),
            Target::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Who wrote a frame, for the human table.
pub fn writer_name(source: Source) -> String {
    match source {
        Source::Vcpu(n) => format!("vcpu {n}"),
        Source::Guest => "guest".into(),
        _ => "device".into(),
    }
}

/// Counters of one tracked frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameStats {
    /// Write events in the frame.
    pub writes: u64,
    /// Bytes they wrote.
    pub bytes: u64,
    /// The source of the first event.
    pub first: Source,
    /// The source of the last event.
    pub last: Source,
}

/// What the sink saw, for the summary and the human view.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Write events delivered (the last `seq`).
    pub writes: u64,
    /// Bytes of those events.
    pub bytes: u64,
    /// Events with a vCPU source.
    pub vcpu_writes: u64,
    /// Events with the device source.
    pub device_writes: u64,
    /// Coalesced events (relaxed frames).
    pub coalesced_writes: u64,
    /// Per written frame (by frame number), in frame order.
    pub frames: BTreeMap<u64, FrameStats>,
}

/// The `exit` line.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ExitLine {
    #[serde(rename = "type")]
    kind: &'static str,
    /// `debug-exit`, `hlt`, `error` or `timeout`.
    pub reason: &'static str,
    /// The byte the guest wrote to port 0xf4, or null.
    pub code: Option<u8>,
    /// What happened, in words.
    pub detail: String,
}

impl ExitLine {
    /// An exit line.
    pub fn new(reason: &'static str, code: Option<u8>, detail: String) -> ExitLine {
        ExitLine {
            kind: "exit",
            reason,
            code,
            detail,
        }
    }
}

/// The `summary` line.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SummaryLine {
    #[serde(rename = "type")]
    kind: &'static str,
    /// Write events in the stream.
    pub tracked_writes: u64,
    /// Bytes of those events.
    pub tracked_bytes: u64,
    /// vCPU exits to userspace (trapped stores included).
    pub exits: u64,
    /// KVM memslot changes made to start (and stop) tracking.
    pub slot_changes: u64,
    /// Wall time of the guest run in milliseconds (microsecond precision).
    pub elapsed_ms: f64,
    /// With relaxed mode on: frames that ran relaxed at some time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relaxed_frames: Option<u64>,
    /// With relaxed mode on: coalesced write events among `tracked_writes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coalesced_writes: Option<u64>,
    /// With `--dirty-ring`: the harvester that read KVM's dirty log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_harvester: Option<String>,
}

impl SummaryLine {
    /// A summary line.
    pub fn new(
        tracked_writes: u64,
        tracked_bytes: u64,
        exits: u64,
        slot_changes: u64,
        elapsed: std::time::Duration,
    ) -> SummaryLine {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        // Whole microseconds, so the value prints with at most three decimals.
        let elapsed_ms = micros as f64 / 1000.0;
        SummaryLine {
            kind: "summary",
            tracked_writes,
            tracked_bytes,
            exits,
            slot_changes,
            elapsed_ms,
            relaxed_frames: None,
            coalesced_writes: None,
            dirty_harvester: None,
        }
    }

    /// The same line with relaxed mode's counts (a run with `--relaxed auto|always`).
    pub fn with_relaxed(mut self, frames: u64, coalesced: u64) -> SummaryLine {
        self.relaxed_frames = Some(frames);
        self.coalesced_writes = Some(coalesced);
        self
    }

    /// The same line naming the dirty-log harvester (a run with `--dirty-ring`).
    pub fn with_harvester(mut self, harvester: impl fmt::Display) -> SummaryLine {
        self.dirty_harvester = Some(harvester.to_string());
        self
    }
}

/// Old bytes (if known) followed by the new ones: inline for stores of up to 8 bytes (every
/// guest store), on the heap for larger device writes.
#[derive(Debug)]
enum Bytes {
    Inline([u8; 16]),
    Heap(Box<[u8]>),
}

/// One pending write event: the bytes are copied out of the callback's borrowed buffers.
#[derive(Debug)]
struct WriteRecord {
    seq: u64,
    source: Source,
    gpa: u64,
    len: usize,
    has_old: bool,
    /// The epoch of a coalesced event.
    epoch: Option<u64>,
    /// A coalesced event's first writer, where the dirty ring names it.
    first_writer: Option<u32>,
    bytes: Bytes,
}

impl WriteRecord {
    fn new(seq: u64, e: &WriteEvent<'_>) -> WriteRecord {
        let len = e.new.len();
        let old = e.old.filter(|o| o.len() == len);
        let total = len * if old.is_some() { 2 } else { 1 };
        let bytes = if total <= 16 {
            let mut buf = [0u8; 16];
            let new_at = total - len;
            buf[..new_at].copy_from_slice(old.unwrap_or_default());
            buf[new_at..total].copy_from_slice(e.new);
            Bytes::Inline(buf)
        } else {
            let mut v = Vec::with_capacity(total);
            v.extend_from_slice(old.unwrap_or_default());
            v.extend_from_slice(e.new);
            Bytes::Heap(v.into_boxed_slice())
        };
        WriteRecord {
            seq,
            source: e.source,
            gpa: e.gpa.0,
            len,
            has_old: old.is_some(),
            epoch: e.coalesced,
            first_writer: e.coalesced.and(e.first_writer),
            bytes,
        }
    }

    /// The old bytes (if known) and the new ones.
    fn old_new(&self) -> (Option<&[u8]>, &[u8]) {
        let total = self.len * if self.has_old { 2 } else { 1 };
        let all = match &self.bytes {
            Bytes::Inline(buf) => &buf[..total],
            Bytes::Heap(b) => &b[..],
        };
        let (old, new) = all.split_at(total - self.len);
        (self.has_old.then_some(old), new)
    }
}

#[derive(Debug)]
enum Line {
    Write(WriteRecord),
    Exit(ExitLine),
    Summary(SummaryLine),
}

#[derive(Debug, Default)]
struct State {
    totals: Totals,
    /// A stream is attached (`--events`).
    streaming: bool,
    /// Lines not yet taken by the writer thread, in order.
    pending: Vec<Line>,
    /// The closing lines are pending: nothing follows.
    closing: bool,
    /// The writer stopped on an I/O error: stop queueing.
    failed: bool,
}

/// What the callbacks and the writer thread share.
#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the writer thread early (a large batch, or the closing lines).
    work: Condvar,
    /// Wakes callbacks waiting for room in the batch.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a callback panicked; the counters are still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The writer thread and where it writes.
#[derive(Debug)]
struct Writer {
    thread: JoinHandle<io::Result<()>>,
    target: Target,
}

/// The notifier. Register it, run the guest, unregister it, then [`EventSink::finish`].
#[derive(Debug)]
pub struct EventSink {
    shared: Arc<Shared>,
    writer: Mutex<Option<Writer>>,
    /// Events so far, for the live progress line (read without the lock).
    delivered: AtomicU64,
}

impl EventSink {
    /// A sink that keeps counters and, with a `target`, streams every event to it as JSON
    /// Lines (opening the file and starting the writer thread now).
    ///
    /// # Errors
    /// The file cannot be created ([`UsageError`]), or the thread cannot start.
    pub fn new(target: Option<&Target>) -> anyhow::Result<Arc<EventSink>> {
        let shared = Arc::new(Shared::default());
        let writer = match target {
            None => None,
            Some(target) => {
                let out: Box<dyn Write + Send> = match target {
                    Target::Stdout => Box::new(io::stdout()),
                    Target::File(path) => Box::new(File::create(path).map_err(|e| {
                        UsageError(format!("cannot create events file {}: {e}", path.display()))
                    })?),
                };
                shared.lock().streaming = true;
                let theirs = Arc::clone(&shared);
                let thread = std::thread::Builder::new()
                    .name("pagetrack-events".into())
                    .spawn(move || {
                        write_lines(&theirs, BufWriter::with_capacity(OUTPUT_BUFFER, out))
                    })
                    .context("cannot start the event writer thread")?;
                Some(Writer {
                    thread,
                    target: target.clone(),
                })
            }
        };
        Ok(Arc::new(EventSink {
            shared,
            writer: Mutex::new(writer),
            delivered: AtomicU64::new(0),
        }))
    }

    /// Events delivered so far.
    pub fn delivered(&self) -> u64 {
        // Relaxed: a progress figure; pairs with the Relaxed increment in `track_write`.
        self.delivered.load(Ordering::Relaxed)
    }

    /// The counters so far.
    pub fn totals(&self) -> Totals {
        self.shared.lock().totals.clone()
    }

    /// Queues the closing lines and waits until the writer has written and flushed
    /// everything. Call it after the notifier was unregistered, so that no event can follow;
    /// events arriving later are counted but not written.
    ///
    /// # Errors
    /// Writing the stream failed (disk full, closed pipe).
    pub fn finish(&self, exit: ExitLine, summary: SummaryLine) -> anyhow::Result<()> {
        {
            let mut st = self.shared.lock();
            if st.streaming && !st.failed {
                st.pending.push(Line::Exit(exit));
                st.pending.push(Line::Summary(summary));
            }
            st.closing = true;
        }
        self.shared.work.notify_one();
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        match writer {
            None => Ok(()),
            Some(w) => match w.thread.join() {
                Ok(res) => res.with_context(|| format!("cannot write events to {}", w.target)),
                Err(panic) => std::panic::resume_unwind(panic),
            },
        }
    }
}

impl TrackNotifier for EventSink {
    fn track_write(&self, e: &WriteEvent<'_>) {
        let len = e.new.len() as u64;
        let mut st = self.shared.lock();
        let t = &mut st.totals;
        t.writes += 1;
        t.bytes += len;
        match e.source {
            Source::Vcpu(_) | Source::Guest => t.vcpu_writes += 1,
            _ => t.device_writes += 1,
        }
        t.coalesced_writes += u64::from(e.is_coalesced());
        let seq = t.writes;
        t.frames
            .entry(e.gpa.0 / PAGE_SIZE)
            .and_modify(|f| {
                f.writes += 1;
                f.bytes += len;
                f.last = e.source;
            })
            .or_insert(FrameStats {
                writes: 1,
                bytes: len,
                first: e.source,
                last: e.source,
            });
        if st.streaming && !st.closing {
            while st.pending.len() >= MAX_PENDING && !st.failed {
                st = self.shared.room.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if !st.failed {
                st.pending.push(Line::Write(WriteRecord::new(seq, e)));
                if st.pending.len() == WAKE_AT {
                    self.shared.work.notify_one();
                }
            }
        }
        drop(st);
        // Relaxed: a progress figure only.
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }
}

/// The writer thread: every [`TICK`] (or when woken) takes the pending batch, formats it and
/// writes it with one flush; ends after writing the closing lines.
fn write_lines(shared: &Shared, mut out: impl Write) -> io::Result<()> {
    let mut batch: Vec<Line> = Vec::new();
    let mut line = Vec::with_capacity(256);
    loop {
        let closing = {
            let mut st = shared.lock();
            if st.pending.is_empty() && !st.closing {
                st = shared
                    .work
                    .wait_timeout(st, TICK)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            std::mem::swap(&mut st.pending, &mut batch);
            st.closing
        };
        if batch.len() >= MAX_PENDING {
            shared.room.notify_all();
        }
        let written = write_batch(&batch, &mut line, &mut out).and_then(|()| out.flush());
        batch.clear();
        if let Err(e) = written {
            let mut st = shared.lock();
            st.failed = true;
            st.pending.clear();
            drop(st);
            shared.room.notify_all();
            return Err(e);
        }
        if closing {
            return Ok(());
        }
    }
}

fn write_batch(batch: &[Line], line: &mut Vec<u8>, out: &mut impl Write) -> io::Result<()> {
    for l in batch {
        line.clear();
        encode(l, line)?;
        line.push(b'\n');
        out.write_all(line)?;
    }
    Ok(())
}

/// Appends the JSON text of `l` (without the newline) to `buf`.
fn encode(l: &Line, buf: &mut Vec<u8>) -> io::Result<()> {
    match l {
        Line::Write(w) => {
            let (old, new) = w.old_new();
            let (source, vcpu) = match w.source {
                Source::Vcpu(i) => ("vcpu", Some(i)),
                Source::Guest => ("guest", None),
                _ => ("device", None),
            };
            let json = WriteJson {
                kind: "write",
                seq: w.seq,
                source,
                vcpu,
                gpa: HexAddr(w.gpa),
                len: w.len,
                old: old.map(Hex),
                new: Hex(new),
                coalesced: w.epoch.map(|_| true),
                epoch: w.epoch,
                first_writer: w.first_writer,
            };
            serde_json::to_writer(buf, &json)?;
        }
        Line::Exit(x) => serde_json::to_writer(buf, x)?,
        Line::Summary(s) => serde_json::to_writer(buf, s)?,
    }
    Ok(())
}

#[derive(Serialize)]
struct WriteJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    seq: u64,
    source: &'static str,
    vcpu: Option<u32>,
    gpa: HexAddr,
    len: usize,
    old: Option<Hex<'a>>,
    new: Hex<'a>,
    /// Only on coalesced events: the contract's strict lines are unchanged.
    #[serde(skip_serializing_if = "Option::is_none")]
    coalesced: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<u64>,
    /// Only on coalesced events whose first writer the dirty ring gave.
    #[serde(skip_serializing_if = "Option::is_none")]
    first_writer: Option<u32>,
}

/// An address as a lowercase `0x` hex string.
struct HexAddr(u64);

impl Serialize for HexAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:#x}", self.0))
    }
}

/// Bytes as lowercase hex digits, two per byte, in memory order.
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut chunk = [0u8; 128];
        for part in self.0.chunks(chunk.len() / 2) {
            for (i, b) in part.iter().enumerate() {
                chunk[2 * i] = DIGITS[usize::from(b >> 4)];
                chunk[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
            }
            let text = std::str::from_utf8(&chunk[..2 * part.len()]).map_err(|_| fmt::Error)?;
            f.write_str(text)?;
        }
        Ok(())
    }
}

impl Serialize for Hex<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use pagetrack::Gpa;

    use super::*;

    fn text(l: &Line) -> String {
        let mut v = Vec::new();
        encode(l, &mut v).unwrap();
        String::from_utf8(v).unwrap()
    }

    fn write(seq: u64, source: Source, gpa: u64, old: Option<&[u8]>, new: &[u8]) -> Line {
        let mut e = WriteEvent::new(Gpa(gpa), new, source);
        if let Some(old) = old {
            e = e.with_old(old);
        }
        Line::Write(WriteRecord::new(seq, &e))
    }

    #[test]
    fn encode_coalesced_write_appends_the_mark_and_the_epoch() {
        let e = WriteEvent::new(Gpa(0x5008), &[1, 2], Source::Guest)
            .with_old(&[0, 0])
            .in_epoch(4);
        let l = Line::Write(WriteRecord::new(3, &e));
        assert_eq!(
            text(&l),
            r#"{"type":"write","seq":3,"source":"guest","vcpu":null,"gpa":"0x5008","len":2,"old":"0000","new":"0102","coalesced":true,"epoch":4}"#
        );
    }

    #[test]
    fn encode_coalesced_write_with_a_first_writer_appends_it_last() {
        let e = WriteEvent::new(Gpa(0x5008), &[1, 2], Source::Guest)
            .with_old(&[0, 0])
            .in_epoch(4)
            .first_written_by(1);
        let l = Line::Write(WriteRecord::new(3, &e));
        assert_eq!(
            text(&l),
            r#"{"type":"write","seq":3,"source":"guest","vcpu":null,"gpa":"0x5008","len":2,"old":"0000","new":"0102","coalesced":true,"epoch":4,"first_writer":1}"#
        );
        // An exact event never carries the key, whatever a backend put there.
        let exact = WriteEvent::new(Gpa(0x5000), &[0x11], Source::Vcpu(0))
            .with_old(&[0])
            .first_written_by(0);
        assert_eq!(
            text(&Line::Write(WriteRecord::new(1, &exact))),
            r#"{"type":"write","seq":1,"source":"vcpu","vcpu":0,"gpa":"0x5000","len":1,"old":"00","new":"11"}"#
        );
    }

    #[test]
    fn summary_with_a_harvester_appends_it() {
        let s = SummaryLine::new(2, 3, 4, 5, Duration::from_micros(1234))
            .with_relaxed(6, 7)
            .with_harvester("ring-acq-rel");
        assert!(text(&Line::Summary(s)).ends_with(
            r#""relaxed_frames":6,"coalesced_writes":7,"dirty_harvester":"ring-acq-rel"}"#
        ));
    }

    #[test]
    fn summary_with_relaxed_counts_appends_them_and_without_is_unchanged() {
        let plain = SummaryLine::new(2, 3, 4, 5, Duration::from_micros(1234));
        let want = r#"{"type":"summary","tracked_writes":2,"tracked_bytes":3,"exits":4,"slot_changes":5,"elapsed_ms":1.234"#;
        assert_eq!(text(&Line::Summary(plain.clone())), format!("{want}}}"));
        assert_eq!(
            text(&Line::Summary(plain.with_relaxed(6, 7))),
            format!(r#"{want},"relaxed_frames":6,"coalesced_writes":7}}"#)
        );
    }

    #[test]
    fn encode_vcpu_write_matches_the_contract() {
        let l = write(1, Source::Vcpu(0), 0x5000, Some(&[0x00]), &[0x11]);
        assert_eq!(
            text(&l),
            r#"{"type":"write","seq":1,"source":"vcpu","vcpu":0,"gpa":"0x5000","len":1,"old":"00","new":"11"}"#
        );
    }

    #[test]
    fn encode_device_write_has_null_vcpu_and_memory_order() {
        let l = write(7, Source::Device, 0xABC0, Some(&[0, 0]), &[0xde, 0xad]);
        assert_eq!(
            text(&l),
            r#"{"type":"write","seq":7,"source":"device","vcpu":null,"gpa":"0xabc0","len":2,"old":"0000","new":"dead"}"#
        );
    }

    #[test]
    fn encode_unknown_old_is_null() {
        let l = write(2, Source::Vcpu(3), 0, None, &[0xff]);
        assert!(text(&l).contains(r#""gpa":"0x0","len":1,"old":null,"new":"ff""#));
    }

    #[test]
    fn encode_large_write_goes_through_the_heap() {
        let old = [0u8; 16];
        let new: Vec<u8> = (0..16).collect();
        let l = write(3, Source::Device, 0x1000, Some(&old), &new);
        assert!(matches!(
            &l,
            Line::Write(WriteRecord {
                bytes: Bytes::Heap(_),
                ..
            })
        ));
        assert!(text(&l).ends_with(
            r#""len":16,"old":"00000000000000000000000000000000","new":"000102030405060708090a0b0c0d0e0f"}"#
        ));
        let l = write(4, Source::Vcpu(0), 0x1000, Some(&[1; 8]), &[2; 8]);
        assert!(matches!(
            &l,
            Line::Write(WriteRecord {
                bytes: Bytes::Inline(_),
                ..
            })
        ));
        assert!(
            text(&l).ends_with(r#""len":8,"old":"0101010101010101","new":"0202020202020202"}"#)
        );
    }

    #[test]
    fn encode_exit_and_summary_lines() {
        let x = Line::Exit(ExitLine::new("timeout", None, "a \"quoted\" detail".into()));
        assert_eq!(
            text(&x),
            r#"{"type":"exit","reason":"timeout","code":null,"detail":"a \"quoted\" detail"}"#
        );
        let s = Line::Summary(SummaryLine::new(
            3,
            24,
            10,
            2,
            std::time::Duration::from_micros(12_345),
        ));
        assert_eq!(
            text(&s),
            r#"{"type":"summary","tracked_writes":3,"tracked_bytes":24,"exits":10,"slot_changes":2,"elapsed_ms":12.345}"#
        );
    }

    #[test]
    fn sink_streams_events_in_order_then_closing_lines() {
        let dir = std::env::temp_dir().join(format!("pagetrack-cli-sink-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl");
        let sink = EventSink::new(Some(&Target::File(path.clone()))).unwrap();
        let n = 3 * WAKE_AT as u64 + 5;
        for i in 0..n {
            let new = i.to_le_bytes();
            sink.track_write(
                &WriteEvent::new(Gpa(0x5000 + 8 * (i % 512)), &new, Source::Vcpu(0))
                    .with_old(&[0; 8]),
            );
        }
        sink.finish(
            ExitLine::new("debug-exit", Some(0), String::new()),
            SummaryLine::new(n, 8 * n, n, 1, Duration::ZERO),
        )
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len() as u64, n + 2);
        for (i, l) in lines.iter().take(lines.len() - 2).enumerate() {
            assert!(
                l.starts_with(&format!(r#"{{"type":"write","seq":{},"#, i + 1)),
                "{l}"
            );
        }
        assert!(lines[lines.len() - 2].starts_with(r#"{"type":"exit""#));
        assert!(lines[lines.len() - 1].starts_with(r#"{"type":"summary""#));
        assert_eq!(sink.totals().writes, n);
        assert_eq!(sink.totals().frames.len(), 1);
    }

    #[test]
    fn hex_of_long_buffers_is_complete() {
        let bytes: Vec<u8> = (0..=255).collect();
        let s = Hex(&bytes).to_string();
        assert_eq!(s.len(), 512);
        assert!(s.starts_with("000102"));
        assert!(s.ends_with("fdfeff"));
    }
}
