//! The end of a boot: after the supervisor has stopped every service in reverse
//! dependency order, PID 1 stops what is left, unmounts and restarts or powers off.
//!
//! 1. `kill(-1, SIGTERM)`, reap for up to [`GRACE`], then `kill(-1, SIGKILL)` and reap
//!    again (`stage2` does this part, it owns the reaper);
//! 2. [`unmount_all`]: every mount in `/proc/self/mountinfo` except `/` and the kernel's
//!    own filesystems (`/proc`, `/sys`, `/dev` and below) is unmounted in reverse mount
//!    order, so that `/var/lib/containerd/...` goes before `/var`, and `/var` (EPHEMERAL)
//!    and `/system/state` (STATE) before the end. A mount that stays busy is remounted
//!    read-only instead, which flushes and marks an ext4 filesystem clean all the same;
//! 3. `/` is remounted read-only (a squashfs already is; this matters for other roots);
//! 4. `sync`, then `reboot(2)`.
//!
//! The next boot's ext4 mount of STATE and EPHEMERAL must report a clean filesystem (no
//! journal recovery); the end-to-end test checks it.

use std::path::Path;
use std::time::Duration;

use crate::console::Log;
use crate::swap::unescape;
use crate::syscalls::{RebootHow, Syscalls, errno_name};

/// How the machine goes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownKind {
    /// Restart the machine.
    Reboot,
    /// Power it off.
    PowerOff,
}

impl ShutdownKind {
    /// `reboot` or `power off`.
    pub fn describe(self) -> &'static str {
        match self {
            ShutdownKind::Reboot => "reboot",
            ShutdownKind::PowerOff => "power off",
        }
    }
}

/// How long processes get between `SIGTERM` and `SIGKILL` after the services stopped.
pub const GRACE: Duration = Duration::from_secs(5);
/// The longest the whole ordered stop of services may take before PID 1 goes on anyway.
pub const SERVICES_DEADLINE: Duration = Duration::from_secs(90);

/// One line of `/proc/self/mountinfo`, reduced to what unmounting needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount point.
    pub target: String,
    /// The filesystem type.
    pub fstype: String,
    /// The mount source.
    pub source: String,
}

/// Parse `/proc/self/mountinfo`, in mount order.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let target = fields.get(4)?;
            let sep = fields.iter().position(|f| *f == "-")?;
            Some(MountEntry {
                target: unescape(target),
                fstype: fields.get(sep + 1)?.to_string(),
                source: unescape(fields.get(sep + 2)?),
            })
        })
        .collect()
}

/// Mount points PID 1 leaves alone: the root and the kernel's own filesystems.
fn kept(target: &str) -> bool {
    target == "/"
        || ["/proc", "/sys", "/dev"]
            .iter()
            .any(|k| target == *k || target.starts_with(&format!("{k}/")))
}

/// What to unmount, in order: reverse mount order, kept mounts left out, each target
/// once (a target mounted over several times is unmounted as often as it was mounted).
pub fn unmount_plan(entries: &[MountEntry]) -> Vec<String> {
    entries
        .iter()
        .rev()
        .filter(|e| !kept(&e.target))
        .map(|e| e.target.clone())
        .collect()
}

/// Unmount everything in the plan; a busy mount is remounted read-only instead.
/// Returns the targets that could be neither unmounted nor made read-only.
pub fn unmount_all(sys: &dyn Syscalls, log: &dyn Log) -> Vec<String> {
    let text = match sys.read_file(Path::new("/proc/self/mountinfo")) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => {
            log.line(&format!(
                "cannot read /proc/self/mountinfo ({}): nothing unmounted",
                errno_name(&e)
            ));
            return Vec::new();
        }
    };
    let mut stuck = Vec::new();
    for target in unmount_plan(&parse_mountinfo(&text)) {
        let path = Path::new(&target);
        match sys.unmount(path, false) {
            Ok(()) => log.line(&format!("unmounted {target}")),
            // Already gone with a parent (or a lazy unmount): fine.
            Err(e) if matches!(e.raw_os_error(), Some(2) | Some(22)) => {}
            Err(e) => match sys.remount_readonly(path) {
                Ok(()) => log.line(&format!(
                    "{target} busy ({}): remounted read-only",
                    errno_name(&e)
                )),
                Err(e2) => {
                    log.line(&format!(
                        "{target}: cannot unmount ({}) nor remount read-only ({})",
                        errno_name(&e),
                        errno_name(&e2)
                    ));
                    stuck.push(target);
                }
            },
        }
    }
    stuck
}

/// For the panic hook: make every writable filesystem read-only (no unmount, no log),
/// so that the restart that follows leaves STATE and EPHEMERAL clean.
pub fn emergency_readonly(sys: &dyn Syscalls) {
    if let Ok(bytes) = sys.read_file(Path::new("/proc/self/mountinfo")) {
        for target in unmount_plan(&parse_mountinfo(&String::from_utf8_lossy(&bytes))) {
            let _ = sys.remount_readonly(Path::new(&target));
        }
    }
}

/// The very end: remount `/` read-only, sync, `last` (the watchdog stopped), and reboot
/// or power off. Returns only if the kernel refused, with its answer.
pub fn finish(
    sys: &dyn Syscalls,
    log: &dyn Log,
    kind: ShutdownKind,
    last: impl FnOnce(),
) -> std::io::Error {
    let _ = sys.remount_readonly(Path::new("/"));
    sys.sync();
    last();
    log.line(&format!("{}: now", kind.describe()));
    log.flush();
    sys.reboot(match kind {
        ShutdownKind::Reboot => RebootHow::Restart,
        ShutdownKind::PowerOff => RebootHow::PowerOff,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::memory::MemoryLog;
    use crate::syscalls::fake::{Call, Fake};
    use std::path::PathBuf;

    const MOUNTINFO: &str = "\
22 1 253:0 / / ro,relatime - squashfs /dev/mapper/root ro
23 22 0:5 / /dev rw,nosuid - devtmpfs devtmpfs rw,mode=755
24 22 0:21 / /proc rw,nosuid,nodev,noexec - proc proc rw
25 22 0:20 / /sys rw,nosuid,nodev,noexec - sysfs sysfs rw
26 23 0:22 / /dev/pts rw - devpts devpts rw
27 25 0:23 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
28 22 0:24 / /run rw - tmpfs tmpfs rw
29 22 0:25 / /etc rw - tmpfs tmpfs rw
30 22 254:4 / /system/state rw - ext4 /dev/vda4 rw
31 22 254:5 / /var rw - ext4 /dev/vda5 rw
32 31 0:40 / /var/lib/containerd/io.containerd.runtime.v2.task/k8s.io/abc/rootfs rw - overlay overlay rw
33 22 0:41 / /mnt/with\\040space rw - tmpfs tmpfs rw
";

    #[test]
    fn mountinfo_parses_with_escapes() {
        let entries = parse_mountinfo(MOUNTINFO);
        assert_eq!(entries.len(), 12);
        assert_eq!(
            entries[8],
            MountEntry {
                target: "/system/state".into(),
                fstype: "ext4".into(),
                source: "/dev/vda4".into()
            }
        );
        assert_eq!(entries[11].target, "/mnt/with space");
    }

    #[test]
    fn mounts_go_in_reverse_order_and_kernel_ones_stay() {
        assert_eq!(
            unmount_plan(&parse_mountinfo(MOUNTINFO)),
            [
                "/mnt/with space",
                "/var/lib/containerd/io.containerd.runtime.v2.task/k8s.io/abc/rootfs",
                "/var",
                "/system/state",
                "/etc",
                "/run",
            ]
        );
    }

    #[test]
    fn a_busy_mount_is_made_read_only_and_the_machine_goes_down() {
        let mut fake = Fake::new().with_file("/proc/self/mountinfo", MOUNTINFO);
        fake.unmount_errors.insert(PathBuf::from("/var"), 16);
        fake.unmount_errors.insert(PathBuf::from("/etc"), 2);
        let log = MemoryLog::default();
        let stuck = unmount_all(&fake, &log);
        assert!(stuck.is_empty());
        // `last` runs after the sync, before the reboot (the calls below end with both).
        let last = || log.line(&format!("last, after {:?}", fake.calls().last()));
        let err = finish(&fake, &log, ShutdownKind::PowerOff, last);
        assert_eq!(err.to_string(), "fake reboot");
        let remount = |target: &str| Call::RemountReadOnly(target.into());
        assert_eq!(
            fake.calls(),
            [
                Call::Unmount("/mnt/with space".into(), false),
                Call::Unmount(
                    "/var/lib/containerd/io.containerd.runtime.v2.task/k8s.io/abc/rootfs".into(),
                    false
                ),
                Call::Unmount("/var".into(), false),
                remount("/var"),
                Call::Unmount("/system/state".into(), false),
                Call::Unmount("/etc".into(), false),
                Call::Unmount("/run".into(), false),
                remount("/"),
                Call::Sync,
                Call::Reboot(RebootHow::PowerOff),
            ]
        );
        let lines = log.lines();
        assert!(lines.contains(&"keelson-init: unmounted /system/state".to_string()));
        assert!(
            lines
                .contains(&"keelson-init: /var busy (EBUSY (16)): remounted read-only".to_string())
        );
        assert_eq!(
            lines[lines.len().saturating_sub(2)..],
            [
                "keelson-init: last, after Some(Sync)",
                "keelson-init: power off: now"
            ]
        );
    }
}
