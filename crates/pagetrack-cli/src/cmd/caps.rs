//! `pagetrack caps`: what this host's KVM offers that pagetrack uses, in plain words or JSON.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use kvm_bindings::{
    KVM_SYNC_X86_EVENTS, KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS, KVM_X86_QUIRK_SLOT_ZAP_ALL,
};
use kvm_ioctls::Kvm;
use pagetrack_kvm::{HostCaps, VmConfig};
use serde::Serialize;

use crate::live::{self, thousands};

/// `pagetrack caps` options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The quirks `KVM_CAP_DISABLE_QUIRKS2` may report, by bit (Linux `KVM_X86_QUIRK_*`).
const QUIRKS: [&str; 10] = [
    "LINT0_REENABLED",
    "CD_NW_CLEARED",
    "LAPIC_MMIO_HOLE",
    "OUT_7E_INC_RIP",
    "MISC_ENABLE_NO_MWAIT",
    "FIX_HYPERCALL_INSN",
    "MWAIT_NEVER_UD_FAULTS",
    "SLOT_ZAP_ALL",
    "STUFF_FEATURE_MSRS",
    "IGNORE_GUEST_PAT",
];

/// Bytes of one dirty-ring entry (`struct kvm_dirty_gfn`).
const DIRTY_GFN_BYTES: u32 = 16;

/// The report, as printed with `--json`.
#[derive(Debug, Serialize)]
struct Caps {
    /// The module providing /dev/kvm, if known.
    module: Option<String>,
    /// `KVM_GET_API_VERSION`.
    api_version: i32,
    /// "hardware" (VT-x/AMD-V) or "software" (PVM).
    virtualization: &'static str,
    /// "shadow" or "tdp" (EPT/NPT).
    paging: &'static str,
    /// `KVM_CAP_READONLY_MEM`.
    readonly_memslots: bool,
    /// `KVM_CAP_NR_MEMSLOTS`.
    memslots: usize,
    /// Memslots pagetrack uses for RAM fragments (the rest is left to the VMM).
    memslot_budget: usize,
    /// `KVM_CAP_DISABLE_QUIRKS2` mask.
    disable_quirks2: u64,
    /// Its bits by name.
    disable_quirks2_names: Vec<String>,
    /// Whether `KVM_X86_QUIRK_SLOT_ZAP_ALL` can be disabled (pagetrack then does).
    slot_zap_all_disableable: bool,
    /// `KVM_CAP_SYNC_REGS` mask.
    sync_regs: u32,
    /// Its sets by name.
    sync_regs_names: Vec<&'static str>,
    /// `KVM_CAP_DIRTY_LOG_RING`: the largest dirty ring per vCPU in bytes (0: none).
    dirty_ring_bytes: u32,
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`: the same for the acquire/release ring, which
    /// pagetrack prefers (`--dirty-ring`) (0: none).
    dirty_ring_acq_rel_bytes: u32,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` flags (0: none); pagetrack harvests with
    /// `KVM_CLEAR_DIRTY_LOG` when bit 0 is set.
    manual_dirty_protect: u32,
    /// `KVM_CAP_X86_USER_SPACE_MSR` and `KVM_CAP_X86_MSR_FILTER`: guest writes of the MSRs
    /// that make KVM write guest memory itself are checked against tracked frames.
    msr_filter: bool,
}

impl Caps {
    fn new(kvm: &Kvm, h: &HostCaps) -> Caps {
        let quirks = (0..64)
            .filter(|b| h.disable_quirks2 & (1u64 << b) != 0)
            .map(|b| {
                QUIRKS
                    .get(b)
                    .map_or_else(|| format!("bit {b}"), |q| (*q).to_owned())
            })
            .collect();
        let sync = [
            (KVM_SYNC_X86_REGS, "regs"),
            (KVM_SYNC_X86_SREGS, "sregs"),
            (KVM_SYNC_X86_EVENTS, "events"),
        ];
        Caps {
            module: h.module.clone(),
            api_version: kvm.get_api_version(),
            virtualization: if h.software_kvm {
                "software"
            } else {
                "hardware"
            },
            paging: if h.shadow_paging { "shadow" } else { "tdp" },
            readonly_memslots: h.readonly_mem,
            memslots: h.nr_memslots,
            memslot_budget: h
                .nr_memslots
                .saturating_sub(VmConfig::default().reserved_slots),
            disable_quirks2: h.disable_quirks2,
            disable_quirks2_names: quirks,
            slot_zap_all_disableable: h.disable_quirks2 & u64::from(KVM_X86_QUIRK_SLOT_ZAP_ALL)
                != 0,
            sync_regs: h.sync_regs,
            sync_regs_names: sync
                .iter()
                .filter(|(bit, _)| h.sync_regs & bit != 0)
                .map(|(_, n)| *n)
                .collect(),
            dirty_ring_bytes: h.dirty_ring_bytes,
            dirty_ring_acq_rel_bytes: h.dirty_ring_acq_rel_bytes,
            manual_dirty_protect: h.manual_dirty_protect,
            msr_filter: h.msr_filter,
        }
    }

    fn write_text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let yes = |b: bool| if b { "yes" } else { "no" };
        let module = self.module.as_deref().unwrap_or("unknown module");
        writeln!(
            out,
            "KVM on this host: {module}, API version {}",
            self.api_version
        )?;
        writeln!(out)?;
        if self.virtualization == "software" {
            writeln!(out, "virtualization:  software (PVM), no VT-x/AMD-V")?;
            writeln!(
                out,
                "  Guest code at CPL3 runs natively. Guest code at CPL0 and in real mode runs in"
            )?;
            writeln!(
                out,
                "  KVM's instruction emulator (about 2 us an instruction), and some instructions"
            )?;
            writeln!(
                out,
                "  (SSE at CPL0, cmpxchg16b, xsave) stop it. pagetrack's long-mode guests run their"
            )?;
            writeln!(out, "  work at CPL3 for this reason.")?;
        } else {
            writeln!(out, "virtualization:  hardware (VT-x/AMD-V)")?;
            writeln!(
                out,
                "  Guest code runs natively at every privilege level and in real mode."
            )?;
        }
        if self.paging == "shadow" {
            writeln!(out, "paging:          shadow paging (no EPT/NPT)")?;
            writeln!(
                out,
                "  KVM keeps its own copies of the guest's page tables. A store pagetrack applies"
            )?;
            writeln!(
                out,
                "  to a tracked frame that holds guest page tables bypasses them, so KVM must be"
            )?;
            writeln!(out, "  told to drop stale copies.")?;
        } else {
            writeln!(out, "paging:          two-dimensional (EPT/NPT)")?;
            writeln!(
                out,
                "  The CPU walks the guest's page tables itself; nothing to keep in sync."
            )?;
        }
        writeln!(out, "read-only memslots: {}", yes(self.readonly_memslots))?;
        if self.readonly_memslots {
            writeln!(
                out,
                "  Tracked frames live in read-only memslots: reads and instruction fetches run"
            )?;
            writeln!(
                out,
                "  at full speed, every store exits to pagetrack before memory changes."
            )?;
        } else {
            writeln!(out, "  pagetrack cannot enforce tracking on this host.")?;
        }
        writeln!(
            out,
            "memslots:        {} per VM; pagetrack spends up to {} on RAM fragments",
            thousands(self.memslots as u64),
            thousands(self.memslot_budget as u64)
        )?;
        writeln!(
            out,
            "  Each run of tracked frames costs a read-only fragment plus a split of its"
        )?;
        writeln!(
            out,
            "  neighbour; when they run short, nearby tracked frames share one fragment."
        )?;
        if self.disable_quirks2_names.is_empty() {
            writeln!(
                out,
                "quirks:          KVM_CAP_DISABLE_QUIRKS2 is not offered"
            )?;
        } else {
            writeln!(out, "quirks:          KVM_CAP_DISABLE_QUIRKS2 can disable:")?;
            live::paragraph(out, &self.disable_quirks2_names.join(", "))?;
        }
        writeln!(
            out,
            "  SLOT_ZAP_ALL can be disabled: {}",
            yes(self.slot_zap_all_disableable)
        )?;
        if self.slot_zap_all_disableable {
            writeln!(
                out,
                "  pagetrack disables it, so a memslot change drops only that slot's mappings"
            )?;
            writeln!(
                out,
                "  instead of every mapping of the guest (far cheaper tracks on large guests)."
            )?;
        } else {
            writeln!(
                out,
                "  Every memslot change (each track or untrack) drops all of the guest's"
            )?;
            writeln!(out, "  mappings, which the guest then refaults.")?;
        }
        if self.sync_regs_names.is_empty() {
            writeln!(out, "sync regs:       not offered")?;
        } else {
            writeln!(
                out,
                "sync regs:       {} (registers travel with each exit, saving ioctls)",
                self.sync_regs_names.join(", ")
            )?;
        }
        if self.dirty_ring_bytes == 0 {
            writeln!(out, "dirty ring:      not offered")?;
        } else {
            writeln!(
                out,
                "dirty ring:      up to {} bytes per vCPU ({} entries)",
                thousands(u64::from(self.dirty_ring_bytes)),
                thousands(u64::from(self.dirty_ring_bytes / DIRTY_GFN_BYTES))
            )?;
        }
        if self.dirty_ring_acq_rel_bytes == 0 {
            writeln!(out, "ring acq/rel:    not offered")?;
        } else {
            writeln!(
                out,
                "ring acq/rel:    up to {} entries per vCPU (used by --dirty-ring: harvests \
                 every vCPU's ring, then KVM_RESET_DIRTY_RINGS; first-writer hints)",
                thousands(u64::from(self.dirty_ring_acq_rel_bytes / DIRTY_GFN_BYTES))
            )?;
        }
        if self.manual_dirty_protect & 1 == 0 {
            writeln!(
                out,
                "manual protect:  not offered (dirty logs harvested by KVM_GET_DIRTY_LOG)"
            )?;
        } else {
            writeln!(
                out,
                "manual protect:  yes, flags {:#x} (dirty logs harvested by GET, then CLEAR of the \
                 harvested bits)",
                self.manual_dirty_protect
            )?;
        }
        if self.msr_filter {
            writeln!(out, "MSR filter:      yes (user-space MSR exits)")?;
            writeln!(
                out,
                "  Guest writes of kvmclock, steal-time and similar MSRs come to pagetrack:"
            )?;
            writeln!(
                out,
                "  KVM's own writes never land on a tracked frame (such a wrmsr is refused)."
            )?;
        } else {
            writeln!(out, "MSR filter:      no")?;
            writeln!(
                out,
                "  KVM's own writes (kvmclock, steal time...) to a tracked frame are lost:"
            )?;
            writeln!(out, "  hide KVM's paravirtual features from the guest.")?;
        }
        out.flush()
    }
}

/// Runs `pagetrack caps`.
///
/// # Errors
/// `/dev/kvm` cannot be opened; standard output cannot be written.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let kvm = Kvm::new().context("cannot open /dev/kvm")?;
    let caps = Caps::new(&kvm, &HostCaps::probe(&kvm));
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &caps).context("cannot write to standard output")?;
        writeln!(out).context("cannot write to standard output")?;
    } else {
        caps.write_text(&mut out)
            .context("cannot write to standard output")?;
    }
    Ok(ExitCode::SUCCESS)
}
