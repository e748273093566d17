//! Fetching the kubelet binary for the config's Kubernetes version, verified against the
//! config's SHA-256 before it is ever made executable.
//!
//! The URL follows the upstream release site's layout
//! (`<base>/<tag>/bin/linux/<arch>/kubelet`, [`kubelet_url`]), so a mirror that copies that
//! layout can be named as the base. [`fetch_verified`] GETs it over `http://` or `https://`
//! with hyper 1 on a plain connection (HTTP/1.1, one request per connection), follows up to
//! [`MAX_REDIRECTS`] redirects (the release site redirects to a CDN), and streams the body
//! into a private temporary file beside the destination while hashing it. Only a body whose
//! sum is the expected one is synced, made executable (0755) and renamed over the
//! destination; anything else is removed, and so is a different file found at the
//! destination before the download, so a binary that failed its check is never left where
//! it could be run. A destination that already has the expected sum is kept as it is.
//!
//! HTTPS goes through rustls with the `ring` provider, as the rest of machined. The image
//! carries no CA bundle (`images/keelson.toml` has no ca-certificates), so the trusted roots
//! are the Mozilla roots compiled in from `webpki-roots`. A server with a certificate from a
//! private CA can serve the binary over `http://` instead: the SHA-256 check guards it
//! either way.

use std::fmt;
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use ring::digest;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The upstream release site, the default base of [`kubelet_url`].
pub const DEFAULT_BASE: &str = "https://dl.k8s.io/release";

/// How many redirects a fetch follows.
pub const MAX_REDIRECTS: usize = 5;

/// Bytes read at a time when hashing a file already on disk.
const READ_CHUNK: usize = 256 * 1024;

/// The URL of the kubelet binary for `version_tag` (`v1.34.1`; a bare `1.34.1` gets its `v`)
/// and `arch` (`amd64`, `arm64`) under `base` (default [`DEFAULT_BASE`]).
pub fn kubelet_url(base: Option<&str>, version_tag: &str, arch: &str) -> String {
    let base = base.unwrap_or(DEFAULT_BASE).trim_end_matches('/');
    let v = if version_tag.starts_with(|c: char| c.is_ascii_digit()) {
        "v"
    } else {
        ""
    };
    format!("{base}/{v}{version_tag}/bin/linux/{arch}/kubelet")
}

/// The bounds of one fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchLimits {
    /// The largest body accepted.
    pub max_bytes: u64,
    /// The whole fetch, redirects included.
    pub total: Duration,
    /// The longest wait for a connection, the response's head or the next piece of body.
    pub idle: Duration,
}

impl Default for FetchLimits {
    fn default() -> Self {
        Self {
            max_bytes: 512 * 1024 * 1024,
            total: Duration::from_secs(10 * 60),
            idle: Duration::from_secs(60),
        }
    }
}

/// A binary in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Where it is.
    pub path: PathBuf,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// It was already there with the expected sum: nothing was downloaded.
    pub reused: bool,
}

/// Errors of [`fetch_verified`]. Each names the URL (with the redirect it was reached
/// through, if any) and what to do.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The expected sum is not a SHA-256.
    #[error(
        "the expected sha256 {expected:?} for {url} is not 64 hexadecimal digits: pin the binary's sum in cluster.kubelet.sha256.<arch>"
    )]
    BadSum {
        /// The URL.
        url: String,
        /// What was given.
        expected: String,
    },
    /// The URL cannot be fetched by this client.
    #[error("cannot fetch {url}: {reason} (give an http:// or https:// URL with a host)")]
    BadUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The host name did not resolve.
    #[error(
        "cannot resolve {host} for {url}: check the node's DNS servers and the configured base URL"
    )]
    Resolve {
        /// The URL.
        url: Target,
        /// The host.
        host: String,
        /// The resolver's error.
        #[source]
        source: io::Error,
    },
    /// No address of the host accepted a connection.
    #[error(
        "cannot connect to {host}:{port} for {url}: check that the server runs and that the node's network and routes reach it"
    )]
    Connect {
        /// The URL.
        url: Target,
        /// The host.
        host: String,
        /// The port.
        port: u16,
        /// The last connection error.
        #[source]
        source: io::Error,
    },
    /// The TLS handshake failed.
    #[error(
        "the TLS handshake with {host} for {url} failed: the node trusts the public web roots only; serve the binary with a publicly trusted certificate, or over http:// (its sha256 guards it)"
    )]
    Tls {
        /// The URL.
        url: Target,
        /// The host.
        host: String,
        /// The handshake's error.
        #[source]
        source: io::Error,
    },
    /// The HTTP exchange broke.
    #[error(
        "the HTTP exchange for {url} failed: check that the server speaks HTTP/1.1, then retry"
    )]
    Http {
        /// The URL.
        url: Target,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
    /// The server answered with a status other than success or redirect.
    #[error(
        "{url} answered {status}: check the configured base URL, the Kubernetes version and the architecture (the layout is <base>/v<version>/bin/linux/<arch>/kubelet)"
    )]
    Status {
        /// The URL.
        url: Target,
        /// The status.
        status: http::StatusCode,
    },
    /// A redirect without a usable target, or too many of them.
    #[error("{url}: {reason}: name the final location as the base URL")]
    Redirect {
        /// The URL.
        url: Target,
        /// What went wrong.
        reason: String,
    },
    /// The body is larger than the limit.
    #[error(
        "{url} is larger than {limit} bytes: it is not a kubelet binary; check the configured base URL"
    )]
    TooBig {
        /// The URL.
        url: Target,
        /// The limit.
        limit: u64,
    },
    /// The fetch or one of its waits took too long.
    #[error(
        "fetching {url} timed out ({what} took over {after:?}): check the node's network and the server, then retry"
    )]
    Timeout {
        /// The URL.
        url: String,
        /// Which wait.
        what: &'static str,
        /// Its bound.
        after: Duration,
    },
    /// A local file operation failed.
    #[error(
        "cannot {what} {path} while fetching {url}: check that EPHEMERAL is mounted and has room"
    )]
    Local {
        /// The URL.
        url: String,
        /// The operation.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The downloaded binary's sum is not the expected one; it was removed.
    #[error(
        "the binary at {url} has sha256 {actual}, but {expected} was expected: it was removed and will not run; pin the right sum in cluster.kubelet.sha256.<arch>, or fix the mirror"
    )]
    Mismatch {
        /// The URL.
        url: String,
        /// The configured sum.
        expected: String,
        /// The downloaded body's sum.
        actual: String,
    },
}

/// The URL a request was made to, with the one it was first asked for when a redirect led
/// there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL requested.
    pub url: String,
    /// The configured URL, when a redirect led away from it.
    pub from: Option<String>,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.from {
            Some(from) => write!(f, "{} (redirected from {from})", self.url),
            None => f.write_str(&self.url),
        }
    }
}

/// Fetches `url` into `dest` if its SHA-256 is `expected_sha256_hex`; a `dest` that already
/// has that sum is kept as it is. HTTPS servers are trusted through the web's public roots.
pub async fn fetch_verified(
    url: &str,
    expected_sha256_hex: &str,
    dest: &Path,
    limits: FetchLimits,
) -> Result<Fetched, FetchError> {
    let roots = Arc::new(rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    });
    fetch_trusting(url, expected_sha256_hex, dest, limits, &roots).await
}

/// Makes a kept binary 0755 unless it is already: a binary fetched at an earlier boot
/// may be root's (machined ran as root before it had a user of its own), and only its
/// owner, or `CAP_FOWNER`, which machined does not have, may change its mode.
async fn make_executable(path: &Path) -> io::Result<()> {
    let mode = tokio::fs::metadata(path).await?.permissions().mode();
    if mode & 0o7777 == 0o755 {
        return Ok(());
    }
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).await
}

/// [`fetch_verified`] with HTTPS servers trusted through `roots`.
async fn fetch_trusting(
    url: &str,
    expected_sha256_hex: &str,
    dest: &Path,
    limits: FetchLimits,
    roots: &Arc<rustls::RootCertStore>,
) -> Result<Fetched, FetchError> {
    let expected = expected_sha256_hex.trim().to_ascii_lowercase();
    if expected.len() != 64 || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FetchError::BadSum {
            url: url.to_owned(),
            expected: expected_sha256_hex.to_owned(),
        });
    }
    let local = |what, path: &Path| {
        let (url, path) = (url.to_owned(), path.to_owned());
        move |source| FetchError::Local {
            url,
            what,
            path,
            source,
        }
    };
    match sha256_of_file(dest).await.map_err(local("read", dest))? {
        Some((sum, bytes)) if sum == expected => {
            make_executable(dest)
                .await
                .map_err(local("make executable", dest))?;
            return Ok(Fetched {
                path: dest.to_owned(),
                sha256: sum,
                bytes,
                reused: true,
            });
        }
        // Another binary (an older version, or one that failed its check) is removed first:
        // if this fetch fails, nothing is left there to run.
        Some(_) => tokio::fs::remove_file(dest)
            .await
            .map_err(local("remove the previous binary", dest))?,
        None => {}
    }
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(local("create the directory", dir))?;
    let partial = PartialFile::create(dir, dest).map_err(local("create a file in", dir))?;
    let download = download(url, &partial.path, limits, roots);
    let (actual, bytes) = tokio::time::timeout(limits.total, download)
        .await
        .map_err(|_| FetchError::Timeout {
            url: url.to_owned(),
            what: "the whole fetch",
            after: limits.total,
        })??;
    if actual != expected {
        return Err(FetchError::Mismatch {
            url: url.to_owned(),
            expected,
            actual,
        });
    }
    let into = dest.to_owned();
    tokio::task::spawn_blocking(move || partial.persist(&into))
        .await
        .map_err(|e| local("move into place", dest)(io::Error::other(e)))?
        .map_err(|(what, path, source)| local(what, &path)(source))?;
    Ok(Fetched {
        path: dest.to_owned(),
        sha256: actual,
        bytes,
        reused: false,
    })
}

/// The SHA-256 (hex) and size of the file at `path`, `None` when there is none.
async fn sha256_of_file(path: &Path) -> io::Result<Option<(String, u64)>> {
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(Some((hex(ctx.finish().as_ref()), bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A private (0600) temporary file beside the destination, removed on drop unless it was
/// renamed into place.
/// (The server's `SpoolFile` is the same idea for uploads, but it answers gRPC statuses and
/// is never renamed into place.)
#[derive(Debug)]
struct PartialFile {
    path: PathBuf,
    persisted: bool,
}

impl PartialFile {
    fn create(dir: &Path, dest: &Path) -> io::Result<Self> {
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "download".to_owned());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let mut last = io::Error::from(io::ErrorKind::AlreadyExists);
        for attempt in 0..16u32 {
            let path = dir.join(format!(
                ".{name}.part-{}-{nanos}-{attempt}",
                std::process::id()
            ));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(_) => {
                    return Ok(Self {
                        path,
                        persisted: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Syncs it, makes it executable, renames it over `dest` and syncs the directory.
    fn persist(mut self, dest: &Path) -> Result<(), (&'static str, PathBuf, io::Error)> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(|e| ("open", self.path.clone(), e))?;
        file.sync_all()
            .map_err(|e| ("sync", self.path.clone(), e))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o755))
            .map_err(|e| ("make executable", self.path.clone(), e))?;
        std::fs::rename(&self.path, dest).map_err(|e| ("rename into", dest.to_owned(), e))?;
        self.persisted = true;
        if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| ("sync the directory", dir.to_owned(), e))?;
        }
        Ok(())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// GETs `url` (following redirects) into the file at `into`; answers the body's SHA-256
/// and size.
async fn download(
    url: &str,
    into: &Path,
    limits: FetchLimits,
    roots: &Arc<rustls::RootCertStore>,
) -> Result<(String, u64), FetchError> {
    let mut target = Target {
        url: url.to_owned(),
        from: None,
    };
    for _ in 0..=MAX_REDIRECTS {
        let uri = parse(&target)?;
        let response = request(&uri, &target, limits, roots).await?;
        let status = response.status();
        if status.is_redirection() {
            let next = redirect_target(&uri, &response, &target)?;
            target = Target {
                url: next,
                from: Some(url.to_owned()),
            };
            continue;
        }
        if !status.is_success() {
            return Err(FetchError::Status {
                url: target,
                status,
            });
        }
        return stream_to_file(response, into, &target, url, limits).await;
    }
    Err(FetchError::Redirect {
        url: target,
        reason: format!("more than {MAX_REDIRECTS} redirects"),
    })
}

fn parse(target: &Target) -> Result<Uri, FetchError> {
    let bad = |reason: &str| FetchError::BadUrl {
        url: target.to_string(),
        reason: reason.to_owned(),
    };
    let uri: Uri = target.url.parse().map_err(|_| bad("not a valid URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(bad("only http:// and https:// are supported")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("it names no host"));
    }
    Ok(uri)
}

/// The absolute URL a redirect response points at.
fn redirect_target(
    uri: &Uri,
    response: &http::Response<hyper::body::Incoming>,
    target: &Target,
) -> Result<String, FetchError> {
    let location = response
        .headers()
        .get(http::header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .ok_or_else(|| FetchError::Redirect {
            url: target.clone(),
            reason: format!("a {} without a Location", response.status()),
        })?;
    Ok(resolve_location(uri, location))
}

/// `location` made absolute against `base`.
pub(crate) fn resolve_location(base: &Uri, location: &str) -> String {
    if location.contains("://") {
        return location.to_owned();
    }
    let scheme = base.scheme_str().unwrap_or("http");
    let authority = base.authority().map_or("", |a| a.as_str());
    if let Some(rest) = location.strip_prefix("//") {
        return format!("{scheme}://{rest}");
    }
    if location.starts_with('/') {
        return format!("{scheme}://{authority}{location}");
    }
    let path = base.path();
    let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
    let dir = if dir.is_empty() { "/" } else { dir };
    format!("{scheme}://{authority}{dir}{location}")
}

/// One GET on a fresh connection; answers the response with its body still to read.
async fn request(
    uri: &Uri,
    target: &Target,
    limits: FetchLimits,
    roots: &Arc<rustls::RootCertStore>,
) -> Result<http::Response<hyper::body::Incoming>, FetchError> {
    let https = uri.scheme_str() == Some("https");
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let timeout = |what| FetchError::Timeout {
        url: target.to_string(),
        what,
        after: limits.idle,
    };
    let tcp = tokio::time::timeout(limits.idle, connect(&host, port, target))
        .await
        .map_err(|_| timeout("connecting"))??;
    let request = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(
            http::header::HOST,
            uri.authority().map_or(host.as_str(), |a| a.as_str()),
        )
        .header(http::header::USER_AGENT, "keelson-machined")
        .header(http::header::ACCEPT, "*/*")
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::BadUrl {
            url: target.to_string(),
            reason: e.to_string(),
        })?;
    let send = async {
        if https {
            let tls = tls_connect(tcp, &host, target, roots).await?;
            send_request(TokioIo::new(tls), request, target).await
        } else {
            send_request(TokioIo::new(tcp), request, target).await
        }
    };
    tokio::time::timeout(limits.idle, send)
        .await
        .map_err(|_| timeout("waiting for the response"))?
}

async fn connect(host: &str, port: u16, target: &Target) -> Result<TcpStream, FetchError> {
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| FetchError::Resolve {
            url: target.clone(),
            host: host.to_owned(),
            source,
        })?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name has no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(FetchError::Connect {
        url: target.clone(),
        host: host.to_owned(),
        port,
        source: last,
    })
}

async fn tls_connect(
    tcp: TcpStream,
    host: &str,
    target: &Target,
    roots: &Arc<rustls::RootCertStore>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, FetchError> {
    let tls_err = |source| FetchError::Tls {
        url: target.clone(),
        host: host.to_owned(),
        source,
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls_err(io::Error::other(e)))?
    .with_root_certificates(Arc::clone(roots))
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| tls_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(tls_err)
}

async fn send_request<T>(
    io: TokioIo<T>,
    request: http::Request<Empty<Bytes>>,
    target: &Target,
) -> Result<http::Response<hyper::body::Incoming>, FetchError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http_err = |source| FetchError::Http {
        url: target.clone(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(http_err)?;
    // The connection ends when the response's body has been read or dropped.
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("fetch: the connection ended with {e}");
        }
    });
    sender.send_request(request).await.map_err(http_err)
}

/// Writes the response's body into `into` while hashing it, within the size and idle limits.
async fn stream_to_file(
    response: http::Response<hyper::body::Incoming>,
    into: &Path,
    target: &Target,
    url: &str,
    limits: FetchLimits,
) -> Result<(String, u64), FetchError> {
    let too_big = || FetchError::TooBig {
        url: target.clone(),
        limit: limits.max_bytes,
    };
    let announced = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limits.max_bytes) {
        return Err(too_big());
    }
    let local = |what| {
        move |source| FetchError::Local {
            url: url.to_owned(),
            what,
            path: into.to_owned(),
            source,
        }
    };
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(into)
        .await
        .map_err(local("open"))?;
    let mut body = response.into_body();
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut bytes = 0u64;
    loop {
        let frame = tokio::time::timeout(limits.idle, body.frame())
            .await
            .map_err(|_| FetchError::Timeout {
                url: target.to_string(),
                what: "waiting for the next part of the body",
                after: limits.idle,
            })?;
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|source| FetchError::Http {
            url: target.clone(),
            source,
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        bytes += data.len() as u64;
        if bytes > limits.max_bytes {
            return Err(too_big());
        }
        ctx.update(&data);
        file.write_all(&data).await.map_err(local("write"))?;
    }
    file.flush().await.map_err(local("write"))?;
    Ok((hex(ctx.finish().as_ref()), bytes))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt as _;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    /// One canned answer of the test server.
    #[derive(Clone)]
    struct Answer {
        status: &'static str,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
        /// Sends a Content-Length; without it the body ends when the connection closes.
        length: bool,
        /// Sends the head and half the body, then nothing more.
        stall: bool,
    }

    fn ok(body: &[u8]) -> Answer {
        Answer {
            status: "200 OK",
            headers: Vec::new(),
            body: body.to_vec(),
            length: true,
            stall: false,
        }
    }

    type Routes = Arc<HashMap<&'static str, Answer>>;

    /// A minimal HTTP/1.1 server on 127.0.0.1 (over TLS with `tls`): one request per
    /// connection, answered from `routes` by path (404 for any other), then the connection is
    /// closed. Answers its base URL.
    async fn serve_with(
        routes: HashMap<&'static str, Answer>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let routes: Routes = Arc::new(routes);
        let scheme = if tls.is_some() { "https" } else { "http" };
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (routes, tls) = (routes.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(tls) => {
                            if let Ok(conn) = tls.accept(conn).await {
                                respond(conn, &routes).await;
                            }
                        }
                        None => respond(conn, &routes).await,
                    }
                });
            }
        });
        format!("{scheme}://{addr}")
    }

    async fn serve(routes: HashMap<&'static str, Answer>) -> String {
        serve_with(routes, None).await
    }

    async fn respond<S>(mut conn: S, routes: &Routes)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let head = String::from_utf8_lossy(&head);
        let path = head.split(' ').nth(1).unwrap_or("/");
        let answer = routes.get(path).cloned().unwrap_or(Answer {
            status: "404 Not Found",
            ..ok(b"not found")
        });
        let mut out = format!("HTTP/1.1 {}\r\nConnection: close\r\n", answer.status);
        if answer.length {
            out.push_str(&format!("Content-Length: {}\r\n", answer.body.len()));
        }
        for (k, v) in &answer.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        let _ = conn.write_all(out.as_bytes()).await;
        if answer.stall {
            let _ = conn.write_all(&answer.body[..answer.body.len() / 2]).await;
            let _ = conn.flush().await;
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        let _ = conn.write_all(&answer.body).await;
        let _ = conn.shutdown().await;
    }

    fn sha(data: &[u8]) -> String {
        hex(digest::digest(&digest::SHA256, data).as_ref())
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    const BINARY: &[u8] = b"\x7fELF a kubelet stand-in";

    #[test]
    fn urls_follow_the_release_sites_layout() {
        assert_eq!(
            kubelet_url(None, "v1.34.1", "amd64"),
            "https://dl.k8s.io/release/v1.34.1/bin/linux/amd64/kubelet"
        );
        assert_eq!(
            kubelet_url(Some("http://10.0.2.2:8080/k8s/"), "1.34.1", "arm64"),
            "http://10.0.2.2:8080/k8s/v1.34.1/bin/linux/arm64/kubelet"
        );
    }

    #[test]
    fn relative_redirects_are_resolved() {
        let base: Uri = "https://a.example:8443/x/y/kubelet".parse().expect("uri");
        let cases = [
            ("https://cdn.example/k", "https://cdn.example/k"),
            ("//cdn.example/k", "https://cdn.example/k"),
            ("/z/kubelet", "https://a.example:8443/z/kubelet"),
            ("other", "https://a.example:8443/x/y/other"),
        ];
        for (location, expected) in cases {
            assert_eq!(resolve_location(&base, location), expected, "{location}");
        }
    }

    #[tokio::test]
    async fn the_right_sum_puts_an_executable_in_place() {
        let base = serve(HashMap::from([(
            "/v1.34.1/bin/linux/amd64/kubelet",
            ok(BINARY),
        )]))
        .await;
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("bin/kubelet");
        let url = kubelet_url(Some(&base), "v1.34.1", "amd64");
        let fetched = fetch_verified(&url, &sha(BINARY), &dest, FetchLimits::default())
            .await
            .expect("fetched");
        assert!(!fetched.reused);
        assert_eq!(fetched.bytes, BINARY.len() as u64);
        assert_eq!(std::fs::read(&dest).expect("read"), BINARY);
        let mode = std::fs::metadata(&dest).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(entries(&dir.path().join("bin")), ["kubelet"]);
    }

    #[tokio::test]
    async fn a_wrong_sum_is_refused_and_nothing_is_left() {
        let base = serve(HashMap::from([("/kubelet", ok(BINARY))])).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("{base}/kubelet");
        let wrong = "ab".repeat(32);
        let err = fetch_verified(
            &url,
            &wrong,
            &dir.path().join("kubelet"),
            FetchLimits::default(),
        )
        .await
        .expect_err("mismatch");
        let FetchError::Mismatch {
            url: u,
            expected,
            actual,
        } = &err
        else {
            panic!("not a mismatch: {err}");
        };
        assert_eq!((u, expected, actual), (&url, &wrong, &sha(BINARY)));
        let msg = err.to_string();
        for part in [url.as_str(), &wrong, &sha(BINARY), "cluster.kubelet.sha256"] {
            assert!(msg.contains(part), "{msg}");
        }
        assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
    }

    #[tokio::test]
    async fn a_missing_binary_names_the_url() {
        let base = serve(HashMap::new()).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("{base}/v9.9.9/bin/linux/amd64/kubelet");
        let err = fetch_verified(
            &url,
            &sha(BINARY),
            &dir.path().join("kubelet"),
            FetchLimits::default(),
        )
        .await
        .expect_err("404");
        let msg = err.to_string();
        assert!(matches!(err, FetchError::Status { .. }), "{msg}");
        assert!(msg.contains(&url) && msg.contains("404"), "{msg}");
        assert!(entries(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn redirects_are_followed() {
        let redirect = |to: String| Answer {
            status: "302 Found",
            headers: vec![("Location", to)],
            ..ok(b"")
        };
        let base = serve(HashMap::from([
            ("/release/kubelet", redirect("/cdn/hop".into())),
            ("/cdn/hop", redirect("kubelet".into())),
            ("/cdn/kubelet", ok(BINARY)),
            ("/loop", redirect("/loop".into())),
        ]))
        .await;
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("kubelet");
        let url = format!("{base}/release/kubelet");
        fetch_verified(&url, &sha(BINARY), &dest, FetchLimits::default())
            .await
            .expect("fetched through two redirects");
        assert_eq!(std::fs::read(&dest).expect("read"), BINARY);

        let err = fetch_verified(
            &format!("{base}/loop"),
            &sha(BINARY),
            &dir.path().join("other"),
            FetchLimits::default(),
        )
        .await
        .expect_err("a loop");
        assert!(err.to_string().contains("more than 5 redirects"), "{err}");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused() {
        let big = vec![7u8; 4096];
        let base = serve(HashMap::from([
            ("/announced", ok(&big)),
            (
                "/streamed",
                Answer {
                    length: false,
                    ..ok(&big)
                },
            ),
        ]))
        .await;
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = FetchLimits {
            max_bytes: 1024,
            ..FetchLimits::default()
        };
        for path in ["/announced", "/streamed"] {
            let url = format!("{base}{path}");
            let err = fetch_verified(&url, &sha(&big), &dir.path().join("kubelet"), limits)
                .await
                .expect_err("too big");
            assert!(matches!(err, FetchError::TooBig { .. }), "{path}: {err}");
            assert!(err.to_string().contains(&url), "{err}");
            assert!(entries(dir.path()).is_empty());
        }
    }

    #[tokio::test]
    async fn a_good_file_in_place_is_reused_without_fetching() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("kubelet");
        std::fs::write(&dest, BINARY).expect("write");
        // Nothing listens at this URL: a fetch would fail.
        let fetched = fetch_verified(
            "http://127.0.0.1:1/kubelet",
            &sha(BINARY).to_uppercase(),
            &dest,
            FetchLimits::default(),
        )
        .await
        .expect("reused");
        assert!(fetched.reused);
        let mode = std::fs::metadata(&dest).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[tokio::test]
    async fn other_failures_name_the_url_and_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("kubelet");
        let cases = [
            (
                "http://127.0.0.1:1/kubelet",
                "cannot connect to 127.0.0.1:1",
            ),
            ("ftp://mirror.example/kubelet", "only http:// and https://"),
            (
                "http://nonexistent.invalid/kubelet",
                "cannot resolve nonexistent.invalid",
            ),
        ];
        for (url, expected) in cases {
            let err = fetch_verified(url, &sha(BINARY), &dest, FetchLimits::default())
                .await
                .expect_err(url);
            let msg = err.to_string();
            assert!(msg.contains(url) && msg.contains(expected), "{msg}");
        }
        let err = fetch_verified("http://127.0.0.1:1/k", "abc", &dest, FetchLimits::default())
            .await
            .expect_err("bad sum");
        assert!(err.to_string().contains("64 hexadecimal digits"), "{err}");
    }

    #[tokio::test]
    async fn another_binary_in_place_is_replaced_or_removed() {
        let base = serve(HashMap::from([("/kubelet", ok(BINARY))])).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("kubelet");
        std::fs::write(&dest, b"an older kubelet").expect("write");
        let url = format!("{base}/kubelet");
        let fetched = fetch_verified(&url, &sha(BINARY), &dest, FetchLimits::default())
            .await
            .expect("replaced");
        assert!(!fetched.reused);
        assert_eq!(std::fs::read(&dest).expect("read"), BINARY);

        let err = fetch_verified(&url, &"0".repeat(64), &dest, FetchLimits::default())
            .await
            .expect_err("mismatch");
        assert!(matches!(err, FetchError::Mismatch { .. }), "{err}");
        assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
    }

    #[tokio::test]
    async fn a_stalled_body_times_out_and_nothing_is_left() {
        let base = serve(HashMap::from([(
            "/kubelet",
            Answer {
                stall: true,
                ..ok(BINARY)
            },
        )]))
        .await;
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = FetchLimits {
            idle: Duration::from_millis(300),
            ..FetchLimits::default()
        };
        let url = format!("{base}/kubelet");
        let err = fetch_verified(&url, &sha(BINARY), &dir.path().join("kubelet"), limits)
            .await
            .expect_err("stalled");
        let msg = err.to_string();
        assert!(matches!(err, FetchError::Timeout { .. }), "{msg}");
        assert!(
            msg.contains(&url) && msg.contains("next part of the body"),
            "{msg}"
        );
        assert!(entries(dir.path()).is_empty());
    }

    /// A CA and a certificate for 127.0.0.1 that it signed, as a TLS acceptor and the roots
    /// that trust it.
    fn tls_pair() -> (tokio_rustls::TlsAcceptor, Arc<rustls::RootCertStore>) {
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("ca params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
        let cert = params.signed_by(&key, &issuer).expect("cert");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).expect("root");
        (
            tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            Arc::new(roots),
        )
    }

    #[tokio::test]
    async fn https_is_verified_against_the_roots() {
        let (acceptor, roots) = tls_pair();
        let base = serve_with(HashMap::from([("/kubelet", ok(BINARY))]), Some(acceptor)).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("{base}/kubelet");
        let dest = dir.path().join("kubelet");
        fetch_trusting(&url, &sha(BINARY), &dest, FetchLimits::default(), &roots)
            .await
            .expect("fetched over https");
        assert_eq!(std::fs::read(&dest).expect("read"), BINARY);

        // The web's roots do not know the test CA.
        let other = dir.path().join("other");
        let err = fetch_verified(&url, &sha(BINARY), &other, FetchLimits::default())
            .await
            .expect_err("untrusted");
        let msg = err.to_string();
        assert!(matches!(err, FetchError::Tls { .. }), "{msg}");
        assert!(msg.contains(&url) && msg.contains("over http://"), "{msg}");
    }
}
