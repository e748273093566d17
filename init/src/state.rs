//! STATE: the small ext4 partition (mounted at `/system/state`) that keeps what a node
//! must remember across boots: the last applied machine config, later its identity and PKI.
//! Where each file lives and the one atomic write are the node protocol's
//! ([`keelson_node_protocol::state`]), shared with machined; this module is PID 1's use
//! of them: names checked to stay inside STATE, the staged config promoted at boot.
//!
//! Every write is atomic: the new content goes to a temporary file in the same directory,
//! which is fsynced, renamed over the target, and the directory fsynced. A power cut at
//! any point leaves the old file or the new one, never a torn one; a leftover temporary
//! file is ignored by readers and removed by [`remove_stale`]. Files are created mode
//! 0600: the machine config carries the cluster's join secrets.
//!
//! A config staged for the next boot (`apply-config --mode staged`: machined writes
//! `config.staged.toml`) becomes the config at boot, before the config is read
//! ([`promote_staged`]): one `rename(2)` over `config.toml`, then the directory fsynced,
//! so a power cut leaves either the staged file waiting or the new config in place.
//! A staged config that fails validation is not promoted: it is renamed
//! [`STAGED_REFUSED`] (kept for the operator to read, never retried) and the config in
//! effect stays.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use keelson_configs::layout::STATE_MOUNT;
use keelson_node_protocol::state::{
    self as layout, PRIVATE_FILE_MODE, WriteError, is_temporary, rename_durable,
};

use crate::syscalls::errno_name;

pub use keelson_node_protocol::state::STAGED_REFUSED;

/// Errors of reading and writing STATE.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file name is not a plain name inside the directory.
    #[error("invalid STATE file name {0:?}: a plain file name is expected")]
    BadName(String),
    /// One step of an atomic write failed (the old file, if any, is intact).
    #[error("{}", write_message(.0))]
    Write(#[source] WriteError),
    /// Reading failed.
    #[error("cannot read {path}: {errno}", errno = errno_name(source))]
    Read {
        /// The file.
        path: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The config is not UTF-8 text.
    #[error("{path} is not UTF-8 text: the machine config is TOML")]
    NotText {
        /// The file.
        path: String,
    },
}

/// A write error with the kernel's answer named as PID 1's console names it.
fn write_message(e: &WriteError) -> String {
    match e {
        WriteError::Step { path, step, source } => format!(
            "cannot write {} ({step}): {}; the previous content is unchanged",
            path.display(),
            errno_name(source)
        ),
        other => match other.io() {
            Some(source) => format!("{other}: {}", errno_name(source)),
            None => other.to_string(),
        },
    }
}

fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
        || is_temporary(name)
    {
        return Err(Error::BadName(name.to_string()));
    }
    Ok(())
}

/// Replace `dir/name` with `data` atomically (mode 0600), through the node protocol's
/// one atomic write.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> Result<(), Error> {
    check_name(name)?;
    layout::write_atomic(&dir.join(name), data, PRIVATE_FILE_MODE).map_err(Error::Write)
}

/// The content of `dir/name`, or `None` when it does not exist.
pub fn read(dir: &Path, name: &str) -> Result<Option<Vec<u8>>, Error> {
    check_name(name)?;
    let path = dir.join(name);
    match fs::read(&path) {
        Ok(data) => Ok(Some(data)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Remove the temporary files of interrupted writes (PID 1's or machined's); the paths
/// removed.
pub fn remove_stale(dir: &Path) -> Vec<PathBuf> {
    layout::remove_stale(dir)
}

/// Where STATE is mounted.
pub fn state_dir() -> PathBuf {
    PathBuf::from(STATE_MOUNT)
}

/// The machine config kept in STATE, if there is one.
pub fn read_config(dir: &Path) -> Result<Option<String>, Error> {
    match read(dir, layout::CONFIG)? {
        None => Ok(None),
        Some(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| Error::NotText {
                path: dir.join(layout::CONFIG).display().to_string(),
            }),
    }
}

/// Keep `text` as the machine config.
pub fn write_config(dir: &Path, text: &str) -> Result<(), Error> {
    write_atomic(dir, layout::CONFIG, text.as_bytes())
}

/// What [`promote_staged`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Promotion {
    /// No config was staged.
    Nothing,
    /// The staged config is now the config.
    Promoted,
    /// The staged config failed validation (these errors) and was set aside as
    /// [`STAGED_REFUSED`].
    Refused(Vec<String>),
}

/// Promote a staged config (see the module doc), judged by `judge` first.
pub fn promote_staged(
    dir: &Path,
    judge: impl FnOnce(&[u8]) -> Result<(), Vec<String>>,
) -> Result<Promotion, Error> {
    let Some(staged) = read(dir, layout::CONFIG_STAGED)? else {
        return Ok(Promotion::Nothing);
    };
    // The data was fsynced when machined wrote it; the rename alone makes it the config.
    match judge(&staged) {
        Ok(()) => {
            rename_durable(dir, layout::CONFIG_STAGED, layout::CONFIG).map_err(Error::Write)?;
            Ok(Promotion::Promoted)
        }
        Err(errors) => {
            rename_durable(dir, layout::CONFIG_STAGED, STAGED_REFUSED).map_err(Error::Write)?;
            Ok(Promotion::Refused(errors))
        }
    }
}

#[cfg(test)]
// Tests build their fixtures on disk.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> io::Result<Dir> {
            let dir =
                std::env::temp_dir().join(format!("keelson-state-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir)?;
            Ok(Dir(dir))
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn writes_replace_reads_and_leave_no_temporary_file() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = Dir::new("rw")?;
        assert_eq!(read_config(&dir.0)?, None);
        write_config(&dir.0, "version = \"v1\"\n")?;
        write_config(&dir.0, "version = \"v1\"\n# second\n")?;
        assert_eq!(
            read_config(&dir.0)?.as_deref(),
            Some("version = \"v1\"\n# second\n")
        );
        let names: Vec<String> = fs::read_dir(&dir.0)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [layout::CONFIG]);
        let mode = fs::metadata(dir.0.join(layout::CONFIG))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        Ok(())
    }

    #[test]
    fn a_crash_before_the_rename_leaves_the_old_file_and_a_stale_temp_that_is_cleaned()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = Dir::new("crash")?;
        write_config(&dir.0, "old\n")?;
        // What a power cut between write and rename leaves: a partial temporary file
        // from an earlier boot (another pid).
        let stale = dir
            .0
            .join(format!(".{}{}1.0", layout::CONFIG, layout::TMP_MARKER));
        fs::write(&stale, "ne")?;
        assert_eq!(read_config(&dir.0)?.as_deref(), Some("old\n"));
        assert_eq!(remove_stale(&dir.0), std::slice::from_ref(&stale));
        assert!(!stale.exists());
        Ok(())
    }

    #[test]
    fn a_failed_write_keeps_the_old_content() -> Result<(), Box<dyn std::error::Error>> {
        let dir = Dir::new("fail")?;
        write_config(&dir.0, "old\n")?;
        // The rename fails when the target is a non-empty directory.
        fs::create_dir(dir.0.join("blocked"))?;
        fs::write(dir.0.join("blocked/x"), "")?;
        let err = write_atomic(&dir.0, "blocked", b"new")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with(&format!(
            "cannot write {}/blocked (rename): ",
            dir.0.display()
        )));
        assert!(err.ends_with("the previous content is unchanged"), "{err}");
        assert_eq!(read_config(&dir.0)?.as_deref(), Some("old\n"));
        assert!(
            remove_stale(&dir.0).is_empty(),
            "the temporary file was removed"
        );
        Ok(())
    }

    #[test]
    fn readers_never_see_a_torn_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = Dir::new("torn")?;
        let a = vec![b'a'; 256 * 1024];
        let b = vec![b'b'; 300 * 1024];
        write_atomic(&dir.0, "blob", &a)?;
        let path = dir.0.clone();
        let (a2, b2) = (a.clone(), b.clone());
        let reader = std::thread::spawn(move || -> Result<usize, String> {
            let mut seen = 0;
            for _ in 0..400 {
                let got = fs::read(path.join("blob")).map_err(|e| e.to_string())?;
                if got != a2 && got != b2 {
                    return Err(format!("torn read of {} bytes", got.len()));
                }
                seen += 1;
            }
            Ok(seen)
        });
        for i in 0..40 {
            write_atomic(&dir.0, "blob", if i % 2 == 0 { &b } else { &a })?;
        }
        let seen = reader.join().map_err(|_| "reader panicked")??;
        assert_eq!(seen, 400);
        Ok(())
    }

    #[test]
    fn a_staged_config_is_promoted_at_boot_unless_it_is_invalid()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = Dir::new("staged")?;
        let ok = |_: &[u8]| Ok(());
        assert_eq!(promote_staged(&dir.0, ok)?, Promotion::Nothing);
        write_config(&dir.0, "old\n")?;
        write_atomic(&dir.0, layout::CONFIG_STAGED, b"staged\n")?;
        assert_eq!(promote_staged(&dir.0, ok)?, Promotion::Promoted);
        assert_eq!(read_config(&dir.0)?.as_deref(), Some("staged\n"));
        assert_eq!(read(&dir.0, layout::CONFIG_STAGED)?, None);
        // Nothing left to promote at the next boot.
        assert_eq!(promote_staged(&dir.0, ok)?, Promotion::Nothing);

        write_atomic(&dir.0, layout::CONFIG_STAGED, b"broken\n")?;
        let refuse = |bytes: &[u8]| Err(vec![format!("{} bytes of nonsense", bytes.len())]);
        assert_eq!(
            promote_staged(&dir.0, refuse)?,
            Promotion::Refused(vec!["7 bytes of nonsense".into()])
        );
        assert_eq!(read_config(&dir.0)?.as_deref(), Some("staged\n"));
        assert_eq!(read(&dir.0, STAGED_REFUSED)?, Some(b"broken\n".to_vec()));
        assert_eq!(read(&dir.0, layout::CONFIG_STAGED)?, None);
        Ok(())
    }

    #[test]
    fn names_stay_inside_the_directory() {
        for bad in ["", ".", "..", "a/b", "../config.toml", ".x.tmp.1.2"] {
            assert!(
                matches!(
                    write_atomic(Path::new("/nonexistent"), bad, b""),
                    Err(Error::BadName(_))
                ),
                "{bad}"
            );
        }
    }
}
