//! `imager`: the command-line front of [`keelson_imager`]. Images are built with
//! `cargo xtask image` (which cross-compiles our binaries first); this tool looks inside
//! built images without mounting them.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keelson_configs::layout::Slot;
use keelson_imager::inspect;

#[derive(Parser)]
#[command(name = "imager", about = "Look inside Keelson disk images")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show an image's partitions and each slot's version and verity root hash, or
    /// print one file from it (without mounting anything).
    Inspect {
        /// The raw disk image.
        image: PathBuf,
        /// Print this file from a slot's root filesystem (e.g. `usr/lib/os-release`).
        #[arg(long, value_name = "PATH", conflicts_with_all = ["esp", "ext4"])]
        root: Option<String>,
        /// The slot `--root` reads from.
        #[arg(long, default_value = "a", value_parser = parse_slot)]
        slot: Slot,
        /// Print this file from the EFI system partition (e.g. `loader/loader.conf`).
        #[arg(long, value_name = "PATH", conflicts_with = "ext4")]
        esp: Option<String>,
        /// Print a file from an ext4 partition: `PARTITION:PATH` (e.g. `STATE:config.toml`).
        #[arg(long, value_name = "PARTITION:PATH")]
        ext4: Option<String>,
    },
}

fn parse_slot(s: &str) -> Result<Slot, String> {
    Slot::parse(s).ok_or_else(|| format!("unknown slot `{s}`: use a or b"))
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("imager: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Inspect {
            image,
            root,
            slot,
            esp,
            ext4,
        } => {
            let bytes = if let Some(path) = root {
                inspect::read_root_file(&image, slot, &path)?
            } else if let Some(path) = esp {
                inspect::read_esp_file(&image, &path)?
            } else if let Some(spec) = ext4 {
                let (partition, path) = spec.split_once(':').ok_or_else(|| {
                    anyhow::anyhow!("--ext4 takes PARTITION:PATH, e.g. STATE:config.toml")
                })?;
                inspect::read_ext4_file(&image, partition, path)?
            } else {
                print!("{}", inspect::inspect(&image)?);
                return Ok(());
            };
            std::io::stdout().write_all(&bytes)?;
            Ok(())
        }
    }
}
