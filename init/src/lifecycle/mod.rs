//! Stage 2's lifecycle: the node's [`Phase`], and [`Phase::step`], a pure function of
//! (phase, [`Input`]) that gives the next phase and the [`Action`]s stage 2 carries out.
//!
//! Stage 2 turns what happens (a config found, containerd ready, a timer, a signal, a
//! control request) into an [`Input`], steps, and does the actions in order. Some
//! actions answer with an input of their own (looking for a config finds one or not,
//! maintenance mode starts or cannot), which stage 2 steps at once. Nothing here does
//! I/O, so every transition is tested without processes or clocks.
//!
//! The phases, in the order a boot goes through them:
//!
//! - [`Phase::Booting`]: before the first look for a config.
//! - [`Phase::AwaitingConfig`]: no valid config: maintenance mode, DHCP on every link,
//!   the config URL fetched ([`URL_RETRY`], [`URL_REFUSED_RETRY`]), and every 30 s a
//!   new look and the reminder.
//! - [`Phase::StartingContainerd`]: a config applied, containerd spawned and not ready
//!   yet; the late drivers wait for it, or for [`plan::LATE_DRIVERS_LIMIT`] (see
//!   [`plan`], the boot plan).
//! - [`Phase::StartingServices`]: containerd ready, preflight run; waiting for every
//!   autostart service to be ready.
//! - [`Phase::Up`]: the boot is complete.
//! - [`Phase::ShutdownAsked`]: a reboot, power-off or reset answered through the control
//!   socket, begun [`crate::control::SHUTDOWN_DELAY`] later; until then the node goes on
//!   as in the phase it wraps.
//! - [`Phase::ShuttingDown`]: services stopping, for up to
//!   [`crate::shutdown::SERVICES_DEADLINE`].
//! - [`Phase::Down`]: every service stopped (or forgotten); stage 2 stops the other
//!   processes, unmounts, wipes for a reset, and restarts or powers off.
//!
//! # The phase table
//!
//! Each row is a test case: the tests step the phase with the input and check the next
//! phase and the actions, and a test checks that this table and theirs are the same
//! list. A pair not listed changes nothing. Timers and durations: `late drivers` 10 s, `reminder` 30 s, `shutdown` 1 s, `deadline`
//! 90 s, `idle report` 10 s.
//!
//! | phase | input | next phase | actions |
//! |---|---|---|---|
//! | Booting | start | (same) | find local config |
//! | Booting | config found | StartingContainerd(late drivers waiting) | configure; arm late drivers |
//! | Booting | no local config (no URL) | AwaitingConfig(maintenance starting, DHCP off, no URL) | load late drivers; format new STATE; keep machine id; say waiting; arm reminder; start maintenance |
//! | Booting | no local config (URL) | AwaitingConfig(maintenance starting, DHCP off, URL waits for the network) | load late drivers; format new STATE; keep machine id; say waiting; arm reminder; start maintenance |
//! | AwaitingConfig(maintenance starting, DHCP off, no URL) | maintenance serving | AwaitingConfig(maintenance serving, DHCP on, no URL) | start DHCP |
//! | AwaitingConfig(maintenance starting, DHCP off, no URL) | maintenance unavailable | AwaitingConfig(maintenance unavailable, DHCP off, no URL) | |
//! | AwaitingConfig(maintenance starting, DHCP off, URL waits for the network) | maintenance unavailable | AwaitingConfig(maintenance unavailable, DHCP on, URL waits for the network) | start DHCP |
//! | AwaitingConfig(maintenance serving, DHCP on, URL waits for the network) | reachable | AwaitingConfig(maintenance serving, DHCP on, URL fetching, 0 failed) | fetch URL at once |
//! | AwaitingConfig(maintenance serving, DHCP on, URL fetching, 0 failed) | reachable | (same) | |
//! | AwaitingConfig(maintenance serving, DHCP on, no URL) | reachable | (same) | |
//! | AwaitingConfig(maintenance serving, DHCP on, URL fetching, 0 failed) | URL failed | AwaitingConfig(maintenance serving, DHCP on, URL fetching, 1 failed) | say `config URL http://h/n.toml: refused; retrying every 5 s`; fetch URL in 5 s |
//! | AwaitingConfig(maintenance serving, DHCP on, URL fetching, 1 failed) | URL failed | AwaitingConfig(maintenance serving, DHCP on, URL fetching, 2 failed) | fetch URL in 5 s |
//! | AwaitingConfig(maintenance serving, DHCP on, URL fetching, 6 failed) | URL failed | AwaitingConfig(maintenance serving, DHCP on, URL fetching, 7 failed) | say `config URL http://h/n.toml: refused; retrying every 5 s`; fetch URL in 5 s |
//! | AwaitingConfig(maintenance serving, DHCP on, URL fetching, 2 failed) | URL fetched | (same) | judge URL config |
//! | AwaitingConfig(maintenance serving, DHCP on, URL fetching, 2 failed) | URL config refused | (same) | fetch URL in 30 s |
//! | AwaitingConfig(maintenance serving, DHCP on, no URL) | reminder timer | (same) | find local config |
//! | AwaitingConfig(maintenance serving, DHCP on, no URL) | no local config (no URL) | (same) | say waiting; arm reminder |
//! | AwaitingConfig(maintenance serving, DHCP on, no URL) | config found | StartingContainerd(late drivers loaded) | configure, ending maintenance |
//! | AwaitingConfig(maintenance unavailable, DHCP off, no URL) | config found | StartingContainerd(late drivers loaded) | configure |
//! | AwaitingConfig(maintenance serving, DHCP on, no URL) | late-drivers timer | (same) | |
//! | StartingContainerd(late drivers waiting) | late-drivers timer | StartingContainerd(late drivers loaded) | load late drivers |
//! | StartingContainerd(late drivers loaded) | late-drivers timer | (same) | |
//! | StartingContainerd(late drivers waiting) | services changed | (same) | |
//! | StartingContainerd(late drivers waiting) | containerd ready | StartingServices | load late drivers; preflight |
//! | StartingContainerd(late drivers loaded) | containerd ready | StartingServices | preflight |
//! | StartingContainerd(late drivers waiting) | all services ready | Up | load late drivers; preflight; report boot complete; arm idle report |
//! | StartingContainerd(late drivers loaded) | reminder timer | (same) | |
//! | StartingContainerd(late drivers loaded) | URL fetched | (same) | |
//! | StartingServices | containerd ready | (same) | |
//! | StartingServices | all services ready | Up | report boot complete; arm idle report |
//! | Up | all services ready | (same) | |
//! | Up | config applied | (same) | |
//! | Up | idle-report timer | (same) | report idle |
//! | Up | SIGTERM (reboot) | ShuttingDown(reboot) | say `reboot requested (SIGTERM): stopping services`; stop services; arm deadline |
//! | AwaitingConfig(maintenance serving, DHCP on, no URL) | power button /dev/input/event0 (power off) | ShuttingDown(power off) | say `power off requested (power button /dev/input/event0): stopping services`; stop services; arm deadline |
//! | Up | reboot asked | ShutdownAsked(reboot, then Up) | arm shutdown; say `reboot asked through the control socket: it begins in 1 s`; answer `reboot: stopping services` |
//! | Up | power off asked | ShutdownAsked(power off, then Up) | arm shutdown; say `power off asked through the control socket: it begins in 1 s`; answer `power off: stopping services` |
//! | AwaitingConfig(maintenance serving, DHCP on, no URL) | reset asked (wipes STATE, EPHEMERAL) | ShutdownAsked(reset, then AwaitingConfig(maintenance serving, DHCP on, no URL)) | arm shutdown; say `reset asked through the control socket: it begins in 1 s`; answer `reset: stopping services, then wiping EPHEMERAL and STATE once both are unmounted (neither if one stays mounted: `machinectl health` says why once the node is back), then rebooting to wait for a config` |
//! | Up | reset asked (wipes nothing) | (same) | refuse `reset refused: neither STATE nor EPHEMERAL was prepared at this boot (see the boot log), so there is nothing to wipe; reboot the node instead` |
//! | Up | reset asked (wipes STATE) | (same) | refuse `reset refused: EPHEMERAL was not prepared at this boot (see the boot log), and a reset wipes STATE and EPHEMERAL both or neither: nothing was wiped; reboot the node to have EPHEMERAL prepared again, or wipe both partitions from another system` |
//! | ShutdownAsked(reboot, then Up) | shutdown timer | ShuttingDown(reboot) | say `reboot requested (control socket): stopping services`; stop services; arm deadline |
//! | ShutdownAsked(reset, then Up) | shutdown timer | ShuttingDown(reset) | say `reboot requested (reset through the control socket): stopping services`; stop services; arm deadline |
//! | ShutdownAsked(reset, then Up) | SIGPWR (power off) | ShuttingDown(power off, reset) | say `power off requested (SIGPWR): stopping services`; stop services; arm deadline |
//! | ShutdownAsked(reboot, then Up) | power off asked | (same) | refuse `a reboot is already under way` |
//! | ShutdownAsked(reboot, then StartingContainerd(late drivers waiting)) | containerd ready | ShutdownAsked(reboot, then StartingServices) | load late drivers; preflight |
//! | ShutdownAsked(reboot, then AwaitingConfig(maintenance serving, DHCP on, no URL)) | config found | ShutdownAsked(reboot, then StartingContainerd(late drivers loaded)) | configure, ending maintenance |
//! | ShutdownAsked(reboot, then Up) | all services stopped | (same) | |
//! | ShuttingDown(reboot) | SIGINT (reboot) | (same) | say `SIGINT: a reboot is already under way` |
//! | ShuttingDown(power off) | reboot asked | (same) | refuse `a power off is already under way` |
//! | ShuttingDown(reset) | shutdown timer | (same) | say `reset through the control socket: a reboot is already under way` |
//! | ShuttingDown(power off, reset) | shutdown timer | (same) | say `reset through the control socket: a power off is already under way` |
//! | ShuttingDown(reboot) | all services stopped | Down(reboot) | finish |
//! | ShuttingDown(reset) | all services stopped | Down(reset) | finish |
//! | ShuttingDown(power off) | deadline | Down(power off) | say `services did not stop within 90 s: going on`; forget services; finish |
//! | ShuttingDown(reboot) | config found | (same) | |
//! | ShuttingDown(reboot) | reminder timer | (same) | |
//! | ShuttingDown(reboot) | late-drivers timer | (same) | |
//! | ShuttingDown(reboot) | reachable | (same) | |
//! | ShuttingDown(reboot) | idle-report timer | (same) | report idle |
//! | Down(reboot) | SIGTERM (reboot) | (same) | |

mod display;
pub mod plan;

use std::fmt;
use std::time::Duration;

use crate::shutdown::ShutdownKind;

/// How long after a failed fetch the config URL is fetched again.
pub const URL_RETRY: Duration = Duration::from_secs(5);
/// How long after a refused (invalid) config the URL is fetched again.
pub const URL_REFUSED_RETRY: Duration = Duration::from_secs(30);
/// A failed fetch is said on the first failure and then once in this many (every 30 s).
pub const URL_SAY_EVERY: u32 = 6;

/// Where the node is. `C` is the config it runs (stage 2's `Accepted`).
#[derive(Debug, Clone, PartialEq)]
pub enum Phase<C> {
    /// Before the first look for a config.
    Booting,
    /// No valid config yet.
    AwaitingConfig(Awaiting),
    /// A config applied, containerd spawned and not ready yet.
    StartingContainerd {
        /// The config.
        config: C,
        /// The late drivers ([`plan::Step::LateDrivers`]) were loaded: the node waited
        /// for a config (they came first), or their limit passed.
        late_drivers_loaded: bool,
    },
    /// containerd ready (the late drivers loaded, preflight run); the other autostart
    /// services not all ready yet.
    StartingServices {
        /// The config.
        config: C,
    },
    /// Every autostart service was ready once: the boot is complete.
    Up {
        /// The config.
        config: C,
    },
    /// A shutdown answered through the control socket, begun by its timer; the node
    /// goes on as in `then` until it fires.
    ShutdownAsked {
        /// Reboot or power off.
        kind: ShutdownKind,
        /// A reset: STATE and EPHEMERAL are wiped once unmounted.
        reset: bool,
        /// The phase it interrupts.
        then: Box<Phase<C>>,
    },
    /// Services stopping.
    ShuttingDown {
        /// Reboot or power off.
        kind: ShutdownKind,
        /// A reset: STATE and EPHEMERAL are wiped once unmounted.
        reset: bool,
        /// The config the node ran, if any.
        config: Option<C>,
    },
    /// Services stopped or forgotten: stage 2's main loop has ended.
    Down {
        /// Reboot or power off.
        kind: ShutdownKind,
        /// Wipe STATE and EPHEMERAL first.
        reset: bool,
    },
}

/// What the node does while it waits for a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Awaiting {
    /// Maintenance mode (machined alone, for `apply-config --insecure`).
    pub maintenance: Maintenance,
    /// DHCP runs on every link (the URL and maintenance mode need an address).
    pub dhcp: bool,
    /// The config URL's fetches.
    pub url: UrlFetch,
}

/// Maintenance mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Maintenance {
    /// Being started ([`Action::StartMaintenance`]).
    Starting,
    /// machined serves it.
    Serving,
    /// Not possible on this boot (said once).
    Unavailable,
}

/// The config URL of the kernel command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlFetch {
    /// The command line names none.
    None,
    /// Fetched once a link has an address.
    WaitsForNetwork,
    /// Fetched, or about to be: how many fetches failed so far.
    Fetching {
        /// Failed fetches.
        failed: u32,
    },
}

/// Who asked for a shutdown that begins at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum By {
    /// A signal (its name: `SIGTERM`).
    Signal(&'static str),
    /// The power button (its device).
    PowerButton(String),
    /// A trial boot's health deadline passed (`boot_assess`): the loader's counter
    /// decides what boots next.
    HealthDeadline,
}

impl fmt::Display for By {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            By::Signal(name) => f.write_str(name),
            By::PowerButton(device) => write!(f, "power button {device}"),
            By::HealthDeadline => f.write_str("the trial boot's health deadline"),
        }
    }
}

/// What the lifecycle reacts to.
#[derive(Debug, Clone, PartialEq)]
pub enum Input<C> {
    /// The main loop begins.
    Start,
    /// A valid config: found locally, fetched from the URL, or installed through the
    /// API in maintenance mode.
    ConfigFound(C),
    /// No valid config in STATE, fw_cfg or a config drive.
    NoLocalConfig {
        /// The kernel command line names a config URL.
        url: bool,
    },
    /// [`Action::StartMaintenance`]'s outcome.
    MaintenanceStarted {
        /// machined serves maintenance mode.
        serving: bool,
    },
    /// A link other than loopback got an address.
    Reachable,
    /// The config URL answered.
    UrlFetched {
        /// The URL.
        url: String,
        /// Its body.
        bytes: Vec<u8>,
    },
    /// The config URL could not be fetched.
    UrlFailed {
        /// The URL.
        url: String,
        /// Why.
        why: String,
    },
    /// The URL's config was judged invalid ([`Action::JudgeUrlConfig`]).
    UrlConfigRefused,
    /// A service changed state.
    ServicesChanged {
        /// containerd is ready.
        containerd_ready: bool,
        /// Every autostart service is ready.
        all_ready: bool,
    },
    /// [`plan::LATE_DRIVERS_LIMIT`] passed.
    LateDriversTimer,
    /// Time to look for a config again and say that the node waits.
    ReminderTimer,
    /// Time to report PID 1's memory.
    IdleReportTimer,
    /// A config applied live through the API.
    ConfigApplied(C),
    /// A signal or the power button asks for a shutdown now.
    ShutdownRequested {
        /// Reboot or power off.
        kind: ShutdownKind,
        /// Who asked.
        by: By,
    },
    /// A reboot, power-off or reset asked through the control socket.
    ShutdownAsked {
        /// Reboot or power off.
        kind: ShutdownKind,
        /// A reset.
        reset: bool,
        /// What a reset would wipe (`STATE`, `EPHEMERAL`): the partitions prepared at
        /// this boot.
        wipes: Vec<&'static str>,
    },
    /// The control socket's shutdown is due.
    ShutdownTimer,
    /// The services did not stop in time.
    ShutdownDeadline,
    /// No service is running (checked after every event).
    AllServicesStopped,
}

/// What stage 2 must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Look at STATE, fw_cfg and config drives; step [`Input::ConfigFound`] or
    /// [`Input::NoLocalConfig`].
    FindLocalConfig,
    /// Run the boot plan's configure steps ([`plan::configure_steps`]) with the config
    /// of the new phase.
    Configure {
        /// machined served maintenance mode: say that it ends.
        ends_maintenance: bool,
    },
    /// Step [`Input::LateDriversTimer`] in [`plan::LATE_DRIVERS_LIMIT`].
    ArmLateDrivers,
    /// Load the power button's modules (and watch it), the network drivers and the disk
    /// drivers stage 1 left.
    LoadLateDrivers,
    /// Format and mount a new STATE that the disks step left (a first boot).
    FormatNewState,
    /// Keep a new machine id in STATE.
    KeepMachineId,
    /// Say how to give the node a config.
    SayWaiting,
    /// Step [`Input::ReminderTimer`] in 30 s.
    ArmReminder,
    /// Start machined alone; step [`Input::MaintenanceStarted`].
    StartMaintenance,
    /// DHCP on every link.
    StartDhcp,
    /// Fetch the config URL after this delay; step [`Input::UrlFetched`] or
    /// [`Input::UrlFailed`].
    FetchUrl(Duration),
    /// Judge the URL's config: step [`Input::ConfigFound`] or
    /// [`Input::UrlConfigRefused`].
    JudgeUrlConfig {
        /// The URL.
        url: String,
        /// Its body.
        bytes: Vec<u8>,
    },
    /// Run the preflight checks with the config.
    Preflight,
    /// Say that the boot is complete.
    ReportBootComplete,
    /// Step [`Input::IdleReportTimer`] in 10 s.
    ArmIdleReport,
    /// Say PID 1's memory.
    ReportIdle,
    /// Step [`Input::ShutdownTimer`] in 1 s.
    ArmShutdown,
    /// Stop every service (reverse dependency order).
    StopServices,
    /// Step [`Input::ShutdownDeadline`] in 90 s.
    ArmDeadline,
    /// Forget the services that did not stop: the kill of every process follows.
    ForgetServices,
    /// Leave the main loop: stop every other process, unmount, wipe if `reset`, and
    /// reboot or power off.
    Finish {
        /// Reboot or power off.
        kind: ShutdownKind,
        /// Wipe STATE and EPHEMERAL.
        reset: bool,
    },
    /// A line on the console.
    Say(String),
    /// Answer the control request: a message, or why it was refused.
    Reply(Result<String, String>),
}

impl<C> Phase<C> {
    /// The config the node runs, if any.
    pub fn config(&self) -> Option<&C> {
        match self {
            Phase::StartingContainerd { config, .. }
            | Phase::StartingServices { config }
            | Phase::Up { config } => Some(config),
            Phase::ShutdownAsked { then, .. } => then.config(),
            Phase::ShuttingDown { config, .. } => config.as_ref(),
            Phase::Booting | Phase::AwaitingConfig(_) | Phase::Down { .. } => None,
        }
    }

    /// The shutdown asked for or under way, if any.
    pub fn going_down(&self) -> Option<ShutdownKind> {
        match self {
            Phase::ShutdownAsked { kind, .. }
            | Phase::ShuttingDown { kind, .. }
            | Phase::Down { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// The config, taken out of the phase.
    fn into_config(self) -> Option<C> {
        match self {
            Phase::StartingContainerd { config, .. }
            | Phase::StartingServices { config }
            | Phase::Up { config } => Some(config),
            Phase::ShutdownAsked { then, .. } => then.into_config(),
            Phase::ShuttingDown { config, .. } => config,
            Phase::Booting | Phase::AwaitingConfig(_) | Phase::Down { .. } => None,
        }
    }

    /// The same phase with a config applied live (the phases without one stay).
    fn with_config(self, config: C) -> Phase<C> {
        match self {
            Phase::StartingContainerd {
                late_drivers_loaded,
                ..
            } => Phase::StartingContainerd {
                config,
                late_drivers_loaded,
            },
            Phase::StartingServices { .. } => Phase::StartingServices { config },
            Phase::Up { .. } => Phase::Up { config },
            other => other,
        }
    }

    /// The next phase and what to do.
    pub fn step(self, input: Input<C>) -> (Phase<C>, Vec<Action>) {
        match self {
            Phase::Down { .. } => (self, Vec::new()),
            Phase::ShuttingDown {
                kind,
                reset,
                config,
            } => shutting_down(kind, reset, config, input),
            Phase::ShutdownAsked { kind, reset, then } => asked(kind, reset, *then, input),
            phase => phase.step_before_shutdown(input),
        }
    }

    /// The phases before any shutdown: the shutdown inputs, then each phase's own.
    fn step_before_shutdown(self, input: Input<C>) -> (Phase<C>, Vec<Action>) {
        match input {
            Input::ShutdownRequested { kind, by } => {
                begin_shutdown(kind, false, self.into_config(), &by.to_string())
            }
            Input::ShutdownAsked { kind, reset, wipes } => ask_shutdown(self, kind, reset, &wipes),
            Input::IdleReportTimer => (self, vec![Action::ReportIdle]),
            Input::ConfigApplied(config) => (self.with_config(config), Vec::new()),
            input => match self {
                Phase::Booting => booting(input),
                Phase::AwaitingConfig(awaiting) => awaiting.step(input),
                Phase::StartingContainerd {
                    config,
                    late_drivers_loaded,
                } => starting_containerd(config, late_drivers_loaded, input),
                Phase::StartingServices { config } => starting_services(config, input),
                other => (other, Vec::new()),
            },
        }
    }
}

/// [`Phase::Booting`].
fn booting<C>(input: Input<C>) -> (Phase<C>, Vec<Action>) {
    match input {
        Input::Start => (Phase::Booting, vec![Action::FindLocalConfig]),
        Input::ConfigFound(config) => (
            Phase::StartingContainerd {
                config,
                late_drivers_loaded: false,
            },
            vec![
                Action::Configure {
                    ends_maintenance: false,
                },
                Action::ArmLateDrivers,
            ],
        ),
        Input::NoLocalConfig { url } => {
            let awaiting = Awaiting {
                maintenance: Maintenance::Starting,
                dhcp: false,
                url: if url {
                    UrlFetch::WaitsForNetwork
                } else {
                    UrlFetch::None
                },
            };
            // The URL and maintenance mode need the network: its drivers come first.
            // Maintenance mode keeps the config it is given in STATE.
            let actions = vec![
                Action::LoadLateDrivers,
                Action::FormatNewState,
                Action::KeepMachineId,
                Action::SayWaiting,
                Action::ArmReminder,
                Action::StartMaintenance,
            ];
            (Phase::AwaitingConfig(awaiting), actions)
        }
        _ => (Phase::Booting, Vec::new()),
    }
}

impl Awaiting {
    /// [`Phase::AwaitingConfig`]: maintenance mode, DHCP, the URL's retry policy.
    fn step<C>(mut self, input: Input<C>) -> (Phase<C>, Vec<Action>) {
        let mut actions = Vec::new();
        match input {
            Input::ConfigFound(config) => {
                let next = Phase::StartingContainerd {
                    config,
                    late_drivers_loaded: true,
                };
                let ends_maintenance = self.maintenance == Maintenance::Serving;
                return (next, vec![Action::Configure { ends_maintenance }]);
            }
            Input::MaintenanceStarted { serving } if self.maintenance == Maintenance::Starting => {
                self.maintenance = if serving {
                    Maintenance::Serving
                } else {
                    Maintenance::Unavailable
                };
                // The URL and the API need an address: DHCP on every link until a
                // config says more.
                if (self.url != UrlFetch::None || serving) && !self.dhcp {
                    self.dhcp = true;
                    actions.push(Action::StartDhcp);
                }
            }
            Input::ReminderTimer => actions.push(Action::FindLocalConfig),
            Input::NoLocalConfig { .. } => {
                actions.extend([Action::SayWaiting, Action::ArmReminder]);
            }
            Input::Reachable if self.url == UrlFetch::WaitsForNetwork => {
                self.url = UrlFetch::Fetching { failed: 0 };
                actions.push(Action::FetchUrl(Duration::ZERO));
            }
            Input::UrlFetched { url, bytes } => actions.push(Action::JudgeUrlConfig { url, bytes }),
            Input::UrlConfigRefused => actions.push(Action::FetchUrl(URL_REFUSED_RETRY)),
            Input::UrlFailed { url, why } => {
                let failed = match self.url {
                    UrlFetch::Fetching { failed } => failed.saturating_add(1),
                    UrlFetch::None | UrlFetch::WaitsForNetwork => 1,
                };
                self.url = UrlFetch::Fetching { failed };
                if failed % URL_SAY_EVERY == 1 {
                    actions.push(Action::Say(format!(
                        "config URL {url}: {why}; retrying every {} s",
                        URL_RETRY.as_secs()
                    )));
                }
                actions.push(Action::FetchUrl(URL_RETRY));
            }
            _ => {}
        }
        (Phase::AwaitingConfig(self), actions)
    }
}

/// [`Phase::StartingContainerd`]: the late drivers at their limit, or with preflight
/// once containerd is ready.
fn starting_containerd<C>(
    config: C,
    late_drivers_loaded: bool,
    input: Input<C>,
) -> (Phase<C>, Vec<Action>) {
    let late_drivers = (!late_drivers_loaded).then_some(Action::LoadLateDrivers);
    match input {
        Input::LateDriversTimer => {
            let next = Phase::StartingContainerd {
                config,
                late_drivers_loaded: true,
            };
            (next, late_drivers.into_iter().collect())
        }
        Input::ServicesChanged {
            containerd_ready: true,
            all_ready,
        } => {
            let mut actions: Vec<Action> = late_drivers.into_iter().collect();
            actions.push(Action::Preflight);
            // The same change may have made every other service ready too.
            let (next, more) = starting_services(
                config,
                Input::ServicesChanged {
                    containerd_ready: true,
                    all_ready,
                },
            );
            actions.extend(more);
            (next, actions)
        }
        _ => {
            let phase = Phase::StartingContainerd {
                config,
                late_drivers_loaded,
            };
            (phase, Vec::new())
        }
    }
}

/// [`Phase::StartingServices`]: the boot is complete once every autostart service is
/// ready.
fn starting_services<C>(config: C, input: Input<C>) -> (Phase<C>, Vec<Action>) {
    match input {
        Input::ServicesChanged {
            all_ready: true, ..
        } => (
            Phase::Up { config },
            vec![Action::ReportBootComplete, Action::ArmIdleReport],
        ),
        _ => (Phase::StartingServices { config }, Vec::new()),
    }
}

/// Begin a shutdown now: stop the services, and give them until the deadline.
fn begin_shutdown<C>(
    kind: ShutdownKind,
    reset: bool,
    config: Option<C>,
    why: &str,
) -> (Phase<C>, Vec<Action>) {
    let said = format!("{} requested ({why}): stopping services", kind.describe());
    (
        Phase::ShuttingDown {
            kind,
            reset,
            config,
        },
        vec![Action::Say(said), Action::StopServices, Action::ArmDeadline],
    )
}

/// A shutdown asked through the control socket: answered now, begun by its timer.
fn ask_shutdown<C>(
    phase: Phase<C>,
    kind: ShutdownKind,
    reset: bool,
    wipes: &[&str],
) -> (Phase<C>, Vec<Action>) {
    if reset && let Some(refused) = reset_refusal(wipes) {
        return (phase, vec![Action::Reply(Err(refused))]);
    }
    let answer = if reset {
        RESET_ANSWER.to_string()
    } else {
        format!("{}: stopping services", kind.describe())
    };
    let said = format!(
        "{} asked through the control socket: it begins in {} s",
        if reset { "reset" } else { kind.describe() },
        crate::control::SHUTDOWN_DELAY.as_secs()
    );
    let next = Phase::ShutdownAsked {
        kind,
        reset,
        then: Box::new(phase),
    };
    let actions = vec![
        Action::ArmShutdown,
        Action::Say(said),
        Action::Reply(Ok(answer)),
    ];
    (next, actions)
}

/// A reset's answer: what it does, and that a partition left mounted wipes neither.
const RESET_ANSWER: &str = "reset: stopping services, then wiping EPHEMERAL and STATE once both are unmounted (neither if one stays mounted: `machinectl health` says why once the node is back), then rebooting to wait for a config";

/// Why a reset that would wipe `wipes` is refused: it wipes STATE and EPHEMERAL both or
/// neither, so each must have been prepared at this boot.
fn reset_refusal(wipes: &[&str]) -> Option<String> {
    use keelson_configs::layout::{PART_EPHEMERAL, PART_STATE};
    let missing: Vec<&str> = [PART_STATE, PART_EPHEMERAL]
        .into_iter()
        .filter(|name| !wipes.contains(name))
        .collect();
    match missing.as_slice() {
        [] => None,
        [_, _] => Some("reset refused: neither STATE nor EPHEMERAL was prepared at this boot (see the boot log), so there is nothing to wipe; reboot the node instead".into()),
        [one, ..] => Some(format!(
            "reset refused: {one} was not prepared at this boot (see the boot log), and a reset wipes STATE and EPHEMERAL both or neither: nothing was wiped; reboot the node to have {one} prepared again, or wipe both partitions from another system"
        )),
    }
}

/// Who began a shutdown asked through the control socket.
fn control_socket(reset: bool) -> &'static str {
    if reset {
        "reset through the control socket"
    } else {
        "control socket"
    }
}

/// [`Phase::ShutdownAsked`]: its timer or a signal begins the shutdown (a reset stays a
/// reset); everything else goes to the phase it wraps.
fn asked<C>(
    kind: ShutdownKind,
    reset: bool,
    then: Phase<C>,
    input: Input<C>,
) -> (Phase<C>, Vec<Action>) {
    match input {
        Input::ShutdownTimer => {
            begin_shutdown(kind, reset, then.into_config(), control_socket(reset))
        }
        Input::ShutdownRequested { kind, by } => {
            begin_shutdown(kind, reset, then.into_config(), &by.to_string())
        }
        Input::ShutdownAsked { .. } => {
            let refused = format!("a {} is already under way", kind.describe());
            let phase = Phase::ShutdownAsked {
                kind,
                reset,
                then: Box::new(then),
            };
            (phase, vec![Action::Reply(Err(refused))])
        }
        input => {
            let (then, actions) = then.step(input);
            let phase = Phase::ShutdownAsked {
                kind,
                reset,
                then: Box::new(then),
            };
            (phase, actions)
        }
    }
}

/// [`Phase::ShuttingDown`]: further requests are refused; the end comes when every
/// service has stopped, or at the deadline.
fn shutting_down<C>(
    kind: ShutdownKind,
    reset: bool,
    config: Option<C>,
    input: Input<C>,
) -> (Phase<C>, Vec<Action>) {
    let under_way = |why: &str| format!("{why}: a {} is already under way", kind.describe());
    let actions = match input {
        Input::ShutdownRequested { by, .. } => vec![Action::Say(under_way(&by.to_string()))],
        Input::ShutdownTimer => vec![Action::Say(under_way(control_socket(reset)))],
        Input::ShutdownAsked { .. } => vec![Action::Reply(Err(format!(
            "a {} is already under way",
            kind.describe()
        )))],
        Input::AllServicesStopped => {
            return (
                Phase::Down { kind, reset },
                vec![Action::Finish { kind, reset }],
            );
        }
        Input::ShutdownDeadline => {
            let said = format!(
                "services did not stop within {} s: going on",
                crate::shutdown::SERVICES_DEADLINE.as_secs()
            );
            let actions = vec![
                Action::Say(said),
                Action::ForgetServices,
                Action::Finish { kind, reset },
            ];
            return (Phase::Down { kind, reset }, actions);
        }
        Input::IdleReportTimer => vec![Action::ReportIdle],
        _ => Vec::new(),
    };
    let phase = Phase::ShuttingDown {
        kind,
        reset,
        config,
    };
    (phase, actions)
}

#[cfg(test)]
mod tests;
