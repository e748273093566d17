//! The audit trail of config changes: who asked for which `apply-config`, `confirm` or
//! `reset`, when, and what came of it, in STATE's own small file
//! ([`keelson_node_protocol::state::AUDIT_LOG`], `/system/state/audit.log`), apart from
//! the service logs, so that a flood of other lines never pushes it out.
//!
//! - One JSON object a line ([`AuditEntry`]): the time (UTC), the caller's certificate
//!   name and role (`anonymous` in maintenance mode), the action, the mode, the config's
//!   SHA-256 (apply-config), whether it was a dry run, the outcome and a short detail.
//! - Bounded: at most [`MAX_ENTRIES`] entries are kept (the oldest go, through an atomic
//!   rewrite) and each entry's text fields are cut to [`MAX_FIELD`] bytes, so the file
//!   stays under a megabyte whoever calls.
//! - An admin reads it with `machinectl read /system/state/audit.log` (STATE is
//!   admin-only for `read`); [`read_entries`] parses it, skipping a line a power cut tore.
//! - Failing to write it never fails the request: the failure is logged.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use keelson_node_protocol::state::{self as layout, PRIVATE_FILE_MODE, WriteError, write_atomic};
use serde::{Deserialize, Serialize};

use crate::server::auth::Authorized;

/// How many entries the audit log keeps.
pub const MAX_ENTRIES: usize = 1000;
/// The longest text field of an entry, in bytes (longer ones are cut, marked `...`).
pub const MAX_FIELD: usize = 512;

/// One writer at a time in this process (appends and the rewrite that trims).
static WRITER: Mutex<()> = Mutex::new(());

/// Errors from writing or reading the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file could not be read or appended to.
    #[error("cannot write the audit log {path}; check that STATE is mounted and writable")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Trimming it to its last entries failed.
    #[error("cannot trim the audit log")]
    Trim(#[source] WriteError),
    /// An entry could not be encoded.
    #[error("cannot encode an audit entry")]
    Encode(#[source] serde_json::Error),
}

/// Who made a request, as the audit log names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The client certificate's common name (empty in maintenance mode).
    pub user: String,
    /// The role (`anonymous` in maintenance mode).
    pub role: String,
}

impl Caller {
    /// The caller of a request that [`super::auth::Authorize`] let through.
    pub fn of<T>(req: &tonic::Request<T>) -> Caller {
        let authorized = req.extensions().get::<Authorized>();
        Caller {
            user: authorized.map(|a| a.user.clone()).unwrap_or_default(),
            role: authorized
                .and_then(|a| a.role)
                .map_or_else(|| "anonymous".to_owned(), |r| r.name().to_owned()),
        }
    }
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When, in UTC (`2026-12-06T11:30:00Z`).
    pub time: String,
    /// The caller's certificate name.
    pub user: String,
    /// The caller's role.
    pub role: String,
    /// `apply-config`, `confirm` or `reset`.
    pub action: String,
    /// The apply mode (apply-config), or empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mode: String,
    /// The SHA-256 of the config sent (apply-config), in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
    /// Whether it was a dry run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// `ok`, `refused` or `failed` (`requested` for a reset about to run).
    pub outcome: String,
    /// What the node said, cut to [`MAX_FIELD`] bytes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl AuditEntry {
    /// An entry made now, by `caller`; text fields cut to [`MAX_FIELD`] bytes.
    pub fn now(caller: &Caller, action: &str, outcome: &str, detail: &str) -> AuditEntry {
        AuditEntry {
            time: utc_now(),
            user: cut(&caller.user),
            role: cut(&caller.role),
            action: action.to_owned(),
            mode: String::new(),
            config_sha256: None,
            dry_run: false,
            outcome: outcome.to_owned(),
            detail: cut(detail),
        }
    }
}

/// The SHA-256 of `bytes`, in lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where the audit log of STATE at `state_dir` lives.
pub fn path_in(state_dir: &Path) -> PathBuf {
    state_dir.join(layout::AUDIT_LOG)
}

/// Appends `entry` to the audit log in `state_dir`; when that makes more than
/// [`MAX_ENTRIES`], rewrites it atomically with the last ones only.
pub fn record(state_dir: &Path, entry: &AuditEntry) -> Result<(), AuditError> {
    let mut line = serde_json::to_string(entry).map_err(AuditError::Encode)?;
    line.push('\n');
    let path = path_in(state_dir);
    let _one = WRITER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let io = |source| AuditError::Io {
        path: path.clone(),
        source,
    };
    let old = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(e)),
    };
    let kept = old.lines().count();
    if kept < MAX_ENTRIES {
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(PRIVATE_FILE_MODE)
            .open(&path)
            .map_err(io)?;
        // A line torn by a power cut ends without a newline: start on a fresh one.
        if !old.is_empty() && !old.ends_with('\n') {
            line.insert(0, '\n');
        }
        file.write_all(line.as_bytes()).map_err(io)?;
        return file.sync_data().map_err(io);
    }
    let mut text: String = old
        .lines()
        .skip(kept + 1 - MAX_ENTRIES)
        .flat_map(|l| [l, "\n"])
        .collect();
    text.push_str(&line);
    write_atomic(&path, text.as_bytes(), PRIVATE_FILE_MODE).map_err(AuditError::Trim)
}

/// [`record`] on the blocking pool; a failure is logged, never returned: the audit log
/// must not fail the request it records.
pub async fn record_logged(state_dir: PathBuf, entry: AuditEntry) {
    let result = tokio::task::spawn_blocking(move || record(&state_dir, &entry)).await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %keelson_api::error_chain(&e), "audit log"),
        Err(e) => tracing::warn!(error = %e, "audit log"),
    }
}

/// The entries of the audit log in `state_dir`, oldest first (none if there is no log);
/// a line that does not parse (torn by a power cut) is skipped.
pub fn read_entries(state_dir: &Path) -> Result<Vec<AuditEntry>, AuditError> {
    let path = path_in(state_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(AuditError::Io { path, source }),
    }
}

/// `text` cut to [`MAX_FIELD`] bytes at a character boundary, marked `...` when cut.
pub fn cut(text: &str) -> String {
    if text.len() <= MAX_FIELD {
        return text.to_owned();
    }
    let mut end = MAX_FIELD - 3;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", text.get(..end).unwrap_or_default())
}

/// Now, in UTC, as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_now() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let t = i64::try_from(seconds)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn caller() -> Caller {
        Caller {
            user: "admin-user".into(),
            role: "admin".into(),
        }
    }

    #[test]
    fn entries_are_kept_in_order_and_capped_at_the_last_thousand() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..MAX_ENTRIES + 5 {
            record(
                dir.path(),
                &AuditEntry::now(&caller(), "apply-config", "ok", &format!("apply {i}")),
            )
            .unwrap();
        }
        let entries = read_entries(dir.path()).unwrap();
        assert_eq!(entries.len(), MAX_ENTRIES);
        assert_eq!(entries[0].detail, "apply 5");
        assert_eq!(
            entries[MAX_ENTRIES - 1].detail,
            format!("apply {}", MAX_ENTRIES + 4)
        );
        let text = std::fs::read_to_string(path_in(dir.path())).unwrap();
        assert_eq!(text.lines().count(), MAX_ENTRIES);
    }

    #[test]
    fn long_fields_are_cut_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let long = "é".repeat(MAX_FIELD);
        record(
            dir.path(),
            &AuditEntry::now(&caller(), "reset", "failed", &long),
        )
        .unwrap();
        // A power cut in the middle of an append.
        let path = path_in(dir.path());
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"time\":\"2026-").unwrap();
        record(dir.path(), &AuditEntry::now(&caller(), "confirm", "ok", "")).unwrap();
        let entries = read_entries(dir.path()).unwrap();
        assert_eq!(entries.len(), 2);
        assert!(
            entries[0].detail.len() <= MAX_FIELD,
            "{}",
            entries[0].detail.len()
        );
        assert!(entries[0].detail.ends_with("..."));
        assert_eq!(entries[1].action, "confirm");
        assert!(entries[1].time.ends_with('Z') && entries[1].time.len() == 20);
    }

    #[test]
    fn sha256_is_lower_case_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
