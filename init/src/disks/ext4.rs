//! The few ext4 superblock fields `disks` needs: is there an ext4 filesystem on a
//! partition, how big is it, what is its label.
//!
//! The superblock sits 1024 bytes into the partition; its magic `0xEF53` is at byte 56 of
//! it (1080 into the partition), the block count at 4 (low 32 bits) and 0x150 (high 32
//! bits, when the `64bit` feature is on), the block size as `1024 << s_log_block_size` at
//! 24, the label at 0x78.

use std::io::{self, Read};
use std::path::Path;

use crate::syscalls::Syscalls;

/// Offset of the superblock in the partition.
pub const SUPERBLOCK_OFFSET: usize = 1024;
/// The ext2/3/4 magic number.
pub const MAGIC: u16 = 0xEF53;
/// Bytes read to see the superblock.
pub const PROBE_LEN: usize = 2048;

/// What the superblock says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Filesystem blocks.
    pub blocks: u64,
    /// Block size in bytes.
    pub block_size: u64,
    /// Volume label.
    pub label: String,
}

impl Superblock {
    /// The filesystem's size in bytes.
    pub fn size(&self) -> u64 {
        self.blocks.saturating_mul(self.block_size)
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parse the first [`PROBE_LEN`] bytes of a partition; `None` when it holds no ext
/// filesystem (wrong magic, or an impossible block size).
pub fn parse(head: &[u8]) -> Option<Superblock> {
    const INCOMPAT_64BIT: u32 = 0x80;
    let sb = head.get(SUPERBLOCK_OFFSET..SUPERBLOCK_OFFSET + 1024)?;
    if u16_at(sb, 56) != MAGIC {
        return None;
    }
    let log = u32_at(sb, 24);
    if log > 6 {
        return None;
    }
    let mut blocks = u64::from(u32_at(sb, 4));
    if u32_at(sb, 0x60) & INCOMPAT_64BIT != 0 {
        blocks |= u64::from(u32_at(sb, 0x150)) << 32;
    }
    let label = &sb[0x78..0x88];
    let end = label.iter().position(|&b| b == 0).unwrap_or(label.len());
    Some(Superblock {
        blocks,
        block_size: 1024 << log,
        label: String::from_utf8_lossy(&label[..end]).into_owned(),
    })
}

/// Read the superblock of the partition at `device`, if it holds an ext filesystem.
pub fn probe(sys: &dyn Syscalls, device: &Path) -> io::Result<Option<Superblock>> {
    Ok(parse(&read_head(sys, device)?))
}

/// Whether a partition's head is blank (all zeros): nothing was ever written there, as
/// on a new partition, unlike a filesystem whose superblock is damaged.
pub fn is_blank(head: &[u8]) -> bool {
    head.iter().all(|&b| b == 0)
}

/// The first [`PROBE_LEN`] bytes of the partition at `device` (fewer if it is smaller).
pub fn read_head(sys: &dyn Syscalls, device: &Path) -> io::Result<Vec<u8>> {
    let mut head = vec![0u8; PROBE_LEN];
    let mut reader = sys.open_read(device)?;
    let mut got = 0;
    while got < head.len() {
        match reader.read(&mut head[got..])? {
            0 => break,
            n => got += n,
        }
    }
    head.truncate(got);
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(magic: u16, log: u32, lo: u32, hi: u32, incompat: u32, label: &str) -> Vec<u8> {
        let mut b = vec![0u8; PROBE_LEN];
        let sb = SUPERBLOCK_OFFSET;
        b[sb + 4..sb + 8].copy_from_slice(&lo.to_le_bytes());
        b[sb + 24..sb + 28].copy_from_slice(&log.to_le_bytes());
        b[sb + 56..sb + 58].copy_from_slice(&magic.to_le_bytes());
        b[sb + 0x60..sb + 0x64].copy_from_slice(&incompat.to_le_bytes());
        b[sb + 0x78..sb + 0x78 + label.len()].copy_from_slice(label.as_bytes());
        b[sb + 0x150..sb + 0x154].copy_from_slice(&hi.to_le_bytes());
        b
    }

    #[test]
    fn superblocks_are_recognised_by_magic_at_1080() {
        let sb = parse(&head(MAGIC, 2, 25600, 0, 0, "STATE"));
        assert_eq!(
            sb,
            Some(Superblock {
                blocks: 25600,
                block_size: 4096,
                label: "STATE".into()
            })
        );
        assert_eq!(sb.map(|s| s.size()), Some(100 << 20));
        // The magic, as bytes, is 0x53 0xEF at offset 1080.
        let h = head(MAGIC, 0, 1, 0, 0, "");
        assert_eq!(&h[1080..1082], &[0x53, 0xEF]);
        assert_eq!(parse(&head(0, 2, 25600, 0, 0, "")), None);
        assert_eq!(parse(&[0u8; PROBE_LEN]), None);
        assert_eq!(parse(&[0u8; 100]), None, "short reads are not ext4");
        assert_eq!(parse(&head(MAGIC, 9, 1, 0, 0, "")), None);
    }

    #[test]
    fn the_high_block_count_counts_only_with_64bit() {
        let big = parse(&head(MAGIC, 2, 5, 1, 0x80, "EPHEMERAL"));
        assert_eq!(big.map(|s| s.blocks), Some((1 << 32) + 5));
        let small = parse(&head(MAGIC, 2, 5, 1, 0, ""));
        assert_eq!(small.map(|s| s.blocks), Some(5));
    }
}
