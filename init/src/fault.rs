//! Faults a test image injects on purpose, so that the upgrade tests see a new slot
//! fail in each way a real one can. `keelson.fault=` on the kernel command line names
//! one:
//!
//! - `init-fails`: stage 2 exits once STATE is mounted and the boot recorded, so the
//!   kernel panics ("Attempted to kill init") and `panic=` restarts the machine;
//! - `stage1-hang`: stage 1 arms the watchdog, then sleeps forever: the watchdog resets
//!   the machine;
//! - `unhealthy`: stage 2 never starts machined, so the node never becomes healthy;
//! - `reset-pause`: a reset stops for [`RESET_PAUSE`] after it has
//!   wiped EPHEMERAL and before STATE, and says so ([`RESET_PAUSE_MARKER`]), so that a
//!   test cuts the power between the two wipes.
//!
//! The key may also come from QEMU's firmware config ([`FW_CFG_FAULT`], as
//! `-fw_cfg name=opt/keelson/fault,string=reset-pause`), read where a fault acts after
//! the boot: a test then boots the test image unchanged, whose boot entry's command line
//! it cannot edit.
//!
//! Only a build with the cargo feature `fault-injection` acts on them (`cargo xtask
//! image --init-features fault-injection`); any other build says once that it ignores
//! the key. The exit of `init-fails` is the one place PID 1 exits, and it is compiled
//! only into that build.

use std::path::Path;
use std::time::Duration;

use keelson_configs::layout::{cmdline_value, parse_cmdline};

use crate::console::Log;
use crate::syscalls::Syscalls;

/// Kernel command-line key: the fault to inject.
pub const CMDLINE_FAULT: &str = "keelson.fault";
/// Whether this build injects faults (the cargo feature `fault-injection`).
pub const ENABLED: bool = cfg!(feature = "fault-injection");
/// The firmware config entry that may name the fault too (its `raw` file under
/// `/sys/firmware/qemu_fw_cfg/by_name/`).
pub const FW_CFG_FAULT: &str = "opt/keelson/fault";
/// How long `reset-pause` holds a reset after EPHEMERAL's wipe: long enough for a test
/// to cut the power, shorter than the watchdog's default timeout.
pub const RESET_PAUSE: Duration = Duration::from_secs(30);
/// The line `reset-pause` prints once EPHEMERAL is wiped, for the test to cut the power.
pub const RESET_PAUSE_MARKER: &str = "KEELSON FAULT RESET PAUSED";

/// A fault a test build injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Stage 2 exits after STATE is mounted and the boot recorded: a kernel panic.
    InitFails,
    /// Stage 1 arms the watchdog and sleeps forever: a watchdog reset.
    Stage1Hang,
    /// Stage 2 never starts machined: the node never becomes healthy.
    Unhealthy,
    /// A reset pauses between EPHEMERAL's wipe and STATE's.
    ResetPause,
}

impl Fault {
    /// Every fault, in the order the messages list them.
    pub const ALL: [Fault; 4] = [
        Fault::InitFails,
        Fault::Stage1Hang,
        Fault::Unhealthy,
        Fault::ResetPause,
    ];

    /// Its value on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fault::InitFails => "init-fails",
            Fault::Stage1Hang => "stage1-hang",
            Fault::Unhealthy => "unhealthy",
            Fault::ResetPause => "reset-pause",
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
            Fault::ResetPause => {
                "a reset pauses after it has wiped EPHEMERAL, before STATE (for a power cut)"
            }
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

/// The command line with the fault named in the firmware config ([`FW_CFG_FAULT`]) put
/// after it, when there is one (the command line's own key then loses: the last one wins).
pub fn with_firmware(sys: &dyn Syscalls, cmdline: &str) -> String {
    let raw = Path::new(crate::config_source::FW_CFG_BY_NAME)
        .join(FW_CFG_FAULT)
        .join("raw");
    match sys.read_file(&raw) {
        Ok(bytes) => {
            let value = String::from_utf8_lossy(&bytes);
            let value = value.trim();
            if value.is_empty() || value.contains(char::is_whitespace) {
                cmdline.to_string()
            } else {
                format!("{cmdline} {CMDLINE_FAULT}={value}")
            }
        }
        Err(_) => cmdline.to_string(),
    }
}

/// A reset, once EPHEMERAL is wiped: with `reset-pause` asked on `cmdline` (which
/// [`with_firmware`] made before the filesystems were unmounted), say so, and in a build
/// that injects faults print [`RESET_PAUSE_MARKER`] and wait
/// [`RESET_PAUSE`] before STATE's wipe.
pub fn reset_pause(sys: &dyn Syscalls, log: &dyn Log, cmdline: &str) {
    if requested(cmdline) != Some(Ok(Fault::ResetPause)) {
        return;
    }
    if let Some(line) = describe(cmdline, ENABLED) {
        log.line(&line);
    }
    if active(cmdline) == Some(Fault::ResetPause) {
        let pause = RESET_PAUSE;
        log.raw(&format!(
            "{RESET_PAUSE_MARKER}: EPHEMERAL is wiped, STATE is not; waiting {} s",
            pause.as_secs()
        ));
        log.flush();
        sys.sleep(pause);
    }
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
                "keelson.fault=\"hang\" ignored: not a fault (one of init-fails, stage1-hang, unhealthy, reset-pause)"
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

    #[test]
    fn the_reset_pause_may_come_from_the_firmware_config() {
        use crate::console::memory::MemoryLog;
        use crate::syscalls::fake::{Call, Fake};
        let raw = "/sys/firmware/qemu_fw_cfg/by_name/opt/keelson/fault/raw";
        let fake = Fake::new().with_file(raw, "reset-pause\n");
        let cmdline = with_firmware(&fake, "console=ttyS0");
        assert_eq!(cmdline, "console=ttyS0 keelson.fault=reset-pause");
        assert_eq!(requested(&cmdline), Some(Ok(Fault::ResetPause)));
        assert_eq!(
            with_firmware(&Fake::new(), "console=ttyS0"),
            "console=ttyS0"
        );
        let log = MemoryLog::default();
        reset_pause(&fake, &log, "console=ttyS0");
        assert!(log.lines().is_empty(), "not asked: nothing said");
        reset_pause(&fake, &log, &cmdline);
        let pause = Call::Sleep(RESET_PAUSE);
        assert_eq!(fake.calls().contains(&pause), ENABLED);
        let said = log.lines().join("\n");
        assert!(said.contains("reset-pause"), "{said}");
        assert_eq!(said.contains(RESET_PAUSE_MARKER), ENABLED, "{said}");
    }
}
