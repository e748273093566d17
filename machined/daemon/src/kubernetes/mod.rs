//! The Kubernetes node: kubeadm's phases done by machined from the machine config, and the
//! kubelet started through PID 1 once everything it needs is in place.
//!
//! At start (and again after each failure, every [`RETRY`]) the controller:
//! 1. waits for the clock (certificates are judged by it) and for an address in
//!    `machine.kubelet.node_ip_subnets` (any address when none are given);
//! 2. writes kubeadm's files (`keelson-kube`): on a control plane the certificates, the
//!    kubeconfigs, the static pod manifests, the encryption config and the bootstrap
//!    manifests (kept under `/etc/kubernetes/addons`); on a worker the CA certificate and
//!    the bootstrap kubeconfig (the token and the CA's hash, no private key); on both the
//!    KubeletConfiguration. `/etc` is a tmpfs, so all of it is rewritten at every boot
//!    from the config in effect;
//! 3. imports the OCI archives an image baked in, then pulls through the CRI every
//!    control-plane image that containerd does not have (`kubeadm config images pull`);
//! 4. takes the image's kubelet when it has one, else fetches the one of the config's
//!    version from `cluster.kubelet.base_url` and runs it only when its sha256 matches
//!    `cluster.kubelet.sha256.<arch>` (a mismatch is said with the URL and both sums, on
//!    the console and in `health`, and the binary is never made executable);
//! 5. on a control plane, waits for this node's etcd member (the API server needs it;
//!    starting the kubelet would also start etcd, which is the etcd controller's call);
//! 6. writes the kubelet's flags into the node protocol's flags file and asks PID 1 to
//!    start the kubelet, which supervises it from then on (restarts with backoff).
//!
//! A live `apply-config` of `machine.kubelet` rewrites the configuration and the flags
//! and restarts the kubelet ([`KubeNode::reconfigure`]).
//!
//! Once the kubelet runs on a control plane, the bootstrap manifests are applied through
//! the Kubernetes API (server-side apply, kube-rs) as soon as the API server answers:
//! once for the whole cluster, under an etcd lock, with a key in etcd that says it was
//! done.

pub mod cri;
pub mod fetch;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keelson_configs::layout::Arch;
use keelson_configs::schema::{MachineConfig, MachineType};
use keelson_kube::{NodeFacts, NodeFile};
use keelson_node_protocol::kubelet as proto_kubelet;
use keelson_node_protocol::state::write_atomic;

use crate::backend::{NodeBackend, ServiceOp};
use crate::etcd::{EtcdNode, Phase as EtcdPhase};
use crate::node::health::Check;
use crate::server::identity::interface_addresses;
use crate::timesync::TimeSync;

/// How long the controller waits before it tries a failed step again.
const RETRY: Duration = Duration::from_secs(10);
/// How long it waits after a refused kubelet download (a wrong pin or a wrong mirror is
/// fixed by a person, not by the next try).
const REFUSED_RETRY: Duration = Duration::from_secs(60);
/// How often a control plane looks whether the API server answers, to apply the
/// bootstrap manifests.
const ADDONS_RETRY: Duration = Duration::from_secs(15);
/// How often a node whose kubelet runs looks whether its name or addresses changed.
const FACTS_CHECK: Duration = Duration::from_secs(30);
/// The etcd key that says the bootstrap manifests were applied, and the lock's name.
const ADDONS_DONE_KEY: &str = "/keelson/bootstrap-manifests/applied";
const ADDONS_LOCK: &str = "/keelson/bootstrap-manifests/lock";

/// Where the controller writes (the real paths on a node; a directory of their own in
/// tests) and containerd's socket.
#[derive(Debug, Clone)]
pub struct KubePaths {
    /// What `/` maps to.
    pub root: PathBuf,
    /// containerd's API socket.
    pub containerd_socket: PathBuf,
}

impl Default for KubePaths {
    fn default() -> Self {
        KubePaths {
            root: "/".into(),
            containerd_socket: "/run/containerd/containerd.sock".into(),
        }
    }
}

impl KubePaths {
    fn on_node(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }
}

/// Where the node is on its way to a running kubelet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Not begun.
    Starting,
    /// Waiting for something outside this node's control (the text says what).
    Waiting(String),
    /// Working on a step (the text says which).
    Working(String),
    /// A step failed; tried again in a moment (the text says why).
    Failed(String),
    /// The kubelet's download was refused (the text has the URL and both sums).
    Refused(String),
    /// PID 1 runs the kubelet.
    KubeletStarted,
}

impl Phase {
    fn said(&self) -> String {
        match self {
            Phase::Starting => "starting".into(),
            Phase::Waiting(s) | Phase::Working(s) | Phase::Failed(s) | Phase::Refused(s) => {
                s.clone()
            }
            Phase::KubeletStarted => "the kubelet runs under PID 1".into(),
        }
    }
}

/// Why a pass of the controller stopped short of starting the kubelet.
enum Stop {
    Wait(String),
    Fail(String),
    Refuse(String),
}

/// This node's Kubernetes side, and what drives it.
#[derive(Clone)]
pub struct KubeNode {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KubeNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeNode")
            .field("phase", &self.phase())
            .finish_non_exhaustive()
    }
}

struct Inner {
    backend: Arc<dyn NodeBackend>,
    time: TimeSync,
    etcd: Option<EtcdNode>,
    paths: KubePaths,
    config: Mutex<MachineConfig>,
    phase: Mutex<Phase>,
    /// The kubelet's flags and configuration it was last started with.
    started_with: Mutex<Option<(Vec<String>, Vec<u8>)>>,
    /// The facts kubeadm's files were last written for.
    written_for: Mutex<Option<NodeFacts>>,
    /// One pass of the controller (or one reconfiguration) at a time.
    working: tokio::sync::Mutex<()>,
    addons_done: Mutex<Option<String>>,
}

fn lock<T: Clone>(m: &Mutex<T>) -> T {
    m.lock()
        .map_or_else(|p| p.into_inner().clone(), |g| g.clone())
}

fn store<T>(m: &Mutex<T>, value: T) {
    match m.lock() {
        Ok(mut g) => *g = value,
        Err(p) => *p.into_inner() = value,
    }
}

impl KubeNode {
    /// The controller for `config`.
    pub fn new(
        config: &MachineConfig,
        backend: Arc<dyn NodeBackend>,
        time: TimeSync,
        etcd: Option<EtcdNode>,
        paths: KubePaths,
    ) -> KubeNode {
        KubeNode {
            inner: Arc::new(Inner {
                backend,
                time,
                etcd,
                paths,
                config: Mutex::new(config.clone()),
                phase: Mutex::new(Phase::Starting),
                started_with: Mutex::new(None),
                written_for: Mutex::new(None),
                working: tokio::sync::Mutex::new(()),
                addons_done: Mutex::new(None),
            }),
        }
    }

    /// Where the node is.
    pub fn phase(&self) -> Phase {
        lock(&self.inner.phase)
    }

    fn set_phase(&self, phase: Phase) {
        let before = lock(&self.inner.phase);
        if before == phase {
            return;
        }
        match &phase {
            Phase::Refused(why) => tracing::error!("kubernetes: {why}"),
            Phase::Failed(why) => tracing::warn!("kubernetes: {why}"),
            Phase::Waiting(what) | Phase::Working(what) => tracing::info!("kubernetes: {what}"),
            Phase::KubeletStarted => tracing::info!("kubernetes: the kubelet was started"),
            Phase::Starting => {}
        }
        store(&self.inner.phase, phase);
    }

    /// Runs the controller until the process ends.
    pub fn spawn(&self) {
        let node = self.clone();
        tokio::spawn(async move { node.run().await });
        let node = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(FACTS_CHECK).await;
                if let Err(why) = node.follow_facts().await {
                    tracing::warn!("kubernetes: {why}");
                }
            }
        });
    }

    /// Once the kubelet runs, a change of the node's name or addresses (DHCP) writes
    /// kubeadm's files again (the certificates' SANs, the advertise address, the node IP)
    /// and restarts the kubelet when its flags changed; it restarts the static pods whose
    /// manifests changed itself.
    async fn follow_facts(&self) -> Result<(), String> {
        let _working = self.inner.working.lock().await;
        if self.phase() != Phase::KubeletStarted {
            return Ok(());
        }
        let config = lock(&self.inner.config);
        let facts = Self::facts(&config).map_err(stop_text)?;
        if lock(&self.inner.written_for).as_ref() == Some(&facts) {
            return Ok(());
        }
        tracing::info!(
            node = %facts.node_name,
            node_ip = %facts.node_ip,
            "kubernetes: the node's name or addresses changed: writing kubeadm's files again"
        );
        let files =
            render(&config, &facts).map_err(|e| format!("cannot render kubeadm's files: {e}"))?;
        self.write_files(&files).map_err(stop_text)?;
        store(&self.inner.written_for, Some(facts.clone()));
        let program = self.program();
        self.start_kubelet(&config, &facts, &program)
            .await
            .map_err(stop_text)?;
        self.set_phase(Phase::KubeletStarted);
        Ok(())
    }

    /// The kubelet's program: the image's when it has one, else the fetched one.
    fn program(&self) -> PathBuf {
        if self
            .inner
            .paths
            .on_node(Path::new(proto_kubelet::IMAGE_BINARY))
            .is_file()
        {
            PathBuf::from(proto_kubelet::IMAGE_BINARY)
        } else {
            PathBuf::from(proto_kubelet::FETCHED_BINARY)
        }
    }

    async fn run(&self) {
        loop {
            let outcome = {
                let _working = self.inner.working.lock().await;
                self.pass().await
            };
            let pause = match outcome {
                Ok(()) => {
                    self.set_phase(Phase::KubeletStarted);
                    break;
                }
                Err(Stop::Wait(what)) => {
                    self.set_phase(Phase::Waiting(what));
                    RETRY
                }
                Err(Stop::Fail(why)) => {
                    self.set_phase(Phase::Failed(why));
                    RETRY
                }
                Err(Stop::Refuse(why)) => {
                    self.set_phase(Phase::Refused(why));
                    REFUSED_RETRY
                }
            };
            tokio::time::sleep(pause).await;
        }
        let config = lock(&self.inner.config);
        if config.machine.kind == MachineType::ControlPlane {
            self.apply_addons_once().await;
        }
    }

    /// The node's facts for the renderers.
    fn facts(config: &MachineConfig) -> Result<NodeFacts, Stop> {
        let node_name = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty())
            .ok_or_else(|| Stop::Wait("the node has no hostname yet".into()))?;
        let addresses = interface_addresses();
        let subnets = &config.machine.kubelet.node_ip_subnets;
        let node_ip = crate::etcd::plan::advertised_address(subnets, &addresses).ok_or_else(|| {
            let have: Vec<String> = addresses.iter().map(ToString::to_string).collect();
            if subnets.is_empty() {
                Stop::Wait("the node has no address yet (waiting for the network)".into())
            } else {
                let want: Vec<String> = subnets.iter().map(ToString::to_string).collect();
                Stop::Wait(format!(
                    "no address of this node ({}) is in machine.kubelet.node_ip_subnets ({}) yet; if the network is up and this lasts, fix the subnets or the network",
                    have.join(", "),
                    want.join(", ")
                ))
            }
        })?;
        Ok(NodeFacts {
            node_name,
            addresses: addresses
                .into_iter()
                .filter(|a| !a.is_loopback())
                .collect::<Vec<IpAddr>>(),
            node_ip,
            arch: this_arch(),
        })
    }

    /// One pass: every step up to the kubelet's start.
    async fn pass(&self) -> Result<(), Stop> {
        let config = lock(&self.inner.config);
        if !self.inner.time.status().synced {
            return Err(Stop::Wait(
                "waiting for the clock to be synced (machine.time_servers) before it issues certificates".into(),
            ));
        }
        let facts = Self::facts(&config)?;
        self.set_phase(Phase::Working("writing kubeadm's files".into()));
        let files = render(&config, &facts)
            .map_err(|e| Stop::Fail(format!("cannot render kubeadm's files: {e}")))?;
        self.write_files(&files)?;
        store(&self.inner.written_for, Some(facts.clone()));
        self.images(&config).await?;
        let program = self.kubelet_binary(&config, facts.arch).await?;
        if let Some(etcd) = &self.inner.etcd
            && etcd.phase() != EtcdPhase::Member
        {
            return Err(Stop::Wait(
                "waiting for this control plane's etcd member before the kubelet starts (see `machinectl health` for etcd)".into(),
            ));
        }
        self.start_kubelet(&config, &facts, &program).await
    }

    fn write_files(&self, files: &[NodeFile]) -> Result<(), Stop> {
        for file in files {
            let path = self.inner.paths.on_node(&file.path);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| Stop::Fail(format!("cannot create {}: {e}", dir.display())))?;
            }
            write_atomic(&path, &file.content, file.mode)
                .map_err(|e| Stop::Fail(format!("cannot write {}: {e}", path.display())))?;
        }
        Ok(())
    }

    /// The image's OCI archives imported, then every missing image pulled.
    async fn images(&self, config: &MachineConfig) -> Result<(), Stop> {
        let socket = self.inner.paths.containerd_socket.clone();
        let archives_dir = self
            .inner
            .paths
            .on_node(Path::new(proto_kubelet::IMAGE_ARCHIVES_DIR));
        if let Ok(entries) = std::fs::read_dir(&archives_dir) {
            let mut archives: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "tar"))
                .collect();
            archives.sort();
            for archive in archives {
                crate::containerd::import(&socket, cri::CRI_NAMESPACE, &archive)
                    .await
                    .map_err(|e| {
                        Stop::Fail(format!(
                            "cannot import the image's archive {}: {}",
                            archive.display(),
                            e.message()
                        ))
                    })?;
            }
        }
        let wanted = match config.machine.kind {
            MachineType::ControlPlane => keelson_kube::images::control_plane(config),
            MachineType::Worker => keelson_kube::images::worker(config),
        };
        for reference in wanted {
            let present = cri::image_present(&socket, &reference)
                .await
                .map_err(|e| Stop::Fail(format!("cannot ask containerd about {reference}: {e}")))?;
            if present {
                continue;
            }
            self.set_phase(Phase::Working(format!("pulling {reference}")));
            cri::pull(&socket, &reference).await.map_err(|e| {
                Stop::Fail(format!(
                    "cannot pull {reference}: {e}; check cluster.image_repository and machine.registries.mirrors, and that the registry has it"
                ))
            })?;
            tracing::info!(image = %reference, "kubernetes: pulled");
        }
        Ok(())
    }

    /// The kubelet's program: the image's, else the fetched one, verified.
    async fn kubelet_binary(&self, config: &MachineConfig, arch: Arch) -> Result<PathBuf, Stop> {
        let baked = self
            .inner
            .paths
            .on_node(Path::new(proto_kubelet::IMAGE_BINARY));
        if baked.is_file() {
            return Ok(proto_kubelet::IMAGE_BINARY.into());
        }
        let arch_name = arch.debian();
        let artifacts = &config.cluster.kubelet;
        let url = fetch::kubelet_url(
            artifacts.base_url.as_deref(),
            &config.cluster.kubernetes_version.tag(),
            arch_name,
        );
        let Some(sum) = artifacts.sha256.get(arch_name) else {
            return Err(Stop::Refuse(format!(
                "the kubelet is not in the image and cluster.kubelet.sha256.{arch_name} is not set, so {url} is not fetched (a node runs only a kubelet whose sum is pinned): pin its sha256 in the config"
            )));
        };
        self.set_phase(Phase::Working(format!("fetching the kubelet from {url}")));
        let dest = self
            .inner
            .paths
            .on_node(Path::new(proto_kubelet::FETCHED_BINARY));
        match fetch::fetch_verified(&url, &sum.to_string(), &dest, fetch::FetchLimits::default())
            .await
        {
            Ok(fetched) => {
                if !fetched.reused {
                    tracing::info!(url = %url, sha256 = %fetched.sha256, bytes = fetched.bytes, "kubernetes: the kubelet was fetched and verified");
                }
                Ok(proto_kubelet::FETCHED_BINARY.into())
            }
            Err(e @ fetch::FetchError::Mismatch { .. }) => Err(Stop::Refuse(e.to_string())),
            Err(e) => Err(Stop::Fail(e.to_string())),
        }
    }

    /// The flags file written, then the kubelet (re)started.
    async fn start_kubelet(
        &self,
        config: &MachineConfig,
        facts: &NodeFacts,
        program: &Path,
    ) -> Result<(), Stop> {
        let flags = keelson_kube::kubelet::flags(config, facts);
        let kubelet_config = keelson_kube::kubelet::config_file(config, facts)
            .map_err(|e| Stop::Fail(format!("cannot render the KubeletConfiguration: {e}")))?;
        let mut text = format!(
            "# Written by machined for {}; read by PID 1 at each start.\n",
            program.display()
        );
        for flag in &flags {
            text.push_str(flag);
            text.push('\n');
        }
        let args_file = self
            .inner
            .paths
            .on_node(Path::new(proto_kubelet::ARGS_FILE));
        if let Some(dir) = args_file.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Stop::Fail(format!("cannot create {}: {e}", dir.display())))?;
        }
        write_atomic(&args_file, text.as_bytes(), 0o600)
            .map_err(|e| Stop::Fail(format!("cannot write {}: {e}", args_file.display())))?;
        let now = (flags, kubelet_config.content);
        let before = lock(&self.inner.started_with);
        let op = match before {
            None => ServiceOp::Start,
            Some(b) if b == now => {
                return Ok(());
            }
            Some(_) => ServiceOp::Restart,
        };
        self.set_phase(Phase::Working("starting the kubelet".into()));
        let backend = self.inner.backend.clone();
        let answer =
            tokio::task::spawn_blocking(move || backend.service_action(proto_kubelet::SERVICE, op))
                .await
                .map_err(|e| Stop::Fail(format!("internal error: {e}")))?
                .map_err(|e| Stop::Fail(format!("PID 1 did not start the kubelet: {e}")))?;
        tracing::info!(answer = %answer, "kubernetes: kubelet {op}");
        store(&self.inner.started_with, Some(now));
        Ok(())
    }

    /// A live `apply-config` of `machine.kubelet`: the configuration and flags rendered
    /// from `config` and the kubelet restarted when they changed.
    pub async fn reconfigure(&self, config: &MachineConfig) -> Result<String, String> {
        let _working = self.inner.working.lock().await;
        store(&self.inner.config, config.clone());
        if lock(&self.inner.started_with).is_none() {
            return Ok(
                "machine.kubelet: the kubelet has not started yet; it starts with the new settings"
                    .into(),
            );
        }
        let facts = Self::facts(config).map_err(stop_text)?;
        let file = keelson_kube::kubelet::config_file(config, &facts)
            .map_err(|e| format!("cannot render the KubeletConfiguration: {e}"))?;
        self.write_files(std::slice::from_ref(&file))
            .map_err(stop_text)?;
        let program = self.program();
        let before = lock(&self.inner.started_with);
        let started = self.start_kubelet(config, &facts, &program).await;
        self.set_phase(match &started {
            Ok(()) => Phase::KubeletStarted,
            Err(Stop::Refuse(why)) => Phase::Refused(why.clone()),
            Err(Stop::Wait(why) | Stop::Fail(why)) => Phase::Failed(why.clone()),
        });
        started.map_err(stop_text)?;
        Ok(if lock(&self.inner.started_with) == before {
            "machine.kubelet: the kubelet's flags and configuration are unchanged".into()
        } else {
            "machine.kubelet: the kubelet was restarted with its new flags and configuration".into()
        })
    }

    /// What `health` says: the controller's phase, and on a control plane whose kubelet
    /// runs, each static pod's container.
    pub async fn health(&self) -> Vec<Check> {
        let phase = self.phase();
        let mut out = vec![Check {
            name: keelson_api::api::KUBERNETES_CHECK.into(),
            // Waiting (for the network, the clock, etcd's bootstrap) and working are on the
            // way; a failed step or a refused kubelet is not.
            ok: !matches!(phase, Phase::Failed(_) | Phase::Refused(_)),
            reason: phase.said(),
        }];
        let config = lock(&self.inner.config);
        if phase != Phase::KubeletStarted || config.machine.kind != MachineType::ControlPlane {
            return out;
        }
        let containers = cri::containers(&self.inner.paths.containerd_socket).await;
        for component in [
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
        ] {
            let check = match &containers {
                Err(e) => Check {
                    name: format!("{}{component}", keelson_api::api::STATIC_POD_CHECK_PREFIX),
                    ok: false,
                    reason: format!("cannot list containers: {e}"),
                },
                Ok(list) => match list.iter().find(|c| c.name == component && c.pod_namespace == "kube-system") {
                    Some(c) => Check {
                        name: format!("{}{component}", keelson_api::api::STATIC_POD_CHECK_PREFIX),
                        ok: c.state == "running",
                        reason: format!("{} (pod {}, {} restarts)", c.state, c.pod_name, c.restarts),
                    },
                    None => Check {
                        name: format!("{}{component}", keelson_api::api::STATIC_POD_CHECK_PREFIX),
                        ok: false,
                        reason: "no container yet: the kubelet has not run its manifest (see `machinectl logs kubelet`)".into(),
                    },
                },
            };
            out.push(check);
        }
        if let Some(done) = lock(&self.inner.addons_done) {
            out.push(Check {
                name: "bootstrap manifests".into(),
                ok: true,
                reason: done,
            });
        }
        out
    }

    /// Applies the bootstrap manifests through the API server once it answers: once for
    /// the cluster, under an etcd lock, unless etcd says it was done.
    async fn apply_addons_once(&self) {
        let Some(etcd) = self.inner.etcd.clone() else {
            return;
        };
        loop {
            match self.try_addons(&etcd).await {
                Ok(done) => {
                    tracing::info!("kubernetes: {done}");
                    store(&self.inner.addons_done, Some(done));
                    return;
                }
                Err(why) => {
                    tracing::debug!("kubernetes: bootstrap manifests not applied yet: {why}")
                }
            }
            tokio::time::sleep(ADDONS_RETRY).await;
        }
    }

    async fn try_addons(&self, etcd: &EtcdNode) -> Result<String, String> {
        let config = lock(&self.inner.config);
        // super-admin (system:masters): admin.conf's group gets its rights from a binding
        // this very apply creates.
        let admin = self
            .inner
            .paths
            .on_node(Path::new(keelson_kube::paths::SUPER_ADMIN_CONF));
        let kubeconfig =
            std::fs::read_to_string(&admin).map_err(|e| format!("{}: {e}", admin.display()))?;
        keelson_kube::addons::wait_for_api(&kubeconfig, Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())?;
        let mut client = etcd.local_client().await.map_err(|e| e.to_string())?;
        let lease = client
            .lease_grant(60, None)
            .await
            .map_err(|e| format!("etcd lease: {e}"))?;
        let options = etcd_client::LockOptions::new().with_lease(lease.id());
        let held = client
            .lock(ADDONS_LOCK, Some(options))
            .await
            .map_err(|e| format!("etcd lock {ADDONS_LOCK}: {e}"))?;
        let outcome = async {
            let got = client
                .get(ADDONS_DONE_KEY, None)
                .await
                .map_err(|e| format!("etcd get: {e}"))?;
            if let Some(kv) = got.kvs().first() {
                return Ok(format!(
                    "the bootstrap manifests were applied already ({})",
                    String::from_utf8_lossy(kv.value())
                ));
            }
            let facts = Self::facts(&config).map_err(stop_text)?;
            let objects =
                keelson_kube::addons::render(&config, &facts).map_err(|e| e.to_string())?;
            let n = keelson_kube::addons::apply(&kubeconfig, &objects)
                .await
                .map_err(|e| e.to_string())?;
            let record = format!(
                "{n} objects by {} for Kubernetes {}",
                facts.node_name,
                config.cluster.kubernetes_version.tag()
            );
            client
                .put(ADDONS_DONE_KEY, record.clone(), None)
                .await
                .map_err(|e| format!("etcd put: {e}"))?;
            Ok(format!("the bootstrap manifests were applied: {record}"))
        }
        .await;
        let _ = client.unlock(held.key().to_vec()).await;
        let _ = client.lease_revoke(lease.id()).await;
        outcome
    }
}

fn stop_text(stop: Stop) -> String {
    match stop {
        Stop::Wait(s) | Stop::Fail(s) | Stop::Refuse(s) => s,
    }
}

/// The architecture machined was built for (the node's).
fn this_arch() -> Arch {
    if cfg!(target_arch = "aarch64") {
        Arch::Arm64
    } else {
        Arch::Amd64
    }
}

/// Every file kubeadm's phases write on this node.
pub fn render(
    config: &MachineConfig,
    facts: &NodeFacts,
) -> Result<Vec<NodeFile>, keelson_kube::KubeError> {
    let mut files = Vec::new();
    match config.machine.kind {
        MachineType::ControlPlane => {
            files.extend(keelson_kube::pki::control_plane(config, facts)?);
            files.extend(keelson_kube::kubeconfig::control_plane(config, facts)?);
            files.extend(keelson_kube::manifests::encryption_config(config)?);
            files.extend(keelson_kube::manifests::static_pods(config, facts)?);
            let objects = keelson_kube::addons::render(config, facts)?;
            files.extend(keelson_kube::addons::files(&objects)?);
        }
        MachineType::Worker => {
            files.extend(keelson_kube::pki::worker(config)?);
            files.push(keelson_kube::kubeconfig::worker_bootstrap(config)?);
        }
    }
    files.push(keelson_kube::kubelet::config_file(config, facts)?);
    Ok(files)
}
