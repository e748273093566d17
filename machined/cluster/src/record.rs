//! A cluster's state directory and its record.
//!
//! Every cluster lives in one directory, `$XDG_STATE_HOME/keelson/clusters/NAME` (else
//! `~/.local/state/keelson/clusters/NAME`): `cluster.toml` (this record), `secrets.toml`,
//! the helper's log, and one directory per node with its config, qcow2 overlay, UEFI
//! variables, console log (and those of its earlier boots, `console.log.N`) and QEMU pid
//! file. The record keeps what booting a node again needs (`cluster start`). It is
//! written before any VM starts and again as pids become known, so a `create` that dies
//! halfway leaves a directory that names everything `destroy` must remove. Every process the cluster runs carries the
//! directory's path on its command line, which is how `destroy` finds one whose pid was
//! never recorded.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ClusterError;
use super::plan::NetworkKind;
use keelson_api::atomic;

/// The record's file name in the state directory.
pub const RECORD_FILE: &str = "cluster.toml";

/// Where clusters live: `$XDG_STATE_HOME/keelson/clusters`, else
/// `$HOME/.local/state/keelson/clusters`.
pub fn clusters_dir() -> Result<PathBuf, ClusterError> {
    let base = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(v) => PathBuf::from(v),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => PathBuf::from(home).join(".local/state"),
            None => {
                return Err(ClusterError::Usage(
                    "neither XDG_STATE_HOME nor HOME is set, so there is nowhere to keep cluster state; set one of them".into(),
                ));
            }
        },
    };
    let base = std::path::absolute(&base).unwrap_or(base);
    Ok(base.join("keelson/clusters"))
}

/// One node as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    /// Hostname and VM name.
    pub name: String,
    /// `controlplane` or `worker`.
    pub role: String,
    /// Static address on the cluster network.
    pub address: Ipv4Addr,
    /// MAC on the cluster network.
    pub mac: String,
    /// Where machinectl reaches the node's API: `127.0.0.1:PORT`.
    pub api: String,
    /// The tap device in the namespace (namespace clusters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// QEMU's pid, once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The MAC of the user-mode API interface (rootless clusters; absent from records
    /// written before `cluster start` existed, where it follows the plan's numbering).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_mac: Option<String>,
    /// Memory, MiB (absent from records written before `cluster start` existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// Virtual CPUs (absent from records written before `cluster start` existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
}

/// The whole record (`cluster.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Cluster name.
    pub name: String,
    /// Guest architecture (`amd64`, `arm64`).
    pub arch: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// How the nodes are networked.
    pub network: NetworkKind,
    /// The network namespace (namespace clusters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The cluster network.
    pub cidr: String,
    /// Its gateway (the bridge's address in a namespace cluster).
    pub gateway: Ipv4Addr,
    /// The base image the overlays are on.
    pub image: PathBuf,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// The helper process (forwarder or switch), once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helper_pid: Option<u32>,
    /// The machinectl client config the cluster's context was merged into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_config: Option<PathBuf>,
    /// The context's name there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// Whether `create` bootstrapped etcd and saw it healthy on every control plane
    /// (false with `--no-bootstrap`, and while or if that fails).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub etcd_bootstrapped: bool,
    /// The nodes, control planes first.
    pub nodes: Vec<NodeRecord>,
}

impl Record {
    /// Reads `DIR/cluster.toml`.
    pub fn load(dir: &Path) -> Result<Record, ClusterError> {
        let path = dir.join(RECORD_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ClusterError::Io {
            what: "read the cluster record",
            path: path.clone(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ClusterError::BadRecord {
            path,
            message: e.message().to_owned(),
        })
    }

    /// Writes `DIR/cluster.toml` atomically.
    pub fn save(&self, dir: &Path) -> Result<(), ClusterError> {
        let text = toml::to_string(self).map_err(|e| ClusterError::BadRecord {
            path: dir.join(RECORD_FILE),
            message: e.to_string(),
        })?;
        atomic::write(
            &dir.join(RECORD_FILE),
            text.as_bytes(),
            atomic::PRIVATE_FILE_MODE,
        )
        .map_err(ClusterError::Write)
    }
}

/// A node's directory inside the cluster's.
pub fn node_dir(cluster_dir: &Path, node: &str) -> PathBuf {
    cluster_dir.join("nodes").join(node)
}

/// The unix sockets of a rootless cluster's switch live here (short paths: a socket
/// path has at most 107 bytes).
pub fn socket_dir(cluster_dir: &Path) -> PathBuf {
    cluster_dir.join("sock")
}

/// Whether a process runs and its command line mentions `needle` (a pid reused by an
/// unrelated process does not count).
pub fn process_runs(pid: u32, needle: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| contains(&c, needle))
}

/// Every process other than this one whose command line mentions `needle`.
pub fn processes_mentioning(needle: &Path) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && process_runs(pid, needle))
        .collect();
    pids.sort_unstable();
    pids
}

fn contains(haystack: &[u8], needle: &Path) -> bool {
    let needle = needle.as_os_str().as_encoded_bytes();
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn record_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let record = Record {
            name: "demo".into(),
            arch: "amd64".into(),
            accel: "tcg".into(),
            network: NetworkKind::Namespace,
            namespace: Some("keelson-demo".into()),
            cidr: "10.5.0.0/24".into(),
            gateway: "10.5.0.1".parse().unwrap(),
            image: "/images/keelson.raw".into(),
            created: 1,
            helper_pid: None,
            client_config: None,
            context: None,
            etcd_bootstrapped: true,
            nodes: vec![NodeRecord {
                name: "demo-controlplane-1".into(),
                role: "controlplane".into(),
                address: "10.5.0.2".parse().unwrap(),
                mac: "52:54:00:4b:00:01".into(),
                api: "127.0.0.1:40000".into(),
                tap: Some("tap0".into()),
                pid: Some(42),
                api_mac: None,
                memory_mib: Some(2048),
                cpus: Some(2),
            }],
        };
        record.save(dir.path()).unwrap();
        assert_eq!(Record::load(dir.path()).unwrap(), record);
    }

    #[test]
    fn a_record_from_before_cluster_start_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let old = "name = \"demo\"\narch = \"amd64\"\naccel = \"tcg\"\nnetwork = \"user\"\n\
                   cidr = \"10.5.0.0/24\"\ngateway = \"10.5.0.1\"\nimage = \"/i.raw\"\ncreated = 1\n\n\
                   [[nodes]]\nname = \"demo-controlplane-1\"\nrole = \"controlplane\"\n\
                   address = \"10.5.0.2\"\nmac = \"52:54:00:4b:00:01\"\napi = \"127.0.0.1:40000\"\npid = 7\n";
        std::fs::write(dir.path().join(RECORD_FILE), old).unwrap();
        let record = Record::load(dir.path()).unwrap();
        let node = &record.nodes[0];
        assert_eq!(
            (node.pid, &node.api_mac, node.memory_mib, node.cpus),
            (Some(7), &None, None, None)
        );
    }

    #[test]
    fn finds_processes_by_command_line() {
        use std::os::unix::process::CommandExt as _;
        let dir = tempfile::tempdir().unwrap();
        // The state directory on the command line, as QEMU's -pidfile puts it there.
        let mut child = std::process::Command::new("sleep")
            .arg0(format!("sleep-for-{}", dir.path().display()))
            .arg("30")
            .spawn()
            .unwrap();
        // Until the child has exec'd, its command line is still ours.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut found = processes_mentioning(dir.path());
        while found.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            found = processes_mentioning(dir.path());
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(found, vec![child.id()]);
        assert!(!process_runs(child.id(), dir.path()));
    }
}
