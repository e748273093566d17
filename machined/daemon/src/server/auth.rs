//! Authorization: every request is checked against [`keelson_api::api::ACCESS`] before its body
//! is decoded.
//!
//! The caller was established by the TLS handshake (a client certificate verified
//! against the node API CA, its role read from the Organization); this layer sits in
//! front of the gRPC router on each connection and refuses, with PERMISSION_DENIED naming
//! the role needed and the role presented, any method the caller's role does not reach.
//! In maintenance mode every caller is anonymous and only the methods marked for
//! maintenance pass.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use keelson_configs::pki::Role;
use tonic::Status;

use keelson_api::api::{self, access_for_path};
use keelson_api::tls::Caller;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Maintenance mode: no client certificate.
    Anonymous,
    /// A verified client certificate.
    Client(Caller),
}

/// What a handler learns about an authorized caller (a request extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorized {
    /// The caller's role; `None` in maintenance mode.
    pub role: Option<Role>,
    /// The certificate's common name.
    pub user: String,
}

/// The decision for one request path.
pub fn decide(peer: &Peer, path: &str) -> Result<Option<Authorized>, Status> {
    let Some(access) = access_for_path(path) else {
        // A method of our service without a row in the access table is refused for
        // everyone (deny by default); anything else is not ours and the router answers
        // UNIMPLEMENTED.
        if path
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(api::SERVICE))
            .is_some_and(|p| p.starts_with('/'))
            && api::API_METHODS.contains(&path)
        {
            return Err(Status::permission_denied(format!(
                "{path} declares no role in the node API's access table, so it is refused"
            )));
        }
        return Ok(None);
    };
    match peer {
        Peer::Anonymous => {
            if access.maintenance {
                Ok(Some(Authorized {
                    role: None,
                    user: String::new(),
                }))
            } else {
                Err(Status::failed_precondition(format!(
                    "the node is in maintenance mode (it has no config yet) and serves only version and apply-config; push a config with `machinectl apply-config --insecure --nodes ADDRESS --file CONFIG`; {} is served once the node is configured, with client certificates",
                    access.command
                )))
            }
        }
        Peer::Client(caller) => match caller.role {
            None => Err(Status::permission_denied(format!(
                "permission denied: {} needs role {}, your certificate (CN={:?}) carries no role (Organization keelson:admin, keelson:operator, keelson:reader or keelson:etcd:backup)",
                access.command,
                access.needs(),
                caller.user
            ))),
            Some(role) if !access.allows(role) => Err(Status::permission_denied(format!(
                "permission denied: {} needs role {}, your certificate has {}",
                access.command,
                access.needs(),
                role
            ))),
            Some(role) => Ok(Some(Authorized {
                role: Some(role),
                user: caller.user.clone(),
            })),
        },
    }
}

/// The tower layer's service: [`decide`], then the inner service.
#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
    peer: Peer,
}

impl<S> Authorize<S> {
    /// Wraps `inner` for one connection's `peer`.
    pub fn new(inner: S, peer: Peer) -> Self {
        Authorize { inner, peer }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for Authorize<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        match decide(&self.peer, req.uri().path()) {
            Err(status) => {
                if let Peer::Client(c) = &self.peer {
                    tracing::warn!(
                        method = req.uri().path(),
                        user = ?c.user,
                        reason = status.message(),
                        "request refused"
                    );
                }
                Box::pin(async move { Ok(status.into_http()) })
            }
            Ok(authorized) => {
                if let Some(a) = authorized {
                    req.extensions_mut().insert(a);
                }
                // The inner service was polled ready on `self.inner`; call that one and
                // leave a fresh clone in its place (tower's usual clone-and-swap).
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let future = inner.call(req);
                Box::pin(async move { future.await.map(size_status) })
            }
        }
    }
}

/// gRPC's status for a message over the size limit is RESOURCE_EXHAUSTED; tonic reports
/// its decoder's limit as OUT_OF_RANGE. Rewrites that one status, in the headers of a
/// trailers-only answer or in the trailers.
fn size_status(resp: http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> {
    use http_body_util::BodyExt as _;
    fn fix(map: &mut http::HeaderMap) {
        let out_of_range = map
            .get("grpc-status")
            .is_some_and(|v| v.as_bytes() == b"11");
        let too_large = map
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| m.contains("message%20length%20too%20large"));
        if out_of_range && too_large {
            map.insert("grpc-status", http::HeaderValue::from_static("8"));
        }
    }
    let (mut parts, body) = resp.into_parts();
    fix(&mut parts.headers);
    let body = body.map_frame(|frame| match frame.into_trailers() {
        Ok(mut trailers) => {
            fix(&mut trailers);
            http_body::Frame::trailers(trailers)
        }
        Err(frame) => frame,
    });
    http::Response::from_parts(parts, tonic::body::Body::new(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(role: Option<Role>) -> Peer {
        Peer::Client(Caller {
            role,
            user: "alice".into(),
        })
    }

    fn path(method: &str) -> String {
        format!("/{}/{method}", api::SERVICE)
    }

    #[test]
    fn the_matrix() {
        let check = |peer: Peer, method: &str, want: Result<(), (tonic::Code, &str)>| {
            let got = decide(&peer, &path(method));
            match (got, want) {
                (Ok(Some(_)), Ok(())) => {}
                (Err(s), Err((code, msg))) => {
                    assert_eq!(s.code(), code, "{method}: {}", s.message());
                    assert!(s.message().contains(msg), "{method}: {}", s.message());
                }
                (got, want) => panic!("{peer:?} {method}: got {got:?}, want {want:?}"),
            }
        };
        use tonic::Code::{FailedPrecondition, PermissionDenied};
        check(client(Some(Role::Reader)), "Logs", Ok(()));
        check(client(Some(Role::Reader)), "Version", Ok(()));
        check(
            client(Some(Role::Reader)),
            "ApplyConfig",
            Err((
                PermissionDenied,
                "permission denied: apply-config needs role admin, your certificate has reader",
            )),
        );
        check(
            client(Some(Role::Reader)),
            "Reboot",
            Err((
                PermissionDenied,
                "reboot needs role operator, your certificate has reader",
            )),
        );
        check(
            client(Some(Role::Reader)),
            "Reset",
            Err((
                PermissionDenied,
                "reset needs role admin, your certificate has reader",
            )),
        );
        check(
            client(Some(Role::Operator)),
            "Reset",
            Err((
                PermissionDenied,
                "reset needs role admin, your certificate has operator",
            )),
        );
        check(client(Some(Role::Operator)), "Reboot", Ok(()));
        check(client(Some(Role::Operator)), "ImagePull", Ok(()));
        check(
            client(Some(Role::Reader)),
            "ImagePull",
            Err((
                PermissionDenied,
                "image pull needs role operator, your certificate has reader",
            )),
        );
        check(client(Some(Role::Admin)), "Kubeconfig", Ok(()));
        check(
            client(Some(Role::Operator)),
            "Kubeconfig",
            Err((
                PermissionDenied,
                "kubeconfig needs role admin, your certificate has operator",
            )),
        );
        check(
            client(Some(Role::EtcdBackup)),
            "Kubeconfig",
            Err((PermissionDenied, "your certificate has etcd:backup")),
        );
        check(client(Some(Role::Admin)), "Reset", Ok(()));
        check(
            client(None),
            "Version",
            Err((PermissionDenied, "carries no role")),
        );
        check(Peer::Anonymous, "Version", Ok(()));
        check(Peer::Anonymous, "ApplyConfig", Ok(()));
        check(
            Peer::Anonymous,
            "Logs",
            Err((FailedPrecondition, "maintenance mode")),
        );
        check(
            Peer::Anonymous,
            "Kubeconfig",
            Err((FailedPrecondition, "maintenance mode")),
        );
        assert_eq!(decide(&Peer::Anonymous, "/x.Y/Z").ok(), Some(None));
    }
}
