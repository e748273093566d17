//! No lock-out from the network, through the real in-process server: idle TCP connections
//! that never send a ClientHello (from one address, or from many) do not keep an admin
//! out, and one identity's follow streams are capped without touching another's.
//!
//! The flood comes from other loopback addresses (127.0.0.2 and up) than the admin's
//! client (127.0.0.1), as it would from other hosts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use api_support::*;
use keelson_api::api::proto;
use keelson_configs::pki::Role;
use keelson_machined::server::follow_limit::MAX_FOLLOWS_PER_IDENTITY;
use keelson_machined::server::listener::{
    MAX_CONNECTIONS, MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE,
};
use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpSocket, TcpStream};

/// How long an admin's call may take while the flood holds its connections.
const ADMIN_BUDGET: Duration = Duration::from_secs(5);

/// Opens `count` TCP connections to `to` from `from` that send nothing.
async fn idle_connections(from: Ipv4Addr, to: SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(IpAddr::V4(from), 0)).unwrap();
        out.push(socket.connect(to).await.unwrap());
    }
    // Let the server accept them all.
    tokio::time::sleep(Duration::from_millis(500)).await;
    out
}

/// An admin's `version` call from 127.0.0.1, within [`ADMIN_BUDGET`].
async fn admin_version(cluster: &Cluster, address: SocketAddr) -> Result<(), String> {
    let connector = cluster.connector(address, Role::Admin);
    let call = async {
        let mut c = connector
            .connect(&address.to_string())
            .await
            .map_err(|e| format!("connect: {e:#}"))?;
        c.version(proto::VersionRequest {})
            .await
            .map(|_| ())
            .map_err(|e| format!("version: {e}"))
    };
    tokio::time::timeout(ADMIN_BUDGET, call)
        .await
        .map_err(|_| format!("no answer within {ADMIN_BUDGET:?}"))?
}

/// Whether the server closed `stream` (EOF or reset) within a short wait.
async fn closed(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_millis(50), stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[test]
fn idle_connections_from_one_address_do_not_lock_out_an_admin() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    rt().block_on(async {
        let flood = MAX_CONNECTIONS + 44;
        let mut idle = idle_connections(Ipv4Addr::new(127, 0, 0, 2), node.address, flood).await;
        let answer = admin_version(&cluster, node.address).await;
        assert_eq!(answer, Ok(()), "an admin behind {flood} idle connections");
        // Beyond its handshakes in flight, the flooding address was closed at accept.
        let mut open = 0;
        for stream in &mut idle {
            if !closed(stream).await {
                open += 1;
            }
        }
        assert_eq!(
            open, MAX_HANDSHAKES_PER_SOURCE,
            "idle connections left open"
        );
    });
}

#[test]
fn idle_connections_from_many_addresses_do_not_lock_out_an_admin() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    rt().block_on(async {
        // More handshakes in flight than the pool holds, none over its address's share.
        let sources = MAX_HANDSHAKES / MAX_HANDSHAKES_PER_SOURCE + 4;
        let mut idle = Vec::new();
        for i in 0..sources {
            let from = Ipv4Addr::new(127, 0, 1, u8::try_from(i + 2).unwrap());
            idle.extend(idle_connections(from, node.address, MAX_HANDSHAKES_PER_SOURCE).await);
        }
        let answer = admin_version(&cluster, node.address).await;
        assert_eq!(
            answer,
            Ok(()),
            "an admin behind {} idle connections from {sources} addresses",
            idle.len()
        );
    });
}

type LogStream = tonic::Streaming<proto::LogLines>;

/// Opens a `logs -f` stream on `client` and waits for its first lines.
async fn follow(client: &mut keelson_api::client::NodeClient) -> Result<LogStream, tonic::Status> {
    let mut stream = client
        .logs(proto::LogsRequest {
            service: "containerd".into(),
            follow: true,
            tail_lines: 0,
        })
        .await?
        .into_inner();
    stream.message().await?;
    Ok(stream)
}

#[test]
fn one_identity_is_refused_its_ninth_follow_stream_and_another_still_gets_one() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let address = node.address.to_string();
    rt().block_on(async {
        let mut reader = cluster
            .connector(node.address, Role::Reader)
            .connect(&address)
            .await
            .unwrap();
        let mut held = Vec::new();
        for _ in 0..MAX_FOLLOWS_PER_IDENTITY {
            held.push(follow(&mut reader).await.unwrap());
        }
        let refused = follow(&mut reader).await.unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::ResourceExhausted,
            "{refused:?}"
        );
        assert!(
            refused.message().contains(&format!(
                "\"reader-user\" already has {MAX_FOLLOWS_PER_IDENTITY} follow streams open"
            )),
            "{}",
            refused.message()
        );
        // Another identity, on another connection, is not affected.
        let mut admin = cluster
            .connector(node.address, Role::Admin)
            .connect(&address)
            .await
            .unwrap();
        let admins = follow(&mut admin).await;
        assert!(admins.is_ok(), "{admins:?}");
        // A follow that ends gives its place back.
        held.pop();
        let mut again = Err(tonic::Status::unknown("not tried"));
        for _ in 0..30 {
            again = follow(&mut reader).await;
            if again.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(again.is_ok(), "{again:?}");
    });
}
