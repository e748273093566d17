//! The node's own TLS identity.
//!
//! - A control plane carries the node API CA's key in its config: at every start (and
//!   whenever its addresses or `machine.api.cert_sans` change) it issues itself a server
//!   certificate for its hostname, every address it has, loopback and the configured extra
//!   names.
//! - A worker carries only the CA certificate. It uses the certificate in
//!   `STATE/node-api/` that the join flow stores there; it never gets the CA key.
//! - A node in maintenance mode has no CA at all: it makes a throwaway self-signed
//!   certificate, and clients connect with `--insecure`, as with Talos.

use std::collections::BTreeSet;
use std::net::IpAddr;

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
/// right away) and a server certificate for the node's names.
pub fn maintenance_identity(addresses: &BTreeSet<IpAddr>) -> Result<CertAndKey, IdentityError> {
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
