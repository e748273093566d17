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
//! Each accepted TCP connection gets a TLS handshake (bounded in time and in number),
//! then HTTP/2 (hyper) in front of the gRPC router, with [`auth::Authorize`] checking
//! each request's method against the caller's role before its body is decoded.

pub mod apply;
pub mod auth;
pub mod etcd_api;
pub mod identity;
pub mod kube_api;
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

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use keelson_configs::{MachineConfig, Mode};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::backend::NodeBackend;
use crate::etcd::{EtcdNode, EtcdPaths};
use crate::kubernetes::{KubeNode, KubePaths};
use crate::node::NodePaths;
use crate::timesync::{Clock, SystemClock, TimeSync};
use crate::upgrade::{ClusterGuard, EtcdGuard, Upgrader};
use apply::Applier;
use auth::{Authorize, Peer};
use keelson_api::api::{MAX_MESSAGE_SIZE, proto::machine_server::MachineServer};
use keelson_api::tls;
use service::NodeService;
use state::StateStore;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many handshakes may run at once; more connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 64;
/// How many connections may be open at once; more are closed right after accept.
const MAX_CONNECTIONS: usize = 256;
/// HTTP/2 streams per connection.
const MAX_STREAMS: u32 = 64;
/// How long maintenance connections may finish after the first config is installed.
const MAINTENANCE_DRAIN: Duration = Duration::from_secs(3);
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
    let id = identity::server_identity(config, store, addresses)?;
    let tls = tls::server_config(&id.cert.cert, &id.cert.key, &id.client_ca)?;
    Ok((tls, id.sans))
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

/// Accepts connections until the future is dropped; then every connection it started is
/// aborted (after a short drain for maintenance connections, so the answer to the
/// installing call gets out).
async fn accept_loop(listener: &TcpListener, tls: SharedTls, svc: NodeService, maintenance: bool) {
    let routes = tonic::service::Routes::new(
        MachineServer::new(svc)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE),
    );
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut tasks = ConnectionSet {
        set: JoinSet::new(),
        drain: maintenance,
    };
    loop {
        // Reap finished connection tasks so the set does not grow.
        while tasks.set.try_join_next().is_some() {}
        let (tcp, peer_addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(conn_permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(
                peer = %peer_addr,
                open = MAX_CONNECTIONS,
                "too many connections open: closing the new one"
            );
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(
            tls.read()
                .map(|c| c.clone())
                .unwrap_or_else(|p| p.into_inner().clone()),
        );
        let handshakes = handshakes.clone();
        let routes = routes.clone();
        tasks.set.spawn(async move {
            let _conn_permit = conn_permit;
            let stream = {
                let Ok(_permit) = handshakes.acquire_owned().await else {
                    return;
                };
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::warn!(peer = %peer_addr, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(peer = %peer_addr, "TLS handshake timed out");
                        return;
                    }
                }
            };
            let peer = if maintenance {
                Peer::Anonymous
            } else {
                match stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                {
                    Some(cert) => Peer::Client(tls::caller_of(cert)),
                    // The verifier requires a certificate; never serve without one.
                    None => return,
                }
            };
            let svc = TowerToHyperService::new(Authorize::new(routes, peer));
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .max_header_list_size(16 * 1024)
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(20));
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                let text = e.to_string();
                if !text.contains("connection closed") {
                    tracing::warn!(peer = %peer_addr, error = %text, "connection failed");
                }
            }
        });
    }
}

/// The connection tasks of one mode; dropping it ends them.
struct ConnectionSet {
    set: JoinSet<()>,
    drain: bool,
}

impl Drop for ConnectionSet {
    fn drop(&mut self) {
        if !self.drain || self.set.is_empty() {
            self.set.abort_all();
            return;
        }
        // Let the installing call's answer get out, then end every maintenance connection.
        let mut set = std::mem::take(&mut self.set);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(MAINTENANCE_DRAIN, async {
                while set.join_next().await.is_some() {}
            })
            .await;
            set.abort_all();
        });
    }
}
