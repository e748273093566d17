//! `cargo xtask lock`, `cargo xtask image` and `cargo xtask run`: pin the inputs, build
//! our binaries for the image's architecture and the disk image itself with its upgrade
//! bundle (see [`crate::bundle`]), and boot it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use keelson_cluster::qemu::{self, Machine};
use keelson_configs::layout::Arch;
use keelson_imager::build::{BuildOptions, BuildReport, Format};
use keelson_imager::debian::fetch::Cache;
use keelson_imager::debian::{self, Mirror};
use keelson_imager::definition::Definition;

use crate::{bundle, cargo, run_cmd, workspace_root};

/// The image definition every command builds from.
pub fn definition_path() -> PathBuf {
    workspace_root().join("images/keelson.toml")
}

/// Where an architecture's image files go by default.
pub fn image_dir(arch: Arch) -> PathBuf {
    workspace_root().join("target/images").join(arch.debian())
}

/// Parse `amd64`/`arm64`.
pub fn parse_arch(s: &str) -> Result<Arch> {
    Arch::from_debian(s).with_context(|| format!("unknown architecture `{s}`: use amd64 or arm64"))
}

/// The mirror: the flag, else the host's apt sources (None when neither names one:
/// a warm cache then needs no mirror, and a cold one says to pass `--mirror`).
fn mirror(flag: Option<&str>) -> Result<Option<Mirror>> {
    match flag {
        Some(url) => Ok(Some(Mirror::new(url)?)),
        None => Ok(debian::mirror_from_apt_sources().ok()),
    }
}

/// `cargo xtask lock`: re-resolve and pin every input.
pub fn lock(arches: &[Arch], mirror_flag: Option<&str>) -> Result<()> {
    let def = Definition::load(&definition_path())?;
    let mirror = match mirror(mirror_flag)? {
        Some(m) => m,
        None => bail!(
            "no Debian mirror: the host's apt sources name none; pass --mirror http://<mirror>/debian"
        ),
    };
    let cache = Cache::from_env()?;
    for &arch in arches {
        let mut lock =
            debian::lock::generate(&def, arch, &mirror, &cache, &debian::stderr_progress)?;
        let path = def.lock_path(arch);
        lock.save(&path)?;
        eprintln!(
            "xtask: {} pins {} packages ({} MiB)",
            path.display(),
            lock.packages.len(),
            lock.total_size() >> 20
        );
    }
    Ok(())
}

/// The package whose binaries (both stages of PID 1) `--init-features` builds with
/// extra cargo features.
const INIT_PACKAGE: &str = "keelson-init";

/// The cargo target directory: `CARGO_TARGET_DIR`, else the workspace's `target/`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Where init is built with `features`: a target directory of its own
/// (`target/image-features/<features>`), so that a test build (`fault-injection`) never
/// replaces the binaries that the default image's `build-inputs.toml` names.
fn features_target_dir(features: &str) -> PathBuf {
    let name: String = features
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '+'
            }
        })
        .collect();
    target_dir().join("image-features").join(name)
}

/// Cross-compile our image binaries for `arch`, returning binary name → path.
/// `init_features` (cargo's `--features` value) goes to both stages of init.
pub fn build_binaries(
    def: &Definition,
    arch: Arch,
    init_features: Option<&str>,
) -> Result<BTreeMap<String, PathBuf>> {
    let target = arch.rust_target();
    let mut out = BTreeMap::new();
    for bin in &def.binaries {
        // ring (in machined) compiles C: for x86_64 with musl-tools' musl-gcc, for
        // aarch64 with Debian's cross compiler.
        let cc_env = [
            ("CC_x86_64_unknown_linux_musl", "musl-gcc"),
            ("CC_aarch64_unknown_linux_musl", "aarch64-linux-gnu-gcc"),
            ("AR_aarch64_unknown_linux_musl", "aarch64-linux-gnu-ar"),
        ];
        let mut cmd = cargo();
        cmd.envs(cc_env).args([
            "build",
            "--quiet",
            "--package",
            &bin.package,
            "--bin",
            &bin.bin,
            "--target",
            target,
            "--profile",
            "image",
        ]);
        let mut target_dir = target_dir();
        if let Some(features) = init_features.filter(|_| bin.package == INIT_PACKAGE) {
            target_dir = features_target_dir(features);
            cmd.arg("--features")
                .arg(features)
                .arg("--target-dir")
                .arg(&target_dir);
        }
        run_cmd(&mut cmd)?;
        out.insert(
            bin.bin.clone(),
            target_dir.join(target).join("image").join(&bin.bin),
        );
    }
    Ok(out)
}

/// Options of `cargo xtask image`.
#[derive(Debug, Clone)]
pub struct ImageArgs {
    /// Architectures to build.
    pub arches: Vec<Arch>,
    /// Output formats.
    pub formats: Vec<Format>,
    /// Output directory (per architecture when several are built).
    pub out: Option<PathBuf>,
    /// Mirror URL.
    pub mirror: Option<String>,
    /// A directory of an air-gapped Kubernetes to bake in (`kubelet`, `images/*.tar`).
    pub kubernetes: Option<PathBuf>,
    /// The OS version (os-release, the boot entry, the bundle's manifest).
    pub version: String,
    /// Cargo features for init's build (both stages), e.g. `fault-injection`.
    pub init_features: Option<String>,
    /// The keys and the bundle.
    pub upgrade: UpgradeArgs,
}

/// The upgrade side of `cargo xtask image`: which keys the image trusts, which key
/// signs its bundle.
#[derive(Debug, Clone, Default)]
pub struct UpgradeArgs {
    /// Public keys the image trusts (empty: the dev key, made on first use).
    pub trust: Vec<PathBuf>,
    /// The key that signs the bundle (`None`: the dev key, made on first use).
    pub signing_key: Option<PathBuf>,
    /// The oldest version the bundle upgrades from.
    pub min_version: Option<String>,
}

impl ImageArgs {
    /// A build of `arches` in `formats` with every other option at its default: the
    /// default output directory, the host's mirror, version [`DEFAULT_VERSION`], the dev
    /// key.
    pub fn new(arches: Vec<Arch>, formats: Vec<Format>) -> ImageArgs {
        ImageArgs {
            arches,
            formats,
            out: None,
            mirror: None,
            kubernetes: None,
            version: DEFAULT_VERSION.to_string(),
            init_features: None,
            upgrade: UpgradeArgs::default(),
        }
    }
}

/// The OS version of an image built without `--version`: the workspace's.
pub const DEFAULT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// `cargo xtask image`.
pub fn image(args: &ImageArgs) -> Result<Vec<(Arch, BuildReport)>> {
    let def = Definition::load(&definition_path())?;
    let mirror = mirror(args.mirror.as_deref())?;
    let cache = Cache::from_env()?;
    // Keys first: a bad key file is refused before anything is built.
    let keys = crate::keys::ImageKeys::resolve(&args.upgrade)?;
    let mut reports = Vec::new();
    for &arch in &args.arches {
        let started = Instant::now();
        let binaries = build_binaries(&def, arch, args.init_features.as_deref())?;
        let out_dir = match &args.out {
            Some(dir) if args.arches.len() > 1 => dir.join(arch.debian()),
            Some(dir) => dir.clone(),
            None => image_dir(arch),
        };
        let opts = BuildOptions {
            definition: definition_path(),
            arch,
            binaries,
            out_dir: out_dir.clone(),
            formats: args.formats.clone(),
            mirror: mirror.clone(),
            cache: cache.clone(),
            version: args.version.clone(),
            reuse_derived: true,
            kubernetes: args.kubernetes.clone(),
            trusted_keys: keys.trusted.clone(),
        };
        // Each step with the time since the build started, to see where a build goes.
        let imager_started = Instant::now();
        let progress = |line: &str| {
            eprintln!("[{:5.1} s] {line}", imager_started.elapsed().as_secs_f64());
        };
        let report = keelson_imager::build::build(&opts, &progress)?;
        progress(&format!("{arch}: writing the upgrade bundle"));
        let bundle = bundle::write_image_bundle(&bundle::ImageBundle {
            def: &def,
            arch,
            out_dir: &out_dir,
            version: &args.version,
            min_version: args.upgrade.min_version.as_deref(),
            report: &report,
            signing_key: &keys.signing,
        })?;
        progress(&format!("{arch}: wrote {}", bundle.display()));
        eprintln!(
            "xtask: {arch} image built in {:.1}s (kernel {}, root hash {})",
            started.elapsed().as_secs_f64(),
            report.kernel_release,
            report.root_hash
        );
        for (name, size) in &report.artefacts {
            eprintln!("xtask:   {name:<20} {:>10.1} MiB", *size as f64 / 1048576.0);
        }
        for (path, size) in &report.files {
            eprintln!(
                "xtask:   {:<20} {:>10.1} MiB",
                path.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default(),
                *size as f64 / 1048576.0
            );
        }
        reports.push((arch, report));
    }
    Ok(reports)
}

/// `cargo xtask run`: build the image and boot it under QEMU with its console on this
/// terminal, until the guest powers off (or `timeout` passes).
pub fn run(arch: Arch, timeout: Duration) -> Result<()> {
    image(&ImageArgs::new(vec![arch], vec![Format::Raw]))?;
    let dir = tempfile::Builder::new()
        .prefix("keelson-run-")
        .tempdir()
        .context("creating a scratch directory for the VM")?;
    let overlay = dir.path().join("disk.qcow2");
    qemu::create_overlay(&image_dir(arch).join("keelson.raw"), &overlay, None)?;
    let accel = qemu::probe_accel(arch, dir.path());
    eprintln!(
        "xtask: booting {arch} under QEMU ({}{}), console follows",
        accel.name(),
        if accel == qemu::Accel::Tcg {
            ": software emulation, KVM is not usable here"
        } else {
            ""
        }
    );
    let mut machine = Machine::new(arch, accel, overlay, dir.path().to_path_buf());
    machine.console_stdio = true;
    machine.no_reboot = true;
    let mut child = machine.command()?.spawn().context("starting QEMU")?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            eprintln!("xtask: the VM stopped ({status})");
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the VM did not stop within {}s; stopped it",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
