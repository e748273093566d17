//! kube-proxy as kubeadm's `addon kube-proxy` phase deploys it
//! (cmd/kubeadm/app/phases/addons/proxy): its ServiceAccount and RBAC, its ConfigMap (the
//! KubeProxyConfiguration and an in-cluster kubeconfig) and its DaemonSet on every node.

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, EnvVar, EnvVarSource, HostPathVolumeSource,
    ObjectFieldSelector, PodSpec, PodTemplateSpec, SecurityContext, ServiceAccount, Toleration,
    Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use keelson_configs::schema::Cluster;
use kube::config::{AuthInfo, Context, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext};
use serde::Serialize;
use serde_json::Value;

use super::{
    BOOTSTRAP_TOKEN_GROUP, KUBE_SYSTEM, cluster_role_binding, group, meta, role_ref, string_map,
    strings, system_service_account, to_json,
};
use crate::{KubeError, NodeFacts, images};

/// The ServiceAccount, ConfigMap, Role, RoleBinding and DaemonSet.
const KUBE_PROXY: &str = "kube-proxy";
/// The ConfigMap's key of the KubeProxyConfiguration (kubeadm's `KubeProxyConfigMapKey`).
const CONFIG_KEY: &str = "config.conf";
/// The ConfigMap's key of the in-cluster kubeconfig.
const KUBECONFIG_KEY: &str = "kubeconfig.conf";
/// Where the ConfigMap is mounted in the pod.
const CONFIG_DIR: &str = "/var/lib/kube-proxy";
/// The service account's files in every pod.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The lock iptables takes, shared with the host.
const XTABLES_LOCK: &str = "/run/xtables.lock";
/// The pods' label.
const APP_LABEL: (&str, &str) = ("k8s-app", "kube-proxy");

/// kube-proxy's objects in apply order: ServiceAccount, the `system:node-proxier` binding,
/// the Role and RoleBinding that let joining nodes read the ConfigMap, the ConfigMap, the
/// DaemonSet.
pub(super) fn objects(cluster: &Cluster, facts: &NodeFacts) -> Result<Vec<Value>, KubeError> {
    Ok(vec![
        to_json(&ServiceAccount {
            metadata: meta(KUBE_PROXY, Some(KUBE_SYSTEM), &[]),
            ..ServiceAccount::default()
        })?,
        to_json(&cluster_role_binding(
            "kubeadm:node-proxier",
            "system:node-proxier",
            vec![system_service_account(KUBE_PROXY)],
        ))?,
        to_json(&Role {
            metadata: meta(KUBE_PROXY, Some(KUBE_SYSTEM), &[]),
            rules: Some(vec![PolicyRule {
                api_groups: Some(strings(&[""])),
                resources: Some(strings(&["configmaps"])),
                resource_names: Some(strings(&[KUBE_PROXY])),
                verbs: strings(&["get"]),
                ..PolicyRule::default()
            }]),
        })?,
        to_json(&RoleBinding {
            metadata: meta(KUBE_PROXY, Some(KUBE_SYSTEM), &[]),
            role_ref: role_ref("Role", KUBE_PROXY),
            subjects: Some(vec![group(BOOTSTRAP_TOKEN_GROUP)]),
        })?,
        to_json(&ConfigMap {
            metadata: meta(KUBE_PROXY, Some(KUBE_SYSTEM), &[("app", KUBE_PROXY)]),
            data: Some(string_map(&[
                (KUBECONFIG_KEY, &in_cluster_kubeconfig(cluster)?),
                (CONFIG_KEY, &proxy_configuration(cluster, facts)?),
            ])),
            ..ConfigMap::default()
        })?,
        to_json(&daemon_set(cluster))?,
    ])
}

/// The parts of kube-proxy's `KubeProxyConfiguration` (`kubeproxy.config.k8s.io/v1alpha1`)
/// that kubeadm sets; kube-proxy defaults the rest.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct KubeProxyConfiguration {
    api_version: &'static str,
    kind: &'static str,
    /// `0.0.0.0`, or `::` when the control plane advertises an IPv6 address.
    bind_address: &'static str,
    client_connection: ClientConnection,
    /// The pod subnets, comma-separated (kubeadm's `networking.podSubnet`).
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: String,
    /// `iptables`, kube-proxy's default on Linux, written out.
    mode: &'static str,
}

/// `KubeProxyConfiguration.clientConnection`.
#[derive(Debug, Serialize)]
struct ClientConnection {
    /// The ConfigMap's kubeconfig, as mounted.
    kubeconfig: String,
}

/// `config.conf`: kubeadm's KubeProxyConfiguration for the cluster.
fn proxy_configuration(cluster: &Cluster, facts: &NodeFacts) -> Result<String, KubeError> {
    let configuration = KubeProxyConfiguration {
        api_version: "kubeproxy.config.k8s.io/v1alpha1",
        kind: "KubeProxyConfiguration",
        bind_address: if facts.node_ip.is_ipv6() {
            "::"
        } else {
            "0.0.0.0"
        },
        client_connection: ClientConnection {
            kubeconfig: format!("{CONFIG_DIR}/{KUBECONFIG_KEY}"),
        },
        cluster_cidr: cluster
            .pod_subnets
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        mode: "iptables",
    };
    yaml_serde::to_string(&configuration).map_err(|err| KubeError::Serialize {
        what: "kube-proxy's KubeProxyConfiguration".into(),
        message: err.to_string(),
    })
}

/// `kubeconfig.conf`: the cluster endpoint, trusted through the service account's CA, and
/// the service account's token file.
fn in_cluster_kubeconfig(cluster: &Cluster) -> Result<String, KubeError> {
    let name = "default";
    let kubeconfig = Kubeconfig {
        clusters: vec![NamedCluster {
            name: name.into(),
            cluster: Some(kube::config::Cluster {
                server: Some(cluster.endpoint.to_string()),
                certificate_authority: Some(format!("{SERVICE_ACCOUNT_DIR}/ca.crt")),
                ..kube::config::Cluster::default()
            }),
            ..NamedCluster::default()
        }],
        contexts: vec![NamedContext {
            name: name.into(),
            context: Some(Context {
                cluster: name.into(),
                user: Some(name.into()),
                namespace: Some(name.into()),
                ..Context::default()
            }),
            ..NamedContext::default()
        }],
        auth_infos: vec![NamedAuthInfo {
            name: name.into(),
            auth_info: Some(AuthInfo {
                token_file: Some(format!("{SERVICE_ACCOUNT_DIR}/token")),
                ..AuthInfo::default()
            }),
            ..NamedAuthInfo::default()
        }],
        current_context: Some(name.into()),
        kind: Some("Config".into()),
        api_version: Some("v1".into()),
        ..Kubeconfig::default()
    };
    yaml_serde::to_string(&kubeconfig).map_err(|err| KubeError::Serialize {
        what: "kube-proxy's kubeconfig".into(),
        message: err.to_string(),
    })
}

/// The kube-proxy DaemonSet: on every node (every taint tolerated), host network,
/// privileged, with its ConfigMap, the host's xtables lock and kernel modules mounted.
fn daemon_set(cluster: &Cluster) -> DaemonSet {
    let pod_labels = string_map(&[APP_LABEL]);
    DaemonSet {
        metadata: meta(KUBE_PROXY, Some(KUBE_SYSTEM), &[APP_LABEL]),
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(pod_labels.clone()),
                ..LabelSelector::default()
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: None,
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    priority_class_name: Some("system-node-critical".into()),
                    containers: vec![container(cluster)],
                    host_network: Some(true),
                    service_account_name: Some(KUBE_PROXY.into()),
                    volumes: Some(vec![
                        Volume {
                            name: KUBE_PROXY.into(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: KUBE_PROXY.into(),
                                ..ConfigMapVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                        host_path_volume("xtables-lock", XTABLES_LOCK, Some("FileOrCreate")),
                        host_path_volume("lib-modules", "/lib/modules", None),
                    ]),
                    tolerations: Some(vec![Toleration {
                        operator: Some("Exists".into()),
                        ..Toleration::default()
                    }]),
                    node_selector: Some(string_map(&[("kubernetes.io/os", "linux")])),
                    ..PodSpec::default()
                }),
            },
            ..DaemonSetSpec::default()
        }),
        status: None,
    }
}

/// The kube-proxy container.
fn container(cluster: &Cluster) -> Container {
    let mount = |name: &str, path: &str, read_only: Option<bool>| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only,
        ..VolumeMount::default()
    };
    Container {
        name: KUBE_PROXY.into(),
        image: Some(images::kube_proxy(cluster)),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec![
            "/usr/local/bin/kube-proxy".into(),
            format!("--config={CONFIG_DIR}/{CONFIG_KEY}"),
            "--hostname-override=$(NODE_NAME)".into(),
        ]),
        security_context: Some(SecurityContext {
            privileged: Some(true),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            mount(KUBE_PROXY, CONFIG_DIR, None),
            mount("xtables-lock", XTABLES_LOCK, Some(false)),
            mount("lib-modules", "/lib/modules", Some(true)),
        ]),
        env: Some(vec![EnvVar {
            name: "NODE_NAME".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "spec.nodeName".into(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]),
        ..Container::default()
    }
}

/// A volume of a host path, with its type (`FileOrCreate`, ...) when it has one.
fn host_path_volume(name: &str, path: &str, type_: Option<&str>) -> Volume {
    Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: type_.map(str::to_owned),
        }),
        ..Volume::default()
    }
}
