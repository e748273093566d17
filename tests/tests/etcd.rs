//! Stacked etcd (issue 19) end to end, judged by the real `etcdctl` (Debian's
//! etcd-client, run on the host inside the cluster's network namespace) and `openssl`:
//!
//! - a local cluster of three control planes created with `--no-bootstrap`, their time
//!   servers the cluster's gateway: `bootstrap` is refused while no clock is synced;
//!   Debian's `chronyd` then serves time on the gateway, the nodes sync, and `bootstrap`
//!   on the first starts the cluster while one on the second is refused; the other two
//!   join as learners and are promoted; a second bootstrap is refused;
//! - every etcd certificate of every node verifies against the etcd CA with kubeadm's
//!   SANs; `etcdctl endpoint health --cluster` and `endpoint status --cluster` with the
//!   node's own healthcheck-client certificate report three healthy members;
//! - faults while keys are written through etcdctl: a member stopped (its node shut
//!   down) or frozen (SIGSTOP of its VM) leaves a 2/3 cluster that takes writes, and
//!   catches up once started again or thawed; killing the
//!   leader's VM elects another leader; a member power-cut during writes loses no
//!   acknowledged write; after each, every acknowledged key is read back from every
//!   member;
//! - a reset that would break the quorum is refused, and so is an upgrade (issue 18);
//!   with the quorum whole, a control plane takes v2 and is blessed only once its etcd
//!   member is ready again (the member then holds every key);
//! - `etcd snapshot` taken with an `etcd:backup` certificate is accepted by `etcdctl
//!   snapshot status`;
//! - `etcd remove-member` of a powered-off member (and refused when the two left could
//!   not commit it), `etcd leave`, and both nodes' return (the removed one booted again,
//!   the one that left rebooted), the member list checked at each step; a reset member
//!   leaves first and rejoins as a new member when its node comes back;
//! - a fresh one-node cluster bootstrapped `--recover-from` the snapshot has the keys.
//!
//! Runs as root (the namespace); the image is `KEELSON_TEST_IMAGE_AMD64` when set, else
//! the suite's built image.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use keelson_configs::pki::Role;
use keelson_configs::secrets::ClusterSecrets;
use keelson_tests::cluster_env::{Cleanup, Env, Node, is_root, poll};
use keelson_tests::ntp::Chrony;
use keelson_tests::upgrade::V2;
use keelson_tests::{Arch, api_client_config, show, test_image};
use serde_json::Value;

/// The cluster's gateway, where the test's NTP server listens (`--cidr` default).
const GATEWAY: &str = "10.5.0.1";

/// The cluster under test: its machinectl environment, namespace and etcd client files.
struct Etcd<'a> {
    env: &'a Env,
    name: String,
    nodes: Vec<Node>,
    pki: PathBuf,
}

impl Etcd<'_> {
    fn ns(&self) -> String {
        format!("keelson-{}", self.name)
    }

    fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    fn on(&self, node: &Node, args: &[&str]) -> Output {
        self.env.on(node, args)
    }

    fn ok_on(&self, node: &Node, args: &[&str]) -> String {
        self.env.ok_on(node, args)
    }

    fn refused_on(&self, node: &Node, args: &[&str], needle: &str) -> String {
        let out = self.on(node, args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "machinectl {args:?} on {} was not refused: {}",
            node.name,
            show(&out)
        );
        assert!(
            err.contains(needle),
            "machinectl {args:?} on {}: want {needle:?}: {}",
            node.name,
            show(&out)
        );
        err
    }

    fn json_on(&self, node: &Node, args: &[&str]) -> Value {
        self.env.json_on(node, args)
    }

    /// `(name, learner, started)` of each member as `node` lists them, sorted by name.
    fn members(&self, node: &Node) -> Vec<(String, bool, bool)> {
        let v = self.json_on(node, &["etcd", "members"]);
        let mut out: Vec<(String, bool, bool)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or_default().to_owned(),
                    m["learner"].as_bool().unwrap(),
                    m["started"].as_bool().unwrap(),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// Waits until `node` lists exactly `names` as started voting members.
    fn wait_members(&self, node: &Node, names: &[&str], limit: Duration) {
        let want: Vec<(String, bool, bool)> = names
            .iter()
            .map(|n| ((*n).to_owned(), false, true))
            .collect();
        let mut want = want;
        want.sort();
        let deadline = Instant::now() + limit;
        loop {
            let out = self.on(node, &["etcd", "members", "-o", "json"]);
            if out.status.success() {
                let got = self.members(node);
                if got == want {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "members on {}: {got:?}, want {want:?}",
                    node.name
                );
            } else {
                assert!(
                    Instant::now() < deadline,
                    "members on {}: {}",
                    node.name,
                    show(&out)
                );
            }
            std::thread::sleep(Duration::from_secs(3));
        }
    }

    /// The real etcdctl in the cluster's namespace, with the healthcheck-client
    /// certificate the first node generated.
    fn etcdctl(&self, endpoints: &[&Node], args: &[&str]) -> Output {
        let urls: Vec<String> = endpoints
            .iter()
            .map(|n| format!("https://{}:2379", n.address))
            .collect();
        etcdctl(&self.ns(), &self.pki, &urls, args)
    }

    fn etcdctl_json(&self, endpoints: &[&Node], args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-w", "json"]);
        let out = self.etcdctl(endpoints, &all);
        assert!(out.status.success(), "etcdctl {args:?}: {}", show(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Writes `count` keys `prefix-N` through every endpoint; returns those acknowledged.
    fn write(&self, endpoints: &[&Node], prefix: &str, count: usize) -> Vec<String> {
        (0..count)
            .filter_map(|i| {
                let key = format!("{prefix}-{i:03}");
                let out = self.etcdctl(endpoints, &["put", &key, &format!("value of {key}")]);
                (out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "OK")
                    .then_some(key)
            })
            .collect()
    }

    /// Every acknowledged key must be on `node`'s own member (a serializable read, so the
    /// member answers from its own data).
    fn assert_has(&self, node: &Node, keys: &[String]) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let out = self.etcdctl(
                &[node],
                &["get", "--prefix", "--keys-only", "--consistency=s", "k"],
            );
            let have: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
            let missing: Vec<&String> = keys.iter().filter(|k| !have.contains(*k)).collect();
            if out.status.success() && missing.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} lacks {} acknowledged keys ({:?}...): {}",
                node.name,
                missing.len(),
                missing.iter().take(5).collect::<Vec<_>>(),
                show(&out)
            );
            std::thread::sleep(Duration::from_secs(3));
        }
    }

    /// The member ID (hex) that leads, as `node` reports it.
    fn leader(&self, node: &Node) -> Option<u64> {
        let out = self.etcdctl(&[node], &["endpoint", "status", "-w", "json"]);
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v[0]["Status"]["leader"].as_u64().filter(|l| *l != 0)
    }

    fn member_id(&self, node: &Node) -> u64 {
        let v = self.etcdctl_json(&[node], &["endpoint", "status"]);
        v[0]["Status"]["header"]["member_id"].as_u64().unwrap()
    }

    fn pid(&self, node: &Node) -> String {
        let shown = self.env.json(&["cluster", "show", "--name", &self.name]);
        shown
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == node.name.as_str())
            .unwrap()["pid"]
            .as_u64()
            .unwrap()
            .to_string()
    }

    fn signal(&self, node: &Node, signal: &str) {
        let pid = self.pid(node);
        let status = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success(), "kill {signal} {pid} ({})", node.name);
    }

    /// Kills the node's VM (a power cut) and waits until `cluster show` has it down.
    fn power_cut(&self, node: &Node) {
        self.signal(node, "-KILL");
        self.wait_down(node);
    }

    /// Waits until `cluster show` has the node's VM down.
    fn wait_down(&self, node: &Node) {
        poll(Duration::from_secs(120), || {
            let shown = self.env.json(&["cluster", "show", "--name", &self.name]);
            let state = shown
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["node"] == node.name.as_str())
                .unwrap()["state"]
                .clone();
            (state == "down")
                .then_some(())
                .ok_or_else(|| format!("{} still up", node.name))
        });
    }

    /// Boots a down node again with its disk (`cluster start`).
    fn start(&self, node: &Node) {
        let out = self.env.run(
            &["cluster", "start", "--name", &self.name, &node.name],
            Duration::from_secs(900),
        );
        assert!(
            out.status.success(),
            "cluster start {}: {}",
            node.name,
            show(&out)
        );
    }
}

/// The real etcdctl in namespace `ns` against `urls`, with the healthcheck-client
/// certificate in `pki`.
fn etcdctl(ns: &str, pki: &Path, urls: &[String], args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["60", "ip", "netns", "exec", ns, "etcdctl"])
        .arg(format!("--endpoints={}", urls.join(",")))
        .arg(format!("--cacert={}", pki.join("ca.crt").display()))
        .arg(format!(
            "--cert={}",
            pki.join("healthcheck-client.crt").display()
        ))
        .arg(format!(
            "--key={}",
            pki.join("healthcheck-client.key").display()
        ))
        .args(["--dial-timeout=5s", "--command-timeout=15s"])
        .args(args)
        .output()
        .unwrap()
}

/// Fetches the etcd files the node generated (admin may read /etc/kubernetes).
fn fetch_pki(etcd: &Etcd, node: &Node, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    for file in [
        "etcd/ca.crt",
        "etcd/server.crt",
        "etcd/peer.crt",
        "etcd/healthcheck-client.crt",
        "etcd/healthcheck-client.key",
        "apiserver-etcd-client.crt",
    ] {
        let out = etcd.on(node, &["read", &format!("/etc/kubernetes/pki/{file}")]);
        assert!(
            out.status.success(),
            "read {file} on {}: {}",
            node.name,
            show(&out)
        );
        let name = Path::new(file).file_name().unwrap();
        std::fs::write(into.join(name), &out.stdout).unwrap();
    }
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", show(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every certificate verifies against the etcd CA; server and peer carry kubeadm's SANs.
fn check_certificates(dir: &Path, node: &Node) {
    let ca = dir.join("ca.crt");
    for leaf in [
        "server.crt",
        "peer.crt",
        "healthcheck-client.crt",
        "apiserver-etcd-client.crt",
    ] {
        let leaf = dir.join(leaf);
        let out = openssl(&[
            "verify",
            "-CAfile",
            ca.to_str().unwrap(),
            leaf.to_str().unwrap(),
        ]);
        assert!(out.trim().ends_with(": OK"), "{}: {out}", leaf.display());
    }
    for leaf in ["server.crt", "peer.crt"] {
        let sans = openssl(&[
            "x509",
            "-noout",
            "-ext",
            "subjectAltName",
            "-in",
            dir.join(leaf).to_str().unwrap(),
        ]);
        for want in [
            format!("DNS:{}", node.name),
            "DNS:localhost".to_owned(),
            format!("IP Address:{}", node.address),
            "IP Address:127.0.0.1".to_owned(),
            "IP Address:0:0:0:0:0:0:0:1".to_owned(),
        ] {
            assert!(
                sans.contains(&want),
                "{leaf} of {} lacks {want}: {sans}",
                node.name
            );
        }
    }
}

#[test]
fn stacked_etcd_forms_survives_faults_and_is_operated_through_the_api() {
    assert!(
        is_root(),
        "this test runs etcdctl inside the cluster's network namespace: run it as root"
    );
    let env = Env::new(None);
    let name = format!("e2eetcd{}", std::process::id());
    let _cleanup = Cleanup(&env, name.clone());
    let patch = env.dir.path().join("time.toml");
    std::fs::write(
        &patch,
        format!("[machine]\ntime_servers = [\"{GATEWAY}\"]\n"),
    )
    .unwrap();
    let image = test_image(Arch::Amd64).unwrap();
    let created = env.create(
        &name,
        &[
            "--controlplanes",
            "3",
            "--workers",
            "0",
            "--cpus",
            "1",
            "--memory",
            "1024",
            "--no-bootstrap",
            "--config-patch",
            patch.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
        ],
    );
    assert!(created.contains("etcd not bootstrapped"), "{created}");
    let nodes = env.nodes(&name);
    let etcd = Etcd {
        env: &env,
        name: name.clone(),
        nodes,
        pki: env.dir.path().join("pki"),
    };
    let (cp1, cp2, cp3) = (
        etcd.node(0).clone(),
        etcd.node(1).clone(),
        etcd.node(2).clone(),
    );

    // No clock is synced (nothing serves NTP on the gateway yet): bootstrap is refused.
    etcd.refused_on(&cp1, &["bootstrap"], "the clock is not synced");
    let time = etcd.json_on(&cp1, &["time"]);
    assert_eq!(time[0]["synced"], false, "{time:#}");

    // chronyd on the gateway: every node syncs, then waits for a bootstrap and says so.
    let _chrony = Chrony::start(&etcd.ns(), GATEWAY).unwrap();
    for node in &etcd.nodes {
        let v = poll(Duration::from_secs(120), || {
            let v = etcd.json_on(node, &["time"]);
            (v[0]["synced"] == true)
                .then(|| v.clone())
                .ok_or_else(|| format!("{} never synced: {v:#}", node.name))
        });
        assert_eq!(v[0]["synced_from"], GATEWAY, "{v:#}");
    }
    poll(Duration::from_secs(60), || {
        // Not `ok_on`: the Kubernetes check fails here (no registry for the images).
        let health = String::from_utf8_lossy(&etcd.on(&cp2, &["health"]).stdout).into_owned();
        health
            .contains("machinectl --nodes 10.5.0.3 bootstrap")
            .then_some(())
            .ok_or_else(|| format!("health does not say how to bootstrap:\n{health}"))
    });

    // Bootstrap on the first; the second is refused; the others join and are promoted.
    let said = etcd.ok_on(&cp1, &["bootstrap"]);
    assert!(said.contains("bootstrapped"), "{said}");
    etcd.refused_on(
        &cp2,
        &["bootstrap"],
        "a second bootstrap would split the cluster",
    );
    let names = [cp1.name.as_str(), cp2.name.as_str(), cp3.name.as_str()];
    etcd.wait_members(&cp1, &names, Duration::from_secs(600));
    etcd.refused_on(
        &cp1,
        &["bootstrap"],
        "a second bootstrap would split the cluster",
    );

    // Certificates, and the real etcdctl with the node's healthcheck-client certificate.
    for node in &etcd.nodes {
        let dir = env.dir.path().join(format!("pki-{}", node.name));
        fetch_pki(&etcd, node, &dir);
        check_certificates(&dir, node);
    }
    fetch_pki(&etcd, &cp1, &etcd.pki);
    let all: Vec<&Node> = etcd.nodes.iter().collect();
    let health = etcd.etcdctl_json(&all[..1], &["endpoint", "health", "--cluster"]);
    let healthy: Vec<&Value> = health
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["health"] == true)
        .collect();
    assert_eq!(healthy.len(), 3, "{health:#}");
    let status = etcd.etcdctl_json(&all[..1], &["endpoint", "status", "--cluster"]);
    assert_eq!(status.as_array().unwrap().len(), 3, "{status:#}");

    // A member stopped (its node shut down): the other two take writes; started again,
    // it catches up. Then one frozen (SIGSTOP of its VM): the same, once thawed.
    let mut acked = etcd.write(&all, "k-before", 5);
    assert_eq!(acked.len(), 5);
    etcd.ok_on(&cp3, &["shutdown"]);
    etcd.wait_down(&cp3);
    let during = etcd.write(&all[..2], "k-stopped", 10);
    assert_eq!(during.len(), 10, "a 2/3 cluster refused writes: {during:?}");
    acked.extend(during);
    etcd.start(&cp3);
    // Its member must serve again before another is frozen: with cp3's etcd still
    // starting, freezing cp2 would leave cp1 alone, without a quorum.
    poll(Duration::from_secs(180), || {
        let out = etcd.etcdctl(&[&cp3], &["endpoint", "health"]);
        out.status
            .success()
            .then_some(())
            .ok_or_else(|| format!("{}'s member is not healthy again: {}", cp3.name, show(&out)))
    });
    etcd.signal(&cp2, "-STOP");
    let during = etcd.write(&[&cp1, &cp3], "k-frozen", 10);
    etcd.signal(&cp2, "-CONT");
    assert_eq!(during.len(), 10, "a 2/3 cluster refused writes: {during:?}");
    acked.extend(during);
    for node in &etcd.nodes {
        etcd.assert_has(node, &acked);
    }

    // Killing the leader's VM elects another leader; the killed node comes back.
    let leader_id = etcd.leader(&cp1).expect("a leader");
    let leader = etcd
        .nodes
        .iter()
        .find(|n| etcd.member_id(n) == leader_id)
        .unwrap()
        .clone();
    etcd.power_cut(&leader);
    let others: Vec<&Node> = etcd
        .nodes
        .iter()
        .filter(|n| n.name != leader.name)
        .collect();
    poll(Duration::from_secs(120), || {
        etcd.leader(others[0])
            .filter(|new| *new != leader_id)
            .ok_or_else(|| format!("no new leader after {} was killed", leader.name))
    });
    acked.extend(etcd.write(&others, "k-newleader", 5));
    etcd.start(&leader);
    for node in &etcd.nodes {
        etcd.assert_has(node, &acked);
    }

    // A member power-cut in the middle of writes: no acknowledged write is lost.
    let victim = others[1].clone();
    let writer = {
        let ns = etcd.ns();
        let pki = etcd.pki.clone();
        let urls: Vec<String> = etcd
            .nodes
            .iter()
            .map(|n| format!("https://{}:2379", n.address))
            .collect();
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            for i in 0..30 {
                let key = format!("k-cut-{i:03}");
                let out = etcdctl(&ns, &pki, &urls, &["put", &key, "v"]);
                if out.status.success() {
                    acked.push(key);
                }
            }
            acked
        })
    };
    std::thread::sleep(Duration::from_secs(5));
    etcd.power_cut(&victim);
    let cut = writer.join().unwrap();
    assert!(
        cut.len() >= 20,
        "only {} of 30 writes were acknowledged",
        cut.len()
    );
    acked.extend(cut);
    etcd.start(&victim);
    for node in &etcd.nodes {
        etcd.assert_has(node, &acked);
    }
    etcd.wait_members(&cp1, &names, Duration::from_secs(300));

    // A reset that would break the quorum is refused, and so is an upgrade (its reboot
    // would), before the bundle is transferred.
    let bundles = keelson_tests::upgrade::bundles().unwrap();
    let v2 = bundles.v2.to_str().unwrap();
    etcd.signal(&cp3, "-STOP");
    let err = etcd.refused_on(&cp2, &["reset", "--yes"], "would break its quorum");
    assert!(err.contains(&cp3.name) && err.contains("--force"), "{err}");
    let err = etcd.refused_on(&cp2, &["upgrade", "--image", v2], "for a quorum");
    assert!(err.contains("--force"), "{err}");
    etcd.signal(&cp3, "-CONT");
    etcd.wait_members(&cp1, &names, Duration::from_secs(300));

    // With the quorum whole, a control plane takes v2: it reboots into it, and its slot is
    // blessed only once its etcd member, ready before the upgrade, is ready again.
    let said = etcd.ok_on(&cp1, &["upgrade", "--image", v2, "--wait", "0s"]);
    assert!(said.contains("reboot"), "{said}");
    // While it reboots the node does not answer: each poll asks again.
    let status = poll(Duration::from_secs(900), || {
        let out = etcd.on(&cp1, &["upgrade", "status", "-o", "json"]);
        let s: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out.status.success() && s[0]["attempt"]["outcome"] == "blessed")
            .then(|| s.clone())
            .ok_or_else(|| format!("{} not blessed on v2: {}", cp1.name, show(&out)))
    });
    let attempt = &status[0]["attempt"];
    assert_eq!(attempt["to_version"], V2, "{status:#}");
    assert_eq!(
        attempt["expect_ready"],
        serde_json::json!(["etcd"]),
        "{status:#}"
    );
    etcd.wait_members(&cp1, &names, Duration::from_secs(300));
    etcd.assert_has(&cp1, &acked);

    // A snapshot with an etcd:backup certificate, accepted by etcdctl.
    let secrets = ClusterSecrets::load(&env.cluster_dir(&name).join("secrets.toml")).unwrap();
    let backup_config = env.dir.path().join("backup.toml");
    api_client_config(
        &secrets.node_api_ca,
        &cp2.api,
        &[Role::EtcdBackup],
        &backup_config,
    )
    .unwrap();
    let snapshot = env.dir.path().join("snap.db");
    let out = Command::new(&env.bin)
        .arg("--machineconfig")
        .arg(&backup_config)
        .args(["etcd", "snapshot"])
        .arg(&snapshot)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "etcd snapshot as etcd:backup: {}",
        show(&out)
    );
    let out = Command::new("etcdctl")
        .args(["snapshot", "status", "-w", "json"])
        .arg(&snapshot)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "etcdctl snapshot status: {}",
        show(&out)
    );
    let snap: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        snap["totalKey"].as_u64().unwrap() >= acked.len() as u64,
        "{snap:#}"
    );

    // A powered-off member removed, a member leaving, and both come back.
    let cp3_id = format!("{:x}", etcd.member_id(&cp3));
    etcd.power_cut(&cp3);
    let said = etcd.ok_on(&cp1, &["etcd", "remove-member", &cp3_id]);
    assert!(said.contains("was removed"), "{said}");
    etcd.wait_members(
        &cp1,
        &[cp1.name.as_str(), cp2.name.as_str()],
        Duration::from_secs(60),
    );
    // With two members and one frozen, nothing can be committed: its removal is refused.
    let cp2_id = format!("{:x}", etcd.member_id(&cp2));
    etcd.signal(&cp2, "-STOP");
    etcd.refused_on(
        &cp1,
        &["etcd", "remove-member", &cp2_id],
        "the removal cannot be committed",
    );
    etcd.signal(&cp2, "-CONT");
    etcd.start(&cp3);
    etcd.wait_members(&cp1, &names, Duration::from_secs(600));
    let said = etcd.ok_on(&cp2, &["etcd", "leave"]);
    assert!(said.contains("left the etcd cluster"), "{said}");
    etcd.wait_members(
        &cp1,
        &[cp1.name.as_str(), cp3.name.as_str()],
        Duration::from_secs(60),
    );
    etcd.ok_on(&cp2, &["reboot"]);
    etcd.wait_members(&cp1, &names, Duration::from_secs(600));
    for node in &etcd.nodes {
        etcd.assert_has(node, &acked);
    }

    // A reset control plane leaves etcd first, then boots again (its config comes back
    // from fw_cfg) and rejoins as a new member with every key.
    let old_id = etcd.member_id(&cp3);
    let said = etcd.ok_on(&cp3, &["reset", "--yes"]);
    assert!(said.contains("left the etcd cluster"), "{said}");
    etcd.wait_members(
        &cp1,
        &[cp1.name.as_str(), cp2.name.as_str()],
        Duration::from_secs(60),
    );
    etcd.wait_members(&cp1, &names, Duration::from_secs(600));
    assert_ne!(etcd.member_id(&cp3), old_id);
    etcd.assert_has(&cp3, &acked);
    drop(_cleanup);

    // A fresh one-node cluster recovered from the snapshot has every key.
    let fresh = format!("e2eetcdr{}", std::process::id());
    let _cleanup = Cleanup(&env, fresh.clone());
    env.create(
        &fresh,
        &[
            "--controlplanes",
            "1",
            "--workers",
            "0",
            "--cpus",
            "1",
            "--memory",
            "1024",
            "--no-bootstrap",
            "--image",
            image.to_str().unwrap(),
        ],
    );
    let shown = env.json(&["cluster", "show", "--name", &fresh]);
    let node = Node {
        name: shown[0]["node"].as_str().unwrap().to_owned(),
        api: shown[0]["api"].as_str().unwrap().to_owned(),
        address: shown[0]["address"].as_str().unwrap().to_owned(),
    };
    let restored = Etcd {
        env: &env,
        name: fresh.clone(),
        nodes: vec![node.clone()],
        pki: env.dir.path().join("pki-fresh"),
    };
    let said = restored.ok_on(
        &node,
        &["bootstrap", "--recover-from", snapshot.to_str().unwrap()],
    );
    assert!(said.contains("from the snapshot"), "{said}");
    fetch_pki(&restored, &node, &restored.pki);
    restored.assert_has(&node, &acked);
    env.destroy_and_check(&fresh);
}
