//! A reset: the partitions it wipes (those the disks step prepared, and a new STATE
//! formatted later), and the wipe itself once they are unmounted.

use std::path::Path;

use keelson_configs::layout::{PART_EPHEMERAL, PART_STATE};

use crate::console::Log;
use crate::disks;
use crate::syscalls::Syscalls;

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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::console::memory::MemoryLog;
    use crate::syscalls::fake::{Call, Fake};

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
}
