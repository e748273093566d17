//! `machinectl gen config NAME ENDPOINT`: generate a cluster's machine configs, its
//! secrets and a client config, apply merge patches, validate, then write every file or
//! none.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Args;

use keelson_configs::generate::{self, GenerateError, GenerateOptions, file_names};
use keelson_configs::patch::Patch;
use keelson_configs::pki::{self, Role};
use keelson_configs::secrets::ClusterSecrets;

use super::ModeArg;
use keelson_api::atomic;
use keelson_api::clientconfig::{ClientConfig, Context};

/// Arguments of `machinectl gen config`.
#[derive(Debug, Args)]
#[command(after_long_help = PATCH_HELP)]
pub struct GenConfigArgs {
    /// Cluster name (an RFC 1123 label, e.g. `demo`); also the client config's context name.
    pub name: String,

    /// The control-plane endpoint: the Kubernetes API server or a load balancer in front of
    /// the control planes, as https://HOST:PORT (e.g. https://10.5.0.2:6443).
    pub endpoint: String,

    /// Directory to write controlplane.toml, worker.toml, secrets.toml and machinectl.toml
    /// into; created with mode 0700 if missing.
    #[arg(short, long, value_name = "DIR", default_value = ".")]
    pub output_dir: PathBuf,

    /// Reuse the cluster secrets (CAs, keys, tokens) from this secrets.toml instead of
    /// generating new ones, so the configs join an existing cluster.
    #[arg(long, value_name = "FILE")]
    pub with_secrets: Option<PathBuf>,

    /// Kubernetes version, e.g. 1.34.1 (default: the newest this release supports).
    #[arg(long, value_name = "VERSION")]
    pub kubernetes_version: Option<String>,

    /// Extra subject alternative names (IP addresses or DNS names) for the node API
    /// certificates, comma-separated, e.g. `api.example.com,10.5.0.100`.
    #[arg(long, value_name = "SAN,...", value_delimiter = ',')]
    pub additional_sans: Vec<String>,

    /// The disk to install Keelson on.
    #[arg(long, value_name = "DEVICE", default_value = generate::DEFAULT_INSTALL_DISK)]
    pub install_disk: String,

    /// A TOML merge patch applied to both configs (repeatable; applied in order).
    #[arg(long, value_name = "FILE")]
    pub config_patch: Vec<PathBuf>,

    /// A TOML merge patch applied to the control-plane config only, after --config-patch.
    #[arg(long, value_name = "FILE")]
    pub config_patch_control_plane: Vec<PathBuf>,

    /// A TOML merge patch applied to the worker config only, after --config-patch.
    #[arg(long, value_name = "FILE")]
    pub config_patch_worker: Vec<PathBuf>,

    /// The mode the generated configs are validated in.
    #[arg(long, value_enum, default_value = "metal")]
    pub mode: ModeArg,

    /// Overwrite files that already exist in the output directory.
    #[arg(long)]
    pub force: bool,
}

const PATCH_HELP: &str = "\
Config patches are TOML merge patches (RFC 7386 applied to TOML): tables merge key by key,
any other value (including arrays) replaces the value at the same key, and
`key = { \"$patch\" = \"delete\" }` removes a key. For example:

    [machine]
    hostname = \"cp-1\"
    time_servers = [\"192.0.2.123\"]
    [machine.kubelet]
    extra_args = { \"$patch\" = \"delete\" }

The patched configs are validated; if either is invalid, nothing is written.
Every file written holds secrets and gets mode 0600.";

fn load_patches(paths: &[PathBuf]) -> anyhow::Result<Vec<Patch>> {
    paths
        .iter()
        .map(|p| Patch::load(p).map_err(anyhow::Error::from))
        .collect()
}

/// Whether `a` and `b` name the same existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Runs `machinectl gen config`.
pub fn run(args: &GenConfigArgs) -> anyhow::Result<ExitCode> {
    let secrets = match &args.with_secrets {
        Some(path) => ClusterSecrets::load(path)?,
        None => ClusterSecrets::generate()?,
    };
    let options = GenerateOptions {
        cluster_name: args.name.clone(),
        endpoint: args.endpoint.clone(),
        kubernetes_version: args.kubernetes_version.clone(),
        additional_sans: args.additional_sans.clone(),
        install_disk: Some(args.install_disk.clone()),
        patches: load_patches(&args.config_patch)?,
        control_plane_patches: load_patches(&args.config_patch_control_plane)?,
        worker_patches: load_patches(&args.config_patch_worker)?,
        mode: args.mode.into(),
    };
    let generated = match generate::generate(&options, &secrets) {
        Ok(g) => g,
        Err(GenerateError::Invalid { file, report }) => {
            for d in &report.diagnostics {
                eprintln!("{d}");
            }
            bail!(
                "the generated {file} is invalid after applying the config patches ({} error(s) above), so nothing was written; the key paths show what to fix in the patches",
                report.errors().count()
            );
        }
        Err(e) => return Err(e.into()),
    };

    let admin = pki::issue_api_client(&secrets.node_api_ca, "admin", Role::Admin)
        .context("cannot issue the admin client certificate for machinectl.toml")?;
    let host = generated.endpoint.host.clone();
    let client = ClientConfig::single(
        &args.name,
        Context {
            endpoints: vec![host.clone()],
            nodes: vec![host],
            ca: secrets.node_api_ca.cert.clone(),
            cert: admin.cert,
            key: admin.key,
        },
    );
    let client_text = client.to_toml_string()?;

    let dir = &args.output_dir;
    let secrets_path = dir.join(file_names::SECRETS);
    // Reusing the secrets file that is also the output: it is already there, unchanged.
    let keep_secrets = args
        .with_secrets
        .as_deref()
        .is_some_and(|p| same_file(p, &secrets_path));
    let mut files: Vec<(PathBuf, &str)> = vec![
        (
            dir.join(file_names::CONTROL_PLANE),
            generated.control_plane.text.as_str(),
        ),
        (dir.join(file_names::WORKER), generated.worker.text.as_str()),
        (dir.join(file_names::CLIENT_CONFIG), client_text.as_str()),
    ];
    if !keep_secrets {
        files.push((secrets_path, generated.secrets_text.as_str()));
    }

    if !args.force {
        let existing: Vec<String> = files
            .iter()
            .filter(|(p, _)| p.symlink_metadata().is_ok())
            .map(|(p, _)| p.display().to_string())
            .collect();
        if !existing.is_empty() {
            bail!(
                "refusing to overwrite {}; pass --force to replace them, or choose another --output-dir",
                existing.join(", ")
            );
        }
    }

    for warning in generated
        .control_plane
        .warnings
        .iter()
        .chain(&generated.worker.warnings)
    {
        eprintln!("{warning}");
    }
    atomic::create_private_dir(dir)?;
    for (path, text) in &files {
        atomic::write(path, text.as_bytes(), atomic::PRIVATE_FILE_MODE)?;
        println!("wrote {}", path.display());
    }
    if keep_secrets {
        println!("kept {}", dir.join(file_names::SECRETS).display());
    }
    Ok(ExitCode::SUCCESS)
}
