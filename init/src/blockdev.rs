//! Block devices as sysfs shows them, and finding a partition by its GPT name.
//!
//! The kernel parses the GPT itself and publishes each partition's name in
//! `/sys/class/block/<dev>/uevent` as `PARTNAME=`, beside `DEVNAME=`, `MAJOR=` and
//! `MINOR=`. No udev, no blkid: reading those files is all stage 1 needs. Functions take
//! the sysfs root as a parameter so tests point them at a directory tree they built.

use std::io;
use std::path::Path;

use crate::syscalls::Syscalls;

/// Errors of reading sysfs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The block class directory cannot be listed.
    #[error("cannot list {path}")]
    List {
        /// The directory.
        path: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

/// One block device (disk or partition) from its sysfs `uevent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDev {
    /// The node name under `/dev` (`vda2`, `nvme0n1p2`).
    pub devname: String,
    /// Device major number.
    pub major: u32,
    /// Device minor number.
    pub minor: u32,
    /// The GPT partition name, for partitions that have one.
    pub partname: Option<String>,
}

impl BlockDev {
    /// `major:minor`, as device-mapper tables name devices.
    pub fn dev(&self) -> String {
        format!("{}:{}", self.major, self.minor)
    }

    /// `/dev/<devname>`.
    pub fn path(&self) -> String {
        format!("/dev/{}", self.devname)
    }
}

/// Parse a `uevent` file; `fallback_name` (the sysfs directory's name) is used when it
/// has no `DEVNAME=`. Returns `None` without `MAJOR=`/`MINOR=`.
pub fn parse_uevent(text: &str, fallback_name: &str) -> Option<BlockDev> {
    let mut devname = None;
    let mut major = None;
    let mut minor = None;
    let mut partname = None;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("DEVNAME", v)) => devname = Some(v.to_string()),
            Some(("MAJOR", v)) => major = v.trim().parse().ok(),
            Some(("MINOR", v)) => minor = v.trim().parse().ok(),
            Some(("PARTNAME", v)) => partname = Some(v.to_string()),
            _ => {}
        }
    }
    Some(BlockDev {
        devname: devname.unwrap_or_else(|| fallback_name.to_string()),
        major: major?,
        minor: minor?,
        partname,
    })
}

/// Every block device under `<sysfs>/class/block`, sorted by name, read through `sys`.
/// Entries whose `uevent` cannot be read or parsed are skipped (devices come and go
/// while we look).
pub fn scan(sys: &dyn Syscalls, sysfs: &Path) -> Result<Vec<BlockDev>, Error> {
    let dir = sysfs.join("class/block");
    let names = sys.read_dir_names(&dir).map_err(|source| Error::List {
        path: dir.display().to_string(),
        source,
    })?;
    let mut devs = Vec::new();
    for name in names {
        let Ok(bytes) = sys.read_file(&dir.join(&name).join("uevent")) else {
            continue;
        };
        if let Some(dev) = parse_uevent(&String::from_utf8_lossy(&bytes), &name) {
            devs.push(dev);
        }
    }
    devs.sort_by(|a, b| a.devname.cmp(&b.devname));
    Ok(devs)
}

/// The devices whose GPT partition name is `partname`, in name order.
pub fn find_by_partname<'a>(devs: &'a [BlockDev], partname: &str) -> Vec<&'a BlockDev> {
    devs.iter()
        .filter(|d| d.partname.as_deref() == Some(partname))
        .collect()
}

/// A one-line summary of what was seen (`vda, vda1 (EFI), vda2 (ROOT-A)`), for the message
/// that says a partition never appeared.
pub fn describe(devs: &[BlockDev]) -> String {
    if devs.is_empty() {
        return "no block devices at all".to_string();
    }
    devs.iter()
        .map(|d| match &d.partname {
            Some(p) => format!("{} ({p})", d.devname),
            None => d.devname.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
// Tests build their fixtures on disk.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A scratch directory under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> io::Result<Scratch> {
            let dir = std::env::temp_dir().join(format!(
                "keelson-init-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            Ok(Scratch(dir))
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn add(root: &Path, name: &str, uevent: &str) -> io::Result<()> {
        let dir = root.join("class/block").join(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("uevent"), uevent)
    }

    #[test]
    fn partitions_are_found_by_gpt_name_in_a_fake_sysfs() -> Result<(), Box<dyn std::error::Error>>
    {
        let scratch = Scratch::new("sysfs")?;
        let root = &scratch.0;
        add(
            root,
            "vda",
            "MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n",
        )?;
        add(
            root,
            "vda1",
            "MAJOR=254\nMINOR=1\nDEVNAME=vda1\nDEVTYPE=partition\nPARTN=1\nPARTNAME=EFI\n",
        )?;
        add(
            root,
            "vda2",
            "MAJOR=254\nMINOR=2\nDEVNAME=vda2\nDEVTYPE=partition\nPARTN=2\nPARTNAME=ROOT-A\n",
        )?;
        add(root, "loop0", "MAJOR=7\nMINOR=0\n")?; // no DEVNAME: the directory name
        add(root, "broken", "DEVNAME=broken\n")?; // no numbers: skipped
        let devs = scan(&crate::syscalls::Linux, root)?;
        assert_eq!(devs.len(), 4);
        let found = find_by_partname(&devs, "ROOT-A");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].devname, "vda2");
        assert_eq!(found[0].dev(), "254:2");
        assert_eq!(found[0].path(), "/dev/vda2");
        assert!(find_by_partname(&devs, "ROOT-B").is_empty());
        assert_eq!(describe(&devs), "loop0, vda, vda1 (EFI), vda2 (ROOT-A)");
        Ok(())
    }

    #[test]
    fn a_missing_sysfs_is_an_error_naming_the_path() {
        let err = scan(&crate::syscalls::Linux, Path::new("/nonexistent-sysfs"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(err, "cannot list /nonexistent-sysfs/class/block");
    }
}
