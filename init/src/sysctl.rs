//! Sysctls: apply `name = value` pairs through `/proc/sys`, confirm each by reading it
//! back, and report every key's outcome.
//!
//! A name is dotted (`net.ipv4.ip_forward` -> `/proc/sys/net/ipv4/ip_forward`) or, when a
//! component itself holds dots (an interface such as `eth0.100`), written with slashes as
//! sysctl.d allows (`net/ipv4/conf/eth0.100/rp_filter`). Names are validated before
//! anything is written: no empty, `.` or `..` component, no control characters or spaces,
//! so a name can never reach outside `/proc/sys`.
//!
//! Order matters: `net.bridge.*` only exists once `br_netfilter` is loaded, so stage 2
//! loads modules first; a missing key says which module it needs. Pairs are applied in
//! the order given, and one failure does not stop the others.

use std::io;
use std::path::{Path, PathBuf};

use crate::console::Log;
use crate::syscalls::{Syscalls, errno_name};

/// Where the kernel's sysctls live.
pub const PROC_SYS: &str = "/proc/sys";

/// Longest sysctl name accepted.
const MAX_NAME: usize = 255;

/// Why one sysctl was not applied.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The name is not a sysctl name.
    #[error("invalid sysctl name {name:?}: {why}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The value cannot be written as one line.
    #[error("invalid value {value:?} for {name}: a sysctl value is one line of text")]
    InvalidValue {
        /// The sysctl.
        name: String,
        /// The value given.
        value: String,
    },
    /// Writing the file failed.
    #[error("cannot write {path}: {errno}: {hint}", errno = errno_name(source))]
    Write {
        /// The `/proc/sys` file.
        path: String,
        /// What to do about it.
        hint: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// Reading it back failed.
    #[error("wrote {path} but cannot read it back: {errno}", errno = errno_name(source))]
    ReadBack {
        /// The `/proc/sys` file.
        path: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// It reads back something else.
    #[error("wrote {path} but it reads back {actual:?}: the kernel adjusted or ignored the value")]
    Mismatch {
        /// The `/proc/sys` file.
        path: String,
        /// What it reads.
        actual: String,
    },
}

/// The path of `name` relative to `/proc/sys`, after validation.
pub fn relative_path(name: &str) -> Result<PathBuf, Error> {
    let invalid = |why| Error::InvalidName {
        name: name.to_string(),
        why,
    };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() > MAX_NAME {
        return Err(invalid("longer than 255 bytes"));
    }
    if name
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == '=')
    {
        return Err(invalid(
            "spaces, control characters and '=' are not allowed",
        ));
    }
    let separator = if name.contains('/') { '/' } else { '.' };
    let components: Vec<&str> = name.split(separator).collect();
    if components.len() < 2 {
        return Err(invalid(
            "a sysctl has at least two components (net.ipv4.ip_forward)",
        ));
    }
    let mut path = PathBuf::new();
    for c in components {
        if c.is_empty() {
            return Err(invalid(
                "empty component (leading, trailing or doubled separator)",
            ));
        }
        if c == "." || c == ".." {
            return Err(invalid("'.' and '..' components are not allowed"));
        }
        path.push(c);
    }
    Ok(path)
}

/// The `/proc/sys` file of `name` under `proc_sys` (normally [`PROC_SYS`]).
pub fn path_of(proc_sys: &Path, name: &str) -> Result<PathBuf, Error> {
    Ok(proc_sys.join(relative_path(name)?))
}

/// What to do when writing a sysctl failed with `err`.
pub fn hint(name: &str, err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(2) if name.starts_with("net.bridge.") || name.starts_with("net/bridge/") => {
            "no such sysctl: net.bridge.* appears once the br_netfilter module is loaded; load it before applying sysctls".into()
        }
        Some(2) if name.starts_with("net.ipv6.") || name.starts_with("net/ipv6/") => {
            "no such sysctl: is IPv6 disabled (ipv6.disable=1 on the kernel command line)?"
                .into()
        }
        Some(2) if name.starts_with("net.netfilter.nf_conntrack") => {
            "no such sysctl: it appears once nf_conntrack is loaded; load it first".into()
        }
        Some(2) => "this kernel has no such sysctl: check the name".into(),
        Some(13) | Some(1) => "the kernel does not allow writing it (read-only or not in this namespace)".into(),
        Some(22) => "the kernel refused the value: check its range and format".into(),
        _ => "see the kernel log".into(),
    }
}

/// Text as the kernel prints it, for comparison: words separated by single spaces.
fn normalise(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Set one sysctl and read it back.
pub fn set(sys: &dyn Syscalls, proc_sys: &Path, name: &str, value: &str) -> Result<(), Error> {
    let path = path_of(proc_sys, name)?;
    if value.contains('\n') || value.contains('\0') {
        return Err(Error::InvalidValue {
            name: name.to_string(),
            value: value.to_string(),
        });
    }
    let shown = path.display().to_string();
    sys.write_file(&path, format!("{value}\n").as_bytes())
        .map_err(|source| Error::Write {
            path: shown.clone(),
            hint: hint(name, &source),
            source,
        })?;
    let back = sys.read_file(&path).map_err(|source| Error::ReadBack {
        path: shown.clone(),
        source,
    })?;
    let actual = String::from_utf8_lossy(&back);
    if normalise(&actual) != normalise(value) {
        return Err(Error::Mismatch {
            path: shown,
            actual: actual.trim_end().to_string(),
        });
    }
    Ok(())
}

/// Every key's outcome, in the order applied.
#[derive(Debug, Default)]
pub struct Report {
    /// Keys set and confirmed.
    pub applied: Vec<(String, String)>,
    /// Keys that failed, and why.
    pub failed: Vec<(String, Error)>,
}

impl Report {
    /// Whether every key was applied.
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Apply `entries` in order under `proc_sys` (normally [`PROC_SYS`]), logging
/// `sysctl net.ipv4.ip_forward=1 applied` or the failure, and go on after a failure.
pub fn apply<'a, I>(sys: &dyn Syscalls, log: &dyn Log, proc_sys: &Path, entries: I) -> Report
where
    I: IntoIterator<Item = (&'a str, &'a str)>,
{
    let mut report = Report::default();
    for (name, value) in entries {
        match set(sys, proc_sys, name, value) {
            Ok(()) => {
                log.line(&format!("sysctl {name}={value} applied"));
                report.applied.push((name.to_string(), value.to_string()));
            }
            Err(e) => {
                log.line(&format!("sysctl {name}={value} failed: {e}"));
                report.failed.push((name.to_string(), e));
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::memory::MemoryLog;
    use crate::syscalls::fake::{Call, Fake};

    fn check_path(name: &str, expected: Result<&str, &str>) {
        let got = relative_path(name)
            .map(|p| p.display().to_string())
            .map_err(|e| e.to_string());
        let expected = expected.map(str::to_string).map_err(str::to_string);
        assert_eq!(got, expected, "{name}");
    }

    #[test]
    fn names_map_to_proc_sys_paths() {
        check_path("net.ipv4.ip_forward", Ok("net/ipv4/ip_forward"));
        check_path(
            "net.bridge.bridge-nf-call-iptables",
            Ok("net/bridge/bridge-nf-call-iptables"),
        );
        check_path(
            "net/ipv4/conf/eth0.100/rp_filter",
            Ok("net/ipv4/conf/eth0.100/rp_filter"),
        );
        check_path("vm.overcommit_memory", Ok("vm/overcommit_memory"));
    }

    #[test]
    fn bad_names_are_refused_before_any_write() {
        let err = |why: &str, name: &str| format!("invalid sysctl name {name:?}: {why}");
        for (name, why) in [
            ("", "empty"),
            (
                "ip_forward",
                "a sysctl has at least two components (net.ipv4.ip_forward)",
            ),
            (
                "net..ipv4",
                "empty component (leading, trailing or doubled separator)",
            ),
            (
                ".net.ipv4",
                "empty component (leading, trailing or doubled separator)",
            ),
            (
                "net/ipv4/",
                "empty component (leading, trailing or doubled separator)",
            ),
            (
                "net/../../etc/passwd",
                "'.' and '..' components are not allowed",
            ),
            (
                "net.ipv4 .x",
                "spaces, control characters and '=' are not allowed",
            ),
            (
                "net.ipv4=1",
                "spaces, control characters and '=' are not allowed",
            ),
        ] {
            check_path(name, Err(&err(why, name)));
        }
        check_path(
            &"a.".repeat(200),
            Err(&err("longer than 255 bytes", &"a.".repeat(200))),
        );
    }

    fn proc_fake() -> Fake {
        let mut fake = Fake::new()
            .with_file("/proc/sys/net/ipv4/ip_forward", "0\n")
            .with_file("/proc/sys/net/ipv4/ip_local_port_range", "32768\t60999\n")
            .with_file("/proc/sys/kernel/sched_child_runs_first", "0\n");
        fake.strict_writes = true;
        fake
    }

    #[test]
    fn entries_apply_in_order_and_read_back() {
        let fake = proc_fake();
        let log = MemoryLog::default();
        let report = apply(
            &fake,
            &log,
            Path::new(PROC_SYS),
            [
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.ip_local_port_range", "1024  65000"),
            ],
        );
        assert!(report.ok(), "{:?}", report.failed);
        assert_eq!(
            fake.calls()
                .iter()
                .map(|c| match c {
                    Call::WriteFile(p, d) => format!("{p} <- {}", String::from_utf8_lossy(d)),
                    other => format!("{other:?}"),
                })
                .collect::<Vec<_>>(),
            [
                "/proc/sys/net/ipv4/ip_forward <- 1\n",
                "/proc/sys/net/ipv4/ip_local_port_range <- 1024  65000\n",
            ]
        );
        assert_eq!(
            log.lines(),
            [
                "keelson-init: sysctl net.ipv4.ip_forward=1 applied",
                "keelson-init: sysctl net.ipv4.ip_local_port_range=1024  65000 applied",
            ]
        );
    }

    #[test]
    fn failures_are_reported_per_key_and_do_not_stop_the_rest() {
        let mut fake = proc_fake();
        fake.write_errors
            .insert(PathBuf::from("/proc/sys/kernel/sched_child_runs_first"), 13);
        let log = MemoryLog::default();
        // Before br_netfilter is loaded, net.bridge.* does not exist.
        let report = apply(
            &fake,
            &log,
            Path::new(PROC_SYS),
            [
                ("net.bridge.bridge-nf-call-iptables", "1"),
                ("net..bad", "1"),
                ("kernel.sched_child_runs_first", "1"),
                ("net.ipv4.ip_forward", "1\n0"),
                ("net.ipv4.ip_forward", "1"),
            ],
        );
        let failed: Vec<String> = report
            .failed
            .iter()
            .map(|(n, e)| format!("{n}: {e}"))
            .collect();
        assert_eq!(
            failed,
            [
                "net.bridge.bridge-nf-call-iptables: cannot write \
                 /proc/sys/net/bridge/bridge-nf-call-iptables: ENOENT (2): no such sysctl: \
                 net.bridge.* appears once the br_netfilter module is loaded; load it before \
                 applying sysctls",
                "net..bad: invalid sysctl name \"net..bad\": empty component (leading, \
                 trailing or doubled separator)",
                "kernel.sched_child_runs_first: cannot write \
                 /proc/sys/kernel/sched_child_runs_first: EACCES (13): the kernel does not \
                 allow writing it (read-only or not in this namespace)",
                "net.ipv4.ip_forward: invalid value \"1\\n0\" for net.ipv4.ip_forward: a \
                 sysctl value is one line of text",
            ]
        );
        assert_eq!(report.applied, [("net.ipv4.ip_forward".into(), "1".into())]);
        assert_eq!(log.lines().len(), 5);
        // The invalid name and value never reached the kernel.
        assert_eq!(fake.calls().len(), 3);
    }

    #[test]
    fn a_value_the_kernel_changes_is_a_mismatch() {
        // Without strict writes the fake keeps the file's content, as a kernel that
        // ignores or clamps the value does.
        let fake = Fake::new().with_file("/proc/sys/vm/swappiness", "60\n");
        let err = set(&fake, Path::new(PROC_SYS), "vm.swappiness", "0")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(
            err,
            "wrote /proc/sys/vm/swappiness but it reads back \"60\": the kernel adjusted or ignored the value"
        );
    }
}
