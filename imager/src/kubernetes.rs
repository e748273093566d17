//! An air-gapped Kubernetes baked into an image's root (`cargo xtask image --kubernetes
//! DIR`), for nodes that reach neither the upstream release site nor a registry: the
//! kubelet at [`IMAGE_BINARY`] (mode 0755), which the node then runs instead of fetching
//! one, and the control-plane images as OCI archives under [`IMAGE_ARCHIVES_DIR`] (mode
//! 0644), which it imports before any pull.
//!
//! The directory holds `kubelet` (required: the binary for the image's architecture) and
//! `images/*.tar` (optional; other files there are not baked in). Each baked file is
//! recorded, with its sha256, in the build's `build-inputs.toml`.

use std::path::{Path, PathBuf};

use keelson_configs::layout::Arch;
use keelson_node_protocol::kubelet::{IMAGE_ARCHIVES_DIR, IMAGE_BINARY};
use sha2::{Digest, Sha256};

use crate::rootfs::{RootfsError, Tree};

/// What the directory must hold, for the errors that find it does not.
const EXPECTED: &str = "DIR/kubelet (the kubelet binary for the image's architecture) and, \
                        optionally, DIR/images/*.tar (control-plane images as OCI archives)";

/// Errors reading the directory of an air-gapped Kubernetes.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    /// The directory has no kubelet.
    #[error("{} does not exist: --kubernetes DIR expects {EXPECTED}", .path.display())]
    NoKubelet {
        /// The missing file.
        path: PathBuf,
    },
    /// The kubelet is not a 64-bit Linux executable for the image's architecture.
    #[error(
        "{} is not a kubelet for {arch}: it is {found}; put the kubelet of the \
         release site's bin/linux/{arch}/ there (one directory per architecture)",
        .path.display()
    )]
    WrongBinary {
        /// The kubelet.
        path: PathBuf,
        /// The image's architecture.
        arch: Arch,
        /// What the file is.
        found: String,
    },
    /// A file could not be read.
    #[error("reading {} (--kubernetes DIR expects {EXPECTED})", .path.display())]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// One file baked into the root, as the build records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BakedFile {
    /// Where it was read from.
    pub source: PathBuf,
    /// Its path in the root filesystem.
    pub path: String,
    /// Its permission bits there (recorded in octal: `"0755"`).
    #[serde(with = "octal")]
    pub mode: u32,
    /// The sha256 of its contents, in lowercase hex.
    pub sha256: String,
}

/// Permission bits as an octal string, as people read them.
mod octal {
    pub fn serialize<S: serde::Serializer>(mode: &u32, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{mode:04o}"))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(deserializer)?;
        u32::from_str_radix(&text, 8)
            .map_err(|e| serde::de::Error::custom(format!("mode {text:?} is not octal: {e}")))
    }
}

/// The files of `dir` to bake into an image for `arch`, with their contents: the kubelet
/// first, then the archives by name.
pub fn read(dir: &Path, arch: Arch) -> Result<Vec<(BakedFile, Vec<u8>)>, KubernetesError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KubernetesError::Read { path, source }
    };
    let kubelet = dir.join("kubelet");
    if !kubelet.is_file() {
        return Err(KubernetesError::NoKubelet { path: kubelet });
    }
    let data = std::fs::read(&kubelet).map_err(read_err(&kubelet))?;
    check_binary(&kubelet, &data, arch)?;
    let mut files = vec![baked(kubelet, IMAGE_BINARY.to_string(), 0o755, data)];

    let images = dir.join("images");
    if images.exists() {
        let mut archives = Vec::new();
        for entry in std::fs::read_dir(&images).map_err(read_err(&images))? {
            let path = entry.map_err(read_err(&images))?.path();
            if path.extension().is_some_and(|e| e == "tar") && path.is_file() {
                archives.push(path);
            }
        }
        archives.sort();
        for archive in archives {
            let Some(name) = archive.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let dest = format!("{IMAGE_ARCHIVES_DIR}/{name}");
            let data = std::fs::read(&archive).map_err(read_err(&archive))?;
            files.push(baked(archive, dest, 0o644, data));
        }
    }
    Ok(files)
}

fn baked(source: PathBuf, path: String, mode: u32, data: Vec<u8>) -> (BakedFile, Vec<u8>) {
    let sha256 = hex::encode(Sha256::digest(&data));
    let file = BakedFile {
        source,
        path,
        mode,
        sha256,
    };
    (file, data)
}

/// Refuse a kubelet that is not a 64-bit little-endian ELF file for `arch` (the classic
/// mistake: the other architecture's download).
fn check_binary(path: &Path, data: &[u8], arch: Arch) -> Result<(), KubernetesError> {
    const EM_X86_64: u16 = 62;
    const EM_AARCH64: u16 = 183;
    let expected = match arch {
        Arch::Amd64 => EM_X86_64,
        Arch::Arm64 => EM_AARCH64,
    };
    let found = if data.len() < 20 || &data[..4] != b"\x7fELF" {
        "not an ELF executable".to_string()
    } else if data[4] != 2 || data[5] != 1 {
        "not a 64-bit little-endian ELF file".to_string()
    } else {
        match u16::from_le_bytes([data[18], data[19]]) {
            machine if machine == expected => return Ok(()),
            EM_X86_64 => "an ELF file for amd64".to_string(),
            EM_AARCH64 => "an ELF file for arm64".to_string(),
            machine => format!("an ELF file for machine {machine}"),
        }
    };
    Err(KubernetesError::WrongBinary {
        path: path.to_path_buf(),
        arch,
        found,
    })
}

/// Add `files` (from [`read`]) to the root `tree`, returning what was baked in.
pub fn add_to_tree(
    tree: &mut Tree,
    files: Vec<(BakedFile, Vec<u8>)>,
) -> Result<Vec<BakedFile>, RootfsError> {
    let mut baked = Vec::with_capacity(files.len());
    for (file, data) in files {
        tree.add_file(&file.path, file.mode, data)?;
        baked.push(file);
    }
    Ok(baked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(machine: u16) -> Vec<u8> {
        let mut data = b"\x7fELF\x02\x01\x01".to_vec();
        data.resize(18, 0);
        data.extend_from_slice(&machine.to_le_bytes());
        data.resize(64, 0);
        data
    }

    #[test]
    fn modes_are_recorded_in_octal() {
        let file = BakedFile {
            source: "DIR/kubelet".into(),
            path: IMAGE_BINARY.into(),
            mode: 0o755,
            sha256: "00".into(),
        };
        let text = toml::to_string(&file).unwrap();
        assert!(text.contains("mode = \"0755\""), "{text}");
        assert_eq!(toml::from_str::<BakedFile>(&text).unwrap(), file);
    }

    #[test]
    fn a_kubelet_for_another_architecture_is_refused() {
        let path = Path::new("DIR/kubelet");
        assert!(check_binary(path, &elf(62), Arch::Amd64).is_ok());
        assert!(check_binary(path, &elf(183), Arch::Arm64).is_ok());
        let refusal = |data: &[u8], arch| check_binary(path, data, arch).unwrap_err().to_string();
        assert!(
            refusal(&elf(183), Arch::Amd64)
                .contains("is not a kubelet for amd64: it is an ELF file for arm64"),
            "{}",
            refusal(&elf(183), Arch::Amd64)
        );
        assert!(refusal(b"#!/bin/sh\n", Arch::Arm64).contains("not an ELF executable"));
    }
}
