//! `machinectl cluster create`: claim the state directory, write the record, generate
//! the configs (as `gen config` does, one per node with its static address), make a qcow2
//! overlay and fresh UEFI variables per node, set up the network, start every VM
//! detached ([`launch`]; config through `fw_cfg`), then wait until every node's API
//! answers and it is healthy, power-cycling a node that shows no stage-1 line within a
//! deadline of its power-on ([`stage1_watch`]); then (unless asked not to) bootstrap
//! etcd and wait for it on every control plane ([`bootstrap`]).
//!
//! Order matters for clean-up: the directory and the record come first, and every later
//! resource is either inside the directory, named after the cluster (the namespace), or a
//! process whose command line carries the directory; so whatever point `create` dies at,
//! `destroy` finds everything.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::qemu::{self, Accel};
use ipnet::Ipv4Net;
use keelson_configs::generate::{GenerateError, GenerateOptions, generate};
use keelson_configs::layout::{Arch, STATE_MOUNT};
use keelson_configs::patch::Patch;
use keelson_configs::pki::{self, Role};
use keelson_configs::schema::MachineType;
use keelson_configs::secrets::ClusterSecrets;

use super::bootstrap::{self, EtcdState};
use super::helper::{self, READY_FILE};
use super::launch::{self, Boot};
use super::netns;
use super::plan::{self, NetworkKind, Plan};
use super::record::{Record, clusters_dir, node_dir, socket_dir};
use super::stage1_watch::{self, MAX_POWER_CYCLES, Step, Watch};
use super::{ClusterError, io_error, node_tail, process_marker};
use keelson_api::api::proto;
use keelson_api::atomic;
use keelson_api::client::Connector;
use keelson_api::clientconfig::{ClientConfig, Context};

/// What `create` was asked for.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Cluster name (an RFC 1123 label).
    pub name: String,
    /// Number of control planes (at least 1).
    pub controlplanes: u32,
    /// Number of workers.
    pub workers: u32,
    /// Guest architecture.
    pub arch: Arch,
    /// vCPUs per node.
    pub cpus: u32,
    /// Memory per node, MiB.
    pub memory_mib: u32,
    /// Disk size per node, bytes (at least the image's size).
    pub disk_bytes: u64,
    /// The raw image the overlays are on.
    pub image: PathBuf,
    /// The cluster network.
    pub cidr: Ipv4Net,
    /// Merge patches applied to every node's config before its own.
    pub config_patches: Vec<PathBuf>,
    /// Merge patches applied to the control planes' configs only, after those.
    pub controlplane_patches: Vec<PathBuf>,
    /// Merge patches applied to the workers' configs only, after those.
    pub worker_patches: Vec<PathBuf>,
    /// How to network the nodes (default: a namespace as root, else user mode).
    pub network: NetworkKind,
    /// The machinectl client config to merge the cluster's context into.
    pub client_config: PathBuf,
    /// The `machinectl` executable, run detached as the cluster's helper.
    pub helper_exe: PathBuf,
    /// Whether to bootstrap etcd on the first control plane once every node is healthy.
    pub bootstrap: bool,
    /// How long after the bootstrap to wait for etcd on every control plane.
    pub etcd_wait: Duration,
}

/// What `create` reports as it goes.
#[derive(Debug, Clone)]
pub enum Progress {
    /// A step done (free text: "generated configs", ...).
    Step(String),
    /// The accelerator chosen, and why.
    Accel(Accel, String),
    /// Each node's state while waiting, with the time since the VMs started.
    Nodes(Duration, Vec<(String, NodeState)>),
    /// Each control plane's etcd while waiting, with the time since the bootstrap.
    Etcd(Duration, Vec<(String, EtcdState)>),
}

/// A node's state while `create` waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeState {
    /// The VM runs; the API does not answer yet.
    Booting(String),
    /// The API answers; these checks are not ok yet.
    Unhealthy(Vec<String>),
    /// The API answers and every check is ok.
    Healthy,
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeState::Booting(why) => write!(f, "booting ({why})"),
            NodeState::Unhealthy(checks) => {
                write!(f, "API up, waiting for: {}", checks.join("; "))
            }
            NodeState::Healthy => f.write_str("healthy"),
        }
    }
}

/// A created, healthy cluster.
#[derive(Debug, Clone)]
pub struct Created {
    /// Its state directory.
    pub dir: PathBuf,
    /// Its record (as saved).
    pub record: Record,
    /// The context name in the client config.
    pub context: String,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A free TCP port on 127.0.0.1 (the kernel's choice; QEMU or the helper binds it next).
fn free_port() -> Result<u16, ClusterError> {
    let l = TcpListener::bind("127.0.0.1:0")
        .map_err(io_error("listen on", Path::new("127.0.0.1:0")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(io_error("listen on", Path::new("127.0.0.1:0")))
}

/// Creates the cluster and waits up to `wait` for every node to be healthy.
pub fn create(
    options: &CreateOptions,
    wait: Duration,
    progress: &mut dyn FnMut(Progress),
) -> Result<Created, ClusterError> {
    keelson_configs::values::check_dns_label(&options.name)
        .map_err(|problem| ClusterError::Usage(format!("--name {:?}: {problem}", options.name)))?;
    let plan = plan::plan(
        &options.name,
        options.controlplanes,
        options.workers,
        options.cidr,
    )?;
    let root = clusters_dir()?;
    let dir = root.join(&options.name);
    let namespace =
        (options.network == NetworkKind::Namespace).then(|| netns::namespace_name(&options.name));
    if dir.symlink_metadata().is_ok() || namespace.as_deref().is_some_and(netns::exists) {
        return Err(ClusterError::Exists {
            name: options.name.clone(),
            dir,
        });
    }
    let image_size = std::fs::metadata(&options.image)
        .map_err(|source| ClusterError::NoImage {
            path: options.image.clone(),
            arch: options.arch.debian(),
            source,
        })?
        .len();
    if options.disk_bytes < image_size {
        return Err(ClusterError::Usage(format!(
            "--disk {} MiB is smaller than the image {} ({} MiB); give at least the image's size",
            options.disk_bytes >> 20,
            options.image.display(),
            image_size.div_ceil(1 << 20)
        )));
    }
    qemu::firmware(options.arch)?;
    // A bad KEELSON_STAGE1_DEADLINE is refused before anything is made.
    stage1_watch::deadline(options.arch, Accel::Tcg).map_err(ClusterError::Usage)?;
    let load = |paths: &[PathBuf]| {
        paths
            .iter()
            .map(|p| Patch::load(p).map_err(|e| ClusterError::Generate(e.to_string())))
            .collect::<Result<Vec<_>, _>>()
    };
    let patches = RolePatches {
        all: load(&options.config_patches)?,
        controlplane: load(&options.controlplane_patches)?,
        worker: load(&options.worker_patches)?,
    };
    if options.network == NetworkKind::Namespace && !super::is_root() {
        return Err(ClusterError::Usage(
            "a namespace network needs root; run as root or use --network user".into(),
        ));
    }

    // Claim the name: the directory is created, not reused.
    std::fs::create_dir_all(&root).map_err(io_error("create", &root))?;
    std::fs::DirBuilder::new()
        .mode_private()
        .create(&dir)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                ClusterError::Exists {
                    name: options.name.clone(),
                    dir: dir.clone(),
                }
            } else {
                ClusterError::Io {
                    what: "create",
                    path: dir.clone(),
                    source,
                }
            }
        })?;
    let image = std::path::absolute(&options.image).unwrap_or_else(|_| options.image.clone());
    let mut record = Record {
        name: options.name.clone(),
        arch: options.arch.debian().into(),
        accel: "unknown".into(),
        network: options.network,
        namespace: namespace.clone(),
        cidr: plan.cidr.to_string(),
        gateway: plan.gateway,
        image: image.clone(),
        created: now_unix(),
        helper_pid: None,
        client_config: None,
        context: None,
        etcd_bootstrapped: false,
        nodes: Vec::new(),
    };
    for (i, node) in plan.nodes.iter().enumerate() {
        record.nodes.push(launch::node_record(
            node,
            i,
            options.network,
            format!("127.0.0.1:{}", free_port()?),
            options.memory_mib,
            options.cpus,
        ));
    }
    record.save(&dir)?;
    progress(Progress::Step(format!("state directory {}", dir.display())));

    let accel = qemu::probe_accel(options.arch, &dir);
    let why = match (accel, qemu::host_arch() == Some(options.arch)) {
        (Accel::Kvm, _) => "KVM runs the firmware".to_owned(),
        (Accel::Tcg, false) => format!(
            "software emulation: the guest ({}) is not this host's architecture",
            options.arch
        ),
        (Accel::Tcg, true) if std::env::var("KEELSON_ACCEL").as_deref() == Ok("tcg") => {
            "software emulation: KEELSON_ACCEL=tcg".to_owned()
        }
        (Accel::Tcg, true) => {
            "software emulation: KVM is unavailable here or the firmware does not run under it"
                .to_owned()
        }
    };
    progress(Progress::Accel(accel, why));
    record.accel = accel.name().into();
    record.save(&dir)?;
    let stage1_deadline =
        stage1_watch::deadline(options.arch, accel).map_err(ClusterError::Usage)?;

    // Configs and secrets, as `gen config` makes them, one per node.
    let secrets = ClusterSecrets::generate().map_err(|e| ClusterError::Generate(e.to_string()))?;
    let secrets_text = secrets
        .to_toml_string()
        .map_err(|e| ClusterError::Generate(e.to_string()))?;
    atomic::write(
        &dir.join("secrets.toml"),
        secrets_text.as_bytes(),
        atomic::PRIVATE_FILE_MODE,
    )
    .map_err(ClusterError::Write)?;
    for node in &plan.nodes {
        let text = node_config(options, &plan, node, &patches, &secrets)?;
        let ndir = node_dir(&dir, &node.name);
        atomic::create_private_dir(&ndir).map_err(ClusterError::Write)?;
        atomic::write(
            &ndir.join("config.toml"),
            text.as_bytes(),
            atomic::PRIVATE_FILE_MODE,
        )
        .map_err(ClusterError::Write)?;
        qemu::create_overlay(&image, &ndir.join("disk.qcow2"), Some(options.disk_bytes))?;
    }
    progress(Progress::Step(format!(
        "configs and disks for {} node(s)",
        plan.nodes.len()
    )));

    // The network and the helper.
    if let Some(ns) = &namespace {
        let taps: Vec<String> = record.nodes.iter().filter_map(|n| n.tap.clone()).collect();
        let gateway = format!("{}/{}", plan.gateway, plan.cidr.prefix_len());
        netns::create(ns, &gateway, &taps)?;
        progress(Progress::Step(format!(
            "network namespace {ns}: bridge {} {gateway}, taps {}",
            netns::BRIDGE,
            taps.join(", ")
        )));
    } else {
        let sockets = socket_dir(&dir);
        std::fs::create_dir(&sockets).map_err(io_error("create", &sockets))?;
        let longest = helper::node_socket(&dir, plan.nodes.len());
        if longest.as_os_str().len() > 100 {
            return Err(ClusterError::Usage(format!(
                "the socket path {} is too long for a unix socket; set XDG_STATE_HOME to a shorter directory",
                longest.display()
            )));
        }
    }
    let helper_pid = start_helper(options, &dir)?;
    record.helper_pid = Some(helper_pid);
    record.save(&dir)?;
    progress(Progress::Step(match options.network {
        NetworkKind::Namespace => format!("API forwarder running (pid {helper_pid})"),
        NetworkKind::User => format!("cluster network switch running (pid {helper_pid})"),
    }));

    // The VMs.
    let mut children = Vec::new();
    let mut watches = Vec::new();
    for (i, node) in plan.nodes.iter().enumerate() {
        let frozen = stage1_watch::frozen_at_first_power_on(&node.name);
        let boot = if frozen {
            Boot::FirstFrozen
        } else {
            Boot::First
        };
        let child = launch::launch(&dir, &record, i, boot)?.child;
        watches.push(Watch::new(stage1_deadline, Instant::now()));
        if let Some(n) = record.nodes.get_mut(i) {
            n.pid = Some(child.id());
        }
        record.save(&dir)?;
        progress(Progress::Step(format!(
            "started {} (pid {}), console {}{}",
            node.name,
            child.id(),
            node_dir(&dir, &node.name).join("console.log").display(),
            if frozen {
                format!(
                    ", its CPUs held at reset ({}: the test hook of a node frozen before stage 1)",
                    stage1_watch::FREEZE_ENV
                )
            } else {
                String::new()
            }
        )));
        children.push(child);
    }

    // The client context.
    let admin = pki::issue_api_client(&secrets.node_api_ca, "admin", Role::Admin)
        .map_err(|e| ClusterError::Generate(e.to_string()))?;
    let context = Context {
        endpoints: record.nodes.iter().map(|n| n.api.clone()).collect(),
        nodes: Vec::new(),
        ca: secrets.node_api_ca.cert.clone(),
        cert: admin.cert,
        key: admin.key,
    };
    ClientConfig::single(&options.name, context.clone())
        .save(&dir.join("machinectl.toml"))
        .map_err(ClusterError::ClientConfig)?;

    let mut vms = Vms { children, watches };
    wait_healthy(
        &options.name,
        &dir,
        &mut record,
        &context,
        &mut vms,
        wait,
        progress,
    )?;
    let mut children = vms.children;

    let mut merged = if options.client_config.exists() {
        ClientConfig::load(&options.client_config).map_err(ClusterError::ClientConfig)?
    } else {
        ClientConfig::default()
    };
    let names = merged.merge(ClientConfig::single(&options.name, context.clone()));
    let context_name = names
        .first()
        .map_or_else(|| options.name.clone(), |m| m.to.clone());
    merged
        .save(&options.client_config)
        .map_err(ClusterError::ClientConfig)?;
    record.client_config = Some(options.client_config.clone());
    record.context = Some(context_name.clone());
    record.save(&dir)?;

    // The context is merged first: a cluster whose etcd does not form is left for
    // inspection with machinectl.
    if options.bootstrap {
        let target = bootstrap::Target {
            cluster: &options.name,
            dir: &dir,
            record: &record,
            context: &context,
        };
        bootstrap::bootstrap_and_wait(&target, &mut children, options.etcd_wait, progress)?;
        record.etcd_bootstrapped = true;
        record.save(&dir)?;
    }
    Ok(Created {
        dir,
        record,
        context: context_name,
    })
}

trait PrivateDir {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateDir for std::fs::DirBuilder {
    fn mode_private(&mut self) -> &mut Self {
        use std::os::unix::fs::DirBuilderExt as _;
        self.mode(atomic::PRIVATE_DIR_MODE)
    }
}

/// One node's config: the generated config of its role with the user's patches, then
/// its own patch.
/// The config patches of `create`: for every node, then per role.
struct RolePatches {
    all: Vec<Patch>,
    controlplane: Vec<Patch>,
    worker: Vec<Patch>,
}

fn node_config(
    options: &CreateOptions,
    plan: &Plan,
    node: &plan::NodePlan,
    role_patches: &RolePatches,
    secrets: &ClusterSecrets,
) -> Result<String, ClusterError> {
    let patches = &role_patches.all;
    let own = Patch::from_toml_str(
        &plan::node_patch(plan, node, options.network),
        &format!("{} (cluster network)", node.name),
    )
    .map_err(|e| ClusterError::Generate(e.to_string()))?;
    let mut generate_options = GenerateOptions {
        cluster_name: options.name.clone(),
        endpoint: plan.endpoint(),
        patches: patches.to_vec(),
        ..GenerateOptions::default()
    };
    match node.role {
        MachineType::ControlPlane => {
            generate_options
                .control_plane_patches
                .extend(role_patches.controlplane.iter().cloned());
            generate_options.control_plane_patches.push(own);
        }
        MachineType::Worker => {
            generate_options
                .worker_patches
                .extend(role_patches.worker.iter().cloned());
            generate_options.worker_patches.push(own);
            generate_options
                .worker_patches
                .push(worker_identity(node, secrets, patches)?);
        }
    }
    let generated = match generate(&generate_options, secrets) {
        Ok(g) => g,
        Err(GenerateError::Invalid { file, report }) => {
            let problems: Vec<String> =
                report.diagnostics.iter().map(ToString::to_string).collect();
            return Err(ClusterError::Generate(format!(
                "the {file} config of {} is invalid after the config patches:\n{}",
                node.name,
                problems.join("\n")
            )));
        }
        Err(e) => return Err(ClusterError::Generate(keelson_api::error_chain(&e))),
    };
    Ok(match node.role {
        MachineType::ControlPlane => generated.control_plane.text,
        MachineType::Worker => generated.worker.text,
    })
}

/// A worker's node API server certificate and key, as `machine.files` in STATE where
/// machined looks for them. A worker never holds the node API CA key, and this release
/// has no join flow to give it a certificate; the cluster tool holds the CA (it made the
/// secrets), so it issues each worker's certificate itself, for the names machinectl
/// connects through (loopback, the cluster address, the hostname).
fn worker_identity(
    node: &plan::NodePlan,
    secrets: &ClusterSecrets,
    patches: &[Patch],
) -> Result<Patch, ClusterError> {
    let cert = pki::issue(
        &secrets.node_api_ca,
        &pki::LeafRequest {
            common_name: node.name.clone(),
            organizations: Vec::new(),
            sans: vec![
                node.name.clone(),
                "localhost".into(),
                "127.0.0.1".into(),
                node.address.to_string(),
                plan::USER_NET_ADDRESS
                    .split('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            ],
            usage: pki::Usage::Server,
        },
    )
    .map_err(|e| ClusterError::Generate(keelson_api::error_chain(&e)))?;
    let file = |name: &str, content: &str| {
        let mut t = toml::Table::new();
        t.insert(
            "path".into(),
            format!("{STATE_MOUNT}/node-api/{name}").into(),
        );
        t.insert("content".into(), content.into());
        t.insert("mode".into(), "0600".into());
        toml::Value::Table(t)
    };
    // A merge patch replaces arrays whole: keep the files the user's patches asked for.
    let mut files = user_files(patches);
    files.extend([
        file("server.crt", &cert.cert),
        file("server.key", &cert.key),
    ]);
    let mut machine = toml::Table::new();
    machine.insert("files".into(), toml::Value::Array(files));
    let mut doc = toml::Table::new();
    doc.insert("machine".into(), toml::Value::Table(machine));
    Patch::from_toml_str(
        &toml::to_string(&doc).map_err(|e| ClusterError::Generate(e.to_string()))?,
        &format!("{} (node API certificate)", node.name),
    )
    .map_err(|e| ClusterError::Generate(e.to_string()))
}

/// `machine.files` as the user's patches leave it (each patch replaces the array, or
/// deletes it with a `$patch` directive).
fn user_files(patches: &[Patch]) -> Vec<toml::Value> {
    let mut files = Vec::new();
    for patch in patches {
        let value = patch
            .table()
            .get("machine")
            .and_then(toml::Value::as_table)
            .and_then(|m| m.get("files"));
        match value {
            Some(toml::Value::Array(a)) => files = a.clone(),
            Some(_) => files.clear(),
            None => {}
        }
    }
    files
}

/// Starts `machinectl cluster helper DIR/` in its own session and waits until it serves.
fn start_helper(options: &CreateOptions, dir: &Path) -> Result<u32, ClusterError> {
    let log = dir.join("helper.log");
    let log_file = File::create(&log).map_err(io_error("create", &log))?;
    let err_file = log_file.try_clone().map_err(io_error("open", &log))?;
    let mut cmd = Command::new(&options.helper_exe);
    cmd.args(["cluster", "helper"])
        .arg(process_marker(dir))
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(err_file);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().map_err(|source| ClusterError::Io {
        what: "start the cluster helper",
        path: options.helper_exe.clone(),
        source,
    })?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if dir.join(READY_FILE).exists() {
            return Ok(child.id());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ClusterError::Tool {
                tool: "the cluster helper".into(),
                detail: format!(
                    "it exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default().trim()
                ),
            });
        }
        if Instant::now() > deadline {
            return Err(ClusterError::Tool {
                tool: "the cluster helper".into(),
                detail: format!("not ready after 15 s; see {}", log.display()),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The QEMUs `create` or `start` waits on, and each one's stage-1 watch, by node index
/// (`start`: in the order it started them).
pub(crate) struct Vms {
    /// Each node's QEMU.
    pub children: Vec<Child>,
    /// Each node's stage-1 watch.
    pub watches: Vec<Watch>,
}

/// Watches node `index` (of the record) until its stage 1 starts: a node hung before it
/// is power-cycled, and the progress says so, at most [`MAX_POWER_CYCLES`] times; hung
/// after that, it is an error naming the node and its console log.
pub(crate) fn watch_stage1(
    cluster: &str,
    dir: &Path,
    record: &mut Record,
    index: usize,
    child: &mut Child,
    watch: &mut Watch,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), ClusterError> {
    if watch.booted() {
        return Ok(());
    }
    let Some(name) = record.nodes.get(index).map(|n| n.name.clone()) else {
        return Ok(());
    };
    let console_path = node_dir(dir, &name).join("console.log");
    let console = std::fs::read(&console_path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    match watch.check(&console, Instant::now()) {
        Step::Booted | Step::Waiting => Ok(()),
        Step::PowerCycle { cycle, hang } => {
            progress(Progress::Step(format!(
                "node {name} {}; power-cycling it ({cycle} of {MAX_POWER_CYCLES})",
                stage1_watch::describe(hang, &console)
            )));
            launch::power_cycle(dir, record, index, child, cycle)?;
            watch.power_cycled(Instant::now());
            Ok(())
        }
        Step::GiveUp(hang) => Err(ClusterError::Hung {
            cluster: cluster.to_owned(),
            node: name,
            what: stage1_watch::describe(hang, &console),
            boots: watch.cycles() + 1,
            cycles: watch.cycles(),
            console: console_path,
        }),
    }
}

/// Polls every node until its API answers and it is healthy, reporting progress;
/// power-cycles a node hung before stage 1.
fn wait_healthy(
    cluster: &str,
    dir: &Path,
    record: &mut Record,
    context: &Context,
    vms: &mut Vms,
    wait: Duration,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), ClusterError> {
    let connector = Arc::new(
        Connector::for_context(cluster, context)
            .map_err(|e| ClusterError::Generate(keelson_api::error_chain(&e)))?,
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_error("start the async runtime for", dir))?;
    let started = Instant::now();
    let mut states: Vec<NodeState> = record
        .nodes
        .iter()
        .map(|_| NodeState::Booting("starting".into()))
        .collect();
    loop {
        check_running(cluster, dir, record, &mut vms.children)?;
        for (i, (child, watch)) in vms.children.iter_mut().zip(&mut vms.watches).enumerate() {
            watch_stage1(cluster, dir, record, i, child, watch, progress)?;
        }
        let polls: Vec<_> = record
            .nodes
            .iter()
            .zip(&states)
            .map(|(n, s)| (*s != NodeState::Healthy).then(|| n.api.clone()))
            .collect();
        let results = runtime.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for (i, api) in polls.into_iter().enumerate() {
                if let Some(api) = api {
                    let connector = connector.clone();
                    set.spawn(async move { (i, poll_node(&connector, &api).await) });
                }
            }
            set.join_all().await
        });
        for (i, state) in results {
            if !matches!(state, NodeState::Booting(_))
                && let Some(watch) = vms.watches.get_mut(i)
            {
                watch.answered();
            }
            if let Some(s) = states.get_mut(i) {
                *s = state;
            }
        }
        progress(Progress::Nodes(
            started.elapsed(),
            record
                .nodes
                .iter()
                .map(|n| n.name.clone())
                .zip(states.iter().cloned())
                .collect(),
        ));
        if states.iter().all(|s| *s == NodeState::Healthy) {
            return Ok(());
        }
        if started.elapsed() > wait {
            let report = record
                .nodes
                .iter()
                .zip(&states)
                .filter(|(_, s)| **s != NodeState::Healthy)
                .map(|(n, s)| {
                    format!(
                        "{}: {s}; console {}, ending with:\n{}",
                        n.name,
                        node_dir(dir, &n.name).join("console.log").display(),
                        node_tail(&node_dir(dir, &n.name), 10)
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            return Err(ClusterError::Timeout {
                cluster: cluster.to_owned(),
                seconds: wait.as_secs(),
                report,
            });
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Fails with the console's tail if any node's VM has stopped.
pub(crate) fn check_running(
    cluster: &str,
    dir: &Path,
    record: &Record,
    children: &mut [Child],
) -> Result<(), ClusterError> {
    for (i, child) in children.iter_mut().enumerate() {
        if let Ok(Some(status)) = child.try_wait() {
            let name = record.nodes.get(i).map_or("?", |n| n.name.as_str());
            return Err(ClusterError::NodeDied {
                cluster: cluster.to_owned(),
                node: name.to_owned(),
                status: status.to_string(),
                tail: node_tail(&node_dir(dir, name), super::CONSOLE_TAIL_LINES),
            });
        }
    }
    Ok(())
}

/// One look at a node: version (the API answers), then health.
pub(crate) async fn poll_node(connector: &Connector, api: &str) -> NodeState {
    let attempt = async {
        let mut client = connector
            .connect(api)
            .await
            .map_err(|e| NodeState::Booting(short(&keelson_api::error_chain(&e))))?;
        client
            .version(proto::VersionRequest {})
            .await
            .map_err(|s| {
                NodeState::Booting(short(&keelson_api::error_chain(
                    &connector.status_error(api, &s),
                )))
            })?;
        let health = client
            .health(proto::HealthRequest {})
            .await
            .map_err(|s| {
                NodeState::Unhealthy(vec![short(&keelson_api::error_chain(
                    &connector.status_error(api, &s),
                ))])
            })?
            .into_inner();
        // The Kubernetes checks are left out: a local cluster whose nodes reach no
        // kubelet or control-plane image (as on a machine without the upstream release
        // site and registry) is still a working cluster of Keelson nodes.
        let failing: Vec<String> = health
            .checks
            .into_iter()
            .filter(|c| !c.ok && !keelson_api::api::is_kubernetes_check(&c.name))
            .map(|c| format!("{} ({})", c.name, c.reason))
            .collect();
        if failing.is_empty() {
            Ok(NodeState::Healthy)
        } else {
            Ok(NodeState::Unhealthy(failing))
        }
    };
    match tokio::time::timeout(Duration::from_secs(20), attempt).await {
        Ok(Ok(state)) | Ok(Err(state)) => state,
        Err(_) => NodeState::Booting("the API did not answer within 20 s".into()),
    }
}

/// The first line of an error, at most 100 characters (progress lines stay short).
pub(crate) fn short(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    match line.char_indices().nth(100) {
        Some((i, _)) => format!("{}...", &line[..i]),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_worker_keeps_the_users_files_beside_its_certificate() {
        let p = plan::plan("demo", 1, 1, "10.5.0.0/24".parse().unwrap()).unwrap();
        let secrets = ClusterSecrets::generate().unwrap();
        let user = Patch::from_toml_str(
            "[[machine.files]]\npath = \"/var/lib/demo.txt\"\ncontent = \"hello\"\n",
            "user.toml",
        )
        .unwrap();
        let patch = worker_identity(&p.nodes[1], &secrets, &[user]).unwrap();
        let files = patch.table()["machine"]["files"].as_array().unwrap();
        let paths: Vec<&str> = files.iter().map(|f| f["path"].as_str().unwrap()).collect();
        assert_eq!(
            paths,
            [
                "/var/lib/demo.txt",
                "/system/state/node-api/server.crt",
                "/system/state/node-api/server.key"
            ]
        );
        assert!(
            files[1]["content"]
                .as_str()
                .unwrap()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
    }
}
