//! `machinectl upgrade`, `upgrade status`, `rollback` and `version` through the real
//! binary against the real machined (in-process, mutual TLS on 127.0.0.1) with the real
//! upgrade engine over temporary files (ESP, STATE, kernel command line, os-release) and a
//! recording backend in place of PID 1. No VM: the "reboot" is the test rewriting the
//! command line and os-release while machinectl waits, as a node that came back on the
//! other slot answers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

// The daemon's test support: a generated cluster, a recording backend.
#[path = "../../daemon/tests/api_support/mod.rs"]
mod api_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api_support::*;
use keelson_configs::boot::{BootEntry, EntryVersion, VerityParams};
use keelson_configs::layout::Slot;
use keelson_configs::pki::Role;
use keelson_machined::backend::{Call, Power, RecordingBackend};
use keelson_machined::etcd::EtcdPaths;
use keelson_machined::node::NodePaths;
use keelson_machined::server::{self, Options};
use keelson_machined::upgrade::{UpgradePaths, Upgrader};
use keelson_upgrade::bundle::{hash_part, write_bundle};
use keelson_upgrade::keys::{self, SigningKey};
use keelson_upgrade::manifest::{FORMAT, Manifest};
use keelson_upgrade::verity;

/// Slot b's partition: 4 MiB (a plain file under the fake `/dev`).
const PARTITION_SECTORS: u64 = 8192;

fn write(path: &Path, data: impl AsRef<[u8]>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

fn entry(slot: Slot, generation: u64, version: &str) -> String {
    let verity = VerityParams {
        roothash: "00".repeat(32),
        salt: "11".repeat(32),
        data_blocks: 1,
        hash_offset: 4096,
    };
    let version = EntryVersion {
        generation,
        os_version: version.into(),
    };
    BootEntry::for_slot(slot, &version, "console=ttyS0", &verity).render()
}

/// A node booted from slot a (0.1.0, blessed) whose slot b holds a blessed 0.0.9; its
/// partitions are files under a fake sysfs and `/dev`, and it trusts `key`.
struct UpgradeNode {
    key: SigningKey,
    address: std::net::SocketAddr,
    backend: Arc<RecordingBackend>,
    root: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UpgradeNode {
    fn start(config: &str) -> UpgradeNode {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        write(&r.join("state/config.toml"), config);
        write(&r.join("proc/cmdline"), "console=ttyS0 keelson.slot=a\n");
        write(
            &r.join("os-release"),
            "NAME=\"Keelson\"\nVERSION_ID=0.1.0\n",
        );
        let entries = r.join("esp/loader/entries");
        write(&entries.join("keelson-a.conf"), entry(Slot::A, 1, "0.1.0"));
        write(&entries.join("keelson-b.conf"), entry(Slot::B, 0, "0.0.9"));
        for slot in ["a", "b"] {
            write(&r.join(format!("esp/keelson/{slot}/vmlinuz")), "kernel");
            write(&r.join(format!("esp/keelson/{slot}/initrd")), "initrd");
        }
        write(&r.join("components"), "containerd\n");
        for (name, part) in [("vda2", "ROOT-A"), ("vda3", "ROOT-B")] {
            let d = r.join("sys/class/block").join(name);
            write(
                &d.join("uevent"),
                format!("MAJOR=254\nDEVNAME={name}\nDEVTYPE=partition\nPARTNAME={part}\n"),
            );
            write(&d.join("size"), format!("{PARTITION_SECTORS}\n"));
        }
        write(
            &r.join("dev/vda3"),
            vec![0xAAu8; (PARTITION_SECTORS * 512) as usize],
        );
        let key = keys::generate().unwrap();
        std::fs::create_dir_all(r.join("keys")).unwrap();
        keys::save_public_key(&r.join("keys/test.pub"), &key.verifying_key()).unwrap();
        let paths = UpgradePaths {
            state: r.join("state"),
            esp: r.join("esp"),
            trusted_keys: r.join("keys"),
            os_release: r.join("os-release"),
            cmdline: r.join("proc/cmdline"),
            sys_block: r.join("sys/class/block"),
            dev: r.join("dev"),
            components: r.join("components"),
            spool: r.join("var/lib/keelson/upgrade"),
        };
        let options = Options {
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: r.join("state"),
            read_root: "/".into(),
            spool_dir: r.join("spool"),
            mode: keelson_configs::Mode::Metal,
            paths: NodePaths {
                os_release: r.join("os-release"),
                proc: r.join("proc"),
                containerd_socket: r.join("containerd.sock"),
                ..NodePaths::default()
            },
            etcd_paths: EtcdPaths {
                data_dir: r.join("etcd"),
                env_file: r.join("etcd.env"),
                pki_dir: r.join("pki"),
            },
            kube_paths: keelson_machined::kubernetes::KubePaths {
                root: r.join("root"),
                containerd_socket: r.join("containerd.sock"),
            },
            drive_cluster: false,
            clock: Arc::new(NoClock),
        };
        let backend = backend();
        let b: Arc<dyn keelson_machined::backend::NodeBackend> = backend.clone();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            rt().block_on(async move {
                let bound = server::bind(options)
                    .await
                    .unwrap()
                    .with_upgrader(Upgrader::new(paths));
                addr_tx.send(bound.local_addr().unwrap()).unwrap();
                bound
                    .serve(b, async move {
                        let _ = stop_rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let address = addr_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        UpgradeNode {
            key,
            address,
            backend,
            root,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// What a node that came back on `slot` with `version` answers.
    fn booted(&self, slot: &str, version: &str) {
        let r = self.root.path();
        write(
            &r.join("proc/cmdline"),
            format!("console=ttyS0 keelson.slot={slot}\n"),
        );
        write(
            &r.join("os-release"),
            format!("NAME=\"Keelson\"\nVERSION_ID={version}\n"),
        );
    }

    fn reboots(&self) -> usize {
        self.backend
            .calls()
            .iter()
            .filter(|c| **c == Call::Power(Power::Reboot))
            .count()
    }
}

impl Drop for UpgradeNode {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn machinectl(config: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_machinectl"));
    command
        .arg("--machineconfig")
        .arg(config)
        .args(args)
        .env_remove("MACHINECONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn run(config: &Path, args: &[&str]) -> Output {
    machinectl(config, args).output().unwrap()
}

/// Waits for `child`, killing it (and failing) after `limit`.
fn finish_within(mut child: Child, limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return (child.wait_with_output().unwrap(), start.elapsed());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("machinectl still running after {limit:?}\n{}", text(&out));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A bundle of `version` signed with the node's key, for the config `config` runs.
fn bundle(node: &UpgradeNode, config: &str, version: &str) -> PathBuf {
    let data: Vec<u8> = (0..16 * 4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let tree = verity::build(&data[..], &[5u8; 32], [1u8; 16]).unwrap();
    let mut root = data;
    root.extend_from_slice(&tree.bytes);
    let kernel = format!("kernel {version}").into_bytes();
    let initrd = format!("initrd {version}").repeat(100).into_bytes();
    let config: toml::Table = toml::from_str(config).unwrap();
    let config_version = config["version"].as_str().unwrap().to_owned();
    let manifest = Manifest {
        format: FORMAT,
        version: version.into(),
        arch: keelson_machined::upgrade::facts::arch(),
        min_version: None,
        components: vec!["containerd".into()],
        config_versions: vec![config_version],
        cmdline: "console=ttyS0 panic=10".into(),
        verity: tree.params.boot_params(),
        key_id: String::new(),
        parts: vec![
            hash_part("root", &root[..]).unwrap(),
            hash_part("kernel", &kernel[..]).unwrap(),
            hash_part("initrd", &initrd[..]).unwrap(),
        ],
    };
    let mut bytes = Vec::new();
    write_bundle(
        &mut bytes,
        &manifest,
        [&root[..], &kernel[..], &initrd[..]],
        &node.key,
    )
    .unwrap();
    let path = node.root.path().join(format!("keelson-{version}.bundle"));
    write(&path, bytes);
    path
}

fn setup() -> (Cluster, UpgradeNode, PathBuf) {
    let cluster = Cluster::new();
    let node = UpgradeNode::start(&cluster.controlplane);
    let config = cluster.client_config(node.address, Role::Admin);
    (cluster, node, config)
}

#[test]
fn status_and_version_show_both_slots() {
    let (_cluster, node, config) = setup();
    let out = run(&config, &["upgrade", "status", "-o", "json"]);
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let slots = &v[0]["slots"];
    assert_eq!(slots[0]["slot"], "a", "{v:#}");
    assert_eq!(slots[0]["booted"], true, "{v:#}");
    assert_eq!(slots[1]["version"], "0.0.9", "{v:#}");
    assert_eq!(slots[1]["blessed"], true, "{v:#}");
    assert_eq!(v[0]["attempt"], serde_json::Value::Null, "{v:#}");

    let out = run(&config, &["upgrade", "status"]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains(&format!("{}: no upgrade attempt recorded", node.address)),
        "{}",
        text(&out)
    );

    let out = run(&config, &["version", "-o", "json"]);
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["version"], "0.1.0", "{v:#}");
    assert_eq!(v[0]["slot"], "a", "{v:#}");
    assert_eq!(v[0]["other_slot"], "b", "{v:#}");
    assert_eq!(v[0]["other_version"], "0.0.9", "{v:#}");
    assert_eq!(v[0]["trial"], false, "{v:#}");
}

#[test]
fn a_bundle_that_is_not_one_is_refused_and_nothing_reboots() {
    let (_cluster, node, config) = setup();
    let junk = node.root.path().join("junk.bundle");
    write(&junk, vec![7u8; 3 << 20]);
    let child = machinectl(&config, &["upgrade", "--image", junk.to_str().unwrap()])
        .spawn()
        .unwrap();
    let (out, _) = finish_within(child, Duration::from_secs(60));
    assert_fails(&out, &["invalid argument"]);
    assert!(
        stdout(&out).contains(&format!("{}: check: ", node.address)),
        "{}",
        text(&out)
    );
    // A URL nobody serves: the node's fetch fails, named.
    let out = run(
        &config,
        &[
            "upgrade",
            "--image",
            "http://127.0.0.1:1/keelson-amd64.bundle",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(node.reboots(), 0);
}

#[test]
fn rollback_waits_until_the_other_slot_answers_and_no_longer() {
    let (_cluster, node, config) = setup();
    let child = machinectl(&config, &["rollback", "--wait", "60s"])
        .spawn()
        .unwrap();
    // The node "reboots" into slot b a moment later.
    std::thread::sleep(Duration::from_millis(1500));
    node.booted("b", "0.0.9");
    let (out, took) = finish_within(child, Duration::from_secs(30));
    assert_ok(&out);
    let address = node.address;
    let lines = stdout(&out);
    for want in [
        format!("{address}: rolling back to 0.0.9 in slot b; the node is rebooting into it"),
        format!("{address}: waiting up to 1m00s for 0.0.9 to answer from slot b"),
        format!("{address}: 0.0.9 answers from slot b after "),
    ] {
        assert!(lines.contains(&want), "{want:?} not in {}", text(&out));
    }
    assert!(
        took < Duration::from_secs(15),
        "took {took:?}\n{}",
        text(&out)
    );
    assert_eq!(node.reboots(), 1);

    // Back "on" slot a, a rollback to b whose node never comes back fails at --wait.
    node.booted("a", "0.1.0");
    let child = machinectl(&config, &["rollback", "--wait", "3s"])
        .spawn()
        .unwrap();
    let (out, took) = finish_within(child, Duration::from_secs(30));
    assert_fails(
        &out,
        &[&format!(
            "{address} did not answer with 0.0.9 from slot b within 3s"
        )],
    );
    assert!(
        took < Duration::from_secs(10),
        "took {took:?}\n{}",
        text(&out)
    );
}

#[test]
fn an_upgrade_streams_the_bundle_reboots_after_its_last_message_and_waits_for_the_new_slot() {
    let (cluster, node, config) = setup();
    let address = node.address;
    let file = bundle(&node, &cluster.controlplane, "0.2.0");
    let image = file.to_str().unwrap();

    // A dry run checks and writes nothing.
    let out = run(&config, &["upgrade", "--image", image, "--dry-run"]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains(&format!(
            "{address}: dry run: 0.2.0 for slot b passed every check; nothing was written"
        )),
        "{}",
        text(&out)
    );
    assert_eq!(node.reboots(), 0);

    let child = machinectl(&config, &["upgrade", "--image", image, "--wait", "60s"])
        .spawn()
        .unwrap();
    // The node "reboots" into slot b once PID 1 was asked to.
    let start = Instant::now();
    while node.reboots() == 0 {
        assert!(start.elapsed() < Duration::from_secs(60), "no reboot asked");
        std::thread::sleep(Duration::from_millis(50));
    }
    node.booted("b", "0.2.0");
    let (out, _) = finish_within(child, Duration::from_secs(30));
    assert_ok(&out);
    let lines = stdout(&out);
    for want in [
        format!("{address}: check: reading the bundle's header"),
        format!("{address}: transfer 100% ("),
        format!("{address}: write 100% ("),
        format!("{address}: 0.2.0 installed in slot b; the node is rebooting into it"),
        format!("{address}: waiting up to 1m00s for 0.2.0 to answer from slot b"),
        format!("{address}: 0.2.0 answers from slot b after "),
    ] {
        assert!(lines.contains(&want), "{want:?} not in {}", text(&out));
    }
    assert_eq!(node.reboots(), 1);
    eprintln!("{lines}");
    let entries = node.root.path().join("esp/loader/entries");
    assert!(entries.join("keelson-b+3-0.conf").is_file());

    let out = run(&config, &["upgrade", "status"]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains(&format!(
            "{address}: newest upgrade: 0.1.0 -> 0.2.0 (slot b): booting"
        )),
        "{}",
        text(&out)
    );
}

#[test]
fn a_node_that_came_back_on_the_old_slot_fell_back_and_says_why() {
    let (cluster, node, config) = setup();
    let address = node.address;
    let file = bundle(&node, &cluster.controlplane, "0.3.0");
    let child = machinectl(
        &config,
        &[
            "upgrade",
            "--image",
            file.to_str().unwrap(),
            "--wait",
            "60s",
        ],
    )
    .spawn()
    .unwrap();
    let start = Instant::now();
    while node.reboots() == 0 {
        assert!(start.elapsed() < Duration::from_secs(60), "no reboot asked");
        std::thread::sleep(Duration::from_millis(50));
    }
    // PID 1 of the old slot found the new one out of tries and recorded why, as
    // boot assessment does; machined answers from slot a again.
    let record_path = node.root.path().join("state/upgrade.json");
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    record["attempt"]["outcome"] = serde_json::json!({
        "state": "failed",
        "phase": "stage2",
        "reason": "the kernel or stage 1 never reached stage 2",
    });
    record["failed"] = serde_json::json!([{
        "version": "0.3.0",
        "phase": "stage2",
        "reason": "the kernel or stage 1 never reached stage 2",
        "at_ms": 1,
    }]);
    std::fs::write(&record_path, serde_json::to_vec(&record).unwrap()).unwrap();
    let (out, took) = finish_within(child, Duration::from_secs(30));
    assert_fails(
        &out,
        &[
            &format!("machinectl: error: {address} came back on 0.1.0 (slot a) after "),
            "not on 0.3.0 (slot b): it fell back; the upgrade to 0.3.0 failed at stage2: the kernel or stage 1 never reached stage 2",
        ],
    );
    assert!(
        took < Duration::from_secs(15),
        "took {took:?}\n{}",
        text(&out)
    );
    // health names it too, and version.
    let out = run(&config, &["health"]);
    assert!(
        stdout(&out).contains("the upgrade to 0.3.0 failed at stage2: the kernel or stage 1 never reached stage 2; 0.3.0 is refused here until forced; running 0.1.0 from slot a"),
        "{}",
        text(&out)
    );
    let out = run(&config, &["version", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["upgrade"], "failed", "{v:#}");
    assert_eq!(
        v[0]["failed"], "0.3.0 at stage2: the kernel or stage 1 never reached stage 2",
        "{v:#}"
    );
}

#[test]
fn an_upgrade_without_its_options_is_refused() {
    let (cluster, node, _config) = setup();
    let connector = cluster.connector(node.address, Role::Admin);
    let status = rt().block_on(async {
        let mut client = connector.connect(&node.address.to_string()).await.unwrap();
        let requests = tokio_stream::iter([keelson_api::api::proto::UpgradeRequest {
            options: None,
            data: vec![1, 2, 3],
        }]);
        client.upgrade(requests).await.unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("first message carried no options"),
        "{status:?}"
    );
    // An operator may not upgrade; a reader may read the status.
    let operator = cluster.connector(node.address, Role::Operator);
    let reader = cluster.connector(node.address, Role::Reader);
    rt().block_on(async {
        let mut client = operator.connect(&node.address.to_string()).await.unwrap();
        let refused = client
            .rollback(keelson_api::api::proto::RollbackRequest {})
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        let mut client = reader.connect(&node.address.to_string()).await.unwrap();
        client
            .upgrade_status(keelson_api::api::proto::UpgradeStatusRequest {})
            .await
            .unwrap();
    });
    assert_eq!(node.reboots(), 0);
}
