//! The EFI system partition: a FAT32 image written with the `fatfs` crate (no mounts, no
//! `mkfs.vfat`), holding systemd-boot, `loader/loader.conf`, one Boot Loader
//! Specification entry per slot, and each slot's kernel and initramfs under
//! `keelson/<slot>/`.
//!
//! Reproducible: the volume id is fixed, the label is `EFI`, files are written in path
//! order, and every timestamp comes from a fixed clock (the build's `SOURCE_DATE_EPOCH`
//! through fatfs's `TimeProvider`, which wants a `'static` reference, so each image
//! leaks one 8-byte clock).
//!
//! fatfs 0.3 (the current release) writes long-file-name entries in front of the `.` and
//! `..` entries of every directory it creates, which `fsck.vfat` rejects, and leaves the
//! FSInfo free-cluster count unset. [`Esp::write_to`] repairs both after unmounting
//! (see [`fix_fat32`]): the result passes `fsck.vfat -n`.
//!
//! Also reads files back (for `imager inspect`), through a read-only wrapper so that
//! inspecting an image never writes to it.

use std::collections::BTreeMap;
use std::io::{self, Cursor, Read, Seek, SeekFrom, Write};
use std::path::Path;

use fatfs::{
    Date, DateTime, FatType, FileSystem, FormatVolumeOptions, FsOptions, Time, TimeProvider,
};
use keelson_configs::layout::{Arch, Slot};

/// The ESP's volume label.
pub const LABEL: &[u8; 11] = b"EFI        ";
/// The ESP's (fixed) volume id.
pub const VOLUME_ID: u32 = 0x4B45_4C53; // "KELS"
/// Smallest ESP we format: FAT32 needs 65525 clusters (of 512 bytes at least) plus FATs.
pub const MIN_SIZE: u64 = 34 * 1024 * 1024;
/// Directory of the loader entries.
pub const ENTRIES_DIR: &str = "loader/entries";

/// Errors from writing or reading the ESP.
#[derive(Debug, thiserror::Error)]
pub enum EspError {
    /// Formatting the FAT32 filesystem failed.
    #[error(
        "cannot format a {size}-byte FAT32 ESP: FAT32 needs at least 34 MiB; raise the EFI partition size"
    )]
    Format {
        /// Requested size.
        size: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Writing a file into the ESP failed.
    #[error("cannot write {path} into the ESP: is the EFI partition large enough?")]
    Write {
        /// Path inside the ESP.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The image file could not be created or sized.
    #[error("cannot create the ESP image {path}")]
    Create {
        /// The image file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Opening the FAT filesystem failed.
    #[error("cannot open the ESP: is this a FAT filesystem?")]
    Open(#[source] io::Error),
    /// Reading a file or directory out of the ESP failed.
    #[error("cannot read {path} from the ESP")]
    Read {
        /// Path inside the ESP.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A fixed clock for fatfs.
#[derive(Debug)]
struct FixedClock(DateTime);

impl TimeProvider for FixedClock {
    fn get_current_date(&self) -> Date {
        self.0.date
    }

    fn get_current_date_time(&self) -> DateTime {
        self.0
    }
}

/// A Unix time as a FAT date and time (UTC), clamped to FAT's 1980..=2107 range.
pub fn fat_datetime(epoch: u64) -> DateTime {
    const MIN: u64 = 315_532_800; // 1980-01-01
    const MAX: u64 = 4_354_819_199; // 2107-12-31 23:59:59
    let t = epoch.clamp(MIN, MAX);
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    let (year, month, day) = keelson_node_protocol::clock::civil_from_days(days);
    DateTime {
        date: Date {
            year: year as u16,
            month: month as u16,
            day: day as u16,
        },
        time: Time {
            hour: (secs / 3600) as u16,
            min: (secs / 60 % 60) as u16,
            sec: (secs % 60) as u16,
            millis: 0,
        },
    }
}

pub use keelson_configs::boot::{BootEntry, slot_initrd_path, slot_kernel_path};

/// systemd-boot's `loader/loader.conf` (the default: no menu, no editor, newest entry).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoaderConf {
    /// Menu timeout in seconds (0: boot the default at once).
    pub timeout: u32,
    /// `default` entry pattern (e.g. `keelson-*`); `None` lets systemd-boot pick the
    /// newest entry with tries left.
    pub default: Option<String>,
    /// Whether the kernel command line may be edited at the menu.
    pub editor: bool,
}

impl LoaderConf {
    /// The file's text.
    pub fn render(&self) -> String {
        let mut out = format!("timeout {}\n", self.timeout);
        if let Some(d) = &self.default {
            out.push_str(&format!("default {d}\n"));
        }
        out.push_str(if self.editor {
            "editor yes\n"
        } else {
            "editor no\n"
        });
        out
    }
}

/// The files of an ESP, to be written into a FAT32 image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Esp {
    files: BTreeMap<String, Vec<u8>>,
}

impl Esp {
    /// An empty ESP.
    pub fn new() -> Esp {
        Esp::default()
    }

    /// Add (or replace) a file; `path` is `/`-separated, leading `/` optional.
    pub fn add_file(&mut self, path: &str, data: impl Into<Vec<u8>>) {
        self.files
            .insert(path.trim_start_matches('/').to_string(), data.into());
    }

    /// Add systemd-boot at the firmware's default removable-media path.
    pub fn add_bootloader(&mut self, arch: Arch, efi_binary: impl Into<Vec<u8>>) {
        self.add_file(arch.efi_default_boot_path(), efi_binary);
    }

    /// Add a slot's kernel and initramfs under `keelson/<slot>/`.
    pub fn add_slot(&mut self, slot: Slot, kernel: impl Into<Vec<u8>>, initrd: impl Into<Vec<u8>>) {
        self.add_file(&slot_kernel_path(slot), kernel);
        self.add_file(&slot_initrd_path(slot), initrd);
    }

    /// Add `loader/loader.conf`.
    pub fn add_loader_conf(&mut self, conf: &LoaderConf) {
        self.add_file("loader/loader.conf", conf.render());
    }

    /// Add `loader/entries/<file_name>` (see `layout::loader_entry_name`).
    pub fn add_entry(&mut self, file_name: &str, entry: &BootEntry) {
        self.add_file(&format!("{ENTRIES_DIR}/{file_name}"), entry.render());
    }

    /// The files, by path.
    pub fn files(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.files
    }

    /// Format `disk` (which must be `size` bytes) as FAT32 and write the files, every
    /// timestamp set to `epoch`.
    pub fn write_to<T: Read + Write + Seek>(
        &self,
        disk: T,
        size: u64,
        epoch: u64,
    ) -> Result<(), EspError> {
        if size < MIN_SIZE {
            return Err(EspError::Format {
                size,
                source: io::Error::new(io::ErrorKind::InvalidInput, "too small for FAT32"),
            });
        }
        let total_sectors = u32::try_from(size / 512).map_err(|_| EspError::Format {
            size,
            source: io::Error::new(io::ErrorKind::InvalidInput, "too large for FAT32"),
        })?;
        let options = FormatVolumeOptions::new()
            .fat_type(FatType::Fat32)
            .bytes_per_sector(512)
            .total_sectors(total_sectors)
            .volume_id(VOLUME_ID)
            .volume_label(*LABEL);
        let mut disk = disk;
        fatfs::format_volume(&mut disk, options)
            .map_err(|source| EspError::Format { size, source })?;
        disk.seek(SeekFrom::Start(0))
            .map_err(|source| EspError::Format { size, source })?;
        let clock: &'static FixedClock = Box::leak(Box::new(FixedClock(fat_datetime(epoch))));
        let fs = FileSystem::new(&mut disk, FsOptions::new().time_provider(clock))
            .map_err(EspError::Open)?;
        {
            let root = fs.root_dir();
            for (path, data) in &self.files {
                let werr = |source| EspError::Write {
                    path: path.clone(),
                    source,
                };
                let parts: Vec<&str> = path.split('/').collect();
                let mut dir_path = String::new();
                for part in &parts[..parts.len() - 1] {
                    if !dir_path.is_empty() {
                        dir_path.push('/');
                    }
                    dir_path.push_str(part);
                    if root.open_dir(&dir_path).is_err() {
                        root.create_dir(&dir_path).map_err(werr)?;
                    }
                }
                let mut file = root.create_file(path).map_err(werr)?;
                file.truncate().map_err(werr)?;
                file.write_all(data).map_err(werr)?;
                file.flush().map_err(werr)?;
            }
        }
        fs.unmount().map_err(|source| EspError::Write {
            path: "/".to_string(),
            source,
        })?;
        fix_fat32(&mut disk).map_err(|source| EspError::Write {
            path: "/".to_string(),
            source,
        })
    }

    /// The ESP as a `size`-byte image in memory.
    pub fn to_vec(&self, size: u64, epoch: u64) -> Result<Vec<u8>, EspError> {
        let mut disk = Cursor::new(vec![0u8; size as usize]);
        self.write_to(&mut disk, size, epoch)?;
        Ok(disk.into_inner())
    }

    /// The ESP as a `size`-byte (sparse) image file.
    pub fn write_file(&self, path: &Path, size: u64, epoch: u64) -> Result<(), EspError> {
        let cerr = |source| EspError::Create {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(cerr)?;
        file.set_len(size).map_err(cerr)?;
        self.write_to(file, size, epoch)
    }
}

/// Little-endian integer readers over a byte slice.
fn le16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

fn read_exact_at<T: Read + Seek>(disk: &mut T, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    disk.seek(SeekFrom::Start(offset))?;
    disk.read_exact(&mut buf)?;
    Ok(buf)
}

/// Repair what fatfs 0.3 gets wrong on a FAT32 volume it wrote: in every directory, drop
/// the long-name entries written before `.` and `..` (moving `.` and `..` to the first
/// two slots, as FAT requires, and marking the two freed slots deleted), and fill in the
/// FSInfo free-cluster count and next-free hint.
pub fn fix_fat32<T: Read + Write + Seek>(disk: &mut T) -> io::Result<()> {
    const ENTRY: usize = 32;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let bpb = read_exact_at(disk, 0, 512)?;
    let bytes_per_sector = le16(&bpb, 11);
    let sectors_per_cluster = u64::from(bpb[13]);
    let reserved = le16(&bpb, 14);
    let fats = u64::from(bpb[16]);
    let total_sectors = le32(&bpb, 32);
    let sectors_per_fat = le32(&bpb, 36);
    let root_cluster = le32(&bpb, 44);
    let fsinfo_sector = le16(&bpb, 48);
    if bytes_per_sector == 0 || sectors_per_cluster == 0 || sectors_per_fat == 0 {
        return Err(bad("not a FAT32 boot sector"));
    }
    let cluster_bytes = bytes_per_sector * sectors_per_cluster;
    let data_start = (reserved + fats * sectors_per_fat) * bytes_per_sector;
    let clusters = total_sectors
        .checked_sub(data_start / bytes_per_sector)
        .ok_or_else(|| bad("FAT larger than the volume"))?
        / sectors_per_cluster;
    let fat = read_exact_at(
        disk,
        reserved * bytes_per_sector,
        (sectors_per_fat * bytes_per_sector) as usize,
    )?;
    let next = |c: u64| le32(&fat, (c * 4) as usize) & 0x0FFF_FFFF;
    let cluster_offset = |c: u64| data_start + (c - 2) * cluster_bytes;

    // (first cluster, is the root, parent is the root)
    let mut stack = vec![(root_cluster, true, false)];
    let mut seen = 0;
    while let Some((first, is_root, parent_is_root)) = stack.pop() {
        seen += 1;
        if seen > 100_000 {
            return Err(bad("directory loop"));
        }
        // Read the directory's cluster chain.
        let mut chain = vec![first];
        while let Some(&c) = chain.last() {
            let n = next(c);
            if !(2..0x0FFF_FFF7).contains(&n) || chain.len() > 65_536 {
                break;
            }
            chain.push(n);
        }
        let mut data = Vec::new();
        for &c in &chain {
            data.extend(read_exact_at(
                disk,
                cluster_offset(c),
                cluster_bytes as usize,
            )?);
        }
        for entry in data.chunks_exact(ENTRY) {
            if entry[0] == 0 {
                break;
            }
            let attr = entry[11];
            if entry[0] == 0xE5 || attr == 0x0F || attr & 0x08 != 0 || &entry[0..1] == b"." {
                continue;
            }
            let cluster = (le16(entry, 20) << 16) | le16(entry, 26);
            if attr & 0x10 != 0 && cluster >= 2 {
                stack.push((cluster, false, is_root));
            }
        }
        let slot = |i: usize| &data[i * ENTRY..(i + 1) * ENTRY];
        if !is_root
            && data.len() >= 4 * ENTRY
            && slot(0)[11] == 0x0F
            && &slot(1)[0..11] == b".          "
            && slot(2)[11] == 0x0F
            && &slot(3)[0..11] == b"..         "
        {
            let mut fixed = Vec::with_capacity(4 * ENTRY);
            fixed.extend_from_slice(slot(1));
            fixed.extend_from_slice(slot(3));
            if parent_is_root {
                // `..` of a top-level directory points at cluster 0, not the root's.
                fixed[ENTRY + 20..ENTRY + 22].fill(0);
                fixed[ENTRY + 26..ENTRY + 28].fill(0);
            }
            let mut deleted = [0u8; ENTRY];
            deleted[0] = 0xE5;
            fixed.extend_from_slice(&deleted);
            fixed.extend_from_slice(&deleted);
            disk.seek(SeekFrom::Start(cluster_offset(first)))?;
            disk.write_all(&fixed)?;
        }
    }

    // FSInfo: free cluster count and the first free cluster.
    let free: Vec<u64> = (2..clusters + 2).filter(|&c| next(c) == 0).collect();
    let fsinfo_at = fsinfo_sector * bytes_per_sector;
    let mut fsinfo = read_exact_at(disk, fsinfo_at, 512)?;
    if le32(&fsinfo, 0) == 0x4161_5252 && le32(&fsinfo, 484) == 0x6141_7272 {
        fsinfo[488..492].copy_from_slice(&(free.len() as u32).to_le_bytes());
        let hint = free.first().copied().unwrap_or(0xFFFF_FFFF) as u32;
        fsinfo[492..496].copy_from_slice(&hint.to_le_bytes());
        disk.seek(SeekFrom::Start(fsinfo_at))?;
        disk.write_all(&fsinfo)?;
    }
    disk.flush()
}

/// Makes a reader usable where fatfs wants read-write access; any write fails, so
/// inspecting an image can never change it.
#[derive(Debug)]
pub struct ReadOnly<R>(pub R);

impl<R: Read> Read for ReadOnly<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: Seek> Seek for ReadOnly<R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.0.seek(to)
    }
}

impl<R> Write for ReadOnly<R> {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the ESP is opened read-only",
        ))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An ESP opened for reading.
pub struct EspReader<R: Read + Seek> {
    fs: FileSystem<ReadOnly<R>>,
}

impl<R: Read + Seek> std::fmt::Debug for EspReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EspReader")
            .field("label", &self.fs.volume_label())
            .finish()
    }
}

impl<R: Read + Seek> EspReader<R> {
    /// Open the FAT filesystem in `disk` (a partition window or an ESP image).
    pub fn open(disk: R) -> Result<Self, EspError> {
        let fs = FileSystem::new(ReadOnly(disk), FsOptions::new()).map_err(EspError::Open)?;
        Ok(EspReader { fs })
    }

    /// The volume label.
    pub fn label(&self) -> String {
        self.fs.volume_label()
    }

    /// Read the file at `path`.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>, EspError> {
        let path = path.trim_start_matches('/');
        let rerr = |source| EspError::Read {
            path: path.to_string(),
            source,
        };
        let mut file = self.fs.root_dir().open_file(path).map_err(rerr)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(rerr)?;
        Ok(data)
    }

    /// The names of the entries of directory `path` (without `.` and `..`), sorted.
    pub fn list_dir(&self, path: &str) -> Result<Vec<String>, EspError> {
        let path = path.trim_start_matches('/');
        let rerr = |source| EspError::Read {
            path: path.to_string(),
            source,
        };
        let root = self.fs.root_dir();
        let dir = if path.is_empty() {
            root
        } else {
            root.open_dir(path).map_err(rerr)?
        };
        let mut names = Vec::new();
        for entry in dir.iter() {
            let name = entry.map_err(rerr)?.file_name();
            if name != "." && name != ".." {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Every loader entry: `(file name, parsed entry)`, sorted by file name.
    pub fn entries(&self) -> Result<Vec<(String, BootEntry)>, EspError> {
        let mut out = Vec::new();
        for name in self.list_dir(ENTRIES_DIR)? {
            if name.ends_with(".conf") {
                let text = self.read_file(&format!("{ENTRIES_DIR}/{name}"))?;
                out.push((name, BootEntry::parse(&String::from_utf8_lossy(&text))));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fat_dates_from_unix_time() {
        let dt = fat_datetime(1_700_000_000); // 2023-11-14 22:13:20 UTC
        assert_eq!((dt.date.year, dt.date.month, dt.date.day), (2023, 11, 14));
        assert_eq!((dt.time.hour, dt.time.min, dt.time.sec), (22, 13, 20));
        let early = fat_datetime(0);
        assert_eq!(
            (early.date.year, early.date.month, early.date.day),
            (1980, 1, 1)
        );
        let leap = fat_datetime(951_782_400); // 2000-02-29
        assert_eq!((leap.date.month, leap.date.day), (2, 29));
    }

    #[test]
    fn boot_entry_round_trips() {
        let entry = BootEntry {
            title: "Keelson 0.1.0 (slot A)".into(),
            version: Some("0.1.0".into()),
            sort_key: Some("keelson".into()),
            linux: slot_kernel_path(Slot::A),
            initrd: vec![slot_initrd_path(Slot::A)],
            options: "console=ttyS0 keelson.slot=a".into(),
        };
        let text = entry.render();
        assert_eq!(
            text,
            "title Keelson 0.1.0 (slot A)\nversion 0.1.0\nsort-key keelson\n\
             linux /keelson/a/vmlinuz\ninitrd /keelson/a/initrd\n\
             options console=ttyS0 keelson.slot=a\n"
        );
        assert_eq!(BootEntry::parse(&text), entry);
        assert_eq!(LoaderConf::default().render(), "timeout 0\neditor no\n");
    }
}
