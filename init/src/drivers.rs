//! The kernel modules stage 2 loads by name, in the groups it loads them: a leaf that
//! stage 2 (which loads them) and `config_source` (which looks for config drives behind
//! the disk drivers) both read.

/// Modules loaded before the disks and the config are read: the filesystems of STATE,
/// EPHEMERAL and efivars, and fw_cfg. Missing ones are logged (a kernel that has them
/// built in, or a platform without fw_cfg, is fine). A config drive's filesystem is
/// loaded when one is found (`config_source::DriveFs::modules`).
pub const EARLY_MODULES: &[&str] = &["efivarfs", "ext4", "qemu_fw_cfg"];

/// The power button's modules, loaded with the network drivers once containerd is ready
/// (or before the node waits for a config), first, then watched: under TCG they took
/// 0.25 s of the CPU containerd's start needed. A press before they are loaded is lost.
/// The ACPI button (`button`) on amd64; on arm64 QEMU's `virt` wires it as a GPIO key
/// (`gpio_keys`).
#[cfg(not(target_arch = "aarch64"))]
pub const POWER_BUTTON_MODULES: &[&str] = &["button", "evdev"];
/// See the amd64 list.
#[cfg(target_arch = "aarch64")]
pub const POWER_BUTTON_MODULES: &[&str] = &["button", "gpio_keys", "evdev"];

/// The network drivers: loaded once containerd is ready (or stage 2's
/// `NETWORK_MODULES_AFTER` has passed), beside nothing else that the boot waits for, and
/// at once when the node has no config (its URL and maintenance mode need the network).
/// Under TCG they took 0.35 s of CPU that containerd's start needed; the kubelet, the
/// first service that uses the network, starts only after containerd is ready, and
/// netconf configures a link whenever it appears. There is no udev: drivers for the
/// hardware of other platforms join this list (or a modalias coldplug replaces it).
pub const NETWORK_MODULES: &[&str] = &["virtio_net"];

/// The disk drivers past the root chain (`[modules] initramfs` in the image definition):
/// stage 1 leaves them to stage 2 when the root chain alone found the root (virtio), and
/// stage 2 loads them from the root with the network drivers, probing in the background
/// ([`crate::modules::ASYNC_PROBE`]), or before it looks for config drives, which may sit
/// behind them. The boot disk (STATE, EPHEMERAL) is the root's, so nothing before the
/// services needs them.
pub const DISK_MODULES: &[&str] = &["ahci", "nvme", "virtio_scsi", "sd_mod"];
