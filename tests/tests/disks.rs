//! Disks (issue 4), end to end under QEMU: the first boot of a disk larger than the image
//! creates STATE and EPHEMERAL's filesystems and grows EPHEMERAL to fill the disk; a
//! second boot keeps their content (read back with ext4-view after power off); a disk
//! grown again between boots has EPHEMERAL and its filesystem grown online.
//!
//! The image is `KEELSON_TEST_IMAGE_AMD64` when set, else the suite's built image.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use keelson_configs::layout::{FW_CFG_CONFIG, PART_EPHEMERAL, PART_STATE};
use keelson_imager::gpt;
use keelson_imager::inspect::read_ext4_file;
use keelson_tests::{Arch, Guest, POWER_BUTTON_WATCHED, Running, test_image, with_fresh_secrets};

/// One boot to "containerd ready" under software emulation, with room to spare.
const BOOT: Duration = Duration::from_secs(420);
const MIB: u64 = 1 << 20;

/// The control-plane fixture of the config tests with fresh secrets (its network does not
/// matter here: the disks only need a config to arrive and be kept, and its file written
/// to /var).
fn node_config() -> String {
    let text = include_str!("../../configs/tests/data/controlplane.toml")
        .replace("hostname = \"cp-1\"", "hostname = \"disks-test\"");
    let text = with_fresh_secrets(&text).unwrap();
    let checked =
        keelson_configs::check_str(&text, "disks-node.toml", keelson_configs::Mode::Metal);
    assert!(checked.is_valid(), "{:#?}", checked.diagnostics);
    text
}

/// Copy a raw image without writing its zero blocks, then grow the copy to `size`.
fn sparse_copy(from: &Path, to: &Path, size: u64) {
    let mut src = std::fs::File::open(from).unwrap();
    let mut dst = std::fs::File::create(to).unwrap();
    let len = src.metadata().unwrap().len();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let n = src.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(pos)).unwrap();
            dst.write_all(&buf[..n]).unwrap();
        }
        pos += n as u64;
    }
    dst.set_len(size.max(len)).unwrap();
}

fn table(disk: &Path) -> gpt::Gpt {
    gpt::read_gpt(&mut std::fs::File::open(disk).unwrap()).unwrap()
}

/// The size in bytes of the ext4 filesystem in `name`, from its superblock.
fn ext4_size(disk: &Path, name: &str) -> u64 {
    let part = table(disk).partition(name).unwrap().clone();
    let mut f = std::fs::File::open(disk).unwrap();
    let mut sb = [0u8; 1024];
    f.seek(SeekFrom::Start(part.start() + 1024)).unwrap();
    f.read_exact(&mut sb).unwrap();
    assert_eq!(&sb[0x38..0x3a], &[0x53, 0xef], "{name} holds no ext4");
    let lo = u32::from_le_bytes(sb[4..8].try_into().unwrap()) as u64;
    let hi = u32::from_le_bytes(sb[0x150..0x154].try_into().unwrap()) as u64;
    let log = u32::from_le_bytes(sb[24..28].try_into().unwrap());
    (lo | hi << 32) * (1024 << log)
}

fn wait_all(vm: &mut Running, needles: &[&str]) {
    for needle in needles {
        vm.wait_for(needle, BOOT).unwrap();
    }
}

/// Press the power button and wait for QEMU to exit; the disk lines of the boot are
/// shown in the test's output.
fn power_off(mut vm: Running) {
    for line in vm.console().lines().filter(|l| {
        [
            "boot disk",
            "GPT",
            "partition ",
            "STATE",
            "EPHEMERAL",
            "swap",
        ]
        .iter()
        .any(|k| l.contains(k))
    }) {
        eprintln!("console: {}", line.trim_end());
    }
    // A press before the button is watched (stage 2 loads its modules once containerd
    // is ready) is lost.
    vm.wait_for(POWER_BUTTON_WATCHED, BOOT).unwrap();
    vm.monitor("system_powerdown").unwrap();
    vm.wait_exit(Duration::from_secs(180)).unwrap();
}

#[test]
fn first_boot_fills_the_disk_and_later_boots_keep_and_grow_it() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("node.raw");
    sparse_copy(&test_image(Arch::Amd64).unwrap(), &disk, 3 << 30);
    let config = dir.path().join("node.toml");
    std::fs::write(&config, node_config()).unwrap();
    let before = table(&disk);
    let eph_before = before.partition(PART_EPHEMERAL).unwrap().clone();

    // First boot: the GPT is grown, both partitions formatted and mounted.
    let mut vm = Guest::new(Arch::Amd64)
        .image(&disk)
        .raw_disk()
        .fw_cfg(FW_CFG_CONFIG, &config)
        .boot()
        .unwrap();
    let grown_mib = (3 << 30) / MIB - 1 - eph_before.start() / MIB;
    wait_all(
        &mut vm,
        &[
            "keelson-init: disk /dev/vda: backup GPT moved to the end of the disk (3072 MiB)",
            &format!("keelson-init: partition EPHEMERAL grown from 64 MiB to {grown_mib} MiB"),
            "keelson-init: formatting STATE (/dev/vda4, 100 MiB) as ext4",
            "keelson-init: STATE (/dev/vda4) mounted at /system/state",
            &format!("keelson-init: formatting EPHEMERAL (/dev/vda5, {grown_mib} MiB) as ext4"),
            "keelson-init: EPHEMERAL (/dev/vda5) mounted at /var",
            "keelson-init: service containerd ready",
        ],
    );
    power_off(vm);

    // The table is valid and EPHEMERAL ends one MiB before the disk's end (the backup GPT).
    let after = table(&disk);
    assert_eq!(after.disk_size, 3 << 30);
    let eph = after.partition(PART_EPHEMERAL).unwrap().clone();
    assert_eq!(eph.start(), eph_before.start());
    assert_eq!(eph.start() + eph.size(), (3 << 30) - MIB);
    assert_eq!(ext4_size(&disk, PART_EPHEMERAL), eph.size());
    let out = std::process::Command::new("sgdisk")
        .args(["-v", disk.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("No problems found"));
    let config_text = read_ext4_file(&disk, PART_STATE, "/config.toml").unwrap();
    let motd = read_ext4_file(&disk, PART_EPHEMERAL, "/etc/motd").unwrap();

    // Second boot (no fw_cfg): nothing formatted, the content is kept.
    let mut vm = Guest::new(Arch::Amd64)
        .image(&disk)
        .raw_disk()
        .boot()
        .unwrap();
    wait_all(
        &mut vm,
        &[
            "keelson-init: STATE (/dev/vda4) mounted at /system/state",
            "keelson-init: EPHEMERAL (/dev/vda5) mounted at /var",
            "keelson-init: service containerd ready",
        ],
    );
    assert!(
        !vm.console().contains("formatting"),
        "a filesystem was formatted again"
    );
    power_off(vm);
    assert_eq!(
        read_ext4_file(&disk, PART_STATE, "/config.toml").unwrap(),
        config_text
    );
    assert_eq!(
        read_ext4_file(&disk, PART_EPHEMERAL, "/etc/motd").unwrap(),
        motd
    );

    // The disk grows by 1 GiB (a resized cloud volume): EPHEMERAL and its filesystem follow.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    let mut vm = Guest::new(Arch::Amd64)
        .image(&disk)
        .raw_disk()
        .boot()
        .unwrap();
    wait_all(
        &mut vm,
        &[
            &format!(
                "keelson-init: partition EPHEMERAL grown from {grown_mib} MiB to {} MiB",
                grown_mib + 1024
            ),
            &format!(
                "keelson-init: EPHEMERAL filesystem grown from {grown_mib} MiB to {} MiB",
                grown_mib + 1024
            ),
            "keelson-init: service containerd ready",
        ],
    );
    power_off(vm);
    let eph = table(&disk).partition(PART_EPHEMERAL).unwrap().clone();
    assert_eq!(eph.start() + eph.size(), (4 << 30) - MIB);
    assert_eq!(ext4_size(&disk, PART_EPHEMERAL), eph.size());
    assert_eq!(
        read_ext4_file(&disk, PART_EPHEMERAL, "/etc/motd").unwrap(),
        motd
    );
}
