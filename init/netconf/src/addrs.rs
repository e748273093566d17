//! Addresses: what to add and what to remove so that a link carries the addresses it
//! should.
//!
//! Netconf removes only addresses it added itself (an old DHCP lease, say); an address
//! someone else put on the link (the kernel's IPv6 link-local one, a CNI's) is left alone.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// The loopback device's addresses: `127.0.0.1/8` and `::1/128`.
pub fn loopback() -> [IpNet; 2] {
    [
        IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::LOCALHOST, 8)),
        IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128)),
    ]
}

/// Addresses to add and to remove.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AddrDiff {
    /// Wanted and missing, in the order wanted.
    pub add: Vec<IpNet>,
    /// Ours, present and no longer wanted.
    pub remove: Vec<IpNet>,
}

/// Compare the wanted addresses with the link's current ones. `owned` is what netconf
/// added earlier; only those are ever removed. An address is the pair (address, prefix
/// length): `10.5.0.2/16` present does not satisfy a wanted `10.5.0.2/24`.
pub fn diff(wanted: &[IpNet], current: &[IpNet], owned: &BTreeSet<IpNet>) -> AddrDiff {
    let mut add = Vec::new();
    for net in wanted {
        if !current.contains(net) && !add.contains(net) {
            add.push(*net);
        }
    }
    let remove = current
        .iter()
        .filter(|net| owned.contains(net) && !wanted.contains(net))
        .copied()
        .collect();
    AddrDiff { add, remove }
}

/// The prefix length of a contiguous IPv4 netmask (`255.255.255.0` → 24); `None` for a
/// mask with holes.
pub fn prefix_of_mask(mask: Ipv4Addr) -> Option<u8> {
    let bits = u32::from(mask);
    let ones = bits.leading_ones();
    (bits.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

/// The classful prefix of an address (A /8, B /16, C /24), for a DHCP server that sends
/// no subnet mask.
pub fn classful_prefix(addr: Ipv4Addr) -> u8 {
    match addr.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    }
}

/// `addr/prefix` as a net that keeps the host bits (`10.5.0.2/24`).
pub fn with_prefix(addr: IpAddr, prefix: u8) -> Option<IpNet> {
    IpNet::new(addr, prefix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn check(wanted: &[&str], current: &[&str], owned: &[&str], add: &[&str], remove: &[&str]) {
        let owned: BTreeSet<IpNet> = nets(owned).into_iter().collect();
        let got = diff(&nets(wanted), &nets(current), &owned);
        assert_eq!(got.add, nets(add), "add");
        assert_eq!(got.remove, nets(remove), "remove");
    }

    #[test]
    fn addresses_converge_on_what_is_wanted() {
        // A fresh link.
        check(&["10.5.0.2/24"], &[], &[], &["10.5.0.2/24"], &[]);
        // Already there (added by us or by someone else): nothing to do.
        check(&["10.5.0.2/24"], &["10.5.0.2/24"], &[], &[], &[]);
        // Someone else's addresses stay (the kernel's link-local one).
        check(
            &["10.5.0.2/24"],
            &["fe80::1/64", "10.5.0.2/24"],
            &["10.5.0.2/24"],
            &[],
            &[],
        );
        // A new DHCP lease replaces the old one: add the new, remove the old.
        check(
            &["10.99.0.53/24"],
            &["10.99.0.52/24", "fe80::1/64"],
            &["10.99.0.52/24"],
            &["10.99.0.53/24"],
            &["10.99.0.52/24"],
        );
        // Same address, other prefix: the wanted one is added; the old one is ours and goes.
        check(
            &["10.5.0.2/24"],
            &["10.5.0.2/16"],
            &["10.5.0.2/16"],
            &["10.5.0.2/24"],
            &["10.5.0.2/16"],
        );
        // Ours but already gone (the kernel dropped it): nothing to remove.
        check(&[], &[], &["10.5.0.2/24"], &[], &[]);
        // Duplicates in what is wanted are added once; IPv6 works the same way.
        check(
            &["2001:db8::2/64", "2001:db8::2/64"],
            &[],
            &[],
            &["2001:db8::2/64"],
            &[],
        );
    }

    #[test]
    fn masks_and_classes() {
        let p = |s: &str| prefix_of_mask(s.parse().unwrap());
        assert_eq!(p("255.255.255.0"), Some(24));
        assert_eq!(p("255.255.255.255"), Some(32));
        assert_eq!(p("0.0.0.0"), Some(0));
        assert_eq!(p("255.255.254.0"), Some(23));
        assert_eq!(p("255.0.255.0"), None);
        assert_eq!(classful_prefix("10.1.2.3".parse().unwrap()), 8);
        assert_eq!(classful_prefix("172.16.0.1".parse().unwrap()), 16);
        assert_eq!(classful_prefix("192.168.1.1".parse().unwrap()), 24);
        assert_eq!(
            with_prefix("10.5.0.2".parse().unwrap(), 24).map(|n| n.to_string()),
            Some("10.5.0.2/24".to_string())
        );
        assert_eq!(with_prefix("10.5.0.2".parse().unwrap(), 33), None);
    }
}
