//! `pagetrack bench`: the backend's measurements on this host, as a table or JSON.

use std::io::Write;
use std::process::ExitCode;

use crate::bench::{self, BenchConfig};
use anyhow::Context;

use crate::range::parse_size;

/// Options of `pagetrack bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// RAM of the large guest used for track/untrack latency and refault cost (K/M/G).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub ram: u64,
    /// Exits per round-trip measurement.
    #[arg(long, default_value_t = 20_000)]
    pub exits: u64,
    /// Repetitions of each measurement (the median is shown).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Measure relaxed mode only (its rows: rep stosb, and the sync cost sweep by dirty and
    /// relaxed frames, plain, manual-protect and dirty-ring harvests).
    #[arg(long)]
    pub relaxed_only: bool,
}

/// Runs the measurements and prints them.
///
/// # Errors
/// KVM failures, or bad values (status 2).
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.ram < (64 << 20) || args.ram > (64 << 30) {
        return Err(crate::UsageError("--ram must be between 64M and 64G".into()).into());
    }
    if args.reps == 0 || args.exits < 100 {
        return Err(
            crate::UsageError("--reps must be at least 1 and --exits at least 100".into()).into(),
        );
    }
    let cfg = BenchConfig {
        ram: args.ram,
        exits: args.exits,
        reps: args.reps,
        relaxed_only: args.relaxed_only,
    };
    let quiet = args.json;
    let report = bench::run(cfg, |step| {
        if !quiet {
            let _ignored = writeln!(std::io::stderr(), "measuring: {step}");
        }
    })
    .context("benchmark failed")?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let rows: Vec<serde_json::Value> = report
            .rows
            .iter()
            .map(|r| serde_json::json!({"key": r.key, "what": r.what, "value": r.value, "unit": r.unit}))
            .collect();
        writeln!(out, "{}", serde_json::json!({ "rows": rows }))?;
    } else {
        writeln!(out, "{:<24} {:>14}  {:<6} what", "key", "median", "unit")?;
        for r in &report.rows {
            writeln!(
                out,
                "{:<24} {:>14.3}  {:<6} {}",
                r.key, r.value, r.unit, r.what
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
