//! busybox workloads run four ways: natively on the host, in pagetrack untracked, tracking
//! stack+heap+data, and tracking every writable frame with the page tables. Outputs must be
//! identical; in the tracked runs the replay oracle must hold, with events from vCPU stores
//! and from device writes (read() data, page-table updates).

use std::path::Path;

use pagetrack_testkit::kvm_or_skip;
use pagetrack_vmm::process::{Input, ProcessEnd};

use super::{BUSYBOX, GuestRun, Mode, TempDir, note, require_busybox, run_guest, run_native};

/// Bytes of the generated text file hashed, compressed and encoded.
const TEXT_BYTES: usize = 1 << 20;
/// Its size in the tracked runs, where each store to a tracked frame is a trapped exit
/// (about 22 us in a release build on this host, three to five times that in a debug build).
const TRACKED_BYTES: usize = if cfg!(debug_assertions) {
    4 << 10
} else {
    16 << 10
};
/// Lines of the generated file sorted.
const SORT_LINES: usize = 10_000;
/// Their number in the tracked runs.
const TRACKED_LINES: usize = if cfg!(debug_assertions) { 200 } else { 500 };

/// A deterministic pseudo-random sequence (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

const WORDS: [&str; 16] = [
    "page", "track", "guest", "frame", "write", "event", "kernel", "memory", "table", "shadow",
    "vcpu", "exit", "store", "replay", "oracle", "busybox",
];

/// About `bytes` of text: lines of words and numbers (compressible, like real text).
fn text(bytes: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    let mut out = Vec::with_capacity(bytes + 64);
    while out.len() < bytes {
        let n = 3 + r.next() % 8;
        for i in 0..n {
            if i > 0 {
                out.push(b' ');
            }
            let v = r.next();
            if v.is_multiple_of(5) {
                out.extend_from_slice((v >> 8).to_string().as_bytes());
            } else {
                out.extend_from_slice(WORDS[usize::try_from(v % 16).unwrap()].as_bytes());
            }
        }
        out.push(b'\n');
    }
    out.truncate(bytes);
    out
}

fn lines(n: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    let mut out = Vec::new();
    for _ in 0..n {
        let w = WORDS[usize::try_from(r.next() % 16).unwrap()];
        out.extend_from_slice(
            format!("{w}-{:08x} {}\n", r.next() & 0xffff_ffff, r.next() % 1000).as_bytes(),
        );
    }
    out
}

fn ensure_ok(run: &GuestRun, what: &str) {
    assert_eq!(
        run.outcome.end,
        ProcessEnd::Exited(0),
        "{what}: stderr {}",
        String::from_utf8_lossy(&run.outcome.stderr)
    );
}

fn report(what: &str, mode: Mode, run: &GuestRun, native: std::time::Duration) {
    let s = &run.outcome.stats;
    let events = run
        .oracle
        .as_ref()
        .map_or(0, |o| o.vcpu_events + o.device_events);
    let secs = s.run_time.as_secs_f64();
    note(&format!(
        "{what:>10} {mode:<13?} native {:>7.1} ms | run {:>8.1} ms (guest {:>8.1} + syscalls {:>6.1}) | \
         {:>5} syscalls | {:>7} events ({:>6.0}/s, {:>5.1} us each) | {} emulated | {:>5} frames, {:>3} invalidations",
        native.as_secs_f64() * 1e3,
        secs * 1e3,
        s.guest_time.as_secs_f64() * 1e3,
        s.syscall_time.as_secs_f64() * 1e3,
        s.syscalls.total(),
        events,
        if secs > 0.0 {
            events as f64 / secs
        } else {
            0.0
        },
        if events > 0 {
            (secs - native.as_secs_f64()).max(0.0) * 1e6 / events as f64
        } else {
            0.0
        },
        s.vm.emulated_stores,
        s.tracking.frames_tracked,
        s.tracking.invalidations,
    ));
}

/// Runs `args` natively and in pagetrack in each of `modes`; outputs must all match. Returns
/// the output.
fn compare(name: &str, dir: &Path, args: &[&str], stdin: Option<&Path>, modes: &[Mode]) -> Vec<u8> {
    let (native, status, native_wall) = run_native(args, stdin);
    assert_eq!(status, 0, "{name}: native busybox failed");
    for &mode in modes {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let input = stdin.map_or(Input::Null, |p| Input::File(p.to_owned()));
        let run = run_guest(kvm, Path::new(BUSYBOX), args, dir, input, mode);
        report(name, mode, &run, native_wall);
        ensure_ok(&run, &format!("{name} {mode:?}"));
        assert!(
            run.outcome.stdout == native,
            "{name} {mode:?}: output differs from native busybox"
        );
        if let Some(o) = &run.oracle {
            o.assert_holds(&format!("{name} {mode:?}"));
            if mode == Mode::Writable {
                assert!(o.table_events > 0, "{name}: no page-table events: {o:?}");
            }
        }
    }
    native
}

/// The full-size input natively and untracked; a smaller one natively and in both tracked
/// modes (every stack store of the tracked runs is a trapped exit, tens of microseconds on
/// this host). `make(n)` builds an input of size `n`. Returns both outputs.
fn four_ways(
    name: &str,
    dir: &Path,
    applet: &[&str],
    sizes: (usize, usize),
    make: impl Fn(usize) -> Vec<u8>,
) -> (Vec<u8>, Vec<u8>) {
    let mut outs = Vec::new();
    for (size, modes) in [
        (sizes.0, &[Mode::Untracked][..]),
        (sizes.1, &[Mode::StackHeapData, Mode::Writable][..]),
    ] {
        let f = dir.join(format!("{name}-{size}.in"));
        std::fs::write(&f, make(size)).unwrap();
        let mut args = applet.to_vec();
        args.push(f.to_str().unwrap());
        outs.push(compare(name, dir, &args, None, modes));
    }
    let tracked = outs.pop().unwrap();
    (outs.pop().unwrap(), tracked)
}

#[test]
fn sha256sum_matches_native_in_every_mode() {
    let _kvm = kvm_or_skip!();
    require_busybox();
    let d = TempDir::new("sha256");
    let (full, _) = four_ways(
        "sha256sum",
        &d.0,
        &["sha256sum"],
        (TEXT_BYTES, TRACKED_BYTES),
        |n| text(n, 1),
    );
    assert_eq!(
        full.len(),
        64 + 2 + d.0.join("sha256sum-1048576.in").to_str().unwrap().len() + 1
    );
}

#[test]
fn md5sum_matches_native_in_every_mode() {
    let _kvm = kvm_or_skip!();
    require_busybox();
    let d = TempDir::new("md5");
    four_ways(
        "md5sum",
        &d.0,
        &["md5sum"],
        (TEXT_BYTES, TRACKED_BYTES),
        |n| text(n, 2),
    );
}

#[test]
fn gzip_then_gunzip_round_trips_in_every_mode() {
    let _kvm = kvm_or_skip!();
    require_busybox();
    let d = TempDir::new("gzip");
    for (size, modes) in [
        (TEXT_BYTES, &[Mode::Untracked][..]),
        (TRACKED_BYTES, &[Mode::StackHeapData, Mode::Writable][..]),
    ] {
        let original = text(size, 3);
        let f = d.join(&format!("in-{size}.txt"));
        std::fs::write(&f, &original).unwrap();
        let gz = compare(
            "gzip",
            &d.0,
            &["gzip", "-c", f.to_str().unwrap()],
            None,
            modes,
        );
        // The pipe: the first guest's standard output is the second one's standard input.
        let gzf = d.join(&format!("in-{size}.txt.gz"));
        std::fs::write(&gzf, &gz).unwrap();
        let back = compare("gunzip", &d.0, &["gunzip", "-c"], Some(&gzf), modes);
        assert!(
            back == original,
            "gunzip -c of gzip -c is not the original ({size} bytes)"
        );
    }
}

#[test]
fn sort_matches_native_in_every_mode() {
    let _kvm = kvm_or_skip!();
    require_busybox();
    let d = TempDir::new("sort");
    let (full, _) = four_ways("sort", &d.0, &["sort"], (SORT_LINES, TRACKED_LINES), |n| {
        lines(n, 4)
    });
    assert_eq!(full.iter().filter(|&&b| b == b'\n').count(), SORT_LINES);
}

#[test]
fn wc_matches_native_in_every_mode() {
    let _kvm = kvm_or_skip!();
    require_busybox();
    let d = TempDir::new("wc");
    four_ways("wc", &d.0, &["wc"], (TEXT_BYTES, TRACKED_BYTES), |n| {
        text(n, 5)
    });
}

#[test]
fn base64_matches_native_in_every_mode() {
    let _kvm = kvm_or_skip!();
    require_busybox();
    let d = TempDir::new("base64");
    four_ways(
        "base64",
        &d.0,
        &["base64"],
        (TEXT_BYTES, TRACKED_BYTES),
        |n| text(n, 6),
    );
}
