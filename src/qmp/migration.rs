//! The migration commands: QEMU 8.2's `migrate`, `migrate-incoming`, `query-migrate`,
//! parameters and capabilities, with QAPI's argument checks and QEMU's texts, and the
//! replies built member by member as QEMU's `fill_source_migration_info()` and
//! `fill_destination_migration_info()` do.

use serde_json::{json, Map, Value};

use super::args::{invalid_type, uint64, Args};
use super::{Backend, QmpError};
use crate::migration::{
    Capabilities, MigrationInfo, MigrationStatus, MigrationUri, Parameters, RamStats, Role,
    CAPABILITIES,
};

/// `migrate`: members in schema order, then the checks of `qmp_migrate()`.
pub(super) fn migrate(mut args: Args<'_>, backend: &dyn Backend) -> Result<Value, QmpError> {
    let uri = args.required("uri", string)?;
    let channels = args.member("channels").is_some();
    let blk = args.optional("blk", boolean)?.unwrap_or(false);
    let inc = args.optional("inc", boolean)?.unwrap_or(false);
    // `detach` "exists only for compatibility reasons and is ignored by QEMU".
    args.optional("detach", boolean)?;
    let resume = args.optional("resume", boolean)?.unwrap_or(false);
    args.finish()?;
    if channels {
        return Err(exclusive("migrate"));
    }
    if blk || inc {
        return Err(QmpError::generic(
            "dirtyvm has no block devices: 'blk' and 'inc' must be false",
        ));
    }
    if resume {
        return Err(QmpError::generic(
            "Cannot resume if there is no paused migration",
        ));
    }
    backend.migrate(&uri)?;
    Ok(json!({}))
}

/// `migrate-incoming`.
pub(super) fn migrate_incoming(
    mut args: Args<'_>,
    backend: &dyn Backend,
) -> Result<Value, QmpError> {
    let uri = args.optional("uri", string)?;
    let channels = args.member("channels").is_some();
    args.finish()?;
    let uri = match (uri, channels) {
        (Some(_), true) => return Err(exclusive("migrate-incoming")),
        (None, false) => {
            return Err(QmpError::generic(
                "neither 'uri' or 'channels' argument are specified in 'migrate-incoming' qmp \
                 command ",
            ))
        }
        (None, true) => {
            return Err(QmpError::generic(
                "dirtyvm takes the address as 'uri'; 'channels' is not supported",
            ))
        }
        (Some(uri), false) => uri,
    };
    backend
        .migration()
        .migrate_incoming(&uri)
        .map_err(|e| QmpError::generic(e.0))?;
    Ok(json!({}))
}

fn exclusive(command: &str) -> QmpError {
    // The trailing space is QEMU's.
    QmpError::generic(format!(
        "'uri' and 'channels' arguments are mutually exclusive; exactly one of the two should \
         be present in '{command}' qmp command "
    ))
}

/// `query-migrate`: which members appear depends on the side and the status.
pub(super) fn info(info: &MigrationInfo) -> Value {
    let mut reply = Map::new();
    let Some(role) = info.role else {
        return Value::Object(reply);
    };
    let status = info.status;
    reply.insert("status".into(), status.name().into());
    match role {
        Role::Destination => {
            if let Some(address) = &info.listening {
                reply.insert("socket-address".into(), json!([socket_address(address)]));
            }
        }
        Role::Source => match status {
            MigrationStatus::Active | MigrationStatus::Cancelling => {
                reply.insert("setup-time".into(), info.setup_time_ms.into());
                reply.insert("total-time".into(), info.total_time_ms.into());
                reply.insert("expected-downtime".into(), info.expected_downtime_ms.into());
                reply.insert("ram".into(), ram(&info.ram));
                if let Some(percent) = info.aids.cpu_throttle_percentage {
                    reply.insert("cpu-throttle-percentage".into(), percent.into());
                }
                if let Some((per_round, ring_full)) = info.aids.dirty_limit_times {
                    reply.insert(
                        "dirty-limit-throttle-time-per-round".into(),
                        per_round.into(),
                    );
                    reply.insert("dirty-limit-ring-full-time".into(), ring_full.into());
                }
                if let Some(ms) = info.expected_completion_ms {
                    reply.insert("x-expected-completion-ms".into(), ms.into());
                }
            }
            MigrationStatus::Completed => {
                reply.insert("setup-time".into(), info.setup_time_ms.into());
                reply.insert("total-time".into(), info.total_time_ms.into());
                reply.insert("downtime".into(), info.downtime_ms.unwrap_or(0).into());
                let done = RamStats {
                    remaining: 0,
                    dirty_pages_rate: 0,
                    ..info.ram.clone()
                };
                reply.insert("ram".into(), ram(&done));
            }
            _ => {}
        },
    }
    // QEMU 8.2: whenever an error was recorded.
    if let Some(error) = &info.error {
        reply.insert("error-desc".into(), error.as_str().into());
    }
    Value::Object(reply)
}

/// `MigrationStats`: every member is mandatory; the ones for features dirtyvm lacks are 0.
fn ram(ram: &RamStats) -> Value {
    json!({
        "transferred": ram.transferred,
        "remaining": ram.remaining,
        "total": ram.total,
        "duplicate": ram.duplicate,
        "skipped": 0,
        "normal": ram.normal,
        "normal-bytes": ram.normal_bytes,
        "dirty-pages-rate": ram.dirty_pages_rate,
        "mbps": ram.mbps,
        "dirty-sync-count": ram.dirty_sync_count,
        "postcopy-requests": 0,
        "page-size": ram.page_size,
        "multifd-bytes": 0,
        "pages-per-second": ram.pages_per_second,
        "precopy-bytes": ram.precopy_bytes,
        "downtime-bytes": ram.downtime_bytes,
        "postcopy-bytes": 0,
        "dirty-sync-missed-zero-copy": 0,
    })
}

/// QAPI `SocketAddress`.
fn socket_address(address: &MigrationUri) -> Value {
    match address {
        MigrationUri::Tcp { host, port } => {
            json!({"type": "inet", "host": host, "port": port.to_string()})
        }
        MigrationUri::Unix(path) => json!({"type": "unix", "path": path.display().to_string()}),
    }
}

/// `query-migrate-parameters`: QEMU 8.2's whole reply; the members of features dirtyvm
/// lacks keep QEMU's defaults.
pub(super) fn parameters(p: &Parameters) -> Value {
    json!({
        "announce-initial": 50,
        "announce-max": 550,
        "announce-rounds": 5,
        "announce-step": 100,
        "compress-level": 1,
        "compress-threads": 8,
        "compress-wait-thread": true,
        "decompress-threads": 2,
        "throttle-trigger-threshold": p.throttle_trigger_threshold,
        "cpu-throttle-initial": p.cpu_throttle_initial,
        "cpu-throttle-increment": p.cpu_throttle_increment,
        "cpu-throttle-tailslow": p.cpu_throttle_tailslow,
        "tls-creds": "",
        "tls-hostname": "",
        "tls-authz": "",
        "max-bandwidth": p.max_bandwidth,
        "avail-switchover-bandwidth": p.avail_switchover_bandwidth,
        "downtime-limit": p.downtime_limit_ms,
        "x-checkpoint-delay": 20000,
        "block-incremental": false,
        "multifd-channels": 2,
        "multifd-compression": "none",
        "multifd-zlib-level": 1,
        "multifd-zstd-level": 1,
        "xbzrle-cache-size": 67_108_864,
        "max-postcopy-bandwidth": 0,
        "max-cpu-throttle": p.max_cpu_throttle,
        "x-vcpu-dirty-limit-period": p.vcpu_dirty_limit_period_ms,
        "vcpu-dirty-limit": p.vcpu_dirty_limit,
        "mode": "normal",
        "x-vcpu-dirty-limit-auto": p.vcpu_dirty_limit_auto,
    })
}

/// `migrate-set-parameters`: the members dirtyvm implements, in the schema's order; then
/// `migrate_params_check()` on the result, which is applied only if it passes.
pub(super) fn set_parameters(mut args: Args<'_>, backend: &dyn Backend) -> Result<Value, QmpError> {
    let trigger = args.optional("throttle-trigger-threshold", uint8)?;
    let initial = args.optional("cpu-throttle-initial", uint8)?;
    let increment = args.optional("cpu-throttle-increment", uint8)?;
    let tailslow = args.optional("cpu-throttle-tailslow", boolean)?;
    let max_bandwidth = args.optional("max-bandwidth", uint64)?;
    let switchover = args.optional("avail-switchover-bandwidth", uint64)?;
    let downtime = args.optional("downtime-limit", uint64)?;
    let max_throttle = args.optional("max-cpu-throttle", uint8)?;
    let period = args.optional("x-vcpu-dirty-limit-period", uint64)?;
    let limit = args.optional("vcpu-dirty-limit", uint64)?;
    let auto = args.optional("x-vcpu-dirty-limit-auto", boolean)?;
    args.finish()?;
    backend
        .migration()
        .set_params(|p| {
            fn set<T>(value: Option<T>, field: &mut T) {
                if let Some(value) = value {
                    *field = value;
                }
            }
            set(trigger, &mut p.throttle_trigger_threshold);
            set(initial, &mut p.cpu_throttle_initial);
            set(increment, &mut p.cpu_throttle_increment);
            set(tailslow, &mut p.cpu_throttle_tailslow);
            set(max_bandwidth, &mut p.max_bandwidth);
            set(switchover, &mut p.avail_switchover_bandwidth);
            set(downtime, &mut p.downtime_limit_ms);
            set(max_throttle, &mut p.max_cpu_throttle);
            set(period, &mut p.vcpu_dirty_limit_period_ms);
            set(limit, &mut p.vcpu_dirty_limit);
            set(auto, &mut p.vcpu_dirty_limit_auto);
        })
        .map_err(|e| QmpError::generic(e.0))?;
    Ok(json!({}))
}

/// `query-migrate-capabilities`: every capability of QEMU 8.2's enum, in its order.
pub(super) fn capabilities(caps: &Capabilities) -> Value {
    CAPABILITIES
        .iter()
        .map(|&name| json!({"capability": name, "state": caps.get(name)}))
        .collect()
}

/// `migrate-set-capabilities`: a list of `MigrationCapabilityStatus`, visited element by
/// element, then `migrate_caps_check()` on the result.
pub(super) fn set_capabilities(
    mut args: Args<'_>,
    backend: &dyn Backend,
) -> Result<Value, QmpError> {
    let list = args.required("capabilities", capability_list)?;
    args.finish()?;
    backend
        .migration()
        .set_caps(&list, backend.dirty_ring())
        .map_err(|e| QmpError::generic(e.0))?;
    Ok(json!({}))
}

fn capability_list(value: &Value, name: &str) -> Result<Vec<(&'static str, bool)>, QmpError> {
    let Value::Array(elements) = value else {
        return Err(invalid_type(name, "array"));
    };
    elements
        .iter()
        .enumerate()
        .map(|(index, element)| {
            let path = format!("{name}[{index}]");
            let Value::Object(members) = element else {
                return Err(invalid_type(&path, "object"));
            };
            let member = |member: &str| {
                members.get(member).ok_or_else(|| {
                    QmpError::generic(format!("Parameter '{path}.{member}' is missing"))
                })
            };
            let capability = match member("capability")? {
                Value::String(given) => CAPABILITIES
                    .iter()
                    .copied()
                    .find(|known| known == given)
                    .ok_or_else(|| {
                    QmpError::generic(format!(
                        "Parameter 'capability' does not accept value '{given}'"
                    ))
                })?,
                _ => return Err(invalid_type(&format!("{path}.capability"), "string")),
            };
            let state = boolean(member("state")?, &format!("{path}.state"))?;
            if let Some(other) = members
                .keys()
                .find(|key| *key != "capability" && *key != "state")
            {
                return Err(QmpError::generic(format!(
                    "Parameter '{path}.{other}' is unexpected"
                )));
            }
            Ok((capability, state))
        })
        .collect()
}

fn string(value: &Value, name: &str) -> Result<String, QmpError> {
    value
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| invalid_type(name, "string"))
}

fn boolean(value: &Value, name: &str) -> Result<bool, QmpError> {
    value.as_bool().ok_or_else(|| invalid_type(name, "boolean"))
}

/// QAPI `uint8`: an integer, then QEMU's text for one out of range.
fn uint8(value: &Value, name: &str) -> Result<u8, QmpError> {
    if !value.is_i64() && !value.is_u64() {
        return Err(invalid_type(name, "integer"));
    }
    value
        .as_u64()
        .and_then(|v| u8::try_from(v).ok())
        .ok_or_else(|| QmpError::generic(format!("Parameter '{name}' expects uint8_t")))
}
