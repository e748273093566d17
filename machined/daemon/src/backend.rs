//! What machined asks of PID 1: the [`NodeBackend`] trait, its real implementation over
//! init's control socket ([`InitSocket`]), and a [`RecordingBackend`] that tests use in
//! its place.
//!
//! The API server never touches services, power or live configuration itself: it asks
//! PID 1, which owns them. Everything else it reads from `/proc`, `/sys` and STATE itself.
//!
//! The control socket's protocol (`/run/keelson/init.sock`: one JSON request per line,
//! one answer per line, each request its own type naming its answer's type) is defined
//! once, in [`keelson_node_protocol::control`], which PID 1 serves from; this module
//! only sends those requests and turns their answers into what the API shows
//! ([`ServiceView`]). `apply` names the [`LivePart`]s that changed and carries the whole
//! new config; init validates it, checks every change against the node, and applies
//! those parts (sysctls, kernel modules, files, hostname, network) or refuses the
//! request whole.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use keelson_node_protocol::control::{self as wire, Call as WireCall, DecodeError, Request};
use serde::{Deserialize, Serialize};

pub use keelson_node_protocol::control::Part as LivePart;

/// Where init listens.
pub const INIT_SOCKET: &str = wire::SOCKET;

/// How long a call to init may take before machined gives up on it.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How many lines `logs` asks init for when the caller wants "all of them".
pub const ALL_LINES: u32 = 100_000;

/// Errors from talking to PID 1.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The socket could not be reached.
    #[error("cannot reach init's control socket {path}; is PID 1 running the supervisor?")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("the conversation with init over {path} failed")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Init answered something that is not the answer to the request.
    #[error("init answered {op:?} with something machined does not understand: {detail}")]
    Protocol {
        /// The request.
        op: String,
        /// What was wrong with the answer.
        detail: String,
    },
    /// Init refused the request.
    #[error("{0}")]
    Refused(String),
    /// No such service.
    #[error("no service named {name:?}; known services: {known}")]
    UnknownService {
        /// The name asked for.
        name: String,
        /// The names init knows.
        known: String,
    },
}

/// A supervised service as the API shows it, made from the protocol's
/// [`wire::ServiceStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    /// Its name (`containerd`, `kubelet`, `machined`, ...).
    pub name: String,
    /// `stopped`, `waiting`, `starting`, `ready`, `backoff`, `stopping`.
    pub state: String,
    /// Whether its readiness check passes.
    #[serde(default)]
    pub ready: bool,
    /// Its process id, 0 when it is not running.
    #[serde(default)]
    pub pid: u32,
    /// How often it was restarted.
    #[serde(default)]
    pub restarts: u32,
    /// Seconds since its state last changed.
    #[serde(default)]
    pub since_seconds: u64,
    /// The last event.
    #[serde(default)]
    pub message: String,
}

impl From<wire::ServiceStatus> for ServiceView {
    fn from(s: wire::ServiceStatus) -> ServiceView {
        ServiceView {
            ready: s.state == wire::ServiceState::Ready,
            state: s.state.name().to_string(),
            name: s.name,
            pid: s.pid.unwrap_or(0),
            restarts: s.restarts,
            since_seconds: 0,
            message: s
                .last_exit
                .map(|exit| format!("last exit: {exit}"))
                .unwrap_or_default(),
        }
    }
}

/// Start, stop or restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceOp {
    /// Start it (and what it depends on).
    Start,
    /// Stop it.
    Stop,
    /// Stop it, then start it.
    Restart,
}

impl std::fmt::Display for ServiceOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServiceOp::Start => "start",
            ServiceOp::Stop => "stop",
            ServiceOp::Restart => "restart",
        })
    }
}

/// Reboot or power off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Power {
    /// Reboot.
    Reboot,
    /// Power off.
    Poweroff,
}

/// The node operations machined delegates to PID 1. Calls block (init answers quickly);
/// the server runs them on tokio's blocking pool.
pub trait NodeBackend: Send + Sync + 'static {
    /// The supervised services.
    fn services(&self) -> Result<Vec<ServiceView>, BackendError>;
    /// Starts, stops or restarts a service; the answer says what happened.
    fn service_action(&self, name: &str, op: ServiceOp) -> Result<String, BackendError>;
    /// Sends a signal (`KILL`, `TERM`, ...) to a service's process; the supervisor
    /// restarts it after its backoff.
    fn kill(&self, name: &str, signal: &str) -> Result<String, BackendError>;
    /// The last `lines` lines of a service's log ring buffer (`init`: PID 1's boot log);
    /// `None`: all of it.
    fn logs(&self, service: &str, lines: Option<u32>) -> Result<Vec<String>, BackendError>;
    /// Applies `parts` of `config_toml` live; returns what was done, one line each.
    fn apply_live(
        &self,
        parts: &[LivePart],
        config_toml: &str,
    ) -> Result<Vec<String>, BackendError>;
    /// Tells init that the first config is now in STATE (the end of maintenance mode).
    fn config_installed(&self) -> Result<String, BackendError>;
    /// Reboots or powers off (acknowledged first, done shortly after).
    fn power(&self, action: Power) -> Result<String, BackendError>;
    /// Wipes STATE and EPHEMERAL and reboots into maintenance mode.
    fn reset(&self) -> Result<String, BackendError>;
}

/// The real backend: init's control socket.
#[derive(Debug, Clone)]
pub struct InitSocket {
    path: PathBuf,
}

impl InitSocket {
    /// A client of the socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> InitSocket {
        InitSocket { path: path.into() }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Send `call` on a new connection and read its own answer.
    fn call<C: WireCall>(&self, call: C) -> Result<C::Answer, BackendError> {
        let request: Request = call.into();
        let op = request.op();
        let io = |source| BackendError::Io {
            path: self.path.clone(),
            source,
        };
        let mut stream =
            UnixStream::connect(&self.path).map_err(|source| BackendError::Connect {
                path: self.path.clone(),
                source,
            })?;
        stream.set_read_timeout(Some(CALL_TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(CALL_TIMEOUT)).map_err(io)?;
        let mut line = request.to_line();
        line.push('\n');
        stream.write_all(line.as_bytes()).map_err(io)?;
        let mut answer = String::new();
        BufReader::new(std::io::Read::take(&stream, wire::MAX_ANSWER as u64))
            .read_line(&mut answer)
            .map_err(io)?;
        match wire::decode::<C>(&answer) {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(refusal)) => Err(BackendError::Refused(refusal.0)),
            Err(e @ (DecodeError::Envelope(_) | DecodeError::Body(_))) => {
                Err(BackendError::Protocol {
                    op: op.to_string(),
                    detail: e.to_string(),
                })
            }
        }
    }
}

impl NodeBackend for InitSocket {
    fn services(&self) -> Result<Vec<ServiceView>, BackendError> {
        let answer = self.call(wire::List {})?;
        Ok(answer.services.into_iter().map(ServiceView::from).collect())
    }

    fn service_action(&self, name: &str, op: ServiceOp) -> Result<String, BackendError> {
        let service = name.to_string();
        let wire::Done {} = match op {
            ServiceOp::Start => self.call(wire::Start { service })?,
            ServiceOp::Stop => self.call(wire::Stop { service })?,
            ServiceOp::Restart => self.call(wire::Restart { service })?,
        };
        Ok(format!("service {name}: {op} under way"))
    }

    fn kill(&self, name: &str, signal: &str) -> Result<String, BackendError> {
        let kill = wire::Kill {
            service: name.to_string(),
            signal: signal.to_string(),
        };
        Ok(self.call(kill)?.message)
    }

    fn logs(&self, service: &str, lines: Option<u32>) -> Result<Vec<String>, BackendError> {
        let lines = lines.unwrap_or(ALL_LINES) as usize;
        let answer = if service == "init" {
            self.call(wire::Bootlog { lines: Some(lines) })?
        } else {
            self.call(wire::Logs {
                service: service.to_string(),
                lines,
            })?
        };
        Ok(answer.lines)
    }

    fn apply_live(
        &self,
        parts: &[LivePart],
        config_toml: &str,
    ) -> Result<Vec<String>, BackendError> {
        let apply = wire::Apply {
            parts: parts.to_vec(),
            config: config_toml.to_string(),
        };
        Ok(self.call(apply)?.messages)
    }

    fn config_installed(&self) -> Result<String, BackendError> {
        Ok(self.call(wire::ConfigInstalled {})?.message)
    }

    fn power(&self, action: Power) -> Result<String, BackendError> {
        let said = match action {
            Power::Reboot => self.call(wire::Reboot {})?,
            Power::Poweroff => self.call(wire::Poweroff {})?,
        };
        Ok(said.message)
    }

    fn reset(&self) -> Result<String, BackendError> {
        Ok(self.call(wire::Reset {})?.message)
    }
}

/// One call a [`RecordingBackend`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `service_action`.
    ServiceAction(String, ServiceOp),
    /// `kill`: the service and the signal.
    Kill(String, String),
    /// `apply_live`: the parts and the config.
    ApplyLive(Vec<LivePart>, String),
    /// `config_installed`.
    ConfigInstalled,
    /// `power`.
    Power(Power),
    /// `reset`.
    Reset,
}

/// A backend for tests: serves services and logs from memory and records every call that
/// would change the node. Reads (`services`, `logs`) are not recorded.
#[derive(Debug, Default)]
pub struct RecordingBackend {
    services: Mutex<Vec<ServiceView>>,
    logs: Mutex<Vec<(String, Vec<String>)>>,
    calls: Mutex<Vec<Call>>,
    fail_apply: Mutex<Option<String>>,
    apply_delay: Mutex<Duration>,
}

impl RecordingBackend {
    /// A backend with these services, each with these log lines.
    pub fn new(services: Vec<ServiceView>, logs: Vec<(String, Vec<String>)>) -> Self {
        RecordingBackend {
            services: Mutex::new(services),
            logs: Mutex::new(logs),
            ..RecordingBackend::default()
        }
    }

    /// Every call that would have changed the node, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Appends a log line to a service (as a running service would).
    pub fn push_log(&self, service: &str, line: &str) {
        if let Ok(mut logs) = self.logs.lock() {
            match logs.iter_mut().find(|(s, _)| s == service) {
                Some((_, lines)) => lines.push(line.to_owned()),
                None => logs.push((service.to_owned(), vec![line.to_owned()])),
            }
        }
    }

    /// Makes the next `apply_live` calls fail with `error` (None: succeed again).
    pub fn fail_apply(&self, error: Option<&str>) {
        if let Ok(mut f) = self.fail_apply.lock() {
            *f = error.map(str::to_owned);
        }
    }

    /// Makes `apply_live` take this long (to hold an apply in progress).
    pub fn set_apply_delay(&self, delay: Duration) {
        if let Ok(mut d) = self.apply_delay.lock() {
            *d = delay;
        }
    }

    fn record(&self, call: Call) {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(call);
        }
    }

    fn known(&self) -> String {
        self.services
            .lock()
            .map(|s| {
                s.iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    }
}

impl NodeBackend for RecordingBackend {
    fn services(&self) -> Result<Vec<ServiceView>, BackendError> {
        Ok(self.services.lock().map(|s| s.clone()).unwrap_or_default())
    }

    fn service_action(&self, name: &str, op: ServiceOp) -> Result<String, BackendError> {
        let found = self
            .services
            .lock()
            .map(|s| s.iter().any(|s| s.name == name))
            .unwrap_or(false);
        if !found {
            return Err(BackendError::UnknownService {
                name: name.to_owned(),
                known: self.known(),
            });
        }
        self.record(Call::ServiceAction(name.to_owned(), op));
        Ok(format!("service {name}: {op} requested"))
    }

    fn kill(&self, name: &str, signal: &str) -> Result<String, BackendError> {
        let found = self
            .services
            .lock()
            .map(|s| s.iter().any(|s| s.name == name))
            .unwrap_or(false);
        if !found {
            return Err(BackendError::UnknownService {
                name: name.to_owned(),
                known: self.known(),
            });
        }
        self.record(Call::Kill(name.to_owned(), signal.to_owned()));
        Ok(format!("{signal} sent to service {name}"))
    }

    fn logs(&self, service: &str, lines: Option<u32>) -> Result<Vec<String>, BackendError> {
        let logs = self.logs.lock().map(|l| l.clone()).unwrap_or_default();
        let Some((_, mut out)) = logs.into_iter().find(|(s, _)| s == service) else {
            return Err(BackendError::UnknownService {
                name: service.to_owned(),
                known: self.known(),
            });
        };
        if let Some(keep) = lines.and_then(|l| usize::try_from(l).ok())
            && out.len() > keep
        {
            out.drain(..out.len() - keep);
        }
        Ok(out)
    }

    fn apply_live(
        &self,
        parts: &[LivePart],
        config_toml: &str,
    ) -> Result<Vec<String>, BackendError> {
        let delay = self.apply_delay.lock().map(|d| *d).unwrap_or_default();
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        if let Some(err) = self.fail_apply.lock().ok().and_then(|f| f.clone()) {
            return Err(BackendError::Refused(err));
        }
        self.record(Call::ApplyLive(parts.to_vec(), config_toml.to_owned()));
        Ok(parts
            .iter()
            .map(|p| format!("{} applied", p.key()))
            .collect())
    }

    fn config_installed(&self) -> Result<String, BackendError> {
        self.record(Call::ConfigInstalled);
        Ok("init continues the boot with the new config".into())
    }

    fn power(&self, action: Power) -> Result<String, BackendError> {
        self.record(Call::Power(action));
        Ok(match action {
            Power::Reboot => "rebooting".into(),
            Power::Poweroff => "powering off".into(),
        })
    }

    fn reset(&self) -> Result<String, BackendError> {
        self.record(Call::Reset);
        Ok("wiping STATE and EPHEMERAL, then rebooting into maintenance mode".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keelson_node_protocol::control::{Answer, Refusal};
    use std::os::unix::net::UnixListener;

    /// Serve `answers` connections on a socket the way PID 1 does: parse the request with
    /// the protocol crate and answer with its typed answer.
    fn serve(path: &Path, answers: usize) -> std::io::Result<std::thread::JoinHandle<Vec<String>>> {
        let listener = UnixListener::bind(path)?;
        Ok(std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..answers {
                let Ok((conn, _)) = listener.accept() else {
                    break;
                };
                let mut line = String::new();
                if BufReader::new(&conn).read_line(&mut line).is_err() {
                    break;
                }
                seen.push(line.trim().to_string());
                let answer = match Request::parse(line.trim()) {
                    Ok(Request::List(list)) => Answer::to(
                        &list,
                        Ok(wire::Services {
                            services: vec![wire::ServiceStatus {
                                name: "containerd".into(),
                                state: wire::ServiceState::Backoff,
                                pid: None,
                                restarts: 2,
                                last_exit: Some(wire::ExitInfo {
                                    code: Some(1),
                                    signal: None,
                                }),
                                depends_on: Vec::new(),
                                autostart: true,
                            }],
                        }),
                    ),
                    Ok(Request::Bootlog(bootlog)) => Answer::to(
                        &bootlog,
                        Ok(wire::Lines {
                            lines: vec!["keelson-init: stage 1 started".into()],
                        }),
                    ),
                    Ok(Request::Reset(reset)) => {
                        Answer::to(&reset, Err(Refusal("not while etcd runs".into())))
                    }
                    // An answer of another request's type: the client must say so.
                    Ok(Request::Start(_)) => Answer::to(
                        &wire::List {},
                        Ok(wire::Services {
                            services: Vec::new(),
                        }),
                    ),
                    Ok(other) => Answer::refused(format!("unexpected {}", other.op())),
                    Err(e) => Answer::refused(e),
                };
                let _ = (&conn).write_all(format!("{}\n", answer.line()).as_bytes());
            }
            seen
        }))
    }

    #[test]
    fn the_socket_client_speaks_the_node_protocol() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("init.sock");
        let server = serve(&path, 4)?;
        let init = InitSocket::new(&path);
        let services = init.services()?;
        assert_eq!(
            services,
            [ServiceView {
                name: "containerd".into(),
                state: "backoff".into(),
                ready: false,
                pid: 0,
                restarts: 2,
                since_seconds: 0,
                message: "last exit: exited with status 1".into(),
            }]
        );
        assert_eq!(
            init.logs("init", Some(5))?,
            ["keelson-init: stage 1 started"]
        );
        let refused = init.reset().err().ok_or("reset was not refused")?;
        assert_eq!(refused.to_string(), "not while etcd runs");
        let confused = init
            .service_action("etcd", ServiceOp::Start)
            .err()
            .ok_or("a list answer to start was accepted")?;
        assert!(
            confused
                .to_string()
                .starts_with("init answered \"start\" with something machined does not understand: not the answer to this request"),
            "{confused}"
        );
        let seen = server.join().map_err(|_| "the server panicked")?;
        assert_eq!(
            seen,
            [
                r#"{"op":"list"}"#,
                r#"{"op":"bootlog","lines":5}"#,
                r#"{"op":"reset"}"#,
                r#"{"op":"start","service":"etcd"}"#,
            ]
        );
        Ok(())
    }
}
