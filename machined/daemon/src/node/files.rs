//! `machinectl read PATH`: which files may be read, by whom, and reading them bounded.
//!
//! Only regular files under `/proc`, `/sys`, `/var/log`, `/system/state`,
//! `/etc/kubernetes`, `/var/lib/kubelet` and `/var/lib/keelson` are served, and within
//! them readers and operators get an allowlist ([`RULES`]): the kernel's and the node's
//! non-secret facts (`/proc/meminfo`, `/proc/sys/...`, a process's `status`, `/sys`,
//! `/var/log`). Kernel addresses (`/proc/kallsyms`, `/proc/*/stack`, `/proc/modules`),
//! processes' environments and command lines, pods' logs, debugfs, securityfs and the
//! firmware's config channel, and everything the allowlist does not name, need the admin
//! role, as do the trees that hold secrets: STATE (the machine config with the cluster
//! CAs' keys), `/etc/kubernetes` (the node's certificates and keys, kubeadm's files),
//! `/var/lib/kubelet` (the kubelet's configuration and keys) and `/var/lib/keelson`
//! (what machined gives the kubelet and etcd). Files that block on read (`/proc/kmsg`,
//! tracefs) or are memory are never served.
//!
//! The decision is made on the path as asked, lexically ([`authorize`]); the file is then
//! opened with `openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)` from a handle on the
//! tree's root ([`open`]), so the file opened is the file judged: a symlink anywhere in the
//! path is refused (with its target named), and so are `/proc`'s magic links
//! (`/proc/PID/root`, `/proc/PID/fd/N`). The kernel's own aliases `/proc/self`,
//! `/proc/mounts` and `/proc/net` are symlinks to machined's pid, and are rewritten to it
//! before the decision. At most [`MAX_READ`](keelson_api::api::MAX_READ) bytes are sent.

use std::fs::File;
use std::io::Read as _;
use std::os::fd::AsFd as _;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

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
    /// The file does not exist.
    #[error("{path}: no such file")]
    NotFound {
        /// The path.
        path: String,
    },
    /// The path is outside the readable trees.
    #[error(
        "{path} is outside what the node API serves, for every role; readable: /proc, /sys, /var/log, /system/state, /etc/kubernetes, /var/lib/kubelet, /var/lib/keelson"
    )]
    Outside {
        /// The path.
        path: String,
    },
    /// The file needs a higher role.
    #[error(
        "permission denied: reading {path} needs role {need} ({why}), your certificate has {have}"
    )]
    Role {
        /// The path.
        path: String,
        /// Why it is protected.
        why: &'static str,
        /// The role needed.
        need: Role,
        /// The caller's role.
        have: Role,
    },
    /// The file is never served.
    #[error("{path} cannot be read through the API, by any role: {why}")]
    Refused {
        /// The path.
        path: String,
        /// Why, and what to use instead.
        why: &'static str,
    },
    /// A component of the path is a symlink (or one of `/proc`'s magic links).
    #[error(
        "{path}: {link} is a symlink (to {target}); the node API follows no symlinks, ask for the path it points to"
    )]
    Symlink {
        /// The path asked for.
        path: String,
        /// The component that is a link.
        link: String,
        /// Where it points.
        target: String,
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

/// Who may read what a rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Every role (reader and up).
    Everyone,
    /// Admins only, for this reason.
    Admin(&'static str),
    /// No role: this reason, and what to use instead.
    Never(&'static str),
}

const ENVIRON: &str = "process environments may hold secrets";
const CMDLINE: &str = "command lines may hold secrets passed as flags";
const KADDR: &str = "it shows kernel addresses, which defeat KASLR";
const MEMORY: &str = "it is a process's memory";
const LOGS: &str = "pods' logs may hold what their applications print of their secrets";
const NOT_LISTED: &str = "it is not on the readers' allowlist of non-secret files";

/// The rules, first match wins; a rule covers its path and everything under it. In a
/// pattern `{pid}` matches one all-digit component (a process or thread id) and `*` any
/// one component. A path under [`READABLE`] that no rule covers is admin only.
pub const RULES: &[(&str, Access)] = &[
    // Never served.
    (
        "/proc/kmsg",
        Access::Never("it blocks and consumes the kernel log; use `machinectl dmesg`"),
    ),
    ("/proc/{pid}/mem", Access::Never(MEMORY)),
    ("/proc/{pid}/task/{pid}/mem", Access::Never(MEMORY)),
    (
        "/proc/kpagecount",
        Access::Never("it is a raw view of physical memory"),
    ),
    (
        "/proc/kpageflags",
        Access::Never("it is a raw view of physical memory"),
    ),
    (
        "/proc/kpagecgroup",
        Access::Never("it is a raw view of physical memory"),
    ),
    (
        "/sys/kernel/tracing",
        Access::Never("trace pipes block; tracing is not served"),
    ),
    (
        "/sys/kernel/debug/tracing",
        Access::Never("trace pipes block; tracing is not served"),
    ),
    // The trees that hold secrets.
    (
        "/system/state",
        Access::Admin("STATE holds the cluster secrets"),
    ),
    (
        "/etc/kubernetes",
        Access::Admin("it holds the node's certificates and private keys (etcd's among them)"),
    ),
    (
        "/var/lib/kubelet",
        Access::Admin("it holds the kubelet's certificates and private keys"),
    ),
    (
        "/var/lib/keelson",
        Access::Admin("it holds what machined gives the kubelet and etcd"),
    ),
    // Kernel addresses, memory, processes' secrets.
    ("/proc/kallsyms", Access::Admin(KADDR)),
    ("/proc/modules", Access::Admin(KADDR)),
    ("/proc/vmallocinfo", Access::Admin(KADDR)),
    ("/proc/iomem", Access::Admin(KADDR)),
    ("/proc/timer_list", Access::Admin(KADDR)),
    ("/proc/kcore", Access::Admin("it is the kernel's memory")),
    (
        "/proc/cmdline",
        Access::Admin("the kernel command line may carry the config URL's credentials"),
    ),
    ("/proc/{pid}/environ", Access::Admin(ENVIRON)),
    ("/proc/{pid}/task/{pid}/environ", Access::Admin(ENVIRON)),
    ("/proc/{pid}/cmdline", Access::Admin(CMDLINE)),
    ("/proc/{pid}/task/{pid}/cmdline", Access::Admin(CMDLINE)),
    ("/proc/{pid}/stack", Access::Admin(KADDR)),
    ("/proc/{pid}/task/{pid}/stack", Access::Admin(KADDR)),
    // The kernel's non-secret facts.
    ("/proc/sys", Access::Everyone),
    ("/proc/pressure", Access::Everyone),
    ("/proc/cpuinfo", Access::Everyone),
    ("/proc/meminfo", Access::Everyone),
    ("/proc/loadavg", Access::Everyone),
    ("/proc/uptime", Access::Everyone),
    ("/proc/version", Access::Everyone),
    ("/proc/stat", Access::Everyone),
    ("/proc/vmstat", Access::Everyone),
    ("/proc/diskstats", Access::Everyone),
    ("/proc/partitions", Access::Everyone),
    ("/proc/filesystems", Access::Everyone),
    ("/proc/swaps", Access::Everyone),
    ("/proc/interrupts", Access::Everyone),
    ("/proc/softirqs", Access::Everyone),
    ("/proc/devices", Access::Everyone),
    ("/proc/cgroups", Access::Everyone),
    ("/proc/buddyinfo", Access::Everyone),
    ("/proc/mdstat", Access::Everyone),
    // A process's non-secret facts (`/proc/mounts` and `/proc/net` are machined's own).
    ("/proc/{pid}/status", Access::Everyone),
    ("/proc/{pid}/stat", Access::Everyone),
    ("/proc/{pid}/statm", Access::Everyone),
    ("/proc/{pid}/comm", Access::Everyone),
    ("/proc/{pid}/limits", Access::Everyone),
    ("/proc/{pid}/cgroup", Access::Everyone),
    ("/proc/{pid}/oom_score", Access::Everyone),
    ("/proc/{pid}/oom_score_adj", Access::Everyone),
    ("/proc/{pid}/mounts", Access::Everyone),
    ("/proc/{pid}/mountinfo", Access::Everyone),
    ("/proc/{pid}/net", Access::Everyone),
    ("/proc/{pid}/task/{pid}/status", Access::Everyone),
    ("/proc/{pid}/task/{pid}/stat", Access::Everyone),
    ("/proc/{pid}/task/{pid}/comm", Access::Everyone),
    // /sys, but for debugfs, securityfs, the firmware and what shows kernel addresses.
    (
        "/sys/kernel/debug",
        Access::Admin("debugfs exposes the kernel's internals and addresses"),
    ),
    (
        "/sys/kernel/security",
        Access::Admin("securityfs holds the security modules' policies and measurements"),
    ),
    ("/sys/kernel/vmcoreinfo", Access::Admin(KADDR)),
    ("/sys/module/*/sections", Access::Admin(KADDR)),
    (
        "/sys/firmware",
        Access::Admin("the firmware's config channel carries the machine config"),
    ),
    (
        "/sys/fs/bpf",
        Access::Admin("pinned BPF maps may hold other programs' data"),
    ),
    (
        "/sys/fs/pstore",
        Access::Admin("crash dumps carry kernel addresses and memory"),
    ),
    ("/sys", Access::Everyone),
    // /var/log, but for pods' and containers' logs.
    ("/var/log/pods", Access::Admin(LOGS)),
    ("/var/log/containers", Access::Admin(LOGS)),
    ("/var/log", Access::Everyone),
];

fn matches(pattern: &str, path: &Path) -> bool {
    let mut pat = Path::new(pattern).components();
    let mut comps = path.components();
    loop {
        match (pat.next(), comps.next()) {
            (None, _) => return true,
            (Some(_), None) => return false,
            (Some(Component::Normal(p)), Some(Component::Normal(c))) => {
                let ok = match p.to_str() {
                    Some("*") => true,
                    Some("{pid}") => c
                        .to_str()
                        .is_some_and(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit())),
                    _ => p == c,
                };
                if !ok {
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

/// Who may read `path` (absolute, lexical, aliases rewritten); None when it is outside
/// [`READABLE`].
pub fn access(path: &Path) -> Option<Access> {
    if !READABLE.iter().any(|r| path.starts_with(r)) {
        return None;
    }
    Some(
        RULES
            .iter()
            .find(|(pattern, _)| matches(pattern, path))
            .map_or(Access::Admin(NOT_LISTED), |(_, access)| *access),
    )
}

/// Rewrites `/proc`'s own aliases of machined's process (`/proc/self`, `/proc/mounts`,
/// `/proc/net`: symlinks the open would refuse) to its pid.
fn unalias(path: &Path) -> PathBuf {
    let mut comps = path.components();
    let (Some(Component::RootDir), Some(Component::Normal(proc)), Some(Component::Normal(first))) =
        (comps.next(), comps.next(), comps.next())
    else {
        return path.to_path_buf();
    };
    if proc != "proc" {
        return path.to_path_buf();
    }
    let pid = std::process::id().to_string();
    let base = Path::new("/proc").join(&pid);
    let rest = comps.as_path();
    match first.to_str() {
        Some("self") => base.join(rest),
        Some("mounts" | "net") => base.join(first).join(rest),
        _ => path.to_path_buf(),
    }
}

/// Decides whether `role` may read `requested`, on the path as asked (lexically: the open
/// follows no symlink, so this is the file that will be opened). Returns the path to open,
/// `/proc`'s aliases of machined rewritten to its pid.
pub fn authorize(requested: &str, role: Role) -> Result<PathBuf, ReadError> {
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
    let path = unalias(req);
    let shown = requested.to_owned();
    match access(&path) {
        None => Err(ReadError::Outside { path: shown }),
        Some(Access::Never(why)) => Err(ReadError::Refused { path: shown, why }),
        Some(Access::Admin(why)) if !api::allows(role, Role::Admin) => Err(ReadError::Role {
            path: shown,
            why,
            need: Role::Admin,
            have: role,
        }),
        Some(_) => Ok(path),
    }
}

/// Opens `path` (as [`authorize`] returned it) under `root`, which maps the node's `/`
/// (tests point it at a fixture): `openat2` from a handle on `root` with
/// `RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH`, non-blocking; regular files only.
/// `requested` is the path as asked, for messages.
pub fn open(root: &Path, path: &Path, requested: &str) -> Result<File, ReadError> {
    let io = |source: std::io::Error| ReadError::Io {
        path: requested.to_owned(),
        source,
    };
    let dir = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io(e.into()))?;
    let relative = path.strip_prefix("/").unwrap_or(path);
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_BENEATH);
    let fd = match nix::fcntl::openat2(dir.as_fd(), relative, how) {
        Ok(fd) => fd,
        Err(Errno::ENOENT | Errno::ENOTDIR) => {
            return Err(ReadError::NotFound {
                path: requested.to_owned(),
            });
        }
        Err(Errno::ELOOP | Errno::EXDEV) => return Err(symlink_in(&dir, relative, requested)),
        Err(e) => return Err(io(e.into())),
    };
    let file = File::from(fd);
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular {
            path: requested.to_owned(),
        });
    }
    Ok(file)
}

/// Names the first component of `relative` that is a symlink, for the refusal.
fn symlink_in(dir: &std::os::fd::OwnedFd, relative: &Path, requested: &str) -> ReadError {
    let mut prefix = PathBuf::new();
    for c in relative.components() {
        prefix.push(c);
        if let Ok(target) = nix::fcntl::readlinkat(dir.as_fd(), &prefix) {
            return ReadError::Symlink {
                path: requested.to_owned(),
                link: Path::new("/").join(&prefix).display().to_string(),
                target: target.to_string_lossy().into_owned(),
            };
        }
    }
    ReadError::Symlink {
        path: requested.to_owned(),
        link: requested.to_owned(),
        target: "somewhere the kernel would not say".to_owned(),
    }
}

/// [`authorize`] then [`open`]: the path opened and the file.
pub fn open_for(requested: &str, role: Role, root: &Path) -> Result<(PathBuf, File), ReadError> {
    let path = authorize(requested, role)?;
    let file = open(root, &path, requested)?;
    Ok((path, file))
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

    /// Authorizes and opens `path` on this host as `role`; `want` is Ok or a piece of the
    /// refusal.
    fn check(path: &str, role: Role, want: Result<(), &str>) {
        let got = open_for(path, role, Path::new("/"));
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
        check("/proc/mounts", Role::Reader, Ok(()));
        check("/proc/net/dev", Role::Operator, Ok(()));
        check("/proc/1/status", Role::Reader, Ok(()));
        check("/proc/sys/kernel/ostype", Role::Reader, Ok(()));
        check("/sys/kernel/uevent_seqnum", Role::Reader, Ok(()));
        check(
            "/etc/passwd",
            Role::Admin,
            Err("outside what the node API serves"),
        );
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
        check("/proc/self/cmdline", Role::Admin, Ok(()));
    }

    #[test]
    fn readers_get_no_kernel_addresses_secrets_or_pod_logs() {
        for (path, why) in [
            ("/proc/kallsyms", "kernel addresses"),
            ("/proc/modules", "kernel addresses"),
            ("/proc/1/stack", "kernel addresses"),
            ("/proc/1/task/1/stack", "kernel addresses"),
            ("/proc/1/environ", "environments may hold secrets"),
            ("/proc/1/cmdline", "command lines may hold secrets"),
            ("/proc/self/cmdline", "command lines may hold secrets"),
            ("/proc/1/maps", "not on the readers' allowlist"),
            ("/proc/keys", "not on the readers' allowlist"),
            ("/proc/cmdline", "config URL"),
            ("/sys/kernel/debug/sched/debug", "debugfs"),
            ("/sys/kernel/security/lsm", "securityfs"),
            ("/sys/firmware/qemu_fw_cfg/by_name", "config channel"),
            ("/var/log/pods/ns_pod_uid/c/0.log", "pods' logs"),
            ("/var/log/containers/x.log", "pods' logs"),
            ("/system/state/config.toml", "cluster secrets"),
        ] {
            for role in [Role::Reader, Role::Operator] {
                let err = authorize(path, role).unwrap_err().to_string();
                assert!(
                    err.contains(&format!("{path} needs role admin ("))
                        && err.contains(why)
                        && err.contains(&format!("your certificate has {role}")),
                    "{path}: {err}"
                );
            }
            authorize(path, Role::Admin).unwrap();
        }
        for path in [
            "/sys/kernel/tracing/trace_pipe",
            "/sys/kernel/debug/tracing/trace_pipe",
        ] {
            let err = authorize(path, Role::Admin).unwrap_err().to_string();
            assert!(err.contains("by any role: trace pipes block"), "{err}");
        }
        assert_eq!(
            authorize("/proc/self/status", Role::Reader).unwrap(),
            Path::new(&format!("/proc/{}/status", std::process::id()))
        );
        assert_eq!(
            authorize("/proc/net/dev", Role::Reader).unwrap(),
            Path::new(&format!("/proc/{}/net/dev", std::process::id()))
        );
        assert_eq!(access(Path::new("/proc/sys/x")), Some(Access::Everyone));
        assert_eq!(access(Path::new("/procx")), None);
    }

    #[test]
    fn proc_magic_links_are_refused_even_to_admins() {
        let err = open_for("/proc/self/root/etc/hostname", Role::Admin, Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "/proc/{}/root is a symlink (to /)",
                std::process::id()
            )),
            "{err}"
        );
        let err = open_for("/proc/1/cwd/x", Role::Reader, Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs role admin"), "{err}");
    }

    fn fixture() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("system/state")).unwrap();
        std::fs::write(dir.path().join("system/state/config.toml"), "x").unwrap();
        std::fs::create_dir_all(dir.path().join("var/log/sub")).unwrap();
        std::fs::write(dir.path().join("var/log/boot.log"), "booted").unwrap();
        std::os::unix::fs::symlink(
            "../../system/state/config.toml",
            dir.path().join("var/log/link"),
        )
        .unwrap();
        std::os::unix::fs::symlink("boot.log", dir.path().join("var/log/same-tree")).unwrap();
        std::os::unix::fs::symlink("/", dir.path().join("var/log/sub/up")).unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        (dir, root)
    }

    #[test]
    fn symlinks_anywhere_in_the_path_are_refused() {
        let (_dir, root) = fixture();
        let (_, mut file) = open_for("/var/log/boot.log", Role::Reader, &root).unwrap();
        let p = Path::new("/var/log/boot.log");
        assert_eq!(read_chunk(&mut file, 100, p).unwrap(), b"booted");
        for (path, link, target) in [
            (
                "/var/log/link",
                "/var/log/link",
                "../../system/state/config.toml",
            ),
            ("/var/log/same-tree", "/var/log/same-tree", "boot.log"),
            ("/var/log/sub/up/etc/passwd", "/var/log/sub/up", "/"),
        ] {
            for role in [Role::Reader, Role::Admin] {
                let err = open_for(path, role, &root).unwrap_err().to_string();
                assert_eq!(
                    err,
                    format!(
                        "{path}: {link} is a symlink (to {target}); the node API follows no symlinks, ask for the path it points to"
                    )
                );
            }
        }
    }

    #[test]
    fn state_needs_admin_through_a_fixture_root() {
        let (_dir, root) = fixture();
        let err = open_for("/system/state/config.toml", Role::Operator, &root).unwrap_err();
        assert!(
            err.to_string()
                .contains("needs role admin (STATE holds the cluster secrets)"),
            "{err}"
        );
        let (ok, mut file) = open_for("/system/state/config.toml", Role::Admin, &root).unwrap();
        assert_eq!(ok, Path::new("/system/state/config.toml"));
        assert_eq!(read_chunk(&mut file, 100, &ok).unwrap(), b"x");
        assert!(read_chunk(&mut file, 100, &ok).unwrap().is_empty());
        let err = open_for("/var/log/sub", Role::Reader, &root).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
