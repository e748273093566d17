//! Stage 2: PID 1 of the verified root. For now it only proves that the boot chain
//! worked: it prints a stable marker and a banner (version, slot, verity root hash,
//! kernel, architecture) on the console, syncs and powers off. The PID 1 issue turns it
//! into the real init (mount table, reaper, supervisor) on the same skeleton.

use std::convert::Infallible;
use std::io;
use std::path::Path;

use keelson_configs::layout::{self, CMDLINE_VERITY_ROOTHASH, cmdline_value, parse_cmdline};

use crate::cmdline;
use crate::console::Log;
use crate::mounts::{self, EARLY_MOUNTS};
use crate::syscalls::{RebootHow, Syscalls, errno_name};

/// The line end-to-end tests wait for: stage 2 is running from the verified root.
pub const READY_MARKER: &str = "KEELSON STAGE2 READY";

/// Why stage 2 stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An early mount failed.
    #[error("early mounts failed")]
    Mounts(#[from] mounts::Error),
    /// The kernel refused to power off.
    #[error("power off failed: {errno}", errno = errno_name(source))]
    PowerOff {
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

/// What the banner says.
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

/// Gather the banner from `/proc/cmdline`, os-release and uname.
pub fn banner(sys: &dyn Syscalls) -> Banner {
    let cmdline = sys
        .read_file(Path::new("/proc/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let args = parse_cmdline(&cmdline);
    let os_release = Path::new("/").join(layout::OS_RELEASE);
    let version = sys
        .read_file(&os_release)
        .ok()
        .and_then(|b| os_release_version(&String::from_utf8_lossy(&b)))
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string());
    let uname = sys.uname();
    Banner {
        version,
        slot: cmdline::slot(&cmdline)
            .map(|s| s.letter().to_string())
            .unwrap_or_else(|| "?".to_string()),
        root_hash: cmdline_value(&args, CMDLINE_VERITY_ROOTHASH)
            .unwrap_or("none")
            .to_string(),
        kernel: uname.release,
        arch: uname.machine,
    }
}

/// Run stage 2: mounts, banner, power off. Returns only if powering off failed.
pub fn run(sys: &dyn Syscalls, log: &dyn Log) -> Result<Infallible, Error> {
    mounts::apply(sys, EARLY_MOUNTS)?;
    log.reopen();
    log.raw(READY_MARKER);
    log.line(&format!("stage 2 banner: {}", banner(sys)));
    log.line("powering off");
    sys.sync();
    Err(Error::PowerOff {
        source: sys.reboot(RebootHow::PowerOff),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::memory::MemoryLog;
    use crate::syscalls::fake::{Call, Fake};
    use std::path::PathBuf;

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
    fn stage2_prints_the_marker_and_banner_then_powers_off() {
        let fake = Fake::new()
            .with_file(
                "/proc/cmdline",
                "console=ttyS0 keelson.slot=b keelson.verity.roothash=abcd",
            )
            .with_file("/usr/lib/os-release", "ID=keelson\nVERSION_ID=0.9.1\n");
        for m in ["/proc", "/sys", "/dev"] {
            fake.mount_points.borrow_mut().insert(PathBuf::from(m));
        }
        let log = MemoryLog::default();
        let r = run(&fake, &log);
        assert!(matches!(r, Err(Error::PowerOff { .. })));
        assert_eq!(
            log.lines(),
            [
                "KEELSON STAGE2 READY",
                "keelson-init: stage 2 banner: Keelson 0.9.1 slot=b verity=abcd kernel=6.12.0-test arch=x86_64",
                "keelson-init: powering off",
            ]
        );
        // Moved mounts are not mounted again.
        assert_eq!(
            fake.calls(),
            [Call::Sync, Call::Reboot(RebootHow::PowerOff)]
        );
    }

    #[test]
    fn the_banner_has_defaults() {
        let b = banner(&Fake::new());
        assert_eq!(b.version, env!("CARGO_PKG_VERSION"));
        assert_eq!((b.slot.as_str(), b.root_hash.as_str()), ("?", "none"));
    }
}
