//! The bundle read as it arrives ([`BundleReader`] over the sans-IO parser), its parts
//! installed from the spool once all of them arrived and matched ([`write_parts`]: root
//! into the inactive slot's partition, kernel and initramfs into temporary files on the
//! ESP, synced and renamed), and what was written read back ([`verify`]) from the disk,
//! not the page cache ([`readback`]), so a write the disk lost cannot hide behind cached
//! pages.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use keelson_configs::boot::{slot_initrd_path, slot_kernel_path};
use keelson_configs::layout::Slot;
use keelson_node_protocol::upgrade::{PHASE_WRITE, UpgradeRecord};
use keelson_upgrade::bundle::{BundleError, BundleParser, Event, Header, ParserLimits};
use keelson_upgrade::manifest::{Manifest, PART_INITRD, PART_KERNEL, PART_NAMES, PART_ROOT};
use keelson_upgrade::verity::{RootVerifier, VerityError};
use ring::digest;
use tokio::sync::mpsc;

use super::esp::{Esp, commit_temp, create_temp};
use super::facts::Partition;
use super::progress::{Meter, Reporter};
use super::spool::{Spool, size_text};
use super::{BundleSource, UpgradeError, fetch};

mod readback;

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
    /// Bytes received from the stream so far.
    received: u64,
}

/// Where [`BundleReader::rest_beside`] puts the parts' bytes, on the parser's thread.
pub trait PartSink: Send + 'static {
    /// The next bytes of part `part`, in order. They are not checked yet: a part is good
    /// only once the whole bundle was read.
    fn part_bytes(&mut self, part: usize, bytes: &[u8]) -> Result<(), UpgradeError>;
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
            received: 0,
        }
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
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
                return Err(parser_error(
                    self.parser.consumed(),
                    self.parser.finish().err(),
                ));
            };
            self.feed(&chunk)?;
        }
    }

    async fn recv(&mut self) -> Result<Option<Bytes>, UpgradeError> {
        if self.ended {
            return Ok(None);
        }
        match self.chunks.recv().await {
            Some(Ok(chunk)) => {
                self.received = self.received.saturating_add(chunk.len() as u64);
                Ok(Some(chunk))
            }
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
            Err(e) => return Err(parser_error(self.parser.consumed(), Some(e))),
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

    /// Reads to the end of the stream: nothing may follow the bundle.
    async fn drain(&mut self) -> Result<(), UpgradeError> {
        while let Some(chunk) = self.recv().await? {
            self.feed(&chunk)?;
        }
        Ok(())
    }

    /// The rest of the bundle after its header, received on this task and parsed on a
    /// blocking thread that gives the parts' bytes to `sink` there: the parser's sha256 of
    /// each part is the transfer's largest cost after its TLS, and the two then run side
    /// by side. `meter` is told the bytes received. Returns `sink` once the stream ended,
    /// nothing followed the bundle, and every part matched its sha256.
    pub async fn rest_beside<S: PartSink>(
        &mut self,
        sink: S,
        meter: &mut Meter,
    ) -> Result<S, UpgradeError> {
        let pending: Vec<Piece> = self.pending.drain(..).collect();
        let parser =
            std::mem::replace(&mut self.parser, BundleParser::new(ParserLimits::default()));
        let (tx, rx) = mpsc::channel::<Bytes>(PARSE_QUEUE);
        let task = tokio::task::spawn_blocking(move || parse_rest(parser, pending, rx, sink));
        let mut stream = Ok(());
        loop {
            match self.recv().await {
                Ok(Some(chunk)) => {
                    if tx.send(chunk).await.is_err() {
                        // The parser stopped: its error is the one to report.
                        break;
                    }
                    meter.update(self.received).await;
                }
                Ok(None) => break,
                Err(e) => {
                    stream = Err(e);
                    break;
                }
            }
        }
        drop(tx);
        let (parser, parsed) = task.await.map_err(|e| UpgradeError::Task {
            what: "bundle parser",
            reason: e.to_string(),
        })?;
        self.parser = parser;
        // A broken stream comes first: the parser then only saw the bundle cut short.
        stream?;
        parsed
    }
}

/// Chunks received and not yet parsed.
const PARSE_QUEUE: usize = 16;

/// The parser's thread of [`BundleReader::rest_beside`]: the pieces already parsed, then
/// every chunk until the stream ends; gives the parser back with the outcome.
fn parse_rest<S: PartSink>(
    mut parser: BundleParser,
    pending: Vec<Piece>,
    mut chunks: mpsc::Receiver<Bytes>,
    mut sink: S,
) -> (BundleParser, Result<S, UpgradeError>) {
    let start = Instant::now();
    let mut busy = Duration::ZERO;
    let parse = || -> Result<(), UpgradeError> {
        for piece in pending {
            if let Piece::Data { part, bytes } = piece {
                sink.part_bytes(part, &bytes)?;
            }
        }
        while let Some(chunk) = chunks.blocking_recv() {
            let t = Instant::now();
            let events = parser
                .feed(&chunk)
                .map_err(|e| parser_error(parser.consumed(), Some(e)))?;
            for event in events {
                if let Event::PartData { part, bytes } = event {
                    sink.part_bytes(part, bytes)?;
                }
            }
            busy += t.elapsed();
        }
        // The stream ended: the bundle must have, whole, with nothing after it.
        parser
            .finish()
            .map_err(|e| parser_error(parser.consumed(), Some(e)))
    };
    let outcome = parse();
    if outcome.is_ok() {
        tracing::info!(
            bytes = parser.consumed(),
            took_ms = start.elapsed().as_millis(),
            parsing_ms = busy.as_millis(),
            "upgrade transfer: the bundle parsed, hashed and spooled"
        );
    }
    (parser, outcome.map(|()| sink))
}

/// The error for what the parser said after `received` bytes (`None`: the stream ended
/// although the parser had nothing against the bundle).
fn parser_error(received: u64, e: Option<BundleError>) -> UpgradeError {
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

/// Reads back what was written, from the disk rather than the page cache
/// ([`readback`]), and checks it against the manifest: each part's sha256, and the root's
/// verity tree recomputed from its data blocks, both from one read of the root.
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
        let verity_err = |e: VerityError| UpgradeError::Verify {
            part: "root".into(),
            path: path.clone(),
            what: "verity tree",
            expected: manifest.verity.roothash.clone(),
            actual: keelson_api::error_chain(&e),
        };
        let read_err = |source| UpgradeError::Write {
            what: format!("read back part {}", PART_NAMES[index]),
            path: path.clone(),
            source,
        };
        let mut sha256 = digest::Context::new(&digest::SHA256);
        let (mode, tree) = if index == PART_ROOT {
            let tree = RootVerifier::new(&manifest.verity).map_err(verity_err)?;
            let (mode, tree) =
                read_hashing_beside(path, part.size, &mut sha256, tree).map_err(read_err)?;
            (mode, Some(tree))
        } else {
            let mode = readback::read_prefix(path, part.size, |bytes| sha256.update(bytes))
                .map_err(read_err)?;
            (mode, None)
        };
        tracing::debug!(part = PART_NAMES[index], path = %path.display(), ?mode, "upgrade verify: read back");
        let actual = hex(sha256.finish().as_ref());
        if actual != part.sha256 {
            return Err(UpgradeError::Verify {
                part: PART_NAMES[index].into(),
                path: path.clone(),
                what: "sha256",
                expected: part.sha256.clone(),
                actual,
            });
        }
        if let Some(tree) = tree {
            tree.finish().map_err(verity_err)?;
        }
    }
    Ok(())
}

/// Chunks of the root in flight between the reader and the tree's thread.
const TREE_QUEUE: usize = 2;

/// Reads the first `len` bytes of `path` once, hashing them with `sha256` on this thread
/// while `tree` takes a copy of each chunk on a thread of its own: the two hashes are the
/// verify phase's whole cost, and a node has two cores or more.
fn read_hashing_beside(
    path: &Path,
    len: u64,
    sha256: &mut digest::Context,
    mut tree: RootVerifier,
) -> std::io::Result<(readback::ReadMode, RootVerifier)> {
    let start = Instant::now();
    let (mode, tree, sink_busy, tree_busy) = std::thread::scope(|scope| {
        let (to_tree, chunks) = std::sync::mpsc::sync_channel::<Vec<u8>>(TREE_QUEUE);
        let hasher = scope.spawn(move || {
            let mut busy = Duration::ZERO;
            for chunk in chunks {
                let t = Instant::now();
                tree.update(&chunk);
                busy += t.elapsed();
            }
            (tree, busy)
        });
        let mut sink_busy = Duration::ZERO;
        let mode = readback::read_prefix(path, len, |bytes| {
            let t = Instant::now();
            // A send fails only if the tree's thread is gone, which its join reports.
            let _ = to_tree.send(bytes.to_vec());
            sha256.update(bytes);
            sink_busy += t.elapsed();
        });
        drop(to_tree);
        let (tree, tree_busy) = hasher
            .join()
            .map_err(|_| std::io::Error::other("the verity tree's thread panicked"))?;
        std::io::Result::Ok((mode?, tree, sink_busy, tree_busy))
    })?;
    let took = start.elapsed();
    tracing::info!(
        path = %path.display(),
        bytes = len,
        took_ms = took.as_millis(),
        reads_ms = took.saturating_sub(sink_busy).as_millis(),
        sha256_and_queue_ms = sink_busy.as_millis(),
        tree_ms = tree_busy.as_millis(),
        "upgrade verify: root read back"
    );
    Ok((mode, tree))
}

/// The sha256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, bytes).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
