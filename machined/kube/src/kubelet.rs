//! kubeadm's `kubelet-start` phase: the kubelet's `KubeletConfiguration`
//! (`kubelet.config.k8s.io/v1beta1`, YAML at [`paths::KUBELET_CONFIG`]) and its flags.
//!
//! The configuration is kubeadm's defaults for a node (cmd/kubeadm/app/componentconfigs/
//! kubelet.go): x509 client certificates against the cluster CA, webhook authentication
//! and authorization, anonymous access off, the cluster DNS address and domain, the
//! static pod path, certificate rotation, the health endpoint on 127.0.0.1:10248, with
//! what a Keelson node needs besides:
//! - the cgroup driver of containerd ([`CGROUP_DRIVER`]);
//! - reserved resources for the system and for the Kubernetes daemons (small values like
//!   Talos's: see [`SYSTEM_RESERVED`] and [`KUBE_RESERVED`]);
//! - `failSwapOn` off when `machine.swap = "on"`;
//! - the FlexVolume directory on EPHEMERAL ([`paths::VOLUME_PLUGIN_DIR`]: `/usr` is
//!   read-only).
//!
//! `machine.kubelet.extra_config` is merged over it last: its tables merge into the
//! generated ones key by key, any other value replaces the generated one.

use keelson_configs::MachineConfig;
use keelson_configs::schema::{MachineType, Swap};
use keelson_node_protocol::kubelet::HEALTHZ;
use serde_json::{Map, Value, json};

use crate::{KubeError, NodeFacts, NodeFile, addons, paths};

/// The kubelet's cgroup driver: containerd's. A Keelson node has no systemd, so
/// containerd's CRI config on the node (written by PID 1, init/src/etc_files.rs) has
/// `SystemdCgroup = false`, the cgroupfs driver; a kubelet on another driver than its
/// runtime's cannot start pods.
pub const CGROUP_DRIVER: &str = "cgroupfs";

/// containerd's CRI socket.
pub const CONTAINER_RUNTIME_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";

/// The resolver config the kubelet hands to pods with the `Default` DNS policy.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Reserved for the operating system (PID 1, machined, containerd, etcd's share on
/// control planes is under the pods' limit too): small values in the spirit of Talos's
/// defaults (cpu 50m, memory 192Mi, ephemeral storage 256Mi).
pub const SYSTEM_RESERVED: [(&str, &str); 3] = [
    ("cpu", "50m"),
    ("memory", "192Mi"),
    ("ephemeral-storage", "256Mi"),
];

/// Reserved for the Kubernetes daemons (the kubelet itself): small values likewise.
pub const KUBE_RESERVED: [(&str, &str); 3] = [
    ("cpu", "50m"),
    ("memory", "128Mi"),
    ("ephemeral-storage", "256Mi"),
];

/// The `KubeletConfiguration` as a YAML file (mode 0644): kubeadm's defaults, Keelson's
/// settings, then `machine.kubelet.extra_config` merged over them.
/// Nothing in it depends on the node's facts today (`_facts` keeps the renderers' shape).
pub fn config_file(config: &MachineConfig, _facts: &NodeFacts) -> Result<NodeFile, KubeError> {
    let document = configuration(config)?;
    let yaml = yaml_serde::to_string(&document).map_err(|err| KubeError::Serialize {
        what: paths::KUBELET_CONFIG.into(),
        message: err.to_string(),
    })?;
    Ok(NodeFile {
        path: paths::KUBELET_CONFIG.into(),
        content: yaml.into_bytes(),
        mode: 0o644,
    })
}

/// The `KubeletConfiguration` document, before serialization.
pub fn configuration(config: &MachineConfig) -> Result<Value, KubeError> {
    let cluster = &config.cluster;
    let reserved = |pairs: &[(&str, &str)]| -> Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), Value::from(*v)))
            .collect()
    };
    // kubeadm's clusterDNS: the 10th address of the first service subnet, the address of
    // the cluster DNS Service (constants.GetDNSIP).
    let cluster_dns = addons::dns_service_ip(cluster)?;
    let (healthz_address, healthz_port) = HEALTHZ;
    let mut document = json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "authentication": {
            "anonymous": { "enabled": false },
            "webhook": { "enabled": true },
            "x509": { "clientCAFile": format!("{}/ca.crt", paths::PKI_DIR) },
        },
        "authorization": { "mode": "Webhook" },
        "cgroupDriver": CGROUP_DRIVER,
        "clusterDNS": [cluster_dns.to_string()],
        "clusterDomain": cluster.dns_domain,
        "containerRuntimeEndpoint": CONTAINER_RUNTIME_ENDPOINT,
        "failSwapOn": config.machine.swap == Swap::Off,
        "healthzBindAddress": healthz_address.to_string(),
        "healthzPort": healthz_port,
        "kubeReserved": reserved(&KUBE_RESERVED),
        "resolvConf": RESOLV_CONF,
        "rotateCertificates": true,
        "staticPodPath": paths::MANIFESTS_DIR,
        "systemReserved": reserved(&SYSTEM_RESERVED),
        "volumePluginDir": paths::VOLUME_PLUGIN_DIR,
    });
    let extra = toml_to_json(&config.machine.kubelet.extra_config)?;
    merge(&mut document, extra);
    Ok(document)
}

/// `overlay` merged into `base`: objects key by key, recursively; anything else replaces.
fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

/// A TOML table (`machine.kubelet.extra_config`) as JSON: tables become objects, arrays
/// arrays, date-times their RFC 3339 text.
fn toml_to_json(table: &impl serde::Serialize) -> Result<Value, KubeError> {
    // The toml crate serializes a date-time as an object with this one private key.
    const DATETIME_KEY: &str = "$__toml_private_datetime";
    fn fix_datetimes(value: &mut Value) {
        match value {
            Value::Object(map) => {
                if map.len() == 1
                    && let Some(Value::String(text)) = map.get(DATETIME_KEY)
                {
                    *value = Value::String(text.clone());
                    return;
                }
                map.values_mut().for_each(fix_datetimes);
            }
            Value::Array(items) => items.iter_mut().for_each(fix_datetimes),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(table).map_err(|err| KubeError::Serialize {
        what: "machine.kubelet.extra_config".into(),
        message: format!("{err}; write it as TOML tables, strings, numbers and booleans"),
    })?;
    fix_datetimes(&mut value);
    Ok(value)
}

/// The kubelet's flags, one `--name=value` each: its config file, its kubeconfig, on
/// workers the bootstrap kubeconfig (TLS bootstrap), the node IP and the node name, then
/// `machine.kubelet.extra_args` in name order; an extra argument replaces a generated
/// flag of the same name.
pub fn flags(config: &MachineConfig, facts: &NodeFacts) -> Vec<String> {
    let mut generated: Vec<(String, String)> = vec![
        ("config".into(), paths::KUBELET_CONFIG.into()),
        ("kubeconfig".into(), paths::KUBELET_CONF.into()),
    ];
    if config.machine.kind == MachineType::Worker {
        generated.push((
            "bootstrap-kubeconfig".into(),
            paths::BOOTSTRAP_KUBELET_CONF.into(),
        ));
    }
    generated.push(("node-ip".into(), facts.node_ip.to_string()));
    generated.push(("hostname-override".into(), facts.node_name.clone()));
    let extra = &config.machine.kubelet.extra_args;
    let name_of = |key: &str| key.trim_start_matches('-').to_string();
    generated.retain(|(name, _)| !extra.keys().any(|key| name_of(key) == *name));
    generated
        .into_iter()
        .chain(
            extra
                .iter()
                .map(|(key, value)| (name_of(key), value.clone())),
        )
        .map(|(name, value)| format!("--{name}={value}"))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::manifests::fixtures::{control_plane_config, facts, worker_config};

    /// The file's YAML read back.
    fn read_back(config: &MachineConfig) -> Value {
        let file = config_file(config, &facts()).unwrap();
        assert_eq!(file.path.to_str(), Some("/var/lib/kubelet/config.yaml"));
        assert_eq!(file.mode, 0o644);
        yaml_serde::from_str(std::str::from_utf8(&file.content).unwrap()).unwrap()
    }

    fn extra_config(toml_text: &str) -> MachineConfig {
        let mut config = control_plane_config();
        config.machine.kubelet.extra_config = toml_text.parse().unwrap();
        config
    }

    #[test]
    fn configuration_is_kubeadm_s_with_keelson_s_settings_and_the_extra_config() {
        // The fixture's extra_config: serializeImagePulls = false,
        // evictionHard = { "memory.available" = "100Mi" }.
        let expected = json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "authentication": {
                "anonymous": { "enabled": false },
                "webhook": { "enabled": true },
                "x509": { "clientCAFile": "/etc/kubernetes/pki/ca.crt" },
            },
            "authorization": { "mode": "Webhook" },
            "cgroupDriver": "cgroupfs",
            "clusterDNS": ["10.96.0.10"],
            "clusterDomain": "cluster.local",
            "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
            "failSwapOn": true,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "kubeReserved": { "cpu": "50m", "memory": "128Mi", "ephemeral-storage": "256Mi" },
            "resolvConf": "/etc/resolv.conf",
            "rotateCertificates": true,
            "staticPodPath": "/etc/kubernetes/manifests",
            "systemReserved": { "cpu": "50m", "memory": "192Mi", "ephemeral-storage": "256Mi" },
            "volumePluginDir": "/var/lib/kubelet/volumeplugins",
            "evictionHard": { "memory.available": "100Mi" },
            "serializeImagePulls": false,
        });
        assert_eq!(read_back(&control_plane_config()), expected);
    }

    #[test]
    fn cluster_dns_is_the_tenth_address_of_the_first_service_subnet() {
        // (service subnets, clusterDNS): kubeadm's constants.GetDNSIP takes the first
        // subnet of a dual-stack list, the one the kube-dns Service is in.
        let cases = [
            (vec!["10.96.0.0/12"], vec!["10.96.0.10"]),
            (vec!["172.20.0.0/16"], vec!["172.20.0.10"]),
            (vec!["10.96.0.0/12", "fd00:10:96::/112"], vec!["10.96.0.10"]),
            (
                vec!["fd00:10:96::/112", "10.96.0.0/12"],
                vec!["fd00:10:96::a"],
            ),
        ];
        for (subnets, dns) in cases {
            let mut config = control_plane_config();
            config.cluster.service_subnets = subnets.iter().map(|s| s.parse().unwrap()).collect();
            assert_eq!(read_back(&config)["clusterDNS"], json!(dns), "{subnets:?}");
        }
    }

    #[test]
    fn extra_config_merges_tables_deeply_and_replaces_other_values() {
        let config = extra_config(
            r#"
            clusterDNS = ["10.96.0.53"]
            failSwapOn = false
            maxPods = 250
            systemReserved = { memory = "1Gi" }
            authentication = { webhook = { cacheTTL = "2m0s" } }
            featureGates = { KubeletTracing = true }
            "#,
        );
        let doc = read_back(&config);
        assert_eq!(doc["clusterDNS"], json!(["10.96.0.53"]));
        assert_eq!(doc["failSwapOn"], json!(false));
        assert_eq!(doc["maxPods"], json!(250));
        assert_eq!(
            doc["systemReserved"],
            json!({ "cpu": "50m", "memory": "1Gi", "ephemeral-storage": "256Mi" })
        );
        assert_eq!(
            doc["authentication"],
            json!({
                "anonymous": { "enabled": false },
                "webhook": { "enabled": true, "cacheTTL": "2m0s" },
                "x509": { "clientCAFile": "/etc/kubernetes/pki/ca.crt" },
            })
        );
        assert_eq!(doc["featureGates"], json!({ "KubeletTracing": true }));
        assert_eq!(doc["cgroupDriver"], json!("cgroupfs"));

        // A TOML date-time becomes its text.
        let config = extra_config("notAfter = 2026-12-06T04:00:00Z\n");
        assert_eq!(
            read_back(&config)["notAfter"],
            json!("2026-12-06T04:00:00Z")
        );
    }

    #[test]
    fn swap_on_turns_fail_swap_on_off() {
        let mut config = control_plane_config();
        config.machine.swap = Swap::On;
        assert_eq!(read_back(&config)["failSwapOn"], json!(false));
    }

    #[test]
    fn flags_per_node_type_and_extra_args_win() {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // (config, expected): the control plane's fixture has max-pods = "200".
        let mut overridden = control_plane_config();
        overridden
            .machine
            .kubelet
            .extra_args
            .insert("node-ip".into(), "10.5.0.9".into());
        overridden
            .machine
            .kubelet
            .extra_args
            .insert("v".into(), "2".into());
        let mut worker_facts = facts();
        worker_facts.node_name = "worker-1".into();
        let cases = [
            (
                control_plane_config(),
                facts(),
                strings(&[
                    "--config=/var/lib/kubelet/config.yaml",
                    "--kubeconfig=/etc/kubernetes/kubelet.conf",
                    "--node-ip=10.5.0.2",
                    "--hostname-override=cp-1",
                    "--max-pods=200",
                ]),
            ),
            (
                worker_config(),
                worker_facts,
                strings(&[
                    "--config=/var/lib/kubelet/config.yaml",
                    "--kubeconfig=/etc/kubernetes/kubelet.conf",
                    "--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf",
                    "--node-ip=10.5.0.2",
                    "--hostname-override=worker-1",
                ]),
            ),
            (
                overridden,
                facts(),
                strings(&[
                    "--config=/var/lib/kubelet/config.yaml",
                    "--kubeconfig=/etc/kubernetes/kubelet.conf",
                    "--hostname-override=cp-1",
                    "--max-pods=200",
                    "--node-ip=10.5.0.9",
                    "--v=2",
                ]),
            ),
        ];
        for (config, facts, expected) in cases {
            assert_eq!(flags(&config, &facts), expected);
        }
    }
}
