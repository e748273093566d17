//! Cluster PKI: certificate authorities, leaf certificates, the service-account key, the
//! bootstrap token and the encryption-at-rest key.
//!
//! Every key is ECDSA P-256 (PKCS#8 PEM, `-----BEGIN PRIVATE KEY-----`), which kube-apiserver,
//! etcd, the kubelet and rustls all accept, and which `ring` generates without a C toolchain.
//! Certificates follow what kubeadm issues:
//!
//! - CAs: valid 10 years, `basicConstraints CA:TRUE` (critical), key usage
//!   `keyCertSign, cRLSign, digitalSignature` (critical), a subject key identifier.
//! - Leaves: valid 1 year, `basicConstraints CA:FALSE` (critical), key usage
//!   `digitalSignature, keyEncipherment`, extended key usage `clientAuth` and/or `serverAuth`,
//!   subject and authority key identifiers, and DNS/IP subject alternative names.
//!
//! A control plane's etcd member gets kubeadm's four etcd leaves ([`etcd_certificates`]),
//! laid out as kubeadm writes them under `/etc/kubernetes/pki` ([`EtcdCertificates::files`]).
//!
//! `notBefore` is backdated by five minutes, as kubeadm does, so that a node whose clock lags
//! slightly still accepts a fresh certificate. Serial numbers are 128 random bits.
//!
//! The node API (machined's mTLS) carries the caller's role in the client certificate's
//! Organization: `keelson:admin`, `keelson:operator` or `keelson:reader` (see [`Role`]).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

/// How long a certificate authority is valid: 10 years, as kubeadm's CAs.
pub const CA_VALIDITY: Duration = Duration::days(3650);
/// How long a leaf certificate is valid: 1 year, as kubeadm's leaves.
pub const LEAF_VALIDITY: Duration = Duration::days(365);
/// How far `notBefore` is moved into the past, to tolerate small clock skew (kubeadm: 5 min).
pub const BACKDATE: Duration = Duration::minutes(5);

/// The length of a bootstrap token's id (`[a-z0-9]{6}`).
pub const BOOTSTRAP_TOKEN_ID_LEN: usize = 6;
/// The length of a bootstrap token's secret (`[a-z0-9]{16}`).
pub const BOOTSTRAP_TOKEN_SECRET_LEN: usize = 16;
/// The size in bytes of the encryption-at-rest key (AES-256 / secretbox).
pub const ENCRYPTION_KEY_LEN: usize = 32;

/// Errors from generating or checking key material.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// The operating system's random number generator failed.
    #[error(
        "the system random number generator failed; check that /dev/urandom or getrandom(2) works"
    )]
    Random,
    /// Generating a key pair failed.
    #[error("cannot generate an ECDSA P-256 key pair")]
    KeyGeneration(#[source] rcgen::Error),
    /// Signing a certificate failed.
    #[error("cannot sign the certificate for {common_name:?}")]
    Sign {
        /// The subject common name of the certificate being signed.
        common_name: String,
        /// What rcgen reported.
        #[source]
        source: rcgen::Error,
    },
    /// A subject alternative name is neither an IP address nor a valid DNS name.
    #[error(
        "subject alternative name {san:?} is neither an IP address nor an ASCII DNS name; use a host name like `api.example.com` or an address like `10.5.0.2`"
    )]
    BadSan {
        /// The offending name.
        san: String,
    },
    /// A PEM block could not be decoded as a private key.
    #[error("not a PEM-encoded PKCS#8 private key (`-----BEGIN PRIVATE KEY-----`): {reason}")]
    PrivateKey {
        /// Why decoding failed.
        reason: String,
    },
    /// A PEM block could not be decoded as an X.509 certificate.
    #[error("not a PEM-encoded X.509 certificate (`-----BEGIN CERTIFICATE-----`): {reason}")]
    Certificate {
        /// Why decoding failed.
        reason: String,
    },
    /// A certificate that must be a CA is not one.
    #[error(
        "the certificate {subject:?} is not a certificate authority (basicConstraints CA:TRUE is missing)"
    )]
    NotCa {
        /// The certificate's subject.
        subject: String,
    },
    /// A certificate and a private key that must belong together do not.
    #[error(
        "the private key does not belong to the certificate {subject:?} (their public keys differ)"
    )]
    KeyMismatch {
        /// The certificate's subject.
        subject: String,
    },
    /// A bootstrap token does not have kubeadm's format.
    #[error(
        "bootstrap token is malformed: {reason}; it must match `[a-z0-9]{{6}}.[a-z0-9]{{16}}`, e.g. `abcdef.0123456789abcdef`"
    )]
    BootstrapToken {
        /// What is wrong with it.
        reason: String,
    },
    /// An encryption-at-rest key is not 32 bytes of standard base64.
    #[error(
        "encryption key is malformed: {reason}; it must be 32 random bytes in standard base64 (44 characters)"
    )]
    EncryptionKey {
        /// What is wrong with it.
        reason: String,
    },
}

/// A certificate and its private key, both PEM. `Debug` never prints the key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertAndKey {
    /// The certificate, `-----BEGIN CERTIFICATE-----`.
    pub cert: String,
    /// The PKCS#8 private key, `-----BEGIN PRIVATE KEY-----`.
    pub key: String,
}

impl fmt::Debug for CertAndKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAndKey")
            .field("cert", &self.cert)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A caller's role on the node API, carried in the client certificate's Organization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything, including apply-config, upgrade, reset, bootstrap and kubeconfig.
    Admin,
    /// Day-to-day operations: reboot, shutdown, service restart, etcd snapshot, and all reads.
    Operator,
    /// Read-only: logs, dmesg, status, get.
    Reader,
    /// Outside the ladder: etcd snapshots and nothing else (for backup jobs), as Talos's
    /// `os:etcd:backup`.
    EtcdBackup,
}

impl Role {
    /// Every role, most powerful first (etcd:backup, which may only take snapshots, last).
    pub const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::Reader, Role::EtcdBackup];

    /// The Organization value that carries this role in a client certificate.
    pub fn organization(self) -> &'static str {
        match self {
            Role::Admin => "keelson:admin",
            Role::Operator => "keelson:operator",
            Role::Reader => "keelson:reader",
            Role::EtcdBackup => "keelson:etcd:backup",
        }
    }

    /// The role named by a certificate Organization value, if it names one.
    pub fn from_organization(org: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.organization() == org)
    }

    /// The short name used on the command line: `admin`, `operator`, `reader`,
    /// `etcd:backup`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Reader => "reader",
            Role::EtcdBackup => "etcd:backup",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s || r.organization() == s)
            .ok_or_else(|| {
                format!("unknown role {s:?}; expected one of admin, operator, reader, etcd:backup")
            })
    }
}

/// What a leaf certificate may be used for (its extended key usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// TLS client authentication only.
    Client,
    /// TLS server authentication only.
    Server,
    /// Both, as etcd peer certificates need.
    ClientAndServer,
}

impl Usage {
    fn extended_key_usages(self) -> Vec<ExtendedKeyUsagePurpose> {
        match self {
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::ClientAndServer => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        }
    }
}

/// What to put into a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafRequest {
    /// The subject common name (for Kubernetes client certificates: the user name).
    pub common_name: String,
    /// The subject organizations (for Kubernetes: groups; for the node API: the role).
    pub organizations: Vec<String>,
    /// Subject alternative names: each an IP address or a DNS name.
    pub sans: Vec<String>,
    /// Client, server or both.
    pub usage: Usage,
}

fn random_bytes(buf: &mut [u8]) -> Result<(), PkiError> {
    SystemRandom::new().fill(buf).map_err(|_| PkiError::Random)
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    random_bytes(&mut bytes)?;
    // A positive, non-zero INTEGER of at most 20 octets (RFC 5280 4.1.2.2).
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn new_key_pair() -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(PkiError::KeyGeneration)
}

fn parse_key_pair(pem: &str) -> Result<KeyPair, PkiError> {
    KeyPair::from_pem(pem).map_err(|e| PkiError::PrivateKey {
        reason: e.to_string(),
    })
}

fn distinguished_name(common_name: &str, organizations: &[String]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for org in organizations {
        dn.push(DnType::OrganizationName, org.as_str());
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

fn san(name: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = IpAddr::from_str(name) {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && (label == "*"
                    || label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        });
    if !valid {
        return Err(PkiError::BadSan {
            san: name.to_owned(),
        });
    }
    let ia5 = name.try_into().map_err(|_| PkiError::BadSan {
        san: name.to_owned(),
    })?;
    Ok(SanType::DnsName(ia5))
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetime;
}

/// Generates a self-signed certificate authority named `common_name`, valid 10 years.
pub fn generate_ca(common_name: &str) -> Result<CertAndKey, PkiError> {
    let key = new_key_pair()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(common_name, &[]);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    params.serial_number = Some(random_serial()?);
    validity(&mut params, CA_VALIDITY);
    let cert = params.self_signed(&key).map_err(|source| PkiError::Sign {
        common_name: common_name.to_owned(),
        source,
    })?;
    Ok(CertAndKey {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Issues a leaf certificate with a fresh key, signed by `ca`, valid 1 year.
pub fn issue(ca: &CertAndKey, request: &LeafRequest) -> Result<CertAndKey, PkiError> {
    check_ca(ca)?;
    let ca_key = parse_key_pair(&ca.key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key).map_err(|e| PkiError::Certificate {
        reason: e.to_string(),
    })?;

    let key = new_key_pair()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(&request.common_name, &request.organizations);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = request.usage.extended_key_usages();
    params.subject_alt_names = request
        .sans
        .iter()
        .map(|s| san(s))
        .collect::<Result<_, _>>()?;
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    validity(&mut params, LEAF_VALIDITY);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| PkiError::Sign {
            common_name: request.common_name.clone(),
            source,
        })?;
    Ok(CertAndKey {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Issues a node API client certificate for `role`, signed by the node API CA.
///
/// The common name is `user` (shown in the node's audit log); the Organization is the
/// role's value (e.g. `keelson:admin`), which the node checks against every method.
pub fn issue_api_client(
    node_api_ca: &CertAndKey,
    user: &str,
    role: Role,
) -> Result<CertAndKey, PkiError> {
    issue(
        node_api_ca,
        &LeafRequest {
            common_name: user.to_owned(),
            organizations: vec![role.organization().to_owned()],
            sans: Vec::new(),
            usage: Usage::Client,
        },
    )
}

/// The common name of etcd's healthcheck client certificate (kubeadm's).
pub const ETCD_HEALTHCHECK_CLIENT_CN: &str = "kube-etcd-healthcheck-client";
/// The common name of the API server's etcd client certificate (kubeadm's).
pub const APISERVER_ETCD_CLIENT_CN: &str = "kube-apiserver-etcd-client";

/// The file mode of a certificate others may read (the etcd CA's).
const MODE_PUBLIC: u32 = 0o644;
/// The file mode of every private key and every leaf certificate.
const MODE_PRIVATE: u32 = 0o600;

/// The leaf certificates a stacked etcd member needs, issued from the etcd CA as kubeadm's
/// certs phase issues them (since Kubernetes 1.29, neither client carries an Organization).
/// `Debug` never prints the keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdCertificates {
    /// etcd's serving certificate (`etcd/server`): CN the node name, `serverAuth` and
    /// `clientAuth` (etcd 3.2 and later want both), SANs from [`etcd_sans`].
    pub server: CertAndKey,
    /// etcd's peer certificate (`etcd/peer`): as the server's.
    pub peer: CertAndKey,
    /// The client certificate of health checks and `etcdctl` (`etcd/healthcheck-client`):
    /// CN `kube-etcd-healthcheck-client`, `clientAuth`.
    pub healthcheck_client: CertAndKey,
    /// The API server's client certificate (`apiserver-etcd-client`): CN
    /// `kube-apiserver-etcd-client`, `clientAuth`.
    pub apiserver_etcd_client: CertAndKey,
}

/// One file of the control plane's PKI directory, [`crate::layout::KUBERNETES_PKI_DIR`].
/// `Debug` prints the path and mode only: the content may be a private key.
#[derive(Clone, PartialEq, Eq)]
pub struct PkiFile {
    /// The path relative to [`crate::layout::KUBERNETES_PKI_DIR`], e.g. `etcd/server.key`.
    pub path: &'static str,
    /// The PEM content.
    pub content: String,
    /// The permission bits the file is created with.
    pub mode: u32,
}

impl fmt::Debug for PkiFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PkiFile")
            .field("path", &self.path)
            .field("mode", &format_args!("{:#o}", self.mode))
            .finish_non_exhaustive()
    }
}

impl EtcdCertificates {
    /// The files kubeadm's layout puts them in, with the etcd CA's certificate `ca_cert`:
    /// `etcd/ca.crt` (0644), then each leaf's `.crt` and `.key` (0600).
    pub fn files(&self, ca_cert: &str) -> Vec<PkiFile> {
        let file = |path, content: &str, mode| PkiFile {
            path,
            content: content.to_owned(),
            mode,
        };
        vec![
            file("etcd/ca.crt", ca_cert, MODE_PUBLIC),
            file("etcd/server.crt", &self.server.cert, MODE_PRIVATE),
            file("etcd/server.key", &self.server.key, MODE_PRIVATE),
            file("etcd/peer.crt", &self.peer.cert, MODE_PRIVATE),
            file("etcd/peer.key", &self.peer.key, MODE_PRIVATE),
            file(
                "etcd/healthcheck-client.crt",
                &self.healthcheck_client.cert,
                MODE_PRIVATE,
            ),
            file(
                "etcd/healthcheck-client.key",
                &self.healthcheck_client.key,
                MODE_PRIVATE,
            ),
            file(
                "apiserver-etcd-client.crt",
                &self.apiserver_etcd_client.cert,
                MODE_PRIVATE,
            ),
            file(
                "apiserver-etcd-client.key",
                &self.apiserver_etcd_client.key,
                MODE_PRIVATE,
            ),
        ]
    }
}

/// The subject alternative names of etcd's server and peer certificates: the node name,
/// `localhost`, the node's advertised addresses, `127.0.0.1` and `::1`, each once.
pub fn etcd_sans(node_name: &str, addresses: &[IpAddr]) -> Vec<String> {
    let loopbacks = [
        IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
    ];
    let names = [node_name.to_owned(), "localhost".to_owned()];
    let ips = addresses.iter().chain(&loopbacks).map(IpAddr::to_string);
    let mut sans: Vec<String> = Vec::new();
    for san in names.into_iter().chain(ips) {
        if !sans.iter().any(|s| s.eq_ignore_ascii_case(&san)) {
            sans.push(san);
        }
    }
    sans
}

/// Issues the etcd leaf certificates of the control plane `node_name`, whose etcd
/// advertises `addresses`, from the etcd CA `ca`. Each has a fresh key.
pub fn etcd_certificates(
    ca: &CertAndKey,
    node_name: &str,
    addresses: &[IpAddr],
) -> Result<EtcdCertificates, PkiError> {
    let sans = etcd_sans(node_name, addresses);
    let member = LeafRequest {
        common_name: node_name.to_owned(),
        organizations: Vec::new(),
        sans,
        usage: Usage::ClientAndServer,
    };
    let client = |common_name: &str| LeafRequest {
        common_name: common_name.to_owned(),
        organizations: Vec::new(),
        sans: Vec::new(),
        usage: Usage::Client,
    };
    Ok(EtcdCertificates {
        server: issue(ca, &member)?,
        peer: issue(ca, &member)?,
        healthcheck_client: issue(ca, &client(ETCD_HEALTHCHECK_CLIENT_CN))?,
        apiserver_etcd_client: issue(ca, &client(APISERVER_ETCD_CLIENT_CN))?,
    })
}

/// Generates the Kubernetes service-account signing key: an ECDSA P-256 PKCS#8 PEM key,
/// which kube-apiserver accepts for `--service-account-signing-key-file` and
/// `--service-account-key-file`.
pub fn generate_service_account_key() -> Result<String, PkiError> {
    Ok(new_key_pair()?.serialize_pem())
}

/// The public half of a PEM private key, as a PEM `PUBLIC KEY` (SubjectPublicKeyInfo).
pub fn public_key_pem(private_key_pem: &str) -> Result<String, PkiError> {
    Ok(parse_key_pair(private_key_pem)?.public_key_pem())
}

/// Checks that a private key is a PEM PKCS#8 key this crate can sign with.
pub fn check_private_key(private_key_pem: &str) -> Result<(), PkiError> {
    parse_key_pair(private_key_pem).map(|_| ())
}

/// Checks that `ca.cert` is a CA certificate and that `ca.key` is its private key.
pub fn check_ca(ca: &CertAndKey) -> Result<(), PkiError> {
    let der = pem_certificate_der(&ca.cert)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::Certificate {
            reason: e.to_string(),
        })?;
    let subject = cert.subject().to_string();
    let is_ca = cert
        .basic_constraints()
        .map_err(|e| PkiError::Certificate {
            reason: e.to_string(),
        })?
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(PkiError::NotCa { subject });
    }
    let key = parse_key_pair(&ca.key)?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(PkiError::KeyMismatch { subject });
    }
    Ok(())
}

/// Decodes the first PEM `CERTIFICATE` block of `pem` into DER.
pub fn pem_certificate_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    let (_, block) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| PkiError::Certificate {
            reason: e.to_string(),
        })?;
    if block.label != "CERTIFICATE" {
        return Err(PkiError::Certificate {
            reason: format!("the PEM block is labelled {:?}", block.label),
        });
    }
    Ok(block.contents)
}

/// The DER SubjectPublicKeyInfo of the first PEM `CERTIFICATE` block of `pem`: what
/// kubeadm's `--discovery-token-ca-cert-hash` pins (its SHA-256).
pub fn certificate_spki_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    let der = pem_certificate_der(pem)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::Certificate {
            reason: e.to_string(),
        })?;
    Ok(cert.public_key().raw.to_vec())
}

/// A kubeadm-format bootstrap token, `[a-z0-9]{6}.[a-z0-9]{16}`. `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BootstrapToken {
    id: String,
    secret: String,
}

const TOKEN_ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

fn random_token_chars(len: usize) -> Result<String, PkiError> {
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        random_bytes(&mut buf)?;
        // Rejection sampling: 252 = 7 * 36, so every character is equally likely.
        for &b in buf.iter().filter(|&&b| b < 252) {
            if out.len() == len {
                break;
            }
            out.push(char::from(TOKEN_ALPHABET[usize::from(b % 36)]));
        }
    }
    Ok(out)
}

impl BootstrapToken {
    /// A new token from the system CSPRNG.
    pub fn generate() -> Result<BootstrapToken, PkiError> {
        Ok(BootstrapToken {
            id: random_token_chars(BOOTSTRAP_TOKEN_ID_LEN)?,
            secret: random_token_chars(BOOTSTRAP_TOKEN_SECRET_LEN)?,
        })
    }

    /// The public part, e.g. `abcdef` (the Secret is `bootstrap-token-<id>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The secret part.
    pub fn secret(&self) -> &str {
        &self.secret
    }
}

impl FromStr for BootstrapToken {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| PkiError::BootstrapToken {
            reason: reason.to_owned(),
        };
        let (id, secret) = s
            .split_once('.')
            .ok_or_else(|| bad("it has no `.` between the id and the secret"))?;
        let allowed = |part: &str| part.bytes().all(|b| TOKEN_ALPHABET.contains(&b));
        if id.len() != BOOTSTRAP_TOKEN_ID_LEN || !allowed(id) {
            return Err(bad(
                "the id (before the `.`) must be 6 characters from a-z and 0-9",
            ));
        }
        if secret.len() != BOOTSTRAP_TOKEN_SECRET_LEN || !allowed(secret) {
            return Err(bad(
                "the secret (after the `.`) must be 16 characters from a-z and 0-9",
            ));
        }
        Ok(BootstrapToken {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

impl TryFrom<String> for BootstrapToken {
    type Error = PkiError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<BootstrapToken> for String {
    fn from(t: BootstrapToken) -> String {
        t.to_string()
    }
}

impl fmt::Display for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.id, self.secret)
    }
}

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BootstrapToken({}.<redacted>)", self.id)
    }
}

/// The key for Kubernetes Secret encryption at rest: 32 random bytes, standard base64, as
/// the `aescbc`/`secretbox` providers of an `EncryptionConfiguration` take it. `Debug`
/// hides it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EncryptionKey(String);

impl EncryptionKey {
    /// A new key from the system CSPRNG.
    pub fn generate() -> Result<EncryptionKey, PkiError> {
        let mut bytes = [0u8; ENCRYPTION_KEY_LEN];
        random_bytes(&mut bytes)?;
        Ok(EncryptionKey(
            base64::engine::general_purpose::STANDARD.encode(bytes),
        ))
    }

    /// The base64 text.
    pub fn as_base64(&self) -> &str {
        &self.0
    }
}

impl FromStr for EncryptionKey {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| PkiError::EncryptionKey {
                reason: format!("not standard base64 ({e})"),
            })?;
        if bytes.len() != ENCRYPTION_KEY_LEN {
            return Err(PkiError::EncryptionKey {
                reason: format!("it decodes to {} bytes, not 32", bytes.len()),
            });
        }
        Ok(EncryptionKey(s.to_owned()))
    }
}

impl TryFrom<String> for EncryptionKey {
    type Error = PkiError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<EncryptionKey> for String {
    fn from(k: EncryptionKey) -> String {
        k.0
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey(<redacted>)")
    }
}
