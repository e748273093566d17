//! The one event type of stage 2's main loop, and the tasks that feed it.
//!
//! Everything that can happen to PID 1 after boot is a variant of [`Event`]: a signal, a
//! service's output line, a readiness result, a timer, a network change, a control
//! request, a fetched config, a program read ahead. Helper tasks (signal listeners, pipe readers, timers,
//! readiness checks, control connections) only turn what they see into events; the main
//! loop in `stage2` owns all state and handles each event in one `match`.
//!
//! Signals, following the usual init conventions:
//!
//! | signal | meaning |
//! |---|---|
//! | `SIGCHLD` | reap children |
//! | `SIGTERM` | reboot |
//! | `SIGINT` | Ctrl-Alt-Del (PID 1 asks the kernel for it with `CAD_OFF`): reboot |
//! | `SIGUSR2`, `SIGPWR` | power off |
//! | `SIGUSR1` | print every service's state on the console |

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use crate::control::{Request, Response};
use crate::netconf::NetEvent;
use crate::supervisor::{ServiceId, TimerKind};

/// A signal PID 1 handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalKind {
    /// `SIGCHLD`.
    Child,
    /// `SIGTERM`.
    Terminate,
    /// `SIGINT` (Ctrl-Alt-Del).
    Interrupt,
    /// `SIGUSR1`.
    User1,
    /// `SIGUSR2`.
    User2,
    /// `SIGPWR`.
    Power,
}

impl SignalKind {
    /// Every signal PID 1 listens for.
    pub const ALL: [SignalKind; 6] = [
        SignalKind::Child,
        SignalKind::Terminate,
        SignalKind::Interrupt,
        SignalKind::User1,
        SignalKind::User2,
        SignalKind::Power,
    ];

    /// The signal's name.
    pub fn name(self) -> &'static str {
        match self {
            SignalKind::Child => "SIGCHLD",
            SignalKind::Terminate => "SIGTERM",
            SignalKind::Interrupt => "SIGINT",
            SignalKind::User1 => "SIGUSR1",
            SignalKind::User2 => "SIGUSR2",
            SignalKind::Power => "SIGPWR",
        }
    }

    /// The shutdown a signal asks for, if any.
    pub fn shutdown(self) -> Option<ShutdownKind> {
        match self {
            SignalKind::Terminate | SignalKind::Interrupt => Some(ShutdownKind::Reboot),
            SignalKind::User2 | SignalKind::Power => Some(ShutdownKind::PowerOff),
            SignalKind::Child | SignalKind::User1 => None,
        }
    }

    fn tokio_kind(self) -> tokio::signal::unix::SignalKind {
        use tokio::signal::unix::SignalKind as K;
        match self {
            SignalKind::Child => K::child(),
            SignalKind::Terminate => K::terminate(),
            SignalKind::Interrupt => K::interrupt(),
            SignalKind::User1 => K::user_defined1(),
            SignalKind::User2 => K::user_defined2(),
            SignalKind::Power => K::from_raw(30),
        }
    }
}

/// How the machine goes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownKind {
    /// Restart the machine.
    Reboot,
    /// Power it off.
    PowerOff,
}

impl ShutdownKind {
    /// `reboot` or `power off`.
    pub fn describe(self) -> &'static str {
        match self {
            ShutdownKind::Reboot => "reboot",
            ShutdownKind::PowerOff => "power off",
        }
    }
}

/// Timers of the main loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerEvent {
    /// A service's restart or kill timer.
    Service {
        /// The service.
        service: ServiceId,
        /// The run it belongs to.
        generation: u64,
        /// What to do.
        kind: TimerKind,
    },
    /// Time to look for a config again (STATE, fw_cfg, config drive) and, without one,
    /// to say again that the node waits for one.
    ConfigReminder,
    /// Time to report PID 1's memory once the node is up and quiet.
    IdleReport,
    /// Time to load the network drivers (and the disk drivers stage 1 left) even though
    /// containerd is not ready yet.
    LateDrivers,
    /// The shutdown's last deadline: kill whatever is left and go down.
    ShutdownDeadline,
    /// A shutdown asked for through the control socket, begun once its answer is out.
    Shutdown(ShutdownKind),
}

/// Everything the main loop reacts to.
#[derive(Debug)]
pub enum Event {
    /// A signal arrived.
    Signal(SignalKind),
    /// A service printed a line.
    Output {
        /// The service.
        service: ServiceId,
        /// The line, without its newline.
        line: String,
    },
    /// A readiness check finished.
    Ready {
        /// The service.
        service: ServiceId,
        /// The run it checked.
        generation: u64,
        /// Ready, or why not.
        result: Result<(), String>,
    },
    /// A timer fired.
    Timer(TimerEvent),
    /// The power button was pressed (the device that saw it).
    PowerButton(String),
    /// The network changed (from `netconf`; one boot-log line each).
    Network(NetEvent),
    /// A control-socket request and where its answer goes.
    Control(Request, oneshot::Sender<Response>),
    /// A program read ahead into the page cache (one boot-log line).
    Prefetched(crate::prefetch::Outcome),
    /// A config fetched from a URL: its bytes, or why it could not be fetched.
    ConfigFetched {
        /// The URL.
        url: String,
        /// The body, or the error.
        result: Result<Vec<u8>, String>,
    },
}

/// The main loop's inbox.
pub type EventTx = UnboundedSender<Event>;

/// Start a task per signal that turns each delivery into an [`Event::Signal`]. Signals
/// whose handler cannot be installed are returned with the error.
pub fn forward_signals(tx: &EventTx, signals: &[SignalKind]) -> Vec<(SignalKind, std::io::Error)> {
    let mut failed = Vec::new();
    for &kind in signals {
        match tokio::signal::unix::signal(kind.tokio_kind()) {
            Ok(mut stream) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while stream.recv().await.is_some() {
                        if tx.send(Event::Signal(kind)).is_err() {
                            break;
                        }
                    }
                });
            }
            Err(e) => failed.push((kind, e)),
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_map_to_init_conventions() {
        let table: Vec<(&str, Option<ShutdownKind>)> = SignalKind::ALL
            .iter()
            .map(|s| (s.name(), s.shutdown()))
            .collect();
        assert_eq!(
            table,
            [
                ("SIGCHLD", None),
                ("SIGTERM", Some(ShutdownKind::Reboot)),
                ("SIGINT", Some(ShutdownKind::Reboot)),
                ("SIGUSR1", None),
                ("SIGUSR2", Some(ShutdownKind::PowerOff)),
                ("SIGPWR", Some(ShutdownKind::PowerOff)),
            ]
        );
    }
}
