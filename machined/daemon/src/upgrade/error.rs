//! The one error of the upgrade engine: each variant says what went wrong, where (the
//! device, file, URL or part) and what to do, and [`UpgradeError::code`] maps it onto the
//! gRPC status code the server answers with.

use std::io;
use std::path::PathBuf;

/// Why an upgrade, a rollback or a status read failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// Another upgrade or rollback holds the engine.
    #[error(
        "an upgrade is already running on this node: wait for it to finish (`machinectl upgrade status`), then try again"
    )]
    Busy,
    /// The kernel command line names no slot: the node did not boot from an A/B slot.
    #[error(
        "{path} has no valid keelson.slot=: this node was not booted from slot A or B, so it has no inactive slot to upgrade; boot it from its disk"
    )]
    NoBootedSlot {
        /// The command line's file.
        path: PathBuf,
    },
    /// A node fact could not be read.
    #[error("cannot read {what} at {path}: check that the node's image is complete")]
    Read {
        /// What was read (`the os-release`, `the components file`).
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The partition of a slot was not found, or more than one was.
    #[error(
        "the partition {name} of slot {slot} {problem} under {sys_block}: an upgrade needs the disk laid out by the Keelson imager (GPT names ROOT-A and ROOT-B)"
    )]
    Partition {
        /// The slot.
        slot: String,
        /// Its GPT name.
        name: &'static str,
        /// "was not found", "was found on several disks (vda3, vdb3)".
        problem: String,
        /// The sysfs directory searched.
        sys_block: PathBuf,
    },
    /// The bundle is not a bundle, is damaged, or does not match its manifest.
    #[error("the bundle was refused at byte {at}")]
    BadBundle {
        /// Bytes of the bundle accepted before the refusal.
        at: u64,
        /// Why, with what to do.
        #[source]
        source: keelson_upgrade::bundle::BundleError,
    },
    /// The bundle ended before its last part.
    #[error("the bundle ended after {received} bytes")]
    Truncated {
        /// Bytes received.
        received: u64,
        /// What was missing, with what to do.
        #[source]
        source: keelson_upgrade::bundle::BundleError,
    },
    /// The sender announced another size than the bundle's header describes.
    #[error(
        "the bundle sent is {announced} bytes but its header describes {expected}: the file is truncated or has bytes added; build or download it again"
    )]
    SizeMismatch {
        /// The size the sender announced.
        announced: u64,
        /// The size the header describes.
        expected: u64,
    },
    /// The manifest's signature did not verify against any trusted key.
    #[error(
        "the bundle's signature does not verify against the keys in {keys_dir} (sign it with a key this image trusts: `--trust` at image build)"
    )]
    Signature {
        /// The trusted keys' directory.
        keys_dir: PathBuf,
        /// Why.
        #[source]
        source: keelson_upgrade::keys::SignatureError,
    },
    /// The trusted keys could not be loaded.
    #[error(
        "cannot load the trusted upgrade keys from {keys_dir} (the image must carry its public keys there)"
    )]
    Keys {
        /// The directory.
        keys_dir: PathBuf,
        /// Why.
        #[source]
        source: keelson_upgrade::keys::KeyError,
    },
    /// The checks refused the bundle: nothing was written.
    #[error("the upgrade to {version} was refused, nothing was written: {}", .reasons.join("; "))]
    Refused {
        /// The bundle's version.
        version: String,
        /// Each refusal, with what to do.
        reasons: Vec<String>,
    },
    /// The client's stream broke or the transfer was abandoned.
    #[error("the transfer of the bundle broke after {received} bytes: {reason}; send it again")]
    Transfer {
        /// Bytes received.
        received: u64,
        /// Why.
        reason: String,
    },
    /// The bundle could not be fetched from its URL.
    #[error("cannot fetch the bundle from {url}: {reason}")]
    Fetch {
        /// The URL (and the one it was redirected from).
        url: String,
        /// Why, with what to do.
        reason: String,
    },
    /// Writing the inactive slot or the ESP failed.
    #[error(
        "cannot {what} {path}; the running slot is untouched and the inactive slot has no boot entry, so the node keeps booting its current version; fix the disk, then upgrade again"
    )]
    Write {
        /// The operation (`write part root to`, `rename the entry`).
        what: String,
        /// The device or file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The spool on EPHEMERAL, where the bundle waits until every part matched, could not
    /// be written or read.
    #[error(
        "cannot {what} the upgrade's spool {path}; the running slot is untouched and the node keeps booting its current version; check EPHEMERAL (/var: its free space, its disk), then upgrade again"
    )]
    Spool {
        /// The operation (`write`, `read`, `create the directory of`).
        what: String,
        /// The spool or its directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// What was written did not read back as the bundle said.
    #[error(
        "part {part} read back from {path} does not match the bundle ({what}: expected {expected}, read {actual}): the disk corrupts writes; the inactive slot has no boot entry, the node keeps its current version"
    )]
    Verify {
        /// The part (`root`, `kernel`, `initrd`).
        part: String,
        /// Where it was written.
        path: PathBuf,
        /// What was compared (`sha256`, `verity root hash`).
        what: &'static str,
        /// The bundle's value.
        expected: String,
        /// What was read.
        actual: String,
    },
    /// STATE's upgrade record could not be read or written.
    #[error(
        "cannot {what} the upgrade record {path}: {reason}; check that STATE is mounted and writable"
    )]
    Record {
        /// `read`, `write`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The ESP's entries could not be read.
    #[error(
        "cannot read the boot entries in {path}: {source}; check that the ESP is mounted at /boot"
    )]
    Entries {
        /// The entries' directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A rollback is not possible.
    #[error("cannot roll back to slot {slot}: {reason}")]
    Rollback {
        /// The other slot.
        slot: String,
        /// Why, with what to do.
        reason: String,
    },
    /// A blocking task of the engine died.
    #[error("the upgrade engine's {what} task ended unexpectedly: {reason}; try again")]
    Task {
        /// Which task.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

impl UpgradeError {
    /// The gRPC code the server answers this error with.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            UpgradeError::Busy => Code::Unavailable,
            UpgradeError::BadBundle { .. }
            | UpgradeError::Truncated { .. }
            | UpgradeError::SizeMismatch { .. }
            | UpgradeError::Signature { .. } => Code::InvalidArgument,
            UpgradeError::Refused { .. }
            | UpgradeError::NoBootedSlot { .. }
            | UpgradeError::Partition { .. }
            | UpgradeError::Rollback { .. }
            | UpgradeError::Keys { .. } => Code::FailedPrecondition,
            UpgradeError::Transfer { .. } => Code::Aborted,
            UpgradeError::Fetch { .. } => Code::Unavailable,
            UpgradeError::Verify { .. } => Code::DataLoss,
            UpgradeError::Read { .. }
            | UpgradeError::Write { .. }
            | UpgradeError::Spool { .. }
            | UpgradeError::Record { .. }
            | UpgradeError::Entries { .. }
            | UpgradeError::Task { .. } => Code::Internal,
        }
    }

    /// The gRPC status the server answers with: [`UpgradeError::code`] and the whole error
    /// chain as the message.
    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::new(self.code(), keelson_api::error_chain(self))
    }
}

impl From<UpgradeError> for tonic::Status {
    fn from(e: UpgradeError) -> Self {
        e.to_status()
    }
}
