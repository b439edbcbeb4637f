//! One client's protocol state: greeting, negotiation, request checks, replies and events.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::commands::{self, Command, Context};
use super::json::{to_line, JsonStream, Message};
use super::{Backend, ErrorClass, QmpError};
use crate::migration::MigrationEvent;

/// What one [`Session::feed`] produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// Replies and events, in order, each one JSON object without the line terminator (the
    /// wire format ends each with `"\r\n"`).
    pub lines: Vec<String>,
    /// The session is over (the client quit, or sent an oversized message): send the lines,
    /// then close the connection.
    pub close: bool,
}

/// A QMP conversation with one client, independent of any socket: bytes in, lines out.
///
/// Input is a stream of JSON values in any chunking; the replies depend only on the bytes,
/// never on where they were split.
pub struct Session {
    backend: Arc<dyn Backend>,
    input: JsonStream,
    negotiated: bool,
    closed: bool,
}

impl Session {
    pub fn new(backend: Arc<dyn Backend>) -> Session {
        Session {
            backend,
            input: JsonStream::new(),
            negotiated: false,
            closed: false,
        }
    }

    /// The first line the server sends. The version is QEMU 8.2's, the release whose schema
    /// dirtyvm answers with (its texts, `calc-time-unit`, the migration parameters and the
    /// `dirty-limit` capability): clients such as libvirt choose what to send by it.
    pub fn greeting() -> String {
        to_line(&json!({
            "QMP": {
                "version": {
                    "qemu": {"micro": 0, "minor": 2, "major": 8},
                    "package": concat!("dirtyvm ", env!("CARGO_PKG_VERSION")),
                },
                "capabilities": [],
            }
        }))
    }

    /// Reads more of the client's input and answers every request it completes. Once
    /// [`Output::close`] is set, nothing more is read.
    pub fn feed(&mut self, input: &[u8]) -> Output {
        let mut output = Output {
            lines: Vec::new(),
            close: self.closed,
        };
        for &byte in input {
            if output.close {
                break;
            }
            self.input.feed(byte);
            while let Some(message) = self.input.message() {
                let close = match message {
                    Message::Value(request) => self.request(request, &mut output.lines),
                    Message::Error(desc) => {
                        output.lines.push(reply(Err(QmpError::generic(desc)), None));
                        false
                    }
                    Message::TooLong => {
                        let error = QmpError::generic("JSON token size limit exceeded");
                        output.lines.push(reply(Err(error), None));
                        true
                    }
                };
                if close {
                    self.closed = true;
                    output.close = true;
                    break;
                }
            }
        }
        output
    }

    /// The events that happened in the background since the last call (a migration's), for
    /// a negotiated client; before negotiation they are dropped, as QEMU drops them.
    pub fn pending_events(&mut self) -> Vec<String> {
        let events = self.backend.migration().take_events();
        if !self.negotiated {
            return Vec::new();
        }
        events.into_iter().map(migration_event).collect()
    }

    /// `monitor_qmp_dispatch()`: answers one request; true when the session ends.
    fn request(&mut self, request: Value, lines: &mut Vec<String>) -> bool {
        let Value::Object(request) = request else {
            let error = QmpError::generic("QMP input must be a JSON object");
            lines.push(reply(Err(error), None));
            return false;
        };
        let backend = Arc::clone(&self.backend);
        let mut ctx = Context {
            backend: &*backend,
            negotiated: self.negotiated,
            events: Vec::new(),
            quit: false,
        };
        let mut result = dispatch(&request, &mut ctx);
        if let Err(error) = &mut result {
            // Before negotiation only qmp_capabilities exists; QEMU says so instead.
            if !self.negotiated && error.class == ErrorClass::CommandNotFound {
                error.desc = "Expecting capabilities negotiation with 'qmp_capabilities'".into();
            }
        }
        self.negotiated = ctx.negotiated;
        // What the migration reported while the command ran (its `setup`) comes first.
        lines.extend(self.pending_events());
        lines.extend(ctx.events.iter().map(|name| event(name, None)));
        lines.push(reply(result, request.get("id").cloned()));
        if ctx.quit {
            lines.push(event(
                "SHUTDOWN",
                Some(json!({"guest": false, "reason": "host-qmp-quit"})),
            ));
        }
        ctx.quit
    }
}

/// `qmp_dispatch()`: the request's own members, then the command.
fn dispatch(request: &Map<String, Value>, ctx: &mut Context<'_>) -> Result<Value, QmpError> {
    for (member, value) in request {
        match member.as_str() {
            "execute" if !value.is_string() => {
                return Err(QmpError::generic(
                    "QMP input member 'execute' must be a string",
                ));
            }
            "arguments" if !value.is_object() => {
                return Err(QmpError::generic(
                    "QMP input member 'arguments' must be an object",
                ));
            }
            "execute" | "arguments" | "id" => {}
            _ => {
                return Err(QmpError::generic(format!(
                    "QMP input member '{member}' is unexpected"
                )));
            }
        }
    }
    let Some(Value::String(name)) = request.get("execute") else {
        return Err(QmpError::generic("QMP input lacks member 'execute'"));
    };
    let command = Command::from_name(name)
        .filter(|&command| ctx.negotiated || command == Command::QmpCapabilities)
        .ok_or_else(|| {
            QmpError::command_not_found(format!("The command {name} has not been found"))
        })?;
    commands::run(
        command,
        request.get("arguments").and_then(Value::as_object),
        ctx,
    )
}

/// `{"return": ...}` or `{"error": ...}`, with the request's `id` when it had one.
fn reply(result: Result<Value, QmpError>, id: Option<Value>) -> String {
    let mut reply = Map::new();
    match result {
        Ok(value) => reply.insert("return".into(), value),
        Err(error) => reply.insert(
            "error".into(),
            json!({"class": error.class, "desc": error.desc}),
        ),
    };
    if let Some(id) = id {
        reply.insert("id".into(), id);
    }
    to_line(&Value::Object(reply))
}

/// An event stamped with the host's wall clock, as QEMU stamps them.
fn event(name: &str, data: Option<Value>) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut event = json!({
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        "event": name,
    });
    if let Some(data) = data {
        event["data"] = data;
    }
    to_line(&event)
}

/// A migration's event as QEMU words it.
fn migration_event(e: MigrationEvent) -> String {
    match e {
        MigrationEvent::Status(status) => {
            event("MIGRATION", Some(json!({"status": status.name()})))
        }
        MigrationEvent::Pass(pass) => event("MIGRATION_PASS", Some(json!({"pass": pass}))),
        MigrationEvent::Stop => event("STOP", None),
        MigrationEvent::Resume => event("RESUME", None),
    }
}

/// SHUTDOWN for a VM that stops on its own (signal, time limit), not by `quit`.
pub(super) fn host_shutdown_event() -> String {
    event(
        "SHUTDOWN",
        Some(json!({"guest": false, "reason": "host-signal"})),
    )
}
