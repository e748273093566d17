//! The bundle's manifest: what the bundle holds and what it upgrades from, as JSON
//! (`#[serde(deny_unknown_fields)]`), signed with the bundle (see [`crate::bundle`]).
//!
//! [`Manifest::parse`] reads and validates it; [`Manifest::validate`] checks one built in
//! code (the writer calls it before it signs). Validation refuses what a node could not
//! act on: an unknown format or architecture, a version that is not semver, parts other
//! than `root`, `kernel` and `initrd` in that order, an empty part, a sha256 that is not
//! 64 hex digits, verity parameters that do not describe the root part.

use keelson_configs::boot::VerityParams;
use keelson_configs::layout::{
    CMDLINE_SLOT, CMDLINE_VERITY_DATA_BLOCKS, CMDLINE_VERITY_HASH_OFFSET, CMDLINE_VERITY_ROOTHASH,
    CMDLINE_VERITY_SALT,
};
use serde::{Deserialize, Serialize};

use crate::verity::{self, BLOCK_SIZE};

/// The manifest format this crate writes and reads.
pub const FORMAT: u32 = 1;
/// The architectures a bundle can be built for (the image's names).
pub const ARCHES: &[&str] = &["amd64", "arm64"];
/// The parts of a bundle, in the order they follow the header.
pub const PART_NAMES: [&str; 3] = ["root", "kernel", "initrd"];
/// Index of the root part (the squashfs and its verity tree, as they go at the start of
/// the slot's partition).
pub const PART_ROOT: usize = 0;
/// Index of the kernel part.
pub const PART_KERNEL: usize = 1;
/// Index of the initramfs part.
pub const PART_INITRD: usize = 2;

/// What the bundle holds, signed with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// The OS version the bundle installs (semver, e.g. `0.2.0`).
    pub version: String,
    /// `amd64` or `arm64` ([`ARCHES`]).
    pub arch: String,
    /// The oldest running version this bundle upgrades from (semver), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<String>,
    /// The components the image carries (`containerd`, `etcd`, `kubelet`, ...).
    pub components: Vec<String>,
    /// The machine config `version:` values the new version accepts.
    pub config_versions: Vec<String>,
    /// The base kernel command line, without the slot and verity keys.
    pub cmdline: String,
    /// The root's dm-verity parameters.
    pub verity: VerityParams,
    /// The id ([`crate::keys::key_id`]) of the key that signed the bundle, so that a node
    /// can tell a key it does not trust from a tampered bundle. The writer fills it in.
    #[serde(default)]
    pub key_id: String,
    /// The parts, in the order of [`PART_NAMES`]. The writer fills them in from the files.
    pub parts: Vec<Part>,
}

/// One part of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    /// One of [`PART_NAMES`].
    pub name: String,
    /// Its size in bytes (not 0).
    pub size: u64,
    /// Its sha256, 64 lower-case hex digits.
    pub sha256: String,
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The JSON does not parse into a manifest.
    #[error(
        "the bundle's manifest is not valid JSON of the expected shape: rebuild the bundle with this version's `cargo xtask image`"
    )]
    Json(#[source] serde_json::Error),
    /// An unknown `format`.
    #[error(
        "manifest field `format` is {0}; this node reads format {FORMAT}: build the bundle with a matching `cargo xtask`"
    )]
    Format(u32),
    /// A version field is not semver.
    #[error(
        "manifest field `{field}` is {value:?}, not a semantic version (e.g. 0.2.0): fix the version the image is built with"
    )]
    Version {
        /// `version` or `min_version`.
        field: &'static str,
        /// What it holds.
        value: String,
        /// Why it does not parse.
        #[source]
        source: semver::Error,
    },
    /// An unknown architecture.
    #[error("manifest field `arch` is {0:?}; it must be one of amd64, arm64")]
    Arch(String),
    /// The parts are not `root`, `kernel`, `initrd`, once each, in that order.
    #[error(
        "manifest field `parts` names [{found}]; it must name root, kernel, initrd, once each and in that order: rebuild the bundle"
    )]
    PartNames {
        /// The names found, comma separated.
        found: String,
    },
    /// A part is empty.
    #[error("manifest part `{0}` has size 0; every part must hold bytes: rebuild the bundle")]
    EmptyPart(String),
    /// A part's sha256 is not 64 hex digits.
    #[error(
        "manifest part `{part}` has sha256 {value:?}, not 64 lower-case hex digits: rebuild the bundle"
    )]
    Sha256 {
        /// The part.
        part: String,
        /// What it holds.
        value: String,
    },
    /// The verity parameters are wrong.
    #[error("manifest field `verity.{field}` is wrong: {what}: rebuild the bundle")]
    Verity {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        what: String,
    },
    /// A component or config version is empty or holds a space or a control character.
    #[error(
        "manifest field `{field}` holds {value:?}: each entry must be a non-empty word without spaces or control characters"
    )]
    Word {
        /// `components` or `config_versions`.
        field: &'static str,
        /// The entry.
        value: String,
    },
    /// The command line holds a control character or a key the boot entry adds itself.
    #[error(
        "manifest field `cmdline` {what}: give the image's base command line, without the slot and verity keys"
    )]
    Cmdline {
        /// What is wrong.
        what: String,
    },
    /// The key id is not 16 hex digits.
    #[error(
        "manifest field `key_id` is {0:?}, not 16 lower-case hex digits: rebuild the bundle with this version's writer"
    )]
    KeyId(String),
}

impl Manifest {
    /// Parses and validates a manifest's JSON.
    pub fn parse(json: &[u8]) -> Result<Manifest, ManifestError> {
        let manifest: Manifest = serde_json::from_slice(json).map_err(ManifestError::Json)?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// The manifest's JSON (compact, as it is signed).
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings and numbers always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Checks every field (see the module's doc).
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format != FORMAT {
            return Err(ManifestError::Format(self.format));
        }
        self.semver()?;
        self.min_semver()?;
        if !ARCHES.contains(&self.arch.as_str()) {
            return Err(ManifestError::Arch(self.arch.clone()));
        }
        let names: Vec<&str> = self.parts.iter().map(|p| p.name.as_str()).collect();
        if names != PART_NAMES {
            return Err(ManifestError::PartNames {
                found: names.join(", "),
            });
        }
        for part in &self.parts {
            if part.size == 0 {
                return Err(ManifestError::EmptyPart(part.name.clone()));
            }
            if !is_lower_hex(&part.sha256, 64) {
                return Err(ManifestError::Sha256 {
                    part: part.name.clone(),
                    value: part.sha256.clone(),
                });
            }
        }
        for (field, words) in [
            ("components", &self.components),
            ("config_versions", &self.config_versions),
        ] {
            if let Some(bad) = words
                .iter()
                .find(|w| w.is_empty() || w.chars().any(|c| c.is_whitespace() || c.is_control()))
            {
                return Err(ManifestError::Word {
                    field,
                    value: bad.clone(),
                });
            }
        }
        self.validate_cmdline()?;
        if !self.key_id.is_empty() && !is_lower_hex(&self.key_id, 16) {
            return Err(ManifestError::KeyId(self.key_id.clone()));
        }
        self.validate_verity()
    }

    /// The command line goes on one line of a boot entry, followed by the keys that
    /// [`keelson_configs::boot::BootEntry::for_slot`] adds.
    fn validate_cmdline(&self) -> Result<(), ManifestError> {
        if self.cmdline.chars().any(char::is_control) {
            return Err(ManifestError::Cmdline {
                what: "holds a control character (a line break would end the entry's options line)"
                    .into(),
            });
        }
        let added = [
            CMDLINE_SLOT,
            CMDLINE_VERITY_ROOTHASH,
            CMDLINE_VERITY_SALT,
            CMDLINE_VERITY_DATA_BLOCKS,
            CMDLINE_VERITY_HASH_OFFSET,
        ];
        for word in self.cmdline.split_whitespace() {
            let key = word.split_once('=').map_or(word, |(k, _)| k);
            if added.contains(&key) {
                return Err(ManifestError::Cmdline {
                    what: format!("holds {key}, which the boot entry sets itself"),
                });
            }
        }
        Ok(())
    }

    fn validate_verity(&self) -> Result<(), ManifestError> {
        let v = &self.verity;
        let bad = |field, what: String| Err(ManifestError::Verity { field, what });
        if !is_lower_hex(&v.roothash, 64) {
            return bad("roothash", format!("{:?} is not 64 hex digits", v.roothash));
        }
        if !v.salt.len().is_multiple_of(2)
            || v.salt.len() > 2 * verity::MAX_SALT_SIZE
            || !is_lower_hex(&v.salt, v.salt.len())
        {
            return bad(
                "salt",
                format!("{:?} is not at most 256 bytes of hex", v.salt),
            );
        }
        if v.data_blocks == 0 {
            return bad("data_blocks", "0 blocks".into());
        }
        let data_bytes = v.data_blocks.checked_mul(BLOCK_SIZE as u64);
        if data_bytes != Some(v.hash_offset) {
            return bad(
                "hash_offset",
                format!(
                    "{} is not data_blocks ({}) times 4096: the tree follows the data",
                    v.hash_offset, v.data_blocks
                ),
            );
        }
        let need = v
            .hash_offset
            .saturating_add(verity::tree_size(v.data_blocks));
        let root = self.parts[PART_ROOT].size;
        if root < need {
            return bad(
                "data_blocks",
                format!("the data and its tree take {need} bytes but the root part holds {root}"),
            );
        }
        Ok(())
    }

    /// The version, parsed.
    pub fn semver(&self) -> Result<semver::Version, ManifestError> {
        parse_version("version", &self.version)
    }

    /// The minimum version, parsed.
    pub fn min_semver(&self) -> Result<Option<semver::Version>, ManifestError> {
        self.min_version
            .as_deref()
            .map(|v| parse_version("min_version", v))
            .transpose()
    }

    /// A part by name.
    pub fn part(&self, name: &str) -> Option<&Part> {
        self.parts.iter().find(|p| p.name == name)
    }

    /// The bytes of every part together.
    pub fn parts_size(&self) -> u64 {
        self.parts
            .iter()
            .fold(0u64, |sum, p| sum.saturating_add(p.size))
    }
}

fn parse_version(field: &'static str, value: &str) -> Result<semver::Version, ManifestError> {
    semver::Version::parse(value).map_err(|source| ManifestError::Version {
        field,
        value: value.to_string(),
        source,
    })
}

/// Whether `s` is `len` lower-case hex digits.
pub(crate) fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A valid manifest for parts of these sizes (sha256s are placeholders).
    pub(crate) fn sample(sizes: [u64; 3]) -> Manifest {
        Manifest {
            format: FORMAT,
            version: "0.2.0".into(),
            arch: "amd64".into(),
            min_version: Some("0.1.0".into()),
            components: vec!["containerd".into()],
            config_versions: vec!["v1alpha1".into()],
            cmdline: "console=ttyS0 panic=10".into(),
            verity: VerityParams {
                roothash: "ab".repeat(32),
                salt: "cd".repeat(32),
                data_blocks: 1,
                hash_offset: 4096,
            },
            key_id: String::new(),
            parts: PART_NAMES
                .iter()
                .zip(sizes)
                .map(|(name, size)| Part {
                    name: (*name).into(),
                    size,
                    sha256: "0".repeat(64),
                })
                .collect(),
        }
    }

    #[test]
    fn a_manifest_round_trips() {
        let m = sample([8192, 10, 20]);
        assert_eq!(Manifest::parse(&m.to_json()).unwrap(), m);
        let mut no_min = m.clone();
        no_min.min_version = None;
        assert!(
            !String::from_utf8(no_min.to_json())
                .unwrap()
                .contains("min_version")
        );
        assert_eq!(Manifest::parse(&no_min.to_json()).unwrap(), no_min);
    }

    /// Applies `change` to a valid manifest and expects the error to name `words`.
    fn check(change: impl FnOnce(&mut Manifest), words: &str) {
        let mut m = sample([8192, 10, 20]);
        change(&mut m);
        let err = Manifest::parse(&m.to_json()).unwrap_err().to_string();
        assert!(err.contains(words), "{err:?} should say {words:?}");
    }

    #[test]
    fn bad_fields_are_refused_by_name() {
        check(|m| m.format = 2, "`format` is 2");
        check(|m| m.version = "v2".into(), "`version` is \"v2\"");
        check(|m| m.min_version = Some("1".into()), "`min_version`");
        check(|m| m.arch = "riscv64".into(), "`arch` is \"riscv64\"");
        check(|m| m.parts.swap(1, 2), "root, initrd, kernel");
        check(|m| drop(m.parts.pop()), "[root, kernel]");
        check(
            |m| m.parts.push(m.parts[2].clone()),
            "[root, kernel, initrd, initrd]",
        );
        check(|m| m.parts[1].size = 0, "part `kernel` has size 0");
        check(|m| m.parts[2].sha256 = "AB".repeat(32), "part `initrd`");
        check(|m| m.parts[0].sha256 = "0".repeat(63), "part `root`");
        check(|m| m.verity.roothash = "x".into(), "`verity.roothash`");
        check(|m| m.verity.salt = "abc".into(), "`verity.salt`");
        check(|m| m.verity.data_blocks = 0, "`verity.data_blocks`");
        check(|m| m.verity.hash_offset = 4095, "`verity.hash_offset`");
        check(|m| m.parts[0].size = 4096, "the root part holds 4096");
        check(|m| m.key_id = "zz".into(), "`key_id`");
        check(
            |m| m.components.push(String::new()),
            "`components` holds \"\"",
        );
        check(
            |m| m.config_versions.push("v1 v2".into()),
            "`config_versions` holds \"v1 v2\"",
        );
        check(
            |m| m.cmdline.push_str("\ninitrd /evil"),
            "`cmdline` holds a control character",
        );
        check(
            |m| m.cmdline.push_str(" keelson.slot=b"),
            "holds keelson.slot, which",
        );
        check(
            |m| m.cmdline.push_str(" keelson.verity.roothash"),
            "holds keelson.verity.roothash,",
        );
    }

    #[test]
    fn unknown_fields_and_bad_json_are_refused() {
        let mut json: serde_json::Value =
            serde_json::from_slice(&sample([8192, 1, 1]).to_json()).unwrap();
        json["extra"] = serde_json::Value::Bool(true);
        let err = Manifest::parse(json.to_string().as_bytes()).unwrap_err();
        assert!(matches!(err, ManifestError::Json(_)));
        assert!(Manifest::parse(b"{").is_err());
        assert!(Manifest::parse(b"").is_err());
    }
}
