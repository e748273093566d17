//! TLS for the node API: TLS 1.3 only, rustls with the `ring` provider, ALPN `h2`.
//!
//! - The node in normal mode requires a client certificate chaining to the node API CA
//!   ([`server_config`]); the caller's role is read from that certificate's Organization
//!   ([`caller_of`]).
//! - The node in maintenance mode (no config yet) authenticates only itself, with a
//!   self-signed certificate made at start-up ([`maintenance_server_config`]).
//! - `machinectl` verifies the node against the CA of its context and presents its client
//!   certificate ([`client_config`]); with `--insecure` (maintenance mode only) it does not
//!   verify the node ([`insecure_client_config`]).

use std::sync::Arc;

use keelson_configs::pki::Role;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

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

/// `machinectl --insecure`: no client certificate, and the node's certificate is not
/// verified (a node in maintenance mode has only a self-signed one). The handshake
/// signatures are still checked, so the session is at least bound to that key.
pub fn insecure_client_config() -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config {
            what: "TLS 1.3".into(),
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct AnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
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
    fn configs_build_and_refuse_garbage() {
        let ca = pki::generate_ca("node api").unwrap();
        let leaf = pki::issue_api_client(&ca, "alice", Role::Admin).unwrap();
        client_config(&ca.cert, &leaf.cert, &leaf.key).unwrap();
        insecure_client_config().unwrap();
        let err = client_config("junk", &leaf.cert, &leaf.key).unwrap_err();
        assert!(err.to_string().contains("holds no certificate"), "{err}");
        let err = client_config(&ca.cert, &leaf.cert, "junk").unwrap_err();
        assert!(err.to_string().contains("not a PEM private key"), "{err}");
    }
}
