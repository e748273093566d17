//! Readiness checks: whether a started service is ready, as its [`Readiness`] says (a
//! Unix socket or a TCP port that accepts, an HTTP/2 server that answers), and the wait for it that
//! the runner starts after each spawn.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::Readiness;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
const H2_EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
/// How long one check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between two checks: short, because the wait after the socket appears is boot
/// time (half the interval on average), and a check before it exists is one failed
/// `connect(2)`.
const CHECK_INTERVAL: Duration = Duration::from_millis(20);

/// One readiness check.
pub async fn check(readiness: &Readiness) -> Result<(), String> {
    match readiness {
        Readiness::Started => Ok(()),
        Readiness::UnixSocket(path) => UnixStream::connect(path)
            .await
            .map(drop)
            .map_err(|e| format!("cannot connect to {}: {e}", path.display())),
        Readiness::Tcp(addr) => {
            match tokio::time::timeout(CHECK_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("cannot connect to {addr}: {e}")),
                Err(_) => Err(format!(
                    "{addr} accepted no connection within {} s",
                    CHECK_TIMEOUT.as_secs()
                )),
            }
        }
        Readiness::HttpGet(addr, path) => {
            match tokio::time::timeout(CHECK_TIMEOUT, http_get_ok(*addr, path)).await {
                Ok(result) => result,
                Err(_) => Err(format!(
                    "http://{addr}{path} gave no answer within {} s",
                    CHECK_TIMEOUT.as_secs()
                )),
            }
        }
        Readiness::Http2Socket(path) => {
            match tokio::time::timeout(CHECK_TIMEOUT, http2_hello(path)).await {
                Ok(result) => result,
                Err(_) => Err(format!(
                    "{} accepted no HTTP/2 exchange within {} s",
                    path.display(),
                    CHECK_TIMEOUT.as_secs()
                )),
            }
        }
    }
}

/// `GET path` over HTTP/1.0 on `addr`; ready when the status line says 200. Written by
/// hand because it is one request line and one status line to a server on loopback that
/// we start ourselves: only the first line of the answer is read, and at most 1 KiB.
async fn http_get_ok(addr: std::net::SocketAddr, path: &str) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("cannot send to {addr}: {e}"))?;
    let mut head = Vec::with_capacity(128);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("cannot read from {addr}: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line.lines().next().unwrap_or_default();
    let mut words = status.split_whitespace();
    match (words.next(), words.next()) {
        (Some(version), Some("200")) if version.starts_with("HTTP/1.") => Ok(()),
        _ => Err(format!("http://{addr}{path} answered {status:?}, not 200")),
    }
}

/// Send the HTTP/2 preface and a SETTINGS frame; the server's first frame must be its
/// SETTINGS (RFC 9113 §3.4), as every gRPC server sends.
async fn http2_hello(path: &Path) -> Result<(), String> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
    let mut hello = H2_PREFACE.to_vec();
    hello.extend_from_slice(&H2_EMPTY_SETTINGS);
    stream
        .write_all(&hello)
        .await
        .map_err(|e| format!("cannot write to {}: {e}", path.display()))?;
    let mut header = [0u8; 9];
    stream
        .read_exact(&mut header)
        .await
        .map_err(|e| format!("{} closed without an HTTP/2 answer: {e}", path.display()))?;
    let stream_id = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
    if header[3] == 4 && stream_id == 0 {
        Ok(())
    } else {
        Err(format!(
            "{} answered with frame type {} on stream {stream_id}, not SETTINGS: not an HTTP/2 server",
            path.display(),
            header[3]
        ))
    }
}

/// Check until ready, or until `timeout` has passed (then the last reason is returned).
pub async fn wait_ready(readiness: &Readiness, timeout: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let why = match check(readiness).await {
            Ok(()) => return Ok(()),
            Err(why) => why,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("not ready within {} s: {why}", timeout.as_secs()));
        }
        tokio::time::sleep(CHECK_INTERVAL).await;
    }
}

#[cfg(test)]
// Tests build their fixtures on disk.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }

    /// A server on a Unix socket that reads what the client sends and answers `reply`.
    async fn serve_once(listener: UnixListener, reply: &'static [u8]) {
        if let Ok((mut conn, _)) = listener.accept().await {
            let mut got = vec![0u8; H2_PREFACE.len() + 9];
            if conn.read_exact(&mut got).await.is_ok() && got.starts_with(H2_PREFACE) {
                let _ = conn.write_all(reply).await;
            }
        }
    }

    #[test]
    fn the_http_check_wants_a_200() -> std::io::Result<()> {
        runtime()?.block_on(async {
            async fn answer_once(listener: tokio::net::TcpListener, reply: &'static [u8]) {
                if let Ok((mut conn, _)) = listener.accept().await {
                    let mut got = [0u8; 256];
                    let _ = conn.read(&mut got).await;
                    let _ = conn.write_all(reply).await;
                }
            }
            for (reply, ok) in [
                (&b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"[..], true),
                (&b"HTTP/1.1 500 Internal Server Error\r\n\r\n"[..], false),
                (&b"not http at all"[..], false),
            ] {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?;
                let server = tokio::spawn(answer_once(listener, reply));
                let answer = check(&Readiness::HttpGet(addr, "/healthz".into())).await;
                assert_eq!(answer.is_ok(), ok, "{answer:?}");
                let _ = server.await;
            }
            Ok(())
        })
    }

    #[test]
    fn the_http2_check_wants_a_settings_frame() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        runtime()?.block_on(async {
            let sock = dir.path().join("h2.sock");
            let missing = check(&Readiness::Http2Socket(sock.clone())).await;
            assert!(missing.is_err_and(|e| e.starts_with("cannot connect to")));

            // A real server's first frame: SETTINGS with one setting (6 bytes).
            let settings: &'static [u8] = &[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100];
            let listener = UnixListener::bind(&sock)?;
            let server = tokio::spawn(serve_once(listener, settings));
            assert_eq!(check(&Readiness::Http2Socket(sock.clone())).await, Ok(()));
            let _ = server.await;

            // Something that speaks HTTP/1.1 is not ready.
            std::fs::remove_file(&sock)?;
            let listener = UnixListener::bind(&sock)?;
            let server = tokio::spawn(serve_once(listener, b"HTTP/1.1 400 Bad Request\r\n\r\n"));
            let answer = check(&Readiness::Http2Socket(sock.clone())).await;
            assert!(
                answer
                    .as_ref()
                    .is_err_and(|e| e.contains("not an HTTP/2 server")),
                "{answer:?}"
            );
            let _ = server.await;

            // A plain socket check only needs the connection.
            let listener = UnixListener::bind(dir.path().join("plain.sock"))?;
            let plain = Readiness::UnixSocket(dir.path().join("plain.sock"));
            assert_eq!(check(&plain).await, Ok(()));
            drop(listener);
            let late = wait_ready(
                &Readiness::UnixSocket(dir.path().join("none")),
                Duration::from_millis(300),
            )
            .await;
            assert!(late.is_err_and(|e| e.starts_with("not ready within 0 s")));

            // A TCP port: ready once something listens there, not before.
            let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
            let addr = tcp.local_addr()?;
            assert_eq!(check(&Readiness::Tcp(addr)).await, Ok(()));
            drop(tcp);
            let closed = check(&Readiness::Tcp(addr)).await;
            assert!(closed.is_err_and(|e| e.contains(&addr.to_string())));
            Ok(())
        })
    }
}
