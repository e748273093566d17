//! Early mounts as a table, applied in order by one function.
//!
//! Stage 1 mounts the kernel's pseudo filesystems into the initramfs; stage 2 finds them
//! already there (stage 1 moved them into the new root) and skips what is mounted.
//! PID 1's later mounts (devpts, /run, cgroup2...) join the table as more rows.

use std::io;
use std::path::Path;

use crate::syscalls::{MountFlags, Syscalls, errno_name};

/// One row of a mount table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountSpec {
    /// Mount source (for pseudo filesystems, their name).
    pub source: &'static str,
    /// Absolute mount point, created (mode 0755) when missing.
    pub target: &'static str,
    /// Filesystem type.
    pub fstype: &'static str,
    /// `MS_*` flags.
    pub flags: MountFlags,
    /// Filesystem options.
    pub data: &'static str,
}

const NOSUID_NODEV_NOEXEC: MountFlags = MountFlags::NOSUID
    .union(MountFlags::NODEV)
    .union(MountFlags::NOEXEC);

/// What both stages need first: `/proc`, `/sys` and `/dev`.
pub const EARLY_MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    MountSpec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    MountSpec {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MountFlags::NOSUID,
        data: "mode=0755",
    },
];

/// Errors of applying a mount table.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The mount point could not be created.
    #[error("cannot create mount point {target}: {errno}", errno = errno_name(source))]
    Mkdir {
        /// Mount point.
        target: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The mount itself failed.
    #[error("cannot mount {fstype} at {target}: {errno}", errno = errno_name(source))]
    Mount {
        /// Filesystem type.
        fstype: &'static str,
        /// Mount point.
        target: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

/// Create `path` as a directory unless it exists.
pub fn ensure_dir(sys: &dyn Syscalls, path: &Path, mode: u32) -> io::Result<()> {
    match sys.mkdir(path, mode) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Mount every row of `table` in order, skipping targets that are already mount points.
/// Returns the targets it mounted.
pub fn apply(sys: &dyn Syscalls, table: &[MountSpec]) -> Result<Vec<&'static str>, Error> {
    let mut mounted = Vec::new();
    for spec in table {
        let target = Path::new(spec.target);
        if sys.is_mount_point(target).unwrap_or(false) {
            continue;
        }
        ensure_dir(sys, target, 0o755).map_err(|source| Error::Mkdir {
            target: spec.target,
            source,
        })?;
        sys.mount(spec.source, target, spec.fstype, spec.flags, spec.data)
            .map_err(|source| Error::Mount {
                fstype: spec.fstype,
                target: spec.target,
                source,
            })?;
        mounted.push(spec.target);
    }
    Ok(mounted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscalls::fake::{Call, Fake};
    use std::path::PathBuf;

    fn mount(source: &str, target: &str, fstype: &str, flags: MountFlags, data: &str) -> Call {
        Call::Mount {
            source: source.into(),
            target: target.into(),
            fstype: fstype.into(),
            flags,
            data: data.into(),
        }
    }

    #[test]
    fn early_mounts_are_made_in_table_order() -> Result<(), Error> {
        let fake = Fake::new();
        let mounted = apply(&fake, EARLY_MOUNTS)?;
        assert_eq!(mounted, ["/proc", "/sys", "/dev"]);
        assert_eq!(
            fake.calls(),
            [
                Call::Mkdir("/proc".into()),
                mount("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, ""),
                Call::Mkdir("/sys".into()),
                mount("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, ""),
                Call::Mkdir("/dev".into()),
                mount(
                    "devtmpfs",
                    "/dev",
                    "devtmpfs",
                    MountFlags::NOSUID,
                    "mode=0755"
                ),
            ]
        );
        Ok(())
    }

    #[test]
    fn existing_mount_points_are_skipped() -> Result<(), Error> {
        let fake = Fake::new();
        fake.mount_points
            .borrow_mut()
            .insert(PathBuf::from("/proc"));
        fake.mount_points.borrow_mut().insert(PathBuf::from("/dev"));
        assert_eq!(apply(&fake, EARLY_MOUNTS)?, ["/sys"]);
        Ok(())
    }

    #[test]
    fn a_failed_mount_names_the_filesystem_and_errno() {
        let mut fake = Fake::new();
        fake.mount_errors.insert("sysfs".into(), 19);
        let err = apply(&fake, EARLY_MOUNTS)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(err, "cannot mount sysfs at /sys: ENODEV (19)");
    }
}
