//! `dirtyvm`, the launcher: parses the command line, runs the command, prints the error.
//! Everything else is the library's (`dirtyvm::cli`).

use std::process::ExitCode;

use clap::Parser;

use dirtyvm::cli::{self, Cli};

fn main() -> ExitCode {
    match cli::execute(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            dirtyvm::console::message("error", format_args!("{}", failure.message));
            ExitCode::from(failure.code)
        }
    }
}
