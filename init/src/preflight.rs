//! Preflight: the node-level checks kubeadm runs before it starts a control plane or
//! joins a worker, done by PID 1 so that each problem is named on the console before the
//! kubelet trips over it.
//!
//! Every check reads files under a root directory given as a parameter (`/` on a node, a
//! directory tree built by the test otherwise): `proc/swaps`, `proc/modules`,
//! `proc/sys/...`, `proc/net/tcp{,6}`, `proc/mounts`, `sys/module`, `sys/class/dmi`,
//! `sys/class/net`, `run/containerd`. The result is a [`Report`] with one [`Check`] per
//! name, each `pass`, `warn` (kubeadm would only warn, or it cannot be decided on one
//! node), `fail` (kubeadm would refuse) or `skip` (not applicable yet), and why.
//!
//! Run it after containerd is ready (for the CRI socket) and before etcd and the kubelet
//! start (they would hold the ports checked here).

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use keelson_configs::schema::{DEFAULT_SYSCTLS, MachineType, Swap};

use crate::swap::parse_swaps;
use crate::syscalls::Syscalls;

/// The CRI socket the kubelet talks to.
pub const CRI_SOCKET: &str = "run/containerd/containerd.sock";

/// Ports a control plane needs free: API server, etcd client and peer, kubelet,
/// controller manager, scheduler.
pub const CONTROL_PLANE_PORTS: [u16; 6] = [6443, 2379, 2380, 10250, 10257, 10259];
/// Ports a worker needs free: the kubelet.
pub const WORKER_PORTS: [u16; 1] = [10250];

/// SMBIOS UUIDs that firmware uses as placeholders (never unique).
const PLACEHOLDER_UUIDS: [&str; 3] = [
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "03000200-0400-0500-0006-000700080009",
];

/// One check's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Satisfied.
    Pass,
    /// Suspicious, or not decidable on this node alone; kubeadm would not refuse.
    Warn,
    /// Not satisfied: kubeadm would refuse, or the kubelet would fail.
    Fail,
    /// Not applicable (yet).
    Skip,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
            Status::Skip => "skip",
        })
    }
}

/// One named check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// The check's name (`swap`, `port 6443`, `sysctl net.ipv4.ip_forward`).
    pub name: String,
    /// Its result.
    pub status: Status,
    /// Why, and for a failure what to do.
    pub detail: String,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "preflight {}: {}: {}",
            self.name, self.status, self.detail
        )
    }
}

/// Every check, in a fixed order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The checks.
    pub checks: Vec<Check>,
}

impl Report {
    /// The checks with this status.
    pub fn with_status(&self, status: Status) -> Vec<&Check> {
        self.checks.iter().filter(|c| c.status == status).collect()
    }

    /// Whether nothing failed (warnings allowed).
    pub fn ok(&self) -> bool {
        self.with_status(Status::Fail).is_empty()
    }

    /// The check called `name`.
    pub fn get(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// One line: `preflight: 12 passed, 1 warned, 0 failed, 1 skipped`.
    pub fn summary(&self) -> String {
        let n = |s| self.with_status(s).len();
        format!(
            "preflight: {} passed, {} warned, {} failed, {} skipped",
            n(Status::Pass),
            n(Status::Warn),
            n(Status::Fail),
            n(Status::Skip)
        )
    }
}

/// What the checks depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Control plane or worker: which ports must be free.
    pub role: MachineType,
    /// The config's swap policy.
    pub swap: Swap,
    /// Whether containerd has been reported ready (the CRI socket is checked only then).
    pub containerd_ready: bool,
}

/// The ports `role` needs free.
pub fn required_ports(role: MachineType) -> &'static [u16] {
    match role {
        MachineType::ControlPlane => &CONTROL_PLANE_PORTS,
        MachineType::Worker => &WORKER_PORTS,
    }
}

/// Listening TCP sockets in a `/proc/net/tcp` or `tcp6` table: `(port, address)`.
pub fn parse_listeners(text: &str) -> Vec<(u16, String)> {
    const LISTEN: &str = "0A";
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || f[3] != LISTEN {
                return None;
            }
            let (addr, port) = f[1].split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            Some((port, decode_address(addr)))
        })
        .collect()
}

/// A `/proc/net/tcp{,6}` address: 32-bit words in the machine's (little-endian) order.
fn decode_address(hex: &str) -> String {
    let words: Vec<[u8; 4]> = (0..hex.len() / 8)
        .filter_map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok())
        .map(u32::to_le_bytes)
        .collect();
    match words.as_slice() {
        [w] => std::net::Ipv4Addr::from(*w).to_string(),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(*w);
            }
            format!("[{}]", std::net::Ipv6Addr::from(bytes))
        }
        _ => hex.to_string(),
    }
}

fn read(root: &Path, rel: &str) -> std::io::Result<String> {
    std::fs::read_to_string(root.join(rel))
}

fn check(name: impl Into<String>, status: Status, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        status,
        detail: detail.into(),
    }
}

fn swap_check(root: &Path, policy: Swap) -> Check {
    let name = "swap";
    if policy == Swap::On {
        return check(
            name,
            Status::Skip,
            "the config allows swap (the kubelet then needs failSwapOn = false)",
        );
    }
    match read(root, "proc/swaps") {
        Err(e) => check(name, Status::Fail, format!("cannot read /proc/swaps: {e}")),
        Ok(text) => {
            let areas = parse_swaps(&text);
            if areas.is_empty() {
                check(name, Status::Pass, "no active swap")
            } else {
                let list: Vec<String> = areas.into_iter().map(|a| a.path).collect();
                check(
                    name,
                    Status::Fail,
                    format!(
                        "active swap: {}; the config says swap = \"off\": swapoff failed at boot, see the swap lines above",
                        list.join(", ")
                    ),
                )
            }
        }
    }
}

fn swapon_check(root: &Path) -> Check {
    let found: Vec<&str> = [
        "usr/sbin/swapon",
        "usr/bin/swapon",
        "sbin/swapon",
        "bin/swapon",
    ]
    .into_iter()
    .filter(|p| root.join(p).symlink_metadata().is_ok())
    .collect();
    if found.is_empty() {
        check("no-swapon", Status::Pass, "no swapon tool in the image")
    } else {
        check(
            "no-swapon",
            Status::Fail,
            format!(
                "the image carries /{}: nothing may enable swap on a node; drop it from the image",
                found.join(", /")
            ),
        )
    }
}

fn module_check(root: &Path, module: &str) -> Check {
    let name = module.to_string();
    let in_proc = read(root, "proc/modules")
        .map(|t| {
            t.lines()
                .any(|l| l.split_whitespace().next() == Some(module))
        })
        .unwrap_or(false);
    if in_proc || root.join("sys/module").join(module).is_dir() {
        check(name, Status::Pass, "loaded")
    } else {
        check(
            name,
            Status::Fail,
            "not loaded: it is a default module unless machine.disabled_kernel_modules lists it; see the module lines above",
        )
    }
}

fn sysctl_check(root: &Path, key: &str, want: &str) -> Check {
    let name = format!("sysctl {key}");
    let rel = format!("proc/sys/{}", key.replace('.', "/"));
    match read(root, &rel) {
        Ok(v) if v.trim() == want => check(name, Status::Pass, format!("{key} = {want}")),
        Ok(v) => check(
            name,
            Status::Fail,
            format!(
                "{key} = {}, must be {want}: set it in machine.sysctls (a default unless overridden)",
                v.trim()
            ),
        ),
        Err(e) => check(
            name,
            Status::Fail,
            format!(
                "cannot read /{rel}: {e}: its module (br_netfilter for net.bridge.*) is not loaded"
            ),
        ),
    }
}

fn product_uuid_check(root: &Path) -> Check {
    let name = "product_uuid";
    match read(root, "sys/class/dmi/id/product_uuid") {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => check(
            name,
            Status::Skip,
            "not visible: this machine has no DMI product UUID",
        ),
        Err(e) => check(
            name,
            Status::Fail,
            format!("/sys/class/dmi/id/product_uuid is not readable: {e}"),
        ),
        Ok(text) => {
            let uuid = text.trim().to_ascii_lowercase();
            if uuid.is_empty() || PLACEHOLDER_UUIDS.contains(&uuid.as_str()) {
                check(
                    name,
                    Status::Warn,
                    format!(
                        "{uuid:?} is a firmware placeholder, the same on every such machine: give each VM its own (QEMU -uuid, the hypervisor's VM UUID)"
                    ),
                )
            } else {
                check(name, Status::Pass, uuid)
            }
        }
    }
}

fn mac_check(sys: &dyn Syscalls, root: &Path) -> Check {
    let name = "mac-unique";
    /// `ARPHRD_ETHER`: links whose MAC identifies the node.
    const ETHER: &str = "1";
    let dir = root.join("sys/class/net");
    let Ok(links) = sys.read_dir_names(&dir) else {
        return check(name, Status::Skip, "no /sys/class/net");
    };
    let read = |path: PathBuf| {
        sys.read_file(&path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let mut by_mac: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for link in links {
        let path = dir.join(&link);
        let kind = read(path.join("type"));
        let mac = read(path.join("address"));
        let mac = mac.trim().to_ascii_lowercase();
        if kind.trim() != ETHER || mac.is_empty() || mac == "00:00:00:00:00:00" {
            continue;
        }
        by_mac.entry(mac).or_default().push(link);
    }
    let shared: Vec<String> = by_mac
        .iter()
        .filter(|(_, links)| links.len() > 1)
        .map(|(mac, links)| {
            let mut links = links.clone();
            links.sort();
            format!("{} share {mac}", links.join(" and "))
        })
        .collect();
    if by_mac.is_empty() {
        check(name, Status::Skip, "no Ethernet link yet")
    } else if shared.is_empty() {
        check(
            name,
            Status::Pass,
            format!("{} Ethernet link(s), each with its own MAC", by_mac.len()),
        )
    } else {
        check(
            name,
            Status::Warn,
            format!(
                "{}: give every interface its own MAC (QEMU -device ...,mac=)",
                shared.join("; ")
            ),
        )
    }
}

fn port_checks(root: &Path, role: MachineType) -> Vec<Check> {
    let mut listeners: Vec<(u16, String)> = Vec::new();
    let mut unreadable = Vec::new();
    for table in ["proc/net/tcp", "proc/net/tcp6"] {
        match read(root, table) {
            Ok(text) => listeners.extend(parse_listeners(&text)),
            Err(e) => unreadable.push(format!("/{table}: {e}")),
        }
    }
    required_ports(role)
        .iter()
        .map(|&port| {
            let name = format!("port {port}");
            let holders: Vec<String> = listeners
                .iter()
                .filter(|(p, _)| *p == port)
                .map(|(_, a)| format!("{a}:{port}"))
                .collect();
            if !holders.is_empty() {
                check(
                    name,
                    Status::Fail,
                    format!(
                        "in use: something listens on {}; stop it, or run preflight before the services that own it start",
                        holders.join(", ")
                    ),
                )
            } else if unreadable.len() == 2 {
                check(
                    name,
                    Status::Fail,
                    format!("cannot tell: {}", unreadable.join("; ")),
                )
            } else {
                check(name, Status::Pass, "free")
            }
        })
        .collect()
}

fn cri_check(root: &Path, containerd_ready: bool) -> Check {
    let name = "cri-socket";
    if !containerd_ready {
        return check(name, Status::Skip, "containerd is not ready yet");
    }
    match root.join(CRI_SOCKET).symlink_metadata() {
        Ok(m) if m.file_type().is_socket() => check(name, Status::Pass, format!("/{CRI_SOCKET}")),
        Ok(_) => check(
            name,
            Status::Fail,
            format!("/{CRI_SOCKET} exists but is not a socket"),
        ),
        Err(e) => check(
            name,
            Status::Fail,
            format!(
                "/{CRI_SOCKET}: {e}: containerd was reported ready but its socket is missing; see the containerd lines"
            ),
        ),
    }
}

fn cgroup_check(root: &Path) -> Check {
    let name = "cgroup-v2";
    let Ok(mounts) = read(root, "proc/mounts") else {
        return check(name, Status::Fail, "cannot read /proc/mounts");
    };
    let at_cgroup: Vec<&str> = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[1] == "/sys/fs/cgroup").then_some(f[2])
        })
        .collect();
    match at_cgroup.last() {
        Some(&"cgroup2") => check(name, Status::Pass, "cgroup2 mounted at /sys/fs/cgroup"),
        Some(other) => check(
            name,
            Status::Fail,
            format!(
                "/sys/fs/cgroup is {other}, not cgroup2: the kubelet's systemd-less cgroup driver needs the unified hierarchy"
            ),
        ),
        None => check(
            name,
            Status::Fail,
            "nothing is mounted at /sys/fs/cgroup: mount cgroup2 there (the early mount table)",
        ),
    }
}

/// Whether `name` is a valid Kubernetes node name (RFC 1123 subdomain, lower case).
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn hostname_check(root: &Path) -> Check {
    let name = "hostname";
    match read(root, "proc/sys/kernel/hostname") {
        Err(e) => check(name, Status::Fail, format!("cannot read the hostname: {e}")),
        Ok(text) => {
            let host = text.trim();
            if host.is_empty() || host == "(none)" {
                check(
                    name,
                    Status::Fail,
                    "not set: set machine.hostname, or let DHCP or the MAC name the node",
                )
            } else if host == "localhost" {
                check(
                    name,
                    Status::Fail,
                    "\"localhost\" cannot name a Kubernetes node: set machine.hostname",
                )
            } else if !valid_node_name(host) {
                check(
                    name,
                    Status::Fail,
                    format!(
                        "{host:?} is not a valid node name (lower-case letters, digits, '-' and '.')"
                    ),
                )
            } else {
                check(name, Status::Pass, host)
            }
        }
    }
}

/// Run every check against the system under `root` (`/` on a node); the sysfs walk goes
/// through `sys`.
pub fn run(sys: &dyn Syscalls, root: &Path, options: &Options) -> Report {
    let mut checks = vec![swap_check(root, options.swap), swapon_check(root)];
    checks.push(module_check(root, "br_netfilter"));
    for (key, value) in DEFAULT_SYSCTLS {
        checks.push(sysctl_check(root, key, value));
    }
    checks.push(product_uuid_check(root));
    checks.push(mac_check(sys, root));
    checks.extend(port_checks(root, options.role));
    checks.push(cri_check(root, options.containerd_ready));
    checks.push(cgroup_check(root));
    checks.push(hostname_check(root));
    Report { checks }
}

#[cfg(test)]
// Tests build their fixtures on disk.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A directory tree standing for `/`, removed on drop.
    struct Tree(PathBuf);

    impl Tree {
        fn new(tag: &str) -> std::io::Result<Tree> {
            let dir = std::env::temp_dir()
                .join(format!("keelson-preflight-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            Ok(Tree(dir))
        }

        fn file(&self, rel: &str, content: &str) -> std::io::Result<&Tree> {
            let path = self.0.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, content)?;
            Ok(self)
        }

        fn remove(&self, rel: &str) -> std::io::Result<&Tree> {
            std::fs::remove_file(self.0.join(rel))?;
            Ok(self)
        }

        /// A node as it should be after containerd is ready.
        fn healthy(tag: &str) -> std::io::Result<Tree> {
            let t = Tree::new(tag)?;
            t.file("proc/swaps", "Filename Type Size Used Priority\n")?
                .file("proc/modules", "br_netfilter 36864 0 - Live 0x0\nbridge 1 1 br_netfilter, Live 0x0\n")?
                .file("proc/sys/net/bridge/bridge-nf-call-iptables", "1\n")?
                .file("proc/sys/net/bridge/bridge-nf-call-ip6tables", "1\n")?
                .file("proc/sys/net/ipv4/ip_forward", "1\n")?
                .file("proc/sys/kernel/hostname", "cp-1\n")?
                .file("sys/class/dmi/id/product_uuid", "8E5A9C51-2D0F-4B7B-9E0E-0C6B1F7B2A11\n")?
                .file("sys/class/net/lo/address", "00:00:00:00:00:00\n")?
                .file("sys/class/net/lo/type", "772\n")?
                .file("sys/class/net/eth0/address", "52:54:00:12:34:56\n")?
                .file("sys/class/net/eth0/type", "1\n")?
                .file(
                    "proc/mounts",
                    "proc /proc proc rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n",
                )?
                // containerd's own listener (a loopback port) is no concern.
                .file(
                    "proc/net/tcp",
                    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                     \x20  0: 0100007F:A7F1 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
                     \x20  1: 0100007F:1A0A 0200007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n",
                )?
                .file("proc/net/tcp6", "  sl  local_address remote_address st\n")?;
            std::fs::create_dir_all(t.0.join("run/containerd"))?;
            std::os::unix::net::UnixListener::bind(t.0.join(CRI_SOCKET))?;
            Ok(t)
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const CP: Options = Options {
        role: MachineType::ControlPlane,
        swap: Swap::Off,
        containerd_ready: true,
    };

    fn statuses(report: &Report) -> Vec<String> {
        report
            .checks
            .iter()
            .map(|c| format!("{} {}", c.name, c.status))
            .collect()
    }

    #[test]
    fn a_healthy_control_plane_passes_every_check() -> std::io::Result<()> {
        let tree = Tree::healthy("healthy")?;
        let report = run(&crate::syscalls::Linux, &tree.0, &CP);
        assert_eq!(
            statuses(&report),
            [
                "swap pass",
                "no-swapon pass",
                "br_netfilter pass",
                "sysctl net.bridge.bridge-nf-call-iptables pass",
                "sysctl net.bridge.bridge-nf-call-ip6tables pass",
                "sysctl net.ipv4.ip_forward pass",
                "product_uuid pass",
                "mac-unique pass",
                "port 6443 pass",
                "port 2379 pass",
                "port 2380 pass",
                "port 10250 pass",
                "port 10257 pass",
                "port 10259 pass",
                "cri-socket pass",
                "cgroup-v2 pass",
                "hostname pass",
            ]
        );
        assert!(report.ok());
        assert_eq!(
            report.summary(),
            "preflight: 17 passed, 0 warned, 0 failed, 0 skipped"
        );
        assert_eq!(
            report.get("hostname").map(|c| c.to_string()).as_deref(),
            Some("preflight hostname: pass: cp-1")
        );
        Ok(())
    }

    fn detail(report: &Report, name: &str) -> String {
        report
            .get(name)
            .map(|c| format!("{}: {}", c.status, c.detail))
            .unwrap_or_default()
    }

    #[test]
    fn each_problem_is_named_with_why() -> std::io::Result<()> {
        let tree = Tree::healthy("broken")?;
        tree.file(
            "proc/swaps",
            "Filename Type Size Used Priority\n/dev/vda6 partition 65532 0 -2\n",
        )?
        .file("usr/sbin/swapon", "")?
        .file("proc/modules", "bridge 1 0 - Live 0x0\n")?
        .remove("proc/sys/net/bridge/bridge-nf-call-ip6tables")?
        .file("proc/sys/net/ipv4/ip_forward", "0\n")?
        .file("sys/class/dmi/id/product_uuid", "00000000-0000-0000-0000-000000000000\n")?
        .file("sys/class/net/eth1/address", "52:54:00:12:34:56\n")?
        .file("sys/class/net/eth1/type", "1\n")?
        .file(
            "proc/net/tcp6",
            "  sl  local_address                         remote_address                        st\n\
             \x20  0: 00000000000000000000000000000000:192B 00000000000000000000000000000000:0000 0A 0\n\
             \x20  1: 0000000000000000FFFF00000100007F:0951 00000000000000000000000000000000:0000 0A 0\n",
        )?
        .file("proc/mounts", "cgroup /sys/fs/cgroup tmpfs rw 0 0\n")?
        .file("proc/sys/kernel/hostname", "(none)\n")?;
        let report = run(&crate::syscalls::Linux, &tree.0, &CP);
        assert_eq!(
            detail(&report, "swap"),
            "fail: active swap: /dev/vda6; the config says swap = \"off\": swapoff failed at \
             boot, see the swap lines above"
        );
        assert_eq!(
            detail(&report, "no-swapon"),
            "fail: the image carries /usr/sbin/swapon: nothing may enable swap on a node; drop \
             it from the image"
        );
        assert!(detail(&report, "br_netfilter").starts_with("fail: not loaded"));
        assert!(
            detail(&report, "sysctl net.bridge.bridge-nf-call-ip6tables")
                .starts_with("fail: cannot read /proc/sys/net/bridge/bridge-nf-call-ip6tables")
        );
        assert_eq!(
            detail(&report, "sysctl net.ipv4.ip_forward"),
            "fail: net.ipv4.ip_forward = 0, must be 1: set it in machine.sysctls (a default \
             unless overridden)"
        );
        assert!(detail(&report, "product_uuid").starts_with(
            "warn: \"00000000-0000-0000-0000-000000000000\" is a firmware placeholder"
        ));
        assert_eq!(
            detail(&report, "mac-unique"),
            "warn: eth0 and eth1 share 52:54:00:12:34:56: give every interface its own MAC \
             (QEMU -device ...,mac=)"
        );
        assert_eq!(
            detail(&report, "port 6443"),
            "fail: in use: something listens on [::]:6443; stop it, or run preflight before \
             the services that own it start"
        );
        // Only the role's ports are checked: 2385 is held but nobody's business.
        assert_eq!(detail(&report, "port 2385"), "");
        assert!(detail(&report, "port 2379").starts_with("pass"));
        assert_eq!(
            detail(&report, "cgroup-v2"),
            "fail: /sys/fs/cgroup is tmpfs, not cgroup2: the kubelet's systemd-less cgroup \
             driver needs the unified hierarchy"
        );
        assert!(detail(&report, "hostname").starts_with("fail: not set"));
        assert!(!report.ok());
        assert_eq!(
            report.summary(),
            "preflight: 7 passed, 2 warned, 8 failed, 0 skipped"
        );
        Ok(())
    }

    #[test]
    fn ipv4_mapped_listeners_count_for_their_port() {
        let text = "  sl  local_address                         remote_address st\n\
                    \x20  0: 0000000000000000FFFF00000100007F:0951 00000000000000000000000000000000:0000 0A 0\n\
                    \x20  1: 0100007F:0CEA 00000000:0000 0A 0\n\
                    \x20  2: 0100007F:2A1A 0200007F:0CEA 01 0\n";
        assert_eq!(
            parse_listeners(text),
            [
                (2385, "[::ffff:127.0.0.1]".to_string()),
                (3306, "127.0.0.1".to_string())
            ]
        );
    }

    #[test]
    fn a_worker_checks_only_the_kubelet_port_and_skips_what_is_not_ready() -> std::io::Result<()> {
        let tree = Tree::healthy("worker")?;
        tree.remove("sys/class/dmi/id/product_uuid")?.file(
            "proc/net/tcp",
            "  sl  local_address rem_address   st\n\
             \x20  0: 00000000:192B 00000000:0000 0A 0\n",
        )?;
        let options = Options {
            role: MachineType::Worker,
            swap: Swap::On,
            containerd_ready: false,
        };
        let report = run(&crate::syscalls::Linux, &tree.0, &options);
        let ports: Vec<&str> = report
            .checks
            .iter()
            .filter(|c| c.name.starts_with("port "))
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(ports, ["port 10250"]);
        assert_eq!(
            report
                .with_status(Status::Skip)
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["swap", "product_uuid", "cri-socket"]
        );
        assert!(report.ok(), "{:?}", report.with_status(Status::Fail));
        Ok(())
    }

    #[test]
    fn node_names() {
        for ok in ["cp-1", "node.example.com", "a"] {
            assert!(valid_node_name(ok), "{ok}");
        }
        for bad in ["", "CP-1", "-a", "a-", "a..b", "a_b", &"a".repeat(64)] {
            assert!(!valid_node_name(bad), "{bad}");
        }
    }
}
