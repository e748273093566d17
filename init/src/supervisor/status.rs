//! Where a service is and how its process ended, as the supervisor tracks them and the
//! control socket reports them.

use std::fmt;

use rustix::process::WaitStatus;
use serde::{Deserialize, Serialize};

/// Where a service is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Not running and not wanted.
    Stopped,
    /// Wanted, waiting for its dependencies to be ready (or its `start_after` ordering).
    Waiting,
    /// Being spawned, or running with readiness pending.
    Starting,
    /// Running and ready.
    Ready,
    /// Exited unexpectedly; a restart is scheduled.
    Backoff,
    /// Asked to stop (`SIGTERM` sent, `SIGKILL` at the deadline).
    Stopping,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Stopped => "stopped",
            State::Waiting => "waiting",
            State::Starting => "starting",
            State::Ready => "ready",
            State::Backoff => "backoff",
            State::Stopping => "stopping",
        })
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
}

impl ExitInfo {
    /// From `waitpid`'s status.
    pub fn from_wait(status: WaitStatus) -> ExitInfo {
        ExitInfo {
            code: status.exit_status(),
            signal: status.terminating_signal(),
        }
    }

    /// Exit status 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exited with status {code}"),
            (None, Some(sig)) => write!(f, "killed by signal {sig} ({})", signal_name(sig)),
            (None, None) => f.write_str("ended"),
        }
    }
}

/// The name of a signal number.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => "?",
    }
}

/// A service's status, as the control socket reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Name.
    pub name: String,
    /// State.
    pub state: State,
    /// Process id while running.
    pub pid: Option<u32>,
    /// Restarts after unexpected exits.
    pub restarts: u32,
    /// How the last run ended.
    pub last_exit: Option<ExitInfo>,
    /// Dependencies.
    pub depends_on: Vec<String>,
    /// Started at boot.
    pub autostart: bool,
}
