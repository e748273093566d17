//! The services of a Keelson node and how each one's readiness is checked (the checks
//! themselves are the supervisor's, `supervisor::readiness`).
//!
//! | service | program | depends on | ready when | started |
//! |---|---|---|---|---|
//! | `containerd` | `/usr/bin/containerd --config /etc/containerd/config.toml` | | its gRPC server answers an HTTP/2 preface on `/run/containerd/containerd.sock` | at boot |
//! | `etcd` | `/usr/bin/etcd` with TLS flags, the member's settings from `/var/lib/keelson/etcd.env` | | its client port accepts on 127.0.0.1 | only on request: machined starts it at bootstrap, at a join, or at boot for a member with data |
//! | `kubelet` | `/usr/bin/kubelet` when the image has one, else `/var/lib/keelson/bin/kubelet`, with the flags of `/var/lib/keelson/kubelet.args` | `containerd`, and `etcd` on control planes | its `/healthz` on 127.0.0.1:10248 answers 200 | only on request: machined starts it once its files, binary and images are in place |
//! | `machined` | `/usr/sbin/machined` | | running | at boot when its binary exists, after containerd (ordering only, see below) |
//! | extension services (`[[machine.services]]`) | their `command` | their `depends_on` | running | at boot, after the built-in ones |
//!
//! Every service runs as root but machined, which runs as its own user with three
//! capabilities ([`MACHINED_USER`]): it is the one that parses what comes from the
//! network.
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
//!
//! The kubelet is registered on every configured node and never started by PID 1 itself
//! either: its flags and configuration are kubeadm's phases (`keelson-kube`), which
//! machined runs, and its binary may have to be fetched and verified first
//! (`keelson_node_protocol::kubelet`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use keelson_configs::schema::{ExtensionService, MachineConfig, MachineType};

use keelson_configs::layout;
use keelson_node_protocol::etcd as etcd_proto;
use keelson_node_protocol::kubelet as kubelet_proto;

use crate::supervisor::{CapabilitySet, Credentials, Readiness, RunAs, ServiceSpec};

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
/// The node API daemon.
pub const MACHINED: &str = "/usr/sbin/machined";

/// machined's own user (ARCHITECTURE.md, "machined's privileges"): uid and gid 50 (as
/// Talos runs its API daemon), named in no file (there is no `/etc/passwd` on a node),
/// with three capabilities:
/// - `CAP_DAC_OVERRIDE`: the files it reads and writes are root's, 0600/0700: STATE
///   (the config, its records), `/var/lib/{keelson,etcd,kubelet,machined}`,
///   `/etc/kubernetes`, the ESP, the inactive root slot's block device, containerd's
///   and PID 1's sockets, `/dev/console`, and admins' `read`s of secret files;
/// - `CAP_SYS_TIME`: time sync steps the clock (`clock_settime`);
/// - `CAP_SYSLOG`: `dmesg` reads `/dev/kmsg`, which `kernel.dmesg_restrict` keeps
///   from any other unprivileged process.
///
/// Everything else is gone, bounding set included: no mount, module, raw I/O, ptrace,
/// setuid, network administration, reboot, kill of another user's process or BPF.
pub const MACHINED_USER: Credentials = Credentials {
    uid: 50,
    gid: 50,
    capabilities: CapabilitySet::DAC_OVERRIDE
        .union(CapabilitySet::SYS_TIME)
        .union(CapabilitySet::SYSLOG),
};

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
        args_file: None,
        depends_on: Vec::new(),
        start_after: Vec::new(),
        readiness: Readiness::Http2Socket(CONTAINERD_SOCKET.into()),
        ready_timeout: Duration::from_secs(120),
        autostart: true,
        stop_timeout: Duration::from_secs(20),
        run_as: RunAs::Root,
    }];
    if config.machine.kind == MachineType::ControlPlane {
        out.push(etcd(config));
    }
    out.push(kubelet(config, exists));
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
        args_file: None,
        depends_on: Vec::new(),
        start_after: Vec::new(),
        readiness: Readiness::Tcp(std::net::SocketAddr::from((
            [127, 0, 0, 1],
            layout::ETCD_CLIENT_PORT,
        ))),
        ready_timeout: Duration::from_secs(120),
        autostart: false,
        stop_timeout: Duration::from_secs(30),
        run_as: RunAs::Root,
    }
}

/// The kubelet on every configured node, started only on request: machined renders its
/// configuration, puts its binary in place (verified) and pulls the images, writes its
/// flags into the protocol's flags file, then asks for the start. Its program is the
/// image's kubelet when the image bakes one in (the image cannot change while it runs),
/// else the one machined fetched. It needs containerd, and on control planes etcd (the
/// API server it runs as a static pod needs it); ready when its `/healthz` answers.
pub fn kubelet(config: &MachineConfig, exists: &dyn Fn(&Path) -> bool) -> ServiceSpec {
    let program = if exists(Path::new(kubelet_proto::IMAGE_BINARY)) {
        kubelet_proto::IMAGE_BINARY
    } else {
        kubelet_proto::FETCHED_BINARY
    };
    let mut depends_on = vec![CONTAINERD.to_owned()];
    if config.machine.kind == MachineType::ControlPlane {
        depends_on.push(etcd_proto::SERVICE.into());
    }
    let (ip, port) = kubelet_proto::HEALTHZ;
    ServiceSpec {
        name: kubelet_proto::SERVICE.into(),
        program: program.into(),
        args: Vec::new(),
        env: service_env(),
        env_file: None,
        args_file: Some(kubelet_proto::ARGS_FILE.into()),
        depends_on,
        start_after: Vec::new(),
        readiness: Readiness::HttpGet(std::net::SocketAddr::from((ip, port)), "/healthz".into()),
        ready_timeout: Duration::from_secs(120),
        autostart: false,
        stop_timeout: Duration::from_secs(30),
        run_as: RunAs::Root,
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
        args_file: None,
        depends_on: service.depends_on.clone(),
        start_after: Vec::new(),
        readiness: Readiness::Started,
        ready_timeout: Duration::from_secs(30),
        autostart: true,
        stop_timeout: EXTENSION_STOP_TIMEOUT,
        run_as: RunAs::Root,
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
        args_file: None,
        depends_on: Vec::new(),
        start_after: vec![CONTAINERD.into()],
        readiness: Readiness::Started,
        ready_timeout: Duration::from_secs(30),
        autostart: true,
        stop_timeout: Duration::from_secs(10),
        run_as: RunAs::User(MACHINED_USER),
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
    fn machined_runs_as_its_own_user_and_every_other_service_as_root() {
        let cfg = controlplane();
        let mut with_extension = cfg.clone();
        with_extension.machine.services = vec![ExtensionService {
            name: "ext".into(),
            command: vec!["/usr/bin/true".into()],
            depends_on: Vec::new(),
            environment: Default::default(),
        }];
        let runs: Vec<(String, RunAs)> = catalog(&with_extension, &|_| true, &mut |_| {})
            .into_iter()
            .map(|s| (s.name, s.run_as))
            .collect();
        let machined = RunAs::User(Credentials {
            uid: 50,
            gid: 50,
            capabilities: CapabilitySet::DAC_OVERRIDE
                | CapabilitySet::SYS_TIME
                | CapabilitySet::SYSLOG,
        });
        assert_eq!(
            runs,
            [
                ("containerd".to_owned(), RunAs::Root),
                ("etcd".to_owned(), RunAs::Root),
                ("kubelet".to_owned(), RunAs::Root),
                ("machined".to_owned(), machined),
                ("ext".to_owned(), RunAs::Root),
            ]
        );
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
        assert_eq!(
            names,
            [("containerd", true), ("etcd", false), ("kubelet", false)]
        );
        assert_eq!(
            notes,
            ["machined: /usr/sbin/machined not present, not started"]
        );
        // The kubelet is machined's to start: its flags come from the protocol's file.
        let kubelet = &none[2];
        assert_eq!(
            kubelet.program,
            PathBuf::from(kubelet_proto::FETCHED_BINARY)
        );
        assert_eq!(kubelet.args_file, Some(kubelet_proto::ARGS_FILE.into()));
        assert_eq!(kubelet.depends_on, ["containerd", "etcd"]);
        assert!(
            matches!(&kubelet.readiness, Readiness::HttpGet(a, p) if a.port() == 10248 && p == "/healthz")
        );
        let all = catalog(&cfg, &|_| true, &mut |_| {});
        let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["containerd", "etcd", "kubelet", "machined"]);
        // An image that bakes a kubelet in runs it.
        assert_eq!(all[2].program, PathBuf::from(kubelet_proto::IMAGE_BINARY));
        // Workers have no etcd.
        let mut worker = cfg.clone();
        worker.machine.kind = MachineType::Worker;
        let services = catalog(&worker, &|_| true, &mut |_| {});
        assert!(services.iter().all(|s| s.name != "etcd"));
        let kubelet = services.iter().find(|s| s.name == "kubelet");
        assert_eq!(
            kubelet.map(|k| k.depends_on.clone()),
            Some(vec!["containerd".to_string()])
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
