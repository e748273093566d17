//! Links as netconf sees them, and which link each configured interface selects.
//!
//! An interface of the machine config names its link by kernel name or by MAC address.
//! A MAC selects the link whose *permanent* address (`IFLA_PERM_ADDRESS`, what the NIC
//! shipped with) matches first, and only then one whose current address matches: a VLAN
//! or bridge copies its lower device's MAC, a physical NIC keeps its permanent one.
//! Matching is recomputed whenever the set of links changes, so a NIC that appears later
//! (hotplug, a slow driver) is configured when it shows up.

use std::collections::BTreeMap;
use std::fmt;

use keelson_configs::schema::Interface;
use keelson_configs::values::MacAddr;

/// One network link (`ip link` line), as far as netconf cares.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LinkInfo {
    /// Kernel interface index.
    pub index: u32,
    /// Kernel name (`eth0`).
    pub name: String,
    /// Current hardware address, for Ethernet-like links.
    pub mac: Option<[u8; 6]>,
    /// Permanent hardware address, when the driver reports one.
    pub perm_mac: Option<[u8; 6]>,
    /// Current MTU.
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Carrier present (`IFF_LOWER_UP`).
    pub lower_up: bool,
    /// The loopback device.
    pub loopback: bool,
}

impl LinkInfo {
    /// Up with a carrier: traffic can flow.
    pub fn running(&self) -> bool {
        self.up && self.lower_up
    }
}

/// How a config interface names its link.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Selector {
    /// By kernel name.
    Name(String),
    /// By hardware address.
    Mac(MacAddr),
}

impl Selector {
    /// The selector of a config interface; `None` for one that names neither (validation
    /// refuses such a config, so this never happens with a validated one).
    pub fn of(iface: &Interface) -> Option<Selector> {
        match (&iface.name, &iface.mac) {
            (Some(name), _) => Some(Selector::Name(name.clone())),
            (None, Some(mac)) => Some(Selector::Mac(*mac)),
            (None, None) => None,
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Name(name) => f.write_str(name),
            Selector::Mac(mac) => write!(f, "mac {mac}"),
        }
    }
}

/// Which link each config interface selected.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Assignment {
    /// Link index → position of its interface in the config.
    pub bound: BTreeMap<u32, usize>,
    /// Config positions whose link is not present (yet).
    pub missing: Vec<usize>,
    /// Ambiguities worth a log line (two links with one MAC, two interfaces for one link).
    pub notes: Vec<String>,
}

impl Assignment {
    /// The link that config interface `position` selected.
    pub fn link_of(&self, position: usize) -> Option<u32> {
        self.bound
            .iter()
            .find_map(|(&index, &p)| (p == position).then_some(index))
    }
}

/// Match every config interface to at most one link, and every link to at most one
/// interface (the first in config order wins). Loopback is never matched: netconf
/// configures it by itself.
pub fn assign(interfaces: &[Interface], links: &[LinkInfo]) -> Assignment {
    let mut out = Assignment::default();
    let mut links: Vec<&LinkInfo> = links.iter().filter(|l| !l.loopback).collect();
    links.sort_by_key(|l| l.index);
    for (position, iface) in interfaces.iter().enumerate() {
        let Some(selector) = Selector::of(iface) else {
            continue;
        };
        let candidates: Vec<&LinkInfo> = match &selector {
            Selector::Name(name) => links.iter().copied().filter(|l| &l.name == name).collect(),
            Selector::Mac(mac) => {
                let perm: Vec<&LinkInfo> = links
                    .iter()
                    .copied()
                    .filter(|l| l.perm_mac == Some(mac.0))
                    .collect();
                if perm.is_empty() {
                    links
                        .iter()
                        .copied()
                        .filter(|l| l.mac == Some(mac.0))
                        .collect()
                } else {
                    perm
                }
            }
        };
        let Some(first) = candidates.first() else {
            out.missing.push(position);
            continue;
        };
        if candidates.len() > 1 {
            let names: Vec<&str> = candidates.iter().map(|l| l.name.as_str()).collect();
            out.notes.push(format!(
                "interface {selector} matches links {}: using {}",
                names.join(", "),
                first.name
            ));
        }
        if let Some(&other) = out.bound.get(&first.index) {
            let earlier = interfaces
                .get(other)
                .and_then(Selector::of)
                .map(|s| s.to_string())
                .unwrap_or_default();
            out.notes.push(format!(
                "interface {selector} selects {}, already configured by interface {earlier}: ignored",
                first.name
            ));
            continue;
        }
        out.bound.insert(first.index, position);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, mac: u8, perm: Option<u8>) -> LinkInfo {
        LinkInfo {
            index,
            name: name.into(),
            mac: Some([0x52, 0x54, 0, 0, 0, mac]),
            perm_mac: perm.map(|p| [0x52, 0x54, 0, 0, 0, p]),
            mtu: 1500,
            ..LinkInfo::default()
        }
    }

    fn by_name(name: &str) -> Interface {
        Interface {
            name: Some(name.into()),
            ..Interface::default()
        }
    }

    fn by_mac(last: u8) -> Interface {
        Interface {
            mac: Some(MacAddr([0x52, 0x54, 0, 0, 0, last])),
            ..Interface::default()
        }
    }

    /// `expected`: (link index, config position) pairs, then the missing positions, then
    /// how many notes.
    fn check(
        interfaces: &[Interface],
        links: &[LinkInfo],
        bound: &[(u32, usize)],
        missing: &[usize],
        notes: usize,
    ) {
        let got = assign(interfaces, links);
        assert_eq!(
            got.bound.iter().map(|(&l, &p)| (l, p)).collect::<Vec<_>>(),
            bound,
            "bound"
        );
        assert_eq!(got.missing, missing, "missing");
        assert_eq!(got.notes.len(), notes, "notes: {:?}", got.notes);
    }

    #[test]
    fn interfaces_select_links_by_name_or_mac() {
        let lo = LinkInfo {
            index: 1,
            name: "lo".into(),
            loopback: true,
            ..LinkInfo::default()
        };
        let links = [lo, link(2, "eth0", 1, Some(1)), link(3, "eth1", 2, Some(2))];
        // By name.
        check(&[by_name("eth1")], &links, &[(3, 0)], &[], 0);
        // By MAC.
        check(&[by_mac(1)], &links, &[(2, 0)], &[], 0);
        // Both, in either order.
        check(
            &[by_mac(2), by_name("eth0")],
            &links,
            &[(2, 1), (3, 0)],
            &[],
            0,
        );
        // Loopback is never an interface of the config.
        check(&[by_name("lo")], &links, &[], &[0], 0);
        // Not present yet.
        check(
            &[by_name("eth0"), by_name("eth9"), by_mac(9)],
            &links,
            &[(2, 0)],
            &[1, 2],
            0,
        );
    }

    #[test]
    fn a_permanent_mac_wins_over_a_copied_one() {
        // A VLAN (index 4) carries its lower device's MAC but has no permanent one.
        let links = [link(4, "eth0.10", 1, None), link(2, "eth0", 1, Some(1))];
        check(&[by_mac(1)], &links, &[(2, 0)], &[], 0);
        // Without permanent addresses (veth), the current one selects; two candidates:
        // the lowest index, and a note.
        let links = [link(5, "veth1", 7, None), link(6, "veth2", 7, None)];
        check(&[by_mac(7)], &links, &[(5, 0)], &[], 1);
        // A changed current address does not hide the permanent one.
        let links = [link(2, "eth0", 8, Some(1))];
        check(&[by_mac(1)], &links, &[(2, 0)], &[], 0);
    }

    #[test]
    fn one_link_is_configured_by_one_interface() {
        let links = [link(2, "eth0", 1, Some(1))];
        check(&[by_name("eth0"), by_mac(1)], &links, &[(2, 0)], &[], 1);
        assert_eq!(
            assign(&[by_name("eth0"), by_mac(1)], &links).notes,
            [
                "interface mac 52:54:00:00:00:01 selects eth0, already configured by interface eth0: ignored"
            ]
        );
    }
}
