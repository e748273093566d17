//! `machinectl cluster start`: boot again nodes whose VM is down (killed, powered off,
//! crashed), each as it was first booted ([`launch`]: the same disk, so
//! the node comes back with its state, an etcd member with its data), then wait until
//! each one's node API answers `version`. A node that shows no stage-1 line within a
//! deadline of its power-on is power-cycled, at most twice ([`stage1_watch`]).
//!
//! Every named node is checked before any starts: a name the cluster does not have, or
//! a node whose VM runs, refuses the whole command. So does a cluster whose network is
//! gone (its namespace, or its helper: the API forwarder or the switch).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::create::{NodeState, Progress, Vms, poll_node, short, watch_stage1};
use super::launch::{self, Boot};
use super::manage::node_pid;
use super::plan::NetworkKind;
use super::record::{Record, clusters_dir, node_dir, processes_mentioning};
use super::stage1_watch::{self, Watch};
use super::{ClusterError, netns, node_tail, process_marker};
use keelson_api::client::Connector;
use keelson_api::clientconfig::ClientConfig;

/// One node booted again.
#[derive(Debug, Clone)]
pub struct StartedNode {
    /// Node name.
    pub name: String,
    /// Its new QEMU's pid.
    pub pid: u32,
    /// Where machinectl reaches its API.
    pub api: String,
    /// This boot's console log.
    pub console: PathBuf,
    /// Where the previous boot's console log was moved.
    pub previous_console: Option<PathBuf>,
    /// How long after its VM started the API answered.
    pub answered_after: Duration,
    /// Its health when the API first answered.
    pub state: NodeState,
}

/// Boots again each node of cluster `name` in `nodes` (whose VMs must be down) and waits
/// up to `wait` for each one's API to answer.
pub fn start(
    name: &str,
    nodes: &[String],
    wait: Duration,
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<StartedNode>, ClusterError> {
    let dir = clusters_dir()?.join(name);
    if dir.symlink_metadata().is_err() {
        return Err(ClusterError::NotFound {
            name: name.to_owned(),
            dir,
        });
    }
    let mut record = Record::load(&dir)?;
    let chosen = choose(&record, nodes, |i| running_qemu(&dir, &record, i))?;
    check_network(&dir, &record)?;
    let connector = connector(&dir, &record)?;

    let mut launched = Vec::new();
    let mut watches = Vec::new();
    for &i in &chosen {
        let machine = launch::node_machine(&dir, &record, i)?;
        let deadline =
            stage1_watch::deadline(machine.arch, machine.accel).map_err(ClusterError::Usage)?;
        let started = launch::launch(&dir, &record, i, Boot::Again)?;
        watches.push(Watch::new(deadline, Instant::now()));
        let node = &mut record.nodes[i];
        node.pid = Some(started.child.id());
        let console = node_dir(&dir, &node.name).join("console.log");
        progress(Progress::Step(format!(
            "started {} again (pid {}), console {}{}",
            node.name,
            started.child.id(),
            console.display(),
            started
                .previous_console
                .as_ref()
                .map(|p| format!(" (the last boot's is {})", p.display()))
                .unwrap_or_default()
        )));
        record.save(&dir)?;
        launched.push((i, started));
    }

    let mut indexes = Vec::new();
    let mut children = Vec::new();
    let mut previous = Vec::new();
    for (i, l) in launched {
        previous.push(l.previous_console);
        indexes.push(i);
        children.push(l.child);
    }
    let mut vms = Vms { children, watches };
    let answered = wait_answering(
        &dir,
        &mut record,
        &connector,
        &indexes,
        &mut vms,
        wait,
        progress,
    )?;
    Ok(indexes
        .iter()
        .zip(&vms.children)
        .zip(previous)
        .zip(answered)
        .map(|(((i, child), previous_console), (state, after))| {
            let n = &record.nodes[*i];
            StartedNode {
                name: n.name.clone(),
                pid: child.id(),
                api: n.api.clone(),
                console: node_dir(&dir, &n.name).join("console.log"),
                previous_console,
                answered_after: after,
                state,
            }
        })
        .collect())
}

/// The indexes of the named nodes, in the order given without repeats; refuses a name the
/// cluster does not have and a node for which `running` finds a QEMU pid.
fn choose(
    record: &Record,
    names: &[String],
    running: impl Fn(usize) -> Option<u32>,
) -> Result<Vec<usize>, ClusterError> {
    if names.is_empty() {
        return Err(ClusterError::Usage(format!(
            "name the nodes to start; cluster {}'s nodes are: {}",
            record.name,
            known(record)
        )));
    }
    let mut chosen = Vec::new();
    for name in names {
        let Some(i) = record.nodes.iter().position(|n| n.name == *name) else {
            return Err(ClusterError::UnknownNode {
                cluster: record.name.clone(),
                node: name.clone(),
                known: known(record),
            });
        };
        if let Some(pid) = running(i) {
            return Err(ClusterError::NodeUp {
                cluster: record.name.clone(),
                node: name.clone(),
                pid,
            });
        }
        if !chosen.contains(&i) {
            chosen.push(i);
        }
    }
    Ok(chosen)
}

fn known(record: &Record) -> String {
    let names: Vec<&str> = record.nodes.iter().map(|n| n.name.as_str()).collect();
    names.join(", ")
}

/// Node `index`'s running QEMU: the recorded one, else any process naming its pid file.
fn running_qemu(dir: &Path, record: &Record, index: usize) -> Option<u32> {
    let node = record.nodes.get(index)?;
    match node_pid(dir, node) {
        (Some(pid), true) => Some(pid),
        _ => processes_mentioning(&node_dir(dir, &node.name).join("qemu.pid"))
            .first()
            .copied(),
    }
}

/// Refuses when the cluster's namespace or helper is gone, or the namespace needs root.
fn check_network(dir: &Path, record: &Record) -> Result<(), ClusterError> {
    let down = |problem: String| ClusterError::NetworkDown {
        cluster: record.name.clone(),
        problem,
    };
    if record.network == NetworkKind::Namespace {
        if !super::is_root() {
            return Err(ClusterError::Usage(format!(
                "cluster {}'s nodes run in a network namespace, which needs root: run `machinectl cluster start` as root",
                record.name
            )));
        }
        match &record.namespace {
            Some(ns) if netns::exists(ns) => {}
            Some(ns) => return Err(down(format!("its network namespace {ns} is gone"))),
            None => return Err(down("its record names no network namespace".into())),
        }
    }
    let helper_up = record
        .helper_pid
        .is_some_and(|p| super::record::process_runs(p, &process_marker(dir)));
    if !helper_up {
        return Err(down(match record.network {
            NetworkKind::Namespace => {
                "its API forwarder is not running (the node APIs would be unreachable)".into()
            }
            NetworkKind::User => {
                "its network switch is not running (the nodes could not reach each other)".into()
            }
        }));
    }
    Ok(())
}

/// A connector with the cluster's own admin context (`DIR/machinectl.toml`).
fn connector(dir: &Path, record: &Record) -> Result<Arc<Connector>, ClusterError> {
    let path = dir.join("machinectl.toml");
    let config = ClientConfig::load(&path).map_err(ClusterError::ClientConfig)?;
    let context = config
        .contexts
        .get(&record.name)
        .ok_or_else(|| ClusterError::BadRecord {
            path: path.clone(),
            message: format!("it has no context {:?}", record.name),
        })?;
    Connector::for_context(&record.name, context)
        .map(Arc::new)
        .map_err(|e| ClusterError::Tool {
            tool: format!("the cluster's client context in {}", path.display()),
            detail: keelson_api::error_chain(&e),
        })
}

fn name(record: &Record, i: usize) -> &str {
    record.nodes.get(i).map_or("?", |n| n.name.as_str())
}

/// Polls each started node (`indexes`: the record's index of each of `vms`) until its
/// API answers `version` (then its health is noted), power-cycling a node hung before
/// stage 1, failing when a VM stops or at the deadline. Returns each node's state and
/// how long it took, in `indexes`' order.
fn wait_answering(
    dir: &Path,
    record: &mut Record,
    connector: &Arc<Connector>,
    indexes: &[usize],
    vms: &mut Vms,
    wait: Duration,
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<(NodeState, Duration)>, ClusterError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(super::io_error("start the async runtime for", dir))?;
    let started = Instant::now();
    let cluster = record.name.clone();
    let mut states: Vec<(NodeState, Duration)> = indexes
        .iter()
        .map(|_| (NodeState::Booting("starting".into()), Duration::ZERO))
        .collect();
    let answers = |s: &NodeState| !matches!(s, NodeState::Booting(_));
    loop {
        for (&i, child) in indexes.iter().zip(vms.children.iter_mut()) {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(ClusterError::NodeDied {
                    cluster: record.name.clone(),
                    node: name(record, i).to_owned(),
                    status: status.to_string(),
                    tail: node_tail(&node_dir(dir, name(record, i)), super::CONSOLE_TAIL_LINES),
                });
            }
        }
        for ((&i, child), watch) in indexes
            .iter()
            .zip(vms.children.iter_mut())
            .zip(vms.watches.iter_mut())
        {
            watch_stage1(&cluster, dir, record, i, child, watch, progress)?;
        }
        let polls: Vec<Option<String>> = indexes
            .iter()
            .zip(&states)
            .map(|(i, (s, _))| {
                (!answers(s)).then(|| record.nodes.get(*i).map(|n| n.api.clone()))?
            })
            .collect();
        let results = runtime.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for (k, api) in polls.into_iter().enumerate() {
                if let Some(api) = api {
                    let connector = connector.clone();
                    set.spawn(async move { (k, poll_node(&connector, &api).await) });
                }
            }
            set.join_all().await
        });
        for (k, state) in results {
            if answers(&state)
                && let Some(watch) = vms.watches.get_mut(k)
            {
                watch.answered();
            }
            if let Some(s) = states.get_mut(k) {
                *s = (state, started.elapsed());
            }
        }
        progress(Progress::Nodes(
            started.elapsed(),
            indexes
                .iter()
                .zip(&states)
                .map(|(i, (s, _))| (name(record, *i).to_owned(), s.clone()))
                .collect(),
        ));
        if states.iter().all(|(s, _)| answers(s)) {
            return Ok(states);
        }
        if started.elapsed() > wait {
            let report = indexes
                .iter()
                .zip(&states)
                .filter(|(_, (s, _))| !answers(s))
                .map(|(i, (s, _))| {
                    let ndir = node_dir(dir, name(record, *i));
                    format!(
                        "{}: {}; console {}, ending with:\n{}",
                        name(record, *i),
                        short(&s.to_string()),
                        ndir.join("console.log").display(),
                        node_tail(&ndir, 10)
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            return Err(ClusterError::StartTimeout {
                cluster: record.name.clone(),
                seconds: wait.as_secs(),
                report,
            });
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::launch::node_record;
    use crate::plan;

    fn record() -> Record {
        let plan = plan::plan("demo", 2, 1, "10.5.0.0/24".parse().unwrap()).unwrap();
        Record {
            name: "demo".into(),
            arch: "amd64".into(),
            accel: "tcg".into(),
            network: NetworkKind::User,
            namespace: None,
            cidr: "10.5.0.0/24".into(),
            gateway: plan.gateway,
            image: "/images/keelson.raw".into(),
            created: 1,
            helper_pid: None,
            client_config: None,
            context: None,
            etcd_bootstrapped: true,
            nodes: plan
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    node_record(
                        n,
                        i,
                        NetworkKind::User,
                        format!("127.0.0.1:{}", 40000 + i),
                        2048,
                        2,
                    )
                })
                .collect(),
        }
    }

    /// Node 1 (demo-controlplane-2) runs as pid 77; the others are down.
    fn check(names: &[&str], expected: Result<Vec<usize>, &str>) {
        let names: Vec<String> = names.iter().map(|&n| n.to_owned()).collect();
        let got = choose(&record(), &names, |i| (i == 1).then_some(77)).map_err(|e| e.to_string());
        match (&got, &expected) {
            (Ok(g), Ok(e)) => assert_eq!(g, e, "{names:?}"),
            (Err(g), Err(e)) => assert!(g.contains(e), "{names:?}: {g}"),
            _ => panic!("{names:?}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn down_nodes_are_chosen_and_the_rest_refused() {
        check(&["demo-worker-1"], Ok(vec![2]));
        check(
            &["demo-worker-1", "demo-controlplane-1", "demo-worker-1"],
            Ok(vec![2, 0]),
        );
        check(
            &["demo-controlplane-2"],
            Err(
                "node demo-controlplane-2's VM is up (QEMU pid 77): `machinectl cluster start` only boots a node whose VM is down",
            ),
        );
        check(
            &["demo-worker-1", "demo-cp-9"],
            Err(
                "cluster demo has no node \"demo-cp-9\"; its nodes are: demo-controlplane-1, demo-controlplane-2, demo-worker-1",
            ),
        );
        check(&[], Err("name the nodes to start"));
    }

    #[test]
    fn a_cluster_without_its_helper_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_network(dir.path(), &record())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("its network switch is not running")
                && err.contains("machinectl cluster destroy --name demo"),
            "{err}"
        );
    }
}
