//! The source's precopy loop (see the module docs of `migration`).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::converge::{self, AidView, Convergence, Period};
use super::stream::{self, DeviceState, StreamWriter, Verdict};
use super::{
    stream_config, Iteration, Job, MigrationEvent, MigrationStatus, SharedState, StateGuard,
};
use crate::digest::{self, PAGE_WORDS};
use crate::tracking::DirtyPages;
use crate::units::PAGE_SIZE;
use crate::vmm::Machine;

/// The rate limit's window (QEMU's `BUFFER_DELAY`).
const WINDOW: Duration = Duration::from_millis(100);
/// The longest one round of sending lasts before the counters and the limit are looked at
/// (QEMU's `MAX_WAIT`).
const MAX_SEND: Duration = Duration::from_millis(50);
/// How much of each window's bandwidth the smoothed one takes in.
const BANDWIDTH_SMOOTHING: f64 = 0.3;
/// How long to wait for a connection, and for the destination's hello.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the destination may take to check and start the guest once the stream ended.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(60);
/// Pages between looks at the clock and the cancel flag.
const PAGES_PER_CHECK: u64 = 64;

/// How a migration ended before completing.
enum End {
    Cancelled,
    Failed(String),
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> End {
        End::Failed(match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                format!("Unable to write to socket: {}", super::uri::os_text(&e))
            }
            _ => e.to_string(),
        })
    }
}

/// What the functions of one outgoing migration share: the view they report to, the cancel
/// flag they obey, the convergence aid, and whether the switchover paused a running guest.
struct Outgoing<'a> {
    shared: &'a SharedState,
    cancel: &'a AtomicBool,
    convergence: Convergence,
    /// The switchover paused a running guest: it resumes if the migration fails.
    paused: bool,
}

/// Runs `job` to its end, keeping the shared view up to date.
pub(super) fn run(shared: &SharedState, job: &Job, cancel: &AtomicBool) {
    let (caps, params) = {
        let state = shared.lock();
        (state.caps, state.params)
    };
    let mut out = Outgoing {
        shared,
        cancel,
        convergence: Convergence::new(caps, &params, &job.machine),
        paused: false,
    };
    let mut result = migrate(&mut out, job);
    // Relaxed: as in `Sender::send`; a cancel shuts the connection down, and the error
    // that makes is the cancel's.
    if result.is_err() && cancel.load(Ordering::Relaxed) {
        result = Err(End::Cancelled);
    }
    out.convergence
        .finish(&job.machine, matches!(result, Err(End::Cancelled)));
    let paused = out.paused;
    let mut state = shared.lock();
    state.connection = None;
    state.info.aids = AidView::default();
    state.info.expected_completion_ms = None;
    state.info.finishing = false;
    state.info.total_time_ms = state.elapsed_ms();
    state.info.ram.remaining = 0;
    match result {
        Ok(()) => state.set_status(MigrationStatus::Completed),
        Err(end) => {
            // The guest runs on here, as it did before (QEMU restarts it).
            if paused {
                job.machine.resume();
                state.event(MigrationEvent::Resume);
            }
            state.info.downtime_ms = None;
            match end {
                End::Cancelled => state.set_status(MigrationStatus::Cancelled),
                End::Failed(why) => {
                    state.info.error = Some(why);
                    state.set_status(MigrationStatus::Failed);
                }
            }
        }
    }
    shared.notify();
}

/// The pages of the pass under way: a bitmap of pages to send and a cursor.
struct Batch {
    bits: Vec<u64>,
    remaining: u64,
    /// The word the next page is looked for from.
    cursor: usize,
}

impl Batch {
    /// Every page of a RAM of `pages` pages.
    fn all(pages: u64) -> Batch {
        let mut bits = vec![u64::MAX; pages.div_ceil(64) as usize];
        if let Some(last) = bits.last_mut() {
            if !pages.is_multiple_of(64) {
                *last = (1 << (pages % 64)) - 1;
            }
        }
        Batch {
            bits,
            remaining: pages,
            cursor: 0,
        }
    }

    /// Adds the pages of `dirty`; returns how many were not pending already.
    fn add(&mut self, dirty: &DirtyPages) -> u64 {
        let mut added = 0;
        for (word, &new) in self.bits.iter_mut().zip(&dirty.bitmap) {
            let fresh = new & !*word;
            added += u64::from(fresh.count_ones());
            *word |= fresh;
        }
        self.remaining += added;
        added
    }

    /// Takes the next pending page, from the cursor on, around the end.
    fn next(&mut self) -> Option<u64> {
        if self.remaining == 0 {
            return None;
        }
        let words = self.bits.len();
        for step in 0..=words {
            let i = (self.cursor + step) % words;
            let word = self.bits[i];
            if word != 0 {
                let bit = word.trailing_zeros();
                self.bits[i] &= !(1 << bit);
                self.remaining -= 1;
                self.cursor = i;
                return Some(i as u64 * 64 + u64::from(bit));
            }
        }
        None
    }
}

/// The sending side: the stream, the pass under way and the counters QEMU keeps.
struct Sender<'a> {
    machine: &'a Machine,
    out: StreamWriter<super::Connection>,
    batch: Batch,
    /// The pass under way.
    iteration: Iteration,
    pass_start: Instant,
    /// Pages sent whole, and as zero flags.
    normal: u64,
    zero: u64,
    /// When the current rate-limit window began, and the bytes and pages sent then.
    window_start: Instant,
    window_bytes: u64,
    window_pages: u64,
    /// `bandwidth × downtime-limit` from the last window, bytes (0 before the first).
    threshold: u64,
    /// Bytes per millisecond measured over the last window.
    bandwidth: f64,
    /// Bytes per second, smoothed over the windows: what plans and forecasts use.
    smoothed_bandwidth: f64,
    /// When the sync period began (QEMU's `time_last_bitmap_sync`), the dirty pages found
    /// since, the pages among them that were not pending already, and the bytes sent then.
    sync_period_start: Instant,
    dirty_in_period: u64,
    fresh_in_period: u64,
    sent_at_period_start: u64,
    /// Newly dirty bytes per second over the last period.
    fresh_rate: f64,
    /// Bytes sent while the guest ran.
    precopy_bytes: u64,
    /// The convergence aid.
    convergence: &'a mut Convergence,
}

impl Sender<'_> {
    fn sent(&self) -> u64 {
        self.normal + self.zero
    }

    /// Sends page `page` as it is now.
    fn send_page(&mut self, page: u64) -> io::Result<()> {
        let words = &self.machine.ram().words()[page as usize * PAGE_WORDS..][..PAGE_WORDS];
        // Relaxed: a page the guest writes while it is read is dirty again, and sent again
        // after the next harvest (which the kernel logs after its reset).
        if self.out.page(page, |i| words[i].load(Ordering::Relaxed))? {
            self.zero += 1;
        } else {
            self.normal += 1;
        }
        self.iteration.pages_sent += 1;
        Ok(())
    }

    /// Sends pending pages until `budget` bytes of the window are spent, `until` passes, or
    /// the pass is done. Looks at `cancel` every few pages.
    fn send(&mut self, budget: u64, until: Instant, cancel: &AtomicBool) -> Result<(), End> {
        let mut n = 0u64;
        while self.out.bytes() - self.window_bytes < budget {
            let Some(page) = self.batch.next() else {
                break;
            };
            self.send_page(page)?;
            n += 1;
            if n.is_multiple_of(PAGES_PER_CHECK) {
                // Relaxed: a flag; the status is changed under the lock by the canceller.
                if cancel.load(Ordering::Relaxed) {
                    return Err(End::Cancelled);
                }
                if Instant::now() >= until {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Syncs the dirty log: a new pass begins with the pages dirtied since the last sync.
    /// The pass marker goes on the stream before the state's lock is taken: no lock is held
    /// across a socket write.
    fn sync(&mut self, shared: &SharedState) -> Result<(), End> {
        let dirty = self
            .machine
            .tracker()
            .take_dirty()
            .map_err(|e| End::Failed(format!("syncing the dirty log: {e}")))?;
        let found = dirty.count();
        let fresh = self.batch.add(&dirty);
        self.out.end_of_pass(self.iteration.pass as u32)?;
        let now = Instant::now();
        let params = shared.lock().params;
        self.dirty_in_period += found;
        self.fresh_in_period += fresh;
        // QEMU's period: at least a second. Its end is when the trigger is looked at.
        let period = now - self.sync_period_start;
        let period_ended = period >= Duration::from_secs(1);
        if period_ended {
            let sent = self.out.bytes();
            self.convergence.period_ended(
                self.machine,
                &params,
                Period {
                    bytes_dirty: self.dirty_in_period * PAGE_SIZE,
                    bytes_sent: sent - self.sent_at_period_start,
                },
            );
            self.fresh_rate = (self.fresh_in_period * PAGE_SIZE) as f64 / period.as_secs_f64();
        }
        self.convergence.synced(
            self.machine,
            &params,
            self.batch.remaining * PAGE_SIZE,
            self.smoothed_bandwidth,
        );
        let mut state = shared.lock();
        self.finish_pass(&mut state, now);
        self.iteration = Iteration {
            pass: self.iteration.pass + 1,
            dirty_pages_found: found,
            remaining_pages: self.batch.remaining,
            ..Iteration::default()
        };
        self.pass_start = now;
        let ram = &mut state.info.ram;
        ram.dirty_sync_count += 1;
        if period_ended {
            ram.dirty_pages_rate = (self.dirty_in_period as f64 / period.as_secs_f64()) as u64;
            self.sync_period_start = now;
            self.dirty_in_period = 0;
            self.fresh_in_period = 0;
            self.sent_at_period_start = self.out.bytes();
        }
        if state.caps.events {
            let pass = state.info.ram.dirty_sync_count;
            state.event(MigrationEvent::Pass(pass));
        }
        Ok(())
    }

    /// Records the pass under way as done at `now`.
    fn finish_pass(&mut self, state: &mut StateGuard<'_>, now: Instant) {
        let mut done = self.iteration.clone();
        done.duration_ms = (now - self.pass_start).as_secs_f64() * 1e3;
        if done.pass > 0 {
            state.info.iterations.push(done);
        }
    }

    /// QEMU's `migration_update_counters`: every window, the bandwidth measured on the
    /// stream, the threshold and the published counters.
    fn update_counters(&mut self, state: &mut StateGuard<'_>, now: Instant) {
        let spent_ms = (now - self.window_start).as_secs_f64() * 1e3;
        let bytes = self.out.bytes() - self.window_bytes;
        let pages = self.sent() - self.window_pages;
        self.bandwidth = bytes as f64 / spent_ms.max(1e-3);
        let per_second = self.bandwidth * 1000.0;
        self.smoothed_bandwidth = if self.smoothed_bandwidth == 0.0 {
            per_second
        } else {
            self.smoothed_bandwidth + BANDWIDTH_SMOOTHING * (per_second - self.smoothed_bandwidth)
        };
        let params = state.params;
        let planned = match params.avail_switchover_bandwidth {
            0 => self.bandwidth,
            avail => avail as f64 / 1000.0,
        };
        self.threshold = (planned * params.downtime_limit_ms as f64) as u64;
        let ram = &mut state.info.ram;
        ram.mbps = bytes as f64 * 8.0 / (spent_ms / 1000.0) / 1e6;
        ram.pages_per_second = (pages as f64 / (spent_ms / 1000.0)) as u64;
        if ram.dirty_pages_rate > 0 && bytes > 10_000 && planned > 0.0 {
            state.info.expected_downtime_ms =
                (self.batch.remaining as f64 * PAGE_SIZE as f64 / planned) as u64;
        }
        let dirty_rate = self
            .convergence
            .planned_dirty_rate()
            .unwrap_or(self.fresh_rate);
        state.info.expected_completion_ms = converge::forecast_ms(
            self.batch.remaining * PAGE_SIZE,
            now - self.pass_start,
            self.smoothed_bandwidth,
            dirty_rate,
            params.downtime_limit_ms,
            WINDOW,
        );
        state.info.aids = self.convergence.view(self.machine);
        self.publish(state);
        self.window_start = now;
        self.window_bytes = self.out.bytes();
        self.window_pages = self.sent();
    }

    /// The counters into the shared view.
    fn publish(&self, state: &mut StateGuard<'_>) {
        let ram = &mut state.info.ram;
        ram.transferred = self.out.bytes();
        ram.remaining = self.batch.remaining * PAGE_SIZE;
        ram.duplicate = self.zero;
        ram.normal = self.normal;
        ram.normal_bytes = self.normal * PAGE_SIZE;
        ram.precopy_bytes = self.precopy_bytes;
    }
}

fn migrate(out: &mut Outgoing<'_>, job: &Job) -> Result<(), End> {
    let (shared, cancel) = (out.shared, out.cancel);
    let machine = &*job.machine;
    let began = Instant::now();
    let conn = job.uri.connect(CONNECT_TIMEOUT).map_err(End::from)?;
    shared.lock().connection = Some(conn.try_clone()?);
    let mut answers = conn.try_clone()?;
    answers.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    let aborted = || {
        // Relaxed: as in `Sender::send`.
        cancel.load(Ordering::Relaxed)
    };
    if aborted() {
        return Err(End::Cancelled);
    }
    stream::read_hello(&mut answers).map_err(|e| End::Failed(e.to_string()))?;
    match send_guest(out, machine, &conn, &mut answers, began) {
        // A destination that refused the stream stops reading it: the write fails first,
        // and its answer says why.
        Err(End::Failed(why)) => Err(End::Failed(refusal(&mut answers).unwrap_or(why))),
        result => result,
    }
}

/// The destination's refusal, if it sent one.
fn refusal(answers: &mut super::Connection) -> Option<String> {
    answers
        .set_read_timeout(Some(Duration::from_secs(1)))
        .ok()?;
    match stream::read_verdict(answers) {
        Ok(Verdict::Refused(why)) => Some(format!("the destination refused: {why}")),
        _ => None,
    }
}

/// The stream after the hello: the passes, the switchover, the verdict.
fn send_guest(
    outgoing: &mut Outgoing<'_>,
    machine: &Machine,
    conn: &super::Connection,
    answers: &mut super::Connection,
    began: Instant,
) -> Result<(), End> {
    let (shared, cancel) = (outgoing.shared, outgoing.cancel);
    let aborted = || {
        // Relaxed: as in `Sender::send`.
        cancel.load(Ordering::Relaxed)
    };
    let mut out = StreamWriter::new(conn.try_clone()?);
    out.header(&stream_config(machine))?;
    // Everything dirtied until now goes in the first pass.
    machine
        .tracker()
        .take_dirty()
        .map_err(|e| End::Failed(format!("syncing the dirty log: {e}")))?;
    let pages = machine.layout().memory() / PAGE_SIZE;
    let now = Instant::now();
    let mut sender = Sender {
        machine,
        out,
        batch: Batch::all(pages),
        iteration: Iteration {
            pass: 1,
            dirty_pages_found: pages,
            remaining_pages: pages,
            ..Iteration::default()
        },
        pass_start: now,
        normal: 0,
        zero: 0,
        window_start: now,
        window_bytes: 0,
        window_pages: 0,
        threshold: 0,
        bandwidth: 0.0,
        smoothed_bandwidth: 0.0,
        sync_period_start: now,
        dirty_in_period: 0,
        fresh_in_period: 0,
        sent_at_period_start: 0,
        fresh_rate: 0.0,
        precopy_bytes: 0,
        convergence: &mut outgoing.convergence,
    };
    {
        let mut state = shared.lock();
        if state.info.status == MigrationStatus::Cancelling {
            return Err(End::Cancelled);
        }
        state.info.setup_time_ms = began.elapsed().as_millis() as u64;
        state.info.ram.total = pages * PAGE_SIZE;
        state.info.ram.page_size = PAGE_SIZE;
        state.info.ram.dirty_sync_count = 1;
        state.info.expected_downtime_ms = state.params.downtime_limit_ms;
        // QEMU's first sync is part of the setup: its pass comes before `active`.
        if state.caps.events {
            state.event(MigrationEvent::Pass(1));
        }
        state.set_status(MigrationStatus::Active);
        sender.publish(&mut state);
        shared.notify();
    }

    // The precopy loop: QEMU's migration_iteration_run and migration_rate_limit.
    loop {
        if aborted() {
            return Err(End::Cancelled);
        }
        if sender.batch.remaining * PAGE_SIZE <= sender.threshold {
            sender.sync(shared)?;
            if sender.batch.remaining * PAGE_SIZE <= sender.threshold {
                break;
            }
        }
        let budget = (shared.lock().params.max_bandwidth / 10).max(PAGE_SIZE + 9);
        let until = (Instant::now() + MAX_SEND).min(sender.window_start + WINDOW);
        sender.send(budget, until, cancel)?;
        sender.precopy_bytes = sender.out.bytes();
        let now = Instant::now();
        if now >= sender.window_start + WINDOW {
            let mut state = shared.lock();
            sender.update_counters(&mut state, now);
        } else if sender.out.bytes() - sender.window_bytes >= budget {
            // The window's bytes are spent: wait for the next one.
            std::thread::sleep(sender.window_start + WINDOW - now);
        }
    }

    // The switchover.
    let downtime_start = Instant::now();
    {
        let mut state = shared.lock();
        state.info.finishing = true;
        state.info.switchover_at = Some(downtime_start);
        outgoing.paused = machine.running();
        if outgoing.paused {
            state.event(MigrationEvent::Stop);
        }
    }
    if !machine.pause() {
        return Err(End::Failed(
            "a vCPU did not stop for the switchover within a second".into(),
        ));
    }
    sender.precopy_bytes = sender.out.bytes();
    sender.sync(shared)?;
    // The guest is paused: its RAM is final. It is hashed while the last pages go.
    let (sent, digest) = std::thread::scope(|scope| {
        let hashing = scope.spawn(|| digest::ram_digest(machine.ram().words(), DIGEST_THREADS));
        let mut sent = Ok(());
        while let Some(page) = sender.batch.next() {
            sent = sender.send_page(page);
            if sent.is_err() {
                break;
            }
        }
        let digest = hashing
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (sent, digest)
    });
    sent?;
    let device = DeviceState {
        vcpus: machine
            .vcpus()
            .iter()
            .map(|v| v.registers.save())
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| End::Failed(format!("saving the vCPUs' registers: {e}")))?,
        stats: machine.guest_stats(),
    };
    sender.out.device(&device)?;
    sender.out.digest(digest)?;
    sender.out.end()?;
    {
        let mut state = shared.lock();
        let end = Instant::now();
        sender.finish_pass(&mut state, end);
        sender.publish(&mut state);
        state.info.ram.downtime_bytes = sender.out.bytes() - sender.precopy_bytes;
        state.info.memory_digest = Some(digest);
    }
    answers.set_read_timeout(Some(VERDICT_TIMEOUT))?;
    match stream::read_verdict(answers) {
        Ok(Verdict::Running { digest: theirs }) if theirs == digest => {
            shared.lock().info.downtime_ms = Some(downtime_start.elapsed().as_millis() as u64);
            Ok(())
        }
        Ok(Verdict::Running { digest: theirs }) => Err(End::Failed(format!(
            "the destination runs a guest whose RAM digest {theirs:016x} is not the \
             source's {digest:016x}"
        ))),
        Ok(Verdict::Refused(why)) => Err(End::Failed(format!("the destination refused: {why}"))),
        Err(e) => Err(End::Failed(e.to_string())),
    }
}

/// Hash threads for the digest at the switchover: the vCPUs are paused, the cores are free
/// but for the sending.
const DIGEST_THREADS: usize = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_hands_out_every_page_once_around_its_cursor() {
        let mut batch = Batch::all(130);
        assert_eq!(batch.remaining, 130);
        let first: Vec<u64> = (0..70).map_while(|_| batch.next()).collect();
        assert_eq!(first, (0..70).collect::<Vec<_>>());
        // Pages dirtied behind the cursor and ahead of it: each comes once.
        let mut dirty = vec![0u64; 3];
        dirty[0] = 0b1010; // pages 1 and 3, already sent
        dirty[1] = 1 << 10; // page 74, still pending
        let added = batch.add(&DirtyPages {
            bitmap: dirty,
            complete: true,
        });
        assert_eq!(added, 2);
        let mut rest: Vec<u64> = std::iter::from_fn(|| batch.next()).collect();
        rest.sort_unstable();
        let mut expected: Vec<u64> = (70..130).chain([1, 3]).collect();
        expected.sort_unstable();
        assert_eq!(rest, expected);
        assert_eq!(batch.remaining, 0);
        assert_eq!(batch.next(), None);
    }
}
