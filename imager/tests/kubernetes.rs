//! An air-gapped Kubernetes baked into the root (`cargo xtask image --kubernetes DIR`):
//! the kubelet and the OCI archives land at the node protocol's paths with their modes,
//! as squashfs-tools' `unsquashfs` reads them back from the written root filesystem; a
//! directory without a kubelet, or with another architecture's, is refused by the build
//! before anything is downloaded, saying what is expected.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use keelson_configs::layout::Arch;
use keelson_imager::build::{self, BuildError, BuildOptions};
use keelson_imager::debian::fetch::Cache;
use keelson_imager::kubernetes::{self, KubernetesError};
use keelson_imager::rootfs::Tree;
use keelson_imager::squashfs;
use keelson_node_protocol::kubelet::{IMAGE_ARCHIVES_DIR, IMAGE_BINARY};
use sha2::{Digest, Sha256};

/// The start of a 64-bit little-endian ELF file for `arch`, padded.
fn elf(arch: Arch) -> Vec<u8> {
    let machine: u16 = match arch {
        Arch::Amd64 => 62,
        Arch::Arm64 => 183,
    };
    let mut data = b"\x7fELF\x02\x01\x01".to_vec();
    data.resize(18, 0);
    data.extend_from_slice(&machine.to_le_bytes());
    data.resize(4096, 0x90);
    data
}

/// A `--kubernetes` directory: a kubelet for `arch`, two archives and a file that is not
/// an archive.
fn kubernetes_dir(arch: Arch) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kubelet"), elf(arch)).unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    std::fs::write(images.join("pause.tar"), b"pause archive").unwrap();
    std::fs::write(images.join("kube-apiserver.tar"), b"apiserver archive").unwrap();
    std::fs::write(images.join("SHA256SUMS"), b"not an archive").unwrap();
    dir
}

fn unsquashfs(args: &[&str]) -> String {
    let out = Command::new("unsquashfs")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run unsquashfs ({e}): install it with `apt-get install squashfs-tools`")
        });
    assert!(
        out.status.success(),
        "unsquashfs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_kubelet_and_the_archives_land_at_their_paths_with_their_modes() {
    let dir = kubernetes_dir(Arch::Amd64);
    let files = kubernetes::read(dir.path(), Arch::Amd64).unwrap();
    let mut tree = Tree::new(1_700_000_000);
    let baked = kubernetes::add_to_tree(&mut tree, files).unwrap();

    let archive = |name: &str| format!("{IMAGE_ARCHIVES_DIR}/{name}");
    let paths: Vec<&str> = baked.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            IMAGE_BINARY.to_string(),
            archive("kube-apiserver.tar"),
            archive("pause.tar")
        ]
    );
    assert_eq!(baked[0].source, dir.path().join("kubelet"));
    assert_eq!(
        baked[0].sha256,
        hex::encode(Sha256::digest(elf(Arch::Amd64)))
    );
    assert_eq!(
        baked[2].sha256,
        hex::encode(Sha256::digest(b"pause archive"))
    );

    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path().join("root.squashfs");
    let image = squashfs::to_vec(&tree, squashfs::SquashfsOptions::default()).unwrap();
    std::fs::write(&root, image).unwrap();
    let root = root.to_str().unwrap();
    let listing = unsquashfs(&["-lln", root]);
    let mode_of = |path: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!("squashfs-root{path}")))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("{path} is not in the root:\n{listing}"))
            .to_owned()
    };
    assert_eq!(mode_of(IMAGE_BINARY), "-rwxr-xr-x");
    assert_eq!(mode_of(&archive("pause.tar")), "-rw-r--r--");
    assert_eq!(mode_of(&archive("kube-apiserver.tar")), "-rw-r--r--");
    assert!(!listing.contains("SHA256SUMS"), "{listing}");
    assert_eq!(
        unsquashfs(&["-cat", root, &archive("kube-apiserver.tar")]),
        "apiserver archive"
    );
}

/// The build's options for the repository's definition, with an empty package cache:
/// a build that gets past reading the Kubernetes directory fails on the first download.
fn options(arch: Arch, kubernetes: &Path, scratch: &Path) -> BuildOptions {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    BuildOptions {
        definition: workspace.join("images/keelson.toml"),
        arch,
        binaries: Default::default(),
        out_dir: scratch.join("out"),
        formats: Vec::new(),
        mirror: None,
        cache: Cache::new(scratch.join("cache")),
        version: "0.0.0".into(),
        reuse_derived: false,
        kubernetes: Some(kubernetes.to_path_buf()),
        trusted_keys: Default::default(),
    }
}

fn refusal(arch: Arch, kubernetes: &Path) -> String {
    let scratch = tempfile::tempdir().unwrap();
    let error = build::build(&options(arch, kubernetes, scratch.path()), &|_| {}).unwrap_err();
    assert!(
        matches!(error, BuildError::Kubernetes(_)),
        "not refused for its Kubernetes directory: {error}"
    );
    assert!(!scratch.path().join("cache").exists() || is_empty(&scratch.path().join("cache")));
    error.to_string()
}

fn is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

#[test]
fn a_directory_without_a_kubelet_is_refused_saying_what_is_expected() {
    let dir = kubernetes_dir(Arch::Amd64);
    std::fs::remove_file(dir.path().join("kubelet")).unwrap();
    let message = refusal(Arch::Amd64, dir.path());
    assert!(
        message.contains(&format!(
            "{} does not exist",
            dir.path().join("kubelet").display()
        )) && message.contains("expects DIR/kubelet")
            && message.contains("DIR/images/*.tar"),
        "{message}"
    );
    let error = kubernetes::read(Path::new("/nonexistent/k8s"), Arch::Arm64).unwrap_err();
    assert!(
        matches!(error, KubernetesError::NoKubelet { .. }),
        "{error}"
    );
}

#[test]
fn another_architectures_kubelet_is_refused() {
    let dir = kubernetes_dir(Arch::Amd64);
    let message = refusal(Arch::Arm64, dir.path());
    assert!(
        message.contains("is not a kubelet for arm64: it is an ELF file for amd64"),
        "{message}"
    );
}
