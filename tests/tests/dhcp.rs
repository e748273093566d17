//! DHCP end to end (issue 4): a node whose machine config asks DHCP for its NIC gets its
//! address, default route, nameserver and host name from a real DHCP server, Debian's
//! `dnsmasq`, serving a bridge inside a network namespace that the test creates. QEMU
//! runs inside that namespace with a tap device on the bridge, so every packet of the
//! guest stays there; a guard deletes the namespace (bridge, tap and all) at the end.
//!
//! The node's hardware clock runs three hours behind, and its time server is Debian's
//! `chronyd` on the same bridge: machined steps the clock to it.
//!
//! The image is `KEELSON_TEST_IMAGE_AMD64` when set, else the suite's built image.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keelson_configs::layout::FW_CFG_CONFIG;
use keelson_configs::{Mode, check_str};
use keelson_tests::ntp::Chrony;
use keelson_tests::{Arch, Guest, test_image, with_fresh_secrets};

/// Boot to the network under software emulation, with room to spare.
const BOOT: Duration = Duration::from_secs(420);
const MAC: &str = "52:54:00:4b:45:d1";
const SERVER: &str = "10.5.98.1";

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

/// A network namespace with a bridge (`br0`, the server's address) and a tap device on
/// it (`tap0`) for QEMU; deleted, with everything in it, on drop.
struct Lan {
    name: String,
}

impl Lan {
    fn new() -> Lan {
        // Root is needed (`ip netns add` says so otherwise).
        let name = format!("kd-dhcp-{}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let lan = Lan { name };
        for args in [
            &["link", "set", "lo", "up"][..],
            &["link", "add", "br0", "type", "bridge"],
            &["addr", "add", &format!("{SERVER}/24"), "dev", "br0"],
            &["link", "set", "br0", "up"],
            &["tuntap", "add", "dev", "tap0", "mode", "tap"],
            &["link", "set", "tap0", "master", "br0"],
            &["link", "set", "tap0", "up"],
        ] {
            lan.ip(args);
        }
        lan
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// dnsmasq serving DHCP (no DNS) on the bridge; killed on drop.
struct Dnsmasq {
    child: Child,
    leases: PathBuf,
    log: PathBuf,
}

impl Dnsmasq {
    fn start(lan: &Lan, dir: &Path) -> Dnsmasq {
        let leases = dir.join("dnsmasq.leases");
        let log = dir.join("dnsmasq.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &lan.name, "dnsmasq"])
            .args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--port=0",
                "--interface=br0",
                "--bind-interfaces",
                "--dhcp-authoritative",
                "--log-dhcp",
                "--log-facility=-",
                "--pid-file=",
                "--user=root",
                "--group=root",
                "--dhcp-range=10.5.98.50,10.5.98.60,255.255.255.0,12h",
                &format!("--dhcp-option=option:router,{SERVER}"),
                &format!("--dhcp-option=option:dns-server,{SERVER}"),
                "--domain=lab.internal",
                &format!("--dhcp-host={MAC},node-dhcp"),
                &format!("--dhcp-leasefile={}", leases.display()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect(
                "cannot start dnsmasq (Debian package dnsmasq-base, installed by cargo xtask deps)",
            );
        Dnsmasq { child, leases, log }
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

/// The control-plane fixture of the config tests with one NIC, selected by MAC, asking
/// DHCP for everything, no host name of its own, and fresh secrets.
fn dhcp_config() -> String {
    let fixture = include_str!("../../configs/tests/data/controlplane.toml");
    let network_start = fixture.find("[machine.network]").unwrap();
    let network_end = fixture.find("[machine.kubelet]").unwrap();
    let network = format!(
        "[machine.network]\n\n[[machine.network.interfaces]]\nmac = \"{MAC}\"\ndhcp = true\n\n"
    );
    let text = format!(
        "{}{network}{}",
        &fixture[..network_start],
        &fixture[network_end..]
    )
    .replace("hostname = \"cp-1\"\n", "")
    .replace(
        "node_ip_subnets = [\"10.5.0.0/24\"]",
        "node_ip_subnets = [\"10.5.98.0/24\"]",
    )
    .replace(
        "advertised_subnets = [\"10.5.0.0/24\"]",
        "advertised_subnets = [\"10.5.98.0/24\"]",
    )
    .replace(
        "time_servers = [\"192.0.2.123\", \"time.example.com\"]",
        &format!("time_servers = [\"{SERVER}\"]"),
    );
    let text = with_fresh_secrets(&text).unwrap();
    let checked = check_str(&text, "dhcp-node.toml", Mode::Metal);
    assert!(checked.is_valid(), "{:#?}", checked.diagnostics);
    text
}

#[test]
fn a_node_configured_for_dhcp_gets_its_address_from_dnsmasq() {
    let dir = tempfile::tempdir().unwrap();
    let lan = Lan::new();
    let dnsmasq = Dnsmasq::start(&lan, dir.path());
    let _chrony = Chrony::start(&lan.name, SERVER).unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(&config, dhcp_config()).unwrap();
    // The node's hardware clock is three hours behind: time sync must step it.
    let skewed = time::OffsetDateTime::now_utc() - time::Duration::hours(3);
    let rtc = format!(
        "base={:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        skewed.year(),
        u8::from(skewed.month()),
        skewed.day(),
        skewed.hour(),
        skewed.minute(),
        skewed.second()
    );

    let mut vm = Guest::new(Arch::Amd64)
        .image(test_image(Arch::Amd64).unwrap())
        .netns(&lan.name)
        .qemu_args([
            "-netdev".to_string(),
            "tap,id=n0,ifname=tap0,script=no,downscript=no".to_string(),
            "-device".to_string(),
            format!("virtio-net-pci,netdev=n0,mac={MAC}"),
            "-rtc".to_string(),
            rtc,
        ])
        .fw_cfg(FW_CFG_CONFIG, &config)
        .boot()
        .unwrap();
    let lease_line = "keelson-init: dhcp lease 10.5.98.";
    if let Err(e) = vm.wait_for(lease_line, BOOT) {
        // The tail above is mostly services; the boot's own lines say what the network did.
        let console = vm.console();
        let boot: Vec<&str> = console
            .lines()
            .filter(|l| l.starts_with("keelson-init: ") && !l.contains("preflight"))
            .collect();
        panic!(
            "{e}\n--- boot log ---\n{}\n--- dnsmasq ---\n{}",
            boot.join("\n"),
            dnsmasq.log()
        );
    }
    let console = vm.console();
    let line = console
        .lines()
        .find(|l| l.contains(lease_line))
        .unwrap()
        .trim_end()
        .to_string();
    // keelson-init: dhcp lease 10.5.98.5x/24 on eth0 from 10.5.98.1 for 43200 s, router
    // 10.5.98.1, dns 10.5.98.1
    let rest = &line[line.find("dhcp lease ").unwrap() + "dhcp lease ".len()..];
    let cidr = rest.split_whitespace().next().unwrap().to_string();
    assert_eq!(
        rest.strip_prefix(cidr.as_str()),
        Some(" on eth0 from 10.5.98.1 for 43200 s, router 10.5.98.1, dns 10.5.98.1"),
        "{line}"
    );
    let ip = cidr.strip_suffix("/24").expect(&line);
    let host: u8 = ip.rsplit('.').next().unwrap().parse().unwrap();
    assert!((50..=60).contains(&host), "{line}");

    for needle in [
        format!("keelson-init: address {cidr} added to eth0 (dhcp)"),
        "keelson-init: route default via 10.5.98.1 metric 1024 added on eth0 (dhcp)".to_string(),
        "keelson-init: nameservers 10.5.98.1, search lab.internal".to_string(),
        "keelson-init: hostname node-dhcp from dhcp".to_string(),
    ] {
        vm.wait_for(&needle, Duration::from_secs(60)).unwrap();
    }

    // The server agrees: its lease for the guest's MAC is that address.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dnsmasq
        .leases()
        .lines()
        .any(|l| l.contains(MAC) && l.contains(&format!(" {ip} ")))
    {
        assert!(
            Instant::now() < deadline,
            "dnsmasq has no lease of {ip} for {MAC}: {:?}\n{}",
            dnsmasq.leases(),
            dnsmasq.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = dnsmasq.log();
    assert!(
        log.contains(&format!("DHCPACK(br0) {ip} {MAC} node-dhcp")),
        "{log}"
    );
    // Time sync: the node steps its clock to chronyd's on the gateway, three hours on.
    vm.wait_for("stepped the clock", Duration::from_secs(120))
        .unwrap();
    let console = vm.console();
    let stepped = console
        .lines()
        .find(|l| l.contains("stepped the clock"))
        .unwrap()
        .to_owned();
    assert!(
        stepped.contains(&format!("server=\"{SERVER}\"")),
        "{stepped}"
    );
    let offset: f64 = stepped
        .split("offset_seconds=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {stepped:?}"));
    assert!(
        (offset - 10_800.0).abs() < 120.0,
        "stepped by {offset} s: {stepped}"
    );

    eprintln!(
        "dhcp: {line} after {:.1}s ({})",
        vm.elapsed().as_secs_f64(),
        vm.accel().name()
    );
}
