//! The signals PID 1 handles, and the tasks that turn their deliveries into messages of
//! the main loop.
//!
//! Following the usual init conventions:
//!
//! | signal | meaning |
//! |---|---|
//! | `SIGCHLD` | reap children |
//! | `SIGTERM` | reboot |
//! | `SIGINT` | Ctrl-Alt-Del (PID 1 asks the kernel for it with `CAD_OFF`): reboot |
//! | `SIGUSR2`, `SIGPWR` | power off |
//! | `SIGUSR1` | print every service's state on the console |

use crate::sender::Sender;
use crate::shutdown::ShutdownKind;

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

/// Start a task per signal that sends each delivery on `tx`. Signals
/// whose handler cannot be installed are returned with the error.
pub fn forward_signals(
    tx: &Sender<SignalKind>,
    signals: &[SignalKind],
) -> Vec<(SignalKind, std::io::Error)> {
    let mut failed = Vec::new();
    for &kind in signals {
        match tokio::signal::unix::signal(kind.tokio_kind()) {
            Ok(mut stream) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while stream.recv().await.is_some() {
                        if tx.send(kind).is_err() {
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
