//! The node's side of an upgrade (`machinectl upgrade`, `rollback`, `upgrade status`):
//! a signed bundle is received (or fetched), checked, spooled on EPHEMERAL until every
//! part arrived and matched its sha256, only then written into the inactive slot, read
//! back and verified, and given a boot entry on trial (`keelson-<slot>+3-0.conf`); a
//! rollback makes the other, blessed slot the next to boot.
//!
//! The order of [`Upgrader::upgrade`] (the design's step 3), with the phases reported to
//! the CLI (`check`, `transfer`, `write`, `verify`, `entry`, then `reboot` in the last
//! message) and recorded in STATE when they are reached:
//! 1. `check`: the bundle's header, its signature against the trusted keys, and every
//!    check (`keelson_upgrade::checks` over the node's facts, room on EPHEMERAL for the
//!    spool, and the etcd guard on a control plane): a refusal writes nothing, and
//!    `--dry-run` stops here;
//! 2. STATE's [`Attempt`] (in progress);
//! 3. `transfer` (bytes of the whole bundle): the parts are spooled
//!    ([`spool`]); the inactive slot and the ESP are not touched until the bundle ended,
//!    nothing followed it and every part matched its sha256, so a tampered, cut or
//!    abandoned upload leaves them byte for byte as they were;
//! 4. `write` (bytes of the parts): the inactive slot's entry is deleted and the
//!    directory synced (a half-written slot is never bootable), its old kernel and
//!    initramfs removed; root goes from the spool into the slot's partition, the kernel
//!    and initramfs into temporary files on the ESP, synced and renamed; the spool is
//!    removed;
//! 5. `verify`: everything is read back once from the disk, not the page cache (O_DIRECT,
//!    or buffered with the cache dropped where that is refused): sha256 of each part, and
//!    root's verity tree recomputed from the same read;
//! 6. `entry`: the entry, by temporary file, fsync, rename, fsync of the directory; the
//!    outcome `staged` (`--stage`) or `booting`.
//!
//! The spool is removed whatever the outcome, and one a power cut left is removed when
//! the engine starts ([`Upgrader::new`]). The engine never reboots:
//! [`UpgradeDone::rebooting`] tells the server to ask PID 1. The running slot's
//! partition, its entry and STATE's config are never written. One upgrade or rollback
//! runs at a time.
//!
//! | module | what it is |
//! |---|---|
//! | [`error`] | [`UpgradeError`], and its gRPC code |
//! | [`facts`] | the node's facts: booted slot, version, arch, components, partitions, config version, the STATE record |
//! | [`esp`] | the ESP: entries listed, deleted, written durably; the slots' kernel and initramfs |
//! | [`spool`] | the bundle's parts kept on EPHEMERAL until all of them arrived and matched |
//! | [`install`] | the bundle reader, the writer of the parts from the spool, the read-back verification |
//! | [`progress`] | the progress reports: phases' lines, byte counts by tenths |
//! | [`fetch`] | a bundle streamed from an http(s) URL |
//! | [`cluster_guard`] | the etcd quorum guard of a control plane |
//! | [`status`] | the slots and the record, and their wire form |

pub mod cluster_guard;
pub mod error;
pub mod esp;
pub mod facts;
pub mod fetch;
pub mod install;
pub mod progress;
pub mod spool;
pub mod status;

use std::path::PathBuf;
use std::sync::Arc;

use hyper::body::Bytes;
use keelson_api::api::proto;
use keelson_configs::boot::{
    BootEntry, CMDLINE_HEALTH_TIMEOUT, EntryName, EntryVersion, NEW_ENTRY_TRIES, next_generation,
};
use keelson_node_protocol::upgrade::{self as record, Attempt, Outcome, UpgradeRecord};
use tokio::sync::mpsc;

pub use cluster_guard::{ClusterGuard, EtcdGuard};
pub use error::UpgradeError;
pub use progress::{Progress, Reporter};
pub use status::{SlotState, UpgradeStatus};

use esp::Esp;

/// Where the engine reads and writes; tests point every path at temporary files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradePaths {
    /// STATE's mount point (`/system/state`): the upgrade record, the running config.
    pub state: PathBuf,
    /// The ESP's mount point (`/boot`).
    pub esp: PathBuf,
    /// The public keys the image trusts (`/usr/share/keelson/upgrade-keys`).
    pub trusted_keys: PathBuf,
    /// The running image's os-release (`/usr/lib/os-release`).
    pub os_release: PathBuf,
    /// The kernel command line (`/proc/cmdline`).
    pub cmdline: PathBuf,
    /// The block devices in sysfs (`/sys/class/block`).
    pub sys_block: PathBuf,
    /// The device nodes (`/dev`).
    pub dev: PathBuf,
    /// The components the running image carries (`/usr/lib/keelson/components`).
    pub components: PathBuf,
    /// The directory, on EPHEMERAL, where the bundle is spooled until all of it arrived
    /// and matched (`/var/lib/keelson/upgrade`, mode 0700).
    pub spool: PathBuf,
}

impl Default for UpgradePaths {
    fn default() -> Self {
        UpgradePaths {
            state: keelson_configs::layout::STATE_MOUNT.into(),
            esp: keelson_configs::boot::ESP_MOUNT.into(),
            trusted_keys: "/usr/share/keelson/upgrade-keys".into(),
            os_release: PathBuf::from("/").join(keelson_configs::layout::OS_RELEASE),
            cmdline: "/proc/cmdline".into(),
            sys_block: "/sys/class/block".into(),
            dev: "/dev".into(),
            components: "/usr/lib/keelson/components".into(),
            spool: PathBuf::from(keelson_configs::layout::EPHEMERAL_MOUNT)
                .join("lib/keelson/upgrade"),
        }
    }
}

/// What the operator asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpgradeOptions {
    /// Write now, switch at the next reboot.
    pub stage: bool,
    /// Run every check, write nothing.
    pub dry_run: bool,
    /// Install a version that failed here, or go on when etcd would lose its quorum.
    pub force: bool,
    /// Install an older version.
    pub allow_downgrade: bool,
    /// Seconds the new slot has to become healthy; 0: the default (no key on the command
    /// line).
    pub health_timeout_secs: u64,
    /// The services of [`record::COMEBACK_SERVICES`] ready when the upgrade was asked (the server
    /// reads them from PID 1): the new slot is blessed only once they are ready again.
    pub expect_ready: Vec<String>,
}

impl From<&proto::UpgradeOptions> for UpgradeOptions {
    fn from(o: &proto::UpgradeOptions) -> Self {
        UpgradeOptions {
            stage: o.stage,
            dry_run: o.dry_run,
            force: o.force,
            allow_downgrade: o.allow_downgrade,
            health_timeout_secs: o.health_timeout_seconds,
            expect_ready: Vec::new(),
        }
    }
}

/// Where the bundle comes from.
#[derive(Debug)]
pub enum BundleSource {
    /// Received in pieces (the gRPC stream's `data`); an `Err` (why the stream broke) or
    /// the channel's end before the bundle's end stops the upgrade.
    Stream {
        /// The pieces.
        chunks: mpsc::Receiver<Result<Bytes, String>>,
        /// The bundle's size when the sender knows it (0: unknown), for progress.
        size: u64,
    },
    /// Fetched by the node from an `http://` or `https://` URL.
    Url(String),
}

impl BundleSource {
    /// The source a gRPC request's options name: their URL when they have one, else the
    /// stream's `data` pieces the server forwards on `chunks`.
    pub fn from_options(
        options: &proto::UpgradeOptions,
        chunks: mpsc::Receiver<Result<Bytes, String>>,
    ) -> BundleSource {
        if options.url.is_empty() {
            BundleSource::Stream {
                chunks,
                size: options.size,
            }
        } else {
            BundleSource::Url(options.url.clone())
        }
    }
}

/// A finished upgrade (or dry run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeDone {
    /// The version installed (or that would be, for a dry run).
    pub version: String,
    /// The slot it went into (`a`/`b`).
    pub slot: String,
    /// The server must now ask PID 1 to reboot (`NodeBackend::power(Power::Reboot)`):
    /// false for `--stage` and `--dry-run`.
    pub rebooting: bool,
    /// Only the checks ran.
    pub dry_run: bool,
}

impl From<UpgradeDone> for proto::UpgradeProgress {
    fn from(d: UpgradeDone) -> Self {
        let message = if d.dry_run {
            format!(
                "every check passed: {} would go into slot {}; nothing was written",
                d.version, d.slot
            )
        } else if d.rebooting {
            format!(
                "{} is in slot {} and boots on trial now: rebooting",
                d.version, d.slot
            )
        } else {
            format!(
                "{} is in slot {}: it boots on trial at the next reboot",
                d.version, d.slot
            )
        };
        proto::UpgradeProgress {
            phase: if d.dry_run {
                "check"
            } else if d.rebooting {
                record::PHASE_REBOOT
            } else {
                record::PHASE_ENTRY
            }
            .into(),
            message,
            done_all: true,
            version: d.version,
            slot: d.slot,
            rebooting: d.rebooting,
            ..Default::default()
        }
    }
}

/// A rollback made ready: the version and slot that boot next. The server must now ask
/// PID 1 to reboot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackDone {
    /// The version.
    pub version: String,
    /// The slot (`a`/`b`).
    pub slot: String,
}

impl From<RollbackDone> for proto::RollbackResponse {
    fn from(d: RollbackDone) -> Self {
        proto::RollbackResponse {
            version: d.version,
            slot: d.slot,
        }
    }
}

/// The upgrade engine. Cheap to clone: clones share the one-at-a-time lock.
#[derive(Clone)]
pub struct Upgrader {
    paths: UpgradePaths,
    busy: Arc<tokio::sync::Mutex<()>>,
    guard: Arc<std::sync::Mutex<Option<Arc<dyn ClusterGuard>>>>,
    /// The spool directory's free bytes as the tests set them (`None`: statvfs).
    spool_free: Option<u64>,
}

impl std::fmt::Debug for Upgrader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgrader")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl Upgrader {
    /// The engine over `paths`, with no cluster guard (a worker, or no config yet). A
    /// spool left by an upgrade that a power cut or crash interrupted is removed here: the
    /// engine is made once, when machined starts.
    pub fn new(paths: UpgradePaths) -> Upgrader {
        let removed = spool::remove_stale(&paths.spool);
        if !removed.is_empty() {
            tracing::info!(spools = ?removed, "upgrade: the spool of an interrupted upgrade was removed");
        }
        Upgrader {
            paths,
            busy: Arc::default(),
            guard: Arc::default(),
            spool_free: None,
        }
    }

    /// The engine with the spool directory's free bytes set (tests: no disk to fill).
    #[cfg(test)]
    fn with_spool_free_bytes(mut self, bytes: u64) -> Upgrader {
        self.spool_free = Some(bytes);
        self
    }

    /// Sets (or clears) the control plane's guard, asked before every upgrade that is not
    /// forced ([`EtcdGuard`] once the node's etcd controller exists).
    pub fn set_cluster_guard(&self, guard: Option<Arc<dyn ClusterGuard>>) {
        match self.guard.lock() {
            Ok(mut g) => *g = guard,
            Err(p) => *p.into_inner() = guard,
        }
    }

    fn cluster_guard(&self) -> Option<Arc<dyn ClusterGuard>> {
        match self.guard.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The paths the engine works on.
    pub fn paths(&self) -> &UpgradePaths {
        &self.paths
    }

    /// The slots and STATE's record.
    pub fn status(&self) -> Result<UpgradeStatus, UpgradeError> {
        let esp = Esp::new(&self.paths.esp);
        let entries = esp.entries()?;
        let booted = facts::booted_slot(&self.paths).ok();
        Ok(UpgradeStatus {
            slots: status::slots(&entries, booted),
            record: facts::read_record(&self.paths.state)?,
        })
    }

    /// Makes the other slot the next to boot, if its entry is blessed and its files are
    /// on the ESP: its entry is rewritten under the same name with the next generation.
    /// The server then asks PID 1 to reboot.
    /// `expect_ready`: as [`UpgradeOptions::expect_ready`].
    pub fn rollback(&self, expect_ready: Vec<String>) -> Result<RollbackDone, UpgradeError> {
        let _busy = self
            .busy
            .clone()
            .try_lock_owned()
            .map_err(|_| UpgradeError::Busy)?;
        let booted = facts::booted_slot(&self.paths)?;
        let other = booted.other();
        let refuse = |reason: String| UpgradeError::Rollback {
            slot: other.letter().to_owned(),
            reason,
        };
        let esp = Esp::new(&self.paths.esp);
        let entries = esp.entries()?;
        let Some(found) = entries.iter().find(|e| e.name.slot == other) else {
            return Err(refuse(format!(
                "it has no boot entry in {}: it holds no image that ever booted here; upgrade instead",
                esp.entries_dir().display()
            )));
        };
        if found.name.on_trial() {
            return Err(refuse(format!(
                "its entry {} is on trial, not blessed: that image never proved healthy here; upgrade to a good version instead",
                found.name.file_name()
            )));
        }
        let files = std::iter::once(&found.entry.linux).chain(&found.entry.initrd);
        for file in files {
            let path = esp.file(file);
            if !path.is_file() {
                return Err(refuse(format!(
                    "its entry {} names {}, which is missing: the slot cannot boot; upgrade instead",
                    found.name.file_name(),
                    path.display()
                )));
            }
        }
        let version = found.entry.entry_version().os_version;
        let mut rec = facts::read_record(&self.paths.state)?;
        let mut attempt = Attempt {
            from_version: facts::running_version(&self.paths).unwrap_or_default(),
            from_slot: booted.letter().into(),
            to_version: version.clone(),
            to_slot: other.letter().into(),
            rollback: true,
            expect_ready,
            ..Attempt::default()
        };
        rec.attempt = Some(attempt.clone());
        facts::write_record(&self.paths.state, &rec)?;
        let mut entry = found.entry.clone();
        entry.version = Some(
            EntryVersion {
                generation: next_generation(&entries),
                os_version: version.clone(),
            }
            .render(),
        );
        if let Err(e) = esp.write_entry(&found.name, &entry) {
            attempt.outcome = Outcome::Failed {
                phase: record::PHASE_ENTRY.into(),
                reason: e.to_string(),
            };
            rec.attempt = Some(attempt);
            let _ = facts::write_record(&self.paths.state, &rec);
            return Err(e);
        }
        attempt.reach(record::PHASE_ENTRY, facts::now_ms());
        attempt.reach(record::PHASE_REBOOT, facts::now_ms());
        attempt.outcome = Outcome::Booting;
        rec.attempt = Some(attempt);
        if let Err(e) = facts::write_record(&self.paths.state, &rec) {
            tracing::warn!(error = %e, "rollback: the entry is switched but the record was not updated");
        }
        tracing::info!(version = %version, slot = other.letter(), "rollback: slot {} boots next", other.letter());
        Ok(RollbackDone {
            version,
            slot: other.letter().into(),
        })
    }

    /// Upgrades the inactive slot from `source` (see the module's documentation for the
    /// order), reporting on `progress` (a report the receiver is too slow for is
    /// dropped; a closed receiver changes nothing). Does not reboot: when
    /// [`UpgradeDone::rebooting`] is true the server asks PID 1 to.
    pub async fn upgrade(
        &self,
        source: BundleSource,
        options: UpgradeOptions,
        progress: mpsc::Sender<Progress>,
    ) -> Result<UpgradeDone, UpgradeError> {
        let _busy = self
            .busy
            .clone()
            .try_lock_owned()
            .map_err(|_| UpgradeError::Busy)?;
        let mut reader = install::BundleReader::new(source);
        let report = Reporter::new(progress);
        report
            .say("check", 0, 0, "reading the bundle's header")
            .await;
        let header = reader.header().await?;
        let manifest = header.manifest.clone();
        let announced = reader.announced_size();
        if announced != 0 && announced != header.bundle_size() {
            // A truncated file is refused here, before anything is written.
            return Err(UpgradeError::SizeMismatch {
                announced,
                expected: header.bundle_size(),
            });
        }
        self.verify_signature(&header)?;
        let plan = self.check(&manifest, &options).await?;
        if options.dry_run {
            return Ok(UpgradeDone {
                version: manifest.version,
                slot: plan.target.letter().into(),
                rebooting: false,
                dry_run: true,
            });
        }
        report
            .say(
                "check",
                0,
                0,
                &format!(
                    "every check passed: installing {} into slot {} ({})",
                    manifest.version,
                    plan.target.letter(),
                    plan.partition.device.display()
                ),
            )
            .await;
        let mut rec = plan.record.clone();
        rec.attempt = Some(Attempt {
            from_version: plan.running_version.clone(),
            from_slot: plan.target.other().letter().into(),
            to_version: manifest.version.clone(),
            to_slot: plan.target.letter().into(),
            expect_ready: options.expect_ready.clone(),
            ..Attempt::default()
        });
        facts::write_record(&self.paths.state, &rec)?;
        let mut attempt = Tracker {
            state: self.paths.state.clone(),
            record: rec,
        };
        match self
            .install(
                &mut reader,
                &plan,
                &manifest,
                &options,
                &report,
                &mut attempt,
            )
            .await
        {
            Ok(done) => Ok(done),
            Err(e) => {
                attempt.fail(&e);
                Err(e)
            }
        }
    }

    fn verify_signature(
        &self,
        header: &keelson_upgrade::bundle::Header,
    ) -> Result<(), UpgradeError> {
        let keys_dir = &self.paths.trusted_keys;
        let keys = keelson_upgrade::keys::TrustedKeys::load_dir(keys_dir).map_err(|source| {
            UpgradeError::Keys {
                keys_dir: keys_dir.clone(),
                source,
            }
        })?;
        keelson_upgrade::keys::verify(header, &keys).map_err(|source| UpgradeError::Signature {
            keys_dir: keys_dir.clone(),
            source,
        })?;
        Ok(())
    }

    /// Collects the node's facts and runs every check; any refusal ends the upgrade.
    async fn check(
        &self,
        manifest: &keelson_upgrade::manifest::Manifest,
        options: &UpgradeOptions,
    ) -> Result<install::Plan, UpgradeError> {
        let paths = &self.paths;
        let booted = facts::booted_slot(paths)?;
        let target = booted.other();
        let partition = facts::find_partition(paths, target)?;
        let running_version = facts::running_version(paths)?;
        let record = facts::read_record(&paths.state)?;
        let esp = Esp::new(&paths.esp);
        let node = keelson_upgrade::checks::NodeFacts {
            arch: facts::arch(),
            running_version: running_version.clone(),
            components: facts::components(paths)?,
            inactive_partition_bytes: partition.size,
            esp_free_bytes: esp.free_bytes()?,
            inactive_boot_files_bytes: esp.slot_files_size(target),
            config_version: facts::config_version(paths)?,
            record: record.clone(),
        };
        let check_options = keelson_upgrade::checks::CheckOptions {
            allow_downgrade: options.allow_downgrade,
            force: options.force,
        };
        let mut reasons: Vec<String> =
            keelson_upgrade::checks::check(manifest, &node, &check_options)
                .into_iter()
                .map(|r| r.to_string())
                .collect();
        let spool_free = match self.spool_free {
            Some(bytes) => bytes,
            None => spool::free_bytes(&paths.spool)?,
        };
        reasons.extend(spool::space_refusal(
            &paths.spool,
            manifest.parts_size(),
            spool_free,
        ));
        if !options.force
            && let Some(guard) = self.cluster_guard()
            && let Some(why) = guard.reboot_refusal().await
        {
            reasons.push(why);
        }
        if !reasons.is_empty() {
            tracing::warn!(version = %manifest.version, reasons = %reasons.join("; "), "upgrade refused; nothing was written");
            return Err(UpgradeError::Refused {
                version: manifest.version.clone(),
                reasons,
            });
        }
        Ok(install::Plan {
            target,
            partition,
            running_version,
            record,
        })
    }

    /// Everything after the checks: the writes, the verification, the entry.
    async fn install(
        &self,
        reader: &mut install::BundleReader,
        plan: &install::Plan,
        manifest: &keelson_upgrade::manifest::Manifest,
        options: &UpgradeOptions,
        report: &Reporter,
        attempt: &mut Tracker,
    ) -> Result<UpgradeDone, UpgradeError> {
        let slot = plan.target;
        let spool = spool::Spool::create(&self.paths.spool)?;
        let spool = spool::receive(reader, spool, manifest, report).await?;
        // The whole bundle is here and every part matched: from now on the slot is written.
        attempt.reach(record::PHASE_TRANSFER)?;
        let esp = Esp::new(&self.paths.esp);
        let deleted = esp.delete_slot_entries(slot)?;
        if !deleted.is_empty() {
            tracing::info!(slot = slot.letter(), entries = ?deleted, "upgrade: the inactive slot's entries were deleted");
        }
        esp.remove_slot_files(slot)?;
        let written = install::write_parts(spool, plan, manifest, &esp, report).await?;
        attempt.reach(record::PHASE_WRITE)?;
        report
            .say(
                record::PHASE_VERIFY,
                0,
                manifest.parts_size(),
                "reading back what was written",
            )
            .await;
        install::verify(written, manifest).await?;
        attempt.reach(record::PHASE_VERIFY)?;
        let entries = esp.entries()?;
        let mut cmdline = manifest.cmdline.trim().to_owned();
        if options.health_timeout_secs > 0 {
            cmdline.push_str(&format!(
                " {CMDLINE_HEALTH_TIMEOUT}={}",
                options.health_timeout_secs
            ));
        }
        let version = EntryVersion {
            generation: next_generation(&entries),
            os_version: manifest.version.clone(),
        };
        let entry = BootEntry::for_slot(slot, &version, &cmdline, &manifest.verity);
        let name = EntryName::new_trial(slot);
        report
            .say(
                record::PHASE_ENTRY,
                0,
                0,
                &format!(
                    "installing boot entry {} (on trial: {NEW_ENTRY_TRIES} tries to become healthy)",
                    name.file_name()
                ),
            )
            .await;
        esp.write_entry(&name, &entry)?;
        attempt.reach(record::PHASE_ENTRY)?;
        report
            .say(
                record::PHASE_ENTRY,
                0,
                0,
                &format!("boot entry {} written", name.file_name()),
            )
            .await;
        let rebooting = !options.stage;
        if rebooting {
            attempt.reach_with(record::PHASE_REBOOT, Outcome::Booting)?;
        } else {
            attempt.set_outcome(Outcome::Staged)?;
        }
        tracing::info!(version = %manifest.version, slot = slot.letter(), rebooting, "upgrade: slot {} is ready", slot.letter());
        Ok(UpgradeDone {
            version: manifest.version.clone(),
            slot: slot.letter().into(),
            rebooting,
            dry_run: false,
        })
    }
}

/// The attempt in STATE, written at each phase.
struct Tracker {
    state: PathBuf,
    record: UpgradeRecord,
}

impl Tracker {
    fn attempt(&mut self) -> &mut Attempt {
        self.record.attempt.get_or_insert_with(Attempt::default)
    }

    fn reach(&mut self, phase: &str) -> Result<(), UpgradeError> {
        self.attempt().reach(phase, facts::now_ms());
        facts::write_record(&self.state, &self.record)
    }

    fn reach_with(&mut self, phase: &str, outcome: Outcome) -> Result<(), UpgradeError> {
        self.attempt().reach(phase, facts::now_ms());
        self.set_outcome(outcome)
    }

    fn set_outcome(&mut self, outcome: Outcome) -> Result<(), UpgradeError> {
        self.attempt().outcome = outcome;
        facts::write_record(&self.state, &self.record)
    }

    /// Records the failure: the phase after the last reached, and why.
    fn fail(&mut self, error: &UpgradeError) {
        let attempt = self.attempt();
        let phase: String = match attempt.last_phase() {
            None => record::PHASE_TRANSFER.into(),
            Some(last) => record::PHASES
                .iter()
                .skip_while(|p| **p != last)
                .nth(1)
                .copied()
                .unwrap_or(last)
                .into(),
        };
        attempt.outcome = Outcome::Failed {
            phase: phase.clone(),
            reason: keelson_api::error_chain(error),
        };
        if let Err(e) = facts::write_record(&self.state, &self.record) {
            tracing::warn!(error = %e, "upgrade: the failure could not be recorded");
        }
        tracing::warn!(phase = %phase, error = %keelson_api::error_chain(error), "upgrade failed; the running slot is untouched");
    }
}

#[cfg(test)]
mod tests;
