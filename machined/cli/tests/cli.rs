//! End-to-end tests of the built `machinectl`: `gen config` then `validate`, secrets reuse,
//! patches, file modes, overwrite refusal, clear errors on bad input, and the node API
//! commands' arguments and help (refused before any node is dialled).

// Test helpers outside `#[test]` functions panic on purpose when a fixture is broken.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};

use keelson_api::clientconfig::ClientConfig;
use keelson_configs::MachineConfig;
use keelson_configs::secrets::ClusterSecrets;

const ENDPOINT: &str = "https://10.5.0.2:6443";
const FILES: [&str; 4] = [
    "controlplane.toml",
    "worker.toml",
    "secrets.toml",
    "machinectl.toml",
];

fn machinectl<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_machinectl"))
        .args(args)
        .env_remove("MACHINECONFIG")
        .output()
        .expect("run machinectl")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_ok(out: &Output) {
    assert_eq!(out.status.code(), Some(0), "{}", text(out));
}

fn assert_fails(out: &Output, code: i32, wants: &[&str]) {
    assert_eq!(out.status.code(), Some(code), "{}", text(out));
    let all = text(out);
    for want in wants {
        assert!(all.contains(want), "want {want:?} in {all}");
    }
}

fn gen_config(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["gen", "config", "demo", ENDPOINT, "--output-dir"];
    let dir = dir.to_str().expect("utf-8 path");
    args.push(dir);
    args.extend_from_slice(extra);
    machinectl(args)
}

fn load_config(path: &Path) -> MachineConfig {
    keelson_configs::load(path, keelson_configs::Mode::Metal).expect("valid config")
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[test]
fn gen_config_then_validate_both_configs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("D");
    let out = gen_config(&dir, &[]);
    assert_ok(&out);
    for name in FILES {
        let path = dir.join(name);
        assert!(path.is_file(), "{name} written");
        assert_eq!(mode_of(&path), 0o600, "{name} mode");
    }
    assert_eq!(mode_of(&dir), 0o700, "new output dir mode");

    for name in ["controlplane.toml", "worker.toml"] {
        let path = dir.join(name);
        let out = machinectl(["validate", "--config", path.to_str().expect("utf-8")]);
        assert_ok(&out);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("valid"),
            "{}",
            text(&out)
        );
    }
    let cp = load_config(&dir.join("controlplane.toml"));
    let worker = load_config(&dir.join("worker.toml"));
    assert_eq!(cp.machine.kind.to_string(), "controlplane");
    assert_eq!(worker.machine.kind.to_string(), "worker");
    assert_eq!(cp.cluster.name, "demo");
    assert_eq!(cp.cluster.endpoint.to_string(), ENDPOINT);
    assert_eq!(cp.machine.api.cert_sans, ["10.5.0.2"]);
}

/// Every PEM block labelled `... PRIVATE KEY` in `text`.
fn private_key_blocks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let block = &rest[start..];
        let Some(end) = block.find("-----END ") else {
            break;
        };
        let end_line = block[end..].find('\n').map_or(block.len(), |i| end + i);
        let pem = &block[..end_line];
        if pem
            .lines()
            .next()
            .is_some_and(|l| l.contains("PRIVATE KEY"))
        {
            out.push(pem.replace("\\n", "\n"));
        }
        rest = &block[end_line..];
    }
    out
}

fn normalize(pem: &str) -> String {
    pem.lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .join("")
}

#[test]
fn worker_config_never_contains_a_ca_private_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("D");
    assert_ok(&gen_config(&dir, &[]));
    let secrets = ClusterSecrets::load(&dir.join("secrets.toml")).expect("secrets");
    let ca_keys: Vec<String> = [
        &secrets.kubernetes_ca,
        &secrets.etcd_ca,
        &secrets.front_proxy_ca,
        &secrets.node_api_ca,
    ]
    .iter()
    .map(|ca| normalize(&ca.key))
    .chain([normalize(&secrets.service_account_key)])
    .collect();

    let worker = std::fs::read_to_string(dir.join("worker.toml")).expect("worker");
    let worker_keys = private_key_blocks(&worker);
    assert!(worker_keys.is_empty(), "worker.toml has private keys");
    for key in &ca_keys {
        let body_line = key.get(..40).expect("key body");
        assert!(
            !worker.contains(body_line),
            "a CA key body is in worker.toml"
        );
    }
    assert!(!worker.contains(secrets.encryption_key.as_base64()));

    // The control plane carries every CA key and the service-account key.
    let cp = std::fs::read_to_string(dir.join("controlplane.toml")).expect("cp");
    let cp_keys: Vec<String> = private_key_blocks(&cp)
        .iter()
        .map(|k| normalize(k))
        .collect();
    for key in &ca_keys {
        assert!(cp_keys.contains(key), "controlplane.toml lacks a key");
    }
}

#[test]
fn client_config_has_an_admin_certificate_that_verifies() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("D");
    assert_ok(&gen_config(&dir, &[]));
    let client = ClientConfig::load(&dir.join("machinectl.toml")).expect("client config");
    let (name, ctx) = client.current().expect("current context");
    assert_eq!(name, "demo");
    assert_eq!(ctx.endpoints, ["10.5.0.2"]);
    assert_eq!(ctx.nodes, ["10.5.0.2"]);
    let secrets = ClusterSecrets::load(&dir.join("secrets.toml")).expect("secrets");
    assert_eq!(ctx.ca, secrets.node_api_ca.cert);

    std::fs::write(tmp.path().join("ca.pem"), &ctx.ca).expect("write");
    std::fs::write(tmp.path().join("admin.pem"), &ctx.cert).expect("write");
    let verify = Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(tmp.path().join("ca.pem"))
        .arg(tmp.path().join("admin.pem"))
        .output()
        .expect("openssl");
    assert!(verify.status.success(), "{}", text(&verify));
    let subject = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-in"])
        .arg(tmp.path().join("admin.pem"))
        .output()
        .expect("openssl");
    let subject = String::from_utf8_lossy(&subject.stdout);
    assert!(subject.contains("O = keelson:admin"), "{subject}");
}

#[test]
fn with_secrets_reuses_the_cluster_secrets() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let first = tmp.path().join("first");
    let second = tmp.path().join("second");
    assert_ok(&gen_config(&first, &[]));
    let secrets_path = first.join("secrets.toml");
    assert_ok(&gen_config(
        &second,
        &["--with-secrets", secrets_path.to_str().expect("utf-8")],
    ));
    assert_eq!(
        std::fs::read(first.join("secrets.toml")).expect("read"),
        std::fs::read(second.join("secrets.toml")).expect("read"),
    );
    let a = load_config(&first.join("controlplane.toml"));
    let b = load_config(&second.join("controlplane.toml"));
    assert_eq!(
        a.cluster.secrets, b.cluster.secrets,
        "same CAs, keys and tokens"
    );

    // A fresh run makes different secrets.
    let third = tmp.path().join("third");
    assert_ok(&gen_config(&third, &[]));
    let c = load_config(&third.join("controlplane.toml"));
    assert_ne!(
        a.cluster.secrets.kubernetes_ca,
        c.cluster.secrets.kubernetes_ca
    );

    // Reusing the secrets file of the output directory itself, with --force.
    assert_ok(&gen_config(
        &first,
        &[
            "--force",
            "--with-secrets",
            secrets_path.to_str().expect("utf-8"),
        ],
    ));
    let again = load_config(&first.join("controlplane.toml"));
    assert_eq!(again.cluster.secrets, a.cluster.secrets);
}

#[test]
fn existing_files_are_not_overwritten_without_force() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("D");
    assert_ok(&gen_config(&dir, &[]));
    let before: Vec<Vec<u8>> = FILES
        .iter()
        .map(|f| std::fs::read(dir.join(f)).expect("read"))
        .collect();
    let out = gen_config(&dir, &[]);
    assert_fails(
        &out,
        1,
        &["refusing to overwrite", "controlplane.toml", "--force"],
    );
    let after: Vec<Vec<u8>> = FILES
        .iter()
        .map(|f| std::fs::read(dir.join(f)).expect("read"))
        .collect();
    assert_eq!(before, after, "nothing changed");

    // Only one file present still blocks everything.
    let partial = tmp.path().join("P");
    std::fs::create_dir(&partial).expect("mkdir");
    std::fs::write(partial.join("worker.toml"), "keep me").expect("write");
    assert_fails(&gen_config(&partial, &[]), 1, &["worker.toml"]);
    assert_eq!(
        std::fs::read_to_string(partial.join("worker.toml")).expect("read"),
        "keep me"
    );
    assert!(!partial.join("controlplane.toml").exists());

    assert_ok(&gen_config(&dir, &["--force"]));
    let forced = std::fs::read(dir.join("secrets.toml")).expect("read");
    assert_ne!(forced, before[2], "--force wrote new secrets");
}

#[test]
fn patches_apply_to_both_or_one_config() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, body: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, body).expect("write patch");
        p.to_str().expect("utf-8").to_owned()
    };
    let all = write(
        "all.toml",
        "[machine]\ntime_servers = [\"192.0.2.123\"]\n[machine.kubelet.extra_args]\nmax-pods = \"200\"\n",
    );
    let cp = write(
        "cp.toml",
        "[machine]\nhostname = \"cp-1\"\n[cluster]\ndns_domain = \"example.internal\"\n",
    );
    let worker = write(
        "worker.toml",
        "[machine.kubelet]\nextra_args = { \"$patch\" = \"delete\" }\n",
    );
    let dir = tmp.path().join("D");
    let out = gen_config(
        &dir,
        &[
            "--config-patch",
            &all,
            "--config-patch-control-plane",
            &cp,
            "--config-patch-worker",
            &worker,
            "--additional-sans",
            "api.example.com,10.5.0.100",
            "--kubernetes-version",
            "1.33.4",
        ],
    );
    assert_ok(&out);
    let cp = load_config(&dir.join("controlplane.toml"));
    let w = load_config(&dir.join("worker.toml"));
    assert_eq!(cp.machine.time_servers, ["192.0.2.123"]);
    assert_eq!(w.machine.time_servers, ["192.0.2.123"]);
    assert_eq!(cp.machine.hostname.as_deref(), Some("cp-1"));
    assert_eq!(w.machine.hostname, None);
    assert_eq!(cp.cluster.dns_domain, "example.internal");
    assert_eq!(w.cluster.dns_domain, "cluster.local");
    assert_eq!(cp.machine.kubelet.extra_args["max-pods"], "200");
    assert!(
        w.machine.kubelet.extra_args.is_empty(),
        "worker patch deleted it"
    );
    assert_eq!(cp.cluster.kubernetes_version.to_string(), "1.33.4");
    assert_eq!(
        cp.machine.api.cert_sans,
        ["10.5.0.2", "api.example.com", "10.5.0.100"]
    );
    assert_eq!(w.machine.api.cert_sans, ["api.example.com", "10.5.0.100"]);
}

#[test]
fn an_invalid_patched_config_writes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let patch = tmp.path().join("bad.toml");
    std::fs::write(
        &patch,
        "[cluster]\nendpoint = \"http://10.5.0.2\"\n[machine]\nhostnme = \"x\"\n",
    )
    .expect("write");
    let dir = tmp.path().join("D");
    let out = gen_config(&dir, &["--config-patch", patch.to_str().expect("utf-8")]);
    assert_fails(
        &out,
        1,
        &[
            "bad.toml (patching controlplane.toml): error: cluster.endpoint",
            "machine.hostnme",
            "hostname",
            "nothing was written",
        ],
    );
    assert!(!dir.exists(), "no output directory was created");

    // A patch that is not TOML, and one with a bad directive, are refused up front.
    std::fs::write(&patch, "[machine\n").expect("write");
    assert_fails(
        &gen_config(&dir, &["--config-patch", patch.to_str().expect("utf-8")]),
        1,
        &["bad.toml:1:", "not valid TOML"],
    );
    std::fs::write(&patch, "machine = { \"$patch\" = \"drop\" }\n").expect("write");
    assert_fails(
        &gen_config(
            &dir,
            &["--config-patch-worker", patch.to_str().expect("utf-8")],
        ),
        1,
        &["key `machine.$patch`"],
    );
    assert!(!dir.exists());
}

#[test]
fn bad_arguments_are_clear_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("D");
    let d = dir.to_str().expect("utf-8");
    for (args, wants) in [
        (
            vec!["gen", "config", "demo", "http://10.5.0.2:6443", "-o", d],
            vec!["endpoint", "https"],
        ),
        (
            vec!["gen", "config", "demo", "https://10.5.0.2", "-o", d],
            vec!["no port"],
        ),
        (
            vec!["gen", "config", "Demo_1", ENDPOINT, "-o", d],
            vec!["cluster name \"Demo_1\""],
        ),
        (
            vec![
                "gen",
                "config",
                "demo",
                ENDPOINT,
                "-o",
                d,
                "--kubernetes-version",
                "1.20.0",
            ],
            vec!["--kubernetes-version \"1.20.0\""],
        ),
        (
            vec![
                "gen",
                "config",
                "demo",
                ENDPOINT,
                "-o",
                d,
                "--additional-sans",
                "a b",
            ],
            vec!["--additional-sans entry \"a b\""],
        ),
        (
            vec![
                "gen",
                "config",
                "demo",
                ENDPOINT,
                "-o",
                d,
                "--with-secrets",
                "/nonexistent/secrets.toml",
            ],
            vec!["/nonexistent/secrets.toml", "--with-secrets"],
        ),
    ] {
        assert_fails(&machinectl(&args), 1, &wants);
        assert!(!dir.exists(), "{args:?} wrote nothing");
    }
    // Usage errors are clap's: exit code 2.
    assert_fails(&machinectl(["gen", "config", "demo"]), 2, &["ENDPOINT"]);
    assert_fails(&machinectl(["validate"]), 2, &["--config"]);
}

#[test]
fn malformed_secrets_file_names_file_and_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let first = tmp.path().join("first");
    assert_ok(&gen_config(&first, &[]));
    let path = first.join("secrets.toml");
    let text = std::fs::read_to_string(&path).expect("read");
    let broken = tmp.path().join("broken.toml");
    std::fs::write(&broken, text.replace("[etcd_ca]", "[etcd_ca]\nbogus = 1")).expect("write");
    let out = gen_config(
        &tmp.path().join("D"),
        &["--with-secrets", broken.to_str().expect("utf-8")],
    );
    assert_fails(
        &out,
        1,
        &[
            "broken.toml:",
            "unknown field `bogus`",
            "without --with-secrets",
        ],
    );
}

#[test]
fn validate_reports_problems_and_refuses_bad_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("D");
    assert_ok(&gen_config(&dir, &[]));
    let cp = std::fs::read_to_string(dir.join("controlplane.toml")).expect("read");

    // A broken config: every problem is printed with file:line:column and key path.
    let bad = tmp.path().join("bad.toml");
    let broken = cp.replacen("[machine]", "[machine]\nhostnme = \"cp-1\"", 1);
    std::fs::write(&bad, &broken).expect("write");
    let line = broken
        .lines()
        .position(|l| l.starts_with("hostnme"))
        .expect("line")
        + 1;
    let out = machinectl(["validate", "--config", bad.to_str().expect("utf-8")]);
    assert_fails(
        &out,
        1,
        &[
            &format!("bad.toml:{line}:1"),
            "machine.hostnme",
            "invalid machine config",
        ],
    );

    // Metal mode needs an install disk; container mode refuses one.
    let container = machinectl([
        "validate",
        "--config",
        dir.join("controlplane.toml").to_str().expect("utf-8"),
        "--mode",
        "container",
    ]);
    assert_fails(&container, 1, &["machine.install_disk"]);

    // Unreadable, binary and non-UTF-8 files: a clear error and a non-zero exit.
    let missing = tmp.path().join("missing.toml");
    assert_fails(
        &machinectl(["validate", "--config", missing.to_str().expect("utf-8")]),
        1,
        &["missing.toml"],
    );
    let binary = tmp.path().join("binary.toml");
    std::fs::write(&binary, b"\x7fELF\x02\x01\x01\x00\x00\x00garbage").expect("write");
    assert_fails(
        &machinectl(["validate", "--config", binary.to_str().expect("utf-8")]),
        1,
        &["binary.toml", "not a text file"],
    );
    let latin1 = tmp.path().join("latin1.toml");
    std::fs::write(&latin1, b"version = \"v1\"\n# caf\xe9\n").expect("write");
    let out = machinectl(["validate", "--config", latin1.to_str().expect("utf-8")]);
    assert_fails(&out, 1, &["latin1.toml", "UTF-8"]);
}

/// The help of each etcd-era command says what it does and which role it needs.
#[test]
fn etcd_commands_say_what_they_do_and_which_role() {
    for (args, wants) in [
        (vec!["time", "--help"], vec!["clock", "synced", "(reader)"]),
        (
            vec!["bootstrap", "--help"],
            vec!["new etcd cluster", "(admin; one node)", "--recover-from"],
        ),
        (
            vec!["etcd", "--help"],
            vec![
                "members",
                "status",
                "snapshot",
                "defrag",
                "alarm",
                "leave",
                "remove-member",
                "forfeit-leadership",
            ],
        ),
        (
            vec!["etcd", "members", "--help"],
            vec!["members", "(reader)"],
        ),
        (vec!["etcd", "status", "--help"], vec!["leader", "(reader)"]),
        (
            vec!["etcd", "snapshot", "--help"],
            vec!["operator or etcd:backup", "sha256", "<FILE>"],
        ),
        (vec!["etcd", "defrag", "--help"], vec!["(operator)"]),
        (vec!["etcd", "alarm", "list", "--help"], vec!["(reader)"]),
        (
            vec!["etcd", "alarm", "disarm", "--help"],
            vec!["(operator)"],
        ),
        (vec!["etcd", "leave", "--help"], vec!["(admin; one node)"]),
        (
            vec!["etcd", "remove-member", "--help"],
            vec!["(admin;", "<ID>", "hex"],
        ),
        (
            vec!["etcd", "forfeit-leadership", "--help"],
            vec!["leadership", "(operator)"],
        ),
        (
            vec!["reset", "--help"],
            vec![
                "--force",
                "reset even if leaving etcd would break its quorum or fails",
            ],
        ),
    ] {
        let out = machinectl(&args);
        assert_ok(&out);
        let help = String::from_utf8_lossy(&out.stdout).to_lowercase();
        for want in wants {
            assert!(
                help.contains(&want.to_lowercase()),
                "{args:?}: want {want:?} in {help}"
            );
        }
    }
}

/// One-node commands refuse several nodes, and bad IDs and missing arguments are usage
/// errors, all before a client config is read or a node dialled.
#[test]
fn etcd_commands_refuse_bad_arguments_before_connecting() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let nowhere = tmp.path().join("no-machinectl.toml");
    let config = nowhere.to_str().expect("utf-8");
    let two = "10.5.0.2,10.5.0.3";
    for (what, args) in [
        ("bootstrap", vec!["bootstrap", "--nodes", two]),
        (
            "etcd snapshot",
            vec!["etcd", "snapshot", "etcd.db", "-n", two],
        ),
        ("etcd leave", vec!["etcd", "leave", "--nodes", two]),
        (
            "etcd remove-member",
            vec!["etcd", "remove-member", "8e9e05c52164694d", "--nodes", two],
        ),
    ] {
        let mut all = vec!["--machineconfig", config];
        all.extend(args);
        assert_fails(
            &machinectl(&all),
            1,
            &[
                &format!("{what} acts on one node only"),
                "10.5.0.2, 10.5.0.3",
                "pass one with --nodes ADDRESS",
            ],
        );
    }
    let missing = tmp.path().join("missing.snapshot");
    assert_fails(
        &machinectl([
            "bootstrap",
            "--recover-from",
            missing.to_str().expect("utf-8"),
        ]),
        1,
        &["cannot read the snapshot", "missing.snapshot"],
    );
    assert_fails(&machinectl(["etcd", "remove-member"]), 2, &["<ID>"]);
    assert_fails(
        &machinectl(["etcd", "remove-member", "node-1"]),
        2,
        &[
            "\"node-1\" is not an etcd member ID",
            "machinectl etcd members",
        ],
    );
    assert_fails(&machinectl(["etcd", "snapshot"]), 2, &["<FILE>"]);
    assert_fails(&machinectl(["etcd", "alarm"]), 2, &["list", "disarm"]);
    // Parsed: `reset --force` gets as far as the client config.
    let reset = machinectl(["--machineconfig", config, "reset", "--force", "--yes"]);
    assert_fails(&reset, 1, &["no-machinectl.toml"]);
    assert!(
        !text(&reset).contains("unexpected argument"),
        "{}",
        text(&reset)
    );
}
