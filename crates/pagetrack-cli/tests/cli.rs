//! The `pagetrack` binary, run as a user or a script would: guests assembled here with
//! iced-x86, written to a temporary directory, run with `pagetrack run`; the JSON Lines
//! contract checked field by field, exit statuses, every bad input, `demo` and `caps`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use iced_x86::code_asm::*;
use pagetrack_testkit::{assemble, assemble16, exit_with, kvm_or_skip};
use serde_json::Value;

/// Where `pagetrack run` loads images by default.
const LOAD: u64 = 0x1000;
/// vCPU 0's initial RSP with the default 64 MiB (the layout's `R`); vCPU n's is 0x10000 lower.
const STACK_TOP_64M: u64 = 0x3fe_0000;

/// A directory of its own under the system temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "pagetrack-cli-test-{}-{n}-{test}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create the temporary directory");
        TempDir(dir)
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).expect("write a temporary file");
        p
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pagetrack(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pagetrack"))
        .args(args)
        .output()
        .expect("start the pagetrack binary")
}

fn run_image(image: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["run", image.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    pagetrack(args.as_slice())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("utf-8 output")
}

/// The JSON lines of standard output (every line must parse).
fn json_lines(out: &Output) -> Vec<Value> {
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

fn writes(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|l| l["type"] == "write").collect()
}

fn status(out: &Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

/// Asserts status 2 with exactly one line on stderr, an `error:` line, and no panic.
#[track_caller]
fn assert_usage_error(out: &Output, mentions: &str) {
    let err = text(&out.stderr);
    assert_eq!(status(out), 2, "status of {err:?}");
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err:?}");
    assert!(err.starts_with("error:"), "{err:?}");
    assert!(!err.contains("panicked"), "{err:?}");
    assert!(
        err.contains(mentions),
        "{err:?} should mention {mentions:?}"
    );
}

/// Checks the closing lines: an exit line then a summary line, last, consistent with the writes.
#[track_caller]
fn assert_closing(lines: &[Value], reason: &str, code: Option<u64>) {
    let n = lines.len();
    assert!(n >= 2, "at least exit and summary: {lines:?}");
    let exit = &lines[n - 2];
    let summary = &lines[n - 1];
    assert_eq!(exit["type"], "exit");
    assert_eq!(exit["reason"], reason, "{exit}");
    match code {
        Some(c) => assert_eq!(exit["code"], c),
        None => assert!(exit["code"].is_null(), "{exit}"),
    }
    assert!(exit["detail"].is_string());
    assert_eq!(summary["type"], "summary");
    let ws = writes(lines);
    assert_eq!(
        ws.len(),
        n - 2,
        "only write lines come before exit and summary"
    );
    assert_eq!(summary["tracked_writes"], ws.len() as u64);
    let bytes: u64 = ws.iter().map(|w| w["len"].as_u64().expect("len")).sum();
    assert_eq!(summary["tracked_bytes"], bytes);
    assert!(summary["exits"].as_u64().is_some());
    assert!(summary["slot_changes"].as_u64().is_some());
    assert!(summary["elapsed_ms"].as_f64().is_some_and(|ms| ms >= 0.0));
    let keys = |v: &Value| v.as_object().expect("object").len();
    assert_eq!(keys(exit), 4, "{exit}");
    assert_eq!(keys(summary), 6, "{summary}");
}

#[test]
fn run_events_follow_the_json_contract_field_by_field() {
    let _kvm = kvm_or_skip!();
    let dir = TempDir::new("contract");
    let image = dir.file(
        "guest.bin",
        &assemble(LOAD, |a| {
            a.mov(byte_ptr(0x5000), 0x11)?; // 1 byte into tracked frame 5
            a.mov(dword_ptr(0x5010), 0x4433_2211)?; // 4 bytes, memory order 11 22 33 44
            a.mov(rax, 0x8877_6655_4433_2211_u64)?;
            a.mov(qword_ptr(0x5ffc), rax)?; // straddles into untracked frame 6: 4 bytes reported
            a.mov(byte_ptr(0x6000), 0x55)?; // untracked: no event
            a.mov(byte_ptr(0x7000), 0x77)?; // tracked by the ADDR form
            a.mov(byte_ptr(0x5000), 0x22)?; // again: old 11, new 22
            exit_with(a, 7)
        }),
    );
    let events = dir.path("events.jsonl");
    let out = run_image(
        &image,
        &[
            "--track",
            "0x5000+0x1000",
            "--track",
            "0x7000",
            "--events",
            events.to_str().unwrap(),
        ],
    );
    assert_eq!(status(&out), 0, "stderr: {}", text(&out.stderr));

    let raw = std::fs::read_to_string(&events).unwrap();
    let first = raw.lines().next().unwrap();
    assert_eq!(
        first,
        r#"{"type":"write","seq":1,"source":"vcpu","vcpu":0,"gpa":"0x5000","len":1,"old":"00","new":"11"}"#
    );
    let lines: Vec<Value> = raw
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ws = writes(&lines);
    let got: Vec<(u64, &str, u64, &str, &str)> = ws
        .iter()
        .map(|w| {
            (
                w["seq"].as_u64().unwrap(),
                w["gpa"].as_str().unwrap(),
                w["len"].as_u64().unwrap(),
                w["old"].as_str().unwrap(),
                w["new"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "0x5000", 1, "00", "11"),
            (2, "0x5010", 4, "00000000", "11223344"),
            (3, "0x5ffc", 4, "00000000", "11223344"),
            (4, "0x7000", 1, "00", "77"),
            (5, "0x5000", 1, "11", "22"),
        ]
    );
    for w in &ws {
        assert_eq!(w["source"], "vcpu");
        assert_eq!(w["vcpu"], 0);
        assert_eq!(w.as_object().unwrap().len(), 8, "{w}");
    }
    assert_closing(&lines, "debug-exit", Some(7));
    let summary = lines.last().unwrap();
    assert_eq!(summary["tracked_writes"], 5);
    assert_eq!(summary["tracked_bytes"], 11);
    assert!(
        summary["exits"].as_u64().unwrap() >= 6,
        "five trapped stores and the exit"
    );
    assert!(
        summary["slot_changes"].as_u64().unwrap() > 0,
        "tracking re-cuts a memslot"
    );
    // With a file, standard output still has the human view.
    assert!(text(&out.stdout).contains("first writer"));
}

#[test]
fn run_events_to_stdout_are_the_only_output() {
    let _kvm = kvm_or_skip!();
    let dir = TempDir::new("stdout");
    let image = dir.file(
        "guest.bin",
        &assemble(LOAD, |a| {
            a.mov(qword_ptr(0x9000), 0x0102_0304)?; // 8-byte store of a sign-extended imm32
            exit_with(a, 0)
        }),
    );
    let out = run_image(&image, &["--track", "0x9000", "--events", "-"]);
    assert_eq!(status(&out), 0, "stderr: {}", text(&out.stderr));
    let lines = json_lines(&out);
    let ws = writes(&lines);
    assert_eq!(ws.len(), 1);
    assert_eq!(ws[0]["gpa"], "0x9000");
    assert_eq!(ws[0]["len"], 8);
    assert_eq!(ws[0]["new"], "0403020100000000");
    assert_eq!(ws[0]["old"], "0000000000000000");
    assert_closing(&lines, "debug-exit", Some(0));
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}

#[test]
fn track_range_forms_cover_exactly_the_touched_frames() {
    let _kvm = kvm_or_skip!();
    let dir = TempDir::new("ranges");
    let image = dir.file(
        "guest.bin",
        &assemble(LOAD, |a| {
            for addr in [0x8000u64, 0x9fff, 0xa000, 0xafff, 0xb000, 0xc000, 0xd123] {
                a.mov(byte_ptr(addr), 0xee)?; // one byte at each address
            }
            exit_with(a, 0)
        }),
    );
    // 0x8ff0+0x20 touches frames 8 and 9; 0xa000-0xb000 is frame 0xa only (END exclusive);
    // 0xd123 (ADDR) is frame 0xd. Frames 0xb and 0xc stay untracked.
    let out = run_image(
        &image,
        &[
            "--track",
            "0x8ff0+0x20",
            "--track",
            "40960-45056",
            "--track",
            "0xd123",
            "--events",
            "-",
        ],
    );
    assert_eq!(status(&out), 0, "stderr: {}", text(&out.stderr));
    let lines = json_lines(&out);
    let gpas: Vec<&str> = writes(&lines)
        .iter()
        .map(|w| w["gpa"].as_str().unwrap())
        .collect();
    assert_eq!(gpas, vec!["0x8000", "0x9fff", "0xa000", "0xafff", "0xd123"]);
    assert_closing(&lines, "debug-exit", Some(0));
}

#[test]
fn run_without_events_prints_the_frame_table_and_summary() {
    let _kvm = kvm_or_skip!();
    let dir = TempDir::new("table");
    let image = dir.file(
        "guest.bin",
        &assemble(LOAD, |a| {
            a.mov(byte_ptr(0x5000), 1)?; // tracked frame 5
            a.mov(byte_ptr(0x5001), 2)?; // tracked frame 5
            exit_with(a, 3)
        }),
    );
    let out = run_image(&image, &["--track", "0x5000-0x7000"]);
    assert_eq!(status(&out), 0, "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for expected in [
        "frame",
        "writes",
        "bytes",
        "first writer",
        "last writer",
        "summary",
        "debug-exit, code 3",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing in {stdout}"
        );
    }
    let row = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("0x5000 "))
        .unwrap_or_else(|| panic!("no row for frame 0x5000 in {stdout}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols, vec!["0x5000", "2", "2", "vcpu", "0", "vcpu", "0"]);
    assert!(
        stdout.contains("0x6000"),
        "the unwritten tracked frame is listed too"
    );
}

#[test]
fn real_mode_guest_ends_by_hlt_with_status_0() {
    let _kvm = kvm_or_skip!();
    let dir = TempDir::new("real");
    let image = dir.file(
        "guest.bin",
        &assemble16(LOAD, |a| {
            a.mov(byte_ptr(0x5000), 0x42)?; // DS = 0: guest-physical 0x5000
            a.hlt() // ends the run in real mode
        }),
    );
    let out = run_image(
        &image,
        &["--mode", "real", "--track", "0x5000", "--events", "-"],
    );
    assert_eq!(status(&out), 0, "stderr: {}", text(&out.stderr));
    let lines = json_lines(&out);
    let ws = writes(&lines);
    assert_eq!(ws.len(), 1);
    assert_eq!(ws[0]["gpa"], "0x5000");
    assert_eq!(ws[0]["new"], "42");
    assert_closing(&lines, "hlt", None);
}

#[test]
fn guest_exception_is_a_run_error_naming_vector_and_rip() {
    let _kvm = kvm_or_skip!();
    let dir = TempDir::new("ud2");
    let image = dir.file(
        "guest.bin",
        &assemble(LOAD, |a| {
            a.nop()?; // 0x1000
            a.ud2() // 0x1001: #UD
        }),
    );
    let out = run_image(&image, &["--events", "-"]);
    assert_eq!(status(&out), 1);
    let lines = json_lines(&out);
    assert_closing(&lines, "error", None);
    let detail = lines[lines.len() - 2]["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        detail.contains("#UD") && detail.contains("vector 6"),
        "{detail}"
    );
    assert!(detail.contains("rip 0x1001"), "{detail}");
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error:") && err.contains("#UD"), "{err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn page_fault_detail_names_the_error_code() {
    let _kvm = kvm_or_skip!();
    let dir = TempDir::new("pf");
    let image = dir.file(
        "guest.bin",
        &assemble(LOAD, |a| {
            a.mov(rax, 0x1_0000_0000_u64)?; // above the 4 GiB identity map
            a.mov(byte_ptr(rax), 1)?; // #PF
            exit_with(a, 0)
        }),
    );
    let out = run_image(&image, &["--events", "-"]);
    assert_eq!(status(&out), 1);
    let lines = json_lines(&out);
    assert_closing(&lines, "error", None);
    let detail = lines[lines.len() - 2]["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        detail.contains("#PF") && detail.contains("error code"),
        "{detail}"
    );
}

#[test]
fn endless_guest_times_out_with_status_1() {
    let _kvm = kvm_or_skip!();
    let dir = TempDir::new("timeout");
    let image = dir.file(
        "guest.bin",
        &assemble(LOAD, |a| {
            let mut spin = a.create_label();
            a.set_label(&mut spin)?;
            a.jmp(spin) // forever, without exits
        }),
    );
    let out = run_image(&image, &["--timeout", "1", "--events", "-"]);
    assert_eq!(status(&out), 1);
    let lines = json_lines(&out);
    assert_closing(&lines, "timeout", None);
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn exit_limit_ends_the_run_with_status_1() {
    let _kvm = kvm_or_skip!();
    let dir = TempDir::new("maxexits");
    let image = dir.file(
        "guest.bin",
        &assemble(LOAD, |a| {
            let mut again = a.create_label();
            a.set_label(&mut again)?;
            a.out(0x80, al)?; // one exit each
            a.mov(byte_ptr(0x5000), al)?; // one trapped store each
            a.jmp(again)
        }),
    );
    let out = run_image(
        &image,
        &[
            "--max-exits",
            "50",
            "--track",
            "0x5000",
            "--timeout",
            "30",
            "--events",
            "-",
        ],
    );
    assert_eq!(status(&out), 1, "stderr: {}", text(&out.stderr));
    let lines = json_lines(&out);
    assert_closing(&lines, "error", None);
    let detail = lines[lines.len() - 2]["detail"].as_str().unwrap();
    assert!(detail.contains("exit limit"), "{detail}");
    assert_eq!(
        lines.last().unwrap()["exits"].as_u64().unwrap(),
        50,
        "the limit is exact"
    );
}

#[test]
fn exit_limit_of_one_stops_after_exactly_one_exit() {
    let _kvm = kvm_or_skip!();
    let dir = TempDir::new("maxexits1");
    let image = dir.file(
        "guest.bin",
        &assemble(LOAD, |a| {
            let mut again = a.create_label();
            a.set_label(&mut again)?;
            a.mov(byte_ptr(0x5000), al)?; // one trapped store each
            a.inc(al)?;
            a.jmp(again)
        }),
    );
    let out = run_image(
        &image,
        &[
            "--max-exits",
            "1",
            "--track",
            "0x5000",
            "--timeout",
            "30",
            "--events",
            "-",
        ],
    );
    assert_eq!(status(&out), 1, "stderr: {}", text(&out.stderr));
    let lines = json_lines(&out);
    let detail = lines[lines.len() - 2]["detail"].as_str().unwrap();
    assert!(detail.contains("exit limit"), "{detail}");
    assert_eq!(lines.last().unwrap()["exits"].as_u64().unwrap(), 1);
    let writes = lines.iter().filter(|l| l["type"] == "write").count();
    assert_eq!(writes, 1, "one exit, one trapped store: {lines:?}");
}

#[test]
fn two_vcpus_report_their_own_writes() {
    let _kvm = kvm_or_skip!();
    let dir = TempDir::new("vcpus");
    let image = dir.file(
        "guest.bin",
        &assemble(LOAD, |a| {
            a.mov(rax, STACK_TOP_64M)?;
            a.sub(rax, rsp)?;
            a.shr(rax, 16)?; // rax = vCPU index (each vCPU's stack is 64 KiB lower)
            a.lea(ecx, dword_ptr(rax + 0x10))?; // cl = 0x10 + index
            a.mov(byte_ptr(rax + 0x5000), cl)?; // tracked: 0x5000 + index
            a.lock().inc(qword_ptr(0x6000))?; // untracked counter of vCPUs done
            let mut wait = a.create_label();
            a.test(rax, rax)?;
            a.jz(wait)?; // vCPU 0 waits for the other, then ends the run
            let mut spin = a.create_label();
            a.set_label(&mut spin)?;
            a.pause()?;
            a.jmp(spin)?; // other vCPUs spin until stopped
            a.set_label(&mut wait)?;
            a.pause()?;
            a.cmp(qword_ptr(0x6000), 2)?;
            a.jne(wait)?;
            exit_with(a, 0)
        }),
    );
    let out = run_image(
        &image,
        &[
            "--vcpus",
            "2",
            "--track",
            "0x5000",
            "--timeout",
            "30",
            "--events",
            "-",
        ],
    );
    assert_eq!(status(&out), 0, "stderr: {}", text(&out.stderr));
    let lines = json_lines(&out);
    let mut got: Vec<(u64, &str, &str)> = writes(&lines)
        .iter()
        .map(|w| {
            (
                w["vcpu"].as_u64().unwrap(),
                w["gpa"].as_str().unwrap(),
                w["new"].as_str().unwrap(),
            )
        })
        .collect();
    got.sort_unstable();
    assert_eq!(got, vec![(0, "0x5000", "10"), (1, "0x5001", "11")]);
    let seqs: Vec<u64> = writes(&lines)
        .iter()
        .map(|w| w["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2]);
    assert_closing(&lines, "debug-exit", Some(0));
}

#[test]
fn bad_inputs_are_usage_errors_on_one_line() {
    // None of these reach KVM: they need no /dev/kvm.
    let dir = TempDir::new("usage");
    let good = dir.file("good.bin", &[0xf4]);
    let empty = dir.file("empty.bin", &[]);
    let big = dir.file("big.bin", &vec![0x90; 2 << 20]);
    let over_tables = dir.file("over.bin", &vec![0x90; 0xe_0000]);
    let good = good.to_str().unwrap();
    let missing = dir.path("missing.bin");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", missing.to_str().unwrap()], "missing.bin"),
        (vec!["run", empty.to_str().unwrap()], "empty"),
        (
            vec!["run", big.to_str().unwrap(), "--mem", "1M"],
            "larger than RAM",
        ),
        (
            vec!["run", good, "--mem", "1M", "--load", "0x100000"],
            "does not fit",
        ),
        (
            vec!["run", over_tables.to_str().unwrap(), "--mem", "1M"],
            "overlaps",
        ),
        (vec!["run", good, "--load", "0x3fd8000"], "overlaps"),
        (vec!["run", good, "--track", "0x4000000"], "outside RAM"),
        (
            vec!["run", good, "--track", "0x3fff000+0x2000"],
            "outside RAM",
        ),
        (vec!["run", good, "--mem", "512K"], "too small"),
        (vec!["run", good, "--mem", "1048577"], "multiple of 4K"),
        (vec!["run", good, "--mem", "100G"], "too large"),
        (
            vec!["run", good, "--vcpus", "64", "--mem", "2M"],
            "stacks of 64 vCPUs",
        ),
        (vec!["run", dir.0.to_str().unwrap()], "cannot read image"),
        (vec!["run", good, "--mem", "12Q"], "--mem"),
        (vec!["run", good, "--mem", "0x"], "--mem"),
        (vec!["run", good, "--load", "0xzz"], "--load"),
        (vec!["run", good, "--track", "0x5000+abc"], "--track"),
        (vec!["run", good, "--track", "0x6000-0x5000"], "--track"),
        (vec!["run", good, "--track", "0x5000+0"], "--track"),
        (vec!["run", good, "--vcpus", "0"], "--vcpus"),
        (vec!["run", good, "--vcpus", "65"], "--vcpus"),
        (vec!["run", good, "--timeout", "soon"], "--timeout"),
        (vec!["run", good, "--timeout", "0"], "--timeout"),
        (vec!["run", good, "--max-exits", "-1"], "--max-exits"),
        (vec!["run", good, "--mode", "protected"], "--mode"),
        (
            vec!["run", good, "--mode", "real", "--load", "0x10000"],
            "--load",
        ),
        (vec!["run", good, "--events", ""], "--events"),
        (vec!["run", good, "--bogus"], "--bogus"),
        (vec!["run"], "IMAGE"),
        (vec!["frobnicate"], "frobnicate"),
    ];
    for (args, mentions) in cases {
        let out = pagetrack(&args);
        assert!(
            out.stdout.is_empty(),
            "{args:?} printed {}",
            text(&out.stdout)
        );
        assert_usage_error(&out, mentions);
    }
}

#[test]
fn unwritable_events_file_is_a_usage_error() {
    let _kvm = kvm_or_skip!();
    let dir = TempDir::new("eventsfile");
    let image = dir.file("guest.bin", &assemble(LOAD, |a| exit_with(a, 0)));
    let target = dir.path("no/such/dir/events.jsonl");
    let out = run_image(&image, &["--events", target.to_str().unwrap()]);
    assert_usage_error(&out, "events file");
}

#[test]
fn help_documents_the_layout_and_exit_statuses() {
    let out = pagetrack(&["run", "--help"]);
    assert_eq!(status(&out), 0);
    let help = text(&out.stdout);
    for expected in [
        "PML4",
        "GDT",
        "IDT",
        "TSS",
        "0x3fe0000",
        "0xf4",
        "Exit status",
        "\"vcpu\":null",
        "--track",
    ] {
        assert!(
            help.contains(expected),
            "{expected:?} missing from run --help"
        );
    }
    let out = pagetrack(&["--help"]);
    assert_eq!(status(&out), 0);
    assert!(text(&out.stdout).contains("Exit status"));
    let out = pagetrack(&[]);
    assert_eq!(status(&out), 2, "no subcommand is a usage error");
}

#[test]
fn demo_exits_0_and_explains_its_table() {
    let _kvm = kvm_or_skip!();
    let out = pagetrack(&["demo"]);
    assert_eq!(status(&out), 0, "stderr: {}", text(&out.stderr));
    // Paragraphs wrap anywhere: compare with the whitespace collapsed.
    let stdout = text(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for expected in [
        "frame",
        "first writer",
        "0x200000",
        "0x203000",
        "device",
        "What happened",
        "What it cost",
        "All 32,837 expected events arrived",
        "The same guest with the table relaxed",
        "the table ends equal to the strict run's",
        "gives its final contents",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing in {stdout}"
        );
    }
}

#[test]
fn demo_events_include_device_writes_with_null_vcpu() {
    let _kvm = kvm_or_skip!();
    let dir = TempDir::new("demo");
    let events = dir.path("demo.jsonl");
    let out = pagetrack(&["demo", "--events", events.to_str().unwrap()]);
    assert_eq!(status(&out), 0, "stderr: {}", text(&out.stderr));
    let lines: Vec<Value> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_closing(&lines, "debug-exit", Some(0));
    let ws = writes(&lines);
    for (i, w) in ws.iter().enumerate() {
        assert_eq!(w["seq"], i as u64 + 1, "seq counts from 1 without gaps");
        let gpa =
            u64::from_str_radix(w["gpa"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
        assert!((0x20_0000..0x20_4000).contains(&gpa), "{w}");
        let len = w["len"].as_u64().unwrap();
        assert_eq!(w["new"].as_str().unwrap().len() as u64, 2 * len);
        assert_eq!(w["old"].as_str().unwrap().len() as u64, 2 * len);
    }
    let device: Vec<&&Value> = ws.iter().filter(|w| w["source"] == "device").collect();
    assert_eq!(device.len(), 2);
    assert!(device.iter().all(|w| w["vcpu"].is_null() && w["len"] == 16));
    assert_eq!(device[0]["gpa"], "0x202ff0");
    assert_eq!(device[1]["gpa"], "0x203000");
    assert_eq!(device[0]["new"], "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf");
    // The straddling store: only its tracked half, bytes 11 22 33 44 at the table's last 4.
    assert!(
        ws.iter()
            .any(|w| w["gpa"] == "0x203ffc" && w["len"] == 4 && w["new"] == "11223344")
    );
    // The rep stosq elements into the second frame: one event each.
    let stos = ws.iter().filter(|w| w["new"] == "534f5453534f5453").count();
    assert_eq!(stos, 64);
}

#[test]
fn caps_exits_0_in_text_and_json() {
    let _kvm = kvm_or_skip!();
    let out = pagetrack(&["caps"]);
    assert_eq!(status(&out), 0, "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for expected in [
        "virtualization:",
        "paging:",
        "read-only memslots:",
        "SLOT_ZAP_ALL",
        "dirty ring:",
        "manual protect:",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing in {stdout}"
        );
    }
    let out = pagetrack(&["caps", "--json"]);
    assert_eq!(status(&out), 0);
    let caps: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(caps["readonly_memslots"].is_boolean());
    assert!(caps["memslots"].as_u64().is_some());
    assert!(["software", "hardware"].contains(&caps["virtualization"].as_str().unwrap()));
    assert!(["shadow", "tdp"].contains(&caps["paging"].as_str().unwrap()));
    assert!(caps["slot_zap_all_disableable"].is_boolean());
    assert!(caps["manual_dirty_protect"].as_u64().is_some());
}

/// `pagetrack exec` runs an unmodified static program: its stdout and exit status pass
/// through, and the event stream ends with the exit, summary and process lines.
#[test]
fn exec_busybox_passes_output_and_status_through() {
    let _kvm = pagetrack_testkit::kvm_or_skip!();
    assert!(
        std::path::Path::new("/bin/busybox").exists(),
        "busybox-static is missing: run ./scripts/test, which installs it"
    );
    let events = std::env::temp_dir().join(format!("pt-exec-{}.jsonl", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pagetrack"))
        .args(["exec", "--track", "stack", "--events"])
        .arg(&events)
        .args(["--", "/bin/busybox", "sh", "-c", "echo hi; exit 3"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert_eq!(out.status.code(), Some(3));
    let text = std::fs::read_to_string(&events).unwrap();
    let _ = std::fs::remove_file(&events);
    let kinds: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(
        kinds.iter().filter(|k| *k == "write").count() > 0,
        "stack writes reported"
    );
    assert_eq!(&kinds[kinds.len() - 3..], ["exit", "summary", "process"]);
}

/// `pagetrack exec` refuses at once, with status 2 and one clear line, a root that would
/// expose procfs and a PROGRAM `execve` would refuse (no execute permission, a device, a
/// FIFO: nothing is read from them and nothing blocks).
#[test]
fn exec_refuses_proc_roots_and_unexecutable_programs() {
    let _kvm = pagetrack_testkit::kvm_or_skip!();
    assert!(
        Path::new("/bin/busybox").exists(),
        "busybox-static is missing: run ./scripts/test, which installs it"
    );
    let dir = TempDir::new("exec-refused");
    let noexec = dir.file(
        "noexec",
        &std::fs::read("/bin/busybox").expect("read busybox"),
    );
    let fifo = dir.path("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo")
            .success()
    );
    let d = dir.0.to_str().expect("utf-8");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--dir", "/", "--", "/bin/busybox", "true"], "procfs"),
        (
            vec![
                "--dir",
                d,
                "--allow-write",
                "/proc",
                "--",
                "/bin/busybox",
                "true",
            ],
            "procfs",
        ),
        (
            vec!["--", noexec.to_str().expect("utf-8"), "true"],
            "no execute permission",
        ),
        (vec!["--", "/dev/zero"], "not a regular file"),
        (
            vec!["--", fifo.to_str().expect("utf-8")],
            "not a regular file",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["exec"];
        all.extend_from_slice(&args);
        let out = pagetrack(&all);
        let err = text(&out.stderr);
        assert_eq!(status(&out), 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
}

/// An image whose `p_memsz` exceeds `--mem` is refused at once (status 2, the sizes said);
/// one that fits runs.
#[test]
fn exec_huge_bss_is_bounded_by_mem() {
    let _kvm = pagetrack_testkit::kvm_or_skip!();
    assert!(
        Path::new("/bin/busybox").exists(),
        "busybox-static is missing: run ./scripts/test, which installs it"
    );
    let dir = TempDir::new("exec-bss");
    let make = |name: &str, mem_size: u64| {
        let p = dir.file(
            name,
            &pagetrack_testkit::static_elf64(&pagetrack_testkit::EXIT0_CODE, mem_size),
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    };
    let huge = make("huge", 1 << 40);
    let out = pagetrack(&["exec", "--", huge.to_str().expect("utf-8")]);
    let err = text(&out.stderr);
    assert_eq!(status(&out), 2, "{err}");
    assert!(err.contains("MiB") && err.contains("--mem"), "{err}");
    // 3 GiB of bss in 4 GiB of guest memory fits and runs.
    let fits = make("fits", 3 << 30);
    let out = pagetrack(&["exec", "--mem", "4G", "--", fits.to_str().expect("utf-8")]);
    assert_eq!(status(&out), 0, "{}", text(&out.stderr));
    let out = pagetrack(&["exec", "--mem", "2G", "--", fits.to_str().expect("utf-8")]);
    assert_eq!(status(&out), 2, "{}", text(&out.stderr));
}

/// `pagetrack exec --timeout` is a timeout whether the program computes, sleeps or waits for
/// input: status 124 (as timeout(1)), said on standard error, and the exit line's reason is
/// "timeout" with code 124.
#[test]
fn exec_timeout_is_124_whether_computing_sleeping_or_waiting() {
    let _kvm = pagetrack_testkit::kvm_or_skip!();
    assert!(
        Path::new("/bin/busybox").exists(),
        "busybox-static is missing: run ./scripts/test, which installs it"
    );
    let dir = TempDir::new("exec-timeout");
    for (name, cmd) in [
        ("sleep", vec!["sleep", "30"]),
        ("spin", vec!["sh", "-c", "while :; do :; done"]),
        ("stdin", vec!["cat"]),
    ] {
        let events = dir.path(&format!("{name}.jsonl"));
        let mut c = Command::new(env!("CARGO_BIN_EXE_pagetrack"));
        c.args(["exec", "--timeout", "0.5", "--events"])
            .arg(&events)
            .args(["--", "/bin/busybox"])
            .args(&cmd)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().expect("start pagetrack");
        // Standard input stays open (and empty) until pagetrack is done: `cat` waits on it.
        let stdin = child.stdin.take();
        let out = child.wait_with_output().expect("wait for pagetrack");
        drop(stdin);
        let err = text(&out.stderr);
        assert_eq!(status(&out), 124, "{name}: {err}");
        assert!(err.contains("timeout"), "{name}: {err}");
        let lines: Vec<Value> = std::fs::read_to_string(&events)
            .expect("events")
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON"))
            .collect();
        let exit = lines
            .iter()
            .find(|l| l["type"] == "exit")
            .expect("an exit line");
        assert_eq!(exit["reason"], "timeout", "{name}");
        assert_eq!(exit["code"], 124, "{name}");
    }
}

#[test]
fn exec_writer_into_a_closed_pipe_dies_of_sigpipe_as_natively() {
    let _kvm = pagetrack_testkit::kvm_or_skip!();
    assert!(
        std::path::Path::new("/bin/busybox").exists(),
        "busybox-static is missing: run ./scripts/test, which installs it"
    );
    // `pagetrack exec -- busybox yes | head -n 1`: once the reader is gone, the writer gets
    // SIGPIPE, status 141 (it was 1, from an EPIPE `yes` reported itself).
    let mut child = Command::new(env!("CARGO_BIN_EXE_pagetrack"))
        .args(["exec", "--", "/bin/busybox", "yes"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    assert_eq!(first, "y\n");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(141), "{out:?}");
    assert!(text(&out.stderr).contains("SIGPIPE"), "{out:?}");
}

/// `pagetrack run` keeps tracked page tables coherent (issue 10 item 8): the guest remaps a
/// 2 MiB page by storing to its page directory, which is tracked, and must see the new
/// mapping as it does untracked (on shadow-paging hosts KVM's shadow of the directory went
/// stale: the guest kept reading the old page, exit code 1).
#[test]
fn run_remaps_through_a_tracked_page_directory() {
    let _kvm = kvm_or_skip!();
    // --mem 64M: R = 0x3fe0000; the first page directory is at R + 0x2000. Entry 3 maps VA
    // 0x600000.
    const PDE3: u64 = 0x3fe_2000 + 3 * 8;
    let dir = TempDir::new("pde");
    let image = dir.file(
        "guest.bin",
        &assemble(LOAD, |a| {
            let mut fail = a.create_label();
            a.mov(rax, 0xaaaa_u64)?;
            a.mov(qword_ptr(0x60_0000), rax)?;
            a.mov(rax, 0xbbbb_u64)?;
            a.mov(qword_ptr(0x80_0000), rax)?;
            a.mov(rax, qword_ptr(0x60_0000))?; // through the old mapping
            a.mov(rbx, 0x80_0000_u64 | 0xe7)?; // P W U A D PS: VA 0x600000 -> 0x800000
            a.mov(rcx, PDE3)?;
            a.mov(qword_ptr(rcx), rbx)?;
            a.mov(rax, qword_ptr(0x60_0000))?; // must be the new page
            a.cmp(rax, 0xbbbb)?;
            a.jne(fail)?;
            exit_with(a, 0)?;
            a.set_label(&mut fail)?;
            exit_with(a, 1)
        }),
    );
    for track in [None, Some("0x3fe2000")] {
        let mut extra = vec!["--events", "-"];
        if let Some(t) = track {
            extra.extend_from_slice(&["--track", t]);
        }
        let out = run_image(&image, &extra);
        assert_eq!(
            status(&out),
            0,
            "tracked {track:?}: stderr {}",
            text(&out.stderr)
        );
        let lines = json_lines(&out);
        assert_closing(&lines, "debug-exit", Some(0));
        let ws = writes(&lines);
        if track.is_some() {
            assert_eq!(ws.len(), 1, "the PDE store is reported");
            assert_eq!(ws[0]["gpa"], format!("{PDE3:#x}"));
        } else {
            assert!(ws.is_empty());
        }
    }
}

/// As above, through a page directory the guest installs itself on a tracked frame: the
/// store that points the tracked PDPT entry at it marks it (one level down), so a later
/// remap through it is seen (without that: the guest read the old page, exit code 1).
#[test]
fn run_remaps_through_a_page_directory_the_guest_installs() {
    let _kvm = kvm_or_skip!();
    const PDPT: u64 = 0x3fe_1000;
    const PD0: u64 = 0x3fe_2000;
    const NEW_PD: u64 = 0x9_0000;
    let dir = TempDir::new("newpd");
    let image = dir.file(
        "guest.bin",
        &assemble(LOAD, |a| {
            let mut stale = a.create_label();
            let mut wrong = a.create_label();
            a.mov(rax, 0xaaaa_u64)?;
            a.mov(qword_ptr(0x60_0000), rax)?;
            a.mov(rax, 0xbbbb_u64)?;
            a.mov(qword_ptr(0x80_0000), rax)?;
            a.mov(rsi, PD0)?;
            a.mov(rdi, NEW_PD)?;
            a.mov(ecx, 512)?;
            a.rep().movsq()?; // a copy of the first page directory
            a.mov(rbx, NEW_PD | 0x67)?;
            a.mov(rcx, PDPT)?;
            a.mov(qword_ptr(rcx), rbx)?; // PDPT entry 0 -> the copy
            a.mov(rax, qword_ptr(0x60_0000))?; // through it
            a.cmp(rax, 0xaaaa)?;
            a.jne(wrong)?;
            a.mov(rbx, 0x80_0000_u64 | 0xe7)?;
            a.mov(rcx, NEW_PD + 3 * 8)?;
            a.mov(qword_ptr(rcx), rbx)?; // its PDE 3 -> 0x800000
            a.mov(rax, qword_ptr(0x60_0000))?;
            a.cmp(rax, 0xbbbb)?;
            a.jne(stale)?;
            exit_with(a, 0)?;
            a.set_label(&mut stale)?;
            exit_with(a, 1)?;
            a.set_label(&mut wrong)?;
            exit_with(a, 2)
        }),
    );
    for tracked in [false, true] {
        let mut extra = vec!["--events", "-"];
        if tracked {
            extra.extend_from_slice(&["--track", "0x3fe1000", "--track", "0x90000"]);
        }
        let out = run_image(&image, &extra);
        let lines = json_lines(&out);
        let exit = lines.iter().find(|l| l["type"] == "exit");
        assert_eq!(
            exit.map(|l| l["code"].clone()),
            Some(Value::from(0)),
            "tracked {tracked}: {exit:?} (1: the old mapping)"
        );
        assert_closing(&lines, "debug-exit", Some(0));
        assert_eq!(writes(&lines).len(), if tracked { 514 } else { 0 });
    }
}

/// The contract's guest, as [`run_events_follow_the_json_contract_field_by_field`] runs it.
fn contract_guest(dir: &TempDir) -> PathBuf {
    dir.file(
        "guest.bin",
        &assemble(LOAD, |a| {
            a.mov(byte_ptr(0x5000), 0x11)?;
            a.mov(dword_ptr(0x5010), 0x4433_2211)?;
            a.mov(rax, 0x8877_6655_4433_2211_u64)?;
            a.mov(qword_ptr(0x5ffc), rax)?;
            a.mov(byte_ptr(0x6000), 0x55)?;
            a.mov(byte_ptr(0x7000), 0x77)?;
            a.mov(byte_ptr(0x5000), 0x22)?;
            exit_with(a, 7)
        }),
    )
}

#[test]
fn run_relaxed_always_marks_coalesced_events_that_replay_to_the_final_bytes() {
    let _kvm = kvm_or_skip!();
    let dir = TempDir::new("relaxed");
    let image = contract_guest(&dir);
    let events = dir.path("events.jsonl");
    let out = run_image(
        &image,
        &[
            "--track",
            "0x5000+0x1000",
            "--track",
            "0x7000",
            "--relaxed",
            "always",
            "--events",
            events.to_str().unwrap(),
        ],
    );
    assert_eq!(status(&out), 0, "stderr: {}", text(&out.stderr));
    let lines: Vec<Value> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ws = writes(&lines);
    assert!(!ws.is_empty());
    // Replay on the initial zeros of frames 5 and 7 (frame 6 untracked).
    let mut mem = vec![0u8; 0x3000];
    for w in &ws {
        assert_eq!(w["coalesced"], true, "{w}");
        assert!(w["epoch"].as_u64().unwrap() >= 1, "{w}");
        assert_eq!(w["source"], "guest");
        assert!(w["vcpu"].is_null());
        assert_eq!(w.as_object().unwrap().len(), 10, "{w}");
        let gpa =
            u64::from_str_radix(w["gpa"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let (old, new) = (
            hex(w["old"].as_str().unwrap()),
            hex(w["new"].as_str().unwrap()),
        );
        let at = usize::try_from(gpa - 0x5000).unwrap();
        assert_eq!(&mem[at..at + old.len()], &old[..], "old bytes chain: {w}");
        mem[at..at + new.len()].copy_from_slice(&new);
    }
    let mut want = vec![0u8; 0x3000];
    want[0] = 0x22;
    want[0x10..0x14].copy_from_slice(&[0x11, 0x22, 0x33, 0x44]);
    want[0xffc..0x1000].copy_from_slice(&[0x11, 0x22, 0x33, 0x44]);
    want[0x2000] = 0x77;
    assert_eq!(&mem[..0x1000], &want[..0x1000], "frame 5 replays");
    assert_eq!(mem[0x2000], 0x77, "frame 7 replays");
    let exit = &lines[lines.len() - 2];
    assert_eq!(
        (exit["type"].as_str(), exit["code"].as_u64()),
        (Some("exit"), Some(7))
    );
    let summary = lines.last().unwrap();
    // The contract's summary keys, then the two relaxed-mode counts.
    assert_eq!(summary.as_object().unwrap().len(), 8, "{summary}");
    assert_eq!(summary["relaxed_frames"], 2);
    assert_eq!(summary["coalesced_writes"], summary["tracked_writes"]);
}

#[test]
fn run_exact_and_relaxed_off_give_the_default_stream() {
    let _kvm = kvm_or_skip!();
    let dir = TempDir::new("exact");
    let image = contract_guest(&dir);
    let mut streams = Vec::new();
    for extra in [&[][..], &["--exact"][..], &["--relaxed", "off"][..]] {
        let events = dir.path("events.jsonl");
        let mut args = vec!["--track", "0x5000+0x1000", "--track", "0x7000"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--events", events.to_str().unwrap()]);
        let out = run_image(&image, &args);
        assert_eq!(status(&out), 0, "stderr: {}", text(&out.stderr));
        let raw = std::fs::read_to_string(&events).unwrap();
        // Every line but the summary's wall time is byte for byte the same.
        let lines: Vec<String> = raw
            .lines()
            .map(|l| l.split(",\"elapsed_ms\"").next().unwrap().to_owned())
            .collect();
        assert!(!raw.contains("coalesced"));
        streams.push(lines);
    }
    assert_eq!(streams[0], streams[1]);
    assert_eq!(streams[0], streams[2]);
    assert_usage_error(
        &pagetrack(&["run", "x.bin", "--exact", "--relaxed", "always"]),
        "--exact",
    );
}

/// `--dirty-ring`: strict lines are byte for byte the default stream's (only the summary
/// names the harvester), coalesced lines end with the first writer, a bad size is a usage
/// error.
#[test]
fn run_with_a_dirty_ring_keeps_strict_lines_and_names_first_writers() {
    let _kvm = kvm_or_skip!();
    let dir = TempDir::new("ring");
    let image = contract_guest(&dir);
    let events = dir.path("events.jsonl");
    let stream = |extra: &[&str]| -> Vec<String> {
        let mut args = vec!["--track", "0x5000+0x1000", "--track", "0x7000"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--events", events.to_str().unwrap()]);
        let out = run_image(&image, &args);
        assert_eq!(status(&out), 0, "stderr: {}", text(&out.stderr));
        std::fs::read_to_string(&events)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let plain = stream(&[]);
    let ring = stream(&["--dirty-ring", "256"]);
    assert_eq!(plain.len(), ring.len());
    let n = plain.len();
    assert_eq!(plain[..n - 1], ring[..n - 1], "strict lines changed");
    let summary: Value = serde_json::from_str(&ring[n - 1]).unwrap();
    assert!(
        summary["dirty_harvester"]
            .as_str()
            .is_some_and(|h| h.starts_with("ring")),
        "{summary}"
    );
    let relaxed = stream(&["--dirty-ring", "256", "--relaxed", "always"]);
    let lines: Vec<Value> = relaxed
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ws = writes(&lines);
    assert!(!ws.is_empty());
    for (w, raw) in ws.iter().zip(&relaxed) {
        assert_eq!(w["coalesced"], true, "{w}");
        assert_eq!(w["first_writer"], 0, "{w}");
        assert!(raw.ends_with(r#","first_writer":0}"#), "{raw}");
        assert_eq!(w.as_object().unwrap().len(), 11, "{w}");
    }
    for bad in ["100", "128"] {
        assert_usage_error(
            &pagetrack(&["run", image.to_str().unwrap(), "--dirty-ring", bad]),
            "dirty ring",
        );
    }
}

#[test]
fn exec_busybox_relaxed_always_and_auto_match_native_output() {
    let _kvm = kvm_or_skip!();
    assert!(
        Path::new("/bin/busybox").exists(),
        "busybox-static is missing: run ./scripts/test, which installs it"
    );
    let dir = TempDir::new("exec-relaxed");
    let text_in: String = (0..20_000)
        .map(|i| format!("{} line {i}\n", (i * 7919) % 10_007))
        .collect();
    let input = dir.file("in.txt", text_in.as_bytes());
    let input = input.to_str().unwrap();
    let native = Command::new("/bin/busybox")
        .args(["sort", "-n", input])
        .output()
        .unwrap();
    assert!(native.status.success());
    // The last run harvests from the dirty ring (single vCPU: every coalesced line names it).
    for (mode, ring) in [("always", None), ("auto", None), ("auto", Some("1024"))] {
        let events = dir.path("ev.jsonl");
        let mut args = vec!["exec", "--relaxed", mode];
        if let Some(entries) = ring {
            args.extend_from_slice(&["--dirty-ring", entries]);
        }
        args.extend_from_slice(&[
            "--track",
            "writable",
            "--events",
            events.to_str().unwrap(),
            "--",
            "/bin/busybox",
            "sort",
            "-n",
            input,
        ]);
        let out = pagetrack(&args);
        assert_eq!(status(&out), 0, "{mode}: stderr {}", text(&out.stderr));
        assert!(
            out.stdout == native.stdout,
            "{mode}: output differs from native"
        );
        let raw = std::fs::read_to_string(&events).unwrap();
        let summary: Value = raw
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|v| v["type"] == "summary")
            .unwrap();
        assert!(
            summary["relaxed_frames"].as_u64().unwrap() > 0,
            "{mode}: {summary}"
        );
        assert!(
            summary["coalesced_writes"].as_u64().unwrap() > 0,
            "{mode}: {summary}"
        );
        let coalesced: Vec<Value> = raw
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|v| v["coalesced"] == true)
            .collect();
        if ring.is_some() {
            assert!(
                summary["dirty_harvester"]
                    .as_str()
                    .unwrap()
                    .starts_with("ring")
            );
            assert!(coalesced.iter().all(|w| w["first_writer"] == 0));
        } else {
            assert!(summary.get("dirty_harvester").is_none(), "{summary}");
            assert!(coalesced.iter().all(|w| w.get("first_writer").is_none()));
        }
    }
}
