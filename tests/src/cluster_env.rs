//! A local cluster as the tests drive it: `machinectl cluster ...` run in a private state
//! directory and client config (optionally as an unprivileged user), JSON output parsed,
//! and destruction checked or guaranteed.
//!
//! Test support panics on failure, as the tests that use it do.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use keelson_cluster::record::processes_mentioning;

use crate::{machinectl_binary, show};

/// Whether the tests run as root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0")
}

/// Where one test's clusters and client config live, and as whom machinectl runs.
#[derive(Debug)]
pub struct Env {
    /// machinectl.
    pub bin: PathBuf,
    /// The test's directory (state, client config, HOME).
    pub dir: tempfile::TempDir,
    /// The user machinectl runs as (None: the current one).
    pub user: Option<String>,
}

impl Env {
    /// A fresh directory for one test's clusters, owned by `user` when given.
    pub fn new(user: Option<&str>) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("keelson-cluster-e2e-")
            .tempdir()
            .unwrap();
        if let Some(user) = user {
            let status = Command::new("chown")
                .arg(format!("{user}:"))
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success());
        }
        Env {
            bin: machinectl_binary().unwrap(),
            dir,
            user: user.map(str::to_owned),
        }
    }

    /// `XDG_STATE_HOME` of machinectl.
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The client config machinectl uses.
    pub fn client_config(&self) -> PathBuf {
        self.dir.path().join("machinectl.toml")
    }

    /// A cluster's state directory.
    pub fn cluster_dir(&self, name: &str) -> PathBuf {
        self.state().join("keelson/clusters").join(name)
    }

    /// Runs machinectl (bounded by `timeout`), as the test's user.
    pub fn run(&self, args: &[&str], timeout: Duration) -> Output {
        self.run_with(args, timeout, &[], &[])
    }

    /// [`Env::run`] with these variables set (`NAME=VALUE`) and these unset in
    /// machinectl's environment (a test hook, say).
    pub fn run_with(
        &self,
        args: &[&str],
        timeout: Duration,
        set: &[(&str, &str)],
        unset: &[&str],
    ) -> Output {
        let mut cmd = Command::new("timeout");
        cmd.arg(timeout.as_secs().to_string());
        if let Some(user) = &self.user {
            cmd.args(["runuser", "-u", user, "--"]);
        }
        cmd.arg("env");
        for name in unset {
            cmd.args(["-u", name]);
        }
        cmd.arg(format!("XDG_STATE_HOME={}", self.state().display()))
            .arg(format!("HOME={}", self.dir.path().display()))
            .arg("KEELSON_ACCEL=")
            .args(set.iter().map(|(k, v)| format!("{k}={v}")))
            .arg(&self.bin)
            .arg("--machineconfig")
            .arg(self.client_config())
            .args(args)
            .env_remove("MACHINECONFIG")
            .current_dir(self.dir.path())
            .stdin(std::process::Stdio::null());
        cmd.output().unwrap()
    }

    /// Runs machinectl (2 minutes at most); it must succeed.
    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.run(args, Duration::from_secs(120));
        assert!(out.status.success(), "machinectl {args:?}: {}", show(&out));
        out
    }

    /// Runs machinectl with `-o json`; it must succeed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_slice(&self.ok(&all).stdout).unwrap()
    }

    /// `cluster create`; on failure the cluster is destroyed before the test fails.
    pub fn create(&self, name: &str, args: &[&str]) -> String {
        let mut all = vec!["cluster", "create", "--name", name, "--wait", "25m"];
        all.extend_from_slice(args);
        let started = Instant::now();
        let out = self.run(&all, Duration::from_secs(30 * 60));
        eprintln!(
            "cluster {name}: create took {:.0} s",
            started.elapsed().as_secs_f64()
        );
        if !out.status.success() {
            let _ = self.run(
                &["cluster", "destroy", "--name", name],
                Duration::from_secs(120),
            );
            panic!("cluster create failed: {}", show(&out));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `cluster destroy`, then nothing may be left: no process naming the state
    /// directory, no namespace, no state directory, no context.
    pub fn destroy_and_check(&self, name: &str) {
        let dir = self.cluster_dir(name);
        let out = self.ok(&["cluster", "destroy", "--name", name]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            text.contains(&format!("cluster {name} destroyed")),
            "{text}"
        );
        let left = processes_mentioning(&dir.join(""));
        assert!(left.is_empty(), "processes left: {left:?}");
        assert!(!dir.exists(), "{} left", dir.display());
        let ns = format!("keelson-{name}");
        assert!(
            !Path::new("/run/netns").join(&ns).exists(),
            "namespace {ns} left"
        );
        let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
        assert!(
            !String::from_utf8_lossy(&netns.stdout).contains(&ns),
            "{}",
            show(&netns)
        );
        let config = std::fs::read_to_string(self.client_config()).unwrap_or_default();
        assert!(
            !config.contains(&format!("[contexts.{name}]")),
            "context left in the client config:\n{config}"
        );
        let out = self.run(
            &["cluster", "show", "--name", name],
            Duration::from_secs(30),
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("there is no cluster named"),
            "{}",
            show(&out)
        );
    }
}

/// Destroys the cluster when dropped, so that a failed assertion leaves no VM behind
/// (after `destroy_and_check` it finds nothing, which is fine).
#[derive(Debug)]
pub struct Cleanup<'a>(pub &'a Env, pub String);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(
            &["cluster", "destroy", "--name", &self.1],
            Duration::from_secs(120),
        );
    }
}

/// One node of a cluster, as `cluster show` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its name (`NAME-controlplane-1`).
    pub name: String,
    /// Its API on this host (`127.0.0.1:PORT`).
    pub api: String,
    /// Its address on the cluster network.
    pub address: String,
}

impl Env {
    /// The nodes of cluster `name`, sorted by name.
    pub fn nodes(&self, name: &str) -> Vec<Node> {
        let shown = self.json(&["cluster", "show", "--name", name]);
        let mut nodes: Vec<Node> = shown
            .as_array()
            .unwrap()
            .iter()
            .map(|n| Node {
                name: n["node"].as_str().unwrap().to_owned(),
                api: n["api"].as_str().unwrap().to_owned(),
                address: n["address"].as_str().unwrap().to_owned(),
            })
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        nodes
    }

    /// machinectl against one node; its output whatever the exit status.
    pub fn on(&self, node: &Node, args: &[&str]) -> Output {
        let mut all = vec!["--nodes", node.api.as_str()];
        all.extend_from_slice(args);
        self.run(&all, Duration::from_secs(300))
    }

    /// machinectl against one node, which must succeed; its stdout.
    pub fn ok_on(&self, node: &Node, args: &[&str]) -> String {
        let out = self.on(node, args);
        assert!(
            out.status.success(),
            "machinectl {args:?} on {}: {}",
            node.name,
            show(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// machinectl against one node with `-o json`, parsed.
    pub fn json_on(&self, node: &Node, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.ok_on(node, &all)).unwrap()
    }
}

/// Calls `check` every 2 s until it gives a value; after `limit`, fails with its last
/// reason.
pub fn poll<T>(limit: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(value) => return value,
            Err(why) => assert!(
                Instant::now() < deadline,
                "after {} s: {why}",
                limit.as_secs()
            ),
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}
