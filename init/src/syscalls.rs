//! Every system call PID 1 makes, behind one trait.
//!
//! Boot logic (the mount table, module loading, device-mapper, switch_root) is written
//! against [`Syscalls`], so it is unit-tested without root through the recording fake in
//! the test-only `fake` module. [`Linux`] is the real implementation, built on `rustix`
//! (raw Linux system calls, no C library needed) and the standard library; the QEMU
//! end-to-end tests are what exercise it.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use keelson_node_protocol::control::ExitInfo;

pub mod install;

pub use rustix::mount::MountFlags;

/// Which kind of device node [`Syscalls::mknod`] creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// A block device (`S_IFBLK`).
    Block,
    /// A character device (`S_IFCHR`).
    Char,
}

/// What [`Syscalls::reboot`] asks the kernel to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootHow {
    /// `RB_AUTOBOOT`: restart the machine (the firmware's boot counter moves on).
    Restart,
    /// `RB_POWER_OFF`: power the machine off.
    PowerOff,
}

/// The kernel's `uname` answer, reduced to what we print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uname {
    /// Kernel release (`uname -r`).
    pub release: String,
    /// Machine architecture (`uname -m`).
    pub machine: String,
}

/// What [`Syscalls::blkpg`] asks of the kernel's view of a disk's partition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkpgOp {
    /// `BLKPG_ADD_PARTITION`: a partition the kernel has not seen yet.
    Add,
    /// `BLKPG_RESIZE_PARTITION`: same start, new length.
    Resize,
}

/// How a program run by [`Syscalls::run_tool`] ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolOutput {
    /// The exit code; `None` when a signal killed it.
    pub code: Option<i32>,
    /// Its standard output followed by its standard error, as text.
    pub output: String,
}

impl ToolOutput {
    /// Whether it exited with 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The last `lines` non-empty lines of its output, joined with ` / ` (for one-line
    /// error messages).
    pub fn tail(&self, lines: usize) -> String {
        let all: Vec<&str> = self
            .output
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        all[all.len().saturating_sub(lines)..].join(" / ")
    }
}

/// The system calls PID 1 makes. Paths are absolute paths of the running system.
pub trait Syscalls {
    /// `mount(2)`: mount `source` of type `fstype` at `target`.
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()>;
    /// `mount(2)` with `MS_MOVE`: move the mount at `from` to `to`.
    fn mount_move(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Whether `path` is the root of a mount (its device differs from its parent's).
    fn is_mount_point(&self, path: &Path) -> io::Result<bool>;
    /// `mkdir(2)`; an existing directory is an `AlreadyExists` error.
    fn mkdir(&self, path: &Path, mode: u32) -> io::Result<()>;
    /// `mknod(2)` of a device node.
    fn mknod(
        &self,
        path: &Path,
        kind: NodeKind,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()>;
    /// Whether `path` exists (follows symlinks).
    fn exists(&self, path: &Path) -> bool;
    /// Read a whole (small) file.
    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Write `data` to an existing file (such as `/dev/kmsg` or a sysfs attribute).
    fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()>;
    /// Write `data` to `path` (absolute) whole with the permission bits `mode`, its
    /// missing parents made: a file PID 1 installs (`/etc`, the config's files, a live
    /// change). Atomic, and never through a symbolic link ([`install`]).
    fn install_file(&self, path: &Path, data: &[u8], mode: u32) -> io::Result<()>;
    /// Remove the file or symlink at `path`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Give `path` the permission bits `mode`.
    fn set_mode(&self, path: &Path, mode: u32) -> io::Result<()>;
    /// The permission bits of `path` (following a symbolic link).
    fn file_mode(&self, path: &Path) -> io::Result<u32>;
    /// Make the directory `path` and its missing parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// The names in directory `path`, sorted (a sysfs class, `/dev/input`).
    fn read_dir_names(&self, path: &Path) -> io::Result<Vec<String>>;
    /// The path with every symbolic link resolved (sysfs's device links).
    fn canonicalize(&self, path: &Path) -> io::Result<std::path::PathBuf>;
    /// Send signal `signal` (a number the control socket's `kill` accepts) to process
    /// `pid`; EINVAL for a pid or signal that is not one.
    fn kill_process(&self, pid: u32, signal: i32) -> io::Result<()>;
    /// `waitpid(pid, WNOHANG)` (`pid` `None`: any child, `-1`): a child that ended, with
    /// how; `Ok(None)` while children live but none has ended; ECHILD when there is no
    /// child (of that pid) to wait for.
    fn wait_child(&self, pid: Option<u32>) -> io::Result<Option<(u32, ExitInfo)>>;
    /// Open a file or block device for sequential reading.
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn Read + Send>> {
        self.open_read_at(path, 0, false)
    }
    /// Open a file or block device for sequential reading from byte `offset`; `direct`
    /// bypasses the page cache (`O_DIRECT`: the offset, each read's length and the
    /// buffer's address must then be multiples of the device's logical block size).
    fn open_read_at(
        &self,
        path: &Path,
        offset: u64,
        direct: bool,
    ) -> io::Result<Box<dyn Read + Send>>;
    /// `finit_module(2)` of the module file at `path`, with `params`; `compressed` asks the
    /// kernel to decompress the file itself (`MODULE_INIT_COMPRESSED_FILE`, Linux 5.17+
    /// with `CONFIG_MODULE_DECOMPRESS`, which Debian's kernels have).
    fn finit_module(&self, path: &Path, params: &str, compressed: bool) -> io::Result<()>;
    /// A device-mapper ioctl (`_IOWR(0xfd, cmd, struct dm_ioctl)`) on the control node at
    /// `control`. `buf` starts with a `struct dm_ioctl` whose `data_size` is `buf.len()`;
    /// the kernel writes its answer back into `buf`.
    fn dm_ioctl(&self, control: &Path, cmd: u8, buf: &mut [u8]) -> io::Result<()>;
    /// Delete the initramfs's files (everything under `/` on the root's own filesystem,
    /// not crossing into other mounts) to give its memory back, as switch_root(8) does.
    /// Refuses unless `/` is a ramfs or tmpfs. Returns the bytes freed.
    fn free_initramfs(&self) -> io::Result<u64>;
    /// `chdir(2)`.
    fn chdir(&self, path: &Path) -> io::Result<()>;
    /// `chroot(2)`.
    fn chroot(&self, path: &Path) -> io::Result<()>;
    /// `sync(2)`.
    fn sync(&self);
    /// `reboot(2)`; returns only when the kernel refused.
    fn reboot(&self, how: RebootHow) -> io::Error;
    /// `execv(3)`: replace this process; returns only on failure.
    fn exec(&self, path: &str, args: &[&str]) -> io::Error;
    /// `uname(2)`.
    fn uname(&self) -> Uname;
    /// Sleep (the fake returns at once).
    fn sleep(&self, duration: Duration);
    /// `umount2(2)`; `detach` is `MNT_DETACH` (lazy: gone from the tree now, released
    /// when no longer busy).
    fn unmount(&self, target: &Path, detach: bool) -> io::Result<()>;
    /// `mount(2)` with `MS_REMOUNT | MS_RDONLY`: make a mounted filesystem read-only
    /// (an ext4 filesystem is flushed and marked clean, as by an unmount).
    fn remount_readonly(&self, target: &Path) -> io::Result<()>;
    /// `kill(-1, sig)`: signal every process but PID 1 (`SIGTERM`, or `SIGKILL` when
    /// `kill` is set).
    fn kill_all(&self, kill: bool) -> io::Result<()>;
    /// `sethostname(2)`.
    fn sethostname(&self, name: &str) -> io::Result<()>;
    /// `reboot(LINUX_REBOOT_CMD_CAD_OFF)`: Ctrl-Alt-Del sends `SIGINT` to PID 1 instead of
    /// restarting the machine at once.
    fn ctrl_alt_del_to_init(&self) -> io::Result<()>;
    /// `swapoff(2)` of the swap device or file at `path`. (There is deliberately no
    /// `swapon`: nothing in PID 1 may enable swap.)
    fn swapoff(&self, path: &Path) -> io::Result<()>;
    /// The `BLKPG` ioctl on the whole-disk node `disk`: tell the kernel about partition
    /// `number` (`start` and `length` in bytes) while other partitions of the disk are in
    /// use, where `BLKRRPART` would fail with EBUSY.
    fn blkpg(
        &self,
        disk: &Path,
        op: BlkpgOp,
        number: u32,
        start: u64,
        length: u64,
    ) -> io::Result<()>;
    /// Run `program` directly (no shell) with `args`, an empty environment but `PATH`,
    /// and standard input closed; wait for it and return its exit code and output.
    fn run_tool(&self, program: &str, args: &[&str]) -> io::Result<ToolOutput>;
}

/// Open an existing file or device for writing (`/dev/console`, `/dev/kmsg`): the real
/// system only, outside the trait, because the console opens them before any `Syscalls`
/// exists and from the panic hook.
// The real system: a device opened for writing, as the trait's implementation does.
#[allow(clippy::disallowed_methods)]
pub fn open_for_writing(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new().write(true).open(path)
}

/// Open a disk (or disk image) for reading and writing: the GPT edit works on a `File`.
// The real system: the boot disk opened for the partition table's edit.
#[allow(clippy::disallowed_methods)]
pub fn open_read_write(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
}

/// A pid as rustix's (`None` for 0 and pids past `i32`).
fn pid_of(pid: u32) -> Option<rustix::process::Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
}

/// The signals the control socket's `kill` names (`control::SIGNALS`) as rustix's.
fn signal_of(number: i32) -> Option<rustix::process::Signal> {
    use rustix::process::Signal;
    Some(match number {
        1 => Signal::HUP,
        2 => Signal::INT,
        3 => Signal::QUIT,
        6 => Signal::ABORT,
        9 => Signal::KILL,
        10 => Signal::USR1,
        12 => Signal::USR2,
        15 => Signal::TERM,
        _ => return None,
    })
}

/// The real system calls of the running Linux kernel.
#[derive(Debug, Default, Clone, Copy)]
pub struct Linux;

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in string"))
}

// The real system: the one place, with the supervisor's runner and STATE's atomic write,
// where PID 1 writes files and runs programs itself (see init/clippy.toml).
#[allow(clippy::disallowed_methods)]
impl Syscalls for Linux {
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()> {
        let data = cstring(data)?;
        rustix::mount::mount(source, target, fstype, flags, Some(data.as_c_str()))?;
        Ok(())
    }

    fn mount_move(&self, from: &Path, to: &Path) -> io::Result<()> {
        rustix::mount::mount_move(from, to)?;
        Ok(())
    }

    fn is_mount_point(&self, path: &Path) -> io::Result<bool> {
        let own = std::fs::metadata(path)?;
        let parent = std::fs::metadata(path.join(".."))?;
        // A mount root differs from its parent in device, or is the root itself.
        Ok(own.dev() != parent.dev() || own.ino() == parent.ino())
    }

    fn mkdir(&self, path: &Path, mode: u32) -> io::Result<()> {
        rustix::fs::mkdir(path, rustix::fs::Mode::from_raw_mode(mode))?;
        Ok(())
    }

    fn mknod(
        &self,
        path: &Path,
        kind: NodeKind,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        let file_type = match kind {
            NodeKind::Block => rustix::fs::FileType::BlockDevice,
            NodeKind::Char => rustix::fs::FileType::CharacterDevice,
        };
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            file_type,
            rustix::fs::Mode::from_raw_mode(mode),
            rustix::fs::makedev(major, minor),
        )?;
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.write_all(data)
    }

    fn install_file(&self, path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
        Ok(install::install_file(Path::new("/"), path, data, mode)?)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn set_mode(&self, path: &Path, mode: u32) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn read_dir_names(&self, path: &Path) -> io::Result<Vec<String>> {
        // An entry that cannot be read is skipped, as a directory walk skips it.
        let mut names: Vec<String> = std::fs::read_dir(path)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    }

    fn canonicalize(&self, path: &Path) -> io::Result<std::path::PathBuf> {
        std::fs::canonicalize(path)
    }

    fn file_mode(&self, path: &Path) -> io::Result<u32> {
        use std::os::unix::fs::PermissionsExt;
        Ok(std::fs::metadata(path)?.permissions().mode() & 0o7777)
    }

    fn kill_process(&self, pid: u32, signal: i32) -> io::Result<()> {
        match (pid_of(pid), signal_of(signal)) {
            (Some(p), Some(sig)) => rustix::process::kill_process(p, sig).map_err(io::Error::from),
            _ => Err(io::Error::from_raw_os_error(22)),
        }
    }

    fn wait_child(&self, pid: Option<u32>) -> io::Result<Option<(u32, ExitInfo)>> {
        use rustix::process::WaitOptions;
        let waited = match pid {
            Some(raw) => {
                let p = pid_of(raw).ok_or_else(|| io::Error::from_raw_os_error(22))?;
                rustix::process::waitpid(Some(p), WaitOptions::NOHANG)?
            }
            None => rustix::process::wait(WaitOptions::NOHANG)?,
        };
        Ok(waited.map(|(pid, status)| {
            let exit = ExitInfo {
                code: status.exit_status(),
                signal: status.terminating_signal(),
            };
            (pid.as_raw_nonzero().get() as u32, exit)
        }))
    }

    fn open_read_at(
        &self,
        path: &Path,
        offset: u64,
        direct: bool,
    ) -> io::Result<Box<dyn Read + Send>> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(path)?;
        if offset > 0 {
            file.seek(io::SeekFrom::Start(offset))?;
        }
        Ok(Box::new(file))
    }

    fn finit_module(&self, path: &Path, params: &str, compressed: bool) -> io::Result<()> {
        /// `MODULE_INIT_COMPRESSED_FILE` from linux/module.h.
        const MODULE_INIT_COMPRESSED_FILE: i32 = 4;
        let file = File::open(path)?;
        let params = cstring(params)?;
        let flags = if compressed {
            MODULE_INIT_COMPRESSED_FILE
        } else {
            0
        };
        rustix::system::finit_module(&file, &params, flags)?;
        Ok(())
    }

    fn dm_ioctl(&self, control: &Path, cmd: u8, buf: &mut [u8]) -> io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(control)?;
        if buf.len() < crate::dm_abi::DM_IOCTL_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "device-mapper buffer smaller than struct dm_ioctl",
            ));
        }
        let request = DmRequest { cmd, buf };
        // SAFETY: `request` passes a pointer to `buf`, which is at least
        // `sizeof(struct dm_ioctl)` bytes and whose `data_size` field (written by
        // `dm::encode`) is `buf.len()`, so the kernel reads and writes only inside `buf`;
        // the opcode is `_IOWR(0xfd, cmd, struct dm_ioctl)` as linux/dm-ioctl.h defines it.
        unsafe { rustix::ioctl::ioctl(&file, request)? };
        Ok(())
    }

    fn free_initramfs(&self) -> io::Result<u64> {
        const RAMFS_MAGIC: i64 = 0x8584_58f6;
        const TMPFS_MAGIC: i64 = 0x0102_1994;
        let fs_type = rustix::fs::statfs("/")?.f_type as i64;
        if fs_type != RAMFS_MAGIC && fs_type != TMPFS_MAGIC {
            return Err(io::Error::other("/ is not an initramfs (ramfs or tmpfs)"));
        }
        let root = Path::new("/");
        remove_same_fs(root, std::fs::symlink_metadata(root)?.dev())
    }

    fn chdir(&self, path: &Path) -> io::Result<()> {
        rustix::process::chdir(path)?;
        Ok(())
    }

    fn chroot(&self, path: &Path) -> io::Result<()> {
        rustix::process::chroot(path)?;
        Ok(())
    }

    fn sync(&self) {
        rustix::fs::sync();
    }

    fn reboot(&self, how: RebootHow) -> io::Error {
        let cmd = match how {
            RebootHow::Restart => rustix::system::RebootCommand::Restart,
            RebootHow::PowerOff => rustix::system::RebootCommand::PowerOff,
        };
        match rustix::system::reboot(cmd) {
            Ok(()) => io::Error::other("reboot(2) returned without rebooting"),
            Err(errno) => errno.into(),
        }
    }

    fn exec(&self, path: &str, args: &[&str]) -> io::Error {
        let mut command = std::process::Command::new(path);
        if let Some((arg0, rest)) = args.split_first() {
            command.arg0(arg0).args(rest);
        }
        command.exec()
    }

    fn uname(&self) -> Uname {
        let uname = rustix::system::uname();
        Uname {
            release: uname.release().to_string_lossy().into_owned(),
            machine: uname.machine().to_string_lossy().into_owned(),
        }
    }

    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }

    fn unmount(&self, target: &Path, detach: bool) -> io::Result<()> {
        let flags = if detach {
            rustix::mount::UnmountFlags::DETACH
        } else {
            rustix::mount::UnmountFlags::empty()
        };
        rustix::mount::unmount(target, flags)?;
        Ok(())
    }

    fn remount_readonly(&self, target: &Path) -> io::Result<()> {
        rustix::mount::mount_remount(target, MountFlags::RDONLY, "")?;
        Ok(())
    }

    fn kill_all(&self, kill: bool) -> io::Result<()> {
        let sig = if kill {
            rustix::process::Signal::KILL
        } else {
            rustix::process::Signal::TERM
        };
        // kill(-1, sig): every process we may signal except ourselves.
        rustix::process::kill_process_group(rustix::process::Pid::INIT, sig)?;
        Ok(())
    }

    fn sethostname(&self, name: &str) -> io::Result<()> {
        rustix::system::sethostname(name.as_bytes())?;
        Ok(())
    }

    fn ctrl_alt_del_to_init(&self) -> io::Result<()> {
        rustix::system::reboot(rustix::system::RebootCommand::CadOff)?;
        Ok(())
    }

    fn swapoff(&self, path: &Path) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        // SAFETY: `path` is a valid NUL-terminated string that outlives the call;
        // swapoff(2) only reads it. rustix has no swapoff, so the C library's wrapper
        // (musl or glibc: the raw system call) is used.
        let rc = unsafe { libc::swapoff(path.as_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn blkpg(
        &self,
        disk: &Path,
        op: BlkpgOp,
        number: u32,
        start: u64,
        length: u64,
    ) -> io::Result<()> {
        let file = File::open(disk)?;
        let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "partition beyond 2^63");
        let mut partition = BlkpgPartition {
            start: i64::try_from(start).map_err(|_| too_big())?,
            length: i64::try_from(length).map_err(|_| too_big())?,
            pno: i32::try_from(number).map_err(|_| too_big())?,
            devname: [0; 64],
            volname: [0; 64],
        };
        let arg = BlkpgIoctlArg {
            op: match op {
                BlkpgOp::Add => 1,
                BlkpgOp::Resize => 3,
            },
            flags: 0,
            datalen: size_of::<BlkpgPartition>() as i32,
            data: std::ptr::from_mut(&mut partition).cast(),
        };
        // SAFETY: BLKPG is `_IO(0x12, 105)` and takes a pointer to `struct
        // blkpg_ioctl_arg` (linux/blkpg.h), which `BlkpgIoctlArg` mirrors with `repr(C)`;
        // its `data` points to `partition`, a `struct blkpg_partition` that lives until
        // the call returns and whose size is `datalen`. The kernel only reads both.
        unsafe {
            rustix::ioctl::ioctl(
                &file,
                rustix::ioctl::Setter::<BLKPG, BlkpgIoctlArg>::new(arg),
            )?
        };
        Ok(())
    }

    fn run_tool(&self, program: &str, args: &[&str]) -> io::Result<ToolOutput> {
        let out = std::process::Command::new(program)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin")
            .stdin(std::process::Stdio::null())
            .output()?;
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok(ToolOutput {
            code: out.status.code(),
            output,
        })
    }
}

/// `BLKPG` from linux/fs.h: `_IO(0x12, 105)`.
const BLKPG: rustix::ioctl::Opcode = 0x1269;

/// `struct blkpg_ioctl_arg` from linux/blkpg.h.
#[repr(C)]
struct BlkpgIoctlArg {
    op: i32,
    flags: i32,
    datalen: i32,
    data: *mut std::ffi::c_void,
}

/// `struct blkpg_partition` from linux/blkpg.h.
#[repr(C)]
struct BlkpgPartition {
    start: i64,
    length: i64,
    pno: i32,
    devname: [u8; 64],
    volname: [u8; 64],
}

/// Remove everything under `dir` that lives on device `dev`, without crossing into other
/// mounts (their mount points are kept, as are directories that still hold one). Errors
/// on single entries are skipped: freeing memory is best effort. Returns the bytes freed.
// The real system: stage 1 frees the initramfs before it switches roots.
#[allow(clippy::disallowed_methods)]
pub fn remove_same_fs(dir: &Path, dev: u64) -> io::Result<u64> {
    let mut freed = 0;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            freed += remove_same_fs(&path, dev).unwrap_or(0);
            let _ = std::fs::remove_dir(&path);
        } else if std::fs::remove_file(&path).is_ok() {
            freed += meta.len();
        }
    }
    Ok(freed)
}

/// A device-mapper ioctl request: a read-write ioctl on a variable-length buffer that
/// starts with `struct dm_ioctl` (rustix's `Updater` wants a fixed-size type).
struct DmRequest<'a> {
    cmd: u8,
    buf: &'a mut [u8],
}

// SAFETY: the opcode encodes `_IOWR(DM_IOCTL, cmd, struct dm_ioctl)`, the pointer is to a
// buffer of at least `sizeof(struct dm_ioctl)` bytes whose `data_size` equals its length
// (checked by the caller), the kernel may write into it (IS_MUTATING), and there is no
// output beyond the buffer itself.
unsafe impl rustix::ioctl::Ioctl for DmRequest<'_> {
    type Output = ();

    const IS_MUTATING: bool = true;

    fn opcode(&self) -> rustix::ioctl::Opcode {
        crate::dm_abi::opcode(self.cmd)
    }

    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        self.buf.as_mut_ptr().cast()
    }

    unsafe fn output_from_ptr(
        _out: rustix::ioctl::IoctlOutput,
        _extract_output: *mut std::ffi::c_void,
    ) -> rustix::io::Result<()> {
        Ok(())
    }
}

/// Sixteen random bytes from `/dev/urandom`, which never blocks. When it cannot be read,
/// bytes made from the clock and the process id instead, with the error, so the caller
/// can say what it fell back to.
pub fn random_bytes(sys: &dyn Syscalls) -> ([u8; 16], Option<io::Error>) {
    let mut raw = [0u8; 16];
    match sys
        .open_read(Path::new("/dev/urandom"))
        .and_then(|mut r| r.read_exact(&mut raw))
    {
        Ok(()) => (raw, None),
        Err(e) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            (
                (nanos ^ u128::from(std::process::id())).to_le_bytes(),
                Some(e),
            )
        }
    }
}

/// The errno name of an I/O error (`ENOENT`), or its text when it carries no errno.
pub fn errno_name(err: &io::Error) -> String {
    let Some(code) = err.raw_os_error() else {
        return err.to_string();
    };
    let name = match code {
        1 => "EPERM",
        2 => "ENOENT",
        5 => "EIO",
        6 => "ENXIO",
        11 => "EAGAIN",
        12 => "ENOMEM",
        13 => "EACCES",
        14 => "EFAULT",
        15 => "ENOTBLK",
        16 => "EBUSY",
        17 => "EEXIST",
        19 => "ENODEV",
        20 => "ENOTDIR",
        21 => "EISDIR",
        22 => "EINVAL",
        28 => "ENOSPC",
        30 => "EROFS",
        38 => "ENOSYS",
        61 => "ENODATA",
        74 => "EBADMSG",
        84 => "EILSEQ",
        95 => "EOPNOTSUPP",
        117 => "EUCLEAN",
        _ => return format!("errno {code}"),
    };
    format!("{name} ({code})")
}

#[cfg(test)]
// Tests build their fixtures on disk.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    #[test]
    fn kill_refuses_what_is_no_pid_or_no_signal_it_knows() {
        let einval = |r: io::Result<()>| r.err().and_then(|e| e.raw_os_error());
        assert_eq!(einval(Linux.kill_process(0, 9)), Some(22));
        assert_eq!(einval(Linux.kill_process(std::process::id(), 99)), Some(22));
    }

    #[test]
    fn removal_stays_on_one_filesystem() -> io::Result<()> {
        let dir = std::env::temp_dir().join(format!("keelson-init-rm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("modules"))?;
        std::fs::write(dir.join("init"), [0u8; 100])?;
        std::fs::write(dir.join("modules/a.ko"), [0u8; 50])?;
        let dev = std::fs::metadata(&dir)?.dev();
        // Another device number stands for another mount: nothing is removed.
        assert_eq!(remove_same_fs(&dir, dev + 1)?, 0);
        assert!(dir.join("init").exists());
        assert_eq!(remove_same_fs(&dir, dev)?, 150);
        assert_eq!(std::fs::read_dir(&dir)?.count(), 0);
        std::fs::remove_dir(&dir)
    }
}

#[cfg(test)]
pub mod fake {
    //! A recording fake of [`Syscalls`](super::Syscalls) for unit tests: it remembers
    //! every call in order and answers from what the test put into it.

    use super::*;
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::PathBuf;

    /// One recorded call.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        Mount {
            source: String,
            target: String,
            fstype: String,
            flags: MountFlags,
            data: String,
        },
        MountMove(String, String),
        Mkdir(String),
        Mknod(String, NodeKind, u32, u32),
        WriteFile(String, Vec<u8>),
        InstallFile(String, Vec<u8>, u32),
        RemoveFile(String),
        SetMode(String, u32),
        CreateDirAll(String),
        KillProcess(u32, i32),
        OpenRead(String),
        FinitModule(String, bool),
        DmIoctl(u8, Vec<u8>),
        FreeInitramfs,
        Chdir(String),
        Chroot(String),
        Sync,
        Reboot(RebootHow),
        Exec(String, Vec<String>),
        Sleep(Duration),
        Unmount(String, bool),
        RemountReadOnly(String),
        KillAll(bool),
        Sethostname(String),
        CtrlAltDelToInit,
        Swapoff(String),
        Blkpg {
            disk: String,
            op: BlkpgOp,
            number: u32,
            start: u64,
            length: u64,
        },
        RunTool(String, Vec<String>),
    }

    /// The fake system: files, mount points and canned errors, plus the call log.
    #[derive(Debug, Default)]
    pub struct Fake {
        pub calls: RefCell<Vec<Call>>,
        pub files: RefCell<BTreeMap<PathBuf, Vec<u8>>>,
        pub mount_points: RefCell<BTreeSet<PathBuf>>,
        /// Errno returned by `finit_module` per module path.
        pub module_errors: BTreeMap<PathBuf, i32>,
        /// Errno returned by `mount` per filesystem type.
        pub mount_errors: BTreeMap<String, i32>,
        /// Errno returned by `unmount` per target.
        pub unmount_errors: BTreeMap<PathBuf, i32>,
        /// Errno returned by `dm_ioctl` per command number.
        pub dm_errors: BTreeMap<u8, i32>,
        /// Bytes to write back into the buffer of a dm ioctl at the given offset.
        pub dm_answers: BTreeMap<u8, (usize, Vec<u8>)>,
        /// For `open_read`: the device size, and the offset where reads fail with EIO.
        pub device: Option<(u64, Option<u64>)>,
        /// When set, `write_file` behaves like the kernel's files: a path not in `files`
        /// is ENOENT, and what is written replaces the file's content (so it reads back).
        pub strict_writes: bool,
        /// Errno returned by `write_file` per path (with or without `strict_writes`).
        pub write_errors: BTreeMap<PathBuf, i32>,
        /// Errno returned by `swapoff` per path; a successful swapoff removes the path's
        /// line from `/proc/swaps` in `files`.
        pub swapoff_errors: BTreeMap<PathBuf, i32>,
        /// Errno returned by `blkpg` per partition number.
        pub blkpg_errors: BTreeMap<u32, i32>,
        /// What `run_tool` answers per program (success with no output otherwise).
        pub tool_results: BTreeMap<String, ToolOutput>,
        /// For `open_read`: the bytes a path reads (instead of the zero `device`).
        pub read_data: BTreeMap<PathBuf, Vec<u8>>,
        /// What `canonicalize` answers per path (ENOENT for any other).
        pub links: BTreeMap<PathBuf, PathBuf>,
        /// A real directory tree the fake goes through to (a test's sysfs fixture, or
        /// the root a live apply writes under): every file call for a path under it
        /// (`exists`, `read_file`, `read_dir_names`, `canonicalize`, `file_mode`,
        /// `install_file`, `remove_file`, `set_mode`, `create_dir_all`) is recorded as
        /// usual and then made on the real filesystem.
        pub real_root: Option<PathBuf>,
        /// What `wait_child` reaps, in order; once empty it answers ECHILD.
        pub ended: RefCell<std::collections::VecDeque<(u32, ExitInfo)>>,
    }

    impl Fake {
        pub fn new() -> Fake {
            Fake::default()
        }

        /// The fake, reading the real tree under `root` (see [`Fake::real_root`]).
        pub fn reading_real(mut self, root: &Path) -> Fake {
            self.real_root = Some(root.to_path_buf());
            self
        }

        fn is_real(&self, path: &Path) -> bool {
            self.real_root.as_ref().is_some_and(|r| path.starts_with(r))
        }

        pub fn with_file(self, path: &str, content: &str) -> Fake {
            self.files
                .borrow_mut()
                .insert(PathBuf::from(path), content.as_bytes().to_vec());
            self
        }

        pub fn calls(&self) -> Vec<Call> {
            self.calls.borrow().clone()
        }

        fn record(&self, call: Call) {
            self.calls.borrow_mut().push(call);
        }
    }

    fn s(path: &Path) -> String {
        path.display().to_string()
    }

    /// A reader over a device of `size` zero bytes that fails with EIO at `bad`.
    struct FakeDevice {
        pos: u64,
        size: u64,
        bad: Option<u64>,
    }

    impl Read for FakeDevice {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let end = self.size.min(self.pos + buf.len() as u64);
            let end = match self.bad {
                Some(bad) if bad >= self.pos && bad < end => {
                    if bad == self.pos {
                        return Err(io::Error::from_raw_os_error(5));
                    }
                    bad
                }
                _ => end,
            };
            let n = (end - self.pos) as usize;
            buf[..n].fill(0);
            self.pos = end;
            Ok(n)
        }
    }

    impl Syscalls for Fake {
        fn mount(
            &self,
            source: &str,
            target: &Path,
            fstype: &str,
            flags: MountFlags,
            data: &str,
        ) -> io::Result<()> {
            self.record(Call::Mount {
                source: source.into(),
                target: s(target),
                fstype: fstype.into(),
                flags,
                data: data.into(),
            });
            if let Some(errno) = self.mount_errors.get(fstype) {
                return Err(io::Error::from_raw_os_error(*errno));
            }
            self.mount_points.borrow_mut().insert(target.to_path_buf());
            Ok(())
        }

        fn mount_move(&self, from: &Path, to: &Path) -> io::Result<()> {
            self.record(Call::MountMove(s(from), s(to)));
            Ok(())
        }

        fn is_mount_point(&self, path: &Path) -> io::Result<bool> {
            Ok(self.mount_points.borrow().contains(path))
        }

        fn mkdir(&self, path: &Path, _mode: u32) -> io::Result<()> {
            self.record(Call::Mkdir(s(path)));
            Ok(())
        }

        fn mknod(
            &self,
            path: &Path,
            kind: NodeKind,
            _mode: u32,
            major: u32,
            minor: u32,
        ) -> io::Result<()> {
            self.record(Call::Mknod(s(path), kind, major, minor));
            Ok(())
        }

        fn exists(&self, path: &Path) -> bool {
            if self.is_real(path) {
                return Linux.exists(path);
            }
            self.files.borrow().contains_key(path)
        }

        fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
            if self.is_real(path) {
                return Linux.read_file(path);
            }
            self.files
                .borrow()
                .get(path)
                .cloned()
                .ok_or_else(|| io::Error::from_raw_os_error(2))
        }

        fn write_file(&self, path: &Path, data: &[u8]) -> io::Result<()> {
            self.record(Call::WriteFile(s(path), data.to_vec()));
            if let Some(errno) = self.write_errors.get(path) {
                return Err(io::Error::from_raw_os_error(*errno));
            }
            if self.strict_writes {
                let mut files = self.files.borrow_mut();
                let Some(content) = files.get_mut(path) else {
                    return Err(io::Error::from_raw_os_error(2));
                };
                *content = data.to_vec();
            }
            Ok(())
        }

        fn install_file(&self, path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
            self.record(Call::InstallFile(s(path), data.to_vec(), mode));
            if let Some(errno) = self.write_errors.get(path) {
                return Err(io::Error::from_raw_os_error(*errno));
            }
            if self.is_real(path) {
                return Linux.install_file(path, data, mode);
            }
            self.files
                .borrow_mut()
                .insert(path.to_path_buf(), data.to_vec());
            Ok(())
        }

        fn remove_file(&self, path: &Path) -> io::Result<()> {
            self.record(Call::RemoveFile(s(path)));
            if self.is_real(path) {
                return Linux.remove_file(path);
            }
            match self.files.borrow_mut().remove(path) {
                Some(_) => Ok(()),
                None => Err(io::Error::from_raw_os_error(2)),
            }
        }

        fn set_mode(&self, path: &Path, mode: u32) -> io::Result<()> {
            self.record(Call::SetMode(s(path), mode));
            if self.is_real(path) {
                return Linux.set_mode(path, mode);
            }
            Ok(())
        }

        fn file_mode(&self, path: &Path) -> io::Result<u32> {
            if self.is_real(path) {
                return Linux.file_mode(path);
            }
            match self.files.borrow().contains_key(path) {
                true => Ok(0o644),
                false => Err(io::Error::from_raw_os_error(2)),
            }
        }

        fn create_dir_all(&self, path: &Path) -> io::Result<()> {
            self.record(Call::CreateDirAll(s(path)));
            if self.is_real(path) {
                return Linux.create_dir_all(path);
            }
            Ok(())
        }

        /// The first components below `path` of the fake's files; ENOENT when none.
        fn read_dir_names(&self, path: &Path) -> io::Result<Vec<String>> {
            if self.is_real(path) {
                return Linux.read_dir_names(path);
            }
            let names: BTreeSet<String> = self
                .files
                .borrow()
                .keys()
                .filter_map(|file| file.strip_prefix(path).ok())
                .filter_map(|rest| rest.components().next())
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if names.is_empty() {
                return Err(io::Error::from_raw_os_error(2));
            }
            Ok(names.into_iter().collect())
        }

        fn kill_process(&self, pid: u32, signal: i32) -> io::Result<()> {
            self.record(Call::KillProcess(pid, signal));
            Ok(())
        }

        fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
            if self.is_real(path) {
                return Linux.canonicalize(path);
            }
            self.links
                .get(path)
                .cloned()
                .ok_or_else(|| io::Error::from_raw_os_error(2))
        }

        fn wait_child(&self, pid: Option<u32>) -> io::Result<Option<(u32, ExitInfo)>> {
            let mut ended = self.ended.borrow_mut();
            let at = match pid {
                Some(p) => ended.iter().position(|(q, _)| *q == p),
                None => (!ended.is_empty()).then_some(0),
            };
            match at.and_then(|i| ended.remove(i)) {
                Some(child) => Ok(Some(child)),
                None => Err(io::Error::from_raw_os_error(10)),
            }
        }

        fn open_read_at(
            &self,
            path: &Path,
            offset: u64,
            _direct: bool,
        ) -> io::Result<Box<dyn Read + Send>> {
            self.record(Call::OpenRead(s(path)));
            if let Some(data) = self.read_data.get(path) {
                let mut cursor = io::Cursor::new(data.clone());
                cursor.set_position(offset);
                return Ok(Box::new(cursor));
            }
            let (size, bad) = self.device.unwrap_or((0, None));
            Ok(Box::new(FakeDevice {
                pos: offset.min(size),
                size,
                bad,
            }))
        }

        fn finit_module(&self, path: &Path, _params: &str, compressed: bool) -> io::Result<()> {
            self.record(Call::FinitModule(s(path), compressed));
            match self.module_errors.get(path) {
                Some(errno) => Err(io::Error::from_raw_os_error(*errno)),
                None => Ok(()),
            }
        }

        fn dm_ioctl(&self, _control: &Path, cmd: u8, buf: &mut [u8]) -> io::Result<()> {
            self.record(Call::DmIoctl(cmd, buf.to_vec()));
            if let Some(errno) = self.dm_errors.get(&cmd) {
                return Err(io::Error::from_raw_os_error(*errno));
            }
            if let Some((offset, bytes)) = self.dm_answers.get(&cmd) {
                buf[*offset..*offset + bytes.len()].copy_from_slice(bytes);
            }
            Ok(())
        }

        fn free_initramfs(&self) -> io::Result<u64> {
            self.record(Call::FreeInitramfs);
            Ok(4096)
        }

        fn chdir(&self, path: &Path) -> io::Result<()> {
            self.record(Call::Chdir(s(path)));
            Ok(())
        }

        fn chroot(&self, path: &Path) -> io::Result<()> {
            self.record(Call::Chroot(s(path)));
            Ok(())
        }

        fn sync(&self) {
            self.record(Call::Sync);
        }

        fn reboot(&self, how: RebootHow) -> io::Error {
            self.record(Call::Reboot(how));
            io::Error::other("fake reboot")
        }

        fn exec(&self, path: &str, args: &[&str]) -> io::Error {
            self.record(Call::Exec(
                path.into(),
                args.iter().map(|a| a.to_string()).collect(),
            ));
            io::Error::other("fake exec")
        }

        fn uname(&self) -> Uname {
            Uname {
                release: "6.12.0-test".into(),
                machine: "x86_64".into(),
            }
        }

        fn sleep(&self, duration: Duration) {
            self.record(Call::Sleep(duration));
        }

        fn unmount(&self, target: &Path, detach: bool) -> io::Result<()> {
            self.record(Call::Unmount(s(target), detach));
            match self.unmount_errors.get(target) {
                Some(errno) => Err(io::Error::from_raw_os_error(*errno)),
                None => {
                    self.mount_points.borrow_mut().remove(target);
                    Ok(())
                }
            }
        }

        fn remount_readonly(&self, target: &Path) -> io::Result<()> {
            self.record(Call::RemountReadOnly(s(target)));
            Ok(())
        }

        fn kill_all(&self, kill: bool) -> io::Result<()> {
            self.record(Call::KillAll(kill));
            Ok(())
        }

        fn sethostname(&self, name: &str) -> io::Result<()> {
            self.record(Call::Sethostname(name.into()));
            Ok(())
        }

        fn ctrl_alt_del_to_init(&self) -> io::Result<()> {
            self.record(Call::CtrlAltDelToInit);
            Ok(())
        }

        fn swapoff(&self, path: &Path) -> io::Result<()> {
            self.record(Call::Swapoff(s(path)));
            if let Some(errno) = self.swapoff_errors.get(path) {
                return Err(io::Error::from_raw_os_error(*errno));
            }
            let swaps = PathBuf::from("/proc/swaps");
            let mut files = self.files.borrow_mut();
            if let Some(text) = files.get_mut(&swaps) {
                let name = s(path);
                let kept: Vec<&str> = std::str::from_utf8(text)
                    .unwrap_or("")
                    .lines()
                    .filter(|l| l.split_whitespace().next() != Some(name.as_str()))
                    .collect();
                *text = format!("{}\n", kept.join("\n")).into_bytes();
            }
            Ok(())
        }

        fn blkpg(
            &self,
            disk: &Path,
            op: BlkpgOp,
            number: u32,
            start: u64,
            length: u64,
        ) -> io::Result<()> {
            self.record(Call::Blkpg {
                disk: s(disk),
                op,
                number,
                start,
                length,
            });
            match self.blkpg_errors.get(&number) {
                Some(errno) => Err(io::Error::from_raw_os_error(*errno)),
                None => Ok(()),
            }
        }

        fn run_tool(&self, program: &str, args: &[&str]) -> io::Result<ToolOutput> {
            self.record(Call::RunTool(
                program.into(),
                args.iter().map(|a| a.to_string()).collect(),
            ));
            Ok(self
                .tool_results
                .get(program)
                .cloned()
                .unwrap_or(ToolOutput {
                    code: Some(0),
                    output: String::new(),
                }))
        }
    }
}
