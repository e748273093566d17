//! Stage 2's log: every line PID 1 reports is a `tracing` record (a level, a message,
//! fields), and boot phases are spans whose close is a record with their duration.
//!
//! One subscriber ([`install`]) takes every record and
//! - keeps it in the boot log, a byte-bounded ring ([`Records::tail`]) that the control
//!   socket's `bootlog` serves, so `machinectl logs init` reads the records the console
//!   showed, and the boot bench reads the phases' durations from the same lines;
//! - hands it to the console writer ([`crate::console::writer`]), a thread that owns
//!   `/dev/console` and `/dev/kmsg`, through a queue bounded in bytes
//!   ([`QUEUE_BYTES`]). The event loop never waits for the console: when the queue is
//!   full (a slow serial console, a flood of service output) the line is counted and
//!   dropped from the console alone, and the console says how many were dropped where they
//!   were (`keelson-init: console: N lines dropped (console too slow)`); a line that a
//!   service or PID 1 repeats is shown a few times, then counted (`… last line repeated N
//!   times`); services' lines may fill three quarters of the queue, the rest waits for
//!   PID 1's own. The boot log keeps PID 1's lines, each service's ring its own.
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
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

use crate::bootlog::{BOOT_LOG_BYTES, Kept, RingBuffer};
use crate::console::queue::{Line, Source};
use crate::console::writer::ConsoleWriter;
use crate::console::{Console, Log, PREFIX};

pub use crate::console::queue::QUEUE_BYTES;

/// The target of lines printed as they are and kept (test markers).
pub const RAW: &str = "keelson::raw";
/// The target of a service's output line: printed as it is, not kept here.
pub const SERVICE_OUTPUT: &str = "keelson::service";
/// How long a flush (before a reboot) waits for the console at most.
pub const FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The records of stage 2: the boot log, and the console's queue.
#[derive(Debug)]
pub struct Records {
    kept: Mutex<RingBuffer>,
    console: ConsoleWriter,
}

impl Records {
    /// The last `n` lines of the boot log, oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        self.kept.lock().map(|k| k.tail(n)).unwrap_or_default()
    }

    /// Lines dropped from the console (never from the boot log) so far.
    pub fn dropped(&self) -> u64 {
        self.console.dropped()
    }

    /// Bytes waiting for the console now (at most [`QUEUE_BYTES`]).
    pub fn queued_bytes(&self) -> usize {
        self.console.queued_bytes()
    }

    /// Open the console devices, after `/dev` was mounted.
    pub fn reopen(&self) {
        self.console.reopen();
    }

    /// Wait until every line so far is on the console (before a reboot or power-off),
    /// at most `limit`, however stuck the console is.
    pub fn flush(&self, limit: std::time::Duration) {
        self.console.flush(limit);
    }

    fn keep(&self, line: &str) {
        if let Ok(mut kept) = self.kept.lock() {
            kept.push(line);
        }
    }

    fn print(&self, line: Line, source: Source<'_>) {
        self.console.push(line, source);
    }
}

/// Start the console writer on `out` (waiting as long as the console takes, on its own
/// thread) and make our subscriber the global one; the records' handle. A second call
/// (only in tests) keeps the first subscriber.
pub fn install(out: Console) -> std::io::Result<Arc<Records>> {
    let records = start(out.without_patience(), QUEUE_BYTES)?;
    records.console.install();
    let _ = tracing::subscriber::set_global_default(RecordSubscriber::new(records.clone()));
    Ok(records)
}

/// The records and their console writer thread, with a queue of `capacity` bytes.
fn start<L: Log + Send + 'static>(out: L, capacity: usize) -> std::io::Result<Arc<Records>> {
    Ok(Arc::new(Records {
        kept: Mutex::new(RingBuffer::new(BOOT_LOG_BYTES)),
        console: ConsoleWriter::start(out, capacity)?,
    }))
}

/// The service that printed a line (`containerd` of `containerd: ...`).
fn service_of(line: &str) -> &str {
    line.split_once(": ").map_or("service", |(name, _)| name)
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
            SERVICE_OUTPUT => {
                let source = Source::Service(service_of(&fields.message));
                self.records
                    .print(Line::as_is(fields.message.clone()), source);
            }
            RAW => {
                self.records.keep(&fields.message);
                self.records
                    .print(Line::as_is(fields.message), Source::Marker);
            }
            _ => {
                let message = fields.line();
                self.records.keep(&format!("{PREFIX}{message}"));
                let level = kmsg_level(*meta.level());
                self.records.print(Line::own(message, level), Source::Init);
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
        self.records.print(Line::own(message, 7), Source::Init);
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
    use std::sync::mpsc::{Receiver, channel};
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
        with_records(console.clone(), QUEUE_BYTES, |records| {
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
        with_records(console.clone(), QUEUE_BYTES, |records| {
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
        with_records(console, QUEUE_BYTES, |records| {
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

    /// A pipe whose write end is a console (waiting as long as it takes, as the writer
    /// thread's) and whose read end is the test's.
    fn pipe_console() -> (Console, std::fs::File) {
        let (read, write) = rustix::pipe::pipe().unwrap_or_else(|e| panic!("pipe: {e}"));
        (
            Console::on(std::fs::File::from(write), None),
            std::fs::File::from(read),
        )
    }

    /// Read `pipe` on a thread until a line `last` arrives; the text read.
    fn read_until(mut pipe: std::fs::File, last: &'static str) -> Receiver<String> {
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let mut buf = [0u8; 8192];
            while !String::from_utf8_lossy(&text).contains(&format!("\n{last}\n")) {
                match std::io::Read::read(&mut pipe, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => text.extend_from_slice(&buf[..n]),
                }
            }
            let _ = tx.send(String::from_utf8_lossy(&text).into_owned());
        });
        rx
    }

    #[test]
    fn a_console_nobody_reads_never_blocks_and_its_queue_stays_bounded() {
        let (console, reader) = pipe_console();
        let records = start(console, QUEUE_BYTES).unwrap_or_else(|e| panic!("{e}"));
        let subscriber = RecordSubscriber::new(records.clone());
        // 1.2 MB of service output for a pipe of 64 KiB that nobody reads.
        let lines = 10_000;
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..lines {
                let text = format!("svc: line {i:05} {}", "x".repeat(100));
                tracing::info!(target: SERVICE_OUTPUT, "{text}");
                assert!(records.queued_bytes() <= QUEUE_BYTES);
            }
        });
        assert!(records.dropped() > 0);
        // A flush gives up at its limit, however stuck the console.
        let began = Instant::now();
        records.flush(Duration::from_millis(50));
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "{:?}",
            began.elapsed()
        );

        // The reader resumes: what was queued comes out in order, then the count.
        let text = read_until(reader, "after");
        records.flush(Duration::from_secs(30));
        tracing::subscriber::with_default(RecordSubscriber::new(records.clone()), || {
            tracing::info!(target: RAW, "after");
        });
        records.flush(Duration::from_secs(30));
        let text = text
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("the console never showed 'after': {e}"));
        let shown: Vec<&str> = text.lines().filter(|l| l.starts_with("svc: ")).collect();
        let numbers: Vec<&str> = shown.iter().map(|l| &l[10..15]).collect();
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "out of order");
        let counted: u64 = text
            .lines()
            .filter_map(|l| l.strip_prefix("keelson-init: console: "))
            .filter_map(|l| l.strip_suffix(" lines dropped (console too slow)"))
            .map(|n| n.parse::<u64>().unwrap_or_else(|e| panic!("{n}: {e}")))
            .sum();
        assert_eq!(counted, records.dropped());
        assert_eq!(shown.len() as u64 + counted, lines);
        assert_eq!(text.lines().last(), Some("after"));
    }

    #[test]
    fn a_flush_with_a_full_queue_and_a_stuck_console_returns_at_its_limit() {
        let (console, _reader) = pipe_console();
        let records = start(console, 4096).unwrap_or_else(|e| panic!("{e}"));
        tracing::subscriber::with_default(RecordSubscriber::new(records.clone()), || {
            for i in 0..2000 {
                tracing::info!("a line of PID 1 number {i} {}", "y".repeat(100));
            }
        });
        // On a thread, so that a flush that waits for room in the queue fails the test
        // instead of hanging it.
        let (done, finished) = channel();
        let flushing = records.clone();
        std::thread::spawn(move || {
            flushing.flush(Duration::from_millis(100));
            let _ = done.send(());
        });
        assert!(finished.recv_timeout(Duration::from_secs(10)).is_ok());
    }

    #[test]
    fn a_service_repeating_a_line_is_shown_a_few_times_then_counted() {
        let console = Shared::default();
        with_records(console.clone(), QUEUE_BYTES, |records| {
            for _ in 0..50 {
                tracing::info!(target: SERVICE_OUTPUT, "machined: refused 10.1.2.3: no certificate");
            }
            tracing::info!(target: SERVICE_OUTPUT, "machined: listening");
            records.flush(Duration::from_secs(5));
        });
        assert_eq!(
            console.lines(),
            [
                "machined: refused 10.1.2.3: no certificate",
                "machined: refused 10.1.2.3: no certificate",
                "machined: refused 10.1.2.3: no certificate",
                "machined: … last line repeated 47 times",
                "machined: listening",
            ]
        );
    }
}
