//! The whole disk image: protective MBR, primary and backup GPT, and the partitions'
//! content, written sparse; and a GPT reader for `imager inspect`.
//!
//! Written by hand rather than with the `gpt` crate: that crate picks random partition
//! GUIDs when adding partitions and writes through a device handle, while a reproducible
//! image needs every GUID derived from a seed (we hash the caller's seed with the
//! partition name), partition content streamed in without materialising zero regions, and
//! a reader that works on a byte window. The format itself is small: a 92-byte header
//! with two CRC32s, 128 entries of 128 bytes, a copy of both at the end of the disk.
//!
//! Sectors are 512 bytes; partitions start at 1 MiB and are 1 MiB aligned and sized; the
//! disk ends 1 MiB after the last partition (room for the 33-sector backup GPT). The image
//! is written to `<path>.partial` and renamed into place when complete, so a failed build
//! leaves nothing under the real name.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use keelson_configs::layout::PARTITION_ALIGN;
use sha2::{Digest, Sha256};

/// Logical sector size.
pub const SECTOR: u64 = 512;
/// Number of partition entries in each table (the standard minimum).
const ENTRIES: u32 = 128;
/// Size of one partition entry.
const ENTRY_SIZE: u32 = 128;
/// Sectors taken by one partition entry array.
const ENTRY_SECTORS: u64 = (ENTRIES as u64 * ENTRY_SIZE as u64) / SECTOR;
/// Chunk size for copying content (zero chunks are skipped to keep the image sparse).
const CHUNK: usize = 1 << 20;

/// Errors from writing or reading a GPT disk image.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    /// A GUID string is malformed.
    #[error("invalid GUID {0:?}: expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx")]
    BadGuid(String),
    /// A partition name is too long for the 36 UTF-16 units GPT has.
    #[error("partition name {0:?} is longer than 36 UTF-16 code units")]
    NameTooLong(String),
    /// Too many partitions.
    #[error("{0} partitions requested; the table holds 128")]
    TooManyPartitions(usize),
    /// The content is larger than the partition.
    #[error(
        "partition {name}: content is {content} bytes but the partition is {size}; raise its size in the image definition"
    )]
    ContentTooLarge {
        /// The partition.
        name: String,
        /// Content size.
        content: u64,
        /// Partition size.
        size: u64,
    },
    /// The requested disk size cannot hold the partitions.
    #[error("disk size {requested} bytes is too small: the partitions need {needed}")]
    DiskTooSmall {
        /// What was asked for.
        requested: u64,
        /// What is needed.
        needed: u64,
    },
    /// Reading a content file failed.
    #[error("cannot read {path} for partition {name}")]
    ReadContent {
        /// The partition.
        name: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Writing the image failed.
    #[error("cannot write disk image {path}: check free space and permissions")]
    Write {
        /// The file written.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading the image failed.
    #[error("cannot read the disk image")]
    Read(#[source] io::Error),
    /// Neither GPT header is valid.
    #[error("no valid GPT found ({0}): is this a disk image?")]
    NoGpt(String),
    /// No partition of that name.
    #[error("the disk image has no partition named {name:?} (it has: {available})")]
    NoSuchPartition {
        /// The name asked for.
        name: String,
        /// The names present.
        available: String,
    },
}

/// A GUID, stored in its text order (as printed), converted to GPT's mixed-endian
/// layout on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// Parse `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (either case).
    pub fn parse(text: &str) -> Result<Guid, GptError> {
        let bad = || GptError::BadGuid(text.to_string());
        let groups: Vec<&str> = text.split('-').collect();
        let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        if lens != [8, 4, 4, 4, 12] {
            return Err(bad());
        }
        let bytes = hex::decode(groups.concat()).map_err(|_| bad())?;
        let mut out = [0u8; 16];
        out.copy_from_slice(&bytes);
        Ok(Guid(out))
    }

    /// A version-4-shaped GUID derived from `parts` (reproducible, unique per input).
    pub fn derive(parts: &[&[u8]]) -> Guid {
        let mut h = Sha256::new();
        h.update(b"keelson gpt guid v1");
        for part in parts {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        let digest = h.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest[..16]);
        out[6] = (out[6] & 0x0f) | 0x40;
        out[8] = (out[8] & 0x3f) | 0x80;
        Guid(out)
    }

    /// GPT's on-disk byte order: the first three fields little-endian.
    pub fn to_disk(self) -> [u8; 16] {
        let mut b = self.0;
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        b
    }

    /// From GPT's on-disk byte order.
    pub fn from_disk(bytes: &[u8]) -> Guid {
        let mut b = [0u8; 16];
        b.copy_from_slice(&bytes[..16]);
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        Guid(b)
    }
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = hex::encode_upper(self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

/// What goes into a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Nothing: the partition reads as zeros (and costs no disk space).
    Zero,
    /// These bytes, at the start of the partition.
    Bytes(Vec<u8>),
    /// The content of this file, at the start of the partition.
    File(PathBuf),
}

/// One partition to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionSpec {
    /// GPT partition name (`EFI`, `ROOT-A`, ...).
    pub name: String,
    /// Partition type GUID.
    pub type_guid: Guid,
    /// Size in bytes (rounded up to 1 MiB).
    pub size: u64,
    /// GPT attribute bits.
    pub attributes: u64,
    /// Content.
    pub content: Content,
}

/// The disk to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Seed for the disk and partition GUIDs (e.g. the image name and version).
    pub seed: Vec<u8>,
    /// Partitions, in table and disk order.
    pub partitions: Vec<PartitionSpec>,
    /// Total disk size; `None` for the smallest that fits.
    pub disk_size: Option<u64>,
}

/// A partition as laid out in (or read from) a GPT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptPartition {
    /// 1-based entry number (`/dev/vdaN`).
    pub number: u32,
    /// Partition name.
    pub name: String,
    /// Type GUID.
    pub type_guid: Guid,
    /// Unique partition GUID.
    pub guid: Guid,
    /// First sector.
    pub first_lba: u64,
    /// Last sector (inclusive).
    pub last_lba: u64,
    /// Attribute bits.
    pub attributes: u64,
}

impl GptPartition {
    /// Byte offset of the partition.
    pub fn start(&self) -> u64 {
        self.first_lba * SECTOR
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR
    }
}

/// A GPT read from a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpt {
    /// Disk GUID.
    pub disk_guid: Guid,
    /// Disk size in bytes as the header describes it (backup header LBA + 1 sectors).
    pub disk_size: u64,
    /// Non-empty partitions, in table order.
    pub partitions: Vec<GptPartition>,
}

impl Gpt {
    /// The partition called `name`.
    pub fn partition(&self, name: &str) -> Result<&GptPartition, GptError> {
        self.partitions
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| GptError::NoSuchPartition {
                name: name.to_string(),
                available: self
                    .partitions
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

fn align_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

fn encode_name(name: &str) -> Result<[u8; 72], GptError> {
    let units: Vec<u16> = name.encode_utf16().collect();
    if units.len() > 36 {
        return Err(GptError::NameTooLong(name.to_string()));
    }
    let mut out = [0u8; 72];
    for (i, u) in units.iter().enumerate() {
        out[i * 2..i * 2 + 2].copy_from_slice(&u.to_le_bytes());
    }
    Ok(out)
}

fn decode_name(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// Lay out `spec` without writing: the partitions with their sectors and GUIDs, the disk
/// GUID and the disk size.
pub fn layout(spec: &DiskSpec) -> Result<Gpt, GptError> {
    if spec.partitions.len() > ENTRIES as usize {
        return Err(GptError::TooManyPartitions(spec.partitions.len()));
    }
    let mut next = PARTITION_ALIGN;
    let mut partitions = Vec::new();
    for (i, p) in spec.partitions.iter().enumerate() {
        encode_name(&p.name)?;
        let size = align_up(p.size.max(1), PARTITION_ALIGN);
        partitions.push(GptPartition {
            number: i as u32 + 1,
            name: p.name.clone(),
            type_guid: p.type_guid,
            guid: Guid::derive(&[&spec.seed, b"partition", p.name.as_bytes()]),
            first_lba: next / SECTOR,
            last_lba: (next + size) / SECTOR - 1,
            attributes: p.attributes,
        });
        next += size;
    }
    let needed = next + PARTITION_ALIGN;
    let disk_size = match spec.disk_size {
        Some(requested) if requested < needed => {
            return Err(GptError::DiskTooSmall { requested, needed });
        }
        Some(requested) => align_up(requested, SECTOR),
        None => needed,
    };
    Ok(Gpt {
        disk_guid: Guid::derive(&[&spec.seed, b"disk"]),
        disk_size,
        partitions,
    })
}

/// The partition entry array.
fn entries(gpt: &Gpt) -> Result<Vec<u8>, GptError> {
    let mut out = vec![0u8; (ENTRIES * ENTRY_SIZE) as usize];
    for p in &gpt.partitions {
        let at = (p.number as usize - 1) * ENTRY_SIZE as usize;
        let e = &mut out[at..at + ENTRY_SIZE as usize];
        e[0..16].copy_from_slice(&p.type_guid.to_disk());
        e[16..32].copy_from_slice(&p.guid.to_disk());
        e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
        e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
        e[48..56].copy_from_slice(&p.attributes.to_le_bytes());
        e[56..128].copy_from_slice(&encode_name(&p.name)?);
    }
    Ok(out)
}

/// One GPT header sector.
fn header(
    gpt: &Gpt,
    my_lba: u64,
    alternate_lba: u64,
    entries_lba: u64,
    entries_crc: u32,
) -> Vec<u8> {
    let last_lba = gpt.disk_size / SECTOR - 1;
    let mut h = vec![0u8; SECTOR as usize];
    h[0..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&my_lba.to_le_bytes());
    h[32..40].copy_from_slice(&alternate_lba.to_le_bytes());
    h[40..48].copy_from_slice(&(2 + ENTRY_SECTORS).to_le_bytes()); // first usable
    h[48..56].copy_from_slice(&(last_lba - 1 - ENTRY_SECTORS).to_le_bytes()); // last usable
    h[56..72].copy_from_slice(&gpt.disk_guid.to_disk());
    h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
    h[80..84].copy_from_slice(&ENTRIES.to_le_bytes());
    h[84..88].copy_from_slice(&ENTRY_SIZE.to_le_bytes());
    h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
    let crc = crc32fast::hash(&h[..92]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The protective MBR: one partition of type 0xEE covering the disk.
fn protective_mbr(disk_size: u64) -> Vec<u8> {
    let mut m = vec![0u8; SECTOR as usize];
    let sectors = (disk_size / SECTOR - 1).min(u64::from(u32::MAX)) as u32;
    let e = &mut m[446..462];
    e[0] = 0x00; // not bootable
    e[1..4].copy_from_slice(&[0x00, 0x02, 0x00]); // CHS of LBA 1
    e[4] = 0xEE;
    e[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
    e[8..12].copy_from_slice(&1u32.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    m[510] = 0x55;
    m[511] = 0xAA;
    m
}

/// Write `data` at `offset`, skipping all-zero chunks so that the file stays sparse.
fn write_sparse(out: &mut File, offset: u64, data: &[u8]) -> io::Result<()> {
    for (i, chunk) in data.chunks(CHUNK).enumerate() {
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        out.seek(SeekFrom::Start(offset + (i * CHUNK) as u64))?;
        out.write_all(chunk)?;
    }
    Ok(())
}

/// Write the disk described by `spec` to `path` (via `<path>.partial` and a rename).
/// Returns the layout written.
pub fn write_disk(path: &Path, spec: &DiskSpec) -> Result<Gpt, GptError> {
    let gpt = layout(spec)?;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".partial");
    let tmp = PathBuf::from(tmp_name);
    let result = write_all(&tmp, spec, &gpt);
    match result {
        Ok(()) => fs::rename(&tmp, path).map_err(|source| GptError::Write {
            path: path.to_path_buf(),
            source,
        })?,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    }
    Ok(gpt)
}

fn write_all(tmp: &Path, spec: &DiskSpec, gpt: &Gpt) -> Result<(), GptError> {
    let werr = |source| GptError::Write {
        path: tmp.to_path_buf(),
        source,
    };
    // Check every content size before writing anything.
    for (p, laid) in spec.partitions.iter().zip(&gpt.partitions) {
        let content = match &p.content {
            Content::Zero => 0,
            Content::Bytes(b) => b.len() as u64,
            Content::File(f) => fs::metadata(f)
                .map_err(|source| GptError::ReadContent {
                    name: p.name.clone(),
                    path: f.clone(),
                    source,
                })?
                .len(),
        };
        if content > laid.size() {
            return Err(GptError::ContentTooLarge {
                name: p.name.clone(),
                content,
                size: laid.size(),
            });
        }
    }

    let mut out = File::create(tmp).map_err(werr)?;
    out.set_len(gpt.disk_size).map_err(werr)?;
    let table = entries(gpt)?;
    let table_crc = crc32fast::hash(&table);
    let last_lba = gpt.disk_size / SECTOR - 1;
    let backup_entries_lba = last_lba - ENTRY_SECTORS;
    let mut start = protective_mbr(gpt.disk_size);
    start.extend(header(gpt, 1, last_lba, 2, table_crc));
    start.extend_from_slice(&table);
    write_sparse(&mut out, 0, &start).map_err(werr)?;
    let mut end = table;
    end.extend(header(gpt, last_lba, 1, backup_entries_lba, table_crc));
    write_sparse(&mut out, backup_entries_lba * SECTOR, &end).map_err(werr)?;

    for (p, laid) in spec.partitions.iter().zip(&gpt.partitions) {
        match &p.content {
            Content::Zero => {}
            Content::Bytes(b) => write_sparse(&mut out, laid.start(), b).map_err(werr)?,
            Content::File(f) => {
                let rerr = |source| GptError::ReadContent {
                    name: p.name.clone(),
                    path: f.clone(),
                    source,
                };
                let mut input = File::open(f).map_err(rerr)?;
                let mut buf = vec![0u8; CHUNK];
                let mut offset = laid.start();
                loop {
                    let mut filled = 0;
                    while filled < CHUNK {
                        match input.read(&mut buf[filled..]) {
                            Ok(0) => break,
                            Ok(n) => filled += n,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(rerr(e)),
                        }
                    }
                    if filled == 0 {
                        break;
                    }
                    write_sparse(&mut out, offset, &buf[..filled]).map_err(werr)?;
                    offset += filled as u64;
                }
            }
        }
    }
    out.sync_all().map_err(werr)
}

/// Parse and check one header; returns (disk guid, entries lba, count, entry size,
/// entries crc, alternate lba).
fn parse_header(h: &[u8]) -> Result<(Guid, u64, u32, u32, u32, u64), String> {
    if &h[0..8] != b"EFI PART" {
        return Err("no 'EFI PART' signature".into());
    }
    let u32_at = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let size = u32_at(12) as usize;
    if !(92..=SECTOR as usize).contains(&size) {
        return Err(format!("header size {size}"));
    }
    let mut copy = h[..size].to_vec();
    copy[16..20].fill(0);
    if crc32fast::hash(&copy) != u32_at(16) {
        return Err("header CRC mismatch".into());
    }
    Ok((
        Guid::from_disk(&h[56..72]),
        u64_at(72),
        u32_at(80),
        u32_at(84),
        u32_at(88),
        u64_at(32),
    ))
}

fn read_at<R: Read + Seek>(r: &mut R, offset: u64, len: usize) -> Result<Vec<u8>, GptError> {
    let mut buf = vec![0u8; len];
    r.seek(SeekFrom::Start(offset)).map_err(GptError::Read)?;
    r.read_exact(&mut buf).map_err(GptError::Read)?;
    Ok(buf)
}

fn read_table<R: Read + Seek>(r: &mut R, header_lba: u64) -> Result<Gpt, GptError> {
    let h = read_at(r, header_lba * SECTOR, SECTOR as usize)?;
    let (disk_guid, entries_lba, count, entry_size, crc, alternate) =
        parse_header(&h).map_err(GptError::NoGpt)?;
    if !(128..=4096).contains(&entry_size) || count > 1024 {
        return Err(GptError::NoGpt(format!(
            "{count} entries of {entry_size} bytes"
        )));
    }
    let table = read_at(r, entries_lba * SECTOR, (count * entry_size) as usize)?;
    if crc32fast::hash(&table) != crc {
        return Err(GptError::NoGpt("partition entry array CRC mismatch".into()));
    }
    let last = header_lba.max(alternate);
    let mut partitions = Vec::new();
    for (i, e) in table.chunks_exact(entry_size as usize).enumerate() {
        let type_guid = Guid::from_disk(&e[0..16]);
        if type_guid.0 == [0; 16] {
            continue;
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&e[at..at + 8]);
            u64::from_le_bytes(b)
        };
        partitions.push(GptPartition {
            number: i as u32 + 1,
            name: decode_name(&e[56..128]),
            type_guid,
            guid: Guid::from_disk(&e[16..32]),
            first_lba: u64_at(32),
            last_lba: u64_at(40),
            attributes: u64_at(48),
        });
    }
    Ok(Gpt {
        disk_guid,
        disk_size: (last + 1) * SECTOR,
        partitions,
    })
}

/// Read the GPT of a disk image: the primary, or the backup at the end when the primary
/// is damaged.
pub fn read_gpt<R: Read + Seek>(r: &mut R) -> Result<Gpt, GptError> {
    match read_table(r, 1) {
        Ok(gpt) => Ok(gpt),
        Err(primary) => {
            let end = r.seek(SeekFrom::End(0)).map_err(GptError::Read)?;
            if end < 2 * SECTOR {
                return Err(primary);
            }
            read_table(r, end / SECTOR - 1).map_err(|_| primary)
        }
    }
}

/// A byte window onto part of a larger reader/writer (one partition of a disk image),
/// so that filesystem crates can work on a partition in place.
#[derive(Debug)]
pub struct Window<T> {
    inner: T,
    start: u64,
    len: u64,
    pos: u64,
}

impl<T: Seek> Window<T> {
    /// The `len` bytes of `inner` from `start`.
    pub fn new(inner: T, start: u64, len: u64) -> Window<T> {
        Window {
            inner,
            start,
            len,
            pos: 0,
        }
    }

    /// The window over `partition` of a disk.
    pub fn partition(inner: T, partition: &GptPartition) -> Window<T> {
        Window::new(inner, partition.start(), partition.size())
    }

    /// The underlying reader/writer.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: Read + Seek> Read for Window<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.inner.seek(SeekFrom::Start(self.start + self.pos))?;
        let got = self.inner.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl<T: Write + Seek> Write for Window<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the partition",
            ));
        }
        self.inner.seek(SeekFrom::Start(self.start + self.pos))?;
        let put = self.inner.write(&buf[..n])?;
        self.pos += put as u64;
        Ok(put)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<T: Seek> Seek for Window<T> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let target = target.ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "seek before the partition")
        })?;
        self.pos = target;
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_text_and_disk_order() {
        let g = Guid::parse("c12a7328-f81f-11d2-ba4b-00a0c93ec93b").unwrap();
        assert_eq!(g.to_string(), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
        assert_eq!(
            g.to_disk()[..8],
            [0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11]
        );
        assert_eq!(Guid::from_disk(&g.to_disk()), g);
        assert!(Guid::parse("c12a7328f81f11d2ba4b00a0c93ec93b").is_err());
        assert_ne!(Guid::derive(&[b"a", b"b"]), Guid::derive(&[b"ab"]));
    }

    #[test]
    fn window_reads_and_writes_inside_bounds() {
        let mut w = Window::new(io::Cursor::new(vec![0u8; 100]), 10, 20);
        w.write_all(&[1; 20]).unwrap();
        assert!(w.write_all(&[1]).is_err());
        w.seek(SeekFrom::Start(18)).unwrap();
        let mut buf = Vec::new();
        w.read_to_end(&mut buf).unwrap();
        assert_eq!(buf, [1, 1]);
        let inner = w.into_inner().into_inner();
        assert_eq!(inner[9..31].iter().filter(|&&b| b == 1).count(), 20);
    }
}
