//! The services of a Keelson node and how each one's readiness is checked (the checks
//! themselves are the supervisor's, `supervisor::readiness`).
//!
//! | service | program | depends on | ready when | started |
//! |---|---|---|---|---|
//! | `containerd` | `/usr/bin/containerd --config /etc/containerd/config.toml` | | its gRPC server answers an HTTP/2 preface on `/run/containerd/containerd.sock` | at boot |
//! | `etcd` | `/usr/bin/etcd` with TLS flags, the member's settings from `/var/lib/keelson/etcd.env` | | its client port accepts on 127.0.0.1 | only on request: machined starts it at bootstrap, at a join, or at boot for a member with data |
//! | `kubelet` | `/var/lib/keelson/bin/kubelet`, else `/usr/bin/kubelet` | `containerd` | running | at boot when its binary exists |
//! | `machined` | `/usr/sbin/machined` | | running | at boot when its binary exists, after containerd (ordering only, see below) |
//! | extension services (`[[machine.services]]`) | their `command` | their `depends_on` | running | at boot, after the built-in ones |
//!
//! machined's first start waits for containerd (`start_after`): until containerd is
//! ready, or has failed, or for at most [`crate::supervisor::START_AFTER_LIMIT`]. Under
//! TCG both CPUs are busy until containerd answers, and machined's own start took CPU
//! containerd's needed; the API is not needed for anything containerd does. A failing
//! containerd never keeps the API away for long, and machined's restarts never wait.
//!
//! Extension services are the config's own programs (as Talos extension services or
//! Flatcar units give them): registered after the built-in services, run directly with
//! the common environment plus their own, their output kept like every service's, and
//! restarted with the same backoff. The validator has already checked their names,
//! commands and dependencies; a program that is missing at boot is a spawn failure the
//! supervisor retries, so a program written later (a file, an upgrade) is picked up.
//!
//! etcd is registered on control planes only, and never started by PID 1 itself: whether
//! this member starts a new cluster, joins one as a learner or restarts with its own data
//! is machined's decision (`keelson_node_protocol::etcd`), and an etcd started before it
//! would form a cluster of its own.
//! The kubelet's flags here are the minimum the runtime needs (cgroupfs driver, the
//! containerd socket); its KubeletConfiguration is the bootstrap issue's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keelson_configs::schema::{ExtensionService, MachineConfig, MachineType};

use keelson_configs::layout;
use keelson_node_protocol::etcd as etcd_proto;

use crate::supervisor::{Readiness, ServiceSpec};

/// containerd's service name.
pub const CONTAINERD: &str = "containerd";
/// The config's modules containerd's start needs: its default snapshotter is overlayfs,
/// whose plugin checks at start that overlay mounts work. Stage 2 loads these before
/// it spawns containerd and the config's other modules while containerd starts.
pub const CONTAINERD_MODULES: &[&str] = &["overlay"];
/// containerd's API socket.
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// containerd's config file (rendered into the tmpfs `/etc`).
pub const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
/// Where a kubelet fetched for the cluster's Kubernetes version is kept.
pub const KUBELET_FETCHED: &str = "/var/lib/keelson/bin/kubelet";
/// Where an image that bakes a kubelet in has it.
pub const KUBELET_IMAGE: &str = "/usr/bin/kubelet";
/// The node API daemon.
pub const MACHINED: &str = "/usr/sbin/machined";

/// The environment every service gets.
pub fn service_env() -> Vec<(String, String)> {
    vec![
        ("PATH".into(), "/usr/sbin:/usr/bin".into()),
        ("HOME".into(), "/root".into()),
    ]
}

/// The node's services for `config`; `exists` says whether a program is present.
/// Services whose program is missing are left out with a line saying so.
pub fn catalog(
    config: &MachineConfig,
    exists: &dyn Fn(&Path) -> bool,
    note: &mut dyn FnMut(String),
) -> Vec<ServiceSpec> {
    let mut out = vec![ServiceSpec {
        name: CONTAINERD.into(),
        program: "/usr/bin/containerd".into(),
        args: vec!["--config".into(), CONTAINERD_CONFIG.into()],
        env: service_env(),
        env_file: None,
        depends_on: Vec::new(),
        start_after: Vec::new(),
        readiness: Readiness::Http2Socket(CONTAINERD_SOCKET.into()),
        ready_timeout: Duration::from_secs(120),
        autostart: true,
        stop_timeout: Duration::from_secs(20),
    }];
    if config.machine.kind == MachineType::ControlPlane {
        out.push(etcd(config));
    }
    match [KUBELET_FETCHED, KUBELET_IMAGE]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| exists(p))
    {
        Some(program) => out.push(ServiceSpec {
            name: "kubelet".into(),
            program,
            args: vec![
                "--container-runtime-endpoint=unix:///run/containerd/containerd.sock".into(),
                "--cgroup-driver=cgroupfs".into(),
            ],
            env: service_env(),
            env_file: None,
            depends_on: vec![CONTAINERD.into()],
            start_after: Vec::new(),
            readiness: Readiness::Started,
            ready_timeout: Duration::from_secs(60),
            autostart: true,
            stop_timeout: Duration::from_secs(30),
        }),
        None => note("kubelet: binary not present, not started".into()),
    }
    if exists(Path::new(MACHINED)) {
        out.push(machined());
    } else {
        note(format!("machined: {MACHINED} not present, not started"));
    }
    out.extend(config.machine.services.iter().map(extension));
    out
}

/// etcd's metrics and health port, on loopback and plain HTTP.
const ETCD_METRICS_PORT: u16 = 2381;

/// The flags etcd gets whatever the member: TLS on both sides with client certificates
/// required, TLS 1.3 at least, kubeadm's snapshot count, metrics on loopback. The
/// config's `cluster.etcd.extra_args` come after these, and win.
fn etcd_static_flags() -> Vec<String> {
    let data = layout::ETCD_DATA_DIR;
    let pki = format!("{}/etcd", layout::KUBERNETES_PKI_DIR);
    let (client, peer) = (layout::ETCD_CLIENT_PORT, layout::ETCD_PEER_PORT);
    vec![
        format!("--data-dir={data}"),
        format!("--listen-client-urls=https://[::]:{client}"),
        format!("--listen-peer-urls=https://[::]:{peer}"),
        format!("--listen-metrics-urls=http://127.0.0.1:{ETCD_METRICS_PORT}"),
        format!("--cert-file={pki}/server.crt"),
        format!("--key-file={pki}/server.key"),
        format!("--trusted-ca-file={pki}/ca.crt"),
        "--client-cert-auth=true".into(),
        format!("--peer-cert-file={pki}/peer.crt"),
        format!("--peer-key-file={pki}/peer.key"),
        format!("--peer-trusted-ca-file={pki}/ca.crt"),
        "--peer-client-cert-auth=true".into(),
        "--tls-min-version=TLS1.3".into(),
        "--snapshot-count=10000".into(),
        "--experimental-initial-corrupt-check=true".into(),
    ]
}

/// etcd on a control plane: its static flags, then the config's extra flags
/// (which win); the member's own settings come from the environment file machined
/// writes before it asks for the start. Ready once its client port accepts.
pub fn etcd(config: &MachineConfig) -> ServiceSpec {
    let mut args = etcd_static_flags();
    args.extend(
        config
            .cluster
            .etcd
            .extra_args
            .iter()
            .map(|(k, v)| format!("--{k}={v}")),
    );
    ServiceSpec {
        name: etcd_proto::SERVICE.into(),
        program: "/usr/bin/etcd".into(),
        args,
        env: service_env(),
        env_file: Some(etcd_proto::ENV_FILE.into()),
        depends_on: Vec::new(),
        start_after: Vec::new(),
        readiness: Readiness::Tcp(std::net::SocketAddr::from((
            [127, 0, 0, 1],
            layout::ETCD_CLIENT_PORT,
        ))),
        ready_timeout: Duration::from_secs(120),
        autostart: false,
        stop_timeout: Duration::from_secs(30),
    }
}

/// How long an extension service gets between `SIGTERM` and `SIGKILL`.
const EXTENSION_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// An extension service of the config: ready once running, started at boot.
pub fn extension(service: &ExtensionService) -> ServiceSpec {
    let mut command = service.command.iter();
    let program = command.next().map(PathBuf::from).unwrap_or_default();
    let mut env = service_env();
    for (key, value) in &service.environment {
        match env.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.clone(),
            None => env.push((key.clone(), value.clone())),
        }
    }
    ServiceSpec {
        name: service.name.clone(),
        program,
        args: command.cloned().collect(),
        env,
        env_file: None,
        depends_on: service.depends_on.clone(),
        start_after: Vec::new(),
        readiness: Readiness::Started,
        ready_timeout: Duration::from_secs(30),
        autostart: true,
        stop_timeout: EXTENSION_STOP_TIMEOUT,
    }
}

/// machined, the node API: the same with or without a config (without one, it serves
/// maintenance mode; stage 2 starts it alone then).
pub fn machined() -> ServiceSpec {
    ServiceSpec {
        name: "machined".into(),
        program: MACHINED.into(),
        args: Vec::new(),
        env: service_env(),
        env_file: None,
        depends_on: Vec::new(),
        start_after: vec![CONTAINERD.into()],
        readiness: Readiness::Started,
        ready_timeout: Duration::from_secs(30),
        autostart: true,
        stop_timeout: Duration::from_secs(10),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> MachineConfig {
        let checked = keelson_configs::check_str(text, "test.toml", keelson_configs::Mode::Metal);
        match checked.config {
            Some(c) => c,
            None => panic!("test config invalid: {:?}", checked.diagnostics),
        }
    }

    pub(crate) fn controlplane() -> MachineConfig {
        config(include_str!("../../configs/tests/data/controlplane.toml"))
    }

    #[test]
    fn the_catalog_follows_the_node_and_its_binaries() {
        let cfg = controlplane();
        let mut notes = Vec::new();
        let none = catalog(&cfg, &|_| false, &mut |n| notes.push(n));
        let names: Vec<(&str, bool)> = none
            .iter()
            .map(|s| (s.name.as_str(), s.autostart))
            .collect();
        assert_eq!(names, [("containerd", true), ("etcd", false)]);
        assert_eq!(
            notes,
            [
                "kubelet: binary not present, not started",
                "machined: /usr/sbin/machined not present, not started"
            ]
        );
        let all = catalog(&cfg, &|p| p != Path::new(KUBELET_FETCHED), &mut |_| {});
        let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["containerd", "etcd", "kubelet", "machined"]);
        assert_eq!(all[2].program, PathBuf::from(KUBELET_IMAGE));
        assert_eq!(all[2].depends_on, ["containerd"]);
        assert!(
            all[2]
                .args
                .contains(&"--cgroup-driver=cgroupfs".to_string())
        );
        // Workers have no etcd.
        let mut worker = cfg.clone();
        worker.machine.kind = MachineType::Worker;
        assert!(
            catalog(&worker, &|_| true, &mut |_| {})
                .iter()
                .all(|s| s.name != "etcd")
        );
    }

    #[test]
    fn extension_services_follow_the_built_in_ones() {
        let text = format!(
            "{}\n{}",
            include_str!("../../configs/tests/data/controlplane.toml"),
            r#"
[[machine.services]]
name = "agent"
command = ["/usr/bin/agent", "--port=9100", "two words"]
depends_on = ["containerd"]
environment = { LOG_LEVEL = "debug", PATH = "/opt/bin" }

[[machine.services]]
name = "helper"
command = ["/usr/bin/helper"]
"#
        );
        let cfg = config(&text);
        let all = catalog(&cfg, &|_| true, &mut |_| {});
        let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "containerd",
                "etcd",
                "kubelet",
                "machined",
                "agent",
                "helper"
            ]
        );
        let agent = &all[4];
        assert_eq!(agent.program, PathBuf::from("/usr/bin/agent"));
        assert_eq!(agent.args, ["--port=9100", "two words"]);
        assert_eq!(agent.depends_on, ["containerd"]);
        assert_eq!(agent.readiness, Readiness::Started);
        assert!(agent.autostart);
        let env: Vec<(&str, &str)> = agent
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            env,
            [
                ("PATH", "/opt/bin"),
                ("HOME", "/root"),
                ("LOG_LEVEL", "debug")
            ]
        );
        assert!(all[5].args.is_empty() && all[5].depends_on.is_empty());
    }
}
