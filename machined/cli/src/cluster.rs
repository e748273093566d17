//! `machinectl cluster create | start | destroy | list | show`: local clusters under QEMU (see
//! [`keelson_cluster`]), with a progress display while the nodes boot.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use keelson_configs::layout::Arch;

use super::api::{OutputArgs, parse_duration};
use super::output::{Format, Records, render};
use keelson_api::clientconfig;
use keelson_cluster::create::{NodeState, Progress};
use keelson_cluster::plan::NetworkKind;
use keelson_cluster::record::Record;
use keelson_cluster::start::StartedNode;
use keelson_cluster::{self as cluster, CreateOptions};

/// `machinectl cluster ...`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Create a local cluster: generate its configs, boot one QEMU VM per node (KVM when
    /// it works, software emulation otherwise) and wait until every node is healthy;
    /// then merge a context for it into the client config, bootstrap etcd on the first
    /// control plane and wait until etcd is healthy on every control plane.
    Create(Box<CreateArgs>),
    /// Boot again nodes whose VM is down (killed, powered off, crashed), each as it was
    /// first booted: the same disk (so it comes back with its state, an etcd member with
    /// its data), MACs, network attachment, memory, CPUs and UEFI variables; then wait
    /// until each one's node API answers. The last boot's console log is kept as
    /// console.log.N (N = 1, 2, ... in boot order) beside the new console.log.
    Start(StartArgs),
    /// Stop a cluster's VMs and remove every trace of it (processes, network namespace,
    /// bridge, taps, disks, state directory, its client context).
    Destroy(NameArgs),
    /// List the local clusters.
    List(OutputArgs),
    /// Show a cluster's nodes: address, API, pid, up or down, console log (and the
    /// console's tail for a node whose VM is down).
    Show(ShowArgs),
    /// The cluster's helper process (API forwarder or network switch); `create` starts it.
    #[command(hide = true)]
    Helper {
        /// The cluster's state directory.
        dir: PathBuf,
    },
}

/// The guest architecture, as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ArchArg {
    /// x86-64.
    Amd64,
    /// AArch64.
    Arm64,
}

impl From<ArchArg> for Arch {
    fn from(a: ArchArg) -> Arch {
        match a {
            ArchArg::Amd64 => Arch::Amd64,
            ArchArg::Arm64 => Arch::Arm64,
        }
    }
}

/// The network, as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NetworkArg {
    /// A network namespace with a bridge and taps (needs root).
    Namespace,
    /// QEMU user-mode networking and a switch over unix sockets (no root needed).
    User,
}

/// Arguments of `machinectl cluster create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Cluster name (an RFC 1123 label); names the nodes, the state directory and the
    /// client context.
    #[arg(long, default_value = "local")]
    pub name: String,
    /// Number of control-plane nodes.
    #[arg(long, default_value_t = 1)]
    pub controlplanes: u32,
    /// Number of worker nodes.
    #[arg(long, default_value_t = 1)]
    pub workers: u32,
    /// Guest architecture.
    #[arg(long, value_enum, default_value = "amd64")]
    pub arch: ArchArg,
    /// vCPUs per node.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Memory per node: MiB, or with a unit (512M, 2G).
    #[arg(long, default_value = "2048", value_parser = parse_mib)]
    pub memory: u32,
    /// Disk size per node (a sparse qcow2 overlay on the image): 6G, 8192M, ...
    #[arg(long, default_value = "6G", value_parser = parse_bytes)]
    pub disk: u64,
    /// The raw disk image to boot (default: target/images/ARCH/keelson.raw, as `cargo
    /// xtask image` builds it).
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// The cluster network; the gateway takes its first address, the nodes the next ones.
    #[arg(long, default_value = "10.5.0.0/24")]
    pub cidr: ipnet::Ipv4Net,
    /// A TOML merge patch applied to every node's config (repeatable; see `machinectl gen
    /// config --help`).
    #[arg(long, value_name = "FILE")]
    pub config_patch: Vec<PathBuf>,
    /// A TOML merge patch applied to the control planes' configs only, after
    /// `--config-patch` (repeatable).
    #[arg(long, value_name = "FILE")]
    pub config_patch_control_plane: Vec<PathBuf>,
    /// A TOML merge patch applied to the workers' configs only, after `--config-patch`
    /// (repeatable).
    #[arg(long, value_name = "FILE")]
    pub config_patch_worker: Vec<PathBuf>,
    /// How to network the nodes (default: namespace as root, user otherwise).
    #[arg(long, value_enum)]
    pub network: Option<NetworkArg>,
    /// How long to wait for every node to be healthy (90s, 20m, ...).
    #[arg(long, default_value = "20m", value_parser = parse_duration)]
    pub wait: Duration,
    /// Do not bootstrap etcd: the control planes wait for `machinectl bootstrap` on one
    /// of them.
    #[arg(long)]
    pub no_bootstrap: bool,
    /// How long after the bootstrap to wait for etcd to be healthy on every control
    /// plane (10m, 90s, ...).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub etcd_wait: Duration,
}

/// `--name`.
#[derive(Debug, Args)]
pub struct NameArgs {
    /// Cluster name.
    #[arg(long, default_value = "local")]
    pub name: String,
}

/// Arguments of `machinectl cluster start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// Cluster name.
    #[arg(long, default_value = "local")]
    pub name: String,
    /// The nodes to boot again (as `machinectl cluster show` names them); each one's VM
    /// must be down.
    #[arg(required = true, value_name = "NODE")]
    pub nodes: Vec<String>,
    /// How long to wait for each node's API to answer (90s, 20m, ...).
    #[arg(long, default_value = "20m", value_parser = parse_duration)]
    pub wait: Duration,
}

/// Arguments of `machinectl cluster show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Cluster name.
    #[arg(long, default_value = "local")]
    pub name: String,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

fn split_unit(s: &str) -> (&str, &str) {
    let s = s.trim();
    match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    }
}

/// Parses a size in bytes: `6G`, `6GiB`, `512M`, `1T`, or plain bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let (num, unit) = split_unit(s);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; write e.g. 6G or 8192M"))?;
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use K, M, G or T")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses a memory size into MiB: a plain number is MiB.
pub fn parse_mib(s: &str) -> Result<u32, String> {
    let (_, unit) = split_unit(s);
    let bytes = if unit.is_empty() {
        parse_bytes(&format!("{s}M"))?
    } else {
        parse_bytes(s)?
    };
    let mib = bytes >> 20;
    if mib < 256 {
        return Err(format!("{s:?}: a node needs at least 256 MiB"));
    }
    u32::try_from(mib).map_err(|_| format!("{s:?} is too large"))
}

/// Runs `machinectl cluster ...`; `machineconfig` is the `--machineconfig` flag.
pub fn run(command: ClusterCommand, machineconfig: Option<&Path>) -> anyhow::Result<ExitCode> {
    match command {
        ClusterCommand::Create(args) => create(&args, machineconfig),
        ClusterCommand::Start(args) => start(&args, machineconfig),
        ClusterCommand::Destroy(args) => destroy(&args.name),
        ClusterCommand::List(o) => list(o.output),
        ClusterCommand::Show(args) => show(&args.name, args.output.output),
        ClusterCommand::Helper { dir } => {
            cluster::helper::run(&dir)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Prints the nodes' states: redrawn in place on a terminal, a line per change otherwise.
#[derive(Debug, Default)]
struct Display {
    /// The lines of the last table drawn on the terminal (0 once anything else printed).
    drawn: usize,
    /// Each node's last state as news (see [`kind`]), without a terminal.
    last: Vec<(String, String)>,
    tty: bool,
}

impl Display {
    fn show(&mut self, p: Progress) {
        match p {
            Progress::Step(text) => self.line(&format!("cluster: {text}")),
            Progress::Accel(accel, why) => {
                self.line(&format!("cluster: accelerator {}: {why}", accel.name()));
            }
            Progress::Nodes(elapsed, nodes) => {
                let rows = nodes
                    .iter()
                    .map(|(name, state)| (name, state.to_string(), kind(state)))
                    .collect::<Vec<_>>();
                self.table(elapsed, &rows);
            }
            Progress::Etcd(elapsed, nodes) => {
                let rows = nodes
                    .iter()
                    .map(|(name, state)| (name, state.to_string(), state.to_string()))
                    .collect::<Vec<_>>();
                self.table(elapsed, &rows);
            }
        }
    }

    /// A line of its own: a later table is drawn below it.
    fn line(&mut self, text: &str) {
        let _ = writeln!(std::io::stderr().lock(), "{text}");
        self.drawn = 0;
    }

    /// One row per node: (name, state, what counts as news without a terminal).
    fn table(&mut self, elapsed: Duration, rows: &[(&String, String, String)]) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            if self.drawn > 0 {
                let _ = write!(err, "\x1b[{}A", self.drawn);
            }
            for (name, state, _) in rows {
                let line = format!("[{:>6}] {name}: {state}", human(elapsed));
                // One terminal line per node, so that the redraw stays in place.
                let _ = writeln!(err, "\x1b[2K{}", fit(&line, 150));
            }
            self.drawn = rows.len();
        } else {
            for (name, state, kind) in rows {
                let changed = self
                    .last
                    .iter()
                    .find(|(n, _)| n == *name)
                    .is_none_or(|(_, k)| k != kind);
                if changed {
                    let _ = writeln!(err, "[{:>6}] {name}: {state}", human(elapsed));
                }
            }
        }
        self.last = rows
            .iter()
            .map(|(name, _, kind)| ((*name).clone(), kind.clone()))
            .collect();
    }
}

/// `line` cut to at most `max` characters (never inside one).
fn fit(line: &str, max: usize) -> String {
    match line.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_owned(),
    }
}

/// What of a node's state is news without a terminal: a booting node's connection error
/// changes with every poll and is not.
fn kind(state: &NodeState) -> String {
    match state {
        NodeState::Booting(_) => "booting".into(),
        other => other.to_string(),
    }
}

fn create(args: &CreateArgs, machineconfig: Option<&Path>) -> anyhow::Result<ExitCode> {
    let arch: Arch = args.arch.into();
    let image = args.image.clone().unwrap_or_else(|| {
        PathBuf::from("target/images")
            .join(arch.debian())
            .join("keelson.raw")
    });
    let network = match args.network {
        Some(NetworkArg::Namespace) => NetworkKind::Namespace,
        Some(NetworkArg::User) => NetworkKind::User,
        None if cluster::is_root() => NetworkKind::Namespace,
        None => NetworkKind::User,
    };
    let client_config = clientconfig::default_path(machineconfig)?;
    let options = CreateOptions {
        name: args.name.clone(),
        controlplanes: args.controlplanes,
        workers: args.workers,
        arch,
        cpus: args.cpus,
        memory_mib: args.memory,
        disk_bytes: args.disk,
        image,
        cidr: args.cidr,
        config_patches: args.config_patch.clone(),
        controlplane_patches: args.config_patch_control_plane.clone(),
        worker_patches: args.config_patch_worker.clone(),
        network,
        client_config: client_config.clone(),
        helper_exe: std::env::current_exe()
            .context("cannot find machinectl's own executable to run the cluster helper")?,
        bootstrap: !args.no_bootstrap,
        etcd_wait: args.etcd_wait,
    };
    let mut display = Display {
        tty: std::io::stderr().is_terminal(),
        ..Display::default()
    };
    let started = std::time::Instant::now();
    let created = cluster::create(&options, args.wait, &mut |p| display.show(p))?;
    let r = &created.record;
    let cps = r.nodes.iter().filter(|n| n.role == "controlplane").count();
    let workers = r.nodes.len() - cps;
    let net = match &r.namespace {
        Some(ns) => format!("network namespace {ns}, {}", r.cidr),
        None => format!("user-mode network, {}", r.cidr),
    };
    let etcd = if r.etcd_bootstrapped {
        format!("etcd healthy on {cps} control plane(s)")
    } else {
        "etcd not bootstrapped".to_owned()
    };
    println!(
        "cluster {} is healthy after {}: {cps} control plane(s), {workers} worker(s), {etcd} ({} under {}; {net})",
        r.name,
        human(started.elapsed()),
        r.arch,
        r.accel.to_uppercase()
    );
    let mut records = Records::new(&["node", "role", "address", "api"]);
    for n in &r.nodes {
        records.push(vec![
            json!(n.name),
            json!(n.role),
            json!(n.address.to_string()),
            json!(n.api),
        ]);
    }
    print!("{}", render(&records, Format::Table));
    let flag = match machineconfig {
        Some(p) => format!(" --machineconfig {}", p.display()),
        None => String::new(),
    };
    let first = r.nodes.first().map_or("", |n| n.api.as_str());
    println!(
        "\nContext {:?} was merged into {} and made current. Try:\n  \
         machinectl{flag} version\n  \
         machinectl{flag} health\n  \
         machinectl{flag} get neighbours\n  \
         machinectl{flag} --nodes {first} services\n  \
         machinectl{flag} --nodes {first} etcd members\n  \
         machinectl cluster show --name {name}\n  \
         machinectl cluster destroy --name {name}",
        created.context,
        client_config.display(),
        name = r.name,
    );
    if !r.etcd_bootstrapped {
        println!("\n{}", bootstrap_by_hand(r, &flag));
    }
    Ok(ExitCode::SUCCESS)
}

/// What to run to bootstrap etcd by hand (after `create --no-bootstrap`).
fn bootstrap_by_hand(r: &Record, flag: &str) -> String {
    match r.nodes.iter().find(|n| n.role == "controlplane") {
        Some(cp) => format!(
            "etcd is not bootstrapped (--no-bootstrap): every control plane waits for it. Start it on {name} ({address}) with:\n  \
             machinectl{flag} --nodes {api} bootstrap\n\
             then watch the other control planes join with:\n  \
             machinectl{flag} --nodes {api} etcd members",
            name = cp.name,
            address = cp.address,
            api = cp.api,
        ),
        None => "etcd is not bootstrapped (--no-bootstrap), and the cluster has no control plane to bootstrap it on".to_owned(),
    }
}

fn start(args: &StartArgs, machineconfig: Option<&Path>) -> anyhow::Result<ExitCode> {
    let mut display = Display {
        tty: std::io::stderr().is_terminal(),
        ..Display::default()
    };
    let started = std::time::Instant::now();
    let nodes = cluster::start(&args.name, &args.nodes, args.wait, &mut |p| display.show(p))?;
    let flag = match machineconfig {
        Some(p) => format!(" --machineconfig {}", p.display()),
        None => String::new(),
    };
    print!(
        "{}",
        started_report(&args.name, &nodes, started.elapsed(), &flag)
    );
    Ok(ExitCode::SUCCESS)
}

/// What `cluster start` prints once every node's API answers.
/// `flag` is the `--machineconfig` flag to repeat in the commands suggested.
fn started_report(cluster: &str, nodes: &[StartedNode], elapsed: Duration, flag: &str) -> String {
    let mut records = Records::new(&["node", "pid", "api", "answered", "state"]);
    for n in nodes {
        records.push(vec![
            json!(n.name),
            json!(n.pid),
            json!(n.api),
            json!(format!("after {}", human(n.answered_after))),
            json!(n.state.to_string()),
        ]);
    }
    let mut out = format!(
        "{} node(s) of cluster {cluster} booted again; their APIs answer after {}:\n{}",
        nodes.len(),
        human(elapsed),
        render(&records, Format::Table)
    );
    for n in nodes {
        out.push_str(&format!("{} console {}", n.name, n.console.display()));
        if let Some(previous) = &n.previous_console {
            out.push_str(&format!(", the last boot's {}", previous.display()));
        }
        out.push('\n');
    }
    if let Some(n) = nodes.first() {
        out.push_str(&format!(
            "\nA control plane's etcd member rejoins by itself; watch it with:\n  machinectl{flag} --nodes {api} health\n  machinectl{flag} --nodes {api} etcd members\n",
            api = n.api
        ));
    }
    out
}

fn destroy(name: &str) -> anyhow::Result<ExitCode> {
    let d = cluster::destroy(name)?;
    if !d.stopped.is_empty() {
        let pids: Vec<String> = d.stopped.iter().map(ToString::to_string).collect();
        println!("stopped pid(s) {}", pids.join(", "));
    }
    if let Some(ns) = &d.namespace {
        println!("deleted network namespace {ns} (its bridge and taps with it)");
    }
    if let Some((context, path)) = &d.context {
        println!("removed context {context:?} from {}", path.display());
    }
    println!("removed {}", d.dir.display());
    println!("cluster {name} destroyed");
    Ok(ExitCode::SUCCESS)
}

fn list(format: Format) -> anyhow::Result<ExitCode> {
    let mut records = Records::new(&["name", "nodes", "up", "arch", "accel", "network", "dir"]);
    let mut failed = false;
    for entry in cluster::list()? {
        match entry {
            Ok(c) => {
                let up = c.nodes.iter().filter(|n| n.up).count();
                records.push(vec![
                    json!(c.record.name),
                    json!(c.nodes.len()),
                    json!(up),
                    json!(c.record.arch),
                    json!(c.record.accel),
                    json!(c.record.namespace.clone().unwrap_or_else(|| "user".into())),
                    json!(c.dir.display().to_string()),
                ]);
            }
            Err(e) => {
                failed = true;
                eprintln!("machinectl: error: {}", keelson_api::error_chain(&e));
            }
        }
    }
    print!("{}", render(&records, format));
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn show(name: &str, format: Format) -> anyhow::Result<ExitCode> {
    let c = cluster::show(name)?;
    let mut records = Records::new(&[
        "node", "role", "address", "api", "pid", "state", "console", "tail",
    ]);
    for n in &c.nodes {
        records.push(vec![
            json!(n.name),
            json!(n.role),
            json!(n.address),
            json!(n.api),
            json!(n.pid),
            json!(if n.up { "up" } else { "down" }),
            json!(n.console.display().to_string()),
            json!(n.tail),
        ]);
    }
    if format != Format::Table {
        print!("{}", render(&records, format));
        return Ok(ExitCode::SUCCESS);
    }
    let helper = match (&c.record.namespace, c.helper_up) {
        (Some(_), true) => "API forwarder up",
        (Some(_), false) => "API forwarder DOWN (the APIs are unreachable from the host)",
        (None, true) => "network switch up",
        (None, false) => "network switch DOWN (the nodes cannot reach each other)",
    };
    println!(
        "cluster {}: {} under {}, {} ({}), {helper}\nstate directory {}",
        c.record.name,
        c.record.arch,
        c.record.accel.to_uppercase(),
        c.record.namespace.as_deref().map_or_else(
            || "user-mode network".to_owned(),
            |ns| format!("network namespace {ns}")
        ),
        c.record.cidr,
        c.dir.display()
    );
    // The table without the tail column; tails follow.
    records.columns.pop();
    for row in &mut records.rows {
        row.remove("tail");
    }
    print!("{}", render(&records, Format::Table));
    for n in c.nodes.iter().filter(|n| !n.up) {
        println!(
            "\n{} is down; its console ({}) ends with:\n{}",
            n.name,
            n.console.display(),
            n.tail.as_deref().unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_bytes("6G"), Ok(6 << 30));
        assert_eq!(super::parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(super::parse_mib("2048"), Ok(2048));
        assert_eq!(super::parse_mib("2G"), Ok(2048));
        assert!(super::parse_mib("100").unwrap_err().contains("at least"));
        assert!(
            super::parse_bytes("6X")
                .unwrap_err()
                .contains("unknown unit")
        );
    }

    #[test]
    fn a_cluster_left_unbootstrapped_says_how_to_bootstrap_it() {
        use keelson_cluster::record::{NodeRecord, Record};
        let node = |name: &str, role: &str, address: &str, api: &str| NodeRecord {
            name: name.into(),
            role: role.into(),
            address: address.parse().unwrap(),
            mac: String::new(),
            api: api.into(),
            tap: None,
            pid: None,
            api_mac: None,
            memory_mib: None,
            cpus: None,
        };
        let record = Record {
            name: "demo".into(),
            arch: "amd64".into(),
            accel: "tcg".into(),
            network: keelson_cluster::plan::NetworkKind::User,
            namespace: None,
            cidr: "10.5.0.0/24".into(),
            gateway: "10.5.0.1".parse().unwrap(),
            image: "keelson.raw".into(),
            created: 0,
            helper_pid: None,
            client_config: None,
            context: None,
            etcd_bootstrapped: false,
            nodes: vec![
                node(
                    "demo-controlplane-1",
                    "controlplane",
                    "10.5.0.2",
                    "127.0.0.1:40001",
                ),
                node("demo-worker-1", "worker", "10.5.0.3", "127.0.0.1:40002"),
            ],
        };
        let text = super::bootstrap_by_hand(&record, " --machineconfig m.toml");
        assert!(
            text.contains("machinectl --machineconfig m.toml --nodes 127.0.0.1:40001 bootstrap"),
            "{text}"
        );
        assert!(text.contains("demo-controlplane-1 (10.5.0.2)"), "{text}");
    }

    #[test]
    fn a_started_node_is_reported_with_both_consoles() {
        use keelson_cluster::create::NodeState;
        let node = super::StartedNode {
            name: "demo-controlplane-2".into(),
            pid: 4242,
            api: "127.0.0.1:40002".into(),
            console: "/s/demo/nodes/demo-controlplane-2/console.log".into(),
            previous_console: Some("/s/demo/nodes/demo-controlplane-2/console.log.1".into()),
            answered_after: std::time::Duration::from_secs(75),
            state: NodeState::Unhealthy(vec!["etcd (joining)".into()]),
        };
        let text = super::started_report(
            "demo",
            &[node],
            std::time::Duration::from_secs(80),
            " --machineconfig m.toml",
        );
        for want in [
            "1 node(s) of cluster demo booted again; their APIs answer after 1m20s:",
            "demo-controlplane-2",
            "4242",
            "after 1m15s",
            "API up, waiting for: etcd (joining)",
            "demo-controlplane-2 console /s/demo/nodes/demo-controlplane-2/console.log, the last boot's /s/demo/nodes/demo-controlplane-2/console.log.1",
            "machinectl --machineconfig m.toml --nodes 127.0.0.1:40002 etcd members",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
    }

    #[test]
    fn progress_lines_are_cut_between_characters() {
        assert_eq!(super::fit("ab — cd", 4), "ab —…");
        assert_eq!(super::fit("short", 10), "short");
    }
}
