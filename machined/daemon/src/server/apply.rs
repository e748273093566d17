//! `apply-config`: validate on the node, diff, decide what can change live, apply through
//! PID 1, persist to STATE atomically, and the `try` mode's automatic revert.
//!
//! Rules that always hold:
//! - a config is validated ([`keelson_configs::check_bytes`]), and the node API's TLS
//!   configuration built from it ([`super::identity::server_tls`], with the candidate's
//!   `machine.files`), before anything changes; a refused config leaves the node and
//!   STATE untouched; one over
//!   [`MAX_CONFIG_BYTES`] (1 MiB, PID 1's limit at boot too) is refused before it is parsed;
//! - one apply at a time: a second one while the first runs gets ABORTED;
//! - STATE is written atomically (write, fsync, rename, fsync dir);
//! - `no-reboot` changes nothing unless every change can be applied live, and says which
//!   keys cannot and why;
//! - `try` applies live without persisting and reverts after its timeout unless
//!   `ConfirmConfig` comes first; nothing else is applied while it waits. Its record in
//!   STATE ([`super::try_record`]) outlives a restart of machined, which re-arms the
//!   revert ([`Applier::resume_try`]); a revert that fails is kept and reported failed;
//! - a config staged for the next boot is removed by every later apply (any mode but
//!   `staged`, which replaces it) and by a confirm, before the new config is written, so
//!   an older staged config never replaces a newer one at the next boot.

mod changes;
mod trial;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keelson_configs::validate::too_big;
use keelson_configs::{MAX_CONFIG_BYTES, MachineConfig, Mode, Severity};

use crate::backend::{LivePart, NodeBackend, Power};
use crate::server::state::StateStore;
use crate::server::try_record::TryRecord;
use changes::Plan;
pub use changes::{Where, changed_keys, classify, diff, redacted_text};
use keelson_api::api::proto::ApplyMode;
use trial::PendingTry;

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

#[derive(Debug, Default)]
struct Running {
    /// The config in effect and its text as it was sent.
    config: Option<(MachineConfig, String)>,
    pending: Option<PendingTry>,
    /// A try whose revert failed, until an apply or a boot replaces it.
    failed: Option<TryRecord>,
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

    /// STATE's directory (where the audit log is kept too).
    pub fn state_dir(&self) -> &std::path::Path {
        self.store.dir()
    }

    /// The config in effect.
    pub fn current(&self) -> Option<MachineConfig> {
        self.running
            .lock()
            .ok()
            .and_then(|r| r.config.as_ref().map(|(c, _)| c.clone()))
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
                // The API it would serve with, built as machined builds it at start: a
                // config no client could reach the node with is refused here.
                let addresses = crate::server::identity::interface_addresses();
                crate::server::identity::server_tls(&config, &self.store, &addresses).map_err(
                    |e| {
                        ApplyError::Invalid(format!(
                            "the node refused the config; nothing was changed: the node API could not serve with it: {}",
                            keelson_api::error_chain(&e)
                        ))
                    },
                )?;
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
        let unstaged = self
            .unstage()
            .await
            .map_err(|e| ApplyError::Failed(format!("{e}; nothing was changed")))?;
        let store = self.store.clone();
        let t = text.clone();
        blocking(move || store.write_config(&t))
            .await?
            .map_err(|e| ApplyError::Failed(keelson_api::error_chain(&e)))?;
        let mut messages: Vec<String> = unstaged.into_iter().collect();
        messages.extend([
            format!("config written to {}", self.store.config_path().display()),
            "the node API now requires client certificates (mutual TLS); use the context from `machinectl gen config`".into(),
        ]);
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
        let (old, pending, failed) = {
            let r = self
                .running
                .lock()
                .map_err(|_| ApplyError::Failed("internal error: state lock poisoned".into()))?;
            (r.config.clone(), r.pending.clone(), r.failed.clone())
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
        let plan = Plan::new(old_config, &new).and_parts_of(failed.as_ref());
        let diff = diff(old_config, &new);
        let mode = match req.mode {
            ApplyMode::Unspecified | ApplyMode::Auto => {
                if plan.need_reboot.is_empty() {
                    ApplyMode::NoReboot
                } else {
                    ApplyMode::Reboot
                }
            }
            m => m,
        };
        if matches!(mode, ApplyMode::NoReboot | ApplyMode::Try) && !plan.need_reboot.is_empty() {
            let mut msg = format!(
                "--mode {} refused: these changes cannot be applied without a reboot; nothing was changed:",
                keelson_api::api::apply_mode_name(mode)
            );
            for (key, why) in &plan.need_reboot {
                msg.push_str(&format!("\n  {key}: {why}"));
            }
            msg.push_str("\nuse --mode reboot (or auto) to apply them with a reboot, or --mode staged for the next boot");
            return Err(ApplyError::Precondition(msg));
        }
        let try_timeout = req.try_timeout.unwrap_or(DEFAULT_TRY_TIMEOUT);
        if mode == ApplyMode::Try && (try_timeout.is_zero() || try_timeout > MAX_TRY_TIMEOUT) {
            return Err(ApplyError::BadRequest(format!(
                "--timeout must be between 1 s and {} s",
                MAX_TRY_TIMEOUT.as_secs()
            )));
        }
        let messages = if req.dry_run {
            dry_run_messages(mode, &plan)
        } else {
            match mode {
                ApplyMode::NoReboot => self.apply_no_reboot(&plan, new, text, old).await?,
                ApplyMode::Reboot => self.apply_reboot(&text).await?,
                ApplyMode::Staged => {
                    let store = self.store.clone();
                    let t = text.clone();
                    blocking(move || store.write_staged(&t))
                        .await?
                        .map_err(unchanged)?;
                    vec![format!(
                        "config staged in {}: it takes effect at the next boot",
                        self.store.staged_path().display()
                    )]
                }
                ApplyMode::Try => self.apply_try(&plan, new, text, old, try_timeout).await?,
                ApplyMode::Unspecified | ApplyMode::Auto => Vec::new(),
            }
        };
        Ok(Applied {
            mode,
            diff,
            messages,
            warnings,
        })
    }

    async fn apply_no_reboot(
        &self,
        plan: &Plan,
        new: MachineConfig,
        text: String,
        old: Option<(MachineConfig, String)>,
    ) -> Result<Vec<String>, ApplyError> {
        let mut messages = Vec::new();
        if plan.keys.is_empty() && plan.parts.is_empty() {
            messages.push("no changes: the node already runs this config".into());
            messages.extend(
                self.unstage()
                    .await
                    .map_err(|e| ApplyError::Failed(format!("{e}; nothing was changed")))?,
            );
        } else {
            messages.extend(self.apply_live(&plan.parts, &text, old.as_ref()).await?);
            messages.extend(self.persist(&text, &plan.parts, old.as_ref()).await?);
            messages.push("config written to STATE".into());
            self.forget_failed_try().await;
            if plan.machined_part {
                messages.push(self.run_api_hook(&new));
            }
            if plan.parts.contains(&LivePart::Kubelet) {
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
        Ok(messages)
    }

    async fn apply_reboot(&self, text: &str) -> Result<Vec<String>, ApplyError> {
        let mut messages: Vec<String> = self
            .unstage()
            .await
            .map_err(|e| ApplyError::Failed(format!("{e}; nothing was changed")))?
            .into_iter()
            .collect();
        let store = self.store.clone();
        let t = text.to_owned();
        blocking(move || store.write_config(&t))
            .await?
            .map_err(unchanged)?;
        messages.push("config written to STATE".into());
        self.forget_failed_try().await;
        let backend = self.backend.clone();
        let m = blocking(move || backend.power(Power::Reboot))
            .await?
            .map_err(|e| {
                ApplyError::Failed(format!(
                    "the config is in STATE, but the reboot was refused: {e}; reboot the node to apply it"
                ))
            })?;
        messages.push(if m.is_empty() { "rebooting".into() } else { m });
        Ok(messages)
    }

    fn set_running(&self, config: MachineConfig, text: String) {
        if let Ok(mut r) = self.running.lock() {
            r.config = Some((config, text));
        }
    }

    /// Removes a config staged for the next boot (a later config replaces it); what was
    /// done, if anything; or why it could not be removed.
    async fn unstage(&self) -> Result<Option<String>, String> {
        let store = self.store.clone();
        let removed = blocking(move || store.remove_staged())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| {
                format!(
                    "cannot remove the config staged for the next boot, which would replace this one then: {}",
                    keelson_api::error_chain(&e)
                )
            })?;
        Ok(removed.then(|| {
            format!(
                "the config staged in {} was removed: this config replaces it",
                self.store.staged_path().display()
            )
        }))
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
                let reverted = self.revert_after_failure(parts, old).await;
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
    ) -> Result<(), String> {
        let Some((_, old_text)) = old else {
            return Err("there was no previous config to revert to".into());
        };
        let backend = self.backend.clone();
        let (p, t) = (parts.to_vec(), old_text.clone());
        match blocking(move || backend.apply_live(&p, &t)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("init refused the previous config: {e}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// What a revert after a failed apply did, for its error.
    async fn revert_after_failure(
        &self,
        parts: &[LivePart],
        old: Option<&(MachineConfig, String)>,
    ) -> String {
        match self.revert_live(parts, old).await {
            Ok(()) => "the previous config was re-applied".into(),
            Err(e) => format!("re-applying the previous config failed too ({e})"),
        }
    }

    /// Keeps an applied config in STATE: a staged config removed first (a power cut
    /// between the two leaves neither the staged config nor the new one, never the staged
    /// one over the new one), then `config.toml` written. A failure re-applies the
    /// previous config live.
    async fn persist(
        &self,
        text: &str,
        parts: &[LivePart],
        old: Option<&(MachineConfig, String)>,
    ) -> Result<Option<String>, ApplyError> {
        let unstaged = match self.unstage().await {
            Ok(m) => m,
            Err(e) => {
                let reverted = self.revert_after_failure(parts, old).await;
                return Err(ApplyError::Failed(format!(
                    "{e}; {reverted}; STATE was not changed"
                )));
            }
        };
        let store = self.store.clone();
        let t = text.to_owned();
        match blocking(move || store.write_config(&t)).await? {
            Ok(()) => Ok(unstaged),
            Err(e) => {
                let reverted = self.revert_after_failure(parts, old).await;
                Err(ApplyError::Failed(format!(
                    "the config was applied live but could not be written to STATE: {}; {reverted}",
                    keelson_api::error_chain(&e)
                )))
            }
        }
    }
}

/// What a dry run would do.
fn dry_run_messages(mode: ApplyMode, plan: &Plan) -> Vec<String> {
    let mut messages = vec![format!(
        "dry run (--mode {}): nothing was changed",
        keelson_api::api::apply_mode_name(mode)
    )];
    if plan.keys.is_empty() {
        messages.push("no changes: the node already runs this config".into());
    }
    match mode {
        ApplyMode::NoReboot | ApplyMode::Try => {
            for p in &plan.parts {
                messages.push(format!("would apply {} live", p.key()));
            }
        }
        ApplyMode::Reboot => messages.push("would write STATE and reboot".into()),
        ApplyMode::Staged => messages.push("would stage the config for the next boot".into()),
        _ => {}
    }
    messages
}

/// A failed write of STATE before anything changed, with the error's whole chain.
fn unchanged(e: impl std::error::Error + 'static) -> ApplyError {
    ApplyError::Failed(format!(
        "{}; nothing was changed",
        keelson_api::error_chain(&e)
    ))
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
}
