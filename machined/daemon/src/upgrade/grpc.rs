//! The engine on the wire: [`serve`] is the whole of the server's `Upgrade` handler
//! between the request stream and the progress stream, and [`forward_data`] the part that
//! turns the requests' `data` into the engine's chunks (for a server that wants its own).

use hyper::body::Bytes;
use keelson_api::api::proto;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::Status;

use super::{BundleSource, UpgradeOptions, Upgrader};

/// The `Upgrade` call's answer stream.
pub type ProgressStream = ReceiverStream<Result<proto::UpgradeProgress, Status>>;

/// Forwards the `data` of `requests` to the engine's chunk channel; a broken stream ends
/// it with why.
pub fn forward_data<S>(mut requests: S) -> mpsc::Receiver<Result<Bytes, String>>
where
    S: Stream<Item = Result<proto::UpgradeRequest, Status>> + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        while let Some(item) = requests.next().await {
            let chunk = match item {
                Ok(r) if r.data.is_empty() => continue,
                Ok(r) => Ok(Bytes::from(r.data)),
                Err(status) => Err(format!(
                    "the client's stream broke ({}: {})",
                    status.code(),
                    status.message()
                )),
            };
            let broke = chunk.is_err();
            if tx.send(chunk).await.is_err() || broke {
                return;
            }
        }
    });
    rx
}

/// Serves one `Upgrade` call: the first message's options (and any `data` it carries),
/// then the bundle from the rest of the stream or from `options.url`. Progress goes out
/// as it comes; the last message has `done_all` (or the stream ends with the error's
/// status, [`super::UpgradeError::to_status`]). When the upgrade wants a reboot,
/// `reboot` runs on the blocking pool before the last message: the server passes
/// `move || backend.power(Power::Reboot)` (PID 1 answers at once and reboots 1 s later,
/// so the last message still reaches the client).
pub async fn serve<S, R>(
    upgrader: Upgrader,
    mut requests: S,
    reboot: R,
) -> Result<ProgressStream, Status>
where
    S: Stream<Item = Result<proto::UpgradeRequest, Status>> + Send + Unpin + 'static,
    R: FnOnce() -> Result<String, String> + Send + 'static,
{
    let first = requests.next().await.ok_or_else(|| {
        Status::invalid_argument(
            "the upgrade stream was empty: its first message must carry the options",
        )
    })??;
    let Some(options) = first.options else {
        return Err(Status::invalid_argument(
            "the upgrade stream's first message must carry the options",
        ));
    };
    let first_data = first.data;
    let chunks = forward_data(
        tokio_stream::iter((!first_data.is_empty()).then(|| {
            Ok(proto::UpgradeRequest {
                options: None,
                data: first_data,
            })
        }))
        .chain(requests),
    );
    let source = BundleSource::from_options(&options, chunks);
    let engine_options = UpgradeOptions::from(&options);
    let (out, answer) = mpsc::channel(64);
    tokio::spawn(async move {
        let (progress, mut reports) = mpsc::channel(64);
        let forward = {
            let out = out.clone();
            async move {
                while let Some(p) = reports.recv().await {
                    // A client that went away does not stop the upgrade.
                    let _ = out.send(Ok(proto::UpgradeProgress::from(p))).await;
                }
            }
        };
        let (result, ()) =
            tokio::join!(upgrader.upgrade(source, engine_options, progress), forward);
        let last = match result {
            Ok(done) if done.rebooting => match tokio::task::spawn_blocking(reboot).await {
                Ok(Ok(_)) => Ok(done.into()),
                Ok(Err(e)) => Err(reboot_failed(&done.version, &done.slot, &e)),
                Err(e) => Err(reboot_failed(&done.version, &done.slot, &e.to_string())),
            },
            Ok(done) => Ok(done.into()),
            Err(e) => Err(e.to_status()),
        };
        let _ = out.send(last).await;
    });
    Ok(ReceiverStream::new(answer))
}

fn reboot_failed(version: &str, slot: &str, why: &str) -> Status {
    Status::unavailable(format!(
        "{version} is in slot {slot} and boots next, but PID 1 could not be asked to reboot ({why}): reboot the node with `machinectl reboot`"
    ))
}
