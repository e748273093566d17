//! The dm-verity hash tree of a root filesystem, in the standard on-disk format that
//! `veritysetup` writes and verifies (format version 1, sha256, 4096-byte data and hash
//! blocks, a salt chosen by the caller): [`build`] makes it for an image (the imager),
//! [`RootVerifier`] checks a slot that an upgrade wrote against the root hash of its
//! manifest as the slot is read back once (machined).
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

use keelson_configs::boot;
use sha2::{Digest, Sha256};

/// Data and hash block size.
pub const BLOCK_SIZE: usize = 4096;
/// sha256 digest size.
const DIGEST_SIZE: usize = 32;
/// Digests per hash block (4096 / 32, already a power of two).
const HASHES_PER_BLOCK: usize = BLOCK_SIZE / DIGEST_SIZE;
/// Largest salt the superblock can hold.
pub const MAX_SALT_SIZE: usize = 256;

/// Errors from building or verifying a hash tree.
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
    /// The parameters to verify against are not usable.
    #[error("the dm-verity parameters are wrong: {0}")]
    Params(String),
    /// Reading the written slot back failed.
    #[error("cannot read the written root back at byte {offset}")]
    ReadBack {
        /// Where the read started.
        offset: u64,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The superblock written at `hash_offset` is not the one the parameters describe.
    #[error(
        "the dm-verity superblock at byte {offset} does not match the manifest ({what}): the slot was not written as the bundle says; run the upgrade again"
    )]
    Superblock {
        /// Its offset.
        offset: u64,
        /// What differs.
        what: String,
    },
    /// A data block's hash differs from the one in the tree written after it.
    #[error(
        "data block {block} (byte {}) of the written root does not match its hash in the verity tree: the slot is corrupt; run the upgrade again",
        block * BLOCK_SIZE as u64
    )]
    DataBlock {
        /// The block's number.
        block: u64,
    },
    /// A hash block of the tree differs from the one recomputed from the data.
    #[error(
        "verity hash block {block} of level {level} (0 = nearest the data) does not match the data: the slot's tree is corrupt; run the upgrade again"
    )]
    HashBlock {
        /// The level, 0 nearest the data.
        level: usize,
        /// The block within the level.
        block: u64,
    },
    /// The root hash recomputed from the data is not the manifest's.
    #[error(
        "the root written to the slot has verity root hash {found}, the manifest says {expected}: the slot holds other data; run the upgrade again"
    )]
    RootHash {
        /// The manifest's.
        expected: String,
        /// Recomputed.
        found: String,
    },
}

/// The values a verity target needs, as [`build`] made them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeParams {
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

impl TreeParams {
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

    /// The parameters as a boot entry and a bundle's manifest carry them.
    pub fn boot_params(&self) -> boot::VerityParams {
        boot::VerityParams {
            roothash: self.root_hash_hex(),
            salt: self.salt_hex(),
            data_blocks: self.data_blocks,
            hash_offset: self.hash_offset,
        }
    }
}

/// A built hash tree: its parameters and the bytes (superblock block + levels) to write
/// at `hash_offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityTree {
    /// Parameters for the kernel command line.
    pub params: TreeParams,
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

/// The hash levels over the data blocks' digests, nearest the data first, and the root
/// hash. One data block: no levels, the root hash is its digest.
fn levels(mut digests: Vec<[u8; 32]>, salt: &[u8]) -> (Vec<Vec<u8>>, [u8; 32]) {
    let mut levels: Vec<Vec<u8>> = Vec::new();
    if digests.len() == 1 {
        return (levels, digests[0]);
    }
    loop {
        let packed = pack(&digests);
        let blocks = packed.len() / BLOCK_SIZE;
        digests = packed
            .chunks(BLOCK_SIZE)
            .map(|b| hash_block(salt, b))
            .collect();
        levels.push(packed);
        if blocks == 1 {
            return (levels, digests[0]);
        }
    }
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
    let (levels, root_hash) = levels(digests, salt);
    let mut bytes = superblock(&uuid, data_blocks, salt);
    for level in levels.iter().rev() {
        bytes.extend_from_slice(level);
    }
    Ok(VerityTree {
        params: TreeParams {
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

/// Checks a written root against `params` (a manifest's) as its bytes stream by once,
/// from the partition's first byte, in pieces of any size ([`RootVerifier::update`]): it
/// hashes each data block with the salt as it passes, keeps the superblock and the hash
/// levels that follow the data, and at the end ([`RootVerifier::finish`]) compares the
/// superblock with the parameters, the tree recomputed from the data with the one written
/// and its root with `params.roothash`. A data block that does not match its written hash
/// is reported by number; bytes past the tree (the rest of the partition) are not looked
/// at.
#[derive(Debug)]
pub struct RootVerifier {
    expected: [u8; DIGEST_SIZE],
    roothash: String,
    salt: Vec<u8>,
    data_blocks: u64,
    hash_offset: u64,
    /// Where the tree ends: `hash_offset` plus the superblock block and the levels.
    tree_end: u64,
    /// Bytes seen so far.
    received: u64,
    /// The start of a data block split between two pieces.
    partial: Vec<u8>,
    /// One digest per data block seen, in order.
    digests: Vec<[u8; DIGEST_SIZE]>,
    /// The superblock block and the written levels, as they went by.
    tree: Vec<u8>,
}

impl RootVerifier {
    /// A verifier for a root described by `params`, or why they are unusable.
    pub fn new(params: &boot::VerityParams) -> Result<RootVerifier, VerityError> {
        let expected = decode_hex("roothash", &params.roothash)?;
        let salt = decode_hex("salt", &params.salt)?;
        let Ok(expected) = <[u8; DIGEST_SIZE]>::try_from(&expected[..]) else {
            return Err(VerityError::Params(format!(
                "root hash of {} bytes, not {DIGEST_SIZE}",
                expected.len()
            )));
        };
        if salt.len() > MAX_SALT_SIZE || params.data_blocks == 0 {
            return Err(VerityError::Params(format!(
                "salt of {} bytes, {} data blocks",
                salt.len(),
                params.data_blocks
            )));
        }
        let data_blocks = params.data_blocks;
        if data_blocks.checked_mul(BLOCK_SIZE as u64) != Some(params.hash_offset) {
            return Err(VerityError::Params(format!(
                "hash_offset {} is not {data_blocks} data blocks of 4096 bytes",
                params.hash_offset
            )));
        }
        Ok(RootVerifier {
            expected,
            roothash: params.roothash.clone(),
            salt,
            data_blocks,
            hash_offset: params.hash_offset,
            tree_end: params.hash_offset.saturating_add(tree_size(data_blocks)),
            received: 0,
            partial: Vec::with_capacity(BLOCK_SIZE),
            digests: Vec::new(),
            tree: Vec::new(),
        })
    }

    /// The next bytes of the partition, right after the ones given before.
    pub fn update(&mut self, mut bytes: &[u8]) {
        // The data blocks: digests, a block split between pieces kept until it is whole.
        let data_left = self.hash_offset.saturating_sub(self.received);
        let data_len = usize::try_from(data_left).map_or(bytes.len(), |n| n.min(bytes.len()));
        let (mut data, rest) = bytes.split_at(data_len);
        self.received += data_len as u64;
        if !self.partial.is_empty() {
            let fill = (BLOCK_SIZE - self.partial.len()).min(data.len());
            self.partial.extend_from_slice(&data[..fill]);
            data = &data[fill..];
            if self.partial.len() == BLOCK_SIZE {
                self.digests.push(hash_block(&self.salt, &self.partial));
                self.partial.clear();
            }
        }
        let mut blocks = data.chunks_exact(BLOCK_SIZE);
        for block in &mut blocks {
            self.digests.push(hash_block(&self.salt, block));
        }
        self.partial.extend_from_slice(blocks.remainder());
        bytes = rest;

        // The superblock and the levels, kept; what follows the tree, passed over.
        let tree_left = self.tree_end.saturating_sub(self.received);
        let tree_len = usize::try_from(tree_left).map_or(bytes.len(), |n| n.min(bytes.len()));
        self.tree.extend_from_slice(&bytes[..tree_len]);
        self.received = self.received.saturating_add(bytes.len() as u64);
    }

    /// The verdict, once the bytes up to the tree's end were given.
    pub fn finish(self) -> Result<(), VerityError> {
        if self.received < self.tree_end {
            return Err(VerityError::ReadBack {
                offset: self.received,
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the root ends there, before its verity tree's end at byte {}",
                        self.tree_end
                    ),
                ),
            });
        }
        let (sb, mut written_levels) = self.tree.split_at(BLOCK_SIZE);
        check_superblock(sb, self.hash_offset, self.data_blocks, &self.salt)?;
        let (levels, root) = levels(self.digests, &self.salt);

        // The written levels, top first after the superblock block, as `build` lays them
        // out; `written[0]` nearest the data, as `levels`.
        let mut written: Vec<&[u8]> = Vec::with_capacity(levels.len());
        for level in levels.iter().rev() {
            let (bytes, rest) = written_levels.split_at(level.len());
            written.push(bytes);
            written_levels = rest;
        }
        written.reverse();

        if root != self.expected {
            // Name the first data block whose written hash differs, if the tree tells.
            if let Some(bottom) = written.first()
                && let Some(block) = first_difference(bottom, &levels[0], DIGEST_SIZE)
            {
                return Err(VerityError::DataBlock { block });
            }
            if levels.is_empty() {
                // One data block: its digest is the root hash itself.
                return Err(VerityError::DataBlock { block: 0 });
            }
            return Err(VerityError::RootHash {
                expected: self.roothash,
                found: hex::encode(root),
            });
        }
        for (level, (computed, on_disk)) in levels.iter().zip(&written).enumerate() {
            if let Some(block) = first_difference(on_disk, computed, BLOCK_SIZE) {
                return Err(VerityError::HashBlock { level, block });
            }
        }
        Ok(())
    }
}

/// The index of the first `unit`-sized piece where `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8], unit: usize) -> Option<u64> {
    a.chunks(unit)
        .zip(b.chunks(unit))
        .position(|(x, y)| x != y)
        .map(|i| i as u64)
}

fn decode_hex(field: &str, value: &str) -> Result<Vec<u8>, VerityError> {
    hex::decode(value).map_err(|e| VerityError::Params(format!("{field} {value:?}: {e}")))
}

fn check_superblock(
    sb: &[u8],
    offset: u64,
    data_blocks: u64,
    salt: &[u8],
) -> Result<(), VerityError> {
    let bad = |what: &str| {
        Err(VerityError::Superblock {
            offset,
            what: what.to_string(),
        })
    };
    if &sb[0..8] != b"verity\0\0" {
        return bad("no `verity` signature");
    }
    if sb[72..80] != data_blocks.to_le_bytes() {
        return bad("another number of data blocks");
    }
    let salt_len = u16::from_le_bytes([sb[80], sb[81]]) as usize;
    if salt_len != salt.len() || &sb[88..88 + salt_len] != salt {
        return bad("another salt");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn data(blocks: usize) -> Vec<u8> {
        (0..blocks * BLOCK_SIZE).map(|i| (i % 251) as u8).collect()
    }

    fn check(blocks: usize) {
        let data = data(blocks);
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

    /// A partition as the imager lays it out: the data, then the tree; its parameters.
    fn partition(blocks: usize) -> (Vec<u8>, boot::VerityParams) {
        let mut part = data(blocks);
        let salt = derive_salt(&part);
        let tree = build(&part[..], &salt, derive_uuid(&part)).unwrap();
        part.extend_from_slice(&tree.bytes);
        // Trailing bytes past the tree (the rest of the partition) are not read.
        part.extend_from_slice(&[0xee; 100]);
        (part, tree.params.boot_params())
    }

    /// `part` given to a [`RootVerifier`] in pieces of `piece` bytes (the last shorter).
    fn verify_in_pieces(
        part: &[u8],
        params: &boot::VerityParams,
        piece: usize,
    ) -> Result<(), VerityError> {
        let mut verifier = RootVerifier::new(params)?;
        for bytes in part.chunks(piece) {
            verifier.update(bytes);
        }
        verifier.finish()
    }

    fn verify(part: &[u8], params: &boot::VerityParams) -> Result<(), VerityError> {
        verify_in_pieces(part, params, 1 << 20)
    }

    /// Piece sizes that split blocks anywhere, and the whole partition at once.
    const PIECES: [usize; 6] = [1000, 4095, 4096, 4097, (1 << 20) + 17, usize::MAX];

    #[test]
    fn a_built_tree_verifies_whatever_the_piece_size() {
        for blocks in [1, 2, 129, 300] {
            let (part, params) = partition(blocks);
            for piece in PIECES {
                verify_in_pieces(&part, &params, piece)
                    .unwrap_or_else(|e| panic!("{blocks} blocks in pieces of {piece}: {e}"));
            }
        }
        // One byte at a time, across the data's end and the whole tree.
        let (part, params) = partition(2);
        verify_in_pieces(&part, &params, 1).unwrap();
    }

    /// A 300-block partition with the byte at `at` flipped, given in every piece size,
    /// is refused as `expected` says.
    fn check_flip(at: usize, expected: impl Fn(&VerityError) -> bool) {
        let (mut part, params) = partition(300);
        part[at] ^= 0x10;
        for piece in PIECES {
            match verify_in_pieces(&part, &params, piece) {
                Err(e) if expected(&e) => {}
                other => panic!("byte {at} flipped, pieces of {piece}: {other:?}"),
            }
        }
    }

    #[test]
    fn one_flipped_byte_is_named_in_every_piece_size() {
        let tree = 300 * BLOCK_SIZE;
        // Data block 257, split across pieces of 1000 bytes.
        check_flip(257 * BLOCK_SIZE + 4000, |e| {
            matches!(e, VerityError::DataBlock { block: 257 })
        });
        // The bottom level (digests of the data), after the superblock and the top level:
        // its third block.
        check_flip(tree + 4 * BLOCK_SIZE + 9, |e| {
            matches!(e, VerityError::HashBlock { level: 0, block: 2 })
        });
        // The top level.
        check_flip(tree + BLOCK_SIZE + 40, |e| {
            matches!(e, VerityError::HashBlock { level: 1, block: 0 })
        });
        // The superblock's number of data blocks, then its salt.
        check_flip(
            tree + 72,
            |e| matches!(e, VerityError::Superblock { what, .. } if what.contains("data blocks")),
        );
        check_flip(
            tree + 88 + 31,
            |e| matches!(e, VerityError::Superblock { what, .. } if what.contains("salt")),
        );
        // Past the tree: not the root's.
        let (mut part, params) = partition(300);
        let end = part.len() - 1;
        part[end] ^= 0x10;
        verify_in_pieces(&part, &params, 1000).unwrap();
    }

    #[test]
    fn a_root_that_ends_before_its_tree_is_a_read_back_error_at_its_end() {
        let (part, params) = partition(300);
        let short = &part[..part.len() - 100 - 1];
        for piece in PIECES {
            let err = verify_in_pieces(short, &params, piece).unwrap_err();
            assert!(
                matches!(&err, VerityError::ReadBack { offset, .. } if *offset == short.len() as u64),
                "pieces of {piece}: {err:?}"
            );
        }
    }

    #[test]
    fn a_built_tree_verifies() {
        for blocks in [1, 2, 128, 129, 300, 128 * 128 + 1] {
            let (part, params) = partition(blocks);
            verify(&part, &params).unwrap();
        }
    }

    #[test]
    fn a_flipped_data_byte_names_its_block() {
        for (blocks, block) in [(1usize, 0usize), (2, 1), (300, 0), (300, 257), (300, 299)] {
            let (mut part, params) = partition(blocks);
            part[block * BLOCK_SIZE + 17] ^= 1;
            let err = verify(&part, &params).unwrap_err();
            assert!(
                matches!(err, VerityError::DataBlock { block: b } if b == block as u64),
                "{blocks} blocks, flipped {block}: {err}"
            );
            assert!(err.to_string().contains(&format!("data block {block} ")));
        }
    }

    #[test]
    fn a_corrupt_tree_or_other_root_is_refused() {
        let (mut part, params) = partition(300);
        // A byte of the top level (right after the superblock block).
        part[params.hash_offset as usize + BLOCK_SIZE + 5] ^= 1;
        assert!(matches!(
            verify(&part, &params),
            Err(VerityError::HashBlock { level: 1, block: 0 })
        ));

        let (part, mut params) = partition(300);
        params.roothash = "00".repeat(32);
        assert!(matches!(
            verify(&part, &params),
            Err(VerityError::RootHash { .. })
        ));

        let (mut part, params) = partition(3);
        part[params.hash_offset as usize] = b'x';
        assert!(matches!(
            verify(&part, &params),
            Err(VerityError::Superblock { .. })
        ));

        let (part, mut params) = partition(3);
        params.salt = "00".into();
        assert!(matches!(
            verify(&part, &params),
            Err(VerityError::Superblock { .. })
        ));
        params.salt = "zz".into();
        assert!(matches!(
            verify(&part, &params),
            Err(VerityError::Params(_))
        ));

        let (part, params) = partition(3);
        let short = &part[..part.len() - 200 - BLOCK_SIZE];
        assert!(matches!(
            verify(short, &params),
            Err(VerityError::ReadBack { .. })
        ));
    }
}
