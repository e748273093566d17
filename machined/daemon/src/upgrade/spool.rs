//! The bundle's parts spooled on EPHEMERAL while they arrive (the `transfer` phase), so
//! that nothing is written to the inactive slot or the ESP until the whole bundle has
//! arrived and every part matched its sha256: a tampered, cut or abandoned upload leaves
//! both as they were.
//!
//! The spool is one file, [`SPOOL_FILE`] in [`UpgradePaths::spool`] (a directory of mode
//! 0700, `/var/lib/keelson/upgrade`), holding the parts back to back in the manifest's
//! order. It is removed when the upgrade ends, whatever the outcome ([`Spool`]'s drop),
//! and a spool a power cut or crash left is removed when the engine starts
//! ([`remove_stale`]). Before it is created, [`space_refusal`] makes sure EPHEMERAL can
//! take the parts and still keep [`SPOOL_RESERVE_BYTES`] free.
//!
//! [`UpgradePaths::spool`]: super::UpgradePaths::spool

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use keelson_node_protocol::upgrade::PHASE_TRANSFER;
use keelson_upgrade::manifest::Manifest;

use super::UpgradeError;
use super::install::{BundleReader, PartSink};
use super::progress::Reporter;

/// The spool file's name in its directory.
pub const SPOOL_FILE: &str = "bundle.spool";

/// What EPHEMERAL must keep free beyond the spooled parts (containerd, the kubelet and the
/// logs live there too).
pub const SPOOL_RESERVE_BYTES: u64 = 64 << 20;

/// The spool directory's mode: the bundle is root's alone until it is installed.
const SPOOL_DIR_MODE: u32 = 0o700;

/// Bytes read or written at a time when the spool is copied out.
pub const COPY_CHUNK: usize = 1024 * 1024;

/// Removes the spools (`*.spool`) left in `dir` by an upgrade that a power cut or a crash
/// interrupted; the paths removed. A directory that does not exist has none.
pub fn remove_stale(dir: &Path) -> Vec<PathBuf> {
    let Ok(listing) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for item in listing.flatten() {
        let path = item.path();
        let is_spool = path.extension().is_some_and(|e| e == "spool")
            && item.file_type().is_ok_and(|t| t.is_file());
        if !is_spool {
            continue;
        }
        match fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "upgrade: a stale spool could not be removed");
            }
        }
    }
    removed
}

/// Bytes free for an unprivileged writer on the filesystem that holds `dir` (measured at
/// its nearest existing ancestor: the directory is only created to spool).
pub fn free_bytes(dir: &Path) -> Result<u64, UpgradeError> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let st = nix::sys::statvfs::statvfs(existing).map_err(|e| UpgradeError::Read {
        what: "the free space for the upgrade's spool",
        path: existing.to_owned(),
        source: io::Error::from(e),
    })?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// Why `parts` bytes cannot be spooled in `dir` with `free` bytes free there (and
/// [`SPOOL_RESERVE_BYTES`] kept), if they cannot.
pub fn space_refusal(dir: &Path, parts: u64, free: u64) -> Option<String> {
    let needed = parts.saturating_add(SPOOL_RESERVE_BYTES);
    (free < needed).then(|| {
        format!(
            "the bundle is received into {} on EPHEMERAL before anything is installed: it needs {} ({} of parts and {} kept free) but only {} are free there; free space on /var (unused container images, pods' logs), then try again",
            dir.display(),
            size_text(needed),
            size_text(parts),
            size_text(SPOOL_RESERVE_BYTES),
            size_text(free)
        )
    })
}

/// `bytes` for people: `62914560 bytes (60.0 MiB)`.
pub fn size_text(bytes: u64) -> String {
    let tenths_of_mib = bytes.saturating_mul(10) / (1 << 20);
    format!(
        "{bytes} bytes ({}.{} MiB)",
        tenths_of_mib / 10,
        tenths_of_mib % 10
    )
}

/// The spool file, removed when dropped.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    file: File,
}

impl Spool {
    /// Creates (or empties) the spool in `dir`, creating `dir` with mode 0700.
    pub fn create(dir: &Path) -> Result<Spool, UpgradeError> {
        let err = |what: &str, path: &Path| {
            let (what, path) = (what.to_owned(), path.to_owned());
            move |source| UpgradeError::Spool { what, path, source }
        };
        fs::create_dir_all(dir).map_err(err("create the directory of", dir))?;
        // Its mode is changed only when it must be: a directory made at an earlier boot
        // may be root's (machined ran as root before it had a user of its own), and only
        // its owner, or `CAP_FOWNER`, which machined does not have, may change it.
        let mode = fs::metadata(dir)
            .map_err(err("read the mode of the directory of", dir))?
            .permissions()
            .mode();
        if mode & 0o7777 != SPOOL_DIR_MODE {
            fs::set_permissions(dir, fs::Permissions::from_mode(SPOOL_DIR_MODE))
                .map_err(err("set the mode of the directory of", dir))?;
        }
        let path = dir.join(SPOOL_FILE);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&path)
            .map_err(err("create", &path))?;
        Ok(Spool { path, file })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Copies `len` bytes from `offset` of the spool to `write`, in [`COPY_CHUNK`]s,
    /// calling `copied` with the bytes copied after each.
    pub fn copy_out(
        &self,
        offset: u64,
        len: u64,
        mut write: impl FnMut(&[u8]) -> Result<(), UpgradeError>,
        mut copied: impl FnMut(u64),
    ) -> Result<(), UpgradeError> {
        let mut buf = vec![0u8; COPY_CHUNK];
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done).map_or(COPY_CHUNK, |left| left.min(COPY_CHUNK));
            self.file
                .read_exact_at(&mut buf[..n], offset.saturating_add(done))
                .map_err(|source| UpgradeError::Spool {
                    what: "read".into(),
                    path: self.path.clone(),
                    source,
                })?;
            write(&buf[..n])?;
            done += n as u64;
            copied(done);
        }
        Ok(())
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        match fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "upgrade: the spool could not be removed; it is removed when machined starts");
            }
        }
    }
}

/// Reads the rest of the bundle into `spool` (the `transfer` phase, reported in bytes of
/// the whole bundle), parsed, hashed and written on a blocking thread so the runtime keeps
/// serving and receiving. Returns once the bundle ended, nothing followed it, and every
/// part matched its sha256 (the parser checks each at its end): only then may anything
/// be installed.
pub async fn receive(
    reader: &mut BundleReader,
    spool: Spool,
    manifest: &Manifest,
    report: &Reporter,
) -> Result<Spool, UpgradeError> {
    let total = reader.size();
    report
        .say(
            PHASE_TRANSFER,
            reader.received(),
            total,
            &format!(
                "receiving {} of parts into {}; the inactive slot is untouched until every part has matched its sha256",
                size_text(manifest.parts_size()),
                spool.path().display()
            ),
        )
        .await;
    let mut meter = report.meter(PHASE_TRANSFER, total);
    let path = spool.path().to_owned();
    let file = spool
        .file
        .try_clone()
        .map_err(|source| UpgradeError::Spool {
            what: "open".into(),
            path: path.clone(),
            source,
        })?;
    let writer = Appender {
        file,
        path,
        appended: 0,
    };
    let writer = reader.rest_beside(writer, &mut meter).await?;
    if writer.appended != manifest.parts_size() {
        return Err(UpgradeError::Task {
            what: "spool writer",
            reason: format!(
                "it holds {} bytes of parts, the manifest says {}",
                writer.appended,
                manifest.parts_size()
            ),
        });
    }
    meter.update(total).await;
    Ok(spool)
}

/// The spool's writer: appends every part's bytes.
#[derive(Debug)]
struct Appender {
    file: File,
    path: PathBuf,
    /// Bytes appended.
    appended: u64,
}

impl PartSink for Appender {
    fn part_bytes(&mut self, _part: usize, bytes: &[u8]) -> Result<(), UpgradeError> {
        self.file
            .write_all(bytes)
            .map_err(|source| UpgradeError::Spool {
                what: "write".into(),
                path: self.path.clone(),
                source,
            })?;
        self.appended += bytes.len() as u64;
        Ok(())
    }
}
