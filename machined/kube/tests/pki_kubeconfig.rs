//! The certificates and kubeconfigs a node renders, judged by the real tools: `openssl`
//! verifies every leaf against its CA and prints the API server's SANs, which must be
//! kubeadm's; `openssl` and `sha256sum` compute the CA pin as kubeadm's documentation
//! does; `kubectl config view` and `kubectl config get-contexts` accept every kubeconfig,
//! a worker's bootstrap kubeconfig and a merged `~/.kube/config`.
//!
//! A tool missing from `/usr/bin` skips its test with a printed line, unless
//! `KEELSON_REQUIRE_TOOLS=1`, which makes it a failure.

// Test helpers panic on purpose when a fixture or a tool is broken.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use base64::Engine as _;
use keelson_configs::generate::node_secrets;
use keelson_configs::layout::Arch;
use keelson_configs::schema::MachineConfig;
use keelson_configs::secrets::ClusterSecrets;
use keelson_configs::{Mode, check_str};
use keelson_kube::{NodeFacts, NodeFile, kubeconfig, pki};

/// The fixture config `kind` with freshly generated secrets.
fn config(kind: &str) -> MachineConfig {
    let text = match kind {
        "controlplane" => include_str!("../../../configs/tests/data/controlplane.toml"),
        _ => include_str!("../../../configs/tests/data/worker.toml"),
    };
    let mut config = check_str(text, kind, Mode::Metal).into_result().unwrap();
    let secrets = ClusterSecrets::generate().unwrap();
    config.cluster.secrets = node_secrets(&secrets, config.machine.kind).unwrap();
    config
}

fn facts() -> NodeFacts {
    NodeFacts {
        node_name: "cp-1".into(),
        addresses: vec!["10.5.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
        node_ip: "10.5.0.2".parse().unwrap(),
        arch: Arch::Amd64,
    }
}

/// `/usr/bin/<name>`, or `None` (after saying so) when it is not installed; a failure
/// instead when `KEELSON_REQUIRE_TOOLS=1`.
fn tool(name: &str) -> Option<PathBuf> {
    let path = Path::new("/usr/bin").join(name);
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var("KEELSON_REQUIRE_TOOLS").as_deref() != Ok("1"),
        "{} is not installed and KEELSON_REQUIRE_TOOLS=1",
        path.display()
    );
    println!("skipping: {} is not installed", path.display());
    None
}

/// Runs `program args`, with `input` on its standard input, in `dir` with HOME there too.
fn run(dir: &Path, program: &Path, args: &[&str], input: Option<&[u8]>) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .env_remove("KUBECONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.unwrap_or_default()).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// Runs `program args` and gives its standard output; fails the test when it fails.
fn ok(dir: &Path, program: &Path, args: &[&str], input: Option<&[u8]>) -> String {
    let out = run(dir, program, args, input);
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Writes each file under `dir` by its name, with its mode.
fn write(dir: &Path, files: &[NodeFile]) {
    use std::os::unix::fs::PermissionsExt as _;
    for file in files {
        let path = dir.join(file.path.file_name().unwrap());
        std::fs::write(&path, &file.content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(file.mode)).unwrap();
    }
}

#[test]
fn openssl_verifies_every_control_plane_leaf_against_its_ca() {
    let Some(openssl) = tool("openssl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write(
        dir,
        &pki::control_plane(&config("controlplane"), &facts()).unwrap(),
    );

    for (ca, leaf, purpose) in [
        ("ca.crt", "apiserver.crt", "sslserver"),
        ("ca.crt", "apiserver-kubelet-client.crt", "sslclient"),
        ("front-proxy-ca.crt", "front-proxy-client.crt", "sslclient"),
    ] {
        let out = ok(
            dir,
            &openssl,
            &["verify", "-purpose", purpose, "-CAfile", ca, leaf],
            None,
        );
        assert_eq!(out, format!("{leaf}: OK\n"));
    }
    // The front-proxy client is not the cluster CA's: openssl refuses it.
    let out = run(
        dir,
        &openssl,
        &["verify", "-CAfile", "ca.crt", "front-proxy-client.crt"],
        None,
    );
    assert!(
        !out.status.success(),
        "a leaf verified against the wrong CA"
    );

    let subject = |cert: &str| {
        ok(
            dir,
            &openssl,
            &["x509", "-noout", "-subject", "-in", cert],
            None,
        )
    };
    assert_eq!(subject("apiserver.crt"), "subject=CN = kube-apiserver\n");
    assert_eq!(
        subject("apiserver-kubelet-client.crt"),
        "subject=O = kubeadm:cluster-admins, CN = kube-apiserver-kubelet-client\n"
    );
    assert_eq!(
        subject("front-proxy-client.crt"),
        "subject=CN = front-proxy-client\n"
    );

    // kubeadm's documented SANs (`kubeadm init phase certs apiserver`): the node name,
    // kubernetes, kubernetes.default, kubernetes.default.svc,
    // kubernetes.default.svc.<dns domain>, the service subnet's first address, the
    // advertised address; the endpoint's host (here the advertised address); then the
    // node's other address.
    let sans = ok(
        dir,
        &openssl,
        &[
            "x509",
            "-noout",
            "-ext",
            "subjectAltName",
            "-in",
            "apiserver.crt",
        ],
        None,
    );
    assert_eq!(
        sans,
        "X509v3 Subject Alternative Name: \n    DNS:cp-1, DNS:kubernetes, DNS:kubernetes.default, \
         DNS:kubernetes.default.svc, DNS:kubernetes.default.svc.cluster.local, \
         IP Address:10.96.0.1, IP Address:10.5.0.2, IP Address:FD00:0:0:0:0:0:0:2\n"
    );

    // sa.pub is sa.key's public half.
    let public = ok(dir, &openssl, &["pkey", "-pubout", "-in", "sa.key"], None);
    assert_eq!(public, std::fs::read_to_string(dir.join("sa.pub")).unwrap());
}

#[test]
fn the_ca_hash_is_what_openssl_and_sha256sum_compute() {
    let (Some(openssl), Some(sha256sum)) = (tool("openssl"), tool("sha256sum")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let config = config("worker");
    let ca = config.cluster.secrets.kubernetes_ca.cert.as_str();
    // openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | sha256sum
    let public = ok(
        dir,
        &openssl,
        &["x509", "-pubkey", "-noout"],
        Some(ca.as_bytes()),
    );
    let der = run(
        dir,
        &openssl,
        &["pkey", "-pubin", "-outform", "der"],
        Some(public.as_bytes()),
    );
    assert!(der.status.success());
    let sum = ok(dir, &sha256sum, &[], Some(&der.stdout));
    let hex = sum.split_whitespace().next().unwrap();
    assert_eq!(pki::ca_cert_hash(ca).unwrap(), format!("sha256:{hex}"));
}

/// Checks that kubectl accepts the kubeconfig at `path`, whose current context is
/// `context` on `server`; gives `kubectl config view --raw` with a JSONPath.
fn check_kubectl(dir: &Path, kubectl: &Path, path: &str, context: &str, server: &str) {
    ok(
        dir,
        kubectl,
        &["config", "view", "--kubeconfig", path],
        None,
    );
    let contexts = ok(
        dir,
        kubectl,
        &["config", "get-contexts", "--kubeconfig", path],
        None,
    );
    let current = contexts
        .lines()
        .find(|l| l.starts_with('*'))
        .unwrap_or_else(|| panic!("{path}: no current context in {contexts}"));
    assert_eq!(
        current.split_whitespace().nth(1),
        Some(context),
        "{path}: {contexts}"
    );
    let got = ok(
        dir,
        kubectl,
        &[
            "config",
            "view",
            "--minify",
            "--kubeconfig",
            path,
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ],
        None,
    );
    assert_eq!(got, server, "{path}");
}

/// The current user's client certificate of the kubeconfig `path`, as kubectl reads it,
/// written to `<path>.crt`; checked by openssl against `ca.crt` and its subject given.
fn client_subject(dir: &Path, kubectl: &Path, openssl: &Path, path: &str) -> String {
    let data = ok(
        dir,
        kubectl,
        &[
            "config",
            "view",
            "--raw",
            "--minify",
            "--kubeconfig",
            path,
            "-o",
            "jsonpath={.users[0].user.client-certificate-data}",
        ],
        None,
    );
    let pem = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .unwrap();
    let cert = format!("{path}.crt");
    std::fs::write(dir.join(&cert), pem).unwrap();
    let verified = ok(dir, openssl, &["verify", "-CAfile", "ca.crt", &cert], None);
    assert_eq!(verified, format!("{cert}: OK\n"));
    ok(
        dir,
        openssl,
        &["x509", "-noout", "-subject", "-in", &cert],
        None,
    )
}

#[test]
fn kubectl_accepts_every_control_plane_kubeconfig() {
    let (Some(kubectl), Some(openssl)) = (tool("kubectl"), tool("openssl")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let config = config("controlplane");
    let files = kubeconfig::control_plane(&config, &facts()).unwrap();
    write(dir, &files);
    write(dir, &pki::worker(&config).unwrap());

    // The fixture is Kubernetes 1.34: the kubelet talks to its own API server.
    let endpoint = "https://10.5.0.2:6443";
    let local = "https://10.5.0.2:6443";
    for (file, context, server, subject) in [
        (
            "admin.conf",
            "kubernetes-admin@demo",
            endpoint,
            "O = kubeadm:cluster-admins, CN = kubernetes-admin",
        ),
        (
            "super-admin.conf",
            "kubernetes-super-admin@demo",
            endpoint,
            "O = system:masters, CN = kubernetes-super-admin",
        ),
        (
            "kubelet.conf",
            "system:node:cp-1@demo",
            local,
            "O = system:nodes, CN = system:node:cp-1",
        ),
        (
            "controller-manager.conf",
            "system:kube-controller-manager@demo",
            local,
            "CN = system:kube-controller-manager",
        ),
        (
            "scheduler.conf",
            "system:kube-scheduler@demo",
            local,
            "CN = system:kube-scheduler",
        ),
    ] {
        check_kubectl(dir, &kubectl, file, context, server);
        assert_eq!(
            client_subject(dir, &kubectl, &openssl, file),
            format!("subject={subject}\n"),
            "{file}"
        );
    }
}

#[test]
fn kubectl_accepts_a_workers_bootstrap_kubeconfig_with_the_token_and_the_ca_pin() {
    let Some(kubectl) = tool("kubectl") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let config = config("worker");
    let file = kubeconfig::worker_bootstrap(&config).unwrap();
    assert_eq!(
        file.path,
        Path::new("/etc/kubernetes/bootstrap-kubelet.conf")
    );
    assert_eq!(file.mode, 0o600);
    write(dir, std::slice::from_ref(&file));
    let path = "bootstrap-kubelet.conf";
    check_kubectl(
        dir,
        &kubectl,
        path,
        "tls-bootstrap-token-user@kubernetes",
        "https://cp.example.com:6443",
    );
    let view = |jsonpath: &str| {
        ok(
            dir,
            &kubectl,
            &[
                "config",
                "view",
                "--raw",
                "--kubeconfig",
                path,
                "-o",
                &format!("jsonpath={jsonpath}"),
            ],
            None,
        )
    };
    assert_eq!(view("{.users[0].name}"), "tls-bootstrap-token-user");
    assert_eq!(
        view("{.users[0].user.token}"),
        config.cluster.secrets.bootstrap_token.as_str()
    );
    let ca = config.cluster.secrets.kubernetes_ca.cert.as_str();
    let ca_data = view("{.clusters[0].cluster.certificate-authority-data}");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(ca_data)
            .unwrap(),
        ca.as_bytes()
    );
    assert_eq!(
        view("{.clusters[0].cluster.extensions[0].name}"),
        "keelson.dev/ca-cert-hash"
    );
    assert_eq!(
        view("{.clusters[0].cluster.extensions[0].extension}"),
        pki::ca_cert_hash(ca).unwrap()
    );
    // Nothing of a worker's holds a private key.
    let pki_files = pki::worker(&config).unwrap();
    for file in pki_files.iter().chain([&file]) {
        let text = String::from_utf8_lossy(&file.content);
        assert!(!text.contains("PRIVATE KEY"), "{}", file.path.display());
    }
}

#[test]
fn kubectl_accepts_a_merged_kube_config_keeping_the_existing_contexts() {
    let (Some(kubectl), Some(openssl)) = (tool("kubectl"), tool("openssl")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let config = config("controlplane");
    write(dir, &pki::worker(&config).unwrap());
    // An existing ~/.kube/config with another cluster, as kubectl writes it.
    let existing = "\
apiVersion: v1
kind: Config
preferences: {}
clusters:
- cluster:
    server: https://other.example.com:6443
    insecure-skip-tls-verify: true
  name: other
users:
- name: other-user
  user:
    token: other-token
contexts:
- context:
    cluster: other
    user: other-user
    namespace: apps
  name: other
current-context: other
";
    std::fs::write(dir.join("existing"), existing).unwrap();
    check_kubectl(
        dir,
        &kubectl,
        "existing",
        "other",
        "https://other.example.com:6443",
    );

    let admin = kubeconfig::admin(&config).unwrap();
    std::fs::write(dir.join("admin"), &admin).unwrap();
    check_kubectl(
        dir,
        &kubectl,
        "admin",
        "admin@demo",
        "https://10.5.0.2:6443",
    );
    assert_eq!(
        client_subject(dir, &kubectl, &openssl, "admin"),
        "subject=O = kubeadm:cluster-admins, CN = kubernetes-admin\n"
    );

    let merged = kubeconfig::merge(Some(existing), &admin, false).unwrap();
    std::fs::write(dir.join("merged"), &merged).unwrap();
    check_kubectl(
        dir,
        &kubectl,
        "merged",
        "admin@demo",
        "https://10.5.0.2:6443",
    );
    let contexts = ok(
        dir,
        &kubectl,
        &[
            "config",
            "get-contexts",
            "-o",
            "name",
            "--kubeconfig",
            "merged",
        ],
        None,
    );
    assert_eq!(contexts, "admin@demo\nother\n");
    let namespace = ok(
        dir,
        &kubectl,
        &[
            "config",
            "view",
            "--kubeconfig",
            "merged",
            "-o",
            "jsonpath={.contexts[?(@.name==\"other\")].context.namespace}",
        ],
        None,
    );
    assert_eq!(namespace, "apps");

    // A second admin kubeconfig has a new certificate: refused without --force, and with
    // it the user is replaced and kubectl still reads the result.
    let again = kubeconfig::admin(&config).unwrap();
    let err = kubeconfig::merge(Some(&merged), &again, false).unwrap_err();
    assert!(err.to_string().contains("user \"admin@demo\""), "{err}");
    let forced = kubeconfig::merge(Some(&merged), &again, true).unwrap();
    std::fs::write(dir.join("forced"), &forced).unwrap();
    check_kubectl(
        dir,
        &kubectl,
        "forced",
        "admin@demo",
        "https://10.5.0.2:6443",
    );
    assert_eq!(
        client_subject(dir, &kubectl, &openssl, "forced"),
        "subject=O = kubeadm:cluster-admins, CN = kubernetes-admin\n"
    );
}
