//! A QMP client and a `dirtyvm run --qmp` process for the tests that speak QMP.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread::{sleep, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::{drain, KillOnDrop};

/// How long a reply may take before the test fails.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the binary may take to boot the VM and listen.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the binary may take to exit after `quit`.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// A fresh directory under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(test: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("dirtyvm-test-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("creating the test's temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a finished process printed.
pub struct Exited {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Exited {
    pub fn describe(&self) -> String {
        format!(
            "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Waits for `child` (killing it and failing after `timeout`) and collects its output.
pub fn finish(
    child: &mut KillOnDrop,
    out: JoinHandle<String>,
    err: JoinHandle<String>,
    timeout: Duration,
    what: &str,
) -> Exited {
    let status = child.wait_timeout(timeout);
    let Some(status) = status else {
        let _ = child.0.kill();
        let status = child.0.wait().expect("reaping a killed child");
        let out = out.join().unwrap_or_default();
        let err = err.join().unwrap_or_default();
        panic!(
            "{what} did not exit within {timeout:?}; killed it ({status:?})\n--- stdout ---\n\
             {out}\n--- stderr ---\n{err}"
        );
    };
    Exited {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// A running `dirtyvm run ... --qmp DIR/qmp.sock`, killed when dropped.
pub struct Vm {
    pub child: KillOnDrop,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
    pub socket: PathBuf,
    pub dir: TempDir,
}

impl Vm {
    /// Runs `dirtyvm` with `args` and `--qmp` in a fresh directory, and waits until the
    /// socket is there.
    pub fn start(test: &str, args: &[&str]) -> Vm {
        Vm::start_in(TempDir::new(test), args)
    }

    /// [`Vm::start`] in `dir`.
    pub fn start_in(dir: TempDir, args: &[&str]) -> Vm {
        let socket = dir.0.join("qmp.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_dirtyvm"))
            .args(args)
            .arg("--qmp")
            .arg(&socket)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning dirtyvm");
        let stdout = drain(child.stdout.take().expect("piped stdout"));
        let stderr = drain(child.stderr.take().expect("piped stderr"));
        let mut vm = Vm {
            child: KillOnDrop(child),
            stdout: Some(stdout),
            stderr: Some(stderr),
            socket,
            dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !is_socket(&vm.socket) {
            if let Ok(Some(_)) = vm.child.0.try_wait() {
                let exited = vm.exit(Duration::ZERO);
                panic!("dirtyvm exited before serving QMP:\n{}", exited.describe());
            }
            assert!(
                Instant::now() < deadline,
                "dirtyvm did not create {} within {START_TIMEOUT:?}",
                vm.socket.display()
            );
            sleep(Duration::from_millis(10));
        }
        vm
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// A new client, negotiated.
    pub fn client(&self) -> Qmp {
        Qmp::open(&self.socket)
    }

    /// Waits for the process to end (failing after `timeout`) and collects its output.
    pub fn exit(&mut self, timeout: Duration) -> Exited {
        let out = self.stdout.take().expect("exit is called once");
        let err = self.stderr.take().expect("exit is called once");
        finish(&mut self.child, out, err, timeout, "dirtyvm")
    }
}

pub fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// A raw QMP client: requests out as JSON lines, replies and events in, one per line.
pub struct Qmp {
    pub reader: BufReader<UnixStream>,
    pub writer: UnixStream,
    /// Events read while waiting for replies, oldest first.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects without reading the greeting.
    pub fn connect(path: &Path) -> Qmp {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", path.display()));
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .expect("setting a read timeout");
        stream
            .set_write_timeout(Some(REPLY_TIMEOUT))
            .expect("setting a write timeout");
        Qmp {
            writer: stream.try_clone().expect("cloning the stream"),
            reader: BufReader::new(stream),
            events: Vec::new(),
        }
    }

    /// Connects, checks the greeting and negotiates capabilities.
    pub fn open(path: &Path) -> Qmp {
        let mut qmp = Qmp::connect(path);
        let greeting = qmp.message();
        check_greeting(&greeting);
        assert_eq!(qmp.ok("qmp_capabilities", Value::Null), json!({}));
        qmp
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("sending to the server");
    }

    pub fn send_json(&mut self, request: &Value) {
        self.send(format!("{request}\r\n").as_bytes());
    }

    /// The next line as sent (with its terminator), or `None` at the end of the stream.
    #[track_caller]
    pub fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(line),
            Err(e) => panic!("no complete line from the server within {REPLY_TIMEOUT:?}: {e}"),
        }
    }

    /// The next message, reply or event: one JSON object on a line ending in CRLF.
    #[track_caller]
    pub fn message(&mut self) -> Value {
        let line = self
            .line()
            .expect("the server closed the connection instead of answering");
        assert!(line.ends_with("\r\n"), "not CRLF-terminated: {line:?}");
        let message: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the server sent a line that is not JSON ({e}): {line:?}"));
        assert!(message.is_object(), "not a JSON object: {line:?}");
        message
    }

    /// The next reply; events before it are kept in [`Qmp::events`].
    pub fn reply(&mut self) -> Value {
        loop {
            let message = self.message();
            if message.get("event").is_none() {
                return message;
            }
            self.events.push(message);
        }
    }

    pub fn request(&mut self, request: &Value) -> Value {
        self.send_json(request);
        self.reply()
    }

    /// `{"execute": name, "arguments": args}`; `Value::Null` sends no arguments.
    pub fn execute(&mut self, name: &str, args: Value) -> Value {
        let mut request = json!({ "execute": name });
        if !args.is_null() {
            request["arguments"] = args;
        }
        self.request(&request)
    }

    /// The command's `return`; fails the test on an error reply.
    #[track_caller]
    pub fn ok(&mut self, name: &str, args: Value) -> Value {
        let reply = self.execute(name, args.clone());
        match reply.get("return") {
            Some(value) if reply.as_object().is_some_and(|r| r.len() == 1) => value.clone(),
            _ => panic!("{name} {args} failed: {reply}"),
        }
    }

    /// Asserts the command fails with exactly `{"error": {"class": class, "desc": desc}}`.
    #[track_caller]
    pub fn fails(&mut self, name: &str, args: Value, class: &str, desc: &str) {
        let reply = self.execute(name, args.clone());
        assert_eq!(
            reply,
            json!({"error": {"class": class, "desc": desc}}),
            "{name} {args}"
        );
    }

    /// Asserts a `GenericError` with exactly `desc`.
    #[track_caller]
    pub fn generic(&mut self, name: &str, args: Value, desc: &str) {
        self.fails(name, args, "GenericError", desc);
    }
}

#[track_caller]
pub fn check_greeting(greeting: &Value) {
    let object = greeting.as_object().expect("the greeting is an object");
    assert_eq!(object.len(), 1, "the greeting has only \"QMP\": {greeting}");
    let qmp = &greeting["QMP"];
    assert!(
        qmp["capabilities"].is_array(),
        "greeting without capabilities: {greeting}"
    );
    // What standard clients parse: version.qemu.{major, minor, micro} and a package string.
    for part in ["major", "minor", "micro"] {
        assert!(
            qmp["version"]["qemu"][part].is_u64(),
            "greeting without version.qemu.{part}: {greeting}"
        );
    }
    assert!(
        qmp["version"]["package"].is_string(),
        "greeting without version.package: {greeting}"
    );
    // The release whose schema dirtyvm answers with (at least 8.1, for `dirty-limit`).
    assert_eq!(
        qmp["version"]["qemu"],
        json!({"major": 8, "minor": 2, "micro": 0}),
        "{greeting}"
    );
}

/// Checks `message` is the event `name` stamped with the host's clock; returns its data.
#[track_caller]
pub fn check_event(message: &Value, name: &str) -> Value {
    assert_eq!(
        message["event"], name,
        "expected the {name} event: {message}"
    );
    let seconds = message["timestamp"]["seconds"]
        .as_u64()
        .unwrap_or_else(|| panic!("event without timestamp.seconds: {message}"));
    let micros = message["timestamp"]["microseconds"]
        .as_u64()
        .unwrap_or_else(|| panic!("event without timestamp.microseconds: {message}"));
    assert!(micros < 1_000_000, "{message}");
    assert!(
        seconds.abs_diff(now_secs()) <= 5,
        "the event's timestamp is not the host's wall clock: {message}"
    );
    let keys = message.as_object().map_or(0, |m| m.len());
    let data = message.get("data").cloned().unwrap_or(Value::Null);
    assert_eq!(keys, 2 + usize::from(!data.is_null()), "{message}");
    data
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}
