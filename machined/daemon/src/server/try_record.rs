//! The record of an `apply-config --mode try`, kept in STATE so that its revert survives a
//! restart of machined, and a revert that failed is reported as failed.
//!
//! A try never writes `config.toml`: the config to go back to (the record's `previous`)
//! is the one in STATE, which is also what the node boots with, so a reboot ends a try
//! too. Its own config is kept beside it ([`CONFIG_TRIED`]) and the record
//! ([`TRY_RECORD`], JSON) names both, the parts applied live, the boot it belongs to
//! (`/proc/sys/kernel/random/boot_id`), when it was applied and when it reverts. Both are
//! written atomically.
//!
//! - **apply**: the tried config, then the record, are written before anything is applied
//!   live; a live apply that fails removes them (nothing is on trial).
//! - **confirm**: `config.toml` is written with the tried config, then the record and the
//!   tried config are removed. A restart between the two finds `config.toml` equal to the
//!   tried config: the confirm is finished then.
//! - **deadline**: the previous config is applied to the record's parts, then the record
//!   and the tried config are removed. A revert that fails leaves the record marked
//!   failed with why, and `health` reports it (not ok) until a later apply (no-reboot,
//!   try, reboot) or a reboot puts the node in a known state.
//! - **machined's start** ([`decide`]): a pending record of this boot is re-armed for the
//!   time left, reverted at once when the deadline has passed; a record of an earlier
//!   boot is removed (that boot ran `config.toml`: the try ended with it, and a failed
//!   revert with it); a failed record of this boot is reported again; a pending record
//!   whose boot cannot be told (no boot id, no boot clock) is reverted at once, which is
//!   always safe: it puts back the config in STATE.
//!
//! Time. The deadline is kept twice: as wall-clock time (milliseconds since the Unix
//! epoch), which is what `health` shows and what an operator reads in the file, and on
//! `CLOCK_BOOTTIME` (milliseconds since this boot), which the revert is timed by. The wall
//! clock jumps: machined's own time sync steps it at start-up when the hardware clock
//! was off, which is exactly when a restarted machined re-arms a try. Timed by the wall
//! clock, a step forward would revert early and a step back would keep an unconfirmed
//! config for as long as the step. The boot clock never jumps, and a record is only
//! re-armed in the boot that wrote it, where that clock means the same. After a step, the
//! wall-clock deadline `health` shows is off by the step; the seconds left it shows are
//! right. While machined runs, the timer is tokio's (monotonic) and the record is not
//! read.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keelson_node_protocol::state::{CONFIG, CONFIG_TRIED, TRY_RECORD};
use serde::{Deserialize, Serialize};

use crate::backend::LivePart;
use crate::node::health::Check;

/// Where the kernel names the running boot.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// The name of the `health` check a try gives.
pub const CHECK_NAME: &str = "apply-config try";

/// A `try` apply, as STATE keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TryRecord {
    /// The config the revert goes back to, a file of STATE (`config.toml`).
    pub previous: String,
    /// The tried config, a file of STATE (`config.tried.toml`).
    pub tried: String,
    /// The parts applied live, which the revert applies again from `previous`.
    pub parts: Vec<LivePart>,
    /// The boot the try was applied in (empty: unknown).
    pub boot_id: String,
    /// When it was applied, in milliseconds since the Unix epoch.
    pub applied_unix_ms: u64,
    /// When it reverts, in milliseconds since the Unix epoch (shown, not timed by).
    pub deadline_unix_ms: u64,
    /// When it reverts, in milliseconds of `CLOCK_BOOTTIME` (none: the clock was not
    /// readable, and a restart reverts at once).
    pub deadline_boot_ms: Option<u64>,
    /// Where it stands.
    #[serde(default)]
    pub outcome: TryOutcome,
}

/// Where a try stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case", deny_unknown_fields)]
pub enum TryOutcome {
    /// Applied live, waiting for a confirmation or its deadline.
    #[default]
    Pending,
    /// The deadline passed and re-applying the previous config failed.
    Failed {
        /// Why.
        why: String,
        /// When, in milliseconds since the Unix epoch.
        at_unix_ms: u64,
    },
}

/// The clocks and the boot, read once for one decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Now {
    /// Wall-clock time, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// `CLOCK_BOOTTIME`, in milliseconds (none: not readable).
    pub boot_ms: Option<u64>,
    /// The running boot's id (none: not readable).
    pub boot_id: Option<String>,
}

impl Now {
    /// The node's clocks and boot id.
    pub fn read() -> Now {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let boot_ms = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
            .ok()
            .map(|t| u64::try_from(Duration::from(t).as_millis()).unwrap_or(u64::MAX));
        let boot_id = std::fs::read_to_string(BOOT_ID)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        Now {
            unix_ms,
            boot_ms,
            boot_id,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl TryRecord {
    /// A pending try of `parts`, applied `now`, that reverts after `timeout`.
    pub fn new(parts: Vec<LivePart>, now: &Now, timeout: Duration) -> TryRecord {
        let timeout = millis(timeout);
        TryRecord {
            previous: CONFIG.into(),
            tried: CONFIG_TRIED.into(),
            parts,
            boot_id: now.boot_id.clone().unwrap_or_default(),
            applied_unix_ms: now.unix_ms,
            deadline_unix_ms: now.unix_ms.saturating_add(timeout),
            deadline_boot_ms: now.boot_ms.map(|b| b.saturating_add(timeout)),
            outcome: TryOutcome::Pending,
        }
    }

    /// A record of STATE that cannot be read: every part is reverted at once.
    pub fn unreadable() -> TryRecord {
        TryRecord {
            previous: CONFIG.into(),
            tried: CONFIG_TRIED.into(),
            parts: LivePart::ALL.to_vec(),
            boot_id: String::new(),
            applied_unix_ms: 0,
            deadline_unix_ms: 0,
            deadline_boot_ms: None,
            outcome: TryOutcome::Pending,
        }
    }

    /// The record's JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// The record marked failed with `why` at `now`.
    #[must_use]
    pub fn failed(mut self, why: String, now: &Now) -> TryRecord {
        self.outcome = TryOutcome::Failed {
            why,
            at_unix_ms: now.unix_ms,
        };
        self
    }

    /// The parts as config keys, for messages.
    fn keys(&self) -> String {
        self.parts
            .iter()
            .map(|p| p.key())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What machined does with a record it finds at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Waits this long more, then reverts.
    Rearm(Duration),
    /// Reverts now: the deadline passed, or the boot cannot be told.
    RevertNow,
    /// The record is an earlier boot's, which booted the previous config: removed.
    EndedByBoot,
    /// The revert failed before the restart: reported.
    Failed,
}

/// Decides what a record found at machined's start means `now` (see the module doc).
pub fn decide(record: &TryRecord, now: &Now) -> Resume {
    let same_boot = match now.boot_id.as_deref() {
        Some(boot_id) if !record.boot_id.is_empty() => Some(record.boot_id == boot_id),
        _ => None,
    };
    if same_boot == Some(false) {
        return Resume::EndedByBoot;
    }
    if matches!(record.outcome, TryOutcome::Failed { .. }) {
        return Resume::Failed;
    }
    if same_boot.is_none() {
        return Resume::RevertNow;
    }
    match (record.deadline_boot_ms, now.boot_ms) {
        (Some(deadline), Some(boot)) if deadline > boot => {
            Resume::Rearm(Duration::from_millis(deadline - boot))
        }
        _ => Resume::RevertNow,
    }
}

/// Wall-clock milliseconds as UTC (RFC 3339, to the second).
fn utc(unix_ms: u64) -> String {
    i64::try_from(unix_ms / 1000)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{unix_ms} ms after the Unix epoch"))
}

/// The `health` check of a try waiting `left` more, or of a failed revert.
pub fn health_check(record: &TryRecord, left: Duration) -> Check {
    match &record.outcome {
        TryOutcome::Pending => Check {
            name: CHECK_NAME.into(),
            ok: true,
            reason: format!(
                "a config applied at {} with --mode try ({}) reverts in {} s, at {}, unless `machinectl apply-config --confirm` comes first",
                utc(record.applied_unix_ms),
                record.keys(),
                left.as_secs(),
                utc(record.deadline_unix_ms)
            ),
        },
        TryOutcome::Failed { why, at_unix_ms } => Check {
            name: CHECK_NAME.into(),
            ok: false,
            reason: format!(
                "the config applied at {} with --mode try was not confirmed, and its revert at {} failed: {why}; the node may run parts of either config ({}): apply a config again (--mode no-reboot or reboot) to put it in a known state",
                utc(record.applied_unix_ms),
                utc(*at_unix_ms),
                record.keys()
            ),
        },
    }
}

/// The record in `bytes`, or why it cannot be read.
pub fn parse(bytes: &[u8]) -> Result<TryRecord, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("{TRY_RECORD} is not a try record: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn now(boot_ms: Option<u64>, boot_id: Option<&str>) -> Now {
        Now {
            unix_ms: 1_800_000_000_000,
            boot_ms,
            boot_id: boot_id.map(str::to_owned),
        }
    }

    #[test]
    fn a_record_found_at_start_is_rearmed_reverted_dropped_or_reported() {
        let applied = now(Some(10_000), Some("boot-1"));
        let record = TryRecord::new(vec![LivePart::Sysctls], &applied, Duration::from_secs(60));
        let check = |at: &Now, want: Resume| assert_eq!(decide(&record, at), want, "{at:?}");
        // Same boot: the time left on the boot clock, whatever the wall clock did.
        let mut later = now(Some(25_000), Some("boot-1"));
        later.unix_ms += 3_600_000;
        check(&later, Resume::Rearm(Duration::from_secs(45)));
        later.unix_ms -= 7_200_000;
        check(&later, Resume::Rearm(Duration::from_secs(45)));
        // Past the deadline, or exactly at it.
        check(&now(Some(70_000), Some("boot-1")), Resume::RevertNow);
        check(&now(Some(99_000), Some("boot-1")), Resume::RevertNow);
        // Another boot ran the previous config.
        check(&now(Some(1_000), Some("boot-2")), Resume::EndedByBoot);
        // A boot that cannot be told: reverted at once.
        check(&now(Some(25_000), None), Resume::RevertNow);
        check(&now(None, Some("boot-1")), Resume::RevertNow);
        let unknown = TryRecord::new(vec![], &now(Some(10_000), None), Duration::from_secs(60));
        assert_eq!(
            decide(&unknown, &now(Some(25_000), Some("boot-1"))),
            Resume::RevertNow
        );
        // A failed revert stays failed, until a boot runs the config in STATE.
        let failed = record.clone().failed("refused".into(), &later);
        assert_eq!(
            decide(&failed, &now(Some(25_000), Some("boot-1"))),
            Resume::Failed
        );
        assert_eq!(decide(&failed, &now(None, None)), Resume::Failed);
        assert_eq!(
            decide(&failed, &now(Some(1_000), Some("boot-2"))),
            Resume::EndedByBoot
        );
    }

    #[test]
    fn the_record_round_trips_and_names_its_files() {
        let record = TryRecord::new(
            vec![LivePart::Sysctls, LivePart::Hostname],
            &now(Some(5), Some("b")),
            Duration::from_secs(2),
        )
        .failed("init refused".into(), &now(None, None));
        let json = String::from_utf8(record.to_json()).unwrap();
        assert!(json.contains("\"previous\": \"config.toml\""), "{json}");
        assert!(json.contains("\"tried\": \"config.tried.toml\""), "{json}");
        assert!(json.contains("\"state\": \"failed\""), "{json}");
        assert_eq!(parse(json.as_bytes()).unwrap(), record);
        assert!(
            parse(b"{")
                .unwrap_err()
                .starts_with("apply-try.json is not a try record")
        );
    }

    #[test]
    fn health_says_when_a_try_reverts_and_why_a_revert_failed() {
        let record = TryRecord::new(
            vec![LivePart::Sysctls],
            &now(Some(5), Some("b")),
            Duration::from_secs(90),
        );
        let pending = health_check(&record, Duration::from_secs(30));
        assert!(pending.ok);
        assert_eq!(
            pending.reason,
            "a config applied at 2027-01-15T08:00:00Z with --mode try (machine.sysctls) reverts in 30 s, at 2027-01-15T08:01:30Z, unless `machinectl apply-config --confirm` comes first"
        );
        let failed = health_check(
            &record.failed("init refused: no such sysctl".into(), &now(None, None)),
            Duration::ZERO,
        );
        assert!(!failed.ok);
        assert!(
            failed.reason.contains(
                "its revert at 2027-01-15T08:00:00Z failed: init refused: no such sysctl; "
            ),
            "{}",
            failed.reason
        );
    }
}
