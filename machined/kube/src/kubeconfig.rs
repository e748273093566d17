//! kubeadm's `kubeconfig` phase, a worker's bootstrap kubeconfig as `kubeadm join` writes
//! it, and the admin kubeconfig `machinectl kubeconfig` mints and merges.
//!
//! kubeadm (`cmd/kubeadm/app/phases/kubeconfig`, `util/kubeconfig`) writes one kubeconfig
//! per client of the API server into `/etc/kubernetes`, each with the cluster CA and a
//! client certificate signed by it, all embedded (`certificate-authority-data`,
//! `client-certificate-data`, `client-key-data`). Each has one cluster named after the
//! cluster (`clusterName`), one user named after the certificate's common name, and one
//! context `<user>@<cluster>`, which is current:
//!
//! | file | user (CN) | groups (O) | server |
//! |---|---|---|---|
//! | `admin.conf` | `kubernetes-admin` | `kubeadm:cluster-admins` | the control-plane endpoint |
//! | `super-admin.conf` | `kubernetes-super-admin` | `system:masters` | the control-plane endpoint |
//! | `kubelet.conf` | `system:node:<node name>` | `system:nodes` | see below |
//! | `controller-manager.conf` | `system:kube-controller-manager` | | the local API endpoint |
//! | `scheduler.conf` | `system:kube-scheduler` | | the local API endpoint |
//!
//! The local API endpoint is `https://<advertised address>:6443`. `kubelet.conf` names the
//! control-plane endpoint up to Kubernetes 1.32; from 1.33, where kubeadm's
//! `ControlPlaneKubeletLocalMode` feature gate is beta and on by default, `kubeadm init`
//! points the kubelet of a control plane at the local API endpoint, so that a kubelet never
//! talks to a newer API server during an upgrade ([`kubelet_server`]).
//!
//! `admin.conf` binds through the `kubeadm:cluster-admins` group, which kubeadm binds to
//! `cluster-admin` with the ClusterRoleBinding of the same name, created with
//! `super-admin.conf` (whose `system:masters` group needs no binding).
//!
//! A worker gets no certificate: `kubeadm join` writes `bootstrap-kubelet.conf` with the
//! bootstrap token (user `tls-bootstrap-token-user`, cluster `kubernetes`) and the CA it
//! discovered and pinned with `--discovery-token-ca-cert-hash`; the kubelet uses it for its
//! TLS bootstrap and then writes its own `kubelet.conf`. Keelson's worker has the CA from
//! its config; its bootstrap kubeconfig also carries the CA's pin ([`crate::pki::ca_cert_hash`])
//! as the cluster's `keelson.dev/ca-cert-hash` extension.
//!
//! Every file here holds a private key or a token, and is written 0600. The types are
//! kube-rs's [`Kubeconfig`] and friends, serialized as YAML.

use std::net::IpAddr;
use std::path::PathBuf;

use base64::Engine as _;
use keelson_configs::pki::CertAndKey;
use keelson_configs::schema::MachineConfig;
use kube::config::{
    AuthInfo, Cluster, Context, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext,
    NamedExtension, Preferences,
};

use crate::pki::{self, CLUSTER_ADMINS_GROUP, MODE_PRIVATE};
use crate::{KubeError, NodeFacts, NodeFile, paths};

/// The API server's port on each control plane (kubeadm's default `bindPort`).
pub const LOCAL_API_PORT: u16 = 6443;
/// `admin.conf`'s user.
pub const ADMIN_USER: &str = "kubernetes-admin";
/// `super-admin.conf`'s user.
pub const SUPER_ADMIN_USER: &str = "kubernetes-super-admin";
/// The controller manager's user.
pub const CONTROLLER_MANAGER_USER: &str = "system:kube-controller-manager";
/// The scheduler's user.
pub const SCHEDULER_USER: &str = "system:kube-scheduler";
/// The prefix of a kubelet's user, before the node name.
pub const NODE_USER_PREFIX: &str = "system:node:";
/// The group of every kubelet.
pub const NODES_GROUP: &str = "system:nodes";
/// The group the API server grants everything without RBAC.
pub const SYSTEM_MASTERS_GROUP: &str = "system:masters";
/// The user of a bootstrap kubeconfig (kubeadm's `TokenUser`).
pub const BOOTSTRAP_TOKEN_USER: &str = "tls-bootstrap-token-user";
/// The cluster name of a bootstrap kubeconfig (kubeadm's `DefaultClusterName`).
pub const BOOTSTRAP_CLUSTER_NAME: &str = "kubernetes";
/// The cluster extension of a worker's bootstrap kubeconfig that holds the CA's pin.
pub const CA_CERT_HASH_EXTENSION: &str = "keelson.dev/ca-cert-hash";
/// From this minor release on, `kubelet.conf` of a control plane names the local API
/// endpoint (kubeadm's `ControlPlaneKubeletLocalMode`, beta and on by default in 1.33).
pub const KUBELET_LOCAL_MODE_SINCE_MINOR: u32 = 33;

/// One kubeconfig kubeadm's `kubeconfig` phase writes.
struct ClientSpec {
    path: &'static str,
    user: String,
    groups: &'static [&'static str],
    server: String,
}

/// The kubeconfigs of a control plane, as kubeadm's `kubeconfig` phase writes them:
/// `admin.conf`, `super-admin.conf`, `kubelet.conf`, `controller-manager.conf` and
/// `scheduler.conf`, each with a new client certificate from the Kubernetes CA, 0600.
pub fn control_plane(
    config: &MachineConfig,
    facts: &NodeFacts,
) -> Result<Vec<NodeFile>, KubeError> {
    let ca = pki::ca_with_key(&config.cluster.secrets.kubernetes_ca, "kubernetes_ca.key")?;
    let endpoint = config.cluster.endpoint.to_string();
    let local = local_api_endpoint(facts.node_ip);
    let specs = [
        ClientSpec {
            path: paths::ADMIN_CONF,
            user: ADMIN_USER.to_owned(),
            groups: &[CLUSTER_ADMINS_GROUP],
            server: endpoint.clone(),
        },
        ClientSpec {
            path: paths::SUPER_ADMIN_CONF,
            user: SUPER_ADMIN_USER.to_owned(),
            groups: &[SYSTEM_MASTERS_GROUP],
            server: endpoint,
        },
        ClientSpec {
            path: paths::KUBELET_CONF,
            user: format!("{NODE_USER_PREFIX}{}", facts.node_name),
            groups: &[NODES_GROUP],
            server: kubelet_server(config, facts),
        },
        ClientSpec {
            path: paths::CONTROLLER_MANAGER_CONF,
            user: CONTROLLER_MANAGER_USER.to_owned(),
            groups: &[],
            server: local.clone(),
        },
        ClientSpec {
            path: paths::SCHEDULER_CONF,
            user: SCHEDULER_USER.to_owned(),
            groups: &[],
            server: local,
        },
    ];
    specs
        .iter()
        .map(|spec| {
            let leaf = pki::issue_leaf(
                &ca,
                spec.path,
                "kubernetes_ca",
                &pki::client(&spec.user, spec.groups),
            )?;
            let kubeconfig = with_client_certificate(
                &spec.server,
                &config.cluster.name,
                &spec.user,
                &format!("{}@{}", spec.user, config.cluster.name),
                &ca.cert,
                &leaf,
            );
            Ok(NodeFile {
                path: PathBuf::from(spec.path),
                content: to_yaml(&kubeconfig, spec.path)?.into_bytes(),
                mode: MODE_PRIVATE,
            })
        })
        .collect()
}

/// The server `kubelet.conf` of a control plane names for the config's Kubernetes
/// version: the control-plane endpoint up to 1.32, the local API endpoint from 1.33.
pub fn kubelet_server(config: &MachineConfig, facts: &NodeFacts) -> String {
    if config.cluster.kubernetes_version.minor >= KUBELET_LOCAL_MODE_SINCE_MINOR {
        local_api_endpoint(facts.node_ip)
    } else {
        config.cluster.endpoint.to_string()
    }
}

/// `https://<address>:6443`, the API server of this control plane.
pub fn local_api_endpoint(address: IpAddr) -> String {
    match address {
        IpAddr::V4(v4) => format!("https://{v4}:{LOCAL_API_PORT}"),
        IpAddr::V6(v6) => format!("https://[{v6}]:{LOCAL_API_PORT}"),
    }
}

/// A worker's `/etc/kubernetes/bootstrap-kubelet.conf`, as `kubeadm join` writes it: the
/// control-plane endpoint and the Kubernetes CA in cluster `kubernetes`, user
/// `tls-bootstrap-token-user` with the bootstrap token; plus the CA's pin in the cluster's
/// `keelson.dev/ca-cert-hash` extension. 0600: it holds the token.
pub fn worker_bootstrap(config: &MachineConfig) -> Result<NodeFile, KubeError> {
    let ca_cert = config.cluster.secrets.kubernetes_ca.cert.as_str();
    let hash = pki::ca_cert_hash(ca_cert)?;
    let mut kubeconfig = basic(
        &config.cluster.endpoint.to_string(),
        BOOTSTRAP_CLUSTER_NAME,
        BOOTSTRAP_TOKEN_USER,
        &format!("{BOOTSTRAP_TOKEN_USER}@{BOOTSTRAP_CLUSTER_NAME}"),
        ca_cert,
        AuthInfo {
            token: Some(
                config
                    .cluster
                    .secrets
                    .bootstrap_token
                    .as_str()
                    .to_owned()
                    .into(),
            ),
            ..AuthInfo::default()
        },
    );
    if let Some(cluster) = kubeconfig.clusters[0].cluster.as_mut() {
        cluster.extensions = Some(vec![NamedExtension {
            name: CA_CERT_HASH_EXTENSION.to_owned(),
            extension: serde_json::Value::String(hash),
        }]);
    }
    Ok(NodeFile {
        path: PathBuf::from(paths::BOOTSTRAP_KUBELET_CONF),
        content: to_yaml(&kubeconfig, paths::BOOTSTRAP_KUBELET_CONF)?.into_bytes(),
        mode: MODE_PRIVATE,
    })
}

/// A new admin kubeconfig for `machinectl kubeconfig`: a `kubernetes-admin` certificate
/// (group `kubeadm:cluster-admins`, valid one year) minted now from the Kubernetes CA,
/// for the control-plane endpoint; cluster `<cluster name>`, user and context
/// `admin@<cluster name>`.
pub fn admin(config: &MachineConfig) -> Result<String, KubeError> {
    let ca = pki::ca_with_key(&config.cluster.secrets.kubernetes_ca, "kubernetes_ca.key")?;
    let leaf = pki::issue_leaf(
        &ca,
        "the admin kubeconfig's certificate",
        "kubernetes_ca",
        &pki::client(ADMIN_USER, &[CLUSTER_ADMINS_GROUP]),
    )?;
    let name = format!("admin@{}", config.cluster.name);
    let kubeconfig = with_client_certificate(
        &config.cluster.endpoint.to_string(),
        &config.cluster.name,
        &name,
        &name,
        &ca.cert,
        &leaf,
    );
    to_yaml(&kubeconfig, "the admin kubeconfig")
}

/// Merges the kubeconfig `new` into `existing` (the text of `~/.kube/config`, if there is
/// one), as `machinectl kubeconfig` does: every cluster, user and context of `existing` is
/// kept with all its fields, those of `new` are added, and the current context becomes
/// `new`'s. An entry of `new` whose name `existing` already uses with other content is a
/// conflict: refused, naming every conflicting entry, unless `force`, which replaces them.
pub fn merge(existing: Option<&str>, new: &str, force: bool) -> Result<String, KubeError> {
    let new = parse(new, "the new kubeconfig")?;
    let Some(text) = existing.filter(|text| !text.trim().is_empty()) else {
        return to_yaml(&new, "the merged kubeconfig");
    };
    let mut merged = parse(text, "the existing kubeconfig")?;
    if let Some(kind) = merged.kind.as_deref().filter(|kind| *kind != "Config") {
        return Err(KubeError::Kubeconfig(format!(
            "the existing kubeconfig is a {kind:?}, not a kubeconfig (kind: Config); give the path of a kubeconfig, or write a new file with --merge=false"
        )));
    }
    let mut conflicts = Vec::new();
    merge_named(
        &mut merged.clusters,
        new.clusters,
        "cluster",
        |c| &c.name,
        &mut conflicts,
    )?;
    merge_named(
        &mut merged.auth_infos,
        new.auth_infos,
        "user",
        |u| &u.name,
        &mut conflicts,
    )?;
    merge_named(
        &mut merged.contexts,
        new.contexts,
        "context",
        |c| &c.name,
        &mut conflicts,
    )?;
    if !conflicts.is_empty() && !force {
        return Err(KubeError::Kubeconfig(format!(
            "the existing kubeconfig already has {} with other content; pass --force to replace {}, or rename {} in the existing file first",
            conflicts.join(", "),
            if conflicts.len() == 1 { "it" } else { "them" },
            if conflicts.len() == 1 { "it" } else { "them" },
        )));
    }
    merged.current_context = new.current_context;
    merged.kind.get_or_insert_with(|| "Config".to_owned());
    merged.api_version.get_or_insert_with(|| "v1".to_owned());
    to_yaml(&merged, "the merged kubeconfig")
}

/// Adds each entry of `new` to `existing`: kept when an entry of that name has the same
/// content, replaced (and named in `conflicts`) when it has other content, else appended.
fn merge_named<T: serde::Serialize>(
    existing: &mut Vec<T>,
    new: Vec<T>,
    kind: &str,
    name: impl Fn(&T) -> &String,
    conflicts: &mut Vec<String>,
) -> Result<(), KubeError> {
    for entry in new {
        match existing.iter().position(|e| name(e) == name(&entry)) {
            Some(index) => {
                if to_value(&existing[index])? != to_value(&entry)? {
                    conflicts.push(format!("{kind} {:?}", name(&entry)));
                    existing[index] = entry;
                }
            }
            None => existing.push(entry),
        }
    }
    Ok(())
}

fn to_value<T: serde::Serialize>(entry: &T) -> Result<serde_json::Value, KubeError> {
    serde_json::to_value(entry).map_err(|e| KubeError::Serialize {
        what: "a kubeconfig entry, to compare it".into(),
        message: e.to_string(),
    })
}

fn parse(text: &str, what: &str) -> Result<Kubeconfig, KubeError> {
    yaml_serde::from_str(text).map_err(|e| {
        KubeError::Kubeconfig(format!(
            "{what} is not a kubeconfig: {e}; fix it, move it aside, or write a new file with --merge=false"
        ))
    })
}

fn to_yaml(kubeconfig: &Kubeconfig, what: &str) -> Result<String, KubeError> {
    yaml_serde::to_string(kubeconfig).map_err(|e| KubeError::Serialize {
        what: what.to_owned(),
        message: e.to_string(),
    })
}

fn base64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A kubeconfig with a client certificate, as kubeadm's `CreateWithCerts`.
fn with_client_certificate(
    server: &str,
    cluster: &str,
    user: &str,
    context: &str,
    ca_cert: &str,
    leaf: &CertAndKey,
) -> Kubeconfig {
    basic(
        server,
        cluster,
        user,
        context,
        ca_cert,
        AuthInfo {
            client_certificate_data: Some(base64(&leaf.cert)),
            client_key_data: Some(base64(&leaf.key).into()),
            ..AuthInfo::default()
        },
    )
}

/// One cluster, one user, one current context, as kubeadm's `CreateBasic`.
fn basic(
    server: &str,
    cluster: &str,
    user: &str,
    context: &str,
    ca_cert: &str,
    auth: AuthInfo,
) -> Kubeconfig {
    Kubeconfig {
        preferences: Some(Preferences::default()),
        clusters: vec![NamedCluster {
            name: cluster.to_owned(),
            cluster: Some(Cluster {
                server: Some(server.to_owned()),
                certificate_authority_data: Some(base64(ca_cert)),
                ..Cluster::default()
            }),
            ..NamedCluster::default()
        }],
        auth_infos: vec![NamedAuthInfo {
            name: user.to_owned(),
            auth_info: Some(auth),
            ..NamedAuthInfo::default()
        }],
        contexts: vec![NamedContext {
            name: context.to_owned(),
            context: Some(Context {
                cluster: cluster.to_owned(),
                user: Some(user.to_owned()),
                ..Context::default()
            }),
            ..NamedContext::default()
        }],
        current_context: Some(context.to_owned()),
        kind: Some("Config".to_owned()),
        api_version: Some("v1".to_owned()),
        ..Kubeconfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::tests::{config, facts};

    fn parse_file(file: &NodeFile) -> Kubeconfig {
        yaml_serde::from_slice(&file.content).expect("a kubeconfig")
    }

    fn decode(data: &str) -> String {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("base64");
        String::from_utf8(bytes).expect("text")
    }

    /// The (cluster, user, context, current context, server) of a one-context kubeconfig.
    fn names(k: &Kubeconfig) -> (String, String, String, String, String) {
        let cluster = &k.clusters[0];
        (
            cluster.name.clone(),
            k.auth_infos[0].name.clone(),
            k.contexts[0].name.clone(),
            k.current_context.clone().unwrap_or_default(),
            cluster.cluster.as_ref().unwrap().server.clone().unwrap(),
        )
    }

    #[test]
    fn a_control_plane_gets_kubeadms_five_kubeconfigs() {
        let config = config("controlplane");
        let files = control_plane(&config, &facts()).expect("kubeconfigs");
        let endpoint = "https://10.5.0.2:6443";
        let expected = [
            ("/etc/kubernetes/admin.conf", "kubernetes-admin", endpoint),
            (
                "/etc/kubernetes/super-admin.conf",
                "kubernetes-super-admin",
                endpoint,
            ),
            ("/etc/kubernetes/kubelet.conf", "system:node:cp-1", endpoint),
            (
                "/etc/kubernetes/controller-manager.conf",
                "system:kube-controller-manager",
                endpoint,
            ),
            (
                "/etc/kubernetes/scheduler.conf",
                "system:kube-scheduler",
                endpoint,
            ),
        ];
        assert_eq!(files.len(), expected.len());
        for (file, (path, user, server)) in files.iter().zip(expected) {
            assert_eq!(file.path, PathBuf::from(path));
            assert_eq!(file.mode, 0o600, "{path}");
            let k = parse_file(file);
            let context = format!("{user}@demo");
            assert_eq!(
                names(&k),
                (
                    "demo".into(),
                    user.into(),
                    context.clone(),
                    context,
                    server.into()
                ),
                "{path}"
            );
            let cluster = k.clusters[0].cluster.as_ref().unwrap();
            assert_eq!(
                decode(cluster.certificate_authority_data.as_deref().unwrap()),
                config.cluster.secrets.kubernetes_ca.cert.as_str()
            );
            let auth = k.auth_infos[0].auth_info.as_ref().unwrap();
            let cert = decode(auth.client_certificate_data.as_deref().unwrap());
            assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{path}");
            let yaml = String::from_utf8(file.content.clone()).unwrap();
            assert!(yaml.contains("client-key-data: "), "{path}");
            assert!(yaml.contains("kind: Config"), "{path}");
            assert!(yaml.contains("apiVersion: v1"), "{path}");
        }
    }

    #[test]
    fn local_components_name_the_advertised_address() {
        let config = config("controlplane");
        let mut facts = facts();
        facts.node_ip = "fd00::2".parse().unwrap();
        let files = control_plane(&config, &facts).expect("kubeconfigs");
        let server = |name: &str| {
            let file = files.iter().find(|f| f.path.ends_with(name)).unwrap();
            names(&parse_file(file)).4
        };
        assert_eq!(server("admin.conf"), "https://10.5.0.2:6443");
        assert_eq!(server("kubelet.conf"), "https://[fd00::2]:6443");
        assert_eq!(server("controller-manager.conf"), "https://[fd00::2]:6443");
        assert_eq!(server("scheduler.conf"), "https://[fd00::2]:6443");
    }

    #[test]
    fn the_kubelet_names_the_endpoint_before_1_33_and_its_own_api_server_since() {
        let mut config = config("controlplane");
        config.cluster.endpoint = "https://api.example.com:443".parse().unwrap();
        let facts = facts();
        for (version, server) in [
            ("1.31.4", "https://api.example.com:443"),
            ("1.32.0", "https://api.example.com:443"),
            ("1.33.0", "https://10.5.0.2:6443"),
            ("1.34.1", "https://10.5.0.2:6443"),
        ] {
            config.cluster.kubernetes_version = version.parse().unwrap();
            assert_eq!(kubelet_server(&config, &facts), server, "{version}");
        }
    }

    #[test]
    fn a_workers_bootstrap_kubeconfig_holds_the_token_and_the_ca_pin() {
        let config = config("worker");
        let file = worker_bootstrap(&config).expect("bootstrap kubeconfig");
        assert_eq!(
            file.path,
            PathBuf::from("/etc/kubernetes/bootstrap-kubelet.conf")
        );
        assert_eq!(file.mode, 0o600);
        let k = parse_file(&file);
        assert_eq!(
            names(&k),
            (
                "kubernetes".into(),
                "tls-bootstrap-token-user".into(),
                "tls-bootstrap-token-user@kubernetes".into(),
                "tls-bootstrap-token-user@kubernetes".into(),
                "https://cp.example.com:6443".into(),
            )
        );
        let yaml = String::from_utf8(file.content.clone()).unwrap();
        let token = config.cluster.secrets.bootstrap_token.as_str();
        assert!(yaml.contains(&format!("token: {token}")), "{yaml}");
        assert!(!yaml.contains("client-key-data"), "{yaml}");
        let ca = config.cluster.secrets.kubernetes_ca.cert.as_str();
        let cluster = k.clusters[0].cluster.as_ref().unwrap();
        let extensions = cluster.extensions.as_ref().unwrap();
        assert_eq!(extensions[0].name, "keelson.dev/ca-cert-hash");
        assert_eq!(
            extensions[0].extension,
            serde_json::Value::String(pki::ca_cert_hash(ca).unwrap())
        );
    }

    #[test]
    fn the_admin_kubeconfig_is_named_after_the_cluster() {
        let config = config("controlplane");
        let k: Kubeconfig = yaml_serde::from_str(&admin(&config).unwrap()).unwrap();
        assert_eq!(
            names(&k),
            (
                "demo".into(),
                "admin@demo".into(),
                "admin@demo".into(),
                "admin@demo".into(),
                "https://10.5.0.2:6443".into()
            )
        );
        let worker = self::config("worker");
        let err = admin(&worker).unwrap_err().to_string();
        assert!(
            err.contains("cluster.secrets.kubernetes_ca.key is missing"),
            "{err}"
        );
    }

    const EXISTING: &str = "\
apiVersion: v1
kind: Config
clusters:
- name: other
  cluster:
    server: https://other:6443
    certificate-authority: /etc/other-ca.crt
    x-unknown-field: kept
users:
- name: other
  user:
    token: secret
contexts:
- name: other
  context:
    cluster: other
    user: other
    namespace: apps
current-context: other
preferences:
  colors: true
";

    fn new_config(server: &str) -> String {
        let k = basic(
            server,
            "demo",
            "admin@demo",
            "admin@demo",
            "-----BEGIN CERTIFICATE-----\n",
            AuthInfo {
                token: Some("t".to_owned().into()),
                ..AuthInfo::default()
            },
        );
        to_yaml(&k, "test").unwrap()
    }

    #[test]
    fn merging_keeps_existing_entries_and_switches_the_current_context() {
        let merged = merge(Some(EXISTING), &new_config("https://a:6443"), false).unwrap();
        let k: Kubeconfig = yaml_serde::from_str(&merged).unwrap();
        let clusters: Vec<_> = k.clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(clusters, ["other", "demo"]);
        let users: Vec<_> = k.auth_infos.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(users, ["other", "admin@demo"]);
        let contexts: Vec<_> = k.contexts.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(contexts, ["other", "admin@demo"]);
        assert_eq!(k.current_context.as_deref(), Some("admin@demo"));
        // The existing entries' fields, known or not, are kept.
        for kept in [
            "certificate-authority: /etc/other-ca.crt",
            "x-unknown-field: kept",
            "token: secret",
            "namespace: apps",
            "colors: true",
        ] {
            assert!(merged.contains(kept), "{kept} lost:\n{merged}");
        }
        // The same entries again are no conflict.
        let again = merge(Some(&merged), &new_config("https://a:6443"), false).unwrap();
        assert_eq!(again, merged);
    }

    #[test]
    fn a_conflict_is_refused_naming_the_entries_unless_forced() {
        let merged = merge(Some(EXISTING), &new_config("https://a:6443"), false).unwrap();
        let other = new_config("https://b:6443");
        let err = merge(Some(&merged), &other, false).unwrap_err().to_string();
        assert_eq!(
            err,
            "the existing kubeconfig already has cluster \"demo\" with other content; pass --force to replace it, or rename it in the existing file first"
        );
        let forced = merge(Some(&merged), &other, true).unwrap();
        let k: Kubeconfig = yaml_serde::from_str(&forced).unwrap();
        assert_eq!(k.clusters.len(), 2);
        let demo = k.clusters.iter().find(|c| c.name == "demo").unwrap();
        assert_eq!(
            demo.cluster.as_ref().unwrap().server.as_deref(),
            Some("https://b:6443")
        );

        // Several conflicts are named together.
        let existing = EXISTING.replace("other", "admin@demo");
        let err = merge(Some(&existing), &new_config("https://a:6443"), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "the existing kubeconfig already has user \"admin@demo\", context \"admin@demo\" with other content; pass --force to replace them"
            ),
            "{err}"
        );
    }

    #[test]
    fn no_or_empty_existing_config_gives_the_new_one() {
        let new = new_config("https://a:6443");
        assert_eq!(merge(None, &new, false).unwrap(), new);
        assert_eq!(merge(Some(" \n"), &new, false).unwrap(), new);
    }

    #[test]
    fn a_broken_existing_config_is_refused_with_where() {
        let new = new_config("https://a:6443");
        let err = merge(Some("clusters: [\n  - name: x\n  bad"), &new, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("the existing kubeconfig is not a kubeconfig: "),
            "{err}"
        );
        assert!(err.contains("line"), "{err}");
        assert!(err.contains("--merge=false"), "{err}");
        let err = merge(Some("clusters: 3\n"), &new, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
        let err = merge(Some("apiVersion: v1\nkind: Pod\n"), &new, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("the existing kubeconfig is a \"Pod\""),
            "{err}"
        );
    }
}
