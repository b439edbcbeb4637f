//! Helpers shared by the integration tests. Each test binary uses a subset of them.
#![allow(dead_code)]

pub mod qmp;

use std::io::Read;
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::sync::{Mutex, MutexGuard};
use std::thread::{self, sleep, JoinHandle};
use std::time::{Duration, Instant};

/// Whether `/dev/kvm` can be used; prints why a test skips when it cannot.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(Path::new("/dev/kvm"))
        .is_ok();
    if !ok {
        eprintln!("skipping {test}: /dev/kvm is not available (needs Linux with KVM, read-write)");
    }
    ok
}

/// Tests that boot VMs take turns within a test binary: the host has two cores, and every
/// vCPU here spins.
pub fn one_vm_at_a_time() -> MutexGuard<'static, ()> {
    static VM_LOCK: Mutex<()> = Mutex::new(());
    VM_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A child process that is killed if the test lets go of it (a failed assertion, a timeout).
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Waits up to `timeout`; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().expect("waiting for a child") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Reads a pipe to the end on its own thread, so the child never blocks on a full pipe.
pub fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}
