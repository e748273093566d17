//! `machinectl`, the operator's CLI for Keelson nodes: command-line definitions (clap
//! derive) and dispatch. It talks to nodes through `keelson-api` and runs local clusters
//! through `keelson-cluster`; it links neither the node daemon, nor the image builder, nor
//! containerd's client.
//!
//! The binary's `main` parses [`Cli`], calls [`run`], prints the error chain once and maps
//! the outcome to an exit code: 0 success, 1 failure (including an invalid config),
//! 2 bad usage (clap's own exit code).
//!
//! | module | what it is |
//! |---|---|
//! | [`api`] | the commands that call the node API, and how they reach the nodes |
//! | [`cluster`] | `machinectl cluster`: local clusters under QEMU, with a progress display |
//! | [`etcd`] | `machinectl time`, `bootstrap` and `etcd ...`: the clock and the stacked etcd |
//! | [`kube`] | `machinectl kubeconfig` and `image pull`: the Kubernetes node |
//! | [`upgrade`] | `machinectl upgrade`, `upgrade status` and `rollback`: A/B upgrades, progress, the wait for the node to come back |
//! | `gen_config` | `machinectl gen config`: machine configs, secrets and a client config |
//! | `validate` | `machinectl validate`: a machine config's problems, with positions |
//! | [`output`] | the output formats (table, json, yaml) |

pub mod api;
pub mod cluster;
pub mod etcd;
mod gen_config;
pub mod kube;
pub mod output;
pub mod upgrade;
mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use keelson_configs::validate::Mode;

/// machinectl: the operator's CLI for Keelson nodes.
#[derive(Debug, Parser)]
#[command(name = "machinectl", version, about, long_about = None)]
pub struct Cli {
    /// The machinectl client config (contexts with endpoints, nodes and credentials).
    /// Default: $MACHINECONFIG, else ~/.config/keelson/machinectl.toml.
    #[arg(long, global = true, value_name = "FILE")]
    pub machineconfig: Option<PathBuf>,

    /// The context to use instead of the config's current one.
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,

    /// Node API addresses to connect to (host or host:port, comma-separated), instead of
    /// the context's.
    #[arg(
        short,
        long,
        global = true,
        value_name = "ADDR,...",
        value_delimiter = ','
    )]
    pub endpoints: Vec<String>,

    /// The nodes to act on (comma-separated), instead of the context's; each is reached
    /// directly on the endpoints' port.
    #[arg(
        short,
        long,
        global = true,
        value_name = "ADDR,...",
        value_delimiter = ','
    )]
    pub nodes: Vec<String>,

    /// Connect without a client certificate and without verifying the node: only for a
    /// node in maintenance mode (no config yet), which serves version and apply-config.
    /// The SHA-256 fingerprint of each node's certificate is shown on stderr: compare it
    /// with the one the node prints on its console, or pin it with --cert-fingerprint.
    #[arg(short, long, global = true)]
    pub insecure: bool,

    /// Accept only a node certificate with this SHA-256 fingerprint (64 hex digits,
    /// colons optional, either case), the one a node in maintenance mode prints on its
    /// console; any other is refused before anything is sent. It pins the maintenance-mode
    /// certificate, so it implies --insecure (no client certificate, no context): use it
    /// for the first apply-config. A configured node is verified by its context's CA
    /// instead, and refuses a connection without a client certificate.
    #[arg(long, global = true, value_name = "SHA256")]
    pub cert_fingerprint: Option<keelson_api::tls::Fingerprint>,

    /// How long a call to a node may take, connecting included (e.g. 10s, 2m). Default:
    /// 30 s; 5 min for apply-config, reset and the etcd operations that change the cluster;
    /// 30 min for image pull. Streams (logs -f, dmesg -f, read, image import, bootstrap,
    /// etcd snapshot) have no total deadline: HTTP/2 pings end them within 20 s of the node
    /// going silent. With `apply-config --mode try`: how long before the node reverts
    /// (default 1m); the call then keeps its default deadline.
    #[arg(long, global = true, value_name = "DURATION", value_parser = api::parse_duration)]
    pub timeout: Option<std::time::Duration>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate things: machine configs, secrets, client configs.
    #[command(subcommand)]
    Gen(GenCommand),
    /// Check a machine config and print every problem found, with file:line:column and key path.
    Validate(validate::ValidateArgs),
    /// Show the node's OS version, booted slot, kernel and architecture.
    Version(api::OutputArgs),
    /// Show what is and is not healthy on the node, and why (exit 1 when not healthy).
    Health(api::OutputArgs),
    /// List the services PID 1 supervises.
    Services(api::OutputArgs),
    /// Show a service, or start, stop or restart it (operator).
    Service(api::ServiceArgs),
    /// Print a service's log (`init`: the boot log).
    Logs(api::LogsArgs),
    /// Print the kernel log.
    Dmesg(api::DmesgArgs),
    /// Show node state: addresses, links, routes, mounts, sysctls, modules, disks, memory,
    /// processes.
    Get(api::GetArgs),
    /// Print a file under /proc, /sys, /var/log or /system/state (admin for STATE).
    Read(api::ReadArgs),
    /// Validate a machine config on the node and apply it (admin).
    ApplyConfig(api::ApplyArgs),
    /// Reboot the node (operator).
    Reboot(api::OutputArgs),
    /// Power the node off (operator).
    Shutdown(api::OutputArgs),
    /// Wipe STATE and EPHEMERAL and reboot into maintenance mode (admin; asks first).
    ///
    /// A control plane first leaves etcd, unless it is the last member; a reset that
    /// would break etcd's quorum is refused without --force.
    Reset(api::ResetArgs),
    /// List the containers containerd runs.
    Containers(api::NamespaceArgs),
    /// containerd images: import an OCI archive (operator), pull from a registry
    /// (operator), list.
    #[command(subcommand)]
    Image(api::ImageCommand),
    /// List the images containerd knows (as `image list`; reader).
    Images(api::NamespaceArgs),
    /// Show the node's clock: whether it is synced, from which server, and its offset now
    /// (reader).
    ///
    /// The table shows offsets and round trips with units; -o json|yaml give seconds.
    Time(api::OutputArgs),
    /// Start a new etcd cluster on this control plane, empty or from a snapshot (admin;
    /// one node).
    ///
    /// Run it once, on one control plane: the others join by themselves. The node refuses
    /// when it is not a control plane, its clock is not synced, /var/lib/etcd is not empty,
    /// or another control plane of the cluster already has etcd members.
    Bootstrap(etcd::BootstrapArgs),
    /// The stacked etcd: members, status, snapshot, defrag, alarms, leave, remove-member,
    /// forfeit-leadership (roles per command).
    #[command(subcommand)]
    Etcd(etcd::EtcdCommand),
    /// Get a kubeconfig with a new admin certificate from a control plane and merge it
    /// into ~/.kube/config (admin; one control plane).
    ///
    /// The node mints the certificate from the Kubernetes CA (as kubeadm's admin.conf).
    /// The file is PATH, else the first entry of $KUBECONFIG, else ~/.kube/config. Merged
    /// as kubectl users expect: its other contexts are kept, a context, user or cluster of
    /// the same name is refused unless --force, and the new context becomes the current
    /// one. --merge=false writes the new kubeconfig alone. Written atomically, mode 0600
    /// (it holds a cluster-admin key). A worker refuses: it holds no CA key.
    Kubeconfig(kube::KubeconfigArgs),
    /// Install a signed upgrade bundle into the node's inactive slot and reboot into it
    /// (admin); `upgrade status` shows the slots and the newest attempt (reader).
    ///
    /// Every check runs on the node before anything is written. After the reboot,
    /// machinectl waits (--wait) for the node to answer with the new version: exit 0 when
    /// it does, 1 when the node fell back to its old slot (the failed phase and why are
    /// printed) or did not answer in time. Several nodes are upgraded one after the other;
    /// the first that fails stops the rest.
    Upgrade(upgrade::UpgradeArgs),
    /// Boot the other slot, which must hold a blessed image, and wait for it to answer
    /// (admin).
    Rollback(upgrade::RollbackArgs),
    /// Local clusters under QEMU: create, destroy, list, show.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Print a shell completion script: `machinectl completion bash > /etc/bash_completion.d/machinectl`.
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `machinectl gen ...`.
#[derive(Debug, Subcommand)]
pub enum GenCommand {
    /// Generate controlplane.toml, worker.toml, secrets.toml and machinectl.toml for a new
    /// cluster (or, with --with-secrets, for an existing one).
    Config(Box<gen_config::GenConfigArgs>),
}

/// The validation mode, as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Bare metal (or a VM installed like one): an install disk is required.
    Metal,
    /// A cloud instance, configured from the platform's metadata.
    Cloud,
    /// A container: no disks, no kernel settings of its own.
    Container,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::Metal => Mode::Metal,
            ModeArg::Cloud => Mode::Cloud,
            ModeArg::Container => Mode::Container,
        }
    }
}

/// Runs one command. `Ok` carries the exit code for outcomes that are not errors of
/// machinectl itself (an invalid config exits 1 after its diagnostics are printed).
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let target = |o: &api::OutputArgs| api::Target {
        machineconfig: cli.machineconfig.clone(),
        context: cli.context.clone(),
        endpoints: cli.endpoints.clone(),
        nodes: cli.nodes.clone(),
        insecure: cli.insecure,
        cert_fingerprint: cli.cert_fingerprint,
        timeout: cli.timeout,
        output: o.output,
    };
    match cli.command {
        Command::Gen(GenCommand::Config(args)) => gen_config::run(&args),
        Command::Validate(args) => validate::run(&args),
        Command::Version(o) => api::version(&target(&o)),
        Command::Health(o) => api::health(&target(&o)),
        Command::Services(o) => api::services(&target(&o)),
        Command::Service(args) => api::service(&target(&args.output), &args),
        Command::Logs(args) => api::logs(&target(&api::OutputArgs::default()), &args),
        Command::Dmesg(args) => api::dmesg(&target(&args.output), &args),
        Command::Get(args) => api::get(&target(&args.output), &args),
        Command::Read(args) => api::read(&target(&api::OutputArgs::default()), &args),
        Command::ApplyConfig(mut args) => {
            let mut target = target(&args.output);
            if args.mode == api::ModeArg::Try {
                args.timeout = target.timeout.take();
            }
            api::apply_config(&target, &args)
        }
        Command::Reboot(o) => api::power(&target(&o), api::PowerCommand::Reboot, true, false),
        Command::Shutdown(o) => api::power(&target(&o), api::PowerCommand::Shutdown, true, false),
        Command::Reset(args) => api::power(
            &target(&args.output),
            api::PowerCommand::Reset,
            args.yes,
            args.force,
        ),
        Command::Containers(args) => api::containers(&target(&args.output), &args),
        Command::Image(command) => {
            let o = match &command {
                api::ImageCommand::Import { output, .. } => *output,
                api::ImageCommand::List(args) => args.output,
                api::ImageCommand::Pull(args) => args.output,
            };
            api::image(&target(&o), &command)
        }
        Command::Images(args) => {
            let o = args.output;
            api::image(&target(&o), &api::ImageCommand::List(args))
        }
        Command::Time(o) => etcd::time(&target(&o)),
        Command::Bootstrap(args) => etcd::bootstrap(&target(&args.output), &args),
        Command::Etcd(command) => etcd::etcd(&target(&command.output()), &command),
        Command::Kubeconfig(args) => kube::kubeconfig(&target(&args.output), &args),
        Command::Upgrade(args) => upgrade::run(&target(&api::OutputArgs::default()), &args),
        Command::Rollback(args) => upgrade::rollback(&target(&api::OutputArgs::default()), &args),
        Command::Cluster(command) => cluster::run(command, cli.machineconfig.as_deref()),
        Command::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "machinectl", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
