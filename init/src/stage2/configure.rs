//! Step 6: the boot plan's executor. The lifecycle asks to configure once a valid config
//! is there; this runs the plan's configure steps ([`plan::configure_steps`]) in their
//! order, all of them before the main loop handles containerd's readiness or starts any
//! other service. The order and its reasons live in [`plan`], not here.

use std::path::Path;

use keelson_configs::MachineConfig;
use keelson_configs::layout::{self, PART_STATE};
use keelson_configs::validate::check_machine_file_path;

use crate::bootlog::Kept;
use crate::config_source::Accepted;
use crate::console::Log;
use crate::disks;
use crate::etc_files::{self, EtcInput};
use crate::fault;
use crate::kmods;
use crate::lifecycle::plan::{self, Step};
use crate::network;
use crate::sender::Sender;
use crate::services;
use crate::state;
use crate::supervisor::ServiceSpec;
use crate::swap;
use crate::syscalls::{Syscalls, errno_name};
use crate::sysctl;

use super::mounts_table::mount_cni_bin;
use super::node::Node;
use super::reset::Wipe;

/// What the configure steps hand on to each other.
struct Configuring {
    /// The config being applied.
    accepted: Accepted,
    /// The hostname: the config's, or one made from the machine id.
    hostname: String,
    /// machined served maintenance mode.
    ends_maintenance: bool,
    /// The services after containerd, registered by the last step.
    other_services: Vec<ServiceSpec>,
}

impl<K: Kept> Node<'_, K> {
    /// Apply the config of the lifecycle's new phase and start the services, step by
    /// step as the boot plan says.
    pub(super) fn configure(&mut self, ends_maintenance: bool) {
        let Some(accepted) = self.phase.config().cloned() else {
            return;
        };
        self.log
            .line(&format!("applying the config from {}", accepted.source));
        let hostname = accepted
            .config
            .machine
            .hostname
            .clone()
            .unwrap_or_else(|| etc_files::default_hostname(&self.boot.machine_id));
        let mut run = Configuring {
            accepted,
            hostname,
            ends_maintenance,
            other_services: Vec::new(),
        };
        for step in plan::configure_steps() {
            self.configure_step(step, &mut run);
        }
    }

    /// One step of the boot plan.
    fn configure_step(&mut self, step: Step, run: &mut Configuring) {
        let log = self.log;
        let sys = self.sys;
        let config: &MachineConfig = &run.accepted.config;
        let machine = &config.machine;
        match step {
            Step::ContainerdModules => self.load_config_modules(&config_modules(config, true)),
            Step::CniOverlay => mount_cni_bin(sys, log),
            Step::Hostname => match sys.sethostname(&run.hostname) {
                Ok(()) => log.line(&format!("hostname {}", run.hostname)),
                Err(e) => log.line(&format!(
                    "hostname {} not set: {}",
                    run.hostname,
                    errno_name(&e)
                )),
            },
            Step::Files => {
                let state_mount = &self.boot.disk_options.state_mount;
                write_files(sys, log, state_mount, self.config_files(config, false));
            }
            Step::Etc => self.write_etc(config, &run.hostname),
            Step::SpawnContainerd => {
                run.other_services = self.spawn_containerd(config, run.ends_maintenance);
            }
            Step::FormatNewState => self.finish_state(),
            Step::KeepMachineId => self.keep_machine_id(),
            Step::StateFiles => {
                let state_mount = &self.boot.disk_options.state_mount;
                write_files(sys, log, state_mount, self.config_files(config, true));
            }
            Step::KeepConfig => self.keep_config(&run.accepted),
            Step::OtherModules => self.load_config_modules(&config_modules(config, false)),
            Step::Sysctls => {
                let sysctls = machine.effective_sysctls();
                sysctl::apply(
                    sys,
                    log,
                    Path::new(sysctl::PROC_SYS),
                    sysctls.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                );
            }
            Step::SwapOff => {
                if let Err(e) = swap::enforce(sys, log, machine.swap) {
                    log.line(&format!("swap: {}", crate::error_chain(&e)));
                }
            }
            Step::Network => {
                if let Some(stop) = self.network.take() {
                    let _ = stop.send(());
                }
                self.network = Some(network::start(
                    &machine.network,
                    machine.hostname.as_deref(),
                    Sender::new(self.events.clone()),
                ));
            }
            // Added, not replaced: machined may already run (maintenance mode).
            Step::OtherServices => self.start_services(std::mem::take(&mut run.other_services)),
            // The lifecycle runs these once containerd is ready.
            Step::LateDrivers | Step::Preflight => {}
        }
    }

    /// The config's files in STATE (`in_state`), or the others. Those in STATE (a
    /// worker's node API certificate) wait until a new STATE is formatted and mounted.
    fn config_files<'c>(
        &self,
        config: &'c MachineConfig,
        in_state: bool,
    ) -> Vec<&'c keelson_configs::schema::File> {
        let state_mount = &self.boot.disk_options.state_mount;
        config
            .machine
            .files
            .iter()
            .filter(|f| Path::new(&f.path).starts_with(state_mount) == in_state)
            .collect()
    }

    /// `/etc`'s generated files.
    fn write_etc(&self, config: &MachineConfig, hostname: &str) {
        if !self.boot.etc_ok {
            return;
        }
        let input = EtcInput {
            hostname: hostname.to_string(),
            nameservers: config.machine.network.nameservers.clone(),
            machine_id: self.boot.machine_id.clone(),
            sandbox_image: config.cluster.pause_image(),
            registry_mirrors: config
                .machine
                .registries
                .mirrors
                .iter()
                .map(|(host, mirror)| (host.clone(), mirror.endpoints.clone()))
                .collect(),
        };
        match etc_files::write(self.sys, Path::new("/etc"), &etc_files::render(&input)) {
            Ok(()) => self
                .log
                .line("/etc written: hostname hosts resolv.conf machine-id containerd/config.toml"),
            Err(e) => self.log.line(&format!("/etc not written: {e}")),
        }
    }

    /// The service catalog (its notes said), maintenance mode's end, and containerd
    /// spawned; the other services, for later.
    fn spawn_containerd(
        &mut self,
        config: &MachineConfig,
        ends_maintenance: bool,
    ) -> Vec<ServiceSpec> {
        let log = self.log;
        let mut notes = Vec::new();
        // The `unhealthy` test fault: machined is left out as if it were not there.
        let hidden = fault::hides_machined(&self.boot.cmdline);
        let exists =
            |p: &Path| self.sys.exists(p) && !(hidden && p == Path::new(services::MACHINED));
        let specs = services::catalog(config, &exists, &mut |n| notes.push(n));
        for note in notes {
            log.line(&note);
        }
        if ends_maintenance {
            log.line("maintenance mode ends: machined goes on with mutual TLS");
        }
        let (first, rest): (Vec<ServiceSpec>, Vec<ServiceSpec>) = specs
            .into_iter()
            .partition(|s| s.name == services::CONTAINERD);
        self.start_services(first);
        rest
    }

    /// Keep a config from elsewhere in STATE, so that later boots use it.
    fn keep_config(&self, accepted: &Accepted) {
        if !accepted.source.persist() {
            return;
        }
        let log = self.log;
        match &self.boot.state_dir {
            Some(dir) => match state::write_atomic(dir, layout::STATE_CONFIG, &accepted.bytes) {
                Ok(()) => log.line(&format!(
                    "config from {} written to STATE: later boots use it",
                    accepted.source
                )),
                Err(e) => log.line(&format!(
                    "config not kept in STATE: {}",
                    crate::error_chain(&e)
                )),
            },
            None => log.line("config not kept: STATE is not mounted"),
        }
    }

    /// Keep a new machine id in STATE, once.
    pub(super) fn keep_machine_id(&mut self) {
        if !std::mem::take(&mut self.boot.machine_id_unkept) {
            return;
        }
        if let Some(dir) = &self.boot.state_dir {
            super::keep_machine_id(self.log, dir, &self.boot.machine_id);
        }
    }

    /// Format and mount a new STATE that the disks step left (a first boot), and add it
    /// to what a reset wipes. Done once containerd is spawned, or before the node waits
    /// for a config (then [`Node::keep_machine_id`]): a new STATE holds nothing to read,
    /// and containerd needs only EPHEMERAL.
    pub(super) fn finish_state(&mut self) {
        let Some((device, size)) = self.boot.state_pending.take() else {
            return;
        };
        let log = self.log;
        match disks::finish_deferred(self.sys, log, &self.boot.disk_options, &device, size) {
            Ok(mounted) => {
                let dir = state::state_dir();
                self.boot.wipe.push(Wipe {
                    name: PART_STATE,
                    device: mounted.device,
                    target: mounted.target,
                });
                self.boot.state_dir = Some(dir);
            }
            Err(e) => log.line(&crate::error_chain(&e)),
        }
    }

    /// Load some of the config's modules.
    fn load_config_modules(&self, names: &[String]) {
        if names.is_empty() {
            return;
        }
        let log = self.log;
        match &self.boot.modules {
            Some(index) => {
                let report = kmods::load(self.sys, log, index, names);
                if !report.ok() {
                    log.line(&format!("{} module(s) failed to load", report.failed.len()));
                }
            }
            None => log.line("kernel modules not loaded: no module index"),
        }
    }

    /// Register services and start the autostart ones (a name already registered keeps
    /// its run).
    pub(super) fn start_services(&mut self, specs: Vec<ServiceSpec>) {
        let log = self.log;
        let runner = self.runner();
        runner.supervisor.add(specs);
        let actions = runner.supervisor.start_autostart(log);
        runner.apply(actions, log);
    }
}

/// The config's modules that containerd needs ([`services::CONTAINERD_MODULES`]), or
/// the others.
fn config_modules(config: &MachineConfig, for_containerd: bool) -> Vec<String> {
    config
        .machine
        .effective_kernel_modules()
        .into_iter()
        .filter(|m| services::CONTAINERD_MODULES.contains(&m.as_str()) == for_containerd)
        .collect()
}

/// Write the config's `[[machine.files]]`, creating parent directories; a path that
/// validation would refuse (outside /var and /etc, or STATE's own file, in STATE mounted
/// at `state_mount`) is refused again here, and no write follows a symbolic link
/// ([`Syscalls::install_file`]).
fn write_files<'f>(
    sys: &dyn Syscalls,
    log: &dyn Log,
    state_mount: &Path,
    files: impl IntoIterator<Item = &'f keelson_configs::schema::File>,
) {
    let state_mount = state_mount.to_string_lossy();
    for file in files {
        if let Err(e) = check_machine_file_path(&file.path, &state_mount) {
            let hint = e
                .hint
                .as_ref()
                .map(|h| format!(" ({h})"))
                .unwrap_or_default();
            log.line(&format!("file {} not written: {e}{hint}", file.path));
            continue;
        }
        let path = Path::new(&file.path);
        let result = sys.install_file(path, file.content.as_bytes(), file.mode.0);
        match result {
            Ok(()) => log.line(&format!("file {} written ({:o})", file.path, file.mode.0)),
            Err(e) => log.line(&format!("file {} not written: {e}", file.path)),
        }
    }
}

#[cfg(test)]
mod tests {
    use keelson_configs::schema::File;
    use keelson_configs::values::FileMode;

    use super::*;
    use crate::console::memory::MemoryLog;
    use crate::syscalls::fake::{Call, Fake};

    fn file(path: &str) -> File {
        File {
            path: path.into(),
            content: "x\n".into(),
            mode: FileMode(0o644),
        }
    }

    #[test]
    fn a_file_validation_would_refuse_is_not_written() {
        // Validation refuses these first; PID 1 refuses them again, whatever the source.
        let fake = Fake::new();
        let log = MemoryLog::default();
        let files = [
            file("/var/lib/agent.conf"),
            file("/usr/lib/os-release"),
            file("/system/state/config.toml"),
            file("/system/state/node-api/server.crt"),
        ];
        write_files(&fake, &log, Path::new("/system/state"), &files);
        let installed: Vec<String> = fake
            .calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::InstallFile(path, ..) => Some(path),
                _ => None,
            })
            .collect();
        assert_eq!(
            installed,
            ["/var/lib/agent.conf", "/system/state/node-api/server.crt"]
        );
        let lines = log.lines();
        assert!(
            lines.iter().any(|l| l.starts_with(
                "keelson-init: file /usr/lib/os-release not written: \"/usr/lib/os-release\" is not under /var or /etc ("
            )),
            "{lines:?}"
        );
        assert!(
            lines.iter().any(|l| l.contains(
                "file /system/state/config.toml not written: \"/system/state/config.toml\" is in STATE"
            )),
            "{lines:?}"
        );
    }
}
