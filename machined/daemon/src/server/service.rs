//! The `keelson.machine.v1.Machine` service: one handler per method. Roles were checked
//! before a handler runs ([`super::auth`]); handlers that read files check the path's own
//! protection with the caller's role. Blocking work (files, init's socket) runs on tokio's
//! blocking pool.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use keelson_configs::pki::Role;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};

use crate::backend::{BackendError, NodeBackend, Power, ServiceOp};
use crate::etcd::EtcdNode;
use crate::etcd::ops::ResetLeave;
use crate::kubernetes::KubeNode;
use crate::node::{NodePaths, files, health, kmsg, tables, version};
use crate::server::apply::{Applier, ApplyError, ApplyRequest};
use crate::server::auth::Authorized;
use crate::server::follow_limit::{FollowLimit, FollowPermit};
use crate::server::{audit, etcd_api, kube_api, upgrade_api};
use crate::timesync::TimeSync;
use crate::upgrade::Upgrader;
use keelson_api::api::proto;
use keelson_api::api::proto::machine_server::Machine;

/// How often `logs -f` and `dmesg -f` look for new lines.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(300);
/// How many lines `logs -f` compares between two polls.
const FOLLOW_WINDOW: u32 = 2000;
/// Kernel messages per streamed message.
const DMESG_BATCH: usize = 500;
/// Log lines per streamed message.
const LOG_BATCH: usize = 1000;
/// The largest image archive accepted (4 GiB).
pub const MAX_IMAGE_ARCHIVE: u64 = 4 * 1024 * 1024 * 1024;
/// The most an image import's spool leaves free on its filesystem (EPHEMERAL): 5% of it,
/// but no more than this (256 MiB).
pub const SPOOL_RESERVE_MAX: u64 = 256 * 1024 * 1024;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The handlers' shared state.
pub struct NodeService {
    paths: NodePaths,
    read_root: PathBuf,
    spool_dir: PathBuf,
    backend: Arc<dyn NodeBackend>,
    applier: Arc<Applier>,
    maintenance: bool,
    installed: Option<mpsc::Sender<()>>,
    etcd: Option<EtcdNode>,
    time: Option<TimeSync>,
    kube: Option<KubeNode>,
    /// Held by the image import that runs (one at a time).
    import_lock: tokio::sync::Mutex<()>,
    /// The upgrade engine (none in servers that tests run in-process).
    upgrader: Option<Upgrader>,
    /// The follow streams open, by caller.
    follows: FollowLimit,
}

impl std::fmt::Debug for NodeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeService")
            .field("paths", &self.paths)
            .field("maintenance", &self.maintenance)
            .finish_non_exhaustive()
    }
}

impl NodeService {
    /// The service of a configured node (`installed` is None) or of a node in maintenance
    /// mode (`installed` is told when the first config is in STATE).
    pub fn new(
        paths: NodePaths,
        read_root: PathBuf,
        spool_dir: PathBuf,
        backend: Arc<dyn NodeBackend>,
        applier: Arc<Applier>,
        installed: Option<mpsc::Sender<()>>,
    ) -> NodeService {
        NodeService {
            paths,
            read_root,
            spool_dir,
            backend,
            applier,
            maintenance: installed.is_some(),
            installed,
            etcd: None,
            time: None,
            kube: None,
            import_lock: tokio::sync::Mutex::new(()),
            upgrader: None,
            follows: FollowLimit::default(),
        }
    }
}

impl NodeService {
    /// The configured node's clock and, on a control plane, its etcd member.
    pub fn with_cluster(mut self, etcd: Option<EtcdNode>, time: TimeSync) -> NodeService {
        self.etcd = etcd;
        self.time = Some(time);
        self
    }

    /// The upgrade engine, for `upgrade`, `rollback` and `upgrade status`.
    pub fn with_upgrader(mut self, upgrader: Option<Upgrader>) -> NodeService {
        self.upgrader = upgrader;
        self
    }

    /// The node's Kubernetes controller, for `health`.
    pub fn with_kube(mut self, kube: Option<KubeNode>) -> NodeService {
        self.kube = kube;
        self
    }

    /// A place for a follow stream of the caller's (none for a request that does not
    /// follow), or RESOURCE_EXHAUSTED when it holds its limit.
    fn follow_permit<T: Follows>(&self, req: &Request<T>) -> Result<Option<FollowPermit>, Status> {
        if !req.get_ref().follows() {
            return Ok(None);
        }
        self.follows.acquire(&caller(req)).map(Some)
    }
}

/// A streaming request that may follow new output.
trait Follows {
    fn follows(&self) -> bool;
}

impl Follows for proto::LogsRequest {
    fn follows(&self) -> bool {
        self.follow
    }
}

impl Follows for proto::DmesgRequest {
    fn follows(&self) -> bool {
        self.follow
    }
}

fn role_of<T>(req: &Request<T>) -> Result<Role, Status> {
    req.extensions()
        .get::<Authorized>()
        .and_then(|a| a.role)
        .ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}

/// The caller's certificate name, for the log.
fn caller<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<Authorized>()
        .map(|a| a.user.clone())
        .unwrap_or_default()
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// Runs blocking work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(internal)
}

fn backend_status(e: BackendError) -> Status {
    let message = keelson_api::error_chain(&e);
    match e {
        BackendError::UnknownService { .. } => Status::not_found(message),
        BackendError::Refused(_) => Status::failed_precondition(message),
        BackendError::Connect { .. } | BackendError::Io { .. } | BackendError::Protocol { .. } => {
            Status::unavailable(message)
        }
    }
}

fn apply_status(e: ApplyError) -> Status {
    let message = e.to_string();
    match e {
        ApplyError::Busy => Status::aborted(message),
        ApplyError::Invalid(_) | ApplyError::BadRequest(_) => Status::invalid_argument(message),
        ApplyError::Precondition(_) => Status::failed_precondition(message),
        ApplyError::Failed(_) => Status::internal(message),
    }
}

/// The lines of `now` that follow what `prev` already showed: `now` is a later window of
/// the same ring buffer, so its head overlaps `prev`'s tail.
pub fn new_lines<'a>(prev: &[String], now: &'a [String]) -> &'a [String] {
    let max = prev.len().min(now.len());
    for k in (1..=max).rev() {
        if prev.get(prev.len() - k..) == now.get(..k) {
            return now.get(k..).unwrap_or_default();
        }
    }
    now
}

fn kernel_message(r: kmsg::Record) -> proto::KernelMessage {
    proto::KernelMessage {
        level: r.level,
        facility: r.facility,
        sequence: r.sequence,
        timestamp_us: r.timestamp_us,
        message: r.message,
    }
}

#[tonic::async_trait]
impl Machine for NodeService {
    async fn version(
        &self,
        _req: Request<proto::VersionRequest>,
    ) -> Result<Response<proto::VersionResponse>, Status> {
        let paths = self.paths.clone();
        let v = blocking(move || version::read(&paths)).await?;
        let machine_type = self
            .applier
            .current()
            .map(|c| c.machine.kind.to_string())
            .unwrap_or_default();
        Ok(Response::new(proto::VersionResponse {
            os_name: v.os_name,
            os_version: v.os_version,
            slot: v.slot,
            kernel: v.kernel,
            arch: v.arch,
            maintenance: self.maintenance,
            machine_type,
            hostname: v.hostname,
            api_version: env!("CARGO_PKG_VERSION").into(),
        }))
    }

    async fn health(
        &self,
        _req: Request<proto::HealthRequest>,
    ) -> Result<Response<proto::HealthResponse>, Status> {
        let paths = self.paths.clone();
        let backend = self.backend.clone();
        let config = self.applier.current();
        let state_dir = self.applier.state_dir().to_path_buf();
        let checks = blocking(move || {
            let services = backend.services();
            let mut checks = health::checks(&paths, config.as_ref(), services);
            checks.extend(health::last_reset(&state_dir));
            checks
        })
        .await?;
        let mut checks = checks;
        checks.extend(self.applier.try_check());
        if let Some(etcd) = &self.etcd {
            checks.push(etcd.health().await);
        }
        if let Some(kube) = &self.kube {
            checks.extend(kube.health().await);
        }
        if let Some(upgrader) = &self.upgrader
            && let Some(check) = upgrade_api::health_check(upgrader.clone()).await
        {
            checks.push(check);
        }
        Ok(Response::new(proto::HealthResponse {
            healthy: checks.iter().all(|c| c.ok),
            checks: checks
                .into_iter()
                .map(|c| proto::HealthCheck {
                    name: c.name,
                    ok: c.ok,
                    reason: c.reason,
                })
                .collect(),
        }))
    }

    async fn services(
        &self,
        _req: Request<proto::ServicesRequest>,
    ) -> Result<Response<proto::ServicesResponse>, Status> {
        let backend = self.backend.clone();
        let services = blocking(move || backend.services())
            .await?
            .map_err(backend_status)?;
        Ok(Response::new(proto::ServicesResponse {
            services: services
                .into_iter()
                .map(|s| proto::Service {
                    name: s.name,
                    state: s.state,
                    ready: s.ready,
                    pid: s.pid,
                    restarts: s.restarts,
                    since_seconds: s.since_seconds,
                    message: s.message,
                })
                .collect(),
        }))
    }

    async fn service_action(
        &self,
        req: Request<proto::ServiceActionRequest>,
    ) -> Result<Response<proto::ServiceActionResponse>, Status> {
        let req = req.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("no service name given"));
        }
        let op = match req.action() {
            proto::ServiceAction::Start => ServiceOp::Start,
            proto::ServiceAction::Stop => ServiceOp::Stop,
            proto::ServiceAction::Restart => ServiceOp::Restart,
            proto::ServiceAction::Kill => {
                if req.name == "machined" {
                    return Err(Status::failed_precondition(
                        "killing machined would cut this very call off; use `service machined restart`",
                    ));
                }
                let signal = if req.signal.is_empty() {
                    "KILL".to_owned()
                } else {
                    req.signal.clone()
                };
                let backend = self.backend.clone();
                let message = blocking(move || backend.kill(&req.name, &signal))
                    .await?
                    .map_err(backend_status)?;
                return Ok(Response::new(proto::ServiceActionResponse { message }));
            }
            proto::ServiceAction::Unspecified => {
                return Err(Status::invalid_argument(
                    "no action: use start, stop, restart or kill",
                ));
            }
        };
        if req.name == "machined" && op == ServiceOp::Stop {
            return Err(Status::failed_precondition(
                "stopping machined would cut the node off from the API; restart it instead",
            ));
        }
        let backend = self.backend.clone();
        let message = blocking(move || backend.service_action(&req.name, op))
            .await?
            .map_err(backend_status)?;
        Ok(Response::new(proto::ServiceActionResponse { message }))
    }

    type LogsStream = BoxStream<proto::LogLines>;

    async fn logs(
        &self,
        req: Request<proto::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let follow = self.follow_permit(&req)?;
        let req = req.into_inner();
        if req.service.is_empty() {
            return Err(Status::invalid_argument("no service name given"));
        }
        let tail = (req.tail_lines > 0).then_some(req.tail_lines);
        // Following compares each later window with a full earlier one, so fetch a full
        // window first and cut the tail from it.
        let fetch = match (req.follow, tail) {
            (true, Some(t)) => Some(t.max(FOLLOW_WINDOW)),
            (_, t) => t,
        };
        let backend = self.backend.clone();
        let service = req.service.clone();
        let window = blocking(move || backend.logs(&service, fetch))
            .await?
            .map_err(backend_status)?;
        let first: Vec<String> = match tail.and_then(|t| usize::try_from(t).ok()) {
            Some(t) if window.len() > t => {
                window.get(window.len() - t..).unwrap_or_default().to_vec()
            }
            _ => window.clone(),
        };
        let (tx, rx) = mpsc::channel(4);
        let backend = self.backend.clone();
        tokio::spawn(async move {
            let _follow = follow;
            for chunk in first.chunks(LOG_BATCH) {
                if tx
                    .send(Ok(proto::LogLines {
                        lines: chunk.to_vec(),
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if !req.follow {
                return;
            }
            let mut prev = window;
            loop {
                tokio::time::sleep(FOLLOW_INTERVAL).await;
                if tx.is_closed() {
                    return;
                }
                let backend = backend.clone();
                let service = req.service.clone();
                let now = match tokio::task::spawn_blocking(move || {
                    backend.logs(&service, Some(FOLLOW_WINDOW))
                })
                .await
                {
                    Ok(Ok(now)) => now,
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(backend_status(e))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(internal(e))).await;
                        return;
                    }
                };
                let fresh = new_lines(&prev, &now).to_vec();
                if !fresh.is_empty() && tx.send(Ok(proto::LogLines { lines: fresh })).await.is_err()
                {
                    return;
                }
                prev = now;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type DmesgStream = BoxStream<proto::KernelMessages>;

    async fn dmesg(
        &self,
        req: Request<proto::DmesgRequest>,
    ) -> Result<Response<Self::DmesgStream>, Status> {
        let follow = self.follow_permit(&req)?;
        let req = req.into_inner();
        let path = self.paths.kmsg.clone();
        let (mut log, mut first) = blocking(move || {
            let mut log = kmsg::Kmsg::open(&path)?;
            let records = log.read_available(usize::MAX)?;
            Ok::<_, kmsg::KmsgError>((log, records))
        })
        .await?
        .map_err(|e| Status::unavailable(keelson_api::error_chain(&e)))?;
        if req.tail > 0 {
            let keep = usize::try_from(req.tail).unwrap_or(usize::MAX);
            if first.len() > keep {
                first.drain(..first.len() - keep);
            }
        }
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let _follow = follow;
            let mut batch = first;
            loop {
                while !batch.is_empty() {
                    let rest = batch.split_off(batch.len().min(DMESG_BATCH));
                    let messages = batch.into_iter().map(kernel_message).collect();
                    if tx
                        .send(Ok(proto::KernelMessages { messages }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    batch = rest;
                }
                if !req.follow {
                    return;
                }
                tokio::time::sleep(FOLLOW_INTERVAL).await;
                if tx.is_closed() {
                    return;
                }
                match tokio::task::spawn_blocking(move || {
                    let r = log.read_available(DMESG_BATCH * 4);
                    (log, r)
                })
                .await
                {
                    Ok((l, Ok(records))) => {
                        log = l;
                        batch = records;
                    }
                    Ok((_, Err(e))) => {
                        let _ = tx
                            .send(Err(Status::unavailable(keelson_api::error_chain(&e))))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(internal(e))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get(&self, req: Request<proto::GetRequest>) -> Result<Response<proto::Table>, Status> {
        let role = role_of(&req)?;
        let req = req.into_inner();
        let paths = self.paths.clone();
        let table = blocking(move || tables::get(&paths, &req.resource, &req.filter, role))
            .await?
            .map_err(|e| match e {
                tables::TableError::Unknown { .. } => Status::invalid_argument(e.to_string()),
                other => Status::unavailable(keelson_api::error_chain(&other)),
            })?;
        Ok(Response::new(proto::Table {
            columns: table.columns,
            rows: table
                .rows
                .into_iter()
                .map(|cells| proto::Row { cells })
                .collect(),
        }))
    }

    type ReadStream = BoxStream<proto::FileChunk>;

    async fn read(
        &self,
        req: Request<proto::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let role = role_of(&req)?;
        let requested = req.into_inner().path;
        let root = self.read_root.clone();
        let (path, file) = blocking(move || files::open_for(&requested, role, &root))
            .await?
            .map_err(|e| match e {
                files::ReadError::Role { .. } => Status::permission_denied(e.to_string()),
                files::ReadError::NotFound { .. } => Status::not_found(e.to_string()),
                files::ReadError::Io { .. } => Status::unavailable(keelson_api::error_chain(&e)),
                other => Status::invalid_argument(other.to_string()),
            })?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut file = file;
            let mut left = keelson_api::api::MAX_READ;
            loop {
                let p = path.clone();
                let result = tokio::task::spawn_blocking(move || {
                    // One byte more than allowed tells a cut file from one that ends
                    // exactly at the limit.
                    let r = files::read_chunk(&mut file, left.max(1), &p);
                    (file, r)
                })
                .await;
                let (f, chunk) = match result {
                    Ok((f, Ok(chunk))) => (f, chunk),
                    Ok((_, Err(e))) => {
                        let _ = tx
                            .send(Err(Status::unavailable(keelson_api::error_chain(&e))))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(internal(e))).await;
                        return;
                    }
                };
                file = f;
                if chunk.is_empty() {
                    return;
                }
                if left == 0 {
                    let _ = tx
                        .send(Ok(proto::FileChunk {
                            data: Vec::new(),
                            truncated: true,
                        }))
                        .await;
                    return;
                }
                left = left.saturating_sub(chunk.len() as u64);
                if tx
                    .send(Ok(proto::FileChunk {
                        data: chunk,
                        truncated: false,
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn apply_config(
        &self,
        req: Request<proto::ApplyConfigRequest>,
    ) -> Result<Response<proto::ApplyConfigResponse>, Status> {
        let user = req
            .extensions()
            .get::<Authorized>()
            .map(|a| a.user.clone())
            .unwrap_or_default();
        let who = audit::Caller::of(&req);
        let req = req.into_inner();
        let mode = req.mode();
        let mut entry = audit::AuditEntry::now(&who, "apply-config", "", "");
        entry.config_sha256 = Some(audit::sha256_hex(&req.config));
        entry.dry_run = req.dry_run;
        entry.mode = keelson_api::api::apply_mode_name(mode).to_owned();
        let request = ApplyRequest {
            config: req.config,
            mode,
            try_timeout: (req.try_timeout_seconds > 0)
                .then(|| Duration::from_secs(u64::from(req.try_timeout_seconds))),
            dry_run: req.dry_run,
        };
        let result = if self.maintenance {
            self.applier.install_first(request).await
        } else {
            self.applier.apply(request).await
        };
        self.audit(entry, &result).await;
        let applied = result.map_err(apply_status)?;
        if self.maintenance
            && !req.dry_run
            && let Some(tx) = &self.installed
        {
            let _ = tx.try_send(());
        }
        tracing::info!(
            user = ?user,
            mode = keelson_api::api::apply_mode_name(applied.mode),
            dry_run = req.dry_run,
            outcome = %applied.messages.join("; "),
            "apply-config"
        );
        Ok(Response::new(proto::ApplyConfigResponse {
            mode: applied.mode.into(),
            diff: applied.diff,
            messages: applied.messages,
            warnings: applied.warnings,
        }))
    }

    async fn confirm_config(
        &self,
        req: Request<proto::ConfirmConfigRequest>,
    ) -> Result<Response<proto::ConfirmConfigResponse>, Status> {
        let entry = audit::AuditEntry::now(&audit::Caller::of(&req), "confirm", "", "");
        let result = self.applier.confirm().await;
        self.audit(entry, &result).await;
        let message = result.map_err(apply_status)?;
        Ok(Response::new(proto::ConfirmConfigResponse { message }))
    }

    async fn reboot(
        &self,
        _req: Request<proto::RebootRequest>,
    ) -> Result<Response<proto::PowerResponse>, Status> {
        let backend = self.backend.clone();
        let message = blocking(move || backend.power(Power::Reboot))
            .await?
            .map_err(backend_status)?;
        Ok(Response::new(proto::PowerResponse { message }))
    }

    async fn shutdown(
        &self,
        _req: Request<proto::ShutdownRequest>,
    ) -> Result<Response<proto::PowerResponse>, Status> {
        let backend = self.backend.clone();
        let message = blocking(move || backend.power(Power::Poweroff))
            .await?
            .map_err(backend_status)?;
        Ok(Response::new(proto::PowerResponse { message }))
    }

    async fn reset(
        &self,
        req: Request<proto::ResetRequest>,
    ) -> Result<Response<proto::PowerResponse>, Status> {
        let who = audit::Caller::of(&req);
        let force = req.into_inner().force;
        // Recorded before it runs: a reset that goes through wipes STATE and its log.
        let state_dir = self.applier.state_dir().to_path_buf();
        let entry = audit::AuditEntry::now(&who, "reset", "requested", "");
        audit::record_logged(state_dir.clone(), entry).await;
        let result = self.reset_node(force).await;
        if let Err(status) = &result {
            let entry = audit::AuditEntry::now(&who, "reset", "failed", status.message());
            audit::record_logged(state_dir, entry).await;
        }
        let message = result?;
        Ok(Response::new(proto::PowerResponse { message }))
    }

    async fn time(
        &self,
        _req: Request<proto::TimeRequest>,
    ) -> Result<Response<proto::TimeResponse>, Status> {
        Ok(Response::new(etcd_api::time(self.time.as_ref()).await))
    }

    async fn bootstrap(
        &self,
        req: Request<Streaming<proto::BootstrapRequest>>,
    ) -> Result<Response<proto::BootstrapResponse>, Status> {
        let etcd = etcd_api::node(self.etcd.as_ref())?;
        let message = etcd_api::bootstrap(etcd, &self.spool_dir, req.into_inner()).await?;
        Ok(Response::new(proto::BootstrapResponse { message }))
    }

    async fn etcd_members(
        &self,
        _req: Request<proto::EtcdMembersRequest>,
    ) -> Result<Response<proto::EtcdMembersResponse>, Status> {
        let etcd = etcd_api::node(self.etcd.as_ref())?;
        let members = etcd.members().await.map_err(etcd_api::status)?;
        Ok(Response::new(proto::EtcdMembersResponse {
            members: members.iter().map(etcd_api::member).collect(),
        }))
    }

    async fn etcd_status(
        &self,
        _req: Request<proto::EtcdStatusRequest>,
    ) -> Result<Response<proto::EtcdStatusResponse>, Status> {
        let etcd = etcd_api::node(self.etcd.as_ref())?;
        Ok(Response::new(
            etcd.status().await.map_err(etcd_api::status)?,
        ))
    }

    type EtcdSnapshotStream = BoxStream<proto::EtcdSnapshotChunk>;

    async fn etcd_snapshot(
        &self,
        _req: Request<proto::EtcdSnapshotRequest>,
    ) -> Result<Response<Self::EtcdSnapshotStream>, Status> {
        let etcd = etcd_api::node(self.etcd.as_ref())?;
        let (tx, rx) = mpsc::channel(4);
        etcd.snapshot(tx).await.map_err(etcd_api::status)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn etcd_defrag(
        &self,
        _req: Request<proto::EtcdDefragRequest>,
    ) -> Result<Response<proto::EtcdMessageResponse>, Status> {
        let etcd = etcd_api::node(self.etcd.as_ref())?;
        let message = etcd.defrag().await.map_err(etcd_api::status)?;
        Ok(Response::new(proto::EtcdMessageResponse { message }))
    }

    async fn etcd_alarm_list(
        &self,
        _req: Request<proto::EtcdAlarmListRequest>,
    ) -> Result<Response<proto::EtcdAlarmsResponse>, Status> {
        let etcd = etcd_api::node(self.etcd.as_ref())?;
        let alarms = etcd.alarms(false).await.map_err(etcd_api::status)?;
        Ok(Response::new(proto::EtcdAlarmsResponse { alarms }))
    }

    async fn etcd_alarm_disarm(
        &self,
        _req: Request<proto::EtcdAlarmDisarmRequest>,
    ) -> Result<Response<proto::EtcdAlarmsResponse>, Status> {
        let etcd = etcd_api::node(self.etcd.as_ref())?;
        let alarms = etcd.alarms(true).await.map_err(etcd_api::status)?;
        Ok(Response::new(proto::EtcdAlarmsResponse { alarms }))
    }

    async fn etcd_leave(
        &self,
        _req: Request<proto::EtcdLeaveRequest>,
    ) -> Result<Response<proto::EtcdMessageResponse>, Status> {
        let etcd = etcd_api::node(self.etcd.as_ref())?;
        let message = etcd.leave(false).await.map_err(etcd_api::status)?;
        Ok(Response::new(proto::EtcdMessageResponse { message }))
    }

    async fn etcd_remove_member(
        &self,
        req: Request<proto::EtcdRemoveMemberRequest>,
    ) -> Result<Response<proto::EtcdMessageResponse>, Status> {
        let etcd = etcd_api::node(self.etcd.as_ref())?;
        let message = etcd
            .remove_member(&req.into_inner().id)
            .await
            .map_err(etcd_api::status)?;
        Ok(Response::new(proto::EtcdMessageResponse { message }))
    }

    async fn etcd_forfeit_leadership(
        &self,
        _req: Request<proto::EtcdForfeitLeadershipRequest>,
    ) -> Result<Response<proto::EtcdMessageResponse>, Status> {
        let etcd = etcd_api::node(self.etcd.as_ref())?;
        let message = etcd.forfeit_leadership().await.map_err(etcd_api::status)?;
        Ok(Response::new(proto::EtcdMessageResponse { message }))
    }

    type UpgradeStream = BoxStream<proto::UpgradeProgress>;

    async fn upgrade(
        &self,
        req: Request<Streaming<proto::UpgradeRequest>>,
    ) -> Result<Response<Self::UpgradeStream>, Status> {
        let user = caller(&req);
        let upgrader = upgrade_api::engine(self.upgrader.as_ref())?;
        let stream =
            upgrade_api::upgrade(upgrader, self.backend.clone(), req.into_inner(), user).await?;
        Ok(Response::new(stream))
    }

    async fn rollback(
        &self,
        req: Request<proto::RollbackRequest>,
    ) -> Result<Response<proto::RollbackResponse>, Status> {
        let user = caller(&req);
        let upgrader = upgrade_api::engine(self.upgrader.as_ref())?;
        let r = upgrade_api::rollback(upgrader, self.backend.clone(), &user).await?;
        Ok(Response::new(r))
    }

    async fn upgrade_status(
        &self,
        _req: Request<proto::UpgradeStatusRequest>,
    ) -> Result<Response<proto::UpgradeStatusResponse>, Status> {
        let upgrader = upgrade_api::engine(self.upgrader.as_ref())?;
        Ok(Response::new(upgrade_api::status(upgrader).await?))
    }

    async fn kubeconfig(
        &self,
        req: Request<proto::KubeconfigRequest>,
    ) -> Result<Response<proto::KubeconfigResponse>, Status> {
        let user = req.extensions().get::<Authorized>().map(|a| a.user.clone());
        let config = self.applier.current();
        let r = kube_api::kubeconfig(config, user.as_deref().unwrap_or_default()).await?;
        Ok(Response::new(r))
    }

    async fn image_pull(
        &self,
        req: Request<proto::ImagePullRequest>,
    ) -> Result<Response<proto::ImagePullResponse>, Status> {
        let reference = req.into_inner().reference;
        let r = kube_api::image_pull(&self.paths.containerd_socket, &reference).await?;
        Ok(Response::new(r))
    }

    async fn containers(
        &self,
        req: Request<proto::ContainersRequest>,
    ) -> Result<Response<proto::ContainersResponse>, Status> {
        let ns = req.into_inner().namespace;
        let containers = crate::containerd::containers(&self.paths.containerd_socket, &ns).await?;
        Ok(Response::new(proto::ContainersResponse { containers }))
    }

    async fn images(
        &self,
        req: Request<proto::ImagesRequest>,
    ) -> Result<Response<proto::ImagesResponse>, Status> {
        let ns = req.into_inner().namespace;
        let images = crate::containerd::images(&self.paths.containerd_socket, &ns).await?;
        Ok(Response::new(proto::ImagesResponse { images }))
    }

    async fn image_import(
        &self,
        req: Request<Streaming<proto::ImageImportChunk>>,
    ) -> Result<Response<proto::ImageImportResponse>, Status> {
        let role = role_of(&req)?;
        let _one = self.import_lock.try_lock().map_err(|_| {
            Status::aborted(
                "another image import is running on this node; one runs at a time: try again when it has finished",
            )
        })?;
        let mut stream = req.into_inner();
        keelson_api::atomic::create_private_dir(&self.spool_dir)
            .map_err(|e| internal(keelson_api::error_chain(&e)))?;
        remove_stale_spools(&self.spool_dir, "import", "tar");
        let room = spool_room(&self.spool_dir)?;
        let spool = tempfile_in(&self.spool_dir, "import", "tar")?;
        let mut file = tokio::fs::File::from_std(
            spool
                .reopen()
                .map_err(|e| internal(format!("cannot open the spool file: {e}")))?,
        );
        let mut namespace = String::new();
        let mut total: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if namespace.is_empty() && !chunk.namespace.is_empty() {
                namespace = chunk.namespace;
            }
            total += chunk.data.len() as u64;
            if total > MAX_IMAGE_ARCHIVE {
                return Err(Status::resource_exhausted(format!(
                    "the image archive is larger than {} GiB",
                    MAX_IMAGE_ARCHIVE >> 30
                )));
            }
            if total > room {
                return Err(Status::resource_exhausted(format!(
                    "the image archive does not fit on EPHEMERAL: {} spooled to {} with {} MiB free past its reserve; free space there (remove unused images) or import a smaller archive",
                    total,
                    self.spool_dir.display(),
                    room >> 20
                )));
            }
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk.data)
                .await
                .map_err(|e| internal(format!("cannot spool the archive: {e}")))?;
        }
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .map_err(|e| internal(format!("cannot spool the archive: {e}")))?;
        if total == 0 {
            return Err(Status::invalid_argument("the image archive is empty"));
        }
        if namespace.is_empty() {
            namespace = keelson_api::api::DEFAULT_NAMESPACE.into();
        }
        let images = crate::containerd::import_as(
            &self.paths.containerd_socket,
            &namespace,
            spool.path(),
            role,
        )
        .await?;
        Ok(Response::new(proto::ImageImportResponse { images }))
    }
}

impl NodeService {
    /// Records an apply-config or confirm in the audit log ([`audit`]) with its outcome.
    async fn audit<T>(&self, mut entry: audit::AuditEntry, result: &Result<T, ApplyError>) {
        (entry.outcome, entry.detail) = match result {
            Ok(_) => ("ok".to_owned(), String::new()),
            Err(e @ ApplyError::Failed(_)) => ("failed".to_owned(), audit::cut(&e.to_string())),
            Err(e) => ("refused".to_owned(), audit::cut(&e.to_string())),
        };
        audit::record_logged(self.applier.state_dir().to_path_buf(), entry).await;
    }

    /// `reset`: a control plane leaves etcd, then PID 1 wipes the node; its message.
    async fn reset_node(&self, force: bool) -> Result<String, Status> {
        // A control plane leaves etcd first, unless it is the last member; a leave that
        // would break the quorum refuses the reset (without --force).
        let left = match &self.etcd {
            Some(etcd) => etcd.leave_for(force).await.map_err(etcd_api::status)?,
            None => ResetLeave::NotAMember,
        };
        let backend = self.backend.clone();
        let mut message = blocking(move || backend.reset())
            .await?
            .map_err(backend_status)?;
        if let ResetLeave::Left(how) = left {
            message = format!("{how}; {message}");
        }
        Ok(message)
    }
}

/// How many bytes an upload may spool in `dir`: its filesystem's free space less a
/// reserve of 5% of it (at most [`SPOOL_RESERVE_MAX`]).
fn spool_room(dir: &std::path::Path) -> Result<u64, Status> {
    let fs = nix::sys::statvfs::statvfs(dir).map_err(|e| {
        internal(format!(
            "cannot learn the free space of {}: {e}",
            dir.display()
        ))
    })?;
    let block = fs.fragment_size();
    Ok(room_left(
        fs.blocks_available().saturating_mul(block),
        fs.blocks().saturating_mul(block),
    ))
}

/// Bytes that may be spooled with `free` bytes available on a filesystem of `size`.
fn room_left(free: u64, size: u64) -> u64 {
    free.saturating_sub((size / 20).min(SPOOL_RESERVE_MAX))
}

/// Removes the `STEM-*.EXT` spool files a crashed upload left in `dir` (the caller holds
/// the lock that makes it the only upload of that kind).
fn remove_stale_spools(dir: &std::path::Path, stem: &str, ext: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&format!("{stem}-")) && name.ends_with(&format!(".{ext}")) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// A private temporary file `STEM-...EXT` in `dir` (mode 0600), removed when dropped:
/// an upload spooled before it is used (an image archive, an etcd snapshot).
pub(crate) fn tempfile_in(
    dir: &std::path::Path,
    stem: &str,
    ext: &str,
) -> Result<SpoolFile, Status> {
    use std::os::unix::fs::OpenOptionsExt as _;
    for attempt in 0..16u32 {
        let path = dir.join(format!(
            "{stem}-{}-{}-{attempt}.{ext}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(_) => return Ok(SpoolFile { path }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(internal(format!(
                    "cannot create a spool file in {}: {e}",
                    dir.display()
                )));
            }
        }
    }
    Err(internal("cannot create a spool file"))
}

/// A spooled upload, deleted on drop.
#[derive(Debug)]
pub(crate) struct SpoolFile {
    path: PathBuf,
}

impl SpoolFile {
    /// Where it is.
    pub(crate) fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// A handle to write it through.
    pub(crate) fn reopen(&self) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new().write(true).open(&self.path)
    }
}

impl Drop for SpoolFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn following_shows_only_new_lines() {
        assert_eq!(new_lines(&v(&["a", "b"]), &v(&["a", "b", "c"])), v(&["c"]));
        assert_eq!(
            new_lines(&v(&["a", "b", "c"]), &v(&["b", "c", "d", "e"])),
            v(&["d", "e"])
        );
        assert_eq!(
            new_lines(&v(&["a", "b"]), &v(&["a", "b"])),
            Vec::<String>::new()
        );
        assert_eq!(new_lines(&v(&[]), &v(&["x"])), v(&["x"]));
        assert_eq!(new_lines(&v(&["a"]), &v(&["x", "y"])), v(&["x", "y"]));
    }

    #[test]
    fn a_spool_leaves_five_percent_or_256_mib() {
        const GIB: u64 = 1024 * 1024 * 1024;
        // A 1 GiB EPHEMERAL keeps 5% (51.2 MiB); a 100 GiB one 256 MiB.
        assert_eq!(room_left(GIB / 2, GIB), GIB / 2 - GIB / 20);
        assert_eq!(room_left(50 * GIB, 100 * GIB), 50 * GIB - SPOOL_RESERVE_MAX);
        assert_eq!(room_left(SPOOL_RESERVE_MAX, 100 * GIB), 0);
        assert_eq!(room_left(0, 0), 0);
    }
}
