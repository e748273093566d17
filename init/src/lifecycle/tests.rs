//! The phase table, one [`check`] per row, and the module doc's copy of it.

use super::*;
use ShutdownKind::{PowerOff, Reboot};

/// The test's config: what the phases carry is checked, not what it holds.
type Config = &'static str;

const CONFIG: Config = "config";
const URL: &str = "http://h/n.toml";

/// One row of the phase table.
struct Row {
    phase: Phase<Config>,
    input: Input<Config>,
    next: Phase<Config>,
    actions: Vec<Action>,
}

fn row(
    phase: Phase<Config>,
    input: Input<Config>,
    next: Phase<Config>,
    actions: Vec<Action>,
) -> Row {
    Row {
        phase,
        input,
        next,
        actions,
    }
}

/// A row whose phase stays.
fn stays(phase: Phase<Config>, input: Input<Config>, actions: Vec<Action>) -> Row {
    let next = phase.clone();
    row(phase, input, next, actions)
}

/// Step `phase` with `input`: the next phase and the actions must be these.
fn check(phase: Phase<Config>, input: Input<Config>, next: &Phase<Config>, actions: &[Action]) {
    let what = format!("{phase} + {input}");
    let (got, did) = phase.step(input);
    assert_eq!((&got, did.as_slice()), (next, actions), "{what}");
}

fn awaiting(maintenance: Maintenance, dhcp: bool, url: UrlFetch) -> Phase<Config> {
    Phase::AwaitingConfig(Awaiting {
        maintenance,
        dhcp,
        url,
    })
}

/// Maintenance mode served, DHCP on, no URL: the usual wait.
fn waiting() -> Phase<Config> {
    awaiting(Maintenance::Serving, true, UrlFetch::None)
}

fn fetching(failed: u32) -> Phase<Config> {
    awaiting(Maintenance::Serving, true, UrlFetch::Fetching { failed })
}

fn starting(late_drivers_loaded: bool) -> Phase<Config> {
    Phase::StartingContainerd {
        config: CONFIG,
        late_drivers_loaded,
    }
}

fn services() -> Phase<Config> {
    Phase::StartingServices { config: CONFIG }
}

fn up() -> Phase<Config> {
    Phase::Up { config: CONFIG }
}

fn asked(kind: ShutdownKind, reset: bool, then: Phase<Config>) -> Phase<Config> {
    Phase::ShutdownAsked {
        kind,
        reset,
        then: Box::new(then),
    }
}

fn going(kind: ShutdownKind, reset: bool) -> Phase<Config> {
    Phase::ShuttingDown {
        kind,
        reset,
        config: Some(CONFIG),
    }
}

fn down(kind: ShutdownKind, reset: bool) -> Phase<Config> {
    Phase::Down { kind, reset }
}

fn say(line: &str) -> Action {
    Action::Say(line.into())
}

fn ready(containerd_ready: bool, all_ready: bool) -> Input<Config> {
    Input::ServicesChanged {
        containerd_ready,
        all_ready,
    }
}

fn signal(kind: ShutdownKind, name: &'static str) -> Input<Config> {
    Input::ShutdownRequested {
        kind,
        by: By::Signal(name),
    }
}

fn ask(kind: ShutdownKind, reset: bool, wipes: &[&'static str]) -> Input<Config> {
    Input::ShutdownAsked {
        kind,
        reset,
        wipes: wipes.to_vec(),
    }
}

fn failed() -> Input<Config> {
    Input::UrlFailed {
        url: URL.into(),
        why: "refused".into(),
    }
}

/// What a shutdown that begins now does.
fn stopping(line: &str) -> Vec<Action> {
    vec![say(line), Action::StopServices, Action::ArmDeadline]
}

/// What waiting for a config does first.
fn wait_first() -> Vec<Action> {
    vec![
        Action::LoadLateDrivers,
        Action::FormatNewState,
        Action::KeepMachineId,
        Action::SayWaiting,
        Action::ArmReminder,
        Action::StartMaintenance,
    ]
}

/// The phase table, in the module doc's order.
fn table() -> Vec<Row> {
    use Action as A;
    use Input as I;
    use Maintenance::{Serving, Starting, Unavailable};
    let url_said = say("config URL http://h/n.toml: refused; retrying every 5 s");
    let configure = A::Configure {
        ends_maintenance: false,
    };
    let configure_ending = A::Configure {
        ends_maintenance: true,
    };
    vec![
        // Booting.
        stays(Phase::Booting, I::Start, vec![A::FindLocalConfig]),
        row(
            Phase::Booting,
            I::ConfigFound(CONFIG),
            starting(false),
            vec![configure.clone(), A::ArmLateDrivers],
        ),
        row(
            Phase::Booting,
            I::NoLocalConfig { url: false },
            awaiting(Starting, false, UrlFetch::None),
            wait_first(),
        ),
        row(
            Phase::Booting,
            I::NoLocalConfig { url: true },
            awaiting(Starting, false, UrlFetch::WaitsForNetwork),
            wait_first(),
        ),
        // Waiting for a config: maintenance mode and DHCP.
        row(
            awaiting(Starting, false, UrlFetch::None),
            I::MaintenanceStarted { serving: true },
            awaiting(Serving, true, UrlFetch::None),
            vec![A::StartDhcp],
        ),
        row(
            awaiting(Starting, false, UrlFetch::None),
            I::MaintenanceStarted { serving: false },
            awaiting(Unavailable, false, UrlFetch::None),
            vec![],
        ),
        row(
            awaiting(Starting, false, UrlFetch::WaitsForNetwork),
            I::MaintenanceStarted { serving: false },
            awaiting(Unavailable, true, UrlFetch::WaitsForNetwork),
            vec![A::StartDhcp],
        ),
        // The URL's retry policy.
        row(
            awaiting(Serving, true, UrlFetch::WaitsForNetwork),
            I::Reachable,
            fetching(0),
            vec![A::FetchUrl(Duration::ZERO)],
        ),
        stays(fetching(0), I::Reachable, vec![]),
        stays(waiting(), I::Reachable, vec![]),
        row(
            fetching(0),
            failed(),
            fetching(1),
            vec![url_said.clone(), A::FetchUrl(URL_RETRY)],
        ),
        row(fetching(1), failed(), fetching(2), vec![A::FetchUrl(URL_RETRY)]),
        row(
            fetching(6),
            failed(),
            fetching(7),
            vec![url_said, A::FetchUrl(URL_RETRY)],
        ),
        stays(
            fetching(2),
            I::UrlFetched {
                url: URL.into(),
                bytes: b"version = 1".to_vec(),
            },
            vec![A::JudgeUrlConfig {
                url: URL.into(),
                bytes: b"version = 1".to_vec(),
            }],
        ),
        stays(
            fetching(2),
            I::UrlConfigRefused,
            vec![A::FetchUrl(URL_REFUSED_RETRY)],
        ),
        // The reminder, and a config at last.
        stays(waiting(), I::ReminderTimer, vec![A::FindLocalConfig]),
        stays(
            waiting(),
            I::NoLocalConfig { url: false },
            vec![A::SayWaiting, A::ArmReminder],
        ),
        row(
            waiting(),
            I::ConfigFound(CONFIG),
            starting(true),
            vec![configure_ending.clone()],
        ),
        row(
            awaiting(Unavailable, false, UrlFetch::None),
            I::ConfigFound(CONFIG),
            starting(true),
            vec![configure.clone()],
        ),
        stays(waiting(), I::LateDriversTimer, vec![]),
        // containerd first.
        row(
            starting(false),
            I::LateDriversTimer,
            starting(true),
            vec![A::LoadLateDrivers],
        ),
        stays(starting(true), I::LateDriversTimer, vec![]),
        stays(starting(false), ready(false, false), vec![]),
        row(
            starting(false),
            ready(true, false),
            services(),
            vec![A::LoadLateDrivers, A::Preflight],
        ),
        row(
            starting(true),
            ready(true, false),
            services(),
            vec![A::Preflight],
        ),
        row(
            starting(false),
            ready(true, true),
            up(),
            vec![
                A::LoadLateDrivers,
                A::Preflight,
                A::ReportBootComplete,
                A::ArmIdleReport,
            ],
        ),
        stays(starting(true), I::ReminderTimer, vec![]),
        stays(
            starting(true),
            I::UrlFetched {
                url: URL.into(),
                bytes: Vec::new(),
            },
            vec![],
        ),
        stays(services(), ready(true, false), vec![]),
        row(
            services(),
            ready(true, true),
            up(),
            vec![A::ReportBootComplete, A::ArmIdleReport],
        ),
        stays(up(), ready(true, true), vec![]),
        stays(up(), I::ConfigApplied(CONFIG), vec![]),
        stays(up(), I::IdleReportTimer, vec![A::ReportIdle]),
        // Shutdowns that begin now.
        row(
            up(),
            signal(Reboot, "SIGTERM"),
            going(Reboot, false),
            stopping("reboot requested (SIGTERM): stopping services"),
        ),
        row(
            waiting(),
            I::ShutdownRequested {
                kind: PowerOff,
                by: By::PowerButton("/dev/input/event0".into()),
            },
            Phase::ShuttingDown {
                kind: PowerOff,
                reset: false,
                config: None,
            },
            stopping("power off requested (power button /dev/input/event0): stopping services"),
        ),
        // Shutdowns asked through the control socket.
        row(
            up(),
            ask(Reboot, false, &[]),
            asked(Reboot, false, up()),
            vec![
                A::ArmShutdown,
                say("reboot asked through the control socket: it begins in 1 s"),
                A::Reply(Ok("reboot: stopping services".into())),
            ],
        ),
        row(
            up(),
            ask(PowerOff, false, &[]),
            asked(PowerOff, false, up()),
            vec![
                A::ArmShutdown,
                say("power off asked through the control socket: it begins in 1 s"),
                A::Reply(Ok("power off: stopping services".into())),
            ],
        ),
        row(
            waiting(),
            ask(Reboot, true, &["STATE", "EPHEMERAL"]),
            asked(Reboot, true, waiting()),
            vec![
                A::ArmShutdown,
                say("reset asked through the control socket: it begins in 1 s"),
                A::Reply(Ok(
                    "reset: stopping services, then wiping EPHEMERAL and STATE once both are unmounted (neither if one stays mounted: `machinectl health` says why once the node is back), then rebooting to wait for a config".into(),
                )),
            ],
        ),
        stays(
            up(),
            ask(Reboot, true, &[]),
            vec![A::Reply(Err(
                "reset refused: neither STATE nor EPHEMERAL was prepared at this boot (see the boot log), so there is nothing to wipe; reboot the node instead".into(),
            ))],
        ),
        // Both or neither: a reset that could wipe only STATE wipes nothing.
        stays(
            up(),
            ask(Reboot, true, &["STATE"]),
            vec![A::Reply(Err(
                "reset refused: EPHEMERAL was not prepared at this boot (see the boot log), and a reset wipes STATE and EPHEMERAL both or neither: nothing was wiped; reboot the node to have EPHEMERAL prepared again, or wipe both partitions from another system".into(),
            ))],
        ),
        row(
            asked(Reboot, false, up()),
            I::ShutdownTimer,
            going(Reboot, false),
            stopping("reboot requested (control socket): stopping services"),
        ),
        row(
            asked(Reboot, true, up()),
            I::ShutdownTimer,
            going(Reboot, true),
            stopping("reboot requested (reset through the control socket): stopping services"),
        ),
        row(
            asked(Reboot, true, up()),
            signal(PowerOff, "SIGPWR"),
            going(PowerOff, true),
            stopping("power off requested (SIGPWR): stopping services"),
        ),
        stays(
            asked(Reboot, false, up()),
            ask(PowerOff, false, &[]),
            vec![A::Reply(Err("a reboot is already under way".into()))],
        ),
        // Until its timer, the node goes on as before.
        row(
            asked(Reboot, false, starting(false)),
            ready(true, false),
            asked(Reboot, false, services()),
            vec![A::LoadLateDrivers, A::Preflight],
        ),
        row(
            asked(Reboot, false, waiting()),
            I::ConfigFound(CONFIG),
            asked(Reboot, false, starting(true)),
            vec![configure_ending],
        ),
        stays(asked(Reboot, false, up()), I::AllServicesStopped, vec![]),
        // Going down.
        stays(
            going(Reboot, false),
            signal(Reboot, "SIGINT"),
            vec![say("SIGINT: a reboot is already under way")],
        ),
        stays(
            going(PowerOff, false),
            ask(Reboot, false, &[]),
            vec![A::Reply(Err("a power off is already under way".into()))],
        ),
        stays(
            going(Reboot, true),
            I::ShutdownTimer,
            vec![say(
                "reset through the control socket: a reboot is already under way",
            )],
        ),
        stays(
            going(PowerOff, true),
            I::ShutdownTimer,
            vec![say(
                "reset through the control socket: a power off is already under way",
            )],
        ),
        row(
            going(Reboot, false),
            I::AllServicesStopped,
            down(Reboot, false),
            vec![A::Finish {
                kind: Reboot,
                reset: false,
            }],
        ),
        row(
            going(Reboot, true),
            I::AllServicesStopped,
            down(Reboot, true),
            vec![A::Finish {
                kind: Reboot,
                reset: true,
            }],
        ),
        row(
            going(PowerOff, false),
            I::ShutdownDeadline,
            down(PowerOff, false),
            vec![
                say("services did not stop within 90 s: going on"),
                A::ForgetServices,
                A::Finish {
                    kind: PowerOff,
                    reset: false,
                },
            ],
        ),
        stays(going(Reboot, false), I::ConfigFound(CONFIG), vec![]),
        stays(going(Reboot, false), I::ReminderTimer, vec![]),
        stays(going(Reboot, false), I::LateDriversTimer, vec![]),
        stays(going(Reboot, false), I::Reachable, vec![]),
        stays(going(Reboot, false), I::IdleReportTimer, vec![A::ReportIdle]),
        stays(down(Reboot, false), signal(Reboot, "SIGTERM"), vec![]),
    ]
}

/// A row as the module doc shows it.
fn render(row: &Row) -> String {
    let next = if row.next == row.phase {
        "(same)".to_string()
    } else {
        row.next.to_string()
    };
    let actions: Vec<String> = row.actions.iter().map(ToString::to_string).collect();
    let actions = actions.join("; ");
    let actions = if actions.is_empty() {
        String::new()
    } else {
        format!("{actions} ")
    };
    format!("| {} | {} | {next} | {actions}|", row.phase, row.input)
}

#[test]
fn every_row_of_the_phase_table_holds() {
    for row in table() {
        check(row.phase, row.input, &row.next, &row.actions);
    }
}

#[test]
fn the_module_doc_shows_the_phase_table() {
    let doc: Vec<&str> = include_str!("mod.rs")
        .lines()
        .filter_map(|l| l.strip_prefix("//! "))
        .skip_while(|l| !l.starts_with("| phase |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    let rows: Vec<String> = table().iter().map(render).collect();
    assert_eq!(doc, rows);
}

#[test]
fn a_failing_url_is_fetched_every_5_s_and_said_once_in_6() {
    let mut phase = fetching(0);
    let mut said = Vec::new();
    for failure in 1..=13 {
        let (next, actions) = phase.step(failed());
        assert_eq!(actions.last(), Some(&Action::FetchUrl(URL_RETRY)));
        if actions.len() == 2 {
            said.push(failure);
        }
        phase = next;
    }
    assert_eq!(said, [1, 7, 13]);
    // A refused config waits longer; the failures so far stay counted.
    let (phase, actions) = phase.step(Input::UrlConfigRefused);
    assert_eq!(actions, [Action::FetchUrl(URL_REFUSED_RETRY)]);
    assert_eq!(phase, fetching(13));
}

#[test]
fn a_boot_with_a_local_config_goes_up_and_down() {
    let steps: Vec<(Input<Config>, &str)> = vec![
        (Input::Start, "Booting"),
        (
            Input::ConfigFound(CONFIG),
            "StartingContainerd(late drivers waiting)",
        ),
        (
            Input::LateDriversTimer,
            "StartingContainerd(late drivers loaded)",
        ),
        (ready(true, false), "StartingServices"),
        (ready(true, true), "Up"),
        (
            ask(Reboot, true, &["STATE", "EPHEMERAL"]),
            "ShutdownAsked(reset, then Up)",
        ),
        (Input::ShutdownTimer, "ShuttingDown(reset)"),
        (Input::AllServicesStopped, "Down(reset)"),
    ];
    let mut phase: Phase<Config> = Phase::Booting;
    for (input, expected) in steps {
        phase = phase.step(input).0;
        assert_eq!(phase.to_string(), expected);
    }
}

#[test]
fn the_config_and_the_shutdown_are_read_through_every_phase() {
    let cases: Vec<(Phase<Config>, Option<Config>, Option<ShutdownKind>)> = vec![
        (Phase::Booting, None, None),
        (waiting(), None, None),
        (starting(false), Some(CONFIG), None),
        (services(), Some(CONFIG), None),
        (up(), Some(CONFIG), None),
        (asked(PowerOff, false, up()), Some(CONFIG), Some(PowerOff)),
        (asked(Reboot, true, waiting()), None, Some(Reboot)),
        (going(Reboot, false), Some(CONFIG), Some(Reboot)),
        (down(PowerOff, false), None, Some(PowerOff)),
    ];
    for (phase, config, going_down) in cases {
        assert_eq!(
            (phase.config().copied(), phase.going_down()),
            (config, going_down),
            "{phase}"
        );
    }
    // A config applied live replaces the one the phase carries.
    let (phase, _) = starting(true).step(Input::ConfigApplied("live"));
    assert_eq!(phase.config(), Some(&"live"));
    let (phase, _) = asked(Reboot, false, services()).step(Input::ConfigApplied("live"));
    assert_eq!(phase.config(), Some(&"live"));
}
