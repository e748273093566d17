//! The node API end to end on the host, through the real `machinectl` binary: the real
//! machined server (in-process, TLS on 127.0.0.1, a random port, a temporary STATE) with a
//! recording backend in place of PID 1's control socket. Covers the commands, the errors
//! machinectl names, apply-config's modes and rules, and maintenance mode. The security
//! matrix through the library client is the daemon's (`machined/daemon/tests/api.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

// The daemon's test support: a generated cluster and a running machined.
#[path = "../../daemon/tests/api_support/mod.rs"]
mod api_support;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use api_support::*;
use keelson_configs::pki::Role;
use keelson_machined::backend::{Call, LivePart, Power};

/// Runs the built machinectl.
fn machinectl(config: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_machinectl"))
        .arg("--machineconfig")
        .arg(config)
        .args(args)
        .env_remove("MACHINECONFIG")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run machinectl")
}

#[test]
fn version_services_logs_and_more_through_machinectl() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let config = cluster.client_config(node.address, Role::Reader);

    let out = machinectl(&config, &["version", "-o", "json"]);
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["node"], node.address.to_string());
    assert_eq!(v[0]["os"], "Keelson");
    assert_eq!(v[0]["version"], "0.1.0");
    assert_eq!(v[0]["arch"], std::env::consts::ARCH);
    assert_eq!(v[0]["type"], "controlplane");
    assert_eq!(v[0]["maintenance"], false);

    let out = machinectl(&config, &["version", "-o", "yaml"]);
    assert_ok(&out);
    assert!(stdout(&out).contains("os: Keelson"), "{}", text(&out));

    let out = machinectl(&config, &["services"]);
    assert_ok(&out);
    let table = stdout(&out);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NODE"), "{table}");
    assert!(
        lines[0].contains("SERVICE") && lines[0].contains("STATE"),
        "{table}"
    );
    assert!(
        table.contains("containerd") && table.contains("ready"),
        "{table}"
    );
    assert!(
        table.contains("kubelet") && table.contains("backoff"),
        "{table}"
    );

    let out = machinectl(&config, &["service", "kubelet"]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("last exit: status 1"),
        "{}",
        text(&out)
    );
    let out = machinectl(&config, &["service", "nope"]);
    assert_fails(
        &out,
        &["no service named \"nope\"", "containerd, kubelet, machined"],
    );

    let out = machinectl(&config, &["logs", "containerd"]);
    assert_ok(&out);
    assert_eq!(
        stdout(&out),
        (1..=5)
            .map(|i| format!("containerd line {i}\n"))
            .collect::<String>()
    );
    let out = machinectl(&config, &["logs", "containerd", "--tail", "2"]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "containerd line 4\ncontainerd line 5\n");
    let out = machinectl(&config, &["logs", "init"]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "[init] stage 2\n");

    let out = machinectl(&config, &["get", "memory", "MemTotal"]);
    assert_ok(&out);
    assert!(stdout(&out).contains("MemTotal"), "{}", text(&out));
    let out = machinectl(&config, &["get", "sysctls", "kernel.ostype", "-o", "json"]);
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "kernel.ostype");
    assert_eq!(v[0]["value"], "Linux");
    for resource in [
        "addresses",
        "links",
        "routes",
        "mounts",
        "modules",
        "disks",
        "processes",
    ] {
        let out = machinectl(&config, &["get", resource]);
        assert_ok(&out);
        assert!(
            stdout(&out).starts_with("NODE"),
            "{resource}: {}",
            text(&out)
        );
    }
    let out = machinectl(&config, &["get", "pods"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    let out = machinectl(&config, &["read", "/proc/sys/kernel/ostype"]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "Linux\n");
    let out = machinectl(&config, &["read", "/system/state/config.toml"]);
    assert_fails(&out, &["needs role admin", "your certificate has reader"]);
    let out = machinectl(&config, &["read", "/etc/shadow"]);
    assert_fails(&out, &["outside what the node API serves"]);

    let out = machinectl(&config, &["dmesg", "--tail", "3"]);
    assert_ok(&out);
    assert!(stdout(&out).lines().count() <= 3, "{}", text(&out));

    let out = machinectl(&config, &["health", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let checks = v.as_array().unwrap();
    let kubelet = checks
        .iter()
        .find(|c| c["check"] == "service kubelet")
        .unwrap();
    assert_eq!(kubelet["ok"], false);
    assert!(kubelet["reason"].as_str().unwrap().contains("backoff"));
    assert_eq!(
        out.status.code(),
        Some(1),
        "unhealthy node exits 1: {}",
        text(&out)
    );

    // Nothing above changed the node.
    assert_eq!(node.backend.calls(), []);
    assert_eq!(
        node.state_config().as_deref(),
        Some(cluster.controlplane.as_str())
    );
}

#[test]
fn logs_follow_streams_new_lines() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let config = cluster.client_config(node.address, Role::Reader);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_machinectl"))
        .arg("--machineconfig")
        .arg(&config)
        .args(["logs", "containerd", "-f", "--tail", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    node.backend.push_log("containerd", "a new line");
    std::thread::sleep(Duration::from_millis(1200));
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(stdout(&out), "containerd line 5\na new line\n");
}

#[test]
fn operator_and_admin_actions_reach_the_backend() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let config = cluster.client_config(node.address, Role::Operator);
    assert_ok(&machinectl(&config, &["service", "containerd", "restart"]));
    assert_ok(&machinectl(&config, &["reboot"]));
    assert_ok(&machinectl(&config, &["shutdown"]));
    let out = machinectl(&config, &["service", "machined", "stop"]);
    assert_fails(&out, &["would cut the node off"]);
    let out = machinectl(&config, &["--context", "admin", "reset"]);
    assert_fails(&out, &["pass --yes to confirm"]);
    assert_ok(&machinectl(
        &config,
        &["--context", "admin", "reset", "--yes"],
    ));
    assert_eq!(
        node.backend.calls(),
        [
            Call::ServiceAction(
                "containerd".into(),
                keelson_machined::backend::ServiceOp::Restart
            ),
            Call::Power(Power::Reboot),
            Call::Power(Power::Poweroff),
            Call::Reset,
        ]
    );
}

#[test]
fn an_operator_sends_a_signal_to_a_service() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let config = cluster.client_config(node.address, Role::Operator);
    let out = machinectl(&config, &["service", "containerd", "kill"]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("KILL sent to service containerd"),
        "{}",
        text(&out)
    );
    assert_ok(&machinectl(
        &config,
        &["service", "kubelet", "kill", "--signal", "TERM"],
    ));
    let out = machinectl(&config, &["service", "machined", "kill"]);
    assert_fails(&out, &["would cut this very call off"]);
    let out = machinectl(&config, &["service", "nope", "kill"]);
    assert_fails(&out, &["no service named \"nope\""]);
    let out = machinectl(
        &config,
        &["--context", "reader", "service", "containerd", "kill"],
    );
    assert_fails(
        &out,
        &["needs role operator", "your certificate has reader"],
    );
    assert_eq!(
        node.backend.calls(),
        [
            Call::Kill("containerd".into(), "KILL".into()),
            Call::Kill("kubelet".into(), "TERM".into()),
        ]
    );
}

#[test]
fn machinectl_names_each_failure() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let config = cluster.client_config(node.address, Role::Reader);
    let file = cluster.dir.path().join("new.toml");
    std::fs::write(&file, cluster.with_sysctl("vm.swappiness", "5")).unwrap();

    // Wrong role.
    let out = machinectl(&config, &["apply-config", "--file", file.to_str().unwrap()]);
    assert_fails(
        &out,
        &[
            "machinectl: error: permission denied: apply-config needs role admin, your certificate has reader",
        ],
    );

    // Unreachable node: a port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let out = machinectl(
        &config,
        &["--endpoints", &closed_addr.to_string(), "version"],
    );
    assert_fails(
        &out,
        &[&format!(
            "cannot reach {closed_addr}: connection refused — is the node up and is the endpoint right?"
        )],
    );

    // A context whose CA did not sign the node's certificate.
    let other = Cluster::new();
    let mut wrong = keelson_api::clientconfig::ClientConfig::single(
        "other-cluster",
        other.context(node.address, &other.client(Role::Admin)),
    );
    let path = cluster.dir.path().join("wrong-ca.toml");
    wrong.save(&path).unwrap();
    let out = machinectl(&path, &["version"]);
    assert_fails(
        &out,
        &["the node's certificate is not signed by the CA in context \"other-cluster\""],
    );

    // An expired client certificate.
    let expired = expired_admin(&cluster);
    wrong = keelson_api::clientconfig::ClientConfig::single(
        "old",
        cluster.context(node.address, &expired),
    );
    wrong.save(&path).unwrap();
    let out = machinectl(&path, &["version"]);
    assert_fails(
        &out,
        &["the client certificate in context \"old\" expired on 2021-01-01"],
    );

    // --insecure against a configured node.
    let out = machinectl(
        &config,
        &[
            "--insecure",
            "--nodes",
            &node.address.to_string(),
            "version",
        ],
    );
    assert_fails(&out, &["requires a client certificate: it is configured"]);

    // Unknown context.
    let out = machinectl(&config, &["--context", "nope", "version"]);
    assert_fails(
        &out,
        &[
            "no context named \"nope\"",
            "admin, etcd:backup, operator, reader",
        ],
    );
    assert_eq!(node.backend.calls(), []);
}

/// `time` on a node without time servers: its clock is trusted as it is, nothing measured.
#[test]
fn time_shows_a_clock_without_servers() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let config = cluster.client_config(node.address, Role::Reader);
    let out = machinectl(&config, &["time", "-o", "json"]);
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["node"], node.address.to_string());
    assert_eq!(v[0]["servers"], serde_json::json!([]));
    assert_eq!(v[0]["synced"], true);
    assert_eq!(v[0]["measured_from"], serde_json::Value::Null);
    assert_eq!(v[0]["offset_now"], serde_json::Value::Null);
    let out = machinectl(&config, &["time"]);
    assert_ok(&out);
    let table = stdout(&out);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NODE") && lines[0].contains("SERVERS   SYNCED   SYNCED_FROM"),
        "{table}"
    );
    assert!(lines[1].ends_with("yes"), "{table}");
}

/// Role checks on the etcd-era commands are the node's, before any etcd is asked: a reader
/// may not take a snapshot (and no file is left behind), etcd:backup may do nothing else.
#[test]
fn etcd_roles_are_named_when_refused() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let config = cluster.client_config(node.address, Role::Reader);
    let file = cluster.dir.path().join("etcd.snapshot");
    let out = machinectl(&config, &["etcd", "snapshot", file.to_str().unwrap()]);
    assert_fails(
        &out,
        &[
            "permission denied: etcd snapshot needs role operator or etcd:backup, your certificate has reader",
        ],
    );
    assert!(!file.exists());
    assert!(!cluster.dir.path().join(".etcd.snapshot.part").exists());

    for (args, command) in [
        (vec!["version"], "version"),
        (vec!["etcd", "members"], "etcd members"),
        (vec!["bootstrap"], "bootstrap"),
    ] {
        let mut all = vec!["--context", "etcd:backup"];
        all.extend(args);
        assert_fails(
            &machinectl(&config, &all),
            &[
                &format!("permission denied: {command} needs role"),
                "your certificate has etcd:backup",
            ],
        );
    }
    let out = machinectl(
        &config,
        &["--context", "operator", "reset", "--yes", "--force"],
    );
    assert_fails(
        &out,
        &["permission denied: reset needs role admin, your certificate has operator"],
    );
    assert_eq!(node.backend.calls(), []);
}

#[test]
fn apply_config_validates_diffs_and_applies_live() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let config = cluster.client_config(node.address, Role::Admin);
    let file = cluster.dir.path().join("new.toml");
    let write = |text: &str| std::fs::write(&file, text).unwrap();
    let f = file.to_str().unwrap();

    // A config with errors: refused with the validator's messages, nothing changes.
    write(&format!("{}\n[bogus]\nx = 1\n", cluster.controlplane));
    let out = machinectl(
        &config,
        &["apply-config", "--file", f, "--mode", "no-reboot"],
    );
    assert_fails(&out, &["invalid argument", "nothing was changed", "bogus"]);
    write("this is = not toml [");
    let out = machinectl(&config, &["apply-config", "--file", f]);
    assert_fails(&out, &["invalid machine config"]);
    assert_eq!(
        node.state_config().as_deref(),
        Some(cluster.controlplane.as_str())
    );
    assert_eq!(node.backend.calls(), []);

    // Dry run: the diff, and nothing changes.
    let new = cluster.with_sysctl("vm.swappiness", "7");
    write(&new);
    let out = machinectl(
        &config,
        &[
            "apply-config",
            "--file",
            f,
            "--mode",
            "no-reboot",
            "--dry-run",
        ],
    );
    assert_ok(&out);
    let shown = stdout(&out);
    assert!(shown.contains("+\"vm.swappiness\" = \"7\""), "{shown}");
    assert!(
        shown.contains("--- running") && shown.contains("+++ new"),
        "{shown}"
    );
    assert!(
        !shown.contains("BEGIN PRIVATE KEY"),
        "secrets stay out of diffs: {shown}"
    );
    assert!(shown.contains("dry run"), "{shown}");
    assert_eq!(
        node.state_config().as_deref(),
        Some(cluster.controlplane.as_str())
    );
    assert_eq!(node.backend.calls(), []);

    // A change that needs a reboot is refused by no-reboot, with the reason.
    let reboot_only = cluster.with_machine("install_disk", toml::Value::String("/dev/sdb".into()));
    write(&reboot_only);
    let out = machinectl(
        &config,
        &["apply-config", "--file", f, "--mode", "no-reboot"],
    );
    assert_fails(
        &out,
        &[
            "--mode no-reboot refused",
            "machine.install_disk: the install disk is used only when the node installs itself",
        ],
    );
    assert_eq!(
        node.state_config().as_deref(),
        Some(cluster.controlplane.as_str())
    );
    assert_eq!(node.backend.calls(), []);

    // no-reboot with a sysctl: applied live through init, then written to STATE.
    write(&new);
    let out = machinectl(
        &config,
        &["apply-config", "--file", f, "--mode", "no-reboot"],
    );
    assert_ok(&out);
    assert!(
        stdout(&out).contains("config written to STATE"),
        "{}",
        text(&out)
    );
    assert_eq!(node.state_config().as_deref(), Some(new.as_str()));
    assert_eq!(
        node.backend.calls(),
        [Call::ApplyLive(vec![LivePart::Sysctls], new.clone())]
    );

    // The same config again: nothing to do.
    let out = machinectl(&config, &["apply-config", "--file", f, "--mode", "auto"]);
    assert_ok(&out);
    assert!(stdout(&out).contains("no changes"), "{}", text(&out));
    assert_eq!(node.backend.calls().len(), 1);

    // auto with a reboot-only change: STATE, then a reboot.
    let reboot_only = {
        let mut c: toml::Table = toml::from_str(&new).unwrap();
        c["machine"]["install_disk"] = toml::Value::String("/dev/sdb".into());
        toml::to_string(&c).unwrap()
    };
    write(&reboot_only);
    let out = machinectl(&config, &["apply-config", "--file", f, "-o", "json"]);
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["mode"], "reboot");
    assert_eq!(node.state_config().as_deref(), Some(reboot_only.as_str()));
    assert_eq!(
        node.backend.calls().last(),
        Some(&Call::Power(Power::Reboot))
    );

    // staged: written next to the config, nothing applied.
    let calls = node.backend.calls().len();
    write(&cluster.with_sysctl("vm.swappiness", "9"));
    let out = machinectl(&config, &["apply-config", "--file", f, "--mode", "staged"]);
    assert_ok(&out);
    assert!(node.state.path().join("config.staged.toml").is_file());
    assert_eq!(node.state_config().as_deref(), Some(reboot_only.as_str()));
    assert_eq!(node.backend.calls().len(), calls);
}

#[test]
fn apply_config_try_reverts_unless_confirmed() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let config = cluster.client_config(node.address, Role::Admin);
    let file = cluster.dir.path().join("try.toml");
    let tried = cluster.with_sysctl("vm.swappiness", "3");
    std::fs::write(&file, &tried).unwrap();
    let f = file.to_str().unwrap();

    let out = machinectl(
        &config,
        &[
            "apply-config",
            "--file",
            f,
            "--mode",
            "try",
            "--timeout",
            "5s",
        ],
    );
    assert_ok(&out);
    assert!(stdout(&out).contains("reverts in 5 s"), "{}", text(&out));
    assert_eq!(
        node.backend.calls(),
        [Call::ApplyLive(vec![LivePart::Sysctls], tried.clone())]
    );
    // Another apply waits for the try to end.
    let out = machinectl(
        &config,
        &["apply-config", "--file", f, "--mode", "no-reboot"],
    );
    assert_fails(&out, &["waiting for confirmation"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.backend.calls().len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        node.backend.calls(),
        [
            Call::ApplyLive(vec![LivePart::Sysctls], tried.clone()),
            Call::ApplyLive(vec![LivePart::Sysctls], cluster.controlplane.clone()),
        ],
        "the tried config was reverted"
    );
    assert_eq!(
        node.state_config().as_deref(),
        Some(cluster.controlplane.as_str())
    );
    let out = machinectl(&config, &["apply-config", "--confirm"]);
    assert_fails(
        &out,
        &["no config applied with --mode try is waiting for confirmation"],
    );

    // Confirmed in time: written to STATE, never reverted.
    let out = machinectl(
        &config,
        &[
            "apply-config",
            "--file",
            f,
            "--mode",
            "try",
            "--timeout",
            "4s",
        ],
    );
    assert_ok(&out);
    assert_ok(&machinectl(&config, &["apply-config", "--confirm"]));
    assert_eq!(node.state_config().as_deref(), Some(tried.as_str()));
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(node.backend.calls().len(), 3, "{:?}", node.backend.calls());
}

#[test]
fn a_failed_live_apply_is_reverted_and_state_is_kept() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    node.backend
        .fail_apply(Some("sysctl vm.swappiness: permission denied"));
    let config = cluster.client_config(node.address, Role::Admin);
    let file = cluster.dir.path().join("new.toml");
    std::fs::write(&file, cluster.with_sysctl("vm.swappiness", "2")).unwrap();
    let out = machinectl(
        &config,
        &[
            "apply-config",
            "--file",
            file.to_str().unwrap(),
            "--mode",
            "no-reboot",
        ],
    );
    assert_fails(
        &out,
        &[
            "init could not apply the config live",
            "STATE was not changed",
        ],
    );
    assert_eq!(
        node.state_config().as_deref(),
        Some(cluster.controlplane.as_str())
    );
}

#[test]
fn maintenance_mode_serves_only_version_and_apply_config_once() {
    let cluster = Cluster::new();
    let node = Node::start(None);
    let address = node.address.to_string();
    let config = cluster.client_config(node.address, Role::Admin);
    let insecure = |args: &[&str]| {
        let mut all = vec!["--insecure", "--nodes", address.as_str()];
        all.extend_from_slice(args);
        machinectl(&config, &all)
    };

    let out = insecure(&["version", "-o", "json"]);
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["maintenance"], true);
    let out = insecure(&["services"]);
    assert_fails(
        &out,
        &["maintenance mode", "serves only version and apply-config"],
    );
    let out = insecure(&["reboot"]);
    assert_fails(&out, &["maintenance mode"]);
    // The context's CA did not sign the maintenance certificate.
    let out = machinectl(&config, &["version"]);
    assert_fails(&out, &["not signed by the CA in context", "--insecure"]);

    // An invalid first config is refused and the node stays in maintenance mode.
    let file = cluster.dir.path().join("first.toml");
    std::fs::write(&file, "version = \"v1\"\n").unwrap();
    let out = insecure(&["apply-config", "--file", file.to_str().unwrap()]);
    assert_fails(&out, &["invalid machine config"]);
    assert_eq!(node.state_config(), None);

    std::fs::write(&file, &cluster.controlplane).unwrap();
    let out = insecure(&["apply-config", "--file", file.to_str().unwrap()]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("now requires client certificates"),
        "{}",
        text(&out)
    );
    assert_eq!(
        node.state_config().as_deref(),
        Some(cluster.controlplane.as_str())
    );
    assert_eq!(node.backend.calls(), [Call::ConfigInstalled]);

    // From now on: mutual TLS only.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = machinectl(&config, &["version", "-o", "json"]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v[0]["maintenance"], false);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never left maintenance mode: {}",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = insecure(&["version"]);
    assert_fails(&out, &["requires a client certificate"]);
    let out = insecure(&["apply-config", "--file", file.to_str().unwrap()]);
    assert_fails(&out, &["requires a client certificate"]);

    // After a restart, STATE decides: still mutual TLS.
    let (state, backend) = node.stop();
    let node = Node::start_in(state, backend);
    let config = cluster.client_config(node.address, Role::Reader);
    assert_ok(&machinectl(&config, &["version"]));
    let out = machinectl(
        &config,
        &[
            "--insecure",
            "--nodes",
            &node.address.to_string(),
            "version",
        ],
    );
    assert_fails(&out, &["requires a client certificate"]);
}

#[test]
fn completions_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_machinectl"))
            .args(["completion", shell])
            .output()
            .unwrap();
        assert_ok(&out);
        let script = stdout(&out);
        assert!(script.contains("apply-config"), "{shell}");
        assert!(script.contains("machinectl"), "{shell}");
    }
}
