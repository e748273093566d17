//! The reaper: PID 1 inherits every orphan, so it reaps with `waitpid(-1, WNOHANG)` until
//! nothing is left (on each `SIGCHLD`); the runner maps the pids it gets back to
//! services. Nothing else in the process may wait for children (see the supervisor's
//! module doc). [`ReapScope::Own`] (wait only for given pids) exists for the host tests,
//! whose harness shares the process with other tests' children.

use super::ExitInfo;
use crate::syscalls::Syscalls;

/// Which children [`reap`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReapScope {
    /// Every child (`waitpid(-1)`): PID 1, which inherits orphans.
    Any,
    /// Only the services' own pids: host tests sharing a process with other tests.
    Own,
}

/// Reap exited children without blocking until none is left: `(pid, how it ended)`.
pub fn reap(sys: &dyn Syscalls, scope: ReapScope, own: &[u32]) -> Vec<(u32, ExitInfo)> {
    match scope {
        ReapScope::Any => reap_any(sys).0,
        ReapScope::Own => own
            .iter()
            .filter_map(|&pid| sys.wait_child(Some(pid)).ok().flatten())
            .collect(),
    }
}

/// Reap every exited child (`waitpid(-1, WNOHANG)` until nothing is left) and say
/// whether any child is still alive (false once the kernel answers ECHILD).
pub fn reap_any(sys: &dyn Syscalls) -> (Vec<(u32, ExitInfo)>, bool) {
    let mut out = Vec::new();
    loop {
        match sys.wait_child(None) {
            Ok(Some(child)) => out.push(child),
            Ok(None) => return (out, true),
            Err(_) => return (out, false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_scope_reaps_the_given_pids_and_reports_how_they_ended() -> std::io::Result<()> {
        let program = ["/bin/sh", "/usr/bin/sh"]
            .into_iter()
            .find(|p| std::path::Path::new(p).is_file())
            .unwrap_or("/bin/sh");
        #[allow(clippy::disallowed_methods)] // a test's child, reaped by the code under test
        let child = std::process::Command::new(program)
            .args(["-c", "exit 3"])
            .spawn()?;
        let pid = child.id();
        drop(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut reaped = Vec::new();
        while reaped.is_empty() && std::time::Instant::now() < deadline {
            reaped = reap(&crate::syscalls::Linux, ReapScope::Own, &[pid]);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(reaped.len(), 1);
        assert_eq!(reaped[0].0, pid);
        assert!(!reaped[0].1.success());
        assert_eq!(reaped[0].1.to_string(), "exited with status 3");
        // Gone: a second reap finds nothing.
        assert!(reap(&crate::syscalls::Linux, ReapScope::Own, &[pid]).is_empty());
        Ok(())
    }

    #[test]
    fn reaping_goes_through_syscalls_until_no_child_is_left() {
        let sys = crate::syscalls::fake::Fake::new();
        let crash = ExitInfo {
            code: None,
            signal: Some(9),
        };
        let clean = ExitInfo {
            code: Some(0),
            signal: None,
        };
        sys.ended.borrow_mut().extend([(41, crash), (42, clean)]);
        // Own scope takes only the pids asked for; any scope takes the rest.
        assert_eq!(reap(&sys, ReapScope::Own, &[42, 7]), [(42, clean)]);
        assert_eq!(reap_any(&sys), (vec![(41, crash)], false));
        assert_eq!(reap_any(&sys), (Vec::new(), false));
    }
}
