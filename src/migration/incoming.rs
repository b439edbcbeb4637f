//! The destination: listening, receiving, checking (see the module docs of `migration`).

use std::io::{self, BufReader};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::stream::{self, DeviceState, Record, StreamConfig, StreamReader, Verdict};
use super::{Connection, Iteration, Migration, MigrationEvent, MigrationStatus};
use crate::digest::{self, PAGE_WORDS};
use crate::units::PAGE_SIZE;
use crate::vm::guest::{Size, Workload};
use crate::vm::kvm::GuestMemory;
use crate::vmm::Restore;

/// What the destination was told about the VM it expects (options given with `--incoming`):
/// the stream must agree.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expect {
    /// `--vcpus`.
    pub vcpus: Option<u32>,
    /// `--memory`.
    pub memory: Option<u64>,
    /// `--workload`s, by vCPU.
    pub workloads: Option<Vec<Workload>>,
}

impl Expect {
    /// What in `config` contradicts the options, named with both values.
    fn contradiction(&self, config: &StreamConfig) -> Option<String> {
        let mut differences = Vec::new();
        if let Some(vcpus) = self.vcpus.filter(|&v| v != config.vcpus()) {
            differences.push(format!(
                "--vcpus {vcpus}, but the source's VM has {} vCPUs",
                config.vcpus()
            ));
        }
        if let Some(memory) = self.memory.filter(|&m| m != config.memory) {
            differences.push(format!(
                "--memory {}, but the source's VM has {}",
                Size(memory),
                Size(config.memory)
            ));
        }
        if let Some(workloads) = &self.workloads {
            let theirs = &config.workloads[..workloads.len().min(config.workloads.len())];
            if workloads.len() > config.workloads.len() || workloads[..] != *theirs {
                let show = |w: &[Workload]| {
                    w.iter()
                        .map(Workload::to_string)
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                differences.push(format!(
                    "--workload {}, but the source's vCPUs run {}",
                    show(workloads),
                    show(&config.workloads)
                ));
            }
        }
        (!differences.is_empty()).then(|| differences.join("; "))
    }
}

/// A stream received whole and checked: the state to boot from, and the answer owed to the
/// source.
#[derive(Debug)]
pub struct Received {
    /// The VM's configuration.
    pub config: StreamConfig,
    /// The guest, as the source paused it.
    pub restore: Restore,
    /// The source waits for it.
    pub answer: Answer,
}

/// The destination's last word to the source.
#[derive(Debug)]
pub struct Answer {
    conn: Connection,
    /// The digest of the RAM received, equal to the source's.
    digest: u64,
}

impl Answer {
    /// Tells the source the guest is here (call once it was booted and, unless told to
    /// start paused, runs).
    pub fn accept(mut self) -> io::Result<()> {
        stream::write_verdict(
            &mut self.conn,
            &Verdict::Running {
                digest: self.digest,
            },
        )
    }

    /// Tells the source the guest will not run here, and why; the source's runs on.
    pub fn refuse(mut self, why: &str) {
        let _ = stream::write_verdict(&mut self.conn, &Verdict::Refused(why.into()));
    }
}

/// How long an accept waits before looking whether the destination should stop waiting.
const ACCEPT_POLL: Duration = Duration::from_millis(100);

/// Receives a guest into `migration`'s view: waits for it to listen ([`Migration::listen`],
/// or QMP `migrate-incoming`), then for the source, then reads the stream; until `give_up`
/// says to stop (`None`). The error says what went wrong; the source was told too, where it
/// could be.
pub fn receive(
    migration: &Migration,
    expect: &Expect,
    give_up: impl Fn() -> bool,
) -> Result<Option<Received>, String> {
    let listener = loop {
        if give_up() {
            return Ok(None);
        }
        if let Some(listener) = migration.take_listener(ACCEPT_POLL) {
            break listener;
        }
    };
    let conn = loop {
        if give_up() {
            return Ok(None);
        }
        match listener.accept(ACCEPT_POLL) {
            Ok(Some(conn)) => break conn,
            Ok(None) => continue,
            Err(e) => {
                return Err(fail(
                    migration,
                    format!("accepting on {}: {e}", listener.address()),
                ))
            }
        }
    };
    drop(listener);
    migration.with_state(|s| {
        // The destination's clock starts with the source's connection, not with the wait.
        s.start = Some(Instant::now());
        s.set_status(MigrationStatus::Active);
    });
    migration.with_state(|s| s.connection = conn.try_clone().ok());
    let result = read_stream(migration, conn, expect);
    migration.with_state(|s| s.connection = None);
    match result {
        Ok(received) => Ok(Some(received)),
        // Stopped while receiving ([`Migration::abort_incoming`]): no failure to report.
        Err(_) if give_up() => Ok(None),
        Err(why) => Err(fail(migration, why)),
    }
}

fn fail(migration: &Migration, why: String) -> String {
    migration.with_state(|s| {
        s.info.error = Some(why.clone());
        s.info.total_time_ms = s.elapsed_ms();
        s.set_status(MigrationStatus::Failed);
    });
    format!("load of migration failed: {why}")
}

impl Migration {
    /// The incoming migration is done: the guest is here (after [`Answer::accept`]), and
    /// `running` says whether it was started.
    pub fn incoming_completed(&self, running: bool) {
        self.with_state(|s| {
            s.info.total_time_ms = s.elapsed_ms();
            s.info.listening = None;
            s.set_status(MigrationStatus::Completed);
            if running {
                s.event(MigrationEvent::Resume);
            }
        });
    }

    /// The incoming migration failed after the stream was received (the guest could not
    /// boot).
    pub fn incoming_failed(&self, why: String) -> String {
        fail(self, why)
    }
}

/// Reads and checks the stream; refuses it to the source when something is wrong.
fn read_stream(
    migration: &Migration,
    conn: Connection,
    expect: &Expect,
) -> Result<Received, String> {
    let mut answer = conn;
    let input = answer.try_clone().map_err(|e| e.to_string())?;
    let refuse = |answer: &mut Connection, why: String| {
        let _ = stream::write_verdict(answer, &Verdict::Refused(why.clone()));
        why
    };
    stream::write_hello(&mut answer).map_err(|e| format!("greeting the source: {e}"))?;
    let mut reader = StreamReader::new(BufReader::with_capacity(stream::READ_BUFFER, input));
    let config = reader
        .header()
        .map_err(|e| refuse(&mut answer, e.to_string()))?;
    if let Some(why) = expect.contradiction(&config) {
        return Err(refuse(&mut answer, why));
    }
    let image =
        Image::receive(migration, &mut reader, &config).map_err(|e| refuse(&mut answer, e))?;
    let Image {
        ram,
        hashes,
        device,
        source_digest,
    } = image;
    let digest = digest::fold(&hashes);
    if digest != source_digest {
        return Err(refuse(
            &mut answer,
            format!(
                "the RAM received does not match the source's: its digest is {digest:016x}, \
                 the source's {source_digest:016x}"
            ),
        ));
    }
    migration.with_state(|s| s.info.memory_digest = Some(digest));
    Ok(Received {
        restore: Restore {
            ram,
            vcpus: device.vcpus,
            stats: device.stats,
            tsc_khz: config.tsc_khz,
        },
        config,
        answer: Answer {
            conn: answer,
            digest,
        },
    })
}

/// What the records build: guest RAM, one hash per page, the device state, the digest.
struct Image {
    ram: GuestMemory,
    hashes: Vec<u64>,
    device: DeviceState,
    source_digest: u64,
}

impl Image {
    fn receive(
        migration: &Migration,
        reader: &mut StreamReader<impl io::BufRead>,
        config: &StreamConfig,
    ) -> Result<Image, String> {
        let pages = config.pages();
        let ram = GuestMemory::new(config.memory as usize)
            .map_err(|e| format!("mapping {} of guest memory: {e}", Size(config.memory)))?;
        let mut hashes = vec![digest::zero_page_hash(); pages as usize];
        // Pages that hold data: a zero page elsewhere needs no write (fresh memory is zero).
        let mut filled = vec![0u64; pages.div_ceil(64) as usize];
        let (mut device, mut source_digest) = (None, None);
        let mut iteration = Iteration {
            pass: 1,
            ..Iteration::default()
        };
        let mut pass_start = Instant::now();
        let (mut normal, mut zero) = (0u64, 0u64);
        let mut last_publish = Instant::now();
        loop {
            let record = reader.record().map_err(|e| e.to_string())?;
            match record {
                Record::Page { page, data } => {
                    let words = &ram.words()[page as usize * PAGE_WORDS..][..PAGE_WORDS];
                    for (word, value) in words.iter().zip(data.chunks_exact(8)) {
                        let value = u64::from_le_bytes(value.try_into().expect("8 bytes"));
                        // Relaxed: no vCPU runs on this memory yet; booting orders it.
                        word.store(value, Ordering::Relaxed);
                    }
                    hashes[page as usize] = digest::page_hash_of(words);
                    filled[page as usize / 64] |= 1 << (page % 64);
                    normal += 1;
                    iteration.pages_sent += 1;
                }
                Record::Zero { page } => {
                    let bit = 1 << (page % 64);
                    if filled[page as usize / 64] & bit != 0 {
                        for word in &ram.words()[page as usize * PAGE_WORDS..][..PAGE_WORDS] {
                            // Relaxed: as above.
                            word.store(0, Ordering::Relaxed);
                        }
                        filled[page as usize / 64] &= !bit;
                    }
                    hashes[page as usize] = digest::zero_page_hash();
                    zero += 1;
                    iteration.pages_sent += 1;
                }
                Record::EndOfPass { .. } => {
                    let now = Instant::now();
                    iteration.duration_ms = (now - pass_start).as_secs_f64() * 1e3;
                    let next = iteration.pass + 1;
                    let done = std::mem::replace(
                        &mut iteration,
                        Iteration {
                            pass: next,
                            ..Iteration::default()
                        },
                    );
                    migration.with_state(|s| s.info.iterations.push(done));
                    pass_start = now;
                }
                Record::Device(state) => device = Some(state),
                Record::Digest(d) => source_digest = Some(d),
                Record::End => break,
            }
            if last_publish.elapsed() >= Duration::from_millis(100) {
                last_publish = Instant::now();
                publish(migration, reader.bytes(), normal, zero, pages);
            }
        }
        iteration.duration_ms = pass_start.elapsed().as_secs_f64() * 1e3;
        migration.with_state(|s| s.info.iterations.push(iteration));
        publish(migration, reader.bytes(), normal, zero, pages);
        let device = device.ok_or("the stream ended without the vCPUs' state")?;
        let source_digest = source_digest.ok_or("the stream ended without the RAM's digest")?;
        Ok(Image {
            ram,
            hashes,
            device,
            source_digest,
        })
    }
}

fn publish(migration: &Migration, bytes: u64, normal: u64, zero: u64, pages: u64) {
    migration.with_state(|s| {
        let ram = &mut s.info.ram;
        ram.transferred = bytes;
        ram.normal = normal;
        ram.normal_bytes = normal * PAGE_SIZE;
        ram.duplicate = zero;
        ram.total = pages * PAGE_SIZE;
        ram.page_size = PAGE_SIZE;
    });
}
