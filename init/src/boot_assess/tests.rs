use std::io;
use std::time::Duration;

use keelson_configs::boot::{BootEntry, EntryVersion, VerityParams};
use keelson_configs::layout::Slot;
use keelson_node_protocol::upgrade::{
    Attempt, Outcome, PHASE_ENTRY, PHASE_HEALTHY, PHASE_REBOOT, PHASE_STAGE2, PHASE_TRANSFER,
    PHASE_VERIFY, PHASE_WRITE,
};

use super::decide::{self, Removal};
use super::*;
use crate::console::memory::MemoryLog;
use crate::supervisor::State;
use crate::syscalls::Linux;

fn entry(slot: Slot, generation: u64, version: &str, roothash: &str) -> BootEntry {
    BootEntry::for_slot(
        slot,
        &EntryVersion {
            generation,
            os_version: version.into(),
        },
        "console=ttyS0",
        &VerityParams {
            roothash: roothash.into(),
            salt: "00".into(),
            data_blocks: 1,
            hash_offset: 4096,
        },
    )
}

/// An entry file of ours, named `name`, booting `slot` at `roothash`.
fn ours(name: &str, generation: u64, version: &str, roothash: &str) -> EntryFile {
    let slot = EntryName::parse(name).map_or(Slot::A, |n| n.slot);
    EntryFile {
        file_name: name.into(),
        entry: Some(entry(slot, generation, version, roothash)),
    }
}

fn other(name: &str) -> EntryFile {
    EntryFile {
        file_name: name.into(),
        entry: None,
    }
}

fn booted(slot: Slot, roothash: &str) -> Booted {
    Booted {
        slot,
        roothash: Some(roothash.into()),
    }
}

/// The attempt machined leaves when it reboots into slot b.
fn upgrading_to_b() -> UpgradeRecord {
    let mut attempt = Attempt {
        from_version: "0.1.0".into(),
        from_slot: "a".into(),
        to_version: "0.3.0".into(),
        to_slot: "b".into(),
        outcome: Outcome::Booting,
        ..Attempt::default()
    };
    for (i, phase) in [
        PHASE_TRANSFER,
        PHASE_WRITE,
        PHASE_VERIFY,
        PHASE_ENTRY,
        PHASE_REBOOT,
    ]
    .iter()
    .enumerate()
    {
        attempt.reach(phase, i as u64);
    }
    UpgradeRecord {
        attempt: Some(attempt),
        failed: Vec::new(),
    }
}

fn removal(name: &str, after_record: bool) -> (String, bool) {
    (name.to_string(), after_record)
}

fn removals(found: &[Removal]) -> Vec<(String, bool)> {
    found
        .iter()
        .map(|r| (r.file_name.clone(), r.after_record))
        .collect()
}

#[test]
fn an_exhausted_entry_of_the_other_slot_is_a_failed_version() {
    let files = [
        ours("keelson-a.conf", 1, "0.1.0", "aa"),
        ours("keelson-b+0-3.conf", 2, "0.3.0", "bb"),
    ];
    // Never reached stage 2: a panic, a hang, a reset.
    let found = decide::hygiene(&files, &booted(Slot::A, "aa"), &upgrading_to_b(), 77);
    assert_eq!(
        removals(&found.removals),
        [removal("keelson-b+0-3.conf", true)]
    );
    let reason =
        "the new kernel or stage 1 never reached stage 2 (panic, hang or reset) in 3 tries";
    let attempt = found.record.attempt.clone().unwrap_or_default();
    assert_eq!(
        attempt.outcome,
        Outcome::Failed {
            phase: PHASE_STAGE2.into(),
            reason: reason.into()
        }
    );
    assert_eq!(attempt.tries_used, Some(3));
    let failed = found.record.has_failed("0.3.0").cloned();
    assert_eq!(
        failed.map(|f| (f.phase, f.reason, f.at_ms)),
        Some((PHASE_STAGE2.into(), reason.into(), 77))
    );
    assert_eq!(found.trial, None, "a blessed slot is not on trial");
    assert_eq!(
        found.said,
        [format!(
            "slot b fell back: 0.3.0 failed at stage2 ({reason}); it is refused from now on unless forced"
        )]
    );

    // Reached stage 2, gave up at the deadline: the reason that boot recorded.
    let mut record = upgrading_to_b();
    if let Some(a) = record.attempt.as_mut() {
        a.reach(PHASE_STAGE2, 9);
        a.unhealthy_reason = Some("machined not ready after 300 s".into());
    }
    let found = decide::hygiene(&files, &booted(Slot::A, "aa"), &record, 77);
    assert_eq!(
        found.record.attempt.map(|a| a.outcome),
        Some(Outcome::Failed {
            phase: PHASE_HEALTHY.into(),
            reason: "machined not ready after 300 s".into()
        })
    );

    // No attempt in STATE (lost with a reset): the version is still refused, once.
    let found = decide::hygiene(&files, &booted(Slot::A, "aa"), &UpgradeRecord::default(), 1);
    assert_eq!(found.record.attempt, None);
    assert_eq!(found.record.failed.len(), 1);
    let again = decide::hygiene(&files, &booted(Slot::A, "aa"), &found.record, 2);
    assert_eq!(again.record.failed, found.record.failed);
}

#[test]
fn a_trial_boot_records_stage2_and_its_tries() {
    let files = [
        ours("keelson-a.conf", 1, "0.1.0", "aa"),
        ours("keelson-b+2-1.conf", 2, "0.3.0", "bb"),
    ];
    let found = decide::hygiene(&files, &booted(Slot::B, "bb"), &upgrading_to_b(), 50);
    assert!(found.removals.is_empty(), "{:?}", found.removals);
    let trial = found.trial.clone().unwrap_or_else(|| panic!("no trial"));
    assert_eq!((trial.tries_used(), trial.tries_total()), (1, 3));
    let attempt = found.record.attempt.clone().unwrap_or_default();
    assert_eq!(attempt.last_phase(), Some(PHASE_STAGE2));
    assert_eq!(attempt.booted_entry.as_deref(), Some("keelson-b+2-1.conf"));
    assert_eq!(attempt.tries_used, Some(1));
    assert_eq!(attempt.from_version, "0.1.0", "machined's attempt is kept");
    assert_eq!(
        found.said,
        ["slot b on trial: 0.3.0, try 1 of 3; blessed once healthy"]
    );

    // A fresh image's first boot: an attempt of its own, from nothing.
    let files = [ours("keelson-a+2-1.conf", 1, "0.1.0", "aa")];
    let found = decide::hygiene(&files, &booted(Slot::A, "aa"), &UpgradeRecord::default(), 5);
    let attempt = found.record.attempt.unwrap_or_default();
    assert_eq!(
        (
            attempt.from_version.as_str(),
            attempt.to_version.as_str(),
            attempt.to_slot.as_str()
        ),
        ("", "0.1.0", "a")
    );
    assert_eq!(attempt.outcome, Outcome::Booting);

    // A blessed entry with nothing open: nothing to prove.
    let files = [ours("keelson-a.conf", 1, "0.1.0", "aa")];
    let found = decide::hygiene(&files, &booted(Slot::A, "aa"), &UpgradeRecord::default(), 5);
    assert_eq!(
        (found.trial, found.record),
        (None, UpgradeRecord::default())
    );
}

#[test]
fn hygiene_repairs_odd_entry_sets_and_leaves_others_alone() {
    let files = [
        other("debian.conf"),
        other(".keelson-upgrade.keelson-b+3-0.conf.17.0"),
        ours("keelson-a+1-2.conf", 3, "0.2.0", "aa"),
        // Slot a's old root, gone from the partition.
        ours("keelson-a.conf", 1, "0.1.0", "old"),
        // The same root twice: the newest generation stays.
        ours("keelson-a+3-0.conf", 2, "0.2.0", "aa"),
        ours("keelson-b.conf", 1, "0.1.5", "b1"),
        ours("keelson-b+2-1.conf", 4, "0.1.6", "b2"),
    ];
    let found = decide::hygiene(&files, &booted(Slot::A, "aa"), &UpgradeRecord::default(), 1);
    assert_eq!(
        removals(&found.removals),
        [
            removal(".keelson-upgrade.keelson-b+3-0.conf.17.0", false),
            removal("keelson-a.conf", false),
            removal("keelson-a+3-0.conf", false),
        ]
    );
    assert_eq!(
        found.trial.map(|t| t.entry.file_name()),
        Some("keelson-a+1-2.conf".to_string())
    );
    assert!(
        found
            .said
            .contains(&"2 entries boot slot b (keelson-b.conf, keelson-b+2-1.conf): left alone, the loader picks the newest".to_string()),
        "{:?}",
        found.said
    );

    // The booted root in no entry: nothing of the slot is touched.
    let found = decide::hygiene(
        &files[3..4],
        &booted(Slot::A, "aa"),
        &UpgradeRecord::default(),
        1,
    );
    assert!(found.removals.is_empty());
    assert_eq!(found.trial, None);
}

#[test]
fn an_upgrade_cut_by_a_restart_is_failed_at_its_next_phase() {
    let mut record = upgrading_to_b();
    if let Some(a) = record.attempt.as_mut() {
        a.phases.truncate(2);
        a.outcome = Outcome::InProgress;
    }
    let files = [ours("keelson-a.conf", 1, "0.1.0", "aa")];
    let found = decide::hygiene(&files, &booted(Slot::A, "aa"), &record, 1);
    assert!(matches!(
        found.record.attempt.map(|a| a.outcome),
        Some(Outcome::Failed { phase, .. }) if phase == PHASE_VERIFY
    ));
    assert!(found.record.failed.is_empty(), "nothing of 0.3.0 ran");
}

fn service(name: &str, state: State, restarts: u32) -> ServiceStatus {
    ServiceStatus {
        name: name.into(),
        state,
        pid: None,
        restarts,
        last_exit: None,
        depends_on: Vec::new(),
        autostart: true,
    }
}

#[test]
fn health_needs_containerd_machined_and_what_was_started() {
    let ready = [
        service("containerd", State::Ready, 0),
        service("machined", State::Ready, 0),
        service("kubelet", State::Stopped, 0),
    ];
    assert!(decide::unmet(ConfigState::Applied, &ready, &[]).is_empty());
    let mut starting = ready.to_vec();
    starting[1].state = State::Starting;
    starting.push(service("etcd", State::Waiting, 0));
    starting.push(service("web", State::Backoff, 4));
    assert_eq!(
        decide::unmet(ConfigState::Applied, &starting, &[]),
        [
            "machined not ready",
            "etcd not ready",
            "web failing (4 restarts)"
        ]
    );
    // Maintenance mode: machined alone.
    let machined = [service("machined", State::Ready, 0)];
    assert!(decide::unmet(ConfigState::Maintenance, &machined, &[]).is_empty());
    assert_eq!(
        decide::unmet(ConfigState::Pending, &machined, &[]),
        ["no config applied and maintenance mode not serving"]
    );
}

/// etcd and the kubelet ready before the upgrade (machined recorded them in the attempt):
/// the new slot is not healthy until they are ready again, not merely once machined and
/// containerd are, before machined even started them.
#[test]
fn what_was_ready_before_the_upgrade_must_be_ready_again() {
    let mut record = upgrading_to_b();
    if let Some(a) = record.attempt.as_mut() {
        a.expect_ready = vec!["etcd".into(), "kubelet".into()];
    }
    let on_b = trial("keelson-b+2-1.conf");
    let expected = decide::expected_ready(&record, &on_b);
    assert_eq!(expected, ["etcd", "kubelet"]);
    // A trial of the other slot (the attempt is not its own) expects nothing.
    assert!(decide::expected_ready(&record, &trial("keelson-a+2-1.conf")).is_empty());

    let mut services = vec![
        service("containerd", State::Ready, 0),
        service("machined", State::Ready, 0),
    ];
    assert_eq!(
        decide::unmet(ConfigState::Applied, &services, &expected),
        [
            "etcd not ready (it was before the upgrade)",
            "kubelet not ready (it was before the upgrade)"
        ]
    );
    assert!(decide::unmet(ConfigState::Applied, &services, &[]).is_empty());
    services.push(service("etcd", State::Ready, 0));
    services.push(service("kubelet", State::Stopped, 0));
    assert_eq!(
        decide::unmet(ConfigState::Applied, &services, &expected),
        ["kubelet not ready (it was before the upgrade)"]
    );
    services[3].state = State::Ready;
    assert!(decide::unmet(ConfigState::Applied, &services, &expected).is_empty());

    let line = decide::bless(&mut record, &on_b, Duration::from_secs(80), 9);
    assert_eq!(
        line,
        "slot b blessed (0.2.0, healthy after 80 s, try 1 of 3; etcd and kubelet ready again)"
    );
}

fn trial(name: &str) -> Trial {
    let entry = EntryName::parse(name).unwrap_or_else(|| panic!("{name}"));
    Trial {
        slot: entry.slot,
        entry,
        version: "0.2.0".into(),
        fallback: false,
    }
}

#[test]
fn the_deadline_gives_a_trial_up_and_reboots_only_when_the_loader_can_choose() {
    let unmet = vec!["machined not ready".to_string()];
    let deadline = Duration::from_secs(300);
    let t = trial("keelson-b+2-1.conf");
    assert_eq!(
        decide::judge(&t, &[], Duration::from_secs(400), deadline),
        Verdict::Healthy
    );
    assert_eq!(
        decide::judge(&t, &unmet, Duration::from_secs(299), deadline),
        Verdict::Waiting
    );
    let gave_up = Verdict::GiveUp {
        reason: "machined not ready after 300 s".into(),
        reboot: true,
    };
    assert_eq!(decide::judge(&t, &unmet, deadline, deadline), gave_up);
    // The last try boots at +0-3 (the loader counts first): with slot a blessed, it
    // reboots so that the loader falls back; with nothing else to boot, it runs on.
    let mut last_try = trial("keelson-b+0-3.conf");
    last_try.fallback = true;
    assert!(matches!(
        decide::judge(&last_try, &unmet, deadline, deadline),
        Verdict::GiveUp { reboot: true, .. }
    ));
    let mut record = upgrading_to_b();
    assert_eq!(
        decide::give_up(
            &mut record,
            &last_try,
            "machined not ready after 300 s",
            true
        ),
        "slot b not healthy: machined not ready after 300 s; rebooting: that was its last try, the loader falls back to slot a"
    );
    let exhausted = trial("keelson-b+0-3.conf");
    assert!(matches!(
        decide::judge(&exhausted, &unmet, deadline, deadline),
        Verdict::GiveUp { reboot: false, .. }
    ));
    let mut record = upgrading_to_b();
    let line = decide::give_up(&mut record, &t, "machined not ready after 300 s", true);
    assert_eq!(
        line,
        "slot b not healthy: machined not ready after 300 s; rebooting: the loader tries it 2 more time(s), then falls back to slot a"
    );
    let attempt = record.attempt.unwrap_or_default();
    assert_eq!(attempt.outcome, Outcome::Booting);
    assert_eq!(
        attempt.unhealthy_reason.as_deref(),
        Some("machined not ready after 300 s")
    );
}

#[test]
fn blessing_records_healthy_and_says_the_try() {
    let mut record = upgrading_to_b();
    let line = decide::bless(
        &mut record,
        &trial("keelson-b+2-1.conf"),
        Duration::from_secs(42),
        9,
    );
    assert_eq!(
        line,
        "slot b blessed (0.2.0, healthy after 42 s, try 1 of 3)"
    );
    let attempt = record.attempt.unwrap_or_default();
    assert_eq!(attempt.outcome, Outcome::Blessed);
    assert_eq!(attempt.last_phase(), Some(PHASE_HEALTHY));
    assert!(attempt.reached(PHASE_STAGE2));
    assert_eq!(attempt.tries_used, Some(1));
}

/// An ESP with `entries` (name, content) and a STATE directory.
struct Disks {
    esp: tempfile::TempDir,
    state: tempfile::TempDir,
}

impl Disks {
    fn new(files: &[EntryFile]) -> io::Result<Disks> {
        let esp = tempfile::tempdir()?;
        let dir = esp.path().join(ENTRIES_DIR);
        fs::create_dir_all(&dir)?;
        for f in files {
            let text = f
                .entry
                .as_ref()
                .map_or("title other\n".into(), |e| e.render());
            fs::write(dir.join(&f.file_name), text)?;
        }
        Ok(Disks {
            esp,
            state: tempfile::tempdir()?,
        })
    }

    fn names(&self) -> io::Result<Vec<String>> {
        let mut names: Vec<String> = fs::read_dir(self.esp.path().join(ENTRIES_DIR))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<io::Result<_>>()?;
        names.sort();
        Ok(names)
    }

    fn record(&self) -> UpgradeRecord {
        let bytes = fs::read(self.state.path().join(UPGRADE_RECORD)).unwrap_or_default();
        UpgradeRecord::parse(&bytes).unwrap_or_default()
    }
}

#[test]
fn a_failed_entry_is_removed_only_once_state_keeps_the_failure() -> io::Result<()> {
    let disks = Disks::new(&[
        other("debian.conf"),
        other(".keelson-upgrade.keelson-b+3-0.conf.1.0"),
        ours("keelson-a.conf", 1, "0.1.0", "aa"),
        ours("keelson-b+0-3.conf", 2, "0.3.0", "bb"),
    ])?;
    fs::write(
        disks.state.path().join(UPGRADE_RECORD),
        upgrading_to_b().to_bytes(),
    )?;
    let slot_b = disks.esp.path().join("keelson/b");
    fs::create_dir_all(&slot_b)?;
    fs::write(slot_b.join(".keelson-upgrade.vmlinuz.5.0"), "half a kernel")?;
    fs::write(slot_b.join("vmlinuz"), "a kernel")?;
    let log = MemoryLog::default();
    let esp = disks.esp.path().to_path_buf();
    let deadline = Duration::from_secs(300);
    // A first boot's STATE is not there yet: the entry stays.
    let mut assess = BootAssess::on_esp(
        &Linux,
        &log,
        esp.clone(),
        &booted(Slot::A, "aa"),
        None,
        deadline,
    );
    assert_eq!(
        disks.names()?,
        ["debian.conf", "keelson-a.conf", "keelson-b+0-3.conf"]
    );
    assert!(!slot_b.join(".keelson-upgrade.vmlinuz.5.0").exists());
    assert!(slot_b.join("vmlinuz").exists());
    // STATE appears (read the way the boot reads it) and keeps the failure; then it goes.
    let mut assess_with_state = BootAssess::on_esp(
        &Linux,
        &log,
        esp,
        &booted(Slot::A, "aa"),
        Some(disks.state.path()),
        deadline,
    );
    assert_eq!(disks.names()?, ["debian.conf", "keelson-a.conf"]);
    assert!(disks.record().has_failed("0.3.0").is_some());
    assert!(!assess.check(&Linux, &log, ConfigState::Applied, &[], None));
    assert!(!assess_with_state.check(
        &Linux,
        &log,
        ConfigState::Applied,
        &[],
        Some(disks.state.path())
    ));
    let lines = log.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with("keelson-b+0-3.conf (its failure is recorded in STATE)")),
        "{lines:?}"
    );
    Ok(())
}

#[test]
fn a_healthy_trial_is_renamed_and_recorded_blessed() -> io::Result<()> {
    let disks = Disks::new(&[
        ours("keelson-a.conf", 1, "0.1.0", "aa"),
        ours("keelson-b+2-1.conf", 2, "0.2.0", "bb"),
    ])?;
    let log = MemoryLog::default();
    let state = Some(disks.state.path());
    let deadline = Duration::from_secs(300);
    let mut assess = BootAssess::on_esp(
        &Linux,
        &log,
        disks.esp.path().to_path_buf(),
        &booted(Slot::B, "bb"),
        state,
        deadline,
    );
    assert_eq!(disks.record().attempt.map(|a| a.phases.len()), Some(1));
    assert!(assess.deadline_in().is_some());
    let services = [
        service("containerd", State::Ready, 0),
        service("machined", State::Starting, 0),
    ];
    assert!(!assess.check(&Linux, &log, ConfigState::Applied, &services, state));
    assert_eq!(disks.names()?, ["keelson-a.conf", "keelson-b+2-1.conf"]);
    let services = [
        service("containerd", State::Ready, 0),
        service("machined", State::Ready, 0),
    ];
    assert!(!assess.check(&Linux, &log, ConfigState::Applied, &services, state));
    assert_eq!(disks.names()?, ["keelson-a.conf", "keelson-b.conf"]);
    let attempt = disks.record().attempt.unwrap_or_default();
    assert_eq!(attempt.outcome, Outcome::Blessed);
    assert_eq!(attempt.booted_entry.as_deref(), Some("keelson-b+2-1.conf"));
    assert_eq!(assess.deadline_in(), None, "done");
    assert!(
        log.lines().iter().any(|l| l
            .starts_with("keelson-init: slot b blessed (0.2.0, healthy after 0 s, try 1 of 3)")),
        "{:?}",
        log.lines()
    );
    Ok(())
}

#[test]
fn a_trial_past_its_deadline_records_why_and_asks_for_a_reboot() -> io::Result<()> {
    let disks = Disks::new(&[ours("keelson-b+1-2.conf", 2, "0.2.0", "bb")])?;
    let log = MemoryLog::default();
    let state = Some(disks.state.path());
    let mut assess = BootAssess::on_esp(
        &Linux,
        &log,
        disks.esp.path().to_path_buf(),
        &booted(Slot::B, "bb"),
        state,
        Duration::ZERO,
    );
    let services = [service("containerd", State::Ready, 0)];
    assert!(assess.check(&Linux, &log, ConfigState::Applied, &services, state));
    assert!(
        !assess.check(&Linux, &log, ConfigState::Applied, &services, state),
        "once"
    );
    assert_eq!(disks.names()?, ["keelson-b+1-2.conf"]);
    let attempt = disks.record().attempt.unwrap_or_default();
    assert_eq!(attempt.outcome, Outcome::Booting);
    assert_eq!(
        attempt.unhealthy_reason.as_deref(),
        Some("machined not ready after 0 s")
    );
    Ok(())
}

#[test]
fn pinning_variables_are_removed_and_named() -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut value = vec![7, 0, 0, 0];
    for unit in "keelson-b+3-0.conf".encode_utf16().chain([0]) {
        value.extend(unit.to_le_bytes());
    }
    let name = format!("LoaderEntryDefault-{LOADER_GUID}");
    fs::write(dir.path().join(&name), &value)?;
    fs::write(
        dir.path().join(format!("LoaderTimeInitUSec-{LOADER_GUID}")),
        [7, 0, 0, 0],
    )?;
    let done = remove_pinning_variables(&Linux, dir.path());
    assert_eq!(
        done,
        [Ok(
            "EFI variable LoaderEntryDefault (it pinned \"keelson-b+3-0.conf\") removed"
                .to_string()
        )]
    );
    assert!(!dir.path().join(name).exists());
    assert!(
        dir.path()
            .join(format!("LoaderTimeInitUSec-{LOADER_GUID}"))
            .exists()
    );
    Ok(())
}

#[test]
fn the_health_deadline_comes_from_the_command_line() {
    assert_eq!(health_deadline("quiet").0, Duration::from_secs(300));
    assert_eq!(
        health_deadline("keelson.upgrade.health_timeout=45").0,
        Duration::from_secs(45)
    );
    let (d, said) = health_deadline("keelson.upgrade.health_timeout=5m");
    assert_eq!(d, Duration::from_secs(300));
    assert!(said.is_some());
}
