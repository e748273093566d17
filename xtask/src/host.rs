//! Host set-up: the Debian packages (QEMU, firmware, filesystem tools) and Rust targets
//! the build and the tests need, installed by the project itself so that a fresh machine
//! (and CI) needs nothing done by hand.
//!
//! As root on Debian/Ubuntu we install with apt; otherwise we print the exact command.
//! QEMU comes from the release's backports suite when the release's own QEMU is older
//! than the one the host's `qemu-utils` came from; the mirror URL for that suite is taken
//! from the host's own apt sources, never written in this repository.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Host commands we need, and the Debian package that provides each.
const TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("qemu-system-aarch64", "qemu-system-arm"),
    ("qemu-img", "qemu-utils"),
    ("sgdisk", "gdisk"),
    ("fsck.vfat", "dosfstools"),
    ("unsquashfs", "squashfs-tools"),
    ("veritysetup", "cryptsetup-bin"),
    ("openssl", "openssl"),
    ("protoc", "protobuf-compiler"),
    ("cpio", "cpio"),
    ("mdir", "mtools"),
    ("mkfs.ext4", "e2fsprogs"),
    ("zstd", "zstd"),
    ("dnsmasq", "dnsmasq-base"),
    ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    ("musl-gcc", "musl-tools"),
    ("qemu-io", "qemu-utils"),
    ("debootstrap", "debootstrap"),
    // The etcd tests judge the nodes' etcd with the real etcdctl, and serve them time
    // with the real chronyd.
    ("etcdctl", "etcd-client"),
    ("chronyd", "chrony"),
    // The Kubernetes test judges the node's kubeconfigs with the real kubectl, serves it
    // control-plane images from the real registry (pushed with skopeo), and decodes its
    // manifests with the Kubernetes Python client (LIBRARIES).
    ("kubectl", "kubernetes-client"),
    ("docker-registry", "docker-registry"),
    ("skopeo", "skopeo"),
    // The upgrade test carries a guest's fetch of a bundle to a server on this host
    // (QEMU's `guestfwd=...-cmd:socat ...`).
    ("socat", "socat"),
];

/// Firmware files we need, and the Debian package that provides each.
const FIRMWARE: &[(&str, &str)] = &[
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf"),
    ("/usr/share/AAVMF/AAVMF_CODE.fd", "qemu-efi-aarch64"),
];

/// Libraries the tests use (checked by a file of theirs), and the Debian package of each.
const LIBRARIES: &[(&str, &str)] = &[(
    "/usr/lib/python3/dist-packages/kubernetes/__init__.py",
    "python3-kubernetes",
)];

/// Rust targets our image binaries are built for.
pub const RUST_TARGETS: &[&str] = &["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"];

fn have(cmd: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| dir.join(cmd).is_file())
            || Path::new("/usr/sbin").join(cmd).is_file()
            || Path::new("/sbin").join(cmd).is_file()
    })
}

/// Debian packages that are missing on this host.
pub fn missing_packages() -> Vec<&'static str> {
    let mut missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .chain(
            FIRMWARE
                .iter()
                .chain(LIBRARIES)
                .filter(|(file, _)| !Path::new(file).exists())
                .map(|(_, pkg)| *pkg),
        )
        .collect();
    missing.sort_unstable();
    missing.dedup();
    missing
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// The first plain-HTTP Debian archive URI and the release codename from the host's
/// apt sources (deb822 `.sources` files first, then the one-line `sources.list`).
fn apt_archive() -> Option<(String, String)> {
    let mut texts = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<_> = dir.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            if p.extension().is_some_and(|e| e == "sources") {
                texts.extend(std::fs::read_to_string(&p).ok());
            }
        }
    }
    for stanza in texts.iter().flat_map(|t| t.split("\n\n")) {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) else {
            continue;
        };
        let Some(uri) = uris.split_whitespace().find(|u| u.starts_with("http://")) else {
            continue;
        };
        if uri.contains("security") {
            continue;
        }
        if let Some(suite) = suites.split_whitespace().find(|s| !s.contains('-')) {
            return Some((uri.to_string(), suite.to_string()));
        }
    }
    let list = std::fs::read_to_string("/etc/apt/sources.list").ok()?;
    list.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next()? == "deb").then_some(())?;
        let mut uri = w.next()?;
        if uri.starts_with('[') {
            uri = w.next()?;
        }
        let suite = w.next()?;
        (uri.starts_with("http://") && !uri.contains("security") && !suite.contains('-'))
            .then(|| (uri.to_string(), suite.to_string()))
    })
}

/// Whether apt would install QEMU from a release older than the installed `qemu-utils`
/// (which breaks: the host image ships qemu-utils from backports).
fn qemu_needs_backports() -> bool {
    let out = |pkg: &str| {
        Command::new("apt-cache")
            .args(["policy", pkg])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    out("qemu-utils").contains("bpo")
}

/// `/usr/sbin/policy-rc.d` answering 101 while it lives (Debian's way to keep packages'
/// services from starting at install); an existing one is left alone.
struct NoServiceStarts(Option<&'static str>);

impl NoServiceStarts {
    fn new() -> Result<NoServiceStarts> {
        const PATH: &str = "/usr/sbin/policy-rc.d";
        if Path::new(PATH).exists() {
            return Ok(NoServiceStarts(None));
        }
        std::fs::write(PATH, "#!/bin/sh\nexit 101\n").with_context(|| format!("writing {PATH}"))?;
        std::fs::set_permissions(PATH, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .with_context(|| format!("making {PATH} executable"))?;
        Ok(NoServiceStarts(Some(PATH)))
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if let Some(path) = self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Install whatever is missing (as root), or say exactly what to run.
pub fn ensure() -> Result<()> {
    let missing = missing_packages();
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "missing host packages: {}\n  install them with: sudo apt-get install -y {}",
                missing.join(" "),
                missing.join(" ")
            );
        }
        eprintln!("xtask: installing host packages: {}", missing.join(" "));
        let noninteractive = [("DEBIAN_FRONTEND", "noninteractive")];
        let mut backports = None;
        if qemu_needs_backports()
            && let Some((uri, suite)) = apt_archive()
        {
            let file = "/etc/apt/sources.list.d/keelson-backports.sources";
            let text = format!(
                "Types: deb\nURIs: {uri}\nSuites: {suite}-backports\nComponents: main\n\
                 Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
            );
            std::fs::write(file, text).with_context(|| format!("writing {file}"))?;
            backports = Some(format!("{suite}-backports"));
        }
        run(Command::new("apt-get")
            .arg("update")
            .arg("-q")
            .envs(noninteractive))?;
        let (qemu, rest): (Vec<&str>, Vec<&str>) = missing
            .iter()
            .partition(|p| p.starts_with("qemu") || **p == "ovmf");
        if !qemu.is_empty() {
            let mut cmd = Command::new("apt-get");
            cmd.args(["install", "-y", "-q"]).envs(noninteractive);
            if let Some(suite) = &backports {
                cmd.args(["-t", suite]);
            }
            run(cmd.args(&qemu))?;
        }
        if !rest.is_empty() {
            // chrony's maintainer script would start the host's own time daemon, which
            // steps this machine's clock, and docker-registry's a registry on port 5000:
            // policy-rc.d (101, "action forbidden") keeps every package's service from
            // starting during the install.
            let _no_services = NoServiceStarts::new()?;
            run(Command::new("apt-get")
                .args(["install", "-y", "-q"])
                .envs(noninteractive)
                .args(&rest))?;
        }
        let still = missing_packages();
        if !still.is_empty() {
            bail!("still missing after apt-get install: {}", still.join(" "));
        }
    }
    ensure_rust_targets()
}

fn ensure_rust_targets() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup (needed to add the musl targets)")?;
    let installed = String::from_utf8_lossy(&installed.stdout);
    let missing: Vec<&str> = RUST_TARGETS
        .iter()
        .copied()
        .filter(|t| !installed.lines().any(|l| l.trim() == *t))
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask: adding Rust targets: {}", missing.join(" "));
        run(Command::new("rustup")
            .args(["target", "add"])
            .args(&missing))?;
    }
    Ok(())
}
