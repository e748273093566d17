//! `machinectl health`: what is and is not healthy on the node, and why.
//!
//! The checks: every supervised service that is wanted is ready (as PID 1 reports it;
//! a stopped service is not wanted, like etcd before the bootstrap), and the kubelet's
//! prerequisites hold (kubeadm's preflight): the config's kernel modules are loaded, its
//! sysctls have their values, swap is off when the config says so, and containerd's
//! socket exists. Last, the node opens a TCP connection to the node API on the cluster
//! endpoint's host: a worker that cannot reach its control plane is not healthy, and the
//! connection leaves the peer in both nodes' neighbour tables (`machinectl get
//! neighbours`).
//!
//! A reset that did not finish is reported too ([`last_reset`]): PID 1 keeps its record
//! in STATE, since the reset's answer went back before its wipe could be decided
//! (`keelson_node_protocol::reset`). It fails the `last reset` check until a config is
//! applied (STATE's config is then not the one the record names) or a reset finishes
//! (which wipes STATE and the record with it).

use std::net::{TcpStream, ToSocketAddrs as _};
use std::path::Path;
use std::time::Duration;

use keelson_configs::MachineConfig;
use keelson_configs::layout::API_PORT;
use keelson_configs::schema::Swap;
use keelson_node_protocol::reset::{RESET_RECORD, ResetRecord};
use keelson_node_protocol::state::CONFIG;

use super::NodePaths;
use crate::backend::{BackendError, ServiceView};

/// One check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// Why.
    pub reason: String,
}

fn check(name: impl Into<String>, ok: bool, reason: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        ok,
        reason: reason.into(),
    }
}

/// Whether module `name` is loaded or built in (`/sys/module/NAME` exists either way).
fn module_present(sys: &Path, name: &str) -> bool {
    sys.join("module").join(name.replace('-', "_")).is_dir()
}

/// Runs every check.
pub fn checks(
    paths: &NodePaths,
    config: Option<&MachineConfig>,
    services: Result<Vec<ServiceView>, BackendError>,
) -> Vec<Check> {
    let mut out = Vec::new();
    match services {
        Ok(services) => {
            for s in services {
                // Stopped means not wanted (etcd before the cluster bootstrap, a service
                // an operator stopped): nothing is failing.
                if !s.ready && s.state == "stopped" {
                    out.push(check(
                        format!("service {}", s.name),
                        true,
                        "stopped, not wanted (started on request)",
                    ));
                    continue;
                }
                let reason = if s.ready {
                    format!("{}, ready", s.state)
                } else if s.message.is_empty() {
                    format!("{}, not ready", s.state)
                } else {
                    format!("{}, not ready: {}", s.state, s.message)
                };
                out.push(check(format!("service {}", s.name), s.ready, reason));
            }
        }
        Err(e) => out.push(check("services", false, e.to_string())),
    }
    let Some(config) = config else {
        out.push(check(
            "machine config",
            false,
            "the node has no config yet (maintenance mode): push one with `machinectl apply-config --insecure`",
        ));
        return out;
    };
    for module in config.machine.effective_kernel_modules() {
        let ok = module_present(&paths.sys, &module);
        out.push(check(
            format!("module {module}"),
            ok,
            if ok {
                "loaded"
            } else {
                "not loaded (machine.kernel_modules asks for it)"
            },
        ));
    }
    for (key, want) in config.machine.effective_sysctls() {
        let file = paths.proc.join("sys").join(key.replace('.', "/"));
        let (ok, reason) = sysctl_verdict(&file, &want, std::fs::read_to_string(&file));
        out.push(check(format!("sysctl {key}"), ok, reason));
    }
    if config.machine.swap == Swap::Off {
        let swaps = std::fs::read_to_string(paths.proc.join("swaps")).unwrap_or_default();
        let active: Vec<&str> = swaps
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        out.push(if active.is_empty() {
            check("swap", true, "off")
        } else {
            check(
                "swap",
                false,
                format!(
                    "on ({}), but machine.swap = \"off\" and the kubelet needs it off",
                    active.join(", ")
                ),
            )
        });
    }
    out.push(control_plane_reachable(&config.cluster.endpoint.host));
    let sock = &paths.containerd_socket;
    out.push(if sock.exists() {
        check(
            "containerd socket",
            true,
            format!("{} exists", sock.display()),
        )
    } else {
        check(
            "containerd socket",
            false,
            format!("{} is missing: containerd is not serving", sock.display()),
        )
    });
    out
}

/// The `last reset` check: failed while STATE at `state_dir` keeps the record of a reset
/// that did not finish and its config is still the one the reset began with; `None`
/// otherwise.
pub fn last_reset(state_dir: &Path) -> Option<Check> {
    const NAME: &str = "last reset";
    let path = state_dir.join(RESET_RECORD);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            return Some(check(
                NAME,
                false,
                format!(
                    "cannot read {}: {e}: a reset may have failed; see the boot log",
                    path.display()
                ),
            ));
        }
    };
    let record = match ResetRecord::parse(&bytes) {
        Ok(record) => record,
        Err(e) => {
            return Some(check(
                NAME,
                false,
                format!(
                    "{} is unreadable ({e}): a reset began and did not finish; reset the node again",
                    path.display()
                ),
            ));
        }
    };
    let config = std::fs::read(state_dir.join(CONFIG))
        .ok()
        .map(|c| crate::server::audit::sha256_hex(&c));
    record
        .is_current(config.as_deref())
        .then(|| check(NAME, false, record.health_reason()))
}

/// How long the control-plane probe waits for a TCP connection.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Connects to the node API on the endpoint's host (a control plane, or the load
/// balancer in front of them).
fn control_plane_reachable(host: &str) -> Check {
    let name = format!("control plane {host}:{API_PORT}");
    let addrs = match (host, API_PORT).to_socket_addrs() {
        Ok(a) => a.collect::<Vec<_>>(),
        Err(e) => {
            return check(
                name,
                false,
                format!("cannot resolve {host}: {e} (check cluster.endpoint and the nameservers)"),
            );
        }
    };
    let mut last = String::from("no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) {
            Ok(_) => return check(name, true, format!("{addr} accepts connections")),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    check(
        name,
        false,
        format!(
            "unreachable ({last}); is the control plane up, and does this node's network reach it?"
        ),
    )
}

/// Whether a sysctl the config sets has its value, from what reading its file gave.
/// A sysctl the kernel keeps root-only (mode 0600: `net.core.bpf_jit_harden`,
/// `vm.mmap_rnd_bits`, ...) cannot be read by machined, which runs as its own user, and
/// the kernel's sysctl files ignore `CAP_DAC_OVERRIDE`: PID 1 read it back when it wrote
/// it, so it passes, saying so.
fn sysctl_verdict(file: &Path, want: &str, read: std::io::Result<String>) -> (bool, String) {
    match read {
        Ok(have) => {
            let have = have.split_whitespace().collect::<Vec<_>>().join(" ");
            let want_norm = want.split_whitespace().collect::<Vec<_>>().join(" ");
            if have == want_norm {
                (true, format!("= {have}"))
            } else {
                (false, format!("is {have}, the config wants {want}"))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => (
            true,
            "root-only: machined cannot read it back (PID 1 read it back when it set it)"
                .to_owned(),
        ),
        Err(e) => (
            false,
            format!(
                "cannot read {}: {e} (is the module that provides it loaded?)",
                file.display()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_root_only_sysctl_passes_and_says_why() {
        let file = Path::new("/proc/sys/net/core/bpf_jit_harden");
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let (ok, reason) = sysctl_verdict(file, "2", Err(denied));
        assert!(ok, "{reason}");
        assert!(reason.contains("root-only"), "{reason}");
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(!sysctl_verdict(file, "2", Err(missing)).0);
        assert_eq!(
            sysctl_verdict(file, "2", Ok("2\n".into())),
            (true, "= 2".into())
        );
        assert!(!sysctl_verdict(file, "2", Ok("0\n".into())).0);
    }

    #[test]
    fn services_and_maintenance_mode() {
        let paths = NodePaths::default();
        let services = vec![
            ServiceView {
                name: "containerd".into(),
                state: "running".into(),
                ready: true,
                pid: 10,
                restarts: 0,
                since_seconds: 5,
                message: String::new(),
            },
            ServiceView {
                name: "kubelet".into(),
                state: "backoff".into(),
                ready: false,
                pid: 0,
                restarts: 3,
                since_seconds: 1,
                message: "exited with status 1".into(),
            },
        ];
        let mut services = services;
        services.push(ServiceView {
            name: "etcd".into(),
            state: "stopped".into(),
            ready: false,
            pid: 0,
            restarts: 0,
            since_seconds: 1,
            message: String::new(),
        });
        let out = checks(&paths, None, Ok(services));
        assert_eq!(
            out[2],
            check(
                "service etcd",
                true,
                "stopped, not wanted (started on request)"
            )
        );
        let out: Vec<Check> = out
            .into_iter()
            .filter(|c| c.name != "service etcd")
            .collect();
        assert_eq!(out[0], check("service containerd", true, "running, ready"));
        assert_eq!(
            out[1],
            check(
                "service kubelet",
                false,
                "backoff, not ready: exited with status 1"
            )
        );
        assert!(!out[2].ok);
        assert!(out[2].reason.contains("maintenance mode"));
        let out = checks(
            &paths,
            None,
            Err(BackendError::Refused("init is busy".into())),
        );
        assert_eq!(out[0], check("services", false, "init is busy"));
    }

    #[test]
    fn control_plane_probe() {
        // Port 50000 on loopback: ours while bound (reachable), refused once dropped;
        // when another program holds it, it answers.
        match std::net::TcpListener::bind(("127.0.0.1", API_PORT)) {
            Ok(listener) => {
                let c = control_plane_reachable("127.0.0.1");
                assert!(c.ok, "{c:?}");
                assert_eq!(c.name, "control plane 127.0.0.1:50000");
                drop(listener);
                let c = control_plane_reachable("127.0.0.1");
                assert!(!c.ok, "{c:?}");
                assert!(c.reason.contains("is the control plane up"), "{c:?}");
            }
            Err(_) => assert!(control_plane_reachable("127.0.0.1").ok),
        }
    }

    #[test]
    fn a_reset_that_did_not_finish_fails_health_until_a_config_is_applied() {
        use keelson_node_protocol::reset::ResetFailure;
        let state = tempfile::tempdir().unwrap();
        assert_eq!(last_reset(state.path()), None, "no record, no check");
        std::fs::write(state.path().join(CONFIG), "old config").unwrap();
        let record = ResetRecord {
            begun_at_ms: 1_796_559_145_000,
            config_sha256: Some(crate::server::audit::sha256_hex(b"old config")),
            failure: Some(ResetFailure {
                at_ms: 1_796_559_146_000,
                partition: "EPHEMERAL".into(),
                device: "/dev/vda6".into(),
                errno: Some("EBUSY (16)".into()),
                reason: "could not unmount /var".into(),
                wiped: Vec::new(),
            }),
        };
        std::fs::write(state.path().join(RESET_RECORD), record.to_bytes()).unwrap();
        let c = last_reset(state.path()).unwrap();
        assert!(!c.ok);
        assert_eq!(c.name, "last reset");
        assert_eq!(
            c.reason,
            "last reset failed at 2026-12-06T12:12:26Z: EPHEMERAL on /dev/vda6: could not unmount /var (EBUSY (16)); nothing was wiped, and the node kept its config and identity; reset it again, or wipe both partitions from another system"
        );
        std::fs::write(state.path().join(RESET_RECORD), b"{ torn").unwrap();
        assert!(
            last_reset(state.path())
                .unwrap()
                .reason
                .contains("is unreadable")
        );
        std::fs::write(state.path().join(RESET_RECORD), record.to_bytes()).unwrap();
        std::fs::write(state.path().join(CONFIG), "a later config").unwrap();
        assert_eq!(last_reset(state.path()), None, "applied since: old news");
    }
}
