//! `apply-config`: validate on the node, diff, decide what can change live, apply through
//! PID 1, persist to STATE atomically, and the `try` mode's automatic revert.
//!
//! Rules that always hold:
//! - a config is validated ([`keelson_configs::check_bytes`]) before anything changes; a
//!   refused config leaves the node and STATE untouched; one over
//!   [`MAX_CONFIG_BYTES`] (1 MiB, PID 1's limit at boot too) is refused before it is parsed;
//! - one apply at a time: a second one while the first runs gets ABORTED;
//! - STATE is written atomically (write, fsync, rename, fsync dir);
//! - `no-reboot` changes nothing unless every change can be applied live, and says which
//!   keys cannot and why;
//! - `try` applies live without persisting and reverts after its timeout unless
//!   `ConfirmConfig` comes first; nothing else is applied while it waits.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keelson_configs::validate::too_big;
use keelson_configs::{MAX_CONFIG_BYTES, MachineConfig, Mode, Severity};
use sha2_lite::short_digest;

use crate::backend::{LivePart, NodeBackend, Power};
use crate::server::state::StateStore;
use keelson_api::api::proto::ApplyMode;

/// How long `try` waits for a confirmation when the request gives no timeout.
pub const DEFAULT_TRY_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest `try` timeout accepted.
pub const MAX_TRY_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Why an apply was refused or failed; each maps to one gRPC status code.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Another apply holds the lock.
    #[error("another apply-config is in progress on this node; try again when it has finished")]
    Busy,
    /// The config failed validation: the validator's report.
    #[error("{0}")]
    Invalid(String),
    /// The request itself is malformed (unknown mode, timeout out of range).
    #[error("{0}")]
    BadRequest(String),
    /// The request cannot be carried out in the node's present state.
    #[error("{0}")]
    Precondition(String),
    /// Applying or persisting failed; what was done about it is in the message.
    #[error("{0}")]
    Failed(String),
}

/// Where a changed key can be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Where {
    /// PID 1 applies this part live.
    Live(LivePart),
    /// machined applies it itself (its own server certificate).
    Machined,
    /// Only a reboot applies it; why.
    Reboot(&'static str),
}

/// Which part of the node a changed key belongs to. Keys are dotted paths from
/// [`changed_keys`]; the first matching prefix wins.
pub fn classify(key: &str) -> Where {
    const TABLE: &[(&str, Where)] = &[
        ("machine.sysctls", Where::Live(LivePart::Sysctls)),
        (
            "machine.kernel_modules",
            Where::Live(LivePart::KernelModules),
        ),
        (
            "machine.disabled_kernel_modules",
            Where::Live(LivePart::KernelModules),
        ),
        ("machine.files", Where::Live(LivePart::Files)),
        ("machine.hostname", Where::Live(LivePart::Hostname)),
        ("machine.kubelet", Where::Live(LivePart::Kubelet)),
        ("machine.network", Where::Live(LivePart::Network)),
        ("machine.time_servers", Where::Live(LivePart::TimeServers)),
        ("machine.api", Where::Machined),
        (
            "machine.type",
            Where::Reboot(
                "a node changes between control plane and worker only at boot: its services and secrets differ",
            ),
        ),
        (
            "machine.install_disk",
            Where::Reboot("the install disk is used only when the node installs itself"),
        ),
        ("machine.swap", Where::Reboot("swap is set up at boot")),
        (
            "machine.services",
            Where::Reboot(
                "extension services are registered with PID 1's supervisor at boot, after the built-in ones",
            ),
        ),
        (
            "cluster.secrets",
            Where::Reboot(
                "the cluster secrets (CAs, keys, tokens) are read at boot by every service that uses them",
            ),
        ),
        (
            "cluster",
            Where::Reboot(
                "cluster settings are read at boot by etcd, the kubelet and the control plane",
            ),
        ),
        (
            "version",
            Where::Reboot("the config format version is read at boot"),
        ),
    ];
    TABLE
        .iter()
        .find(|(prefix, _)| {
            key == *prefix
                || key
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        })
        .map(|(_, w)| w.clone())
        .unwrap_or(Where::Reboot("this setting is read at boot"))
}

fn to_value(config: &MachineConfig) -> toml::Value {
    toml::Value::try_from(config).unwrap_or(toml::Value::Table(toml::Table::new()))
}

/// The dotted keys whose values differ between two configs. Tables are compared key by
/// key; arrays of tables element by element (`machine.files[0]`); other arrays whole.
pub fn changed_keys(old: Option<&MachineConfig>, new: &MachineConfig) -> Vec<String> {
    let old = old.map(to_value);
    let new = to_value(new);
    let mut out = Vec::new();
    diff_values("", old.as_ref(), Some(&new), &mut out);
    out
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn diff_values(
    path: &str,
    old: Option<&toml::Value>,
    new: Option<&toml::Value>,
    out: &mut Vec<String>,
) {
    match (old, new) {
        (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                diff_values(&join(path, k), a.get(k), b.get(k), out);
            }
        }
        (Some(toml::Value::Array(a)), Some(toml::Value::Array(b)))
            if a.iter().chain(b).all(toml::Value::is_table) =>
        {
            for i in 0..a.len().max(b.len()) {
                diff_values(&format!("{path}[{i}]"), a.get(i), b.get(i), out);
            }
        }
        (Some(a), Some(b)) if a == b => {}
        (None, None) => {}
        _ => out.push(path.to_owned()),
    }
}

/// Keys whose values are secrets: shown in diffs only as a short digest.
const SECRET_KEYS: [&str; 6] = [
    "key",
    "service_account_key",
    "encryption_key",
    "bootstrap_token",
    "api_join_token",
    "token",
];

fn redact(value: &mut toml::Value) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                if SECRET_KEYS.contains(&k.as_str())
                    && let toml::Value::String(s) = v
                {
                    *s = format!("<secret {}>", short_digest(s.as_bytes()));
                } else {
                    redact(v);
                }
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}

/// The config as TOML with its secrets replaced by digests, for diffs.
pub fn redacted_text(config: &MachineConfig) -> String {
    let mut value = to_value(config);
    redact(&mut value);
    toml::to_string_pretty(&value).unwrap_or_default()
}

/// A unified diff from `old` (none: an empty file) to `new`, secrets redacted.
pub fn diff(old: Option<&MachineConfig>, new: &MachineConfig) -> String {
    let a = old.map(redacted_text).unwrap_or_default();
    let b = redacted_text(new);
    similar::TextDiff::from_lines(&a, &b)
        .unified_diff()
        .context_radius(3)
        .header("running", "new")
        .to_string()
}

/// The outcome of an apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The mode used (auto resolved).
    pub mode: ApplyMode,
    /// The diff from the running config.
    pub diff: String,
    /// What happened.
    pub messages: Vec<String>,
    /// Validator warnings.
    pub warnings: Vec<String>,
}

/// A request to apply.
#[derive(Debug, Clone)]
pub struct ApplyRequest {
    /// The config bytes.
    pub config: Vec<u8>,
    /// The mode.
    pub mode: ApplyMode,
    /// `try`'s timeout.
    pub try_timeout: Option<Duration>,
    /// Validate and diff only.
    pub dry_run: bool,
}

#[derive(Debug, Clone)]
struct PendingTry {
    previous: Option<(MachineConfig, String)>,
    parts: Vec<LivePart>,
    deadline: Instant,
    generation: u64,
}

#[derive(Debug, Default)]
struct Running {
    /// The config in effect and its text as it was sent.
    config: Option<(MachineConfig, String)>,
    pending: Option<PendingTry>,
    generation: u64,
}

/// What machined does itself when `machine.api` changes (reissue its certificate).
pub type ApiHook = Arc<dyn Fn(&MachineConfig) -> Result<String, String> + Send + Sync>;

/// The apply-config state machine of one node.
pub struct Applier {
    lock: tokio::sync::Mutex<()>,
    running: Mutex<Running>,
    store: StateStore,
    backend: Arc<dyn NodeBackend>,
    mode: Mode,
    api_hook: Option<ApiHook>,
    kubelet_hook: Option<crate::kubernetes::KubeNode>,
}

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("store", &self.store)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> impl Future<Output = Result<T, ApplyError>> {
    let task = tokio::task::spawn_blocking(f);
    async move {
        task.await
            .map_err(|e| ApplyError::Failed(format!("internal error: {e}")))
    }
}

impl Applier {
    /// An applier over STATE, with the config now in effect (none in maintenance mode).
    pub fn new(
        store: StateStore,
        backend: Arc<dyn NodeBackend>,
        mode: Mode,
        current: Option<(MachineConfig, String)>,
        api_hook: Option<ApiHook>,
    ) -> Applier {
        Applier {
            lock: tokio::sync::Mutex::new(()),
            running: Mutex::new(Running {
                config: current,
                ..Running::default()
            }),
            store,
            backend,
            mode,
            api_hook,
            kubelet_hook: None,
        }
    }

    /// With the Kubernetes controller, which a live change of `machine.kubelet` reaches
    /// (its flags and configuration rewritten, the kubelet restarted).
    pub fn with_kubelet_hook(mut self, kube: crate::kubernetes::KubeNode) -> Applier {
        self.kubelet_hook = Some(kube);
        self
    }

    /// The config in effect.
    pub fn current(&self) -> Option<MachineConfig> {
        self.running
            .lock()
            .ok()
            .and_then(|r| r.config.as_ref().map(|(c, _)| c.clone()))
    }

    /// Seconds left before a `try` config reverts, if one waits.
    pub fn pending_try(&self) -> Option<Duration> {
        self.running.lock().ok().and_then(|r| {
            r.pending
                .as_ref()
                .map(|p| p.deadline.saturating_duration_since(Instant::now()))
        })
    }

    fn validate(&self, bytes: &[u8]) -> Result<(MachineConfig, String, Vec<String>), ApplyError> {
        // PID 1's limit at boot too: a config applied here is never refused there for its size.
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(ApplyError::Invalid(format!(
                "the node refused the config; nothing was changed: {}; a machine config is a \
                 few kilobytes: move large content out of machine.files",
                too_big(bytes.len())
            )));
        }
        let checked = keelson_configs::check_bytes(bytes, "config", self.mode);
        let warnings: Vec<String> = checked
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Warning)
            .map(ToString::to_string)
            .collect();
        match checked.into_result() {
            Ok(config) => {
                let text = String::from_utf8_lossy(bytes).into_owned();
                Ok((config, text, warnings))
            }
            Err(report) => Err(ApplyError::Invalid(format!(
                "the node refused the config; nothing was changed.\n{report}"
            ))),
        }
    }

    /// Applies the first config of a node in maintenance mode: validate, write STATE,
    /// tell init. The caller then restarts the API in mutual-TLS mode.
    pub async fn install_first(&self, req: ApplyRequest) -> Result<Applied, ApplyError> {
        let _guard = self.lock.try_lock().map_err(|_| ApplyError::Busy)?;
        let (config, text, warnings) = self.validate(&req.config)?;
        if self.store.has_config() {
            return Err(ApplyError::Precondition(
                "the node already has a config; connect with its client certificate instead of --insecure".into(),
            ));
        }
        let diff = diff(None, &config);
        if req.dry_run {
            return Ok(Applied {
                mode: req.mode,
                diff,
                messages: vec!["dry run: the config is valid; nothing was changed".into()],
                warnings,
            });
        }
        let store = self.store.clone();
        let t = text.clone();
        blocking(move || store.write_config(&t))
            .await?
            .map_err(|e| ApplyError::Failed(keelson_api::error_chain(&e)))?;
        let mut messages = vec![
            format!("config written to {}", self.store.config_path().display()),
            "the node API now requires client certificates (mutual TLS); use the context from `machinectl gen config`".into(),
        ];
        let backend = self.backend.clone();
        match blocking(move || backend.config_installed()).await? {
            Ok(m) if !m.is_empty() => messages.push(m),
            Ok(_) => {}
            Err(e) => messages.push(format!(
                "init was not told about the new config ({e}); it takes effect at the next boot"
            )),
        }
        if let Ok(mut r) = self.running.lock() {
            r.config = Some((config, text));
        }
        Ok(Applied {
            mode: req.mode,
            diff,
            messages,
            warnings,
        })
    }

    /// Applies a config to a configured node.
    pub async fn apply(self: &Arc<Self>, req: ApplyRequest) -> Result<Applied, ApplyError> {
        let _guard = self.lock.try_lock().map_err(|_| ApplyError::Busy)?;
        let (new, text, warnings) = self.validate(&req.config)?;
        let (old, pending) = {
            let r = self
                .running
                .lock()
                .map_err(|_| ApplyError::Failed("internal error: state lock poisoned".into()))?;
            (r.config.clone(), r.pending.clone())
        };
        if let Some(p) = &pending {
            let left = p
                .deadline
                .saturating_duration_since(Instant::now())
                .as_secs();
            return Err(ApplyError::Precondition(format!(
                "a config applied with --mode try is waiting for confirmation (it reverts in {left} s): confirm it with `machinectl apply-config --confirm` or wait for the revert"
            )));
        }
        let old_config = old.as_ref().map(|(c, _)| c);
        let keys = changed_keys(old_config, &new);
        let diff = diff(old_config, &new);
        let mut parts: Vec<LivePart> = Vec::new();
        let mut machined_part = false;
        let mut need_reboot: Vec<(String, &'static str)> = Vec::new();
        for key in &keys {
            match classify(key) {
                Where::Live(p) => {
                    if !parts.contains(&p) {
                        parts.push(p);
                    }
                }
                Where::Machined => machined_part = true,
                Where::Reboot(why) => need_reboot.push((key.clone(), why)),
            }
        }
        parts.sort();
        let mode = match req.mode {
            ApplyMode::Unspecified | ApplyMode::Auto => {
                if need_reboot.is_empty() {
                    ApplyMode::NoReboot
                } else {
                    ApplyMode::Reboot
                }
            }
            m => m,
        };
        let refusal = |what: &str| {
            let mut msg = format!(
                "--mode {what} refused: these changes cannot be applied without a reboot; nothing was changed:"
            );
            for (key, why) in &need_reboot {
                msg.push_str(&format!("\n  {key}: {why}"));
            }
            msg.push_str("\nuse --mode reboot (or auto) to apply them with a reboot, or --mode staged for the next boot");
            msg
        };
        if matches!(mode, ApplyMode::NoReboot | ApplyMode::Try) && !need_reboot.is_empty() {
            return Err(ApplyError::Precondition(refusal(
                keelson_api::api::apply_mode_name(mode),
            )));
        }
        let try_timeout = req.try_timeout.unwrap_or(DEFAULT_TRY_TIMEOUT);
        if mode == ApplyMode::Try && (try_timeout.is_zero() || try_timeout > MAX_TRY_TIMEOUT) {
            return Err(ApplyError::BadRequest(format!(
                "--timeout must be between 1 s and {} s",
                MAX_TRY_TIMEOUT.as_secs()
            )));
        }
        let mut messages = Vec::new();
        if req.dry_run {
            messages.push(format!(
                "dry run (--mode {}): nothing was changed",
                keelson_api::api::apply_mode_name(mode)
            ));
            if keys.is_empty() {
                messages.push("no changes: the node already runs this config".into());
            }
            match mode {
                ApplyMode::NoReboot | ApplyMode::Try => {
                    for p in &parts {
                        messages.push(format!("would apply {} live", p.key()));
                    }
                }
                ApplyMode::Reboot => messages.push("would write STATE and reboot".into()),
                ApplyMode::Staged => {
                    messages.push("would stage the config for the next boot".into())
                }
                _ => {}
            }
            return Ok(Applied {
                mode,
                diff,
                messages,
                warnings,
            });
        }
        match mode {
            ApplyMode::NoReboot => {
                if keys.is_empty() {
                    messages.push("no changes: the node already runs this config".into());
                } else {
                    messages.extend(self.apply_live(&parts, &text, old.as_ref()).await?);
                    self.persist(&text, &parts, old.as_ref()).await?;
                    messages.push("config written to STATE".into());
                    if machined_part {
                        messages.push(self.run_api_hook(&new));
                    }
                    if parts.contains(&LivePart::Kubelet) {
                        match &self.kubelet_hook {
                            Some(kube) => messages.push(
                                kube.reconfigure(&new)
                                    .await
                                    .unwrap_or_else(|e| format!("machine.kubelet: {e}")),
                            ),
                            None => messages.push(
                                "machine.kubelet: no Kubernetes controller runs here; it takes effect when machined restarts".into(),
                            ),
                        }
                    }
                }
                self.set_running(new, text);
            }
            ApplyMode::Reboot => {
                let store = self.store.clone();
                let t = text.clone();
                blocking(move || store.write_config(&t))
                    .await?
                    .map_err(|e| {
                        ApplyError::Failed(format!(
                            "{}; nothing was changed",
                            keelson_api::error_chain(&e)
                        ))
                    })?;
                messages.push("config written to STATE".into());
                let backend = self.backend.clone();
                let m = blocking(move || backend.power(Power::Reboot))
                    .await?
                    .map_err(|e| {
                        ApplyError::Failed(format!(
                            "the config is in STATE, but the reboot was refused: {e}; reboot the node to apply it"
                        ))
                    })?;
                messages.push(if m.is_empty() { "rebooting".into() } else { m });
            }
            ApplyMode::Staged => {
                let store = self.store.clone();
                let t = text.clone();
                blocking(move || store.write_staged(&t))
                    .await?
                    .map_err(|e| {
                        ApplyError::Failed(format!(
                            "{}; nothing was changed",
                            keelson_api::error_chain(&e)
                        ))
                    })?;
                messages.push(format!(
                    "config staged in {}: it takes effect at the next boot",
                    self.store.staged_path().display()
                ));
            }
            ApplyMode::Try => {
                messages.extend(self.apply_live(&parts, &text, old.as_ref()).await?);
                let generation = {
                    let mut r = self.running.lock().map_err(|_| {
                        ApplyError::Failed("internal error: state lock poisoned".into())
                    })?;
                    r.generation += 1;
                    r.pending = Some(PendingTry {
                        previous: old.clone(),
                        parts: parts.clone(),
                        deadline: Instant::now() + try_timeout,
                        generation: r.generation,
                    });
                    r.config = Some((new, text));
                    r.generation
                };
                let me = Arc::clone(self);
                tokio::spawn(async move {
                    tokio::time::sleep(try_timeout).await;
                    me.revert_try(generation).await;
                });
                messages.push(format!(
                    "applied for a try: it reverts in {} s unless `machinectl apply-config --confirm` comes first (not written to STATE)",
                    try_timeout.as_secs()
                ));
            }
            ApplyMode::Unspecified | ApplyMode::Auto => {}
        }
        Ok(Applied {
            mode,
            diff,
            messages,
            warnings,
        })
    }

    fn set_running(&self, config: MachineConfig, text: String) {
        if let Ok(mut r) = self.running.lock() {
            r.config = Some((config, text));
        }
    }

    fn run_api_hook(&self, config: &MachineConfig) -> String {
        match &self.api_hook {
            Some(hook) => match hook(config) {
                Ok(m) => m,
                Err(e) => format!("machine.api: {e}; it takes effect when machined restarts"),
            },
            None => "machine.api takes effect when machined restarts".into(),
        }
    }

    async fn apply_live(
        &self,
        parts: &[LivePart],
        text: &str,
        old: Option<&(MachineConfig, String)>,
    ) -> Result<Vec<String>, ApplyError> {
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        let backend = self.backend.clone();
        let (p, t) = (parts.to_vec(), text.to_owned());
        match blocking(move || backend.apply_live(&p, &t)).await? {
            Ok(messages) => Ok(messages),
            Err(e) => {
                let reverted = self.revert_live(parts, old).await;
                Err(ApplyError::Failed(format!(
                    "init could not apply the config live: {e}; {reverted}; STATE was not changed"
                )))
            }
        }
    }

    async fn revert_live(
        &self,
        parts: &[LivePart],
        old: Option<&(MachineConfig, String)>,
    ) -> String {
        let Some((_, old_text)) = old else {
            return "there was no previous config to revert to".into();
        };
        let backend = self.backend.clone();
        let (p, t) = (parts.to_vec(), old_text.clone());
        match blocking(move || backend.apply_live(&p, &t)).await {
            Ok(Ok(_)) => "the previous config was re-applied".into(),
            Ok(Err(e)) => format!("re-applying the previous config failed too ({e})"),
            Err(e) => format!("re-applying the previous config failed too ({e})"),
        }
    }

    async fn persist(
        &self,
        text: &str,
        parts: &[LivePart],
        old: Option<&(MachineConfig, String)>,
    ) -> Result<(), ApplyError> {
        let store = self.store.clone();
        let t = text.to_owned();
        match blocking(move || store.write_config(&t)).await? {
            Ok(()) => Ok(()),
            Err(e) => {
                let reverted = self.revert_live(parts, old).await;
                Err(ApplyError::Failed(format!(
                    "the config was applied live but could not be written to STATE: {}; {reverted}",
                    keelson_api::error_chain(&e)
                )))
            }
        }
    }

    async fn revert_try(&self, generation: u64) {
        let _guard = self.lock.lock().await;
        let pending = {
            let Ok(mut r) = self.running.lock() else {
                return;
            };
            match &r.pending {
                Some(p) if p.generation == generation => {}
                _ => return,
            }
            let pending = r.pending.take();
            if let Some(p) = &pending {
                r.config = p.previous.clone();
            }
            pending
        };
        let Some(p) = pending else { return };
        let outcome = self.revert_live(&p.parts, p.previous.as_ref()).await;
        tracing::warn!(
            outcome = %outcome,
            "apply-config --mode try was not confirmed in time"
        );
    }

    /// Keeps a `try` config: writes it to STATE and cancels the revert.
    pub async fn confirm(&self) -> Result<String, ApplyError> {
        let _guard = self.lock.try_lock().map_err(|_| ApplyError::Busy)?;
        let (text, generation) = {
            let r = self
                .running
                .lock()
                .map_err(|_| ApplyError::Failed("internal error: state lock poisoned".into()))?;
            match (&r.pending, &r.config) {
                (Some(p), Some((_, text))) => (text.clone(), p.generation),
                _ => {
                    return Err(ApplyError::Precondition(
                        "no config applied with --mode try is waiting for confirmation".into(),
                    ));
                }
            }
        };
        let store = self.store.clone();
        blocking(move || store.write_config(&text))
            .await?
            .map_err(|e| {
                ApplyError::Failed(format!(
                    "cannot write the config to STATE: {}; it still reverts at its timeout",
                    keelson_api::error_chain(&e)
                ))
            })?;
        if let Ok(mut r) = self.running.lock()
            && r.pending
                .as_ref()
                .is_some_and(|p| p.generation == generation)
        {
            r.pending = None;
        }
        Ok("the tried config is confirmed and written to STATE".into())
    }
}

/// A short digest for redacted values (FNV-1a: enough to tell values apart in a diff,
/// without pulling a hash crate in; it is not a security measure).
mod sha2_lite {
    pub fn short_digest(bytes: &[u8]) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{:08x}", h >> 32)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_config_over_the_size_limit_is_refused_naming_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let backend = Arc::new(crate::backend::RecordingBackend::default());
        let applier = Applier::new(
            StateStore::new(dir.path()),
            backend,
            Mode::Metal,
            None,
            None,
        );
        let big = ApplyRequest {
            config: vec![b'#'; MAX_CONFIG_BYTES + 1],
            mode: ApplyMode::Auto,
            try_timeout: None,
            dry_run: false,
        };
        let err = applier.install_first(big).await.unwrap_err();
        assert!(matches!(err, ApplyError::Invalid(_)), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains("the config is 1048577 bytes, over the 1048576-byte (1 MiB) limit"),
            "{message}"
        );
        assert!(!StateStore::new(dir.path()).has_config());
        // PID 1 refuses at boot what machined refuses: one constant, 1 MiB.
        assert_eq!(MAX_CONFIG_BYTES, 1024 * 1024);
    }

    #[test]
    fn keys_are_classified() {
        let check = |key: &str, want: Where| assert_eq!(classify(key), want, "{key}");
        check(
            "machine.sysctls.\"vm.swappiness\"",
            Where::Live(LivePart::Sysctls),
        );
        check("machine.sysctls", Where::Live(LivePart::Sysctls));
        check("machine.files[0]", Where::Live(LivePart::Files));
        check("machine.hostname", Where::Live(LivePart::Hostname));
        check(
            "machine.kubelet.extra_args.max-pods",
            Where::Live(LivePart::Kubelet),
        );
        check("machine.api.cert_sans", Where::Machined);
        assert!(matches!(classify("machine.type"), Where::Reboot(_)));
        assert!(matches!(classify("machine.install_disk"), Where::Reboot(_)));
        assert!(
            matches!(classify("cluster.secrets.node_api_ca.key"), Where::Reboot(w) if w.contains("secrets"))
        );
        assert!(matches!(classify("cluster.name"), Where::Reboot(_)));
        assert!(
            matches!(classify("machine.services[0]"), Where::Reboot(w) if w.contains("extension services"))
        );
        assert!(matches!(classify("machine.hostnames"), Where::Reboot(_)));
    }

    #[test]
    fn redaction_hides_keys_but_shows_change() {
        let mut v: toml::Value = toml::from_str(
            "[a]\nkey = \"-----BEGIN PRIVATE KEY-----\"\ncert = \"C\"\n[[b]]\napi_join_token = \"t\"\n",
        )
        .unwrap();
        redact(&mut v);
        let text = toml::to_string(&v).unwrap();
        assert!(!text.contains("BEGIN PRIVATE KEY"), "{text}");
        assert!(text.contains("cert = \"C\""), "{text}");
        assert!(text.contains("<secret "), "{text}");
        assert_ne!(short_digest(b"a"), short_digest(b"b"));
    }
}
