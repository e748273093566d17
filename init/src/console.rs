//! The boot log: one line per event, on the console and in the kernel log.
//!
//! Every line goes straight to `/dev/console` (unthrottled, visible whatever the kernel's
//! log level) prefixed with `keelson-init: `, and to `/dev/kmsg` at `KERN_DEBUG` so it is
//! kept in the kernel's ring buffer (for `dmesg` and, later, the API) without the kernel
//! echoing it to the console a second time at the default log level. Before `/dev` is
//! mounted, lines go to standard error, which the kernel opened on its console for us.

use std::cell::RefCell;
use std::fs::File;
use std::io::Write;
use std::path::Path;

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

/// The real log: `/dev/console` and `/dev/kmsg`.
#[derive(Debug, Default)]
pub struct Console {
    console: RefCell<Option<File>>,
    kmsg: RefCell<Option<File>>,
}

impl Console {
    /// A log that writes to standard error until [`Console::reopen`] finds `/dev`.
    pub fn new() -> Console {
        let console = Console::default();
        console.reopen();
        console
    }

    fn to_console(&self, text: &str) {
        let written = match self.console.borrow_mut().as_mut() {
            Some(console) => console.write_all(text.as_bytes()).is_ok(),
            None => false,
        };
        if !written {
            let _ = std::io::stderr().write_all(text.as_bytes());
        }
    }
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

    /// Open `/dev/console` and `/dev/kmsg` (after `/dev` was mounted).
    fn reopen(&self) {
        let open = |path: &str| crate::syscalls::open_for_writing(Path::new(path)).ok();
        *self.console.borrow_mut() = open("/dev/console");
        *self.kmsg.borrow_mut() = open("/dev/kmsg");
    }
}

/// Write a last message straight to the console, for the panic hook (which cannot rely
/// on the `Console` owned by the code that panicked).
pub fn emergency(message: &str) {
    let text = format!("{PREFIX}{message}\n");
    match crate::syscalls::open_for_writing(Path::new("/dev/console")) {
        Ok(mut console) => {
            let _ = console.write_all(text.as_bytes());
        }
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
