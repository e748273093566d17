//! `machinectl cluster destroy | list | show`.
//!
//! `destroy` trusts the record where it can but does not depend on it: the processes are
//! found by the state directory on their command lines, the namespace by the cluster's
//! name, and everything else is inside the directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::record::{
    NodeRecord, Record, clusters_dir, node_dir, process_runs, processes_mentioning,
};
use super::{ClusterError, io_error, netns, node_tail, process_marker};
use keelson_api::clientconfig::ClientConfig;

/// What `destroy` removed.
#[derive(Debug, Clone, Default)]
pub struct Destroyed {
    /// Processes stopped (VMs and the helper).
    pub stopped: Vec<u32>,
    /// The network namespace deleted, with its bridge and taps.
    pub namespace: Option<String>,
    /// The context removed from the client config, and that config.
    pub context: Option<(String, PathBuf)>,
    /// The state directory removed.
    pub dir: PathBuf,
}

/// Stops every process of the cluster, deletes its namespace, removes its context from
/// the client config and deletes its state directory.
pub fn destroy(name: &str) -> Result<Destroyed, ClusterError> {
    let dir = clusters_dir()?.join(name);
    let record = Record::load(&dir).ok();
    let namespace = match &record {
        Some(r) => r.namespace.clone(),
        // No readable record: a namespace of this name can only be ours.
        None if super::is_root() => Some(netns::namespace_name(name)),
        None => None,
    }
    .filter(|ns| netns::exists(ns));
    if dir.symlink_metadata().is_err() && namespace.is_none() {
        return Err(ClusterError::NotFound {
            name: name.to_owned(),
            dir,
        });
    }
    let mut out = Destroyed {
        dir: dir.clone(),
        ..Destroyed::default()
    };

    out.stopped = stop_processes(&process_marker(&dir))?;
    if let Some(ns) = namespace {
        netns::delete(&ns)?;
        out.namespace = Some(ns);
    }
    if let Some(Record {
        client_config: Some(path),
        context: Some(context),
        ..
    }) = &record
        && path.exists()
    {
        let mut config = ClientConfig::load(path).map_err(ClusterError::ClientConfig)?;
        if config.contexts.remove(context).is_some() {
            if config.context.as_deref() == Some(context.as_str()) {
                config.context = None;
            }
            config.save(path).map_err(ClusterError::ClientConfig)?;
            out.context = Some((context.clone(), path.clone()));
        }
    }
    if dir.symlink_metadata().is_ok() {
        std::fs::remove_dir_all(&dir).map_err(io_error("remove", &dir))?;
    }
    Ok(out)
}

/// SIGTERM to every process whose command line carries `marker`, SIGKILL to those still
/// there after 10 s; returns their pids.
fn stop_processes(marker: &Path) -> Result<Vec<u32>, ClusterError> {
    let pids = processes_mentioning(marker);
    for &pid in &pids {
        signal(pid, Signal::SIGTERM)?;
    }
    let gone = |deadline: Instant| {
        while Instant::now() < deadline {
            if pids.iter().all(|&p| !process_runs(p, marker)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    };
    if !gone(Instant::now() + Duration::from_secs(10)) {
        for &pid in pids.iter().filter(|&&p| process_runs(p, marker)) {
            signal(pid, Signal::SIGKILL)?;
        }
        if !gone(Instant::now() + Duration::from_secs(5)) {
            let left: Vec<String> = pids
                .iter()
                .filter(|&&p| process_runs(p, marker))
                .map(ToString::to_string)
                .collect();
            return Err(ClusterError::Tool {
                tool: "stopping the cluster's processes".into(),
                detail: format!(
                    "pid(s) {} survived SIGKILL; check them with `ps -p {}`",
                    left.join(", "),
                    left.join(",")
                ),
            });
        }
    }
    Ok(pids)
}

fn signal(pid: u32, sig: Signal) -> Result<(), ClusterError> {
    let Ok(raw) = i32::try_from(pid) else {
        return Ok(());
    };
    match kill(Pid::from_raw(raw), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(ClusterError::Io {
            what: "signal process",
            path: PathBuf::from(pid.to_string()),
            source: e.into(),
        }),
    }
}

/// One node as `show` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeReport {
    /// Node name.
    pub name: String,
    /// `controlplane` or `worker`.
    pub role: String,
    /// Static address on the cluster network.
    pub address: String,
    /// Where machinectl reaches its API.
    pub api: String,
    /// QEMU's pid.
    pub pid: Option<u32>,
    /// Whether its VM runs.
    pub up: bool,
    /// Its console log.
    pub console: PathBuf,
    /// The console's tail when the VM is down.
    pub tail: Option<String>,
}

/// A cluster as `list` and `show` report it.
#[derive(Debug, Clone)]
pub struct ClusterReport {
    /// The record.
    pub record: Record,
    /// Its state directory.
    pub dir: PathBuf,
    /// Whether the helper (forwarder or switch) runs.
    pub helper_up: bool,
    /// The nodes.
    pub nodes: Vec<NodeReport>,
}

/// A node's QEMU pid (recorded, else from its pid file) and whether that QEMU runs.
pub(crate) fn node_pid(dir: &Path, node: &NodeRecord) -> (Option<u32>, bool) {
    let pidfile = node_dir(dir, &node.name).join("qemu.pid");
    let pid = node.pid.or_else(|| {
        std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|t| t.trim().parse().ok())
    });
    (pid, pid.is_some_and(|p| process_runs(p, &pidfile)))
}

/// Reports on the cluster in `dir`.
fn report(dir: &Path, record: Record) -> ClusterReport {
    let nodes = record
        .nodes
        .iter()
        .map(|n| {
            let ndir = node_dir(dir, &n.name);
            let (pid, up) = node_pid(dir, n);
            NodeReport {
                name: n.name.clone(),
                role: n.role.clone(),
                address: n.address.to_string(),
                api: n.api.clone(),
                pid,
                up,
                console: ndir.join("console.log"),
                tail: (!up).then(|| node_tail(&ndir, super::CONSOLE_TAIL_LINES)),
            }
        })
        .collect();
    let helper_up = record
        .helper_pid
        .is_some_and(|p| process_runs(p, &process_marker(dir)));
    ClusterReport {
        record,
        dir: dir.to_path_buf(),
        helper_up,
        nodes,
    }
}

/// The cluster named `name`.
pub fn show(name: &str) -> Result<ClusterReport, ClusterError> {
    let dir = clusters_dir()?.join(name);
    if dir.symlink_metadata().is_err() {
        return Err(ClusterError::NotFound {
            name: name.to_owned(),
            dir,
        });
    }
    Ok(report(&dir, Record::load(&dir)?))
}

/// Every cluster with a state directory; unreadable records are reported as errors
/// beside the others.
pub fn list() -> Result<Vec<Result<ClusterReport, ClusterError>>, ClusterError> {
    let root = clusters_dir()?;
    let entries = match std::fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("list", &root)(e)),
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    Ok(dirs
        .into_iter()
        .map(|d| Record::load(&d).map(|r| report(&d, r)))
        .collect())
}
