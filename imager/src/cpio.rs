//! A newc ("SVR4 with no CRC") cpio writer for the initramfs, the format the kernel
//! unpacks into its rootfs.
//!
//! Hand-written: the format is a 110-byte ASCII header per entry plus 4-byte padding, and
//! writing it ourselves keeps every field under our control for reproducibility: inode
//! numbers are assigned 1, 2, 3... in write order, owners are 0:0, every mtime is the one
//! given, device numbers are 0 (except for device nodes), and the archive ends with the
//! `TRAILER!!!` entry. Compression (zstd; Debian's kernels set `CONFIG_RD_ZSTD=y`) is in
//! [`crate::compress`].

use std::io::{self, Write};

use crate::rootfs::{Node, Tree};

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Errors from writing a cpio archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// Writing to the output failed.
    #[error("cannot write the initramfs cpio archive")]
    Write(#[source] io::Error),
    /// A name or file is too large for the format's 32-bit fields.
    #[error("{path:?} is too large for a newc cpio archive (4 GiB limit)")]
    TooLarge {
        /// The entry's path.
        path: String,
    },
    /// A path is empty or contains NUL.
    #[error("invalid cpio path {path:?}: use a non-empty relative path without NUL bytes")]
    InvalidPath {
        /// The path.
        path: String,
    },
}

/// Streams a newc cpio archive to `W`. Call [`CpioWriter::finish`] to write the trailer.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    mtime: u32,
    next_ino: u32,
    written: u64,
}

/// The fields of one header that vary.
struct Header<'a> {
    name: &'a str,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    size: u32,
    rdev: (u32, u32),
}

impl<W: Write> CpioWriter<W> {
    /// Start an archive whose entries all carry `mtime`.
    pub fn new(out: W, mtime: u32) -> Self {
        CpioWriter {
            out,
            mtime,
            next_ino: 1,
            written: 0,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), CpioError> {
        self.out.write_all(bytes).map_err(CpioError::Write)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<(), CpioError> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    fn header(&mut self, h: &Header<'_>) -> Result<(), CpioError> {
        let namesize = u32::try_from(h.name.len() + 1).map_err(|_| CpioError::TooLarge {
            path: h.name.to_string(),
        })?;
        let text = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            h.ino, h.mode, 0, 0, h.nlink, h.mtime, h.size, 0, 0, h.rdev.0, h.rdev.1, namesize, 0
        );
        self.put(text.as_bytes())?;
        self.put(h.name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        data: &[u8],
        rdev: (u32, u32),
    ) -> Result<(), CpioError> {
        let name = path.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') {
            return Err(CpioError::InvalidPath {
                path: path.to_string(),
            });
        }
        let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge {
            path: path.to_string(),
        })?;
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        let header = Header {
            name,
            ino: self.next_ino,
            mode,
            nlink,
            mtime: self.mtime,
            size,
            rdev,
        };
        self.next_ino += 1;
        self.header(&header)?;
        self.put(data)?;
        self.pad()
    }

    /// Add a directory. Parents must be added first (the kernel does not create them).
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<(), CpioError> {
        self.entry(path, S_IFDIR | (mode & 0o7777), &[], (0, 0))
    }

    /// Add a regular file.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), CpioError> {
        self.entry(path, S_IFREG | (mode & 0o7777), data, (0, 0))
    }

    /// Add a symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        self.entry(path, S_IFLNK | 0o777, target.as_bytes(), (0, 0))
    }

    /// Add a character device node (e.g. `dev/console`, 5:1, so that the kernel can
    /// give `/init` a console before anything mounts devtmpfs).
    pub fn char_device(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.entry(path, S_IFCHR | (mode & 0o7777), &[], (major, minor))
    }

    /// Add every entry of `tree`, parents first.
    pub fn tree(&mut self, tree: &Tree) -> Result<(), CpioError> {
        for (path, entry) in tree.iter() {
            let mode = u32::from(entry.mode());
            match entry.node() {
                Node::Dir => self.dir(path, mode)?,
                Node::File(data) => self.file(path, mode, data)?,
                Node::Symlink(target) => self.symlink(path, target)?,
            }
        }
        Ok(())
    }

    /// Write the `TRAILER!!!` entry and return the output.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.header(&Header {
            name: "TRAILER!!!",
            ino: 0,
            mode: 0,
            nlink: 1,
            mtime: 0,
            size: 0,
            rdev: (0, 0),
        })?;
        self.out.flush().map_err(CpioError::Write)?;
        Ok(self.out)
    }
}

/// The whole of `tree` as an uncompressed newc archive (entries carry the tree's mtime).
pub fn archive(tree: &Tree) -> Result<Vec<u8>, CpioError> {
    let mut w = CpioWriter::new(Vec::new(), tree.mtime());
    w.tree(tree)?;
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_and_padding() {
        let mut w = CpioWriter::new(Vec::new(), 0x10);
        w.file("init", 0o755, b"abcde").unwrap();
        let out = w.finish().unwrap();
        let header = std::str::from_utf8(&out[..110]).unwrap();
        let fields = [1, 0o100755, 0, 0, 1, 0x10, 5, 0, 0, 0, 0, 5, 0];
        let want: String = fields.iter().map(|f| format!("{f:08x}")).collect();
        assert_eq!(header, format!("070701{want}"));
        // 110 + "init\0" = 115, padded to 116; data 5 padded to 8.
        assert_eq!(&out[110..116], b"init\0\0");
        assert_eq!(&out[116..124], b"abcde\0\0\0");
        assert_eq!(&out[124 + 110..124 + 110 + 11], b"TRAILER!!!\0");
        assert_eq!(out.len() % 4, 0);
    }

    #[test]
    fn refuses_empty_names() {
        let mut w = CpioWriter::new(Vec::new(), 0);
        assert!(matches!(
            w.dir("/", 0o755),
            Err(CpioError::InvalidPath { .. })
        ));
    }
}
