//! The node API (issue 5) end to end under QEMU: a control plane boots with a generated
//! config through fw_cfg, PID 1 starts machined, and `machinectl` with the generated
//! admin client config reaches it through a QEMU user-network port forward
//! (127.0.0.1:PORT on the host to the guest's 50000): `version`, `services`,
//! `logs containerd`, `dmesg`, `get sysctls`, the security matrix's refusals from
//! the real node, and `image import` of an OCI archive the test writes itself (one
//! static binary, this image's own PID 1) that containerd then lists.
//!
//! The image is `KEELSON_TEST_IMAGE_AMD64` when set, else the suite's built image.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use keelson_configs::layout::{FW_CFG_CONFIG, ROOT_INIT, Slot};
use keelson_configs::pki::{self, Role};
use keelson_configs::{Mode, check_str};
use keelson_tests::{
    Arch, Guest, api_client_config, free_loopback_port, machinectl, machinectl_binary, show,
    test_image, user_net_control_plane,
};

/// One boot to "service machined ready" under software emulation, with room to spare.
const BOOT: Duration = Duration::from_secs(420);
const MAC: &str = "52:54:00:4b:45:05";

/// A control-plane config for QEMU's user network (eth0 = 10.0.2.15/24), checked valid,
/// and the node API CA it carries.
fn cluster() -> (String, pki::CertAndKey) {
    let (config, ca) = user_net_control_plane("apitest", r#"hostname = "api-test""#).unwrap();
    let text = toml::to_string(&config).unwrap();
    let checked = check_str(&text, "api-node.toml", Mode::Metal);
    assert!(checked.is_valid(), "{:#?}", checked.diagnostics);
    (text, ca)
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

/// Append a regular file to a tar archive.
fn add<W: std::io::Write>(tar: &mut tar::Builder<W>, name: &str, mode: u32, data: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(mode);
    header.set_mtime(0);
    header.set_cksum();
    tar.append_data(&mut header, name, data).unwrap();
}

/// An OCI image archive (an OCI image layout in a tar) named `name`: one uncompressed
/// layer holding `binary` as `/bin/hello`, its entry point.
fn oci_archive(path: &Path, name: &str, binary: &[u8]) {
    let mut layer = tar::Builder::new(Vec::new());
    add(&mut layer, "bin/hello", 0o755, binary);
    let layer = layer.into_inner().unwrap();
    let layer_digest = sha256(&layer);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/bin/hello"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
    })
    .to_string();
    let config_digest = sha256(config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{layer_digest}"),
            "size": layer.len(),
        }],
    })
    .to_string();
    let manifest_digest = sha256(manifest.as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": name},
        }],
    })
    .to_string();
    let mut archive = tar::Builder::new(std::fs::File::create(path).unwrap());
    add(
        &mut archive,
        "oci-layout",
        0o644,
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    );
    add(&mut archive, "index.json", 0o644, index.as_bytes());
    for (digest, data) in [
        (&layer_digest, layer.as_slice()),
        (&config_digest, config.as_bytes()),
        (&manifest_digest, manifest.as_bytes()),
    ] {
        add(&mut archive, &format!("blobs/sha256/{digest}"), 0o644, data);
    }
    archive.finish().unwrap();
}

fn run(bin: &Path, config: &Path, args: &[&str]) -> Output {
    machinectl(bin, config, Duration::from_secs(60), args).unwrap()
}

#[test]
fn machinectl_operates_a_booted_node() {
    let bin = machinectl_binary().unwrap();
    let (config, ca) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let config_file = dir.path().join("controlplane.toml");
    std::fs::write(&config_file, &config).unwrap();
    let port = free_loopback_port().unwrap();
    let endpoint = format!("127.0.0.1:{port}");
    let admin = dir.path().join("machinectl.toml");
    api_client_config(&ca, &endpoint, &Role::ALL, &admin).unwrap();

    let mut vm = Guest::new(Arch::Amd64)
        .image(test_image(Arch::Amd64).unwrap())
        .memory(2048)
        .fw_cfg(FW_CFG_CONFIG, &config_file)
        .api_forward(port, MAC)
        .boot()
        .unwrap();
    vm.wait_for("service machined ready", BOOT).unwrap();
    // containerd has printed its start-up by the time it is ready (`logs` below).
    vm.wait_for("service containerd ready", BOOT).unwrap();

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
        "containerd logged nothing: {}\n--- console ---\n{}",
        show(&out),
        vm.console()
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

    // An image the test builds: this image's own static PID 1 as the one binary.
    let binary = keelson_imager::inspect::read_root_file(
        &test_image(Arch::Amd64).unwrap(),
        Slot::A,
        ROOT_INIT,
    )
    .unwrap();
    assert_eq!(&binary[..4], b"\x7fELF");
    let archive = dir.path().join("hello.tar");
    let name = "keelson.test/hello:1";
    oci_archive(&archive, name, &binary);
    let out = run(
        &bin,
        &admin,
        &[
            "--context",
            "operator",
            "image",
            "import",
            archive.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(name),
        "{}",
        show(&out)
    );
    let out = run(&bin, &admin, &["image", "list", "-o", "json"]);
    assert!(out.status.success(), "{}", show(&out));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i.to_string().contains(name)),
        "{}",
        show(&out)
    );
    // The same name with other content: an operator may not repoint it (a privileged
    // pod would run the operator's image at its next start); an admin may.
    let listed_before = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut other = binary.clone();
    other.extend_from_slice(b"another build");
    let repoint = dir.path().join("hello-repoint.tar");
    oci_archive(&repoint, name, &other);
    let import_as = |context: &str| {
        run(
            &bin,
            &admin,
            &[
                "--context",
                context,
                "image",
                "import",
                repoint.to_str().unwrap(),
            ],
        )
    };
    let out = import_as("operator");
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr)
                .contains("replacing an image needs role admin, your certificate has operator"),
        "an operator repointing an existing name: {}",
        show(&out)
    );
    let list = || {
        let out = run(&bin, &admin, &["image", "list", "-o", "json"]);
        assert!(out.status.success(), "{}", show(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(list(), listed_before, "the refused import changed nothing");
    let out = import_as("admin");
    assert!(out.status.success(), "an admin repoints it: {}", show(&out));
    assert_ne!(
        list(),
        listed_before,
        "the admin's import repointed the name"
    );
    let out = run(&bin, &admin, &["containers"]);
    assert!(out.status.success(), "{}", show(&out));

    // machined runs as its own user with three capabilities and no_new_privs, and has
    // raised its open-file limit to the hard limit (read from the node, as an admin).
    let out = run(
        &bin,
        &admin,
        &["--context", "admin", "get", "processes", "-o", "json"],
    );
    assert!(out.status.success(), "{}", show(&out));
    let processes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pid = processes
        .as_array()
        .unwrap()
        .iter()
        .find(|p| {
            p["command"]
                .as_str()
                .and_then(|c| c.split_whitespace().next())
                .is_some_and(|argv0| argv0.ends_with("machined"))
        })
        .and_then(|p| p["pid"].as_str())
        .unwrap_or_else(|| panic!("no machined in {}", show(&out)))
        .to_string();
    let read = |path: &str| {
        let out = run(&bin, &admin, &["--context", "admin", "read", path]);
        assert!(out.status.success(), "{path}: {}", show(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let status = read(&format!("/proc/{pid}/status"));
    for want in [
        "Uid:\t50\t50\t50\t50",
        "Gid:\t50\t50\t50\t50",
        "CapEff:\t0000000402000002",
        "CapBnd:\t0000000402000002",
        "NoNewPrivs:\t1",
    ] {
        assert!(
            status.contains(want),
            "machined's status lacks {want:?}:\n{status}"
        );
    }
    let limits = read(&format!("/proc/{pid}/limits"));
    let open_files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("{limits}"))
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect();
    assert_eq!(open_files[0], open_files[1], "soft = hard:\n{limits}");
    assert!(
        open_files[0].parse::<u64>().unwrap() > 1024,
        "above the default 1024:\n{limits}"
    );
}
