//! The DHCPv4 client (RFC 2131): messages built and read with `dhcproto`, and the
//! client's state machine as a pure value that turns (message | timeout | carrier) and the
//! current time into packets to send and lease changes. It does no I/O and reads no
//! clock, so every transition and every timer is unit-tested with made-up instants.
//!
//! ```text
//!  start ─► SELECTING ──OFFER──► REQUESTING ──ACK──► BOUND ──T1──► RENEWING ──T2──► REBINDING
//!   (lease    │  ▲ DISCOVER        │ NAK/4 tries       ▲ │          │ unicast        │ broadcast
//!    kept)    │  └─────────────────┘                   │ │          │ REQUEST        │ REQUEST
//!   REBOOTING ┴─ACK────────────────────────────────────┘ └◄──ACK────┴────────────────┘
//!                                  NAK anywhere, or expiry: lease lost, back to SELECTING
//! ```
//!
//! Requests carry the broadcast flag while the client has no address, so the server's
//! answers reach a plain UDP socket on port 68 before the leased address is configured.
//! A carrier loss stops the exchanges but keeps the lease (its address stays on the link
//! until it expires); a carrier that comes back verifies it with a REQUEST (REBOOTING).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use dhcproto::v4::{
    CLIENT_PORT, DhcpOption, Flags, Message, MessageType, Opcode, OptionCode, SERVER_PORT,
};
use dhcproto::{Decodable, Decoder, Encodable};
use ipnet::{IpNet, Ipv4Net};

use super::addrs;
use super::routes::{DHCP_METRIC, RouteSpec};

mod sift;

/// The lease-time value meaning "forever".
pub const INFINITE: u32 = u32::MAX;

/// BOOTP's minimum message size; shorter requests are padded (some servers drop them).
const MIN_MESSAGE: usize = 300;

/// In RENEWING and REBINDING, retransmit after half the time left, but not sooner than
/// this (RFC 2131 4.4.5).
pub const RENEW_RETRY_MIN: Duration = Duration::from_secs(60);

/// REQUEST retransmissions before SELECTING starts over.
const REQUEST_TRIES: u32 = 4;

/// REQUESTs sent to verify a kept lease after the carrier came back.
const REBOOT_TRIES: u32 = 2;

/// What the client asks the server for.
const WANTED: &[OptionCode] = &[
    OptionCode::SubnetMask,
    OptionCode::Router,
    OptionCode::DomainNameServer,
    OptionCode::Hostname,
    OptionCode::DomainName,
    OptionCode::InterfaceMtu,
    OptionCode::BroadcastAddr,
    OptionCode::AddressLeaseTime,
    OptionCode::ServerIdentifier,
    OptionCode::Renewal,
    OptionCode::Rebinding,
    OptionCode::DomainSearch,
    OptionCode::ClasslessStaticRoute,
];

/// A lease: what the server granted and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The leased address.
    pub addr: Ipv4Addr,
    /// Its prefix length (subnet mask).
    pub prefix: u8,
    /// The server that granted it (where renewals go).
    pub server: Ipv4Addr,
    /// Routers, in the server's order (option 3).
    pub routers: Vec<Ipv4Addr>,
    /// Classless static routes (option 121); when present they replace the routers.
    pub classless_routes: Vec<(Ipv4Net, Ipv4Addr)>,
    /// DNS servers (option 6).
    pub dns: Vec<Ipv4Addr>,
    /// Domain name (option 15).
    pub domain: Option<String>,
    /// Domain search list (option 119).
    pub search: Vec<String>,
    /// Host name the server gives us (option 12).
    pub hostname: Option<String>,
    /// Interface MTU (option 26).
    pub mtu: Option<u16>,
    /// Lease duration in seconds ([`INFINITE`] for ever).
    pub lease_secs: u32,
    /// Renewal time T1, seconds after `acquired`.
    pub t1_secs: u32,
    /// Rebinding time T2, seconds after `acquired`.
    pub t2_secs: u32,
    /// When the ACK arrived.
    pub acquired: Instant,
}

impl Lease {
    /// The address with its prefix (`10.99.0.51/24`).
    pub fn cidr(&self) -> IpNet {
        addrs::with_prefix(self.addr.into(), self.prefix)
            .unwrap_or(IpNet::V4(Ipv4Net::new_assert(self.addr, 32)))
    }

    /// The routes the lease asks for: its classless routes if any (RFC 3442 says the
    /// router option is then ignored), otherwise a default route via the first router.
    pub fn routes(&self) -> Vec<RouteSpec> {
        if !self.classless_routes.is_empty() {
            return self
                .classless_routes
                .iter()
                .map(|(net, gw)| {
                    let via = (!gw.is_unspecified()).then_some((*gw).into());
                    RouteSpec::new(IpNet::V4(*net), via, Some(DHCP_METRIC))
                })
                .collect();
        }
        self.routers
            .first()
            .map(|router| {
                let default = IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0));
                vec![RouteSpec::new(
                    default,
                    Some((*router).into()),
                    Some(DHCP_METRIC),
                )]
            })
            .unwrap_or_default()
    }

    fn at(&self, secs: u32) -> Option<Instant> {
        (self.lease_secs != INFINITE)
            .then(|| self.acquired.checked_add(Duration::from_secs(secs.into())))
            .flatten()
    }

    /// When to start renewing; `None` for an infinite lease.
    pub fn t1(&self) -> Option<Instant> {
        self.at(self.t1_secs)
    }

    /// When to start rebinding; `None` for an infinite lease.
    pub fn t2(&self) -> Option<Instant> {
        self.at(self.t2_secs)
    }

    /// When the lease ends; `None` for an infinite lease.
    pub fn expires(&self) -> Option<Instant> {
        self.at(self.lease_secs)
    }

    fn expired(&self, now: Instant) -> bool {
        self.expires().is_some_and(|e| now >= e)
    }

    /// Read a lease from an ACK. `None` when the ACK carries no usable address.
    pub fn from_ack(ack: &Message, now: Instant, server: Ipv4Addr) -> Option<Lease> {
        let addr = ack.yiaddr();
        if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
            return None;
        }
        let mut lease = Lease {
            addr,
            prefix: addrs::classful_prefix(addr),
            server,
            routers: Vec::new(),
            classless_routes: Vec::new(),
            dns: Vec::new(),
            domain: None,
            search: Vec::new(),
            hostname: None,
            mtu: None,
            lease_secs: 3600,
            t1_secs: 0,
            t2_secs: 0,
            acquired: now,
        };
        let (mut t1, mut t2) = (None, None);
        for (_, option) in ack.opts().iter() {
            match option {
                DhcpOption::SubnetMask(mask) => {
                    if let Some(prefix) = addrs::prefix_of_mask(*mask) {
                        lease.prefix = prefix;
                    }
                }
                DhcpOption::ServerIdentifier(id) => lease.server = *id,
                DhcpOption::Router(list) => lease.routers.clone_from(list),
                DhcpOption::ClasslessStaticRoute(list) => lease.classless_routes.clone_from(list),
                DhcpOption::DomainNameServer(list) => lease.dns.clone_from(list),
                DhcpOption::DomainName(name) => lease.domain = clean_name(name),
                DhcpOption::DomainSearch(names) => {
                    lease.search = names
                        .iter()
                        .filter_map(|n| clean_name(&n.to_string()))
                        .collect();
                }
                DhcpOption::Hostname(name) => lease.hostname = clean_name(name),
                DhcpOption::InterfaceMtu(mtu) if *mtu >= 576 => lease.mtu = Some(*mtu),
                DhcpOption::AddressLeaseTime(secs) => lease.lease_secs = *secs,
                DhcpOption::Renewal(secs) => t1 = Some(*secs),
                DhcpOption::Rebinding(secs) => t2 = Some(*secs),
                _ => {}
            }
        }
        (lease.t1_secs, lease.t2_secs) = timers(lease.lease_secs, t1, t2);
        Some(lease)
    }
}

/// A DNS name from the server without its trailing dot; `None` when empty.
fn clean_name(name: &str) -> Option<String> {
    let name = name.trim().trim_end_matches('.');
    (!name.is_empty() && name.chars().all(|c| c.is_ascii_graphic())).then(|| name.to_string())
}

/// T1 and T2 for a lease: the server's values when they are consistent
/// (T1 < T2 < lease), otherwise RFC 2131's defaults of 1/2 and 7/8 of the lease.
pub fn timers(lease: u32, t1: Option<u32>, t2: Option<u32>) -> (u32, u32) {
    if lease == INFINITE {
        return (INFINITE, INFINITE);
    }
    let default_t2 = (u64::from(lease) * 7 / 8) as u32;
    let t2 = t2.filter(|&t| t < lease).unwrap_or(default_t2);
    let t1 = t1.filter(|&t| t < t2).unwrap_or((lease / 2).min(t2));
    (t1, t2)
}

/// Where the client is in RFC 2131's state diagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No carrier (or not started): nothing is sent; a kept lease still expires.
    Stopped,
    /// DISCOVER sent, waiting for an OFFER.
    Selecting,
    /// REQUEST sent for an offer, waiting for the ACK.
    Requesting {
        /// The offered address.
        offered: Ipv4Addr,
        /// The server that offered it.
        server: Ipv4Addr,
    },
    /// Holding a lease, nothing to do until T1.
    Bound,
    /// Past T1: unicast REQUESTs to the server that granted the lease.
    Renewing,
    /// Past T2: broadcast REQUESTs to any server.
    Rebinding,
    /// The carrier came back: broadcast REQUEST to confirm the lease we hold.
    Rebooting,
}

/// Why a lease was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReason {
    /// Its time ran out without a renewal.
    Expired,
    /// The server said no (DHCPNAK).
    Nak,
    /// Netconf gave it back (shutdown).
    Released,
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LostReason::Expired => "expired",
            LostReason::Nak => "refused by the server (NAK)",
            LostReason::Released => "released",
        })
    }
}

/// What the client asks its owner to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send this message from port 68 on the link to `to`.
    Send {
        /// The message.
        message: Box<Message>,
        /// `255.255.255.255:67` or the server's unicast address.
        to: SocketAddrV4,
    },
    /// A new lease (first one, or one for another address): apply it.
    Bound(Lease),
    /// The lease we hold was extended (same address); options may have changed.
    Renewed(Lease),
    /// The lease is gone: remove what it added.
    Lost {
        /// The lease given up.
        lease: Lease,
        /// Why.
        reason: LostReason,
    },
}

/// One link's DHCPv4 client.
#[derive(Debug, Clone)]
pub struct Client {
    mac: [u8; 6],
    hostname: Option<String>,
    state: State,
    xid: u32,
    rng: u64,
    attempt: u32,
    deadline: Option<Instant>,
    exchange_started: Option<Instant>,
    lease: Option<Lease>,
}

impl Client {
    /// A stopped client for the link with this MAC; `hostname` (from the config) is
    /// sent to the server; `seed` varies transaction ids and retransmission jitter.
    pub fn new(mac: [u8; 6], hostname: Option<String>, seed: u64) -> Client {
        let mut client = Client {
            mac,
            hostname,
            state: State::Stopped,
            xid: 0,
            rng: seed ^ u64::from_le_bytes([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0]),
            attempt: 0,
            deadline: None,
            exchange_started: None,
            lease: None,
        };
        client.new_xid();
        client
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The lease held, if any.
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// When [`Client::on_timeout`] wants to be called next.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The carrier is up: begin (DISCOVER), or confirm the lease kept across a carrier
    /// loss (REQUEST). Does nothing if already running.
    pub fn start(&mut self, now: Instant) -> Vec<Output> {
        if self.state != State::Stopped {
            return Vec::new();
        }
        let mut out = Vec::new();
        if let Some(lease) = self.lease.take_if(|l| l.expired(now)) {
            out.push(Output::Lost {
                lease,
                reason: LostReason::Expired,
            });
        }
        if self.lease.is_some() {
            self.state = State::Rebooting;
            self.begin_exchange(now);
            self.deadline = Some(now + self.backoff());
            out.push(self.send_request(now));
        } else {
            out.extend(self.discover(now));
        }
        out
    }

    /// The carrier is gone: stop sending. The lease is kept until it expires.
    pub fn stop(&mut self) {
        self.state = State::Stopped;
        self.attempt = 0;
        self.deadline = self.lease.as_ref().and_then(Lease::expires);
    }

    /// Give the lease back (shutdown, or a new config): a RELEASE to the server when the
    /// link can reach it, then the lease is dropped (its address and routes go) and the
    /// client stops.
    pub fn release(&mut self) -> Vec<Output> {
        let Some(lease) = self.lease.take() else {
            self.stop();
            return Vec::new();
        };
        let running = !matches!(self.state, State::Stopped);
        self.stop();
        let mut out = Vec::new();
        if running {
            let mut msg = self.base(MessageType::Release, 0);
            msg.set_ciaddr(lease.addr);
            msg.set_flags(Flags::default());
            msg.opts_mut().remove(OptionCode::ParameterRequestList);
            msg.opts_mut()
                .insert(DhcpOption::ServerIdentifier(lease.server));
            out.push(Output::Send {
                message: Box::new(msg),
                to: SocketAddrV4::new(lease.server, SERVER_PORT),
            });
        }
        out.push(Output::Lost {
            lease,
            reason: LostReason::Released,
        });
        out
    }

    /// The deadline passed: retransmit, move on to RENEWING/REBINDING, or give the lease up.
    pub fn on_timeout(&mut self, now: Instant) -> Vec<Output> {
        if self.deadline.is_none_or(|d| now < d) {
            return Vec::new();
        }
        match self.state {
            State::Stopped => {
                self.deadline = None;
                match self.lease.take_if(|l| l.expired(now)) {
                    Some(lease) => vec![Output::Lost {
                        lease,
                        reason: LostReason::Expired,
                    }],
                    None => {
                        self.deadline = self.lease.as_ref().and_then(Lease::expires);
                        Vec::new()
                    }
                }
            }
            State::Selecting => {
                self.attempt += 1;
                self.deadline = Some(now + self.backoff());
                vec![self.send_discover(now)]
            }
            State::Requesting { .. } => {
                self.attempt += 1;
                if self.attempt >= REQUEST_TRIES {
                    return self.discover(now);
                }
                self.deadline = Some(now + self.backoff());
                vec![self.send_request(now)]
            }
            State::Rebooting => {
                self.attempt += 1;
                if self.attempt >= REBOOT_TRIES {
                    // No answer: carry on with the lease as its timers say (RFC 2131 3.2).
                    return self.follow_lease(now);
                }
                self.deadline = Some(now + self.backoff());
                vec![self.send_request(now)]
            }
            State::Bound | State::Renewing | State::Rebinding => self.follow_lease(now),
        }
    }

    /// A message arrived on port 68 of the link.
    pub fn on_message(&mut self, msg: &Message, now: Instant) -> Vec<Output> {
        if msg.opcode() != Opcode::BootReply
            || msg.xid() != self.xid
            || msg.chaddr().get(..6) != Some(&self.mac[..])
        {
            return Vec::new();
        }
        let server = match msg.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(id)) => *id,
            _ => msg.siaddr(),
        };
        match (msg.opts().msg_type(), self.state) {
            (Some(MessageType::Offer), State::Selecting) => {
                let offered = msg.yiaddr();
                if offered.is_unspecified() || server.is_unspecified() {
                    return Vec::new();
                }
                self.state = State::Requesting { offered, server };
                self.attempt = 0;
                self.deadline = Some(now + self.backoff());
                vec![self.send_request(now)]
            }
            (
                Some(MessageType::Ack),
                State::Requesting { .. } | State::Renewing | State::Rebinding | State::Rebooting,
            ) => {
                let fallback = match (self.state, &self.lease) {
                    (State::Requesting { server, .. }, _) => server,
                    (_, Some(lease)) => lease.server,
                    _ => server,
                };
                let Some(mut lease) = Lease::from_ack(msg, now, fallback) else {
                    return Vec::new();
                };
                if server.is_unspecified() {
                    lease.server = fallback;
                }
                self.state = State::Bound;
                self.attempt = 0;
                self.exchange_started = None;
                self.deadline = lease.t1();
                let same = self
                    .lease
                    .as_ref()
                    .is_some_and(|old| old.addr == lease.addr && old.prefix == lease.prefix);
                self.lease = Some(lease.clone());
                self.new_xid();
                vec![if same {
                    Output::Renewed(lease)
                } else {
                    Output::Bound(lease)
                }]
            }
            (
                Some(MessageType::Nak),
                State::Requesting { .. } | State::Renewing | State::Rebinding | State::Rebooting,
            ) => {
                let mut out = Vec::new();
                if let Some(lease) = self.lease.take() {
                    out.push(Output::Lost {
                        lease,
                        reason: LostReason::Nak,
                    });
                }
                out.extend(self.discover(now));
                out
            }
            _ => Vec::new(),
        }
    }

    /// Bound, renewing or rebinding as the lease's timers say at `now`; a REQUEST when
    /// one is due; the lease lost and a new DISCOVER when it expired.
    fn follow_lease(&mut self, now: Instant) -> Vec<Output> {
        let Some(lease) = &self.lease else {
            return self.discover(now);
        };
        let (t1, t2, expires) = (lease.t1(), lease.t2(), lease.expires());
        let (Some(t1), Some(t2), Some(expires)) = (t1, t2, expires) else {
            // Infinite: nothing to renew, ever.
            self.state = State::Bound;
            self.deadline = None;
            return Vec::new();
        };
        if now < t1 {
            self.state = State::Bound;
            self.deadline = Some(t1);
            return Vec::new();
        }
        if now >= expires {
            let mut out = Vec::new();
            if let Some(lease) = self.lease.take() {
                out.push(Output::Lost {
                    lease,
                    reason: LostReason::Expired,
                });
            }
            out.extend(self.discover(now));
            return out;
        }
        let (state, boundary) = if now < t2 {
            (State::Renewing, t2)
        } else {
            (State::Rebinding, expires)
        };
        if self.state != state {
            self.state = state;
            self.begin_exchange(now);
        }
        self.deadline = Some(renew_retry(now, boundary));
        vec![self.send_request(now)]
    }

    /// Start over in SELECTING with a new transaction id. A lease still held is asked
    /// for again (requested-address option in the DISCOVER).
    fn discover(&mut self, now: Instant) -> Vec<Output> {
        self.state = State::Selecting;
        self.new_xid();
        self.begin_exchange(now);
        self.deadline = Some(now + self.backoff());
        vec![self.send_discover(now)]
    }

    fn begin_exchange(&mut self, now: Instant) {
        self.attempt = 0;
        self.exchange_started = Some(now);
    }

    fn send_discover(&self, now: Instant) -> Output {
        let mut msg = self.base(MessageType::Discover, self.secs(now));
        if let Some(lease) = &self.lease {
            msg.opts_mut()
                .insert(DhcpOption::RequestedIpAddress(lease.addr));
        }
        broadcast(msg)
    }

    /// The REQUEST of the current state: selecting an offer, verifying (REBOOTING),
    /// renewing (unicast, ciaddr set) or rebinding (broadcast, ciaddr set).
    fn send_request(&self, now: Instant) -> Output {
        let mut msg = self.base(MessageType::Request, self.secs(now));
        match (self.state, &self.lease) {
            (State::Requesting { offered, server }, _) => {
                msg.opts_mut()
                    .insert(DhcpOption::RequestedIpAddress(offered));
                msg.opts_mut().insert(DhcpOption::ServerIdentifier(server));
                broadcast(msg)
            }
            (State::Rebooting, Some(lease)) => {
                msg.opts_mut()
                    .insert(DhcpOption::RequestedIpAddress(lease.addr));
                broadcast(msg)
            }
            (State::Renewing, Some(lease)) => {
                msg.set_ciaddr(lease.addr);
                msg.set_flags(Flags::default());
                Output::Send {
                    message: Box::new(msg),
                    to: SocketAddrV4::new(lease.server, SERVER_PORT),
                }
            }
            (_, Some(lease)) => {
                msg.set_ciaddr(lease.addr);
                msg.set_flags(Flags::default());
                broadcast(msg)
            }
            (_, None) => broadcast(msg),
        }
    }

    /// A request of this type with our identity and wishes.
    fn base(&self, kind: MessageType, secs: u16) -> Message {
        let mut msg = blank();
        msg.set_opcode(Opcode::BootRequest)
            .set_xid(self.xid)
            .set_secs(secs)
            .set_chaddr(&self.mac)
            .set_flags(Flags::default().set_broadcast());
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        let mut id = vec![1u8];
        id.extend_from_slice(&self.mac);
        opts.insert(DhcpOption::ClientIdentifier(id));
        opts.insert(DhcpOption::MaxMessageSize(1500));
        opts.insert(DhcpOption::ParameterRequestList(WANTED.to_vec()));
        if let Some(name) = &self.hostname {
            opts.insert(DhcpOption::Hostname(name.clone()));
        }
        msg
    }

    fn secs(&self, now: Instant) -> u16 {
        self.exchange_started
            .map(|s| {
                now.saturating_duration_since(s)
                    .as_secs()
                    .min(u16::MAX.into()) as u16
            })
            .unwrap_or(0)
    }

    /// RFC 2131 4.1: 4 s, doubling up to 64 s, each randomised by up to ±1 s.
    fn backoff(&mut self) -> Duration {
        let base = 4u64 << self.attempt.min(4);
        let jitter = (self.next_random() % 2001) as i64 - 1000;
        Duration::from_millis((base as i64 * 1000 + jitter).max(1000) as u64)
    }

    fn new_xid(&mut self) {
        self.xid = (self.next_random() >> 32) as u32;
    }

    /// splitmix64: transaction ids and jitter need variety, not secrecy.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// RENEWING/REBINDING retransmission: half the time left to `boundary`, at least
/// [`RENEW_RETRY_MIN`], never past the boundary (where the next state takes over).
pub fn renew_retry(now: Instant, boundary: Instant) -> Instant {
    let left = boundary.saturating_duration_since(now);
    let wait = (left / 2).max(RENEW_RETRY_MIN).min(left);
    now + wait
}

fn broadcast(msg: Message) -> Output {
    Output::Send {
        message: Box::new(msg),
        to: SocketAddrV4::new(Ipv4Addr::BROADCAST, SERVER_PORT),
    }
}

/// An empty BOOTREQUEST. Built by decoding a template: `Message::default()` draws a
/// random xid from a thread RNG that panics if the kernel cannot give it entropy, and
/// PID 1 must not panic.
fn blank() -> Message {
    let mut template = [0u8; 241];
    template[0] = 1; // BOOTREQUEST
    template[1] = 1; // Ethernet
    template[2] = 6;
    template[236..240].copy_from_slice(&dhcproto::v4::MAGIC);
    template[240] = 255; // end of options
    // The template is well-formed (a unit test decodes it), so the default is never used.
    Message::decode(&mut Decoder::new(&template)).unwrap_or_default()
}

/// A message as it goes on the wire, padded to the BOOTP minimum.
pub fn encode(msg: &Message) -> Result<Vec<u8>, dhcproto::error::EncodeError> {
    let mut bytes = msg.to_vec()?;
    if bytes.len() < MIN_MESSAGE {
        bytes.resize(MIN_MESSAGE, 0);
    }
    Ok(bytes)
}

/// A message from the wire, with only the options the client reads ([`sift`]); `None`
/// for anything that is not DHCP.
pub fn decode(bytes: &[u8]) -> Option<Message> {
    let sifted = sift::options_read(bytes)?;
    Message::decode(&mut Decoder::new(&sifted)).ok()
}

/// The client's UDP port.
pub const PORT: u16 = CLIENT_PORT;

/// The UDP payload of an IPv4 packet to the client port (as a packet socket on the link
/// hands it over, IP header first); `None` for anything else, and for fragments. The
/// UDP checksum is not checked: with checksum offload it is often not filled in yet.
pub fn udp_payload(packet: &[u8]) -> Option<&[u8]> {
    let first = *packet.first()?;
    let header = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || header < 20 || *packet.get(9)? != 17 {
        return None;
    }
    let flags = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]);
    if flags & 0x3fff != 0 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]])).min(packet.len());
    let udp = packet.get(header..total)?;
    let port = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
    let length = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
    if port != CLIENT_PORT || length < 8 {
        return None;
    }
    udp.get(8..length.min(udp.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// A server reply to the client's last message.
    fn reply(client: &Client, kind: MessageType, yiaddr: Ipv4Addr, lease: u32) -> Message {
        let mut msg = blank();
        msg.set_opcode(Opcode::BootReply)
            .set_xid(client.xid)
            .set_chaddr(&MAC)
            .set_yiaddr(yiaddr);
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(SERVER));
        if kind != MessageType::Nak {
            opts.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
            opts.insert(DhcpOption::Router(vec![SERVER]));
            opts.insert(DhcpOption::DomainNameServer(vec![SERVER]));
            opts.insert(DhcpOption::AddressLeaseTime(lease));
        }
        msg
    }

    /// The one message sent, its type, its destination.
    fn sent(out: &[Output]) -> (MessageType, Message, SocketAddrV4) {
        let sends: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Send { message, to } => Some((message.as_ref().clone(), *to)),
                _ => None,
            })
            .collect();
        assert_eq!(sends.len(), 1, "{out:?}");
        let (msg, to) = sends[0].clone();
        (msg.opts().msg_type().unwrap(), msg, to)
    }

    fn bcast() -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::BROADCAST, 67)
    }

    /// A client bound to 10.99.0.51/24 with a lease of `lease` seconds, at `t0`.
    fn bound(t0: Instant, lease: u32) -> Client {
        let mut c = Client::new(MAC, Some("node-1".into()), 7);
        let (kind, discover, to) = sent(&c.start(t0));
        assert_eq!((kind, to), (MessageType::Discover, bcast()));
        assert!(discover.flags().broadcast());
        let offer = reply(&c, MessageType::Offer, Ipv4Addr::new(10, 99, 0, 51), lease);
        let (kind, request, to) = sent(&c.on_message(&offer, t0));
        assert_eq!((kind, to), (MessageType::Request, bcast()));
        assert_eq!(
            request.opts().get(OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress(Ipv4Addr::new(
                10, 99, 0, 51
            )))
        );
        assert_eq!(
            request.opts().get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(SERVER))
        );
        assert_eq!(
            request.opts().get(OptionCode::Hostname),
            Some(&DhcpOption::Hostname("node-1".into()))
        );
        let ack = reply(&c, MessageType::Ack, Ipv4Addr::new(10, 99, 0, 51), lease);
        let out = c.on_message(&ack, t0);
        assert!(matches!(&out[..], [Output::Bound(l)] if l.addr == Ipv4Addr::new(10, 99, 0, 51)));
        assert_eq!(c.state(), State::Bound);
        c
    }

    #[test]
    fn discover_offer_request_ack() {
        let t0 = Instant::now();
        let c = bound(t0, 120);
        let lease = c.lease().unwrap();
        assert_eq!(lease.cidr().to_string(), "10.99.0.51/24");
        assert_eq!(lease.server, SERVER);
        assert_eq!((lease.t1_secs, lease.t2_secs), (60, 105));
        // The renewal is scheduled at T1.
        assert_eq!(c.deadline(), Some(t0 + secs(60)));
        assert_eq!(
            lease
                .routes()
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>(),
            ["default via 10.99.0.1 metric 1024"]
        );
    }

    #[test]
    fn replies_for_someone_else_are_ignored() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, None, 1);
        c.start(t0);
        let mut other_xid = reply(&c, MessageType::Offer, Ipv4Addr::new(10, 99, 0, 51), 120);
        other_xid.set_xid(c.xid.wrapping_add(1));
        assert!(c.on_message(&other_xid, t0).is_empty());
        let mut other_mac = reply(&c, MessageType::Offer, Ipv4Addr::new(10, 99, 0, 51), 120);
        other_mac.set_chaddr(&[2, 0, 0, 0, 0, 1]);
        assert!(c.on_message(&other_mac, t0).is_empty());
        // An ACK while selecting is not ours to take either.
        let ack = reply(&c, MessageType::Ack, Ipv4Addr::new(10, 99, 0, 51), 120);
        assert!(c.on_message(&ack, t0).is_empty());
        assert_eq!(c.state(), State::Selecting);
    }

    #[test]
    fn discover_is_retransmitted_with_backoff_forever() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, None, 3);
        c.start(t0);
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..8 {
            let deadline = c.deadline().unwrap();
            // Nothing before the deadline.
            assert!(c.on_timeout(deadline - Duration::from_millis(1)).is_empty());
            waits.push((deadline - now).as_secs_f64());
            now = deadline;
            let (kind, _, _) = sent(&c.on_timeout(now));
            assert_eq!(kind, MessageType::Discover);
        }
        // 4, 8, 16, 32, 64, 64... each within ±1 s.
        for (wait, base) in waits
            .iter()
            .zip([4.0, 8.0, 16.0, 32.0, 64.0, 64.0, 64.0, 64.0])
        {
            assert!((wait - base).abs() <= 1.0, "{waits:?}");
        }
    }

    #[test]
    fn an_unanswered_request_starts_over() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, None, 3);
        c.start(t0);
        let offer = reply(&c, MessageType::Offer, Ipv4Addr::new(10, 99, 0, 51), 120);
        c.on_message(&offer, t0);
        let xid = c.xid;
        let mut kinds = Vec::new();
        for _ in 0..REQUEST_TRIES {
            let now = c.deadline().unwrap();
            kinds.push(sent(&c.on_timeout(now)).0);
        }
        assert_eq!(
            kinds,
            [
                MessageType::Request,
                MessageType::Request,
                MessageType::Request,
                MessageType::Discover
            ]
        );
        assert_eq!(c.state(), State::Selecting);
        assert_ne!(c.xid, xid, "a new transaction");
    }

    #[test]
    fn renew_at_t1_unicast_then_rebind_at_t2_then_expire() {
        let t0 = Instant::now();
        let mut c = bound(t0, 1000);
        // T1 = 500 s: unicast REQUEST to the server, ciaddr set, no broadcast flag.
        let (kind, msg, to) = sent(&c.on_timeout(t0 + secs(500)));
        assert_eq!(
            (kind, to),
            (MessageType::Request, SocketAddrV4::new(SERVER, 67))
        );
        assert_eq!(msg.ciaddr(), Ipv4Addr::new(10, 99, 0, 51));
        assert!(!msg.flags().broadcast());
        assert!(msg.opts().get(OptionCode::RequestedIpAddress).is_none());
        assert_eq!(c.state(), State::Renewing);
        // Retry after half the time to T2 (875 s): 187.5 s.
        assert_eq!(
            c.deadline(),
            Some(t0 + secs(500) + Duration::from_millis(187_500))
        );
        let (_, _, to) = sent(&c.on_timeout(c.deadline().unwrap()));
        assert_eq!(to, SocketAddrV4::new(SERVER, 67));
        // Then half of the 187.5 s left: 93.75 s.
        let next = c.deadline().unwrap();
        assert_eq!(next, t0 + secs(875) - Duration::from_millis(93_750));
        sent(&c.on_timeout(next));
        // 93.75 s left: wait 60 s; then 33.75 s left: wait until T2 exactly.
        let next = c.deadline().unwrap();
        assert_eq!(next, t0 + secs(875) - Duration::from_millis(33_750));
        sent(&c.on_timeout(next));
        assert_eq!(c.deadline(), Some(t0 + secs(875)));
        // T2: broadcast REQUEST with ciaddr (REBINDING).
        let (kind, msg, to) = sent(&c.on_timeout(t0 + secs(875)));
        assert_eq!((kind, to), (MessageType::Request, bcast()));
        assert_eq!(msg.ciaddr(), Ipv4Addr::new(10, 99, 0, 51));
        assert_eq!(c.state(), State::Rebinding);
        assert_eq!(
            c.deadline(),
            Some(t0 + secs(875) + Duration::from_millis(62_500))
        );
        // Expiry: the lease is lost and discovery starts over, asking for the old address.
        let out = c.on_timeout(t0 + secs(1000));
        assert!(matches!(
            &out[0],
            Output::Lost { reason: LostReason::Expired, lease } if lease.addr == Ipv4Addr::new(10, 99, 0, 51)
        ));
        let (kind, _, _) = sent(&out);
        assert_eq!(kind, MessageType::Discover);
        assert!(c.lease().is_none());
        assert_eq!(c.state(), State::Selecting);
    }

    #[test]
    fn an_ack_while_renewing_extends_the_lease() {
        let t0 = Instant::now();
        let mut c = bound(t0, 120);
        let t1 = t0 + secs(60);
        sent(&c.on_timeout(t1));
        let ack = reply(&c, MessageType::Ack, Ipv4Addr::new(10, 99, 0, 51), 120);
        let out = c.on_message(&ack, t1);
        assert!(
            matches!(&out[..], [Output::Renewed(l)] if l.lease_secs == 120 && l.acquired == t1)
        );
        assert_eq!(c.state(), State::Bound);
        assert_eq!(c.deadline(), Some(t1 + secs(60)));
    }

    #[test]
    fn an_ack_for_another_address_is_a_new_lease() {
        let t0 = Instant::now();
        let mut c = bound(t0, 120);
        let t2 = t0 + secs(105);
        sent(&c.on_timeout(t0 + secs(60)));
        sent(&c.on_timeout(t2));
        assert_eq!(c.state(), State::Rebinding);
        let ack = reply(&c, MessageType::Ack, Ipv4Addr::new(10, 99, 0, 57), 120);
        let out = c.on_message(&ack, t2);
        assert!(matches!(&out[..], [Output::Bound(l)] if l.addr == Ipv4Addr::new(10, 99, 0, 57)));
    }

    #[test]
    fn a_nak_drops_the_lease_and_starts_over() {
        let t0 = Instant::now();
        let mut c = bound(t0, 120);
        sent(&c.on_timeout(t0 + secs(60)));
        let nak = reply(&c, MessageType::Nak, Ipv4Addr::UNSPECIFIED, 0);
        let out = c.on_message(&nak, t0 + secs(61));
        assert!(matches!(
            &out[0],
            Output::Lost {
                reason: LostReason::Nak,
                ..
            }
        ));
        assert_eq!(sent(&out).0, MessageType::Discover);
        assert!(c.lease().is_none());
    }

    #[test]
    fn carrier_loss_keeps_the_lease_and_carrier_back_verifies_it() {
        let t0 = Instant::now();
        let mut c = bound(t0, 120);
        c.stop();
        assert_eq!(c.state(), State::Stopped);
        // Only the expiry is still watched.
        assert_eq!(c.deadline(), Some(t0 + secs(120)));
        assert!(c.on_timeout(t0 + secs(60)).is_empty());
        // Back after 30 s: REQUEST for the same address, broadcast, no ciaddr.
        let (kind, msg, to) = sent(&c.start(t0 + secs(30)));
        assert_eq!((kind, to), (MessageType::Request, bcast()));
        assert_eq!(msg.ciaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(
            msg.opts().get(OptionCode::RequestedIpAddress),
            Some(&DhcpOption::RequestedIpAddress(Ipv4Addr::new(
                10, 99, 0, 51
            )))
        );
        assert_eq!(c.state(), State::Rebooting);
        let ack = reply(&c, MessageType::Ack, Ipv4Addr::new(10, 99, 0, 51), 120);
        assert!(matches!(
            &c.on_message(&ack, t0 + secs(31))[..],
            [Output::Renewed(_)]
        ));
    }

    #[test]
    fn an_unconfirmed_lease_is_used_until_its_timers_say_otherwise() {
        let t0 = Instant::now();
        let mut c = bound(t0, 1000);
        c.stop();
        c.start(t0 + secs(10));
        let mut now = t0 + secs(10);
        // Rebooting retransmits, then falls back to the lease's own timers: bound until T1.
        for _ in 0..REBOOT_TRIES {
            now = c.deadline().unwrap();
            c.on_timeout(now);
        }
        assert_eq!(c.state(), State::Bound);
        assert_eq!(c.deadline(), Some(t0 + secs(500)));
        assert!(now < t0 + secs(500));
    }

    #[test]
    fn a_lease_expiring_without_carrier_is_lost() {
        let t0 = Instant::now();
        let mut c = bound(t0, 120);
        c.stop();
        let out = c.on_timeout(t0 + secs(120));
        assert!(matches!(
            &out[..],
            [Output::Lost {
                reason: LostReason::Expired,
                ..
            }]
        ));
        assert_eq!(c.deadline(), None);
        // When the carrier returns: a plain DISCOVER.
        assert_eq!(sent(&c.start(t0 + secs(500))).0, MessageType::Discover);
    }

    #[test]
    fn release_on_shutdown() {
        let t0 = Instant::now();
        let mut c = bound(t0, 120);
        let out = c.release();
        let (kind, message, to) = sent(&out);
        assert_eq!(kind, MessageType::Release);
        assert_eq!(message.ciaddr(), Ipv4Addr::new(10, 99, 0, 51));
        assert_eq!(to, SocketAddrV4::new(SERVER, 67));
        assert!(matches!(
            &out[1],
            Output::Lost {
                reason: LostReason::Released,
                ..
            }
        ));
        assert_eq!(c.state(), State::Stopped);
        assert_eq!(c.deadline(), None);
        assert!(c.release().is_empty());
        // Without a carrier nothing can be sent, but the lease is dropped all the same.
        let mut c = bound(t0, 120);
        c.stop();
        assert!(matches!(
            &c.release()[..],
            [Output::Lost {
                reason: LostReason::Released,
                ..
            }]
        ));
    }

    #[test]
    fn infinite_leases_are_never_renewed() {
        let t0 = Instant::now();
        let c = bound(t0, INFINITE);
        assert_eq!(c.deadline(), None);
        assert_eq!(c.lease().unwrap().expires(), None);
    }

    #[test]
    fn timer_math() {
        // Defaults: 1/2 and 7/8.
        assert_eq!(timers(3600, None, None), (1800, 3150));
        assert_eq!(timers(120, None, None), (60, 105));
        // The server's own values.
        assert_eq!(timers(3600, Some(600), Some(1200)), (600, 1200));
        // Inconsistent values fall back: T2 >= lease, T1 >= T2.
        assert_eq!(timers(3600, Some(600), Some(4000)), (600, 3150));
        assert_eq!(timers(3600, Some(3200), None), (1800, 3150));
        assert_eq!(timers(100, Some(90), Some(80)), (50, 80));
        assert_eq!(timers(INFINITE, Some(1), Some(2)), (INFINITE, INFINITE));
        assert_eq!(timers(0, None, None), (0, 0));
        let t0 = Instant::now();
        // Renew retry: half the time left, at least 60 s, never past the boundary.
        assert_eq!(renew_retry(t0, t0 + secs(1000)), t0 + secs(500));
        assert_eq!(renew_retry(t0, t0 + secs(100)), t0 + secs(60));
        assert_eq!(renew_retry(t0, t0 + secs(45)), t0 + secs(45));
    }

    #[test]
    fn leases_read_every_option() {
        let t0 = Instant::now();
        let mut ack = blank();
        ack.set_opcode(Opcode::BootReply)
            .set_yiaddr(Ipv4Addr::new(192, 168, 7, 9));
        let opts = ack.opts_mut();
        opts.insert(DhcpOption::MessageType(MessageType::Ack));
        opts.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 240, 0)));
        opts.insert(DhcpOption::Router(vec![
            Ipv4Addr::new(192, 168, 0, 1),
            Ipv4Addr::new(192, 168, 0, 2),
        ]));
        opts.insert(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
            192, 168, 0, 53,
        )]));
        opts.insert(DhcpOption::DomainName("example.internal.".into()));
        opts.insert(DhcpOption::Hostname("worker-3".into()));
        opts.insert(DhcpOption::InterfaceMtu(9000));
        opts.insert(DhcpOption::AddressLeaseTime(7200));
        opts.insert(DhcpOption::Renewal(1000));
        let lease = Lease::from_ack(&ack, t0, SERVER).unwrap();
        assert_eq!(lease.cidr().to_string(), "192.168.7.9/20");
        assert_eq!(lease.server, SERVER, "no server id: the fallback");
        assert_eq!(lease.domain.as_deref(), Some("example.internal"));
        assert_eq!(lease.hostname.as_deref(), Some("worker-3"));
        assert_eq!(lease.mtu, Some(9000));
        assert_eq!((lease.t1_secs, lease.t2_secs), (1000, 6300));
        assert_eq!(
            lease
                .routes()
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>(),
            ["default via 192.168.0.1 metric 1024"]
        );
        // Classless routes replace the router option.
        ack.opts_mut().insert(DhcpOption::ClasslessStaticRoute(vec![
            ("10.0.0.0/8".parse().unwrap(), Ipv4Addr::new(192, 168, 0, 9)),
            ("192.168.100.0/24".parse().unwrap(), Ipv4Addr::UNSPECIFIED),
        ]));
        let lease = Lease::from_ack(&ack, t0, SERVER).unwrap();
        assert_eq!(
            lease
                .routes()
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>(),
            [
                "10.0.0.0/8 via 192.168.0.9 metric 1024",
                "192.168.100.0/24 metric 1024"
            ]
        );
        // No address: no lease.
        ack.set_yiaddr(Ipv4Addr::UNSPECIFIED);
        assert!(Lease::from_ack(&ack, t0, SERVER).is_none());
    }

    #[test]
    fn messages_round_trip_and_are_padded() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, None, 9);
        let (_, discover, _) = sent(&c.start(t0));
        let bytes = encode(&discover).unwrap();
        assert!(bytes.len() >= MIN_MESSAGE);
        assert_eq!(bytes[0], 1, "BOOTREQUEST");
        assert_eq!(&bytes[28..34], &MAC);
        assert_eq!(decode(&bytes).unwrap().xid(), discover.xid());
        assert!(decode(b"hello").is_none());
        // The client identifier is type 1 (Ethernet) + MAC.
        assert_eq!(
            discover.opts().get(OptionCode::ClientIdentifier),
            Some(&DhcpOption::ClientIdentifier(vec![
                1, 0x52, 0x54, 0, 0x12, 0x34, 0x56
            ]))
        );
    }

    #[test]
    fn options_whose_decoders_assert_on_their_length_are_never_decoded() {
        // Found by the fuzz target dhcp_packet: a bulk lease query time (153) of length
        // 0 panicked in dhcproto's decoder (a debug assertion), and so did Rapid Commit
        // (80) with a value, a short Client FQDN (81) and Client Network Interface (94).
        let mut bytes = blank().to_vec().unwrap();
        bytes.truncate(240);
        bytes[0] = 2; // BOOTREPLY
        bytes.extend_from_slice(&[53, 1, 5, 153, 0, 80, 1, 1, 81, 0, 94, 0, 51, 4, 0, 0, 2, 88]);
        bytes.push(255);
        let msg = decode(&bytes).unwrap();
        assert_eq!(msg.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(
            msg.opts().get(OptionCode::AddressLeaseTime),
            Some(&DhcpOption::AddressLeaseTime(600))
        );
        assert!(msg.opts().get(OptionCode::RapidCommit).is_none());
    }

    /// An IPv4/UDP packet around `payload`.
    fn ip_udp(dst_port: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
        let udp_len = 8 + payload.len() as u16;
        let total = 20 + udp_len;
        let mut p = vec![0x45, 0];
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0, 1]);
        p.extend_from_slice(&flags.to_be_bytes());
        p.extend_from_slice(&[64, 17, 0, 0, 10, 99, 0, 1, 255, 255, 255, 255]);
        p.extend_from_slice(&67u16.to_be_bytes());
        p.extend_from_slice(&dst_port.to_be_bytes());
        p.extend_from_slice(&udp_len.to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn payloads_come_out_of_ip_packets() {
        let payload = b"dhcp!";
        assert_eq!(
            udp_payload(&ip_udp(68, 0x4000, payload)),
            Some(&payload[..])
        );
        // Ethernet padding after the IP packet is not payload.
        let mut padded = ip_udp(68, 0, payload);
        padded.extend_from_slice(&[0; 20]);
        assert_eq!(udp_payload(&padded), Some(&payload[..]));
        // Not for the client port, a fragment, not UDP, truncated, not IPv4.
        assert_eq!(udp_payload(&ip_udp(67, 0, payload)), None);
        assert_eq!(udp_payload(&ip_udp(68, 0x2000, payload)), None);
        assert_eq!(udp_payload(&ip_udp(68, 0x0001, payload)), None);
        let mut tcp = ip_udp(68, 0, payload);
        tcp[9] = 6;
        assert_eq!(udp_payload(&tcp), None);
        assert_eq!(udp_payload(&ip_udp(68, 0, payload)[..24]), None);
        let mut v6 = ip_udp(68, 0, payload);
        v6[0] = 0x65;
        assert_eq!(udp_payload(&v6), None);
        assert_eq!(udp_payload(&[]), None);
    }

    #[test]
    fn transaction_ids_differ_between_clients_and_exchanges() {
        let a = Client::new(MAC, None, 1);
        let b = Client::new(MAC, None, 2);
        assert_ne!(a.xid, b.xid);
        let mut c = Client::new(MAC, None, 1);
        let first = c.xid;
        c.new_xid();
        assert_ne!(first, c.xid);
    }
}
