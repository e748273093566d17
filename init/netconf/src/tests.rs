//! The engine against the recording fake: what `apply` does to a fresh machine, how link
//! changes and hotplug are followed, and a whole DHCP life (lease, renewal at T1,
//! expiry) on the virtual clock.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode};
use keelson_configs::schema::{Interface, Network, Route};
use keelson_configs::values::MacAddr;

use super::sys::fake::Fake;
use super::*;
use ipnet::IpNet;

const MAC0: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
const MAC1: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

fn static_eth0() -> Network {
    Network {
        nameservers: vec!["10.5.0.1".parse().unwrap()],
        interfaces: vec![Interface {
            name: Some("eth0".into()),
            addresses: vec!["10.5.0.2/24".parse().unwrap()],
            routes: vec![Route {
                to: "0.0.0.0/0".parse().unwrap(),
                via: Some("10.5.0.1".parse().unwrap()),
                metric: None,
            }],
            mtu: Some(1400),
            ..Interface::default()
        }],
    }
}

fn dhcp_eth0() -> Network {
    Network {
        nameservers: Vec::new(),
        interfaces: vec![Interface {
            mac: Some(MacAddr(MAC0)),
            dhcp: true,
            ..Interface::default()
        }],
    }
}

fn lines(events: &[NetEvent]) -> Vec<String> {
    events.iter().map(|e| e.to_string()).collect()
}

/// Handle every queued input (kernel notifications the fake produced) and return the
/// events.
async fn drain(net: &mut NetConf<Fake>) -> Vec<NetEvent> {
    let mut events = Vec::new();
    while let Some(input) = net.sys_mut().inputs.pop_front() {
        events.extend(net.handle(input).await);
    }
    events
}

#[tokio::test(flavor = "current_thread")]
async fn apply_configures_loopback_and_a_static_interface() {
    let fake = Fake::new()
        .with_link(2, "eth0", MAC0)
        .with_link(3, "eth1", MAC1);
    let mut net = NetConf::with_sys(&static_eth0(), Some("cp-1"), fake);
    let events = net.apply().await.unwrap();
    assert_eq!(
        lines(&events),
        [
            "mtu 1400 set on eth0",
            "address 10.5.0.2/24 added to eth0 (static)",
            "route default via 10.5.0.1 added on eth0 (static)",
            "nameservers 10.5.0.1",
        ]
    );
    assert_eq!(
        net.sys_mut().take_calls(),
        [
            "link set lo up",
            // The kernel gave lo its addresses when it came up: EEXIST, said nothing.
            "addr add 127.0.0.1/8 dev lo",
            "addr add ::1/128 dev lo",
            "link set eth0 up mtu 1400",
            "addr add 10.5.0.2/24 dev eth0",
            "route add default via 10.5.0.1 dev eth0 proto static",
        ]
    );
    // eth1 is not in the config: untouched. The carrier notifications say "up".
    let events = drain(&mut net).await;
    assert_eq!(lines(&events), ["link eth0 up"]);
    assert!(net.sys_mut().take_calls().is_empty(), "converged");
    assert_eq!(net.primary_mac(), Some(MAC0));
}

#[tokio::test(flavor = "current_thread")]
async fn a_carrier_loss_and_return_reapplies_what_the_kernel_flushed() {
    let fake = Fake::new().with_link(2, "eth0", MAC0);
    let mut net = NetConf::with_sys(&static_eth0(), None, fake);
    net.apply().await.unwrap();
    drain(&mut net).await;
    net.sys_mut().take_calls();

    let mut link = net.sys().links[&2].clone();
    link.lower_up = false;
    assert_eq!(
        lines(&net.handle(Input::Link(link.clone())).await),
        ["link eth0 down"]
    );
    // While it was down the kernel flushed the gateway route.
    net.sys_mut().routes.clear();
    link.lower_up = true;
    assert_eq!(
        lines(&net.handle(Input::Link(link)).await),
        [
            "link eth0 up",
            "route default via 10.5.0.1 added on eth0 (static)"
        ]
    );
    assert_eq!(
        net.sys_mut().take_calls(),
        ["route add default via 10.5.0.1 dev eth0 proto static"]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_link_set_down_by_someone_else_is_left_down_until_it_comes_back() {
    let fake = Fake::new().with_link(2, "eth0", MAC0);
    let mut net = NetConf::with_sys(&static_eth0(), None, fake);
    net.apply().await.unwrap();
    drain(&mut net).await;
    net.sys_mut().take_calls();

    let mut link = net.sys().links[&2].clone();
    link.up = false;
    link.lower_up = false;
    assert_eq!(
        lines(&net.handle(Input::Link(link.clone())).await),
        ["link eth0 down"]
    );
    assert!(
        net.sys_mut().take_calls().is_empty(),
        "not set up again behind their back"
    );
    // An MTU change while it is down does not bring it up either.
    link.mtu = 1500;
    assert!(net.handle(Input::Link(link.clone())).await.is_empty());
    link.up = true;
    link.lower_up = true;
    net.sys_mut().routes.clear();
    assert_eq!(
        lines(&net.handle(Input::Link(link)).await),
        [
            "link eth0 up",
            "mtu 1400 set on eth0",
            "route default via 10.5.0.1 added on eth0 (static)"
        ]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn an_interface_that_appears_later_is_configured_then() {
    let mut config = static_eth0();
    config.interfaces[0].name = None;
    config.interfaces[0].mac = Some(MacAddr(MAC1));
    let mut net = NetConf::with_sys(&config, None, Fake::new().with_link(2, "eth0", MAC0));
    let events = net.apply().await.unwrap();
    assert_eq!(
        lines(&events),
        [
            "interface mac 52:54:00:00:00:02 not present: configured when it appears",
            "nameservers 10.5.0.1",
        ]
    );
    drain(&mut net).await;
    net.sys_mut().take_calls();
    // Hotplug.
    let link = net.sys_mut().add_link(7, "enp7s0", MAC1);
    let events = net.handle(Input::Link(link)).await;
    assert_eq!(
        lines(&events),
        [
            "interface mac 52:54:00:00:00:02 is link enp7s0",
            "mtu 1400 set on enp7s0",
            "address 10.5.0.2/24 added to enp7s0 (static)",
            "route default via 10.5.0.1 added on enp7s0 (static)",
        ]
    );
    assert_eq!(lines(&drain(&mut net).await), ["link enp7s0 up"]);
    // Unplugged: forgotten, and missing again.
    assert_eq!(
        lines(&net.handle(Input::LinkGone(7)).await),
        [
            "link enp7s0 removed",
            "interface mac 52:54:00:00:00:02 not present: configured when it appears"
        ]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn an_address_removed_by_someone_else_comes_back() {
    let mut net = NetConf::with_sys(&static_eth0(), None, Fake::new().with_link(2, "eth0", MAC0));
    net.apply().await.unwrap();
    drain(&mut net).await;
    net.sys_mut().addresses.get_mut(&2).unwrap().clear();
    let addr: IpNet = "10.5.0.2/24".parse().unwrap();
    let events = net.handle(Input::AddressGone { index: 2, addr }).await;
    assert_eq!(
        lines(&events),
        ["address 10.5.0.2/24 added to eth0 (static)"]
    );
    // Someone else's address going away is none of our business.
    let other: IpNet = "192.0.2.9/24".parse().unwrap();
    assert!(
        net.handle(Input::AddressGone {
            index: 2,
            addr: other
        })
        .await
        .is_empty()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn failures_are_reported_per_link_and_the_rest_goes_on() {
    let mut fake = Fake::new().with_link(2, "eth0", MAC0);
    fake.failures.insert("route add".into(), 101);
    let mut net = NetConf::with_sys(&static_eth0(), None, fake);
    let events = net.apply().await.unwrap();
    assert_eq!(
        lines(&events),
        [
            "mtu 1400 set on eth0",
            "address 10.5.0.2/24 added to eth0 (static)",
            "network error on eth0: cannot add route default via 10.5.0.1: ENETUNREACH (101)",
            "nameservers 10.5.0.1",
        ]
    );
    // The next change retries it.
    net.sys_mut().failures.clear();
    assert_eq!(
        lines(&drain(&mut net).await),
        [
            "link eth0 up",
            "route default via 10.5.0.1 added on eth0 (static)"
        ]
    );
}

/// What the server says to the client's last message.
fn answer(request: &[u8], kind: MessageType, lease_secs: u32) -> Input {
    let request = dhcp::decode(request).unwrap();
    let mut msg = Message::default();
    msg.set_opcode(Opcode::BootReply)
        .set_xid(request.xid())
        .set_chaddr(&request.chaddr()[..6])
        .set_yiaddr(Ipv4Addr::new(10, 99, 0, 51));
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ServerIdentifier(SERVER));
    opts.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
    opts.insert(DhcpOption::Router(vec![SERVER]));
    opts.insert(DhcpOption::DomainNameServer(vec![SERVER]));
    opts.insert(DhcpOption::DomainName("lab.internal".into()));
    opts.insert(DhcpOption::Hostname("node-7".into()));
    opts.insert(DhcpOption::AddressLeaseTime(lease_secs));
    Input::Dhcp {
        index: 2,
        packet: dhcp::encode(&msg).unwrap(),
    }
}

fn last_sent(net: &NetConf<Fake>) -> (MessageType, Vec<u8>, SocketAddrV4) {
    let (_, bytes, to) = net.sys().sent.last().unwrap().clone();
    let kind = dhcp::decode(&bytes).unwrap().opts().msg_type().unwrap();
    (kind, bytes, to)
}

#[tokio::test(flavor = "current_thread")]
async fn a_dhcp_lease_is_applied_renewed_at_t1_and_removed_when_it_expires() {
    let mut net = NetConf::with_sys(&dhcp_eth0(), None, Fake::new().with_link(2, "eth0", MAC0));
    let events = net.apply().await.unwrap();
    assert_eq!(
        lines(&events),
        ["interface mac 52:54:00:00:00:01 is link eth0"]
    );
    assert_eq!(net.sys().open_sockets, [2]);
    // The carrier comes up: DISCOVER, broadcast.
    assert_eq!(lines(&drain(&mut net).await), ["link eth0 up"]);
    let (kind, discover, to) = last_sent(&net);
    assert_eq!(
        (kind, to),
        (
            MessageType::Discover,
            SocketAddrV4::new(Ipv4Addr::BROADCAST, 67)
        )
    );
    // OFFER → REQUEST.
    assert!(
        net.handle(answer(&discover, MessageType::Offer, 120))
            .await
            .is_empty()
    );
    let (kind, request, _) = last_sent(&net);
    assert_eq!(kind, MessageType::Request);
    // ACK → the lease and everything it brings.
    net.sys_mut().take_calls();
    let events = net.handle(answer(&request, MessageType::Ack, 120)).await;
    assert_eq!(
        lines(&events),
        [
            "dhcp lease 10.99.0.51/24 on eth0 from 10.99.0.1 for 120 s, router 10.99.0.1, dns 10.99.0.1",
            "address 10.99.0.51/24 added to eth0 (dhcp)",
            "route default via 10.99.0.1 metric 1024 added on eth0 (dhcp)",
            "nameservers 10.99.0.1, search lab.internal",
            "hostname node-7 from dhcp",
        ]
    );
    assert_eq!(
        net.sys_mut().take_calls(),
        [
            "addr add 10.99.0.51/24 dev eth0",
            "route add default via 10.99.0.1 metric 1024 dev eth0 proto dhcp",
        ]
    );
    // The renewal is due at T1 = 60 s.
    let t0 = net.sys().now;
    assert_eq!(net.next_deadline(), Some(t0 + Duration::from_secs(60)));
    let input = {
        let deadline = net.next_deadline();
        net.sys_mut().next_input(deadline).await
    };
    assert_eq!(input, Input::Deadline);
    assert!(net.handle(input).await.is_empty());
    let (kind, renew, to) = last_sent(&net);
    assert_eq!(
        (kind, to),
        (MessageType::Request, SocketAddrV4::new(SERVER, 67))
    );
    let events = net.handle(answer(&renew, MessageType::Ack, 120)).await;
    assert_eq!(
        lines(&events),
        ["dhcp lease 10.99.0.51/24 on eth0 renewed for 120 s"]
    );
    assert!(net.sys_mut().take_calls().is_empty(), "nothing to change");
    // Now the server goes away: renew, rebind, expire.
    let mut events = Vec::new();
    for _ in 0..10 {
        let input = {
            let deadline = net.next_deadline();
            net.sys_mut().next_input(deadline).await
        };
        events.extend(net.handle(input).await);
        if !events.is_empty() {
            break;
        }
    }
    assert_eq!(net.sys().now, t0 + Duration::from_secs(60 + 120));
    assert_eq!(
        lines(&events),
        [
            "dhcp lease 10.99.0.51/24 on eth0 lost: expired",
            "route default via 10.99.0.1 metric 1024 removed from eth0 (dhcp)",
            "address 10.99.0.51/24 removed from eth0 (dhcp)",
            "nameservers none",
        ]
    );
    assert_eq!(last_sent(&net).0, MessageType::Discover);
}

#[tokio::test(flavor = "current_thread")]
async fn dhcp_waits_for_the_carrier_and_confirms_the_lease_when_it_returns() {
    let mut fake = Fake::new().with_link(2, "eth0", MAC0);
    fake.carrier_on_up = false;
    let mut net = NetConf::with_sys(&dhcp_eth0(), Some("cp-1"), fake);
    net.apply().await.unwrap();
    drain(&mut net).await;
    assert!(net.sys().sent.is_empty(), "no carrier, no DISCOVER");
    let mut link = net.sys().links[&2].clone();
    link.lower_up = true;
    net.handle(Input::Link(link.clone())).await;
    let (kind, discover, _) = last_sent(&net);
    assert_eq!(kind, MessageType::Discover);
    // The configured host name is sent, and DHCP's is not announced.
    let msg = dhcp::decode(&discover).unwrap();
    assert_eq!(
        msg.opts().get(dhcproto::v4::OptionCode::Hostname),
        Some(&DhcpOption::Hostname("cp-1".into()))
    );
    net.handle(answer(&discover, MessageType::Offer, 3600))
        .await;
    let (_, request, _) = last_sent(&net);
    let events = net.handle(answer(&request, MessageType::Ack, 3600)).await;
    assert!(!lines(&events).iter().any(|l| l.starts_with("hostname")));
    // Cable out, cable in: REQUEST for the kept lease.
    link.lower_up = false;
    assert_eq!(
        lines(&net.handle(Input::Link(link.clone())).await),
        ["link eth0 down"]
    );
    link.lower_up = true;
    net.handle(Input::Link(link)).await;
    let (kind, reboot, to) = last_sent(&net);
    assert_eq!(
        (kind, to.ip()),
        (MessageType::Request, &Ipv4Addr::BROADCAST)
    );
    let events = net.handle(answer(&reboot, MessageType::Ack, 3600)).await;
    assert_eq!(
        lines(&events),
        ["dhcp lease 10.99.0.51/24 on eth0 renewed for 3600 s"]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn run_sends_every_event_and_releases_leases_when_stopped() {
    let mut net = NetConf::with_sys(&dhcp_eth0(), None, Fake::new().with_link(2, "eth0", MAC0));
    net.apply().await.unwrap();
    drain(&mut net).await;
    let (_, discover, _) = last_sent(&net);
    net.handle(answer(&discover, MessageType::Offer, 120)).await;
    let (_, request, _) = last_sent(&net);
    net.sys_mut()
        .inputs
        .push_back(answer(&request, MessageType::Ack, 120));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // The fake has one input queued; then the virtual clock runs to T1, where the stop
    // future (already complete after one poll) wins.
    let mut polled = false;
    let stop = std::future::poll_fn(move |_| {
        if polled {
            std::task::Poll::Ready(())
        } else {
            polled = true;
            std::task::Poll::Pending
        }
    });
    net.run_until(tx, stop).await;
    let mut got = Vec::new();
    while let Ok(event) = rx.try_recv() {
        got.push(event.to_string());
    }
    assert_eq!(
        got[0],
        "dhcp lease 10.99.0.51/24 on eth0 from 10.99.0.1 for 120 s, router 10.99.0.1, dns 10.99.0.1"
    );
    assert!(got.contains(&"address 10.99.0.51/24 added to eth0 (dhcp)".to_string()));
    // Stopped: the lease is given back and what it brought is removed.
    let n = got.len();
    assert_eq!(
        got[n - 4..],
        [
            "dhcp lease 10.99.0.51/24 on eth0 lost: released",
            "route default via 10.99.0.1 metric 1024 removed from eth0 (dhcp)",
            "address 10.99.0.51/24 removed from eth0 (dhcp)",
            "nameservers none",
        ]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn release_gives_the_lease_back_and_removes_it() {
    let mut net = NetConf::with_sys(&dhcp_eth0(), None, Fake::new().with_link(2, "eth0", MAC0));
    net.apply().await.unwrap();
    drain(&mut net).await;
    let (_, discover, _) = last_sent(&net);
    net.handle(answer(&discover, MessageType::Offer, 120)).await;
    let (_, request, _) = last_sent(&net);
    net.handle(answer(&request, MessageType::Ack, 120)).await;
    net.sys_mut().take_calls();
    let events = net.release().await;
    assert_eq!(
        lines(&events),
        [
            "dhcp lease 10.99.0.51/24 on eth0 lost: released",
            "route default via 10.99.0.1 metric 1024 removed from eth0 (dhcp)",
            "address 10.99.0.51/24 removed from eth0 (dhcp)",
            "nameservers none",
        ]
    );
    let (kind, _, to) = last_sent(&net);
    assert_eq!(
        (kind, to),
        (MessageType::Release, SocketAddrV4::new(SERVER, 67))
    );
    assert_eq!(
        net.sys_mut().take_calls(),
        [
            "route del default via 10.99.0.1 metric 1024 dev eth0",
            "addr del 10.99.0.51/24 dev eth0",
        ]
    );
    assert_eq!(net.next_deadline(), None, "nothing left to do");
}

#[test]
fn the_real_engine_runs_in_a_spawned_task() {
    fn assert_send<T: Send + 'static>(_: &T) {}
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let net = NetConf::new(&static_eth0(), None);
    let run = net.run(tx);
    assert_send(&run);
}

#[test]
fn events_read_as_log_lines() {
    let iface = "eth0".to_string();
    let check = |event: NetEvent, line: &str| assert_eq!(event.to_string(), line);
    check(
        NetEvent::AddressAdded {
            iface: iface.clone(),
            cidr: "10.5.0.2/24".parse().unwrap(),
            source: Source::Static,
        },
        "address 10.5.0.2/24 added to eth0 (static)",
    );
    check(
        NetEvent::DhcpLease {
            iface: iface.clone(),
            addr: "10.99.0.51/24".parse().unwrap(),
            server: SERVER,
            router: None,
            dns: Vec::new(),
            lease_secs: dhcp::INFINITE,
        },
        "dhcp lease 10.99.0.51/24 on eth0 from 10.99.0.1 for ever",
    );
    check(
        NetEvent::DhcpLost {
            iface: iface.clone(),
            addr: "10.99.0.51/24".parse().unwrap(),
            reason: LostReason::Nak.to_string(),
        },
        "dhcp lease 10.99.0.51/24 on eth0 lost: refused by the server (NAK)",
    );
    check(
        NetEvent::Error {
            iface,
            message: "cannot add route default via 10.9.9.1: ENETUNREACH (101)".into(),
        },
        "network error on eth0: cannot add route default via 10.9.9.1: ENETUNREACH (101)",
    );
}
