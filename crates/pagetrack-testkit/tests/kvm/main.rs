//! pagetrack-kvm integration tests: real guest code on real KVM.
//!
//! They live in the testkit, not in pagetrack-kvm, because they boot guests with
//! pagetrack-vmm's x86 set-up: as dev-dependencies of pagetrack-kvm, pagetrack-vmm (and the
//! testkit) would form a cycle through pagetrack-kvm that stops the crates from publishing.
//! Run them with `cargo test -p pagetrack-testkit --test kvm`.
//!
//! Every test starts with `kvm_or_skip!()`: without `/dev/kvm` it prints a loud
//! `SKIPPED (no /dev/kvm)` line, and with `PAGETRACK_REQUIRE_KVM=1` (as in CI) it fails instead.

#![expect(
    clippy::unwrap_used,
    reason = "test set-up helpers fail the test loudly"
)]

mod atomics;
mod checkpoint;
mod common;
mod concurrency;
mod config;
mod delivery;
mod demotion;
mod devices;
mod dirty;
mod example;
mod exits;
mod failure;
mod fault;
mod hard;
mod harvest;
mod hostile;
mod hot;
mod kvmwrites;
mod masked;
mod modes;
mod multistore;
mod pagetables;
mod realmode;
mod refused;
mod relaxed;
mod relaxed_rep;
mod remap;
mod review10m;
mod review10s;
mod review12;
mod review13;
mod ring;
mod runahead;
mod shapes;
mod singlestep;
mod splitlock;
mod stale;
mod stall;
mod track;
