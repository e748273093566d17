//! The reaper: PID 1 inherits every orphan, so it reaps with `waitpid(-1, WNOHANG)` until
//! nothing is left (on each `SIGCHLD`); the runner maps the pids it gets back to
//! services. Nothing else in the process may wait for children (see the supervisor's
//! module doc). [`ReapScope::Own`] (wait only for given pids) exists for the host tests,
//! whose harness shares the process with other tests' children.

use rustix::process::{Pid, WaitOptions};

use super::ExitInfo;
use super::status::exit_info;

/// Which children [`reap`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReapScope {
    /// Every child (`waitpid(-1)`): PID 1, which inherits orphans.
    Any,
    /// Only the services' own pids: host tests sharing a process with other tests.
    Own,
}

/// Reap exited children without blocking until none is left: `(pid, how it ended)`.
pub fn reap(scope: ReapScope, own: &[u32]) -> Vec<(u32, ExitInfo)> {
    match scope {
        ReapScope::Any => reap_any().0,
        ReapScope::Own => own
            .iter()
            .filter_map(|&pid| {
                let p = Pid::from_raw(pid as i32)?;
                match rustix::process::waitpid(Some(p), WaitOptions::NOHANG) {
                    Ok(Some((_, status))) => Some((pid, exit_info(status))),
                    _ => None,
                }
            })
            .collect(),
    }
}

/// Reap every exited child (`waitpid(-1, WNOHANG)` until nothing is left) and say
/// whether any child is still alive (false once the kernel answers ECHILD).
pub fn reap_any() -> (Vec<(u32, ExitInfo)>, bool) {
    let mut out = Vec::new();
    loop {
        match rustix::process::wait(WaitOptions::NOHANG) {
            Ok(Some((pid, status))) => {
                out.push((pid.as_raw_nonzero().get() as u32, exit_info(status)));
            }
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
            reaped = reap(ReapScope::Own, &[pid]);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(reaped.len(), 1);
        assert_eq!(reaped[0].0, pid);
        assert!(!reaped[0].1.success());
        assert_eq!(reaped[0].1.to_string(), "exited with status 3");
        // Gone: a second reap finds nothing.
        assert!(reap(ReapScope::Own, &[pid]).is_empty());
        Ok(())
    }
}
