//! `machinectl`: the operator's command-line client. Parses arguments, runs the command,
//! prints the error chain once, and maps the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser as _;
use keelson_machinectl::{Cli, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("machinectl: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
