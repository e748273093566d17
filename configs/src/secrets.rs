//! Cluster secrets: everything a cluster's nodes share, kept in `secrets.toml`.
//!
//! `machinectl gen config` writes this file next to the machine configs and reads it back
//! with `--with-secrets FILE`, so that configs generated later (new nodes, new patches)
//! belong to the same cluster. The format (version 1):
//!
//! ```toml
//! version = 1
//! bootstrap_token = "abcdef.0123456789abcdef"     # kubeadm format, for kubelet TLS bootstrap
//! api_join_token = "ghijkl.0123456789abcdef"      # same format; a node's node API cert request
//! encryption_key = "<base64 of 32 bytes>"         # Secret encryption at rest
//! service_account_key = """-----BEGIN PRIVATE KEY-----..."""
//!
//! [kubernetes_ca]     # also [etcd_ca], [front_proxy_ca], [node_api_ca]
//! cert = """-----BEGIN CERTIFICATE-----..."""
//! key = """-----BEGIN PRIVATE KEY-----..."""
//! ```
//!
//! Loading is strict: unknown keys are refused, every value is checked (PEM decodes, each CA
//! is a CA and its key matches its certificate, the token and encryption key have their
//! formats), and every error names the file, the line and column, and the key.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::pki::{self, BootstrapToken, CertAndKey, EncryptionKey, PkiError};

/// The `version` this code writes and reads.
pub const SECRETS_VERSION: u32 = 1;

/// What to do when a secrets file is damaged, appended to every error about its content.
const FIX_HINT: &str = "restore the file from your backup, or run `machinectl gen config` without --with-secrets to create a new cluster with new secrets";

/// Errors from generating, loading or serializing cluster secrets.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// Generating key material failed.
    #[error("cannot generate cluster secrets")]
    Generate(#[source] PkiError),
    /// The secrets file could not be read.
    #[error("cannot read secrets file {path}; check the path given to --with-secrets")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The secrets file is not UTF-8 text.
    #[error(
        "secrets file {path} is not UTF-8 text (invalid byte at offset {offset}); pass the secrets.toml that `machinectl gen config` wrote"
    )]
    NotUtf8 {
        /// The file.
        path: String,
        /// Byte offset of the first invalid byte.
        offset: usize,
    },
    /// The secrets file is not valid TOML or does not have the expected keys and types.
    #[error("{path}:{line}:{column}: {message}; {FIX_HINT}")]
    Syntax {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the TOML parser reported.
        message: String,
    },
    /// The file has a `version` this code does not know.
    #[error(
        "{path}:{line}:{column}: key `version`: secrets format version {found} is not supported (this machinectl reads version {SECRETS_VERSION}); use the machinectl release that wrote the file"
    )]
    Version {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The version found.
        found: u32,
    },
    /// A value is present but wrong (bad PEM, not a CA, key mismatch, bad token...).
    #[error("{path}:{line}:{column}: key `{key}` is invalid ({FIX_HINT})")]
    Invalid {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The dotted key path, e.g. `etcd_ca.key`.
        key: String,
        /// What is wrong with the value.
        #[source]
        source: PkiError,
    },
    /// Serializing the secrets to TOML failed.
    #[error("cannot serialize cluster secrets to TOML")]
    Serialize(#[source] toml::ser::Error),
}

/// Everything the nodes of one cluster share. `Debug` never prints a private key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSecrets {
    /// Format version, [`SECRETS_VERSION`].
    pub version: u32,
    /// The kubeadm-format bootstrap token the kubelets use for TLS bootstrap.
    pub bootstrap_token: BootstrapToken,
    /// Authenticates a worker's request for its node API server certificate (same format).
    pub api_join_token: BootstrapToken,
    /// The key Kubernetes Secrets are encrypted with at rest.
    pub encryption_key: EncryptionKey,
    /// The service-account token signing key (PKCS#8 PEM).
    pub service_account_key: String,
    /// The Kubernetes cluster CA (`kubernetes`).
    pub kubernetes_ca: CertAndKey,
    /// The etcd CA (`etcd-ca`).
    pub etcd_ca: CertAndKey,
    /// The front-proxy (aggregation layer) CA (`front-proxy-ca`).
    pub front_proxy_ca: CertAndKey,
    /// The CA of the node API (machined's mTLS); it signs server and client certificates.
    pub node_api_ca: CertAndKey,
}

impl fmt::Debug for ClusterSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterSecrets")
            .field("version", &self.version)
            .field("bootstrap_token", &self.bootstrap_token)
            .field("api_join_token", &self.api_join_token)
            .field("encryption_key", &self.encryption_key)
            .field("service_account_key", &"<redacted>")
            .field("kubernetes_ca", &self.kubernetes_ca)
            .field("etcd_ca", &self.etcd_ca)
            .field("front_proxy_ca", &self.front_proxy_ca)
            .field("node_api_ca", &self.node_api_ca)
            .finish()
    }
}

/// The subject common names of the generated CAs (kubeadm's names where kubeadm has one).
pub mod ca_names {
    /// The Kubernetes cluster CA.
    pub const KUBERNETES: &str = "kubernetes";
    /// The etcd CA.
    pub const ETCD: &str = "etcd-ca";
    /// The front-proxy CA.
    pub const FRONT_PROXY: &str = "front-proxy-ca";
    /// The node API CA.
    pub const NODE_API: &str = "keelson-node-api-ca";
}

/// The header written above the TOML of a secrets file.
const HEADER: &str = "\
# Keelson cluster secrets, written by `machinectl gen config`.
# This file holds every CA private key of the cluster: keep it private and backed up.
# Reuse it with `machinectl gen config --with-secrets secrets.toml` to add nodes later.
";

impl ClusterSecrets {
    /// Generates a fresh set of secrets for a new cluster.
    pub fn generate() -> Result<ClusterSecrets, SecretsError> {
        let g = || -> Result<ClusterSecrets, PkiError> {
            Ok(ClusterSecrets {
                version: SECRETS_VERSION,
                bootstrap_token: BootstrapToken::generate()?,
                api_join_token: BootstrapToken::generate()?,
                encryption_key: EncryptionKey::generate()?,
                service_account_key: pki::generate_service_account_key()?,
                kubernetes_ca: pki::generate_ca(ca_names::KUBERNETES)?,
                etcd_ca: pki::generate_ca(ca_names::ETCD)?,
                front_proxy_ca: pki::generate_ca(ca_names::FRONT_PROXY)?,
                node_api_ca: pki::generate_ca(ca_names::NODE_API)?,
            })
        };
        g().map_err(SecretsError::Generate)
    }

    /// Reads and checks a secrets file.
    pub fn load(path: &Path) -> Result<ClusterSecrets, SecretsError> {
        let display = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| SecretsError::Read {
            path: display.clone(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|e| SecretsError::NotUtf8 {
            path: display.clone(),
            offset: e.utf8_error().valid_up_to(),
        })?;
        ClusterSecrets::from_toml_str(&text, &display)
    }

    /// Parses and checks the text of a secrets file; `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<ClusterSecrets, SecretsError> {
        let raw: RawSecrets = toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map_or((1, 1), |span| line_column(text, span.start));
            SecretsError::Syntax {
                path: origin.to_owned(),
                line,
                column,
                message: e.message().trim_end().to_owned(),
            }
        })?;
        raw.check(text, origin)
    }

    /// The secrets as the text of a secrets file (with a comment header).
    pub fn to_toml_string(&self) -> Result<String, SecretsError> {
        let body = toml::to_string(self).map_err(SecretsError::Serialize)?;
        Ok(format!("{HEADER}\n{body}"))
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = text.get(..offset).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// The file as parsed, each value with its position, before the values are checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecrets {
    version: Spanned<u32>,
    bootstrap_token: Spanned<String>,
    api_join_token: Spanned<String>,
    encryption_key: Spanned<String>,
    service_account_key: Spanned<String>,
    kubernetes_ca: RawCa,
    etcd_ca: RawCa,
    front_proxy_ca: RawCa,
    node_api_ca: RawCa,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCa {
    cert: Spanned<String>,
    key: Spanned<String>,
}

impl RawSecrets {
    fn check(self, text: &str, origin: &str) -> Result<ClusterSecrets, SecretsError> {
        let invalid = |key: &str, span: std::ops::Range<usize>, source: PkiError| {
            let (line, column) = line_column(text, span.start);
            SecretsError::Invalid {
                path: origin.to_owned(),
                line,
                column,
                key: key.to_owned(),
                source,
            }
        };
        if *self.version.get_ref() != SECRETS_VERSION {
            let (line, column) = line_column(text, self.version.span().start);
            return Err(SecretsError::Version {
                path: origin.to_owned(),
                line,
                column,
                found: *self.version.get_ref(),
            });
        }
        let bootstrap_token: BootstrapToken = self
            .bootstrap_token
            .get_ref()
            .parse()
            .map_err(|e| invalid("bootstrap_token", self.bootstrap_token.span(), e))?;
        let api_join_token: BootstrapToken = self
            .api_join_token
            .get_ref()
            .parse()
            .map_err(|e| invalid("api_join_token", self.api_join_token.span(), e))?;
        let encryption_key: EncryptionKey = self
            .encryption_key
            .get_ref()
            .parse()
            .map_err(|e| invalid("encryption_key", self.encryption_key.span(), e))?;
        pki::check_private_key(self.service_account_key.get_ref())
            .map_err(|e| invalid("service_account_key", self.service_account_key.span(), e))?;

        let ca = |name: &str, raw: RawCa| -> Result<CertAndKey, SecretsError> {
            let cert_key = format!("{name}.cert");
            let key_key = format!("{name}.key");
            pki::pem_certificate_der(raw.cert.get_ref())
                .map_err(|e| invalid(&cert_key, raw.cert.span(), e))?;
            pki::check_private_key(raw.key.get_ref())
                .map_err(|e| invalid(&key_key, raw.key.span(), e))?;
            let pair = CertAndKey {
                cert: raw.cert.get_ref().clone(),
                key: raw.key.get_ref().clone(),
            };
            pki::check_ca(&pair).map_err(|e| match e {
                PkiError::KeyMismatch { .. } => invalid(&key_key, raw.key.span(), e),
                other => invalid(&cert_key, raw.cert.span(), other),
            })?;
            Ok(pair)
        };

        Ok(ClusterSecrets {
            version: SECRETS_VERSION,
            bootstrap_token,
            api_join_token,
            encryption_key,
            service_account_key: self.service_account_key.into_inner(),
            kubernetes_ca: ca("kubernetes_ca", self.kubernetes_ca)?,
            etcd_ca: ca("etcd_ca", self.etcd_ca)?,
            front_proxy_ca: ca("front_proxy_ca", self.front_proxy_ca)?,
            node_api_ca: ca("node_api_ca", self.node_api_ca)?,
        })
    }
}
