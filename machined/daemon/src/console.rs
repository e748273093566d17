//! The few lines machined prints on the node's console, beside its log.
//!
//! machined's standard error is its log: PID 1 keeps it for `machinectl logs machined` and
//! does not copy it to the console. A line an operator at the console must see (the
//! certificate fingerprint of maintenance mode, whose API serves no logs) is a `tracing`
//! event with the target [`TARGET`]: it goes to the log like any other, and [`layer`]
//! also writes it to the console device, prefixed `keelson-machined: ` as PID 1 prefixes
//! its own lines.
//!
//! A slow serial console must not stall the API: the lines are handed to a thread of
//! their own through a bounded queue, and a line that finds the queue full is dropped from
//! the console alone (the log keeps it).

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterFn, Filtered};
use tracing_subscriber::fmt::MakeWriter;

/// The target of events that are also printed on the console.
pub const TARGET: &str = "console";

/// The prefix of machined's console lines.
pub const PREFIX: &str = "keelson-machined: ";

/// The node's console device.
pub const DEVICE: &str = "/dev/console";

/// How many lines may wait for the console before new ones are dropped from it.
const QUEUE: usize = 16;

/// The layer that writes [`TARGET`] events on `device`, one line each, from a thread of
/// its own.
pub fn layer<S>(device: PathBuf) -> Filtered<impl Layer<S>, FilterFn, S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let (tx, rx) = sync_channel(QUEUE);
    let spawned = std::thread::Builder::new()
        .name("console".into())
        .spawn(move || write_lines(&device, &rx));
    if let Err(e) = spawned {
        // The log still has every line; only the console misses them.
        eprintln!("machined: cannot start the console writer: {e}");
    }
    lines_layer(ConsoleQueue(tx))
}

/// The formatting of console lines (the message alone), written through `writer`.
fn lines_layer<S, W>(writer: W) -> Filtered<impl Layer<S>, FilterFn, S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .with_level(false)
        .with_filter(FilterFn::new(|meta| meta.target() == TARGET))
}

/// Writes each queued line on the console device, opened for each line (a console that
/// is not there yet or went away costs that line alone).
fn write_lines(device: &std::path::Path, lines: &Receiver<Vec<u8>>) {
    for line in lines {
        let opened = OpenOptions::new()
            .append(true)
            .custom_flags(nix::fcntl::OFlag::O_NOCTTY.bits())
            .open(device);
        if let Ok(mut console) = opened {
            let _ = console.write_all(&line);
        }
    }
}

/// The sending end of the console thread's queue.
#[derive(Debug)]
struct ConsoleQueue(SyncSender<Vec<u8>>);

impl<'a> MakeWriter<'a> for ConsoleQueue {
    type Writer = QueuedLine<'a>;

    fn make_writer(&'a self) -> QueuedLine<'a> {
        QueuedLine(&self.0)
    }
}

/// One formatted event, queued for the console as one line with the prefix.
#[derive(Debug)]
struct QueuedLine<'a>(&'a SyncSender<Vec<u8>>);

impl std::io::Write for QueuedLine<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut line = Vec::with_capacity(PREFIX.len() + buf.len());
        line.extend_from_slice(PREFIX.as_bytes());
        line.extend_from_slice(buf);
        // Full (a slow console) or gone: dropped from the console, kept in the log.
        let _ = self.0.try_send(line);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[test]
    fn only_console_events_reach_the_console_as_prefixed_lines() {
        let dir = tempfile::tempdir().unwrap();
        let device = dir.path().join("console");
        std::fs::write(&device, "").unwrap();
        let (tx, rx) = sync_channel(QUEUE);
        let subscriber = tracing_subscriber::registry().with(lines_layer(ConsoleQueue(tx)));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("not for the console");
            tracing::info!(target: TARGET, "for the console");
            tracing::warn!(target: TARGET, "also for the console");
        });
        // The subscriber (and the queue's sender) is gone: the writer ends after the lines.
        write_lines(&device, &rx);
        assert_eq!(
            std::fs::read_to_string(&device).unwrap(),
            "keelson-machined: for the console\nkeelson-machined: also for the console\n"
        );
    }

    #[test]
    fn a_full_queue_drops_lines_without_waiting() {
        let (tx, rx) = sync_channel(1);
        let subscriber = tracing_subscriber::registry().with(lines_layer(ConsoleQueue(tx)));
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..5 {
                tracing::info!(target: TARGET, "line {i}");
            }
        });
        let lines: Vec<Vec<u8>> = rx.iter().collect();
        assert_eq!(lines, [b"keelson-machined: line 0\n".to_vec()]);
    }
}
