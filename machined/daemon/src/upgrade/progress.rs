//! The progress an upgrade reports to the server, which sends it on as `UpgradeProgress`
//! messages: [`Reporter`] for a phase's lines, [`Meter`] for its byte counts. Every tenth
//! of a phase's total is sent at its exact boundary and waits for room, so the CLI's
//! `transfer 50%` line is always shown (a power-cut test waits for it); the counts in
//! between are dropped when the receiver is behind.

use keelson_api::api::proto;
use tokio::sync::mpsc;

/// A progress report: the phase (`check`, then STATE's phases: `transfer`, `write`,
/// `verify`, `entry`, `reboot`), bytes done of its total (0: unknown), and a line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// The phase.
    pub phase: String,
    /// Bytes done.
    pub done: u64,
    /// Bytes in all (0: unknown).
    pub total: u64,
    /// A line for people.
    pub message: String,
}

impl From<Progress> for proto::UpgradeProgress {
    fn from(p: Progress) -> Self {
        proto::UpgradeProgress {
            phase: p.phase,
            done: p.done,
            total: p.total,
            message: p.message,
            ..Default::default()
        }
    }
}

/// Sends progress reports (a closed receiver changes nothing).
#[derive(Debug, Clone)]
pub struct Reporter(mpsc::Sender<Progress>);

impl Reporter {
    /// A reporter on `sender`.
    pub fn new(sender: mpsc::Sender<Progress>) -> Reporter {
        Reporter(sender)
    }

    /// A phase's line (waits for room: these are few).
    pub async fn say(&self, phase: &str, done: u64, total: u64, message: &str) {
        let _ = self
            .0
            .send(Progress {
                phase: phase.into(),
                done,
                total,
                message: message.into(),
            })
            .await;
    }

    /// A meter of `phase`'s bytes out of `total`.
    pub fn meter(&self, phase: &'static str, total: u64) -> Meter {
        Meter {
            sender: self.0.clone(),
            phase,
            total,
            tenths: 0,
        }
    }
}

/// A phase's byte count: each tenth of the total crossed is sent at its boundary (done =
/// the boundary, so the CLI shows exactly 10%, 20%, ...) and waits for room; other counts
/// are sent only when the receiver has room.
#[derive(Debug)]
pub struct Meter {
    sender: mpsc::Sender<Progress>,
    phase: &'static str,
    total: u64,
    /// The tenths already sent.
    tenths: u64,
}

impl Meter {
    /// Reports `done` bytes (from async code).
    pub async fn update(&mut self, done: u64) {
        let (boundaries, count) = self.reports(done);
        for p in boundaries {
            let _ = self.sender.send(p).await;
        }
        if let Some(p) = count {
            let _ = self.sender.try_send(p);
        }
    }

    /// Reports `done` bytes (from a blocking task; never from the runtime's threads).
    pub fn update_blocking(&mut self, done: u64) {
        let (boundaries, count) = self.reports(done);
        for p in boundaries {
            let _ = self.sender.blocking_send(p);
        }
        if let Some(p) = count {
            let _ = self.sender.try_send(p);
        }
    }

    /// The boundaries crossed up to `done`, and the count itself unless it is the last
    /// boundary.
    fn reports(&mut self, done: u64) -> (Vec<Progress>, Option<Progress>) {
        let mut boundaries = Vec::new();
        let mut last = None;
        while let Some(boundary) = self.next_boundary()
            && done >= boundary
        {
            boundaries.push(self.progress(boundary));
            last = Some(boundary);
            self.tenths += 1;
        }
        let count = (last != Some(done)).then(|| self.progress(done));
        (boundaries, count)
    }

    /// The byte count of the next tenth (rounded up: reaching it shows that percent).
    fn next_boundary(&self) -> Option<u64> {
        if self.total == 0 || self.tenths >= 10 {
            return None;
        }
        let tenth = u128::from(self.tenths + 1);
        let bytes = (u128::from(self.total) * tenth).div_ceil(10);
        Some(u64::try_from(bytes).unwrap_or(self.total))
    }

    fn progress(&self, done: u64) -> Progress {
        Progress {
            phase: self.phase.into(),
            done,
            total: self.total,
            message: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The percents the CLI computes from what a meter of `total` sent for `updates`.
    fn check(total: u64, updates: &[u64], expected_percents: &[u64]) {
        let (tx, mut rx) = mpsc::channel(1024);
        let mut meter = Reporter::new(tx).meter("transfer", total);
        for done in updates {
            let (boundaries, count) = meter.reports(*done);
            for p in boundaries.into_iter().chain(count) {
                meter.sender.try_send(p).unwrap();
            }
        }
        let mut percents = Vec::new();
        while let Ok(p) = rx.try_recv() {
            assert_eq!(p.total, total);
            percents.push(p.done * 100 / p.total);
        }
        assert_eq!(
            percents, expected_percents,
            "total {total}, updates {updates:?}"
        );
    }

    #[test]
    fn every_tenth_is_sent_at_its_boundary() {
        check(1000, &[50, 150], &[5, 10, 15]);
        // A jump over several tenths sends each of them.
        check(
            1000,
            &[95, 480, 1000],
            &[9, 10, 20, 30, 40, 48, 50, 60, 70, 80, 90, 100],
        );
        // Sizes that do not divide by ten: still exactly 10%, 50%, 90%.
        check(
            60_000_007,
            &[59_999_000, 60_000_007],
            &[10, 20, 30, 40, 50, 60, 70, 80, 90, 99, 100],
        );
    }
}
