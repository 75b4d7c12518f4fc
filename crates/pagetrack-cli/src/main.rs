//! `pagetrack`: run a guest on KVM and watch its writes.
//!
//! - `pagetrack demo`: a built-in guest that shows exact write tracking and what it costs.
//! - `pagetrack run IMAGE`: run a flat image (long or real mode), track ranges, stream every
//!   write to a tracked frame as JSON Lines (`--events`), or watch a live view.
//! - `pagetrack exec -- PROGRAM ARGS...`: an unmodified static Linux program as the guest.
//! - `pagetrack caps`: what this host's KVM offers that pagetrack uses.
//! - `pagetrack bench`: the backend's costs on this host, measured in about a minute.
//!
//! Exit status: 0 success (the guest ended by port 0xf4 or HLT), 1 run failure, 2 usage error.
//! Every subcommand is one file in `cmd/` and one variant of [`Command`]. The kernel names of
//! what it drives are in [`pagetrack::kernel_names`]; the library side is
//! [`pagetrack_vmm`]'s walk-through.
//!
//! # Walk-through
//!
//! A binary's doc is not a doc-test (rustdoc runs doc-tests of libraries only): the steps
//! are shell sessions, their output captured on a PVM host. The integration tests
//! (`tests/cli.rs`) run these commands' kinds (tracked `run`s, usage errors, `exec`) and
//! check the same JSON line formats, exit lines and statuses.
//!
//! 1. **Ask what the host offers.** `caps` needs `/dev/kvm`; `--json` gives one object
//!    (`module`, `api_version`, `virtualization`, `paging`, `readonly_memslots`, `memslots`,
//!    `memslot_budget`, ...).
//!
//! ```sh
//! pagetrack caps
//! pagetrack caps --json
//! ```
//!
//! 2. **See tracking on the built-in guest.** `demo` runs a guest that stores to tracked and
//!    untracked frames and reports what was seen and what it cost; `--events FILE|-` also
//!    writes the JSON Lines below (with `-`, the human report goes to standard error).
//!
//! ```sh
//! pagetrack demo --events -
//! ```
//!
//! 3. **Run a flat image with a tracked range.** The image is loaded at `--load` (default
//!    `0x1000`) and entered in `--mode long` (CPL3, default) or `real`; `--mem SIZE`,
//!    `--vcpus N`, `--timeout SECS`, `--max-exits N` bound it. `--track` takes `ADDR`,
//!    `ADDR+LEN` or `ADDR-END` (END exclusive, decimal or 0x-hex) and is repeatable; every
//!    4 KiB frame it touches is tracked. The guest ends with `out 0xf4, al`.
//!
//! ```sh
//! # mov byte [0x200008], 7; mov al, 0; out 0xf4, al
//! printf '\xc6\x04\x25\x08\x00\x20\x00\x07\xb0\x00\xe6\xf4' > store.bin
//! pagetrack run store.bin --mem 16M --track 0x200000+4096 --events -
//! ```
//!
//! prints (the JSON Lines contract, README "The `pagetrack` command"):
//!
//! ```text
//! {"type":"write","seq":1,"source":"vcpu","vcpu":0,"gpa":"0x200008","len":1,"old":"00","new":"07"}
//! {"type":"exit","reason":"debug-exit","code":0,"detail":"vcpu 0 wrote 0 to port 0xf4"}
//! {"type":"summary","tracked_writes":1,"tracked_bytes":1,"exits":2,"slot_changes":3,"elapsed_ms":0.361}
//! ```
//!
//! One `write` line per delivered event in delivery order (`seq` from 1), then one `exit`
//! line (`reason`: `debug-exit`, `hlt`, `error` or `timeout`) and one `summary` line. `source`
//! is `vcpu` (with its index) or `device` (`vcpu` is `null`); hex is lowercase, bytes in
//! memory order; an event never spans two frames. Status 0: the guest ended itself (its code
//! is reported, not returned).
//!
//! 4. **Get a usage error, not a wrong run.** A range outside RAM, a bad value or an unusable
//!    image is refused before the guest starts, with status 2:
//!
//! ```sh
//! pagetrack run store.bin --track 0x99999999999   # error: ... is outside RAM ...; status 2
//! ```
//!
//! 5. **Run an unmodified static Linux program.** `exec` runs it at CPL3 and serves its
//!    system calls. `--track` takes `stack`, `heap`, `data`, `text`, `mmap`, `page-tables`,
//!    `writable` or a virtual range `ADDR-END`/`ADDR+LEN` (repeatable; regions follow the
//!    program as it maps and unmaps). `--events FILE` (a file: standard output is the
//!    program's), `--dir DIR` (what it may read), `--allow-write DIR`, `--mem SIZE`,
//!    `--timeout SECS` (status 124 after it), `--clear-env`, `--summary` (counts on standard
//!    error). The status is the program's own (128 + signal after a fault).
//!
//! ```sh
//! pagetrack exec --track heap --track stack --events ev.jsonl -- /bin/busybox sha256sum README.md
//! pagetrack exec --summary -- /bin/busybox true
//! ```
//!
//! `ev.jsonl` holds `write` lines as in step 3 (`gpa` is guest-physical), then
//! `{"type":"exit","reason":"exit","code":0,"detail":"exited with status 0"}` (`reason`:
//! `exit`, `signal`, `timeout` or `error`), the `summary` line and a `process` line (system
//! calls by name, unknown and refused ones, frames tracked and untracked, invalidations,
//! time split).
//!
//! 6. **Measure the backend.** `bench` measures a trapped store against a bare exit,
//!    track/untrack latency, refault cost and a 1,000-frame batch; `--ram SIZE` (default 1G)
//!    sizes the large guest, `--exits N` and `--reps N` the measurements, `--json` prints
//!    JSON. The figures of record are in `docs/PERFORMANCE.md`.
//!
//! ```sh
//! pagetrack bench --ram 64M --reps 5 --json
//! ```
#![forbid(unsafe_code)]

mod bench;
mod cmd;
mod events;
mod live;
mod range;
mod relaxed;
mod session;

use std::fmt;
use std::io::Write;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};

/// Exit status of a run failure: a guest fault, emulation failure, timeout, exit limit, or a
/// host failure (no KVM, an ioctl error, an unwritable event stream).
const FAILURE: u8 = 1;
/// Exit status of a usage error: bad options or values, an unusable image.
const USAGE: u8 = 2;

const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  success (for run: the guest ended by writing its code to port 0xf4, or by HLT;
     the guest's code is reported, not used as the status)
  1  run failure: guest exception, emulation failure, timeout, exit limit, KVM failure
  2  usage error: bad option or value, unusable image, range outside RAM
For exec, the status is the program's own (128 + signal after a fault; see exec --help).";

/// Exact guest write tracking on KVM: run a guest and watch every write to the frames you
/// track.
#[derive(Debug, Parser)]
#[command(
    name = "pagetrack",
    version,
    arg_required_else_help = true,
    after_help = EXIT_STATUS_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The subcommands; each lives in `cmd/<name>.rs` with its `Args` and `run`.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a built-in guest that writes to a tracked table and to untracked memory, then
    /// explain what was tracked and what it cost.
    Demo(cmd::demo::Args),
    /// Run a flat guest image and report every write to the tracked ranges.
    Run(cmd::run::Args),
    /// Run an unmodified static x86-64 Linux program in a process VM, tracking its memory.
    Exec(cmd::exec::ExecArgs),
    /// Show what this host's KVM offers that pagetrack uses.
    Caps(cmd::caps::Args),
    /// Measure the backend on this host: trapped-write round trip against a bare exit,
    /// untracked-store overhead, track/untrack latency, refault cost after a track.
    Bench(cmd::bench::Args),
}

/// An error in what the user asked for (exit status 2); everything else is a run failure.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

impl UsageError {
    /// A library error the user caused, with its whole source chain in one line (as
    /// `error: {:#}` prints a chain): the library keeps causes as sources, not in its
    /// messages.
    pub fn from_chain(e: &dyn std::error::Error) -> UsageError {
        let mut text = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            text.push_str(": ");
            text.push_str(&c.to_string());
            cause = c.source();
        }
        UsageError(text)
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(&e),
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let status = if e.chain().any(|c| c.is::<UsageError>()) {
                USAGE
            } else {
                FAILURE
            };
            // Nothing is left to report a failed write to stderr to.
            let _ignored = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::from(status)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo(args) => cmd::demo::run(args),
        Command::Run(args) => cmd::run::run(args),
        Command::Exec(args) => cmd::exec::run(args),
        Command::Caps(args) => cmd::caps::run(&args),
        Command::Bench(args) => cmd::bench::run(args),
    }
}

/// Prints a clap error: help and version as clap does (status 0), a missing subcommand as the
/// help on stderr (status 2), anything else as one line on stderr (status 2).
fn clap_error(e: &clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // A closed stdout leaves nothing to report to.
            let _ignored = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ignored = e.print();
            ExitCode::from(USAGE)
        }
        _ => {
            let line = one_line(&e.render().to_string());
            let _ignored = writeln!(std::io::stderr(), "{line}");
            ExitCode::from(USAGE)
        }
    }
}

/// Folds clap's multi-line message into one line: its paragraphs joined, without the usage
/// and "for more information" paragraphs, plus a pointer to `--help`.
fn one_line(rendered: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    for paragraph in rendered.split("\n\n") {
        let p = paragraph.trim();
        if p.is_empty() || p.starts_with("Usage:") || p.starts_with("For more information") {
            continue;
        }
        let joined: Vec<&str> = p.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        parts.push(joined.join(" "));
    }
    let mut line = parts.join("; ");
    if line.is_empty() {
        line = "error: invalid command line".into();
    }
    line.push_str(" (see --help)");
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn one_line_drops_usage_and_joins_paragraphs() {
        let text = "error: the following required arguments were not provided:\n  <IMAGE>\n\n\
                    Usage: pagetrack run <IMAGE>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            one_line(text),
            "error: the following required arguments were not provided: <IMAGE> (see --help)"
        );
    }
}
