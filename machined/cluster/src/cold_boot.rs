//! Guest reboots as cold boots: QEMU runs with `-no-reboot`, so a guest that reboots
//! (PID 1's reboot, a panic with `panic=N`, the watchdog's reset) ends the QEMU process,
//! and [`ColdBoots`] starts it again at once with the same disk and firmware variables
//! and the console appended to, like a machine whose reset line goes through its power
//! supply. A guest that powers off (the kernel's `reboot: Power down` on the console since
//! QEMU last started) or a QEMU that fails is not started again.
//!
//! Why not let QEMU reset the machine in place: under software emulation (TCG) QEMU keeps
//! the code it translated across a reset, and about one warm reset in three then spends
//! 20-35 s in the next kernel's decompressor (each write to a page QEMU still holds as
//! translated code takes its slow path; BENCHMARKS.md, upgrade bench). A fresh process
//! starts from empty caches every time, as real hardware's cold boot does. Under KVM
//! there is no translation and either way is the same boot.
//!
//! The supervisor is a thread polling the process every 50 ms, so that a reboot is
//! followed even while the caller is busy elsewhere (waiting on the node's API, say).

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the kernel prints, at the highest level, right before it powers the machine off.
pub const POWER_OFF_LINE: &str = "reboot: Power down";

/// How often the supervisor looks at the process.
const POLL: Duration = Duration::from_millis(50);

/// Starts the machine's QEMU; called for the first boot and for every cold boot after.
pub type Spawn = Box<dyn FnMut() -> io::Result<Child> + Send>;

/// A QEMU process started again after each guest reboot (see the module doc).
pub struct ColdBoots {
    state: Arc<Mutex<State>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ColdBoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("ColdBoots")
            .field("pid", &state.child.id())
            .field("cold_boots", &state.cold_boots)
            .field("exited", &state.exited)
            .finish()
    }
}

struct State {
    child: Child,
    spawn: Spawn,
    console: PathBuf,
    /// The console's length when QEMU last started: a power-off is looked for after it.
    console_from: u64,
    /// Whether a guest reboot starts QEMU again (else the exit is final).
    follow_reboots: bool,
    cold_boots: u32,
    exited: Option<ExitStatus>,
    stop: bool,
}

impl ColdBoots {
    /// Starts QEMU through `spawn`, its serial console going to `console` (which `spawn`'s
    /// QEMU must append to, `file,...,append=on`, or the earlier boots are lost); with
    /// `follow_reboots` false it only watches the process (an exit is final).
    pub fn start(mut spawn: Spawn, console: &Path, follow_reboots: bool) -> io::Result<ColdBoots> {
        let child = spawn()?;
        let state = Arc::new(Mutex::new(State {
            child,
            spawn,
            console: console.to_path_buf(),
            console_from: console_len(console),
            follow_reboots,
            cold_boots: 0,
            exited: None,
            stop: false,
        }));
        let watched = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("qemu-cold-boots".into())
            .spawn(move || supervise(&watched))?;
        Ok(ColdBoots {
            state,
            thread: Some(thread),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// How QEMU ended, once it ended for good (the guest powered off, QEMU failed, or a
    /// reboot when reboots are not followed); `None` while it runs or is being restarted.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.lock().exited
    }

    /// The cold boots so far (guest reboots followed; power cycles not counted).
    pub fn cold_boots(&self) -> u32 {
        self.lock().cold_boots
    }

    /// Cuts the power: kills QEMU (SIGKILL, the guest gets no word), runs `between` (the
    /// caller keeps or empties the console there), and starts QEMU again.
    pub fn power_cycle(&self, between: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let mut state = self.lock();
        let _ = state.child.kill();
        let _ = state.child.wait();
        between()?;
        state.child = (state.spawn)()?;
        state.console_from = console_len(&state.console);
        state.exited = None;
        Ok(())
    }
}

impl Drop for ColdBoots {
    /// Stops following reboots and ends the process: SIGTERM first (QEMU exits on it, and
    /// a `timeout` wrapper passes it on, where SIGKILL would leave QEMU running), SIGKILL
    /// after [`TERM_GRACE`].
    fn drop(&mut self) {
        {
            let mut state = self.lock();
            state.stop = true;
            end(&mut state.child);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How long a process has to exit after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(10);

fn end(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = std::time::Instant::now() + TERM_GRACE;
    while std::time::Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn console_len(console: &Path) -> u64 {
    std::fs::metadata(console).map(|m| m.len()).unwrap_or(0)
}

/// Whether the console, from byte `from` on, shows the kernel powering the machine off.
fn powered_off(console: &Path, from: u64) -> bool {
    let text = std::fs::read(console).unwrap_or_default();
    let since = text.get(from as usize..).unwrap_or_default();
    String::from_utf8_lossy(since).contains(POWER_OFF_LINE)
}

/// What to do about a QEMU that exited with `status`.
fn after_exit(status: ExitStatus, follow_reboots: bool, powered_off: bool) -> After {
    if follow_reboots && status.success() && !powered_off {
        After::ColdBoot
    } else {
        After::Final
    }
}

#[derive(Debug, PartialEq, Eq)]
enum After {
    ColdBoot,
    Final,
}

fn supervise(state: &Mutex<State>) {
    loop {
        std::thread::sleep(POLL);
        let mut state = lock(state);
        if state.stop {
            return;
        }
        if state.exited.is_some() {
            continue;
        }
        let status = match state.child.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) => continue,
            Err(e) => {
                eprintln!("qemu: cannot wait for QEMU (pid {}): {e}", state.child.id());
                continue;
            }
        };
        let off = powered_off(&state.console, state.console_from);
        match after_exit(status, state.follow_reboots, off) {
            After::Final => state.exited = Some(status),
            After::ColdBoot => {
                state.console_from = console_len(&state.console);
                match (state.spawn)() {
                    Ok(child) => {
                        state.child = child;
                        state.cold_boots += 1;
                    }
                    Err(e) => {
                        eprintln!(
                            "qemu: the guest rebooted, and starting QEMU again failed: {e} (console {})",
                            state.console.display()
                        );
                        state.exited = Some(status);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt as _;
    use std::process::Command;
    use std::time::Instant;

    #[test]
    fn a_reboot_is_followed_unless_the_guest_powered_off_or_qemu_failed() {
        let ok = ExitStatus::from_raw(0);
        let failed = ExitStatus::from_raw(1 << 8);
        assert_eq!(after_exit(ok, true, false), After::ColdBoot);
        assert_eq!(after_exit(ok, true, true), After::Final);
        assert_eq!(after_exit(failed, true, false), After::Final);
        assert_eq!(after_exit(ok, false, false), After::Final);
    }

    #[test]
    fn the_power_off_line_counts_only_after_the_last_start() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        std::fs::write(&console, format!("[ 9.1] {POWER_OFF_LINE}\nboot 2\n")).unwrap();
        assert!(powered_off(&console, 0));
        assert!(!powered_off(&console, 10));
        assert!(!powered_off(&dir.path().join("missing"), 0));
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "{what} never happened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A stand-in for QEMU (a shell that appends a line to the console and exits): each
    /// start is a boot; the third prints the kernel's power-off line.
    #[test]
    fn a_process_that_exits_is_started_again_until_it_powers_off() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        std::fs::write(&console, "").unwrap();
        let script = format!(
            "n=$(wc -l < '{c}'); if [ \"$n\" -ge 2 ]; then echo '{POWER_OFF_LINE}' >> '{c}'; else echo boot >> '{c}'; fi",
            c = console.display()
        );
        let spawn: Spawn = Box::new(move || Command::new("sh").args(["-c", &script]).spawn());
        let vm = ColdBoots::start(spawn, &console, true).unwrap();
        wait_until("the power-off", || vm.exited().is_some());
        assert_eq!(vm.cold_boots(), 2);
        let text = std::fs::read_to_string(&console).unwrap();
        assert_eq!(text, format!("boot\nboot\n{POWER_OFF_LINE}\n"));
    }

    #[test]
    fn without_following_reboots_the_first_exit_is_final_and_a_power_cycle_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        std::fs::write(&console, "").unwrap();
        let c = console.clone();
        let spawn: Spawn = Box::new(move || {
            Command::new("sh")
                .args(["-c", &format!("echo boot >> '{}'", c.display())])
                .spawn()
        });
        let vm = ColdBoots::start(spawn, &console, false).unwrap();
        wait_until("the exit", || vm.exited().is_some());
        assert_eq!(vm.cold_boots(), 0);
        vm.power_cycle(|| std::fs::write(&console, "")).unwrap();
        wait_until("the second exit", || vm.exited().is_some());
        assert_eq!(std::fs::read_to_string(&console).unwrap(), "boot\n");
    }

    #[test]
    fn dropping_it_ends_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        let pid_file = dir.path().join("pid");
        let p = pid_file.clone();
        let spawn: Spawn = Box::new(move || {
            Command::new("sh")
                .args([
                    "-c",
                    &format!("echo $$ > '{}'; exec sleep 600", p.display()),
                ])
                .spawn()
        });
        let vm = ColdBoots::start(spawn, &console, true).unwrap();
        wait_until("the pid file", || {
            std::fs::read_to_string(&pid_file).is_ok_and(|s| s.ends_with('\n'))
        });
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        drop(vm);
        // Killed and reaped: the pid no longer names a process of ours.
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
