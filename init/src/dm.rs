//! Device-mapper through its ioctls on `/dev/mapper/control`, and the dm-verity table.
//!
//! We write `struct dm_ioctl` and `struct dm_target_spec` by hand, as
//! `include/uapi/linux/dm-ioctl.h` lays them out, instead of using the `devicemapper`
//! crate: that crate links libdevmapper and needs libclang to build, which a static musl
//! PID 1 cross-compiled for two architectures cannot afford, and stage 1 needs only four
//! ioctls (`DM_VERSION`, `DM_DEV_CREATE`, `DM_TABLE_LOAD`, `DM_DEV_SUSPEND`). The structs
//! are encoded field by field at their `offset_of!` offsets into a plain byte buffer (no
//! transmutes), and unit tests pin their sizes and offsets to the header's.
//!
//! Buffer layout of a table load (all offsets from the start of the buffer):
//!
//! ```text
//! 0    struct dm_ioctl   (312 bytes; data_start = 312, data_size = whole buffer)
//! 312  struct dm_target_spec (40 bytes; next = 40 + params rounded up to 8)
//! 352  params, NUL-terminated, padded with NULs to an 8-byte boundary
//! ```

use std::io;
use std::mem::offset_of;
use std::path::Path;

use crate::syscalls::{Syscalls, errno_name};

pub use crate::dm_abi::{
    CMD_DEV_CREATE, CMD_DEV_SUSPEND, CMD_TABLE_LOAD, CMD_VERSION, DM_IOCTL_SIZE, DM_IOCTL_TYPE,
    DM_MAX_TYPE_NAME, DM_NAME_LEN, DM_READONLY_FLAG, DM_TARGET_SPEC_SIZE, DM_UUID_LEN, DM_VERSION,
    DmIoctl, DmTargetSpec, opcode,
};

/// Errors of device-mapper setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A name, UUID or target type does not fit its fixed-size field.
    #[error("device-mapper {field} {value:?} is too long (at most {max} bytes)")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// The value.
        value: String,
        /// The field's capacity without the NUL.
        max: usize,
    },
    /// An ioctl failed.
    #[error(
        "device-mapper ioctl {ioctl} on {control} failed with {errno}{hint}",
        errno = errno_name(source),
        hint = ioctl_hint(source)
    )]
    Ioctl {
        /// `DM_VERSION`, `DM_DEV_CREATE`...
        ioctl: &'static str,
        /// The control node.
        control: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The kernel speaks another major version of the interface.
    #[error("the kernel's device-mapper interface is version {0}.{1}.{2}; we speak 4.x")]
    Version(u32, u32, u32),
}

fn ioctl_hint(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(2) => ": /dev/mapper/control is missing (is dm_mod loaded?)",
        Some(6) | Some(19) => ": device-mapper is not in this kernel (is dm_mod loaded?)",
        Some(22) => {
            ": the kernel rejected the table (is dm_verity loaded? do the verity parameters match the partition? see the kernel log)"
        }
        Some(16) => ": a device of that name already exists",
        _ => "",
    }
}

/// Copy `value` into a NUL-terminated fixed-size field.
fn put_str(field: &'static str, dst: &mut [u8], value: &str) -> Result<(), Error> {
    let bytes = value.as_bytes();
    if bytes.len() >= dst.len() {
        return Err(Error::TooLong {
            field,
            value: value.to_string(),
            max: dst.len() - 1,
        });
    }
    dst[..bytes.len()].copy_from_slice(bytes);
    dst[bytes.len()..].fill(0);
    Ok(())
}

fn put(buf: &mut [u8], offset: usize, bytes: &[u8]) {
    buf[offset..offset + bytes.len()].copy_from_slice(bytes);
}

fn get_u32(buf: &[u8], offset: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[offset..offset + 4]);
    u32::from_ne_bytes(b)
}

fn get_u64(buf: &[u8], offset: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[offset..offset + 8]);
    u64::from_ne_bytes(b)
}

/// Round up to the next multiple of 8 (`dm_target_spec`s are 8-byte aligned).
pub const fn align8(n: usize) -> usize {
    (n + 7) & !7
}

impl DmIoctl {
    /// A header for device `name` with the given flags; sizes are filled in by [`encode`].
    pub fn new(name: &str, uuid: &str, flags: u32) -> Result<DmIoctl, Error> {
        let mut header = DmIoctl {
            version: DM_VERSION,
            data_size: 0,
            data_start: DM_IOCTL_SIZE as u32,
            target_count: 0,
            open_count: 0,
            flags,
            event_nr: 0,
            padding: 0,
            dev: 0,
            name: [0; DM_NAME_LEN],
            uuid: [0; DM_UUID_LEN],
            data: [0; 7],
        };
        put_str("name", &mut header.name, name)?;
        put_str("uuid", &mut header.uuid, uuid)?;
        Ok(header)
    }

    /// Write this header at the start of `buf` (which must be at least 312 bytes).
    fn write(&self, buf: &mut [u8]) {
        for (i, v) in self.version.iter().enumerate() {
            put(buf, offset_of!(DmIoctl, version) + 4 * i, &v.to_ne_bytes());
        }
        put(
            buf,
            offset_of!(DmIoctl, data_size),
            &self.data_size.to_ne_bytes(),
        );
        put(
            buf,
            offset_of!(DmIoctl, data_start),
            &self.data_start.to_ne_bytes(),
        );
        put(
            buf,
            offset_of!(DmIoctl, target_count),
            &self.target_count.to_ne_bytes(),
        );
        put(
            buf,
            offset_of!(DmIoctl, open_count),
            &self.open_count.to_ne_bytes(),
        );
        put(buf, offset_of!(DmIoctl, flags), &self.flags.to_ne_bytes());
        put(
            buf,
            offset_of!(DmIoctl, event_nr),
            &self.event_nr.to_ne_bytes(),
        );
        put(
            buf,
            offset_of!(DmIoctl, padding),
            &self.padding.to_ne_bytes(),
        );
        put(buf, offset_of!(DmIoctl, dev), &self.dev.to_ne_bytes());
        put(buf, offset_of!(DmIoctl, name), &self.name);
        put(buf, offset_of!(DmIoctl, uuid), &self.uuid);
        put(buf, offset_of!(DmIoctl, data), &self.data);
    }
}

/// What the kernel wrote back into a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// The kernel's interface version.
    pub version: [u32; 3],
    /// `DM_*_FLAG` bits.
    pub flags: u32,
    /// The device number, decoded (major, minor).
    pub dev: (u32, u32),
}

/// Decode the header the kernel wrote back.
pub fn decode(buf: &[u8]) -> Answer {
    let v = offset_of!(DmIoctl, version);
    let dev = get_u64(buf, offset_of!(DmIoctl, dev));
    Answer {
        version: [get_u32(buf, v), get_u32(buf, v + 4), get_u32(buf, v + 8)],
        flags: get_u32(buf, offset_of!(DmIoctl, flags)),
        dev: decode_dev(dev),
    }
}

/// The kernel's `huge_encode_dev` (`new_encode_dev`) device number, split.
pub fn decode_dev(dev: u64) -> (u32, u32) {
    let dev = dev as u32;
    let major = (dev & 0xfff00) >> 8;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    (major, minor)
}

/// One target of a table: `length` sectors from `sector_start`, of `target_type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// First sector.
    pub sector_start: u64,
    /// Number of 512-byte sectors.
    pub length: u64,
    /// `verity`, `linear`...
    pub target_type: String,
    /// The target's parameter string.
    pub params: String,
}

/// Encode a command buffer: `header` followed by `targets` (empty except for table load).
pub fn encode(header: &DmIoctl, targets: &[Target]) -> Result<Vec<u8>, Error> {
    let mut specs = Vec::new();
    for target in targets {
        let mut type_name = [0u8; DM_MAX_TYPE_NAME];
        put_str("target type", &mut type_name, &target.target_type)?;
        let size = align8(DM_TARGET_SPEC_SIZE + target.params.len() + 1);
        let mut spec = vec![0u8; size];
        put(
            &mut spec,
            offset_of!(DmTargetSpec, sector_start),
            &target.sector_start.to_ne_bytes(),
        );
        put(
            &mut spec,
            offset_of!(DmTargetSpec, length),
            &target.length.to_ne_bytes(),
        );
        put(
            &mut spec,
            offset_of!(DmTargetSpec, status),
            &0i32.to_ne_bytes(),
        );
        put(
            &mut spec,
            offset_of!(DmTargetSpec, next),
            &(size as u32).to_ne_bytes(),
        );
        put(&mut spec, offset_of!(DmTargetSpec, target_type), &type_name);
        put(&mut spec, DM_TARGET_SPEC_SIZE, target.params.as_bytes());
        specs.extend_from_slice(&spec);
    }
    let mut header = header.clone();
    header.data_start = DM_IOCTL_SIZE as u32;
    header.data_size = (DM_IOCTL_SIZE + specs.len()) as u32;
    header.target_count = targets.len() as u32;
    let mut buf = vec![0u8; DM_IOCTL_SIZE];
    header.write(&mut buf);
    buf.extend_from_slice(&specs);
    Ok(buf)
}

/// The dm-verity parameters of a slot, as the kernel command line carries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityParams {
    /// Root hash, lower-case hex.
    pub root_hash: String,
    /// Salt, lower-case hex (empty: no salt).
    pub salt: String,
    /// Number of 4 KiB data blocks.
    pub data_blocks: u64,
    /// Byte offset of the verity superblock in the partition.
    pub hash_offset: u64,
}

impl VerityParams {
    /// The hash tree's first block: the superblock written by `veritysetup format`
    /// occupies the block at `hash_offset`, the tree starts one block later.
    pub fn hash_start_block(&self) -> u64 {
        self.hash_offset / keelson_configs::layout::VERITY_BLOCK_SIZE + 1
    }

    /// The `verity` target's parameter string for a data device that also holds the tree
    /// (`major:minor`): version 1, 4 KiB blocks, sha256. A corrupt block reads as EIO,
    /// which stage 1 reports before it reboots. `at_most_once` adds `check_at_most_once`:
    /// a block is hashed the first time it is read and served without hashing after
    /// that, for stage 1's full check, which reads (and so verifies) every block before
    /// anything runs from the root.
    pub fn table(&self, device: &str, at_most_once: bool) -> String {
        let block = keelson_configs::layout::VERITY_BLOCK_SIZE;
        let salt = if self.salt.is_empty() {
            "-"
        } else {
            &self.salt
        };
        let optional = if at_most_once {
            " 1 check_at_most_once"
        } else {
            ""
        };
        format!(
            "1 {device} {device} {block} {block} {} {} sha256 {} {salt}{optional}",
            self.data_blocks,
            self.hash_start_block(),
            self.root_hash,
        )
    }

    /// The `verity` target covering all data blocks (see [`VerityParams::table`]).
    pub fn target(&self, device: &str, at_most_once: bool) -> Target {
        Target {
            sector_start: 0,
            length: self.data_blocks * (keelson_configs::layout::VERITY_BLOCK_SIZE / 512),
            target_type: "verity".to_string(),
            params: self.table(device, at_most_once),
        }
    }
}

/// Create the read-only verity device `name` over `device` (`major:minor`) and make it
/// live (`at_most_once`: see [`VerityParams::table`]). Returns the dm device's (major,
/// minor).
pub fn create_verity(
    sys: &dyn Syscalls,
    control: &Path,
    name: &str,
    uuid: &str,
    device: &str,
    params: &VerityParams,
    at_most_once: bool,
) -> Result<(u32, u32), Error> {
    let call = |ioctl: &'static str, cmd: u8, mut buf: Vec<u8>| -> Result<Answer, Error> {
        sys.dm_ioctl(control, cmd, &mut buf)
            .map_err(|source| Error::Ioctl {
                ioctl,
                control: control.display().to_string(),
                source,
            })?;
        Ok(decode(&buf))
    };

    let answer = call(
        "DM_VERSION",
        CMD_VERSION,
        encode(&DmIoctl::new("", "", 0)?, &[])?,
    )?;
    if answer.version[0] != DM_VERSION[0] {
        let [a, b, c] = answer.version;
        return Err(Error::Version(a, b, c));
    }
    let created = call(
        "DM_DEV_CREATE",
        CMD_DEV_CREATE,
        encode(&DmIoctl::new(name, uuid, 0)?, &[])?,
    )?;
    call(
        "DM_TABLE_LOAD",
        CMD_TABLE_LOAD,
        encode(
            &DmIoctl::new(name, "", DM_READONLY_FLAG)?,
            &[params.target(device, at_most_once)],
        )?,
    )?;
    let resumed = call(
        "DM_DEV_SUSPEND",
        CMD_DEV_SUSPEND,
        encode(&DmIoctl::new(name, "", 0)?, &[])?,
    )?;
    // DM_DEV_CREATE and the resume both report the device number; prefer the later one.
    Ok(if resumed.dev != (0, 0) {
        resumed.dev
    } else {
        created.dev
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscalls::fake::{Call, Fake};

    fn params() -> VerityParams {
        VerityParams {
            root_hash: "ab".repeat(32),
            salt: "cd".repeat(32),
            data_blocks: 1000,
            hash_offset: 1000 * 4096,
        }
    }

    #[test]
    fn struct_layout_matches_linux_dm_ioctl_h() {
        assert_eq!(size_of::<DmIoctl>(), 312);
        assert_eq!(size_of::<DmTargetSpec>(), 40);
        assert_eq!(offset_of!(DmIoctl, version), 0);
        assert_eq!(offset_of!(DmIoctl, data_size), 12);
        assert_eq!(offset_of!(DmIoctl, data_start), 16);
        assert_eq!(offset_of!(DmIoctl, target_count), 20);
        assert_eq!(offset_of!(DmIoctl, open_count), 24);
        assert_eq!(offset_of!(DmIoctl, flags), 28);
        assert_eq!(offset_of!(DmIoctl, event_nr), 32);
        assert_eq!(offset_of!(DmIoctl, padding), 36);
        assert_eq!(offset_of!(DmIoctl, dev), 40);
        assert_eq!(offset_of!(DmIoctl, name), 48);
        assert_eq!(offset_of!(DmIoctl, uuid), 176);
        assert_eq!(offset_of!(DmIoctl, data), 305);
        assert_eq!(offset_of!(DmTargetSpec, sector_start), 0);
        assert_eq!(offset_of!(DmTargetSpec, length), 8);
        assert_eq!(offset_of!(DmTargetSpec, status), 16);
        assert_eq!(offset_of!(DmTargetSpec, next), 20);
        assert_eq!(offset_of!(DmTargetSpec, target_type), 24);
    }

    #[test]
    fn opcodes_match_the_header() {
        // _IOWR(0xfd, nr, struct dm_ioctl) = 0xc138fd00 | nr on x86-64 and arm64 alike.
        assert_eq!(opcode(CMD_VERSION) as u32, 0xc138_fd00);
        assert_eq!(opcode(CMD_DEV_CREATE) as u32, 0xc138_fd03);
        assert_eq!(opcode(CMD_DEV_SUSPEND) as u32, 0xc138_fd06);
        assert_eq!(opcode(CMD_TABLE_LOAD) as u32, 0xc138_fd09);
    }

    #[test]
    fn verity_table_from_cmdline_values() {
        let p = params();
        assert_eq!(p.hash_start_block(), 1001);
        assert_eq!(
            p.table("254:3", false),
            format!(
                "1 254:3 254:3 4096 4096 1000 1001 sha256 {} {}",
                "ab".repeat(32),
                "cd".repeat(32)
            )
        );
        assert_eq!(
            p.table("254:3", true),
            format!("{} 1 check_at_most_once", p.table("254:3", false))
        );
        let unsalted = VerityParams {
            salt: String::new(),
            ..params()
        };
        assert!(unsalted.table("8:1", false).ends_with(" -"));
        assert_eq!(p.target("8:1", false).length, 8000);
    }

    #[test]
    fn table_load_buffer_layout() -> Result<(), Error> {
        let target = params().target("254:3", false);
        let header = DmIoctl::new("keelson-root", "", DM_READONLY_FLAG)?;
        let buf = encode(&header, std::slice::from_ref(&target))?;
        let spec_size = align8(40 + target.params.len() + 1);
        assert_eq!(buf.len(), 312 + spec_size);
        assert_eq!(buf.len() % 8, 0);
        assert_eq!(get_u32(&buf, 0), 4);
        assert_eq!(get_u32(&buf, 12) as usize, buf.len(), "data_size");
        assert_eq!(get_u32(&buf, 16), 312, "data_start");
        assert_eq!(get_u32(&buf, 20), 1, "target_count");
        assert_eq!(get_u32(&buf, 28), DM_READONLY_FLAG);
        assert_eq!(&buf[48..60], b"keelson-root");
        assert_eq!(buf[60], 0);
        // The target spec at data_start, 8-byte aligned.
        assert_eq!(get_u64(&buf, 312), 0, "sector_start");
        assert_eq!(get_u64(&buf, 320), 8000, "length");
        assert_eq!(get_u32(&buf, 332) as usize, spec_size, "next");
        assert_eq!(&buf[336..342], b"verity");
        assert_eq!(buf[342], 0);
        // Parameters right after the 40-byte spec, NUL-terminated, NUL-padded.
        let params_end = 352 + target.params.len();
        assert_eq!(&buf[352..params_end], target.params.as_bytes());
        assert!(buf[params_end..].iter().all(|&b| b == 0));
        Ok(())
    }

    #[test]
    fn names_that_do_not_fit_are_refused() {
        let long = "x".repeat(128);
        assert!(matches!(
            DmIoctl::new(&long, "", 0),
            Err(Error::TooLong { field: "name", .. })
        ));
        assert!(DmIoctl::new(&"x".repeat(127), "", 0).is_ok());
    }

    #[test]
    fn device_numbers_decode_like_the_kernel() {
        assert_eq!(decode_dev((254 << 8) | 3), (254, 3));
        // Minor 300: low byte 0x2c, high bits 0x100 << 12.
        assert_eq!(decode_dev((253 << 8) | 0x2c | (0x100 << 12)), (253, 300));
    }

    #[test]
    fn create_verity_issues_the_four_ioctls_in_order() -> Result<(), Error> {
        let mut fake = Fake::new();
        fake.dm_answers.insert(
            CMD_VERSION,
            (0, [4u32, 48, 0].map(u32::to_ne_bytes).concat()),
        );
        fake.dm_answers
            .insert(CMD_DEV_CREATE, (40, (252u64 << 8).to_ne_bytes().to_vec()));
        let dev = create_verity(
            &fake,
            Path::new("/dev/mapper/control"),
            "keelson-root",
            "KEELSON-VERITY-ROOT-A",
            "254:3",
            &params(),
            true,
        )?;
        assert_eq!(dev, (252, 0));
        let cmds: Vec<u8> = fake
            .calls()
            .iter()
            .filter_map(|c| match c {
                Call::DmIoctl(cmd, _) => Some(*cmd),
                _ => None,
            })
            .collect();
        assert_eq!(
            cmds,
            [CMD_VERSION, CMD_DEV_CREATE, CMD_TABLE_LOAD, CMD_DEV_SUSPEND]
        );
        Ok(())
    }

    #[test]
    fn ioctl_errors_name_the_ioctl_and_errno() {
        let mut fake = Fake::new();
        fake.dm_answers.insert(
            CMD_VERSION,
            (0, [4u32, 48, 0].map(u32::to_ne_bytes).concat()),
        );
        fake.dm_errors.insert(CMD_TABLE_LOAD, 22);
        let err = create_verity(
            &fake,
            Path::new("/dev/mapper/control"),
            "keelson-root",
            "",
            "254:3",
            &params(),
            false,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.starts_with(
                "device-mapper ioctl DM_TABLE_LOAD on /dev/mapper/control failed with EINVAL (22)"
            ),
            "{err}"
        );
    }

    #[test]
    fn old_interface_versions_are_refused() {
        let mut fake = Fake::new();
        fake.dm_answers.insert(
            CMD_VERSION,
            (0, [3u32, 0, 0].map(u32::to_ne_bytes).concat()),
        );
        let r = create_verity(&fake, Path::new("/c"), "n", "", "1:1", &params(), false);
        assert!(matches!(r, Err(Error::Version(3, 0, 0))));
    }
}
