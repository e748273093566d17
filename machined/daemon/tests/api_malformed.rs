//! Malformed input against the real machined over TLS: oversized messages, truncated and
//! garbled gRPC frames, garbage on the TLS stream and before it, silent connections, and
//! random protobuf bytes for every method of the API (a fuzz loop with a fixed seed).
//! The node must answer each with a clear status or close the connection, within a
//! bounded time, and keep serving everyone else.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use std::io::Write as _;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use api_support::*;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use keelson_api::api::{API_METHODS, MAX_MESSAGE_SIZE, SERVICE, proto};
use keelson_configs::pki::Role;
use tonic::transport::Channel;
use tower::ServiceExt as _;

/// How long any answer may take.
const ANSWER: Duration = Duration::from_secs(5);

/// A gRPC frame: not compressed, big-endian length, payload.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// What a raw request got.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// A gRPC status (from headers or trailers).
    Status(tonic::Code, String),
    /// A response stream that was still open when we stopped reading (a follow).
    Streaming,
}

/// grpc-message is percent-encoded on the wire.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(map: &http::HeaderMap) -> Option<Answer> {
    let code = map.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    let message = percent_decode(
        map.get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .unwrap_or_default(),
    );
    Some(Answer::Status(tonic::Code::from_i32(code), message))
}

/// Sends `body` to `path` as one HTTP/2 request and waits (bounded) for the status.
async fn raw(channel: &Channel, path: &str, body: Vec<u8>) -> Answer {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://node{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(Full::new(Bytes::from(body))))
        .unwrap();
    let resp = tokio::time::timeout(ANSWER, channel.clone().oneshot(req))
        .await
        .unwrap_or_else(|_| panic!("{path}: no response headers within {ANSWER:?}"))
        .unwrap_or_else(|e| panic!("{path}: transport error {e}"));
    if let Some(a) = status_of(resp.headers()) {
        return a;
    }
    let mut body = resp.into_body();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Answer::Streaming,
            Ok(None) => panic!("{path}: response ended without a grpc-status"),
            Ok(Some(Err(e))) => panic!("{path}: body error {e}"),
            Ok(Some(Ok(f))) => {
                if let Some(t) = f.trailers_ref() {
                    return status_of(t)
                        .unwrap_or_else(|| panic!("{path}: trailers without grpc-status"));
                }
            }
        }
    }
}

fn path(method: &str) -> String {
    format!("/{SERVICE}/{method}")
}

async fn still_serving(channel: &Channel) {
    let answer = raw(channel, &path("Version"), frame(&[])).await;
    assert_eq!(
        answer,
        Answer::Status(tonic::Code::Ok, String::new()),
        "the node stopped serving"
    );
}

#[test]
fn oversized_truncated_and_garbled_frames_get_clear_statuses() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let connector = cluster.connector(node.address, Role::Admin);
    let address = node.address.to_string();
    rt().block_on(async {
        let channel = connector.channel(&address).await.unwrap();
        let check = |answer: Answer, code: tonic::Code, words: &str| match answer {
            Answer::Status(c, m) => {
                assert_eq!(c, code, "{m}");
                assert!(m.contains(words), "{m:?} lacks {words:?}");
            }
            other => panic!("{other:?}"),
        };
        // A config larger than 8 MiB.
        let big = proto::ApplyConfigRequest {
            config: vec![b'#'; MAX_MESSAGE_SIZE + 1024],
            mode: proto::ApplyMode::NoReboot.into(),
            try_timeout_seconds: 0,
            dry_run: false,
        };
        let answer = raw(&channel, &path("ApplyConfig"), frame(&prost::Message::encode_to_vec(&big))).await;
        check(answer, tonic::Code::ResourceExhausted, "message length too large");
        // A frame header that claims 100 MiB and sends 10 bytes.
        let mut lie = vec![0u8];
        lie.extend_from_slice(&(100u32 << 20).to_be_bytes());
        lie.extend_from_slice(&[0u8; 10]);
        check(raw(&channel, &path("ApplyConfig"), lie).await, tonic::Code::ResourceExhausted, "too large");
        // A frame cut short: 100 bytes announced, 10 sent, then the stream ends.
        let mut cut = vec![0u8];
        cut.extend_from_slice(&100u32.to_be_bytes());
        cut.extend_from_slice(&[0x0a; 10]);
        let answer = raw(&channel, &path("Version"), cut).await;
        assert!(
            matches!(&answer, Answer::Status(c, _) if *c == tonic::Code::Internal || *c == tonic::Code::InvalidArgument),
            "{answer:?}"
        );
        // Only part of a frame header.
        let answer = raw(&channel, &path("Get"), vec![0, 0, 0]).await;
        assert!(matches!(&answer, Answer::Status(c, _) if *c != tonic::Code::Ok), "{answer:?}");
        // The compressed flag without a grpc-encoding.
        let mut compressed = frame(&[]);
        compressed[0] = 1;
        let answer = raw(&channel, &path("Version"), compressed).await;
        assert!(matches!(&answer, Answer::Status(c, _) if *c != tonic::Code::Ok), "{answer:?}");
        // Bytes that are not protobuf.
        let answer = raw(&channel, &path("Get"), frame(&[0xff; 32])).await;
        check(answer, tonic::Code::Internal, "decode");
        // A method the API does not have.
        let answer = raw(&channel, &format!("/{SERVICE}/FormatDisk"), frame(&[])).await;
        assert!(matches!(answer, Answer::Status(tonic::Code::Unimplemented, _)), "{answer:?}");
        let answer = raw(&channel, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", frame(&[])).await;
        assert!(matches!(answer, Answer::Status(tonic::Code::Unimplemented, _)), "{answer:?}");
        still_serving(&channel).await;
    });
    assert_eq!(node.backend.calls(), []);
    assert_eq!(
        node.state_config().as_deref(),
        Some(cluster.controlplane.as_str())
    );
}

#[test]
fn random_protobuf_for_every_method() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let address = node.address.to_string();
    let mut rng = Rng::new(0x006b_6565_6c73_6f6e);
    let started = Instant::now();
    // Admin sees every method's decoder; a reader's requests to higher methods must be
    // refused before decoding.
    for role in [Role::Admin, Role::Reader] {
        let connector = cluster.connector(node.address, role);
        rt().block_on(async {
            let channel = connector.channel(&address).await.unwrap();
            for method in API_METHODS {
                for round in 0..25 {
                    let len = rng.below(if round % 5 == 0 { 4096 } else { 64 }) as usize;
                    let payload = rng.bytes(len);
                    let answer = raw(&channel, method, frame(&payload)).await;
                    if let Answer::Status(code, message) = &answer {
                        assert_ne!(*code, tonic::Code::Unknown, "{method}: {message}");
                        if role == Role::Reader
                            && ["ApplyConfig", "Reset", "Reboot", "ImageImport"]
                                .iter()
                                .any(|m| method.ends_with(m))
                        {
                            assert_eq!(*code, tonic::Code::PermissionDenied, "{method}: {message}");
                        }
                    }
                }
            }
            still_serving(&channel).await;
        });
    }
    assert!(
        started.elapsed() < Duration::from_secs(240),
        "the fuzz loop took {:?}",
        started.elapsed()
    );
    // Whatever random bytes decoded to, the config in STATE is still a valid one.
    let state = node.state_config().unwrap();
    assert!(keelson_configs::check_str(&state, "state", keelson_configs::Mode::Metal).is_valid());
}

#[test]
fn garbage_on_and_under_the_tls_stream_closes_only_that_connection() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let address = node.address.to_string();
    let mut rng = Rng::new(42);

    // Garbage instead of a TLS ClientHello.
    let mut tcp = TcpStream::connect(node.address).unwrap();
    tcp.set_read_timeout(Some(ANSWER)).unwrap();
    let _ = tcp.write_all(&rng.bytes(4096));
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut tcp, &mut buf).unwrap_or(0);
    // The node answers with at most a TLS alert, then closes.
    assert!(n < 64, "the node answered garbage with {n} bytes");

    // A silent connection holds no one up (its handshake times out on the node).
    let _silent = TcpStream::connect(node.address).unwrap();

    // Garbage inside a good TLS session instead of HTTP/2.
    rt().block_on(async {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let ctx = cluster.context(node.address, &cluster.client(Role::Admin));
        let config = keelson_api::tls::client_config(&ctx.ca, &ctx.cert, &ctx.key).unwrap();
        let tcp = tokio::net::TcpStream::connect(node.address).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(
                rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let _ = tls.write_all(&rng.bytes(8192)).await;
        let mut sink = Vec::new();
        let read = tokio::time::timeout(ANSWER, tls.read_to_end(&mut sink)).await;
        assert!(read.is_ok(), "the node kept a garbage connection open");

        // An HTTP/1.1 request inside TLS.
        let tcp = tokio::net::TcpStream::connect(node.address).await.unwrap();
        let config = keelson_api::tls::client_config(&ctx.ca, &ctx.cert, &ctx.key).unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(
                rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let _ = tls.write_all(b"GET / HTTP/1.1\r\nHost: node\r\n\r\n").await;
        let read = tokio::time::timeout(ANSWER, tls.read_to_end(&mut sink)).await;
        assert!(read.is_ok(), "the node kept an HTTP/1 connection open");

        let connector = cluster.connector(node.address, Role::Reader);
        let channel = connector.channel(&address).await.unwrap();
        still_serving(&channel).await;
    });
    assert_eq!(node.backend.calls(), []);
}
