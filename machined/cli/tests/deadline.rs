//! machinectl never hangs: every call has a deadline, and a node that goes silent is
//! reported as such within it. No VM: the silent nodes are local peers that accept and
//! then never answer (before the TLS handshake, or after it and the node's first HTTP/2
//! frame), and a real machined (in-process) behind a proxy that freezes, as a killed VM
//! behind a network does (no FIN, no RST, nothing).

#![allow(clippy::unwrap_used, clippy::expect_used)]

// The daemon's test support: a generated cluster and a running machined.
#[path = "../../daemon/tests/api_support/mod.rs"]
mod api_support;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api_support::*;
use keelson_api::client::{ClientError, Connector};
use keelson_configs::pki::Role;

/// How long after the node goes silent a call may still run: HTTP/2 keepalive's
/// interval and timeout (10 s + 10 s), with room for a loaded host.
const KEEPALIVE_WINDOW: Duration = Duration::from_secs(35);

fn machinectl(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_machinectl"));
    command
        .args(args)
        .env_remove("MACHINECONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Waits for `child` to end, killing it (and failing) after `limit`.
fn finish_within(mut child: Child, limit: Duration, what: &str) -> (Output, Duration) {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return (child.wait_with_output().unwrap(), start.elapsed());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what}: machinectl still waiting after {limit:?}\n{}",
                text(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A peer that accepts TCP connections and never says a word: the TLS handshake stalls.
fn mute_peer() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for tcp in listener.incoming().flatten() {
            held.push(tcp);
        }
    });
    address
}

/// A node (maintenance-mode TLS, self-signed) that completes the handshake, sends its
/// HTTP/2 SETTINGS, reads everything and answers nothing: no response, no ping.
fn silent_node() -> SocketAddr {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let config =
        keelson_api::tls::maintenance_server_config(&cert.pem(), &key.serialize_pem()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let config = config.clone();
            std::thread::spawn(move || {
                let connection = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(connection, tcp);
                // An empty SETTINGS frame: the first words of an HTTP/2 server.
                if tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).is_err() || tls.flush().is_err() {
                    return;
                }
                let mut buf = [0u8; 16 * 1024];
                while matches!(tls.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    address
}

/// A TCP proxy to a node that can freeze: from then on it forwards nothing in either
/// direction and keeps every connection open, as a killed VM behind a network does.
struct FreezingProxy {
    address: SocketAddr,
    frozen: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
}

impl FreezingProxy {
    fn to(upstream: SocketAddr) -> FreezingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = FreezingProxy {
            address: listener.local_addr().unwrap(),
            frozen: Arc::new(AtomicBool::new(false)),
            connections: Arc::new(Mutex::new(Vec::new())),
        };
        let frozen = proxy.frozen.clone();
        let connections = proxy.connections.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(node) = TcpStream::connect(upstream) else {
                    return;
                };
                let mut held = connections.lock().unwrap();
                held.push(client.try_clone().unwrap());
                held.push(node.try_clone().unwrap());
                drop(held);
                pump(
                    client.try_clone().unwrap(),
                    node.try_clone().unwrap(),
                    &frozen,
                );
                pump(node, client, &frozen);
            }
        });
        proxy
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        for tcp in self.connections.lock().unwrap().iter() {
            let _ = tcp.shutdown(Shutdown::Both);
        }
    }
}

/// Copies `from` to `to` until the proxy freezes; then reads nothing more.
fn pump(mut from: TcpStream, mut to: TcpStream, frozen: &Arc<AtomicBool>) {
    let frozen = frozen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if frozen.load(Ordering::SeqCst) {
                // Silent from now on; the sockets stay open until the proxy is dropped.
                return;
            }
            if to.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    });
}

#[test]
fn a_unary_call_to_a_node_that_never_answers_ends_at_the_timeout() {
    let node = silent_node();
    let child = machinectl(&[
        "--insecure",
        "--nodes",
        &node.to_string(),
        "--timeout",
        "2s",
        "version",
    ])
    .spawn()
    .unwrap();
    let (out, took) = finish_within(child, Duration::from_secs(15), "version");
    assert_fails(
        &out,
        &[
            format!("{node} did not answer Version within 2 s").as_str(),
            "--timeout 8s",
        ],
    );
    assert!(
        took < Duration::from_secs(8),
        "took {took:?}\n{}",
        text(&out)
    );
}

#[test]
fn a_handshake_that_never_ends_is_given_up_at_the_timeout() {
    let peer = mute_peer();
    let child = machinectl(&[
        "--insecure",
        "--nodes",
        &peer.to_string(),
        "--timeout",
        "2s",
        "version",
    ])
    .spawn()
    .unwrap();
    let (out, took) = finish_within(child, Duration::from_secs(15), "version");
    assert_fails(&out, &["no TLS answer within 2 s", "--timeout"]);
    assert!(
        took < Duration::from_secs(8),
        "took {took:?}\n{}",
        text(&out)
    );
}

#[test]
fn a_node_that_goes_silent_during_apply_config_is_reported_gone() {
    // apply-config has a long deadline of its own (5 min); keepalive finds the dead node.
    let node = silent_node();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.toml");
    std::fs::write(&file, "version = 1\n").unwrap();
    let child = machinectl(&[
        "--insecure",
        "--nodes",
        &node.to_string(),
        "apply-config",
        "--file",
        file.to_str().unwrap(),
    ])
    .spawn()
    .unwrap();
    let (out, _) = finish_within(child, KEEPALIVE_WINDOW, "apply-config");
    assert_fails(
        &out,
        &[
            format!("{node} stopped answering during ApplyConfig").as_str(),
            "died, rebooted or was cut off",
        ],
    );
}

/// Starts `machinectl logs -f containerd` through a proxy to a live node and waits for
/// the node's five lines.
fn follow_logs(config: &Path, extra: &[&str]) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut args = vec!["--machineconfig", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["logs", "-f", "containerd"]);
    let mut child = machinectl(&args).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    for i in 1..=5 {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the node's log lines");
        assert_eq!(line, format!("containerd line {i}"));
    }
    (child, rx)
}

#[test]
fn a_stream_from_a_node_that_froze_ends_within_the_keepalive_window() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let proxy = FreezingProxy::to(node.address);
    let config = cluster.client_config(proxy.address, Role::Reader);

    // A live node's stream outlasts --timeout: streams have no total deadline.
    let (mut child, _lines) = follow_logs(&config, &["--timeout", "1s"]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        child.try_wait().unwrap().is_none(),
        "logs -f ended while the node was alive"
    );

    proxy.freeze();
    let (out, _) = finish_within(child, KEEPALIVE_WINDOW, "logs -f");
    assert_fails(
        &out,
        &[format!("{} stopped answering during Logs", proxy.address).as_str()],
    );
    drop(proxy);
    drop(node);
}

#[test]
fn the_library_client_names_the_deadline() {
    let node = silent_node();
    let connector = Connector::insecure()
        .unwrap()
        .with_timeout(Some(Duration::from_secs(1)));
    let address = node.to_string();
    let err = rt().block_on(async {
        let start = Instant::now();
        let mut client = connector.connect(&address).await.unwrap();
        let call = client.version(keelson_api::api::proto::VersionRequest {});
        let status = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("the call ended by its own deadline")
            .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5));
        connector.status_error(&address, &status)
    });
    match &err {
        ClientError::DeadlineExceeded {
            address: a,
            call,
            after,
        } => {
            assert_eq!(a, &address);
            assert_eq!(call, "Version");
            assert_eq!(*after, Duration::from_secs(1));
        }
        other => panic!("not a deadline: {other}"),
    }
}
