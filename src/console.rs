//! Lines for people: progress on stdout, warnings on stderr, and neither ever stops a run.
//!
//! `println!` panics when stdout is a closed pipe (`dirtyvm run ... | head -1`) or a full
//! disk, and takes the report down with it. Here a line that cannot be written is dropped:
//! the run goes on, writes its report and exits as it would have.

use std::fmt;
use std::io::Write;

/// Writes one line to stdout, or drops it.
pub fn line(args: fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout().lock(), "{args}");
}

/// Writes `dirtyvm: LEVEL: message` to stderr, or drops it.
pub fn message(level: &str, args: fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "dirtyvm: {level}: {args}");
}

/// `println!` that never panics: see the module docs.
#[macro_export]
macro_rules! say {
    () => {
        $crate::console::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::console::line(format_args!($($arg)*))
    };
}

/// A `dirtyvm: warning: ...` line on stderr that never panics.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => {
        $crate::console::message("warning", format_args!($($arg)*))
    };
}
