//! The `try` mode of [`Applier`]: the tried config applied live with its record in STATE
//! ([`try_record`]), the revert at the deadline (re-armed when machined restarts), a
//! failed revert kept and reported, and the confirmation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keelson_configs::MachineConfig;

use super::changes::Plan;
use super::{Applier, ApplyError, blocking};
use crate::node::health::Check;
use crate::server::try_record::{self, Now, Resume, TryRecord};

/// A try waiting for its confirmation or its deadline.
#[derive(Debug, Clone)]
pub(super) struct PendingTry {
    /// The config the revert goes back to.
    pub(super) previous: Option<(MachineConfig, String)>,
    /// As STATE keeps it: the parts, and what a failed revert adds.
    pub(super) record: TryRecord,
    /// When it reverts (monotonic: the wall clock may be stepped meanwhile).
    pub(super) deadline: Instant,
    /// Which try this is, so that a revert armed for an earlier one does nothing.
    pub(super) generation: u64,
}

impl Applier {
    /// Seconds left before a `try` config reverts, if one waits.
    pub fn pending_try(&self) -> Option<Duration> {
        self.running.lock().ok().and_then(|r| {
            r.pending
                .as_ref()
                .map(|p| p.deadline.saturating_duration_since(Instant::now()))
        })
    }

    /// The `health` check of a `try`: waiting (ok, with the time left) or its revert
    /// failed (not ok, with why); none without one.
    pub fn try_check(&self) -> Option<Check> {
        let r = self.running.lock().ok()?;
        if let Some(p) = &r.pending {
            let left = p.deadline.saturating_duration_since(Instant::now());
            return Some(try_record::health_check(&p.record, left));
        }
        r.failed
            .as_ref()
            .map(|record| try_record::health_check(record, Duration::ZERO))
    }

    /// Takes up a `try` that STATE records (machined restarted while it waited): its
    /// revert re-armed for the time left, at once when the deadline has passed; an
    /// earlier boot's record removed; a failed revert reported again. Called once, when
    /// the applier starts serving a configured node.
    pub fn resume_try(self: &Arc<Self>) {
        let record = match self.store.read_try_record() {
            Ok(None) => {
                // A tried config whose record was removed (a revert or confirm cut short).
                let _ = self.store.remove_try();
                return;
            }
            Ok(Some(bytes)) => try_record::parse(&bytes).unwrap_or_else(|why| {
                tracing::error!(
                    error = %why,
                    "a try's record cannot be read: every live part is reverted to the config in STATE"
                );
                TryRecord::unreadable()
            }),
            Err(e) => {
                tracing::error!(
                    error = %keelson_api::error_chain(&e),
                    "a try's record cannot be read: its revert, if one waits, does not run"
                );
                return;
            }
        };
        let tried = self.store.read_tried().ok().flatten();
        // A confirm cut short after it wrote config.toml: the tried config is kept.
        if tried.is_some() && tried == self.store.read_config().ok().flatten() {
            self.remove_try_files("a confirmed try's record removed");
            return;
        }
        let left = match try_record::decide(&record, &Now::read()) {
            Resume::EndedByBoot => {
                self.remove_try_files(
                    "a try of an earlier boot ended with that boot (the node booted the config in STATE): its record removed",
                );
                return;
            }
            Resume::Failed => {
                tracing::error!(
                    "the revert of a config applied with --mode try failed before machined restarted: see `machinectl health`"
                );
                if let Ok(mut r) = self.running.lock() {
                    r.failed = Some(record);
                }
                return;
            }
            Resume::RevertNow => Duration::ZERO,
            Resume::Rearm(left) => left,
        };
        let tried = tried.and_then(|bytes| {
            let checked = keelson_configs::check_bytes(&bytes, "config.tried.toml", self.mode);
            let text = String::from_utf8_lossy(&bytes).into_owned();
            checked.into_result().ok().map(|config| (config, text))
        });
        // Without its config a try cannot be confirmed or shown: it is reverted now.
        let left = if tried.is_some() {
            left
        } else {
            tracing::error!("a try's config is missing from STATE or invalid: it is reverted now");
            Duration::ZERO
        };
        let generation = {
            let Ok(mut r) = self.running.lock() else {
                return;
            };
            r.generation += 1;
            r.pending = Some(PendingTry {
                previous: r.config.clone(),
                record,
                deadline: Instant::now() + left,
                generation: r.generation,
            });
            if tried.is_some() {
                r.config = tried;
            }
            r.generation
        };
        tracing::warn!(
            reverts_in_s = left.as_secs(),
            "a config applied with --mode try is still on trial after machined restarted: its revert is re-armed"
        );
        self.arm_revert(left, generation);
    }

    fn arm_revert(self: &Arc<Self>, after: Duration, generation: u64) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            me.revert_try(generation).await;
        });
    }

    fn remove_try_files(&self, done: &str) {
        match self.store.remove_try() {
            Ok(()) => tracing::info!("{done}"),
            Err(e) => tracing::warn!(
                error = %keelson_api::error_chain(&e),
                "a try's record could not be removed"
            ),
        }
    }

    /// `try`: the tried config and its record written to STATE, the config applied live,
    /// a staged config removed, and the revert armed. A failure takes everything back.
    pub(super) async fn apply_try(
        self: &Arc<Self>,
        plan: &Plan,
        new: MachineConfig,
        text: String,
        old: Option<(MachineConfig, String)>,
        timeout: Duration,
    ) -> Result<Vec<String>, ApplyError> {
        let record = TryRecord::new(plan.parts.clone(), &Now::read(), timeout);
        let (store, t, json) = (self.store.clone(), text.clone(), record.to_json());
        blocking(move || store.write_try(&t, &json))
            .await?
            .map_err(|e| {
                ApplyError::Failed(format!(
                    "cannot record the try in STATE: {}; nothing was changed",
                    keelson_api::error_chain(&e)
                ))
            })?;
        let mut messages = match self.apply_live(&plan.parts, &text, old.as_ref()).await {
            Ok(m) => m,
            Err(e) => {
                self.unrecord_try().await;
                return Err(e);
            }
        };
        match self.unstage().await {
            Ok(unstaged) => messages.extend(unstaged),
            Err(e) => {
                let reverted = self.revert_after_failure(&plan.parts, old.as_ref()).await;
                self.unrecord_try().await;
                return Err(ApplyError::Failed(format!(
                    "{e}; {reverted}; STATE was not changed"
                )));
            }
        }
        let generation = {
            let mut r = self
                .running
                .lock()
                .map_err(|_| ApplyError::Failed("internal error: state lock poisoned".into()))?;
            r.generation += 1;
            r.pending = Some(PendingTry {
                previous: old,
                record,
                deadline: Instant::now() + timeout,
                generation: r.generation,
            });
            r.failed = None;
            r.config = Some((new, text));
            r.generation
        };
        self.arm_revert(timeout, generation);
        messages.push(format!(
            "applied for a try: it reverts in {} s unless `machinectl apply-config --confirm` comes first (not written to STATE's config; the try is recorded there, so a restart of machined keeps its deadline)",
            timeout.as_secs()
        ));
        Ok(messages)
    }

    /// Takes back the record of a try that was not applied: a failed revert's record is
    /// kept as it was, any other removed.
    async fn unrecord_try(&self) {
        let failed = self.running.lock().ok().and_then(|r| r.failed.clone());
        let store = self.store.clone();
        let undone = blocking(move || match failed {
            Some(record) => store.write_try_record(&record.to_json()),
            None => store.remove_try(),
        })
        .await;
        if let Ok(Err(e)) = undone {
            tracing::warn!(error = %keelson_api::error_chain(&e), "the record of a try that was not applied could not be taken back");
        }
    }

    /// Drops a failed try's record: a config now in effect replaced it.
    pub(super) async fn forget_failed_try(&self) {
        let had = self
            .running
            .lock()
            .ok()
            .and_then(|mut r| r.failed.take())
            .is_some();
        if had {
            let store = self.store.clone();
            if let Ok(Err(e)) = blocking(move || store.remove_try()).await {
                tracing::warn!(error = %keelson_api::error_chain(&e), "a failed try's record could not be removed");
            }
        }
    }

    /// The deadline of try `generation`: the previous config re-applied to its parts and
    /// its record removed, or the record marked failed with why.
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
        match self.revert_live(&p.record.parts, p.previous.as_ref()).await {
            Ok(()) => {
                tracing::warn!(
                    "apply-config --mode try was not confirmed in time: the previous config was re-applied"
                );
                let store = self.store.clone();
                if let Ok(Err(e)) = blocking(move || store.remove_try()).await {
                    tracing::warn!(error = %keelson_api::error_chain(&e), "a reverted try's record could not be removed");
                }
            }
            Err(why) => {
                tracing::error!(
                    error = %why,
                    "apply-config --mode try was not confirmed in time, and its revert failed: see `machinectl health`"
                );
                let record = p.record.failed(why, &Now::read());
                let (store, json) = (self.store.clone(), record.to_json());
                if let Ok(Err(e)) = blocking(move || store.write_try_record(&json)).await {
                    tracing::warn!(error = %keelson_api::error_chain(&e), "a failed revert could not be recorded in STATE");
                }
                if let Ok(mut r) = self.running.lock() {
                    r.failed = Some(record);
                }
            }
        }
    }

    /// Keeps a `try` config: a staged config removed, the tried config written to STATE,
    /// the revert cancelled and the try's record removed.
    pub async fn confirm(&self) -> Result<String, ApplyError> {
        let _guard = self.lock.try_lock().map_err(|_| ApplyError::Busy)?;
        let (text, generation) = {
            let r = self
                .running
                .lock()
                .map_err(|_| ApplyError::Failed("internal error: state lock poisoned".into()))?;
            match (&r.pending, &r.config, &r.failed) {
                (Some(p), Some((_, text)), _) => (text.clone(), p.generation),
                (None, _, Some(failed)) => {
                    let why = match &failed.outcome {
                        try_record::TryOutcome::Failed { why, .. } => why.as_str(),
                        try_record::TryOutcome::Pending => "",
                    };
                    return Err(ApplyError::Precondition(format!(
                        "no config applied with --mode try is waiting for confirmation: the last one was not confirmed in time and its revert failed ({why}); apply a config (--mode no-reboot or reboot) to put the node in a known state"
                    )));
                }
                _ => {
                    return Err(ApplyError::Precondition(
                        "no config applied with --mode try is waiting for confirmation".into(),
                    ));
                }
            }
        };
        let unstaged = self.unstage().await.map_err(|e| {
            ApplyError::Failed(format!(
                "{e}; the tried config still reverts at its timeout"
            ))
        })?;
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
        // A record left behind is recognised at the next start: config.toml holds its
        // tried config.
        let store = self.store.clone();
        if let Ok(Err(e)) = blocking(move || store.remove_try()).await {
            tracing::warn!(error = %keelson_api::error_chain(&e), "a confirmed try's record could not be removed");
        }
        let mut message = String::from("the tried config is confirmed and written to STATE");
        if let Some(unstaged) = unstaged {
            message.push_str("; ");
            message.push_str(&unstaged);
        }
        Ok(message)
    }
}
