//! `machinectl upgrade status`: the two slots as the ESP's entries show them (which one
//! runs, which one boots next by systemd-boot's order), and STATE's upgrade record; with
//! the conversions onto the wire's `UpgradeStatusResponse`.

use keelson_api::api::proto;
use keelson_configs::boot::{FoundEntry, boot_order};
use keelson_configs::layout::Slot;
use keelson_node_protocol::upgrade::{Outcome, UpgradeRecord};

/// One slot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotState {
    /// `a` or `b`.
    pub slot: String,
    /// The OS version of its entry; empty without one.
    pub version: String,
    /// Its entry's file name; empty without one.
    pub entry: String,
    /// No boot counter.
    pub blessed: bool,
    /// Tries left when on trial.
    pub tries_left: u32,
    /// It runs now.
    pub booted: bool,
    /// It boots next.
    pub next: bool,
}

/// The slots and the record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpgradeStatus {
    /// Slot A then slot B.
    pub slots: Vec<SlotState>,
    /// STATE's upgrade record.
    pub record: UpgradeRecord,
}

/// The slots as `entries` show them, `booted` the running slot (if known).
pub fn slots(entries: &[FoundEntry], booted: Option<Slot>) -> Vec<SlotState> {
    let next = boot_order(entries).first().map(|e| e.name.slot);
    [Slot::A, Slot::B]
        .into_iter()
        .map(|slot| {
            let entry = boot_order(entries)
                .into_iter()
                .find(|e| e.name.slot == slot);
            SlotState {
                slot: slot.letter().to_owned(),
                version: entry
                    .map(|e| e.entry.entry_version().os_version)
                    .unwrap_or_default(),
                entry: entry.map(|e| e.name.file_name()).unwrap_or_default(),
                blessed: entry.is_some_and(|e| !e.name.on_trial()),
                tries_left: entry.and_then(|e| e.name.tries_left).unwrap_or(0),
                booted: booted == Some(slot),
                next: next == Some(slot),
            }
        })
        .collect()
}

/// The outcome's word on the wire.
pub fn outcome_word(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::InProgress => "in_progress",
        Outcome::Staged => "staged",
        Outcome::Booting => "booting",
        Outcome::Blessed => "blessed",
        Outcome::Failed { .. } => "failed",
    }
}

impl From<SlotState> for proto::SlotStatus {
    fn from(s: SlotState) -> Self {
        proto::SlotStatus {
            slot: s.slot,
            version: s.version,
            entry: s.entry,
            blessed: s.blessed,
            tries_left: s.tries_left,
            booted: s.booted,
            next: s.next,
        }
    }
}

impl From<UpgradeStatus> for proto::UpgradeStatusResponse {
    fn from(s: UpgradeStatus) -> Self {
        let mut out = proto::UpgradeStatusResponse {
            slots: s.slots.into_iter().map(Into::into).collect(),
            failed: s
                .record
                .failed
                .into_iter()
                .map(|f| proto::FailedVersion {
                    version: f.version,
                    phase: f.phase,
                    reason: f.reason,
                    at_ms: f.at_ms,
                })
                .collect(),
            ..Default::default()
        };
        if let Some(a) = s.record.attempt {
            out.outcome = outcome_word(&a.outcome).to_owned();
            if let Outcome::Failed { phase, reason } = a.outcome {
                out.failed_phase = phase;
                out.failed_reason = reason;
            }
            out.from_version = a.from_version;
            out.to_version = a.to_version;
            out.to_slot = a.to_slot;
            out.rollback = a.rollback;
            out.phases = a
                .phases
                .into_iter()
                .map(|p| proto::UpgradePhase {
                    phase: p.phase,
                    at_ms: p.at_ms,
                })
                .collect();
            out.booted_entry = a.booted_entry.unwrap_or_default();
            out.tries_used = a.tries_used.unwrap_or(0);
            out.expect_ready = a.expect_ready;
        }
        out
    }
}
