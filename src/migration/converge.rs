//! The convergence aids of an outgoing migration, and the completion forecast.
//!
//! # QEMU 8.1's capabilities
//!
//! The trigger is QEMU's (`migration_bitmap_sync`): at a sync of the dirty log that ends a
//! period of at least a second, the bytes the guest dirtied in the period (the pages the sync
//! found, × 4096) are compared with `throttle-trigger-threshold` % of the bytes sent in it;
//! every second period over the threshold (not necessarily consecutive: the count resets
//! only when it fires) the aid acts:
//!
//! - `auto-converge`: the whole-VM throttle starts at `cpu-throttle-initial` %, then rises by
//!   `cpu-throttle-increment` (or, with `cpu-throttle-tailslow`, by what the ratio of the
//!   threshold to the bytes dirtied says is still missing, at most the increment), never
//!   above `max-cpu-throttle`. It stops when the migration ends, however it ends.
//! - `dirty-limit`: every vCPU is limited to `vcpu-dirty-limit` MB/s (again only when the
//!   parameter changed), by the limiter's strategy (`--limit-algo`), the reference
//!   algorithm measuring every `x-vcpu-dirty-limit-period` ms meanwhile. `migrate_cancel`
//!   lifts the limits; completion and failure leave them, as QEMU does.
//!
//! # `x-vcpu-dirty-limit-auto`: a limit that sets itself
//!
//! With `dirty-limit` on and this parameter true, the migration chooses the limits. A pass
//! over `R` bytes at bandwidth `B` takes `R / B`; the guest dirties `D × R / B` meanwhile,
//! and the migration completes once that fits the downtime, `B × downtime-limit`. So once
//! the trigger fires, and at every sync after, the dirty rate the guest may keep during the
//! pass that begins is `D = B² × downtime-limit / R` (with a margin of 20 %): the pass under
//! way is the last one, the writers run at full speed until it starts, and they are held only
//! as long as it lasts, as lightly as it allows. `D` is shared between the vCPUs that dirty
//! by water-filling (one that dirties less than its share keeps its own rate and gets no
//! limit; the rest share what is left equally); a vCPU that dirties under 1 MiB/s (a reader)
//! is never limited. `D` only ever goes down: near the end the syncs come fast, each finding
//! little left, and a `D` computed from that would free the writers just when what they
//! dirty must stay under what the last sync can take. What a vCPU would dirty unhindered is
//! its rate while it is not limited; once limited, its rate shows only what the limit lets
//! through, so it keeps the demand it had (or more, if it dirties more): a writer is never
//! freed for keeping under its limit. The limits go when the migration ends, however it
//! ends.
//!
//! # `x-expected-completion-ms`
//!
//! The forecast time to completion, as the precopy loop goes: the pass under way sends what
//! is pending, `R`, at the stream's bandwidth `B` (smoothed) down to the threshold `T = B ×
//! downtime-limit`, in `(R − T) / B`; what the guest dirties meanwhile joins only at the sync
//! that follows: `D` × the time since the last sync. Each sync's find then goes out while the
//! guest dirties `D / B` of it again, until a sync finds less than what the last window left
//! under the threshold (half a window's bytes on average), and the switchover sends the rest
//! without the rate limit, in what the downtime limit bounds (left out). `D` is the rate of
//! newly dirtied bytes the last period showed, or the self-set limit's total once it is in
//! force. With `D ≥ B` the migration does not converge and there is no forecast.

use std::time::Duration;

use super::params::{Capabilities, Parameters};
use crate::limit::{throttle, MIN_LIMIT_MIBPS};
use crate::units::MIB;
use crate::vmm::Machine;

/// The margin the self-set limit keeps below the rate that would just fit the downtime.
const AUTO_MARGIN: f64 = 0.8;
/// A vCPU that dirties less than this (MiB/s) is not a writer: it is never limited.
const DIRTYING_MIBPS: f64 = 1.0;

/// Which aid a migration uses, fixed when it starts (capabilities cannot change while it
/// runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aid {
    None,
    AutoConverge,
    DirtyLimit,
    AutoLimit,
}

/// A sync period's figures, for the trigger.
#[derive(Debug, Clone, Copy)]
pub(super) struct Period {
    /// Bytes of the pages the syncs of the period found dirty.
    pub bytes_dirty: u64,
    /// Bytes sent in it.
    pub bytes_sent: u64,
}

/// What `query-migrate` shows of the aids.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AidView {
    /// `cpu-throttle-percentage`, while the throttle is on.
    pub cpu_throttle_percentage: Option<u8>,
    /// `dirty-limit-throttle-time-per-round` and `dirty-limit-ring-full-time`, µs, while a
    /// dirty-limit migration has limits in force.
    pub dirty_limit_times: Option<(u64, u64)>,
}

/// An outgoing migration's aid.
#[derive(Debug)]
pub(super) struct Convergence {
    aid: Aid,
    /// Periods over the threshold since the aid last acted.
    high_periods: u32,
    /// The throttle percentage this migration set (0: none).
    throttle: u8,
    /// The fixed limit this migration set, MB/s (QEMU's `quota_dirtyrate`).
    quota: Option<u64>,
    /// The self-set limit is in force; each vCPU's limit (`None`: none), MiB/s.
    auto: Option<Vec<Option<f64>>>,
    /// What each vCPU would dirty unhindered, MiB/s.
    demand: Vec<f64>,
    /// The self-set limits' total, bytes/s: it only goes down.
    budget: Option<f64>,
}

impl Convergence {
    /// The aid `caps` and `params` choose for a migration of `machine`.
    pub fn new(caps: Capabilities, params: &Parameters, machine: &Machine) -> Convergence {
        let aid = match (caps.auto_converge, caps.dirty_limit) {
            (true, _) => Aid::AutoConverge,
            (false, true) if params.vcpu_dirty_limit_auto => Aid::AutoLimit,
            (false, true) => Aid::DirtyLimit,
            (false, false) => Aid::None,
        };
        if matches!(aid, Aid::DirtyLimit | Aid::AutoLimit) {
            machine
                .limiter()
                .set_reference_period(Duration::from_millis(params.vcpu_dirty_limit_period_ms));
        }
        Convergence {
            aid,
            high_periods: 0,
            throttle: 0,
            quota: None,
            auto: None,
            demand: vec![0.0; machine.vcpus().len()],
            budget: None,
        }
    }

    /// QEMU's trigger, at the end of a sync period.
    pub fn period_ended(&mut self, machine: &Machine, params: &Parameters, period: Period) {
        self.note_demand(machine);
        let threshold =
            period.bytes_sent as f64 * f64::from(params.throttle_trigger_threshold) / 100.0;
        if period.bytes_dirty as f64 <= threshold {
            return;
        }
        self.high_periods += 1;
        if self.high_periods < 2 {
            return;
        }
        self.high_periods = 0;
        match self.aid {
            Aid::None => {}
            Aid::AutoConverge => self.throttle_down(machine, params, period, threshold),
            Aid::DirtyLimit => {
                if self.quota != Some(params.vcpu_dirty_limit) {
                    self.quota = Some(params.vcpu_dirty_limit);
                    // Refused only for a rate out of range, which the parameter check
                    // already refused.
                    let _ = machine.limiter().set_limit(
                        None,
                        (params.vcpu_dirty_limit as f64).max(MIN_LIMIT_MIBPS),
                        None,
                    );
                }
            }
            Aid::AutoLimit => {
                if self.auto.is_none() {
                    self.auto = Some(vec![None; self.demand.len()]);
                }
            }
        }
    }

    /// `mig_throttle_guest_down`.
    fn throttle_down(
        &mut self,
        machine: &Machine,
        params: &Parameters,
        period: Period,
        threshold: f64,
    ) {
        let next = if self.throttle == 0 {
            params.cpu_throttle_initial
        } else {
            let increment = if params.cpu_throttle_tailslow {
                let cpu_now = 100 - u64::from(self.throttle);
                let cpu_ideal = (cpu_now as f64 * (threshold / period.bytes_dirty as f64)) as u64;
                (cpu_now - cpu_ideal.min(cpu_now)).min(u64::from(params.cpu_throttle_increment))
                    as u8
            } else {
                params.cpu_throttle_increment
            };
            self.throttle
                .saturating_add(increment)
                .min(params.max_cpu_throttle)
        }
        .clamp(1, throttle::MAX_PCT);
        // Refused only when per-vCPU limits are in force (set by hand); the throttle then
        // stays off.
        if machine.limiter().set_throttle_percent(next).is_ok() {
            self.throttle = next;
        }
    }

    /// At every sync: the self-set limit for the pass that begins, `remaining` bytes at
    /// `bandwidth` bytes/s.
    pub fn synced(
        &mut self,
        machine: &Machine,
        params: &Parameters,
        remaining: u64,
        bandwidth: f64,
    ) {
        if self.auto.is_none() {
            return;
        }
        self.note_demand(machine);
        // Never more than before: near the end a sync finds little left, which would free
        // the writers just when what they dirty must stay small (the syncs then come fast,
        // until what the last ones find fits the threshold).
        let budget = auto_budget(remaining, bandwidth, params.downtime_limit_ms)
            .min(self.budget.unwrap_or(f64::INFINITY));
        self.budget = Some(budget);
        let limits = water_fill(&self.demand, budget / MIB as f64);
        let limiter = machine.limiter();
        for (id, limit) in limits.iter().enumerate() {
            // Refused only for a rate out of range, which `water_fill` keeps in range.
            let _ = match limit {
                Some(mibps) => limiter.set_limit(Some(id as u32), *mibps, None),
                None => limiter.cancel(Some(id as u32)),
            };
        }
        self.auto = Some(limits);
    }

    /// Updates what each vCPU would dirty unhindered from what it dirties now.
    fn note_demand(&mut self, machine: &Machine) {
        let rates = machine.tracker().rate_estimates();
        let limits = self.auto.as_deref();
        for (id, (demand, rate)) in self.demand.iter_mut().zip(&rates).enumerate() {
            let limited = limits.is_some_and(|l| l[id].is_some());
            *demand = demand_now(*demand, rate.trailing_mibps, limited);
        }
    }

    /// The dirty rate the guest is held to, bytes/s, once the migration's limits are in
    /// force: each vCPU's limit, or what it dirties when that is less.
    pub fn planned_dirty_rate(&self) -> Option<f64> {
        let limits: Vec<Option<f64>> = match (&self.auto, self.quota) {
            (Some(limits), _) => limits.clone(),
            (None, Some(quota)) => vec![Some(quota as f64); self.demand.len()],
            (None, None) => return None,
        };
        let mibps: f64 = limits
            .iter()
            .zip(&self.demand)
            .map(|(limit, demand)| limit.map_or(*demand, |l| l.min(*demand)))
            .sum();
        Some(mibps * MIB as f64)
    }

    /// What `query-migrate` shows.
    pub fn view(&self, machine: &Machine) -> AidView {
        let limited = matches!(self.aid, Aid::DirtyLimit | Aid::AutoLimit)
            && !machine.limiter().limits().is_empty();
        AidView {
            cpu_throttle_percentage: (self.throttle > 0).then_some(self.throttle),
            dirty_limit_times: limited.then(|| machine.limiter().migration_view()),
        }
    }

    /// The migration ended (`cancelled` says how): the throttle stops; the self-set limits
    /// go; the fixed ones go on a cancel only, as in QEMU.
    pub fn finish(&mut self, machine: &Machine, cancelled: bool) {
        let limiter = machine.limiter();
        if self.throttle > 0 {
            let _ = limiter.set_throttle_percent(0);
            self.throttle = 0;
        }
        let lift = match self.aid {
            Aid::AutoLimit => self.auto.take().is_some(),
            Aid::DirtyLimit => cancelled && self.quota.take().is_some(),
            Aid::None | Aid::AutoConverge => false,
        };
        if lift {
            let _ = limiter.cancel(None);
        }
        if matches!(self.aid, Aid::DirtyLimit | Aid::AutoLimit) {
            limiter.set_reference_period(Duration::from_secs_f64(crate::limit::reference::PERIOD));
        }
    }
}

/// What a vCPU that dirtied `rate` MiB/s lately would dirty unhindered, given what it would
/// before (`demand`): its rate, unless it is `limited`, when its rate says only what the
/// limit lets through (a writer held to 1 MiB/s shows less, and taking that for its demand
/// would free it as a reader at the next sync): then it keeps the larger of the two.
fn demand_now(demand: f64, rate: f64, limited: bool) -> f64 {
    if limited {
        demand.max(rate)
    } else {
        rate
    }
}

/// The dirty rate, bytes/s, that lets a pass over `remaining` bytes at `bandwidth` bytes/s
/// be the last under a downtime limit of `downtime_ms`, with [`AUTO_MARGIN`].
fn auto_budget(remaining: u64, bandwidth: f64, downtime_ms: u64) -> f64 {
    let threshold = bandwidth * downtime_ms as f64 / 1000.0;
    AUTO_MARGIN * bandwidth * threshold / (remaining.max(1) as f64)
}

/// Shares `budget` MiB/s between vCPUs that would dirty `demand` MiB/s each: the limit of
/// each (`None`: it keeps its rate). Below [`DIRTYING_MIBPS`] a vCPU is no writer and keeps
/// its rate; no limit is below [`MIN_LIMIT_MIBPS`].
fn water_fill(demand: &[f64], budget: f64) -> Vec<Option<f64>> {
    let mut writers: Vec<usize> = (0..demand.len())
        .filter(|&id| demand[id] >= DIRTYING_MIBPS)
        .collect();
    writers.sort_by(|&a, &b| demand[a].total_cmp(&demand[b]));
    let mut limits = vec![None; demand.len()];
    let mut left = budget;
    for (i, &id) in writers.iter().enumerate() {
        let share = left / (writers.len() - i) as f64;
        if demand[id] <= share {
            left -= demand[id];
        } else {
            // This one and every larger one are held to an equal share.
            for &held in &writers[i..] {
                limits[held] = Some(share.max(MIN_LIMIT_MIBPS));
            }
            break;
        }
    }
    limits
}

/// `x-expected-completion-ms`: see the module docs. `remaining` bytes are pending, the last
/// sync was `since_sync` ago, the stream sends `bandwidth` bytes/s in windows of `window`,
/// the guest dirties `dirty_rate` bytes/s. `None` when it does not converge.
pub(super) fn forecast_ms(
    remaining: u64,
    since_sync: Duration,
    bandwidth: f64,
    dirty_rate: f64,
    downtime_ms: u64,
    window: Duration,
) -> Option<u64> {
    if bandwidth <= 0.0 || dirty_rate >= bandwidth {
        return None;
    }
    let threshold = bandwidth * downtime_ms as f64 / 1000.0;
    // The pass drains to the threshold; what the guest dirties meanwhile joins at the sync.
    let drain = (remaining as f64 - threshold).max(0.0) / bandwidth;
    let found = dirty_rate * (since_sync.as_secs_f64() + drain);
    // Each sync's find goes out while the guest dirties `ratio` of it again, until a find
    // fits under the threshold beside what the last window left: half a window's bytes.
    let settle = bandwidth * window.as_secs_f64() / 2.0;
    let ratio = dirty_rate / bandwidth;
    // (A find over `settle` means the guest dirties: 0 < ratio < 1.)
    let syncs = if found <= settle {
        0.0
    } else {
        ((found / settle).ln() / (1.0 / ratio).ln()).ceil()
    };
    // found × (1 + ratio + ratio² + ...) for that many syncs.
    let refinds = found * (1.0 - ratio.powf(syncs)) / (1.0 - ratio) / bandwidth;
    Some(((drain + refinds) * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn water_filling_spares_readers_and_light_writers() {
        // A reader, a light writer under its share, two heavy writers: 100 MiB/s to share.
        let limits = water_fill(&[0.0, 10.0, 400.0, 700.0], 100.0);
        assert_eq!(limits, [None, None, Some(45.0), Some(45.0)]);
        // Enough for everyone: no limit at all.
        assert_eq!(water_fill(&[0.5, 10.0, 20.0], 100.0), [None, None, None]);
        // Almost nothing to share: the floor is QEMU's lowest limit.
        assert_eq!(water_fill(&[300.0], 0.01), [Some(MIN_LIMIT_MIBPS)]);
    }

    #[test]
    fn a_writer_keeps_its_demand_while_it_is_held() {
        // Unhindered, a vCPU wants what it dirties, less or more than before.
        assert_eq!(demand_now(500.0, 0.2, false), 0.2);
        assert_eq!(demand_now(0.2, 500.0, false), 500.0);
        // Held to 1 MiB/s, a 500 MiB/s writer dirties 0.7 MiB/s: it is still a writer, and
        // water-filling keeps it limited instead of freeing it as a reader.
        let demand = demand_now(500.0, 0.7, true);
        assert_eq!(demand, 500.0);
        assert_eq!(water_fill(&[demand, 0.0], 1.0), [Some(1.0), None]);
        // Dirtying more than it was thought to want, it wants at least that.
        assert_eq!(demand_now(20.0, 30.0, true), 30.0);
    }

    #[test]
    fn the_auto_budget_makes_the_next_pass_the_last() {
        // 128 MiB left at 64 MiB/s with a 300 ms limit: the pass takes 2 s and may dirty
        // 19.2 MiB, so 9.6 MiB/s, less the margin.
        let mib = MIB as f64;
        let budget = auto_budget(128 << 20, 64.0 * mib, 300);
        assert!((budget / mib - 0.8 * 9.6).abs() < 1e-9, "{}", budget / mib);
    }

    #[test]
    fn the_forecast_drains_the_pass_then_what_each_sync_finds() {
        let mib = MIB as f64;
        let window = Duration::from_millis(100);
        let forecast = |remaining: u64, since_sync_ms: u64, dirty_mibps: f64| {
            forecast_ms(
                remaining << 20,
                Duration::from_millis(since_sync_ms),
                64.0 * mib,
                dirty_mibps * mib,
                300,
                window,
            )
        };
        // 128 MiB at 64 MiB/s, nothing dirtied: all but the threshold (19.2 MiB), which the
        // switchover sends, goes in 1.7 s.
        assert_eq!(forecast(128, 0, 0.0), Some(1700));
        // Dirtying 8 MiB/s, a pass under way for 0.3 s: the sync after the drain finds
        // 8 × 2.0 = 16 MiB (0.25 s to send); the next finds 2 MiB, under half a window's
        // 3.2 MiB: the switchover. At 32 MiB/s: 64 MiB (1 s), 32 (0.5 s), 16, 8, 4, then 2.
        assert_eq!(forecast(128, 300, 8.0), Some(1950));
        assert_eq!(
            forecast(128, 300, 32.0),
            Some(1700 + 1000 + 500 + 250 + 125 + 63)
        );
        // Within the threshold and nothing found: done at the next sync.
        assert_eq!(forecast(16, 0, 0.0), Some(0));
        // Dirtying as fast as the link: never.
        assert_eq!(forecast(128, 0, 64.0), None);
        assert_eq!(
            forecast_ms(128 << 20, Duration::ZERO, 0.0, 0.0, 300, window),
            None
        );
    }
}
