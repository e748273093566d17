//! Atomic file writes: a power cut or a crash leaves the old file or the new one, never a
//! torn one.
//!
//! The content goes to a temporary file in the same directory (created with the final
//! mode, so a secret is never readable by others even for a moment), which is fsynced,
//! renamed over the target, and then the directory is fsynced so that the rename itself is
//! durable.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Mode for files that hold keys or tokens.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode for directories created to hold such files.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Errors from an atomic write; each names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The target has no file name or no parent directory.
    #[error("cannot write {path}: it does not name a file")]
    NotAFile {
        /// The target.
        path: PathBuf,
    },
    /// Creating the directory failed.
    #[error("cannot create directory {path}; check that its parent exists and is writable")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A step of writing the temporary file failed.
    #[error("cannot {step} {path}; check free space and permissions")]
    Io {
        /// What was being done: "create", "write", "fsync", "chmod".
        step: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Renaming the temporary file over the target failed.
    #[error("cannot rename {from} to {to}")]
    Rename {
        /// The temporary file.
        from: PathBuf,
        /// The target.
        to: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Creates `dir` and its missing parents with mode 0700; an existing directory is kept as is.
pub fn create_private_dir(dir: &Path) -> Result<(), WriteError> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
        .map_err(|source| WriteError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })
}

/// Writes `contents` to `path` atomically with permission bits `mode`, creating the
/// parent directory (mode 0700) if it is missing.
pub fn write(path: &Path, contents: &[u8], mode: u32) -> Result<(), WriteError> {
    let name = path.file_name().ok_or_else(|| WriteError::NotAFile {
        path: path.to_path_buf(),
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    create_private_dir(&dir)?;

    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let io = |step: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| WriteError::Io {
            step,
            path: p,
            source,
        }
    };

    // A stale temporary file from a crashed run would make create_new fail.
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        // The umask may have narrowed `mode`; never let it widen or narrow what we chose.
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io("chmod", &tmp))?;
        file.write_all(contents).map_err(io("write", &tmp))?;
        file.sync_all().map_err(io("fsync", &tmp))?;
        std::fs::rename(&tmp, path).map_err(|source| WriteError::Rename {
            from: tmp.clone(),
            to: path.to_path_buf(),
            source,
        })?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync", &dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
