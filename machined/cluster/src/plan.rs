//! What a cluster is made of, decided before anything is created: node names and roles,
//! static addresses on the cluster network, MAC addresses, and each node's config patch.
//! Pure functions, unit-tested without QEMU.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use keelson_configs::schema::MachineType;

use super::ClusterError;

/// The guest address QEMU's user-mode network gives (and port-forwards to) in rootless
/// clusters; only the node API is reachable through it.
pub const USER_NET_ADDRESS: &str = "10.0.2.15/24";

/// How the nodes are networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkKind {
    /// Root: a network namespace holding a bridge (the cluster network's gateway
    /// address) and one tap per VM; machinectl reaches the APIs through a forwarder
    /// that connects from inside the namespace.
    Namespace,
    /// Rootless: the cluster network is an Ethernet switch of ours over unix datagram
    /// sockets; each node's API is forwarded to loopback by QEMU's user-mode network.
    User,
}

/// One node of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    /// Hostname and VM name: `NAME-controlplane-1`, `NAME-worker-2`.
    pub name: String,
    /// Control plane or worker.
    pub role: MachineType,
    /// Static address on the cluster network.
    pub address: Ipv4Addr,
    /// MAC of the NIC on the cluster network.
    pub mac: String,
    /// MAC of the user-network NIC that carries the API forward (rootless only).
    pub api_mac: String,
}

/// The cluster network and its nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The cluster network.
    pub cidr: Ipv4Net,
    /// Its first host address: the bridge in a namespace cluster, the nodes' default
    /// gateway in both kinds.
    pub gateway: Ipv4Addr,
    /// The nodes, control planes first.
    pub nodes: Vec<NodePlan>,
}

/// Decides names and addresses: the gateway takes the network's first host address and
/// the nodes the following ones, control planes first.
pub fn plan(
    name: &str,
    controlplanes: u32,
    workers: u32,
    cidr: Ipv4Net,
) -> Result<Plan, ClusterError> {
    if controlplanes == 0 {
        return Err(ClusterError::Usage(
            "--controlplanes must be at least 1: a cluster needs a control plane".into(),
        ));
    }
    let total = controlplanes + workers;
    if total > 250 {
        return Err(ClusterError::Usage(format!(
            "{total} nodes are more than a local cluster supports (250)"
        )));
    }
    let cidr = cidr.trunc();
    let mut hosts = cidr.hosts();
    let Some(gateway) = hosts.next() else {
        return Err(ClusterError::Usage(format!(
            "--cidr {cidr} has no host addresses; use a network such as 10.5.0.0/24"
        )));
    };
    let mut nodes = Vec::new();
    let roles = (1..=controlplanes)
        .map(|i| (MachineType::ControlPlane, i))
        .chain((1..=workers).map(|i| (MachineType::Worker, i)));
    for (index, (role, n)) in roles.enumerate() {
        let Some(address) = hosts.next() else {
            return Err(ClusterError::Usage(format!(
                "--cidr {cidr} is too small for {total} nodes and a gateway; use a larger network such as 10.5.0.0/24"
            )));
        };
        let i = u8::try_from(index + 1).unwrap_or(u8::MAX);
        nodes.push(NodePlan {
            name: format!("{name}-{role}-{n}"),
            role,
            address,
            mac: format!("52:54:00:4b:00:{i:02x}"),
            api_mac: api_mac(index),
        });
    }
    Ok(Plan {
        cidr,
        gateway,
        nodes,
    })
}

/// The MAC of node `index`'s (0-based, control planes first) user-mode API interface.
pub fn api_mac(index: usize) -> String {
    let i = u8::try_from(index + 1).unwrap_or(u8::MAX);
    format!("52:54:00:4b:01:{i:02x}")
}

impl Plan {
    /// The control planes, in order; the first is the one `create` bootstraps.
    pub fn control_planes(&self) -> impl Iterator<Item = &NodePlan> {
        self.nodes
            .iter()
            .filter(|n| n.role == MachineType::ControlPlane)
    }

    /// The control-plane endpoint the configs carry: the first control plane, port 6443.
    pub fn endpoint(&self) -> String {
        let cp = self.nodes.first().map_or(self.gateway, |n| n.address);
        format!("https://{cp}:6443")
    }
}

/// The merge patch that makes a generated config this node's: hostname, the static
/// address and default route on the cluster NIC (matched by MAC), the kubelet's and
/// etcd's choice of that network, and in rootless clusters the user-network NIC.
pub fn node_patch(plan: &Plan, node: &NodePlan, kind: NetworkKind) -> String {
    let prefix = plan.cidr.prefix_len();
    let mut out = format!(
        "[machine]\nhostname = \"{name}\"\n\n[machine.kubelet]\nnode_ip_subnets = [\"{cidr}\"]\n\n\
         [[machine.network.interfaces]]\nmac = \"{mac}\"\naddresses = [\"{addr}/{prefix}\"]\n\n\
         [[machine.network.interfaces.routes]]\nto = \"0.0.0.0/0\"\nvia = \"{gw}\"\n",
        name = node.name,
        cidr = plan.cidr,
        mac = node.mac,
        addr = node.address,
        gw = plan.gateway,
    );
    if kind == NetworkKind::User {
        out.push_str(&format!(
            "\n[[machine.network.interfaces]]\nmac = \"{}\"\naddresses = [\"{USER_NET_ADDRESS}\"]\n",
            node.api_mac
        ));
    }
    if node.role == MachineType::ControlPlane {
        // Every control plane looks for the cluster's etcd at every control plane: to
        // join it as a learner, and to refuse a second bootstrap.
        let endpoints: Vec<String> = plan
            .control_planes()
            .map(|cp| format!("\"{}\"", cp.address))
            .collect();
        // etcd's defaults (a heartbeat every 100 ms, an election after 1 s without one)
        // assume a real CPU. Local clusters often run under software emulation (TCG) on
        // a loaded 2-core host, where a member can stall for longer than a second: with
        // the defaults the followers keep calling elections and the leader flaps. Five
        // times slower timers keep one leader there and only slow fail-over down.
        out.push_str(&format!(
            "\n[cluster.etcd]\nadvertised_subnets = [\"{cidr}\"]\nendpoints = [{endpoints}]\n\n\
             [cluster.etcd.extra_args]\nheartbeat-interval = \"{ETCD_HEARTBEAT_MS}\"\n\
             election-timeout = \"{ETCD_ELECTION_TIMEOUT_MS}\"\n",
            cidr = plan.cidr,
            endpoints = endpoints.join(", "),
        ));
    }
    out
}

/// etcd's heartbeat interval in local clusters, milliseconds (etcd's default: 100).
pub const ETCD_HEARTBEAT_MS: u32 = 500;

/// etcd's election timeout in local clusters, milliseconds (etcd's default: 1000; etcd
/// wants at least five heartbeats).
pub const ETCD_ELECTION_TIMEOUT_MS: u32 = 5000;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn check(cps: u32, workers: u32, cidr: &str, want: &[(&str, &str)]) {
        let p = plan("demo", cps, workers, cidr.parse().unwrap()).unwrap();
        let got: Vec<(String, String)> = p
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.address.to_string()))
            .collect();
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn names_and_addresses() {
        check(
            1,
            2,
            "10.5.0.0/24",
            &[
                ("demo-controlplane-1", "10.5.0.2"),
                ("demo-worker-1", "10.5.0.3"),
                ("demo-worker-2", "10.5.0.4"),
            ],
        );
        check(
            2,
            0,
            "192.168.7.9/29",
            &[
                ("demo-controlplane-1", "192.168.7.10"),
                ("demo-controlplane-2", "192.168.7.11"),
            ],
        );
        let p = plan("demo", 1, 1, "10.5.0.0/24".parse().unwrap()).unwrap();
        assert_eq!(p.gateway.to_string(), "10.5.0.1");
        assert_eq!(p.endpoint(), "https://10.5.0.2:6443");
        assert_eq!(p.nodes[1].mac, "52:54:00:4b:00:02");
    }

    #[test]
    fn refusals_say_what_to_do() {
        let err = plan("demo", 0, 1, "10.5.0.0/24".parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("--controlplanes"), "{err}");
        let err = plan("demo", 1, 9, "10.5.0.0/29".parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("too small"), "{err}");
    }

    /// A control plane's etcd looks for both control planes and runs with slow timers; a
    /// worker has no etcd settings of ours.
    fn check_etcd(role: MachineType, etcd: &toml::Value) {
        let strings = |key: &str| -> Vec<String> {
            etcd.get(key)
                .and_then(toml::Value::as_array)
                .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
                .unwrap_or_default()
        };
        let arg = |name: &str| {
            etcd.get("extra_args")
                .and_then(|a| a.get(name))
                .and_then(toml::Value::as_str)
                .map(str::to_owned)
        };
        match role {
            MachineType::ControlPlane => {
                assert_eq!(strings("endpoints"), ["10.5.0.2", "10.5.0.3"]);
                assert_eq!(strings("advertised_subnets"), ["10.5.0.0/24"]);
                assert_eq!(arg("heartbeat-interval").as_deref(), Some("500"));
                assert_eq!(arg("election-timeout").as_deref(), Some("5000"));
            }
            MachineType::Worker => {
                assert!(strings("endpoints").is_empty(), "{etcd}");
                assert_eq!(arg("election-timeout"), None);
            }
        }
    }

    #[test]
    fn every_control_plane_looks_for_etcd_at_every_control_plane() {
        let p = plan("demo", 3, 2, "10.5.0.0/24".parse().unwrap()).unwrap();
        let cps: Vec<String> = p.control_planes().map(|n| n.name.clone()).collect();
        assert_eq!(
            cps,
            [
                "demo-controlplane-1",
                "demo-controlplane-2",
                "demo-controlplane-3"
            ]
        );
        for node in &p.nodes {
            let patch: toml::Table = node_patch(&p, node, NetworkKind::Namespace)
                .parse()
                .unwrap();
            let endpoints = patch
                .get("cluster")
                .and_then(|c| c.get("etcd"))
                .and_then(|e| e.get("endpoints"));
            match node.role {
                MachineType::ControlPlane => assert_eq!(
                    endpoints.unwrap().as_array().unwrap(),
                    &["10.5.0.2", "10.5.0.3", "10.5.0.4"]
                        .map(toml::Value::from)
                        .to_vec()
                ),
                MachineType::Worker => assert!(endpoints.is_none(), "{patch}"),
            }
        }
    }

    #[test]
    fn node_patches_are_valid_configs() {
        use keelson_configs::generate::{GenerateOptions, generate};
        use keelson_configs::patch::Patch;
        let p = plan("demo", 2, 1, "10.5.0.0/24".parse().unwrap()).unwrap();
        let secrets = keelson_configs::secrets::ClusterSecrets::generate().unwrap();
        for kind in [NetworkKind::Namespace, NetworkKind::User] {
            for node in &p.nodes {
                let patch =
                    Patch::from_toml_str(&node_patch(&p, node, kind), "node patch").unwrap();
                let mut options = GenerateOptions {
                    cluster_name: "demo".into(),
                    endpoint: p.endpoint(),
                    ..GenerateOptions::default()
                };
                match node.role {
                    MachineType::ControlPlane => options.control_plane_patches.push(patch),
                    MachineType::Worker => options.worker_patches.push(patch),
                }
                let generated = generate(&options, &secrets).unwrap();
                let (config, text) = match node.role {
                    MachineType::ControlPlane => {
                        (generated.control_plane.config, generated.control_plane.text)
                    }
                    MachineType::Worker => (generated.worker.config, generated.worker.text),
                };
                assert_eq!(config.machine.hostname.as_deref(), Some(node.name.as_str()));
                let want = if kind == NetworkKind::User { 2 } else { 1 };
                assert_eq!(config.machine.network.interfaces.len(), want);
                // Read back from the text: what the node is given.
                let etcd = text.parse::<toml::Table>().unwrap()["cluster"]
                    .get("etcd")
                    .cloned()
                    .unwrap_or_else(|| toml::Value::Table(toml::Table::new()));
                check_etcd(node.role, &etcd);
            }
        }
    }
}
