//! Bounded in-memory logs: the boot log (every `keelson-init:` line PID 1 printed) and
//! each service's captured output, kept in byte-bounded ring buffers so that a chatty or
//! crash-looping service can never grow PID 1's memory.
//!
//! [`BootLog`] is the [`Log`] stage 2 uses: it prints each line through the console
//! ([`crate::console::Console`]: `/dev/console` and `/dev/kmsg`) and keeps a copy in a
//! [`RingBuffer`] that the control socket serves (`bootlog`), so the boot can be read
//! back before the API exists.

use std::cell::RefCell;
use std::collections::VecDeque;

use crate::console::{Log, PREFIX};

/// Bytes of boot log kept in memory.
pub const BOOT_LOG_BYTES: usize = 64 * 1024;
/// Bytes of output kept per service.
pub const SERVICE_LOG_BYTES: usize = 256 * 1024;
/// The longest line kept; longer lines are cut there (and marked with `…`).
pub const MAX_LINE: usize = 4096;

/// Lines of text, oldest first, holding at most `capacity` bytes (each line counts its
/// length plus one for its newline). Adding a line drops the oldest ones that no longer fit.
#[derive(Debug, Clone)]
pub struct RingBuffer {
    lines: VecDeque<String>,
    bytes: usize,
    capacity: usize,
    dropped: u64,
}

impl RingBuffer {
    /// An empty buffer of `capacity` bytes.
    pub fn new(capacity: usize) -> RingBuffer {
        RingBuffer {
            lines: VecDeque::new(),
            bytes: 0,
            capacity,
            dropped: 0,
        }
    }

    /// Add one line (without its newline); a line longer than [`MAX_LINE`] or than the
    /// whole buffer is cut to fit.
    pub fn push(&mut self, line: &str) {
        let limit = MAX_LINE.min(self.capacity.saturating_sub(1));
        let line = if line.len() > limit {
            let mut end = limit.saturating_sub('…'.len_utf8());
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}…", &line[..end])
        } else {
            line.to_string()
        };
        let cost = line.len() + 1;
        while self.bytes + cost > self.capacity {
            match self.lines.pop_front() {
                Some(old) => {
                    self.bytes -= old.len() + 1;
                    self.dropped += 1;
                }
                None => return,
            }
        }
        self.bytes += cost;
        self.lines.push_back(line);
    }

    /// The last `n` lines (all when `n` is larger), oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let skip = self.lines.len().saturating_sub(n);
        self.lines.iter().skip(skip).cloned().collect()
    }

    /// Bytes held (lines plus newlines).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Lines held.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Whether no line is held.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Lines dropped to make room since the buffer was made.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// The boot log: every line goes to the console and into a ring buffer.
#[derive(Debug)]
pub struct BootLog<L: Log> {
    out: L,
    kept: RefCell<RingBuffer>,
}

impl<L: Log> BootLog<L> {
    /// A boot log printing through `out`.
    pub fn new(out: L) -> BootLog<L> {
        BootLog {
            out,
            kept: RefCell::new(RingBuffer::new(BOOT_LOG_BYTES)),
        }
    }

    /// The last `n` lines of the boot log (with their `keelson-init: ` prefix).
    pub fn tail(&self, n: usize) -> Vec<String> {
        self.kept.borrow().tail(n)
    }

    /// The underlying console.
    pub fn console(&self) -> &L {
        &self.out
    }
}

impl<L: Log> Log for BootLog<L> {
    fn line(&self, message: &str) {
        self.out.line(message);
        self.kept.borrow_mut().push(&format!("{PREFIX}{message}"));
    }

    fn raw(&self, text: &str) {
        self.out.raw(text);
        self.kept.borrow_mut().push(text);
    }

    fn reopen(&self) {
        self.out.reopen();
    }

    fn flush(&self) {
        self.out.flush();
    }
}

/// The message of one `/dev/kmsg` record (`6,1234,5678901,-;EXT4-fs (vda4): ...`), without
/// its continuation lines.
pub fn kmsg_message(record: &str) -> Option<&str> {
    let (_, message) = record.split_once(';')?;
    Some(message.lines().next().unwrap_or(""))
}

/// The kernel's log records so far whose message starts with one of `prefixes`
/// (`/dev/kmsg` read without blocking from the start of the kernel's ring buffer).
pub fn kernel_messages(prefixes: &[&str]) -> Vec<String> {
    use std::io::Read;
    let Ok(mut kmsg) = std::fs::File::open("/dev/kmsg") else {
        return Vec::new();
    };
    if rustix::fs::fcntl_setfl(&kmsg, rustix::fs::OFlags::NONBLOCK).is_err() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match kmsg.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let record = String::from_utf8_lossy(&buf[..n]);
                if let Some(message) = kmsg_message(&record)
                    && prefixes.iter().any(|p| message.starts_with(p))
                {
                    out.push(message.to_string());
                }
            }
            // EPIPE: records were overwritten while we read; the next read goes on.
            Err(e) if e.raw_os_error() == Some(32) => {}
            Err(_) => break,
        }
    }
    out
}

/// A borrowed log is a log (stage 2 keeps the console that `pid1_main` owns).
impl<T: Log + ?Sized> Log for &T {
    fn line(&self, message: &str) {
        (**self).line(message);
    }

    fn line_at(&self, level: u8, message: &str) {
        (**self).line_at(level, message);
    }

    fn raw(&self, text: &str) {
        (**self).raw(text);
    }

    fn reopen(&self) {
        (**self).reopen();
    }

    fn flush(&self) {
        (**self).flush();
    }
}

/// Stage 2's log: a [`Log`] that also keeps the boot log and prints services' output.
/// [`crate::logging::RecordLog`] on a node; a [`BootLog`] over a memory log in tests (and
/// on a node whose console writer could not start).
pub trait Kept: Log {
    /// The last `n` lines of the boot log, oldest first.
    fn tail(&self, n: usize) -> Vec<String>;
    /// Print one line of a service's output (`containerd: ...`) as it is; the service's
    /// own ring keeps it.
    fn service_line(&self, text: &str);
}

impl<L: Log> Kept for BootLog<L> {
    fn tail(&self, n: usize) -> Vec<String> {
        BootLog::tail(self, n)
    }

    fn service_line(&self, text: &str) {
        self.out.raw(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::memory::MemoryLog;

    #[test]
    fn the_ring_keeps_the_newest_lines_within_its_bytes() {
        let mut ring = RingBuffer::new(20);
        for line in ["aaaa", "bbbb", "cccc", "dddd"] {
            ring.push(line);
        }
        // Each line costs 5 bytes: all four fit exactly.
        assert_eq!((ring.len(), ring.bytes(), ring.dropped()), (4, 20, 0));
        ring.push("eeeeeeeee");
        assert_eq!(ring.tail(10), ["cccc", "dddd", "eeeeeeeee"]);
        assert_eq!((ring.bytes(), ring.dropped()), (20, 2));
        assert_eq!(ring.tail(1), ["eeeeeeeee"]);
    }

    #[test]
    fn a_huge_line_is_cut_and_never_exceeds_the_bound() {
        let mut ring = RingBuffer::new(SERVICE_LOG_BYTES);
        for _ in 0..200 {
            ring.push(&"x".repeat(10 * MAX_LINE));
        }
        assert!(ring.bytes() <= SERVICE_LOG_BYTES);
        let last = ring.tail(1).concat();
        assert_eq!(last.len(), MAX_LINE);
        assert!(last.ends_with('…'));
        // Multi-byte text is cut on a character boundary.
        let mut small = RingBuffer::new(8);
        small.push("ééééé");
        assert_eq!(small.tail(1), ["éé…"]);
    }

    #[test]
    fn kmsg_records_give_their_message() {
        assert_eq!(
            kmsg_message(
                "6,1234,5678901,-;EXT4-fs (vda4): mounted filesystem r/w\n SUBSYSTEM=block\n"
            ),
            Some("EXT4-fs (vda4): mounted filesystem r/w")
        );
        assert_eq!(kmsg_message("garbage"), None);
    }

    #[test]
    fn the_boot_log_prints_and_keeps() {
        let log = BootLog::new(MemoryLog::default());
        log.line("service containerd ready");
        log.raw("MARKER");
        assert_eq!(
            log.console().lines(),
            ["keelson-init: service containerd ready", "MARKER"]
        );
        assert_eq!(log.tail(1), ["MARKER"]);
        assert_eq!(log.tail(5).len(), 2);
    }
}
