//! Everything netconf asks of the kernel, behind one trait: netlink requests, the DHCP
//! sockets, the clock, and the wait for the next thing to happen. The real one is
//! [`super::linux::Linux`]; unit tests use a recording fake with a virtual clock, so the
//! engine's handling of link changes and lease timers runs without root or real time.

use std::future::Future;
use std::io;
use std::net::SocketAddrV4;
use std::time::Instant;

use ipnet::IpNet;

use super::Source;
use super::links::LinkInfo;
use super::routes::RouteSpec;

/// Something that happened, for the engine to handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A link appeared or changed (`RTM_NEWLINK`).
    Link(LinkInfo),
    /// A link disappeared (`RTM_DELLINK`).
    LinkGone(u32),
    /// An address was removed from a link (`RTM_DELADDR`).
    AddressGone {
        /// The link.
        index: u32,
        /// The address.
        addr: IpNet,
    },
    /// A datagram arrived on a link's DHCP socket.
    Dhcp {
        /// The link.
        index: u32,
        /// Its bytes.
        packet: Vec<u8>,
    },
    /// The deadline given to [`NetSys::next_input`] passed.
    Deadline,
    /// Notifications may have been lost (the netlink socket was reopened): read every
    /// link again.
    Resync,
    /// Nothing of interest (a notification netconf does not act on).
    Other,
    /// No more input will ever come (test fakes only; the kernel never closes).
    Closed,
}

/// The kernel as netconf uses it. Futures are `Send` so that the engine runs inside a
/// task spawned on any tokio runtime.
pub trait NetSys: Send {
    /// Every link.
    fn links(&mut self) -> impl Future<Output = io::Result<Vec<LinkInfo>>> + Send;
    /// The addresses on one link.
    fn addresses(&mut self, index: u32) -> impl Future<Output = io::Result<Vec<IpNet>>> + Send;
    /// The main-table unicast routes out of one link.
    fn routes(&mut self, index: u32) -> impl Future<Output = io::Result<Vec<RouteSpec>>> + Send;
    /// Set a link up and/or change its MTU.
    fn set_link(
        &mut self,
        index: u32,
        up: bool,
        mtu: Option<u32>,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Add an address (`EEXIST` when present).
    fn add_address(
        &mut self,
        index: u32,
        addr: IpNet,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Remove an address.
    fn del_address(
        &mut self,
        index: u32,
        addr: IpNet,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Add a route out of a link, tagged with its source's routing protocol (`EEXIST`
    /// when a route with its destination and metric exists).
    fn add_route(
        &mut self,
        index: u32,
        route: RouteSpec,
        source: Source,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Remove a route out of a link.
    fn del_route(
        &mut self,
        index: u32,
        route: RouteSpec,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Open the link's DHCP client socket (UDP port 68 bound to the link, broadcast
    /// allowed); what it receives comes back as [`Input::Dhcp`].
    fn dhcp_open(&mut self, index: u32, name: &str) -> io::Result<()>;
    /// Close the link's DHCP socket.
    fn dhcp_close(&mut self, index: u32);
    /// Send a DHCP message from the link's socket.
    fn dhcp_send(
        &mut self,
        index: u32,
        packet: &[u8],
        to: SocketAddrV4,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// The current time.
    fn now(&self) -> Instant;
    /// Wait for the next input, or until `deadline`.
    fn next_input(&mut self, deadline: Option<Instant>) -> impl Future<Output = Input> + Send;
}

/// Errno names for the errors netlink and sockets give, for log lines
/// (`ENETUNREACH (101)`); other codes read as the system describes them.
pub fn errno(err: &io::Error) -> String {
    let Some(code) = err.raw_os_error() else {
        return err.to_string();
    };
    let name = match code {
        1 => "EPERM",
        2 => "ENOENT",
        3 => "ESRCH",
        13 => "EACCES",
        16 => "EBUSY",
        17 => "EEXIST",
        19 => "ENODEV",
        22 => "EINVAL",
        34 => "ERANGE",
        95 => "EOPNOTSUPP",
        97 => "EAFNOSUPPORT",
        98 => "EADDRINUSE",
        99 => "EADDRNOTAVAIL",
        100 => "ENETDOWN",
        101 => "ENETUNREACH",
        105 => "ENOBUFS",
        113 => "EHOSTUNREACH",
        _ => return err.to_string(),
    };
    format!("{name} ({code})")
}

/// `EEXIST`: the thing to add is there already.
pub fn is_exists(err: &io::Error) -> bool {
    err.raw_os_error() == Some(17)
}

/// The thing to remove is gone already (`ESRCH` for routes, `EADDRNOTAVAIL` for
/// addresses, `ENOENT`/`ENODEV` for links).
pub fn is_gone(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(2 | 3 | 19 | 99))
}

/// `EAFNOSUPPORT`: IPv6 is disabled in this kernel.
pub fn is_no_family(err: &io::Error) -> bool {
    err.raw_os_error() == Some(97)
}

#[cfg(test)]
pub mod fake {
    //! A recording fake of the kernel: links, addresses and routes in memory, every
    //! change recorded as an `ip`-like line, DHCP packets captured, and a virtual clock
    //! that jumps to each deadline.

    use std::collections::{BTreeMap, VecDeque};
    use std::time::Duration;

    use super::*;

    /// The fake kernel.
    #[derive(Debug)]
    pub struct Fake {
        pub links: BTreeMap<u32, LinkInfo>,
        pub addresses: BTreeMap<u32, Vec<IpNet>>,
        pub routes: BTreeMap<u32, Vec<RouteSpec>>,
        /// Every change, in order: `up eth0`, `addr add 10.5.0.2/24 dev eth0`...
        pub calls: Vec<String>,
        /// DHCP packets sent: link, bytes, destination.
        pub sent: Vec<(u32, Vec<u8>, SocketAddrV4)>,
        pub open_sockets: Vec<u32>,
        pub inputs: VecDeque<Input>,
        pub now: Instant,
        /// Errors to return for calls whose line starts with the key.
        pub failures: BTreeMap<String, i32>,
        /// Links that get a carrier as soon as they are set up.
        pub carrier_on_up: bool,
    }

    impl Fake {
        pub fn new() -> Fake {
            let lo = LinkInfo {
                index: 1,
                name: "lo".into(),
                mtu: 65536,
                loopback: true,
                ..LinkInfo::default()
            };
            Fake {
                links: BTreeMap::from([(1, lo)]),
                addresses: BTreeMap::new(),
                routes: BTreeMap::new(),
                calls: Vec::new(),
                sent: Vec::new(),
                open_sockets: Vec::new(),
                inputs: VecDeque::new(),
                now: Instant::now(),
                failures: BTreeMap::new(),
                carrier_on_up: true,
            }
        }

        pub fn with_link(mut self, index: u32, name: &str, mac: [u8; 6]) -> Fake {
            self.add_link(index, name, mac);
            self
        }

        pub fn add_link(&mut self, index: u32, name: &str, mac: [u8; 6]) -> LinkInfo {
            let link = LinkInfo {
                index,
                name: name.into(),
                mac: Some(mac),
                perm_mac: Some(mac),
                mtu: 1500,
                ..LinkInfo::default()
            };
            self.links.insert(index, link.clone());
            link
        }

        fn name(&self, index: u32) -> String {
            self.links
                .get(&index)
                .map(|l| l.name.clone())
                .unwrap_or_else(|| format!("#{index}"))
        }

        fn record(&mut self, line: String) -> io::Result<()> {
            let failure = self
                .failures
                .iter()
                .find(|(k, _)| line.starts_with(k.as_str()))
                .map(|(_, &code)| code);
            self.calls.push(line);
            match failure {
                Some(code) => Err(io::Error::from_raw_os_error(code)),
                None => Ok(()),
            }
        }

        /// The calls recorded since the last take.
        pub fn take_calls(&mut self) -> Vec<String> {
            std::mem::take(&mut self.calls)
        }

        /// Move the clock.
        pub fn advance(&mut self, by: Duration) {
            self.now += by;
        }
    }

    impl Default for Fake {
        fn default() -> Fake {
            Fake::new()
        }
    }

    impl NetSys for Fake {
        async fn links(&mut self) -> io::Result<Vec<LinkInfo>> {
            Ok(self.links.values().cloned().collect())
        }

        async fn addresses(&mut self, index: u32) -> io::Result<Vec<IpNet>> {
            Ok(self.addresses.get(&index).cloned().unwrap_or_default())
        }

        async fn routes(&mut self, index: u32) -> io::Result<Vec<RouteSpec>> {
            let up = self.links.get(&index).is_some_and(|l| l.up);
            Ok(if up {
                self.routes.get(&index).cloned().unwrap_or_default()
            } else {
                Vec::new()
            })
        }

        async fn set_link(&mut self, index: u32, up: bool, mtu: Option<u32>) -> io::Result<()> {
            let name = self.name(index);
            let mut line = format!("link set {name}");
            if up {
                line.push_str(" up");
            }
            if let Some(mtu) = mtu {
                line.push_str(&format!(" mtu {mtu}"));
            }
            self.record(line)?;
            let carrier = self.carrier_on_up;
            if let Some(link) = self.links.get_mut(&index) {
                if up {
                    link.up = true;
                    link.lower_up = carrier || link.loopback;
                }
                if let Some(mtu) = mtu {
                    link.mtu = mtu;
                }
                let link = link.clone();
                if link.loopback && up {
                    // The kernel gives lo its addresses when it comes up.
                    self.addresses
                        .entry(index)
                        .or_default()
                        .extend(super::super::addrs::loopback());
                }
                self.inputs.push_back(Input::Link(link));
            }
            Ok(())
        }

        async fn add_address(&mut self, index: u32, addr: IpNet) -> io::Result<()> {
            let name = self.name(index);
            self.record(format!("addr add {addr} dev {name}"))?;
            let list = self.addresses.entry(index).or_default();
            if list.contains(&addr) {
                return Err(io::Error::from_raw_os_error(17));
            }
            list.push(addr);
            Ok(())
        }

        async fn del_address(&mut self, index: u32, addr: IpNet) -> io::Result<()> {
            let name = self.name(index);
            self.record(format!("addr del {addr} dev {name}"))?;
            let list = self.addresses.entry(index).or_default();
            let before = list.len();
            list.retain(|a| *a != addr);
            if list.len() == before {
                return Err(io::Error::from_raw_os_error(99));
            }
            Ok(())
        }

        async fn add_route(
            &mut self,
            index: u32,
            route: RouteSpec,
            source: Source,
        ) -> io::Result<()> {
            let name = self.name(index);
            self.record(format!("route add {route} dev {name} proto {source}"))?;
            let list = self.routes.entry(index).or_default();
            if list.contains(&route) {
                return Err(io::Error::from_raw_os_error(17));
            }
            list.push(route);
            Ok(())
        }

        async fn del_route(&mut self, index: u32, route: RouteSpec) -> io::Result<()> {
            let name = self.name(index);
            self.record(format!("route del {route} dev {name}"))?;
            let list = self.routes.entry(index).or_default();
            let before = list.len();
            list.retain(|r| *r != route);
            if list.len() == before {
                return Err(io::Error::from_raw_os_error(3));
            }
            Ok(())
        }

        fn dhcp_open(&mut self, index: u32, name: &str) -> io::Result<()> {
            self.record(format!("dhcp open {name}"))?;
            self.open_sockets.push(index);
            Ok(())
        }

        fn dhcp_close(&mut self, index: u32) {
            let name = self.name(index);
            self.calls.push(format!("dhcp close {name}"));
            self.open_sockets.retain(|&i| i != index);
        }

        async fn dhcp_send(
            &mut self,
            index: u32,
            packet: &[u8],
            to: SocketAddrV4,
        ) -> io::Result<()> {
            self.sent.push((index, packet.to_vec(), to));
            Ok(())
        }

        fn now(&self) -> Instant {
            self.now
        }

        async fn next_input(&mut self, deadline: Option<Instant>) -> Input {
            if let Some(input) = self.inputs.pop_front() {
                return input;
            }
            match deadline {
                Some(d) => {
                    self.now = self.now.max(d);
                    Input::Deadline
                }
                None => Input::Closed,
            }
        }
    }
}
