//! PID 1 (issue 4), end to end under QEMU: a node configures itself from a machine
//! config given through fw_cfg (modules, sysctls, swap off although its disk carries a
//! swap partition, the static address, containerd ready), keeps the config in STATE,
//! stops its services in order and unmounts cleanly on reboot (Ctrl-Alt-Del) and power
//! off (the ACPI power button), so that the next boot mounts clean filesystems; and a
//! config with an error is refused whole while the node keeps waiting.
//!
//! The image is `KEELSON_TEST_IMAGE_AMD64` when set, else the suite's built image.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use keelson_configs::layout::{FW_CFG_CONFIG, PART_EPHEMERAL, PART_STATE};
use keelson_configs::{Mode, check_str};
use keelson_imager::gpt;
use keelson_imager::inspect::read_ext4_file;
use keelson_tests::{Arch, Guest, POWER_BUTTON_WATCHED, Running, test_image, with_fresh_secrets};

/// One boot to "containerd ready" under software emulation, with room to spare.
const BOOT: Duration = Duration::from_secs(420);
const MAC: &str = "52:54:00:4b:45:01";
/// QEMU's user-mode network is 10.0.2.0/24 with its gateway at .2.
const ADDRESS: &str = "10.0.2.15/24";

/// A file the config puts among the CNI plugins, as a pod network's installer would.
const CNI_PLUGIN: &str = "keelson-test-plugin";

/// The control-plane fixture of the config tests, made to fit this VM: one NIC named
/// eth0 with the static address, a route through QEMU's gateway, a file among the CNI
/// plugins, and fresh secrets (so that machined can serve with them).
fn node_config() -> String {
    let fixture = include_str!("../../configs/tests/data/controlplane.toml");
    let network_start = fixture.find("[machine.network]").unwrap();
    let network_end = fixture.find("[machine.kubelet]").unwrap();
    let network = format!(
        "[machine.network]\nnameservers = [\"10.0.2.3\"]\n\n[[machine.network.interfaces]]\n\
         name = \"eth0\"\naddresses = [\"{ADDRESS}\"]\nmtu = 1500\n\n\
         [[machine.network.interfaces.routes]]\nto = \"0.0.0.0/0\"\nvia = \"10.0.2.2\"\n\n"
    );
    let text = format!(
        "{}{network}{}",
        &fixture[..network_start],
        &fixture[network_end..]
    )
    .replace("hostname = \"cp-1\"", "hostname = \"pid1-test\"")
    .replace(
        "node_ip_subnets = [\"10.5.0.0/24\"]",
        "node_ip_subnets = [\"10.0.2.0/24\"]",
    )
    .replace(
        "[[machine.files]]\n",
        &format!(
            "[[machine.files]]\npath = \"/opt/cni/bin/{CNI_PLUGIN}\"\n\
             content = \"#!/bin/false\\n\"\nmode = \"0755\"\n\n[[machine.files]]\n"
        ),
    )
    .replace(
        "advertised_subnets = [\"10.5.0.0/24\"]",
        "advertised_subnets = [\"10.0.2.0/24\"]",
    );
    let text = with_fresh_secrets(&text).unwrap();
    let checked = check_str(&text, "pid1-node.toml", Mode::Metal);
    assert!(checked.is_valid(), "{:#?}", checked.diagnostics);
    text
}

/// Copy a raw image without writing its zero blocks (the copy stays sparse).
fn sparse_copy(from: &Path, to: &Path) {
    let mut src = std::fs::File::open(from).unwrap();
    let mut dst = std::fs::File::create(to).unwrap();
    let len = src.metadata().unwrap().len();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let n = src.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(pos)).unwrap();
            dst.write_all(&buf[..n]).unwrap();
        }
        pos += n as u64;
    }
    dst.set_len(len).unwrap();
}

fn sgdisk(args: &[&str]) {
    let out = Command::new("sgdisk")
        .args(args)
        .output()
        .expect("sgdisk (gdisk) is installed by cargo xtask deps");
    assert!(
        out.status.success(),
        "sgdisk {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn partition(disk: &Path, name: &str) -> gpt::GptPartition {
    let mut f = std::fs::File::open(disk).unwrap();
    gpt::read_gpt(&mut f)
        .unwrap()
        .partition(name)
        .unwrap()
        .clone()
}

/// A copy of the image with a 64 MiB swap partition (GPT type Linux swap, with the
/// signature mkswap writes) after EPHEMERAL.
fn disk_with_swap(dir: &Path) -> PathBuf {
    let disk = dir.join("node.raw");
    sparse_copy(&test_image(Arch::Amd64).unwrap(), &disk);
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.set_len(f.metadata().unwrap().len() + (64 << 20)).unwrap();
    drop(f);
    let path = disk.to_str().unwrap();
    sgdisk(&["-e", path]);
    sgdisk(&["-n", "0:0:0", "-t", "0:8200", "-c", "0:swap", path]);
    let swap = partition(&disk, "swap");
    // Swap header v1: version, last page, no bad pages, then SWAPSPACE2 at the end of
    // the first 4 KiB page.
    let mut header = vec![0u8; 4096];
    header[1024..1028].copy_from_slice(&1u32.to_le_bytes());
    let last_page = (swap.size() / 4096 - 1) as u32;
    header[1028..1032].copy_from_slice(&last_page.to_le_bytes());
    header[1036..1052].copy_from_slice(b"keelson-swaptest");
    header[4086..4096].copy_from_slice(b"SWAPSPACE2");
    let mut f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.seek(SeekFrom::Start(swap.start())).unwrap();
    f.write_all(&header).unwrap();
    disk
}

/// (cleanly unmounted, needs journal recovery) from an ext4 superblock in `partition`.
fn ext4_state(disk: &Path, name: &str) -> (bool, bool) {
    let part = partition(disk, name);
    let mut f = std::fs::File::open(disk).unwrap();
    let mut sb = [0u8; 1024];
    f.seek(SeekFrom::Start(part.start() + 1024)).unwrap();
    f.read_exact(&mut sb).unwrap();
    assert_eq!(
        &sb[0x38..0x3a],
        &[0x53, 0xef],
        "{name} holds no ext4 superblock"
    );
    let state = u16::from_le_bytes([sb[0x3a], sb[0x3b]]);
    let incompat = u32::from_le_bytes([sb[0x60], sb[0x61], sb[0x62], sb[0x63]]);
    (state & 1 == 1, incompat & 0x4 != 0)
}

fn assert_clean(disk: &Path) {
    for name in [PART_STATE, PART_EPHEMERAL] {
        assert_eq!(
            ext4_state(disk, name),
            (true, false),
            "{name} was not unmounted cleanly (valid flag, needs_recovery)"
        );
    }
}

fn wait_all(vm: &mut Running, needles: &[&str]) {
    for needle in needles {
        vm.wait_for(needle, BOOT).unwrap();
    }
}

/// Lines of the console that contain `needle`, in order.
fn lines_with(console: &str, needle: &str) -> Vec<String> {
    console
        .lines()
        .filter(|l| l.contains(needle))
        .map(|l| l.trim_end().to_string())
        .collect()
}

/// The index of the first console line containing `needle` (for order checks).
fn position(console: &str, needle: &str) -> usize {
    console
        .lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("the console never showed {needle:?}"))
}

/// The stop sequence every shutdown must show, in this order; STATE and EPHEMERAL are
/// unmounted in the reverse of the order they were mounted in (a first boot mounts STATE
/// last: it is formatted once containerd is spawned).
fn assert_ordered_stop(console: &str, requested: &str, end: &str) {
    let mut disks = ["/var", "/system/state"];
    disks.sort_by_key(|target| {
        std::cmp::Reverse(position(console, &format!("mounted at {target}")))
    });
    let unmounted = disks.map(|target| format!("keelson-init: unmounted {target}"));
    let steps = [
        requested,
        "keelson-init: service containerd stopping (SIGTERM)",
        "keelson-init: service containerd stopped",
        "keelson-init: services stopped; stopping every other process",
        &unmounted[0],
        &unmounted[1],
        end,
    ];
    let at: Vec<usize> = steps.iter().map(|s| position(console, s)).collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "the shutdown is out of order: {:?}",
        steps.iter().zip(&at).collect::<Vec<_>>()
    );
    // machined depends on nothing (it is only started after containerd), so it stops
    // alongside containerd, but before the sweep of every other process.
    let machined = position(console, "keelson-init: service machined stopped");
    assert!(
        at[0] < machined && machined < at[3],
        "machined stopped at line {machined}, outside the services' stop: {:?}",
        steps.iter().zip(&at).collect::<Vec<_>>()
    );
    let stuck: Vec<String> = ["/var busy", "/system/state busy", "still mounted"]
        .iter()
        .flat_map(|n| lines_with(console, n))
        .collect();
    assert!(stuck.is_empty(), "a disk stayed mounted: {stuck:#?}");
}

#[test]
fn a_node_configures_itself_from_fw_cfg_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_with_swap(dir.path());
    let config = dir.path().join("node.toml");
    let config_text = node_config();
    std::fs::write(&config, &config_text).unwrap();

    // First boot: the config comes from fw_cfg.
    let mut vm = Guest::new(Arch::Amd64)
        .image(&disk)
        .raw_disk()
        .nic(MAC)
        .fw_cfg(FW_CFG_CONFIG, &config)
        .boot()
        .unwrap();
    wait_all(
        &mut vm,
        &[
            "KEELSON STAGE2 READY",
            "keelson-init: config from fw_cfg opt/keelson/config is valid",
            "keelson-init: config from fw_cfg opt/keelson/config written to STATE",
            "keelson-init: module br_netfilter loaded",
            "keelson-init: module overlay loaded",
            "keelson-init: module ip_vs loaded",
            "keelson-init: sysctl net.bridge.bridge-nf-call-iptables=1 applied",
            "keelson-init: sysctl net.bridge.bridge-nf-call-ip6tables=1 applied",
            "keelson-init: sysctl net.ipv4.ip_forward=1 applied",
            "keelson-init: sysctl vm.overcommit_memory=1 applied",
            "keelson-init: sysctl kernel.panic=10 applied",
            "keelson-init: swap: none active",
            "keelson-init: hostname pid1-test",
            &format!("keelson-init: address {ADDRESS} added to eth0 (static)"),
            "keelson-init: CNI plugins: /opt/cni/bin holds the image's (/usr/lib/cni) and takes more",
            &format!("keelson-init: file /opt/cni/bin/{CNI_PLUGIN} written (755)"),
            "keelson-init: service containerd started",
            "keelson-init: service containerd ready",
            "keelson-init: service machined ready",
            "keelson-init: preflight swap: pass",
            "keelson-init: boot complete:",
            "keelson-init: idle pid1 rss_kb=",
        ],
    );
    let console = vm.console();
    // PID 1 registers the kubelet but never starts it itself: machined does, once its
    // images and binary are in place, which this node reaches neither of.
    assert!(
        lines_with(&console, "keelson-init: service kubelet started").is_empty(),
        "PID 1 started the kubelet on its own"
    );
    assert!(lines_with(&console, "refused").is_empty());
    let restarts = lines_with(&console, "service machined restarts in");
    assert!(restarts.is_empty(), "machined failed: {restarts:#?}");
    for line in lines_with(&console, "idle pid1 rss_kb=") {
        eprintln!("pid1: {line}");
    }
    eprintln!(
        "pid1: containerd ready after {:.1}s ({})",
        vm.elapsed().as_secs_f64(),
        vm.accel().name()
    );

    // Ctrl-Alt-Del: the kernel tells PID 1 (SIGINT), which reboots in order.
    vm.monitor("sendkey ctrl-alt-delete").unwrap();
    vm.wait_exit(Duration::from_secs(180)).unwrap();
    let console = vm.console();
    assert_ordered_stop(
        &console,
        "keelson-init: reboot requested (SIGINT)",
        "keelson-init: reboot: now",
    );
    drop(vm);
    assert_clean(&disk);
    assert_eq!(
        String::from_utf8(read_ext4_file(&disk, PART_STATE, "/config.toml").unwrap()).unwrap(),
        config_text
    );

    // Second boot: no fw_cfg; the config comes from STATE, the filesystems are clean.
    let mut vm = Guest::new(Arch::Amd64)
        .image(&disk)
        .raw_disk()
        .nic(MAC)
        .boot()
        .unwrap();
    wait_all(
        &mut vm,
        &[
            "keelson-init: config from STATE (/system/state/config.toml) is valid",
            "keelson-init: service containerd ready",
            "keelson-init: service machined ready",
        ],
    );
    let console = vm.console();
    let ext4 = lines_with(&console, "keelson-init: kernel: EXT4-fs (");
    assert!(
        ext4.iter()
            .filter(|l| l.contains("mounted filesystem"))
            .count()
            >= 2,
        "{ext4:#?}"
    );
    assert!(
        ext4.iter()
            .all(|l| !l.contains("recovery") && !l.contains("errors")),
        "{ext4:#?}"
    );
    assert!(lines_with(&console, "written to STATE").is_empty());

    // The power button: a clean power off (a press before the button is watched is lost).
    vm.wait_for(POWER_BUTTON_WATCHED, BOOT).unwrap();
    vm.monitor("system_powerdown").unwrap();
    vm.wait_exit(Duration::from_secs(180)).unwrap();
    let console = vm.console();
    assert_ordered_stop(
        &console,
        "keelson-init: power off requested (power button",
        "keelson-init: power off: now",
    );
    drop(vm);
    assert_clean(&disk);
    // The config's file went to EPHEMERAL (/var), and so did the one among the CNI
    // plugins, in the overlay's upper layer.
    assert_eq!(
        read_ext4_file(&disk, PART_EPHEMERAL, "/etc/motd").unwrap(),
        b"hello\n"
    );
    assert_eq!(
        read_ext4_file(
            &disk,
            PART_EPHEMERAL,
            &format!("/lib/keelson/cni-bin/upper/{CNI_PLUGIN}")
        )
        .unwrap(),
        b"#!/bin/false\n"
    );
}

#[test]
fn a_config_with_errors_is_refused_and_the_node_keeps_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broken.toml");
    let broken = node_config().replace("mtu = 1500", "mtu = 99999");
    std::fs::write(&config, broken).unwrap();
    let mut vm = Guest::new(Arch::Amd64)
        .image(test_image(Arch::Amd64).unwrap())
        .nic(MAC)
        .fw_cfg(FW_CFG_CONFIG, &config)
        .boot()
        .unwrap();
    wait_all(
        &mut vm,
        &[
            "keelson-init: config from fw_cfg opt/keelson/config refused: 1 error; nothing of it is applied",
            "keelson-init: config error: fw_cfg opt/keelson/config:",
            "keelson-init: waiting for a machine config; give one by any of:",
            "keelson-init:   QEMU fw_cfg: -fw_cfg name=opt/keelson/config,file=node.toml",
        ],
    );
    // Thirty seconds later it looks again, refuses again, and still waits.
    let deadline = std::time::Instant::now() + BOOT;
    while lines_with(&vm.console(), "waiting for a machine config").len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no second reminder:\n{}",
            vm.console()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let console = vm.console();
    let errors = lines_with(&console, "config error:");
    assert!(
        errors[0].contains("machine.network.interfaces[0].mtu"),
        "{errors:#?}"
    );
    for never in [
        "applying the config",
        "module br_netfilter loaded",
        "sysctl net.ipv4.ip_forward",
        "service containerd",
        "written to STATE",
    ] {
        assert!(
            lines_with(&console, never).is_empty(),
            "a refused config was applied in part: {never:?}\n{console}"
        );
    }
    // A node without a config still powers off cleanly.
    vm.wait_for(POWER_BUTTON_WATCHED, BOOT).unwrap();
    vm.monitor("system_powerdown").unwrap();
    vm.wait_exit(Duration::from_secs(120)).unwrap();
    assert!(vm.console().contains("keelson-init: power off: now"));
}

#[test]
fn a_nocloud_drive_gives_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("user-data");
    std::fs::write(&config, node_config()).unwrap();
    // A NoCloud drive: a FAT filesystem labelled CIDATA holding `user-data`.
    let drive = dir.path().join("cidata.img");
    std::fs::File::create(&drive)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    for (program, args) in [
        ("mkfs.vfat", vec!["-n", "CIDATA", drive.to_str().unwrap()]),
        (
            "mcopy",
            vec![
                "-i",
                drive.to_str().unwrap(),
                config.to_str().unwrap(),
                "::user-data",
            ],
        ),
    ] {
        let out = Command::new(program)
            .args(&args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e} (cargo xtask deps installs it)"));
        assert!(out.status.success(), "{program}: {out:?}");
    }
    let mut vm = Guest::new(Arch::Amd64)
        .image(test_image(Arch::Amd64).unwrap())
        .qemu_args([
            "-drive".to_string(),
            format!(
                "if=none,id=cidata,format=raw,readonly=on,file={}",
                drive.display()
            ),
            "-device".to_string(),
            "virtio-blk-pci,drive=cidata".to_string(),
        ])
        .boot()
        .unwrap();
    // Stage 1 probes the virtio disks asynchronously, so the drive may be vda or vdb:
    // the line is matched on the label and the device is checked after.
    wait_all(
        &mut vm,
        &[
            "(CIDATA) is valid",
            "(CIDATA) written to STATE",
            "keelson-init: module br_netfilter loaded",
        ],
    );
    let console = vm.console();
    let drive = lines_with(&console, "(CIDATA) is valid");
    assert!(
        drive.iter().all(|l| {
            ["/dev/vda", "/dev/vdb"].iter().any(|dev| {
                l.ends_with(&format!(
                    "keelson-init: config from config drive {dev} (CIDATA) is valid"
                ))
            })
        }),
        "the config drive line names no virtio disk: {drive:?}"
    );
    assert!(lines_with(&console, "waiting for a machine config").is_empty());
}

/// Serve `body` over HTTP on a loopback port until the returned flag is set; each
/// request path is recorded. QEMU's `guestfwd` connects the guest to it.
fn http_server(body: String) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        // Bounded: a handful of fetches is all a boot makes.
        for conn in listener.incoming().take(16) {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 2048];
            let n = conn.read(&mut buf).unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]).into_owned();
            log.lock()
                .unwrap()
                .push(request.lines().next().unwrap_or_default().to_string());
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (port, seen)
}

/// A copy of the suite's image in `dir` whose boot entry's command line also carries
/// `options` (edited on the ESP with mtools).
fn image_with_options(dir: &Path, options: &str) -> PathBuf {
    let disk = dir.join("node.raw");
    sparse_copy(&test_image(Arch::Amd64).unwrap(), &disk);
    let esp = format!(
        "{}@@{}",
        disk.display(),
        partition(&disk, keelson_configs::layout::PART_EFI).start()
    );
    let listing = Command::new("mdir")
        .args(["-b", "-i", &esp, "::loader/entries"])
        .output()
        .expect("mdir (mtools) is installed by cargo xtask deps");
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    let entry = listing
        .lines()
        .find(|l| l.ends_with(".conf"))
        .unwrap_or_else(|| panic!("no boot entry in {listing:?}"))
        .trim_start_matches("::/")
        .trim_start_matches("::")
        .to_string();
    let local = dir.join("entry.conf");
    let out = Command::new("mcopy")
        .args(["-n", "-i", &esp, &format!("::{entry}")])
        .arg(&local)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text: String = std::fs::read_to_string(&local)
        .unwrap()
        .lines()
        .map(|l| {
            if l.starts_with("options") {
                format!("{l} {options}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert!(text.contains(options), "{text}");
    std::fs::write(&local, text).unwrap();
    let out = Command::new("mcopy")
        .args(["-o", "-i", &esp])
        .arg(&local)
        .arg(format!("::{entry}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    disk
}

/// Boots `disk` (raw, written in place) on QEMU's restricted user network, where the
/// guest's connections to 10.0.2.100:`guest_port` reach 127.0.0.1:`host_port` (the
/// config server of a URL test).
fn boot_fetching_from(disk: &Path, guest_port: u16, host_port: u16) -> Running {
    Guest::new(Arch::Amd64)
        .image(disk)
        .raw_disk()
        .qemu_args([
            "-netdev".to_string(),
            format!(
                "user,id=net0,restrict=on,guestfwd=tcp:10.0.2.100:{guest_port}-tcp:127.0.0.1:{host_port}"
            ),
            "-device".to_string(),
            format!("virtio-net-pci,netdev=net0,mac={MAC}"),
        ])
        .boot()
        .unwrap()
}

#[test]
fn a_url_on_the_kernel_command_line_gives_the_config() {
    let dir = tempfile::tempdir().unwrap();
    // Add keelson.config= to the slot's boot entry on the ESP.
    let url = "http://10.0.2.100/node.toml";
    let disk = image_with_options(dir.path(), &format!("keelson.config={url}"));

    let (port, seen) = http_server(node_config());
    let mut vm = boot_fetching_from(&disk, 80, port);
    wait_all(
        &mut vm,
        &[
            "keelson-init:   (this boot's keelson.config=http://10.0.2.100/node.toml gave no valid config yet)",
            "keelson-init: config from URL http://10.0.2.100/node.toml is valid",
            "keelson-init: config from URL http://10.0.2.100/node.toml written to STATE",
            "keelson-init: module br_netfilter loaded",
        ],
    );
    assert_eq!(
        seen.lock().unwrap().first().map(String::as_str),
        Some("GET /node.toml HTTP/1.1")
    );
}

/// Runs `openssl` with `args` in `dir`; panics with its output if it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (Debian package openssl)");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// Kills the `openssl s_server` when the test ends.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `keelson.config=https://…` with the server's CA named inline by `keelson.config.ca=`:
/// PID 1 fetches the config over TLS from a real `openssl s_server` (certificates made
/// by openssl, the server's for the address the guest reaches), checks it against that
/// CA alone, and boots with it.
#[test]
fn an_https_url_with_its_ca_on_the_command_line_gives_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=keelson test CA",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=10.0.2.100",
        ],
    );
    std::fs::write(
        d.join("server.ext"),
        "subjectAltName=IP:10.0.2.100\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    openssl(
        d,
        &["x509", "-in", "ca.pem", "-outform", "der", "-out", "ca.der"],
    );
    // As the README says to: `openssl x509 -outform der | base64 -w0`.
    let out = Command::new("base64")
        .args(["-w0", "ca.der"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let ca = String::from_utf8(out.stdout).unwrap();
    let www = d.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("node.toml"), node_config()).unwrap();
    let port = keelson_tests::free_loopback_port().unwrap();
    let _server = Server(
        Command::new("openssl")
            .current_dir(&www)
            .args(["s_server", "-WWW", "-quiet", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(d.join("server.pem"))
            .arg("-key")
            .arg(d.join("server.key"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = "https://10.0.2.100/node.toml";
    let disk = image_with_options(d, &format!("keelson.config={url} keelson.config.ca={ca}"));
    let mut vm = boot_fetching_from(&disk, 443, port);
    wait_all(
        &mut vm,
        &[
            &format!("keelson-init: config from URL {url} is valid"),
            &format!("keelson-init: config from URL {url} written to STATE"),
            "keelson-init: module br_netfilter loaded",
        ],
    );
}
