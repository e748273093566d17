//! kubeadm's `bootstrap-token` and `mark-control-plane` phases as objects: the bootstrap
//! token's Secret, the RBAC of TLS bootstrap and node CSR approval, `cluster-info` for
//! discovery, and the control-plane label and taint.
//! (cmd/kubeadm/app/phases/bootstraptoken/{node,clusterinfo}, markcontrolplane,
//! and the `kubeadm:cluster-admins` binding of phases/kubeconfig.)

use std::collections::BTreeMap;
use std::str::FromStr;

use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Node, NodeSpec, Secret, Taint};
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role, RoleBinding};
use keelson_configs::pki::BootstrapToken;
use keelson_configs::schema::Cluster;
use kube::config::{Kubeconfig, NamedCluster};
use serde_json::Value;

use super::{
    BOOTSTRAP_TOKEN_GROUP, CONTROL_PLANE_ROLE, KUBE_PUBLIC, KUBE_SYSTEM, cluster_role_binding,
    group, meta, role_ref, string_map, strings, to_json, user,
};
use crate::KubeError;

/// The group of `admin.conf`'s certificate, bound to `cluster-admin` (kubeadm ≥ 1.29).
const CLUSTER_ADMINS_GROUP: &str = "kubeadm:cluster-admins";
/// The ClusterRole that lets bootstrap tokens get nodes (`kubeadm join` checks its name).
const GET_NODES: &str = "kubeadm:get-nodes";
/// The Role and RoleBinding that let anonymous clients read `cluster-info`.
const CLUSTER_INFO_READER: &str = "kubeadm:bootstrap-signer-clusterinfo";
/// The discovery ConfigMap in `kube-public`.
const CLUSTER_INFO: &str = "cluster-info";
/// kubeadm's label that keeps control planes out of external load balancers.
const EXCLUDE_FROM_LOAD_BALANCERS: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// The bootstrap token's Secret, then the RBAC kubeadm creates for TLS bootstrap.
pub(super) fn token_and_rbac(cluster: &Cluster) -> Result<Vec<Value>, KubeError> {
    let nodes_group = "system:nodes";
    Ok(vec![
        to_json(&token_secret(cluster)?)?,
        to_json(&cluster_role_binding(
            CLUSTER_ADMINS_GROUP,
            "cluster-admin",
            vec![group(CLUSTER_ADMINS_GROUP)],
        ))?,
        to_json(&ClusterRole {
            metadata: meta(GET_NODES, None, &[]),
            rules: Some(vec![PolicyRule {
                api_groups: Some(strings(&[""])),
                resources: Some(strings(&["nodes"])),
                verbs: strings(&["get"]),
                ..PolicyRule::default()
            }]),
            ..ClusterRole::default()
        })?,
        to_json(&cluster_role_binding(
            GET_NODES,
            GET_NODES,
            vec![group(BOOTSTRAP_TOKEN_GROUP)],
        ))?,
        to_json(&cluster_role_binding(
            "kubeadm:kubelet-bootstrap",
            "system:node-bootstrapper",
            vec![group(BOOTSTRAP_TOKEN_GROUP)],
        ))?,
        to_json(&cluster_role_binding(
            "kubeadm:node-autoapprove-bootstrap",
            "system:certificates.k8s.io:certificatesigningrequests:nodeclient",
            vec![group(BOOTSTRAP_TOKEN_GROUP)],
        ))?,
        to_json(&cluster_role_binding(
            "kubeadm:node-autoapprove-certificate-rotation",
            "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient",
            vec![group(nodes_group)],
        ))?,
    ])
}

/// The Secret `bootstrap-token-<id>` of `cluster.secrets.bootstrap_token`, as kubeadm's
/// `BootstrapTokenToSecret` writes it, for authentication and for signing `cluster-info`.
/// It has no expiration: the token lives in the machine config, which workers join with
/// whenever they are added (kubeadm's default is 24 h, after which `kubeadm token create`
/// makes another).
fn token_secret(cluster: &Cluster) -> Result<Secret, KubeError> {
    let token =
        BootstrapToken::from_str(cluster.secrets.bootstrap_token.as_str()).map_err(|source| {
            KubeError::Pki {
                what: "cluster.secrets.bootstrap_token".into(),
                source,
            }
        })?;
    let data: BTreeMap<String, ByteString> = [
        ("token-id", token.id()),
        ("token-secret", token.secret()),
        (
            "description",
            "The bootstrap token of the cluster's machine configs (cluster.secrets.bootstrap_token), applied by Keelson.",
        ),
        ("usage-bootstrap-authentication", "true"),
        ("usage-bootstrap-signing", "true"),
        ("auth-extra-groups", BOOTSTRAP_TOKEN_GROUP),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), ByteString(value.as_bytes().to_vec())))
    .collect();
    Ok(Secret {
        metadata: meta(
            &format!("bootstrap-token-{}", token.id()),
            Some(KUBE_SYSTEM),
            &[],
        ),
        type_: Some("bootstrap.kubernetes.io/token".into()),
        data: Some(data),
        ..Secret::default()
    })
}

/// The `cluster-info` ConfigMap (a kubeconfig with the cluster's endpoint and CA and no
/// user, as kubeadm copies it from `admin.conf`), then the Role and RoleBinding that let
/// `system:anonymous` get it.
pub(super) fn cluster_info(cluster: &Cluster) -> Result<Vec<Value>, KubeError> {
    let kubeconfig = Kubeconfig {
        clusters: vec![NamedCluster {
            name: String::new(),
            cluster: Some(kube::config::Cluster {
                server: Some(cluster.endpoint.to_string()),
                certificate_authority_data: Some(
                    base64::engine::general_purpose::STANDARD
                        .encode(cluster.secrets.kubernetes_ca.cert.as_str()),
                ),
                ..kube::config::Cluster::default()
            }),
            ..NamedCluster::default()
        }],
        current_context: Some(String::new()),
        kind: Some("Config".into()),
        api_version: Some("v1".into()),
        ..Kubeconfig::default()
    };
    let text = yaml_serde::to_string(&kubeconfig).map_err(|err| KubeError::Serialize {
        what: "the cluster-info kubeconfig".into(),
        message: err.to_string(),
    })?;
    Ok(vec![
        to_json(&ConfigMap {
            metadata: meta(CLUSTER_INFO, Some(KUBE_PUBLIC), &[]),
            data: Some(string_map(&[("kubeconfig", &text)])),
            ..ConfigMap::default()
        })?,
        to_json(&Role {
            metadata: meta(CLUSTER_INFO_READER, Some(KUBE_PUBLIC), &[]),
            rules: Some(vec![PolicyRule {
                api_groups: Some(strings(&[""])),
                resources: Some(strings(&["configmaps"])),
                resource_names: Some(strings(&[CLUSTER_INFO])),
                verbs: strings(&["get"]),
                ..PolicyRule::default()
            }]),
        })?,
        to_json(&RoleBinding {
            metadata: meta(CLUSTER_INFO_READER, Some(KUBE_PUBLIC), &[]),
            role_ref: role_ref("Role", CLUSTER_INFO_READER),
            subjects: Some(vec![user("system:anonymous")]),
        })?,
    ])
}

/// The node `node_name` marked as a control plane, for server-side apply: kubeadm's labels
/// (`node-role.kubernetes.io/control-plane`, `node.kubernetes.io/exclude-from-external-load-balancers`)
/// and its taint `node-role.kubernetes.io/control-plane:NoSchedule`; nothing else is set.
pub(super) fn control_plane_node(node_name: &str) -> Result<Value, KubeError> {
    to_json(&Node {
        metadata: meta(
            node_name,
            None,
            &[(CONTROL_PLANE_ROLE, ""), (EXCLUDE_FROM_LOAD_BALANCERS, "")],
        ),
        spec: Some(NodeSpec {
            taints: Some(vec![Taint {
                key: CONTROL_PLANE_ROLE.into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            }]),
            ..NodeSpec::default()
        }),
        status: None,
    })
}
