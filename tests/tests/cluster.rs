//! Local clusters (issue 6) end to end: `machinectl cluster create` boots real nodes under
//! QEMU, `machinectl` talks to each through the cluster's context, the nodes reach each
//! other, and `machinectl cluster destroy` leaves nothing behind.
//!
//! - three nodes (1 control plane, 2 workers; a network namespace as root): every node
//!   answers `version` and `health`; each worker has the control plane in its neighbour
//!   table and the control plane has every worker (the health check's probe of the
//!   control plane's API port made those connections); etcd, bootstrapped by `create`,
//!   has the control plane as its one member, and a worker refuses `bootstrap`;
//!   `cluster show` reports a VM we
//!   kill as down, with its console's tail; destroy removes the processes, namespace
//!   (bridge and taps inside it), state directory and client context;
//! - one arm64 node under software emulation;
//! - a `create` killed halfway (VMs started, not yet healthy): the name is refused for a
//!   new cluster, and `destroy` removes everything it had made;
//! - rootless: one node created and destroyed by an unprivileged user (as root the test
//!   makes the system user `keelson-e2e` if missing and runs machinectl through
//!   `runuser`; without root it runs as the current user);
//! - a node frozen before stage 1 at its first power-on (the test hook
//!   `KEELSON_TEST_FREEZE_BEFORE_STAGE1`: its first QEMU's CPUs held at reset): `create`
//!   says it printed nothing by its stage-1 deadline, power-cycles it once, and the
//!   cluster ends healthy, the node's console log holding the power cycle's marker and
//!   then its stage 1.
//!
//! VM tests take one lock so that at most one cluster boots at a time on a small host.
//! Images: `KEELSON_TEST_IMAGE_AMD64` / `KEELSON_TEST_IMAGE_ARM64` when set, else the
//! suite's built images.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use keelson_cluster::record::processes_mentioning;
use keelson_cluster::stage1_watch::{self, STAGE1_LINE};
use keelson_tests::cluster_env::{Cleanup, Env, is_root};
use keelson_tests::{Arch, show, test_image};

/// One cluster at a time.
static VM_LOCK: Mutex<()> = Mutex::new(());
/// The unprivileged user of the rootless test (made when missing, as root).
const ROOTLESS_USER: &str = "keelson-e2e";

/// Every node of the context answers `version`; returns hostname by API address.
fn versions(env: &Env, want_arch: &str, count: usize) -> BTreeMap<String, String> {
    let v = env.json(&["version"]);
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), count, "{v:#}");
    rows.iter()
        .map(|r| {
            assert_eq!(r["arch"], want_arch, "{v:#}");
            assert_eq!(r["maintenance"], false, "{v:#}");
            (
                r["node"].as_str().unwrap().to_owned(),
                r["hostname"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Every node healthy but for the Kubernetes checks, which fail here: the nodes reach no
/// registry for the control-plane images (the Kubernetes test serves them one).
fn healthy(env: &Env) {
    let out = env.run(&["health", "-o", "json"], Duration::from_secs(120));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("health: {e}: {}", show(&out)));
    let checks = v.as_array().unwrap();
    assert!(
        checks
            .iter()
            .any(|c| c["check"].as_str().unwrap().starts_with("control plane ")),
        "{v:#}"
    );
    assert!(
        checks
            .iter()
            .any(|c| c["check"] == keelson_api::api::KUBERNETES_CHECK),
        "{v:#}"
    );
    assert!(
        checks.iter().all(|c| c["ok"] == true
            || keelson_api::api::is_kubernetes_check(c["check"].as_str().unwrap_or_default())),
        "{v:#}"
    );
}

#[test]
fn three_nodes_reach_each_other_and_leave_nothing_behind() {
    let _lock = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new(None);
    let name = format!("e2e3n{}", std::process::id());
    let _cleanup = Cleanup(&env, name.clone());
    let out = env.create(
        &name,
        &[
            "--controlplanes",
            "1",
            "--workers",
            "2",
            "--cpus",
            "1",
            "--memory",
            "1024",
            "--image",
            test_image(Arch::Amd64).unwrap().to_str().unwrap(),
        ],
    );
    assert!(out.contains(&format!("cluster {name} is healthy")), "{out}");
    assert!(out.contains("1 control plane(s), 2 worker(s)"), "{out}");
    // create bootstrapped etcd: the control plane is its one member.
    assert!(out.contains("etcd healthy on 1 control plane(s)"), "{out}");
    if is_root() {
        assert!(
            out.contains(&format!("network namespace keelson-{name}")),
            "{out}"
        );
        assert!(
            Path::new("/run/netns")
                .join(format!("keelson-{name}"))
                .exists()
        );
    }

    let shown = env.json(&["cluster", "show", "--name", &name]);
    let nodes = shown.as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{shown:#}");
    assert!(nodes.iter().all(|n| n["state"] == "up"), "{shown:#}");
    let listed = env.json(&["cluster", "list"]);
    assert_eq!(listed[0]["name"], name.as_str(), "{listed:#}");
    assert_eq!(listed[0]["up"], 3, "{listed:#}");

    // version and health from every node.
    let hosts = versions(&env, "x86_64", 3);
    for n in nodes {
        assert_eq!(
            hosts[n["api"].as_str().unwrap()],
            n["node"].as_str().unwrap()
        );
    }
    healthy(&env);

    // The nodes reach each other: neighbour tables.
    let address = |n: &serde_json::Value| n["address"].as_str().unwrap().to_owned();
    let cp = nodes.iter().find(|n| n["role"] == "controlplane").unwrap();
    let workers: Vec<&serde_json::Value> = nodes.iter().filter(|n| n["role"] == "worker").collect();

    // etcd: one member, on the control plane; a worker has none and refuses a bootstrap.
    let members = env.json(&["--nodes", cp["api"].as_str().unwrap(), "etcd", "members"]);
    let members = members.as_array().unwrap();
    assert_eq!(members.len(), 1, "{members:#?}");
    assert_eq!(members[0]["name"], cp["node"], "{members:#?}");
    let out = env.run(
        &["--nodes", workers[0]["api"].as_str().unwrap(), "bootstrap"],
        Duration::from_secs(60),
    );
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("this node is a worker"),
        "{}",
        show(&out)
    );
    let neighbours = env.json(&["get", "neighbours"]);
    let has = |api: &str, peer: &str| {
        neighbours
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["node"] == api && r["address"] == peer && r["state"] == "reachable")
    };
    for w in &workers {
        assert!(
            has(w["api"].as_str().unwrap(), &address(cp)),
            "{} does not list the control plane {}:\n{neighbours:#}",
            w["node"],
            address(cp)
        );
        assert!(
            has(cp["api"].as_str().unwrap(), &address(w)),
            "the control plane does not list {} {}:\n{neighbours:#}",
            w["node"],
            address(w)
        );
    }

    // A VM that dies is reported down, with its console's tail.
    let victim = workers[1];
    let pid = victim["pid"].as_u64().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let down = loop {
        let shown = env.json(&["cluster", "show", "--name", &name]);
        let n = shown
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == victim["node"])
            .unwrap()
            .clone();
        if n["state"] == "down" {
            break n;
        }
        assert!(Instant::now() < deadline, "still up after SIGKILL: {n:#}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let tail = down["tail"].as_str().unwrap();
    let console = std::fs::read_to_string(down["console"].as_str().unwrap()).unwrap();
    let last = console
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap();
    assert!(
        tail.contains(last),
        "console tail:\n{tail}\nconsole ends: {last}"
    );
    let text =
        String::from_utf8_lossy(&env.ok(&["cluster", "show", "--name", &name]).stdout).into_owned();
    assert!(
        text.contains(&format!(
            "{} is down; its console",
            victim["node"].as_str().unwrap()
        )),
        "{text}"
    );

    env.destroy_and_check(&name);
}

#[test]
fn one_arm64_node_under_software_emulation() {
    let _lock = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new(None);
    let name = format!("e2earm{}", std::process::id());
    let _cleanup = Cleanup(&env, name.clone());
    let out = env.create(
        &name,
        &[
            "--arch",
            "arm64",
            "--workers",
            "0",
            "--cpus",
            "2",
            "--memory",
            "1024",
            "--image",
            test_image(Arch::Arm64).unwrap().to_str().unwrap(),
        ],
    );
    assert!(out.contains("(arm64 under TCG"), "{out}");
    versions(&env, "aarch64", 1);
    healthy(&env);
    env.destroy_and_check(&name);
}

/// As root: the unprivileged system user the rootless test runs as, made when missing.
fn rootless_user() -> Option<&'static str> {
    if !is_root() {
        return None;
    }
    let exists = Command::new("id")
        .arg(ROOTLESS_USER)
        .output()
        .unwrap()
        .status
        .success();
    if !exists {
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(ROOTLESS_USER)
            .output()
            .unwrap();
        assert!(out.status.success(), "useradd: {}", show(&out));
    }
    Some(ROOTLESS_USER)
}

#[test]
fn rootless_create_and_destroy() {
    let _lock = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let user = rootless_user();
    let env = Env::new(user);
    let name = format!("e2eusr{}", std::process::id());
    let _cleanup = Cleanup(&env, name.clone());
    let out = env.create(
        &name,
        &[
            "--workers",
            "0",
            "--cpus",
            "1",
            "--memory",
            "1024",
            "--image",
            test_image(Arch::Amd64).unwrap().to_str().unwrap(),
        ],
    );
    assert!(out.contains("user-mode network"), "{out}");
    // The VM runs as the unprivileged user.
    let shown = env.json(&["cluster", "show", "--name", &name]);
    let pid = shown[0]["pid"].as_u64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .to_owned();
    assert_ne!(uid, "0", "the rootless VM runs as root");
    versions(&env, "x86_64", 1);
    healthy(&env);
    env.destroy_and_check(&name);
}

#[test]
fn a_create_killed_halfway_is_refused_again_and_destroyed_clean() {
    use std::io::{BufRead as _, BufReader};
    let _lock = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new(None);
    let name = format!("e2ekill{}", std::process::id());
    let _cleanup = Cleanup(&env, name.clone());
    let mut child = Command::new(&env.bin)
        .arg("--machineconfig")
        .arg(env.client_config())
        .args(["cluster", "create", "--name", &name, "--workers", "1"])
        .args(["--cpus", "1", "--memory", "1024", "--image"])
        .arg(test_image(Arch::Amd64).unwrap())
        .env("XDG_STATE_HOME", env.state())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill it once both VMs are started, while it waits for them.
    let mut seen = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.contains(&format!("started {name}-worker-1")) {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        seen.iter().any(|l| l.contains("started")),
        "create never started a VM:\n{}",
        seen.join("\n")
    );
    let dir = env.cluster_dir(&name);
    assert!(
        !processes_mentioning(&dir.join("")).is_empty(),
        "the VMs should outlive a killed create"
    );

    let out = env.run(
        &[
            "cluster",
            "create",
            "--name",
            &name,
            "--image",
            "/nonexistent",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("a cluster named \"{name}\" already exists"))
            && err.contains("machinectl cluster destroy --name"),
        "{}",
        show(&out)
    );
    let listed = env.json(&["cluster", "list"]);
    assert_eq!(listed[0]["name"], name.as_str(), "{listed:#}");

    env.destroy_and_check(&name);
}

#[test]
fn a_node_frozen_before_stage_1_is_power_cycled_into_a_healthy_cluster() {
    let _lock = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new(None);
    let name = format!("e2efrz{}", std::process::id());
    let _cleanup = Cleanup(&env, name.clone());
    let frozen = format!("{name}-controlplane-1");
    // As `Env::create`, with the test hook in machinectl's environment.
    let started = Instant::now();
    let image = test_image(Arch::Amd64).unwrap();
    let out = env.run_with(
        &[
            "cluster",
            "create",
            "--name",
            &name,
            "--wait",
            "25m",
            "--workers",
            "0",
            "--cpus",
            "1",
            "--memory",
            "1024",
            "--image",
            image.to_str().unwrap(),
        ],
        Duration::from_secs(30 * 60),
        &[(stage1_watch::FREEZE_ENV, &frozen)],
        &[stage1_watch::DEADLINE_ENV],
    );
    eprintln!(
        "cluster {name}: create took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert!(out.status.success(), "cluster create: {}", show(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&format!("started {frozen} (pid "))
            && said.contains("its CPUs held at reset"),
        "{}",
        show(&out)
    );
    // Frozen from reset, it printed nothing at all; one power cycle was enough.
    let cycled = said
        .lines()
        .find(|l| l.contains("power-cycling it"))
        .unwrap_or_else(|| panic!("create never power-cycled {frozen}: {}", show(&out)));
    eprintln!("create said: {cycled}");
    assert!(
        cycled.starts_with(&format!("cluster: node {frozen} printed nothing for "))
            && cycled.ends_with(" s after power-on; power-cycling it (1 of 2)"),
        "{cycled}"
    );
    assert!(!said.contains("(2 of 2)"), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("cluster {name} is healthy")),
        "{}",
        show(&out)
    );
    assert!(
        stdout.contains("etcd healthy on 1 control plane(s)"),
        "{}",
        show(&out)
    );

    // The node's one console log: the power cycle's marker, then this boot's stage 1.
    let shown = env.json(&["cluster", "show", "--name", &name]);
    let node = &shown.as_array().unwrap()[0];
    assert_eq!(node["node"], frozen.as_str(), "{shown:#}");
    assert_eq!(node["state"], "up", "{shown:#}");
    let console = std::fs::read_to_string(node["console"].as_str().unwrap()).unwrap();
    let marker = stage1_watch::power_cycle_marker(1);
    let after = console
        .split_once(&marker)
        .map(|(before, after)| {
            assert!(
                before.trim().is_empty(),
                "the frozen boot printed:\n{before}"
            );
            after
        })
        .unwrap_or_else(|| panic!("no {marker:?} in the console:\n{console}"));
    assert!(after.contains(STAGE1_LINE), "{after}");
    assert!(!console.contains(&stage1_watch::power_cycle_marker(2)));

    versions(&env, "x86_64", 1);
    healthy(&env);
    env.destroy_and_check(&name);
}
