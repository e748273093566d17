//! `cargo xtask`: the project's only build system. Every command runs programs directly
//! (never through a shell string) and installs what it needs on the host first.

mod bench;
mod bundle;
mod cluster;
mod fuzz;
mod host;
mod image;
mod keys;
mod upgrade_inputs;

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
    /// Build disk images: `target/images/<arch>/keelson.<format>`, and next to each its
    /// signed upgrade bundle `keelson-<arch>.bundle`.
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
        /// The OS version (semver): os-release's VERSION_ID, the boot entry's version and
        /// the bundle's (default: the workspace's version).
        #[arg(long, default_value = image::DEFAULT_VERSION, value_parser = bundle::parse_version)]
        version: String,
        /// The oldest version the bundle upgrades from (semver; default: none).
        #[arg(long, value_name = "VERSION", value_parser = bundle::parse_version)]
        min_version: Option<String>,
        /// Cargo features to build init (both stages) with, e.g. `fault-injection` for
        /// the upgrade tests' faults (never in an image for real nodes). Such an init is
        /// built in target/image-features/, apart from the default build's.
        #[arg(long, value_name = "FEATURES")]
        init_features: Option<String>,
        /// A public key (PEM) the image trusts for upgrades; repeat for several. Default:
        /// the dev key target/keelson-keys/upgrade.pub, made on first use.
        #[arg(long, value_name = "FILE")]
        trust: Vec<PathBuf>,
        /// The private key (PEM) that signs the bundle. Default: the dev key
        /// target/keelson-keys/upgrade.key, made on first use.
        #[arg(long, value_name = "FILE")]
        signing_key: Option<PathBuf>,
    },
    /// Make an Ed25519 key pair for upgrade bundles: DIR/upgrade.key (private, mode 0600)
    /// and DIR/upgrade.pub.
    Keygen {
        /// Where the pair goes (default: target/keelson-keys, the dev key that
        /// `cargo xtask image` signs with and bakes in).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Replace an existing pair.
        #[arg(long)]
        force: bool,
    },
    /// Derive a bundle from an image already built (no rebuild, seconds): the bundle of
    /// DIR (`keelson-<arch>.bundle`, written by `cargo xtask image`) with a changed
    /// manifest or initramfs, signed again. For the upgrade tests' faults.
    Bundle(bundle::BundleArgs),
    /// Build the upgrade tests' v2 and v3 images and derive their bundles under
    /// target/images/ (`cargo xtask test` does it too; see xtask/src/upgrade_inputs.rs).
    UpgradeInputs,
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
    /// The test suite's fuzzing run alone: build every fuzz target, then run each
    /// for SECONDS (two at a time). Logs in target/fuzz/.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
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
            version,
            min_version,
            init_features,
            trust,
            signing_key,
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
                version,
                init_features,
                upgrade: image::UpgradeArgs {
                    trust,
                    signing_key,
                    min_version,
                },
            };
            image::image(&args).map(|_| ())
        }
        Cmd::Keygen { out, force } => {
            keys::keygen(&out.unwrap_or_else(keys::dev_key_dir), force).map(|_| ())
        }
        Cmd::Bundle(args) => bundle::derive(&args),
        Cmd::UpgradeInputs => {
            host::ensure()?;
            upgrade_inputs::build()
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
        Cmd::Fuzz { seconds } => {
            host::ensure()?;
            fuzz::run(fuzz::start_builds()?, Duration::from_secs(seconds))
        }
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
    let mut stages = Stages::new();
    stages.run("host set-up", host::ensure)?;
    // Beside every stage, taking what they leave idle; the fuzz stage waits for them.
    let fuzz_builds = fuzz::start_builds()?;
    stages.run("fmt", || run_cmd(cargo().args(["fmt", "--all", "--check"])))?;
    stages.run("clippy", || {
        run_cmd(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    // One build of each image, shared by every end-to-end test.
    stages.run("amd64 image", || {
        image::image(&image::ImageArgs::new(
            vec![Arch::Amd64],
            vec![Format::Raw, Format::RawZst, Format::Qcow2],
        ))
        .map(drop)
    })?;
    stages.run("arm64 image", || {
        image::image(&image::ImageArgs::new(vec![Arch::Arm64], vec![Format::Raw])).map(drop)
    })?;
    // The upgrade tests' v2 and v3 images and the bundles derived from them.
    stages.run("upgrade inputs", upgrade_inputs::build)?;
    stages.run("cargo test", || {
        run_cmd(cargo().args(["test", "--workspace"]))
    })?;
    stages.run("fuzz", || fuzz::run(fuzz_builds, Duration::from_secs(30)))?;
    stages.summary();
    Ok(())
}

/// The stages of `cargo xtask test`, timed: each says how long it took as it ends, and
/// the whole run ends with the list (where a CI run's time went).
struct Stages {
    started: std::time::Instant,
    took: Vec<(&'static str, Duration)>,
}

impl Stages {
    fn new() -> Stages {
        Stages {
            started: std::time::Instant::now(),
            took: Vec::new(),
        }
    }

    fn run(&mut self, name: &'static str, stage: impl FnOnce() -> Result<()>) -> Result<()> {
        let started = std::time::Instant::now();
        let result = stage();
        let took = started.elapsed();
        eprintln!(
            "xtask: test: {name} {} after {} ({} since the start)",
            if result.is_ok() { "done" } else { "failed" },
            minutes(took),
            minutes(self.started.elapsed())
        );
        self.took.push((name, took));
        result
    }

    fn summary(&self) {
        let list: Vec<String> = self
            .took
            .iter()
            .map(|(name, took)| format!("{name} {}", minutes(*took)))
            .collect();
        eprintln!(
            "xtask: test: passed in {}: {}",
            minutes(self.started.elapsed()),
            list.join(", ")
        );
    }
}

/// `12m05s`.
fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("xtask").chain(args.iter().copied()))
    }

    #[test]
    fn image_takes_the_upgrade_flags() {
        let cli = parse(&[
            "image",
            "--version",
            "0.2.0",
            "--min-version",
            "0.1.0",
            "--init-features",
            "fault-injection",
            "--trust",
            "a.pub",
            "--trust",
            "b.pub",
            "--signing-key",
            "release.key",
        ])
        .unwrap();
        let Cmd::Image {
            version,
            min_version,
            init_features,
            trust,
            signing_key,
            ..
        } = cli.command
        else {
            panic!("not image");
        };
        assert_eq!(version, "0.2.0");
        assert_eq!(min_version.as_deref(), Some("0.1.0"));
        assert_eq!(init_features.as_deref(), Some("fault-injection"));
        assert_eq!(trust, [PathBuf::from("a.pub"), PathBuf::from("b.pub")]);
        assert_eq!(signing_key, Some(PathBuf::from("release.key")));
    }

    #[test]
    fn image_defaults_to_the_workspace_version_and_the_dev_key() {
        let Cmd::Image {
            version,
            min_version,
            init_features,
            trust,
            signing_key,
            ..
        } = parse(&["image"]).unwrap().command
        else {
            panic!("not image");
        };
        assert_eq!(version, env!("CARGO_PKG_VERSION"));
        assert_eq!((min_version, init_features), (None, None));
        assert!(trust.is_empty() && signing_key.is_none());
    }

    #[test]
    fn versions_must_be_semver() {
        for args in [
            &["image", "--version", "v2"][..],
            &["image", "--min-version", "1.0"],
            &["bundle", "--from", "d", "--out", "f", "--version", "latest"],
        ] {
            let err = parse(args).err().unwrap().to_string();
            assert!(err.contains("not a semantic version"), "{args:?}: {err}");
        }
    }

    #[test]
    fn keygen_defaults_to_the_dev_directory() {
        let Cmd::Keygen { out, force } = parse(&["keygen"]).unwrap().command else {
            panic!("not keygen");
        };
        assert_eq!((out, force), (None, false));
        let Cmd::Keygen { out, force } =
            parse(&["keygen", "--out", "k", "--force"]).unwrap().command
        else {
            panic!("not keygen");
        };
        assert_eq!((out, force), (Some(PathBuf::from("k")), true));
    }

    #[test]
    fn bundle_takes_a_derivation() {
        let Cmd::Bundle(args) = parse(&[
            "bundle",
            "--from",
            "target/images/amd64-v3",
            "--out",
            "v3-hang.bundle",
            "--version",
            "0.3.1",
            "--cmdline-append",
            "keelson.fault=stage1-hang",
        ])
        .unwrap()
        .command
        else {
            panic!("not bundle");
        };
        assert_eq!(args.from, PathBuf::from("target/images/amd64-v3"));
        assert_eq!(args.out, PathBuf::from("v3-hang.bundle"));
        assert_eq!(args.version.as_deref(), Some("0.3.1"));
        assert_eq!(
            args.cmdline_append.as_deref(),
            Some("keelson.fault=stage1-hang")
        );
        assert!(args.initrd.is_none() && !args.empty_initrd && args.signing_key.is_none());
    }

    #[test]
    fn bundle_refuses_two_initramfs_and_needs_from_and_out() {
        assert!(
            parse(&[
                "bundle",
                "--from",
                "d",
                "--out",
                "f",
                "--initrd",
                "x",
                "--empty-initrd"
            ])
            .is_err()
        );
        assert!(parse(&["bundle", "--out", "f"]).is_err());
        assert!(parse(&["bundle", "--from", "d"]).is_err());
    }
}
