//! The cluster's helper process (`machinectl cluster helper DIR`, started detached by
//! `create`, stopped by `destroy`), one of two things depending on the network:
//!
//! - namespace clusters: a TCP forwarder. It binds one listener per node on the host's
//!   loopback, then enters the cluster's namespace, so every connection it opens to a
//!   node starts inside the namespace; the host itself has no route to the nodes.
//! - rootless clusters: the cluster network itself, an Ethernet switch over unix
//!   datagram sockets. Each QEMU sends its frames to `sock/switch` (`-netdev dgram`)
//!   and receives on `sock/N`; the switch learns source MACs and floods the rest.
//!
//! Hand-written on std threads: a learning switch is a table and a loop, and the
//! forwarder is `io::copy` both ways; no crate does either with namespace entry.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::netns;
use super::plan::NetworkKind;
use super::record::{Record, socket_dir};
use super::{ClusterError, io_error};
use keelson_api::clientconfig::DEFAULT_API_PORT;

/// The file the helper creates once it serves.
pub const READY_FILE: &str = "helper.ready";
/// The switch's socket name in the socket directory.
pub const SWITCH_SOCKET: &str = "switch";

/// The socket of node `index` (0-based) in a rootless cluster.
pub fn node_socket(cluster_dir: &Path, index: usize) -> PathBuf {
    socket_dir(cluster_dir).join(index.to_string())
}

/// Runs the helper for the cluster in `dir` until it is killed.
pub fn run(dir: &Path) -> Result<(), ClusterError> {
    let record = Record::load(dir)?;
    match record.network {
        NetworkKind::Namespace => forward(dir, &record),
        NetworkKind::User => switch(dir, &record),
    }
}

fn ready(dir: &Path) -> Result<(), ClusterError> {
    let path = dir.join(READY_FILE);
    std::fs::write(&path, b"").map_err(io_error("write", &path))
}

fn forward(dir: &Path, record: &Record) -> Result<(), ClusterError> {
    let Some(ns) = &record.namespace else {
        return Err(ClusterError::BadRecord {
            path: dir.join(super::record::RECORD_FILE),
            message: "a namespace cluster without a namespace name".into(),
        });
    };
    let mut listeners = Vec::new();
    for node in &record.nodes {
        let listener = TcpListener::bind(&node.api).map_err(|source| ClusterError::Io {
            what: "listen on",
            path: PathBuf::from(&node.api),
            source,
        })?;
        let target = SocketAddr::from((node.address, DEFAULT_API_PORT));
        listeners.push((listener, target));
    }
    let handle = netns::namespace_path(ns);
    let file = std::fs::File::open(&handle).map_err(io_error("open", &handle))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
        ClusterError::Io {
            what: "enter the network namespace",
            path: handle.clone(),
            source: e.into(),
        }
    })?;
    ready(dir)?;
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|(listener, target)| {
            std::thread::spawn(move || {
                for client in listener.incoming().flatten() {
                    std::thread::spawn(move || {
                        if let Err(e) = splice(client, target) {
                            eprintln!("forward to {target}: {e}");
                        }
                    });
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Copies both ways between `client` and a new connection to `target`.
fn splice(client: TcpStream, target: SocketAddr) -> io::Result<()> {
    let server = TcpStream::connect_timeout(&target, Duration::from_secs(10))?;
    let _ = server.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let (mut c_read, mut s_write) = (client.try_clone()?, server.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut c_read, &mut s_write);
        let _ = s_write.shutdown(Shutdown::Write);
    });
    let (mut s_read, mut c_write) = (server, client);
    let _ = io::copy(&mut s_read, &mut c_write);
    let _ = c_write.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}

fn switch(dir: &Path, record: &Record) -> Result<(), ClusterError> {
    let sockets = socket_dir(dir);
    let path = sockets.join(SWITCH_SOCKET);
    let _ = std::fs::remove_file(&path);
    let socket = UnixDatagram::bind(&path).map_err(io_error("bind", &path))?;
    let ports: Vec<PathBuf> = (0..record.nodes.len())
        .map(|i| node_socket(dir, i))
        .collect();
    ready(dir)?;
    let mut table: HashMap<[u8; 6], PathBuf> = HashMap::new();
    let mut frame = vec![0u8; 65536];
    loop {
        let (n, from) = match socket.recv_from(&mut frame) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error("receive on", &path)(e)),
        };
        let Some(from) = from.as_pathname().map(Path::to_path_buf) else {
            continue;
        };
        let (Some(dst), Some(src)) = (frame.get(0..6), frame.get(6..12)) else {
            continue;
        };
        let (mut dst_mac, mut src_mac) = ([0u8; 6], [0u8; 6]);
        dst_mac.copy_from_slice(dst);
        src_mac.copy_from_slice(src);
        if src_mac[0] & 1 == 0 {
            table.insert(src_mac, from.clone());
        }
        let payload = frame.get(..n).unwrap_or_default();
        match table.get(&dst_mac) {
            Some(port) if dst_mac[0] & 1 == 0 => {
                let _ = socket.send_to(payload, port);
            }
            _ => {
                for port in ports.iter().filter(|p| **p != from) {
                    // A node not started yet (or stopped) has no socket: skip it.
                    let _ = socket.send_to(payload, port);
                }
            }
        }
    }
}
