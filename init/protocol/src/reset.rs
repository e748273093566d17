//! What a node remembers of a reset that did not finish, in STATE ([`RESET_RECORD`],
//! JSON, written by PID 1 with [`crate::state::write_atomic`], read by machined).
//!
//! A reset's answer goes back to the operator before the services stop (machined, which
//! relays it, is one of them), and whether its wipe can be done is known only once every
//! process is stopped and the filesystems unmounted. So PID 1 keeps the end of the story
//! in STATE, which a reset that fails leaves as it was (STATE and EPHEMERAL are wiped
//! both or neither, EPHEMERAL first):
//!
//! 1. Once the services have stopped, PID 1 writes a record with [`ResetRecord::failure`]
//!    unset: the reset has begun. A reset that finishes formats STATE, and the record
//!    goes with it.
//! 2. When the wipe is refused or fails (a partition stays mounted, a format fails),
//!    PID 1 adds the [`ResetFailure`]: what failed, on which device, the kernel's answer,
//!    and what was wiped.
//! 3. At the next boot, machined's `health` reports the record as a failed check
//!    ([`ResetRecord::health_reason`]): a record without a failure is a reset that the
//!    node never finished (a power cut or a crash during it). The check goes once the
//!    config in STATE is no longer the one the record names ([`ResetRecord::config_sha256`]:
//!    a later apply), or with STATE at the next reset that finishes.

use serde::{Deserialize, Serialize};

use crate::clock::utc;

/// The record's file in STATE.
pub const RESET_RECORD: &str = "reset.json";

/// A reset that began and did not finish.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetRecord {
    /// When the services had stopped and the wipe began (milliseconds since the Unix
    /// epoch).
    pub begun_at_ms: u64,
    /// The SHA-256 (lower-case hex) of STATE's config when the reset began; `None` for a
    /// node without one.
    #[serde(default)]
    pub config_sha256: Option<String>,
    /// Why the wipe was refused or failed, once PID 1 knew; `None`: the node went down
    /// before the reset finished (a power cut, a crash), or the failure could not be
    /// written (a STATE that stayed mounted read-only).
    #[serde(default)]
    pub failure: Option<ResetFailure>,
}

/// Why a reset's wipe was refused or failed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetFailure {
    /// When (milliseconds since the Unix epoch).
    pub at_ms: u64,
    /// The partition that failed: `STATE` or `EPHEMERAL`.
    pub partition: String,
    /// Its device.
    pub device: String,
    /// The kernel's answer (`EBUSY (16)`), when one was the cause.
    #[serde(default)]
    pub errno: Option<String>,
    /// What failed, as the console said it.
    pub reason: String,
    /// The partitions that were wiped before the failure (EPHEMERAL, or none).
    #[serde(default)]
    pub wiped: Vec<String>,
}

impl ResetRecord {
    /// Parses the record; an unreadable record is reported, never guessed.
    pub fn parse(bytes: &[u8]) -> Result<ResetRecord, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The record's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Whether the record still speaks of the node as it is: STATE's config (its SHA-256,
    /// `None` without one) is the one the reset began with.
    pub fn is_current(&self, config_sha256: Option<&str>) -> bool {
        self.config_sha256.as_deref() == config_sha256
    }

    /// What `health` says of it: what failed and when, what was wiped, what to do.
    pub fn health_reason(&self) -> String {
        let Some(f) = &self.failure else {
            return format!(
                "the reset begun at {} did not finish: the node went down before STATE was wiped (a power cut, a crash, or a failure it could not write to STATE: see that boot's console), so it kept its config and identity; EPHEMERAL (/var) may have been wiped; reset the node again",
                utc(self.begun_at_ms)
            );
        };
        let why = match &f.errno {
            Some(errno) if !f.reason.contains(errno.as_str()) => {
                format!("{} ({errno})", f.reason)
            }
            _ => f.reason.clone(),
        };
        let wiped = if f.wiped.is_empty() {
            "nothing was wiped".to_string()
        } else {
            format!("only {} was wiped", f.wiped.join(" and "))
        };
        format!(
            "last reset failed at {}: {} on {}: {why}; {wiped}, and the node kept its config and identity; reset it again, or wipe both partitions from another system",
            utc(f.at_ms),
            f.partition,
            f.device,
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_record_round_trips_and_says_what_failed() {
        let mut record = ResetRecord {
            begun_at_ms: 1_796_559_145_000,
            config_sha256: Some("ab".into()),
            failure: None,
        };
        assert_eq!(ResetRecord::parse(&record.to_bytes()).unwrap(), record);
        assert!(
            record
                .health_reason()
                .starts_with("the reset begun at 2026-12-06T12:12:25Z did not finish"),
            "{}",
            record.health_reason()
        );
        record.failure = Some(ResetFailure {
            at_ms: 1_796_559_146_000,
            partition: "EPHEMERAL".into(),
            device: "/dev/vda6".into(),
            errno: Some("EBUSY (16)".into()),
            reason: "could not unmount /var".into(),
            wiped: Vec::new(),
        });
        assert_eq!(ResetRecord::parse(&record.to_bytes()).unwrap(), record);
        assert_eq!(
            record.health_reason(),
            "last reset failed at 2026-12-06T12:12:26Z: EPHEMERAL on /dev/vda6: could not unmount /var (EBUSY (16)); nothing was wiped, and the node kept its config and identity; reset it again, or wipe both partitions from another system"
        );
        assert!(record.is_current(Some("ab")));
        assert!(!record.is_current(Some("cd")));
        assert!(!record.is_current(None));
    }
}
