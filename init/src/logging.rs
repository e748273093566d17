//! Stage 2's log: every line PID 1 reports is a `tracing` record (a level, a message,
//! fields), and boot phases are spans whose close is a record with their duration.
//!
//! One subscriber ([`install`]) takes every record and
//! - keeps it in the boot log, a byte-bounded ring ([`Records::tail`]) that the control
//!   socket's `bootlog` serves, so `machinectl logs init` reads the records the console
//!   showed, and the boot bench reads the phases' durations from the same lines;
//! - hands it to the console writer, a thread that owns `/dev/console` and `/dev/kmsg`,
//!   through a bounded queue ([`CONSOLE_QUEUE`] lines). The event loop never waits for the
//!   console: when the queue is full (a slow serial console, a flood of service output)
//!   the line is counted and dropped from the console alone, and the writer says how many
//!   were dropped once it catches up. The boot log keeps them.
//!
//! A record's console line is `keelson-init: <message>` followed by its fields as
//! ` key=value`; warnings and errors carry the kernel log level of their kind in
//! `/dev/kmsg` (`<4>`, `<3>`), information `<7>` (kept, not echoed by the kernel). Two
//! targets are printed as they are, without the prefix: [`RAW`] (stable markers such as
//! `KEELSON STAGE2 READY`, kept in the boot log) and [`SERVICE_OUTPUT`] (a service's line,
//! `containerd: ...`, which its own ring keeps instead).
//!
//! The subscriber ([`RecordSubscriber`]) is written here on `tracing`'s own trait rather
//! than built from `tracing-subscriber`: PID 1 needs only a span's name, fields and start
//! (a map of the few open spans), and `tracing-subscriber`'s registry (a sharded slab and
//! per-thread span stacks) is more than that: PID 1's RSS at idle went from 4.0 to 3.9 MiB
//! without it (BENCHMARKS.md), and the binary lost 28 KB. The formatting is ours because the console's line format is a contract
//! with the tests and the bench, and `fmt`'s would add a timestamp and level column to
//! every line.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

use crate::bootlog::{BOOT_LOG_BYTES, Kept, RingBuffer};
use crate::console::{Log, PREFIX};

/// Lines the console writer may have queued before new ones are dropped from the console.
pub const CONSOLE_QUEUE: usize = 1024;
/// The target of lines printed as they are and kept (test markers).
pub const RAW: &str = "keelson::raw";
/// The target of a service's output line: printed as it is, not kept here.
pub const SERVICE_OUTPUT: &str = "keelson::service";
/// How long a flush (before a reboot) waits for the console at most.
pub const FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What the console writer is asked to do.
#[derive(Debug)]
enum ToConsole {
    /// Print a line (with its newline) and, with a level, send it to `/dev/kmsg`.
    Line { text: String, kmsg: Option<u8> },
    /// `/dev` is mounted: open the console and `/dev/kmsg`.
    Reopen,
    /// Answer once every line before this one is written.
    Flush(SyncSender<()>),
}

/// The records of stage 2: the boot log, and the console's queue.
#[derive(Debug)]
pub struct Records {
    kept: Mutex<RingBuffer>,
    console: SyncSender<ToConsole>,
    dropped: Arc<AtomicU64>,
}

impl Records {
    /// The last `n` lines of the boot log, oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        self.kept.lock().map(|k| k.tail(n)).unwrap_or_default()
    }

    /// Lines dropped from the console (never from the boot log) so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Open the console devices, after `/dev` was mounted.
    pub fn reopen(&self) {
        let _ = self.console.try_send(ToConsole::Reopen);
    }

    /// Wait until every line so far is on the console (before a reboot or power-off),
    /// at most `limit`.
    pub fn flush(&self, limit: std::time::Duration) {
        let (done, wait) = sync_channel(1);
        if self.console.send(ToConsole::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(limit);
        }
    }

    fn keep(&self, line: &str) {
        if let Ok(mut kept) = self.kept.lock() {
            kept.push(line);
        }
    }

    fn print(&self, text: String, kmsg: Option<u8>) {
        match self.console.try_send(ToConsole::Line { text, kmsg }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            // The writer is gone (it never exits while the sender lives): nothing to do.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// Start the console writer on `out` and make our subscriber the global one; the
/// records' handle. A second call (only in tests) keeps the first subscriber.
pub fn install<L: Log + Send + 'static>(out: L) -> std::io::Result<Arc<Records>> {
    let records = start(out, CONSOLE_QUEUE)?;
    let _ = tracing::subscriber::set_global_default(RecordSubscriber::new(records.clone()));
    Ok(records)
}

/// The records and their console writer thread, with a queue of `queue` lines.
fn start<L: Log + Send + 'static>(out: L, queue: usize) -> std::io::Result<Arc<Records>> {
    let (tx, rx) = sync_channel(queue);
    let dropped = Arc::new(AtomicU64::new(0));
    let counted = dropped.clone();
    std::thread::Builder::new()
        .name("console".into())
        .spawn(move || write_console(out, rx, &counted))?;
    Ok(Arc::new(Records {
        kept: Mutex::new(RingBuffer::new(BOOT_LOG_BYTES)),
        console: tx,
        dropped,
    }))
}

/// The console writer's loop: one line at a time, saying so when lines were dropped.
fn write_console<L: Log>(out: L, rx: Receiver<ToConsole>, dropped: &AtomicU64) {
    let mut reported = 0;
    while let Ok(message) = rx.recv() {
        let now = dropped.load(Ordering::Relaxed);
        if now > reported {
            out.line(&format!(
                "{} console line(s) dropped: the console is slower than the log (the boot log keeps them: machinectl logs init)",
                now - reported
            ));
            reported = now;
        }
        match message {
            ToConsole::Line { text, kmsg: None } => out.raw(&text),
            ToConsole::Line {
                text,
                kmsg: Some(level),
            } => out.line_at(level, &text),
            ToConsole::Reopen => out.reopen(),
            ToConsole::Flush(done) => {
                let _ = done.try_send(());
            }
        }
    }
}

/// An open span: what its close reports.
#[derive(Debug)]
struct OpenSpan {
    name: &'static str,
    fields: String,
    started: Instant,
    /// Handles to it (`Span`s and their clones); it closes when the last is dropped.
    handles: usize,
}

/// The subscriber that turns records into boot-log lines and console lines, and closed
/// spans into `phase NAME took N ms` lines.
#[derive(Debug)]
pub struct RecordSubscriber {
    records: Arc<Records>,
    next_id: AtomicU64,
    spans: Mutex<BTreeMap<u64, OpenSpan>>,
}

impl RecordSubscriber {
    /// A subscriber writing to `records`.
    pub fn new(records: Arc<Records>) -> RecordSubscriber {
        RecordSubscriber {
            records,
            next_id: AtomicU64::new(1),
            spans: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Subscriber for RecordSubscriber {
    fn enabled(&self, _metadata: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Ok(mut spans) = self.spans.lock() {
            spans.insert(
                id,
                OpenSpan {
                    name: attrs.metadata().name(),
                    fields: fields.line(),
                    started: Instant::now(),
                    handles: 1,
                },
            );
        }
        Id::from_u64(id)
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        match meta.target() {
            SERVICE_OUTPUT => self.records.print(fields.message, None),
            RAW => {
                self.records.keep(&fields.message);
                self.records.print(fields.message, None);
            }
            _ => {
                let message = fields.line();
                self.records.keep(&format!("{PREFIX}{message}"));
                self.records.print(message, Some(kmsg_level(*meta.level())));
            }
        }
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}

    fn clone_span(&self, id: &Id) -> Id {
        if let Ok(mut spans) = self.spans.lock()
            && let Some(span) = spans.get_mut(&id.into_u64())
        {
            span.handles += 1;
        }
        id.clone()
    }

    fn try_close(&self, id: Id) -> bool {
        let closed = match self.spans.lock() {
            Ok(mut spans) => match spans.get_mut(&id.into_u64()) {
                Some(span) if span.handles > 1 => {
                    span.handles -= 1;
                    None
                }
                Some(_) => spans.remove(&id.into_u64()),
                None => None,
            },
            Err(_) => None,
        };
        let Some(span) = closed else { return false };
        let message = phase_line(span.name, span.started.elapsed(), Some(&span.fields));
        self.records.keep(&format!("{PREFIX}{message}"));
        self.records.print(message, Some(7));
        true
    }
}

/// The line a closed phase span leaves: `phase disks took 123 ms key=value`.
pub fn phase_line(name: &str, took: std::time::Duration, fields: Option<&str>) -> String {
    let mut line = format!("phase {name} took {} ms", took.as_millis());
    if let Some(fields) = fields.filter(|f| !f.is_empty()) {
        line.push(' ');
        line.push_str(fields);
    }
    line
}

/// The `/dev/kmsg` level of a record: errors and warnings as the kernel's own, the rest
/// as debug (kept in the kernel's ring, not echoed on the console a second time).
fn kmsg_level(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        _ => 7,
    }
}

/// A record's message and its other fields, `key=value` each.
#[derive(Debug, Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Fields {
    fn line(&self) -> String {
        match (self.message.is_empty(), self.rest.is_empty()) {
            (_, true) => self.message.clone(),
            (true, false) => self.rest.clone(),
            (false, false) => format!("{} {}", self.message, self.rest),
        }
    }

    fn add(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if field.name() == "message" {
            let _ = self.message.write_fmt(value);
        } else {
            if !self.rest.is_empty() {
                self.rest.push(' ');
            }
            let _ = write!(self.rest, "{}={value}", field.name());
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.add(field, format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.add(field, format_args!("{value:?}"));
    }
}

/// Stage 2's [`Log`]: each line becomes an information record (the console writer and
/// the boot log take it from there), each raw text a [`RAW`] record.
#[derive(Debug, Clone)]
pub struct RecordLog {
    records: Arc<Records>,
}

impl RecordLog {
    /// A log over installed records.
    pub fn new(records: Arc<Records>) -> RecordLog {
        RecordLog { records }
    }

    /// The records (the boot log's tail, the console's flush).
    pub fn records(&self) -> &Records {
        &self.records
    }
}

impl Log for RecordLog {
    fn line(&self, message: &str) {
        tracing::info!("{message}");
    }

    fn raw(&self, text: &str) {
        tracing::info!(target: RAW, "{text}");
    }

    fn reopen(&self) {
        self.records.reopen();
    }

    fn flush(&self) {
        self.records.flush(FLUSH_LIMIT);
    }
}

impl Kept for RecordLog {
    fn tail(&self, n: usize) -> Vec<String> {
        self.records.tail(n)
    }

    fn service_line(&self, text: &str) {
        tracing::info!(target: SERVICE_OUTPUT, "{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;
    use std::time::Duration;

    /// A console that keeps what it was given, shared with the test.
    #[derive(Debug, Default, Clone)]
    struct Shared(Arc<StdMutex<Vec<String>>>);

    impl Log for Shared {
        fn line(&self, message: &str) {
            self.line_at(7, message);
        }
        fn line_at(&self, level: u8, message: &str) {
            if let Ok(mut lines) = self.0.lock() {
                lines.push(format!("<{level}>{PREFIX}{message}"));
            }
        }
        fn raw(&self, text: &str) {
            if let Ok(mut lines) = self.0.lock() {
                lines.push(text.to_string());
            }
        }
    }

    impl Shared {
        fn lines(&self) -> Vec<String> {
            self.0.lock().map(|l| l.clone()).unwrap_or_default()
        }
    }

    /// Run `f` under a subscriber of our layer over `console` (a local default, so tests
    /// do not share the global one).
    fn with_records(console: Shared, queue: usize, f: impl FnOnce(&Arc<Records>)) {
        let records = start(console, queue).unwrap_or_else(|e| panic!("no writer: {e}"));
        let subscriber = RecordSubscriber::new(records.clone());
        tracing::subscriber::with_default(subscriber, || f(&records));
        records.flush(Duration::from_secs(5));
    }

    #[test]
    fn records_reach_the_console_and_the_boot_log_alike() {
        let console = Shared::default();
        with_records(console.clone(), 16, |records| {
            let log = RecordLog::new(records.clone());
            log.line("service containerd ready");
            log.raw("KEELSON STAGE2 READY");
            tracing::warn!(device = "/dev/vda4", "STATE not mounted");
            tracing::info!(target: SERVICE_OUTPUT, "containerd: level=info msg=started");
            records.flush(Duration::from_secs(5));
            assert_eq!(
                records.tail(10),
                [
                    "keelson-init: service containerd ready",
                    "KEELSON STAGE2 READY",
                    "keelson-init: STATE not mounted device=/dev/vda4",
                ]
            );
        });
        assert_eq!(
            console.lines(),
            [
                "<7>keelson-init: service containerd ready",
                "KEELSON STAGE2 READY",
                "<4>keelson-init: STATE not mounted device=/dev/vda4",
                "containerd: level=info msg=started",
            ]
        );
    }

    #[test]
    fn a_phase_span_leaves_its_duration() {
        let console = Shared::default();
        with_records(console.clone(), 16, |records| {
            {
                let span = tracing::info_span!("disks", state = "/dev/vda4");
                let _entered = span.enter();
                tracing::info!("STATE mounted");
            }
            records.flush(Duration::from_secs(5));
            let tail = records.tail(10);
            assert_eq!(tail[0], "keelson-init: STATE mounted");
            assert!(
                tail[1].starts_with("keelson-init: phase disks took ")
                    && tail[1].ends_with(" ms state=/dev/vda4"),
                "{tail:?}"
            );
        });
    }

    #[test]
    fn a_cloned_span_closes_with_its_last_handle() {
        let console = Shared::default();
        with_records(console, 16, |records| {
            let span = tracing::info_span!("up");
            let other = span.clone();
            drop(span);
            records.flush(Duration::from_secs(5));
            assert!(records.tail(10).is_empty(), "{:?}", records.tail(10));
            drop(other);
            records.flush(Duration::from_secs(5));
            let tail = records.tail(10);
            assert_eq!(tail.len(), 1, "{tail:?}");
            assert!(
                tail[0].starts_with("keelson-init: phase up took "),
                "{tail:?}"
            );
        });
    }

    #[test]
    fn a_stalled_console_never_blocks_and_says_what_it_dropped() {
        // A console that takes 50 ms a line and a queue of 2: the loop goes on at once.
        #[derive(Debug, Clone, Default)]
        struct Slow(Shared);
        impl Log for Slow {
            fn line(&self, message: &str) {
                self.0.line(message);
            }
            fn raw(&self, text: &str) {
                std::thread::sleep(Duration::from_millis(50));
                self.0.raw(text);
            }
        }
        let console = Shared::default();
        let records = start(Slow(console.clone()), 2).unwrap_or_else(|e| panic!("{e}"));
        let subscriber = RecordSubscriber::new(records.clone());
        let began = Instant::now();
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..100 {
                tracing::info!(target: RAW, "line {i}");
            }
        });
        assert!(
            began.elapsed() < Duration::from_secs(2),
            "{:?}",
            began.elapsed()
        );
        // The boot log has every line; the console lost some and says so.
        assert_eq!(records.tail(1000).len(), 100);
        assert!(records.dropped() > 0);
        // Once the console caught up, the next line says how many it missed.
        records.flush(Duration::from_secs(10));
        tracing::subscriber::with_default(
            RecordSubscriber::new(records.clone()),
            || tracing::info!(target: RAW, "after"),
        );
        records.flush(Duration::from_secs(10));
        let lines = console.lines();
        assert!(
            lines.iter().any(|l| l.contains("console line(s) dropped")),
            "{lines:?}"
        );
        assert_eq!(lines.last().map(String::as_str), Some("after"));
    }
}
