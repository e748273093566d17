//! What machined asks of PID 1: the [`NodeBackend`] trait, its real implementation over
//! init's control socket ([`InitSocket`]), and a [`RecordingBackend`] that tests use in
//! its place.
//!
//! The API server never touches services, power or live configuration itself: it asks
//! PID 1, which owns them. Everything else it reads from `/proc`, `/sys` and STATE itself.
//!
//! # The control socket protocol (`/run/keelson/init.sock`, init's `control` module)
//!
//! Each request is one JSON object on one line, each answer one JSON object on one line;
//! every answer has `"ok": true|false`, a refusal carries `"error"`. machined opens one
//! connection per request.
//!
//! | request | answer (besides `ok`) |
//! |---|---|
//! | `{"op":"list"}` | `"services": [{"name","state","pid","restarts","last_exit","depends_on","autostart"}]` |
//! | `{"op":"start"\|"stop"\|"restart","service":N}` | (the change is under way) |
//! | `{"op":"kill","service":N,"signal":"KILL"\|"TERM"\|..}` | `"message"`: the signal was sent; the supervisor restarts the service after its backoff |
//! | `{"op":"logs","service":N,"lines":L}` | `"lines": [..]`: the last L lines of its ring buffer |
//! | `{"op":"bootlog","lines":L}` | `"lines": [..]`: PID 1's boot log |
//! | `{"op":"apply","parts":[..],"config":TOML}` | `"messages": [..]`, once the parts are in effect |
//! | `{"op":"config-installed"}` | the first config is now in STATE: continue the boot |
//! | `{"op":"reboot"}`, `{"op":"poweroff"}`, `{"op":"reset"}` | acknowledged, then done |
//!
//! `apply` names the [`LivePart`]s that changed and carries the whole new config; init
//! validates it, checks every change against the node, and applies those parts
//! (sysctls, kernel modules, files, hostname, network) or refuses the request whole.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where init listens.
pub const INIT_SOCKET: &str = "/run/keelson/init.sock";

/// How long a call to init may take before machined gives up on it.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest answer accepted from init (a log ring buffer is the biggest).
const MAX_ANSWER: u64 = 16 * 1024 * 1024;

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
    /// Init answered something that is not the expected JSON.
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

/// A supervised service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
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

/// A part of the machine config that init can apply on a running node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LivePart {
    /// `machine.sysctls`: written to /proc/sys.
    Sysctls,
    /// `machine.kernel_modules` / `disabled_kernel_modules`: missing modules loaded.
    KernelModules,
    /// `machine.files`: written.
    Files,
    /// `machine.hostname`: set.
    Hostname,
    /// `machine.kubelet`: its flags and configuration rewritten, the kubelet restarted.
    Kubelet,
    /// `machine.network`: interfaces, addresses, routes and resolvers reconfigured.
    Network,
    /// `machine.time_servers`: the time sync client restarted.
    TimeServers,
}

impl LivePart {
    /// The config key this part covers.
    pub fn key(self) -> &'static str {
        match self {
            LivePart::Sysctls => "machine.sysctls",
            LivePart::KernelModules => "machine.kernel_modules",
            LivePart::Files => "machine.files",
            LivePart::Hostname => "machine.hostname",
            LivePart::Kubelet => "machine.kubelet",
            LivePart::Network => "machine.network",
            LivePart::TimeServers => "machine.time_servers",
        }
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
    fn services(&self) -> Result<Vec<ServiceStatus>, BackendError>;
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

#[derive(Debug, Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    messages: Vec<String>,
    #[serde(default)]
    services: Option<Vec<InitService>>,
    #[serde(default)]
    lines: Option<Vec<String>>,
}

/// A service as init's `list` reports it.
#[derive(Debug, Deserialize)]
struct InitService {
    name: String,
    state: String,
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    restarts: u32,
    #[serde(default)]
    last_exit: Option<InitExit>,
}

#[derive(Debug, Deserialize)]
struct InitExit {
    #[serde(default)]
    code: Option<i32>,
    #[serde(default)]
    signal: Option<i32>,
}

impl From<InitService> for ServiceStatus {
    fn from(s: InitService) -> ServiceStatus {
        let message = match s.last_exit {
            Some(InitExit {
                code: Some(code), ..
            }) => format!("last exit: status {code}"),
            Some(InitExit {
                signal: Some(sig), ..
            }) => format!("last exit: killed by signal {sig}"),
            _ => String::new(),
        };
        ServiceStatus {
            ready: s.state == "ready",
            name: s.name,
            state: s.state,
            pid: s.pid.unwrap_or(0),
            restarts: s.restarts,
            since_seconds: 0,
            message,
        }
    }
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

    fn call(&self, request: &serde_json::Value) -> Result<Answer, BackendError> {
        let op = request
            .get("op")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
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
        let mut line = request.to_string();
        line.push('\n');
        stream.write_all(line.as_bytes()).map_err(io)?;
        let mut answer = String::new();
        BufReader::new(std::io::Read::take(&stream, MAX_ANSWER))
            .read_line(&mut answer)
            .map_err(io)?;
        let answer: Answer =
            serde_json::from_str(answer.trim()).map_err(|e| BackendError::Protocol {
                op: op.clone(),
                detail: e.to_string(),
            })?;
        if !answer.ok {
            return Err(BackendError::Refused(answer.error.unwrap_or_else(|| {
                format!("init refused {op:?} without saying why")
            })));
        }
        Ok(answer)
    }

    fn message(&self, request: serde_json::Value) -> Result<String, BackendError> {
        Ok(self.call(&request)?.message.unwrap_or_default())
    }
}

impl NodeBackend for InitSocket {
    fn services(&self) -> Result<Vec<ServiceStatus>, BackendError> {
        let services = self
            .call(&serde_json::json!({"op": "list"}))?
            .services
            .ok_or_else(|| BackendError::Protocol {
                op: "list".into(),
                detail: "no \"services\" in the answer".into(),
            })?;
        Ok(services.into_iter().map(ServiceStatus::from).collect())
    }

    fn service_action(&self, name: &str, op: ServiceOp) -> Result<String, BackendError> {
        let message = self.message(serde_json::json!({"op": op, "service": name}))?;
        Ok(if message.is_empty() {
            format!("service {name}: {op} under way")
        } else {
            message
        })
    }

    fn kill(&self, name: &str, signal: &str) -> Result<String, BackendError> {
        self.message(serde_json::json!({"op": "kill", "service": name, "signal": signal}))
    }

    fn logs(&self, service: &str, lines: Option<u32>) -> Result<Vec<String>, BackendError> {
        let lines = lines.unwrap_or(ALL_LINES);
        let request = if service == "init" {
            serde_json::json!({"op": "bootlog", "lines": lines})
        } else {
            serde_json::json!({"op": "logs", "service": service, "lines": lines})
        };
        Ok(self.call(&request)?.lines.unwrap_or_default())
    }

    fn apply_live(
        &self,
        parts: &[LivePart],
        config_toml: &str,
    ) -> Result<Vec<String>, BackendError> {
        Ok(self
            .call(&serde_json::json!({"op": "apply", "parts": parts, "config": config_toml}))?
            .messages)
    }

    fn config_installed(&self) -> Result<String, BackendError> {
        self.message(serde_json::json!({"op": "config-installed"}))
    }

    fn power(&self, action: Power) -> Result<String, BackendError> {
        self.message(serde_json::json!({"op": action}))
    }

    fn reset(&self) -> Result<String, BackendError> {
        self.message(serde_json::json!({"op": "reset"}))
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
    services: Mutex<Vec<ServiceStatus>>,
    logs: Mutex<Vec<(String, Vec<String>)>>,
    calls: Mutex<Vec<Call>>,
    fail_apply: Mutex<Option<String>>,
    apply_delay: Mutex<Duration>,
}

impl RecordingBackend {
    /// A backend with these services, each with these log lines.
    pub fn new(services: Vec<ServiceStatus>, logs: Vec<(String, Vec<String>)>) -> Self {
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
    fn services(&self) -> Result<Vec<ServiceStatus>, BackendError> {
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
