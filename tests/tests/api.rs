//! The node API (issue 5) end to end under QEMU: a control plane boots with a generated
//! config through fw_cfg, PID 1 starts machined, and `machinectl` with the generated
//! admin client config reaches it through a QEMU user-network port forward
//! (127.0.0.1:PORT on the host to the guest's 50000): `version`, `services`,
//! `logs containerd`, `dmesg`, `get sysctls`, and the security matrix's refusals from
//! the real node.
//!
//! The image is `KEELSON_TEST_IMAGE_AMD64` when set, else the suite's built image.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use keelson_configs::generate::{GenerateOptions, generate};
use keelson_configs::layout::FW_CFG_CONFIG;
use keelson_configs::pki::{self, Role};
use keelson_configs::secrets::ClusterSecrets;
use keelson_configs::{Mode, check_str};
use keelson_machined::clientconfig::{ClientConfig, Context};
use keelson_tests::{Arch, Guest, built_image};

/// One boot to "service machined ready" under software emulation, with room to spare.
const BOOT: Duration = Duration::from_secs(420);
const MAC: &str = "52:54:00:4b:45:05";

fn image() -> PathBuf {
    match std::env::var_os("KEELSON_TEST_IMAGE_AMD64") {
        Some(path) => PathBuf::from(path),
        None => built_image(Arch::Amd64).unwrap(),
    }
}

/// The built `machinectl` next to this test's binary (target/<profile>/machinectl), built
/// first if the workspace build has not made it yet.
fn machinectl_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let bin = profile_dir.join("machinectl");
    if !bin.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "keelson-machined", "--bin", "machinectl"])
            .status()
            .unwrap();
        assert!(status.success(), "building machinectl failed");
    }
    assert!(bin.is_file(), "no machinectl at {}", bin.display());
    bin
}

/// A control-plane config for QEMU's user network (eth0 = 10.0.2.15/24) and the node
/// API CA it carries.
fn cluster() -> (String, pki::CertAndKey) {
    let secrets = ClusterSecrets::generate().unwrap();
    let generated = generate(
        &GenerateOptions {
            cluster_name: "apitest".into(),
            endpoint: "https://10.0.2.15:6443".into(),
            ..GenerateOptions::default()
        },
        &secrets,
    )
    .unwrap();
    let mut config: toml::Table = toml::from_str(&generated.control_plane.text).unwrap();
    let network: toml::Table = toml::from_str(
        r#"
nameservers = ["10.0.2.3"]
[[interfaces]]
name = "eth0"
addresses = ["10.0.2.15/24"]
[[interfaces.routes]]
to = "0.0.0.0/0"
via = "10.0.2.2"
"#,
    )
    .unwrap();
    let machine = config["machine"].as_table_mut().unwrap();
    machine.insert("network".into(), toml::Value::Table(network));
    machine.insert("hostname".into(), "api-test".into());
    let text = toml::to_string(&config).unwrap();
    let checked = check_str(&text, "api-node.toml", Mode::Metal);
    assert!(checked.is_valid(), "{:#?}", checked.diagnostics);
    (text, secrets.node_api_ca)
}

fn run(bin: &Path, config: &Path, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("60")
        .arg(bin)
        .arg("--machineconfig")
        .arg(config)
        .args(args)
        .env_remove("MACHINECONFIG")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn machinectl_operates_a_booted_node() {
    let bin = machinectl_binary();
    let (config, ca) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let config_file = dir.path().join("controlplane.toml");
    std::fs::write(&config_file, &config).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let endpoint = format!("127.0.0.1:{port}");
    let context = |role: Role| {
        let cert = pki::issue_api_client(&ca, &format!("{role}-user"), role).unwrap();
        Context {
            endpoints: vec![endpoint.clone()],
            nodes: Vec::new(),
            ca: ca.cert.clone(),
            cert: cert.cert,
            key: cert.key,
        }
    };
    let mut clients = ClientConfig::default();
    for role in Role::ALL {
        clients.contexts.insert(role.name().into(), context(role));
    }
    clients.context = Some("admin".into());
    let admin = dir.path().join("machinectl.toml");
    clients.save(&admin).unwrap();

    let mut vm = Guest::new(Arch::Amd64)
        .image(image())
        .memory(2048)
        .fw_cfg(FW_CFG_CONFIG, &config_file)
        .qemu_args([
            "-netdev".to_string(),
            format!("user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:50000"),
            "-device".to_string(),
            format!("virtio-net-pci,netdev=n0,mac={MAC}"),
        ])
        .boot()
        .unwrap();
    vm.wait_for("service machined ready", BOOT).unwrap();

    // machined is up; the API answers once its listener is bound.
    let deadline = Instant::now() + Duration::from_secs(60);
    let version = loop {
        let out = run(&bin, &admin, &["version", "-o", "json"]);
        if out.status.success() {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "machinectl version never succeeded: {}\n{}",
            show(&out),
            vm.console()
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    let v: serde_json::Value = serde_json::from_slice(&version.stdout).unwrap();
    assert_eq!(v[0]["arch"], "x86_64", "{}", show(&version));
    assert_eq!(v[0]["slot"], "a", "{}", show(&version));
    assert_eq!(v[0]["type"], "controlplane");
    assert_eq!(v[0]["hostname"], "api-test");
    assert_eq!(v[0]["maintenance"], false);

    let out = run(&bin, &admin, &["services"]);
    assert!(out.status.success(), "{}", show(&out));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        table.contains("containerd") && table.contains("machined"),
        "{table}"
    );

    let out = run(&bin, &admin, &["logs", "containerd", "--tail", "20"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        !out.stdout.is_empty(),
        "containerd logged nothing: {}",
        show(&out)
    );

    let out = run(&bin, &admin, &["dmesg", "--tail", "50"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Linux") || out.stdout.len() > 100,
        "{}",
        show(&out)
    );

    let out = run(
        &bin,
        &admin,
        &["get", "sysctls", "net.ipv4.ip_forward", "-o", "json"],
    );
    assert!(out.status.success(), "{}", show(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["value"], "1", "{}", show(&out));

    // The node itself refuses what a reader may not do, and an unauthenticated client.
    let out = run(
        &bin,
        &admin,
        &[
            "--context",
            "reader",
            "apply-config",
            "--file",
            config_file.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "permission denied: apply-config needs role admin, your certificate has reader"
        ),
        "{}",
        show(&out)
    );
    let out = run(&bin, &admin, &["--context", "operator", "reset", "--yes"]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("reset needs role admin, your certificate has operator"),
        "{}",
        show(&out)
    );
    let out = run(
        &bin,
        &admin,
        &["--insecure", "--nodes", &endpoint, "version"],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("requires a client certificate"),
        "{}",
        show(&out)
    );
    // A reader reads logs.
    let out = run(&bin, &admin, &["--context", "reader", "logs", "machined"]);
    assert!(out.status.success(), "{}", show(&out));
}
