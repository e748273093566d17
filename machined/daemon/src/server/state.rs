//! The node's persistent state that machined reads and writes, in STATE
//! (`/system/state`): the machine config, a config staged for the next boot, a `try`
//! apply's config and record, and a worker's node API certificate. Where each lives and
//! how it is written (atomic and private, mode 0600: a power cut leaves the old file or
//! the new one; a removal durable) is the node protocol's
//! ([`keelson_node_protocol::state`]), shared with PID 1.

use std::path::{Path, PathBuf};

use keelson_node_protocol::state::{
    self as layout, PRIVATE_FILE_MODE, WriteError, remove_durable, write_atomic,
};

/// Errors from reading or writing STATE.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write to STATE")]
    Write(#[source] WriteError),
}

/// STATE, as a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// STATE at `dir` (`/system/state` on a node).
    pub fn new(dir: impl Into<PathBuf>) -> StateStore {
        StateStore { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the machine config lives.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(layout::CONFIG)
    }

    /// Where a staged config lives.
    pub fn staged_path(&self) -> PathBuf {
        self.dir.join(layout::CONFIG_STAGED)
    }

    /// Where a `try` apply's config lives while it is on trial.
    pub fn tried_path(&self) -> PathBuf {
        self.dir.join(layout::CONFIG_TRIED)
    }

    /// Where a `try` apply's record lives.
    pub fn try_record_path(&self) -> PathBuf {
        self.dir.join(layout::TRY_RECORD)
    }

    /// Where a worker keeps its node API certificate and key (issued through the join
    /// flow; a control plane issues its own at every start).
    pub fn node_api_cert_paths(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.join(layout::NODE_API_CERT),
            self.dir.join(layout::NODE_API_KEY),
        )
    }

    /// Whether a machine config is persisted (the node is not in maintenance mode).
    pub fn has_config(&self) -> bool {
        self.config_path().is_file()
    }

    /// The persisted machine config's bytes, if any.
    pub fn read_config(&self) -> Result<Option<Vec<u8>>, StateError> {
        read_if_present(self.config_path())
    }

    /// A `try` apply's config, if one is kept.
    pub fn read_tried(&self) -> Result<Option<Vec<u8>>, StateError> {
        read_if_present(self.tried_path())
    }

    /// A `try` apply's record's bytes, if one is kept.
    pub fn read_try_record(&self) -> Result<Option<Vec<u8>>, StateError> {
        read_if_present(self.try_record_path())
    }

    /// Writes the machine config atomically.
    pub fn write_config(&self, text: &str) -> Result<(), StateError> {
        write_atomic(&self.config_path(), text.as_bytes(), PRIVATE_FILE_MODE)
            .map_err(StateError::Write)
    }

    /// Writes a config for the next boot atomically.
    pub fn write_staged(&self, text: &str) -> Result<(), StateError> {
        write_atomic(&self.staged_path(), text.as_bytes(), PRIVATE_FILE_MODE)
            .map_err(StateError::Write)
    }

    /// Removes a config staged for the next boot, durably; whether one was staged.
    pub fn remove_staged(&self) -> Result<bool, StateError> {
        remove_durable(&self.staged_path()).map_err(StateError::Write)
    }

    /// Writes a `try` apply's config, then its record (which names it), each atomically.
    pub fn write_try(&self, text: &str, record: &[u8]) -> Result<(), StateError> {
        write_atomic(&self.tried_path(), text.as_bytes(), PRIVATE_FILE_MODE)
            .map_err(StateError::Write)?;
        self.write_try_record(record)
    }

    /// Rewrites a `try` apply's record atomically (a failed revert marked).
    pub fn write_try_record(&self, record: &[u8]) -> Result<(), StateError> {
        write_atomic(&self.try_record_path(), record, PRIVATE_FILE_MODE).map_err(StateError::Write)
    }

    /// Removes a `try` apply's record, then its config, durably.
    pub fn remove_try(&self) -> Result<(), StateError> {
        remove_durable(&self.try_record_path()).map_err(StateError::Write)?;
        remove_durable(&self.tried_path()).map_err(StateError::Write)?;
        Ok(())
    }
}

fn read_if_present(path: PathBuf) -> Result<Option<Vec<u8>>, StateError> {
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Read { path, source }),
    }
}
