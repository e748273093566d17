//! The upgrade tests' bundles, as `cargo xtask upgrade-inputs` lays them out under
//! `target/images/` (`cargo xtask test` builds them after the suite's v1 images; see
//! `xtask/src/upgrade_inputs.rs`): v2 and v3 are small derivations of v1 (`cargo xtask
//! image --version`, whose package and squashfs block caches make them a rebuild of the
//! root's changed blocks), and the faulty v3s are `cargo xtask bundle` derivations of v3
//! (seconds each), each with a manifest version of its own.
//!
//! A test run alone (`cargo test --test upgrade`) builds them at its first need.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context as _, Result, bail};

use crate::{Arch, image_dir, workspace_root};

/// v2's version.
pub const V2: &str = "0.2.0";

/// A faulty v3: its bundle and the version its manifest carries.
#[derive(Debug, Clone)]
pub struct Faulty {
    /// The bundle.
    pub bundle: PathBuf,
    /// Its manifest's version.
    pub version: &'static str,
}

/// The bundles of the upgrade tests (amd64).
#[derive(Debug, Clone)]
pub struct Bundles {
    /// The suite's image's own bundle (v1).
    pub v1: PathBuf,
    /// v2.
    pub v2: PathBuf,
    /// v3 whose PID 1 exits (`keelson.fault=init-fails`).
    pub v3_init_fails: Faulty,
    /// v3 whose stage 1 hangs (`keelson.fault=stage1-hang`).
    pub v3_hang: Faulty,
    /// v3 whose kernel panics (an initramfs with no `/init`).
    pub v3_panic: Faulty,
    /// v3 that never becomes healthy (`keelson.fault=unhealthy`).
    pub v3_unhealthy: Faulty,
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

fn images() -> PathBuf {
    workspace_root().join("target/images")
}

/// v2's bundle for `arch`.
pub fn v2_bundle(arch: Arch) -> Result<PathBuf> {
    ensure_inputs()?;
    Ok(images()
        .join(format!("{}-v2", arch.debian()))
        .join(bundle_name(arch)))
}

/// Run `cargo xtask upgrade-inputs` once per process when its outputs are missing.
fn ensure_inputs() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let last = images().join("amd64-v2/v2-untrusted.bundle");
        if last.is_file() {
            return Ok(());
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        eprintln!("upgrade inputs missing: cargo xtask upgrade-inputs");
        let status = Command::new(cargo)
            .current_dir(workspace_root())
            .args(["xtask", "upgrade-inputs"])
            .status()
            .context("starting cargo xtask upgrade-inputs")
            .map_err(|e| format!("{e:#}"))?;
        if !status.success() {
            return Err(format!("cargo xtask upgrade-inputs failed ({status})"));
        }
        Ok(())
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Every bundle of the amd64 upgrade tests.
pub fn bundles() -> Result<Bundles> {
    ensure_inputs()?;
    let v3 = images().join("amd64-v3");
    let faulty = |file: &str, version: &'static str| Faulty {
        bundle: v3.join(file),
        version,
    };
    Ok(Bundles {
        v1: v1_bundle(Arch::Amd64)?,
        v2: v2_bundle(Arch::Amd64)?,
        v3_init_fails: faulty("v3-init-fails.bundle", "0.3.1"),
        v3_hang: faulty("v3-stage1-hang.bundle", "0.3.2"),
        v3_panic: faulty("v3-kernel-panic.bundle", "0.3.3"),
        v3_unhealthy: faulty("v3-unhealthy.bundle", "0.3.4"),
        unknown_key: images().join("amd64-v2/v2-untrusted.bundle"),
    })
}
