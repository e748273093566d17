//! A content-addressed cache of bytes derived from the build's inputs, kept between builds
//! (in the package cache's `derived/`): compressed squashfs blocks, and the kernel
//! modules' alias map.
//!
//! Compressing the root filesystem (some 180 MiB at zstd level 15) is most of a build's
//! time, yet a rebuild after a change to `init` changes a few blocks out of ~1,500. A
//! block's compressed bytes are a pure function of its uncompressed bytes, the zstd
//! library version, the level and the block size, so they can be kept: the key is the
//! SHA-256 of the uncompressed bytes, and the file's header names the rest. Likewise the
//! alias map is a function of the kernel package (key: its SHA-256). A build that hits the
//! cache writes exactly the bytes a build without it writes (the reproducibility test
//! builds without it and compares).
//!
//! A file is rewritten after each build with only the entries that build used, so it
//! never grows past one image's worth; there is one file per architecture and kind. A
//! file that is truncated, corrupt (its trailing SHA-256 does not match), made under
//! another header (zstd version, level, format version) or otherwise unreadable is
//! ignored as a whole and replaced, with a note saying why: a cache can make a build
//! slower, never different.
//!
//! Format (all integers little-endian): `KSQBLK01`, a u32-length header string, a u64
//! entry count, then per entry the 32-byte key, a u32 length and the bytes; last, the
//! SHA-256 of everything before it. Hand-written rather than a crate: a few dozen lines,
//! with the integrity check the image's own build already uses (SHA-256).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"KSQBLK01";

/// An entry's key: the SHA-256 of the bytes it was derived from.
pub type Key = [u8; 32];

/// The cache of one build: what was on disk, and what this build used.
#[derive(Debug, Default)]
pub struct DerivedCache {
    path: Option<PathBuf>,
    header: String,
    old: HashMap<Key, Vec<u8>>,
    used: HashMap<Key, Vec<u8>>,
    /// Entries found in the cache.
    pub hits: u64,
    /// Entries derived now.
    pub misses: u64,
    /// Why the file on disk was not used, if it was not.
    pub note: Option<String>,
}

/// The key of `bytes`.
pub fn key(bytes: &[u8]) -> Key {
    Sha256::digest(bytes).into()
}

impl DerivedCache {
    /// No cache: everything is derived again, nothing is kept.
    pub fn disabled() -> DerivedCache {
        DerivedCache::default()
    }

    /// The cache at `path` for entries derived the way `header` says (for squashfs
    /// blocks: library version, level, block size). A missing file is an empty cache; an
    /// unusable one too, with [`DerivedCache::note`] saying why.
    pub fn open(path: &Path, header: String) -> DerivedCache {
        let mut cache = DerivedCache {
            path: Some(path.to_path_buf()),
            header,
            ..DerivedCache::default()
        };
        match std::fs::read(path) {
            Ok(bytes) => match parse(&bytes, &cache.header) {
                Ok(entries) => cache.old = entries,
                Err(why) => cache.note = Some(format!("{}: {why}; rebuilt", path.display())),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => cache.note = Some(format!("{}: {e}; rebuilt", path.display())),
        }
        cache
    }

    /// The compressed bytes for `bytes`: the cache's, or `compress`'s (then kept).
    pub fn get_or_compress<E>(
        &mut self,
        bytes: &[u8],
        compress: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
    ) -> Result<Vec<u8>, E> {
        if self.path.is_none() {
            self.misses += 1;
            return compress(bytes);
        }
        self.get_or_derive(key(bytes), || compress(bytes))
    }

    /// The bytes kept under `key`, or `derive`'s (then kept).
    pub fn get_or_derive<E>(
        &mut self,
        key: Key,
        derive: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<Vec<u8>, E> {
        if self.path.is_none() {
            self.misses += 1;
            return derive();
        }
        if let Some(hit) = self.used.get(&key) {
            self.hits += 1;
            return Ok(hit.clone());
        }
        if let Some(hit) = self.old.remove(&key) {
            self.hits += 1;
            self.used.insert(key, hit.clone());
            return Ok(hit);
        }
        self.misses += 1;
        let out = derive()?;
        self.used.insert(key, out.clone());
        Ok(out)
    }

    /// Write the entries this build used (atomically: a temporary file renamed into
    /// place). A disabled cache writes nothing.
    pub fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.header.len() as u32).to_le_bytes());
        out.extend_from_slice(self.header.as_bytes());
        out.extend_from_slice(&(self.used.len() as u64).to_le_bytes());
        // In key order, so that the same build writes the same file.
        let mut entries: Vec<(&Key, &Vec<u8>)> = self.used.iter().collect();
        entries.sort_by_key(|(key, _)| *key);
        for (key, data) in entries {
            out.extend_from_slice(key);
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(data);
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        let tmp = path.with_extension("partial");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&out)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

/// The entries of a cache file, if it is whole and made for `header`.
fn parse(bytes: &[u8], header: &str) -> Result<HashMap<Key, Vec<u8>>, String> {
    let body_len = bytes
        .len()
        .checked_sub(32)
        .ok_or("shorter than its checksum")?;
    let (body, sum) = bytes.split_at(body_len);
    if Sha256::digest(body).as_slice() != sum {
        return Err("checksum mismatch (truncated or corrupt)".into());
    }
    let mut r = Reader { bytes: body };
    if r.take(MAGIC.len())? != MAGIC {
        return Err("not a block cache (bad magic)".into());
    }
    let len = r.u32()? as usize;
    let found = r.take(len)?;
    if found != header.as_bytes() {
        return Err(format!(
            "made for `{}`, this build is `{header}`",
            String::from_utf8_lossy(found)
        ));
    }
    let count = r.u64()?;
    let mut entries = HashMap::new();
    for _ in 0..count {
        let key: Key = r
            .take(32)?
            .try_into()
            .map_err(|_| "short key".to_string())?;
        let len = r.u32()? as usize;
        entries.insert(key, r.take(len)?.to_vec());
    }
    if !r.bytes.is_empty() {
        return Err("trailing bytes after the last entry".into());
    }
    Ok(entries)
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.bytes.len() {
            return Err("ends in the middle of an entry".into());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upper(b: &[u8]) -> Result<Vec<u8>, String> {
        Ok(b.to_ascii_uppercase())
    }

    #[test]
    fn a_saved_cache_answers_the_next_build_and_keeps_only_what_was_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("amd64.blocks");
        let mut first = DerivedCache::open(&path, "zstd 1.5.7 level 15".into());
        assert_eq!(first.get_or_compress(b"abc", upper).unwrap(), b"ABC");
        assert_eq!(first.get_or_compress(b"old", upper).unwrap(), b"OLD");
        assert_eq!(first.get_or_compress(b"abc", upper).unwrap(), b"ABC");
        assert_eq!((first.hits, first.misses), (1, 2));
        first.save().unwrap();

        let mut second = DerivedCache::open(&path, "zstd 1.5.7 level 15".into());
        assert_eq!(second.note, None);
        let never = |_: &[u8]| -> Result<Vec<u8>, String> { Err("compressed again".into()) };
        assert_eq!(second.get_or_compress(b"abc", never).unwrap(), b"ABC");
        assert_eq!(second.get_or_compress(b"new", upper).unwrap(), b"NEW");
        second.save().unwrap();

        let mut third = DerivedCache::open(&path, "zstd 1.5.7 level 15".into());
        assert!(
            third.get_or_compress(b"old", never).is_err(),
            "unused entry kept"
        );
        assert_eq!(third.get_or_compress(b"new", never).unwrap(), b"NEW");
    }

    #[test]
    fn another_level_or_a_corrupt_file_is_ignored_with_a_note() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arm64.blocks");
        let mut cache = DerivedCache::open(&path, "level 15".into());
        cache.get_or_compress(b"abc", upper).unwrap();
        cache.save().unwrap();

        let other = DerivedCache::open(&path, "level 19".into());
        assert!(
            other
                .note
                .as_deref()
                .unwrap()
                .contains("made for `level 15`")
        );
        assert!(other.old.is_empty());

        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let corrupt = DerivedCache::open(&path, "level 15".into());
        assert!(
            corrupt
                .note
                .as_deref()
                .unwrap()
                .contains("checksum mismatch")
        );

        std::fs::write(&path, &bytes[..10]).unwrap();
        let short = DerivedCache::open(&path, "level 15".into());
        assert!(short.note.is_some() && short.old.is_empty());
    }

    #[test]
    fn a_disabled_cache_compresses_everything_and_writes_nothing() {
        let mut cache = DerivedCache::disabled();
        cache.get_or_compress(b"abc", upper).unwrap();
        cache.get_or_compress(b"abc", upper).unwrap();
        assert_eq!((cache.hits, cache.misses), (0, 2));
        cache.save().unwrap();
    }
}
