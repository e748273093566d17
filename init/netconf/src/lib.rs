//! Networking for PID 1, over netlink: loopback, the config's interfaces (matched by name
//! or MAC), their MTU, static addresses and routes, DHCPv4 with lease renewal, and the
//! resolver settings and host name that follow from them. Link changes are handled, not
//! only the first state: a NIC that appears later is configured when it shows up; a link
//! that loses its carrier and gets it back has its addresses and routes re-applied and
//! its DHCP lease confirmed; an address or route someone removes comes back.
//!
//! ```text
//!  machine config ─► NetConf::apply() ──► links · addresses · routes · DHCP DISCOVER
//!                          │                    (events: one console line each)
//!                          ▼
//!                    NetConf::run(tx) ◄── netlink notifications (RTNLGRP_LINK, *_IFADDR)
//!                          │          ◄── DHCP replies (UDP :68 per link)
//!                          │          ◄── lease timers (T1, T2, expiry, retransmissions)
//!                          └──► NetEvent on `tx` ──► stage 2's event loop
//! ```
//!
//! How it is built: the decisions are pure and unit-tested without root — which link an
//! interface selects ([`links`]), what to add or remove to reach the desired state
//! ([`plan`], [`addrs`], [`routes`]), the DHCP state machine and its timer math
//! ([`dhcp`]), the resolver files ([`resolv`]). The engine ([`NetConf`]) only reads
//! state, calls those functions and carries out their answers through [`sys::NetSys`],
//! which is netlink and UDP sockets in production ([`linux::Linux`]) and a recording
//! fake with a virtual clock in tests. The real thing is tested as root inside network
//! namespaces that the tests create (`init/netconf/tests/netns.rs`, against Debian's
//! `dnsmasq` for DHCP).
//!
//! Netconf removes only what it added (addresses and routes are tracked per link); it
//! never touches links the config does not name, except loopback.

pub mod addrs;
pub mod dhcp;
mod events;
pub mod links;
pub mod linux;
pub mod plan;
pub mod resolv;
pub mod routes;
pub mod sys;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use keelson_configs::schema::{Interface, Network};
use tokio::sync::mpsc::UnboundedSender;

use self::dhcp::{Client, Lease, LostReason, Output};
use self::links::{Assignment, LinkInfo, Selector};
use self::plan::{Action, Mode, Owned};
use self::sys::{Input, NetSys, errno, is_exists, is_gone, is_no_family};

pub use self::events::NetEvent;
use self::events::{lease_event, reason_text};
pub use self::linux::Linux;

/// Where an address or route comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// The machine config (and loopback's fixed addresses).
    Static,
    /// A DHCP lease.
    Dhcp,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Static => "static",
            Source::Dhcp => "dhcp",
        })
    }
}

/// Why netconf could not start at all. Failures on one link are [`NetEvent::Error`]s, not
/// this.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The kernel would not list its links (no netlink socket).
    #[error("cannot list network links: {}", errno(source))]
    Links {
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

/// The network configurator: owns the kernel handle, the matching of config interfaces
/// to links, what it added to each link, and a DHCP client per DHCP link.
#[derive(Debug)]
pub struct NetConf<S: NetSys = Linux> {
    sys: S,
    interfaces: Vec<Interface>,
    nameservers: Vec<IpAddr>,
    hostname: Option<String>,
    links: BTreeMap<u32, LinkInfo>,
    assignment: Assignment,
    owned: BTreeMap<u32, Owned>,
    dhcp: BTreeMap<u32, Client>,
    announced_missing: BTreeSet<usize>,
    announced_notes: BTreeSet<String>,
    announced_resolvers: Option<(Vec<IpAddr>, Vec<String>)>,
    announced_hostname: Option<String>,
    seed: u64,
}

impl NetConf<Linux> {
    /// A configurator for the config's `[machine.network]`; `hostname` is the config's
    /// (`None`: take the one DHCP gives). Nothing is touched until [`NetConf::apply`].
    pub fn new(config: &Network, hostname: Option<&str>) -> NetConf<Linux> {
        NetConf::with_sys(config, hostname, Linux::new())
    }
}

impl<S: NetSys> NetConf<S> {
    /// A configurator over another [`NetSys`] (a fake in tests).
    pub fn with_sys(config: &Network, hostname: Option<&str>, sys: S) -> NetConf<S> {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()).rotate_left(32);
        NetConf {
            sys,
            interfaces: config.interfaces.clone(),
            nameservers: config.nameservers.clone(),
            hostname: hostname.map(str::to_string),
            links: BTreeMap::new(),
            assignment: Assignment::default(),
            owned: BTreeMap::new(),
            dhcp: BTreeMap::new(),
            announced_missing: BTreeSet::new(),
            announced_notes: BTreeSet::new(),
            announced_resolvers: None,
            announced_hostname: None,
            seed,
        }
    }

    /// The kernel handle (tests look at the fake's record).
    pub fn sys(&self) -> &S {
        &self.sys
    }

    /// The kernel handle, mutable (tests queue inputs into the fake).
    pub fn sys_mut(&mut self) -> &mut S {
        &mut self.sys
    }

    /// The permanent (else current) MAC of the first configured link, else of the first
    /// Ethernet link: what a host name derived from the hardware is made from.
    pub fn primary_mac(&self) -> Option<[u8; 6]> {
        let mac = |l: &LinkInfo| l.perm_mac.or(l.mac);
        self.assignment
            .bound
            .keys()
            .filter_map(|i| self.links.get(i))
            .chain(self.links.values().filter(|l| !l.loopback))
            .find_map(mac)
    }

    /// Configure the network as it is now: loopback up, each config interface's link
    /// (those present) up with its MTU, addresses and routes, DHCP started where asked
    /// (its lease arrives later, through [`NetConf::run`]). Returns what was done, one
    /// event per line; fails only when the kernel cannot even list its links.
    pub async fn apply(&mut self) -> Result<Vec<NetEvent>, NetError> {
        let links = self
            .sys
            .links()
            .await
            .map_err(|source| NetError::Links { source })?;
        self.links = links.into_iter().map(|l| (l.index, l)).collect();
        let mut events = Vec::new();
        let loopbacks: Vec<u32> = self
            .links
            .values()
            .filter(|l| l.loopback)
            .map(|l| l.index)
            .collect();
        for index in loopbacks {
            self.reconcile(index, Mode::Configure, &mut events).await;
        }
        self.rematch(&mut events).await;
        self.announce(&mut events);
        Ok(events)
    }

    /// Keep the network configured for ever: follow link changes and DHCP leases, and
    /// send each event on `tx`. A closed `tx` does not stop it (leases must still be
    /// renewed). Call [`NetConf::apply`] first.
    pub async fn run(self, tx: UnboundedSender<NetEvent>) {
        self.run_until(tx, std::future::pending()).await;
    }

    /// [`NetConf::run`] until `stop` completes (shutdown); then give DHCP leases back.
    pub async fn run_until(
        mut self,
        tx: UnboundedSender<NetEvent>,
        stop: impl Future<Output = ()>,
    ) {
        let mut stop = std::pin::pin!(stop);
        loop {
            let deadline = self.next_deadline();
            let input = tokio::select! {
                biased;
                () = &mut stop => break,
                input = self.sys.next_input(deadline) => input,
            };
            if input == Input::Closed {
                break;
            }
            for event in self.handle(input).await {
                let _ = tx.send(event);
            }
        }
        for event in self.release().await {
            let _ = tx.send(event);
        }
    }

    /// The earliest DHCP timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.dhcp.values().filter_map(Client::deadline).min()
    }

    /// Handle one input; the events it caused.
    pub async fn handle(&mut self, input: Input) -> Vec<NetEvent> {
        let mut events = Vec::new();
        match input {
            Input::Link(link) => self.on_link(link, &mut events).await,
            Input::LinkGone(index) => self.on_link_gone(index, &mut events).await,
            Input::AddressGone { index, addr } => {
                let ours = self
                    .owned
                    .get(&index)
                    .is_some_and(|o| o.addresses.contains_key(&addr));
                let up = self.links.get(&index).is_some_and(|l| l.up);
                if ours && up {
                    // Someone removed what we put there (or the kernel did): put it back.
                    if let Some(owned) = self.owned.get_mut(&index) {
                        owned.addresses.remove(&addr);
                    }
                    self.reconcile(index, Mode::Configure, &mut events).await;
                } else if let Some(owned) = self.owned.get_mut(&index) {
                    owned.addresses.remove(&addr);
                }
            }
            Input::Dhcp { index, packet } => {
                if let Some(msg) = dhcp::decode(&packet) {
                    let now = self.sys.now();
                    let outputs = match self.dhcp.get_mut(&index) {
                        Some(client) => client.on_message(&msg, now),
                        None => Vec::new(),
                    };
                    self.dhcp_outputs(index, outputs, &mut events).await;
                }
            }
            Input::Deadline => {
                let now = self.sys.now();
                let due: Vec<u32> = self
                    .dhcp
                    .iter()
                    .filter(|(_, c)| c.deadline().is_some_and(|d| d <= now))
                    .map(|(&i, _)| i)
                    .collect();
                for index in due {
                    let outputs = match self.dhcp.get_mut(&index) {
                        Some(client) => client.on_timeout(now),
                        None => Vec::new(),
                    };
                    self.dhcp_outputs(index, outputs, &mut events).await;
                }
            }
            Input::Resync => self.resync(&mut events).await,
            Input::Other | Input::Closed => {}
        }
        self.announce(&mut events);
        events
    }

    /// Give every lease back (shutdown, or before a new config takes over): RELEASE to
    /// the server, and the leased addresses and routes removed.
    pub async fn release(&mut self) -> Vec<NetEvent> {
        let mut events = Vec::new();
        let indexes: Vec<u32> = self.dhcp.keys().copied().collect();
        for index in indexes {
            let outputs = self
                .dhcp
                .get_mut(&index)
                .map(Client::release)
                .unwrap_or_default();
            self.dhcp_outputs(index, outputs, &mut events).await;
        }
        self.announce(&mut events);
        events
    }

    fn name(&self, index: u32) -> String {
        self.links
            .get(&index)
            .map(|l| l.name.clone())
            .unwrap_or_else(|| format!("link #{index}"))
    }

    fn selector(&self, position: usize) -> String {
        self.interfaces
            .get(position)
            .and_then(Selector::of)
            .map(|s| s.to_string())
            .unwrap_or_else(|| format!("#{position}"))
    }

    /// Read every link again (after lost notifications) and act on what changed.
    async fn resync(&mut self, events: &mut Vec<NetEvent>) {
        let links = match self.sys.links().await {
            Ok(links) => links,
            Err(e) => {
                events.push(NetEvent::Error {
                    iface: "all links".into(),
                    message: format!("cannot list links: {}", errno(&e)),
                });
                return;
            }
        };
        let present: BTreeSet<u32> = links.iter().map(|l| l.index).collect();
        let gone: Vec<u32> = self
            .links
            .keys()
            .filter(|i| !present.contains(i))
            .copied()
            .collect();
        for index in gone {
            self.on_link_gone(index, events).await;
        }
        for link in links {
            self.on_link(link, events).await;
        }
        let bound: Vec<u32> = self.assignment.bound.keys().copied().collect();
        for index in bound {
            self.reconcile(index, Mode::Configure, events).await;
        }
    }

    /// A link appeared or changed.
    async fn on_link(&mut self, link: LinkInfo, events: &mut Vec<NetEvent>) {
        let index = link.index;
        let old = self.links.insert(index, link.clone());
        let Some(old) = old else {
            // Hotplug: a new link. Loopback is ours; any other may be a config interface.
            if link.loopback {
                self.reconcile(index, Mode::Configure, events).await;
            }
            self.rematch(events).await;
            return;
        };
        if old.name != link.name {
            self.rematch(events).await;
        }
        if !self.assignment.bound.contains_key(&index) {
            return;
        }
        let now = self.sys.now();
        if !old.running() && link.running() {
            events.push(NetEvent::LinkUp {
                name: link.name.clone(),
            });
            self.reconcile(index, Mode::Configure, events).await;
            let outputs = match self.dhcp.get_mut(&index) {
                Some(client) => client.start(now),
                None => Vec::new(),
            };
            self.dhcp_outputs(index, outputs, events).await;
        } else if old.running() && !link.running() {
            events.push(NetEvent::LinkDown {
                name: link.name.clone(),
            });
            if let Some(client) = self.dhcp.get_mut(&index) {
                client.stop();
            }
        } else if link.up && (!old.up || old.mtu != link.mtu) {
            // Set up without a carrier yet, or its MTU was changed under us.
            self.reconcile(index, Mode::Configure, events).await;
        }
    }

    /// A link disappeared: forget it (its addresses and routes went with it).
    async fn on_link_gone(&mut self, index: u32, events: &mut Vec<NetEvent>) {
        let Some(old) = self.links.remove(&index) else {
            return;
        };
        if self.assignment.bound.contains_key(&index) {
            events.push(NetEvent::LinkGone { name: old.name });
        }
        self.rematch(events).await;
    }

    /// Match config interfaces to links again; configure newly matched links, forget
    /// unmatched ones, announce interfaces that are missing.
    async fn rematch(&mut self, events: &mut Vec<NetEvent>) {
        let links: Vec<LinkInfo> = self.links.values().cloned().collect();
        let new = links::assign(&self.interfaces, &links);
        for note in &new.notes {
            if self.announced_notes.insert(note.clone()) {
                events.push(NetEvent::Notice {
                    message: note.clone(),
                });
            }
        }
        let old = std::mem::replace(&mut self.assignment, new.clone());
        for (index, position) in &old.bound {
            if new.bound.get(index) != Some(position) {
                self.unbind(*index);
            }
        }
        for (&index, &position) in &new.bound {
            if old.bound.get(&index) != Some(&position) {
                self.bind(index, position, events).await;
            }
        }
        let missing: BTreeSet<usize> = new.missing.iter().copied().collect();
        for &position in missing.difference(&self.announced_missing) {
            events.push(NetEvent::InterfaceMissing {
                selector: self.selector(position),
            });
        }
        self.announced_missing = missing;
    }

    /// A config interface found its link: configure it and start DHCP if asked.
    async fn bind(&mut self, index: u32, position: usize, events: &mut Vec<NetEvent>) {
        let Some(link) = self.links.get(&index).cloned() else {
            return;
        };
        let Some(iface) = self.interfaces.get(position).cloned() else {
            return;
        };
        if let Some(Selector::Mac(_)) = Selector::of(&iface) {
            events.push(NetEvent::LinkMatched {
                selector: self.selector(position),
                name: link.name.clone(),
            });
        }
        if link.running() {
            events.push(NetEvent::LinkUp {
                name: link.name.clone(),
            });
        }
        self.reconcile(index, Mode::Configure, events).await;
        if !iface.dhcp {
            return;
        }
        let Some(mac) = link.perm_mac.or(link.mac) else {
            events.push(NetEvent::Error {
                iface: link.name.clone(),
                message: "dhcp needs a link with a hardware address".into(),
            });
            return;
        };
        if let Err(e) = self.sys.dhcp_open(index, &link.name) {
            events.push(NetEvent::Error {
                iface: link.name.clone(),
                message: format!("cannot open the dhcp socket: {}", errno(&e)),
            });
            return;
        }
        let mut client = Client::new(
            link.mac.unwrap_or(mac),
            self.hostname.clone(),
            self.seed ^ u64::from(index),
        );
        let outputs = if link.running() {
            client.start(self.sys.now())
        } else {
            Vec::new()
        };
        self.dhcp.insert(index, client);
        self.dhcp_outputs(index, outputs, events).await;
    }

    /// A link no longer selected by the config: stop its DHCP client and forget what we
    /// added (we do not deconfigure a link we no longer own).
    fn unbind(&mut self, index: u32) {
        if self.dhcp.remove(&index).is_some() {
            self.sys.dhcp_close(index);
        }
        self.owned.remove(&index);
    }

    /// Bring one link to its desired state.
    async fn reconcile(&mut self, index: u32, mode: Mode, events: &mut Vec<NetEvent>) {
        let Some(link) = self.links.get(&index).cloned() else {
            return;
        };
        let desired = if link.loopback {
            plan::loopback()
        } else {
            let Some(iface) = self
                .assignment
                .bound
                .get(&index)
                .and_then(|&p| self.interfaces.get(p))
            else {
                return;
            };
            plan::desired(iface, self.dhcp.get(&index).and_then(Client::lease))
        };
        let name = link.name.clone();
        let addresses = match self.sys.addresses(index).await {
            Ok(a) => a,
            Err(e) => {
                events.push(NetEvent::Error {
                    iface: name,
                    message: format!("cannot list addresses: {}", errno(&e)),
                });
                return;
            }
        };
        let routes = match self.sys.routes(index).await {
            Ok(r) => r,
            Err(e) => {
                events.push(NetEvent::Error {
                    iface: name,
                    message: format!("cannot list routes: {}", errno(&e)),
                });
                return;
            }
        };
        let owned = self.owned.get(&index).cloned().unwrap_or_default();
        let actions = plan::plan(&desired, &link, &addresses, &routes, &owned, mode);
        for action in actions {
            self.execute(index, &name, action, events).await;
        }
    }

    async fn execute(
        &mut self,
        index: u32,
        name: &str,
        action: Action,
        events: &mut Vec<NetEvent>,
    ) {
        let iface = name.to_string();
        let error = |message: String| NetEvent::Error {
            iface: iface.clone(),
            message,
        };
        match action {
            Action::SetLink { up, mtu } => match self.sys.set_link(index, up, mtu).await {
                Ok(()) => {
                    if let Some(mtu) = mtu {
                        events.push(NetEvent::MtuSet {
                            iface: iface.clone(),
                            mtu,
                        });
                    }
                }
                Err(e) => {
                    let what = match (up, mtu) {
                        (true, Some(m)) => format!("set {name} up with mtu {m}"),
                        (true, None) => format!("set {name} up"),
                        (false, Some(m)) => format!("set mtu {m} on {name}"),
                        (false, None) => format!("change {name}"),
                    };
                    events.push(error(format!("cannot {what}: {}", errno(&e))));
                }
            },
            Action::AddAddress(cidr, source) => match self.sys.add_address(index, cidr).await {
                Ok(()) => {
                    self.owned
                        .entry(index)
                        .or_default()
                        .addresses
                        .insert(cidr, source);
                    events.push(NetEvent::AddressAdded {
                        iface: iface.clone(),
                        cidr,
                        source,
                    });
                }
                Err(e) if is_exists(&e) => {}
                // No IPv6 in this kernel: loopback's ::1 is simply not there.
                Err(e) if is_no_family(&e) && cidr.addr().is_loopback() => {}
                Err(e) => events.push(error(format!("cannot add address {cidr}: {}", errno(&e)))),
            },
            Action::DelAddress(cidr, source) => {
                match self.sys.del_address(index, cidr).await {
                    Ok(()) => events.push(NetEvent::AddressRemoved {
                        iface: iface.clone(),
                        cidr,
                        source,
                    }),
                    Err(e) if is_gone(&e) => {}
                    Err(e) => {
                        events.push(error(format!(
                            "cannot remove address {cidr}: {}",
                            errno(&e)
                        )));
                        return;
                    }
                }
                if let Some(owned) = self.owned.get_mut(&index) {
                    owned.addresses.remove(&cidr);
                }
            }
            Action::AddRoute(route, source) => match self.sys.add_route(index, route, source).await
            {
                Ok(()) => {
                    self.owned
                        .entry(index)
                        .or_default()
                        .routes
                        .insert(route, source);
                    events.push(NetEvent::RouteAdded {
                        iface: iface.clone(),
                        route,
                        source,
                    });
                }
                Err(e) if is_exists(&e) => {}
                Err(e) => events.push(error(format!("cannot add route {route}: {}", errno(&e)))),
            },
            Action::DelRoute(route, source) => {
                match self.sys.del_route(index, route).await {
                    Ok(()) => events.push(NetEvent::RouteRemoved {
                        iface: iface.clone(),
                        route,
                        source,
                    }),
                    Err(e) if is_gone(&e) => {}
                    Err(e) => {
                        events.push(error(format!("cannot remove route {route}: {}", errno(&e))));
                        return;
                    }
                }
                if let Some(owned) = self.owned.get_mut(&index) {
                    owned.routes.remove(&route);
                }
            }
        }
    }

    /// Carry out what a DHCP client asked for.
    async fn dhcp_outputs(&mut self, index: u32, outputs: Vec<Output>, events: &mut Vec<NetEvent>) {
        let name = self.name(index);
        for output in outputs {
            match output {
                Output::Send { message, to } => {
                    let kind = message
                        .opts()
                        .msg_type()
                        .map(|k| format!("{k:?}").to_uppercase())
                        .unwrap_or_default();
                    let sent = match dhcp::encode(&message) {
                        Ok(bytes) => self.sys.dhcp_send(index, &bytes, to).await,
                        Err(e) => Err(io::Error::other(e.to_string())),
                    };
                    if let Err(e) = sent {
                        events.push(NetEvent::Error {
                            iface: name.clone(),
                            message: format!("cannot send DHCP{kind} to {to}: {}", errno(&e)),
                        });
                    }
                }
                Output::Bound(lease) => {
                    events.push(lease_event(&name, &lease));
                    self.reconcile(index, Mode::Configure, events).await;
                }
                Output::Renewed(lease) => {
                    events.push(NetEvent::DhcpRenewed {
                        iface: name.clone(),
                        addr: lease.cidr(),
                        lease_secs: lease.lease_secs,
                    });
                    self.reconcile(index, Mode::Configure, events).await;
                }
                Output::Lost { lease, reason } => {
                    events.push(NetEvent::DhcpLost {
                        iface: name.clone(),
                        addr: lease.cidr(),
                        reason: reason_text(reason),
                    });
                    let up = self.links.get(&index).is_some_and(|l| l.up);
                    let mode = if up && reason != LostReason::Released {
                        Mode::Configure
                    } else {
                        Mode::RemoveOnly
                    };
                    self.reconcile(index, mode, events).await;
                }
            }
        }
    }

    /// Announce resolver and host-name changes.
    fn announce(&mut self, events: &mut Vec<NetEvent>) {
        let leases: Vec<&Lease> = self.dhcp.values().filter_map(Client::lease).collect();
        let nameservers: Vec<IpAddr> = if self.nameservers.is_empty() {
            let mut list: Vec<IpAddr> = Vec::new();
            for ip in leases.iter().flat_map(|l| l.dns.iter()) {
                let ip = IpAddr::V4(*ip);
                if !list.contains(&ip) {
                    list.push(ip);
                }
            }
            list
        } else {
            self.nameservers.clone()
        };
        let mut search: Vec<String> = Vec::new();
        for domain in leases
            .iter()
            .flat_map(|l| l.search.iter().chain(l.domain.iter()))
        {
            if !search.contains(domain) {
                search.push(domain.clone());
            }
        }
        let current = (nameservers, search);
        let changed = match &self.announced_resolvers {
            Some(previous) => *previous != current,
            None => !current.0.is_empty() || !current.1.is_empty(),
        };
        if changed {
            events.push(NetEvent::Resolvers {
                nameservers: current.0.clone(),
                search: current.1.clone(),
            });
            self.announced_resolvers = Some(current);
        }
        if self.hostname.is_none() {
            let name = leases.iter().find_map(|l| l.hostname.clone());
            if let Some(name) = name
                && self.announced_hostname.as_ref() != Some(&name)
            {
                self.announced_hostname = Some(name.clone());
                events.push(NetEvent::Hostname { name });
            }
        }
    }
}

#[cfg(test)]
mod tests;
