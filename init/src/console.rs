//! The boot log: one line per event, on the console and in the kernel log.
//!
//! Every line goes to `/dev/console` (unthrottled, visible whatever the kernel's log
//! level) prefixed with `keelson-init: `, and to `/dev/kmsg` at `KERN_DEBUG` so it is
//! kept in the kernel's ring buffer (for `dmesg` and, later, the API) without the kernel
//! echoing it to the console a second time at the default log level. Before `/dev` is
//! mounted, lines go to standard error, which the kernel opened on its console for us.
//!
//! The console is opened non-blocking, and a write waits for it with `poll` at most the
//! [`Console`]'s patience: [`WRITE_PATIENCE`] where PID 1 writes it directly (stage 1, a
//! fatal error, the panic hook), so that a stalled console can never hang PID 1; without
//! limit on stage 2's console writer thread ([`writer`]), which alone waits for it while
//! its bounded queue ([`queue`]) drops and counts what does not fit.

pub mod queue;
pub mod writer;

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// The prefix of every line we print.
pub const PREFIX: &str = "keelson-init: ";

/// Where boot events are reported.
pub trait Log {
    /// Report one event (`module dm_verity loaded`); the prefix is added here.
    fn line(&self, message: &str);
    /// Report one event at a kernel log level (`3` error, `4` warning, `7` debug) where
    /// the log keeps levels (`/dev/kmsg`); elsewhere the same as [`Log::line`].
    fn line_at(&self, level: u8, message: &str) {
        let _ = level;
        self.line(message);
    }
    /// Print `text` on the console as it is, without the prefix (stable test markers).
    fn raw(&self, text: &str);
    /// (Re)open the log's devices, after `/dev` was mounted.
    fn reopen(&self) {}
    /// Wait until every line so far is out (before a reboot); a log that writes at once
    /// has nothing to wait for.
    fn flush(&self) {}
}

/// How long a direct write waits for a stalled console before it gives the line up (and
/// the next lines do not wait at all until the console takes one whole line again).
pub const WRITE_PATIENCE: Duration = Duration::from_secs(2);

/// The real log: `/dev/console` and `/dev/kmsg`.
#[derive(Debug)]
pub struct Console {
    console: RefCell<Option<File>>,
    kmsg: RefCell<Option<File>>,
    /// How long a write waits for the console; `None`: as long as it takes.
    patience: Option<Duration>,
    /// A write gave up: the next ones try without waiting until one goes through whole.
    stalled: Cell<bool>,
}

impl Default for Console {
    fn default() -> Console {
        Console {
            console: RefCell::new(None),
            kmsg: RefCell::new(None),
            patience: Some(WRITE_PATIENCE),
            stalled: Cell::new(false),
        }
    }
}

impl Console {
    /// A log that writes to standard error until [`Console::reopen`] finds `/dev`, and
    /// waits at most [`WRITE_PATIENCE`] for the console.
    pub fn new() -> Console {
        let console = Console::default();
        console.reopen();
        console
    }

    /// A log writing to `console` (made non-blocking) and no kernel log, with `patience`
    /// (`None`: waits as long as the console takes, for the console writer thread).
    pub fn on(console: File, patience: Option<Duration>) -> Console {
        let _ = rustix::fs::fcntl_setfl(&console, rustix::fs::OFlags::NONBLOCK);
        Console {
            console: RefCell::new(Some(console)),
            patience,
            ..Console::default()
        }
    }

    /// The same log waiting as long as the console takes (for the console writer thread,
    /// which no one waits for).
    pub fn without_patience(self) -> Console {
        Console {
            patience: None,
            ..self
        }
    }

    fn to_console(&self, text: &str) {
        let mut console = self.console.borrow_mut();
        let Some(console) = console.as_mut() else {
            let _ = std::io::stderr().write_all(text.as_bytes());
            return;
        };
        // A direct write after stage 2's writer started (a fatal error): what the writer
        // holds goes first, so the console keeps the order of the lines.
        if self.patience.is_some()
            && !self.stalled.get()
            && !writer::flush_installed(WRITE_PATIENCE)
        {
            self.stalled.set(true);
        }
        let patience = match self.patience {
            Some(_) if self.stalled.get() => Some(Duration::ZERO),
            patience => patience,
        };
        let deadline = patience.map(|p| Instant::now() + p);
        self.stalled
            .set(write_waiting(console, text.as_bytes(), deadline).is_err());
    }
}

/// Write all of `bytes` to the non-blocking `file`, waiting with `poll` for it to take
/// more, until `deadline` (`None`: as long as it takes). An error when the deadline
/// passed or the write failed.
pub fn write_waiting(
    file: &mut File,
    mut bytes: &[u8],
    deadline: Option<Instant>,
) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match file.write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let timeout = match deadline {
                    None => -1,
                    Some(deadline) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return Err(e);
                        }
                        i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX)
                    }
                };
                let mut fd = libc::pollfd {
                    fd: file.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: `fd` is one valid pollfd that lives across the call, and the
                // count passed is 1.
                let polled = unsafe { libc::poll(&mut fd, 1, timeout) };
                if polled < 0 {
                    let err = std::io::Error::last_os_error();
                    if err.kind() != std::io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                } else if fd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                    return Err(std::io::ErrorKind::BrokenPipe.into());
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Log for Console {
    fn line(&self, message: &str) {
        self.line_at(7, message);
    }

    fn line_at(&self, level: u8, message: &str) {
        self.to_console(&format!("{PREFIX}{message}\n"));
        if let Some(kmsg) = self.kmsg.borrow_mut().as_mut() {
            // One write() per record; a failure (rate limit) must not stop the boot.
            let _ = kmsg.write_all(format!("<{level}>{PREFIX}{message}\n").as_bytes());
        }
    }

    fn raw(&self, text: &str) {
        self.to_console(&format!("{text}\n"));
    }

    /// Open `/dev/console` (non-blocking) and `/dev/kmsg` (after `/dev` was mounted).
    fn reopen(&self) {
        let open = |path: &str| crate::syscalls::open_for_writing(Path::new(path)).ok();
        let console = open("/dev/console");
        if let Some(console) = &console {
            let _ = rustix::fs::fcntl_setfl(console, rustix::fs::OFlags::NONBLOCK);
        }
        *self.console.borrow_mut() = console;
        *self.kmsg.borrow_mut() = open("/dev/kmsg");
        self.stalled.set(false);
    }
}

/// Write a last message straight to the console, for the panic hook (which cannot rely
/// on the `Console` owned by the code that panicked). As every direct write, it lets stage
/// 2's console writer print what it holds first (at most [`WRITE_PATIENCE`]), then waits at
/// most [`WRITE_PATIENCE`] for the console to take `message`.
pub fn emergency(message: &str) {
    let text = format!("{PREFIX}{message}\n");
    match crate::syscalls::open_for_writing(Path::new("/dev/console")) {
        Ok(console) => Console::on(console, Some(WRITE_PATIENCE)).to_console(&text),
        Err(_) => {
            let _ = std::io::stderr().write_all(text.as_bytes());
        }
    }
}

#[cfg(test)]
pub mod memory {
    //! A log that keeps its lines, for tests.

    use super::*;

    /// Collects every line (prefixed as on the console).
    #[derive(Debug, Default)]
    pub struct MemoryLog {
        pub lines: RefCell<Vec<String>>,
    }

    impl MemoryLog {
        pub fn lines(&self) -> Vec<String> {
            self.lines.borrow().clone()
        }
    }

    impl Log for MemoryLog {
        fn line(&self, message: &str) {
            self.lines.borrow_mut().push(format!("{PREFIX}{message}"));
        }

        fn raw(&self, text: &str) {
            self.lines.borrow_mut().push(text.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A console on a pipe that nobody reads yet, waiting at most `patience`; the read end.
    fn stuck(patience: Duration) -> (Console, File) {
        let (read, write) = rustix::pipe::pipe().unwrap_or_else(|e| panic!("pipe: {e}"));
        (
            Console::on(File::from(write), Some(patience)),
            File::from(read),
        )
    }

    #[test]
    fn a_direct_write_to_a_stuck_console_gives_up_at_its_patience() {
        let (console, mut reader) = stuck(Duration::from_millis(100));
        // More than the pipe holds (64 KiB): the write waits for it, then gives the rest up.
        let began = Instant::now();
        console.raw(&"x".repeat(200 * 1024));
        let first = began.elapsed();
        assert!(first >= Duration::from_millis(100), "{first:?}");
        assert!(first < Duration::from_secs(5), "{first:?}");
        // Stalled: the next lines do not wait at all while the console takes nothing.
        let began = Instant::now();
        for _ in 0..100 {
            console.line("still stuck");
        }
        assert!(
            began.elapsed() < Duration::from_secs(1),
            "{:?}",
            began.elapsed()
        );
        // Once the reader drains the pipe, a whole line goes through and ends the stall.
        let mut drained = vec![0u8; 256 * 1024];
        let _ = reader.read(&mut drained);
        console.line("back");
        assert!(!console.stalled.get());
    }

    /// A pseudo-terminal: its master (the test's end, like a serial line's far side) and
    /// a console on its slave (a terminal, as `/dev/console` is), waiting at most
    /// `patience`.
    fn terminal(patience: Duration) -> (File, Console) {
        use std::os::fd::FromRawFd;
        // SAFETY: posix_openpt takes no pointer; the descriptor it returns is checked.
        let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
        assert!(master >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: `master` is an open descriptor that nothing else owns.
        let master = unsafe { File::from_raw_fd(master) };
        // SAFETY: both take the open master descriptor only.
        let unlocked = unsafe {
            libc::grantpt(master.as_raw_fd()) == 0 && libc::unlockpt(master.as_raw_fd()) == 0
        };
        assert!(unlocked, "{}", std::io::Error::last_os_error());
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: `name` is writable for the length passed.
        let named = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
        assert_eq!(named, 0);
        // SAFETY: ptsname_r wrote a NUL-terminated name into `name`.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_owned();
        let slave = rustix::fs::open(
            path.as_c_str(),
            rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::NOCTTY,
            rustix::fs::Mode::empty(),
        )
        .unwrap_or_else(|e| panic!("{path:?}: {e}"));
        (master, Console::on(File::from(slave), Some(patience)))
    }

    #[test]
    fn a_terminal_nobody_reads_never_holds_a_writer_past_its_patience() {
        let (_master, console) = terminal(Duration::from_millis(100));
        // A serial line whose far side stopped reading: the terminal's buffers fill, then
        // each write gives up at its patience instead of waiting for ever. On a thread, so
        // that a write that blocks fails the test instead of hanging it.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for i in 0..2000 {
                console.line(&format!("line {i} {}", "z".repeat(200)));
            }
            let _ = done.send(console.stalled.get());
        });
        assert_eq!(finished.recv_timeout(Duration::from_secs(20)), Ok(true));
    }

    #[test]
    fn a_write_waits_for_a_slow_reader_within_its_patience() {
        let (console, mut reader) = stuck(Duration::from_secs(30));
        let reading = std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = reader.read_to_end(&mut text);
            text.len()
        });
        // Three times the pipe's size: written whole as the reader drains it.
        console.raw(&"y".repeat(3 * 64 * 1024 - 1));
        assert!(!console.stalled.get());
        drop(console);
        let read = reading.join().unwrap_or_else(|_| panic!("reader panicked"));
        assert_eq!(read, 3 * 64 * 1024);
    }
}
