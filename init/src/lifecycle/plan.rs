//! The boot plan: what stage 2 does with a valid config, step by step, and what each
//! step waits for. The one place to read and change the containerd-first ordering.
//!
//! containerd's start is mostly one thread of Go (1.3 s under TCG, the other CPU idle),
//! so stage 2 does what containerd needs, spawns it, and does the rest while it starts.
//! [`PLAN`] lists the steps in the order they run; each names the steps it needs done
//! first ([`PlanStep::after`]) and why. The steps whose [`Gate`] is
//! [`Gate::Now`] run one after the other when the config is accepted (stage 2's
//! `configure`), all of them before the main loop handles containerd's readiness or
//! starts any other service. The rest wait for containerd: they run once it is ready,
//! or once their limit has passed ([`Gate::ContainerdReady`]); the lifecycle
//! ([`super::Phase`]) carries them out.
//!
//! | step | after | gate |
//! |---|---|---|
//! | containerd's modules (overlay) | - | now |
//! | CNI overlay at /opt/cni/bin | containerd's modules | now |
//! | hostname | - | now |
//! | config's files (outside STATE) | CNI overlay | now |
//! | /etc | hostname | now |
//! | containerd spawned | containerd's modules, CNI overlay, hostname, files, /etc | now |
//! | new STATE formatted and mounted | containerd spawned | now |
//! | machine id kept in STATE | new STATE | now |
//! | config's files in STATE | new STATE | now |
//! | config kept in STATE | new STATE | now |
//! | other modules | containerd spawned | now |
//! | sysctls | other modules | now |
//! | swap off | containerd spawned | now |
//! | network | containerd spawned, sysctls | now |
//! | other services | containerd spawned, STATE files, machine id, config kept, swap off, network | now |
//! | power button, network and disk drivers | containerd spawned | containerd ready, or 10 s |
//! | preflight | containerd spawned | containerd ready |
//!
//! A test keeps this table, [`PLAN`] and the order stage 2 ran before the plan existed
//! in step.

use std::fmt;
use std::time::Duration;

/// How long the late drivers wait for containerd's readiness at most.
pub const LATE_DRIVERS_LIMIT: Duration = Duration::from_secs(10);

/// One thing stage 2 does with a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The config's modules that containerd needs (`services::CONTAINERD_MODULES`:
    /// overlay), loaded first.
    ContainerdModules,
    /// The CNI plugins' overlay at `/opt/cni/bin` (module `overlay`).
    CniOverlay,
    /// The hostname: the config's, or one made from the machine id.
    Hostname,
    /// The config's `[[machine.files]]` outside STATE (they may add CNI plugins).
    Files,
    /// `/etc`'s generated files (hostname, hosts, resolv.conf, machine-id, containerd's
    /// config).
    Etc,
    /// The service catalog (its notes on the console), the end of maintenance mode, and
    /// containerd spawned.
    SpawnContainerd,
    /// A new STATE (a first boot) formatted and mounted: it holds nothing to read, and
    /// containerd needs only EPHEMERAL.
    FormatNewState,
    /// The config's files under STATE (a worker's node API certificate).
    StateFiles,
    /// A new machine id kept in STATE (its fsyncs cost 40-50 ms under TCG).
    KeepMachineId,
    /// The config kept in STATE, when it came from elsewhere.
    KeepConfig,
    /// The config's other modules (br_netfilter, ...).
    OtherModules,
    /// The sysctls: defaults and the config's.
    Sysctls,
    /// Swap off (or on, as the config says).
    SwapOff,
    /// The network engine restarted with the config's network.
    Network,
    /// The other services registered and the autostart ones started (machined after
    /// containerd, the kubelet once containerd is ready).
    OtherServices,
    /// The power button's modules and watch, the network drivers and the disk drivers
    /// stage 1 left: 0.6 s of CPU that containerd's start needed under TCG.
    LateDrivers,
    /// The preflight checks, which look at containerd's socket.
    Preflight,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::ContainerdModules => "containerd's modules (overlay)",
            Step::CniOverlay => "CNI overlay at /opt/cni/bin",
            Step::Hostname => "hostname",
            Step::Files => "config's files (outside STATE)",
            Step::Etc => "/etc",
            Step::SpawnContainerd => "containerd spawned",
            Step::FormatNewState => "new STATE formatted and mounted",
            Step::StateFiles => "config's files in STATE",
            Step::KeepMachineId => "machine id kept in STATE",
            Step::KeepConfig => "config kept in STATE",
            Step::OtherModules => "other modules",
            Step::Sysctls => "sysctls",
            Step::SwapOff => "swap off",
            Step::Network => "network",
            Step::OtherServices => "other services",
            Step::LateDrivers => "power button, network and disk drivers",
            Step::Preflight => "preflight",
        })
    }
}

/// When a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// When the config is accepted, in the plan's order.
    Now,
    /// Once containerd is ready, or once `limit` has passed since the config was
    /// accepted at boot (`None`: only when it is ready).
    ContainerdReady {
        /// The longest the step waits.
        limit: Option<Duration>,
    },
}

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Gate::Now => f.write_str("now"),
            Gate::ContainerdReady { limit: None } => f.write_str("containerd ready"),
            Gate::ContainerdReady { limit: Some(d) } => {
                write!(f, "containerd ready, or {} s", d.as_secs())
            }
        }
    }
}

/// A step, what it needs done first, and when it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanStep {
    /// The step.
    pub step: Step,
    /// The steps that must be done before it.
    pub after: &'static [Step],
    /// When it runs.
    pub gate: Gate,
    /// Why it sits where it does.
    pub why: &'static str,
}

/// The boot plan, in the order its steps run.
pub const PLAN: &[PlanStep] = &[
    PlanStep {
        step: Step::ContainerdModules,
        after: &[],
        gate: Gate::Now,
        why: "the CNI overlay and containerd's snapshotter need overlay",
    },
    PlanStep {
        step: Step::CniOverlay,
        after: &[Step::ContainerdModules],
        gate: Gate::Now,
        why: "containerd's CRI reads its plugins there; the config's files may add some",
    },
    PlanStep {
        step: Step::Hostname,
        after: &[],
        gate: Gate::Now,
        why: "containerd and /etc's hosts take it",
    },
    PlanStep {
        step: Step::Files,
        after: &[Step::CniOverlay],
        gate: Gate::Now,
        why: "a file under /opt/cni/bin must land in the overlay, not under it",
    },
    PlanStep {
        step: Step::Etc,
        after: &[Step::Hostname],
        gate: Gate::Now,
        why: "containerd reads its config from /etc",
    },
    PlanStep {
        step: Step::SpawnContainerd,
        after: &[
            Step::ContainerdModules,
            Step::CniOverlay,
            Step::Hostname,
            Step::Files,
            Step::Etc,
        ],
        gate: Gate::Now,
        why: "containerd first: everything its start needs is there",
    },
    PlanStep {
        step: Step::FormatNewState,
        after: &[Step::SpawnContainerd],
        gate: Gate::Now,
        why: "mke2fs runs while containerd starts; containerd needs only EPHEMERAL",
    },
    PlanStep {
        step: Step::KeepMachineId,
        after: &[Step::FormatNewState],
        gate: Gate::Now,
        why: "STATE must be mounted; its fsyncs wait until containerd is spawned",
    },
    PlanStep {
        step: Step::StateFiles,
        after: &[Step::FormatNewState],
        gate: Gate::Now,
        why: "written under the bare mount point, the mount would hide them",
    },
    PlanStep {
        step: Step::KeepConfig,
        after: &[Step::FormatNewState],
        gate: Gate::Now,
        why: "STATE must be mounted; its fsyncs wait until containerd is spawned",
    },
    PlanStep {
        step: Step::OtherModules,
        after: &[Step::SpawnContainerd],
        gate: Gate::Now,
        why: "nothing containerd's start needs",
    },
    PlanStep {
        step: Step::Sysctls,
        after: &[Step::OtherModules],
        gate: Gate::Now,
        why: "br_netfilter's sysctls exist once it is loaded",
    },
    PlanStep {
        step: Step::SwapOff,
        after: &[Step::SpawnContainerd],
        gate: Gate::Now,
        why: "the kubelet needs it, containerd does not",
    },
    PlanStep {
        step: Step::Network,
        after: &[Step::SpawnContainerd, Step::Sysctls],
        gate: Gate::Now,
        why: "forwarding and the bridge sysctls are set before links carry traffic",
    },
    PlanStep {
        step: Step::OtherServices,
        after: &[
            Step::SpawnContainerd,
            Step::StateFiles,
            Step::KeepMachineId,
            Step::KeepConfig,
            Step::SwapOff,
            Step::Network,
        ],
        gate: Gate::Now,
        why: "machined and the kubelet find the node configured",
    },
    PlanStep {
        step: Step::LateDrivers,
        after: &[Step::SpawnContainerd],
        gate: Gate::ContainerdReady {
            limit: Some(LATE_DRIVERS_LIMIT),
        },
        why: "their probes took CPU containerd's start needed; nothing at boot waits for them",
    },
    PlanStep {
        step: Step::Preflight,
        after: &[Step::SpawnContainerd],
        gate: Gate::ContainerdReady { limit: None },
        why: "it checks containerd's socket",
    },
];

/// The steps stage 2 runs when it accepts a config, in order.
pub fn configure_steps() -> impl Iterator<Item = Step> {
    PLAN.iter().filter(|s| s.gate == Gate::Now).map(|s| s.step)
}

/// The plan as the Markdown table of this module's doc.
pub fn table() -> Vec<String> {
    PLAN.iter()
        .map(|s| {
            let after: Vec<&str> = s.after.iter().map(short).collect();
            let after = if after.is_empty() {
                "-".to_string()
            } else {
                after.join(", ")
            };
            format!("| {} | {after} | {} |", s.step, s.gate)
        })
        .collect()
}

/// A step's name in the "after" column.
fn short(step: &Step) -> &'static str {
    match step {
        Step::ContainerdModules => "containerd's modules",
        Step::CniOverlay => "CNI overlay",
        Step::Hostname => "hostname",
        Step::Files => "files",
        Step::Etc => "/etc",
        Step::SpawnContainerd => "containerd spawned",
        Step::FormatNewState => "new STATE",
        Step::StateFiles => "STATE files",
        Step::KeepMachineId => "machine id",
        Step::KeepConfig => "config kept",
        Step::OtherModules => "other modules",
        Step::Sysctls => "sysctls",
        Step::SwapOff => "swap off",
        Step::Network => "network",
        Step::OtherServices => "other services",
        Step::LateDrivers => "late drivers",
        Step::Preflight => "preflight",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_comes_after_what_it_needs_and_once() {
        for (i, planned) in PLAN.iter().enumerate() {
            let before: Vec<Step> = PLAN[..i].iter().map(|s| s.step).collect();
            assert!(
                !before.contains(&planned.step),
                "{} is planned twice",
                planned.step
            );
            for needed in planned.after {
                assert!(
                    before.contains(needed),
                    "{} runs before {needed}, which it needs",
                    planned.step
                );
            }
        }
    }

    #[test]
    fn the_configure_steps_run_in_the_order_stage_2_always_ran_them() {
        let order: Vec<Step> = configure_steps().collect();
        assert_eq!(
            order,
            [
                Step::ContainerdModules,
                Step::CniOverlay,
                Step::Hostname,
                Step::Files,
                Step::Etc,
                Step::SpawnContainerd,
                Step::FormatNewState,
                Step::KeepMachineId,
                Step::StateFiles,
                Step::KeepConfig,
                Step::OtherModules,
                Step::Sysctls,
                Step::SwapOff,
                Step::Network,
                Step::OtherServices,
            ]
        );
    }

    /// Whether `step` comes after `needed`, directly or through other steps.
    fn needs(step: Step, needed: Step) -> bool {
        PLAN.iter()
            .find(|s| s.step == step)
            .is_some_and(|s| s.after.iter().any(|&a| a == needed || needs(a, needed)))
    }

    #[test]
    fn every_step_is_before_containerd_or_runs_while_it_starts() {
        for planned in PLAN.iter().filter(|s| s.step != Step::SpawnContainerd) {
            let before = needs(Step::SpawnContainerd, planned.step);
            let after = needs(planned.step, Step::SpawnContainerd);
            assert!(
                before != after,
                "{}: containerd's spawn must need it, or it must come after the spawn",
                planned.step
            );
        }
        // What waits for containerd's readiness comes after its spawn.
        for planned in PLAN.iter().filter(|s| s.gate != Gate::Now) {
            assert!(
                needs(planned.step, Step::SpawnContainerd),
                "{}",
                planned.step
            );
        }
        assert_eq!(
            PLAN.iter()
                .find(|s| s.step == Step::LateDrivers)
                .map(|s| s.gate),
            Some(Gate::ContainerdReady {
                limit: Some(Duration::from_secs(10))
            })
        );
    }

    #[test]
    fn the_module_doc_shows_the_plan() {
        let doc: Vec<&str> = include_str!("plan.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("//! "))
            .filter(|l| l.starts_with("| ") && !l.starts_with("| step |"))
            .collect();
        assert_eq!(doc, table());
    }
}
