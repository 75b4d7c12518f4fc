//! `--relaxed off|auto|always` and `--exact` of `run` and `exec`.

use pagetrack::{Delivery, NotifierClass, RegisterOptions};
use pagetrack_kvm::{RelaxedConfig, RelaxedMode};

/// When tracked frames may run relaxed (dirty log + shadow diff, coalesced events).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RelaxedArg {
    /// Every frame strict: one exact event per store.
    Off,
    /// A frame is relaxed once it took 16 trapped stores within 5 ms.
    Auto,
    /// Every tracked frame relaxed from the start.
    Always,
}

impl RelaxedArg {
    /// `--relaxed`, with `--exact` as a short form of `--relaxed off`.
    pub fn resolve(self, exact: bool) -> RelaxedArg {
        if exact { RelaxedArg::Off } else { self }
    }

    /// The VM's relaxed-mode settings.
    pub fn config(self) -> RelaxedConfig {
        RelaxedConfig::new(match self {
            RelaxedArg::Off => RelaxedMode::Off,
            RelaxedArg::Auto => RelaxedMode::Auto,
            RelaxedArg::Always => RelaxedMode::Always,
        })
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
