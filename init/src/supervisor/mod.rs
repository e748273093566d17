//! Service supervision: declared dependencies, readiness, restart with exponential
//! backoff, bounded output capture, ordered stop.
//!
//! Layers, one module each:
//!
//! - [`Supervisor`] (this module) is the state machine, free of I/O: it is told what
//!   happened (a process was spawned, exited, became ready, a timer fired, an operator
//!   asked for a start or a stop) with the current time, and answers with [`Action`]s
//!   (spawn this service, signal that process group, check readiness, wake me in 4 s).
//!   Its tests run without processes or clocks. Services are named by [`ServiceId`]s,
//!   whose lookups are checked: a stale id finds nothing, it never panics.
//! - [`runner::Runner`] carries the actions out on the real system: it spawns with
//!   `std::process::Command` (each service in its own process group, stdin from
//!   `/dev/null`, stdout and stderr into one pipe), reads the pipe into the service's
//!   [`RingBuffer`], runs readiness checks ([`readiness`]) and timers as tasks that
//!   report back as [`runner::ServiceEvent`]s, and reaps ([`reaper`]).
//!
//! The vocabulary they share, re-exported here: what to run (`spec.rs`: [`ServiceSpec`],
//! [`Readiness`], [`Backoff`]) and where a service is (`status.rs`: [`State`],
//! [`ExitInfo`], [`ServiceStatus`]).
//!
//! # Reaping: one owner
//!
//! PID 1 inherits every orphan, so it must reap with `waitpid(-1, WNOHANG)` until nothing
//! is left (on each `SIGCHLD`), and map the pids it gets back to services. Nothing else
//! in the process may wait for children: tokio's `process` feature is not used (its
//! reaper would race ours), and `Child` handles from `std::process` are dropped at once,
//! never waited on. The one place the standard library waits itself, a failed `exec`
//! inside `Command::spawn`, runs synchronously on our only thread, where the reaper
//! cannot run in between. [`reaper::ReapScope::Own`] (wait only for our own pids) exists for the
//! host tests, whose test harness shares the process with other tests' children.
//!
//! # Restart policy
//!
//! A service that exits while it should be running is restarted after
//! [`Backoff::delay`]: `base`, doubling with each consecutive failure up to `cap`
//! (1 s, 2 s, 4 s ... 30 s). A run that lasted at least `reset_after` clears the count.
//! A service whose readiness check fails or times out is stopped and counts as a failure.
//! Timers are events of the one loop, so a crash-looping service never delays others.
//!
//! # Dependencies
//!
//! A service starts when every service it depends on is ready; it is stopped before
//! any of them at shutdown (reverse dependency order): [`Supervisor::shutdown`] stops
//! the services no running service depends on, and each exit lets the next ones go.

pub mod readiness;
pub mod reaper;
pub mod runner;
mod spec;
mod status;

pub use self::spec::{
    Backoff, CapabilitySet, Credentials, Readiness, RunAs, START_AFTER_LIMIT, ServiceSpec,
};
pub use self::status::{ExitInfo, ServiceStatus, State, signal_name};

use std::time::{Duration, Instant};

use crate::bootlog::{RingBuffer, SERVICE_LOG_BYTES};
use crate::console::Log;

/// A service of the supervisor's table. Only the supervisor hands them out
/// ([`Supervisor::id`], [`Supervisor::by_pid`], the [`Action`]s it returns), and ids never
/// change; a lookup with an id that names no service finds nothing, it never panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceId(usize);

/// Which signal an action sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// `SIGTERM`: please stop.
    Term,
    /// `SIGKILL`: stop now.
    Kill,
}

/// A service timer's purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    /// Restart after a backoff delay.
    Restart,
    /// `SIGKILL` if the service has not stopped yet.
    Kill,
    /// [`START_AFTER_LIMIT`] has passed: stop waiting for the `start_after` services.
    StartAfterLimit,
}

/// What the supervisor asks its runner to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Spawn the service now; report with [`Supervisor::spawned`] or
    /// [`Supervisor::spawn_failed`].
    Spawn(ServiceId),
    /// Send a signal to the service's process group.
    Signal {
        /// The service.
        service: ServiceId,
        /// Its process (and process group) id.
        pid: u32,
        /// Which signal.
        signal: StopSignal,
    },
    /// Check readiness until it passes or `timeout` passes; report with
    /// [`Supervisor::readiness`].
    CheckReady {
        /// The service.
        service: ServiceId,
        /// The run it is for.
        generation: u64,
        /// The check.
        readiness: Readiness,
        /// Give up after this long.
        timeout: Duration,
    },
    /// Report [`Supervisor::timer`] after `after`.
    Timer {
        /// The service.
        service: ServiceId,
        /// The run it is for (stale timers are ignored).
        generation: u64,
        /// When.
        after: Duration,
        /// Why.
        kind: TimerKind,
    },
}

/// What happens when a stopping service has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterStop {
    /// Stay stopped.
    Nothing,
    /// Start again (a restart request).
    Start,
    /// Count a failure and back off (readiness failed).
    Backoff,
}

/// One service and its run-time state.
#[derive(Debug)]
struct Service {
    spec: ServiceSpec,
    state: State,
    pid: Option<u32>,
    generation: u64,
    started_at: Option<Instant>,
    failures: u32,
    restarts: u32,
    last_exit: Option<ExitInfo>,
    after_stop: AfterStop,
    /// Its `start_after` ordering is done with (it has started once, or the limit
    /// passed).
    ordered: bool,
    output: RingBuffer,
}

/// Errors of requests naming services.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// No service has that name.
    #[error("no service named {name:?} (known: {known})")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The names there are.
        known: String,
    },
    /// The machine is shutting down.
    #[error("the node is shutting down: services are not started any more")]
    ShuttingDown,
}

/// The state machine over every service.
#[derive(Debug)]
pub struct Supervisor {
    services: Vec<Service>,
    backoff: Backoff,
    shutting_down: bool,
}

impl Service {
    fn status(&self) -> ServiceStatus {
        ServiceStatus {
            name: self.spec.name.clone(),
            state: self.state,
            pid: self.pid,
            restarts: self.restarts,
            last_exit: self.last_exit,
            depends_on: self.spec.depends_on.clone(),
            autostart: self.spec.autostart,
        }
    }
}

impl Supervisor {
    /// A supervisor over `specs` (dependencies on unknown names are ignored, with the
    /// rest of the spec kept), none started yet.
    pub fn new(specs: Vec<ServiceSpec>, backoff: Backoff) -> Supervisor {
        let mut supervisor = Supervisor {
            services: Vec::new(),
            backoff,
            shutting_down: false,
        };
        supervisor.add(specs);
        supervisor
    }

    /// Register more services, not started yet. A name already registered keeps its
    /// spec and its run (machined, started alone in maintenance mode, keeps running when
    /// the config brings the other services); ids never change.
    pub fn add(&mut self, specs: Vec<ServiceSpec>) {
        for spec in specs {
            if self.services.iter().any(|s| s.spec.name == spec.name) {
                continue;
            }
            let ordered = spec.start_after.is_empty();
            self.services.push(Service {
                spec,
                state: State::Stopped,
                pid: None,
                generation: 0,
                started_at: None,
                failures: 0,
                restarts: 0,
                last_exit: None,
                after_stop: AfterStop::Nothing,
                ordered,
                output: RingBuffer::new(SERVICE_LOG_BYTES),
            });
        }
    }

    fn get(&self, id: ServiceId) -> Option<&Service> {
        self.services.get(id.0)
    }

    fn get_mut(&mut self, id: ServiceId) -> Option<&mut Service> {
        self.services.get_mut(id.0)
    }

    /// Every id, in table order.
    fn ids(&self) -> Vec<ServiceId> {
        (0..self.services.len()).map(ServiceId).collect()
    }

    /// The id of the service named `name`.
    pub fn id(&self, name: &str) -> Result<ServiceId, Error> {
        self.services
            .iter()
            .position(|s| s.spec.name == name)
            .map(ServiceId)
            .ok_or_else(|| Error::Unknown {
                name: name.to_string(),
                known: self
                    .services
                    .iter()
                    .map(|s| s.spec.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The spec of a service.
    pub fn spec(&self, id: ServiceId) -> Option<&ServiceSpec> {
        self.get(id).map(|s| &s.spec)
    }

    /// The name of a service.
    pub fn name(&self, id: ServiceId) -> Option<&str> {
        self.get(id).map(|s| s.spec.name.as_str())
    }

    /// The state of a service.
    pub fn state(&self, id: ServiceId) -> Option<State> {
        self.get(id).map(|s| s.state)
    }

    /// Every service's status, in table order.
    pub fn statuses(&self) -> Vec<ServiceStatus> {
        self.services.iter().map(Service::status).collect()
    }

    /// One service's status.
    pub fn status(&self, id: ServiceId) -> Option<ServiceStatus> {
        self.get(id).map(Service::status)
    }

    /// The last `n` lines a service printed.
    pub fn output_tail(&self, id: ServiceId, n: usize) -> Vec<String> {
        self.get(id).map_or_else(Vec::new, |s| s.output.tail(n))
    }

    /// Keep a line the service printed.
    pub fn record_output(&mut self, id: ServiceId, line: &str) {
        if let Some(s) = self.get_mut(id) {
            s.output.push(line);
        }
    }

    /// The service running as `pid`.
    pub fn by_pid(&self, pid: u32) -> Option<ServiceId> {
        self.services
            .iter()
            .position(|s| s.pid == Some(pid))
            .map(ServiceId)
    }

    /// Whether the shutdown has begun and every service is down.
    pub fn all_stopped(&self) -> bool {
        self.services.iter().all(|s| s.pid.is_none())
    }

    /// Whether a shutdown has begun.
    pub fn shutting_down(&self) -> bool {
        self.shutting_down
    }

    fn deps_ready(&self, id: ServiceId) -> bool {
        let Some(service) = self.get(id) else {
            return false;
        };
        service.spec.depends_on.iter().all(|dep| {
            match self.services.iter().find(|s| &s.spec.name == dep) {
                Some(s) => s.state == State::Ready,
                // Unknown dependency (a service not registered on this node): no wait.
                None => true,
            }
        })
    }

    /// The `start_after` services it still waits for: those starting, or waiting to.
    fn order_pending(&self, id: ServiceId) -> Vec<&str> {
        let Some(service) = self.get(id) else {
            return Vec::new();
        };
        if service.ordered {
            return Vec::new();
        }
        service
            .spec
            .start_after
            .iter()
            .map(String::as_str)
            .filter(|name| {
                self.services.iter().any(|s| {
                    s.spec.name == *name && matches!(s.state, State::Waiting | State::Starting)
                })
            })
            .collect()
    }

    fn can_start(&self, id: ServiceId) -> bool {
        self.deps_ready(id) && self.order_pending(id).is_empty()
    }

    /// Start the waiting services that may start now.
    fn release_waiting(&mut self, log: &dyn Log) -> Vec<Action> {
        let mut actions = Vec::new();
        for other in self.ids() {
            if self.state(other) == Some(State::Waiting) && self.can_start(other) {
                if let Some(service) = self.get_mut(other) {
                    service.state = State::Stopped;
                }
                actions.extend(self.want(other, log));
            }
        }
        actions
    }

    /// Start every autostart service (those whose dependencies are not ready wait).
    pub fn start_autostart(&mut self, log: &dyn Log) -> Vec<Action> {
        let mut actions = Vec::new();
        for id in self.ids() {
            if self.get(id).is_some_and(|s| s.spec.autostart) {
                actions.extend(self.want(id, log));
            }
        }
        actions
    }

    /// An operator's start request.
    pub fn start(&mut self, name: &str, log: &dyn Log) -> Result<Vec<Action>, Error> {
        if self.shutting_down {
            return Err(Error::ShuttingDown);
        }
        let id = self.id(name)?;
        Ok(self.want(id, log))
    }

    /// An operator's stop request.
    pub fn stop(&mut self, name: &str, log: &dyn Log) -> Result<Vec<Action>, Error> {
        let id = self.id(name)?;
        Ok(self.stop_id(id, AfterStop::Nothing, log))
    }

    /// An operator's restart request: stop (if running), then start.
    pub fn restart(&mut self, name: &str, log: &dyn Log) -> Result<Vec<Action>, Error> {
        if self.shutting_down {
            return Err(Error::ShuttingDown);
        }
        let id = self.id(name)?;
        if self.get(id).is_some_and(|s| s.pid.is_some()) {
            Ok(self.stop_id(id, AfterStop::Start, log))
        } else {
            if let Some(service) = self.get_mut(id) {
                service.failures = 0;
            }
            Ok(self.want(id, log))
        }
    }

    /// Make a service wanted: start it now if its dependencies are ready, else wait.
    fn want(&mut self, id: ServiceId, log: &dyn Log) -> Vec<Action> {
        let Some(service) = self.get_mut(id) else {
            return Vec::new();
        };
        match service.state {
            State::Stopped | State::Backoff => {}
            // Running, starting, stopping or already waiting: nothing to add.
            _ => return Vec::new(),
        }
        // A pending restart timer of the old run must not fire into the new one.
        service.generation += 1;
        let generation = service.generation;
        if self.can_start(id) {
            // Starting from now on (the runner spawns it before it handles anything else),
            // so that services ordered after it wait.
            if let Some(service) = self.get_mut(id) {
                service.state = State::Starting;
            }
            return vec![Action::Spawn(id)];
        }
        let Some(service) = self.get(id) else {
            return Vec::new();
        };
        let mut waiting_for: Vec<&str> = service
            .spec
            .depends_on
            .iter()
            .map(String::as_str)
            .filter(|d| {
                self.services
                    .iter()
                    .any(|s| s.spec.name == *d && s.state != State::Ready)
            })
            .collect();
        let ordering = self.order_pending(id);
        let mut actions = Vec::new();
        if !ordering.is_empty() {
            for name in &ordering {
                if !waiting_for.contains(name) {
                    waiting_for.push(name);
                }
            }
            actions.push(Action::Timer {
                service: id,
                generation,
                after: START_AFTER_LIMIT,
                kind: TimerKind::StartAfterLimit,
            });
        }
        log.line(&format!(
            "service {} waiting for {}",
            service.spec.name,
            waiting_for.join(", ")
        ));
        if let Some(service) = self.get_mut(id) {
            service.state = State::Waiting;
        }
        actions
    }

    fn stop_id(&mut self, id: ServiceId, after: AfterStop, log: &dyn Log) -> Vec<Action> {
        let Some(service) = self.services.get_mut(id.0) else {
            return Vec::new();
        };
        match (service.state, service.pid) {
            (State::Stopping, _) => {
                if after != AfterStop::Nothing || service.after_stop == AfterStop::Start {
                    service.after_stop = after;
                }
                Vec::new()
            }
            (_, Some(pid)) => {
                service.state = State::Stopping;
                service.after_stop = after;
                log.line(&format!("service {} stopping (SIGTERM)", service.spec.name));
                vec![
                    Action::Signal {
                        service: id,
                        pid,
                        signal: StopSignal::Term,
                    },
                    Action::Timer {
                        service: id,
                        generation: service.generation,
                        after: service.spec.stop_timeout,
                        kind: TimerKind::Kill,
                    },
                ]
            }
            (State::Stopped, None) => Vec::new(),
            (_, None) => {
                // Waiting or backing off: nothing runs; forget the pending start.
                service.generation += 1;
                service.state = State::Stopped;
                log.line(&format!("service {} stopped", service.spec.name));
                Vec::new()
            }
        }
    }

    /// The runner spawned the service as `pid`.
    pub fn spawned(&mut self, id: ServiceId, pid: u32, now: Instant, log: &dyn Log) -> Vec<Action> {
        let Some(service) = self.services.get_mut(id.0) else {
            return Vec::new();
        };
        service.generation += 1;
        service.ordered = true;
        service.pid = Some(pid);
        service.started_at = Some(now);
        service.state = State::Starting;
        log.line(&format!(
            "service {} started (pid {pid})",
            service.spec.name
        ));
        match &service.spec.readiness {
            Readiness::Started => self.became_ready(id, log),
            readiness => vec![Action::CheckReady {
                service: id,
                generation: service.generation,
                readiness: readiness.clone(),
                timeout: service.spec.ready_timeout,
            }],
        }
    }

    /// The runner could not spawn the service: a failure like an exit.
    pub fn spawn_failed(&mut self, id: ServiceId, why: &str, log: &dyn Log) -> Vec<Action> {
        let Some(service) = self.get(id) else {
            return Vec::new();
        };
        log.line(&format!(
            "service {} failed to start: {why}",
            service.spec.name
        ));
        self.failed(id, log)
    }

    fn became_ready(&mut self, id: ServiceId, log: &dyn Log) -> Vec<Action> {
        let Some(service) = self.get_mut(id) else {
            return Vec::new();
        };
        service.state = State::Ready;
        log.line(&format!("service {} ready", service.spec.name));
        // Dependents that were waiting may go now.
        self.release_waiting(log)
    }

    /// A readiness check finished for run `generation`.
    pub fn readiness(
        &mut self,
        id: ServiceId,
        generation: u64,
        result: Result<(), String>,
        log: &dyn Log,
    ) -> Vec<Action> {
        let Some(service) = self.get(id) else {
            return Vec::new();
        };
        if service.generation != generation || service.state != State::Starting {
            return Vec::new();
        }
        match result {
            Ok(()) => self.became_ready(id, log),
            Err(why) => {
                log.line(&format!(
                    "service {} not ready: {why}; stopping it to restart",
                    service.spec.name
                ));
                self.stop_id(id, AfterStop::Backoff, log)
            }
        }
    }

    /// A timer fired.
    pub fn timer(
        &mut self,
        id: ServiceId,
        generation: u64,
        kind: TimerKind,
        log: &dyn Log,
    ) -> Vec<Action> {
        let Some(service) = self.get(id) else {
            return Vec::new();
        };
        if service.generation != generation {
            return Vec::new();
        }
        match (kind, service.state, service.pid) {
            (TimerKind::Restart, State::Backoff, None) if !self.shutting_down => {
                let Some(service) = self.services.get_mut(id.0) else {
                    return Vec::new();
                };
                service.restarts += 1;
                service.state = State::Stopped;
                log.line(&format!(
                    "service {} restarting (restart {})",
                    service.spec.name, service.restarts
                ));
                self.want(id, log)
            }
            (TimerKind::StartAfterLimit, State::Waiting, None) if !self.shutting_down => {
                let pending = self.order_pending(id).join(", ");
                let Some(service) = self.services.get_mut(id.0) else {
                    return Vec::new();
                };
                service.ordered = true;
                if !pending.is_empty() {
                    log.line(&format!(
                        "service {}: {pending} not ready after {} s; not waiting any longer",
                        service.spec.name,
                        START_AFTER_LIMIT.as_secs()
                    ));
                }
                self.release_waiting(log)
            }
            (TimerKind::Kill, State::Stopping, Some(pid)) => {
                log.line(&format!(
                    "service {} did not stop within {} s: SIGKILL",
                    service.spec.name,
                    service.spec.stop_timeout.as_secs_f64()
                ));
                vec![Action::Signal {
                    service: id,
                    pid,
                    signal: StopSignal::Kill,
                }]
            }
            _ => Vec::new(),
        }
    }

    /// A child was reaped. Returns `None` when `pid` is no service's (an orphan).
    pub fn exited(
        &mut self,
        pid: u32,
        exit: ExitInfo,
        now: Instant,
        log: &dyn Log,
    ) -> Option<Vec<Action>> {
        let id = self.by_pid(pid)?;
        let service = self.services.get_mut(id.0)?;
        service.pid = None;
        service.last_exit = Some(exit);
        let ran = service
            .started_at
            .map(|t| now.saturating_duration_since(t))
            .unwrap_or_default();
        let was = service.state;
        let after = std::mem::replace(&mut service.after_stop, AfterStop::Nothing);
        if was == State::Stopping || self.shutting_down {
            service.state = State::Stopped;
            log.line(&format!("service {} stopped ({exit})", service.spec.name));
            let mut actions = match after {
                AfterStop::Start if !self.shutting_down => {
                    if let Some(service) = self.get_mut(id) {
                        service.failures = 0;
                    }
                    self.want(id, log)
                }
                AfterStop::Backoff if !self.shutting_down => self.failed(id, log),
                _ => Vec::new(),
            };
            if self.shutting_down {
                actions.extend(self.advance_shutdown(log));
            }
            return Some(actions);
        }
        if ran >= self.backoff.reset_after {
            service.failures = 0;
        }
        log.line(&format!(
            "service {} {exit} after {:.1} s",
            service.spec.name,
            ran.as_secs_f64()
        ));
        Some(self.failed(id, log))
    }

    /// Count a failure and schedule the restart.
    fn failed(&mut self, id: ServiceId, log: &dyn Log) -> Vec<Action> {
        let Some(service) = self.services.get_mut(id.0) else {
            return Vec::new();
        };
        service.failures = service.failures.saturating_add(1);
        service.state = State::Backoff;
        service.generation += 1;
        let delay = self.backoff.delay(service.failures);
        log.line(&format!(
            "service {} restarts in {:.1} s (failure {})",
            service.spec.name,
            delay.as_secs_f64(),
            service.failures
        ));
        let mut actions = vec![Action::Timer {
            service: id,
            generation: service.generation,
            after: delay,
            kind: TimerKind::Restart,
        }];
        // Services ordered after this one need not wait for it any longer.
        actions.extend(self.release_waiting(log));
        actions
    }

    /// Begin the shutdown: nothing starts any more, and services stop in reverse
    /// dependency order. Call [`Supervisor::all_stopped`] to know when it is done.
    pub fn shutdown(&mut self, log: &dyn Log) -> Vec<Action> {
        self.shutting_down = true;
        for s in &mut self.services {
            if s.pid.is_none() && s.state != State::Stopped {
                s.generation += 1;
                s.state = State::Stopped;
            }
        }
        self.advance_shutdown(log)
    }

    /// Stop the running services that no running service depends on.
    fn advance_shutdown(&mut self, log: &dyn Log) -> Vec<Action> {
        let mut actions = Vec::new();
        for id in self.ids() {
            let Some(s) = self.get(id) else {
                continue;
            };
            if s.pid.is_none() || s.state == State::Stopping {
                continue;
            }
            let name = &s.spec.name;
            let has_running_dependent = self
                .services
                .iter()
                .any(|d| d.pid.is_some() && d.spec.depends_on.contains(name));
            if !has_running_dependent {
                actions.extend(self.stop_id(id, AfterStop::Nothing, log));
            }
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::memory::MemoryLog;

    fn spec(name: &str, deps: &[&str], readiness: Readiness) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            program: format!("/usr/bin/{name}").into(),
            args: Vec::new(),
            env: Vec::new(),
            env_file: None,
            args_file: None,
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            start_after: Vec::new(),
            readiness,
            ready_timeout: Duration::from_secs(60),
            autostart: true,
            stop_timeout: Duration::from_secs(10),
            run_as: RunAs::Root,
        }
    }

    fn sock(path: &str) -> Readiness {
        Readiness::Http2Socket(path.into())
    }

    /// containerd <- kubelet; machined on its own; etcd registered, not started.
    fn node() -> Supervisor {
        let mut etcd = spec("etcd", &[], Readiness::Started);
        etcd.autostart = false;
        Supervisor::new(
            vec![
                spec("containerd", &[], sock("/run/containerd/containerd.sock")),
                etcd,
                spec("kubelet", &["containerd"], Readiness::Started),
                spec("machined", &[], Readiness::Started),
            ],
            Backoff::DEFAULT,
        )
    }

    #[test]
    fn services_added_later_join_and_a_running_one_keeps_its_run() {
        let log = MemoryLog::default();
        // Maintenance mode: machined alone.
        let mut sup = Supervisor::new(
            vec![spec("machined", &[], Readiness::Started)],
            Backoff::DEFAULT,
        );
        assert_eq!(sup.start_autostart(&log), [Action::Spawn(ServiceId(0))]);
        assert_eq!(sup.spawned(ServiceId(0), 50, Instant::now(), &log), []);
        // The config brings the rest; machined is in the catalog again.
        sup.add(vec![
            spec("containerd", &[], Readiness::Started),
            spec("machined", &[], Readiness::Started),
        ]);
        let names: Vec<String> = sup.statuses().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["machined", "containerd"]);
        assert_eq!(sup.start_autostart(&log), [Action::Spawn(ServiceId(1))]);
        assert_eq!(sup.statuses()[0].pid, Some(50));
        assert_eq!(sup.state(ServiceId(0)), Some(State::Ready));
    }

    #[test]
    fn an_id_that_names_no_service_finds_nothing() {
        let log = MemoryLog::default();
        let mut sup = node();
        let stale = ServiceId(99);
        assert_eq!(sup.spec(stale), None);
        assert_eq!(sup.name(stale), None);
        assert_eq!(sup.state(stale), None);
        assert_eq!(sup.status(stale), None);
        assert!(sup.output_tail(stale, 10).is_empty());
        sup.record_output(stale, "lost");
        assert_eq!(sup.spawned(stale, 7, Instant::now(), &log), []);
        assert_eq!(sup.spawn_failed(stale, "gone", &log), []);
        assert_eq!(sup.readiness(stale, 1, Ok(()), &log), []);
        assert_eq!(sup.timer(stale, 1, TimerKind::Restart, &log), []);
        assert!(log.lines().is_empty());
        let known = sup.id("containerd").unwrap();
        assert_eq!(sup.name(known), Some("containerd"));
    }

    #[test]
    fn the_backoff_doubles_to_its_cap() {
        let b = Backoff::DEFAULT;
        let delays: Vec<u64> = (1..=8).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        // No overflow, however many failures.
        assert_eq!(b.delay(u32::MAX), b.cap);
    }

    #[test]
    fn dependents_start_when_their_dependency_is_ready() {
        let log = MemoryLog::default();
        let mut sup = node();
        let t0 = Instant::now();
        let actions = sup.start_autostart(&log);
        // containerd and machined now; kubelet waits; etcd is not autostarted.
        assert_eq!(
            actions,
            [Action::Spawn(ServiceId(0)), Action::Spawn(ServiceId(3))]
        );
        assert_eq!(sup.state(ServiceId(2)), Some(State::Waiting));
        assert_eq!(sup.state(ServiceId(1)), Some(State::Stopped));
        let check = sup.spawned(ServiceId(0), 100, t0, &log);
        assert!(matches!(
            check.as_slice(),
            [Action::CheckReady {
                service: ServiceId(0),
                generation: 2,
                ..
            }]
        ));
        assert_eq!(sup.spawned(ServiceId(3), 101, t0, &log), []);
        assert_eq!(sup.state(ServiceId(3)), Some(State::Ready));
        // A stale readiness answer (an older run) changes nothing.
        assert_eq!(sup.readiness(ServiceId(0), 1, Ok(()), &log), []);
        assert_eq!(sup.state(ServiceId(2)), Some(State::Waiting));
        assert_eq!(
            sup.readiness(ServiceId(0), 2, Ok(()), &log),
            [Action::Spawn(ServiceId(2))]
        );
        assert_eq!(
            log.lines(),
            [
                "keelson-init: service kubelet waiting for containerd",
                "keelson-init: service containerd started (pid 100)",
                "keelson-init: service machined started (pid 101)",
                "keelson-init: service machined ready",
                "keelson-init: service containerd ready",
            ]
        );
    }

    /// containerd, then machined ordered after it (as the catalog has them).
    fn ordered() -> Supervisor {
        let mut machined = spec("machined", &[], Readiness::Started);
        machined.start_after = vec!["containerd".into()];
        Supervisor::new(
            vec![
                spec("containerd", &[], sock("/run/containerd/containerd.sock")),
                machined,
            ],
            Backoff::DEFAULT,
        )
    }

    fn limit_timer(actions: &[Action]) -> u64 {
        match actions {
            [
                Action::Timer {
                    service: ServiceId(1),
                    generation,
                    after,
                    kind: TimerKind::StartAfterLimit,
                },
            ] if *after == START_AFTER_LIMIT => *generation,
            other => panic!("expected the start-after limit timer, got {other:?}"),
        }
    }

    #[test]
    fn a_service_ordered_after_another_starts_once_that_one_is_ready() {
        let log = MemoryLog::default();
        let mut sup = ordered();
        let t0 = Instant::now();
        let actions = sup.start_autostart(&log);
        assert_eq!(actions[0], Action::Spawn(ServiceId(0)));
        let limit = limit_timer(&actions[1..]);
        assert_eq!(sup.state(ServiceId(1)), Some(State::Waiting));
        assert_eq!(sup.spawned(ServiceId(0), 100, t0, &log).len(), 1);
        assert_eq!(sup.state(ServiceId(1)), Some(State::Waiting));
        assert_eq!(
            sup.readiness(ServiceId(0), 2, Ok(()), &log),
            [Action::Spawn(ServiceId(1))]
        );
        assert_eq!(sup.spawned(ServiceId(1), 101, t0, &log), []);
        // The limit timer of that wait is stale now.
        assert_eq!(
            sup.timer(ServiceId(1), limit, TimerKind::StartAfterLimit, &log),
            []
        );
        assert_eq!(
            log.lines(),
            [
                "keelson-init: service machined waiting for containerd",
                "keelson-init: service containerd started (pid 100)",
                "keelson-init: service containerd ready",
                "keelson-init: service machined started (pid 101)",
                "keelson-init: service machined ready",
            ]
        );
        // Once it has run, its restarts do not wait, even while containerd restarts.
        let crash = ExitInfo {
            code: Some(1),
            signal: None,
        };
        let restart_gen = |actions: Option<Vec<Action>>| match actions.as_deref() {
            Some([Action::Timer { generation, .. }]) => *generation,
            other => panic!("expected a restart timer, got {other:?}"),
        };
        let c = restart_gen(sup.exited(100, crash, t0, &log));
        let m = restart_gen(sup.exited(101, crash, t0, &log));
        assert_eq!(
            sup.timer(ServiceId(0), c, TimerKind::Restart, &log),
            [Action::Spawn(ServiceId(0))]
        );
        assert_eq!(sup.state(ServiceId(0)), Some(State::Starting));
        assert_eq!(
            sup.timer(ServiceId(1), m, TimerKind::Restart, &log),
            [Action::Spawn(ServiceId(1))]
        );
    }

    #[test]
    fn a_service_ordered_after_a_failing_one_does_not_wait_for_it() {
        let log = MemoryLog::default();
        let mut sup = ordered();
        let actions = sup.start_autostart(&log);
        limit_timer(&actions[1..]);
        // containerd cannot even be spawned: it backs off, and machined goes.
        let actions = sup.spawn_failed(ServiceId(0), "/usr/bin/containerd does not exist", &log);
        assert!(matches!(
            actions.as_slice(),
            [
                Action::Timer {
                    service: ServiceId(0),
                    kind: TimerKind::Restart,
                    ..
                },
                Action::Spawn(ServiceId(1))
            ]
        ));
    }

    #[test]
    fn a_service_ordered_after_a_slow_one_waits_no_longer_than_the_limit() {
        let log = MemoryLog::default();
        let mut sup = ordered();
        let t0 = Instant::now();
        let actions = sup.start_autostart(&log);
        let limit = limit_timer(&actions[1..]);
        sup.spawned(ServiceId(0), 100, t0, &log);
        assert_eq!(
            sup.timer(ServiceId(1), limit, TimerKind::StartAfterLimit, &log),
            [Action::Spawn(ServiceId(1))]
        );
        assert_eq!(
            log.lines().last().map(String::as_str),
            Some(
                "keelson-init: service machined: containerd not ready after 10 s; not waiting any longer"
            )
        );
        // Without containerd registered (maintenance mode), it starts at once.
        let mut alone = spec("machined", &[], Readiness::Started);
        alone.start_after = vec!["containerd".into()];
        let mut sup = Supervisor::new(vec![alone], Backoff::DEFAULT);
        assert_eq!(sup.start_autostart(&log), [Action::Spawn(ServiceId(0))]);
    }

    #[test]
    fn a_crashing_service_backs_off_to_the_cap_and_a_long_run_resets_it() {
        let log = MemoryLog::default();
        let mut sup = node();
        let mut now = Instant::now();
        let mut delays = Vec::new();
        sup.start_autostart(&log);
        let mut pid = 200;
        sup.spawned(ServiceId(3), pid, now, &log);
        for _ in 0..7 {
            now += Duration::from_millis(10);
            let actions = sup.exited(
                pid,
                ExitInfo {
                    code: Some(1),
                    signal: None,
                },
                now,
                &log,
            );
            let Some(
                [
                    Action::Timer {
                        generation,
                        after,
                        kind: TimerKind::Restart,
                        ..
                    },
                ],
            ) = actions.as_deref()
            else {
                panic!("expected a restart timer, got {actions:?}");
            };
            delays.push(after.as_secs());
            assert_eq!(sup.state(ServiceId(3)), Some(State::Backoff));
            assert_eq!(
                sup.timer(ServiceId(3), *generation, TimerKind::Restart, &log),
                [Action::Spawn(ServiceId(3))]
            );
            pid += 1;
            sup.spawned(ServiceId(3), pid, now, &log);
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(sup.statuses()[3].restarts, 7);
        // A run longer than reset_after starts the count again.
        now += Duration::from_secs(61);
        let actions = sup.exited(
            pid,
            ExitInfo {
                code: None,
                signal: Some(9),
            },
            now,
            &log,
        );
        assert!(matches!(
            actions.as_deref(),
            Some([Action::Timer { after, .. }]) if *after == Duration::from_secs(1)
        ));
        assert!(log.lines().contains(
            &"keelson-init: service machined killed by signal 9 (SIGKILL) after 61.0 s".into()
        ));
        // An unknown pid is an orphan.
        assert_eq!(
            sup.exited(
                4242,
                ExitInfo {
                    code: Some(0),
                    signal: None
                },
                now,
                &log
            ),
            None
        );
    }

    #[test]
    fn a_failed_readiness_check_stops_and_backs_off() {
        let log = MemoryLog::default();
        let mut sup = node();
        let now = Instant::now();
        sup.start_autostart(&log);
        sup.spawned(ServiceId(0), 300, now, &log);
        let actions = sup.readiness(ServiceId(0), 2, Err("no answer after 60 s".into()), &log);
        assert_eq!(
            actions[0],
            Action::Signal {
                service: ServiceId(0),
                pid: 300,
                signal: StopSignal::Term
            }
        );
        let actions = sup.exited(
            300,
            ExitInfo {
                code: None,
                signal: Some(15),
            },
            now,
            &log,
        );
        assert!(matches!(
            actions.as_deref(),
            Some([Action::Timer {
                kind: TimerKind::Restart,
                ..
            }])
        ));
        assert_eq!(sup.state(ServiceId(0)), Some(State::Backoff));
    }

    #[test]
    fn stop_term_then_kill_and_restart_requests() {
        let log = MemoryLog::default();
        let mut sup = node();
        let now = Instant::now();
        sup.start_autostart(&log);
        sup.spawned(ServiceId(3), 400, now, &log);
        let actions = sup.stop("machined", &log).unwrap_or_default();
        let [
            Action::Signal {
                signal: StopSignal::Term,
                pid: 400,
                ..
            },
            Action::Timer {
                generation,
                kind: TimerKind::Kill,
                after,
                ..
            },
        ] = actions.as_slice()
        else {
            panic!("expected SIGTERM and a kill timer, got {actions:?}");
        };
        assert_eq!(*after, Duration::from_secs(10));
        assert_eq!(
            sup.timer(ServiceId(3), *generation, TimerKind::Kill, &log),
            [Action::Signal {
                service: ServiceId(3),
                pid: 400,
                signal: StopSignal::Kill
            }]
        );
        assert_eq!(
            sup.exited(
                400,
                ExitInfo {
                    code: None,
                    signal: Some(9)
                },
                now,
                &log
            ),
            Some(vec![])
        );
        assert_eq!(sup.state(ServiceId(3)), Some(State::Stopped));
        // Restart of a stopped service starts it; of a running one, stops then starts.
        assert_eq!(
            sup.restart("machined", &log),
            Ok(vec![Action::Spawn(ServiceId(3))])
        );
        sup.spawned(ServiceId(3), 401, now, &log);
        assert_eq!(sup.restart("machined", &log).map(|a| a.len()), Ok(2));
        assert_eq!(
            sup.exited(
                401,
                ExitInfo {
                    code: Some(0),
                    signal: None
                },
                now,
                &log
            ),
            Some(vec![Action::Spawn(ServiceId(3))])
        );
        assert_eq!(
            sup.start("nope", &log),
            Err(Error::Unknown {
                name: "nope".into(),
                known: "containerd, etcd, kubelet, machined".into()
            })
        );
    }

    #[test]
    fn shutdown_stops_dependents_first() {
        let log = MemoryLog::default();
        let mut sup = node();
        let now = Instant::now();
        sup.start_autostart(&log);
        sup.spawned(ServiceId(0), 500, now, &log);
        sup.spawned(ServiceId(3), 503, now, &log);
        sup.readiness(ServiceId(0), 2, Ok(()), &log);
        sup.spawned(ServiceId(2), 502, now, &log);
        let signalled = |actions: &[Action]| -> Vec<u32> {
            actions
                .iter()
                .filter_map(|a| match a {
                    Action::Signal {
                        pid,
                        signal: StopSignal::Term,
                        ..
                    } => Some(*pid),
                    _ => None,
                })
                .collect()
        };
        // kubelet and machined first; containerd waits for the kubelet.
        let first = sup.shutdown(&log);
        assert_eq!(signalled(&first), [502, 503]);
        assert!(!sup.all_stopped());
        let after_machined = sup.exited(
            503,
            ExitInfo {
                code: Some(0),
                signal: None,
            },
            now,
            &log,
        );
        assert_eq!(after_machined.map(|a| signalled(&a)), Some(vec![]));
        let after_kubelet = sup.exited(
            502,
            ExitInfo {
                code: Some(0),
                signal: None,
            },
            now,
            &log,
        );
        assert_eq!(after_kubelet.map(|a| signalled(&a)), Some(vec![500]));
        // Nothing restarts during a shutdown, and nothing may be started.
        assert_eq!(sup.start("machined", &log), Err(Error::ShuttingDown));
        sup.exited(
            500,
            ExitInfo {
                code: Some(0),
                signal: None,
            },
            now,
            &log,
        );
        assert!(sup.all_stopped());
    }
}
