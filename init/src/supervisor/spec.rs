//! What the supervisor runs: each service's spec (program, dependencies, readiness, the
//! user and capabilities it runs with) and the restart policy.

use std::path::PathBuf;
use std::time::Duration;

pub use rustix::thread::CapabilitySet;

/// Who a service runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAs {
    /// root, with PID 1's capabilities (containerd, etcd, the kubelet, extension
    /// services: they manage the node's containers, mounts and network).
    Root,
    /// A user of its own with only the capabilities it needs ([`Credentials`]).
    User(Credentials),
}

/// A service's own user: what the runner sets between `fork` and `exec`
/// ([`super::runner`]).
///
/// The process runs as `uid`/`gid` (real, effective and saved) with no supplementary
/// group; `capabilities` are its permitted, effective, inheritable and ambient sets (the
/// ambient set is what carries them across `exec` for a non-root user) and its bounding
/// set, so that nothing it runs can ever hold another; and `no_new_privs` is set, so no
/// program it runs gains privilege from a setuid bit or file capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// Its user id.
    pub uid: u32,
    /// Its group id, its only group.
    pub gid: u32,
    /// The capabilities it keeps; every other one is dropped, bounding set included.
    pub capabilities: CapabilitySet,
}

/// How a service tells that it is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Ready as soon as it is running.
    Started,
    /// Ready when its Unix socket accepts a connection.
    UnixSocket(PathBuf),
    /// Ready when a TCP port accepts a connection (etcd's client port on loopback).
    Tcp(std::net::SocketAddr),
    /// Ready when an HTTP/2 (gRPC) server answers on its Unix socket: the client preface
    /// and a SETTINGS frame are sent and the server's SETTINGS frame must come back.
    Http2Socket(PathBuf),
    /// Ready when an HTTP/1 server on a TCP address answers `GET path` with `200` (the
    /// kubelet's `/healthz` on loopback).
    HttpGet(std::net::SocketAddr, String),
}

/// What to run and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Its name (`containerd`).
    pub name: String,
    /// The program, an absolute path.
    pub program: PathBuf,
    /// Arguments after the program name.
    pub args: Vec<String>,
    /// The environment it gets.
    pub env: Vec<(String, String)>,
    /// A file of `KEY=VALUE` lines read at each start and added to `env` (etcd's
    /// cluster settings, which machined writes before it asks for the start); a start
    /// without it fails as a spawn failure does.
    pub env_file: Option<PathBuf>,
    /// A file of arguments, one per line, read at each start and added after `args`
    /// (the kubelet's flags, which machined writes before it asks for the start); a start
    /// without it fails as a spawn failure does.
    pub args_file: Option<PathBuf>,
    /// Services that must be ready before it starts.
    pub depends_on: Vec<String>,
    /// Ordering only, for its first start: it starts once each of these is ready, or is
    /// not on its way to ready (stopped, backing off after a failure, not registered),
    /// or [`START_AFTER_LIMIT`] after it was wanted, whichever comes first. Unlike
    /// `depends_on`, a failing service never holds it back for long, and its restarts
    /// do not wait.
    pub start_after: Vec<String>,
    /// How readiness is checked.
    pub readiness: Readiness,
    /// Readiness must come within this time of the start.
    pub ready_timeout: Duration,
    /// Started at boot; otherwise only on request (control socket).
    pub autostart: bool,
    /// Time between `SIGTERM` and `SIGKILL` when it is stopped.
    pub stop_timeout: Duration,
    /// The user and capabilities it runs with.
    pub run_as: RunAs,
}

/// The longest a service waits for its `start_after` services.
pub const START_AFTER_LIMIT: Duration = Duration::from_secs(10);

/// The restart delays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub base: Duration,
    /// Longest delay.
    pub cap: Duration,
    /// A run at least this long clears the failure count.
    pub reset_after: Duration,
}

impl Backoff {
    /// PID 1's policy: 1 s doubling to 30 s; a minute of running resets it.
    pub const DEFAULT: Backoff = Backoff {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(30),
        reset_after: Duration::from_secs(60),
    };

    /// The delay before the restart that follows `failures` consecutive failures (>= 1).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.base
            .checked_mul(1u32 << doublings)
            .map_or(self.cap, |d| d.min(self.cap))
    }
}
