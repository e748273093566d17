//! The end of `create`, as `talosctl cluster create` ends: `Bootstrap` on the first
//! control plane, then a wait until every control plane's etcd member is started and
//! voting. The other control planes join by themselves (machined finds the cluster at
//! `cluster.etcd.endpoints`, joins as a learner and is promoted); this only watches.
//!
//! Whether the cluster is there yet is judged from each control plane's own view (its
//! `EtcdMembers` and `EtcdStatus`) by [`judge`], a pure function.

use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_api::api::proto;
use keelson_api::client::Connector;
use keelson_api::clientconfig::Context;

use super::create::{Progress, check_running, short};
use super::record::{NodeRecord, Record, node_dir};
use super::{ClusterError, io_error, node_tail};

/// The role string of a control plane in the record.
const CONTROL_PLANE: &str = "controlplane";

/// How long one call to a node may take before the look counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// What one look at a control plane's etcd found: its member list and its own member's
/// status, or why each could not be had.
#[derive(Debug, Clone)]
pub struct EtcdLook {
    /// `EtcdMembers`, as this node's etcd sees them.
    pub members: Result<Vec<proto::EtcdMember>, String>,
    /// `EtcdStatus` of this node's member.
    pub status: Result<proto::EtcdStatusResponse, String>,
}

/// A control plane's etcd while `create` waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcdState {
    /// Not there yet, and why.
    Waiting(String),
    /// Its member answers without errors, is not a learner, and it sees as many started
    /// voting members as there are control planes.
    Ready {
        /// The started voting members it sees.
        voting: usize,
    },
}

impl std::fmt::Display for EtcdState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EtcdState::Waiting(why) => write!(f, "etcd: waiting for {why}"),
            EtcdState::Ready { voting } => {
                write!(f, "etcd: healthy, {voting}/{voting} voting members started")
            }
        }
    }
}

/// Judges one look at a control plane, in a cluster of `control_planes` control planes.
pub fn judge(look: &EtcdLook, control_planes: usize) -> EtcdState {
    let mut why = Vec::new();
    match (&look.members, &look.status) {
        // Both calls failed the same way (the node or its etcd is not up): say it once.
        (Err(a), Err(b)) if a == b => why.push(a.clone()),
        _ => {
            match &look.members {
                Ok(members) => {
                    if let Some(short) = members_short(members, control_planes) {
                        why.push(short);
                    }
                }
                Err(e) => why.push(format!("members ({e})")),
            }
            match &look.status {
                Ok(status) => {
                    if status.learner {
                        why.push("this member's promotion (it is a learner)".into());
                    }
                    if !status.errors.is_empty() {
                        why.push(format!(
                            "etcd's errors to clear: {}",
                            status.errors.join("; ")
                        ));
                    }
                }
                Err(e) => why.push(format!("status ({e})")),
            }
        }
    }
    if why.is_empty() {
        EtcdState::Ready {
            voting: control_planes,
        }
    } else {
        EtcdState::Waiting(why.join("; "))
    }
}

/// What a member list lacks, or `None` when it lists exactly `want` started voting
/// members.
fn members_short(members: &[proto::EtcdMember], want: usize) -> Option<String> {
    let voting = members.iter().filter(|m| m.started && !m.learner).count();
    if voting == want {
        return None;
    }
    let mut text = if voting < want {
        format!("members: {voting}/{want} voting members started")
    } else {
        format!("members: {voting} voting members started, {want} expected (a stale member?)")
    };
    let learners = members.iter().filter(|m| m.learner).count();
    if learners > 0 {
        text.push_str(&format!(", {learners} learner(s)"));
    }
    let unstarted = members.iter().filter(|m| !m.started).count();
    if unstarted > 0 {
        text.push_str(&format!(", {unstarted} not started"));
    }
    Some(text)
}

/// The nodes that are not ready, each with why; empty when every one is.
pub fn not_ready(states: &[(String, EtcdState)]) -> Vec<(String, String)> {
    states
        .iter()
        .filter_map(|(name, state)| match state {
            EtcdState::Waiting(why) => Some((name.clone(), why.clone())),
            EtcdState::Ready { .. } => None,
        })
        .collect()
}

/// Whether a refused `Bootstrap` is worth asking again: the node may not be ready for it
/// yet (its clock not synced, machined still starting, the connection broken). A request
/// the node can never accept (wrong role, unknown method, bad credentials) is not.
fn worth_retrying(code: tonic::Code) -> bool {
    use tonic::Code as C;
    !matches!(
        code,
        C::InvalidArgument
            | C::AlreadyExists
            | C::PermissionDenied
            | C::Unauthenticated
            | C::Unimplemented
            | C::OutOfRange
    )
}

/// How a `Bootstrap` call ended.
enum Attempt {
    /// Accepted, with the node's message.
    Done(String),
    /// Not now; ask again.
    Retry(String),
    /// Never.
    Refused(String),
}

/// What `bootstrap_and_wait` works on.
pub(crate) struct Target<'a> {
    /// Cluster name.
    pub cluster: &'a str,
    /// Its state directory.
    pub dir: &'a Path,
    /// Its record.
    pub record: &'a Record,
    /// The credentials to call the nodes with.
    pub context: &'a Context,
}

/// Bootstraps etcd on the first control plane, then waits until every control plane's
/// etcd is ready; `wait` counts from the bootstrap.
pub(crate) fn bootstrap_and_wait(
    target: &Target<'_>,
    children: &mut [Child],
    wait: Duration,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), ClusterError> {
    let control_planes: Vec<&NodeRecord> = target
        .record
        .nodes
        .iter()
        .filter(|n| n.role == CONTROL_PLANE)
        .collect();
    let Some(first) = control_planes.first() else {
        return Ok(());
    };
    let connector = Arc::new(
        Connector::for_context(target.cluster, target.context)
            .map_err(|e| ClusterError::Generate(keelson_api::error_chain(&e)))?,
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_error("start the async runtime for", target.dir))?;
    let started = Instant::now();
    progress(Progress::Step(format!(
        "bootstrapping etcd on {} ({})",
        first.name, first.address
    )));
    let mut last_error = String::new();
    let mut tried = false;
    loop {
        check_running(target.cluster, target.dir, target.record, children)?;
        // An earlier attempt may have got through with its answer lost.
        if tried && has_members(&runtime, &connector, &first.api) {
            progress(Progress::Step(format!(
                "{}: etcd has members (an earlier bootstrap got through)",
                first.name
            )));
            break;
        }
        tried = true;
        match runtime.block_on(bootstrap_once(&connector, &first.api)) {
            Attempt::Done(message) => {
                progress(Progress::Step(format!("{}: {message}", first.name)));
                break;
            }
            Attempt::Refused(message) => {
                return Err(ClusterError::BootstrapRefused {
                    cluster: target.cluster.to_owned(),
                    node: first.name.clone(),
                    api: first.api.clone(),
                    message,
                });
            }
            Attempt::Retry(message) => {
                if started.elapsed() > wait {
                    return Err(ClusterError::EtcdTimeout {
                        cluster: target.cluster.to_owned(),
                        seconds: wait.as_secs(),
                        report: format!("{}: bootstrap not accepted: {message}", first.name),
                        api: first.api.clone(),
                    });
                }
                if message != last_error {
                    progress(Progress::Step(format!(
                        "{}: bootstrap not accepted yet ({}); asking again every 5 s",
                        first.name,
                        short(&message)
                    )));
                    last_error = message;
                }
                std::thread::sleep(Duration::from_secs(5));
            }
        }
    }
    wait_etcd(
        target,
        &control_planes,
        children,
        &connector,
        &runtime,
        (started, wait),
        progress,
    )
}

/// Polls every control plane's etcd until each is ready, reporting progress.
fn wait_etcd(
    target: &Target<'_>,
    control_planes: &[&NodeRecord],
    children: &mut [Child],
    connector: &Arc<Connector>,
    runtime: &tokio::runtime::Runtime,
    (started, wait): (Instant, Duration),
    progress: &mut dyn FnMut(Progress),
) -> Result<(), ClusterError> {
    loop {
        check_running(target.cluster, target.dir, target.record, children)?;
        let looks = runtime.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for (i, node) in control_planes.iter().enumerate() {
                let connector = connector.clone();
                let api = node.api.clone();
                set.spawn(async move { (i, look(&connector, &api).await) });
            }
            let mut looks = set.join_all().await;
            looks.sort_by_key(|(i, _)| *i);
            looks
        });
        let states: Vec<(String, EtcdState)> = control_planes
            .iter()
            .zip(&looks)
            .map(|(node, (_, look))| (node.name.clone(), judge(look, control_planes.len())))
            .collect();
        let missing = not_ready(&states);
        progress(Progress::Etcd(started.elapsed(), states));
        if missing.is_empty() {
            return Ok(());
        }
        if started.elapsed() > wait {
            let report = missing
                .iter()
                .map(|(name, why)| {
                    format!(
                        "{name}: waiting for {why}; console {}, ending with:\n{}",
                        node_dir(target.dir, name).join("console.log").display(),
                        node_tail(&node_dir(target.dir, name), 10)
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            return Err(ClusterError::EtcdTimeout {
                cluster: target.cluster.to_owned(),
                seconds: wait.as_secs(),
                report,
                api: control_planes
                    .iter()
                    .find(|n| missing.first().is_some_and(|(m, _)| *m == n.name))
                    .map_or_else(String::new, |n| n.api.clone()),
            });
        }
        std::thread::sleep(Duration::from_secs(3));
    }
}

/// One plain `Bootstrap` (no snapshot) of the node at `api`.
async fn bootstrap_once(connector: &Connector, api: &str) -> Attempt {
    let call = async {
        let mut client = match connector.connect(api).await {
            Ok(c) => c,
            Err(e) => return Attempt::Retry(keelson_api::error_chain(&e)),
        };
        let request = proto::BootstrapRequest {
            recover: false,
            snapshot: Vec::new(),
        };
        match client.bootstrap(tokio_stream::once(request)).await {
            Ok(response) => Attempt::Done(response.into_inner().message),
            Err(status) => {
                let text = keelson_api::error_chain(&connector.status_error(api, &status));
                if worth_retrying(status.code()) {
                    Attempt::Retry(text)
                } else {
                    Attempt::Refused(text)
                }
            }
        }
    };
    // Bootstrapping starts etcd and waits for it: slow under emulation.
    match tokio::time::timeout(Duration::from_secs(120), call).await {
        Ok(attempt) => attempt,
        Err(_) => Attempt::Retry(format!("{api} did not answer the bootstrap within 120 s")),
    }
}

/// Whether the node at `api` lists any etcd member.
fn has_members(runtime: &tokio::runtime::Runtime, connector: &Connector, api: &str) -> bool {
    runtime.block_on(async {
        let members = tokio::time::timeout(CALL_TIMEOUT, async {
            let mut client = connector.connect(api).await.ok()?;
            client
                .etcd_members(proto::EtcdMembersRequest {})
                .await
                .ok()
                .map(|r| r.into_inner().members)
        })
        .await;
        matches!(members, Ok(Some(m)) if !m.is_empty())
    })
}

/// One look at a control plane's etcd: its members and its status.
async fn look(connector: &Connector, api: &str) -> EtcdLook {
    let call = async {
        let mut client = match connector.connect(api).await {
            Ok(c) => c,
            Err(e) => {
                let text = short(&keelson_api::error_chain(&e));
                return EtcdLook {
                    members: Err(text.clone()),
                    status: Err(text),
                };
            }
        };
        let error =
            |s: tonic::Status| short(&keelson_api::error_chain(&connector.status_error(api, &s)));
        let members = client
            .etcd_members(proto::EtcdMembersRequest {})
            .await
            .map(|r| r.into_inner().members)
            .map_err(error);
        let status = client
            .etcd_status(proto::EtcdStatusRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(error);
        EtcdLook { members, status }
    };
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(look) => look,
        Err(_) => {
            let text = format!("the API did not answer within {} s", CALL_TIMEOUT.as_secs());
            EtcdLook {
                members: Err(text.clone()),
                status: Err(text),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn member(name: &str, started: bool, learner: bool) -> proto::EtcdMember {
        proto::EtcdMember {
            id: format!("{:x}", name.len()),
            name: name.into(),
            started,
            learner,
            ..proto::EtcdMember::default()
        }
    }

    fn healthy_status() -> proto::EtcdStatusResponse {
        proto::EtcdStatusResponse {
            member_id: "1".into(),
            leader_id: "1".into(),
            ..proto::EtcdStatusResponse::default()
        }
    }

    fn voting(n: usize) -> Vec<proto::EtcdMember> {
        (1..=n)
            .map(|i| member(&format!("cp-{i}"), true, false))
            .collect()
    }

    fn check(look: EtcdLook, control_planes: usize, want: Result<usize, &str>) {
        let got = judge(&look, control_planes);
        let want = match want {
            Ok(voting) => EtcdState::Ready { voting },
            Err(why) => EtcdState::Waiting(why.into()),
        };
        assert_eq!(got, want);
    }

    #[test]
    fn a_node_is_ready_with_every_control_plane_voting() {
        check(
            EtcdLook {
                members: Ok(voting(3)),
                status: Ok(healthy_status()),
            },
            3,
            Ok(3),
        );
        check(
            EtcdLook {
                members: Ok(voting(1)),
                status: Ok(healthy_status()),
            },
            1,
            Ok(1),
        );
    }

    #[test]
    fn a_node_waits_and_says_why() {
        let mut members = voting(1);
        members.push(member("cp-2", true, true));
        members.push(member("cp-3", false, true));
        check(
            EtcdLook {
                members: Ok(members),
                status: Ok(healthy_status()),
            },
            3,
            Err("members: 1/3 voting members started, 2 learner(s), 1 not started"),
        );
        let learner = proto::EtcdStatusResponse {
            learner: true,
            errors: vec!["etcdserver: no leader".into()],
            ..healthy_status()
        };
        check(
            EtcdLook {
                members: Ok(voting(3)),
                status: Ok(learner),
            },
            3,
            Err(
                "this member's promotion (it is a learner); etcd's errors to clear: etcdserver: no leader",
            ),
        );
        check(
            EtcdLook {
                members: Ok(voting(4)),
                status: Ok(healthy_status()),
            },
            3,
            Err("members: 4 voting members started, 3 expected (a stale member?)"),
        );
    }

    #[test]
    fn an_unreachable_node_is_named_once() {
        check(
            EtcdLook {
                members: Err("cannot reach 127.0.0.1:5000".into()),
                status: Err("cannot reach 127.0.0.1:5000".into()),
            },
            3,
            Err("cannot reach 127.0.0.1:5000"),
        );
        check(
            EtcdLook {
                members: Err("etcd is not running".into()),
                status: Err("etcd is not started".into()),
            },
            3,
            Err("members (etcd is not running); status (etcd is not started)"),
        );
    }

    #[test]
    fn the_nodes_not_ready_are_named() {
        let states = vec![
            ("cp-1".to_owned(), EtcdState::Ready { voting: 3 }),
            (
                "cp-2".to_owned(),
                EtcdState::Waiting("members (no etcd)".into()),
            ),
            ("cp-3".to_owned(), EtcdState::Ready { voting: 3 }),
        ];
        assert_eq!(
            not_ready(&states),
            [("cp-2".to_owned(), "members (no etcd)".to_owned())]
        );
        assert!(not_ready(&states[..1]).is_empty());
    }

    #[test]
    fn only_requests_that_may_succeed_later_are_repeated() {
        assert!(worth_retrying(tonic::Code::Unavailable));
        assert!(worth_retrying(tonic::Code::FailedPrecondition));
        assert!(!worth_retrying(tonic::Code::Unimplemented));
        assert!(!worth_retrying(tonic::Code::PermissionDenied));
    }

    #[test]
    fn states_read_as_progress_lines() {
        assert_eq!(
            EtcdState::Ready { voting: 3 }.to_string(),
            "etcd: healthy, 3/3 voting members started"
        );
        assert_eq!(
            EtcdState::Waiting("members (no etcd)".into()).to_string(),
            "etcd: waiting for members (no etcd)"
        );
    }
}
