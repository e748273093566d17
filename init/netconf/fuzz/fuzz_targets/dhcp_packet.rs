//! Feeds arbitrary packets, as any host on the link may send them to port 68, to PID 1's
//! DHCPv4 client (`keelson_netconf::dhcp`): the IP/UDP unwrapping of the packet socket
//! (`udp_payload`), the message decoder (`decode`), the lease reader
//! (`Lease::from_ack`) and the client's state machine (`Client`), then what a lease
//! turns into (the link's addresses and routes, `resolv.conf`, `hosts`).
//!
//! Input: packets one after the other, each a control byte, a big-endian u16 length and
//! that many bytes (the last takes what is left). Control bits: 0, the bytes are an IP
//! packet (else a bare DHCP message); 1, the message is made to look addressed to the
//! client (a reply with its transaction id and MAC, which a hostile host on the link can
//! see in the client's broadcasts); 2, the carrier drops and comes back first; 3..=7,
//! `e`: the clock moves on by 2^e - 1 seconds first, and the client's timeouts fire.
//!
//! Properties: nothing panics; a lease's timers are ordered (T1 <= T2 <= lease); a client
//! holding or confirming a lease has one; every message the client sends encodes.

#![no_main]

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dhcproto::v4::Opcode;
use keelson_configs::schema::Interface;
use keelson_netconf::dhcp::{self, Client, INFINITE, Lease, Output, State};
use keelson_netconf::{plan, resolv};
use libfuzzer_sys::fuzz_target;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// A lease as it is used: checked, then turned into the link's state and files.
fn use_lease(lease: &Lease) {
    if lease.lease_secs == INFINITE {
        assert_eq!((lease.t1_secs, lease.t2_secs), (INFINITE, INFINITE));
    } else {
        assert!(lease.t1_secs <= lease.t2_secs, "{lease:?}");
        assert!(lease.t2_secs <= lease.lease_secs, "{lease:?}");
    }
    assert!(lease.mtu.is_none_or(|m| m >= 576));
    let _ = (lease.t1(), lease.t2(), lease.expires());
    let iface = Interface {
        dhcp: true,
        ..Interface::default()
    };
    let _ = plan::desired(&iface, Some(lease));
    let dns: Vec<IpAddr> = lease.dns.iter().map(|d| IpAddr::V4(*d)).collect();
    let _ = resolv::render(&dns, &lease.search);
    let name = lease.hostname.as_deref().unwrap_or("node");
    let _ = resolv::hosts(name, &[IpAddr::V4(lease.addr)]);
}

/// Check what the client asked for and remember the transaction id it last sent.
fn follow(client: &Client, outputs: &[Output], xid: &mut u32) {
    for output in outputs {
        match output {
            Output::Send { message, to } => {
                assert_eq!(message.opcode(), Opcode::BootRequest);
                assert!(dhcp::encode(message).is_ok(), "{message:?}");
                assert_eq!(to.port(), 67);
                *xid = message.xid();
            }
            Output::Bound(lease) | Output::Renewed(lease) => use_lease(lease),
            Output::Lost { .. } => {}
        }
    }
    if matches!(
        client.state(),
        State::Bound | State::Renewing | State::Rebinding | State::Rebooting
    ) {
        assert!(client.lease().is_some(), "{client:?}");
    }
}

/// The next packet: its control byte and bytes.
fn next_packet<'a>(data: &mut &'a [u8]) -> Option<(u8, &'a [u8])> {
    let (&control, rest) = data.split_first()?;
    let (len, rest) = match rest {
        [hi, lo, rest @ ..] => (usize::from(u16::from_be_bytes([*hi, *lo])), rest),
        _ => (rest.len(), rest),
    };
    let (packet, rest) = rest.split_at(len.min(rest.len()));
    *data = rest;
    Some((control, packet))
}

fuzz_target!(|data: &[u8]| {
    let mut now = Instant::now();
    let mut client = Client::new(MAC, Some("node-1".into()), 7);
    let mut xid = 0;
    let outputs = client.start(now);
    follow(&client, &outputs, &mut xid);
    let mut data = data;
    while let Some((control, packet)) = next_packet(&mut data) {
        let advance = (1u64 << (control >> 3)) - 1;
        now += Duration::from_secs(advance);
        for _ in 0..16 {
            if client.deadline().is_none_or(|d| d > now) {
                break;
            }
            let outputs = client.on_timeout(now);
            follow(&client, &outputs, &mut xid);
        }
        if control & 4 != 0 {
            client.stop();
            let outputs = client.start(now);
            follow(&client, &outputs, &mut xid);
        }
        let payload = if control & 1 != 0 {
            dhcp::udp_payload(packet)
        } else {
            let _ = dhcp::udp_payload(packet);
            Some(packet)
        };
        let Some(mut message) = payload.and_then(dhcp::decode) else {
            continue;
        };
        if let Some(lease) = Lease::from_ack(&message, now, message.siaddr()) {
            use_lease(&lease);
        }
        if control & 2 != 0 {
            message
                .set_opcode(Opcode::BootReply)
                .set_xid(xid)
                .set_chaddr(&MAC);
        }
        let outputs = client.on_message(&message, now);
        follow(&client, &outputs, &mut xid);
    }
    let outputs = client.release();
    follow(&client, &outputs, &mut xid);
});
