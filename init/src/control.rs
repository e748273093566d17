//! PID 1's control socket: `/run/keelson/init.sock`, for machined (and tests).
//!
//! The socket is a Unix stream socket, mode 0600 (root only). Each request is one JSON
//! object on one line; each answer is one JSON object on one line; a connection may
//! carry any number of requests, answered in order.
//!
//! Requests (`op` selects the operation):
//!
//! | request | answer |
//! |---|---|
//! | `{"op":"list"}` | `{"ok":true,"services":[{"name":"containerd","state":"ready","pid":312,"restarts":0,"last_exit":null,"depends_on":[],"autostart":true}, ...]}` |
//! | `{"op":"start","service":"etcd"}` | `{"ok":true}` (the start is under way; poll `list`) |
//! | `{"op":"stop","service":"etcd"}` | `{"ok":true}` (SIGTERM sent; SIGKILL after the service's timeout) |
//! | `{"op":"restart","service":"containerd"}` | `{"ok":true}` |
//! | `{"op":"logs","service":"containerd","lines":100}` | `{"ok":true,"lines":["...", ...]}` (the last lines of its ring buffer; default 100) |
//! | `{"op":"bootlog","lines":200}` | `{"ok":true,"lines":[...]}` (the boot log; default: all of it) |
//! | `{"op":"info"}` | `{"ok":true,"info":{"uptime_s":..,"rss_kib":..,"config":"fw_cfg"}}` |
//! | `{"op":"kill","service":"containerd","signal":"KILL"}` | `{"ok":true,"message":".."}` (the signal is sent to the service's process; the supervisor restarts it after its backoff; `signal` defaults to `KILL`) |
//! | `{"op":"apply","parts":["sysctls",..],"config":"<TOML>"}` | `{"ok":true,"messages":[..]}` once the parts are in effect (see `live`) |
//! | `{"op":"config-installed"}` | `{"ok":true,"message":".."}`: the first config is in STATE; a node waiting for one continues its boot with it |
//! | `{"op":"reboot"}`, `{"op":"poweroff"}` | `{"ok":true,"message":".."}`, then services stop in order and the machine goes down |
//! | `{"op":"reset"}` | `{"ok":true,"message":".."}`, then services stop in order, STATE and EPHEMERAL get new empty filesystems, and the machine reboots to wait for a config |
//!
//! Errors: `{"ok":false,"error":"no service named \"x\" (known: containerd, ...)"}`;
//! a line that is not a request gets an error answer and the connection stays open.
//! `apply` is refused whole (`ok: false`, nothing changed) when the config is invalid
//! or a change cannot be made; its `error` then lists every reason, one per line.
//! Reboot, power-off and reset begin [`SHUTDOWN_DELAY`] after their answer, so that the
//! answer reaches the caller (machined) before it is stopped.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::oneshot;

use crate::live::Part;
use crate::sender::Sender;
use crate::supervisor::ServiceStatus;
use crate::syscalls::Syscalls;

/// Where the control socket lives.
pub const SOCKET: &str = "/run/keelson/init.sock";
/// The longest request line accepted (an `apply` carries a whole config, up to
/// `config_source::MAX_CONFIG`, escaped as JSON).
pub const MAX_REQUEST: usize = 4 * 1024 * 1024;
/// How long after answering a reboot, power-off or reset PID 1 begins it.
pub const SHUTDOWN_DELAY: Duration = Duration::from_secs(1);

fn default_lines() -> usize {
    100
}

fn default_signal() -> String {
    "KILL".into()
}

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Every service's status.
    List,
    /// Start a service.
    Start {
        /// Its name.
        service: String,
    },
    /// Stop a service.
    Stop {
        /// Its name.
        service: String,
    },
    /// Restart a service.
    Restart {
        /// Its name.
        service: String,
    },
    /// The last lines of a service's output.
    Logs {
        /// Its name.
        service: String,
        /// How many lines.
        #[serde(default = "default_lines")]
        lines: usize,
    },
    /// The boot log.
    Bootlog {
        /// How many lines (all by default).
        #[serde(default)]
        lines: Option<usize>,
    },
    /// PID 1's own figures.
    Info,
    /// Send a signal to a service's process.
    Kill {
        /// Its name.
        service: String,
        /// The signal's name (`KILL`, `TERM`, `SIGHUP`, ...).
        #[serde(default = "default_signal")]
        signal: String,
    },
    /// Apply parts of a new config to the running node.
    Apply {
        /// The parts that changed.
        parts: Vec<Part>,
        /// The whole new config (TOML).
        config: String,
    },
    /// The first config is now in STATE: continue the boot.
    #[serde(rename = "config-installed")]
    ConfigInstalled,
    /// Reboot the machine.
    Reboot,
    /// Power it off.
    Poweroff,
    /// Wipe STATE and EPHEMERAL, then reboot to wait for a config.
    Reset,
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
            format!(
                "unknown signal {text:?}: use one of {}",
                SIGNALS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// PID 1's own figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// Seconds since PID 1's stage 2 started.
    pub uptime_s: u64,
    /// PID 1's resident memory (`VmRSS`), KiB.
    pub rss_kib: Option<u64>,
    /// Where the running config came from, if there is one.
    pub config: Option<String>,
}

/// An answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Services (`list`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<Vec<ServiceStatus>>,
    /// Log lines (`logs`, `bootlog`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<Vec<String>>,
    /// PID 1's figures (`info`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Info>,
    /// What was done (`kill`, `config-installed`, `reboot`, `poweroff`, `reset`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What was done, one line each (`apply`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<String>>,
}

impl Response {
    /// Success with nothing more to say.
    pub fn ok() -> Response {
        Response {
            ok: true,
            ..Response::default()
        }
    }

    /// Failure.
    pub fn error(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(message.into()),
            ..Response::default()
        }
    }

    /// Log lines.
    pub fn lines(lines: Vec<String>) -> Response {
        Response {
            lines: Some(lines),
            ..Response::ok()
        }
    }

    /// Success, saying what was done.
    pub fn message(message: impl Into<String>) -> Response {
        Response {
            message: Some(message.into()),
            ..Response::ok()
        }
    }

    /// Success, saying what was done in lines.
    pub fn messages(messages: Vec<String>) -> Response {
        Response {
            messages: Some(messages),
            ..Response::ok()
        }
    }

    /// Service statuses.
    pub fn services(statuses: &[ServiceStatus]) -> Response {
        Response {
            services: Some(statuses.to_vec()),
            ..Response::ok()
        }
    }
}

/// `VmRSS` of a `/proc/<pid>/status` text, in KiB.
pub fn vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Parse one request line.
pub fn parse(line: &str) -> Result<Request, String> {
    serde_json::from_str(line).map_err(|e| format!("not a request: {e}"))
}

/// A request read from the socket, for the main loop, and where its answer goes.
#[derive(Debug)]
pub struct Call {
    /// The request.
    pub request: Request,
    /// The answer, written back to the connection that asked.
    pub reply: oneshot::Sender<Response>,
}

/// Bind the socket at `path` (replacing a stale one, mode 0600) and serve it: each
/// request is sent on `events` as a [`Call`] whose answer is written back. Aborting the
/// returned handle closes the socket (its mount, `/run`, is then no longer busy).
pub fn serve(
    sys: &dyn Syscalls,
    path: &Path,
    events: Sender<Call>,
) -> std::io::Result<tokio::task::AbortHandle> {
    if let Some(dir) = path.parent() {
        sys.create_dir_all(dir)?;
    }
    let _ = sys.remove_file(path);
    let listener = UnixListener::bind(path)?;
    sys.set_mode(path, 0o600)?;
    let task = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let events = events.clone();
            tokio::spawn(async move {
                let (read, mut write) = conn.into_split();
                let mut lines = BufReader::new(read);
                let mut line = String::new();
                loop {
                    line.clear();
                    match (&mut lines)
                        .take(MAX_REQUEST as u64)
                        .read_line(&mut line)
                        .await
                    {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let answer = match parse(line.trim()) {
                        Ok(request) => {
                            let (reply, rx) = oneshot::channel();
                            if events.send(Call { request, reply }).is_err() {
                                break;
                            }
                            rx.await
                                .unwrap_or_else(|_| Response::error("PID 1 dropped the request"))
                        }
                        Err(e) => Response::error(e),
                    };
                    let mut text = serde_json::to_string(&answer)
                        .unwrap_or_else(|_| r#"{"ok":false,"error":"unencodable answer"}"#.into());
                    text.push('\n');
                    if write.write_all(text.as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(task.abort_handle())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_one_line_of_json() {
        let cases: &[(&str, Result<Request, &str>)] = &[
            (r#"{"op":"list"}"#, Ok(Request::List)),
            (
                r#"{"op":"restart","service":"containerd"}"#,
                Ok(Request::Restart {
                    service: "containerd".into(),
                }),
            ),
            (
                r#"{"op":"logs","service":"etcd"}"#,
                Ok(Request::Logs {
                    service: "etcd".into(),
                    lines: 100,
                }),
            ),
            (
                r#"{"op":"bootlog","lines":5}"#,
                Ok(Request::Bootlog { lines: Some(5) }),
            ),
            (r#"{"op":"poweroff"}"#, Ok(Request::Poweroff)),
            (r#"{"op":"reset"}"#, Ok(Request::Reset)),
            (r#"{"op":"config-installed"}"#, Ok(Request::ConfigInstalled)),
            (
                r#"{"op":"kill","service":"containerd"}"#,
                Ok(Request::Kill {
                    service: "containerd".into(),
                    signal: "KILL".into(),
                }),
            ),
            (
                r#"{"op":"apply","parts":["sysctls","kernel_modules"],"config":"version = 1"}"#,
                Ok(Request::Apply {
                    parts: vec![Part::Sysctls, Part::KernelModules],
                    config: "version = 1".into(),
                }),
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
        ];
        for (line, expected) in cases {
            let got = parse(line);
            match expected {
                Ok(req) => assert_eq!(got.as_ref(), Ok(req), "{line}"),
                Err(prefix) => assert!(
                    got.as_ref().is_err_and(|e| e.starts_with(prefix)),
                    "{line}: {got:?}"
                ),
            }
        }
    }

    #[test]
    fn answers_round_trip_for_clients() -> Result<(), serde_json::Error> {
        use crate::supervisor::{ExitInfo, State};
        let status = ServiceStatus {
            name: "containerd".into(),
            state: State::Backoff,
            pid: None,
            restarts: 3,
            last_exit: Some(ExitInfo {
                code: None,
                signal: Some(9),
            }),
            depends_on: Vec::new(),
            autostart: true,
        };
        let answer = Response::services(std::slice::from_ref(&status));
        let text = serde_json::to_string(&answer)?;
        assert_eq!(
            text,
            r#"{"ok":true,"services":[{"name":"containerd","state":"backoff","pid":null,"restarts":3,"last_exit":{"code":null,"signal":9},"depends_on":[],"autostart":true}]}"#
        );
        assert_eq!(serde_json::from_str::<Response>(&text)?, answer);
        Ok(())
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
    fn rss_comes_from_proc_status() {
        let status = "Name:\tinit\nVmPeak:\t  9000 kB\nVmRSS:\t    4312 kB\nThreads:\t1\n";
        assert_eq!(vm_rss_kib(status), Some(4312));
        assert_eq!(vm_rss_kib("Name: x\n"), None);
    }

    #[test]
    fn the_socket_answers_line_by_line() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("run/keelson/init.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Call>();
            serve(&crate::syscalls::Linux, &path, Sender::new(tx))?;
            // The main loop's part: answer list with nothing, anything else with an error.
            tokio::spawn(async move {
                while let Some(Call { request, reply }) = rx.recv().await {
                    let _ = reply.send(match request {
                        Request::List => Response::services(&[]),
                        other => Response::error(format!("refused {other:?}")),
                    });
                }
            });
            let mut conn = tokio::net::UnixStream::connect(&path).await?;
            conn.write_all(b"{\"op\":\"list\"}\nnonsense\n{\"op\":\"reboot\"}\n")
                .await?;
            conn.shutdown().await?;
            let mut text = String::new();
            conn.read_to_string(&mut text).await?;
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), 3, "{text}");
            assert_eq!(lines[0], r#"{"ok":true,"services":[]}"#);
            assert!(lines[1].starts_with(r#"{"ok":false,"error":"not a request"#));
            assert_eq!(lines[2], r#"{"ok":false,"error":"refused Reboot"}"#);
            let mode =
                std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path)?.permissions());
            assert_eq!(mode & 0o777, 0o600);
            Ok(())
        })
    }
}
