//! The upgrade tests' bundles: v1 is the suite's built image (its bundle sits beside
//! it), v2 and v3 are built once per test process as small derivations of v1 with
//! `cargo xtask image --version` (the package cache and the squashfs block cache make
//! that a rebuild of the root's changed blocks, not a new image), and the faulty v3s and
//! the refused bundles are `cargo xtask bundle` derivations of those (seconds each).
//!
//! | bundle | how | what the node must do |
//! |---|---|---|
//! | `v2` | `image --version 0.2.0` | install, reboot, bless |
//! | `v3_init_fails` | `image --version 0.3.0 --init-features fault-injection`, `bundle --cmdline-append keelson.fault=init-fails` | PID 1 exits, the kernel panics: fall back |
//! | `v3_hang` | same, `keelson.fault=stage1-hang keelson.watchdog=15` | stage 1 hangs, the watchdog resets: fall back |
//! | `v3_panic` | same, `bundle --empty-initrd` | no `/init`: the kernel panics: fall back |
//! | `v3_unhealthy` | same, `keelson.fault=unhealthy` | machined never starts: the health deadline reboots: fall back |
//! | `unknown_key` | v2 signed by a key the image does not trust | refused |
//! | `other_arch` | the suite's arm64 image's bundle | refused |
//! | `downgrade` | v1's own bundle, on a node at v2 | refused |

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context as _, Result, bail};

use crate::{Arch, image_dir, workspace_root};

/// v2's version.
pub const V2: &str = "0.2.0";
/// v3's version (every faulty v3).
pub const V3: &str = "0.3.0";

/// The bundles of the upgrade tests, for one architecture.
#[derive(Debug, Clone)]
pub struct Bundles {
    /// The suite's image's own bundle (v1).
    pub v1: PathBuf,
    /// v2.
    pub v2: PathBuf,
    /// v3 whose PID 1 exits.
    pub v3_init_fails: PathBuf,
    /// v3 whose stage 1 hangs.
    pub v3_hang: PathBuf,
    /// v3 whose kernel panics.
    pub v3_panic: PathBuf,
    /// v3 that never becomes healthy.
    pub v3_unhealthy: PathBuf,
    /// v2 signed by a key the image does not trust.
    pub unknown_key: PathBuf,
}

/// The bundle file name `cargo xtask image` writes for an architecture.
pub fn bundle_name(arch: Arch) -> String {
    format!("keelson-{}.bundle", arch.debian())
}

/// The suite's image's bundle (v1) for an architecture.
pub fn v1_bundle(arch: Arch) -> Result<PathBuf> {
    let path = image_dir(arch).join(bundle_name(arch));
    if !path.is_file() {
        bail!(
            "no bundle at {}: run `cargo xtask image --arch {arch}` first",
            path.display()
        );
    }
    Ok(path)
}

fn xtask(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("upgrade fixtures: cargo xtask {}", args.join(" "));
    let status = Command::new(cargo)
        .current_dir(workspace_root())
        .arg("xtask")
        .args(args)
        .status()
        .context("starting cargo xtask")?;
    if !status.success() {
        bail!("cargo xtask {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

fn fixtures_dir(arch: Arch) -> PathBuf {
    workspace_root()
        .join("target/upgrade-fixtures")
        .join(arch.debian())
}

fn build_v2(arch: Arch) -> Result<PathBuf> {
    let v2_dir = fixtures_dir(arch).join("v2");
    xtask(&[
        "image",
        "--arch",
        arch.debian(),
        "--version",
        V2,
        "--out",
        path_str(&v2_dir)?,
    ])?;
    Ok(v2_dir)
}

/// The directory of v2's image for `arch` (its bundle inside), built at the first call
/// of the process.
pub fn v2_dir(arch: Arch) -> Result<PathBuf> {
    static AMD64: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    static ARM64: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let cell = match arch {
        Arch::Amd64 => &AMD64,
        Arch::Arm64 => &ARM64,
    };
    cell.get_or_init(|| build_v2(arch).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build(arch: Arch) -> Result<Bundles> {
    let v1 = v1_bundle(arch)?;
    let root = fixtures_dir(arch);
    let arch_name = arch.debian();
    let v2_dir = v2_dir(arch)?;
    let v3_dir = root.join("v3");
    xtask(&[
        "image",
        "--arch",
        arch_name,
        "--version",
        V3,
        "--init-features",
        "fault-injection",
        "--out",
        path_str(&v3_dir)?,
    ])?;
    let derive = |name: &str, extra: &[&str]| -> Result<PathBuf> {
        let out = root.join(format!("{name}.bundle"));
        let mut args = vec![
            "bundle",
            "--from",
            path_str(&v3_dir)?,
            "--out",
            path_str(&out)?,
        ];
        args.extend_from_slice(extra);
        xtask(&args)?;
        Ok(out)
    };
    let v3_init_fails = derive(
        "v3-init-fails",
        &["--cmdline-append", "keelson.fault=init-fails"],
    )?;
    let v3_hang = derive(
        "v3-hang",
        &[
            "--cmdline-append",
            "keelson.fault=stage1-hang keelson.watchdog=15",
        ],
    )?;
    let v3_panic = derive("v3-panic", &["--empty-initrd"])?;
    let v3_unhealthy = derive(
        "v3-unhealthy",
        &["--cmdline-append", "keelson.fault=unhealthy"],
    )?;
    let stranger = root.join("stranger-key");
    xtask(&["keygen", "--out", path_str(&stranger)?, "--force"])?;
    let unknown_key = root.join("v2-unknown-key.bundle");
    xtask(&[
        "bundle",
        "--from",
        path_str(&v2_dir)?,
        "--out",
        path_str(&unknown_key)?,
        "--signing-key",
        path_str(&stranger.join("upgrade.key"))?,
    ])?;
    Ok(Bundles {
        v1,
        v2: v2_dir.join(bundle_name(arch)),
        v3_init_fails,
        v3_hang,
        v3_panic,
        v3_unhealthy,
        unknown_key,
    })
}

/// Every bundle for `arch`, built at the first call of the process (a few minutes under
/// load: two image rebuilds), shared by every test after it.
pub fn bundles(arch: Arch) -> Result<Bundles> {
    static AMD64: OnceLock<Result<Bundles, String>> = OnceLock::new();
    static ARM64: OnceLock<Result<Bundles, String>> = OnceLock::new();
    let cell = match arch {
        Arch::Amd64 => &AMD64,
        Arch::Arm64 => &ARM64,
    };
    cell.get_or_init(|| build(arch).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}
