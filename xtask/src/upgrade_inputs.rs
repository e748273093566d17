//! The images and bundles the upgrade tests (`tests/tests/upgrade.rs`) take, built by
//! `cargo xtask test` after the suite's v1 images (`target/images/<arch>/`, version
//! [`crate::image::DEFAULT_VERSION`], whose bundle is the downgrade case):
//!
//! | path under `target/images/` | what |
//! |---|---|
//! | `amd64-v2/`, `arm64-v2/` | version 0.2.0: `keelson.raw` and `keelson-<arch>.bundle` |
//! | `amd64-v3/` | version 0.3.0 with init's `fault-injection` feature: its bundle (a good v3) and the failures below |
//! | `amd64-v3/v3-init-fails.bundle` | 0.3.1, `keelson.fault=init-fails` |
//! | `amd64-v3/v3-stage1-hang.bundle` | 0.3.2, `keelson.fault=stage1-hang keelson.watchdog=15` |
//! | `amd64-v3/v3-kernel-panic.bundle` | 0.3.3, an initramfs with no `/init` |
//! | `amd64-v3/v3-unhealthy.bundle` | 0.3.4, `keelson.fault=unhealthy` |
//! | `amd64-v2/v2-untrusted.bundle` | v2 signed by a key no image trusts (`target/keelson-keys-untrusted/`) |
//!
//! Each failure has a version of its own, so that one failing does not make the next
//! refused as a version that failed already. Only the manifest (and so the boot entry)
//! carries it: the root's os-release says 0.3.0 in all of them.
//!
//! Every image is signed with, and trusts, the dev key (`target/keelson-keys/`).

use anyhow::Result;
use keelson_configs::layout::Arch;
use keelson_imager::build::Format;

use crate::bundle::{self, BundleArgs};
use crate::image::{self, ImageArgs};
use crate::{keys, workspace_root};

/// The version of the v2 images.
const V2: &str = "0.2.0";
/// The version of the v3 image.
const V3: &str = "0.3.0";

/// The failures derived from the v3 image: file name, manifest version, kernel argument
/// (`None`: the initramfs is emptied instead).
const V3_FAILURES: &[(&str, &str, Option<&str>)] = &[
    (
        "v3-init-fails.bundle",
        "0.3.1",
        Some("keelson.fault=init-fails"),
    ),
    (
        "v3-stage1-hang.bundle",
        "0.3.2",
        // A 15 s watchdog: three hung tries take a minute or two, not six.
        Some("keelson.fault=stage1-hang keelson.watchdog=15"),
    ),
    ("v3-kernel-panic.bundle", "0.3.3", None),
    (
        "v3-unhealthy.bundle",
        "0.3.4",
        Some("keelson.fault=unhealthy"),
    ),
];

/// Build the upgrade tests' images and derive their bundles (see the module's doc).
pub fn build() -> Result<()> {
    let images = workspace_root().join("target/images");
    let build = |arch: Arch, dir: &str, version: &str, init_features: Option<&str>| {
        image::image(&ImageArgs {
            out: Some(images.join(dir)),
            version: version.to_string(),
            init_features: init_features.map(str::to_string),
            ..ImageArgs::new(vec![arch], vec![Format::Raw])
        })
    };
    build(Arch::Amd64, "amd64-v2", V2, None)?;
    build(Arch::Arm64, "arm64-v2", V2, None)?;
    build(Arch::Amd64, "amd64-v3", V3, Some("fault-injection"))?;

    let derive = |from: &str, out: &str| BundleArgs {
        from: images.join(from),
        out: images.join(from).join(out),
        version: None,
        min_version: None,
        cmdline_append: None,
        initrd: None,
        empty_initrd: false,
        signing_key: None,
    };
    for &(file, version, fault) in V3_FAILURES {
        bundle::derive(&BundleArgs {
            version: Some(version.to_string()),
            cmdline_append: fault.map(str::to_string),
            empty_initrd: fault.is_none(),
            ..derive("amd64-v3", file)
        })?;
    }
    let untrusted = workspace_root().join("target/keelson-keys-untrusted");
    if !untrusted.join(keys::PRIVATE_FILE).is_file() {
        keys::keygen(&untrusted, true)?;
    }
    bundle::derive(&BundleArgs {
        signing_key: Some(untrusted.join(keys::PRIVATE_FILE)),
        ..derive("amd64-v2", "v2-untrusted.bundle")
    })
}
