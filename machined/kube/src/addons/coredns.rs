//! CoreDNS as kubeadm's `addon coredns` phase deploys it
//! (cmd/kubeadm/app/phases/addons/dns/manifests.go): its ConfigMap with the Corefile, its
//! ClusterRole and binding, its ServiceAccount, its Deployment and the `kube-dns` Service
//! on the cluster DNS address.

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort,
    HTTPGetAction, KeyToPath, PodAffinityTerm, PodAntiAffinity, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec,
    Toleration, Volume, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use keelson_configs::schema::Cluster;
use serde_json::Value;

use super::{
    CONTROL_PLANE_ROLE, KUBE_SYSTEM, cluster_role_binding, dns_service_ip, meta, string_map,
    strings, system_service_account, to_json,
};
use crate::{KubeError, images};

/// The Deployment, its ServiceAccount and its ConfigMap.
const COREDNS: &str = "coredns";
/// The ClusterRole and ClusterRoleBinding.
const COREDNS_ROLE: &str = "system:coredns";
/// The Service's name (kept from kube-dns, which clients and docs expect).
const KUBE_DNS: &str = "kube-dns";
/// The label every CoreDNS object and pod carries, and the Service selects.
const APP_LABEL: (&str, &str) = ("k8s-app", "kube-dns");
/// kubeadm's replica count.
const REPLICAS: i32 = 2;
/// Where the Corefile is mounted.
const CONFIG_DIR: &str = "/etc/coredns";

/// CoreDNS's objects in apply order, each after what it refers to: ServiceAccount,
/// ClusterRole, ClusterRoleBinding, ConfigMap, Deployment, Service.
pub(super) fn objects(cluster: &Cluster) -> Result<Vec<Value>, KubeError> {
    let dns_ip = dns_service_ip(cluster)?;
    Ok(vec![
        to_json(&ServiceAccount {
            metadata: meta(COREDNS, Some(KUBE_SYSTEM), &[]),
            ..ServiceAccount::default()
        })?,
        to_json(&ClusterRole {
            metadata: meta(COREDNS_ROLE, None, &[]),
            rules: Some(vec![
                PolicyRule {
                    api_groups: Some(strings(&[""])),
                    resources: Some(strings(&["endpoints", "services", "pods", "namespaces"])),
                    verbs: strings(&["list", "watch"]),
                    ..PolicyRule::default()
                },
                PolicyRule {
                    api_groups: Some(strings(&["discovery.k8s.io"])),
                    resources: Some(strings(&["endpointslices"])),
                    verbs: strings(&["list", "watch"]),
                    ..PolicyRule::default()
                },
            ]),
            ..ClusterRole::default()
        })?,
        to_json(&cluster_role_binding(
            COREDNS_ROLE,
            COREDNS_ROLE,
            vec![system_service_account(COREDNS)],
        ))?,
        to_json(&ConfigMap {
            metadata: meta(COREDNS, Some(KUBE_SYSTEM), &[]),
            data: Some(string_map(&[("Corefile", &corefile(&cluster.dns_domain))])),
            ..ConfigMap::default()
        })?,
        to_json(&deployment(cluster))?,
        to_json(&Service {
            metadata: ObjectMeta {
                annotations: Some(string_map(&[
                    ("prometheus.io/port", "9153"),
                    ("prometheus.io/scrape", "true"),
                ])),
                ..meta(
                    KUBE_DNS,
                    Some(KUBE_SYSTEM),
                    &[
                        APP_LABEL,
                        ("kubernetes.io/cluster-service", "true"),
                        ("kubernetes.io/name", "CoreDNS"),
                    ],
                )
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(dns_ip.to_string()),
                ports: Some(vec![
                    service_port("dns", 53, "UDP"),
                    service_port("dns-tcp", 53, "TCP"),
                    service_port("metrics", 9153, "TCP"),
                ]),
                selector: Some(string_map(&[APP_LABEL])),
                ..ServiceSpec::default()
            }),
            status: None,
        })?,
    ])
}

/// kubeadm's Corefile for the cluster domain `dns_domain`: Kubernetes names answered from
/// the API, everything else forwarded to the node's resolvers.
pub(super) fn corefile(dns_domain: &str) -> String {
    format!(
        r".:53 {{
    errors
    health {{
       lameduck 5s
    }}
    ready
    kubernetes {dns_domain} in-addr.arpa ip6.arpa {{
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
       ttl 30
    }}
    prometheus :9153
    forward . /etc/resolv.conf {{
       max_concurrent 1000
    }}
    cache 30 {{
       disable success {dns_domain}
       disable denial {dns_domain}
    }}
    loop
    reload
    loadbalance
}}
"
    )
}

/// The CoreDNS Deployment: two replicas spread over nodes, tolerating control planes,
/// probed on `/health` and `/ready`, with no privilege beyond binding port 53.
fn deployment(cluster: &Cluster) -> Deployment {
    let pod_labels = string_map(&[APP_LABEL]);
    Deployment {
        metadata: meta(COREDNS, Some(KUBE_SYSTEM), &[APP_LABEL]),
        spec: Some(DeploymentSpec {
            replicas: Some(REPLICAS),
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(1)),
                    ..RollingUpdateDeployment::default()
                }),
            }),
            selector: LabelSelector {
                match_labels: Some(pod_labels.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec(cluster)),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// The pod of the CoreDNS Deployment.
fn pod_spec(cluster: &Cluster) -> PodSpec {
    PodSpec {
        priority_class_name: Some("system-cluster-critical".into()),
        service_account_name: Some(COREDNS.into()),
        affinity: Some(Affinity {
            pod_anti_affinity: Some(PodAntiAffinity {
                preferred_during_scheduling_ignored_during_execution: Some(vec![
                    WeightedPodAffinityTerm {
                        weight: 100,
                        pod_affinity_term: PodAffinityTerm {
                            label_selector: Some(LabelSelector {
                                match_expressions: Some(vec![LabelSelectorRequirement {
                                    key: APP_LABEL.0.into(),
                                    operator: "In".into(),
                                    values: Some(strings(&[APP_LABEL.1])),
                                }]),
                                ..LabelSelector::default()
                            }),
                            topology_key: "kubernetes.io/hostname".into(),
                            ..PodAffinityTerm::default()
                        },
                    },
                ]),
                ..PodAntiAffinity::default()
            }),
            ..Affinity::default()
        }),
        tolerations: Some(vec![
            Toleration {
                key: Some("CriticalAddonsOnly".into()),
                operator: Some("Exists".into()),
                ..Toleration::default()
            },
            Toleration {
                key: Some(CONTROL_PLANE_ROLE.into()),
                effect: Some("NoSchedule".into()),
                ..Toleration::default()
            },
        ]),
        node_selector: Some(string_map(&[("kubernetes.io/os", "linux")])),
        containers: vec![container(cluster)],
        dns_policy: Some("Default".into()),
        volumes: Some(vec![Volume {
            name: "config-volume".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: COREDNS.into(),
                items: Some(vec![KeyToPath {
                    key: "Corefile".into(),
                    path: "Corefile".into(),
                    mode: None,
                }]),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        }]),
        ..PodSpec::default()
    }
}

/// The CoreDNS container.
fn container(cluster: &Cluster) -> Container {
    let quantity = |q: &str| Quantity(q.to_owned());
    Container {
        name: COREDNS.into(),
        image: Some(images::coredns(cluster)),
        image_pull_policy: Some("IfNotPresent".into()),
        resources: Some(ResourceRequirements {
            limits: Some([("memory".to_owned(), quantity("170Mi"))].into()),
            requests: Some(
                [
                    ("cpu".to_owned(), quantity("100m")),
                    ("memory".to_owned(), quantity("70Mi")),
                ]
                .into(),
            ),
            ..ResourceRequirements::default()
        }),
        args: Some(vec!["-conf".into(), format!("{CONFIG_DIR}/Corefile")]),
        volume_mounts: Some(vec![VolumeMount {
            name: "config-volume".into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ports: Some(vec![
            container_port("dns", 53, "UDP"),
            container_port("dns-tcp", 53, "TCP"),
            container_port("metrics", 9153, "TCP"),
            container_port("liveness-probe", 8080, "TCP"),
            container_port("readiness-probe", 8181, "TCP"),
        ]),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(60),
            timeout_seconds: Some(5),
            success_threshold: Some(1),
            failure_threshold: Some(5),
            ..http_probe("/health", "liveness-probe")
        }),
        readiness_probe: Some(http_probe("/ready", "readiness-probe")),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                add: Some(strings(&["NET_BIND_SERVICE"])),
                drop: Some(strings(&["ALL"])),
            }),
            read_only_root_filesystem: Some(true),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

/// An HTTP probe of `path` on the named container port.
fn http_probe(path: &str, port: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(port.into()),
            scheme: Some("HTTP".into()),
            ..HTTPGetAction::default()
        }),
        ..Probe::default()
    }
}

/// A named container port.
fn container_port(name: &str, port: i32, protocol: &str) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some(protocol.into()),
        ..ContainerPort::default()
    }
}

/// A named Service port to the same container port.
fn service_port(name: &str, port: i32, protocol: &str) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        protocol: Some(protocol.into()),
        target_port: Some(IntOrString::Int(port)),
        ..ServicePort::default()
    }
}
