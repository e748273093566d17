//! Stage 2's main loop: each [`Event`] becomes an [`Input`] of the node's lifecycle
//! ([`crate::lifecycle`]), and the [`Action`]s of each step are carried out here, in
//! order. What is not the lifecycle's (a service's output, the reaper, the network's
//! resolvers and hostname, the control socket's service requests) is handled here
//! directly.

use std::path::Path;
use std::time::{Duration, Instant};

use keelson_configs::layout;
use keelson_netconf::{NetEvent, resolv};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio::sync::oneshot;

use crate::bootlog::Kept;
use crate::config_source::{self, Accepted, Source};
use crate::control::{self, Call};
use crate::drivers::{DISK_MODULES, NETWORK_MODULES, POWER_BUTTON_MODULES};
use crate::etc_files;
use crate::events::{Event, EventTx, TimerEvent};
use crate::fault;
use crate::kmods;
use crate::lifecycle::{Action, By, Input, Phase};
use crate::modules;
use crate::network;
use crate::power_button;
use crate::preflight;
use crate::sender::Sender;
use crate::services;
use crate::shutdown::{self, ShutdownKind};
use crate::signals::{self, SignalKind};
use crate::supervisor::reaper::ReapScope;
use crate::supervisor::runner::{Runner, ServiceEvent};
use crate::supervisor::{Backoff, State, Supervisor};
use crate::syscalls::{Syscalls, errno_name};
use crate::watchdog::{self, Watchdog};

use super::IDLE_REPORT_AFTER;
use super::boot::Boot;

/// Stage 2's state, owned by the main loop.
pub(super) struct Node<'a, K: Kept> {
    pub(super) sys: &'a dyn Syscalls,
    pub(super) log: &'a K,
    pub(super) events: EventTx,
    /// The services; `None` once the shutdown's deadline has given up on them.
    pub(super) runner: Option<Runner>,
    /// What the boot found and made before the loop.
    pub(super) boot: Boot,
    /// Where the node is in its lifecycle: the config it runs, the wait for one, a
    /// shutdown.
    pub(super) phase: Phase<Accepted>,
    /// When the loop's node was made (the boot-complete and idle lines count from it).
    pub(super) started: Instant,
    /// Stops the running network engine.
    pub(super) network: Option<oneshot::Sender<()>>,
    /// Closes the control socket.
    pub(super) control_socket: Option<tokio::task::AbortHandle>,
    /// machined's pid as the control socket reads it: the one peer it serves.
    machined_pid: control::MachinedPid,
    /// The span of the lifecycle's current phase: replaced when the phase changes, so
    /// the log says how long each phase took (`phase starting_containerd took 1234 ms`).
    phase_span: tracing::Span,
    /// The watchdog stage 1 armed, pinged while the loop waits (`watchdog`).
    pub(super) watchdog: Option<Watchdog>,
}

/// The span of a lifecycle phase (its name is the phase's).
fn phase_span<C>(phase: &Phase<C>) -> tracing::Span {
    match phase {
        Phase::Booting => tracing::info_span!("booting"),
        Phase::AwaitingConfig(_) => tracing::info_span!("awaiting_config"),
        Phase::StartingContainerd { .. } => tracing::info_span!("starting_containerd"),
        Phase::StartingServices { .. } => tracing::info_span!("starting_services"),
        Phase::Up { .. } => tracing::info_span!("up"),
        Phase::ShutdownAsked { .. } => tracing::info_span!("shutdown_asked"),
        Phase::ShuttingDown { .. } => tracing::info_span!("shutting_down"),
        Phase::Down { .. } => tracing::info_span!("down"),
    }
}

impl<'a, K: Kept> Node<'a, K> {
    /// The node before its main loop.
    pub(super) fn new(
        sys: &'a dyn Syscalls,
        log: &'a K,
        events: EventTx,
        boot: Boot,
    ) -> Node<'a, K> {
        Node {
            sys,
            log,
            events,
            runner: None,
            boot,
            phase: Phase::Booting,
            started: Instant::now(),
            network: None,
            control_socket: None,
            machined_pid: control::MachinedPid::default(),
            phase_span: phase_span(&Phase::<Accepted>::Booting),
            watchdog: None,
        }
    }

    pub(super) fn after(&self, delay: Duration, timer: TimerEvent) {
        let tx = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Event::Timer(timer));
        });
    }

    fn url(&self) -> Option<String> {
        config_source::cmdline_url(&self.boot.cmdline)
    }

    fn fetch_url(&self, delay: Duration) {
        let Some(url) = self.url() else { return };
        let pin = config_source::cmdline_sha256(&self.boot.cmdline);
        let trust = config_source::cmdline_trust(&self.boot.cmdline);
        config_source::fetch_later(url, pin, trust, delay, Sender::new(self.events.clone()));
    }

    /// The loop: events until a shutdown has stopped every service. How the machine
    /// goes down, and whether it is a reset.
    pub(super) async fn main_loop(
        &mut self,
        mut rx: UnboundedReceiver<Event>,
    ) -> (ShutdownKind, bool) {
        for (signal, e) in
            signals::forward_signals(&Sender::new(self.events.clone()), &SignalKind::ALL)
        {
            self.log
                .line(&format!("cannot handle {}: {e}", signal.name()));
        }
        match control::serve(
            self.sys,
            Path::new(control::SOCKET),
            Sender::new(self.events.clone()),
            control::AllowedPeer::machined(self.machined_pid.clone()),
        ) {
            Ok(handle) => self.control_socket = Some(handle),
            Err(e) => self.log.line(&format!(
                "control socket {} unavailable: {e}",
                control::SOCKET
            )),
        }
        self.runner = Some(Runner::new(
            Supervisor::new(Vec::new(), Backoff::DEFAULT),
            Sender::new(self.events.clone()),
            ReapScope::Any,
        ));
        self.input(Input::Start);
        self.arm_health_deadline();
        loop {
            // The one wait of the loop: whatever started or reaped machined is done.
            self.publish_machined_pid();
            let watchdog = self.watchdog.as_mut();
            let Some(event) = watchdog::next_event(&mut rx, watchdog, self.log).await else {
                // Every sender is gone (cannot happen: we hold one); go down cleanly.
                return (ShutdownKind::Reboot, false);
            };
            self.handle(event);
            if let Some(down) = self.settle() {
                return down;
            }
        }
    }

    /// After each event: tell the lifecycle once no service runs; how the machine goes
    /// down (and whether it is a reset) once it is down.
    fn settle(&mut self) -> Option<(ShutdownKind, bool)> {
        self.assess_health();
        if self
            .runner
            .as_ref()
            .is_none_or(|r| r.supervisor.all_stopped())
        {
            self.input(Input::AllServicesStopped);
        }
        match self.phase {
            Phase::Down { kind, reset } => Some((kind, reset)),
            _ => None,
        }
    }

    /// Tell the control socket which pid machined runs as now, if it runs.
    fn publish_machined_pid(&self) {
        let pid = self.runner.as_ref().and_then(|r| {
            let id = r.supervisor.id(control::MACHINED_SERVICE).ok()?;
            r.supervisor.status(id)?.pid
        });
        self.machined_pid.set(pid);
    }

    pub(super) fn runner(&mut self) -> &mut Runner {
        // Created first thing in the main loop; `Option` only for construction order.
        self.runner.get_or_insert_with(|| {
            Runner::new(
                Supervisor::new(Vec::new(), Backoff::DEFAULT),
                Sender::new(unbounded_channel::<Event>().0),
                ReapScope::Any,
            )
        })
    }

    /// The one match over every event.
    fn handle(&mut self, event: Event) {
        let log = self.log;
        match event {
            Event::Signal(SignalKind::Child) => {
                let sys = self.sys;
                for (pid, exit) in self.runner().reap(sys, log) {
                    log.line(&format!("reaped pid {pid} ({exit})"));
                }
                self.services_changed();
            }
            Event::Signal(SignalKind::User1) => {
                for s in self.runner().supervisor.statuses() {
                    log.line(&format!(
                        "service {} {} pid={} restarts={}",
                        s.name,
                        s.state,
                        s.pid.map_or("-".into(), |p| p.to_string()),
                        s.restarts
                    ));
                }
            }
            Event::Signal(signal) => {
                if let Some(kind) = signal.shutdown() {
                    let by = By::Signal(signal.name());
                    self.input(Input::ShutdownRequested { kind, by });
                }
            }
            Event::Service(ServiceEvent::Output { service, line }) => {
                let sup = &mut self.runner().supervisor;
                let name = sup.name(service).unwrap_or("service");
                log.service_line(&format!("{name}: {line}"));
                sup.record_output(service, &line);
            }
            Event::Service(event) => {
                self.runner().handle(event, log);
                self.services_changed();
            }
            Event::Timer(timer) => {
                self.input(match timer {
                    TimerEvent::ConfigReminder => Input::ReminderTimer,
                    TimerEvent::Shutdown(_) => Input::ShutdownTimer,
                    TimerEvent::ShutdownDeadline => Input::ShutdownDeadline,
                    TimerEvent::LateDrivers => Input::LateDriversTimer,
                    TimerEvent::IdleReport => Input::IdleReportTimer,
                    // `settle` assesses the boot after every event, this one included.
                    TimerEvent::HealthDeadline => return,
                });
            }
            Event::PowerButton(power_button::Pressed(device)) => {
                let by = By::PowerButton(device);
                let kind = ShutdownKind::PowerOff;
                self.input(Input::ShutdownRequested { kind, by });
            }
            Event::Network(event) => self.network_event(event),
            Event::ConfigFetched(config_source::Fetched { url, result }) => {
                self.input(match result {
                    Ok(bytes) => Input::UrlFetched { url, bytes },
                    Err(why) => Input::UrlFailed { url, why },
                });
            }
            Event::Prefetched(outcome) => log.line(&outcome.to_string()),
            Event::Control(Call { request, reply }) => {
                let answer = self.control(request);
                let _ = reply.send(answer);
            }
        }
    }

    /// Step the lifecycle and carry out its actions; the control-socket answer among
    /// them, if any.
    pub(super) fn input(&mut self, input: Input<Accepted>) -> Option<Result<String, String>> {
        let phase = std::mem::replace(&mut self.phase, Phase::Booting);
        let before = std::mem::discriminant(&phase);
        let (next, actions) = phase.step(input);
        if std::mem::discriminant(&next) != before {
            // The old phase's span closes here, with its duration.
            self.phase_span = phase_span(&next);
        }
        self.phase = next;
        let mut reply = None;
        for action in actions {
            match action {
                Action::Reply(answer) => reply = Some(answer),
                action => self.act(action),
            }
        }
        reply
    }

    /// Carry out one action of the lifecycle.
    fn act(&mut self, action: Action) {
        let log = self.log;
        match action {
            Action::FindLocalConfig => {
                let found = config_source::find_local(
                    self.sys,
                    log,
                    Path::new("/sys"),
                    self.boot.modules.as_ref(),
                );
                let url = self.url().is_some();
                self.input(found.map_or(Input::NoLocalConfig { url }, Input::ConfigFound));
            }
            Action::Configure { ends_maintenance } => self.configure(ends_maintenance),
            Action::ArmLateDrivers => {
                self.after(super::NETWORK_MODULES_AFTER, TimerEvent::LateDrivers);
            }
            Action::LoadLateDrivers => self.load_late_drivers(),
            Action::FormatNewState => self.finish_state(),
            Action::KeepMachineId => self.keep_machine_id(),
            Action::SayWaiting => {
                for line in self.boot.waiting_lines(self.url().as_deref()) {
                    log.line(&line);
                }
            }
            Action::ArmReminder => self.after(config_source::REMINDER, TimerEvent::ConfigReminder),
            Action::StartMaintenance => {
                let serving = self.start_maintenance();
                self.input(Input::MaintenanceStarted { serving });
            }
            Action::StartDhcp => {
                // The URL and the API need an address: DHCP on every link until a config
                // says more.
                let net = network::dhcp_everywhere(self.sys, Path::new("/sys"));
                let events = Sender::new(self.events.clone());
                self.network = Some(network::start(&net, None, events));
            }
            Action::FetchUrl(delay) => self.fetch_url(delay),
            Action::JudgeUrlConfig { url, bytes } => {
                let accepted = config_source::accept(Source::Url(url), bytes, log);
                self.input(accepted.map_or(Input::UrlConfigRefused, Input::ConfigFound));
            }
            Action::Preflight => self.preflight(),
            Action::ReportBootComplete => self.report_boot_complete(),
            Action::ArmIdleReport => self.after(IDLE_REPORT_AFTER, TimerEvent::IdleReport),
            Action::ReportIdle => self.report_idle(),
            Action::ArmShutdown => {
                if let Some(kind) = self.phase.going_down() {
                    self.after(control::SHUTDOWN_DELAY, TimerEvent::Shutdown(kind));
                }
            }
            Action::StopServices => {
                let runner = self.runner();
                let actions = runner.supervisor.shutdown(log);
                runner.apply(actions, log);
            }
            Action::ArmDeadline => {
                self.after(shutdown::SERVICES_DEADLINE, TimerEvent::ShutdownDeadline);
            }
            // The kill of every process follows.
            Action::ForgetServices => self.runner = None,
            // The main loop ends once the phase is down.
            Action::Finish { .. } => {}
            Action::Say(line) => log.line(&line),
            Action::Reply(_) => {}
        }
    }

    /// The power button's modules, then its watch.
    fn load_power_button(&self) {
        if let Some(index) = &self.boot.modules {
            kmods::load(self.sys, self.log, index, POWER_BUTTON_MODULES);
        }
        for (device, result) in power_button::watch_all(self.sys, &Sender::new(self.events.clone()))
        {
            match result {
                Ok(()) => self.log.line(&format!(
                    "power button {}: a press powers off",
                    device.display()
                )),
                Err(e) => self.log.line(&format!(
                    "power button {} not watched: {e}",
                    device.display()
                )),
            }
        }
    }

    /// The power button, the network drivers and the disk drivers stage 1 left (the
    /// lifecycle asks once).
    fn load_late_drivers(&mut self) {
        self.load_power_button();
        if let Some(index) = &self.boot.modules {
            kmods::load(self.sys, self.log, index, NETWORK_MODULES);
            kmods::load_with(
                self.sys,
                self.log,
                index,
                DISK_MODULES,
                modules::ASYNC_PROBE,
            );
        }
    }

    /// Start machined alone (the lifecycle asks once): with no config in STATE it serves
    /// maintenance mode. Whether it does.
    fn start_maintenance(&mut self) -> bool {
        let log = self.log;
        if self.boot.state_dir.is_none() {
            log.line("maintenance mode unavailable: STATE is not mounted, so a config pushed over the API could not be kept");
            return false;
        }
        if !self.sys.exists(Path::new(services::MACHINED))
            || fault::hides_machined(&self.boot.cmdline)
        {
            log.line(&format!(
                "maintenance mode unavailable: {} is not in this image",
                services::MACHINED
            ));
            return false;
        }
        log.line(&format!(
            "maintenance mode: machined serves version and apply-config on port {} (machinectl --insecure)",
            layout::API_PORT
        ));
        let runner = self.runner();
        runner.supervisor.add(vec![services::machined()]);
        let actions = runner.supervisor.start_autostart(log);
        runner.apply(actions, log);
        true
    }

    fn network_event(&mut self, event: NetEvent) {
        let log = self.log;
        log.line(&event.to_string());
        if network::brings_reachability(&event) {
            self.input(Input::Reachable);
        }
        match event {
            NetEvent::Resolvers {
                nameservers,
                search,
            } if self.boot.etc_ok => {
                let entry =
                    etc_files::Entry::file("resolv.conf", resolv::render(&nameservers, &search));
                if let Err(e) = etc_files::write(self.sys, Path::new("/etc"), &[entry]) {
                    log.line(&format!("/etc/resolv.conf not written: {e}"));
                }
            }
            NetEvent::Hostname { name } => {
                let configured = self
                    .phase
                    .config()
                    .is_some_and(|c| c.config.machine.hostname.is_some());
                if !configured {
                    self.set_hostname(&name);
                }
            }
            _ => {}
        }
    }

    fn set_hostname(&self, name: &str) {
        let log = self.log;
        match self.sys.sethostname(name) {
            Ok(()) => log.line(&format!("hostname {name}")),
            Err(e) => log.line(&format!("hostname {name} not set: {}", errno_name(&e))),
        }
        if self.boot.etc_ok {
            let entries = [
                etc_files::Entry::file("hostname", format!("{name}\n")),
                etc_files::Entry::file("hosts", resolv::hosts(name, &[])),
            ];
            if let Err(e) = etc_files::write(self.sys, Path::new("/etc"), &entries) {
                log.line(&format!("/etc/hostname not written: {e}"));
            }
        }
    }

    /// After a service changed state: tell the lifecycle whether containerd and every
    /// autostart service are ready.
    pub(super) fn services_changed(&mut self) {
        let Some(runner) = &self.runner else { return };
        let statuses = runner.supervisor.statuses();
        let containerd_ready = statuses
            .iter()
            .any(|s| s.name == services::CONTAINERD && s.state == State::Ready);
        let all_ready = !statuses.is_empty()
            && statuses
                .iter()
                .filter(|s| s.autostart)
                .all(|s| s.state == State::Ready);
        self.input(Input::ServicesChanged {
            containerd_ready,
            all_ready,
        });
    }

    /// The preflight checks, once containerd is ready.
    fn preflight(&self) {
        let Some(config) = self.phase.config() else {
            return;
        };
        let report = preflight::run(
            self.sys,
            Path::new("/"),
            &preflight::Options {
                role: config.config.machine.kind,
                swap: config.config.machine.swap,
                containerd_ready: true,
            },
        );
        for check in &report.checks {
            self.log.line(&check.to_string());
        }
        self.log.line(&report.summary());
    }

    fn report_boot_complete(&self) {
        let Some(runner) = &self.runner else { return };
        let statuses = runner.supervisor.statuses();
        self.log.line(&format!(
            "boot complete: {} ready {:.1} s after stage 2 started",
            statuses
                .iter()
                .filter(|s| s.state == State::Ready)
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            self.started.elapsed().as_secs_f64()
        ));
    }

    fn report_idle(&self) {
        let rss = self
            .sys
            .read_file(Path::new("/proc/self/status"))
            .ok()
            .and_then(|b| control::vm_rss_kib(&String::from_utf8_lossy(&b)));
        // `pid1 rss_kb=N` is what `cargo xtask bench boot` reads.
        let services = self
            .runner
            .as_ref()
            .map_or(0, |r| r.supervisor.statuses().len());
        self.log.line(&format!(
            "idle pid1 rss_kb={} services={services} uptime {:.1} s",
            rss.map_or("?".into(), |r| r.to_string()),
            self.started.elapsed().as_secs_f64()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootlog::BootLog;
    use crate::console::memory::MemoryLog;
    use crate::control::Answer;
    use crate::lifecycle::{Awaiting, Maintenance, UrlFetch};
    use crate::stage2::reset::Wipe;
    use crate::syscalls::fake::Fake;
    use keelson_node_protocol::control::{ConfigInstalled, Poweroff, Reset, decode};

    /// A node waiting for a config, with no service, whose reset would wipe STATE and
    /// EPHEMERAL.
    fn waiting_node<'a>(
        sys: &'a Fake,
        log: &'a BootLog<&'a MemoryLog>,
    ) -> Node<'a, BootLog<&'a MemoryLog>> {
        let boot = Boot {
            wipe: vec![
                Wipe {
                    name: "STATE",
                    device: "/dev/vda4".into(),
                    target: "/system/state".into(),
                },
                Wipe {
                    name: "EPHEMERAL",
                    device: "/dev/vda5".into(),
                    target: "/var".into(),
                },
            ],
            ..Boot::fixture()
        };
        let mut node = Node::new(sys, log, unbounded_channel().0, boot);
        node.runner = Some(Runner::new(
            Supervisor::new(Vec::new(), Backoff::DEFAULT),
            Sender::from_fn(|_| Ok(())),
            ReapScope::Own,
        ));
        node.phase = Phase::AwaitingConfig(Awaiting {
            maintenance: Maintenance::Unavailable,
            dhcp: false,
            url: UrlFetch::None,
        });
        node
    }

    /// What an answer of the `Said` kind says, or why it refused.
    fn answer(answer: &Answer) -> Result<String, String> {
        match decode::<Reset>(answer.line()) {
            Ok(Ok(said)) => Ok(said.message),
            Ok(Err(refusal)) => Err(refusal.0),
            Err(e) => Err(format!("not an answer: {e}")),
        }
    }

    /// Run `check` on a [`waiting_node`] inside a runtime and `LocalSet` (the node's
    /// timers spawn tasks), with the memory log its lines go to.
    fn on_a_waiting_node(
        check: impl for<'a> FnOnce(&mut Node<'a, BootLog<&'a MemoryLog>>, &'a MemoryLog),
    ) -> std::io::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async {
            let (sys, memory) = (Fake::new(), MemoryLog::default());
            let log = BootLog::new(&memory);
            let mut node = waiting_node(&sys, &log);
            check(&mut node, &memory);
        });
        Ok(())
    }

    #[test]
    fn the_control_socket_learns_machined_pid_as_it_starts_and_ends() -> std::io::Result<()> {
        on_a_waiting_node(|node, _| {
            node.publish_machined_pid();
            assert_eq!(node.machined_pid.get(), None);
            let log = node.log;
            let sup = &mut node.runner().supervisor;
            sup.add(vec![services::machined()]);
            let Ok(id) = sup.id(control::MACHINED_SERVICE) else {
                panic!("machined is not a service");
            };
            sup.spawned(id, 4242, Instant::now(), log);
            node.publish_machined_pid();
            assert_eq!(node.machined_pid.get(), Some(4242));
            let killed = crate::supervisor::ExitInfo {
                code: None,
                signal: Some(9),
            };
            let sup = &mut node.runner().supervisor;
            sup.exited(4242, killed, Instant::now(), log);
            node.publish_machined_pid();
            assert_eq!(node.machined_pid.get(), None);
        })
    }

    #[test]
    fn a_reset_is_answered_begun_by_its_timer_and_ends_the_loop() -> std::io::Result<()> {
        on_a_waiting_node(|node, memory| {
            let reset = node.control(Reset {}.into());
            assert_eq!(
                answer(&reset),
                Ok("reset: stopping services, then wiping EPHEMERAL and STATE once both are unmounted (neither if one stays mounted: `machinectl health` says why once the node is back), then rebooting to wait for a config".into())
            );
            let again = node.control(Poweroff {}.into());
            assert_eq!(answer(&again), Err("a reboot is already under way".into()));
            // Until its timer, nothing stops.
            assert_eq!(node.settle(), None);
            node.handle(Event::Timer(TimerEvent::Shutdown(ShutdownKind::Reboot)));
            assert_eq!(node.settle(), Some((ShutdownKind::Reboot, true)));
            assert_eq!(
                memory.lines(),
                [
                    "keelson-init: reset asked through the control socket: it begins in 1 s",
                    "keelson-init: reboot requested (reset through the control socket): stopping services",
                ]
            );
        })
    }

    #[test]
    fn a_signal_while_waiting_stops_at_once_and_a_second_is_said_to_wait() -> std::io::Result<()> {
        on_a_waiting_node(|node, memory| {
            node.handle(Event::Signal(SignalKind::Power));
            node.handle(Event::Signal(SignalKind::Terminate));
            let installed = node.control(ConfigInstalled {}.into());
            assert_eq!(
                answer(&installed),
                Err("the node is going down: the installed config is read at its next boot".into())
            );
            assert_eq!(node.settle(), Some((ShutdownKind::PowerOff, false)));
            assert_eq!(
                memory.lines(),
                [
                    "keelson-init: power off requested (SIGPWR): stopping services",
                    "keelson-init: SIGTERM: a power off is already under way",
                ]
            );
        })
    }

    #[test]
    fn without_state_the_node_waits_without_maintenance_mode_or_dhcp() -> std::io::Result<()> {
        on_a_waiting_node(|node, memory| {
            node.phase = Phase::Booting;
            node.input(Input::NoLocalConfig { url: false });
            let awaiting = Awaiting {
                maintenance: Maintenance::Unavailable,
                dhcp: false,
                url: UrlFetch::None,
            };
            assert!(matches!(node.phase, Phase::AwaitingConfig(a) if a == awaiting));
            assert!(node.network.is_none());
            // Not maintenance mode's `apply-config --insecure`: it is not served.
            let mut expected: Vec<String> = node
                .boot
                .waiting_lines(None)
                .iter()
                .map(|l| format!("keelson-init: {l}"))
                .collect();
            assert!(
                !expected
                    .iter()
                    .any(|l| l.contains("machinectl apply-config"))
            );
            expected.push(
                "keelson-init: maintenance mode unavailable: STATE is not mounted, so a config pushed over the API could not be kept".into(),
            );
            assert_eq!(memory.lines(), expected);
        })
    }
}
