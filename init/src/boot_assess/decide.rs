//! The boot assessment's decisions, free of I/O: what the entries on the ESP, the booted
//! slot and STATE's upgrade record say (loader hygiene, a fallen-back slot, a slot on
//! trial), whether the node is healthy, and what blessing or giving up writes. The
//! shell ([`super`]) reads the files, asks, and carries the answers out.

use std::time::Duration;

use keelson_configs::boot::{BootEntry, EntryName, FoundEntry, boot_order};
use keelson_configs::layout::{CMDLINE_VERITY_ROOTHASH, Slot, cmdline_value, parse_cmdline};
use keelson_node_protocol::upgrade::{
    Attempt, FailedVersion, Outcome, PHASE_HEALTHY, PHASE_STAGE2, PHASES, UpgradeRecord,
};

use crate::supervisor::{ServiceStatus, State};

/// What marks a temporary file of ours in the entries' directory (machined's
/// `.keelson-upgrade.*`, or an atomic write's `.keelson-b+3-0.conf.tmp.*`): no writer runs
/// while PID 1 looks at boot, so any such file is an interrupted write's.
pub const TEMPORARY_PREFIX: &str = ".keelson-";

/// The booted slot and root, from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booted {
    /// `keelson.slot`.
    pub slot: Slot,
    /// `keelson.verity.roothash`, when the command line has it.
    pub roothash: Option<String>,
}

/// One file of the entries' directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryFile {
    /// Its name.
    pub file_name: String,
    /// Its content, parsed, when the name is one of ours and the file could be read.
    pub entry: Option<BootEntry>,
}

/// An entry file to remove, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    /// The file's name in the entries' directory.
    pub file_name: String,
    /// Why, as the console says it.
    pub why: String,
    /// Removed only once the record that says why is kept in STATE (a failed slot's
    /// entry: removing it first could lose the failure).
    pub after_record: bool,
}

/// The booted slot's entry, when the boot has something to prove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trial {
    /// The booted slot.
    pub slot: Slot,
    /// The booted entry, as the loader named it (`keelson-b+2-1.conf`).
    pub entry: EntryName,
    /// The OS version the entry boots.
    pub version: String,
    /// Whether the other slot has an entry the loader would boot (blessed, or with tries
    /// left): the last try's entry is already at `+0-N` when it boots, so a trial without
    /// tries left reboots when the loader has that to fall back to.
    pub fallback: bool,
}

impl Trial {
    /// The entry has a counter: blessing renames it, and a boot that gives up reboots
    /// (the loader's counter then decides).
    pub fn on_trial(&self) -> bool {
        self.entry.on_trial()
    }

    /// Tries used, this one included (the loader counts before it boots).
    pub fn tries_used(&self) -> u32 {
        self.entry.tries_done
    }

    /// Tries the entry had in all.
    pub fn tries_total(&self) -> u32 {
        self.entry.tries_left.unwrap_or(0) + self.entry.tries_done
    }
}

/// What hygiene found and decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hygiene {
    /// Files to remove.
    pub removals: Vec<Removal>,
    /// The record after this boot's findings.
    pub record: UpgradeRecord,
    /// Lines for the console (what was found, what happens).
    pub said: Vec<String>,
    /// The booted slot's entry to assess, if any.
    pub trial: Option<Trial>,
}

/// Whether an attempt is still open (neither blessed nor failed).
fn open(attempt: &Attempt) -> bool {
    matches!(
        attempt.outcome,
        Outcome::InProgress | Outcome::Staged | Outcome::Booting
    )
}

/// Whether `entry` boots the root `roothash`.
fn boots_root(entry: &BootEntry, roothash: &str) -> bool {
    cmdline_value(&parse_cmdline(&entry.options), CMDLINE_VERITY_ROOTHASH) == Some(roothash)
}

/// Hygiene at boot: interrupted writes, duplicate and stale entries of the booted slot, a
/// fallen-back other slot (its entry without tries left), an interrupted upgrade, and the
/// booted slot's trial recorded (`stage2`).
pub fn hygiene(
    files: &[EntryFile],
    booted: &Booted,
    record: &UpgradeRecord,
    now_ms: u64,
) -> Hygiene {
    let mut out = Hygiene {
        removals: Vec::new(),
        record: record.clone(),
        said: Vec::new(),
        trial: None,
    };
    let mut ours = Vec::new();
    for file in files {
        if file.file_name.starts_with(TEMPORARY_PREFIX) {
            out.removals.push(Removal {
                file_name: file.file_name.clone(),
                why: "an interrupted write's temporary file".into(),
                after_record: false,
            });
        } else if let (Some(name), Some(entry)) = (EntryName::parse(&file.file_name), &file.entry) {
            ours.push(FoundEntry {
                name,
                entry: entry.clone(),
            });
        }
    }
    let booted_entry = booted_slot_entries(&ours, booted, &mut out);
    for found in ours.iter().filter(|f| f.name.slot != booted.slot) {
        if found.name.exhausted() {
            fallen_back(found, &mut out, now_ms);
        }
    }
    let others: Vec<&FoundEntry> = ours
        .iter()
        .filter(|f| f.name.slot != booted.slot && !f.name.exhausted())
        .collect();
    if others.len() > 1 {
        out.said.push(format!(
            "{} entries boot slot {} ({}): left alone, the loader picks the newest",
            others.len(),
            booted.slot.other().letter(),
            others
                .iter()
                .map(|f| f.name.file_name())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    interrupted(&ours, booted, &mut out);
    if let Some(found) = booted_entry {
        let from = others
            .iter()
            .find(|f| !f.name.on_trial())
            .map(|f| (f.entry.entry_version().os_version, f.name.slot));
        let fallback = !others.is_empty();
        on_trial(&found, from, fallback, booted, &mut out, now_ms);
    }
    out
}

/// The booted slot's entry: the first in boot order of those that boot the booted root.
/// The slot's other entries cannot boot (another root, gone from the partition) or
/// duplicate it: removed.
fn booted_slot_entries(
    ours: &[FoundEntry],
    booted: &Booted,
    out: &mut Hygiene,
) -> Option<FoundEntry> {
    let mine: Vec<FoundEntry> = ours
        .iter()
        .filter(|f| f.name.slot == booted.slot)
        .cloned()
        .collect();
    let Some(roothash) = &booted.roothash else {
        return boot_order(&mine).first().map(|f| (*f).clone());
    };
    let (matching, stale): (Vec<FoundEntry>, Vec<FoundEntry>) = mine
        .into_iter()
        .partition(|f| boots_root(&f.entry, roothash));
    let ordered = boot_order(&matching);
    let Some(first) = ordered.first().map(|f| (*f).clone()) else {
        if !stale.is_empty() {
            out.said.push(format!(
                "no entry of slot {} boots the running root {roothash}: its entries are left alone",
                booted.slot.letter()
            ));
        }
        return None;
    };
    for f in stale {
        out.removals.push(Removal {
            file_name: f.name.file_name(),
            why: format!(
                "slot {} now holds another root, so this entry cannot boot",
                booted.slot.letter()
            ),
            after_record: false,
        });
    }
    for f in ordered.iter().skip(1) {
        out.removals.push(Removal {
            file_name: f.name.file_name(),
            why: format!("a duplicate of {}", first.name.file_name()),
            after_record: false,
        });
    }
    Some(first)
}

/// The other slot's entry has no tries left: the loader fell back from it, so that
/// version failed here.
fn fallen_back(found: &FoundEntry, out: &mut Hygiene, now_ms: u64) {
    let slot = found.name.slot;
    let version = found.entry.entry_version().os_version;
    let tries = found.name.tries_done;
    let attempt = out
        .record
        .attempt
        .as_mut()
        .filter(|a| a.to_slot == slot.letter() && open(a));
    let (phase, reason) = match attempt {
        Some(attempt) => {
            let (phase, reason) = if attempt.reached(PHASE_STAGE2) {
                let reason = attempt.unhealthy_reason.clone().unwrap_or_else(|| {
                    format!(
                        "stage 2 ran but the slot did not become healthy in {tries} tries, and \
                         no boot reached its health deadline (a crash, a reset or a power cut \
                         ended each)"
                    )
                });
                (PHASE_HEALTHY, reason)
            } else {
                let reason = format!(
                    "the new kernel or stage 1 never reached stage 2 (panic, hang or reset) in \
                     {tries} tries"
                );
                (PHASE_STAGE2, reason)
            };
            attempt.outcome = Outcome::Failed {
                phase: phase.into(),
                reason: reason.clone(),
            };
            attempt.tries_used = Some(tries);
            attempt
                .booted_entry
                .get_or_insert_with(|| found.name.file_name());
            (phase, reason)
        }
        None => (
            PHASE_STAGE2,
            format!(
                "the loader gave slot {} up after {tries} tries (STATE holds no upgrade to it)",
                slot.letter()
            ),
        ),
    };
    if out.record.has_failed(&version).is_none() {
        out.record.failed.push(FailedVersion {
            version: version.clone(),
            phase: phase.into(),
            reason: reason.clone(),
            at_ms: now_ms,
        });
    }
    out.said.push(format!(
        "slot {} fell back: {version} failed at {phase} ({reason}); it is refused from now on \
         unless forced",
        slot.letter()
    ));
    out.removals.push(Removal {
        file_name: found.name.file_name(),
        why: format!("slot {} failed and has no tries left", slot.letter()),
        after_record: true,
    });
}

/// An upgrade left in progress by a restart (machined never writes across a boot): failed
/// at the phase after the last it reached, unless its slot still has an entry to try.
fn interrupted(ours: &[FoundEntry], booted: &Booted, out: &mut Hygiene) {
    let Some(attempt) = out.record.attempt.as_mut() else {
        return;
    };
    let to_try = ours
        .iter()
        .any(|f| f.name.slot.letter() == attempt.to_slot && !f.name.exhausted());
    if attempt.outcome != Outcome::InProgress || attempt.to_slot == booted.slot.letter() || to_try {
        return;
    }
    let next = attempt
        .last_phase()
        .and_then(|last| PHASES.iter().position(|p| *p == last))
        .map_or(PHASES[0], |i| {
            PHASES.get(i + 1).copied().unwrap_or(PHASE_HEALTHY)
        });
    let reason = "interrupted: the node restarted during the upgrade (a power cut or a reset)";
    attempt.outcome = Outcome::Failed {
        phase: next.into(),
        reason: reason.into(),
    };
    out.said.push(format!(
        "the upgrade to {} was interrupted at {next}: the node runs slot {} as before",
        attempt.to_version,
        booted.slot.letter()
    ));
}

/// The booted slot's entry: on trial (a counter), or blessed with an upgrade of this slot
/// still open (a rollback, or a blessing cut short before its record): recorded as
/// `stage2`, and assessed.
fn on_trial(
    found: &FoundEntry,
    from: Option<(String, Slot)>,
    fallback: bool,
    booted: &Booted,
    out: &mut Hygiene,
    now_ms: u64,
) {
    let slot = booted.slot.letter();
    let has_open = out
        .record
        .attempt
        .as_ref()
        .is_some_and(|a| a.to_slot == slot && open(a));
    if !found.name.on_trial() && !has_open {
        return;
    }
    let trial = Trial {
        slot: booted.slot,
        entry: found.name,
        version: found.entry.entry_version().os_version,
        fallback,
    };
    let attempt = open_attempt(&mut out.record, &trial, from);
    attempt.reach(PHASE_STAGE2, now_ms);
    attempt.booted_entry = Some(found.name.file_name());
    if trial.on_trial() {
        attempt.tries_used = Some(trial.tries_used());
        attempt.outcome = Outcome::Booting;
        out.said.push(format!(
            "slot {slot} on trial: {}, try {} of {}; blessed once healthy",
            trial.version,
            trial.tries_used(),
            trial.tries_total()
        ));
    }
    out.trial = Some(trial);
}

/// The open attempt of the trial's slot, or a new one (a fresh image's first boot, or a
/// record lost with STATE).
fn open_attempt<'r>(
    record: &'r mut UpgradeRecord,
    trial: &Trial,
    from: Option<(String, Slot)>,
) -> &'r mut Attempt {
    let slot = trial.slot.letter();
    let keep = record
        .attempt
        .as_ref()
        .is_some_and(|a| a.to_slot == slot && open(a));
    if !keep {
        let (from_version, from_slot) = from
            .map(|(v, s)| (v, s.letter().to_string()))
            .unwrap_or_default();
        record.attempt = Some(Attempt {
            from_version,
            from_slot,
            to_version: trial.version.clone(),
            to_slot: slot.into(),
            outcome: Outcome::Booting,
            ..Attempt::default()
        });
    }
    record.attempt.get_or_insert_with(Attempt::default)
}

/// Where the node's config stands, for the health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigState {
    /// A config was applied (the boot plan ran).
    Applied,
    /// No config: machined serves maintenance mode.
    Maintenance,
    /// Neither yet (looking for one, maintenance mode not serving).
    Pending,
}

/// Services whose readiness counts once they were started (by machined: a control
/// plane's etcd, the kubelet).
pub const READY_IF_STARTED: &[&str] = keelson_node_protocol::upgrade::COMEBACK_SERVICES;

/// The services the trial's attempt says were ready before the upgrade (machined
/// records them): the trial is healthy only once they are ready again. None for a trial
/// without an attempt of its own (a fresh image's first boot).
pub fn expected_ready(record: &UpgradeRecord, trial: &Trial) -> Vec<String> {
    record
        .attempt
        .as_ref()
        .filter(|a| a.to_slot == trial.slot.letter() && open(a))
        .map(|a| a.expect_ready.clone())
        .unwrap_or_default()
}

/// What keeps the node from being healthy; empty when it is. Healthy: the config applied,
/// containerd and machined ready, etcd and the kubelet ready if they were started or if
/// they were ready before the upgrade (`expected`), and no service failing. In
/// maintenance mode (no config) machined ready is enough: a node without a config cannot
/// prove more, and a fresh image is blessed at its first boot.
pub fn unmet(config: ConfigState, services: &[ServiceStatus], expected: &[String]) -> Vec<String> {
    let mut unmet = Vec::new();
    let state = |name: &str| services.iter().find(|s| s.name == name).map(|s| s.state);
    let mut required = vec![crate::control::MACHINED_SERVICE];
    match config {
        ConfigState::Applied => required.insert(0, crate::services::CONTAINERD),
        ConfigState::Maintenance => {}
        ConfigState::Pending => {
            unmet.push("no config applied and maintenance mode not serving".into())
        }
    }
    for name in required {
        if state(name) != Some(State::Ready) {
            unmet.push(format!("{name} not ready"));
        }
    }
    for name in READY_IF_STARTED {
        let was_ready = expected.iter().any(|e| e == name);
        match state(name) {
            Some(State::Ready) => {}
            None | Some(State::Stopped) if !was_ready => {}
            _ if was_ready => {
                unmet.push(format!("{name} not ready (it was before the upgrade)"));
            }
            _ => unmet.push(format!("{name} not ready")),
        }
    }
    for s in services {
        let failing = s.state == State::Backoff
            || (s.restarts > 0 && matches!(s.state, State::Starting | State::Waiting));
        if failing && !unmet.iter().any(|u| u.starts_with(&format!("{} ", s.name))) {
            unmet.push(format!("{} failing ({} restarts)", s.name, s.restarts));
        }
    }
    unmet
}

/// The assessment of one moment of a trial boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Bless now.
    Healthy,
    /// Not yet, and the deadline has not passed.
    Waiting,
    /// The deadline passed first: why (recorded), and whether to reboot (the entry has
    /// tries left, so the loader's counter decides; a blessed or exhausted entry has
    /// nothing to fall back to).
    GiveUp {
        /// `machined not ready after 300 s`.
        reason: String,
        /// Reboot through the clean shutdown.
        reboot: bool,
    },
}

/// Judge a trial boot `elapsed` after stage 2 began, against its `deadline`.
pub fn judge(trial: &Trial, unmet: &[String], elapsed: Duration, deadline: Duration) -> Verdict {
    if unmet.is_empty() {
        return Verdict::Healthy;
    }
    if elapsed < deadline {
        return Verdict::Waiting;
    }
    Verdict::GiveUp {
        reason: format!("{} after {} s", unmet.join(", "), deadline.as_secs()),
        reboot: trial.on_trial() && (!trial.entry.exhausted() || trial.fallback),
    }
}

/// The record and the console line of a blessing (the entry already renamed, when it had
/// a counter).
pub fn bless(record: &mut UpgradeRecord, trial: &Trial, elapsed: Duration, now_ms: u64) -> String {
    let attempt = open_attempt(record, trial, None);
    attempt.reach(PHASE_STAGE2, now_ms);
    attempt.reach(PHASE_HEALTHY, now_ms);
    attempt.outcome = Outcome::Blessed;
    let slot = trial.slot.letter();
    let again = if attempt.expect_ready.is_empty() {
        String::new()
    } else {
        format!("; {} ready again", attempt.expect_ready.join(" and "))
    };
    if trial.on_trial() {
        attempt.tries_used = Some(trial.tries_used());
        format!(
            "slot {slot} blessed ({}, healthy after {} s, try {} of {}{again})",
            trial.version,
            elapsed.as_secs(),
            trial.tries_used(),
            trial.tries_total()
        )
    } else {
        format!(
            "slot {slot} healthy ({}, after {} s{again}): its upgrade or rollback is complete",
            trial.version,
            elapsed.as_secs()
        )
    }
}

/// The record and the console line of a trial boot given up at its deadline (the outcome
/// stays `booting`: the loader's counter decides what boots next).
pub fn give_up(record: &mut UpgradeRecord, trial: &Trial, reason: &str, reboot: bool) -> String {
    let attempt = open_attempt(record, trial, None);
    attempt.unhealthy_reason = Some(reason.to_string());
    let slot = trial.slot.letter();
    let other = trial.slot.other().letter();
    if !reboot {
        let why = if trial.on_trial() {
            "its entry has no tries left, so the loader has nothing better to boot"
        } else {
            "its entry is blessed (a rollback), so a reboot would boot it again"
        };
        return format!("slot {slot} not healthy: {reason}; {why}: running on");
    }
    match trial.entry.tries_left.unwrap_or(0) {
        0 => format!(
            "slot {slot} not healthy: {reason}; rebooting: that was its last try, the loader \
             falls back to slot {other}"
        ),
        left => format!(
            "slot {slot} not healthy: {reason}; rebooting: the loader tries it {left} more \
             time(s), then falls back to slot {other}"
        ),
    }
}
