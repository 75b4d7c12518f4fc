//! `pagetrack run IMAGE`: run a flat guest image with tracked ranges.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use pagetrack_vmm::{FlatConfig, Mode};

use crate::UsageError;
use crate::events::Target;
use crate::live;
use crate::range::{
    TrackRange, format_size, parse_positive, parse_range, parse_secs, parse_size, parse_u64,
};
use crate::relaxed::RelaxedArg;
use crate::session::{Plan, Report, Session};

/// The long help: the guest's environment, the memory layout and the event stream.
const RUN_HELP: &str = "\
Guest environment (long mode, the default):
  64-bit mode at CPL3, entered at --load with RSP at the vCPU's stack top, RFLAGS = 0x3002
  (IOPL 3, interrupts off), other registers 0. Guest-physical memory is identity-mapped
  (virtual = physical) with 2 MiB pages over the first min(RAM, 4 GiB), every page
  user-writable. Port I/O is allowed at CPL3. x87/SSE/AVX (and AVX-512 where the host
  has it) are enabled. Every vCPU starts at the entry, on its own stack.
  End the run with `out 0xf4, al`: AL is the guest's exit code (like QEMU's
  isa-debug-exit). Any exception ends the run with an error naming the vector, RIP and
  error code. HLT at CPL3 is an exception (#GP); use port 0xf4. Other `out` ports are
  ignored, `in` reads 0xff; port 0xf5 is taken by the exception stubs.

Long-mode memory layout (T = min(--mem, 4G), R = T - 0x20000, N = --vcpus):
  [0, R - N*0x10000)        free: the image and its data (it must end below the stacks)
  [R - N*0x10000, R)        CPL3 stacks, 64 KiB each: vCPU n starts with RSP = R - n*0x10000
  R + 0x0000                PML4 (CR3)
  R + 0x1000                PDPT
  R + 0x2000                4 page directories of 2 MiB pages
  R + 0x6000                GDT: 0x08 CPL0 code, 0x10 CPL0 data, 0x1b CPL3 data,
                            0x23 CPL3 code, vCPU n's TSS at 0x28 + 16n
  R + 0x7000                IDT: vectors 0-31, interrupt gates to CPL0 stubs at R + 0x7800
  R + 0x8000                TSSs, 0x80 bytes per vCPU
  R + 0xa000                I/O permission bitmap: every port allowed
  R + 0x10000 .. T          CPL0 exception stacks, 1 KiB per vCPU
  With the default --mem 64M: R = 0x3fe0000, vCPU 0's RSP = 0x3fe0000 (its stack is
  [0x3fd0000, 0x3fe0000)), the tables fill [0x3fe0000, 0x4000000).

Real mode (--mode real):
  16-bit real mode at CPL0: CS = DS = ES = SS = 0, IP = --load (below 0x10000), SP = 0.
  The image must end below 1 MiB. End the run with HLT or `out 0xf4, al`. On software KVM
  (PVM) real-mode code is emulated by KVM, about 2 us an instruction.

Tracking:
  --track ADDR | ADDR+LEN | ADDR-END (END exclusive; decimal or 0x hex), repeatable: every
  4 KiB frame the range touches is tracked from before the first instruction. Each guest
  store to a tracked frame exits to pagetrack (at most 8 bytes per exit: a 16-byte store is
  two events, `rep stos` one per element, a store straddling into a tracked frame reports
  only its tracked part). Stores to other frames run at full speed and are not reported.

Events (--events FILE, or - for standard output), JSON Lines in delivery order:
  {\"type\":\"write\",\"seq\":1,\"source\":\"vcpu\",\"vcpu\":0,\"gpa\":\"0x5000\",\"len\":1,\"old\":\"00\",\"new\":\"11\"}
  {\"type\":\"write\",\"seq\":2,\"source\":\"device\",\"vcpu\":null,\"gpa\":\"0x5008\",\"len\":2,\"old\":\"0000\",\"new\":\"abcd\"}
    seq counts from 1; source is \"vcpu\" or \"device\" (then \"vcpu\" is null); gpa is
    lowercase 0x hex; old and new are lowercase hex bytes in memory order (old is null if
    unknown, never with this backend). An event never spans two frames.
  {\"type\":\"exit\",\"reason\":\"debug-exit\",\"code\":0,\"detail\":\"...\"}
    reason: debug-exit (port 0xf4), hlt, error (exception, emulation failure, exit limit),
    timeout; code is the byte written to port 0xf4, else null.
  {\"type\":\"summary\",\"tracked_writes\":1,\"tracked_bytes\":1,\"exits\":2,\"slot_changes\":2,\"elapsed_ms\":0.61}
    tracked_writes/tracked_bytes: the write lines and their bytes; exits: vCPU exits to
    userspace (trapped stores included); slot_changes: KVM memslot changes made to start
    tracking; elapsed_ms: wall time of the guest run.
  Relaxed frames (--relaxed auto|always): the frame is writable and dirty-logged; at each
  sync point (every exit to the VMM: `out`, the end of the run; and every 10 ms) its
  changes since the last sync are diffed against a shadow copy and delivered as coalesced
  events: {...,\"source\":\"guest\",\"vcpu\":null,...,\"coalesced\":true,\"epoch\":N}, one per run of
  changed 8-byte words (old = the value at the previous sync, new = now; intermediate
  values and the writer are lost). The summary then ends with \"relaxed_frames\" and
  \"coalesced_writes\". With --relaxed off (the default) nothing changes.
  With --events -, standard output carries only the stream. Otherwise standard output shows
  the live view (a progress line on a terminal), a table per tracked frame and a summary.

Exit status:
  0  the guest ended by port 0xf4 or HLT (its code is in the output, not the status)
  1  run failure: exception, emulation failure, timeout, exit limit, KVM failure
  2  usage error: bad option or value, unusable image, range outside RAM";

/// The CPU mode a flat image starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// 64-bit long mode at CPL3 (see the layout below).
    Long,
    /// 16-bit real mode at CPL0, CS = 0.
    Real,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Long => Mode::Long,
            ModeArg::Real => Mode::Real,
        }
    }
}

/// `pagetrack run` options.
#[derive(Debug, clap::Args)]
#[command(after_long_help = RUN_HELP)]
pub struct Args {
    /// Flat guest image: raw machine code and data, loaded as is at --load.
    #[arg(value_name = "IMAGE")]
    image: PathBuf,
    /// Load and entry address (decimal or 0x hex).
    #[arg(long, value_name = "ADDR", default_value = "0x1000", value_parser = parse_u64, allow_negative_numbers = true)]
    load: u64,
    /// CPU mode at entry.
    #[arg(long, value_enum, default_value_t = ModeArg::Long)]
    mode: ModeArg,
    /// Guest RAM at guest-physical 0, with an optional K, M or G suffix.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size, allow_negative_numbers = true)]
    mem: u64,
    /// Number of vCPUs, all entering at --load (1 to 64).
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_vcpus, allow_negative_numbers = true)]
    vcpus: u32,
    /// Track every 4 KiB frame of ADDR, ADDR+LEN or ADDR-END (END exclusive); repeatable.
    #[arg(long = "track", value_name = "RANGE", value_parser = parse_range)]
    tracks: Vec<TrackRange>,
    /// End the run with an error (reason "timeout") after SECS seconds (fractions allowed).
    #[arg(long, value_name = "SECS", value_parser = parse_secs, allow_negative_numbers = true)]
    timeout: Option<Duration>,
    /// End the run with an error after N exits to the VMM (trapped stores included).
    #[arg(long, value_name = "N", value_parser = parse_positive, allow_negative_numbers = true)]
    max_exits: Option<u64>,
    /// Write every event as JSON Lines to FILE, or to standard output with "-".
    #[arg(long, value_name = "FILE|-", value_parser = Target::parse)]
    events: Option<Target>,
    /// Relaxed mode of tracked frames: off (one exact event per store), auto (hot frames
    /// run relaxed: coalesced events at sync points), always.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = RelaxedArg::Off)]
    relaxed: RelaxedArg,
    /// Exact events only: short for --relaxed off.
    #[arg(long, conflicts_with = "relaxed")]
    exact: bool,
    #[command(flatten)]
    policy: crate::relaxed::PolicyArgs,
}

fn parse_vcpus(s: &str) -> Result<u32, String> {
    let n = parse_positive(s)?;
    u32::try_from(n)
        .ok()
        .filter(|&n| n <= pagetrack_vmm::x86::MAX_VCPUS)
        .ok_or_else(|| format!("{n} vCPUs: at most {}", pagetrack_vmm::x86::MAX_VCPUS))
}

/// Reads the image, but at most `mem + 1` bytes (enough to tell that it is larger than RAM
/// without reading a device or a huge file to its end).
fn read_image(path: &Path, mem: u64) -> Result<Vec<u8>, UsageError> {
    let what = |e: std::io::Error| UsageError(format!("cannot read image {}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(what)?;
    let mut image = Vec::new();
    file.take(mem.saturating_add(1))
        .read_to_end(&mut image)
        .map_err(what)?;
    if image.len() as u64 > mem {
        return Err(UsageError(format!(
            "image {} is larger than RAM (--mem {} = {mem:#x} bytes)",
            path.display(),
            format_size(mem)
        )));
    }
    Ok(image)
}

/// Runs `pagetrack run`.
///
/// # Errors
/// [`UsageError`]s for bad input; run failures (the guest's or the host's).
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let image = read_image(&args.image, args.mem)?;
    let json_to_stdout = args.events == Some(Target::Stdout);
    let plan = Plan {
        config: FlatConfig::new()
            .mem(args.mem)
            .load(args.load)
            .mode(args.mode.into())
            .vcpus(args.vcpus)
            .timeout(args.timeout)
            .max_exits(args.max_exits),
        image,
        image_name: args.image.display().to_string(),
        tracks: args.tracks,
        events: args.events,
        relaxed: args.relaxed.resolve(args.exact),
        policy: args.policy,
    };
    let session = Session::start(plan)?;
    let progress = !json_to_stdout && std::io::stdout().is_terminal();
    let report = session.run(progress).close()?;
    if !json_to_stdout {
        let mut out = std::io::stdout().lock();
        print_report(&mut out, &report).context("cannot write to standard output")?;
    }
    finish(&report)
}

fn print_report(out: &mut dyn Write, report: &Report) -> std::io::Result<()> {
    live::write_frames(out, report)?;
    writeln!(out)?;
    live::write_summary(out, report)?;
    out.flush()
}

/// Status 0 when the guest ended itself, else the run failure as an error (status 1).
///
/// # Errors
/// The guest did not end by port 0xf4 or HLT.
pub fn finish(report: &Report) -> anyhow::Result<ExitCode> {
    let o = &report.outcome;
    if o.reason.is_guest_exit() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(anyhow::anyhow!("the guest run failed: {}", o.detail))
    }
}
