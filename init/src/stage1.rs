//! Stage 1: from the initramfs to the verified root filesystem.
//!
//! The kernel runs us as `/init` in the initramfs. In order: mount `/proc`, `/sys` and
//! `/dev` (the mount table); read the boot parameters from `/proc/cmdline`; arm the
//! watchdog (`watchdog`: its modules loaded first, its descriptor left open for stage 2,
//! named by `--watchdog-fd=N`), and with the `stage1-hang` test fault (`fault`) sleep
//! forever there; load the initramfs's modules; wait for the slot's root partition (`ROOT-A`/`ROOT-B`) to show up
//! in sysfs; set up dm-verity over it with device-mapper ioctls; with
//! `keelson.verity.check=full` (the default) read the whole device once, so that a root
//! whose content does not match its hash never runs, and meanwhile load stage 2's first
//! modules (`modules/preload`) on the other CPU; mount it read-only at `/sysroot`;
//! move `/dev`, `/proc` and `/sys` into it; switch_root; exec `/sbin/init --stage2`
//! (with `--watchdog-fd=N` when a watchdog is armed, pinged just before).
//!
//! Every step returns an [`Error`] that names what failed and what it means; the caller
//! prints it and reboots, so that the firmware's boot counter can move on to another
//! slot. The initramfs's files are left in memory after switch_root (a few MB of modules).

use std::convert::Infallible;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keelson_configs::layout;

use crate::blockdev::{self, BlockDev};
use crate::cmdline::{self, BootParams, VerityCheck};
use crate::console::Log;
use crate::dm;
use crate::fault;
use crate::modules;
use crate::mounts::{self, EARLY_MOUNTS, ensure_dir};
use crate::syscalls::{MountFlags, NodeKind, Syscalls, errno_name};
use crate::watchdog::{self, Watchdog};

/// The device-mapper name of the verified root.
pub const DM_NAME: &str = "keelson-root";
/// How long stage 1 waits for the root partition to appear.
pub const PARTITION_TIMEOUT: Duration = Duration::from_secs(30);
/// How often it looks.
pub const PARTITION_POLL: Duration = Duration::from_millis(50);
/// The size of each read of the full verity check.
pub const CHECK_READ_SIZE: usize = 1024 * 1024;
/// The errno dm-verity answers for a block whose hash does not match.
const EIO: i32 = 5;
/// How many threads read the root for the full verity check (see `verify_full`).
pub const CHECK_THREADS: usize = 2;
/// The filesystems the root may be, tried in order.
pub const ROOT_FILESYSTEMS: [&str; 2] = ["squashfs", "erofs"];
/// Mounts moved from the initramfs into the new root before switching to it.
pub const MOVED_MOUNTS: [&str; 3] = ["/dev", "/proc", "/sys"];

/// The sysctl that rate-limits writes to `/dev/kmsg` (`kernel.printk_devkmsg`); `on`
/// keeps every line (unless the command line locked it with `printk.devkmsg=`).
pub const KMSG_RATELIMIT: &str = "/proc/sys/kernel/printk_devkmsg";

/// Where stage 1 looks for things; tests point `sysfs` at a directory tree they built.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The sysfs mount (`/sys`).
    pub sysfs: PathBuf,
    /// The kernel command line (`/proc/cmdline`).
    pub cmdline: PathBuf,
    /// The initramfs's module directory (`/modules`).
    pub modules_dir: PathBuf,
    /// The module load order (`/modules/order`).
    pub modules_order: PathBuf,
    /// Stage 2's first modules (`/modules/preload`), loaded during the verity read.
    pub modules_preload: PathBuf,
    /// The device-mapper control node.
    pub dm_control: PathBuf,
    /// Where the root is mounted (`/sysroot`).
    pub sysroot: PathBuf,
    /// The watchdog's device node (`/dev/watchdog`).
    pub watchdog: PathBuf,
}

impl Default for Paths {
    fn default() -> Paths {
        let root = Path::new("/");
        Paths {
            sysfs: PathBuf::from("/sys"),
            cmdline: PathBuf::from("/proc/cmdline"),
            modules_dir: root.join(layout::INITRAMFS_MODULES_DIR),
            modules_order: root.join(layout::INITRAMFS_MODULES_ORDER),
            modules_preload: root.join(layout::INITRAMFS_MODULES_PRELOAD),
            dm_control: PathBuf::from("/dev/mapper/control"),
            sysroot: PathBuf::from(layout::SYSROOT),
            watchdog: PathBuf::from(watchdog::DEVICE),
        }
    }
}

/// Why stage 1 cannot boot this slot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An early mount failed.
    #[error("early mounts failed")]
    Mounts(#[from] mounts::Error),
    /// `/proc/cmdline` cannot be read.
    #[error("cannot read {path}: {errno}", errno = errno_name(source))]
    ReadCmdline {
        /// The path.
        path: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The boot parameters are missing or wrong.
    #[error("cannot boot")]
    Cmdline(#[from] cmdline::Error),
    /// The module list cannot be read.
    #[error("cannot load modules")]
    Modules(#[from] modules::Error),
    /// sysfs cannot be read.
    #[error("cannot look for the root partition")]
    Sysfs(#[from] blockdev::Error),
    /// The root partition never appeared.
    #[error(
        "no partition named {partname} appeared within {seconds} s (block devices seen: {seen}){modules}: the disk driver may be missing from the initramfs, or this disk has no slot {slot}",
        modules = if failed_modules.is_empty() { String::new() } else { format!("; modules that failed to load: {failed_modules}") }
    )]
    NoPartition {
        /// The GPT name looked for.
        partname: &'static str,
        /// The slot letter.
        slot: &'static str,
        /// How long we waited.
        seconds: u64,
        /// What sysfs showed.
        seen: String,
        /// Modules that failed to load, if any.
        failed_modules: String,
    },
    /// A device node cannot be created.
    #[error("cannot create device node {path} ({dev}): {errno}", errno = errno_name(source))]
    DeviceNode {
        /// The node.
        path: String,
        /// `major:minor`.
        dev: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The device-mapper control node is missing and sysfs does not say where it is.
    #[error(
        "/dev/mapper/control is missing and {sysfs_dev} cannot be read ({errno}): device-mapper is not available (is dm_mod in the initramfs?)",
        errno = errno_name(source)
    )]
    NoControl {
        /// The sysfs file that holds the control node's number.
        sysfs_dev: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// dm-verity setup failed.
    #[error("cannot set up dm-verity for {partname} ({device})")]
    Dm {
        /// The partition.
        partname: &'static str,
        /// Its node.
        device: String,
        /// What device-mapper said.
        #[source]
        source: dm::Error,
    },
    /// The root does not match its root hash.
    #[error(
        "root {partname} does not match its verity root hash {root_hash} (block {block}): refusing to boot this slot"
    )]
    Corrupt {
        /// The partition.
        partname: &'static str,
        /// The expected root hash.
        root_hash: String,
        /// The first 4 KiB block of the read that failed.
        block: u64,
    },
    /// Reading the verity device failed other than with EIO.
    #[error("cannot read {device} at byte {offset}: {errno}", errno = errno_name(source))]
    ReadRoot {
        /// The dm device.
        device: String,
        /// Where the read started.
        offset: u64,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The verity device is shorter than the data it should cover.
    #[error("{device} ended after {got} bytes, expected {expected}")]
    ShortRoot {
        /// The dm device.
        device: String,
        /// Bytes read.
        got: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// The verified root cannot be mounted.
    #[error(
        "cannot mount {device} read-only at {sysroot}: squashfs said {squashfs}, erofs said {erofs} (is the filesystem module in the initramfs? is the image's root one of these?)"
    )]
    MountRoot {
        /// The dm device.
        device: String,
        /// The mount point.
        sysroot: String,
        /// The squashfs attempt's errno.
        squashfs: String,
        /// The erofs attempt's errno.
        erofs: String,
    },
    /// The root lacks a directory stage 1 needs.
    #[error(
        "the root filesystem has no {path} directory to move {mount} into: the image is incomplete"
    )]
    MissingDir {
        /// The path inside the new root.
        path: String,
        /// The mount to move.
        mount: &'static str,
    },
    /// A step of switching roots failed.
    #[error("switch_root failed at {step}: {errno}", errno = errno_name(source))]
    SwitchRoot {
        /// `mount --move /dev`, `chroot .`...
        step: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Stage 2 cannot be started.
    #[error("cannot exec {path} {arg} in the new root: {errno} (is the root image complete?)", errno = errno_name(source), arg = layout::STAGE2_ARG)]
    Exec {
        /// The program.
        path: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

/// Run stage 1 to the exec of stage 2; returns only with the reason it cannot go on.
pub fn run(sys: &dyn Syscalls, log: &dyn Log, paths: &Paths) -> Result<Infallible, Error> {
    mounts::apply(sys, EARLY_MOUNTS)?;
    log.reopen();
    // PID 1 is the kernel log's only early writer: do not let it drop our lines.
    let _ = sys.write_file(Path::new(KMSG_RATELIMIT), b"on\n");
    log.line(&format!(
        "stage 1 started (keelson-init {})",
        env!("CARGO_PKG_VERSION")
    ));
    let text = sys
        .read_file(&paths.cmdline)
        .map_err(|source| Error::ReadCmdline {
            path: paths.cmdline.display().to_string(),
            source,
        })?;
    let text = String::from_utf8_lossy(&text);
    let params = cmdline::parse(&text)?;
    let partname = params.slot.partition_name();
    log.line(&format!(
        "booting slot {} ({partname}), verity root hash {}",
        params.slot.letter(),
        params.verity.root_hash
    ));

    // The disk drivers and the modules that read and verify the root come first. If the
    // root is there once they are loaded, its verity read starts at once and the other
    // disk drivers are left to stage 2, which loads them from the root once its services
    // are up (`drivers::DISK_MODULES`): under TCG they took 0.4 s of CPU that the check
    // and stage 2 needed. Otherwise they load now and the search goes on.
    let mut files = modules::read_order(sys, log, &paths.modules_order)?;
    // The watchdog first: from here on a hang of this boot becomes a reset.
    let mut watchdog = arm_watchdog(sys, log, paths, &text, &mut files);
    fault::stage1(sys, log, &text);
    let split = modules::root_chain_end(&files);
    let mut report = modules::Report::default();
    let dir = &paths.modules_dir;
    modules::load_files(
        sys,
        log,
        dir,
        &files[..split],
        modules::ASYNC_PROBE,
        &mut report,
    );
    let early = if split > 0 && split < files.len() {
        find_partition(sys, log, paths, &params, Instant::now())?
    } else {
        None
    };
    let summary = |report: &modules::Report, note: &str| {
        log.line(&format!(
            "modules: {} loaded, {} already loaded, {} failed{note}",
            report.loaded.len(),
            report.already.len(),
            report.failed.len(),
        ));
    };
    let part = match early {
        Some(part) => {
            let left = files.len() - split;
            summary(
                &report,
                &format!("; {left} for other disk controllers left to stage 2"),
            );
            part
        }
        None => {
            modules::load_files(
                sys,
                log,
                dir,
                &files[split..],
                modules::ASYNC_PROBE,
                &mut report,
            );
            summary(&report, "");
            wait_for_partition(sys, log, paths, &params, &report)?
        }
    };
    let dm_node = setup_verity(sys, log, paths, &params, &part)?;
    let meanwhile = || preload_modules(sys, log, paths);
    if params.check == VerityCheck::Full {
        verify_full(sys, log, &dm_node, &params, meanwhile)?;
    } else {
        log.line("verity check lazy: blocks are verified as they are read");
        meanwhile();
    }
    mount_root(sys, log, &dm_node, &paths.sysroot)?;
    switch_root(sys, log, &paths.sysroot)?;

    let init = format!("/{}", layout::ROOT_INIT);
    let mut args = vec![init.clone(), layout::STAGE2_ARG.to_string()];
    // Stage 2 inherits the armed watchdog's descriptor, just pinged.
    if let Some(watchdog) = &mut watchdog {
        watchdog.ping(Instant::now(), log);
        args.extend(watchdog.exec_arg());
    }
    log.line(&format!("exec {}", args.join(" ")));
    sys.sync();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let source = sys.exec(&init, &argv);
    Err(Error::Exec { path: init, source })
}

/// Arm the watchdog ([`watchdog::arm`]); its modules leave `files`, loaded first on
/// their own.
fn arm_watchdog(
    sys: &dyn Syscalls,
    log: &dyn Log,
    paths: &Paths,
    cmdline: &str,
    files: &mut Vec<String>,
) -> Option<Watchdog> {
    let ours = watchdog::take_modules(files);
    let places = watchdog::Places {
        modules_dir: &paths.modules_dir,
        sysfs: &paths.sysfs,
        device: &paths.watchdog,
    };
    watchdog::arm(sys, log, cmdline, &ours, places, &watchdog::open_device)
}

/// Wait (bounded) for the slot's partition to appear in sysfs, and make sure its node exists.
fn wait_for_partition(
    sys: &dyn Syscalls,
    log: &dyn Log,
    paths: &Paths,
    params: &BootParams,
    report: &modules::Report,
) -> Result<BlockDev, Error> {
    let partname = params.slot.partition_name();
    let started = Instant::now();
    let mut waited = Duration::ZERO;
    loop {
        if let Some(dev) = find_partition(sys, log, paths, params, started)? {
            return Ok(dev);
        }
        if waited >= PARTITION_TIMEOUT {
            break;
        }
        if waited.is_zero() {
            log.line(&format!("waiting for partition {partname}"));
        }
        sys.sleep(PARTITION_POLL);
        waited += PARTITION_POLL;
    }
    let devs = blockdev::scan(sys, &paths.sysfs)?;
    Err(Error::NoPartition {
        partname,
        slot: params.slot.letter(),
        seconds: PARTITION_TIMEOUT.as_secs(),
        seen: blockdev::describe(&devs),
        failed_modules: report.failures(),
    })
}

/// The slot's partition if sysfs shows it now (its node made if devtmpfs has not);
/// `started` is when the search began, for the log line.
fn find_partition(
    sys: &dyn Syscalls,
    log: &dyn Log,
    paths: &Paths,
    params: &BootParams,
    started: Instant,
) -> Result<Option<BlockDev>, Error> {
    let partname = params.slot.partition_name();
    let devs = blockdev::scan(sys, &paths.sysfs)?;
    let found = blockdev::find_by_partname(&devs, partname);
    let Some(first) = found.first() else {
        return Ok(None);
    };
    if found.len() > 1 {
        let all: Vec<String> = found.iter().map(|d| d.path()).collect();
        log.line(&format!(
            "warning: {} partitions are named {partname} ({}); using {}",
            found.len(),
            all.join(", "),
            first.path()
        ));
    }
    let dev = (*first).clone();
    log.line(&format!(
        "found {partname} at {} ({}) after {} ms",
        dev.path(),
        dev.dev(),
        started.elapsed().as_millis()
    ));
    ensure_node(sys, &dev.path(), NodeKind::Block, dev.major, dev.minor)?;
    Ok(Some(dev))
}

/// Create a device node unless devtmpfs already did.
fn ensure_node(
    sys: &dyn Syscalls,
    path: &str,
    kind: NodeKind,
    major: u32,
    minor: u32,
) -> Result<(), Error> {
    let node = Path::new(path);
    if sys.exists(node) {
        return Ok(());
    }
    let err = |source| Error::DeviceNode {
        path: path.to_string(),
        dev: format!("{major}:{minor}"),
        source,
    };
    if let Some(parent) = node.parent() {
        ensure_dir(sys, parent, 0o755).map_err(err)?;
    }
    match sys.mknod(node, kind, 0o600, major, minor) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(err(e)),
        _ => Ok(()),
    }
}

/// Create the verity device over the partition; returns its node (`/dev/mapper/...`).
fn setup_verity(
    sys: &dyn Syscalls,
    log: &dyn Log,
    paths: &Paths,
    params: &BootParams,
    part: &BlockDev,
) -> Result<String, Error> {
    let partname = params.slot.partition_name();
    if !sys.exists(&paths.dm_control) {
        // devtmpfs creates it when dm_mod registers; fall back to sysfs's number.
        let sysfs_dev = paths.sysfs.join("class/misc/device-mapper/dev");
        let text = sys
            .read_file(&sysfs_dev)
            .map_err(|source| Error::NoControl {
                sysfs_dev: sysfs_dev.display().to_string(),
                source,
            })?;
        let text = String::from_utf8_lossy(&text);
        let (major, minor) = text
            .trim()
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .ok_or_else(|| Error::NoControl {
                sysfs_dev: sysfs_dev.display().to_string(),
                source: io::Error::new(io::ErrorKind::InvalidData, text.trim().to_string()),
            })?;
        ensure_node(
            sys,
            &paths.dm_control.display().to_string(),
            NodeKind::Char,
            major,
            minor,
        )?;
    }
    let uuid = format!("KEELSON-VERITY-{partname}");
    let (major, minor) = dm::create_verity(
        sys,
        &paths.dm_control,
        DM_NAME,
        &uuid,
        &part.dev(),
        &params.verity,
        params.check == VerityCheck::Full,
    )
    .map_err(|source| Error::Dm {
        partname,
        device: part.path(),
        source,
    })?;
    let node = format!("/dev/mapper/{DM_NAME}");
    ensure_node(sys, &node, NodeKind::Block, major, minor)?;
    log.line(&format!(
        "dm-verity device {node} ({major}:{minor}) set up over {} ({partname}), {} data blocks",
        part.path(),
        params.verity.data_blocks
    ));
    Ok(node)
}

/// Load stage 2's first modules from the initramfs (`modules/preload`), if it has them.
/// Nothing here is fatal: stage 2 loads what is missing from the root.
fn preload_modules(sys: &dyn Syscalls, log: &dyn Log, paths: &Paths) {
    if !sys.exists(&paths.modules_preload) {
        return;
    }
    // With `async_probe` too: a module loaded without it waits in the kernel for every
    // background probe still running (`async_synchronize_full` in `do_init_module`),
    // such as the AHCI controller's reset the disk drivers above started (0.47 s under
    // TCG); these are not drivers, so the flag changes nothing else.
    let params = modules::ASYNC_PROBE;
    match modules::load_all(sys, log, &paths.modules_dir, &paths.modules_preload, params) {
        Ok(report) => log.line(&format!(
            "modules for stage 2: {} loaded, {} already loaded, {} failed",
            report.loaded.len(),
            report.already.len(),
            report.failed.len()
        )),
        Err(e) => log.line(&format!(
            "modules for stage 2 left to stage 2: {}",
            crate::error_chain(&e)
        )),
    }
}

/// Read the whole verity device once: dm-verity answers EIO for any block whose hash
/// does not match, so a clean pass proves the whole root matches its root hash.
///
/// The read runs on [`CHECK_THREADS`] threads, each over its own contiguous share of the
/// blocks, while `meanwhile` runs on this one. The kernel hashes each block in a worker
/// on the CPU that completed its read; under TCG one reader kept one CPU busy for about
/// a second, so a second reader lets the other CPU hash as soon as module loading leaves
/// it idle. The threads only read (no log, no other syscall); a share whose thread cannot
/// be started is read here after `meanwhile`.
fn verify_full(
    sys: &dyn Syscalls,
    log: &dyn Log,
    device: &str,
    params: &BootParams,
    meanwhile: impl FnOnce(),
) -> Result<(), Error> {
    let started = Instant::now();
    let expected = params.verity.data_blocks * layout::VERITY_BLOCK_SIZE;
    let read_error = |offset, source| Error::ReadRoot {
        device: device.to_string(),
        offset,
        source,
    };
    let shares = check_shares(params.verity.data_blocks);
    let mut readers = Vec::with_capacity(shares.len());
    for &(start, len) in &shares {
        let reader = sys
            .open_read_at(Path::new(device), start, true)
            .map_err(|e| read_error(start, e))?;
        readers.push((start, len, reader));
    }
    let outcomes: Vec<(u64, u64, Option<io::Error>)> = std::thread::scope(|scope| {
        let mut running = Vec::new();
        let mut left = Vec::new();
        for (start, len, reader) in readers {
            let spawned = std::thread::Builder::new()
                .name("verity-check".into())
                .spawn_scoped(scope, move || read_share(reader, len));
            match spawned {
                Ok(handle) => running.push((start, len, handle)),
                // The reader went with the closure that could not run: open it again.
                Err(_) => left.push((start, len)),
            }
        }
        meanwhile();
        let mut outcomes: Vec<(u64, u64, Option<io::Error>)> = running
            .into_iter()
            .map(|(start, len, handle)| {
                let (read, failure) = handle.join().unwrap_or_else(|_| {
                    (0, Some(io::Error::other("the verity check thread failed")))
                });
                (start, read.min(len), failure)
            })
            .collect();
        for (start, len) in left {
            let (read, failure) = match sys.open_read_at(Path::new(device), start, true) {
                Ok(reader) => read_share(reader, len),
                Err(e) => (0, Some(e)),
            };
            outcomes.push((start, read, failure));
        }
        outcomes.sort_by_key(|o| o.0);
        outcomes
    });
    let mut total = 0;
    for (share, (start, read, failure)) in shares.iter().zip(outcomes) {
        let offset = start + read;
        match failure {
            None => {}
            Some(e) if e.raw_os_error() == Some(EIO) => {
                return Err(Error::Corrupt {
                    partname: params.slot.partition_name(),
                    root_hash: params.verity.root_hash.clone(),
                    block: offset / layout::VERITY_BLOCK_SIZE,
                });
            }
            Some(e) => return Err(read_error(offset, e)),
        }
        total += read;
        if read != share.1 {
            // The device ended inside this share.
            return Err(Error::ShortRoot {
                device: device.to_string(),
                got: offset,
                expected,
            });
        }
    }
    log.line(&format!(
        "verity: all {} blocks ({} MiB) of {} match root hash {} ({} ms)",
        params.verity.data_blocks,
        total / (1024 * 1024),
        params.slot.partition_name(),
        params.verity.root_hash,
        started.elapsed().as_millis()
    ));
    Ok(())
}

/// The check's shares of the root: `(first byte, length)`, whole blocks each, in order,
/// covering the data blocks exactly.
fn check_shares(data_blocks: u64) -> Vec<(u64, u64)> {
    let threads = (CHECK_THREADS as u64).clamp(1, data_blocks.max(1));
    let mut shares = Vec::new();
    let mut first = 0;
    for i in 0..threads {
        let blocks = data_blocks / threads + u64::from(i < data_blocks % threads);
        shares.push((
            first * layout::VERITY_BLOCK_SIZE,
            blocks * layout::VERITY_BLOCK_SIZE,
        ));
        first += blocks;
    }
    shares
}

/// Read `len` bytes of `reader` (or to its end): the bytes read, and the error that
/// stopped it early. The reader bypasses the page cache (squashfs reads the device
/// itself, so the pages would only be copied and then dropped), which needs a buffer
/// aligned to the block size: whole verity blocks are read at aligned offsets.
fn read_share(reader: Box<dyn Read + Send>, len: u64) -> (u64, Option<io::Error>) {
    let block = layout::VERITY_BLOCK_SIZE as usize;
    let mut space = vec![0u8; CHECK_READ_SIZE + block];
    let skip = space.as_ptr().align_offset(block).min(block);
    let buf = &mut space[skip..skip + CHECK_READ_SIZE];
    let mut share = Read::take(reader, len);
    let (read, failure) = crate::drain(&mut share, buf);
    match failure {
        // A read that fails leaves the position where it was: read on from there a block
        // at a time, so that the report names the block that does not match (a stretch
        // that reads clean the second time is clean).
        Some(e) if e.raw_os_error() == Some(EIO) => {
            let (more, failure) = crate::drain(&mut share, &mut buf[..block]);
            (read + more, failure)
        }
        failure => (read, failure),
    }
}

/// Mount the verified root read-only, as squashfs or else erofs.
fn mount_root(
    sys: &dyn Syscalls,
    log: &dyn Log,
    device: &str,
    sysroot: &Path,
) -> Result<(), Error> {
    let mount_err = |source| Error::SwitchRoot {
        step: format!("mkdir {}", sysroot.display()),
        source,
    };
    ensure_dir(sys, sysroot, 0o755).map_err(mount_err)?;
    let mut errors = Vec::new();
    for fstype in ROOT_FILESYSTEMS {
        match sys.mount(device, sysroot, fstype, MountFlags::RDONLY, "") {
            Ok(()) => {
                log.line(&format!(
                    "root {device} mounted read-only at {} ({fstype})",
                    sysroot.display()
                ));
                return Ok(());
            }
            Err(e) => errors.push(errno_name(&e)),
        }
    }
    let mut errors = errors.into_iter();
    Err(Error::MountRoot {
        device: device.to_string(),
        sysroot: sysroot.display().to_string(),
        squashfs: errors.next().unwrap_or_default(),
        erofs: errors.next().unwrap_or_default(),
    })
}

/// Move the pseudo filesystems into the new root and make it `/`, like switch_root(8):
/// `chdir /sysroot; mount --move . /; chroot .; chdir /`.
fn switch_root(sys: &dyn Syscalls, log: &dyn Log, sysroot: &Path) -> Result<(), Error> {
    for mount in MOVED_MOUNTS {
        let target = sysroot.join(mount.trim_start_matches('/'));
        if !sys.exists(&target) {
            return Err(Error::MissingDir {
                path: mount.to_string(),
                mount,
            });
        }
        sys.mount_move(Path::new(mount), &target)
            .map_err(|source| Error::SwitchRoot {
                step: format!("mount --move {mount} {}", target.display()),
                source,
            })?;
    }
    let step = |step: String| move |source| Error::SwitchRoot { step, source };
    sys.chdir(sysroot)
        .map_err(step(format!("chdir {}", sysroot.display())))?;
    match sys.free_initramfs() {
        Ok(bytes) => log.line(&format!("initramfs freed ({} KiB)", bytes / 1024)),
        Err(e) => log.line(&format!("initramfs not freed: {}", errno_name(&e))),
    }
    sys.mount_move(Path::new("."), Path::new("/"))
        .map_err(step("mount --move . /".to_string()))?;
    sys.chroot(Path::new("."))
        .map_err(step("chroot .".to_string()))?;
    sys.chdir(Path::new("/"))
        .map_err(step("chdir /".to_string()))?;
    log.line("switched root");
    Ok(())
}

#[cfg(test)]
// Tests build their fixtures on disk.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::console::memory::MemoryLog;
    use crate::syscalls::fake::{Call, Fake};

    const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> io::Result<Scratch> {
            let dir = std::env::temp_dir()
                .join(format!("keelson-init-stage1-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("class/block"))?;
            Ok(Scratch(dir))
        }

        fn add_partition(&self, name: &str, minor: u32, partname: &str) -> io::Result<()> {
            let dir = self.0.join("class/block").join(name);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(
                dir.join("uevent"),
                format!("MAJOR=254\nMINOR={minor}\nDEVNAME={name}\nPARTNAME={partname}\n"),
            )
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fake(cmdline: &str) -> Fake {
        let mut fake = Fake::new()
            .with_file("/proc/cmdline", cmdline)
            .with_file("/modules/order", "dm-mod.ko\ndm-verity.ko\n")
            .with_file("/dev/mapper/control", "")
            .with_file("/sysroot/dev", "")
            .with_file("/sysroot/proc", "")
            .with_file("/sysroot/sys", "")
            .with_file("/dev/vda2", "");
        fake.dm_answers.insert(
            dm::CMD_VERSION,
            (0, [4u32, 48, 0].map(u32::to_ne_bytes).concat()),
        );
        fake.dm_answers.insert(
            dm::CMD_DEV_SUSPEND,
            (40, (252u64 << 8).to_ne_bytes().to_vec()),
        );
        fake.device = Some((8 * 4096, None));
        fake
    }

    fn cmdline() -> String {
        format!(
            "console=ttyS0 keelson.slot=a keelson.verity.roothash={HASH} keelson.verity.salt=ab \
             keelson.verity.data_blocks=8 keelson.verity.hash_offset=32768"
        )
    }

    fn paths(scratch: &Scratch) -> Paths {
        Paths {
            sysfs: scratch.0.clone(),
            ..Paths::default()
        }
    }

    fn error_text(r: Result<Infallible, Error>) -> String {
        match r {
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_good_root_is_verified_mounted_and_switched_to() -> io::Result<()> {
        let scratch = Scratch::new("good")?;
        scratch.add_partition("vda2", 2, "ROOT-A")?;
        let fake = fake(&cmdline()).reading_real(&scratch.0);
        let log = MemoryLog::default();
        let err = error_text(run(&fake, &log, &paths(&scratch)));
        assert_eq!(
            err,
            "cannot exec /sbin/init --stage2 in the new root: fake exec (is the root image complete?)"
        );
        let calls = fake.calls();
        // The table load carries the verity table built from the command line; the full
        // check verifies every block, so dm-verity hashes each one once.
        let table = format!("1 254:2 254:2 4096 4096 8 9 sha256 {HASH} ab 1 check_at_most_once");
        assert!(
            calls
                .iter()
                .any(|c| matches!(c, Call::DmIoctl(dm::CMD_TABLE_LOAD, buf)
            if buf.windows(table.len()).any(|w| w == table.as_bytes())))
        );
        // The end of the sequence: mount the root, move the mounts, switch, exec.
        let tail: Vec<Call> = calls
            .iter()
            .skip_while(|c| !matches!(c, Call::OpenRead(_)))
            .cloned()
            .collect();
        assert_eq!(
            tail,
            [
                Call::OpenRead("/dev/mapper/keelson-root".into()),
                Call::OpenRead("/dev/mapper/keelson-root".into()),
                Call::Mkdir("/sysroot".into()),
                Call::Mount {
                    source: "/dev/mapper/keelson-root".into(),
                    target: "/sysroot".into(),
                    fstype: "squashfs".into(),
                    flags: MountFlags::RDONLY,
                    data: String::new(),
                },
                Call::MountMove("/dev".into(), "/sysroot/dev".into()),
                Call::MountMove("/proc".into(), "/sysroot/proc".into()),
                Call::MountMove("/sys".into(), "/sysroot/sys".into()),
                Call::Chdir("/sysroot".into()),
                Call::FreeInitramfs,
                Call::MountMove(".".into(), "/".into()),
                Call::Chroot(".".into()),
                Call::Chdir("/".into()),
                Call::Sync,
                Call::Exec(
                    "/sbin/init".into(),
                    vec!["/sbin/init".into(), "--stage2".into()]
                ),
            ]
        );
        // The dm node did not exist: it was created from the number the kernel gave.
        assert!(calls.contains(&Call::Mknod(
            "/dev/mapper/keelson-root".into(),
            NodeKind::Block,
            252,
            0
        )));
        assert!(
            log.lines()
                .contains(&"keelson-init: module dm_verity loaded".to_string())
        );
        Ok(())
    }

    #[test]
    fn a_corrupt_root_is_refused_with_the_block() -> io::Result<()> {
        let scratch = Scratch::new("corrupt")?;
        scratch.add_partition("vda2", 2, "ROOT-A")?;
        let mut fake = fake(&cmdline()).reading_real(&scratch.0);
        fake.device = Some((8 * 4096, Some(5 * 4096)));
        let log = MemoryLog::default();
        let err = error_text(run(&fake, &log, &paths(&scratch)));
        assert_eq!(
            err,
            format!(
                "root ROOT-A does not match its verity root hash {HASH} (block 5): refusing to boot this slot"
            )
        );
        assert!(!fake.calls().iter().any(|c| matches!(c, Call::Chroot(_))));
        Ok(())
    }

    #[test]
    fn the_check_shares_cover_every_block_once_in_order() {
        let b = layout::VERITY_BLOCK_SIZE;
        assert_eq!(check_shares(8), [(0, 4 * b), (4 * b, 4 * b)]);
        assert_eq!(check_shares(7), [(0, 4 * b), (4 * b, 3 * b)]);
        assert_eq!(check_shares(1), [(0, b)]);
        assert_eq!(check_shares(0), [(0, 0)]);
    }

    #[test]
    fn a_root_device_shorter_than_its_blocks_is_refused() -> io::Result<()> {
        let scratch = Scratch::new("short")?;
        scratch.add_partition("vda2", 2, "ROOT-A")?;
        let mut fake = fake(&cmdline()).reading_real(&scratch.0);
        fake.device = Some((6 * 4096, None));
        let log = MemoryLog::default();
        let err = error_text(run(&fake, &log, &paths(&scratch)));
        assert_eq!(
            err,
            "/dev/mapper/keelson-root ended after 24576 bytes, expected 32768"
        );
        assert!(!fake.calls().iter().any(|c| matches!(c, Call::Chroot(_))));
        Ok(())
    }

    #[test]
    fn stage_two_modules_load_during_the_full_read_and_a_corrupt_root_still_stops() -> io::Result<()>
    {
        let scratch = Scratch::new("preload")?;
        scratch.add_partition("vda2", 2, "ROOT-A")?;
        for corrupt in [None, Some(3 * 4096)] {
            let mut fake = fake(&cmdline())
                .reading_real(&scratch.0)
                .with_file("/modules/preload", "jbd2.ko\next4.ko\n");
            fake.device = Some((8 * 4096, corrupt));
            let log = MemoryLog::default();
            let err = error_text(run(&fake, &log, &paths(&scratch)));
            // Between opening the verity device and mounting it: the read's window.
            let window: Vec<Call> = fake
                .calls()
                .into_iter()
                .skip_while(|c| !matches!(c, Call::OpenRead(_)))
                .skip(1)
                .take_while(|c| !matches!(c, Call::Mkdir(_)))
                .filter(|c| matches!(c, Call::FinitModule(..)))
                .collect();
            assert_eq!(
                window,
                [
                    Call::FinitModule("/modules/jbd2.ko".into(), false),
                    Call::FinitModule("/modules/ext4.ko".into(), false),
                ]
            );
            assert!(
                log.lines().contains(
                    &"keelson-init: modules for stage 2: 2 loaded, 0 already loaded, 0 failed"
                        .to_string()
                ),
                "{:?}",
                log.lines()
            );
            if corrupt.is_some() {
                assert!(
                    err.contains("(block 3): refusing to boot this slot"),
                    "{err}"
                );
                assert!(!fake.calls().iter().any(|c| matches!(c, Call::Chroot(_))));
            } else {
                assert!(err.starts_with("cannot exec /sbin/init"), "{err}");
            }
        }
        Ok(())
    }

    /// The root chain, then two drivers for other disk controllers.
    const ORDER_WITH_OTHER_DRIVERS: &str =
        "virtio_blk.ko\ndm-mod.ko\ndm-verity.ko\nsquashfs.ko\nnvme.ko\nahci.ko\n";

    #[test]
    fn once_the_root_chain_finds_the_root_the_other_disk_drivers_are_left_to_stage_2()
    -> io::Result<()> {
        let scratch = Scratch::new("early")?;
        scratch.add_partition("vda2", 2, "ROOT-A")?;
        let fake = fake(&cmdline())
            .reading_real(&scratch.0)
            .with_file("/modules/order", ORDER_WITH_OTHER_DRIVERS);
        let log = MemoryLog::default();
        let err = error_text(run(&fake, &log, &paths(&scratch)));
        assert!(err.starts_with("cannot exec /sbin/init"), "{err}");
        let calls = fake.calls();
        let read = calls
            .iter()
            .position(|c| matches!(c, Call::OpenRead(_)))
            .unwrap_or(usize::MAX);
        let at = |file: &str| {
            calls
                .iter()
                .position(|c| matches!(c, Call::FinitModule(p, _) if p == file))
        };
        assert!(at("/modules/squashfs.ko") < Some(read), "{calls:?}");
        assert_eq!(at("/modules/nvme.ko"), None, "{calls:?}");
        assert_eq!(at("/modules/ahci.ko"), None, "{calls:?}");
        assert!(
            log.lines().contains(
                &"keelson-init: modules: 4 loaded, 0 already loaded, 0 failed; 2 for other disk controllers left to stage 2"
                    .into()
            ),
            "{:?}",
            log.lines()
        );
        Ok(())
    }

    #[test]
    fn without_the_root_after_the_root_chain_every_disk_driver_loads_before_the_wait()
    -> io::Result<()> {
        let scratch = Scratch::new("late")?;
        let fake = fake(&cmdline())
            .reading_real(&scratch.0)
            .with_file("/modules/order", ORDER_WITH_OTHER_DRIVERS);
        let log = MemoryLog::default();
        let err = error_text(run(&fake, &log, &paths(&scratch)));
        assert!(err.contains("ROOT-A"), "{err}");
        let calls = fake.calls();
        let loads: Vec<&Call> = calls
            .iter()
            .filter(|c| matches!(c, Call::FinitModule(..)))
            .collect();
        assert_eq!(loads.len(), 6, "{calls:?}");
        assert!(
            matches!(loads[5], Call::FinitModule(p, _) if p == "/modules/ahci.ko"),
            "{calls:?}"
        );
        assert!(
            log.lines()
                .contains(&"keelson-init: waiting for partition ROOT-A".into()),
            "{:?}",
            log.lines()
        );
        Ok(())
    }

    #[test]
    fn the_watchdog_s_modules_load_first_and_without_a_device_nothing_is_armed() -> io::Result<()> {
        let scratch = Scratch::new("watchdog")?;
        scratch.add_partition("vda2", 2, "ROOT-A")?;
        let fake = fake(&cmdline()).reading_real(&scratch.0).with_file(
            "/modules/order",
            "dm-mod.ko\nwatchdog.ko\ndm-verity.ko\ni6300esb.ko\n",
        );
        let log = MemoryLog::default();
        let err = error_text(run(&fake, &log, &paths(&scratch)));
        assert!(err.starts_with("cannot exec /sbin/init"), "{err}");
        let loads: Vec<Call> = fake
            .calls()
            .into_iter()
            .filter(|c| matches!(c, Call::FinitModule(..)))
            .collect();
        let load = |f: &str| Call::FinitModule(format!("/modules/{f}"), false);
        assert_eq!(
            loads,
            [
                load("watchdog.ko"),
                load("i6300esb.ko"),
                load("dm-mod.ko"),
                load("dm-verity.ko")
            ]
        );
        let lines = log.lines();
        assert!(
            lines.contains(&"keelson-init: no watchdog: /dev/watchdog does not exist (watchdog, i6300esb loaded); nothing is armed, so a hang is not reset on this machine".into()),
            "{lines:?}"
        );
        assert!(
            lines.contains(&"keelson-init: modules: 2 loaded, 0 already loaded, 0 failed".into()),
            "{lines:?}"
        );
        // No watchdog, no descriptor for stage 2.
        assert!(fake.calls().contains(&Call::Exec(
            "/sbin/init".into(),
            vec!["/sbin/init".into(), "--stage2".into()]
        )));
        Ok(())
    }

    #[test]
    fn lazy_check_skips_the_full_read() -> io::Result<()> {
        let scratch = Scratch::new("lazy")?;
        scratch.add_partition("vda2", 2, "ROOT-A")?;
        let mut fake =
            fake(&format!("{} keelson.verity.check=lazy", cmdline())).reading_real(&scratch.0);
        fake.device = Some((8 * 4096, Some(0)));
        let _ = run(&fake, &MemoryLog::default(), &paths(&scratch));
        assert!(!fake.calls().iter().any(|c| matches!(c, Call::OpenRead(_))));
        assert!(fake.calls().iter().any(|c| matches!(c, Call::Exec(..))));
        // Nothing verified the blocks up front: each read is verified.
        let once = b"check_at_most_once";
        assert!(!fake.calls().iter().any(
            |c| matches!(c, Call::DmIoctl(_, buf) if buf.windows(once.len()).any(|w| w == once))
        ));
        Ok(())
    }

    #[test]
    fn a_missing_partition_times_out_naming_what_was_seen() -> io::Result<()> {
        let scratch = Scratch::new("missing")?;
        scratch.add_partition("vda1", 1, "EFI")?;
        let mut fake = fake(&cmdline().replace("slot=a", "slot=b")).reading_real(&scratch.0);
        fake.module_errors
            .insert(PathBuf::from("/modules/dm-verity.ko"), 2);
        let err = error_text(run(&fake, &MemoryLog::default(), &paths(&scratch)));
        assert_eq!(
            err,
            "no partition named ROOT-B appeared within 30 s (block devices seen: vda1 (EFI)); \
             modules that failed to load: dm_verity (ENOENT (2)): the disk driver may be \
             missing from the initramfs, or this disk has no slot b"
        );
        let sleeps = fake
            .calls()
            .iter()
            .filter(|c| matches!(c, Call::Sleep(_)))
            .count();
        assert_eq!(sleeps, 600);
        Ok(())
    }

    #[test]
    fn a_missing_roothash_stops_before_touching_disks() -> io::Result<()> {
        let scratch = Scratch::new("nohash")?;
        let fake = fake("console=ttyS0 keelson.slot=a").reading_real(&scratch.0);
        let r = run(&fake, &MemoryLog::default(), &paths(&scratch));
        let Err(Error::Cmdline(e)) = r else {
            panic!("expected a command-line error");
        };
        assert_eq!(
            e,
            cmdline::Error::Missing {
                key: "keelson.verity.roothash"
            }
        );
        assert!(
            !fake
                .calls()
                .iter()
                .any(|c| matches!(c, Call::FinitModule(..)))
        );
        Ok(())
    }

    #[test]
    fn the_second_filesystem_is_tried_and_both_errors_reported() -> io::Result<()> {
        let scratch = Scratch::new("fs")?;
        scratch.add_partition("vda2", 2, "ROOT-A")?;
        let mut fake = fake(&cmdline()).reading_real(&scratch.0);
        fake.mount_errors.insert("squashfs".into(), 22);
        fake.mount_errors.insert("erofs".into(), 19);
        let err = error_text(run(&fake, &MemoryLog::default(), &paths(&scratch)));
        assert!(
            err.starts_with("cannot mount /dev/mapper/keelson-root read-only at /sysroot: squashfs said EINVAL (22), erofs said ENODEV (19)"),
            "{err}"
        );
        Ok(())
    }
}
