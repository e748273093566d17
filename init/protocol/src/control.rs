//! PID 1's control socket, [`SOCKET`], as machined speaks to it.
//!
//! The socket is a Unix stream socket, mode 0600 (root only), and PID 1 serves only the
//! process of the running machined (its peer credentials are checked at each connection;
//! any other peer gets one refusal and the close). Each request is one JSON object on
//! one line; each answer is one JSON object on one line; a connection may carry any
//! number of requests, answered in order. A request line is at most [`MAX_REQUEST`]
//! bytes before its newline (a longer one is refused whole: none of it is read as a
//! request), an answer line at most [`MAX_ANSWER`].
//!
//! Every request is its own type, and each names the type of its answer through [`Call`],
//! so that the server cannot answer `list` with log lines and the client cannot read
//! one as the other. [`Request`] gathers them for the server's one `match`.
//!
//! | request | its type | answer (besides `"ok":true`) |
//! |---|---|---|
//! | `{"op":"list"}` | [`List`] | [`Services`]: `"services":[{"name":"containerd","state":"ready","pid":312,"restarts":0,"last_exit":null,"depends_on":[],"autostart":true}, ...]` |
//! | `{"op":"start","service":"etcd"}` | [`Start`] | [`Done`] (the start is under way; poll `list`) |
//! | `{"op":"stop","service":"etcd"}` | [`Stop`] | [`Done`] (SIGTERM sent; SIGKILL after the service's timeout) |
//! | `{"op":"restart","service":"containerd"}` | [`Restart`] | [`Done`] |
//! | `{"op":"logs","service":"containerd","lines":100}` | [`Logs`] | [`Lines`]: the last lines of its ring buffer (default 100) |
//! | `{"op":"bootlog","lines":200}` | [`Bootlog`] | [`Lines`]: the boot log (default: all of it) |
//! | `{"op":"info"}` | [`GetInfo`] | [`NodeInfo`]: `"info":{"uptime_s":..,"rss_kib":..,"config":"fw_cfg"}` |
//! | `{"op":"kill","service":"containerd","signal":"KILL"}` | [`Kill`] | [`Said`]: the signal was sent; the supervisor restarts the service after its backoff (`signal` defaults to `KILL`) |
//! | `{"op":"apply","parts":["sysctls",..],"config":"<TOML>"}` | [`Apply`] | [`Applied`]: `"messages":[..]`, once the parts are in effect |
//! | `{"op":"config-installed"}` | [`ConfigInstalled`] | [`Said`]: the first config is in STATE; a node waiting for one continues its boot with it |
//! | `{"op":"reboot"}`, `{"op":"poweroff"}` | [`Reboot`], [`Poweroff`] | [`Said`], then services stop in order and the machine goes down |
//! | `{"op":"reset"}` | [`Reset`] | [`Said`], then services stop in order, STATE and EPHEMERAL get new empty filesystems, and the machine reboots to wait for a config |
//!
//! A refusal is `{"ok":false,"error":"..."}` ([`Refusal`]); a line that is not a request
//! gets one and the connection stays open. Unknown fields are refused on both sides
//! (`deny_unknown_fields`). `apply` is refused whole (nothing changed) when the config is
//! invalid or a change cannot be made; its `error` then lists every reason, one per line.
//! Reboot, power-off and reset begin [`SHUTDOWN_DELAY`] after their answer, so that the
//! answer reaches the caller before it is stopped.
//!
//! The answer's envelope (`"ok"` first, then the answer's own fields) is written by hand
//! rather than with `#[serde(flatten)]`: flatten cannot be combined with
//! `deny_unknown_fields`, and the hand-written form keeps `"ok"` first whatever map order
//! serde_json was built with.

use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Where the control socket lives.
pub const SOCKET: &str = "/run/keelson/init.sock";
/// The longest request line accepted, without its newline (an `apply` carries a whole
/// config, escaped as JSON).
pub const MAX_REQUEST: usize = 4 * 1024 * 1024;
/// The longest answer line a client reads (a service's log ring buffer is the largest).
pub const MAX_ANSWER: usize = 16 * 1024 * 1024;
/// How long after answering a reboot, power-off or reset PID 1 begins it.
pub const SHUTDOWN_DELAY: Duration = Duration::from_secs(1);
/// How many lines `logs` returns when the request does not say.
pub const DEFAULT_LOG_LINES: usize = 100;

/// A request and the type of its answer.
pub trait Call: Into<Request> + fmt::Debug {
    /// What a successful answer carries.
    type Answer: Serialize + DeserializeOwned + fmt::Debug;
}

/// Every request, for the server's one `match`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// See [`List`].
    List(List),
    /// See [`Start`].
    Start(Start),
    /// See [`Stop`].
    Stop(Stop),
    /// See [`Restart`].
    Restart(Restart),
    /// See [`Logs`].
    Logs(Logs),
    /// See [`Bootlog`].
    Bootlog(Bootlog),
    /// See [`GetInfo`].
    Info(GetInfo),
    /// See [`Kill`].
    Kill(Kill),
    /// See [`Apply`].
    Apply(Apply),
    /// See [`ConfigInstalled`].
    ConfigInstalled(ConfigInstalled),
    /// See [`Reboot`].
    Reboot(Reboot),
    /// See [`Poweroff`].
    Poweroff(Poweroff),
    /// See [`Reset`].
    Reset(Reset),
}

impl Request {
    /// The request's `op`, as on the wire.
    pub fn op(&self) -> &'static str {
        match self {
            Request::List(_) => "list",
            Request::Start(_) => "start",
            Request::Stop(_) => "stop",
            Request::Restart(_) => "restart",
            Request::Logs(_) => "logs",
            Request::Bootlog(_) => "bootlog",
            Request::Info(_) => "info",
            Request::Kill(_) => "kill",
            Request::Apply(_) => "apply",
            Request::ConfigInstalled(_) => "config-installed",
            Request::Reboot(_) => "reboot",
            Request::Poweroff(_) => "poweroff",
            Request::Reset(_) => "reset",
        }
    }

    /// Parse one request line (without its newline).
    pub fn parse(line: &str) -> Result<Request, String> {
        serde_json::from_str(line).map_err(|e| format!("not a request: {e}"))
    }

    /// The request as one line, without the newline.
    pub fn to_line(&self) -> String {
        // A request is plain data (strings, numbers, lists): encoding cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Declares a request type, its `Request` variant and its answer type.
macro_rules! call {
    ($(#[$doc:meta])* $name:ident => $variant:ident, $answer:ty, { $($body:tt)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name { $($body)* }

        impl From<$name> for Request {
            fn from(call: $name) -> Request {
                Request::$variant(call)
            }
        }

        impl Call for $name {
            type Answer = $answer;
        }
    };
}

call!(
    /// Every service's status.
    List => List, Services, {}
);
call!(
    /// Start a service (and what it depends on).
    Start => Start, Done, {
        /// Its name.
        pub service: String,
    }
);
call!(
    /// Stop a service.
    Stop => Stop, Done, {
        /// Its name.
        pub service: String,
    }
);
call!(
    /// Stop a service, then start it.
    Restart => Restart, Done, {
        /// Its name.
        pub service: String,
    }
);
call!(
    /// The last lines of a service's output.
    Logs => Logs, Lines, {
        /// Its name.
        pub service: String,
        /// How many lines ([`DEFAULT_LOG_LINES`] when absent).
        #[serde(default = "default_lines")]
        pub lines: usize,
    }
);
call!(
    /// PID 1's boot log.
    Bootlog => Bootlog, Lines, {
        /// How many lines (all by default).
        #[serde(default)]
        pub lines: Option<usize>,
    }
);
call!(
    /// PID 1's own figures.
    GetInfo => Info, NodeInfo, {}
);
call!(
    /// Send a signal to a service's process; the supervisor restarts it after its backoff.
    Kill => Kill, Said, {
        /// Its name.
        pub service: String,
        /// The signal's name (`KILL`, `TERM`, `SIGHUP`, ...) or number; see [`parse_signal`].
        #[serde(default = "default_signal")]
        pub signal: String,
    }
);
call!(
    /// Apply parts of a new config to the running node, or nothing.
    Apply => Apply, Applied, {
        /// The parts that changed.
        pub parts: Vec<Part>,
        /// The whole new config (TOML).
        pub config: String,
    }
);
call!(
    /// The first config is now in STATE: continue the boot.
    ConfigInstalled => ConfigInstalled, Said, {}
);
call!(
    /// Reboot the machine.
    Reboot => Reboot, Said, {}
);
call!(
    /// Power it off.
    Poweroff => Poweroff, Said, {}
);
call!(
    /// Wipe STATE and EPHEMERAL, then reboot to wait for a config.
    Reset => Reset, Said, {}
);

fn default_lines() -> usize {
    DEFAULT_LOG_LINES
}

fn default_signal() -> String {
    "KILL".into()
}

/// The answer to `list`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Services {
    /// Every service, in the supervisor's order.
    pub services: Vec<ServiceStatus>,
}

/// The answer to `start`, `stop` and `restart`: the change is under way.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Done {}

/// The answer to `logs` and `bootlog`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lines {
    /// Oldest first.
    pub lines: Vec<String>,
}

/// The answer to `info`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeInfo {
    /// PID 1's figures.
    pub info: Info,
}

/// The answer to `kill`, `config-installed`, `reboot`, `poweroff` and `reset`: what was done.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Said {
    /// One line.
    pub message: String,
}

/// The answer to `apply`: what was done, one line each.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Applied {
    /// One line per change.
    pub messages: Vec<String>,
}

/// PID 1's own figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Info {
    /// Seconds since PID 1's stage 2 started.
    pub uptime_s: u64,
    /// PID 1's resident memory (`VmRSS`), KiB.
    pub rss_kib: Option<u64>,
    /// Where the running config came from, if there is one.
    pub config: Option<String>,
}

/// Where a service is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
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

impl ServiceState {
    /// Its name, as on the wire.
    pub fn name(self) -> &'static str {
        match self {
            ServiceState::Stopped => "stopped",
            ServiceState::Waiting => "waiting",
            ServiceState::Starting => "starting",
            ServiceState::Ready => "ready",
            ServiceState::Backoff => "backoff",
            ServiceState::Stopping => "stopping",
        }
    }
}

impl fmt::Display for ServiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a service's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitInfo {
    /// Exit code, when it exited.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
}

impl ExitInfo {
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

/// The name of a signal number (`?` for one a service rarely dies of).
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
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => "?",
    }
}

/// A supervised service, as `list` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceStatus {
    /// Its name (`containerd`, `etcd`, `machined`, an extension service's).
    pub name: String,
    /// Where it is.
    pub state: ServiceState,
    /// Its process id while it runs.
    pub pid: Option<u32>,
    /// Restarts after unexpected exits.
    pub restarts: u32,
    /// How its last run ended.
    pub last_exit: Option<ExitInfo>,
    /// What it waits for.
    pub depends_on: Vec<String>,
    /// Whether it starts at boot.
    pub autostart: bool,
}

/// A part of the machine config that PID 1 can apply to a running node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// `machine.sysctls`: written to /proc/sys.
    Sysctls,
    /// `machine.kernel_modules` and `machine.disabled_kernel_modules`: missing modules loaded.
    KernelModules,
    /// `machine.files`: written.
    Files,
    /// `machine.hostname`: set.
    Hostname,
    /// `machine.kubelet`: its flags and configuration rewritten, the kubelet restarted.
    Kubelet,
    /// `machine.network`: links, addresses, routes and resolvers reconfigured.
    Network,
    /// `machine.time_servers`: the time sync client restarted.
    TimeServers,
}

impl Part {
    /// Every part, in order.
    pub const ALL: [Part; 7] = [
        Part::Sysctls,
        Part::KernelModules,
        Part::Files,
        Part::Hostname,
        Part::Kubelet,
        Part::Network,
        Part::TimeServers,
    ];

    /// The config key the part covers.
    pub fn key(self) -> &'static str {
        match self {
            Part::Sysctls => "machine.sysctls",
            Part::KernelModules => "machine.kernel_modules",
            Part::Files => "machine.files",
            Part::Hostname => "machine.hostname",
            Part::Kubelet => "machine.kubelet",
            Part::Network => "machine.network",
            Part::TimeServers => "machine.time_servers",
        }
    }
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// The signals `kill` may send: `(name, number)`.
pub const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ABRT", 6),
    ("KILL", 9),
    ("USR1", 10),
    ("USR2", 12),
    ("TERM", 15),
];

/// A signal by name (`KILL`, `sigkill`, `SIGTERM`) or number (`9`): `(SIGNAME, number)`.
pub fn parse_signal(text: &str) -> Result<(String, i32), String> {
    let upper = text.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS
        .iter()
        .find(|(name, number)| *name == bare || bare.parse::<i32>().ok() == Some(*number))
        .map(|(name, number)| (format!("SIG{name}"), *number))
        .ok_or_else(|| {
            let names: Vec<&str> = SIGNALS.iter().map(|(n, _)| *n).collect();
            format!("unknown signal {text:?}: use one of {}", names.join(", "))
        })
}

/// A refused request: why, in words for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

impl Refusal {
    /// A refusal saying `why`.
    pub fn new(why: impl Into<String>) -> Refusal {
        Refusal(why.into())
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

/// An answer line, encoded. Built only from a request's own answer type ([`Answer::to`])
/// or as a refusal, so the server's `match` cannot answer a request with another's type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer(String);

impl Answer {
    /// The answer to `call`: its own answer type, or a refusal.
    pub fn to<C: Call>(_call: &C, result: Result<C::Answer, Refusal>) -> Answer {
        match result {
            Ok(answer) => Answer::ok(&answer),
            Err(refusal) => Answer::refused(refusal.0),
        }
    }

    fn ok<T: Serialize>(answer: &T) -> Answer {
        match serde_json::to_string(answer) {
            Ok(body) if body == "{}" => Answer(r#"{"ok":true}"#.into()),
            Ok(body) if body.starts_with('{') => Answer(format!(r#"{{"ok":true,{}"#, &body[1..])),
            Ok(_) => Answer::refused("PID 1 built an answer that is not a JSON object"),
            Err(e) => Answer::refused(format!("PID 1 could not encode its answer: {e}")),
        }
    }

    /// A refusal, saying why.
    pub fn refused(why: impl Into<String>) -> Answer {
        let why = serde_json::Value::String(why.into());
        Answer(format!(r#"{{"ok":false,"error":{why}}}"#))
    }

    /// The line, without its newline.
    pub fn line(&self) -> &str {
        &self.0
    }
}

/// Why an answer line could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a JSON object with a boolean `ok`, or a refusal without `error`.
    #[error("not an answer ({0})")]
    Envelope(String),
    /// `ok` but its fields are not those of the request's answer.
    #[error("not the answer to this request ({0})")]
    Body(String),
}

/// Read the answer to `C` from its line: the answer, or the server's refusal.
pub fn decode<C: Call>(line: &str) -> Result<Result<C::Answer, Refusal>, DecodeError> {
    let value: serde_json::Value =
        serde_json::from_str(line.trim()).map_err(|e| DecodeError::Envelope(e.to_string()))?;
    let serde_json::Value::Object(mut fields) = value else {
        return Err(DecodeError::Envelope("not a JSON object".into()));
    };
    match fields.remove("ok") {
        Some(serde_json::Value::Bool(true)) => {}
        Some(serde_json::Value::Bool(false)) => {
            return match fields.remove("error") {
                Some(serde_json::Value::String(why)) => Ok(Err(Refusal(why))),
                _ => Err(DecodeError::Envelope(
                    "a refusal without a string \"error\"".into(),
                )),
            };
        }
        _ => return Err(DecodeError::Envelope("no boolean \"ok\"".into())),
    }
    serde_json::from_value(serde_json::Value::Object(fields))
        .map(Ok)
        .map_err(|e| DecodeError::Body(e.to_string()))
}

/// `VmRSS` of a `/proc/<pid>/status` text, in KiB.
pub fn vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parses(line: &str, expected: Result<Request, &str>) {
        let got = Request::parse(line);
        match expected {
            Ok(req) => {
                assert_eq!(got.as_ref(), Ok(&req), "{line}");
                // And back: what a client sends is what the server parses.
                assert_eq!(Request::parse(&req.to_line()), Ok(req), "{line}");
            }
            Err(prefix) => assert!(
                got.as_ref().is_err_and(|e| e.starts_with(prefix)),
                "{line}: {got:?}"
            ),
        }
    }

    #[test]
    fn requests_parse_from_one_line_of_json() {
        let service = || "containerd".to_string();
        let cases: Vec<(&str, Result<Request, &str>)> = vec![
            (r#"{"op":"list"}"#, Ok(List {}.into())),
            (
                r#"{"op":"restart","service":"containerd"}"#,
                Ok(Restart { service: service() }.into()),
            ),
            (
                r#"{"op":"logs","service":"containerd"}"#,
                Ok(Logs {
                    service: service(),
                    lines: 100,
                }
                .into()),
            ),
            (
                r#"{"op":"bootlog","lines":5}"#,
                Ok(Bootlog { lines: Some(5) }.into()),
            ),
            (r#"{"op":"info"}"#, Ok(GetInfo {}.into())),
            (r#"{"op":"poweroff"}"#, Ok(Poweroff {}.into())),
            (r#"{"op":"reset"}"#, Ok(Reset {}.into())),
            (
                r#"{"op":"config-installed"}"#,
                Ok(ConfigInstalled {}.into()),
            ),
            (
                r#"{"op":"kill","service":"containerd"}"#,
                Ok(Kill {
                    service: service(),
                    signal: "KILL".into(),
                }
                .into()),
            ),
            (
                r#"{"op":"apply","parts":["sysctls","kernel_modules"],"config":"version = 1"}"#,
                Ok(Apply {
                    parts: vec![Part::Sysctls, Part::KernelModules],
                    config: "version = 1".into(),
                }
                .into()),
            ),
            (
                r#"{"op":"apply","parts":["cluster"],"config":""}"#,
                Err("not a request: unknown variant `cluster`"),
            ),
            (
                r#"{"op":"format-disk"}"#,
                Err("not a request: unknown variant `format-disk`"),
            ),
            (
                r#"{"op":"start"}"#,
                Err("not a request: missing field `service`"),
            ),
            (
                r#"{"op":"stop","service":"etcd","force":true}"#,
                Err("not a request: unknown field `force`"),
            ),
            (
                r#"{"op":"list","all":true}"#,
                Err("not a request: unknown field `all`"),
            ),
            (
                r#"{"service":"etcd"}"#,
                Err("not a request: missing field `op`"),
            ),
            ("nonsense", Err("not a request")),
        ];
        for (line, expected) in cases {
            parses(line, expected);
        }
    }

    #[test]
    fn every_request_names_its_op() {
        let requests: Vec<Request> = vec![
            List {}.into(),
            Start {
                service: "a".into(),
            }
            .into(),
            Stop {
                service: "a".into(),
            }
            .into(),
            Restart {
                service: "a".into(),
            }
            .into(),
            Logs {
                service: "a".into(),
                lines: 1,
            }
            .into(),
            Bootlog { lines: None }.into(),
            GetInfo {}.into(),
            Kill {
                service: "a".into(),
                signal: "TERM".into(),
            }
            .into(),
            Apply {
                parts: Vec::new(),
                config: String::new(),
            }
            .into(),
            ConfigInstalled {}.into(),
            Reboot {}.into(),
            Poweroff {}.into(),
            Reset {}.into(),
        ];
        for request in requests {
            let line = request.to_line();
            assert!(
                line.starts_with(&format!(r#"{{"op":"{}""#, request.op())),
                "{line}"
            );
        }
    }

    fn status() -> ServiceStatus {
        ServiceStatus {
            name: "containerd".into(),
            state: ServiceState::Backoff,
            pid: None,
            restarts: 3,
            last_exit: Some(ExitInfo {
                code: None,
                signal: Some(9),
            }),
            depends_on: Vec::new(),
            autostart: true,
        }
    }

    #[test]
    fn answers_are_their_requests_own_types_on_the_wire() -> Result<(), DecodeError> {
        let list = List {};
        let answer = Answer::to(
            &list,
            Ok(Services {
                services: vec![status()],
            }),
        );
        assert_eq!(
            answer.line(),
            r#"{"ok":true,"services":[{"name":"containerd","state":"backoff","pid":null,"restarts":3,"last_exit":{"code":null,"signal":9},"depends_on":[],"autostart":true}]}"#
        );
        assert_eq!(
            decode::<List>(answer.line())?,
            Ok(Services {
                services: vec![status()]
            })
        );
        let start = Start {
            service: "etcd".into(),
        };
        let done = Answer::to(&start, Ok(Done {}));
        assert_eq!(done.line(), r#"{"ok":true}"#);
        assert_eq!(decode::<Start>(done.line())?, Ok(Done {}));
        // One request's answer is not read as another's.
        assert!(matches!(
            decode::<Logs>(answer.line()),
            Err(DecodeError::Body(_))
        ));
        assert!(matches!(
            decode::<Start>(answer.line()),
            Err(DecodeError::Body(_))
        ));
        Ok(())
    }

    #[test]
    fn refusals_carry_the_reason_escaped() -> Result<(), DecodeError> {
        let why = "no service named \"x\"\nknown: containerd";
        let answer = Answer::to(&Reset {}, Err(Refusal(why.into())));
        assert_eq!(
            answer.line(),
            r#"{"ok":false,"error":"no service named \"x\"\nknown: containerd"}"#
        );
        assert_eq!(decode::<Reset>(answer.line())?, Err(Refusal(why.into())));
        assert_eq!(
            decode::<Reset>(Answer::refused("gone").line())?,
            Err(Refusal("gone".into()))
        );
        Ok(())
    }

    #[test]
    fn malformed_answers_are_named() {
        let cases: &[(&str, &str)] = &[
            ("", "not an answer"),
            ("[]", "not an answer (not a JSON object)"),
            (r#"{"services":[]}"#, "not an answer (no boolean \"ok\")"),
            (r#"{"ok":"yes"}"#, "not an answer (no boolean \"ok\")"),
            (
                r#"{"ok":false}"#,
                "not an answer (a refusal without a string \"error\")",
            ),
            (
                r#"{"ok":true,"lines":["a"],"extra":1}"#,
                "not the answer to this request (unknown field `extra`",
            ),
            (
                r#"{"ok":true}"#,
                "not the answer to this request (missing field `lines`",
            ),
        ];
        for (line, prefix) in cases {
            let got = decode::<Logs>(line);
            assert!(
                got.as_ref()
                    .is_err_and(|e| e.to_string().starts_with(prefix)),
                "{line:?}: {got:?}"
            );
        }
    }

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(parse_signal("KILL"), Ok(("SIGKILL".into(), 9)));
        assert_eq!(parse_signal("sigterm"), Ok(("SIGTERM".into(), 15)));
        assert_eq!(parse_signal("1"), Ok(("SIGHUP".into(), 1)));
        assert_eq!(
            parse_signal("STOP"),
            Err(
                "unknown signal \"STOP\": use one of HUP, INT, QUIT, ABRT, KILL, USR1, USR2, TERM"
                    .into()
            )
        );
        assert!(parse_signal("SIG").is_err());
        assert!(parse_signal("99").is_err());
    }

    #[test]
    fn parts_name_their_keys_and_round_trip() -> Result<(), serde_json::Error> {
        for part in Part::ALL {
            let text = serde_json::to_string(&part)?;
            assert_eq!(serde_json::from_str::<Part>(&text)?, part);
            assert!(part.key().starts_with("machine."));
        }
        Ok(())
    }

    #[test]
    fn rss_comes_from_proc_status() {
        let status = "Name:\tinit\nVmPeak:\t  9000 kB\nVmRSS:\t    4312 kB\nThreads:\t1\n";
        assert_eq!(vm_rss_kib(status), Some(4312));
        assert_eq!(vm_rss_kib("Name: x\n"), None);
    }
}
