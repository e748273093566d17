//! The desired state of one link (from its config interface and its DHCP lease), and
//! the actions that take the link from what the kernel reports to that state.
//!
//! This is the whole of netconf's decision-making for a link, as pure functions: the
//! engine reads the link, its addresses and routes, calls [`plan`], and carries out the
//! actions in order. Running it again on a converged link yields nothing, which is what
//! makes "re-apply after any link change" safe.

use std::collections::BTreeMap;

use ipnet::IpNet;
use keelson_configs::schema::Interface;

use super::Source;
use super::addrs::{self, AddrDiff};
use super::dhcp::Lease;
use super::links::LinkInfo;
use super::routes::{self, RouteDiff, RouteSpec};

/// What one link should look like.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Desired {
    /// The MTU, if one is wanted (the config's, else the lease's).
    pub mtu: Option<u32>,
    /// Addresses, each with where it comes from.
    pub addresses: Vec<(IpNet, Source)>,
    /// Routes, each with where it comes from.
    pub routes: Vec<(RouteSpec, Source)>,
}

/// The desired state of a configured link: the config's static addresses, routes and MTU,
/// plus what the DHCP lease (if any) brings. The config's MTU wins over the lease's.
pub fn desired(iface: &Interface, lease: Option<&Lease>) -> Desired {
    let mut out = Desired {
        mtu: iface.mtu,
        ..Desired::default()
    };
    for addr in &iface.addresses {
        out.addresses.push((*addr, Source::Static));
    }
    for route in &iface.routes {
        out.routes.push((
            RouteSpec::new(route.to, route.via, route.metric),
            Source::Static,
        ));
    }
    if let Some(lease) = lease {
        out.addresses.push((lease.cidr(), Source::Dhcp));
        out.routes
            .extend(lease.routes().into_iter().map(|r| (r, Source::Dhcp)));
        if out.mtu.is_none() {
            out.mtu = lease.mtu.map(u32::from);
        }
    }
    out
}

/// The loopback device: up, with `127.0.0.1/8` and `::1/128`.
pub fn loopback() -> Desired {
    Desired {
        mtu: None,
        addresses: addrs::loopback()
            .into_iter()
            .map(|a| (a, Source::Static))
            .collect(),
        routes: Vec::new(),
    }
}

/// What netconf added to a link, so that it removes its own things and nobody else's.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Owned {
    /// Addresses netconf added.
    pub addresses: BTreeMap<IpNet, Source>,
    /// Routes netconf added.
    pub routes: BTreeMap<RouteSpec, Source>,
}

/// One step towards the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Set the link up (`up`) and/or its MTU.
    SetLink {
        /// Bring the link up.
        up: bool,
        /// Change the MTU to this.
        mtu: Option<u32>,
    },
    /// Remove an address netconf added that is no longer wanted.
    DelAddress(IpNet, Source),
    /// Add a missing address.
    AddAddress(IpNet, Source),
    /// Remove a route netconf added that is no longer wanted.
    DelRoute(RouteSpec, Source),
    /// Add a missing route.
    AddRoute(RouteSpec, Source),
}

/// How far the plan may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Bring the link up and converge everything (first sight of a link, or a change
    /// while it is up).
    Configure,
    /// The link was set down by someone else: leave it down, only remove what is no
    /// longer wanted.
    RemoveOnly,
}

/// The actions, in order: link settings, removals (routes, then addresses), then
/// additions (addresses, then on-link routes, then routes through a gateway).
pub fn plan(
    desired: &Desired,
    link: &LinkInfo,
    addresses: &[IpNet],
    routes: &[RouteSpec],
    owned: &Owned,
    mode: Mode,
) -> Vec<Action> {
    let mut out = Vec::new();
    let mtu = desired.mtu.filter(|&m| m != link.mtu);
    if mode == Mode::Configure && (!link.up || mtu.is_some()) {
        out.push(Action::SetLink { up: !link.up, mtu });
    }
    let want_addrs: Vec<IpNet> = desired.addresses.iter().map(|(a, _)| *a).collect();
    let owned_addrs = owned.addresses.keys().copied().collect();
    let AddrDiff {
        add: add_addrs,
        remove: remove_addrs,
    } = addrs::diff(&want_addrs, addresses, &owned_addrs);
    let want_routes: Vec<RouteSpec> = desired.routes.iter().map(|(r, _)| *r).collect();
    let owned_routes = owned.routes.keys().copied().collect();
    let RouteDiff {
        add: add_routes,
        remove: remove_routes,
    } = routes::diff(&want_routes, routes, &owned_routes);

    for r in remove_routes {
        out.push(Action::DelRoute(r, source_of(&owned.routes, &r)));
    }
    for a in remove_addrs {
        out.push(Action::DelAddress(a, source_of(&owned.addresses, &a)));
    }
    if mode == Mode::Configure {
        for a in add_addrs {
            let source = desired
                .addresses
                .iter()
                .find(|(x, _)| *x == a)
                .map(|(_, s)| *s)
                .unwrap_or(Source::Static);
            out.push(Action::AddAddress(a, source));
        }
        for r in add_routes {
            let source = desired
                .routes
                .iter()
                .find(|(x, _)| *x == r)
                .map(|(_, s)| *s)
                .unwrap_or(Source::Static);
            out.push(Action::AddRoute(r, source));
        }
    }
    out
}

fn source_of<K: Ord>(map: &BTreeMap<K, Source>, key: &K) -> Source {
    map.get(key).copied().unwrap_or(Source::Static)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Instant;

    use keelson_configs::schema::Route;

    use super::*;

    fn iface(addresses: &[&str], routes: &[(&str, Option<&str>)], mtu: Option<u32>) -> Interface {
        Interface {
            name: Some("eth0".into()),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            routes: routes
                .iter()
                .map(|(to, via)| Route {
                    to: to.parse().unwrap(),
                    via: via.map(|v| v.parse().unwrap()),
                    metric: None,
                })
                .collect(),
            mtu,
            ..Interface::default()
        }
    }

    fn lease(addr: [u8; 4], mtu: Option<u16>) -> Lease {
        Lease {
            addr: Ipv4Addr::from(addr),
            prefix: 24,
            server: Ipv4Addr::new(10, 99, 0, 1),
            routers: vec![Ipv4Addr::new(10, 99, 0, 1)],
            classless_routes: Vec::new(),
            dns: Vec::new(),
            domain: None,
            search: Vec::new(),
            hostname: None,
            mtu,
            lease_secs: 120,
            t1_secs: 60,
            t2_secs: 105,
            acquired: Instant::now(),
        }
    }

    fn link(up: bool, mtu: u32) -> LinkInfo {
        LinkInfo {
            index: 2,
            name: "eth0".into(),
            mtu,
            up,
            lower_up: up,
            ..LinkInfo::default()
        }
    }

    /// The plan as `ip`-like words, for readable expectations.
    fn words(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::SetLink { up, mtu } => format!("set up={up} mtu={mtu:?}"),
                Action::DelAddress(a, s) => format!("del addr {a} ({s})"),
                Action::AddAddress(a, s) => format!("add addr {a} ({s})"),
                Action::DelRoute(r, s) => format!("del route {r} ({s})"),
                Action::AddRoute(r, s) => format!("add route {r} ({s})"),
            })
            .collect()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        desired: &Desired,
        link: &LinkInfo,
        addresses: &[&str],
        routes: &[RouteSpec],
        owned: &Owned,
        mode: Mode,
        expected: &[&str],
    ) {
        let got = plan(desired, link, &nets(addresses), routes, owned, mode);
        assert_eq!(words(&got), expected);
    }

    #[test]
    fn a_fresh_static_link_is_brought_up_with_everything() {
        let d = desired(
            &iface(
                &["10.5.0.2/24"],
                &[("0.0.0.0/0", Some("10.5.0.1")), ("10.6.0.0/16", None)],
                Some(1400),
            ),
            None,
        );
        check(
            &d,
            &link(false, 1500),
            &[],
            &[],
            &Owned::default(),
            Mode::Configure,
            &[
                "set up=true mtu=Some(1400)",
                "add addr 10.5.0.2/24 (static)",
                "add route 10.6.0.0/16 (static)",
                "add route default via 10.5.0.1 (static)",
            ],
        );
    }

    #[test]
    fn a_converged_link_needs_nothing() {
        let d = desired(
            &iface(
                &["10.5.0.2/24"],
                &[("0.0.0.0/0", Some("10.5.0.1"))],
                Some(1400),
            ),
            None,
        );
        let routes = [d.routes[0].0];
        check(
            &d,
            &link(true, 1400),
            &["10.5.0.2/24", "fe80::1/64"],
            &routes,
            &Owned::default(),
            Mode::Configure,
            &[],
        );
    }

    #[test]
    fn after_a_down_up_the_flushed_routes_come_back() {
        let d = desired(
            &iface(&["10.5.0.2/24"], &[("0.0.0.0/0", Some("10.5.0.1"))], None),
            None,
        );
        let mut owned = Owned::default();
        owned.routes.insert(d.routes[0].0, Source::Static);
        check(
            &d,
            &link(true, 1500),
            &["10.5.0.2/24"],
            &[],
            &owned,
            Mode::Configure,
            &["add route default via 10.5.0.1 (static)"],
        );
    }

    #[test]
    fn a_dhcp_lease_adds_its_address_route_and_mtu_and_a_new_one_replaces_it() {
        let cfg = iface(&[], &[], None);
        let d = desired(&cfg, Some(&lease([10, 99, 0, 51], Some(1450))));
        check(
            &d,
            &link(true, 1500),
            &[],
            &[],
            &Owned::default(),
            Mode::Configure,
            &[
                "set up=false mtu=Some(1450)",
                "add addr 10.99.0.51/24 (dhcp)",
                "add route default via 10.99.0.1 metric 1024 (dhcp)",
            ],
        );
        // The next lease is for another address: the old one and its route go first.
        let old_route = d.routes[0].0;
        let mut owned = Owned::default();
        owned
            .addresses
            .insert("10.99.0.51/24".parse().unwrap(), Source::Dhcp);
        owned.routes.insert(old_route, Source::Dhcp);
        let mut next = lease([10, 99, 0, 52], None);
        next.routers = vec![Ipv4Addr::new(10, 99, 0, 2)];
        let d = desired(&cfg, Some(&next));
        check(
            &d,
            &link(true, 1450),
            &["10.99.0.51/24"],
            &[old_route],
            &owned,
            Mode::Configure,
            &[
                "del route default via 10.99.0.1 metric 1024 (dhcp)",
                "del addr 10.99.0.51/24 (dhcp)",
                "add addr 10.99.0.52/24 (dhcp)",
                "add route default via 10.99.0.2 metric 1024 (dhcp)",
            ],
        );
        // The lease is lost: its things go, static ones stay.
        let d = desired(&iface(&["10.5.0.2/24"], &[], None), None);
        check(
            &d,
            &link(true, 1500),
            &["10.5.0.2/24", "10.99.0.51/24"],
            &[old_route],
            &owned,
            Mode::Configure,
            &[
                "del route default via 10.99.0.1 metric 1024 (dhcp)",
                "del addr 10.99.0.51/24 (dhcp)",
            ],
        );
    }

    #[test]
    fn the_configured_mtu_wins_over_the_lease() {
        let d = desired(
            &iface(&[], &[], Some(9000)),
            Some(&lease([10, 99, 0, 51], Some(1450))),
        );
        assert_eq!(d.mtu, Some(9000));
    }

    #[test]
    fn a_link_set_down_by_someone_else_stays_down() {
        let d = desired(&iface(&["10.5.0.2/24"], &[], Some(1400)), None);
        let mut owned = Owned::default();
        owned
            .addresses
            .insert("10.99.0.51/24".parse().unwrap(), Source::Dhcp);
        check(
            &d,
            &link(false, 1500),
            &["10.99.0.51/24"],
            &[],
            &owned,
            Mode::RemoveOnly,
            &["del addr 10.99.0.51/24 (dhcp)"],
        );
    }

    #[test]
    fn loopback() {
        let lo = LinkInfo {
            index: 1,
            name: "lo".into(),
            loopback: true,
            mtu: 65536,
            ..LinkInfo::default()
        };
        check(
            &super::loopback(),
            &lo,
            &[],
            &[],
            &Owned::default(),
            Mode::Configure,
            &[
                "set up=true mtu=None",
                "add addr 127.0.0.1/8 (static)",
                "add addr ::1/128 (static)",
            ],
        );
        let up = LinkInfo { up: true, ..lo };
        check(
            &super::loopback(),
            &up,
            &["127.0.0.1/8", "::1/128"],
            &[],
            &Owned::default(),
            Mode::Configure,
            &[],
        );
    }
}
