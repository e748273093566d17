//! What netconf tells stage 2: [`NetEvent`], one boot-log line each, and how a lease
//! and a lost lease are told.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

use crate::Source;
use crate::dhcp::{self, Lease, LostReason};
use crate::routes::RouteSpec;

/// What happened to the network, for stage 2's event loop. Each renders as one boot-log
/// line through `Display` (the console adds the `keelson-init: ` prefix):
/// `address 10.5.0.2/24 added to eth0 (static)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetEvent {
    /// A link is up with a carrier.
    LinkUp {
        /// Link name.
        name: String,
    },
    /// A link lost its carrier or was set down.
    LinkDown {
        /// Link name.
        name: String,
    },
    /// A configured link disappeared (unplugged, driver unloaded).
    LinkGone {
        /// Link name.
        name: String,
    },
    /// An interface selected by MAC was found under this name.
    LinkMatched {
        /// How the config names it (`mac 52:54:00:12:34:56`).
        selector: String,
        /// The link's name.
        name: String,
    },
    /// An interface of the config has no link (yet); it is configured when it appears.
    InterfaceMissing {
        /// How the config names it.
        selector: String,
    },
    /// The MTU of a link was set.
    MtuSet {
        /// Link name.
        iface: String,
        /// The new MTU.
        mtu: u32,
    },
    /// An address was added to a link.
    AddressAdded {
        /// Link name.
        iface: String,
        /// Address with prefix length.
        cidr: IpNet,
        /// Config or lease.
        source: Source,
    },
    /// An address netconf had added was removed (its lease ended or changed).
    AddressRemoved {
        /// Link name.
        iface: String,
        /// Address with prefix length.
        cidr: IpNet,
        /// Config or lease.
        source: Source,
    },
    /// A route was added.
    RouteAdded {
        /// Link name.
        iface: String,
        /// The route.
        route: RouteSpec,
        /// Config or lease.
        source: Source,
    },
    /// A route netconf had added was removed.
    RouteRemoved {
        /// Link name.
        iface: String,
        /// The route.
        route: RouteSpec,
        /// Config or lease.
        source: Source,
    },
    /// A DHCP server granted a lease (the first, or one for a new address).
    DhcpLease {
        /// Link name.
        iface: String,
        /// Leased address with prefix length.
        addr: IpNet,
        /// The server that granted it.
        server: Ipv4Addr,
        /// The default router, if the lease names one.
        router: Option<IpAddr>,
        /// DNS servers of the lease.
        dns: Vec<IpAddr>,
        /// Lease duration in seconds (`u32::MAX`: infinite).
        lease_secs: u32,
    },
    /// A lease was renewed (same address).
    DhcpRenewed {
        /// Link name.
        iface: String,
        /// Leased address with prefix length.
        addr: IpNet,
        /// New lease duration in seconds.
        lease_secs: u32,
    },
    /// A lease ended without renewal, or the server refused it.
    DhcpLost {
        /// Link name.
        iface: String,
        /// The address that was leased.
        addr: IpNet,
        /// Why.
        reason: String,
    },
    /// The resolver settings changed: write `/etc/resolv.conf` with
    /// [`resolv::render`]`(nameservers, search)`.
    Resolvers {
        /// Nameservers: the config's, or the leases' when the config names none.
        nameservers: Vec<IpAddr>,
        /// Search domains from the leases.
        search: Vec<String>,
    },
    /// DHCP named this host and the config does not: set the host name (and `/etc/hosts`,
    /// [`resolv::hosts`]).
    Hostname {
        /// The host name.
        name: String,
    },
    /// Something worth a line that is not a failure (two links with one MAC...).
    Notice {
        /// The line.
        message: String,
    },
    /// Something failed on a link; netconf carries on and retries on the next change.
    Error {
        /// Link name (or the config's selector).
        iface: String,
        /// What failed and why.
        message: String,
    },
}

impl fmt::Display for NetEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetEvent::LinkUp { name } => write!(f, "link {name} up"),
            NetEvent::LinkDown { name } => write!(f, "link {name} down"),
            NetEvent::LinkGone { name } => write!(f, "link {name} removed"),
            NetEvent::LinkMatched { selector, name } => {
                write!(f, "interface {selector} is link {name}")
            }
            NetEvent::InterfaceMissing { selector } => {
                write!(
                    f,
                    "interface {selector} not present: configured when it appears"
                )
            }
            NetEvent::MtuSet { iface, mtu } => write!(f, "mtu {mtu} set on {iface}"),
            NetEvent::AddressAdded {
                iface,
                cidr,
                source,
            } => {
                write!(f, "address {cidr} added to {iface} ({source})")
            }
            NetEvent::AddressRemoved {
                iface,
                cidr,
                source,
            } => {
                write!(f, "address {cidr} removed from {iface} ({source})")
            }
            NetEvent::RouteAdded {
                iface,
                route,
                source,
            } => {
                write!(f, "route {route} added on {iface} ({source})")
            }
            NetEvent::RouteRemoved {
                iface,
                route,
                source,
            } => {
                write!(f, "route {route} removed from {iface} ({source})")
            }
            NetEvent::DhcpLease {
                iface,
                addr,
                server,
                router,
                dns,
                lease_secs,
            } => {
                write!(
                    f,
                    "dhcp lease {addr} on {iface} from {server} for {}",
                    Secs(*lease_secs)
                )?;
                if let Some(router) = router {
                    write!(f, ", router {router}")?;
                }
                if !dns.is_empty() {
                    let dns: Vec<String> = dns.iter().map(|d| d.to_string()).collect();
                    write!(f, ", dns {}", dns.join(" "))?;
                }
                Ok(())
            }
            NetEvent::DhcpRenewed {
                iface,
                addr,
                lease_secs,
            } => write!(
                f,
                "dhcp lease {addr} on {iface} renewed for {}",
                Secs(*lease_secs)
            ),
            NetEvent::DhcpLost {
                iface,
                addr,
                reason,
            } => write!(f, "dhcp lease {addr} on {iface} lost: {reason}"),
            NetEvent::Resolvers {
                nameservers,
                search,
            } => {
                let ns: Vec<String> = nameservers.iter().map(|n| n.to_string()).collect();
                if ns.is_empty() {
                    write!(f, "nameservers none")?;
                } else {
                    write!(f, "nameservers {}", ns.join(" "))?;
                }
                if !search.is_empty() {
                    write!(f, ", search {}", search.join(" "))?;
                }
                Ok(())
            }
            NetEvent::Hostname { name } => write!(f, "hostname {name} from dhcp"),
            NetEvent::Notice { message } => f.write_str(message),
            NetEvent::Error { iface, message } => write!(f, "network error on {iface}: {message}"),
        }
    }
}

/// Lease durations as people read them.
struct Secs(u32);

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == dhcp::INFINITE {
            f.write_str("ever")
        } else {
            write!(f, "{} s", self.0)
        }
    }
}

pub(crate) fn lease_event(iface: &str, lease: &Lease) -> NetEvent {
    let router = lease
        .routes()
        .into_iter()
        .find(|r| r.is_default())
        .and_then(|r| r.via);
    NetEvent::DhcpLease {
        iface: iface.to_string(),
        addr: lease.cidr(),
        server: lease.server,
        router,
        dns: lease.dns.iter().map(|d| IpAddr::V4(*d)).collect(),
        lease_secs: lease.lease_secs,
    }
}

pub(crate) fn reason_text(reason: LostReason) -> String {
    reason.to_string()
}
