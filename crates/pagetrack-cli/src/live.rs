//! The human view: a progress line on the terminal while the guest runs, then a table per
//! tracked frame and a summary.

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pagetrack::PAGE_SIZE;
use pagetrack_kvm::Vm;

use crate::events::{EventSink, writer_name};
use crate::session::Report;

/// How often the progress line is redrawn.
const TICK: Duration = Duration::from_millis(100);
/// Frames listed in full when no more are tracked; beyond, only written frames are listed.
const ALL_FRAMES_UP_TO: usize = 32;
/// Width of wrapped prose.
const WIDTH: usize = 88;
/// Rows of the frame table at most.
const MAX_ROWS: usize = 64;

/// The progress line, redrawn on standard output until [`Progress::stop`].
#[derive(Debug)]
pub struct Progress {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Progress {
    /// Starts redrawing the progress line of a run that starts now.
    pub fn start(vm: Vm, sink: Arc<EventSink>) -> Progress {
        let (stop, rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let (mut last_t, mut last_n) = (start, 0u64);
            let mut out = io::stdout();
            // Redraw on every tick until `stop` is sent (or dropped).
            while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(TICK) {
                let (now, n) = (Instant::now(), sink.delivered());
                let rate = per_second(n - last_n, now - last_t);
                (last_t, last_n) = (now, n);
                let trapped = vm.stats().trapped_writes;
                // A terminal that fails to take the progress line loses nothing of the result.
                let _ignored = write!(
                    out,
                    "\r\x1b[2K  running {:.1} s   {} events   {} events/s   {} trapped stores",
                    start.elapsed().as_secs_f64(),
                    thousands(n),
                    thousands(rate),
                    thousands(trapped)
                )
                .and_then(|()| out.flush());
            }
            let _ignored = write!(out, "\r\x1b[2K").and_then(|()| out.flush());
        });
        Progress { stop, thread }
    }

    /// Stops and erases the progress line.
    pub fn stop(self) {
        // The thread ends on a message or on the sender's drop, so a failed send is harmless.
        let _ignored = self.stop.send(());
        if let Err(panic) = self.thread.join() {
            std::panic::resume_unwind(panic);
        }
    }
}

/// `n` events over `t` as a per-second rate.
pub fn per_second(n: u64, t: Duration) -> u64 {
    let nanos = t.as_nanos();
    if nanos == 0 {
        return 0;
    }
    u64::try_from(u128::from(n) * 1_000_000_000 / nanos).unwrap_or(u64::MAX)
}

/// `t` shared out over `n` events, in nanoseconds (0 without events).
pub fn per_event_ns(t: Duration, n: u64) -> u64 {
    match n {
        0 => 0,
        n => u64::try_from(t.as_nanos() / u128::from(n)).unwrap_or(u64::MAX),
    }
}

/// Writes `text` as a paragraph wrapped at [`WIDTH`] columns, each line indented by two spaces.
pub fn paragraph(out: &mut dyn Write, text: &str) -> io::Result<()> {
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && 2 + line.chars().count() + 1 + word.chars().count() > WIDTH {
            writeln!(out, "  {line}")?;
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        writeln!(out, "  {line}")?;
    }
    Ok(())
}

/// `n` as "once", "twice" or "N times".
pub fn times(n: u64) -> String {
    match n {
        1 => "once".into(),
        2 => "twice".into(),
        n => format!("{} times", thousands(n)),
    }
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A duration in nanoseconds, in the unit that reads best (`850 ns`, `12.3 µs`, `4.56 ms`,
/// `1.23 s`).
pub fn nanos(ns: u64) -> String {
    let v = Duration::from_nanos(ns).as_secs_f64();
    match ns {
        0..1_000 => format!("{ns} ns"),
        1_000..1_000_000 => format!("{:.1} µs", v * 1e6),
        1_000_000..1_000_000_000 => format!("{:.2} ms", v * 1e3),
        _ => format!("{v:.2} s"),
    }
}

/// A [`Duration`] as [`nanos`] does.
pub fn duration(d: Duration) -> String {
    nanos(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The table of tracked frames: frame, writes, bytes, first and last writer.
pub fn write_frames(out: &mut dyn Write, r: &Report) -> io::Result<()> {
    let written = r.totals.frames.len();
    writeln!(
        out,
        "tracked frames: {} ({} written)",
        thousands(r.frames.len() as u64),
        thousands(written as u64)
    )?;
    if r.frames.is_empty() {
        writeln!(out, "  (nothing tracked: use --track RANGE)")?;
        return Ok(());
    }
    let rows: Vec<u64> = if r.frames.len() <= ALL_FRAMES_UP_TO {
        r.frames.iter().map(|g| g.0).collect()
    } else {
        r.totals.frames.keys().copied().collect()
    };
    writeln!(
        out,
        "  {:<14} {:>10} {:>12}  {:<13} last writer",
        "frame", "writes", "bytes", "first writer"
    )?;
    for gfn in rows.iter().take(MAX_ROWS) {
        let addr = format!("{:#x}", gfn * PAGE_SIZE);
        match r.totals.frames.get(gfn) {
            Some(f) => writeln!(
                out,
                "  {addr:<14} {:>10} {:>12}  {:<13} {}",
                thousands(f.writes),
                thousands(f.bytes),
                writer_name(f.first),
                writer_name(f.last)
            )?,
            None => writeln!(out, "  {addr:<14} {:>10} {:>12}  {:<13} -", 0, 0, "-")?,
        }
    }
    if rows.len() > MAX_ROWS {
        writeln!(
            out,
            "  ... {} more written frames (--events FILE lists every write)",
            thousands((rows.len() - MAX_ROWS) as u64)
        )?;
    }
    if r.frames.len() > ALL_FRAMES_UP_TO && written < r.frames.len() {
        writeln!(
            out,
            "  {} tracked frames were not written",
            thousands((r.frames.len() - written) as u64)
        )?;
    }
    Ok(())
}

/// The summary: how the guest ended, events, exits, rates, slot changes.
pub fn write_summary(out: &mut dyn Write, r: &Report) -> io::Result<()> {
    let o = &r.outcome;
    let t = &r.totals;
    let code = o.code.map(|c| format!(", code {c}")).unwrap_or_default();
    writeln!(out, "summary")?;
    writeln!(
        out,
        "  end:           {}{code} ({})",
        o.reason.as_str(),
        o.detail
    )?;
    writeln!(
        out,
        "  run time:      {}, {} exits to the VMM ({}/s)",
        duration(o.elapsed),
        thousands(o.exits),
        thousands(per_second(o.exits, o.elapsed))
    )?;
    writeln!(
        out,
        "  tracked:       {} writes, {} bytes ({} by vCPUs, {} by devices)",
        thousands(t.writes),
        thousands(t.bytes),
        thousands(t.vcpu_writes),
        thousands(t.device_writes)
    )?;
    if t.vcpu_writes > 0 {
        writeln!(
            out,
            "  per trapped store: {} (run time / trapped stores; {} trapped stores in all)",
            nanos(per_event_ns(o.elapsed, r.stats.trapped_writes)),
            thousands(r.stats.trapped_writes)
        )?;
    }
    writeln!(
        out,
        "  slot changes:  {} for tracking ({}; vCPUs paused {}, {})",
        thousands(r.slot_changes),
        nanos(r.slot_change_ns),
        times(r.pauses),
        nanos(r.pause_ns)
    )?;
    let f = &r.stats.fragments;
    writeln!(
        out,
        "  KVM memslots:  {} in use ({} read-only) of {}",
        thousands(f.fragments as u64),
        thousands(f.readonly_fragments as u64),
        thousands(f.budget as u64)
    )?;
    if r.relaxed != crate::relaxed::RelaxedArg::Off {
        let x = &r.stats.relaxed;
        writeln!(
            out,
            "  relaxed:       {} frames ran relaxed, {} coalesced writes, {} syncs ({})",
            thousands(x.frames_relaxed),
            thousands(r.totals.coalesced_writes),
            thousands(x.syncs),
            nanos(x.sync_ns)
        )?;
    }
    let ring = matches!(r.harvester, pagetrack_kvm::DirtyHarvester::Ring { .. });
    if ring || r.relaxed != crate::relaxed::RelaxedArg::Off {
        writeln!(out, "  dirty harvest: {}", r.harvester)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn nanos_picks_a_unit() {
        assert_eq!(nanos(850), "850 ns");
        assert_eq!(nanos(12_300), "12.3 µs");
        assert_eq!(nanos(4_560_000), "4.56 ms");
        assert_eq!(nanos(1_230_000_000), "1.23 s");
    }

    #[test]
    fn paragraph_wraps_at_the_width() {
        let mut v = Vec::new();
        paragraph(&mut v, &"word ".repeat(40)).unwrap();
        let text = String::from_utf8(v).unwrap();
        assert!(
            text.lines()
                .all(|l| l.len() <= WIDTH && l.starts_with("  word"))
        );
        assert_eq!(text.split_whitespace().count(), 40);
    }

    #[test]
    fn per_second_of_zero_time_is_zero() {
        assert_eq!(per_second(5, Duration::ZERO), 0);
        assert_eq!(per_second(5, Duration::from_millis(500)), 10);
    }
}
