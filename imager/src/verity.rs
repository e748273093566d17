//! The dm-verity hash tree of a root filesystem, in the standard on-disk format that
//! `veritysetup` writes and verifies (format version 1, sha256, 4096-byte data and hash
//! blocks, a salt chosen by the caller).
//!
//! Written by hand: the format is a few dozen lines, and the Rust crates available either
//! only verify or compute a root hash without writing `veritysetup`'s superblock and
//! level layout; calling `veritysetup format` instead would make the build depend on a
//! host tool. The layout is the one veritysetup uses with a superblock:
//!
//! - at `hash_offset`: the 512-byte superblock (`verity\0\0`, version 1, hash type 1,
//!   uuid, `sha256`, block sizes, number of data blocks, salt), padded to one hash block;
//! - from `hash_offset + 4096`: the hash levels, the top level (nearest the root) first;
//!   each hash block holds 128 sha256 digests of `salt || block below`, zero padded;
//! - the root hash is `sha256(salt || top-level block)` (with one data block there are no
//!   levels and the root hash is that of the data block itself).
//!
//! Our root partitions put the tree right after the (4 KiB padded) filesystem, so that
//! `veritysetup verify ROOT ROOT <roothash> --hash-offset=<data_blocks * 4096>` checks it.

use std::io::{self, Read};

use sha2::{Digest, Sha256};

/// Data and hash block size.
pub const BLOCK_SIZE: usize = 4096;
/// sha256 digest size.
const DIGEST_SIZE: usize = 32;
/// Digests per hash block (4096 / 32, already a power of two).
const HASHES_PER_BLOCK: usize = BLOCK_SIZE / DIGEST_SIZE;
/// Largest salt the superblock can hold.
pub const MAX_SALT_SIZE: usize = 256;

/// Errors from building a hash tree.
#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    /// The salt is longer than the superblock allows.
    #[error("dm-verity salt is {0} bytes; the superblock holds at most 256")]
    SaltTooLong(usize),
    /// There is no data to protect.
    #[error("the filesystem to protect with dm-verity is empty")]
    Empty,
    /// The data is not a whole number of 4 KiB blocks.
    #[error(
        "the filesystem is {0} bytes, not a multiple of 4096: pad it to a 4 KiB boundary before hashing"
    )]
    Unaligned(u64),
    /// Reading the data failed.
    #[error("cannot read the filesystem to hash it")]
    Read(#[source] io::Error),
}

/// The values a verity target needs, as the boot entry's command line carries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityParams {
    /// Root hash.
    pub root_hash: [u8; 32],
    /// Salt.
    pub salt: Vec<u8>,
    /// Number of 4 KiB data blocks covered.
    pub data_blocks: u64,
    /// Byte offset of the superblock from the start of the partition (= data size).
    pub hash_offset: u64,
    /// The uuid written into the superblock.
    pub uuid: [u8; 16],
}

impl VerityParams {
    /// The root hash in lower-case hex.
    pub fn root_hash_hex(&self) -> String {
        hex::encode(self.root_hash)
    }

    /// The salt in lower-case hex.
    pub fn salt_hex(&self) -> String {
        hex::encode(&self.salt)
    }

    /// The uuid in its canonical text form (`8-4-4-4-12`).
    pub fn uuid_string(&self) -> String {
        format_uuid(&self.uuid)
    }
}

/// A built hash tree: its parameters and the bytes (superblock block + levels) to write
/// at `hash_offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityTree {
    /// Parameters for the kernel command line.
    pub params: VerityParams,
    /// The superblock block followed by the hash levels.
    pub bytes: Vec<u8>,
}

/// Format a uuid as `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
pub fn format_uuid(uuid: &[u8; 16]) -> String {
    let h = hex::encode(uuid);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A salt derived from content (so that builds are reproducible): sha256 of a domain
/// string and `content`.
pub fn derive_salt(content: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"keelson dm-verity salt v1\0");
    h.update(content);
    h.finalize().into()
}

/// A version-4-shaped uuid derived from `seed` (for the superblock, reproducibly).
pub fn derive_uuid(seed: &[u8]) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"keelson dm-verity uuid v1\0");
    h.update(seed);
    let digest = h.finalize();
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&digest[..16]);
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    uuid
}

fn hash_block(salt: &[u8], block: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// Pack digests into zero-padded hash blocks.
fn pack(digests: &[[u8; 32]]) -> Vec<u8> {
    let blocks = digests.len().div_ceil(HASHES_PER_BLOCK);
    let mut out = vec![0u8; blocks * BLOCK_SIZE];
    for (i, d) in digests.iter().enumerate() {
        let at = (i / HASHES_PER_BLOCK) * BLOCK_SIZE + (i % HASHES_PER_BLOCK) * DIGEST_SIZE;
        out[at..at + DIGEST_SIZE].copy_from_slice(d);
    }
    out
}

/// The 512-byte veritysetup superblock, padded to one hash block.
fn superblock(uuid: &[u8; 16], data_blocks: u64, salt: &[u8]) -> Vec<u8> {
    let mut sb = vec![0u8; BLOCK_SIZE];
    sb[0..8].copy_from_slice(b"verity\0\0");
    sb[8..12].copy_from_slice(&1u32.to_le_bytes()); // version
    sb[12..16].copy_from_slice(&1u32.to_le_bytes()); // hash_type: 1 = salt first
    sb[16..32].copy_from_slice(uuid);
    sb[32..38].copy_from_slice(b"sha256"); // algorithm[32], NUL padded
    sb[64..68].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes()); // data_block_size
    sb[68..72].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes()); // hash_block_size
    sb[72..80].copy_from_slice(&data_blocks.to_le_bytes());
    sb[80..82].copy_from_slice(&(salt.len() as u16).to_le_bytes());
    // 82..88: padding; 88..344: salt; the rest up to 512 is padding.
    sb[88..88 + salt.len()].copy_from_slice(salt);
    sb
}

/// Build the hash tree over `data` (read to its end; its length must be a non-zero
/// multiple of 4096).
pub fn build(data: impl Read, salt: &[u8], uuid: [u8; 16]) -> Result<VerityTree, VerityError> {
    if salt.len() > MAX_SALT_SIZE {
        return Err(VerityError::SaltTooLong(salt.len()));
    }
    // Level 0: one digest per data block, streamed.
    let mut reader = io::BufReader::with_capacity(1 << 20, data);
    let mut block = vec![0u8; BLOCK_SIZE];
    let mut digests: Vec<[u8; 32]> = Vec::new();
    let mut total: u64 = 0;
    loop {
        let mut filled = 0;
        while filled < BLOCK_SIZE {
            match reader.read(&mut block[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(VerityError::Read(e)),
            }
        }
        total += filled as u64;
        if filled == 0 {
            break;
        }
        if filled < BLOCK_SIZE {
            return Err(VerityError::Unaligned(total));
        }
        digests.push(hash_block(salt, &block));
    }
    if digests.is_empty() {
        return Err(VerityError::Empty);
    }
    let data_blocks = digests.len() as u64;

    // Build levels bottom-up until one hash block holds everything; then the root hash
    // is the digest of that block. One data block: no levels at all.
    let mut levels: Vec<Vec<u8>> = Vec::new();
    let root_hash = if digests.len() == 1 {
        digests[0]
    } else {
        loop {
            let packed = pack(&digests);
            let blocks = packed.len() / BLOCK_SIZE;
            digests = packed
                .chunks(BLOCK_SIZE)
                .map(|b| hash_block(salt, b))
                .collect();
            levels.push(packed);
            if blocks == 1 {
                break digests[0];
            }
        }
    };

    let mut bytes = superblock(&uuid, data_blocks, salt);
    for level in levels.iter().rev() {
        bytes.extend_from_slice(level);
    }
    Ok(VerityTree {
        params: VerityParams {
            root_hash,
            salt: salt.to_vec(),
            data_blocks,
            hash_offset: data_blocks * BLOCK_SIZE as u64,
            uuid,
        },
        bytes,
    })
}

/// Size of the superblock plus hash tree for `data_blocks` blocks, in bytes (to size a
/// root partition before building).
pub fn tree_size(data_blocks: u64) -> u64 {
    let mut total = 1; // superblock block
    let mut n = data_blocks;
    while n > 1 {
        n = n.div_ceil(HASHES_PER_BLOCK as u64);
        total += n;
    }
    total * BLOCK_SIZE as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(blocks: usize) {
        let data: Vec<u8> = (0..blocks * BLOCK_SIZE).map(|i| (i % 251) as u8).collect();
        let tree = build(&data[..], b"salt", [1; 16]).unwrap();
        assert_eq!(tree.params.data_blocks, blocks as u64);
        assert_eq!(
            tree.bytes.len() as u64,
            tree_size(blocks as u64),
            "{blocks}"
        );
        assert_eq!(&tree.bytes[..8], b"verity\0\0");
    }

    #[test]
    fn sizes_match_for_one_two_and_many_levels() {
        for blocks in [1, 2, 128, 129, 128 * 128 + 1] {
            check(blocks);
        }
    }

    #[test]
    fn one_block_root_is_the_block_hash() {
        let data = vec![0u8; BLOCK_SIZE];
        let tree = build(&data[..], b"s", [0; 16]).unwrap();
        assert_eq!(tree.params.root_hash, hash_block(b"s", &data));
    }

    #[test]
    fn refuses_bad_input() {
        assert!(matches!(
            build(&[][..], b"", [0; 16]),
            Err(VerityError::Empty)
        ));
        assert!(matches!(
            build(&[0u8; 100][..], b"", [0; 16]),
            Err(VerityError::Unaligned(100))
        ));
        assert!(matches!(
            build(&[0u8; 4096][..], &[0; 257], [0; 16]),
            Err(VerityError::SaltTooLong(257))
        ));
    }

    #[test]
    fn uuid_is_v4_shaped() {
        let u = derive_uuid(b"x");
        let s = format_uuid(&u);
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
    }
}
