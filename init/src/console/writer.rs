//! The console writer: the one owner of `/dev/console` in stage 2, a thread that prints
//! the lines of a [`ConsoleQueue`] so that no one else ever waits for the console.
//!
//! Producers (the `tracing` subscriber of [`crate::logging`], called on the main loop's
//! thread for PID 1's own lines and for every service's output line) only take a mutex,
//! put the line in the queue and return: the queue is bounded in bytes, drops what does
//! not fit and counts it, and limits repeated lines (see [`super::queue`]). A slow or
//! stalled console (a 9600-baud serial line, a host that stopped reading a virtual
//! console) delays the console alone; reaping, the control socket and DHCP go on.
//!
//! Why a thread rather than the main loop polling the console for `POLLOUT`: lines are
//! logged from everywhere, also from stage 2's synchronous steps before the loop starts
//! (early mounts, disks: a first boot formats EPHEMERAL for seconds) and after it ends
//! (the shutdown's last lines), and from the panic hook; a thread prints them as they
//! come, whereas the loop would hold them until it next polls, and a panic could not
//! flush them at all. PID 1 already ran this thread (and the prefetcher's); it only ever
//! blocks on the console and on its condition variable, and holds the mutex only to take
//! a line out, never while it writes. The thread prints through a [`Log`] (the console: `/dev/console`
//! opened non-blocking and waited on with `poll`, see [`crate::console::Console`]).
//!
//! [`ConsoleWriter::flush`] waits for the queue to empty, at most a deadline: before a
//! reboot and in the panic hook ([`flush_installed`]), so the last lines are out. It never
//! waits longer, however stuck the console is.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use super::Log;
use super::queue::{ConsoleQueue, Line, Source};

/// The writer installed for stage 2, for the panic hook.
static INSTALLED: OnceLock<Arc<Shared>> = OnceLock::new();

/// What producers and the thread share.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// The thread waits here for lines.
    lines: Condvar,
    /// Flushes wait here for the queue to empty.
    drained: Condvar,
}

#[derive(Debug)]
struct State {
    queue: ConsoleQueue,
    /// The thread is printing a line it took out of the queue.
    printing: bool,
    /// `/dev` was mounted: the thread (re)opens the console before its next line.
    reopen: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wait until the queue is empty and nothing is being printed, at most until
    /// `deadline`; whether it is.
    fn wait_drained(&self, deadline: Instant) -> bool {
        let mut state = self.lock();
        state.queue.end_repeats();
        self.lines.notify_one();
        loop {
            if state.queue.is_empty() && !state.printing {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = match self.drained.wait_timeout(state, left) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

/// The producers' handle on the console writer thread.
#[derive(Debug, Clone)]
pub struct ConsoleWriter {
    shared: Arc<Shared>,
}

impl ConsoleWriter {
    /// Start the thread printing through `out`, with a queue of `capacity` bytes.
    pub fn start<L: Log + Send + 'static>(out: L, capacity: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: ConsoleQueue::new(capacity),
                printing: false,
                reopen: false,
            }),
            lines: Condvar::new(),
            drained: Condvar::new(),
        });
        let thread = shared.clone();
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || print_lines(&out, &thread))?;
        Ok(ConsoleWriter { shared })
    }

    /// Make this the writer that [`flush_installed`] flushes (the first one stays).
    pub fn install(&self) {
        let _ = INSTALLED.set(self.shared.clone());
    }

    /// Queue `line` from `source`; never waits for the console.
    pub fn push(&self, line: Line, source: Source<'_>) {
        let mut state = self.shared.lock();
        state.queue.push(line, source, Instant::now());
        drop(state);
        self.shared.lines.notify_one();
    }

    /// Open the console devices before the next line (after `/dev` was mounted).
    pub fn reopen(&self) {
        self.shared.lock().reopen = true;
        self.shared.lines.notify_one();
    }

    /// Wait until every line so far is printed, at most `limit`; whether they are.
    pub fn flush(&self, limit: Duration) -> bool {
        self.shared.wait_drained(Instant::now() + limit)
    }

    /// Lines dropped from the console so far.
    pub fn dropped(&self) -> u64 {
        self.shared.lock().queue.dropped()
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.shared.lock().queue.bytes()
    }
}

/// Flush the installed writer (if any) for at most `limit`, from the panic hook or a
/// direct write: it never waits on a lock the panicking thread may hold, only tries it.
/// Whether nothing is left (true without a writer).
pub fn flush_installed(limit: Duration) -> bool {
    let Some(shared) = INSTALLED.get() else {
        return true;
    };
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(mut state) = shared.state.try_lock() {
            state.queue.end_repeats();
            if state.queue.is_empty() && !state.printing {
                return true;
            }
            drop(state);
            shared.lines.notify_one();
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The thread: take a line, print it, and again; say the counts of repeats when due. It
/// sleeps while there is nothing to print or count (no wake-up of an idle node).
fn print_lines(out: &dyn Log, shared: &Shared) {
    loop {
        let (line, reopen) = {
            let mut state = shared.lock();
            state.printing = false;
            loop {
                state.queue.expire(Instant::now());
                let reopen = std::mem::take(&mut state.reopen);
                let line = state.queue.pop();
                if reopen || line.is_some() {
                    state.printing = true;
                    break (line, reopen);
                }
                shared.drained.notify_all();
                // Asleep until a line comes, or a count of repeats is due.
                state = match state.queue.next_expiry() {
                    Some(due) => {
                        let left = due.saturating_duration_since(Instant::now());
                        match shared.lines.wait_timeout(state, left) {
                            Ok((state, _)) => state,
                            Err(poisoned) => poisoned.into_inner().0,
                        }
                    }
                    None => shared
                        .lines
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner),
                };
            }
        };
        if reopen {
            out.reopen();
        }
        match line {
            Some(Line {
                text,
                kmsg: Some(level),
            }) => out.line_at(level, &text),
            Some(Line { text, kmsg: None }) => out.raw(&text),
            None => {}
        }
    }
}
