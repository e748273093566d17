//! The ESP's side of an upgrade: the slots' boot entries (listed, deleted, written by
//! temp file, fsync, rename and fsync of the directory) and the slots' kernel and
//! initramfs files (`/keelson/<slot>/{vmlinuz,initrd}`).

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use keelson_configs::boot::{BootEntry, ENTRIES_DIR, EntryName, FoundEntry};
use keelson_configs::layout::Slot;

use super::UpgradeError;

/// The temporary files' prefix in the entries' directory and the slots' directories:
/// never a name the loader reads (`*.conf`), removed by the next write.
const TMP_PREFIX: &str = ".keelson-upgrade.";

/// The ESP mounted at `root` (`/boot`).
#[derive(Debug, Clone)]
pub struct Esp {
    root: PathBuf,
}

impl Esp {
    /// The ESP mounted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Esp {
        Esp { root: root.into() }
    }

    /// The entries' directory.
    pub fn entries_dir(&self) -> PathBuf {
        self.root.join(ENTRIES_DIR)
    }

    /// A path the entries name (`/keelson/b/vmlinuz`) on this ESP.
    pub fn file(&self, entry_path: &str) -> PathBuf {
        self.root.join(entry_path.trim_start_matches('/'))
    }

    /// Every entry of ours on the ESP (other files are ignored).
    pub fn entries(&self) -> Result<Vec<FoundEntry>, UpgradeError> {
        let dir = self.entries_dir();
        let err = |source| UpgradeError::Entries {
            path: dir.clone(),
            source,
        };
        let mut out = Vec::new();
        for item in fs::read_dir(&dir).map_err(err)? {
            let item = item.map_err(err)?;
            let file_name = item.file_name().to_string_lossy().into_owned();
            let Some(name) = EntryName::parse(&file_name) else {
                continue;
            };
            let text = fs::read_to_string(item.path()).map_err(err)?;
            out.push(FoundEntry {
                name,
                entry: BootEntry::parse(&text),
            });
        }
        out.sort_by_key(|e| e.name.file_name());
        Ok(out)
    }

    /// Deletes every entry of `slot` (any counter) and the temporary files left by an
    /// earlier write, then syncs the directory: from here on the slot cannot boot.
    pub fn delete_slot_entries(&self, slot: Slot) -> Result<Vec<String>, UpgradeError> {
        let dir = self.entries_dir();
        let write_err = |what: &str, path: &Path, source| UpgradeError::Write {
            what: what.to_owned(),
            path: path.to_owned(),
            source,
        };
        let mut deleted = Vec::new();
        let listing = fs::read_dir(&dir).map_err(|e| write_err("list", &dir, e))?;
        for item in listing {
            let item = item.map_err(|e| write_err("list", &dir, e))?;
            let file_name = item.file_name().to_string_lossy().into_owned();
            let ours = EntryName::parse(&file_name).is_some_and(|n| n.slot == slot)
                || file_name.starts_with(TMP_PREFIX);
            if ours {
                fs::remove_file(item.path())
                    .map_err(|e| write_err("delete the entry", &item.path(), e))?;
                deleted.push(file_name);
            }
        }
        sync_dir(&dir).map_err(|e| write_err("sync the directory", &dir, e))?;
        Ok(deleted)
    }

    /// Writes `entry` as `name` in the entries' directory: temp file, fsync, rename, fsync
    /// of the directory.
    pub fn write_entry(&self, name: &EntryName, entry: &BootEntry) -> Result<(), UpgradeError> {
        write_durable(
            &self.entries_dir(),
            &name.file_name(),
            entry.render().as_bytes(),
        )
    }

    /// The size in bytes of the files `slot` keeps on the ESP (0 for those absent).
    pub fn slot_files_size(&self, slot: Slot) -> u64 {
        slot_file_paths(slot)
            .iter()
            .filter_map(|p| fs::metadata(self.file(p)).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Removes the kernel and initramfs of `slot` (whose entry is already gone), so their
    /// space is free for the new ones.
    pub fn remove_slot_files(&self, slot: Slot) -> Result<(), UpgradeError> {
        for p in slot_file_paths(slot) {
            let path = self.file(&p);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(UpgradeError::Write {
                        what: "remove the old file".into(),
                        path,
                        source: e,
                    });
                }
            }
        }
        Ok(())
    }

    /// Bytes free on the ESP for an unprivileged writer.
    pub fn free_bytes(&self) -> Result<u64, UpgradeError> {
        let st = nix::sys::statvfs::statvfs(&self.root).map_err(|e| UpgradeError::Read {
            what: "the ESP's free space",
            path: self.root.clone(),
            source: io::Error::from(e),
        })?;
        Ok(st.blocks_available().saturating_mul(st.fragment_size()))
    }
}

fn slot_file_paths(slot: Slot) -> [String; 2] {
    [
        keelson_configs::boot::slot_kernel_path(slot),
        keelson_configs::boot::slot_initrd_path(slot),
    ]
}

/// A temporary file in `dir` (created with `create_new`), its path.
pub fn create_temp(dir: &Path, for_name: &str) -> io::Result<(fs::File, PathBuf)> {
    fs::create_dir_all(dir)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut last = io::Error::from(io::ErrorKind::AlreadyExists);
    for attempt in 0..16u32 {
        let path = dir.join(format!("{TMP_PREFIX}{for_name}.{nanos}.{attempt}"));
        match fs::OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
        {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Syncs `file` at `tmp`, renames it to `dir/name` and syncs `dir`.
pub fn commit_temp(file: fs::File, tmp: &Path, dir: &Path, name: &str) -> Result<(), UpgradeError> {
    let dest = dir.join(name);
    let err = |what: &str, path: &Path| {
        let (what, path) = (what.to_owned(), path.to_owned());
        move |source| UpgradeError::Write { what, path, source }
    };
    file.sync_all().map_err(err("sync", tmp))?;
    drop(file);
    fs::rename(tmp, &dest).map_err(err("rename into place", &dest))?;
    // vfat writes a renamed file's size and first cluster into its new directory entry
    // only with the file's inode: sync the file again under its new name, else a power
    // cut leaves the entry empty (0 bytes) and the loader without it.
    fs::File::open(&dest)
        .and_then(|f| f.sync_all())
        .map_err(err("sync after the rename", &dest))?;
    sync_dir(dir).map_err(err("sync the directory", dir))
}

/// Writes `data` as `dir/name` by temp file, fsync, rename and fsync of `dir`.
pub fn write_durable(dir: &Path, name: &str, data: &[u8]) -> Result<(), UpgradeError> {
    let (mut file, tmp) = create_temp(dir, name).map_err(|source| UpgradeError::Write {
        what: "create a file in".into(),
        path: dir.to_owned(),
        source,
    })?;
    let written = file.write_all(data).map_err(|source| UpgradeError::Write {
        what: "write".into(),
        path: tmp.clone(),
        source,
    });
    let committed = written.and_then(|()| commit_temp(file, &tmp, dir, name));
    if committed.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    committed
}

/// fsync of a directory, so a rename or a removal in it is on the disk.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}
