//! Tests of the bootstrap manifests: each object is a valid object of its kind (decoded by
//! k8s-openapi from the JSON and from the YAML files, unchanged by the round trip), and
//! carries what kubeadm gives it.

use std::net::IpAddr;

use base64::Engine as _;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use keelson_configs::{MachineConfig, Mode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::*;

pub(super) fn config() -> MachineConfig {
    let text = include_str!("../../../../configs/tests/data/controlplane.toml");
    let checked = keelson_configs::check_str(text, "controlplane.toml", Mode::Metal);
    checked.config.expect("the fixture is valid")
}

pub(super) fn facts() -> NodeFacts {
    NodeFacts {
        node_name: "cp-1".into(),
        addresses: vec!["10.5.0.2".parse().unwrap()],
        node_ip: "10.5.0.2".parse().unwrap(),
        arch: keelson_configs::layout::Arch::Amd64,
    }
}

fn rendered() -> Vec<Value> {
    render(&config(), &facts()).expect("render")
}

/// The object of `kind` named `name` (the first, in apply order), and its index.
fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> (usize, &'a Value) {
    objects
        .iter()
        .enumerate()
        .find(|(_, o)| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} among the objects"))
}

/// Decodes `value` as `K` (from `yaml`, the text of its file, when given) and serializes
/// it back: the round trip must give `value` again (no field unknown to `K`, `apiVersion`
/// and `kind` right).
fn round_trip<K: DeserializeOwned + Serialize>(
    value: &Value,
    yaml: Option<&[u8]>,
) -> Result<(), String> {
    let typed: K = match yaml {
        Some(text) => yaml_serde::from_slice(text).map_err(|e| e.to_string())?,
        None => serde_json::from_value(value.clone()).map_err(|e| e.to_string())?,
    };
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    if &back == value {
        Ok(())
    } else {
        Err(format!("changed by its round trip: {back} != {value}"))
    }
}

/// Decodes `value` (or `yaml`, its file) as the k8s-openapi type of its kind.
fn decode(value: &Value, yaml: Option<&[u8]>) -> Result<(), String> {
    match value["kind"].as_str().unwrap_or_default() {
        "Secret" => round_trip::<Secret>(value, yaml),
        "ConfigMap" => round_trip::<ConfigMap>(value, yaml),
        "ServiceAccount" => round_trip::<ServiceAccount>(value, yaml),
        "Service" => round_trip::<Service>(value, yaml),
        "Node" => round_trip::<Node>(value, yaml),
        "Deployment" => round_trip::<Deployment>(value, yaml),
        "DaemonSet" => round_trip::<DaemonSet>(value, yaml),
        "ClusterRole" => round_trip::<ClusterRole>(value, yaml),
        "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(value, yaml),
        "Role" => round_trip::<Role>(value, yaml),
        "RoleBinding" => round_trip::<RoleBinding>(value, yaml),
        other => Err(format!("unexpected kind {other:?}")),
    }
}

#[test]
fn every_object_decodes_as_its_kind_from_json_and_from_its_file() {
    let objects = rendered();
    assert_eq!(objects.len(), 23);
    for object in &objects {
        decode(object, None).unwrap_or_else(|e| panic!("{}: {e}", ObjectId::of(object).unwrap()));
    }
    // What would not be its kind's object is caught: a field its type lacks, a wrong kind.
    let mut misspelled = objects[0].clone();
    misspelled["stringdata"] = serde_json::json!({});
    assert!(decode(&misspelled, None).is_err());
    let mut wrong_kind = objects[0].clone();
    wrong_kind["apiVersion"] = "apps/v1".into();
    assert!(decode(&wrong_kind, None).is_err());

    let files = files(&objects).expect("files");
    assert_eq!(files.len(), objects.len());
    for (file, object) in files.iter().zip(&objects) {
        decode(object, Some(&file.content))
            .unwrap_or_else(|e| panic!("{}: {e}", file.path.display()));
    }
}

#[test]
fn files_are_numbered_in_apply_order_named_by_kind_namespace_and_name_and_private() {
    let files = files(&rendered()).expect("files");
    let names: Vec<String> = files
        .iter()
        .map(|f| {
            assert_eq!(f.mode, 0o600, "{}", f.path.display());
            assert_eq!(f.path.parent(), Some(Path::new(paths::ADDONS_DIR)));
            f.path.file_name().unwrap().to_string_lossy().into_owned()
        })
        .collect();
    assert_eq!(
        names[0],
        "01-secret-kube-system-bootstrap-token-abcdef.yaml"
    );
    assert!(
        names.contains(&"08-configmap-kube-public-cluster-info.yaml".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"13-clusterrolebinding-system-coredns.yaml".to_owned()),
        "{names:?}"
    );
    assert_eq!(names[22], "23-node-cp-1.yaml");
    assert!(super::files(&[serde_json::json!({"kind": "ConfigMap"})]).is_err());
}

#[test]
fn the_token_secret_carries_the_configs_token_as_kubeadm_writes_it() {
    let objects = rendered();
    let (index, value) = find(&objects, "Secret", "bootstrap-token-abcdef");
    assert_eq!(index, 0, "the token comes first");
    let secret: Secret = serde_json::from_value(value.clone()).unwrap();
    assert_eq!(secret.metadata.namespace.as_deref(), Some("kube-system"));
    assert_eq!(
        secret.type_.as_deref(),
        Some("bootstrap.kubernetes.io/token")
    );
    let data = secret.data.unwrap();
    let field = |key: &str| String::from_utf8(data[key].0.clone()).unwrap();
    assert_eq!(field("token-id"), "abcdef");
    assert_eq!(field("token-secret"), "0123456789abcdef");
    assert_eq!(field("usage-bootstrap-authentication"), "true");
    assert_eq!(field("usage-bootstrap-signing"), "true");
    assert_eq!(
        field("auth-extra-groups"),
        "system:bootstrappers:kubeadm:default-node-token"
    );
    assert!(!field("description").is_empty());
    assert!(!data.contains_key("expiration"));
    // In JSON, the data is base64 as the API expects.
    assert_eq!(value["data"]["token-secret"], "MDEyMzQ1Njc4OWFiY2RlZg==");
}

#[test]
fn the_rbac_binds_what_tls_bootstrap_and_discovery_need() {
    let objects = rendered();
    let binding = |name: &str| -> ClusterRoleBinding {
        serde_json::from_value(find(&objects, "ClusterRoleBinding", name).1.clone()).unwrap()
    };
    let bootstrappers = "system:bootstrappers:kubeadm:default-node-token";
    for (name, role, subject) in [
        (
            "kubeadm:kubelet-bootstrap",
            "system:node-bootstrapper",
            bootstrappers,
        ),
        (
            "kubeadm:node-autoapprove-bootstrap",
            "system:certificates.k8s.io:certificatesigningrequests:nodeclient",
            bootstrappers,
        ),
        (
            "kubeadm:node-autoapprove-certificate-rotation",
            "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient",
            "system:nodes",
        ),
        ("kubeadm:get-nodes", "kubeadm:get-nodes", bootstrappers),
        (
            "kubeadm:cluster-admins",
            "cluster-admin",
            "kubeadm:cluster-admins",
        ),
    ] {
        let b = binding(name);
        assert_eq!(
            (b.role_ref.kind.as_str(), b.role_ref.name.as_str()),
            ("ClusterRole", role)
        );
        let subjects = b.subjects.unwrap();
        assert_eq!(subjects.len(), 1, "{name}");
        assert_eq!(
            (subjects[0].kind.as_str(), subjects[0].name.as_str()),
            ("Group", subject)
        );
    }
    let reader: RoleBinding = serde_json::from_value(
        find(
            &objects,
            "RoleBinding",
            "kubeadm:bootstrap-signer-clusterinfo",
        )
        .1
        .clone(),
    )
    .unwrap();
    assert_eq!(reader.metadata.namespace.as_deref(), Some("kube-public"));
    let subjects = reader.subjects.unwrap();
    assert_eq!(
        (subjects[0].kind.as_str(), subjects[0].name.as_str()),
        ("User", "system:anonymous")
    );
    let role: Role = serde_json::from_value(
        find(&objects, "Role", "kubeadm:bootstrap-signer-clusterinfo")
            .1
            .clone(),
    )
    .unwrap();
    let rule = &role.rules.unwrap()[0];
    assert_eq!(rule.verbs, ["get"]);
    assert_eq!(
        rule.resource_names.as_deref(),
        Some(&["cluster-info".to_owned()][..])
    );
}

#[test]
fn cluster_info_is_a_kubeconfig_with_the_endpoint_and_the_ca_and_no_user() {
    let config = config();
    let objects = render(&config, &facts()).unwrap();
    let map: ConfigMap =
        serde_json::from_value(find(&objects, "ConfigMap", "cluster-info").1.clone()).unwrap();
    assert_eq!(map.metadata.namespace.as_deref(), Some("kube-public"));
    let text = &map.data.unwrap()["kubeconfig"];
    let kubeconfig = kube::config::Kubeconfig::from_yaml(text).expect("a kubeconfig");
    assert!(kubeconfig.auth_infos.is_empty());
    let cluster = kubeconfig.clusters[0].cluster.clone().unwrap();
    assert_eq!(cluster.server.as_deref(), Some("https://10.5.0.2:6443"));
    let ca = base64::engine::general_purpose::STANDARD
        .decode(cluster.certificate_authority_data.unwrap())
        .unwrap();
    assert_eq!(
        ca,
        config
            .cluster
            .secrets
            .kubernetes_ca
            .cert
            .as_str()
            .as_bytes()
    );
}

/// One case of the cluster DNS address: the service subnet and the address, or `None`
/// when it is refused.
fn check_dns_ip(subnet: &str, expected: Option<&str>) {
    let mut config = config();
    config.cluster.service_subnets = vec![subnet.parse().unwrap()];
    let got = dns_service_ip(&config.cluster);
    match expected {
        Some(ip) => assert_eq!(got.unwrap(), ip.parse::<IpAddr>().unwrap(), "{subnet}"),
        None => {
            let err = got.unwrap_err().to_string();
            assert!(
                err.contains(subnet) && err.contains("larger subnet"),
                "{err}"
            );
        }
    }
}

#[test]
fn the_dns_address_is_the_tenth_of_the_first_service_subnet() {
    check_dns_ip("10.96.0.0/12", Some("10.96.0.10"));
    check_dns_ip("172.20.0.0/16", Some("172.20.0.10"));
    check_dns_ip("fd00:10:96::/108", Some("fd00:10:96::a"));
    check_dns_ip("10.0.0.0/28", Some("10.0.0.10"));
    check_dns_ip("10.0.0.0/29", None);

    let objects = rendered();
    let service: Service =
        serde_json::from_value(find(&objects, "Service", "kube-dns").1.clone()).unwrap();
    let spec = service.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
    assert_eq!(spec.selector.unwrap()["k8s-app"], "kube-dns");
    let ports: Vec<(i32, String)> = spec
        .ports
        .unwrap()
        .into_iter()
        .map(|p| (p.port, p.protocol.unwrap()))
        .collect();
    assert_eq!(
        ports,
        [(53, "UDP".into()), (53, "TCP".into()), (9153, "TCP".into())]
    );
}

#[test]
fn the_corefile_serves_the_cluster_domain_and_forwards_the_rest() {
    let mut config = config();
    config.cluster.dns_domain = "corp.example".into();
    let objects = render(&config, &facts()).unwrap();
    let map: ConfigMap =
        serde_json::from_value(find(&objects, "ConfigMap", "coredns").1.clone()).unwrap();
    let corefile = &map.data.unwrap()["Corefile"];
    assert!(
        corefile.contains("kubernetes corp.example in-addr.arpa ip6.arpa {"),
        "{corefile}"
    );
    assert!(
        corefile.contains("disable success corp.example"),
        "{corefile}"
    );
    for line in [
        "forward . /etc/resolv.conf {",
        "cache 30 {",
        "loop",
        "reload",
        "loadbalance",
        "health {",
        "ready",
        "prometheus :9153",
    ] {
        assert!(
            corefile.lines().any(|l| l.trim() == line),
            "{line} missing: {corefile}"
        );
    }
    assert!(!corefile.contains("cluster.local"), "{corefile}");
}

#[test]
fn coredns_runs_as_kubeadm_deploys_it() {
    let objects = rendered();
    let deployment: Deployment =
        serde_json::from_value(find(&objects, "Deployment", "coredns").1.clone()).unwrap();
    let spec = deployment.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    assert_eq!(spec.selector.match_labels.unwrap()["k8s-app"], "kube-dns");
    let pod = spec.template.spec.unwrap();
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-cluster-critical")
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("coredns"));
    assert!(pod.tolerations.unwrap().iter().any(|t| {
        t.key.as_deref() == Some("node-role.kubernetes.io/control-plane")
            && t.effect.as_deref() == Some("NoSchedule")
    }));
    let container = &pod.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("registry.k8s.io/coredns/coredns:v1.12.1")
    );
    assert!(
        container
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .is_some()
    );
    assert!(
        container
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .is_some()
    );
}

#[test]
fn kube_proxy_has_kubeadms_configuration_and_runs_privileged_on_the_host_network() {
    let objects = rendered();
    let map: ConfigMap =
        serde_json::from_value(find(&objects, "ConfigMap", "kube-proxy").1.clone()).unwrap();
    let data = map.data.unwrap();
    let config: Value = yaml_serde::from_str(&data["config.conf"]).unwrap();
    assert_eq!(config["kind"], "KubeProxyConfiguration");
    assert_eq!(config["apiVersion"], "kubeproxy.config.k8s.io/v1alpha1");
    assert_eq!(config["clusterCIDR"], "10.244.0.0/16");
    assert_eq!(config["mode"], "iptables");
    assert_eq!(config["bindAddress"], "0.0.0.0");
    assert_eq!(
        config["clientConnection"]["kubeconfig"],
        "/var/lib/kube-proxy/kubeconfig.conf"
    );
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&data["kubeconfig.conf"]).unwrap();
    let user = kubeconfig.auth_infos[0].auth_info.clone().unwrap();
    assert_eq!(
        user.token_file.as_deref(),
        Some("/var/run/secrets/kubernetes.io/serviceaccount/token")
    );
    let cluster = kubeconfig.clusters[0].cluster.clone().unwrap();
    assert_eq!(cluster.server.as_deref(), Some("https://10.5.0.2:6443"));

    let daemon_set: DaemonSet =
        serde_json::from_value(find(&objects, "DaemonSet", "kube-proxy").1.clone()).unwrap();
    let pod = daemon_set.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    let container = &pod.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("registry.k8s.io/kube-proxy:v1.34.1")
    );
    assert_eq!(
        container.security_context.as_ref().unwrap().privileged,
        Some(true)
    );
    let volumes: Vec<&str> = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(volumes, ["kube-proxy", "xtables-lock", "lib-modules"]);

    let binding: ClusterRoleBinding = serde_json::from_value(
        find(&objects, "ClusterRoleBinding", "kubeadm:node-proxier")
            .1
            .clone(),
    )
    .unwrap();
    assert_eq!(binding.role_ref.name, "system:node-proxier");
}

#[test]
fn dual_stack_pod_subnets_are_one_cluster_cidr_and_an_ipv6_node_binds_to_any() {
    let mut config = config();
    config.cluster.pod_subnets = vec![
        "10.244.0.0/16".parse().unwrap(),
        "fd00:244::/56".parse().unwrap(),
    ];
    let mut facts = facts();
    facts.node_ip = "fd00::2".parse().unwrap();
    let objects = render(&config, &facts).unwrap();
    let text = find(&objects, "ConfigMap", "kube-proxy").1["data"]["config.conf"]
        .as_str()
        .unwrap()
        .to_owned();
    let proxy: Value = yaml_serde::from_str(&text).unwrap();
    assert_eq!(proxy["clusterCIDR"], "10.244.0.0/16,fd00:244::/56");
    assert_eq!(proxy["bindAddress"], "::");
}

#[test]
fn the_node_is_marked_as_a_control_plane_and_nothing_else() {
    let objects = rendered();
    let (index, value) = find(&objects, "Node", "cp-1");
    assert_eq!(index, objects.len() - 1, "the node is marked last");
    assert_eq!(
        value,
        &serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": "cp-1",
                "labels": {
                    "node-role.kubernetes.io/control-plane": "",
                    "node.kubernetes.io/exclude-from-external-load-balancers": "",
                },
            },
            "spec": {
                "taints": [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}],
            },
        })
    );
}

/// What an object needs to exist before it: the roles bindings refer to, the service
/// accounts and ConfigMaps pods use, as (kind, namespace, name).
fn needs(object: &Value) -> Vec<(String, Option<String>, String)> {
    let namespace = object["metadata"]["namespace"].as_str().map(str::to_owned);
    let mut out = Vec::new();
    let role = &object["roleRef"];
    if let (Some(kind), Some(name)) = (role["kind"].as_str(), role["name"].as_str()) {
        let scope = if kind == "Role" {
            namespace.clone()
        } else {
            None
        };
        out.push((kind.to_owned(), scope, name.to_owned()));
    }
    for subject in object["subjects"].as_array().into_iter().flatten() {
        if subject["kind"] == "ServiceAccount" {
            out.push((
                "ServiceAccount".into(),
                subject["namespace"].as_str().map(str::to_owned),
                subject["name"].as_str().unwrap().to_owned(),
            ));
        }
    }
    let pod = &object["spec"]["template"]["spec"];
    if let Some(account) = pod["serviceAccountName"].as_str() {
        out.push((
            "ServiceAccount".into(),
            namespace.clone(),
            account.to_owned(),
        ));
    }
    for volume in pod["volumes"].as_array().into_iter().flatten() {
        if let Some(name) = volume["configMap"]["name"].as_str() {
            out.push(("ConfigMap".into(), namespace.clone(), name.to_owned()));
        }
    }
    out
}

#[test]
fn each_object_comes_after_the_objects_it_needs() {
    let objects = rendered();
    let ids: Vec<ObjectId> = objects.iter().map(|o| ObjectId::of(o).unwrap()).collect();
    let mut checked = 0;
    for (index, object) in objects.iter().enumerate() {
        for (kind, namespace, name) in needs(object) {
            let found = ids
                .iter()
                .position(|id| id.kind == kind && id.namespace == namespace && id.name == name);
            // Roles the API server makes itself (system:node-bootstrapper, cluster-admin...)
            // are not ours to order.
            if let Some(position) = found {
                assert!(
                    position < index,
                    "{} needs {kind} {name}, which comes after it",
                    ids[index]
                );
                checked += 1;
            }
        }
    }
    // get-nodes, cluster-info's reader, CoreDNS's role, account (binding and pod) and
    // ConfigMap, kube-proxy's account (binding and pod), Role and ConfigMap.
    assert_eq!(checked, 10);
    // Namespaced objects live in the namespaces the API server makes.
    for id in &ids {
        if let Some(namespace) = &id.namespace {
            assert!(
                ["kube-system", "kube-public"].contains(&namespace.as_str()),
                "{id}"
            );
        }
    }
}
