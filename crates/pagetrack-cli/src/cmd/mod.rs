//! The subcommands, one file each: `Args` (clap) and `run(args) -> anyhow::Result<ExitCode>`.

pub mod bench;
pub mod caps;
pub mod demo;
pub mod exec;
pub mod run;
