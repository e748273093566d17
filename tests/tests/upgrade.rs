//! Upgrades by A/B image swap (issue 18), end to end under QEMU: a node built at v1 (the
//! suite's image) takes signed bundles through `machinectl upgrade`, writes the inactive
//! slot, reboots through firmware and systemd-boot, and PID 1 blesses the new slot once
//! the node is healthy. v1 to v2 is fetched by the node from a URL (an HTTP server on
//! this host) and staged, then switched by a plain reboot; the others are streamed by
//! machinectl and reboot at once. Faulty v3s (PID 1 exits, stage 1 hangs, the kernel panics, the
//! node never becomes healthy) come back to v2 by the loader's boot counting, and the
//! node remembers and refuses them. Bad bundles are refused before any write, checked by
//! reading the inactive slot out of the VM's disk before and after. Power is cut at points
//! spread over the whole upgrade, and every time the node boots a good slot and answers.
//!
//! Bundles: `keelson_tests::upgrade` (`cargo xtask upgrade-inputs`: v2 and v3 derived from v1).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use keelson_configs::layout::{FW_CFG_CONFIG, Slot};
use keelson_configs::pki::Role;
use keelson_imager::inspect;
use keelson_tests::http_server::HttpServer;
use keelson_tests::upgrade::{self, Faulty, V2};
use keelson_tests::{
    Arch, Guest, Running, api_client_config, free_loopback_port, machinectl, machinectl_binary,
    show, test_image, user_net_control_plane,
};

/// One boot to an answering API under software emulation, with room to spare.
const BOOT: Duration = Duration::from_secs(420);
/// An upgrade's whole wait: transfer, write, verify, reboot, and up to three failed
/// tries of a faulty version before the loader falls back.
const UPGRADE_WAIT: Duration = Duration::from_secs(20 * 60);
/// The disk: room on EPHEMERAL for what the test imports (the image's own size leaves
/// EPHEMERAL at its 64 MiB placeholder).
const DISK_BYTES: u64 = 4 << 30;

/// Where the guest finds this host's bundle server: a forward of QEMU's user network
/// (`guestfwd`, which `restrict=on` leaves working) to `127.0.0.1:<Node::fetch_port>`.
const FETCH_ADDRESS: &str = "10.0.2.100:8080";

/// A node under test: its VM, machinectl and an admin client config for it.
struct Node {
    vm: Running,
    bin: PathBuf,
    admin: PathBuf,
    /// The loopback port the guest's [`FETCH_ADDRESS`] reaches (nothing listens there
    /// unless the test serves bundles).
    fetch_port: u16,
    _dir: tempfile::TempDir,
}

impl Node {
    fn boot(arch: Arch, name: &str, mac: &str) -> Node {
        let bin = machinectl_binary().unwrap();
        let (config, ca) = user_net_control_plane(name, &format!("hostname = \"{name}\"")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config_file = dir.path().join("node.toml");
        std::fs::write(&config_file, toml::to_string(&config).unwrap()).unwrap();
        let port = free_loopback_port().unwrap();
        let fetch_port = free_loopback_port().unwrap();
        let admin = dir.path().join("machinectl.toml");
        api_client_config(&ca, &format!("127.0.0.1:{port}"), &Role::ALL, &admin).unwrap();
        let vm = Guest::new(arch)
            .image(test_image(arch).unwrap())
            .memory(2048)
            .disk_size(DISK_BYTES)
            .allow_reboot()
            .fw_cfg(FW_CFG_CONFIG, &config_file)
            .qemu_args(user_net(port, fetch_port, mac))
            .boot()
            .unwrap();
        let mut node = Node {
            vm,
            bin,
            admin,
            fetch_port,
            _dir: dir,
        };
        node.wait_version(None, BOOT);
        node
    }

    fn run(&self, timeout: Duration, args: &[&str]) -> Output {
        machinectl(&self.bin, &self.admin, timeout, args).unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(Duration::from_secs(120), args);
        assert!(
            out.status.success(),
            "machinectl {args:?}: {}\n--- console tail ---\n{}",
            show(&out),
            keelson_tests::tail(&self.vm.console(), 60)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    /// Wait until the API answers (with `version` when given); the node's `version`.
    fn wait_version(&mut self, version: Option<&str>, limit: Duration) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let out = self.run(Duration::from_secs(20), &["version", "-o", "json"]);
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                if version.is_none_or(|want| v[0]["version"] == want) {
                    return v[0].clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "the node did not answer{} within {limit:?}: {}\n--- console tail ---\n{}",
                version.map(|v| format!(" with {v}")).unwrap_or_default(),
                show(&out),
                keelson_tests::tail(&self.vm.console(), 80)
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Wait until the booted slot is blessed (its entry lost its counter).
    fn wait_blessed(&self, slot: &str) {
        let deadline = Instant::now() + BOOT;
        loop {
            let s = self.json(&["upgrade", "status"]);
            let blessed = s[0]["slots"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["slot"] == slot && x["booted"] == true && x["blessed"] == true);
            if blessed {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "slot {slot} never blessed: {s}\n{}",
                keelson_tests::tail(&self.vm.console(), 60)
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    fn upgrade(&self, bundle: &Path, extra: &[&str]) -> Output {
        let mut args = vec!["upgrade", "--image", bundle.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.run(UPGRADE_WAIT + Duration::from_secs(60), &args)
    }

    /// ROOT-<slot>'s sha256 and the ESP's entry files, read out of the VM's disk while
    /// it runs (`qemu-img convert -U`: a shared read of the overlay).
    fn slot_snapshot(&self, slot: Slot) -> (String, Vec<String>) {
        let raw = self.vm.dir().join("snapshot.raw");
        let out = Command::new("qemu-img")
            .args(["convert", "-U", "-O", "raw"])
            .arg(self.vm.dir().join("disk.qcow2"))
            .arg(&raw)
            .output()
            .unwrap();
        assert!(out.status.success(), "qemu-img convert: {out:?}");
        let mut f = std::fs::File::open(&raw).unwrap();
        let table = keelson_imager::gpt::read_gpt(&mut f).unwrap();
        let part = table.partition(slot.partition_name()).unwrap().clone();
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        use std::io::{Seek as _, SeekFrom};
        f.seek(SeekFrom::Start(part.start())).unwrap();
        let mut left = part.size();
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            let n = (left as usize).min(buf.len());
            f.read_exact(&mut buf[..n]).unwrap();
            sha2::Digest::update(&mut hasher, &buf[..n]);
            left -= n as u64;
        }
        let report = inspect::inspect(&raw).unwrap();
        let mut entries: Vec<String> = report
            .slots
            .iter()
            .filter_map(|s| s.entry_file.clone())
            .collect();
        entries.sort();
        std::fs::remove_file(&raw).unwrap();
        (hex::encode(sha2::Digest::finalize(hasher)), entries)
    }

    /// An upgrade that must be refused before anything is written to `inactive`; the
    /// refusal's text.
    fn refused(&self, bundle: &Path, inactive: Slot, what: &str) -> String {
        let before = self.slot_snapshot(inactive);
        let out = self.upgrade(bundle, &["--wait", "0s"]);
        let text = show(&out);
        assert!(!out.status.success(), "{what}: accepted: {text}");
        let after = self.slot_snapshot(inactive);
        assert_eq!(before, after, "{what}: the inactive slot changed: {text}");
        text
    }
}

/// A copy of `bundle` with one byte of its root part flipped (the signature still
/// matches the manifest; the part's sha256 does not).
/// QEMU's restricted user network: the node API forwarded from `127.0.0.1:api_port`, and
/// the guest's connections to [`FETCH_ADDRESS`] carried to `127.0.0.1:fetch_port` by
/// socat (one per connection). Nothing else leaves the VM.
fn user_net(api_port: u16, fetch_port: u16, mac: &str) -> Vec<String> {
    vec![
        "-netdev".into(),
        format!(
            "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{api_port}-:50000,guestfwd=tcp:{FETCH_ADDRESS}-cmd:socat STDIO TCP:127.0.0.1:{fetch_port}"
        ),
        "-device".into(),
        format!("virtio-net-pci,netdev=n0,mac={mac}"),
    ]
}

fn tampered(bundle: &Path, out: &Path) {
    let mut bytes = std::fs::read(bundle).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x5a;
    std::fs::write(out, bytes).unwrap();
}

/// The first `len` bytes of `bundle`: an upload cut in the middle of the root part.
fn truncated(bundle: &Path, out: &Path) {
    let bytes = std::fs::read(bundle).unwrap();
    std::fs::write(out, &bytes[..bytes.len() / 3]).unwrap();
}

/// `bundle`'s manifest and parts.
fn parse(bundle: &Path) -> (keelson_upgrade::manifest::Manifest, [Vec<u8>; 3]) {
    use keelson_upgrade::bundle::{BundleParser, Event, ParserLimits};
    let bytes = std::fs::read(bundle).unwrap();
    let mut parser = BundleParser::new(ParserLimits::default());
    let mut manifest = None;
    let mut parts: [Vec<u8>; 3] = Default::default();
    for event in parser.feed(&bytes).unwrap() {
        match event {
            Event::Header(h) => manifest = Some(h.manifest),
            Event::PartData { part, bytes } => parts[part].extend_from_slice(bytes),
            Event::PartEnd { .. } | Event::End => {}
        }
    }
    parser.finish().unwrap();
    (manifest.unwrap(), parts)
}

/// v2 with its root padded past the slot's partition, signed with the suite's dev key:
/// a bundle that does not fit.
fn too_big(v2: &Path, out: &Path) {
    use keelson_upgrade::bundle::{hash_part, write_bundle};
    let (mut manifest, [root, kernel, initrd]) = parse(v2);
    let slot_bytes = 512u64 << 20;
    let pad = slot_bytes + (4 << 20) - root.len() as u64;
    let padded = || std::io::Read::chain(&root[..], std::io::repeat(0).take(pad));
    manifest.parts = vec![
        hash_part("root", padded()).unwrap(),
        hash_part("kernel", &kernel[..]).unwrap(),
        hash_part("initrd", &initrd[..]).unwrap(),
    ];
    let key = keelson_upgrade::keys::load_private_key(
        &keelson_tests::workspace_root().join("target/keelson-keys/upgrade.key"),
    )
    .unwrap();
    let file = std::io::BufWriter::new(std::fs::File::create(out).unwrap());
    let parts: [Box<dyn std::io::Read + '_>; 3] = [
        Box::new(padded()),
        Box::new(&kernel[..]),
        Box::new(&initrd[..]),
    ];
    write_bundle(file, &manifest, parts, &key).unwrap();
}

/// v1 to v2 (the config and EPHEMERAL's data survive), the refusals before any write,
/// a downgrade refused, and rollback v2 → v1 → v2.
#[test]
fn v1_takes_v2_refuses_bad_bundles_and_rolls_back() {
    let bundles = upgrade::bundles().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::boot(Arch::Amd64, "upgrade-a", "52:54:00:4b:45:18");
    let v = node.wait_version(None, BOOT);
    assert_eq!(v["slot"], "a", "{v}");
    let v1 = v["version"].as_str().unwrap().to_string();
    node.wait_blessed("a");

    // Data on EPHEMERAL: an image imported into containerd.
    let archive = dir.path().join("keep.tar");
    keelson_tests::registry::write_test_image_archive(&archive, "keelson.test/kept:v1").unwrap();
    node.ok(&["image", "import", archive.to_str().unwrap()]);

    // Refused before any write: the inactive slot B and the entries are read before and
    // after each.
    let unknown = node.refused(
        &bundles.unknown_key,
        Slot::B,
        "a key the node does not trust",
    );
    assert!(unknown.contains("trust"), "{unknown}");
    let bad = dir.path().join("tampered.bundle");
    tampered(&bundles.v2, &bad);
    let text = node.refused(&bad, Slot::B, "a tampered payload");
    assert!(text.contains("sha256"), "{text}");
    let cut = dir.path().join("truncated.bundle");
    truncated(&bundles.v2, &cut);
    let text = node.refused(&cut, Slot::B, "a truncated upload");
    assert!(
        text.contains("ended") || text.contains("truncated"),
        "{text}"
    );
    let other = upgrade::v1_bundle(Arch::Arm64).unwrap();
    let text = node.refused(&other, Slot::B, "the other architecture");
    assert!(text.contains("arm64"), "{text}");
    let big = dir.path().join("too-big.bundle");
    too_big(&bundles.v2, &big);
    let text = node.refused(&big, Slot::B, "a bundle that does not fit");
    assert!(text.contains("partition holds"), "{text}");
    let out = node.upgrade(&bundles.v2, &["--dry-run"]);
    assert!(out.status.success(), "dry run: {}", show(&out));

    // v1 → v2, fetched by the node over HTTP from a server on this host, and staged:
    // nothing switches until the next reboot.
    let served = dir.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    std::fs::copy(&bundles.v2, served.join("v2.bundle")).unwrap();
    let server = HttpServer::start(None, [127, 0, 0, 1].into(), node.fetch_port, &served).unwrap();
    let url = format!("http://{FETCH_ADDRESS}/v2.bundle");
    let out = node.run(UPGRADE_WAIT, &["upgrade", "--image", &url, "--stage"]);
    assert!(out.status.success(), "v1 → v2 staged: {}", show(&out));
    assert!(show(&out).contains("staged in slot b"), "{}", show(&out));
    assert!(
        server.log().contains("GET /v2.bundle"),
        "the node fetched the bundle: {}",
        server.log()
    );
    drop(server);
    let status = node.json(&["upgrade", "status"]);
    assert_eq!(status[0]["attempt"]["outcome"], "staged", "{status}");
    let v = node.wait_version(None, BOOT);
    assert_eq!(v["version"], v1.as_str(), "still v1 until the reboot: {v}");
    let out = node.run(Duration::from_secs(60), &["reboot"]);
    assert!(out.status.success(), "reboot: {}", show(&out));
    let v = node.wait_version(Some(V2), BOOT);
    assert_eq!(v["slot"], "b", "{v}");
    node.wait_blessed("b");
    assert_eq!(v["hostname"], "upgrade-a", "the config survived: {v}");
    let images = node.ok(&["images"]);
    assert!(
        images.contains("keelson.test/kept:v1"),
        "EPHEMERAL kept: {images}"
    );
    let status = node.json(&["upgrade", "status"]);
    assert_eq!(status[0]["attempt"]["outcome"], "blessed", "{status}");

    // A downgrade is refused (slot A, holding v1, is untouched).
    let text = node.refused(&bundles.v1, Slot::A, "a downgrade");
    assert!(text.contains("downgrade"), "{text}");

    // Rollback: v2 → v1 → v2.
    let out = node.run(UPGRADE_WAIT, &["rollback"]);
    assert!(out.status.success(), "rollback: {}", show(&out));
    let v = node.wait_version(Some(&v1), BOOT);
    assert_eq!(v["slot"], "a", "{v}");
    let out = node.run(UPGRADE_WAIT, &["rollback"]);
    assert!(out.status.success(), "rollback again: {}", show(&out));
    let v = node.wait_version(Some(V2), BOOT);
    assert_eq!(v["slot"], "b", "{v}");
}

/// One faulty v3: the upgrade comes back on v2 by itself, `upgrade status` says which
/// phase failed and why, and the same bundle is refused afterwards.
fn falls_back(node: &mut Node, v3: &Faulty, extra: &[&str], phase_or_reason: &str) {
    let mut args = vec!["--wait", "18m"];
    args.extend_from_slice(extra);
    let bundle = &v3.bundle;
    let out = node.upgrade(bundle, &args);
    let text = show(&out);
    assert!(!out.status.success(), "{bundle:?}: {text}");
    assert!(text.contains("fell back"), "{bundle:?}: {text}");
    let v = node.wait_version(Some(V2), BOOT);
    assert_eq!(v["slot"], "b", "{v}");
    let status = node.json(&["upgrade", "status"]);
    let attempt = &status[0]["attempt"];
    assert_eq!(attempt["outcome"], "failed", "{status}");
    assert_eq!(attempt["to_version"], v3.version, "{status}");
    let said = format!("{} {}", attempt["failed_phase"], attempt["failed_reason"]);
    assert!(said.contains(phase_or_reason), "{bundle:?}: {said}");
    assert!(
        status[0]["failed"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["version"] == v3.version),
        "{status}"
    );
    let health = node.run(Duration::from_secs(60), &["health"]);
    assert!(
        show(&health).contains(v3.version),
        "health names the failed version: {}",
        show(&health)
    );
    let again = node.upgrade(bundle, &["--wait", "0s"]);
    assert!(
        !again.status.success(),
        "a failed version again: {}",
        show(&again)
    );
    assert!(show(&again).contains("failed"), "{}", show(&again));
}

/// v1 → v2, then four faulty v3s, each of which comes back to v2 by itself.
#[test]
fn failed_versions_come_back_to_v2() {
    let bundles = upgrade::bundles().unwrap();
    let mut node = Node::boot(Arch::Amd64, "upgrade-f", "52:54:00:4b:45:19");
    node.wait_blessed("a");
    let out = node.upgrade(&bundles.v2, &[]);
    assert!(out.status.success(), "v1 → v2: {}", show(&out));
    node.wait_version(Some(V2), BOOT);
    node.wait_blessed("b");

    falls_back(&mut node, &bundles.v3_panic, &[], "stage2");
    falls_back(&mut node, &bundles.v3_init_fails, &[], "healthy");
    falls_back(&mut node, &bundles.v3_hang, &[], "stage2");
    falls_back(
        &mut node,
        &bundles.v3_unhealthy,
        &["--health-timeout", "60s"],
        "machined",
    );
}

/// Where the power is cut: a line of `machinectl upgrade`'s progress to wait for, then a
/// delay; or a line of the node's console.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// After the CLI printed a line containing this, and this long after.
    Cli(&'static str, Duration),
    /// After the CLI said the node reboots, once the console showed this (printed after
    /// that moment), and this long after.
    Console(&'static str, Duration),
}

/// Run an upgrade to `bundle` and cut the power at `cut`.
fn upgrade_and_cut(node: &mut Node, bundle: &Path, cut: Cut) {
    let mut child = Command::new("timeout")
        .arg(UPGRADE_WAIT.as_secs().to_string())
        .arg(&node.bin)
        .arg("--machineconfig")
        .arg(&node.admin)
        .args([
            "upgrade",
            "--image",
            bundle.to_str().unwrap(),
            "--wait",
            "10m",
            "--force",
        ])
        .env_remove("MACHINECONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + UPGRADE_WAIT;
    let mut seen = Vec::new();
    let (cli_needle, cli_delay) = match cut {
        Cut::Cli(needle, delay) => (needle, delay),
        Cut::Console(..) => ("reboot", Duration::ZERO),
    };
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => {
                let hit = line.contains(cli_needle);
                seen.push(line);
                if hit {
                    std::thread::sleep(cli_delay);
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                panic!("machinectl ended before {cli_needle:?}: {seen:?}")
            }
        }
        assert!(Instant::now() < deadline, "no {cli_needle:?} in {seen:?}");
    }
    if let Cut::Console(needle, delay) = cut {
        let deadline = Instant::now() + BOOT;
        let from = node.vm.console().len();
        loop {
            if node
                .vm
                .console()
                .get(from..)
                .is_some_and(|c| c.contains(needle))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the console never showed {needle:?} after the reboot"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(delay);
    }
    eprintln!("upgrade power cut at {cut:?}");
    node.vm.power_cycle().unwrap();
    let _ = child.kill();
    let _ = child.wait();
}

/// The power is cut at 12 points over the whole upgrade (the transfer, the write, the
/// verify, around the entry's rename, the reboot, the new slot's boot before its
/// blessing, and after it): every time the node boots a good slot and answers.
#[test]
fn power_cuts_during_an_upgrade_leave_a_good_slot() {
    let bundles = upgrade::bundles().unwrap();
    let mut node = Node::boot(Arch::Amd64, "upgrade-p", "52:54:00:4b:45:1a");
    node.wait_blessed("a");
    let ms = Duration::from_millis;
    let cuts = [
        Cut::Cli("transfer 10%", ms(0)),
        Cut::Cli("transfer 50%", ms(0)),
        Cut::Cli("transfer 90%", ms(0)),
        Cut::Cli("write", ms(0)),
        // The write and the verify take about a second each under TCG (BENCHMARKS.md):
        // half a second in is inside either.
        Cut::Cli("write", ms(500)),
        Cut::Cli("verify", ms(0)),
        Cut::Cli("verify", ms(500)),
        Cut::Cli("entry", ms(0)),
        Cut::Cli("reboot", ms(0)),
        Cut::Console("BdsDxe: starting", ms(0)),
        Cut::Console(" on trial: ", ms(0)),
        Cut::Console("blessed", ms(0)),
    ];
    for (i, cut) in cuts.into_iter().enumerate() {
        // Each cut starts from a good, blessed node on either slot; the bundle is v2
        // (a reinstall when the node already runs it).
        upgrade_and_cut(&mut node, &bundles.v2, cut);
        let v = node.wait_version(None, BOOT);
        let version = v["version"].as_str().unwrap().to_string();
        let slot = v["slot"].as_str().unwrap().to_string();
        eprintln!("cut {i} ({cut:?}): the node answers on {version} from slot {slot}");
        // A good slot: blessed, its services up (this user-network node's etcd check
        // fails whatever the slot: it never bootstraps).
        node.wait_blessed(&slot);
        let services = node.ok(&["services"]);
        assert!(
            services.contains("machined") && services.contains("containerd"),
            "cut {i}: {services}"
        );
    }
}

/// v1 → v2 on arm64.
#[test]
fn arm64_takes_v2() {
    let v2 = upgrade::v2_bundle(Arch::Arm64).unwrap();
    let node = Node::boot(Arch::Arm64, "upgrade-arm", "52:54:00:4b:45:1b");
    node.wait_blessed("a");
    let out = node.upgrade(&v2, &[]);
    assert!(out.status.success(), "arm64 v1 → v2: {}", show(&out));
    let mut node = node;
    let v = node.wait_version(Some(V2), BOOT);
    assert_eq!(v["slot"], "b", "{v}");
    node.wait_blessed("b");
}
