//! `prepare` end to end without root: a sparse image file stands for the disk under a
//! temporary `/dev`, a directory tree for sysfs, and the recording fake for the kernel.

use super::*;
use crate::console::memory::MemoryLog;
use crate::syscalls::fake::{Call, Fake};
use crate::syscalls::{Linux, ToolOutput};
use keelson_configs::layout::{TYPE_GUID_EFI, TYPE_GUID_LINUX_DATA, TYPE_GUID_VAR};
use std::fs;
use std::str::FromStr;

const MIB: u64 = 1 << 20;
const AMD64_ROOT: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";

/// The imager's layout with its sizes: EFI, ROOT-A, ROOT-B shrunk to 1-2 MiB, STATE
/// 100 MiB and EPHEMERAL 64 MiB last; the image ends 1 MiB after it.
const IMAGE: [(&str, &str, u64, u64); 5] = [
    ("EFI", TYPE_GUID_EFI, 1, 1),
    ("ROOT-A", AMD64_ROOT, 2, 2),
    ("ROOT-B", AMD64_ROOT, 4, 2),
    ("STATE", TYPE_GUID_LINUX_DATA, 6, 100),
    ("EPHEMERAL", TYPE_GUID_VAR, 106, 64),
];
const IMAGE_MIB: u64 = 171;

/// Write a GPT disk image of `size` bytes with `parts` (name, type, first MiB, MiB).
fn write_image(path: &Path, size: u64, parts: &[(&str, &str, u64, u64)]) -> io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.set_len(size)?;
    let sectors = size / 512;
    gpt::mbr::ProtectiveMBR::with_lb_size(u32::try_from(sectors - 1).unwrap_or(u32::MAX))
        .overwrite_lba0(&mut file)
        .map_err(io::Error::other)?;
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .create_from_device(file, None)
        .map_err(io::Error::other)?;
    for (i, (name, type_guid, first, len)) in parts.iter().enumerate() {
        let kind = gpt::partition_types::Type::from_str(type_guid).map_err(io::Error::other)?;
        disk.add_partition_at(name, i as u32 + 1, first * 2048, len * 2048, kind, 0)
            .map_err(io::Error::other)?;
    }
    disk.write().map_err(io::Error::other)?;
    Ok(())
}

/// A scratch root with `sys/` (a virtio disk `vda` with five partitions, the root's
/// dm device 253:0 on vda2) and `dev/vda`, the image file.
struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(tag: &str, disk_mib: u64) -> io::Result<Fixture> {
        let dir = std::env::temp_dir().join(format!("keelson-disks-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let block = dir.join("sys/devices/virtio0/block/vda");
        fs::create_dir_all(block.join("queue"))?;
        fs::write(block.join("queue/logical_block_size"), "512\n")?;
        fs::write(
            block.join("uevent"),
            "MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n",
        )?;
        fs::create_dir_all(dir.join("sys/class/block"))?;
        std::os::unix::fs::symlink(&block, dir.join("sys/class/block/vda"))?;
        for (i, (name, ..)) in IMAGE.iter().enumerate() {
            let n = i + 1;
            let part = block.join(format!("vda{n}"));
            fs::create_dir_all(&part)?;
            fs::write(part.join("partition"), format!("{n}\n"))?;
            fs::write(
                part.join("uevent"),
                format!("MAJOR=254\nMINOR={n}\nDEVNAME=vda{n}\nPARTN={n}\nPARTNAME={name}\n"),
            )?;
            std::os::unix::fs::symlink(&part, dir.join(format!("sys/class/block/vda{n}")))?;
        }
        fs::create_dir_all(dir.join("sys/dev/block/253:0/slaves/vda2"))?;
        fs::create_dir_all(dir.join("dev"))?;
        write_image(&dir.join("dev/vda"), IMAGE_MIB * MIB, &IMAGE)?;
        fs::OpenOptions::new()
            .write(true)
            .open(dir.join("dev/vda"))?
            .set_len(disk_mib * MIB)?;
        Ok(Fixture { dir })
    }

    fn options(&self) -> Options {
        Options {
            sysfs: self.dir.join("sys"),
            dev: self.dir.join("dev"),
            root_device: Some((253, 0)),
            slot_partname: Some("ROOT-A".into()),
            state_mount: PathBuf::from(STATE_MOUNT),
            ephemeral_mount: PathBuf::from(EPHEMERAL_MOUNT),
            defer_new_state: false,
        }
    }

    fn dev(&self, name: &str) -> String {
        self.dir.join("dev").join(name).display().to_string()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn index() -> ModuleIndex {
    ModuleIndex {
        dir: PathBuf::from("/usr/lib/modules/6.12.0-test"),
        modules: kmods::parse_dep(
            "kernel/ext4.ko: kernel/jbd2.ko kernel/mbcache.ko\nkernel/jbd2.ko:\nkernel/mbcache.ko:\n",
        ),
        builtin: Default::default(),
    }
}

fn ext4_head(blocks: u32, label: &str) -> Vec<u8> {
    let mut b = vec![0u8; ext4::PROBE_LEN];
    b[1024 + 4..1024 + 8].copy_from_slice(&blocks.to_le_bytes());
    b[1024 + 24..1024 + 28].copy_from_slice(&2u32.to_le_bytes());
    b[1080..1082].copy_from_slice(&ext4::MAGIC.to_le_bytes());
    b[1024 + 0x78..1024 + 0x78 + label.len()].copy_from_slice(label.as_bytes());
    b
}

fn lines(log: &MemoryLog) -> Vec<String> {
    log.lines()
        .into_iter()
        .map(|l| l.trim_start_matches("keelson-init: ").to_string())
        .collect()
}

fn mount(source: String, target: &str, flags: MountFlags) -> Call {
    Call::Mount {
        source,
        target: target.into(),
        fstype: "ext4".into(),
        flags,
        data: String::new(),
    }
}

/// The calls that format and mount a new STATE at `device`.
fn new_state_calls(device: &str) -> Vec<Call> {
    vec![
        Call::OpenRead("/dev/urandom".into()),
        Call::OpenRead("/dev/urandom".into()),
        mke2fs("STATE", device),
        Call::Mkdir("/system".into()),
        Call::Mkdir("/system/state".into()),
        mount(device.to_string(), "/system/state", STATE_FLAGS),
    ]
}

/// The UUID made of the bytes [`FAKE_URANDOM`] (version and variant bits set).
const FAKE_UUID: &str = "42424242-4242-4242-8242-424242424242";
const FAKE_URANDOM: [u8; 16] = [0x42; 16];

fn mke2fs(name: &str, device: &str) -> Call {
    Call::RunTool(
        MKE2FS.into(),
        [
            "-t",
            "ext4",
            "-L",
            name,
            "-U",
            FAKE_UUID,
            "-F",
            "-E",
            &format!("nodiscard,hash_seed={FAKE_UUID}"),
            device,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    )
}

const STATE_FLAGS: MountFlags = MountFlags::NOSUID
    .union(MountFlags::NODEV)
    .union(MountFlags::NOEXEC);
const VAR_FLAGS: MountFlags = MountFlags::NOSUID.union(MountFlags::NODEV);

#[test]
fn a_new_state_can_be_left_for_later_and_is_formatted_then()
-> Result<(), Box<dyn std::error::Error>> {
    let fx = Fixture::new("deferred", 1024)?;
    let mut fake = Fake::new().reading_real(&fx.dir);
    fake.read_data
        .insert("/dev/urandom".into(), FAKE_URANDOM.to_vec());
    let log = MemoryLog::default();
    let opts = Options {
        defer_new_state: true,
        ..fx.options()
    };
    let report = prepare(&fake, &log, None, &opts)?;
    let (vda4, vda5) = (fx.dev("vda4"), fx.dev("vda5"));
    // EPHEMERAL is made and mounted now; STATE is neither formatted nor mounted.
    let Err(Error::Deferred { name, device, size }) = report.state else {
        panic!("STATE should be deferred: {:?}", report.state);
    };
    assert_eq!(
        (name, device.as_str(), size),
        ("STATE", vda4.as_str(), 100 * MIB)
    );
    assert!(report.ephemeral?.formatted);
    assert!(!fake.calls().contains(&mke2fs("STATE", &vda4)));
    assert!(
        lines(&log).iter().all(|l| !l.contains("STATE")),
        "{:?}",
        lines(&log)
    );
    let before = fake.calls().len();
    let state = finish_deferred(&fake, &log, &opts, &device, size)?;
    assert!(state.formatted && state.size == 100 * MIB);
    assert_eq!(fake.calls()[before..], new_state_calls(&vda4));
    assert_eq!(
        lines(&log)[lines(&log).len() - 2..],
        [
            format!("formatting STATE ({vda4}, 100 MiB) as ext4"),
            format!("STATE ({vda4}) mounted at /system/state"),
        ]
    );
    assert!(fake.calls().contains(&mke2fs("EPHEMERAL", &vda5)));
    Ok(())
}

#[test]
fn a_state_with_data_but_no_superblock_is_not_taken_for_a_new_one()
-> Result<(), Box<dyn std::error::Error>> {
    let fx = Fixture::new("damaged", 1024)?;
    let mut fake = Fake::new().reading_real(&fx.dir);
    fake.read_data
        .insert("/dev/urandom".into(), FAKE_URANDOM.to_vec());
    let vda4 = fx.dev("vda4");
    // A configured STATE whose superblock's magic was lost: its label is still there.
    let mut damaged = ext4_head(25600, "STATE");
    damaged[1080..1082].copy_from_slice(&[0, 0]);
    fake.read_data.insert(PathBuf::from(&vda4), damaged);
    let log = MemoryLog::default();
    let opts = Options {
        defer_new_state: true,
        ..fx.options()
    };
    let report = prepare(&fake, &log, None, &opts)?;
    let Err(Error::Unrecognized { name, device }) = &report.state else {
        panic!("STATE should be unrecognized: {:?}", report.state);
    };
    assert_eq!((*name, device.as_str()), ("STATE", vda4.as_str()));
    assert!(!fake.calls().contains(&mke2fs("STATE", &vda4)));
    assert!(
        lines(&log)
            .iter()
            .any(|l| l.starts_with(&format!("STATE ({vda4}) holds data but no ext4 superblock"))),
        "{:?}",
        lines(&log)
    );
    Ok(())
}

#[test]
fn first_boot_grows_ephemeral_formats_and_mounts_both() -> Result<(), Box<dyn std::error::Error>> {
    let fx = Fixture::new("first", 1024)?;
    let mut fake = Fake::new().reading_real(&fx.dir);
    fake.read_data
        .insert("/dev/urandom".into(), FAKE_URANDOM.to_vec());
    let log = MemoryLog::default();
    let report = prepare(&fake, &log, Some(&index()), &fx.options())?;
    let (vda, vda4, vda5) = (fx.dev("vda"), fx.dev("vda4"), fx.dev("vda5"));
    assert_eq!(
        lines(&log),
        [
            format!("boot disk {vda} (root on vda2)"),
            format!("disk {vda}: backup GPT moved to the end of the disk (1024 MiB)"),
            "partition EPHEMERAL grown from 64 MiB to 917 MiB".into(),
            "module mbcache loaded".into(),
            "module jbd2 loaded".into(),
            "module ext4 loaded".into(),
            format!("formatting STATE ({vda4}, 100 MiB) as ext4"),
            format!("STATE ({vda4}) mounted at /system/state"),
            format!("formatting EPHEMERAL ({vda5}, 917 MiB) as ext4"),
            format!("EPHEMERAL ({vda5}) mounted at /var"),
        ]
    );
    let dir = "/usr/lib/modules/6.12.0-test/kernel";
    let mut expected = vec![
        Call::Blkpg {
            disk: vda.clone(),
            op: BlkpgOp::Resize,
            number: 5,
            start: 106 * MIB,
            length: 917 * MIB,
        },
        Call::FinitModule(format!("{dir}/mbcache.ko"), false),
        Call::FinitModule(format!("{dir}/jbd2.ko"), false),
        Call::FinitModule(format!("{dir}/ext4.ko"), false),
        Call::OpenRead(vda4.clone()),
    ];
    expected.extend(new_state_calls(&vda4));
    expected.extend([
        Call::OpenRead(vda5.clone()),
        Call::OpenRead("/dev/urandom".into()),
        Call::OpenRead("/dev/urandom".into()),
        mke2fs("EPHEMERAL", &vda5),
        Call::Mkdir("/var".into()),
        mount(vda5.clone(), "/var", VAR_FLAGS),
    ]);
    assert_eq!(fake.calls(), expected);
    let state = report.state?;
    assert!(state.formatted && !state.resized && state.size == 100 * MIB);
    let eph = report.ephemeral?;
    assert!(eph.formatted && eph.size == 917 * MIB);

    // The table on "disk" now says so, and its backup header sits in the last sector.
    let layout = table::read_layout(Path::new(&vda), 512)?;
    assert_eq!(layout.backup_lba, 1024 * 2048 - 1);
    let last = layout
        .parts
        .iter()
        .find(|p| p.name == "EPHEMERAL")
        .map(|p| p.last_lba);
    assert_eq!(last, Some(1023 * 2048 - 1));
    let image = fs::read(&vda)?;
    assert_eq!(&image[image.len() - 512..image.len() - 504], b"EFI PART");
    Ok(())
}

#[test]
fn a_later_boot_mounts_and_grows_a_filesystem_smaller_than_its_partition()
-> Result<(), Box<dyn std::error::Error>> {
    let fx = Fixture::new("later", 1024)?;
    // First boot: table edited (the kernel calls go to another fake).
    prepare(
        &Fake::new().reading_real(&fx.dir),
        &MemoryLog::default(),
        None,
        &fx.options(),
    )?;
    let (vda4, vda5) = (fx.dev("vda4"), fx.dev("vda5"));
    let mut fake = Fake::new()
        .reading_real(&fx.dir)
        .with_file("/var", "")
        .with_file("/system", "")
        .with_file("/system/state", "");
    // STATE formatted to its 100 MiB; EPHEMERAL's filesystem still the image's 64 MiB.
    fake.read_data
        .insert(PathBuf::from(&vda4), ext4_head(25600, "STATE"));
    fake.read_data
        .insert(PathBuf::from(&vda5), ext4_head(16384, "EPHEMERAL"));
    let log = MemoryLog::default();
    let report = prepare(&fake, &log, None, &fx.options())?;
    assert_eq!(
        lines(&log)[1..],
        [
            format!("STATE ({vda4}) mounted at /system/state"),
            format!("EPHEMERAL ({vda5}) mounted at /var"),
            "EPHEMERAL filesystem grown from 64 MiB to 917 MiB".into(),
        ]
    );
    assert_eq!(
        fake.calls(),
        [
            Call::OpenRead(vda4.clone()),
            mount(vda4.clone(), "/system/state", STATE_FLAGS),
            Call::OpenRead(vda5.clone()),
            mount(vda5.clone(), "/var", VAR_FLAGS),
            Call::RunTool(RESIZE2FS.into(), vec![vda5.clone()]),
        ]
    );
    assert!(report.change.plan.is_empty());
    assert!(!report.state?.resized);
    assert!(report.ephemeral?.resized);
    Ok(())
}

#[test]
fn a_partition_that_fails_is_reported_and_the_other_still_mounts()
-> Result<(), Box<dyn std::error::Error>> {
    let fx = Fixture::new("fail", IMAGE_MIB)?;
    let mut fake = Fake::new().reading_real(&fx.dir);
    fake.tool_results.insert(
        MKE2FS.into(),
        ToolOutput {
            code: Some(1),
            output: "mke2fs 1.47.2 (1-Jan-2025)\nmke2fs: Input/output error while setting up superblock\n".into(),
        },
    );
    let log = MemoryLog::default();
    let report = prepare(&fake, &log, None, &fx.options())?;
    let (vda4, vda5) = (fx.dev("vda4"), fx.dev("vda5"));
    let err = report
        .state
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert_eq!(
        err,
        format!(
            "formatting STATE ({vda4}) as ext4 failed (exit code 1): mke2fs 1.47.2 \
             (1-Jan-2025) / mke2fs: Input/output error while setting up superblock"
        )
    );
    assert!(lines(&log).contains(&err));

    // A damaged filesystem: the mount error names device, fs, errno and what to do.
    let mut fake = Fake::new().reading_real(&fx.dir);
    fake.read_data
        .insert(PathBuf::from(&vda4), ext4_head(25600, "STATE"));
    fake.read_data
        .insert(PathBuf::from(&vda5), ext4_head(16384, "EPHEMERAL"));
    fake.mount_errors.insert("ext4".into(), 117);
    let report = prepare(&fake, &MemoryLog::default(), None, &fx.options())?;
    let err = report
        .ephemeral
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert_eq!(
        err,
        format!(
            "cannot mount EPHEMERAL ({vda5}, ext4) at /var: EUCLEAN (117): the filesystem is \
             damaged or not ext4: check it with e2fsck from another system, or wipe the \
             partition (its content is lost) to have it formatted at the next boot"
        )
    );
    Ok(())
}

#[test]
fn missing_partitions_are_created_and_announced_to_the_kernel()
-> Result<(), Box<dyn std::error::Error>> {
    let fx = Fixture::new("create", 512)?;
    write_image(&fx.dir.join("dev/vda"), 512 * MIB, &IMAGE[..3])?;
    let mut fake = Fake::new().reading_real(&fx.dir);
    // The kernel refuses the first: it is reported, and STATE has no device yet.
    fake.blkpg_errors.insert(4, 16);
    let log = MemoryLog::default();
    let report = prepare(&fake, &log, None, &fx.options())?;
    let vda = fx.dev("vda");
    let blkpg: Vec<Call> = fake
        .calls()
        .into_iter()
        .filter(|c| matches!(c, Call::Blkpg { .. }))
        .collect();
    assert_eq!(
        blkpg,
        [
            Call::Blkpg {
                disk: vda.clone(),
                op: BlkpgOp::Add,
                number: 4,
                start: 6 * MIB,
                length: 100 * MIB,
            },
            Call::Blkpg {
                disk: vda.clone(),
                op: BlkpgOp::Add,
                number: 5,
                start: 106 * MIB,
                length: 405 * MIB,
            },
        ]
    );
    assert_eq!(
        lines(&log)[1..4],
        [
            format!("partition STATE created on {vda} as number 4 (100 MiB)"),
            "the kernel was not told about the new STATE (BLKPG: EBUSY (16)); it sees it at the next boot".to_string(),
            format!("partition EPHEMERAL created on {vda} as number 5 (405 MiB)"),
        ]
    );
    assert_eq!(report.reread_failures.len(), 1);
    // (The fixture's sysfs has vda4 and vda5, standing for what BLKPG added.)
    assert!(report.state.is_ok() && report.ephemeral.is_ok());
    let layout = table::read_layout(Path::new(&vda), 512)?;
    let names: Vec<(u32, &str, String)> = layout
        .parts
        .iter()
        .map(|p| (p.number, p.name.as_str(), p.type_guid.clone()))
        .collect();
    assert_eq!(names[3], (4, "STATE", TYPE_GUID_LINUX_DATA.to_string()));
    assert_eq!(names[4], (5, "EPHEMERAL", TYPE_GUID_VAR.to_string()));
    Ok(())
}

#[test]
fn the_boot_disk_comes_from_the_root_device_or_the_slot() -> Result<(), Box<dyn std::error::Error>>
{
    let fx = Fixture::new("boot", IMAGE_MIB)?;
    let sys = fx.dir.join("sys");
    let want = BootDisk {
        disk: "vda".into(),
        partition: "vda2".into(),
    };
    assert_eq!(find_boot_disk(&Linux, &sys, Some((253, 0)), None)?, want);
    assert_eq!(find_boot_disk(&Linux, &sys, None, Some("ROOT-A"))?, want);
    assert_eq!(
        find_boot_disk(&Linux, &sys, Some((253, 9)), Some("ROOT-B"))?.partition,
        "vda3"
    );
    let err = find_boot_disk(&Linux, &sys, None, Some("ROOT-X"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert_eq!(
        err,
        "cannot find the boot disk: 0 partitions are named ROOT-X (vda, vda1 (EFI), vda2 \
         (ROOT-A), vda3 (ROOT-B), vda4 (STATE), vda5 (EPHEMERAL))"
    );
    assert_eq!(
        partition_device(&Linux, &sys, Path::new("/dev"), "vda", 5),
        Some(PathBuf::from("/dev/vda5"))
    );
    assert_eq!(
        partition_device(&Linux, &sys, Path::new("/dev"), "vda", 9),
        None
    );
    Ok(())
}

#[test]
fn a_configured_nodes_busy_state_is_probed_and_mounted_again_then_given_up()
-> Result<(), Box<dyn std::error::Error>> {
    let fx = Fixture::new("retry", 1024)?;
    prepare(
        &Fake::new().reading_real(&fx.dir),
        &MemoryLog::default(),
        None,
        &fx.options(),
    )?;
    let vda4 = fx.dev("vda4");
    let mut fake = Fake::new()
        .reading_real(&fx.dir)
        .with_file("/var", "")
        .with_file("/system", "")
        .with_file("/system/state", "");
    fake.read_data
        .insert(PathBuf::from(&vda4), ext4_head(25600, "STATE"));
    fake.mount_errors.insert("ext4".into(), 16);
    let log = MemoryLog::default();
    let mut report = prepare(&fake, &log, None, &fx.options())?;
    let mut waits = Vec::new();
    retry::retry_report(&fake, &log, &fx.options(), &mut report, &mut |d| {
        waits.push(d)
    });
    assert_eq!(waits, retry::STATE_RETRY_DELAYS);
    assert!(
        matches!(&report.state, Err(Error::Mount { source, .. }) if source.raw_os_error() == Some(16)),
        "{:?}",
        report.state
    );
    let state_mounts = fake
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::Mount { source, .. } if *source == vda4))
        .count();
    assert_eq!(state_mounts, 6, "the first mount and five more");
    assert!(
        lines(&log)
            .iter()
            .any(|l| l.ends_with("after 6 tries over 23 s: given up for this boot")),
        "{:?}",
        lines(&log)
    );
    Ok(())
}
