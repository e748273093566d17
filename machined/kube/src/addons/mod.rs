//! The bootstrap manifests: what kubeadm's phases `upload-config`, `bootstrap-token`,
//! `mark-control-plane` and `addon` create through the API after `kubeadm init`, rendered by
//! the control plane that bootstrapped the cluster from its machine config, in apply order:
//!
//! 1. the bootstrap token's Secret and the RBAC of TLS bootstrap (`bootstrap`): the
//!    `kubeadm:cluster-admins` binding that `admin.conf`'s group needs, the bindings that
//!    let bootstrap tokens post CSRs and get nodes and that auto-approve node CSRs;
//! 2. the `cluster-info` ConfigMap in `kube-public` and the Role that lets anonymous
//!    clients read it (`kubeadm join`'s discovery);
//! 3. CoreDNS (`coredns`) and kube-proxy (`proxy`) as kubeadm's addons;
//! 4. the control-plane label and taint of this node, as a Node for server-side apply.
//!
//! Each object is typed through k8s-openapi (so it is a valid object of its kind) and
//! given as JSON with `apiVersion` and `kind`. [`files`] keeps them as YAML under
//! [`paths::ADDONS_DIR`] for inspection; `apply` (feature `apply`) server-side applies
//! them through the API server with kube-rs.
//!
//! Left out: `upload-config`'s `kubeadm-config` and `kubelet-config` ConfigMaps and their
//! RBAC, which only `kubeadm join` and `kubeadm upgrade` read (Keelson nodes join from their
//! machine config).

mod bootstrap;
mod coredns;
mod proxy;

#[cfg(feature = "apply")]
mod apply;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use keelson_configs::schema::{Cluster, MachineConfig};
use serde::Serialize;
use serde_json::Value;

#[cfg(feature = "apply")]
pub use apply::{apply, wait_for_api};

use crate::{KubeError, NodeFacts, NodeFile, paths};

/// The namespace of the cluster's system components.
const KUBE_SYSTEM: &str = "kube-system";
/// The namespace readable by anonymous clients (`cluster-info`).
const KUBE_PUBLIC: &str = "kube-public";
/// The group of every bootstrap token kubeadm makes for joining nodes
/// (kubeadm's `NodeBootstrapTokenAuthGroup`).
const BOOTSTRAP_TOKEN_GROUP: &str = "system:bootstrappers:kubeadm:default-node-token";
/// The RBAC API group.
const RBAC_GROUP: &str = "rbac.authorization.k8s.io";
/// The control-plane role label and taint key (kubeadm's `LabelNodeRoleControlPlane`).
const CONTROL_PLANE_ROLE: &str = "node-role.kubernetes.io/control-plane";
/// The index in the first service subnet of the cluster DNS Service's address
/// (kubeadm's `GetDNSIP`).
const DNS_SERVICE_INDEX: u32 = 10;

/// The bootstrap manifests of the cluster of `config`, marking `facts.node_name` as a
/// control plane, in the order they are applied (each after what it refers to).
pub fn render(config: &MachineConfig, facts: &NodeFacts) -> Result<Vec<Value>, KubeError> {
    let cluster = &config.cluster;
    let mut objects = bootstrap::token_and_rbac(cluster)?;
    objects.extend(bootstrap::cluster_info(cluster)?);
    objects.extend(coredns::objects(cluster)?);
    objects.extend(proxy::objects(cluster, facts)?);
    objects.push(bootstrap::control_plane_node(&facts.node_name)?);
    Ok(objects)
}

/// The bootstrap manifests as files under [`paths::ADDONS_DIR`], one YAML document each,
/// named `NN-<kind>-<namespace>-<name>.yaml` (`NN-<kind>-<name>.yaml` for cluster-scoped
/// objects) in lower case with their apply order as `NN`; mode 0600 (the token's Secret
/// is among them).
pub fn files(objects: &[Value]) -> Result<Vec<NodeFile>, KubeError> {
    objects
        .iter()
        .enumerate()
        .map(|(index, object)| {
            let id = ObjectId::of(object).ok_or_else(|| KubeError::Serialize {
                what: format!("bootstrap manifest {}", index + 1),
                message: "it has no kind or no metadata.name".into(),
            })?;
            let yaml = yaml_serde::to_string(object).map_err(|err| KubeError::Serialize {
                what: id.to_string(),
                message: err.to_string(),
            })?;
            let mut stem = format!("{:02}-{}", index + 1, id.kind);
            if let Some(namespace) = &id.namespace {
                stem = format!("{stem}-{namespace}");
            }
            Ok(NodeFile {
                path: Path::new(paths::ADDONS_DIR).join(format!(
                    "{}.yaml",
                    file_slug(&format!("{stem}-{}", id.name))
                )),
                content: yaml.into_bytes(),
                mode: 0o600,
            })
        })
        .collect()
}

/// The cluster DNS Service's address: the 10th address of the first service subnet, as
/// kubeadm gives it (the kubelet's `clusterDNS` is the same address).
pub fn dns_service_ip(cluster: &Cluster) -> Result<IpAddr, KubeError> {
    let subnet = cluster.service_subnets.first().ok_or_else(|| {
        KubeError::ServiceSubnet("no service subnet is set; add one, like 10.96.0.0/12".into())
    })?;
    let too_small = || {
        KubeError::ServiceSubnet(format!(
            "{subnet} has no {DNS_SERVICE_INDEX}th address for the cluster DNS Service; use a larger subnet, like 10.96.0.0/12"
        ))
    };
    let address = match subnet.network() {
        IpAddr::V4(network) => u32::from(network)
            .checked_add(DNS_SERVICE_INDEX)
            .map(|n| IpAddr::V4(n.into())),
        IpAddr::V6(network) => u128::from(network)
            .checked_add(u128::from(DNS_SERVICE_INDEX))
            .map(|n| IpAddr::V6(n.into())),
    }
    .ok_or_else(too_small)?;
    if subnet.contains(&address) {
        Ok(address)
    } else {
        Err(too_small())
    }
}

/// An object's kind, namespace and name: what errors and file names call it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ObjectId {
    /// `apiVersion`.
    pub(crate) api_version: String,
    /// `kind`.
    pub(crate) kind: String,
    /// `metadata.namespace`, absent for cluster-scoped objects.
    pub(crate) namespace: Option<String>,
    /// `metadata.name`.
    pub(crate) name: String,
}

impl ObjectId {
    /// The identity of a rendered object, when it has a kind and a name.
    pub(crate) fn of(object: &Value) -> Option<ObjectId> {
        let text = |value: &Value| value.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
        Some(ObjectId {
            api_version: text(&object["apiVersion"])?,
            kind: text(&object["kind"])?,
            namespace: text(&object["metadata"]["namespace"]),
            name: text(&object["metadata"]["name"])?,
        })
    }
}

impl std::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(namespace) => write!(f, "{} {namespace}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// A file name part: lower case, every character other than `a-z`, `0-9`, `.` and `-`
/// (such as the `:` of `system:coredns`) made a `-`.
fn file_slug(text: &str) -> String {
    text.chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// A typed object as JSON, with its `apiVersion` and `kind`.
fn to_json<K>(object: &K) -> Result<Value, KubeError>
where
    K: k8s_openapi::Resource + k8s_openapi::Metadata<Ty = ObjectMeta> + Serialize,
{
    serde_json::to_value(object).map_err(|err| KubeError::Serialize {
        what: format!(
            "{} {}",
            K::KIND,
            object.metadata().name.as_deref().unwrap_or_default()
        ),
        message: err.to_string(),
    })
}

/// Object metadata: a name, a namespace for namespaced objects, labels.
fn meta(name: &str, namespace: Option<&str>, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: (!labels.is_empty()).then(|| string_map(labels)),
        ..ObjectMeta::default()
    }
}

/// A string map from pairs.
fn string_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Strings from string slices.
fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// An RBAC subject: a group.
fn group(name: &str) -> Subject {
    Subject {
        api_group: Some(RBAC_GROUP.to_owned()),
        kind: "Group".to_owned(),
        name: name.to_owned(),
        namespace: None,
    }
}

/// An RBAC subject: a user.
fn user(name: &str) -> Subject {
    Subject {
        api_group: Some(RBAC_GROUP.to_owned()),
        kind: "User".to_owned(),
        name: name.to_owned(),
        namespace: None,
    }
}

/// An RBAC subject: a service account of `kube-system`.
fn system_service_account(name: &str) -> Subject {
    Subject {
        api_group: None,
        kind: "ServiceAccount".to_owned(),
        name: name.to_owned(),
        namespace: Some(KUBE_SYSTEM.to_owned()),
    }
}

/// A reference to a role: `kind` is `ClusterRole` or `Role`.
fn role_ref(kind: &str, name: &str) -> RoleRef {
    RoleRef {
        api_group: RBAC_GROUP.to_owned(),
        kind: kind.to_owned(),
        name: name.to_owned(),
    }
}

/// A ClusterRoleBinding of `cluster_role` to `subjects`.
fn cluster_role_binding(
    name: &str,
    cluster_role: &str,
    subjects: Vec<Subject>,
) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: meta(name, None, &[]),
        role_ref: role_ref("ClusterRole", cluster_role),
        subjects: Some(subjects),
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
#[cfg(feature = "apply")]
mod apply_tests;
