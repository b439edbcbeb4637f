//! A deterministic VM behind the QMP [`Backend`], for the tests and the fuzz target: no
//! KVM, no threads, no clock.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use serde_json::{json, Value};

use crate::sync::lock;

use super::{
    Backend, CalcDirtyRate, CpuInfo, DirtyLimitInfo, DirtyRateInfo, DirtyRateMode, DirtyRateStatus,
    QmpError, RunState,
};
use crate::migration::{Migration, MigrationUri, UriError};

/// The mock's measurements always start at this wall-clock second.
pub const START_TIME: i64 = 1_700_000_000;
/// Each vCPU's measured dirty rate, MiB/s.
pub const VCPU_DIRTY_RATE: i64 = 50;
/// vCPU i's thread id is `THREAD_ID_BASE + i`.
pub const THREAD_ID_BASE: i64 = 4000;

/// A VM of `vcpus` running vCPUs, with or without a dirty ring.
///
/// A measurement reports `measuring` to the first look at it after it starts (a
/// `query-dirty-rate`, or the check a second `calc-dirty-rate` makes) and `measured` from
/// the second on, so that a client's polling loop sees both states.
pub struct MockBackend {
    vcpus: u32,
    dirty_ring: bool,
    state: Mutex<MockState>,
    migration: Migration,
}

struct MockState {
    running: bool,
    quit: bool,
    measurement: DirtyRateInfo,
    queries_until_measured: u32,
    /// Limited vCPUs: index to MB/s.
    limits: BTreeMap<u32, u64>,
    throttle: Option<u8>,
}

impl MockBackend {
    pub fn new(vcpus: u32, dirty_ring: bool) -> MockBackend {
        MockBackend {
            vcpus,
            dirty_ring,
            state: Mutex::new(MockState {
                running: true,
                quit: false,
                measurement: DirtyRateInfo::unstarted(),
                queries_until_measured: 0,
                limits: BTreeMap::new(),
                throttle: None,
            }),
            migration: Migration::new(),
        }
    }

    /// Whether a client asked the VM to quit.
    pub fn quit_requested(&self) -> bool {
        self.state().quit
    }

    fn state(&self) -> MutexGuard<'_, MockState> {
        // No method panics while holding the lock; a poisoned state is still consistent.
        lock(&self.state)
    }

    fn vcpu_indices(&self, cpu_index: Option<u32>) -> Vec<u32> {
        match cpu_index {
            Some(index) => vec![index],
            None => (0..self.vcpus).collect(),
        }
    }
}

impl Backend for MockBackend {
    fn run_state(&self) -> RunState {
        if self.state().running {
            RunState::Running
        } else {
            RunState::Paused
        }
    }

    fn pause(&self) {
        self.state().running = false;
    }

    fn resume(&self) -> Result<(), QmpError> {
        self.state().running = true;
        Ok(())
    }

    fn quit(&self) {
        self.state().quit = true;
    }

    fn cpus(&self) -> Vec<CpuInfo> {
        (0..self.vcpus)
            .map(|cpu_index| CpuInfo {
                cpu_index,
                thread_id: THREAD_ID_BASE + i64::from(cpu_index),
            })
            .collect()
    }

    fn max_cpus(&self) -> u32 {
        self.vcpus
    }

    fn calc_dirty_rate(&self, request: CalcDirtyRate) -> Result<(), QmpError> {
        let mut state = self.state();
        if state.measurement.status == DirtyRateStatus::Measuring {
            return Err(QmpError::generic(
                "the dirty rate is already being measured.",
            ));
        }
        let enabled = match request.mode {
            DirtyRateMode::PageSampling => true,
            DirtyRateMode::DirtyRing => self.dirty_ring,
            DirtyRateMode::DirtyBitmap => !self.dirty_ring,
        };
        if !enabled {
            return Err(QmpError::generic(format!(
                "mode {} is not enabled, use other method instead.",
                request.mode.name()
            )));
        }
        state.measurement = DirtyRateInfo {
            status: DirtyRateStatus::Measuring,
            dirty_rate: None,
            start_time: START_TIME,
            calc_time_ms: request.calc_time_ms,
            sample_pages: request.sample_pages,
            mode: request.mode,
            vcpu_dirty_rate: None,
        };
        state.queries_until_measured = 1;
        Ok(())
    }

    fn query_dirty_rate(&self) -> DirtyRateInfo {
        let mut state = self.state();
        if state.measurement.status == DirtyRateStatus::Measuring {
            if state.queries_until_measured == 0 {
                let rates: Vec<(u32, i64)> = (0..self.vcpus)
                    .map(|index| (index, VCPU_DIRTY_RATE))
                    .collect();
                state.measurement.status = DirtyRateStatus::Measured;
                state.measurement.dirty_rate = Some(rates.iter().map(|&(_, rate)| rate).sum());
                state.measurement.vcpu_dirty_rate = Some(rates);
            } else {
                state.queries_until_measured -= 1;
            }
        }
        state.measurement.clone()
    }

    fn set_vcpu_dirty_limit(
        &self,
        cpu_index: Option<u32>,
        dirty_rate: u64,
    ) -> Result<(), QmpError> {
        if !self.dirty_ring {
            return Err(QmpError::generic(
                "dirty page limit feature requires KVM with accelerator property \
                 'dirty-ring-size' set'",
            ));
        }
        if dirty_rate == 0 {
            return self.cancel_vcpu_dirty_limit(cpu_index);
        }
        let mut state = self.state();
        for index in self.vcpu_indices(cpu_index) {
            state.limits.insert(index, dirty_rate);
        }
        Ok(())
    }

    fn cancel_vcpu_dirty_limit(&self, cpu_index: Option<u32>) -> Result<(), QmpError> {
        let mut state = self.state();
        for index in self.vcpu_indices(cpu_index) {
            state.limits.remove(&index);
        }
        Ok(())
    }

    fn query_vcpu_dirty_limit(&self) -> Vec<DirtyLimitInfo> {
        self.state()
            .limits
            .iter()
            .map(|(&cpu_index, &limit_rate)| DirtyLimitInfo {
                cpu_index,
                limit_rate,
                current_rate: limit_rate.min(VCPU_DIRTY_RATE.unsigned_abs()),
            })
            .collect()
    }

    fn x_counters(&self) -> Value {
        let vcpus: Vec<Value> = (0..self.vcpus)
            .map(|id| {
                json!({
                    "id": id,
                    "pages-written": 0,
                    "dirty-pages-harvested": 0,
                    "ring-full-exits": 0,
                    "penalty-ms": 0,
                })
            })
            .collect();
        json!({ "vcpus": vcpus })
    }

    fn x_reaper(&self) -> Value {
        json!({"mode": "adaptive", "reaps": 0, "interval-ms": 1000})
    }

    fn x_set_throttle(&self, percent: Option<u8>) -> Result<(), QmpError> {
        self.state().throttle = percent;
        Ok(())
    }

    fn x_query_throttle(&self) -> Value {
        match self.state().throttle {
            Some(percent) => json!({"active": true, "percent": percent}),
            None => json!({"active": false, "percent": 0}),
        }
    }

    fn migration(&self) -> &Migration {
        &self.migration
    }

    /// The mock has no guest to send: the checks `migrate` makes before it connects are
    /// [`Migration`]'s, and the tests of a real migration use a real VM.
    fn migrate(&self, uri: &str) -> Result<(), QmpError> {
        let uri: MigrationUri = uri.parse().map_err(|e: UriError| QmpError::generic(e.0))?;
        Err(QmpError::generic(format!(
            "the mock VM cannot migrate (to {uri})"
        )))
    }

    fn dirty_ring(&self) -> bool {
        self.dirty_ring
    }
}
