//! A configured node's STATE that fails to mount for a reason that may pass (the disk
//! not ready yet, busy, or answering I/O errors for a while): tried again with backoff
//! for a bounded time, each try said on the console, before stage 2 gives up on it.
//!
//! A node is configured, as far as its disk tells, when its STATE was not created at
//! this boot: the partition was in the table already, and it is not blank (a blank one
//! is [`Error::Deferred`], formatted as a new node's). Without STATE such a node must
//! not serve maintenance mode, where anyone on the network could push it a config
//! (`Node::start_maintenance` refuses, and the reminder says why), so it is worth
//! waiting [`total_wait`] for a STATE that comes back; one that does not come back
//! leaves the node in that state, said on the console, until it is repaired.
//!
//! What is tried again ([`transient`]): a probe or a mount that failed with `EIO`,
//! `EBUSY`, `ENXIO`, `ENOENT`, `ENOMEDIUM`, `EAGAIN` or `ETIMEDOUT`, and a STATE in the
//! table that the kernel has no device for yet. A damaged filesystem (`EUCLEAN`,
//! `EINVAL`, a head with no superblock), a missing ext4 driver or a missing partition
//! will not pass by waiting and are reported at once.

use std::time::Duration;

use keelson_configs::layout::PART_STATE;

use super::{Error, Mounted, Options, Report, mount_hint, prepare_state};
use crate::console::Log;
use crate::syscalls::{Syscalls, errno_name};

/// The waits before each new try: 6 tries over 23 s.
pub const STATE_RETRY_DELAYS: [Duration; 5] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(8),
];

/// The time the tries may wait in all.
pub fn total_wait() -> Duration {
    STATE_RETRY_DELAYS.iter().sum()
}

/// The errnos that may pass by waiting: I/O errors, busy, no such device or address,
/// no device node yet, no medium, try again, timed out.
const TRANSIENT_ERRNOS: [i32; 7] = [5, 16, 6, 2, 123, 11, 110];

/// Whether STATE's `error` may pass by waiting (see the module doc); `created` says that
/// STATE was created at this boot (a new node, whose missing device node waits for the
/// next boot, not for a retry).
pub fn transient(error: &Error, created: bool) -> bool {
    match error {
        Error::Probe { source, .. } | Error::Mount { source, .. } => source
            .raw_os_error()
            .is_some_and(|errno| TRANSIENT_ERRNOS.contains(&errno)),
        Error::NoDevice { .. } => !created,
        _ => false,
    }
}

/// Whether `report`'s STATE was created at this boot.
pub fn state_created(report: &Report) -> bool {
    report.change.before.is_some()
        && report
            .change
            .plan
            .create
            .iter()
            .any(|p| p.name == PART_STATE)
}

/// STATE's device as `error` names it, or its disk's partition.
fn device_of(error: &Error) -> String {
    match error {
        Error::Probe { device, .. } | Error::Mount { device, .. } => device.clone(),
        Error::NoDevice { number, disk, .. } => format!("partition {number} of {disk}"),
        _ => "?".into(),
    }
}

/// Why `error` failed, short, for the try's line.
fn why(error: &Error) -> String {
    match error {
        Error::Probe { source, .. } => format!("cannot be read: {}", errno_name(source)),
        Error::Mount { source, .. } => format!(
            "cannot be mounted: {} ({})",
            errno_name(source),
            mount_hint(source)
        ),
        Error::NoDevice { .. } => "has no device node yet".into(),
        other => other.to_string(),
    }
}

/// The policy: while `result` is a transient failure (`created`: see [`transient`]),
/// say so, `wait` the next delay of [`STATE_RETRY_DELAYS`] and try `again`; the last
/// outcome, with a line when the tries are spent.
pub fn retry_state(
    log: &dyn Log,
    mut result: Result<Mounted, Error>,
    created: bool,
    wait: &mut dyn FnMut(Duration),
    again: &mut dyn FnMut() -> Result<Mounted, Error>,
) -> Result<Mounted, Error> {
    let tries = STATE_RETRY_DELAYS.len() + 1;
    for (i, delay) in STATE_RETRY_DELAYS.iter().enumerate() {
        let error = match &result {
            Err(e) if transient(e, created) => e,
            _ => return result,
        };
        log.line(&format!(
            "STATE ({}) {}: this node's disk has a STATE, which may hold its config, so the node waits for it rather than serve maintenance mode: try {} of {tries} in {} s",
            device_of(error),
            why(error),
            i + 2,
            delay.as_secs()
        ));
        wait(*delay);
        result = again();
        if result.is_ok() {
            log.line(&format!("STATE mounted at try {} of {tries}", i + 2));
        }
    }
    if let Err(e) = &result
        && transient(e, created)
    {
        log.line(&format!(
            "STATE ({}) {} after {tries} tries over {} s: given up for this boot",
            device_of(e),
            why(e),
            total_wait().as_secs()
        ));
    }
    result
}

/// [`retry_state`] on the disks: STATE prepared again on `report`'s boot disk, each
/// wait through `wait` (which keeps the watchdog fed). `report.state` becomes the last
/// outcome.
pub fn retry_report(
    sys: &dyn Syscalls,
    log: &dyn Log,
    opts: &Options,
    report: &mut Report,
    wait: &mut dyn FnMut(Duration),
) {
    let created = state_created(report);
    let first = std::mem::replace(
        &mut report.state,
        Err(Error::NoBootDisk { why: String::new() }),
    );
    let disk = report.boot.disk.clone();
    let mut again = || {
        let result = prepare_state(sys, log, opts, &disk);
        if let Err(e) = &result
            && !transient(e, created)
            && !matches!(e, Error::Deferred { .. })
        {
            log.line(&crate::error_chain(e));
        }
        result
    };
    report.state = retry_state(log, first, created, wait, &mut again);
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::io;

    use super::*;
    use crate::console::memory::MemoryLog;

    fn mount_error(errno: i32) -> Error {
        Error::Mount {
            name: PART_STATE,
            device: "/dev/vda4".into(),
            target: "/system/state".into(),
            hint: "",
            source: io::Error::from_raw_os_error(errno),
        }
    }

    fn mounted() -> Mounted {
        Mounted {
            device: "/dev/vda4".into(),
            target: "/system/state".into(),
            formatted: false,
            resized: false,
            size: 100 << 20,
        }
    }

    /// `retry_state` from a first `errno`, the tries answering `answers` in turn (then
    /// the last again): the outcome, the waits, the lines.
    fn run(
        first: Result<Mounted, Error>,
        created: bool,
        answers: Vec<Option<i32>>,
    ) -> (Result<Mounted, Error>, Vec<Duration>, Vec<String>) {
        let log = MemoryLog::default();
        let waits = RefCell::new(Vec::new());
        let mut tries = 0;
        let mut again = || {
            let answer = answers.get(tries).or(answers.last()).copied().flatten();
            tries += 1;
            match answer {
                Some(errno) => Err(mount_error(errno)),
                None => Ok(mounted()),
            }
        };
        let result = retry_state(
            &log,
            first,
            created,
            &mut |d| waits.borrow_mut().push(d),
            &mut again,
        );
        (result, waits.into_inner(), log.lines())
    }

    #[test]
    fn a_busy_state_is_tried_again_until_it_mounts() {
        let (result, waits, lines) = run(Err(mount_error(16)), false, vec![Some(5), None]);
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(waits, [Duration::from_secs(1), Duration::from_secs(2)]);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(
            lines[0].starts_with("keelson-init: STATE (/dev/vda4) cannot be mounted: EBUSY (16)"),
            "{lines:?}"
        );
        assert!(lines[0].ends_with("try 2 of 6 in 1 s"), "{lines:?}");
        assert!(lines[1].contains("EIO (5)") && lines[1].ends_with("try 3 of 6 in 2 s"));
        assert_eq!(lines[2], "keelson-init: STATE mounted at try 3 of 6");
    }

    #[test]
    fn the_tries_are_bounded_and_said_given_up() {
        let (result, waits, lines) = run(Err(mount_error(5)), false, vec![Some(5)]);
        assert!(matches!(result, Err(Error::Mount { .. })), "{result:?}");
        assert_eq!(waits, STATE_RETRY_DELAYS);
        assert_eq!(total_wait(), Duration::from_secs(23));
        assert_eq!(lines.len(), 6, "{lines:?}");
        assert_eq!(
            lines[5],
            "keelson-init: STATE (/dev/vda4) cannot be mounted: EIO (5) (the disk returned I/O errors: replace it) after 6 tries over 23 s: given up for this boot"
        );
    }

    #[test]
    fn what_waiting_cannot_mend_is_not_tried_again() {
        for first in [
            mount_error(117),
            mount_error(22),
            mount_error(19),
            Error::Unrecognized {
                name: PART_STATE,
                device: "/dev/vda4".into(),
            },
            Error::Deferred {
                name: PART_STATE,
                device: "/dev/vda4".into(),
                size: 1,
            },
        ] {
            let (result, waits, lines) = run(Err(first), false, vec![None]);
            assert!(result.is_err());
            assert!(waits.is_empty() && lines.is_empty(), "{lines:?}");
        }
        let (result, waits, _) = run(Ok(mounted()), false, vec![None]);
        assert!(result.is_ok() && waits.is_empty());
    }

    #[test]
    fn a_missing_device_node_is_waited_for_only_on_a_configured_node() {
        let no_device = || Error::NoDevice {
            name: PART_STATE,
            number: 4,
            disk: "/dev/vda".into(),
        };
        let (result, waits, lines) = run(Err(no_device()), false, vec![None]);
        assert!(result.is_ok());
        assert_eq!(waits.len(), 1);
        assert!(
            lines[0].contains("STATE (partition 4 of /dev/vda) has no device node yet"),
            "{lines:?}"
        );
        let (result, waits, _) = run(Err(no_device()), true, vec![None]);
        assert!(result.is_err() && waits.is_empty(), "created at this boot");
    }
}
