//! The stage-1 watch: a VM that shows no stage-1 line on its serial console within a
//! deadline of its power-on is hung, and is power-cycled (QEMU killed and started again
//! on the same disk, UEFI variables and network: a cold reset), at most twice.
//!
//! Why: once in about 40 boots on a loaded host an amd64 VM printed nothing after the
//! EFI stub's "Loaded initrd" line, its vCPUs idle, and `cluster create` waited on it for
//! its whole 20 minutes (issue 17). Before stage 1 nothing of ours runs: the hardware
//! watchdog that resets a hung node is armed by stage 1 itself (init's `watchdog`), so
//! between power-on and stage 1 only the host can tell that a machine is hung. An RCU
//! stall report before stage 1 (a secondary vCPU's timer interrupt lost under TCG during
//! the kernel's early boot) is the same hang, seen sooner.
//!
//! `cluster create`, `cluster start` and the tests' guest builder all apply this one rule
//! through [`Watch`]; what they read is the console since the last power-on
//! ([`since_power_on`]: a power-cycled node's console log keeps every boot, each after a
//! `===== power cycle N =====` line).
//!
//! The deadlines come from the boot figures in BENCHMARKS.md: QEMU start to the stage-1
//! line took 7.1 to 8.7 s under TCG (one amd64 guest with 2 vCPUs on this 2-core host,
//! firmware ~2.5-3 s of it). Three guests sharing those cores under the lead's builds
//! take about three times that; 90 s is ten times the idle figure. An arm64 guest on an
//! amd64 host has no figure yet and emulates a foreign instruction set, so it gets
//! twice that. Under KVM the firmware and kernel take a few seconds: 30 s.
//! `KEELSON_STAGE1_DEADLINE=SECS` overrides all of them.
//!
//! The test hook `KEELSON_TEST_FREEZE_BEFORE_STAGE1=NODE[,NODE...]` makes `cluster
//! create` start each named node's first QEMU with its CPUs held at reset (QEMU's `-S`):
//! frozen before the firmware, so no stage-1 line ever comes. The power-cycled QEMU runs
//! normally. It exists for the test that shows a frozen node power-cycled into a healthy
//! cluster, and does nothing unless set.

use std::time::{Duration, Instant};

use keelson_configs::layout::Arch;

use crate::qemu::{Accel, host_arch};

/// What stage 1 prints first on the console (`init/src/stage1.rs`, with the console's
/// `keelson-init: ` prefix); a test below keeps the two the same.
pub const STAGE1_LINE: &str = "keelson-init: stage 1 started";
/// How long after power-on a KVM guest may take to show [`STAGE1_LINE`].
pub const DEADLINE_KVM: Duration = Duration::from_secs(30);
/// How long after power-on a guest of the host's architecture under TCG may take.
pub const DEADLINE_TCG: Duration = Duration::from_secs(90);
/// How long after power-on a guest of another architecture under TCG may take.
pub const DEADLINE_TCG_FOREIGN: Duration = Duration::from_secs(180);
/// How many times a hung VM is power-cycled before it is given up on.
pub const MAX_POWER_CYCLES: u32 = 2;
/// The variable that overrides the deadline, in seconds.
pub const DEADLINE_ENV: &str = "KEELSON_STAGE1_DEADLINE";
/// The test hook: the nodes whose first QEMU starts frozen (comma-separated names).
pub const FREEZE_ENV: &str = "KEELSON_TEST_FREEZE_BEFORE_STAGE1";
/// How every power-cycle marker line of a console log begins.
const MARKER_START: &str = "===== power cycle ";

/// The line written to a node's console log before its `n`th power cycle's boot.
pub fn power_cycle_marker(n: u32) -> String {
    format!("{MARKER_START}{n} =====")
}

/// The console since the last power-on: what follows the last power-cycle marker line.
pub fn since_power_on(console: &str) -> &str {
    match console.rfind(MARKER_START) {
        Some(at) => console[at..].split_once('\n').map_or("", |(_, rest)| rest),
        None => console,
    }
}

/// Whether the kernel reported an RCU stall before stage 1 started.
pub fn kernel_stalled_before_stage1(console: &str) -> bool {
    console.contains("rcu_preempt detected stalls") && !console.contains(STAGE1_LINE)
}

/// The deadline for a guest of `arch` under `accel` on this host, or
/// [`DEADLINE_ENV`]'s when set; an error says what is wrong with that variable.
pub fn deadline(arch: Arch, accel: Accel) -> Result<Duration, String> {
    deadline_for(
        arch,
        accel,
        host_arch(),
        std::env::var(DEADLINE_ENV).ok().as_deref(),
    )
}

fn deadline_for(
    arch: Arch,
    accel: Accel,
    host: Option<Arch>,
    set: Option<&str>,
) -> Result<Duration, String> {
    if let Some(text) = set.filter(|t| !t.trim().is_empty()) {
        return match text.trim().parse::<u64>() {
            Ok(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
            _ => Err(format!(
                "{DEADLINE_ENV}={text:?}: give the stage-1 deadline as a whole number of seconds above 0, or unset it for the default"
            )),
        };
    }
    Ok(match accel {
        Accel::Kvm => DEADLINE_KVM,
        Accel::Tcg if host == Some(arch) => DEADLINE_TCG,
        Accel::Tcg => DEADLINE_TCG_FOREIGN,
    })
}

/// Whether the test hook ([`FREEZE_ENV`]) names `node`.
pub fn frozen_at_first_power_on(node: &str) -> bool {
    std::env::var(FREEZE_ENV).is_ok_and(|v| names(&v, node))
}

fn names(list: &str, node: &str) -> bool {
    list.split(',').any(|n| n.trim() == node)
}

/// Why a VM counts as hung.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hang {
    /// No stage-1 line within the deadline.
    Silent(Duration),
    /// The kernel reported an RCU stall before stage 1.
    KernelStalled,
}

/// What to do about a VM now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Stage 1 started since the last power-on: nothing more to watch.
    Booted,
    /// Not yet, and the deadline has not passed.
    Waiting,
    /// Hung: power-cycle it; this is its `cycle`th power cycle.
    PowerCycle {
        /// Which power cycle this is (1 or 2).
        cycle: u32,
        /// Why.
        hang: Hang,
    },
    /// Hung again after [`MAX_POWER_CYCLES`] power cycles: give up.
    GiveUp(Hang),
}

/// One VM's watch from its power-on until stage 1 starts.
#[derive(Debug, Clone)]
pub struct Watch {
    deadline: Duration,
    powered_on: Instant,
    cycles: u32,
    booted: bool,
}

impl Watch {
    /// A VM powered on at `powered_on`, to show stage 1 within `deadline`.
    pub fn new(deadline: Duration, powered_on: Instant) -> Watch {
        Watch {
            deadline,
            powered_on,
            cycles: 0,
            booted: false,
        }
    }

    /// The deadline.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// How many times the VM was power-cycled.
    pub fn cycles(&self) -> u32 {
        self.cycles
    }

    /// Whether stage 1 started since the last power-on.
    pub fn booted(&self) -> bool {
        self.booted
    }

    /// Counts the VM as booted without its stage-1 line (its API answered: an image
    /// whose console is elsewhere).
    pub fn answered(&mut self) {
        self.booted = true;
    }

    /// What to do, given the VM's whole console log at `now`.
    pub fn check(&mut self, console: &str, now: Instant) -> Step {
        if self.booted {
            return Step::Booted;
        }
        let since = since_power_on(console);
        if since.contains(STAGE1_LINE) {
            self.booted = true;
            return Step::Booted;
        }
        let hang = if kernel_stalled_before_stage1(since) {
            Hang::KernelStalled
        } else if now.saturating_duration_since(self.powered_on) >= self.deadline {
            Hang::Silent(self.deadline)
        } else {
            return Step::Waiting;
        };
        if self.cycles < MAX_POWER_CYCLES {
            Step::PowerCycle {
                cycle: self.cycles + 1,
                hang,
            }
        } else {
            Step::GiveUp(hang)
        }
    }

    /// The VM was power-cycled at `now`.
    pub fn power_cycled(&mut self, now: Instant) {
        self.cycles += 1;
        self.powered_on = now;
        self.booted = false;
    }
}

/// What a hung VM did, after its name in a progress line or an error ("node X
/// printed nothing for 90 s after power-on"), with the last line it printed if any.
pub fn describe(hang: Hang, console: &str) -> String {
    match hang {
        Hang::KernelStalled => {
            "stalled in its kernel before stage 1 started (an RCU stall report: a timer interrupt lost under emulation)".to_owned()
        }
        Hang::Silent(deadline) => {
            let since = since_power_on(console);
            match since.lines().rev().map(str::trim).find(|l| !l.is_empty()) {
                None => format!("printed nothing for {} s after power-on", deadline.as_secs()),
                Some(line) => format!(
                    "printed no stage-1 line ({STAGE1_LINE:?}) for {} s after power-on; its last line: {:?}",
                    deadline.as_secs(),
                    short(line)
                ),
            }
        }
    }
}

fn short(line: &str) -> String {
    match line.char_indices().nth(120) {
        Some((i, _)) => format!("{}...", &line[..i]),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const STALL: &str = "[  22.23] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n";

    /// Runs `events` (seconds since the first power-on, console so far, whether the VM is
    /// power-cycled right after that look) through one watch with a 90 s deadline, and
    /// checks each step.
    fn check(events: &[(u64, &str, bool)], expected: &[Step]) {
        let start = Instant::now();
        let mut watch = Watch::new(Duration::from_secs(90), start);
        let mut got = Vec::new();
        for &(at, console, cycle) in events {
            let now = start + Duration::from_secs(at);
            got.push(watch.check(console, now));
            if cycle {
                watch.power_cycled(now);
            }
        }
        assert_eq!(got, expected, "{events:?}");
    }

    const SILENT: Hang = Hang::Silent(Duration::from_secs(90));

    #[test]
    fn a_vm_silent_past_the_deadline_is_power_cycled_twice_then_given_up() {
        let m1 = format!("{}\n", power_cycle_marker(1));
        let m2 = format!("{m1}{}\n", power_cycle_marker(2));
        check(
            &[
                (10, "", false),
                (89, "EFI stub: Loaded initrd\n", false),
                (90, "EFI stub: Loaded initrd\n", true),
                (100, &m1, false),
                (180, &m1, true),
                (269, &m2, false),
                (270, &m2, false),
            ],
            &[
                Step::Waiting,
                Step::Waiting,
                Step::PowerCycle {
                    cycle: 1,
                    hang: SILENT,
                },
                Step::Waiting,
                Step::PowerCycle {
                    cycle: 2,
                    hang: SILENT,
                },
                Step::Waiting,
                Step::GiveUp(SILENT),
            ],
        );
    }

    #[test]
    fn stage_1_ends_the_watch_but_only_after_the_last_power_on() {
        let booted = format!("{STAGE1_LINE} (keelson-init 0.1.0)\n");
        // The stage-1 line of a boot before the power cycle does not count.
        let cycled = format!("{booted}{}\nBdsDxe: loading\n", power_cycle_marker(1));
        check(
            &[
                (95, &cycled, false),
                (300, &format!("{cycled}{booted}"), false),
            ],
            &[
                Step::PowerCycle {
                    cycle: 1,
                    hang: SILENT,
                },
                Step::Booted,
            ],
        );
        // Once booted, always booted: a later hang is the hardware watchdog's.
        check(
            &[(5, &booted, false), (500, "", false)],
            &[Step::Booted, Step::Booted],
        );
    }

    #[test]
    fn a_kernel_stall_before_stage_1_is_a_hang_at_once() {
        let stalled = format!("EFI stub: Loaded initrd\n{STALL}");
        check(
            &[
                (20, &stalled, true),
                (40, &format!("{stalled}{}\n", power_cycle_marker(1)), false),
            ],
            &[
                Step::PowerCycle {
                    cycle: 1,
                    hang: Hang::KernelStalled,
                },
                Step::Waiting,
            ],
        );
        assert!(!kernel_stalled_before_stage1(&format!(
            "{STAGE1_LINE}\n{STALL}"
        )));
        assert!(!kernel_stalled_before_stage1("EFI stub: Loaded initrd\n"));
    }

    #[test]
    fn an_answering_api_counts_as_booted() {
        let start = Instant::now();
        let mut watch = Watch::new(Duration::from_secs(30), start);
        watch.answered();
        assert_eq!(
            watch.check("", start + Duration::from_secs(60)),
            Step::Booted
        );
    }

    #[test]
    fn the_deadline_follows_the_accelerator_and_the_variable() {
        let d = |arch, accel, set| deadline_for(arch, accel, Some(Arch::Amd64), set);
        assert_eq!(d(Arch::Amd64, Accel::Kvm, None), Ok(DEADLINE_KVM));
        assert_eq!(d(Arch::Amd64, Accel::Tcg, None), Ok(DEADLINE_TCG));
        assert_eq!(d(Arch::Arm64, Accel::Tcg, None), Ok(DEADLINE_TCG_FOREIGN));
        assert_eq!(d(Arch::Amd64, Accel::Tcg, Some("")), Ok(DEADLINE_TCG));
        assert_eq!(
            d(Arch::Arm64, Accel::Tcg, Some(" 45 ")),
            Ok(Duration::from_secs(45))
        );
        for bad in ["0", "-1", "90s", "x"] {
            let err = d(Arch::Amd64, Accel::Tcg, Some(bad)).unwrap_err();
            assert!(
                err.contains(DEADLINE_ENV) && err.contains("seconds"),
                "{err}"
            );
        }
    }

    #[test]
    fn the_freeze_hook_names_whole_node_names() {
        assert!(names("demo-controlplane-1", "demo-controlplane-1"));
        assert!(names("a, demo-worker-1", "demo-worker-1"));
        assert!(!names("demo-controlplane-1", "demo-controlplane-10"));
        assert!(!names("", "demo-controlplane-1"));
    }

    #[test]
    fn a_hang_is_described_with_the_last_line() {
        assert_eq!(
            describe(SILENT, ""),
            "printed nothing for 90 s after power-on"
        );
        let console = format!(
            "BdsDxe: booting\n{}\nEFI stub: Loaded initrd from LINUX_EFI_INITRD_MEDIA_GUID device path\n\n",
            power_cycle_marker(1)
        );
        assert_eq!(
            describe(SILENT, &console),
            "printed no stage-1 line (\"keelson-init: stage 1 started\") for 90 s after power-on; its last line: \"EFI stub: Loaded initrd from LINUX_EFI_INITRD_MEDIA_GUID device path\""
        );
        // Only this power-on's lines count.
        assert_eq!(
            describe(
                SILENT,
                &format!("BdsDxe: booting\n{}\n", power_cycle_marker(2))
            ),
            "printed nothing for 90 s after power-on"
        );
        assert!(describe(Hang::KernelStalled, STALL).contains("RCU stall"));
    }

    /// The line watched for is the one init prints: stage 1's first line, after the
    /// console's prefix.
    #[test]
    fn the_stage_1_line_is_inits() {
        let init = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../init/src");
        let stage1 = std::fs::read_to_string(init.join("stage1.rs")).unwrap();
        let console = std::fs::read_to_string(init.join("console.rs")).unwrap();
        let (prefix, message) = STAGE1_LINE.split_at("keelson-init: ".len());
        assert!(
            console.contains(&format!("pub const PREFIX: &str = {prefix:?};")),
            "init's console prefix is no longer {prefix:?}"
        );
        assert!(
            stage1.contains(&format!("\"{message} (keelson-init {{}})\"")),
            "init's stage 1 no longer prints {message:?} first"
        );
    }
}
