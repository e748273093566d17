//! QEMU machines and local clusters: the one home of the QEMU machine definitions that
//! `machinectl cluster`, the end-to-end tests (`tests/`) and `cargo xtask` (run, cluster,
//! bench) all start their VMs through, and of local clusters: several Keelson nodes under
//! QEMU on this machine, like `minikube start` or `talosctl cluster create`, with or
//! without KVM and with or without root.
//!
//! | module | what it is |
//! |---|---|
//! | [`qemu`] | UEFI firmware, the accelerator probe and the QEMU command line for one machine |
//! | [`cold_boot`] | guest reboots as cold boots: QEMU under `-no-reboot`, started again on the same disk and variables |
//! | [`plan`] | names, roles, static addresses, MACs and each node's config patch |
//! | [`record`] | the state directory and `cluster.toml`, written before any VM starts |
//! | [`netns`] | as root: the namespace, its bridge and taps |
//! | [`helper`] | the detached helper: API forwarder (root) or Ethernet switch (rootless) |
//! | [`create`](mod@create) | generating configs, disks, networking, starting the VMs, waiting for health |
//! | [`bootstrap`] | bootstrapping etcd on the first control plane, waiting for it on every control plane |
//! | [`launch`] | one node's QEMU command line from the record, started detached (first boot or again) |
//! | [`start`](mod@start) | booting again nodes whose VM is down, waiting for their APIs |
//! | [`stage1_watch`] | a VM without a stage-1 line within a deadline of power-on is hung: power-cycled, at most twice |
//! | [`manage`] | `destroy`, `list`, `show` |
//!
//! Networking. As root the nodes share a bridge inside the network namespace
//! `keelson-NAME` (QEMU runs inside it, one tap per VM); the helper forwards one loopback
//! port per node into the namespace. Without root the nodes share an Ethernet switch of
//! ours over unix datagram sockets, and QEMU's restricted user-mode network forwards one
//! loopback port per node to the node's API. Either way machinectl reaches node N at
//! `127.0.0.1:PORT_N` and nothing leaves the host.

pub mod bootstrap;
pub mod cold_boot;
pub mod create;
pub mod helper;
pub mod launch;
pub mod manage;
pub mod netns;
pub mod plan;
pub mod qemu;
pub mod record;
pub mod stage1_watch;
pub mod start;

use std::path::{Path, PathBuf};

use qemu::QemuError;

pub use create::{CreateOptions, create};
pub use manage::{destroy, list, show};
pub use start::start;

/// How many console lines a report of a stopped node shows.
pub const CONSOLE_TAIL_LINES: usize = 20;

/// Errors of local clusters; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
    /// The name is taken.
    #[error(
        "a cluster named {name:?} already exists (state in {dir}); remove it with `machinectl cluster destroy --name {name}` or choose another --name"
    )]
    Exists {
        /// Cluster name.
        name: String,
        /// Its state directory.
        dir: PathBuf,
    },
    /// No such cluster.
    #[error(
        "there is no cluster named {name:?} (no state directory {dir}); `machinectl cluster list` shows the clusters there are"
    )]
    NotFound {
        /// Cluster name.
        name: String,
        /// Where it would be.
        dir: PathBuf,
    },
    /// A filesystem or process operation failed.
    #[error("cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file, directory or address involved.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The image to boot is not there.
    #[error(
        "cannot read the image {path}: build it with `cargo xtask image --arch {arch}`, or pass --image PATH"
    )]
    NoImage {
        /// The image path.
        path: PathBuf,
        /// The guest architecture.
        arch: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The record cannot be read or written.
    #[error(
        "the cluster record {path} is unreadable ({message}); `machinectl cluster destroy` still removes the cluster's processes and files"
    )]
    BadRecord {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An atomic write failed.
    #[error("cannot write cluster state")]
    Write(#[source] keelson_api::atomic::WriteError),
    /// An external tool failed.
    #[error("{tool} failed: {detail}")]
    Tool {
        /// The command.
        tool: String,
        /// What it said.
        detail: String,
    },
    /// QEMU set-up failed.
    #[error(transparent)]
    Qemu(#[from] QemuError),
    /// Generating the configs failed.
    #[error("cannot generate the cluster's configs: {0}")]
    Generate(String),
    /// The client config could not be updated.
    #[error("cannot update the machinectl client config")]
    ClientConfig(#[source] keelson_api::clientconfig::ClientConfigError),
    /// A VM stopped while the cluster was being created.
    #[error(
        "node {node}'s VM stopped ({status}) before it was healthy; its console ends with:\n{tail}\n(the cluster is left for inspection: `machinectl cluster show --name {cluster}`; remove it with `machinectl cluster destroy --name {cluster}`)"
    )]
    NodeDied {
        /// Cluster name.
        cluster: String,
        /// Node name.
        node: String,
        /// QEMU's exit status.
        status: String,
        /// The console's last lines (and QEMU's stderr).
        tail: String,
    },
    /// A node hung before stage 1 at every power-on.
    #[error(
        "node {node} {what}, at the last of its {boots} power-ons ({cycles} power cycles did not help); its console log is {console} (each boot after a `===== power cycle N =====` line), QEMU's stderr beside it\n(the cluster is left for inspection: `machinectl cluster show --name {cluster}`; remove it with `machinectl cluster destroy --name {cluster}`)"
    )]
    Hung {
        /// Cluster name.
        cluster: String,
        /// Node name.
        node: String,
        /// What it did (`stage1_watch::describe`).
        what: String,
        /// How many times it was powered on.
        boots: u32,
        /// How many times it was power-cycled.
        cycles: u32,
        /// Its console log.
        console: PathBuf,
    },
    /// The first control plane refused the bootstrap for good.
    #[error(
        "the etcd bootstrap on {node} was refused: {message}\n(the cluster is left running: `machinectl --nodes {api} health` shows the node's state; remove the cluster with `machinectl cluster destroy --name {cluster}`)"
    )]
    BootstrapRefused {
        /// Cluster name.
        cluster: String,
        /// The control plane asked.
        node: String,
        /// Its API address.
        api: String,
        /// What it said.
        message: String,
    },
    /// etcd did not form on every control plane in time.
    #[error(
        "etcd was not healthy on every control plane {seconds} s after the bootstrap:\n{report}\n(the cluster is left running: `machinectl --nodes {api} etcd members` and `machinectl --nodes {api} health` show a node's view, `machinectl cluster show --name {cluster}` each console log; remove it with `machinectl cluster destroy --name {cluster}`, or wait longer with --etcd-wait)"
    )]
    EtcdTimeout {
        /// Cluster name.
        cluster: String,
        /// How long we waited.
        seconds: u64,
        /// Each control plane not ready and why, with its console tail.
        report: String,
        /// The API address of the first one not ready.
        api: String,
    },
    /// `start` was given a node the cluster does not have.
    #[error("cluster {cluster} has no node {node:?}; its nodes are: {known}")]
    UnknownNode {
        /// Cluster name.
        cluster: String,
        /// The name given.
        node: String,
        /// The cluster's nodes, comma-separated.
        known: String,
    },
    /// `start` was given a node whose VM runs.
    #[error(
        "node {node}'s VM is up (QEMU pid {pid}): `machinectl cluster start` only boots a node whose VM is down (`machinectl cluster show --name {cluster}` shows which are)"
    )]
    NodeUp {
        /// Cluster name.
        cluster: String,
        /// Node name.
        node: String,
        /// Its QEMU's pid.
        pid: u32,
    },
    /// The cluster's network or helper is gone, so a node booted again would be cut off.
    #[error(
        "cannot boot nodes of cluster {cluster} again: {problem}; recreate the cluster (`machinectl cluster destroy --name {cluster}`, then `machinectl cluster create`)"
    )]
    NetworkDown {
        /// Cluster name.
        cluster: String,
        /// What is missing.
        problem: String,
    },
    /// A node booted again did not answer in time.
    #[error(
        "the node API of each node below did not answer `version` within {seconds} s of its VM's start:\n{report}\n(the VMs are left running: `machinectl cluster show --name {cluster}` shows each node's console log; wait longer with --wait)"
    )]
    StartTimeout {
        /// Cluster name.
        cluster: String,
        /// How long we waited.
        seconds: u64,
        /// Each node not answering and why, with its console tail.
        report: String,
    },
    /// Not every node became healthy in time.
    #[error(
        "not every node was healthy after {seconds} s:\n{report}\n(the cluster is left running: `machinectl cluster show --name {cluster}` shows each node's console log; remove it with `machinectl cluster destroy --name {cluster}`, or wait longer with --wait)"
    )]
    Timeout {
        /// Cluster name.
        cluster: String,
        /// How long we waited.
        seconds: u64,
        /// Each unhealthy node and why, with its console tail.
        report: String,
    },
}

/// An [`ClusterError::Io`] maker for `map_err`.
pub fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError {
    let path = path.to_path_buf();
    move |source| ClusterError::Io { what, path, source }
}

/// Whether we run as root (a namespace cluster) or not (a rootless one).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The string that every process of the cluster in `dir` has on its command line: the
/// directory with a trailing `/`, so that cluster `demo` never matches `demo2`.
pub fn process_marker(dir: &Path) -> PathBuf {
    dir.join("")
}

/// The last lines of a node's console, and QEMU's own complaints if any.
pub fn node_tail(node_dir: &Path, lines: usize) -> String {
    let mut out = qemu::console_tail(&node_dir.join("console.log"), lines);
    let stderr = std::fs::read_to_string(node_dir.join("qemu.stderr")).unwrap_or_default();
    if !stderr.trim().is_empty() {
        out.push_str("\n--- qemu stderr ---\n");
        out.push_str(stderr.trim());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_marker_ends_with_a_separator() {
        let m = super::process_marker(std::path::Path::new("/state/clusters/demo"));
        assert_eq!(m.to_str(), Some("/state/clusters/demo/"));
    }
}
