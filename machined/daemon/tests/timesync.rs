//! Time sync against real NTP servers on 127.0.0.1: Debian's chronyd (when
//! `/usr/sbin/chronyd` is installed), a socket that never answers, and a small test server
//! whose replies are skewed or malformed on purpose. The clock is a recording fake: the
//! host's clock is never changed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keelson_machined::timesync::{Clock, TimeError, TimeSync, Timing, query};
use tokio::net::UdpSocket;

const CHRONYD: &str = "/usr/sbin/chronyd";

/// Seconds from 1900 (NTP's epoch) to 1970.
const NTP_UNIX_OFFSET: f64 = 2_208_988_800.0;

/// A clock that records each step instead of moving.
#[derive(Debug, Default)]
struct RecordingClock {
    steps: Mutex<Vec<time::Duration>>,
}

impl RecordingClock {
    fn steps(&self) -> Vec<time::Duration> {
        self.steps.lock().unwrap().clone()
    }
}

impl Clock for RecordingClock {
    fn step(&self, offset: time::Duration) -> Result<(), TimeError> {
        self.steps.lock().unwrap().push(offset);
        Ok(())
    }
}

fn fast_timing() -> Timing {
    Timing {
        retry_unsynced: Duration::from_millis(100),
        resync: Duration::from_secs(60),
        query_timeout: Duration::from_millis(500),
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// chronyd in the foreground, serving NTP on 127.0.0.1; killed when dropped.
struct Chronyd {
    child: Child,
    server: String,
    _dir: tempfile::TempDir,
}

impl Chronyd {
    /// Starts chronyd, or None (and says so) where it is not installed.
    fn start() -> Option<Chronyd> {
        if !Path::new(CHRONYD).exists() {
            eprintln!(
                "{CHRONYD} is not installed (Debian's chrony): the chrony checks are skipped"
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_udp_port();
        let conf = dir.path().join("chrony.conf");
        let d = dir.path().display();
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbindaddress 127.0.0.1\nallow 127.0.0.1\nlocal stratum 8\n\
                 cmdport 0\npidfile {d}/chronyd.pid\ndriftfile {d}/drift\n"
            ),
        )
        .unwrap();
        // -d: foreground, logging to stderr; -x: never touch the host's clock.
        let child = Command::new(CHRONYD)
            .arg("-d")
            .arg("-x")
            .arg("-f")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Some(Chronyd {
            child,
            server: format!("127.0.0.1:{port}"),
            _dir: dir,
        })
    }
}

impl Drop for Chronyd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the test server does to its replies.
#[derive(Debug, Clone, Copy)]
enum Reply {
    /// A good reply from a clock `skew` seconds ahead of ours.
    Skewed(f64),
    /// Stratum 0: a kiss-o'-death (RATE).
    KissOfDeath,
    /// Leap indicator 3: the server's clock is unsynchronized.
    Unsynchronized,
    /// The origin timestamp is not our transmit time.
    WrongOrigin,
    /// Mode 3 (a client's), not 4.
    ClientMode,
    /// A zero transmit timestamp.
    ZeroTransmit,
    /// Stratum 16: unsynchronized.
    Stratum16,
}

fn ntp_timestamp(skew: f64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let ntp = now + skew + NTP_UNIX_OFFSET;
    let seconds = ntp.trunc() as u64;
    let fraction = (ntp.fract() * 4_294_967_296.0) as u64;
    (seconds << 32) | fraction
}

fn reply_to(request: &[u8], reply: Reply) -> [u8; 48] {
    let mut packet = [0u8; 48];
    let skew = if let Reply::Skewed(skew) = reply {
        skew
    } else {
        0.0
    };
    let (leap, mode, stratum) = match reply {
        Reply::Unsynchronized => (3, 4, 2),
        Reply::ClientMode => (0, 3, 2),
        Reply::KissOfDeath => (0, 4, 0),
        Reply::Stratum16 => (0, 4, 16),
        _ => (0, 4, 2),
    };
    packet[0] = (leap << 6) | (4 << 3) | mode;
    packet[1] = stratum;
    packet[2] = 6; // poll
    packet[3] = (-20i8) as u8; // precision
    packet[8..12].copy_from_slice(&0x0000_0100u32.to_be_bytes()); // root dispersion
    packet[12..16].copy_from_slice(if stratum == 0 {
        b"RATE"
    } else {
        &[127, 0, 0, 1]
    });
    let now = ntp_timestamp(skew);
    packet[16..24].copy_from_slice(&now.to_be_bytes()); // reference
    let mut origin = [0u8; 8];
    origin.copy_from_slice(&request[40..48]);
    if matches!(reply, Reply::WrongOrigin) {
        origin[7] ^= 1;
    }
    packet[24..32].copy_from_slice(&origin);
    packet[32..40].copy_from_slice(&now.to_be_bytes()); // receive
    let transmit = if matches!(reply, Reply::ZeroTransmit) {
        0
    } else {
        now
    };
    packet[40..48].copy_from_slice(&transmit.to_be_bytes());
    packet
}

/// A UDP server on 127.0.0.1 answering every request with `reply`; it runs until the test's
/// runtime ends.
async fn test_server(reply: Reply) -> String {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut request = [0u8; 512];
        while let Ok((len, from)) = socket.recv_from(&mut request).await {
            if len >= 48 {
                let _ = socket.send_to(&reply_to(&request, reply), from).await;
            }
        }
    });
    address.to_string()
}

/// A bound UDP socket that never answers (kept open for the test's life).
async fn silent_server() -> (UdpSocket, String) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap().to_string();
    (socket, address)
}

#[tokio::test]
async fn chronyd_answers_a_query_with_a_small_offset_and_its_stratum() {
    let Some(chronyd) = Chronyd::start() else {
        return;
    };
    // chronyd takes a moment to open its port: ask again until a deadline.
    let deadline = Instant::now() + Duration::from_secs(15);
    let measurement = loop {
        match query(&chronyd.server, Duration::from_secs(1)).await {
            Ok(measurement) => break measurement,
            Err(e) if Instant::now() < deadline => {
                eprintln!("chronyd not answering yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("chronyd never answered: {e}"),
        }
    };
    assert_eq!(measurement.server, chronyd.server);
    assert_eq!(
        measurement.address,
        chronyd.server.parse::<SocketAddr>().unwrap()
    );
    assert_eq!(measurement.stratum, 8);
    assert!(measurement.offset_seconds.abs() < 0.05, "{measurement:?}");
    assert!(
        (0.0..0.5).contains(&measurement.round_trip_seconds),
        "{measurement:?}"
    );
}

#[tokio::test]
async fn syncing_to_chronyd_sets_the_status_and_steps_nothing() {
    let Some(chronyd) = Chronyd::start() else {
        return;
    };
    let clock = Arc::new(RecordingClock::default());
    let sync = TimeSync::with_timing(vec![chronyd.server.clone()], clock.clone(), fast_timing());
    assert!(!sync.status().synced);
    sync.spawn();
    assert!(
        sync.wait_synced(Duration::from_secs(15)).await,
        "{:?}",
        sync.status()
    );
    let status = sync.status();
    assert_eq!(status.server.as_deref(), Some(chronyd.server.as_str()));
    assert!(status.offset_seconds.unwrap().abs() < 0.05, "{status:?}");
    assert!(
        status.last_sync.is_some() && status.last_error.is_none(),
        "{status:?}"
    );
    assert!(clock.steps().is_empty(), "{:?}", clock.steps());
}

#[tokio::test]
async fn a_silent_server_leaves_the_clock_unsynced_and_is_named() {
    let (_socket, server) = silent_server().await;
    let clock = Arc::new(RecordingClock::default());
    let sync = TimeSync::with_timing(vec![server.clone()], clock.clone(), fast_timing());
    sync.spawn();
    assert!(!sync.wait_synced(Duration::from_millis(1500)).await);
    let status = sync.status();
    assert!(!status.synced && status.server.is_none(), "{status:?}");
    let error = status.last_error.unwrap();
    assert!(
        error.contains(&server) && error.contains("did not answer"),
        "{error}"
    );
    assert!(clock.steps().is_empty(), "{:?}", clock.steps());
}

#[tokio::test]
async fn a_clock_off_by_more_than_the_threshold_is_stepped_once_per_sync() {
    let server = test_server(Reply::Skewed(30.0)).await;
    let clock = Arc::new(RecordingClock::default());
    let sync = TimeSync::with_timing(vec![server.clone()], clock.clone(), fast_timing());
    sync.spawn();
    assert!(
        sync.wait_synced(Duration::from_secs(5)).await,
        "{:?}",
        sync.status()
    );
    let steps = clock.steps();
    assert_eq!(steps.len(), 1, "{steps:?}");
    assert!((steps[0].as_seconds_f64() - 30.0).abs() < 0.1, "{steps:?}");
    let status = sync.status();
    assert_eq!(status.server.as_deref(), Some(server.as_str()));
    assert!(
        (status.offset_seconds.unwrap() - 30.0).abs() < 0.1,
        "{status:?}"
    );
}

#[tokio::test]
async fn a_clock_behind_is_stepped_back() {
    let server = test_server(Reply::Skewed(-3600.0)).await;
    let clock = Arc::new(RecordingClock::default());
    let sync = TimeSync::with_timing(vec![server], clock.clone(), fast_timing());
    sync.spawn();
    assert!(
        sync.wait_synced(Duration::from_secs(5)).await,
        "{:?}",
        sync.status()
    );
    let steps = clock.steps();
    assert!(
        (steps[0].as_seconds_f64() + 3600.0).abs() < 0.1,
        "{steps:?}"
    );
}

#[tokio::test]
async fn an_offset_under_the_threshold_is_not_stepped() {
    let server = test_server(Reply::Skewed(0.05)).await;
    let clock = Arc::new(RecordingClock::default());
    let sync = TimeSync::with_timing(vec![server], clock.clone(), fast_timing());
    sync.spawn();
    assert!(
        sync.wait_synced(Duration::from_secs(5)).await,
        "{:?}",
        sync.status()
    );
    assert!(clock.steps().is_empty(), "{:?}", clock.steps());
    let offset = sync.status().offset_seconds.unwrap();
    assert!((offset - 0.05).abs() < 0.04, "{offset}");
}

#[tokio::test]
async fn the_next_server_is_asked_when_the_first_does_not_answer() {
    let (_socket, silent) = silent_server().await;
    let good = test_server(Reply::Skewed(0.0)).await;
    let clock = Arc::new(RecordingClock::default());
    let sync = TimeSync::with_timing(vec![silent, good.clone()], clock, fast_timing());
    sync.spawn();
    assert!(
        sync.wait_synced(Duration::from_secs(5)).await,
        "{:?}",
        sync.status()
    );
    let status = sync.status();
    assert_eq!(status.server.as_deref(), Some(good.as_str()));
    assert_eq!(status.last_error, None);
}

/// Queries a test server that replies with `reply` and checks that the answer is rejected
/// with a message containing `reason`.
async fn check_rejected(reply: Reply, reason: &str) {
    let server = test_server(reply).await;
    let error = query(&server, Duration::from_secs(2)).await.unwrap_err();
    assert!(
        matches!(error, TimeError::BadReply { .. }),
        "{reply:?}: {error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&server) && message.contains(reason),
        "{reply:?}: {message}"
    );
}

#[tokio::test]
async fn replies_that_sntp_clients_must_reject_are_rejected() {
    check_rejected(Reply::KissOfDeath, "kiss-o'-death (RATE)").await;
    check_rejected(Reply::Unsynchronized, "leap indicator 3").await;
    check_rejected(Reply::WrongOrigin, "origin timestamp").await;
    check_rejected(Reply::ClientMode, "mode 4").await;
    check_rejected(Reply::ZeroTransmit, "transmit timestamp is zero").await;
    check_rejected(Reply::Stratum16, "stratum is 16").await;
}

#[tokio::test]
async fn a_name_that_does_not_resolve_says_so() {
    let error = query("no-such-host.invalid", Duration::from_secs(5))
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("no-such-host.invalid") && message.contains("DNS"),
        "{message}"
    );
}
