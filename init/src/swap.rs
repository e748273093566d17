//! Swap: turn off every active swap area and keep it off while the config says so.
//!
//! The kubelet refuses to run with swap on (unless told `failSwapOn = false`), so a node
//! whose config says `swap = "off"` (the default) turns off whatever is active at boot:
//! `/proc/swaps` lists it, `swapoff(2)` takes it back. Nothing enables swap on a Keelson
//! node: [`Syscalls`] has no `swapon`, the image ships no `swapon` (the preflight checks
//! both that and `/proc/swaps`), and the kernel never activates a swap partition by itself.
//!
//! One console line per event: `swap: none active`, `swap /dev/vda6 turned off`.

use std::io;
use std::path::Path;

use keelson_configs::schema::Swap;

use crate::console::Log;
use crate::syscalls::{Syscalls, errno_name};

/// The kernel's list of active swap areas.
pub const PROC_SWAPS: &str = "/proc/swaps";

/// Errors of reading the swap list.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/proc/swaps` cannot be read.
    #[error("cannot read {PROC_SWAPS}: {errno}: is /proc mounted?", errno = errno_name(source))]
    Read {
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

/// One active swap area, as `/proc/swaps` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapArea {
    /// The device or file (`/dev/vda6`), octal escapes (`\040`) decoded.
    pub path: String,
    /// `partition` or `file`.
    pub kind: String,
    /// Size in KiB.
    pub size_kib: u64,
    /// KiB in use.
    pub used_kib: u64,
    /// Priority.
    pub priority: i64,
}

/// Decode the kernel's octal escapes in `/proc` path fields (`\040` for a space).
pub fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') as u32 * 64
                + (bytes[i + 2] - b'0') as u32 * 8
                + (bytes[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse `/proc/swaps` (a header line, then `path type size used priority` lines).
pub fn parse_swaps(text: &str) -> Vec<SwapArea> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 5 {
                return None;
            }
            Some(SwapArea {
                path: unescape(f[0]),
                kind: f[1].to_string(),
                size_kib: f[2].parse().ok()?,
                used_kib: f[3].parse().ok()?,
                priority: f[4].parse().ok()?,
            })
        })
        .collect()
}

/// The active swap areas.
pub fn active(sys: &dyn Syscalls) -> Result<Vec<SwapArea>, Error> {
    let text = sys
        .read_file(Path::new(PROC_SWAPS))
        .map_err(|source| Error::Read { source })?;
    Ok(parse_swaps(&String::from_utf8_lossy(&text)))
}

/// What `swapoff` errno usually means.
pub fn failure_hint(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(12) => "not enough free memory to take its pages back",
        Some(22) => "it is not an active swap area (already off?)",
        Some(1) => "not allowed (needs CAP_SYS_ADMIN)",
        _ => "see the kernel log",
    }
}

/// What [`enforce`] did.
#[derive(Debug, Default)]
pub struct Report {
    /// Areas turned off now.
    pub turned_off: Vec<String>,
    /// Areas that could not be turned off, and why.
    pub failed: Vec<(String, io::Error)>,
    /// Areas left on because the config allows swap.
    pub left_on: Vec<String>,
}

impl Report {
    /// Whether no swap is active that the config forbids.
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Turn off each of `areas`, logging each one.
pub fn turn_off(sys: &dyn Syscalls, log: &dyn Log, areas: &[SwapArea]) -> Report {
    let mut report = Report::default();
    for area in areas {
        match sys.swapoff(Path::new(&area.path)) {
            Ok(()) => {
                log.line(&format!("swap {} turned off", area.path));
                report.turned_off.push(area.path.clone());
            }
            Err(e) => {
                log.line(&format!(
                    "swap {} could not be turned off: {}: {}",
                    area.path,
                    errno_name(&e),
                    failure_hint(&e)
                ));
                report.failed.push((area.path.clone(), e));
            }
        }
    }
    report
}

/// Apply the config's swap policy: with `Swap::Off`, turn off every active area, then
/// read `/proc/swaps` again to confirm none is left; with `Swap::On`, leave them.
pub fn enforce(sys: &dyn Syscalls, log: &dyn Log, policy: Swap) -> Result<Report, Error> {
    let areas = active(sys)?;
    if policy == Swap::On {
        log.line(&format!(
            "swap: the config allows swap; {} active area(s) left as they are",
            areas.len()
        ));
        return Ok(Report {
            left_on: areas.into_iter().map(|a| a.path).collect(),
            ..Report::default()
        });
    }
    if areas.is_empty() {
        log.line("swap: none active");
        return Ok(Report::default());
    }
    let mut report = turn_off(sys, log, &areas);
    for area in active(sys)? {
        if !report.failed.iter().any(|(p, _)| *p == area.path) {
            log.line(&format!(
                "swap {} is still active after swapoff: see the kernel log",
                area.path
            ));
            report.failed.push((
                area.path,
                io::Error::other("still listed in /proc/swaps after swapoff"),
            ));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::memory::MemoryLog;
    use crate::syscalls::fake::{Call, Fake};
    use std::path::PathBuf;

    const HEADER: &str = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n";

    #[test]
    fn proc_swaps_parses_partitions_files_and_escapes() {
        let text = format!(
            "{HEADER}/dev/vda6                               partition\t65532\t\t0\t\t-2\n\
             /var/swap\\040file                       file\t\t1048572\t\t1024\t\t10\n\
             garbage\n"
        );
        assert_eq!(
            parse_swaps(&text),
            [
                SwapArea {
                    path: "/dev/vda6".into(),
                    kind: "partition".into(),
                    size_kib: 65532,
                    used_kib: 0,
                    priority: -2,
                },
                SwapArea {
                    path: "/var/swap file".into(),
                    kind: "file".into(),
                    size_kib: 1048572,
                    used_kib: 1024,
                    priority: 10,
                },
            ]
        );
        assert!(parse_swaps(HEADER).is_empty());
        assert_eq!(unescape("a\\011b\\\\c\\1"), "a\tb\\\\c\\1");
    }

    fn check(fake: &Fake, policy: Swap, calls: &[&str], lines: &[&str]) -> Result<Report, Error> {
        let log = MemoryLog::default();
        let report = enforce(fake, &log, policy)?;
        let expected: Vec<Call> = calls.iter().map(|p| Call::Swapoff(p.to_string())).collect();
        assert_eq!(fake.calls(), expected);
        let expected: Vec<String> = lines.iter().map(|l| format!("keelson-init: {l}")).collect();
        assert_eq!(log.lines(), expected);
        Ok(report)
    }

    #[test]
    fn every_active_area_is_turned_off() -> Result<(), Error> {
        let fake = Fake::new().with_file(
            PROC_SWAPS,
            &format!("{HEADER}/dev/vda6 partition 65532 0 -2\n/dev/zram0 partition 1024 0 100\n"),
        );
        let report = check(
            &fake,
            Swap::Off,
            &["/dev/vda6", "/dev/zram0"],
            &["swap /dev/vda6 turned off", "swap /dev/zram0 turned off"],
        )?;
        assert!(report.ok());
        assert_eq!(report.turned_off, ["/dev/vda6", "/dev/zram0"]);
        assert!(active(&fake)?.is_empty());
        Ok(())
    }

    #[test]
    fn no_swap_says_so() -> Result<(), Error> {
        let fake = Fake::new().with_file(PROC_SWAPS, HEADER);
        let report = check(&fake, Swap::Off, &[], &["swap: none active"])?;
        assert!(report.ok() && report.turned_off.is_empty());
        Ok(())
    }

    #[test]
    fn a_failed_swapoff_is_reported_with_its_meaning() -> Result<(), Error> {
        let mut fake = Fake::new().with_file(
            PROC_SWAPS,
            &format!("{HEADER}/dev/vda6 partition 65532 60000 -2\n/dev/vdb1 partition 10 0 -3\n"),
        );
        fake.swapoff_errors.insert(PathBuf::from("/dev/vda6"), 12);
        let report = check(
            &fake,
            Swap::Off,
            &["/dev/vda6", "/dev/vdb1"],
            &[
                "swap /dev/vda6 could not be turned off: ENOMEM (12): not enough free memory \
                 to take its pages back",
                "swap /dev/vdb1 turned off",
            ],
        )?;
        assert!(!report.ok());
        assert_eq!(report.failed.len(), 1);
        assert_eq!(report.turned_off, ["/dev/vdb1"]);
        Ok(())
    }

    #[test]
    fn swap_allowed_by_the_config_is_left_alone() -> Result<(), Error> {
        let fake = Fake::new().with_file(
            PROC_SWAPS,
            &format!("{HEADER}/dev/vda6 partition 65532 0 -2\n"),
        );
        let report = check(
            &fake,
            Swap::On,
            &[],
            &["swap: the config allows swap; 1 active area(s) left as they are"],
        )?;
        assert_eq!(report.left_on, ["/dev/vda6"]);
        Ok(())
    }

    #[test]
    fn no_proc_is_an_error() {
        let err = enforce(&Fake::new(), &MemoryLog::default(), Swap::Off)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(
            err,
            "cannot read /proc/swaps: ENOENT (2): is /proc mounted?"
        );
    }
}
