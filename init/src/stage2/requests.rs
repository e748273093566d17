//! The control socket's requests (`crate::control`): the services' (list, start, stop,
//! restart, logs, kill), the node's (info, boot log), and those that change it: a live
//! `apply` (`live`: judged, planned against the node, applied or refused whole; the
//! network engine restarted here), `config-installed` (maintenance mode's config), and
//! the shutdowns, which the lifecycle answers and begins
//! [`control::SHUTDOWN_DELAY`] later.

use std::path::Path;

use keelson_netconf::resolv;
use keelson_node_protocol::control::{Applied, Done, Lines, NodeInfo, Said, Services};
use keelson_node_protocol::state as state_layout;

use crate::bootlog::Kept;
use crate::config_source::{self, Accepted, Source};
use crate::control::{self, Answer, Info, Refusal, Request};
use crate::etc_files;
use crate::lifecycle::{Input, Phase};
use crate::live;
use crate::network;
use crate::sender::Sender;
use crate::shutdown::ShutdownKind;
use crate::state;
use crate::syscalls::errno_name;

use super::node::Node;

impl<K: Kept> Node<'_, K> {
    /// Answer one control request with its own answer type.
    pub(super) fn control(&mut self, request: Request) -> Answer {
        let log = self.log;
        match request {
            Request::List(call) => {
                let services = self.runner().supervisor.statuses();
                Answer::to(&call, Ok(Services { services }))
            }
            Request::Start(call) => {
                let started = self.runner().supervisor.start(&call.service, log);
                Answer::to(&call, self.service_changed(started))
            }
            Request::Stop(call) => {
                let stopped = self.runner().supervisor.stop(&call.service, log);
                Answer::to(&call, self.service_changed(stopped))
            }
            Request::Restart(call) => {
                let restarted = self.runner().supervisor.restart(&call.service, log);
                Answer::to(&call, self.service_changed(restarted))
            }
            Request::Logs(call) => {
                let sup = &self.runner().supervisor;
                let lines = sup
                    .id(&call.service)
                    .map(|id| Lines {
                        lines: sup.output_tail(id, call.lines),
                    })
                    .map_err(|e| Refusal::new(e.to_string()));
                Answer::to(&call, lines)
            }
            Request::Bootlog(call) => {
                let lines = log.tail(call.lines.unwrap_or(usize::MAX));
                Answer::to(&call, Ok(Lines { lines }))
            }
            Request::Info(call) => {
                let info = Info {
                    uptime_s: self.started.elapsed().as_secs(),
                    rss_kib: self
                        .sys
                        .read_file(Path::new("/proc/self/status"))
                        .ok()
                        .and_then(|b| control::vm_rss_kib(&String::from_utf8_lossy(&b))),
                    config: self.phase.config().map(|c| c.source.kind().to_string()),
                };
                Answer::to(&call, Ok(NodeInfo { info }))
            }
            Request::Reboot(call) => {
                Answer::to(&call, self.shutdown_asked(ShutdownKind::Reboot, false))
            }
            Request::Poweroff(call) => {
                Answer::to(&call, self.shutdown_asked(ShutdownKind::PowerOff, false))
            }
            Request::Reset(call) => {
                Answer::to(&call, self.shutdown_asked(ShutdownKind::Reboot, true))
            }
            Request::Kill(call) => {
                let killed = self.kill(&call.service, &call.signal);
                Answer::to(&call, killed)
            }
            Request::Apply(call) => {
                let applied = self.apply_live(&call.parts, call.config.clone());
                Answer::to(&call, applied)
            }
            Request::ConfigInstalled(call) => {
                let installed = self.config_installed();
                Answer::to(&call, installed)
            }
        }
    }

    /// A start, stop or restart the supervisor accepted: carry out its actions.
    fn service_changed(
        &mut self,
        result: Result<Vec<crate::supervisor::Action>, crate::supervisor::Error>,
    ) -> Result<Done, Refusal> {
        let actions = result.map_err(|e| Refusal::new(e.to_string()))?;
        let log = self.log;
        self.runner().apply(actions, log);
        self.services_changed();
        Ok(Done {})
    }

    /// Answer a reboot, power-off or reset now and begin it shortly after, so that the
    /// answer reaches machined before the shutdown stops it (the lifecycle decides).
    fn shutdown_asked(&mut self, kind: ShutdownKind, reset: bool) -> Result<Said, Refusal> {
        let wipes = super::reset::wipe_names(&self.boot.wipe, self.boot.state_pending.is_some());
        match self.input(Input::ShutdownAsked { kind, reset, wipes }) {
            Some(Ok(message)) => Ok(Said { message }),
            Some(Err(refusal)) => Err(Refusal::new(refusal)),
            None => Err(Refusal::new(format!(
                "the {} was not begun: see the boot log",
                kind.describe()
            ))),
        }
    }

    /// Send a signal to a service's process; the supervisor restarts it if it exits.
    fn kill(&mut self, service: &str, signal: &str) -> Result<Said, Refusal> {
        let (name, number) = control::parse_signal(signal).map_err(Refusal::new)?;
        let log = self.log;
        let sup = &self.runner().supervisor;
        let id = sup.id(service).map_err(|e| Refusal::new(e.to_string()))?;
        let Some(status) = sup.status(id) else {
            return Err(Refusal::new(format!("no service named {service:?}")));
        };
        let Some(pid) = status.pid else {
            return Err(Refusal::new(format!(
                "service {service} is not running ({}): there is no process to signal; start it first",
                status.state
            )));
        };
        let sent = self.sys.kill_process(pid, number);
        match sent {
            Ok(()) => {
                let what = format!(
                    "{name} sent to service {service} (pid {pid}); if it exits, the supervisor restarts it after its backoff"
                );
                log.line(&format!("{what} (control socket)"));
                Ok(Said { message: what })
            }
            Err(e) => Err(Refusal::new(format!(
                "cannot send {name} to service {service} (pid {pid}): {}",
                errno_name(&e)
            ))),
        }
    }

    /// `apply`: judge, plan against the node, apply, restart the network; refused whole
    /// at the first two steps.
    fn apply_live(&mut self, parts: &[live::Part], text: String) -> Result<Applied, Refusal> {
        let log = self.log;
        if self.phase.going_down().is_some() {
            return Err(Refusal::new("the node is going down: nothing was applied"));
        }
        let Some(current) = self.phase.config() else {
            return Err(Refusal::new(
                "this node has no config yet: the first config is installed through maintenance mode (apply-config --insecure), not applied live",
            ));
        };
        let names: Vec<&str> = parts.iter().map(|p| p.key()).collect();
        let config = match live::judge(text.as_bytes()) {
            Ok(c) => c,
            Err(errors) => {
                log.line(&format!(
                    "live apply of {} refused: the config is invalid; nothing was changed",
                    names.join(", ")
                ));
                for e in &errors {
                    log.line(&format!("config error: {e}"));
                }
                return Err(Refusal::new(format!(
                    "the config is invalid; nothing was changed:\n{}",
                    errors.join("\n")
                )));
            }
        };
        log.line(&format!(
            "applying {} live (node API)",
            if names.is_empty() {
                "nothing".to_string()
            } else {
                names.join(", ")
            }
        ));
        let paths = live::Paths::node(self.boot.etc_ok);
        let env = live::Env {
            sys: self.sys,
            log,
            modules: self.boot.modules.as_ref(),
            paths: &paths,
            current: Some(&current.config),
            machine_id: &self.boot.machine_id,
        };
        let plan = match live::plan(&env, parts, &config) {
            Ok(plan) => plan,
            Err(errors) => {
                log.line("live apply refused: nothing was changed");
                for e in &errors {
                    log.line(&e.to_string());
                }
                return Err(Refusal::new(format!(
                    "the config cannot be applied live; nothing was changed:\n{}",
                    errors.join("\n")
                )));
            }
        };
        let mut messages = live::apply(&env, &plan).map_err(Refusal::new)?;
        if plan.network {
            let machine = &config.machine;
            if let Some(stop) = self.network.take() {
                let _ = stop.send(());
            }
            self.network = Some(network::start(
                &machine.network,
                machine.hostname.as_deref(),
                Sender::new(self.events.clone()),
            ));
            let line = format!(
                "network restarted with machine.network ({} interface(s)); addresses and routes the new config drops stay until the next boot",
                machine.network.interfaces.len()
            );
            log.line(&line);
            messages.push(line);
            if self.boot.etc_ok && !machine.network.nameservers.is_empty() {
                let entry = etc_files::Entry::file(
                    "resolv.conf",
                    resolv::render(&machine.network.nameservers, &[]),
                );
                if let Err(e) = etc_files::write(self.sys, Path::new("/etc"), &[entry]) {
                    messages.push(format!("/etc/resolv.conf not written: {e}"));
                }
            }
        }
        if messages.is_empty() {
            messages.push("nothing to change: the node already runs these values".into());
        }
        self.input(Input::ConfigApplied(Accepted {
            source: Source::Api,
            bytes: text.into_bytes(),
            config,
        }));
        Ok(Applied { messages })
    }

    /// `config-installed`: machined wrote the first config to STATE; continue the boot.
    fn config_installed(&mut self) -> Result<Said, Refusal> {
        let log = self.log;
        if let Some(running) = self.phase.config() {
            return Ok(Said {
                message: format!(
                    "the node already runs a config (from {}); nothing to do",
                    running.source
                ),
            });
        }
        if matches!(self.phase, Phase::ShuttingDown { .. } | Phase::Down { .. }) {
            return Err(Refusal::new(
                "the node is going down: the installed config is read at its next boot",
            ));
        }
        let Some(dir) = self.boot.state_dir.clone() else {
            return Err(Refusal::new(
                "STATE is not mounted, so there is no installed config to read; see the boot log for the disk error",
            ));
        };
        let bytes = match state::read(&dir, state_layout::CONFIG) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                return Err(Refusal::new(format!(
                    "no config in {}: write it before saying it is installed",
                    dir.join(state_layout::CONFIG).display()
                )));
            }
            Err(e) => return Err(Refusal::new(crate::error_chain(&e))),
        };
        match config_source::judge(&Source::State, &bytes, log) {
            Ok(config) => {
                log.line(&format!(
                    "config installed through the node API in {}: continuing the boot",
                    Source::State
                ));
                self.input(Input::ConfigFound(Accepted {
                    source: Source::State,
                    bytes,
                    config,
                }));
                Ok(Said {
                    message: "init continues the boot with the config from STATE".into(),
                })
            }
            Err(errors) => {
                config_source::report_refusal(&Source::State, &errors, log);
                Err(Refusal::new(format!(
                    "the config in STATE is invalid, so the node keeps waiting for one:\n{}",
                    errors.join("\n")
                )))
            }
        }
    }
}
