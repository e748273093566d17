//! The real [`NetSys`]: rtnetlink for links, addresses and routes (one socket that also
//! listens to the link and address multicast groups), and per DHCP link a UDP socket
//! that sends (`0.0.0.0:68`, `SO_BINDTODEVICE`, `SO_BROADCAST`, `SO_REUSEADDR`) and a
//! packet socket, filtered to UDP port 68, that receives (read by a small task). The
//! netlink socket is opened on first use, from inside the runtime.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_channel::mpsc::UnboundedReceiver;
use futures_util::StreamExt;
use ipnet::IpNet;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{AddressMessageBuilder, Handle, LinkUnspec, MulticastGroup, RouteMessageBuilder};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::Source;
use super::links::LinkInfo;
use super::routes::RouteSpec;
use super::sys::{Input, NetSys};

type Notifications = UnboundedReceiver<(
    NetlinkMessage<RouteNetlinkMessage>,
    netlink_sys_addr::SocketAddr,
)>;

/// `netlink_sys` as rtnetlink re-exports it (no direct dependency needed).
mod netlink_sys_addr {
    pub use rtnetlink::sys::SocketAddr;
}

struct Conn {
    handle: Handle,
    notifications: Notifications,
    task: JoinHandle<()>,
}

struct DhcpSocket {
    socket: Arc<UdpSocket>,
    reader: JoinHandle<()>,
}

/// The kernel, over netlink and UDP.
pub struct Linux {
    conn: Option<Conn>,
    dhcp: BTreeMap<u32, DhcpSocket>,
    dhcp_tx: mpsc::UnboundedSender<(u32, Vec<u8>)>,
    dhcp_rx: mpsc::UnboundedReceiver<(u32, Vec<u8>)>,
}

impl std::fmt::Debug for Linux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linux")
            .field("connected", &self.conn.is_some())
            .field("dhcp_links", &self.dhcp.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for Linux {
    fn default() -> Linux {
        Linux::new()
    }
}

impl Drop for Linux {
    fn drop(&mut self) {
        if let Some(conn) = &self.conn {
            conn.task.abort();
        }
        for socket in self.dhcp.values() {
            socket.reader.abort();
        }
    }
}

/// A netlink error as an `io::Error` carrying the errno.
fn nl_error(err: rtnetlink::Error) -> io::Error {
    match err {
        rtnetlink::Error::NetlinkError(msg) => match msg.code {
            Some(code) => io::Error::from_raw_os_error(-code.get()),
            None => io::Error::other("netlink error without a code"),
        },
        other => io::Error::other(other.to_string()),
    }
}

impl Linux {
    /// Not connected yet: the netlink socket is opened on first use (inside the runtime).
    pub fn new() -> Linux {
        let (dhcp_tx, dhcp_rx) = mpsc::unbounded_channel();
        Linux {
            conn: None,
            dhcp: BTreeMap::new(),
            dhcp_tx,
            dhcp_rx,
        }
    }

    fn handle(&mut self) -> io::Result<Handle> {
        if let Some(conn) = &self.conn {
            return Ok(conn.handle.clone());
        }
        let (connection, handle, notifications) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv6Ifaddr,
        ])?;
        let task = tokio::spawn(connection);
        self.conn = Some(Conn {
            handle: handle.clone(),
            notifications,
            task,
        });
        Ok(handle)
    }
}

/// A link from an `RTM_NEWLINK` message.
pub fn link_info(msg: &LinkMessage) -> LinkInfo {
    let flags = msg.header.flags;
    let mut link = LinkInfo {
        index: msg.header.index,
        up: flags.contains(LinkFlags::Up),
        lower_up: flags.contains(LinkFlags::LowerUp),
        loopback: flags.contains(LinkFlags::Loopback),
        ..LinkInfo::default()
    };
    let mac = |bytes: &Vec<u8>| <[u8; 6]>::try_from(bytes.as_slice()).ok();
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name.clone_from(name),
            LinkAttribute::Address(bytes) => link.mac = mac(bytes),
            LinkAttribute::PermAddress(bytes) => link.perm_mac = mac(bytes),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            _ => {}
        }
    }
    link
}

/// The address (with prefix) of an address message: IPv4's local address, else the
/// address attribute.
fn address_of(msg: &AddressMessage) -> Option<IpNet> {
    let mut local = None;
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    IpNet::new(local.or(address)?, msg.header.prefix_len).ok()
}

fn route_ip(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// A main-table unicast route out of `index`, as a [`RouteSpec`].
fn route_of(msg: &RouteMessage, index: u32, v6: bool) -> Option<RouteSpec> {
    if msg.header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(msg.header.table);
    let (mut dst, mut via, mut oif, mut metric) = (None, None, None, 0);
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(a) => dst = route_ip(a),
            RouteAttribute::Gateway(a) => via = route_ip(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || oif != Some(index) {
        return None;
    }
    let unspecified = if v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    let to = IpNet::new(
        dst.unwrap_or(unspecified),
        msg.header.destination_prefix_length,
    )
    .ok()?;
    Some(RouteSpec {
        to: to.trunc(),
        via,
        metric,
    })
}

/// A route the builder refused (a gateway of the other family...).
fn invalid(err: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, err.to_string())
}

fn route_message(
    index: u32,
    route: &RouteSpec,
    protocol: RouteProtocol,
) -> io::Result<RouteMessage> {
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.to.addr(), route.to.prefix_len())
        .map_err(invalid)?;
    match route.via {
        Some(via) => builder = builder.gateway(via).map_err(invalid)?,
        None if route.to.addr().is_ipv4() => builder = builder.scope(RouteScope::Link),
        None => {}
    }
    Ok(builder
        .output_interface(index)
        .priority(route.metric)
        .protocol(protocol)
        .build())
}

fn address_message(index: u32, addr: IpNet) -> AddressMessage {
    match addr {
        IpNet::V4(net) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(net.addr(), net.prefix_len())
            .build(),
        IpNet::V6(net) => AddressMessageBuilder::<Ipv6Addr>::new()
            .index(index)
            .address(net.addr(), net.prefix_len())
            .build(),
    }
}

/// What a multicast notification means to the engine.
fn notification(msg: NetlinkMessage<RouteNetlinkMessage>) -> Input {
    let NetlinkPayload::InnerMessage(inner) = msg.payload else {
        return Input::Other;
    };
    match inner {
        RouteNetlinkMessage::NewLink(link) => Input::Link(link_info(&link)),
        RouteNetlinkMessage::DelLink(link) => Input::LinkGone(link.header.index),
        RouteNetlinkMessage::DelAddress(addr) => match address_of(&addr) {
            Some(net) => Input::AddressGone {
                index: addr.header.index,
                addr: net,
            },
            None => Input::Other,
        },
        _ => Input::Other,
    }
}

/// The link's DHCP sending socket: UDP from `0.0.0.0:68`, bound to the link, allowed
/// to broadcast. It owns port 68 but is not read (replies come through
/// [`dhcp_listener`]), so its receive buffer is kept at the minimum.
fn dhcp_sender(name: &str) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_broadcast(true)?;
    socket.bind_device(Some(name.as_bytes()))?;
    socket.set_recv_buffer_size(0)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, super::dhcp::PORT).into())?;
    Ok(socket.into())
}

/// `ETH_P_IP`.
const ETH_P_IP: u16 = 0x0800;

/// Classic BPF: accept unfragmented IPv4 UDP datagrams to port 68, drop the rest (as
/// `tcpdump -d 'udp dst port 68'` would, on packets without an Ethernet header, except
/// that first fragments are dropped too: [`super::dhcp::udp_payload`] refuses them).
const DHCP_CLIENT_FILTER: [(u16, u8, u8, u32); 9] = [
    (0x30, 0, 0, 9),      // ldb [9]            (IP protocol)
    (0x15, 0, 6, 17),     // jeq #17 (UDP)      else drop
    (0x28, 0, 0, 6),      // ldh [6]            (flags, fragment offset)
    (0x45, 4, 0, 0x3fff), // jset #0x3fff       a fragment (MF or offset): drop
    (0xb1, 0, 0, 0),      // ldxb 4*([0]&0xf)   (IP header length)
    (0x48, 0, 0, 2),      // ldh [x + 2]        (UDP destination port)
    (0x15, 0, 1, 68),     // jeq #68            else drop
    (0x06, 0, 0, 65535),  // ret #65535         accept
    (0x06, 0, 0, 0),      // ret #0             drop
];

/// The link's DHCP receiving socket: a packet socket on the link that sees DHCP replies
/// before the IP layer does. A UDP socket alone would not: while the link has no
/// address, the kernel's reverse-path filter (`rp_filter` 1 or 2, which sysctls may
/// well set) drops the server's broadcast OFFER and ACK, whose source it cannot route.
fn dhcp_listener(index: u32) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::PACKET,
        Type::DGRAM,
        Some(Protocol::from(i32::from(ETH_P_IP.to_be()))),
    )?;
    let filter: Vec<socket2::SockFilter> = DHCP_CLIENT_FILTER
        .iter()
        .map(|&(code, jt, jf, k)| socket2::SockFilter::new(code, jt, jf, k))
        .collect();
    socket.attach_filter(&filter)?;
    socket.set_nonblocking(true)?;
    let ifindex = i32::try_from(index).map_err(|_| io::Error::from_raw_os_error(19))?;
    let mut storage = socket2::SockAddrStorage::zeroed();
    // SAFETY: `sockaddr_ll` is one of this platform's socket address types (what
    // `view_as` requires) and fits in the storage; every field is plain data.
    let ll = unsafe { storage.view_as::<libc::sockaddr_ll>() };
    ll.sll_family = libc::AF_PACKET as u16;
    ll.sll_protocol = ETH_P_IP.to_be();
    ll.sll_ifindex = ifindex;
    let len = size_of::<libc::sockaddr_ll>() as socket2::socklen_t;
    // SAFETY: the storage holds an initialised `sockaddr_ll` of `len` bytes.
    let addr = unsafe { socket2::SockAddr::new(storage, len) };
    socket.bind(&addr)?;
    Ok(socket)
}

/// Read DHCP replies from a link's packet socket and send their payloads on `tx`.
async fn listen(index: u32, socket: Socket, tx: mpsc::UnboundedSender<(u32, Vec<u8>)>) {
    // SAFETY: the socket owns its descriptor, which stays open (and the same) for as
    // long as the registration, which owns the socket, lives.
    let Ok(fd) = (unsafe { AsyncFd::register(socket) }) else {
        return;
    };
    let mut buf = vec![0u8; 2048];
    loop {
        let Ok(mut ready) = fd.readable().await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        match ready.try_io(|fd| (&mut fd.get_ref()).read(&mut buf)) {
            Ok(Ok(n)) => {
                let payload = buf.get(..n).and_then(super::dhcp::udp_payload);
                if let Some(payload) = payload
                    && tx.send((index, payload.to_vec())).is_err()
                {
                    return;
                }
            }
            // A transient error (ENETDOWN while the link flaps): keep listening.
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(_would_block) => {}
        }
    }
}

impl NetSys for Linux {
    async fn links(&mut self) -> io::Result<Vec<LinkInfo>> {
        let handle = self.handle()?;
        let mut stream = handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(msg) = stream.next().await {
            out.push(link_info(&msg.map_err(nl_error)?));
        }
        Ok(out)
    }

    async fn addresses(&mut self, index: u32) -> io::Result<Vec<IpNet>> {
        let handle = self.handle()?;
        let mut stream = handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut out = Vec::new();
        while let Some(msg) = stream.next().await {
            let msg = msg.map_err(nl_error)?;
            if msg.header.index == index {
                out.extend(address_of(&msg));
            }
        }
        Ok(out)
    }

    async fn routes(&mut self, index: u32) -> io::Result<Vec<RouteSpec>> {
        let handle = self.handle()?;
        let mut out = Vec::new();
        for v6 in [false, true] {
            let query = if v6 {
                RouteMessageBuilder::<Ipv6Addr>::new().build()
            } else {
                RouteMessageBuilder::<Ipv4Addr>::new().build()
            };
            let mut stream = handle.route().get(query).execute();
            while let Some(msg) = stream.next().await {
                match msg {
                    Ok(msg) => out.extend(route_of(&msg, index, v6)),
                    // IPv6 disabled in this kernel: no IPv6 routes.
                    Err(e) if v6 && super::sys::is_no_family(&nl_error(e.clone())) => break,
                    Err(e) => return Err(nl_error(e)),
                }
            }
        }
        Ok(out)
    }

    async fn set_link(&mut self, index: u32, up: bool, mtu: Option<u32>) -> io::Result<()> {
        let handle = self.handle()?;
        let mut builder = LinkUnspec::new_with_index(index);
        if up {
            builder = builder.up();
        }
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        handle
            .link()
            .change(builder.build())
            .execute()
            .await
            .map_err(nl_error)
    }

    async fn add_address(&mut self, index: u32, addr: IpNet) -> io::Result<()> {
        let handle = self.handle()?;
        handle
            .address()
            .add(index, addr.addr(), addr.prefix_len())
            .execute()
            .await
            .map_err(nl_error)
    }

    async fn del_address(&mut self, index: u32, addr: IpNet) -> io::Result<()> {
        let handle = self.handle()?;
        handle
            .address()
            .del(address_message(index, addr))
            .execute()
            .await
            .map_err(nl_error)
    }

    async fn add_route(&mut self, index: u32, route: RouteSpec, source: Source) -> io::Result<()> {
        let handle = self.handle()?;
        let protocol = match source {
            Source::Static => RouteProtocol::Static,
            Source::Dhcp => RouteProtocol::Dhcp,
        };
        let msg = route_message(index, &route, protocol)?;
        handle.route().add(msg).execute().await.map_err(nl_error)
    }

    async fn del_route(&mut self, index: u32, route: RouteSpec) -> io::Result<()> {
        let handle = self.handle()?;
        let msg = route_message(index, &route, RouteProtocol::Unspec)?;
        handle.route().del(msg).execute().await.map_err(nl_error)
    }

    fn dhcp_open(&mut self, index: u32, name: &str) -> io::Result<()> {
        self.dhcp_close(index);
        let socket = Arc::new(UdpSocket::from_std(dhcp_sender(name)?)?);
        let listener = dhcp_listener(index)?;
        let reader = tokio::spawn(listen(index, listener, self.dhcp_tx.clone()));
        self.dhcp.insert(index, DhcpSocket { socket, reader });
        Ok(())
    }

    fn dhcp_close(&mut self, index: u32) {
        if let Some(old) = self.dhcp.remove(&index) {
            old.reader.abort();
        }
    }

    async fn dhcp_send(&mut self, index: u32, packet: &[u8], to: SocketAddrV4) -> io::Result<()> {
        let socket = self
            .dhcp
            .get(&index)
            .map(|s| Arc::clone(&s.socket))
            .ok_or_else(|| io::Error::from_raw_os_error(19))?;
        socket.send_to(packet, to).await.map(|_| ())
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    async fn next_input(&mut self, deadline: Option<Instant>) -> Input {
        if self.conn.is_none() {
            if self.handle().is_err() {
                // No netlink socket (out of memory?): try again in a second.
                tokio::time::sleep(Duration::from_secs(1)).await;
                return Input::Other;
            }
            return Input::Resync;
        }
        let Some(conn) = self.conn.as_mut() else {
            return Input::Other;
        };
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = conn.notifications.next() => match msg {
                Some((msg, _)) => notification(msg),
                None => {
                    // The connection ended (socket error, lost notifications): reopen on
                    // the next call and read everything again.
                    conn.task.abort();
                    self.conn = None;
                    Input::Other
                }
            },
            Some((index, packet)) = self.dhcp_rx.recv() => Input::Dhcp { index, packet },
            () = sleep => Input::Deadline,
        }
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::AddressFamily;

    use super::*;

    #[test]
    fn links_read_from_netlink_messages() {
        let mut msg = LinkMessage::default();
        msg.header.index = 2;
        msg.header.flags = LinkFlags::Up | LinkFlags::LowerUp | LinkFlags::Broadcast;
        msg.attributes = vec![
            LinkAttribute::IfName("eth0".into()),
            LinkAttribute::Address(vec![0x52, 0x54, 0, 1, 2, 3]),
            LinkAttribute::PermAddress(vec![0x52, 0x54, 0, 9, 9, 9]),
            LinkAttribute::Mtu(1450),
        ];
        let link = link_info(&msg);
        assert_eq!(
            link,
            LinkInfo {
                index: 2,
                name: "eth0".into(),
                mac: Some([0x52, 0x54, 0, 1, 2, 3]),
                perm_mac: Some([0x52, 0x54, 0, 9, 9, 9]),
                mtu: 1450,
                up: true,
                lower_up: true,
                loopback: false,
            }
        );
        assert!(link.running());
        // No Ethernet address (a tunnel): no MAC.
        msg.attributes = vec![LinkAttribute::Address(vec![10, 0, 0, 1])];
        assert_eq!(link_info(&msg).mac, None);
    }

    fn route(
        dst: Option<(IpAddr, u8)>,
        gateway: Option<IpAddr>,
        oif: u32,
        table: u8,
    ) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header.kind = RouteType::Unicast;
        msg.header.table = table;
        if let Some((ip, len)) = dst {
            msg.header.destination_prefix_length = len;
            msg.attributes.push(RouteAttribute::Destination(ip.into()));
        }
        if let Some(gw) = gateway {
            msg.attributes.push(RouteAttribute::Gateway(gw.into()));
        }
        msg.attributes.push(RouteAttribute::Oif(oif));
        msg.attributes.push(RouteAttribute::Priority(1024));
        msg
    }

    #[test]
    fn routes_read_from_netlink_messages() {
        let main = RouteHeader::RT_TABLE_MAIN;
        let gw: IpAddr = "10.99.0.1".parse().unwrap();
        let default = route_of(&route(None, Some(gw), 2, main), 2, false).unwrap();
        assert_eq!(default.to_string(), "default via 10.99.0.1 metric 1024");
        let net = route(Some(("10.6.1.0".parse().unwrap(), 16)), None, 2, main);
        assert_eq!(
            route_of(&net, 2, false).unwrap().to_string(),
            "10.6.0.0/16 metric 1024"
        );
        // Another link, another table, a local route: not ours to compare.
        assert_eq!(route_of(&route(None, Some(gw), 3, main), 2, false), None);
        assert_eq!(route_of(&route(None, Some(gw), 2, 255), 2, false), None);
        let mut local = route(None, Some(gw), 2, main);
        local.header.kind = RouteType::Local;
        assert_eq!(route_of(&local, 2, false), None);
        // IPv6 default route.
        let v6gw: IpAddr = "fe80::1".parse().unwrap();
        let v6 = route_of(&route(None, Some(v6gw), 2, main), 2, true).unwrap();
        assert_eq!(v6.to_string(), "default via fe80::1 metric 1024");
        assert!(v6.to.addr().is_ipv6());
    }

    #[test]
    fn route_requests_carry_scope_protocol_and_metric() {
        let spec = RouteSpec::new("10.6.0.0/16".parse().unwrap(), None, Some(5));
        let msg = route_message(2, &spec, RouteProtocol::Static).unwrap();
        assert_eq!(msg.header.scope, RouteScope::Link, "on-link IPv4 route");
        assert_eq!(msg.header.protocol, RouteProtocol::Static);
        assert_eq!(msg.header.address_family, AddressFamily::Inet);
        assert!(msg.attributes.contains(&RouteAttribute::Oif(2)));
        assert!(msg.attributes.contains(&RouteAttribute::Priority(5)));
        let via = RouteSpec::new(
            "0.0.0.0/0".parse().unwrap(),
            Some("10.5.0.1".parse().unwrap()),
            None,
        );
        let msg = route_message(2, &via, RouteProtocol::Dhcp).unwrap();
        assert_eq!(msg.header.scope, RouteScope::Universe);
        assert_eq!(route_of(&msg, 2, false), Some(via));
    }

    #[test]
    fn notifications_become_inputs() {
        let mut addr = AddressMessage::default();
        addr.header.index = 4;
        addr.header.prefix_len = 24;
        addr.attributes = vec![
            AddressAttribute::Address("10.5.0.2".parse().unwrap()),
            AddressAttribute::Local("10.5.0.2".parse().unwrap()),
        ];
        let msg = NetlinkMessage::from(RouteNetlinkMessage::DelAddress(addr.clone()));
        assert_eq!(
            notification(msg),
            Input::AddressGone {
                index: 4,
                addr: "10.5.0.2/24".parse().unwrap()
            }
        );
        let msg = NetlinkMessage::from(RouteNetlinkMessage::NewAddress(addr));
        assert_eq!(notification(msg), Input::Other);
        let mut link = LinkMessage::default();
        link.header.index = 7;
        let msg = NetlinkMessage::from(RouteNetlinkMessage::DelLink(link));
        assert_eq!(notification(msg), Input::LinkGone(7));
    }

    /// Run a classic BPF program over a packet (only the instructions the filter uses);
    /// the number of bytes it accepts.
    fn run_filter(program: &[(u16, u8, u8, u32)], packet: &[u8]) -> u32 {
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        let byte = |at: usize| packet.get(at).map(|&b| u32::from(b));
        let half = |at: usize| Some(byte(at)? << 8 | byte(at + 1)?);
        loop {
            let (code, jt, jf, k) = program[pc];
            pc += 1;
            let loaded = match code {
                0x30 => byte(k as usize),
                0x28 => half(k as usize),
                0x48 => half((x + k) as usize),
                0xb1 => {
                    x = (byte(k as usize).unwrap_or(0) & 0x0f) * 4;
                    continue;
                }
                0x15 => {
                    pc += usize::from(if a == k { jt } else { jf });
                    continue;
                }
                0x45 => {
                    pc += usize::from(if a & k != 0 { jt } else { jf });
                    continue;
                }
                0x06 => return k,
                other => panic!("instruction {other:#x} not emulated"),
            };
            match loaded {
                Some(value) => a = value,
                // Reading past the end rejects the packet.
                None => return 0,
            }
        }
    }

    /// An IPv4 header (20 bytes) + UDP header to `port`.
    fn packet(protocol: u8, flags: u16, port: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 36, 0, 1];
        p.extend_from_slice(&flags.to_be_bytes());
        p.extend_from_slice(&[64, protocol, 0, 0, 10, 99, 0, 1, 255, 255, 255, 255]);
        p.extend_from_slice(&67u16.to_be_bytes());
        p.extend_from_slice(&port.to_be_bytes());
        p.extend_from_slice(&[0, 16, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
        p
    }

    #[test]
    fn the_filter_passes_only_dhcp_replies() {
        let run = |p: &[u8]| run_filter(&DHCP_CLIENT_FILTER, p);
        assert_eq!(
            run(&packet(17, 0x4000, 68)),
            65535,
            "UDP to 68, don't-fragment"
        );
        assert_eq!(run(&packet(17, 0, 68)), 65535);
        assert_eq!(run(&packet(17, 0, 67)), 0, "to the server port");
        assert_eq!(run(&packet(6, 0, 68)), 0, "TCP");
        assert_eq!(run(&packet(17, 0x2000, 68)), 0, "first fragment");
        assert_eq!(run(&packet(17, 0x0010, 68)), 0, "later fragment");
        // IP options move the UDP header: the filter follows the header length.
        let mut options = packet(17, 0, 68);
        options[0] = 0x46;
        options.splice(20..20, [1, 1, 1, 0]);
        assert_eq!(run(&options), 65535);
        assert_eq!(run(&packet(17, 0, 68)[..21]), 0, "truncated");
    }
}
