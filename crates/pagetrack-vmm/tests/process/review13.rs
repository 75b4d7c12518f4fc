//! Review of issue 13's threads, as a hostile program's author would attack them: raw
//! `clone`/`clone3` with odd flags, TLS, stacks and tid pointers; futex calls with bad
//! addresses, timeouts and requeue loops; signals to threads; address-space changes under a
//! running thread; threads that spin, race `exit_group` or exhaust memory; and a thread that
//! waits in `select`, a write to a full FIFO or `F_OFD_SETLKW` while another thread needs the
//! kernel. Tests named `*_as_natively` compare with a native run of the same program; the
//! others check the end a native run has (or a clear error). Every run has a timeout, so a
//! hang or deadlock is a failure, not a stuck test.
//!
//! The C program is `review13/threads.c`, built with `gcc -static -pthread` at test time.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pagetrack_testkit::kvm_or_skip;
use pagetrack_vmm::process::ProcessEnd;

use super::memtest::build;
use super::{GuestRun, Mode, TempDir, c_program, run_config};

const THREADS_C: &str = include_str!("review13/threads.c");

/// No run here may take longer than this; a deadlock ends as a timeout well before.
const LIMIT: Duration = Duration::from_secs(30);

fn exe(d: &TempDir) -> PathBuf {
    build(&d.0, "threads", THREADS_C, &["-pthread"])
}

/// Runs `exe args` in a process VM tracked as `mode`, writing under `d`, with `timeout`.
fn guest(exe: &Path, args: &[&str], d: &TempDir, mode: Mode, timeout: Duration) -> GuestRun {
    run_config(
        kvm_ioctls::Kvm::new().unwrap(),
        c_program(exe, args, d, mode.regions(), timeout),
    )
}

/// A native run: (stdout, exit code, signal).
fn native(exe: &Path, args: &[&str]) -> (String, Option<i32>, Option<i32>) {
    let out = Command::new(exe).args(args).output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code(),
        out.status.signal(),
    )
}

/// The guest's end and output match a native run, untracked and with stack, heap and data
/// tracked (the replay oracle then accounts for every event).
fn as_natively(exe: &Path, args: &[&str], d: &TempDir) {
    let (want, code, signal) = native(exe, args);
    for mode in [Mode::Untracked, Mode::StackHeapData] {
        let run = guest(exe, args, d, mode, LIMIT);
        let o = &run.outcome;
        let end_ok = match (&o.end, code, signal) {
            (ProcessEnd::Exited(c), Some(n), _) => i32::from(*c) == n,
            (ProcessEnd::Signaled { signal: s, .. }, _, Some(n)) => i32::from(*s) == n,
            _ => false,
        };
        assert!(
            end_ok,
            "{args:?} {mode:?}: ended {:?}, natively code {code:?} signal {signal:?}; stderr {}",
            o.end,
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            want,
            "{args:?} {mode:?}: output differs from native"
        );
        if let Some(r) = &run.oracle {
            r.assert_holds(&format!("{args:?} {mode:?}"));
        }
    }
}

#[test]
fn clone_with_odd_flags_tls_and_tid_pointers_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-clone-odd");
    as_natively(&exe(&d), &["clone_odd"], &d);
}

/// `CLONE_PARENT_SETTID` words in tracked heap, data and stack: the VMM's stores land and
/// the oracle accounts for them.
#[test]
fn parent_settid_into_tracked_memory_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-settid");
    as_natively(&exe(&d), &["settid_tracked"], &d);
}

#[test]
fn clone_with_an_unmapped_child_stack_ends_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-badstack");
    as_natively(&exe(&d), &["badstack", "unmapped"], &d);
}

#[test]
fn clone_with_a_non_canonical_child_stack_ends_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-badstack-nc");
    as_natively(&exe(&d), &["badstack", "noncanon"], &d);
}

#[test]
fn clear_tid_in_read_only_memory_is_never_written_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-cleartid");
    as_natively(&exe(&d), &["cleartid_ro"], &d);
}

#[test]
fn clone3_with_bad_sizes_and_contents_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-clone3");
    as_natively(&exe(&d), &["clone3_bad"], &d);
}

#[test]
fn futex_with_bad_addresses_timeouts_and_ops_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-futex");
    as_natively(&exe(&d), &["futex_odd"], &d);
}

#[test]
fn futex_requeue_loops_and_huge_timeouts_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-requeue");
    let exe = exe(&d);
    as_natively(&exe, &["requeue_loop"], &d);
    as_natively(&exe, &["huge_timeout"], &d);
}

#[test]
fn tgkill_to_a_thread_in_a_futex_wait_and_per_thread_altstacks_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-tgkill");
    let exe = exe(&d);
    as_natively(&exe, &["tgkill_futex"], &d);
    as_natively(&exe, &["altstack"], &d);
}

#[test]
fn sigkill_raised_by_a_thread_ends_the_process_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-sigkill");
    as_natively(&exe(&d), &["raise_kill"], &d);
}

#[test]
fn munmap_of_a_running_threads_stack_faults_it_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-unmap-stack");
    as_natively(&exe(&d), &["unmap_stack"], &d);
}

/// One thread stores to tracked heap pages while another keeps changing their protection
/// (RWX and back; the neighbour read-only and back, splitting and merging the mapping). No
/// store may be lost, and the oracle accounts for every event.
#[test]
fn mprotect_racing_stores_to_tracked_memory_loses_nothing_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-mprotect");
    as_natively(&exe(&d), &["mprotect_race"], &d);
}

#[test]
fn a_thread_spinning_without_system_calls_meets_the_timeout() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-spin");
    let exe = exe(&d);
    for (what, mode) in [
        ("spin", Mode::Untracked),
        ("spin", Mode::StackHeapData),
        ("spin_store", Mode::StackHeapData),
    ] {
        let run = guest(&exe, &[what], &d, mode, Duration::from_secs(2));
        assert!(
            matches!(run.outcome.end, ProcessEnd::Timeout(_)),
            "{what} {mode:?}: {:?}",
            run.outcome.end
        );
    }
}

#[test]
fn exit_group_racing_clone_ends_with_its_status() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-exit-race");
    let exe = exe(&d);
    assert_eq!(native(&exe, &["exit_race"]).1, Some(5), "native");
    for mode in [Mode::Untracked, Mode::StackHeapData, Mode::Untracked] {
        let run = guest(&exe, &["exit_race"], &d, mode, LIMIT);
        assert_eq!(run.outcome.end, ProcessEnd::Exited(5), "{mode:?}");
        if let Some(r) = &run.oracle {
            r.assert_holds("exit_group racing clone");
        }
    }
}

/// Threads with 1 GiB and with 64 MiB stacks: creation stops with `EAGAIN` when the guest's
/// memory runs out (natively all 100 are made); the VMM neither fails nor crashes, and the
/// threads made run and are joined.
#[test]
fn huge_thread_stacks_fail_cleanly() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-big-stacks");
    let exe = exe(&d);
    for mib in ["1024", "64"] {
        let run = guest(&exe, &["big_stacks", mib], &d, Mode::Untracked, LIMIT);
        let out = String::from_utf8_lossy(&run.outcome.stdout);
        super::note(&format!("   {mib} MiB stacks: {}", out.trim()));
        assert_eq!(run.outcome.end, ProcessEnd::Exited(0), "{mib}: {out}");
        assert!(
            out.starts_with("big stacks: created ")
                && (out.ends_with(", then EAGAIN\n") || out.ends_with("created 100, then none\n")),
            "{mib}: {out}"
        );
    }
}

/// A thread waiting in `select` for a FIFO another thread writes.
#[test]
fn a_thread_in_select_lets_another_thread_write_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-select");
    let fifo = d.fifo("fifo");
    as_natively(&exe(&d), &["select_block", &fifo], &d);
}

/// A thread in `readv` of two iovecs from a FIFO another thread writes 4 bytes at a time:
/// each call returns what there is, and no byte is lost to a wait served again.
#[test]
fn a_thread_in_readv_gets_every_byte_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-readv-split");
    let fifo = d.fifo("fifo");
    as_natively(&exe(&d), &["readv_split", &fifo], &d);
}

/// A thread writing 1 MiB to a FIFO another thread reads: the writer waits for room.
#[test]
fn a_thread_writing_to_a_full_fifo_lets_the_reader_run_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-write-full");
    let fifo = d.fifo("fifo");
    as_natively(&exe(&d), &["write_full", &fifo], &d);
}

/// A thread waiting in `F_OFD_SETLKW` for a lock another thread of the program holds.
#[test]
fn a_thread_in_ofd_setlkw_lets_the_holder_unlock_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-ofd");
    let lock = d.join("lock");
    as_natively(&exe(&d), &["ofd_block", lock.to_str().unwrap()], &d);
}

/// `clock_nanosleep(TIMER_ABSTIME)` in a thread while another thread lives sleeps until the
/// time given (the thread checks the clock after it).
#[test]
fn an_absolute_sleep_in_a_thread_sleeps_until_then_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-abs-sleep");
    as_natively(&exe(&d), &["abs_sleep"], &d);
}

/// `sigwait` in one thread for the signal another thread sends it.
#[test]
fn sigwait_in_a_thread_gets_another_threads_signal_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-sigwait");
    as_natively(&exe(&d), &["sigwait_thread"], &d);
}

/// A signal for a thread blocked reading or polling a FIFO no one writes interrupts the call
/// (`EINTR` after the handler), as natively.
#[test]
fn a_signal_interrupts_a_thread_blocked_in_read_or_poll_as_natively() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-sig-read");
    let fifo = d.fifo("fifo");
    let exe = exe(&d);
    as_natively(&exe, &["sig_read", &fifo], &d);
    as_natively(&exe, &["sig_poll", &fifo], &d);
}

/// `execve` and `fork` from one thread while another runs fail with an error; the program
/// goes on and ends normally.
#[test]
fn execve_and_fork_from_a_thread_fail_cleanly() {
    let _kvm = kvm_or_skip!();
    let d = TempDir::new("r13-exec");
    let exe = exe(&d);
    let run = guest(&exe, &["exec_fork"], &d, Mode::Untracked, LIMIT);
    assert_eq!(run.outcome.end, ProcessEnd::Exited(0));
    assert_eq!(
        String::from_utf8_lossy(&run.outcome.stdout),
        "execve -1 err, fork failed err\n"
    );
}
