//! Tests of the machinectl client config (contexts, path resolution, merge, save/load) and
//! of atomic file writes.

// Test helpers outside `#[test]` functions panic on purpose when a fixture is broken.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use keelson_api::atomic;
use keelson_api::clientconfig::{
    ClientConfig, ClientConfigError, Context, Merged, host_of, resolve_path, with_default_port,
};

const CERT: &str = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";
const KEY: &str = "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n";

fn context(endpoint: &str) -> Context {
    Context {
        endpoints: vec![endpoint.into()],
        nodes: vec![],
        ca: CERT.into(),
        cert: CERT.into(),
        key: KEY.into(),
    }
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[test]
fn path_resolution_prefers_flag_then_env_then_home() {
    let os = |s: &str| Some(OsString::from(s));
    for (flag, env, home, expected) in [
        (Some("/f.toml"), os("/e.toml"), os("/home/u"), "/f.toml"),
        (None, os("/e.toml"), os("/home/u"), "/e.toml"),
        (
            None,
            None,
            os("/home/u"),
            "/home/u/.config/keelson/machinectl.toml",
        ),
        (
            Some(""),
            os(""),
            os("/home/u"),
            "/home/u/.config/keelson/machinectl.toml",
        ),
    ] {
        let got = resolve_path(flag.map(Path::new), env, home).expect("path");
        assert_eq!(got, PathBuf::from(expected));
    }
    let err = resolve_path(None, None, None).expect_err("no path");
    assert!(matches!(err, ClientConfigError::NoPath));
    assert!(err.to_string().contains("--machineconfig"), "{err}");
}

#[test]
fn save_and_load_round_trip_with_mode_0600() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("new/dir/machinectl.toml");
    let mut config = ClientConfig::single("demo", context("10.5.0.2"));
    config
        .contexts
        .get_mut("demo")
        .expect("demo")
        .nodes
        .push("10.5.0.3".into());
    config.save(&path).expect("save");
    assert_eq!(mode_of(&path), 0o600);
    assert_eq!(mode_of(&dir.path().join("new/dir")), 0o700);
    assert_eq!(mode_of(&dir.path().join("new")), 0o700);
    let back = ClientConfig::load(&path).expect("load");
    assert_eq!(back, config);
    let (name, ctx) = back.current().expect("current");
    assert_eq!(name, "demo");
    assert_eq!(ctx.target_nodes(), ["10.5.0.3"]);
    assert!(
        !format!("{ctx:?}").contains("PRIVATE KEY"),
        "Debug hides the key"
    );
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path().join("new/dir"))
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, [OsString::from("machinectl.toml")]);
}

#[test]
fn merge_renames_clashing_contexts_and_switches_current() {
    let mut config = ClientConfig::single("demo", context("10.5.0.2"));
    config.contexts.insert("demo-1".into(), context("10.5.0.9"));
    let incoming = ClientConfig::single("demo", context("10.6.0.2"));
    let merged = config.merge(incoming);
    assert_eq!(
        merged,
        [Merged {
            from: "demo".into(),
            to: "demo-2".into()
        }]
    );
    assert_eq!(config.context.as_deref(), Some("demo-2"));
    assert_eq!(config.contexts["demo-2"].endpoints, ["10.6.0.2"]);
    assert_eq!(config.contexts["demo"].endpoints, ["10.5.0.2"]);

    let merged = config.merge(ClientConfig::single("other", context("10.7.0.2")));
    assert_eq!(merged[0].to, "other");
    assert_eq!(config.context.as_deref(), Some("other"));
}

fn check_bad(text: &str, expected: &[&str]) {
    let err = ClientConfig::from_toml_str(text, "m.toml").expect_err(text);
    let msg = err.to_string();
    for want in expected {
        assert!(msg.contains(want), "want {want:?} in {msg:?}");
    }
}

#[test]
fn bad_client_configs_name_file_and_key() {
    let ctx = |extra: &str| {
        format!(
            "[contexts.demo]\nendpoints = [\"10.5.0.2\"]\nca = {CERT:?}\ncert = {CERT:?}\nkey = {KEY:?}\n{extra}"
        )
    };
    check_bad(
        &format!("context = \"nope\"\n{}", ctx("")),
        &[
            "m.toml: key `context`",
            "\"nope\"",
            "defined contexts: [demo]",
        ],
    );
    check_bad(
        &ctx("colour = 1"),
        &["m.toml:6:1", "unknown field `colour`"],
    );
    check_bad(
        &ctx("").replace("endpoints = [\"10.5.0.2\"]", "endpoints = []"),
        &["key `contexts.demo.endpoints`", "is empty"],
    );
    check_bad(
        &ctx("").replace(&format!("key = {KEY:?}"), "key = \"secret\""),
        &["key `contexts.demo.key`", "PRIVATE KEY"],
    );
    check_bad("context = ", &["m.toml:1:"]);
    let none = ClientConfig::from_toml_str("", "m.toml").expect("empty is fine");
    assert!(matches!(none.current(), Err(ClientConfigError::NoContext)));
}

#[test]
fn endpoints_get_the_default_port() {
    for (endpoint, with_port, host) in [
        ("10.5.0.2", "10.5.0.2:50000", "10.5.0.2"),
        ("10.5.0.2:1234", "10.5.0.2:1234", "10.5.0.2"),
        (
            "node.example.com",
            "node.example.com:50000",
            "node.example.com",
        ),
        (
            "node.example.com:1",
            "node.example.com:1",
            "node.example.com",
        ),
        ("fd00::2", "[fd00::2]:50000", "fd00::2"),
        ("[fd00::2]:7", "[fd00::2]:7", "fd00::2"),
    ] {
        assert_eq!(with_default_port(endpoint, 50000), with_port, "{endpoint}");
        assert_eq!(host_of(endpoint), host, "{endpoint}");
    }
    let ctx = context("10.5.0.2");
    assert_eq!(ctx.endpoint_addresses(), ["10.5.0.2:50000"]);
    assert_eq!(ctx.target_nodes(), ["10.5.0.2"]);
}

#[test]
fn atomic_write_replaces_whole_files_with_the_given_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("f.toml");
    std::fs::write(&path, "old").expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    atomic::write(&path, b"new", 0o600).expect("atomic write");
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
    assert_eq!(mode_of(&path), 0o600);
    // A stale temporary file from a crash does not block the next write, nor is it read.
    let stale = dir.path().join(".f.toml.tmp.1.0");
    std::fs::write(&stale, "junk").expect("write");
    atomic::write(&path, b"newer", 0o640).expect("atomic write");
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "newer");
    assert_eq!(mode_of(&path), 0o640);
    // Errors name the path.
    let err = atomic::write(Path::new("/proc/version/x"), b"x", 0o600).expect_err("fails");
    assert!(err.to_string().contains("/proc/version"), "{err}");
}
