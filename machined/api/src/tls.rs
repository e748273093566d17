//! TLS for the node API: TLS 1.3 only, rustls with the `ring` provider, ALPN `h2`.
//!
//! - The node in normal mode requires a client certificate chaining to the node API CA
//!   ([`server_config`]); the caller's role is read from that certificate's Organization
//!   ([`caller_of`]).
//! - The node in maintenance mode (no config yet) authenticates only itself, with a
//!   self-signed certificate made at start-up ([`maintenance_server_config`]).
//! - `machinectl` verifies the node against the CA of its context and presents its client
//!   certificate ([`client_config`]); with `--insecure` (maintenance mode only) it does not
//!   verify the node ([`insecure_client_config`]), and with `--cert-fingerprint` it
//!   accepts only the node certificate of that SHA-256 [`Fingerprint`]
//!   ([`pinned_client_config`]), the one the node prints on its console in maintenance
//!   mode.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use keelson_configs::pki::Role;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest as _, Sha256};

/// The ALPN protocol gRPC runs over.
pub const ALPN_H2: &[u8] = b"h2";

/// Errors from building a TLS configuration or reading a caller's certificate.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM certificate could not be parsed.
    #[error("{what} is not a PEM certificate (`-----BEGIN CERTIFICATE-----`)")]
    Certificate {
        /// Which certificate.
        what: String,
        /// The parser's error.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A PEM block held no certificate.
    #[error("{what} holds no certificate")]
    NoCertificate {
        /// Which certificate.
        what: String,
    },
    /// A PEM private key could not be parsed.
    #[error("{what} is not a PEM private key (`-----BEGIN PRIVATE KEY-----`)")]
    PrivateKey {
        /// Which key.
        what: String,
        /// The parser's error.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the configuration (a key that does not match its certificate, a CA
    /// that cannot be a trust anchor, ...).
    #[error("cannot set up TLS with {what}")]
    Config {
        /// What was being set up.
        what: String,
        /// What rustls reported.
        #[source]
        source: rustls::Error,
    },
    /// The client verifier could not be built from the CA.
    #[error("cannot use the node API CA to verify client certificates")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// The crypto provider: ring, TLS 1.3 cipher suites only.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .retain(|suite| suite.tls13().is_some());
    Arc::new(provider)
}

/// Parses every certificate of a PEM text.
pub fn parse_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Certificate {
            what: what.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what: what.to_owned(),
        });
    }
    Ok(certs)
}

/// Parses a PEM private key.
pub fn parse_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| TlsError::PrivateKey {
        what: what.to_owned(),
        source,
    })
}

fn roots(ca_pem: &str, what: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(ca_pem, what)? {
        roots.add(cert).map_err(|source| TlsError::Config {
            what: what.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

/// The node's TLS configuration in normal mode: its certificate chain and key, and client
/// certificates required and verified against `client_ca_pem` (the node API CA).
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(client_ca_pem, "the node API CA")?),
        provider.clone(),
    )
    .build()
    .map_err(TlsError::Verifier)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config {
            what: "TLS 1.3".into(),
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            parse_certs(cert_pem, "the node API server certificate")?,
            parse_key(key_pem, "the node API server key")?,
        )
        .map_err(|source| TlsError::Config {
            what: "the node API server certificate and key".into(),
            source,
        })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The node's TLS configuration in maintenance mode: server authentication only.
pub fn maintenance_server_config(
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config {
            what: "TLS 1.3".into(),
            source,
        })?
        .with_no_client_auth()
        .with_single_cert(
            parse_certs(cert_pem, "the maintenance certificate")?,
            parse_key(key_pem, "the maintenance key")?,
        )
        .map_err(|source| TlsError::Config {
            what: "the maintenance certificate and key".into(),
            source,
        })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// `machinectl`'s TLS configuration: trust only `ca_pem` (the node API CA of the context)
/// and present the client certificate.
pub fn client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config {
            what: "TLS 1.3".into(),
            source,
        })?
        .with_root_certificates(roots(ca_pem, "the context's CA")?)
        .with_client_auth_cert(
            parse_certs(cert_pem, "the context's client certificate")?,
            parse_key(key_pem, "the context's client key")?,
        )
        .map_err(|source| TlsError::Config {
            what: "the client certificate and key".into(),
            source,
        })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The SHA-256 of a certificate's DER encoding, as `openssl x509 -fingerprint -sha256`
/// prints it (`AB:CD:...`, 32 bytes): how an operator compares the certificate a node in
/// maintenance mode prints on its console with the one `machinectl --insecure` saw.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }

    /// The fingerprint of the first certificate of a PEM text: the end-entity certificate
    /// of a chain, the one a client's verifier is handed.
    pub fn of_pem(pem: &str, what: &str) -> Result<Fingerprint, TlsError> {
        let certs = parse_certs(pem, what)?;
        let first = certs.first().ok_or_else(|| TlsError::NoCertificate {
            what: what.to_owned(),
        })?;
        Ok(Fingerprint::of(first.as_ref()))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{byte:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A `--cert-fingerprint` that is not a SHA-256 fingerprint.
#[derive(Debug, thiserror::Error)]
#[error(
    "{text:?} is not a SHA-256 certificate fingerprint: {problem}; give the 64 hexadecimal digits the node prints on its console in maintenance mode (colons optional, e.g. AB:CD:...)"
)]
pub struct FingerprintParseError {
    /// What was given.
    text: String,
    /// What is wrong with it.
    problem: String,
}

impl FromStr for Fingerprint {
    type Err = FingerprintParseError;

    /// Reads 64 hexadecimal digits, in either case, with or without colons between bytes
    /// (a leading `SHA256:` or `sha256=` is allowed as well).
    fn from_str(text: &str) -> Result<Fingerprint, FingerprintParseError> {
        let refuse = |problem: String| FingerprintParseError {
            text: text.to_owned(),
            problem,
        };
        let trimmed = text.trim();
        let body = trimmed
            .get(..7)
            .filter(|head| {
                head.eq_ignore_ascii_case("sha256:") || head.eq_ignore_ascii_case("sha256=")
            })
            .map_or(trimmed, |_| trimmed.get(7..).unwrap_or_default());
        let digits: Vec<u8> = body.bytes().filter(|b| *b != b':').collect();
        if let Some(bad) = digits.iter().find(|b| !b.is_ascii_hexdigit()) {
            return Err(refuse(format!(
                "{:?} is not a hexadecimal digit",
                char::from(*bad)
            )));
        }
        if digits.len() != 64 {
            return Err(refuse(format!(
                "{} hexadecimal digits, not 64",
                digits.len()
            )));
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
            let pair = std::str::from_utf8(pair).unwrap_or_default();
            *byte = u8::from_str_radix(pair, 16).map_err(|e| refuse(e.to_string()))?;
        }
        Ok(Fingerprint(bytes))
    }
}

/// The node's certificate is not the one `--cert-fingerprint` named (the verifier's
/// refusal, found again by the client to name the node).
#[derive(Debug, thiserror::Error)]
#[error("the certificate's SHA-256 fingerprint is {seen}, not the expected {expected}")]
pub struct FingerprintMismatch {
    /// The fingerprint of the certificate the node presented.
    pub seen: Fingerprint,
    /// The fingerprint given.
    pub expected: Fingerprint,
}

/// `machinectl --insecure`: no client certificate, and the node's certificate is not
/// verified (a node in maintenance mode has only a self-signed one). The handshake
/// signatures are still checked, so the session is at least bound to that key.
pub fn insecure_client_config() -> Result<Arc<ClientConfig>, TlsError> {
    maintenance_client_config(None)
}

/// `machinectl --cert-fingerprint`: as [`insecure_client_config`], but the node's
/// certificate must be the one with this fingerprint: any other ends the handshake with a
/// [`FingerprintMismatch`] (in `rustls::CertificateError::Other`).
pub fn pinned_client_config(expected: Fingerprint) -> Result<Arc<ClientConfig>, TlsError> {
    maintenance_client_config(Some(expected))
}

fn maintenance_client_config(expected: Option<Fingerprint>) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = MaintenanceServerCert {
        provider: provider.clone(),
        expected,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config {
            what: "TLS 1.3".into(),
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Accepts a maintenance-mode node's self-signed certificate: any (`--insecure`), or only
/// the one of the expected fingerprint (`--cert-fingerprint`). The end-entity certificate
/// alone counts: it is the one whose key signs the handshake.
#[derive(Debug)]
struct MaintenanceServerCert {
    provider: Arc<CryptoProvider>,
    expected: Option<Fingerprint>,
}

impl ServerCertVerifier for MaintenanceServerCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = Fingerprint::of(end_entity.as_ref());
        match self.expected {
            Some(expected) if expected != seen => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(
                    FingerprintMismatch { seen, expected },
                ))),
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Who is calling: the role and the common name of a verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The role from the certificate's Organization, if it carries one of ours.
    pub role: Option<Role>,
    /// The certificate's subject common name (the user).
    pub user: String,
}

/// Reads the caller from a client certificate (already verified by the TLS layer). When
/// the certificate carries several of our roles, the most powerful counts.
pub fn caller_of(cert: &CertificateDer<'_>) -> Caller {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Caller {
            role: None,
            user: String::new(),
        };
    };
    let subject = parsed.subject();
    let role = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok())
        .filter_map(Role::from_organization)
        .max_by_key(|r| crate::api::rank(*r));
    let user = subject
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    Caller { role, user }
}

/// The validity window of a PEM certificate: (not before, not after), as Unix seconds.
pub fn validity(cert_pem: &str) -> Option<(i64, i64)> {
    let der = parse_certs(cert_pem, "certificate")
        .ok()?
        .into_iter()
        .next()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let v = parsed.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use keelson_configs::pki;

    #[test]
    fn caller_role_comes_from_the_organization() {
        let ca = pki::generate_ca("node api").unwrap();
        for role in Role::ALL {
            let leaf = pki::issue_api_client(&ca, "alice", role).unwrap();
            let cert = parse_certs(&leaf.cert, "leaf").unwrap().remove(0);
            assert_eq!(
                caller_of(&cert),
                Caller {
                    role: Some(role),
                    user: "alice".into()
                }
            );
        }
        let other = pki::issue(
            &ca,
            &pki::LeafRequest {
                common_name: "bob".into(),
                organizations: vec!["system:masters".into()],
                sans: vec![],
                usage: pki::Usage::Client,
            },
        )
        .unwrap();
        let cert = parse_certs(&other.cert, "leaf").unwrap().remove(0);
        assert_eq!(caller_of(&cert).role, None);
    }

    #[test]
    fn fingerprints_read_as_operators_write_them() {
        let ca = pki::generate_ca("maintenance").unwrap();
        let fingerprint = Fingerprint::of_pem(&ca.cert, "ca").unwrap();
        let shown = fingerprint.to_string();
        assert_eq!(shown.len(), 32 * 3 - 1, "{shown}");
        assert!(
            shown.split(':').all(|b| b.len() == 2
                && b.bytes()
                    .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())),
            "{shown}"
        );
        let bare = shown.replace(':', "");
        for text in [
            shown.clone(),
            shown.to_lowercase(),
            bare.clone(),
            bare.to_lowercase(),
            format!("  {bare}\n"),
            format!("SHA256:{shown}"),
            format!("sha256={bare}"),
        ] {
            assert_eq!(
                text.parse::<Fingerprint>().unwrap(),
                fingerprint,
                "{text:?}"
            );
        }
        for (text, problem) in [
            (&bare[2..], "62 hexadecimal digits, not 64"),
            ("", "0 hexadecimal digits, not 64"),
            (
                &format!("{}zz", &bare[2..]),
                "'z' is not a hexadecimal digit",
            ),
            (&format!("{bare}00"), "66 hexadecimal digits"),
        ] {
            let err = text.parse::<Fingerprint>().unwrap_err().to_string();
            assert!(err.contains(problem), "{text:?}: {err}");
            assert!(err.contains("the node prints on its console"), "{err}");
        }

        // A chain's fingerprint is its first certificate's.
        let leaf = pki::issue_api_client(&ca, "alice", Role::Admin).unwrap();
        let chain = format!("{}{}", leaf.cert, ca.cert);
        assert_eq!(
            Fingerprint::of_pem(&chain, "chain").unwrap(),
            Fingerprint::of_pem(&leaf.cert, "leaf").unwrap()
        );
        assert!(Fingerprint::of_pem("junk", "junk").is_err());
    }

    #[test]
    fn configs_build_and_refuse_garbage() {
        let ca = pki::generate_ca("node api").unwrap();
        let leaf = pki::issue_api_client(&ca, "alice", Role::Admin).unwrap();
        client_config(&ca.cert, &leaf.cert, &leaf.key).unwrap();
        insecure_client_config().unwrap();
        pinned_client_config("00".repeat(32).parse().unwrap()).unwrap();
        let err = client_config("junk", &leaf.cert, &leaf.key).unwrap_err();
        assert!(err.to_string().contains("holds no certificate"), "{err}");
        let err = client_config(&ca.cert, &leaf.cert, "junk").unwrap_err();
        assert!(err.to_string().contains("not a PEM private key"), "{err}");
    }
}
