//! The node's own TLS identity.
//!
//! - A control plane carries the node API CA's key in its config: at every start (and
//!   whenever its addresses or `machine.api.cert_sans` change) it issues itself a server
//!   certificate for its hostname, every address it has, loopback and the configured extra
//!   names.
//! - A worker carries only the CA certificate. It uses the certificate in
//!   `STATE/node-api/` that the join flow stores there; it never gets the CA key.
//! - A node in maintenance mode has no CA at all: it makes a throwaway self-signed
//!   certificate, and clients connect with `--insecure`, as with Talos. So that the first
//!   config goes to this node and no other, the certificate's SHA-256 fingerprint is
//!   logged and printed on the console ([`crate::console`]); `machinectl --insecure` shows
//!   the one it saw and `machinectl --cert-fingerprint` accepts no other.

use std::collections::BTreeSet;
use std::net::IpAddr;

use keelson_api::tls::Fingerprint;
use keelson_configs::MachineConfig;
use keelson_configs::pki::{self, CertAndKey, LeafRequest, Usage};

use crate::server::state::StateStore;

/// Errors from making the node's certificate.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Issuing failed.
    #[error("cannot issue the node API server certificate")]
    Issue(#[source] pki::PkiError),
    /// A worker without a certificate from the join flow.
    #[error(
        "this node's config carries no node API CA key (a worker) and STATE holds no node API certificate ({path}); a worker gets its certificate through the join flow, which this release does not implement yet"
    )]
    NoWorkerCertificate {
        /// Where the certificate was looked for.
        path: String,
    },
    /// The maintenance certificate just made could not be read back.
    #[error("cannot read the maintenance certificate to print its fingerprint")]
    Fingerprint(#[source] keelson_api::tls::TlsError),
    /// The worker's stored certificate could not be read.
    #[error("cannot read the node API certificate {path}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Every address of the node's interfaces (link-local IPv6 left out: it needs a zone).
pub fn interface_addresses() -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for ifa in addrs {
            let Some(addr) = ifa.address else { continue };
            if let Some(v4) = addr.as_sockaddr_in() {
                out.insert(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                let ip = v6.ip();
                if ip.segments()[0] & 0xffc0 != 0xfe80 {
                    out.insert(IpAddr::V6(ip));
                }
            }
        }
    }
    out
}

/// The names the server certificate carries: hostname, `localhost`, loopback, the given
/// addresses, the config's static addresses and `machine.api.cert_sans`.
pub fn server_sans(config: &MachineConfig, addresses: &BTreeSet<IpAddr>) -> Vec<String> {
    let mut names: BTreeSet<String> = BTreeSet::new();
    names.insert("localhost".into());
    names.insert("127.0.0.1".into());
    names.insert("::1".into());
    if let Ok(h) = nix::unistd::gethostname()
        && let Some(h) = h.to_str()
        && !h.is_empty()
    {
        names.insert(h.to_owned());
    }
    if let Some(h) = &config.machine.hostname {
        names.insert(h.clone());
    }
    for ip in addresses {
        names.insert(ip.to_string());
    }
    for iface in &config.machine.network.interfaces {
        for net in &iface.addresses {
            names.insert(net.addr().to_string());
        }
    }
    for san in &config.machine.api.cert_sans {
        names.insert(san.clone());
    }
    names.into_iter().collect()
}

/// The node API server certificate for a configured node, and the CA that clients'
/// certificates must chain to.
#[derive(Debug, Clone)]
pub struct ServerIdentity {
    /// The certificate (PEM) and key.
    pub cert: CertAndKey,
    /// The node API CA certificate (PEM).
    pub client_ca: String,
    /// The names in the certificate.
    pub sans: Vec<String>,
}

/// Makes the server identity of a configured node.
pub fn server_identity(
    config: &MachineConfig,
    store: &StateStore,
    addresses: &BTreeSet<IpAddr>,
) -> Result<ServerIdentity, IdentityError> {
    let ca = &config.cluster.secrets.node_api_ca;
    let client_ca = ca.cert.as_str().to_owned();
    let sans = server_sans(config, addresses);
    match &ca.key {
        Some(key) => {
            let ca = CertAndKey {
                cert: ca.cert.as_str().to_owned(),
                key: key.as_str().to_owned(),
            };
            let cn = config
                .machine
                .hostname
                .clone()
                .unwrap_or_else(|| "keelson-node".into());
            let cert = pki::issue(
                &ca,
                &LeafRequest {
                    common_name: cn,
                    organizations: Vec::new(),
                    sans: sans.clone(),
                    usage: Usage::Server,
                },
            )
            .map_err(IdentityError::Issue)?;
            Ok(ServerIdentity {
                cert,
                client_ca,
                sans,
            })
        }
        None => {
            let (cert_path, key_path) = store.node_api_cert_paths();
            if !cert_path.is_file() {
                return Err(IdentityError::NoWorkerCertificate {
                    path: cert_path.display().to_string(),
                });
            }
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).map_err(|source| IdentityError::Read {
                    path: p.display().to_string(),
                    source,
                })
            };
            Ok(ServerIdentity {
                cert: CertAndKey {
                    cert: read(&cert_path)?,
                    key: read(&key_path)?,
                },
                client_ca,
                sans,
            })
        }
    }
}

/// A throwaway self-signed identity for maintenance mode: a one-off CA (its key dropped
/// right away) and a server certificate for the node's names. Its fingerprint is
/// announced on the console ([`announce_maintenance`]): each start makes a new one.
pub fn maintenance_identity(addresses: &BTreeSet<IpAddr>) -> Result<CertAndKey, IdentityError> {
    let identity = make_maintenance_identity(addresses)?;
    announce_maintenance(&identity)?;
    Ok(identity)
}

/// Logs, and prints on the console, the SHA-256 fingerprint of a maintenance identity's
/// certificate: its first, the end-entity certificate that clients are handed and
/// `machinectl` fingerprints. Returns it.
pub fn announce_maintenance(identity: &CertAndKey) -> Result<Fingerprint, IdentityError> {
    let fingerprint = Fingerprint::of_pem(&identity.cert, "the maintenance certificate")
        .map_err(IdentityError::Fingerprint)?;
    tracing::info!(
        target: crate::console::TARGET,
        "{}",
        fingerprint_line(fingerprint)
    );
    Ok(fingerprint)
}

/// The console line of maintenance mode's certificate fingerprint.
pub fn fingerprint_line(fingerprint: Fingerprint) -> String {
    format!(
        "maintenance mode: the API's certificate SHA-256 fingerprint is {fingerprint} (machinectl --insecure shows the one it sees; machinectl --cert-fingerprint accepts only this one)"
    )
}

fn make_maintenance_identity(addresses: &BTreeSet<IpAddr>) -> Result<CertAndKey, IdentityError> {
    let ca = pki::generate_ca("keelson maintenance").map_err(IdentityError::Issue)?;
    let mut sans: Vec<String> = vec!["localhost".into()];
    sans.extend(addresses.iter().map(ToString::to_string));
    let mut leaf = pki::issue(
        &ca,
        &LeafRequest {
            common_name: "keelson maintenance".into(),
            organizations: Vec::new(),
            sans,
            usage: Usage::Server,
        },
    )
    .map_err(IdentityError::Issue)?;
    leaf.cert.push_str(&ca.cert);
    Ok(leaf)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt as _;

    /// A log that keeps what it is given.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A TLS 1.3 handshake in memory between `client` and `server`; the client's view of
    /// the server's certificates, or the error that ended the handshake.
    fn handshake(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, rustls::Error> {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(client, name).unwrap();
        let mut server = rustls::ServerConnection::new(server).unwrap();
        for _ in 0..10 {
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets()?;
            let mut wire = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut wire).unwrap();
            }
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(client.peer_certificates().unwrap().to_vec());
            }
        }
        panic!("the handshake did not end");
    }

    /// The fingerprint in the logged console line is the one a client computes from the
    /// certificate the node serves, and the one `--cert-fingerprint` must be given.
    #[test]
    fn the_logged_fingerprint_is_the_one_clients_see() {
        let log = Captured::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || writer.clone())
                .with_ansi(false),
        );
        let addresses = BTreeSet::from([IpAddr::from([127, 0, 0, 1])]);
        let identity = tracing::subscriber::with_default(subscriber, || {
            maintenance_identity(&addresses).unwrap()
        });
        let logged = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        let line = logged
            .lines()
            .find(|l| l.contains("maintenance mode: the API's certificate SHA-256 fingerprint is "))
            .unwrap_or_else(|| panic!("no fingerprint line in {logged:?}"));
        assert!(line.contains(crate::console::TARGET), "{line}");
        let text = line
            .split("fingerprint is ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap();
        let logged_fingerprint: Fingerprint = text.parse().unwrap();
        assert_eq!(text, logged_fingerprint.to_string(), "AB:CD:... as logged");

        let server =
            keelson_api::tls::maintenance_server_config(&identity.cert, &identity.key).unwrap();
        let seen = handshake(
            keelson_api::tls::insecure_client_config().unwrap(),
            server.clone(),
        )
        .unwrap();
        assert_eq!(Fingerprint::of(seen[0].as_ref()), logged_fingerprint);
        let pinned = keelson_api::tls::pinned_client_config(logged_fingerprint).unwrap();
        handshake(pinned, server.clone()).unwrap();

        // Another maintenance start makes another certificate, which the pin refuses.
        let other = make_maintenance_identity(&addresses).unwrap();
        let other_server =
            keelson_api::tls::maintenance_server_config(&other.cert, &other.key).unwrap();
        let pinned = keelson_api::tls::pinned_client_config(logged_fingerprint).unwrap();
        let err = handshake(pinned, other_server).unwrap_err();
        let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(refusal)) = &err
        else {
            panic!("{err}");
        };
        let mismatch = refusal
            .0
            .downcast_ref::<keelson_api::tls::FingerprintMismatch>()
            .unwrap_or_else(|| panic!("{err}"));
        assert_eq!(mismatch.expected, logged_fingerprint);
        assert_eq!(
            mismatch.seen,
            Fingerprint::of_pem(&other.cert, "other").unwrap()
        );
    }
}
