//! The boot assessment's part of the main loop: after each event, the facts of the
//! node's health (the lifecycle's phase, the services) handed to
//! [`crate::boot_assess::BootAssess::check`], and a trial boot given up at its deadline
//! rebooted through the clean shutdown.

use crate::boot_assess::ConfigState;
use crate::bootlog::Kept;
use crate::events::TimerEvent;
use crate::lifecycle::{By, Input, Maintenance, Phase};
use crate::shutdown::ShutdownKind;

use super::node::Node;

impl<K: Kept> Node<'_, K> {
    /// Wake the loop at the trial's health deadline, if one is assessed.
    pub(super) fn arm_health_deadline(&self) {
        if let Some(delay) = self.boot.assess.deadline_in() {
            self.after(delay, TimerEvent::HealthDeadline);
        }
    }

    /// Keep the upgrade record once STATE is there, bless a healthy trial, or reboot
    /// one whose deadline passed. Nothing once the node is going down.
    pub(super) fn assess_health(&mut self) {
        if !self.boot.assess.active() || self.phase.going_down().is_some() {
            return;
        }
        let config = match &self.phase {
            Phase::AwaitingConfig(a) if a.maintenance == Maintenance::Serving => {
                ConfigState::Maintenance
            }
            phase if phase.config().is_some() => ConfigState::Applied,
            _ => ConfigState::Pending,
        };
        let services = self
            .runner
            .as_ref()
            .map(|r| r.supervisor.statuses())
            .unwrap_or_default();
        let state_dir = self.boot.state_dir.clone();
        let reboot =
            self.boot
                .assess
                .check(self.sys, self.log, config, &services, state_dir.as_deref());
        if reboot {
            let (kind, by) = (ShutdownKind::Reboot, By::HealthDeadline);
            self.input(Input::ShutdownRequested { kind, by });
        }
    }
}
