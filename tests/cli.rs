//! End-to-end tests of the `dirtyvm` binary: exit codes and messages for bad input, a real
//! `run` with progress lines and a JSON report, clean stops on SIGINT/SIGTERM, `probe` and
//! `--help`.
//!
//! Tests that boot a VM (or need `/dev/kvm` to get as far as the check they test) skip with a
//! message when `/dev/kvm` is missing; bad input caught while parsing needs no KVM.

mod common;

use common::{drain, KillOnDrop};

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::{self};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// No test waits longer than this for the binary; then it kills it and fails.
const TIMEOUT: Duration = Duration::from_secs(20);

/// The binary, with backtraces enabled so a panic could not hide.
fn dirtyvm() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dirtyvm"));
    command
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// A running `dirtyvm`, killed if the test lets go of it.
struct Running(KillOnDrop);

impl Running {
    fn spawn(args: &[&str]) -> Running {
        Running(KillOnDrop(
            dirtyvm().args(args).spawn().expect("spawning dirtyvm"),
        ))
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.0 .0.id() as i32)
    }

    /// Waits up to `timeout` for the child; kills it and fails the test if it does not exit.
    fn wait(&mut self, timeout: Duration, what: &str) -> ExitStatus {
        self.0.wait_timeout(timeout).unwrap_or_else(|| {
            panic!("dirtyvm did not exit within {timeout:?} ({what}); killed it")
        })
    }
}

/// Sends every stdout line as it arrives.
fn stream_lines(pipe: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// What a finished run printed.
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }

    fn describe(&self) -> String {
        format!(
            "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs the binary to the end (at most [`TIMEOUT`]).
fn run(args: &[&str]) -> Output {
    let mut child = Running::spawn(args);
    let stdout = drain(child.0 .0.stdout.take().expect("piped stdout"));
    let stderr = drain(child.0 .0.stderr.take().expect("piped stderr"));
    let status = child.wait(TIMEOUT, &args.join(" "));
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("dirtyvm-cli-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("creating the test's temp dir");
        TempDir(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn assert_no_panic(out: &Output) {
    for text in [&out.stdout, &out.stderr] {
        for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
            assert!(
                !text.contains(bad),
                "output mentions {bad:?}:\n{}",
                out.describe()
            );
        }
    }
}

/// `dirtyvm run ARGS` exits 2 with a message on stderr containing every one of `names`.
fn assert_bad_input(args: &[&str], names: &[&str]) {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    let out = run(&all);
    assert_eq!(
        out.code(),
        Some(2),
        "`dirtyvm {}` should exit 2 (bad input):\n{}",
        all.join(" "),
        out.describe()
    );
    assert!(
        !out.stderr.trim().is_empty(),
        "no message on stderr:\n{}",
        out.describe()
    );
    for name in names {
        assert!(
            out.stderr.contains(name),
            "the message should name {name:?}:\n{}",
            out.describe()
        );
    }
    assert_no_panic(&out);
}

// Bad input caught while parsing or laying out the guest: no KVM needed. Each also passes
// `--duration 1`, so a bad input that slipped through would still end the run.

#[test]
fn unknown_workload_kind_is_bad_input() {
    assert_bad_input(
        &["--workload", "scribble:1M", "--duration", "1"],
        &["scribble"],
    );
}

#[test]
fn bad_memory_size_is_bad_input() {
    assert_bad_input(
        &["--memory", "12Q", "--duration", "1"],
        &["12Q", "--memory"],
    );
}

#[test]
fn bad_workload_size_is_bad_input() {
    assert_bad_input(
        &["--workload", "write:12Q", "--duration", "1"],
        &["12Q", "--workload"],
    );
}

#[test]
fn working_sets_larger_than_memory_are_bad_input() {
    assert_bad_input(
        &[
            "--memory",
            "8M",
            "--workload",
            "write:8M",
            "--workload",
            "read:4K",
            "--duration",
            "1",
        ],
        &["--memory", "8M"],
    );
}

#[test]
fn more_workloads_than_vcpus_is_bad_input() {
    assert_bad_input(
        &[
            "--vcpus",
            "1",
            "--workload",
            "write:4K",
            "--workload",
            "read:4K",
            "--duration",
            "1",
        ],
        &["2 workloads", "1 vCPU"],
    );
}

#[test]
fn zero_vcpus_is_bad_input() {
    assert_bad_input(&["--vcpus", "0", "--duration", "1"], &["--vcpus"]);
}

#[test]
fn zero_duration_is_bad_input() {
    assert_bad_input(&["--duration", "0"], &["--duration", "'0'"]);
}

#[test]
fn negative_duration_is_bad_input() {
    // As typed, `-1` looks like an option to the parser; either way it must be named.
    assert_bad_input(&["--duration", "-1"], &["-1"]);
    assert_bad_input(&["--duration=-1"], &["--duration", "-1"]);
}

#[test]
fn non_numeric_duration_is_bad_input() {
    assert_bad_input(&["--duration", "abc"], &["--duration", "abc"]);
}

#[test]
fn unknown_option_is_bad_input() {
    assert_bad_input(&["--frobnicate", "--duration", "1"], &["--frobnicate"]);
}

#[test]
fn vcpus_above_the_host_limit_are_bad_input() {
    if !common::kvm_available("vcpus_above_the_host_limit_are_bad_input") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    // The host's KVM_CAP_MAX_VCPUS is 1024 here; the message names the count and a limit.
    assert_bad_input(
        &["--vcpus", "100000", "--duration", "1"],
        &["--vcpus", "100000", "1024"],
    );
}

/// One progress line: `TIMEs  VCPU  WORKLOAD  WRITTEN_MIBPS  READ_MIBPS`, maybe followed by
/// more numeric columns (rates of features added later).
#[derive(Debug, Clone, PartialEq)]
struct Progress {
    t: f64,
    vcpu: u32,
    workload: String,
    written_mibps: f64,
    read_mibps: f64,
}

fn parse_progress(line: &str) -> Option<Progress> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let [t, vcpu, workload, written, read, ref more @ ..] = tokens[..] else {
        return None;
    };
    if !more.iter().all(|m| m.parse::<f64>().is_ok()) {
        return None;
    }
    Some(Progress {
        t: t.strip_suffix('s')?.parse().ok()?,
        vcpu: vcpu.parse().ok()?,
        workload: workload.to_string(),
        written_mibps: written.parse().ok()?,
        read_mibps: read.parse().ok()?,
    })
}

fn read_report(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading the report {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("report is not JSON ({e}):\n{text}"))
}

fn u64_field(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("field {field} missing or not a count in {v}"))
}

/// Checks the report has every field DESIGN.md lists, with sensible types; returns `vcpus`.
fn check_report_shape(report: &Value, vcpus: usize) -> Vec<Value> {
    let duration = report["duration_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("duration_s missing: {report}"));
    assert!(duration > 0.0, "duration_s {duration}");
    let dirty_log = report["dirty_log"]
        .as_str()
        .unwrap_or_else(|| panic!("dirty_log missing: {report}"));
    assert!(
        ["ring", "bitmap", "none"].contains(&dirty_log),
        "dirty_log {dirty_log:?}"
    );
    if dirty_log == "ring" {
        assert!(
            report["ring_entries"].as_u64().is_some(),
            "ring tracking without ring_entries: {report}"
        );
    }
    let list = report["vcpus"]
        .as_array()
        .unwrap_or_else(|| panic!("vcpus missing: {report}"))
        .clone();
    assert_eq!(list.len(), vcpus, "one report entry per vCPU: {report}");
    for (i, v) in list.iter().enumerate() {
        assert_eq!(u64_field(v, "id"), i as u64, "vcpus are listed by id");
        assert!(v["workload"].is_string(), "workload missing: {v}");
        for field in [
            "pages_written",
            "pages_read",
            "dirty_pages_harvested",
            "ring_full_exits",
        ] {
            u64_field(v, field);
        }
        assert!(
            v["penalty_ms_total"].as_f64().is_some(),
            "penalty_ms_total missing: {v}"
        );
    }
    list
}

#[test]
fn run_prints_progress_and_writes_the_report() {
    if !common::kvm_available("run_prints_progress_and_writes_the_report") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    let dir = TempDir::new("run");
    let report_path = dir.join("r.json");
    let out = run(&[
        "run",
        "--vcpus",
        "2",
        "--memory",
        "256M",
        "--workload",
        "write:64M@16",
        "--workload",
        "read:64M",
        "--duration",
        "3",
        "--report",
        report_path.to_str().unwrap(),
    ]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_no_panic(&out);

    // Progress: one line per vCPU each second, over three seconds.
    let progress: Vec<Progress> = out.stdout.lines().filter_map(parse_progress).collect();
    for (id, workload) in [(0, "write:64M@16"), (1, "read:64M")] {
        let lines: Vec<&Progress> = progress.iter().filter(|p| p.vcpu == id).collect();
        assert!(
            (2..=4).contains(&lines.len()),
            "expected about 3 progress lines for vCPU {id}:\n{}",
            out.describe()
        );
        assert!(lines.iter().all(|p| p.workload == workload), "{lines:?}");
        assert!(
            lines.windows(2).all(|w| w[0].t < w[1].t),
            "progress times do not advance: {lines:?}"
        );
    }
    let writer = progress.iter().filter(|p| p.vcpu == 0);
    assert!(
        writer.clone().all(|p| p.read_mibps == 0.0)
            && writer.clone().any(|p| p.written_mibps > 0.0),
        "the writer's progress should show writes only:\n{}",
        out.describe()
    );
    let reader = progress.iter().filter(|p| p.vcpu == 1);
    assert!(
        reader.clone().all(|p| p.written_mibps == 0.0)
            && reader.clone().any(|p| p.read_mibps > 0.0),
        "the reader's progress should show reads only:\n{}",
        out.describe()
    );
    assert!(
        out.stdout.contains("stopped after"),
        "no summary:\n{}",
        out.describe()
    );

    let report = read_report(&report_path);
    let duration = report["duration_s"].as_f64().unwrap_or(0.0);
    assert!(
        (2.9..30.0).contains(&duration),
        "duration_s {duration} for --duration 3"
    );
    let vcpus = check_report_shape(&report, 2);
    assert_eq!(vcpus[0]["workload"], "write:64M@16");
    assert_eq!(vcpus[1]["workload"], "read:64M");
    assert!(u64_field(&vcpus[0], "pages_written") > 0, "{report}");
    assert_eq!(u64_field(&vcpus[0], "pages_read"), 0, "{report}");
    assert!(u64_field(&vcpus[1], "pages_read") > 0, "{report}");
    assert_eq!(u64_field(&vcpus[1], "pages_written"), 0, "{report}");
    // Both counts are read after the vCPUs stopped and the rings were flushed. The paced
    // writer does not lap its working set in 3 s, so every write is a first write: one page
    // harvested per write, plus at most the one whose counter the guest had not yet bumped
    // when its vCPU stopped (the guest CPU itself dirties no logged page: its page tables
    // and counters live in a slot that is not logged).
    let (written, harvested) = (
        u64_field(&vcpus[0], "pages_written"),
        u64_field(&vcpus[0], "dirty_pages_harvested"),
    );
    assert!(
        (written..=written + 1).contains(&harvested),
        "{harvested} pages harvested for {written} written: {report}"
    );
    assert_eq!(u64_field(&vcpus[1], "dirty_pages_harvested"), 0, "{report}");
    // The rates are the counts over the run.
    for v in &vcpus {
        for (rate, count) in [
            ("written_mibps", "pages_written"),
            ("read_mibps", "pages_read"),
        ] {
            let expected = u64_field(v, count) as f64 / 256.0 / duration;
            let got = v[rate].as_f64().unwrap_or(f64::NAN);
            assert!(
                (got - expected).abs() <= 1e-6 * expected.max(1.0),
                "{rate} {got} is not {count} over duration_s ({expected}): {v}"
            );
        }
    }
    // The writer kept its pace over the run (its first pages come a little after the start).
    let writer_rate = vcpus[0]["written_mibps"].as_f64().unwrap_or(0.0);
    assert!((14.0..=16.5).contains(&writer_rate), "{report}");
}

/// Runs without `--duration`, sends `signal` after the first progress line, and checks the
/// run ends with exit 0, a summary and the report.
fn stops_cleanly_on(signal: Signal) {
    let _vm = common::one_vm_at_a_time();
    let dir = TempDir::new(&format!("signal-{}", signal.as_str()));
    let report_path = dir.join("r.json");
    let mut child = Running::spawn(&[
        "run",
        "--vcpus",
        "2",
        "--memory",
        "16M",
        "--workload",
        "write:4M",
        "--workload",
        "read:4M",
        "--report",
        report_path.to_str().unwrap(),
    ]);
    let lines = stream_lines(child.0 .0.stdout.take().expect("piped stdout"));
    let stderr = drain(child.0 .0.stderr.take().expect("piped stderr"));

    let mut stdout = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let progress = parse_progress(&line).is_some();
                stdout.push(line);
                if progress {
                    break;
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                panic!("no progress line within {TIMEOUT:?}; stdout so far:\n{stdout:#?}")
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = child.wait(TIMEOUT, "after closing stdout");
                panic!(
                    "dirtyvm exited ({status:?}) before any progress line:\n{}\n{}",
                    stdout.join("\n"),
                    stderr.join().unwrap_or_default()
                );
            }
        }
    }

    kill(child.pid(), signal).expect("sending the signal");
    let sent = Instant::now();
    let status = child.wait(TIMEOUT, &format!("after {}", signal.as_str()));
    let took = sent.elapsed();
    stdout.extend(lines.iter());
    let out = Output {
        status,
        stdout: stdout.join("\n"),
        stderr: stderr.join().expect("stderr reader"),
    };
    eprintln!("dirtyvm exited {took:?} after {}", signal.as_str());
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_no_panic(&out);
    assert!(
        out.stdout.contains("stopped after"),
        "no summary after {}:\n{}",
        signal.as_str(),
        out.describe()
    );
    assert!(
        out.stdout.contains(signal.as_str()),
        "the summary should say the run stopped on {}:\n{}",
        signal.as_str(),
        out.describe()
    );
    let report = read_report(&report_path);
    let vcpus = check_report_shape(&report, 2);
    assert!(u64_field(&vcpus[0], "pages_written") > 0, "{report}");
    assert!(u64_field(&vcpus[1], "pages_read") > 0, "{report}");
}

#[test]
fn sigint_stops_the_run_and_writes_the_report() {
    if !common::kvm_available("sigint_stops_the_run_and_writes_the_report") {
        return;
    }
    stops_cleanly_on(Signal::SIGINT);
}

#[test]
fn sigterm_stops_the_run_and_writes_the_report() {
    if !common::kvm_available("sigterm_stops_the_run_and_writes_the_report") {
        return;
    }
    stops_cleanly_on(Signal::SIGTERM);
}

#[test]
fn probe_prints_host_facts() {
    if !common::kvm_available("probe_prints_host_facts") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    let out = run(&["probe"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_no_panic(&out);
    for fact in ["API version", "12", "dirty ring"] {
        assert!(
            out.stdout.contains(fact),
            "probe should mention {fact:?}:\n{}",
            out.describe()
        );
    }
}

#[test]
fn probe_json_has_api_version_and_dirty_ring_facts() {
    if !common::kvm_available("probe_json_has_api_version_and_dirty_ring_facts") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    let out = run(&["probe", "--json"]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_no_panic(&out);
    let facts: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("probe --json is not JSON ({e}):\n{}", out.describe()));
    assert_eq!(facts["api_version"], 12, "{facts}");
    assert!(facts["max_vcpus"].as_u64().unwrap_or(0) >= 1, "{facts}");
    let ring = facts["dirty_log_ring_max_bytes"]
        .as_i64()
        .unwrap_or_else(|| panic!("dirty_log_ring_max_bytes missing: {facts}"));
    let acq_rel = facts["dirty_log_ring_acq_rel_max_bytes"]
        .as_i64()
        .unwrap_or_else(|| panic!("dirty_log_ring_acq_rel_max_bytes missing: {facts}"));
    let entries = facts["dirty_log_ring_max_entries"]
        .as_i64()
        .unwrap_or_else(|| panic!("dirty_log_ring_max_entries missing: {facts}"));
    // A dirty-ring entry (struct kvm_dirty_gfn) is 16 bytes.
    assert_eq!(entries, ring.max(acq_rel) / 16, "{facts}");
    assert!(
        facts["dirty_log_ring_with_bitmap"].is_boolean(),
        "dirty_log_ring_with_bitmap missing: {facts}"
    );
    assert!(
        facts["manual_dirty_log_protect2_flags"].is_i64(),
        "manual_dirty_log_protect2_flags missing: {facts}"
    );
    assert!(facts["sched_fifo"].is_string(), "{facts}");
    assert!(
        facts["guest_instructions_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0,
        "{facts}"
    );
}

fn assert_help_mentions_the_workload_grammar(args: &[&str]) {
    let out = run(args);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_no_panic(&out);
    for part in [
        "write:SIZE",
        "random-write:SIZE",
        "read:SIZE",
        "idle",
        "MIBPS",
    ] {
        assert!(
            out.stdout.contains(part),
            "`dirtyvm {}` should describe the workload grammar ({part:?} missing):\n{}",
            args.join(" "),
            out.describe()
        );
    }
}

#[test]
fn help_mentions_the_workload_grammar() {
    assert_help_mentions_the_workload_grammar(&["--help"]);
}

#[test]
fn run_help_mentions_the_workload_grammar() {
    assert_help_mentions_the_workload_grammar(&["run", "--help"]);
}

/// `dirtyvm ARGS` (any command) exits 2 at once, before a VM boots, naming every one of
/// `names`.
fn assert_refused(args: &[&str], names: &[&str]) {
    let out = run(args);
    assert_eq!(
        out.code(),
        Some(2),
        "`dirtyvm {}` should exit 2 (bad input):\n{}",
        args.join(" "),
        out.describe()
    );
    for name in names {
        assert!(
            out.stderr.contains(name),
            "the message should name {name:?}:\n{}",
            out.describe()
        );
    }
    assert!(
        !out.stdout.contains("vCPUs,") && !out.stdout.contains("dirtyvm demo:"),
        "refused only after the VM booted:\n{}",
        out.describe()
    );
    assert_eq!(
        out.stderr.matches("error:").count(),
        1,
        "one error, said once:\n{}",
        out.describe()
    );
    assert_no_panic(&out);
}

#[test]
fn negative_numbers_name_their_option() {
    for (option, value) in [
        ("--vcpus", "-1"),
        ("--memory", "-1"),
        ("--dirty-limit", "-1"),
        ("--ring-entries", "-1024"),
        ("--sample-pages", "-5"),
        ("--duration", "-3"),
    ] {
        let mut args = vec!["run", option, value];
        if option == "--sample-pages" {
            args.extend(["--calc-dirty-rate", "page-sampling"]);
        }
        let out = run(&args);
        assert_eq!(out.code(), Some(2), "{option} {value}:\n{}", out.describe());
        assert!(
            out.stderr.contains(option) && out.stderr.contains(value),
            "{option} {value}: the message should name both:\n{}",
            out.describe()
        );
        assert!(
            !out.stderr.contains("unexpected argument"),
            "{}",
            out.describe()
        );
    }
}

#[test]
fn limits_and_paces_outside_their_range_are_refused() {
    assert_refused(
        &["run", "--dirty-limit", "1e-20"],
        &["--dirty-limit", "1e-20", "1"],
    );
    assert_refused(&["run", "--dirty-limit", "0.5"], &["--dirty-limit", "0.5"]);
    assert_refused(
        &["run", "--vcpu-dirty-limit", "0=1e-20"],
        &["--vcpu-dirty-limit", "1e-20"],
    );
    assert_refused(
        &["run", "--dirty-limit", "2e6"],
        &["--dirty-limit", "1048576"],
    );
    assert_refused(
        &["run", "--workload", "write:64M@1e-13"],
        &["--workload", "1e-13", "0.01"],
    );
    assert_refused(&["demo", "--limit", "1e-20"], &["--limit", "1e-20"]);
}

#[test]
fn working_sets_that_overflow_or_are_empty_are_refused() {
    assert_refused(
        &[
            "run",
            "--memory",
            "64M",
            "--workload",
            "write:8589934592G",
            "--workload",
            "write:8589934592G",
        ],
        &["8589934592G + 8589934592G", "--memory is 64M"],
    );
    assert_refused(
        &["demo", "--writer", "8589934592G", "--reader", "8589934592G"],
        &["--writer 8589934592G", "--reader 8589934592G"],
    );
    // `run` refuses write:0; so does the demo.
    assert_refused(&["demo", "--writer", "0"], &["--writer", "'0'"]);
    assert_refused(&["demo", "--reader", "0"], &["--reader", "'0'"]);
}

#[test]
fn writers_larger_than_the_host_memory_are_refused() {
    if !common::kvm_available("writers_larger_than_the_host_memory_are_refused") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    // More than this host has (24 GiB): the kernel would kill dirtyvm without a word.
    assert_refused(
        &[
            "run",
            "--memory",
            "64G",
            "--workload",
            "write:60G",
            "--duration",
            "5",
        ],
        &["60G", "available"],
    );
    // Guest memory beyond the host is fine while the writers fit: it is reserved lazily.
    let out = run(&[
        "run",
        "--memory",
        "64G",
        "--workload",
        "write:4M",
        "--duration",
        "0.5",
    ]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
}

#[test]
fn options_that_would_be_ignored_are_refused() {
    assert_refused(
        &[
            "run",
            "--calc-dirty-rate",
            "dirty-ring:5000",
            "--duration",
            "3",
        ],
        &["--calc-dirty-rate", "5000", "--duration"],
    );
    assert_refused(&["run", "--sample-pages", "0"], &["--sample-pages"]);
    assert_refused(
        &[
            "run",
            "--calc-dirty-rate",
            "dirty-ring",
            "--sample-pages",
            "1024",
        ],
        &["--sample-pages", "page-sampling"],
    );
    assert_refused(
        &[
            "run",
            "--vcpu-dirty-limit",
            "0=10",
            "--vcpu-dirty-limit",
            "0=20",
        ],
        &["--vcpu-dirty-limit 0", "twice"],
    );
}

#[test]
fn bad_report_and_plot_paths_are_refused_before_the_run() {
    let dir = TempDir::new("bad-paths");
    let missing = dir.join("missing/r.json");
    let trailing = format!("{}/", dir.join("r.json").display());
    let directory = dir.0.to_str().unwrap().to_string();
    for (path, reason) in [
        (missing.to_str().unwrap(), "No such file"),
        (trailing.as_str(), "ending in '/'"),
        (directory.as_str(), "is a directory"),
        ("/sys/r.json", "cannot create a file"),
    ] {
        assert_refused(
            &["run", "--report", path, "--duration", "30"],
            &["--report", path, reason],
        );
    }
    assert_refused(
        &["demo", "--plot", missing.to_str().unwrap()],
        &["--plot", "No such file"],
    );
    assert_refused(
        &["demo", "--report", directory.as_str()],
        &["--report", "is a directory"],
    );
    let left: Vec<_> = std::fs::read_dir(&dir.0).unwrap().collect();
    assert!(left.is_empty(), "stray files left: {left:?}");
}

#[test]
fn bad_qmp_paths_are_refused_before_the_run() {
    let dir = TempDir::new("bad-qmp");
    let long = dir.join(&"s".repeat(120));
    let file = dir.join("file");
    std::fs::write(&file, "keep").unwrap();
    let listening = dir.join("live.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&listening).unwrap();
    let directory = dir.0.to_str().unwrap().to_string();
    for (path, reason) in [
        (long.to_str().unwrap(), "at most 107"),
        (
            dir.join("missing/q.sock")
                .to_str()
                .unwrap()
                .to_string()
                .leak() as &str,
            "No such file",
        ),
        (file.to_str().unwrap(), "not a socket"),
        (directory.as_str(), "not a socket"),
        (listening.to_str().unwrap(), "another process listens there"),
    ] {
        assert_refused(
            &["run", "--qmp", path, "--duration", "30"],
            &["--qmp", reason],
        );
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
}

/// The stdout a run gets, and what it must survive.
fn report_survives_stdout(stdout: Stdio, what: &str) {
    let _vm = common::one_vm_at_a_time();
    let dir = TempDir::new(what);
    let report = dir.join("r.json");
    let mut child = dirtyvm()
        .args([
            "run",
            "--memory",
            "16M",
            "--workload",
            "write:4M",
            "--duration",
            "2",
            "--report",
            report.to_str().unwrap(),
        ])
        .stdout(stdout)
        .spawn()
        .expect("spawning dirtyvm");
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let mut child = KillOnDrop(child);
    let status = child
        .wait_timeout(TIMEOUT)
        .unwrap_or_else(|| panic!("{what}: dirtyvm did not exit"));
    let stderr = stderr.join().unwrap();
    assert_eq!(status.code(), Some(0), "{what}: {status:?}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{what}:\n{stderr}");
    let report = read_report(&report);
    assert!(
        u64_field(&report["vcpus"][0], "pages_written") > 0,
        "{report}"
    );
}

#[test]
fn a_full_disk_on_stdout_loses_no_report() {
    if !common::kvm_available("a_full_disk_on_stdout_loses_no_report") {
        return;
    }
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    report_survives_stdout(Stdio::from(full), "dev-full");
}

#[test]
fn a_closed_pipe_on_stdout_loses_no_report() {
    if !common::kvm_available("a_closed_pipe_on_stdout_loses_no_report") {
        return;
    }
    // A pipe whose reader is gone, as after `| head -1`.
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    report_survives_stdout(Stdio::from(writer), "closed-pipe");
}

/// A one-second run with a writer that writes its report to `path`; it must succeed.
fn short_run_reporting_to(path: &Path) {
    let out = run(&[
        "run",
        "--memory",
        "16M",
        "--workload",
        "write:4M",
        "--duration",
        "1",
        "--report",
        path.to_str().unwrap(),
    ]);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
}

#[test]
fn the_report_goes_through_fifos_and_symlinks_and_replaces_neither() {
    if !common::kvm_available("the_report_goes_through_fifos_and_symlinks_and_replaces_neither") {
        return;
    }
    let _vm = common::one_vm_at_a_time();
    let dir = TempDir::new("report-kinds");
    // A FIFO with a reader gets the report and stays a FIFO.
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let reader = {
        let fifo = fifo.clone();
        thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
    };
    short_run_reporting_to(&fifo);
    let json: Value = serde_json::from_str(&reader.join().unwrap()).unwrap();
    check_report_shape(&json, 2);
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    // A symlink stays one; the file it names gets the report. A PATH.tmp that exists, and
    // is itself a symlink, is left alone.
    let target = dir.join("target.json");
    std::fs::write(&target, "old").unwrap();
    let link = dir.join("r.json");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let victim = dir.join("victim");
    std::fs::write(&victim, "keep").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("r.json.tmp")).unwrap();
    short_run_reporting_to(&link);
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    check_report_shape(&read_report(&target), 2);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    let mut names: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["fifo", "r.json", "r.json.tmp", "target.json", "victim"]
    );
}

#[test]
fn sighup_stops_the_run_and_writes_the_report() {
    if !common::kvm_available("sighup_stops_the_run_and_writes_the_report") {
        return;
    }
    stops_cleanly_on(Signal::SIGHUP);
}

/// `--incoming` addresses that cannot be listened on are refused before anything runs.
#[test]
fn bad_incoming_addresses_are_bad_input() {
    let dir = TempDir::new("incoming");
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let missing = dir.join("no-such-dir").join("m.sock");
    let [dir_uri, fifo_uri, missing_uri] =
        [&dir.0, &fifo, &missing].map(|p| format!("unix:{}", p.display()));
    assert_bad_input(
        &["--incoming", "foo:bar"],
        &["--incoming", "unknown migration protocol: foo:bar"],
    );
    assert_bad_input(
        &["--incoming", "tcp:0:99999"],
        &["error parsing port in address '0:99999'"],
    );
    assert_bad_input(
        &["--incoming", "tcp:nohostport"],
        &["error parsing address 'nohostport'"],
    );
    assert_bad_input(
        &["--incoming", &missing_uri],
        &["--incoming", "no-such-dir"],
    );
    assert_bad_input(&["--incoming", &dir_uri], &["--incoming", "not a socket"]);
    assert_bad_input(&["--incoming", &fifo_uri], &["--incoming", "not a socket"]);
    assert_bad_input(&["--incoming", "defer"], &["--incoming defer", "--qmp"]);
    // Nothing was touched.
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
}

/// A destination stopped while it waits for its source: exit 0, says so, and writes a
/// report with the migration that never came.
#[test]
fn sigterm_while_waiting_for_the_source_stops_cleanly() {
    let dir = TempDir::new("incoming-wait");
    let socket = dir.join("m.sock");
    let report = dir.join("report.json");
    let uri = format!("unix:{}", socket.display());
    let mut child = Running::spawn(&[
        "run",
        "--incoming",
        &uri,
        "--report",
        report.to_str().unwrap(),
    ]);
    let stdout = drain(child.0 .0.stdout.take().expect("piped stdout"));
    let stderr = drain(child.0 .0.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + TIMEOUT;
    while !std::fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()) {
        assert!(Instant::now() < deadline, "the destination never listened");
        thread::sleep(Duration::from_millis(10));
    }
    kill(child.pid(), Signal::SIGTERM).unwrap();
    let status = child.wait(TIMEOUT, "SIGTERM while waiting");
    let out = Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_no_panic(&out);
    assert!(
        out.stdout
            .contains("stopped before a guest arrived (SIGTERM received)"),
        "{}",
        out.describe()
    );
    assert!(!socket.exists(), "the migration socket was left behind");
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(written["migration"]["role"], "destination");
    assert_eq!(written["migration"]["status"], "setup");
    assert!(written.get("vcpus").is_none());
}
