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
//!    step 6, once containerd is spawned, or before the node waits for a config. Then
//!    the ESP at `/boot` and the boot assessment ([`crate::boot_assess`]): loader
//!    hygiene, a fallen-back slot recorded, a slot on trial recorded and, from the main
//!    loop, blessed once healthy or rebooted at its health deadline.
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
//!    containerd spawned, then while it starts (the boot plan, [`plan`]): a new
//!    STATE formatted and mounted, the config's files in STATE (a worker's node API
//!    certificate) written, a new machine id and the config kept in STATE, the
//!    config's other modules (br_netfilter, ...), sysctls (defaults + config), swap off,
//!    network (`netconf`), and the other services (`services`, `supervisor`: machined
//!    once containerd is ready). Once containerd is ready (or [`NETWORK_MODULES_AFTER`]
//!    has passed): the power button's modules and watch, the network drivers and the
//!    disk drivers stage 1 left; preflight then too.
//! 7. **Main loop**: one event ([`crate::events::Event`]) at a time, each turned into
//!    an input of the node's lifecycle ([`crate::lifecycle`]: its phases and their
//!    table), whose actions the loop carries out, until a shutdown request (signal or
//!    control socket) has stopped every service; then the rest of the processes are
//!    stopped, the filesystems unmounted, and the machine restarted or powered off
//!    (`shutdown`). A reset (control socket) formats STATE and EPHEMERAL anew once they
//!    are unmounted, so the next boot waits for a config.
//!
//! Control requests that change the running node: `apply` (`live`: validated, planned
//! against the node, applied or refused whole; the network engine restarted here),
//! `kill` (a signal to a service's process; the supervisor restarts it), and the
//! shutdowns, begun [`crate::control::SHUTDOWN_DELAY`] after their answer.
//!
//! The code, by job:
//!
//! - [`mounts_table`]: the mount tables, the early mounts and modules (steps 1 and 2),
//!   `/etc`'s tmpfs, the CNI plugins' overlay.
//! - [`boot`]: the banner, the disks, STATE's leftovers and staged config, `/etc`, the
//!   machine id (steps 3 to 5, before the main loop).
//! - `node`: the main loop: events to lifecycle inputs, and the lifecycle's actions.
//! - `health`: the boot assessment after each event (bless, or reboot at the deadline).
//! - `configure`: the boot plan's steps (step 6).
//! - `requests`: the control socket's requests.
//! - `finish`: the end: every process stopped, the filesystems unmounted.
//! - [`reset`]: what a reset wipes, and the wipe.

pub mod boot;
mod configure;
mod finish;
mod health;
pub mod mounts_table;
mod node;
mod requests;
pub mod reset;

use std::convert::Infallible;
use std::io;
use std::time::Duration;

use tokio::sync::mpsc::unbounded_channel;

use crate::bootlog::{BootLog, Kept};
use crate::console::{Console, Log};
use crate::fault;
use crate::lifecycle::plan;
use crate::logging::{self, RecordLog};
use crate::mounts;
use crate::prefetch;
use crate::sender::Sender;
use crate::syscalls::{Syscalls, errno_name};
use crate::watchdog;

pub use boot::{Banner, banner, keep_machine_id, machine_id, os_release_version, promote_staged};
pub use mounts_table::{
    CNI_BIN_DIR, CNI_BIN_FALLBACK, CNI_BIN_OVERLAY, CNI_IMAGE_DIR, CNI_OVERLAY_DIRS, ETC_MOUNT,
    OPTIONAL_MOUNTS, STAGE2_MOUNTS, apply_optional, early_mounts, mount_cni_bin,
};
pub use reset::{Wipe, wipe_partitions, wipes};

/// The line end-to-end tests wait for: stage 2 is running from the verified root.
pub const READY_MARKER: &str = "KEELSON STAGE2 READY";

/// How long after the last autostart service became ready PID 1 reports its own memory.
pub const IDLE_REPORT_AFTER: Duration = Duration::from_secs(10);
/// How long the network drivers wait for containerd's readiness at most (the boot
/// plan's [`plan::LATE_DRIVERS_LIMIT`]).
pub const NETWORK_MODULES_AFTER: Duration = plan::LATE_DRIVERS_LIMIT;

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

/// The whole of stage 2; returns only with an error that needs a deliberate reboot.
///
/// Its log is the records of [`logging`]: every line a `tracing` record, printed by the
/// console writer thread and kept in the boot log. Should that thread not start, the
/// lines go to `console` as they come (synchronously) and a boot log keeps them.
pub fn run<L: Log>(sys: &dyn Syscalls, console: &L) -> Result<Infallible, Error> {
    match logging::install(Console::new()) {
        Ok(records) => run_with(sys, &RecordLog::new(records)),
        Err(e) => {
            console.line(&format!(
                "console writer not started ({}): the console is written synchronously",
                errno_name(&e)
            ));
            run_with(sys, &BootLog::new(console))
        }
    }
}

/// Stage 2 on its log.
fn run_with<K: Kept>(sys: &dyn Syscalls, log: &K) -> Result<Infallible, Error> {
    // The watchdog stage 1 armed, adopted and pinged before anything else.
    let mut watchdog = watchdog::adopt(std::env::args(), log);
    let (tx, rx) = unbounded_channel();
    // First, so that the reads overlap everything below (see `prefetch`).
    if let Err(e) = prefetch::spawn(prefetch::list_path(), Sender::new(tx.clone())) {
        log.line(&format!(
            "prefetch not started ({}): programs load on demand",
            errno_name(&e)
        ));
    }
    let mounting = tracing::info_span!("mounts");
    let index = early_mounts(sys, log)?;
    drop(mounting);
    log.raw(READY_MARKER);
    let preparing = tracing::info_span!("disks_and_etc");
    let boot = boot::prepare(sys, log, index, watchdog.as_mut());
    drop(preparing);
    // The disks may have taken a while (a first boot formats EPHEMERAL).
    if let Some(watchdog) = &mut watchdog {
        watchdog.ping(std::time::Instant::now(), log);
    }
    // STATE is mounted and the boot recorded: where the test faults act (`fault`).
    fault::stage2(sys, log, &boot.cmdline);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let mut node = node::Node::new(sys, log, tx, boot);
    node.watchdog = watchdog;
    // A LocalSet: netconf's tasks run on this one thread next to the main loop.
    let local = tokio::task::LocalSet::new();
    let (kind, reset) = local.block_on(&runtime, node.main_loop(rx));
    let err = local.block_on(&runtime, node.finish(kind, reset));
    Err(Error::Reboot {
        what: kind.describe(),
        source: err,
    })
}
