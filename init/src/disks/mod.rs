//! Disks: STATE and EPHEMERAL on the boot disk, created, grown, formatted and mounted.
//!
//! Stage 2 calls [`prepare`] once, before anything reads STATE or writes `/var`:
//!
//! 1. Find the boot disk: the disk that holds the partition under the root's dm-verity
//!    device (`/sys/dev/block/<root>/slaves`), or else the one partition named after the
//!    booted slot; the disk is that partition's parent in sysfs.
//! 2. Edit its GPT ([`table`]): on first boot of a disk larger than the image, move the
//!    backup GPT to the end, create STATE and EPHEMERAL when absent and grow EPHEMERAL to
//!    fill the free space after it; then tell the kernel with `BLKPG` (BLKRRPART cannot
//!    work while the root partition is in use).
//! 3. For each of STATE and EPHEMERAL: format with `mke2fs` (run directly, default ext4
//!    features so `ext4-view` reads it) when it has no ext4 superblock ([`ext4`]); mount
//!    (the `ext4` module loaded first); and when the partition grew under an existing
//!    filesystem, grow it online with `resize2fs`.
//!
//! A partition that cannot be prepared is reported with its device, filesystem, errno
//! and what to do; the other one is still prepared. A configured node's STATE that
//! fails for a reason that may pass is tried again for a bounded time ([`retry`]).
//!
//! With [`Options::defer_new_state`] a STATE that has no filesystem yet (a first boot) is
//! left unformatted: [`prepare`] reports it as [`Error::Deferred`], and stage 2 formats
//! and mounts it with [`finish_deferred`] once containerd is spawned (containerd needs
//! only EPHEMERAL; a new STATE holds nothing to read, and its `mke2fs` then runs on the
//! CPU containerd's start leaves idle). Only a blank STATE (its head all zeros) is new: one
//! that holds bytes but no ext4 superblock is a damaged filesystem that may hold the
//! node's config, reported as [`Error::Unrecognized`] and never formatted, so that stage
//! 2 does not take a configured node for a new one (and serve maintenance mode).

pub mod ext4;
pub mod retry;
pub mod table;

use std::io;
use std::path::{Path, PathBuf};

use keelson_configs::layout::{
    EPHEMERAL_MOUNT, PART_EPHEMERAL, PART_STATE, PARTITION_ALIGN, STATE_MOUNT,
};

use crate::blockdev;
use crate::console::Log;
use crate::kmods::{self, ModuleIndex};
use crate::syscalls::{BlkpgOp, MountFlags, Syscalls, errno_name};

/// The formatter, from the image's e2fsprogs.
pub const MKE2FS: &str = "/usr/sbin/mke2fs";
/// The online resizer, from the image's e2fsprogs.
pub const RESIZE2FS: &str = "/usr/sbin/resize2fs";

/// Errors of preparing the disks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// STATE has no filesystem yet and is left to [`finish_deferred`] (not a failure).
    #[error("{name} ({device}) has no filesystem yet: it is formatted later in the boot")]
    Deferred {
        /// The partition's name.
        name: &'static str,
        /// Its device.
        device: String,
        /// Its size in bytes.
        size: u64,
    },
    /// STATE holds data but no ext4 superblock: a damaged filesystem, not a new
    /// partition, so it is neither formatted nor mounted.
    #[error(
        "{name} ({device}) holds data but no ext4 superblock: its filesystem may be damaged, and it may hold this node's config and identity, so it is neither formatted nor mounted; repair it from another system (e2fsck -b with a backup superblock), or wipe its first MiB (its content is lost) to have it formatted at the next boot"
    )]
    Unrecognized {
        /// The partition's name.
        name: &'static str,
        /// Its device.
        device: String,
    },
    /// The boot disk cannot be found.
    #[error("cannot find the boot disk: {why}")]
    NoBootDisk {
        /// What was looked at.
        why: String,
    },
    /// The partition table cannot be edited.
    #[error("cannot prepare the partition table")]
    Table(#[from] table::Error),
    /// The partition is not in the table (and could not be created).
    #[error("{name} is not in the partition table of {disk}")]
    Missing {
        /// The partition.
        name: &'static str,
        /// The disk.
        disk: String,
    },
    /// The kernel has no device for the partition.
    #[error(
        "{name} (partition {number} of {disk}) has no device node: the kernel does not know it yet; it will after a reboot"
    )]
    NoDevice {
        /// The partition.
        name: &'static str,
        /// Its number.
        number: u32,
        /// The disk.
        disk: String,
    },
    /// The superblock cannot be read.
    #[error("cannot read {device} to look for a filesystem: {errno}: the disk may be failing", errno = errno_name(source))]
    Probe {
        /// The partition's device.
        device: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// mke2fs could not be started.
    #[error("cannot run {MKE2FS} for {name} ({device}): {errno}: the image must carry e2fsprogs", errno = errno_name(source))]
    RunFormat {
        /// The partition.
        name: &'static str,
        /// Its device.
        device: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// mke2fs failed.
    #[error("formatting {name} ({device}) as ext4 failed ({status}): {output}")]
    Format {
        /// The partition.
        name: &'static str,
        /// Its device.
        device: String,
        /// Exit status.
        status: String,
        /// The end of mke2fs's output.
        output: String,
    },
    /// The mount point cannot be created.
    #[error("cannot create the mount point {target}: {errno}: {hint}", errno = errno_name(source))]
    MountPoint {
        /// The directory.
        target: String,
        /// What to do.
        hint: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The mount failed.
    #[error("cannot mount {name} ({device}, ext4) at {target}: {errno}: {hint}", errno = errno_name(source))]
    Mount {
        /// The partition.
        name: &'static str,
        /// Its device.
        device: String,
        /// The mount point.
        target: String,
        /// What to do.
        hint: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

/// Where to look, so that tests can point at directory trees they built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// sysfs (`/sys`).
    pub sysfs: PathBuf,
    /// The device directory (`/dev`).
    pub dev: PathBuf,
    /// `major:minor` of the root filesystem's device (the dm-verity device), see
    /// [`root_device`].
    pub root_device: Option<(u32, u32)>,
    /// The booted slot's partition name (`ROOT-A`), used when `root_device` tells nothing.
    pub slot_partname: Option<String>,
    /// Where STATE is mounted ([`STATE_MOUNT`]).
    pub state_mount: PathBuf,
    /// Where EPHEMERAL is mounted ([`EPHEMERAL_MOUNT`]).
    pub ephemeral_mount: PathBuf,
    /// Leave a STATE without a filesystem to [`finish_deferred`].
    pub defer_new_state: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            sysfs: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
            root_device: root_device(),
            slot_partname: None,
            state_mount: PathBuf::from(STATE_MOUNT),
            ephemeral_mount: PathBuf::from(EPHEMERAL_MOUNT),
            defer_new_state: false,
        }
    }
}

/// `major:minor` of the device the root filesystem is on.
pub fn root_device() -> Option<(u32, u32)> {
    let stat = rustix::fs::stat("/").ok()?;
    Some((
        rustix::fs::major(stat.st_dev),
        rustix::fs::minor(stat.st_dev),
    ))
}

/// The boot disk and the partition the root lives on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootDisk {
    /// The whole disk's name (`vda`, `nvme0n1`).
    pub disk: String,
    /// The root partition's name (`vda2`).
    pub partition: String,
}

/// Find the boot disk in `sysfs`: through the root device's dm slaves, else by the
/// slot's partition name.
pub fn find_boot_disk(
    sys: &dyn Syscalls,
    sysfs: &Path,
    root_device: Option<(u32, u32)>,
    slot_partname: Option<&str>,
) -> Result<BootDisk, Error> {
    let mut tried = Vec::new();
    let mut partition = None;
    if let Some((major, minor)) = root_device {
        let dev_dir = sysfs.join(format!("dev/block/{major}:{minor}"));
        let slaves = sys
            .read_dir_names(&dev_dir.join("slaves"))
            .unwrap_or_default();
        if slaves.len() == 1 {
            partition = slaves.into_iter().next();
        } else if sys.exists(&dev_dir.join("partition")) {
            partition = sys
                .canonicalize(&dev_dir)
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        } else {
            tried.push(format!(
                "the root device {major}:{minor} has {} underlying devices",
                slaves.len()
            ));
        }
    }
    if partition.is_none()
        && let Some(name) = slot_partname
    {
        let devs = blockdev::scan(sys, sysfs).map_err(|e| Error::NoBootDisk {
            why: crate::error_chain(&e),
        })?;
        let found = blockdev::find_by_partname(&devs, name);
        match found.as_slice() {
            [one] => partition = Some(one.devname.clone()),
            _ => tried.push(format!(
                "{} partitions are named {name} ({})",
                found.len(),
                blockdev::describe(&devs)
            )),
        }
    }
    let Some(partition) = partition else {
        if tried.is_empty() {
            tried.push("neither the root device nor the slot is known".into());
        }
        return Err(Error::NoBootDisk {
            why: tried.join("; "),
        });
    };
    let part_dir = sysfs.join("class/block").join(&partition);
    let disk = sys
        .canonicalize(&part_dir)
        .ok()
        .and_then(|p| {
            p.parent()
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().into_owned())
        })
        .filter(|d| sys.exists(&sysfs.join("class/block").join(d)))
        .ok_or_else(|| Error::NoBootDisk {
            why: format!("{} has no parent disk in sysfs", part_dir.display()),
        })?;
    Ok(BootDisk { disk, partition })
}

/// The device node of partition `number` of `disk`: the child of the disk in sysfs whose
/// `partition` file says `number`.
pub fn partition_device(
    sys: &dyn Syscalls,
    sysfs: &Path,
    dev: &Path,
    disk: &str,
    number: u32,
) -> Option<PathBuf> {
    let dir = sysfs.join("class/block").join(disk);
    sys.read_dir_names(&dir)
        .ok()?
        .into_iter()
        .find(|name| {
            sys.read_file(&dir.join(name).join("partition"))
                .ok()
                .and_then(|b| String::from_utf8_lossy(&b).trim().parse::<u32>().ok())
                == Some(number)
        })
        .map(|name| dev.join(name))
}

/// What happened to one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    /// Its device.
    pub device: String,
    /// Where it is mounted.
    pub target: String,
    /// Formatted now (first boot).
    pub formatted: bool,
    /// Its filesystem was grown to the partition.
    pub resized: bool,
    /// The partition's size in bytes.
    pub size: u64,
}

/// What [`prepare`] did.
#[derive(Debug)]
pub struct Report {
    /// The boot disk.
    pub boot: BootDisk,
    /// The partition table change.
    pub change: table::Change,
    /// Kernel notifications that failed (the kernel sees the change at the next boot).
    pub reread_failures: Vec<(String, io::Error)>,
    /// STATE's outcome.
    pub state: Result<Mounted, Error>,
    /// EPHEMERAL's outcome.
    pub ephemeral: Result<Mounted, Error>,
}

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

/// Prepare STATE and EPHEMERAL (see the module docs). `modules` is used to load `ext4`.
pub fn prepare(
    sys: &dyn Syscalls,
    log: &dyn Log,
    modules: Option<&ModuleIndex>,
    opts: &Options,
) -> Result<Report, Error> {
    let boot = find_boot_disk(
        sys,
        &opts.sysfs,
        opts.root_device,
        opts.slot_partname.as_deref(),
    )?;
    let disk_path = opts.dev.join(&boot.disk);
    let disk = disk_path.display().to_string();
    log.line(&format!("boot disk {disk} (root on {})", boot.partition));
    let sector = table::sector_size(&opts.sysfs, &boot.disk);
    let change = table::edit(&disk_path, sector)?;
    let mut reread_failures = Vec::new();
    if let Some(before) = &change.before {
        let plan = &change.plan;
        if plan.relocate_backup {
            log.line(&format!(
                "disk {disk}: backup GPT moved to the end of the disk ({} MiB)",
                mib(before.disk_sectors * sector)
            ));
        }
        for part in &plan.create {
            log.line(&format!(
                "partition {} created on {disk} as number {} ({} MiB)",
                part.name,
                part.number,
                mib(part.sectors() * sector)
            ));
            if let Err(e) = sys.blkpg(
                &disk_path,
                BlkpgOp::Add,
                part.number,
                part.first_lba * sector,
                part.sectors() * sector,
            ) {
                log.line(&format!(
                    "the kernel was not told about the new {} (BLKPG: {}); it sees it at the next boot",
                    part.name,
                    errno_name(&e)
                ));
                reread_failures.push((part.name.clone(), e));
            }
        }
        if let Some(grow) = &plan.grow {
            let sectors = grow.new_last + 1 - grow.first_lba;
            log.line(&format!(
                "partition {} grown from {} MiB to {} MiB",
                grow.name,
                mib((grow.old_last + 1 - grow.first_lba) * sector),
                mib(sectors * sector)
            ));
            if let Err(e) = sys.blkpg(
                &disk_path,
                BlkpgOp::Resize,
                grow.number,
                grow.first_lba * sector,
                sectors * sector,
            ) {
                log.line(&format!(
                    "the kernel was not told about {}'s new size (BLKPG: {}); it sees it at the next boot",
                    grow.name,
                    errno_name(&e)
                ));
                reread_failures.push((grow.name.clone(), e));
            }
        }
    }
    let layout = table::read_layout(&disk_path, sector)?;
    if let Some(index) = modules {
        // A failure is logged by kmods; the mount below then says what it means.
        kmods::load(sys, log, index, &["ext4"]);
    }
    let data = MountFlags::NOSUID | MountFlags::NODEV;
    let outcome = |name: &'static str, target: &Path, flags: MountFlags| {
        let defer = name == PART_STATE && opts.defer_new_state;
        let result = prepare_partition(
            sys,
            log,
            opts,
            &boot.disk,
            &layout,
            (name, target, flags),
            defer,
        );
        if let Err(e) = &result
            && !matches!(e, Error::Deferred { .. })
        {
            log.line(&crate::error_chain(e));
        }
        result
    };
    let state = outcome(PART_STATE, &opts.state_mount, STATE_FLAGS);
    let ephemeral = outcome(PART_EPHEMERAL, &opts.ephemeral_mount, data);
    Ok(Report {
        boot,
        change,
        reread_failures,
        state,
        ephemeral,
    })
}

/// STATE alone, prepared again on `disk` (its table read again), for [`retry`]: a
/// configured node's STATE that failed for a reason that may pass.
pub fn prepare_state(
    sys: &dyn Syscalls,
    log: &dyn Log,
    opts: &Options,
    disk: &str,
) -> Result<Mounted, Error> {
    let disk_path = opts.dev.join(disk);
    let sector = table::sector_size(&opts.sysfs, disk);
    let layout = table::read_layout(&disk_path, sector)?;
    prepare_partition(
        sys,
        log,
        opts,
        disk,
        &layout,
        (PART_STATE, &opts.state_mount, STATE_FLAGS),
        opts.defer_new_state,
    )
}

/// What to do when mounting failed with `err`.
pub fn mount_hint(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(19) => {
            "the kernel has no ext4 driver: the ext4 module did not load (see the module lines above)"
        }
        Some(22) | Some(117) | Some(74) => {
            "the filesystem is damaged or not ext4: check it with e2fsck from another system, or wipe the partition (its content is lost) to have it formatted at the next boot"
        }
        Some(2) => "the device node or the mount point is missing",
        Some(16) => "it is already mounted or in use",
        Some(30) => "the device is read-only",
        Some(5) => "the disk returned I/O errors: replace it",
        _ => "see the kernel log",
    }
}

fn mkdir_all(sys: &dyn Syscalls, target: &Path) -> Result<(), Error> {
    let mut path = PathBuf::from("/");
    for component in target.components().skip(1) {
        path.push(component);
        if sys.exists(&path) {
            continue;
        }
        match sys.mkdir(&path, 0o755) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(Error::MountPoint {
                    target: target.display().to_string(),
                    hint: if source.raw_os_error() == Some(30) {
                        "the root filesystem is read-only and lacks it: the image must provide the directory"
                    } else {
                        "see the kernel log"
                    },
                    source,
                });
            }
        }
    }
    Ok(())
}

/// STATE's mount flags.
const STATE_FLAGS: MountFlags = MountFlags::NOSUID
    .union(MountFlags::NODEV)
    .union(MountFlags::NOEXEC);

/// Format and mount the STATE that [`prepare`] left as [`Error::Deferred`].
pub fn finish_deferred(
    sys: &dyn Syscalls,
    log: &dyn Log,
    opts: &Options,
    device: &str,
    size: u64,
) -> Result<Mounted, Error> {
    let target = &opts.state_mount;
    let shown = target.display().to_string();
    format_new(sys, log, PART_STATE, device, size)?;
    mount_partition(sys, log, PART_STATE, device, target, STATE_FLAGS)?;
    Ok(Mounted {
        device: device.to_string(),
        target: shown,
        formatted: true,
        resized: false,
        size,
    })
}

/// Say that a partition of `size` bytes without a filesystem is formatted, and format it.
fn format_new(
    sys: &dyn Syscalls,
    log: &dyn Log,
    name: &'static str,
    device: &str,
    size: u64,
) -> Result<(), Error> {
    log.line(&format!(
        "formatting {name} ({device}, {} MiB) as ext4",
        mib(size)
    ));
    format(sys, name, device)
}

fn mount_partition(
    sys: &dyn Syscalls,
    log: &dyn Log,
    name: &'static str,
    device: &str,
    target: &Path,
    flags: MountFlags,
) -> Result<(), Error> {
    let shown = target.display().to_string();
    mkdir_all(sys, target)?;
    sys.mount(device, target, "ext4", flags, "")
        .map_err(|source| Error::Mount {
            name,
            device: device.to_string(),
            target: shown.clone(),
            hint: mount_hint(&source),
            source,
        })?;
    log.line(&format!("{name} ({device}) mounted at {shown}"));
    Ok(())
}

fn prepare_partition(
    sys: &dyn Syscalls,
    log: &dyn Log,
    opts: &Options,
    disk: &str,
    layout: &table::Layout,
    (name, target, flags): (&'static str, &Path, MountFlags),
    defer_if_new: bool,
) -> Result<Mounted, Error> {
    let shown = target.display().to_string();
    let disk_path = opts.dev.join(disk).display().to_string();
    let part = layout
        .parts
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| Error::Missing {
            name,
            disk: disk_path.clone(),
        })?;
    let size = part.sectors() * layout.sector;
    let device_path = partition_device(sys, &opts.sysfs, &opts.dev, disk, part.number).ok_or(
        Error::NoDevice {
            name,
            number: part.number,
            disk: disk_path,
        },
    )?;
    let device = device_path.display().to_string();
    if sys.is_mount_point(target).unwrap_or(false) {
        log.line(&format!("{name} already mounted at {shown}"));
        return Ok(Mounted {
            device,
            target: shown,
            formatted: false,
            resized: false,
            size,
        });
    }
    let head = ext4::read_head(sys, &device_path).map_err(|source| Error::Probe {
        device: device.clone(),
        source,
    })?;
    let superblock = ext4::parse(&head);
    let formatted = superblock.is_none();
    // A STATE is new only when blank: bytes without a superblock may be a configured
    // node's damaged filesystem, which a format would erase.
    if formatted && defer_if_new && !ext4::is_blank(&head) {
        return Err(Error::Unrecognized { name, device });
    }
    if formatted && defer_if_new {
        return Err(Error::Deferred { name, device, size });
    }
    if formatted {
        format_new(sys, log, name, &device, size)?;
    }
    mount_partition(sys, log, name, &device, target, flags)?;
    let mut resized = false;
    if let Some(sb) = superblock
        && size >= sb.size() + PARTITION_ALIGN
    {
        match sys.run_tool(RESIZE2FS, &[&device]) {
            Ok(out) if out.success() => {
                log.line(&format!(
                    "{name} filesystem grown from {} MiB to {} MiB",
                    mib(sb.size()),
                    mib(size)
                ));
                resized = true;
            }
            Ok(out) => log.line(&format!(
                "{name} filesystem could not be grown ({RESIZE2FS} {device}: {}); it keeps {} MiB",
                out.tail(2),
                mib(sb.size())
            )),
            Err(e) => log.line(&format!(
                "{name} filesystem could not be grown ({RESIZE2FS}: {}); it keeps {} MiB",
                errno_name(&e),
                mib(sb.size())
            )),
        }
    }
    Ok(Mounted {
        device,
        target: shown,
        formatted,
        resized,
        size,
    })
}

/// Format `device` as ext4 labelled `name`: `mke2fs -t ext4 -L NAME -U UUID -F -E
/// nodiscard,hash_seed=SEED DEVICE`, run directly, with mke2fs's default feature set (which
/// `ext4-view` reads).
///
/// The filesystem UUID and directory hash seed are ours, from `/dev/urandom`: left to
/// itself, mke2fs asks the kernel for them with `getrandom(GRND_NONBLOCK)` and, while the
/// kernel's random pool is not yet initialised (early boot on a VM without a hardware RNG),
/// sleeps and retries for a second per value, 4 s per filesystem. Neither value needs to
/// be secret, only unique. No discard: a partition made from a fresh image is already
/// zeroes, and discarding a whole disk can take minutes on real hardware.
pub fn format(sys: &dyn Syscalls, name: &'static str, device: &str) -> Result<(), Error> {
    let uuid = fresh_uuid(sys);
    let extended = format!("nodiscard,hash_seed={}", fresh_uuid(sys));
    let out = sys
        .run_tool(
            MKE2FS,
            &[
                "-t", "ext4", "-L", name, "-U", &uuid, "-F", "-E", &extended, device,
            ],
        )
        .map_err(|source| Error::RunFormat {
            name,
            device: device.to_string(),
            source,
        })?;
    if out.success() {
        return Ok(());
    }
    Err(Error::Format {
        name,
        device: device.to_string(),
        status: match out.code {
            Some(code) => format!("exit code {code}"),
            None => "killed by a signal".into(),
        },
        output: out.tail(3),
    })
}

/// A random (version 4) UUID from `/dev/urandom`, which never blocks; from the clock if
/// even that cannot be read (unique enough for a filesystem's UUID).
fn fresh_uuid(sys: &dyn Syscalls) -> String {
    let (raw, _) = crate::syscalls::random_bytes(sys);
    uuid::Builder::from_random_bytes(raw)
        .into_uuid()
        .hyphenated()
        .to_string()
}

#[cfg(test)]
// Tests build their fixtures on disk.
#[allow(clippy::disallowed_methods)]
mod tests;
