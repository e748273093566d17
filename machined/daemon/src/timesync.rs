//! The node's time sync: an SNTP client (RFC 4330) that steps the clock to the config's
//! `machine.time_servers`, before etcd and certificate checks trust it.
//!
//! - [`query`] asks one server once and returns a validated [`Measurement`] (the live answer
//!   of `machinectl time`). The protocol and the reply's checks are the `sntpc` crate's: mode
//!   4, a non-zero transmit time, stratum 1..=15 (stratum 0 is a kiss-o'-death), leap
//!   indicator not 3, the origin timestamp equal to our transmit time, and the reply from
//!   the address we asked. The socket is tokio's, so a query runs on machined's
//!   current-thread runtime.
//! - [`TimeSync`] is the background task: it asks the servers in order until one answers,
//!   steps the clock through [`Clock`] when the offset is over [`STEP_THRESHOLD_SECONDS`],
//!   and keeps a [`TimeStatus`]. It retries every [`Timing::retry_unsynced`] until the first
//!   sync, then every [`Timing::resync`].
//! - Small offsets are left alone: there is no slewing (`adjtimex`). The clock is stepped,
//!   as `chronyc makestep` would, only when it is off by more than the threshold; what
//!   etcd and TLS need is a clock right to well under a second, not a disciplined one.
//! - **No servers configured**: the node's hardware clock is trusted as it is, as Talos
//!   does with time sync disabled, and the status says `synced` from the start (with no
//!   server and no error), so that `bootstrap` is not refused on a node whose operator
//!   chose not to sync. An operator who wants the guard configures a server.
//! - [`SystemClock`] steps `CLOCK_REALTIME` with `clock_settime`; the RTC is not written
//!   (the kernel's 11-minute mode does that when it is enabled). Tests use a recording fake
//!   [`Clock`], so the host's clock is never changed by them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sntpc::{NtpContext, NtpTimestampGenerator, NtpUdpSocket};
use tokio::net::UdpSocket;
use tokio::sync::watch;

/// The NTP port, used when a server is given without one.
pub const NTP_PORT: u16 = 123;

/// The clock is stepped only when it is off by more than this many seconds.
pub const STEP_THRESHOLD_SECONDS: f64 = 0.1;

/// How long one query waits for a server's answer by default.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// How often the servers are asked again until the first sync.
pub const RETRY_UNSYNCED: Duration = Duration::from_secs(5);

/// How often the servers are asked again once synced.
pub const RESYNC: Duration = Duration::from_secs(5 * 60);

/// What can go wrong while asking a server for the time or stepping the clock.
#[derive(Debug, thiserror::Error)]
pub enum TimeError {
    /// The server's name is empty or its port is not a number.
    #[error(
        "time server {server:?} is not an address: give an IP address or a host name, with an \
         optional :port (IPv6 with a port as [addr]:port) in the config's machine.time_servers"
    )]
    BadServer {
        /// The server as configured.
        server: String,
    },
    /// The server's name did not resolve.
    #[error(
        "cannot resolve time server {server:?}; check the node's DNS servers, or give the \
         server's IP address in machine.time_servers"
    )]
    Resolve {
        /// The server as configured.
        server: String,
        /// The resolver's error.
        #[source]
        source: std::io::Error,
    },
    /// The name resolved to no address.
    #[error("time server {server:?} resolved to no address; check its DNS records")]
    NoAddress {
        /// The server as configured.
        server: String,
    },
    /// The UDP socket could not be opened, or the request could not be sent.
    #[error(
        "cannot send an NTP request to time server {at}; check that the node \
         has a route to it",
        at = named(.server, .address)
    )]
    Send {
        /// The server as configured.
        server: String,
        /// The address asked.
        address: SocketAddr,
        /// The socket's error.
        #[source]
        source: std::io::Error,
    },
    /// No answer came before the deadline.
    #[error(
        "time server {at} did not answer within {timeout:?}; check that it \
         serves NTP on UDP port {port} and that no firewall drops the traffic",
        port = address.port(),
        at = named(.server, .address)
    )]
    Timeout {
        /// The server as configured.
        server: String,
        /// The address asked.
        address: SocketAddr,
        /// How long the query waited.
        timeout: Duration,
    },
    /// The server answered with a reply that SNTP clients must reject.
    #[error(
        "time server {at} gave an unusable answer: {reason}; use another \
         server, or fix this one",
        at = named(.server, .address)
    )]
    BadReply {
        /// The server as configured.
        server: String,
        /// The address asked.
        address: SocketAddr,
        /// Why the reply was rejected.
        reason: String,
    },
    /// The clock could not be read or stepped.
    #[error(
        "cannot step the clock by {offset_seconds:.3} s; machined needs CAP_SYS_TIME to set \
         the time"
    )]
    Step {
        /// The offset the step was for.
        offset_seconds: f64,
        /// The system call's error.
        #[source]
        source: nix::Error,
    },
}

/// A signed clock offset (the `time` crate's `Duration`), named here for implementors.
pub type Offset = time::Duration;

/// The clock that time sync steps: the real one is [`SystemClock`]; tests record.
pub trait Clock: Send + Sync {
    /// Moves the clock by `offset` (positive: forward).
    ///
    /// # Errors
    ///
    /// [`TimeError::Step`] when the clock cannot be read or set.
    fn step(&self, offset: time::Duration) -> Result<(), TimeError>;
}

/// The node's real-time clock, `CLOCK_REALTIME`, stepped with `clock_settime`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn step(&self, offset: time::Duration) -> Result<(), TimeError> {
        use nix::sys::time::TimeSpec;
        use nix::time::{ClockId, clock_gettime, clock_settime};
        let failed = |source| TimeError::Step {
            offset_seconds: offset.as_seconds_f64(),
            source,
        };
        let now = clock_gettime(ClockId::CLOCK_REALTIME).map_err(failed)?;
        let now = time::Duration::new(now.tv_sec(), i32::try_from(now.tv_nsec()).unwrap_or(0));
        let then = now.saturating_add(offset);
        let then = TimeSpec::new(then.whole_seconds(), i64::from(then.subsec_nanoseconds()));
        clock_settime(ClockId::CLOCK_REALTIME, then).map_err(failed)
    }
}

/// One validated answer of one server.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// The server as configured.
    pub server: String,
    /// The address that answered.
    pub address: SocketAddr,
    /// How far the server's clock is ahead of ours (negative: behind), in seconds.
    pub offset_seconds: f64,
    /// The request's round trip, less the server's own processing time, in seconds.
    pub round_trip_seconds: f64,
    /// The server's stratum (1..=15).
    pub stratum: u8,
}

/// What time sync has done so far.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeStatus {
    /// The configured servers, in the order they are asked.
    pub servers: Vec<String>,
    /// Whether the clock has been synced at least once (always true with no servers: the
    /// hardware clock is trusted as it is).
    pub synced: bool,
    /// The server of the last successful sync.
    pub server: Option<String>,
    /// The offset measured at the last successful sync, in seconds.
    pub offset_seconds: Option<f64>,
    /// When the last successful sync happened (by the clock after any step).
    pub last_sync: Option<SystemTime>,
    /// Why the last round failed, naming each server asked; cleared by a successful sync.
    pub last_error: Option<String>,
}

/// How often and how long time sync asks; [`Timing::default`] is the production values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// The wait between rounds until the first sync.
    pub retry_unsynced: Duration,
    /// The wait between rounds once synced.
    pub resync: Duration,
    /// How long one query waits for an answer.
    pub query_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            retry_unsynced: RETRY_UNSYNCED,
            resync: RESYNC,
            query_timeout: QUERY_TIMEOUT,
        }
    }
}

/// The node's time sync: cheap to clone, every clone sees the same status.
#[derive(Clone)]
pub struct TimeSync {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TimeSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimeSync")
            .field("timing", &self.inner.timing)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

struct Inner {
    clock: Arc<dyn Clock>,
    timing: Timing,
    status: Mutex<TimeStatus>,
    synced: watch::Sender<bool>,
}

impl TimeSync {
    /// Time sync to `servers` (the config's `machine.time_servers`: IP addresses or names,
    /// each with an optional `:port`) with the production [`Timing`].
    #[must_use]
    pub fn new(servers: Vec<String>, clock: Arc<dyn Clock>) -> TimeSync {
        TimeSync::with_timing(servers, clock, Timing::default())
    }

    /// Time sync with the given intervals (tests shorten them).
    #[must_use]
    pub fn with_timing(servers: Vec<String>, clock: Arc<dyn Clock>, timing: Timing) -> TimeSync {
        let trusted = servers.is_empty();
        let status = TimeStatus {
            servers,
            synced: trusted,
            server: None,
            offset_seconds: None,
            last_sync: None,
            last_error: None,
        };
        TimeSync {
            inner: Arc::new(Inner {
                clock,
                timing,
                status: Mutex::new(status),
                synced: watch::Sender::new(trusted),
            }),
        }
    }

    /// Starts the background task on the current tokio runtime. With no servers it only
    /// logs that the hardware clock is trusted.
    pub fn spawn(&self) {
        let servers = self.status().servers;
        if servers.is_empty() {
            tracing::info!("no time servers configured: the hardware clock is trusted as it is");
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                this.sync_once(&servers).await;
                let wait = if this.status().synced {
                    this.inner.timing.resync
                } else {
                    this.inner.timing.retry_unsynced
                };
                tokio::time::sleep(wait).await;
            }
        });
    }

    /// One round: the servers in order until one answers, then the step if it is needed.
    async fn sync_once(&self, servers: &[String]) {
        let mut errors = Vec::new();
        for server in servers {
            match query(server, self.inner.timing.query_timeout).await {
                Ok(measurement) => match self.apply(&measurement) {
                    Ok(()) => return,
                    Err(e) => errors.push(error_chain(&e)),
                },
                Err(e) => {
                    tracing::debug!(server, error = %error_chain(&e), "time server failed");
                    errors.push(error_chain(&e));
                }
            }
        }
        let error = errors.join("; ");
        tracing::warn!(error, "time sync failed; retrying");
        self.update(|status| status.last_error = Some(error));
    }

    /// Steps the clock if `measurement` says it is off by more than the threshold, and
    /// records the sync.
    fn apply(&self, measurement: &Measurement) -> Result<(), TimeError> {
        let offset = measurement.offset_seconds;
        if offset.abs() > STEP_THRESHOLD_SECONDS {
            self.inner.clock.step(time::Duration::seconds_f64(offset))?;
            tracing::info!(
                server = measurement.server,
                address = %measurement.address,
                offset_seconds = offset,
                "stepped the clock"
            );
        } else {
            tracing::debug!(
                server = measurement.server,
                offset_seconds = offset,
                "clock in sync"
            );
        }
        self.update(|status| {
            status.synced = true;
            status.server = Some(measurement.server.clone());
            status.offset_seconds = Some(offset);
            status.last_sync = Some(SystemTime::now());
            status.last_error = None;
        });
        self.inner.synced.send_replace(true);
        Ok(())
    }

    fn update(&self, change: impl FnOnce(&mut TimeStatus)) {
        let mut status = self
            .inner
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        change(&mut status);
    }

    /// What time sync has done so far.
    #[must_use]
    pub fn status(&self) -> TimeStatus {
        self.inner
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until the clock has been synced once, for at most `timeout`; true if it was.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let mut synced = self.inner.synced.subscribe();
        matches!(
            tokio::time::timeout(timeout, synced.wait_for(|synced| *synced)).await,
            Ok(Ok(_))
        )
    }
}

/// Asks `server` (an IP address or a name, with an optional `:port`) for the time once,
/// trying each of its addresses until one answers, all within `timeout`.
///
/// # Errors
///
/// The [`TimeError`] of the last address tried: the name did not resolve, the request could
/// not be sent, no answer came in time, or the reply failed RFC 4330's checks.
pub async fn query(server: &str, timeout: Duration) -> Result<Measurement, TimeError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let addresses = match tokio::time::timeout_at(deadline, resolve(server)).await {
        Ok(resolved) => resolved?,
        Err(_) => {
            return Err(TimeError::Resolve {
                server: server.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer from the resolver within {timeout:?}"),
                ),
            });
        }
    };
    let mut last_error = TimeError::NoAddress {
        server: server.to_owned(),
    };
    for address in addresses {
        let asked = tokio::time::timeout_at(deadline, query_address(server, address)).await;
        match asked {
            Ok(Ok(measurement)) => return Ok(measurement),
            Ok(Err(e)) => last_error = e,
            Err(_) => {
                return Err(TimeError::Timeout {
                    server: server.to_owned(),
                    address,
                    timeout,
                });
            }
        }
    }
    Err(last_error)
}

/// How a configured server is written: an address, or a name and port to resolve.
#[derive(Debug, PartialEq, Eq)]
enum ServerSpec {
    Address(SocketAddr),
    Name(String, u16),
}

/// Reads `server` as `IP`, `IP:port`, `[IPv6]:port`, `name` or `name:port`.
fn parse_server(server: &str) -> Result<ServerSpec, TimeError> {
    let bad = || TimeError::BadServer {
        server: server.to_owned(),
    };
    let server = server.trim();
    if let Ok(address) = server.parse::<SocketAddr>() {
        return Ok(ServerSpec::Address(address));
    }
    if let Ok(ip) = server
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok(ServerSpec::Address(SocketAddr::new(ip, NTP_PORT)));
    }
    let (name, port) = match server.rsplit_once(':') {
        Some((name, port)) => (name, port.parse::<u16>().map_err(|_| bad())?),
        None => (server, NTP_PORT),
    };
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
    if !valid {
        return Err(bad());
    }
    Ok(ServerSpec::Name(name.to_owned(), port))
}

async fn resolve(server: &str) -> Result<Vec<SocketAddr>, TimeError> {
    match parse_server(server)? {
        ServerSpec::Address(address) => Ok(vec![address]),
        ServerSpec::Name(name, port) => {
            let addresses: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), port))
                .await
                .map_err(|source| TimeError::Resolve {
                    server: server.to_owned(),
                    source,
                })?
                .collect();
            if addresses.is_empty() {
                return Err(TimeError::NoAddress {
                    server: server.to_owned(),
                });
            }
            Ok(addresses)
        }
    }
}

async fn query_address(server: &str, address: SocketAddr) -> Result<Measurement, TimeError> {
    let send_failed = |source| TimeError::Send {
        server: server.to_owned(),
        address,
        source,
    };
    let local: SocketAddr = match address {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = NtpSocket {
        socket: UdpSocket::bind(local).await.map_err(send_failed)?,
        io_error: Mutex::new(None),
    };
    let context = NtpContext::new(WallClock::default());
    let result = sntpc::get_time(address, &socket, context).await;
    let reply = match result {
        Ok(reply) => reply,
        Err(sntpc::Error::Network) => {
            let source = socket
                .io_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
                .unwrap_or_else(|| std::io::Error::other("the request was sent only in part"));
            return Err(send_failed(source));
        }
        Err(e) => {
            return Err(TimeError::BadReply {
                server: server.to_owned(),
                address,
                reason: reply_rejection(e),
            });
        }
    };
    Ok(Measurement {
        server: server.to_owned(),
        address,
        offset_seconds: micros_to_seconds(reply.offset()),
        round_trip_seconds: micros_to_seconds(i64::try_from(reply.roundtrip()).unwrap_or(i64::MAX)),
        stratum: reply.stratum(),
    })
}

/// Microseconds to seconds (exact for 142 years of microseconds: f64 has 52 bits).
fn micros_to_seconds(micros: i64) -> f64 {
    micros as f64 / 1e6
}

/// Why sntpc rejected a reply, in words.
fn reply_rejection(error: sntpc::Error) -> String {
    use sntpc::Error;
    match error {
        Error::IncorrectOriginTimestamp => {
            "its origin timestamp is not our transmit time (a stale or forged reply)".to_owned()
        }
        Error::IncorrectMode => "it is not a server reply (mode 4)".to_owned(),
        Error::UnsynchronizedClock => {
            "its own clock is unsynchronized (leap indicator 3)".to_owned()
        }
        Error::InvalidTimestamp => "its transmit timestamp is zero or out of range".to_owned(),
        Error::ExcessiveRootDistance => "its root distance is too large to trust".to_owned(),
        Error::BackwardReferenceTimestamp => {
            "its reference timestamp is later than its transmit timestamp".to_owned()
        }
        Error::IncorrectResponseVersion => "its NTP version is not one we asked for".to_owned(),
        Error::IncorrectStratumHeaders => "its stratum is 16 or more (unsynchronized)".to_owned(),
        Error::IncorrectPayload => "the reply is shorter than an NTP packet".to_owned(),
        Error::ResponseAddressMismatch => "the reply came from another address".to_owned(),
        Error::KissOfDeath(code) => {
            format!(
                "it sent a kiss-o'-death ({}): it asks us to stop or slow down",
                code.as_str()
            )
        }
        other => format!("{other:?}"),
    }
}

/// Our wall clock for sntpc's timestamps; a clock before 1970 reads as 1970 instead of
/// panicking as sntpc's `StdTimestampGen` would.
#[derive(Debug, Clone, Copy, Default)]
struct WallClock {
    since_epoch: Duration,
}

impl NtpTimestampGenerator for WallClock {
    fn init(&mut self) {
        self.since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
    }

    fn timestamp_sec(&self) -> u64 {
        self.since_epoch.as_secs()
    }

    fn timestamp_subsec_micros(&self) -> u32 {
        self.since_epoch.subsec_micros()
    }
}

/// tokio's UDP socket behind sntpc's socket trait, keeping the I/O error that sntpc's own
/// error type drops.
struct NtpSocket {
    socket: UdpSocket,
    io_error: Mutex<Option<std::io::Error>>,
}

impl NtpSocket {
    fn keep(&self, error: std::io::Error) -> sntpc::Error {
        *self.io_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
        sntpc::Error::Network
    }
}

impl NtpUdpSocket for NtpSocket {
    async fn send_to(&self, buf: &[u8], addr: SocketAddr) -> sntpc::Result<usize> {
        self.socket
            .send_to(buf, addr)
            .await
            .map_err(|e| self.keep(e))
    }

    async fn recv_from(&self, buf: &mut [u8]) -> sntpc::Result<(usize, SocketAddr)> {
        self.socket.recv_from(buf).await.map_err(|e| self.keep(e))
    }
}

/// A server as configured, with the address asked when the two differ.
fn named(server: &str, address: &SocketAddr) -> String {
    if server.parse::<SocketAddr>().ok() == Some(*address) {
        server.to_owned()
    } else {
        format!("{server} ({address})")
    }
}

/// An error and its sources on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(server: &str, expected: Option<ServerSpec>) {
        assert_eq!(parse_server(server).ok(), expected, "{server}");
    }

    fn address(text: &str) -> Option<ServerSpec> {
        Some(ServerSpec::Address(text.parse().unwrap()))
    }

    fn name(name: &str, port: u16) -> Option<ServerSpec> {
        Some(ServerSpec::Name(name.to_owned(), port))
    }

    #[test]
    fn servers_are_read_with_the_default_port() {
        check("10.0.0.1", address("10.0.0.1:123"));
        check("10.0.0.1:1123", address("10.0.0.1:1123"));
        check("fd00::1", address("[fd00::1]:123"));
        check("[fd00::1]", address("[fd00::1]:123"));
        check("[fd00::1]:1123", address("[fd00::1]:1123"));
        check("time.example.org", name("time.example.org", 123));
        check("time.example.org:1123", name("time.example.org", 1123));
        check(" ntp ", name("ntp", 123));
        check("", None);
        check("time.example.org:ntp", None);
        check("time example", None);
        check(":123", None);
    }

    #[test]
    fn an_address_is_named_once() {
        let address: SocketAddr = "10.0.0.1:123".parse().unwrap();
        assert_eq!(named("10.0.0.1:123", &address), "10.0.0.1:123");
        assert_eq!(named("10.0.0.1", &address), "10.0.0.1 (10.0.0.1:123)");
        assert_eq!(named("ntp", &address), "ntp (10.0.0.1:123)");
    }

    #[test]
    fn a_bad_server_says_where_to_fix_it() {
        let error = parse_server("a b").unwrap_err().to_string();
        assert!(
            error.contains("\"a b\"") && error.contains("machine.time_servers"),
            "{error}"
        );
    }

    #[test]
    fn every_rejection_is_in_words() {
        use sntpc::{Error, KissOfDeathCode};
        for error in [
            Error::IncorrectOriginTimestamp,
            Error::IncorrectMode,
            Error::UnsynchronizedClock,
            Error::IncorrectStratumHeaders,
            Error::KissOfDeath(KissOfDeathCode::Rate),
        ] {
            let reason = reply_rejection(error);
            assert!(!reason.contains("Error") && reason.len() > 10, "{reason}");
        }
    }

    #[test]
    fn error_chain_is_one_line_with_sources() {
        let error = TimeError::Resolve {
            server: "ntp".to_owned(),
            source: std::io::Error::other("no such host"),
        };
        let line = error_chain(&error);
        assert!(
            line.starts_with("cannot resolve time server \"ntp\""),
            "{line}"
        );
        assert!(line.ends_with(": no such host"), "{line}");
    }

    #[test]
    fn no_servers_means_the_hardware_clock_is_trusted() {
        struct Refuses;
        impl Clock for Refuses {
            fn step(&self, _: time::Duration) -> Result<(), TimeError> {
                panic!("no step without servers")
            }
        }
        let sync = TimeSync::new(Vec::new(), Arc::new(Refuses));
        let status = sync.status();
        assert!(status.synced && status.server.is_none() && status.last_error.is_none());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            sync.spawn();
            assert!(sync.wait_synced(Duration::from_millis(1)).await);
        });
    }
}
