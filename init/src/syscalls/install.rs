//! How PID 1 installs a file (`/etc`'s files, the config's `machine.files`, a live
//! change): atomically, and never through a symbolic link.
//!
//! The path is walked from a handle on the root one directory at a time, each opened
//! with `O_NOFOLLOW | O_DIRECTORY` from its parent's handle (missing ones are made,
//! 0755), so a symbolic link anywhere on the way (say one planted under `/var` by a pod
//! with a hostPath) stops the write instead of redirecting it; `..` and `.` are refused
//! before any of it. The content goes to a temporary file beside the target
//! (`.<name>.tmp.<pid>.<n>`, created exclusively with its final mode), is fsynced, and
//! is renamed over the target, then the directory is fsynced: a power cut leaves the old
//! file or the new one, and a symbolic link at the target's own name is replaced, never
//! written through. Every step works on the handles, so nothing can be swapped between
//! a check and a write.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

/// Mode of the directories made on the way to a file.
const DIR_MODE: u32 = 0o755;

/// Why a file was not installed; each names the file, whose old content is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The path is not absolute and normalized, or names no file.
    #[error(
        "cannot write {path}: it is not an absolute path of a file without '.' or '..' \
         components"
    )]
    NotAFilePath {
        /// The path asked for.
        path: PathBuf,
    },
    /// A directory on the way is a symbolic link (or not a directory at all).
    #[error(
        "cannot write {path}: {dir} is a symbolic link or not a directory, and files are \
         never written through a link; replace it with a directory"
    )]
    Link {
        /// The file asked for.
        path: PathBuf,
        /// The directory on its way that is not one.
        dir: PathBuf,
    },
    /// One step failed.
    #[error("cannot write {path} ({step}); the previous content is unchanged")]
    Step {
        /// The file asked for.
        path: PathBuf,
        /// The step: `open`, `mkdir`, `create`, `chmod`, `write`, `fsync`, `rename`,
        /// `fsync dir`.
        step: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

impl From<InstallError> for io::Error {
    fn from(e: InstallError) -> io::Error {
        let kind = match &e {
            InstallError::NotAFilePath { .. } => io::ErrorKind::InvalidInput,
            InstallError::Link { .. } => io::ErrorKind::NotADirectory,
            InstallError::Step { source, .. } => source.kind(),
        };
        // The message carries the cause, since callers show this error alone.
        let message = match &e {
            InstallError::Step { source, .. } => format!("{e}: {source}"),
            _ => e.to_string(),
        };
        io::Error::new(kind, message)
    }
}

/// Writes `data` to `path` (absolute, read beneath `root`) with the permission bits
/// `mode`, as the module doc says: atomically, its missing parents made, and never
/// through a symbolic link below `root`.
pub fn install_file(root: &Path, path: &Path, data: &[u8], mode: u32) -> Result<(), InstallError> {
    let not_a_file = || InstallError::NotAFilePath {
        path: path.to_path_buf(),
    };
    let mut components = path.components();
    if components.next() != Some(Component::RootDir) {
        return Err(not_a_file());
    }
    let mut names: Vec<&OsStr> = Vec::new();
    for component in components {
        match component {
            Component::Normal(name) => names.push(name),
            _ => return Err(not_a_file()),
        }
    }
    let Some(name) = names.pop() else {
        return Err(not_a_file());
    };
    let step = |step: &'static str| {
        move |e: Errno| InstallError::Step {
            path: path.to_path_buf(),
            step,
            source: e.into(),
        }
    };
    let directory = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let mut dir = rustix::fs::open(root, directory, Mode::empty()).map_err(step("open"))?;
    let mut walked = PathBuf::from("/");
    for component in names {
        walked.push(component);
        dir = open_or_make_dir(&dir, component).map_err(|e| match e {
            Errno::LOOP | Errno::NOTDIR => InstallError::Link {
                path: path.to_path_buf(),
                dir: walked.clone(),
            },
            e => step("open")(e),
        })?;
    }
    write_replace(&dir, name, data, mode).map_err(|(s, e)| step(s)(e))
}

/// The directory `name` in `parent`, made if missing, opened without following a link.
fn open_or_make_dir(parent: &OwnedFd, name: &OsStr) -> Result<OwnedFd, Errno> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat(parent, name, flags, Mode::empty()) {
        Err(Errno::NOENT) => {
            match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(DIR_MODE)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(e),
            }
            rustix::fs::openat(parent, name, flags, Mode::empty())
        }
        other => other,
    }
}

/// Writes a temporary file in `dir` and renames it over `name`; on failure the
/// temporary file is removed and the step that failed is returned.
fn write_replace(
    dir: &OwnedFd,
    name: &OsStr,
    data: &[u8],
    mode: u32,
) -> Result<(), (&'static str, Errno)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".tmp.{}.{n}", std::process::id()));
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mode = Mode::from_raw_mode(mode & 0o7777);
    let fd = rustix::fs::openat(dir, &tmp, flags, mode).map_err(|e| ("create", e))?;
    let written = (|| {
        // The umask may have taken bits off: the mode asked for, exactly.
        rustix::fs::fchmod(&fd, mode).map_err(|e| ("chmod", e))?;
        let mut file = File::from(fd);
        file.write_all(data).map_err(|e| ("write", errno_of(&e)))?;
        file.sync_all().map_err(|e| ("fsync", errno_of(&e)))?;
        rustix::fs::renameat(dir, &tmp, dir, name).map_err(|e| ("rename", e))
    })();
    if let Err(failed) = written {
        // Best effort: the temporary file is useless, and PID 1 removes STATE's at boot.
        let _ = rustix::fs::unlinkat(dir, &tmp, AtFlags::empty());
        return Err(failed);
    }
    rustix::fs::fsync(dir).map_err(|e| ("fsync dir", e))
}

/// The errno of an I/O error from a write (EIO when it carries none).
fn errno_of(e: &io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::IO, Errno::from_raw_os_error)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)] // the tests' own files in their temporary directories
    use std::fs;
    use std::os::unix::fs::{PermissionsExt as _, symlink};

    use super::*;

    type Result = std::result::Result<(), Box<dyn std::error::Error>>;

    fn mode_of(path: &Path) -> io::Result<u32> {
        Ok(fs::metadata(path)?.permissions().mode() & 0o7777)
    }

    #[test]
    fn a_file_is_written_whole_with_its_mode_and_parents() -> Result {
        let root = tempfile::tempdir()?;
        install_file(
            root.path(),
            Path::new("/var/lib/agent/a.conf"),
            b"one",
            0o640,
        )?;
        let file = root.path().join("var/lib/agent/a.conf");
        assert_eq!(fs::read(&file)?, b"one");
        assert_eq!(mode_of(&file)?, 0o640);
        assert_eq!(mode_of(&root.path().join("var/lib/agent"))?, 0o755);
        // Replaced whole, with the new mode; no temporary file is left beside it.
        install_file(root.path(), Path::new("/var/lib/agent/a.conf"), b"2", 0o755)?;
        assert_eq!(fs::read(&file)?, b"2");
        assert_eq!(mode_of(&file)?, 0o755);
        let names: Vec<_> = fs::read_dir(root.path().join("var/lib/agent"))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        assert_eq!(names, ["a.conf"]);
        Ok(())
    }

    #[test]
    fn a_symlinked_directory_on_the_way_is_never_followed() -> Result {
        let root = tempfile::tempdir()?;
        let elsewhere = tempfile::tempdir()?;
        fs::create_dir_all(root.path().join("var/lib"))?;
        // A pod plants /var/lib/evil -> a directory outside (STATE, the root...).
        symlink(elsewhere.path(), root.path().join("var/lib/evil"))?;
        let err = install_file(root.path(), Path::new("/var/lib/evil/x"), b"owned", 0o644)
            .err()
            .ok_or("the write went through the link")?;
        assert!(
            matches!(&err, InstallError::Link { dir, .. } if dir == Path::new("/var/lib/evil"))
        );
        let message = io::Error::from(err).to_string();
        assert!(
            message.contains("/var/lib/evil is a symbolic link"),
            "{message}"
        );
        // Nor through a link to a missing directory, which would be made elsewhere.
        symlink(
            elsewhere.path().join("new"),
            root.path().join("var/lib/dangling"),
        )?;
        assert!(matches!(
            install_file(
                root.path(),
                Path::new("/var/lib/dangling/d/x"),
                b"owned",
                0o644
            ),
            Err(InstallError::Link { .. })
        ));
        assert_eq!(
            fs::read_dir(elsewhere.path())?.count(),
            0,
            "written elsewhere"
        );
        // A link high up (/var itself) stops it too.
        let root2 = tempfile::tempdir()?;
        symlink(elsewhere.path(), root2.path().join("var"))?;
        assert!(matches!(
            install_file(root2.path(), Path::new("/var/x"), b"owned", 0o644),
            Err(InstallError::Link { .. })
        ));
        assert_eq!(
            fs::read_dir(elsewhere.path())?.count(),
            0,
            "written elsewhere"
        );
        Ok(())
    }

    #[test]
    fn pid1s_own_install_file_never_follows_a_link() -> Result {
        use crate::syscalls::{Linux, Syscalls as _};
        // The real implementation, from the real root: the temporary directory's own
        // path has no link, the one planted in it does.
        let root = tempfile::tempdir()?;
        let elsewhere = tempfile::tempdir()?;
        fs::create_dir(root.path().join("var"))?;
        symlink(elsewhere.path(), root.path().join("var/lib"))?;
        let err = Linux
            .install_file(&root.path().join("var/lib/x.conf"), b"owned", 0o644)
            .err()
            .ok_or("the write went through the link")?;
        assert_eq!(err.kind(), io::ErrorKind::NotADirectory, "{err}");
        assert!(err.to_string().contains("is a symbolic link"), "{err}");
        assert_eq!(
            fs::read_dir(elsewhere.path())?.count(),
            0,
            "written elsewhere"
        );
        Linux.install_file(&root.path().join("var/ok/x.conf"), b"ok", 0o600)?;
        assert_eq!(fs::read(root.path().join("var/ok/x.conf"))?, b"ok");
        Ok(())
    }

    #[test]
    fn a_symlink_at_the_target_is_replaced_not_written_through() -> Result {
        let root = tempfile::tempdir()?;
        let elsewhere = tempfile::tempdir()?;
        let victim = elsewhere.path().join("config.toml");
        fs::write(&victim, b"the node's config")?;
        fs::create_dir(root.path().join("etc"))?;
        symlink(&victim, root.path().join("etc/motd"))?;
        install_file(root.path(), Path::new("/etc/motd"), b"hello", 0o644)?;
        assert_eq!(fs::read(&victim)?, b"the node's config");
        let motd = root.path().join("etc/motd");
        assert!(fs::symlink_metadata(&motd)?.file_type().is_file());
        assert_eq!(fs::read(&motd)?, b"hello");
        Ok(())
    }

    #[test]
    fn paths_that_are_not_plain_absolute_file_paths_are_refused() -> Result {
        let root = tempfile::tempdir()?;
        fs::create_dir(root.path().join("var"))?;
        for bad in ["var/x", "/", "/var/../x", "/var/lib/../../x", ""] {
            assert!(
                matches!(
                    install_file(root.path(), Path::new(bad), b"x", 0o644),
                    Err(InstallError::NotAFilePath { .. })
                ),
                "{bad:?}"
            );
        }
        assert_eq!(fs::read_dir(root.path())?.count(), 1);
        Ok(())
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary_one() -> Result {
        let root = tempfile::tempdir()?;
        fs::create_dir_all(root.path().join("var/a.conf"))?;
        // The target is a directory: the rename fails and nothing is left behind.
        let err = install_file(root.path(), Path::new("/var/a.conf"), b"x", 0o644)
            .err()
            .ok_or("a directory was replaced")?;
        assert!(
            matches!(err, InstallError::Step { step: "rename", .. }),
            "{err}"
        );
        assert_eq!(fs::read_dir(root.path().join("var"))?.count(), 1);
        Ok(())
    }
}
