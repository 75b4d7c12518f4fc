//! One tracked guest run, shared by `run` and `demo`: check the plan, build the VM, register
//! the event sink, track the ranges, run the guest (with a live progress line when asked),
//! then close the event stream with its `exit` and `summary` lines.

use std::sync::Arc;

use anyhow::Context;
use pagetrack::{AsId, Gfn, NotifierHandle};
use pagetrack_kvm::{Vm, VmStats};
use pagetrack_vmm::x86::{LongModeLayout, MAX_VCPUS, MIN_RAM_SIZE, USER_STACK_SIZE};
use pagetrack_vmm::{FlatConfig, FlatGuest, Mode, RunOutcome};

use crate::UsageError;
use crate::events::{EventSink, ExitLine, SummaryLine, Target, Totals};
use crate::live::Progress;
use crate::range::{TrackRange, format_size};
use crate::relaxed::RelaxedArg;

/// The most RAM `--mem` accepts. The tracker keeps 2 bytes per 4 KiB frame of RAM once
/// tracking is on, so this bounds that to 32 MiB.
pub const MAX_MEM: u64 = 64 << 30;

/// Where the long-mode identity map ends at most (the image must lie below it).
const IDENTITY_MAP_LIMIT: u64 = 4 << 30;

/// Everything a run needs.
#[derive(Debug)]
pub struct Plan {
    /// RAM, load address, mode, vCPUs, timeout, exit limit.
    pub config: FlatConfig,
    /// The flat image.
    pub image: Vec<u8>,
    /// What to call the image in messages.
    pub image_name: String,
    /// `--track` ranges.
    pub tracks: Vec<TrackRange>,
    /// `--events`.
    pub events: Option<Target>,
    /// `--relaxed` (`--exact` resolved).
    pub relaxed: RelaxedArg,
    /// The auto policy's parameters.
    pub policy: crate::relaxed::PolicyArgs,
}

/// Checks the plan against the RAM size and the long-mode layout.
///
/// # Errors
/// A one-line [`UsageError`] naming the option or the image.
pub fn validate(plan: &Plan) -> Result<(), UsageError> {
    let usage = |m: String| Err(UsageError(m));
    let c = &plan.config;
    let name = &plan.image_name;
    let mem = format_size(c.mem);
    if c.mem < MIN_RAM_SIZE {
        return usage(format!(
            "--mem {mem} is too small: a guest needs at least {} of RAM",
            format_size(MIN_RAM_SIZE)
        ));
    }
    if c.mem > MAX_MEM {
        return usage(format!(
            "--mem {mem} is too large: at most {}",
            format_size(MAX_MEM)
        ));
    }
    if !c.mem.is_multiple_of(4096) {
        return usage(format!("--mem {mem} is not a multiple of 4K"));
    }
    if c.vcpus == 0 || c.vcpus > MAX_VCPUS {
        return usage(format!(
            "--vcpus {} is out of range: 1 to {MAX_VCPUS}",
            c.vcpus
        ));
    }
    if plan.image.is_empty() {
        return usage(format!("image {name} is empty"));
    }
    let len = plan.image.len() as u64;
    let end = c.load.checked_add(len).filter(|&e| e <= c.mem);
    let Some(end) = end else {
        return usage(format!(
            "image {name} ({len} bytes at --load {:#x}) does not fit in RAM (--mem {mem} = {:#x} bytes)",
            c.load, c.mem
        ));
    };
    match c.mode {
        Mode::Long => {
            let layout =
                LongModeLayout::new(c.mem).map_err(|e| UsageError(format!("--mem: {e}")))?;
            let (reserved, reserved_end) = layout.reserved_range();
            let stacks = u64::from(c.vcpus) * USER_STACK_SIZE;
            let Some(low) = reserved.checked_sub(stacks) else {
                return usage(format!(
                    "--mem {mem} is too small for the stacks of {} vCPUs",
                    c.vcpus
                ));
            };
            if c.load < reserved_end && end > low {
                return usage(format!(
                    "image {name} at [{:#x}, {end:#x}) overlaps the long-mode stacks and tables at \
                     [{low:#x}, {reserved_end:#x}) (see 'pagetrack run --help' for the layout)",
                    c.load
                ));
            }
            if end > IDENTITY_MAP_LIMIT {
                return usage(format!(
                    "image {name} ends at {end:#x}, above the identity-mapped first 4 GiB"
                ));
            }
        }
        Mode::Real => {
            if c.load > 0xffff {
                return usage(format!(
                    "--load {:#x}: real mode enters at CS=0, so the load address must be below 0x10000",
                    c.load
                ));
            }
            if end > 0x10_0000 {
                return usage(format!(
                    "image {name} ends at {end:#x}: a real-mode image must end below 1 MiB"
                ));
            }
        }
    }
    for r in &plan.tracks {
        if r.end > c.mem {
            return usage(format!(
                "--track {r} is outside RAM [0x0, {:#x}) (--mem {mem})",
                c.mem
            ));
        }
    }
    Ok(())
}

/// A VM with the image loaded, the sink registered and the ranges tracked.
#[derive(Debug)]
pub struct Session {
    guest: FlatGuest,
    vm: Vm,
    tracked: Tracked,
}

/// The tracking side of a session.
#[derive(Debug)]
struct Tracked {
    sink: Arc<EventSink>,
    handle: NotifierHandle,
    frames: Vec<Gfn>,
    /// Counters after RAM set-up, before any track: the baseline of "slot changes for
    /// tracking".
    base: VmStats,
    relaxed: RelaxedArg,
}

impl Session {
    /// Validates the plan, creates the VM, opens the event stream and tracks the ranges (one
    /// batch, so one memslot re-cut per affected chunk).
    ///
    /// # Errors
    /// [`UsageError`] for a bad plan or events file; KVM failures otherwise.
    pub fn start(plan: Plan) -> anyhow::Result<Session> {
        validate(&plan)?;
        let config = plan
            .config
            .relaxed(plan.relaxed.config(&plan.policy))
            .dirty_ring(plan.policy.dirty_ring());
        let guest = FlatGuest::new(config, &plan.image).map_err(|e| match e {
            pagetrack_vmm::Error::InvalidGuestImage { .. }
            | pagetrack_vmm::Error::InvalidConfig { .. }
            | pagetrack_vmm::Error::InvalidRamSize { .. }
            | pagetrack_vmm::Error::VcpuIndexOutOfRange { .. }
            | pagetrack_vmm::Error::Backend(
                pagetrack_kvm::Error::DirtyRingSize { .. }
                | pagetrack_kvm::Error::DirtyRingUnsupported { .. },
            ) => anyhow::Error::new(UsageError::from_chain(&e)),
            other => anyhow::Error::new(other).context("cannot start the guest"),
        })?;
        let vm = guest.vm().clone();
        let base = vm.stats();
        let sink = EventSink::new(plan.events.as_ref())?;
        let handle = vm
            .tracker()
            .register(Arc::clone(&sink) as _, plan.relaxed.register_options())
            .context("cannot register the event notifier")?;
        let mut frames: Vec<Gfn> = plan.tracks.iter().flat_map(TrackRange::frames).collect();
        frames.sort_unstable();
        frames.dedup();
        if !frames.is_empty() {
            vm.tracker()
                .add_gfns(AsId::NORMAL, &frames)
                .with_context(|| format!("cannot track {} frames", frames.len()))?;
        }
        Ok(Session {
            guest,
            vm,
            tracked: Tracked {
                sink,
                handle,
                frames,
                base,
                relaxed: plan.relaxed,
            },
        })
    }

    /// The VM (to register a notifier of one's own before the run, say).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Runs the guest to its end; with `progress`, a progress line on the terminal meanwhile.
    pub fn run(self, progress: bool) -> Finished {
        let Session { guest, vm, tracked } = self;
        let live = progress.then(|| Progress::start(vm.clone(), Arc::clone(&tracked.sink)));
        let outcome = guest.run();
        // The end of the run: relaxed frames' last changes (every vCPU exit synced already;
        // this covers a run that ended without one, a timeout or an exit limit).
        let _ = vm.sync();
        if let Some(p) = live {
            p.stop();
        }
        Finished {
            outcome,
            vm,
            tracked,
        }
    }
}

/// A session whose guest has ended; the sink still receives (device) writes until
/// [`Finished::close`].
#[derive(Debug)]
pub struct Finished {
    outcome: RunOutcome,
    vm: Vm,
    tracked: Tracked,
}

impl Finished {
    /// The VM (for device writes after the run).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// How the guest ended.
    pub fn outcome(&self) -> &RunOutcome {
        &self.outcome
    }

    /// Unregisters the sink, writes the `exit` and `summary` lines and waits for the stream.
    ///
    /// # Errors
    /// The event stream could not be written.
    pub fn close(self) -> anyhow::Result<Report> {
        let Finished {
            outcome,
            vm,
            tracked,
        } = self;
        let Tracked {
            sink,
            handle,
            frames,
            base,
            relaxed,
        } = tracked;
        // Returns after every in-flight callback finished: no event can follow.
        drop(handle);
        let stats = vm.stats();
        let totals = sink.totals();
        let slot_changes = stats
            .fragments
            .slot_changes
            .saturating_sub(base.fragments.slot_changes);
        let exit = ExitLine::new(
            outcome.reason.as_str(),
            outcome.code,
            outcome.detail.clone(),
        );
        let mut summary = SummaryLine::new(
            totals.writes,
            totals.bytes,
            outcome.exits,
            slot_changes,
            outcome.elapsed,
        );
        if relaxed != RelaxedArg::Off {
            summary = summary.with_relaxed(stats.relaxed.frames_relaxed, totals.coalesced_writes);
        }
        let harvester = vm.dirty_harvester();
        if matches!(harvester, pagetrack_kvm::DirtyHarvester::Ring { .. }) {
            summary = summary.with_harvester(harvester);
        }
        sink.finish(exit, summary)?;
        Ok(Report {
            chunk_bytes: vm.chunk_bytes(),
            slot_changes,
            slot_change_ns: stats
                .fragments
                .slot_change_ns
                .saturating_sub(base.fragments.slot_change_ns),
            pauses: stats.pauses.saturating_sub(base.pauses),
            pause_ns: stats.pause_ns.saturating_sub(base.pause_ns),
            outcome,
            totals,
            frames,
            stats,
            relaxed,
            harvester,
        })
    }
}

/// What a closed session reports.
#[derive(Debug)]
pub struct Report {
    /// How the guest ended.
    pub outcome: RunOutcome,
    /// The sink's counters.
    pub totals: Totals,
    /// Tracked frames, in order.
    pub frames: Vec<Gfn>,
    /// The VM's counters at the end.
    pub stats: VmStats,
    /// Size of the KVM memslot chunks RAM is registered in.
    pub chunk_bytes: u64,
    /// KVM memslot changes made for tracking.
    pub slot_changes: u64,
    /// Their time, nanoseconds.
    pub slot_change_ns: u64,
    /// vCPU pauses for those changes.
    pub pauses: u64,
    /// Their time, nanoseconds.
    pub pause_ns: u64,
    /// `--relaxed`.
    pub relaxed: RelaxedArg,
    /// Which harvester read KVM's dirty log (`--dirty-ring`, else a bitmap).
    pub harvester: pagetrack_kvm::DirtyHarvester,
}
