//! `pagetrack exec -- PROGRAM ARGS...`: run an unmodified static x86-64 Linux program in a
//! process VM (the program at CPL3, its system calls served by pagetrack), with its memory
//! tracked by region.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pagetrack_vmm::process::{
    Input, Output, Process, ProcessConfig, ProcessEnd, ProcessOutcome, Region, syscall_name,
};
use serde::Serialize;

use crate::UsageError;
use crate::events::{EventSink, ExitLine, SummaryLine, Target};
use crate::range::{parse_secs, parse_size};
use crate::relaxed::RelaxedArg;

/// The long help: the guest, containment, regions and the event stream.
const EXEC_HELP: &str = "\
The program:
  A static x86-64 Linux executable (ET_EXEC, or static-pie), e.g. Debian's
  /bin/busybox from busybox-static. Dynamic executables are refused. It runs at CPL3
  in a KVM guest; pagetrack serves its system calls (files, memory, time, identity;
  an unknown call returns -ENOSYS and is counted). PROGRAM without a slash is looked
  up in PATH. Its standard input, output and error are pagetrack's, unchanged.

Containment:
  The program reads only files under --dir (default: the current directory) and the
  files named in its arguments; it creates or writes files only under --allow-write
  directories. Paths that escape (.., symlinks out) fail with EACCES, enforced by the
  kernel (openat2 RESOLVE_BENEATH from each allowed directory, calls made on the
  resulting descriptors), so renames and symlink swaps racing a lookup cannot escape.
  A directory with /proc below it (--dir /, --allow-write /proc) is refused. Hard links
  to outside files made on the host inside an allowed directory do reach those files.
  fork, vfork, exec, sockets and signals to other processes are refused (EPERM
  or EACCES). Relative paths start at pagetrack's current directory. PROGRAM must be a
  regular file with execute permission (as execve requires). /dev/null, /dev/zero,
  /dev/random and /dev/urandom are pagetrack's own. chmod, utimensat and chown (as a
  no-op only) work under --allow-write; setuid and setgid bits are never set.

Tracking (--track, repeatable):
  stack, heap (the program break), data (writable image segments), text (read-only
  image segments), mmap, page-tables (the page tables pagetrack writes for the
  program), writable (stack, heap, data, mmap and page-tables), or a range of the
  program's virtual addresses ADDR-END (END exclusive) or ADDR+LEN. Regions follow the
  program: frames mapped later (brk, mmap, stack growth, new page tables) are tracked
  as they appear; frames it gives back are untracked. Each store to a tracked frame is
  a trapped exit (tens of microseconds on software KVM), so tracking the stack of a
  compute-heavy program is slow.

Events (--events FILE; standard output belongs to the program), JSON Lines:
  {\"type\":\"write\",...} lines as in `pagetrack run`: gpa is the guest-physical address
    of the frame; source is \"vcpu\" (the program's stores) or \"device\" (pagetrack's
    writes: read() data, page-table entries).
  {\"type\":\"exit\",\"reason\":\"exit\",\"code\":0,\"detail\":\"exited with status 0\"}
    reason: exit, signal (a CPU exception or a fatal signal: its own, a timer's, SIGPIPE), timeout,
    error; code is the exit status pagetrack returns.
  {\"type\":\"summary\",...} as in `pagetrack run`.
  With --relaxed auto (the default) or always, frames that take many stores run relaxed
  (writable, dirty-logged, with a shadow copy): their changes arrive at every system call
  (and every 10 ms) as coalesced write events, {...,\"source\":\"guest\",\"vcpu\":null,...,
  \"coalesced\":true,\"epoch\":N}, and the summary line ends with \"relaxed_frames\" and
  \"coalesced_writes\". auto relaxes a frame, with the tracked frames of its aligned 64 KiB
  group, at its first trapped store (--promote-after N --promote-window MS: after N
  within MS milliseconds). --exact
  (--relaxed off) keeps one exact event per store.
  {\"type\":\"process\",\"syscalls\":23,\"unknown_syscalls\":{\"rt_sigaction (13)\":2},...}
    system calls by name, unknown and refused ones, stack growth faults, tracked and
    untracked frames, translation invalidations, and the time split between the guest
    and system-call handling.

Exit status:
  the program's own status; 128 + signal if a CPU exception or its own fatal signal
  ended it (the exception is reported on standard error: vector, RIP, address);
  124 for a timeout (as timeout(1); the exit line's reason is \"timeout\"), whether
  the program was computing or waiting in a call (sleep, input);
  1 for a guest pagetrack cannot go on with, or a host failure;
  2 for a usage error (bad option, missing, dynamic, 32-bit or non-ELF program, a
  PROGRAM that is not a regular file or not executable, a directory exposing /proc).";

/// `pagetrack exec` options.
#[derive(Debug, clap::Args)]
#[command(after_long_help = EXEC_HELP)]
pub struct ExecArgs {
    /// Track a region: stack, heap, data, text, mmap, page-tables, writable, ADDR-END or
    /// ADDR+LEN (program virtual addresses); repeatable.
    #[arg(long = "track", value_name = "REGION", value_parser = parse_region)]
    tracks: Vec<Region>,
    /// Write every event as JSON Lines to FILE (standard output is the program's).
    #[arg(long, value_name = "FILE", value_parser = parse_events_file)]
    events: Option<PathBuf>,
    /// The directory the program may read under (default: the current directory).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Let the program create and write files under DIR; repeatable.
    #[arg(long = "allow-write", value_name = "DIR")]
    allow_write: Vec<PathBuf>,
    /// Guest RAM, a multiple of 2M from 16M to 4G (K, M or G suffix).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    mem: u64,
    /// End the run after SECS seconds (fractions allowed): status 124, as timeout(1).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    timeout: Option<Duration>,
    /// Start the program with an empty environment instead of pagetrack's.
    #[arg(long)]
    clear_env: bool,
    /// After the program ends, print a summary to standard error (system calls, unknown
    /// calls, tracking, time split).
    #[arg(long)]
    summary: bool,
    /// Relaxed mode of tracked frames: auto (hot frames run relaxed: coalesced events at
    /// every system call), always, or off (one exact event per store).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = RelaxedArg::Auto)]
    relaxed: RelaxedArg,
    /// Exact events only: short for --relaxed off.
    #[arg(long, conflicts_with = "relaxed")]
    exact: bool,
    #[command(flatten)]
    policy: crate::relaxed::PolicyArgs,
    /// The program and its arguments (put them after `--`).
    #[arg(
        value_name = "PROGRAM",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<OsString>,
}

fn parse_region(s: &str) -> Result<Region, pagetrack_vmm::RegionError> {
    s.parse()
}

fn parse_events_file(s: &str) -> Result<PathBuf, String> {
    match Target::parse(s)? {
        Target::Stdout => Err(
            "standard output belongs to the program: give a file (e.g. --events events.jsonl)"
                .into(),
        ),
        Target::File(p) => Ok(p),
    }
}

/// `PROGRAM` itself if it has a slash, else the first executable file of that name in PATH.
fn find_program(name: &Path) -> PathBuf {
    if name.components().count() > 1 || name.is_absolute() {
        return name.to_owned();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| name.to_owned())
}

fn utf8(s: OsString, what: &str) -> Result<String, UsageError> {
    s.into_string()
        .map_err(|s| UsageError(format!("{what} {} is not UTF-8", s.to_string_lossy())))
}

/// The extra JSON line after `summary`.
#[derive(Debug, Serialize)]
struct ProcessLine {
    #[serde(rename = "type")]
    kind: &'static str,
    status: u8,
    syscalls: u64,
    by_name: std::collections::BTreeMap<String, u64>,
    unknown_syscalls: std::collections::BTreeMap<String, u64>,
    refused_syscalls: std::collections::BTreeMap<String, u64>,
    stack_faults: u64,
    frames_tracked: u64,
    frames_untracked: u64,
    invalidations: u64,
    peak_frames: u64,
    guest_ms: f64,
    syscall_ms: f64,
    run_ms: f64,
    load_ms: f64,
}

fn ms(d: Duration) -> f64 {
    let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    micros as f64 / 1000.0
}

fn named(m: &std::collections::BTreeMap<u64, u64>) -> std::collections::BTreeMap<String, u64> {
    m.iter()
        .map(|(&n, &c)| {
            let name = syscall_name(n).map_or_else(|| format!("({n})"), |s| format!("{s} ({n})"));
            (name, c)
        })
        .collect()
}

impl ProcessLine {
    fn new(o: &ProcessOutcome) -> ProcessLine {
        let s = &o.stats;
        ProcessLine {
            kind: "process",
            status: o.end.status(),
            syscalls: s.syscalls.total(),
            by_name: s
                .syscalls
                .by_number
                .iter()
                .map(|(&n, &c)| {
                    (
                        syscall_name(n).map_or_else(|| format!("({n})"), str::to_owned),
                        c,
                    )
                })
                .collect(),
            unknown_syscalls: named(&s.syscalls.unknown),
            refused_syscalls: named(&s.syscalls.refused),
            stack_faults: s.stack_faults,
            frames_tracked: s.tracking.frames_tracked,
            frames_untracked: s.tracking.frames_untracked,
            invalidations: s.tracking.invalidations,
            peak_frames: s.peak_frames,
            guest_ms: ms(s.guest_time),
            syscall_ms: ms(s.syscall_time),
            run_ms: ms(s.run_time),
            load_ms: ms(s.load_time),
        }
    }
}

fn write_summary(out: &mut dyn Write, o: &ProcessOutcome, events: u64) -> std::io::Result<()> {
    let s = &o.stats;
    writeln!(
        out,
        "pagetrack: the program {} (status {})",
        o.end,
        o.end.status()
    )?;
    writeln!(
        out,
        "pagetrack: {} system calls in {:.1} ms: guest {:.1} ms, system calls {:.1} ms (load {:.1} ms)",
        s.syscalls.total(),
        ms(s.run_time),
        ms(s.guest_time),
        ms(s.syscall_time),
        ms(s.load_time)
    )?;
    for (what, m) in [
        ("unknown (-ENOSYS)", &s.syscalls.unknown),
        ("refused", &s.syscalls.refused),
    ] {
        if !m.is_empty() {
            let list: Vec<String> = named(m)
                .into_iter()
                .map(|(k, v)| format!("{k} x{v}"))
                .collect();
            writeln!(out, "pagetrack: {what}: {}", list.join(", "))?;
        }
    }
    writeln!(
        out,
        "pagetrack: {events} write events; {} frames tracked, {} untracked, {} translation invalidations, \
         {} stack growth faults, {} guest frames at most",
        s.tracking.frames_tracked,
        s.tracking.frames_untracked,
        s.tracking.invalidations,
        s.stack_faults,
        s.peak_frames
    )
}

/// Runs `pagetrack exec`.
///
/// # Errors
/// [`UsageError`]s for bad input (options, a missing or unusable program); run failures
/// (timeout, a guest pagetrack cannot continue, host failures).
pub fn run(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let mut command = args.command.into_iter();
    let program = command
        .next()
        .ok_or_else(|| UsageError("no PROGRAM given (pagetrack exec -- PROGRAM ARGS...)".into()))?;
    let argv0 = utf8(program.clone(), "PROGRAM")?;
    let program = find_program(Path::new(&program));
    let rest = command
        .map(|a| utf8(a, "argument"))
        .collect::<Result<Vec<_>, _>>()?;
    let env: Vec<String> = if args.clear_env {
        Vec::new()
    } else {
        std::env::vars_os()
            .filter_map(|(k, v)| {
                Some(format!(
                    "{}={}",
                    k.into_string().ok()?,
                    v.into_string().ok()?
                ))
            })
            .collect()
    };
    let relaxed = args.relaxed.resolve(args.exact);
    let mut config = ProcessConfig::new(&program)
        .argv0(argv0)
        .args(rest)
        .env(env)
        .mem(args.mem)
        .track(args.tracks.iter().copied())
        .stdin(Input::Inherit)
        .stdout(Output::Inherit)
        .stderr(Output::Inherit)
        .timeout(args.timeout)
        .relaxed(relaxed.config(&args.policy))
        .dirty_ring(args.policy.dirty_ring());
    if let Some(d) = &args.dir {
        config = config.dir(d);
    }
    for d in &args.allow_write {
        config = config.allow_write(d);
    }

    let process = Process::new(config).map_err(|e| match e {
        pagetrack_vmm::Error::InvalidGuestImage { .. }
        | pagetrack_vmm::Error::InvalidConfig { .. }
        | pagetrack_vmm::Error::ProgramRefused { .. }
        | pagetrack_vmm::Error::ImageTooLarge { .. }
        | pagetrack_vmm::Error::ProcUnderRoot { .. }
        | pagetrack_vmm::Error::SandboxDir { .. }
        | pagetrack_vmm::Error::Backend(
            pagetrack_kvm::Error::DirtyRingSize { .. }
            | pagetrack_kvm::Error::DirtyRingUnsupported { .. },
        ) => anyhow::Error::new(UsageError::from_chain(&e)),
        other => anyhow::Error::new(other).context("cannot start the program"),
    })?;
    let target = args.events.clone().map(Target::File);
    let sink = EventSink::new(target.as_ref())?;
    let handle = process
        .vm()
        .tracker()
        .register(Arc::clone(&sink) as _, relaxed.register_options())
        .context("cannot register the event notifier")?;
    let base = process.vm().stats();
    let vm = process.vm().clone();
    let outcome = process.run().context("the program's VM failed")?;
    // The end of the run: relaxed frames' last changes (a run that ended in a system call
    // synced already; this covers a signal or timeout).
    vm.sync().context("cannot sync the relaxed frames")?;
    // Returns after every in-flight callback finished: no event can follow.
    drop(handle);

    let s = &outcome.stats;
    let totals = sink.totals();
    let (reason, detail) = match &outcome.end {
        ProcessEnd::Exited(_) => ("exit", outcome.end.to_string()),
        ProcessEnd::Signaled { detail, .. } => ("signal", detail.clone()),
        ProcessEnd::Timeout(_) => ("timeout", outcome.end.to_string()),
        _ => ("error", outcome.end.to_string()),
    };
    let slot_changes =
        s.vm.fragments
            .slot_changes
            .saturating_sub(base.fragments.slot_changes);
    let mut summary = SummaryLine::new(
        totals.writes,
        totals.bytes,
        s.exits + s.vm.trapped_writes,
        slot_changes,
        s.run_time,
    );
    if relaxed != RelaxedArg::Off {
        let r = vm.stats().relaxed;
        summary = summary.with_relaxed(r.frames_relaxed, totals.coalesced_writes);
    }
    let harvester = vm.dirty_harvester();
    if matches!(harvester, pagetrack_kvm::DirtyHarvester::Ring { .. }) {
        summary = summary.with_harvester(harvester);
    }
    sink.finish(
        ExitLine::new(reason, Some(outcome.end.status()), detail),
        summary,
    )?;
    if let Some(path) = &args.events {
        let mut f = OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("cannot write events to {}", path.display()))?;
        let mut line = serde_json::to_vec(&ProcessLine::new(&outcome))?;
        line.push(b'\n');
        f.write_all(&line)
            .with_context(|| format!("cannot write events to {}", path.display()))?;
    }
    let mut err = std::io::stderr().lock();
    if args.summary {
        write_summary(&mut err, &outcome, totals.writes)
            .context("cannot write to standard error")?;
        if relaxed != RelaxedArg::Off {
            let stats = vm.stats();
            let r = stats.relaxed;
            writeln!(
                err,
                "pagetrack: relaxed ({relaxed:?}): {} frames ran relaxed, {} coalesced write events, \
                 {} syncs in {:.1} ms, {} promotions, {} demotions ({} cold), \
                 {} rep stores promoted; {} re-cuts ({} memslot changes in {:.1} ms), \
                 {} pauses in {:.1} ms; {} frames made hot ({} cooled); {} harvest",
                r.frames_relaxed,
                totals.coalesced_writes,
                r.syncs,
                r.sync_ns as f64 / 1e6,
                r.promotions,
                r.demotions,
                r.cold_demotions,
                r.rep_promotions,
                stats.fragments.relayouts,
                stats.fragments.slot_changes,
                stats.fragments.slot_change_ns as f64 / 1e6,
                stats.pauses,
                stats.pause_ns as f64 / 1e6,
                r.hot_promotions,
                r.hot_cooled,
                vm.dirty_harvester()
            )
            .context("cannot write to standard error")?;
        }
    }
    match &outcome.end {
        ProcessEnd::Exited(code) => Ok(ExitCode::from(*code)),
        ProcessEnd::Signaled { detail, .. } => {
            // A shell would say "Segmentation fault"; say what happened, with the report.
            writeln!(err, "pagetrack: {detail}").context("cannot write to standard error")?;
            Ok(ExitCode::from(outcome.end.status()))
        }
        ProcessEnd::Timeout(_) => {
            // As timeout(1): status 124, whether the program computed or waited.
            writeln!(err, "pagetrack: the program {} (timeout)", outcome.end)
                .context("cannot write to standard error")?;
            Ok(ExitCode::from(outcome.end.status()))
        }
        other => Err(anyhow::anyhow!("the program did not finish: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        exec: ExecArgs,
    }

    #[test]
    fn exec_args_take_everything_after_the_program() {
        let c = Cli::try_parse_from([
            "pagetrack",
            "--track",
            "stack",
            "--track",
            "0x1000-0x2000",
            "--",
            "busybox",
            "wc",
            "-l",
        ])
        .unwrap();
        assert_eq!(
            c.exec.tracks,
            vec![
                Region::Stack,
                Region::Range {
                    start: 0x1000,
                    end: 0x2000
                }
            ]
        );
        assert_eq!(c.exec.command, vec!["busybox", "wc", "-l"]);
    }

    #[test]
    fn exec_events_to_stdout_is_refused() {
        assert!(Cli::try_parse_from(["pagetrack", "--events", "-", "--", "x"]).is_err());
        assert!(Cli::try_parse_from(["pagetrack", "--track", "bogus", "--", "x"]).is_err());
    }

    #[test]
    fn find_program_keeps_paths_and_searches_bare_names() {
        assert_eq!(find_program(Path::new("./x")), PathBuf::from("./x"));
        assert_eq!(find_program(Path::new("/bin/sh")), PathBuf::from("/bin/sh"));
        assert!(find_program(Path::new("sh")).is_absolute());
    }
}
