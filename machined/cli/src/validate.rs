//! `machinectl validate --config FILE`: check a machine config and print every problem.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Args;
use keelson_configs::Mode;

use super::ModeArg;

/// Arguments of `machinectl validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The machine config to check.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,

    /// Where the node runs, which decides what the config must contain (metal needs an
    /// install disk; container mode refuses kernel and disk settings).
    #[arg(long, value_enum, default_value = "metal")]
    pub mode: ModeArg,
}

/// Runs `machinectl validate`: prints each diagnostic on its own line, then a summary.
/// Exit code 0 when the config is valid (warnings allowed), 1 otherwise.
pub fn run(args: &ValidateArgs) -> anyhow::Result<ExitCode> {
    let name = args.config.display().to_string();
    let bytes = std::fs::read(&args.config).with_context(|| {
        format!("cannot read machine config {name}; check the path given to --config")
    })?;
    if bytes.contains(&0) {
        bail!("{name} is not a text file (it contains NUL bytes); pass a TOML machine config");
    }
    // Non-UTF-8 text is reported by the checker as a diagnostic with its position.
    let checked = keelson_configs::check_bytes(&bytes, &name, args.mode.into());
    for d in &checked.diagnostics {
        println!("{d}");
    }
    let errors = checked.diagnostics.iter().filter(|d| d.is_error()).count();
    let warnings = checked.diagnostics.len() - errors;
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    match &checked.config {
        Some(config) => {
            println!(
                "{name}: valid {} config for {} mode ({warnings} warning{})",
                config.machine.kind,
                Mode::from(args.mode),
                plural(warnings)
            );
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!(
                "{name}: invalid machine config: {errors} error{}, {warnings} warning{}",
                plural(errors),
                plural(warnings)
            );
            Ok(ExitCode::FAILURE)
        }
    }
}
