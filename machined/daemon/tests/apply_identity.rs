//! Configs that would leave the node API unreachable are refused by `apply-config` before
//! anything is written, and every apply-config, confirm and reset is kept in STATE's
//! audit log: the real machined server on the host (in-process, TLS on 127.0.0.1, a
//! temporary STATE) with a recording backend in place of PID 1.
//!
//! Refused: a worker config pushed in maintenance mode without a node API certificate
//! (neither in its `machine.files` nor in STATE), a CA whose key is not its
//! certificate's, a worker certificate that does not parse, and one issued from another
//! CA. Accepted: a worker config whose `machine.files` carry a certificate from its CA,
//! and one without them on a worker whose STATE holds its certificate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use api_support::*;
use keelson_api::api::proto;
use keelson_api::client::Connector;
use keelson_configs::generate::{GenerateOptions, generate};
use keelson_configs::pki::{self, CertAndKey, LeafRequest, Role, Usage};
use keelson_configs::secrets::ClusterSecrets;
use keelson_machined::server::audit;

/// A generated cluster's secrets and configs.
struct Configs {
    secrets: ClusterSecrets,
    controlplane: String,
    worker: String,
}

fn configs() -> Configs {
    let secrets = ClusterSecrets::generate().unwrap();
    let generated = generate(
        &GenerateOptions {
            cluster_name: "demo".into(),
            endpoint: "https://10.5.0.2:6443".into(),
            ..GenerateOptions::default()
        },
        &secrets,
    )
    .unwrap();
    Configs {
        secrets,
        controlplane: generated.control_plane.text,
        worker: generated.worker.text,
    }
}

/// `config` with `cluster.secrets.node_api_ca.<field>` set to `value`.
fn with_node_api_ca(config: &str, field: &str, value: &str) -> String {
    let mut doc: toml::Table = toml::from_str(config).unwrap();
    let ca = doc["cluster"]["secrets"]["node_api_ca"].clone();
    let mut ca = ca.as_table().unwrap().clone();
    ca.insert(field.into(), value.into());
    doc.get_mut("cluster").unwrap()["secrets"]
        .as_table_mut()
        .unwrap()
        .insert("node_api_ca".into(), toml::Value::Table(ca));
    toml::to_string(&doc).unwrap()
}

/// `config` with `machine.files` writing this certificate and key into STATE's node-api/.
fn with_node_api_files(config: &str, cert: &str, key: &str) -> String {
    let mut doc: toml::Table = toml::from_str(config).unwrap();
    let file = |name: &str, content: &str| {
        let mut t = toml::Table::new();
        t.insert(
            "path".into(),
            format!("/system/state/node-api/{name}").into(),
        );
        t.insert("content".into(), content.into());
        t.insert("mode".into(), "0600".into());
        toml::Value::Table(t)
    };
    doc.get_mut("machine")
        .unwrap()
        .as_table_mut()
        .unwrap()
        .insert(
            "files".into(),
            toml::Value::Array(vec![file("server.crt", cert), file("server.key", key)]),
        );
    toml::to_string(&doc).unwrap()
}

/// A server certificate for a worker, issued from `ca`.
fn worker_cert(ca: &CertAndKey) -> CertAndKey {
    pki::issue(
        ca,
        &LeafRequest {
            common_name: "worker-1".into(),
            organizations: Vec::new(),
            sans: vec!["worker-1".into(), "localhost".into(), "127.0.0.1".into()],
            usage: Usage::Server,
        },
    )
    .unwrap()
}

fn request(config: &str, dry_run: bool) -> proto::ApplyConfigRequest {
    proto::ApplyConfigRequest {
        config: config.as_bytes().to_vec(),
        mode: proto::ApplyMode::Auto.into(),
        try_timeout_seconds: 0,
        dry_run,
    }
}

/// Applies `config` to a node in maintenance mode (`--insecure`): the node's messages,
/// or its refusal's code and message.
fn apply_insecure(
    node: &Node,
    config: &str,
    dry_run: bool,
) -> Result<Vec<String>, (tonic::Code, String)> {
    let address = node.address.to_string();
    rt().block_on(async {
        let connector = Connector::insecure().unwrap();
        let mut c = connector.connect(&address).await.unwrap();
        c.apply_config(request(config, dry_run))
            .await
            .map(|r| r.into_inner().messages)
            .map_err(|s| (s.code(), s.message().to_owned()))
    })
}

/// The files in STATE but the test fixture's own (os-release) and the audit log.
fn state_files(node: &Node) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(node.state.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "os-release" && n != "audit.log")
        .collect();
    names.sort();
    names
}

/// Asserts `refusal` is INVALID_ARGUMENT naming each of `wants`, and STATE holds no
/// config, no staged config, no node API files: nothing was written.
fn assert_refused_and_untouched(
    node: &Node,
    refusal: Result<Vec<String>, (tonic::Code, String)>,
    wants: &[&str],
) {
    let (code, message) = refusal.expect_err("the config is refused");
    assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
    assert!(message.contains("nothing was changed"), "{message}");
    for want in wants {
        assert!(message.contains(want), "want {want:?} in:\n{message}");
    }
    assert_eq!(state_files(node), Vec::<String>::new());
}

#[test]
fn a_worker_without_a_node_api_certificate_is_refused_in_maintenance_mode() {
    let c = configs();
    let node = Node::start(None);
    let refusal = apply_insecure(&node, &c.worker, false);
    assert_refused_and_untouched(
        &node,
        refusal,
        &[
            "cluster.secrets.node_api_ca carries no key (a worker)",
            "/system/state/node-api/server.crt and /system/state/node-api/server.key",
            "machine.files",
        ],
    );
    // The maintenance API still answers, and takes a config that is whole.
    let cert = worker_cert(&c.secrets.node_api_ca);
    let whole = with_node_api_files(&c.worker, &cert.cert, &cert.key);
    let messages = apply_insecure(&node, &whole, true).unwrap();
    assert!(
        messages.iter().any(|m| m.contains("the config is valid")),
        "{messages:?}"
    );
}

#[test]
fn a_worker_certificate_that_does_not_parse_or_comes_from_another_ca_is_refused() {
    let c = configs();
    let node = Node::start(None);
    let cert = worker_cert(&c.secrets.node_api_ca);
    let garbage =
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n";
    let refusal = apply_insecure(
        &node,
        &with_node_api_files(&c.worker, garbage, &cert.key),
        false,
    );
    assert_refused_and_untouched(
        &node,
        refusal,
        &["machine.files[0] (/system/state/node-api/server.crt)"],
    );

    let other_ca = pki::generate_ca("another CA").unwrap();
    let foreign = worker_cert(&other_ca);
    let refusal = apply_insecure(
        &node,
        &with_node_api_files(&c.worker, &foreign.cert, &foreign.key),
        false,
    );
    assert_refused_and_untouched(
        &node,
        refusal,
        &["is not issued from cluster.secrets.node_api_ca"],
    );

    // A key that is not the certificate's.
    let refusal = apply_insecure(
        &node,
        &with_node_api_files(&c.worker, &cert.cert, &foreign.key),
        false,
    );
    assert_refused_and_untouched(&node, refusal, &["cannot be used with its key"]);
}

#[test]
fn a_node_api_ca_whose_key_is_not_its_certificates_is_refused() {
    let c = configs();
    let other_ca = pki::generate_ca("another CA").unwrap();
    let mismatched = with_node_api_ca(&c.controlplane, "key", &other_ca.key);

    // In maintenance mode.
    let node = Node::start(None);
    let refusal = apply_insecure(&node, &mismatched, false);
    assert_refused_and_untouched(&node, refusal, &["cluster.secrets.node_api_ca"]);

    // On a configured control plane: STATE keeps the config in effect.
    let node = Node::start(Some(&c.controlplane));
    let connector = admin_connector(&c, &node);
    let address = node.address.to_string();
    let status = rt().block_on(async {
        let mut client = connector.connect(&address).await.unwrap();
        client
            .apply_config(request(&mismatched, false))
            .await
            .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("cluster.secrets.node_api_ca"),
        "{}",
        status.message()
    );
    assert_eq!(
        node.state_config().as_deref(),
        Some(c.controlplane.as_str())
    );
    assert!(
        node.backend.calls().is_empty(),
        "{:?}",
        node.backend.calls()
    );
}

/// A connector to `node` with [`admin`]'s certificate, trusting the node API CA.
fn admin_connector(c: &Configs, node: &Node) -> Connector {
    let admin = admin(c);
    Connector::for_context(
        "admin",
        &keelson_api::clientconfig::Context {
            endpoints: vec![node.address.to_string()],
            nodes: Vec::new(),
            ca: c.secrets.node_api_ca.cert.clone(),
            cert: admin.cert,
            key: admin.key,
        },
    )
    .unwrap()
}

fn admin(c: &Configs) -> CertAndKey {
    pki::issue_api_client(&c.secrets.node_api_ca, "admin-user", Role::Admin).unwrap()
}

#[test]
fn applies_confirms_and_resets_are_kept_in_the_audit_log() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let address = node.address.to_string();
    let applied = cluster.with_sysctl("vm.swappiness", "31");
    let admin = cluster.connector(node.address, Role::Admin);
    let operator = cluster.connector(node.address, Role::Operator);
    rt().block_on(async {
        let mut c = admin.connect(&address).await.unwrap();
        c.apply_config(request(&applied, false)).await.unwrap();
        c.apply_config(request("not a config", false))
            .await
            .unwrap_err();
        c.confirm_config(proto::ConfirmConfigRequest {})
            .await
            .unwrap_err();
        // An operator may not apply: refused before the handler, so not a config change.
        let mut o = operator.connect(&address).await.unwrap();
        o.apply_config(request(&applied, false)).await.unwrap_err();
        c.apply_config(request(&applied, true)).await.unwrap();
        c.reset(proto::ResetRequest { force: false }).await.unwrap();
    });
    let entries = audit::read_entries(node.state.path()).unwrap();
    let summary: Vec<(&str, &str, &str, &str, bool)> = entries
        .iter()
        .map(|e| {
            (
                e.action.as_str(),
                e.user.as_str(),
                e.role.as_str(),
                e.outcome.as_str(),
                e.dry_run,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("apply-config", "admin-user", "admin", "ok", false),
            ("apply-config", "admin-user", "admin", "refused", false),
            ("confirm", "admin-user", "admin", "refused", false),
            ("apply-config", "admin-user", "admin", "ok", true),
            ("reset", "admin-user", "admin", "requested", false),
        ]
    );
    assert_eq!(
        entries[0].config_sha256.as_deref(),
        Some(audit::sha256_hex(applied.as_bytes()).as_str())
    );
    assert_eq!(entries[0].mode, "auto");
    assert!(
        entries[2]
            .detail
            .contains("no config applied with --mode try is waiting for confirmation"),
        "{:?}",
        entries[2]
    );
    assert_eq!(entries[4].config_sha256, None);
    // The file is private to STATE's owner.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(audit::path_in(node.state.path()))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn the_first_config_of_maintenance_mode_is_audited_as_anonymous() {
    let c = configs();
    let node = Node::start(None);
    let _ = apply_insecure(&node, &c.worker, false);
    let entries = audit::read_entries(node.state.path()).unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].role, "anonymous");
    assert_eq!(entries[0].outcome, "refused");
    assert!(
        entries[0].detail.contains("node_api_ca"),
        "{:?}",
        entries[0]
    );
}

#[test]
fn a_worker_whose_certificate_is_in_state_takes_a_config_without_it() {
    let c = configs();
    let cert = worker_cert(&c.secrets.node_api_ca);
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir(state.path().join("node-api")).unwrap();
    std::fs::write(state.path().join("node-api/server.crt"), &cert.cert).unwrap();
    std::fs::write(state.path().join("node-api/server.key"), &cert.key).unwrap();
    std::fs::write(state.path().join("config.toml"), &c.worker).unwrap();
    let node = Node::start_in(state, backend());
    let connector = admin_connector(&c, &node);
    let address = node.address.to_string();
    let messages = rt().block_on(async {
        let mut client = connector.connect(&address).await.unwrap();
        client
            .apply_config(request(&c.worker, true))
            .await
            .unwrap()
            .into_inner()
            .messages
    });
    assert!(
        messages.iter().any(|m| m.contains("dry run")),
        "{messages:?}"
    );
}
