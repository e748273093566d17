//! The engine over temporary files: a fake sysfs and `/dev` (the partitions are plain
//! files), the ESP and STATE as directories, bundles built here with the crate's writer
//! and a key generated here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keelson_configs::boot::{BootEntry, EntryVersion, VerityParams};
use keelson_configs::layout::Slot;
use keelson_node_protocol::upgrade::{FailedVersion, Outcome, UpgradeRecord};
use keelson_upgrade::bundle::{hash_part, write_bundle};
use keelson_upgrade::keys::{self, SigningKey};
use keelson_upgrade::manifest::{FORMAT, Manifest};
use keelson_upgrade::verity;

use super::cluster_guard::GuardFuture;
use super::*;

/// The old bytes of slot B's partition.
const OLD: u8 = 0xAA;
/// Slot B's partition: 4 MiB.
const PARTITION_SECTORS: u64 = 8192;

struct Node {
    _dir: tempfile::TempDir,
    paths: UpgradePaths,
    key: SigningKey,
    partition: PathBuf,
}

fn write(path: &Path, data: impl AsRef<[u8]>) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
}

fn entry(slot: Slot, generation: u64, version: &str) -> String {
    let verity = VerityParams {
        roothash: "00".repeat(32),
        salt: "11".repeat(32),
        data_blocks: 1,
        hash_offset: 4096,
    };
    BootEntry::for_slot(
        slot,
        &EntryVersion {
            generation,
            os_version: version.into(),
        },
        "console=ttyS0",
        &verity,
    )
    .render()
}

/// Booted from slot A (0.1.0, blessed, generation 1); slot B holds an entry the loader
/// gave up (`+0-3`) and old files.
fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let paths = UpgradePaths {
        state: root.join("state"),
        esp: root.join("esp"),
        trusted_keys: root.join("keys"),
        os_release: root.join("os-release"),
        cmdline: root.join("cmdline"),
        sys_block: root.join("sys/class/block"),
        dev: root.join("dev"),
        components: root.join("components"),
        spool: root.join("var/lib/keelson/upgrade"),
    };
    fs::create_dir_all(&paths.state).unwrap();
    write(&paths.state.join("config.toml"), "version = \"v1\"\n");
    write(&paths.cmdline, "console=ttyS0 keelson.slot=a quiet\n");
    write(&paths.os_release, "NAME=Keelson\nVERSION_ID=0.1.0\n");
    write(&paths.components, "containerd\n");
    for (name, part) in [("vda2", "ROOT-A"), ("vda3", "ROOT-B")] {
        let d = paths.sys_block.join(name);
        write(
            &d.join("uevent"),
            format!("MAJOR=254\nDEVNAME={name}\nDEVTYPE=partition\nPARTNAME={part}\n"),
        );
        write(&d.join("size"), format!("{PARTITION_SECTORS}\n"));
    }
    let partition = paths.dev.join("vda3");
    write(&partition, vec![OLD; (PARTITION_SECTORS * 512) as usize]);
    let entries = paths.esp.join("loader/entries");
    write(&entries.join("keelson-a.conf"), entry(Slot::A, 1, "0.1.0"));
    write(
        &entries.join("keelson-b+0-3.conf"),
        entry(Slot::B, 0, "0.0.9"),
    );
    write(&entries.join("other.conf"), "title not ours\n");
    for slot in ["a", "b"] {
        write(
            &paths.esp.join(format!("keelson/{slot}/vmlinuz")),
            "old kernel",
        );
        write(
            &paths.esp.join(format!("keelson/{slot}/initrd")),
            "old initrd",
        );
    }
    let key = keys::generate().unwrap();
    fs::create_dir_all(&paths.trusted_keys).unwrap();
    keys::save_public_key(&paths.trusted_keys.join("dev.pub"), &key.verifying_key()).unwrap();
    Node {
        _dir: dir,
        paths,
        key,
        partition,
    }
}

/// What a bundle holds, kept to compare with what was written.
struct Built {
    bytes: Vec<u8>,
    root: Vec<u8>,
    kernel: Vec<u8>,
    initrd: Vec<u8>,
    manifest: Manifest,
}

fn build(key: &SigningKey, version: &str, arch: &str) -> Built {
    let data: Vec<u8> = (0..16 * 4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let tree = verity::build(&data[..], &[5u8; 32], [1u8; 16]).unwrap();
    let mut root = data;
    root.extend_from_slice(&tree.bytes);
    let kernel = format!("kernel {version}").into_bytes();
    let initrd = format!("initrd {version}").repeat(100).into_bytes();
    let manifest = Manifest {
        format: FORMAT,
        version: version.into(),
        arch: arch.into(),
        min_version: None,
        components: vec!["containerd".into(), "etcd".into()],
        config_versions: vec!["v1".into()],
        cmdline: "console=ttyS0 panic=10".into(),
        verity: tree.params.boot_params(),
        key_id: String::new(),
        parts: vec![
            hash_part("root", &root[..]).unwrap(),
            hash_part("kernel", &kernel[..]).unwrap(),
            hash_part("initrd", &initrd[..]).unwrap(),
        ],
    };
    let mut bytes = Vec::new();
    write_bundle(
        &mut bytes,
        &manifest,
        [&root[..], &kernel[..], &initrd[..]],
        key,
    )
    .unwrap();
    Built {
        bytes,
        root,
        kernel,
        initrd,
        manifest,
    }
}

fn good(node: &Node) -> Built {
    build(&node.key, "0.2.0", &facts::arch())
}

/// The bundle sent in chunks of 7000 bytes, its size not announced (a cut connection).
fn stream(bytes: Vec<u8>) -> BundleSource {
    let (tx, rx) = mpsc::channel(4);
    let size = 0;
    tokio::spawn(async move {
        for chunk in bytes.chunks(7000) {
            if tx.send(Ok(Bytes::copy_from_slice(chunk))).await.is_err() {
                return;
            }
        }
    });
    BundleSource::Stream { chunks: rx, size }
}

async fn run(
    upgrader: &Upgrader,
    bytes: Vec<u8>,
    options: UpgradeOptions,
) -> (Result<UpgradeDone, UpgradeError>, Vec<Progress>) {
    let (tx, mut rx) = mpsc::channel(1024);
    let result = upgrader.upgrade(stream(bytes), options, tx).await;
    let mut seen = Vec::new();
    while let Ok(p) = rx.try_recv() {
        seen.push(p);
    }
    (result, seen)
}

fn entry_names(node: &Node) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(node.paths.esp.join("loader/entries"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn record(node: &Node) -> UpgradeRecord {
    facts::read_record(&node.paths.state).unwrap()
}

#[tokio::test]
async fn an_upgrade_writes_the_inactive_slot_and_a_trial_entry() {
    let node = node();
    let built = good(&node);
    let upgrader = Upgrader::new(node.paths.clone());
    let options = UpgradeOptions {
        health_timeout_secs: 120,
        ..UpgradeOptions::default()
    };
    let (done, progress) = run(&upgrader, built.bytes.clone(), options).await;
    let done = done.unwrap();
    assert_eq!(
        done,
        UpgradeDone {
            version: "0.2.0".into(),
            slot: "b".into(),
            rebooting: true,
            dry_run: false
        }
    );
    // The root at the partition's start, the rest as it was.
    let written = fs::read(&node.partition).unwrap();
    assert_eq!(&written[..built.root.len()], &built.root[..]);
    assert!(written[built.root.len()..].iter().all(|b| *b == OLD));
    assert_eq!(
        fs::read(node.paths.esp.join("keelson/b/vmlinuz")).unwrap(),
        built.kernel
    );
    assert_eq!(
        fs::read(node.paths.esp.join("keelson/b/initrd")).unwrap(),
        built.initrd
    );
    // Slot A untouched; B's given-up entry replaced by a trial one; no temporary file.
    assert_eq!(
        fs::read(node.paths.esp.join("keelson/a/vmlinuz")).unwrap(),
        b"old kernel"
    );
    assert_eq!(
        entry_names(&node),
        ["keelson-a.conf", "keelson-b+3-0.conf", "other.conf"]
    );
    assert!(
        fs::read_dir(node.paths.esp.join("keelson/b"))
            .unwrap()
            .count()
            == 2,
        "a temporary file was left"
    );
    let text =
        fs::read_to_string(node.paths.esp.join("loader/entries/keelson-b+3-0.conf")).unwrap();
    let e = BootEntry::parse(&text);
    assert_eq!(e.version.as_deref(), Some("2-0.2.0"));
    assert_eq!(e.linux, "/keelson/b/vmlinuz");
    assert!(
        e.options.starts_with(
            "console=ttyS0 panic=10 keelson.upgrade.health_timeout=120 keelson.slot=b "
        ),
        "{}",
        e.options
    );
    assert!(e.options.contains(&built.manifest.verity.roothash));
    // The record: every phase up to the reboot, booting.
    let attempt = record(&node).attempt.unwrap();
    assert_eq!(attempt.outcome, Outcome::Booting);
    assert_eq!(
        (attempt.from_version.as_str(), attempt.from_slot.as_str()),
        ("0.1.0", "a")
    );
    assert_eq!(
        (attempt.to_version.as_str(), attempt.to_slot.as_str()),
        ("0.2.0", "b")
    );
    let phases: Vec<&str> = attempt.phases.iter().map(|p| p.phase.as_str()).collect();
    assert_eq!(phases, ["transfer", "write", "verify", "entry", "reboot"]);
    assert!(
        attempt.phases.windows(2).all(|w| w[0].at_ms <= w[1].at_ms),
        "{:?}",
        attempt.phases
    );
    // Each phase says what it does; transfer and write show every tenth (the power-cut
    // test waits for `transfer 10%`, `50%`, `90%`).
    let order: Vec<&str> = progress.iter().map(|p| p.phase.as_str()).collect();
    let mut seen_phases = order.clone();
    seen_phases.dedup();
    assert_eq!(
        seen_phases,
        ["check", "transfer", "write", "verify", "entry"],
        "{order:?}"
    );
    for phase in ["check", "transfer", "write", "verify", "entry"] {
        assert!(
            progress
                .iter()
                .any(|p| p.phase == phase && !p.message.is_empty()),
            "no line for {phase}"
        );
    }
    for (phase, total) in [
        ("transfer", built.bytes.len() as u64),
        ("write", built.manifest.parts_size()),
    ] {
        let percents: Vec<u64> = progress
            .iter()
            .filter(|p| p.phase == phase && p.done > 0)
            .map(|p| {
                assert_eq!(p.total, total, "{phase}");
                p.done * 100 / p.total
            })
            .collect();
        for tenth in (10..=100).step_by(10) {
            assert!(percents.contains(&tenth), "{phase}: {percents:?}");
        }
    }
    // No progress line of an earlier phase names a later one (the power-cut test cuts on
    // the first line that contains `write`, `verify`, `entry` or `reboot`).
    for (i, later) in ["write", "verify", "entry", "reboot"].iter().enumerate() {
        let before = ["check", "transfer", "write", "verify"][..=i].to_vec();
        for p in progress
            .iter()
            .filter(|p| before.contains(&p.phase.as_str()))
        {
            assert!(!p.message.contains(later), "{}: {}", p.phase, p.message);
        }
    }
    assert!(!spooled(&node), "the spool was left");
    // The status: A runs, B boots next.
    let status: proto::UpgradeStatusResponse = upgrader.status().unwrap().into();
    let slots: Vec<(&str, &str, bool, bool, bool)> = status
        .slots
        .iter()
        .map(|s| {
            (
                s.slot.as_str(),
                s.version.as_str(),
                s.blessed,
                s.booted,
                s.next,
            )
        })
        .collect();
    assert_eq!(
        slots,
        [
            ("a", "0.1.0", true, true, false),
            ("b", "0.2.0", false, false, true)
        ]
    );
    assert_eq!(status.slots[1].tries_left, 3);
    assert_eq!(status.outcome, "booting");
    assert_eq!(status.to_version, "0.2.0");
}

#[tokio::test]
async fn a_staged_upgrade_does_not_reboot() {
    let node = node();
    let upgrader = Upgrader::new(node.paths.clone());
    let options = UpgradeOptions {
        stage: true,
        expect_ready: vec!["etcd".into()],
        ..UpgradeOptions::default()
    };
    let (done, _) = run(&upgrader, good(&node).bytes, options).await;
    assert!(!done.unwrap().rebooting);
    let attempt = record(&node).attempt.unwrap();
    assert_eq!(attempt.outcome, Outcome::Staged);
    // What ran before is what the new slot must bring back (PID 1 reads it there).
    assert_eq!(attempt.expect_ready, ["etcd"]);
    let text =
        fs::read_to_string(node.paths.esp.join("loader/entries/keelson-b+3-0.conf")).unwrap();
    assert!(!text.contains("health_timeout"), "{text}");
}

/// Whether the spool file is there.
fn spooled(node: &Node) -> bool {
    node.paths.spool.join(spool::SPOOL_FILE).exists()
}

/// Every file on the ESP with its bytes.
fn esp_files(node: &Node) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    fn walk(dir: &Path, out: &mut std::collections::BTreeMap<PathBuf, Vec<u8>>) {
        for item in fs::read_dir(dir).unwrap() {
            let path = item.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.insert(path.clone(), fs::read(&path).unwrap());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(&node.paths.esp, &mut out);
    out
}

/// The partition, the entries and the record, to compare before and after.
fn snapshot(node: &Node) -> (Vec<u8>, Vec<String>, Option<Vec<u8>>) {
    (
        fs::read(&node.partition).unwrap(),
        entry_names(node),
        fs::read(node.paths.state.join("upgrade.json")).ok(),
    )
}

#[tokio::test]
async fn refusals_and_dry_runs_write_nothing() {
    let node = node();
    let upgrader = Upgrader::new(node.paths.clone());
    let other_arch = if facts::arch() == "amd64" {
        "arm64"
    } else {
        "amd64"
    };
    let stranger = keys::generate().unwrap();
    let good = good(&node).bytes;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "other arch",
            build(&node.key, "0.2.0", other_arch).bytes,
            "is for",
        ),
        (
            "downgrade",
            build(&node.key, "0.0.5", &facts::arch()).bytes,
            "older",
        ),
        (
            "unknown key",
            build(&stranger, "0.2.0", &facts::arch()).bytes,
            "signature",
        ),
        (
            "not a bundle",
            b"PK\x03\x04 a zip file, not a bundle".repeat(10),
            "not a Keelson",
        ),
        ("truncated header", good[..40].to_vec(), "ended"),
    ];
    let cut = |bytes: &[u8]| bytes[..bytes.len() - 5000].to_vec();
    let before = snapshot(&node);
    for (what, bytes, says) in cases {
        let (result, _) = run(&upgrader, bytes, UpgradeOptions::default()).await;
        let err = result.expect_err(what);
        let chain = keelson_api::error_chain(&err);
        assert!(chain.contains(says), "{what}: {chain}");
        assert!(
            matches!(
                err.code(),
                tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
            ),
            "{what}: {:?}",
            err.code()
        );
        assert!(snapshot(&node) == before, "{what} changed the node");
    }
    // A truncated file whose size was announced: refused before any write.
    let (tx, rx) = mpsc::channel(4);
    let short = cut(&good);
    tokio::spawn(async move { tx.send(Ok(Bytes::from(short))).await });
    let (ptx, _prx) = mpsc::channel(64);
    let source = BundleSource::Stream {
        chunks: rx,
        size: (good.len() - 5000) as u64,
    };
    let err = upgrader
        .upgrade(source, UpgradeOptions::default(), ptx)
        .await
        .unwrap_err();
    assert!(matches!(err, UpgradeError::SizeMismatch { .. }), "{err:?}");
    assert!(
        snapshot(&node) == before,
        "a truncated file changed the node"
    );
    // A dry run passes every check and writes nothing.
    let dry = UpgradeOptions {
        dry_run: true,
        ..UpgradeOptions::default()
    };
    let (done, _) = run(&upgrader, good.clone(), dry.clone()).await;
    let done = done.unwrap();
    assert!(done.dry_run && !done.rebooting);
    assert!(snapshot(&node) == before, "the dry run changed the node");
    // A root larger than the partition.
    write(&node.paths.sys_block.join("vda3/size"), "8\n");
    let (result, _) = run(&upgrader, good.clone(), dry.clone()).await;
    assert!(
        matches!(result, Err(UpgradeError::Refused { .. })),
        "{result:?}"
    );
    write(
        &node.paths.sys_block.join("vda3/size"),
        format!("{PARTITION_SECTORS}\n"),
    );
    // A version that failed here, until forced.
    let failed = UpgradeRecord {
        attempt: None,
        failed: vec![FailedVersion {
            version: "0.2.0".into(),
            phase: "healthy".into(),
            reason: "not healthy within 300 s".into(),
            at_ms: 1,
        }],
    };
    facts::write_record(&node.paths.state, &failed).unwrap();
    let before = snapshot(&node);
    let (result, _) = run(&upgrader, good.clone(), UpgradeOptions::default()).await;
    let err = result.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.to_string().contains("already failed"), "{err}");
    assert!(snapshot(&node) == before);
    let forced = UpgradeOptions {
        force: true,
        dry_run: true,
        ..UpgradeOptions::default()
    };
    run(&upgrader, good, forced).await.0.unwrap();
}

struct Guard(Option<&'static str>);

impl ClusterGuard for Guard {
    fn reboot_refusal(&self) -> GuardFuture<'_> {
        let answer = self.0.map(str::to_owned);
        Box::pin(async move { answer })
    }
}

#[tokio::test]
async fn a_control_plane_without_quorum_is_refused_unless_forced() {
    let node = node();
    let upgrader = Upgrader::new(node.paths.clone());
    upgrader.set_cluster_guard(Some(Arc::new(Guard(Some("etcd would lose its quorum")))));
    let dry = UpgradeOptions {
        dry_run: true,
        ..UpgradeOptions::default()
    };
    let (result, _) = run(&upgrader, good(&node).bytes, dry.clone()).await;
    let err = result.unwrap_err();
    assert!(err.to_string().contains("quorum"), "{err}");
    let forced = UpgradeOptions { force: true, ..dry };
    run(&upgrader, good(&node).bytes, forced).await.0.unwrap();
    upgrader.set_cluster_guard(Some(Arc::new(Guard(None))));
    run(
        &upgrader,
        good(&node).bytes,
        UpgradeOptions {
            dry_run: true,
            ..UpgradeOptions::default()
        },
    )
    .await
    .0
    .unwrap();
}

#[tokio::test]
async fn a_write_failure_leaves_no_entry_for_the_inactive_slot() {
    let node = node();
    // Every write to the "partition" fails with ENOSPC.
    fs::remove_file(&node.partition).unwrap();
    std::os::unix::fs::symlink("/dev/full", &node.partition).unwrap();
    let upgrader = Upgrader::new(node.paths.clone());
    let (result, _) = run(&upgrader, good(&node).bytes, UpgradeOptions::default()).await;
    let err = result.unwrap_err();
    assert!(matches!(err, UpgradeError::Write { .. }), "{err:?}");
    assert!(keelson_api::error_chain(&err).contains("vda3"), "{err}");
    assert_eq!(entry_names(&node), ["keelson-a.conf", "other.conf"]);
    // No temporary file on the ESP, slot A's files as they were.
    assert_eq!(
        fs::read_dir(node.paths.esp.join("keelson/b"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        fs::read(node.paths.esp.join("keelson/a/initrd")).unwrap(),
        b"old initrd"
    );
    assert!(!spooled(&node), "the spool was left");
    match record(&node).attempt.unwrap().outcome {
        Outcome::Failed { phase, reason } => {
            assert_eq!(phase, "write");
            assert!(reason.contains("vda3"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

/// Runs `bytes`, which must fail with `expect`, and checks that the inactive partition and
/// the ESP are byte for byte as they were, and the spool is gone.
async fn refused_before_any_write(
    node: &Node,
    bytes: Vec<u8>,
    expect: fn(&UpgradeError) -> bool,
) -> UpgradeError {
    let upgrader = Upgrader::new(node.paths.clone());
    let partition = fs::read(&node.partition).unwrap();
    let esp = esp_files(node);
    let (result, _) = run(&upgrader, bytes, UpgradeOptions::default()).await;
    let err = result.unwrap_err();
    assert!(expect(&err), "{err:?}");
    assert!(
        fs::read(&node.partition).unwrap() == partition,
        "the inactive partition was written"
    );
    assert!(esp_files(node) == esp, "the ESP was written");
    assert!(!spooled(node), "the spool was left");
    err
}

#[tokio::test]
async fn a_tampered_or_cut_payload_is_refused_before_any_write() {
    let node = node();
    let built = good(&node);
    let root_at = built.bytes.len() - built.manifest.parts_size() as usize;
    // One flipped byte in the middle of the root part.
    let mut tampered = built.bytes.clone();
    tampered[root_at + built.root.len() / 2] ^= 1;
    let err = refused_before_any_write(&node, tampered, |e| {
        matches!(e, UpgradeError::BadBundle { .. })
    })
    .await;
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(
        keelson_api::error_chain(&err).contains("root part has sha256"),
        "{err}"
    );
    let attempt = record(&node).attempt.unwrap();
    assert!(
        matches!(attempt.outcome, Outcome::Failed { ref phase, .. } if phase == "transfer"),
        "{attempt:?}"
    );
    assert!(attempt.phases.is_empty(), "{attempt:?}");
    // The last part tampered with: caught at the bundle's very end, still before any write.
    let mut tampered = built.bytes.clone();
    let last = tampered.len() - 10;
    tampered[last] ^= 1;
    let err = refused_before_any_write(&node, tampered, |e| {
        matches!(e, UpgradeError::BadBundle { .. })
    })
    .await;
    assert!(
        keelson_api::error_chain(&err).contains("initrd part has sha256"),
        "{err}"
    );
    // The upload cut in the middle of the root part, and just before the end.
    for cut_at in [root_at + built.root.len() / 2, built.bytes.len() - 100] {
        let cut = built.bytes[..cut_at].to_vec();
        let err =
            refused_before_any_write(&node, cut, |e| matches!(e, UpgradeError::Truncated { .. }))
                .await;
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        let attempt = record(&node).attempt.unwrap();
        assert!(
            matches!(attempt.outcome, Outcome::Failed { ref phase, .. } if phase == "transfer")
        );
    }
    // A byte after the end refuses the bundle too.
    let mut longer = built.bytes.clone();
    longer.push(0);
    refused_before_any_write(&node, longer, |e| {
        matches!(e, UpgradeError::BadBundle { .. })
    })
    .await;
    // The sender's stream broken mid-transfer.
    let (tx, rx) = mpsc::channel(4);
    let half = built.bytes[..root_at + 1000].to_vec();
    tokio::spawn(async move {
        tx.send(Ok(Bytes::from(half))).await.unwrap();
        tx.send(Err("the client went away".into())).await.unwrap();
    });
    let partition = fs::read(&node.partition).unwrap();
    let esp = esp_files(&node);
    let (ptx, _prx) = mpsc::channel(1024);
    let source = BundleSource::Stream {
        chunks: rx,
        size: 0,
    };
    let err = Upgrader::new(node.paths.clone())
        .upgrade(source, UpgradeOptions::default(), ptx)
        .await
        .unwrap_err();
    assert!(matches!(err, UpgradeError::Transfer { .. }), "{err:?}");
    assert!(fs::read(&node.partition).unwrap() == partition);
    assert!(esp_files(&node) == esp);
    assert!(!spooled(&node));
    // The same bundle whole goes in.
    let upgrader = Upgrader::new(node.paths.clone());
    run(&upgrader, built.bytes.clone(), UpgradeOptions::default())
        .await
        .0
        .unwrap();
    assert_eq!(
        entry_names(&node),
        ["keelson-a.conf", "keelson-b+3-0.conf", "other.conf"]
    );
}

#[tokio::test]
async fn a_stale_spool_is_removed_when_the_engine_starts() {
    let node = node();
    let spool = node.paths.spool.join(spool::SPOOL_FILE);
    write(&spool, vec![0x55u8; 100_000]);
    write(&node.paths.spool.join("notes.txt"), "not a spool");
    let _upgrader = Upgrader::new(node.paths.clone());
    assert!(!spool.exists(), "the stale spool is still there");
    assert!(node.paths.spool.join("notes.txt").exists());
    // A spool directory that does not exist is no error.
    fs::remove_dir_all(&node.paths.spool).unwrap();
    let _upgrader = Upgrader::new(node.paths.clone());
}

#[tokio::test]
async fn a_spool_that_cannot_be_written_stops_the_transfer_before_any_write() {
    let node = node();
    // The spool's directory is a file.
    write(&node.paths.spool, "not a directory");
    let err = refused_before_any_write(&node, good(&node).bytes, |e| {
        matches!(e, UpgradeError::Spool { .. })
    })
    .await;
    let chain = keelson_api::error_chain(&err);
    assert!(
        chain.contains(&node.paths.spool.display().to_string()) && chain.contains("EPHEMERAL"),
        "{chain}"
    );
    let attempt = record(&node).attempt.unwrap();
    assert!(
        matches!(attempt.outcome, Outcome::Failed { ref phase, .. } if phase == "transfer"),
        "{attempt:?}"
    );
}

#[tokio::test]
async fn no_room_for_the_spool_is_refused_before_any_write() {
    let node = node();
    let built = good(&node);
    let needed = built.manifest.parts_size() + spool::SPOOL_RESERVE_BYTES;
    let before = snapshot(&node);
    let esp = esp_files(&node);
    for dry_run in [true, false] {
        let upgrader = Upgrader::new(node.paths.clone()).with_spool_free_bytes(needed - 1);
        let options = UpgradeOptions {
            dry_run,
            ..UpgradeOptions::default()
        };
        let (result, progress) = run(&upgrader, built.bytes.clone(), options).await;
        let err = result.unwrap_err();
        assert!(matches!(err, UpgradeError::Refused { .. }), "{err:?}");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        let text = err.to_string();
        assert!(text.contains(&format!("needs {needed} bytes")), "{text}");
        assert!(
            text.contains(&format!("only {} bytes", needed - 1)),
            "{text}"
        );
        assert!(
            text.contains(&node.paths.spool.display().to_string()),
            "{text}"
        );
        assert!(progress.iter().all(|p| p.phase == "check"), "{progress:?}");
        assert!(snapshot(&node) == before, "the node was changed");
        assert!(esp_files(&node) == esp, "the ESP was written");
        assert!(!node.paths.spool.exists(), "the spool directory was made");
    }
    // Exactly enough room: it goes in.
    let upgrader = Upgrader::new(node.paths.clone()).with_spool_free_bytes(needed);
    run(&upgrader, built.bytes, UpgradeOptions::default())
        .await
        .0
        .unwrap();
    assert!(!spooled(&node));
    let mode = fs::metadata(&node.paths.spool).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o700
    );
}

#[tokio::test]
async fn a_second_upgrade_is_refused_while_one_runs() {
    let node = node();
    let upgrader = Upgrader::new(node.paths.clone());
    let built = good(&node);
    // The first upgrade gets the header and half the bundle, then waits.
    let (tx, rx) = mpsc::channel(4);
    let half = built.bytes.len() / 2;
    tx.send(Ok(Bytes::copy_from_slice(&built.bytes[..half])))
        .await
        .unwrap();
    let first = {
        let upgrader = upgrader.clone();
        let (ptx, _prx) = mpsc::channel(1024);
        tokio::spawn(async move {
            upgrader
                .upgrade(
                    BundleSource::Stream {
                        chunks: rx,
                        size: 0,
                    },
                    UpgradeOptions::default(),
                    ptx,
                )
                .await
        })
    };
    // Let it take the lock.
    for _ in 0..100 {
        if upgrader.busy.try_lock().is_err() {
            break;
        }
        tokio::task::yield_now().await;
    }
    let (second, _) = run(&upgrader, built.bytes.clone(), UpgradeOptions::default()).await;
    let err = second.unwrap_err();
    assert!(matches!(err, UpgradeError::Busy), "{err:?}");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.to_string().contains("an upgrade is already running"));
    assert!(matches!(
        upgrader.rollback(Vec::new()),
        Err(UpgradeError::Busy)
    ));
    tx.send(Ok(Bytes::copy_from_slice(&built.bytes[half..])))
        .await
        .unwrap();
    drop(tx);
    first.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_bundle_is_fetched_from_a_url() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let node = node();
    let bytes = good(&node).bytes;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = conn.read(&mut buf).await;
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", bytes.len());
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(&bytes).await.unwrap();
    });
    let upgrader = Upgrader::new(node.paths.clone());
    let (tx, _rx) = mpsc::channel(1024);
    let done = upgrader
        .upgrade(
            BundleSource::Url(format!("http://{addr}/keelson-amd64.bundle")),
            UpgradeOptions::default(),
            tx,
        )
        .await
        .unwrap();
    assert_eq!(done.slot, "b");
    assert!(entry_names(&node).contains(&"keelson-b+3-0.conf".to_string()));
    // A URL that does not answer names itself.
    let (tx, _rx) = mpsc::channel(1024);
    let err = upgrader
        .upgrade(
            BundleSource::Url("http://127.0.0.1:1/x.bundle".into()),
            UpgradeOptions::default(),
            tx,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, UpgradeError::Fetch { .. }), "{err:?}");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}

#[test]
fn a_rollback_makes_the_other_blessed_slot_the_newest() {
    let node = node();
    let entries = node.paths.esp.join("loader/entries");
    let upgrader = Upgrader::new(node.paths.clone());
    // B's entry was given up: no rollback.
    let err = upgrader.rollback(Vec::new()).unwrap_err();
    assert!(err.to_string().contains("on trial"), "{err}");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    // No entry for B at all.
    fs::remove_file(entries.join("keelson-b+0-3.conf")).unwrap();
    let err = upgrader.rollback(Vec::new()).unwrap_err();
    assert!(err.to_string().contains("no boot entry"), "{err}");
    // A blessed B whose kernel is missing.
    write(&entries.join("keelson-b.conf"), entry(Slot::B, 0, "0.0.9"));
    fs::remove_file(node.paths.esp.join("keelson/b/vmlinuz")).unwrap();
    let err = upgrader.rollback(Vec::new()).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    assert!(record(&node).attempt.is_none());
    // A blessed B with its files: it gets the next generation and boots next.
    write(&node.paths.esp.join("keelson/b/vmlinuz"), "old kernel");
    let done = upgrader.rollback(vec!["kubelet".into()]).unwrap();
    assert_eq!(
        done,
        RollbackDone {
            version: "0.0.9".into(),
            slot: "b".into()
        }
    );
    let text = fs::read_to_string(entries.join("keelson-b.conf")).unwrap();
    assert_eq!(BootEntry::parse(&text).version.as_deref(), Some("2-0.0.9"));
    assert_eq!(
        entry_names(&node),
        ["keelson-a.conf", "keelson-b.conf", "other.conf"]
    );
    let attempt = record(&node).attempt.unwrap();
    assert!(attempt.rollback);
    assert_eq!(attempt.expect_ready, ["kubelet"]);
    assert_eq!(attempt.outcome, Outcome::Booting);
    assert_eq!(attempt.to_slot, "b");
    let status = upgrader.status().unwrap();
    assert!(status.slots[1].next && status.slots[0].booted);
    let wire: proto::RollbackResponse = done.into();
    assert_eq!(wire.slot, "b");
}

#[test]
fn a_node_not_booted_from_a_slot_is_told_so() {
    let node = node();
    write(&node.paths.cmdline, "console=ttyS0\n");
    let err = Upgrader::new(node.paths.clone())
        .rollback(Vec::new())
        .unwrap_err();
    assert!(matches!(err, UpgradeError::NoBootedSlot { .. }), "{err:?}");
}

#[tokio::test]
async fn the_read_back_finds_a_corrupt_write() {
    let node = node();
    let built = good(&node);
    let upgrader = Upgrader::new(node.paths.clone());
    run(&upgrader, built.bytes.clone(), UpgradeOptions::default())
        .await
        .0
        .unwrap();
    let written = install::Written {
        device: node.partition.clone(),
        kernel: node.paths.esp.join("keelson/b/vmlinuz"),
        initrd: node.paths.esp.join("keelson/b/initrd"),
    };
    install::verify(written.clone(), &built.manifest)
        .await
        .unwrap();
    // A data block the disk lost: sha256 and verity both see it.
    let mut root = fs::read(&node.partition).unwrap();
    root[5 * 4096 + 17] ^= 0xff;
    fs::write(&node.partition, &root).unwrap();
    let err = install::verify(written.clone(), &built.manifest)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, UpgradeError::Verify { part, what: "sha256", .. } if part == "root"),
        "{err:?}"
    );
    assert_eq!(err.code(), tonic::Code::DataLoss);
    let mut manifest = built.manifest.clone();
    manifest.parts[0].sha256 = install::sha256_hex(&root[..built.root.len()]);
    let err = install::verify(written.clone(), &manifest)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, UpgradeError::Verify { what: "verity tree", actual, .. } if actual.contains('5')),
        "{err:?}"
    );
    // A kernel cut short.
    root[5 * 4096 + 17] ^= 0xff;
    fs::write(&node.partition, &root).unwrap();
    fs::write(&written.kernel, b"kernel").unwrap();
    let err = install::verify(written, &built.manifest).await.unwrap_err();
    assert!(keelson_api::error_chain(&err).contains("vmlinuz"), "{err}");
}

#[test]
fn the_inactive_partition_is_found_by_name_on_the_booted_disk() {
    let node = node();
    let p = facts::find_partition(&node.paths, Slot::B).unwrap();
    assert_eq!(p.device, node.paths.dev.join("vda3"));
    assert_eq!(p.size, PARTITION_SECTORS * 512);
    // A second disk with the same layout (an installer stick): the booted disk's wins.
    let sys = node.paths.sys_block.clone();
    let devices = sys.join("../../devices");
    for disk in ["vda", "sdb"] {
        for (n, part) in [("2", "ROOT-A"), ("3", "ROOT-B")] {
            let name = format!("{disk}{n}");
            let real = devices.join(disk).join(&name);
            let dir = sys.join(&name);
            if dir.exists() {
                fs::remove_dir_all(&dir).unwrap();
            }
            write(
                &real.join("uevent"),
                format!("DEVNAME={name}\nPARTNAME={part}\n"),
            );
            write(&real.join("size"), "100\n");
            std::os::unix::fs::symlink(&real, &dir).unwrap();
        }
    }
    // Both disks have ROOT-A too: ambiguous, said with the names.
    let err = facts::find_partition(&node.paths, Slot::B).unwrap_err();
    assert!(err.to_string().contains("sdb3"), "{err}");
    // Only vda has the running slot's partition.
    fs::remove_file(sys.join("sdb2")).unwrap();
    let p = facts::find_partition(&node.paths, Slot::B).unwrap();
    assert_eq!((p.name.as_str(), p.size), ("vda3", 100 * 512));
    fs::remove_dir_all(&sys).unwrap();
    fs::create_dir_all(&sys).unwrap();
    let err = facts::find_partition(&node.paths, Slot::B).unwrap_err();
    assert!(
        err.to_string().contains("ROOT-B of slot b was not found"),
        "{err}"
    );
}
