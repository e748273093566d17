//! STATE: the small ext4 partition, mounted at `keelson_configs::layout::STATE_MOUNT`
//! (`/system/state`), that keeps what a node must remember across boots. PID 1 and
//! machined both write it; this module is the one place that says where each file lives
//! and the one way to write it.
//!
//! | file | written by | what it is |
//! |---|---|---|
//! | [`CONFIG`] | PID 1 (a config from fw_cfg, a drive or a URL), machined (`apply-config`) | the machine config in effect |
//! | [`CONFIG_STAGED`] | machined (`apply-config --mode staged`) | the config for the next boot, promoted by PID 1 before it reads the config |
//! | [`STAGED_REFUSED`] | PID 1 | a staged config that failed validation, kept for the operator, never retried |
//! | [`CONFIG_TRIED`] | machined (`apply-config --mode try`) | the config on trial, in effect live until it is confirmed or reverted; never read at boot |
//! | [`TRY_RECORD`] | machined (`apply-config --mode try`) | the trial's record (JSON): the config to go back to, the parts applied live, the wall-clock deadline, the boot it belongs to, and a failed revert's reason |
//! | [`MACHINE_ID`] | PID 1 | the machine id, made at the first boot |
//! | [`NODE_API_CERT`], [`NODE_API_KEY`] | the config's `machine.files` (a worker) | the node API's server certificate and key |
//! | [`crate::reset::RESET_RECORD`] | PID 1 (a reset) | a reset that began and did not finish: when, and why its wipe was refused or failed (JSON); a reset that finishes wipes it with STATE |
//! | [`AUDIT_LOG`] | machined (`apply-config`, `confirm`, `reset`) | who asked for which config change, when, and the outcome: JSON lines, the last 1000 kept |
//!
//! Every write is atomic ([`write_atomic`]): the new content goes to a temporary file in
//! the same directory, created with its final mode (0600 for STATE: the config carries
//! the cluster's join secrets), fsynced, renamed over the target, and the directory
//! fsynced. A power cut at any point leaves the old file or the new one, never a torn
//! one. Temporary files are named `.<name>.tmp.<pid>.<n>` by both writers
//! ([`is_temporary`]); readers ignore them and PID 1 removes those of dead processes at
//! boot ([`remove_stale`]).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The machine config in effect.
pub const CONFIG: &str = "config.toml";
/// A config staged for the next boot (`apply-config --mode staged`).
pub const CONFIG_STAGED: &str = "config.staged.toml";
/// A staged config that failed validation at boot.
pub const STAGED_REFUSED: &str = "config.staged.refused.toml";
/// The config applied live by `apply-config --mode try`, until it is confirmed or reverted.
pub const CONFIG_TRIED: &str = "config.tried.toml";
/// The record of a `try` apply: what to revert to, and when.
pub const TRY_RECORD: &str = "apply-try.json";
/// The machine id (32 hex digits and a newline).
pub const MACHINE_ID: &str = "machine-id";
/// The node API's server certificate (PEM), for a node that does not issue its own.
pub const NODE_API_CERT: &str = "node-api/server.crt";
/// Its private key (PEM).
pub const NODE_API_KEY: &str = "node-api/server.key";
/// machined's audit trail of config changes (JSON lines, bounded), apart from the
/// service logs so that a flood of other lines cannot push it out.
pub const AUDIT_LOG: &str = "audit.log";

/// Mode of every file in STATE.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of every directory created for such files.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// What marks a temporary file: `.<name>.tmp.<pid>.<n>`.
pub const TMP_MARKER: &str = ".tmp.";

/// Errors of an atomic write; each names the file, and the old content is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The target has no file name.
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
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// One step failed.
    #[error("cannot write {path} ({step}); the previous content is unchanged")]
    Step {
        /// The target file.
        path: PathBuf,
        /// The step that failed: `create`, `chmod`, `write`, `fsync`, `rename`, `fsync dir`.
        step: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

impl WriteError {
    /// The kernel's answer, if the error came from one.
    pub fn io(&self) -> Option<&io::Error> {
        match self {
            WriteError::NotAFile { .. } => None,
            WriteError::CreateDir { source, .. } | WriteError::Step { source, .. } => Some(source),
        }
    }
}

/// Whether `name` is (or could be taken for) a temporary file of an atomic write: no file
/// of STATE's own has [`TMP_MARKER`] in its name.
pub fn is_temporary(name: &str) -> bool {
    name.contains(TMP_MARKER)
}

fn tmp_name(name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(".{name}{TMP_MARKER}{}.{n}", std::process::id())
}

/// Creates `dir` and its missing parents with mode 0700; an existing directory is kept.
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

/// Writes `data` to `path` atomically with permission bits `mode` (the umask does not
/// change them), creating a missing parent directory with mode 0700.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), WriteError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !is_temporary(n))
        .ok_or_else(|| WriteError::NotAFile {
            path: path.to_path_buf(),
        })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    create_private_dir(&dir)?;
    let step = |step: &'static str| {
        let path = path.to_path_buf();
        move |source| WriteError::Step { path, step, source }
    };
    // A temporary name left by a crashed process of the same pid is skipped, not reused.
    let (tmp, mut file) = (|| {
        let mut tries = 0;
        loop {
            let tmp = dir.join(tmp_name(name));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
            {
                Ok(file) => return Ok((tmp, file)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 8 => tries += 1,
                Err(e) => return Err(e),
            }
        }
    })()
    .map_err(step("create"))?;
    let written = (|| {
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(step("chmod"))?;
        file.write_all(data).map_err(step("write"))?;
        file.sync_all().map_err(step("fsync"))?;
        fs::rename(&tmp, path).map_err(step("rename"))
    })();
    drop(file);
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
        return written;
    }
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(step("fsync dir"))
}

/// Renames `from` to `to` inside `dir` and makes the rename durable (the directory fsynced).
pub fn rename_durable(dir: &Path, from: &str, to: &str) -> Result<(), WriteError> {
    let target = dir.join(to);
    let step = |step: &'static str| {
        let path = target.clone();
        move |source| WriteError::Step { path, step, source }
    };
    fs::rename(dir.join(from), &target).map_err(step("rename"))?;
    // The file itself too: vfat (the ESP) writes a renamed file's size and first cluster
    // into its new directory entry only with the file's inode, so a power cut after the
    // directory's fsync alone left the entry empty.
    File::open(&target)
        .and_then(|f| f.sync_all())
        .map_err(step("fsync"))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(step("fsync dir"))
}

/// Removes `path` and makes the removal durable (the directory fsynced); whether the file
/// was there. A missing file is not an error: the removal is done either way.
pub fn remove_durable(path: &Path) -> Result<bool, WriteError> {
    let step = |step: &'static str| {
        let path = path.to_path_buf();
        move |source| WriteError::Step { path, step, source }
    };
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(step("remove")(e)),
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(step("fsync dir"))?;
    Ok(true)
}

/// Removes the temporary files that other processes left in `dir` (an interrupted
/// write); the paths removed.
pub fn remove_stale(dir: &Path) -> Vec<PathBuf> {
    let own = format!("{TMP_MARKER}{}.", std::process::id());
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_temporary(&name) && !name.contains(&own) {
            let path = entry.path();
            if fs::remove_file(&path).is_ok() {
                removed.push(path);
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

    fn names(dir: &Path) -> Result<Vec<String>> {
        let mut names: Vec<String> = fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<io::Result<_>>()?;
        names.sort();
        Ok(names)
    }

    #[test]
    fn a_write_replaces_the_file_whole_with_its_mode() -> Result {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(CONFIG);
        write_atomic(&path, b"one", PRIVATE_FILE_MODE)?;
        write_atomic(&path, b"two", PRIVATE_FILE_MODE)?;
        assert_eq!(fs::read(&path)?, b"two");
        assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
        assert_eq!(names(dir.path())?, [CONFIG]);
        Ok(())
    }

    #[test]
    fn a_missing_parent_is_created_private() -> Result {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(NODE_API_CERT);
        write_atomic(&path, b"pem", 0o644)?;
        let parent = dir.path().join("node-api");
        assert_eq!(fs::metadata(&parent)?.permissions().mode() & 0o777, 0o700);
        assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o644);
        Ok(())
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() -> Result {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(CONFIG);
        write_atomic(&path, b"old", PRIVATE_FILE_MODE)?;
        // The rename fails: the target is now a non-empty directory.
        let blocked = dir.path().join("blocked");
        fs::create_dir_all(blocked.join("inside"))?;
        let err = write_atomic(&blocked, b"new", PRIVATE_FILE_MODE)
            .err()
            .ok_or("the write over a directory succeeded")?;
        assert!(
            err.to_string().starts_with(&format!(
                "cannot write {} (rename); the previous content is unchanged",
                blocked.display()
            )),
            "{err}"
        );
        assert!(err.io().is_some());
        assert_eq!(fs::read(&path)?, b"old");
        assert_eq!(names(dir.path())?, ["blocked", CONFIG]);
        Ok(())
    }

    #[test]
    fn names_that_are_not_files_are_refused() {
        for path in [Path::new("/"), Path::new("dir/.x.tmp.1.0")] {
            assert!(
                matches!(
                    write_atomic(path, b"", PRIVATE_FILE_MODE),
                    Err(WriteError::NotAFile { .. })
                ),
                "{}",
                path.display()
            );
        }
    }

    #[test]
    fn stale_temporaries_of_other_processes_are_removed() -> Result {
        let dir = tempfile::tempdir()?;
        fs::write(dir.path().join(CONFIG), b"kept")?;
        // machined's and PID 1's interrupted writes look alike.
        fs::write(dir.path().join(".config.toml.tmp.1.0"), b"torn")?;
        fs::write(dir.path().join(".machine-id.tmp.77.3"), b"torn")?;
        let own = dir.path().join(tmp_name(CONFIG));
        fs::write(&own, b"mine, in flight")?;
        let mut removed = remove_stale(dir.path());
        removed.sort();
        assert_eq!(
            removed,
            [
                dir.path().join(".config.toml.tmp.1.0"),
                dir.path().join(".machine-id.tmp.77.3")
            ]
        );
        assert!(own.exists());
        assert!(is_temporary(
            &own.file_name().ok_or("no name")?.to_string_lossy()
        ));
        assert!(!is_temporary(CONFIG));
        Ok(())
    }

    #[test]
    fn a_removal_says_whether_the_file_was_there() -> Result {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(CONFIG_STAGED);
        fs::write(&path, b"next")?;
        assert!(remove_durable(&path)?);
        assert!(!path.exists());
        assert!(!remove_durable(&path)?, "a missing file is removed already");
        // A directory is not removed as a file: the error names it and the step.
        fs::create_dir(&path)?;
        let err = remove_durable(&path)
            .err()
            .ok_or("a directory was removed as a file")?;
        assert!(err.to_string().contains("(remove)"), "{err}");
        Ok(())
    }

    #[test]
    fn a_rename_is_durable_and_named_on_failure() -> Result {
        let dir = tempfile::tempdir()?;
        fs::write(dir.path().join(CONFIG_STAGED), b"next")?;
        rename_durable(dir.path(), CONFIG_STAGED, CONFIG)?;
        assert_eq!(fs::read(dir.path().join(CONFIG))?, b"next");
        let err = rename_durable(dir.path(), CONFIG_STAGED, CONFIG)
            .err()
            .ok_or("a rename of a missing file succeeded")?;
        assert!(err.to_string().contains("(rename)"), "{err}");
        Ok(())
    }
}
