//! The supervisor's runner: carries [`Supervisor`]'s actions out on the real system.
//!
//! It spawns with `std::process::Command` (each service in its own process group, stdin
//! from `/dev/null`, stdout and stderr into one pipe), reads the pipe into the service's
//! ring buffer, runs readiness checks ([`super::readiness`]) and timers as tasks that
//! report back as [`ServiceEvent`]s through a typed sender, and reaps through
//! [`super::reaper`]. It is the one place in init that starts programs with `Command`.
//!
//! A service with a user of its own ([`RunAs::User`]) becomes that user between `fork`
//! and `exec` (`become_user`): its bounding set cut to its capabilities while it is
//! still root, then its groups, gid and uid with the capabilities kept across the uid
//! change, then its capability sets and ambient set, then `no_new_privs`. A step that
//! fails fails the spawn (`exec` is never reached), so a service never runs with more
//! than its spec says.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::time::Instant;

use rustix::process::{Pid, Signal};
use tokio::io::AsyncReadExt;

use super::reaper::{ReapScope, reap};
use super::{
    Action, Credentials, ExitInfo, RunAs, ServiceId, ServiceSpec, StopSignal, Supervisor,
    TimerKind, readiness,
};
use crate::bootlog::MAX_LINE;
use crate::console::Log;
use crate::sender::Sender;
use crate::syscalls::Syscalls;

/// What the runner's tasks report to the main loop, which hands it back to
/// [`Runner::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceEvent {
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
    /// A service's restart, kill or start-after timer fired.
    Timer {
        /// The service.
        service: ServiceId,
        /// The run it belongs to.
        generation: u64,
        /// What to do.
        kind: TimerKind,
    },
}

/// Errors of spawning a service.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpawnError {
    /// The program to spawn is not there.
    #[error("{program} does not exist")]
    Missing {
        /// The program.
        program: String,
    },
    /// The output pipe could not be made.
    #[error("cannot create its output pipe: {0}")]
    Pipe(String),
    /// Its environment file could not be read, or holds a line that is not `KEY=VALUE`.
    #[error("its environment file {path}: {reason}")]
    EnvFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Its arguments file could not be read.
    #[error("its arguments file {path}: {reason}")]
    ArgsFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `fork`/`exec` failed.
    #[error("cannot run {program}: {reason}")]
    Exec {
        /// The program.
        program: String,
        /// The kernel's answer.
        reason: String,
    },
}

/// Carries the supervisor's actions out: processes, pipes, timers and readiness tasks.
/// Must run inside a tokio runtime (it spawns tasks that report back through `events`).
#[derive(Debug)]
pub struct Runner {
    /// The state machine.
    pub supervisor: Supervisor,
    events: Sender<ServiceEvent>,
    scope: ReapScope,
}

impl Runner {
    /// A runner reporting to `events`.
    pub fn new(supervisor: Supervisor, events: Sender<ServiceEvent>, scope: ReapScope) -> Runner {
        Runner {
            supervisor,
            events,
            scope,
        }
    }

    /// Carry out `actions` (and those they lead to).
    pub fn apply(&mut self, actions: Vec<Action>, log: &dyn Log) {
        let mut queue = std::collections::VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Spawn(id) => {
                    let Some(spec) = self.supervisor.spec(id) else {
                        continue;
                    };
                    let more = match spawn(spec) {
                        Ok((pid, output)) => {
                            self.read_output(id, output);
                            self.supervisor.spawned(id, pid, Instant::now(), log)
                        }
                        Err(e) => self.supervisor.spawn_failed(id, &e.to_string(), log),
                    };
                    queue.extend(more);
                }
                Action::Signal { pid, signal, .. } => {
                    let sig = match signal {
                        StopSignal::Term => Signal::TERM,
                        StopSignal::Kill => Signal::KILL,
                    };
                    if let Some(p) = Pid::from_raw(pid as i32) {
                        // The service's whole process group; its leader if the group is gone.
                        if rustix::process::kill_process_group(p, sig).is_err() {
                            let _ = rustix::process::kill_process(p, sig);
                        }
                    }
                }
                Action::CheckReady {
                    service,
                    generation,
                    readiness,
                    timeout,
                } => {
                    let events = self.events.clone();
                    tokio::spawn(async move {
                        let result = readiness::wait_ready(&readiness, timeout).await;
                        let _ = events.send(ServiceEvent::Ready {
                            service,
                            generation,
                            result,
                        });
                    });
                }
                Action::Timer {
                    service,
                    generation,
                    after,
                    kind,
                } => {
                    let events = self.events.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let _ = events.send(ServiceEvent::Timer {
                            service,
                            generation,
                            kind,
                        });
                    });
                }
            }
        }
    }

    /// Reap children (through `sys`) and tell the supervisor; returns the orphans reaped
    /// (not services).
    pub fn reap(&mut self, sys: &dyn Syscalls, log: &dyn Log) -> Vec<(u32, ExitInfo)> {
        let own: Vec<u32> = self
            .supervisor
            .statuses()
            .iter()
            .filter_map(|s| s.pid)
            .collect();
        let mut orphans = Vec::new();
        for (pid, exit) in reap(sys, self.scope, &own) {
            match self.supervisor.exited(pid, exit, Instant::now(), log) {
                Some(actions) => self.apply(actions, log),
                None => orphans.push((pid, exit)),
            }
        }
        orphans
    }

    /// Take in what one of the runner's tasks reported.
    pub fn handle(&mut self, event: ServiceEvent, log: &dyn Log) {
        match event {
            ServiceEvent::Output { service, line } => {
                self.supervisor.record_output(service, &line);
            }
            ServiceEvent::Ready {
                service,
                generation,
                result,
            } => {
                let actions = self.supervisor.readiness(service, generation, result, log);
                self.apply(actions, log);
            }
            ServiceEvent::Timer {
                service,
                generation,
                kind,
            } => {
                let actions = self.supervisor.timer(service, generation, kind, log);
                self.apply(actions, log);
            }
        }
    }

    /// Read a service's output pipe into events, one per line.
    fn read_output(&self, service: ServiceId, fd: OwnedFd) {
        let events = self.events.clone();
        let Ok(mut pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
            return;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut line: Vec<u8> = Vec::new();
            let send = |line: &mut Vec<u8>| {
                let text = String::from_utf8_lossy(line)
                    .trim_end_matches('\r')
                    .to_string();
                line.clear();
                events.send(ServiceEvent::Output {
                    service,
                    line: text,
                })
            };
            loop {
                let n = match pipe.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                for &b in &buf[..n] {
                    if b == b'\n' {
                        if send(&mut line).is_err() {
                            return;
                        }
                    } else {
                        line.push(b);
                        if line.len() >= MAX_LINE && send(&mut line).is_err() {
                            return;
                        }
                    }
                }
            }
            if !line.is_empty() {
                let _ = send(&mut line);
            }
        });
    }
}

/// Spawn a service: its own process group, stdin `/dev/null`, stdout and stderr into one
/// pipe whose read end is returned. The `Child` handle is dropped: [`reap`] collects it.
// The runner is where services start: the one `Command` outside `Syscalls`.
#[allow(clippy::disallowed_methods)]
pub fn spawn(spec: &ServiceSpec) -> Result<(u32, OwnedFd), SpawnError> {
    let program = spec.program.display().to_string();
    // Checked first so that `Command::spawn` never reaches its failed-exec wait.
    if !spec.program.is_file() {
        return Err(SpawnError::Missing { program });
    }
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| SpawnError::Pipe(e.to_string()))?;
    let write2 = write
        .try_clone()
        .map_err(|e| SpawnError::Pipe(e.to_string()))?;
    let from_file = match &spec.env_file {
        Some(path) => read_env_file(path)?,
        None => Vec::new(),
    };
    let extra_args = match &spec.args_file {
        Some(path) => read_args_file(path)?,
        None => Vec::new(),
    };
    let env: BTreeMap<&str, &str> = spec
        .env
        .iter()
        .chain(&from_file)
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .args(&extra_args)
        .env_clear()
        .envs(env)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::from(write2));
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    if let RunAs::User(user) = spec.run_as {
        // SAFETY: `become_user` runs in the forked child before `exec`; it makes only
        // system calls (no allocation, no lock), which is what such a child may do.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || become_user(&user));
        }
    }
    let child = cmd.spawn().map_err(|e| SpawnError::Exec {
        program,
        reason: e.to_string(),
    })?;
    // `cmd` holds the pipe's write ends until it is dropped: drop it so that the reader
    // sees end-of-file when the service's last process closes its copy.
    drop(cmd);
    Ok((child.id(), read))
}

/// Become `user` (in the forked child, before `exec`): the bounding set cut to its
/// capabilities (which needs `CAP_SETPCAP`, so first), the capabilities kept across the
/// uid change (`PR_SET_KEEPCAPS`, which `exec` clears), no supplementary group, its gid
/// and uid (real, effective and saved), its capabilities permitted, effective,
/// inheritable and ambient (the ambient set is what a non-root user keeps across
/// `exec`), then `no_new_privs`. Only system calls, as a forked child must; `std`'s
/// `Command::uid` is not used because it changes the uid before this runs, and the
/// capabilities would be gone.
fn become_user(user: &Credentials) -> std::io::Result<()> {
    use rustix::process::{Gid, Uid};
    use rustix::thread::{self, CapabilitySet, CapabilitySets};
    for bit in 0..u64::BITS {
        let capability = CapabilitySet::from_bits_retain(1 << bit);
        if user.capabilities.contains(capability) {
            continue;
        }
        match thread::remove_capability_from_bounding_set(capability) {
            // Past the kernel's last capability.
            Err(rustix::io::Errno::INVAL) => break,
            other => other?,
        }
    }
    thread::set_keep_capabilities(true)?;
    thread::set_thread_groups(&[])?;
    let gid = Gid::from_raw(user.gid);
    thread::set_thread_res_gid(gid, gid, gid)?;
    let uid = Uid::from_raw(user.uid);
    thread::set_thread_res_uid(uid, uid, uid)?;
    thread::set_capabilities(
        None,
        CapabilitySets {
            effective: user.capabilities,
            permitted: user.capabilities,
            inheritable: user.capabilities,
        },
    )?;
    for bit in 0..u64::BITS {
        let capability = CapabilitySet::from_bits_retain(1 << bit);
        if user.capabilities.contains(capability) {
            thread::configure_capability_in_ambient_set(capability, true)?;
        }
    }
    thread::set_no_new_privs(true)?;
    Ok(())
}

/// A service's arguments file, read at each start: one argument per line, taken as it
/// is (no quoting, no splitting), blank lines and `#` comments skipped.
fn read_args_file(path: &std::path::Path) -> Result<Vec<String>, SpawnError> {
    let text = std::fs::read_to_string(path).map_err(|e| SpawnError::ArgsFile {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(parse_args(&text))
}

fn parse_args(text: &str) -> Vec<String> {
    text.lines()
        .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// A service's environment file, read at each start: `KEY=VALUE` lines (the value is
/// everything after the first `=`, taken as it is), blank lines and `#` comments skipped.
/// Its variables are added to (and override) the spec's.
fn read_env_file(path: &std::path::Path) -> Result<Vec<(String, String)>, SpawnError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| SpawnError::EnvFile {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    parse_env(&text).map_err(|reason| SpawnError::EnvFile {
        path: shown,
        reason,
    })
}

fn parse_env(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("line {}: not KEY=VALUE: {line:?}", n + 1));
        };
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("line {}: {key:?} is not a variable name", n + 1));
        }
        out.push((key.to_owned(), value.to_owned()));
    }
    Ok(out)
}

/// The supervisor on the host with real child processes (`/bin/sleep`, `/bin/false`,
/// `/bin/echo`), through the real [`Runner`]: spawning, process groups, pipes, signals,
/// timers. Each test reaps only its own children ([`ReapScope::Own`]).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::memory::MemoryLog;
    use crate::signals::{SignalKind, forward_signals};
    use crate::supervisor::{Backoff, CapabilitySet, Readiness, ServiceStatus, State};
    use std::io;
    use std::path::PathBuf;
    use std::time::Duration;
    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    /// The test's loop: `SIGCHLD` and the runner's reports.
    #[derive(Debug)]
    enum Event {
        Child,
        Service(ServiceEvent),
    }

    impl From<SignalKind> for Event {
        fn from(_: SignalKind) -> Event {
            Event::Child
        }
    }

    impl From<ServiceEvent> for Event {
        fn from(event: ServiceEvent) -> Event {
            Event::Service(event)
        }
    }

    const FAST: Backoff = Backoff {
        base: Duration::from_millis(100),
        cap: Duration::from_millis(400),
        reset_after: Duration::from_secs(60),
    };

    fn program(name: &str, args: &[&str]) -> ServiceSpec {
        let path = ["/bin", "/usr/bin"]
            .iter()
            .map(|d| PathBuf::from(d).join(name.split('-').next().unwrap_or(name)))
            .find(|p| p.is_file())
            .unwrap_or_default();
        ServiceSpec {
            name: name.into(),
            program: path,
            args: args.iter().map(|a| a.to_string()).collect(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            env_file: None,
            args_file: None,
            depends_on: Vec::new(),
            start_after: Vec::new(),
            readiness: Readiness::Started,
            ready_timeout: Duration::from_secs(5),
            autostart: true,
            stop_timeout: Duration::from_secs(2),
            run_as: RunAs::Root,
        }
    }

    /// Drive the runner until `done` holds or `limit` passes; reaps on SIGCHLD and on a
    /// 50 ms tick (signal delivery is per process, shared with other tests).
    async fn drive(
        runner: &mut Runner,
        rx: &mut UnboundedReceiver<Event>,
        log: &MemoryLog,
        limit: Duration,
        done: impl Fn(&Runner) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if done(runner) {
                return true;
            }
            let tick = tokio::time::Instant::now() + Duration::from_millis(50);
            match tokio::time::timeout_at(tick.min(deadline), rx.recv()).await {
                Ok(Some(Event::Child)) | Err(_) => {
                    runner.reap(&crate::syscalls::Linux, log);
                }
                Ok(Some(Event::Service(event))) => {
                    runner.handle(event, log);
                }
                Ok(None) => return done(runner),
            }
            if tokio::time::Instant::now() >= deadline {
                return done(runner);
            }
        }
    }

    fn setup(specs: Vec<ServiceSpec>) -> (Runner, UnboundedReceiver<Event>) {
        let (tx, rx) = unbounded_channel();
        forward_signals(&Sender::new(tx.clone()), &[SignalKind::Child]);
        (
            Runner::new(
                Supervisor::new(specs, FAST),
                Sender::new(tx),
                ReapScope::Own,
            ),
            rx,
        )
    }

    fn runtime() -> io::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }

    fn status(runner: &Runner, name: &str) -> ServiceStatus {
        let statuses = runner.supervisor.statuses();
        statuses
            .into_iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no service {name}"))
    }

    #[test]
    fn a_killed_service_is_restarted_after_its_backoff() -> io::Result<()> {
        runtime()?.block_on(async {
            let log = MemoryLog::default();
            let (mut runner, mut rx) = setup(vec![program("sleep", &["30"])]);
            let actions = runner.supervisor.start_autostart(&log);
            runner.apply(actions, &log);
            let first = status(&runner, "sleep").pid.unwrap_or_default();
            assert!(first > 0 && status(&runner, "sleep").state == State::Ready);
            let killed_at = Instant::now();
            rustix::process::kill_process(
                Pid::from_raw(first as i32).unwrap_or(Pid::INIT),
                Signal::KILL,
            )?;
            let restarted = drive(&mut runner, &mut rx, &log, Duration::from_secs(5), |r| {
                status(r, "sleep").pid.is_some_and(|p| p != first)
            })
            .await;
            assert!(restarted, "{:?}", log.lines());
            let after = killed_at.elapsed();
            // The first backoff is 100 ms: not sooner, and not much later.
            assert!(after >= Duration::from_millis(100), "{after:?}");
            assert!(after < Duration::from_secs(2), "{after:?}");
            let s = status(&runner, "sleep");
            assert_eq!((s.state, s.restarts), (State::Ready, 1));
            assert_eq!(
                s.last_exit,
                Some(ExitInfo {
                    code: None,
                    signal: Some(9)
                })
            );
            let lines = log.lines();
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains("service sleep killed by signal 9 (SIGKILL)")),
                "{lines:?}"
            );
            assert!(
                lines
                    .iter()
                    .any(|l| l.ends_with("service sleep restarts in 0.1 s (failure 1)"))
            );
            // Stop: SIGTERM ends `sleep` at once; the state machine sees the exit.
            let actions = runner.supervisor.stop("sleep", &log).unwrap_or_default();
            runner.apply(actions, &log);
            let stopped = drive(&mut runner, &mut rx, &log, Duration::from_secs(5), |r| {
                status(r, "sleep").state == State::Stopped
            })
            .await;
            assert!(stopped, "{:?}", log.lines());
            assert_eq!(
                status(&runner, "sleep").last_exit,
                Some(ExitInfo {
                    code: None,
                    signal: Some(15)
                })
            );
            Ok(())
        })
    }

    #[test]
    fn a_crash_loop_backs_off_to_the_cap_without_starving_others() -> io::Result<()> {
        runtime()?.block_on(async {
            let log = MemoryLog::default();
            let mut late = program("sleep-late", &["30"]);
            late.autostart = false;
            let (mut runner, mut rx) =
                setup(vec![program("false", &[]), program("sleep", &["30"]), late]);
            let actions = runner.supervisor.start_autostart(&log);
            runner.apply(actions, &log);
            let steady = status(&runner, "sleep").pid;
            // Five failures: 0.1 + 0.2 + 0.4 + 0.4 s of backoff.
            let looped = drive(&mut runner, &mut rx, &log, Duration::from_secs(10), |r| {
                status(r, "false").restarts >= 4
            })
            .await;
            assert!(looped, "{:?}", log.lines());
            // Meanwhile another service starts at once on request.
            let asked = Instant::now();
            let actions = runner
                .supervisor
                .start("sleep-late", &log)
                .unwrap_or_default();
            runner.apply(actions, &log);
            assert!(status(&runner, "sleep-late").state == State::Ready);
            assert!(asked.elapsed() < Duration::from_millis(500));
            let capped = drive(&mut runner, &mut rx, &log, Duration::from_secs(10), |r| {
                status(r, "false").restarts >= 6
            })
            .await;
            assert!(capped, "{:?}", log.lines());
            let delays: Vec<String> = log
                .lines()
                .iter()
                .filter_map(|l| l.strip_prefix("keelson-init: service false restarts in "))
                .map(|l| l.split(' ').next().unwrap_or_default().to_string())
                .collect();
            assert_eq!(delays[..6], ["0.1", "0.2", "0.4", "0.4", "0.4", "0.4"]);
            // The steady service was never disturbed.
            let s = status(&runner, "sleep");
            assert_eq!((s.pid, s.restarts, s.state), (steady, 0, State::Ready));
            assert_eq!(
                status(&runner, "false").last_exit,
                Some(ExitInfo {
                    code: Some(1),
                    signal: None
                })
            );
            // Shut down: everything stops, nothing restarts.
            let actions = runner.supervisor.shutdown(&log);
            runner.apply(actions, &log);
            let down = drive(&mut runner, &mut rx, &log, Duration::from_secs(5), |r| {
                r.supervisor.all_stopped()
            })
            .await;
            assert!(down, "{:?}", log.lines());
            Ok(())
        })
    }

    #[test]
    fn output_lands_in_the_ring_buffer_line_by_line() -> io::Result<()> {
        runtime()?.block_on(async {
            let log = MemoryLog::default();
            let mut echo = program("echo", &["first line\nsecond line"]);
            echo.env.clear();
            let (mut runner, mut rx) = setup(vec![echo]);
            let actions = runner.supervisor.start_autostart(&log);
            runner.apply(actions, &log);
            let got = drive(&mut runner, &mut rx, &log, Duration::from_secs(5), |r| {
                r.supervisor.output_tail(ServiceId(0), 10).len() >= 2
            })
            .await;
            assert!(got, "{:?}", log.lines());
            assert_eq!(
                runner.supervisor.output_tail(ServiceId(0), 10),
                ["first line", "second line"]
            );
            Ok(())
        })
    }

    /// The lines of `/proc/self/status` that say who a process is, as a service with
    /// `run_as` sees them: the spec spawned through [`spawn`], running `cat`.
    fn identity_of(run_as: RunAs) -> Vec<String> {
        let mut spec = program("cat", &["/proc/self/status"]);
        spec.run_as = run_as;
        let (pid, output) = spawn(&spec).expect("spawn cat");
        let mut text = String::new();
        io::Read::read_to_string(&mut std::fs::File::from(output), &mut text).unwrap();
        let pid = Pid::from_raw(pid as i32).unwrap_or(Pid::INIT);
        let status = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
        assert!(status.is_ok_and(|s| s.is_some_and(|(_, s)| s.exit_status() == Some(0))));
        let wanted = [
            "Uid:",
            "Gid:",
            "Groups:",
            "CapInh:",
            "CapPrm:",
            "CapEff:",
            "CapBnd:",
            "CapAmb:",
            "NoNewPrivs:",
        ];
        text.lines()
            .filter(|l| wanted.iter().any(|w| l.starts_with(w)))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    }

    /// Whether this test process may give a child another user and capabilities.
    fn may_change_users() -> bool {
        use rustix::thread::{CapabilitySet, capabilities};
        let needed = CapabilitySet::SETUID | CapabilitySet::SETGID | CapabilitySet::SETPCAP;
        capabilities(None).is_ok_and(|c| c.effective.contains(needed))
    }

    #[test]
    fn a_service_with_its_own_user_runs_with_its_ids_and_capabilities_only() {
        if !may_change_users() {
            eprintln!("skipped: the test runs without CAP_SETUID, CAP_SETGID and CAP_SETPCAP");
            return;
        }
        // machined's (`services::MACHINED_USER`).
        let user = Credentials {
            uid: 50,
            gid: 50,
            capabilities: CapabilitySet::DAC_OVERRIDE
                | CapabilitySet::SYS_TIME
                | CapabilitySet::SYSLOG,
        };
        // CAP_DAC_OVERRIDE (1), CAP_SYS_TIME (25), CAP_SYSLOG (34).
        let caps = format!("{:016x}", (1u64 << 1) | (1 << 25) | (1 << 34));
        assert_eq!(
            identity_of(RunAs::User(user)),
            [
                format!("Uid: {0} {0} {0} {0}", user.uid),
                format!("Gid: {0} {0} {0} {0}", user.gid),
                "Groups:".to_owned(),
                format!("CapInh: {caps}"),
                format!("CapPrm: {caps}"),
                format!("CapEff: {caps}"),
                format!("CapBnd: {caps}"),
                format!("CapAmb: {caps}"),
                "NoNewPrivs: 1".to_owned(),
            ]
        );
        // A root service is left as PID 1 made it.
        let root = identity_of(RunAs::Root);
        assert!(root.contains(&"Uid: 0 0 0 0".to_owned()), "{root:?}");
        assert!(root.contains(&"NoNewPrivs: 0".to_owned()), "{root:?}");
    }

    #[test]
    fn a_user_that_cannot_be_made_is_a_spawn_failure_never_a_wider_run() {
        if !may_change_users() {
            eprintln!("skipped: the test runs without CAP_SETUID, CAP_SETGID and CAP_SETPCAP");
            return;
        }
        // No kernel has a capability 63: the child cannot be given it, so it never runs.
        let mut spec = program("cat", &["/proc/self/status"]);
        spec.run_as = RunAs::User(Credentials {
            uid: 50,
            gid: 50,
            capabilities: CapabilitySet::SYS_TIME | CapabilitySet::from_bits_retain(1 << 63),
        });
        let err = spawn(&spec).err();
        assert!(
            matches!(&err, Some(SpawnError::Exec { reason, .. }) if reason.contains("os error")),
            "{err:?}"
        );
    }

    #[test]
    fn a_missing_program_is_a_failure_not_a_crash() {
        let log = MemoryLog::default();
        let mut spec = program("sleep", &[]);
        spec.program = "/nonexistent/keelson-test".into();
        assert!(matches!(spawn(&spec), Err(SpawnError::Missing { .. })));
        let mut sup = Supervisor::new(vec![spec], FAST);
        let actions = sup.spawn_failed(ServiceId(0), "gone", &log);
        assert!(matches!(
            actions.as_slice(),
            [Action::Timer {
                kind: TimerKind::Restart,
                ..
            }]
        ));
        assert_eq!(
            log.lines(),
            [
                "keelson-init: service sleep failed to start: gone",
                "keelson-init: service sleep restarts in 0.1 s (failure 1)"
            ]
        );
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // the test's own file in its temporary directory
    fn an_env_file_adds_its_variables_and_a_bad_one_is_a_spawn_failure() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("svc.env");
        std::fs::write(
            &file,
            "# etcd\n\nETCD_NAME=cp-1\nETCD_INITIAL_CLUSTER=a=https://10.5.0.2:2380,b=x\n",
        )
        .unwrap();
        assert_eq!(
            read_env_file(&file).unwrap(),
            [
                ("ETCD_NAME".to_owned(), "cp-1".to_owned()),
                (
                    "ETCD_INITIAL_CLUSTER".to_owned(),
                    "a=https://10.5.0.2:2380,b=x".to_owned()
                ),
            ]
        );
        assert_eq!(
            parse_env("JUST TEXT"),
            Err("line 1: not KEY=VALUE: \"JUST TEXT\"".to_owned())
        );
        assert!(parse_env("A-B=1").is_err());
        let mut spec = program("sh", &[]);
        spec.program = "/bin/true".into();
        spec.env_file = Some(dir.path().join("missing.env"));
        let err = spawn(&spec).unwrap_err().to_string();
        assert!(err.contains("missing.env"), "{err}");
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // the test's own file in its temporary directory
    fn an_args_file_adds_one_argument_per_line_and_a_missing_one_is_a_spawn_failure() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("svc.args");
        std::fs::write(
            &file,
            "# kubelet\n--node-ip=10.5.0.2\n\n--v=2 with spaces\n",
        )
        .unwrap();
        assert_eq!(
            read_args_file(&file).unwrap(),
            ["--node-ip=10.5.0.2", "--v=2 with spaces"]
        );
        let mut spec = program("sh", &[]);
        spec.program = "/bin/true".into();
        spec.args_file = Some(dir.path().join("missing.args"));
        let err = spawn(&spec).unwrap_err().to_string();
        assert!(
            err.contains("arguments file") && err.contains("missing.args"),
            "{err}"
        );
    }
}
