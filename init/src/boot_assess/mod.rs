//! Boot assessment: the ESP mounted at `/boot`, the boot loader's state repaired, a
//! fallen-back slot recorded, and a slot on trial blessed once the node is healthy, or
//! given up at its health deadline.
//!
//! Stage 2 calls [`BootAssess::start`] right after the disks (STATE mounted, or left for
//! a first boot's format):
//!
//! 1. **The ESP**: the partition named `EFI` on the boot disk (found in its GPT as STATE
//!    is), mounted vfat at [`ESP_MOUNT`] with `nosuid,nodev,noexec` and
//!    [`ESP_MOUNT_OPTIONS`] (`quiet`: the atomic write's chmod is a no-op on FAT, not an
//!    error). Without it nothing is assessed or blessed on this boot (said once).
//! 2. **EFI variables** ([`PINNING_VARIABLES`]): an entry pinned as the default or as the
//!    next one-shot boot defeats the boot counter; both are removed (their immutable flag
//!    cleared first) and said.
//! 3. **Hygiene** ([`decide::hygiene`], pure): interrupted writes' temporary files, the
//!    booted slot's stale or duplicate entries, the other slot's entry without tries left
//!    (that slot failed: STATE's `upgrade.json` marks the attempt failed and the version
//!    refused, then the entry is removed), an upgrade interrupted by a restart; the
//!    booted slot's entry, if on trial, recorded (`stage2`, the entry, the tries).
//! 4. **Health** ([`BootAssess::check`], after each event of the main loop): once
//!    [`decide::unmet`] is empty the entry is renamed to `keelson-<slot>.conf` (the
//!    directory fsynced) and the record says `healthy`, `blessed`. If the deadline
//!    ([`CMDLINE_HEALTH_TIMEOUT`], default 300 s) passes first, the record says why and
//!    stage 2 reboots through its clean shutdown: the loader's counter tries again or
//!    falls back. etcd and the kubelet count when they were started, and must be ready
//!    again when machined's attempt says they were ready before the upgrade
//!    ([`decide::expected_ready`]): machined starts them itself, later than containerd,
//!    and a slot blessed before them would keep a version that breaks them. A node
//!    without a config (maintenance mode) is healthy once machined
//!    serves: it cannot prove more, and a fresh image is blessed at its first boot. A
//!    blessed entry with this slot's upgrade still open (a rollback, or a blessing cut
//!    short before its record) is assessed the same way, without a rename or a reboot.
//!
//! STATE's record is kept in memory until STATE is there (a first boot formats it later)
//! and written then; a failed slot's entry is removed only once its failure is kept.

pub mod decide;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keelson_configs::boot::{
    CMDLINE_HEALTH_TIMEOUT, DEFAULT_HEALTH_TIMEOUT_SECS, ENTRIES_DIR, ESP_MOUNT, EntryName,
};
use keelson_configs::layout::{
    CMDLINE_VERITY_ROOTHASH, PART_EFI, Slot, cmdline_value, parse_cmdline,
};
use keelson_node_protocol::upgrade::{UPGRADE_RECORD, UpgradeRecord};

use crate::console::Log;
use crate::disks;
use crate::kmods::{self, ModuleIndex};
use crate::state;
use crate::supervisor::ServiceStatus;
use crate::syscalls::{MountFlags, Syscalls, errno_name};

pub use decide::{Booted, ConfigState, EntryFile, Trial, Verdict};

/// The modules the ESP's mount needs: FAT, its default codepage (437) and default I/O
/// charset (Debian's kernel: `ascii`).
pub const ESP_MODULES: &[&str] = &["vfat", "nls_cp437", "nls_ascii"];
/// The ESP's mount options beside `nosuid,nodev,noexec`: files only root reads, and
/// chmod/chown succeed without effect (FAT keeps no modes).
pub const ESP_MOUNT_OPTIONS: &str = "umask=0077,quiet";
/// Where efivarfs is mounted.
pub const EFIVARS: &str = "/sys/firmware/efi/efivars";
/// systemd-boot's vendor GUID (the loader interface's variables).
pub const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
/// The loader variables that pin an entry over the boot counter's choice.
pub const PINNING_VARIABLES: &[&str] = &["LoaderEntryDefault", "LoaderEntryOneShot"];

/// Errors of the assessment's file work; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ESP cannot be found on the boot disk.
    #[error("no partition named {PART_EFI} on the boot disk: {why}")]
    NoEsp {
        /// Why.
        why: String,
    },
    /// The ESP cannot be mounted.
    #[error(
        "cannot mount the ESP {device} at {ESP_MOUNT} (vfat): {}; {hint}",
        errno_name(source)
    )]
    Mount {
        /// The partition's device.
        device: String,
        /// What to do.
        hint: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// A file or directory of the ESP cannot be read, removed or renamed.
    #[error("cannot {what} {path}: {}", errno_name(source))]
    Esp {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// STATE's upgrade record is not JSON of ours: left as it is (never guessed).
    #[error(
        "STATE's {UPGRADE_RECORD} is unreadable ({source}): it is left as it is and this boot records nothing; remove it to start a new record"
    )]
    Record {
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// The boot's assessment, owned by stage 2's main loop.
#[derive(Debug)]
pub struct BootAssess {
    /// The mounted ESP (`None`: nothing to assess).
    esp: Option<PathBuf>,
    /// The booted slot's entry, while it has something to prove.
    trial: Option<Trial>,
    /// STATE's record as this boot changed it.
    record: UpgradeRecord,
    /// The record has changes STATE does not have yet.
    unkept: bool,
    /// STATE's record cannot be written (unreadable, or a write failed: said once).
    record_off: bool,
    /// Failed slots' entries, removed once the record is kept.
    after_record: Vec<String>,
    /// The health deadline.
    deadline: Duration,
    /// When the assessment began (stage 2's start, near enough).
    started: Instant,
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The health deadline of the command line, and a line when its value is unusable.
pub fn health_deadline(cmdline: &str) -> (Duration, Option<String>) {
    let args = parse_cmdline(cmdline);
    let default = Duration::from_secs(DEFAULT_HEALTH_TIMEOUT_SECS);
    match cmdline_value(&args, CMDLINE_HEALTH_TIMEOUT) {
        None => (default, None),
        Some(v) => match v.parse::<u64>() {
            Ok(secs) if secs > 0 => (Duration::from_secs(secs), None),
            _ => (
                default,
                Some(format!(
                    "{CMDLINE_HEALTH_TIMEOUT}={v} is not a number of seconds: the deadline is {DEFAULT_HEALTH_TIMEOUT_SECS} s"
                )),
            ),
        },
    }
}

/// The ESP's device: the partition named `EFI` in the boot disk's GPT.
pub fn find_esp(sys: &dyn Syscalls, opts: &disks::Options, disk: &str) -> Result<PathBuf, Error> {
    let sector = disks::table::sector_size(&opts.sysfs, disk);
    let layout =
        disks::table::read_layout(&opts.dev.join(disk), sector).map_err(|e| Error::NoEsp {
            why: crate::error_chain(&e),
        })?;
    let part = layout
        .parts
        .iter()
        .find(|p| p.name == PART_EFI)
        .ok_or_else(|| Error::NoEsp {
            why: format!("the table of {disk} has none"),
        })?;
    disks::partition_device(sys, &opts.sysfs, &opts.dev, disk, part.number).ok_or_else(|| {
        Error::NoEsp {
            why: format!("partition {} of {disk} has no device node", part.number),
        }
    })
}

/// Mount the ESP at [`ESP_MOUNT`] (its modules loaded first).
pub fn mount_esp(
    sys: &dyn Syscalls,
    log: &dyn Log,
    modules: Option<&ModuleIndex>,
    device: &Path,
) -> Result<(), Error> {
    let target = Path::new(ESP_MOUNT);
    if sys.is_mount_point(target).unwrap_or(false) {
        return Ok(());
    }
    if let Some(index) = modules {
        kmods::load(sys, log, index, ESP_MODULES);
    }
    // DIRSYNC: vfat keeps a renamed file's size and first cluster in its inode, and
    // writes them into the new directory entry only when the inode is written back; a
    // power cut before that left a blessed entry empty (0 bytes), and the loader found no
    // entry at all. With DIRSYNC the rename writes the inode at once.
    let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC | MountFlags::DIRSYNC;
    let device = device.display().to_string();
    let shown = device.clone();
    sys.mount(&device, target, "vfat", flags, ESP_MOUNT_OPTIONS)
        .map_err(|source| Error::Mount {
            hint: match source.raw_os_error() {
                Some(2) => "the image lacks the mount point /boot",
                Some(19) => "the kernel has no vfat driver (see the module lines above)",
                Some(22) => {
                    "the partition holds no FAT filesystem, or a codepage module is missing"
                }
                _ => "see the kernel log",
            },
            device,
            source,
        })?;
    log.line(&format!("ESP ({shown}) mounted at {ESP_MOUNT}"));
    Ok(())
}

/// Remove the loader variables that pin an entry ([`PINNING_VARIABLES`]) from `efivars`:
/// each removed, with the entry it named.
pub fn remove_pinning_variables(sys: &dyn Syscalls, efivars: &Path) -> Vec<Result<String, String>> {
    let mut done = Vec::new();
    for name in PINNING_VARIABLES {
        let path = efivars.join(format!("{name}-{LOADER_GUID}"));
        let Ok(bytes) = sys.read_file(&path) else {
            continue;
        };
        let pinned = efi_string(bytes.get(4..).unwrap_or_default());
        let removed = clear_immutable(&path).and_then(|()| sys.remove_file(&path));
        done.push(match removed {
            Ok(()) => Ok(format!("EFI variable {name} (it pinned {pinned:?}) removed")),
            Err(e) => Err(format!(
                "EFI variable {name} (it pins {pinned:?}) not removed: {}; the boot counter cannot fall back while it is set",
                errno_name(&e)
            )),
        });
    }
    done
}

/// A UTF-16LE string ended by a NUL, as the loader stores its variables.
fn efi_string(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|u| *u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// Clear `FS_IMMUTABLE_FL` (efivarfs sets it on variables it does not know to be safe to
/// remove). A filesystem without inode flags has nothing to clear.
fn clear_immutable(path: &Path) -> io::Result<()> {
    use rustix::fs::{IFlags, ioctl_getflags, ioctl_setflags};
    let file = fs::File::open(path)?;
    let flags = match ioctl_getflags(&file) {
        Ok(flags) => flags,
        Err(rustix::io::Errno::NOTTY | rustix::io::Errno::OPNOTSUPP) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if flags.contains(IFlags::IMMUTABLE) {
        ioctl_setflags(&file, flags - IFlags::IMMUTABLE)?;
    }
    Ok(())
}

/// Every file of the entries' directory, ours parsed.
pub fn read_entries(dir: &Path) -> Result<Vec<EntryFile>, Error> {
    let err = |source| Error::Esp {
        what: "list",
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for item in fs::read_dir(dir).map_err(err)? {
        let file_name = item
            .map_err(err)?
            .file_name()
            .to_string_lossy()
            .into_owned();
        let entry = EntryName::parse(&file_name)
            .and_then(|_| fs::read_to_string(dir.join(&file_name)).ok())
            .map(|text| keelson_configs::boot::BootEntry::parse(&text));
        files.push(EntryFile { file_name, entry });
    }
    files.sort_by(|a, b| a.file_name.cmp(&b.file_name));
    Ok(files)
}

/// Remove the temporary files an interrupted upgrade left beside the slots' kernels and
/// initramfs images (`/keelson/<slot>/`): tens of MB each, which the next upgrade's space
/// check would find missing.
fn remove_slot_temporaries(sys: &dyn Syscalls, log: &dyn Log, esp: &Path) {
    for slot in [Slot::A, Slot::B] {
        let dir = esp.join("keelson").join(slot.letter());
        let Ok(listing) = fs::read_dir(&dir) else {
            continue;
        };
        let mut removed = false;
        for item in listing.flatten() {
            let name = item.file_name().to_string_lossy().into_owned();
            if name.starts_with(decide::TEMPORARY_PREFIX) {
                removed |= remove_entry(
                    sys,
                    log,
                    &dir,
                    &name,
                    "an interrupted write's temporary file",
                );
            }
        }
        if removed && let Err(e) = sync_dir(&dir) {
            log.line(&e.to_string());
        }
    }
}

/// fsync of a directory, so that a rename or a removal in it is on the disk.
fn sync_dir(dir: &Path) -> Result<(), Error> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| Error::Esp {
            what: "fsync",
            path: dir.to_path_buf(),
            source,
        })
}

impl BootAssess {
    /// Nothing to assess on this boot.
    pub fn off() -> BootAssess {
        BootAssess {
            esp: None,
            trial: None,
            record: UpgradeRecord::default(),
            unkept: false,
            record_off: true,
            after_record: Vec::new(),
            deadline: Duration::from_secs(DEFAULT_HEALTH_TIMEOUT_SECS),
            started: Instant::now(),
        }
    }

    /// Steps 1 to 3 (module docs): the ESP mounted, the EFI variables and the entries
    /// repaired, the trial recorded. `disk` is the boot disk (none: the disks step failed).
    pub fn start(
        sys: &dyn Syscalls,
        log: &dyn Log,
        cmdline: &str,
        disk: Option<&str>,
        opts: &disks::Options,
        modules: Option<&ModuleIndex>,
        state_dir: Option<&Path>,
    ) -> BootAssess {
        let (deadline, said) = health_deadline(cmdline);
        if let Some(line) = said {
            log.line(&line);
        }
        let mounted = disk
            .ok_or_else(|| Error::NoEsp {
                why: "the boot disk is unknown (see the disks' lines above)".into(),
            })
            .and_then(|disk| find_esp(sys, opts, disk))
            .and_then(|device| mount_esp(sys, log, modules, &device));
        if let Err(e) = mounted {
            log.line(&format!(
                "{}: nothing is blessed on this boot, and upgrades cannot write boot entries",
                crate::error_chain(&e)
            ));
            return BootAssess::off();
        }
        for outcome in remove_pinning_variables(sys, Path::new(EFIVARS)) {
            log.line(&format!(
                "boot loader hygiene: {}",
                outcome.unwrap_or_else(|e| e)
            ));
        }
        let args = parse_cmdline(cmdline);
        let Some(slot) = crate::cmdline::slot(cmdline) else {
            log.line("boot assessment off: the command line names no keelson.slot");
            return BootAssess::off();
        };
        let booted = Booted {
            slot,
            roothash: cmdline_value(&args, CMDLINE_VERITY_ROOTHASH).map(str::to_string),
        };
        BootAssess::on_esp(
            sys,
            log,
            PathBuf::from(ESP_MOUNT),
            &booted,
            state_dir,
            deadline,
        )
    }

    /// Step 3 on the ESP mounted at `esp`.
    pub fn on_esp(
        sys: &dyn Syscalls,
        log: &dyn Log,
        esp: PathBuf,
        booted: &Booted,
        state_dir: Option<&Path>,
        deadline: Duration,
    ) -> BootAssess {
        let mut me = BootAssess {
            esp: Some(esp.clone()),
            deadline,
            ..BootAssess::off()
        };
        me.record_off = false;
        if let Some(dir) = state_dir {
            match state::read(dir, UPGRADE_RECORD) {
                Ok(None) => {}
                Ok(Some(bytes)) => match UpgradeRecord::parse(&bytes) {
                    Ok(record) => me.record = record,
                    Err(source) => {
                        log.line(&Error::Record { source }.to_string());
                        me.record_off = true;
                    }
                },
                Err(e) => {
                    log.line(&format!(
                        "{UPGRADE_RECORD} not read: {}",
                        crate::error_chain(&e)
                    ));
                    me.record_off = true;
                }
            }
        }
        remove_slot_temporaries(sys, log, &esp);
        let entries_dir = esp.join(ENTRIES_DIR);
        let files = match read_entries(&entries_dir) {
            Ok(files) => files,
            Err(e) => {
                log.line(&format!("boot loader hygiene skipped: {e}"));
                return me;
            }
        };
        let found = decide::hygiene(&files, booted, &me.record, now_ms());
        for line in &found.said {
            log.line(line);
        }
        let mut removed = false;
        for removal in &found.removals {
            if removal.after_record {
                me.after_record.push(removal.file_name.clone());
            } else {
                removed |= remove_entry(sys, log, &entries_dir, &removal.file_name, &removal.why);
            }
        }
        if removed && let Err(e) = sync_dir(&entries_dir) {
            log.line(&e.to_string());
        }
        me.unkept = found.record != me.record;
        me.record = found.record;
        me.trial = found.trial;
        if let Some(dir) = state_dir {
            me.keep_record(sys, log, dir);
        }
        me
    }

    /// Write the record to STATE if it changed, then remove the failed slots' entries it
    /// accounts for.
    pub fn keep_record(&mut self, sys: &dyn Syscalls, log: &dyn Log, state_dir: &Path) {
        if self.record_off || !self.unkept {
            return;
        }
        if let Err(e) = state::write_atomic(state_dir, UPGRADE_RECORD, &self.record.to_bytes()) {
            log.line(&format!(
                "upgrade record not kept: {}; a failed slot's entry stays until it is",
                crate::error_chain(&e)
            ));
            self.record_off = true;
            return;
        }
        self.unkept = false;
        let Some(esp) = &self.esp else { return };
        let dir = esp.join(ENTRIES_DIR);
        let mut removed = false;
        for name in std::mem::take(&mut self.after_record) {
            removed |= remove_entry(sys, log, &dir, &name, "its failure is recorded in STATE");
        }
        if removed && let Err(e) = sync_dir(&dir) {
            log.line(&e.to_string());
        }
    }

    /// Whether [`BootAssess::check`] has anything left to do (a trial, or a record STATE
    /// does not have yet).
    pub fn active(&self) -> bool {
        self.trial.is_some() || (self.unkept && !self.record_off)
    }

    /// How long until the health deadline, while a trial is being assessed.
    pub fn deadline_in(&self) -> Option<Duration> {
        self.trial.as_ref()?;
        Some(
            self.deadline
                .saturating_sub(self.started.elapsed())
                .saturating_add(Duration::from_millis(100)),
        )
    }

    /// Step 4 (after each event): keep the record if STATE is there, bless a healthy
    /// trial, or give it up at the deadline. `true`: reboot now (clean shutdown).
    pub fn check(
        &mut self,
        sys: &dyn Syscalls,
        log: &dyn Log,
        config: ConfigState,
        services: &[ServiceStatus],
        state_dir: Option<&Path>,
    ) -> bool {
        if let Some(dir) = state_dir {
            self.keep_record(sys, log, dir);
        }
        let Some(trial) = self.trial.clone() else {
            return false;
        };
        let elapsed = self.started.elapsed();
        let expected = decide::expected_ready(&self.record, &trial);
        let unmet = decide::unmet(config, services, &expected);
        let reboot = match decide::judge(&trial, &unmet, elapsed, self.deadline) {
            Verdict::Waiting => return false,
            Verdict::Healthy => {
                self.trial = None;
                if trial.on_trial() && !self.rename_blessed(log, &trial) {
                    return false;
                }
                let line = decide::bless(&mut self.record, &trial, elapsed, now_ms());
                log.line(&line);
                false
            }
            Verdict::GiveUp { reason, reboot } => {
                self.trial = None;
                let line = decide::give_up(&mut self.record, &trial, &reason, reboot);
                log.line(&line);
                reboot
            }
        };
        self.unkept = true;
        if let Some(dir) = state_dir {
            self.keep_record(sys, log, dir);
        } else {
            log.line("upgrade record not kept: STATE is not mounted");
        }
        reboot
    }

    /// Rename the trial's entry to its blessed name, the directory fsynced; whether it was.
    fn rename_blessed(&self, log: &dyn Log, trial: &Trial) -> bool {
        let Some(esp) = &self.esp else { return false };
        let dir = esp.join(ENTRIES_DIR);
        let from = trial.entry.file_name();
        let to = EntryName::blessed(trial.slot).file_name();
        match keelson_node_protocol::state::rename_durable(&dir, &from, &to) {
            Ok(()) => true,
            Err(e) => {
                let why = e.io().map_or_else(|| e.to_string(), errno_name);
                log.line(&format!(
                    "slot {} healthy but not blessed: cannot rename {} to {to} ({why}); it stays on trial",
                    trial.slot.letter(),
                    dir.join(&from).display()
                ));
                false
            }
        }
    }

    /// The booted slot's entry on trial, if any (for tests and the boot log).
    pub fn trial(&self) -> Option<&Trial> {
        self.trial.as_ref()
    }

    /// The record as this boot has it.
    pub fn record(&self) -> &UpgradeRecord {
        &self.record
    }
}

/// Remove one file of the ESP and say so; whether it was removed.
fn remove_entry(sys: &dyn Syscalls, log: &dyn Log, dir: &Path, name: &str, why: &str) -> bool {
    let path = dir.join(name);
    match sys.remove_file(&path) {
        Ok(()) => {
            log.line(&format!(
                "boot loader hygiene: removed {} ({why})",
                path.display()
            ));
            true
        }
        Err(e) => {
            log.line(&format!(
                "boot loader hygiene: cannot remove {} ({why}): {}",
                path.display(),
                errno_name(&e)
            ));
            false
        }
    }
}

#[cfg(test)]
// Tests build their ESP and STATE fixtures on disk.
#[allow(clippy::disallowed_methods)]
mod tests;
