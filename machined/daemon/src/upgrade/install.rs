//! The bundle read as it arrives ([`BundleReader`] over the sans-IO parser), its parts
//! installed from the spool once all of them arrived and matched ([`write_parts`]: root
//! into the inactive slot's partition, kernel and initramfs into temporary files on the
//! ESP, synced and renamed), and what was written read back ([`verify`]) with the page
//! cache dropped, so a write the disk lost cannot hide behind cached pages.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use hyper::body::Bytes;
use keelson_configs::boot::{slot_initrd_path, slot_kernel_path};
use keelson_configs::layout::Slot;
use keelson_node_protocol::upgrade::{PHASE_WRITE, UpgradeRecord};
use keelson_upgrade::bundle::{BundleError, BundleParser, Event, Header, ParserLimits};
use keelson_upgrade::manifest::{Manifest, PART_INITRD, PART_KERNEL, PART_NAMES, PART_ROOT};
use ring::digest;
use tokio::sync::mpsc;

use super::esp::{Esp, commit_temp, create_temp};
use super::facts::Partition;
use super::progress::{Meter, Reporter};
use super::spool::{Spool, size_text};
use super::{BundleSource, UpgradeError, fetch};

/// Bytes read at a time when verifying.
const READ_CHUNK: usize = 1024 * 1024;

/// What the checks decided: where the upgrade goes.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The inactive slot.
    pub target: Slot,
    /// Its root partition.
    pub partition: Partition,
    /// The running version.
    pub running_version: String,
    /// STATE's record before the attempt.
    pub record: UpgradeRecord,
}

/// A parser event that owns its bytes (a slice of the received chunk, not a copy).
#[derive(Debug)]
pub enum Piece {
    /// The header.
    Header(Box<Header>),
    /// Bytes of a part, not yet checked.
    Data {
        /// The part's index.
        part: usize,
        /// The bytes.
        bytes: Bytes,
    },
    /// A part ended and matched its sha256.
    PartEnd {
        /// The part's index.
        part: usize,
    },
    /// The bundle ended.
    End,
}

/// The bundle's bytes as they arrive, parsed.
#[derive(Debug)]
pub struct BundleReader {
    chunks: mpsc::Receiver<Result<Bytes, String>>,
    url: Option<String>,
    size: u64,
    parser: BundleParser,
    pending: VecDeque<Piece>,
    ended: bool,
}

impl BundleReader {
    /// A reader of `source` (a URL starts its fetch).
    pub fn new(source: BundleSource) -> BundleReader {
        let (chunks, url, size) = match source {
            BundleSource::Stream { chunks, size } => (chunks, None, size),
            BundleSource::Url(url) => (fetch::spawn(url.clone()), Some(url), 0),
        };
        BundleReader {
            chunks,
            url,
            size,
            parser: BundleParser::new(ParserLimits::default()),
            pending: VecDeque::new(),
            ended: false,
        }
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.parser.consumed()
    }

    /// The bundle's size: the header's once read, else what the sender said (0: unknown).
    pub fn size(&self) -> u64 {
        self.parser.bundle_size().unwrap_or(self.size)
    }

    /// The size the sender announced (0: none).
    pub fn announced_size(&self) -> u64 {
        self.size
    }

    /// Reads until the header is complete.
    pub async fn header(&mut self) -> Result<Box<Header>, UpgradeError> {
        match self.next().await? {
            Piece::Header(h) => Ok(h),
            other => Err(UpgradeError::Task {
                what: "bundle reader",
                reason: format!("the parser gave {other:?} before the header"),
            }),
        }
    }

    /// The next piece of the bundle. After [`Piece::End`] it reads to the stream's end,
    /// so that a byte after the bundle refuses it.
    pub async fn next(&mut self) -> Result<Piece, UpgradeError> {
        loop {
            if let Some(p) = self.pending.pop_front() {
                if matches!(p, Piece::End) {
                    self.drain().await?;
                }
                return Ok(p);
            }
            let chunk = self.recv().await?;
            let Some(chunk) = chunk else {
                return Err(self.parser_error(self.parser.finish().err()));
            };
            self.feed(&chunk)?;
        }
    }

    async fn recv(&mut self) -> Result<Option<Bytes>, UpgradeError> {
        if self.ended {
            return Ok(None);
        }
        match self.chunks.recv().await {
            Some(Ok(chunk)) => Ok(Some(chunk)),
            None => {
                self.ended = true;
                Ok(None)
            }
            Some(Err(reason)) => Err(match &self.url {
                Some(url) => UpgradeError::Fetch {
                    url: url.clone(),
                    reason,
                },
                None => UpgradeError::Transfer {
                    received: self.received(),
                    reason,
                },
            }),
        }
    }

    fn feed(&mut self, chunk: &Bytes) -> Result<(), UpgradeError> {
        let events = match self.parser.feed(chunk) {
            Ok(events) => events,
            Err(e) => return Err(self.parser_error(Some(e))),
        };
        for event in events {
            self.pending.push_back(match event {
                Event::Header(h) => Piece::Header(h),
                Event::PartData { part, bytes } => Piece::Data {
                    part,
                    bytes: chunk.slice_ref(bytes),
                },
                Event::PartEnd { part } => Piece::PartEnd { part },
                Event::End => Piece::End,
            });
        }
        Ok(())
    }

    /// After [`Piece::End`]: the parser's own word that the bundle is whole.
    pub fn finish(&self) -> Result<(), UpgradeError> {
        self.parser.finish().map_err(|e| self.parser_error(Some(e)))
    }

    /// Reads to the end of the stream: nothing may follow the bundle.
    async fn drain(&mut self) -> Result<(), UpgradeError> {
        while let Some(chunk) = self.recv().await? {
            self.feed(&chunk)?;
        }
        Ok(())
    }

    fn parser_error(&self, e: Option<BundleError>) -> UpgradeError {
        let received = self.received();
        match e {
            Some(e @ (BundleError::Truncated { .. } | BundleError::TruncatedHeader { .. })) => {
                UpgradeError::Truncated {
                    received,
                    source: e,
                }
            }
            Some(e) => UpgradeError::BadBundle {
                at: received,
                source: e,
            },
            None => UpgradeError::Task {
                what: "bundle reader",
                reason: "the stream ended although the bundle was complete".into(),
            },
        }
    }
}

/// Where the parts went.
#[derive(Debug, Clone)]
pub struct Written {
    /// The slot's partition.
    pub device: PathBuf,
    /// The kernel on the ESP.
    pub kernel: PathBuf,
    /// The initramfs on the ESP.
    pub initrd: PathBuf,
}

/// Installs the parts from the spool (the `write` phase, reported in bytes of all the
/// parts): root at the start of the inactive slot's partition, synced; the kernel and
/// initramfs into temporary files on the ESP, synced and renamed. On a blocking task, so
/// the runtime keeps serving; the spool is removed when it ends, whatever the outcome.
/// The caller deleted the slot's entry first.
pub async fn write_parts(
    spool: Spool,
    plan: &Plan,
    manifest: &Manifest,
    esp: &Esp,
    report: &Reporter,
) -> Result<Written, UpgradeError> {
    let written = Written {
        device: plan.partition.device.clone(),
        kernel: esp.file(&slot_kernel_path(plan.target)),
        initrd: esp.file(&slot_initrd_path(plan.target)),
    };
    let total = manifest.parts_size();
    report
        .say(
            PHASE_WRITE,
            0,
            total,
            &format!(
                "writing root ({}) into {}, then the kernel and initramfs into {}",
                size_text(manifest.parts[PART_ROOT].size),
                written.device.display(),
                parent(&written.kernel).display()
            ),
        )
        .await;
    let mut meter = report.meter(PHASE_WRITE, total);
    let sizes: Vec<u64> = manifest.parts.iter().map(|p| p.size).collect();
    let to = written.clone();
    tokio::task::spawn_blocking(move || copy_parts(spool, &sizes, &to, &mut meter))
        .await
        .map_err(|e| UpgradeError::Task {
            what: "writer",
            reason: e.to_string(),
        })??;
    Ok(written)
}

/// The writer task: each part copied out of the spool (where they lie back to back, of
/// `sizes`) to where it goes.
fn copy_parts(
    spool: Spool,
    sizes: &[u64],
    to: &Written,
    meter: &mut Meter,
) -> Result<(), UpgradeError> {
    let root_err = |what: &str| {
        let (what, path) = (what.to_owned(), to.device.clone());
        move |source| UpgradeError::Write { what, path, source }
    };
    let mut offset = 0u64;
    for (index, size) in sizes.iter().copied().enumerate() {
        let before = offset;
        let mut copied = |done: u64| meter.update_blocking(before + done);
        match index {
            PART_ROOT => {
                // O_EXCL on a block device: refused while anything has it open
                // exclusively (mounted).
                let mut root = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(nix::fcntl::OFlag::O_EXCL.bits())
                    .open(&to.device)
                    .map_err(root_err("open for writing"))?;
                let write = |bytes: &[u8]| {
                    root.write_all(bytes)
                        .map_err(root_err("write part root to"))
                };
                spool.copy_out(offset, size, write, &mut copied)?;
                root.flush().map_err(root_err("write part root to"))?;
                root.sync_all().map_err(root_err("sync"))?;
            }
            PART_KERNEL | PART_INITRD => {
                let dest = if index == PART_KERNEL {
                    &to.kernel
                } else {
                    &to.initrd
                };
                let mut temp = EspTemp::create(dest)?;
                spool.copy_out(offset, size, |bytes| temp.write(bytes), &mut copied)?;
                temp.commit()?;
            }
            _ => {}
        }
        offset = offset.saturating_add(size);
    }
    Ok(())
}

/// A temporary file on the ESP for a part, removed unless it was renamed into place.
struct EspTemp {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
}

impl EspTemp {
    fn create(dest: &Path) -> Result<EspTemp, UpgradeError> {
        let dir = parent(dest);
        let name = file_name(dest);
        let (file, tmp) = create_temp(dir, &name).map_err(|source| UpgradeError::Write {
            what: "create a file in".into(),
            path: dir.to_owned(),
            source,
        })?;
        Ok(EspTemp {
            file: Some(file),
            tmp,
            dest: dest.to_owned(),
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), UpgradeError> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        file.write_all(bytes).map_err(|source| UpgradeError::Write {
            what: "write".into(),
            path: self.tmp.clone(),
            source,
        })
    }

    fn commit(&mut self) -> Result<(), UpgradeError> {
        let Some(file) = self.file.take() else {
            return Ok(());
        };
        commit_temp(file, &self.tmp, parent(&self.dest), &file_name(&self.dest))
    }
}

impl Drop for EspTemp {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("/"))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads back what was written (page cache dropped first) and checks it against the
/// manifest: each part's sha256, and the root's verity tree recomputed from its data
/// blocks.
pub async fn verify(written: Written, manifest: &Manifest) -> Result<(), UpgradeError> {
    let manifest = manifest.clone();
    tokio::task::spawn_blocking(move || verify_blocking(&written, &manifest))
        .await
        .map_err(|e| UpgradeError::Task {
            what: "verifier",
            reason: e.to_string(),
        })?
}

fn verify_blocking(written: &Written, manifest: &Manifest) -> Result<(), UpgradeError> {
    let places = [
        (PART_ROOT, &written.device),
        (PART_KERNEL, &written.kernel),
        (PART_INITRD, &written.initrd),
    ];
    for (index, path) in places {
        let part = &manifest.parts[index];
        let read_err = |source| UpgradeError::Write {
            what: format!("read back part {}", PART_NAMES[index]),
            path: path.clone(),
            source,
        };
        let file = File::open(path).map_err(read_err)?;
        drop_cache(&file);
        let actual = sha256_prefix(&file, part.size).map_err(read_err)?;
        if actual != part.sha256 {
            return Err(UpgradeError::Verify {
                part: PART_NAMES[index].into(),
                path: path.clone(),
                what: "sha256",
                expected: part.sha256.clone(),
                actual,
            });
        }
        if index == PART_ROOT {
            let read_at = |offset: u64, buf: &mut [u8]| file.read_exact_at(buf, offset);
            keelson_upgrade::verity::verify_root(read_at, &manifest.verity).map_err(|e| {
                UpgradeError::Verify {
                    part: "root".into(),
                    path: path.clone(),
                    what: "verity tree",
                    expected: manifest.verity.roothash.clone(),
                    actual: keelson_api::error_chain(&e),
                }
            })?;
        }
    }
    Ok(())
}

/// Drops `file`'s pages from the page cache (they are clean: it was synced), so the
/// reads that follow come from the disk. For a block device this is the device's cache.
fn drop_cache(file: &File) {
    let dropped = nix::fcntl::posix_fadvise(
        file.as_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
    if let Err(e) = dropped {
        tracing::warn!(error = %e, "upgrade verify: the page cache could not be dropped; reading through it");
    }
}

/// The sha256 (hex) of the first `len` bytes of `file`.
fn sha256_prefix(file: &File, len: u64) -> std::io::Result<String> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut left = len;
    let mut reader = file.take(len);
    while left > 0 {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{left} bytes short of {len}"),
            ));
        }
        ctx.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(hex(ctx.finish().as_ref()))
}

/// The sha256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, bytes).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
