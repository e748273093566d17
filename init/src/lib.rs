//! `init`: Keelson's PID 1, in two stages (initramfs, then the verity-protected root).
//!
//! One binary serves both: the kernel runs it as `/init` in the initramfs (stage 1,
//! [`stage1`]), and stage 1 execs it as `/sbin/init --stage2` in the verified root
//! ([`stage2`]). Everything that touches the kernel goes through [`syscalls::Syscalls`]
//! so that the boot logic is unit-tested without root; clippy's `disallowed-methods`
//! (`init/clippy.toml`) keeps PID 1 from starting programs or writing files beside it
//! (only the supervisor's runner and STATE's atomic write may).
//!
//! The modules import each other without a cycle (the tidy test, `tests/tidy`, fails
//! naming one): the stage 2 loop's producers (signals, the supervisor's runner, the
//! control socket, the network, the power button, the prefetch, the config fetch) own
//! their message types and send them through a typed [`sender::Sender`]; [`events`]
//! only gathers them. Networking is its own crate, `keelson-netconf` (`init/netconf`).
//!
//! PID 1 never panics and never returns: [`pid1_main`] installs a panic hook that logs,
//! syncs and reboots, and turns any error into a console message followed by a deliberate
//! reboot.

pub mod blockdev;
pub mod boot_assess;
pub mod bootlog;
pub mod cmdline;
pub mod config_source;
pub mod console;
pub mod control;
pub mod disks;
pub mod dm;
pub mod dm_abi;
pub mod drivers;
pub mod etc_files;
pub mod events;
pub mod fault;
pub mod kmods;
pub mod lifecycle;
pub mod live;
pub mod logging;
pub mod modules;
pub mod mounts;
pub mod network;
pub mod power_button;
pub mod prefetch;
pub mod preflight;
pub mod sender;
pub mod services;
pub mod shutdown;
pub mod signals;
pub mod stage1;
pub mod stage2;
pub mod state;
pub mod supervisor;
pub mod swap;
pub mod syscalls;
pub mod sysctl;
pub mod watchdog;

use std::convert::Infallible;
use std::error::Error as StdError;
use std::time::Duration;

use console::{Console, Log};
use syscalls::{Linux, RebootHow, Syscalls, errno_name};

/// How long a fatal message stays on the console before the reboot.
pub const FATAL_DELAY: Duration = Duration::from_secs(5);

/// Which stage this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// In the initramfs (`/init`).
    One,
    /// In the verified root (`/sbin/init --stage2`).
    Two,
}

/// The stage from our arguments: `--stage2` anywhere after `argv[0]` means stage 2.
pub fn stage_from_args<I: IntoIterator<Item = String>>(args: I) -> Stage {
    if args
        .into_iter()
        .skip(1)
        .any(|a| a == keelson_configs::layout::STAGE2_ARG)
    {
        Stage::Two
    } else {
        Stage::One
    }
}

/// Read `reader` to its end into `buf`, discarding the bytes (stage 1's verity check and
/// stage 2's prefetch): how many were read, and the error that stopped it early.
pub fn drain(reader: &mut dyn std::io::Read, buf: &mut [u8]) -> (u64, Option<std::io::Error>) {
    let mut total: u64 = 0;
    loop {
        match reader.read(buf) {
            Ok(0) => return (total, None),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (total, Some(e)),
        }
    }
}

/// An error and its sources as one line: `what failed: why: ...`. I/O errors are left out
/// of the chain because every message that wraps one already names its errno.
pub fn error_chain(err: &dyn StdError) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        if e.downcast_ref::<std::io::Error>().is_none() {
            text.push_str(": ");
            text.push_str(&e.to_string());
        }
        source = e.source();
    }
    text
}

/// Log `err`, wait [`FATAL_DELAY`], sync and restart the machine; never returns.
pub fn fatal(sys: &dyn Syscalls, log: &dyn Log, err: &dyn StdError) -> ! {
    log.line(&error_chain(err));
    log.line(&format!("rebooting in {} s", FATAL_DELAY.as_secs()));
    sys.sleep(FATAL_DELAY);
    sys.sync();
    let refused = sys.reboot(RebootHow::Restart);
    log.line(&format!(
        "reboot refused ({}): halting here",
        errno_name(&refused)
    ));
    loop {
        sys.sleep(Duration::from_secs(3600));
    }
}

/// Install the panic hook: message on the console, writable filesystems made read-only,
/// sync, restart.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        console::emergency(&format!("panic: {info}"));
        console::emergency(&format!("rebooting in {} s", FATAL_DELAY.as_secs()));
        let sys = Linux;
        sys.sleep(FATAL_DELAY);
        // Stage 2 has STATE and EPHEMERAL mounted: leave them clean for the next boot.
        shutdown::emergency_readonly(&sys);
        sys.sync();
        let _ = sys.reboot(RebootHow::Restart);
        loop {
            sys.sleep(Duration::from_secs(3600));
        }
    }));
}

/// The root's `/sbin/init`: stage 2 as PID 1 (or stage 1, without `--stage2`). Not
/// being PID 1 is the one case where it exits (a mistaken run on a workstation must not
/// try to mount or reboot anything).
pub fn pid1_main() -> ! {
    run_as_pid1(|sys, log| match stage_from_args(std::env::args()) {
        Stage::One => stage1::run(sys, log, &stage1::Paths::default()).map_err(Box::from),
        Stage::Two => stage2::run(sys, log).map_err(Box::<dyn StdError>::from),
    })
}

/// The initramfs's `/init` (the `init-stage1` binary): stage 1 alone. Without stage 2's
/// code (tokio, netlink, DHCP, the config checker) it is 0.9 MB instead of 4.3 MB, which
/// the firmware reads and the kernel unpacks on every boot before anything of ours runs.
pub fn stage1_main() -> ! {
    run_as_pid1(|sys, log| {
        stage1::run(sys, log, &stage1::Paths::default()).map_err(Box::<dyn StdError>::from)
    })
}

/// Run one stage as PID 1: the panic hook, then `run`, whose error is fatal. Generic, so
/// that each binary links only the stages its `run` names.
fn run_as_pid1<F>(run: F) -> !
where
    F: FnOnce(&Linux, &Console) -> Result<Infallible, Box<dyn StdError>>,
{
    if !rustix::process::getpid().is_init() {
        eprintln!("keelson-init: this is Keelson's PID 1 and must be started by the kernel");
        std::process::exit(2);
    }
    install_panic_hook();
    let sys = Linux;
    let log = Console::new();
    match run(&sys, &log) {
        Err(err) => fatal(&sys, &log, err.as_ref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stage_comes_from_argv() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(stage_from_args(args(&["/init"])), Stage::One);
        assert_eq!(stage_from_args(args(&[])), Stage::One);
        assert_eq!(
            stage_from_args(args(&["/sbin/init", "--stage2"])),
            Stage::Two
        );
        // The kernel passes unknown command-line words to init; only our flag counts.
        assert_eq!(stage_from_args(args(&["/init", "stage2"])), Stage::One);
    }

    #[test]
    fn chains_skip_io_errors_named_by_their_wrapper() {
        let err = stage1::Error::Dm {
            partname: "ROOT-A",
            device: "/dev/vda2".into(),
            source: dm::Error::Ioctl {
                ioctl: "DM_TABLE_LOAD",
                control: "/dev/mapper/control".into(),
                source: std::io::Error::from_raw_os_error(16),
            },
        };
        assert_eq!(
            error_chain(&err),
            "cannot set up dm-verity for ROOT-A (/dev/vda2): device-mapper ioctl DM_TABLE_LOAD on \
             /dev/mapper/control failed with EBUSY (16): a device of that name already exists"
        );
    }
}
