//! The control plane's guard: an upgrade reboots the node, so its etcd member goes away
//! for a while. The upgrade is refused (unless forced) when the local member is not
//! healthy, or when the other voting members that answer are no quorum of the cluster
//! without it.
//!
//! The engine takes the guard as a [`ClusterGuard`] so tests fake it; [`EtcdGuard`] is the
//! real one over [`EtcdNode`]; [`reboot_verdict`] is the pure decision.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;

use keelson_configs::pki::CertAndKey;
use keelson_configs::schema::MachineConfig;

use crate::etcd::client::{self, Credentials};
use crate::etcd::ops::describe;
use crate::etcd::plan::Member;
use crate::etcd::{EtcdNode, Phase};

/// A boxed future, as the guard answers.
pub type GuardFuture<'a> = Pin<Box<dyn Future<Output = Option<String>> + Send + 'a>>;

/// Whether the node may go down for a reboot now.
pub trait ClusterGuard: Send + Sync {
    /// `None` when it may; otherwise why not, with what to do.
    fn reboot_refusal(&self) -> GuardFuture<'_>;
}

/// Whether the cluster keeps its quorum while member `own_id` reboots: the voting members
/// other than it that answer must be a quorum of all the voting members. A learner (or a
/// node that is no member) has no vote: its reboot never breaks the quorum. The last
/// voting member may reboot: its cluster stops and comes back with it, no other member
/// is left without a quorum.
pub fn reboot_verdict(
    members: &[Member],
    own_id: u64,
    answering: &BTreeSet<u64>,
) -> Option<String> {
    let voting: Vec<&Member> = members.iter().filter(|m| !m.learner).collect();
    if !voting.iter().any(|m| m.id == own_id) {
        return None;
    }
    if voting.len() == 1 {
        return None;
    }
    let quorum = voting.len() / 2 + 1;
    let others: Vec<&&Member> = voting.iter().filter(|m| m.id != own_id).collect();
    let up = others.iter().filter(|m| answering.contains(&m.id)).count();
    if up >= quorum {
        return None;
    }
    let down: Vec<String> = others
        .iter()
        .filter(|m| !answering.contains(&m.id))
        .map(|m| {
            if m.name.is_empty() {
                format!("{:x}", m.id)
            } else {
                m.name.clone()
            }
        })
        .collect();
    Some(format!(
        "while this node reboots, etcd would have {up} of its {} voting members answering and it needs {quorum} for a quorum{}; {}",
        voting.len(),
        if down.is_empty() {
            String::new()
        } else {
            format!(" (down: {})", down.join(", "))
        },
        if voting.len() < 3 {
            "add control planes first (three keep a quorum through one reboot), or upgrade with --force"
        } else {
            "bring the members that are down back first, or upgrade with --force"
        }
    ))
}

/// The real guard: this control plane's etcd member.
#[derive(Debug, Clone)]
pub struct EtcdGuard {
    node: EtcdNode,
    credentials: Credentials,
}

impl EtcdGuard {
    /// The guard of `node`, probing the other members with a client certificate from the
    /// config's etcd CA; `None` when the config has no etcd CA (a worker).
    pub fn new(node: EtcdNode, config: &MachineConfig) -> Option<EtcdGuard> {
        let pair = config.cluster.secrets.etcd_ca.as_ref()?;
        let ca = CertAndKey {
            cert: pair.cert.to_string(),
            key: pair.key.as_ref()?.to_string(),
        };
        Some(EtcdGuard {
            node,
            credentials: Credentials::new(&ca),
        })
    }

    async fn refusal(&self) -> Option<String> {
        let phase = self.node.phase();
        match &phase {
            // No member here: nothing to lose.
            Phase::WaitingForTime | Phase::WaitingForCluster(_) | Phase::Left => return None,
            // A control plane that never held a member (not bootstrapped, never joined)
            // loses nothing either, whatever its controller is waiting for.
            Phase::Joining(_) | Phase::Failed(_) if !self.node.has_data() => return None,
            Phase::Joining(_) | Phase::Failed(_) => {
                return Some(format!(
                    "this node's etcd member is not healthy ({}); wait until `machinectl health` shows etcd healthy, or upgrade with --force",
                    describe(&phase)
                ));
            }
            Phase::Member => {}
        }
        let health = self.node.health().await;
        if !health.ok {
            return Some(format!(
                "this node's etcd member is not healthy ({}); fix etcd first, or upgrade with --force",
                health.reason
            ));
        }
        let facts = async {
            let members = self.node.members().await?;
            let status = self.node.status().await?;
            Ok::<_, crate::etcd::EtcdError>((members, status.member_id))
        };
        let (members, own) = match facts.await {
            Ok(f) => f,
            Err(e) => {
                return Some(format!(
                    "cannot tell whether etcd keeps its quorum while this node reboots ({e}); upgrade with --force to go on anyway"
                ));
            }
        };
        let Ok(own_id) = u64::from_str_radix(&own, 16) else {
            return Some(format!(
                "etcd named this member {own:?}, not a hexadecimal id; upgrade with --force to go on anyway"
            ));
        };
        let answering = client::answering(&self.credentials, &members).await;
        reboot_verdict(&members, own_id, &answering)
    }
}

impl ClusterGuard for EtcdGuard {
    fn reboot_refusal(&self) -> GuardFuture<'_> {
        Box::pin(self.refusal())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, learner: bool) -> Member {
        Member {
            id,
            name: format!("cp{id}"),
            peer_urls: Vec::new(),
            client_urls: Vec::new(),
            learner,
        }
    }

    fn check(members: &[Member], answering: &[u64], refused: bool) {
        let answering: BTreeSet<u64> = answering.iter().copied().collect();
        let verdict = reboot_verdict(members, 1, &answering);
        assert_eq!(verdict.is_some(), refused, "{verdict:?}");
    }

    #[test]
    fn a_reboot_keeps_the_quorum_or_is_refused() {
        let one = [member(1, false)];
        let two = [member(1, false), member(2, false)];
        let three = [member(1, false), member(2, false), member(3, false)];
        // The last member: its cluster stops and comes back with it.
        check(&one, &[1], false);
        // Two members: the other alone is no quorum of two.
        check(&two, &[1, 2], true);
        check(&three, &[1, 2, 3], false);
        check(&three, &[1, 2], true);
        // A learner has no vote.
        check(&[member(1, true), member(2, false)], &[2], false);
        check(
            &[member(1, false), member(2, false), member(3, true)],
            &[1, 2, 3],
            true,
        );
        let why = reboot_verdict(&three, 1, &BTreeSet::from([1, 2])).unwrap_or_default();
        assert!(why.contains("down: cp3"), "{why}");
    }
}
