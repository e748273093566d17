//! Stage 2's mounts as tables (steps 1 and 2): the required ones after stage 1's
//! `/proc`, `/sys` and `/dev`, the optional ones, the cgroup controllers handed down,
//! the early modules; and the tmpfs over `/etc` and the CNI plugins' overlay that the
//! boot mounts later.

use std::path::Path;

use crate::console::Log;
use crate::drivers::EARLY_MODULES;
use crate::etc_files;
use crate::kmods;
use crate::mounts::{self, EARLY_MOUNTS, MountSpec};
use crate::syscalls::{MountFlags, Syscalls, errno_name};

use super::Error;

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

/// Mount the tmpfs `/etc` and fill it with the image's files.
pub(super) fn mount_etc(sys: &dyn Syscalls, log: &dyn Log) -> bool {
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::console::memory::MemoryLog;
    use crate::syscalls::fake::{Call, Fake};

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
        assert!(
            etc_files::containerd_config("registry.k8s.io/pause:3.10")
                .contains(&format!("bin_dir = \"{CNI_BIN_DIR}\""))
        );
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
}
