//! The node's own TLS identity.
//!
//! - A control plane carries the node API CA's key in its config: at every start (and
//!   whenever its addresses or `machine.api.cert_sans` change) it issues itself a server
//!   certificate for its hostname, every address it has, loopback and the configured extra
//!   names.
//! - A worker carries only the CA certificate. It uses the certificate and key in
//!   `STATE/node-api/`, which its config's `machine.files` puts there
//!   (`machinectl cluster create` does); it never gets the CA key.
//! - [`tls_from`] builds the TLS configuration from a config and the files it would find
//!   ([`WorkerFiles`]), reading nothing: machined serves with it, and `apply-config`
//!   builds it from a candidate config before anything is written, so a config whose CA
//!   key is not its certificate's, or a worker's without a certificate issued from that
//!   CA, is refused instead of leaving a node whose API no client can reach.
//! - A node in maintenance mode has no CA at all: it makes a throwaway self-signed
//!   certificate, and clients connect with `--insecure`, as with Talos. So that the first
//!   config goes to this node and no other, the certificate's SHA-256 fingerprint is
//!   logged and printed on the console ([`crate::console`]); `machinectl --insecure` shows
//!   the one it saw and `machinectl --cert-fingerprint` accepts no other.

use std::collections::BTreeSet;
use std::net::IpAddr;

use std::sync::Arc;

use keelson_api::tls::{self, Fingerprint};
use keelson_configs::MachineConfig;
use keelson_configs::pki::{self, CertAndKey, LeafRequest, Usage};
use keelson_node_protocol::state as state_layout;
use rustls::ServerConfig;
use rustls::client::danger::ServerCertVerifier as _;

use crate::server::state::StateStore;

/// Errors from making the node's certificate.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Issuing failed.
    #[error("cannot issue the node API server certificate")]
    Issue(#[source] pki::PkiError),
    /// A worker without its node API certificate or key.
    #[error(
        "cluster.secrets.node_api_ca carries no key (a worker), and neither machine.files nor STATE holds the node API server {missing}; a worker serves the node API with a certificate issued from cluster.secrets.node_api_ca: add it and its key to machine.files at those paths (`machinectl cluster create` does)"
    )]
    NoWorkerCertificate {
        /// The paths missing.
        missing: String,
    },
    /// The node API CA's certificate and key do not go together.
    #[error(
        "cluster.secrets.node_api_ca: the node API certificate cannot be issued from this CA; give the certificate and key of one CA from secrets.toml"
    )]
    Ca(#[source] pki::PkiError),
    /// The server certificate or key cannot be used.
    #[error(
        "the node API server certificate from {from} cannot be used with its key and cluster.secrets.node_api_ca; give a PEM certificate issued from that CA and its own PEM key"
    )]
    Tls {
        /// Where the certificate comes from.
        from: String,
        /// What TLS reported.
        #[source]
        source: tls::TlsError,
    },
    /// The server certificate does not chain to the node API CA.
    #[error(
        "the node API server certificate from {from} is not issued from cluster.secrets.node_api_ca, so no client would trust it; give a certificate issued from that CA"
    )]
    NotFromCa {
        /// Where the certificate comes from.
        from: String,
        /// What the verifier reported.
        #[source]
        source: rustls::Error,
    },
    /// The maintenance certificate just made could not be read back.
    #[error("cannot read the maintenance certificate to print its fingerprint")]
    Fingerprint(#[source] tls::TlsError),
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

/// The kernel's hostname before anything set one.
const UNSET_HOSTNAME: &str = "(none)";

/// The names the server certificate carries: hostname, `localhost`, loopback, the given
/// addresses, the config's static addresses and `machine.api.cert_sans`. The hostname is
/// the config's when it names one (PID 1 sets it from there; in maintenance mode, when a
/// candidate config is judged, the kernel's is still unset), else the kernel's if set.
pub fn server_sans(config: &MachineConfig, addresses: &BTreeSet<IpAddr>) -> Vec<String> {
    let mut names: BTreeSet<String> = BTreeSet::new();
    names.insert("localhost".into());
    names.insert("127.0.0.1".into());
    names.insert("::1".into());
    match &config.machine.hostname {
        Some(h) => {
            names.insert(h.clone());
        }
        None => {
            if let Ok(h) = nix::unistd::gethostname()
                && let Some(h) = h.to_str()
                && !h.is_empty()
                && h != UNSET_HOSTNAME
            {
                names.insert(h.to_owned());
            }
        }
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

/// One PEM text a worker's identity is made of, and where it was found (for errors).
#[derive(Debug, Clone)]
pub struct Found {
    /// The PEM text.
    pub text: String,
    /// Where it comes from: `machine.files[N] (PATH)` or a file in STATE.
    pub from: String,
}

/// A worker's node API certificate and key, where the node finds them.
#[derive(Debug, Clone, Default)]
pub struct WorkerFiles {
    /// The certificate (PEM), if found.
    pub cert: Option<Found>,
    /// The key (PEM), if found.
    pub key: Option<Found>,
}

impl WorkerFiles {
    /// What a node running `config` finds: each of the config's `machine.files` entries
    /// for STATE's `node-api/` (PID 1 writes them there before machined starts, and on a
    /// live apply), else the file STATE holds now.
    pub fn find(config: &MachineConfig, store: &StateStore) -> Result<WorkerFiles, IdentityError> {
        let (cert_path, key_path) = store.node_api_cert_paths();
        Ok(WorkerFiles {
            cert: found(config, state_layout::NODE_API_CERT, &cert_path)?,
            key: found(config, state_layout::NODE_API_KEY, &key_path)?,
        })
    }
}

/// `name` (a path inside STATE) from the config's `machine.files` (the last entry for
/// it wins, as PID 1 writes them in order), else from `in_state`.
fn found(
    config: &MachineConfig,
    name: &str,
    in_state: &std::path::Path,
) -> Result<Option<Found>, IdentityError> {
    let wanted = on_node(name);
    if let Some((i, file)) = config
        .machine
        .files
        .iter()
        .enumerate()
        .rev()
        .find(|(_, f)| f.path == wanted)
    {
        return Ok(Some(Found {
            text: file.content.clone(),
            from: format!("machine.files[{i}] ({wanted})"),
        }));
    }
    match std::fs::read_to_string(in_state) {
        Ok(text) => Ok(Some(Found {
            text,
            from: in_state.display().to_string(),
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IdentityError::Read {
            path: in_state.display().to_string(),
            source,
        }),
    }
}

/// The node API's TLS configuration for a configured node, and the names its certificate
/// carries: what machined serves with at start and after `machine.api` changes, and what
/// `apply-config` builds from a candidate config before it writes anything.
pub fn server_tls(
    config: &MachineConfig,
    store: &StateStore,
    addresses: &BTreeSet<IpAddr>,
) -> Result<(Arc<ServerConfig>, Vec<String>), IdentityError> {
    let worker = if config.cluster.secrets.node_api_ca.key.is_none() {
        WorkerFiles::find(config, store)?
    } else {
        WorkerFiles::default()
    };
    tls_from(config, &worker, addresses)
}

/// [`server_tls`] from the files given: no file is read. The server certificate must
/// chain to `cluster.secrets.node_api_ca` (clients verify it against that CA) and match
/// its key.
pub fn tls_from(
    config: &MachineConfig,
    worker: &WorkerFiles,
    addresses: &BTreeSet<IpAddr>,
) -> Result<(Arc<ServerConfig>, Vec<String>), IdentityError> {
    let id = identity_from(config, worker, addresses)?;
    let from = worker.cert.as_ref().map_or_else(
        || "cluster.secrets.node_api_ca".to_owned(),
        |f| f.from.clone(),
    );
    let tls = tls::server_config(&id.cert.cert, &id.cert.key, &id.client_ca).map_err(|source| {
        IdentityError::Tls {
            from: from.clone(),
            source,
        }
    })?;
    check_chain(&id, &from)?;
    Ok((tls, id.sans))
}

/// The server identity of a configured node, from the files given: a control plane
/// issues its certificate from the CA (whose key must be the CA certificate's), a worker
/// uses the files found.
pub fn identity_from(
    config: &MachineConfig,
    worker: &WorkerFiles,
    addresses: &BTreeSet<IpAddr>,
) -> Result<ServerIdentity, IdentityError> {
    let ca = &config.cluster.secrets.node_api_ca;
    let client_ca = ca.cert.as_str().to_owned();
    let sans = server_sans(config, addresses);
    let Some(key) = &ca.key else {
        let (Some(cert), Some(key)) = (&worker.cert, &worker.key) else {
            return Err(IdentityError::NoWorkerCertificate {
                missing: [
                    (&worker.cert, state_layout::NODE_API_CERT),
                    (&worker.key, state_layout::NODE_API_KEY),
                ]
                .into_iter()
                .filter(|(f, _)| f.is_none())
                .map(|(_, name)| on_node(name))
                .collect::<Vec<_>>()
                .join(" and "),
            });
        };
        return Ok(ServerIdentity {
            cert: CertAndKey {
                cert: cert.text.clone(),
                key: key.text.clone(),
            },
            client_ca,
            sans,
        });
    };
    let ca = CertAndKey {
        cert: ca.cert.as_str().to_owned(),
        key: key.as_str().to_owned(),
    };
    pki::check_ca(&ca).map_err(IdentityError::Ca)?;
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

/// Where `name` (a path inside STATE) is on the node.
fn on_node(name: &str) -> String {
    format!("{}/{name}", keelson_configs::layout::STATE_MOUNT)
}

/// Checks that the server certificate chains to the node API CA, as clients check it.
/// Its names and dates are not judged here: clients reach the node by names the node
/// cannot know, and the clock may not be synced yet at boot.
fn check_chain(id: &ServerIdentity, from: &str) -> Result<(), IdentityError> {
    let tls_error = |source| IdentityError::Tls {
        from: from.to_owned(),
        source,
    };
    let chain =
        tls::parse_certs(&id.cert.cert, "the node API server certificate").map_err(tls_error)?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in tls::parse_certs(&id.client_ca, "the node API CA").map_err(tls_error)? {
        roots.add(ca).map_err(|source| IdentityError::NotFromCa {
            from: from.to_owned(),
            source,
        })?;
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        tls::provider(),
    )
    .build()
    .map_err(|e| IdentityError::NotFromCa {
        from: from.to_owned(),
        source: rustls::Error::General(e.to_string()),
    })?;
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Ok(());
    };
    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| {
        IdentityError::NotFromCa {
            from: from.to_owned(),
            source: rustls::Error::General(e.to_string()),
        }
    })?;
    use rustls::CertificateError as E;
    match verifier.verify_server_cert(
        leaf,
        intermediates,
        &name,
        &[],
        rustls::pki_types::UnixTime::now(),
    ) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InvalidCertificate(
            E::NotValidForName
            | E::NotValidForNameContext { .. }
            | E::Expired
            | E::ExpiredContext { .. }
            | E::NotValidYet
            | E::NotValidYetContext { .. },
        )) => Ok(()),
        Err(source) => Err(IdentityError::NotFromCa {
            from: from.to_owned(),
            source,
        }),
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
        server: Arc<ServerConfig>,
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

        let server = tls::maintenance_server_config(&identity.cert, &identity.key).unwrap();
        let seen = handshake(tls::insecure_client_config().unwrap(), server.clone()).unwrap();
        assert_eq!(Fingerprint::of(seen[0].as_ref()), logged_fingerprint);
        let pinned = tls::pinned_client_config(logged_fingerprint).unwrap();
        handshake(pinned, server.clone()).unwrap();

        // Another maintenance start makes another certificate, which the pin refuses.
        let other = make_maintenance_identity(&addresses).unwrap();
        let other_server = tls::maintenance_server_config(&other.cert, &other.key).unwrap();
        let pinned = tls::pinned_client_config(logged_fingerprint).unwrap();
        let err = handshake(pinned, other_server).unwrap_err();
        let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(refusal)) = &err
        else {
            panic!("{err}");
        };
        let mismatch = refusal
            .0
            .downcast_ref::<tls::FingerprintMismatch>()
            .unwrap_or_else(|| panic!("{err}"));
        assert_eq!(mismatch.expected, logged_fingerprint);
        assert_eq!(
            mismatch.seen,
            Fingerprint::of_pem(&other.cert, "other").unwrap()
        );
    }
}
