//! Launching one node's VM, for `create` (its first boot) and `start` (booting it again
//! after its VM stopped): the QEMU command line of node N, built from the cluster's record
//! alone, and QEMU started detached in its own session (inside the cluster's namespace
//! for a namespace cluster), its command line naming the state directory so that
//! `destroy` finds it.
//!
//! A second boot is the first one again with the same disk, MACs, tap or switch socket,
//! API port, memory, CPUs and config; it keeps the node's UEFI variables (the device set
//! is unchanged) and rotates its logs: the last boot's `console.log` and `qemu.stderr`
//! become `console.log.N` and `qemu.stderr.N` (N = 1, 2, ... in boot order), and the new
//! boot writes fresh ones.
//!
//! A power cycle ([`power_cycle`], for a node hung before stage 1: [`stage1_watch`]) is
//! a cold reset: QEMU killed and started again with the same disk, UEFI variables and
//! network. Its console log and QEMU's stderr go on in the same files, the new boot's
//! output after a `===== power cycle N =====` line.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use keelson_configs::layout::{Arch, FW_CFG_CONFIG};

use super::helper;
use super::netns;
use super::plan::{self, NetworkKind};
use super::qemu::{Accel, Machine};
use super::record::{NodeRecord, RECORD_FILE, Record, node_dir, socket_dir};
use super::stage1_watch;
use super::{ClusterError, io_error};

/// Which boot of the node this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    /// The first (`create`): fresh UEFI variables, an empty console log.
    First,
    /// The first, with the CPUs held at reset (QEMU's `-S`), so that the node never
    /// shows a stage-1 line: the test hook [`stage1_watch::FREEZE_ENV`].
    FirstFrozen,
    /// A later one (`start`): the UEFI variables kept, the logs rotated.
    Again,
    /// The Nth power cycle of a hung node: the UEFI variables kept, the logs appended to
    /// after a marker line.
    PowerCycle(u32),
}

/// A node's QEMU, started.
#[derive(Debug)]
pub struct Launched {
    /// The QEMU process.
    pub child: Child,
    /// Where the previous boot's console log was moved (a later boot that had one).
    pub previous_console: Option<PathBuf>,
}

/// The record of node `index` as `create` writes it: `api` is `127.0.0.1:PORT`, a tap
/// per node in a namespace cluster.
pub fn node_record(
    node: &plan::NodePlan,
    index: usize,
    network: NetworkKind,
    api: String,
    memory_mib: u32,
    cpus: u32,
) -> NodeRecord {
    NodeRecord {
        name: node.name.clone(),
        role: node.role.to_string(),
        address: node.address,
        mac: node.mac.clone(),
        api,
        tap: (network == NetworkKind::Namespace).then(|| format!("tap{index}")),
        pid: None,
        api_mac: Some(node.api_mac.clone()),
        memory_mib: Some(memory_mib),
        cpus: Some(cpus),
    }
}

fn bad_record(dir: &Path, message: String) -> ClusterError {
    ClusterError::BadRecord {
        path: dir.join(RECORD_FILE),
        message,
    }
}

/// Node `index`'s machine as the record describes it; touches no file.
pub fn node_machine(dir: &Path, record: &Record, index: usize) -> Result<Machine, ClusterError> {
    let node = record
        .nodes
        .get(index)
        .ok_or_else(|| bad_record(dir, format!("no node number {}", index + 1)))?;
    let arch = [Arch::Amd64, Arch::Arm64]
        .into_iter()
        .find(|a| a.debian() == record.arch)
        .ok_or_else(|| bad_record(dir, format!("unknown architecture {:?}", record.arch)))?;
    let accel = match record.accel.as_str() {
        "kvm" => Accel::Kvm,
        "tcg" => Accel::Tcg,
        other => {
            return Err(bad_record(
                dir,
                format!("accelerator {other:?}: `create` stopped before choosing one"),
            ));
        }
    };
    let (Some(memory_mib), Some(cpus)) = (node.memory_mib, node.cpus) else {
        return Err(bad_record(
            dir,
            format!(
                "node {} has no recorded memory and CPU count (the cluster was created before `cluster start` existed); recreate the cluster",
                node.name
            ),
        ));
    };
    let ndir = node_dir(dir, &node.name);
    let mut machine = Machine::new(arch, accel, ndir.join("disk.qcow2"), ndir.clone());
    machine.memory_mib = memory_mib;
    machine.cpus = cpus;
    machine
        .fw_cfg
        .push((FW_CFG_CONFIG.to_owned(), ndir.join("config.toml")));
    machine.extra = vec![
        "-name".into(),
        node.name.clone(),
        "-pidfile".into(),
        ndir.join("qemu.pid").display().to_string(),
    ];
    match record.network {
        NetworkKind::Namespace => {
            let tap = node.tap.clone().unwrap_or_else(|| format!("tap{index}"));
            machine.extra.extend([
                "-netdev".into(),
                format!("tap,id=cluster,ifname={tap},script=no,downscript=no"),
            ]);
        }
        NetworkKind::User => {
            let port = node.api.rsplit_once(':').map_or("", |(_, p)| p);
            let api_mac = node.api_mac.clone().unwrap_or_else(|| plan::api_mac(index));
            machine.extra.extend([
                "-netdev".into(),
                format!("user,id=api,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:50000"),
                "-device".into(),
                format!("virtio-net-pci,netdev=api,mac={api_mac}"),
                "-netdev".into(),
                format!(
                    "dgram,id=cluster,local.type=unix,local.path={},remote.type=unix,remote.path={}",
                    helper::node_socket(dir, index).display(),
                    socket_dir(dir).join(helper::SWITCH_SOCKET).display()
                ),
            ]);
        }
    }
    machine.extra.extend([
        "-device".into(),
        format!("virtio-net-pci,netdev=cluster,mac={}", node.mac),
    ]);
    Ok(machine)
}

/// Starts node `index`'s QEMU detached, its console in the node's directory.
pub fn launch(
    dir: &Path,
    record: &Record,
    index: usize,
    boot: Boot,
) -> Result<Launched, ClusterError> {
    let (mut cmd, previous_console) = boot_command(dir, record, index, boot)?;
    let ndir = node_dir(
        dir,
        record.nodes.get(index).map_or("?", |n| n.name.as_str()),
    );
    if record.network == NetworkKind::User {
        // A QEMU that was killed leaves its socket behind, and a bound path cannot be
        // bound again.
        let socket = helper::node_socket(dir, index);
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("remove the stale socket", &socket)(e)),
        }
    }
    let stderr_path = ndir.join("qemu.stderr");
    let stderr = if let Boot::PowerCycle(n) = boot {
        append_marker(&stderr_path, n)?;
        File::options().append(true).open(&stderr_path)
    } else {
        File::create(&stderr_path)
    }
    .map_err(io_error("create", &stderr_path))?;
    cmd.stdout(Stdio::null()).stderr(stderr);
    let ns_file = match (record.network, &record.namespace) {
        (NetworkKind::Namespace, Some(ns)) => {
            let path = netns::namespace_path(ns);
            Some(File::open(&path).map_err(io_error("open", &path))?)
        }
        (NetworkKind::Namespace, None) => {
            return Err(bad_record(
                dir,
                "a namespace cluster without a namespace name".into(),
            ));
        }
        (NetworkKind::User, _) => None,
    };
    // SAFETY: between fork and exec the closure only makes the setsid and setns system
    // calls (async-signal-safe) on a file descriptor opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if let Some(f) = &ns_file {
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
    let name = record.nodes.get(index).map_or("?", |n| n.name.as_str());
    let child = cmd.spawn().map_err(|source| ClusterError::Io {
        what: "start QEMU for",
        path: PathBuf::from(name),
        source,
    })?;
    Ok(Launched {
        child,
        previous_console,
    })
}

/// Node `index`'s QEMU command line for `boot`, its files made ready (fresh UEFI
/// variables and console, rotated logs, or a power cycle's marker); and where the last
/// boot's console went.
fn boot_command(
    dir: &Path,
    record: &Record,
    index: usize,
    boot: Boot,
) -> Result<(std::process::Command, Option<PathBuf>), ClusterError> {
    let mut machine = node_machine(dir, record, index)?;
    let ndir = machine.dir.clone();
    let keep_vars = |machine: &Machine| {
        let vars = machine.vars_path();
        std::fs::metadata(&vars)
            .map(drop)
            .map_err(io_error("find the node's UEFI variables", &vars))
    };
    Ok(match boot {
        Boot::First => (machine.command()?, None),
        Boot::FirstFrozen => {
            machine.extra.push("-S".into());
            (machine.command()?, None)
        }
        Boot::Again => {
            keep_vars(&machine)?;
            let previous = rotate_logs(&ndir)?;
            (machine.command_line()?, previous)
        }
        Boot::PowerCycle(n) => {
            keep_vars(&machine)?;
            append_marker(&machine.console_path(), n)?;
            machine.console_append = true;
            (machine.command_line()?, None)
        }
    })
}

/// Power-cycles node `index`: kills its QEMU (`child`) and starts it again as its
/// `cycle`th power cycle ([`Boot::PowerCycle`]), recording the new pid.
pub fn power_cycle(
    dir: &Path,
    record: &mut Record,
    index: usize,
    child: &mut Child,
    cycle: u32,
) -> Result<(), ClusterError> {
    // SIGKILL: a power cut; the guest gets no word.
    let _ = child.kill();
    let _ = child.wait();
    *child = launch(dir, record, index, Boot::PowerCycle(cycle))?.child;
    if let Some(node) = record.nodes.get_mut(index) {
        node.pid = Some(child.id());
    }
    record.save(dir)
}

/// Appends the `n`th power cycle's marker line to a log, on a line of its own.
fn append_marker(path: &Path, n: u32) -> Result<(), ClusterError> {
    use std::io::{Read as _, Seek as _, Write as _};
    let mut file = File::options()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .map_err(io_error("open", path))?;
    let mut last = [0u8; 1];
    let ends_open = file.seek(std::io::SeekFrom::End(-1)).is_ok()
        && file.read_exact(&mut last).is_ok()
        && last[0] != b'\n';
    let marker = stage1_watch::power_cycle_marker(n);
    let text = if ends_open {
        format!("\n{marker}\n")
    } else {
        format!("{marker}\n")
    };
    file.write_all(text.as_bytes())
        .map_err(io_error("write to", path))
}

/// Moves the last boot's `console.log` and `qemu.stderr` to `.N`, the first N free for
/// both; returns where the console went.
fn rotate_logs(ndir: &Path) -> Result<Option<PathBuf>, ClusterError> {
    let suffixed = |name: &str, n: u32| ndir.join(format!("{name}.{n}"));
    let mut n = 1;
    while suffixed("console.log", n).symlink_metadata().is_ok()
        || suffixed("qemu.stderr", n).symlink_metadata().is_ok()
    {
        n += 1;
    }
    let mut console = None;
    for name in ["console.log", "qemu.stderr"] {
        let (from, to) = (ndir.join(name), suffixed(name, n));
        match std::fs::rename(&from, &to) {
            Ok(()) if name == "console.log" => console = Some(to),
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("rotate", &from)(e)),
        }
    }
    Ok(console)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn args(cmd: &std::process::Command) -> Vec<String> {
        std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// A record as `create` writes it, before any VM starts.
    fn created(network: NetworkKind) -> Record {
        let plan = plan::plan("demo", 1, 1, "10.5.0.0/24".parse().unwrap()).unwrap();
        Record {
            name: "demo".into(),
            arch: "amd64".into(),
            accel: "tcg".into(),
            network,
            namespace: (network == NetworkKind::Namespace).then(|| "keelson-demo".into()),
            cidr: "10.5.0.0/24".into(),
            gateway: plan.gateway,
            image: "/images/keelson.raw".into(),
            created: 1,
            helper_pid: Some(9),
            client_config: None,
            context: None,
            etcd_bootstrapped: false,
            nodes: plan
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    node_record(n, i, network, format!("127.0.0.1:{}", 40000 + i), 1536, 3)
                })
                .collect(),
        }
    }

    #[test]
    fn a_node_boots_again_with_the_command_line_of_its_first_boot() {
        for network in [NetworkKind::Namespace, NetworkKind::User] {
            let dir = tempfile::tempdir().unwrap();
            let mut record = created(network);
            for node in &record.nodes {
                std::fs::create_dir_all(node_dir(dir.path(), &node.name)).unwrap();
            }
            record.save(dir.path()).unwrap();
            // The first boot: `create`'s machine, with its files prepared.
            let first = args(
                &node_machine(dir.path(), &record, 1)
                    .unwrap()
                    .command()
                    .unwrap(),
            );
            // Later the VM ran, was killed, and `start` reads the record back.
            record.nodes[1].pid = Some(4242);
            record.save(dir.path()).unwrap();
            let loaded = Record::load(dir.path()).unwrap();
            let again = node_machine(dir.path(), &loaded, 1).unwrap();
            assert_eq!(args(&again.command_line().unwrap()), first, "{network:?}");
            let line = first.join(" ");
            let ndir = node_dir(dir.path(), "demo-worker-1");
            for want in [
                "-m 1536".to_owned(),
                "-smp 3".to_owned(),
                format!("-pidfile {}", ndir.join("qemu.pid").display()),
                format!("file={}", ndir.join("efivars.fd").display()),
                format!("file:{}", ndir.join("console.log").display()),
                format!("file={}", ndir.join("disk.qcow2").display()),
                "mac=52:54:00:4b:00:02".to_owned(),
            ] {
                assert!(line.contains(&want), "{network:?}: {want} not in {line}");
            }
            let attachment = match network {
                NetworkKind::Namespace => "ifname=tap1,".to_owned(),
                NetworkKind::User => format!(
                    "hostfwd=tcp:127.0.0.1:40001-:50000 -device virtio-net-pci,netdev=api,mac=52:54:00:4b:01:02 -netdev dgram,id=cluster,local.type=unix,local.path={}",
                    dir.path().join("sock/1").display()
                ),
            };
            assert!(line.contains(&attachment), "{attachment} not in {line}");
        }
    }

    #[test]
    fn an_old_record_boots_with_the_plans_api_mac_but_not_without_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut record = created(NetworkKind::User);
        record.nodes[0].api_mac = None;
        let line = args(
            &node_machine(dir.path(), &record, 0)
                .unwrap()
                .command_line()
                .unwrap(),
        );
        assert!(
            line.iter()
                .any(|a| a == "virtio-net-pci,netdev=api,mac=52:54:00:4b:01:01")
        );
        record.nodes[0].memory_mib = None;
        let err = node_machine(dir.path(), &record, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("recreate the cluster"), "{err}");
    }

    #[test]
    fn a_frozen_first_boot_holds_its_cpus_and_a_power_cycle_keeps_the_node_and_its_console() {
        let dir = tempfile::tempdir().unwrap();
        let record = created(NetworkKind::User);
        let ndir = node_dir(dir.path(), "demo-controlplane-1");
        std::fs::create_dir_all(&ndir).unwrap();
        let (first, _) = boot_command(dir.path(), &record, 0, Boot::First).unwrap();
        let (frozen, _) = boot_command(dir.path(), &record, 0, Boot::FirstFrozen).unwrap();
        let (first, frozen) = (args(&first), args(&frozen));
        assert!(!first.iter().any(|a| a == "-S"), "{first:?}");
        assert_eq!(
            frozen.iter().filter(|a| *a == "-S").count(),
            1,
            "{frozen:?}"
        );
        assert_eq!(
            frozen.iter().filter(|a| *a != "-S").collect::<Vec<_>>(),
            first.iter().collect::<Vec<_>>()
        );

        // The frozen boot printed a little; the firmware wrote its variables.
        std::fs::write(ndir.join("console.log"), "BdsDxe: loading").unwrap();
        std::fs::write(ndir.join("efivars.fd"), "written by the firmware").unwrap();
        let (cycled, previous) = boot_command(dir.path(), &record, 0, Boot::PowerCycle(1)).unwrap();
        assert_eq!(previous, None);
        let cycled = args(&cycled);
        let console = ndir.join("console.log");
        // The same machine, its console appended to.
        let without_console = |a: &[String]| {
            let line = a.join(" ");
            line.replace(&format!("-serial file:{}", console.display()), "")
                .replace(
                    &format!(
                        "-chardev file,id=console,path={},append=on -serial chardev:console",
                        console.display()
                    ),
                    "",
                )
        };
        assert_eq!(without_console(&cycled), without_console(&first));
        assert!(
            cycled.join(" ").contains(&format!(
                "-chardev file,id=console,path={},append=on -serial chardev:console",
                console.display()
            )),
            "{cycled:?}"
        );
        assert_eq!(
            std::fs::read_to_string(&console).unwrap(),
            "BdsDxe: loading\n===== power cycle 1 =====\n"
        );
        assert_eq!(
            std::fs::read_to_string(ndir.join("efivars.fd")).unwrap(),
            "written by the firmware"
        );
        boot_command(dir.path(), &record, 0, Boot::PowerCycle(2)).unwrap();
        assert_eq!(
            std::fs::read_to_string(&console).unwrap(),
            "BdsDxe: loading\n===== power cycle 1 =====\n===== power cycle 2 =====\n"
        );
    }

    #[test]
    fn logs_rotate_to_the_first_free_number() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(rotate_logs(d).unwrap(), None);
        std::fs::write(d.join("console.log"), "boot 1").unwrap();
        std::fs::write(d.join("qemu.stderr"), "err 1").unwrap();
        assert_eq!(rotate_logs(d).unwrap(), Some(d.join("console.log.1")));
        std::fs::write(d.join("console.log"), "boot 2").unwrap();
        assert_eq!(rotate_logs(d).unwrap(), Some(d.join("console.log.2")));
        assert_eq!(
            std::fs::read_to_string(d.join("console.log.1")).unwrap(),
            "boot 1"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("console.log.2")).unwrap(),
            "boot 2"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("qemu.stderr.1")).unwrap(),
            "err 1"
        );
        assert!(!d.join("console.log").exists());
    }
}
