//! QMP against QEMU's texts (docs/qmp.md), driven through [`Session`] and
//! through the socket.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::mock::{MockBackend, START_TIME, THREAD_ID_BASE};
use super::{Server, Session};

const NEGOTIATE: &str = r#"{"execute":"qmp_capabilities"}"#;

/// A session on a mock VM with two vCPUs and a dirty ring.
fn session() -> (Session, Arc<MockBackend>) {
    session_with(MockBackend::new(2, true))
}

fn session_with(backend: MockBackend) -> (Session, Arc<MockBackend>) {
    let backend = Arc::new(backend);
    (Session::new(backend.clone()), backend)
}

fn negotiated() -> (Session, Arc<MockBackend>) {
    let (mut session, backend) = session();
    assert_eq!(exchange(&mut session, NEGOTIATE), [json!({"return": {}})]);
    (session, backend)
}

/// Every line parsed, events' timestamps checked and then replaced by a fixed marker.
fn parse_lines(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|line| {
            assert!(line.is_ascii(), "QEMU writes ASCII only: {line}");
            assert!(!line.contains('\n'), "one line per reply: {line}");
            let mut value: Value = serde_json::from_str(line).expect("replies are JSON");
            if let Some(timestamp) = value.get_mut("timestamp") {
                assert!(timestamp["seconds"]
                    .as_u64()
                    .is_some_and(|s| s > 1_600_000_000));
                assert!(timestamp["microseconds"]
                    .as_u64()
                    .is_some_and(|us| us < 1_000_000));
                *timestamp = json!("stamped");
            }
            value
        })
        .collect()
}

fn exchange(session: &mut Session, input: &str) -> Vec<Value> {
    exchange_bytes(session, input.as_bytes())
}

fn exchange_bytes(session: &mut Session, input: &[u8]) -> Vec<Value> {
    parse_lines(&session.feed(input).lines)
}

/// The one reply to one request on a negotiated two-vCPU session.
fn reply(input: &str) -> Value {
    let (mut session, _) = negotiated();
    let mut replies = exchange(&mut session, input);
    assert_eq!(replies.len(), 1, "{input} -> {replies:?}");
    replies.remove(0)
}

fn error(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

fn generic(desc: &str) -> Value {
    error("GenericError", desc)
}

fn event(name: &str) -> Value {
    json!({"timestamp": "stamped", "event": name})
}

#[test]
fn greeting_is_qemu_8_2_in_qemu_style() {
    let greeting = Session::greeting();
    assert_eq!(
        greeting,
        format!(
            r#"{{"QMP": {{"capabilities": [], "version": {{"package": "dirtyvm {}", "qemu": {{"major": 8, "micro": 0, "minor": 2}}}}}}}}"#,
            env!("CARGO_PKG_VERSION")
        )
    );
}

/// docs/qmp.md#a-real-session, row by row, on one session. QEMU 7.2 had no `calc-time-unit`; dirtyvm
/// follows the newer schema, which adds it to `query-dirty-rate`.
#[test]
fn reference_exchange() {
    let (mut session, _) = session();
    let rows: &[(&str, Vec<Value>)] = &[
        (
            r#"{"execute":"query-status"}"#,
            vec![error(
                "CommandNotFound",
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            )],
        ),
        (
            r#"{"execute":"qmp_capabilities","id":1}"#,
            vec![json!({"return": {}, "id": 1})],
        ),
        (
            r#"{"execute":"query-status","id":"a"}"#,
            vec![
                json!({"return": {"status": "running", "singlestep": false, "running": true}, "id": "a"}),
            ],
        ),
        (
            r#"{"execute":"nope"}"#,
            vec![error(
                "CommandNotFound",
                "The command nope has not been found",
            )],
        ),
        (
            "not json\n",
            vec![
                generic("JSON parse error, invalid keyword 'not'"),
                generic("JSON parse error, invalid keyword 'json'"),
            ],
        ),
        ("[1]", vec![generic("QMP input must be a JSON object")]),
        (
            r#"{"arguments":{}}"#,
            vec![generic("QMP input lacks member 'execute'")],
        ),
        (
            r#"{"execute":"query-status","arguments":{"x":1}}"#,
            vec![generic("Parameter 'x' is unexpected")],
        ),
        (
            r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":"x"}}"#,
            vec![generic(
                "Invalid parameter type for 'calc-time', expected: integer",
            )],
        ),
        (
            r#"{"execute":"query-vcpu-dirty-limit"}"#,
            vec![json!({"return": []})],
        ),
        (
            r#"{"execute":"query-dirty-rate"}"#,
            vec![json!({"return": {
                "status": "unstarted", "sample-pages": 0, "mode": "page-sampling",
                "start-time": 0, "calc-time": 0, "calc-time-unit": "second"
            }})],
        ),
        (
            r#"{"execute":"query-cpus-fast"}"#,
            vec![json!({"return": [
                {"thread-id": THREAD_ID_BASE, "props": {"core-id": 0, "thread-id": 0, "socket-id": 0},
                 "qom-path": "/machine/unattached/device[0]", "cpu-index": 0, "target": "x86_64"},
                {"thread-id": THREAD_ID_BASE + 1, "props": {"core-id": 0, "thread-id": 0, "socket-id": 1},
                 "qom-path": "/machine/unattached/device[1]", "cpu-index": 1, "target": "x86_64"},
            ]})],
        ),
        (
            r#"{"execute":"stop"}"#,
            vec![event("STOP"), json!({"return": {}})],
        ),
        (
            r#"{"execute":"cont"}"#,
            vec![event("RESUME"), json!({"return": {}})],
        ),
    ];
    for (request, replies) in rows {
        assert_eq!(&exchange(&mut session, request), replies, "{request}");
    }
}

#[test]
fn replies_are_written_as_qemu_writes_them() {
    let (mut session, _) = negotiated();
    let output =
        session.feed(br#"{"execute":"query-status","id":["\u00e9\ud83d\ude00\u0000",1.5]}"#);
    assert_eq!(
        output.lines,
        [
            r#"{"id": ["\u00E9\uD83D\uDE00\u0000", 1.5], "return": {"running": true, "singlestep": false, "status": "running"}}"#
        ]
    );
}

#[test]
fn negotiation() {
    let (mut session, _) = session();
    // Malformed requests are refused for what they are, negotiated or not.
    assert_eq!(
        exchange(&mut session, r#"{"execute":1,"id":2}"#),
        [
            json!({"error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}, "id": 2})
        ]
    );
    assert_eq!(
        exchange(&mut session, r#"{"execute":"nope","id":3}"#),
        [
            json!({"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 3})
        ]
    );
    assert_eq!(
        exchange(
            &mut session,
            r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#
        ),
        [generic("Capability oob not available")]
    );
    assert_eq!(
        exchange(
            &mut session,
            r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob","oob"]}}"#
        ),
        [generic("Capability oob, oob not available")]
    );
    assert_eq!(
        exchange(
            &mut session,
            r#"{"execute":"qmp_capabilities","arguments":{"enable":["x"]}}"#
        ),
        [generic("Parameter 'null' does not accept value 'x'")]
    );
    assert_eq!(
        exchange(
            &mut session,
            r#"{"execute":"qmp_capabilities","arguments":{"enable":[1]}}"#
        ),
        [generic(
            "Invalid parameter type for 'enable[0]', expected: string"
        )]
    );
    assert_eq!(
        exchange(
            &mut session,
            r#"{"execute":"qmp_capabilities","arguments":{"enable":"oob"}}"#
        ),
        [generic(
            "Invalid parameter type for 'enable', expected: array"
        )]
    );
    assert_eq!(
        exchange(
            &mut session,
            r#"{"execute":"qmp_capabilities","arguments":{"enable":[]}}"#
        ),
        [json!({"return": {}})]
    );
    assert_eq!(
        exchange(&mut session, NEGOTIATE),
        [error(
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored"
        )]
    );
    assert_eq!(
        exchange(&mut session, r#"{"execute":"nope"}"#),
        [error(
            "CommandNotFound",
            "The command nope has not been found"
        )]
    );
}

#[test]
fn request_errors() {
    let cases = [
        (
            r#"{"execute":["query-status"]}"#,
            "QMP input member 'execute' must be a string",
        ),
        (
            r#"{"execute":"query-status","arguments":[]}"#,
            "QMP input member 'arguments' must be an object",
        ),
        (
            r#"{"execute":"query-status","arguments":null}"#,
            "QMP input member 'arguments' must be an object",
        ),
        (
            r#"{"execute":"query-status","foo":1}"#,
            "QMP input member 'foo' is unexpected",
        ),
        (
            r#"{"exec-oob":"query-status"}"#,
            "QMP input member 'exec-oob' is unexpected",
        ),
        (r#"{"id":1}"#, "QMP input lacks member 'execute'"),
        (r#"{}"#, "QMP input lacks member 'execute'"),
        // A number or keyword at the end of input ends only at the next byte, as in QEMU.
        ("1\n", "QMP input must be a JSON object"),
        (r#""query-status""#, "QMP input must be a JSON object"),
        ("null\n", "QMP input must be a JSON object"),
    ];
    for (request, desc) in cases {
        let mut expected = generic(desc);
        if request.contains("\"id\"") {
            expected["id"] = json!(1);
        }
        assert_eq!(reply(request), expected, "{request}");
    }
}

#[test]
fn argument_errors_in_qapi_order() {
    let cases = [
        (
            r#"{"execute":"calc-dirty-rate"}"#,
            "Parameter 'calc-time' is missing",
        ),
        (
            r#"{"execute":"calc-dirty-rate","arguments":{"bogus":1}}"#,
            "Parameter 'calc-time' is missing",
        ),
        (
            r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":"x","bogus":1}}"#,
            "Invalid parameter type for 'calc-time', expected: integer",
        ),
        (
            r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":1,"bogus":1}}"#,
            "Parameter 'bogus' is unexpected",
        ),
        (
            r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":1.5}}"#,
            "Invalid parameter type for 'calc-time', expected: integer",
        ),
        (
            r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":1e3}}"#,
            "Invalid parameter type for 'calc-time', expected: integer",
        ),
        (
            r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":null}}"#,
            "Invalid parameter type for 'calc-time', expected: integer",
        ),
        (
            r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":9223372036854775808}}"#,
            "Invalid parameter type for 'calc-time', expected: integer",
        ),
        (
            r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":1,"calc-time-unit":"minute"}}"#,
            "Parameter 'calc-time-unit' does not accept value 'minute'",
        ),
        (
            r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":1,"sample-pages":true}}"#,
            "Invalid parameter type for 'sample-pages', expected: integer",
        ),
        (
            r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":1,"mode":1}}"#,
            "Invalid parameter type for 'mode', expected: string",
        ),
        (
            r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":1,"mode":"x"}}"#,
            "Parameter 'mode' does not accept value 'x'",
        ),
        (
            r#"{"execute":"query-dirty-rate","arguments":{"calc-time-unit":2}}"#,
            "Invalid parameter type for 'calc-time-unit', expected: string",
        ),
        (
            r#"{"execute":"set-vcpu-dirty-limit"}"#,
            "Parameter 'dirty-rate' is missing",
        ),
        (
            r#"{"execute":"set-vcpu-dirty-limit","arguments":{"cpu-index":"0","dirty-rate":1}}"#,
            "Invalid parameter type for 'cpu-index', expected: integer",
        ),
        (
            r#"{"execute":"set-vcpu-dirty-limit","arguments":{"dirty-rate":-1}}"#,
            "Parameter 'dirty-rate' expects uint64",
        ),
        (
            r#"{"execute":"set-vcpu-dirty-limit","arguments":{"dirty-rate":"1"}}"#,
            "Parameter 'dirty-rate' expects uint64",
        ),
        (
            r#"{"execute":"set-vcpu-dirty-limit","arguments":{"dirty-rate":1.5}}"#,
            "Parameter 'dirty-rate' expects uint64",
        ),
        (
            r#"{"execute":"set-vcpu-dirty-limit","arguments":{"dirty-rate":18446744073709551616}}"#,
            "Parameter 'dirty-rate' expects uint64",
        ),
        (
            r#"{"execute":"cancel-vcpu-dirty-limit","arguments":{"cpu-index":0.0}}"#,
            "Invalid parameter type for 'cpu-index', expected: integer",
        ),
        (
            r#"{"execute":"cancel-vcpu-dirty-limit","arguments":{"dirty-rate":1}}"#,
            "Parameter 'dirty-rate' is unexpected",
        ),
        (
            r#"{"execute":"query-vcpu-dirty-limit","arguments":{"cpu-index":0}}"#,
            "Parameter 'cpu-index' is unexpected",
        ),
        (
            r#"{"execute":"stop","arguments":{"x":1}}"#,
            "Parameter 'x' is unexpected",
        ),
        (
            r#"{"execute":"x-set-auto-converge"}"#,
            "Parameter 'percent' is missing",
        ),
        (
            r#"{"execute":"x-set-auto-converge","arguments":{"percent":"20"}}"#,
            "Invalid parameter type for 'percent', expected: integer",
        ),
        (
            r#"{"execute":"x-set-auto-converge","arguments":{"percent":100}}"#,
            "Parameter 'percent' expects an integer in the range of 0 to 99",
        ),
        (
            r#"{"execute":"x-set-auto-converge","arguments":{"percent":-1}}"#,
            "Parameter 'percent' expects an integer in the range of 0 to 99",
        ),
        (
            r#"{"execute":"x-query-reaper","arguments":{"verbose":true}}"#,
            "Parameter 'verbose' is unexpected",
        ),
    ];
    for (request, desc) in cases {
        assert_eq!(reply(request), generic(desc), "{request}");
    }
}

#[test]
fn calc_dirty_rate_checks_in_qemu_order() {
    let calc = |arguments: &str| {
        reply(&format!(
            r#"{{"execute":"calc-dirty-rate","arguments":{arguments}}}"#
        ))
    };
    let out_of_range = generic("Calculation time is out of range [50ms, 60000ms].");
    let ok = json!({"return": {}});
    assert_eq!(calc(r#"{"calc-time":0}"#), out_of_range);
    assert_eq!(calc(r#"{"calc-time":-1}"#), out_of_range);
    assert_eq!(calc(r#"{"calc-time":61}"#), out_of_range);
    assert_eq!(calc(r#"{"calc-time":9223372036854775807}"#), out_of_range);
    assert_eq!(
        calc(r#"{"calc-time":49,"calc-time-unit":"millisecond"}"#),
        out_of_range
    );
    assert_eq!(
        calc(r#"{"calc-time":60001,"calc-time-unit":"millisecond"}"#),
        out_of_range
    );
    assert_eq!(calc(r#"{"calc-time":60}"#), ok);
    assert_eq!(
        calc(r#"{"calc-time":50,"calc-time-unit":"millisecond"}"#),
        ok
    );
    assert_eq!(calc(r#"{"calc-time":1,"calc-time-unit":"second"}"#), ok);
    // Range before mode, mode before sample-pages' range.
    assert_eq!(
        calc(r#"{"calc-time":0,"sample-pages":1,"mode":"dirty-ring"}"#),
        out_of_range
    );
    assert_eq!(
        calc(r#"{"calc-time":1,"sample-pages":1,"mode":"dirty-ring"}"#),
        generic("sample-pages is used only in page-sampling mode")
    );
    let pages_out_of_range = generic("sample-pages is out of range[128, 16384].");
    assert_eq!(
        calc(r#"{"calc-time":1,"sample-pages":127}"#),
        pages_out_of_range
    );
    assert_eq!(
        calc(r#"{"calc-time":1,"sample-pages":16385}"#),
        pages_out_of_range
    );
    assert_eq!(
        calc(r#"{"calc-time":1,"sample-pages":-128}"#),
        pages_out_of_range
    );
    assert_eq!(calc(r#"{"calc-time":1,"sample-pages":128}"#), ok);
    assert_eq!(
        calc(r#"{"calc-time":1,"sample-pages":16384,"mode":"page-sampling"}"#),
        ok
    );
    // The backend knows which modes this VM can measure.
    assert_eq!(
        calc(r#"{"calc-time":1,"mode":"dirty-bitmap"}"#),
        generic("mode dirty-bitmap is not enabled, use other method instead.")
    );
    assert_eq!(calc(r#"{"calc-time":1,"mode":"dirty-ring"}"#), ok);

    // A measurement under way is refused before anything else is looked at.
    let (mut session, _) = negotiated();
    let start = r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":1}}"#;
    assert_eq!(exchange(&mut session, start), [ok]);
    assert_eq!(
        exchange(
            &mut session,
            r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":0,"mode":"dirty-bitmap"}}"#
        ),
        [generic("the dirty rate is already being measured.")]
    );
}

#[test]
fn query_dirty_rate_follows_the_measurement() {
    let (mut session, _) = negotiated();
    let query = r#"{"execute":"query-dirty-rate"}"#;
    let query_ms = r#"{"execute":"query-dirty-rate","arguments":{"calc-time-unit":"millisecond"}}"#;

    exchange(
        &mut session,
        r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":1500,"calc-time-unit":"millisecond","mode":"dirty-ring"}}"#,
    );
    assert_eq!(
        exchange(&mut session, query),
        [json!({"return": {
            "status": "measuring", "start-time": START_TIME, "calc-time": 1,
            "calc-time-unit": "second", "sample-pages": 512, "mode": "dirty-ring"
        }})]
    );
    assert_eq!(
        exchange(&mut session, query_ms),
        [json!({"return": {
            "status": "measured", "dirty-rate": 100, "start-time": START_TIME, "calc-time": 1500,
            "calc-time-unit": "millisecond", "sample-pages": 0, "mode": "dirty-ring",
            "vcpu-dirty-rate": [{"id": 0, "dirty-rate": 50}, {"id": 1, "dirty-rate": 50}]
        }})]
    );

    exchange(
        &mut session,
        r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":2,"sample-pages":256}}"#,
    );
    exchange(&mut session, query);
    assert_eq!(
        exchange(&mut session, query),
        [json!({"return": {
            "status": "measured", "dirty-rate": 100, "start-time": START_TIME, "calc-time": 2,
            "calc-time-unit": "second", "sample-pages": 256, "mode": "page-sampling"
        }})]
    );
}

#[test]
fn dirty_limit() {
    let (mut session, _) = negotiated();
    let query = r#"{"execute":"query-vcpu-dirty-limit"}"#;
    let ok = || json!({"return": {}});
    let set = |cpu: &str, rate: u64| {
        format!(r#"{{"execute":"set-vcpu-dirty-limit","arguments":{{{cpu}"dirty-rate":{rate}}}}}"#)
    };
    assert_eq!(
        exchange(&mut session, &set(r#""cpu-index":0,"#, 60)),
        [ok()]
    );
    assert_eq!(
        exchange(&mut session, query),
        [json!({"return": [{"cpu-index": 0, "limit-rate": 60, "current-rate": 50}]})]
    );
    assert_eq!(exchange(&mut session, &set("", 20)), [ok()]);
    assert_eq!(
        exchange(&mut session, query),
        [json!({"return": [
            {"cpu-index": 0, "limit-rate": 20, "current-rate": 20},
            {"cpu-index": 1, "limit-rate": 20, "current-rate": 20},
        ]})]
    );
    assert_eq!(
        exchange(
            &mut session,
            r#"{"execute":"cancel-vcpu-dirty-limit","arguments":{"cpu-index":1}}"#
        ),
        [ok()]
    );
    // A rate of 0 cancels, as in QEMU.
    assert_eq!(exchange(&mut session, &set(r#""cpu-index":0,"#, 0)), [ok()]);
    assert_eq!(exchange(&mut session, query), [json!({"return": []})]);
    assert_eq!(
        exchange(&mut session, r#"{"execute":"cancel-vcpu-dirty-limit"}"#),
        [ok()]
    );

    let incorrect = || generic("incorrect cpu index specified");
    for cpu_index in ["2", "-1", "4294967296", "9223372036854775807"] {
        let cpu = format!(r#""cpu-index":{cpu_index},"#);
        assert_eq!(exchange(&mut session, &set(&cpu, 10)), [incorrect()]);
        let cancel = format!(
            r#"{{"execute":"cancel-vcpu-dirty-limit","arguments":{{"cpu-index":{cpu_index}}}}}"#
        );
        assert_eq!(exchange(&mut session, &cancel), [incorrect()]);
    }
    assert_eq!(
        exchange(&mut session, &set("", u64::MAX)),
        [json!({"return": {}})]
    );
}

#[test]
fn dirty_limit_needs_a_ring() {
    let (mut session, _) = session_with(MockBackend::new(1, false));
    exchange(&mut session, NEGOTIATE);
    assert_eq!(
        exchange(&mut session, r#"{"execute":"set-vcpu-dirty-limit","arguments":{"dirty-rate":10}}"#),
        [generic("dirty page limit feature requires KVM with accelerator property 'dirty-ring-size' set'")]
    );
    assert_eq!(
        exchange(&mut session, r#"{"execute":"cancel-vcpu-dirty-limit"}"#),
        [json!({"return": {}})]
    );
    assert_eq!(
        exchange(
            &mut session,
            r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":1,"mode":"dirty-ring"}}"#
        ),
        [generic(
            "mode dirty-ring is not enabled, use other method instead."
        )]
    );
}

#[test]
fn extensions() {
    let (mut session, _) = negotiated();
    let counters = exchange(&mut session, r#"{"execute":"x-query-vcpu-counters"}"#);
    assert_eq!(
        counters[0]["return"]["vcpus"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(
        exchange(&mut session, r#"{"execute":"x-query-reaper"}"#),
        [json!({"return": {"mode": "adaptive", "reaps": 0, "interval-ms": 1000}})]
    );
    let query = r#"{"execute":"x-query-auto-converge"}"#;
    assert_eq!(
        exchange(
            &mut session,
            r#"{"execute":"x-set-auto-converge","arguments":{"percent":99}}"#
        ),
        [json!({"return": {}})]
    );
    assert_eq!(
        exchange(&mut session, query),
        [json!({"return": {"active": true, "percent": 99}})]
    );
    exchange(
        &mut session,
        r#"{"execute":"x-set-auto-converge","arguments":{"percent":0}}"#,
    );
    assert_eq!(
        exchange(&mut session, query),
        [json!({"return": {"active": false, "percent": 0}})]
    );
}

#[test]
fn migration_parameters_follow_qemu_8_2() {
    let query = r#"{"execute":"query-migrate-parameters"}"#;
    let defaults = reply(query);
    let params = &defaults["return"];
    assert_eq!(params["max-bandwidth"], 134_217_728);
    assert_eq!(params["downtime-limit"], 300);
    assert_eq!(params["avail-switchover-bandwidth"], 0);
    assert_eq!(params["throttle-trigger-threshold"], 50);
    assert_eq!(params["cpu-throttle-initial"], 20);
    assert_eq!(params["cpu-throttle-increment"], 10);
    assert_eq!(params["cpu-throttle-tailslow"], false);
    assert_eq!(params["max-cpu-throttle"], 99);
    assert_eq!(params["x-vcpu-dirty-limit-period"], 1000);
    assert_eq!(params["vcpu-dirty-limit"], 1);
    assert_eq!(params["mode"], "normal");
    let set = |args: &str| {
        reply(&format!(
            r#"{{"execute":"migrate-set-parameters","arguments":{args}}}"#
        ))
    };
    for (args, want) in [
        (r#"{"downtime-limit": 2000001}"#, "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"),
        (r#"{"cpu-throttle-initial": 300}"#, "Parameter 'cpu-throttle-initial' expects uint8_t"),
        (r#"{"cpu-throttle-initial": -1}"#, "Parameter 'cpu-throttle-initial' expects uint8_t"),
        (r#"{"cpu-throttle-initial": "x"}"#, "Invalid parameter type for 'cpu-throttle-initial', expected: integer"),
        (r#"{"cpu-throttle-initial": 0}"#, "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
        (r#"{"throttle-trigger-threshold": 101}"#, "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"),
        (r#"{"cpu-throttle-tailslow": 1}"#, "Invalid parameter type for 'cpu-throttle-tailslow', expected: boolean"),
        (r#"{"max-bandwidth": "fast"}"#, "Parameter 'max-bandwidth' expects uint64"),
        (r#"{"x-vcpu-dirty-limit-period": 0}"#, "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000"),
        (r#"{"vcpu-dirty-limit": 0}"#, "Parameter 'vcpu_dirty_limit' expects is invalid, it must greater then 1 MB/s"),
        (r#"{"compress-level": 1}"#, "Parameter 'compress-level' is unexpected"),
        // Checked on the merged result: a ceiling below the new floor fails on the ceiling.
        (r#"{"cpu-throttle-initial": 60, "max-cpu-throttle": 50}"#, "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
    ] {
        assert_eq!(set(args), generic(want), "{args}");
    }
    // A refused change applies nothing; an accepted one shows.
    let (mut session, _) = negotiated();
    let lines = exchange(
        &mut session,
        r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth": 1048576, "downtime-limit": 0}}
           {"execute":"migrate-set-parameters","arguments":{"downtime-limit": 5, "vcpu-dirty-limit": 0}}
           {"execute":"query-migrate-parameters"}"#,
    );
    assert_eq!(lines[0], json!({"return": {}}));
    assert!(lines[1].get("error").is_some());
    assert_eq!(lines[2]["return"]["max-bandwidth"], 1_048_576);
    assert_eq!(lines[2]["return"]["downtime-limit"], 0);
}

#[test]
fn migration_capabilities_follow_qemu_8_2() {
    let caps = reply(r#"{"execute":"query-migrate-capabilities"}"#);
    let list = caps["return"].as_array().unwrap();
    assert_eq!(list.len(), 23);
    assert_eq!(list[0], json!({"capability": "xbzrle", "state": false}));
    assert_eq!(
        list[22],
        json!({"capability": "dirty-limit", "state": false})
    );
    let set = |caps: &str| {
        reply(&format!(
            r#"{{"execute":"migrate-set-capabilities","arguments":{{"capabilities":{caps}}}}}"#
        ))
    };
    for (caps, want) in [
        (
            r#"[{"capability": "nope", "state": true}]"#,
            "Parameter 'capability' does not accept value 'nope'",
        ),
        (
            r#"[{"capability": "events"}]"#,
            "Parameter 'capabilities[0].state' is missing",
        ),
        (
            r#"[{"state": true}]"#,
            "Parameter 'capabilities[0].capability' is missing",
        ),
        (
            r#"[{"capability": "events", "state": 1}]"#,
            "Invalid parameter type for 'capabilities[0].state', expected: boolean",
        ),
        (
            r#"[{"capability": "events", "state": true, "x": 1}]"#,
            "Parameter 'capabilities[0].x' is unexpected",
        ),
        (
            r#"[1]"#,
            "Invalid parameter type for 'capabilities[0]', expected: object",
        ),
        (
            r#"{}"#,
            "Invalid parameter type for 'capabilities', expected: array",
        ),
        (
            r#"[{"capability": "dirty-limit", "state": true}, {"capability": "auto-converge", "state": true}]"#,
            "dirty-limit conflicts with auto-converge either of then available currently",
        ),
        (
            r#"[{"capability": "xbzrle", "state": true}]"#,
            "Capability 'xbzrle' is not supported by dirtyvm",
        ),
    ] {
        assert_eq!(set(caps), generic(want), "{caps}");
    }
    assert_eq!(
        set(r#"[{"capability": "xbzrle", "state": false}]"#),
        json!({"return": {}})
    );
    // Without a dirty ring, QEMU's text.
    let (mut session, _) = session_with(MockBackend::new(2, false));
    exchange(&mut session, NEGOTIATE);
    assert_eq!(
        exchange(
            &mut session,
            r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"dirty-limit","state":true}]}}"#
        ),
        [generic(
            "dirty-limit requires KVM with accelerator property 'dirty-ring-size' set"
        )]
    );
}

#[test]
fn migration_commands_before_any_migration() {
    assert_eq!(
        reply(r#"{"execute":"query-migrate"}"#),
        json!({"return": {}})
    );
    assert_eq!(
        reply(r#"{"execute":"migrate_cancel"}"#),
        json!({"return": {}})
    );
    assert_eq!(
        reply(r#"{"execute":"migrate","arguments":{"uri":"foo:bar"}}"#),
        generic("unknown migration protocol: foo:bar")
    );
    assert_eq!(
        reply(r#"{"execute":"migrate","arguments":{"uri":"tcp:nohostport"}}"#),
        generic("error parsing address 'nohostport'")
    );
    assert_eq!(
        reply(r#"{"execute":"migrate"}"#),
        generic("Parameter 'uri' is missing")
    );
    assert_eq!(
        reply(r#"{"execute":"migrate","arguments":{"uri":"unix:/x","resume":true}}"#),
        generic("Cannot resume if there is no paused migration")
    );
    assert_eq!(
        reply(r#"{"execute":"migrate","arguments":{"uri":"unix:/x","channels":[]}}"#),
        generic("'uri' and 'channels' arguments are mutually exclusive; exactly one of the two should be present in 'migrate' qmp command ")
    );
    assert_eq!(
        reply(r#"{"execute":"migrate-incoming","arguments":{"uri":"unix:/x"}}"#),
        generic("'-incoming' was not specified on the command line")
    );
}

#[test]
fn stop_and_cont_send_events_only_on_a_change() {
    let (mut session, _) = negotiated();
    let status = r#"{"execute":"query-status"}"#;
    assert_eq!(
        exchange(&mut session, r#"{"execute":"cont"}"#),
        [json!({"return": {}})]
    );
    assert_eq!(
        exchange(
            &mut session,
            r#"{"execute":"stop","id":1}{"execute":"stop","id":2}"#
        ),
        [
            event("STOP"),
            json!({"return": {}, "id": 1}),
            json!({"return": {}, "id": 2})
        ]
    );
    assert_eq!(
        exchange(&mut session, status),
        [json!({"return": {"status": "paused", "singlestep": false, "running": false}})]
    );
    assert_eq!(
        exchange(&mut session, r#"{"execute":"cont"}"#),
        [event("RESUME"), json!({"return": {}})]
    );
}

#[test]
fn quit_replies_then_shuts_down_and_closes() {
    let (mut session, backend) = negotiated();
    let output = session.feed(br#"{"execute":"quit","id":7} {"execute":"query-status"}"#);
    assert!(output.close);
    assert_eq!(
        parse_lines(&output.lines),
        [
            json!({"return": {}, "id": 7}),
            json!({"timestamp": "stamped", "event": "SHUTDOWN",
                   "data": {"guest": false, "reason": "host-qmp-quit"}}),
        ]
    );
    assert!(backend.quit_requested());
    let after = session.feed(br#"{"execute":"query-status"}"#);
    assert!(after.close && after.lines.is_empty());
}

#[test]
fn id_is_echoed_whatever_it_is() {
    let ids = [
        "0",
        "-9223372036854775808",
        "18446744073709551615",
        "99999999999999999999",
        "1.5",
        "-0.25e-3",
        "\"a\"",
        "\"\"",
        "null",
        "true",
        "[]",
        "[1,\"two\",{\"three\":[3]}]",
        "{}",
        "{\"nested\":{\"id\":[null,false]}}",
    ];
    for id in ids {
        let expected: Value = serde_json::from_str(id).unwrap();
        let (mut session, _) = session();
        // Refused before negotiation, refused as malformed, answered after negotiation, and
        // refused by the command: the id comes back each time.
        let requests = [
            format!(r#"{{"execute":"query-status","id":{id}}}"#),
            format!(r#"{{"id":{id}}}"#),
            format!(r#"{{"execute":"qmp_capabilities","id":{id}}}"#),
            format!(r#"{{"execute":"query-status","id":{id}}}"#),
            format!(r#"{{"execute":"nope","id":{id}}}"#),
            format!(r#"{{"id":{id},"execute":"calc-dirty-rate","arguments":{{"calc-time":0}}}}"#),
        ];
        for request in requests {
            let replies = exchange(&mut session, &request);
            assert_eq!(replies.len(), 1, "{request}");
            assert_eq!(replies[0]["id"], expected, "{request}");
        }
    }
    assert_eq!(
        reply(r#"{"execute":"query-status","id":1e999}"#)["id"],
        Value::Null
    );
}

#[test]
fn json_errors_are_qemu_s_and_the_stream_carries_on() {
    let cases: &[(&[u8], &[&str])] = &[
        (b"@", &["JSON parse error, stray '@'"]),
        (
            b"@@@ \t{}",
            &[
                "JSON parse error, stray '@'",
                "QMP input lacks member 'execute'",
            ],
        ),
        (b"01", &["JSON parse error, stray '01'"]),
        (b"- ", &["JSON parse error, stray '- '"]),
        (b"1. ", &["JSON parse error, stray '1. '"]),
        (b"1e+x", &["JSON parse error, stray '1e+x'"]),
        (b"%d", &["JSON parse error, stray '%'"]),
        (b"\"a\x01\"", &["JSON parse error, stray '\"a\x01'"]),
        (b"\"\xfe\"", &["JSON parse error, stray '\"\u{fffd}'"]),
        (b"}", &["JSON parse error, expecting value"]),
        (b"]", &["JSON parse error, expecting value"]),
        (b",", &["JSON parse error, expecting value"]),
        (b"nul", &["JSON parse error, invalid keyword 'nul'"]),
        (br#"{"a":1,"a":2}"#, &["JSON parse error, duplicate key"]),
        (
            br#"{"execute":"query-status",}"#,
            &["JSON parse error, expecting value"],
        ),
        (
            br#"{1:2}"#,
            &["JSON parse error, key is not a string in object"],
        ),
        (
            br#"{"a" 1}"#,
            &["JSON parse error, missing : in object pair"],
        ),
        (br#"{"a":}"#, &["JSON parse error, expecting value"]),
        (
            br#"{"a":1 "b":2}"#,
            &["JSON parse error, expected separator in dict"],
        ),
        (b"[1 2]", &["JSON parse error, expected separator in list"]),
        (b"[1,]", &["JSON parse error, expecting value"]),
        (b"{]", &["JSON parse error, expecting value"]),
        // QEMU keeps collecting an array across a stray '}' (see json.rs).
        (b"[}]", &["JSON parse error, expecting value"]),
        (
            br#""\x""#,
            &["JSON parse error, invalid escape sequence in string"],
        ),
        (
            br#""\uD800""#,
            &["JSON parse error, \\uD800 is not a valid Unicode character"],
        ),
        (
            br#""\uD800\u0041""#,
            &["JSON parse error, \\uD800 is not a valid Unicode character"],
        ),
        (
            br#""\uFFFF""#,
            &["JSON parse error, \\uFFFF is not a valid Unicode character"],
        ),
        (
            br#""\uFDD0""#,
            &["JSON parse error, \\uFDD0 is not a valid Unicode character"],
        ),
        (
            br#""\u12""#,
            &["JSON parse error, \\u12\" is not a valid Unicode character"],
        ),
        (
            b"\"\xc3\x28\"",
            &["JSON parse error, invalid UTF-8 sequence in string"],
        ),
        (
            b"\"\xc1\xbf\"",
            &["JSON parse error, invalid UTF-8 sequence in string"],
        ),
        (
            b"\"\xed\xa0\x80\"",
            &["JSON parse error, invalid UTF-8 sequence in string"],
        ),
        // A lexical error drops the unfinished value; the lexer resumes at the next
        // structural character, here the '}', which is then a stray of its own.
        (
            br#"{"execute": "query-status" @ }"#,
            &[
                "JSON parse error, stray '@'",
                "JSON parse error, expecting value",
            ],
        ),
        // Resynchronization at a newline.
        (
            b"'abc\x01def\n[1]",
            &[
                "JSON parse error, stray ''abc\x01'",
                "QMP input must be a JSON object",
            ],
        ),
    ];
    for &(input, descs) in cases {
        let (mut session, _) = negotiated();
        let mut expected: Vec<Value> = descs.iter().map(|desc| generic(desc)).collect();
        let mut replies = exchange_bytes(&mut session, input);
        // Whatever came before, the next request is answered.
        replies.extend(exchange(&mut session, "\n{\"execute\":\"query-status\"}"));
        expected
            .push(json!({"return": {"status": "running", "singlestep": false, "running": true}}));
        assert_eq!(replies, expected, "{}", String::from_utf8_lossy(input));
    }
}

#[test]
fn qemu_json_extensions_are_accepted() {
    let accepted: &[&[u8]] = &[
        b"{'execute':'query-status'}",
        br#"{"execute":"query\u002dstatus"}"#,
        b"{\"execute\":\"query-status\",'id':'\\'\\\"'}",
        b" \t\r\n{\n\"execute\"\n:\n\"query-status\"\n}",
        b"{\"execute\":\"query-status\",\"id\":\"\xc0\x80\"}",
    ];
    for &input in accepted {
        let replies = {
            let (mut session, _) = negotiated();
            exchange_bytes(&mut session, input)
        };
        assert_eq!(replies.len(), 1, "{}", String::from_utf8_lossy(input));
        assert_eq!(replies[0]["return"]["status"], "running");
    }
    assert_eq!(
        reply("{\"execute\":\"query-status\",'id':'\\'\\\"'}")["id"],
        "'\""
    );
    let (mut session, _) = negotiated();
    let modified_utf8_nul = exchange_bytes(
        &mut session,
        b"{\"execute\":\"query-status\",\"id\":\"\xc0\x80\"}",
    );
    assert_eq!(modified_utf8_nul[0]["id"], "\0");
}

#[test]
fn nesting_is_limited_as_in_qemu() {
    let (mut session, _) = negotiated();
    let deep = format!("{}{}", "[".repeat(1024), "]".repeat(1024));
    assert_eq!(
        exchange(&mut session, &deep),
        [generic("QMP input must be a JSON object")]
    );
    // Deeper than serde_json reads by default: compared as text.
    let id = format!("{}1{}", "[".repeat(1023), "]".repeat(1023));
    let request = format!(r#"{{"execute":"query-status","id":{id}}}"#);
    assert_eq!(
        session.feed(request.as_bytes()).lines,
        [format!(
            r#"{{"id": {id}, "return": {{"running": true, "singlestep": false, "status": "running"}}}}"#
        )]
    );
    assert_eq!(
        exchange(&mut session, &"[".repeat(1025)),
        [generic("JSON nesting depth limit exceeded")]
    );
}

#[test]
fn an_oversized_message_gets_one_error_and_ends_the_session() {
    let too_long = || generic("JSON token size limit exceeded");
    let two_mib = 2 << 20;
    let inputs = [
        "x".repeat(two_mib),
        format!(r#"{{"execute":"{}"#, "a".repeat(two_mib)),
        format!("[{}", "1,".repeat(two_mib / 2)),
    ];
    for input in inputs {
        let (mut session, _) = negotiated();
        let output = session.feed(input.as_bytes());
        assert!(output.close);
        assert_eq!(parse_lines(&output.lines), [too_long()]);
    }

    // Just under the limit is fine, and whitespace does not count.
    let (mut session, _) = negotiated();
    let id = "i".repeat(super::json::MAX_MESSAGE_BYTES - 64);
    let request = format!(
        r#"{}{{"execute": "query-status", "id": "{id}"}}"#,
        " ".repeat(two_mib)
    );
    let output = session.feed(request.as_bytes());
    assert!(!output.close);
    assert_eq!(parse_lines(&output.lines)[0]["id"], json!(id));
}

/// Requests of every kind, good and bad, with events; the replies must not depend on how
/// the bytes are split.
const SCRIPT: &[u8] = b"{\"execute\":\"query-status\",\"id\":0}\r\n\
{\"execute\":\"qmp_capabilities\",\"id\":{\"a\":[1,2.5,\"x\"]}}\n\
not json @@ {\"execute\": \"stop\"}{\"execute\":\"cont\",\"id\":\"c\"}\n\
[1] {} {\"arguments\":{}} 'str' 12 -3.5e2 true null \"\\u00e9\\uD83D\\uDE00\" \"\xc3\xa9\"\n\
{\"execute\":\"calc-dirty-rate\",\"arguments\":{\"calc-time\":500,\"calc-time-unit\":\"millisecond\",\"mode\":\"dirty-ring\"}}\n\
{\"execute\":\"query-dirty-rate\"}{\"execute\":\"query-dirty-rate\",\"arguments\":{\"calc-time-unit\":\"millisecond\"}}\n\
{\"execute\":\"set-vcpu-dirty-limit\",\"arguments\":{\"cpu-index\":1,\"dirty-rate\":30}}\
{\"execute\":\"query-vcpu-dirty-limit\"}\n\
{\"execute\":\"x-set-auto-converge\",\"arguments\":{\"percent\":20}}{\"execute\":\"x-query-auto-converge\"}\n\
{\"a\":1,\"a\":2} {\"execute\":\"query-cpus-fast\",} [}] \"\\uFFFF\" 01\n\"a\x01\n\
{'execute':'query-status','id':'\\''}\n\
{\"execute\":\"quit\"}\n\
{\"execute\":\"query-status\"}\n";

fn script_replies(chunks: &[&[u8]]) -> (Vec<Value>, bool) {
    let (mut session, _) = session();
    let mut replies = Vec::new();
    let mut close = false;
    for chunk in chunks {
        let output = session.feed(chunk);
        assert!(!close || output.lines.is_empty());
        replies.extend(parse_lines(&output.lines));
        close = output.close;
    }
    (replies, close)
}

#[test]
fn replies_do_not_depend_on_chunking() {
    let (whole, close) = script_replies(&[SCRIPT]);
    assert!(close);
    assert_eq!(whole.len(), 35, "{whole:#?}");
    assert_eq!(
        whole.last(),
        Some(&json!({"timestamp": "stamped", "event": "SHUTDOWN",
                     "data": {"guest": false, "reason": "host-qmp-quit"}}))
    );
    let bytes: Vec<&[u8]> = SCRIPT.chunks(1).collect();
    assert_eq!(script_replies(&bytes), (whole.clone(), true));
    for split in 1..SCRIPT.len() {
        let (head, tail) = SCRIPT.split_at(split);
        assert_eq!(
            script_replies(&[head, tail]),
            (whole.clone(), true),
            "split at {split}"
        );
    }
}

// The socket.

fn socket_path(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let unique = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "dirtyvm-qmp-{}-{unique}-{name}.sock",
        std::process::id()
    ))
}

struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    fn connect(path: &std::path::Path) -> Client {
        let stream = UnixStream::connect(path).expect("the server listens");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Client {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    /// The next line, which must end in CRLF; `None` at end of stream.
    fn line(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => {
                assert!(line.ends_with("\r\n"), "{line:?}");
                Some(parse_lines(&[line.trim_end().to_owned()]).remove(0))
            }
            Err(error) => panic!("reading a reply: {error}"),
        }
    }

    fn send(&mut self, request: &str) {
        self.writer.write_all(request.as_bytes()).unwrap();
    }

    fn greeted(path: &std::path::Path) -> Client {
        let mut client = Client::connect(path);
        let greeting = client.line().expect("a greeting");
        assert_eq!(greeting["QMP"]["version"]["qemu"]["major"], 8);
        client
    }
}

#[test]
fn socket_serves_one_client_after_another() {
    let path = socket_path("sequence");
    let backend = Arc::new(MockBackend::new(2, true));
    let server = Server::spawn(&path, backend.clone()).unwrap();

    // Twice: half a message, then gone.
    for _ in 0..2 {
        let mut client = Client::greeted(&path);
        client.send(r#"{"execute": "qmp_capab"#);
    }

    let mut client = Client::greeted(&path);
    // A second client waits until the first leaves.
    let mut waiting = Client::connect(&path);
    waiting
        .reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0];
    let early = waiting.reader.get_mut().read(&mut byte);
    assert!(
        matches!(&early, Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
        "{early:?}"
    );

    client.send("{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"stop\",\"id\":1}\n");
    assert_eq!(client.line(), Some(json!({"return": {}})));
    assert_eq!(client.line(), Some(event("STOP")));
    assert_eq!(client.line(), Some(json!({"return": {}, "id": 1})));
    client.send(r#"{"execute":"quit"}"#);
    assert_eq!(client.line(), Some(json!({"return": {}})));
    assert_eq!(client.line().unwrap()["event"], "SHUTDOWN");
    assert_eq!(client.line(), None);
    assert!(backend.quit_requested());

    // The connection that waited gets its greeting now.
    waiting
        .reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(waiting
        .line()
        .is_some_and(|greeting| greeting.get("QMP").is_some()));
    drop(waiting);

    let started = Instant::now();
    server.shut_down();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(!path.exists(), "stop removes the socket file");
}

/// A client that sends requests and never reads the replies is dropped once a write has
/// waited [`super::server`]'s write timeout, and the next client is served.
#[test]
fn a_client_that_never_reads_is_dropped() {
    let path = socket_path("never-reads");
    let server = Server::spawn(&path, Arc::new(MockBackend::new(2, true))).unwrap();
    let mut stuck = Client::greeted(&path);
    stuck.send("{\"execute\":\"qmp_capabilities\"}\n");
    // Requests until the socket's buffers are full both ways; the server's replies then wait
    // on this client, which never reads them.
    stuck
        .writer
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let request = "{\"execute\":\"query-cpus-fast\"}\n".repeat(1000);
    let started = Instant::now();
    while stuck.writer.write_all(request.as_bytes()).is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the server kept reading a client that never reads its replies"
        );
    }
    // Dropped: the next client gets its greeting.
    let mut next = Client::greeted(&path);
    next.send("{\"execute\":\"qmp_capabilities\"}\n");
    assert_eq!(next.line(), Some(json!({"return": {}})));
    drop(stuck);
    server.shut_down();
}

#[test]
fn socket_survives_a_2_mib_garbage_line() {
    let path = socket_path("garbage");
    let server = Server::spawn(&path, Arc::new(MockBackend::new(1, true))).unwrap();

    let mut client = Client::greeted(&path);
    let mut writer = client.writer.try_clone().unwrap();
    let garbage = thread::spawn(move || {
        let mut line = vec![b'x'; 2 << 20];
        line.push(b'\n');
        writer.write_all(&line)
    });
    assert_eq!(
        client.line(),
        Some(generic("JSON token size limit exceeded"))
    );
    assert_eq!(client.line(), None);
    garbage
        .join()
        .unwrap()
        .expect("the server reads the rest before closing");

    let mut next = Client::greeted(&path);
    next.send("{\"execute\":\"qmp_capabilities\"}{\"execute\":\"query-status\"}");
    assert_eq!(next.line(), Some(json!({"return": {}})));
    assert_eq!(next.line().unwrap()["return"]["running"], true);
    server.shut_down();
}

#[test]
fn socket_tells_the_client_of_a_shutdown_and_stops_promptly() {
    let path = socket_path("shutdown");
    let server = Server::spawn(&path, Arc::new(MockBackend::new(1, true))).unwrap();
    let mut client = Client::greeted(&path);
    server.notify_shutdown();
    assert_eq!(
        client.line(),
        Some(json!({"timestamp": "stamped", "event": "SHUTDOWN",
                    "data": {"guest": false, "reason": "host-signal"}}))
    );
    // The client stays connected and idle: stop must not wait for it.
    let started = Instant::now();
    server.shut_down();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(client.line(), None);
}

#[test]
fn socket_file_checks() {
    // A socket left by a process that died is replaced.
    let path = socket_path("stale");
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = Server::spawn(&path, Arc::new(MockBackend::new(1, true))).unwrap();
    Client::greeted(&path);

    // A live one is not.
    let error = Server::spawn(&path, Arc::new(MockBackend::new(1, true)))
        .err()
        .expect("the path is in use");
    assert_eq!(error.kind(), ErrorKind::AddrInUse);
    assert!(error.to_string().contains("another process listens there"));
    server.shut_down();

    // Nor is anything that is not a socket.
    let path = socket_path("file");
    std::fs::write(&path, "keep me").unwrap();
    let error = Server::spawn(&path, Arc::new(MockBackend::new(1, true)))
        .err()
        .expect("a regular file is in the way");
    assert_eq!(error.kind(), ErrorKind::AlreadyExists);
    assert!(error.to_string().contains("is not a socket"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
    std::fs::remove_file(&path).unwrap();
}
