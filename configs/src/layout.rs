//! The on-disk and boot-time contract between the imager (which writes images) and
//! `init` (which boots them): partition names and type GUIDs, the kernel command-line
//! keys that carry a slot's dm-verity parameters, and the paths our binaries live at.
//!
//! This module has no dependencies so that the static `init` can use it as it is.

/// Size of a dm-verity data and hash block, and of our partition alignment unit.
pub const VERITY_BLOCK_SIZE: u64 = 4096;

/// GPT partition alignment: 1 MiB, as every partitioning tool does it.
pub const PARTITION_ALIGN: u64 = 1024 * 1024;

/// The architectures we build images for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// x86-64, booted by OVMF under QEMU.
    Amd64,
    /// AArch64, booted by AAVMF under QEMU.
    Arm64,
}

impl Arch {
    /// Every architecture, in a fixed order.
    pub const ALL: [Arch; 2] = [Arch::Amd64, Arch::Arm64];

    /// Debian's name for the architecture (`amd64`, `arm64`).
    pub fn debian(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The Rust musl target our image binaries are built for.
    pub fn rust_target(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-musl",
            Arch::Arm64 => "aarch64-unknown-linux-musl",
        }
    }

    /// What `uname -m` says on this architecture.
    pub fn uname(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64",
            Arch::Arm64 => "aarch64",
        }
    }

    /// The serial console device the kernel writes to under QEMU and on most boards.
    pub fn console(self) -> &'static str {
        match self {
            Arch::Amd64 => "ttyS0",
            Arch::Arm64 => "ttyAMA0",
        }
    }

    /// The Discoverable Partitions Specification root partition type for this architecture.
    pub fn root_type_guid(self) -> &'static str {
        match self {
            Arch::Amd64 => "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
            Arch::Arm64 => "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
        }
    }

    /// The removable-media path UEFI firmware boots by default (where systemd-boot goes).
    pub fn efi_default_boot_path(self) -> &'static str {
        match self {
            Arch::Amd64 => "EFI/BOOT/BOOTX64.EFI",
            Arch::Arm64 => "EFI/BOOT/BOOTAA64.EFI",
        }
    }

    /// Parse a Debian architecture name.
    pub fn from_debian(name: &str) -> Option<Arch> {
        match name {
            "amd64" => Some(Arch::Amd64),
            "arm64" => Some(Arch::Arm64),
            _ => None,
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.debian())
    }
}

/// An A/B root slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    /// Slot A, partition `ROOT-A`.
    A,
    /// Slot B, partition `ROOT-B`.
    B,
}

impl Slot {
    /// The GPT partition name of this slot's root.
    pub fn partition_name(self) -> &'static str {
        match self {
            Slot::A => PART_ROOT_A,
            Slot::B => PART_ROOT_B,
        }
    }

    /// The lower-case letter used on the kernel command line and in file names.
    pub fn letter(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// Parse `a`/`b` (either case).
    pub fn parse(s: &str) -> Option<Slot> {
        match s {
            "a" | "A" => Some(Slot::A),
            "b" | "B" => Some(Slot::B),
            _ => None,
        }
    }
}

/// GPT partition name of the EFI system partition.
pub const PART_EFI: &str = "EFI";
/// GPT partition name of root slot A.
pub const PART_ROOT_A: &str = "ROOT-A";
/// GPT partition name of root slot B.
pub const PART_ROOT_B: &str = "ROOT-B";
/// GPT partition name of STATE (ext4: machine config, node identity, PKI).
pub const PART_STATE: &str = "STATE";
/// GPT partition name of EPHEMERAL (ext4, rest of the disk: `/var`).
pub const PART_EPHEMERAL: &str = "EPHEMERAL";

/// EFI system partition type GUID.
pub const TYPE_GUID_EFI: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// Generic Linux filesystem data (used for STATE, which has no DPS type of its own).
pub const TYPE_GUID_LINUX_DATA: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
/// DPS `/var` partition type (EPHEMERAL is mounted at `/var`).
pub const TYPE_GUID_VAR: &str = "4D21B016-B534-45C2-A9FB-5C16E091FD2D";

/// Kernel command-line key: the booted slot (`a` or `b`).
pub const CMDLINE_SLOT: &str = "keelson.slot";
/// Kernel command-line key: the dm-verity root hash of the slot's root (hex).
pub const CMDLINE_VERITY_ROOTHASH: &str = "keelson.verity.roothash";
/// Kernel command-line key: the dm-verity salt (hex).
pub const CMDLINE_VERITY_SALT: &str = "keelson.verity.salt";
/// Kernel command-line key: number of 4 KiB data blocks covered by the hash tree.
pub const CMDLINE_VERITY_DATA_BLOCKS: &str = "keelson.verity.data_blocks";
/// Kernel command-line key: byte offset of the verity superblock inside the root
/// partition (the hash tree follows it one block later; `veritysetup --hash-offset`).
pub const CMDLINE_VERITY_HASH_OFFSET: &str = "keelson.verity.hash_offset";
/// Kernel command-line key: `full` (default) reads the whole root through dm-verity
/// before switching to it, so a corrupt root never runs; `lazy` checks blocks on read.
pub const CMDLINE_VERITY_CHECK: &str = "keelson.verity.check";

/// Where stage 1 lives in the initramfs (the kernel runs `/init`).
pub const INITRAMFS_INIT: &str = "init";
/// Directory of the initramfs that holds the kernel modules stage 1 loads (flat `*.ko`).
pub const INITRAMFS_MODULES_DIR: &str = "modules";
/// Text file in the initramfs: one module file name per line, in load order
/// (dependencies first). Stage 1 loads them in this order and skips ones already loaded.
pub const INITRAMFS_MODULES_ORDER: &str = "modules/order";
/// Text file in the initramfs, in the order file's format: the modules stage 2 needs
/// first (its filesystems), which stage 1 loads while it reads the root through
/// dm-verity, so that stage 2 finds them loaded. Their files sit beside the others.
pub const INITRAMFS_MODULES_PRELOAD: &str = "modules/preload";
/// Text file in the root filesystem: the files stage 2 reads into the page cache first
/// (absolute paths, one a line: each early program after the shared objects it loads).
pub const PREFETCH_LIST: &str = "usr/lib/keelson/prefetch";
/// Where stage 2 lives in the root filesystem.
pub const ROOT_INIT: &str = "sbin/init";
/// The argument stage 1 passes when it execs stage 2 after switch_root.
pub const STAGE2_ARG: &str = "--stage2";
/// Where the read-only root is mounted by stage 1 before switch_root.
pub const SYSROOT: &str = "/sysroot";
/// The file in the root filesystem that names the OS and its version.
pub const OS_RELEASE: &str = "usr/lib/os-release";

/// Where STATE (ext4) is mounted on a running node.
pub const STATE_MOUNT: &str = "/system/state";
/// Where EPHEMERAL (ext4) is mounted on a running node.
pub const EPHEMERAL_MOUNT: &str = "/var";
/// The last applied machine config, inside STATE.
pub const STATE_CONFIG: &str = "config.toml";
/// A config staged for the next boot (`apply-config --mode staged`), inside STATE.
pub const STATE_CONFIG_STAGED: &str = "config.staged.toml";
/// The QEMU `fw_cfg` entry a machine config is given in (`-fw_cfg name=...,file=...`);
/// the guest reads it from `/sys/firmware/qemu_fw_cfg/by_name/<name>/raw`.
pub const FW_CFG_CONFIG: &str = "opt/keelson/config";
/// Kernel command-line key: a URL to fetch the machine config from.
pub const CMDLINE_CONFIG_URL: &str = "keelson.config";
/// Kernel command-line key: the sha256 (64 hex digits) that the config fetched from
/// [`CMDLINE_CONFIG_URL`] must have, pinning a plain-HTTP config.
pub const CMDLINE_CONFIG_SHA256: &str = "keelson.config.sha256";
/// Kernel command-line key: the CA that an `https://` [`CMDLINE_CONFIG_URL`]'s server
/// certificate must be signed by, instead of the public roots (the certificate in base64,
/// or the path of a PEM file; see init's `config_source::tls`).
pub const CMDLINE_CONFIG_CA: &str = "keelson.config.ca";
/// The TCP port of the node API (machined), as Talos uses 50000.
pub const API_PORT: u16 = 50000;

/// Where a control plane keeps the cluster's certificates and keys, as kubeadm does.
pub const KUBERNETES_PKI_DIR: &str = "/etc/kubernetes/pki";
/// etcd's data directory, on EPHEMERAL.
pub const ETCD_DATA_DIR: &str = "/var/lib/etcd";
/// The TCP port etcd serves its clients on.
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// The TCP port etcd members talk to each other on.
pub const ETCD_PEER_PORT: u16 = 2380;

/// The systemd-boot loader entry file name for a slot, with a boot counter when
/// `tries_left` is given (`keelson-a+3-0.conf`), following the Boot Loader Specification.
pub fn loader_entry_name(slot: Slot, tries_left: Option<u32>) -> String {
    match tries_left {
        Some(n) => format!("keelson-{}+{}-0.conf", slot.letter(), n),
        None => format!("keelson-{}.conf", slot.letter()),
    }
}

/// Parse a kernel command line into `key=value` pairs (bare flags get an empty value).
/// Quoted values (`key="a b"`) keep their spaces.
pub fn parse_cmdline(cmdline: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_quotes = false;
    let mut push = |word: &mut String| {
        if !word.is_empty() {
            let (k, v) = match word.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (word.clone(), String::new()),
            };
            out.push((k, v));
            word.clear();
        }
    };
    for c in cmdline.chars() {
        match c {
            '"' => in_quotes = !in_quotes,
            c if c.is_whitespace() && !in_quotes => push(&mut word),
            c => word.push(c),
        }
    }
    push(&mut word);
    out
}

/// The last value of `key` on a kernel command line, as the kernel itself treats repeats.
pub fn cmdline_value<'a>(args: &'a [(String, String)], key: &str) -> Option<&'a str> {
    args.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_parses_keys_flags_and_quotes() {
        let args = parse_cmdline("console=ttyS0 quiet keelson.slot=a x=\"a b\" keelson.slot=b\n");
        assert_eq!(cmdline_value(&args, "console"), Some("ttyS0"));
        assert_eq!(cmdline_value(&args, "quiet"), Some(""));
        assert_eq!(cmdline_value(&args, "x"), Some("a b"));
        assert_eq!(cmdline_value(&args, CMDLINE_SLOT), Some("b"));
        assert_eq!(cmdline_value(&args, "missing"), None);
    }

    #[test]
    fn loader_entries_carry_boot_counters() {
        assert_eq!(loader_entry_name(Slot::A, Some(3)), "keelson-a+3-0.conf");
        assert_eq!(loader_entry_name(Slot::B, None), "keelson-b.conf");
    }
}
