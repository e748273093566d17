//! `machinectl`'s node API commands: target resolution (context, `--endpoints`,
//! `--nodes`, `--insecure`, `--cert-fingerprint`), one call per node, and printing.
//!
//! With `--insecure` the certificate of each node is shown on stderr, once, before the
//! call's output: its SHA-256 fingerprint, for the operator to compare with the one the
//! node prints on its console in maintenance mode. `--cert-fingerprint` makes that
//! comparison part of the handshake.
//!
//! Each command runs against every target node in turn; results carry the node's address
//! as their first column. A node that fails is reported on stderr by name and the command
//! goes on with the others; the exit code is 1 when any node failed.

use std::collections::BTreeSet;
use std::future::Future;
use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};
use tokio_stream::StreamExt as _;

use super::output::{Format, Records, render};
use keelson_api::api::proto;
use keelson_api::client::{ClientError, Connector, NodeClient};
use keelson_api::clientconfig::{self, ClientConfig, DEFAULT_API_PORT, with_default_port};
use keelson_api::tls::Fingerprint;

/// Where and how to connect: the global flags.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// `--machineconfig`.
    pub machineconfig: Option<PathBuf>,
    /// `--context`.
    pub context: Option<String>,
    /// `--endpoints`.
    pub endpoints: Vec<String>,
    /// `--nodes`.
    pub nodes: Vec<String>,
    /// `--insecure`.
    pub insecure: bool,
    /// `--cert-fingerprint`: the node's certificate must have this SHA-256 fingerprint
    /// (maintenance mode, as `--insecure` otherwise).
    pub cert_fingerprint: Option<Fingerprint>,
    /// `--timeout`: every unary call's deadline instead of its method's default.
    pub timeout: Option<Duration>,
    /// `-o`.
    pub output: Format,
}

/// The output format flag of a command.
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: Format,
}

/// `machinectl service NAME [ACTION]`.
#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// The service (containerd, kubelet, etcd, machined, ...).
    pub name: String,
    /// What to do; without it, show the service's status.
    #[arg(value_enum)]
    pub action: Option<ServiceActionArg>,
    /// The signal `kill` sends (KILL, TERM, HUP, INT, QUIT, ABRT, USR1, USR2).
    #[arg(long, value_name = "SIGNAL", default_value = "KILL")]
    pub signal: String,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// A service action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServiceActionArg {
    /// Start it.
    Start,
    /// Stop it.
    Stop,
    /// Restart it.
    Restart,
    /// Send it a signal (--signal, KILL by default); PID 1 restarts it after its backoff.
    Kill,
}

/// `machinectl logs SERVICE`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The service, or `init` for PID 1's boot log.
    pub service: String,
    /// Keep printing new lines as they come.
    #[arg(short, long)]
    pub follow: bool,
    /// Only the last N lines.
    #[arg(long, value_name = "N")]
    pub tail: Option<u32>,
}

/// `machinectl dmesg`.
#[derive(Debug, Args)]
pub struct DmesgArgs {
    /// Keep printing new kernel messages as they come.
    #[arg(short, long)]
    pub follow: bool,
    /// Only the last N messages.
    #[arg(long, value_name = "N")]
    pub tail: Option<u32>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// A resource of `machinectl get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Resource {
    /// Interface addresses.
    Addresses,
    /// Network links (interfaces).
    Links,
    /// IPv4 and IPv6 routes.
    Routes,
    /// The IPv4 neighbour (ARP) table: the peers this node has reached.
    #[value(alias = "neighbors")]
    Neighbours,
    /// Mounted filesystems.
    Mounts,
    /// Kernel parameters (/proc/sys).
    Sysctls,
    /// Loaded kernel modules.
    Modules,
    /// Block devices.
    Disks,
    /// /proc/meminfo.
    Memory,
    /// Processes.
    Processes,
}

impl Resource {
    fn name(self) -> &'static str {
        match self {
            Resource::Addresses => "addresses",
            Resource::Links => "links",
            Resource::Routes => "routes",
            Resource::Neighbours => "neighbours",
            Resource::Mounts => "mounts",
            Resource::Sysctls => "sysctls",
            Resource::Modules => "modules",
            Resource::Disks => "disks",
            Resource::Memory => "memory",
            Resource::Processes => "processes",
        }
    }
}

/// `machinectl get RESOURCE [FILTER]`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// What to show.
    #[arg(value_enum)]
    pub resource: Resource,
    /// Keep only rows whose first column starts with this (e.g. `net.ipv4` for sysctls).
    pub filter: Option<String>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `machinectl read PATH`.
#[derive(Debug, Args)]
pub struct ReadArgs {
    /// A file under /proc, /sys, /var/log or /system/state (at most 4 MiB are shown).
    pub path: String,
}

/// The apply modes, as the command line spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Live when every change can be applied live, else with a reboot.
    Auto,
    /// Live only; refuse changes that need a reboot.
    NoReboot,
    /// Write the config and reboot.
    Reboot,
    /// Write the config for the next boot; change nothing now.
    Staged,
    /// Live, not persisted; reverted after --timeout unless confirmed with --confirm.
    Try,
}

impl From<ModeArg> for proto::ApplyMode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Auto => proto::ApplyMode::Auto,
            ModeArg::NoReboot => proto::ApplyMode::NoReboot,
            ModeArg::Reboot => proto::ApplyMode::Reboot,
            ModeArg::Staged => proto::ApplyMode::Staged,
            ModeArg::Try => proto::ApplyMode::Try,
        }
    }
}

/// `machinectl apply-config`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The machine config to apply.
    #[arg(short, long, value_name = "FILE", required_unless_present = "confirm")]
    pub file: Option<PathBuf>,
    /// How to apply it.
    #[arg(short, long, value_enum, default_value = "auto")]
    pub mode: ModeArg,
    /// With --mode try: how long before the node reverts (the global --timeout, which
    /// means this for `apply-config --mode try`; default 1m).
    #[arg(skip)]
    pub timeout: Option<Duration>,
    /// Validate on the node and print the diff; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep the config applied with --mode try (writes it to STATE).
    #[arg(long, conflicts_with_all = ["file", "dry_run"])]
    pub confirm: bool,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `machinectl reset`.
#[derive(Debug, Args)]
pub struct ResetArgs {
    /// Do not ask for confirmation.
    #[arg(short, long)]
    pub yes: bool,
    /// Reset even if leaving etcd would break its quorum or fails.
    #[arg(long)]
    pub force: bool,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// A containerd namespace filter.
#[derive(Debug, Args)]
pub struct NamespaceArgs {
    /// Only this containerd namespace (default: all).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `machinectl image ...`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import an OCI image archive (`docker save`, `buildah push ... oci-archive:FILE`).
    Import {
        /// The archive.
        file: PathBuf,
        /// The containerd namespace to import into.
        #[arg(long, default_value = keelson_api::api::DEFAULT_NAMESPACE)]
        namespace: String,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// List the images containerd knows.
    List(NamespaceArgs),
    /// Pull an image from its registry into containerd's k8s.io namespace, where the
    /// kubelet finds it, on every target node (operator).
    ///
    /// containerd pulls it through the CRI, as `crictl pull` does; the node checks REF's
    /// syntax first. Prints the image ID each node reports.
    Pull(super::kube::ImagePullArgs),
}

/// Parses `90`, `90s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; write e.g. 90s, 2m or 1h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use s, m or h")),
    };
    Ok(Duration::from_secs(secs))
}

/// The resolved targets of a command.
#[derive(Debug)]
pub struct Session {
    connector: Connector,
    addresses: Vec<String>,
    output: Format,
    /// Whether to show each node's certificate fingerprint (`--insecure` without
    /// `--cert-fingerprint`).
    show_fingerprints: bool,
    /// The nodes whose fingerprint was shown already.
    shown: Mutex<BTreeSet<String>>,
}

impl Target {
    /// Whether the nodes are in maintenance mode: reached without a client certificate,
    /// with `--insecure` or `--cert-fingerprint`.
    pub fn maintenance(&self) -> bool {
        self.insecure || self.cert_fingerprint.is_some()
    }

    /// Resolves the context and flags into a connector and node addresses.
    pub fn session(&self) -> anyhow::Result<Session> {
        if self.timeout.is_some_and(|t| t.is_zero()) {
            bail!("--timeout 0 would give every call up at once; give a deadline such as 30s");
        }
        if self.maintenance() {
            let flag = if self.cert_fingerprint.is_some() {
                "--cert-fingerprint"
            } else {
                "--insecure"
            };
            let nodes: Vec<String> = if self.nodes.is_empty() {
                self.endpoints.clone()
            } else {
                self.nodes.clone()
            };
            if nodes.is_empty() {
                bail!(
                    "{flag} needs the node's address: pass --nodes ADDRESS (a node in maintenance mode is not in any context yet)"
                );
            }
            let connector = match self.cert_fingerprint {
                Some(expected) => Connector::pinned(expected)?,
                None => Connector::insecure()?,
            };
            return Ok(Session {
                connector: connector.with_timeout(self.timeout),
                addresses: nodes
                    .iter()
                    .map(|n| with_default_port(n, DEFAULT_API_PORT))
                    .collect(),
                output: self.output,
                show_fingerprints: self.cert_fingerprint.is_none(),
                shown: Mutex::default(),
            });
        }
        let path = clientconfig::default_path(self.machineconfig.as_deref())?;
        let config = ClientConfig::load(&path)?;
        let (name, ctx) = match &self.context {
            Some(name) => match config.contexts.get(name) {
                Some(ctx) => (name.as_str(), ctx),
                None => bail!(
                    "{}: no context named {name:?}; defined contexts: [{}]",
                    path.display(),
                    config
                        .contexts
                        .keys()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
            None => config.current()?,
        };
        let mut ctx = ctx.clone();
        if !self.endpoints.is_empty() {
            ctx.endpoints = self.endpoints.clone();
        }
        if !self.nodes.is_empty() {
            ctx.nodes = self.nodes.clone();
        }
        // Nodes are reached directly on the port of the first endpoint.
        let port = ctx
            .endpoint_addresses()
            .first()
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(DEFAULT_API_PORT);
        let addresses = if ctx.nodes.is_empty() {
            ctx.endpoint_addresses()
        } else {
            ctx.nodes
                .iter()
                .map(|n| with_default_port(n, port))
                .collect()
        };
        Ok(Session {
            connector: Connector::for_context(name, &ctx)?.with_timeout(self.timeout),
            addresses,
            output: self.output,
            show_fingerprints: false,
            shown: Mutex::default(),
        })
    }
}

/// What one node's call produced.
pub(crate) type NodeResult<T> = Result<T, ClientError>;

impl Session {
    /// The node addresses, in order.
    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    /// How nodes are reached (the credentials, and `--timeout`).
    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    pub(crate) async fn client(&self, address: &str) -> NodeResult<NodeClient> {
        let client = self.connector.connect(address).await?;
        if self.show_fingerprints {
            self.show_fingerprint(address);
        }
        Ok(client)
    }

    /// Shows, once per node, the fingerprint of the unverified certificate it presented.
    fn show_fingerprint(&self, address: &str) {
        let Some(seen) = self.connector.fingerprint_seen(address) else {
            return;
        };
        let first = self
            .shown
            .lock()
            .map(|mut shown| shown.insert(address.to_owned()))
            .unwrap_or(true);
        if first {
            eprintln!("{}", unverified_line(address, seen));
        }
    }

    pub(crate) fn status(&self, address: &str, s: &tonic::Status) -> ClientError {
        self.connector.status_error(address, s)
    }

    /// Runs `call` on every node; prints the records, reports failures, and returns the
    /// exit code.
    pub(crate) async fn each<F, Fut>(&self, columns: &[&str], call: F) -> ExitCode
    where
        F: Fn(NodeClient, String) -> Fut,
        Fut: Future<Output = Result<Vec<Vec<Value>>, tonic::Status>>,
    {
        let mut all = vec!["node"];
        all.extend_from_slice(columns);
        let mut records = Records::new(&all);
        let mut failed = false;
        for address in &self.addresses {
            let result = match self.client(address).await {
                Ok(client) => call(client, address.clone())
                    .await
                    .map_err(|s| self.status(address, &s)),
                Err(e) => Err(e),
            };
            match result {
                Ok(rows) => {
                    for mut row in rows {
                        row.insert(0, json!(address));
                        records.push(row);
                    }
                }
                Err(e) => {
                    failed = true;
                    eprintln!("machinectl: error: {}", keelson_api::error_chain(&e));
                }
            }
        }
        if !failed || !records.rows.is_empty() {
            print!("{}", render(&records, self.output));
        }
        if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    }

    /// Streams text from each node (logs, dmesg, read); lines get a `NODE: ` prefix when
    /// there are several nodes.
    async fn stream_text<F, Fut, S>(&self, call: F) -> ExitCode
    where
        F: Fn(NodeClient) -> Fut,
        Fut: Future<Output = Result<S, tonic::Status>>,
        S: tokio_stream::Stream<Item = Result<Vec<u8>, tonic::Status>> + Unpin,
    {
        let prefix = self.addresses.len() > 1;
        let mut failed = false;
        for address in &self.addresses {
            let result: NodeResult<()> = async {
                let client = self.client(address).await?;
                let mut stream = call(client).await.map_err(|s| self.status(address, &s))?;
                let mut stdout = std::io::stdout().lock();
                while let Some(item) = stream.next().await {
                    let bytes = item.map_err(|s| self.status(address, &s))?;
                    if prefix {
                        for line in String::from_utf8_lossy(&bytes).lines() {
                            let _ = writeln!(stdout, "{address}: {line}");
                        }
                    } else {
                        let _ = stdout.write_all(&bytes);
                    }
                    let _ = stdout.flush();
                }
                Ok(())
            }
            .await;
            if let Err(e) = result {
                failed = true;
                eprintln!("machinectl: error: {}", keelson_api::error_chain(&e));
            }
        }
        if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    }
}

/// The line `--insecure` prints for a node's unverified certificate.
pub fn unverified_line(address: &str, seen: Fingerprint) -> String {
    format!(
        "machinectl: {address} presented a certificate with SHA-256 fingerprint {seen}, not verified (--insecure): compare it with the fingerprint on the node's console, and pass it as --cert-fingerprint to refuse any other"
    )
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `machinectl version`: the node's facts, and from `UpgradeStatus` (when the caller may
/// ask it and the node answers it) the other slot, whether the booted one is on trial,
/// and the newest upgrade's outcome (with its failure).
pub fn version(target: &Target) -> anyhow::Result<ExitCode> {
    let session = target.session()?;
    let insecure = target.maintenance();
    let mut columns = vec![
        "os",
        "version",
        "slot",
        "kernel",
        "arch",
        "hostname",
        "type",
        "maintenance",
    ];
    columns.extend(super::upgrade::VERSION_EXTRA_COLUMNS);
    runtime()?.block_on(async {
        Ok(session
            .each(&columns, |mut c, _| async move {
                let v = c.version(proto::VersionRequest {}).await?.into_inner();
                // Maintenance mode serves Version alone; a reader may ask the status.
                let status = if insecure || v.maintenance {
                    None
                } else {
                    c.upgrade_status(proto::UpgradeStatusRequest {})
                        .await
                        .ok()
                        .map(tonic::Response::into_inner)
                };
                let mut row = vec![
                    json!(v.os_name),
                    json!(v.os_version),
                    json!(v.slot),
                    json!(v.kernel),
                    json!(v.arch),
                    json!(v.hostname),
                    json!(v.machine_type),
                    json!(v.maintenance),
                ];
                row.extend(super::upgrade::version_extras(status.as_ref(), &v.slot));
                Ok(vec![row])
            })
            .await)
    })
}

/// `machinectl health`.
pub fn health(target: &Target) -> anyhow::Result<ExitCode> {
    let session = target.session()?;
    runtime()?.block_on(async {
        let unhealthy = std::sync::atomic::AtomicBool::new(false);
        let code = session
            .each(&["check", "ok", "reason"], |mut c, _| {
                let unhealthy = &unhealthy;
                async move {
                    let h = c.health(proto::HealthRequest {}).await?.into_inner();
                    if !h.healthy {
                        unhealthy.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(h.checks
                        .into_iter()
                        .map(|c| vec![json!(c.name), json!(c.ok), json!(c.reason)])
                        .collect())
                }
            })
            .await;
        if unhealthy.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!("machinectl: the node is not healthy: see the checks above that are not ok");
            return Ok(ExitCode::FAILURE);
        }
        Ok(code)
    })
}

const SERVICE_COLUMNS: [&str; 6] = ["service", "state", "ready", "pid", "restarts", "message"];

fn service_row(s: proto::Service) -> Vec<Value> {
    vec![
        json!(s.name),
        json!(s.state),
        json!(s.ready),
        json!(s.pid),
        json!(s.restarts),
        json!(s.message),
    ]
}

/// `machinectl services`.
pub fn services(target: &Target) -> anyhow::Result<ExitCode> {
    let session = target.session()?;
    runtime()?.block_on(async {
        Ok(session
            .each(&SERVICE_COLUMNS, |mut c, _| async move {
                let s = c.services(proto::ServicesRequest {}).await?.into_inner();
                Ok(s.services.into_iter().map(service_row).collect())
            })
            .await)
    })
}

/// `machinectl service NAME [start|stop|restart|kill [--signal S]]`.
pub fn service(target: &Target, args: &ServiceArgs) -> anyhow::Result<ExitCode> {
    let session = target.session()?;
    let name = args.name.clone();
    runtime()?.block_on(async {
        match args.action {
            None => Ok(session
                .each(&SERVICE_COLUMNS, |mut c, _| {
                    let name = name.clone();
                    async move {
                        let s = c.services(proto::ServicesRequest {}).await?.into_inner();
                        let known: Vec<String> =
                            s.services.iter().map(|s| s.name.clone()).collect();
                        let rows: Vec<Vec<Value>> = s
                            .services
                            .into_iter()
                            .filter(|s| s.name == name)
                            .map(service_row)
                            .collect();
                        if rows.is_empty() {
                            return Err(tonic::Status::not_found(format!(
                                "no service named {name:?}; known services: {}",
                                known.join(", ")
                            )));
                        }
                        Ok(rows)
                    }
                })
                .await),
            Some(action) => {
                let kind = match action {
                    ServiceActionArg::Start => proto::ServiceAction::Start,
                    ServiceActionArg::Stop => proto::ServiceAction::Stop,
                    ServiceActionArg::Restart => proto::ServiceAction::Restart,
                    ServiceActionArg::Kill => proto::ServiceAction::Kill,
                };
                let signal = if action == ServiceActionArg::Kill {
                    args.signal.clone()
                } else {
                    String::new()
                };
                Ok(session
                    .each(&["message"], |mut c, _| {
                        let name = name.clone();
                        let signal = signal.clone();
                        async move {
                            let r = c
                                .service_action(proto::ServiceActionRequest {
                                    name,
                                    action: kind.into(),
                                    signal,
                                })
                                .await?
                                .into_inner();
                            Ok(vec![vec![json!(r.message)]])
                        }
                    })
                    .await)
            }
        }
    })
}

/// `machinectl logs SERVICE [-f] [--tail N]`.
pub fn logs(target: &Target, args: &LogsArgs) -> anyhow::Result<ExitCode> {
    let session = target.session()?;
    let request = proto::LogsRequest {
        service: args.service.clone(),
        follow: args.follow,
        tail_lines: args.tail.unwrap_or(0),
    };
    runtime()?.block_on(async {
        Ok(session
            .stream_text(|mut c| {
                let request = request.clone();
                async move {
                    let stream = c.logs(request).await?.into_inner();
                    Ok(stream.map(|r| {
                        r.map(|l| {
                            let mut text = l.lines.join("\n");
                            if !text.is_empty() {
                                text.push('\n');
                            }
                            text.into_bytes()
                        })
                    }))
                }
            })
            .await)
    })
}

fn level_name(level: u32) -> &'static str {
    match level {
        0 => "emerg",
        1 => "alert",
        2 => "crit",
        3 => "err",
        4 => "warn",
        5 => "notice",
        6 => "info",
        _ => "debug",
    }
}

/// `machinectl dmesg [-f] [--tail N]`.
pub fn dmesg(target: &Target, args: &DmesgArgs) -> anyhow::Result<ExitCode> {
    let session = target.session()?;
    let request = proto::DmesgRequest {
        follow: args.follow,
        tail: args.tail.unwrap_or(0),
    };
    let json = session.output != Format::Table;
    runtime()?.block_on(async {
        Ok(session
            .stream_text(|mut c| async move {
                let stream = c.dmesg(request).await?.into_inner();
                Ok(stream.map(move |r| {
                    r.map(|batch| {
                        let mut out = String::new();
                        for m in batch.messages {
                            if json {
                                out.push_str(
                                    &json!({
                                        "sequence": m.sequence,
                                        "timestamp_us": m.timestamp_us,
                                        "level": level_name(m.level),
                                        "facility": m.facility,
                                        "message": m.message,
                                    })
                                    .to_string(),
                                );
                            } else {
                                out.push_str(&format!(
                                    "[{:>5}.{:06}] {}: {}",
                                    m.timestamp_us / 1_000_000,
                                    m.timestamp_us % 1_000_000,
                                    level_name(m.level),
                                    m.message
                                ));
                            }
                            out.push('\n');
                        }
                        out.into_bytes()
                    })
                }))
            })
            .await)
    })
}

/// `machinectl get RESOURCE [FILTER]`.
pub fn get(target: &Target, args: &GetArgs) -> anyhow::Result<ExitCode> {
    let session = target.session()?;
    let request = proto::GetRequest {
        resource: args.resource.name().into(),
        filter: args.filter.clone().unwrap_or_default(),
    };
    runtime()?.block_on(async {
        // The columns come from the node: ask the first one, then print all.
        let mut records: Option<Records> = None;
        let mut failed = false;
        for address in session.addresses() {
            let result: NodeResult<proto::Table> = async {
                let mut c = session.client(address).await?;
                Ok(c.get(request.clone())
                    .await
                    .map_err(|s| session.status(address, &s))?
                    .into_inner())
            }
            .await;
            match result {
                Ok(table) => {
                    let r = records.get_or_insert_with(|| {
                        let mut cols = vec!["node".to_owned()];
                        cols.extend(table.columns.iter().map(|c| c.to_lowercase()));
                        Records {
                            columns: cols,
                            rows: Vec::new(),
                        }
                    });
                    for row in table.rows {
                        let mut values = vec![json!(address)];
                        values.extend(row.cells.into_iter().map(Value::String));
                        r.push(values);
                    }
                }
                Err(e) => {
                    failed = true;
                    eprintln!("machinectl: error: {}", keelson_api::error_chain(&e));
                }
            }
        }
        if let Some(r) = records {
            print!("{}", render(&r, session.output));
        }
        Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    })
}

/// `machinectl read PATH`.
pub fn read(target: &Target, args: &ReadArgs) -> anyhow::Result<ExitCode> {
    let session = target.session()?;
    let path = args.path.clone();
    runtime()?.block_on(async {
        Ok(session
            .stream_text(|mut c| {
                let path = path.clone();
                async move {
                    let stream = c
                        .read(proto::ReadRequest { path: path.clone() })
                        .await?
                        .into_inner();
                    Ok(stream.map(move |r| {
                        r.map(|chunk| {
                            if chunk.truncated {
                                eprintln!(
                                    "machinectl: {path} is longer than {} MiB: the rest was left out",
                                    keelson_api::api::MAX_READ >> 20
                                );
                            }
                            chunk.data
                        })
                    }))
                }
            })
            .await)
    })
}

/// `machinectl apply-config`.
pub fn apply_config(target: &Target, args: &ApplyArgs) -> anyhow::Result<ExitCode> {
    let session = target.session()?;
    if args.confirm {
        return runtime()?.block_on(async {
            Ok(session
                .each(&["message"], |mut c, _| async move {
                    let r = c
                        .confirm_config(proto::ConfirmConfigRequest {})
                        .await?
                        .into_inner();
                    Ok(vec![vec![json!(r.message)]])
                })
                .await)
        });
    }
    let Some(file) = &args.file else {
        bail!("apply-config needs --file CONFIG (or --confirm)");
    };
    let config = std::fs::read(file)
        .with_context(|| format!("cannot read the machine config {}", file.display()))?;
    let request = proto::ApplyConfigRequest {
        config,
        mode: proto::ApplyMode::from(args.mode).into(),
        try_timeout_seconds: args
            .timeout
            .map(|t| u32::try_from(t.as_secs()).unwrap_or(u32::MAX))
            .unwrap_or(0),
        dry_run: args.dry_run,
    };
    let format = session.output;
    runtime()?.block_on(async {
        let mut records = Records::new(&["node", "mode", "messages", "warnings", "diff"]);
        let mut failed = false;
        for address in session.addresses() {
            let result: NodeResult<proto::ApplyConfigResponse> = async {
                let mut c = session.client(address).await?;
                Ok(c.apply_config(request.clone())
                    .await
                    .map_err(|s| session.status(address, &s))?
                    .into_inner())
            }
            .await;
            match result {
                Ok(r) => {
                    let mode = keelson_api::api::apply_mode_name(r.mode());
                    if format == Format::Table {
                        if args.dry_run || r.diff.is_empty() {
                            print!("{}", r.diff);
                        }
                        for w in &r.warnings {
                            eprintln!("{address}: warning: {w}");
                        }
                        for m in &r.messages {
                            println!("{address}: {m}");
                        }
                    }
                    records.push(vec![
                        json!(address),
                        json!(mode),
                        json!(r.messages),
                        json!(r.warnings),
                        json!(r.diff),
                    ]);
                }
                Err(e) => {
                    failed = true;
                    eprintln!("machinectl: error: {}", keelson_api::error_chain(&e));
                }
            }
        }
        if format != Format::Table {
            print!("{}", render(&records, format));
        }
        Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    })
}

/// What a power command does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerCommand {
    /// `machinectl reboot`.
    Reboot,
    /// `machinectl shutdown`.
    Shutdown,
    /// `machinectl reset`.
    Reset,
}

/// `machinectl reboot|shutdown|reset`; `yes` skips reset's question, `force` resets a
/// control plane even if leaving etcd would break its quorum or fails.
pub fn power(
    target: &Target,
    what: PowerCommand,
    yes: bool,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let session = target.session()?;
    if what == PowerCommand::Reset && !yes {
        let nodes = session.addresses().join(", ");
        if !std::io::stdin().is_terminal() {
            bail!(
                "reset wipes STATE and EPHEMERAL of {nodes} (config, identity, containers, etcd data) and reboots into maintenance mode; pass --yes to confirm (standard input is not a terminal, so machinectl cannot ask)"
            );
        }
        eprint!(
            "reset wipes STATE and EPHEMERAL of {nodes} (config, identity, containers, etcd data) and reboots into maintenance mode.\nType \"yes\" to continue: "
        );
        let mut answer = String::new();
        std::io::stdin()
            .read_line(&mut answer)
            .context("cannot read the answer")?;
        if answer.trim() != "yes" {
            eprintln!("machinectl: reset cancelled");
            return Ok(ExitCode::FAILURE);
        }
    }
    runtime()?.block_on(async {
        Ok(session
            .each(&["message"], |mut c, _| async move {
                let r = match what {
                    PowerCommand::Reboot => c.reboot(proto::RebootRequest {}).await?,
                    PowerCommand::Shutdown => c.shutdown(proto::ShutdownRequest {}).await?,
                    PowerCommand::Reset => c.reset(proto::ResetRequest { force }).await?,
                }
                .into_inner();
                Ok(vec![vec![json!(r.message)]])
            })
            .await)
    })
}

/// `machinectl containers`.
pub fn containers(target: &Target, args: &NamespaceArgs) -> anyhow::Result<ExitCode> {
    let session = target.session()?;
    let ns = args.namespace.clone().unwrap_or_default();
    runtime()?.block_on(async {
        Ok(session
            .each(
                &["namespace", "id", "image", "status", "pid"],
                |mut c, _| {
                    let ns = ns.clone();
                    async move {
                        let r = c
                            .containers(proto::ContainersRequest { namespace: ns })
                            .await?
                            .into_inner();
                        Ok(r.containers
                            .into_iter()
                            .map(|c| {
                                vec![
                                    json!(c.namespace),
                                    json!(c.id),
                                    json!(c.image),
                                    json!(c.status),
                                    json!(c.pid),
                                ]
                            })
                            .collect())
                    }
                },
            )
            .await)
    })
}

const IMAGE_COLUMNS: [&str; 4] = ["namespace", "name", "digest", "size"];

fn image_row(i: proto::Image) -> Vec<Value> {
    vec![
        json!(i.namespace),
        json!(i.name),
        json!(i.digest),
        json!(i.size),
    ]
}

/// `machinectl image import|list|pull`.
pub fn image(target: &Target, command: &ImageCommand) -> anyhow::Result<ExitCode> {
    let session = target.session()?;
    match command {
        ImageCommand::Pull(args) => super::kube::image_pull(&session, args),
        ImageCommand::List(args) => {
            let ns = args.namespace.clone().unwrap_or_default();
            runtime()?.block_on(async {
                Ok(session
                    .each(&IMAGE_COLUMNS, |mut c, _| {
                        let ns = ns.clone();
                        async move {
                            let r = c
                                .images(proto::ImagesRequest { namespace: ns })
                                .await?
                                .into_inner();
                            Ok(r.images.into_iter().map(image_row).collect())
                        }
                    })
                    .await)
            })
        }
        ImageCommand::Import {
            file, namespace, ..
        } => {
            let meta = std::fs::metadata(file)
                .with_context(|| format!("cannot read the image archive {}", file.display()))?;
            if !meta.is_file() {
                bail!(
                    "{} is not a file: pass an OCI image archive (.tar)",
                    file.display()
                );
            }
            let file = file.clone();
            let namespace = namespace.clone();
            runtime()?.block_on(async {
                Ok(session
                    .each(&IMAGE_COLUMNS, |mut c, _| {
                        let file = file.clone();
                        let namespace = namespace.clone();
                        async move {
                            let (chunks, failure) = archive_chunks(file, namespace).await?;
                            let r = upload(c.image_import(chunks), failure).await?.into_inner();
                            Ok(r.images.into_iter().map(image_row).collect())
                        }
                    })
                    .await)
            })
        }
    }
}

/// The archive as a stream of 1 MiB import messages (the first names the namespace), and
/// what fails the upload if reading the archive fails part way (see [`upload`]).
async fn archive_chunks(
    file: PathBuf,
    namespace: String,
) -> Result<
    (
        impl tokio_stream::Stream<Item = proto::ImageImportChunk>,
        ReadFailure,
    ),
    tonic::Status,
> {
    let (chunks, failure) = file_chunks(file).await?;
    let mut first = true;
    let messages = chunks.map(move |data| proto::ImageImportChunk {
        namespace: if std::mem::take(&mut first) {
            namespace.clone()
        } else {
            String::new()
        },
        data,
    });
    Ok((messages, failure))
}

/// How many bytes each message of an upload carries.
const UPLOAD_CHUNK: usize = 1024 * 1024;

/// Resolves with the error that stopped reading an uploaded file part way.
#[derive(Debug)]
pub(crate) struct ReadFailure {
    file: PathBuf,
    error: tokio::sync::oneshot::Receiver<std::io::Error>,
}

/// A file as a stream of chunks of at most 1 MiB, read by a task of its own. If a read
/// fails part way the stream ends early and the [`ReadFailure`] resolves: [`upload`] then
/// cancels the call, so that the node never takes a cut file for a whole one.
pub(crate) async fn file_chunks(
    file: PathBuf,
) -> Result<(impl tokio_stream::Stream<Item = Vec<u8>>, ReadFailure), tonic::Status> {
    use tokio::io::AsyncReadExt as _;
    let mut f = tokio::fs::File::open(&file).await.map_err(|e| {
        tonic::Status::invalid_argument(format!("cannot open {}: {e}", file.display()))
    })?;
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let (failed, error) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        loop {
            let mut buf = vec![0u8; UPLOAD_CHUNK];
            let n = match f.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) => {
                    // Sent before `tx` is dropped, so `upload` sees it before the end.
                    let _ = failed.send(e);
                    return;
                }
            };
            buf.truncate(n);
            if tx.send(buf).await.is_err() {
                return;
            }
        }
    });
    let failure = ReadFailure { file, error };
    Ok((tokio_stream::wrappers::ReceiverStream::new(rx), failure))
}

/// Runs an upload's call to its answer, unless reading the file fails first: then the
/// call is dropped (the node sees the request cancelled) and the read error is returned.
pub(crate) async fn upload<T>(
    call: impl Future<Output = Result<T, tonic::Status>>,
    failure: ReadFailure,
) -> Result<T, tonic::Status> {
    let ReadFailure { file, error } = failure;
    let failed = async move {
        match error.await {
            Ok(e) => e,
            // The file was read to its end: only the call can finish now.
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        e = failed => Err(tonic::Status::aborted(format!(
            "cannot read {} ({e}): the upload was cancelled",
            file.display()
        ))),
        r = call => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }

    /// A file that fails part way cancels its upload instead of sending it cut.
    #[test]
    fn a_read_error_cancels_the_upload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let result = runtime().expect("runtime").block_on(async {
            // A directory opens, then fails to read (EISDIR).
            let (chunks, failure) = file_chunks(dir.path().to_owned()).await?;
            let never = std::future::pending::<Result<(), tonic::Status>>();
            drop(chunks);
            upload(never, failure).await
        });
        let Err(status) = result else {
            panic!("the upload was not cancelled");
        };
        assert_eq!(status.code(), tonic::Code::Aborted);
        assert!(
            status.message().contains("the upload was cancelled"),
            "{status:?}"
        );
    }
}
