//! Config generation: from a cluster name, an endpoint and the cluster secrets to one
//! control-plane config and one worker config, with merge patches applied and the results
//! validated.
//!
//! Nothing here touches the filesystem: [`generate`] returns the text of every file, so
//! that a caller writes all of them or none. A config that fails validation after its
//! patches is refused whole.
//!
//! Who carries what (see [`crate::schema`]): the control-plane config carries every CA
//! with its private key, the service-account key and the encryption key; the worker
//! config carries the Kubernetes and node API CA certificates without keys, the bootstrap
//! token and the API join token, and no private key at all.

use crate::diagnostics::{Diagnostic, Report};
use crate::patch::Patch;
use crate::pki::{CertAndKey, PkiError};
use crate::schema::{
    Api, CaPair, CertificatePem, Cluster, ConfigVersion, Endpoint, KubernetesVersion, Machine,
    MachineConfig, MachineType, PrivateKeyPem, SchemaError, Secrets, Swap, Token,
};
use crate::secrets::ClusterSecrets;
use crate::validate::Mode;
use crate::values::{self, ValueError};

/// The install disk written into generated configs unless another is asked for (the
/// first virtio disk, as in local QEMU clusters).
pub const DEFAULT_INSTALL_DISK: &str = "/dev/vda";

/// The file names `machinectl gen config` writes.
pub mod file_names {
    /// The control-plane machine config.
    pub const CONTROL_PLANE: &str = "controlplane.toml";
    /// The worker machine config.
    pub const WORKER: &str = "worker.toml";
    /// The cluster secrets.
    pub const SECRETS: &str = "secrets.toml";
    /// The machinectl client config.
    pub const CLIENT_CONFIG: &str = "machinectl.toml";
}

/// Errors from generating configs.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The cluster name is not an RFC 1123 label.
    #[error("cluster name {name:?}: {problem}")]
    ClusterName {
        /// The name given.
        name: String,
        /// What is wrong and what to do.
        problem: ValueError,
    },
    /// The endpoint is not `https://HOST:PORT`.
    #[error("endpoint {endpoint:?}: {problem}")]
    Endpoint {
        /// The endpoint given.
        endpoint: String,
        /// What is wrong and what to do.
        problem: ValueError,
    },
    /// The Kubernetes version is malformed or unsupported.
    #[error("--kubernetes-version {version:?}: {problem}")]
    KubernetesVersion {
        /// The version given.
        version: String,
        /// What is wrong and what to do.
        problem: ValueError,
    },
    /// An additional SAN is neither an IP address nor a DNS name.
    #[error("--additional-sans entry {san:?}: {problem}")]
    San {
        /// The SAN given.
        san: String,
        /// What is wrong and what to do.
        problem: ValueError,
    },
    /// A value from the secrets does not fit the machine config (never expected for
    /// secrets this crate generated or loaded).
    #[error("cluster secrets: `{key}` cannot go into the machine config: {problem}")]
    SecretValue {
        /// The key in the secrets file.
        key: &'static str,
        /// What is wrong.
        problem: ValueError,
    },
    /// Issuing a certificate failed.
    #[error("cannot issue a certificate")]
    Pki(#[source] PkiError),
    /// Serializing a config failed.
    #[error("cannot serialize the {file} config")]
    Serialize {
        /// Which file.
        file: &'static str,
        /// The serializer's error.
        #[source]
        source: SchemaError,
    },
    /// A generated value did not fit the schema (a bug).
    #[error("internal error while building the {file} config: {message}; please report this")]
    Internal {
        /// Which file.
        file: &'static str,
        /// What went wrong.
        message: String,
    },
    /// Serializing the secrets failed.
    #[error("cannot serialize the cluster secrets")]
    Secrets(#[source] crate::secrets::SecretsError),
    /// A config is invalid after its patches; nothing is written.
    #[error(
        "the generated {file} is invalid after applying the config patches, so nothing was written; the key paths below show what to fix in the patches"
    )]
    Invalid {
        /// Which file.
        file: &'static str,
        /// Every diagnostic (their lines refer to the patched config, which is not shown
        /// because it holds secrets).
        #[source]
        report: Report,
    },
}

/// What `machinectl gen config` was asked for.
#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    /// Cluster name (an RFC 1123 label).
    pub cluster_name: String,
    /// Control-plane endpoint, `https://HOST:PORT`.
    pub endpoint: String,
    /// Kubernetes version; [`values::DEFAULT_KUBERNETES_VERSION`] when unset.
    pub kubernetes_version: Option<String>,
    /// Extra subject alternative names for the node API (and API server) certificates.
    pub additional_sans: Vec<String>,
    /// The install disk; [`DEFAULT_INSTALL_DISK`] when unset. Written in metal mode only
    /// (cloud and container nodes are not installed).
    pub install_disk: Option<String>,
    /// Patches applied to both configs, in order.
    pub patches: Vec<Patch>,
    /// Patches applied to the control-plane config after `patches`.
    pub control_plane_patches: Vec<Patch>,
    /// Patches applied to the worker config after `patches`.
    pub worker_patches: Vec<Patch>,
    /// The mode the results are validated in.
    pub mode: Mode,
}

/// One generated machine config.
#[derive(Debug, Clone)]
pub struct GeneratedConfig {
    /// The file text (comment header + TOML).
    pub text: String,
    /// The config itself.
    pub config: MachineConfig,
    /// Warnings the validator reported (errors make generation fail).
    pub warnings: Vec<Diagnostic>,
}

/// Everything [`generate`] produces; the caller writes it.
#[derive(Debug, Clone)]
pub struct Generated {
    /// `controlplane.toml`.
    pub control_plane: GeneratedConfig,
    /// `worker.toml`.
    pub worker: GeneratedConfig,
    /// `secrets.toml`.
    pub secrets_text: String,
    /// The parsed endpoint.
    pub endpoint: Endpoint,
}

fn convert<T: std::str::FromStr<Err = ValueError>>(
    key: &'static str,
    value: &str,
) -> Result<T, GenerateError> {
    value
        .parse()
        .map_err(|problem| GenerateError::SecretValue { key, problem })
}

fn ca_pair(key: &'static str, ca: &CertAndKey, with_key: bool) -> Result<CaPair, GenerateError> {
    Ok(CaPair {
        cert: convert::<CertificatePem>(key, &ca.cert)?,
        key: if with_key {
            Some(convert::<PrivateKeyPem>(key, &ca.key)?)
        } else {
            None
        },
    })
}

/// The `[cluster.secrets]` table for a node of type `kind`: a control plane gets every
/// key, a worker only certificates and tokens.
pub fn node_secrets(secrets: &ClusterSecrets, kind: MachineType) -> Result<Secrets, GenerateError> {
    let cp = kind == MachineType::ControlPlane;
    Ok(Secrets {
        bootstrap_token: convert::<Token>("bootstrap_token", &secrets.bootstrap_token.to_string())?,
        api_join_token: convert::<Token>("api_join_token", &secrets.api_join_token.to_string())?,
        encryption_key: if cp {
            Some(convert(
                "encryption_key",
                secrets.encryption_key.as_base64(),
            )?)
        } else {
            None
        },
        service_account_key: if cp {
            Some(convert(
                "service_account_key",
                &secrets.service_account_key,
            )?)
        } else {
            None
        },
        kubernetes_ca: ca_pair("kubernetes_ca", &secrets.kubernetes_ca, cp)?,
        node_api_ca: ca_pair("node_api_ca", &secrets.node_api_ca, cp)?,
        etcd_ca: if cp {
            Some(ca_pair("etcd_ca", &secrets.etcd_ca, true)?)
        } else {
            None
        },
        front_proxy_ca: if cp {
            Some(ca_pair("front_proxy_ca", &secrets.front_proxy_ca, true)?)
        } else {
            None
        },
    })
}

/// The node API certificate SANs of a node of type `kind`: for control planes the
/// endpoint's host first, then the additional SANs, each once.
pub fn cert_sans(endpoint: &Endpoint, additional: &[String], kind: MachineType) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let first = (kind == MachineType::ControlPlane).then(|| endpoint.host.clone());
    for san in first.into_iter().chain(additional.iter().cloned()) {
        if !out.contains(&san) {
            out.push(san);
        }
    }
    out
}

/// The checked inputs shared by both configs.
struct Inputs {
    name: String,
    endpoint: Endpoint,
    version: KubernetesVersion,
    sans: Vec<String>,
    install_disk: String,
    mode: Mode,
}

fn check_inputs(options: &GenerateOptions) -> Result<Inputs, GenerateError> {
    values::check_dns_label(&options.cluster_name).map_err(|problem| {
        GenerateError::ClusterName {
            name: options.cluster_name.clone(),
            problem,
        }
    })?;
    let endpoint: Endpoint =
        options
            .endpoint
            .parse()
            .map_err(|problem| GenerateError::Endpoint {
                endpoint: options.endpoint.clone(),
                problem,
            })?;
    let version_text = options
        .kubernetes_version
        .as_deref()
        .unwrap_or(values::DEFAULT_KUBERNETES_VERSION);
    let version: KubernetesVersion =
        version_text
            .parse()
            .map_err(|problem| GenerateError::KubernetesVersion {
                version: version_text.to_owned(),
                problem,
            })?;
    let mut sans = Vec::new();
    for san in &options.additional_sans {
        let san = san.trim();
        if san.is_empty() {
            continue;
        }
        values::check_san(san).map_err(|problem| GenerateError::San {
            san: san.to_owned(),
            problem,
        })?;
        sans.push(san.to_owned());
    }
    Ok(Inputs {
        name: options.cluster_name.clone(),
        endpoint,
        version,
        sans,
        install_disk: options
            .install_disk
            .clone()
            .unwrap_or_else(|| DEFAULT_INSTALL_DISK.to_owned()),
        mode: options.mode,
    })
}

/// The unpatched config for a node of type `kind`.
fn base_config(
    inputs: &Inputs,
    secrets: &ClusterSecrets,
    kind: MachineType,
) -> Result<MachineConfig, GenerateError> {
    // Built as a table and deserialized, so that the schema's own defaults (pod and
    // service subnets, DNS domain) fill in what gen config does not choose.
    let internal = |message: String| GenerateError::Internal {
        file: file_name(kind),
        message,
    };
    let mut table = toml::Table::new();
    table.insert("name".into(), inputs.name.clone().into());
    table.insert("endpoint".into(), inputs.endpoint.to_string().into());
    table.insert(
        "kubernetes_version".into(),
        inputs.version.to_string().into(),
    );
    let node_secrets = node_secrets(secrets, kind)?;
    table.insert(
        "secrets".into(),
        toml::Value::try_from(&node_secrets).map_err(|e| internal(e.to_string()))?,
    );
    let cluster: Cluster = table
        .try_into()
        .map_err(|e: toml::de::Error| internal(e.to_string()))?;
    Ok(MachineConfig {
        version: ConfigVersion::V1,
        machine: Machine {
            kind,
            hostname: None,
            install_disk: (inputs.mode == Mode::Metal).then(|| inputs.install_disk.clone()),
            swap: Swap::Off,
            kernel_modules: Vec::new(),
            disabled_kernel_modules: Vec::new(),
            sysctls: Default::default(),
            time_servers: Vec::new(),
            network: Default::default(),
            kubelet: Default::default(),
            api: Api {
                cert_sans: cert_sans(&inputs.endpoint, &inputs.sans, kind),
            },
            registries: Default::default(),
            files: Vec::new(),
            services: Vec::new(),
        },
        cluster,
    })
}

fn file_name(kind: MachineType) -> &'static str {
    match kind {
        MachineType::ControlPlane => file_names::CONTROL_PLANE,
        MachineType::Worker => file_names::WORKER,
    }
}

fn header(kind: MachineType, cluster: &str) -> String {
    match kind {
        MachineType::ControlPlane => format!(
            "# Keelson machine config for the control-plane nodes of cluster {cluster:?},\n\
             # written by `machinectl gen config`. It holds every CA private key of the cluster:\n\
             # keep it private. Check it with `machinectl validate --config FILE`.\n"
        ),
        MachineType::Worker => format!(
            "# Keelson machine config for the worker nodes of cluster {cluster:?},\n\
             # written by `machinectl gen config`. It holds no private key, but its tokens let a\n\
             # machine join the cluster: keep it private. Check it with `machinectl validate --config FILE`.\n"
        ),
    }
}

/// Serializes `config`, applies `patches` in order, validates the result in `mode`.
fn patch_and_validate(
    config: &MachineConfig,
    file: &'static str,
    patches: &[&Patch],
    mode: Mode,
    cluster: &str,
) -> Result<GeneratedConfig, GenerateError> {
    let serialize = |c: &MachineConfig| {
        c.to_toml_string()
            .map_err(|source| GenerateError::Serialize { file, source })
    };
    let text = serialize(config)?;
    let text = if patches.is_empty() {
        text
    } else {
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e: toml::de::Error| GenerateError::Internal {
                file,
                message: e.to_string(),
            })?;
        for patch in patches {
            patch.apply(&mut table);
        }
        toml::to_string_pretty(&table).map_err(|e| GenerateError::Serialize {
            file,
            source: SchemaError::Serialize(e),
        })?
    };
    let checked = crate::check_str(&text, file, mode);
    let Some(config) = checked.config else {
        return Err(GenerateError::Invalid {
            file,
            report: Report {
                diagnostics: attribute(checked.diagnostics, patches, file),
            },
        });
    };
    let warnings = checked
        .diagnostics
        .into_iter()
        .filter(|d| !d.is_error())
        .collect();
    let body = serialize(&config)?;
    Ok(GeneratedConfig {
        text: format!("{}\n{body}", header(config.machine.kind, cluster)),
        config,
        warnings,
    })
}

/// Points each diagnostic of a patched config at the patch that set its key (the last
/// one that touches it), or at the generated file when no patch did. Line numbers refer
/// to text the user never sees, so they are dropped; the key path says where.
fn attribute(diagnostics: Vec<Diagnostic>, patches: &[&Patch], file: &str) -> Vec<Diagnostic> {
    diagnostics
        .into_iter()
        .map(|mut d| {
            d.location = None;
            d.file = match patches.iter().rev().find(|p| p.touches(&d.path)) {
                Some(p) => format!("{} (patching {file})", p.origin()),
                None => format!("{file} (as patched)"),
            };
            d
        })
        .collect()
}

/// Generates both machine configs and the secrets file text for `secrets`.
pub fn generate(
    options: &GenerateOptions,
    secrets: &ClusterSecrets,
) -> Result<Generated, GenerateError> {
    let inputs = check_inputs(options)?;
    let cp = base_config(&inputs, secrets, MachineType::ControlPlane)?;
    let worker = base_config(&inputs, secrets, MachineType::Worker)?;
    let cp_patches: Vec<&Patch> = options
        .patches
        .iter()
        .chain(&options.control_plane_patches)
        .collect();
    let worker_patches: Vec<&Patch> = options
        .patches
        .iter()
        .chain(&options.worker_patches)
        .collect();
    Ok(Generated {
        control_plane: patch_and_validate(
            &cp,
            file_names::CONTROL_PLANE,
            &cp_patches,
            options.mode,
            &inputs.name,
        )?,
        worker: patch_and_validate(
            &worker,
            file_names::WORKER,
            &worker_patches,
            options.mode,
            &inputs.name,
        )?,
        secrets_text: secrets.to_toml_string().map_err(GenerateError::Secrets)?,
        endpoint: inputs.endpoint,
    })
}
