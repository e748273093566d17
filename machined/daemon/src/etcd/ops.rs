//! The operations behind `machinectl etcd`, on this node's member: members, status,
//! snapshot, defragmentation, alarms, leave, remove-member, forfeit-leadership, and the
//! leave a reset makes first.

use std::collections::BTreeSet;
use std::time::Duration;

use etcd_client::{AlarmAction, AlarmType, Client};
use keelson_api::api::proto;

use super::plan::{self, LeaveVerdict, Member};
use super::{EtcdError, EtcdNode, Phase, client};
use crate::backend::ServiceOp;

/// What a reset did about etcd before wiping the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetLeave {
    /// Not a member here: nothing to leave.
    NotAMember,
    /// The last member: nothing to leave (the cluster goes with it).
    LastMember,
    /// Left the cluster.
    Left(String),
}

impl EtcdNode {
    /// A client of this node's own member, or why there is none.
    async fn local(&self) -> Result<Client, EtcdError> {
        match self.phase() {
            Phase::Member => {}
            Phase::Joining(_) => {}
            other => {
                return Err(EtcdError::Refused(format!(
                    "etcd does not run on this node: {}",
                    describe(&other)
                )));
            }
        }
        let id = self.identity()?;
        self.inner
            .credentials
            .connect(&[plan::client_url(id.address)])
            .await
    }

    /// The members, as this node's etcd lists them.
    pub async fn members(&self) -> Result<Vec<Member>, EtcdError> {
        let mut c = self.local().await?;
        client::members(&mut c).await
    }

    /// This member's status.
    pub async fn status(&self) -> Result<proto::EtcdStatusResponse, EtcdError> {
        let mut c = self.local().await?;
        let s = c.status().await.map_err(|e| EtcdError::call("status", e))?;
        Ok(proto::EtcdStatusResponse {
            member_id: s
                .header()
                .map(|h| format!("{:x}", h.member_id()))
                .unwrap_or_default(),
            leader_id: format!("{:x}", s.leader()),
            version: s.version().to_owned(),
            db_size: u64::try_from(s.db_size()).unwrap_or_default(),
            db_size_in_use: u64::try_from(s.raft_used_db_size()).unwrap_or_default(),
            raft_term: s.raft_term(),
            raft_index: s.raft_index(),
            raft_applied_index: s.raft_applied_index(),
            learner: s.is_learner(),
            errors: s.errors().to_vec(),
        })
    }

    /// A snapshot of the database, streamed to `tx` chunk by chunk.
    pub async fn snapshot(
        &self,
        tx: tokio::sync::mpsc::Sender<Result<proto::EtcdSnapshotChunk, tonic::Status>>,
    ) -> Result<(), EtcdError> {
        let mut c = self.local().await?;
        let mut stream = c
            .snapshot()
            .await
            .map_err(|e| EtcdError::call("snapshot", e))?;
        tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(part)) => {
                        let chunk = proto::EtcdSnapshotChunk {
                            data: part.blob().to_vec(),
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx
                            .send(Err(tonic::Status::unavailable(format!(
                                "etcd snapshot broke off: {e}; take it again"
                            ))))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(())
    }

    /// Defragments this member.
    pub async fn defrag(&self) -> Result<String, EtcdError> {
        let mut c = self.local().await?;
        c.defragment()
            .await
            .map_err(|e| EtcdError::call("defragment", e))?;
        Ok("etcd: this member's database was defragmented".into())
    }

    /// The active alarms, or (with `disarm`) disarms them and lists what was disarmed.
    pub async fn alarms(&self, disarm: bool) -> Result<Vec<proto::EtcdAlarm>, EtcdError> {
        let mut c = self.local().await?;
        let listed = c
            .alarm(AlarmAction::Get, AlarmType::None, None)
            .await
            .map_err(|e| EtcdError::call("alarm list", e))?;
        let alarms: Vec<proto::EtcdAlarm> = listed
            .alarms()
            .iter()
            .map(|a| proto::EtcdAlarm {
                member_id: format!("{:x}", a.member_id()),
                alarm: a.alarm().as_str_name().to_owned(),
            })
            .collect();
        if disarm {
            for a in listed.alarms() {
                let mut options = etcd_client::AlarmOptions::new();
                options.with_member(a.member_id());
                c.alarm(AlarmAction::Deactivate, a.alarm(), Some(options))
                    .await
                    .map_err(|e| EtcdError::call("alarm disarm", e))?;
            }
        }
        Ok(alarms)
    }

    /// Hands the leadership to another voting member if this one leads.
    pub async fn forfeit_leadership(&self) -> Result<String, EtcdError> {
        let mut c = self.local().await?;
        let status = c.status().await.map_err(|e| EtcdError::call("status", e))?;
        let own = status.header().map(|h| h.member_id()).unwrap_or_default();
        if status.leader() != own {
            return Ok(format!(
                "this member ({own:x}) does not lead; the leader is {:x}",
                status.leader()
            ));
        }
        let members = client::members(&mut c).await?;
        let answering = client::answering(&self.inner.credentials, &members).await;
        let Some(to) = members
            .iter()
            .find(|m| m.id != own && !m.learner && answering.contains(&m.id))
        else {
            return Err(EtcdError::Refused(
                "no other voting member answers, so none can take the leadership".into(),
            ));
        };
        c.move_leader(to.id)
            .await
            .map_err(|e| EtcdError::call("move leader", e))?;
        Ok(format!(
            "the leadership moved from {own:x} to {:x} ({})",
            to.id, to.name
        ))
    }

    /// Removes another member by its hex ID.
    pub async fn remove_member(&self, id: &str) -> Result<String, EtcdError> {
        let parsed = u64::from_str_radix(id.trim_start_matches("0x"), 16).map_err(|_| {
            EtcdError::Refused(format!(
                "{id:?} is not a member ID: give it in hex, as `machinectl etcd members` shows it"
            ))
        })?;
        let mut c = self.local().await?;
        let members = client::members(&mut c).await?;
        let own = self.identity()?;
        let Some(target) = members.iter().find(|m| m.id == parsed) else {
            return Err(EtcdError::Refused(format!(
                "no member {parsed:x} in the cluster (members: {})",
                members
                    .iter()
                    .map(|m| format!("{:x} {}", m.id, m.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        if target.name == own.name {
            return Err(EtcdError::Refused(
                "that is this node's own member: use `machinectl etcd leave` on it".into(),
            ));
        }
        let answering = client::answering(&self.inner.credentials, &members).await;
        if let Some(why) = plan::no_quorum(&members, &answering) {
            return Err(EtcdError::Refused(format!(
                "the removal cannot be committed: {why}; bring a member back first"
            )));
        }
        remove(&mut c, parsed).await?;
        Ok(format!("member {parsed:x} ({}) was removed", target.name))
    }

    /// This member leaves the cluster: refused when the members left would lose their
    /// quorum (unless `force`), or when it is the last one.
    pub async fn leave(&self, force: bool) -> Result<String, EtcdError> {
        match self.leave_for(force).await? {
            ResetLeave::Left(m) => Ok(m),
            ResetLeave::LastMember => Err(EtcdError::Refused(
                "this is the cluster's last voting member: leaving would end the cluster; reset the node instead if that is what you want".into(),
            )),
            ResetLeave::NotAMember => Err(EtcdError::Refused(format!(
                "etcd does not run on this node: {}",
                describe(&self.phase())
            ))),
        }
    }

    /// What a reset does first: leave the cluster unless this is its last member, refused
    /// when that breaks the quorum unless `force` (then a failure to leave is logged and
    /// the reset goes on).
    pub async fn leave_for(&self, force: bool) -> Result<ResetLeave, EtcdError> {
        let _changing = self.inner.changing.lock().await;
        if !matches!(self.phase(), Phase::Member) {
            return Ok(ResetLeave::NotAMember);
        }
        let attempt = async {
            let mut c = self.local().await?;
            let members = client::members(&mut c).await?;
            let own_id = client::own_id(&mut c).await?;
            let answering: BTreeSet<u64> =
                client::answering(&self.inner.credentials, &members).await;
            match plan::leave_verdict(&members, own_id, &answering) {
                LeaveVerdict::LastMember => Ok(ResetLeave::LastMember),
                LeaveVerdict::BreaksQuorum(why) if !force => Err(EtcdError::Refused(format!(
                    "leaving etcd would break its quorum: {why}; bring the other members back first, or add --force"
                ))),
                _ => {
                    remove(&mut c, own_id).await?;
                    Ok(ResetLeave::Left(format!(
                        "member {own_id:x} left the etcd cluster"
                    )))
                }
            }
        };
        let outcome = match attempt.await {
            Ok(o) => o,
            Err(e) if force => {
                tracing::warn!(error = %e, "etcd: could not leave the cluster; going on (--force)");
                ResetLeave::Left(format!("could not leave etcd ({e}); went on (--force)"))
            }
            Err(e) => return Err(e),
        };
        if let ResetLeave::Left(_) = outcome {
            self.service(ServiceOp::Stop).await?;
            self.wipe()?;
            self.set_phase(Phase::Left);
        }
        Ok(outcome)
    }
}

impl EtcdNode {
    /// The `health` check of etcd: a member must answer with a leader and no errors;
    /// a node that waits for the bootstrap is not failing (it says how to bootstrap).
    pub async fn health(&self) -> crate::node::health::Check {
        let phase = self.phase();
        let (ok, reason) = match &phase {
            Phase::Member => match self.status().await {
                Ok(s) if s.errors.is_empty() && s.leader_id != "0" => (
                    true,
                    format!(
                        "member {}{}, leader {}, raft index {}",
                        s.member_id,
                        if s.learner { " (learner)" } else { "" },
                        s.leader_id,
                        s.raft_index
                    ),
                ),
                Ok(s) if s.leader_id == "0" => {
                    (false, "no leader: the cluster has lost its quorum".into())
                }
                Ok(s) => (false, s.errors.join("; ")),
                Err(e) => (false, e.to_string()),
            },
            // Not failing: nothing has asked for etcd yet (no bootstrap, no cluster to join,
            // or the clock to wait for), and the reason says what to do.
            Phase::WaitingForCluster(_) | Phase::WaitingForTime => {
                (true, format!("not started: {}", describe(&phase)))
            }
            Phase::Left => (true, describe(&phase)),
            other => (false, describe(other)),
        };
        crate::node::health::Check {
            name: "etcd".into(),
            ok,
            reason,
        }
    }
}

/// How long a removal waits while etcd calls the cluster unhealthy.
const REMOVE_PATIENCE: Duration = Duration::from_secs(45);

/// Removes member `id`. etcd refuses a removal as "unhealthy cluster" while a member
/// has been connected for less than a few seconds (a member that just started or came
/// back): that passes, so the removal is tried again for a while.
async fn remove(c: &mut Client, id: u64) -> Result<(), EtcdError> {
    let started = tokio::time::Instant::now();
    loop {
        match c.member_remove(id).await {
            Ok(_) => return Ok(()),
            Err(e)
                if e.to_string().contains("unhealthy cluster")
                    && started.elapsed() < REMOVE_PATIENCE =>
            {
                tracing::info!(member = %format!("{id:x}"), "etcd: the cluster is not healthy enough for a removal yet; trying again");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => return Err(EtcdError::call("member remove", e)),
        }
    }
}

/// A phase in words, for refusals and `health`.
pub fn describe(phase: &Phase) -> String {
    match phase {
        Phase::WaitingForTime => {
            "waiting for the clock to be synced (see `machinectl time`)".into()
        }
        Phase::WaitingForCluster(why) => why.clone(),
        Phase::Joining(how) => how.clone(),
        Phase::Member => "a member of the cluster".into(),
        Phase::Left => "it left the cluster (`etcd leave`); it joins again at its next boot".into(),
        Phase::Failed(why) => why.clone(),
    }
}
