//! The hardware watchdog: a hang of PID 1 (or of the kernel under it) becomes a reset,
//! which the boot loader's counter then counts against the slot.
//!
//! Stage 1 loads the watchdog's modules ([`MODULES`]: QEMU's `i6300esb`, and the
//! watchdog core where it is a module) without `async_probe`, so that the device is
//! there once `finit_module` returns, opens [`DEVICE`] and sets its timeout
//! (`keelson.watchdog=SECS` on the command line, default [`DEFAULT_TIMEOUT`]; `0`
//! arms nothing). Opening the device starts it. The descriptor is opened without
//! `O_CLOEXEC` and its number given to stage 2 as [`FD_ARG`]`N`: stage 2 adopts it
//! (marking it close-on-exec, so that no service inherits it) and pings it from its main
//! loop ([`next_event`]) every [`PING_EVERY`] (a third of a shorter timeout), so a loop
//! that stalls longer than the timeout resets the machine. A clean power-off or reboot
//! closes it with the magic character ([`Watchdog::disarm`]) just before reboot(2), so a
//! machine that powers off stays off. A machine without a watchdog device arms nothing,
//! and stage 1 says so once.
//!
//! The device's calls are behind [`Device`]: [`DevWatchdog`] is the kernel's
//! (`WDIOC_*` ioctls from `linux/watchdog.h`), the tests' fake records.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use keelson_configs::layout::{cmdline_value, parse_cmdline};
use rustix::ioctl::{Opcode, Updater, opcode};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::console::Log;
use crate::modules;
use crate::syscalls::{Syscalls, errno_name};

/// Kernel command-line key: the watchdog's timeout in seconds; `0` arms nothing.
pub const CMDLINE_WATCHDOG: &str = "keelson.watchdog";
/// The timeout when the command line names none, in seconds.
pub const DEFAULT_TIMEOUT: u32 = 60;
/// How often stage 2 pings the watchdog at most (more often under a timeout below
/// three times this).
pub const PING_EVERY: Duration = Duration::from_secs(10);
/// The shortest interval between pings, whatever the timeout.
pub const PING_AT_LEAST_EVERY: Duration = Duration::from_millis(100);
/// The first watchdog device (the legacy misc node, 10:130).
pub const DEVICE: &str = "/dev/watchdog";
/// The modules stage 1 loads for it, when the initramfs carries them: the watchdog
/// core (a module on amd64) and QEMU's Intel 6300ESB.
pub const MODULES: [&str; 2] = ["watchdog", "i6300esb"];
/// Stage 2's argument naming the descriptor stage 1 armed: `--watchdog-fd=N`.
pub const FD_ARG: &str = "--watchdog-fd=";
/// How long stage 1 waits for [`DEVICE`] once sysfs shows a watchdog (devtmpfs).
pub const DEVICE_WAIT: Duration = Duration::from_secs(1);
/// How often it looks.
pub const DEVICE_POLL: Duration = Duration::from_millis(20);
/// What sysfs lists the watchdogs in, under its mount.
pub const SYSFS_CLASS: &str = "class/watchdog";
/// The character written before the close that stops the watchdog (`WDIOF_MAGICCLOSE`).
pub const MAGIC_CLOSE: &[u8] = b"V";

/// The misc device numbers of [`DEVICE`] (`WATCHDOG_MINOR`).
const MISC_MAJOR: u32 = 10;
const WATCHDOG_MINOR: u32 = 130;

/// What the command line asks of the watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// `keelson.watchdog=0`: arm nothing.
    Off,
    /// Arm it with this timeout, in seconds.
    Timeout(u32),
}

/// The setting on `cmdline`; a value that is not a number of seconds gives the default,
/// with the line that says so.
pub fn setting(cmdline: &str) -> (Setting, Option<String>) {
    let args = parse_cmdline(cmdline);
    match cmdline_value(&args, CMDLINE_WATCHDOG) {
        None => (Setting::Timeout(DEFAULT_TIMEOUT), None),
        Some(value) => match value.parse::<u32>() {
            Ok(0) => (Setting::Off, None),
            Ok(seconds) => (Setting::Timeout(seconds), None),
            Err(_) => (
                Setting::Timeout(DEFAULT_TIMEOUT),
                Some(format!(
                    "{CMDLINE_WATCHDOG}={value:?} is not a number of seconds: the watchdog gets {DEFAULT_TIMEOUT} s (0 arms none)"
                )),
            ),
        },
    }
}

/// How often to ping a watchdog of `timeout` seconds: [`PING_EVERY`], or a third of the
/// timeout when that is shorter (two pings may be late before it fires), never more
/// often than [`PING_AT_LEAST_EVERY`].
pub fn ping_interval(timeout: u32) -> Duration {
    (Duration::from_secs(u64::from(timeout)) / 3)
        .min(PING_EVERY)
        .max(PING_AT_LEAST_EVERY)
}

/// A watchdog device's calls.
pub trait Device: Send {
    /// Set the timeout (`WDIOC_SETTIMEOUT`); the timeout the device took (it may round).
    fn set_timeout(&mut self, seconds: u32) -> io::Result<u32>;
    /// The timeout in effect (`WDIOC_GETTIMEOUT`).
    fn timeout(&mut self) -> io::Result<u32>;
    /// The device's name (`WDIOC_GETSUPPORT`'s identity, e.g. `i6300ESB timer`).
    fn identity(&mut self) -> io::Result<String>;
    /// Restart its countdown (`WDIOC_KEEPALIVE`).
    fn keepalive(&mut self) -> io::Result<()>;
    /// Write the magic character and close: the driver stops the watchdog.
    fn magic_close(self: Box<Self>) -> io::Result<()>;
    /// The descriptor, for stage 2 to adopt after the exec (`None` for a fake).
    fn raw_fd(&self) -> Option<RawFd>;
}

/// `struct watchdog_info` (`linux/watchdog.h`).
#[repr(C)]
#[derive(Debug, Default)]
struct WatchdogInfo {
    options: u32,
    firmware_version: u32,
    identity: [u8; 32],
}

const WDIOC_GETSUPPORT: Opcode = opcode::read::<WatchdogInfo>(b'W', 0);
const WDIOC_KEEPALIVE: Opcode = opcode::read::<libc::c_int>(b'W', 5);
const WDIOC_SETTIMEOUT: Opcode = opcode::read_write::<libc::c_int>(b'W', 6);
const WDIOC_GETTIMEOUT: Opcode = opcode::read::<libc::c_int>(b'W', 7);

/// The kernel's watchdog device, through its descriptor.
#[derive(Debug)]
pub struct DevWatchdog(OwnedFd);

impl DevWatchdog {
    /// Open `path` for stage 2 to inherit: without `O_CLOEXEC`. Opening starts it.
    pub fn open(path: &Path) -> io::Result<DevWatchdog> {
        let flags = rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::NOCTTY;
        let fd = rustix::fs::open(path, flags, rustix::fs::Mode::empty())?;
        Ok(DevWatchdog(fd))
    }

    /// A descriptor already open (tests give a pipe or a file: every ioctl is refused).
    pub fn from_fd(fd: OwnedFd) -> DevWatchdog {
        DevWatchdog(fd)
    }

    /// Adopt descriptor `fd`, inherited from stage 1: it must be open and be the
    /// watchdog's character device; it is made close-on-exec so no service inherits it.
    pub fn inherited(fd: RawFd) -> io::Result<DevWatchdog> {
        if fd <= 2 {
            return Err(io::Error::other("0, 1 and 2 are the console's"));
        }
        // SAFETY: F_GETFD reads the flags of a descriptor number and touches no memory;
        // for a number that is not open it fails with EBADF.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the descriptor is open (above); stage 1 opened it for stage 2 and passed
        // its number on our command line, and nothing else in this process owns it: it
        // was inherited across the exec, so no open of ours can have reused the number.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let stat = rustix::fs::fstat(&owned)?;
        let kind = rustix::fs::FileType::from_raw_mode(stat.st_mode);
        let rdev = stat.st_rdev;
        let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
        if kind != rustix::fs::FileType::CharacterDevice
            || (major, minor) != (MISC_MAJOR, WATCHDOG_MINOR)
        {
            // Not ours to close either: give the number back as it was.
            let _ = owned.into_raw_fd();
            return Err(io::Error::other(format!(
                "it is {kind:?} {major}:{minor}, not the character device {MISC_MAJOR}:{WATCHDOG_MINOR}"
            )));
        }
        rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
        Ok(DevWatchdog(owned))
    }

    /// One of the watchdog's `int` ioctls: `value` in, the kernel's value out.
    fn int_ioctl<const OPCODE: Opcode>(&self, value: libc::c_int) -> io::Result<libc::c_int> {
        let mut value = value;
        // SAFETY: OPCODE is one of WDIOC_KEEPALIVE, WDIOC_SETTIMEOUT, WDIOC_GETTIMEOUT,
        // each of which reads and/or writes one `int` at its argument, and `value` is an
        // initialised `int` that outlives the call.
        unsafe {
            rustix::ioctl::ioctl(
                self.0.as_fd(),
                Updater::<OPCODE, libc::c_int>::new(&mut value),
            )
        }?;
        Ok(value)
    }
}

impl Device for DevWatchdog {
    fn set_timeout(&mut self, seconds: u32) -> io::Result<u32> {
        let asked = libc::c_int::try_from(seconds)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let took = self.int_ioctl::<WDIOC_SETTIMEOUT>(asked)?;
        Ok(u32::try_from(took).unwrap_or(seconds))
    }

    fn timeout(&mut self) -> io::Result<u32> {
        let timeout = self.int_ioctl::<WDIOC_GETTIMEOUT>(0)?;
        u32::try_from(timeout).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    }

    fn identity(&mut self) -> io::Result<String> {
        let mut info = WatchdogInfo::default();
        // SAFETY: WDIOC_GETSUPPORT writes one `struct watchdog_info`, which
        // `WatchdogInfo` lays out (repr(C)); `info` outlives the call.
        unsafe {
            rustix::ioctl::ioctl(
                self.0.as_fd(),
                Updater::<WDIOC_GETSUPPORT, WatchdogInfo>::new(&mut info),
            )
        }?;
        let end = info
            .identity
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(info.identity.len());
        Ok(String::from_utf8_lossy(&info.identity[..end]).into_owned())
    }

    fn keepalive(&mut self) -> io::Result<()> {
        self.int_ioctl::<WDIOC_KEEPALIVE>(0).map(|_| ())
    }

    fn magic_close(self: Box<Self>) -> io::Result<()> {
        let written = rustix::io::write(&self.0, MAGIC_CLOSE)?;
        if written != MAGIC_CLOSE.len() {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        // The close (the drop) stops it.
        Ok(())
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.0.as_raw_fd())
    }
}

/// Opens the real device (stage 1's [`arm`] takes it, the tests a fake).
pub type Opener<'a> = &'a dyn Fn(&Path) -> io::Result<Box<dyn Device>>;

/// [`DevWatchdog::open`] as an [`Opener`].
pub fn open_device(path: &Path) -> io::Result<Box<dyn Device>> {
    Ok(Box::new(DevWatchdog::open(path)?))
}

/// An armed watchdog and its pings.
pub struct Watchdog {
    device: Box<dyn Device>,
    /// The timeout in effect, in seconds.
    timeout: u32,
    /// How often it is pinged.
    every: Duration,
    /// The last ping (or the arming).
    last_ping: Instant,
    /// A ping failed and was said; said again only once one has worked.
    failing: bool,
}

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdog")
            .field("fd", &self.device.raw_fd())
            .field("timeout", &self.timeout)
            .field("every", &self.every)
            .finish()
    }
}

impl Watchdog {
    /// A watchdog of `timeout` seconds, just pinged (at `now`).
    pub fn new(device: Box<dyn Device>, timeout: u32, now: Instant) -> Watchdog {
        Watchdog {
            device,
            timeout,
            every: ping_interval(timeout),
            last_ping: now,
            failing: false,
        }
    }

    /// The timeout in effect, in seconds.
    pub fn timeout(&self) -> u32 {
        self.timeout
    }

    /// How often it is pinged.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// When the next ping falls due.
    pub fn next_ping(&self) -> Instant {
        self.last_ping + self.every
    }

    /// Ping it if a ping is due at `now`.
    pub fn ping_if_due(&mut self, now: Instant, log: &dyn Log) {
        if now >= self.next_ping() {
            self.ping(now, log);
        }
    }

    /// Ping it now; a failure is said once (until a ping works again).
    pub fn ping(&mut self, now: Instant, log: &dyn Log) {
        match self.device.keepalive() {
            Ok(()) => {
                if self.failing {
                    log.line("watchdog: pings work again");
                }
                self.failing = false;
            }
            Err(e) if !self.failing => {
                log.line(&format!(
                    "watchdog: ping refused ({}): the machine resets within {} s unless a ping works",
                    errno_name(&e),
                    self.timeout
                ));
                self.failing = true;
            }
            Err(_) => {}
        }
        // A refused ping is tried again one interval later, not at once in a loop.
        self.last_ping = now;
    }

    /// Stage 2's argument naming the descriptor (`--watchdog-fd=N`), if it has one.
    pub fn exec_arg(&self) -> Option<String> {
        self.device.raw_fd().map(|fd| format!("{FD_ARG}{fd}"))
    }

    /// Stop it for a clean power-off or reboot: the magic character, then the close.
    pub fn disarm(self, log: &dyn Log) {
        match self.device.magic_close() {
            Ok(()) => log.line("watchdog stopped (magic close)"),
            Err(e) => log.line(&format!(
                "watchdog not stopped ({}): it resets the machine in {} s unless it goes down first",
                errno_name(&e),
                self.timeout
            )),
        }
    }
}

/// Take the watchdog's module files out of stage 1's load order (they are loaded first,
/// on their own, by [`arm`]); returns them in order.
pub fn take_modules(files: &mut Vec<String>) -> Vec<String> {
    let (ours, rest): (Vec<String>, Vec<String>) = std::mem::take(files)
        .into_iter()
        .partition(|f| MODULES.contains(&modules::module_name(f).as_str()));
    *files = rest;
    ours
}

/// Where stage 1 finds the watchdog.
#[derive(Debug, Clone, Copy)]
pub struct Places<'a> {
    /// The initramfs's module directory.
    pub modules_dir: &'a Path,
    /// The sysfs mount.
    pub sysfs: &'a Path,
    /// The device node ([`DEVICE`]).
    pub device: &'a Path,
}

/// Stage 1: load the watchdog's `files`, open the device and set its timeout as
/// `cmdline` asks. The armed watchdog, or `None` (said once) when there is none.
pub fn arm(
    sys: &dyn Syscalls,
    log: &dyn Log,
    cmdline: &str,
    files: &[String],
    places: Places<'_>,
    open: Opener<'_>,
) -> Option<Watchdog> {
    let (setting, note) = setting(cmdline);
    if let Some(note) = note {
        log.line(&note);
    }
    let Setting::Timeout(seconds) = setting else {
        log.line(&format!(
            "watchdog off ({CMDLINE_WATCHDOG}=0): a hang is not reset"
        ));
        return None;
    };
    // Without async_probe: the device is probed (and its node made) inside the call.
    let mut report = modules::Report::default();
    modules::load_files(sys, log, places.modules_dir, files, "", &mut report);
    if !wait_for_device(sys, places) {
        let names = if files.is_empty() {
            "the initramfs carries no watchdog driver".to_string()
        } else {
            format!("{} loaded", MODULES.join(", "))
        };
        log.line(&format!(
            "no watchdog: {} does not exist ({names}); nothing is armed, so a hang is not reset on this machine",
            places.device.display()
        ));
        return None;
    }
    let mut device = match open(places.device) {
        Ok(device) => device,
        Err(e) => {
            log.line(&format!(
                "no watchdog: cannot open {}: {}; nothing is armed",
                places.device.display(),
                errno_name(&e)
            ));
            return None;
        }
    };
    // Open, it runs with the driver's own timeout: set ours at once.
    let timeout = match device.set_timeout(seconds) {
        Ok(took) => took,
        Err(e) => {
            let kept = device.timeout().unwrap_or(0);
            log.line(&format!(
                "watchdog {}: timeout {seconds} s refused ({}): it keeps its own, {kept} s",
                places.device.display(),
                errno_name(&e)
            ));
            kept
        }
    };
    let mut watchdog = Watchdog::new(device, timeout, Instant::now());
    watchdog.ping(Instant::now(), log);
    let identity = watchdog
        .device
        .identity()
        .unwrap_or_else(|e| format!("identity unknown: {}", errno_name(&e)));
    log.line(&format!(
        "watchdog armed: {}, {timeout} s ({identity}); stage 2 pings it every {} s",
        places.device.display(),
        watchdog.every().as_secs_f64()
    ));
    Some(watchdog)
}

/// Whether the device node is there: at once when sysfs lists no watchdog (there is
/// none to wait for), else within [`DEVICE_WAIT`] (devtmpfs makes the node).
fn wait_for_device(sys: &dyn Syscalls, places: Places<'_>) -> bool {
    if sys.exists(places.device) {
        return true;
    }
    let listed = sys
        .read_dir_names(&places.sysfs.join(SYSFS_CLASS))
        .is_ok_and(|names| !names.is_empty());
    if !listed {
        return false;
    }
    let mut waited = Duration::ZERO;
    while waited < DEVICE_WAIT {
        sys.sleep(DEVICE_POLL);
        waited += DEVICE_POLL;
        if sys.exists(places.device) {
            return true;
        }
    }
    false
}

/// The descriptor stage 1 named in our arguments (`--watchdog-fd=N`), if any.
pub fn fd_from_args<I: IntoIterator<Item = String>>(args: I) -> Option<Result<RawFd, String>> {
    let value = args
        .into_iter()
        .skip(1)
        .find_map(|a| a.strip_prefix(FD_ARG).map(str::to_string))?;
    Some(value.parse::<RawFd>().map_err(|_| value))
}

/// Stage 2: adopt the watchdog stage 1 armed (named in `args`) and ping it at once.
/// `None` when stage 1 armed none (it said why), or when the descriptor is not a
/// watchdog (said here).
pub fn adopt<I: IntoIterator<Item = String>>(args: I, log: &dyn Log) -> Option<Watchdog> {
    let fd = match fd_from_args(args)? {
        Ok(fd) => fd,
        Err(value) => {
            log.line(&format!(
                "watchdog: {FD_ARG}{value:?} is not a descriptor number: not pinged, so the machine resets once its timeout passes"
            ));
            return None;
        }
    };
    let mut device = match DevWatchdog::inherited(fd) {
        Ok(device) => device,
        Err(e) => {
            log.line(&format!(
                "watchdog: descriptor {fd} from stage 1 is not {DEVICE} ({}): not pinged",
                errno_name(&e)
            ));
            return None;
        }
    };
    let timeout = device.timeout().unwrap_or(DEFAULT_TIMEOUT);
    let mut watchdog = Watchdog::new(Box::new(device), timeout, Instant::now());
    watchdog.ping(Instant::now(), log);
    log.line(&format!(
        "watchdog {DEVICE} ({timeout} s) pinged every {} s from the main loop",
        watchdog.every().as_secs_f64()
    ));
    Some(watchdog)
}

/// Stage 2's wait for its next event: the watchdog is pinged whenever a ping falls due
/// first, and before an event is handed over when one is due, so it is pinged as long
/// as the loop comes back here; a handler that never returns lets it reset the machine.
pub async fn next_event<T>(
    rx: &mut UnboundedReceiver<T>,
    watchdog: Option<&mut Watchdog>,
    log: &dyn Log,
) -> Option<T> {
    let Some(watchdog) = watchdog else {
        return rx.recv().await;
    };
    loop {
        watchdog.ping_if_due(Instant::now(), log);
        let due = tokio::time::Instant::from_std(watchdog.next_ping());
        tokio::select! {
            event = rx.recv() => return event,
            () = tokio::time::sleep_until(due) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::memory::MemoryLog;
    use crate::syscalls::fake::{Call, Fake};
    use std::sync::{Arc, Mutex};

    /// A device that records its calls; `refuse` makes each call fail with that errno.
    #[derive(Debug, Default, Clone)]
    struct FakeDevice {
        calls: Arc<Mutex<Vec<String>>>,
        timeout: u32,
        refuse: Arc<Mutex<Option<i32>>>,
        refuse_set: bool,
    }

    impl FakeDevice {
        fn calls(&self) -> Vec<String> {
            self.calls.lock().map(|c| c.clone()).unwrap_or_default()
        }

        fn record(&self, call: String) -> io::Result<()> {
            if let Ok(mut calls) = self.calls.lock() {
                calls.push(call);
            }
            match self.refuse.lock().ok().and_then(|r| *r) {
                Some(errno) => Err(io::Error::from_raw_os_error(errno)),
                None => Ok(()),
            }
        }

        fn refuse(&self, errno: Option<i32>) {
            if let Ok(mut refuse) = self.refuse.lock() {
                *refuse = errno;
            }
        }
    }

    impl Device for FakeDevice {
        fn set_timeout(&mut self, seconds: u32) -> io::Result<u32> {
            self.record(format!("set_timeout {seconds}"))?;
            if self.refuse_set {
                return Err(io::Error::from_raw_os_error(22));
            }
            self.timeout = seconds;
            Ok(seconds)
        }

        fn timeout(&mut self) -> io::Result<u32> {
            self.record("timeout".into())?;
            Ok(self.timeout)
        }

        fn identity(&mut self) -> io::Result<String> {
            Ok("fake timer".into())
        }

        fn keepalive(&mut self) -> io::Result<()> {
            self.record("keepalive".into())
        }

        fn magic_close(self: Box<Self>) -> io::Result<()> {
            self.record("magic close".into())
        }

        fn raw_fd(&self) -> Option<RawFd> {
            Some(7)
        }
    }

    fn check_setting(cmdline: &str, expected: Setting, note: bool) {
        let (got, said) = setting(cmdline);
        assert_eq!(
            (got, said.is_some()),
            (expected, note),
            "{cmdline}: {said:?}"
        );
    }

    #[test]
    fn the_timeout_comes_from_the_command_line() {
        check_setting("console=ttyS0", Setting::Timeout(60), false);
        check_setting("keelson.watchdog=30", Setting::Timeout(30), false);
        check_setting("keelson.watchdog=0", Setting::Off, false);
        check_setting(
            "keelson.watchdog=0 keelson.watchdog=90",
            Setting::Timeout(90),
            false,
        );
        check_setting("keelson.watchdog=1m", Setting::Timeout(60), true);
        check_setting("keelson.watchdog=-5", Setting::Timeout(60), true);
        check_setting("keelson.watchdog=", Setting::Timeout(60), true);
        assert_eq!(
            setting("keelson.watchdog=1m").1.as_deref(),
            Some(
                "keelson.watchdog=\"1m\" is not a number of seconds: the watchdog gets 60 s (0 arms none)"
            )
        );
    }

    #[test]
    fn pings_come_every_ten_seconds_or_three_times_per_shorter_timeout() {
        let ms = Duration::from_millis;
        assert_eq!(ping_interval(60), ms(10_000));
        assert_eq!(ping_interval(2046), ms(10_000));
        assert_eq!(ping_interval(30), ms(10_000));
        assert_eq!(ping_interval(15), ms(5_000));
        assert_eq!(ping_interval(1), ms(333) + Duration::from_nanos(333_333));
        assert_eq!(ping_interval(0), ms(100));
    }

    #[test]
    fn a_ping_falls_due_one_interval_after_the_last_and_a_failure_is_said_once() {
        let device = FakeDevice::default();
        let log = MemoryLog::default();
        let t0 = Instant::now();
        let mut watchdog = Watchdog::new(Box::new(device.clone()), 60, t0);
        assert_eq!(watchdog.next_ping(), t0 + Duration::from_secs(10));
        watchdog.ping_if_due(t0 + Duration::from_millis(9_999), &log);
        assert!(device.calls().is_empty());
        watchdog.ping_if_due(t0 + Duration::from_secs(10), &log);
        assert_eq!(device.calls(), ["keepalive"]);
        assert_eq!(watchdog.next_ping(), t0 + Duration::from_secs(20));
        // A late loop pings once, and the next falls due an interval after that ping.
        watchdog.ping_if_due(t0 + Duration::from_secs(35), &log);
        assert_eq!(watchdog.next_ping(), t0 + Duration::from_secs(45));
        device.refuse(Some(5));
        watchdog.ping_if_due(t0 + Duration::from_secs(45), &log);
        watchdog.ping_if_due(t0 + Duration::from_secs(55), &log);
        device.refuse(None);
        watchdog.ping_if_due(t0 + Duration::from_secs(65), &log);
        assert_eq!(device.calls().len(), 5);
        assert_eq!(
            log.lines(),
            [
                "keelson-init: watchdog: ping refused (EIO (5)): the machine resets within 60 s unless a ping works",
                "keelson-init: watchdog: pings work again",
            ]
        );
        assert_eq!(watchdog.exec_arg().as_deref(), Some("--watchdog-fd=7"));
        watchdog.disarm(&log);
        assert_eq!(
            device.calls().last().map(String::as_str),
            Some("magic close")
        );
    }

    fn places() -> Places<'static> {
        Places {
            modules_dir: Path::new("/modules"),
            sysfs: Path::new("/sys"),
            device: Path::new(DEVICE),
        }
    }

    fn files() -> Vec<String> {
        vec!["watchdog.ko".to_string(), "i6300esb.ko".to_string()]
    }

    #[test]
    fn stage_1_loads_the_driver_opens_the_device_and_sets_the_timeout() {
        let sys = Fake::new().with_file(DEVICE, "");
        let log = MemoryLog::default();
        let device = FakeDevice::default();
        let opened = device.clone();
        let open = move |path: &Path| -> io::Result<Box<dyn Device>> {
            assert_eq!(path, Path::new(DEVICE));
            Ok(Box::new(opened.clone()))
        };
        let armed = arm(&sys, &log, "keelson.watchdog=45", &files(), places(), &open);
        assert_eq!(armed.map(|w| w.timeout()), Some(45));
        assert_eq!(
            sys.calls(),
            [
                Call::FinitModule("/modules/watchdog.ko".into(), false),
                Call::FinitModule("/modules/i6300esb.ko".into(), false),
            ]
        );
        assert_eq!(device.calls(), ["set_timeout 45", "keepalive"]);
        assert!(
            log.lines().contains(
                &"keelson-init: watchdog armed: /dev/watchdog, 45 s (fake timer); stage 2 pings it every 10 s"
                    .to_string()
            ),
            "{:?}",
            log.lines()
        );
    }

    #[test]
    fn a_refused_timeout_keeps_the_device_s_own() {
        let sys = Fake::new().with_file(DEVICE, "");
        let log = MemoryLog::default();
        let device = FakeDevice {
            timeout: 30,
            refuse_set: true,
            ..FakeDevice::default()
        };
        let opened = device.clone();
        let open = move |_: &Path| -> io::Result<Box<dyn Device>> { Ok(Box::new(opened.clone())) };
        let armed = arm(
            &sys,
            &log,
            "keelson.watchdog=5000",
            &files(),
            places(),
            &open,
        );
        assert_eq!(armed.map(|w| w.timeout()), Some(30));
        assert_eq!(device.calls(), ["set_timeout 5000", "timeout", "keepalive"]);
        assert!(
            log.lines().contains(
                &"keelson-init: watchdog /dev/watchdog: timeout 5000 s refused (EINVAL (22)): it keeps its own, 30 s"
                    .to_string()
            ),
            "{:?}",
            log.lines()
        );
    }

    #[test]
    fn without_a_device_or_when_off_nothing_is_armed_and_it_is_said_once() {
        let never = |_: &Path| -> io::Result<Box<dyn Device>> { panic!("opened") };
        // No watchdog in sysfs: no wait.
        let sys = Fake::new();
        let log = MemoryLog::default();
        assert!(arm(&sys, &log, "", &files(), places(), &never).is_none());
        assert!(!sys.calls().iter().any(|c| matches!(c, Call::Sleep(_))));
        assert_eq!(
            log.lines().last().map(String::as_str),
            Some(
                "keelson-init: no watchdog: /dev/watchdog does not exist (watchdog, i6300esb loaded); nothing is armed, so a hang is not reset on this machine"
            )
        );
        // Listed in sysfs, but no node within the wait.
        let sys = Fake::new().with_file("/sys/class/watchdog/watchdog0/dev", "10:130");
        let log = MemoryLog::default();
        assert!(arm(&sys, &log, "", &[], places(), &never).is_none());
        let sleeps = sys
            .calls()
            .iter()
            .filter(|c| matches!(c, Call::Sleep(_)))
            .count();
        assert_eq!(sleeps, 50);
        assert_eq!(
            log.lines(),
            [
                "keelson-init: no watchdog: /dev/watchdog does not exist (the initramfs carries no watchdog driver); nothing is armed, so a hang is not reset on this machine"
            ]
        );
        // Off: not even the driver is loaded.
        let sys = Fake::new().with_file(DEVICE, "");
        let log = MemoryLog::default();
        assert!(arm(&sys, &log, "keelson.watchdog=0", &files(), places(), &never).is_none());
        assert!(sys.calls().is_empty());
        assert_eq!(
            log.lines(),
            ["keelson-init: watchdog off (keelson.watchdog=0): a hang is not reset"]
        );
    }

    #[test]
    fn the_watchdog_modules_leave_the_load_order_in_their_order() {
        let mut files: Vec<String> = [
            "sha256_ssse3.ko",
            "watchdog.ko",
            "virtio_blk.ko",
            "i6300esb.ko",
            "dm-verity.ko",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(take_modules(&mut files), ["watchdog.ko", "i6300esb.ko"]);
        assert_eq!(files, ["sha256_ssse3.ko", "virtio_blk.ko", "dm-verity.ko"]);
        let mut none = vec!["virtio_blk.ko".to_string()];
        assert!(take_modules(&mut none).is_empty());
        assert_eq!(none, ["virtio_blk.ko"]);
    }

    #[test]
    fn the_descriptor_comes_from_stage_2_s_arguments() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            fd_from_args(args(&["/sbin/init", "--stage2", "--watchdog-fd=5"])),
            Some(Ok(5))
        );
        assert_eq!(fd_from_args(args(&["/sbin/init", "--stage2"])), None);
        assert_eq!(
            fd_from_args(args(&["/sbin/init", "--watchdog-fd=x"])),
            Some(Err("x".into()))
        );
        // argv[0] is never an argument.
        assert_eq!(fd_from_args(args(&["--watchdog-fd=5"])), None);
    }

    #[test]
    fn the_real_device_calls_reach_the_descriptor() -> io::Result<()> {
        // A pipe stands in for the device: every watchdog ioctl is refused (ENOTTY), and
        // the magic close is the one byte the other end reads.
        let (read, write) = rustix::pipe::pipe()?;
        let mut device = DevWatchdog::from_fd(write);
        let raw = device.raw_fd();
        assert!(raw.is_some_and(|fd| fd > 2));
        assert_eq!(
            device.keepalive().map_err(|e| e.raw_os_error()),
            Err(Some(libc::ENOTTY))
        );
        assert_eq!(
            device.set_timeout(60).map_err(|e| e.raw_os_error()),
            Err(Some(libc::ENOTTY))
        );
        assert_eq!(
            device.timeout().map_err(|e| e.raw_os_error()),
            Err(Some(libc::ENOTTY))
        );
        assert_eq!(
            device.identity().map_err(|e| e.raw_os_error()),
            Err(Some(libc::ENOTTY))
        );
        Box::new(device).magic_close()?;
        let mut buf = [0u8; 4];
        let n = rustix::io::read(&read, &mut buf)?;
        assert_eq!(&buf[..n], MAGIC_CLOSE);
        // Closed: the pipe reads its end.
        assert_eq!(rustix::io::read(&read, &mut buf)?, 0);
        Ok(())
    }

    #[test]
    fn only_the_watchdog_device_is_adopted_and_anything_else_is_left_open() -> io::Result<()> {
        let (read, write) = rustix::pipe::pipe()?;
        let fd = write.as_raw_fd();
        let refused = DevWatchdog::inherited(fd).map(|_| ());
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.to_string().contains("not the character device 10:130")),
            "{refused:?}"
        );
        // Still ours, still open: writing reaches the other end.
        assert_eq!(rustix::io::write(&write, b"x")?, 1);
        drop(read);
        assert!(DevWatchdog::inherited(1).is_err());
        // A number that is not open: EBADF, and nothing is taken.
        assert_eq!(
            DevWatchdog::inherited(1_000_000)
                .map(|_| ())
                .map_err(|e| e.raw_os_error()),
            Err(Some(libc::EBADF))
        );
        Ok(())
    }

    #[test]
    fn the_main_loop_s_wait_pings_while_no_event_comes() -> io::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let device = FakeDevice::default();
        let log = MemoryLog::default();
        // A timeout of 0 s pings every 100 ms.
        let mut watchdog = Watchdog::new(Box::new(device.clone()), 0, Instant::now());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let event = runtime.block_on(async {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(450)).await;
                let _ = tx.send("event");
            });
            next_event(&mut rx, Some(&mut watchdog), &log).await
        });
        assert_eq!(event, Some("event"));
        let pings = device.calls().len();
        assert!((3..=5).contains(&pings), "{pings} pings");
        // Without a watchdog the wait is the channel's.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _ = tx.send(1);
        assert_eq!(runtime.block_on(next_event(&mut rx, None, &log)), Some(1));
        Ok(())
    }
}
