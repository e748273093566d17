//! Validation of a machine config: every problem of a file in one run.
//!
//! The steps, each reporting every problem it finds:
//!
//! 0. the config must fit in [`MAX_CONFIG_BYTES`] (1 MiB), the limit every reader of a
//!    config on the node holds;
//! 1. the bytes must be UTF-8 (else "not UTF-8 at byte N");
//! 2. the text must be TOML (every syntax error the parser recovers from is reported);
//! 3. the document is walked along the crate's key tree (module `shape`): unknown keys with a
//!    suggestion, wrong types, missing keys, values that break their rule;
//! 4. the cleaned document is deserialized into [`MachineConfig`], and the checks that
//!    relate several values run on it: overlapping networks, duplicate interfaces, the
//!    secrets each node type must and must not carry, the rules of the [`Mode`],
//!    warnings when a kubelet prerequisite is turned off, etcd endpoints (each parsed,
//!    none twice), the files to write (each under /var or /etc, see
//!    [`check_machine_file_path`], none twice), and extension services (names, commands, environments, dependencies
//!    on known services without cycles).
//!
//! A config is valid when no diagnostic is an error; warnings do not block it.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use ipnet::IpNet;
use toml::de::DeTable;

use crate::diagnostics::{Diagnostic, Location, Report, Severity};
use crate::layout::STATE_MOUNT;
use crate::schema::{
    BUILTIN_SERVICES, DEFAULT_KERNEL_MODULES, DEFAULT_SYSCTLS, MachineConfig, MachineType, Swap,
    parse_etcd_endpoint,
};
use crate::shape::{Sink, key_path};
use crate::values::{ValueError, quote};

/// How many TOML syntax errors are reported before the rest are left out.
const MAX_SYNTAX_ERRORS: usize = 20;

/// The largest machine config a node accepts (1 MiB), from every source: PID 1 at boot
/// (fw_cfg, a config drive, a URL), a live change, and machined's `apply-config`. A
/// config is a few kilobytes; the limit bounds what a hostile source can make a node
/// parse and keep. [`check_str`] refuses a longer config whole.
pub const MAX_CONFIG_BYTES: usize = 1024 * 1024;

/// The directories `machine.files` may write beneath, as on Talos: EPHEMERAL and the
/// generated `/etc`. The read-only root and STATE are out of bounds, with the two
/// exceptions below.
pub const FILE_ROOTS: [&str; 2] = ["/var", "/etc"];

/// The CNI plugin directory, where a config may put plugins as a pod network's
/// installer does: a writable overlay whose changes live on EPHEMERAL (PID 1's
/// `CNI_BIN_DIR`).
pub const CNI_PLUGIN_DIR: &str = "/opt/cni/bin";

/// STATE's files that a config writes itself (paths inside STATE): a worker's node API
/// certificate and key, which `machinectl cluster create` issues into its
/// `machine.files` (the node protocol's `state::NODE_API_CERT` and `NODE_API_KEY`).
/// Every other file in STATE is keelson's own (the configs, the try record, the machine
/// id) and no config may write it.
pub const STATE_FILES_FROM_CONFIG: [&str; 2] = ["node-api/server.crt", "node-api/server.key"];

/// Where the node runs; some settings make sense only in some modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Installed on a disk of a physical or virtual machine (needs `install_disk`).
    #[default]
    Metal,
    /// Booted from a cloud image that is already on its disk.
    Cloud,
    /// Run as a container: no disks, kernel modules or network interfaces of its own.
    Container,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "metal" => Ok(Mode::Metal),
            "cloud" => Ok(Mode::Cloud),
            "container" => Ok(Mode::Container),
            _ => Err(format!(
                "unknown mode {s:?}: expected metal, cloud or container"
            )),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Metal => "metal",
            Mode::Cloud => "cloud",
            Mode::Container => "container",
        })
    }
}

/// The outcome of checking one config file.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// The config, when no diagnostic is an error.
    pub config: Option<MachineConfig>,
    /// Every problem found, in source order.
    pub diagnostics: Vec<Diagnostic>,
}

impl Checked {
    /// Whether the config may be applied.
    pub fn is_valid(&self) -> bool {
        self.config.is_some()
    }

    /// The config, or a report of every problem.
    pub fn into_result(self) -> Result<MachineConfig, Report> {
        match self.config {
            Some(config) => Ok(config),
            None => Err(Report {
                diagnostics: self.diagnostics,
            }),
        }
    }
}

/// Reads and checks the config file at `path`; the file name in diagnostics is `path`.
pub fn check_file(path: &Path, mode: Mode) -> Checked {
    let file = path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => check_bytes(&bytes, &file, mode),
        Err(err) => Checked {
            config: None,
            diagnostics: vec![Diagnostic {
                severity: Severity::Error,
                file,
                location: None,
                path: String::new(),
                message: format!("cannot read the file: {err}"),
                hint: Some("check the path and its permissions".into()),
            }],
        },
    }
}

/// Reads, checks and returns the config at `path`, or every problem it has.
pub fn load(path: &Path, mode: Mode) -> Result<MachineConfig, Report> {
    check_file(path, mode).into_result()
}

/// Checks config bytes; `file` names them in diagnostics.
pub fn check_bytes(bytes: &[u8], file: &str, mode: Mode) -> Checked {
    match std::str::from_utf8(bytes) {
        Ok(src) => check_str(src, file, mode),
        Err(err) => {
            let good = &bytes[..err.valid_up_to()];
            let good = std::str::from_utf8(good).unwrap_or_default();
            Checked {
                config: None,
                diagnostics: vec![Diagnostic {
                    severity: Severity::Error,
                    file: file.to_string(),
                    location: Some(Location::of_offset(good, good.len())),
                    path: String::new(),
                    message: format!("not UTF-8 at byte {}", err.valid_up_to()),
                    hint: Some("a machine config is UTF-8 TOML text".into()),
                }],
            }
        }
    }
}

/// Checks config text; `file` names it in diagnostics.
pub fn check_str(src: &str, file: &str, mode: Mode) -> Checked {
    if src.len() > MAX_CONFIG_BYTES {
        return Checked {
            config: None,
            diagnostics: vec![Diagnostic {
                severity: Severity::Error,
                file: file.to_string(),
                location: None,
                path: String::new(),
                message: too_big(src.len()),
                hint: Some(
                    "a machine config is a few kilobytes: move large content out of machine.files (fetch it from a service or an image instead)".into(),
                ),
            }],
        };
    }
    let mut sink = Sink::new(src, file);
    let (root, syntax_errors) = DeTable::parse_recoverable(src);
    if !syntax_errors.is_empty() {
        for err in syntax_errors.iter().take(MAX_SYNTAX_ERRORS) {
            let offset = err.span().map_or(0, |s| s.start);
            let message = err.message().trim().to_string();
            let hint = if message == "duplicate key" {
                Some("each key may appear once in a table".to_string())
            } else {
                None
            };
            sink.at(Severity::Error, offset, "", message, hint);
        }
        if syntax_errors.len() > MAX_SYNTAX_ERRORS {
            let more = syntax_errors.len() - MAX_SYNTAX_ERRORS;
            sink.at(
                Severity::Error,
                src.len(),
                "",
                format!("{more} more syntax errors left out"),
                None,
            );
        }
        return finish(sink, None);
    }
    let cleaned = sink.walk_document(&root);
    let config = match cleaned.try_into::<MachineConfig>() {
        Ok(config) => {
            semantic(&config, mode, &mut sink);
            Some(config)
        }
        Err(err) => {
            // The key tree and the types disagree: a bug, reported rather than hidden.
            sink.at(
                Severity::Error,
                0,
                "",
                format!("internal error: the validated document does not deserialize: {err}"),
                Some("please report this".into()),
            );
            None
        }
    };
    finish(sink, config)
}

fn finish(sink: Sink<'_>, config: Option<MachineConfig>) -> Checked {
    let mut diagnostics = sink.into_diagnostics();
    diagnostics.sort_by_key(|d| d.location.map(|l| l.offset));
    let valid = !diagnostics.iter().any(Diagnostic::is_error);
    Checked {
        config: config.filter(|_| valid),
        diagnostics,
    }
}

/// The checks that relate several values.
fn semantic(config: &MachineConfig, mode: Mode, sink: &mut Sink<'_>) {
    interfaces(config, sink);
    networks(config, sink);
    secrets(config, sink);
    mode_rules(config, mode, sink);
    prerequisites(config, sink);
    kubelet_and_etcd(config, sink);
    etcd_endpoints(config, sink);
    files(config, sink);
    services(config, sink);
}

fn interfaces(config: &MachineConfig, sink: &mut Sink<'_>) {
    let mut by_name: HashMap<&str, String> = HashMap::new();
    let mut by_mac: HashMap<crate::values::MacAddr, String> = HashMap::new();
    for (i, iface) in config.machine.network.interfaces.iter().enumerate() {
        let p = format!("machine.network.interfaces[{i}]");
        let (name_p, mac_p) = (format!("{p}.name"), format!("{p}.mac"));
        match (&iface.name, &iface.mac) {
            (None, None) => sink.report(
                Severity::Error,
                &p,
                &[],
                "the interface is selected by neither `name` nor `mac`".into(),
                Some("set one of them, like name = \"eth0\"".into()),
            ),
            (Some(_), Some(_)) => sink.report(
                Severity::Error,
                &mac_p,
                &[&name_p],
                "the interface is selected by both `name` and `mac`".into(),
                Some("keep one of them".into()),
            ),
            _ => {}
        }
        if let Some(name) = &iface.name {
            if let Some(first) = by_name.get(name.as_str()).cloned() {
                sink.report(
                    Severity::Error,
                    &name_p,
                    &[&first],
                    format!("interface {name:?} is already configured at {first}"),
                    Some("merge the two entries".into()),
                );
            } else {
                by_name.insert(name, name_p.clone());
            }
        }
        if let Some(mac) = &iface.mac {
            if let Some(first) = by_mac.get(mac).cloned() {
                sink.report(
                    Severity::Error,
                    &mac_p,
                    &[&first],
                    format!("MAC address {mac} is already configured at {first}"),
                    Some("merge the two entries".into()),
                );
            } else {
                by_mac.insert(*mac, mac_p.clone());
            }
        }
        if !iface.dhcp && iface.addresses.is_empty() {
            sink.report(
                Severity::Warning,
                &p,
                &[&format!("{p}.dhcp"), &format!("{p}.addresses")],
                "the interface has neither dhcp nor static addresses".into(),
                Some("set dhcp = true or add addresses".into()),
            );
        }
        for (j, route) in iface.routes.iter().enumerate() {
            let rp = format!("{p}.routes[{j}]");
            if let Some(via) = route.via
                && via.is_ipv4() != matches!(route.to, IpNet::V4(_))
            {
                let via_p = format!("{rp}.via");
                let to_p = format!("{rp}.to");
                sink.report(
                    Severity::Error,
                    &via_p,
                    &[&to_p],
                    format!(
                        "gateway {via} and destination {} are of different IP families",
                        route.to
                    ),
                    Some("use a gateway of the destination's family".into()),
                );
            }
        }
    }
}

fn family(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "IPv4",
        IpNet::V6(_) => "IPv6",
    }
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn networks(config: &MachineConfig, sink: &mut Sink<'_>) {
    let cluster = &config.cluster;
    let pods: Vec<(String, IpNet)> = cluster
        .pod_subnets
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("cluster.pod_subnets[{i}]"), *n))
        .collect();
    let services: Vec<(String, IpNet)> = cluster
        .service_subnets
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("cluster.service_subnets[{i}]"), *n))
        .collect();
    for (list, key) in [(&pods, "pod_subnets"), (&services, "service_subnets")] {
        let path = format!("cluster.{key}");
        if list.is_empty() {
            sink.report(
                Severity::Error,
                &path,
                &[],
                format!("`{key}` is empty"),
                Some("give one subnet per IP family, like [\"10.244.0.0/16\"]".into()),
            );
        }
        for (i, (p, net)) in list.iter().enumerate() {
            if let Some((first, _)) = list[..i].iter().find(|(_, n)| family(n) == family(net)) {
                sink.report(
                    Severity::Error,
                    p,
                    &[first],
                    format!("a second {} subnet ({first} is the first)", family(net)),
                    Some("give at most one subnet per IP family".into()),
                );
            }
        }
    }
    let families = |list: &[(String, IpNet)]| {
        let mut f: Vec<&str> = list.iter().map(|(_, n)| family(n)).collect();
        f.sort_unstable();
        f.dedup();
        f
    };
    if !pods.is_empty() && !services.is_empty() && families(&pods) != families(&services) {
        sink.report(
            Severity::Error,
            "cluster.service_subnets",
            &["cluster.pod_subnets"],
            "pod and service subnets cover different IP families".into(),
            Some("give both an IPv4 subnet, an IPv6 subnet, or one of each".into()),
        );
    }
    for (p, net) in &services {
        let max = match net {
            IpNet::V4(_) => 12,
            IpNet::V6(_) => 108,
        };
        if net.prefix_len() < max {
            sink.report(
                Severity::Error,
                p,
                &[],
                format!("service subnet {net} is larger than Kubernetes allows"),
                Some(format!("use a prefix of /{max} or longer")),
            );
        }
    }
    for (sp, s) in &services {
        for (pp, p) in &pods {
            if overlaps(s, p) {
                sink.report(
                    Severity::Error,
                    sp,
                    &[pp],
                    format!("service subnet {s} overlaps pod subnet {p} ({pp})"),
                    Some("pod, service and node networks must not overlap".into()),
                );
            }
        }
    }
    let mut nodes: Vec<(String, IpNet)> = Vec::new();
    for (i, iface) in config.machine.network.interfaces.iter().enumerate() {
        for (j, addr) in iface.addresses.iter().enumerate() {
            nodes.push((
                format!("machine.network.interfaces[{i}].addresses[{j}]"),
                *addr,
            ));
        }
    }
    for (i, net) in config.machine.kubelet.node_ip_subnets.iter().enumerate() {
        nodes.push((format!("machine.kubelet.node_ip_subnets[{i}]"), *net));
    }
    for (np, n) in &nodes {
        for (cp, c) in pods.iter().chain(&services) {
            if overlaps(n, c) {
                let what = if cp.starts_with("cluster.pod") {
                    "pod"
                } else {
                    "service"
                };
                sink.report(
                    Severity::Error,
                    np,
                    &[cp],
                    format!(
                        "node network {} overlaps {what} subnet {c} ({cp})",
                        n.trunc()
                    ),
                    Some("pod, service and node networks must not overlap".into()),
                );
            }
        }
    }
}

fn secrets(config: &MachineConfig, sink: &mut Sink<'_>) {
    let s = &config.cluster.secrets;
    let base = "cluster.secrets";
    let ty = "machine.type";
    if s.api_join_token == s.bootstrap_token {
        sink.report(
            Severity::Error,
            "cluster.secrets.api_join_token",
            &["cluster.secrets.bootstrap_token"],
            "api_join_token is the same as bootstrap_token".into(),
            Some("generate a separate token for each purpose".into()),
        );
    }
    match config.machine.kind {
        MachineType::ControlPlane => {
            let required = [
                ("kubernetes_ca", Some(&s.kubernetes_ca)),
                ("node_api_ca", Some(&s.node_api_ca)),
                ("etcd_ca", s.etcd_ca.as_ref()),
                ("front_proxy_ca", s.front_proxy_ca.as_ref()),
            ];
            for (name, ca) in required {
                let p = key_path(base, name);
                match ca {
                    None => sink.report(
                        Severity::Error,
                        &p,
                        &[ty],
                        format!("a control plane needs the {name} certificate and key"),
                        Some("add them from secrets.toml, or regenerate with `machinectl gen config`".into()),
                    ),
                    Some(ca) if ca.key.is_none() => sink.report(
                        Severity::Error,
                        &key_path(&p, "key"),
                        &[ty],
                        format!("a control plane needs the {name} private key"),
                        Some("add `key` from secrets.toml, or regenerate with `machinectl gen config`".into()),
                    ),
                    Some(_) => {}
                }
            }
            let singles = [
                ("encryption_key", s.encryption_key.is_some()),
                ("service_account_key", s.service_account_key.is_some()),
            ];
            for (name, present) in singles {
                if !present {
                    sink.report(
                        Severity::Error,
                        &key_path(base, name),
                        &[ty],
                        format!("a control plane needs `{name}`"),
                        Some(
                            "add it from secrets.toml, or regenerate with `machinectl gen config`"
                                .into(),
                        ),
                    );
                }
            }
        }
        MachineType::Worker => {
            for (name, ca) in s.cas() {
                if ca.key.is_some() {
                    sink.report(
                        Severity::Error,
                        &key_path(&key_path(base, name), "key"),
                        &[ty],
                        format!("a worker config must not carry the {name} private key"),
                        Some("remove it: only control planes hold CA keys".into()),
                    );
                }
            }
            let singles = [
                ("encryption_key", s.encryption_key.is_some()),
                ("service_account_key", s.service_account_key.is_some()),
            ];
            for (name, present) in singles {
                if present {
                    sink.report(
                        Severity::Error,
                        &key_path(base, name),
                        &[ty],
                        format!("a worker config must not carry `{name}`"),
                        Some("remove it: only control planes hold it".into()),
                    );
                }
            }
        }
    }
}

fn mode_rules(config: &MachineConfig, mode: Mode, sink: &mut Sink<'_>) {
    let m = &config.machine;
    match mode {
        Mode::Metal => {
            if m.install_disk.is_none() {
                sink.report(
                    Severity::Error,
                    "machine.install_disk",
                    &[],
                    "metal mode needs an install disk".into(),
                    Some("set install_disk, like install_disk = \"/dev/vda\"".into()),
                );
            }
        }
        Mode::Cloud => {
            if m.install_disk.is_some() {
                sink.report(
                    Severity::Warning,
                    "machine.install_disk",
                    &[],
                    "install_disk is ignored in cloud mode".into(),
                    Some("the cloud image already runs from its disk; remove the key".into()),
                );
            }
        }
        Mode::Container => {
            let not_in_container = [
                (
                    "machine.install_disk",
                    m.install_disk.is_some(),
                    "an install disk",
                ),
                (
                    "machine.kernel_modules",
                    !m.kernel_modules.is_empty(),
                    "kernel modules",
                ),
                (
                    "machine.network.interfaces",
                    !m.network.interfaces.is_empty(),
                    "network interfaces",
                ),
            ];
            for (path, set, what) in not_in_container {
                if set {
                    sink.report(
                        Severity::Error,
                        path,
                        &[],
                        format!("container mode cannot set {what}"),
                        Some("the container's host owns them; remove the key".into()),
                    );
                }
            }
            if m.swap == Swap::On {
                sink.report(
                    Severity::Warning,
                    "machine.swap",
                    &[],
                    "swap is ignored in container mode".into(),
                    Some("remove the key".into()),
                );
            }
        }
    }
}

fn prerequisites(config: &MachineConfig, sink: &mut Sink<'_>) {
    let m = &config.machine;
    for (i, module) in m.disabled_kernel_modules.iter().enumerate() {
        let p = format!("machine.disabled_kernel_modules[{i}]");
        if DEFAULT_KERNEL_MODULES.contains(&module.as_str()) {
            let why = if module == "overlay" {
                "containerd's overlayfs snapshotter needs it"
            } else {
                "without it, bridged pod traffic bypasses iptables"
            };
            sink.report(
                Severity::Warning,
                &p,
                &[],
                format!("{module} is a kubelet prerequisite: {why}"),
                Some("remove it from disabled_kernel_modules unless you know the cluster does without it".into()),
            );
        } else if !m.kernel_modules.contains(module) {
            sink.report(
                Severity::Warning,
                &p,
                &[],
                format!("{module} is not a default module, so there is nothing to disable"),
                Some(format!(
                    "the defaults are {}",
                    DEFAULT_KERNEL_MODULES.join(", ")
                )),
            );
        }
        if let Some(j) = m.kernel_modules.iter().position(|k| k == module) {
            let other = format!("machine.kernel_modules[{j}]");
            sink.report(
                Severity::Error,
                &p,
                &[&other],
                format!("{module} is both loaded ({other}) and disabled"),
                Some("keep it in one of the two lists".into()),
            );
        }
    }
    for (i, module) in m.kernel_modules.iter().enumerate() {
        if DEFAULT_KERNEL_MODULES.contains(&module.as_str()) {
            sink.report(
                Severity::Warning,
                &format!("machine.kernel_modules[{i}]"),
                &[],
                format!("{module} is loaded by default"),
                Some("remove it from kernel_modules".into()),
            );
        }
    }
    for (name, default) in DEFAULT_SYSCTLS {
        if let Some(value) = m.sysctls.get(name)
            && value.0.trim() != default
        {
            sink.report(
                Severity::Warning,
                &key_path("machine.sysctls", name),
                &[],
                format!(
                    "{name} = {:?} turns off a kubelet prerequisite ({name} = {default})",
                    value.0
                ),
                Some("remove the override unless you know the cluster does without it".into()),
            );
        }
    }
    if m.swap == Swap::On {
        sink.report(
            Severity::Warning,
            "machine.swap",
            &[],
            "swap is on: the kubelet refuses to start unless its configuration sets failSwapOn = false".into(),
            Some("set swap = \"off\", or failSwapOn = false in machine.kubelet.extra_config".into()),
        );
    }
}

fn kubelet_and_etcd(config: &MachineConfig, sink: &mut Sink<'_>) {
    let kubelet = &config.machine.kubelet;
    if !kubelet.node_ip_subnets.is_empty() && kubelet.extra_args.contains_key("node-ip") {
        sink.report(
            Severity::Error,
            "machine.kubelet.extra_args.node-ip",
            &["machine.kubelet.node_ip_subnets"],
            "node-ip is set both here and by node_ip_subnets".into(),
            Some("keep one of the two".into()),
        );
    }
    let artifacts = &config.cluster.kubelet;
    if artifacts.base_url.is_some() && artifacts.sha256.is_empty() {
        sink.report(
            Severity::Warning,
            "cluster.kubelet.base_url",
            &[],
            "base_url is set but no sha256 is pinned, so no downloaded kubelet will run".into(),
            Some("pin the kubelet's sums in [cluster.kubelet.sha256]".into()),
        );
    }
    if config.machine.kind == MachineType::Worker && config.cluster.etcd != Default::default() {
        sink.report(
            Severity::Warning,
            "cluster.etcd",
            &["machine.type"],
            "etcd settings are ignored on workers".into(),
            Some("remove [cluster.etcd] from worker configs".into()),
        );
    }
}

fn etcd_endpoints(config: &MachineConfig, sink: &mut Sink<'_>) {
    let mut seen: Vec<((String, u16), String)> = Vec::new();
    for (i, endpoint) in config.cluster.etcd.endpoints.iter().enumerate() {
        let p = format!("cluster.etcd.endpoints[{i}]");
        match parse_etcd_endpoint(endpoint) {
            Err(err) => sink.report(Severity::Error, &p, &[], err.message, err.hint),
            Ok((host, port)) => {
                let first = seen
                    .iter()
                    .find(|((h, o), _)| h.eq_ignore_ascii_case(&host) && *o == port);
                if let Some((_, first)) = first {
                    sink.report(
                        Severity::Error,
                        &p,
                        &[first],
                        format!("{host} port {port} is already listed at {first}"),
                        Some("list each etcd endpoint once".into()),
                    );
                } else {
                    seen.push(((host, port), p));
                }
            }
        }
    }
}

/// What a config of `len` bytes is told: its size and [`MAX_CONFIG_BYTES`].
pub fn too_big(len: usize) -> String {
    format!("the config is {len} bytes, over the {MAX_CONFIG_BYTES}-byte (1 MiB) limit")
}

/// Checks that `machine.files` may write `path`: an absolute, normalized path beneath
/// one of [`FILE_ROOTS`], in [`CNI_PLUGIN_DIR`], or one of [`STATE_FILES_FROM_CONFIG`]
/// inside STATE (mounted at `state_mount`). PID 1 checks again before it writes.
pub fn check_machine_file_path(path: &str, state_mount: &str) -> Result<(), ValueError> {
    crate::values::check_file_path(path)?;
    let beneath = |dir: &str| path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'));
    if FILE_ROOTS.iter().any(|root| beneath(root)) {
        return Ok(());
    }
    if let Some(rest) = path
        .strip_prefix(CNI_PLUGIN_DIR)
        .and_then(|r| r.strip_prefix('/'))
    {
        if !rest.contains('/') {
            return Ok(());
        }
        return Err(ValueError {
            message: format!("{} is in a directory under {CNI_PLUGIN_DIR}", quote(path)),
            hint: Some(format!(
                "put CNI plugins directly in {CNI_PLUGIN_DIR}, like {CNI_PLUGIN_DIR}/my-plugin"
            )),
        });
    }
    if let Some(inside) = path
        .strip_prefix(state_mount)
        .and_then(|r| r.strip_prefix('/'))
    {
        if STATE_FILES_FROM_CONFIG.contains(&inside) {
            return Ok(());
        }
        return Err(ValueError {
            message: format!(
                "{} is in STATE ({state_mount}), whose files keelson keeps itself",
                quote(path)
            ),
            hint: Some(format!(
                "a config writes only {} there; put other files under /var or /etc",
                STATE_FILES_FROM_CONFIG
                    .map(|f| format!("{state_mount}/{f}"))
                    .join(" and ")
            )),
        });
    }
    Err(ValueError {
        message: format!("{} is not under /var or /etc", quote(path)),
        hint: Some(format!(
            "machine.files writes only under /var (kept on EPHEMERAL) and /etc (made at every boot), \
             and CNI plugins in {CNI_PLUGIN_DIR}; the rest of the root is read-only"
        )),
    })
}

fn files(config: &MachineConfig, sink: &mut Sink<'_>) {
    let mut seen: HashMap<&str, String> = HashMap::new();
    for (i, file) in config.machine.files.iter().enumerate() {
        let p = format!("machine.files[{i}].path");
        if let Err(err) = check_machine_file_path(&file.path, STATE_MOUNT) {
            sink.report(Severity::Error, &p, &[], err.message, err.hint);
            continue;
        }
        if let Some(first) = seen.get(file.path.as_str()).cloned() {
            sink.report(
                Severity::Error,
                &p,
                &[&first],
                format!("{:?} is already written by {first}", file.path),
                Some("merge the two entries".into()),
            );
        } else {
            seen.insert(&file.path, p);
        }
    }
}

/// Whether `name` may name an extension service: an RFC 1123 label (lower-case letters,
/// digits and '-', up to 63, not starting or ending with '-').
fn is_service_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Whether `name` may name an environment variable: letters, digits and '_', not
/// starting with a digit (POSIX's portable names).
fn is_env_name(name: &str) -> bool {
    name.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn services(config: &MachineConfig, sink: &mut Sink<'_>) {
    let list = &config.machine.services;
    let builtins = BUILTIN_SERVICES.join(", ");
    let mut seen: HashMap<&str, String> = HashMap::new();
    for (i, service) in list.iter().enumerate() {
        let p = format!("machine.services[{i}]");
        let name_p = format!("{p}.name");
        let name = service.name.as_str();
        if !is_service_name(name) {
            sink.report(
                Severity::Error,
                &name_p,
                &[],
                format!("{} is not a valid service name", quote(name)),
                Some("use up to 63 lower-case letters, digits and '-', not starting or ending with '-', like node-agent".into()),
            );
        } else if BUILTIN_SERVICES.contains(&name) {
            sink.report(
                Severity::Error,
                &name_p,
                &[],
                format!("{name} is a built-in service"),
                Some(format!(
                    "choose another name; the built-in services are {builtins}"
                )),
            );
        } else if let Some(first) = seen.get(name).cloned() {
            sink.report(
                Severity::Error,
                &name_p,
                &[&first],
                format!("service {name} is already defined at {first}"),
                Some("rename one of them, or merge the two entries".into()),
            );
        } else {
            seen.insert(name, name_p.clone());
        }

        let command_p = format!("{p}.command");
        match service.command.first() {
            None => sink.report(
                Severity::Error,
                &command_p,
                &[],
                "the command is empty".into(),
                Some("give the absolute program path first, like command = [\"/usr/bin/agent\", \"--flag\"]".into()),
            ),
            Some(program) => {
                if let Err(err) = crate::values::check_file_path(program) {
                    sink.report(
                        Severity::Error,
                        &format!("{command_p}[0]"),
                        &[],
                        format!("the program {}", err.message),
                        Some(
                            "name the program by its absolute path, like /usr/bin/agent: it is run directly, not through a shell"
                                .into(),
                        ),
                    );
                }
            }
        }
        for (j, arg) in service.command.iter().enumerate().skip(1) {
            if arg.contains('\0') {
                sink.report(
                    Severity::Error,
                    &format!("{command_p}[{j}]"),
                    &[],
                    "the argument contains a NUL character".into(),
                    Some("remove it: a program's arguments cannot carry NUL".into()),
                );
            }
        }

        for (key, value) in &service.environment {
            let env_p = key_path(&format!("{p}.environment"), key);
            if !is_env_name(key) {
                sink.report(
                    Severity::Error,
                    &env_p,
                    &[],
                    format!("{} is not a valid environment variable name", quote(key)),
                    Some(
                        "use letters, digits and '_', not starting with a digit, like LOG_LEVEL"
                            .into(),
                    ),
                );
            }
            if value.contains('\0') {
                sink.report(
                    Severity::Error,
                    &env_p,
                    &[],
                    format!("the value of {key} contains a NUL character"),
                    Some("remove it: the environment cannot carry NUL".into()),
                );
            }
        }

        for (j, dep) in service.depends_on.iter().enumerate() {
            let dep_p = format!("{p}.depends_on[{j}]");
            let extension = list.iter().any(|s| &s.name == dep);
            if dep == "etcd" && config.machine.kind == MachineType::Worker {
                sink.report(
                    Severity::Error,
                    &dep_p,
                    &["machine.type"],
                    "etcd runs on control planes only, so this worker service would never start"
                        .into(),
                    Some("remove the dependency, or run the service on control planes".into()),
                );
            } else if !extension && !BUILTIN_SERVICES.contains(&dep.as_str()) {
                let extensions: Vec<&str> = list.iter().map(|s| s.name.as_str()).collect();
                let hint = match crate::shape::suggest(
                    dep,
                    BUILTIN_SERVICES.iter().copied().chain(extensions),
                ) {
                    Some(best) => format!("did you mean {best:?}?"),
                    None => format!(
                        "name a built-in service ({builtins}) or one defined in machine.services"
                    ),
                };
                sink.report(
                    Severity::Error,
                    &dep_p,
                    &[],
                    format!("{} is not a service of this node", quote(dep)),
                    Some(hint),
                );
            }
        }
    }
    service_cycles(config, sink);
}

/// Reports each dependency cycle among extension services once, at the dependency of
/// its first-declared member that leads into it. Built-in services depend on no
/// extension service, so every cycle lies among extension services.
fn service_cycles(config: &MachineConfig, sink: &mut Sink<'_>) {
    let list = &config.machine.services;
    // Edges by index: (to, index of the depends_on entry). The first definition of a
    // duplicated name is the one depended on.
    let index = |name: &str| list.iter().position(|s| s.name == name);
    let edges: Vec<Vec<(usize, usize)>> = list
        .iter()
        .map(|s| {
            s.depends_on
                .iter()
                .enumerate()
                .filter_map(|(j, d)| index(d).map(|to| (to, j)))
                .collect()
        })
        .collect();
    for start in 0..list.len() {
        // Breadth-first from `start` through services declared no earlier, back to
        // `start`: the shortest cycle whose first-declared member is `start`.
        let mut came_from: Vec<Option<(usize, usize)>> = vec![None; list.len()];
        let mut queue = std::collections::VecDeque::from([start]);
        let mut closing: Option<(usize, usize)> = None;
        'search: while let Some(at) = queue.pop_front() {
            for &(to, j) in edges.get(at).into_iter().flatten() {
                if to == start {
                    closing = Some((at, j));
                    break 'search;
                }
                if to > start && came_from.get(to).is_some_and(Option::is_none) {
                    if let Some(slot) = came_from.get_mut(to) {
                        *slot = Some((at, j));
                    }
                    queue.push_back(to);
                }
            }
        }
        let Some((last, _)) = closing else {
            continue;
        };
        // Walk back from the service that closes the cycle to `start`.
        let mut members = vec![last];
        let mut first_edge = None;
        let mut at = last;
        while at != start {
            match came_from.get(at).copied().flatten() {
                Some((from, j)) => {
                    if from == start {
                        first_edge = Some(j);
                    }
                    members.push(from);
                    at = from;
                }
                None => break,
            }
        }
        members.reverse();
        let j = match first_edge {
            Some(j) => j,
            // A service depending on itself.
            None => closing.map_or(0, |(_, j)| j),
        };
        members.push(start);
        let names: Vec<&str> = members
            .iter()
            .filter_map(|&m| list.get(m).map(|s| s.name.as_str()))
            .collect();
        sink.report(
            Severity::Error,
            &format!("machine.services[{start}].depends_on[{j}]"),
            &[],
            format!(
                "the services depend on each other in a cycle: {}",
                names.join(" -> ")
            ),
            Some("remove one of these dependencies: a service in a cycle never starts".into()),
        );
    }
}
