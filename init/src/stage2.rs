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
//!    STATE mounted at `/system/state`, EPHEMERAL at `/var`. A STATE without a
//!    filesystem (a first boot) holds nothing to read: it is formatted and mounted in
//!    step 6, once containerd is spawned, or before the node waits for a config.
//! 4. **`/etc`**: a tmpfs with the image's files and the generated ones (`etc_files`);
//!    the machine id comes from STATE, or is made (and kept there in step 6, or before
//!    the wait for a config).
//! 5. **Config** (`config_source`): a config staged in STATE for this boot is promoted
//!    first (`state::promote_staged`); then STATE, fw_cfg, config drive, a URL. Without
//!    a valid one the node waits, says so every 30 s, and serves maintenance mode:
//!    machined alone (it serves `version` and `apply-config --insecure`) and DHCP on every
//!    link; machined's `config-installed` ends the wait with the config it wrote to STATE.
//! 6. **Configure** (once a valid config is there): what containerd's start needs
//!    (overlay, the CNI plugins' overlay at [`CNI_BIN_DIR`], hostname, files, `/etc`),
//!    containerd spawned, then while it starts: a
//!    new STATE formatted and mounted, the config's files in STATE (a worker's node API
//!    certificate) written, a new machine id and the config kept in STATE, the
//!    config's other modules (br_netfilter, ...), sysctls (defaults + config), swap off,
//!    network (`netconf`), and the other services (`services`, `supervisor`: machined
//!    once containerd is ready). Once containerd is ready (or [`NETWORK_MODULES_AFTER`]
//!    has passed): the power button's modules and watch, the network drivers and the
//!    disk drivers stage 1 left; preflight then too.
//! 7. **Main loop**: one [`Event`] at a time until a shutdown request (signal or control
//!    socket) has stopped every service; then the rest of the processes are stopped, the
//!    filesystems unmounted, and the machine restarted or powered off (`shutdown`). A
//!    reset (control socket) formats STATE and EPHEMERAL anew once they are unmounted,
//!    so the next boot waits for a config.
//!
//! Control requests that change the running node: `apply` (`live`: validated, planned
//! against the node, applied or refused whole; the network engine restarted here),
//! `kill` (a signal to a service's process; the supervisor restarts it), and the
//! shutdowns, begun [`control::SHUTDOWN_DELAY`] after their answer.

use std::convert::Infallible;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keelson_configs::layout::{
    self, CMDLINE_VERITY_ROOTHASH, PART_EPHEMERAL, PART_STATE, cmdline_value, parse_cmdline,
};
use keelson_configs::{MachineConfig, Mode};
use keelson_netconf::{NetEvent, resolv};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio::sync::oneshot;

use crate::bootlog::BootLog;
use crate::cmdline;
use crate::config_source::{self, Accepted, Source};
use crate::console::Log;
use crate::control::{self, Call, Info, Request, Response};
use crate::disks;
use crate::drivers::{DISK_MODULES, EARLY_MODULES, NETWORK_MODULES, POWER_BUTTON_MODULES};
use crate::etc_files::{self, EtcInput};
use crate::events::{Event, EventTx, TimerEvent};
use crate::kmods;
use crate::live;
use crate::modules;
use crate::mounts::{self, EARLY_MOUNTS, MountSpec};
use crate::network;
use crate::power_button;
use crate::prefetch;
use crate::preflight;
use crate::sender::Sender;
use crate::services;
use crate::shutdown;
use crate::shutdown::ShutdownKind;
use crate::signals::{self, SignalKind};
use crate::state;
use crate::supervisor::reaper::{self, ReapScope};
use crate::supervisor::runner::{Runner, ServiceEvent};
use crate::supervisor::{Backoff, ServiceSpec, State, Supervisor};
use crate::swap;
use crate::syscalls::{MountFlags, Syscalls, errno_name};
use crate::sysctl;

/// The line end-to-end tests wait for: stage 2 is running from the verified root.
pub const READY_MARKER: &str = "KEELSON STAGE2 READY";

/// How long after the last autostart service became ready PID 1 reports its own memory.
pub const IDLE_REPORT_AFTER: Duration = Duration::from_secs(10);
/// How long the network drivers wait for containerd's readiness at most.
pub const NETWORK_MODULES_AFTER: Duration = Duration::from_secs(10);

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

/// Where containerd's CRI looks for CNI plugins (`bin_dir` in its config), as on Talos:
/// the image's plugins ([`CNI_IMAGE_DIR`]) under a writable overlay whose changes live on
/// EPHEMERAL ([`CNI_OVERLAY_DIRS`]), so that a pod network's installer (flannel's or
/// Calico's init container, through a hostPath of `/opt/cni/bin`) can add its own
/// plugins, and they stay until EPHEMERAL is wiped. The image carries the empty
/// directory as the mount point.
pub const CNI_BIN_DIR: &str = "/opt/cni/bin";
/// The image's CNI plugins (Debian's containernetworking-plugins).
pub const CNI_IMAGE_DIR: &str = "/usr/lib/cni";
/// The overlay's directories on EPHEMERAL, parents first: its upper and work dirs last.
pub const CNI_OVERLAY_DIRS: [&str; 5] = [
    "/var/lib",
    "/var/lib/keelson",
    "/var/lib/keelson/cni-bin",
    "/var/lib/keelson/cni-bin/upper",
    "/var/lib/keelson/cni-bin/work",
];
/// The overlay over [`CNI_BIN_DIR`] (module `overlay`, loaded for containerd first).
pub const CNI_BIN_OVERLAY: MountSpec = MountSpec {
    source: "overlay",
    target: CNI_BIN_DIR,
    fstype: "overlay",
    flags: NOSUID_NODEV,
    data: "lowerdir=/usr/lib/cni,upperdir=/var/lib/keelson/cni-bin/upper,workdir=/var/lib/keelson/cni-bin/work",
};
/// Without the overlay (no EPHEMERAL, no `overlay` module): the image's plugins alone,
/// read-only, so that pod networks built on them still work.
pub const CNI_BIN_FALLBACK: MountSpec = MountSpec {
    source: CNI_IMAGE_DIR,
    target: CNI_BIN_DIR,
    fstype: "",
    flags: MountFlags::BIND,
    data: "",
};

/// Mount [`CNI_BIN_OVERLAY`], or else [`CNI_BIN_FALLBACK`], and say which.
pub fn mount_cni_bin(sys: &dyn Syscalls, log: &dyn Log) {
    let overlay = CNI_OVERLAY_DIRS
        .iter()
        .try_for_each(|dir| mounts::ensure_dir(sys, Path::new(dir), 0o755))
        .map_err(|e| format!("cannot create its directories on /var: {}", errno_name(&e)))
        .and_then(|()| mounts::apply(sys, &[CNI_BIN_OVERLAY]).map_err(|e| e.to_string()));
    let why = match overlay {
        Ok(_) => {
            log.line(&format!(
                "CNI plugins: {CNI_BIN_DIR} holds the image's ({CNI_IMAGE_DIR}) and takes more; \
                 what is added is kept in /var/lib/keelson/cni-bin"
            ));
            return;
        }
        Err(why) => why,
    };
    match mounts::apply(sys, &[CNI_BIN_FALLBACK]) {
        Ok(_) => log.line(&format!(
            "CNI plugins: {CNI_BIN_DIR} is not writable ({why}): it holds the image's \
             ({CNI_IMAGE_DIR}) alone, and a pod network that installs its own plugins \
             will fail; check that EPHEMERAL is mounted at /var"
        )),
        Err(e) => log.line(&format!(
            "CNI plugins: {CNI_BIN_DIR} is empty ({why}; {e}): pods get no network; \
             the image must provide {CNI_BIN_DIR}"
        )),
    }
}

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

/// The machine id's file in STATE.
const MACHINE_ID_FILE: &str = "machine-id";

/// The machine id: STATE's, or a new random one. The second value says whether it still
/// has to be kept in STATE ([`keep_machine_id`]): stage 2 does that once containerd is
/// spawned, since the write's fsyncs cost 40-50 ms of the boot under TCG.
pub fn machine_id(sys: &dyn Syscalls, log: &dyn Log, state_dir: Option<&Path>) -> (String, bool) {
    if let Some(dir) = state_dir
        && let Ok(Some(bytes)) = state::read(dir, MACHINE_ID_FILE)
        && let Some(id) = etc_files::parse_machine_id(&String::from_utf8_lossy(&bytes))
    {
        return (id, false);
    }
    let id = new_machine_id(sys, log);
    if state_dir.is_none() {
        log.line(&format!(
            "machine id {id} (STATE unavailable: a new one next boot)"
        ));
    }
    let keep = state_dir.is_some();
    (id, keep)
}

/// A new random machine id.
fn new_machine_id(sys: &dyn Syscalls, log: &dyn Log) -> String {
    let (raw, unread) = crate::syscalls::random_bytes(sys);
    if let Some(e) = unread {
        log.line(&format!(
            "no randomness for the machine id ({}): using the clock",
            errno_name(&e)
        ));
    }
    etc_files::machine_id_from(&raw)
}

/// Keep a new machine id in STATE, so that later boots have the same one.
pub fn keep_machine_id(log: &dyn Log, state_dir: &Path, id: &str) {
    match state::write_atomic(state_dir, MACHINE_ID_FILE, format!("{id}\n").as_bytes()) {
        Ok(()) => log.line(&format!("machine id {id} created and kept in STATE")),
        Err(e) => log.line(&format!(
            "machine id {id} not kept: {}",
            crate::error_chain(&e)
        )),
    }
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
    if let Err(e) = etc_files::write(sys, Path::new("/etc"), &image_etc) {
        log.line(&format!("cannot copy the image's /etc: {e}"));
    }
    true
}

/// A partition a reset wipes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wipe {
    /// `STATE` or `EPHEMERAL`.
    pub name: &'static str,
    /// Its device.
    pub device: String,
    /// Where it was mounted.
    pub target: String,
}

/// The partitions a reset wipes: those `disks::prepare` mounted.
pub fn wipes(report: &disks::Report) -> Vec<Wipe> {
    [
        (PART_STATE, &report.state),
        (PART_EPHEMERAL, &report.ephemeral),
    ]
    .into_iter()
    .filter_map(|(name, outcome)| {
        outcome.as_ref().ok().map(|m| Wipe {
            name,
            device: m.device.clone(),
            target: m.target.clone(),
        })
    })
    .collect()
}

/// A reset's last step, once everything is unmounted: a new empty ext4 filesystem on
/// each partition (`mke2fs`, as the first boot makes them). A partition still mounted
/// (busy, remounted read-only) is left alone and said so.
pub fn wipe_partitions(sys: &dyn Syscalls, log: &dyn Log, wipes: &[Wipe]) {
    for w in wipes {
        if sys.is_mount_point(Path::new(&w.target)).unwrap_or(false) {
            log.line(&format!(
                "reset: {} ({}) is still mounted at {}: not wiped; reset again, or wipe the partition from another system",
                w.name, w.device, w.target
            ));
            continue;
        }
        match disks::format(sys, w.name, &w.device) {
            Ok(()) => log.line(&format!(
                "reset: {} ({}) wiped: a new empty ext4 filesystem",
                w.name, w.device
            )),
            Err(e) => log.line(&format!(
                "reset: {} not wiped: {}",
                w.name,
                crate::error_chain(&e)
            )),
        }
    }
}

/// Promote a config staged in STATE for this boot, before anything reads the config.
pub fn promote_staged(log: &dyn Log, dir: &Path) {
    let staged = dir.join(layout::STATE_CONFIG_STAGED).display().to_string();
    let judge = |bytes: &[u8]| {
        let checked = keelson_configs::check_bytes(bytes, &staged, Mode::Metal);
        if checked.is_valid() {
            Ok(())
        } else {
            Err(checked
                .diagnostics
                .iter()
                .filter(|d| d.is_error())
                .map(ToString::to_string)
                .collect())
        }
    };
    match state::promote_staged(dir, judge) {
        Ok(state::Promotion::Nothing) => {}
        Ok(state::Promotion::Promoted) => log.line(&format!(
            "staged config {staged} promoted to {}: this boot runs it",
            layout::STATE_CONFIG
        )),
        Ok(state::Promotion::Refused(errors)) => {
            log.line(&format!(
                "staged config {staged} refused: {} error(s); kept as {} and the config in effect stays",
                errors.len(),
                state::STAGED_REFUSED
            ));
            for e in errors {
                log.line(&format!("config error: {e}"));
            }
        }
        Err(e) => log.line(&format!(
            "staged config {staged} not promoted: {}",
            crate::error_chain(&e)
        )),
    }
}

/// The whole of stage 2; returns only with an error that needs a deliberate reboot.
pub fn run<L: Log>(sys: &dyn Syscalls, console: &L) -> Result<Infallible, Error> {
    let log = BootLog::new(console);
    let (tx, rx) = unbounded_channel();
    // First, so that the reads overlap everything below (see `prefetch`).
    if let Err(e) = prefetch::spawn(prefetch::list_path(), Sender::new(tx.clone())) {
        log.line(&format!(
            "prefetch not started ({}): programs load on demand",
            errno_name(&e)
        ));
    }
    let index = early_mounts(sys, &log)?;
    log.raw(READY_MARKER);
    let cmdline = sys
        .read_file(Path::new("/proc/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    log.line(&format!("stage 2 banner: {}", banner(sys, &cmdline)));

    let disk_options = disks::Options {
        slot_partname: cmdline::slot(&cmdline).map(|s| s.partition_name().to_string()),
        defer_new_state: true,
        ..disks::Options::default()
    };
    let (state_dir, wipe, state_pending) =
        match disks::prepare(sys, &log, index.as_ref(), &disk_options) {
            Ok(report) => {
                let pending = match &report.state {
                    Err(disks::Error::Deferred { device, size, .. }) => {
                        Some((device.clone(), *size))
                    }
                    _ => None,
                };
                (
                    report.state.is_ok().then(state::state_dir),
                    wipes(&report),
                    pending,
                )
            }
            Err(e) => {
                log.line(&format!("disks: {}", crate::error_chain(&e)));
                (None, Vec::new(), None)
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
        promote_staged(&log, dir);
    }
    let etc_ok = mount_etc(sys, &log);
    // A new STATE (formatted later, see `finish_state`) has no machine id yet: a new one,
    // kept once STATE is there.
    let (machine_id, machine_id_unkept) = match &state_pending {
        Some(_) => (new_machine_id(sys, &log), true),
        None => machine_id(sys, &log, state_dir.as_deref()),
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let mut node = Node {
        sys,
        log: &log,
        events: tx.clone(),
        runner: None,
        modules: index,
        config: None,
        machine_id,
        machine_id_unkept,
        cmdline,
        state_dir,
        state_pending,
        disk_options,
        etc_ok,
        started: Instant::now(),
        shutdown: None,
        preflight_done: false,
        idle_reported: false,
        url_failures: 0,
        fetching: false,
        network: None,
        control_socket: None,
        wipe,
        maintenance: Maintenance::Off,
        shutdown_pending: None,
        reset: false,
        late_drivers_loaded: false,
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
    /// The machine id is new and not yet in STATE ([`Node::keep_machine_id`]).
    machine_id_unkept: bool,
    cmdline: String,
    state_dir: Option<PathBuf>,
    /// A new STATE not formatted yet (device, size): see [`Node::finish_state`].
    state_pending: Option<(String, u64)>,
    disk_options: disks::Options,
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
    /// What a reset wipes.
    wipe: Vec<Wipe>,
    /// Whether machined serves maintenance mode.
    maintenance: Maintenance,
    /// A shutdown answered through the control socket, begun shortly after.
    shutdown_pending: Option<ShutdownKind>,
    /// The shutdown under way is a reset: wipe STATE and EPHEMERAL at its end.
    reset: bool,
    /// The network drivers were loaded.
    late_drivers_loaded: bool,
}

/// Maintenance mode (no config yet: machined alone, for `apply-config --insecure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Maintenance {
    /// Not tried yet (or the node is configured).
    Off,
    /// machined serves it.
    Serving,
    /// Not possible on this boot (said once).
    Unavailable,
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
        config_source::fetch_later(url, delay, Sender::new(self.events.clone()));
    }

    /// The loop: events until a shutdown has stopped every service.
    async fn main_loop(&mut self, mut rx: UnboundedReceiver<Event>) -> ShutdownKind {
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
        match config_source::find_local(
            self.sys,
            self.log,
            Path::new("/sys"),
            self.modules.as_ref(),
        ) {
            Some(accepted) => {
                self.configure(accepted);
                self.after(NETWORK_MODULES_AFTER, TimerEvent::LateDrivers);
            }
            None => {
                // Waiting for a config takes DHCP on the links present when it starts.
                self.load_late_drivers();
                self.wait_for_config();
            }
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

    /// Keep a new machine id in STATE, once.
    fn keep_machine_id(&mut self) {
        if !std::mem::take(&mut self.machine_id_unkept) {
            return;
        }
        if let Some(dir) = &self.state_dir {
            keep_machine_id(self.log, dir, &self.machine_id);
        }
    }

    /// The power button's modules, then its watch.
    fn load_power_button(&self) {
        if let Some(index) = &self.modules {
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

    /// The power button, the network drivers and the disk drivers stage 1 left, once.
    fn load_late_drivers(&mut self) {
        if self.late_drivers_loaded {
            return;
        }
        self.late_drivers_loaded = true;
        self.load_power_button();
        if let Some(index) = &self.modules {
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

    fn wait_for_config(&mut self) {
        // Maintenance mode keeps the config it is given in STATE.
        self.finish_state();
        self.keep_machine_id();
        for line in config_source::waiting_message(self.url().as_deref()) {
            self.log.line(&line);
        }
        self.after(config_source::REMINDER, TimerEvent::ConfigReminder);
        self.start_maintenance();
        if (self.url().is_some() || self.maintenance == Maintenance::Serving)
            && self.network.is_none()
        {
            // The URL and the API need an address: DHCP on every link until a config
            // says more.
            let net = network::dhcp_everywhere(self.sys, Path::new("/sys"));
            self.network = Some(network::start(&net, None, Sender::new(self.events.clone())));
        }
    }

    /// Start machined alone, once: with no config in STATE it serves maintenance mode.
    fn start_maintenance(&mut self) {
        if self.maintenance != Maintenance::Off || self.shutdown.is_some() {
            return;
        }
        let log = self.log;
        if self.state_dir.is_none() {
            log.line("maintenance mode unavailable: STATE is not mounted, so a config pushed over the API could not be kept");
            self.maintenance = Maintenance::Unavailable;
            return;
        }
        if !Path::new(services::MACHINED).is_file() {
            log.line(&format!(
                "maintenance mode unavailable: {} is not in this image",
                services::MACHINED
            ));
            self.maintenance = Maintenance::Unavailable;
            return;
        }
        log.line(&format!(
            "maintenance mode: machined serves version and apply-config on port {} (machinectl --insecure)",
            layout::API_PORT
        ));
        self.maintenance = Maintenance::Serving;
        let runner = self.runner();
        runner.supervisor.add(vec![services::machined()]);
        let actions = runner.supervisor.start_autostart(log);
        runner.apply(actions, log);
    }

    fn runner(&mut self) -> &mut Runner {
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
            Event::Service(ServiceEvent::Output { service, line }) => {
                let sup = &mut self.runner().supervisor;
                let name = sup.name(service).unwrap_or("service");
                log.console().raw(&format!("{name}: {line}"));
                sup.record_output(service, &line);
            }
            Event::Service(event) => {
                self.runner().handle(event, log);
                self.after_service_change();
            }
            Event::Timer(TimerEvent::ConfigReminder) => {
                if self.config.is_none() && self.shutdown.is_none() {
                    match config_source::find_local(
                        self.sys,
                        log,
                        Path::new("/sys"),
                        self.modules.as_ref(),
                    ) {
                        Some(accepted) => self.configure(accepted),
                        None => self.wait_for_config(),
                    }
                }
            }
            Event::Timer(TimerEvent::Shutdown(kind)) => {
                self.shutdown_pending = None;
                let why = if self.reset {
                    "reset through the control socket"
                } else {
                    "control socket"
                };
                self.begin_shutdown(kind, why);
            }
            Event::Timer(TimerEvent::ShutdownDeadline) => {
                log.line(&format!(
                    "services did not stop within {} s: going on",
                    shutdown::SERVICES_DEADLINE.as_secs()
                ));
                // Forget them: the kill of every process follows.
                self.runner = None;
            }
            Event::Timer(TimerEvent::LateDrivers) => self.load_late_drivers(),
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
            Event::PowerButton(power_button::Pressed(device)) => {
                self.begin_shutdown(ShutdownKind::PowerOff, &format!("power button {device}"));
            }
            Event::Network(event) => self.network_event(event),
            Event::ConfigFetched(config_source::Fetched { url, result }) => {
                self.config_fetched(url, result)
            }
            Event::Prefetched(outcome) => log.line(&outcome.to_string()),
            Event::Control(Call { request, reply }) => {
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
                if let Err(e) = etc_files::write(self.sys, Path::new("/etc"), &[entry]) {
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
            if let Err(e) = etc_files::write(self.sys, Path::new("/etc"), &entries) {
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
        if ready(services::CONTAINERD) {
            self.load_late_drivers();
        }
        if !self.preflight_done && ready(services::CONTAINERD) {
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
            Request::Reboot => return self.shutdown_later(ShutdownKind::Reboot, false),
            Request::Poweroff => return self.shutdown_later(ShutdownKind::PowerOff, false),
            Request::Reset => return self.shutdown_later(ShutdownKind::Reboot, true),
            Request::Kill { service, signal } => return self.kill(&service, &signal),
            Request::Apply { parts, config } => return self.apply_live(&parts, config),
            Request::ConfigInstalled => return self.config_installed(),
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

    /// Answer a reboot, power-off or reset now and begin it shortly after, so that the
    /// answer reaches machined before the shutdown stops it.
    fn shutdown_later(&mut self, kind: ShutdownKind, reset: bool) -> Response {
        if let Some(current) = self.shutdown.or(self.shutdown_pending) {
            return Response::error(format!("a {} is already under way", current.describe()));
        }
        if reset {
            if self.wipe.is_empty() {
                return Response::error(
                    "reset refused: neither STATE nor EPHEMERAL was prepared at this boot (see the boot log), so there is nothing to wipe; reboot the node instead",
                );
            }
            self.reset = true;
        }
        self.shutdown_pending = Some(kind);
        self.after(control::SHUTDOWN_DELAY, TimerEvent::Shutdown(kind));
        let what = if reset {
            let names: Vec<&str> = self.wipe.iter().map(|w| w.name).collect();
            format!(
                "reset: stopping services, wiping {}, then rebooting to wait for a config",
                names.join(" and ")
            )
        } else {
            format!("{}: stopping services", kind.describe())
        };
        self.log.line(&format!(
            "{} asked through the control socket: it begins in {} s",
            if reset { "reset" } else { kind.describe() },
            control::SHUTDOWN_DELAY.as_secs()
        ));
        Response::message(what)
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
        if self.shutdown.is_some() || self.shutdown_pending.is_some() {
            return Response::error("the node is going down: nothing was applied");
        }
        let Some(current) = self.config.as_ref() else {
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
        let paths = live::Paths::node(self.etc_ok);
        let env = live::Env {
            sys: self.sys,
            log,
            modules: self.modules.as_ref(),
            paths: &paths,
            current: Some(&current.config),
            machine_id: &self.machine_id,
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
            if self.etc_ok && !machine.network.nameservers.is_empty() {
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
        self.config = Some(Accepted {
            source: Source::Api,
            bytes: text.into_bytes(),
            config,
        });
        Response::messages(messages)
    }

    /// `config-installed`: machined wrote the first config to STATE; continue the boot.
    fn config_installed(&mut self) -> Response {
        let log = self.log;
        if let Some(running) = &self.config {
            return Response::message(format!(
                "the node already runs a config (from {}); nothing to do",
                running.source
            ));
        }
        let Some(dir) = self.state_dir.clone() else {
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
                self.configure(Accepted {
                    source: Source::State,
                    bytes,
                    config,
                });
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

    /// Step 6: apply a valid config and start the services.
    ///
    /// containerd first: what its start needs (its modules, [`services::CONTAINERD_MODULES`],
    /// the hostname, the config's files, `/etc`) is done, containerd is spawned, and
    /// then the rest (the config kept in STATE, the other modules, sysctls, swap off, the
    /// network) is done while containerd's own start runs (1.3 s of mostly one thread
    /// under TCG, with the other CPU idle). All of it is done before this returns, so
    /// before init handles containerd's readiness or starts any other service.
    fn configure(&mut self, accepted: Accepted) {
        let log = self.log;
        let sys = self.sys;
        log.line(&format!("applying the config from {}", accepted.source));
        let config: &MachineConfig = &accepted.config;
        let machine = &config.machine;
        let (for_containerd, other_modules): (Vec<String>, Vec<String>) = machine
            .effective_kernel_modules()
            .into_iter()
            .partition(|m| services::CONTAINERD_MODULES.contains(&m.as_str()));
        self.load_config_modules(&for_containerd);
        // Before the config's files, which may add plugins there.
        mount_cni_bin(sys, log);
        let hostname = machine
            .hostname
            .clone()
            .unwrap_or_else(|| etc_files::default_hostname(&self.machine_id));
        if let Err(e) = sys.sethostname(&hostname) {
            log.line(&format!("hostname {hostname} not set: {}", errno_name(&e)));
        } else {
            log.line(&format!("hostname {hostname}"));
        }
        // Files in STATE (a worker's node API certificate) wait until a new STATE is
        // formatted and mounted, after containerd's spawn (`finish_state`).
        let (state_files, files): (Vec<_>, Vec<_>) = machine
            .files
            .iter()
            .partition(|f| Path::new(&f.path).starts_with(&self.disk_options.state_mount));
        write_files(self.sys, log, files);
        if self.etc_ok {
            let input = EtcInput {
                hostname: hostname.clone(),
                nameservers: machine.network.nameservers.clone(),
                machine_id: self.machine_id.clone(),
            };
            match etc_files::write(self.sys, Path::new("/etc"), &etc_files::render(&input)) {
                Ok(()) => log.line(
                    "/etc written: hostname hosts resolv.conf machine-id containerd/config.toml",
                ),
                Err(e) => log.line(&format!("/etc not written: {e}")),
            }
        }

        let mut notes = Vec::new();
        let specs = services::catalog(config, &|p: &Path| p.is_file(), &mut |n| notes.push(n));
        for note in notes {
            log.line(&note);
        }
        if self.maintenance == Maintenance::Serving {
            log.line("maintenance mode ends: machined goes on with mutual TLS");
            self.maintenance = Maintenance::Off;
        }
        let (first, rest): (Vec<ServiceSpec>, Vec<ServiceSpec>) = specs
            .into_iter()
            .partition(|s| s.name == services::CONTAINERD);
        self.start_services(first);

        self.finish_state();
        self.keep_machine_id();
        write_files(self.sys, log, state_files);
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
        self.load_config_modules(&other_modules);
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
        if let Some(stop) = self.network.take() {
            let _ = stop.send(());
        }
        self.network = Some(network::start(
            &machine.network,
            machine.hostname.as_deref(),
            Sender::new(self.events.clone()),
        ));
        // Added, not replaced: machined may already run (maintenance mode).
        self.start_services(rest);
        self.config = Some(accepted);
    }

    /// Format and mount a new STATE that the disks step left (a first boot), and add it
    /// to what a reset wipes. Done once containerd is spawned, or before the node waits
    /// for a config (then [`Node::keep_machine_id`]): a new STATE holds nothing to read,
    /// and containerd needs only EPHEMERAL.
    fn finish_state(&mut self) {
        let Some((device, size)) = self.state_pending.take() else {
            return;
        };
        let log = self.log;
        match disks::finish_deferred(self.sys, log, &self.disk_options, &device, size) {
            Ok(mounted) => {
                let dir = state::state_dir();
                self.wipe.push(Wipe {
                    name: PART_STATE,
                    device: mounted.device,
                    target: mounted.target,
                });
                self.state_dir = Some(dir);
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
        match &self.modules {
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
    fn start_services(&mut self, specs: Vec<ServiceSpec>) {
        let log = self.log;
        let runner = self.runner();
        runner.supervisor.add(specs);
        let actions = runner.supervisor.start_autostart(log);
        runner.apply(actions, log);
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
            let (_, left) = reaper::reap_any();
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
        if self.reset {
            wipe_partitions(sys, log, &self.wipe);
        }
        shutdown::finish(sys, log, kind)
    }
}

/// Write the config's `[[machine.files]]`, creating parent directories.
fn write_files<'f>(
    sys: &dyn Syscalls,
    log: &dyn Log,
    files: impl IntoIterator<Item = &'f keelson_configs::schema::File>,
) {
    for file in files {
        let path = Path::new(&file.path);
        let result = path
            .parent()
            .map_or(Ok(()), |parent| sys.create_dir_all(parent))
            .and_then(|()| sys.install_file(path, file.content.as_bytes(), file.mode.0));
        match result {
            Ok(()) => log.line(&format!("file {} written ({:o})", file.path, file.mode.0)),
            Err(e) => log.line(&format!("file {} not written: {e}", file.path)),
        }
    }
}

#[cfg(test)]
// Tests build their fixtures on disk.
#[allow(clippy::disallowed_methods)]
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
    fn the_cni_plugins_dir_is_an_overlay_kept_on_ephemeral() {
        let fake = Fake::new();
        let log = MemoryLog::default();
        mount_cni_bin(&fake, &log);
        let mut expected: Vec<Call> = CNI_OVERLAY_DIRS
            .iter()
            .map(|d| Call::Mkdir((*d).into()))
            .collect();
        expected.push(Call::Mkdir(CNI_BIN_DIR.into()));
        expected.push(mount(&CNI_BIN_OVERLAY));
        assert_eq!(fake.calls(), expected);
        // The overlay's options name the image's plugins and the dirs made for it.
        let [.., upper, work] = CNI_OVERLAY_DIRS;
        assert_eq!(
            CNI_BIN_OVERLAY.data,
            format!("lowerdir={CNI_IMAGE_DIR},upperdir={upper},workdir={work}")
        );
        assert!(etc_files::containerd_config().contains(&format!("bin_dir = \"{CNI_BIN_DIR}\"")));
        assert_eq!(
            log.lines(),
            [
                "keelson-init: CNI plugins: /opt/cni/bin holds the image's (/usr/lib/cni) and takes more; what is added is kept in /var/lib/keelson/cni-bin"
            ]
        );
    }

    #[test]
    fn without_the_overlay_the_image_plugins_are_bound_read_only() {
        let mut fake = Fake::new();
        fake.mount_errors.insert("overlay".into(), 19);
        let log = MemoryLog::default();
        mount_cni_bin(&fake, &log);
        let mounts: Vec<Call> = fake
            .calls()
            .into_iter()
            .filter(|c| matches!(c, Call::Mount { .. }))
            .collect();
        assert_eq!(mounts, [mount(&CNI_BIN_OVERLAY), mount(&CNI_BIN_FALLBACK)]);
        assert_eq!(
            log.lines(),
            [
                "keelson-init: CNI plugins: /opt/cni/bin is not writable (cannot mount overlay at /opt/cni/bin: ENODEV (19)): it holds the image's (/usr/lib/cni) alone, and a pod network that installs its own plugins will fail; check that EPHEMERAL is mounted at /var"
            ]
        );
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
    fn a_reset_formats_what_is_unmounted_and_leaves_what_is_busy() {
        let mut fake = Fake::new();
        fake.read_data.insert("/dev/urandom".into(), vec![0x42; 16]);
        fake.mount_points.borrow_mut().insert(PathBuf::from("/var"));
        let log = MemoryLog::default();
        let wipes = [
            Wipe {
                name: PART_STATE,
                device: "/dev/vda4".into(),
                target: "/system/state".into(),
            },
            Wipe {
                name: PART_EPHEMERAL,
                device: "/dev/vda5".into(),
                target: "/var".into(),
            },
        ];
        wipe_partitions(&fake, &log, &wipes);
        assert_eq!(
            fake.calls()
                .into_iter()
                .filter(|c| matches!(c, Call::RunTool(..)))
                .collect::<Vec<_>>(),
            [Call::RunTool(
                disks::MKE2FS.into(),
                [
                    "-t",
                    "ext4",
                    "-L",
                    "STATE",
                    "-U",
                    "42424242-4242-4242-8242-424242424242",
                    "-F",
                    "-E",
                    "nodiscard,hash_seed=42424242-4242-4242-8242-424242424242",
                    "/dev/vda4"
                ]
                .map(String::from)
                .to_vec()
            )]
        );
        assert_eq!(
            log.lines(),
            [
                "keelson-init: reset: STATE (/dev/vda4) wiped: a new empty ext4 filesystem",
                "keelson-init: reset: EPHEMERAL (/dev/vda5) is still mounted at /var: not wiped; reset again, or wipe the partition from another system",
            ]
        );
    }

    #[test]
    fn a_staged_config_is_promoted_and_said_so() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = MemoryLog::default();
        promote_staged(&log, dir.path());
        assert!(log.lines().is_empty(), "nothing staged, nothing said");
        let good = include_str!("../../configs/tests/data/controlplane.toml");
        std::fs::write(dir.path().join(layout::STATE_CONFIG_STAGED), good)?;
        promote_staged(&log, dir.path());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(layout::STATE_CONFIG))?,
            good
        );
        std::fs::write(
            dir.path().join(layout::STATE_CONFIG_STAGED),
            "version = 7\n",
        )?;
        promote_staged(&log, dir.path());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(layout::STATE_CONFIG))?,
            good,
            "an invalid staged config is not promoted"
        );
        let lines = log.lines();
        let staged = dir.path().join(layout::STATE_CONFIG_STAGED);
        assert_eq!(
            lines[0],
            format!(
                "keelson-init: staged config {} promoted to config.toml: this boot runs it",
                staged.display()
            )
        );
        assert!(
            lines[1].ends_with("kept as config.staged.refused.toml and the config in effect stays"),
            "{lines:?}"
        );
        assert!(
            lines[2].starts_with("keelson-init: config error: "),
            "{lines:?}"
        );
        Ok(())
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
            ("0123456789abcdef0123456789abcdef".to_string(), false)
        );
        assert!(log.lines().is_empty());
        // None in STATE: a new one is made, to be written there.
        let empty = tempfile::tempdir()?;
        let (id, unkept) = machine_id(&fake, &log, Some(empty.path()));
        assert_eq!(id.len(), 32);
        assert!(unkept);
        assert!(!empty.path().join("machine-id").exists());
        keep_machine_id(&log, empty.path(), &id);
        assert_eq!(
            std::fs::read_to_string(empty.path().join("machine-id"))?,
            format!("{id}\n")
        );
        assert!(log.lines()[0].ends_with("created and kept in STATE"));
        Ok(())
    }
}
