//! Writes a [`Tree`] as a squashfs image (and reads files back out of one), with the
//! `backhand` crate.
//!
//! The output is byte-reproducible: the superblock's modification time and every inode's
//! mtime are the tree's, every owner is 0:0, entries are written in path order, and
//! compression is single-threaded zstd at a fixed level (Debian's 6.12 kernels build
//! `CONFIG_SQUASHFS_ZSTD=y`; xz is also available for reading). The image is padded to a
//! multiple of 4 KiB so that a dm-verity hash tree can follow it directly. (backhand has
//! no setter for the root directory's own mtime, so that one is always 0.)

use std::collections::HashMap;
use std::io::{Cursor, Read, Seek, Write};
use std::path::{Component, Path, PathBuf};

use std::sync::Mutex;

use backhand::compression::{
    CompressionAction, CompressionOptions, Compressor, DefaultCompressor, Zstd,
};
use backhand::kind::Kind;
use backhand::{
    BackhandError, BufReadSeek, FilesystemCompressor, FilesystemReader, FilesystemWriter,
    InnerNode, NodeHeader, SquashfsFileReader, SuperBlock,
};

use crate::derived::DerivedCache;
use crate::rootfs::{Node, Tree};

/// The block cache of the squashfs being written. backhand takes its compressor as a
/// `&'static`, so the cache of the write under way lives here, and [`WRITING`] lets one
/// write at a time use it.
static SESSION: Mutex<Option<DerivedCache>> = Mutex::new(None);
/// Held for the whole of a [`write`].
static WRITING: Mutex<()> = Mutex::new(());

/// backhand's own compressor, answering from the block cache of [`SESSION`] when it can.
struct CachingCompressor;

static CACHING: CachingCompressor = CachingCompressor;

impl CompressionAction for CachingCompressor {
    type Error = BackhandError;
    type Compressor = Compressor;
    type FilesystemCompressor = FilesystemCompressor;
    type SuperBlock = SuperBlock;

    fn decompress(
        &self,
        bytes: &[u8],
        out: &mut Vec<u8>,
        compressor: Compressor,
    ) -> Result<(), BackhandError> {
        DefaultCompressor.decompress(bytes, out, compressor)
    }

    fn compress(
        &self,
        bytes: &[u8],
        fc: FilesystemCompressor,
        block_size: u32,
    ) -> Result<Vec<u8>, BackhandError> {
        let fresh = |b: &[u8]| DefaultCompressor.compress(b, fc, block_size);
        let mut session = SESSION.lock().unwrap_or_else(|e| e.into_inner());
        match session.as_mut() {
            Some(cache) => cache.get_or_compress(bytes, fresh),
            None => fresh(bytes),
        }
    }

    fn compression_options(
        &self,
        superblock: &mut SuperBlock,
        kind: &Kind,
        fs_compressor: FilesystemCompressor,
    ) -> Result<Option<Vec<u8>>, BackhandError> {
        DefaultCompressor.compression_options(superblock, kind, fs_compressor)
    }
}

/// What identifies how blocks are compressed, for the block cache's header.
pub fn cache_header(options: SquashfsOptions) -> String {
    format!(
        "zstd {} level {} block {BLOCK_SIZE}",
        zstd::zstd_safe::version_string(),
        options.zstd_level
    )
}

/// squashfs data block size: the kernel's and mksquashfs's default, 128 KiB.
pub const BLOCK_SIZE: u32 = 128 * 1024;

/// Errors from writing or reading squashfs images.
#[derive(Debug, thiserror::Error)]
pub enum SquashfsError {
    /// `backhand` refused the tree or failed to write it.
    #[error("cannot write the squashfs image")]
    Write(#[source] BackhandError),
    /// A path of the tree could not be added.
    #[error("cannot add {path:?} to the squashfs image")]
    Add {
        /// The tree path.
        path: String,
        /// Why.
        #[source]
        source: BackhandError,
    },
    /// The compression level is out of zstd's range.
    #[error("zstd level {0} is out of range: use 1..=22")]
    Level(i32),
    /// The image could not be parsed.
    #[error("cannot read the squashfs image: is this partition a squashfs filesystem?")]
    Open(#[source] BackhandError),
    /// A file's data could not be read.
    #[error("cannot read {path:?} from the squashfs image")]
    Read {
        /// The path in the image.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No such path in the image.
    #[error("{path:?} does not exist in the squashfs image")]
    NotFound {
        /// The path asked for.
        path: String,
    },
    /// The path exists but is not a regular file.
    #[error("{path:?} in the squashfs image is not a regular file")]
    NotAFile {
        /// The path asked for.
        path: String,
    },
    /// Following symlinks went around in circles.
    #[error("too many levels of symbolic links resolving {path:?} in the squashfs image")]
    SymlinkLoop {
        /// The path asked for.
        path: String,
    },
}

/// How to write the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SquashfsOptions {
    /// zstd compression level, 1..=22 (15 is mksquashfs's default for zstd).
    pub zstd_level: i32,
}

impl Default for SquashfsOptions {
    fn default() -> Self {
        SquashfsOptions { zstd_level: 15 }
    }
}

/// Write `tree` as a squashfs image to `out` (at its current start). Returns the number of
/// bytes written, a multiple of 4096.
pub fn write<W: Write + Seek>(
    tree: &Tree,
    options: SquashfsOptions,
    out: W,
) -> Result<u64, SquashfsError> {
    write_cached(tree, options, out, &mut DerivedCache::disabled())
}

/// [`write`], taking compressed blocks from `cache` where it has them (and keeping the
/// ones compressed now in it). The bytes written are the same either way.
pub fn write_cached<W: Write + Seek>(
    tree: &Tree,
    options: SquashfsOptions,
    out: W,
    cache: &mut DerivedCache,
) -> Result<u64, SquashfsError> {
    let _writing = WRITING.lock().unwrap_or_else(|e| e.into_inner());
    *SESSION.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::mem::take(cache));
    let result = write_locked(tree, options, out);
    if let Some(used) = SESSION.lock().unwrap_or_else(|e| e.into_inner()).take() {
        *cache = used;
    }
    result
}

fn write_locked<W: Write + Seek>(
    tree: &Tree,
    options: SquashfsOptions,
    out: W,
) -> Result<u64, SquashfsError> {
    let level = u32::try_from(options.zstd_level)
        .ok()
        .filter(|l| (1..=22).contains(l))
        .ok_or(SquashfsError::Level(options.zstd_level))?;
    let mtime = tree.mtime();
    let mut fs = FilesystemWriter::default();
    fs.set_kind(Kind::new_v4(&CACHING));
    fs.set_block_size(BLOCK_SIZE);
    fs.set_time(mtime);
    fs.set_root_mode(0o755);
    fs.set_root_uid(0);
    fs.set_root_gid(0);
    fs.set_only_root_id();
    let compressor = FilesystemCompressor::new(
        Compressor::Zstd,
        Some(CompressionOptions::Zstd(Zstd {
            compression_level: level,
        })),
    )
    .map_err(SquashfsError::Write)?;
    fs.set_compressor(compressor);
    fs.set_kib_padding(4);

    for (path, entry) in tree.iter() {
        let header = NodeHeader::new(entry.mode(), 0, 0, mtime);
        let added = match entry.node() {
            Node::Dir => fs.push_dir(path, header),
            Node::File(data) => fs.push_file(Cursor::new(data.as_slice()), path, header),
            Node::Symlink(target) => fs.push_symlink(target, path, header),
        };
        added.map_err(|source| SquashfsError::Add {
            path: path.to_string(),
            source,
        })?;
    }
    let (_, written) = fs.write(out).map_err(SquashfsError::Write)?;
    Ok(written)
}

/// Write `tree` as a squashfs image in memory.
pub fn to_vec(tree: &Tree, options: SquashfsOptions) -> Result<Vec<u8>, SquashfsError> {
    to_vec_cached(tree, options, &mut DerivedCache::disabled())
}

/// [`to_vec`] with a block cache (see [`write_cached`]).
pub fn to_vec_cached(
    tree: &Tree,
    options: SquashfsOptions,
    cache: &mut DerivedCache,
) -> Result<Vec<u8>, SquashfsError> {
    let mut out = Cursor::new(Vec::new());
    write_cached(tree, options, &mut out, cache)?;
    Ok(out.into_inner())
}

/// One entry listed from a squashfs image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedEntry {
    /// Path relative to the root (the root itself is not listed).
    pub path: String,
    /// What it is: `dir`, `file`, `symlink` or `other`.
    pub kind: &'static str,
    /// Permission bits as stored.
    pub mode: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time.
    pub mtime: u32,
    /// File size (0 for anything but regular files).
    pub size: u64,
}

/// A squashfs image opened for reading.
pub struct SquashfsReader<'b> {
    fs: FilesystemReader<'b>,
    index: HashMap<PathBuf, usize>,
}

impl std::fmt::Debug for SquashfsReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SquashfsReader")
            .field("entries", &self.index.len())
            .finish()
    }
}

/// Strip the root from a backhand path: `/usr/lib` becomes `usr/lib`.
fn relative(path: &Path) -> String {
    path.to_string_lossy().trim_start_matches('/').to_string()
}

impl<'b> SquashfsReader<'b> {
    /// Open the squashfs image that starts `offset` bytes into `reader`.
    pub fn open(reader: impl BufReadSeek + 'b, offset: u64) -> Result<Self, SquashfsError> {
        let fs = FilesystemReader::from_reader_with_offset(reader, offset)
            .map_err(SquashfsError::Open)?;
        let index = fs
            .files()
            .enumerate()
            .map(|(i, node)| (node.fullpath.clone(), i))
            .collect();
        Ok(SquashfsReader { fs, index })
    }

    /// Every entry except the root, in path order.
    pub fn list(&self) -> Vec<ListedEntry> {
        let mut out: Vec<ListedEntry> = self
            .fs
            .files()
            .filter(|node| node.fullpath != Path::new("/"))
            .map(|node| {
                let (kind, size) = match &node.inner {
                    InnerNode::Dir(_) => ("dir", 0),
                    InnerNode::File(file) => ("file", file.file_len() as u64),
                    InnerNode::Symlink(_) => ("symlink", 0),
                    _ => ("other", 0),
                };
                ListedEntry {
                    path: relative(&node.fullpath),
                    kind,
                    mode: node.header.permissions,
                    uid: node.header.uid,
                    gid: node.header.gid,
                    mtime: node.header.mtime,
                    size,
                }
            })
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }

    /// Resolve `path` (relative or absolute, inside the image) following symlinks in
    /// every component, as the kernel would with this image as `/`.
    fn resolve(&self, path: &str) -> Result<usize, SquashfsError> {
        let not_found = || SquashfsError::NotFound {
            path: path.to_string(),
        };
        let mut pending: Vec<String> = path
            .split('/')
            .rev()
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect();
        let mut current = PathBuf::from("/");
        let mut hops = 0;
        while let Some(component) = pending.pop() {
            match component.as_str() {
                "." => continue,
                ".." => {
                    current.pop();
                    continue;
                }
                _ => {}
            }
            let candidate = current.join(&component);
            let index = *self.index.get(&candidate).ok_or_else(not_found)?;
            let node = self.fs.root.nodes.get(index).ok_or_else(not_found)?;
            if let InnerNode::Symlink(link) = &node.inner {
                hops += 1;
                if hops > 40 {
                    return Err(SquashfsError::SymlinkLoop {
                        path: path.to_string(),
                    });
                }
                if link.link.is_absolute() {
                    current = PathBuf::from("/");
                }
                for part in link.link.components().rev() {
                    match part {
                        Component::Normal(p) => pending.push(p.to_string_lossy().into_owned()),
                        Component::ParentDir => pending.push("..".into()),
                        Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
                    }
                }
            } else {
                current = candidate;
            }
        }
        self.index.get(&current).copied().ok_or_else(not_found)
    }

    /// Read the regular file at `path`, following symlinks.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>, SquashfsError> {
        let index = self.resolve(path)?;
        let node = self
            .fs
            .root
            .nodes
            .get(index)
            .ok_or_else(|| SquashfsError::NotFound {
                path: path.to_string(),
            })?;
        let InnerNode::File(file) = &node.inner else {
            return Err(SquashfsError::NotAFile {
                path: path.to_string(),
            });
        };
        self.read_node(file, path)
    }

    fn read_node(&self, file: &SquashfsFileReader, path: &str) -> Result<Vec<u8>, SquashfsError> {
        let mut data = Vec::with_capacity(file.file_len());
        self.fs
            .file(file)
            .reader()
            .read_to_end(&mut data)
            .map_err(|source| SquashfsError::Read {
                path: path.to_string(),
                source,
            })?;
        Ok(data)
    }

    /// The image's modification time (from the superblock).
    pub fn mtime(&self) -> u32 {
        self.fs.mod_time
    }

    /// Read the whole image back into a [`Tree`] (owners dropped, mtime from the
    /// superblock).
    pub fn to_tree(&self) -> Result<Tree, SquashfsError> {
        let mut tree = Tree::new(self.fs.mod_time);
        for node in self.fs.files() {
            let path = relative(&node.fullpath);
            if path.is_empty() {
                continue;
            }
            let mode = u32::from(node.header.permissions);
            let added = match &node.inner {
                InnerNode::Dir(_) => tree.add_dir(&path, mode),
                InnerNode::File(file) => tree.add_file(&path, mode, self.read_node(file, &path)?),
                InnerNode::Symlink(link) => tree.add_symlink(&path, &link.link.to_string_lossy()),
                _ => continue,
            };
            // Paths that came out of a valid image are valid tree paths.
            if added.is_err() {
                return Err(SquashfsError::NotFound { path });
            }
        }
        Ok(tree)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Tree {
        let mut t = Tree::new(1_700_000_000);
        t.add_file("usr/lib/os-release", 0o644, b"ID=keelson\n".to_vec())
            .unwrap();
        t.add_symlink("etc/os-release", "../usr/lib/os-release")
            .unwrap();
        t.add_symlink("lib", "usr/lib").unwrap();
        t.add_file("sbin/init", 0o755, vec![7u8; 300_000]).unwrap();
        t.add_dir("var", 0o755).unwrap();
        t
    }

    #[test]
    fn round_trips_and_follows_symlinks() {
        let image = to_vec(&sample(), SquashfsOptions::default()).unwrap();
        assert_eq!(image.len() % 4096, 0);
        let reader = SquashfsReader::open(Cursor::new(image), 0).unwrap();
        assert_eq!(
            reader.read_file("/etc/os-release").unwrap(),
            b"ID=keelson\n"
        );
        assert_eq!(reader.read_file("lib/os-release").unwrap(), b"ID=keelson\n");
        assert_eq!(reader.read_file("sbin/init").unwrap().len(), 300_000);
        assert!(matches!(
            reader.read_file("etc/missing"),
            Err(SquashfsError::NotFound { .. })
        ));
        assert!(matches!(
            reader.read_file("var"),
            Err(SquashfsError::NotAFile { .. })
        ));
        let back = reader.to_tree().unwrap();
        let want = sample();
        assert_eq!(
            back.iter().collect::<Vec<_>>(),
            want.iter().collect::<Vec<_>>()
        );
        assert_eq!(back.mtime(), want.mtime());
        let listed = reader.list();
        assert!(listed.iter().all(|e| e.uid == 0 && e.gid == 0));
        assert!(listed.iter().all(|e| e.mtime == 1_700_000_000));
        assert_eq!(reader.mtime(), 1_700_000_000);
    }

    #[test]
    fn bad_level_is_refused() {
        let err = to_vec(&sample(), SquashfsOptions { zstd_level: 0 }).unwrap_err();
        assert!(matches!(err, SquashfsError::Level(0)));
    }
}
