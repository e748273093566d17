//! The network of a cluster created as root: a network namespace `keelson-NAME` holding
//! a bridge `br0` with the gateway address and one tap per VM. QEMU runs inside the
//! namespace, so guest traffic never reaches the host's interfaces; nothing routes out
//! of the namespace.
//!
//! Built with iproute2's `ip` rather than a netlink crate: `ip netns add` is the
//! convention (a bind mount under `/run/netns`) that lets an operator look inside with
//! `ip netns exec keelson-NAME ...`, and these few one-off commands gain nothing from
//! hand-written netlink messages.

use std::path::PathBuf;
use std::process::Command;

use super::ClusterError;

/// The bridge's name inside the namespace.
pub const BRIDGE: &str = "br0";

/// The namespace of cluster `name`.
pub fn namespace_name(name: &str) -> String {
    format!("keelson-{name}")
}

/// Where `ip netns` keeps a namespace's handle.
pub fn namespace_path(ns: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(ns)
}

/// Whether the namespace exists.
pub fn exists(ns: &str) -> bool {
    namespace_path(ns).exists()
}

fn ip(args: &[&str]) -> Result<(), ClusterError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| ClusterError::Tool {
            tool: "ip".into(),
            detail: format!(
                "cannot run it ({source}); install iproute2 (apt-get install iproute2)"
            ),
        })?;
    if !out.status.success() {
        return Err(ClusterError::Tool {
            tool: format!("ip {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Creates the namespace, its bridge with `gateway/prefix`, and the taps.
pub fn create(ns: &str, gateway: &str, taps: &[String]) -> Result<(), ClusterError> {
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&["-n", ns, "link", "add", BRIDGE, "type", "bridge"])?;
    ip(&["-n", ns, "addr", "add", gateway, "dev", BRIDGE])?;
    ip(&["-n", ns, "link", "set", BRIDGE, "up"])?;
    for tap in taps {
        ip(&["-n", ns, "tuntap", "add", "dev", tap, "mode", "tap"])?;
        ip(&["-n", ns, "link", "set", tap, "master", BRIDGE])?;
        ip(&["-n", ns, "link", "set", tap, "up"])?;
    }
    Ok(())
}

/// Deletes the namespace (its bridge and taps go with it once no process is inside).
pub fn delete(ns: &str) -> Result<(), ClusterError> {
    if exists(ns) {
        ip(&["netns", "delete", ns])?;
    }
    Ok(())
}
