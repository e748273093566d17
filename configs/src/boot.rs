//! The boot loader's side of the A/B slots, shared by the imager (the first entry),
//! machined (an upgrade's entry, rollback) and PID 1 (blessing, fallback, hygiene).
//!
//! Each slot has one Boot Loader Specification type 1 entry on the ESP,
//! `loader/entries/keelson-<slot>[+<left>[-<done>]].conf`. The counter is systemd-boot's
//! boot counting: the loader renames `+3-0` to `+2-1` before it boots the entry, an entry
//! at `+0-N` has no tries left and is sorted after every other, and PID 1 blesses a slot by
//! renaming its entry to `keelson-<slot>.conf` once the node is healthy.
//!
//! Which entry boots is systemd-boot 257's order ([`boot_order`]): entries with tries left
//! before those without, then by `sort-key`, then by `version`, newest first. Our
//! `version` line is `<generation>-<os version>` ([`EntryVersion`]): the generation grows by
//! one each time an entry is made the next to boot (an upgrade, a rollback), so the entry
//! that should boot is always the newest, whatever the OS versions are. No EFI variable
//! pins a default (a pinned default defeats the counter).

use crate::layout::{
    CMDLINE_SLOT, CMDLINE_VERITY_DATA_BLOCKS, CMDLINE_VERITY_HASH_OFFSET, CMDLINE_VERITY_ROOTHASH,
    CMDLINE_VERITY_SALT, Slot,
};

/// Where stage 2 mounts the ESP (read-write, `nosuid,nodev,noexec`).
pub const ESP_MOUNT: &str = "/boot";
/// The entries' directory, relative to the ESP's root.
pub const ENTRIES_DIR: &str = "loader/entries";
/// The tries a new entry gets (`+3-0`).
pub const NEW_ENTRY_TRIES: u32 = 3;
/// Every entry's `sort-key`.
pub const SORT_KEY: &str = "keelson";
/// Kernel command line key: seconds a trial boot has to become healthy before PID 1
/// gives it up and reboots (the default is [`DEFAULT_HEALTH_TIMEOUT_SECS`]).
pub const CMDLINE_HEALTH_TIMEOUT: &str = "keelson.upgrade.health_timeout";
/// The default health deadline of a trial boot: 5 minutes.
pub const DEFAULT_HEALTH_TIMEOUT_SECS: u64 = 300;

/// Where a slot's kernel lives on the ESP, as its entry names it.
pub fn slot_kernel_path(slot: Slot) -> String {
    format!("/keelson/{}/vmlinuz", slot.letter())
}

/// Where a slot's initramfs lives on the ESP, as its entry names it.
pub fn slot_initrd_path(slot: Slot) -> String {
    format!("/keelson/{}/initrd", slot.letter())
}

/// An entry's file name: its slot and boot counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryName {
    /// The slot the entry boots.
    pub slot: Slot,
    /// Tries left (`+N`), `None` for a blessed entry (no counter).
    pub tries_left: Option<u32>,
    /// Tries done (`-M`), 0 when the name has none.
    pub tries_done: u32,
}

impl EntryName {
    /// A blessed entry's name.
    pub fn blessed(slot: Slot) -> EntryName {
        EntryName {
            slot,
            tries_left: None,
            tries_done: 0,
        }
    }

    /// A new entry's name, with [`NEW_ENTRY_TRIES`] tries.
    pub fn new_trial(slot: Slot) -> EntryName {
        EntryName {
            slot,
            tries_left: Some(NEW_ENTRY_TRIES),
            tries_done: 0,
        }
    }

    /// Parses `keelson-a.conf`, `keelson-b+2-1.conf`, `keelson-a+3.conf`; any other name
    /// (not ours) is `None`.
    pub fn parse(file_name: &str) -> Option<EntryName> {
        let stem = file_name.strip_suffix(".conf")?.strip_prefix("keelson-")?;
        let (slot, counter) = match stem.split_once('+') {
            Some((slot, counter)) => (slot, Some(counter)),
            None => (stem, None),
        };
        let slot = Slot::parse(slot)?;
        let (tries_left, tries_done) = match counter {
            None => (None, 0),
            Some(c) => {
                let (left, done) = c.split_once('-').unwrap_or((c, "0"));
                (Some(digits(left)?), digits(done)?)
            }
        };
        Some(EntryName {
            slot,
            tries_left,
            tries_done,
        })
    }

    /// The file name.
    pub fn file_name(&self) -> String {
        match self.tries_left {
            Some(left) => format!(
                "keelson-{}+{}-{}.conf",
                self.slot.letter(),
                left,
                self.tries_done
            ),
            None => format!("keelson-{}.conf", self.slot.letter()),
        }
    }

    /// Whether the entry is on trial (it has a counter).
    pub fn on_trial(&self) -> bool {
        self.tries_left.is_some()
    }

    /// Whether the loader has given the entry up (a counter with no tries left).
    pub fn exhausted(&self) -> bool {
        self.tries_left == Some(0)
    }
}

fn digits(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// An entry's `version` line: `<generation>-<os version>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryVersion {
    /// Grows by one each time an entry is made the next to boot.
    pub generation: u64,
    /// The OS version the slot holds (`0.2.0`).
    pub os_version: String,
}

impl EntryVersion {
    /// Parses the line's value; a value without a generation (an image older than the
    /// scheme) is generation 0 with the whole value as its OS version.
    pub fn parse(value: &str) -> EntryVersion {
        match value.split_once('-') {
            Some((g, v)) if !g.is_empty() && g.bytes().all(|b| b.is_ascii_digit()) => {
                EntryVersion {
                    generation: g.parse().unwrap_or(0),
                    os_version: v.to_string(),
                }
            }
            _ => EntryVersion {
                generation: 0,
                os_version: value.to_string(),
            },
        }
    }

    /// The line's value.
    pub fn render(&self) -> String {
        format!("{}-{}", self.generation, self.os_version)
    }
}

/// A Boot Loader Specification type 1 entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootEntry {
    /// `title`.
    pub title: String,
    /// `version` ([`EntryVersion`] for our entries).
    pub version: Option<String>,
    /// `sort-key`.
    pub sort_key: Option<String>,
    /// `linux`: path of the kernel on the ESP (`/keelson/a/vmlinuz`).
    pub linux: String,
    /// `initrd` lines.
    pub initrd: Vec<String>,
    /// `options`: the kernel command line.
    pub options: String,
}

impl BootEntry {
    /// The entry's text.
    pub fn render(&self) -> String {
        let mut out = format!("title {}\n", self.title);
        if let Some(v) = &self.version {
            out.push_str(&format!("version {v}\n"));
        }
        if let Some(k) = &self.sort_key {
            out.push_str(&format!("sort-key {k}\n"));
        }
        out.push_str(&format!("linux {}\n", self.linux));
        for initrd in &self.initrd {
            out.push_str(&format!("initrd {initrd}\n"));
        }
        out.push_str(&format!("options {}\n", self.options));
        out
    }

    /// Parse an entry's text (unknown keys are ignored; repeated `options` lines are
    /// joined with a space, as systemd-boot does).
    pub fn parse(text: &str) -> BootEntry {
        let mut entry = BootEntry::default();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            let (key, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let value = value.trim().to_string();
            match key {
                "title" => entry.title = value,
                "version" => entry.version = Some(value),
                "sort-key" => entry.sort_key = Some(value),
                "linux" => entry.linux = value,
                "initrd" => entry.initrd.push(value),
                "options" if entry.options.is_empty() => entry.options = value,
                "options" => {
                    entry.options.push(' ');
                    entry.options.push_str(&value);
                }
                _ => {}
            }
        }
        entry
    }

    /// Our `version` line, parsed (generation 0 when there is none).
    pub fn entry_version(&self) -> EntryVersion {
        EntryVersion::parse(self.version.as_deref().unwrap_or(""))
    }

    /// A slot's entry: its kernel and initramfs paths, `base_cmdline` followed by the slot
    /// and its verity parameters.
    pub fn for_slot(
        slot: Slot,
        version: &EntryVersion,
        base_cmdline: &str,
        verity: &VerityParams,
    ) -> BootEntry {
        BootEntry {
            title: format!(
                "Keelson {} (slot {})",
                version.os_version,
                slot.letter().to_ascii_uppercase()
            ),
            version: Some(version.render()),
            sort_key: Some(SORT_KEY.into()),
            linux: slot_kernel_path(slot),
            initrd: vec![slot_initrd_path(slot)],
            options: format!(
                "{} {CMDLINE_SLOT}={} {}",
                base_cmdline.trim(),
                slot.letter(),
                verity.cmdline()
            )
            .trim_start()
            .to_string(),
        }
    }
}

/// A root's dm-verity parameters, as they travel on the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerityParams {
    /// The root hash, hex.
    pub roothash: String,
    /// The salt, hex.
    pub salt: String,
    /// Data blocks (4096 bytes each) covered by the tree.
    pub data_blocks: u64,
    /// Byte offset of the hash superblock inside the partition.
    pub hash_offset: u64,
}

impl VerityParams {
    /// The command line's verity keys.
    pub fn cmdline(&self) -> String {
        format!(
            "{CMDLINE_VERITY_ROOTHASH}={} {CMDLINE_VERITY_SALT}={} \
             {CMDLINE_VERITY_DATA_BLOCKS}={} {CMDLINE_VERITY_HASH_OFFSET}={}",
            self.roothash, self.salt, self.data_blocks, self.hash_offset
        )
    }
}

/// One entry found on the ESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundEntry {
    /// Its file name, parsed.
    pub name: EntryName,
    /// Its content.
    pub entry: BootEntry,
}

/// The entries in the order systemd-boot 257 ranks them (`boot_entry_compare`): the
/// first is the one it boots. Entries without tries left go last; then `sort-key`
/// (entries with one first, ascending); then `version`, newest first (for ours, the
/// generation); then the file name without its counter, newest first; then more tries
/// left first, then fewer tries done.
pub fn boot_order(entries: &[FoundEntry]) -> Vec<&FoundEntry> {
    let mut sorted: Vec<&FoundEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| {
        a.name
            .exhausted()
            .cmp(&b.name.exhausted())
            .then_with(|| a.entry.sort_key.is_none().cmp(&b.entry.sort_key.is_none()))
            .then_with(|| a.entry.sort_key.cmp(&b.entry.sort_key))
            .then_with(|| {
                b.entry
                    .entry_version()
                    .generation
                    .cmp(&a.entry.entry_version().generation)
            })
            .then_with(|| b.name.slot.letter().cmp(a.name.slot.letter()))
            .then_with(|| match (a.name.tries_left, b.name.tries_left) {
                (Some(x), Some(y)) => y.cmp(&x).then(a.name.tries_done.cmp(&b.name.tries_done)),
                _ => std::cmp::Ordering::Equal,
            })
    });
    sorted
}

/// The next generation: one more than the highest among `entries`.
pub fn next_generation(entries: &[FoundEntry]) -> u64 {
    entries
        .iter()
        .map(|e| e.entry.entry_version().generation)
        .max()
        .unwrap_or(0)
        + 1
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn entry_names_round_trip() {
        for name in [
            "keelson-a.conf",
            "keelson-b+3-0.conf",
            "keelson-a+0-3.conf",
            "keelson-b+2-1.conf",
        ] {
            assert_eq!(EntryName::parse(name).unwrap().file_name(), name);
        }
        let short = EntryName::parse("keelson-a+3.conf").unwrap();
        assert_eq!((short.tries_left, short.tries_done), (Some(3), 0));
        for bad in [
            "other.conf",
            "keelson-c.conf",
            "keelson-a+x-1.conf",
            "keelson-a+-1.conf",
            "keelson-a.conf.tmp",
        ] {
            assert_eq!(EntryName::parse(bad), None, "{bad}");
        }
        assert!(EntryName::parse("keelson-a+0-3.conf").unwrap().exhausted());
        assert!(!EntryName::parse("keelson-a.conf").unwrap().on_trial());
        assert_eq!(
            EntryName::new_trial(Slot::B).file_name(),
            "keelson-b+3-0.conf"
        );
    }

    #[test]
    fn versions_carry_a_generation() {
        let v = EntryVersion::parse("12-0.2.0-rc1");
        assert_eq!(v.generation, 12);
        assert_eq!(v.os_version, "0.2.0-rc1");
        assert_eq!(v.render(), "12-0.2.0-rc1");
        assert_eq!(EntryVersion::parse("0.1.0").generation, 0);
        assert_eq!(EntryVersion::parse("0.1.0").os_version, "0.1.0");
    }

    fn found(name: &str, generation: u64) -> FoundEntry {
        let name = EntryName::parse(name).unwrap();
        let verity = VerityParams {
            roothash: "aa".into(),
            salt: "bb".into(),
            data_blocks: 1,
            hash_offset: 4096,
        };
        FoundEntry {
            entry: BootEntry::for_slot(
                name.slot,
                &EntryVersion {
                    generation,
                    os_version: "0.1.0".into(),
                },
                "console=ttyS0",
                &verity,
            ),
            name,
        }
    }

    #[test]
    fn the_newest_generation_with_tries_left_boots() {
        let entries = [found("keelson-a.conf", 1), found("keelson-b+3-0.conf", 2)];
        assert_eq!(boot_order(&entries)[0].name.slot, Slot::B);
        // The loader gave B up: A boots.
        let entries = [found("keelson-a.conf", 1), found("keelson-b+0-3.conf", 2)];
        assert_eq!(boot_order(&entries)[0].name.slot, Slot::A);
        // A rollback gave A the newest generation.
        let entries = [found("keelson-a.conf", 3), found("keelson-b.conf", 2)];
        assert_eq!(boot_order(&entries)[0].name.slot, Slot::A);
        assert_eq!(next_generation(&entries), 4);
    }

    #[test]
    fn a_slot_entry_carries_slot_and_verity() {
        let e = found("keelson-b+3-0.conf", 7).entry;
        assert_eq!(e.linux, "/keelson/b/vmlinuz");
        assert_eq!(e.initrd, vec!["/keelson/b/initrd".to_string()]);
        assert!(e.options.starts_with("console=ttyS0 keelson.slot=b "));
        assert!(e.options.contains("keelson.verity.roothash=aa"));
        assert_eq!(e.version.as_deref(), Some("7-0.1.0"));
        assert_eq!(BootEntry::parse(&e.render()), e);
    }
}
