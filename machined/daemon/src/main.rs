//! `machined`: the node API daemon. PID 1 supervises it; it serves the node API on port
//! 50000 until SIGTERM. Parses arguments, sets up logging, runs the server, logs the error
//! chain once and maps it to an exit code.
//!
//! Logging goes through `tracing`: one plain line per event on stderr (which PID 1 keeps
//! as the service's output, for `machinectl logs machined`), with its level and fields;
//! no ANSI colours, and no timestamps since PID 1's console has its own. The few events
//! meant for the console (`keelson_machined::console`) are also written on `/dev/console`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use keelson_machined::backend::{INIT_SOCKET, InitSocket};
use keelson_machined::console;
use keelson_machined::server::{self, Options};
use keelson_machined::upgrade::{UpgradePaths, Upgrader};

/// machined: the Keelson node API daemon (gRPC over mutual TLS).
#[derive(Debug, Parser)]
#[command(name = "machined", version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "[::]:50000")]
    listen: std::net::SocketAddr,
    /// STATE: where the machine config is persisted.
    #[arg(long, default_value = keelson_configs::layout::STATE_MOUNT)]
    state_dir: PathBuf,
    /// PID 1's control socket.
    #[arg(long, default_value = INIT_SOCKET)]
    init_socket: PathBuf,
    /// Where image uploads are spooled before containerd takes them.
    #[arg(long, default_value = "/var/lib/machined/spool")]
    spool_dir: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    {
        use tracing_subscriber::Layer as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        let log = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .without_time()
            .with_target(false)
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
        tracing_subscriber::registry()
            .with(log)
            .with(console::layer(console::DEVICE.into()))
            .init();
    }
    log_privileges();
    raise_open_file_limit();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let upgrader = Upgrader::new(UpgradePaths {
        state: args.state_dir.clone(),
        ..UpgradePaths::default()
    });
    let options = Options {
        listen: args.listen,
        state_dir: args.state_dir,
        spool_dir: args.spool_dir,
        ..Options::default()
    };
    let backend = Arc::new(InitSocket::new(args.init_socket));
    let result = runtime.block_on(async move {
        let bound = server::bind(options).await?.with_upgrader(upgrader);
        bound.serve(backend, shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %keelson_api::error_chain(&e), "the node API server failed");
            ExitCode::FAILURE
        }
    }
}

/// Logs the user and capabilities machined runs with, as `/proc/self/status` says them:
/// PID 1 starts it as its own user with three capabilities (ARCHITECTURE.md, "machined's
/// privileges"), so a call refused for want of privilege can be told from the log.
fn log_privileges() {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .unwrap_or("?")
            .to_owned()
    };
    tracing::info!(
        uid = %field("Uid:"),
        gid = %field("Gid:"),
        capabilities = %field("CapEff:"),
        no_new_privs = %field("NoNewPrivs:"),
        "running as"
    );
}

/// Raises the soft limit on open files to the hard one: every API connection, handshake
/// and follow stream holds a descriptor, and the default soft limit (1024) is lower than
/// what the listener's limits allow. Logs the limit it runs with.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit (RLIMIT_NOFILE)");
            return;
        }
    };
    if soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(
            error = %e,
            soft,
            hard,
            "cannot raise the open-file limit (RLIMIT_NOFILE) to its hard limit; keeping the soft one"
        );
        return;
    }
    tracing::info!(
        open_files = hard.max(soft),
        "open-file limit (RLIMIT_NOFILE)"
    );
}

/// Resolves on SIGTERM or SIGINT (PID 1 stops services with SIGTERM).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still ends on the default SIGTERM action.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping");
}
