//! Stage 2's boot before the main loop (steps 3 to 5): the banner, the disks, STATE's
//! interrupted writes and staged config, `/etc`, and the machine id; gathered in a
//! `Boot` that the main loop owns.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keelson_configs::Mode;
use keelson_configs::layout::{self, CMDLINE_VERITY_ROOTHASH, cmdline_value, parse_cmdline};

use crate::boot_assess::BootAssess;
use crate::cmdline;
use crate::console::Log;
use crate::disks;
use crate::etc_files;
use crate::kmods;
use crate::state;
use crate::syscalls::{Syscalls, errno_name};
use crate::watchdog::Watchdog;

use super::mounts_table::mount_etc;
use super::reset::{Wipe, wipes};

/// What the boot found and made before the main loop.
#[derive(Debug)]
pub(super) struct Boot {
    /// The root's module tree, when its index could be read.
    pub modules: Option<kmods::ModuleIndex>,
    /// The kernel command line.
    pub cmdline: String,
    /// The machine id.
    pub machine_id: String,
    /// The machine id is new and not yet in STATE ([`keep_machine_id`]).
    pub machine_id_unkept: bool,
    /// STATE's directory, once mounted.
    pub state_dir: Option<PathBuf>,
    /// A new STATE not formatted yet (device, size): formatted in the boot plan's step
    /// or before the node waits for a config.
    pub state_pending: Option<(String, u64)>,
    /// STATE is there but could not be read or mounted ([`StateUnavailable`]): the node
    /// may be configured and serves no maintenance mode.
    pub state_unavailable: Option<StateUnavailable>,
    /// How the disks were prepared (the deferred STATE's format needs them again).
    pub disk_options: disks::Options,
    /// `/etc` is the writable tmpfs.
    pub etc_ok: bool,
    /// What a reset wipes.
    pub wipe: Vec<Wipe>,
    /// The boot assessment: the ESP, loader hygiene, a trial's blessing or deadline.
    pub assess: BootAssess,
}

impl Boot {
    /// What the console says while the node waits for a config, at first and every
    /// [`config_source::REMINDER`]: the ways to give one, or, when STATE is unavailable
    /// (no maintenance mode), what is wrong and what to do.
    pub fn waiting_lines(&self, url: Option<&str>) -> Vec<String> {
        if let Some(unavailable) = &self.state_unavailable {
            return unavailable.reminder();
        }
        let mut lines = crate::config_source::waiting_message(url);
        if self.state_dir.is_none() && self.state_pending.is_none() {
            // No STATE at all (no boot disk, no partition, a format that failed):
            // maintenance mode is not served, the other ways still are.
            lines.retain(|l| !l.contains("apply-config --insecure"));
            lines.push(
                "  (not maintenance mode's apply-config --insecure: STATE is not mounted, see the boot log, so a config pushed over the API could not be kept)"
                    .to_string(),
            );
        }
        lines
    }
}

/// Steps 3 to 5 before the main loop: the banner, the disks, STATE's leftovers and
/// staged config, `/etc`, the machine id. `watchdog` is fed while a configured node's
/// STATE is waited for ([`disks::retry`]).
pub(super) fn prepare(
    sys: &dyn Syscalls,
    log: &dyn Log,
    modules: Option<kmods::ModuleIndex>,
    mut watchdog: Option<&mut Watchdog>,
) -> Boot {
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
    let mut boot_disk = None;
    let mut unavailable = None;
    let (state_dir, wipe, state_pending) =
        match disks::prepare(sys, log, modules.as_ref(), &disk_options) {
            Ok(mut report) => {
                boot_disk = Some(report.boot.disk.clone());
                let mut wait = |delay| wait_fed(sys, log, watchdog.as_deref_mut(), delay);
                disks::retry::retry_report(sys, log, &disk_options, &mut report, &mut wait);
                unavailable = StateUnavailable::of(&report.state);
                if let Some(u) = &unavailable {
                    log.line(&u.line());
                }
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
        promote_staged(log, dir);
        super::reset::say_unfinished(log, dir);
    }
    // Right after STATE: the ESP, loader hygiene, a fallen-back slot, the trial recorded.
    let assess = BootAssess::start(
        sys,
        log,
        &cmdline,
        boot_disk.as_deref(),
        &disk_options,
        modules.as_ref(),
        state_dir.as_deref(),
    );
    let etc_ok = mount_etc(sys, log);
    // A new STATE (formatted later, see `finish_state`) has no machine id yet: a new one,
    // kept once STATE is there.
    let (machine_id, machine_id_unkept) = match &state_pending {
        Some(_) => (new_machine_id(sys, log), true),
        None => machine_id(sys, log, state_dir.as_deref()),
    };
    Boot {
        modules,
        cmdline,
        machine_id,
        machine_id_unkept,
        state_dir,
        state_pending,
        state_unavailable: unavailable,
        disk_options,
        etc_ok,
        wipe,
        assess,
    }
}

/// Sleep `delay` in steps of a second, feeding `watchdog` between them.
fn wait_fed(
    sys: &dyn Syscalls,
    log: &dyn Log,
    mut watchdog: Option<&mut Watchdog>,
    delay: Duration,
) {
    let step = Duration::from_secs(1);
    let mut left = delay;
    while !left.is_zero() {
        let now = step.min(left);
        sys.sleep(now);
        left -= now;
        if let Some(w) = watchdog.as_deref_mut() {
            w.ping_if_due(Instant::now(), log);
        }
    }
}

/// STATE is there but cannot be read: its filesystem cannot be probed, is damaged or
/// does not mount (after [`disks::retry`]'s tries), so the node may be configured and
/// must not serve maintenance mode, where anyone on the network could push it a config.
/// `Node::start_maintenance` refuses without a mounted STATE; this says why and what to
/// do, at boot ([`StateUnavailable::line`]) and in place of the wait's reminder
/// ([`StateUnavailable::reminder`]). A STATE that does not exist yet or is blank (a new
/// node) is not this: it is formatted, and the node serves maintenance mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateUnavailable {
    /// STATE's device.
    pub device: String,
    /// Why, as the disks step said it.
    pub why: String,
}

impl StateUnavailable {
    /// STATE's outcome as unavailable, or `None` (mounted, new, or not there at all).
    pub fn of(state: &Result<disks::Mounted, disks::Error>) -> Option<StateUnavailable> {
        let Err(
            e @ (disks::Error::Probe { device, .. }
            | disks::Error::Mount { device, .. }
            | disks::Error::Unrecognized { device, .. }),
        ) = state
        else {
            return None;
        };
        Some(StateUnavailable {
            device: device.clone(),
            why: crate::error_chain(e),
        })
    }

    /// The boot's line.
    pub fn line(&self) -> String {
        format!(
            "STATE unavailable ({}: see the line above): this node may be configured, so it does not serve maintenance mode, which would let anyone on the network push it a config; repair STATE from another system and reboot",
            self.device
        )
    }

    /// The reminder said every 30 s while the node waits, instead of maintenance mode's
    /// ways to give a config (`apply-config --insecure` is not served here).
    pub fn reminder(&self) -> Vec<String> {
        vec![
            format!(
                "STATE on {} could not be mounted: {}",
                self.device, self.why
            ),
            "this node may be configured, so it is not in maintenance mode and takes no config over the API (no apply-config --insecure) until STATE is repaired".to_string(),
            "repair STATE from another system (e2fsck) and reboot, or reflash the disk to start it as a new node; a reset cannot run without STATE".to_string(),
        ]
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

/// A boot with nothing found yet (no modules, no STATE, no wipe, assessment off), for
/// the tests of stage 2 to fill in.
#[cfg(test)]
impl Boot {
    pub(super) fn fixture() -> Boot {
        Boot {
            modules: None,
            cmdline: String::new(),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            machine_id_unkept: false,
            state_dir: None,
            state_pending: None,
            state_unavailable: None,
            disk_options: disks::Options::default(),
            etc_ok: false,
            wipe: Vec::new(),
            assess: BootAssess::off(),
        }
    }
}

#[cfg(test)]
// Tests build their fixtures on disk.
#[allow(clippy::disallowed_methods)]
mod tests {
    use std::io;

    use super::*;
    use crate::console::memory::MemoryLog;
    use crate::syscalls::fake::Fake;

    #[test]
    fn a_state_that_exists_but_cannot_be_read_is_said_unavailable() {
        let mounted = disks::Mounted {
            device: "/dev/vda4".into(),
            target: "/system/state".into(),
            formatted: false,
            resized: false,
            size: 100 << 20,
        };
        assert_eq!(StateUnavailable::of(&Ok(mounted)), None);
        let new = disks::Error::Deferred {
            name: "STATE",
            device: "/dev/vda4".into(),
            size: 100 << 20,
        };
        assert_eq!(
            StateUnavailable::of(&Err(new)),
            None,
            "a new STATE is not configured"
        );
        let said = StateUnavailable::of(&Err(damaged()))
            .map(|u| u.line())
            .unwrap_or_default();
        assert!(
            said.starts_with("STATE unavailable (/dev/vda4: see the line above): this node may be configured, so it does not serve maintenance mode"),
            "{said}"
        );
        let unrecognized = disks::Error::Unrecognized {
            name: "STATE",
            device: "/dev/vda4".into(),
        };
        assert!(StateUnavailable::of(&Err(unrecognized)).is_some());
    }

    /// STATE's mount refused: its filesystem is damaged.
    fn damaged() -> disks::Error {
        disks::Error::Mount {
            name: "STATE",
            device: "/dev/vda4".into(),
            target: "/system/state".into(),
            hint: "the filesystem is damaged",
            source: io::Error::from_raw_os_error(117),
        }
    }

    #[test]
    fn a_node_without_its_state_is_reminded_what_is_wrong_not_told_to_push_a_config() {
        let mut boot = Boot::fixture();
        let no_state = boot.waiting_lines(None).join("\n");
        assert!(
            !no_state.contains("machinectl apply-config --insecure --nodes")
                && no_state.contains("STATE is not mounted")
                && no_state.contains("fw_cfg"),
            "{no_state}"
        );
        boot.state_dir = Some(PathBuf::from("/system/state"));
        let new_node = boot.waiting_lines(None).join("\n");
        assert!(
            new_node.contains("machinectl apply-config --insecure --nodes"),
            "{new_node}"
        );
        boot.state_dir = None;
        boot.state_unavailable = StateUnavailable::of(&Err(damaged()));
        let lines = boot.waiting_lines(None);
        assert_eq!(
            lines[0],
            "STATE on /dev/vda4 could not be mounted: cannot mount STATE (/dev/vda4, ext4) at /system/state: EUCLEAN (117): the filesystem is damaged"
        );
        let said = lines.join("\n");
        assert!(
            !said.contains("machinectl apply-config --insecure --nodes"),
            "{said}"
        );
        assert!(said.contains("is not in maintenance mode"), "{said}");
        assert!(said.contains("repair STATE"), "{said}");
        assert!(said.contains("reflash"), "{said}");
    }

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

    #[test]
    fn a_staged_config_is_promoted_and_said_so() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = MemoryLog::default();
        promote_staged(&log, dir.path());
        assert!(log.lines().is_empty(), "nothing staged, nothing said");
        let good = include_str!("../../../configs/tests/data/controlplane.toml");
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
