//! Glue between `netconf` (the network engine) and stage 2's event loop: start it on
//! the config's `[machine.network]`, send each of its events (netconf's `NetEvent`) to
//! the main loop, and stop it (leases given back) at shutdown.
//!
//! Before a config exists, a node whose kernel command line names a config URL needs an
//! address to fetch it: [`dhcp_everywhere`] asks DHCP on every Ethernet link, as Talos's
//! maintenance mode does.

use std::path::Path;

use keelson_configs::schema::{Interface, Network};
use keelson_netconf::{NetConf, NetEvent};
use tokio::sync::mpsc::unbounded_channel;
use tokio::sync::oneshot;

use crate::sender::Sender;
use crate::syscalls::Syscalls;

/// Start the network engine for `network` as local tasks of the current `LocalSet`;
/// returns the switch that stops it.
pub fn start(
    network: &Network,
    hostname: Option<&str>,
    events: Sender<NetEvent>,
) -> oneshot::Sender<()> {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let mut engine = NetConf::new(network, hostname);
    tokio::task::spawn_local(async move {
        match engine.apply().await {
            Ok(done) => {
                for event in done {
                    let _ = events.send(event);
                }
            }
            Err(e) => {
                let _ = events.send(NetEvent::Error {
                    iface: "*".into(),
                    message: format!("the network cannot be configured: {e}"),
                });
                return;
            }
        }
        let (tx, mut rx) = unbounded_channel();
        let forward = events.clone();
        tokio::task::spawn_local(async move {
            while let Some(event) = rx.recv().await {
                if forward.send(event).is_err() {
                    break;
                }
            }
        });
        engine
            .run_until(tx, async move {
                let _ = stop_rx.await;
            })
            .await;
    });
    stop_tx
}

/// A network section asking DHCP on every link of `sysfs` but loopback (names from
/// `class/net`, sorted).
pub fn dhcp_everywhere(sys: &dyn Syscalls, sysfs: &Path) -> Network {
    let mut names: Vec<String> = sys
        .read_dir_names(&sysfs.join("class/net"))
        .unwrap_or_default();
    names.retain(|n| n != "lo");
    Network {
        nameservers: Vec::new(),
        interfaces: names
            .into_iter()
            .map(|name| Interface {
                name: Some(name),
                dhcp: true,
                ..Interface::default()
            })
            .collect(),
    }
}

/// Whether an event means the node can now reach others (an address on a real link).
pub fn brings_reachability(event: &NetEvent) -> bool {
    match event {
        NetEvent::AddressAdded { iface, .. } => iface != "lo",
        NetEvent::DhcpLease { .. } => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_config_every_link_but_loopback_asks_dhcp() -> std::io::Result<()> {
        let sys = crate::syscalls::fake::Fake::default();
        for link in ["lo", "eth1", "eth0"] {
            let address = Path::new("/sys/class/net").join(link).join("address");
            sys.files
                .borrow_mut()
                .insert(address, b"52:54:00:00:00:01\n".to_vec());
        }
        let net = dhcp_everywhere(&sys, Path::new("/sys"));
        let names: Vec<(Option<&str>, bool)> = net
            .interfaces
            .iter()
            .map(|i| (i.name.as_deref(), i.dhcp))
            .collect();
        assert_eq!(names, [(Some("eth0"), true), (Some("eth1"), true)]);
        assert!(
            dhcp_everywhere(&sys, Path::new("/nonexistent"))
                .interfaces
                .is_empty()
        );
        Ok(())
    }

    #[test]
    fn reachability_comes_with_a_real_address() {
        let lo = NetEvent::AddressAdded {
            iface: "lo".into(),
            cidr: "127.0.0.1/8".parse().unwrap_or_default(),
            source: keelson_netconf::Source::Static,
        };
        assert!(!brings_reachability(&lo));
        let eth = NetEvent::AddressAdded {
            iface: "eth0".into(),
            cidr: "10.5.0.2/24".parse().unwrap_or_default(),
            source: keelson_netconf::Source::Static,
        };
        assert!(brings_reachability(&eth));
        assert!(!brings_reachability(&NetEvent::LinkUp {
            name: "eth0".into()
        }));
    }
}
