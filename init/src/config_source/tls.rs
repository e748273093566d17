//! The config URL's TLS: an `https://` URL is fetched over TLS 1.3 or 1.2 (rustls with
//! its `ring` provider), its server's certificate verified for the URL's host (a DNS name,
//! or an IP address the certificate names) and for this node's clock, against
//!
//! - **the public roots** by default: Mozilla's list, compiled into PID 1
//!   (`webpki-roots`), as machined's own fetches do. The fetch runs in stage 2, on the
//!   root, but the image carries no CA bundle: Debian's `ca-certificates` makes
//!   `/etc/ssl/certs/ca-certificates.crt` in a maintainer script, and the image never runs
//!   one. The same list is there in stage 1 and in a test, and its version is pinned by
//!   `Cargo.lock` like every other input.
//! - **only the CA named by `keelson.config.ca=`** when the kernel command line names
//!   one ([`Trust::from_cmdline_value`]), for a config server with a private CA. Its
//!   value is either the CA's certificate inline, in base64 (its DER, which is the lines
//!   of its PEM between `BEGIN` and `END` joined: `openssl x509 -in ca.pem -outform der |
//!   base64 -w0`; or the whole PEM file: `base64 -w0 ca.pem`), or an absolute path to a
//!   PEM file of one or more CA certificates on the node, read at each fetch (at most
//!   [`MAX_CA_FILE`] bytes): a file of the root, or a QEMU fw_cfg entry
//!   (`/sys/firmware/qemu_fw_cfg/by_name/opt/keelson/config-ca/raw`). The kernel keeps a
//!   command line of 2048 bytes at most, which holds an ECDSA or RSA-2048 CA's certificate
//!   inline but not an RSA-4096 one: name that one by path. A named CA replaces the public
//!   roots rather than joining them: whoever names the CA says who signs the config
//!   server's certificate, and no other CA can then stand in for it. A value that is not
//!   a certificate refuses every fetch, as a bad pin does: a typo must not fall back to
//!   the public roots.
//!
//! TLS 1.2 is kept beside 1.3: the config server is whatever the site runs, and IIS before
//! Windows Server 2022, like many appliances and load balancers, speaks no TLS 1.3. Its
//! cost is 92 KB of `init` (amd64, the image profile); the whole client, ring and the
//! roots (70 KB) included, costs 1.35 MB (4.84 to 6.19 MB; arm64 4.24 to 5.37 MB). No
//! client certificate is sent; no session is resumed (one fetch per try). rustls's
//! `logging` feature is off: its errors come back whole and are said here.
//!
//! Every refusal says what was wrong and what to do ([`Error`]); the caller names the URL.
//! A certificate whose dates do not hold at this node's clock is one of them: PID 1 has no
//! time sync, so the node's clock is its hardware clock's until machined syncs it.

use std::io::{self, Read};
use std::sync::Arc;

use keelson_configs::layout::CMDLINE_CONFIG_CA;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{AlertDescription, CertificateError, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The largest PEM file `keelson.config.ca=` may name (a bundle of a few hundred CAs).
pub const MAX_CA_FILE: u64 = 1024 * 1024;
/// How many characters of a bad `keelson.config.ca=` value an error quotes.
const QUOTE: usize = 40;

/// Why an `https://` fetch got no answer. The caller names the URL.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CA is named for an `http://` URL.
    #[error(
        "{CMDLINE_CONFIG_CA}= names a CA, but the URL is http://, which has no certificate to \
         check: use https://, or remove {CMDLINE_CONFIG_CA}="
    )]
    CaWithoutHttps,
    /// The inline value is not a certificate in base64.
    #[error(
        "{CMDLINE_CONFIG_CA}={value} is not a certificate in base64 ({why}), so no config is \
         accepted: give the CA's certificate as `openssl x509 -in ca.pem -outform der | base64 \
         -w0` prints it, or the absolute path of a PEM file on the node"
    )]
    BadInlineCa {
        /// The value, quoted.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// The named file cannot be read.
    #[error(
        "{CMDLINE_CONFIG_CA}={path}: cannot read it ({error}), so no config is accepted: name \
         a PEM file this node has, or give the CA inline in base64"
    )]
    CaFile {
        /// The path.
        path: String,
        /// Why.
        error: io::Error,
    },
    /// The path is not a regular file.
    #[error(
        "{CMDLINE_CONFIG_CA}={0} is not a regular file, so no config is accepted: name a PEM \
         file of the config server's CA"
    )]
    CaNotAFile(String),
    /// The named file is over [`MAX_CA_FILE`].
    #[error(
        "{CMDLINE_CONFIG_CA}={0} is larger than {MAX_CA_FILE} bytes, so no config is accepted: \
         name a PEM file of the config server's CA"
    )]
    CaFileTooLarge(String),
    /// The named file holds no certificate, or a broken one.
    #[error(
        "{CMDLINE_CONFIG_CA}={path} holds no readable PEM certificate ({why}), so no config is \
         accepted: name a file of one or more -----BEGIN CERTIFICATE----- blocks"
    )]
    BadCaFile {
        /// The path.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// A certificate that webpki cannot take as a trust anchor.
    #[error(
        "{CMDLINE_CONFIG_CA}= names a certificate that is not an X.509 certificate ({error}), \
         so no config is accepted: name the config server's CA certificate"
    )]
    BadCaCertificate {
        /// Why webpki refused it.
        error: rustls::Error,
    },
    /// rustls refused its own configuration (the ring provider's versions).
    #[error("the TLS client cannot be set up ({0}); this is a bug of keelson-init")]
    Setup(rustls::Error),
    /// The URL's host is neither a DNS name nor an IP address.
    #[error("the host {0:?} is not a DNS name or an IP address that a certificate can name")]
    BadHost(String),
    /// The certificate is not signed by a trusted CA.
    #[error(
        "the server's certificate is not signed by {trusted} ({error}): {}",
        trusted.what_to_do()
    )]
    UnknownIssuer {
        /// Which CAs were trusted.
        trusted: Trusted,
        /// rustls's words.
        error: rustls::Error,
    },
    /// The certificate does not name the URL's host.
    #[error(
        "the server's certificate is not for {host} ({error}): put a name the certificate \
         names in the URL, or give the server a certificate for {host}"
    )]
    WrongHost {
        /// The URL's host.
        host: String,
        /// rustls's words, with the names the certificate has.
        error: rustls::Error,
    },
    /// The certificate's dates do not hold at this node's clock.
    #[error(
        "the server's certificate is not valid at this node's clock ({error}): renew an \
         expired certificate, or set the node's hardware clock (PID 1 has no time sync)"
    )]
    Clock {
        /// rustls's words, with both times.
        error: rustls::Error,
    },
    /// Another reason to refuse the certificate.
    #[error(
        "the server's certificate is refused ({error}): give the server a certificate for \
         its host, signed by {trusted}"
    )]
    Certificate {
        /// Which CAs were trusted.
        trusted: Trusted,
        /// rustls's words.
        error: rustls::Error,
    },
    /// No common version, cipher suite or signature scheme.
    #[error(
        "the server and this node share no TLS version or algorithm ({0}): the node speaks \
         TLS 1.3 and 1.2 with ECDHE, AES-GCM or ChaCha20-Poly1305, and ECDSA, Ed25519 or \
         RSA certificates"
    )]
    Incompatible(rustls::Error),
    /// What came back is not TLS.
    #[error(
        "the server's answer is not TLS ({0}): does this port serve https? A plain-HTTP \
         server's URL is http://"
    )]
    NotTls(rustls::Error),
    /// The server ended the handshake with an alert.
    #[error(
        "the server ended the TLS handshake ({0}): its log says why (the node sends no \
         client certificate)"
    )]
    Alert(rustls::Error),
    /// Any other failure of the handshake (the connection reset or closed, another TLS
    /// error).
    #[error("the TLS handshake failed: {0}")]
    Handshake(io::Error),
}

/// The CAs a fetch trusts, for its errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trusted {
    /// Mozilla's roots.
    PublicRoots,
    /// Those of `keelson.config.ca=`.
    NamedCa,
}

impl Trusted {
    /// What to do when a certificate is not signed by these CAs.
    fn what_to_do(self) -> String {
        match self {
            Trusted::PublicRoots => format!(
                "for a server with a private CA, name that CA with {CMDLINE_CONFIG_CA}=<its \
                 certificate in base64, or the path of its PEM file>"
            ),
            Trusted::NamedCa => format!(
                "name the CA that signed it with {CMDLINE_CONFIG_CA}= (`openssl s_client \
                 -showcerts` shows the server's chain)"
            ),
        }
    }
}

impl std::fmt::Display for Trusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trusted::PublicRoots => {
                f.write_str("a public CA (Mozilla's roots, compiled into keelson-init)")
            }
            Trusted::NamedCa => write!(f, "the CA that {CMDLINE_CONFIG_CA}= names"),
        }
    }
}

/// Whom an `https://` fetch trusts: [`Trust::from_cmdline_value`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The public roots (no `keelson.config.ca=`).
    PublicRoots,
    /// The CA's certificate given inline, as written on the command line.
    Inline(String),
    /// A PEM file on the node, read at each fetch.
    File(String),
}

impl Trust {
    /// The trust of `keelson.config.ca=`'s value (`None`: no such key): a value that
    /// starts with `/` is a path, any other the certificate inline. Nothing is checked
    /// here: [`Trust::roots`] refuses a bad value at each fetch.
    pub fn from_cmdline_value(value: Option<&str>) -> Trust {
        match value {
            None => Trust::PublicRoots,
            Some(path) if path.starts_with('/') => Trust::File(path.to_string()),
            Some(inline) => Trust::Inline(inline.to_string()),
        }
    }

    /// Which CAs these are, for errors.
    pub fn trusted(&self) -> Trusted {
        match self {
            Trust::PublicRoots => Trusted::PublicRoots,
            Trust::Inline(_) | Trust::File(_) => Trusted::NamedCa,
        }
    }

    /// The trust anchors.
    pub fn roots(&self) -> Result<RootCertStore, Error> {
        let certificates = match self {
            Trust::PublicRoots => {
                return Ok(RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                });
            }
            Trust::Inline(value) => inline_certificates(value)?,
            Trust::File(path) => file_certificates(path)?,
        };
        let mut roots = RootCertStore::empty();
        for certificate in certificates {
            roots
                .add(certificate)
                .map_err(|error| Error::BadCaCertificate { error })?;
        }
        Ok(roots)
    }
}

/// The certificates of an inline value: base64 of one certificate's DER, or of a PEM file.
fn inline_certificates(value: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bad = |why: &str| Error::BadInlineCa {
        value: quote(value),
        why: why.to_string(),
    };
    let base64 = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=');
    if value.is_empty() {
        return Err(bad("it is empty"));
    }
    if !value.bytes().all(base64) {
        return Err(bad("it has characters outside base64's alphabet"));
    }
    // The value is a PEM body: rustls's PEM reader decodes it.
    let wrapped = format!("-----BEGIN CERTIFICATE-----\n{value}\n-----END CERTIFICATE-----\n");
    let decoded = CertificateDer::from_pem_slice(wrapped.as_bytes())
        .map_err(|e| bad(&format!("it does not decode: {e}")))?;
    if decoded.starts_with(b"-----BEGIN") {
        return pem_certificates(&decoded).map_err(|why| bad(&format!("its PEM: {why}")));
    }
    Ok(vec![decoded])
}

/// The certificates of the PEM file at `path`.
fn file_certificates(path: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let cannot_read = |error| Error::CaFile {
        path: path.to_string(),
        error,
    };
    // Only a regular file: PID 1's loop runs this fetch, and a read of a FIFO or a terminal
    // (a typo) would wait for ever.
    let metadata = std::fs::metadata(path).map_err(cannot_read)?;
    if !metadata.is_file() {
        return Err(Error::CaNotAFile(path.to_string()));
    }
    let file = std::fs::File::open(path).map_err(cannot_read)?;
    let mut pem = Vec::new();
    // One byte more than the limit tells a file at the limit from a larger one.
    file.take(MAX_CA_FILE.saturating_add(1))
        .read_to_end(&mut pem)
        .map_err(cannot_read)?;
    if u64::try_from(pem.len()).is_ok_and(|n| n > MAX_CA_FILE) {
        return Err(Error::CaFileTooLarge(path.to_string()));
    }
    pem_certificates(&pem).map_err(|why| Error::BadCaFile {
        path: path.to_string(),
        why,
    })
}

/// Every certificate of a PEM text (other blocks skipped), or what is wrong with it.
fn pem_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certificates.is_empty() {
        return Err("no -----BEGIN CERTIFICATE----- block".to_string());
    }
    Ok(certificates)
}

/// The TLS client of one fetch, trusting `roots`.
fn client_config(roots: RootCertStore) -> Result<rustls::ClientConfig, Error> {
    // rustls 0.23.48 deprecates ring's provider for its lack of post-quantum key exchange
    // (ring has none); it is the provider that cross-builds for every target of ours.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(Error::Setup)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// The TLS handshake over `stream` with `host` (a DNS name or an IP address, IPv6 without
/// brackets), its certificate verified against `roots` ([`Trust::roots`], made before
/// connecting: a bad CA is said whatever the network does), which are `trusted`.
pub async fn connect(
    stream: TcpStream,
    host: &str,
    roots: RootCertStore,
    trusted: Trusted,
) -> Result<TlsStream<TcpStream>, Error> {
    let name =
        ServerName::try_from(host.to_string()).map_err(|_| Error::BadHost(host.to_string()))?;
    let connector = TlsConnector::from(Arc::new(client_config(roots)?));
    connector
        .connect(name, stream)
        .await
        .map_err(|error| refusal(error, host, trusted))
}

/// The refusal a failed handshake is: rustls's error, said with what to do.
fn refusal(error: io::Error, host: &str, trusted: Trusted) -> Error {
    let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned()
    else {
        return Error::Handshake(error);
    };
    match &tls {
        rustls::Error::InvalidCertificate(certificate) => match certificate {
            CertificateError::UnknownIssuer => Error::UnknownIssuer {
                trusted,
                error: tls,
            },
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                Error::WrongHost {
                    host: host.to_string(),
                    error: tls,
                }
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => Error::Clock { error: tls },
            _ => Error::Certificate {
                trusted,
                error: tls,
            },
        },
        rustls::Error::PeerIncompatible(_)
        | rustls::Error::AlertReceived(
            AlertDescription::ProtocolVersion | AlertDescription::InsufficientSecurity,
        ) => Error::Incompatible(tls),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateHandshakeMessage { .. } => {
            Error::NotTls(tls)
        }
        rustls::Error::AlertReceived(_) => Error::Alert(tls),
        _ => Error::Handshake(error),
    }
}

/// Up to [`QUOTE`] characters of `value`, escaped for the console.
fn quote(value: &str) -> String {
    let shown: String = value.chars().take(QUOTE).collect();
    let mut text = shown.escape_default().to_string();
    if shown.len() < value.len() {
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests;
