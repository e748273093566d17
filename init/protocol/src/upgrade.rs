//! What a node remembers of its upgrades, in STATE ([`UPGRADE_RECORD`], JSON, written
//! with [`crate::state::write_atomic`]).
//!
//! machined starts an [`Attempt`] before it writes a byte of the inactive slot and adds
//! each phase it finishes (transfer, write, verify, entry, reboot). PID 1 of the new slot
//! adds `stage2` as soon as STATE is mounted and `healthy` when it blesses the slot. PID 1
//! of a slot that the loader fell back to finds the other slot's entry without tries left,
//! marks the attempt [`Outcome::Failed`] with the last phase the attempt reached, and adds
//! the version to [`UpgradeRecord::failed`]: machined refuses that version until forced.

use serde::{Deserialize, Serialize};

/// The record's file in STATE.
pub const UPGRADE_RECORD: &str = "upgrade.json";

/// The phases of an upgrade, in order, as they are recorded and reported.
pub const PHASES: &[&str] = &[
    PHASE_TRANSFER,
    PHASE_WRITE,
    PHASE_VERIFY,
    PHASE_ENTRY,
    PHASE_REBOOT,
    PHASE_STAGE2,
    PHASE_HEALTHY,
];
/// The bundle was received (or fetched) and its checks passed.
pub const PHASE_TRANSFER: &str = "transfer";
/// The payload was written to the inactive slot and the ESP.
pub const PHASE_WRITE: &str = "write";
/// What was written was read back and matched (sha256, verity root).
pub const PHASE_VERIFY: &str = "verify";
/// The new boot entry was renamed into place.
pub const PHASE_ENTRY: &str = "entry";
/// The node was asked to reboot into the new slot.
pub const PHASE_REBOOT: &str = "reboot";
/// The new slot's stage 2 ran (STATE mounted).
pub const PHASE_STAGE2: &str = "stage2";
/// The new slot became healthy and was blessed.
pub const PHASE_HEALTHY: &str = "healthy";

/// Everything STATE keeps of upgrades.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRecord {
    /// The newest attempt, if any.
    #[serde(default)]
    pub attempt: Option<Attempt>,
    /// Versions that failed on this node, oldest first.
    #[serde(default)]
    pub failed: Vec<FailedVersion>,
}

/// One upgrade (or rollback).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// The version the node ran when the attempt started.
    pub from_version: String,
    /// The slot it ran from (`a`/`b`).
    pub from_slot: String,
    /// The version the attempt installs.
    pub to_version: String,
    /// The slot it installs into.
    pub to_slot: String,
    /// Whether this is a rollback (no write: the other slot's entry made the next).
    #[serde(default)]
    pub rollback: bool,
    /// Each phase reached, with the time (milliseconds since the Unix epoch).
    #[serde(default)]
    pub phases: Vec<PhaseTime>,
    /// Where the attempt stands.
    #[serde(default)]
    pub outcome: Outcome,
    /// The boot entry the new slot booted from, as the loader named it (`keelson-b+2-1.conf`).
    #[serde(default)]
    pub booted_entry: Option<String>,
    /// Tries the loader used before the slot was blessed or given up.
    #[serde(default)]
    pub tries_used: Option<u32>,
    /// Why the new slot's last trial boot was given up (its health deadline passed:
    /// `machined not ready after 300 s`), recorded by PID 1 before it reboots; the reason of
    /// the failure once the loader has no tries left for the slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_reason: Option<String>,
    /// The services of [`COMEBACK_SERVICES`] that were ready when the attempt started (a
    /// control plane's etcd, the kubelet): the new slot is healthy only once they are
    /// ready again, so that a version that breaks them is not blessed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expect_ready: Vec<String>,
}

/// The services that machined starts itself (so PID 1 cannot know at boot whether they
/// will run) and whose readiness before an upgrade the new slot must reach again.
pub const COMEBACK_SERVICES: &[&str] = &[crate::etcd::SERVICE, crate::kubelet::SERVICE];

impl Attempt {
    /// Records that `phase` was reached at `at_ms` (a phase already recorded is kept).
    pub fn reach(&mut self, phase: &str, at_ms: u64) {
        if !self.reached(phase) {
            self.phases.push(PhaseTime {
                phase: phase.to_string(),
                at_ms,
            });
        }
    }

    /// Whether `phase` was reached.
    pub fn reached(&self, phase: &str) -> bool {
        self.phases.iter().any(|p| p.phase == phase)
    }

    /// The last phase reached, if any.
    pub fn last_phase(&self) -> Option<&str> {
        self.phases.last().map(|p| p.phase.as_str())
    }
}

/// A phase and when it was reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseTime {
    /// One of [`PHASES`].
    pub phase: String,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// Where an attempt stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Outcome {
    /// machined is transferring, writing or verifying.
    #[default]
    InProgress,
    /// Written; the new slot boots at the next reboot (`--stage`).
    Staged,
    /// The node is rebooting into the new slot, or the new slot is on trial.
    Booting,
    /// The new slot became healthy and was blessed.
    Blessed,
    /// The attempt failed.
    Failed {
        /// The phase that failed (the one after the last reached).
        phase: String,
        /// Why, as far as the node could tell.
        reason: String,
    },
}

/// A version that failed on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedVersion {
    /// The version.
    pub version: String,
    /// The phase that failed.
    pub phase: String,
    /// Why.
    pub reason: String,
    /// When the failure was found (milliseconds since the Unix epoch).
    pub at_ms: u64,
}

impl UpgradeRecord {
    /// Parses the record; an unreadable record is reported, never guessed.
    pub fn parse(bytes: &[u8]) -> Result<UpgradeRecord, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The record's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Whether `version` failed here.
    pub fn has_failed(&self, version: &str) -> Option<&FailedVersion> {
        self.failed.iter().find(|f| f.version == version)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_record_round_trips() {
        let mut attempt = Attempt {
            from_version: "0.1.0".into(),
            from_slot: "a".into(),
            to_version: "0.2.0".into(),
            to_slot: "b".into(),
            ..Attempt::default()
        };
        attempt.reach(PHASE_TRANSFER, 1);
        attempt.reach(PHASE_WRITE, 2);
        attempt.reach(PHASE_WRITE, 3);
        assert_eq!(attempt.phases.len(), 2);
        assert_eq!(attempt.last_phase(), Some(PHASE_WRITE));
        attempt.outcome = Outcome::Failed {
            phase: PHASE_STAGE2.into(),
            reason: "the kernel or stage 1 never reached stage 2".into(),
        };
        let record = UpgradeRecord {
            attempt: Some(attempt),
            failed: vec![FailedVersion {
                version: "0.3.0".into(),
                phase: PHASE_HEALTHY.into(),
                reason: "not healthy within 300 s".into(),
                at_ms: 5,
            }],
        };
        let back = UpgradeRecord::parse(&record.to_bytes()).unwrap();
        assert_eq!(back, record);
        assert!(back.has_failed("0.3.0").is_some());
        assert!(back.has_failed("0.2.0").is_none());
        assert_eq!(
            UpgradeRecord::parse(b"{}").unwrap(),
            UpgradeRecord::default()
        );
    }
}
