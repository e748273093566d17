//! A power cut in the middle of a reset, between its two wipes, under QEMU: the node
//! comes back configured, with its config and identity in STATE, and an empty `/var`.
//!
//! A reset wipes EPHEMERAL first, then STATE (issue 17: both or neither, and a cut
//! between them must leave a configured node, never an open one with old data). The test
//! boots the upgrade tests' v3 image, built with init's `fault-injection` feature, with
//! the fault `reset-pause` named in QEMU's firmware config (`opt/keelson/fault`): the
//! reset prints `KEELSON FAULT RESET PAUSED` once EPHEMERAL is wiped and waits 30 s before
//! STATE, and the test cuts the power there.
//!
//! The steps: config A (through fw_cfg) writes a marker file under `/var/log` with
//! `machine.files`; config B, without the file, is applied with `--mode reboot`, so that
//! the marker stays on `/var` and nothing writes it again; then `reset`, the cut, and the
//! boot after it: the node reads B from STATE (not A from fw_cfg, which a wiped STATE
//! would have fallen back to), answers on its API with B's hostname as the same admin,
//! the marker is gone, and `health` reports the reset that did not finish.
//!
//! The image is `target/images/amd64-v3/keelson.raw` (`cargo xtask upgrade-inputs`,
//! which `cargo xtask test` runs; it must be built from a tree with the fault).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use keelson_configs::layout::FW_CFG_CONFIG;
use keelson_configs::pki::Role;
use keelson_configs::{Mode, check_str};
use keelson_tests::{
    Arch, Guest, Running, api_client_config, free_loopback_port, machinectl, machinectl_binary,
    show, tail, user_net_control_plane, workspace_root,
};

/// One boot to "service machined ready" under software emulation, with room to spare.
const BOOT: Duration = Duration::from_secs(420);
const MAC: &str = "52:54:00:4b:45:17";
/// The firmware config entry the fault-injection build reads the fault from.
const FW_CFG_FAULT: &str = "opt/keelson/fault";
/// What the reset prints once EPHEMERAL is wiped and STATE is not.
const PAUSED: &str = "KEELSON FAULT RESET PAUSED";
/// The file config A writes on `/var` (readable by `read`: under `/var/log`).
const MARKER: &str = "/var/log/keelson-reset-marker";

fn run(bin: &Path, config: &Path, args: &[&str]) -> Output {
    machinectl(bin, config, Duration::from_secs(120), args).unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `config` checked valid and written to `dir/name`.
fn write_config(config: &toml::Table, dir: &Path, name: &str) -> PathBuf {
    let text = toml::to_string(config).unwrap();
    let checked = check_str(&text, name, Mode::Metal);
    assert!(checked.is_valid(), "{:#?}", checked.diagnostics);
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The hostname `version` reports, once the node answers with the admin's certificate.
fn hostname(bin: &Path, admin: &Path, vm: &Running) -> String {
    let out = vm.until_ok(BOOT, "version (mutual TLS)", || {
        run(bin, admin, &["version", "-o", "json"])
    });
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["maintenance"], false, "{}", show(&out));
    v[0]["hostname"].as_str().unwrap_or_default().to_string()
}

#[test]
fn a_power_cut_between_a_resets_wipes_leaves_a_configured_node_with_an_empty_var() {
    keelson_tests::upgrade::bundles().unwrap();
    let image = workspace_root().join("target/images/amd64-v3/keelson.raw");
    assert!(image.is_file(), "no {}", image.display());
    let bin = machinectl_binary().unwrap();
    let (a, ca) = user_net_control_plane(
        "resetfault",
        &format!(
            r#"
hostname = "reset-fault-a"
files = [{{ path = "{MARKER}", content = "old data\n", mode = "0644" }}]
"#
        ),
    )
    .unwrap();
    let mut b = a.clone();
    let machine = b["machine"].as_table_mut().unwrap();
    machine.remove("files");
    machine.insert("hostname".into(), "reset-fault-b".into());
    let dir = tempfile::tempdir().unwrap();
    let a_file = write_config(&a, dir.path(), "a.toml");
    let b_file = write_config(&b, dir.path(), "b.toml");
    let fault = dir.path().join("fault");
    std::fs::write(&fault, "reset-pause").unwrap();
    let port = free_loopback_port().unwrap();
    let admin = dir.path().join("machinectl.toml");
    api_client_config(&ca, &format!("127.0.0.1:{port}"), &Role::ALL, &admin).unwrap();

    let mut vm = Guest::new(Arch::Amd64)
        .image(&image)
        .memory(2048)
        .allow_reboot()
        .api_forward(port, MAC)
        .fw_cfg(FW_CFG_CONFIG, &a_file)
        .fw_cfg(FW_CFG_FAULT, &fault)
        .boot()
        .unwrap();
    assert_eq!(hostname(&bin, &admin, &vm), "reset-fault-a");
    let out = vm.until_ok(BOOT, "read the marker", || {
        run(&bin, &admin, &["read", MARKER])
    });
    assert_eq!(stdout(&out), "old data\n");

    // B in STATE, through a reboot: the marker stays on /var, and nothing writes it again.
    let out = run(
        &bin,
        &admin,
        &[
            "apply-config",
            "--file",
            b_file.to_str().unwrap(),
            "--mode",
            "reboot",
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    vm.wait_for("keelson-init: reboot requested", BOOT).unwrap();
    let deadline = Instant::now() + BOOT;
    while hostname(&bin, &admin, &vm) != "reset-fault-b" {
        assert!(Instant::now() < deadline, "B never came up");
        std::thread::sleep(Duration::from_secs(2));
    }
    let out = run(&bin, &admin, &["read", MARKER]);
    assert_eq!(stdout(&out), "old data\n", "{}", show(&out));

    // The reset, and the power cut between its wipes.
    let out = run(&bin, &admin, &["reset", "--yes"]);
    assert!(out.status.success(), "{}", show(&out));
    if let Err(e) = vm.wait_for(PAUSED, BOOT) {
        panic!(
            "the reset never paused after EPHEMERAL's wipe: is {} built from a tree with the reset-pause fault (cargo xtask upgrade-inputs)?\n{e}",
            image.display()
        );
    }
    let console = vm.console();
    assert!(
        console.contains("keelson-init: reset: EPHEMERAL (")
            && !console.contains("keelson-init: reset: STATE ("),
        "EPHEMERAL wiped and STATE not, at the pause:\n{}",
        tail(&console, 40)
    );
    vm.power_cycle().unwrap();

    // Back configured, with B from STATE, and /var empty.
    vm.wait_for("KEELSON STAGE2 READY", BOOT).unwrap();
    vm.wait_for("keelson-init: config from STATE (", BOOT)
        .unwrap();
    assert_eq!(hostname(&bin, &admin, &vm), "reset-fault-b");
    let console = vm.console();
    assert!(
        !console.contains("config from fw_cfg") && !console.contains("maintenance mode: machined"),
        "STATE was lost: the node took fw_cfg's config or served maintenance mode:\n{}",
        tail(&console, 80)
    );
    let out = run(&bin, &admin, &["read", MARKER]);
    assert!(
        !out.status.success(),
        "the marker outlived EPHEMERAL's wipe: {}",
        show(&out)
    );
    let out = run(&bin, &admin, &["health"]);
    let said = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(
        said.contains("last reset") && said.contains("did not finish"),
        "health does not report the reset cut short: {}",
        show(&out)
    );
}
