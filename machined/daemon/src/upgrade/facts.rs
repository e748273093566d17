//! What the engine reads of the node before it decides anything: the booted slot and the
//! running version, the architecture, the components the image carries, the inactive
//! slot's partition (by GPT name through sysfs) and its size, the running config's
//! `version`, and STATE's upgrade record.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use keelson_configs::layout::{CMDLINE_SLOT, Slot, cmdline_value, parse_cmdline};
use keelson_node_protocol::upgrade::{UPGRADE_RECORD, UpgradeRecord};

use super::{UpgradeError, UpgradePaths};
use crate::node::version::os_release_value;

/// The slot the node booted from (`keelson.slot` on the kernel command line).
pub fn booted_slot(paths: &UpgradePaths) -> Result<Slot, UpgradeError> {
    let text = fs::read_to_string(&paths.cmdline).map_err(|source| UpgradeError::Read {
        what: "the kernel command line",
        path: paths.cmdline.clone(),
        source,
    })?;
    let args = parse_cmdline(&text);
    cmdline_value(&args, CMDLINE_SLOT)
        .and_then(Slot::parse)
        .ok_or_else(|| UpgradeError::NoBootedSlot {
            path: paths.cmdline.clone(),
        })
}

/// The running OS version (`VERSION_ID` of os-release).
pub fn running_version(paths: &UpgradePaths) -> Result<String, UpgradeError> {
    let text = fs::read_to_string(&paths.os_release).map_err(|source| UpgradeError::Read {
        what: "the os-release",
        path: paths.os_release.clone(),
        source,
    })?;
    os_release_value(&text, "VERSION_ID").ok_or_else(|| UpgradeError::Read {
        what: "VERSION_ID in the os-release",
        path: paths.os_release.clone(),
        source: io::Error::new(io::ErrorKind::InvalidData, "no VERSION_ID line"),
    })
}

/// The node's architecture as bundles name it (`amd64`, `arm64`), from `uname -m`.
pub fn arch() -> String {
    let machine = nix::sys::utsname::uname()
        .map(|u| u.machine().to_string_lossy().into_owned())
        .unwrap_or_default();
    keelson_configs::layout::Arch::ALL
        .into_iter()
        .find(|a| a.uname() == machine)
        .map_or(machine, |a| a.debian().to_owned())
}

/// The components the running image carries, one per line (an image without the file
/// carries none that an upgrade must keep).
pub fn components(paths: &UpgradePaths) -> Result<Vec<String>, UpgradeError> {
    match fs::read_to_string(&paths.components) {
        Ok(text) => Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(UpgradeError::Read {
            what: "the components file",
            path: paths.components.clone(),
            source,
        }),
    }
}

/// The running config's `version` (`v1`), `None` in maintenance mode (no config yet).
pub fn config_version(paths: &UpgradePaths) -> Result<Option<String>, UpgradeError> {
    let path = paths.state.join(keelson_node_protocol::state::CONFIG);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(UpgradeError::Read {
                what: "the running config",
                path,
                source,
            });
        }
    };
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| UpgradeError::Read {
            what: "the running config",
            path: path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
        })?;
    Ok(table
        .get("version")
        .and_then(|v| v.as_str())
        .map(str::to_owned))
}

/// A slot's root partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// The kernel's name (`vda3`).
    pub name: String,
    /// Its device node (`/dev/vda3`).
    pub device: PathBuf,
    /// Its size in bytes.
    pub size: u64,
}

/// The partition named `slot.partition_name()`, found through `<sys_block>/*/uevent`'s
/// `PARTNAME=`. When several disks have one, the one on the disk of the booted slot's
/// partition is chosen.
pub fn find_partition(paths: &UpgradePaths, slot: Slot) -> Result<Partition, UpgradeError> {
    let part_err = |problem: String| UpgradeError::Partition {
        slot: slot.letter().to_owned(),
        name: slot.partition_name(),
        problem,
        sys_block: paths.sys_block.clone(),
    };
    let found = partitions_named(&paths.sys_block, slot.partition_name())
        .map_err(|e| part_err(format!("could not be looked for ({e})")))?;
    let chosen = match found.len() {
        0 => return Err(part_err("was not found".into())),
        1 => found.into_iter().next(),
        _ => {
            let other = partitions_named(&paths.sys_block, slot.other().partition_name())
                .unwrap_or_default();
            let disks: Vec<PathBuf> = other.iter().filter_map(|(_, d)| d.clone()).collect();
            let names: Vec<String> = found.iter().map(|(n, _)| n.clone()).collect();
            let mut same_disk = found
                .into_iter()
                .filter(|(_, disk)| disk.as_ref().is_some_and(|d| disks.contains(d)));
            match (same_disk.next(), same_disk.next()) {
                (Some(one), None) => Some(one),
                _ => None,
            }
            .ok_or_else(|| part_err(format!("was found on several disks ({})", names.join(", "))))
            .map(Some)?
        }
    };
    let Some((name, _)) = chosen else {
        return Err(part_err("was not found".into()));
    };
    let size_path = paths.sys_block.join(&name).join("size");
    let sectors = fs::read_to_string(&size_path)
        .map_err(|source| UpgradeError::Read {
            what: "the partition's size",
            path: size_path.clone(),
            source,
        })?
        .trim()
        .parse::<u64>()
        .map_err(|e| UpgradeError::Read {
            what: "the partition's size",
            path: size_path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
        })?;
    let devname = uevent_value(&paths.sys_block.join(&name), "DEVNAME").unwrap_or(name.clone());
    Ok(Partition {
        device: paths.dev.join(devname),
        name,
        size: sectors.saturating_mul(512),
    })
}

/// The block devices whose `uevent` says `PARTNAME=<partname>`, with their disk (the
/// sysfs parent of the partition's device directory).
fn partitions_named(
    sys_block: &Path,
    partname: &str,
) -> io::Result<Vec<(String, Option<PathBuf>)>> {
    let mut found = Vec::new();
    for item in fs::read_dir(sys_block)? {
        let item = item?;
        let dir = item.path();
        if uevent_value(&dir, "PARTNAME").as_deref() == Some(partname) {
            let disk = fs::canonicalize(&dir)
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf));
            found.push((item.file_name().to_string_lossy().into_owned(), disk));
        }
    }
    found.sort();
    Ok(found)
}

fn uevent_value(dir: &Path, key: &str) -> Option<String> {
    let text = fs::read_to_string(dir.join("uevent")).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k == key).then(|| v.trim().to_owned())
    })
}

/// STATE's upgrade record (an empty one when there is none yet).
pub fn read_record(state: &Path) -> Result<UpgradeRecord, UpgradeError> {
    let path = state.join(UPGRADE_RECORD);
    match fs::read(&path) {
        Ok(bytes) => UpgradeRecord::parse(&bytes).map_err(|e| UpgradeError::Record {
            what: "read",
            path,
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(UpgradeRecord::default()),
        Err(e) => Err(UpgradeError::Record {
            what: "read",
            path,
            reason: e.to_string(),
        }),
    }
}

/// Writes STATE's upgrade record (the protocol's atomic write, mode 0600).
pub fn write_record(state: &Path, record: &UpgradeRecord) -> Result<(), UpgradeError> {
    let path = state.join(UPGRADE_RECORD);
    keelson_node_protocol::state::write_atomic(
        &path,
        &record.to_bytes(),
        keelson_node_protocol::state::PRIVATE_FILE_MODE,
    )
    .map_err(|e| UpgradeError::Record {
        what: "write",
        path,
        reason: e.to_string(),
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}
