//! Bootable images (issue 3): both architectures boot through UEFI firmware,
//! systemd-boot, the kernel and stage 1 to stage 2; third-party tools accept every
//! artefact; the root holds no shell and no setuid file; a root that does not match its
//! verity hash never runs; builds are reproducible.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use keelson_configs::layout::Slot;
use keelson_imager::gpt::{self, GptPartition};
use keelson_imager::inspect;
use keelson_tests::{Arch, Guest, built_image, image_dir};
use sha2::{Digest, Sha256};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

fn partition(image: &Path, name: &str) -> GptPartition {
    let mut f = std::fs::File::open(image).unwrap();
    let table = gpt::read_gpt(&mut f).unwrap();
    table.partition(name).unwrap().clone()
}

/// Copy one partition of an image into its own file (sparse reads are cheap).
fn extract(image: &Path, name: &str, dir: &Path) -> PathBuf {
    use std::io::{Read, Seek, SeekFrom};
    let part = partition(image, name);
    let mut f = std::fs::File::open(image).unwrap();
    f.seek(SeekFrom::Start(part.start())).unwrap();
    let mut data = vec![0u8; part.size() as usize];
    f.read_exact(&mut data).unwrap();
    let out = dir.join(name);
    std::fs::write(&out, data).unwrap();
    out
}

fn run(cmd: &mut Command) -> (bool, String) {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e} (cargo xtask deps installs it)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn slot_a(image: &Path) -> inspect::SlotReport {
    let report = inspect::inspect(image).unwrap();
    report
        .slots
        .into_iter()
        .find(|s| s.slot == Slot::A)
        .unwrap()
}

fn boots_to_stage2(arch: Arch, uname: &str) {
    let image = built_image(arch).unwrap();
    let root_hash = slot_a(&image).verity.unwrap().root_hash;
    let mut vm = Guest::new(arch).boot().unwrap();
    for needle in [
        "BdsDxe: starting Boot",
        "keelson-init: stage 1 started",
        &format!("of ROOT-A match root hash {root_hash}"),
        "keelson-init: switched root",
        "KEELSON STAGE2 READY",
    ] {
        vm.wait_for(needle, BOOT_TIMEOUT).unwrap();
    }
    vm.wait_for("stage 2 banner: Keelson ", BOOT_TIMEOUT)
        .unwrap();
    let console = vm.console();
    let banner = console
        .lines()
        .find(|l| l.contains("stage 2 banner:"))
        .unwrap();
    for field in [
        format!("Keelson {}", env!("CARGO_PKG_VERSION")),
        "slot=a".to_string(),
        format!("verity={root_hash}"),
        "kernel=6.".to_string(),
        format!("arch={uname}"),
    ] {
        assert!(banner.contains(&field), "banner {banner:?} lacks {field:?}");
    }
    eprintln!(
        "{arch}: stage 2 after {:.1}s ({})",
        vm.elapsed().as_secs_f64(),
        vm.accel().name()
    );
}

#[test]
fn amd64_boots_through_uefi_and_systemd_boot_to_stage2() {
    boots_to_stage2(Arch::Amd64, "x86_64");
}

#[test]
fn arm64_boots_through_uefi_and_systemd_boot_to_stage2() {
    boots_to_stage2(Arch::Arm64, "aarch64");
}

#[test]
fn a_flipped_byte_in_root_a_is_refused_and_counted() {
    let arch = Arch::Amd64;
    let image = built_image(arch).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let slot = slot_a(&image);
    let verity = slot.verity.unwrap();
    let root = partition(&image, "ROOT-A");
    // A byte in the middle of the filesystem's data blocks.
    let data_bytes = verity.data_blocks.unwrap() * 4096;
    let offset = root.start() + data_bytes / 2 + 123;
    let original = {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&image).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        let mut b = [0u8];
        f.read_exact(&mut b).unwrap();
        b[0]
    };
    let overlay = dir.path().join("corrupt.qcow2");
    keelson_cluster::qemu::create_overlay(&image, &overlay, None).unwrap();
    let (ok, out) = run(Command::new("qemu-io").args([
        "-f",
        "qcow2",
        "-c",
        &format!("write -P 0x{:02x} {offset} 1", !original),
        overlay.to_str().unwrap(),
    ]));
    assert!(ok, "qemu-io: {out}");

    let mut vm = Guest::new(arch).image(&overlay).raw_disk().boot().unwrap();
    vm.wait_for(
        &format!(
            "root ROOT-A does not match its verity root hash {}",
            verity.root_hash
        ),
        BOOT_TIMEOUT,
    )
    .unwrap();
    vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(
        !vm.console().contains("KEELSON STAGE2 READY"),
        "a corrupt root reached stage 2"
    );

    // systemd-boot counted the failed try: the entry was renamed on the ESP.
    let raw = dir.path().join("after.raw");
    let (ok, out) = run(Command::new("qemu-img").args([
        "convert",
        "-O",
        "raw",
        overlay.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]));
    assert!(ok, "qemu-img convert: {out}");
    let entry = slot_a(&raw).entry_file.unwrap();
    assert!(
        entry.ends_with("keelson-a+2-1.conf"),
        "after one failed boot the entry is {entry}"
    );
}

#[test]
fn third_party_tools_accept_the_image() {
    let image = built_image(Arch::Amd64).unwrap();
    let dir = tempfile::tempdir().unwrap();

    let (ok, out) = run(Command::new("sgdisk").arg("-v").arg(&image));
    assert!(ok && out.contains("No problems found"), "sgdisk -v: {out}");

    let esp = extract(&image, "EFI", dir.path());
    let (ok, out) = run(Command::new("fsck.vfat").arg("-n").arg(&esp));
    assert!(ok, "fsck.vfat -n: {out}");

    let verity = slot_a(&image).verity.unwrap();
    let root = extract(&image, "ROOT-A", dir.path());
    let (ok, out) = run(Command::new("veritysetup")
        .arg("verify")
        .arg(&root)
        .arg(&root)
        .arg(&verity.root_hash)
        .arg(format!("--hash-offset={}", verity.hash_offset.unwrap())));
    assert!(ok, "veritysetup verify: {out}");

    let (ok, out) = run(Command::new("unsquashfs").arg("-l").arg(&root));
    assert!(ok, "unsquashfs -l: {out}");
    for path in [
        "squashfs-root/usr/sbin/init",
        "squashfs-root/usr/bin/containerd",
    ] {
        assert!(out.lines().any(|l| l == path), "unsquashfs -l lacks {path}");
    }

    let qcow2 = image_dir(Arch::Amd64).join("keelson.qcow2");
    let (ok, out) = run(Command::new("qemu-img").arg("check").arg(&qcow2));
    assert!(ok && out.contains("No errors"), "qemu-img check: {out}");
    let (ok, out) = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&image)
        .arg(&qcow2));
    assert!(ok && out.contains("identical"), "qemu-img compare: {out}");
}

/// Shell names nobody may ship, and the modes no file may carry.
const SHELLS: &[&str] = &[
    "sh", "bash", "dash", "ash", "busybox", "zsh", "ksh", "mksh", "csh", "tcsh", "fish", "yash",
    "posh",
];

#[test]
fn the_root_filesystem_has_no_shell_and_no_setuid_file() {
    for arch in Arch::ALL {
        let image = built_image(arch).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = extract(&image, "ROOT-A", dir.path());
        // Listed by squashfs-tools, not by our own reader.
        let (ok, out) = run(Command::new("unsquashfs").arg("-lln").arg(&root));
        assert!(ok, "unsquashfs -lln: {out}");
        let mut files = 0;
        for line in out.lines().filter(|l| l.contains("squashfs-root")) {
            let mode = line.split_whitespace().next().unwrap();
            let path = line.split_whitespace().nth(5).unwrap();
            let name = path.rsplit('/').next().unwrap();
            assert!(!SHELLS.contains(&name), "{arch}: shell {path} in the root");
            assert!(
                !mode.contains('s') && !mode.contains('S'),
                "{arch}: {path} is setuid/setgid ({mode})"
            );
            files += 1;
        }
        assert!(files > 100, "{arch}: only {files} entries listed");
        // No script either: there is no interpreter to run one.
        let tree = {
            let f = std::fs::File::open(&root).unwrap();
            let reader =
                keelson_imager::squashfs::SquashfsReader::open(std::io::BufReader::new(f), 0)
                    .unwrap();
            reader.to_tree().unwrap()
        };
        let findings = keelson_imager::rootfs::audit(&tree);
        assert!(findings.is_empty(), "{arch}: {findings:?}");
    }
}

#[test]
fn two_clean_builds_give_the_same_image() {
    let arch = Arch::Amd64;
    let image = built_image(arch).unwrap();
    let inputs = image_dir(arch).join("build-inputs.toml");
    let text = std::fs::read_to_string(&inputs)
        .unwrap_or_else(|e| panic!("{}: {e} (written by cargo xtask image)", inputs.display()));
    let opts = keelson_imager::build::BuildOptions::from_inputs_toml(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = keelson_imager::build::BuildOptions {
        out_dir: dir.path().to_path_buf(),
        formats: vec![],
        ..opts
    };
    keelson_imager::build::build(&opts, &keelson_imager::debian::quiet_progress).unwrap();
    let hash = |p: &Path| {
        let mut h = Sha256::new();
        std::io::copy(&mut std::fs::File::open(p).unwrap(), &mut h).unwrap();
        hex::encode(h.finalize())
    };
    assert_eq!(
        hash(&image),
        hash(&dir.path().join("keelson.raw")),
        "a second build from the same inputs differs"
    );
}
