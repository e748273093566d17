//! PID 1's control socket, [`SOCKET`] (`/run/keelson/init.sock`), for machined (and
//! tests): a Unix stream socket, mode 0600 (root only), one JSON request per line and one
//! answer per line, any number of them on a connection, answered in order.
//!
//! What is said on it is the node protocol's ([`keelson_node_protocol::control`], whose
//! module doc lists every request and its answer): each request is its own type, and
//! stage 2 answers it with that request's own answer type ([`Answer::to`]), so PID 1 and
//! machined read and write the same types. This module serves the socket: it reads a
//! line (at most [`MAX_REQUEST`] bytes), parses it, hands the request to the main loop as
//! a [`Call`], and writes back the answer the loop gives; a line that is not a request
//! is refused on the spot and the connection stays open. Reboot, power-off and reset
//! begin [`SHUTDOWN_DELAY`] after their answer, so that the answer reaches the caller
//! (machined) before it is stopped.

use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::oneshot;

use crate::sender::Sender;
use crate::syscalls::Syscalls;

pub use keelson_node_protocol::control::{
    Answer, Info, MAX_REQUEST, Refusal, Request, SHUTDOWN_DELAY, SIGNALS, SOCKET, parse_signal,
    vm_rss_kib,
};

/// One request for the main loop, and where its answer goes.
#[derive(Debug)]
pub struct Call {
    /// The request.
    pub request: Request,
    /// The answer, written back to the connection that asked.
    pub reply: oneshot::Sender<Answer>,
}

/// Bind the socket at `path` (replacing a stale one, mode 0600) and serve it: each
/// request is sent on `events` as a [`Call`] whose answer is written back. Aborting the
/// returned handle closes the socket (its mount, `/run`, is then no longer busy).
pub fn serve(
    sys: &dyn Syscalls,
    path: &Path,
    events: Sender<Call>,
) -> std::io::Result<tokio::task::AbortHandle> {
    if let Some(dir) = path.parent() {
        sys.create_dir_all(dir)?;
    }
    let _ = sys.remove_file(path);
    let listener = UnixListener::bind(path)?;
    sys.set_mode(path, 0o600)?;
    let task = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let events = events.clone();
            tokio::spawn(async move {
                let (read, mut write) = conn.into_split();
                let mut lines = BufReader::new(read);
                let mut line = String::new();
                loop {
                    line.clear();
                    match (&mut lines)
                        .take(MAX_REQUEST as u64)
                        .read_line(&mut line)
                        .await
                    {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let answer = match Request::parse(line.trim()) {
                        Ok(request) => {
                            let (reply, rx) = oneshot::channel();
                            if events.send(Call { request, reply }).is_err() {
                                break;
                            }
                            rx.await
                                .unwrap_or_else(|_| Answer::refused("PID 1 dropped the request"))
                        }
                        Err(e) => Answer::refused(e),
                    };
                    let mut text = answer.line().to_string();
                    text.push('\n');
                    if write.write_all(text.as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(task.abort_handle())
}

#[cfg(test)]
mod tests {
    use super::*;
    use keelson_node_protocol::control::Services;

    #[test]
    fn the_socket_answers_line_by_line() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("run/keelson/init.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Call>();
            serve(&crate::syscalls::Linux, &path, Sender::new(tx))?;
            // The main loop's part: answer list with nothing, anything else with a refusal.
            tokio::spawn(async move {
                while let Some(Call { request, reply }) = rx.recv().await {
                    let _ = reply.send(match request {
                        Request::List(list) => Answer::to(
                            &list,
                            Ok(Services {
                                services: Vec::new(),
                            }),
                        ),
                        other => Answer::refused(format!("refused {}", other.op())),
                    });
                }
            });
            let mut conn = tokio::net::UnixStream::connect(&path).await?;
            conn.write_all(b"{\"op\":\"list\"}\nnonsense\n{\"op\":\"reboot\"}\n")
                .await?;
            conn.shutdown().await?;
            let mut text = String::new();
            conn.read_to_string(&mut text).await?;
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 3, "{text}");
            assert_eq!(lines[0], r#"{"ok":true,"services":[]}"#);
            assert!(lines[1].starts_with(r#"{"ok":false,"error":"not a request"#));
            assert_eq!(lines[2], r#"{"ok":false,"error":"refused reboot"}"#);
            let mode =
                std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path)?.permissions());
            assert_eq!(mode & 0o777, 0o600);
            Ok(())
        })
    }
}
