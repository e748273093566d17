//! The node API's upgrade methods: `Upgrade`, `Rollback` and `UpgradeStatus`, a thin
//! translation between the wire and the engine ([`crate::upgrade::Upgrader`]).
//!
//! `Upgrade` reads the first message (its options; a request without them is refused),
//! then forwards the `data` of the messages after it to the engine, or lets the engine
//! fetch `options.url`. The engine's progress goes out as `UpgradeProgress` messages, and
//! the last one carries `done_all` with the version, the slot and whether the node
//! reboots. The engine never reboots: when it says so, PID 1 is asked, as `Reboot` asks
//! it, once that last message has been handed to the connection (or after
//! [`DELIVERY_WAIT`]) and [`AFTER_DELIVERY`] more, so that the client reads it before the
//! node goes down. `Rollback` asks the engine, then PID 1 (whose reboot begins a second
//! after its answer, as for `Reboot`). Every call is logged with its caller.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Bytes;
use keelson_api::api::proto;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Status, Streaming};

use crate::backend::{NodeBackend, Power};
use crate::upgrade::{BundleSource, Progress, UpgradeOptions, Upgrader};
use keelson_node_protocol::upgrade::COMEBACK_SERVICES;

/// How long the server waits for the last message to be taken by the connection before
/// it asks PID 1 to reboot anyway.
pub const DELIVERY_WAIT: Duration = Duration::from_secs(5);
/// How long after the last message was taken PID 1 is asked to reboot. PID 1's reboot
/// begins a second after it is asked, as for `Reboot`, whose answer has only that second
/// to reach the client; this is a margin on top for the connection's last writes (it was
/// 500 ms until 2026-12-06: time the upgrade spent idle that a plain reboot does not).
pub const AFTER_DELIVERY: Duration = Duration::from_millis(100);

/// Chunks of the bundle in flight between the request stream and the engine.
const CHUNKS_IN_FLIGHT: usize = 8;
/// Progress messages in flight to the client.
const MESSAGES_IN_FLIGHT: usize = 64;

/// The stream of an upgrade's answers.
pub type ProgressStream =
    Pin<Box<dyn Stream<Item = Result<proto::UpgradeProgress, Status>> + Send>>;

/// The engine, or the refusal of a machined started without one (in-process tests).
pub fn engine(upgrader: Option<&Upgrader>) -> Result<Upgrader, Status> {
    upgrader.cloned().ok_or_else(|| {
        Status::unimplemented(
            "this machined was started without the upgrade engine (a test server); upgrades run on a node",
        )
    })
}

/// `Upgrade`: see the module's documentation. `user` is the caller, for the log.
pub async fn upgrade(
    upgrader: Upgrader,
    backend: Arc<dyn NodeBackend>,
    mut requests: Streaming<proto::UpgradeRequest>,
    user: String,
) -> Result<ProgressStream, Status> {
    let first = match requests.next().await {
        Some(first) => first?,
        None => {
            return Err(Status::invalid_argument(
                "the upgrade request carried no message: its first message must carry the options (UpgradeOptions)",
            ));
        }
    };
    let Some(options) = first.options else {
        return Err(Status::invalid_argument(
            "the upgrade request's first message carried no options: it must carry UpgradeOptions (with the URL to fetch, or the size of the bundle the next messages carry)",
        ));
    };
    tracing::info!(
        user = ?user,
        url = %options.url,
        size = options.size,
        stage = options.stage,
        dry_run = options.dry_run,
        force = options.force,
        allow_downgrade = options.allow_downgrade,
        health_timeout_seconds = options.health_timeout_seconds,
        "upgrade asked"
    );
    let (chunk_tx, chunk_rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    let source = BundleSource::from_options(&options, chunk_rx);
    if options.url.is_empty() {
        tokio::spawn(forward_chunks(first.data, requests, chunk_tx));
    } else if !first.data.is_empty() {
        return Err(Status::invalid_argument(
            "the upgrade request names a URL and carries bundle bytes too: send one or the other",
        ));
    }
    let (out_tx, out_rx) = mpsc::channel(MESSAGES_IN_FLIGHT);
    let (taken_tx, taken_rx) = oneshot::channel();
    let mut options = UpgradeOptions::from(&options);
    options.expect_ready = ready_before(backend.clone()).await;
    tokio::spawn(async move {
        let rebooting = run_engine(&upgrader, source, options, out_tx, &user).await;
        if rebooting {
            reboot_after_delivery(backend, taken_rx, &user).await;
        }
    });
    Ok(Box::pin(Delivered {
        inner: ReceiverStream::new(out_rx),
        taken: Some(taken_tx),
    }))
}

/// Forwards the bundle's bytes from the request stream to the engine: `first` (the data of
/// the first message, usually none) and every later message's `data`. A broken stream is
/// passed on as an error, so the engine stops instead of taking a cut bundle for a whole
/// one.
async fn forward_chunks(
    first: Vec<u8>,
    mut requests: Streaming<proto::UpgradeRequest>,
    chunks: mpsc::Sender<Result<Bytes, String>>,
) {
    if !first.is_empty() && chunks.send(Ok(Bytes::from(first))).await.is_err() {
        return;
    }
    while let Some(message) = requests.next().await {
        let piece = match message {
            Ok(m) if m.data.is_empty() => continue,
            Ok(m) => Ok(Bytes::from(m.data)),
            Err(status) => Err(format!(
                "the upload broke off ({}: {})",
                keelson_api::client::code_name(status.code()),
                status.message()
            )),
        };
        let broken = piece.is_err();
        if chunks.send(piece).await.is_err() || broken {
            return;
        }
    }
}

/// Runs the engine, forwarding its progress and then its outcome to the client; whether
/// the node must now reboot.
async fn run_engine(
    upgrader: &Upgrader,
    source: BundleSource,
    options: UpgradeOptions,
    out: mpsc::Sender<Result<proto::UpgradeProgress, Status>>,
    user: &str,
) -> bool {
    let (progress_tx, mut progress_rx) = mpsc::channel::<Progress>(MESSAGES_IN_FLIGHT);
    let engine = upgrader.upgrade(source, options, progress_tx);
    tokio::pin!(engine);
    let result = loop {
        tokio::select! {
            biased;
            Some(p) = progress_rx.recv() => {
                // A client that went away changes nothing: the engine finishes its work
                // (a cancelled write would leave the attempt in progress).
                let _ = out.send(Ok(p.into())).await;
            }
            result = &mut engine => break result,
        }
    };
    while let Ok(p) = progress_rx.try_recv() {
        let _ = out.send(Ok(p.into())).await;
    }
    match result {
        Ok(done) => {
            tracing::info!(
                user = ?user,
                version = %done.version,
                slot = %done.slot,
                rebooting = done.rebooting,
                dry_run = done.dry_run,
                "upgrade done"
            );
            let rebooting = done.rebooting;
            let _ = out.send(Ok(done.into())).await;
            rebooting
        }
        Err(e) => {
            let status = e.to_status();
            tracing::warn!(user = ?user, error = %status.message(), "upgrade failed");
            let _ = out.send(Err(status)).await;
            false
        }
    }
}

/// Asks PID 1 to reboot once the last message was taken by the connection (at most
/// [`DELIVERY_WAIT`]), and [`AFTER_DELIVERY`] later.
async fn reboot_after_delivery(
    backend: Arc<dyn NodeBackend>,
    taken: oneshot::Receiver<()>,
    user: &str,
) {
    let _ = tokio::time::timeout(DELIVERY_WAIT, taken).await;
    tokio::time::sleep(AFTER_DELIVERY).await;
    match tokio::task::spawn_blocking(move || backend.power(Power::Reboot)).await {
        Ok(Ok(message)) => {
            tracing::info!(user = ?user, outcome = %message, "upgrade: rebooting into the new slot");
        }
        Ok(Err(e)) => tracing::error!(
            user = ?user,
            error = %keelson_api::error_chain(&e),
            "upgrade: the new slot is installed but PID 1 did not reboot; it boots at the next reboot (`machinectl reboot`)"
        ),
        Err(e) => tracing::error!(user = ?user, error = %e, "upgrade: the reboot task died"),
    }
}

/// The answers' stream, which says when it was read to its end or dropped (the
/// connection is done with it).
struct Delivered<S> {
    inner: S,
    taken: Option<oneshot::Sender<()>>,
}

impl<S> Delivered<S> {
    fn taken(&mut self) {
        if let Some(tx) = self.taken.take() {
            let _ = tx.send(());
        }
    }
}

impl<S: Stream + Unpin> Stream for Delivered<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let next = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(None) = next {
            self.taken();
        }
        next
    }
}

impl<S> Drop for Delivered<S> {
    fn drop(&mut self) {
        self.taken();
    }
}

/// The services of [`COMEBACK_SERVICES`] that PID 1 says are ready now: the slot the node
/// boots next must bring them back before it is blessed. If PID 1 cannot be asked, none
/// (the upgrade goes on; the new slot is then judged on containerd and machined alone).
async fn ready_before(backend: Arc<dyn NodeBackend>) -> Vec<String> {
    let services = match tokio::task::spawn_blocking(move || backend.services()).await {
        Ok(asked) => asked.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match services {
        Ok(services) => services
            .into_iter()
            .filter(|s| s.ready && COMEBACK_SERVICES.contains(&s.name.as_str()))
            .map(|s| s.name)
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "upgrade: PID 1's services unknown; the new slot is judged without etcd and the kubelet");
            Vec::new()
        }
    }
}

/// `Rollback`: the engine makes the other slot boot next, then PID 1 reboots (a second
/// after its answer, so this answer reaches the client first).
pub async fn rollback(
    upgrader: Upgrader,
    backend: Arc<dyn NodeBackend>,
    user: &str,
) -> Result<proto::RollbackResponse, Status> {
    tracing::info!(user = ?user, "rollback asked");
    let expect_ready = ready_before(backend.clone()).await;
    let done = tokio::task::spawn_blocking(move || upgrader.rollback(expect_ready))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| {
            let status = e.to_status();
            tracing::warn!(user = ?user, error = %status.message(), "rollback refused");
            status
        })?;
    let message = tokio::task::spawn_blocking(move || backend.power(Power::Reboot))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| {
            Status::unavailable(format!(
                "slot {} ({}) boots next, but PID 1 did not reboot: {}; reboot the node (`machinectl reboot`)",
                done.slot,
                done.version,
                keelson_api::error_chain(&e)
            ))
        })?;
    tracing::info!(user = ?user, version = %done.version, slot = %done.slot, outcome = %message, "rollback: rebooting into the other slot");
    Ok(done.into())
}

/// What `health` says of upgrades: the newest attempt (a failed one with its version,
/// phase and why), or `None` when there was none or the status cannot be read. Always
/// `ok`: a node that fell back to its previous slot is as healthy as before; the check
/// says what failed so that nobody has to dig for it.
pub async fn health_check(upgrader: Upgrader) -> Option<crate::node::health::Check> {
    let status = tokio::task::spawn_blocking(move || upgrader.status())
        .await
        .ok()?
        .ok()?;
    let s: proto::UpgradeStatusResponse = status.into();
    health_reason(&s).map(|reason| crate::node::health::Check {
        name: "upgrade".into(),
        ok: true,
        reason,
    })
}

/// The `upgrade` health check's reason for a status (`None` without an attempt).
pub fn health_reason(s: &proto::UpgradeStatusResponse) -> Option<String> {
    if s.to_version.is_empty() {
        return None;
    }
    let what = if s.rollback { "rollback" } else { "upgrade" };
    let running = s
        .slots
        .iter()
        .find(|slot| slot.booted)
        .map(|slot| format!("; running {} from slot {}", slot.version, slot.slot))
        .unwrap_or_default();
    // Only a version that failed as a version (its slot given up by the loader) is
    // refused; an upgrade cut short (a power cut during the transfer) is not.
    let refused = if s.failed.iter().any(|f| f.version == s.to_version) {
        format!("; {} is refused here until forced", s.to_version)
    } else {
        String::new()
    };
    Some(match s.outcome.as_str() {
        "failed" => format!(
            "the {what} to {} failed at {}: {}{refused}{running}",
            s.to_version, s.failed_phase, s.failed_reason
        ),
        outcome => format!(
            "the {what} from {} to {} (slot {}) is {outcome}{running}",
            s.from_version, s.to_version, s.to_slot
        ),
    })
}

/// `UpgradeStatus`: the slots and STATE's record.
pub async fn status(upgrader: Upgrader) -> Result<proto::UpgradeStatusResponse, Status> {
    let status = tokio::task::spawn_blocking(move || upgrader.status())
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| e.to_status())?;
    Ok(status.into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn health_names_a_failed_version() {
        let mut s = proto::UpgradeStatusResponse::default();
        assert_eq!(health_reason(&s), None);
        s.slots = vec![proto::SlotStatus {
            slot: "b".into(),
            version: "0.2.0".into(),
            booted: true,
            ..proto::SlotStatus::default()
        }];
        s.from_version = "0.2.0".into();
        s.to_version = "0.3.0".into();
        s.to_slot = "a".into();
        s.outcome = "failed".into();
        s.failed_phase = "stage2".into();
        s.failed_reason = "the kernel or stage 1 never reached stage 2".into();
        s.failed = vec![proto::FailedVersion {
            version: "0.3.0".into(),
            ..proto::FailedVersion::default()
        }];
        assert_eq!(
            health_reason(&s).unwrap(),
            "the upgrade to 0.3.0 failed at stage2: the kernel or stage 1 never reached stage 2; 0.3.0 is refused here until forced; running 0.2.0 from slot b"
        );
        s.failed.clear();
        assert!(
            !health_reason(&s).unwrap().contains("refused"),
            "an interrupted upgrade is not a refused version"
        );
        s.outcome = "blessed".into();
        assert_eq!(
            health_reason(&s).unwrap(),
            "the upgrade from 0.2.0 to 0.3.0 (slot a) is blessed; running 0.2.0 from slot b"
        );
    }

    #[test]
    fn the_stream_says_when_it_was_read_to_its_end() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (tx, rx) = mpsc::channel::<u32>(4);
            let (taken_tx, mut taken_rx) = oneshot::channel();
            let mut stream = Delivered {
                inner: ReceiverStream::new(rx),
                taken: Some(taken_tx),
            };
            tx.send(1).await.unwrap();
            drop(tx);
            assert_eq!(stream.next().await, Some(1));
            assert!(taken_rx.try_recv().is_err(), "not before the end");
            assert_eq!(stream.next().await, None);
            assert!(taken_rx.try_recv().is_ok());

            // A stream the connection drops (the client went away) says so too.
            let (_tx, rx) = mpsc::channel::<u32>(4);
            let (taken_tx, taken_rx) = oneshot::channel();
            drop(Delivered {
                inner: ReceiverStream::new(rx),
                taken: Some(taken_tx),
            });
            assert!(taken_rx.await.is_ok());
        });
    }
}
