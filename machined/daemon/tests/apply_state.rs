//! What `apply-config` keeps in STATE beyond the config, on the host: the real machined
//! server (in-process, TLS on 127.0.0.1, a temporary STATE) with a recording backend in
//! place of PID 1. A `try` survives a restart of machined (stopped and started again over
//! the same STATE) and still reverts at its deadline; a revert that fails is reported
//! failed by `health`, across a restart too, until a later apply; a config staged for the
//! next boot is removed by every later apply and by a confirm, so it never replaces a
//! newer config at the next boot.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use std::path::Path;
use std::time::{Duration, Instant};

use api_support::*;
use keelson_api::api::proto;
use keelson_configs::pki::Role;
use keelson_machined::backend::{Call, LivePart, Power};
use keelson_machined::server::try_record::{self, Now, TryRecord};

const STAGED: &str = "config.staged.toml";
const RECORD: &str = "apply-try.json";
const TRIED: &str = "config.tried.toml";

fn request(config: &str, mode: proto::ApplyMode, timeout: u32) -> proto::ApplyConfigRequest {
    proto::ApplyConfigRequest {
        config: config.as_bytes().to_vec(),
        mode: mode.into(),
        try_timeout_seconds: timeout,
        dry_run: false,
    }
}

/// Applies `config` as an admin; the node's messages.
fn apply(
    cluster: &Cluster,
    node: &Node,
    config: &str,
    mode: proto::ApplyMode,
    timeout: u32,
) -> Vec<String> {
    let connector = cluster.connector(node.address, Role::Admin);
    let address = node.address.to_string();
    rt().block_on(async {
        let mut c = connector.connect(&address).await.unwrap();
        c.apply_config(request(config, mode, timeout))
            .await
            .unwrap()
            .into_inner()
            .messages
    })
}

/// `confirm`'s answer: its message, or the refusal's.
fn confirm(cluster: &Cluster, node: &Node) -> Result<String, String> {
    let connector = cluster.connector(node.address, Role::Admin);
    let address = node.address.to_string();
    rt().block_on(async {
        let mut c = connector.connect(&address).await.unwrap();
        c.confirm_config(proto::ConfirmConfigRequest {})
            .await
            .map(|r| r.into_inner().message)
            .map_err(|s| s.message().to_owned())
    })
}

/// The try's `health` check, if there is one.
fn try_check(cluster: &Cluster, node: &Node) -> Option<proto::HealthCheck> {
    let connector = cluster.connector(node.address, Role::Reader);
    let address = node.address.to_string();
    rt().block_on(async {
        let mut c = connector.connect(&address).await.unwrap();
        let health = c
            .health(proto::HealthRequest {})
            .await
            .unwrap()
            .into_inner();
        health
            .checks
            .into_iter()
            .find(|c| c.name == try_record::CHECK_NAME)
    })
}

fn live_applies(node: &Node) -> Vec<(Vec<LivePart>, String)> {
    node.backend
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::ApplyLive(parts, text) => Some((parts, text)),
            _ => None,
        })
        .collect()
}

/// Waits up to `limit` for `done`.
fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn exists(state: &Path, name: &str) -> bool {
    state.join(name).exists()
}

#[test]
fn a_try_still_reverts_at_its_deadline_after_machined_restarts() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let tried = cluster.with_sysctl("vm.swappiness", "21");
    let applied_at = Instant::now();
    apply(&cluster, &node, &tried, proto::ApplyMode::Try, 4);
    assert_eq!(
        live_applies(&node),
        [(vec![LivePart::Sysctls], tried.clone())]
    );
    let state = node.state.path().to_path_buf();
    assert!(exists(&state, RECORD) && exists(&state, TRIED));
    assert_eq!(
        node.state_config().as_deref(),
        Some(cluster.controlplane.as_str())
    );

    // machined restarts: a new server over the same STATE.
    let (dir, backend) = node.stop();
    let node = Node::start_in(dir, backend);
    let check = try_check(&cluster, &node).expect("the restarted node reports the try");
    assert!(check.ok, "{check:?}");
    assert!(check.reason.contains("reverts in "), "{}", check.reason);
    // Nothing is reverted before the deadline.
    assert_eq!(live_applies(&node).len(), 1);

    wait_for(
        Duration::from_secs(15),
        "the revert after the restart",
        || live_applies(&node).len() == 2,
    );
    assert!(
        applied_at.elapsed() >= Duration::from_secs(4),
        "reverted before its deadline"
    );
    assert_eq!(
        live_applies(&node)[1],
        (vec![LivePart::Sysctls], cluster.controlplane.clone())
    );
    wait_for(Duration::from_secs(5), "the record removed", || {
        !exists(&state, RECORD) && !exists(&state, TRIED)
    });
    assert_eq!(try_check(&cluster, &node), None);
    assert_eq!(
        confirm(&cluster, &node).unwrap_err(),
        "no config applied with --mode try is waiting for confirmation"
    );
    assert_eq!(
        node.state_config().as_deref(),
        Some(cluster.controlplane.as_str())
    );
}

#[test]
fn a_try_whose_deadline_passed_while_machined_was_down_reverts_at_once() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let tried = cluster.with_sysctl("vm.swappiness", "22");
    apply(&cluster, &node, &tried, proto::ApplyMode::Try, 1);
    let (dir, backend) = node.stop();
    std::thread::sleep(Duration::from_millis(1500));
    let node = Node::start_in(dir, backend);
    wait_for(Duration::from_secs(5), "the revert at start", || {
        live_applies(&node).len() == 2
    });
    assert_eq!(live_applies(&node)[1].1, cluster.controlplane);
}

#[test]
fn a_try_confirmed_after_a_restart_is_kept() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let tried = cluster.with_sysctl("vm.swappiness", "23");
    apply(&cluster, &node, &tried, proto::ApplyMode::Try, 3);
    let (dir, backend) = node.stop();
    let node = Node::start_in(dir, backend);
    assert_eq!(
        confirm(&cluster, &node).unwrap(),
        "the tried config is confirmed and written to STATE"
    );
    assert_eq!(node.state_config().as_deref(), Some(tried.as_str()));
    let state = node.state.path().to_path_buf();
    assert!(!exists(&state, RECORD) && !exists(&state, TRIED));
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(
        live_applies(&node).len(),
        1,
        "a confirmed try is not reverted"
    );
}

#[test]
fn a_try_of_an_earlier_boot_is_not_reverted_again() {
    let cluster = Cluster::new();
    let state = tempfile::tempdir().unwrap();
    std::fs::write(state.path().join("config.toml"), &cluster.controlplane).unwrap();
    let earlier = Now {
        boot_id: Some("an-earlier-boot".into()),
        ..Now::read()
    };
    let record = TryRecord::new(vec![LivePart::Sysctls], &earlier, Duration::from_secs(600));
    std::fs::write(
        state.path().join(TRIED),
        cluster.with_sysctl("vm.swappiness", "24"),
    )
    .unwrap();
    std::fs::write(state.path().join(RECORD), record.to_json()).unwrap();
    let node = Node::start_in(state, backend());
    let state = node.state.path().to_path_buf();
    wait_for(Duration::from_secs(5), "the record removed", || {
        !exists(&state, RECORD) && !exists(&state, TRIED)
    });
    assert_eq!(try_check(&cluster, &node), None);
    assert!(live_applies(&node).is_empty());
}

#[test]
fn a_failed_revert_is_reported_failed_until_a_later_apply() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let tried = cluster.with_sysctl("vm.swappiness", "25");
    apply(&cluster, &node, &tried, proto::ApplyMode::Try, 1);
    node.backend
        .fail_apply(Some("sysctl vm.swappiness: read-only file system"));
    let state = node.state.path().to_path_buf();
    wait_for(
        Duration::from_secs(10),
        "the revert's failure recorded",
        || std::fs::read_to_string(state.join(RECORD)).is_ok_and(|r| r.contains("\"failed\"")),
    );
    let check = try_check(&cluster, &node).expect("a failed revert is reported");
    assert!(!check.ok, "{check:?}");
    assert!(
        check.reason.contains(
            "failed: init refused the previous config: sysctl vm.swappiness: read-only file system"
        ),
        "{}",
        check.reason
    );
    let refused = confirm(&cluster, &node).unwrap_err();
    assert!(refused.contains("its revert failed"), "{refused}");

    // Still failed after a restart, and not retried on its own.
    let (dir, backend) = node.stop();
    let node = Node::start_in(dir, backend);
    let check = try_check(&cluster, &node).expect("a failed revert is reported after a restart");
    assert!(!check.ok, "{check:?}");

    // A later apply puts the node in a known state: the parts the try left in doubt are
    // applied too, and the record goes.
    node.backend.fail_apply(None);
    let fixed = cluster.with_machine("hostname", toml::Value::String("cp-fixed".into()));
    apply(&cluster, &node, &fixed, proto::ApplyMode::NoReboot, 0);
    let last = live_applies(&node).pop().unwrap();
    assert_eq!(
        last,
        (vec![LivePart::Sysctls, LivePart::Hostname], fixed.clone())
    );
    assert!(!exists(&state, RECORD) && !exists(&state, TRIED));
    assert_eq!(try_check(&cluster, &node), None);
}

#[test]
fn a_staged_config_is_removed_by_every_later_apply() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let state = node.state.path().to_path_buf();
    let staged = cluster.with_sysctl("vm.swappiness", "31");
    let later = cluster.with_sysctl("vm.swappiness", "32");

    // no-reboot: the later config stays at the next boot, the staged one is gone.
    apply(&cluster, &node, &staged, proto::ApplyMode::Staged, 0);
    assert!(exists(&state, STAGED));
    let messages = apply(&cluster, &node, &later, proto::ApplyMode::NoReboot, 0);
    assert!(!exists(&state, STAGED), "{messages:?}");
    assert!(
        messages
            .iter()
            .any(|m| m.ends_with("was removed: this config replaces it")),
        "{messages:?}"
    );
    assert_eq!(node.state_config().as_deref(), Some(later.as_str()));

    // no-reboot with no changes at all.
    apply(&cluster, &node, &staged, proto::ApplyMode::Staged, 0);
    apply(&cluster, &node, &later, proto::ApplyMode::NoReboot, 0);
    assert!(!exists(&state, STAGED));

    // try, then confirm.
    apply(&cluster, &node, &staged, proto::ApplyMode::Staged, 0);
    let tried = cluster.with_sysctl("vm.swappiness", "33");
    apply(&cluster, &node, &tried, proto::ApplyMode::Try, 60);
    assert!(!exists(&state, STAGED));
    confirm(&cluster, &node).unwrap();
    assert_eq!(node.state_config().as_deref(), Some(tried.as_str()));

    // reboot.
    apply(&cluster, &node, &staged, proto::ApplyMode::Staged, 0);
    let rebooted = cluster.with_sysctl("vm.swappiness", "34");
    apply(&cluster, &node, &rebooted, proto::ApplyMode::Reboot, 0);
    assert!(!exists(&state, STAGED));
    assert_eq!(node.state_config().as_deref(), Some(rebooted.as_str()));
    assert!(node.backend.calls().contains(&Call::Power(Power::Reboot)));

    // A dry run and a refused apply change nothing.
    apply(&cluster, &node, &staged, proto::ApplyMode::Staged, 0);
    let connector = cluster.connector(node.address, Role::Admin);
    let address = node.address.to_string();
    rt().block_on(async {
        let mut c = connector.connect(&address).await.unwrap();
        let mut dry = request(&later, proto::ApplyMode::NoReboot, 0);
        dry.dry_run = true;
        c.apply_config(dry).await.unwrap();
        let reboot_only =
            cluster.with_machine("install_disk", toml::Value::String("/dev/vdb".into()));
        c.apply_config(request(&reboot_only, proto::ApplyMode::NoReboot, 0))
            .await
            .unwrap_err();
    });
    assert_eq!(std::fs::read_to_string(state.join(STAGED)).unwrap(), staged);
}

/// An apply's error message, as the admin sees it.
fn apply_error(cluster: &Cluster, node: &Node, config: &str, mode: proto::ApplyMode) -> String {
    let connector = cluster.connector(node.address, Role::Admin);
    let address = node.address.to_string();
    rt().block_on(async {
        let mut c = connector.connect(&address).await.unwrap();
        c.apply_config(request(config, mode, 60))
            .await
            .unwrap_err()
            .message()
            .to_owned()
    })
}

#[test]
fn a_try_that_init_refuses_leaves_no_record_and_the_staged_config() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let state = node.state.path().to_path_buf();
    let staged = cluster.with_sysctl("vm.swappiness", "41");
    apply(&cluster, &node, &staged, proto::ApplyMode::Staged, 0);
    node.backend.fail_apply(Some("no such sysctl"));
    let err = apply_error(
        &cluster,
        &node,
        &cluster.with_sysctl("vm.swappiness", "42"),
        proto::ApplyMode::Try,
    );
    assert!(
        err.contains("init could not apply the config live"),
        "{err}"
    );
    assert!(!exists(&state, RECORD) && !exists(&state, TRIED));
    assert_eq!(std::fs::read_to_string(state.join(STAGED)).unwrap(), staged);
    assert_eq!(try_check(&cluster, &node), None);
}

#[test]
fn a_staged_config_that_cannot_be_removed_stops_the_apply() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let state = node.state.path().to_path_buf();
    // Not a file: its removal fails, as on a read-only or failing STATE.
    std::fs::create_dir_all(state.join(STAGED).join("inside")).unwrap();
    let later = cluster.with_sysctl("vm.swappiness", "43");
    for mode in [proto::ApplyMode::NoReboot, proto::ApplyMode::Try] {
        let err = apply_error(&cluster, &node, &later, mode);
        assert!(
            err.starts_with("cannot remove the config staged for the next boot, which would replace this one then: "),
            "{err}"
        );
        assert!(
            err.ends_with("the previous config was re-applied; STATE was not changed"),
            "{err}"
        );
    }
    let err = apply_error(&cluster, &node, &later, proto::ApplyMode::Reboot);
    assert!(err.ends_with("; nothing was changed"), "{err}");
    assert_eq!(
        node.state_config().as_deref(),
        Some(cluster.controlplane.as_str())
    );
    assert!(!exists(&state, RECORD) && !exists(&state, TRIED));
    assert!(!node.backend.calls().contains(&Call::Power(Power::Reboot)));
    // Each live apply was taken back.
    let applies = live_applies(&node);
    assert_eq!(applies.len(), 4, "{applies:?}");
    assert!(
        applies
            .iter()
            .skip(1)
            .step_by(2)
            .all(|(_, text)| *text == cluster.controlplane)
    );
}
