//! The peer: the node the seed documents teach people to build by hand, so that our
//! figures are set beside what a kubeadm user runs today. A Debian trixie system made
//! with `debootstrap --variant=minbase`, systemd as init, containerd from Debian, and
//! the very kernel package our image pins (installed with `dpkg -i`, so Debian's own
//! `initramfs-tools` makes its initramfs, as on any installed Debian system).
//!
//! Its disk is a GPT with an ESP and an ext4 root (`mkfs.ext4 -d`). The ESP carries the
//! same systemd-boot as our image and one entry booting the peer's kernel and
//! initramfs with `root=UUID=... ro` plus the same console and log-level arguments as
//! ours: firmware, boot loader, kernel, QEMU flags are identical for the floor, our
//! image and the peer, and only what runs after the kernel differs.
//!
//! A systemd unit in the peer waits for `ctr version` to answer, prints `PEER-READY`
//! on the console, waits 10 s, and prints the RSS (and PSS) of PID 1, every `systemd*`
//! process and containerd. The peer's files are Debian's and include a shell: it is
//! the reference, not our image.
//!
//! Built once per mirror snapshot (the suite's `Release` date), kernel and recipe,
//! cached under `target/bench/peer/<key>/`; needs root (debootstrap, chroot).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use keelson_configs::layout::{self, Arch};
use keelson_imager::compress;
use keelson_imager::debian::fetch::Cache;
use keelson_imager::debian::lock::Lock;
use keelson_imager::debian::{self, Mirror};
use keelson_imager::definition::Definition;
use keelson_imager::esp::{BootEntry, Esp, LoaderConf};
use keelson_imager::gpt::{self, Content, DiskSpec, Guid, PartitionSpec};
use keelson_imager::inspect;
use serde::{Deserialize, Serialize};

/// Bump when the recipe below changes, so that cached peers are rebuilt.
const RECIPE: u32 = 1;
/// What debootstrap installs besides minbase: systemd as init, containerd (with runc),
/// and what the kernel package needs to install and make its initramfs.
const PACKAGES: &[&str] = &[
    "systemd-sysv",
    "containerd",
    "initramfs-tools",
    "kmod",
    "linux-base",
    "zstd",
];
/// The root filesystem's UUID (fixed, so that the boot entry can name it).
const ROOT_UUID: &str = "6b65656c-736f-6e2d-6265-6e6368706565";
/// Console markers printed by the peer's bench unit.
pub const READY_MARKER: &str = "PEER-READY";
/// The memory line: `PEER-RSS total_kb=N pss_kb=N name=kb ...`.
pub const RSS_MARKER: &str = "PEER-RSS";

/// The peer's bench unit: waits for containerd to answer, then reports memory.
const UNIT: &str = "\
[Unit]
Description=Keelson bench: say when containerd answers, then memory at idle
Wants=containerd.service
After=containerd.service

[Service]
Type=simple
ExecStart=/usr/local/sbin/keelson-bench-report

[Install]
WantedBy=multi-user.target
";

/// The script the unit runs (the peer's own shell runs it).
const REPORT_SCRIPT: &str = r#"#!/bin/sh
# Keelson bench (peer): say when containerd answers, then, 10 s later, the memory of
# init and the system daemons (PID 1, every systemd* process, containerd).
until ctr version >/dev/null 2>&1; do sleep 0.2; done
echo "PEER-READY" > /dev/console
sleep 10
total=0; pss=0; list=""
for d in /proc/[0-9]*; do
    name=$(cat "$d/comm" 2>/dev/null) || continue
    case "${d#/proc/}:$name" in
        1:*|*:systemd*|*:containerd*|*:dbus-daemon) ;;
        *) continue ;;
    esac
    rss=$(awk '/^VmRSS:/ {print $2}' "$d/status" 2>/dev/null)
    [ -n "$rss" ] || continue
    p=$(awk '/^Pss:/ {print $2}' "$d/smaps_rollup" 2>/dev/null)
    total=$((total + rss)); pss=$((pss + ${p:-0}))
    list="$list $name=$rss"
done
echo "PEER-RSS total_kb=$total pss_kb=$pss$list" > /dev/console
"#;

/// Sizes of the peer, for the image figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerSizes {
    /// Bytes of all files in its root tree (apparent sizes).
    pub root_tree: u64,
    /// Its kernel (the same file as ours).
    pub kernel: u64,
    /// The initramfs Debian's initramfs-tools made.
    pub initramfs: u64,
    /// Its raw disk image.
    pub raw: u64,
    /// The raw disk image compressed like ours (zstd at the imager's image level).
    pub raw_zst: u64,
    /// The raw disk image converted to qcow2 (`qemu-img convert`, like ours).
    pub qcow2: u64,
    /// The kernel package installed.
    pub kernel_package: String,
    /// The mirror's `Release` date the peer was built from.
    pub release_date: String,
}

/// A built peer.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its raw disk image (boot it through an overlay).
    pub disk: PathBuf,
    /// Its sizes.
    pub sizes: PeerSizes,
}

/// The peer for amd64: the cached one for the mirror's current snapshot, else built
/// now (a few minutes: debootstrap, the kernel's initramfs, mkfs, compression).
/// `image` is our built amd64 image, whose ESP gives the systemd-boot binary; `peers`
/// is the cache directory (one subdirectory per snapshot, kernel and recipe).
pub fn ensure(peers: &Path, image: &Path, rebuild: bool) -> Result<Peer> {
    let arch = Arch::Amd64;
    let def = Definition::load(&crate::image::definition_path())?;
    let lock = Lock::load(&def.lock_path(arch))?;
    let kernel_pkg = lock.package(&lock.kernel).with_context(|| {
        format!(
            "the amd64 lock does not pin its kernel {}: run `cargo xtask lock`",
            lock.kernel
        )
    })?;
    let cache = Cache::from_env()?;
    let kernel_deb = cache.deb_path(kernel_pkg);
    if !kernel_deb.is_file() {
        bail!(
            "the kernel package {} is not in the cache ({}): build the amd64 image first \
             (`cargo xtask image --arch amd64`)",
            kernel_pkg.name,
            kernel_deb.display()
        );
    }
    let mirror = debian::mirror_from_apt_sources().ok();
    let release_date = mirror
        .as_ref()
        .and_then(|m| release_date(m, &def.suite).ok());
    let dir = match &release_date {
        Some(date) => peers.join(format!(
            "{}-{}-{}-r{RECIPE}",
            def.suite,
            sanitize(date),
            sanitize(&kernel_pkg.version)
        )),
        None => match newest_cached(peers) {
            Some(dir) => {
                eprintln!(
                    "xtask: bench: the mirror's Release file is unreachable; using the cached \
                     peer {}",
                    dir.display()
                );
                dir
            }
            None => bail!(
                "cannot build the peer: no Debian mirror answers (the host's apt sources name \
                 none or it is unreachable) and no peer is cached under {}",
                peers.display()
            ),
        },
    };
    let sizes_file = dir.join("peer.json");
    if !rebuild && let Ok(text) = std::fs::read_to_string(&sizes_file) {
        let sizes: PeerSizes = serde_json::from_str(&text)
            .with_context(|| format!("reading {}: delete it to rebuild", sizes_file.display()))?;
        return Ok(Peer {
            disk: dir.join("peer.raw"),
            sizes,
        });
    }
    let Some(mirror) = mirror else {
        bail!("cannot build the peer: the host's apt sources name no Debian mirror");
    };
    let Some(release_date) = release_date else {
        bail!("cannot build the peer: the mirror's Release file is unreachable");
    };
    build(&BuildInputs {
        dir: &dir,
        def: &def,
        mirror: &mirror,
        kernel_deb: &kernel_deb,
        kernel_package: &kernel_pkg.name,
        release_date: &release_date,
        image,
    })?;
    let text = std::fs::read_to_string(&sizes_file)
        .with_context(|| format!("reading {}", sizes_file.display()))?;
    Ok(Peer {
        disk: dir.join("peer.raw"),
        sizes: serde_json::from_str(&text)?,
    })
}

struct BuildInputs<'a> {
    dir: &'a Path,
    def: &'a Definition,
    mirror: &'a Mirror,
    kernel_deb: &'a Path,
    kernel_package: &'a str,
    release_date: &'a str,
    image: &'a Path,
}

fn build(inp: &BuildInputs<'_>) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!(
            "building the peer needs root (debootstrap, chroot, mount): run \
             `cargo xtask bench` as root, as CI does"
        );
    }
    ensure_debootstrap()?;
    let dir = inp.dir;
    let root = dir.join("root");
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("removing the stale peer {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!(
        "xtask: bench: building the peer in {} (debootstrap, a few minutes; log in debootstrap.log)",
        dir.display()
    );
    run_logged(
        Command::new("debootstrap")
            .args(["--variant=minbase", "--arch=amd64"])
            .arg(format!("--include={}", PACKAGES.join(",")))
            .arg(&inp.def.suite)
            .arg(&root)
            .arg(inp.mirror.as_str()),
        &dir.join("debootstrap.log"),
    )?;

    // The same kernel package as our image, installed the way a Debian user installs
    // one: dpkg runs its maintainer scripts, initramfs-tools makes the initramfs.
    let deb_in_root = root.join("var/cache/keelson-kernel.deb");
    std::fs::copy(inp.kernel_deb, &deb_in_root)
        .with_context(|| format!("copying the kernel package into {}", root.display()))?;
    {
        let _proc = Mount::proc(&root.join("proc"))?;
        run_logged(
            Command::new("chroot")
                .arg(&root)
                .args(["dpkg", "-i", "/var/cache/keelson-kernel.deb"]),
            &dir.join("kernel.log"),
        )?;
    }
    std::fs::remove_file(&deb_in_root).ok();

    let release = inp
        .kernel_package
        .strip_prefix("linux-image-")
        .unwrap_or(inp.kernel_package);
    let kernel = std::fs::read(root.join(format!("boot/vmlinuz-{release}")))
        .with_context(|| format!("the peer has no /boot/vmlinuz-{release}: see kernel.log"))?;
    let initrd = std::fs::read(root.join(format!("boot/initrd.img-{release}")))
        .with_context(|| format!("the peer has no /boot/initrd.img-{release}: see kernel.log"))?;

    configure(&root)?;
    let root_tree = tree_bytes(&root);

    // The root filesystem: ext4 with room to spare, as an installer would leave it.
    let ext4 = dir.join("root.ext4");
    let ext4_mib = root_tree * 5 / 4 / 1048576 + 256;
    run_logged(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-t", "ext4", "-L", "peer-root", "-U", ROOT_UUID])
            .args(["-E", "lazy_itable_init=0,lazy_journal_init=0", "-d"])
            .arg(&root)
            .arg(&ext4)
            .arg(format!("{ext4_mib}M")),
        &dir.join("mkfs.log"),
    )?;

    // The ESP: our systemd-boot, the peer's kernel and initramfs.
    let bootloader = inspect::read_esp_file(inp.image, Arch::Amd64.efi_default_boot_path())
        .with_context(|| {
            format!(
                "reading systemd-boot from the ESP of {}",
                inp.image.display()
            )
        })?;
    let (kernel_len, initrd_len) = (kernel.len() as u64, initrd.len() as u64);
    let mut esp = Esp::new();
    esp.add_bootloader(Arch::Amd64, bootloader);
    esp.add_loader_conf(&LoaderConf {
        timeout: 0,
        default: None,
        editor: false,
    });
    esp.add_file("peer/vmlinuz", kernel);
    esp.add_file("peer/initrd.img", initrd);
    esp.add_entry(
        "peer.conf",
        &BootEntry {
            title: "Debian trixie (bench peer)".into(),
            version: None,
            sort_key: None,
            linux: "/peer/vmlinuz".into(),
            initrd: vec!["/peer/initrd.img".into()],
            options: format!("root=UUID={ROOT_UUID} ro {}", inp.def.cmdline(Arch::Amd64)?),
        },
    );
    let esp_size = (inp.def.partitions.efi_mib << 20)
        .max((kernel_len + initrd_len + (32 << 20)).next_multiple_of(1 << 20));
    let esp_bytes = esp.to_vec(esp_size, 0)?;

    let raw = dir.join("peer.raw");
    let partial = dir.join("peer.raw.partial");
    gpt::write_disk(
        &partial,
        &DiskSpec {
            seed: b"keelson-bench-peer".to_vec(),
            partitions: vec![
                PartitionSpec {
                    name: layout::PART_EFI.into(),
                    type_guid: Guid::parse(layout::TYPE_GUID_EFI)?,
                    size: esp_size,
                    attributes: 0,
                    content: Content::Bytes(esp_bytes),
                },
                PartitionSpec {
                    name: "root".into(),
                    type_guid: Guid::parse(Arch::Amd64.root_type_guid())?,
                    size: ext4_mib << 20,
                    attributes: 0,
                    content: Content::File(ext4.clone()),
                },
            ],
            disk_size: None,
        },
    )
    .with_context(|| format!("writing the peer disk {}", partial.display()))?;
    std::fs::rename(&partial, &raw).with_context(|| format!("renaming to {}", raw.display()))?;
    std::fs::remove_file(&ext4).ok();

    eprintln!(
        "xtask: bench: compressing the peer's disk image like ours (zstd level {})",
        compress::DEFAULT_IMAGE_LEVEL
    );
    let zst = dir.join("peer.raw.zst");
    let raw_zst = compress::zstd_file(&raw, &zst, compress::DEFAULT_IMAGE_LEVEL)?;
    std::fs::remove_file(&zst).ok();
    let qcow2_path = dir.join("peer.qcow2");
    run_logged(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&qcow2_path),
        &dir.join("qemu-img.log"),
    )?;
    let qcow2 = std::fs::metadata(&qcow2_path).map(|m| m.len()).unwrap_or(0);
    std::fs::remove_file(&qcow2_path).ok();

    let sizes = PeerSizes {
        root_tree,
        kernel: kernel_len,
        initramfs: initrd_len,
        raw: std::fs::metadata(&raw).map(|m| m.len()).unwrap_or(0),
        raw_zst,
        qcow2,
        kernel_package: inp.kernel_package.to_string(),
        release_date: inp.release_date.to_string(),
    };
    // The tree is only needed to make the disk; the disk is what is booted.
    std::fs::remove_dir_all(&root).ok();
    let path = dir.join("peer.json");
    std::fs::write(&path, serde_json::to_string_pretty(&sizes)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Make the tree bootable and measurable: hostname, fstab, a fixed machine id (so
/// every boot is an ordinary boot, not a first boot), and the bench unit.
fn configure(root: &Path) -> Result<()> {
    let write = |rel: &str, text: &str, mode: u32| -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let path = root.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", path.display()))
    };
    write("etc/hostname", "peer\n", 0o644)?;
    write(
        "etc/fstab",
        &format!("UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\n"),
        0o644,
    )?;
    write(
        "etc/machine-id",
        "6b65656c736f6e2062656e6368706565\n",
        0o444,
    )?;
    write("etc/systemd/system/keelson-bench.service", UNIT, 0o644)?;
    write("usr/local/sbin/keelson-bench-report", REPORT_SCRIPT, 0o755)?;
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).with_context(|| format!("creating {}", wants.display()))?;
    let link = wants.join("keelson-bench.service");
    std::fs::remove_file(&link).ok();
    std::os::unix::fs::symlink("/etc/systemd/system/keelson-bench.service", &link)
        .with_context(|| format!("enabling the bench unit ({})", link.display()))?;
    if std::fs::symlink_metadata(wants.join("containerd.service")).is_err() {
        bail!(
            "containerd is not enabled in the peer ({} is missing): see debootstrap.log",
            wants.join("containerd.service").display()
        );
    }
    Ok(())
}

/// The `Date:` of the suite's Release file: identifies the mirror snapshot.
fn release_date(mirror: &Mirror, suite: &str) -> Result<String> {
    let (mut body, _) = mirror.get(&format!("dists/{suite}/Release"))?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut body, &mut text)?;
    text.lines()
        .find_map(|l| l.strip_prefix("Date:").map(|d| d.trim().to_string()))
        .with_context(|| format!("dists/{suite}/Release on {} has no Date:", mirror.as_str()))
}

fn sanitize(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || c == '.' {
            out.push(c);
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_matches('_').to_string()
}

fn newest_cached(peers: &Path) -> Option<PathBuf> {
    std::fs::read_dir(peers)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("peer.json").is_file())
        .max_by_key(|p| {
            std::fs::metadata(p.join("peer.json"))
                .and_then(|m| m.modified())
                .ok()
        })
}

/// Apparent size of every regular file under `dir` (symlinks not followed).
fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

/// Install debootstrap with apt when it is missing (we are root here).
fn ensure_debootstrap() -> Result<()> {
    if Path::new("/usr/sbin/debootstrap").is_file() {
        return Ok(());
    }
    eprintln!("xtask: bench: installing debootstrap (apt-get) to build the peer");
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q", "debootstrap"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get to install debootstrap")?;
    if !status.success() {
        bail!("apt-get install debootstrap failed ({status}): install it and run again");
    }
    Ok(())
}

/// Run a command with its output in `log`; on failure, the error quotes the log's tail.
fn run_logged(cmd: &mut Command, log: &Path) -> Result<()> {
    let shown = format!("{cmd:?}");
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        bail!(
            "{shown} failed with {status}; the end of {}:\n{}",
            log.display(),
            keelson_cluster::qemu::console_tail(log, 15)
        );
    }
    Ok(())
}

/// `/proc` mounted in the chroot for the kernel's maintainer scripts, unmounted on drop.
struct Mount {
    target: PathBuf,
}

impl Mount {
    fn proc(target: &Path) -> Result<Mount> {
        let status = Command::new("mount")
            .args(["-t", "proc", "proc"])
            .arg(target)
            .status()
            .context("running mount")?;
        if !status.success() {
            bail!("mounting proc on {} failed ({status})", target.display());
        }
        Ok(Mount {
            target: target.to_path_buf(),
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.target)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "xtask: bench: could not unmount {}: unmount it by hand",
                self.target.display()
            );
        }
    }
}

/// Parse the peer's memory line: (RSS total, PSS total) in bytes.
pub fn parse_rss(console: &str) -> Option<(u64, u64)> {
    let line = console.lines().find(|l| l.contains(RSS_MARKER))?;
    let field = |key: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((
        field("total_kb=")? * 1024,
        field("pss_kb=").unwrap_or(0) * 1024,
    ))
}

/// The RSS of the peer's init and system daemons without containerd (which our node
/// runs too, and which our figure leaves out alike): the `name=kb` fields of the
/// memory line whose name does not start with `containerd`.
pub fn parse_rss_without_containerd(console: &str) -> Option<u64> {
    let line = console.lines().find(|l| l.contains(RSS_MARKER))?;
    let kb: u64 = line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter(|(name, _)| {
            !matches!(*name, "total_kb" | "pss_kb") && !name.starts_with("containerd")
        })
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum();
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_line_parses() {
        let console = "boot...\r\nPEER-READY\r\nPEER-RSS total_kb=52000 pss_kb=22000 systemd=12000 containerd=40000\r\n";
        assert_eq!(parse_rss(console), Some((52000 * 1024, 22000 * 1024)));
        assert_eq!(parse_rss("PEER-READY\n"), None);
        assert_eq!(parse_rss_without_containerd(console), Some(12000 * 1024));
    }

    #[test]
    fn cache_keys_are_path_safe() {
        assert_eq!(
            sanitize("Sat, 21 Nov 2026 09:15:44 UTC"),
            "Sat_21_Nov_2026_09_15_44_UTC"
        );
        assert_eq!(sanitize("6.12.117-1"), "6.12.117_1");
    }
}
