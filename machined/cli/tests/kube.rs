//! `machinectl kubeconfig` and `machinectl image pull` end to end on the host: the real
//! `machinectl` binary against the real machined (in-process, the daemon's test support).
//! The kubeconfig is minted by the node from the generated cluster's Kubernetes CA, merged
//! into a temporary HOME's `~/.kube/config`, and judged by Debian's kubectl when it is
//! installed (required with KEELSON_REQUIRE_TOOLS=1). No containerd runs here: a
//! well-formed pull passes the node's checks and fails at the CRI call (UNIMPLEMENTED when
//! machined is built without containerd, as this package's dev-dependency is; UNAVAILABLE
//! when a workspace build unifies the feature on).

#![allow(clippy::unwrap_used, clippy::expect_used)]

// The daemon's test support: a generated cluster and a running machined.
#[path = "../../daemon/tests/api_support/mod.rs"]
mod api_support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Output;

use api_support::*;
use keelson_configs::pki::Role;

/// Runs the built machinectl with `home` as HOME and no KUBECONFIG.
fn machinectl(config: &Path, home: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_machinectl"))
        .arg("--machineconfig")
        .arg(config)
        .args(args)
        .env_remove("MACHINECONFIG")
        .env_remove("KUBECONFIG")
        .env("HOME", home)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run machinectl")
}

/// The contexts of `file` and its current one, as kubectl reads them; `None` (printed)
/// when kubectl is not installed, unless KEELSON_REQUIRE_TOOLS=1.
fn kubectl_contexts(file: &Path) -> Option<(Vec<String>, String)> {
    let kubectl = Path::new("/usr/bin/kubectl");
    if !kubectl.exists() {
        assert_ne!(
            std::env::var("KEELSON_REQUIRE_TOOLS").as_deref(),
            Ok("1"),
            "KEELSON_REQUIRE_TOOLS=1 but /usr/bin/kubectl is missing: apt-get install kubectl"
        );
        println!(
            "skipped: /usr/bin/kubectl is not installed, the kubeconfig is not judged by kubectl"
        );
        return None;
    }
    let run = |args: &[&str]| {
        let out = std::process::Command::new(kubectl)
            .args(args)
            .arg("--kubeconfig")
            .arg(file)
            .output()
            .unwrap();
        assert!(out.status.success(), "kubectl {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let mut names: Vec<String> = run(&["config", "get-contexts", "-o", "name"])
        .lines()
        .map(str::to_owned)
        .collect();
    names.sort();
    Some((names, run(&["config", "current-context"])))
}

const OTHER: &str = "apiVersion: v1
kind: Config
clusters:
- name: other
  cluster:
    server: https://other.example:6443
users:
- name: other-user
  user:
    token: secret
contexts:
- name: other
  context:
    cluster: other
    user: other-user
current-context: other
";

#[test]
fn an_admin_kubeconfig_is_minted_and_merged_as_kubectl_expects() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let admin = cluster.client_config(node.address, Role::Admin);
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join(".kube").join("config");
    std::fs::create_dir(home.path().join(".kube")).unwrap();
    std::fs::write(&file, OTHER).unwrap();

    // Merged beside the existing context, which stays; the new one is current.
    let out = machinectl(&admin, home.path(), &["kubeconfig", "-o", "json"]);
    assert_ok(&out);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["node"], node.address.to_string());
    assert_eq!(rows[0]["context"], "admin@demo");
    assert_eq!(rows[0]["file"], file.display().to_string());
    assert_eq!(rows[0]["written"], "merged");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let merged = std::fs::read_to_string(&file).unwrap();
    assert!(merged.contains("client-key-data"), "{merged}");
    let both = (
        vec!["admin@demo".to_owned(), "other".to_owned()],
        "admin@demo".to_owned(),
    );
    if let Some(got) = kubectl_contexts(&file) {
        assert_eq!(got, both);
    }

    // Again: a new certificate under the same names is a conflict, refused without
    // --force (the file unchanged), taken with it.
    let out = machinectl(&admin, home.path(), &["kubeconfig"]);
    assert_fails(
        &out,
        &[
            &format!("cannot merge into {}", file.display()),
            "\"admin@demo\"",
            "--force",
        ],
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), merged);
    assert_ok(&machinectl(&admin, home.path(), &["kubeconfig", "--force"]));
    assert_ne!(std::fs::read_to_string(&file).unwrap(), merged);
    if let Some(got) = kubectl_contexts(&file) {
        assert_eq!(got, both);
    }

    // --merge=false: an existing file is refused without --force; a new one is the
    // node's kubeconfig alone.
    let out = machinectl(&admin, home.path(), &["kubeconfig", "--merge=false"]);
    assert_fails(&out, &["exists", "--force"]);
    let alone = home.path().join("alone.yaml");
    let out = machinectl(
        &admin,
        home.path(),
        &["kubeconfig", "--merge=false", alone.to_str().unwrap()],
    );
    assert_ok(&out);
    assert!(stdout(&out).contains("created"), "{}", text(&out));
    if let Some(got) = kubectl_contexts(&alone) {
        assert_eq!(
            got,
            (vec!["admin@demo".to_owned()], "admin@demo".to_owned())
        );
    }

    // One control plane only, and only for admins.
    let out = machinectl(
        &admin,
        home.path(),
        &["kubeconfig", "--nodes", "127.0.0.1:1,127.0.0.1:2"],
    );
    assert_fails(&out, &["kubeconfig acts on one node only"]);
    let operator = cluster.client_config(node.address, Role::Operator);
    let out = machinectl(&operator, home.path(), &["kubeconfig"]);
    assert_fails(
        &out,
        &["permission denied: kubeconfig needs role admin, your certificate has operator"],
    );
}

#[test]
fn image_pull_checks_the_reference_and_the_role() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let operator = cluster.client_config(node.address, Role::Operator);
    let home = tempfile::tempdir().unwrap();

    let out = machinectl(
        &operator,
        home.path(),
        &["image", "pull", "registry.k8s.io/Pause"],
    );
    assert_fails(
        &out,
        &[
            "invalid argument",
            "\"registry.k8s.io/Pause\" is not an image reference",
            "repository names are lowercase",
        ],
    );
    let out = machinectl(
        &operator,
        home.path(),
        &["image", "pull", "registry.k8s.io/pause:3.10"],
    );
    assert_fails(&out, &[]);
    let all = text(&out);
    assert!(
        all.contains("unimplemented: this machined was built without containerd support")
            || all.contains("unavailable: cannot reach containerd's CRI at"),
        "{all}"
    );
    let reader = cluster.client_config(node.address, Role::Reader);
    let out = machinectl(
        &reader,
        home.path(),
        &["image", "pull", "registry.k8s.io/pause:3.10"],
    );
    assert_fails(
        &out,
        &["permission denied: image pull needs role operator, your certificate has reader"],
    );
}
