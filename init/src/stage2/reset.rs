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
//! The answer to the request is given before the services stop (machined, which relays
//! it, is one of them), so a partition that cannot be unmounted at the end is reported
//! on the console, not in the answer; the answer says so.
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

use keelson_configs::layout::{PART_EPHEMERAL, PART_STATE};

use crate::console::Log;
use crate::disks;
use crate::syscalls::{Syscalls, errno_name};

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
/// returned.
pub fn wipe_partitions(sys: &dyn Syscalls, log: &dyn Log, wipes: &[Wipe]) -> Result<(), Error> {
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

#[cfg(test)]
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
        let result = wipe_partitions(&fake, &log, &wipes);
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
        assert!(wipe_partitions(&fake, &log, &wipes).is_ok());
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
        let result = wipe_partitions(&fake, &log, &wipes);
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
}
