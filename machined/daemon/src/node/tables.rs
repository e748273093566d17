//! `machinectl get RESOURCE`: node state as a table of strings, read from `/proc` and
//! `/sys` (addresses from `getifaddrs`).
//!
//! Every resource is a [`Table`] with fixed columns, so the CLI prints it as a table, JSON
//! or YAML alike; values are kept as the kernel gives them (bytes, kB, hex decoded).
//!
//! `processes` shows command lines only to a caller who may `read` them
//! (`/proc/PID/cmdline` is admin-only: command lines may hold secrets); anyone else sees
//! each process's name (`/proc/PID/stat`'s `comm`) in brackets.

use std::collections::BTreeMap;
use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use keelson_api::api;
use keelson_configs::pki::Role;

use super::NodePaths;

/// The resources `get` knows, in the order `machinectl get --help` lists them.
pub const RESOURCES: [&str; 10] = [
    "addresses",
    "links",
    "routes",
    "neighbours",
    "mounts",
    "sysctls",
    "modules",
    "disks",
    "memory",
    "processes",
];

/// The largest sysctl value kept (a few are long tables).
const MAX_SYSCTL_VALUE: u64 = 4096;
/// The longest command line shown per process.
const MAX_COMMAND: usize = 200;

/// Errors of `get`.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The resource is not one we know.
    #[error("unknown resource {name:?}; known resources: {}", RESOURCES.join(", "))]
    Unknown {
        /// What was asked for.
        name: String,
    },
    /// A source file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The interface addresses could not be listed.
    #[error("cannot list the interface addresses (getifaddrs)")]
    Addresses(#[source] nix::Error),
}

/// A table: column names and rows of cells.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    /// The column names, upper case.
    pub columns: Vec<String>,
    /// The rows; each has one cell per column.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[&str]) -> Table {
        Table {
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }
}

/// Reads one resource as `role` sees it; `filter` keeps only rows whose first cell
/// starts with it.
pub fn get(
    paths: &NodePaths,
    resource: &str,
    filter: &str,
    role: Role,
) -> Result<Table, TableError> {
    let mut table = match resource {
        "addresses" => addresses()?,
        "links" => links(&paths.sys)?,
        "routes" => routes(&paths.proc)?,
        "neighbours" => neighbours(&paths.proc)?,
        "mounts" => mounts(&paths.proc)?,
        "sysctls" => sysctls(&paths.proc, filter)?,
        "modules" => modules(&paths.proc)?,
        "disks" => disks(&paths.sys)?,
        "memory" => memory(&paths.proc)?,
        "processes" => processes(&paths.proc, api::allows(role, Role::Admin))?,
        other => {
            return Err(TableError::Unknown {
                name: other.to_owned(),
            });
        }
    };
    if !filter.is_empty() {
        table
            .rows
            .retain(|row| row.first().is_some_and(|c| c.starts_with(filter)));
    }
    Ok(table)
}

fn read(path: &Path) -> Result<String, TableError> {
    fs::read_to_string(path).map_err(|source| TableError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn read_trimmed(path: &Path) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn sorted_dir(dir: &Path) -> Result<Vec<String>, TableError> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(|source| TableError::Read {
            path: dir.display().to_string(),
            source,
        })?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

fn prefix_len(mask: &[u8]) -> u32 {
    mask.iter().map(|b| b.count_ones()).sum()
}

fn addresses() -> Result<Table, TableError> {
    let mut table = Table::new(&["INTERFACE", "FAMILY", "ADDRESS"]);
    for ifa in nix::ifaddrs::getifaddrs().map_err(TableError::Addresses)? {
        let Some(addr) = ifa.address else { continue };
        let mask = ifa.netmask;
        if let Some(v4) = addr.as_sockaddr_in() {
            let bits = mask
                .as_ref()
                .and_then(|m| m.as_sockaddr_in())
                .map_or(32, |m| prefix_len(&m.ip().octets()));
            table.push(vec![
                ifa.interface_name.clone(),
                "inet".into(),
                format!("{}/{bits}", v4.ip()),
            ]);
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            let bits = mask
                .as_ref()
                .and_then(|m| m.as_sockaddr_in6())
                .map_or(128, |m| prefix_len(&m.ip().octets()));
            table.push(vec![
                ifa.interface_name.clone(),
                "inet6".into(),
                format!("{}/{bits}", v6.ip()),
            ]);
        }
    }
    table.rows.sort();
    Ok(table)
}

fn link_kind(kind: &str, dir: &Path) -> String {
    if dir.join("bridge").is_dir() {
        return "bridge".into();
    }
    match kind {
        "1" => "ether".into(),
        "772" => "loopback".into(),
        "65534" => "none".into(),
        "" => String::new(),
        other => format!("type {other}"),
    }
}

fn links(sys: &Path) -> Result<Table, TableError> {
    let mut table = Table::new(&[
        "NAME", "STATE", "MAC", "MTU", "KIND", "RX_BYTES", "TX_BYTES",
    ]);
    let base = sys.join("class/net");
    for name in sorted_dir(&base)? {
        let dir = base.join(&name);
        table.push(vec![
            name.clone(),
            read_trimmed(&dir.join("operstate")),
            read_trimmed(&dir.join("address")),
            read_trimmed(&dir.join("mtu")),
            link_kind(&read_trimmed(&dir.join("type")), &dir),
            read_trimmed(&dir.join("statistics/rx_bytes")),
            read_trimmed(&dir.join("statistics/tx_bytes")),
        ]);
    }
    Ok(table)
}

fn hex_v4(field: &str) -> Option<Ipv4Addr> {
    // /proc/net/route prints the address in host byte order (little-endian on our
    // architectures) as 8 hex digits.
    u32::from_str_radix(field, 16)
        .ok()
        .map(|v| Ipv4Addr::from(v.to_le_bytes()))
}

fn hex_v6(field: &str) -> Option<Ipv6Addr> {
    u128::from_str_radix(field, 16).ok().map(Ipv6Addr::from)
}

fn routes(proc: &Path) -> Result<Table, TableError> {
    let mut table = Table::new(&["DESTINATION", "GATEWAY", "INTERFACE", "METRIC", "FAMILY"]);
    let v4 = read(&proc.join("net/route"))?;
    for line in v4.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(iface), Some(dst), Some(gw), Some(metric), Some(mask)) =
            (f.first(), f.get(1), f.get(2), f.get(6), f.get(7))
        else {
            continue;
        };
        let (Some(dst), Some(gw), Some(mask)) = (hex_v4(dst), hex_v4(gw), hex_v4(mask)) else {
            continue;
        };
        table.push(vec![
            format!("{dst}/{}", prefix_len(&mask.octets())),
            if gw.is_unspecified() {
                String::new()
            } else {
                gw.to_string()
            },
            (*iface).to_owned(),
            (*metric).to_owned(),
            "inet".into(),
        ]);
    }
    // IPv6 may be disabled: then the file is missing, which is not an error.
    if let Ok(v6) = fs::read_to_string(proc.join("net/ipv6_route")) {
        for line in v6.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(dst), Some(plen), Some(gw), Some(metric), Some(iface)) =
                (f.first(), f.get(1), f.get(4), f.get(5), f.get(9))
            else {
                continue;
            };
            let (Some(dst), Some(gw)) = (hex_v6(dst), hex_v6(gw)) else {
                continue;
            };
            let plen = u8::from_str_radix(plen, 16).unwrap_or_default();
            let metric = u32::from_str_radix(metric, 16).unwrap_or_default();
            table.push(vec![
                format!("{dst}/{plen}"),
                if gw.is_unspecified() {
                    String::new()
                } else {
                    gw.to_string()
                },
                (*iface).to_owned(),
                metric.to_string(),
                "inet6".into(),
            ]);
        }
    }
    Ok(table)
}

/// The IPv4 neighbour (ARP) table, `/proc/net/arp`: which peers on each link this node
/// has resolved, so an operator can see that the nodes reach each other.
fn neighbours(proc: &Path) -> Result<Table, TableError> {
    let mut table = Table::new(&["ADDRESS", "MAC", "INTERFACE", "STATE"]);
    let text = read(&proc.join("net/arp"))?;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [address, _hw_type, flags, mac, _mask, device] = f.as_slice() else {
            continue;
        };
        let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).unwrap_or(0);
        // ATF_COM (0x2): resolved; ATF_PERM (0x4): static.
        let state = if flags & 0x4 != 0 {
            "permanent"
        } else if flags & 0x2 != 0 {
            "reachable"
        } else {
            "incomplete"
        };
        table.push(vec![
            (*address).to_owned(),
            (*mac).to_owned(),
            (*device).to_owned(),
            state.to_owned(),
        ]);
    }
    Ok(table)
}

/// Decodes the octal escapes (`\040` for a space) of /proc/mounts fields.
pub fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = bytes.get(i + 1..i + 4)
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let v = digits
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mounts(proc: &Path) -> Result<Table, TableError> {
    let mut table = Table::new(&["MOUNTPOINT", "SOURCE", "FSTYPE", "OPTIONS"]);
    for line in read(&proc.join("self/mounts"))?.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let (Some(src), Some(target), Some(fstype), Some(opts)) =
            (f.first(), f.get(1), f.get(2), f.get(3))
        {
            table.push(vec![
                unescape_octal(target),
                unescape_octal(src),
                (*fstype).to_owned(),
                (*opts).to_owned(),
            ]);
        }
    }
    Ok(table)
}

fn sysctls(proc: &Path, filter: &str) -> Result<Table, TableError> {
    let mut table = Table::new(&["NAME", "VALUE"]);
    let base = proc.join("sys");
    let mut values = BTreeMap::new();
    // Only the subtree the filter names is walked (`net.ipv4` reads /proc/sys/net/ipv4).
    let start = filter
        .rsplit_once('.')
        .map(|(dir, _)| base.join(dir.replace('.', "/")))
        .filter(|p| p.is_dir())
        .unwrap_or_else(|| base.clone());
    walk_sysctls(&base, &start, &mut values, 0);
    for (k, v) in values {
        table.push(vec![k, v]);
    }
    Ok(table)
}

fn walk_sysctls(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>, depth: u32) {
    if depth > 12 {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            walk_sysctls(base, &path, out, depth + 1);
            continue;
        }
        if !meta.is_file() {
            continue;
        }
        use std::os::unix::fs::PermissionsExt as _;
        if meta.permissions().mode() & 0o444 == 0 {
            continue;
        }
        let Ok(file) = fs::File::open(&path) else {
            continue;
        };
        let mut value = String::new();
        if std::io::Read::read_to_string(
            &mut std::io::Read::take(file, MAX_SYSCTL_VALUE),
            &mut value,
        )
        .is_err()
        {
            continue;
        }
        let Ok(rel) = path.strip_prefix(base) else {
            continue;
        };
        let key = rel.to_string_lossy().replace('/', ".");
        let value = value.trim().replace(['\t', '\n'], " ");
        out.insert(key, value);
    }
}

fn modules(proc: &Path) -> Result<Table, TableError> {
    let mut table = Table::new(&["NAME", "SIZE", "USED_BY", "STATE"]);
    // A kernel built without module support has no /proc/modules: no modules then.
    let path = proc.join("modules");
    if !path.exists() {
        return Ok(table);
    }
    for line in read(&path)?.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let (Some(name), Some(size), Some(deps), Some(state)) =
            (f.first(), f.get(1), f.get(3), f.get(4))
        {
            table.push(vec![
                (*name).to_owned(),
                (*size).to_owned(),
                deps.trim_end_matches(',').replace('-', ""),
                (*state).to_owned(),
            ]);
        }
    }
    table.rows.sort();
    Ok(table)
}

fn disks(sys: &Path) -> Result<Table, TableError> {
    let mut table = Table::new(&[
        "NAME",
        "SIZE_BYTES",
        "MODEL",
        "READ_ONLY",
        "REMOVABLE",
        "PARTITIONS",
    ]);
    let base = sys.join("block");
    for name in sorted_dir(&base)? {
        let dir = base.join(&name);
        let sectors: u64 = read_trimmed(&dir.join("size")).parse().unwrap_or(0);
        if sectors == 0 && (name.starts_with("loop") || name.starts_with("ram")) {
            continue;
        }
        let partitions: Vec<String> = sorted_dir(&dir)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.starts_with(&name) && dir.join(p).join("partition").is_file())
            .collect();
        let flag = |f: &str| match read_trimmed(&dir.join(f)).as_str() {
            "1" => "yes".to_owned(),
            "0" => "no".to_owned(),
            other => other.to_owned(),
        };
        table.push(vec![
            name.clone(),
            (sectors * 512).to_string(),
            read_trimmed(&dir.join("device/model")),
            flag("ro"),
            flag("removable"),
            partitions.join(","),
        ]);
    }
    Ok(table)
}

fn memory(proc: &Path) -> Result<Table, TableError> {
    let mut table = Table::new(&["NAME", "VALUE"]);
    for line in read(&proc.join("meminfo"))?.lines() {
        if let Some((k, v)) = line.split_once(':') {
            table.push(vec![k.trim().to_owned(), v.trim().to_owned()]);
        }
    }
    Ok(table)
}

/// The process table; each command line in full with `command_lines`, else the name.
fn processes(proc: &Path, command_lines: bool) -> Result<Table, TableError> {
    let mut table = Table::new(&["PID", "PPID", "STATE", "RSS_KB", "COMMAND"]);
    let mut pids: Vec<u32> = sorted_dir(proc)?
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let dir = proc.join(pid.to_string());
        // A process may exit while we read it: skip it then.
        let Ok(stat) = fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        let (comm, rest) = match (stat.find('('), stat.rfind(')')) {
            (Some(a), Some(b)) if a < b => (
                stat.get(a + 1..b).unwrap_or_default(),
                stat.get(b + 1..).unwrap_or_default(),
            ),
            _ => continue,
        };
        let mut f = rest.split_whitespace();
        let state = f.next().unwrap_or_default().to_owned();
        let ppid = f.next().unwrap_or_default().to_owned();
        let rss = fs::read_to_string(dir.join("status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .map(|v| v.trim().trim_end_matches("kB").trim().to_owned())
            .unwrap_or_default();
        let cmdline = if command_lines {
            fs::read(dir.join("cmdline")).unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut command = String::from_utf8_lossy(&cmdline)
            .trim_end_matches('\0')
            .replace('\0', " ");
        if command.is_empty() {
            command = format!("[{comm}]");
        }
        if command.chars().count() > MAX_COMMAND {
            command = command.chars().take(MAX_COMMAND).collect::<String>() + "...";
        }
        table.push(vec![pid.to_string(), ppid, state, rss, command]);
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn fixture() -> (tempfile::TempDir, NodePaths) {
        let dir = tempfile::tempdir().unwrap();
        let proc = dir.path().join("proc");
        let sys = dir.path().join("sys");
        let write = |p: &Path, s: &str| {
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, s).unwrap();
        };
        write(
            &proc.join("net/route"),
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
             eth0\t00000000\t0100050A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
             eth0\t0000050A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n",
        );
        write(
            &proc.join("net/ipv6_route"),
            "fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n",
        );
        write(
            &proc.join("self/mounts"),
            "/dev/vda4 /system/state ext4 rw,relatime 0 0\nnone /a\\040b tmpfs rw 0 0\n",
        );
        write(
            &proc.join("net/arp"),
            "IP address       HW type     Flags       HW address            Mask     Device\n\
             10.5.0.2         0x1         0x2         52:54:00:4b:00:01     *        eth0\n\
             10.5.0.9         0x1         0x0         00:00:00:00:00:00     *        eth0\n",
        );
        write(&proc.join("sys/net/ipv4/ip_forward"), "1\n");
        write(&proc.join("sys/vm/overcommit_memory"), "0\n");
        write(
            &proc.join("modules"),
            "overlay 217088 0 - Live 0x0\nbr_netfilter 32768 0 - Live 0x0\nbridge 421888 1 br_netfilter, Live 0x0\n",
        );
        write(
            &proc.join("meminfo"),
            "MemTotal:        2014000 kB\nMemFree:  100 kB\n",
        );
        write(&proc.join("1/stat"), "1 (init) S 0 1 1 0 -1 4194560 0\n");
        write(&proc.join("1/status"), "Name:\tinit\nVmRSS:\t    1234 kB\n");
        write(&proc.join("1/cmdline"), "/sbin/init\0--stage2\0");
        write(&proc.join("2/stat"), "2 (kthreadd) S 0 0 0 0 -1 0\n");
        write(&proc.join("2/cmdline"), "");
        write(&sys.join("class/net/eth0/operstate"), "up\n");
        write(&sys.join("class/net/eth0/address"), "52:54:00:12:34:56\n");
        write(&sys.join("class/net/eth0/mtu"), "1500\n");
        write(&sys.join("class/net/eth0/type"), "1\n");
        write(&sys.join("class/net/eth0/statistics/rx_bytes"), "10\n");
        write(&sys.join("class/net/eth0/statistics/tx_bytes"), "20\n");
        write(&sys.join("block/vda/size"), "2048\n");
        write(&sys.join("block/vda/ro"), "0\n");
        write(&sys.join("block/vda/removable"), "0\n");
        write(&sys.join("block/vda/vda1/partition"), "1\n");
        write(&sys.join("block/loop0/size"), "0\n");
        let paths = NodePaths {
            proc,
            sys,
            ..NodePaths::default()
        };
        (dir, paths)
    }

    fn check(resource: &str, filter: &str, want: &[&[&str]]) {
        check_as(Role::Admin, resource, filter, want);
    }

    fn check_as(role: Role, resource: &str, filter: &str, want: &[&[&str]]) {
        let (_dir, paths) = fixture();
        let table = get(&paths, resource, filter, role).unwrap();
        let rows: Vec<Vec<&str>> = table
            .rows
            .iter()
            .map(|r| r.iter().map(String::as_str).collect())
            .collect();
        let want: Vec<Vec<&str>> = want.iter().map(|r| r.to_vec()).collect();
        assert_eq!(rows, want, "{resource}");
        for row in &table.rows {
            assert_eq!(row.len(), table.columns.len(), "{resource}: {row:?}");
        }
    }

    #[test]
    fn tables_from_proc_and_sys() {
        check(
            "neighbours",
            "",
            &[
                &["10.5.0.2", "52:54:00:4b:00:01", "eth0", "reachable"],
                &["10.5.0.9", "00:00:00:00:00:00", "eth0", "incomplete"],
            ],
        );
        check(
            "routes",
            "",
            &[
                &["0.0.0.0/0", "10.5.0.1", "eth0", "100", "inet"],
                &["10.5.0.0/24", "", "eth0", "100", "inet"],
                &["fe80::/64", "", "eth0", "256", "inet6"],
            ],
        );
        check(
            "mounts",
            "",
            &[
                &["/system/state", "/dev/vda4", "ext4", "rw,relatime"],
                &["/a b", "none", "tmpfs", "rw"],
            ],
        );
        check(
            "sysctls",
            "",
            &[
                &["net.ipv4.ip_forward", "1"],
                &["vm.overcommit_memory", "0"],
            ],
        );
        check("sysctls", "net.ipv4.ip", &[&["net.ipv4.ip_forward", "1"]]);
        check(
            "modules",
            "br",
            &[
                &["br_netfilter", "32768", "", "Live"],
                &["bridge", "421888", "br_netfilter", "Live"],
            ],
        );
        check("memory", "MemTotal", &[&["MemTotal", "2014000 kB"]]);
        check(
            "processes",
            "",
            &[
                &["1", "0", "S", "1234", "/sbin/init --stage2"],
                &["2", "0", "S", "", "[kthreadd]"],
            ],
        );
        // Command lines may hold secrets: below admin, only the names.
        for role in [Role::Reader, Role::Operator] {
            check_as(
                role,
                "processes",
                "",
                &[
                    &["1", "0", "S", "1234", "[init]"],
                    &["2", "0", "S", "", "[kthreadd]"],
                ],
            );
        }
        check(
            "links",
            "",
            &[&[
                "eth0",
                "up",
                "52:54:00:12:34:56",
                "1500",
                "ether",
                "10",
                "20",
            ]],
        );
        check("disks", "", &[&["vda", "1048576", "", "no", "no", "vda1"]]);
    }

    #[test]
    fn unknown_resources_are_named() {
        let (_dir, paths) = fixture();
        let err = get(&paths, "pods", "", Role::Admin)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown resource \"pods\""), "{err}");
        assert!(err.contains("addresses, links"), "{err}");
    }

    #[test]
    fn addresses_include_loopback() {
        let table = get(&NodePaths::default(), "addresses", "lo", Role::Reader).unwrap();
        assert!(
            table.rows.iter().any(|r| r[2] == "127.0.0.1/8"),
            "{:?}",
            table.rows
        );
    }
}
