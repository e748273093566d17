//! Reading `.deb` files in Rust: the outer `ar` archive, then `data.tar` compressed
//! with xz, zstd or gzip (or not at all), into a list of [`Entry`]s (directories,
//! regular files with their bytes, symlinks) that the root filesystem builder filters
//! and places. Maintainer scripts are never run: `control.tar` is not even read.
//!
//! The `ar` reader is written here: a `.deb`'s ar container is a fixed 8-byte magic and
//! 60-byte member headers, and the only `ar` crate is unmaintained.
//!
//! Hard links are resolved into copies of their target's bytes, and device nodes and
//! FIFOs (which no package we take ships) are skipped, so entries can be placed
//! anywhere without root. [`unpack`] writes entries into a directory tree, keeping
//! modes but not owners.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// A `.deb` that cannot be read or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum DebError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is not a valid `.deb`.
    #[error(
        "{path} is not a valid .deb ({problem}); delete it (the cache fetches it again) or run `cargo xtask lock`"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The data archive inside could not be decompressed or read.
    #[error(
        "{path}: cannot read its {member}; the .deb is corrupt: delete it (the cache fetches it again) or run `cargo xtask lock`"
    )]
    Data {
        /// The file.
        path: PathBuf,
        /// The ar member (`data.tar.xz`).
        member: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Writing the unpacked tree failed.
    #[error("cannot write {path} while unpacking; check the disk (space, permissions)")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An entry would land outside the target directory.
    #[error(
        "entry `{entry}` would be written through the symlink {through}; refusing to unpack outside {root}"
    )]
    Escape {
        /// The entry path.
        entry: String,
        /// The symlink in the way.
        through: PathBuf,
        /// The target directory.
        root: PathBuf,
    },
}

/// What an entry is.
#[derive(Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file and its bytes (hard links arrive as copies).
    File(Vec<u8>),
    /// A symbolic link and its target, as written in the package.
    Symlink(String),
}

impl std::fmt::Debug for EntryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EntryKind::Dir => f.write_str("Dir"),
            EntryKind::File(data) => write!(f, "File({} bytes)", data.len()),
            EntryKind::Symlink(t) => write!(f, "Symlink({t:?})"),
        }
    }
}

/// One entry of a package's data archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The path relative to the root, without a leading `./` or `/` (`usr/bin/runc`).
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits, including setuid/setgid/sticky (`0o7777` mask).
    pub mode: u32,
    /// Owner as the package records it.
    pub uid: u64,
    /// Group as the package records it.
    pub gid: u64,
    /// Modification time as the package records it (seconds since the epoch).
    pub mtime: u64,
}

impl Entry {
    /// The size of a regular file's contents (0 for others).
    pub fn size(&self) -> u64 {
        match &self.kind {
            EntryKind::File(data) => data.len() as u64,
            _ => 0,
        }
    }
}

/// Read the data entries of the `.deb` at `path`.
pub fn read(path: &Path) -> Result<Vec<Entry>, DebError> {
    read_filtered(path, &mut |_| true)
}

/// Read the data entries of the `.deb` at `path` whose path `keep` accepts; the
/// contents of the others are never held in memory (the kernel package carries
/// ~350 MB of modules, of which an image wants a few MB). A hard link to a file that
/// was filtered out is an error: keep both or neither.
pub fn read_filtered(
    path: &Path,
    keep: &mut dyn FnMut(&str) -> bool,
) -> Result<Vec<Entry>, DebError> {
    let bytes = std::fs::read(path).map_err(|source| DebError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    read_bytes_filtered(&bytes, path, keep)
}

/// Read the data entries of a `.deb` held in memory; `path` names it in errors.
pub fn read_bytes(bytes: &[u8], path: &Path) -> Result<Vec<Entry>, DebError> {
    read_bytes_filtered(bytes, path, &mut |_| true)
}

/// [`read_bytes`], keeping only the entries whose path `keep` accepts.
pub fn read_bytes_filtered(
    bytes: &[u8],
    path: &Path,
    keep: &mut dyn FnMut(&str) -> bool,
) -> Result<Vec<Entry>, DebError> {
    let corrupt = |problem: String| DebError::Corrupt {
        path: path.to_path_buf(),
        problem,
    };
    let members = ar_members(bytes).map_err(corrupt)?;
    match members.first() {
        Some(("debian-binary", v)) if v.starts_with(b"2.") => {}
        Some(("debian-binary", _)) => return Err(corrupt("unsupported format version".into())),
        _ => return Err(corrupt("first member is not debian-binary".into())),
    }
    let Some(&(member, data)) = members.iter().find(|(n, _)| n.starts_with("data.tar")) else {
        return Err(corrupt("no data.tar member".into()));
    };
    let reader: Box<dyn Read + '_> = match member {
        "data.tar" => Box::new(data),
        "data.tar.xz" => Box::new(liblzma::read::XzDecoder::new(data)),
        "data.tar.gz" => Box::new(flate2::read::GzDecoder::new(data)),
        "data.tar.zst" => {
            Box::new(
                zstd::stream::read::Decoder::new(data).map_err(|source| DebError::Data {
                    path: path.to_path_buf(),
                    member: member.to_string(),
                    source,
                })?,
            )
        }
        other => return Err(corrupt(format!("unsupported compression of {other}"))),
    };
    read_tar(reader, keep).map_err(|e| match e {
        TarProblem::Io(source) => DebError::Data {
            path: path.to_path_buf(),
            member: member.to_string(),
            source,
        },
        TarProblem::Bad(problem) => corrupt(format!("{member}: {problem}")),
    })
}

/// The members of an `ar` archive: name and contents.
fn ar_members(bytes: &[u8]) -> Result<Vec<(&str, &[u8])>, String> {
    let mut rest = bytes
        .strip_prefix(b"!<arch>\n")
        .ok_or("no ar magic: not a .deb")?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        if rest == b"\n" {
            break;
        }
        if rest.len() < 60 {
            return Err("truncated ar member header".into());
        }
        let (header, body) = rest.split_at(60);
        if &header[58..60] != b"`\n" {
            return Err("bad ar member header".into());
        }
        let name = std::str::from_utf8(&header[..16])
            .map_err(|_| "ar member name is not UTF-8")?
            .trim_end()
            .trim_end_matches('/');
        let size: usize = std::str::from_utf8(&header[48..58])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| format!("ar member `{name}` has a bad size"))?;
        if body.len() < size {
            return Err(format!("ar member `{name}` is truncated"));
        }
        out.push((name, &body[..size]));
        let padded = (size + 1) & !1;
        rest = body.get(padded..).unwrap_or(&[]);
    }
    Ok(out)
}

enum TarProblem {
    Io(io::Error),
    Bad(String),
}

impl From<io::Error> for TarProblem {
    fn from(e: io::Error) -> Self {
        TarProblem::Io(e)
    }
}

fn read_tar(
    reader: impl Read,
    keep: &mut dyn FnMut(&str) -> bool,
) -> Result<Vec<Entry>, TarProblem> {
    let mut archive = tar::Archive::new(reader);
    let mut out: Vec<Entry> = Vec::new();
    let mut files: HashMap<String, usize> = HashMap::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let raw_path = entry.path()?.into_owned();
        let Some(path) = normalize(&raw_path)? else {
            continue;
        };
        if !keep(&path) {
            continue;
        }
        let header = entry.header();
        let mode = header.mode()? & 0o7777;
        let uid = header.uid()?;
        let gid = header.gid()?;
        let mtime = header.mtime()?;
        let kind = match header.entry_type() {
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut data = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0));
                entry.read_to_end(&mut data)?;
                EntryKind::File(data)
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()?
                    .ok_or_else(|| TarProblem::Bad(format!("symlink `{path}` has no target")))?;
                let target = target.to_str().ok_or_else(|| {
                    TarProblem::Bad(format!("symlink `{path}` has a non-UTF-8 target"))
                })?;
                EntryKind::Symlink(target.to_string())
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()?
                    .ok_or_else(|| TarProblem::Bad(format!("hard link `{path}` has no target")))?;
                let target = normalize(&target)?.unwrap_or_default();
                let data = files
                    .get(&target)
                    .and_then(|&i| match &out[i].kind {
                        EntryKind::File(d) => Some(d.clone()),
                        _ => None,
                    })
                    .ok_or_else(|| {
                        TarProblem::Bad(format!(
                            "hard link `{path}` points at `{target}`, which is not an earlier (kept) file"
                        ))
                    })?;
                EntryKind::File(data)
            }
            // Device nodes, FIFOs: nothing we can or want to place without root.
            _ => continue,
        };
        if matches!(kind, EntryKind::File(_)) {
            files.insert(path.clone(), out.len());
        }
        out.push(Entry {
            path,
            kind,
            mode,
            uid,
            gid,
            mtime,
        });
    }
    Ok(out)
}

/// `./usr/bin/x` -> `usr/bin/x`; `./` -> `None`; `..` or non-UTF-8 -> error.
fn normalize(path: &Path) -> Result<Option<String>, TarProblem> {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir | Component::RootDir => {}
            Component::Normal(p) => parts.push(p.to_str().ok_or_else(|| {
                TarProblem::Bad(format!("path `{}` is not UTF-8", path.display()))
            })?),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(TarProblem::Bad(format!(
                    "path `{}` leaves the root",
                    path.display()
                )));
            }
        }
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

/// Write `entries` under `root` (created if needed), without root privileges:
/// modes are kept (directories get theirs once everything is written), owners and
/// times are not. A later entry replaces an earlier one at the same path. An entry
/// whose parent path goes through a symlink is refused, so nothing lands outside
/// `root`.
pub fn unpack(entries: &[Entry], root: &Path) -> Result<(), DebError> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DebError::Write { path, source }
    };
    std::fs::create_dir_all(root).map_err(write_err(root))?;
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    for e in entries {
        let target = root.join(&e.path);
        if let Some(parent) = Path::new(&e.path).parent() {
            ensure_dirs(root, parent, &e.path)?;
        }
        match &e.kind {
            EntryKind::Dir => {
                match std::fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        std::fs::remove_file(&target).map_err(write_err(&target))?;
                        std::fs::create_dir(&target).map_err(write_err(&target))?;
                    }
                    Err(_) => std::fs::create_dir(&target).map_err(write_err(&target))?,
                }
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))
                    .map_err(write_err(&target))?;
                dir_modes.push((target, e.mode));
            }
            EntryKind::File(data) => {
                remove_non_dir(&target).map_err(write_err(&target))?;
                std::fs::write(&target, data).map_err(write_err(&target))?;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(e.mode))
                    .map_err(write_err(&target))?;
            }
            EntryKind::Symlink(to) => {
                remove_non_dir(&target).map_err(write_err(&target))?;
                std::os::unix::fs::symlink(to, &target).map_err(write_err(&target))?;
            }
        }
    }
    for (dir, mode) in dir_modes.into_iter().rev() {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode | 0o700))
            .map_err(write_err(&dir))?;
    }
    Ok(())
}

/// Read and unpack several `.deb` files, in order, under `root`.
pub fn unpack_debs(debs: &[PathBuf], root: &Path) -> Result<(), DebError> {
    for deb in debs {
        unpack(&read(deb)?, root)?;
    }
    Ok(())
}

fn remove_non_dir(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Create the directories of `rel` under `root`, refusing to pass through a symlink.
fn ensure_dirs(root: &Path, rel: &Path, entry: &str) -> Result<(), DebError> {
    let mut at = root.to_path_buf();
    for c in rel.components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(DebError::Escape {
                    entry: entry.to_string(),
                    through: at,
                    root: root.to_path_buf(),
                });
            }
            Ok(_) => {
                std::fs::remove_file(&at).map_err(|source| DebError::Write {
                    path: at.clone(),
                    source,
                })?;
                std::fs::create_dir(&at).map_err(|source| DebError::Write {
                    path: at.clone(),
                    source,
                })?;
            }
            Err(_) => std::fs::create_dir(&at).map_err(|source| DebError::Write {
                path: at.clone(),
                source,
            })?,
        }
    }
    Ok(())
}
