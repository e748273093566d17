//! `disks` on real files and, as root, on a real loop device: the GPT growth checked by
//! `sgdisk`, what we format read back by `ext4-view`, and `prepare` end to end (BLKPG,
//! mke2fs, mount, online resize2fs) against the host's kernel.

// A test harness: it builds fixtures and runs the host's tools to check what init did.
#![allow(clippy::disallowed_methods)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use keelson_configs::layout::{TYPE_GUID_EFI, TYPE_GUID_LINUX_DATA, TYPE_GUID_VAR};
use keelson_init::console::Log;
use keelson_init::disks::{self, table};
use keelson_init::syscalls::{BlkpgOp, Linux, Syscalls};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

const MIB: u64 = 1 << 20;
const AMD64_ROOT: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
/// The imager's partitions (name, type, first MiB, MiB), roots shrunk; the image ends
/// 1 MiB after EPHEMERAL.
const IMAGE: [(&str, &str, u64, u64); 5] = [
    ("EFI", TYPE_GUID_EFI, 1, 8),
    ("ROOT-A", AMD64_ROOT, 9, 16),
    ("ROOT-B", AMD64_ROOT, 25, 16),
    ("STATE", TYPE_GUID_LINUX_DATA, 41, 100),
    ("EPHEMERAL", TYPE_GUID_VAR, 141, 64),
];
const IMAGE_MIB: u64 = 206;

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> io::Result<Scratch> {
        let dir =
            std::env::temp_dir().join(format!("keelson-it-disks-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Write a sparse GPT disk image of `size` bytes with `parts`, as the imager lays it out,
/// using the `gpt` crate.
fn write_image(path: &Path, size: u64, parts: &[(&str, &str, u64, u64)]) -> Result {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.set_len(size)?;
    gpt::mbr::ProtectiveMBR::with_lb_size(u32::try_from(size / 512 - 1)?)
        .overwrite_lba0(&mut file)?;
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .create_from_device(file, None)?;
    for (i, (name, type_guid, first, len)) in parts.iter().enumerate() {
        let kind = gpt::partition_types::Type::from_str(type_guid)?;
        disk.add_partition_at(name, i as u32 + 1, first * 2048, len * 2048, kind, 0)?;
    }
    disk.write()?;
    Ok(())
}

fn grow_file(path: &Path, size: u64) -> io::Result<()> {
    OpenOptions::new().write(true).open(path)?.set_len(size)
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!("{program} {args:?} failed ({}): {text}", out.status).into());
    }
    Ok(text)
}

/// `sgdisk -p`'s partition lines: (number, first sector, last sector, name).
fn sgdisk_partitions(image: &Path) -> Result<Vec<(u32, u64, u64, String)>> {
    let text = run("sgdisk", &["-p", &image.display().to_string()])?;
    let mut out = Vec::new();
    let mut in_table = false;
    for line in text.lines() {
        if line.trim_start().starts_with("Number") {
            in_table = true;
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if in_table && f.len() >= 7 {
            out.push((
                f[0].parse()?,
                f[1].parse()?,
                f[2].parse()?,
                f[6..].join(" "),
            ));
        }
    }
    Ok(out)
}

#[test]
fn growth_moves_the_backup_and_fills_the_disk_as_sgdisk_sees_it() -> Result {
    let scratch = Scratch::new("grow")?;
    let image = scratch.0.join("disk.raw");
    write_image(&image, IMAGE_MIB * MIB, &IMAGE)?;
    let shown = image.display().to_string();
    assert!(run("sgdisk", &["-v", &shown])?.contains("No problems found"));

    // A 3 GiB disk: sgdisk sees the misplaced backup before the edit...
    grow_file(&image, 3 << 30)?;
    assert!(!run("sgdisk", &["-v", &shown])?.contains("No problems found"));
    let change = table::edit(&image, 512)?;
    assert!(change.plan.relocate_backup);
    // ... and a valid table after it, EPHEMERAL up to the last whole MiB.
    let verify = run("sgdisk", &["-v", &shown])?;
    assert!(verify.contains("No problems found"), "{verify}");
    let parts = sgdisk_partitions(&image)?;
    let names: Vec<&str> = parts.iter().map(|p| p.3.as_str()).collect();
    assert_eq!(names, ["EFI", "ROOT-A", "ROOT-B", "STATE", "EPHEMERAL"]);
    let disk_sectors = (3u64 << 30) / 512;
    assert_eq!(parts[4].1, 141 * 2048, "EPHEMERAL keeps its start");
    assert_eq!(
        parts[4].2,
        disk_sectors - 2048 - 1,
        "EPHEMERAL fills the disk"
    );
    assert_eq!(
        parts[3],
        (4, 41 * 2048, 141 * 2048 - 1, "STATE".to_string())
    );
    // Nothing left to do on the next boot.
    assert!(table::edit(&image, 512)?.plan.is_empty());

    // The protective MBR covers the whole disk again.
    let mut mbr = [0u8; 512];
    File::open(&image)?.read_exact(&mut mbr)?;
    assert_eq!(mbr[446 + 4], 0xEE);
    let covered = u32::from_le_bytes([mbr[458], mbr[459], mbr[460], mbr[461]]);
    assert_eq!(u64::from(covered), disk_sectors - 1);
    Ok(())
}

#[test]
fn absent_state_and_ephemeral_are_created_where_sgdisk_expects_them() -> Result {
    let scratch = Scratch::new("create")?;
    let image = scratch.0.join("disk.raw");
    write_image(&image, IMAGE_MIB * MIB, &IMAGE[..3])?;
    grow_file(&image, 1 << 30)?;
    table::edit(&image, 512)?;
    let shown = image.display().to_string();
    let verify = run("sgdisk", &["-v", &shown])?;
    assert!(verify.contains("No problems found"), "{verify}");
    let parts = sgdisk_partitions(&image)?;
    assert_eq!(
        parts[3],
        (4, 41 * 2048, 141 * 2048 - 1, "STATE".to_string())
    );
    assert_eq!(
        parts[4],
        (5, 141 * 2048, 1023 * 2048 - 1, "EPHEMERAL".to_string())
    );
    let info = run("sgdisk", &["-i", "5", &shown])?;
    assert!(info.contains(TYPE_GUID_VAR), "{info}");
    Ok(())
}

/// ext4-view over a byte window of an image file (one partition).
struct Window {
    file: File,
    start: u64,
}

impl ext4_view::Ext4Read for Window {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.file.seek(SeekFrom::Start(self.start + start_byte))?;
        self.file.read_exact(dst)?;
        Ok(())
    }
}

fn read_ext4(image: &Path, offset: u64, path: &str) -> Result<Vec<u8>> {
    let fs = ext4_view::Ext4::load(Box::new(Window {
        file: File::open(image)?,
        start: offset,
    }))?;
    Ok(fs.read(path)?)
}

#[test]
fn what_we_format_is_ext4_to_our_probe_and_to_ext4_view() -> Result {
    let scratch = Scratch::new("mkfs")?;
    let part = scratch.0.join("state.img");
    grow_file_new(&part, 100 * MIB)?;
    let device = part.display().to_string();
    assert_eq!(disks::ext4::probe(&Linux, &part)?, None);
    disks::format(&Linux, "STATE", &device)?;
    let sb = disks::ext4::probe(&Linux, &part)?.ok_or("no ext4 superblock after mke2fs")?;
    assert_eq!(sb.label, "STATE");
    assert_eq!(sb.size(), 100 * MIB);
    // A file put in with debugfs (no mount needed) reads back through ext4-view.
    let src = scratch.0.join("config.toml");
    fs::write(&src, "version = \"v1\"\n")?;
    run(
        "debugfs",
        &[
            "-w",
            "-R",
            &format!("write {} config.toml", src.display()),
            &device,
        ],
    )?;
    assert_eq!(read_ext4(&part, 0, "/config.toml")?, b"version = \"v1\"\n");
    Ok(())
}

fn grow_file_new(path: &Path, size: u64) -> io::Result<()> {
    File::create(path)?.set_len(size)
}

/// A log that prints and keeps its lines.
#[derive(Default)]
struct Lines(std::cell::RefCell<Vec<String>>);

impl Log for Lines {
    fn line(&self, message: &str) {
        eprintln!("keelson-init: {message}");
        self.0.borrow_mut().push(message.to_string());
    }

    fn raw(&self, text: &str) {
        self.0.borrow_mut().push(text.to_string());
    }
}

impl Lines {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.borrow_mut())
    }
}

/// A loop device over an image file with its partitions; detached (and anything mounted
/// from it unmounted) on drop.
struct Loop {
    dev: String,
    mounts: Vec<PathBuf>,
}

impl Loop {
    /// Attach `image` and make its partitions known to the kernel. The kernel may not
    /// parse GPTs itself (this host's does not), so they are added with BLKPG as partx
    /// does; one the kernel already has answers EBUSY.
    fn attach(image: &Path) -> Result<Loop> {
        let dev = run(
            "losetup",
            &["-f", "--show", "-P", &image.display().to_string()],
        )?;
        let disk = Loop {
            dev: dev.trim().to_string(),
            mounts: Vec::new(),
        };
        let layout = table::read_layout(Path::new(&disk.dev), 512)?;
        for p in &layout.parts {
            match Linux.blkpg(
                Path::new(&disk.dev),
                BlkpgOp::Add,
                p.number,
                p.first_lba * 512,
                p.sectors() * 512,
            ) {
                Err(e) if e.raw_os_error() != Some(16) => return Err(e.into()),
                _ => {}
            }
        }
        Ok(disk)
    }

    fn name(&self) -> &str {
        self.dev.trim_start_matches("/dev/")
    }

    fn unmount(&mut self) {
        for m in self.mounts.drain(..).rev() {
            let _ = rustix::mount::unmount(&m, rustix::mount::UnmountFlags::empty());
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.unmount();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn sysfs_size(part: &str) -> Result<u64> {
    let text = fs::read_to_string(format!("/sys/class/block/{part}/size"))?;
    Ok(text.trim().parse::<u64>()? * 512)
}

fn dev_numbers(part: &str) -> Result<(u32, u32)> {
    let text = fs::read_to_string(format!("/sys/class/block/{part}/dev"))?;
    let (major, minor) = text.trim().split_once(':').ok_or("bad dev file")?;
    Ok((major.parse()?, minor.parse()?))
}

fn fs_size(path: &Path) -> Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_blocks * st.f_frsize)
}

/// The whole of `prepare` against the host's kernel, on a loop device standing for the
/// boot disk: first boot on a larger disk, a second boot, then the disk grown again.
/// Needs root (loop devices, BLKPG, mount); CI runs as root.
#[test]
fn prepare_on_a_real_loop_device_first_and_later_boots() -> Result {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root for loop devices and mounts");
        return Ok(());
    }
    let scratch = Scratch::new("loop")?;
    let image = scratch.0.join("disk.raw");
    write_image(&image, IMAGE_MIB * MIB, &IMAGE)?;
    grow_file(&image, 512 * MIB)?;
    let mut disk = Loop::attach(&image)?;
    let name = disk.name().to_string();
    let root = format!("{name}p2");
    let opts = disks::Options {
        sysfs: PathBuf::from("/sys"),
        dev: PathBuf::from("/dev"),
        root_device: Some(dev_numbers(&root)?),
        slot_partname: None,
        state_mount: scratch.0.join("state"),
        ephemeral_mount: scratch.0.join("var"),
        defer_new_state: false,
    };
    let log = Lines::default();

    // First boot: the table grows, the kernel learns EPHEMERAL's size through BLKPG,
    // both partitions are formatted and mounted.
    let report = disks::prepare(&Linux, &log, None, &opts)?;
    disk.mounts = vec![opts.state_mount.clone(), opts.ephemeral_mount.clone()];
    let state = report.state?;
    let eph = report.ephemeral?;
    assert!(report.reread_failures.is_empty());
    assert!(state.formatted && eph.formatted);
    assert_eq!(sysfs_size(&format!("{name}p5"))?, (511 - 141) * MIB);
    assert_eq!(eph.size, (511 - 141) * MIB);
    let lines = log.take();
    assert_eq!(lines[2], "partition EPHEMERAL grown from 64 MiB to 370 MiB");
    fs::write(opts.state_mount.join("config.toml"), "hostname = \"n1\"\n")?;
    fs::write(opts.ephemeral_mount.join("kept"), "var content\n")?;
    assert!(fs_size(&opts.ephemeral_mount)? > 300 * MIB);
    disk.unmount();

    // What the node wrote reads back from the image file with ext4-view.
    assert_eq!(
        read_ext4(&image, 41 * MIB, "/config.toml")?,
        b"hostname = \"n1\"\n"
    );
    assert_eq!(read_ext4(&image, 141 * MIB, "/kept")?, b"var content\n");

    // Second boot: nothing to format, content kept.
    let report = disks::prepare(&Linux, &log, None, &opts)?;
    disk.mounts = vec![opts.state_mount.clone(), opts.ephemeral_mount.clone()];
    assert!(report.change.plan.is_empty());
    assert!(!report.state?.formatted && !report.ephemeral?.formatted);
    assert_eq!(
        fs::read_to_string(opts.ephemeral_mount.join("kept"))?,
        "var content\n"
    );
    disk.unmount();
    log.take();

    // The disk grows again (a cloud volume resized): EPHEMERAL and its mounted
    // filesystem follow, online.
    grow_file(&image, 1 << 30)?;
    run("losetup", &["-c", &disk.dev])?;
    let report = disks::prepare(&Linux, &log, None, &opts)?;
    disk.mounts = vec![opts.state_mount.clone(), opts.ephemeral_mount.clone()];
    let eph = report.ephemeral?;
    assert!(!eph.formatted);
    assert_eq!(sysfs_size(&format!("{name}p5"))?, (1023 - 141) * MIB);
    assert_eq!(
        fs::read_to_string(opts.ephemeral_mount.join("kept"))?,
        "var content\n"
    );
    let lines = log.take();
    if has_cap_sys_resource()? {
        assert!(eph.resized);
        assert!(fs_size(&opts.ephemeral_mount)? > 800 * MIB);
        assert!(
            lines.contains(&"EPHEMERAL filesystem grown from 370 MiB to 882 MiB".to_string()),
            "{lines:?}"
        );
    } else {
        // Online resizing needs CAP_SYS_RESOURCE (PID 1 has it; some sandboxes drop
        // it): the failure is reported, and the mounted filesystem keeps its size.
        eprintln!("no CAP_SYS_RESOURCE here: checking that the resize failure is reported");
        assert!(!eph.resized);
        let last = lines.last().cloned().unwrap_or_default();
        assert!(
            last.starts_with("EPHEMERAL filesystem could not be grown (/usr/sbin/resize2fs ")
                && last.ends_with("it keeps 370 MiB"),
            "{last}"
        );
    }
    Ok(())
}

/// Whether this process may resize filesystems online (`CAP_SYS_RESOURCE`, bit 24).
fn has_cap_sys_resource() -> Result<bool> {
    let status = fs::read_to_string("/proc/self/status")?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .ok_or("no CapEff in /proc/self/status")?;
    Ok(u64::from_str_radix(eff.trim(), 16)? & (1 << 24) != 0)
}
