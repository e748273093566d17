//! Routes: what a link's routes should be, and how to get there from what the kernel has.
//!
//! A route is the triple (destination, gateway, metric) on one link, in the main table.
//! As with addresses, netconf removes only routes it added. Routes without a gateway go
//! first: a gateway must be reachable on-link before a route through it can be added.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// The metric of routes learnt from DHCP: above a static route's default of 0, so a
/// configured default route wins over a leased one.
pub const DHCP_METRIC: u32 = 1024;

/// The metric the kernel gives an IPv6 route added without one (`IP6_RT_PRIO_USER`).
pub const IPV6_DEFAULT_METRIC: u32 = 1024;

/// One route on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteSpec {
    /// Destination network (host bits cleared); `0.0.0.0/0` or `::/0` is the default route.
    pub to: IpNet,
    /// Gateway; `None` for an on-link route.
    pub via: Option<IpAddr>,
    /// Metric (priority): lower wins.
    pub metric: u32,
}

impl RouteSpec {
    /// A route as the config or a lease gives it, normalised as the kernel stores it:
    /// the destination's host bits cleared, and no metric meaning 0 for IPv4 and
    /// [`IPV6_DEFAULT_METRIC`] for IPv6.
    pub fn new(to: IpNet, via: Option<IpAddr>, metric: Option<u32>) -> RouteSpec {
        let default_metric = match to {
            IpNet::V4(_) => 0,
            IpNet::V6(_) => IPV6_DEFAULT_METRIC,
        };
        RouteSpec {
            to: to.trunc(),
            via,
            metric: metric.unwrap_or(default_metric),
        }
    }

    /// The default route of its family.
    pub fn is_default(&self) -> bool {
        self.to.prefix_len() == 0
    }
}

impl fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_default() {
            f.write_str("default")?;
        } else {
            write!(f, "{}", self.to)?;
        }
        if let Some(via) = self.via {
            write!(f, " via {via}")?;
        }
        if self.metric != 0 {
            write!(f, " metric {}", self.metric)?;
        }
        Ok(())
    }
}

/// Routes to add and to remove.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteDiff {
    /// Wanted and missing: on-link routes first, then those through a gateway.
    pub add: Vec<RouteSpec>,
    /// Ours, present and no longer wanted.
    pub remove: Vec<RouteSpec>,
}

/// Compare the wanted routes with the link's current ones (main table, this link only).
/// `owned` is what netconf added earlier; only those are ever removed.
pub fn diff(wanted: &[RouteSpec], current: &[RouteSpec], owned: &BTreeSet<RouteSpec>) -> RouteDiff {
    let mut add: Vec<RouteSpec> = Vec::new();
    for route in wanted {
        if !current.contains(route) && !add.contains(route) {
            add.push(*route);
        }
    }
    // Stable: on-link routes keep their order, and so do gateway routes.
    add.sort_by_key(|r| r.via.is_some());
    let remove = current
        .iter()
        .filter(|r| owned.contains(r) && !wanted.contains(r))
        .copied()
        .collect();
    RouteDiff { add, remove }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `"10.0.0.0/8 via 10.5.0.1 metric 5"`, `"default via 10.5.0.1"`, `"10.6.0.0/16"`.
    fn route(text: &str) -> RouteSpec {
        let mut words = text.split_whitespace();
        let to = match words.next().unwrap() {
            "default" => "0.0.0.0/0".parse().unwrap(),
            "default6" => "::/0".parse().unwrap(),
            net => net.parse().unwrap(),
        };
        let (mut via, mut metric) = (None, None);
        while let Some(key) = words.next() {
            let value = words.next().unwrap();
            match key {
                "via" => via = Some(value.parse().unwrap()),
                "metric" => metric = Some(value.parse().unwrap()),
                _ => panic!("{key}"),
            }
        }
        RouteSpec::new(to, via, metric)
    }

    fn routes(list: &[&str]) -> Vec<RouteSpec> {
        list.iter().map(|s| route(s)).collect()
    }

    fn check(wanted: &[&str], current: &[&str], owned: &[&str], add: &[&str], remove: &[&str]) {
        let owned: BTreeSet<RouteSpec> = routes(owned).into_iter().collect();
        let got = diff(&routes(wanted), &routes(current), &owned);
        assert_eq!(got.add, routes(add), "add");
        assert_eq!(got.remove, routes(remove), "remove");
    }

    #[test]
    fn routes_converge_and_on_link_routes_go_first() {
        check(
            &["default via 10.5.0.1", "10.6.0.0/16"],
            &["10.5.0.0/24"],
            &[],
            &["10.6.0.0/16", "default via 10.5.0.1"],
            &[],
        );
        // Present: nothing. The kernel's prefix route is someone else's.
        check(
            &["default via 10.5.0.1"],
            &["10.5.0.0/24", "default via 10.5.0.1"],
            &[],
            &[],
            &[],
        );
        // The link went down and came back: the kernel flushed the gateway route.
        check(
            &["default via 10.5.0.1"],
            &["10.5.0.0/24"],
            &["default via 10.5.0.1"],
            &["default via 10.5.0.1"],
            &[],
        );
        // A new lease with another router: swap the default routes.
        check(
            &["default via 10.99.0.2 metric 1024"],
            &["default via 10.99.0.1 metric 1024"],
            &["default via 10.99.0.1 metric 1024"],
            &["default via 10.99.0.2 metric 1024"],
            &["default via 10.99.0.1 metric 1024"],
        );
        // Same destination and gateway, another metric: a different route.
        check(
            &["default via 10.5.0.1 metric 10"],
            &["default via 10.5.0.1"],
            &[],
            &["default via 10.5.0.1 metric 10"],
            &[],
        );
        // IPv6.
        check(
            &["default6 via 2001:db8::1", "2001:db8:1::/48"],
            &[],
            &[],
            &["2001:db8:1::/48", "default6 via 2001:db8::1"],
            &[],
        );
    }

    #[test]
    fn routes_read_as_ip_route_prints_them() {
        assert_eq!(
            route("default via 10.5.0.1").to_string(),
            "default via 10.5.0.1"
        );
        assert_eq!(
            route("10.7.1.9/16 via 10.5.0.1 metric 7").to_string(),
            "10.7.0.0/16 via 10.5.0.1 metric 7"
        );
        assert_eq!(route("10.8.0.0/16").to_string(), "10.8.0.0/16");
        assert_eq!(
            route("default6 via fe80::1").to_string(),
            "default via fe80::1 metric 1024"
        );
        assert_eq!(
            route("default6 via fe80::1 metric 0").to_string(),
            "default via fe80::1"
        );
    }
}
