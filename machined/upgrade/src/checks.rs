//! The checks an upgrade passes before anything is written: pure, on a bundle's
//! (verified) manifest and the facts machined gathered about the node.
//!
//! [`check`] returns every [`Refusal`] at once (none: the upgrade may go on), so that a
//! `--dry-run` reports all that stands in the way. The signature is checked before
//! ([`crate::keys::verify`]), and etcd's quorum by machined, which alone can ask etcd.

use keelson_node_protocol::upgrade::UpgradeRecord;

use crate::manifest::{Manifest, PART_INITRD, PART_KERNEL, PART_ROOT};

/// What machined knows about the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// The node's architecture (`amd64`, `arm64`).
    pub arch: String,
    /// The running OS version.
    pub running_version: String,
    /// The components the running image carries (`/usr/lib/keelson/components`).
    pub components: Vec<String>,
    /// The size of the inactive slot's root partition.
    pub inactive_partition_bytes: u64,
    /// Free bytes on the ESP.
    pub esp_free_bytes: u64,
    /// Bytes of the inactive slot's kernel and initramfs now on the ESP, which the
    /// upgrade removes before it writes the new ones.
    pub inactive_boot_files_bytes: u64,
    /// The running machine config's `version`, if the node has a config.
    pub config_version: Option<String>,
    /// STATE's upgrade record.
    pub record: UpgradeRecord,
}

/// What the operator allowed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckOptions {
    /// `--allow-downgrade`: a version older than the running one may be installed.
    pub allow_downgrade: bool,
    /// `--force`: a version that already failed on this node may be tried again.
    pub force: bool,
}

/// One reason not to upgrade.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The bundle is for another architecture.
    #[error(
        "the bundle is for {bundle} but this node is {node}: use the {node} bundle of that version"
    )]
    Arch {
        /// The bundle's.
        bundle: String,
        /// The node's.
        node: String,
    },
    /// The running version is not semver, so the version path cannot be checked.
    #[error(
        "the running version {running:?} is not a semantic version, so the upgrade path cannot be checked: pass --allow-downgrade to install {to} anyway"
    )]
    RunningVersion {
        /// The running version.
        running: String,
        /// The bundle's.
        to: String,
    },
    /// The bundle is older than the running version.
    #[error(
        "the bundle holds {to}, older than the running {running}: pass --allow-downgrade to install it anyway"
    )]
    Downgrade {
        /// The running version.
        running: String,
        /// The bundle's.
        to: String,
    },
    /// The running version is older than the bundle's minimum.
    #[error(
        "the bundle upgrades from {min} or newer, and this node runs {running}: upgrade to a version between them first"
    )]
    BelowMinVersion {
        /// The running version.
        running: String,
        /// The bundle's `min_version`.
        min: String,
    },
    /// The root does not fit the inactive partition.
    #[error(
        "the bundle's root is {need} bytes but the inactive slot's partition holds {have}: reinstall the node with larger root partitions, or use a smaller image"
    )]
    RootSpace {
        /// The root part's size.
        need: u64,
        /// The partition's size.
        have: u64,
    },
    /// The kernel and initramfs do not fit on the ESP.
    #[error(
        "the bundle's kernel and initramfs take {need} bytes but the ESP has {have} free for them: remove stray files from the ESP, or use a smaller image"
    )]
    EspSpace {
        /// The kernel's and initramfs' sizes.
        need: u64,
        /// Free bytes plus the inactive slot's current files.
        have: u64,
    },
    /// The new version does not accept the running config's version.
    #[error(
        "the running machine config is `version: {running}` but {to} accepts only [{accepted}]: apply a config of an accepted version first"
    )]
    ConfigVersion {
        /// The running config's version.
        running: String,
        /// The bundle's OS version.
        to: String,
        /// The versions it accepts, comma separated.
        accepted: String,
    },
    /// Components of the running image would be dropped.
    #[error(
        "the bundle lacks {missing} that this node's image carries: the upgrade would drop them; use a bundle built with them"
    )]
    ComponentsDropped {
        /// The components missing, comma separated.
        missing: String,
    },
    /// The version already failed on this node.
    #[error(
        "{version} already failed on this node (phase {phase}: {reason}): pass --force to try it again"
    )]
    FailedBefore {
        /// The version.
        version: String,
        /// The phase that failed.
        phase: String,
        /// Why.
        reason: String,
    },
}

/// Every reason not to install `manifest` on the node (none: go on).
pub fn check(manifest: &Manifest, node: &NodeFacts, opts: &CheckOptions) -> Vec<Refusal> {
    let mut refusals = Vec::new();
    if manifest.arch != node.arch {
        refusals.push(Refusal::Arch {
            bundle: manifest.arch.clone(),
            node: node.arch.clone(),
        });
    }
    check_versions(manifest, node, opts, &mut refusals);
    check_space(manifest, node, &mut refusals);
    if let Some(running) = &node.config_version
        && !manifest.config_versions.contains(running)
    {
        refusals.push(Refusal::ConfigVersion {
            running: running.clone(),
            to: manifest.version.clone(),
            accepted: manifest.config_versions.join(", "),
        });
    }
    let missing: Vec<&str> = node
        .components
        .iter()
        .filter(|c| !manifest.components.contains(c))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        refusals.push(Refusal::ComponentsDropped {
            missing: missing.join(", "),
        });
    }
    if !opts.force
        && let Some(failed) = node.record.has_failed(&manifest.version)
    {
        refusals.push(Refusal::FailedBefore {
            version: failed.version.clone(),
            phase: failed.phase.clone(),
            reason: failed.reason.clone(),
        });
    }
    refusals
}

/// The version path: no downgrade unless allowed (the same version is a reinstall), and
/// the running version at least the bundle's minimum.
fn check_versions(
    manifest: &Manifest,
    node: &NodeFacts,
    opts: &CheckOptions,
    refusals: &mut Vec<Refusal>,
) {
    // A validated manifest's versions parse; one that does not is refused on its own.
    let (Ok(to), Ok(min)) = (manifest.semver(), manifest.min_semver()) else {
        return;
    };
    let Ok(running) = semver::Version::parse(&node.running_version) else {
        if !opts.allow_downgrade {
            refusals.push(Refusal::RunningVersion {
                running: node.running_version.clone(),
                to: manifest.version.clone(),
            });
        }
        return;
    };
    if to < running && !opts.allow_downgrade {
        refusals.push(Refusal::Downgrade {
            running: node.running_version.clone(),
            to: manifest.version.clone(),
        });
    }
    if let Some(min) = min
        && running < min
    {
        refusals.push(Refusal::BelowMinVersion {
            running: node.running_version.clone(),
            min: min.to_string(),
        });
    }
}

/// Space: the root in the inactive partition; the kernel and initramfs on the ESP, in the
/// free bytes plus those of the inactive slot's files they replace.
fn check_space(manifest: &Manifest, node: &NodeFacts, refusals: &mut Vec<Refusal>) {
    let size = |i: usize| manifest.parts.get(i).map_or(0, |p| p.size);
    let root = size(PART_ROOT);
    if root > node.inactive_partition_bytes {
        refusals.push(Refusal::RootSpace {
            need: root,
            have: node.inactive_partition_bytes,
        });
    }
    let need = size(PART_KERNEL).saturating_add(size(PART_INITRD));
    let have = node
        .esp_free_bytes
        .saturating_add(node.inactive_boot_files_bytes);
    if need > have {
        refusals.push(Refusal::EspSpace { need, have });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use keelson_node_protocol::upgrade::FailedVersion;

    use super::*;
    use crate::manifest::tests::sample;

    /// A node that takes `sample([8192, 10, 20])` (version 0.2.0, min 0.1.0).
    fn node() -> NodeFacts {
        NodeFacts {
            arch: "amd64".into(),
            running_version: "0.1.0".into(),
            components: vec!["containerd".into()],
            inactive_partition_bytes: 8192,
            esp_free_bytes: 20,
            inactive_boot_files_bytes: 10,
            config_version: Some("v1alpha1".into()),
            record: UpgradeRecord::default(),
        }
    }

    /// Changes the node and the options; expects exactly the refusals whose messages
    /// contain `words` (none: the upgrade goes on).
    fn check_case(
        change: impl FnOnce(&mut NodeFacts, &mut Manifest, &mut CheckOptions),
        words: &[&str],
    ) {
        let mut n = node();
        let mut m = sample([8192, 10, 20]);
        let mut opts = CheckOptions::default();
        change(&mut n, &mut m, &mut opts);
        let refusals: Vec<String> = check(&m, &n, &opts).iter().map(|r| r.to_string()).collect();
        assert_eq!(refusals.len(), words.len(), "{refusals:#?}");
        for (refusal, words) in refusals.iter().zip(words) {
            assert!(refusal.contains(words), "{refusal:?} should say {words:?}");
        }
    }

    #[test]
    fn every_check() {
        check_case(|_, _, _| {}, &[]);
        check_case(
            |n, _, _| n.arch = "arm64".into(),
            &["the bundle is for amd64 but this node is arm64"],
        );
        // Same version: a reinstall.
        check_case(|n, _, _| n.running_version = "0.2.0".into(), &[]);
        check_case(
            |n, _, _| n.running_version = "0.3.0".into(),
            &["older than the running 0.3.0: pass --allow-downgrade"],
        );
        check_case(
            |n, _, o| {
                n.running_version = "0.3.0".into();
                o.allow_downgrade = true;
            },
            &[],
        );
        check_case(|n, _, _| n.running_version = "0.2.0-rc1".into(), &[]);
        check_case(
            |n, _, _| n.running_version = "0.0.9".into(),
            &["upgrades from 0.1.0 or newer, and this node runs 0.0.9"],
        );
        check_case(
            |n, m, _| {
                n.running_version = "0.0.9".into();
                m.min_version = None;
            },
            &[],
        );
        check_case(
            |n, _, _| n.running_version = "dev".into(),
            &["\"dev\" is not a semantic version"],
        );
        check_case(
            |n, _, o| {
                n.running_version = "dev".into();
                o.allow_downgrade = true;
            },
            &[],
        );
        check_case(
            |n, _, _| n.inactive_partition_bytes = 8191,
            &["root is 8192 bytes but the inactive slot's partition holds 8191"],
        );
        check_case(
            |n, _, _| n.inactive_boot_files_bytes = 9,
            &["take 30 bytes but the ESP has 29 free"],
        );
        check_case(
            |n, _, _| n.config_version = Some("v2".into()),
            &["`version: v2` but 0.2.0 accepts only [v1alpha1]"],
        );
        check_case(|n, _, _| n.config_version = None, &[]);
        check_case(
            |n, _, _| n.components = vec!["etcd".into(), "containerd".into(), "kubelet".into()],
            &["lacks etcd, kubelet that this node's image carries"],
        );
        let failed = |n: &mut NodeFacts| {
            n.record.failed.push(FailedVersion {
                version: "0.2.0".into(),
                phase: "healthy".into(),
                reason: "not healthy within 300 s".into(),
                at_ms: 1,
            })
        };
        check_case(
            |n, _, _| failed(n),
            &[
                "0.2.0 already failed on this node (phase healthy: not healthy within 300 s): pass --force",
            ],
        );
        check_case(
            |n, _, o| {
                failed(n);
                o.force = true;
            },
            &[],
        );
        // Everything at once is reported at once.
        check_case(
            |n, _, _| {
                n.arch = "arm64".into();
                n.running_version = "1.0.0".into();
                n.inactive_partition_bytes = 0;
                failed(n);
            },
            &["arm64", "older", "root is", "already failed"],
        );
    }
}
