//! The `machinectl` client config: named contexts, like a kubeconfig or a talosconfig.
//!
//! ```toml
//! context = "demo"                 # the current context
//!
//! [contexts.demo]
//! endpoints = ["10.5.0.2"]         # node API addresses to connect to (host or host:port)
//! nodes = ["10.5.0.2"]             # the nodes commands act on (default: the endpoints)
//! ca = """-----BEGIN CERTIFICATE-----..."""      # the node API CA
//! cert = """-----BEGIN CERTIFICATE-----..."""    # the client certificate (role in O=)
//! key = """-----BEGIN PRIVATE KEY-----..."""     # its private key
//! ```
//!
//! Where the file is: the `--machineconfig` flag, else the `MACHINECONFIG` environment
//! variable, else `~/.config/keelson/machinectl.toml` (see [`resolve_path`]). The file holds
//! a private key, so it is written with mode 0600.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::atomic;

/// The environment variable naming the client config file.
pub const ENV_VAR: &str = "MACHINECONFIG";
/// The client config's path under the home directory.
pub const DEFAULT_RELATIVE_PATH: &str = ".config/keelson/machinectl.toml";
/// The node API's TCP port, used when an endpoint has none.
pub const DEFAULT_API_PORT: u16 = 50000;

/// Errors from finding, loading, checking or saving the client config.
#[derive(Debug, thiserror::Error)]
pub enum ClientConfigError {
    /// No path was given and there is no home directory to look in.
    #[error(
        "cannot find the machinectl client config: neither --machineconfig nor {ENV_VAR} is set, and HOME is not set; pass --machineconfig FILE"
    )]
    NoPath,
    /// The file could not be read.
    #[error(
        "cannot read the machinectl client config {path}; create one with `machinectl gen config` or pass --machineconfig FILE"
    )]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not UTF-8.
    #[error("machinectl client config {path} is not UTF-8 text (invalid byte at offset {offset})")]
    NotUtf8 {
        /// The file.
        path: String,
        /// Byte offset of the first invalid byte.
        offset: usize,
    },
    /// The file is not TOML of the expected shape.
    #[error(
        "{path}:{line}:{column}: {message}; compare with the machinectl.toml that `machinectl gen config` writes"
    )]
    Syntax {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the TOML parser reported.
        message: String,
    },
    /// A value is wrong.
    #[error("{path}: key `{key}`: {problem}")]
    Invalid {
        /// The file.
        path: String,
        /// The dotted key path.
        key: String,
        /// What is wrong and what to do.
        problem: String,
    },
    /// No current context is set.
    #[error(
        "the machinectl client config has no current context; set `context = \"NAME\"` to one of its [contexts.NAME] tables"
    )]
    NoContext,
    /// Serializing failed.
    #[error("cannot serialize the machinectl client config")]
    Serialize(#[source] toml::ser::Error),
    /// Writing the file failed.
    #[error("cannot save the machinectl client config")]
    Write(#[source] atomic::WriteError),
}

/// The whole client config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The name of the current context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// The contexts by name.
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// How to reach one cluster's nodes, and as whom.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// Node API addresses to connect to: `host` or `host:port` (port 50000 by default).
    pub endpoints: Vec<String>,
    /// The nodes commands act on, through the endpoints; empty means the endpoints.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// The node API CA certificate (PEM), which the nodes' server certificates chain to.
    pub ca: String,
    /// The client certificate (PEM); its Organization carries the role.
    pub cert: String,
    /// The client private key (PEM).
    pub key: String,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("endpoints", &self.endpoints)
            .field("nodes", &self.nodes)
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// How a context was added by [`ClientConfig::merge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// Its name in the merged-in config.
    pub from: String,
    /// Its name now (different when the name was taken).
    pub to: String,
}

/// Chooses the client config path: the flag, else `$MACHINECONFIG`, else
/// `$HOME/.config/keelson/machinectl.toml`. Empty values count as unset.
pub fn resolve_path(
    flag: Option<&Path>,
    env: Option<OsString>,
    home: Option<OsString>,
) -> Result<PathBuf, ClientConfigError> {
    if let Some(p) = flag.filter(|p| !p.as_os_str().is_empty()) {
        return Ok(p.to_path_buf());
    }
    if let Some(e) = env.filter(|e| !e.is_empty()) {
        return Ok(PathBuf::from(e));
    }
    match home.filter(|h| !h.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(DEFAULT_RELATIVE_PATH)),
        None => Err(ClientConfigError::NoPath),
    }
}

/// [`resolve_path`] with this process's environment.
pub fn default_path(flag: Option<&Path>) -> Result<PathBuf, ClientConfigError> {
    resolve_path(flag, std::env::var_os(ENV_VAR), std::env::var_os("HOME"))
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = text.get(..offset).unwrap_or_default();
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (before.matches('\n').count() + 1, column)
}

const HEADER: &str = "\
# machinectl client config, written by machinectl. It holds a client private key: keep it
# private (mode 0600).
";

impl ClientConfig {
    /// A config with one context, which is current.
    pub fn single(name: &str, context: Context) -> ClientConfig {
        ClientConfig {
            context: Some(name.to_owned()),
            contexts: BTreeMap::from([(name.to_owned(), context)]),
        }
    }

    /// Reads and checks a client config file.
    pub fn load(path: &Path) -> Result<ClientConfig, ClientConfigError> {
        let display = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| ClientConfigError::Read {
            path: display.clone(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|e| ClientConfigError::NotUtf8 {
            path: display.clone(),
            offset: e.utf8_error().valid_up_to(),
        })?;
        ClientConfig::from_toml_str(&text, &display)
    }

    /// Parses and checks the text of a client config; `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<ClientConfig, ClientConfigError> {
        let config: ClientConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = line_column(text, e.span().map_or(0, |s| s.start));
            ClientConfigError::Syntax {
                path: origin.to_owned(),
                line,
                column,
                message: e.message().trim_end().to_owned(),
            }
        })?;
        config.check(origin)?;
        Ok(config)
    }

    /// Checks the references and PEM labels inside the config.
    pub fn check(&self, origin: &str) -> Result<(), ClientConfigError> {
        let invalid = |key: String, problem: String| ClientConfigError::Invalid {
            path: origin.to_owned(),
            key,
            problem,
        };
        if let Some(current) = &self.context
            && !self.contexts.contains_key(current)
        {
            let known: Vec<&str> = self.contexts.keys().map(String::as_str).collect();
            return Err(invalid(
                "context".into(),
                format!(
                    "names context {current:?}, which is not defined; defined contexts: [{}]",
                    known.join(", ")
                ),
            ));
        }
        for (name, ctx) in &self.contexts {
            let key = |k: &str| format!("contexts.{name}.{k}");
            if ctx.endpoints.is_empty() {
                return Err(invalid(
                    key("endpoints"),
                    "is empty; list at least one node API address, e.g. [\"10.5.0.2\"]".into(),
                ));
            }
            for (field, value, label) in [
                ("ca", &ctx.ca, "CERTIFICATE"),
                ("cert", &ctx.cert, "CERTIFICATE"),
                ("key", &ctx.key, "PRIVATE KEY"),
            ] {
                if !value
                    .trim_start()
                    .starts_with(&format!("-----BEGIN {label}-----"))
                {
                    return Err(invalid(
                        key(field),
                        format!(
                            "is not a PEM `{label}` block; copy it from the machinectl.toml that `machinectl gen config` wrote"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The current context and its name.
    pub fn current(&self) -> Result<(&str, &Context), ClientConfigError> {
        let name = self
            .context
            .as_deref()
            .ok_or(ClientConfigError::NoContext)?;
        let ctx = self
            .contexts
            .get(name)
            .ok_or(ClientConfigError::NoContext)?;
        Ok((name, ctx))
    }

    /// Adds every context of `other`. A name already taken gets the first free suffix
    /// `-1`, `-2`, ...; the current context becomes `other`'s current context (as renamed).
    pub fn merge(&mut self, other: ClientConfig) -> Vec<Merged> {
        let mut merged = Vec::new();
        let mut renamed_current = None;
        for (name, ctx) in other.contexts {
            let mut to = name.clone();
            let mut n = 1;
            while self.contexts.contains_key(&to) {
                to = format!("{name}-{n}");
                n += 1;
            }
            if other.context.as_deref() == Some(name.as_str()) {
                renamed_current = Some(to.clone());
            }
            self.contexts.insert(to.clone(), ctx);
            merged.push(Merged { from: name, to });
        }
        if renamed_current.is_some() {
            self.context = renamed_current;
        }
        merged
    }

    /// The config as file text (with a comment header).
    pub fn to_toml_string(&self) -> Result<String, ClientConfigError> {
        let body = toml::to_string(self).map_err(ClientConfigError::Serialize)?;
        Ok(format!("{HEADER}\n{body}"))
    }

    /// Writes the config atomically with mode 0600, creating its directory (0700) if needed.
    pub fn save(&self, path: &Path) -> Result<(), ClientConfigError> {
        let text = self.to_toml_string()?;
        atomic::write(path, text.as_bytes(), atomic::PRIVATE_FILE_MODE)
            .map_err(ClientConfigError::Write)
    }
}

impl Context {
    /// The endpoints as `host:port`, adding the default port where none is given.
    pub fn endpoint_addresses(&self) -> Vec<String> {
        self.endpoints
            .iter()
            .map(|e| with_default_port(e, DEFAULT_API_PORT))
            .collect()
    }

    /// The nodes to act on: `nodes`, or the endpoints' hosts when `nodes` is empty.
    pub fn target_nodes(&self) -> Vec<String> {
        if self.nodes.is_empty() {
            self.endpoints
                .iter()
                .map(|e| host_of(e).to_owned())
                .collect()
        } else {
            self.nodes.clone()
        }
    }
}

/// `host` with `:port` appended when it has no port (IPv6 addresses get brackets).
pub fn with_default_port(endpoint: &str, port: u16) -> String {
    if endpoint.parse::<std::net::SocketAddr>().is_ok() {
        return endpoint.to_owned();
    }
    if let Ok(ip) = endpoint.parse::<std::net::Ipv6Addr>() {
        return format!("[{ip}]:{port}");
    }
    if endpoint.starts_with('[')
        || endpoint
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        return endpoint.to_owned();
    }
    format!("{endpoint}:{port}")
}

/// The host part of `host`, `host:port`, `[v6]:port` or a bare IPv6 address.
pub fn host_of(endpoint: &str) -> &str {
    if let Some(rest) = endpoint.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    if endpoint.parse::<std::net::Ipv6Addr>().is_ok() {
        return endpoint;
    }
    match endpoint.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => endpoint,
    }
}
