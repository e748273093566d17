//! A reset: the partitions it wipes (those the disks step prepared, and a new STATE
//! formatted later), and the wipe itself once they are unmounted.
//!
//! # Both or neither
//!
//! A reset wipes STATE (the config, the node's identity) and EPHEMERAL (`/var`: images,
//! pod volumes, etcd's data) both or neither:
//!
//! 1. When asked (the control socket, answered before anything stops), a reset is
//!    refused unless both partitions were prepared at this boot ([`wipe_names`]; the
//!    lifecycle names the missing one): machined relays the refusal as a failure.
//! 2. Once the services and every other process are stopped and the filesystems
//!    unmounted, [`wipe_partitions`] checks that both are unmounted, and unmounts again
//!    any that is still mounted (`unmount_all` may have left it read-only). If one stays
//!    mounted, nothing is wiped: the console and the boot log say which partition, its
//!    device, its mount point, the kernel's answer and what to do, and the node restarts
//!    with its config and data, as a plain reboot. Nothing needs remounting: the node
//!    goes down next, and the next boot mounts both again.
//! 3. Only then each is formatted anew (`mke2fs`, as the first boot makes them):
//!    EPHEMERAL first, then STATE; if EPHEMERAL's format fails, STATE is left alone.
//!
//! # A failure the caller learns of
//!
//! The answer to the request is given before the services stop, and it cannot wait for
//! the wipe's outcome: the wipe needs both partitions unmounted, and they are held until
//! every process is stopped, machined (which relays the answer, keeps STATE's audit log
//! open and reads `/var`) among them, with containerd, the kubelet and etcd, whose files
//! on `/var` are what a reset is for. A machined kept up until the wipe is decided would
//! keep STATE busy itself, and then every reset would fail. So what can be known before
//! anything stops is refused at once, in the answer (a partition not prepared at this
//! boot: step 1 above), and what is known only at the end reaches the operator through
//! STATE, which a failed reset leaves as it was ([`keelson_node_protocol::reset`]):
//!
//! - once the services have stopped, [`record_begun`] writes STATE's `reset.json`: the
//!   reset has begun (when, and the config it began with);
//! - when the wipe is refused or EPHEMERAL's format fails, [`finish_reset`] adds why to
//!   the record (the partition, its device, the kernel's answer, what was wiped), with
//!   STATE mounted again for the write if the shutdown had unmounted it;
//! - a reset that finishes formats STATE, and the record goes with it.
//!
//! After the restart, machined's `health` reports the record as a failed check (`last
//! reset failed at ...: EPHEMERAL on /dev/vda6: ... EBUSY (16); nothing was wiped ...`),
//! as a record without a failure (`the reset begun at ... did not finish`: a power cut
//! between the wipes), until a config is applied or a reset finishes; the boot says it
//! on the console too ([`say_unfinished`]). The reset's answer points there.
//!
//! # A power cut between the two wipes
//!
//! EPHEMERAL is wiped first so that a cut (or a failed format) between the two leaves a
//! node that still has its config and identity and an empty `/var`: it boots as itself,
//! pulls its images again, and its operator, who sees it back configured, resets it
//! again. The other order would leave a node waiting for a config, open to whoever
//! reaches maintenance mode first, whose `/var` still holds the old cluster's pod
//! volumes, secrets and etcd database: old data must not outlive the config that owned
//! it. A cut during STATE's own `mke2fs` may leave a damaged STATE, which the next boot
//! reports without serving maintenance mode (see [`super::boot`]).

use std::io;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use keelson_configs::layout::{self, PART_EPHEMERAL, PART_STATE};
use keelson_node_protocol::reset::{RESET_RECORD, ResetFailure, ResetRecord};

use crate::config_source::http::sha256_hex;
use crate::console::Log;
use crate::disks;
use crate::fault;
use crate::state;
use crate::syscalls::{MountFlags, Syscalls, errno_name};

/// Why a reset wiped nothing, or only EPHEMERAL.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A partition is still mounted after the shutdown's unmounts and a second try.
    #[error(
        "reset failed: {name} ({device}) is still mounted at {target} and cannot be unmounted: {errno}; nothing was wiped, since a reset wipes STATE and EPHEMERAL both or neither: the node restarts with its config and data; reset it again, or wipe both partitions from another system",
        errno = errno_name(source)
    )]
    StillMounted {
        /// `STATE` or `EPHEMERAL`.
        name: &'static str,
        /// Its device.
        device: String,
        /// Its mount point.
        target: String,
        /// The kernel's answer to the unmount.
        #[source]
        source: io::Error,
    },
    /// A partition's format failed; those after it are left alone.
    #[error(
        "reset failed: {name} was not wiped, so {left} was left alone: the node restarts with {left}; reset it again, or wipe both partitions from another system"
    )]
    Format {
        /// The partition whose format failed.
        name: &'static str,
        /// The partitions not wiped after it.
        left: String,
        /// Why.
        #[source]
        source: Box<disks::Error>,
    },
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

/// The names of the partitions a reset asked now would leave wiped, for the lifecycle's
/// check that they are both: those in `wipe`, and STATE when it is a new one not
/// formatted yet (`state_pending`: it holds nothing, and the reset leaves it so).
pub fn wipe_names(wipe: &[Wipe], state_pending: bool) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = wipe.iter().map(|w| w.name).collect();
    if state_pending && !names.contains(&PART_STATE) {
        names.push(PART_STATE);
    }
    names
}

/// The order of the wipes: EPHEMERAL before STATE (see the module doc).
fn wipe_order(name: &str) -> u8 {
    if name == PART_EPHEMERAL { 0 } else { 1 }
}

/// A reset's last step, once everything is unmounted: both partitions unmounted
/// (unmounted again if need be), then each formatted anew, EPHEMERAL first. A
/// partition that stays mounted wipes neither; each failure is logged and the first
/// returned. `after_wipe` runs after each format (the test fault's pause).
pub fn wipe_partitions(
    sys: &dyn Syscalls,
    log: &dyn Log,
    wipes: &[Wipe],
    after_wipe: &dyn Fn(&Wipe),
) -> Result<(), Error> {
    let mut mounted: Vec<Error> = wipes.iter().filter_map(|w| still_mounted(sys, w)).collect();
    for e in &mounted {
        log.line(&e.to_string());
    }
    if !mounted.is_empty() {
        return Err(mounted.swap_remove(0));
    }
    let mut ordered: Vec<&Wipe> = wipes.iter().collect();
    ordered.sort_by_key(|w| wipe_order(w.name));
    for (i, w) in ordered.iter().enumerate() {
        if let Err(source) = disks::format(sys, w.name, &w.device) {
            let left: Vec<&str> = ordered[i + 1..].iter().map(|w| w.name).collect();
            let error = Error::Format {
                name: w.name,
                left: if left.is_empty() {
                    "nothing else".into()
                } else {
                    left.join(" and ")
                },
                source: Box::new(source),
            };
            log.line(&crate::error_chain(&error));
            return Err(error);
        }
        log.line(&format!(
            "reset: {} ({}) wiped: a new empty ext4 filesystem",
            w.name, w.device
        ));
        after_wipe(w);
    }
    Ok(())
}

/// `w` is still mounted and a new unmount fails: why.
fn still_mounted(sys: &dyn Syscalls, w: &Wipe) -> Option<Error> {
    let target = Path::new(&w.target);
    if let Ok(false) = sys.is_mount_point(target) {
        return None;
    }
    match sys.unmount(target, false) {
        Ok(()) => None,
        // Not a mount point (EINVAL) or gone (ENOENT): unmounted.
        Err(e) if matches!(e.raw_os_error(), Some(22) | Some(2)) => None,
        Err(source) => Some(Error::StillMounted {
            name: w.name,
            device: w.device.clone(),
            target: w.target.clone(),
            source,
        }),
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The SHA-256 of the config in STATE at `dir`, if there is one.
fn config_sha256(dir: &Path) -> Option<String> {
    state::read(dir, layout::STATE_CONFIG)
        .ok()
        .flatten()
        .map(|bytes| sha256_hex(&bytes))
}

/// Once the services have stopped: keep in STATE (at `state_dir`, when mounted) that a
/// reset has begun, so that a reset cut short is reported after the restart (see the
/// module doc). A failed write is said, and the reset goes on.
pub fn record_begun(log: &dyn Log, state_dir: Option<&Path>) {
    let Some(dir) = state_dir else { return };
    let record = ResetRecord {
        begun_at_ms: now_ms(),
        config_sha256: config_sha256(dir),
        failure: None,
    };
    if let Err(e) = state::write_atomic(dir, RESET_RECORD, &record.to_bytes()) {
        log.line(&format!(
            "reset: its beginning not kept in STATE ({}): should it not finish, health will not say so",
            crate::error_chain(&e)
        ));
    }
}

/// A reset's end, once everything is unmounted: [`wipe_partitions`] (paused after
/// EPHEMERAL's wipe by the test fault `reset-pause`, see [`fault`]), and a failure that
/// left STATE as it was kept in its record ([`record_failure`]).
pub fn finish_reset(
    sys: &dyn Syscalls,
    log: &dyn Log,
    wipes: &[Wipe],
    cmdline: &str,
) -> Result<(), Error> {
    let pause = |w: &Wipe| {
        if w.name == PART_EPHEMERAL {
            fault::reset_pause(sys, log, cmdline);
        }
    };
    let result = wipe_partitions(sys, log, wipes, &pause);
    if let Err(error) = &result
        && let Some(failure) = failure_of(error, wipes)
        && let Some(state) = wipes.iter().find(|w| w.name == PART_STATE)
    {
        record_failure(sys, log, state, failure);
    }
    result
}

/// What the record says of `error`; `None` when STATE may have been formatted (its own
/// format failed), so that nothing is written to it.
fn failure_of(error: &Error, wipes: &[Wipe]) -> Option<ResetFailure> {
    match error {
        Error::StillMounted {
            name,
            device,
            target,
            source,
        } => Some(ResetFailure {
            at_ms: now_ms(),
            partition: (*name).to_string(),
            device: device.clone(),
            errno: Some(errno_name(source)),
            reason: format!("could not unmount {target}"),
            wiped: Vec::new(),
        }),
        Error::Format { name, .. } if *name == PART_STATE => None,
        Error::Format { name, source, .. } => Some(ResetFailure {
            at_ms: now_ms(),
            partition: (*name).to_string(),
            device: wipes
                .iter()
                .find(|w| w.name == *name)
                .map_or_else(|| "?".into(), |w| w.device.clone()),
            errno: match source.as_ref() {
                disks::Error::RunFormat { source, .. } => Some(errno_name(source)),
                _ => None,
            },
            reason: crate::error_chain(source.as_ref()),
            wiped: Vec::new(),
        }),
    }
}

/// At boot, once STATE is mounted at `dir`: say on the console a reset that did not
/// finish, as `health` reports it (nothing once a config was applied since).
pub fn say_unfinished(log: &dyn Log, dir: &Path) {
    let Ok(Some(bytes)) = state::read(dir, RESET_RECORD) else {
        return;
    };
    match ResetRecord::parse(&bytes) {
        Ok(record) if record.is_current(config_sha256(dir).as_deref()) => {
            log.line(&record.health_reason());
        }
        Ok(_) => {}
        Err(e) => log.line(&format!(
            "STATE's {RESET_RECORD} is unreadable ({e}): a reset began and did not finish; reset the node again"
        )),
    }
}

/// STATE's mount flags for the record's write.
const STATE_FLAGS: MountFlags = MountFlags::NOSUID
    .union(MountFlags::NODEV)
    .union(MountFlags::NOEXEC);

/// Add `failure` to STATE's reset record: STATE (`state`) mounted again at its mount
/// point if the shutdown had unmounted it (and unmounted after), or written where it
/// stayed mounted. Each step that fails is said; the node goes down either way.
pub fn record_failure(sys: &dyn Syscalls, log: &dyn Log, state: &Wipe, failure: ResetFailure) {
    let dir = Path::new(&state.target);
    let mounted_here = !sys.is_mount_point(dir).unwrap_or(false);
    if mounted_here && let Err(e) = sys.mount(&state.device, dir, "ext4", STATE_FLAGS, "") {
        log.line(&format!(
            "reset: the failure not kept in STATE: {} ({}) cannot be mounted again at {}: {}; health will not report it",
            state.name,
            state.device,
            state.target,
            errno_name(&e)
        ));
        return;
    }
    let mut record = match state::read(dir, RESET_RECORD) {
        Ok(Some(bytes)) => ResetRecord::parse(&bytes).unwrap_or_default(),
        _ => ResetRecord::default(),
    };
    if record.begun_at_ms == 0 {
        record.begun_at_ms = failure.at_ms;
        record.config_sha256 = config_sha256(dir);
    }
    record.failure = Some(failure);
    match state::write_atomic(dir, RESET_RECORD, &record.to_bytes()) {
        Ok(()) => log.line(&format!(
            "reset: the failure kept in STATE ({RESET_RECORD}): `machinectl health` reports it once the node is back"
        )),
        Err(e) => log.line(&format!(
            "reset: the failure not kept in STATE: {}; health will not report it",
            crate::error_chain(&e)
        )),
    }
    sys.sync();
    if mounted_here && let Err(e) = sys.unmount(dir, false) {
        log.line(&format!(
            "reset: {} not unmounted after the record's write: {}",
            state.target,
            errno_name(&e)
        ));
    }
}

#[cfg(test)]
// Tests keep STATE's record in a directory on disk.
#[allow(clippy::disallowed_methods)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::console::memory::MemoryLog;
    use crate::syscalls::ToolOutput;
    use crate::syscalls::fake::{Call, Fake};

    /// STATE at /system/state and EPHEMERAL at /var, both still mounted.
    fn both_mounted() -> (Fake, [Wipe; 2]) {
        let mut fake = Fake::new();
        fake.read_data.insert("/dev/urandom".into(), vec![0x42; 16]);
        for target in ["/system/state", "/var"] {
            fake.mount_points.borrow_mut().insert(PathBuf::from(target));
        }
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
        (fake, wipes)
    }

    /// The devices `mke2fs` ran on, in order.
    fn formatted(fake: &Fake) -> Vec<String> {
        fake.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::RunTool(program, args) if program == disks::MKE2FS => args.last().cloned(),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_busy_partition_wipes_neither() {
        let (mut fake, wipes) = both_mounted();
        fake.unmount_errors.insert(PathBuf::from("/var"), 16);
        let log = MemoryLog::default();
        let result = wipe_partitions(&fake, &log, &wipes, &|_| {});
        assert!(
            matches!(
                result,
                Err(Error::StillMounted {
                    name: "EPHEMERAL",
                    ..
                })
            ),
            "{result:?}"
        );
        assert_eq!(
            formatted(&fake),
            Vec::<String>::new(),
            "STATE was unmountable, yet left alone"
        );
        assert_eq!(
            log.lines(),
            [
                "keelson-init: reset failed: EPHEMERAL (/dev/vda5) is still mounted at /var and cannot be unmounted: EBUSY (16); nothing was wiped, since a reset wipes STATE and EPHEMERAL both or neither: the node restarts with its config and data; reset it again, or wipe both partitions from another system",
            ]
        );
    }

    #[test]
    fn both_are_unmounted_then_wiped_ephemeral_first() {
        let (fake, wipes) = both_mounted();
        let log = MemoryLog::default();
        assert!(wipe_partitions(&fake, &log, &wipes, &|_| {}).is_ok());
        assert_eq!(formatted(&fake), ["/dev/vda5", "/dev/vda4"]);
        assert!(
            fake.calls()
                .contains(&Call::Unmount("/system/state".into(), false))
        );
        assert_eq!(
            log.lines(),
            [
                "keelson-init: reset: EPHEMERAL (/dev/vda5) wiped: a new empty ext4 filesystem",
                "keelson-init: reset: STATE (/dev/vda4) wiped: a new empty ext4 filesystem",
            ]
        );
    }

    #[test]
    fn a_failed_ephemeral_format_leaves_state_alone() {
        let (mut fake, wipes) = both_mounted();
        fake.tool_results.insert(
            disks::MKE2FS.into(),
            ToolOutput {
                code: Some(1),
                output: "mke2fs: Input/output error".into(),
            },
        );
        let log = MemoryLog::default();
        let result = wipe_partitions(&fake, &log, &wipes, &|_| {});
        assert!(
            matches!(
                result,
                Err(Error::Format {
                    name: "EPHEMERAL",
                    ..
                })
            ),
            "{result:?}"
        );
        assert_eq!(formatted(&fake), ["/dev/vda5"]);
        let lines = log.lines();
        assert!(
            lines[0].starts_with(
                "keelson-init: reset failed: EPHEMERAL was not wiped, so STATE was left alone"
            ),
            "{lines:?}"
        );
    }

    #[test]
    fn a_new_state_counts_as_wiped() {
        let (_, wipes) = both_mounted();
        assert_eq!(wipe_names(&wipes, false), ["STATE", "EPHEMERAL"]);
        assert_eq!(wipe_names(&wipes[1..], true), ["EPHEMERAL", "STATE"]);
        assert_eq!(wipe_names(&wipes[1..], false), ["EPHEMERAL"]);
    }

    /// STATE's reset record at `dir`.
    fn record_in(dir: &Path) -> ResetRecord {
        let bytes = std::fs::read(dir.join(RESET_RECORD)).unwrap_or_default();
        ResetRecord::parse(&bytes).unwrap_or_default()
    }

    #[test]
    fn a_busy_var_is_kept_in_states_record_with_state_mounted_again() -> io::Result<()> {
        let state = tempfile::tempdir()?;
        std::fs::write(state.path().join(layout::STATE_CONFIG), "the config")?;
        let log = MemoryLog::default();
        record_begun(&log, Some(state.path()));
        let begun = record_in(state.path());
        assert!(
            begun.begun_at_ms > 0 && begun.failure.is_none(),
            "{begun:?}"
        );
        assert_eq!(
            begun.config_sha256.as_deref(),
            Some(sha256_hex(b"the config").as_str())
        );
        // The shutdown unmounted STATE; /var stays busy.
        let (mut fake, mut wipes) = both_mounted();
        wipes[0].target = state.path().display().to_string();
        fake.mount_points
            .borrow_mut()
            .remove(Path::new("/system/state"));
        fake.unmount_errors.insert(PathBuf::from("/var"), 16);
        let result = finish_reset(&fake, &log, &wipes, "");
        assert!(
            matches!(result, Err(Error::StillMounted { .. })),
            "{result:?}"
        );
        assert_eq!(formatted(&fake), Vec::<String>::new());
        let record = record_in(state.path());
        assert_eq!(record.begun_at_ms, begun.begun_at_ms);
        let failure = record.failure.clone().unwrap_or_default();
        assert_eq!(
            (failure.partition.as_str(), failure.device.as_str()),
            ("EPHEMERAL", "/dev/vda5")
        );
        assert_eq!(failure.errno.as_deref(), Some("EBUSY (16)"));
        assert!(
            record.health_reason().contains(
                "EPHEMERAL on /dev/vda5: could not unmount /var (EBUSY (16)); nothing was wiped"
            ),
            "{}",
            record.health_reason()
        );
        let calls = fake.calls();
        let target = state.path().display().to_string();
        let mounted = calls.iter().position(|c| {
            matches!(c, Call::Mount { source, target: t, .. } if source == "/dev/vda4" && *t == target)
        });
        let unmounted = calls
            .iter()
            .position(|c| *c == Call::Unmount(target.clone(), false));
        assert!(
            mounted.is_some() && unmounted > mounted,
            "STATE mounted for the write, then unmounted: {calls:?}"
        );
        assert!(
            log.lines()
                .iter()
                .any(|l| l.contains("the failure kept in STATE (reset.json)")),
            "{:?}",
            log.lines()
        );
        let boot = MemoryLog::default();
        say_unfinished(&boot, state.path());
        assert_eq!(
            boot.lines(),
            [format!("keelson-init: {}", record.health_reason())]
        );
        std::fs::write(state.path().join(layout::STATE_CONFIG), "a later config")?;
        let boot = MemoryLog::default();
        say_unfinished(&boot, state.path());
        assert!(boot.lines().is_empty(), "applied since: old news");
        Ok(())
    }

    #[test]
    fn a_failed_state_format_writes_nothing_to_state() {
        let (_, wipes) = both_mounted();
        let error = Error::Format {
            name: PART_STATE,
            left: "nothing else".into(),
            source: Box::new(disks::Error::NoBootDisk { why: "x".into() }),
        };
        assert_eq!(failure_of(&error, &wipes), None);
        let error = Error::Format {
            name: PART_EPHEMERAL,
            left: "STATE".into(),
            source: Box::new(disks::Error::NoBootDisk { why: "x".into() }),
        };
        let failure = failure_of(&error, &wipes).unwrap_or_default();
        assert_eq!(failure.device, "/dev/vda5");
        assert!(failure.wiped.is_empty());
    }

    #[test]
    fn a_finished_reset_records_no_failure() -> io::Result<()> {
        let state = tempfile::tempdir()?;
        let log = MemoryLog::default();
        let (fake, mut wipes) = both_mounted();
        wipes[0].target = state.path().display().to_string();
        assert!(finish_reset(&fake, &log, &wipes, "").is_ok());
        assert!(!state.path().join(RESET_RECORD).exists());
        assert_eq!(formatted(&fake), ["/dev/vda5", "/dev/vda4"]);
        Ok(())
    }
}
