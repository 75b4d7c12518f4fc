//! `--relaxed off|auto|always` and `--exact` of `run` and `exec`.

use pagetrack::{Delivery, NotifierClass, RegisterOptions};
use pagetrack_kvm::{RelaxedConfig, RelaxedMode};

/// The auto policy's parameters (defaults: pagetrack_kvm's `RelaxedConfig`).
#[derive(Clone, Copy, Debug, Default, clap::Args)]
pub struct PolicyArgs {
    /// --relaxed auto: trapped stores to one frame within the window that relax it.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub promote_after: Option<u32>,
    /// --relaxed auto: the window those stores are counted in, milliseconds.
    #[arg(long = "promote-window", value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub promote_window_ms: Option<u64>,
    /// --relaxed auto: a relaxed frame no sync found dirty for N consecutive syncs (and for
    /// --demote-window) goes back to strict; 0 never demotes.
    #[arg(long = "demote-after", value_name = "N")]
    pub demote_after: Option<u32>,
    /// --relaxed auto: the time a frame must also stay clean to be demoted, milliseconds.
    #[arg(long = "demote-window", value_name = "MS")]
    pub demote_window_ms: Option<u64>,
    /// --relaxed auto|always: a trapped `rep stos`/`rep movs` with at least N elements left
    /// relaxes the tracked frames it will write before it runs on, instead of one exact
    /// event per element; 0 never does.
    #[arg(long = "rep-promote", value_name = "N")]
    pub rep_promote: Option<u64>,
    /// A relaxed frame found dirty in N consecutive syncs stays writable between syncs (a
    /// "hot" frame, diffed at every sync instead of re-protected; manual dirty-log protect
    /// only); 0 never.
    #[arg(long = "hot-after", value_name = "N")]
    pub hot_after: Option<u32>,
    /// Harvest dirty pages from a per-vCPU dirty ring of ENTRIES entries (a power of two,
    /// at least 256; KVM_CAP_DIRTY_LOG_RING_ACQ_REL where offered) instead of the bitmaps:
    /// a sync costs O(dirty pages), and coalesced events name their frame's first writer.
    #[arg(long = "dirty-ring", value_name = "ENTRIES")]
    pub dirty_ring: Option<u32>,
}

impl PolicyArgs {
    /// `--dirty-ring`, as the VM's setting.
    pub fn dirty_ring(&self) -> Option<pagetrack_kvm::DirtyRing> {
        self.dirty_ring.map(pagetrack_kvm::DirtyRing::entries)
    }
}

/// When tracked frames may run relaxed (dirty log + shadow diff, coalesced events).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RelaxedArg {
    /// Every frame strict: one exact event per store.
    Off,
    /// A frame (with the tracked frames of its aligned 64 KiB group) is relaxed at its first
    /// trapped store (--promote-after, --promote-window change that).
    Auto,
    /// Every tracked frame relaxed from the start.
    Always,
}

impl RelaxedArg {
    /// `--relaxed`, with `--exact` as a short form of `--relaxed off`.
    pub fn resolve(self, exact: bool) -> RelaxedArg {
        if exact { RelaxedArg::Off } else { self }
    }

    /// The VM's relaxed-mode settings, with the auto policy's `--promote-after`,
    /// `--promote-window`, `--demote-after`, `--demote-window`, `--rep-promote` and
    /// `--hot-after` where given.
    pub fn config(self, policy: &PolicyArgs) -> RelaxedConfig {
        let mut c = RelaxedConfig::new(match self {
            RelaxedArg::Off => RelaxedMode::Off,
            RelaxedArg::Auto => RelaxedMode::Auto,
            RelaxedArg::Always => RelaxedMode::Always,
        });
        if let Some(n) = policy.promote_after {
            c.promote_after = n;
        }
        if let Some(ms) = policy.promote_window_ms {
            c.window = std::time::Duration::from_millis(ms);
        }
        if let Some(n) = policy.demote_after {
            c.demote_after_syncs = n;
        }
        if let Some(ms) = policy.demote_window_ms {
            c.demote_window = std::time::Duration::from_millis(ms);
        }
        if let Some(n) = policy.rep_promote {
            c.rep_promote_elements = n;
        }
        if let Some(n) = policy.hot_after {
            c.hot_after_syncs = n;
        }
        c
    }

    /// How the event sink registers: accepting coalesced events unless off.
    pub fn register_options(self) -> RegisterOptions {
        let o = RegisterOptions::new(NotifierClass::Ordinary);
        if self == RelaxedArg::Off {
            o
        } else {
            o.with_delivery(Delivery::Coalesced)
        }
    }
}
