//! A hostile program racing address-space changes against the stores pagetrack completes in
//! userspace (issue 13): hammer threads store into a tracked page while the main thread keeps
//! replacing its memory (`mmap(MAP_FIXED)` over it, `mremap` of a fresh page onto it) and maps
//! new pages that get the frames the hammered page lost. A store completed after its frame
//! was freed and reused would show up in a fresh page (not zero) or as a foreign value; a
//! page-table walk that met a half-done change would fault where nothing is ever unmapped.
//! The output must match a native run's, and the replay oracle must hold.
//!
//! The C program is `remap/remap.c`, built with `gcc -static -pthread` at test time.

use std::process::Command;

use pagetrack_testkit::kvm_or_skip;
use pagetrack_vmm::process::Region;

use super::memtest::build;
use super::{RUN_TIMEOUT, TempDir, assert_ran_as_natively, c_program, run_config};

const REMAP_C: &str = include_str!("remap/remap.c");

#[test]
fn stores_racing_munmap_mmap_and_mremap_of_their_page_land_only_where_native_allows() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("remap-race");
    let exe = build(&d.0, "remap", REMAP_C, &["-pthread"]);
    for (regions, rounds) in [
        (vec![Region::Mmap], "2000"),
        (vec![Region::Writable], "1000"),
    ] {
        let native = Command::new(&exe).arg(rounds).output().unwrap();
        assert!(native.status.success(), "native run failed");
        let want = String::from_utf8_lossy(&native.stdout).into_owned();
        assert!(
            want.contains(" 0 fresh pages not zero, 0 foreign values, 0 moved marks lost"),
            "native: {want}"
        );
        let cfg = c_program(&exe, &[rounds], &d, regions.clone(), RUN_TIMEOUT);
        let run = run_config(kvm_ioctls::Kvm::new().unwrap(), cfg);
        assert!(run.oracle.is_some(), "tracked");
        assert_ran_as_natively(&run, &want, &format!("remap race {regions:?}"));
    }
}
