//! The kubelet stand-in (`tests/kubelet-standin`), built for a guest's architecture: the
//! binary a test serves and pins in the kubelet's place. It is not a kubelet: it
//! exercises the node's fetch, verify, supervise and restart path, and records how it was
//! started (argv, config files, starts) under `/var/lib/kubelet/standin/` on the node.
//!
//! Test support panics on failure, as the tests that use it do.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use crate::{Arch, workspace_root};

/// Where the stand-in keeps its records on the node.
pub const RECORD_DIR: &str = "/var/lib/kubelet/standin";

/// The stand-in's package and binary.
const PACKAGE: &str = "keelson-kubelet-standin";
const BIN: &str = "kubelet-standin";

/// Build the stand-in as a static musl binary for `arch` (once per test process) and
/// return its path.
pub fn build(arch: Arch) -> PathBuf {
    static BUILT: [OnceLock<PathBuf>; 2] = [OnceLock::new(), OnceLock::new()];
    let slot = match arch {
        Arch::Amd64 => &BUILT[0],
        Arch::Arm64 => &BUILT[1],
    };
    slot.get_or_init(|| build_now(arch)).clone()
}

fn build_now(arch: Arch) -> PathBuf {
    let target = arch.rust_target();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "--quiet", "--package", PACKAGE, "--bin", BIN])
        .args(["--release", "--target", target])
        .status()
        .expect("starting cargo to build the kubelet stand-in");
    assert!(
        status.success(),
        "building the kubelet stand-in for {target} failed ({status}); the target comes \
         from `cargo xtask test` (rustup target add {target})"
    );
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let binary = target_dir.join(target).join("release").join(BIN);
    assert!(
        binary.is_file(),
        "no kubelet stand-in at {} after building it",
        binary.display()
    );
    binary
}

/// The sha256 of the file at `path`, in lowercase hex (as a config pins a kubelet).
pub fn sha256_hex(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    hex::encode(Sha256::digest(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_static_binary_once() {
        let binary = build(Arch::Arm64);
        assert_eq!(build(Arch::Arm64), binary);
        let elf = std::fs::read(&binary).unwrap();
        // ELF, 64-bit, machine EM_AARCH64 (183).
        assert_eq!(&elf[..5], b"\x7fELF\x02");
        assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 183);
        assert_eq!(sha256_hex(&binary).len(), 64);
    }
}
