//! Netconf against the real kernel, as root, inside network namespaces that each test
//! creates and removes (a guard deletes them whatever happens). Netconf runs on a thread
//! moved into the test's namespace with setns(2), on a current-thread tokio runtime as
//! stage 2 runs it; the tests check the result with `ip -j` from outside. DHCP is served
//! by Debian's `dnsmasq` in a second namespace at the other end of a veth pair. Nothing
//! here touches the host's own interfaces, and no packet leaves the namespaces.

// Test helpers fail the test on any surprise, as the tests themselves do.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// The harness runs `ip` and dnsmasq to build and check the namespaces: not PID 1's code.
#![allow(clippy::disallowed_methods)]

use std::fs::File;
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keelson_configs::schema::{Interface, Network, Route};
use keelson_configs::values::MacAddr;
use keelson_netconf::{NetConf, NetEvent, Source};
use serde_json::Value;

// ---------------------------------------------------------------------------------------
// Namespaces, `ip`, and netconf on a thread inside a namespace.

/// A network namespace that exists for the life of the value.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        assert!(
            rustix::process::geteuid().is_root(),
            "netconf's namespace tests need root (they create network namespaces)"
        );
        let name = format!(
            "kn-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS`, which must succeed; its standard output.
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip -n NS -j ARGS` parsed.
    fn ip_json(&self, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        let out = self.ip(&all);
        match serde_json::from_str::<Value>(if out.trim().is_empty() { "[]" } else { &out }) {
            Ok(Value::Array(list)) => list,
            other => panic!("ip {all:?} printed {out:?}: {other:?}"),
        }
    }

    /// `addr/prefix` of every address on a link.
    fn addresses(&self, dev: &str) -> Vec<String> {
        self.ip_json(&["addr", "show", "dev", dev])
            .iter()
            .flat_map(|link| link["addr_info"].as_array().cloned().unwrap_or_default())
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or("?"), a["prefixlen"]))
            .collect()
    }

    /// `dst via gateway metric N` of every route out of a link (both families).
    fn routes(&self, dev: &str) -> Vec<String> {
        let mut out = Vec::new();
        for family in ["-4", "-6"] {
            for r in self.ip_json(&[family, "route", "show", "dev", dev]) {
                let mut line = r["dst"].as_str().unwrap_or("?").to_string();
                if let Some(gw) = r["gateway"].as_str() {
                    line.push_str(&format!(" via {gw}"));
                }
                if let Some(metric) = r["metric"].as_u64() {
                    line.push_str(&format!(" metric {metric}"));
                }
                out.push(line);
            }
        }
        out
    }

    /// Write `/proc/sys/KEY` inside the namespace (from a thread moved into it: procfs
    /// shows the opener's namespace).
    fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/run/netns/{}", self.name);
        let (key, value) = (key.to_string(), value.to_string());
        std::thread::spawn(move || {
            enter(&path);
            std::fs::write(format!("/proc/sys/{key}"), value).unwrap();
        })
        .join()
        .unwrap();
    }

    fn link(&self, dev: &str) -> Value {
        self.ip_json(&["link", "show", "dev", dev])
            .into_iter()
            .next()
            .unwrap_or(Value::Null)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes every link in it (veth peers included).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Move the calling thread into the network namespace at `path`.
fn enter(path: &str) {
    let file = File::open(path).unwrap();
    rustix::thread::move_into_link_name_space(
        file.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .unwrap();
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Netconf running inside a namespace: `apply`, then `run` until dropped.
struct Node {
    events: mpsc::Receiver<NetEvent>,
    seen: Vec<NetEvent>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Node {
    fn start(ns: &Netns, network: Network, hostname: Option<&str>) -> Node {
        let (tx, events) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let path = format!("/run/netns/{}", ns.name);
        let hostname = hostname.map(str::to_string);
        let thread = std::thread::spawn(move || {
            enter(&path);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut net = NetConf::new(&network, hostname.as_deref());
                for event in net.apply().await.unwrap() {
                    let _ = tx.send(event);
                }
                let (etx, mut erx) = tokio::sync::mpsc::unbounded_channel();
                let forward = tokio::spawn(async move {
                    while let Some(event) = erx.recv().await {
                        let _ = tx.send(event);
                    }
                });
                net.run_until(etx, async {
                    let _ = stopped.await;
                })
                .await;
                let _ = forward.await;
            });
        });
        Node {
            events,
            seen: Vec::new(),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Wait for an event that `want` accepts (among those not yet consumed); on timeout,
    /// fail with every event seen.
    fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        want: impl Fn(&NetEvent) -> bool,
    ) -> NetEvent {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) => {
                    eprintln!("netconf: {event}");
                    self.seen.push(event.clone());
                    if want(&event) {
                        return event;
                    }
                }
                Err(_) => {
                    let seen: Vec<String> = self.seen.iter().map(|e| e.to_string()).collect();
                    panic!(
                        "timed out after {timeout:?} waiting for {what}; netconf said:\n  {}",
                        seen.join("\n  ")
                    );
                }
            }
        }
    }

    /// Wait for the event whose log line is exactly `line`.
    fn wait_line(&mut self, line: &str, timeout: Duration) {
        self.wait(line, timeout, |e| e.to_string() == line);
    }

    /// Stop netconf (leases are released) and wait for its thread.
    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Poll `check` until it holds, for up to `timeout`.
fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn has(list: &[String], item: &str) -> Result<(), String> {
    if list.iter().any(|x| x == item) {
        Ok(())
    } else {
        Err(format!("{item} not in {list:?}"))
    }
}

// ---------------------------------------------------------------------------------------
// Static configuration.

fn static_network(dev: &str) -> Network {
    Network {
        nameservers: vec!["10.77.0.1".parse().unwrap()],
        interfaces: vec![Interface {
            name: Some(dev.into()),
            addresses: vec![
                "10.77.0.2/24".parse().unwrap(),
                "2001:db8:77::2/64".parse().unwrap(),
            ],
            routes: vec![
                Route {
                    to: "0.0.0.0/0".parse().unwrap(),
                    via: Some("10.77.0.1".parse().unwrap()),
                    metric: None,
                },
                Route {
                    to: "10.78.0.0/16".parse().unwrap(),
                    via: Some("10.77.0.254".parse().unwrap()),
                    metric: Some(50),
                },
            ],
            mtu: Some(1400),
            ..Interface::default()
        }],
    }
}

#[test]
fn static_addresses_routes_and_mtu_are_applied_and_kept_across_link_changes() {
    let ns = Netns::new("static");
    ns.ip(&["link", "add", "st0", "type", "veth", "peer", "name", "st0p"]);
    ns.ip(&[
        "link", "add", "other0", "type", "veth", "peer", "name", "other0p",
    ]);
    ns.ip(&["link", "set", "lo", "down"]);
    ns.ip(&["link", "set", "st0p", "up"]);
    let mut node = Node::start(&ns, static_network("st0"), Some("cp-1"));
    node.wait_line(
        "route default via 10.77.0.1 added on st0 (static)",
        secs(10),
    );
    node.wait_line("link st0 up", secs(10));

    // Loopback, the link's MTU, addresses and routes.
    let lo = ns.link("lo");
    assert!(
        lo["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
        "{lo}"
    );
    has(&ns.addresses("lo"), "127.0.0.1/8").unwrap();
    let st0 = ns.link("st0");
    assert_eq!(st0["mtu"], 1400, "{st0}");
    assert_eq!(st0["operstate"], "UP", "{st0}");
    let addrs = ns.addresses("st0");
    has(&addrs, "10.77.0.2/24").unwrap();
    has(&addrs, "2001:db8:77::2/64").unwrap();
    let routes = ns.routes("st0");
    has(&routes, "default via 10.77.0.1").unwrap();
    has(&routes, "10.78.0.0/16 via 10.77.0.254 metric 50").unwrap();
    // A link the config does not name is left alone.
    let other = ns.link("other0");
    assert!(
        !other["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
        "{other}"
    );
    assert!(ns.addresses("other0").is_empty());

    // Down and up again: the kernel flushes the routes (and the IPv6 address) on down;
    // netconf puts them back on up.
    ns.ip(&["link", "set", "st0", "down"]);
    node.wait_line("link st0 down", secs(10));
    assert!(ns.routes("st0").is_empty(), "{:?}", ns.routes("st0"));
    ns.ip(&["link", "set", "st0", "up"]);
    node.wait_line("link st0 up", secs(10));
    eventually("routes back after down/up", secs(10), || {
        let routes = ns.routes("st0");
        has(&routes, "default via 10.77.0.1")?;
        has(&routes, "10.78.0.0/16 via 10.77.0.254 metric 50")?;
        has(&ns.addresses("st0"), "2001:db8:77::2/64")
    });

    // Carrier loss (the peer goes down) and return.
    ns.ip(&["link", "set", "st0p", "down"]);
    node.wait_line("link st0 down", secs(10));
    ns.ip(&["link", "set", "st0p", "up"]);
    node.wait_line("link st0 up", secs(10));

    // An address removed by hand comes back.
    ns.ip(&["addr", "del", "10.77.0.2/24", "dev", "st0"]);
    node.wait_line("address 10.77.0.2/24 added to st0 (static)", secs(10));
    eventually("address back", secs(10), || {
        has(&ns.addresses("st0"), "10.77.0.2/24")?;
        // Its prefix route and the gateway routes through it come back too.
        has(&ns.routes("st0"), "default via 10.77.0.1")
    });

    // Someone changes the MTU: it is put back.
    ns.ip(&["link", "set", "st0", "mtu", "1300"]);
    node.wait_line("mtu 1400 set on st0", secs(10));
    eventually("mtu restored", secs(5), || {
        match ns.link("st0")["mtu"].as_u64() {
            Some(1400) => Ok(()),
            other => Err(format!("mtu {other:?}")),
        }
    });
}

#[test]
fn an_interface_selected_by_mac_is_configured_when_it_appears() {
    let ns = Netns::new("hotplug");
    let mac = "02:00:00:77:00:05";
    let network = Network {
        nameservers: Vec::new(),
        interfaces: vec![Interface {
            mac: Some(mac.parse::<MacAddr>().unwrap()),
            addresses: vec!["10.77.5.2/24".parse().unwrap()],
            ..Interface::default()
        }],
    };
    let mut node = Node::start(&ns, network, None);
    node.wait_line(
        "interface mac 02:00:00:77:00:05 not present: configured when it appears",
        secs(10),
    );
    // Hotplug: a link with that MAC shows up under some name.
    ns.ip(&[
        "link", "add", "late0", "address", mac, "type", "veth", "peer", "name", "late0p",
    ]);
    ns.ip(&["link", "set", "late0p", "up"]);
    node.wait_line("interface mac 02:00:00:77:00:05 is link late0", secs(10));
    let added = node.wait("the address", secs(10), |e| {
        matches!(e, NetEvent::AddressAdded { .. })
    });
    assert_eq!(
        added,
        NetEvent::AddressAdded {
            iface: "late0".into(),
            cidr: "10.77.5.2/24".parse().unwrap(),
            source: Source::Static,
        }
    );
    node.wait_line("link late0 up", secs(10));
    has(&ns.addresses("late0"), "10.77.5.2/24").unwrap();
    // Unplugged.
    ns.ip(&["link", "del", "late0"]);
    node.wait_line("link late0 removed", secs(10));
}

// ---------------------------------------------------------------------------------------
// DHCP against dnsmasq.

/// dnsmasq serving DHCP in a namespace; killed on drop.
struct Dnsmasq {
    child: Child,
    leases: std::path::PathBuf,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Dnsmasq {
    fn start(ns: &Netns, dev: &str, extra: &[&str]) -> Dnsmasq {
        let dir = tempfile::tempdir().unwrap();
        let leases = dir.path().join("leases");
        let log = dir.path().join("dnsmasq.log");
        let mut args: Vec<String> = [
            "netns",
            "exec",
            &ns.name,
            "dnsmasq",
            "--no-daemon",
            "--conf-file=/dev/null",
            "--port=0",
            "--bind-interfaces",
            "--dhcp-authoritative",
            "--log-dhcp",
            "--log-facility=-",
            "--pid-file=",
            "--user=root",
            "--group=root",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--interface={dev}"));
        args.push(format!("--dhcp-leasefile={}", leases.display()));
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new("ip")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("cannot start dnsmasq (Debian package dnsmasq-base)");
        Dnsmasq {
            child,
            leases,
            log,
            _dir: dir,
        }
    }

    fn leases(&self) -> String {
        std::fs::read_to_string(&self.leases).unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_dhcp_lease_from_dnsmasq_is_applied_renewed_at_t1_and_released() {
    let server = Netns::new("dhcps");
    let client = Netns::new("dhcpc");
    let mac = "02:00:00:99:00:02";
    // The veth pair is created straight into the two namespaces.
    run(
        "ip",
        &[
            "link",
            "add",
            "dh0",
            "address",
            mac,
            "netns",
            &client.name,
            "type",
            "veth",
            "peer",
            "name",
            "dhs0",
            "netns",
            &server.name,
        ],
    );
    server.ip(&["addr", "add", "10.99.0.1/24", "dev", "dhs0"]);
    server.ip(&["link", "set", "dhs0", "up"]);
    // A two-minute lease (dnsmasq's shortest): T1 falls 60 s after the ACK.
    let dnsmasq = Dnsmasq::start(
        &server,
        "dhs0",
        &[
            "--dhcp-range=10.99.0.50,10.99.0.60,255.255.255.0,2m",
            "--dhcp-option=option:router,10.99.0.1",
            "--dhcp-option=option:dns-server,10.99.0.1",
            "--domain=lab.internal",
            &format!("--dhcp-host={mac},node-dhcp"),
        ],
    );
    let network = Network {
        nameservers: Vec::new(),
        interfaces: vec![Interface {
            mac: Some(mac.parse::<MacAddr>().unwrap()),
            dhcp: true,
            ..Interface::default()
        }],
    };
    // A strict reverse-path filter (as a machine config's sysctls may ask) drops the
    // server's replies before any UDP socket sees them while the link has no address;
    // the client must get its lease all the same.
    client.sysctl("net/ipv4/conf/all/rp_filter", "1");
    let mut node = Node::start(&client, network, None);
    let lease = node.wait("a dhcp lease", secs(30), |e| {
        matches!(e, NetEvent::DhcpLease { .. })
    });
    let NetEvent::DhcpLease {
        iface,
        addr,
        server: from,
        router,
        dns,
        lease_secs,
    } = lease
    else {
        unreachable!()
    };
    eprintln!("dnsmasq log:\n{}", dnsmasq.log());
    assert_eq!(iface, "dh0");
    assert_eq!(from.to_string(), "10.99.0.1");
    assert_eq!(router, Some("10.99.0.1".parse().unwrap()));
    assert_eq!(dns, ["10.99.0.1".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(lease_secs, 120);
    let ip = addr.addr().to_string();
    let last: u8 = ip.rsplit('.').next().unwrap().parse().unwrap();
    assert!(
        ip.starts_with("10.99.0.") && (50..=60).contains(&last),
        "{addr}"
    );
    assert_eq!(addr.prefix_len(), 24);

    node.wait_line(
        "route default via 10.99.0.1 metric 1024 added on dh0 (dhcp)",
        secs(10),
    );
    node.wait_line("nameservers 10.99.0.1, search lab.internal", secs(10));
    node.wait_line("hostname node-dhcp from dhcp", secs(10));
    has(&client.addresses("dh0"), &addr.to_string()).unwrap();
    has(&client.routes("dh0"), "default via 10.99.0.1 metric 1024").unwrap();
    assert!(dnsmasq.leases().contains(mac), "{}", dnsmasq.leases());
    // The kernel routes to the server through the leased address.
    let route = client.ip(&["route", "get", "10.99.0.1"]);
    assert!(route.contains(&format!("dev dh0 src {ip}")), "{route}");

    // T1 = 60 s after the ACK: a unicast REQUEST, and dnsmasq's ACK extends the lease.
    let renewed = node.wait("the renewal at T1", secs(80), |e| {
        matches!(e, NetEvent::DhcpRenewed { .. })
    });
    assert_eq!(
        renewed,
        NetEvent::DhcpRenewed {
            iface: "dh0".into(),
            addr,
            lease_secs: 120,
        }
    );
    let log = dnsmasq.log();
    assert!(
        log.lines()
            .any(|l| l.contains("DHCPREQUEST(dhs0)") && l.contains(&ip) && l.contains(mac)),
        "dnsmasq saw no renewal:\n{log}"
    );
    has(&client.addresses("dh0"), &addr.to_string()).unwrap();

    // Shutdown gives the lease back: dnsmasq forgets it, and the address goes.
    node.stop();
    let addrs = client.addresses("dh0");
    assert!(!addrs.contains(&addr.to_string()), "{addrs:?}");
    eventually("the lease released", secs(5), || {
        if dnsmasq.log().contains("DHCPRELEASE(dhs0)") && !dnsmasq.leases().contains(mac) {
            Ok(())
        } else {
            Err(format!("leases: {:?}\n{}", dnsmasq.leases(), dnsmasq.log()))
        }
    });
}
