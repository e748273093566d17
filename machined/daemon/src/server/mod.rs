//! machined: the node API server.
//!
//! At start-up the persisted state decides the mode: with a machine config in STATE the
//! node serves every method over TLS 1.3 with mutual authentication (its certificate
//! issued from the node API CA, client certificates required); without one it is in
//! maintenance mode and serves only `Version` and `ApplyConfig` with server
//! authentication only. When the first config has been written, the maintenance
//! connections are closed and the same listener continues in mutual-TLS mode: an
//! unauthenticated call is never accepted again, and after a restart STATE says so.
//!
//! Each accepted TCP connection gets a TLS handshake (bounded in time and in number, per
//! source address too, and holding no place among established connections: see
//! [`listener`]), then HTTP/2 (hyper) in front of the gRPC router, with
//! [`auth::Authorize`] checking each request's method against the caller's role before
//! its body is decoded.

pub mod apply;
pub mod audit;
pub mod auth;
pub mod etcd_api;
pub mod follow_limit;
pub mod identity;
pub mod kube_api;
pub mod listener;
pub mod service;
pub mod state;
pub mod try_record;
pub mod upgrade_api;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use keelson_configs::{MachineConfig, Mode};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::backend::NodeBackend;
use crate::etcd::{EtcdNode, EtcdPaths};
use crate::kubernetes::{KubeNode, KubePaths};
use crate::node::NodePaths;
use crate::timesync::{Clock, SystemClock, TimeSync};
use crate::upgrade::{ClusterGuard, EtcdGuard, Upgrader};
use apply::Applier;
use keelson_api::tls;
use listener::accept_loop;
use service::NodeService;
use state::StateStore;

/// How long the API waits for the clock's first sync before it serves.
const FIRST_SYNC: Duration = Duration::from_secs(5);
/// How often a control plane checks whether its addresses changed (DHCP), to reissue its
/// certificate.
const ADDRESS_CHECK: Duration = Duration::from_secs(30);

/// Errors that stop machined.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}; is another machined running?")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// STATE could not be read.
    #[error("cannot read the persisted state")]
    State(#[from] state::StateError),
    /// The persisted config is invalid: the node will not serve with a config it cannot
    /// trust, nor fall back to unauthenticated maintenance mode.
    #[error(
        "the config in {path} is invalid, so the node API stays down (it never falls back to unauthenticated maintenance mode once configured):\n{report}"
    )]
    BadConfig {
        /// The file.
        path: String,
        /// The validator's report.
        report: String,
    },
    /// The server identity could not be made.
    #[error("cannot make the node API certificate")]
    Identity(#[from] identity::IdentityError),
    /// TLS could not be set up.
    #[error("cannot set up TLS")]
    Tls(#[from] tls::TlsError),
}

/// How machined is set up.
#[derive(Clone)]
pub struct Options {
    /// Where to listen (`[::]:50000`).
    pub listen: SocketAddr,
    /// STATE (`/system/state`).
    pub state_dir: PathBuf,
    /// What `read` maps `/` to (`/`).
    pub read_root: PathBuf,
    /// Where image uploads are spooled (`/var/lib/machined/spool`).
    pub spool_dir: PathBuf,
    /// The validation mode of configs.
    pub mode: Mode,
    /// Where node facts come from.
    pub paths: NodePaths,
    /// Where etcd's data, settings and certificates go.
    pub etcd_paths: EtcdPaths,
    /// Where the Kubernetes controller writes, and containerd's socket.
    pub kube_paths: KubePaths,
    /// Whether the time sync and the etcd controller run: off in tests that serve the
    /// API alone, which must not reach the config's time servers or control planes.
    pub drive_cluster: bool,
    /// The clock time sync steps.
    pub clock: Arc<dyn Clock>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen: SocketAddr::from(([0u16; 8], keelson_configs::layout::API_PORT)),
            state_dir: keelson_configs::layout::STATE_MOUNT.into(),
            read_root: "/".into(),
            spool_dir: "/var/lib/machined/spool".into(),
            mode: Mode::Metal,
            paths: NodePaths::default(),
            etcd_paths: EtcdPaths::default(),
            kube_paths: KubePaths::default(),
            drive_cluster: true,
            clock: Arc::new(SystemClock),
        }
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("listen", &self.listen)
            .field("state_dir", &self.state_dir)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// A bound, not yet serving, machined.
#[derive(Debug)]
pub struct Bound {
    listener: TcpListener,
    options: Options,
    upgrader: Option<Upgrader>,
}

/// Binds the listening socket (so tests learn the port before serving).
pub async fn bind(options: Options) -> Result<Bound, ServerError> {
    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: options.listen,
            source,
        })?;
    Ok(Bound {
        listener,
        options,
        upgrader: None,
    })
}

type SharedTls = Arc<RwLock<Arc<ServerConfig>>>;

fn load_config(
    store: &StateStore,
    mode: Mode,
) -> Result<Option<(MachineConfig, String)>, ServerError> {
    let Some(bytes) = store.read_config()? else {
        return Ok(None);
    };
    let path = store.config_path().display().to_string();
    let checked = keelson_configs::check_bytes(&bytes, &path, mode);
    match checked.into_result() {
        Ok(config) => Ok(Some((config, String::from_utf8_lossy(&bytes).into_owned()))),
        Err(report) => Err(ServerError::BadConfig {
            path,
            report: report.to_string(),
        }),
    }
}

fn mtls_config(
    config: &MachineConfig,
    store: &StateStore,
    addresses: &BTreeSet<IpAddr>,
) -> Result<(Arc<ServerConfig>, Vec<String>), ServerError> {
    Ok(identity::server_tls(config, store, addresses)?)
}

impl Bound {
    /// Serves `upgrade`, `rollback` and `upgrade status` with this engine (without one
    /// they answer UNIMPLEMENTED, as in the servers tests run in-process).
    #[must_use]
    pub fn with_upgrader(mut self, upgrader: Upgrader) -> Bound {
        self.upgrader = Some(upgrader);
        self
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown` resolves: maintenance mode first if STATE has no config,
    /// then mutual TLS.
    pub async fn serve(
        self,
        backend: Arc<dyn NodeBackend>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServerError> {
        let Bound {
            listener,
            options,
            upgrader,
        } = self;
        let shown = listener
            .local_addr()
            .map_or_else(|_| options.listen.to_string(), |a| a.to_string());
        let store = StateStore::new(&options.state_dir);
        tokio::pin!(shutdown);
        loop {
            let current = load_config(&store, options.mode)?;
            let addresses = identity::interface_addresses();
            match current {
                None => {
                    tracing::info!(
                        config = %store.config_path().display(),
                        address = %shown,
                        "no config: maintenance mode (serves version and apply-config; clients use --insecure)"
                    );
                    let cert = identity::maintenance_identity(&addresses)?;
                    let tls = tls::maintenance_server_config(&cert.cert, &cert.key)?;
                    let applier = Arc::new(Applier::new(
                        store.clone(),
                        backend.clone(),
                        options.mode,
                        None,
                        None,
                    ));
                    let (tx, mut rx) = mpsc::channel(1);
                    let svc = NodeService::new(
                        options.paths.clone(),
                        options.read_root.clone(),
                        options.spool_dir.clone(),
                        backend.clone(),
                        applier,
                        Some(tx),
                    );
                    let tls = Arc::new(RwLock::new(tls));
                    let done = tokio::select! {
                        () = &mut shutdown => true,
                        _ = rx.recv() => false,
                        () = accept_loop(&listener, tls, svc, true) => true,
                    };
                    if done {
                        return Ok(());
                    }
                    tracing::info!("the first config is installed: leaving maintenance mode");
                }
                Some((config, text)) => {
                    let (server_tls, sans) = mtls_config(&config, &store, &addresses)?;
                    tracing::info!(
                        address = %shown,
                        certificate_for = %sans.join(", "),
                        "serving the node API with mutual TLS"
                    );
                    let shared: SharedTls = Arc::new(RwLock::new(server_tls));
                    let hook_shared = shared.clone();
                    let hook_store = store.clone();
                    let hook: apply::ApiHook = Arc::new(move |config: &MachineConfig| {
                        let addresses = identity::interface_addresses();
                        let (tls, sans) = mtls_config(config, &hook_store, &addresses)
                            .map_err(|e| keelson_api::error_chain(&e))?;
                        if let Ok(mut slot) = hook_shared.write() {
                            *slot = tls;
                        }
                        Ok(format!(
                            "machine.api: the node API certificate was reissued for {}",
                            sans.join(", ")
                        ))
                    });
                    let (etcd, time, kube) = cluster_services(&config, &backend, &options);
                    if let Some(upgrader) = &upgrader {
                        // A control plane's upgrade is refused while its etcd member is
                        // unhealthy or its reboot would cost the cluster its quorum.
                        let guard = etcd
                            .clone()
                            .and_then(|node| EtcdGuard::new(node, &config))
                            .map(|g| Arc::new(g) as Arc<dyn ClusterGuard>);
                        upgrader.set_cluster_guard(guard);
                    }
                    let mut applier = Applier::new(
                        store.clone(),
                        backend.clone(),
                        options.mode,
                        Some((config, text)),
                        Some(hook.clone()),
                    );
                    if let Some(kube) = &kube {
                        applier = applier.with_kubelet_hook(kube.clone());
                    }
                    let applier = Arc::new(applier);
                    applier.resume_try();
                    let svc = NodeService::new(
                        options.paths.clone(),
                        options.read_root.clone(),
                        options.spool_dir.clone(),
                        backend.clone(),
                        applier.clone(),
                        None,
                    )
                    .with_cluster(etcd, time.clone())
                    .with_kube(kube)
                    .with_upgrader(upgrader.clone());
                    // Client certificates are judged by the clock: with time servers,
                    // give the first sync a few seconds before the first call.
                    if options.drive_cluster && !time.wait_synced(FIRST_SYNC).await {
                        tracing::warn!(
                            "the clock is not synced yet; serving anyway (client certificates are judged by the hardware clock until it is)"
                        );
                    }
                    let watch = watch_addresses(addresses, applier, hook);
                    tokio::select! {
                        () = &mut shutdown => {},
                        () = accept_loop(&listener, shared, svc, false) => {},
                        () = watch => {},
                    }
                    return Ok(());
                }
            }
        }
    }
}

/// The clock's sync (from `machine.time_servers`), on a control plane the etcd
/// controller, and the Kubernetes controller, all started. A control plane whose etcd
/// cannot be driven (its CA missing) still serves the API, and says why in its log and
/// in `bootstrap`.
fn cluster_services(
    config: &MachineConfig,
    backend: &Arc<dyn NodeBackend>,
    options: &Options,
) -> (Option<EtcdNode>, TimeSync, Option<KubeNode>) {
    let time = TimeSync::new(config.machine.time_servers.clone(), options.clock.clone());
    if options.drive_cluster {
        time.spawn();
    }
    let etcd = match EtcdNode::new(
        config,
        backend.clone(),
        time.clone(),
        options.etcd_paths.clone(),
    ) {
        Ok(etcd) => etcd,
        Err(e) => {
            tracing::error!(error = %e, "etcd cannot run on this node");
            None
        }
    };
    if let Some(etcd) = &etcd
        && options.drive_cluster
    {
        etcd.spawn();
    }
    let kube = options.drive_cluster.then(|| {
        let kube = KubeNode::new(
            config,
            backend.clone(),
            time.clone(),
            etcd.clone(),
            options.kube_paths.clone(),
        );
        kube.spawn();
        kube
    });
    (etcd, time, kube)
}

/// Reissues the certificate when the node's addresses change (DHCP after start-up).
async fn watch_addresses(mut known: BTreeSet<IpAddr>, applier: Arc<Applier>, hook: apply::ApiHook) {
    loop {
        tokio::time::sleep(ADDRESS_CHECK).await;
        let now = identity::interface_addresses();
        if now == known {
            continue;
        }
        if let Some(config) = applier.current() {
            match hook(&config) {
                Ok(m) => tracing::info!(outcome = %m, "addresses changed"),
                Err(e) => tracing::warn!(error = %e, "addresses changed"),
            }
        }
        known = now;
    }
}
