//! `cargo xtask cluster create | destroy`: the README's main command. On a fresh machine
//! it installs (as root) or names (otherwise) the host's QEMU and firmware, builds the
//! image (as `cargo xtask run` does, so the nodes run the code of this checkout; the
//! dependencies and binaries are cached), builds `machinectl`, and runs `machinectl
//! cluster create` for one control plane and one worker.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use keelson_configs::layout::Arch;
use keelson_imager::build::Format;

use crate::{cargo, host, image, run_cmd, workspace_root};

/// `cargo xtask cluster ...`.
#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Build what is missing and create a local cluster (1 control plane + 1 worker by
    /// default) under QEMU, then wait until it is healthy.
    Create(CreateArgs),
    /// Remove a local cluster and every trace of it.
    Destroy {
        /// Cluster name.
        #[arg(long, default_value = "local")]
        name: String,
    },
}

/// Options of `cargo xtask cluster create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Cluster name.
    #[arg(long, default_value = "local")]
    pub name: String,
    /// Guest architecture: amd64 or arm64.
    #[arg(long, default_value = "amd64")]
    pub arch: String,
    /// Boot the image built earlier instead of building it first.
    #[arg(long)]
    pub no_build: bool,
    /// More `machinectl cluster create` options (after `--`), e.g. `-- --workers 2`.
    #[arg(last = true)]
    pub rest: Vec<String>,
}

/// Builds `machinectl` and returns its path.
pub fn machinectl() -> Result<PathBuf> {
    run_cmd(cargo().args([
        "build",
        "--quiet",
        "--package",
        "keelson-machinectl",
        "--bin",
        "machinectl",
    ]))?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    Ok(target_dir.join("debug/machinectl"))
}

/// The raw image for `arch`: built now, unless `no_build` and one exists.
pub fn ensure_image(arch: Arch, no_build: bool) -> Result<PathBuf> {
    let path = image::image_dir(arch).join("keelson.raw");
    if !no_build || !path.is_file() {
        eprintln!("xtask: building the {arch} image ({})", path.display());
        image::image(&image::ImageArgs::new(vec![arch], vec![Format::Raw]))?;
    }
    Ok(path)
}

/// `cargo xtask cluster ...`.
pub fn run(cmd: ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::Create(args) => {
            host::ensure()?;
            let arch = image::parse_arch(&args.arch)?;
            let raw = ensure_image(arch, args.no_build)?;
            let bin = machinectl()?;
            let has = |flag: &str| args.rest.iter().any(|a| a == flag);
            let mut create = Command::new(&bin);
            create
                .args(["cluster", "create", "--name", &args.name, "--arch"])
                .arg(arch.debian())
                .arg("--image")
                .arg(&raw);
            for (flag, default) in [("--controlplanes", "1"), ("--workers", "1")] {
                if !has(flag) {
                    create.args([flag, default]);
                }
            }
            run_cmd(create.args(&args.rest))
                .with_context(|| format!("creating cluster {}", args.name))
        }
        ClusterCmd::Destroy { name } => {
            let bin = machinectl()?;
            run_cmd(Command::new(bin).args(["cluster", "destroy", "--name", &name]))
        }
    }
}
