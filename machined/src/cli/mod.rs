//! `machinectl`'s command line: argument definitions (clap derive) and dispatch.
//!
//! The binary's `main` parses [`Cli`], calls [`run`], prints the error chain once and maps
//! the outcome to an exit code: 0 success, 1 failure (including an invalid config),
//! 2 bad usage (clap's own exit code).

mod gen_config;
mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use keelson_configs::validate::Mode;

/// machinectl: the operator's CLI for Keelson nodes.
#[derive(Debug, Parser)]
#[command(name = "machinectl", version, about, long_about = None)]
pub struct Cli {
    /// The machinectl client config (contexts with endpoints, nodes and credentials).
    /// Default: $MACHINECONFIG, else ~/.config/keelson/machinectl.toml.
    #[arg(long, global = true, value_name = "FILE")]
    pub machineconfig: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate things: machine configs, secrets, client configs.
    #[command(subcommand)]
    Gen(GenCommand),
    /// Check a machine config and print every problem found, with file:line:column and key path.
    Validate(validate::ValidateArgs),
}

/// `machinectl gen ...`.
#[derive(Debug, Subcommand)]
pub enum GenCommand {
    /// Generate controlplane.toml, worker.toml, secrets.toml and machinectl.toml for a new
    /// cluster (or, with --with-secrets, for an existing one).
    Config(Box<gen_config::GenConfigArgs>),
}

/// The validation mode, as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Bare metal (or a VM installed like one): an install disk is required.
    Metal,
    /// A cloud instance, configured from the platform's metadata.
    Cloud,
    /// A container: no disks, no kernel settings of its own.
    Container,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Metal => Mode::Metal,
            ModeArg::Cloud => Mode::Cloud,
            ModeArg::Container => Mode::Container,
        }
    }
}

/// Runs one command. `Ok` carries the exit code for outcomes that are not errors of
/// machinectl itself (an invalid config exits 1 after its diagnostics are printed).
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Gen(GenCommand::Config(args)) => gen_config::run(&args),
        Command::Validate(args) => validate::run(&args),
    }
}
