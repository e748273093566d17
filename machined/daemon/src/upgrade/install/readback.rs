//! Reading back what an upgrade wrote from the disk, not from the page cache: with
//! `O_DIRECT` into a 4 KiB-aligned buffer, so the bytes come from the device without a
//! copy through the cache; where `O_DIRECT` is refused (`EINVAL`, at the open or at a
//! read: a filesystem without direct I/O), the file's cached pages are dropped (they are
//! clean: it was synced) and the rest is read buffered.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd as _;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::Path;

use nix::fcntl::{FcntlArg, OFlag, PosixFadviseAdvice, fcntl, posix_fadvise};

/// Bytes read at a time (a multiple of [`ALIGN`]).
pub const CHUNK: usize = 2 * 1024 * 1024;
/// The alignment of direct reads' buffer, offset and length: 4 KiB covers every logical
/// block size of the disks a node boots from (512 or 4096).
const ALIGN: usize = 4096;
/// What a filesystem without direct I/O answers.
const EINVAL: i32 = nix::errno::Errno::EINVAL as i32;

/// How the bytes were read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// `O_DIRECT` throughout.
    Direct,
    /// Buffered after the cache was dropped, from the open or from a refused direct read.
    Buffered,
}

/// Reads the first `len` bytes of `path` in order and gives them to `sink` (in pieces of
/// at most [`CHUNK`] bytes); fewer than `len` bytes in the file is an `UnexpectedEof`.
pub fn read_prefix(path: &Path, len: u64, sink: impl FnMut(&[u8])) -> io::Result<ReadMode> {
    let mut buf = AlignedBuf::new(CHUNK);
    read_prefix_into(path, len, buf.as_mut_slice(), sink)
}

/// [`read_prefix`] with the caller's buffer (whose alignment decides whether the kernel
/// takes direct reads into it).
fn read_prefix_into(
    path: &Path,
    len: u64,
    buf: &mut [u8],
    mut sink: impl FnMut(&[u8]),
) -> io::Result<ReadMode> {
    let (file, mut mode) = open(path)?;
    let mut offset = 0u64;
    while offset < len {
        let left = len - offset;
        let want = match mode {
            // A whole number of aligned blocks, past `len` if it is not aligned.
            ReadMode::Direct => usize::try_from(left).map_or(buf.len(), |left| {
                left.next_multiple_of(ALIGN).min(buf.len())
            }),
            ReadMode::Buffered => usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len())),
        };
        let n = match file.read_at(&mut buf[..want], offset) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if mode == ReadMode::Direct && e.raw_os_error() == Some(EINVAL) => {
                tracing::info!(path = %path.display(), offset, error = %e, "upgrade verify: direct reads refused; reading the rest through the page cache, dropped first");
                clear_direct(&file)?;
                drop_cache(&file);
                mode = ReadMode::Buffered;
                continue;
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the file ends at byte {offset}, {left} bytes short of {len}"),
            ));
        }
        let take = usize::try_from(left).map_or(n, |left| left.min(n));
        sink(&buf[..take]);
        offset += take as u64;
    }
    Ok(mode)
}

/// `path` opened with `O_DIRECT`, or buffered with its cache dropped when the filesystem
/// refuses direct I/O.
fn open(path: &Path) -> io::Result<(File, ReadMode)> {
    let direct = OpenOptions::new()
        .read(true)
        .custom_flags(OFlag::O_DIRECT.bits())
        .open(path);
    match direct {
        Ok(file) => Ok((file, ReadMode::Direct)),
        Err(e) if e.raw_os_error() == Some(EINVAL) => {
            tracing::info!(path = %path.display(), error = %e, "upgrade verify: the filesystem refuses direct reads; reading through the page cache, dropped first");
            let file = File::open(path)?;
            drop_cache(&file);
            Ok((file, ReadMode::Buffered))
        }
        Err(e) => Err(e),
    }
}

/// Turns `O_DIRECT` off on an open file.
fn clear_direct(file: &File) -> io::Result<()> {
    let flags = fcntl(file.as_fd(), FcntlArg::F_GETFL)?;
    let flags = OFlag::from_bits_retain(flags) - OFlag::O_DIRECT;
    fcntl(file.as_fd(), FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// Drops `file`'s pages from the page cache (they are clean: it was synced), so the
/// buffered reads that follow come from the disk. For a block device this is the
/// device's cache.
fn drop_cache(file: &File) {
    if let Err(e) = posix_fadvise(file.as_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED) {
        tracing::warn!(error = %e, "upgrade verify: the page cache could not be dropped; reading through it");
    }
}

/// A byte buffer whose start is [`ALIGN`]-aligned: a slice of a vector one alignment
/// longer, at the first aligned address in it.
struct AlignedBuf {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let bytes = vec![0u8; len + ALIGN];
        let addr = bytes.as_ptr().addr();
        let start = addr.next_multiple_of(ALIGN) - addr;
        AlignedBuf { bytes, start, len }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 13 % 253) as u8).collect()
    }

    /// The prefix of `len` bytes read from `path` with `buf`: the bytes and the mode.
    fn read(path: &Path, len: u64, buf: &mut [u8]) -> io::Result<(Vec<u8>, ReadMode)> {
        let mut out = Vec::new();
        let mode = read_prefix_into(path, len, buf, |b| {
            assert!(!b.is_empty() && b.len() <= CHUNK);
            out.extend_from_slice(b);
        })?;
        Ok((out, mode))
    }

    #[test]
    fn a_file_on_a_disk_is_read_direct_to_any_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("part");
        // Longer than two chunks, and not a whole number of blocks.
        let bytes = content(2 * CHUNK + 3 * ALIGN + 1000);
        std::fs::write(&path, &bytes).unwrap();
        let mut buf = AlignedBuf::new(CHUNK);
        for len in [bytes.len(), bytes.len() - 1000, CHUNK + 17, 1, 0] {
            let (read, mode) = read(&path, len as u64, buf.as_mut_slice()).unwrap();
            assert_eq!(
                mode,
                ReadMode::Direct,
                "{} refuses O_DIRECT: run the tests with TMPDIR on a disk's filesystem",
                path.display()
            );
            assert!(read == bytes[..len], "{len} bytes");
        }
        let err = read(&path, bytes.len() as u64 + 1, buf.as_mut_slice()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("1 bytes short"), "{err}");
    }

    #[test]
    fn a_refused_direct_read_goes_on_buffered_from_where_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("part");
        let bytes = content(3 * ALIGN + 5);
        std::fs::write(&path, &bytes).unwrap();
        // A buffer off the alignment by one byte: the kernel refuses direct reads into it.
        let mut buf = AlignedBuf::new(CHUNK + ALIGN);
        let misaligned = &mut buf.as_mut_slice()[1..=CHUNK];
        let (read, mode) = read(&path, bytes.len() as u64, misaligned).unwrap();
        assert_eq!(mode, ReadMode::Buffered);
        assert!(read == bytes);
    }

    #[test]
    fn a_filesystem_without_direct_io_is_read_buffered() {
        // procfs refuses O_DIRECT at the open.
        let path = Path::new("/proc/version");
        let whole = std::fs::read(path).unwrap();
        let len = 100.min(whole.len());
        let (read, mode) = read(path, len as u64, AlignedBuf::new(CHUNK).as_mut_slice()).unwrap();
        assert_eq!(mode, ReadMode::Buffered);
        assert!(read == whole[..len]);
    }
}
