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

#[cfg(test)]
// The test builds its ESP on disk.
#[allow(clippy::disallowed_methods)]
mod tests {
    use std::time::Duration;

    use keelson_configs::boot::{BootEntry, ENTRIES_DIR, EntryVersion, VerityParams};
    use keelson_configs::layout::Slot;
    use tokio::sync::mpsc::unbounded_channel;

    use super::*;
    use crate::boot_assess::{BootAssess, Booted};
    use crate::bootlog::BootLog;
    use crate::console::memory::MemoryLog;
    use crate::lifecycle::{Awaiting, UrlFetch};
    use crate::sender::Sender;
    use crate::stage2::boot::Boot;
    use crate::supervisor::reaper::ReapScope;
    use crate::supervisor::runner::Runner;
    use crate::supervisor::{Backoff, Supervisor};
    use crate::syscalls::Linux;

    /// A trial boot in maintenance mode whose machined never came: at its deadline the
    /// node goes down through the clean shutdown, and the reason is recorded.
    #[test]
    fn a_trial_past_its_deadline_reboots_the_node_cleanly() -> std::io::Result<()> {
        let esp = tempfile::tempdir()?;
        let entries = esp.path().join(ENTRIES_DIR);
        std::fs::create_dir_all(&entries)?;
        let verity = VerityParams {
            roothash: "bb".into(),
            salt: "00".into(),
            data_blocks: 1,
            hash_offset: 4096,
        };
        let version = EntryVersion {
            generation: 2,
            os_version: "0.2.0".into(),
        };
        let entry = BootEntry::for_slot(Slot::B, &version, "console=ttyS0", &verity);
        std::fs::write(entries.join("keelson-b+2-1.conf"), entry.render())?;
        let memory = MemoryLog::default();
        let log = BootLog::new(&memory);
        let booted = Booted {
            slot: Slot::B,
            roothash: Some("bb".into()),
        };
        let assess = BootAssess::on_esp(
            &Linux,
            &log,
            esp.path().to_path_buf(),
            &booted,
            None,
            Duration::ZERO,
        );
        let boot = Boot {
            assess,
            ..Boot::fixture()
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async {
            let mut node = Node::new(&Linux, &log, unbounded_channel().0, boot);
            node.runner = Some(Runner::new(
                Supervisor::new(Vec::new(), Backoff::DEFAULT),
                Sender::from_fn(|_| Ok(())),
                ReapScope::Own,
            ));
            node.phase = Phase::AwaitingConfig(Awaiting {
                maintenance: Maintenance::Serving,
                dhcp: true,
                url: UrlFetch::None,
            });
            node.assess_health();
            assert_eq!(node.phase.going_down(), Some(ShutdownKind::Reboot));
            node.assess_health();
        });
        let lines = memory.lines();
        let said: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("not healthy") || l.contains("reboot requested"))
            .collect();
        assert_eq!(
            said,
            [
                "keelson-init: slot b not healthy: machined not ready after 0 s; rebooting: the loader tries it 2 more time(s), then falls back to slot a",
                "keelson-init: reboot requested (the trial boot's health deadline): stopping services",
            ],
            "{lines:?}"
        );
        assert!(entries.join("keelson-b+2-1.conf").exists(), "not blessed");
        assert!(
            lines.contains(&"keelson-init: upgrade record not kept: STATE is not mounted".into()),
            "{lines:?}"
        );
        Ok(())
    }
}
