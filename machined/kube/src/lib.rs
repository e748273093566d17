//! kubeadm's phases, done by a Keelson node from its machine config, as pure renderers:
//! every function takes the config and the node's facts and gives the files to write.
//! machined (`keelson-machined`'s `kubernetes` controller) writes them, fetches the
//! kubelet, pulls the images and starts the kubelet through PID 1.
//!
//! | module | kubeadm's phase | what it gives |
//! |---|---|---|
//! | [`paths`] | | where every file goes (kubeadm's paths) |
//! | [`pki`] | `certs` | apiserver, apiserver-kubelet-client, front-proxy-client, the service-account key pair, the CA files; the CA's public key hash |
//! | [`kubeconfig`] | `kubeconfig` | admin, super-admin, kubelet, controller-manager, scheduler; a worker's bootstrap kubeconfig; merging into `~/.kube/config` |
//! | [`manifests`] | `control-plane` | the static pods of kube-apiserver, kube-controller-manager and kube-scheduler with kubeadm's flags for the version; the encryption-at-rest config |
//! | [`kubelet`] | `kubelet-start` | the KubeletConfiguration and the kubelet's flags |
//! | [`images`] | `config images list` | the control-plane images for the version, from the configured registry |
//! | [`addons`] | `upload-config`, `bootstrap-token`, `mark-control-plane`, `addon` | the bootstrap manifests (CoreDNS, kube-proxy, the bootstrap RBAC, `cluster-info`, the control-plane labels and taints), and their server-side apply (feature `apply`) |

use std::net::IpAddr;
use std::path::PathBuf;

use keelson_configs::layout::Arch;

pub mod addons;
pub mod images;
pub mod kubeconfig;
pub mod kubelet;
pub mod manifests;
pub mod paths;
pub mod pki;

/// One file the node writes: an absolute path, its bytes and its permission bits.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeFile {
    /// Absolute path on the node.
    pub path: PathBuf,
    /// The whole content.
    pub content: Vec<u8>,
    /// Permission bits (`0o600` for every private key and every kubeconfig with one).
    pub mode: u32,
}

impl std::fmt::Debug for NodeFile {
    // Contents hold private keys: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeFile")
            .field("path", &self.path)
            .field("bytes", &self.content.len())
            .field("mode", &format_args!("{:o}", self.mode))
            .finish()
    }
}

/// What the renderers need to know about the node beyond its config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// The node's name: its hostname (the Kubernetes node name, `system:node:<name>`).
    pub node_name: String,
    /// Every address of the node (for certificate SANs).
    pub addresses: Vec<IpAddr>,
    /// The address the API server advertises and the kubelet reports (`--node-ip`):
    /// the first address in `machine.kubelet.node_ip_subnets`, else the first address.
    pub node_ip: IpAddr,
    /// The node's architecture.
    pub arch: Arch,
}

/// Errors of rendering.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// A secret this node type needs is absent from the config.
    #[error(
        "cluster.secrets.{key} is missing, and a {what} needs it; generate the config with `machinectl gen config` or add it"
    )]
    MissingSecret {
        /// The key under `cluster.secrets`.
        key: &'static str,
        /// What needed it.
        what: &'static str,
    },
    /// A certificate or key could not be made or read.
    #[error("{what}: {source}")]
    Pki {
        /// Which certificate or key.
        what: String,
        /// Why.
        #[source]
        source: keelson_configs::pki::PkiError,
    },
    /// A document could not be serialized.
    #[error("cannot write {what}: {message}")]
    Serialize {
        /// Which document.
        what: String,
        /// Why.
        message: String,
    },
    /// A kubeconfig could not be read or merged.
    #[error("{0}")]
    Kubeconfig(String),
    /// The service subnet has no room for a well-known Service address.
    #[error("cluster.service_subnets: {0}")]
    ServiceSubnet(String),
    /// A request to the Kubernetes API server failed (applying the bootstrap manifests).
    #[error("{what} (API server {server}): {message}")]
    Api {
        /// What was being done, naming the object.
        what: String,
        /// The API server's URL.
        server: String,
        /// Why, and what to do.
        message: String,
    },
}
