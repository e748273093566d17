//! The node API's etcd and time methods: `time`, `bootstrap` and `etcd ...`, each a thin
//! translation between the wire types and [`crate::etcd`] / [`crate::timesync`].

use std::time::Duration;

use keelson_api::api::proto;
use tokio_stream::StreamExt as _;
use tonic::{Status, Streaming};

use crate::etcd::{EtcdError, EtcdNode};
use crate::server::service::{SpoolFile, tempfile_in};
use crate::timesync::{self, TimeSync};

/// How long `time` waits for a server's answer.
const TIME_QUERY: Duration = Duration::from_secs(3);
/// The largest snapshot `bootstrap --recover-from` takes (8 GiB, etcd's largest quota).
const MAX_SNAPSHOT: u64 = 8 << 30;

/// The status an etcd error maps to.
pub fn status(e: EtcdError) -> Status {
    let message = e.to_string();
    match e {
        EtcdError::Refused(_) => Status::failed_precondition(message),
        EtcdError::Connect { .. } | EtcdError::Call { .. } | EtcdError::Init(_) => {
            Status::unavailable(message)
        }
        EtcdError::Pki(_) | EtcdError::File { .. } => Status::internal(message),
    }
}

/// This node's etcd, or why a worker has none.
pub fn node(etcd: Option<&EtcdNode>) -> Result<&EtcdNode, Status> {
    etcd.ok_or_else(|| {
        Status::failed_precondition(
            "this node is a worker: etcd runs on control planes; ask one of them (--nodes)",
        )
    })
}

/// `machinectl time`: the sync status, and the offset measured now.
pub async fn time(sync: Option<&TimeSync>) -> proto::TimeResponse {
    let Some(sync) = sync else {
        return proto::TimeResponse {
            error: "time sync is not running (maintenance mode)".into(),
            ..Default::default()
        };
    };
    let status = sync.status();
    let mut out = proto::TimeResponse {
        servers: status.servers.clone(),
        synced: status.synced,
        synced_from: status.server.clone().unwrap_or_default(),
        synced_offset_seconds: status.offset_seconds.unwrap_or_default(),
        synced_at_unix: status
            .last_sync
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_secs()).ok())
            .unwrap_or_default(),
        error: status.last_error.clone().unwrap_or_default(),
        ..Default::default()
    };
    let mut errors = Vec::new();
    for server in &status.servers {
        match timesync::query(server, TIME_QUERY).await {
            Ok(m) => {
                out.measured_from = format!("{} ({})", m.server, m.address);
                out.offset_seconds = m.offset_seconds;
                out.round_trip_seconds = m.round_trip_seconds;
                errors.clear();
                break;
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        out.error = errors.join("; ");
    }
    out
}

/// `machinectl bootstrap [--recover-from FILE]`: the snapshot, if any, is spooled to
/// EPHEMERAL first, then the cluster is started from it.
pub async fn bootstrap(
    etcd: &EtcdNode,
    spool_dir: &std::path::Path,
    mut stream: Streaming<proto::BootstrapRequest>,
) -> Result<String, Status> {
    let mut recover = false;
    let mut spool: Option<(SpoolFile, tokio::fs::File)> = None;
    let mut total: u64 = 0;
    let mut first = true;
    while let Some(message) = stream.next().await {
        let message = message?;
        if first {
            recover = message.recover;
            first = false;
        }
        if message.snapshot.is_empty() {
            continue;
        }
        if !recover {
            return Err(Status::invalid_argument(
                "the request carries snapshot bytes without `recover`: use `machinectl bootstrap --recover-from FILE`",
            ));
        }
        total += message.snapshot.len() as u64;
        if total > MAX_SNAPSHOT {
            return Err(Status::resource_exhausted(format!(
                "the snapshot is larger than {} GiB",
                MAX_SNAPSHOT >> 30
            )));
        }
        if spool.is_none() {
            keelson_api::atomic::create_private_dir(spool_dir)
                .map_err(|e| Status::internal(keelson_api::error_chain(&e)))?;
            let file = tempfile_in(spool_dir, "etcd-restore", "db")?;
            let handle = file
                .reopen()
                .map_err(|e| Status::internal(format!("cannot open the spool file: {e}")))?;
            spool = Some((file, tokio::fs::File::from_std(handle)));
        }
        if let Some((_, file)) = spool.as_mut() {
            tokio::io::AsyncWriteExt::write_all(file, &message.snapshot)
                .await
                .map_err(|e| Status::internal(format!("cannot spool the snapshot: {e}")))?;
        }
    }
    if recover && total == 0 {
        return Err(Status::invalid_argument(
            "`--recover-from` sent no bytes: the snapshot file is empty",
        ));
    }
    if let Some((_, file)) = spool.as_mut() {
        tokio::io::AsyncWriteExt::flush(file)
            .await
            .map_err(|e| Status::internal(format!("cannot spool the snapshot: {e}")))?;
    }
    let path = spool.as_ref().map(|(s, _)| s.path().to_path_buf());
    etcd.bootstrap(path.as_deref()).await.map_err(status)
}

/// The members as the wire shows them.
pub fn member(m: &crate::etcd::plan::Member) -> proto::EtcdMember {
    proto::EtcdMember {
        id: format!("{:x}", m.id),
        name: m.name.clone(),
        peer_urls: m.peer_urls.clone(),
        client_urls: m.client_urls.clone(),
        learner: m.learner,
        started: m.started(),
    }
}
