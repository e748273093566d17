//! A bundle fetched from an `http://` or `https://` URL, streamed into the engine as it
//! arrives (the bundle is never kept whole). The same stack as the kubelet's download
//! (`kubernetes::fetch`): hyper 1 over HTTP/1.1, one request per connection, rustls with
//! the `ring` provider and the web's public roots from `webpki-roots` (the image has no CA
//! bundle; a bundle served over plain HTTP is guarded by its signature and sums anyway).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// How many redirects a fetch follows.
const MAX_REDIRECTS: usize = 5;
/// The longest wait for a connection, the response's head or the next piece of body.
const IDLE: Duration = Duration::from_secs(60);

/// A chunk of the bundle, or why the transfer stopped.
pub type Chunk = Result<Bytes, String>;

/// Starts fetching `url`; the body's pieces arrive on the receiver, an error ends it.
/// Dropping the receiver ends the fetch.
pub fn spawn(url: String) -> mpsc::Receiver<Chunk> {
    let roots = Arc::new(rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    });
    spawn_trusting(url, roots)
}

/// [`spawn`] with HTTPS servers trusted through `roots`.
pub fn spawn_trusting(url: String, roots: Arc<rustls::RootCertStore>) -> mpsc::Receiver<Chunk> {
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        if let Err(reason) = fetch(&url, &roots, &tx).await {
            let _ = tx.send(Err(reason)).await;
        }
    });
    rx
}

async fn fetch(
    url: &str,
    roots: &Arc<rustls::RootCertStore>,
    tx: &mpsc::Sender<Chunk>,
) -> Result<(), String> {
    let mut current = url.to_owned();
    for _ in 0..=MAX_REDIRECTS {
        let uri: Uri = current
            .parse()
            .map_err(|_| format!("{current} is not a valid URL"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(format!(
                "{current}: only http:// and https:// URLs with a host are supported"
            ));
        }
        let response = tokio::time::timeout(IDLE, request(&uri, roots))
            .await
            .map_err(|_| format!("{current} did not answer within {IDLE:?}: check the server and the node's network"))??;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(http::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| format!("{current} answered {status} without a Location"))?;
            current = crate::kubernetes::fetch::resolve_location(&uri, location);
            continue;
        }
        if !status.is_success() {
            return Err(format!(
                "{current} answered {status}: check the URL (the bundle is keelson-<arch>.bundle next to the image)"
            ));
        }
        let mut body = response.into_body();
        loop {
            let frame = tokio::time::timeout(IDLE, body.frame())
                .await
                .map_err(|_| format!("{current} sent nothing for {IDLE:?}: check the server and the node's network, then retry"))?;
            let Some(frame) = frame else { return Ok(()) };
            let frame = frame.map_err(|e| format!("the HTTP body from {current} broke: {e}"))?;
            if let Ok(data) = frame.into_data()
                && tx.send(Ok(data)).await.is_err()
            {
                // The engine stopped reading (a refusal): nothing more to fetch.
                return Ok(());
            }
        }
    }
    Err(format!(
        "{url}: more than {MAX_REDIRECTS} redirects; give the final location"
    ))
}

async fn request(
    uri: &Uri,
    roots: &Arc<rustls::RootCertStore>,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    let https = uri.scheme_str() == Some("https");
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = connect(&host, port).await?;
    let request = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(
            http::header::HOST,
            uri.authority().map_or(host.as_str(), |a| a.as_str()),
        )
        .header(http::header::USER_AGENT, "keelson-machined")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("cannot make a request for {uri}: {e}"))?;
    if https {
        let tls = tls_connect(tcp, &host, roots).await?;
        send(TokioIo::new(tls), request, uri).await
    } else {
        send(TokioIo::new(tcp), request, uri).await
    }
}

async fn connect(host: &str, port: u16) -> Result<TcpStream, String> {
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}; check the node's DNS servers"))?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name has no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(format!(
        "cannot connect to {host}:{port}: {last}; check that the server runs and that the node's network reaches it"
    ))
}

async fn tls_connect(
    tcp: TcpStream,
    host: &str,
    roots: &Arc<rustls::RootCertStore>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tls_err = |e: &dyn std::fmt::Display| {
        format!(
            "the TLS handshake with {host} failed: {e}; the node trusts the public web roots only: serve the bundle with a publicly trusted certificate, or over http:// (its signature guards it)"
        )
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls_err(&e))?
    .with_root_certificates(Arc::clone(roots))
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| tls_err(&e))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| tls_err(&e))
}

async fn send<T>(
    io: TokioIo<T>,
    request: http::Request<Empty<Bytes>>,
    uri: &Uri,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http_err = |e: hyper::Error| format!("the HTTP exchange with {uri} failed: {e}");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(http_err)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("upgrade fetch: the connection ended with {e}");
        }
    });
    sender.send_request(request).await.map_err(http_err)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    /// Serves `answers` in turn, one per connection; answers the base URL.
    async fn serve(answers: Vec<Vec<u8>>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for answer in answers {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let _ = conn.write_all(&answer).await;
                let _ = conn.shutdown().await;
            }
        });
        format!("http://{addr}")
    }

    async fn collect(mut rx: mpsc::Receiver<Chunk>) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        while let Some(chunk) = rx.recv().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_body_is_streamed_after_a_redirect() {
        let body = vec![7u8; 100_000];
        let mut ok =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        ok.extend_from_slice(&body);
        let base = serve(vec![
            b"HTTP/1.1 302 Found\r\nLocation: /real.bundle\r\nContent-Length: 0\r\n\r\n".to_vec(),
            ok,
        ])
        .await;
        let got = collect(spawn(format!("{base}/x.bundle"))).await;
        assert_eq!(got.as_deref(), Ok(&body[..]));
    }

    #[tokio::test]
    async fn failures_name_the_url() {
        let base = serve(vec![
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ])
        .await;
        let err = collect(spawn(format!("{base}/missing.bundle")))
            .await
            .unwrap_err();
        assert!(
            err.contains("missing.bundle") && err.contains("404"),
            "{err}"
        );
        let err = collect(spawn("ftp://h/x".into())).await.unwrap_err();
        assert!(err.contains("only http://"), "{err}");
    }
}
