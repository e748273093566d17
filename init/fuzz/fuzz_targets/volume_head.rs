//! Feeds arbitrary bytes, as the first bytes of a block device, to PID 1's sniffers of
//! what a device holds: the config-drive label reader
//! (`keelson_init::config_source::volume_label`: vfat or iso9660, and the label) and
//! the ext4 superblock reader (`keelson_init::disks::ext4::parse`). Any disk attached to
//! the node, a config drive included, is read by them at boot.
//!
//! Input: the first byte chooses where the rest goes. Even: at the device's start (FAT's
//! boot sector, ext4's superblock at 1024). Odd: at 32 KiB, after zeros, where ISO 9660's
//! volume descriptors start, which the fuzzer's input length limit would not reach.
//!
//! Properties: nothing panics; a label has no trailing padding; an ext4 block size is a
//! power of two from 1 KiB to 64 KiB.

#![no_main]

use keelson_init::config_source::{LABEL_PROBE, drive_config_file, volume_label};
use keelson_init::disks::ext4;
use libfuzzer_sys::fuzz_target;

/// Where ISO 9660's first volume descriptor lies (sector 16 of 2048 bytes).
const ISO_DESCRIPTORS: usize = 0x8000;

fuzz_target!(|data: &[u8]| {
    let Some((&place, rest)) = data.split_first() else {
        return;
    };
    let head = if place % 2 == 0 {
        rest.to_vec()
    } else {
        let mut head = vec![0u8; ISO_DESCRIPTORS];
        head.extend_from_slice(rest);
        head
    };
    // PID 1 reads at most this much to find a label.
    let head = &head[..head.len().min(LABEL_PROBE)];
    if let Some((_, label)) = volume_label(head) {
        assert!(!label.ends_with([' ', '\0']), "{label:?}");
        let _ = drive_config_file(&label);
    }
    if let Some(sb) = ext4::parse(head) {
        assert!(sb.block_size.is_power_of_two());
        assert!((1024..=64 * 1024).contains(&sb.block_size));
        let _ = sb.size();
    }
});
