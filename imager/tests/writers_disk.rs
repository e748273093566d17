//! A whole (small) disk image from the writers: squashfs root + dm-verity in ROOT-A, a
//! FAT32 ESP with systemd-boot's layout and a BLS entry, an ext4 STATE, zero ROOT-B and
//! EPHEMERAL. Checked with `sgdisk -v`/`-p`, `fsck.vfat -n`, `mdir`, `veritysetup verify`
//! on the partition, and read back with `inspect`. A write that fills its filesystem (a
//! small tmpfs, mounted as root) is refused and leaves nothing behind. A missing tool
//! fails the test with the Debian package to install.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use keelson_configs::layout::{self, Arch, Slot};
use keelson_imager::esp::{self, BootEntry, Esp, EspReader, LoaderConf};
use keelson_imager::gpt::{self, Content, DiskSpec, Guid, PartitionSpec};
use keelson_imager::rootfs::Tree;
use keelson_imager::{compress, cpio, inspect, squashfs, verity};
use sha2::{Digest, Sha256};

const MIB: u64 = 1024 * 1024;
const EPOCH: u32 = 1_700_000_000;

fn run_ok(tool: &str, package: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {tool} ({e}): install it with `apt-get install {package}`")
    });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{tool} {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct Built {
    image: PathBuf,
    params: verity::VerityParams,
}

fn build(dir: &Path, name: &str) -> Built {
    // Root filesystem and its hash tree.
    let mut root = Tree::new(EPOCH);
    root.add_file(
        layout::OS_RELEASE,
        0o644,
        b"NAME=Keelson\nVERSION_ID=0.1.0\nPRETTY_NAME=\"Keelson 0.1.0\"\n".to_vec(),
    )
    .unwrap();
    root.add_symlink("etc/os-release", "../usr/lib/os-release")
        .unwrap();
    root.add_file(layout::ROOT_INIT, 0o755, vec![0x7f; 100_000])
        .unwrap();
    let fs = squashfs::to_vec(&root, squashfs::SquashfsOptions::default()).unwrap();
    let salt = verity::derive_salt(&fs);
    let tree = verity::build(&fs[..], &salt, verity::derive_uuid(&salt)).unwrap();
    let mut root_part = fs;
    root_part.extend_from_slice(&tree.bytes);
    let p = tree.params;

    // Initramfs.
    let mut initramfs = Tree::new(EPOCH);
    initramfs
        .add_file(layout::INITRAMFS_INIT, 0o755, b"stage1".to_vec())
        .unwrap();
    initramfs
        .add_file(layout::INITRAMFS_MODULES_ORDER, 0o644, Vec::new())
        .unwrap();
    let initrd = compress::zstd_bytes(&cpio::archive(&initramfs).unwrap(), 19).unwrap();

    // ESP.
    let mut esp = Esp::new();
    esp.add_bootloader(Arch::Amd64, b"MZ systemd-boot".to_vec());
    esp.add_slot(Slot::A, b"MZ kernel".to_vec(), initrd);
    esp.add_loader_conf(&LoaderConf::default());
    let options = format!(
        "console=ttyS0 {}=a {}={} {}={} {}={} {}={}",
        layout::CMDLINE_SLOT,
        layout::CMDLINE_VERITY_ROOTHASH,
        p.root_hash_hex(),
        layout::CMDLINE_VERITY_SALT,
        p.salt_hex(),
        layout::CMDLINE_VERITY_DATA_BLOCKS,
        p.data_blocks,
        layout::CMDLINE_VERITY_HASH_OFFSET,
        p.hash_offset
    );
    esp.add_entry(
        &layout::loader_entry_name(Slot::A, Some(3)),
        &BootEntry {
            title: "Keelson 0.1.0 (A)".into(),
            version: Some("0.1.0".into()),
            sort_key: Some("keelson".into()),
            linux: esp::slot_kernel_path(Slot::A),
            initrd: vec![esp::slot_initrd_path(Slot::A)],
            options,
        },
    );
    let esp_file = dir.join(format!("{name}-esp.img"));
    esp.write_file(&esp_file, 40 * MIB, u64::from(EPOCH))
        .unwrap();

    // STATE: ext4 from mkfs.ext4 -d (stands in for what the node writes). Made once and
    // shared by both builds: mkfs copies the files' ctime, which no one can set, so two
    // STATE images made a second apart differ, and this test is about our writers.
    let state_dir = dir.join("state");
    let state = dir.join("state.img");
    if !state.exists() {
        std::fs::create_dir_all(&state_dir).unwrap();
        std::fs::write(
            state_dir.join("config.toml"),
            "[machine]\ntype = \"worker\"\n",
        )
        .unwrap();
        run_ok(
            "mkfs.ext4",
            "e2fsprogs",
            &[
                "-q",
                "-F",
                "-L",
                "STATE",
                "-U",
                "6b1c6c2e-8f1b-4a4e-9c57-3f0b1b2a9d10",
                "-E",
                "hash_seed=6b1c6c2e-8f1b-4a4e-9c57-3f0b1b2a9d10",
                "-d",
                s(&state_dir),
                s(&state),
                "8M",
            ],
        );
    }

    let part = |name: &str, type_guid: &str, size: u64, content: Content| PartitionSpec {
        name: name.to_string(),
        type_guid: Guid::parse(type_guid).unwrap(),
        size,
        attributes: 0,
        content,
    };
    let image = dir.join(format!("{name}.raw"));
    gpt::write_disk(
        &image,
        &DiskSpec {
            seed: b"keelson-test 0.1.0".to_vec(),
            partitions: vec![
                part(
                    layout::PART_EFI,
                    layout::TYPE_GUID_EFI,
                    40 * MIB,
                    Content::File(esp_file),
                ),
                part(
                    layout::PART_ROOT_A,
                    Arch::Amd64.root_type_guid(),
                    8 * MIB,
                    Content::Bytes(root_part),
                ),
                part(
                    layout::PART_ROOT_B,
                    Arch::Amd64.root_type_guid(),
                    8 * MIB,
                    Content::Zero,
                ),
                part(
                    layout::PART_STATE,
                    layout::TYPE_GUID_LINUX_DATA,
                    8 * MIB,
                    Content::File(state),
                ),
                part(
                    layout::PART_EPHEMERAL,
                    layout::TYPE_GUID_VAR,
                    64 * MIB,
                    Content::Zero,
                ),
            ],
            disk_size: None,
        },
    )
    .unwrap();
    Built { image, params: p }
}

fn sha256(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

#[test]
fn disk_image_is_valid_reproducible_and_inspectable() {
    let dir = tempfile::tempdir().unwrap();
    let one = build(dir.path(), "one");
    let two = build(dir.path(), "two");
    let image = s(&one.image);

    // Reproducible, sparse, no leftovers.
    assert_eq!(sha256(&one.image), sha256(&two.image), "two builds differ");
    let meta = std::fs::metadata(&one.image).unwrap();
    assert_eq!(meta.len(), 130 * MIB);
    assert!(
        meta.blocks() * 512 < 20 * MIB,
        "image is not sparse: {} blocks",
        meta.blocks()
    );
    assert!(!dir.path().join("one.raw.partial").exists());

    // sgdisk accepts the table and sees our names and types.
    let verify = run_ok("sgdisk", "gdisk", &["-v", image]);
    assert!(verify.contains("No problems found"), "{verify}");
    let print = run_ok("sgdisk", "gdisk", &["-p", image]);
    for (n, name, code) in [
        (1, "EFI", "EF00"),
        (2, "ROOT-A", "8304"),
        (3, "ROOT-B", "8304"),
        (4, "STATE", "8300"),
        (5, "EPHEMERAL", "8310"),
    ] {
        let line = print
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&n.to_string()))
            .unwrap_or_else(|| panic!("partition {n} missing:\n{print}"));
        assert!(line.ends_with(&format!("{code}  {name}")), "{line}");
    }
    assert!(
        print.contains("Partitions will be aligned on 2048-sector boundaries"),
        "{print}"
    );

    // Our reader agrees.
    let mut file = std::fs::File::open(&one.image).unwrap();
    let table = gpt::read_gpt(&mut file).unwrap();
    let names: Vec<&str> = table.partitions.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["EFI", "ROOT-A", "ROOT-B", "STATE", "EPHEMERAL"]);
    let esp_part = table.partition("EFI").unwrap().clone();
    assert_eq!(esp_part.start(), MIB);
    let root_part = table.partition("ROOT-A").unwrap().clone();

    // Extract partitions for the filesystem tools.
    let bytes = std::fs::read(&one.image).unwrap();
    let extract = |p: &gpt::GptPartition, name: &str| {
        let out = dir.path().join(name);
        std::fs::write(
            &out,
            &bytes[p.start() as usize..(p.start() + p.size()) as usize],
        )
        .unwrap();
        out
    };
    let esp_img = extract(&esp_part, "esp.part");
    let fsck = run_ok("fsck.vfat", "dosfstools", &["-n", s(&esp_img)]);
    assert!(!fsck.contains("Dirty bit"), "{fsck}");
    let mdir = run_ok(
        "mdir",
        "mtools",
        &["-i", s(&esp_img), "-b", "::/loader/entries"],
    );
    assert!(mdir.contains("keelson-a+3-0.conf"), "{mdir}");
    let efi = run_ok("mdir", "mtools", &["-i", s(&esp_img), "-b", "::/EFI/BOOT"]);
    assert!(efi.contains("BOOTX64.EFI"), "{efi}");
    let label = EspReader::open(std::fs::File::open(&esp_img).unwrap())
        .unwrap()
        .label();
    assert_eq!(label.trim(), "EFI");

    let root_img = extract(&root_part, "root.part");
    let p = &one.params;
    run_ok(
        "veritysetup",
        "cryptsetup-bin",
        &[
            "verify",
            s(&root_img),
            s(&root_img),
            &p.root_hash_hex(),
            &format!("--hash-offset={}", p.hash_offset),
        ],
    );

    // inspect: partitions, slot versions, root hashes, files.
    let report = inspect::inspect(&one.image).unwrap();
    let a = &report.slots[0];
    assert_eq!(a.slot, Slot::A);
    assert_eq!(a.version().as_deref(), Some("0.1.0"));
    assert_eq!(a.entry_file.as_deref(), Some("keelson-a+3-0.conf"));
    let v = a.verity.as_ref().unwrap();
    assert_eq!(v.root_hash, p.root_hash_hex());
    assert_eq!(v.salt.as_deref(), Some(p.salt_hex().as_str()));
    assert_eq!(v.data_blocks, Some(p.data_blocks));
    assert_eq!(v.hash_offset, Some(p.hash_offset));
    assert!(
        a.os_release
            .as_deref()
            .unwrap()
            .contains("VERSION_ID=0.1.0")
    );
    let b = &report.slots[1];
    assert_eq!(b.version(), None);
    assert_eq!(b.root_note.as_deref(), Some("empty (no squashfs)"));
    let text = report.to_string();
    assert!(
        text.contains(&format!("roothash: {}", p.root_hash_hex())),
        "{text}"
    );
    assert!(text.contains("EPHEMERAL"), "{text}");

    assert_eq!(
        inspect::read_root_file(&one.image, Slot::A, "/etc/os-release").unwrap(),
        b"NAME=Keelson\nVERSION_ID=0.1.0\nPRETTY_NAME=\"Keelson 0.1.0\"\n"
    );
    assert_eq!(
        inspect::read_ext4_file(&one.image, "STATE", "config.toml").unwrap(),
        b"[machine]\ntype = \"worker\"\n"
    );
    assert_eq!(
        inspect::read_esp_file(&one.image, "loader/loader.conf").unwrap(),
        b"timeout 0\neditor no\n"
    );
    let err = inspect::read_ext4_file(&one.image, "NOPE", "x").unwrap_err();
    assert!(
        format!("{err}: {}", std::error::Error::source(&err).unwrap())
            .contains("has no partition named \"NOPE\"")
    );
    let err = inspect::read_root_file(&one.image, Slot::B, "etc/os-release").unwrap_err();
    assert!(err.to_string().contains("ROOT-B"), "{err}");
}

/// A disk with one partition, ROOT-A, of `size` bytes holding `content`.
fn root_a_only(size: u64, content: Vec<u8>) -> DiskSpec {
    DiskSpec {
        seed: b"x".to_vec(),
        partitions: vec![PartitionSpec {
            name: "ROOT-A".into(),
            type_guid: Guid::parse(Arch::Arm64.root_type_guid()).unwrap(),
            size,
            attributes: 0,
            content: Content::Bytes(content),
        }],
        disk_size: None,
    }
}

#[test]
fn content_larger_than_its_partition_is_refused_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bad.raw");
    let err = gpt::write_disk(&out, &root_a_only(MIB, vec![1; (MIB + 1) as usize])).unwrap_err();
    assert!(err.to_string().contains("ROOT-A"), "{err}");
    assert!(!out.exists());
    assert!(!dir.path().join("bad.raw.partial").exists());
}

/// A tmpfs of a few MiB mounted over a temporary directory (root, as the suite runs),
/// unmounted when dropped.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size_mib: u64) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        run_ok(
            "mount",
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mib}m"),
                "keelson-test-full",
                s(dir.path()),
            ],
        );
        SmallFs { dir }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn a_full_disk_stops_the_write_and_leaves_nothing() {
    let fs = SmallFs::mount(4);
    let out = fs.dir.path().join("keelson.raw");
    // Not zeros, which the writer leaves as holes: 8 MiB of real data.
    let err =
        gpt::write_disk(&out, &root_a_only(16 * MIB, vec![0x5a; (8 * MIB) as usize])).unwrap_err();
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(
        err.to_string().starts_with("cannot write disk image ")
            && err
                .to_string()
                .ends_with("check free space and permissions")
            && source.contains("No space left on device"),
        "{err}: {source}"
    );
    let left: Vec<_> = std::fs::read_dir(fs.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "a full disk left {left:?} behind");
}

#[test]
fn esp_is_reproducible_and_fsck_clean() {
    let dir = tempfile::tempdir().unwrap();
    let mut esp = Esp::new();
    esp.add_bootloader(Arch::Arm64, vec![0x4d; 300_000]);
    esp.add_slot(Slot::B, vec![1; 2_000_000], vec![2; 500_000]);
    let a = esp.to_vec(64 * MIB, 1_700_000_000).unwrap();
    let b = esp.to_vec(64 * MIB, 1_700_000_000).unwrap();
    assert!(a == b, "two ESP builds differ");
    let file = dir.path().join("esp.img");
    std::fs::write(&file, &a).unwrap();
    run_ok("fsck.vfat", "dosfstools", &["-n", s(&file)]);
    let listing = run_ok("mdir", "mtools", &["-i", s(&file), "::/keelson/b"]);
    assert!(
        listing.contains("vmlinuz") && listing.contains("initrd"),
        "{listing}"
    );
    assert!(
        listing.contains("2023-11-14"),
        "timestamps not ours:\n{listing}"
    );
    let reader = EspReader::open(std::io::Cursor::new(a)).unwrap();
    assert_eq!(
        reader.read_file("EFI/BOOT/BOOTAA64.EFI").unwrap().len(),
        300_000
    );
    assert_eq!(reader.list_dir("keelson/b").unwrap(), ["initrd", "vmlinuz"]);
    let small = esp.to_vec(8 * MIB, 0).unwrap_err();
    assert!(small.to_string().contains("FAT32"), "{small}");
}
