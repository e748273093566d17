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
            api_mac: format!("52:54:00:4b:01:{i:02x}"),
        });
    }
    Ok(Plan {
        cidr,
        gateway,
        nodes,
    })
}

impl Plan {
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
        out.push_str(&format!(
            "\n[cluster.etcd]\nadvertised_subnets = [\"{}\"]\n",
            plan.cidr
        ));
    }
    out
}

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

    #[test]
    fn node_patches_are_valid_configs() {
        use keelson_configs::generate::{GenerateOptions, generate};
        use keelson_configs::patch::Patch;
        let p = plan("demo", 1, 1, "10.5.0.0/24".parse().unwrap()).unwrap();
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
                let config = match node.role {
                    MachineType::ControlPlane => generated.control_plane.config,
                    MachineType::Worker => generated.worker.config,
                };
                assert_eq!(config.machine.hostname.as_deref(), Some(node.name.as_str()));
                let want = if kind == NetworkKind::User { 2 } else { 1 };
                assert_eq!(config.machine.network.interfaces.len(), want);
            }
        }
    }
}
