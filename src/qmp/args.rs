//! A command's arguments as QEMU's generated marshallers visit them
//! (`qapi/qobject-input-visitor.c`): members in schema order, each checked as it is visited,
//! then the members nobody asked for; and the checks of QAPI's scalar types, with QEMU's
//! texts.

use serde_json::{Map, Value};

use super::QmpError;

/// A command's arguments, visited member by member.
pub(super) struct Args<'a> {
    members: Option<&'a Map<String, Value>>,
    visited: Vec<&'static str>,
}

impl<'a> Args<'a> {
    pub(super) fn new(members: Option<&'a Map<String, Value>>) -> Args<'a> {
        Args {
            members,
            visited: Vec::new(),
        }
    }

    pub(super) fn member(&mut self, name: &'static str) -> Option<&'a Value> {
        self.visited.push(name);
        self.members?.get(name)
    }

    pub(super) fn optional<T>(
        &mut self,
        name: &'static str,
        check: fn(&Value, &str) -> Result<T, QmpError>,
    ) -> Result<Option<T>, QmpError> {
        self.member(name)
            .map(|value| check(value, name))
            .transpose()
    }

    pub(super) fn required<T>(
        &mut self,
        name: &'static str,
        check: fn(&Value, &str) -> Result<T, QmpError>,
    ) -> Result<T, QmpError> {
        match self.member(name) {
            Some(value) => check(value, name),
            None => Err(QmpError::generic(format!("Parameter '{name}' is missing"))),
        }
    }

    /// `qobject_input_check_struct()`: refuses the members no one visited.
    pub(super) fn finish(self) -> Result<(), QmpError> {
        let Some(members) = self.members else {
            return Ok(());
        };
        match members
            .keys()
            .find(|name| !self.visited.contains(&name.as_str()))
        {
            Some(name) => Err(QmpError::generic(format!(
                "Parameter '{name}' is unexpected"
            ))),
            None => Ok(()),
        }
    }
}

pub(super) fn invalid_type(name: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

/// QAPI `int` (int64): a JSON integer; a fraction or an exponent makes a double, which is
/// not one.
pub(super) fn int(value: &Value, name: &str) -> Result<i64, QmpError> {
    value.as_i64().ok_or_else(|| invalid_type(name, "integer"))
}

/// QAPI `uint64`, with QEMU's own message for it.
pub(super) fn uint64(value: &Value, name: &str) -> Result<u64, QmpError> {
    value
        .as_u64()
        .ok_or_else(|| QmpError::generic(format!("Parameter '{name}' expects uint64")))
}
