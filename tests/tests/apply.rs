//! A node's life through the node API, end to end under QEMU, on one boot chain (every
//! TCG boot costs minutes): a node without a config serves maintenance mode (`version`
//! with `--insecure`, everything else refused), shows its certificate's SHA-256
//! fingerprint on the console (the one `--insecure` says it saw), takes its first config
//! with `apply-config --cert-fingerprint` pinned to it (another fingerprint is refused),
//! comes up configured and refuses unauthenticated calls;
//! then `apply-config` in its modes against the real PID 1: `no-reboot` (the new sysctl
//! visible right after the call), a config with an error (refused with the validator's
//! messages, nothing changed), `--dry-run` (the diff, nothing changed), `try` (reverts
//! by itself after its timeout, across a restart of machined), `staged` (promoted at the next boot), a reboot (the node
//! runs the last applied config, read from STATE), `service NAME kill` (the supervisor
//! restarts it), and `reset` (STATE and EPHEMERAL wiped, back to maintenance mode).
//!
//! `machinectl` reaches the guest's port 50000 through a QEMU user-network port forward
//! (restricted: the guest reaches nothing else). The image is `KEELSON_TEST_IMAGE_AMD64`
//! when set, else the suite's built image.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use keelson_configs::pki::{self, Role};
use keelson_configs::{Mode, check_str};
use keelson_tests::{
    Arch, Guest, Running, api_client_config, free_loopback_port, machinectl, machinectl_binary,
    show, tail, test_image, user_net_control_plane,
};

/// One boot to "service machined ready" under software emulation, with room to spare.
const BOOT: Duration = Duration::from_secs(420);
const MAC: &str = "52:54:00:4b:45:06";

/// A control-plane config for QEMU's user network (eth0 = 10.0.2.15/24), as a table to
/// edit, and the node API CA it carries.
fn cluster() -> (toml::Table, pki::CertAndKey) {
    user_net_control_plane("applytest", r#"hostname = "apply-test""#).unwrap()
}

/// The config with these `machine.sysctls`, checked valid, written to `dir/name`.
fn variant(base: &toml::Table, sysctls: &[(&str, &str)], dir: &Path, name: &str) -> PathBuf {
    let mut config = base.clone();
    let table: toml::Table = sysctls
        .iter()
        .map(|(k, v)| (k.to_string(), toml::Value::String(v.to_string())))
        .collect();
    config["machine"]
        .as_table_mut()
        .unwrap()
        .insert("sysctls".into(), toml::Value::Table(table));
    let text = toml::to_string(&config).unwrap();
    let checked = check_str(&text, name, Mode::Metal);
    assert!(checked.is_valid(), "{:#?}", checked.diagnostics);
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn run(bin: &Path, config: &Path, args: &[&str]) -> Output {
    machinectl(bin, config, Duration::from_secs(120), args).unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Wait until the console shows `needle` at least `count` times (a later boot of the
/// same VM prints the same lines again).
fn wait_count(vm: &mut Running, needle: &str, count: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if vm.console().matches(needle).count() >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {:.0} s waiting for {needle:?} to show {count} times\n--- console ---\n{}",
            vm.elapsed().as_secs_f64(),
            tail(&vm.console(), 60)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A sysctl's value on the node, through `get sysctls` with `context`.
fn sysctl(bin: &Path, clients: &Path, name: &str) -> String {
    let out = run(bin, clients, &["get", "sysctls", name, "-o", "json"]);
    assert!(out.status.success(), "{}", show(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["value"]
        .as_str()
        .unwrap_or_else(|| panic!("no value for {name}: {}", show(&out)))
        .to_string()
}

#[test]
fn a_node_from_maintenance_mode_through_apply_config_reboot_and_reset() {
    let bin = machinectl_binary().unwrap();
    let (base, ca) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let first = variant(&base, &[], dir.path(), "first.toml");
    let port = free_loopback_port().unwrap();
    let endpoint = format!("127.0.0.1:{port}");
    let admin = dir.path().join("machinectl.toml");
    api_client_config(&ca, &endpoint, &Role::ALL, &admin).unwrap();
    let insecure = |args: &[&str]| {
        let mut all = vec!["--insecure", "--nodes", endpoint.as_str()];
        all.extend_from_slice(args);
        run(&bin, &admin, &all)
    };

    // No config anywhere: maintenance mode.
    let mut vm = Guest::new(Arch::Amd64)
        .image(test_image(Arch::Amd64).unwrap())
        .memory(2048)
        .allow_reboot()
        .api_forward(port, MAC)
        .boot()
        .unwrap();
    vm.wait_for("keelson-init: maintenance mode: machined serves", BOOT)
        .unwrap();
    vm.wait_for("service machined ready", BOOT).unwrap();
    let out = vm.until_ok(Duration::from_secs(120), "version --insecure", || {
        insecure(&["version", "-o", "json"])
    });
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["maintenance"], true, "{}", show(&out));
    let out = insecure(&["services"]);
    assert!(
        stderr(&out).contains("maintenance mode") && !out.status.success(),
        "{}",
        show(&out)
    );
    // The admin context's client certificate is refused too: the node has no CA yet.
    let out = run(&bin, &admin, &["version"]);
    assert!(!out.status.success(), "{}", show(&out));

    // The node's console shows its certificate's fingerprint; --insecure shows the one it
    // saw, and the same one, pinned, lets the first config in while another is refused.
    const SHOWN: &str = "maintenance mode: the API's certificate SHA-256 fingerprint is ";
    vm.wait_for(SHOWN, Duration::from_secs(60)).unwrap();
    let console = vm.console();
    let fingerprint = console
        .lines()
        .filter_map(|l| l.split(SHOWN).nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .next_back()
        .unwrap()
        .to_string();
    assert_eq!(fingerprint.len(), 32 * 3 - 1, "{fingerprint}");
    let out = insecure(&["version"]);
    assert!(stderr(&out).contains(&fingerprint), "{}", show(&out));
    let pinned = |fp: &str, args: &[&str]| {
        let mut all = vec!["--cert-fingerprint", fp, "--nodes", endpoint.as_str()];
        all.extend_from_slice(args);
        run(&bin, &admin, &all)
    };
    let wrong = "00".repeat(32);
    let out = pinned(&wrong, &["apply-config", "--file", first.to_str().unwrap()]);
    assert!(
        !out.status.success() && stderr(&out).contains(&fingerprint),
        "another fingerprint is refused, naming the one seen: {}",
        show(&out)
    );

    // The first config, pushed over the network to the pinned certificate.
    let out = pinned(
        &fingerprint,
        &["apply-config", "--file", first.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", show(&out));
    vm.wait_for(
        "keelson-init: config installed through the node API",
        Duration::from_secs(60),
    )
    .unwrap();
    vm.wait_for("service containerd ready", BOOT).unwrap();
    let out = vm.until_ok(Duration::from_secs(120), "version (mutual TLS)", || {
        run(&bin, &admin, &["version", "-o", "json"])
    });
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["maintenance"], false, "{}", show(&out));
    assert_eq!(v[0]["hostname"], "apply-test", "{}", show(&out));
    let out = insecure(&["version"]);
    assert!(
        stderr(&out).contains("requires a client certificate"),
        "{}",
        show(&out)
    );
    let swappiness_at_boot = sysctl(&bin, &admin, "vm.swappiness");
    assert_ne!(swappiness_at_boot, "10");

    // no-reboot: in effect when the call returns.
    let ten = variant(&base, &[("vm.swappiness", "10")], dir.path(), "ten.toml");
    let out = run(
        &bin,
        &admin,
        &[
            "apply-config",
            "--file",
            ten.to_str().unwrap(),
            "--mode",
            "no-reboot",
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        stdout(&out).contains(&format!(
            "sysctl vm.swappiness=10 applied (was {swappiness_at_boot})"
        )),
        "{}",
        show(&out)
    );
    assert_eq!(sysctl(&bin, &admin, "vm.swappiness"), "10");
    let in_state = run(&bin, &admin, &["read", "/system/state/config.toml"]);
    assert!(in_state.status.success(), "{}", show(&in_state));
    assert_eq!(stdout(&in_state), std::fs::read_to_string(&ten).unwrap());

    // A config with an error: the validator's messages, nothing changed.
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&ten)
            .unwrap()
            .replace("type = \"controlplane\"", "type = \"mainframe\""),
    )
    .unwrap();
    let out = run(
        &bin,
        &admin,
        &[
            "apply-config",
            "--file",
            broken.to_str().unwrap(),
            "--mode",
            "no-reboot",
        ],
    );
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        stderr(&out).contains("machine.type") && stderr(&out).contains("nothing was changed"),
        "{}",
        show(&out)
    );
    assert_eq!(sysctl(&bin, &admin, "vm.swappiness"), "10");
    let again = run(&bin, &admin, &["read", "/system/state/config.toml"]);
    assert_eq!(stdout(&again), stdout(&in_state), "STATE unchanged");

    // --dry-run: the diff, nothing changed.
    let thirty = variant(&base, &[("vm.swappiness", "30")], dir.path(), "thirty.toml");
    let out = run(
        &bin,
        &admin,
        &[
            "apply-config",
            "--file",
            thirty.to_str().unwrap(),
            "--dry-run",
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    let diff = stdout(&out);
    let changed = |sign: char, value: &str| {
        diff.lines()
            .any(|l| l.starts_with(sign) && l.contains("vm.swappiness") && l.contains(value))
    };
    assert!(changed('-', "10") && changed('+', "30"), "{}", show(&out));
    assert_eq!(sysctl(&bin, &admin, "vm.swappiness"), "10");

    // try: in effect at once, reverted by itself after the timeout, even though machined
    // is restarted in between (the try's record in STATE re-arms the revert).
    let forty = variant(&base, &[("vm.swappiness", "40")], dir.path(), "forty.toml");
    let out = run(
        &bin,
        &admin,
        &[
            "apply-config",
            "--file",
            forty.to_str().unwrap(),
            "--mode",
            "try",
            "--timeout",
            "40s",
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    let tried = Instant::now();
    assert_eq!(sysctl(&bin, &admin, "vm.swappiness"), "40");
    // The answer may be cut off by the restart itself: PID 1's console says it happened.
    let _ = run(
        &bin,
        &admin,
        &["--context", "operator", "service", "machined", "restart"],
    );
    vm.wait_for(
        "keelson-init: service machined stopping (SIGTERM)",
        Duration::from_secs(60),
    )
    .unwrap();
    vm.until_ok(
        Duration::from_secs(120),
        "version after machined's restart",
        || run(&bin, &admin, &["version"]),
    );
    assert_eq!(sysctl(&bin, &admin, "vm.swappiness"), "40");
    let deadline = tried + Duration::from_secs(180);
    loop {
        let now = sysctl(&bin, &admin, "vm.swappiness");
        if now == "10" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the try config never reverted (vm.swappiness={now})\n{}",
            tail(&vm.console(), 40)
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(
        tried.elapsed() >= Duration::from_secs(35),
        "reverted before its timeout ({:?})",
        tried.elapsed()
    );

    // staged: nothing now, promoted at the next boot; the reboot reads STATE.
    let staged = variant(
        &base,
        &[("vm.swappiness", "10"), ("vm.overcommit_memory", "1")],
        dir.path(),
        "staged.toml",
    );
    let overcommit_now = sysctl(&bin, &admin, "vm.overcommit_memory");
    assert_ne!(overcommit_now, "1");
    let out = run(
        &bin,
        &admin,
        &[
            "apply-config",
            "--file",
            staged.to_str().unwrap(),
            "--mode",
            "staged",
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(sysctl(&bin, &admin, "vm.overcommit_memory"), overcommit_now);

    // kill: the supervisor restarts containerd after its backoff.
    let out = run(
        &bin,
        &admin,
        &[
            "--context",
            "operator",
            "service",
            "containerd",
            "kill",
            "--signal",
            "KILL",
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        stdout(&out).contains("SIGKILL sent to service containerd"),
        "{}",
        show(&out)
    );
    vm.wait_for(
        "keelson-init: service containerd killed by signal 9 (SIGKILL)",
        Duration::from_secs(60),
    )
    .unwrap();
    wait_count(&mut vm, "service containerd ready", 2, BOOT);

    let out = run(&bin, &admin, &["--context", "operator", "reboot"]);
    assert!(out.status.success(), "{}", show(&out));
    wait_count(&mut vm, "KEELSON STAGE2 READY", 2, BOOT);
    vm.wait_for("promoted to config.toml: this boot runs it", BOOT)
        .unwrap();
    wait_count(&mut vm, "service machined ready", 2, BOOT);
    vm.until_ok(Duration::from_secs(120), "version after reboot", || {
        run(&bin, &admin, &["version"])
    });
    assert_eq!(sysctl(&bin, &admin, "vm.swappiness"), "10");
    assert_eq!(sysctl(&bin, &admin, "vm.overcommit_memory"), "1");
    let console = vm.console();
    let second_boot = &console[console.rfind("KEELSON STAGE2 READY").unwrap()..];
    assert!(
        second_boot
            .contains("keelson-init: config from STATE (/system/state/config.toml) is valid"),
        "{}",
        tail(second_boot, 80)
    );

    // reset: STATE and EPHEMERAL wiped, back to maintenance mode.
    let out = run(&bin, &admin, &["reset", "--yes"]);
    assert!(out.status.success(), "{}", show(&out));
    vm.wait_for("keelson-init: reset: STATE (", BOOT).unwrap();
    vm.wait_for("keelson-init: reset: EPHEMERAL (", BOOT)
        .unwrap();
    wait_count(&mut vm, "KEELSON STAGE2 READY", 3, BOOT);
    wait_count(
        &mut vm,
        "keelson-init: maintenance mode: machined serves",
        2,
        BOOT,
    );
    let out = vm.until_ok(Duration::from_secs(180), "version after reset", || {
        insecure(&["version", "-o", "json"])
    });
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["maintenance"], true, "{}", show(&out));
    // STATE came back empty: no config, a new machine id.
    let console = vm.console();
    let third_boot = &console[console.rfind("KEELSON STAGE2 READY").unwrap()..];
    assert!(
        third_boot.contains("created and kept in STATE")
            && !third_boot.contains("config from STATE"),
        "STATE was not empty after the reset:\n{}",
        tail(third_boot, 80)
    );
}

/// How many times the power is cut during applies.
const APPLY_CUTS: usize = 20;
/// How soon a call to a node killed under it must end: machinectl's 20 s HTTP/2
/// keepalive window, with room for a loaded host.
const CALL_DEADLINE: Duration = Duration::from_secs(40);
const CUT_MAC: &str = "52:54:00:4b:45:07";

/// The config STATE holds, byte for byte (`read` as admin), once the node answers.
fn state_config(bin: &Path, admin: &Path, vm: &Running) -> String {
    let out = vm.until_ok(BOOT, "read STATE's config", || {
        run(bin, admin, &["read", "/system/state/config.toml"])
    });
    stdout(&out)
}

/// The power is cut at [`APPLY_CUTS`] random points during `apply-config` calls in the
/// modes that write STATE (`no-reboot`, `staged`, `reboot`): every time, the node boots
/// the config STATE held before the call or the one it sent, whole (the one it sent when
/// the call answered before the cut), answers on its API,
/// and runs what that config says; and the call to the killed node ends within
/// [`CALL_DEADLINE`] (a failure says why). The seed is printed;
/// `KEELSON_TEST_SEED` replays it.
#[test]
fn power_cuts_during_applies_leave_the_old_or_the_new_config() {
    let seed = std::env::var("KEELSON_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("apply power cuts: seed {seed} (KEELSON_TEST_SEED={seed} replays it)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let bin = machinectl_binary().unwrap();
    let (base, ca) = cluster();
    let dir = tempfile::tempdir().unwrap();
    // Swappiness 1..=23 tells the configs apart; the boot config's 50 is none of them,
    // so a torn STATE config that init refused (falling back to fw_cfg) cannot pass.
    let boot = variant(&base, &[("vm.swappiness", "50")], dir.path(), "boot.toml");
    let port = free_loopback_port().unwrap();
    let admin = dir.path().join("machinectl.toml");
    api_client_config(&ca, &format!("127.0.0.1:{port}"), &Role::ALL, &admin).unwrap();
    let mut vm = Guest::new(Arch::Amd64)
        .image(test_image(Arch::Amd64).unwrap())
        .memory(2048)
        .allow_reboot()
        .api_forward(port, CUT_MAC)
        .fw_cfg(keelson_configs::layout::FW_CFG_CONFIG, &boot)
        .boot()
        .unwrap();
    let mut held = state_config(&bin, &admin, &vm);
    assert_eq!(held, std::fs::read_to_string(&boot).unwrap());

    // Uncut no-reboot applies: how long a call takes, to spread the cuts over it. The
    // shortest of three: the first call to a fresh node (the binary read from disk, the
    // node's first apply) took twice as long as the later ones, and cuts spread over it
    // fell after most calls. It only seeds the estimates below, which follow the calls.
    let mut call = Duration::MAX;
    for value in ["21", "22", "23"] {
        let config = variant(
            &base,
            &[("vm.swappiness", value)],
            dir.path(),
            &format!("c{value}.toml"),
        );
        let started = Instant::now();
        let out = run(
            &bin,
            &admin,
            &[
                "apply-config",
                "--file",
                config.to_str().unwrap(),
                "--mode",
                "no-reboot",
            ],
        );
        call = call.min(started.elapsed());
        assert!(out.status.success(), "{}", show(&out));
        held = state_config(&bin, &admin, &vm);
        assert_eq!(held, std::fs::read_to_string(&config).unwrap());
    }
    eprintln!(
        "the shortest of three uncut no-reboot applies took {:.2} s",
        call.as_secs_f64()
    );

    let modes = ["no-reboot", "staged", "reboot"];
    // How long a call in each mode takes: the calibration's figure at first, then the
    // length of the last call in that mode that ended before its cut. A staged call is
    // shorter than a no-reboot one, and calls to a freshly booted node differ from the
    // calibration's (CI saw 0.20 s calibrated, 0.08-0.15 s calls, and half the cuts
    // falling after the call).
    let mut estimate = [call; 3];
    let mut mid_call = 0;
    for i in 0..APPLY_CUTS {
        let slot = i % modes.len();
        let mode = modes[slot];
        let value = (i + 1).to_string();
        let file = variant(
            &base,
            &[("vm.swappiness", value.as_str())],
            dir.path(),
            &format!("c{value}.toml"),
        );
        let new = std::fs::read_to_string(&file).unwrap();
        // From the CLI's start to a little after an uncut call's end.
        let delay = estimate[slot].mul_f64(rng.f64() * 1.2);
        let started = Instant::now();
        let mut child = std::process::Command::new(&bin)
            .arg("--machineconfig")
            .arg(&admin)
            .args([
                "apply-config",
                "--file",
                file.to_str().unwrap(),
                "--mode",
                mode,
            ])
            .env_remove("MACHINECONFIG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Until the cut, watch for the call's end (to within a few milliseconds).
        let mut call_took = None;
        while let Some(left) = delay.checked_sub(started.elapsed()) {
            if call_took.is_none() && child.try_wait().unwrap().is_some() {
                call_took = Some(started.elapsed());
            }
            std::thread::sleep(left.min(Duration::from_millis(2)));
        }
        let running = call_took.is_none() && child.try_wait().unwrap().is_none();
        mid_call += usize::from(running);
        // A call that ended sets its mode's window; one cut mid-call widens it a little,
        // so that some cuts still fall after the answer (an estimate too short would
        // otherwise never learn, and answered calls would never be cut).
        estimate[slot] = match call_took {
            Some(took) => took,
            None => estimate[slot].mul_f64(1.05),
        };
        vm.power_cycle().unwrap();
        // The call to the killed node ends by itself, within its deadline, saying so.
        let cut_at = Instant::now();
        let ended = std::thread::spawn(move || {
            let out = child.wait_with_output().unwrap();
            (cut_at.elapsed(), out)
        });
        vm.wait_for("service machined ready", BOOT).unwrap();
        let (took, out) = ended.join().unwrap();
        assert!(
            took < CALL_DEADLINE,
            "cut {i}: apply-config to the killed node ended only {took:?} after the cut: {}",
            show(&out)
        );
        // A call cut mid-call fails saying why (one answered in the instant between the
        // look and the kill succeeds: no assertion on which).
        assert!(
            out.status.success() || !stderr(&out).trim().is_empty(),
            "cut {i}: a failed apply-config must say why: {}",
            show(&out)
        );
        let now = state_config(&bin, &admin, &vm);
        let which = if now == held {
            "old"
        } else if now == new {
            "new"
        } else {
            panic!(
                "cut {i} ({mode}, {:.2} s in, seed {seed}): STATE holds neither the old nor the new config:\n{now}\n--- console ---\n{}",
                delay.as_secs_f64(),
                tail(&vm.console(), 60)
            );
        };
        let console = vm.console();
        let refused = console
            .lines()
            .any(|l| l.contains("config from STATE") && l.contains("refused"));
        assert!(
            console.contains("applying the config from STATE") && !refused,
            "cut {i}: the node did not boot STATE's config\n{}",
            tail(&console, 60)
        );
        // An answered call was kept: the node wrote STATE before it answered.
        assert!(
            !out.status.success() || which == "new",
            "cut {i} ({mode}, {:.2} s in, seed {seed}): apply-config answered, yet STATE holds the old config after the cut",
            delay.as_secs_f64()
        );
        // What STATE holds is what runs (a staged config is promoted at this boot).
        let want = if which == "new" {
            value.clone()
        } else {
            sysctl_of(&held)
        };
        assert_eq!(
            sysctl(&bin, &admin, "vm.swappiness"),
            want,
            "cut {i} ({mode}): STATE holds the {which} config"
        );
        eprintln!(
            "cut {i}: {mode} apply cut {:.2} s in ({}): the node runs the {which} config; the call ended {:.1} s after the cut ({})",
            delay.as_secs_f64(),
            match call_took {
                _ if running => "mid-call".to_string(),
                Some(took) => format!("after the call, which took {:.2} s", took.as_secs_f64()),
                None => "after the call".to_string(),
            },
            took.as_secs_f64(),
            if out.status.success() {
                "answered".to_string()
            } else {
                stderr(&out).lines().last().unwrap_or_default().to_string()
            }
        );
        held = now;
    }
    // Most cuts fell inside a call, not after it.
    assert!(
        mid_call >= APPLY_CUTS / 2,
        "only {mid_call} of {APPLY_CUTS} cuts fell inside a call (seed {seed})"
    );
}

/// The `vm.swappiness` a config text sets.
fn sysctl_of(config: &str) -> String {
    let table: toml::Table = toml::from_str(config).unwrap();
    table["machine"]["sysctls"]["vm.swappiness"]
        .as_str()
        .unwrap()
        .to_string()
}
