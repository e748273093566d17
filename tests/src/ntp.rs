//! Debian's chronyd as a test's NTP server: it serves this host's time on one address
//! inside a network namespace the test made, never touching the host's clock (`-x`).

use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

/// chronyd in the foreground; killed when dropped.
#[derive(Debug)]
pub struct Chrony {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Chrony {
    /// Serves NTP on `address` (port 123) inside namespace `ns`.
    pub fn start(ns: &str, address: &str) -> Result<Chrony> {
        let dir = tempfile::tempdir().context("a directory for chronyd")?;
        let conf = dir.path().join("chrony.conf");
        std::fs::write(
            &conf,
            format!(
                "bindaddress {address}\nallow all\nlocal stratum 8\ncmdport 0\npidfile {0}/chronyd.pid\ndriftfile {0}/drift\n",
                dir.path().display()
            ),
        )
        .with_context(|| format!("writing {}", conf.display()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "chronyd", "-d", "-x", "-f"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chronyd (Debian package chrony, installed by cargo xtask test)")?;
        Ok(Chrony { child, _dir: dir })
    }
}

impl Drop for Chrony {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
