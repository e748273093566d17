//! The machine config: one strict TOML document per node, typed.
//!
//! The same types serve the file, the API and `machinectl validate`. Every table refuses
//! unknown keys. Load a config through [`crate::check_str`] or [`crate::load`], which
//! report every problem with its line, column and key path; deserializing these types
//! directly works too, but stops at the first problem and skips the semantic checks.
//!
//! ```toml
//! version = "v1"
//!
//! [machine]
//! type = "controlplane"            # or "worker"
//! hostname = "cp-1"                # optional: DHCP or a name derived from the MAC otherwise
//! install_disk = "/dev/vda"        # required in metal mode
//! swap = "off"                     # "off" (default, as the kubelet wants) or "on"
//! kernel_modules = ["ip_vs"]       # loaded in addition to br_netfilter and overlay
//! disabled_kernel_modules = []     # defaults not to load (warned about)
//! time_servers = ["192.0.2.123"]
//!
//! [machine.sysctls]                # merged over the defaults
//! "vm.overcommit_memory" = 1
//!
//! [machine.network]
//! nameservers = ["10.5.0.1"]
//! [[machine.network.interfaces]]
//! name = "eth0"                    # or mac = "52:54:00:12:34:56"
//! addresses = ["10.5.0.2/24"]
//! mtu = 1500
//! [[machine.network.interfaces.routes]]
//! to = "0.0.0.0/0"
//! via = "10.5.0.1"
//!
//! [machine.kubelet]
//! node_ip_subnets = ["10.5.0.0/24"]
//! extra_args = { "max-pods" = "200" }
//! extra_config = { serializeImagePulls = false }
//!
//! [machine.api]
//! cert_sans = ["cp-1.example.com"]
//!
//! [machine.registries.mirrors."10.5.0.1:5000"]   # containerd's hosts.toml for that registry
//! endpoints = ["http://10.5.0.1:5000"]           # plain HTTP for a local registry
//!
//! [[machine.files]]
//! path = "/var/etc/motd"
//! content = "hello\n"
//! mode = "0644"
//!
//! [[machine.services]]             # extension services, supervised like the built-in ones
//! name = "node-agent"              # lower-case letters, digits and '-'; not a built-in's name
//! command = ["/usr/bin/agent", "--port=9100"]   # absolute program path and its arguments, run directly (no shell)
//! depends_on = ["containerd"]      # optional: started once these are ready (built-in or extension services)
//! environment = { LOG_LEVEL = "info" }          # optional: added to PATH and HOME
//!
//! [cluster]
//! name = "demo"
//! endpoint = "https://10.5.0.2:6443"
//! kubernetes_version = "1.34.1"
//! pod_subnets = ["10.244.0.0/16"]
//! service_subnets = ["10.96.0.0/12"]
//! dns_domain = "cluster.local"
//! image_repository = "registry.k8s.io"   # kubeadm's imageRepository: where the control-plane images come from
//!
//! [cluster.kubelet]                # where the node downloads the kubelet, pinned by sha256
//! base_url = "https://mirror.example.com/kubernetes/release"
//! sha256 = { amd64 = "<64 hex digits>", arm64 = "<64 hex digits>" }
//!
//! [cluster.etcd]                   # control planes only
//! advertised_subnets = ["10.5.0.0/24"]
//! endpoints = ["10.5.0.2", "10.5.0.3", "10.5.0.4"]   # the cluster's etcd (port 2379 unless given); default: cluster.endpoint's host
//!
//! [cluster.secrets]
//! bootstrap_token = "abcdef.0123456789abcdef"
//! api_join_token = "ghijkl.0123456789abcdef"
//! encryption_key = "<base64 of 32 bytes>"       # control planes only
//! service_account_key = "<PEM private key>"     # control planes only
//! kubernetes_ca = { cert = "<PEM>", key = "<PEM>" }   # key on control planes only
//! node_api_ca = { cert = "<PEM>", key = "<PEM>" }     # key on control planes only
//! etcd_ca = { cert = "<PEM>", key = "<PEM>" }         # control planes only
//! front_proxy_ca = { cert = "<PEM>", key = "<PEM>" }  # control planes only
//! ```
//!
//! # Secrets, and how a worker gets its node API server certificate
//!
//! A control plane carries every CA with its private key, the service-account key and the
//! encryption-at-rest key. A worker carries no private key of the cluster: only the
//! Kubernetes CA certificate (to trust the API server), the node API CA certificate, the
//! bootstrap token (kubelet TLS bootstrap, as `kubeadm join` does it) and the
//! `api_join_token`.
//!
//! Every node serves the node API (machined, mTLS) with a certificate issued by the node
//! API CA for its actual addresses and hostname, which no generated config can know in
//! advance, and one worker config serves every worker. So a control plane issues its own
//! server certificate with the CA key it carries, and a worker generates its key pair at
//! boot and asks a control plane's machined to sign a certificate request, authenticated by
//! `api_join_token` (the model of Talos's trustd). The worker's key never leaves the node,
//! and a stolen worker config cannot mint certificates.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::values::ValueError;

pub use crate::values::{
    Base64Key, CertificatePem, Endpoint, FileMode, KubernetesVersion, MacAddr, PrivateKeyPem,
    Sha256Sum, Token,
};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The config could not be written as TOML.
    #[error("cannot serialize the machine config as TOML")]
    Serialize(#[source] toml::ser::Error),
}

/// The kernel modules every node loads unless the config disables them: the kubelet's
/// prerequisites (kubeadm's preflight checks).
pub const DEFAULT_KERNEL_MODULES: [&str; 2] = ["br_netfilter", "overlay"];

/// The sysctls every node sets unless the config overrides them: the kubelet's prerequisites.
pub const DEFAULT_SYSCTLS: [(&str, &str); 3] = [
    ("net.bridge.bridge-nf-call-iptables", "1"),
    ("net.bridge.bridge-nf-call-ip6tables", "1"),
    ("net.ipv4.ip_forward", "1"),
];

/// The services PID 1 defines itself; an extension service may depend on them but not
/// take their names.
pub const BUILTIN_SERVICES: [&str; 4] = ["containerd", "etcd", "kubelet", "machined"];

/// The only config format version this code reads and writes.
pub const CONFIG_VERSION: &str = "v1";

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// The format version (`version = "v1"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConfigVersion {
    /// The first version.
    #[default]
    #[serde(rename = "v1")]
    V1,
}

/// A whole machine config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Format version.
    pub version: ConfigVersion,
    /// This node.
    pub machine: Machine,
    /// The cluster it belongs to.
    pub cluster: Cluster,
}

impl MachineConfig {
    /// The config as TOML text; parsing it again gives an equal config.
    pub fn to_toml_string(&self) -> Result<String, SchemaError> {
        toml::to_string_pretty(self).map_err(SchemaError::Serialize)
    }
}

/// Whether a node runs the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineType {
    /// Runs etcd, the API server, the controller manager and the scheduler, plus a kubelet.
    #[serde(rename = "controlplane")]
    ControlPlane,
    /// Runs a kubelet only.
    Worker,
}

impl fmt::Display for MachineType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MachineType::ControlPlane => "controlplane",
            MachineType::Worker => "worker",
        })
    }
}

/// Whether swap may be used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Swap {
    /// Swap is turned off at boot (the kubelet's default requirement).
    #[default]
    Off,
    /// Swap is left on (the kubelet then needs `failSwapOn = false`).
    On,
}

/// The node itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// Control plane or worker.
    #[serde(rename = "type")]
    pub kind: MachineType,
    /// The hostname (and Kubernetes node name); from DHCP or derived from the MAC when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The disk Keelson is installed on (metal mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_disk: Option<String>,
    /// Swap policy.
    #[serde(default)]
    pub swap: Swap,
    /// Kernel modules loaded in addition to [`DEFAULT_KERNEL_MODULES`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_modules: Vec<String>,
    /// Default kernel modules not to load.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disabled_kernel_modules: Vec<String>,
    /// Sysctls, merged over [`DEFAULT_SYSCTLS`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sysctls: BTreeMap<String, SysctlValue>,
    /// NTP servers (IP addresses or names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub time_servers: Vec<String>,
    /// Network configuration.
    #[serde(default, skip_serializing_if = "is_default")]
    pub network: Network,
    /// Kubelet settings.
    #[serde(default, skip_serializing_if = "is_default")]
    pub kubelet: Kubelet,
    /// Node API settings.
    #[serde(default, skip_serializing_if = "is_default")]
    pub api: Api,
    /// Where containerd pulls images from: mirrors per registry.
    #[serde(default, skip_serializing_if = "is_default")]
    pub registries: Registries,
    /// Files written at boot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<File>,
    /// Extension services, started after the built-in ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ExtensionService>,
}

impl Machine {
    /// The kernel modules this node loads: the defaults not disabled, then the extra ones,
    /// each once.
    pub fn effective_kernel_modules(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let defaults = DEFAULT_KERNEL_MODULES
            .iter()
            .filter(|m| !self.disabled_kernel_modules.iter().any(|d| d == *m))
            .map(|m| m.to_string());
        for module in defaults.chain(self.kernel_modules.iter().cloned()) {
            if !out.contains(&module) {
                out.push(module);
            }
        }
        out
    }

    /// The sysctls this node sets: the defaults, overridden and extended by the config.
    pub fn effective_sysctls(&self) -> BTreeMap<String, String> {
        let mut out: BTreeMap<String, String> = DEFAULT_SYSCTLS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in &self.sysctls {
            out.insert(k.clone(), v.0.clone());
        }
        out
    }
}

/// A sysctl value. The file may write it as a string or an integer; it is kept as text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SysctlValue(pub String);

impl Serialize for SysctlValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SysctlValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = SysctlValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an integer")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SysctlValue, E> {
                Ok(SysctlValue(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<SysctlValue, E> {
                Ok(SysctlValue(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<SysctlValue, E> {
                Ok(SysctlValue(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Network configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// DNS resolvers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<IpAddr>,
    /// Interfaces to configure; others stay down.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
}

/// One network interface, selected by exactly one of `name` or `mac`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// Select the interface by kernel name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Select the interface by hardware address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// Ask DHCP for addresses, routes and resolvers.
    #[serde(default)]
    pub dhcp: bool,
    /// Static addresses with their prefix length.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpNet>,
    /// Static routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// The MTU, within [`crate::values::MTU_RANGE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// A static route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Destination network (`0.0.0.0/0` for the default route).
    pub to: IpNet,
    /// Gateway; none for an on-link route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<IpAddr>,
    /// Route metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
}

/// Kubelet settings of this node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kubelet {
    /// Extra command-line flags, by name without dashes (`max-pods = "200"`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_args: BTreeMap<String, String>,
    /// The node IP is the first address in one of these subnets (`--node-ip`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_ip_subnets: Vec<IpNet>,
    /// Merged into the generated `KubeletConfiguration`.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub extra_config: toml::Table,
}

/// Image registries as containerd reaches them (written as containerd's `hosts.toml`
/// files under `/etc/containerd/certs.d`, as Talos's `machine.registries` are).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registries {
    /// Per registry host (`registry.k8s.io`, `10.5.0.1:5000`), the endpoints that serve
    /// it, tried in order before the registry itself.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mirrors: BTreeMap<String, RegistryMirror>,
}

/// The endpoints of one registry's mirror.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryMirror {
    /// `http://` or `https://` URLs (plain HTTP for a local registry without TLS).
    pub endpoints: Vec<String>,
}

/// Node API (machined) settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Api {
    /// Extra subject alternative names for the node API server certificate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cert_sans: Vec<String>,
}

/// A file written at boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// Absolute path.
    pub path: String,
    /// The whole content.
    pub content: String,
    /// Permission bits (default `0644`).
    #[serde(default = "default_file_mode")]
    pub mode: FileMode,
}

/// An extension service: a program of the image (or of a file the config writes) that
/// PID 1 starts at boot after the built-in services and supervises like them (restart
/// with backoff, output kept for `machinectl logs`), ready as soon as it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionService {
    /// Its name: lower-case letters, digits and '-', not one of [`BUILTIN_SERVICES`].
    pub name: String,
    /// The absolute program path, then its arguments; run directly, never through a shell.
    pub command: Vec<String>,
    /// Services (built-in or extension) that must be ready before it starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Variables added to the environment every service gets (`PATH`, `HOME`), which
    /// they may override.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
}

fn default_file_mode() -> FileMode {
    FileMode(0o644)
}

/// The cluster a node belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Cluster name (an RFC 1123 label).
    pub name: String,
    /// The control-plane endpoint (the API server, or a load balancer in front of them).
    pub endpoint: Endpoint,
    /// The Kubernetes release.
    pub kubernetes_version: KubernetesVersion,
    /// Pod networks, one per IP family.
    #[serde(default = "default_pod_subnets")]
    pub pod_subnets: Vec<IpNet>,
    /// Service networks, one per IP family.
    #[serde(default = "default_service_subnets")]
    pub service_subnets: Vec<IpNet>,
    /// The cluster's DNS domain.
    #[serde(default = "default_dns_domain")]
    pub dns_domain: String,
    /// Where the control-plane images come from (kubeadm's `imageRepository`): a registry
    /// host with an optional port and path, like `registry.k8s.io` (the default) or
    /// `10.5.0.1:5000/k8s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_repository: Option<String>,
    /// Where the kubelet binary comes from.
    #[serde(default, skip_serializing_if = "is_default")]
    pub kubelet: KubeletArtifacts,
    /// etcd settings (control planes).
    #[serde(default, skip_serializing_if = "is_default")]
    pub etcd: Etcd,
    /// The secrets this node type needs.
    pub secrets: Secrets,
}

/// The upstream registry of the Kubernetes images (kubeadm's default `imageRepository`).
pub const DEFAULT_IMAGE_REPOSITORY: &str = "registry.k8s.io";

impl Cluster {
    /// Where the control-plane images come from: `image_repository`, else
    /// [`DEFAULT_IMAGE_REPOSITORY`].
    pub fn image_repository(&self) -> &str {
        self.image_repository
            .as_deref()
            .unwrap_or(DEFAULT_IMAGE_REPOSITORY)
    }

    /// The pod sandbox ("pause") image kubeadm pairs with `kubernetes_version`, from
    /// [`Cluster::image_repository`]: containerd's `sandbox_image` and one of the images
    /// pulled before the kubelet starts. The tags are kubeadm's `PauseVersion` of each
    /// release (cmd/kubeadm/app/constants).
    pub fn pause_image(&self) -> String {
        let tag = match self.kubernetes_version.minor {
            ..=33 => "3.10",
            _ => "3.10.1",
        };
        format!("{}/pause:{tag}", self.image_repository())
    }

    /// Where this control plane looks for the cluster's etcd: each entry of
    /// `etcd.endpoints` as (host, port), each once, or the host of `endpoint` on
    /// [`crate::layout::ETCD_CLIENT_PORT`] when there are none. Entries that do not parse
    /// are left out (a checked config has none).
    pub fn etcd_join_endpoints(&self) -> Vec<(String, u16)> {
        if self.etcd.endpoints.is_empty() {
            return vec![(self.endpoint.host.clone(), crate::layout::ETCD_CLIENT_PORT)];
        }
        let mut out: Vec<(String, u16)> = Vec::new();
        for endpoint in &self.etcd.endpoints {
            if let Ok(parsed) = parse_etcd_endpoint(endpoint)
                && !out
                    .iter()
                    .any(|(h, p)| h.eq_ignore_ascii_case(&parsed.0) && *p == parsed.1)
            {
                out.push(parsed);
            }
        }
        out
    }
}

fn default_pod_subnets() -> Vec<IpNet> {
    vec![IpNet::V4(ipnet::Ipv4Net::new_assert(
        [10, 244, 0, 0].into(),
        16,
    ))]
}

fn default_service_subnets() -> Vec<IpNet> {
    vec![IpNet::V4(ipnet::Ipv4Net::new_assert(
        [10, 96, 0, 0].into(),
        12,
    ))]
}

fn default_dns_domain() -> String {
    "cluster.local".into()
}

/// Where a node downloads the kubelet for `cluster.kubernetes_version`, and its pinned sums.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeletArtifacts {
    /// Base URL; the node fetches `BASE/v1.X.Y/bin/linux/ARCH/kubelet`. Unset means the
    /// upstream release site; air-gapped clusters point it at a mirror.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// The sha256 of the kubelet binary per architecture (`amd64`, `arm64`). A node runs a
    /// downloaded kubelet only when its sum is pinned here and matches.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sha256: BTreeMap<String, Sha256Sum>,
}

/// etcd settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Etcd {
    /// etcd advertises the node's first address in one of these subnets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advertised_subnets: Vec<IpNet>,
    /// Extra etcd flags, by name without dashes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_args: BTreeMap<String, String>,
    /// Where this control plane looks for the cluster's etcd, to join it and to refuse a
    /// second bootstrap: each an IP address or DNS name, with `:port` optional (default
    /// 2379; IPv6 in brackets when a port is given). Empty means the host of
    /// `cluster.endpoint`. Each entry follows [`parse_etcd_endpoint`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
}

/// One entry of `cluster.etcd.endpoints`: `HOST` or `HOST:PORT`, where HOST is an IP
/// address or a DNS name and an IPv6 address with a port is in brackets (`[fd00::2]:2379`).
/// Gives the host (an address in its canonical form, without brackets) and the port,
/// [`crate::layout::ETCD_CLIENT_PORT`] when none is given.
pub fn parse_etcd_endpoint(s: &str) -> Result<(String, u16), ValueError> {
    const FORMS: &str = "write an address or a name, with an optional port, like 10.5.0.2, cp-1.example.com:2379, fd00::2 or [fd00::2]:2379";
    let bad = |what: &str| ValueError {
        message: format!("{} {what}", crate::values::quote(s)),
        hint: Some(FORMS.into()),
    };
    if s.is_empty() {
        return Err(ValueError {
            message: "the endpoint is empty".into(),
            hint: Some(FORMS.into()),
        });
    }
    if let Some((scheme, _)) = s.split_once("://") {
        return Err(ValueError {
            message: format!(
                "{} is a URL (its scheme is {})",
                crate::values::quote(s),
                crate::values::quote(scheme)
            ),
            hint: Some(format!(
                "give the host and port alone (etcd is always reached over TLS); {FORMS}"
            )),
        });
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok((ip.to_string(), crate::layout::ETCD_CLIENT_PORT));
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return Err(bad("has no closing `]`"));
        };
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad("has something other than an IPv6 address in brackets"));
        }
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if after.is_empty() => (host, None),
            None => return Err(bad("has something other than `:PORT` after `]`")),
        }
    } else {
        match s.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return Err(bad(
                    "is not an IPv6 address; with a port, an IPv6 address goes in brackets",
                ));
            }
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        }
    };
    let port = match port {
        None => crate::layout::ETCD_CLIENT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => {
                return Err(bad(&format!(
                    "has an invalid port {}; use a port from 1 to 65535",
                    crate::values::quote(p)
                )));
            }
        },
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok((ip.to_string(), port));
    }
    crate::values::check_host(host).map_err(|err| ValueError {
        message: err.message,
        hint: Some(FORMS.into()),
    })?;
    Ok((host.to_owned(), port))
}

/// A CA certificate, with its private key on control planes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaPair {
    /// The CA certificate.
    pub cert: CertificatePem,
    /// The CA private key (control planes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PrivateKeyPem>,
}

/// The cluster secrets a node carries; see the module documentation for who carries what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secrets {
    /// kubeadm-format bootstrap token for kubelet TLS bootstrap.
    pub bootstrap_token: Token,
    /// Authenticates a node's request for its node API server certificate.
    pub api_join_token: Token,
    /// Encryption-at-rest key for Secrets (control planes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key: Option<Base64Key>,
    /// Service-account signing key (control planes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_key: Option<PrivateKeyPem>,
    /// The Kubernetes CA.
    pub kubernetes_ca: CaPair,
    /// The node API CA.
    pub node_api_ca: CaPair,
    /// The etcd CA (control planes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_ca: Option<CaPair>,
    /// The front-proxy CA (control planes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub front_proxy_ca: Option<CaPair>,
}

impl Secrets {
    /// Every CA with its key path under `cluster.secrets`.
    pub fn cas(&self) -> Vec<(&'static str, &CaPair)> {
        let mut out = vec![
            ("kubernetes_ca", &self.kubernetes_ca),
            ("node_api_ca", &self.node_api_ca),
        ];
        if let Some(ca) = &self.etcd_ca {
            out.push(("etcd_ca", ca));
        }
        if let Some(ca) = &self.front_proxy_ca {
            out.push(("front_proxy_ca", ca));
        }
        out
    }
}
