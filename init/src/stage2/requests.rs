//! The control socket's requests (`crate::control`): the services' (list, start, stop,
//! restart, logs, kill), the node's (info, boot log), and those that change it: a live
//! `apply` (`live`: judged, planned against the node, applied or refused whole; the
//! network engine restarted here), `config-installed` (maintenance mode's config), and
//! the shutdowns, which the lifecycle answers and begins
//! [`control::SHUTDOWN_DELAY`] later.

use std::path::Path;

use keelson_configs::layout;
use keelson_netconf::resolv;

use crate::config_source::{self, Accepted, Source};
use crate::console::Log;
use crate::control::{self, Info, Request, Response};
use crate::etc_files;
use crate::lifecycle::{Input, Phase};
use crate::live;
use crate::network;
use crate::sender::Sender;
use crate::shutdown::ShutdownKind;
use crate::state;
use crate::syscalls::errno_name;

use super::node::Node;

impl<L: Log> Node<'_, L> {
    /// Answer one control request.
    pub(super) fn control(&mut self, request: Request) -> Response {
        let log = self.log;
        let result = match request {
            Request::List => return Response::services(&self.runner().supervisor.statuses()),
            Request::Start { service } => self.runner().supervisor.start(&service, log),
            Request::Stop { service } => self.runner().supervisor.stop(&service, log),
            Request::Restart { service } => self.runner().supervisor.restart(&service, log),
            Request::Logs { service, lines } => {
                let sup = &self.runner().supervisor;
                return match sup.id(&service) {
                    Ok(id) => Response::lines(sup.output_tail(id, lines)),
                    Err(e) => Response::error(e.to_string()),
                };
            }
            Request::Bootlog { lines } => {
                return Response::lines(log.tail(lines.unwrap_or(usize::MAX)));
            }
            Request::Info => {
                return Response {
                    info: Some(Info {
                        uptime_s: self.started.elapsed().as_secs(),
                        rss_kib: self
                            .sys
                            .read_file(Path::new("/proc/self/status"))
                            .ok()
                            .and_then(|b| control::vm_rss_kib(&String::from_utf8_lossy(&b))),
                        config: self.phase.config().map(|c| c.source.kind().to_string()),
                    }),
                    ..Response::ok()
                };
            }
            Request::Reboot => return self.shutdown_asked(ShutdownKind::Reboot, false),
            Request::Poweroff => return self.shutdown_asked(ShutdownKind::PowerOff, false),
            Request::Reset => return self.shutdown_asked(ShutdownKind::Reboot, true),
            Request::Kill { service, signal } => return self.kill(&service, &signal),
            Request::Apply { parts, config } => return self.apply_live(&parts, config),
            Request::ConfigInstalled => return self.config_installed(),
        };
        match result {
            Ok(actions) => {
                self.runner().apply(actions, log);
                self.services_changed();
                Response::ok()
            }
            Err(e) => Response::error(e.to_string()),
        }
    }

    /// Answer a reboot, power-off or reset now and begin it shortly after, so that the
    /// answer reaches machined before the shutdown stops it (the lifecycle decides).
    fn shutdown_asked(&mut self, kind: ShutdownKind, reset: bool) -> Response {
        let wipes = self.boot.wipe.iter().map(|w| w.name).collect();
        match self.input(Input::ShutdownAsked { kind, reset, wipes }) {
            Some(Ok(message)) => Response::message(message),
            Some(Err(refusal)) => Response::error(refusal),
            None => Response::error(format!(
                "the {} was not begun: see the boot log",
                kind.describe()
            )),
        }
    }

    /// Send a signal to a service's process; the supervisor restarts it if it exits.
    fn kill(&mut self, service: &str, signal: &str) -> Response {
        let (name, number) = match control::parse_signal(signal) {
            Ok(s) => s,
            Err(e) => return Response::error(e),
        };
        let log = self.log;
        let sup = &self.runner().supervisor;
        let id = match sup.id(service) {
            Ok(id) => id,
            Err(e) => return Response::error(e.to_string()),
        };
        let Some(status) = sup.status(id) else {
            return Response::error(format!("no service named {service:?}"));
        };
        let Some(pid) = status.pid else {
            return Response::error(format!(
                "service {service} is not running ({}): there is no process to signal; start it first",
                status.state
            ));
        };
        let sent = self.sys.kill_process(pid, number);
        match sent {
            Ok(()) => {
                let what = format!(
                    "{name} sent to service {service} (pid {pid}); if it exits, the supervisor restarts it after its backoff"
                );
                log.line(&format!("{what} (control socket)"));
                Response::message(what)
            }
            Err(e) => Response::error(format!(
                "cannot send {name} to service {service} (pid {pid}): {}",
                errno_name(&e)
            )),
        }
    }

    /// `apply`: judge, plan against the node, apply, restart the network; refused whole
    /// at the first two steps.
    fn apply_live(&mut self, parts: &[live::Part], text: String) -> Response {
        let log = self.log;
        if self.phase.going_down().is_some() {
            return Response::error("the node is going down: nothing was applied");
        }
        let Some(current) = self.phase.config() else {
            return Response::error(
                "this node has no config yet: the first config is installed through maintenance mode (apply-config --insecure), not applied live",
            );
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
                return Response::error(format!(
                    "the config is invalid; nothing was changed:\n{}",
                    errors.join("\n")
                ));
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
                return Response::error(format!(
                    "the config cannot be applied live; nothing was changed:\n{}",
                    errors.join("\n")
                ));
            }
        };
        let mut messages = match live::apply(&env, &plan) {
            Ok(m) => m,
            Err(e) => return Response::error(e),
        };
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
        Response::messages(messages)
    }

    /// `config-installed`: machined wrote the first config to STATE; continue the boot.
    fn config_installed(&mut self) -> Response {
        let log = self.log;
        if let Some(running) = self.phase.config() {
            return Response::message(format!(
                "the node already runs a config (from {}); nothing to do",
                running.source
            ));
        }
        if matches!(self.phase, Phase::ShuttingDown { .. } | Phase::Down { .. }) {
            return Response::error(
                "the node is going down: the installed config is read at its next boot",
            );
        }
        let Some(dir) = self.boot.state_dir.clone() else {
            return Response::error(
                "STATE is not mounted, so there is no installed config to read; see the boot log for the disk error",
            );
        };
        let bytes = match state::read(&dir, layout::STATE_CONFIG) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                return Response::error(format!(
                    "no config in {}: write it before saying it is installed",
                    dir.join(layout::STATE_CONFIG).display()
                ));
            }
            Err(e) => return Response::error(crate::error_chain(&e)),
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
                Response::message("init continues the boot with the config from STATE")
            }
            Err(errors) => {
                config_source::report_refusal(&Source::State, &errors, log);
                Response::error(format!(
                    "the config in STATE is invalid, so the node keeps waiting for one:\n{}",
                    errors.join("\n")
                ))
            }
        }
    }
}
