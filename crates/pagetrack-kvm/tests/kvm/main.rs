//! pagetrack-kvm integration tests: real guest code on real KVM.
//!
//! Every test starts with `kvm_or_skip!()`: without `/dev/kvm` it prints a loud
//! `SKIPPED (no /dev/kvm)` line, and with `PAGETRACK_REQUIRE_KVM=1` (as in CI) it fails instead.

#![expect(
    clippy::unwrap_used,
    reason = "test set-up helpers fail the test loudly"
)]

mod atomics;
mod common;
mod concurrency;
mod dirty;
mod example;
mod hard;
mod hostile;
mod masked;
mod pagetables;
mod shapes;
mod stale;
mod stall;
mod track;
