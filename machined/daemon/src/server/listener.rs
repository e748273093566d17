//! The API's listener: admission of TCP connections, their TLS handshake, then HTTP/2.
//!
//! A connection is first a *handshake*: it holds a place in a small pool of its own
//! ([`MAX_HANDSHAKES`], at most [`MAX_HANDSHAKES_PER_SOURCE`] from one address) for at
//! most [`HANDSHAKE_TIMEOUT`], counted from the accept. When that pool is full the oldest
//! handshake is dropped for the new one, so idle connections that never send a
//! ClientHello cannot keep a client that does out. Only a finished handshake takes a
//! place among the *established* connections ([`MAX_CONNECTIONS`], at most
//! [`MAX_CONNECTIONS_PER_SOURCE`] from one address). A connection over a per-address
//! limit is closed at once; such refusals are logged at most once per
//! [`REFUSAL_LOG_INTERVAL`], with a count, so that a flood cannot flood the log.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use super::SharedTls;
use super::auth::{Authorize, Peer};
use super::service::NodeService;
use keelson_api::api::{MAX_MESSAGE_SIZE, proto::machine_server::MachineServer};
use keelson_api::tls;

/// How long a TLS handshake may take, counted from the accept.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many handshakes may be in flight at once; a new connection beyond it drops the
/// oldest handshake.
pub const MAX_HANDSHAKES: usize = 128;
/// How many handshakes one source address may have in flight; more are closed at accept.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 8;
/// How many established (handshake finished) connections may be open at once.
pub const MAX_CONNECTIONS: usize = 256;
/// How many established connections one source address may hold; more are closed.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 32;
/// How often, at most, refused or failed connections are logged (with a count).
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// HTTP/2 streams per connection.
const MAX_STREAMS: u32 = 64;
/// The largest HTTP/2 frame a client may send (HTTP/2 allows 16 KiB to 16 MiB).
const MAX_FRAME_SIZE: u32 = 256 * 1024;
/// How long maintenance connections may finish after the first config is installed.
const MAINTENANCE_DRAIN: Duration = Duration::from_secs(3);

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Its address has [`MAX_HANDSHAKES_PER_SOURCE`] handshakes in flight.
    SourceHandshakes,
    /// Its address holds [`MAX_CONNECTIONS_PER_SOURCE`] established connections.
    SourceConnections,
    /// [`MAX_CONNECTIONS`] established connections are open.
    Connections,
}

impl Refusal {
    fn reason(self) -> String {
        match self {
            Refusal::SourceHandshakes => format!(
                "the address has {MAX_HANDSHAKES_PER_SOURCE} TLS handshakes in flight (MAX_HANDSHAKES_PER_SOURCE)"
            ),
            Refusal::SourceConnections => format!(
                "the address holds {MAX_CONNECTIONS_PER_SOURCE} connections (MAX_CONNECTIONS_PER_SOURCE)"
            ),
            Refusal::Connections => {
                format!("{MAX_CONNECTIONS} connections are open (MAX_CONNECTIONS)")
            }
        }
    }
}

#[derive(Debug, Default)]
struct SourceCounts {
    handshakes: usize,
    established: usize,
}

#[derive(Debug, Default)]
struct Table {
    sources: HashMap<IpAddr, SourceCounts>,
    /// Handshakes in flight by age (ids grow): the sender drops one.
    handshakes: BTreeMap<u64, (IpAddr, oneshot::Sender<()>)>,
    next_id: u64,
    established: usize,
}

impl Table {
    fn source(&mut self, ip: IpAddr) -> &mut SourceCounts {
        self.sources.entry(ip).or_default()
    }

    fn forget_if_idle(&mut self, ip: IpAddr) {
        if self
            .sources
            .get(&ip)
            .is_some_and(|c| c.handshakes == 0 && c.established == 0)
        {
            self.sources.remove(&ip);
        }
    }

    /// Removes handshake `id` if it is still in flight.
    fn end_handshake(&mut self, id: u64) {
        if let Some((ip, _)) = self.handshakes.remove(&id) {
            let counts = self.source(ip);
            counts.handshakes = counts.handshakes.saturating_sub(1);
            self.forget_if_idle(ip);
        }
    }
}

/// Who holds which place: handshakes and established connections, by source address.
#[derive(Debug, Clone, Default)]
struct Admission {
    table: Arc<Mutex<Table>>,
}

/// A handshake's place; dropping it gives the place back.
#[derive(Debug)]
struct HandshakeTicket {
    admission: Admission,
    id: u64,
    ip: IpAddr,
    /// Resolves when a newer connection took this place.
    evicted: oneshot::Receiver<()>,
}

/// An established connection's place; dropping it gives the place back.
#[derive(Debug)]
struct ConnectionSlot {
    admission: Admission,
    ip: IpAddr,
}

impl Admission {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for a new connection's handshake from `ip`, dropping the oldest handshake
    /// when [`MAX_HANDSHAKES`] are in flight.
    fn begin(&self, ip: IpAddr) -> Result<HandshakeTicket, Refusal> {
        let mut table = self.lock();
        let counts = table.source(ip);
        if counts.handshakes >= MAX_HANDSHAKES_PER_SOURCE {
            return Err(Refusal::SourceHandshakes);
        }
        if counts.established >= MAX_CONNECTIONS_PER_SOURCE {
            return Err(Refusal::SourceConnections);
        }
        counts.handshakes += 1;
        if table.handshakes.len() >= MAX_HANDSHAKES
            && let Some((&oldest, _)) = table.handshakes.first_key_value()
        {
            // Its sender, dropped here, wakes the handshake, which then gives up.
            table.end_handshake(oldest);
        }
        let id = table.next_id;
        table.next_id += 1;
        let (tx, evicted) = oneshot::channel();
        table.handshakes.insert(id, (ip, tx));
        Ok(HandshakeTicket {
            admission: self.clone(),
            id,
            ip,
            evicted,
        })
    }

    #[cfg(test)]
    fn handshakes(&self) -> usize {
        self.lock().handshakes.len()
    }

    #[cfg(test)]
    fn established(&self) -> usize {
        self.lock().established
    }
}

impl HandshakeTicket {
    /// Trades the handshake's place for an established connection's.
    fn establish(self) -> Result<ConnectionSlot, Refusal> {
        let admission = self.admission.clone();
        let ip = self.ip;
        let mut table = admission.lock();
        table.end_handshake(self.id);
        if table.established >= MAX_CONNECTIONS {
            return Err(Refusal::Connections);
        }
        let counts = table.source(ip);
        if counts.established >= MAX_CONNECTIONS_PER_SOURCE {
            table.forget_if_idle(ip);
            return Err(Refusal::SourceConnections);
        }
        counts.established += 1;
        table.established += 1;
        drop(table);
        Ok(ConnectionSlot { admission, ip })
    }
}

impl Drop for HandshakeTicket {
    fn drop(&mut self) {
        self.admission.lock().end_handshake(self.id);
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut table = self.admission.lock();
        table.established = table.established.saturating_sub(1);
        let counts = table.source(self.ip);
        counts.established = counts.established.saturating_sub(1);
        table.forget_if_idle(self.ip);
    }
}

/// Logs one kind of event at most once per [`REFUSAL_LOG_INTERVAL`], with how many
/// happened since the last line.
#[derive(Debug, Clone)]
struct RateLimitedLog {
    state: Arc<Mutex<(Option<Instant>, u64)>>,
}

impl RateLimitedLog {
    fn new() -> RateLimitedLog {
        RateLimitedLog {
            state: Arc::new(Mutex::new((None, 0))),
        }
    }

    /// Counts one event; returns how many to report (this one included) when a line is
    /// due now.
    fn due(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.1 += 1;
        let now = Instant::now();
        if state
            .0
            .is_some_and(|last| now.duration_since(last) < REFUSAL_LOG_INTERVAL)
        {
            return None;
        }
        state.0 = Some(now);
        Some(std::mem::take(&mut state.1))
    }
}

/// The rate-limited logs of the listener.
#[derive(Debug, Clone)]
struct Logs {
    refused: RateLimitedLog,
    handshake: RateLimitedLog,
}

impl Logs {
    fn refused(&self, peer: SocketAddr, why: Refusal) {
        if let Some(count) = self.refused.due() {
            tracing::debug!(
                peer = %peer,
                reason = %why.reason(),
                refused_since_last_line = count,
                "connection refused"
            );
        }
    }

    fn handshake_failed(&self, peer: SocketAddr, error: &str) {
        if let Some(count) = self.handshake.due() {
            tracing::warn!(
                peer = %peer,
                error = %error,
                failed_since_last_line = count,
                "TLS handshake failed"
            );
        }
    }
}

/// Accepts connections until the future is dropped; then every connection it started is
/// aborted (after a short drain for maintenance connections, so the answer to the
/// installing call gets out).
pub(super) async fn accept_loop(
    listener: &TcpListener,
    tls: SharedTls,
    svc: NodeService,
    maintenance: bool,
) {
    let routes = tonic::service::Routes::new(
        MachineServer::new(svc)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE),
    );
    let admission = Admission::default();
    let logs = Logs {
        refused: RateLimitedLog::new(),
        handshake: RateLimitedLog::new(),
    };
    let mut tasks = ConnectionSet {
        set: JoinSet::new(),
        drain: maintenance,
    };
    loop {
        // Reap finished connection tasks so the set does not grow.
        while tasks.set.try_join_next().is_some() {}
        let (tcp, peer_addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // An IPv4 client of the `[::]` listener is one address, whichever way it shows.
        let ip = peer_addr.ip().to_canonical();
        let ticket = match admission.begin(ip) {
            Ok(t) => t,
            Err(why) => {
                logs.refused(peer_addr, why);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(
            tls.read()
                .map(|c| c.clone())
                .unwrap_or_else(|p| p.into_inner().clone()),
        );
        let routes = routes.clone();
        let logs = logs.clone();
        tasks.set.spawn(async move {
            let Some((stream, slot)) = handshake(acceptor, tcp, ticket, peer_addr, &logs).await
            else {
                return;
            };
            serve(stream, slot, routes, maintenance, peer_addr).await;
        });
    }
}

type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// Runs the TLS handshake within [`HANDSHAKE_TIMEOUT`] and unless a newer connection takes
/// its place, then takes an established connection's place.
async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    mut ticket: HandshakeTicket,
    peer: SocketAddr,
    logs: &Logs,
) -> Option<(TlsStream, ConnectionSlot)> {
    let stream = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => match r {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                logs.handshake_failed(peer, &e.to_string());
                return None;
            }
            Err(_) => {
                logs.handshake_failed(peer, &format!("not finished within {HANDSHAKE_TIMEOUT:?} (HANDSHAKE_TIMEOUT)"));
                return None;
            }
        },
        _ = &mut ticket.evicted => {
            logs.handshake_failed(peer, &format!("dropped for a newer connection ({MAX_HANDSHAKES} handshakes in flight, MAX_HANDSHAKES)"));
            return None;
        }
    };
    match ticket.establish() {
        Ok(slot) => Some((stream, slot)),
        Err(why) => {
            logs.refused(peer, why);
            None
        }
    }
}

/// Serves HTTP/2 on an established connection until it ends.
async fn serve(
    stream: TlsStream,
    slot: ConnectionSlot,
    routes: tonic::service::Routes,
    maintenance: bool,
    peer_addr: SocketAddr,
) {
    let _slot = slot;
    let peer = if maintenance {
        Peer::Anonymous
    } else {
        match stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
        {
            Some(cert) => Peer::Client(tls::caller_of(cert)),
            // The verifier requires a certificate; never serve without one.
            None => return,
        }
    };
    let svc = TowerToHyperService::new(Authorize::new(routes, peer));
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(16 * 1024)
        // An upgrade streams ~75 MB in 1 MiB messages: frames of up to 256 KiB instead
        // of HTTP/2's default 16 KiB cut the per-frame work of a slow (emulated) node's
        // receiving task sixteenfold; the flow-control windows stay hyper's 1 MiB.
        .max_frame_size(MAX_FRAME_SIZE)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
        let text = e.to_string();
        if !text.contains("connection closed") {
            tracing::warn!(peer = %peer_addr, error = %text, "connection failed");
        }
    }
}

/// The connection tasks of one mode; dropping it ends them.
struct ConnectionSet {
    set: JoinSet<()>,
    drain: bool,
}

impl Drop for ConnectionSet {
    fn drop(&mut self) {
        if !self.drain || self.set.is_empty() {
            self.set.abort_all();
            return;
        }
        // Let the installing call's answer get out, then end every maintenance connection.
        let mut set = std::mem::take(&mut self.set);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(MAINTENANCE_DRAIN, async {
                while set.join_next().await.is_some() {}
            })
            .await;
            set.abort_all();
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn one_source_gets_its_handshakes_and_connections_then_is_refused() {
        let admission = Admission::default();
        let tickets: Vec<_> = (0..MAX_HANDSHAKES_PER_SOURCE)
            .map(|_| admission.begin(ip(1)).unwrap())
            .collect();
        assert_eq!(
            admission.begin(ip(1)).unwrap_err(),
            Refusal::SourceHandshakes
        );
        // Another address is not affected.
        let other = admission.begin(ip(2)).unwrap();
        drop(other);
        // Finished handshakes free their places.
        let mut slots: Vec<_> = tickets
            .into_iter()
            .map(|t| t.establish().unwrap())
            .collect();
        assert_eq!(admission.handshakes(), 0);
        while slots.len() < MAX_CONNECTIONS_PER_SOURCE {
            slots.push(admission.begin(ip(1)).unwrap().establish().unwrap());
        }
        assert_eq!(
            admission.begin(ip(1)).unwrap_err(),
            Refusal::SourceConnections
        );
        slots.pop();
        assert!(admission.begin(ip(1)).is_ok());
        drop(slots);
        assert_eq!(admission.established(), 0);
        assert!(admission.lock().sources.is_empty());
    }

    #[test]
    fn a_full_handshake_pool_drops_its_oldest_handshake() {
        let admission = Admission::default();
        let mut tickets: Vec<_> = (0..MAX_HANDSHAKES)
            .map(|i| {
                admission
                    .begin(IpAddr::from([10, 1, (i / 250) as u8, (i % 250) as u8]))
                    .unwrap()
            })
            .collect();
        let newest = admission.begin(ip(1)).unwrap();
        assert_eq!(admission.handshakes(), MAX_HANDSHAKES);
        // The oldest was told, and its place (and its address's count) is free.
        assert!(
            tickets[0]
                .evicted
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Closed)
        );
        assert!(
            tickets[1]
                .evicted
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Empty)
        );
        assert!(newest.establish().is_ok());
        tickets.clear();
        assert_eq!(admission.handshakes(), 0);
    }

    #[test]
    fn the_refusal_log_is_rate_limited_and_counts() {
        let log = RateLimitedLog::new();
        assert_eq!(log.due(), Some(1));
        for _ in 0..1000 {
            assert_eq!(log.due(), None);
        }
        log.state.lock().unwrap().0 = Instant::now().checked_sub(REFUSAL_LOG_INTERVAL);
        assert_eq!(log.due(), Some(1001));
    }
}
