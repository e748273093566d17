//! kubeadm's `control-plane` phase: the static pods of kube-apiserver,
//! kube-controller-manager and kube-scheduler, typed through k8s-openapi, and the API
//! server's encryption-at-rest config.
//!
//! The pods are what kubeadm writes (cmd/kubeadm/app/phases/controlplane/manifests.go,
//! volumes.go and cmd/kubeadm/app/util/staticpod/utils.go): namespace `kube-system`,
//! labels `component` and `tier: control-plane`, host network, priority
//! `system-node-critical`, the runtime's default seccomp profile, kubeadm's probes,
//! CPU requests and hostPath volumes, images from the configured registry.
//!
//! Each component's flags are kubeadm's defaults for a stacked etcd over TLS on the
//! node itself, merged with Keelson's additions the way kubeadm merges `extraArgs`
//! (an addition replaces a default of the same name; the result sorted by name, as
//! kubeadm's `ArgumentsToCommand` sorts it). kubeadm gives the same flags to these
//! three components on release-1.31 to release-1.34: no flag differs between the
//! supported minors. Keelson's additions:
//! - kube-apiserver: `--encryption-provider-config` when `cluster.secrets.encryption_key`
//!   is set;
//! - kube-controller-manager: `--flex-volume-plugin-dir` on EPHEMERAL
//!   ([`paths::VOLUME_PLUGIN_DIR`]), because kubeadm's default directory under `/usr` is
//!   on Keelson's read-only root, where the kubelet cannot create the hostPath kubeadm
//!   mounts there (kubeadm then mounts the directory the flag names, as here).
//!
//! The hostPath volumes are those kubeadm mounts on a host without the optional CA
//! directories (`/etc/pki/ca-trust`, `/usr/share/ca-certificates`, ...), which a Keelson
//! root does not have. The encryption config lives in the certificates directory
//! ([`paths::ENCRYPTION_CONFIG`]), which the API server already mounts (`k8s-certs`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{
    Container, HTTPGetAction, HostPathVolumeSource, Pod, PodSecurityContext, PodSpec, Probe,
    ResourceRequirements, SeccompProfile, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use keelson_configs::MachineConfig;
use keelson_configs::layout::ETCD_CLIENT_PORT;
use keelson_configs::schema::MachineType;

use crate::{KubeError, NodeFacts, NodeFile, images, paths};

/// The port the API server listens on (kubeadm's default `bindPort`).
pub const API_SERVER_PORT: u16 = 6443;
/// kube-controller-manager's secure port (kubeadm's `KubeControllerManagerPort`).
pub const CONTROLLER_MANAGER_PORT: u16 = 10257;
/// kube-scheduler's secure port (kubeadm's `KubeSchedulerPort`).
pub const SCHEDULER_PORT: u16 = 10259;

/// kubeadm's `ControlPlaneComponentHealthCheckTimeout` (4 min), which sizes the startup
/// probes: one check every 10 s, so 24 failures.
const STARTUP_FAILURE_THRESHOLD: i32 = 24;
/// The priority of the `system-node-critical` class, which kubeadm writes with it.
const SYSTEM_NODE_CRITICAL: i32 = 2_000_001_000;
/// kubeadm's annotation of the API server pod with its advertised endpoint.
const ADVERTISE_ADDRESS_ANNOTATION: &str =
    "kubeadm.kubernetes.io/kube-apiserver.advertise-address.endpoint";
/// The system CA bundle directory kubeadm mounts into the API server and the controller
/// manager.
const CA_CERTS_DIR: &str = "/etc/ssl/certs";

/// A control-plane component kubeadm runs as a static pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    /// kube-apiserver.
    ApiServer,
    /// kube-controller-manager.
    ControllerManager,
    /// kube-scheduler.
    Scheduler,
}

impl Component {
    /// Every component, in the order kubeadm writes them.
    pub const ALL: [Component; 3] = [
        Component::ApiServer,
        Component::ControllerManager,
        Component::Scheduler,
    ];

    /// The component's name: its binary, image, container, pod and manifest file name.
    pub fn name(self) -> &'static str {
        match self {
            Component::ApiServer => "kube-apiserver",
            Component::ControllerManager => "kube-controller-manager",
            Component::Scheduler => "kube-scheduler",
        }
    }

    /// Its CPU request (kubeadm's `ComponentResources`).
    fn cpu_request(self) -> &'static str {
        match self {
            Component::ApiServer => "250m",
            Component::ControllerManager => "200m",
            Component::Scheduler => "100m",
        }
    }

    /// Its static pod manifest's path.
    pub fn manifest_path(self) -> String {
        format!("{}/{}.yaml", paths::MANIFESTS_DIR, self.name())
    }
}

/// The component's flags, as `(name, value)` without the leading dashes, in kubeadm's
/// order (sorted by name): kubeadm's defaults for `cluster.kubernetes_version` with
/// Keelson's additions (see the module's documentation).
pub fn flags(
    component: Component,
    config: &MachineConfig,
    facts: &NodeFacts,
) -> Vec<(String, String)> {
    arguments_to_command(
        kubeadm_defaults(component, config, facts),
        keelson_additions(component, config),
    )
}

/// The container's command: the binary, then `--name=value` for each of [`flags`].
pub fn command(component: Component, config: &MachineConfig, facts: &NodeFacts) -> Vec<String> {
    std::iter::once(component.name().to_string())
        .chain(
            flags(component, config, facts)
                .into_iter()
                .map(|(name, value)| format!("--{name}={value}")),
        )
        .collect()
}

/// kubeadm's defaults for the component, in the order kubeadm builds them (its
/// `getAPIServerCommand`, `getControllerManagerCommand` and `getSchedulerCommand`) for a
/// local etcd, the config's networks and the node's advertise address. The same on every
/// supported minor (1.31 to 1.34).
pub fn kubeadm_defaults(
    component: Component,
    config: &MachineConfig,
    facts: &NodeFacts,
) -> Vec<(String, String)> {
    let pki = |file: &str| format!("{}/{file}", paths::PKI_DIR);
    let cluster = &config.cluster;
    let service_subnets = join(&cluster.service_subnets);
    let pairs: Vec<(&str, String)> = match component {
        Component::ApiServer => {
            // kubeadm's local etcd is on the loopback of the advertise address's family.
            let etcd_host: IpAddr = match facts.node_ip {
                IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            };
            let etcd = SocketAddr::new(etcd_host, ETCD_CLIENT_PORT);
            vec![
                ("advertise-address", facts.node_ip.to_string()),
                ("enable-admission-plugins", "NodeRestriction".into()),
                ("service-cluster-ip-range", service_subnets),
                ("service-account-key-file", pki("sa.pub")),
                ("service-account-signing-key-file", pki("sa.key")),
                (
                    "service-account-issuer",
                    format!("https://kubernetes.default.svc.{}", cluster.dns_domain),
                ),
                ("client-ca-file", pki("ca.crt")),
                ("tls-cert-file", pki("apiserver.crt")),
                ("tls-private-key-file", pki("apiserver.key")),
                (
                    "kubelet-client-certificate",
                    pki("apiserver-kubelet-client.crt"),
                ),
                ("kubelet-client-key", pki("apiserver-kubelet-client.key")),
                ("enable-bootstrap-token-auth", "true".into()),
                ("secure-port", API_SERVER_PORT.to_string()),
                ("allow-privileged", "true".into()),
                (
                    "kubelet-preferred-address-types",
                    "InternalIP,ExternalIP,Hostname".into(),
                ),
                ("requestheader-username-headers", "X-Remote-User".into()),
                ("requestheader-group-headers", "X-Remote-Group".into()),
                (
                    "requestheader-extra-headers-prefix",
                    "X-Remote-Extra-".into(),
                ),
                ("requestheader-client-ca-file", pki("front-proxy-ca.crt")),
                ("requestheader-allowed-names", "front-proxy-client".into()),
                ("proxy-client-cert-file", pki("front-proxy-client.crt")),
                ("proxy-client-key-file", pki("front-proxy-client.key")),
                ("etcd-servers", format!("https://{etcd}")),
                ("etcd-cafile", pki("etcd/ca.crt")),
                ("etcd-certfile", pki("apiserver-etcd-client.crt")),
                ("etcd-keyfile", pki("apiserver-etcd-client.key")),
                ("authorization-mode", "Node,RBAC".into()),
            ]
        }
        Component::ControllerManager => {
            let kubeconfig = paths::CONTROLLER_MANAGER_CONF.to_string();
            let mut pairs = vec![
                ("bind-address", "127.0.0.1".to_string()),
                ("leader-elect", "true".into()),
                ("kubeconfig", kubeconfig.clone()),
                ("authentication-kubeconfig", kubeconfig.clone()),
                ("authorization-kubeconfig", kubeconfig),
                ("client-ca-file", pki("ca.crt")),
                ("requestheader-client-ca-file", pki("front-proxy-ca.crt")),
                ("root-ca-file", pki("ca.crt")),
                ("service-account-private-key-file", pki("sa.key")),
                ("cluster-signing-cert-file", pki("ca.crt")),
                ("cluster-signing-key-file", pki("ca.key")),
                ("use-service-account-credentials", "true".into()),
                ("controllers", "*,bootstrapsigner,tokencleaner".into()),
            ];
            // kubeadm lets the controller manager allocate node CIDRs when a pod subnet
            // is set (a Keelson config always has one).
            if !cluster.pod_subnets.is_empty() {
                pairs.push(("allocate-node-cidrs", "true".into()));
                pairs.push(("cluster-cidr", join(&cluster.pod_subnets)));
                if !cluster.service_subnets.is_empty() {
                    pairs.push(("service-cluster-ip-range", service_subnets));
                }
            }
            pairs.push(("cluster-name", cluster.name.clone()));
            pairs
        }
        Component::Scheduler => {
            let kubeconfig = paths::SCHEDULER_CONF.to_string();
            vec![
                ("bind-address", "127.0.0.1".to_string()),
                ("leader-elect", "true".into()),
                ("kubeconfig", kubeconfig.clone()),
                ("authentication-kubeconfig", kubeconfig.clone()),
                ("authorization-kubeconfig", kubeconfig),
            ]
        }
    };
    pairs
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect()
}

/// What Keelson adds to kubeadm's defaults, as kubeadm's `extraArgs` would.
fn keelson_additions(component: Component, config: &MachineConfig) -> Vec<(String, String)> {
    match component {
        Component::ApiServer if config.cluster.secrets.encryption_key.is_some() => vec![(
            "encryption-provider-config".into(),
            paths::ENCRYPTION_CONFIG.into(),
        )],
        Component::ControllerManager => vec![(
            "flex-volume-plugin-dir".into(),
            paths::VOLUME_PLUGIN_DIR.into(),
        )],
        _ => Vec::new(),
    }
}

/// kubeadm's `ArgumentsToCommand`: the overrides, then every base argument whose name no
/// override has, sorted by name (then value).
fn arguments_to_command(
    base: Vec<(String, String)>,
    overrides: Vec<(String, String)>,
) -> Vec<(String, String)> {
    let mut args = overrides;
    let base = base
        .into_iter()
        .filter(|(name, _)| !args.iter().any(|(n, _)| n == name))
        .collect::<Vec<_>>();
    args.extend(base);
    args.sort();
    args
}

fn join(subnets: &[ipnet::IpNet]) -> String {
    subnets
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The three static pod manifests (YAML, mode 0600, in [`paths::MANIFESTS_DIR`]) of a
/// control plane; none on a worker.
pub fn static_pods(config: &MachineConfig, facts: &NodeFacts) -> Result<Vec<NodeFile>, KubeError> {
    if config.machine.kind != MachineType::ControlPlane {
        return Ok(Vec::new());
    }
    Component::ALL
        .iter()
        .map(|&component| {
            let pod = pod(component, config, facts);
            let yaml = yaml_serde::to_string(&pod).map_err(|err| KubeError::Serialize {
                what: component.manifest_path(),
                message: err.to_string(),
            })?;
            Ok(NodeFile {
                path: component.manifest_path().into(),
                content: yaml.into_bytes(),
                mode: 0o600,
            })
        })
        .collect()
}

/// The component's static pod, as kubeadm's `GetStaticPodSpecs` builds it.
pub fn pod(component: Component, config: &MachineConfig, facts: &NodeFacts) -> Pod {
    let name = component.name();
    let cluster = &config.cluster;
    let mounts = host_path_mounts(component);
    let (liveness, readiness, startup) = probes(component, facts);
    let container = Container {
        name: name.into(),
        image: Some(images::kubernetes_component(cluster, name)),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(command(component, config, facts)),
        liveness_probe: Some(liveness),
        readiness_probe: readiness,
        startup_probe: Some(startup),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([(
                "cpu".to_string(),
                Quantity(component.cpu_request().into()),
            )])),
            ..Default::default()
        }),
        volume_mounts: Some(
            mounts
                .iter()
                .map(|m| VolumeMount {
                    name: m.name.into(),
                    mount_path: m.path.clone(),
                    read_only: Some(m.read_only),
                    ..Default::default()
                })
                .collect(),
        ),
        ..Default::default()
    };
    let annotations = (component == Component::ApiServer).then(|| {
        let endpoint = SocketAddr::new(facts.node_ip, API_SERVER_PORT);
        BTreeMap::from([(
            ADVERTISE_ADDRESS_ANNOTATION.to_string(),
            endpoint.to_string(),
        )])
    });
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("kube-system".into()),
            labels: Some(BTreeMap::from([
                ("component".to_string(), name.to_string()),
                ("tier".to_string(), "control-plane".to_string()),
            ])),
            annotations,
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![container],
            priority: Some(SYSTEM_NODE_CRITICAL),
            priority_class_name: Some("system-node-critical".into()),
            host_network: Some(true),
            security_context: Some(PodSecurityContext {
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            volumes: Some(
                mounts
                    .iter()
                    .map(|m| Volume {
                        name: m.name.into(),
                        host_path: Some(HostPathVolumeSource {
                            path: m.path.clone(),
                            type_: Some(m.kind.into()),
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        status: None,
    }
}

/// One hostPath volume and its mount at the same path.
struct HostPathMount {
    name: &'static str,
    path: String,
    kind: &'static str,
    read_only: bool,
}

/// kubeadm's hostPath mounts of the component (volumes.go), sorted by name as kubeadm
/// sorts them.
fn host_path_mounts(component: Component) -> Vec<HostPathMount> {
    let dir = "DirectoryOrCreate";
    let file = "FileOrCreate";
    let mount = |name, path: &str, kind, read_only| HostPathMount {
        name,
        path: path.to_string(),
        kind,
        read_only,
    };
    let mut mounts = match component {
        Component::ApiServer => vec![
            mount("k8s-certs", paths::PKI_DIR, dir, true),
            mount("ca-certs", CA_CERTS_DIR, dir, true),
        ],
        Component::ControllerManager => vec![
            mount("k8s-certs", paths::PKI_DIR, dir, true),
            mount("ca-certs", CA_CERTS_DIR, dir, true),
            mount("kubeconfig", paths::CONTROLLER_MANAGER_CONF, file, true),
            // FlexVolume drivers talk over sockets here: never read-only (kubeadm).
            mount("flexvolume-dir", paths::VOLUME_PLUGIN_DIR, dir, false),
        ],
        Component::Scheduler => vec![mount("kubeconfig", paths::SCHEDULER_CONF, file, true)],
    };
    mounts.sort_by_key(|m| m.name);
    mounts
}

/// kubeadm's liveness, readiness (API server only) and startup probes: the API server's
/// `/livez` and `/readyz` on its advertise address, the others' `/healthz` on 127.0.0.1,
/// all over HTTPS.
fn probes(component: Component, facts: &NodeFacts) -> (Probe, Option<Probe>, Probe) {
    let probe = |host: &str, path: &str, port: u16, initial, failures, period| Probe {
        http_get: Some(HTTPGetAction {
            host: Some(host.into()),
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(port)),
            scheme: Some("HTTPS".into()),
            ..Default::default()
        }),
        initial_delay_seconds: Some(initial),
        timeout_seconds: Some(15),
        failure_threshold: Some(failures),
        period_seconds: Some(period),
        ..Default::default()
    };
    let (host, port, live, ready) = match component {
        Component::ApiServer => (facts.node_ip.to_string(), API_SERVER_PORT, "/livez", true),
        Component::ControllerManager => (
            "127.0.0.1".into(),
            CONTROLLER_MANAGER_PORT,
            "/healthz",
            false,
        ),
        Component::Scheduler => ("127.0.0.1".into(), SCHEDULER_PORT, "/healthz", false),
    };
    (
        probe(&host, live, port, 10, 8, 10),
        ready.then(|| probe(&host, "/readyz", port, 0, 3, 1)),
        probe(&host, live, port, 10, STARTUP_FAILURE_THRESHOLD, 10),
    )
}

/// The API server's encryption-at-rest config (`apiserver.config.k8s.io/v1`
/// `EncryptionConfiguration`, mode 0600 at [`paths::ENCRYPTION_CONFIG`]): Secrets
/// encrypted with AES-CBC under `cluster.secrets.encryption_key` (named `key1`), read
/// back unencrypted only if they were written so (`identity` second). None without a key.
pub fn encryption_config(config: &MachineConfig) -> Result<Option<NodeFile>, KubeError> {
    let Some(key) = &config.cluster.secrets.encryption_key else {
        return Ok(None);
    };
    let document = serde_json::json!({
        "apiVersion": "apiserver.config.k8s.io/v1",
        "kind": "EncryptionConfiguration",
        "resources": [{
            "resources": ["secrets"],
            "providers": [
                { "aescbc": { "keys": [{ "name": "key1", "secret": key.to_string() }] } },
                { "identity": {} },
            ],
        }],
    });
    let yaml = yaml_serde::to_string(&document).map_err(|err| KubeError::Serialize {
        what: paths::ENCRYPTION_CONFIG.into(),
        message: err.to_string(),
    })?;
    Ok(Some(NodeFile {
        path: paths::ENCRYPTION_CONFIG.into(),
        content: yaml.into_bytes(),
        mode: 0o600,
    }))
}

/// The test configs of keelson-configs and the node facts that go with them.
#[cfg(test)]
pub(crate) mod fixtures {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use keelson_configs::layout::Arch;
    use keelson_configs::{MachineConfig, Mode, check_str};

    use crate::NodeFacts;

    /// configs/tests/data/controlplane.toml: cp-1, Kubernetes 1.34.1, 10.5.0.2.
    pub(crate) fn control_plane_config() -> MachineConfig {
        let text = include_str!("../../../configs/tests/data/controlplane.toml");
        check_str(text, "controlplane.toml", Mode::Metal)
            .into_result()
            .unwrap()
    }

    /// configs/tests/data/worker.toml: Kubernetes 1.31.0.
    pub(crate) fn worker_config() -> MachineConfig {
        let text = include_str!("../../../configs/tests/data/worker.toml");
        check_str(text, "worker.toml", Mode::Metal)
            .into_result()
            .unwrap()
    }

    /// cp-1 at 10.5.0.2 and fd00::2, advertising 10.5.0.2.
    pub(crate) fn facts() -> NodeFacts {
        NodeFacts {
            node_name: "cp-1".into(),
            addresses: vec!["10.5.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
            node_ip: "10.5.0.2".parse().unwrap(),
            arch: Arch::Amd64,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::fixtures::{control_plane_config, facts, worker_config};
    use super::*;

    // kubeadm's flags for the fixture (cp-1, advertise address 10.5.0.2, services
    // 10.96.0.0/12, pods 10.244.0.0/16, cluster.local, cluster "demo"), copied from
    // kubeadm's getAPIServerCommand, getControllerManagerCommand and getSchedulerCommand
    // (cmd/kubeadm/app/phases/controlplane/manifests.go) as kubeadm's ArgumentsToCommand
    // (cmd/kubeadm/app/util/arguments.go) orders them, for local etcd. The same on
    // release-1.31, release-1.32, release-1.33 and release-1.34; a v1.33.1 kubeadm's
    // kube-apiserver.yaml (kubernetes/website#51166) shows this list.
    const KUBEADM_API_SERVER: &[&str] = &[
        "--advertise-address=10.5.0.2",
        "--allow-privileged=true",
        "--authorization-mode=Node,RBAC",
        "--client-ca-file=/etc/kubernetes/pki/ca.crt",
        "--enable-admission-plugins=NodeRestriction",
        "--enable-bootstrap-token-auth=true",
        "--etcd-cafile=/etc/kubernetes/pki/etcd/ca.crt",
        "--etcd-certfile=/etc/kubernetes/pki/apiserver-etcd-client.crt",
        "--etcd-keyfile=/etc/kubernetes/pki/apiserver-etcd-client.key",
        "--etcd-servers=https://127.0.0.1:2379",
        "--kubelet-client-certificate=/etc/kubernetes/pki/apiserver-kubelet-client.crt",
        "--kubelet-client-key=/etc/kubernetes/pki/apiserver-kubelet-client.key",
        "--kubelet-preferred-address-types=InternalIP,ExternalIP,Hostname",
        "--proxy-client-cert-file=/etc/kubernetes/pki/front-proxy-client.crt",
        "--proxy-client-key-file=/etc/kubernetes/pki/front-proxy-client.key",
        "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-client-ca-file=/etc/kubernetes/pki/front-proxy-ca.crt",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-username-headers=X-Remote-User",
        "--secure-port=6443",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        "--service-account-key-file=/etc/kubernetes/pki/sa.pub",
        "--service-account-signing-key-file=/etc/kubernetes/pki/sa.key",
        "--service-cluster-ip-range=10.96.0.0/12",
        "--tls-cert-file=/etc/kubernetes/pki/apiserver.crt",
        "--tls-private-key-file=/etc/kubernetes/pki/apiserver.key",
    ];
    const KUBEADM_CONTROLLER_MANAGER: &[&str] = &[
        "--allocate-node-cidrs=true",
        "--authentication-kubeconfig=/etc/kubernetes/controller-manager.conf",
        "--authorization-kubeconfig=/etc/kubernetes/controller-manager.conf",
        "--bind-address=127.0.0.1",
        "--client-ca-file=/etc/kubernetes/pki/ca.crt",
        "--cluster-cidr=10.244.0.0/16",
        "--cluster-name=demo",
        "--cluster-signing-cert-file=/etc/kubernetes/pki/ca.crt",
        "--cluster-signing-key-file=/etc/kubernetes/pki/ca.key",
        "--controllers=*,bootstrapsigner,tokencleaner",
        "--kubeconfig=/etc/kubernetes/controller-manager.conf",
        "--leader-elect=true",
        "--requestheader-client-ca-file=/etc/kubernetes/pki/front-proxy-ca.crt",
        "--root-ca-file=/etc/kubernetes/pki/ca.crt",
        "--service-account-private-key-file=/etc/kubernetes/pki/sa.key",
        "--service-cluster-ip-range=10.96.0.0/12",
        "--use-service-account-credentials=true",
    ];
    const KUBEADM_SCHEDULER: &[&str] = &[
        "--authentication-kubeconfig=/etc/kubernetes/scheduler.conf",
        "--authorization-kubeconfig=/etc/kubernetes/scheduler.conf",
        "--bind-address=127.0.0.1",
        "--kubeconfig=/etc/kubernetes/scheduler.conf",
        "--leader-elect=true",
    ];

    fn rendered(pairs: Vec<(String, String)>) -> Vec<String> {
        let mut out: Vec<String> = pairs
            .into_iter()
            .map(|(n, v)| format!("--{n}={v}"))
            .collect();
        out.sort();
        out
    }

    /// `table` with `additions` put in their sorted places.
    fn with(table: &[&str], additions: &[&str]) -> Vec<String> {
        let mut out: Vec<String> = table
            .iter()
            .chain(additions)
            .map(|s| s.to_string())
            .collect();
        out.sort();
        out
    }

    #[test]
    fn kubeadm_defaults_match_kubeadm_on_every_supported_minor() {
        let tables = [
            (Component::ApiServer, KUBEADM_API_SERVER),
            (Component::ControllerManager, KUBEADM_CONTROLLER_MANAGER),
            (Component::Scheduler, KUBEADM_SCHEDULER),
        ];
        for minor in 31..=34 {
            let mut config = control_plane_config();
            config.cluster.kubernetes_version.minor = minor;
            for (component, table) in tables {
                assert_eq!(
                    rendered(kubeadm_defaults(component, &config, &facts())),
                    with(table, &[]),
                    "{} on 1.{minor}",
                    component.name()
                );
            }
        }
    }

    #[test]
    fn flags_are_kubeadm_s_with_keelson_s_additions_in_kubeadm_s_order() {
        let config = control_plane_config();
        let command = |c| command(c, &config, &facts());
        let cases = [
            (
                Component::ApiServer,
                with(
                    KUBEADM_API_SERVER,
                    &["--encryption-provider-config=/etc/kubernetes/pki/encryption-config.yaml"],
                ),
            ),
            (
                Component::ControllerManager,
                with(
                    KUBEADM_CONTROLLER_MANAGER,
                    &["--flex-volume-plugin-dir=/var/lib/kubelet/volumeplugins"],
                ),
            ),
            (Component::Scheduler, with(KUBEADM_SCHEDULER, &[])),
        ];
        for (component, expected) in cases {
            let actual = command(component);
            assert_eq!(actual[0], component.name());
            // Not re-sorted here: the order is the function's own.
            assert_eq!(actual[1..], expected[..], "{}", component.name());
        }
    }

    #[test]
    fn no_encryption_flag_without_a_key_and_dual_stack_networks_joined() {
        let mut config = control_plane_config();
        config.cluster.secrets.encryption_key = None;
        config.cluster.service_subnets = vec![
            "10.96.0.0/12".parse().unwrap(),
            "fd00:10:96::/112".parse().unwrap(),
        ];
        config.cluster.pod_subnets = vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:10:244::/56".parse().unwrap(),
        ];
        let api = flags(Component::ApiServer, &config, &facts());
        assert!(!api.iter().any(|(n, _)| n == "encryption-provider-config"));
        let get = |flags: &[(String, String)], name: &str| {
            flags
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            get(&api, "service-cluster-ip-range").as_deref(),
            Some("10.96.0.0/12,fd00:10:96::/112")
        );
        let cm = flags(Component::ControllerManager, &config, &facts());
        assert_eq!(
            get(&cm, "cluster-cidr").as_deref(),
            Some("10.244.0.0/16,fd00:10:244::/56")
        );
        assert_eq!(
            get(&cm, "service-cluster-ip-range").as_deref(),
            Some("10.96.0.0/12,fd00:10:96::/112")
        );
        // An IPv6 advertise address: etcd on ::1 and the annotation in brackets.
        let mut v6 = facts();
        v6.node_ip = "fd00::2".parse().unwrap();
        let api = flags(Component::ApiServer, &config, &v6);
        assert_eq!(
            get(&api, "etcd-servers").as_deref(),
            Some("https://[::1]:2379")
        );
        let pod = pod(Component::ApiServer, &config, &v6);
        assert_eq!(
            pod.metadata.annotations.unwrap()[ADVERTISE_ADDRESS_ANNOTATION],
            "[fd00::2]:6443"
        );
    }

    #[test]
    fn static_pods_parse_back_as_pods_as_kubeadm_writes_them() {
        let config = control_plane_config();
        let files = static_pods(&config, &facts()).unwrap();
        let names: Vec<String> = files.iter().map(|f| f.path.display().to_string()).collect();
        assert_eq!(
            names,
            [
                "/etc/kubernetes/manifests/kube-apiserver.yaml",
                "/etc/kubernetes/manifests/kube-controller-manager.yaml",
                "/etc/kubernetes/manifests/kube-scheduler.yaml",
            ]
        );
        // (component, cpu, volumes as name:path:type:read-only, probe host and port)
        let cases = [
            (
                Component::ApiServer,
                "250m",
                vec![
                    "ca-certs:/etc/ssl/certs:DirectoryOrCreate:true",
                    "k8s-certs:/etc/kubernetes/pki:DirectoryOrCreate:true",
                ],
                "10.5.0.2",
                6443,
            ),
            (
                Component::ControllerManager,
                "200m",
                vec![
                    "ca-certs:/etc/ssl/certs:DirectoryOrCreate:true",
                    "flexvolume-dir:/var/lib/kubelet/volumeplugins:DirectoryOrCreate:false",
                    "k8s-certs:/etc/kubernetes/pki:DirectoryOrCreate:true",
                    "kubeconfig:/etc/kubernetes/controller-manager.conf:FileOrCreate:true",
                ],
                "127.0.0.1",
                10257,
            ),
            (
                Component::Scheduler,
                "100m",
                vec!["kubeconfig:/etc/kubernetes/scheduler.conf:FileOrCreate:true"],
                "127.0.0.1",
                10259,
            ),
        ];
        for (file, (component, cpu, volumes, host, port)) in files.iter().zip(cases) {
            assert_eq!(file.mode, 0o600);
            let text = std::str::from_utf8(&file.content).unwrap();
            assert!(text.starts_with("apiVersion: v1\nkind: Pod\n"), "{text}");
            let pod: Pod = yaml_serde::from_str(text).unwrap();
            assert_eq!(pod, super::pod(component, &config, &facts()));
            let meta = &pod.metadata;
            assert_eq!(meta.name.as_deref(), Some(component.name()));
            assert_eq!(meta.namespace.as_deref(), Some("kube-system"));
            let labels = meta.labels.clone().unwrap();
            assert_eq!(labels["component"], component.name());
            assert_eq!(labels["tier"], "control-plane");
            let spec = pod.spec.unwrap();
            assert_eq!(spec.host_network, Some(true));
            assert_eq!(
                spec.priority_class_name.as_deref(),
                Some("system-node-critical")
            );
            assert_eq!(spec.priority, Some(2_000_001_000));
            assert_eq!(
                spec.security_context
                    .unwrap()
                    .seccomp_profile
                    .unwrap()
                    .type_,
                "RuntimeDefault"
            );
            let container = &spec.containers[0];
            assert_eq!(
                container.image.as_deref(),
                Some(format!("registry.k8s.io/{}:v1.34.1", component.name()).as_str())
            );
            assert_eq!(
                container
                    .resources
                    .as_ref()
                    .unwrap()
                    .requests
                    .as_ref()
                    .unwrap()["cpu"]
                    .0,
                cpu
            );
            let vols: Vec<String> = spec
                .volumes
                .unwrap()
                .iter()
                .map(|v| {
                    let hp = v.host_path.as_ref().unwrap();
                    let ro = container
                        .volume_mounts
                        .as_ref()
                        .unwrap()
                        .iter()
                        .find(|m| m.name == v.name && m.mount_path == hp.path)
                        .unwrap()
                        .read_only
                        .unwrap();
                    format!(
                        "{}:{}:{}:{ro}",
                        v.name,
                        hp.path,
                        hp.type_.as_deref().unwrap()
                    )
                })
                .collect();
            assert_eq!(vols, volumes, "{}", component.name());
            let live = container.liveness_probe.as_ref().unwrap();
            let startup = container.startup_probe.as_ref().unwrap();
            for probe in [live, startup] {
                let get = probe.http_get.as_ref().unwrap();
                assert_eq!(get.host.as_deref(), Some(host));
                assert_eq!(get.port, IntOrString::Int(port));
                assert_eq!(get.scheme.as_deref(), Some("HTTPS"));
            }
            assert_eq!(startup.failure_threshold, Some(24));
            assert_eq!(live.failure_threshold, Some(8));
            let ready = container.readiness_probe.as_ref();
            if component == Component::ApiServer {
                let get = live.http_get.as_ref().unwrap();
                assert_eq!(get.path.as_deref(), Some("/livez"));
                let ready = ready.unwrap().http_get.as_ref().unwrap();
                assert_eq!(ready.path.as_deref(), Some("/readyz"));
                assert_eq!(
                    meta.annotations.as_ref().unwrap()[ADVERTISE_ADDRESS_ANNOTATION],
                    "10.5.0.2:6443"
                );
            } else {
                assert!(ready.is_none());
                let get = live.http_get.as_ref().unwrap();
                assert_eq!(get.path.as_deref(), Some("/healthz"));
                assert!(meta.annotations.is_none());
            }
        }
    }

    #[test]
    fn a_mirror_names_the_control_plane_images_and_workers_get_no_pods() {
        let mut config = control_plane_config();
        config.cluster.image_repository = Some("10.5.0.1:5000/k8s".into());
        config.cluster.kubernetes_version.minor = 32;
        let pod = pod(Component::Scheduler, &config, &facts());
        assert_eq!(
            pod.spec.unwrap().containers[0].image.as_deref(),
            Some("10.5.0.1:5000/k8s/kube-scheduler:v1.32.1")
        );
        assert!(static_pods(&worker_config(), &facts()).unwrap().is_empty());
    }

    #[test]
    fn encryption_config_encrypts_secrets_with_the_config_s_key() {
        let config = control_plane_config();
        let file = encryption_config(&config).unwrap().unwrap();
        assert_eq!(
            file.path.to_str(),
            Some("/etc/kubernetes/pki/encryption-config.yaml")
        );
        assert_eq!(file.mode, 0o600);
        let doc: serde_json::Value =
            yaml_serde::from_str(std::str::from_utf8(&file.content).unwrap()).unwrap();
        let expected = serde_json::json!({
            "apiVersion": "apiserver.config.k8s.io/v1",
            "kind": "EncryptionConfiguration",
            "resources": [{
                "resources": ["secrets"],
                "providers": [
                    { "aescbc": { "keys": [{
                        "name": "key1",
                        "secret": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
                    }] } },
                    { "identity": {} },
                ],
            }],
        });
        assert_eq!(doc, expected);
        // The API server reads it through its k8s-certs mount.
        assert!(paths::ENCRYPTION_CONFIG.starts_with(&format!("{}/", paths::PKI_DIR)));
        assert!(
            host_path_mounts(Component::ApiServer)
                .iter()
                .any(|m| m.path == paths::PKI_DIR)
        );

        let mut config = config;
        config.cluster.secrets.encryption_key = None;
        assert!(encryption_config(&config).unwrap().is_none());
    }
}
