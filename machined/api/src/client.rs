//! Connecting `machinectl` to a node, and naming what went wrong when it cannot.
//!
//! The TCP connection and the TLS 1.3 handshake are made here (not inside tonic), so that
//! every failure keeps its cause and becomes one [`ClientError`] an operator can act on:
//! an unreachable node, a node whose certificate the context's CA did not sign, a client
//! certificate the node refuses (expired, from another CA), a role too low for the method.
//! The ready TLS stream is then handed to a tonic channel.
//!
//! A node in maintenance mode has a self-signed certificate. [`Connector::insecure`]
//! accepts it unverified and [`Connector::pinned`] only by its SHA-256 fingerprint; both
//! keep the fingerprint each node presented ([`Connector::fingerprint_seen`]) so that
//! machinectl can show it.
//!
//! No call waits forever. Every unary call has a deadline ([`call_deadline`]: 30 s, longer
//! for the calls that wait on the node's own work, or the caller's own with
//! [`Connector::with_timeout`]), counted from the request to the last byte of the answer.
//! Streams have no total deadline; HTTP/2 pings (every [`KEEPALIVE_INTERVAL`], also while
//! idle) end any call within [`KEEPALIVE_INTERVAL`] + [`KEEPALIVE_TIMEOUT`] once the node
//! stops answering, as a node that was killed or cut off does. Both are reported as such,
//! naming the node, the call and the time waited.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::body::Body;
use tonic::codegen::{Bytes, Service, StdError, http};
use tonic::transport::{Channel, Endpoint};

use crate::api::MAX_MESSAGE_SIZE;
use crate::api::proto::machine_client::MachineClient;
use crate::clientconfig::{Context, host_of};
use crate::tls::{self, Fingerprint, FingerprintMismatch};

/// How long connecting and the TLS handshake may take (less when the caller's own
/// deadline is shorter).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The deadline of a unary call that answers from what the node knows.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The deadline of the unary calls that wait on the node's own work: applying a config
/// (services restarted, STATE written), resetting (a control plane leaves etcd first, with
/// up to 45 s of patience), and the etcd operations (a defrag of a large database, a
/// member that must catch up).
pub const LONG_CALL_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// The deadline of `ImagePull`: containerd downloads the whole image before answering.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// How often an HTTP/2 ping checks that the node still answers, also while no call runs.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How long a ping may go unanswered before the connection counts as dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The deadline a method of the node API gets by default, by its name (`ApplyConfig`);
/// `None` for the streams (logs and dmesg that may follow forever, uploads and downloads
/// whose length is the data's), which only HTTP/2 keepalive ends.
pub fn call_deadline(method: &str) -> Option<Duration> {
    match method {
        "Logs" | "Dmesg" | "Read" | "ImageImport" | "Bootstrap" | "EtcdSnapshot" | "Upgrade" => {
            None
        }
        "Rollback" => Some(LONG_CALL_TIMEOUT),
        "ApplyConfig"
        | "ConfirmConfig"
        | "Reset"
        | "EtcdDefrag"
        | "EtcdLeave"
        | "EtcdRemoveMember"
        | "EtcdForfeitLeadership" => Some(LONG_CALL_TIMEOUT),
        "ImagePull" => Some(PULL_TIMEOUT),
        _ => Some(DEFAULT_CALL_TIMEOUT),
    }
}

/// A duration as operators read it: `2 s`, `5 min`.
fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_millis() != 0 || secs == 0 {
        format!("{} ms", d.as_millis())
    } else if secs.is_multiple_of(60) {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}

/// A duration as `--timeout` takes it: `8s`, `2m`, `1h`.
fn flag(d: Duration) -> String {
    let secs = d.as_secs().max(1);
    if secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// A gRPC client of one node.
pub type NodeClient = MachineClient<DeadlineChannel>;

/// What went wrong talking to a node; each variant is named as such.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP connect failed.
    #[error("cannot reach {address}: {reason} — is the node up and is the endpoint right?")]
    Unreachable {
        /// `host:port`.
        address: String,
        /// What the network said.
        reason: String,
    },
    /// The node's certificate did not verify against the context's CA.
    #[error(
        "the node's certificate is not signed by the CA in context {context:?} ({address}: {detail}); is the endpoint a node of that cluster? A node in maintenance mode has a self-signed certificate: push its first config with --insecure"
    )]
    WrongCa {
        /// The context.
        context: String,
        /// `host:port`.
        address: String,
        /// What verification said.
        detail: String,
    },
    /// The node's certificate does not name the address connected to.
    #[error(
        "the node's certificate is not valid for {host} ({address}); connect through an address it was issued for, or add {host} to machine.api.cert_sans"
    )]
    WrongName {
        /// The host name or address used.
        host: String,
        /// `host:port`.
        address: String,
    },
    /// The client certificate of the context has expired (checked before connecting).
    #[error(
        "the client certificate in context {context:?} expired {when}; issue a new one (`machinectl gen config --with-secrets secrets.toml` writes a fresh machinectl.toml)"
    )]
    ClientCertExpired {
        /// The context.
        context: String,
        /// When.
        when: String,
    },
    /// The node refused the client certificate during the handshake.
    #[error(
        "the node at {address} refused the client certificate of context {context:?}: {reason}"
    )]
    ClientCertRefused {
        /// The context.
        context: String,
        /// `host:port`.
        address: String,
        /// The TLS alert, explained.
        reason: String,
    },
    /// The node's certificate is not the one `--cert-fingerprint` named.
    #[error(
        "refused the node at {address}: its certificate's SHA-256 fingerprint is {seen}, not {expected} as --cert-fingerprint expects. Someone may be in the way of the connection, or the node made a new certificate (it makes one at every start in maintenance mode; a configured node is reached through its context, not by fingerprint): compare with the fingerprint on the node's console and call again with that one"
    )]
    FingerprintMismatch {
        /// `host:port`.
        address: String,
        /// The fingerprint of the certificate the node presented.
        seen: Fingerprint,
        /// The fingerprint given with `--cert-fingerprint`.
        expected: Fingerprint,
    },
    /// The node requires a client certificate but none was sent (`--insecure`).
    #[error(
        "the node at {address} requires a client certificate: it is configured, so --insecure is refused; connect with a context from `machinectl gen config`"
    )]
    CertificateRequired {
        /// `host:port`.
        address: String,
    },
    /// The caller's role is too low.
    #[error("{0}")]
    PermissionDenied(String),
    /// Any other gRPC status.
    #[error("{address}: {code}: {message}")]
    Status {
        /// `host:port`.
        address: String,
        /// The status code, as text.
        code: String,
        /// The node's message.
        message: String,
    },
    /// The node did not answer a call within its deadline.
    #[error(
        "{address} did not answer {call} within {}: the node may be down, cut off or overloaded; if it is only slow, give it longer with --timeout (e.g. --timeout {})",
        human(*.after),
        flag(*.after * 4)
    )]
    DeadlineExceeded {
        /// `host:port`.
        address: String,
        /// The method, as the API names it (`ApplyConfig`).
        call: String,
        /// How long machinectl waited.
        after: Duration,
    },
    /// The node stopped answering HTTP/2 pings during a call.
    #[error(
        "{address} stopped answering during {call}: the connection broke or went silent (HTTP/2 pings go unanswered after {}), so the node died, rebooted or was cut off; once it answers again, check whether the call took effect",
        human(KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT)
    )]
    NodeGone {
        /// `host:port`.
        address: String,
        /// The method, as the API names it (`Logs`).
        call: String,
    },
    /// TLS could not be set up locally.
    #[error("cannot set up TLS for context {context:?}")]
    Tls {
        /// The context.
        context: String,
        /// The cause.
        #[source]
        source: tls::TlsError,
    },
    /// The TLS handshake failed for another reason.
    #[error("TLS with {address} failed: {detail}")]
    Handshake {
        /// `host:port`.
        address: String,
        /// The cause.
        detail: String,
    },
}

/// How to authenticate to nodes.
#[derive(Debug, Clone)]
pub struct Connector {
    context: String,
    config: Arc<rustls::ClientConfig>,
    insecure: bool,
    /// The caller's deadline for every unary call (and connecting), instead of
    /// [`call_deadline`]'s.
    timeout: Option<Duration>,
    /// The fingerprint of the certificate each node presented, by `host:port` (shared by
    /// clones).
    seen: Arc<Mutex<BTreeMap<String, Fingerprint>>>,
}

fn find_rustls(err: &(dyn std::error::Error + 'static)) -> Option<rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r.clone());
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(r) = inner.downcast_ref::<rustls::Error>()
        {
            return Some(r.clone());
        }
        cur = e.source();
    }
    None
}

fn alert_reason(alert: rustls::AlertDescription) -> String {
    use rustls::AlertDescription as A;
    match alert {
        A::CertificateExpired => "the certificate has expired".into(),
        A::UnknownCA | A::BadCertificate | A::DecryptError => {
            "it is not signed by the node's API CA (a context of another cluster?)".into()
        }
        A::CertificateRevoked => "the certificate was revoked".into(),
        A::UnsupportedCertificate => {
            "the certificate is not usable for client authentication".into()
        }
        other => format!("TLS alert {other:?}"),
    }
}

/// A status code as operators read it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "ok",
        C::Cancelled => "cancelled",
        C::Unknown => "unknown error",
        C::InvalidArgument => "invalid argument",
        C::DeadlineExceeded => "deadline exceeded",
        C::NotFound => "not found",
        C::AlreadyExists => "already exists",
        C::PermissionDenied => "permission denied",
        C::ResourceExhausted => "resource exhausted",
        C::FailedPrecondition => "failed precondition",
        C::Aborted => "aborted",
        C::OutOfRange => "out of range",
        C::Unimplemented => "unimplemented",
        C::Internal => "internal error",
        C::Unavailable => "unavailable",
        C::DataLoss => "data loss",
        C::Unauthenticated => "unauthenticated",
    }
}

impl Connector {
    /// Connects with a context's credentials. An expired client certificate is refused
    /// here, before any connection.
    pub fn for_context(name: &str, ctx: &Context) -> Result<Connector, ClientError> {
        if let Some((_, not_after)) = tls::validity(&ctx.cert) {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            if not_after < now {
                let when = time::OffsetDateTime::from_unix_timestamp(not_after)
                    .ok()
                    .and_then(|t| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .map_or_else(|| "in the past".into(), |t| format!("on {t}"));
                return Err(ClientError::ClientCertExpired {
                    context: name.to_owned(),
                    when,
                });
            }
        }
        Self::for_context_unchecked(name, ctx)
    }

    /// [`Connector::for_context`] without the local expiry check (tests use it to show
    /// that the node refuses an expired certificate by itself).
    pub fn for_context_unchecked(name: &str, ctx: &Context) -> Result<Connector, ClientError> {
        let config = tls::client_config(&ctx.ca, &ctx.cert, &ctx.key).map_err(|source| {
            ClientError::Tls {
                context: name.to_owned(),
                source,
            }
        })?;
        Ok(Connector {
            context: name.to_owned(),
            config,
            insecure: false,
            timeout: None,
            seen: Arc::default(),
        })
    }

    /// Connects without a client certificate and without verifying the node
    /// (maintenance mode).
    pub fn insecure() -> Result<Connector, ClientError> {
        Self::maintenance("--insecure", tls::insecure_client_config())
    }

    /// Connects without a client certificate to a node whose certificate must have the
    /// SHA-256 fingerprint `expected` (maintenance mode, `--cert-fingerprint`); any other
    /// is refused as [`ClientError::FingerprintMismatch`].
    pub fn pinned(expected: Fingerprint) -> Result<Connector, ClientError> {
        Self::maintenance("--cert-fingerprint", tls::pinned_client_config(expected))
    }

    fn maintenance(
        context: &str,
        config: Result<Arc<rustls::ClientConfig>, tls::TlsError>,
    ) -> Result<Connector, ClientError> {
        let config = config.map_err(|source| ClientError::Tls {
            context: context.into(),
            source,
        })?;
        Ok(Connector {
            context: context.into(),
            config,
            insecure: true,
            timeout: None,
            seen: Arc::default(),
        })
    }

    /// The SHA-256 fingerprint of the certificate the node at `address` (`host:port`)
    /// presented at its last handshake, if one was made.
    pub fn fingerprint_seen(&self, address: &str) -> Option<Fingerprint> {
        self.seen.lock().ok()?.get(address).copied()
    }

    /// Turns a TLS error into the error an operator can act on.
    fn tls_error(&self, address: &str, host: &str, err: rustls::Error) -> ClientError {
        use rustls::CertificateError as C;
        if let rustls::Error::InvalidCertificate(C::Other(other)) = &err
            && let Some(mismatch) = other.0.downcast_ref::<FingerprintMismatch>()
        {
            return ClientError::FingerprintMismatch {
                address: address.to_owned(),
                seen: mismatch.seen,
                expected: mismatch.expected,
            };
        }
        match err {
            rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature)
            | rustls::Error::InvalidCertificate(C::Other(_)) => ClientError::WrongCa {
                context: self.context.clone(),
                address: address.to_owned(),
                detail: err.to_string(),
            },
            rustls::Error::InvalidCertificate(
                C::NotValidForName | C::NotValidForNameContext { .. },
            ) => ClientError::WrongName {
                host: host.to_owned(),
                address: address.to_owned(),
            },
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired) => {
                ClientError::CertificateRequired {
                    address: address.to_owned(),
                }
            }
            rustls::Error::AlertReceived(alert) if self.insecure => ClientError::Handshake {
                address: address.to_owned(),
                detail: alert_reason(alert),
            },
            rustls::Error::AlertReceived(alert) => ClientError::ClientCertRefused {
                context: self.context.clone(),
                address: address.to_owned(),
                reason: alert_reason(alert),
            },
            other => ClientError::Handshake {
                address: address.to_owned(),
                detail: other.to_string(),
            },
        }
    }

    /// Turns a failed call into the error an operator can act on.
    pub fn status_error(&self, address: &str, status: &tonic::Status) -> ClientError {
        if let Some(e) = find_call_error(status) {
            return e;
        }
        if let Some(r) = find_rustls(status) {
            return self.tls_error(address, host_of(address), r);
        }
        match status.code() {
            tonic::Code::PermissionDenied => {
                ClientError::PermissionDenied(status.message().to_owned())
            }
            code => {
                let mut message = status.message().to_owned();
                if let Some(source) = std::error::Error::source(status) {
                    let chain = crate::error_chain(source);
                    if !message.contains(&chain) {
                        if !message.is_empty() {
                            message.push_str(": ");
                        }
                        message.push_str(&chain);
                    }
                }
                if code == tonic::Code::Unavailable
                    && (message.contains("transport error") || message.contains("connection"))
                    && std::error::Error::source(status).is_some()
                {
                    return ClientError::Unreachable {
                        address: address.to_owned(),
                        reason: format!("the connection broke ({message})"),
                    };
                }
                ClientError::Status {
                    address: address.to_owned(),
                    code: code_name(code).to_owned(),
                    message,
                }
            }
        }
    }

    /// A connector with a TLS configuration made elsewhere (tests and tools that need a
    /// client the CLI never builds, such as one without a client certificate).
    pub fn from_rustls(context: &str, config: Arc<rustls::ClientConfig>) -> Connector {
        Connector {
            context: context.to_owned(),
            config,
            insecure: false,
            timeout: None,
            seen: Arc::default(),
        }
    }

    /// Gives every unary call, whatever its method, this deadline (and connecting at most
    /// this long); `None` keeps each method's own ([`call_deadline`]). Streams keep none.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Connector {
        self.timeout = timeout;
        self
    }

    /// How long connecting, the TLS handshake and the node's first bytes may each take.
    fn connect_timeout(&self) -> Duration {
        self.timeout
            .map_or(CONNECT_TIMEOUT, |t| t.min(CONNECT_TIMEOUT))
    }

    /// Connects to `address` (`host:port`) and returns the node API client.
    pub async fn connect(&self, address: &str) -> Result<NodeClient, ClientError> {
        let channel = DeadlineChannel {
            inner: self.channel(address).await?,
            address: address.into(),
            timeout: self.timeout,
        };
        Ok(MachineClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE))
    }

    /// Connects to `address` (`host:port`), completes the TLS handshake and returns the
    /// HTTP/2 channel (for raw requests).
    pub async fn channel(&self, address: &str) -> Result<Channel, ClientError> {
        let host = host_of(address).to_owned();
        let unreachable = |reason: String| ClientError::Unreachable {
            address: address.to_owned(),
            reason,
        };
        let limit = self.connect_timeout();
        let tcp = match tokio::time::timeout(limit, TcpStream::connect(address)).await {
            Err(_) => {
                return Err(unreachable(format!("no answer within {}", human(limit))));
            }
            Ok(Err(e)) => {
                let reason = match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
                    std::io::ErrorKind::TimedOut => "connection timed out".to_owned(),
                    _ => {
                        let text = e.to_string();
                        // Resolver failures come as plain io errors with the resolver's words.
                        text.split(" (os error")
                            .next()
                            .unwrap_or(&text)
                            .to_lowercase()
                    }
                };
                return Err(unreachable(reason));
            }
            Ok(Ok(tcp)) => tcp,
        };
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(host.clone()).map_err(|_| ClientError::Handshake {
            address: address.to_owned(),
            detail: format!("{host:?} is neither a DNS name nor an IP address"),
        })?;
        let connector = TlsConnector::from(self.config.clone());
        let stream = match tokio::time::timeout(limit, connector.connect(name, tcp)).await {
            Err(_) => {
                return Err(ClientError::Handshake {
                    address: address.to_owned(),
                    detail: format!(
                        "no TLS answer within {} (is this the node API port? --timeout sets how long to wait)",
                        human(limit)
                    ),
                });
            }
            Ok(Err(e)) => {
                return Err(match find_rustls(&e) {
                    Some(r) => self.tls_error(address, &host, r),
                    None => ClientError::Handshake {
                        address: address.to_owned(),
                        detail: e.to_string(),
                    },
                });
            }
            Ok(Ok(s)) => s,
        };
        if let Some(cert) = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            && let Ok(mut seen) = self.seen.lock()
        {
            seen.insert(address.to_owned(), Fingerprint::of(cert.as_ref()));
        }
        // In TLS 1.3 the client's handshake is over before the node has judged the client
        // certificate: a refusal arrives as an alert afterwards. The node speaks first on
        // HTTP/2 (its SETTINGS frame), so read that now: a refusal then surfaces here,
        // named, instead of as a broken channel later. The bytes read are replayed.
        let mut stream = stream;
        let mut first = vec![0u8; 256];
        let n = match tokio::time::timeout(limit, stream.read(&mut first)).await {
            Err(_) => {
                return Err(ClientError::Handshake {
                    address: address.to_owned(),
                    detail: format!(
                        "the node said nothing within {} after the handshake (is this the node API port? --timeout sets how long to wait)",
                        human(limit)
                    ),
                });
            }
            Ok(Err(e)) => {
                return Err(match find_rustls(&e) {
                    Some(r) => self.tls_error(address, &host, r),
                    None => ClientError::Handshake {
                        address: address.to_owned(),
                        detail: e.to_string(),
                    },
                });
            }
            Ok(Ok(0)) => {
                return Err(ClientError::Handshake {
                    address: address.to_owned(),
                    detail: "the node closed the connection right after the handshake".into(),
                });
            }
            Ok(Ok(n)) => n,
        };
        first.truncate(n);
        let stream = Prefixed {
            prefix: first,
            pos: 0,
            inner: stream,
        };
        let slot = Arc::new(Mutex::new(Some(stream)));
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| ClientError::Handshake {
                address: address.to_owned(),
                detail: e.to_string(),
            })?
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        endpoint
            .connect_with_connector(tower::service_fn(move |_| {
                let stream = slot.lock().ok().and_then(|mut s| s.take());
                async move {
                    stream.map(TokioIo::new).ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::NotConnected,
                            "the connection to the node was closed",
                        )
                    })
                }
            }))
            .await
            .map_err(|e| match find_rustls(&e) {
                Some(r) => self.tls_error(address, &host, r),
                None => ClientError::Handshake {
                    address: address.to_owned(),
                    detail: crate::error_chain(&e),
                },
            })
    }
}

/// The call errors that [`DeadlineChannel`] raises, found again in a failed call's status.
fn find_call_error(status: &tonic::Status) -> Option<ClientError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(e) = cur {
        match e.downcast_ref::<ClientError>() {
            Some(ClientError::DeadlineExceeded {
                address,
                call,
                after,
            }) => {
                return Some(ClientError::DeadlineExceeded {
                    address: address.clone(),
                    call: call.clone(),
                    after: *after,
                });
            }
            Some(ClientError::NodeGone { address, call }) => {
                return Some(ClientError::NodeGone {
                    address: address.clone(),
                    call: call.clone(),
                });
            }
            _ => {}
        }
        cur = e.source();
    }
    None
}

/// Whether a transport error means that the connection to the node is gone (HTTP/2 pings
/// went unanswered, or the node closed it), as opposed to an error the node sent.
fn connection_lost(err: &(dyn std::error::Error + 'static)) -> bool {
    let chain = crate::error_chain(err);
    [
        "connection closed",
        "connection reset",
        "broken pipe",
        "keep-alive",
        "connection error",
    ]
    .iter()
    .any(|words| chain.contains(words))
}

/// The HTTP/2 channel of a [`NodeClient`]: each call gets its method's deadline
/// ([`call_deadline`], or the connector's `--timeout`), counted from the request to the last
/// byte of the answer, and a call whose connection dies is reported as [`ClientError::NodeGone`].
#[derive(Debug, Clone)]
pub struct DeadlineChannel {
    inner: Channel,
    address: Arc<str>,
    timeout: Option<Duration>,
}

impl DeadlineChannel {
    /// The error a call of `method` ends with when `err` broke it.
    fn call_error(address: &str, method: &str, err: StdError) -> StdError {
        if connection_lost(&*err) {
            as_status(ClientError::NodeGone {
                address: address.to_owned(),
                call: method.to_owned(),
            })
        } else {
            err
        }
    }
}

/// A call error as the gRPC status tonic hands to the caller: its code (so that callers
/// that retry on a code keep doing so), its text, and the error itself as the source.
fn as_status(err: ClientError) -> StdError {
    let code = match err {
        ClientError::DeadlineExceeded { .. } => tonic::Code::DeadlineExceeded,
        _ => tonic::Code::Unavailable,
    };
    let mut status = tonic::Status::new(code, err.to_string());
    status.set_source(Arc::new(err));
    Box::new(status)
}

impl Service<http::Request<Body>> for DeadlineChannel {
    type Response = http::Response<Body>;
    type Error = StdError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, StdError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), StdError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let method = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let after = call_deadline(&method).map(|d| self.timeout.unwrap_or(d));
        let address = self.address.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let at = after.map(|after| tokio::time::Instant::now() + after);
            let answer = match at {
                None => response.await,
                Some(at) => match tokio::time::timeout_at(at, response).await {
                    Ok(answer) => answer,
                    Err(_) => {
                        return Err(as_status(ClientError::DeadlineExceeded {
                            address: address.to_string(),
                            call: method,
                            after: after.unwrap_or_default(),
                        }));
                    }
                },
            };
            let response =
                answer.map_err(|e| DeadlineChannel::call_error(&address, &method, e.into()))?;
            Ok(response.map(|body| {
                Body::new(DeadlineBody {
                    inner: body,
                    deadline: at.map(|at| Box::pin(tokio::time::sleep_until(at))),
                    after: after.unwrap_or_default(),
                    address,
                    method,
                })
            }))
        })
    }
}

/// An answer's body that fails once its call's deadline has passed.
struct DeadlineBody {
    inner: Body,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    after: Duration,
    address: Arc<str>,
    method: String,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = StdError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, StdError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| {
                f.map_err(|e| DeadlineChannel::call_error(&this.address, &this.method, e.into()))
            }));
        }
        if let Some(deadline) = &mut this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            this.deadline = None;
            return Poll::Ready(Some(Err(as_status(ClientError::DeadlineExceeded {
                address: this.address.to_string(),
                call: this.method.clone(),
                after: this.after,
            }))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A stream that first replays bytes already read from it.
#[derive(Debug)]
struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(rest) = this.prefix.get(this.pos..)
            && !rest.is_empty()
        {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(rest.get(..n).unwrap_or_default());
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every method of the node API has its deadline: none exactly for the streams.
    #[test]
    fn every_method_has_a_deadline_and_streams_have_none() {
        let proto = include_str!("../proto/machine.proto");
        let mut methods = 0;
        for line in proto.lines().map(str::trim) {
            let Some(rest) = line.strip_prefix("rpc ") else {
                continue;
            };
            let name = rest.split('(').next().unwrap_or_default().trim();
            let streams = rest.contains("stream ");
            assert_eq!(
                call_deadline(name).is_none(),
                streams,
                "{name}: a stream gets no total deadline, a unary call one"
            );
            methods += 1;
        }
        assert!(methods > 20, "{methods} methods read from the .proto");
        assert_eq!(call_deadline("Version"), Some(DEFAULT_CALL_TIMEOUT));
        assert_eq!(call_deadline("ApplyConfig"), Some(LONG_CALL_TIMEOUT));
        assert_eq!(call_deadline("ImagePull"), Some(PULL_TIMEOUT));
    }

    #[test]
    fn durations_read_as_operators_write_them() {
        assert_eq!(human(Duration::from_secs(2)), "2 s");
        assert_eq!(human(Duration::from_secs(300)), "5 min");
        assert_eq!(human(Duration::from_millis(1500)), "1500 ms");
        assert_eq!(flag(Duration::from_secs(8)), "8s");
        assert_eq!(flag(Duration::from_secs(1200)), "20m");
        assert_eq!(flag(Duration::from_secs(7200)), "2h");
    }

    #[test]
    fn the_timeout_bounds_connecting_too() {
        let connector = Connector::insecure().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(connector.connect_timeout(), CONNECT_TIMEOUT);
        let short = connector.with_timeout(Some(Duration::from_secs(2)));
        assert_eq!(short.connect_timeout(), Duration::from_secs(2));
        let long = short.with_timeout(Some(Duration::from_secs(600)));
        assert_eq!(long.connect_timeout(), CONNECT_TIMEOUT);
    }
}
