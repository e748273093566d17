//! What machined reads about the node itself, from `/proc`, `/sys`, `/dev/kmsg` and the
//! root filesystem: its version ([`version`]), the tables of `machinectl get`
//! ([`tables`]), the kernel log ([`kmsg`]), files for `machinectl read` ([`files`]) and the
//! preflight checks of `machinectl health` ([`health`]).
//!
//! Every path is taken from [`NodePaths`], so tests point them at fixtures.

pub mod files;
pub mod health;
pub mod kmsg;
pub mod tables;
pub mod version;

use std::path::PathBuf;

/// Where the node facts are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePaths {
    /// procfs (`/proc`).
    pub proc: PathBuf,
    /// sysfs (`/sys`).
    pub sys: PathBuf,
    /// The os-release file (`/usr/lib/os-release`).
    pub os_release: PathBuf,
    /// The kernel log device (`/dev/kmsg`).
    pub kmsg: PathBuf,
    /// containerd's socket (`/run/containerd/containerd.sock`).
    pub containerd_socket: PathBuf,
}

impl Default for NodePaths {
    fn default() -> Self {
        NodePaths {
            proc: "/proc".into(),
            sys: "/sys".into(),
            os_release: PathBuf::from("/").join(keelson_configs::layout::OS_RELEASE),
            kmsg: "/dev/kmsg".into(),
            containerd_socket: "/run/containerd/containerd.sock".into(),
        }
    }
}
