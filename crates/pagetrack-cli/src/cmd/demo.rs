//! `pagetrack demo`: a built-in long-mode guest, assembled with iced-x86 at run time, that
//! writes to a tracked table and to untracked memory; then a device write into the table; then
//! a plain-words account of what was tracked and what it cost. Then the same guest again with
//! the table relaxed (`--relaxed always`): coalesced events, checked by replaying them over
//! the table's initial contents, and the two run times.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use iced_x86::code_asm::{
    CodeAssembler, al, eax, ecx, qword_ptr, r8, rax, rcx, rdi, rsi, xmm0, xmmword_ptr,
};
use pagetrack::PAGE_SIZE;
use pagetrack_vmm::FlatConfig;
use pagetrack_vmm::x86::GUEST_EXIT_PORT;
use vm_memory::Bytes;

use crate::events::Target;
use crate::live::{self, nanos, per_event_ns, thousands};
use crate::range::TrackRange;
use crate::session::{Plan, Report, Session};

/// `pagetrack demo` options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Also write every event as JSON Lines to FILE, or to standard output with "-" (the
    /// human report then goes to standard error).
    #[arg(long, value_name = "FILE|-", value_parser = Target::parse)]
    events: Option<Target>,
}

/// Where the program is loaded and entered.
const LOAD: u64 = 0x1000;
/// Guest RAM.
const MEM: u64 = 64 << 20;
/// The tracked table: [`TABLE_FRAMES`] frames from here.
const TABLE: u64 = 0x20_0000;
const TABLE_FRAMES: u64 = 4;
const TABLE_END: u64 = TABLE + TABLE_FRAMES * PAGE_SIZE;
/// Qword slots of the table (a power of two: the record number is masked with it).
const TABLE_QWORDS: u64 = TABLE_FRAMES * PAGE_SIZE / 8;
/// Untracked scratch memory the record loop writes to, 64 bytes per record.
const SCRATCH: u64 = 0x40_0000;
/// Untracked memory the large `rep stosq` fills.
const BULK: u64 = 0x80_0000;
/// Records the guest logs: one tracked qword and eight untracked qwords each.
const RECORDS: u64 = 32_768;
/// Untracked stores per record.
const SCRATCH_STORES: u64 = 8;
/// Elements of the `rep stosq` into the table's second frame.
const TABLE_STOS: u64 = 64;
/// Elements of the `rep stosq` over untracked memory (8 MiB).
const BULK_STOS: u64 = 1 << 20;
/// The straddling store: 8 bytes from 4 bytes below the table's end.
const STRADDLE: u64 = TABLE_END - 4;
/// The 16-byte vector store, into the table's third frame.
const VECTOR: u64 = TABLE + 2 * PAGE_SIZE;
/// The device write: 32 bytes across the boundary of the table's third and fourth frames.
const DEVICE: u64 = TABLE + 3 * PAGE_SIZE - 16;
const DEVICE_LEN: usize = 32;
/// A safety net: the demo takes well under a second on KVM.
const TIMEOUT: Duration = Duration::from_secs(30);

// The areas do not overlap each other, the stack (64 KiB below the 128 KiB of tables at the
// top of RAM) or the tables; the record number can be masked to a table slot.
const _: () = {
    assert!(TABLE_END <= SCRATCH);
    assert!(SCRATCH + RECORDS * SCRATCH_STORES * 8 <= BULK);
    assert!(BULK + BULK_STOS * 8 <= MEM - 0x3_0000);
    assert!(TABLE_QWORDS.is_power_of_two());
};

/// Guest write events the program produces, from its structure: one per record, one per
/// table `rep stosq` element, the tracked half of the straddling store, two for the 16-byte
/// store (KVM hands pagetrack at most 8 bytes per exit).
const EXPECTED_GUEST_EVENTS: u64 = RECORDS + TABLE_STOS + 1 + 2;
/// Device write events: the 32-byte write is split at the frame boundary.
const EXPECTED_DEVICE_EVENTS: u64 = 2;
/// Untracked stores the program makes (the straddling store's untracked half aside).
const UNTRACKED_STORES: u64 = RECORDS * SCRATCH_STORES + BULK_STOS;

/// Assembles the demo guest (64-bit, CPL3, entered at [`LOAD`]).
fn program() -> Result<Vec<u8>, iced_x86::IcedError> {
    let mut a = CodeAssembler::new(64)?;
    // Part 1: log RECORDS records. Record i goes to table slot i % TABLE_QWORDS (tracked);
    // each record also writes 64 bytes of scratch (untracked).
    a.mov(rdi, TABLE)?; // rdi = the table
    a.mov(rsi, SCRATCH)?; // rsi = scratch cursor
    a.xor(eax, eax)?; // rax = record number
    a.mov(ecx, u32::try_from(RECORDS).unwrap_or(u32::MAX))?; // ecx = records left
    let mut record = a.create_label();
    a.set_label(&mut record)?;
    a.mov(r8, rax)?;
    a.and(r8, i32::try_from(TABLE_QWORDS - 1).unwrap_or(0))?; // r8 = slot
    a.mov(qword_ptr(rdi + r8 * 8), rax)?; // tracked: one trapped 8-byte store
    for i in 0..SCRATCH_STORES {
        let off = i32::try_from(i * 8).unwrap_or(0);
        a.mov(qword_ptr(rsi + off), rax)?; // untracked scratch store
    }
    a.add(rsi, 64)?; // next scratch block
    a.inc(rax)?; // next record number
    a.dec(ecx)?;
    a.jnz(record)?; // loop over the records

    // Part 2: a string store into the table's second frame: one event per element.
    a.cld()?; // forward direction
    a.mov(rdi, TABLE + PAGE_SIZE)?; // rdi = second frame
    a.mov(ecx, u32::try_from(TABLE_STOS).unwrap_or(0))?; // rcx = element count
    a.mov(rax, 0x5354_4f53_5354_4f53_u64)?; // "SOTSSOTS" pattern
    a.rep().stosq()?; // trapped, element by element

    // Part 3: the same string store over 8 MiB of untracked memory: native speed.
    a.mov(rdi, BULK)?; // rdi = untracked bulk area
    a.mov(rcx, BULK_STOS)?; // rcx = 1 Mi elements
    a.rep().stosq()?; // never leaves the guest

    // Part 4: an 8-byte store straddling the table's end: 4 bytes tracked, 4 untracked.
    a.mov(rax, 0x8877_6655_4433_2211_u64)?; // bytes 11..88 in memory order
    a.mov(rdi, STRADDLE)?; // rdi = 4 bytes below the table's end
    a.mov(qword_ptr(rdi), rax)?; // tracked part 11 22 33 44, untracked part 55 66 77 88

    // Part 5: a 16-byte SSE store into the table: two 8-byte exits.
    a.movq(xmm0, rax)?; // xmm0 low = pattern
    a.punpcklqdq(xmm0, xmm0)?; // xmm0 = pattern twice
    a.mov(rdi, VECTOR)?; // rdi = third frame
    a.movdqu(xmmword_ptr(rdi), xmm0)?; // the vector store

    // Done: exit code 0 on the guest-exit port.
    a.mov(al, 0)?;
    a.out(u32::from(GUEST_EXIT_PORT), al)?;
    a.assemble(LOAD)
}

/// Runs `pagetrack demo`.
///
/// # Errors
/// KVM failures, a failed guest run, an unwritable event stream.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let image = program().context("cannot assemble the demo guest")?;
    let json_to_stdout = args.events == Some(Target::Stdout);
    let plan = Plan {
        config: FlatConfig::new().mem(MEM).load(LOAD).timeout(Some(TIMEOUT)),
        image,
        image_name: "(demo)".into(),
        tracks: vec![TrackRange {
            start: TABLE,
            end: TABLE_END,
        }],
        events: args.events,
        relaxed: crate::relaxed::RelaxedArg::Off,
        policy: crate::relaxed::PolicyArgs::default(),
    };
    let mut out: Box<dyn Write> = if json_to_stdout {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    let progress = !json_to_stdout && std::io::stdout().is_terminal();
    writeln!(
        out,
        "pagetrack demo: a 64-bit guest at CPL3 logs {} records into a table of {TABLE_FRAMES} tracked\n\
         frames at {:#x} and works on untracked memory around it.\n",
        thousands(RECORDS),
        TABLE
    )?;
    let session = Session::start(plan)?;
    let (report, table) = run_and_write(session, progress)?;
    live::write_frames(&mut *out, &report)?;
    writeln!(out)?;
    live::write_summary(&mut *out, &report)?;
    if report.outcome.reason.is_guest_exit() {
        writeln!(out)?;
        explain(&mut *out, &report)?;
        writeln!(out)?;
        relaxed_rerun(&mut *out, &report, &table)?;
    }
    out.flush()?;
    crate::cmd::run::finish(&report)
}

/// Runs the session's guest, then (if it ended well) the device write into the table; returns
/// the report and the table's final contents.
fn run_and_write(session: Session, progress: bool) -> anyhow::Result<(Report, Vec<u8>)> {
    let finished = session.run(progress);
    let mut table = vec![0; usize::try_from(TABLE_END - TABLE).unwrap_or(0)];
    if finished.outcome().reason.is_guest_exit() {
        // A device model (DMA) writes into the table after the guest ended.
        let data: Vec<u8> = (0xa0..0xa0 + DEVICE_LEN)
            .map(|b| u8::try_from(b).unwrap_or(0))
            .collect();
        finished
            .vm()
            .memory()
            .write_slice(&data, vm_memory::GuestAddress(DEVICE))
            .context("device write into the table")?;
        finished
            .vm()
            .untracked_memory()
            .read_slice(&mut table, vm_memory::GuestAddress(TABLE))
            .context("cannot read the table")?;
    }
    Ok((finished.close()?, table))
}

/// A notifier that replays the table's events over its initial contents (checking each
/// event's old bytes), for the relaxed run.
struct Replay {
    table: std::sync::Mutex<(Vec<u8>, u64, bool)>,
}

impl pagetrack::TrackNotifier for Replay {
    fn track_write(&self, e: &pagetrack::WriteEvent<'_>) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let (mem, events, chained) = &mut *t;
        *events += 1;
        let Some(off) = e
            .gpa
            .0
            .checked_sub(TABLE)
            .and_then(|o| usize::try_from(o).ok())
            .filter(|o| o + e.new.len() <= mem.len())
        else {
            *chained = false;
            return;
        };
        let here = &mut mem[off..off + e.new.len()];
        if e.old.is_some_and(|old| old != here) {
            *chained = false;
        }
        here.copy_from_slice(e.new);
    }
}

/// The same guest with the table relaxed: its account, checked against the strict run's table.
fn relaxed_rerun(out: &mut dyn Write, strict: &Report, strict_table: &[u8]) -> anyhow::Result<()> {
    let plan = Plan {
        config: FlatConfig::new().mem(MEM).load(LOAD).timeout(Some(TIMEOUT)),
        image: program().context("cannot assemble the demo guest")?,
        image_name: "(demo)".into(),
        tracks: vec![TrackRange {
            start: TABLE,
            end: TABLE_END,
        }],
        events: None,
        relaxed: crate::relaxed::RelaxedArg::Always,
        policy: crate::relaxed::PolicyArgs::default(),
    };
    let session = Session::start(plan)?;
    let mut initial = vec![0; strict_table.len()];
    session
        .vm()
        .untracked_memory()
        .read_slice(&mut initial, vm_memory::GuestAddress(TABLE))
        .context("cannot read the table")?;
    let replay = std::sync::Arc::new(Replay {
        table: std::sync::Mutex::new((initial, 0, true)),
    });
    let _handle = session
        .vm()
        .tracker()
        .register(
            replay.clone(),
            crate::relaxed::RelaxedArg::Always.register_options(),
        )
        .context("cannot register the replay notifier")?;
    let (r, table) = run_and_write(session, false)?;
    let (replayed, events, chained) = {
        let t = replay.table.lock().unwrap_or_else(|p| p.into_inner());
        (t.0.clone(), t.1, t.2)
    };
    writeln!(
        out,
        "The same guest with the table relaxed (--relaxed always)"
    )?;
    if !r.outcome.reason.is_guest_exit() {
        live::paragraph(out, "The relaxed run did not end with the guest's exit:")?;
        live::write_summary(out, &r)?;
        anyhow::bail!("the demo's relaxed run failed");
    }
    let x = &r.stats.relaxed;
    let same = table == strict_table;
    let exact = replayed == table && chained;
    live::paragraph(
        out,
        &format!(
            "Relaxed, the table's frames stay writable inside the guest, with KVM logging which \
             pages the guest dirties; at each sync point (an exit, a {} ms timer, the end) \
             pagetrack diffs the dirty ones against a shadow copy and delivers the net change as \
             coalesced events. {} frames ran relaxed; {} delivered {} coalesced events for the \
             guest's stores, where the strict run had {} exact ones, and the device write still \
             gave its {} exact events.",
            pagetrack_kvm::RelaxedConfig::default().period.as_millis(),
            thousands(x.frames_relaxed),
            if x.syncs == 1 {
                "1 sync".to_owned()
            } else {
                format!("{} syncs", thousands(x.syncs))
            },
            thousands(r.totals.coalesced_writes),
            thousands(strict.totals.vcpu_writes),
            thousands(r.totals.device_writes)
        ),
    )?;
    live::paragraph(
        out,
        &format!(
            "Checked: the table ends {} the strict run's, and replaying all {} events over its \
             initial contents (each event's old bytes against the replay so far) {}. The guest \
             ran for {} against {} strict ({:.0}x faster): the cost of tracking went from one \
             exit per store to one diff per dirty page per sync.",
            if same { "equal to" } else { "DIFFERENT from" },
            thousands(events),
            if exact {
                "gives its final contents"
            } else {
                "does NOT give its final contents"
            },
            live::duration(r.outcome.elapsed),
            live::duration(strict.outcome.elapsed),
            strict.outcome.elapsed.as_secs_f64() / r.outcome.elapsed.as_secs_f64().max(1e-9)
        ),
    )?;
    if !(same && exact) {
        anyhow::bail!("the demo's relaxed run does not agree with its strict run");
    }
    Ok(())
}

/// The closing explanation: what was tracked, what was not, what it cost.
fn explain(out: &mut dyn Write, r: &Report) -> std::io::Result<()> {
    let t = &r.totals;
    let trapped = r.stats.trapped_writes;
    let row = |what: String, stores: u64, events: Option<u64>, note: &str| {
        let events = events.map(thousands).unwrap_or_default();
        format!(
            "    {what:<46} {:>9} {events:>7}  {note}",
            thousands(stores)
        )
        .trim_end()
        .to_owned()
    };
    writeln!(out, "What happened")?;
    live::paragraph(
        out,
        &format!(
            "Before the guest's first instruction, pagetrack tracked the {TABLE_FRAMES} frames of \
             its table, [{TABLE:#x}, {TABLE_END:#x}). The guest then ran for {}.",
            live::duration(r.outcome.elapsed)
        ),
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "  {:<48} {:>9} {:>7}",
        "Reported, with old and new bytes", "stores", "events"
    )?;
    let lines = [
        row(
            "record stores, 8 bytes each".into(),
            RECORDS,
            Some(RECORDS),
            "",
        ),
        row(
            format!("rep stosq elements into {:#x}", TABLE + PAGE_SIZE),
            TABLE_STOS,
            Some(TABLE_STOS),
            "one per element",
        ),
        row(
            format!("8-byte store across {STRADDLE:#x}..{:#x}", STRADDLE + 8),
            1,
            Some(1),
            "4 bytes: only the tracked half",
        ),
        row(
            format!("16-byte movdqu into {VECTOR:#x}"),
            1,
            Some(2),
            "KVM passes at most 8 bytes per exit",
        ),
        row(
            format!("{DEVICE_LEN}-byte device write (DMA) at {DEVICE:#x}"),
            1,
            Some(EXPECTED_DEVICE_EVENTS),
            "split at the frame boundary",
        ),
    ];
    for l in lines {
        writeln!(out, "{l}")?;
    }
    writeln!(out, "  Not reported, and not slowed down")?;
    let lines = [
        row(
            "scratch stores of the record loop".into(),
            RECORDS * SCRATCH_STORES,
            None,
            "",
        ),
        row(
            format!("rep stosq elements over 8 MiB at {BULK:#x}"),
            BULK_STOS,
            None,
            "",
        ),
        row(
            "untracked half of the straddling store".into(),
            1,
            None,
            "KVM wrote it itself",
        ),
    ];
    for l in lines {
        writeln!(out, "{l}")?;
    }
    if t.vcpu_writes == EXPECTED_GUEST_EVENTS && t.device_writes == EXPECTED_DEVICE_EVENTS {
        writeln!(
            out,
            "  All {} expected events arrived, and no others.",
            thousands(EXPECTED_GUEST_EVENTS + EXPECTED_DEVICE_EVENTS)
        )?;
    } else {
        writeln!(
            out,
            "  Expected {} guest and {} device events, but got {} and {}.",
            thousands(EXPECTED_GUEST_EVENTS),
            thousands(EXPECTED_DEVICE_EVENTS),
            thousands(t.vcpu_writes),
            thousands(t.device_writes)
        )?;
    }
    writeln!(out)?;
    writeln!(out, "What it cost")?;
    live::paragraph(
        out,
        &format!(
            "Every tracked store left the guest and came back through pagetrack: {} trapped \
             stores in {} of run time, {} each (run time / trapped stores: an upper bound, since \
             the run time includes the untracked work). The {} untracked stores ran at full \
             speed inside the guest.",
            thousands(trapped),
            live::duration(r.outcome.elapsed),
            nanos(per_event_ns(r.outcome.elapsed, trapped)),
            thousands(UNTRACKED_STORES)
        ),
    )?;
    live::paragraph(
        out,
        &format!(
            "Setting up tracking took {} KVM memslot changes in {} (the table's {} MiB chunk of \
             RAM re-cut into writable and read-only parts), with the vCPU paused {} for {}.",
            thousands(r.slot_changes),
            nanos(r.slot_change_ns),
            r.chunk_bytes >> 20,
            live::times(r.pauses),
            nanos(r.pause_ns)
        ),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_assembles_and_fits_below_the_table() {
        let code = program().unwrap();
        assert!(!code.is_empty());
        assert!(LOAD + code.len() as u64 <= TABLE);
    }
}
