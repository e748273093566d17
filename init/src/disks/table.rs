//! The boot disk's GPT at first boot: move the backup GPT to the end of a disk larger than
//! the image, create STATE and EPHEMERAL when absent, and grow EPHEMERAL into the free
//! space after it.
//!
//! Planning ([`plan`]) is pure arithmetic on a [`Layout`], so the growth math is tested on
//! its own; [`edit`] reads the table with the `gpt` crate, applies the plan, and writes the
//! primary and backup tables back (the crate's `update_partitions` places the backup
//! header at the device's real end). The protective MBR's size field is updated to match.
//! Partitions are 1 MiB aligned, as the imager lays them out.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use keelson_configs::layout::{
    PART_EPHEMERAL, PART_STATE, PARTITION_ALIGN, TYPE_GUID_LINUX_DATA, TYPE_GUID_VAR,
};

/// STATE's size when it has to be created (the imager's `state_mib`).
pub const STATE_SIZE: u64 = 100 << 20;
/// The smallest EPHEMERAL worth creating.
pub const EPHEMERAL_MIN_SIZE: u64 = 64 << 20;
/// Partition entries in a table we write (the standard number).
const ENTRIES: u64 = 128;
/// Bytes of one partition entry (the only size the `gpt` crate reads).
const ENTRY_SIZE: u64 = 128;

/// Errors of editing the partition table.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the disk failed.
    #[error("cannot {what} {disk}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The disk.
        disk: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The table cannot be read or written by the `gpt` crate.
    #[error("the GPT of {disk} cannot be {what}")]
    Gpt {
        /// `read` or `written`.
        what: &'static str,
        /// The disk.
        disk: String,
        /// Why.
        #[source]
        source: gpt::GptError,
    },
    /// The table is one we refuse to edit.
    #[error("refusing to edit the GPT of {disk}: {why}")]
    Unsupported {
        /// The disk.
        disk: String,
        /// Why, and what to do.
        why: String,
    },
    /// No room for a partition that must be created.
    #[error(
        "no room on the disk for {name} ({needed} MiB needed, {largest} MiB free in one piece): use a larger disk"
    )]
    NoRoom {
        /// The partition.
        name: &'static str,
        /// MiB needed.
        needed: u64,
        /// MiB of the largest free region.
        largest: u64,
    },
}

/// One partition of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// 1-based entry number (`/dev/vdaN`).
    pub number: u32,
    /// GPT partition name.
    pub name: String,
    /// Type GUID, upper case.
    pub type_guid: String,
    /// First sector.
    pub first_lba: u64,
    /// Last sector (inclusive).
    pub last_lba: u64,
}

impl Part {
    /// Sectors.
    pub fn sectors(&self) -> u64 {
        self.last_lba + 1 - self.first_lba
    }
}

/// A disk and its table, as planning needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Logical sector size in bytes (512 or 4096).
    pub sector: u64,
    /// The disk's real size in sectors.
    pub disk_sectors: u64,
    /// The first sector partitions may use.
    pub first_usable: u64,
    /// Where the header says the backup header is.
    pub backup_lba: u64,
    /// The partitions in use.
    pub parts: Vec<Part>,
}

impl Layout {
    /// Sectors taken by one partition entry array.
    pub fn entry_sectors(&self) -> u64 {
        (ENTRIES * ENTRY_SIZE).div_ceil(self.sector)
    }

    /// The last usable sector with the backup GPT at the disk's end.
    pub fn last_usable(&self) -> u64 {
        self.disk_sectors - 1 - self.entry_sectors() - 1
    }

    fn align(&self) -> u64 {
        (PARTITION_ALIGN / self.sector).max(1)
    }

    /// Free regions `(first, last)` between `first_usable` and the last usable sector.
    pub fn free(&self) -> Vec<(u64, u64)> {
        let mut parts: Vec<&Part> = self.parts.iter().collect();
        parts.sort_by_key(|p| p.first_lba);
        let mut out = Vec::new();
        let mut next = self.first_usable;
        for p in parts {
            if p.first_lba > next {
                out.push((next, p.first_lba - 1));
            }
            next = next.max(p.last_lba + 1);
        }
        if next <= self.last_usable() {
            out.push((next, self.last_usable()));
        }
        out
    }

    fn find(&self, name: &str) -> Option<&Part> {
        self.parts.iter().find(|p| p.name == name)
    }
}

/// A partition whose end moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grow {
    /// Entry number.
    pub number: u32,
    /// Its name.
    pub name: String,
    /// First sector (unchanged).
    pub first_lba: u64,
    /// Last sector before.
    pub old_last: u64,
    /// Last sector after.
    pub new_last: u64,
}

/// What [`plan`] decided; empty when the table is already as it should be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The backup GPT is not at the disk's end and moves there.
    pub relocate_backup: bool,
    /// Partitions to create.
    pub create: Vec<Part>,
    /// EPHEMERAL grows.
    pub grow: Option<Grow>,
}

impl Plan {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        !self.relocate_backup && self.create.is_empty() && self.grow.is_none()
    }
}

fn align_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

fn align_down(n: u64, to: u64) -> u64 {
    n / to * to
}

/// Decide what to change: relocate the backup header, create STATE (100 MiB, in the first
/// free region that holds it) and EPHEMERAL (the largest free region) when absent, and
/// grow EPHEMERAL up to the next partition or the disk's last usable sector, by whole MiB.
pub fn plan(layout: &Layout, disk: &str) -> Result<Plan, Error> {
    let unsupported = |why: String| Error::Unsupported {
        disk: disk.to_string(),
        why,
    };
    let min_sectors = layout
        .first_usable
        .saturating_add(2 * layout.entry_sectors() + 2);
    if layout.disk_sectors < min_sectors {
        return Err(unsupported(format!(
            "the disk has {} sectors, too few for a GPT",
            layout.disk_sectors
        )));
    }
    if let Some(p) = layout
        .parts
        .iter()
        .find(|p| p.last_lba > layout.last_usable())
    {
        return Err(unsupported(format!(
            "partition {} ({}) ends at sector {}, beyond the disk's last usable sector {}: the disk is smaller than the image written to it",
            p.number,
            p.name,
            p.last_lba,
            layout.last_usable()
        )));
    }
    let align = layout.align();
    let mut plan = Plan {
        relocate_backup: layout.backup_lba != layout.disk_sectors - 1,
        ..Plan::default()
    };
    let mut working = layout.clone();
    let mut next_number = layout.parts.iter().map(|p| p.number).max().unwrap_or(0) + 1;
    let mib = |sectors: u64| (sectors * layout.sector) >> 20;

    if working.find(PART_STATE).is_none() {
        let size = STATE_SIZE / layout.sector;
        let free = working.free();
        let spot = free.iter().find_map(|&(first, last)| {
            let start = align_up(first, align);
            (start + size - 1 <= last).then_some(start)
        });
        let Some(start) = spot else {
            return Err(Error::NoRoom {
                name: PART_STATE,
                needed: STATE_SIZE >> 20,
                largest: free.iter().map(|(f, l)| mib(l + 1 - f)).max().unwrap_or(0),
            });
        };
        let part = Part {
            number: next_number,
            name: PART_STATE.into(),
            type_guid: TYPE_GUID_LINUX_DATA.into(),
            first_lba: start,
            last_lba: start + size - 1,
        };
        next_number += 1;
        working.parts.push(part.clone());
        plan.create.push(part);
    }

    match working.find(PART_EPHEMERAL).cloned() {
        None => {
            let free = working.free();
            let best = free
                .iter()
                .map(|&(first, last)| {
                    let start = align_up(first, align);
                    let end = align_down(last + 1, align);
                    (start, end.saturating_sub(start))
                })
                .max_by_key(|&(_, len)| len);
            let min = EPHEMERAL_MIN_SIZE / layout.sector;
            match best {
                Some((start, len)) if len >= min => {
                    let part = Part {
                        number: next_number,
                        name: PART_EPHEMERAL.into(),
                        type_guid: TYPE_GUID_VAR.into(),
                        first_lba: start,
                        last_lba: start + len - 1,
                    };
                    plan.create.push(part);
                }
                _ => {
                    return Err(Error::NoRoom {
                        name: PART_EPHEMERAL,
                        needed: EPHEMERAL_MIN_SIZE >> 20,
                        largest: best.map(|(_, len)| mib(len)).unwrap_or(0),
                    });
                }
            }
        }
        Some(eph) => {
            let limit = working
                .parts
                .iter()
                .filter(|p| p.first_lba > eph.last_lba)
                .map(|p| p.first_lba - 1)
                .min()
                .unwrap_or(working.last_usable());
            let new_last = align_down(limit + 1, align).saturating_sub(1);
            if new_last >= eph.last_lba + align {
                plan.grow = Some(Grow {
                    number: eph.number,
                    name: eph.name.clone(),
                    first_lba: eph.first_lba,
                    old_last: eph.last_lba,
                    new_last,
                });
            }
        }
    }
    Ok(plan)
}

/// What [`edit`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// The layout read before the change.
    pub before: Option<Layout>,
    /// The plan applied (empty: nothing written).
    pub plan: Plan,
}

/// Read `disk`'s logical sector size from `<sysfs>/class/block/<name>/queue/logical_block_size`
/// (512 when it cannot be read).
pub fn sector_size(sysfs: &Path, disk_name: &str) -> u64 {
    std::fs::read_to_string(
        sysfs
            .join("class/block")
            .join(disk_name)
            .join("queue/logical_block_size"),
    )
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .filter(|&n| n == 512 || n == 4096)
    .unwrap_or(512)
}

/// Read the table of `path` (a disk or an image file) into a [`Layout`].
pub fn read_layout(path: &Path, sector: u64) -> Result<Layout, Error> {
    let file = File::open(path).map_err(|source| Error::Io {
        what: "open",
        disk: path.display().to_string(),
        source,
    })?;
    Ok(open(file, path, sector)?.1)
}

fn open(mut file: File, path: &Path, sector: u64) -> Result<(gpt::GptDisk<File>, Layout), Error> {
    let disk = path.display().to_string();
    let io_err = |what| {
        let disk = disk.clone();
        move |source| Error::Io { what, disk, source }
    };
    let unsupported = |why: String| Error::Unsupported {
        disk: disk.clone(),
        why,
    };
    // The crate asserts (panics) on an entry size other than 128, and reads the backup
    // header's entries when the primary's CRC is wrong: check the primary header
    // ourselves first (its CRC too), so that the crate reads only a sound primary's
    // entries. Only a disk whose primary header is sound is edited.
    let mut header = [0u8; 92];
    file.seek(SeekFrom::Start(sector))
        .and_then(|_| file.read_exact(&mut header))
        .map_err(io_err("read"))?;
    if &header[0..8] != b"EFI PART" {
        return Err(unsupported(
            "no primary GPT header at sector 1 (is this a Keelson disk?)".into(),
        ));
    }
    let entry_size = u32::from_le_bytes([header[84], header[85], header[86], header[87]]);
    if u64::from(entry_size) != ENTRY_SIZE {
        return Err(unsupported(format!(
            "partition entries of {entry_size} bytes (only 128 is supported)"
        )));
    }
    // The crate reads every entry the header counts, 128 bytes a read.
    let entries = u32::from_le_bytes([header[80], header[81], header[82], header[83]]);
    if u64::from(entries) > ENTRIES {
        return Err(unsupported(format!(
            "{entries} partition entries (at most {ENTRIES} are supported): rewrite the table with {ENTRIES} (sgdisk --resize-table={ENTRIES})"
        )));
    }
    let disk_bytes = file.seek(SeekFrom::End(0)).map_err(io_err("size"))?;
    let lb =
        gpt::disk::LogicalBlockSize::try_from(sector).map_err(io_err("use the sector size of"))?;
    gpt::header::read_header_from_arbitrary_device(&mut file, lb).map_err(|e| {
        unsupported(format!(
            "the primary GPT header is damaged ({e}): repair it (sgdisk) before booting"
        ))
    })?;
    let table = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(lb)
        .open_from_device(file)
        .map_err(|source| Error::Gpt {
            what: "read",
            disk: disk.clone(),
            source,
        })?;
    let primary = table.primary_header().map_err(|e| {
        unsupported(format!(
            "the primary GPT header is damaged ({e}): repair it (sgdisk) before booting"
        ))
    })?;
    let parts = table
        .partitions()
        .iter()
        .filter(|(_, p)| p.is_used())
        .map(|(&number, p)| Part {
            number,
            name: p.name.clone(),
            type_guid: p.part_type_guid.guid.to_string().to_ascii_uppercase(),
            first_lba: p.first_lba,
            last_lba: p.last_lba,
        })
        .collect();
    let layout = Layout {
        sector,
        disk_sectors: disk_bytes / sector,
        first_usable: primary.first_usable,
        backup_lba: primary.backup_lba,
        parts,
    };
    Ok((table, layout))
}

/// Apply [`plan`] to the disk (or image file) at `path`, with `sector`-byte sectors.
/// Writes nothing when the table is already as it should be.
pub fn edit(path: &Path, sector: u64) -> Result<Change, Error> {
    let disk = path.display().to_string();
    let io_err = |what| {
        let disk = disk.clone();
        move |source| Error::Io { what, disk, source }
    };
    let file = crate::syscalls::open_read_write(path).map_err(io_err("open for writing"))?;
    let (mut table, layout) = open(file, path, sector)?;
    let plan = plan(&layout, &disk)?;
    if plan.is_empty() {
        return Ok(Change {
            before: Some(layout),
            plan,
        });
    }
    // The crate writes used entries packed from slot 1: a table with holes would be
    // renumbered, so only a gap-free one is edited.
    let numbers: Vec<u32> = layout.parts.iter().map(|p| p.number).collect();
    let mut sorted = numbers.clone();
    sorted.sort_unstable();
    if sorted.iter().enumerate().any(|(i, &n)| n as usize != i + 1) {
        return Err(Error::Unsupported {
            disk: disk.clone(),
            why: format!(
                "its partition entries are not numbered 1..{} without gaps ({sorted:?}); the kernel would renumber them",
                sorted.len()
            ),
        });
    }
    let mut entries: BTreeMap<u32, gpt::partition::Partition> = table.partitions().clone();
    if let Some(grow) = &plan.grow
        && let Some(entry) = entries.get_mut(&grow.number)
    {
        entry.last_lba = grow.new_last;
    }
    for part in &plan.create {
        let type_guid = uuid::Uuid::parse_str(&part.type_guid).map_err(|e| Error::Io {
            what: "parse a type GUID for",
            disk: disk.clone(),
            source: io::Error::other(e.to_string()),
        })?;
        entries.insert(
            part.number,
            gpt::partition::Partition {
                part_type_guid: gpt::partition_types::Type::from(type_guid),
                part_guid: uuid::Uuid::new_v4(),
                first_lba: part.first_lba,
                last_lba: part.last_lba,
                flags: 0,
                name: part.name.clone(),
            },
        );
    }
    let gpt_err = |source| Error::Gpt {
        what: "written",
        disk: disk.clone(),
        source,
    };
    // update_partitions places the backup header at the device's end.
    table.update_partitions(entries).map_err(gpt_err)?;
    table.write_inplace().map_err(gpt_err)?;
    let mut file = table.take_device();
    update_protective_mbr(&mut file, layout.disk_sectors)
        .map_err(io_err("update the protective MBR of"))?;
    file.sync_all().map_err(io_err("sync"))?;
    Ok(Change {
        before: Some(layout),
        plan,
    })
}

/// Make a protective MBR's one partition cover the whole disk again (`disk_sectors - 1`,
/// capped at 2^32 - 1). A hybrid or missing MBR is left alone.
fn update_protective_mbr(file: &mut File, disk_sectors: u64) -> io::Result<()> {
    let mut mbr = [0u8; 512];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut mbr)?;
    const ENTRY: usize = 446;
    if mbr[510..512] != [0x55, 0xAA] || mbr[ENTRY + 4] != 0xEE {
        return Ok(());
    }
    let size = u32::try_from(disk_sectors - 1).unwrap_or(u32::MAX);
    mbr[ENTRY + 12..ENTRY + 16].copy_from_slice(&size.to_le_bytes());
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&mbr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 2048; // sectors of 512 bytes

    fn part(number: u32, name: &str, first_mib: u64, size_mib: u64) -> Part {
        Part {
            number,
            name: name.into(),
            type_guid: TYPE_GUID_LINUX_DATA.into(),
            first_lba: first_mib * MIB,
            last_lba: (first_mib + size_mib) * MIB - 1,
        }
    }

    /// The imager's layout (sizes shrunk): EFI 1 MiB at 1, ROOT-A/B 2 MiB, STATE 4,
    /// EPHEMERAL 8; the disk ends 1 MiB after it, where the backup GPT is.
    fn image(disk_mib: u64, state: bool, ephemeral: bool) -> Layout {
        let mut parts = vec![
            part(1, "EFI", 1, 1),
            part(2, "ROOT-A", 2, 2),
            part(3, "ROOT-B", 4, 2),
        ];
        if state {
            parts.push(part(4, "STATE", 6, 100));
        }
        if ephemeral {
            parts.push(part(parts.len() as u32 + 1, "EPHEMERAL", 106, 64));
        }
        Layout {
            sector: 512,
            disk_sectors: disk_mib * MIB,
            first_usable: 34,
            backup_lba: 171 * MIB - 1,
            parts,
        }
    }

    /// CRC-32 (IEEE), as GPT headers carry it.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// A GPT header sector of a 64-sector disk at `lba`, its CRC right or not; its
    /// entries start at sector 2 (primary) or 31 (backup).
    fn header(lba: u64, entries: u32, entry_size: u32, crc_right: bool) -> Vec<u8> {
        let mut h = b"EFI PART".to_vec();
        h.extend_from_slice(&0x0001_0000u32.to_le_bytes());
        h.extend_from_slice(&92u32.to_le_bytes());
        h.extend_from_slice(&[0; 8]); // CRC, reserved
        for n in [lba, 64 - lba, 34, 30, if lba == 1 { 2 } else { 31 }] {
            h.extend_from_slice(&n.to_le_bytes());
        }
        // The disk GUID (after first/last usable) goes before the entries' start.
        h.splice(56..56, [7u8; 16]);
        // The entries' CRC: those of a 4-entry table, all empty (zeros).
        for n in [entries, entry_size, crc32(&[0; 4 * 128])] {
            h.extend_from_slice(&n.to_le_bytes());
        }
        assert_eq!(h.len(), 92);
        let crc = crc32(&h) ^ u32::from(!crc_right);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h.resize(512, 0);
        h
    }

    /// A 64-sector disk image with these primary and backup header sectors.
    fn disk(primary: &[u8], backup: &[u8]) -> tempfile::NamedTempFile {
        let mut image = vec![0u8; 64 * 512];
        image[512..1024].copy_from_slice(primary);
        image[63 * 512..].copy_from_slice(backup);
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&image).unwrap();
        file
    }

    #[test]
    fn a_damaged_primary_header_is_refused_before_the_backup_is_read() {
        // Found by the fuzz target gpt_table: the gpt crate fell back to a sound backup
        // header and asserted (panicked) on its entry size of 256.
        let image = disk(&header(1, 4, 128, false), &header(63, 4, 256, true));
        let err = read_layout(image.path(), 512).unwrap_err().to_string();
        assert!(err.contains("the primary GPT header is damaged"), "{err}");
        let image = disk(&header(1, 4, 128, true), &header(63, 4, 256, true));
        let read = read_layout(image.path(), 512);
        assert!(read.is_ok(), "{read:?}");
    }

    #[test]
    fn a_table_of_more_entries_than_written_is_refused() {
        let image = disk(&header(1, 1 << 20, 128, true), &[0; 512]);
        let err = read_layout(image.path(), 512).unwrap_err().to_string();
        assert!(err.contains("1048576 partition entries"), "{err}");
    }

    fn check(layout: Layout, expected: Result<Plan, &str>) {
        let got = plan(&layout, "/dev/vda").map_err(|e| e.to_string());
        assert_eq!(got, expected.map_err(str::to_string));
    }

    #[test]
    fn a_disk_of_the_image_size_needs_nothing() {
        check(image(171, true, true), Ok(Plan::default()));
    }

    #[test]
    fn a_larger_disk_moves_the_backup_and_grows_ephemeral_to_the_last_whole_mib() {
        check(
            image(3072, true, true),
            Ok(Plan {
                relocate_backup: true,
                create: vec![],
                grow: Some(Grow {
                    number: 5,
                    name: "EPHEMERAL".into(),
                    first_lba: 106 * MIB,
                    old_last: 170 * MIB - 1,
                    // The backup GPT takes the last 33 sectors: the last whole MiB before
                    // them ends one MiB before the disk's end.
                    new_last: 3071 * MIB - 1,
                }),
            }),
        );
        // A few sectors more: the backup moves, and EPHEMERAL takes the spare MiB the
        // imager left before the old backup, no less and no more.
        let mut l = image(171, true, true);
        l.disk_sectors += 100;
        let p = plan(&l, "d");
        assert_eq!(p.as_ref().ok().map(|p| p.relocate_backup), Some(true));
        assert_eq!(
            p.ok().and_then(|p| p.grow).map(|g| g.new_last),
            Some(171 * MIB - 1)
        );
        // Less than a whole MiB more is not worth a change.
        let mut l = image(171, true, true);
        l.parts[4].last_lba -= 100;
        check(l, Ok(Plan::default()));
    }

    #[test]
    fn ephemeral_grows_only_up_to_the_next_partition() {
        let mut l = image(3072, true, true);
        l.parts.push(Part {
            type_guid: "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F".into(),
            ..part(6, "swap", 2048, 64)
        });
        let grow = plan(&l, "d").ok().and_then(|p| p.grow);
        assert_eq!(grow.map(|g| g.new_last), Some(2048 * MIB - 1));
    }

    #[test]
    fn missing_partitions_are_created_state_first() {
        check(
            image(1024, false, false),
            Ok(Plan {
                relocate_backup: true,
                create: vec![
                    Part {
                        number: 4,
                        name: "STATE".into(),
                        type_guid: TYPE_GUID_LINUX_DATA.into(),
                        first_lba: 6 * MIB,
                        last_lba: 106 * MIB - 1,
                    },
                    Part {
                        number: 5,
                        name: "EPHEMERAL".into(),
                        type_guid: TYPE_GUID_VAR.into(),
                        first_lba: 106 * MIB,
                        last_lba: 1023 * MIB - 1,
                    },
                ],
                grow: None,
            }),
        );
        // STATE missing, EPHEMERAL present: STATE goes into the first hole that holds it
        // (here the 100 MiB left where the imager puts it), and EPHEMERAL still grows.
        let l = image(1024, false, true);
        let p = plan(&l, "d");
        let created: Vec<(String, u32, u64)> = p
            .iter()
            .flat_map(|p| {
                p.create
                    .iter()
                    .map(|c| (c.name.clone(), c.number, c.first_lba / MIB))
            })
            .collect();
        assert_eq!(created, [("STATE".to_string(), 5, 6)]);
        assert_eq!(
            p.ok().and_then(|p| p.grow).map(|g| g.new_last),
            Some(1023 * MIB - 1)
        );
        // Without such a hole it goes after EPHEMERAL, which then grows only up to it.
        let mut l = image(1024, false, true);
        l.parts[3].first_lba = 8 * MIB;
        let p = plan(&l, "d");
        let state = p
            .as_ref()
            .ok()
            .and_then(|p| p.create.first())
            .map(|c| c.first_lba / MIB);
        assert_eq!(state, Some(170));
        assert_eq!(p.ok().and_then(|p| p.grow), None);
    }

    #[test]
    fn impossible_tables_are_refused() {
        check(
            image(150, true, true),
            Err(
                "refusing to edit the GPT of /dev/vda: partition 5 (EPHEMERAL) ends at sector \
                 348159, beyond the disk's last usable sector 307166: the disk is smaller than \
                 the image written to it",
            ),
        );
        check(
            image(120, true, false),
            Err(
                "no room on the disk for EPHEMERAL (64 MiB needed, 13 MiB free in one piece): use a larger disk",
            ),
        );
        check(
            image(50, false, false),
            Err(
                "no room on the disk for STATE (100 MiB needed, 43 MiB free in one piece): use a larger disk",
            ),
        );
        // A header's first usable sector is read from the disk: no overflow.
        let mut far = image(171, true, true);
        far.first_usable = u64::MAX;
        check(
            far,
            Err(
                "refusing to edit the GPT of /dev/vda: the disk has 350208 sectors, too few for a GPT",
            ),
        );
    }

    #[test]
    fn four_k_sectors_align_to_256_sectors() {
        let l = Layout {
            sector: 4096,
            disk_sectors: 1 << 20, // 4 GiB
            first_usable: 6,
            backup_lba: 1000,
            parts: vec![
                Part {
                    number: 1,
                    name: "STATE".into(),
                    type_guid: TYPE_GUID_LINUX_DATA.into(),
                    first_lba: 256,
                    last_lba: 256 + 25600 - 1,
                },
                Part {
                    number: 2,
                    name: "EPHEMERAL".into(),
                    type_guid: TYPE_GUID_VAR.into(),
                    first_lba: 256 + 25600,
                    last_lba: 256 + 25600 + 255,
                },
            ],
        };
        assert_eq!(l.entry_sectors(), 4);
        assert_eq!(l.last_usable(), (1 << 20) - 6);
        let grow = plan(&l, "d").ok().and_then(|p| p.grow);
        assert_eq!(grow.map(|g| g.new_last), Some((1 << 20) - 256 - 1));
    }
}
