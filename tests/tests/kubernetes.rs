//! The Kubernetes node (issue 20) end to end, on a local cluster of one control plane and
//! one worker, judged by the real tools: `openssl`, Debian's `kubectl`, Debian's
//! python3-kubernetes, Debian's `docker-registry` and `skopeo`, and Python's HTTP server.
//!
//! No kubelet, API server or control-plane image is reachable from this machine, so the
//! test serves a **kubelet stand-in** (`tests/kubelet-standin`, not a kubelet: it records
//! its argv, config files and starts, and answers `/healthz`) at the upstream release
//! layout, and pushes small test images under the control-plane images' names into a
//! real registry. What it exercises is the node's side: kubeadm's files, the image pulls
//! before the kubelet, the kubelet's fetch, verify, supervise and restart path, the
//! refusal of a wrong sum, and `machinectl kubeconfig`. It does not exercise Kubernetes.
//!
//! - the control plane's certificates verify against their CAs with kubeadm's SANs; its
//!   kubeconfigs are accepted by `kubectl config view` and carry kubeadm's identities;
//! - its static pod manifests and bootstrap manifests decode as their Kubernetes types
//!   with python3-kubernetes (and back to the same document), and the static pods'
//!   flags are kubeadm's for the version;
//! - the images are pulled from the registry the config names before the kubelet starts,
//!   and `machinectl images` lists them; `machinectl image pull` pulls another;
//! - the stand-in is fetched with the right sum, run with the generated flags and
//!   configuration, restarted with backoff when killed, and restarted with new flags by
//!   a live `apply-config` of `machine.kubelet`;
//! - the worker, pinned to a wrong sum, refuses the binary with the URL and both sums on
//!   its console and in `health`; its files hold the bootstrap token and the CA's hash
//!   and no private key;
//! - `machinectl kubeconfig` merges a context into an existing kubeconfig as kubectl
//!   users expect.
//!
//! Runs as root (the namespace); the image is `KEELSON_TEST_IMAGE_AMD64` when set, else
//! the suite's built image.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use keelson_tests::cluster_env::{Cleanup, Env, Node, is_root, poll};
use keelson_tests::http_server::{HttpServer, layout_kubelet};
use keelson_tests::registry::Registry;
use keelson_tests::{Arch, kubelet_standin, show, test_image};
use serde_json::Value;

/// The cluster's gateway, where the test's registry and release site listen.
const GATEWAY: &str = "10.5.0.1";
const REGISTRY_PORT: u16 = 5000;
const RELEASE_PORT: u16 = 8080;
/// The version `gen config` (and so `cluster create`) configures.
const VERSION_TAG: &str = "v1.34.1";
/// Debian's python3, which has python3-kubernetes (not a pyenv's on PATH).
const PYTHON: &str = "/usr/bin/python3";

struct Cluster<'a> {
    env: &'a Env,
    name: String,
}

impl Cluster<'_> {
    fn on(&self, node: &Node, args: &[&str]) -> Output {
        self.env.on(node, args)
    }

    fn ok_on(&self, node: &Node, args: &[&str]) -> String {
        self.env.ok_on(node, args)
    }

    fn json_on(&self, node: &Node, args: &[&str]) -> Value {
        self.env.json_on(node, args)
    }

    /// A file of the node, through the API (`read`, admin).
    fn read(&self, node: &Node, path: &str) -> String {
        self.ok_on(node, &["read", path])
    }

    /// The node's health checks as (name, ok, reason), whatever the exit status.
    fn health(&self, node: &Node) -> Vec<(String, bool, String)> {
        let out = self.on(node, &["health", "-o", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("health of {}: {e}: {}", node.name, show(&out)));
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["check"].as_str().unwrap_or_default().to_owned(),
                    c["ok"] == true,
                    c["reason"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    fn check(&self, node: &Node, name: &str) -> Option<(bool, String)> {
        self.health(node)
            .into_iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, ok, reason)| (ok, reason))
    }

    /// The state of the kubelet service on `node`.
    fn kubelet_state(&self, node: &Node) -> String {
        let v = self.json_on(node, &["services"]);
        v.as_array()
            .unwrap()
            .iter()
            .find(|s| s["service"] == "kubelet")
            .map(|s| s["state"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_else(|| panic!("no kubelet service on {}: {v:#}", node.name))
    }

    /// Waits until `node`'s kubelet runs under PID 1 and its `/healthz` answers.
    fn wait_kubelet_running(&self, node: &Node, what: &str) {
        poll(Duration::from_secs(600), || {
            let kubelet_ready = self
                .check(node, "service kubelet")
                .is_some_and(|(ok, r)| ok && r.contains("ready"));
            match self.check(node, "kubernetes") {
                Some((true, reason)) if reason.contains("runs under PID 1") && kubelet_ready => {
                    Ok(())
                }
                other => Err(format!(
                    "{what} never ran on {}: {other:?}\n{}",
                    node.name,
                    keelson_tests::tail(&self.console(node), 30)
                )),
            }
        });
    }

    fn console(&self, node: &Node) -> String {
        let path = self
            .env
            .cluster_dir(&self.name)
            .join("nodes")
            .join(&node.name)
            .join("console.log");
        std::fs::read_to_string(&path).unwrap_or_default()
    }
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", show(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kubectl(args: &[&str]) -> String {
    let out = Command::new("kubectl").args(args).output().unwrap();
    assert!(out.status.success(), "kubectl {args:?}: {}", show(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a Python program with Debian's python3 and `input` on stdin.
fn python(program: &str, input: &str) -> Output {
    let mut child = Command::new(PYTHON)
        .args(["-c", program])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// YAML to JSON with PyYAML (a dependency of python3-kubernetes).
fn yaml_to_json(yaml: &str) -> Value {
    let out = python(
        "import sys, json, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))",
        yaml,
    );
    assert!(out.status.success(), "yaml: {}", show(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Decodes a Kubernetes object (YAML) into its python3-kubernetes model, named from its
/// apiVersion and kind (V1Pod, V1ClusterRoleBinding, ...), and serializes it back: the
/// round trip must give the same document (an unknown or mistyped field would be lost or
/// changed). Returns the model's class name.
fn decode_with_python_kubernetes(yaml: &str) -> String {
    const PROGRAM: &str = r#"
import sys, json, yaml
from kubernetes import client
doc = yaml.safe_load(sys.stdin)
version = doc["apiVersion"].split("/")[-1]
name = version[0].upper() + version[1:] + doc["kind"]
api = client.ApiClient()
class Resp:
    def __init__(self, data): self.data = data
obj = api.deserialize(Resp(json.dumps(doc)), name)
back = api.sanitize_for_serialization(obj)
def norm(v):
    if isinstance(v, dict):
        return {k: norm(x) for k, x in v.items() if x not in (None, {}, [])}
    if isinstance(v, list):
        return [norm(x) for x in v]
    return v
if norm(back) != norm(doc):
    print("round trip changed the document:\n" + json.dumps(norm(doc), sort_keys=True) + "\n" + json.dumps(norm(back), sort_keys=True), file=sys.stderr)
    sys.exit(1)
print(name)
"#;
    let out = python(PROGRAM, yaml);
    assert!(
        out.status.success(),
        "python3-kubernetes does not take:\n{yaml}\n{}",
        show(&out)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The SANs of a certificate as openssl prints them (`DNS:x`, `IP Address:y`).
fn sans(cert: &Path) -> BTreeSet<String> {
    let text = openssl(&[
        "x509",
        "-noout",
        "-ext",
        "subjectAltName",
        "-in",
        cert.to_str().unwrap(),
    ]);
    text.lines()
        .skip(1)
        .flat_map(|l| l.split(','))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn subject(cert: &Path) -> String {
    openssl(&[
        "x509",
        "-noout",
        "-subject",
        "-nameopt",
        "RFC2253",
        "-in",
        cert.to_str().unwrap(),
    ])
    .trim()
    .to_owned()
}

/// The client certificate of a kubeconfig's first user, as kubectl reads it, written to
/// `out` as PEM.
fn client_certificate(kubeconfig: &Path, out: &Path) {
    let view: Value = serde_json::from_str(&kubectl(&[
        "config",
        "view",
        "--raw",
        "-o",
        "json",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ]))
    .unwrap();
    let data = view["users"][0]["user"]["client-certificate-data"]
        .as_str()
        .unwrap();
    let pem = python(
        "import sys, base64; sys.stdout.write(base64.b64decode(sys.stdin.read()).decode())",
        data,
    );
    std::fs::write(out, &pem.stdout).unwrap();
}

/// The context names of a kubeconfig, as kubectl lists them.
fn context_names(kubeconfig: &Path) -> BTreeSet<String> {
    kubectl(&[
        "config",
        "get-contexts",
        "-o",
        "name",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ])
    .lines()
    .map(str::to_owned)
    .collect()
}

/// kubeadm's flag names of each static pod (cmd/kubeadm/app/phases/controlplane/manifests.go,
/// release-1.34; the same on 1.31 to 1.34), plus Keelson's documented additions:
/// `encryption-provider-config` (the config's encryption key) and
/// `flex-volume-plugin-dir` (the root is read-only).
fn kubeadm_flags(component: &str) -> BTreeSet<&'static str> {
    let names: &[&str] = match component {
        "kube-apiserver" => &[
            "advertise-address",
            "allow-privileged",
            "authorization-mode",
            "client-ca-file",
            "enable-admission-plugins",
            "enable-bootstrap-token-auth",
            "etcd-cafile",
            "etcd-certfile",
            "etcd-keyfile",
            "etcd-servers",
            "kubelet-client-certificate",
            "kubelet-client-key",
            "kubelet-preferred-address-types",
            "proxy-client-cert-file",
            "proxy-client-key-file",
            "requestheader-allowed-names",
            "requestheader-client-ca-file",
            "requestheader-extra-headers-prefix",
            "requestheader-group-headers",
            "requestheader-username-headers",
            "secure-port",
            "service-account-issuer",
            "service-account-key-file",
            "service-account-signing-key-file",
            "service-cluster-ip-range",
            "tls-cert-file",
            "tls-private-key-file",
            "encryption-provider-config",
        ],
        "kube-controller-manager" => &[
            "allocate-node-cidrs",
            "authentication-kubeconfig",
            "authorization-kubeconfig",
            "bind-address",
            "client-ca-file",
            "cluster-cidr",
            "cluster-name",
            "cluster-signing-cert-file",
            "cluster-signing-key-file",
            "controllers",
            "kubeconfig",
            "leader-elect",
            "requestheader-client-ca-file",
            "root-ca-file",
            "service-account-private-key-file",
            "service-cluster-ip-range",
            "use-service-account-credentials",
            "flex-volume-plugin-dir",
        ],
        "kube-scheduler" => &[
            "authentication-kubeconfig",
            "authorization-kubeconfig",
            "bind-address",
            "kubeconfig",
            "leader-elect",
        ],
        other => panic!("no flag table for {other}"),
    };
    names.iter().copied().collect()
}

/// The flags of a static pod's command, by name.
fn pod_flags(pod: &Value) -> Vec<(String, String)> {
    pod["spec"]["containers"][0]["command"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .map(|a| {
            let a = a.as_str().unwrap().trim_start_matches("--");
            let (k, v) = a.split_once('=').unwrap_or((a, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[test]
fn the_kubernetes_node_from_its_config_with_a_kubelet_stand_in() {
    assert!(
        is_root(),
        "this test serves a registry and a release site inside the cluster's network namespace: run it as root"
    );
    let env = Env::new(None);
    let name = format!("e2ek8s{}", std::process::id());
    let _cleanup = Cleanup(&env, name.clone());

    // The kubelet stand-in and its sum; the worker is pinned to another sum.
    let standin = kubelet_standin::build(Arch::Amd64);
    let right = kubelet_standin::sha256_hex(&standin);
    let wrong = "0123456789abcdef".repeat(4);
    let release = format!("http://{GATEWAY}:{RELEASE_PORT}/release");
    let registry_host = format!("{GATEWAY}:{REGISTRY_PORT}");
    let dir = env.dir.path();
    let all = dir.join("all.toml");
    std::fs::write(
        &all,
        format!(
            "[machine.registries.mirrors.\"{registry_host}\"]\nendpoints = [\"http://{registry_host}\"]\n\n\
             [cluster]\nimage_repository = \"{registry_host}\"\n\n\
             [cluster.kubelet]\nbase_url = \"{release}\"\n"
        ),
    )
    .unwrap();
    let cp_patch = dir.join("cp.toml");
    std::fs::write(
        &cp_patch,
        format!("[cluster.kubelet]\nsha256 = {{ amd64 = \"{right}\" }}\n"),
    )
    .unwrap();
    let worker_patch = dir.join("worker.toml");
    std::fs::write(
        &worker_patch,
        format!("[cluster.kubelet]\nsha256 = {{ amd64 = \"{wrong}\" }}\n"),
    )
    .unwrap();
    let image = test_image(Arch::Amd64).unwrap();
    env.create(
        &name,
        &[
            "--controlplanes",
            "1",
            "--workers",
            "1",
            "--cpus",
            "1",
            "--memory",
            "1024",
            "--config-patch",
            all.to_str().unwrap(),
            "--config-patch-control-plane",
            cp_patch.to_str().unwrap(),
            "--config-patch-worker",
            worker_patch.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
        ],
    );
    let nodes = env.nodes(&name);
    let (cp, worker) = {
        let cp = nodes
            .iter()
            .find(|n| n.name.contains("controlplane"))
            .cloned();
        let worker = nodes.iter().find(|n| n.name.contains("worker")).cloned();
        (cp.unwrap(), worker.unwrap())
    };
    let cluster = Cluster {
        env: &env,
        name: name.clone(),
    };
    let ns = format!("keelson-{name}");

    // Until the registry answers, the control plane cannot pull, and says so.
    poll(Duration::from_secs(180), || {
        match cluster.check(&cp, "kubernetes") {
            Some((false, reason)) if reason.contains("cannot pull") => Ok(()),
            other => Err(format!(
                "the control plane does not say it cannot pull: {other:?}"
            )),
        }
    });
    assert_eq!(
        cluster.kubelet_state(&cp),
        "stopped",
        "the kubelet ran before its images were pulled"
    );

    // The registry with the control-plane images, and the release site with the stand-in.
    let gateway: IpAddr = GATEWAY.parse().unwrap();
    let registry = Registry::start(Some(&ns), gateway, REGISTRY_PORT).unwrap();
    for repository in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kube-proxy",
    ] {
        registry.push_test_image(repository, VERSION_TAG).unwrap();
    }
    registry.push_test_image("coredns", "v1.12.1").unwrap();
    registry.push_test_image("pause", "3.10.1").unwrap();
    let site = tempfile::tempdir().unwrap();
    layout_kubelet(
        &site.path().join("release"),
        VERSION_TAG,
        Arch::Amd64,
        &standin,
    )
    .unwrap();
    let _site = HttpServer::start(Some(&ns), gateway, RELEASE_PORT, site.path()).unwrap();

    // The control plane pulls, fetches, verifies and starts the stand-in.
    cluster.wait_kubelet_running(&cp, "the kubelet stand-in");
    let images = cluster.ok_on(&cp, &["images"]);
    for repository in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kube-proxy",
    ] {
        let want = format!("{registry_host}/{repository}:{VERSION_TAG}");
        assert!(images.contains(&want), "{want} is not listed:\n{images}");
    }
    assert!(
        images.contains(&format!("{registry_host}/pause:3.10.1")),
        "{images}"
    );
    // An operator's pull through the API.
    registry.push_test_image("tools/debug", "v1").unwrap();
    let pulled = cluster.ok_on(
        &cp,
        &["image", "pull", &format!("{registry_host}/tools/debug:v1")],
    );
    assert!(!pulled.trim().is_empty(), "image pull printed nothing");
    assert!(
        cluster
            .ok_on(&cp, &["images"])
            .contains(&format!("{registry_host}/tools/debug:v1")),
        "the pulled image is not listed"
    );

    // The stand-in ran with the generated flags and configuration.
    let argv: Vec<String> =
        serde_json::from_str(&cluster.read(&cp, "/var/lib/kubelet/standin/argv.json")).unwrap();
    let args_file = cluster.read(&cp, "/var/lib/keelson/kubelet.args");
    let written: Vec<&str> = args_file
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(&argv[1..], written.as_slice(), "argv is not the flags file");
    let hostname = cluster
        .read(&cp, "/proc/sys/kernel/hostname")
        .trim()
        .to_owned();
    for want in [
        "--config=/var/lib/kubelet/config.yaml".to_owned(),
        "--kubeconfig=/etc/kubernetes/kubelet.conf".to_owned(),
        format!("--node-ip={}", cp.address),
        format!("--hostname-override={hostname}"),
    ] {
        assert!(argv.contains(&want), "{want} not in {argv:?}");
    }
    let config_yaml = cluster.read(&cp, "/var/lib/kubelet/config.yaml");
    assert_eq!(
        cluster.read(&cp, "/var/lib/kubelet/standin/config.yaml"),
        config_yaml,
        "the stand-in did not read the configuration the node wrote"
    );
    let kubelet_config = yaml_to_json(&config_yaml);
    assert_eq!(kubelet_config["kind"], "KubeletConfiguration");
    assert_eq!(
        kubelet_config["cgroupDriver"], "cgroupfs",
        "{kubelet_config:#}"
    );
    assert_eq!(
        kubelet_config["clusterDNS"][0], "10.96.0.10",
        "{kubelet_config:#}"
    );
    assert_eq!(kubelet_config["clusterDomain"], "cluster.local");
    assert_eq!(kubelet_config["staticPodPath"], "/etc/kubernetes/manifests");
    assert_eq!(kubelet_config["rotateCertificates"], true);
    assert_eq!(kubelet_config["healthzPort"], 10248);
    assert!(
        kubelet_config["systemReserved"].is_object(),
        "{kubelet_config:#}"
    );
    // Killed, it is restarted with backoff.
    let starts = |node: &Node| -> u32 {
        cluster
            .read(node, "/var/lib/kubelet/standin/starts")
            .trim()
            .parse()
            .unwrap()
    };
    let before = starts(&cp);
    cluster.ok_on(&cp, &["service", "kubelet", "kill"]);
    poll(Duration::from_secs(120), || {
        (starts(&cp) > before)
            .then_some(())
            .ok_or_else(|| "the killed kubelet stand-in was not started again".to_owned())
    });
    let log = cluster.read(&cp, "/var/lib/kubelet/standin/starts.log");
    let times: Vec<f64> = log
        .lines()
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .collect();
    assert!(times.len() >= 2, "starts.log: {log}");
    let gap = times[times.len() - 1] - times[times.len() - 2];
    assert!(
        gap >= 1.0,
        "restarted after {gap} s, without backoff: {log}"
    );

    // A live apply of machine.kubelet restarts it with its new flags.
    let config_path = env
        .cluster_dir(&name)
        .join("nodes")
        .join(&cp.name)
        .join("config.toml");
    let mut config_text = std::fs::read_to_string(&config_path).unwrap();
    assert!(
        !config_text.contains("[machine.kubelet.extra_args]"),
        "{config_text}"
    );
    config_text.push_str("\n[machine.kubelet.extra_args]\nv = \"3\"\n");
    let new_config = dir.join("cp-v3.toml");
    std::fs::write(&new_config, &config_text).unwrap();
    let before = starts(&cp);
    let applied = cluster.ok_on(
        &cp,
        &[
            "apply-config",
            "-f",
            new_config.to_str().unwrap(),
            "-m",
            "no-reboot",
        ],
    );
    assert!(applied.contains("restarted"), "{applied}");
    poll(Duration::from_secs(120), || {
        let argv = cluster.read(&cp, "/var/lib/kubelet/standin/argv.json");
        (starts(&cp) > before && argv.contains("--v=3"))
            .then_some(())
            .ok_or_else(|| format!("the kubelet was not restarted with --v=3: {argv}"))
    });

    // Certificates: openssl verifies each against its CA, with kubeadm's SANs.
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    for file in [
        "ca.crt",
        "apiserver.crt",
        "apiserver-kubelet-client.crt",
        "front-proxy-ca.crt",
        "front-proxy-client.crt",
        "sa.pub",
        "sa.key",
        "apiserver-etcd-client.crt",
        "etcd/ca.crt",
    ] {
        let text = cluster.read(&cp, &format!("/etc/kubernetes/pki/{file}"));
        let local = pki.join(file.replace('/', "-"));
        std::fs::write(&local, text).unwrap();
    }
    let p = |f: &str| pki.join(f).to_str().unwrap().to_owned();
    for (ca, leaf) in [
        ("ca.crt", "apiserver.crt"),
        ("ca.crt", "apiserver-kubelet-client.crt"),
        ("front-proxy-ca.crt", "front-proxy-client.crt"),
        ("etcd-ca.crt", "apiserver-etcd-client.crt"),
    ] {
        let said = openssl(&["verify", "-CAfile", &p(ca), &p(leaf)]);
        assert!(said.contains(": OK"), "{leaf}: {said}");
    }
    let want: BTreeSet<String> = [
        format!("DNS:{hostname}"),
        "DNS:kubernetes".into(),
        "DNS:kubernetes.default".into(),
        "DNS:kubernetes.default.svc".into(),
        "DNS:kubernetes.default.svc.cluster.local".into(),
        "IP Address:10.96.0.1".into(),
        format!("IP Address:{}", cp.address),
    ]
    .into_iter()
    .collect();
    let got = sans(&pki.join("apiserver.crt"));
    assert!(
        want.is_subset(&got),
        "the apiserver certificate lacks kubeadm's SANs {:?}: {got:?}",
        want.difference(&got).collect::<Vec<_>>()
    );
    assert!(
        subject(&pki.join("apiserver-kubelet-client.crt"))
            .contains("CN=kube-apiserver-kubelet-client"),
    );
    assert!(subject(&pki.join("front-proxy-client.crt")).contains("CN=front-proxy-client"));
    assert_eq!(
        openssl(&["pkey", "-in", &p("sa.key"), "-pubout"]).trim(),
        std::fs::read_to_string(pki.join("sa.pub")).unwrap().trim(),
        "sa.pub is not sa.key's public key"
    );

    // kubeconfigs: kubectl takes each, with kubeadm's identities.
    for (file, cn, org) in [
        (
            "admin.conf",
            "kubernetes-admin",
            Some("kubeadm:cluster-admins"),
        ),
        (
            "super-admin.conf",
            "kubernetes-super-admin",
            Some("system:masters"),
        ),
        (
            "kubelet.conf",
            &*format!("system:node:{hostname}"),
            Some("system:nodes"),
        ),
        (
            "controller-manager.conf",
            "system:kube-controller-manager",
            None,
        ),
        ("scheduler.conf", "system:kube-scheduler", None),
    ] {
        let local = dir.join(file);
        std::fs::write(
            &local,
            cluster.read(&cp, &format!("/etc/kubernetes/{file}")),
        )
        .unwrap();
        let path = local.to_str().unwrap();
        kubectl(&["config", "get-contexts", "--kubeconfig", path]);
        let cert = dir.join(format!("{file}.crt"));
        client_certificate(&local, &cert);
        let subj = subject(&cert);
        assert!(subj.contains(&format!("CN={cn}")), "{file}: {subj}");
        if let Some(org) = org {
            assert!(subj.contains(&format!("O={org}")), "{file}: {subj}");
        }
        let said = openssl(&["verify", "-CAfile", &p("ca.crt"), cert.to_str().unwrap()]);
        assert!(said.contains(": OK"), "{file}: {said}");
    }

    // Static pods: python3-kubernetes decodes them; their flags are kubeadm's.
    for component in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ] {
        let yaml = cluster.read(&cp, &format!("/etc/kubernetes/manifests/{component}.yaml"));
        assert_eq!(decode_with_python_kubernetes(&yaml), "V1Pod", "{component}");
        let pod = yaml_to_json(&yaml);
        let flags = pod_flags(&pod);
        let names: BTreeSet<&str> = flags.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, kubeadm_flags(component), "{component}'s flags");
        assert_eq!(
            pod["spec"]["containers"][0]["image"],
            format!("{registry_host}/{component}:{VERSION_TAG}")
        );
        let value = |k: &str| flags.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        if component == "kube-apiserver" {
            assert_eq!(
                value("advertise-address").as_deref(),
                Some(cp.address.as_str())
            );
            assert_eq!(
                value("service-cluster-ip-range").as_deref(),
                Some("10.96.0.0/12")
            );
            assert_eq!(value("authorization-mode").as_deref(), Some("Node,RBAC"));
            assert_eq!(
                value("etcd-servers").as_deref(),
                Some("https://127.0.0.1:2379")
            );
            let encryption = cluster.read(&cp, &value("encryption-provider-config").unwrap());
            let encryption = yaml_to_json(&encryption);
            assert_eq!(
                encryption["kind"], "EncryptionConfiguration",
                "{encryption:#}"
            );
        }
    }

    // Bootstrap manifests: every object decodes as its Kubernetes type.
    let node_config = keelson_configs::check_str(
        &std::fs::read_to_string(&config_path).unwrap(),
        "config.toml",
        keelson_configs::Mode::Metal,
    )
    .config
    .unwrap();
    let facts = keelson_kube::NodeFacts {
        node_name: hostname.clone(),
        addresses: vec![cp.address.parse().unwrap()],
        node_ip: cp.address.parse().unwrap(),
        arch: Arch::Amd64,
    };
    let objects = keelson_kube::addons::render(&node_config, &facts).unwrap();
    let files = keelson_kube::addons::files(&objects).unwrap();
    let mut kinds = BTreeSet::new();
    for file in &files {
        let yaml = cluster.read(&cp, file.path.to_str().unwrap());
        kinds.insert(decode_with_python_kubernetes(&yaml));
    }
    for kind in [
        "V1Secret",
        "V1ClusterRoleBinding",
        "V1ConfigMap",
        "V1Deployment",
        "V1DaemonSet",
        "V1Service",
        "V1Node",
    ] {
        assert!(
            kinds.contains(kind),
            "no {kind} among the bootstrap manifests: {kinds:?}"
        );
    }

    // health: the kubelet, and the static pods (which the stand-in never runs).
    let health = cluster.health(&cp);
    for component in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ] {
        let check = health
            .iter()
            .find(|(n, _, _)| n == &format!("static pod {component}"));
        assert!(
            matches!(check, Some((_, false, reason)) if reason.contains("no container")),
            "{component}: {check:?}"
        );
    }

    // The worker refuses the binary whose sum is not the pinned one.
    let url = format!("{release}/{VERSION_TAG}/bin/linux/amd64/kubelet");
    let reason = poll(Duration::from_secs(300), || {
        match cluster.check(&worker, "kubernetes") {
            Some((false, reason)) if reason.contains(&wrong) => Ok(reason),
            other => Err(format!("the worker did not refuse the kubelet: {other:?}")),
        }
    });
    assert!(reason.contains(&url) && reason.contains(&right), "{reason}");
    let console = cluster.console(&worker);
    assert!(
        console
            .lines()
            .any(|l| l.contains(&url) && l.contains(&wrong) && l.contains(&right)),
        "the worker's console does not say the URL and both sums:\n{}",
        keelson_tests::tail(&console, 30)
    );
    assert_eq!(
        cluster.kubelet_state(&worker),
        "stopped",
        "the refused kubelet ran"
    );

    // The worker's files: the bootstrap token and the CA's hash, no private key.
    let bootstrap = cluster.read(&worker, "/etc/kubernetes/bootstrap-kubelet.conf");
    let local = dir.join("bootstrap-kubelet.conf");
    std::fs::write(&local, &bootstrap).unwrap();
    kubectl(&["config", "view", "--kubeconfig", local.to_str().unwrap()]);
    let token = node_config.cluster.secrets.bootstrap_token.to_string();
    assert!(
        bootstrap.contains(&token),
        "no bootstrap token:\n{bootstrap}"
    );
    let spki = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl x509 -pubkey -noout -in {} | openssl pkey -pubin -outform der | sha256sum",
            p("ca.crt")
        ))
        .output()
        .unwrap();
    let hash = String::from_utf8_lossy(&spki.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert!(
        bootstrap.contains(&format!("sha256:{hash}")),
        "no CA hash sha256:{hash}:\n{bootstrap}"
    );
    assert_eq!(
        cluster.read(&worker, "/etc/kubernetes/pki/ca.crt").trim(),
        std::fs::read_to_string(pki.join("ca.crt")).unwrap().trim()
    );
    for secret in [
        "/etc/kubernetes/pki/ca.key",
        "/etc/kubernetes/pki/sa.key",
        "/etc/kubernetes/pki/front-proxy-ca.key",
        "/etc/kubernetes/pki/etcd/ca.key",
        "/etc/kubernetes/admin.conf",
        "/etc/kubernetes/super-admin.conf",
    ] {
        let out = cluster.on(&worker, &["read", secret]);
        assert!(!out.status.success(), "the worker has {secret}");
    }
    // Nor does its config carry one.
    let worker_config = keelson_configs::check_str(
        &std::fs::read_to_string(
            env.cluster_dir(&name)
                .join("nodes")
                .join(&worker.name)
                .join("config.toml"),
        )
        .unwrap(),
        "worker.toml",
        keelson_configs::Mode::Metal,
    )
    .config
    .unwrap();
    let secrets = &worker_config.cluster.secrets;
    assert!(
        secrets.cas().iter().all(|(_, ca)| ca.key.is_none())
            && secrets.service_account_key.is_none(),
        "the worker's config carries a private key"
    );

    // machinectl kubeconfig: merged into an existing kubeconfig, as kubectl users expect.
    let kube_dir = dir.join("kube");
    std::fs::create_dir_all(&kube_dir).unwrap();
    let merged = kube_dir.join("config");
    std::fs::write(
        &merged,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: other\n  cluster:\n    server: https://192.0.2.10:6443\n\
         users:\n- name: other\n  user:\n    token: abc\ncontexts:\n- name: other\n  context:\n    cluster: other\n    user: other\n\
         current-context: other\n",
    )
    .unwrap();
    let said = cluster.ok_on(&cp, &["kubeconfig", merged.to_str().unwrap()]);
    let context = format!("admin@{}", node_config.cluster.name);
    assert!(said.contains(&context), "{said}");
    let contexts = context_names(&merged);
    assert!(
        contexts.contains("other") && contexts.contains(&context),
        "{contexts:?}"
    );
    assert_eq!(
        kubectl(&[
            "config",
            "current-context",
            "--kubeconfig",
            merged.to_str().unwrap()
        ])
        .trim(),
        context
    );
    let again = cluster.on(&cp, &["kubeconfig", merged.to_str().unwrap()]);
    assert!(
        !again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--force"),
        "a second merge over the same names was not refused: {}",
        show(&again)
    );
    cluster.ok_on(&cp, &["kubeconfig", "--force", merged.to_str().unwrap()]);
    let alone = kube_dir.join("alone");
    cluster.ok_on(
        &cp,
        &["kubeconfig", "--merge=false", alone.to_str().unwrap()],
    );
    assert_eq!(context_names(&alone), BTreeSet::from([context.clone()]));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&alone).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    // The admin certificate verifies against the cluster's CA.
    let cert = dir.join("minted.crt");
    client_certificate(&alone, &cert);
    assert!(openssl(&["verify", "-CAfile", &p("ca.crt"), cert.to_str().unwrap()]).contains(": OK"));
    assert!(subject(&cert).contains("O=kubeadm:cluster-admins"));

    drop(registry);
    env.destroy_and_check(&name);
}

/// kubeadm's images of the default repository for the version `cluster create`
/// configures (checked below against what the node asks for).
const UPSTREAM_IMAGES: [&str; 6] = [
    "registry.k8s.io/kube-apiserver:v1.34.1",
    "registry.k8s.io/kube-controller-manager:v1.34.1",
    "registry.k8s.io/kube-scheduler:v1.34.1",
    "registry.k8s.io/kube-proxy:v1.34.1",
    "registry.k8s.io/coredns/coredns:v1.12.1",
    "registry.k8s.io/pause:3.10.1",
];

/// An air-gapped image (`cargo xtask image --kubernetes DIR`, here the same build through
/// the imager's library from the suite's image inputs): the kubelet stand-in baked in at
/// `/usr/bin/kubelet` and the control-plane images as OCI archives. A control plane
/// with the default config (upstream registry and release site, no sum pinned; none of
/// them reachable) imports the archives, pulls nothing, fetches nothing, and runs the
/// image's kubelet.
#[test]
fn an_air_gapped_image_runs_its_baked_kubelet_and_imports_its_images() {
    assert!(
        is_root(),
        "this test makes a cluster network namespace: run it as root"
    );
    let arch = Arch::Amd64;
    let inputs = keelson_tests::image_dir(arch).join("build-inputs.toml");
    let text = std::fs::read_to_string(&inputs)
        .unwrap_or_else(|e| panic!("{}: {e} (written by cargo xtask image)", inputs.display()));
    let opts = keelson_imager::build::BuildOptions::from_inputs_toml(&text).unwrap();
    let baked = tempfile::tempdir().unwrap();
    std::fs::copy(kubelet_standin::build(arch), baked.path().join("kubelet")).unwrap();
    let archives = baked.path().join("images");
    std::fs::create_dir(&archives).unwrap();
    for (i, reference) in UPSTREAM_IMAGES.iter().enumerate() {
        keelson_tests::registry::write_test_image_archive(
            &archives.join(format!("{i}.tar")),
            reference,
        )
        .unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    keelson_imager::build::build(
        &keelson_imager::build::BuildOptions {
            out_dir: out.path().to_path_buf(),
            formats: vec![],
            reuse_derived: true,
            kubernetes: Some(baked.path().to_path_buf()),
            ..opts
        },
        &keelson_imager::debian::quiet_progress,
    )
    .unwrap();

    let env = Env::new(None);
    let name = format!("e2eairgap{}", std::process::id());
    let _cleanup = Cleanup(&env, name.clone());
    let image = out.path().join("keelson.raw");
    env.create(
        &name,
        &[
            "--controlplanes",
            "1",
            "--workers",
            "0",
            "--cpus",
            "1",
            "--memory",
            "1024",
            "--image",
            image.to_str().unwrap(),
        ],
    );
    let cp = env.nodes(&name).remove(0);
    let cluster = Cluster {
        env: &env,
        name: name.clone(),
    };
    let config_path = env
        .cluster_dir(&name)
        .join("nodes")
        .join(&cp.name)
        .join("config.toml");
    let config = keelson_configs::check_str(
        &std::fs::read_to_string(&config_path).unwrap(),
        "config.toml",
        keelson_configs::Mode::Metal,
    )
    .config
    .unwrap();
    assert_eq!(
        keelson_kube::images::control_plane(&config),
        UPSTREAM_IMAGES
    );
    assert!(config.cluster.kubelet.sha256.is_empty());

    cluster.wait_kubelet_running(&cp, "the baked kubelet");
    let argv: Vec<String> =
        serde_json::from_str(&cluster.read(&cp, "/var/lib/kubelet/standin/argv.json")).unwrap();
    assert_eq!(argv[0], "/usr/bin/kubelet", "{argv:?}");
    let images = cluster.ok_on(&cp, &["images"]);
    for reference in UPSTREAM_IMAGES {
        assert!(
            images.contains(reference),
            "{reference} was not imported:\n{images}"
        );
    }
    let console = cluster.console(&cp);
    assert!(
        !console.contains("fetching the kubelet") && !console.contains("pulling "),
        "the air-gapped node fetched or pulled:\n{}",
        keelson_tests::tail(&console, 30)
    );
    env.destroy_and_check(&name);
}
