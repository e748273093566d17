//! kubeadm's `certs` phase, done by the node from its config's CAs.
//!
//! kubeadm (`cmd/kubeadm/app/phases/certs`, `util/pkiutil`) generates the cluster CA, the
//! front-proxy CA and the service-account key pair on the first control plane, then issues
//! the leaves each control plane's components use, and writes them all under
//! `/etc/kubernetes/pki`. On Keelson the CAs and the service-account key come from the
//! machine config (`cluster.secrets`, made once by `machinectl gen config`), and the node
//! issues the leaves itself from them, at each boot and whenever an input changes (the
//! node's name or addresses, the endpoint, the service subnets, the DNS domain): nothing is
//! kept between boots, and there is no `kubeadm certs renew`.
//!
//! The leaves, as kubeadm's `certs` phase makes them (`certs/certlist.go`):
//!
//! | file | subject | usage |
//! |---|---|---|
//! | `apiserver` | CN `kube-apiserver` | serverAuth; SANs from [`apiserver_sans`] |
//! | `apiserver-kubelet-client` | CN `kube-apiserver-kubelet-client`, O `kubeadm:cluster-admins` | clientAuth |
//! | `front-proxy-client` | CN `front-proxy-client` (from the front-proxy CA) | clientAuth |
//!
//! Each is valid one year with a fresh ECDSA P-256 key, key usage `digitalSignature,
//! keyEncipherment` as kubeadm's `pkiutil.NewSignedCert` sets it (see
//! [`keelson_configs::pki`]). The etcd certificates and `apiserver-etcd-client` are
//! written by machined's etcd controller, not here.
//!
//! A control plane gets the CA keys of the Kubernetes CA (the controller manager signs
//! node certificates with it) and of the front-proxy CA, as kubeadm leaves them; a worker
//! gets the Kubernetes CA's certificate alone ([`worker`]), never a private key.
//! [`ca_cert_hash`] is kubeadm's public-key pin of a CA, the
//! `--discovery-token-ca-cert-hash` of `kubeadm join`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnet::IpNet;
use keelson_configs::pki::{self, CertAndKey, LeafRequest, Usage};
use keelson_configs::schema::{CaPair, MachineConfig};
use sha2::{Digest, Sha256};

use crate::{KubeError, NodeFacts, NodeFile, paths};

/// The API server's serving certificate's common name (kubeadm's).
pub const APISERVER_CN: &str = "kube-apiserver";
/// The common name of the API server's client certificate towards kubelets (kubeadm's).
pub const APISERVER_KUBELET_CLIENT_CN: &str = "kube-apiserver-kubelet-client";
/// The common name of the API server's client certificate towards aggregated API servers.
pub const FRONT_PROXY_CLIENT_CN: &str = "front-proxy-client";
/// The group bound to `cluster-admin` by kubeadm's `kubeadm:cluster-admins`
/// ClusterRoleBinding (since Kubernetes 1.29; `system:masters` before).
pub const CLUSTER_ADMINS_GROUP: &str = "kubeadm:cluster-admins";

/// The mode of a certificate: anyone may read it, as kubeadm writes them.
pub(crate) const MODE_CERTIFICATE: u32 = 0o644;
/// The mode of a private key and of every file that holds one.
pub(crate) const MODE_PRIVATE: u32 = 0o600;

/// What a control plane needs the secrets for, in errors.
const CONTROL_PLANE: &str = "control plane";

/// The files of `/etc/kubernetes/pki` on a control plane, as kubeadm's `certs` phase leaves
/// them, except etcd's: `ca.crt`, `ca.key`, `apiserver.crt`/`.key`,
/// `apiserver-kubelet-client.crt`/`.key`, `front-proxy-ca.crt`/`.key`,
/// `front-proxy-client.crt`/`.key`, `sa.key` and `sa.pub`. Every leaf is issued anew, with
/// a new key, at each call.
pub fn control_plane(
    config: &MachineConfig,
    facts: &NodeFacts,
) -> Result<Vec<NodeFile>, KubeError> {
    let secrets = &config.cluster.secrets;
    let kubernetes_ca = ca_with_key(&secrets.kubernetes_ca, "kubernetes_ca.key")?;
    let front_proxy_pair = secrets
        .front_proxy_ca
        .as_ref()
        .ok_or(KubeError::MissingSecret {
            key: "front_proxy_ca",
            what: CONTROL_PLANE,
        })?;
    let front_proxy_ca = ca_with_key(front_proxy_pair, "front_proxy_ca.key")?;
    let sa_key = secrets
        .service_account_key
        .as_ref()
        .ok_or(KubeError::MissingSecret {
            key: "service_account_key",
            what: CONTROL_PLANE,
        })?
        .as_str();
    let sa_pub = pki::public_key_pem(sa_key).map_err(|source| KubeError::Pki {
        what: format!(
            "cannot derive {}/sa.pub from cluster.secrets.service_account_key (put a PEM PKCS#8 key there, as `machinectl gen config` makes)",
            paths::PKI_DIR
        ),
        source,
    })?;

    let apiserver = issue_leaf(
        &kubernetes_ca,
        "apiserver",
        "kubernetes_ca",
        &LeafRequest {
            common_name: APISERVER_CN.to_owned(),
            organizations: Vec::new(),
            sans: apiserver_sans(config, facts),
            usage: Usage::Server,
        },
    )?;
    let kubelet_client = issue_leaf(
        &kubernetes_ca,
        "apiserver-kubelet-client",
        "kubernetes_ca",
        &client(APISERVER_KUBELET_CLIENT_CN, &[CLUSTER_ADMINS_GROUP]),
    )?;
    let front_proxy_client = issue_leaf(
        &front_proxy_ca,
        "front-proxy-client",
        "front_proxy_ca",
        &client(FRONT_PROXY_CLIENT_CN, &[]),
    )?;

    let mut files = Vec::new();
    let mut pair = |name: &str, cert: &str, key: &str| {
        files.push(pki_file(&format!("{name}.crt"), cert, MODE_CERTIFICATE));
        files.push(pki_file(&format!("{name}.key"), key, MODE_PRIVATE));
    };
    pair("ca", &kubernetes_ca.cert, &kubernetes_ca.key);
    pair("apiserver", &apiserver.cert, &apiserver.key);
    pair(
        "apiserver-kubelet-client",
        &kubelet_client.cert,
        &kubelet_client.key,
    );
    pair("front-proxy-ca", &front_proxy_ca.cert, &front_proxy_ca.key);
    pair(
        "front-proxy-client",
        &front_proxy_client.cert,
        &front_proxy_client.key,
    );
    files.push(pki_file("sa.key", sa_key, MODE_PRIVATE));
    files.push(pki_file("sa.pub", &sa_pub, MODE_CERTIFICATE));
    Ok(files)
}

/// The files of `/etc/kubernetes/pki` on a worker: `ca.crt` alone (the kubelet's
/// `clientCAFile`). Never a private key, even if the config held one.
pub fn worker(config: &MachineConfig) -> Result<Vec<NodeFile>, KubeError> {
    let cert = config.cluster.secrets.kubernetes_ca.cert.as_str();
    // Judged here so that a broken certificate is reported now, not by the kubelet.
    pki::pem_certificate_der(cert).map_err(|source| KubeError::Pki {
        what: "cluster.secrets.kubernetes_ca.cert (paste the cluster CA's certificate from secrets.toml)".into(),
        source,
    })?;
    Ok(vec![pki_file("ca.crt", cert, MODE_CERTIFICATE)])
}

/// kubeadm's public-key pin of a CA certificate: `sha256:` and the lowercase hex SHA-256
/// of its DER SubjectPublicKeyInfo, as `kubeadm join --discovery-token-ca-cert-hash` takes
/// it (`util/pubkeypin`). The same as
/// `openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | sha256sum`.
pub fn ca_cert_hash(ca_cert_pem: &str) -> Result<String, KubeError> {
    let spki = pki::certificate_spki_der(ca_cert_pem).map_err(|source| KubeError::Pki {
        what: "cannot pin the CA's public key (give its PEM certificate, e.g. cluster.secrets.kubernetes_ca.cert)".into(),
        source,
    })?;
    let digest = Sha256::digest(&spki);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("sha256:{hex}"))
}

/// The subject alternative names of the API server's certificate, as kubeadm's
/// `GetAPIServerAltNames` gives them, then the node's other addresses:
///
/// - DNS names, sorted and each once (kubeadm's `RemoveDuplicateAltNames` sorts them): the
///   node name, `kubernetes`, `kubernetes.default`, `kubernetes.default.svc`,
///   `kubernetes.default.svc.<dns_domain>`, and the endpoint's host when it is a name;
/// - addresses, in this order and each once: the first address of the (first) service
///   subnet (the `kubernetes` Service's ClusterIP: kubeadm takes the primary subnet's
///   alone, as the API server allocates that Service from it alone), the advertised
///   address (`facts.node_ip`), the endpoint's host when it is an address, then the node's
///   other addresses (which kubeadm leaves to `apiServer.certSANs`).
pub fn apiserver_sans(config: &MachineConfig, facts: &NodeFacts) -> Vec<String> {
    let cluster = &config.cluster;
    let endpoint_host = cluster.endpoint.host.as_str();
    let endpoint_ip = endpoint_host.parse::<IpAddr>().ok();

    let mut names = vec![
        facts.node_name.clone(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        format!("kubernetes.default.svc.{}", cluster.dns_domain),
    ];
    if endpoint_ip.is_none() {
        names.push(endpoint_host.to_owned());
    }
    names.sort();
    names.dedup();

    let service_ip = cluster.service_subnets.first().and_then(first_address);
    let mut addresses: Vec<IpAddr> = Vec::new();
    let ordered = service_ip
        .into_iter()
        .chain([facts.node_ip])
        .chain(endpoint_ip)
        .chain(facts.addresses.iter().copied());
    for address in ordered {
        if !addresses.contains(&address) {
            addresses.push(address);
        }
    }
    names
        .into_iter()
        .chain(addresses.iter().map(IpAddr::to_string))
        .collect()
}

/// The first address of `subnet` after its network address (kubeadm's
/// `GetIndexedIP(subnet, 1)`), if the subnet holds one.
pub(crate) fn first_address(subnet: &IpNet) -> Option<IpAddr> {
    let address = match subnet {
        IpNet::V4(net) => IpAddr::from(Ipv4Addr::from(u32::from(net.network()).checked_add(1)?)),
        IpNet::V6(net) => IpAddr::from(Ipv6Addr::from(u128::from(net.network()).checked_add(1)?)),
    };
    subnet.contains(&address).then_some(address)
}

/// A client certificate request.
pub(crate) fn client(common_name: &str, groups: &[&str]) -> LeafRequest {
    LeafRequest {
        common_name: common_name.to_owned(),
        organizations: groups.iter().map(|g| (*g).to_owned()).collect(),
        sans: Vec::new(),
        usage: Usage::Client,
    }
}

/// The CA pair with its key, or which key is missing (`key`: the path under
/// `cluster.secrets`).
pub(crate) fn ca_with_key(pair: &CaPair, key: &'static str) -> Result<CertAndKey, KubeError> {
    let private = pair.key.as_ref().ok_or(KubeError::MissingSecret {
        key,
        what: CONTROL_PLANE,
    })?;
    Ok(CertAndKey {
        cert: pair.cert.as_str().to_owned(),
        key: private.as_str().to_owned(),
    })
}

/// Issues the leaf `name` from the CA at `cluster.secrets.<ca>`.
pub(crate) fn issue_leaf(
    ca: &CertAndKey,
    name: &str,
    ca_key: &str,
    request: &LeafRequest,
) -> Result<CertAndKey, KubeError> {
    pki::issue(ca, request).map_err(|source| KubeError::Pki {
        what: format!(
            "cannot issue {name} ({}) from cluster.secrets.{ca_key} (check that its cert and key are a PEM pair, as `machinectl gen config` writes them)",
            request.common_name
        ),
        source,
    })
}

fn pki_file(name: &str, content: &str, mode: u32) -> NodeFile {
    NodeFile {
        path: Path::new(paths::PKI_DIR).join(name),
        content: content.as_bytes().to_vec(),
        mode,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use keelson_configs::generate::node_secrets;
    use keelson_configs::layout::Arch;
    use keelson_configs::secrets::ClusterSecrets;
    use keelson_configs::{Mode, check_str};

    /// The fixture config `kind` (`controlplane` or `worker`) with freshly generated secrets
    /// in place of its PEM-shaped placeholders.
    pub(crate) fn config(kind: &str) -> MachineConfig {
        let text = match kind {
            "controlplane" => include_str!("../../../configs/tests/data/controlplane.toml"),
            _ => include_str!("../../../configs/tests/data/worker.toml"),
        };
        let mut config = check_str(text, kind, Mode::Metal)
            .into_result()
            .expect("the fixture is valid");
        let secrets = ClusterSecrets::generate().expect("secrets");
        config.cluster.secrets = node_secrets(&secrets, config.machine.kind).expect("node secrets");
        config
    }

    /// The facts of the fixture's control plane `cp-1`.
    pub(crate) fn facts() -> NodeFacts {
        NodeFacts {
            node_name: "cp-1".into(),
            addresses: vec!["10.5.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
            node_ip: "10.5.0.2".parse().unwrap(),
            arch: Arch::Amd64,
        }
    }

    fn check_sans(edit: impl Fn(&mut MachineConfig, &mut NodeFacts), expected: &[&str]) {
        let mut config = config("controlplane");
        let mut facts = facts();
        edit(&mut config, &mut facts);
        assert_eq!(apiserver_sans(&config, &facts), expected);
    }

    #[test]
    fn apiserver_sans_are_kubeadms_then_the_nodes_addresses() {
        let kubeadm_names = [
            "cp-1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ];
        // The fixture: endpoint https://10.5.0.2:6443, service subnet 10.96.0.0/12.
        let mut expected = kubeadm_names.to_vec();
        expected.extend(["10.96.0.1", "10.5.0.2", "fd00::2"]);
        check_sans(|_, _| {}, &expected);

        // A DNS endpoint is a DNS SAN, sorted among kubeadm's; a dual-stack cluster's
        // secondary service subnet adds nothing (kubeadm takes the primary's first IP).
        check_sans(
            |config, facts| {
                config.cluster.endpoint = "https://api.example.com:6443".parse().unwrap();
                config.cluster.service_subnets = vec![
                    "fd00:96::/108".parse().unwrap(),
                    "10.96.0.0/12".parse().unwrap(),
                ];
                config.cluster.dns_domain = "corp.internal".into();
                facts.node_name = "node-a".into();
                facts.node_ip = "fd00::2".parse().unwrap();
            },
            &[
                "api.example.com",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.corp.internal",
                "node-a",
                "fd00:96::1",
                "fd00::2",
                "10.5.0.2",
            ],
        );

        // A load balancer's address comes after the advertised one, before the others.
        check_sans(
            |config, _| config.cluster.endpoint = "https://192.0.2.10:443".parse().unwrap(),
            &[
                kubeadm_names[0],
                kubeadm_names[1],
                kubeadm_names[2],
                kubeadm_names[3],
                kubeadm_names[4],
                "10.96.0.1",
                "10.5.0.2",
                "192.0.2.10",
                "fd00::2",
            ],
        );
    }

    #[test]
    fn the_service_ip_is_the_subnets_first_address_after_its_network() {
        let first = |s: &str| first_address(&s.parse().unwrap()).map(|a| a.to_string());
        assert_eq!(first("10.96.0.0/12").as_deref(), Some("10.96.0.1"));
        assert_eq!(first("10.96.5.7/12").as_deref(), Some("10.96.0.1"));
        assert_eq!(first("fd00:96::/108").as_deref(), Some("fd00:96::1"));
        assert_eq!(first("10.0.0.0/31").as_deref(), Some("10.0.0.1"));
        assert_eq!(first("10.0.0.1/32"), None);
        assert_eq!(first("255.255.255.255/32"), None);
    }

    #[test]
    fn a_control_plane_gets_kubeadms_files_with_private_keys_0600() {
        let config = config("controlplane");
        let files = control_plane(&config, &facts()).expect("files");
        let listed: Vec<(String, u32)> = files
            .iter()
            .map(|f| (f.path.display().to_string(), f.mode))
            .collect();
        let expected: Vec<(String, u32)> = [
            ("ca.crt", 0o644),
            ("ca.key", 0o600),
            ("apiserver.crt", 0o644),
            ("apiserver.key", 0o600),
            ("apiserver-kubelet-client.crt", 0o644),
            ("apiserver-kubelet-client.key", 0o600),
            ("front-proxy-ca.crt", 0o644),
            ("front-proxy-ca.key", 0o600),
            ("front-proxy-client.crt", 0o644),
            ("front-proxy-client.key", 0o600),
            ("sa.key", 0o600),
            ("sa.pub", 0o644),
        ]
        .iter()
        .map(|(name, mode)| (format!("/etc/kubernetes/pki/{name}"), *mode))
        .collect();
        assert_eq!(listed, expected);
        for file in &files {
            let text = String::from_utf8(file.content.clone()).expect("PEM is text");
            let is_key = text.contains("PRIVATE KEY");
            assert_eq!(is_key, file.mode == 0o600, "{}", file.path.display());
        }
        let secrets = &config.cluster.secrets;
        let content = |name: &str| {
            let file = files.iter().find(|f| f.path.ends_with(name)).expect(name);
            String::from_utf8(file.content.clone()).expect("text")
        };
        assert_eq!(content("ca.crt"), secrets.kubernetes_ca.cert.as_str());
        assert_eq!(
            content("sa.key"),
            secrets.service_account_key.as_ref().unwrap().as_str()
        );
        assert!(content("sa.pub").starts_with("-----BEGIN PUBLIC KEY-----"));
    }

    #[test]
    fn leaves_are_reissued_at_each_call() {
        let config = config("controlplane");
        let first = control_plane(&config, &facts()).expect("first");
        let second = control_plane(&config, &facts()).expect("second");
        for (a, b) in first.iter().zip(&second) {
            let name = a.path.file_name().unwrap().to_string_lossy();
            let leaf = name.starts_with("apiserver") || name.starts_with("front-proxy-client");
            assert_eq!(a.content != b.content, leaf, "{name}");
        }
    }

    #[test]
    fn a_worker_gets_the_ca_certificate_alone() {
        let config = config("worker");
        let files = worker(&config).expect("files");
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].path, Path::new("/etc/kubernetes/pki/ca.crt"));
        assert_eq!(files[0].mode, 0o644);
        assert_eq!(
            files[0].content,
            config
                .cluster
                .secrets
                .kubernetes_ca
                .cert
                .as_str()
                .as_bytes()
        );
        // Even a control plane's config gives a worker no key.
        let files = worker(&self::config("controlplane")).expect("files");
        assert!(!String::from_utf8_lossy(&files[0].content).contains("PRIVATE KEY"));
    }

    #[test]
    fn missing_secrets_are_named_with_what_to_do() {
        let check = |edit: fn(&mut MachineConfig), expected: &str| {
            let mut config = config("controlplane");
            edit(&mut config);
            let err = control_plane(&config, &facts()).expect_err("refused");
            let message = err.to_string();
            assert!(message.contains(expected), "{message}");
            assert!(message.contains("machinectl gen config"), "{message}");
        };
        check(
            |c| c.cluster.secrets.kubernetes_ca.key = None,
            "cluster.secrets.kubernetes_ca.key is missing",
        );
        check(
            |c| c.cluster.secrets.front_proxy_ca = None,
            "cluster.secrets.front_proxy_ca is missing",
        );
        check(
            |c| c.cluster.secrets.front_proxy_ca.as_mut().unwrap().key = None,
            "cluster.secrets.front_proxy_ca.key is missing",
        );
        check(
            |c| c.cluster.secrets.service_account_key = None,
            "cluster.secrets.service_account_key is missing",
        );
        // A CA whose key is another CA's cannot sign.
        check(
            |c| {
                let other = c.cluster.secrets.etcd_ca.clone().unwrap();
                c.cluster.secrets.kubernetes_ca.key = other.key;
            },
            "cannot issue apiserver (kube-apiserver) from cluster.secrets.kubernetes_ca",
        );
    }

    #[test]
    fn the_ca_hash_is_sha256_of_the_public_key_in_hex() {
        let config = config("worker");
        let hash = ca_cert_hash(config.cluster.secrets.kubernetes_ca.cert.as_str()).unwrap();
        let hex = hash.strip_prefix("sha256:").expect("prefix");
        assert_eq!(hex.len(), 64);
        assert!(
            hex.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        let err = ca_cert_hash("not a certificate").expect_err("refused");
        assert!(
            err.to_string().contains("cannot pin the CA's public key"),
            "{err}"
        );
    }
}
