//! `cargo xtask`: the project's only build system. Every command runs programs directly
//! (never through a shell string) and installs what it needs on the host first.

mod bench;
mod cluster;
mod host;
mod image;

use std::path::{Path, PathBuf};
use std::process::Command;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use keelson_configs::layout::Arch;
use keelson_imager::build::Format;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Keelson's build system")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the host packages (QEMU, UEFI firmware, filesystem tools) and Rust
    /// targets the build and tests need (apt as root; otherwise prints the command).
    Deps,
    /// Re-resolve every Debian input from the suite's Packages index and rewrite the
    /// lock files (`images/keelson-<arch>.lock`).
    Lock {
        /// Architectures (default: all).
        #[arg(long = "arch")]
        arches: Vec<String>,
        /// Debian mirror URL (default: the host's apt sources).
        #[arg(long)]
        mirror: Option<String>,
    },
    /// Build disk images: `target/images/<arch>/keelson.<format>`.
    Image {
        /// Architecture(s): amd64, arm64 (default: amd64).
        #[arg(long = "arch")]
        arches: Vec<String>,
        /// Output format(s): raw, raw.zst, qcow2 (raw is always written).
        #[arg(long = "format")]
        formats: Vec<String>,
        /// Output directory (default: target/images/<arch>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Debian mirror URL for packages missing from the cache (default: the host's
        /// apt sources).
        #[arg(long)]
        mirror: Option<String>,
        /// Bake an air-gapped Kubernetes in, for nodes that reach neither the release
        /// site nor a registry: DIR/kubelet (required, for the image's architecture)
        /// goes to /usr/bin/kubelet, and DIR/images/*.tar (control-plane images as OCI
        /// archives) to /usr/share/keelson/images/.
        #[arg(long, value_name = "DIR")]
        kubernetes: Option<PathBuf>,
    },
    /// Build the image and boot it under QEMU (KVM if it works, else software
    /// emulation), with its console on this terminal.
    Run {
        /// Architecture: amd64 or arm64.
        #[arg(long, default_value = "amd64")]
        arch: String,
        /// Stop the VM after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Local clusters under QEMU: `create` builds what is missing and boots 1 control
    /// plane + 1 worker; `destroy` removes one.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// Measure build times, sizes, boot time and memory, each beside a reference
    /// measured in the same run (see BENCHMARKS.md); results in target/bench/.
    Bench(bench::BenchArgs),
    /// Run the whole test suite: host set-up, lints, image builds, unit and
    /// end-to-end tests (VMs under QEMU), and a short fuzzing run.
    Test,
}

fn main() {
    let cli = Cli::parse();
    if let Err(err) = run(cli) {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Deps => host::ensure(),
        Cmd::Lock { arches, mirror } => {
            let arches = arches_or(&arches, &Arch::ALL)?;
            image::lock(&arches, mirror.as_deref())
        }
        Cmd::Image {
            arches,
            formats,
            out,
            mirror,
            kubernetes,
        } => {
            host::ensure()?;
            let args = image::ImageArgs {
                arches: arches_or(&arches, &[Arch::Amd64])?,
                formats: formats
                    .iter()
                    .map(|f| {
                        Format::parse(f).with_context(|| {
                            format!("unknown format `{f}`: use raw, raw.zst or qcow2")
                        })
                    })
                    .collect::<Result<_>>()?,
                out,
                mirror,
                kubernetes,
            };
            image::image(&args).map(|_| ())
        }
        Cmd::Run { arch, timeout } => {
            host::ensure()?;
            image::run(image::parse_arch(&arch)?, Duration::from_secs(timeout))
        }
        Cmd::Cluster(cmd) => cluster::run(cmd),
        Cmd::Bench(args) => {
            host::ensure()?;
            bench::run(args)
        }
        Cmd::Test => test(),
    }
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn arches_or(given: &[String], default: &[Arch]) -> Result<Vec<Arch>> {
    if given.is_empty() {
        return Ok(default.to_vec());
    }
    given.iter().map(|a| image::parse_arch(a)).collect()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("xtask: running {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn test() -> Result<()> {
    host::ensure()?;
    run_cmd(cargo().args(["fmt", "--all", "--check"]))?;
    run_cmd(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // One build of each image, shared by every end-to-end test.
    image::image(&image::ImageArgs {
        arches: vec![Arch::Amd64],
        formats: vec![Format::Raw, Format::RawZst, Format::Qcow2],
        out: None,
        mirror: None,
        kubernetes: None,
    })?;
    image::image(&image::ImageArgs {
        arches: vec![Arch::Arm64],
        formats: vec![Format::Raw],
        out: None,
        mirror: None,
        kubernetes: None,
    })?;
    run_cmd(cargo().args(["test", "--workspace"]))?;
    fuzz(Duration::from_secs(30))
}

/// The fuzz targets of the short fuzzing run: the crate directory whose `fuzz/` holds
/// the target, the target, and its seed inputs (relative to that directory).
const FUZZ_TARGETS: &[(&str, &str, &str)] = &[
    // The machine config: parse and validate.
    ("configs", "check_config", "tests/data"),
    // PID 1's reader of the config URL's HTTP answer.
    ("init", "http_response", "fuzz/seeds/http_response"),
    // machined's parser of upgrade bundles (an upload or a download, not yet trusted).
    ("machined/upgrade", "bundle_parser", "fuzz/seeds/bundle_parser"),
];

/// A short run of each fuzz target (`configs/fuzz`, `init/fuzz`): each must build and
/// find no crash within `duration`. cargo-fuzz needs nightly features; `RUSTC_BOOTSTRAP`
/// unlocks them on the stable toolchain this project pins.
fn fuzz(duration: Duration) -> Result<()> {
    let have_fuzz = cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_fuzz {
        run_cmd(cargo().args(["install", "--locked", "cargo-fuzz"]))?;
    }
    for &(dir, target, seeds) in FUZZ_TARGETS {
        let corpus = std::env::temp_dir().join(format!("keelson-fuzz-corpus-{target}"));
        std::fs::create_dir_all(&corpus)?;
        run_cmd(
            cargo()
                .current_dir(workspace_root().join(dir))
                .env("RUSTC_BOOTSTRAP", "1")
                .args(["fuzz", "run", target, "--target-dir"])
                .arg(workspace_root().join("target/fuzz"))
                .arg(&corpus)
                .arg(seeds)
                .arg("--")
                .arg(format!("-max_total_time={}", duration.as_secs()))
                .arg("-max_len=8192"),
        )?;
    }
    Ok(())
}
