//! A static C program, compiled here with `gcc -static`, that maps, fills, unmaps and maps
//! again at the same address thousands of times, mprotects, grows and shrinks brk, remaps
//! with mremap, and checks every byte: correct with and without tracking. Its memory changes
//! exercise the page-table updates and the KVM translation invalidation after each present
//! entry changes (without it the program would read a freed frame through a stale mapping).

use std::path::{Path, PathBuf};
use std::process::Command;

use pagetrack_testkit::kvm_or_skip;
use pagetrack_vmm::process::{Input, ProcessEnd};

use super::{Mode, TempDir, note, run_guest};

/// The C source. Exit status 0 means every check passed; otherwise it names the check.
const MEMTEST_C: &str = r#"
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <unistd.h>
#include <sys/mman.h>

static void fail(const char *what, long i) {
    fprintf(stderr, "memtest: %s failed at %ld\n", what, i);
    exit(1);
}

/* Word-sized patterns: with tracking on, every store to a tracked page is an exit. */
static uint64_t pat(uint64_t seed, size_t i) { return seed * 0x9e3779b97f4a7c15ull + i * 0x100000001b3ull + 1; }

static void fill(void *p, size_t n, uint64_t seed) {
    uint64_t *w = p;
    for (size_t i = 0; i < n / 8; i++) w[i] = pat(seed, i);
}

static void check(const void *p, size_t n, uint64_t seed, const char *what, long round) {
    const uint64_t *w = p;
    for (size_t i = 0; i < n / 8; i++) if (w[i] != pat(seed, i)) fail(what, round);
}

static void zero(const void *p, size_t n, const char *what, long round) {
    const uint64_t *w = p;
    for (size_t i = 0; i < n / 8; i++) if (w[i]) fail(what, round);
}

int main(int argc, char **argv) {
    long rounds = argc > 1 ? atol(argv[1]) : 2000;
    size_t len = (argc > 2 ? atol(argv[2]) : 3) * 4096;
    long bpages = argc > 3 ? atol(argv[3]) : 20;
    size_t mbytes = argc > 4 ? (size_t)atol(argv[4]) : 200000;

    /* map, fill, check, unmap, map again at the same address: fresh zero pages each time,
       while another mapping elsewhere has taken the freed frames */
    unsigned char *fixed = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (fixed == MAP_FAILED) fail("first mmap", 0);
    for (long r = 0; r < rounds; r++) {
        zero(fixed, len, "fresh mapping is zero", r);
        fill(fixed, len, r);
        check(fixed, len, r, "fill", r);
        if (munmap(fixed, len)) fail("munmap", r);
        unsigned char *far = fixed + (1L << 30);
        unsigned char *other = mmap(far, len, PROT_READ | PROT_WRITE,
                                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        if (other != far) fail("other mmap", r);
        fill(other, len, ~r);
        unsigned char *again = mmap(fixed, len, PROT_READ | PROT_WRITE,
                                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        if (again != fixed) fail("mmap at the same address", r);
        check(other, len, ~r, "other mapping", r);
        if (munmap(other, len)) fail("munmap other", r);
    }

    /* MAP_FIXED over a live mapping replaces it with zero pages */
    fill(fixed, len, 7);
    if (mmap(fixed, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != fixed)
        fail("MAP_FIXED", 0);
    zero(fixed, len, "MAP_FIXED replaced", 0);

    /* mprotect: read-only keeps contents, PROT_NONE keeps them too, split protections */
    fill(fixed, len, 9);
    if (mprotect(fixed, len, PROT_READ)) fail("mprotect ro", 0);
    check(fixed, len, 9, "read-only contents", 0);
    if (mprotect(fixed, len, PROT_NONE)) fail("mprotect none", 0);
    if (mprotect(fixed, len, PROT_READ | PROT_WRITE)) fail("mprotect rw", 0);
    check(fixed, len, 9, "contents after PROT_NONE", 0);
    if (len >= 3 * 4096) {
        fixed[5] = 1;
        if (mprotect(fixed + 4096, 4096, PROT_READ)) fail("mprotect middle", 0);
        fixed[2 * 4096 + 5] = 2;
        if (fixed[5] != 1 || fixed[2 * 4096 + 5] != 2) fail("split protection", 0);
    }

    /* mremap: grow (moving past a blocker), contents kept, new tail zero; shrink */
    unsigned char *big = mmap(0, 8 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    fill(big, 8 * 4096, 11);
    unsigned char *blocker = mmap(big + 8 * 4096, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    unsigned char *moved = mremap(big, 8 * 4096, 64 * 4096, MREMAP_MAYMOVE);
    if (moved == MAP_FAILED) fail("mremap", 0);
    check(moved, 8 * 4096, 11, "mremap contents", 0);
    zero(moved + 8 * 4096, 56 * 4096, "mremap tail", 0);
    if (mremap(moved, 64 * 4096, 4 * 4096, 0) != moved) fail("mremap shrink", 0);
    check(moved, 4 * 4096, 11, "shrunk contents", 0);
    munmap(moved, 4 * 4096);
    if (blocker != MAP_FAILED) munmap(blocker, 4096);

    /* brk: grow, fill, shrink to one page, grow again: the regrown part is zero */
    for (long r = 0; r < rounds / 10 + 1; r++) {
        unsigned char *base = sbrk(0);
        if (sbrk(bpages * 4096) == (void *)-1) fail("sbrk grow", r);
        fill(base, bpages * 4096, r);
        check(base, bpages * 4096, r, "brk fill", r);
        if (sbrk(-(bpages - 1) * 4096) == (void *)-1) fail("sbrk shrink", r);
        check(base, 4096, r, "brk kept", r);
        if (sbrk((bpages - 1) * 4096) == (void *)-1) fail("sbrk regrow", r);
        zero(base + 4096, (bpages - 1) * 4096, "regrown brk is zero", r);
        if (sbrk(-bpages * 4096) == (void *)-1) fail("sbrk release", r);
    }

    /* malloc, realloc (mremap for mmap'd blocks) and free of large blocks, checked */
    for (long r = 0; r < rounds / 20 + 1; r++) {
        size_t n = (mbytes + (size_t)r * 4096) & ~(size_t)7;
        unsigned char *m = malloc(n);
        if (!m) fail("malloc", r);
        fill(m, n, r);
        m = realloc(m, 2 * n);
        if (!m) fail("realloc", r);
        check(m, n, r, "realloc contents", r);
        free(m);
    }
    printf("memtest ok %ld\n", rounds);
    return 0;
}
"#;

/// Builds the program with the machine's gcc (`gcc -static -O1`).
pub fn build(dir: &Path, name: &str, source: &str, extra: &[&str]) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    let exe = dir.join(name);
    std::fs::write(&src, source).unwrap();
    let out = Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(&exe)
        .arg(&src)
        .args(extra)
        .output()
        .expect("gcc is needed for the C test programs (scripts/test installs it)");
    assert!(
        out.status.success(),
        "gcc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Builds a small static C program from `source` in `dir`.
pub fn build_c(dir: &Path, name: &str, source: &str) -> PathBuf {
    build(dir, name, source, &[])
}

#[test]
fn memtest_is_correct_with_and_without_tracking() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("memtest");
    let exe = build_c(&d.0, "memtest", MEMTEST_C);
    let native = Command::new(&exe).arg("2000").output().unwrap();
    assert!(
        native.status.success(),
        "native memtest: {}",
        String::from_utf8_lossy(&native.stderr)
    );
    // Untracked: thousands of rounds, 200 KB malloc blocks (above glibc's mmap threshold, so
    // realloc is an mremap). Tracked: fewer and smaller, as each store to a tracked page is an
    // exit: one-page mappings, 2-page brk steps, 20 KB blocks.
    for (mode, args) in [
        (Mode::Untracked, ["2000", "3", "20", "200000"]),
        (Mode::StackHeapData, ["200", "1", "2", "20000"]),
        (Mode::Writable, ["40", "1", "2", "20000"]),
    ] {
        let rounds = args[0];
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let run = run_guest(kvm, &exe, &args, &d.0, Input::Null, mode);
        let s = &run.outcome.stats;
        note(&format!(
            "   memtest {mode:<13?} {rounds} rounds: run {:>7.1} ms, {} syscalls, {} invalidations ({} fragments), \
             {} frames tracked, {} untracked, oracle {:?}",
            s.run_time.as_secs_f64() * 1e3,
            s.syscalls.total(),
            s.tracking.invalidations,
            s.tracking.fragments_recreated,
            s.tracking.frames_tracked,
            s.tracking.frames_untracked,
            run.oracle
                .as_ref()
                .map(|o| (o.vcpu_events, o.device_events, o.table_events)),
        ));
        assert_eq!(
            run.outcome.end,
            ProcessEnd::Exited(0),
            "memtest {mode:?}: {}",
            String::from_utf8_lossy(&run.outcome.stderr)
        );
        assert_eq!(
            run.outcome.stdout,
            format!("memtest ok {rounds}\n").into_bytes()
        );
        assert!(
            s.tracking.invalidations >= 40,
            "munmap must invalidate: {s:?}"
        );
        if let Some(o) = &run.oracle {
            o.assert_holds(&format!("memtest {mode:?}"));
            assert!(
                s.tracking.frames_untracked > 0,
                "freed frames are untracked"
            );
        }
    }
}
