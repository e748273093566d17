//! How phases, inputs and actions read in the phase table of [`super`]'s doc (and in
//! test failures).

use std::fmt;

use super::{Action, Awaiting, Input, Maintenance, Phase, UrlFetch};
use crate::shutdown::ShutdownKind;

impl<C> fmt::Display for Phase<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shutdown = |kind: ShutdownKind, reset: bool| match (kind, reset) {
            (ShutdownKind::Reboot, true) => "reset".to_string(),
            (kind, true) => format!("{}, reset", kind.describe()),
            (kind, false) => kind.describe().to_string(),
        };
        match self {
            Phase::Booting => f.write_str("Booting"),
            Phase::AwaitingConfig(a) => write!(f, "AwaitingConfig({a})"),
            Phase::StartingContainerd {
                late_drivers_loaded,
                ..
            } => write!(
                f,
                "StartingContainerd(late drivers {})",
                if *late_drivers_loaded {
                    "loaded"
                } else {
                    "waiting"
                }
            ),
            Phase::StartingServices { .. } => f.write_str("StartingServices"),
            Phase::Up { .. } => f.write_str("Up"),
            Phase::ShutdownAsked { kind, reset, then } => {
                write!(f, "ShutdownAsked({}, then {then})", shutdown(*kind, *reset))
            }
            Phase::ShuttingDown { kind, reset, .. } => {
                write!(f, "ShuttingDown({})", shutdown(*kind, *reset))
            }
            Phase::Down { kind, reset } => write!(f, "Down({})", shutdown(*kind, *reset)),
        }
    }
}

impl fmt::Display for Awaiting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let maintenance = match self.maintenance {
            Maintenance::Starting => "starting",
            Maintenance::Serving => "serving",
            Maintenance::Unavailable => "unavailable",
        };
        let dhcp = if self.dhcp { "on" } else { "off" };
        write!(f, "maintenance {maintenance}, DHCP {dhcp}, ")?;
        match self.url {
            UrlFetch::None => f.write_str("no URL"),
            UrlFetch::WaitsForNetwork => f.write_str("URL waits for the network"),
            UrlFetch::Fetching { failed } => write!(f, "URL fetching, {failed} failed"),
        }
    }
}

impl<C> fmt::Display for Input<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Input::Start => f.write_str("start"),
            Input::ConfigFound(_) => f.write_str("config found"),
            Input::NoLocalConfig { url: true } => f.write_str("no local config (URL)"),
            Input::NoLocalConfig { url: false } => f.write_str("no local config (no URL)"),
            Input::MaintenanceStarted { serving: true } => f.write_str("maintenance serving"),
            Input::MaintenanceStarted { serving: false } => f.write_str("maintenance unavailable"),
            Input::Reachable => f.write_str("reachable"),
            Input::UrlFetched { .. } => f.write_str("URL fetched"),
            Input::UrlFailed { .. } => f.write_str("URL failed"),
            Input::UrlConfigRefused => f.write_str("URL config refused"),
            Input::ServicesChanged {
                containerd_ready,
                all_ready,
            } => f.write_str(match (containerd_ready, all_ready) {
                (_, true) => "all services ready",
                (true, false) => "containerd ready",
                (false, false) => "services changed",
            }),
            Input::LateDriversTimer => f.write_str("late-drivers timer"),
            Input::ReminderTimer => f.write_str("reminder timer"),
            Input::IdleReportTimer => f.write_str("idle-report timer"),
            Input::ConfigApplied(_) => f.write_str("config applied"),
            Input::ShutdownRequested { kind, by } => write!(f, "{by} ({})", kind.describe()),
            Input::ShutdownAsked {
                reset: true, wipes, ..
            } if wipes.is_empty() => f.write_str("reset asked (wipes nothing)"),
            Input::ShutdownAsked {
                reset: true, wipes, ..
            } => write!(f, "reset asked (wipes {})", wipes.join(", ")),
            Input::ShutdownAsked { kind, .. } => write!(f, "{} asked", kind.describe()),
            Input::ShutdownTimer => f.write_str("shutdown timer"),
            Input::ShutdownDeadline => f.write_str("deadline"),
            Input::AllServicesStopped => f.write_str("all services stopped"),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::FindLocalConfig => f.write_str("find local config"),
            Action::Configure {
                ends_maintenance: false,
            } => f.write_str("configure"),
            Action::Configure {
                ends_maintenance: true,
            } => f.write_str("configure, ending maintenance"),
            Action::ArmLateDrivers => f.write_str("arm late drivers"),
            Action::LoadLateDrivers => f.write_str("load late drivers"),
            Action::FormatNewState => f.write_str("format new STATE"),
            Action::KeepMachineId => f.write_str("keep machine id"),
            Action::SayWaiting => f.write_str("say waiting"),
            Action::ArmReminder => f.write_str("arm reminder"),
            Action::StartMaintenance => f.write_str("start maintenance"),
            Action::StartDhcp => f.write_str("start DHCP"),
            Action::FetchUrl(delay) if delay.is_zero() => f.write_str("fetch URL at once"),
            Action::FetchUrl(delay) => write!(f, "fetch URL in {} s", delay.as_secs()),
            Action::JudgeUrlConfig { .. } => f.write_str("judge URL config"),
            Action::Preflight => f.write_str("preflight"),
            Action::ReportBootComplete => f.write_str("report boot complete"),
            Action::ArmIdleReport => f.write_str("arm idle report"),
            Action::ReportIdle => f.write_str("report idle"),
            Action::ArmShutdown => f.write_str("arm shutdown"),
            Action::StopServices => f.write_str("stop services"),
            Action::ArmDeadline => f.write_str("arm deadline"),
            Action::ForgetServices => f.write_str("forget services"),
            Action::Finish { .. } => f.write_str("finish"),
            Action::Say(line) => write!(f, "say `{line}`"),
            Action::Reply(Ok(answer)) => write!(f, "answer `{answer}`"),
            Action::Reply(Err(refusal)) => write!(f, "refuse `{refusal}`"),
        }
    }
}
