//! Faults a test image injects on purpose, so that the upgrade tests see a new slot
//! fail in each way a real one can. `keelson.fault=` on the kernel command line names
//! one:
//!
//! - `init-fails`: stage 2 exits once STATE is mounted and the boot recorded, so the
//!   kernel panics ("Attempted to kill init") and `panic=` restarts the machine;
//! - `stage1-hang`: stage 1 arms the watchdog, then sleeps forever: the watchdog resets
//!   the machine;
//! - `unhealthy`: stage 2 never starts machined, so the node never becomes healthy.
//!
//! Only a build with the cargo feature `fault-injection` acts on them (`cargo xtask
//! image --init-features fault-injection`); any other build says once that it ignores
//! the key. The exit of `init-fails` is the one place PID 1 exits, and it is compiled
//! only into that build.

use std::time::Duration;

use keelson_configs::layout::{cmdline_value, parse_cmdline};

use crate::console::Log;
use crate::syscalls::Syscalls;

/// Kernel command-line key: the fault to inject.
pub const CMDLINE_FAULT: &str = "keelson.fault";
/// Whether this build injects faults (the cargo feature `fault-injection`).
pub const ENABLED: bool = cfg!(feature = "fault-injection");

/// A fault a test build injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Stage 2 exits after STATE is mounted and the boot recorded: a kernel panic.
    InitFails,
    /// Stage 1 arms the watchdog and sleeps forever: a watchdog reset.
    Stage1Hang,
    /// Stage 2 never starts machined: the node never becomes healthy.
    Unhealthy,
}

impl Fault {
    /// Every fault, in the order the messages list them.
    pub const ALL: [Fault; 3] = [Fault::InitFails, Fault::Stage1Hang, Fault::Unhealthy];

    /// Its value on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fault::InitFails => "init-fails",
            Fault::Stage1Hang => "stage1-hang",
            Fault::Unhealthy => "unhealthy",
        }
    }

    /// What the fault does, for the line that announces it.
    fn effect(self) -> &'static str {
        match self {
            Fault::InitFails => {
                "stage 2 exits once STATE is mounted and the boot recorded (the kernel panics: Attempted to kill init)"
            }
            Fault::Stage1Hang => {
                "stage 1 sleeps forever with the watchdog armed (the watchdog resets the machine)"
            }
            Fault::Unhealthy => "machined is never started (the node never becomes healthy)",
        }
    }

    /// The fault named `value`, if it is one.
    pub fn parse(value: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == value)
    }
}

/// What `cmdline` asks for: nothing, a fault, or a value that names none (`Err`).
pub fn requested(cmdline: &str) -> Option<Result<Fault, String>> {
    let args = parse_cmdline(cmdline);
    let value = cmdline_value(&args, CMDLINE_FAULT)?;
    Some(Fault::parse(value).ok_or_else(|| value.to_string()))
}

/// The fault this build acts on: the one `cmdline` names, in a build that injects
/// faults; never one in any other.
pub fn active(cmdline: &str) -> Option<Fault> {
    if !ENABLED {
        return None;
    }
    requested(cmdline)?.ok()
}

/// The line that says what a build (`enabled`: one with fault injection) does with the
/// key on `cmdline`; `None` without the key.
pub fn describe(cmdline: &str, enabled: bool) -> Option<String> {
    let requested = requested(cmdline)?;
    let value = match &requested {
        Ok(fault) => fault.name(),
        Err(value) => value.as_str(),
    };
    Some(match requested {
        _ if !enabled => format!(
            "{CMDLINE_FAULT}={value} ignored: this build of init has no fault injection (cargo feature fault-injection)"
        ),
        Ok(fault) => format!("fault injection: {}: {}", fault.name(), fault.effect()),
        Err(_) => format!(
            "{CMDLINE_FAULT}={value:?} ignored: not a fault (one of {})",
            Fault::ALL.map(Fault::name).join(", ")
        ),
    })
}

/// Stage 1, once the watchdog is armed: with `stage1-hang` asked, say so, and in a
/// build that injects faults sleep forever.
pub fn stage1(sys: &dyn Syscalls, log: &dyn Log, cmdline: &str) {
    if requested(cmdline) != Some(Ok(Fault::Stage1Hang)) {
        return;
    }
    if let Some(line) = describe(cmdline, ENABLED) {
        log.line(&line);
    }
    if active(cmdline) == Some(Fault::Stage1Hang) {
        loop {
            sys.sleep(Duration::from_secs(3600));
        }
    }
}

/// Stage 2, once STATE is mounted and the boot recorded: say what is done with any fault
/// but stage 1's (said there), and with `init-fails` in a build that injects faults,
/// sync and exit.
pub fn stage2(sys: &dyn Syscalls, log: &dyn Log, cmdline: &str) {
    if matches!(requested(cmdline), None | Some(Ok(Fault::Stage1Hang))) {
        return;
    }
    if let Some(line) = describe(cmdline, ENABLED) {
        log.line(&line);
    }
    #[cfg(feature = "fault-injection")]
    if active(cmdline) == Some(Fault::InitFails) {
        sys.sync();
        log.flush();
        // The fault itself: PID 1 exits, which the kernel answers with a panic.
        std::process::exit(1);
    }
    let _ = sys;
}

/// Whether stage 2 leaves machined out (the `unhealthy` fault, in a build that injects
/// faults).
pub fn hides_machined(cmdline: &str) -> bool {
    active(cmdline) == Some(Fault::Unhealthy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(cmdline: &str, expected: Option<Result<Fault, &str>>) {
        let got = requested(cmdline);
        assert_eq!(
            got,
            expected.map(|r| r.map_err(str::to_string)),
            "{cmdline}"
        );
    }

    #[test]
    fn the_fault_comes_from_the_command_line() {
        check("console=ttyS0 panic=10", None);
        check(
            "keelson.fault=init-fails panic=10",
            Some(Ok(Fault::InitFails)),
        );
        check("keelson.fault=stage1-hang", Some(Ok(Fault::Stage1Hang)));
        check("a keelson.fault=unhealthy b", Some(Ok(Fault::Unhealthy)));
        // The last one wins, as for every key.
        check(
            "keelson.fault=unhealthy keelson.fault=init-fails",
            Some(Ok(Fault::InitFails)),
        );
        check("keelson.fault=Init-Fails", Some(Err("Init-Fails")));
        check("keelson.fault=", Some(Err("")));
        check("keelson.faults=init-fails", None);
        for fault in Fault::ALL {
            assert_eq!(Fault::parse(fault.name()), Some(fault));
        }
    }

    #[test]
    fn a_build_without_fault_injection_says_it_ignores_the_key() {
        assert_eq!(describe("console=ttyS0", false), None);
        assert_eq!(
            describe("keelson.fault=init-fails", false).as_deref(),
            Some(
                "keelson.fault=init-fails ignored: this build of init has no fault injection (cargo feature fault-injection)"
            )
        );
        assert_eq!(
            describe("keelson.fault=hang", false).as_deref(),
            Some(
                "keelson.fault=hang ignored: this build of init has no fault injection (cargo feature fault-injection)"
            )
        );
    }

    #[test]
    fn a_build_with_fault_injection_names_the_fault_or_the_choices() {
        assert_eq!(
            describe("keelson.fault=unhealthy", true).as_deref(),
            Some(
                "fault injection: unhealthy: machined is never started (the node never becomes healthy)"
            )
        );
        assert_eq!(
            describe("keelson.fault=hang", true).as_deref(),
            Some(
                "keelson.fault=\"hang\" ignored: not a fault (one of init-fails, stage1-hang, unhealthy)"
            )
        );
    }

    #[test]
    fn only_a_fault_injection_build_acts() {
        let cmdline = "keelson.fault=unhealthy";
        assert_eq!(active(cmdline).is_some(), ENABLED);
        assert_eq!(hides_machined(cmdline), ENABLED);
        assert!(!hides_machined("keelson.fault=init-fails"));
        assert_eq!(active("keelson.fault=nothing"), None);
    }
}
