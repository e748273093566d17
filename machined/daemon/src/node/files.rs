//! `machinectl read PATH`: which files may be read, by whom, and reading them bounded.
//!
//! Only regular files under `/proc`, `/sys`, `/var/log`, `/system/state`,
//! `/etc/kubernetes`, `/var/lib/kubelet` and `/var/lib/keelson` are served, judged by the path after every symlink is resolved (so
//! `/proc/self/root/etc/...` is refused). Files that hold secrets need the admin role:
//! STATE (the machine config with the cluster CAs' keys), `/etc/kubernetes` (the
//! certificates and keys the node issued, kubeadm's files), `/var/lib/kubelet` (the
//! kubelet's configuration and its own keys), `/var/lib/keelson` (the flags and settings
//! machined gives the kubelet and etcd), the firmware's config channel (`/sys/firmware`), and processes'
//! environments and memory. Files that block on read (`/proc/kmsg`, trace pipes) are
//! refused with a pointer to what to use instead. At most
//! [`MAX_READ`](keelson_api::api::MAX_READ) bytes are sent.

use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Component, Path, PathBuf};

use keelson_configs::pki::Role;

use keelson_api::api;

/// The size of each streamed chunk.
pub const CHUNK: usize = 64 * 1024;

/// Errors of `read`; each maps to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The path is not absolute or has `..`-style components that make it ambiguous.
    #[error("{path:?} is not an absolute path; give a full path such as /proc/meminfo")]
    NotAbsolute {
        /// The path.
        path: String,
    },
    /// The file does not exist or cannot be resolved.
    #[error("{path}: no such file")]
    NotFound {
        /// The path.
        path: String,
    },
    /// The path is outside the readable trees.
    #[error(
        "{path} is outside what the node API serves; readable: /proc, /sys, /var/log, /system/state, /etc/kubernetes, /var/lib/kubelet, /var/lib/keelson"
    )]
    Outside {
        /// The path (resolved).
        path: String,
    },
    /// The file needs a higher role.
    #[error(
        "permission denied: reading {path} needs role {need} ({why}), your certificate has {have}"
    )]
    Role {
        /// The path (resolved).
        path: String,
        /// Why it is protected.
        why: &'static str,
        /// The role needed.
        need: Role,
        /// The caller's role.
        have: Role,
    },
    /// The file is never served.
    #[error("{path} cannot be read through the API: {why}")]
    Refused {
        /// The path (resolved).
        path: String,
        /// Why, and what to use instead.
        why: &'static str,
    },
    /// Not a regular file.
    #[error("{path} is not a regular file (directories, devices and sockets are not served)")]
    NotRegular {
        /// The path.
        path: String,
    },
    /// Opening or reading failed.
    #[error("cannot read {path}")]
    Io {
        /// The path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The trees `read` serves.
pub const READABLE: [&str; 7] = [
    "/proc",
    "/sys",
    "/var/log",
    "/system/state",
    "/etc/kubernetes",
    "/var/lib/kubelet",
    "/var/lib/keelson",
];

/// Paths that need more than the reader role: (pattern, role, why). A pattern's `*`
/// matches one path component.
const PROTECTED: [(&str, Role, &str); 8] = [
    (
        "/var/lib/kubelet",
        Role::Admin,
        "it holds the kubelet's certificates and private keys",
    ),
    (
        "/var/lib/keelson",
        Role::Admin,
        "it holds what machined gives the kubelet and etcd",
    ),
    (
        "/system/state",
        Role::Admin,
        "STATE holds the cluster secrets",
    ),
    (
        "/etc/kubernetes",
        Role::Admin,
        "it holds the node's certificates and private keys (etcd's among them)",
    ),
    (
        "/sys/firmware",
        Role::Admin,
        "the firmware's config channel carries the machine config",
    ),
    (
        "/proc/*/environ",
        Role::Admin,
        "process environments may hold secrets",
    ),
    (
        "/proc/*/task/*/environ",
        Role::Admin,
        "process environments may hold secrets",
    ),
    ("/proc/kcore", Role::Admin, "it is the kernel's memory"),
];

/// Paths never served: (pattern, why).
const NEVER: [(&str, &str); 6] = [
    (
        "/proc/kmsg",
        "it blocks and consumes the kernel log; use `machinectl dmesg`",
    ),
    ("/proc/*/mem", "it is a process's memory"),
    ("/proc/*/task/*/mem", "it is a process's memory"),
    ("/proc/kpagecount", "it is a raw view of physical memory"),
    ("/proc/kpageflags", "it is a raw view of physical memory"),
    (
        "/sys/kernel/tracing",
        "trace pipes block; tracing is not served",
    ),
];

fn matches(pattern: &str, path: &Path) -> bool {
    let mut pat = Path::new(pattern).components();
    let mut comps = path.components();
    loop {
        match (pat.next(), comps.next()) {
            (None, _) => return true,
            (Some(_), None) => return false,
            (Some(Component::Normal(p)), Some(Component::Normal(c))) => {
                if p != "*" && p != c {
                    return false;
                }
            }
            (Some(p), Some(c)) => {
                if p != c {
                    return false;
                }
            }
        }
    }
}

fn under(path: &Path, root: &str) -> bool {
    path.starts_with(root)
}

/// Decides whether `role` may read `requested`, and resolves it. `root` maps the node's
/// `/` (tests point it at a fixture; on the node it is `/`).
pub fn authorize(requested: &str, role: Role, root: &Path) -> Result<PathBuf, ReadError> {
    let req = Path::new(requested);
    if !req.is_absolute()
        || req
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(ReadError::NotAbsolute {
            path: requested.to_owned(),
        });
    }
    let judge = |candidate: &Path| -> Result<(), ReadError> {
        let shown = candidate.display().to_string();
        if !READABLE.iter().any(|r| under(candidate, r)) {
            return Err(ReadError::Outside { path: shown });
        }
        for (pattern, why) in NEVER {
            if matches(pattern, candidate) {
                return Err(ReadError::Refused { path: shown, why });
            }
        }
        for (pattern, need, why) in PROTECTED {
            if matches(pattern, candidate) && !api::allows(role, need) {
                return Err(ReadError::Role {
                    path: shown,
                    why,
                    need,
                    have: role,
                });
            }
        }
        Ok(())
    };
    // The path as asked first (so whether a protected file exists is not revealed), then
    // the path after every symlink is resolved: /proc/self/... is still under /proc, and
    // /proc/self/root resolves to /, which is refused.
    judge(req)?;
    let on_disk = root.join(req.strip_prefix("/").unwrap_or(req));
    let resolved = std::fs::canonicalize(&on_disk).map_err(|_| ReadError::NotFound {
        path: requested.to_owned(),
    })?;
    let logical =
        Path::new("/").join(
            resolved
                .strip_prefix(root)
                .map_err(|_| ReadError::Outside {
                    path: resolved.display().to_string(),
                })?,
        );
    judge(&logical)?;
    Ok(resolved)
}

/// Opens an authorized path for bounded reading (non-blocking, regular files only).
pub fn open(path: &Path) -> Result<File, ReadError> {
    let shown = path.display().to_string();
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| ReadError::Io {
            path: shown.clone(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| ReadError::Io {
        path: shown.clone(),
        source,
    })?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular { path: shown });
    }
    Ok(file)
}

/// Reads the next chunk (at most [`CHUNK`] bytes, and no more than `left`).
pub fn read_chunk(file: &mut File, left: u64, path: &Path) -> Result<Vec<u8>, ReadError> {
    let want = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
    let mut buf = vec![0u8; want];
    let n = loop {
        match file.read(&mut buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break 0,
            Err(source) => {
                return Err(ReadError::Io {
                    path: path.display().to_string(),
                    source,
                });
            }
        }
    };
    buf.truncate(n);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn check(path: &str, role: Role, want: Result<(), &str>) {
        let got = authorize(path, role, Path::new("/"));
        match (got, want) {
            (Ok(_), Ok(())) => {}
            (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{path}: {e}"),
            (got, want) => panic!("{path} as {role}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn the_policy_table() {
        check("/proc/meminfo", Role::Reader, Ok(()));
        check("/proc/self/status", Role::Reader, Ok(()));
        check("/sys/kernel/uevent_seqnum", Role::Reader, Ok(()));
        check(
            "/etc/passwd",
            Role::Admin,
            Err("outside what the node API serves"),
        );
        check("/proc/self/root/etc/hostname", Role::Admin, Err("outside"));
        check(
            "/proc/../etc/passwd",
            Role::Admin,
            Err("not an absolute path"),
        );
        check("proc/meminfo", Role::Admin, Err("not an absolute path"));
        check("/proc/nope", Role::Admin, Err("no such file"));
        check("/proc/kmsg", Role::Admin, Err("machinectl dmesg"));
        check("/proc/self/mem", Role::Admin, Err("a process's memory"));
        check(
            "/proc/self/environ",
            Role::Reader,
            Err(
                "needs role admin (process environments may hold secrets), your certificate has reader",
            ),
        );
        check("/proc/self/environ", Role::Admin, Ok(()));
    }

    #[test]
    fn state_needs_admin_through_a_fixture_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("system/state")).unwrap();
        std::fs::write(dir.path().join("system/state/config.toml"), "x").unwrap();
        std::fs::create_dir_all(dir.path().join("var/log")).unwrap();
        std::os::unix::fs::symlink(
            "../../system/state/config.toml",
            dir.path().join("var/log/link"),
        )
        .unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let err = authorize("/system/state/config.toml", Role::Operator, &root).unwrap_err();
        assert!(
            err.to_string()
                .contains("needs role admin (STATE holds the cluster secrets)"),
            "{err}"
        );
        let err = authorize("/var/log/link", Role::Reader, &root).unwrap_err();
        assert!(err.to_string().contains("needs role admin"), "{err}");
        let ok = authorize("/system/state/config.toml", Role::Admin, &root).unwrap();
        assert_eq!(ok, root.join("system/state/config.toml"));
        let mut file = open(&ok).unwrap();
        assert_eq!(read_chunk(&mut file, 100, &ok).unwrap(), b"x");
        assert!(read_chunk(&mut file, 100, &ok).unwrap().is_empty());
        let err = open(&root.join("var/log")).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
