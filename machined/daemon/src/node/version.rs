//! `machinectl version`: the OS name and version (os-release), the booted slot
//! (`keelson.slot` on the kernel command line), the kernel release and the architecture.

use keelson_configs::layout::{CMDLINE_SLOT, cmdline_value, parse_cmdline};

use super::NodePaths;

/// What the node runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeVersion {
    /// `NAME` from os-release.
    pub os_name: String,
    /// `VERSION_ID` from os-release.
    pub os_version: String,
    /// The booted slot (`a`/`b`), empty when the command line does not say.
    pub slot: String,
    /// `uname -r`.
    pub kernel: String,
    /// `uname -m`.
    pub arch: String,
    /// The hostname.
    pub hostname: String,
}

/// The value of `key` in os-release text, unquoted.
pub fn os_release_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.trim().split_once('=')?;
        if k != key {
            return None;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(v);
        Some(v.to_owned())
    })
}

/// Reads the node's version facts; a fact that cannot be read is left empty.
pub fn read(paths: &NodePaths) -> NodeVersion {
    let os_release = std::fs::read_to_string(&paths.os_release).unwrap_or_default();
    let cmdline = std::fs::read_to_string(paths.proc.join("cmdline")).unwrap_or_default();
    let args = parse_cmdline(&cmdline);
    let uname = nix::sys::utsname::uname().ok();
    let field = |f: fn(&nix::sys::utsname::UtsName) -> &std::ffi::OsStr| {
        uname
            .as_ref()
            .map(|u| f(u).to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    NodeVersion {
        os_name: os_release_value(&os_release, "NAME").unwrap_or_default(),
        os_version: os_release_value(&os_release, "VERSION_ID").unwrap_or_default(),
        slot: cmdline_value(&args, CMDLINE_SLOT)
            .unwrap_or_default()
            .to_owned(),
        kernel: field(nix::sys::utsname::UtsName::release),
        arch: field(nix::sys::utsname::UtsName::machine),
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn os_release_values_are_unquoted() {
        let text = "NAME=\"Keelson\"\nVERSION_ID='0.1.0'\nID=keelson\n";
        assert_eq!(os_release_value(text, "NAME").as_deref(), Some("Keelson"));
        assert_eq!(
            os_release_value(text, "VERSION_ID").as_deref(),
            Some("0.1.0")
        );
        assert_eq!(os_release_value(text, "ID").as_deref(), Some("keelson"));
        assert_eq!(os_release_value(text, "MISSING"), None);
    }

    #[test]
    fn slot_and_os_come_from_the_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("proc")).unwrap();
        std::fs::write(
            dir.path().join("proc/cmdline"),
            "console=ttyS0 keelson.slot=b quiet\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("os-release"),
            "NAME=Keelson\nVERSION_ID=0.1.0\n",
        )
        .unwrap();
        let paths = NodePaths {
            proc: dir.path().join("proc"),
            os_release: dir.path().join("os-release"),
            ..NodePaths::default()
        };
        let v = read(&paths);
        assert_eq!(v.slot, "b");
        assert_eq!(v.os_name, "Keelson");
        assert_eq!(v.os_version, "0.1.0");
        assert!(!v.kernel.is_empty());
        assert_eq!(v.arch, std::env::consts::ARCH);
    }
}
