//! The kernel's device-mapper ioctl interface (linux/dm-ioctl.h): its structs, sizes,
//! command numbers and opcodes. A leaf: [`crate::dm`] builds requests with it, and the
//! real [`crate::syscalls::Syscalls`] issues them.

use std::mem::size_of;

/// `DM_IOCTL`, the ioctl type byte of device-mapper.
pub const DM_IOCTL_TYPE: u8 = 0xfd;
/// The interface version we speak (`DM_VERSION_MAJOR` 4; any 4.x kernel accepts 4.0.0).
pub const DM_VERSION: [u32; 3] = [4, 0, 0];
/// `DM_NAME_LEN`.
pub const DM_NAME_LEN: usize = 128;
/// `DM_UUID_LEN`.
pub const DM_UUID_LEN: usize = 129;
/// `DM_MAX_TYPE_NAME`.
pub const DM_MAX_TYPE_NAME: usize = 16;
/// `sizeof(struct dm_ioctl)`.
pub const DM_IOCTL_SIZE: usize = size_of::<DmIoctl>();
/// `sizeof(struct dm_target_spec)`.
pub const DM_TARGET_SPEC_SIZE: usize = size_of::<DmTargetSpec>();

/// `DM_VERSION_CMD`.
pub const CMD_VERSION: u8 = 0;
/// `DM_DEV_CREATE_CMD`.
pub const CMD_DEV_CREATE: u8 = 3;
/// `DM_DEV_SUSPEND_CMD` (without `DM_SUSPEND_FLAG` it resumes: the loaded table goes live).
pub const CMD_DEV_SUSPEND: u8 = 6;
/// `DM_TABLE_LOAD_CMD`.
pub const CMD_TABLE_LOAD: u8 = 9;

/// `DM_READONLY_FLAG`: the table is loaded read-only (dm-verity refuses anything else).
pub const DM_READONLY_FLAG: u32 = 1 << 0;

/// `struct dm_ioctl` from linux/dm-ioctl.h.
#[repr(C)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmIoctl {
    /// Interface version: in, what we speak; out, what the kernel speaks.
    pub version: [u32; 3],
    /// Total size of the buffer, this struct included.
    pub data_size: u32,
    /// Offset of the command's data from the start of this struct.
    pub data_start: u32,
    /// Number of `dm_target_spec`s that follow (table load).
    pub target_count: u32,
    /// Out: open count of the device.
    pub open_count: i32,
    /// `DM_*_FLAG` bits.
    pub flags: u32,
    /// Event number (in/out).
    pub event_nr: u32,
    /// Padding.
    pub padding: u32,
    /// Device number (`huge_encode_dev`), out of `DM_DEV_CREATE`.
    pub dev: u64,
    /// Device name, NUL-terminated.
    pub name: [u8; DM_NAME_LEN],
    /// Device UUID, NUL-terminated.
    pub uuid: [u8; DM_UUID_LEN],
    /// Padding (or data).
    pub data: [u8; 7],
}

/// `struct dm_target_spec` from linux/dm-ioctl.h; the parameter string follows it.
#[repr(C)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmTargetSpec {
    /// First sector (512 bytes) of the device this target covers.
    pub sector_start: u64,
    /// Number of sectors this target covers.
    pub length: u64,
    /// Out only.
    pub status: i32,
    /// Offset in bytes from the start of this spec to the next one.
    pub next: u32,
    /// Target type name (`verity`), NUL-terminated.
    pub target_type: [u8; DM_MAX_TYPE_NAME],
}

/// `_IOWR(DM_IOCTL, cmd, struct dm_ioctl)`.
pub const fn opcode(cmd: u8) -> rustix::ioctl::Opcode {
    rustix::ioctl::opcode::read_write::<DmIoctl>(DM_IOCTL_TYPE, cmd)
}
