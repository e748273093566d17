//! Connecting `machinectl` to a node, and naming what went wrong when it cannot.
//!
//! The TCP connection and the TLS 1.3 handshake are made here (not inside tonic), so that
//! every failure keeps its cause and becomes one [`ClientError`] an operator can act on:
//! an unreachable node, a node whose certificate the context's CA did not sign, a client
//! certificate the node refuses (expired, from another CA), a role too low for the method.
//! The ready TLS stream is then handed to a tonic channel.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::api::MAX_MESSAGE_SIZE;
use crate::api::proto::machine_client::MachineClient;
use crate::clientconfig::{Context, host_of};
use crate::tls;

/// How long connecting and the TLS handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A gRPC client of one node.
pub type NodeClient = MachineClient<Channel>;

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
        })
    }

    /// Connects without a client certificate and without verifying the node
    /// (maintenance mode).
    pub fn insecure() -> Result<Connector, ClientError> {
        let config = tls::insecure_client_config().map_err(|source| ClientError::Tls {
            context: "--insecure".into(),
            source,
        })?;
        Ok(Connector {
            context: "--insecure".into(),
            config,
            insecure: true,
        })
    }

    /// Turns a TLS error into the error an operator can act on.
    fn tls_error(&self, address: &str, host: &str, err: rustls::Error) -> ClientError {
        use rustls::CertificateError as C;
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
        }
    }

    /// Connects to `address` (`host:port`) and returns the node API client.
    pub async fn connect(&self, address: &str) -> Result<NodeClient, ClientError> {
        Ok(MachineClient::new(self.channel(address).await?)
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
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await {
            Err(_) => {
                return Err(unreachable(format!(
                    "no answer within {} s",
                    CONNECT_TIMEOUT.as_secs()
                )));
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
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp)).await
        {
            Err(_) => {
                return Err(ClientError::Handshake {
                    address: address.to_owned(),
                    detail: format!(
                        "no TLS answer within {} s (is this the node API port?)",
                        CONNECT_TIMEOUT.as_secs()
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
        // In TLS 1.3 the client's handshake is over before the node has judged the client
        // certificate: a refusal arrives as an alert afterwards. The node speaks first on
        // HTTP/2 (its SETTINGS frame), so read that now: a refusal then surfaces here,
        // named, instead of as a broken channel later. The bytes read are replayed.
        let mut stream = stream;
        let mut first = vec![0u8; 256];
        let n = match tokio::time::timeout(CONNECT_TIMEOUT, stream.read(&mut first)).await {
            Err(_) => {
                return Err(ClientError::Handshake {
                    address: address.to_owned(),
                    detail: format!(
                        "the node said nothing within {} s after the handshake (is this the node API port?)",
                        CONNECT_TIMEOUT.as_secs()
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
        let endpoint = Endpoint::from_shared(format!("http://{address}")).map_err(|e| {
            ClientError::Handshake {
                address: address.to_owned(),
                detail: e.to_string(),
            }
        })?;
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
