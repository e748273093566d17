//! `https://` config URLs against a real TLS server: `openssl s_server -WWW` on 127.0.0.1
//! (openssl is on every host: `cargo xtask host` installs it), with an ECDSA CA, a server
//! certificate for `IP:127.0.0.1` that it signed, and a second CA that signed nothing.

use std::io;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::config_source::MAX_CONFIG;
use crate::config_source::http::{self, fetch, sha256_hex};

/// What the server serves.
const CONFIG: &str = "version = \"v1\"\n# served over TLS\n";
const TIMEOUT: Duration = Duration::from_secs(10);

/// Certificates made by openssl in a temporary directory, which `s_server -WWW` serves
/// files from.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> io::Result<Pki> {
        let pki = Pki {
            dir: tempfile::tempdir()?,
        };
        for ca in ["ca", "other-ca"] {
            pki.openssl(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-subj",
                &format!("/CN=keelson test {ca}"),
                "-days",
                "2",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
            ])?;
        }
        pki.write(
            "server.ext",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )?;
        pki.openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=keelson test server",
        ])?;
        pki.openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ])?;
        pki.write("node.toml", CONFIG)?;
        Ok(pki)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    // The test's own files in its temporary directory.
    #[allow(clippy::disallowed_methods)]
    fn write(&self, name: &str, text: &str) -> io::Result<()> {
        std::fs::write(self.path(name), text)
    }

    // The test's own openssl, made to make its certificates.
    #[allow(clippy::disallowed_methods)]
    fn openssl(&self, args: &[&str]) -> io::Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    /// A CA's certificate as `keelson.config.ca=` takes it inline: its PEM's body lines,
    /// joined (base64 of its DER).
    fn inline(&self, ca: &str) -> io::Result<String> {
        let pem = std::fs::read_to_string(self.path(&format!("{ca}.pem")))?;
        Ok(pem.lines().filter(|l| !l.starts_with("-----")).collect())
    }
}

/// `openssl s_server -WWW` on 127.0.0.1 (a port of its choosing), serving the PKI's
/// directory with its server certificate, with `extra` arguments; killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    // The test's own TLS server.
    #[allow(clippy::disallowed_methods)]
    fn start(pki: &Pki, extra: &[&str]) -> io::Result<Server> {
        // Its output goes to a file: a pipe that nobody reads would end it (SIGPIPE).
        let log_path = pki.path("s_server.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new("openssl")
            .args([
                "s_server",
                "-accept",
                "127.0.0.1:0",
                "-cert",
                "server.pem",
                "-key",
                "server.key",
                "-WWW",
            ])
            .args(extra)
            .current_dir(pki.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut server = Server { child, port: 0 };
        // It says `ACCEPT 127.0.0.1:PORT` once it listens.
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            let said = std::fs::read_to_string(&log_path)?;
            let port = said
                .lines()
                .find_map(|l| l.strip_prefix("ACCEPT 127.0.0.1:"))
                .and_then(|p| p.trim().parse().ok());
            if let Some(port) = port {
                server.port = port;
                return Ok(server);
            }
            if server.child.try_wait()?.is_some() {
                return Err(io::Error::other(format!("s_server ended: {said}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(io::Error::other("s_server did not listen within 10 s"))
    }

    fn url(&self, host: &str) -> String {
        format!("https://{host}:{}/node.toml", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Fetch `url` trusting `trust`, with `pin`.
fn get(url: &str, trust: &Trust, pin: Option<&str>) -> io::Result<Result<Vec<u8>, String>> {
    Ok(runtime()?.block_on(async {
        fetch(url, pin, trust, MAX_CONFIG, TIMEOUT)
            .await
            .map_err(|e| e.to_string())
    }))
}

fn refused(got: &Result<Vec<u8>, String>, needles: &[&str]) {
    for needle in needles {
        assert!(
            got.as_ref().is_err_and(|e| e.contains(needle)),
            "{got:?} does not say {needle:?}"
        );
    }
}

#[test]
fn an_https_config_is_fetched_from_a_server_the_named_ca_signed() -> io::Result<()> {
    let pki = Pki::new()?;
    let server = Server::start(&pki, &[])?;
    let url = server.url("127.0.0.1");
    let inline = Trust::from_cmdline_value(Some(&pki.inline("ca")?));
    assert!(matches!(inline, Trust::Inline(_)));
    let path = pki.path("ca.pem").display().to_string();
    let file = Trust::from_cmdline_value(Some(&path));
    assert_eq!(file, Trust::File(path.clone()));
    // The whole PEM file in base64 (`base64 -w0 ca.pem`).
    let pem = std::fs::read(&path)?;
    pki.openssl(&["base64", "-A", "-in", "ca.pem", "-out", "ca.pem.b64"])?;
    let pem_b64 = std::fs::read_to_string(pki.path("ca.pem.b64"))?;
    assert!(!pem.is_empty() && pem_b64.starts_with("LS0tLS1CRUdJTi"));
    let whole_pem = Trust::Inline(pem_b64.trim().to_string());
    for trust in [&inline, &file, &whole_pem] {
        assert_eq!(
            get(&url, trust, None)?.as_deref(),
            Ok(CONFIG.as_bytes()),
            "{trust:?}"
        );
    }
    // The pin holds over TLS too.
    let sum = sha256_hex(CONFIG.as_bytes());
    assert_eq!(
        get(&url, &inline, Some(&sum))?.as_deref(),
        Ok(CONFIG.as_bytes())
    );
    let other = sha256_hex(b"another config");
    refused(
        &get(&url, &inline, Some(&other))?,
        &[&format!(
            "the config's sha256 is {sum}, but keelson.config.sha256 pins {other}"
        )],
    );
    Ok(())
}

#[test]
fn a_server_no_trusted_ca_signed_is_refused_saying_how_to_name_its_ca() -> io::Result<()> {
    let pki = Pki::new()?;
    let server = Server::start(&pki, &[])?;
    let url = server.url("127.0.0.1");
    refused(
        &get(&url, &Trust::PublicRoots, None)?,
        &[
            "the server's certificate is not signed by a public CA (Mozilla's roots",
            "UnknownIssuer",
            "name that CA with keelson.config.ca=<its certificate in base64",
        ],
    );
    let other = Trust::from_cmdline_value(Some(&pki.inline("other-ca")?));
    refused(
        &get(&url, &other, None)?,
        &[
            "the server's certificate is not signed by the CA that keelson.config.ca= names",
            "name the CA that signed it with keelson.config.ca=",
        ],
    );
    Ok(())
}

#[test]
fn a_certificate_for_another_host_is_refused() -> io::Result<()> {
    let pki = Pki::new()?;
    let server = Server::start(&pki, &[])?;
    let ca = Trust::from_cmdline_value(Some(&pki.inline("ca")?));
    // The certificate names IP:127.0.0.1 only; localhost is the same server by another name.
    refused(
        &get(&server.url("localhost"), &ca, None)?,
        &[
            "the server's certificate is not for localhost",
            "127.0.0.1",
            "put a name the certificate names in the URL, or give the server a certificate for localhost",
        ],
    );
    Ok(())
}

#[test]
fn a_plain_http_server_at_an_https_url_is_refused_as_not_tls() -> io::Result<()> {
    let got = runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("https://{}/node.toml", listener.local_addr()?);
        let server = tokio::spawn(async move {
            if let Ok((mut stream, _)) = listener.accept().await {
                let answer = "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n";
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        let got = fetch(&url, None, &Trust::PublicRoots, MAX_CONFIG, TIMEOUT)
            .await
            .map_err(|e| e.to_string());
        server.abort();
        io::Result::Ok(got)
    })?;
    refused(
        &got,
        &[
            "the server's answer is not TLS",
            "does this port serve https? A plain-HTTP server's URL is http://",
        ],
    );
    Ok(())
}

#[test]
fn a_ca_that_is_no_certificate_refuses_every_fetch_before_connecting() -> io::Result<()> {
    let pki = Pki::new()?;
    pki.write("empty.pem", "no certificate here\n")?;
    let empty = pki.path("empty.pem").display().to_string();
    let missing = pki.path("missing.pem").display().to_string();
    let inline = |v: &str| Trust::from_cmdline_value(Some(v));
    // Nothing listens on port 9 (discard): each refusal comes before any connection.
    let url = "https://127.0.0.1:9/node.toml";
    let cases: &[(Trust, &[&str])] = &[
        (
            inline("MII B"),
            &[
                "keelson.config.ca=MII B is not a certificate in base64",
                "alphabet",
            ],
        ),
        (inline("%%"), &["characters outside base64's alphabet"]),
        (
            inline(""),
            &["keelson.config.ca= is not a certificate in base64 (it is empty)"],
        ),
        (
            Trust::File("/dev/null".into()),
            &["keelson.config.ca=/dev/null is not a regular file"],
        ),
        (
            Trust::File("/".into()),
            &["keelson.config.ca=/ is not a regular file"],
        ),
        (
            inline("QUJD"),
            &[
                "not an X.509 certificate",
                "name the config server's CA certificate",
            ],
        ),
        (
            inline("A"),
            &["is not a certificate in base64", "does not decode"],
        ),
        (
            Trust::File(missing.clone()),
            &[&format!("keelson.config.ca={missing}: cannot read it")],
        ),
        (
            Trust::File(empty.clone()),
            &[&format!(
                "keelson.config.ca={empty} holds no readable PEM certificate"
            )],
        ),
    ];
    for (trust, needles) in cases {
        refused(&get(url, trust, None)?, needles);
    }
    // A CA named for a plain-HTTP URL: there is no certificate to check.
    refused(
        &get(
            "http://127.0.0.1:9/node.toml",
            &inline(&pki.inline("ca")?),
            None,
        )?,
        &[
            "keelson.config.ca= names a CA, but the URL is http://",
            "use https://",
        ],
    );
    Ok(())
}

#[test]
fn https_urls_default_to_port_443() {
    let url = |s: &str| http::parse_http_url(s).map(|u| (u.tls, u.host, u.port, u.path));
    assert_eq!(
        url("https://cfg.example/n.toml").ok(),
        Some((true, "cfg.example".into(), 443, "/n.toml".into()))
    );
    assert_eq!(
        url("https://[fd00::1]:8443").ok(),
        Some((true, "[fd00::1]".into(), 8443, "/".into()))
    );
    assert_eq!(
        url("http://cfg.example/n.toml").ok(),
        Some((false, "cfg.example".into(), 80, "/n.toml".into()))
    );
}

#[test]
fn an_oversized_ca_file_is_refused_unread() -> io::Result<()> {
    let pki = Pki::new()?;
    let big = "#".repeat(usize::try_from(MAX_CA_FILE).unwrap_or(usize::MAX) + 1);
    pki.write("big.pem", &big)?;
    let path = pki.path("big.pem").display().to_string();
    let got = Trust::File(path.clone())
        .roots()
        .map(|_| ())
        .map_err(|e| e.to_string());
    assert!(
        got.as_ref().is_err_and(|e| e.contains(&format!(
            "keelson.config.ca={path} is larger than 1048576 bytes"
        ))),
        "{got:?}"
    );
    Ok(())
}

/// A TLS server on 127.0.0.1 (rustls, the PKI's server certificate) that sends `answer`
/// on its first connection and then drops it without TLS's close_notify, as a cut
/// connection looks; its URL.
async fn serve_then_cut(pki: &Pki, answer: &'static str) -> io::Result<String> {
    use rustls::pki_types::PrivateKeyDer;
    let certificates = CertificateDer::pem_file_iter(pki.path("server.pem"))
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(io::Error::other)?;
    let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).map_err(io::Error::other)?;
    #[allow(deprecated)] // as in `client_config`
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certificates, key))
        .map_err(io::Error::other)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://{}/node.toml", listener.local_addr()?);
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        // The request is read first (a close with unread bytes would be a reset).
        let mut request = [0u8; 1024];
        let _ = tls.read(&mut request).await?;
        tls.write_all(answer.as_bytes()).await?;
        tls.flush().await?;
        // The TCP connection alone is closed: no close_notify.
        drop(tls.into_inner().0);
        io::Result::Ok(())
    });
    Ok(url)
}

#[test]
fn a_tls_connection_cut_without_close_notify_never_ends_a_body() -> io::Result<()> {
    let pki = Pki::new()?;
    let ca = Trust::from_cmdline_value(Some(&pki.inline("ca")?));
    let fetch_cut = |answer: &'static str| -> io::Result<Result<Vec<u8>, String>> {
        runtime()?.block_on(async {
            let url = serve_then_cut(&pki, answer).await?;
            Ok(fetch(&url, None, &ca, MAX_CONFIG, TIMEOUT)
                .await
                .map_err(|e| e.to_string()))
        })
    };
    // A body that ends with the connection may have been cut short.
    refused(
        &fetch_cut("HTTP/1.0 200 OK\r\n\r\nversion = ")?,
        &[
            "closed the TLS connection without close_notify after 10 bytes of a body that ends \
             with the connection",
            "the server should send Content-Length",
        ],
    );
    // A framed body is whole, or known to be cut, before the connection ends.
    assert_eq!(
        fetch_cut("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")?.as_deref(),
        Ok(&b"abc"[..])
    );
    refused(
        &fetch_cut("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")?,
        &["the server closed the connection after 3 of the 9 bytes it announced"],
    );
    Ok(())
}

#[test]
fn a_server_of_tls_1_2_alone_is_fetched_from() -> io::Result<()> {
    // IIS before Windows Server 2022 and many appliances speak no TLS 1.3.
    let pki = Pki::new()?;
    let server = Server::start(&pki, &["-tls1_2"])?;
    let ca = Trust::from_cmdline_value(Some(&pki.inline("ca")?));
    assert_eq!(
        get(&server.url("127.0.0.1"), &ca, None)?.as_deref(),
        Ok(CONFIG.as_bytes())
    );
    Ok(())
}
