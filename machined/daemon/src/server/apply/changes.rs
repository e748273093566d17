//! What an apply changes: the dotted keys that differ between two configs, where each can
//! be applied (PID 1 live, machined itself, or only at boot), the plan an apply follows,
//! and the diff it shows (secrets replaced by a short digest).

use std::collections::BTreeSet;

use keelson_configs::MachineConfig;

use crate::backend::LivePart;
use crate::server::try_record::TryRecord;

/// Where a changed key can be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Where {
    /// PID 1 applies this part live.
    Live(LivePart),
    /// machined applies it itself (its own server certificate).
    Machined,
    /// Only a reboot applies it; why.
    Reboot(&'static str),
}

/// Which part of the node a changed key belongs to. Keys are dotted paths from
/// [`changed_keys`]; the first matching prefix wins.
pub fn classify(key: &str) -> Where {
    const TABLE: &[(&str, Where)] = &[
        ("machine.sysctls", Where::Live(LivePart::Sysctls)),
        (
            "machine.kernel_modules",
            Where::Live(LivePart::KernelModules),
        ),
        (
            "machine.disabled_kernel_modules",
            Where::Live(LivePart::KernelModules),
        ),
        ("machine.files", Where::Live(LivePart::Files)),
        ("machine.hostname", Where::Live(LivePart::Hostname)),
        ("machine.kubelet", Where::Live(LivePart::Kubelet)),
        ("machine.network", Where::Live(LivePart::Network)),
        ("machine.time_servers", Where::Live(LivePart::TimeServers)),
        ("machine.api", Where::Machined),
        (
            "machine.type",
            Where::Reboot(
                "a node changes between control plane and worker only at boot: its services and secrets differ",
            ),
        ),
        (
            "machine.install_disk",
            Where::Reboot("the install disk is used only when the node installs itself"),
        ),
        ("machine.swap", Where::Reboot("swap is set up at boot")),
        (
            "machine.services",
            Where::Reboot(
                "extension services are registered with PID 1's supervisor at boot, after the built-in ones",
            ),
        ),
        (
            "cluster.secrets",
            Where::Reboot(
                "the cluster secrets (CAs, keys, tokens) are read at boot by every service that uses them",
            ),
        ),
        (
            "cluster",
            Where::Reboot(
                "cluster settings are read at boot by etcd, the kubelet and the control plane",
            ),
        ),
        (
            "version",
            Where::Reboot("the config format version is read at boot"),
        ),
    ];
    TABLE
        .iter()
        .find(|(prefix, _)| {
            key == *prefix
                || key
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        })
        .map(|(_, w)| w.clone())
        .unwrap_or(Where::Reboot("this setting is read at boot"))
}

fn to_value(config: &MachineConfig) -> toml::Value {
    toml::Value::try_from(config).unwrap_or(toml::Value::Table(toml::Table::new()))
}

/// The dotted keys whose values differ between two configs. Tables are compared key by
/// key; arrays of tables element by element (`machine.files[0]`); other arrays whole.
pub fn changed_keys(old: Option<&MachineConfig>, new: &MachineConfig) -> Vec<String> {
    let old = old.map(to_value);
    let new = to_value(new);
    let mut out = Vec::new();
    diff_values("", old.as_ref(), Some(&new), &mut out);
    out
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn diff_values(
    path: &str,
    old: Option<&toml::Value>,
    new: Option<&toml::Value>,
    out: &mut Vec<String>,
) {
    match (old, new) {
        (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                diff_values(&join(path, k), a.get(k), b.get(k), out);
            }
        }
        (Some(toml::Value::Array(a)), Some(toml::Value::Array(b)))
            if a.iter().chain(b).all(toml::Value::is_table) =>
        {
            for i in 0..a.len().max(b.len()) {
                diff_values(&format!("{path}[{i}]"), a.get(i), b.get(i), out);
            }
        }
        (Some(a), Some(b)) if a == b => {}
        (None, None) => {}
        _ => out.push(path.to_owned()),
    }
}

/// Keys whose values are secrets: shown in diffs only as a short digest.
const SECRET_KEYS: [&str; 6] = [
    "key",
    "service_account_key",
    "encryption_key",
    "bootstrap_token",
    "api_join_token",
    "token",
];

fn redact(value: &mut toml::Value) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                if SECRET_KEYS.contains(&k.as_str())
                    && let toml::Value::String(s) = v
                {
                    *s = format!("<secret {}>", short_digest(s.as_bytes()));
                } else {
                    redact(v);
                }
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}

/// The config as TOML with its secrets replaced by digests, for diffs.
pub fn redacted_text(config: &MachineConfig) -> String {
    let mut value = to_value(config);
    redact(&mut value);
    toml::to_string_pretty(&value).unwrap_or_default()
}

/// A unified diff from `old` (none: an empty file) to `new`, secrets redacted.
pub fn diff(old: Option<&MachineConfig>, new: &MachineConfig) -> String {
    let a = old.map(redacted_text).unwrap_or_default();
    let b = redacted_text(new);
    similar::TextDiff::from_lines(&a, &b)
        .unified_diff()
        .context_radius(3)
        .header("running", "new")
        .to_string()
}

/// What an apply changes, by where it can be applied.
#[derive(Debug, Default)]
pub(super) struct Plan {
    pub(super) keys: Vec<String>,
    /// PID 1's live parts, sorted.
    pub(super) parts: Vec<LivePart>,
    pub(super) machined_part: bool,
    pub(super) need_reboot: Vec<(String, &'static str)>,
}

impl Plan {
    pub(super) fn new(old: Option<&MachineConfig>, new: &MachineConfig) -> Plan {
        let mut plan = Plan {
            keys: changed_keys(old, new),
            ..Plan::default()
        };
        for key in &plan.keys {
            match classify(key) {
                Where::Live(p) => plan.parts.push(p),
                Where::Machined => plan.machined_part = true,
                Where::Reboot(why) => plan.need_reboot.push((key.clone(), why)),
            }
        }
        plan.parts.sort();
        plan.parts.dedup();
        plan
    }

    /// Also the parts a try whose revert failed left in doubt: the new config is applied
    /// to them too.
    pub(super) fn and_parts_of(mut self, failed: Option<&TryRecord>) -> Plan {
        if let Some(record) = failed {
            self.parts.extend(record.parts.iter().copied());
            self.parts.sort();
            self.parts.dedup();
        }
        self
    }
}

/// A short digest for redacted values (FNV-1a: enough to tell values apart in a diff,
/// without pulling a hash crate in; it is not a security measure).
fn short_digest(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:08x}", h >> 32)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_are_classified() {
        let check = |key: &str, want: Where| assert_eq!(classify(key), want, "{key}");
        check(
            "machine.sysctls.\"vm.swappiness\"",
            Where::Live(LivePart::Sysctls),
        );
        check("machine.sysctls", Where::Live(LivePart::Sysctls));
        check("machine.files[0]", Where::Live(LivePart::Files));
        check("machine.hostname", Where::Live(LivePart::Hostname));
        check(
            "machine.kubelet.extra_args.max-pods",
            Where::Live(LivePart::Kubelet),
        );
        check("machine.api.cert_sans", Where::Machined);
        assert!(matches!(classify("machine.type"), Where::Reboot(_)));
        assert!(matches!(classify("machine.install_disk"), Where::Reboot(_)));
        assert!(
            matches!(classify("cluster.secrets.node_api_ca.key"), Where::Reboot(w) if w.contains("secrets"))
        );
        assert!(matches!(classify("cluster.name"), Where::Reboot(_)));
        assert!(
            matches!(classify("machine.services[0]"), Where::Reboot(w) if w.contains("extension services"))
        );
        assert!(matches!(classify("machine.hostnames"), Where::Reboot(_)));
    }

    #[test]
    fn redaction_hides_keys_but_shows_change() {
        let mut v: toml::Value = toml::from_str(
            "[a]\nkey = \"-----BEGIN PRIVATE KEY-----\"\ncert = \"C\"\n[[b]]\napi_join_token = \"t\"\n",
        )
        .unwrap();
        redact(&mut v);
        let text = toml::to_string(&v).unwrap();
        assert!(!text.contains("BEGIN PRIVATE KEY"), "{text}");
        assert!(text.contains("cert = \"C\""), "{text}");
        assert!(text.contains("<secret "), "{text}");
        assert_ne!(short_digest(b"a"), short_digest(b"b"));
    }
}
