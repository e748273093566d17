//! The pure decisions of the etcd controller: which address this member advertises, its
//! URLs, the environment file PID 1 starts etcd with, which members a join removes first,
//! and whether a member may leave without breaking the cluster's quorum. No I/O, so each
//! is a unit test.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use keelson_configs::layout::{ETCD_CLIENT_PORT as CLIENT_PORT, ETCD_PEER_PORT as PEER_PORT};

/// The address etcd advertises: the node's first address in the first of
/// `cluster.etcd.advertised_subnets` that holds one (the seed's lesson for machines with
/// several NICs); without subnets, the first global IPv4 address, else the first global
/// IPv6 one. Loopback never.
pub fn advertised_address(subnets: &[IpNet], addresses: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    let usable = || addresses.iter().copied().filter(|a| !a.is_loopback());
    if !subnets.is_empty() {
        return subnets
            .iter()
            .find_map(|net| usable().find(|a| net.contains(a)));
    }
    usable()
        .find(IpAddr::is_ipv4)
        .or_else(|| usable().find(IpAddr::is_ipv6))
}

/// `https://ADDRESS:PORT`, an IPv6 address in brackets.
pub fn url(address: IpAddr, port: u16) -> String {
    match address {
        IpAddr::V4(a) => format!("https://{a}:{port}"),
        IpAddr::V6(a) => format!("https://[{a}]:{port}"),
    }
}

/// The member's peer URL.
pub fn peer_url(address: IpAddr) -> String {
    url(address, PEER_PORT)
}

/// The member's client URL.
pub fn client_url(address: IpAddr) -> String {
    url(address, CLIENT_PORT)
}

/// `https://HOST:PORT` for a join endpoint (a name, or an address, IPv6 in brackets).
pub fn endpoint_url(host: &str, port: u16) -> String {
    match host.parse::<IpAddr>() {
        Ok(ip) => url(ip, port),
        Err(_) => format!("https://{host}:{port}"),
    }
}

/// How this member starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterState {
    /// It starts a new cluster (bootstrap).
    New,
    /// It joins, or restarts in, a cluster that exists.
    Existing,
}

/// What etcd is told about this member, through the environment file PID 1 reads at
/// each start (`keelson_node_protocol::etcd::ENV_FILE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberEnv {
    /// The member's name (the node's hostname).
    pub name: String,
    /// Its address.
    pub address: IpAddr,
    /// `NAME=PEER_URL` for every member of the cluster it starts in.
    pub initial_cluster: Vec<(String, String)>,
    /// New cluster or existing.
    pub state: ClusterState,
    /// The cluster's token (its name): two clusters never mix members by accident.
    pub token: String,
}

impl MemberEnv {
    /// The file's text: etcd's own variables, one per line.
    pub fn render(&self) -> String {
        let cluster = self
            .initial_cluster
            .iter()
            .map(|(name, url)| format!("{name}={url}"))
            .collect::<Vec<_>>()
            .join(",");
        let state = match self.state {
            ClusterState::New => "new",
            ClusterState::Existing => "existing",
        };
        let mut out =
            String::from("# Written by machined; PID 1 reads it at each start of etcd.\n");
        let _ = writeln!(out, "ETCD_NAME={}", self.name);
        let _ = writeln!(
            out,
            "ETCD_INITIAL_ADVERTISE_PEER_URLS={}",
            peer_url(self.address)
        );
        let _ = writeln!(
            out,
            "ETCD_ADVERTISE_CLIENT_URLS={}",
            client_url(self.address)
        );
        let _ = writeln!(out, "ETCD_INITIAL_CLUSTER={cluster}");
        let _ = writeln!(out, "ETCD_INITIAL_CLUSTER_STATE={state}");
        let _ = writeln!(out, "ETCD_INITIAL_CLUSTER_TOKEN={}", self.token);
        out
    }
}

/// A member as the cluster lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its ID.
    pub id: u64,
    /// Its name (empty until it has started).
    pub name: String,
    /// Its peer URLs.
    pub peer_urls: Vec<String>,
    /// Its client URLs (empty until it has started).
    pub client_urls: Vec<String>,
    /// Whether it is a learner (no vote).
    pub learner: bool,
}

impl Member {
    /// Whether it has started (a member added but never started has no name).
    pub fn started(&self) -> bool {
        !self.name.is_empty()
    }
}

/// The members a join removes before it adds itself: an earlier life of this node (its
/// name, or its peer URL from a join cut short). Talos does the same for a node reset and
/// joining again.
pub fn stale_members(members: &[Member], name: &str, peer_url: &str) -> Vec<u64> {
    members
        .iter()
        .filter(|m| m.name == name || m.peer_urls.iter().any(|u| u == peer_url))
        .map(|m| m.id)
        .collect()
}

/// `--initial-cluster` for a member just added as `own_id`: every member by name (ours by
/// our name: it has none yet) and peer URL, as etcd checks them against the cluster's.
pub fn initial_cluster(members: &[Member], own_id: u64, name: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for m in members {
        let member_name = if m.id == own_id { name } else { &m.name };
        for u in &m.peer_urls {
            out.push((member_name.to_owned(), u.clone()));
        }
    }
    out
}

/// What a leave does to the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaveVerdict {
    /// This is the last voting member: there is no cluster left to leave.
    LastMember,
    /// The members left keep their quorum.
    Keeps,
    /// The members left would not have a quorum: why, in words.
    BreaksQuorum(String),
}

/// Whether `own_id` may leave: the voting members left behind must have a quorum of their
/// own among those that answer (`healthy`). A 3-member cluster with one member down
/// cannot lose a second one.
pub fn leave_verdict(members: &[Member], own_id: u64, healthy: &BTreeSet<u64>) -> LeaveVerdict {
    let remaining: Vec<&Member> = members
        .iter()
        .filter(|m| m.id != own_id && !m.learner)
        .collect();
    if remaining.is_empty() {
        return LeaveVerdict::LastMember;
    }
    let answering = remaining.iter().filter(|m| healthy.contains(&m.id)).count();
    let quorum = remaining.len() / 2 + 1;
    if answering >= quorum {
        LeaveVerdict::Keeps
    } else {
        let down: Vec<String> = remaining
            .iter()
            .filter(|m| !healthy.contains(&m.id))
            .map(|m| {
                if m.name.is_empty() {
                    format!("{:x}", m.id)
                } else {
                    m.name.clone()
                }
            })
            .collect();
        LeaveVerdict::BreaksQuorum(format!(
            "without this member, etcd would have {} voting members of which only {answering} answer ({} down: {}), and it needs {quorum} for a quorum",
            remaining.len(),
            down.len(),
            down.join(", ")
        ))
    }
}

/// Why the cluster cannot commit a change now (fewer voting members answer than its
/// quorum), or `None` when it can.
pub fn no_quorum(members: &[Member], healthy: &BTreeSet<u64>) -> Option<String> {
    let voting: Vec<&Member> = members.iter().filter(|m| !m.learner).collect();
    let answering = voting.iter().filter(|m| healthy.contains(&m.id)).count();
    let quorum = voting.len() / 2 + 1;
    (answering < quorum).then(|| {
        format!(
            "the cluster has {} voting members of which {answering} answer, and a change needs {quorum}",
            voting.len()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, name: &str, learner: bool) -> Member {
        Member {
            id,
            name: name.into(),
            peer_urls: vec![format!("https://10.5.0.{id}:2380")],
            client_urls: if name.is_empty() {
                Vec::new()
            } else {
                vec![format!("https://10.5.0.{id}:2379")]
            },
            learner,
        }
    }

    fn set(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    #[test]
    fn the_advertised_address_follows_the_subnets_then_ipv4_first() {
        let addrs: BTreeSet<IpAddr> = ["127.0.0.1", "10.0.2.15", "10.5.0.3", "fd00::3"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let sub = |s: &str| vec![s.parse::<IpNet>().unwrap()];
        assert_eq!(
            advertised_address(&sub("10.5.0.0/24"), &addrs),
            Some("10.5.0.3".parse().unwrap())
        );
        assert_eq!(
            advertised_address(&sub("fd00::/64"), &addrs),
            Some("fd00::3".parse().unwrap())
        );
        assert_eq!(advertised_address(&sub("192.168.0.0/16"), &addrs), None);
        assert_eq!(
            advertised_address(&[], &addrs),
            Some("10.0.2.15".parse().unwrap())
        );
        let only_v6: BTreeSet<IpAddr> = ["::1", "fd00::3"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(
            advertised_address(&[], &only_v6),
            Some("fd00::3".parse().unwrap())
        );
        assert_eq!(
            peer_url("fd00::3".parse().unwrap()),
            "https://[fd00::3]:2380"
        );
        assert_eq!(
            endpoint_url("cp-1.example", 2379),
            "https://cp-1.example:2379"
        );
    }

    #[test]
    fn the_env_file_names_the_member_and_its_cluster() {
        let env = MemberEnv {
            name: "cp-2".into(),
            address: "10.5.0.3".parse().unwrap(),
            initial_cluster: vec![
                ("cp-1".into(), "https://10.5.0.2:2380".into()),
                ("cp-2".into(), "https://10.5.0.3:2380".into()),
            ],
            state: ClusterState::Existing,
            token: "demo".into(),
        };
        let text = env.render();
        assert!(text.contains("\nETCD_NAME=cp-2\n"));
        assert!(text.contains("ETCD_INITIAL_ADVERTISE_PEER_URLS=https://10.5.0.3:2380\n"));
        assert!(text.contains("ETCD_ADVERTISE_CLIENT_URLS=https://10.5.0.3:2379\n"));
        assert!(text.contains(
            "ETCD_INITIAL_CLUSTER=cp-1=https://10.5.0.2:2380,cp-2=https://10.5.0.3:2380\n"
        ));
        assert!(text.contains("ETCD_INITIAL_CLUSTER_STATE=existing\n"));
        assert!(text.contains("ETCD_INITIAL_CLUSTER_TOKEN=demo\n"));
    }

    #[test]
    fn a_join_removes_its_earlier_life_and_lists_itself_by_name() {
        let members = vec![
            member(2, "cp-1", false),
            member(3, "cp-2", false),
            member(4, "", true),
        ];
        // Our name from before a reset, and a learner with our peer URL from a join that
        // a power cut ended.
        assert_eq!(
            stale_members(&members, "cp-2", "https://10.5.0.4:2380"),
            [3, 4]
        );
        assert!(stale_members(&members, "cp-9", "https://10.5.0.9:2380").is_empty());
        let cluster = initial_cluster(&members[..1], 2, "x");
        assert_eq!(
            cluster,
            [("x".to_owned(), "https://10.5.0.2:2380".to_owned())]
        );
        let added = vec![member(2, "cp-1", false), member(7, "", true)];
        assert_eq!(
            initial_cluster(&added, 7, "cp-3"),
            [
                ("cp-1".to_owned(), "https://10.5.0.2:2380".to_owned()),
                ("cp-3".to_owned(), "https://10.5.0.7:2380".to_owned())
            ]
        );
    }

    #[test]
    fn a_change_needs_the_current_quorum() {
        let two = vec![member(1, "cp-1", false), member(2, "cp-2", false)];
        // Removing the dead one of two members cannot be committed by the survivor alone.
        let why = no_quorum(&two, &set(&[1])).unwrap();
        assert!(why.contains("2 voting members of which 1 answer"), "{why}");
        assert_eq!(no_quorum(&two, &set(&[1, 2])), None);
        let three = vec![
            member(1, "a", false),
            member(2, "b", false),
            member(3, "c", false),
        ];
        assert_eq!(no_quorum(&three, &set(&[1, 2])), None);
    }

    #[test]
    fn a_leave_keeps_the_quorum_or_is_refused() {
        let three = vec![
            member(1, "cp-1", false),
            member(2, "cp-2", false),
            member(3, "cp-3", false),
        ];
        assert_eq!(
            leave_verdict(&three, 1, &set(&[1, 2, 3])),
            LeaveVerdict::Keeps
        );
        // One of the other two is down: the one left alone is no quorum of two.
        match leave_verdict(&three, 1, &set(&[1, 2])) {
            LeaveVerdict::BreaksQuorum(why) => {
                assert!(
                    why.contains("2 voting members of which only 1 answer"),
                    "{why}"
                );
                assert!(why.contains("cp-3"), "{why}");
                assert!(why.contains("needs 2"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        let two = vec![member(1, "cp-1", false), member(2, "cp-2", false)];
        assert_eq!(leave_verdict(&two, 1, &set(&[2])), LeaveVerdict::Keeps);
        assert!(matches!(
            leave_verdict(&two, 1, &set(&[1])),
            LeaveVerdict::BreaksQuorum(_)
        ));
        // A learner does not vote: with it, cp-1 is still the last voting member.
        let with_learner = vec![member(1, "cp-1", false), member(2, "", true)];
        assert_eq!(
            leave_verdict(&with_learner, 1, &set(&[1, 2])),
            LeaveVerdict::LastMember
        );
    }
}
