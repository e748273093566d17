//! The end of stage 2, once the main loop has stopped every service (or given up on
//! them): the control socket closed, the network's leases given back, every other
//! process stopped (`SIGTERM`, then `SIGKILL` after [`shutdown::GRACE`]), the
//! filesystems unmounted, STATE and EPHEMERAL wiped for a reset
//! ([`super::reset`]), and the machine restarted or powered off.

use std::io;
use std::time::{Duration, Instant};

use crate::bootlog::Kept;
use crate::shutdown::{self, ShutdownKind};
use crate::supervisor::reaper;

use super::node::Node;
use super::reset;

impl<K: Kept> Node<'_, K> {
    /// After the main loop: stop every process, unmount, wipe for a reset, go down.
    pub(super) async fn finish(&mut self, kind: ShutdownKind, reset: bool) -> io::Error {
        let log = self.log;
        let sys = self.sys;
        if let Some(socket) = self.control_socket.take() {
            socket.abort();
        }
        if let Some(stop) = self.network.take() {
            let _ = stop.send(());
        }
        // Read while /sys is there: the test fault may come from the firmware config.
        let cmdline = crate::fault::with_firmware(sys, &self.boot.cmdline);
        if reset {
            reset::record_begun(log, self.boot.state_dir.as_deref());
        }
        // Let netconf give its DHCP leases back, and the aborted tasks close their files.
        tokio::time::sleep(Duration::from_millis(200)).await;
        log.line("services stopped; stopping every other process (SIGTERM)");
        let _ = sys.kill_all(false);
        let deadline = Instant::now() + shutdown::GRACE;
        let mut killed = false;
        loop {
            let (_, left) = reaper::reap_any(sys);
            if !left {
                break;
            }
            if Instant::now() >= deadline {
                if killed {
                    log.line("processes remain after SIGKILL: going down anyway");
                    break;
                }
                log.line(&format!(
                    "processes left after {} s: SIGKILL",
                    shutdown::GRACE.as_secs()
                ));
                let _ = sys.kill_all(true);
                killed = true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.ping_watchdog();
        }
        let stuck = shutdown::unmount_all(sys, log);
        if !stuck.is_empty() {
            log.line(&format!("still mounted: {}", stuck.join(" ")));
        }
        if reset {
            self.ping_watchdog();
            // Each failure is on the console and in STATE's record already; the node goes
            // down either way.
            let _ = reset::finish_reset(sys, log, &self.boot.wipe, &cmdline);
        }
        // Stopped just before reboot(2): a machine that powers off stays off.
        let watchdog = self.watchdog.take();
        shutdown::finish(sys, log, kind, move || {
            if let Some(watchdog) = watchdog {
                watchdog.disarm(log);
            }
        })
    }

    /// Ping the watchdog if a ping is due: the end runs outside the main loop's wait.
    fn ping_watchdog(&mut self) {
        if let Some(watchdog) = &mut self.watchdog {
            watchdog.ping_if_due(Instant::now(), self.log);
        }
    }
}
