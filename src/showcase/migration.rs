//! Migration benchmarks on real KVM, source and destination in this process over a loopback
//! socket: what a migration costs beside a plain copy of the same bytes, and the downtime of
//! a busy guest. `benches/migration.rs` runs them and prints the tables.

use std::fmt;
use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::migration::{self, Expect, Migration, MigrationInfo, MigrationStatus, MigrationUri};
use crate::tracking::DirtyLog;
use crate::units::PAGE_SIZE;
use crate::vm::guest::Workload;
use crate::vm::kvm::GuestMemory;
use crate::vmm::{Boot, Machine, VmConfig, VmmError};

use super::scenario::boot_warm;

/// How long one migration of these benchmarks may take.
const TIMEOUT: Duration = Duration::from_secs(120);

/// The socket a benchmark migrates over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// `unix:` in the temp dir.
    Unix,
    /// `tcp:127.0.0.1`.
    Tcp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Unix => "unix",
            Transport::Tcp => "tcp",
        })
    }
}

impl Transport {
    /// A fresh address to listen on (port 0: the system chooses).
    pub fn uri(self, name: &str) -> MigrationUri {
        match self {
            Transport::Unix => MigrationUri::Unix(
                std::env::temp_dir()
                    .join(format!("dirtyvm-bench-{}-{name}.sock", std::process::id())),
            ),
            Transport::Tcp => MigrationUri::Tcp {
                host: "127.0.0.1".into(),
                port: 0,
            },
        }
    }
}

/// What the destination in this process does with the guest once it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landing {
    /// Answers the source without booting it: the transfer alone.
    Answer,
    /// Boots it, resumes it, then answers (and stops it): what a real destination does.
    Boot,
}

/// A destination ready in this process: listening, receiving on its own thread.
pub struct LocalDestination {
    migration: Arc<Migration>,
    receiver: thread::JoinHandle<Result<Option<Instant>, String>>,
}

impl LocalDestination {
    /// Listens on `uri` and receives on a thread; `landing` says what happens at arrival.
    pub fn listen(uri: MigrationUri, landing: Landing) -> Result<LocalDestination, String> {
        let migration = Arc::new(Migration::new());
        migration.listen(uri).map_err(|e| e.to_string())?;
        let incoming = migration.clone();
        let receiver = thread::Builder::new()
            .name("destination".into())
            .spawn(move || arrive(&incoming, landing))
            .map_err(|e| e.to_string())?;
        Ok(LocalDestination {
            migration,
            receiver,
        })
    }

    /// The address to migrate to.
    pub fn address(&self) -> String {
        self.migration
            .info()
            .listening
            .map_or_else(String::new, |a| a.to_string())
    }

    /// Waits for the destination's end: when the guest resumed there (with
    /// [`Landing::Boot`]).
    pub fn finish(self) -> Result<Option<Instant>, String> {
        self.receiver
            .join()
            .unwrap_or_else(|_| Err("the destination thread panicked".into()))
    }
}

fn arrive(incoming: &Migration, landing: Landing) -> Result<Option<Instant>, String> {
    let deadline = Instant::now() + TIMEOUT;
    let received = migration::receive(incoming, &Expect::default(), || Instant::now() > deadline)?
        .ok_or("no source came")?;
    let migration::Received {
        config,
        restore,
        answer,
    } = received;
    match landing {
        Landing::Answer => {
            answer.accept().map_err(|e| e.to_string())?;
            Ok(None)
        }
        Landing::Boot => {
            let vm = VmConfig {
                vcpus: config.vcpus(),
                memory: config.memory,
                workloads: config.workloads.clone(),
                ..VmConfig::new(1, PAGE_SIZE, Vec::new()).with_dirty_log(DirtyLog::Ring)
            };
            let boot = Boot {
                restore: Some(restore),
                paused: true,
                ..Boot::default()
            };
            let machine = Machine::boot_with(&vm, boot).map_err(|e| e.to_string())?;
            machine.resume();
            let resumed = Instant::now();
            answer.accept().map_err(|e| e.to_string())?;
            incoming.incoming_completed(true);
            machine.shutdown().map_err(|e| e.to_string())?;
            Ok(Some(resumed))
        }
    }
}

/// Migrates `source` to `dest` with `max_bandwidth` and waits for the end; the source's view
/// and how long it took from `migrate` to the end.
pub fn migrate_to(
    source: &Arc<Machine>,
    dest: LocalDestination,
    max_bandwidth: u64,
) -> Result<(MigrationInfo, Duration, Option<Instant>), String> {
    let outgoing = Migration::new();
    outgoing
        .set_params(|p| p.max_bandwidth = max_bandwidth)
        .map_err(|e| e.0)?;
    let start = Instant::now();
    outgoing
        .migrate(source.clone(), &dest.address())
        .map_err(|e| e.0)?;
    let info = outgoing.wait(TIMEOUT);
    let took = start.elapsed();
    let resumed = dest.finish()?;
    if info.status != MigrationStatus::Completed {
        return Err(format!(
            "the migration ended {}: {}",
            info.status.name(),
            info.error.clone().unwrap_or_default()
        ));
    }
    Ok((info, took, resumed))
}

/// One row of the throughput table.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputRow {
    /// `idle` (every page zero) or `written` (every page written, the writer paused).
    pub guest: &'static str,
    /// The socket.
    pub transport: Transport,
    /// Guest RAM, bytes.
    pub ram_bytes: u64,
    /// `migrate` to completed, s.
    pub migration_s: f64,
    /// Bytes of the migration stream.
    pub stream_bytes: u64,
    /// Guest RAM moved per second by the migration, GiB/s.
    pub migration_gibps: f64,
    /// The plain copy of the same RAM over the same kind of socket, s.
    pub copy_s: f64,
    /// Its GiB/s.
    pub copy_gibps: f64,
    /// The migration's GiB/s over the copy's.
    pub ratio: f64,
}

/// Migrates an idle or a fully written guest of `memory` unthrottled over `transport`, and
/// copies the same RAM over the same kind of socket, in one run.
pub fn throughput(
    written: bool,
    memory: u64,
    transport: Transport,
) -> Result<ThroughputRow, VmmError> {
    let failed = |e: String| VmmError::BadConfig(e);
    let workloads = if written {
        vec![Workload::Write {
            bytes: memory,
            mibps: None,
        }]
    } else {
        Vec::new()
    };
    let config = VmConfig::new(1, memory, workloads).with_dirty_log(DirtyLog::Ring);
    let source = Arc::new(boot_warm(&config)?);
    // A paused guest: the transfer is measured, not the convergence.
    source.pause();
    let dest =
        LocalDestination::listen(transport.uri("throughput"), Landing::Answer).map_err(failed)?;
    let (info, took, _) = migrate_to(&source, dest, u64::MAX).map_err(failed)?;
    let copy = plain_copy(source.ram(), transport).map_err(failed)?;
    source.shutdown()?;
    let gibps = |secs: f64| memory as f64 / (1u64 << 30) as f64 / secs;
    let migration_s = took.as_secs_f64();
    Ok(ThroughputRow {
        guest: if written { "written" } else { "idle" },
        transport,
        ram_bytes: memory,
        migration_s,
        stream_bytes: info.ram.transferred,
        migration_gibps: gibps(migration_s),
        copy_s: copy.as_secs_f64(),
        copy_gibps: gibps(copy.as_secs_f64()),
        ratio: copy.as_secs_f64() / migration_s,
    })
}

/// Copies `ram` over a fresh socket of `transport` into fresh memory on another thread, the
/// way the migration reads and lands it (loads from guest memory, 256 KiB writes; reads into
/// memory that faults in as it fills): the time from the first byte sent to the last one
/// landed.
fn plain_copy(ram: &GuestMemory, transport: Transport) -> Result<Duration, String> {
    let uri = transport.uri("copy");
    let listener = uri.listen().map_err(|e| e.to_string())?;
    let address = listener.address();
    let len = ram.len();
    let receiver = thread::spawn(move || -> Result<(), String> {
        let mut conn = listener
            .accept(TIMEOUT)
            .map_err(|e| e.to_string())?
            .ok_or("no connection")?;
        let land = GuestMemory::new(len).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 256 << 10];
        for chunk in land.words().chunks(buf.len() / 8) {
            let bytes = &mut buf[..chunk.len() * 8];
            conn.read_exact(bytes).map_err(|e| e.to_string())?;
            for (word, value) in chunk.iter().zip(bytes.chunks_exact(8)) {
                // Relaxed: nothing else touches this memory.
                word.store(
                    u64::from_le_bytes(value.try_into().expect("8 bytes")),
                    Ordering::Relaxed,
                );
            }
        }
        Ok(())
    });
    let mut conn = address.connect(TIMEOUT).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut buf = vec![0u8; 256 << 10];
    for chunk in ram.words().chunks(buf.len() / 8) {
        let bytes = &mut buf[..chunk.len() * 8];
        for (value, word) in bytes.chunks_exact_mut(8).zip(chunk) {
            // Relaxed: the guest is paused.
            value.copy_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
        }
        conn.write_all(bytes).map_err(|e| e.to_string())?;
    }
    receiver
        .join()
        .map_err(|_| "the copy's receiver panicked".to_string())??;
    Ok(start.elapsed())
}

/// One row of the downtime table.
#[derive(Debug, Clone, Serialize)]
pub struct DowntimeRow {
    /// The source guest's writer.
    pub writer: String,
    /// The downtime limit, ms.
    pub downtime_limit_ms: u64,
    /// Source pause to destination resume, on this process's clock, ms.
    pub downtime_ms: f64,
    /// Bytes sent while the guest was paused.
    pub downtime_bytes: u64,
    /// `migrate` to completed, s.
    pub total_s: f64,
    /// Passes.
    pub passes: usize,
}

/// Migrates a guest whose writer runs at `writer` (a workload spec) in `memory`, unthrottled
/// with the default downtime limit, to a destination that boots and resumes it: the
/// downtime from the source's pause to the destination's resume.
pub fn downtime(writer: &str, memory: u64) -> Result<DowntimeRow, VmmError> {
    let failed = |e: String| VmmError::BadConfig(e);
    let workload: Workload = writer.parse().map_err(|e| failed(format!("{e}")))?;
    let config = VmConfig::new(1, memory, vec![workload]).with_dirty_log(DirtyLog::Ring);
    let source = Arc::new(boot_warm(&config)?);
    let dest =
        LocalDestination::listen(Transport::Unix.uri("downtime"), Landing::Boot).map_err(failed)?;
    let (info, took, resumed) = migrate_to(&source, dest, u64::MAX).map_err(failed)?;
    source.shutdown()?;
    let paused = info
        .switchover_at
        .ok_or_else(|| failed("no switchover".into()))?;
    let resumed = resumed.ok_or_else(|| failed("the guest did not resume".into()))?;
    Ok(DowntimeRow {
        writer: writer.to_string(),
        downtime_limit_ms: migration::DEFAULT_DOWNTIME_LIMIT_MS,
        downtime_ms: (resumed - paused).as_secs_f64() * 1e3,
        downtime_bytes: info.ram.downtime_bytes,
        total_s: took.as_secs_f64(),
        passes: info.iterations.len(),
    })
}

/// Prints the throughput table.
pub fn print_throughput(rows: &[ThroughputRow]) {
    say!(
        "{:<8} {:<5} {:>8} {:>12} {:>14} {:>14} {:>10} {:>12} {:>8}",
        "guest",
        "sock",
        "RAM GiB",
        "migration s",
        "stream MiB",
        "migr. GiB/s",
        "copy s",
        "copy GiB/s",
        "ratio"
    );
    for r in rows {
        say!(
            "{:<8} {:<5} {:>8.2} {:>12.3} {:>14.1} {:>14.2} {:>10.3} {:>12.2} {:>7.0} %",
            r.guest,
            r.transport.to_string(),
            r.ram_bytes as f64 / (1u64 << 30) as f64,
            r.migration_s,
            r.stream_bytes as f64 / (1u64 << 20) as f64,
            r.migration_gibps,
            r.copy_s,
            r.copy_gibps,
            r.ratio * 100.0
        );
    }
}

/// Prints the downtime table.
pub fn print_downtime(rows: &[DowntimeRow]) {
    say!(
        "{:<16} {:>10} {:>12} {:>16} {:>9} {:>7}",
        "writer",
        "limit ms",
        "downtime ms",
        "downtime MiB",
        "total s",
        "passes"
    );
    for r in rows {
        say!(
            "{:<16} {:>10} {:>12.1} {:>16.1} {:>9.2} {:>7}",
            r.writer,
            r.downtime_limit_ms,
            r.downtime_ms,
            r.downtime_bytes as f64 / (1u64 << 20) as f64,
            r.total_s,
            r.passes
        );
    }
}
