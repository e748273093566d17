//! Service supervision (issue 4) end to end under QEMU, with extension services from
//! the machine config (`[[machine.services]]`): one boot of a control plane whose config
//! declares
//!
//! - `crasher`: `/usr/bin/containerd --no-such-flag` after containerd is ready, which
//!   exits at once every time it starts;
//! - `keeper`: a second etcd of the image on its own ports and data directory, with an
//!   environment variable of its own, which runs for good.
//!
//! The test watches the console from the host and shows the crasher's restart delays
//! going 1, 2, 4, 8, 16, 30, 30 s (each measured between "restarts in" and "restarting"),
//! while through the node API (`machinectl` over a QEMU user-network port forward)
//! `version` and `services` keep answering and containerd stays ready, never restarted:
//! the loop starves nobody. `machinectl logs crasher` shows containerd's complaint. Then
//! `machinectl service keeper kill` sends SIGKILL, and keeper comes back after the first
//! backoff delay with a new pid and one more restart.
//!
//! The image is `KEELSON_TEST_IMAGE_AMD64` when set, else the suite's built image.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keelson_configs::layout::FW_CFG_CONFIG;
use keelson_configs::pki::{self, Role};
use keelson_configs::{Mode, check_str};
use keelson_tests::{
    Arch, Guest, Running, api_client_config, free_loopback_port, machinectl, machinectl_binary,
    show, tail, test_image, user_net_control_plane,
};

/// One boot to "service machined ready" under software emulation, with room to spare.
const BOOT: Duration = Duration::from_secs(420);
const MAC: &str = "52:54:00:4b:45:04";
/// The crasher's restart delays, in seconds: doubling from 1 s to the 30 s cap, held.
const DELAYS: [u64; 7] = [1, 2, 4, 8, 16, 30, 30];

/// A control-plane config for QEMU's user network with the two extension services, and
/// the node API CA it carries.
fn cluster() -> (String, pki::CertAndKey) {
    let (config, ca) = user_net_control_plane(
        "supervision",
        r#"
hostname = "supervision-test"

[[services]]
name = "crasher"
command = ["/usr/bin/containerd", "--no-such-flag"]
depends_on = ["containerd"]

[[services]]
name = "keeper"
command = [
    "/usr/bin/etcd",
    "--name=keeper",
    "--data-dir=/var/lib/keeper",
    "--listen-client-urls=http://127.0.0.1:12379",
    "--advertise-client-urls=http://127.0.0.1:12379",
    "--listen-peer-urls=http://127.0.0.1:12380",
    "--initial-advertise-peer-urls=http://127.0.0.1:12380",
    "--initial-cluster=keeper=http://127.0.0.1:12380",
]
environment = { ETCD_LOG_LEVEL = "warn" }
"#,
    )
    .unwrap();
    let text = toml::to_string(&config).unwrap();
    let checked = check_str(&text, "supervision-node.toml", Mode::Metal);
    assert!(checked.is_valid(), "{:#?}", checked.diagnostics);
    (text, ca)
}

fn run(bin: &Path, config: &Path, args: &[&str]) -> Output {
    machinectl(bin, config, Duration::from_secs(60), args).unwrap()
}

/// `machinectl services -o json`, which must succeed: the row of each service by name.
fn services(bin: &Path, admin: &Path) -> serde_json::Map<String, serde_json::Value> {
    let out = run(bin, admin, &["services", "-o", "json"]);
    assert!(out.status.success(), "{}", show(&out));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|row| (row["service"].as_str().unwrap().to_string(), row.clone()))
        .collect()
}

/// Watches the console until every needle has appeared (or `timeout`), recording when
/// each was first seen; `done` is set when it returns.
fn watch(vm: &Running, needles: &[String], timeout: Duration, done: &AtomicBool) -> Vec<Instant> {
    let deadline = Instant::now() + timeout;
    let mut seen: Vec<Option<Instant>> = vec![None; needles.len()];
    while seen.iter().any(Option::is_none) && Instant::now() < deadline {
        let console = vm.console();
        let now = Instant::now();
        for (needle, at) in needles.iter().zip(seen.iter_mut()) {
            if at.is_none() && console.contains(needle.as_str()) {
                *at = Some(now);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    done.store(true, Ordering::SeqCst);
    let missing: Vec<&String> = needles
        .iter()
        .zip(&seen)
        .filter(|(_, at)| at.is_none())
        .map(|(n, _)| n)
        .collect();
    assert!(
        missing.is_empty(),
        "the console never showed {missing:?} within {} s\n--- console tail ---\n{}",
        timeout.as_secs(),
        tail(&vm.console(), 60)
    );
    seen.into_iter().map(Option::unwrap).collect()
}

/// Asserts that a restart came `delay` s after it was announced (the console is read
/// every 100 ms; emulation and the serial line may add a little).
fn assert_delay(what: &str, announced: Instant, restarted: Instant, delay: u64) {
    let gap = restarted.saturating_duration_since(announced).as_secs_f64();
    let want = delay as f64;
    assert!(
        gap >= want - 0.5 && gap <= want + 5.0,
        "{what}: restarted {gap:.1} s after the announcement of a {delay} s delay"
    );
}

#[test]
fn crash_loops_back_off_to_the_cap_and_starve_nobody() {
    let bin = machinectl_binary().unwrap();
    let (config, ca) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let config_file = dir.path().join("controlplane.toml");
    std::fs::write(&config_file, &config).unwrap();
    let port = free_loopback_port().unwrap();
    let endpoint = format!("127.0.0.1:{port}");
    let admin = dir.path().join("machinectl.toml");
    api_client_config(&ca, &endpoint, &[Role::Admin, Role::Operator], &admin).unwrap();

    let mut vm = Guest::new(Arch::Amd64)
        .image(test_image(Arch::Amd64).unwrap())
        .memory(2048)
        // Room on /var for keeper's data (etcd preallocates a 64 MB WAL segment).
        .disk_size(4 << 30)
        .fw_cfg(FW_CFG_CONFIG, &config_file)
        .api_forward(port, MAC)
        .boot()
        .unwrap();
    vm.wait_for("service containerd ready", BOOT).unwrap();
    vm.wait_for("service machined ready", BOOT).unwrap();
    vm.wait_for("service keeper ready", BOOT).unwrap();

    // The crash loop, watched from the host while the node API is asked again and again.
    let mut needles = Vec::new();
    for (i, delay) in DELAYS.iter().enumerate() {
        let n = i + 1;
        needles.push(format!(
            "service crasher restarts in {delay}.0 s (failure {n})"
        ));
        needles.push(format!("service crasher restarting (restart {n})"));
    }
    let loop_time = Duration::from_secs(DELAYS.iter().sum::<u64>() + 180);
    let done = AtomicBool::new(false);
    let mut answers = 0;
    let seen = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| watch(&vm, &needles, loop_time, &done));
        while !done.load(Ordering::SeqCst) {
            let out = run(&bin, &admin, &["version"]);
            assert!(
                out.status.success(),
                "machined stopped answering during the crash loop: {}\n--- console tail ---\n{}",
                show(&out),
                tail(&vm.console(), 60)
            );
            let rows = services(&bin, &admin);
            let containerd = &rows["containerd"];
            assert_eq!(containerd["state"], "ready", "{rows:#?}");
            assert_eq!(containerd["restarts"], 0, "{rows:#?}");
            assert_eq!(rows["keeper"]["state"], "ready", "{rows:#?}");
            answers += 1;
            std::thread::sleep(Duration::from_secs(2));
        }
        watcher.join().unwrap()
    });
    for (i, delay) in DELAYS.iter().enumerate() {
        assert_delay(
            &format!("crasher after failure {}", i + 1),
            seen[2 * i],
            seen[2 * i + 1],
            *delay,
        );
    }
    assert!(
        answers >= 10,
        "only {answers} rounds of version + services during the loop"
    );
    let console = vm.console();
    assert_eq!(
        console.matches("service containerd ready").count(),
        1,
        "containerd was restarted during the loop\n{}",
        tail(&console, 80)
    );
    let rows = services(&bin, &admin);
    assert!(
        rows["crasher"]["restarts"].as_u64().unwrap() >= DELAYS.len() as u64,
        "{rows:#?}"
    );

    // The crasher's own words are kept.
    let out = run(&bin, &admin, &["logs", "crasher", "--tail", "50"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no-such-flag"),
        "{}",
        show(&out)
    );

    // A service that is killed comes back after the first backoff delay.
    let before = rows["keeper"].clone();
    let old_pid = before["pid"].as_u64().unwrap();
    let old_restarts = before["restarts"].as_u64().unwrap();
    assert!(old_pid > 0, "{before:#}");
    let out = run(
        &bin,
        &admin,
        &["--context", "operator", "service", "keeper", "kill"],
    );
    assert!(out.status.success(), "{}", show(&out));
    let needles = [
        "service keeper killed by signal 9 (SIGKILL)".to_string(),
        "service keeper restarts in 1.0 s (failure 1)".to_string(),
        format!("service keeper restarting (restart {})", old_restarts + 1),
    ];
    let done = AtomicBool::new(false);
    let seen = watch(&vm, &needles, Duration::from_secs(60), &done);
    assert_delay("keeper after its kill", seen[1], seen[2], 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        let rows = services(&bin, &admin);
        let keeper = rows["keeper"].clone();
        if keeper["state"] == "ready" || Instant::now() >= deadline {
            break keeper;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(after["state"], "ready", "{after:#}");
    assert_eq!(
        after["restarts"].as_u64().unwrap(),
        old_restarts + 1,
        "{after:#}"
    );
    let new_pid = after["pid"].as_u64().unwrap();
    assert!(new_pid > 0 && new_pid != old_pid, "{before:#} -> {after:#}");
}
