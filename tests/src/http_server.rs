//! A plain-HTTP file server for a test (Python's `http.server`, the real tool) serving a
//! directory on one address inside a network namespace the test made, or on the host
//! when no namespace is named; and an HTTP client that runs where the server does
//! (Python's urllib, in the same namespace), for readiness waits and checks.
//!
//! [`layout_kubelet`] lays a kubelet out as the upstream release site does, so that a node
//! configured with the server's URL as its base fetches it from there.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Arch;

/// How long a server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// `python3 -m http.server` serving a directory; killed when dropped.
#[derive(Debug)]
pub struct HttpServer {
    child: Child,
    netns: Option<String>,
    url: String,
    log: PathBuf,
    _scratch: tempfile::TempDir,
}

impl HttpServer {
    /// Serve `dir` on `address:port`, inside namespace `netns` when given (else on this
    /// host), and wait until the server answers.
    pub fn start(netns: Option<&str>, address: IpAddr, port: u16, dir: &Path) -> Result<Self> {
        let scratch = tempfile::Builder::new()
            .prefix("keelson-http-server-")
            .tempdir()
            .context("a directory for the HTTP server's log")?;
        let log = scratch.path().join("requests.log");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = in_netns(netns, "python3")
            .args(["-u", "-m", "http.server", "--bind"])
            .arg(address.to_string())
            .arg("--directory")
            .arg(dir)
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting python3 -m http.server (Debian package python3)")?;
        let mut server = HttpServer {
            child,
            netns: netns.map(str::to_owned),
            url: format!("http://{}", host_port(address, port)),
            log,
            _scratch: scratch,
        };
        let url = server.url.clone();
        // Python's own answer (its Server header), not that of whatever else might take
        // the connection while it starts.
        let is_python = |r: &HttpResponse| {
            r.header("Server")
                .is_some_and(|s| s.starts_with("SimpleHTTP"))
        };
        wait_until_answering(&mut server.child, netns, &url, is_python).with_context(|| {
            format!(
                "the HTTP server for {} never answered: {}",
                dir.display(),
                server.log()
            )
        })?;
        Ok(server)
    }

    /// The server's base URL, `http://ADDR:PORT` (no trailing slash).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// GET `path` (starting with `/`) from the server, from where it runs.
    pub fn get(&self, path: &str) -> Result<HttpResponse> {
        http_get(self.netns.as_deref(), &format!("{}{path}", self.url), &[])
    }

    /// The server's request log so far (one line per request, with its path and status).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copy `binary` to `<dir>/<version_tag>/bin/linux/<arch>/kubelet` (mode 0755), where the
/// upstream release site has a version's kubelet (`version_tag` as its URL names it:
/// `v1.31.0`), and return the copy's path.
pub fn layout_kubelet(dir: &Path, version_tag: &str, arch: Arch, binary: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let parent = dir.join(version_tag).join("bin/linux").join(arch.debian());
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let kubelet = parent.join("kubelet");
    std::fs::copy(binary, &kubelet)
        .with_context(|| format!("copying {} to {}", binary.display(), kubelet.display()))?;
    std::fs::set_permissions(&kubelet, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", kubelet.display()))?;
    Ok(kubelet)
}

/// An HTTP response: status, headers in order, body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The headers, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What [`http_get`] runs: one GET, printing the status, the headers and the body, for
/// every status (urllib raises on 4xx and 5xx; the error is the response).
const GET_SCRIPT: &str = r#"
import sys, urllib.request, urllib.error
headers = dict(h.split(": ", 1) for h in sys.argv[2:])
request = urllib.request.Request(sys.argv[1], headers=headers)
try:
    response = urllib.request.urlopen(request, timeout=10)
except urllib.error.HTTPError as error:
    response = error
out = sys.stdout.buffer
out.write(b"%d\n" % response.getcode())
for name, value in response.headers.items():
    out.write(("%s: %s\n" % (name, value)).encode())
out.write(b"\n")
out.write(response.read())
"#;

/// GET `url` with `headers`, from inside namespace `netns` when given (else from this
/// host), through Python's urllib. Fails when nothing answers (refused, timed out).
pub fn http_get(netns: Option<&str>, url: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
    let out = in_netns(netns, "python3")
        .args(["-c", GET_SCRIPT, url])
        .args(headers.iter().map(|(n, v)| format!("{n}: {v}")))
        .stdin(Stdio::null())
        .output()
        .context("running python3 for an HTTP GET")?;
    if !out.status.success() {
        bail!(
            "GET {url}{} failed: {}",
            netns
                .map(|ns| format!(" (in netns {ns})"))
                .unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    parse_response(&out.stdout).with_context(|| format!("reading the answer to GET {url}"))
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse> {
    let split = raw
        .windows(2)
        .position(|w| w == b"\n\n")
        .context("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .context("no status")?;
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: raw[split + 2..].to_vec(),
    })
}

/// Poll `url` until it answers with a response `ready` accepts; fails when `child`
/// (the server) exits or after [`READY_TIMEOUT`], with the last error.
pub(crate) fn wait_until_answering(
    child: &mut Child,
    netns: Option<&str>,
    url: &str,
    ready: impl Fn(&HttpResponse) -> bool,
) -> Result<HttpResponse> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let last = match http_get(netns, url, &[]) {
            Ok(response) if ready(&response) => return Ok(response),
            Ok(response) => format!("answered {}: {}", response.status, response.text()),
            Err(error) => format!("{error:#}"),
        };
        if let Some(status) = child.try_wait()? {
            bail!("the server exited ({status}) before {url} answered; last: {last}");
        }
        if Instant::now() >= deadline {
            bail!("{url} not ready after {READY_TIMEOUT:?}; last: {last}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `program` run inside namespace `netns` (`ip netns exec NS program`, which execs it:
/// the child is the program itself), or on this host.
pub(crate) fn in_netns(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns, program]);
            cmd
        }
        None => Command::new(program),
    }
}

/// `ADDR:PORT` for a URL (an IPv6 address in brackets).
pub(crate) fn host_port(address: IpAddr, port: u16) -> String {
    match address {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_a_kubelet_at_the_release_layout() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("standin");
        std::fs::write(&binary, b"not a kubelet").unwrap();
        let served = dir.path().join("site");
        let kubelet = layout_kubelet(&served, "v1.31.0", Arch::Arm64, &binary).unwrap();
        assert_eq!(kubelet, served.join("v1.31.0/bin/linux/arm64/kubelet"));

        let port = crate::free_loopback_port().unwrap();
        let server = HttpServer::start(None, "127.0.0.1".parse().unwrap(), port, &served).unwrap();
        let got = server.get("/v1.31.0/bin/linux/arm64/kubelet").unwrap();
        assert_eq!((got.status, got.text().as_str()), (200, "not a kubelet"));
        assert_eq!(
            server
                .get("/v1.31.0/bin/linux/amd64/kubelet")
                .unwrap()
                .status,
            404
        );
        assert!(
            server
                .log()
                .contains("GET /v1.31.0/bin/linux/arm64/kubelet"),
            "{}",
            server.log()
        );
    }
}
