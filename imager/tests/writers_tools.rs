//! The artefact writers' output, checked by the third-party tools that the image's users
//! and the kernel's own userspace rely on: `unsquashfs`, `veritysetup`, `cpio`.
//! A missing tool fails the test with the Debian package to install.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use keelson_imager::rootfs::Tree;
use keelson_imager::{cpio, squashfs, verity};

/// Run `tool args...`; a missing tool fails with the package that provides it.
fn run(tool: &str, package: &str, args: &[&str]) -> Output {
    match Command::new(tool).args(args).output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run {tool} ({e}): install it with `apt-get install {package}`"),
    }
}

fn run_ok(tool: &str, package: &str, args: &[&str]) -> String {
    let out = run(tool, package, args);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sample_tree() -> Tree {
    let mut t = Tree::new(1_700_000_000);
    t.add_file("sbin/init", 0o755, vec![0x7f; 200_000]).unwrap();
    t.add_file(
        "usr/lib/os-release",
        0o644,
        b"ID=keelson\nVERSION_ID=0.1.0\n".to_vec(),
    )
    .unwrap();
    t.add_symlink("etc/os-release", "../usr/lib/os-release")
        .unwrap();
    t.add_dir("var", 0o755).unwrap();
    t.add_dir("tmp", 0o1777).unwrap();
    let noise: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    t.add_file("usr/lib/blob", 0o644, noise).unwrap();
    t
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn squashfs_is_listed_and_extracted_by_unsquashfs_and_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let tree = sample_tree();
    let image = squashfs::to_vec(&tree, squashfs::SquashfsOptions::default()).unwrap();
    let again = squashfs::to_vec(&sample_tree(), squashfs::SquashfsOptions::default()).unwrap();
    assert_eq!(image, again, "two builds of one tree differ");

    let file = dir.path().join("root.squashfs");
    std::fs::write(&file, &image).unwrap();
    let listing = run_ok("unsquashfs", "squashfs-tools", &["-lln", path_str(&file)]);
    for want in [
        "squashfs-root/sbin/init",
        "squashfs-root/usr/lib/os-release",
        "squashfs-root/etc/os-release -> ../usr/lib/os-release",
        "squashfs-root/var",
    ] {
        assert!(listing.contains(want), "{want} missing from:\n{listing}");
    }
    for line in listing.lines().filter(|l| l.contains("squashfs-root/")) {
        assert!(line.contains(" 0/0 "), "owner not 0/0: {line}");
        if !line.ends_with("squashfs-root") {
            assert!(line.contains("2023-11-14 22:13"), "mtime not ours: {line}");
        }
    }
    assert!(
        listing.contains("drwxrwxrwt 0/0"),
        "sticky /tmp lost:\n{listing}"
    );

    let out = dir.path().join("out");
    run_ok(
        "unsquashfs",
        "squashfs-tools",
        &["-no-xattrs", "-d", path_str(&out), path_str(&file)],
    );
    for (path, entry) in tree.iter() {
        if let Some(data) = tree.file(path) {
            assert_eq!(&std::fs::read(out.join(path)).unwrap(), data, "{path}");
        }
        let _ = entry;
    }
    assert_eq!(
        std::fs::read_link(out.join("etc/os-release")).unwrap(),
        Path::new("../usr/lib/os-release")
    );
}

fn write_image_with_tree(dir: &Path, blocks: usize) -> (std::path::PathBuf, verity::VerityTree) {
    let data: Vec<u8> = (0..blocks * verity::BLOCK_SIZE)
        .map(|i| ((i * 7 + i / 4096) % 253) as u8)
        .collect();
    let salt = verity::derive_salt(&data);
    let uuid = verity::derive_uuid(&salt);
    let tree = verity::build(&data[..], &salt, uuid).unwrap();
    let file = dir.join(format!("root-{blocks}.img"));
    let mut all = data;
    all.extend_from_slice(&tree.bytes);
    std::fs::write(&file, all).unwrap();
    (file, tree)
}

#[test]
fn verity_tree_is_accepted_by_veritysetup() {
    let dir = tempfile::tempdir().unwrap();
    for blocks in [1, 2, 128, 129, 300, 16_500] {
        let (file, tree) = write_image_with_tree(dir.path(), blocks);
        let p = &tree.params;
        let offset = format!("--hash-offset={}", p.hash_offset);
        let f = path_str(&file);
        run_ok(
            "veritysetup",
            "cryptsetup-bin",
            &["verify", f, f, &p.root_hash_hex(), &offset],
        );

        let dump = run_ok("veritysetup", "cryptsetup-bin", &["dump", f, &offset]);
        for want in [
            format!("UUID:            \t{}", p.uuid_string()),
            "Hash type:       \t1".to_string(),
            format!("Data blocks:     \t{blocks}"),
            "Data block size: \t4096".to_string(),
            "Hash block size: \t4096".to_string(),
            "Hash algorithm:  \tsha256".to_string(),
            format!("Salt:            \t{}", p.salt_hex()),
        ] {
            assert!(dump.contains(&want), "{want:?} not in dump:\n{dump}");
        }

        // veritysetup's own tree over the same data has the same root hash and bytes.
        let data_only = dir.path().join(format!("data-{blocks}"));
        let hash_only = dir.path().join(format!("hash-{blocks}"));
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&data_only, &bytes[..p.hash_offset as usize]).unwrap();
        let formatted = run_ok(
            "veritysetup",
            "cryptsetup-bin",
            &[
                "format",
                &format!("--salt={}", p.salt_hex()),
                &format!("--uuid={}", p.uuid_string()),
                path_str(&data_only),
                path_str(&hash_only),
            ],
        );
        assert!(
            formatted.contains(&format!("Root hash:      \t{}", p.root_hash_hex())),
            "{blocks} blocks: veritysetup computed another root hash:\n{formatted}"
        );
        let theirs = std::fs::read(&hash_only).unwrap();
        assert_eq!(
            &theirs[..tree.bytes.len()],
            &tree.bytes[..],
            "{blocks} blocks"
        );
    }
}

#[test]
fn verity_detects_one_flipped_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (file, tree) = write_image_with_tree(dir.path(), 300);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[123_456] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let f = path_str(&file);
    let out = run(
        "veritysetup",
        "cryptsetup-bin",
        &[
            "verify",
            f,
            f,
            &tree.params.root_hash_hex(),
            &format!("--hash-offset={}", tree.params.hash_offset),
        ],
    );
    assert!(!out.status.success(), "verify accepted a corrupted image");
}

#[test]
fn squashfs_plus_verity_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let image = squashfs::to_vec(&sample_tree(), squashfs::SquashfsOptions::default()).unwrap();
    let salt = verity::derive_salt(&image);
    let tree = verity::build(&image[..], &salt, verity::derive_uuid(&salt)).unwrap();
    assert_eq!(tree.params.hash_offset, image.len() as u64);
    let file = dir.path().join("root.img");
    let mut all = image;
    all.extend_from_slice(&tree.bytes);
    std::fs::write(&file, all).unwrap();
    let f = path_str(&file);
    run_ok(
        "veritysetup",
        "cryptsetup-bin",
        &[
            "verify",
            f,
            f,
            &tree.params.root_hash_hex(),
            &format!("--hash-offset={}", tree.params.hash_offset),
        ],
    );
    // unsquashfs still reads the filesystem with the tree appended.
    let listing = run_ok("unsquashfs", "squashfs-tools", &["-l", f]);
    assert!(listing.contains("squashfs-root/sbin/init"), "{listing}");
}

#[test]
fn cpio_is_listed_and_extracted_by_gnu_cpio() {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::new(1_700_000_000);
    tree.add_file("init", 0o755, b"\x7fELF stage1".to_vec())
        .unwrap();
    tree.add_file("modules/order", 0o644, b"dm_mod.ko\n".to_vec())
        .unwrap();
    tree.add_file("modules/dm_mod.ko", 0o644, vec![1, 2, 3])
        .unwrap();
    tree.add_symlink("sbin/init", "../init").unwrap();
    let mut w = cpio::CpioWriter::new(Vec::new(), tree.mtime());
    w.tree(&tree).unwrap();
    w.dir("dev", 0o755).unwrap();
    w.char_device("dev/console", 0o600, 5, 1).unwrap();
    let archive = w.finish().unwrap();
    assert_eq!(archive, {
        let mut w = cpio::CpioWriter::new(Vec::new(), tree.mtime());
        w.tree(&tree).unwrap();
        w.dir("dev", 0o755).unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        w.finish().unwrap()
    });
    let file = dir.path().join("initrd.cpio");
    std::fs::write(&file, &archive).unwrap();

    let out = Command::new("cpio")
        .args(["-itv", "--quiet", "-F", path_str(&file)])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run cpio ({e}): install it with `apt-get install cpio`")
        });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = listing
        .lines()
        .map(|l| {
            let mut words = l.split_whitespace().skip_while(|w| *w != "2023");
            words.nth(1).unwrap_or("")
        })
        .collect();
    assert_eq!(
        names,
        [
            "init",
            "modules",
            "modules/dm_mod.ko",
            "modules/order",
            "sbin",
            "sbin/init",
            "dev",
            "dev/console"
        ],
        "{listing}"
    );
    assert!(
        listing.contains("crw-------   1 root     root       5,   1"),
        "{listing}"
    );
    assert!(listing.contains("sbin/init -> ../init"), "{listing}");

    let extract = dir.path().join("x");
    std::fs::create_dir(&extract).unwrap();
    let out = Command::new("cpio")
        .args([
            "-idm",
            "--quiet",
            "--no-absolute-filenames",
            "-F",
            path_str(&file),
        ])
        .arg("--nonmatching")
        .arg("dev/console")
        .current_dir(&extract)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(extract.join("init")).unwrap(),
        b"\x7fELF stage1"
    );
    assert_eq!(
        std::fs::read(extract.join("modules/order")).unwrap(),
        b"dm_mod.ko\n"
    );
}
