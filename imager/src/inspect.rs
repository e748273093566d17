//! `imager inspect IMAGE`: what a disk image holds, read without mounting anything (no
//! root, no loop devices): the partitions, each slot's version and verity root hash (from
//! its loader entry on the ESP and `usr/lib/os-release` in its squashfs root), and single
//! files out of the root filesystem, the ESP, or an ext4 partition (STATE, EPHEMERAL,
//! read with `ext4-view`).

use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use keelson_configs::layout::{self, Slot};

use crate::esp::{BootEntry, EspError, EspReader};
use crate::gpt::{self, Gpt, GptError, GptPartition, Window};
use crate::squashfs::{SquashfsError, SquashfsReader};

/// Errors from inspecting an image.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The image file could not be opened.
    #[error("cannot open disk image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The partition table could not be read.
    #[error("cannot read the partition table of {path}")]
    Gpt {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: GptError,
    },
    /// The ESP could not be read.
    #[error("cannot read the EFI partition of {path}")]
    Esp {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: EspError,
    },
    /// A root filesystem could not be read.
    #[error("cannot read the root filesystem in {partition} of {path}")]
    Root {
        /// The image.
        path: PathBuf,
        /// The partition.
        partition: String,
        /// Why.
        #[source]
        source: SquashfsError,
    },
    /// An ext4 partition could not be read.
    #[error("cannot read {file:?} from the ext4 filesystem in {partition} of {path}")]
    Ext4 {
        /// The image.
        path: PathBuf,
        /// The partition.
        partition: String,
        /// The file asked for.
        file: String,
        /// Why.
        #[source]
        source: ext4_view::Ext4Error,
    },
}

/// The dm-verity values a slot's loader entry carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotVerity {
    /// `keelson.verity.roothash`.
    pub root_hash: String,
    /// `keelson.verity.salt`.
    pub salt: Option<String>,
    /// `keelson.verity.data_blocks`.
    pub data_blocks: Option<u64>,
    /// `keelson.verity.hash_offset`.
    pub hash_offset: Option<u64>,
}

/// What one slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotReport {
    /// The slot.
    pub slot: Slot,
    /// Its root partition, if the table has one.
    pub partition: Option<GptPartition>,
    /// The loader entry's file name, if the ESP has an entry for this slot.
    pub entry_file: Option<String>,
    /// The loader entry.
    pub entry: Option<BootEntry>,
    /// Verity values from the entry's command line.
    pub verity: Option<SlotVerity>,
    /// `usr/lib/os-release` of the slot's root filesystem.
    pub os_release: Option<String>,
    /// Why the root filesystem could not be read (e.g. an empty slot).
    pub root_note: Option<String>,
}

impl SlotReport {
    /// The slot's version: the OS version of the entry's `version` line
    /// (`<generation>-<os version>`), else os-release's `VERSION_ID`.
    pub fn version(&self) -> Option<String> {
        self.entry
            .as_ref()
            .filter(|e| e.version.is_some())
            .map(|e| e.entry_version().os_version)
            .or_else(|| os_release_value(self.os_release.as_deref()?, "VERSION_ID"))
    }
}

/// The value of `key` in an os-release text (quotes removed).
pub fn os_release_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
    })
}

/// Everything `imager inspect` reports about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReport {
    /// The partition table.
    pub gpt: Gpt,
    /// Slot A and slot B.
    pub slots: Vec<SlotReport>,
}

fn human(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if bytes >= 1024 * MIB {
        format!("{:.1} GiB", bytes as f64 / (1024 * MIB) as f64)
    } else {
        format!("{} MiB", bytes / MIB)
    }
}

impl fmt::Display for ImageReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "disk {} ({})",
            self.gpt.disk_guid,
            human(self.gpt.disk_size)
        )?;
        writeln!(
            f,
            "{:>3}  {:<10} {:<38} {:>12} {:>10}",
            "#", "name", "type", "start", "size"
        )?;
        for p in &self.gpt.partitions {
            writeln!(
                f,
                "{:>3}  {:<10} {:<38} {:>12} {:>10}",
                p.number,
                p.name,
                p.type_guid.to_string(),
                p.start(),
                human(p.size())
            )?;
        }
        for s in &self.slots {
            writeln!(f, "slot {}:", s.slot.letter())?;
            writeln!(
                f,
                "  version:  {}",
                s.version().unwrap_or_else(|| "-".to_string())
            )?;
            if let Some(name) = &s.entry_file {
                writeln!(f, "  entry:    loader/entries/{name}")?;
            }
            match &s.verity {
                Some(v) => writeln!(f, "  roothash: {}", v.root_hash)?,
                None => writeln!(f, "  roothash: -")?,
            }
            if let Some(name) = s
                .os_release
                .as_deref()
                .and_then(|t| os_release_value(t, "PRETTY_NAME"))
            {
                writeln!(f, "  os:       {name}")?;
            }
            if let Some(note) = &s.root_note {
                writeln!(f, "  root:     {note}")?;
            }
        }
        Ok(())
    }
}

struct Image {
    path: PathBuf,
    file: File,
    gpt: Gpt,
}

impl Image {
    fn open(path: &Path) -> Result<Image, InspectError> {
        let mut file = File::open(path).map_err(|source| InspectError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let gpt = gpt::read_gpt(&mut file).map_err(|source| InspectError::Gpt {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Image {
            path: path.to_path_buf(),
            file,
            gpt,
        })
    }

    fn partition(&self, name: &str) -> Result<GptPartition, InspectError> {
        self.gpt
            .partition(name)
            .cloned()
            .map_err(|source| InspectError::Gpt {
                path: self.path.clone(),
                source,
            })
    }

    fn window(&self, part: &GptPartition) -> Result<Window<File>, InspectError> {
        let file = self.file.try_clone().map_err(|source| InspectError::Open {
            path: self.path.clone(),
            source,
        })?;
        Ok(Window::partition(file, part))
    }

    fn esp(&self) -> Result<EspReader<Window<File>>, InspectError> {
        let part = self.partition(layout::PART_EFI)?;
        EspReader::open(self.window(&part)?).map_err(|source| InspectError::Esp {
            path: self.path.clone(),
            source,
        })
    }

    fn root(&self, slot: Slot) -> Result<SquashfsReader<'static>, InspectError> {
        let part = self.partition(slot.partition_name())?;
        let window = self.window(&part)?;
        SquashfsReader::open(BufReader::new(window), 0).map_err(|source| InspectError::Root {
            path: self.path.clone(),
            partition: part.name.clone(),
            source,
        })
    }
}

fn slot_verity(entry: &BootEntry) -> Option<SlotVerity> {
    let args = layout::parse_cmdline(&entry.options);
    let get = |key| layout::cmdline_value(&args, key);
    Some(SlotVerity {
        root_hash: get(layout::CMDLINE_VERITY_ROOTHASH)?.to_string(),
        salt: get(layout::CMDLINE_VERITY_SALT).map(str::to_string),
        data_blocks: get(layout::CMDLINE_VERITY_DATA_BLOCKS).and_then(|v| v.parse().ok()),
        hash_offset: get(layout::CMDLINE_VERITY_HASH_OFFSET).and_then(|v| v.parse().ok()),
    })
}

/// Inspect the disk image at `path`.
pub fn inspect(path: &Path) -> Result<ImageReport, InspectError> {
    let image = Image::open(path)?;
    let entries = image.esp()?.entries().map_err(|source| InspectError::Esp {
        path: path.to_path_buf(),
        source,
    })?;
    let mut slots = Vec::new();
    for slot in [Slot::A, Slot::B] {
        let entry = entries.iter().find(|(_, e)| {
            let args = layout::parse_cmdline(&e.options);
            layout::cmdline_value(&args, layout::CMDLINE_SLOT) == Some(slot.letter())
        });
        let partition = image.gpt.partition(slot.partition_name()).ok().cloned();
        let (os_release, root_note) = match &partition {
            None => (None, Some("no partition".to_string())),
            Some(part) => {
                let mut magic = [0u8; 4];
                let mut window = image.window(part)?;
                let has_fs = window.seek(SeekFrom::Start(0)).is_ok()
                    && window.read_exact(&mut magic).is_ok()
                    && &magic == b"hsqs";
                if !has_fs {
                    (None, Some("empty (no squashfs)".to_string()))
                } else {
                    match image.root(slot).and_then(|root| {
                        root.read_file(layout::OS_RELEASE)
                            .map_err(|source| InspectError::Root {
                                path: path.to_path_buf(),
                                partition: part.name.clone(),
                                source,
                            })
                    }) {
                        Ok(data) => (Some(String::from_utf8_lossy(&data).into_owned()), None),
                        Err(e) => (None, Some(error_chain(&e))),
                    }
                }
            }
        };
        slots.push(SlotReport {
            slot,
            partition,
            entry_file: entry.map(|(name, _)| name.clone()),
            verity: entry.and_then(|(_, e)| slot_verity(e)),
            entry: entry.map(|(_, e)| e.clone()),
            os_release,
            root_note,
        });
    }
    Ok(ImageReport {
        gpt: image.gpt,
        slots,
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Read `file` out of a slot's root filesystem (symlinks followed).
pub fn read_root_file(image: &Path, slot: Slot, file: &str) -> Result<Vec<u8>, InspectError> {
    let img = Image::open(image)?;
    let root = img.root(slot)?;
    root.read_file(file).map_err(|source| InspectError::Root {
        path: image.to_path_buf(),
        partition: slot.partition_name().to_string(),
        source,
    })
}

/// Read `file` out of the ESP.
pub fn read_esp_file(image: &Path, file: &str) -> Result<Vec<u8>, InspectError> {
    let img = Image::open(image)?;
    img.esp()?
        .read_file(file)
        .map_err(|source| InspectError::Esp {
            path: image.to_path_buf(),
            source,
        })
}

/// Serves ext4-view's reads from a partition of the image file.
struct PartitionReader(Window<File>);

impl ext4_view::Ext4Read for PartitionReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.0.seek(SeekFrom::Start(start_byte))?;
        self.0.read_exact(dst)?;
        Ok(())
    }
}

/// Read `file` (an absolute path inside the filesystem, e.g. `/config.toml`) out of the
/// ext4 filesystem in `partition` (STATE, EPHEMERAL).
pub fn read_ext4_file(image: &Path, partition: &str, file: &str) -> Result<Vec<u8>, InspectError> {
    let img = Image::open(image)?;
    let part = img.partition(partition)?;
    let ext4_err = |source| InspectError::Ext4 {
        path: image.to_path_buf(),
        partition: partition.to_string(),
        file: file.to_string(),
        source,
    };
    let fs =
        ext4_view::Ext4::load(Box::new(PartitionReader(img.window(&part)?))).map_err(ext4_err)?;
    let absolute = if file.starts_with('/') {
        file.to_string()
    } else {
        format!("/{file}")
    };
    fs.read(absolute.as_str()).map_err(ext4_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_os_release_values() {
        let text = "NAME=\"Keelson\"\nVERSION_ID=0.1.0\nPRETTY_NAME=\"Keelson 0.1.0\"\n";
        assert_eq!(
            os_release_value(text, "VERSION_ID").as_deref(),
            Some("0.1.0")
        );
        assert_eq!(
            os_release_value(text, "PRETTY_NAME").as_deref(),
            Some("Keelson 0.1.0")
        );
        assert_eq!(os_release_value(text, "ID"), None);
    }
}
