//! Feeds arbitrary bytes, as the boot disk's first and last sectors, to PID 1's reader of
//! the GPT (`keelson_init::disks::table::read_layout`, over the `gpt` crate) and to the
//! first boot's plan for it (`table::plan`: where the backup header, STATE and EPHEMERAL
//! go). A damaged or foreign table must be refused, never a panic: PID 1 reads it on
//! every boot, before anything else is mounted.
//!
//! Input: a control byte, then the disk's first sectors (512 bytes each). Control bits:
//! 0, the primary header's CRC is made right (the fuzzer cannot find CRCs); 1, so is the
//! backup header's (the disk's last sector); 4..=7, `n`: the disk grows by `n` x 16 MiB
//! of zeros, and the input's last sector moves to the new end, where the backup header
//! is read (so that STATE and EPHEMERAL can fit and the plan runs past its first checks).
//!
//! Properties: nothing panics; a plan creates and grows partitions only between the
//! first and the last usable sector.

#![no_main]

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::OnceLock;

use keelson_init::disks::table::{plan, read_layout};
use libfuzzer_sys::fuzz_target;

const SECTOR: usize = 512;
/// The bytes of a GPT header that its CRC covers (what the `gpt` crate checks).
const HEADER: usize = 92;
const GROWTH: u64 = 16 << 20;
const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// The disk: an unlinked temporary file, reopened by its /proc/self/fd path (nothing is
/// left behind when the fuzzer exits).
fn disk() -> Option<&'static (File, PathBuf)> {
    static DISK: OnceLock<Option<(File, PathBuf)>> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("keelson-fuzz-gpt-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .ok()?;
        std::fs::remove_file(&path).ok()?;
        let proc_path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        Some((file, proc_path))
    })
    .as_ref()
}

/// Set the CRC of the header at `at` in `image`, if the image holds one there.
fn fix_crc(image: &mut [u8], at: usize) {
    let Some(header) = image.get_mut(at..at + HEADER) else {
        return;
    };
    header[16..20].fill(0);
    let crc = CRC.checksum(header);
    header[16..20].copy_from_slice(&crc.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Some((file, path)) = disk() else { return };
    let Some((&control, image)) = data.split_first() else {
        return;
    };
    let mut image = image.to_vec();
    let growth = u64::from(control >> 4) * GROWTH;
    // The input's last whole sector is the disk's last, when the disk grows.
    let last_at = (image.len() / SECTOR).saturating_sub(1) * SECTOR;
    let last = if growth > 0 && image.len() >= 2 * SECTOR {
        let last = image[last_at..last_at + SECTOR].to_vec();
        image.truncate(last_at);
        Some(last)
    } else {
        None
    };
    if control & 1 != 0 {
        fix_crc(&mut image, SECTOR);
    }
    let mut last = last;
    if control & 2 != 0 {
        match &mut last {
            Some(sector) => fix_crc(sector, 0),
            None => fix_crc(&mut image, last_at),
        }
    }
    let size = image.len() as u64 + growth + last.as_ref().map_or(0, |s| s.len() as u64);
    let written = file
        .set_len(0)
        .and_then(|()| file.write_all_at(&image, 0))
        .and_then(|()| file.set_len(size))
        .and_then(|()| match &last {
            Some(sector) => file.write_all_at(sector, size - SECTOR as u64),
            None => Ok(()),
        })
        .and_then(|()| (&*file).flush());
    if written.is_err() {
        return;
    }
    let Ok(layout) = read_layout(path, SECTOR as u64) else {
        return;
    };
    let Ok(plan) = plan(&layout, "/dev/fuzz") else {
        return;
    };
    let usable = layout.first_usable..=layout.last_usable();
    for part in &plan.create {
        assert!(part.first_lba <= part.last_lba, "{plan:?}");
        assert!(usable.contains(&part.first_lba), "{layout:?} {plan:?}");
        assert!(usable.contains(&part.last_lba), "{layout:?} {plan:?}");
    }
    if let Some(grow) = &plan.grow {
        assert!(grow.new_last > grow.old_last, "{plan:?}");
        assert!(usable.contains(&grow.new_last), "{layout:?} {plan:?}");
    }
});
