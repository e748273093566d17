//! The console's queue: the lines waiting for a slow console, bounded in bytes, with what
//! did not fit counted, and a limiter of lines that repeat.
//!
//! [`ConsoleQueue`] is plain data (no thread, no device, no clock of its own: callers pass
//! `now`), so that every rule below is tested without a console:
//! - The queue holds at most its capacity in bytes ([`QUEUE_BYTES`] on a node). A line that
//!   does not fit is dropped, never an older one, so what reaches the console keeps its
//!   order. The first line taken out after a gap is preceded by one line saying how many
//!   were dropped there ([`dropped_line`]); so is an empty queue after a gap.
//! - A line that a source (a service, or PID 1 itself) repeats identically is shown
//!   [`REPEATS_SHOWN`] times within [`REPEAT_WINDOW`]; further repeats are counted, and
//!   one line (`… last line repeated N times`) says how many once the source prints
//!   something else, once the same line comes back after the window, once the source
//!   stays quiet past the window ([`ConsoleQueue::expire`]), or before a flush
//!   ([`ConsoleQueue::end_repeats`]).
//!   Stable markers ([`Source::Marker`]) are never limited: tests wait for them.
//! - Services' lines may fill [`SERVICE_SHARE`] of the queue at most: the rest is kept
//!   for PID 1's own lines and markers, so that a service's flood (machined logging every
//!   refused connection) cannot push out `dhcp lease` or the last `reboot: now`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::console::PREFIX;

/// Bytes of console lines queued at most (each line counts its text, its prefix and its
/// newline).
pub const QUEUE_BYTES: usize = 64 * 1024;
/// Identical lines in a row from one source shown within [`REPEAT_WINDOW`].
pub const REPEATS_SHOWN: u32 = 3;
/// How long repeats of one line count as one burst.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(10);
/// The quarters of the queue that services' lines may fill (the last quarter is PID 1's).
pub const SERVICE_SHARE: usize = 3;
/// Sources whose last line the limiter remembers (services and PID 1; the oldest is
/// forgotten, its count said, when more print).
const SOURCES: usize = 32;

/// One console line: its text without a newline, and whether it is PID 1's own (printed
/// with [`PREFIX`] and copied to `/dev/kmsg` at `kmsg`) or printed as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The text, without its newline (and without the prefix of PID 1's own lines).
    pub text: String,
    /// PID 1's own line at this kernel log level; `None` for a line printed as it is.
    pub kmsg: Option<u8>,
}

impl Line {
    /// PID 1's own line (prefixed on the console, copied to `/dev/kmsg` at `level`).
    pub fn own(text: impl Into<String>, level: u8) -> Line {
        Line {
            text: text.into(),
            kmsg: Some(level),
        }
    }

    /// A line printed as it is (a service's line, a marker).
    pub fn as_is(text: impl Into<String>) -> Line {
        Line {
            text: text.into(),
            kmsg: None,
        }
    }

    /// The bytes it takes on the console.
    fn cost(&self) -> usize {
        let prefix = if self.kmsg.is_some() { PREFIX.len() } else { 0 };
        prefix + self.text.len() + 1
    }
}

/// Who printed a line, for the repeat limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source<'a> {
    /// PID 1's own lines.
    Init,
    /// A service's output (`containerd` for `containerd: ...`).
    Service(&'a str),
    /// A stable marker a test waits for: never limited.
    Marker,
}

/// The line that says `count` lines were dropped at this point.
pub fn dropped_line(count: u64) -> Line {
    Line::own(
        format!("console: {count} lines dropped (console too slow)"),
        7,
    )
}

/// The line that says `source`'s last line came `count` more times.
fn repeated_line(source: &str, count: u64) -> Line {
    let text = format!("… last line repeated {count} times");
    if source == INIT {
        Line::own(text, 7)
    } else {
        Line::as_is(format!("{source}: {text}"))
    }
}

/// The limiter's name for PID 1 itself (no service is named so: names are programs').
const INIT: &str = "keelson-init";

/// The last line of one source and its repeats.
#[derive(Debug)]
struct Repeats {
    source: String,
    last: String,
    shown: u32,
    suppressed: u64,
    since: Instant,
}

/// One queued line and the lines dropped just before it.
#[derive(Debug)]
struct Queued {
    line: Line,
    dropped_before: u64,
}

/// The console's queue; see the module doc.
#[derive(Debug)]
pub struct ConsoleQueue {
    lines: VecDeque<Queued>,
    bytes: usize,
    capacity: usize,
    /// Dropped since the last line queued (said before the next one).
    dropped_pending: u64,
    dropped_total: u64,
    repeats: VecDeque<Repeats>,
}

impl ConsoleQueue {
    /// An empty queue of `capacity` bytes.
    pub fn new(capacity: usize) -> ConsoleQueue {
        ConsoleQueue {
            lines: VecDeque::new(),
            bytes: 0,
            capacity,
            dropped_pending: 0,
            dropped_total: 0,
            repeats: VecDeque::new(),
        }
    }

    /// Queue `line` from `source` at `now`, unless it is a repeat over the limit or does
    /// not fit (then it is counted).
    pub fn push(&mut self, line: Line, source: Source<'_>, now: Instant) {
        let (name, limit) = match source {
            Source::Marker => return self.enqueue(line),
            Source::Init => (INIT, self.capacity),
            Source::Service(name) => (name, self.capacity / 4 * SERVICE_SHARE),
        };
        let index = match self.repeats.iter().position(|r| r.source == name) {
            Some(index) => index,
            None => {
                if self.repeats.len() >= SOURCES
                    && let Some(oldest) = self.repeats.pop_front()
                    && oldest.suppressed > 0
                {
                    self.enqueue(repeated_line(&oldest.source, oldest.suppressed));
                }
                self.repeats.push_back(Repeats {
                    source: name.to_string(),
                    last: String::new(),
                    shown: 0,
                    suppressed: 0,
                    since: now,
                });
                self.repeats.len() - 1
            }
        };
        let Some(repeats) = self.repeats.get_mut(index) else {
            return;
        };
        let same = repeats.shown > 0
            && repeats.last == line.text
            && now.saturating_duration_since(repeats.since) < REPEAT_WINDOW;
        if same && repeats.shown >= REPEATS_SHOWN {
            repeats.suppressed += 1;
            return;
        }
        if same {
            repeats.shown += 1;
        } else {
            let suppressed = std::mem::take(&mut repeats.suppressed);
            repeats.last.clone_from(&line.text);
            repeats.shown = 1;
            repeats.since = now;
            if suppressed > 0 {
                self.enqueue(repeated_line(name, suppressed));
            }
        }
        self.enqueue_within(line, limit);
    }

    /// Say the count of every source that repeated a line and stayed quiet past the window.
    pub fn expire(&mut self, now: Instant) {
        let mut said = Vec::new();
        for repeats in &mut self.repeats {
            if repeats.suppressed > 0
                && now.saturating_duration_since(repeats.since) >= REPEAT_WINDOW
            {
                said.push(repeated_line(&repeats.source, repeats.suppressed));
                repeats.suppressed = 0;
                repeats.shown = 0;
            }
        }
        for line in said {
            self.enqueue(line);
        }
    }

    /// When the next count of repeats is due ([`ConsoleQueue::expire`]); `None` when no
    /// source is counting.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.repeats
            .iter()
            .filter(|r| r.suppressed > 0)
            .map(|r| r.since + REPEAT_WINDOW)
            .min()
    }

    /// Say every pending repeat count now (before a flush).
    pub fn end_repeats(&mut self) {
        let mut said = Vec::new();
        for repeats in &mut self.repeats {
            if repeats.suppressed > 0 {
                said.push(repeated_line(&repeats.source, repeats.suppressed));
                repeats.suppressed = 0;
                repeats.shown = 0;
            }
        }
        for line in said {
            self.enqueue(line);
        }
    }

    /// The next line to print: the count of a gap first, then the line after it.
    pub fn pop(&mut self) -> Option<Line> {
        match self.lines.front_mut() {
            Some(next) if next.dropped_before > 0 => {
                Some(dropped_line(std::mem::take(&mut next.dropped_before)))
            }
            Some(_) => {
                let queued = self.lines.pop_front()?;
                self.bytes = self.bytes.saturating_sub(queued.line.cost());
                Some(queued.line)
            }
            None if self.dropped_pending > 0 => {
                Some(dropped_line(std::mem::take(&mut self.dropped_pending)))
            }
            None => None,
        }
    }

    /// Whether nothing is left to print.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty() && self.dropped_pending == 0
    }

    /// Bytes of lines queued.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Lines dropped since the queue was made.
    pub fn dropped(&self) -> u64 {
        self.dropped_total
    }

    /// Queue `line` if it fits in the whole queue.
    fn enqueue(&mut self, line: Line) {
        self.enqueue_within(line, self.capacity);
    }

    /// Queue `line` if the queue then holds at most `limit` bytes; else count it dropped.
    fn enqueue_within(&mut self, line: Line, limit: usize) {
        let cost = line.cost();
        if self.bytes + cost > limit {
            self.dropped_pending += 1;
            self.dropped_total += 1;
            return;
        }
        self.bytes += cost;
        self.lines.push_back(Queued {
            line,
            dropped_before: std::mem::take(&mut self.dropped_pending),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything the queue gives, as the console would show it.
    fn drain(queue: &mut ConsoleQueue) -> Vec<String> {
        std::iter::from_fn(|| queue.pop())
            .map(|line| match line.kmsg {
                Some(_) => format!("{PREFIX}{}", line.text),
                None => line.text,
            })
            .collect()
    }

    #[test]
    fn a_full_queue_drops_new_lines_and_says_so_where_they_were() {
        let now = Instant::now();
        // Each line costs 6 bytes ("a: NN" and a newline): three fit in 18.
        let mut queue = ConsoleQueue::new(18);
        for i in 10..20 {
            queue.push(Line::as_is(format!("a: {i}")), Source::Marker, now);
            assert!(queue.bytes() <= 18);
        }
        assert_eq!(queue.dropped(), 7);
        assert_eq!(queue.pop(), Some(Line::as_is("a: 10")));
        queue.push(Line::as_is("a: 20"), Source::Marker, now);
        assert_eq!(
            drain(&mut queue),
            [
                "a: 11",
                "a: 12",
                "keelson-init: console: 7 lines dropped (console too slow)",
                "a: 20",
            ]
        );
        // A gap at the very end is said once the queue is empty.
        let mut queue = ConsoleQueue::new(6);
        for i in 10..13 {
            queue.push(Line::as_is(format!("a: {i}")), Source::Marker, now);
        }
        assert_eq!(
            drain(&mut queue),
            [
                "a: 10",
                "keelson-init: console: 2 lines dropped (console too slow)"
            ]
        );
        assert!(queue.is_empty());
    }

    #[test]
    fn a_flood_of_service_lines_leaves_room_for_pid_1s_own() {
        let now = Instant::now();
        let mut queue = ConsoleQueue::new(400);
        for i in 0..1000 {
            let line = Line::as_is(format!("machined: refused 10.0.{i}.1"));
            queue.push(line, Source::Service("machined"), now);
        }
        // Services fill 3/4 of 400 bytes at most: 10 lines of 27 bytes and one of 28.
        assert_eq!(queue.bytes(), 298);
        queue.push(Line::own("dhcp lease 10.0.2.15/24", 7), Source::Init, now);
        queue.push(Line::as_is("KEELSON STAGE2 READY"), Source::Marker, now);
        queue.push(Line::own("reboot: now", 7), Source::Init, now);
        let lines = drain(&mut queue);
        assert_eq!(
            lines[lines.len() - 4..],
            [
                "keelson-init: console: 989 lines dropped (console too slow)",
                "keelson-init: dhcp lease 10.0.2.15/24",
                "KEELSON STAGE2 READY",
                "keelson-init: reboot: now",
            ]
        );
    }

    #[test]
    fn a_line_longer_than_the_queue_is_dropped_and_counted() {
        let mut queue = ConsoleQueue::new(16);
        queue.push(Line::own("x".repeat(100), 7), Source::Init, Instant::now());
        assert_eq!(queue.bytes(), 0);
        assert_eq!(
            drain(&mut queue),
            ["keelson-init: console: 1 lines dropped (console too slow)"]
        );
    }

    #[test]
    fn repeats_beyond_the_limit_are_counted_and_said_once() {
        let start = Instant::now();
        let mut queue = ConsoleQueue::new(QUEUE_BYTES);
        let second = Duration::from_secs(1);
        for i in 0..10 {
            let line = Line::as_is("machined: refused 10.0.0.9: bad certificate");
            queue.push(line, Source::Service("machined"), start + second * i / 10);
        }
        // Another source's lines are limited on their own and do not end the burst.
        queue.push(Line::own("dhcp lease", 7), Source::Init, start + second);
        queue.push(
            Line::as_is("machined: listening"),
            Source::Service("machined"),
            start + second,
        );
        assert_eq!(
            drain(&mut queue),
            [
                "machined: refused 10.0.0.9: bad certificate",
                "machined: refused 10.0.0.9: bad certificate",
                "machined: refused 10.0.0.9: bad certificate",
                "keelson-init: dhcp lease",
                "machined: … last line repeated 7 times",
                "machined: listening",
            ]
        );
    }

    #[test]
    fn a_burst_ends_with_its_window_or_a_flush() {
        let start = Instant::now();
        let mut queue = ConsoleQueue::new(QUEUE_BYTES);
        let same = || Line::own("refused", 4);
        for _ in 0..5 {
            queue.push(same(), Source::Init, start);
        }
        // Still within the window: nothing to say yet.
        assert_eq!(queue.next_expiry(), Some(start + REPEAT_WINDOW));
        queue.expire(start + REPEAT_WINDOW / 2);
        assert_eq!(drain(&mut queue).len(), 3);
        // The same line after the window: the count, then the line again.
        queue.push(same(), Source::Init, start + REPEAT_WINDOW);
        assert_eq!(
            drain(&mut queue),
            [
                "keelson-init: … last line repeated 2 times",
                "keelson-init: refused"
            ]
        );
        // A source that goes quiet: said when its window passes (the line above began a
        // new window: two more are shown, two counted).
        let later = start + REPEAT_WINDOW;
        for _ in 0..4 {
            queue.push(same(), Source::Init, later);
        }
        drain(&mut queue);
        queue.expire(later + REPEAT_WINDOW);
        assert_eq!(
            drain(&mut queue),
            ["keelson-init: … last line repeated 2 times"]
        );
        // Before a flush, whatever the window.
        for _ in 0..5 {
            queue.push(Line::as_is("x: y"), Source::Service("x"), later);
        }
        drain(&mut queue);
        queue.end_repeats();
        assert_eq!(drain(&mut queue), ["x: … last line repeated 2 times"]);
    }

    #[test]
    fn markers_are_never_limited() {
        let now = Instant::now();
        let mut queue = ConsoleQueue::new(QUEUE_BYTES);
        for _ in 0..10 {
            queue.push(Line::as_is("KEELSON STAGE2 READY"), Source::Marker, now);
        }
        assert_eq!(drain(&mut queue).len(), 10);
    }

    #[test]
    fn the_limiter_remembers_a_bounded_number_of_sources() {
        let now = Instant::now();
        let mut queue = ConsoleQueue::new(QUEUE_BYTES * 4);
        for _ in 0..5 {
            queue.push(Line::as_is("s0: same"), Source::Service("s0"), now);
        }
        for i in 1..=SOURCES {
            let name = format!("s{i}");
            queue.push(
                Line::as_is(format!("{name}: hi")),
                Source::Service(&name),
                now,
            );
        }
        let lines = drain(&mut queue);
        assert_eq!(queue.repeats.len(), SOURCES);
        assert!(
            lines.contains(&"s0: … last line repeated 2 times".to_string()),
            "{lines:?}"
        );
    }
}
