//! etcd on a control plane: machined decides how this node's member starts and drives
//! it; PID 1 runs the process (`keelson_node_protocol::etcd`).
//!
//! At start the controller waits for the clock (`machine.time_servers`), writes etcd's
//! certificates from the config's etcd CA (kubeadm's files, `/etc/kubernetes/pki/etcd`),
//! then:
//! - with data in `/var/lib/etcd`, starts the member as it was (after checking, when the
//!   cluster answers, that it was not removed meanwhile: then its data is wiped and it
//!   joins again);
//! - without, looks for the cluster at `cluster.etcd.endpoints` (default: the host of
//!   `cluster.endpoint`) and joins it: members of its earlier life removed, added as a
//!   learner, started, promoted once caught up;
//! - when no cluster answers, waits for `machinectl bootstrap` (here or on another
//!   control plane), saying every minute which node to bootstrap; `health` says it too.
//!
//! [`EtcdNode::bootstrap`] starts a new cluster, refused on a worker, with an unsynced
//! clock, with data here, or when another control plane already has members (Talos
//! never added that last guard; a second bootstrap there splits the cluster). The
//! operations behind `machinectl etcd` are in [`ops`].

pub mod client;
pub mod ops;
pub mod plan;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keelson_configs::pki::{self, CertAndKey};
use keelson_configs::schema::{MachineConfig, MachineType};
use keelson_node_protocol::etcd as proto_etcd;
use keelson_node_protocol::state::write_atomic;

use crate::backend::{NodeBackend, ServiceOp};
use crate::server::identity::interface_addresses;
use crate::timesync::TimeSync;
use client::Credentials;
use plan::{ClusterState, Member, MemberEnv};

/// How often a control plane that waits for a cluster looks again.
const RETRY: Duration = Duration::from_secs(10);
/// How long a bootstrap waits for its new member to answer.
const BOOTSTRAP_READY: Duration = Duration::from_secs(180);
/// How often a member checks whether its advertised address changed.
const ADDRESS_CHECK: Duration = Duration::from_secs(30);
/// How long a learner may take to catch up before the promotion gives up (the next boot
/// tries again).
const PROMOTE_LIMIT: Duration = Duration::from_secs(900);

/// What went wrong with etcd, said so that an operator knows what to do.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// Refused: the request cannot be carried out on this node as it is.
    #[error("{0}")]
    Refused(String),
    /// No member answered.
    #[error("cannot reach etcd at {urls}: {reason}")]
    Connect {
        /// The URLs tried.
        urls: String,
        /// The client's error.
        reason: String,
    },
    /// An etcd call failed.
    #[error("etcd {call}: {reason}")]
    Call {
        /// The call.
        call: &'static str,
        /// etcd's answer.
        reason: String,
    },
    /// A certificate could not be made.
    #[error("cannot issue etcd's certificates from cluster.secrets.etcd_ca: {0}")]
    Pki(String),
    /// A file could not be written or removed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// The system's error.
        reason: String,
    },
    /// PID 1 refused or failed a service request.
    #[error("PID 1: {0}")]
    Init(String),
}

impl EtcdError {
    fn call(call: &'static str, e: impl std::fmt::Display) -> EtcdError {
        EtcdError::Call {
            call,
            reason: e.to_string(),
        }
    }

    fn file(path: &Path, e: impl std::fmt::Display) -> EtcdError {
        EtcdError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        }
    }
}

/// Where the controller keeps its files (the protocol's paths on a node; a directory of
/// their own in tests).
#[derive(Debug, Clone)]
pub struct EtcdPaths {
    /// `/var/lib/etcd`.
    pub data_dir: PathBuf,
    /// `/var/lib/keelson/etcd.env`.
    pub env_file: PathBuf,
    /// `/etc/kubernetes/pki`.
    pub pki_dir: PathBuf,
}

impl Default for EtcdPaths {
    fn default() -> Self {
        EtcdPaths {
            data_dir: keelson_configs::layout::ETCD_DATA_DIR.into(),
            env_file: proto_etcd::ENV_FILE.into(),
            pki_dir: keelson_configs::layout::KUBERNETES_PKI_DIR.into(),
        }
    }
}

/// Where the member is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// The clock is not synced yet.
    WaitingForTime,
    /// No cluster answers: waiting for a bootstrap (the text says where to run it).
    WaitingForCluster(String),
    /// Joining (the text says how far).
    Joining(String),
    /// A member of the cluster.
    Member,
    /// This member left (`etcd leave`); it joins again at the next boot.
    Left,
    /// Something failed; the controller tries again.
    Failed(String),
}

/// This control plane's etcd member and what drives it.
#[derive(Clone)]
pub struct EtcdNode {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EtcdNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdNode")
            .field("phase", &self.phase())
            .finish_non_exhaustive()
    }
}

struct Inner {
    backend: Arc<dyn NodeBackend>,
    time: TimeSync,
    paths: EtcdPaths,
    credentials: Credentials,
    ca: CertAndKey,
    cluster_name: String,
    subnets: Vec<ipnet::IpNet>,
    endpoints: Vec<(String, u16)>,
    phase: Mutex<Phase>,
    /// The name and address the certificates were last issued for.
    issued_for: Mutex<Option<Identity>>,
    /// One change of membership at a time (join, bootstrap, leave).
    changing: tokio::sync::Mutex<()>,
    wake: tokio::sync::Notify,
}

/// The member's identity on this boot: its name and advertised address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The hostname.
    pub name: String,
    /// The advertised address.
    pub address: IpAddr,
}

impl EtcdNode {
    /// The controller of a control plane's config; `None` on a worker.
    pub fn new(
        config: &MachineConfig,
        backend: Arc<dyn NodeBackend>,
        time: TimeSync,
        paths: EtcdPaths,
    ) -> Result<Option<EtcdNode>, EtcdError> {
        if config.machine.kind != MachineType::ControlPlane {
            return Ok(None);
        }
        let Some(pair) = &config.cluster.secrets.etcd_ca else {
            return Err(EtcdError::Refused(
                "cluster.secrets.etcd_ca is missing: a control plane needs the etcd CA".into(),
            ));
        };
        let Some(key) = &pair.key else {
            return Err(EtcdError::Refused(
                "cluster.secrets.etcd_ca has no key: a control plane issues etcd's certificates with it".into(),
            ));
        };
        let ca = CertAndKey {
            cert: pair.cert.to_string(),
            key: key.to_string(),
        };
        let credentials = Credentials::new(&ca);
        Ok(Some(EtcdNode {
            inner: Arc::new(Inner {
                backend,
                time,
                paths,
                credentials,
                ca,
                cluster_name: config.cluster.name.clone(),
                subnets: config.cluster.etcd.advertised_subnets.clone(),
                endpoints: config.cluster.etcd_join_endpoints(),
                phase: Mutex::new(Phase::WaitingForTime),
                issued_for: Mutex::new(None),
                changing: tokio::sync::Mutex::new(()),
                wake: tokio::sync::Notify::new(),
            }),
        }))
    }

    /// Where the member is.
    pub fn phase(&self) -> Phase {
        self.inner
            .phase
            .lock()
            .map_or_else(|p| p.into_inner().clone(), |p| p.clone())
    }

    fn set_phase(&self, phase: Phase) {
        let changed = {
            let mut slot = match self.inner.phase.lock() {
                Ok(slot) => slot,
                Err(p) => p.into_inner(),
            };
            let changed = *slot != phase;
            *slot = phase.clone();
            changed
        };
        if changed {
            match &phase {
                Phase::WaitingForCluster(why) => tracing::warn!("etcd: {why}"),
                Phase::Failed(why) => tracing::warn!("etcd: {why}"),
                Phase::Joining(how) => tracing::info!("etcd: {how}"),
                Phase::WaitingForTime => tracing::info!(
                    "etcd: waiting for the clock to be synced (machine.time_servers) before it issues certificates or starts"
                ),
                Phase::Member => tracing::info!("etcd: this node is a member of the cluster"),
                Phase::Left => tracing::info!(
                    "etcd: this node left the cluster; it joins again at its next boot"
                ),
            }
        }
    }

    /// Runs the controller until the process ends, and the watch on the node's address.
    pub fn spawn(&self) {
        let node = self.clone();
        tokio::spawn(async move { node.run().await });
        let node = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(ADDRESS_CHECK).await;
                if let Err(e) = node.follow_address().await {
                    tracing::warn!(error = %e, "etcd: the member's new address could not be taken");
                }
            }
        });
    }

    /// When the advertised address changed (DHCP), a member's certificates are issued
    /// again, its peer URL updated in the cluster, its settings rewritten, and etcd
    /// restarted on them.
    async fn follow_address(&self) -> Result<(), EtcdError> {
        let _changing = self.inner.changing.lock().await;
        if self.phase() != Phase::Member {
            return Ok(());
        }
        let id = self.identity()?;
        let before = self
            .inner
            .issued_for
            .lock()
            .map_or_else(|p| p.into_inner().clone(), |p| p.clone());
        let Some(before) = before else {
            return Ok(());
        };
        if before == id {
            return Ok(());
        }
        tracing::info!(
            from = %before.address,
            to = %id.address,
            "etcd: the advertised address changed: reissuing the member's certificates and updating its peer URL"
        );
        self.write_certificates(&id)?;
        let mut c = self
            .inner
            .credentials
            .connect(&[
                plan::client_url(before.address),
                plan::endpoint_url("127.0.0.1", keelson_configs::layout::ETCD_CLIENT_PORT),
            ])
            .await?;
        let own = client::own_id(&mut c).await?;
        c.member_update(own, vec![plan::peer_url(id.address)])
            .await
            .map_err(|e| EtcdError::call("member update", e))?;
        self.write_env(
            &id,
            vec![(id.name.clone(), plan::peer_url(id.address))],
            ClusterState::Existing,
        )?;
        self.service(ServiceOp::Restart).await.map(drop)
    }

    async fn run(&self) {
        let mut last_said = std::time::Instant::now();
        loop {
            let settled = {
                let _changing = self.inner.changing.lock().await;
                match self.phase() {
                    Phase::Member | Phase::Left | Phase::Joining(_) => true,
                    _ => match self.step().await {
                        Ok(done) => done,
                        Err(e) => {
                            self.set_phase(Phase::Failed(format!(
                                "{e}; trying again in {} s",
                                RETRY.as_secs()
                            )));
                            false
                        }
                    },
                }
            };
            if settled {
                self.inner.wake.notified().await;
                continue;
            }
            if let Phase::WaitingForCluster(why) = self.phase()
                && last_said.elapsed() > Duration::from_secs(60)
            {
                tracing::warn!("etcd: {why}");
                last_said = std::time::Instant::now();
            }
            tokio::select! {
                () = tokio::time::sleep(RETRY) => {}
                () = self.inner.wake.notified() => {}
            }
        }
    }

    /// One attempt: `true` once this node is a member.
    async fn step(&self) -> Result<bool, EtcdError> {
        if !self.inner.time.status().synced {
            self.set_phase(Phase::WaitingForTime);
            return Ok(false);
        }
        let id = self.identity()?;
        // Certificates are issued when etcd is about to start (here, in a join, at a
        // bootstrap), not while the node only waits for a cluster.
        if self.has_data() {
            if self.was_removed(&id).await {
                tracing::warn!(
                    "etcd: the cluster no longer lists this member ({}): wiping {} to join again",
                    id.name,
                    self.inner.paths.data_dir.display()
                );
                self.wipe()?;
            } else {
                if !self.inner.paths.env_file.exists() {
                    self.write_env(
                        &id,
                        vec![(id.name.clone(), plan::peer_url(id.address))],
                        ClusterState::Existing,
                    )?;
                }
                self.write_certificates(&id)?;
                self.start_service().await?;
                self.set_phase(Phase::Member);
                let node = self.clone();
                tokio::spawn(async move { node.promote_if_learner(&id).await });
                return Ok(true);
            }
        }
        match self.find_cluster(&id).await {
            Ok((urls, members)) => {
                self.join(&id, &urls, members).await?;
                Ok(true)
            }
            Err(why) => {
                self.set_phase(Phase::WaitingForCluster(why));
                Ok(false)
            }
        }
    }

    /// The member's name and address on this boot.
    pub fn identity(&self) -> Result<Identity, EtcdError> {
        let name = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty())
            .ok_or_else(|| EtcdError::Refused("the node has no hostname".into()))?;
        let addresses = interface_addresses();
        let address = plan::advertised_address(&self.inner.subnets, &addresses).ok_or_else(|| {
            EtcdError::Refused(format!(
                "no address of this node is in cluster.etcd.advertised_subnets ({1}) yet (it has {0}); if the network is up and this lasts, fix the subnets or the network",
                addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                self.inner.subnets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            ))
        })?;
        Ok(Identity { name, address })
    }

    /// The cluster's URLs to join through: the configured endpoints but this node's own.
    fn peer_urls(&self) -> Vec<String> {
        let own = interface_addresses();
        self.inner
            .endpoints
            .iter()
            .filter(|(host, _)| host.parse::<IpAddr>().map_or(true, |ip| !own.contains(&ip)))
            .map(|(host, port)| plan::endpoint_url(host, *port))
            .collect()
    }

    /// A cluster that answers at one of the endpoints, with its members; or why none does.
    async fn find_cluster(&self, id: &Identity) -> Result<(Vec<String>, Vec<Member>), String> {
        let urls = self.peer_urls();
        let mut failures = Vec::new();
        for url in &urls {
            let one = std::slice::from_ref(url);
            let listed = async {
                let mut client = self.inner.credentials.connect(one).await?;
                client::members(&mut client).await
            };
            match tokio::time::timeout(Duration::from_secs(8), listed).await {
                Ok(Ok(members)) if members.iter().any(|m| m.started() && m.name != id.name) => {
                    return Ok((vec![url.clone()], members));
                }
                Ok(Ok(_)) => failures.push(format!("{url}: no other member")),
                Ok(Err(e)) => failures.push(format!("{url}: {e}")),
                Err(_) => failures.push(format!("{url}: no answer within 8 s")),
            }
        }
        let first = urls
            .first()
            .map_or_else(|| "another control plane".to_owned(), Clone::clone);
        Err(format!(
            "no etcd cluster to join ({}); if this is a new cluster, run `machinectl bootstrap` on one control plane (this one: `machinectl --nodes {} bootstrap`); the others join by themselves",
            if failures.is_empty() {
                format!(
                    "cluster.etcd.endpoints names no other control plane than this one, {first}"
                )
            } else {
                failures.join("; ")
            },
            id.address
        ))
    }

    /// Joins the cluster at `urls` as a learner, starts etcd, and promotes it once caught up.
    async fn join(
        &self,
        id: &Identity,
        urls: &[String],
        members: Vec<Member>,
    ) -> Result<(), EtcdError> {
        let peer = plan::peer_url(id.address);
        let mut client = self.inner.credentials.connect(urls).await?;
        for stale in plan::stale_members(&members, &id.name, &peer) {
            tracing::info!(member = %format!("{stale:x}"), "etcd: removing this node's earlier member before joining");
            client
                .member_remove(stale)
                .await
                .map_err(|e| EtcdError::call("member remove", e))?;
        }
        self.set_phase(Phase::Joining(format!(
            "joining the cluster at {} as a learner",
            urls.join(", ")
        )));
        let added = client
            .member_add(
                [peer.as_str()],
                Some(etcd_client::MemberAddOptions::new().with_is_learner()),
            )
            .await
            .map_err(|e| EtcdError::call("member add", e))?;
        let own_id = added.member().map(|m| m.id()).unwrap_or_default();
        let listed: Vec<Member> = added.member_list().iter().map(client::member).collect();
        let cluster = plan::initial_cluster(&listed, own_id, &id.name);
        self.write_certificates(id)?;
        self.write_env(id, cluster, ClusterState::Existing)?;
        self.start_service().await?;
        self.set_phase(Phase::Joining(format!(
            "started as learner {own_id:x}; promoting it once it has caught up"
        )));
        // The promotion waits for the learner to catch up, outside the membership lock,
        // so that a leave, reset or bootstrap request is answered meanwhile.
        let node = self.clone();
        tokio::spawn(async move {
            node.promote(&mut client, own_id).await;
            if matches!(node.phase(), Phase::Joining(_)) {
                node.set_phase(Phase::Member);
            }
        });
        Ok(())
    }

    /// Promotes `own_id` once etcd says the learner is in sync (it refuses until then).
    async fn promote(&self, client: &mut etcd_client::Client, own_id: u64) {
        let started = std::time::Instant::now();
        while started.elapsed() < PROMOTE_LIMIT {
            match client.member_promote(own_id).await {
                Ok(_) => {
                    tracing::info!(member = %format!("{own_id:x}"), "etcd: the learner was promoted to a voting member");
                    return;
                }
                Err(e) if e.to_string().contains("not a learner") => return,
                Err(e) => tracing::debug!(error = %e, "etcd: not promoted yet"),
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        tracing::warn!(
            "etcd: the learner was not promoted within {} s; the next boot tries again",
            PROMOTE_LIMIT.as_secs()
        );
    }

    /// After a start with data: a member still a learner (a power cut before its
    /// promotion) is promoted now.
    async fn promote_if_learner(&self, id: &Identity) {
        let local = vec![plan::client_url(id.address)];
        let Ok(mut client) = self.inner.credentials.connect(&local).await else {
            return;
        };
        for _ in 0..30 {
            if let Ok(members) = client::members(&mut client).await
                && let Some(own) = members.iter().find(|m| m.name == id.name)
            {
                if own.learner {
                    self.promote(&mut client, own.id).await;
                }
                return;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// Whether the cluster answers at its endpoints and no longer lists this member.
    async fn was_removed(&self, id: &Identity) -> bool {
        let peer = plan::peer_url(id.address);
        match self.find_cluster(id).await {
            Ok((_, members)) => !members
                .iter()
                .any(|m| m.name == id.name || m.peer_urls.contains(&peer)),
            Err(_) => false,
        }
    }

    /// Whether `/var/lib/etcd` holds a member's data.
    pub fn has_data(&self) -> bool {
        self.inner.paths.data_dir.join("member").exists()
    }

    /// Whether `/var/lib/etcd` holds anything.
    fn data_dir_empty(&self) -> bool {
        std::fs::read_dir(&self.inner.paths.data_dir).map_or(true, |mut d| d.next().is_none())
    }

    /// etcd's certificates for this boot's name and address (kubeadm's files, 0600).
    fn write_certificates(&self, id: &Identity) -> Result<(), EtcdError> {
        let certs = pki::etcd_certificates(&self.inner.ca, &id.name, &[id.address])
            .map_err(|e| EtcdError::Pki(e.to_string()))?;
        for file in certs.files(&self.inner.ca.cert) {
            let path = self.inner.paths.pki_dir.join(file.path);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| EtcdError::file(dir, e))?;
            }
            write_atomic(&path, file.content.as_bytes(), file.mode)
                .map_err(|e| EtcdError::file(&path, e))?;
        }
        if let Ok(mut slot) = self.inner.issued_for.lock() {
            *slot = Some(id.clone());
        }
        Ok(())
    }

    fn write_env(
        &self,
        id: &Identity,
        initial_cluster: Vec<(String, String)>,
        state: ClusterState,
    ) -> Result<(), EtcdError> {
        let env = MemberEnv {
            name: id.name.clone(),
            address: id.address,
            initial_cluster,
            state,
            token: self.inner.cluster_name.clone(),
        };
        let path = &self.inner.paths.env_file;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| EtcdError::file(dir, e))?;
        }
        write_atomic(path, env.render().as_bytes(), 0o600).map_err(|e| EtcdError::file(path, e))
    }

    /// Removes the member's data and settings (after a leave, or a removal).
    fn wipe(&self) -> Result<(), EtcdError> {
        let data = &self.inner.paths.data_dir;
        match std::fs::remove_dir_all(data) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(EtcdError::file(data, e)),
        }
        let env = &self.inner.paths.env_file;
        match std::fs::remove_file(env) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(EtcdError::file(env, e)),
        }
    }

    async fn service(&self, op: ServiceOp) -> Result<String, EtcdError> {
        let backend = self.inner.backend.clone();
        tokio::task::spawn_blocking(move || backend.service_action(proto_etcd::SERVICE, op))
            .await
            .map_err(|e| EtcdError::Init(e.to_string()))?
            .map_err(|e| EtcdError::Init(e.to_string()))
    }

    /// A client of this node's own member, on loopback (the Kubernetes controller's lock
    /// around the bootstrap manifests).
    pub async fn local_client(&self) -> Result<etcd_client::Client, EtcdError> {
        self.inner
            .credentials
            .connect(&[plan::endpoint_url(
                "127.0.0.1",
                keelson_configs::layout::ETCD_CLIENT_PORT,
            )])
            .await
    }

    async fn start_service(&self) -> Result<(), EtcdError> {
        self.service(ServiceOp::Start).await.map(drop)
    }

    /// Starts a new cluster here (`machinectl bootstrap`), from `snapshot` when given.
    pub async fn bootstrap(&self, snapshot: Option<&Path>) -> Result<String, EtcdError> {
        let _changing = self.inner.changing.lock().await;
        let status = self.inner.time.status();
        if !status.synced {
            return Err(EtcdError::Refused(format!(
                "the clock is not synced ({}), and etcd's certificates and leases need the right time: check machine.time_servers and that the node reaches them (`machinectl time`), then bootstrap again",
                status
                    .last_error
                    .unwrap_or_else(|| "no time server has answered yet".into())
            )));
        }
        let id = self.identity()?;
        if let Ok((urls, members)) = self.find_cluster(&id).await {
            let names: Vec<&str> = members
                .iter()
                .filter(|m| m.started())
                .map(|m| m.name.as_str())
                .collect();
            return Err(EtcdError::Refused(format!(
                "the etcd cluster at {} already has {} members ({}): {}; a second bootstrap would split the cluster",
                urls.join(", "),
                names.len(),
                names.join(", "),
                if names.contains(&id.name.as_str()) {
                    "this node is one of them"
                } else {
                    "this node joins it by itself"
                }
            )));
        }
        if self.phase() == Phase::Member || !self.data_dir_empty() {
            return Err(EtcdError::Refused(format!(
                "{} is not empty: this node already has (or had) an etcd member, so the cluster was bootstrapped; `machinectl etcd members` shows it. To start over, reset every control plane",
                self.inner.paths.data_dir.display()
            )));
        }
        self.write_certificates(&id)?;
        let cluster = vec![(id.name.clone(), plan::peer_url(id.address))];
        if let Some(snapshot) = snapshot {
            self.restore(&id, snapshot, &cluster).await?;
        }
        self.write_env(&id, cluster, ClusterState::New)?;
        self.start_service().await?;
        let local = vec![plan::client_url(id.address)];
        let started = std::time::Instant::now();
        let mut last = String::new();
        while started.elapsed() < BOOTSTRAP_READY {
            match self.inner.credentials.connect(&local).await {
                Ok(mut c) => match c.status().await {
                    Ok(_) => {
                        self.set_phase(Phase::Member);
                        self.inner.wake.notify_one();
                        return Ok(format!(
                            "etcd cluster {} bootstrapped on {} ({}){}; the other control planes join it by themselves",
                            self.inner.cluster_name,
                            id.name,
                            plan::client_url(id.address),
                            if snapshot.is_some() {
                                " from the snapshot"
                            } else {
                                ""
                            }
                        ));
                    }
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Err(EtcdError::Refused(format!(
            "etcd was started but did not answer within {} s ({last}); see `machinectl logs etcd`",
            BOOTSTRAP_READY.as_secs()
        )))
    }

    /// Restores a snapshot into the empty data directory with the real `etcdutl`.
    async fn restore(
        &self,
        id: &Identity,
        snapshot: &Path,
        cluster: &[(String, String)],
    ) -> Result<(), EtcdError> {
        let initial = cluster
            .iter()
            .map(|(n, u)| format!("{n}={u}"))
            .collect::<Vec<_>>()
            .join(",");
        // etcdutl creates the directory itself and refuses one that exists.
        let _ = std::fs::remove_dir(&self.inner.paths.data_dir);
        let mut cmd = tokio::process::Command::new("/usr/bin/etcdutl");
        cmd.arg("snapshot")
            .arg("restore")
            .arg(snapshot)
            .arg(format!(
                "--data-dir={}",
                self.inner.paths.data_dir.display()
            ))
            .arg(format!("--name={}", id.name))
            .arg(format!("--initial-cluster={initial}"))
            .arg(format!(
                "--initial-advertise-peer-urls={}",
                plan::peer_url(id.address)
            ))
            .arg(format!(
                "--initial-cluster-token={}",
                self.inner.cluster_name
            ));
        let out = cmd
            .output()
            .await
            .map_err(|e| EtcdError::file(Path::new("/usr/bin/etcdutl"), e))?;
        if !out.status.success() {
            let _ = self.wipe();
            return Err(EtcdError::Refused(format!(
                "the snapshot could not be restored (etcdutl snapshot restore: {}); is it a snapshot from `machinectl etcd snapshot` or `etcdctl snapshot save`?",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        tracing::info!(snapshot = %snapshot.display(), "etcd: snapshot restored");
        Ok(())
    }
}
