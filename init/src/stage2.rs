//! Stage 2: PID 1 of the running node.
//!
//! The boot, in order (each step logs one line per event on the console):
//!
//! 1. **Mounts** ([`STAGE2_MOUNTS`], a table): `/proc`, `/sys`, `/dev` (moved from
//!    stage 1), `/dev/pts`, `/dev/shm`, `/run`, cgroup2 at `/sys/fs/cgroup`, `/tmp`; then
//!    the optional ones ([`OPTIONAL_MOUNTS`]: securityfs, and efivarfs once its module is
//!    loaded) whose failure is only logged. Ctrl-Alt-Del is routed to PID 1 (`SIGINT`).
//! 2. **Early modules**: what reading disks and configs needs (efivarfs, ext4, fw_cfg,
//!    vfat/iso9660), from the root's module tree (`kmods`).
//! 3. **Disks** (`disks`): STATE and EPHEMERAL created on first boot, EPHEMERAL grown,
//!    STATE mounted at `/system/state`, EPHEMERAL at `/var`.
//! 4. **`/etc`**: a tmpfs with the image's files and the generated ones (`etc_files`);
//!    the machine id comes from STATE, or is made and kept there.
//! 5. **Config** (`config_source`): STATE, fw_cfg, config drive, then a URL. Without a
//!    valid one the node waits and says so every 30 s.
//! 6. **Configure** (once a valid config is there): the config's modules (br_netfilter,
//!    overlay, ...), sysctls (defaults + config), swap off, hostname, files, `/etc`,
//!    network (`netconf`), then the services (`services`, `supervisor`); preflight runs
//!    once containerd is ready.
//! 7. **Main loop**: one [`Event`] at a time until a shutdown request (signal or control
//!    socket) has stopped every service; then the rest of the processes are stopped, the
//!    filesystems unmounted, and the machine restarted or powered off (`shutdown`).

use std::convert::Infallible;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keelson_configs::MachineConfig;
use keelson_configs::layout::{self, CMDLINE_VERITY_ROOTHASH, cmdline_value, parse_cmdline};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio::sync::oneshot;

use crate::bootlog::BootLog;
use crate::cmdline;
use crate::config_source::{self, Accepted, Source};
use crate::console::Log;
use crate::control::{self, Info, Request, Response};
use crate::disks;
use crate::etc_files::{self, EtcInput};
use crate::events::{self, Event, EventTx, ShutdownKind, SignalKind, TimerEvent};
use crate::kmods;
use crate::mounts::{self, EARLY_MOUNTS, MountSpec};
use crate::netconf::{NetEvent, resolv};
use crate::network;
use crate::power_button;
use crate::preflight;
use crate::services;
use crate::shutdown;
use crate::state;
use crate::supervisor::{self, Backoff, ReapScope, Runner, State, Supervisor};
use crate::swap;
use crate::syscalls::{MountFlags, Syscalls, errno_name};
use crate::sysctl;

/// The line end-to-end tests wait for: stage 2 is running from the verified root.
pub const READY_MARKER: &str = "KEELSON STAGE2 READY";

/// How long after the last autostart service became ready PID 1 reports its own memory.
pub const IDLE_REPORT_AFTER: Duration = Duration::from_secs(10);

/// Why stage 2 stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An early mount failed.
    #[error("early mounts failed")]
    Mounts(#[from] mounts::Error),
    /// The event loop could not be created.
    #[error("cannot start the event loop: {0}")]
    Runtime(#[source] io::Error),
    /// The kernel refused to restart or power off.
    #[error("the kernel refused to {what}: {errno}", errno = errno_name(source))]
    Reboot {
        /// Reboot or power off.
        what: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

const NOSUID_NODEV: MountFlags = MountFlags::NOSUID.union(MountFlags::NODEV);
const NOSUID_NODEV_NOEXEC: MountFlags = NOSUID_NODEV.union(MountFlags::NOEXEC);

/// Stage 2's mounts after stage 1's `/proc`, `/sys` and `/dev`, in order.
pub const STAGE2_MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MountFlags::NOSUID.union(MountFlags::NOEXEC),
        data: "mode=0620,ptmxmode=0666",
    },
    MountSpec {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=1777",
    },
    MountSpec {
        source: "run",
        target: "/run",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=0755",
    },
    MountSpec {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: "nsdelegate",
    },
    MountSpec {
        source: "tmp",
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=1777",
    },
];

/// Mounts whose failure is logged and ignored.
pub const OPTIONAL_MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "securityfs",
        target: "/sys/kernel/security",
        fstype: "securityfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    MountSpec {
        source: "efivarfs",
        target: "/sys/firmware/efi/efivars",
        fstype: "efivarfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
];

/// The tmpfs over `/etc`.
pub const ETC_MOUNT: MountSpec = MountSpec {
    source: "etc",
    target: "/etc",
    fstype: "tmpfs",
    flags: NOSUID_NODEV,
    data: "mode=0755,size=16m",
};

/// Modules loaded before the disks and the config are read: filesystems, config sources,
/// the power button, network drivers. Missing ones are logged (a kernel that has them
/// built in, or a platform without fw_cfg, is fine). There is no udev: drivers for the
/// hardware of other platforms join this list (or a modalias coldplug replaces it).
pub const EARLY_MODULES: &[&str] = &[
    "efivarfs",
    "ext4",
    "qemu_fw_cfg",
    "vfat",
    "nls_cp437",
    "nls_utf8",
    "isofs",
    "button",
    "gpio_keys",
    "evdev",
    // Network drivers: there is no udev to load them by modalias.
    "virtio_net",
];

/// The banner of the boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Banner {
    /// The OS version.
    pub version: String,
    /// The booted slot (`a`, `b`, or `?`).
    pub slot: String,
    /// The verity root hash of the booted slot.
    pub root_hash: String,
    /// `uname -r`.
    pub kernel: String,
    /// `uname -m`.
    pub arch: String,
}

impl std::fmt::Display for Banner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Keelson {} slot={} verity={} kernel={} arch={}",
            self.version, self.slot, self.root_hash, self.kernel, self.arch
        )
    }
}

/// `VERSION_ID` from an os-release file's text (quotes removed).
pub fn os_release_version(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let value = line.trim().strip_prefix("VERSION_ID=")?;
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
        (!value.is_empty()).then(|| value.to_string())
    })
}

/// Gather the banner from the command line, os-release and uname.
pub fn banner(sys: &dyn Syscalls, cmdline: &str) -> Banner {
    let args = parse_cmdline(cmdline);
    let os_release = Path::new("/").join(layout::OS_RELEASE);
    let version = sys
        .read_file(&os_release)
        .ok()
        .and_then(|b| os_release_version(&String::from_utf8_lossy(&b)))
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string());
    let uname = sys.uname();
    Banner {
        version,
        slot: cmdline::slot(cmdline)
            .map(|s| s.letter().to_string())
            .unwrap_or_else(|| "?".to_string()),
        root_hash: cmdline_value(&args, CMDLINE_VERITY_ROOTHASH)
            .unwrap_or("none")
            .to_string(),
        kernel: uname.release,
        arch: uname.machine,
    }
}

/// Apply a table of optional mounts: each failure is one line, and the rest go on.
pub fn apply_optional(sys: &dyn Syscalls, log: &dyn Log, table: &[MountSpec]) -> Vec<&'static str> {
    let mut mounted = Vec::new();
    for spec in table {
        match mounts::apply(sys, std::slice::from_ref(spec)) {
            Ok(done) => mounted.extend(done),
            Err(e) => log.line(&format!("optional mount skipped: {e}")),
        }
    }
    mounted
}

/// Steps 1 and 2: every mount of the table, Ctrl-Alt-Del to PID 1, the early modules.
pub fn early_mounts(
    sys: &dyn Syscalls,
    log: &dyn Log,
) -> Result<Option<kmods::ModuleIndex>, Error> {
    mounts::apply(sys, EARLY_MOUNTS)?;
    log.reopen();
    let mounted = mounts::apply(sys, STAGE2_MOUNTS)?;
    log.line(&format!("mounted {}", mounted.join(" ")));
    if let Err(e) = sys.ctrl_alt_del_to_init() {
        log.line(&format!(
            "Ctrl-Alt-Del stays with the kernel: {}",
            errno_name(&e)
        ));
    }
    let index = match kmods::ModuleIndex::load(sys, Path::new(kmods::MODULES_ROOT)) {
        Ok(index) => {
            kmods::load(sys, log, &index, EARLY_MODULES);
            Some(index)
        }
        Err(e) => {
            log.line(&format!("no module index: {}", crate::error_chain(&e)));
            None
        }
    };
    let optional = apply_optional(sys, log, OPTIONAL_MOUNTS);
    if !optional.is_empty() {
        log.line(&format!("mounted {}", optional.join(" ")));
    }
    enable_cgroup_controllers(sys, log);
    Ok(index)
}

/// Hand every cgroup v2 controller down from the root, so containerd and the kubelet can
/// use them in the groups they create (cgroupfs driver).
fn enable_cgroup_controllers(sys: &dyn Syscalls, log: &dyn Log) {
    let Ok(available) = sys.read_file(Path::new("/sys/fs/cgroup/cgroup.controllers")) else {
        return;
    };
    let wanted: Vec<String> = String::from_utf8_lossy(&available)
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect();
    let control = Path::new("/sys/fs/cgroup/cgroup.subtree_control");
    match sys.write_file(control, wanted.join(" ").as_bytes()) {
        Ok(()) => log.line(&format!("cgroup controllers enabled: {}", wanted.join(" "))),
        Err(e) => log.line(&format!(
            "cgroup controllers not enabled ({}): {}",
            wanted.join(" "),
            errno_name(&e)
        )),
    }
}

/// The machine id: STATE's, or a new random one kept in STATE (when it is mounted).
pub fn machine_id(sys: &dyn Syscalls, log: &dyn Log, state_dir: Option<&Path>) -> String {
    const NAME: &str = "machine-id";
    if let Some(dir) = state_dir
        && let Ok(Some(bytes)) = state::read(dir, NAME)
        && let Some(id) = etc_files::parse_machine_id(&String::from_utf8_lossy(&bytes))
    {
        return id;
    }
    let mut raw = [0u8; 16];
    let read = sys
        .open_read(Path::new("/dev/urandom"))
        .and_then(|mut r| r.read_exact(&mut raw));
    if let Err(e) = read {
        log.line(&format!(
            "no randomness for the machine id ({}): using the clock",
            errno_name(&e)
        ));
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        raw = nanos.to_le_bytes();
    }
    let id = etc_files::machine_id_from(&raw);
    match state_dir {
        Some(dir) => match state::write_atomic(dir, NAME, format!("{id}\n").as_bytes()) {
            Ok(()) => log.line(&format!("machine id {id} created and kept in STATE")),
            Err(e) => log.line(&format!(
                "machine id {id} not kept: {}",
                crate::error_chain(&e)
            )),
        },
        None => log.line(&format!(
            "machine id {id} (STATE unavailable: a new one next boot)"
        )),
    }
    id
}

/// Mount the tmpfs `/etc` and fill it with the image's files.
fn mount_etc(sys: &dyn Syscalls, log: &dyn Log) -> bool {
    let image_etc = match etc_files::snapshot(Path::new("/etc")) {
        Ok(entries) => entries,
        Err(e) => {
            log.line(&format!("cannot read the image's /etc: {e}"));
            Vec::new()
        }
    };
    if let Err(e) = mounts::apply(sys, &[ETC_MOUNT]) {
        log.line(&format!("/etc stays read-only: {e}"));
        return false;
    }
    if let Err(e) = etc_files::write(Path::new("/etc"), &image_etc) {
        log.line(&format!("cannot copy the image's /etc: {e}"));
    }
    true
}

/// The whole of stage 2; returns only with an error that needs a deliberate reboot.
pub fn run<L: Log>(sys: &dyn Syscalls, console: &L) -> Result<Infallible, Error> {
    let log = BootLog::new(console);
    let index = early_mounts(sys, &log)?;
    log.raw(READY_MARKER);
    let cmdline = sys
        .read_file(Path::new("/proc/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    log.line(&format!("stage 2 banner: {}", banner(sys, &cmdline)));

    let disk_options = disks::Options {
        slot_partname: cmdline::slot(&cmdline).map(|s| s.partition_name().to_string()),
        ..disks::Options::default()
    };
    let state_dir = match disks::prepare(sys, &log, index.as_ref(), &disk_options) {
        Ok(report) => report.state.is_ok().then(state::state_dir),
        Err(e) => {
            log.line(&format!("disks: {}", crate::error_chain(&e)));
            None
        }
    };
    // The kernel's word on the filesystems it mounted (clean, or recovered from the
    // journal after a crash), which the console's log level hides.
    for message in crate::bootlog::kernel_messages(&["EXT4-fs ("]) {
        log.line(&format!("kernel: {message}"));
    }
    if let Some(dir) = &state_dir {
        for stale in state::remove_stale(dir) {
            log.line(&format!(
                "removed an interrupted write: {}",
                stale.display()
            ));
        }
    }
    let etc_ok = mount_etc(sys, &log);
    let machine_id = machine_id(sys, &log, state_dir.as_deref());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let (tx, rx) = unbounded_channel();
    let mut node = Node {
        sys,
        log: &log,
        events: tx.clone(),
        runner: None,
        modules: index,
        config: None,
        machine_id,
        cmdline,
        state_dir,
        etc_ok,
        started: Instant::now(),
        shutdown: None,
        preflight_done: false,
        idle_reported: false,
        url_failures: 0,
        fetching: false,
        network: None,
        control_socket: None,
    };
    // A LocalSet: netconf's tasks run on this one thread next to the main loop.
    let local = tokio::task::LocalSet::new();
    let kind = local.block_on(&runtime, node.main_loop(rx));
    let err = local.block_on(&runtime, node.finish(kind));
    Err(Error::Reboot {
        what: kind.describe(),
        source: err,
    })
}

/// Stage 2's state, owned by the main loop.
struct Node<'a, L: Log> {
    sys: &'a dyn Syscalls,
    log: &'a BootLog<L>,
    events: EventTx,
    runner: Option<Runner>,
    modules: Option<kmods::ModuleIndex>,
    config: Option<Accepted>,
    machine_id: String,
    cmdline: String,
    state_dir: Option<PathBuf>,
    etc_ok: bool,
    started: Instant,
    shutdown: Option<ShutdownKind>,
    preflight_done: bool,
    idle_reported: bool,
    url_failures: u32,
    /// A fetch of the config URL is under way (or scheduled).
    fetching: bool,
    /// Stops the running network engine.
    network: Option<oneshot::Sender<()>>,
    /// Closes the control socket.
    control_socket: Option<tokio::task::AbortHandle>,
}

impl<L: Log> Node<'_, L> {
    fn after(&self, delay: Duration, timer: TimerEvent) {
        let tx = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Event::Timer(timer));
        });
    }

    fn url(&self) -> Option<String> {
        config_source::cmdline_url(&self.cmdline)
    }

    fn fetch_url(&self, delay: Duration) {
        let Some(url) = self.url() else { return };
        let tx = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let result = config_source::http_get(&url, Duration::from_secs(20)).await;
            let _ = tx.send(Event::ConfigFetched { url, result });
        });
    }

    /// The loop: events until a shutdown has stopped every service.
    async fn main_loop(&mut self, mut rx: UnboundedReceiver<Event>) -> ShutdownKind {
        for (signal, e) in events::forward_signals(&self.events, &SignalKind::ALL) {
            self.log
                .line(&format!("cannot handle {}: {e}", signal.name()));
        }
        for (device, result) in power_button::watch_all(&self.events) {
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
        match control::serve(Path::new(control::SOCKET), self.events.clone()) {
            Ok(handle) => self.control_socket = Some(handle),
            Err(e) => self.log.line(&format!(
                "control socket {} unavailable: {e}",
                control::SOCKET
            )),
        }
        self.runner = Some(Runner::new(
            Supervisor::new(Vec::new(), Backoff::DEFAULT),
            self.events.clone(),
            ReapScope::Any,
        ));
        match config_source::find_local(self.sys, self.log, Path::new("/sys")) {
            Some(accepted) => self.configure(accepted),
            None => self.wait_for_config(),
        }
        loop {
            let Some(event) = rx.recv().await else {
                // Every sender is gone (cannot happen: we hold one); go down cleanly.
                return ShutdownKind::Reboot;
            };
            self.handle(event);
            if let Some(kind) = self.shutdown
                && self
                    .runner
                    .as_ref()
                    .is_none_or(|r| r.supervisor.all_stopped())
            {
                return kind;
            }
        }
    }

    fn wait_for_config(&mut self) {
        for line in config_source::waiting_message(self.url().as_deref()) {
            self.log.line(&line);
        }
        self.after(config_source::REMINDER, TimerEvent::ConfigReminder);
        if self.url().is_some() && self.network.is_none() {
            // The URL needs an address: DHCP on every link until a config says more.
            let net = network::dhcp_everywhere(Path::new("/sys"));
            self.network = Some(network::start(&net, None, self.events.clone()));
        }
    }

    fn runner(&mut self) -> &mut Runner {
        // Created first thing in the main loop; `Option` only for construction order.
        self.runner.get_or_insert_with(|| {
            Runner::new(
                Supervisor::new(Vec::new(), Backoff::DEFAULT),
                unbounded_channel().0,
                ReapScope::Any,
            )
        })
    }

    /// The one match over every event.
    fn handle(&mut self, event: Event) {
        let log = self.log;
        match event {
            Event::Signal(SignalKind::Child) => {
                for (pid, exit) in self.runner().reap(log) {
                    log.line(&format!("reaped pid {pid} ({exit})"));
                }
                self.after_service_change();
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
                    self.begin_shutdown(kind, signal.name());
                }
            }
            Event::Output { service, line } => {
                let sup = &mut self.runner().supervisor;
                log.console().raw(&format!("{}: {line}", sup.name(service)));
                sup.record_output(service, &line);
            }
            event @ (Event::Ready { .. } | Event::Timer(TimerEvent::Service { .. })) => {
                self.runner().handle(event, log);
                self.after_service_change();
            }
            Event::Timer(TimerEvent::ConfigReminder) => {
                if self.config.is_none() && self.shutdown.is_none() {
                    match config_source::find_local(self.sys, log, Path::new("/sys")) {
                        Some(accepted) => self.configure(accepted),
                        None => self.wait_for_config(),
                    }
                }
            }
            Event::Timer(TimerEvent::ShutdownDeadline) => {
                log.line(&format!(
                    "services did not stop within {} s: going on",
                    shutdown::SERVICES_DEADLINE.as_secs()
                ));
                // Forget them: the kill of every process follows.
                self.runner = None;
            }
            Event::Timer(TimerEvent::IdleReport) => {
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
                log.line(&format!(
                    "idle pid1 rss_kb={} services={services} uptime {:.1} s",
                    rss.map_or("?".into(), |r| r.to_string()),
                    self.started.elapsed().as_secs_f64()
                ));
            }
            Event::PowerButton(device) => {
                self.begin_shutdown(ShutdownKind::PowerOff, &format!("power button {device}"));
            }
            Event::Network(event) => self.network_event(event),
            Event::ConfigFetched { url, result } => self.config_fetched(url, result),
            Event::Control(request, reply) => {
                let answer = self.control(request);
                let _ = reply.send(answer);
            }
        }
    }

    fn network_event(&mut self, event: NetEvent) {
        let log = self.log;
        log.line(&event.to_string());
        if network::brings_reachability(&event) && self.config.is_none() && !self.fetching {
            self.fetching = self.url().is_some();
            self.fetch_url(Duration::ZERO);
        }
        match event {
            NetEvent::Resolvers {
                nameservers,
                search,
            } if self.etc_ok => {
                let entry =
                    etc_files::Entry::file("resolv.conf", resolv::render(&nameservers, &search));
                if let Err(e) = etc_files::write(Path::new("/etc"), &[entry]) {
                    log.line(&format!("/etc/resolv.conf not written: {e}"));
                }
            }
            NetEvent::Hostname { name } => {
                let configured = self
                    .config
                    .as_ref()
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
        if self.etc_ok {
            let entries = [
                etc_files::Entry::file("hostname", format!("{name}\n")),
                etc_files::Entry::file("hosts", resolv::hosts(name, &[])),
            ];
            if let Err(e) = etc_files::write(Path::new("/etc"), &entries) {
                log.line(&format!("/etc/hostname not written: {e}"));
            }
        }
    }

    fn config_fetched(&mut self, url: String, result: Result<Vec<u8>, String>) {
        if self.config.is_some() || self.shutdown.is_some() {
            return;
        }
        match result {
            Ok(bytes) => match config_source::accept(Source::Url(url), bytes, self.log) {
                Some(accepted) => self.configure(accepted),
                None => self.fetch_url(Duration::from_secs(30)),
            },
            Err(why) => {
                self.url_failures += 1;
                if self.url_failures % 6 == 1 {
                    self.log
                        .line(&format!("config URL {url}: {why}; retrying every 5 s"));
                }
                self.fetch_url(Duration::from_secs(5));
            }
        }
    }

    /// After a service changed state: preflight once containerd is ready, the idle report
    /// once every autostart service is.
    fn after_service_change(&mut self) {
        let Some(runner) = &self.runner else { return };
        let sup = &runner.supervisor;
        let statuses = sup.statuses();
        let ready = |name: &str| {
            statuses
                .iter()
                .any(|s| s.name == name && s.state == State::Ready)
        };
        if !self.preflight_done && ready("containerd") {
            self.preflight_done = true;
            if let Some(config) = &self.config {
                let report = preflight::run(
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
        }
        let all_ready = !statuses.is_empty()
            && statuses
                .iter()
                .filter(|s| s.autostart)
                .all(|s| s.state == State::Ready);
        if all_ready && !self.idle_reported && self.config.is_some() {
            self.idle_reported = true;
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
            self.after(IDLE_REPORT_AFTER, TimerEvent::IdleReport);
        }
    }

    fn begin_shutdown(&mut self, kind: ShutdownKind, why: &str) {
        if let Some(current) = self.shutdown {
            self.log.line(&format!(
                "{why}: a {} is already under way",
                current.describe()
            ));
            return;
        }
        self.shutdown = Some(kind);
        self.log.line(&format!(
            "{} requested ({why}): stopping services",
            kind.describe()
        ));
        let log = self.log;
        let runner = self.runner();
        let actions = runner.supervisor.shutdown(log);
        runner.apply(actions, log);
        self.after(shutdown::SERVICES_DEADLINE, TimerEvent::ShutdownDeadline);
    }

    fn control(&mut self, request: Request) -> Response {
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
                        config: self.config.as_ref().map(|c| c.source.kind().to_string()),
                    }),
                    ..Response::ok()
                };
            }
            Request::Reboot => {
                self.begin_shutdown(ShutdownKind::Reboot, "control socket");
                return Response::ok();
            }
            Request::Poweroff => {
                self.begin_shutdown(ShutdownKind::PowerOff, "control socket");
                return Response::ok();
            }
        };
        match result {
            Ok(actions) => {
                self.runner().apply(actions, log);
                self.after_service_change();
                Response::ok()
            }
            Err(e) => Response::error(e.to_string()),
        }
    }

    /// Step 6: apply a valid config and start the services.
    fn configure(&mut self, accepted: Accepted) {
        let log = self.log;
        let sys = self.sys;
        if accepted.source.persist() {
            match &self.state_dir {
                Some(dir) => {
                    match state::write_atomic(dir, layout::STATE_CONFIG, &accepted.bytes) {
                        Ok(()) => log.line(&format!(
                            "config from {} written to STATE: later boots use it",
                            accepted.source
                        )),
                        Err(e) => log.line(&format!(
                            "config not kept in STATE: {}",
                            crate::error_chain(&e)
                        )),
                    }
                }
                None => log.line("config not kept: STATE is not mounted"),
            }
        }
        log.line(&format!("applying the config from {}", accepted.source));
        let config: &MachineConfig = &accepted.config;
        let machine = &config.machine;
        match &self.modules {
            Some(index) => {
                let report = kmods::load(sys, log, index, &machine.effective_kernel_modules());
                if !report.ok() {
                    log.line(&format!("{} module(s) failed to load", report.failed.len()));
                }
            }
            None => log.line("kernel modules not loaded: no module index"),
        }
        let sysctls = machine.effective_sysctls();
        sysctl::apply(
            sys,
            log,
            Path::new(sysctl::PROC_SYS),
            sysctls.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        if let Err(e) = swap::enforce(sys, log, machine.swap) {
            log.line(&format!("swap: {}", crate::error_chain(&e)));
        }
        let hostname = machine
            .hostname
            .clone()
            .unwrap_or_else(|| etc_files::default_hostname(&self.machine_id));
        if let Err(e) = sys.sethostname(&hostname) {
            log.line(&format!("hostname {hostname} not set: {}", errno_name(&e)));
        } else {
            log.line(&format!("hostname {hostname}"));
        }
        write_files(log, &machine.files);
        if self.etc_ok {
            let input = EtcInput {
                hostname: hostname.clone(),
                nameservers: machine.network.nameservers.clone(),
                machine_id: self.machine_id.clone(),
            };
            match etc_files::write(Path::new("/etc"), &etc_files::render(&input)) {
                Ok(()) => log.line(
                    "/etc written: hostname hosts resolv.conf machine-id containerd/config.toml",
                ),
                Err(e) => log.line(&format!("/etc not written: {e}")),
            }
        }
        if let Some(stop) = self.network.take() {
            let _ = stop.send(());
        }
        self.network = Some(network::start(
            &machine.network,
            machine.hostname.as_deref(),
            self.events.clone(),
        ));

        let mut notes = Vec::new();
        let specs = services::catalog(config, &|p: &Path| p.is_file(), &mut |n| notes.push(n));
        for note in notes {
            log.line(&note);
        }
        let runner = self.runner();
        runner.supervisor = Supervisor::new(specs, Backoff::DEFAULT);
        let actions = runner.supervisor.start_autostart(log);
        runner.apply(actions, log);
        self.config = Some(accepted);
    }

    /// After the main loop: stop every process, unmount, go down.
    async fn finish(&mut self, kind: ShutdownKind) -> io::Error {
        let log = self.log;
        let sys = self.sys;
        if let Some(socket) = self.control_socket.take() {
            socket.abort();
        }
        if let Some(stop) = self.network.take() {
            let _ = stop.send(());
        }
        // Let netconf give its DHCP leases back, and the aborted tasks close their files.
        tokio::time::sleep(Duration::from_millis(200)).await;
        log.line("services stopped; stopping every other process (SIGTERM)");
        let _ = sys.kill_all(false);
        let deadline = Instant::now() + shutdown::GRACE;
        let mut killed = false;
        loop {
            let (_, left) = supervisor::reap_any();
            if !left {
                break;
            }
            if Instant::now() >= deadline {
                if killed {
                    log.line("processes remain after SIGKILL: going down anyway");
                    break;
                }
                log.line(&format!(
                    "processes left after {} s: SIGKILL",
                    shutdown::GRACE.as_secs()
                ));
                let _ = sys.kill_all(true);
                killed = true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stuck = shutdown::unmount_all(sys, log);
        if !stuck.is_empty() {
            log.line(&format!("still mounted: {}", stuck.join(" ")));
        }
        shutdown::finish(sys, log, kind)
    }
}

/// Write the config's `[[machine.files]]`, creating parent directories.
fn write_files(log: &dyn Log, files: &[keelson_configs::schema::File]) {
    use std::os::unix::fs::PermissionsExt;
    for file in files {
        let path = Path::new(&file.path);
        let result = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(path, &file.content))
            .and_then(|()| {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(file.mode.0))
            });
        match result {
            Ok(()) => log.line(&format!("file {} written ({:o})", file.path, file.mode.0)),
            Err(e) => log.line(&format!("file {} not written: {e}", file.path)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::memory::MemoryLog;
    use crate::syscalls::fake::{Call, Fake};

    #[test]
    fn os_release_versions() {
        assert_eq!(
            os_release_version("NAME=Keelson\nVERSION_ID=\"0.2.0\"\n"),
            Some("0.2.0".to_string())
        );
        assert_eq!(os_release_version("VERSION_ID=1\n"), Some("1".to_string()));
        assert_eq!(os_release_version("NAME=x\n"), None);
    }

    #[test]
    fn the_banner_has_defaults() {
        let b = banner(&Fake::new(), "");
        assert_eq!(b.version, env!("CARGO_PKG_VERSION"));
        assert_eq!((b.slot.as_str(), b.root_hash.as_str()), ("?", "none"));
        let fake = Fake::new().with_file("/usr/lib/os-release", "VERSION_ID=0.9.1\n");
        assert_eq!(
            banner(&fake, "keelson.slot=b keelson.verity.roothash=abcd").to_string(),
            "Keelson 0.9.1 slot=b verity=abcd kernel=6.12.0-test arch=x86_64"
        );
    }

    fn mount(spec: &MountSpec) -> Call {
        Call::Mount {
            source: spec.source.into(),
            target: spec.target.into(),
            fstype: spec.fstype.into(),
            flags: spec.flags,
            data: spec.data.into(),
        }
    }

    #[test]
    fn the_mount_table_is_applied_in_order_and_optional_failures_pass() {
        let mut fake =
            Fake::new().with_file("/sys/fs/cgroup/cgroup.controllers", "cpu memory pids\n");
        for m in ["/proc", "/sys", "/dev"] {
            fake.mount_points.borrow_mut().insert(PathBuf::from(m));
        }
        fake.mount_errors.insert("efivarfs".into(), 19);
        let log = MemoryLog::default();
        let index = early_mounts(&fake, &log);
        assert!(matches!(index, Ok(None)));
        let mounts: Vec<Call> = fake
            .calls()
            .into_iter()
            .filter(|c| matches!(c, Call::Mount { .. }))
            .collect();
        let expected: Vec<Call> = STAGE2_MOUNTS
            .iter()
            .chain(OPTIONAL_MOUNTS)
            .map(mount)
            .collect();
        assert_eq!(mounts, expected);
        assert!(fake.calls().contains(&Call::CtrlAltDelToInit));
        assert!(fake.calls().contains(&Call::WriteFile(
            "/sys/fs/cgroup/cgroup.subtree_control".into(),
            b"+cpu +memory +pids".to_vec()
        )));
        let lines = log.lines();
        assert_eq!(
            lines[0],
            "keelson-init: mounted /dev/pts /dev/shm /run /sys/fs/cgroup /tmp"
        );
        assert!(lines.contains(
            &"keelson-init: optional mount skipped: cannot mount efivarfs at /sys/firmware/efi/efivars: ENODEV (19)".to_string()
        ));
        assert!(lines.contains(&"keelson-init: mounted /sys/kernel/security".to_string()));
    }

    #[test]
    fn a_failed_required_mount_is_fatal() {
        let mut fake = Fake::new();
        fake.mount_errors.insert("cgroup2".into(), 19);
        let err = early_mounts(&fake, &MemoryLog::default())
            .err()
            .map(|e| crate::error_chain(&e));
        assert_eq!(
            err.as_deref(),
            Some("early mounts failed: cannot mount cgroup2 at /sys/fs/cgroup: ENODEV (19)")
        );
    }

    #[test]
    fn the_machine_id_is_kept_in_state() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut fake = Fake::new();
        fake.device = Some((16, None));
        let log = MemoryLog::default();
        // The fake's "urandom" gives zeros: a valid id needs a non-zero digit, so the
        // first id is all zeros and refused when read back; write a real one instead.
        std::fs::write(
            dir.path().join("machine-id"),
            "0123456789abcdef0123456789abcdef\n",
        )?;
        assert_eq!(
            machine_id(&fake, &log, Some(dir.path())),
            "0123456789abcdef0123456789abcdef"
        );
        assert!(log.lines().is_empty());
        // None in STATE: a new one is made and written there.
        let empty = tempfile::tempdir()?;
        let id = machine_id(&fake, &log, Some(empty.path()));
        assert_eq!(id.len(), 32);
        assert_eq!(
            std::fs::read_to_string(empty.path().join("machine-id"))?,
            format!("{id}\n")
        );
        assert!(log.lines()[0].ends_with("created and kept in STATE"));
        Ok(())
    }
}
