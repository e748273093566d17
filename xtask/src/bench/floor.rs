//! The boot floor: the same firmware, systemd-boot and kernel as our image, booting a
//! trivial init that prints one line and powers the machine off. Nothing can boot to a
//! console line faster on this path, so our boot time is reported as a multiple of it.
//!
//! The trivial init is a hand-assembled static ELF executable (~200 bytes), written
//! here for x86_64 and aarch64 rather than compiled: no C cross compiler, libc or
//! cargo target is involved, so it builds the same on every host. It makes three
//! system calls and nothing else:
//!
//! 1. `write(1, "KEELSON FLOOR READY\n", 20)`: the kernel opened `/dev/console` (a
//!    node in the floor's initramfs) as standard output before starting `/init`;
//! 2. `ioctl(1, TCSBRK, 1)` (`tcdrain`): wait until the serial port has sent the line.
//!    Without it the power-off can overtake the UART's transmit buffer and the line is
//!    lost (seen once in a batch of runs); the harness times the line's arrival, so the
//!    wait does not count;
//! 3. `reboot(LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_POWER_OFF)`,
//!    which as PID 1 powers off at once (QEMU then exits); should it fail, the
//!    program spins and the harness's timeout stops the VM.
//!
//! The floor disk is a GPT with one partition, the ESP, written with the imager's own
//! modules: systemd-boot and the kernel are read out of the built image's ESP, the
//! initramfs is a newc cpio of `/init` and `/dev/console`, and the entry's command
//! line is the image definition's (console and log level) without the Keelson keys.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use keelson_configs::layout::{self, Arch, Slot};
use keelson_imager::cpio::CpioWriter;
use keelson_imager::definition::Definition;
use keelson_imager::esp::{self, BootEntry, Esp, LoaderConf};
use keelson_imager::gpt::{self, Content, DiskSpec, Guid, PartitionSpec};
use keelson_imager::inspect;

/// The line the trivial init prints.
pub const MARKER: &str = "KEELSON FLOOR READY";

/// Where the ELF image is loaded (one read+execute segment, file offset 0).
const LOAD_ADDR: u64 = 0x40_0000;
/// ELF header (64) + one program header (56): the code starts here.
const CODE_OFFSET: u64 = 64 + 56;

const REBOOT_MAGIC1: u32 = 0xfee1_dead;
const REBOOT_MAGIC2: u32 = 0x2812_1969;
const REBOOT_CMD_POWER_OFF: u32 = 0x4321_fedc;
/// `ioctl` request: with a non-zero argument, wait until the output is sent (`tcdrain`).
const TCSBRK: u32 = 0x5409;

/// The trivial init for `arch`: a static ELF executable that prints `message` on
/// standard output and powers off.
pub fn trivial_init(arch: Arch, message: &[u8]) -> Vec<u8> {
    let (machine, code_len) = match arch {
        Arch::Amd64 => (0x3e_u16, x86_64_code(0, 0).len()),
        Arch::Arm64 => (0xb7_u16, aarch64_code(0, 0).len()),
    };
    let msg_addr = LOAD_ADDR + CODE_OFFSET + code_len as u64;
    let len = u32::try_from(message.len()).unwrap_or(u32::MAX).min(0xffff);
    let code = match arch {
        Arch::Amd64 => x86_64_code(msg_addr as u32, len),
        Arch::Arm64 => aarch64_code(msg_addr as u32, len),
    };
    let total = CODE_OFFSET + code.len() as u64 + u64::from(len);

    let mut elf = Vec::with_capacity(total as usize);
    // e_ident: magic, 64-bit, little-endian, version 1, System V ABI, padding.
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    elf.extend_from_slice(&machine.to_le_bytes()); // e_machine
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&(LOAD_ADDR + CODE_OFFSET).to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff: no sections
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    // The one PT_LOAD segment: the whole file, read + execute.
    elf.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R | X
    elf.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&total.to_le_bytes()); // p_filesz
    elf.extend_from_slice(&total.to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    elf.extend_from_slice(&code);
    elf.extend_from_slice(&message[..len as usize]);
    elf
}

/// x86_64: `write(1, msg, len)` (syscall 1), `ioctl(1, TCSBRK, 1)` (syscall 16),
/// `reboot(...)` (syscall 169), spin.
fn x86_64_code(msg_addr: u32, len: u32) -> Vec<u8> {
    // b8+r: mov r32, imm32 (zero-extends into the 64-bit register).
    const EAX: u8 = 0xb8;
    const EDX: u8 = 0xba;
    const ESI: u8 = 0xbe;
    const EDI: u8 = 0xbf;
    const SYSCALL: [u8; 2] = [0x0f, 0x05];
    const JMP_SELF: [u8; 2] = [0xeb, 0xfe];
    let mut c = Vec::new();
    for (reg, imm) in [(EDI, 1), (ESI, msg_addr), (EDX, len), (EAX, 1)] {
        c.push(reg);
        c.extend_from_slice(&imm.to_le_bytes());
    }
    c.extend_from_slice(&SYSCALL);
    for (reg, imm) in [(EDI, 1), (ESI, TCSBRK), (EDX, 1), (EAX, 16)] {
        c.push(reg);
        c.extend_from_slice(&imm.to_le_bytes());
    }
    c.extend_from_slice(&SYSCALL);
    for (reg, imm) in [
        (EDI, REBOOT_MAGIC1),
        (ESI, REBOOT_MAGIC2),
        (EDX, REBOOT_CMD_POWER_OFF),
        (EAX, 169),
    ] {
        c.push(reg);
        c.extend_from_slice(&imm.to_le_bytes());
    }
    c.extend_from_slice(&SYSCALL);
    c.extend_from_slice(&JMP_SELF);
    c
}

/// aarch64: `write(1, msg, len)` (syscall 64), `ioctl(1, TCSBRK, 1)` (syscall 29),
/// `reboot(...)` (syscall 142), spin.
fn aarch64_code(msg_addr: u32, len: u32) -> Vec<u8> {
    // movz/movk Xd, #imm16, lsl #(16 * hw)
    let movz = |rd: u32, imm: u32, hw: u32| 0xd280_0000 | (hw << 21) | ((imm & 0xffff) << 5) | rd;
    let movk = |rd: u32, imm: u32, hw: u32| 0xf280_0000 | (hw << 21) | ((imm & 0xffff) << 5) | rd;
    let mov32 = |rd: u32, v: u32| [movz(rd, v, 0), movk(rd, v >> 16, 1)];
    const SVC0: u32 = 0xd400_0001;
    const B_SELF: u32 = 0x1400_0000;
    let mut words = vec![movz(0, 1, 0)];
    words.extend(mov32(1, msg_addr));
    words.push(movz(2, len, 0));
    words.push(movz(8, 64, 0));
    words.push(SVC0);
    words.push(movz(0, 1, 0));
    words.push(movz(1, TCSBRK, 0));
    words.push(movz(2, 1, 0));
    words.push(movz(8, 29, 0));
    words.push(SVC0);
    words.extend(mov32(0, REBOOT_MAGIC1));
    words.extend(mov32(1, REBOOT_MAGIC2));
    words.extend(mov32(2, REBOOT_CMD_POWER_OFF));
    words.push(movz(8, 142, 0));
    words.push(SVC0);
    words.push(B_SELF);
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The floor's initramfs: `/init` and `/dev/console`, uncompressed newc cpio.
fn initramfs(arch: Arch) -> Result<Vec<u8>> {
    let mut w = CpioWriter::new(Vec::new(), 0);
    w.file(
        "init",
        0o755,
        &trivial_init(arch, format!("{MARKER}\n").as_bytes()),
    )?;
    w.dir("dev", 0o755)?;
    w.char_device("dev/console", 0o600, 5, 1)?;
    Ok(w.finish()?)
}

/// Write the floor disk for `arch` into `dir` from the built `image` (its ESP's
/// systemd-boot and slot A kernel), returning the disk's path.
pub fn disk(arch: Arch, image: &Path, dir: &Path) -> Result<PathBuf> {
    let def = Definition::load(&crate::image::definition_path())?;
    let read = |file: &str| {
        inspect::read_esp_file(image, file)
            .with_context(|| format!("reading {file} from the ESP of {}", image.display()))
    };
    let kernel_path = esp::slot_kernel_path(Slot::A);
    let kernel = read(kernel_path.trim_start_matches('/'))?;
    let bootloader = read(arch.efi_default_boot_path())?;

    let mut esp = Esp::new();
    esp.add_bootloader(arch, bootloader);
    esp.add_loader_conf(&LoaderConf {
        timeout: 0,
        default: None,
        editor: false,
    });
    esp.add_file("floor/vmlinuz", kernel);
    esp.add_file("floor/initrd", initramfs(arch)?);
    esp.add_entry(
        "floor.conf",
        &BootEntry {
            title: "Keelson bench floor".into(),
            version: None,
            sort_key: None,
            linux: "/floor/vmlinuz".into(),
            initrd: vec!["/floor/initrd".into()],
            options: def.cmdline(arch)?,
        },
    );
    let esp_size = def.partitions.efi_mib << 20;
    let esp_bytes = esp.to_vec(esp_size, 0)?;

    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("floor.raw");
    gpt::write_disk(
        &path,
        &DiskSpec {
            seed: format!("keelson-bench-floor-{arch}").into_bytes(),
            partitions: vec![PartitionSpec {
                name: layout::PART_EFI.into(),
                type_guid: Guid::parse(layout::TYPE_GUID_EFI)?,
                size: esp_size,
                attributes: 0,
                content: Content::Bytes(esp_bytes),
            }],
            disk_size: None,
        },
    )
    .with_context(|| format!("writing the floor disk {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// The address the code passes to write(2), decoded from the instructions.
    fn message_address(arch: Arch, code: &[u8]) -> u64 {
        match arch {
            // The second instruction: be imm32 (mov esi, imm32).
            Arch::Amd64 => {
                assert_eq!(code[5], 0xbe);
                u64::from(u32::from_le_bytes(code[6..10].try_into().unwrap()))
            }
            // Words 1 and 2: movz x1, lo; movk x1, hi, lsl 16.
            Arch::Arm64 => {
                let w = |i: usize| u32::from_le_bytes(code[i * 4..i * 4 + 4].try_into().unwrap());
                assert_eq!(w(1) & 0xff80_001f, 0xd280_0001);
                assert_eq!(w(2) & 0xffe0_001f, 0xf2a0_0001);
                u64::from((w(1) >> 5) & 0xffff) | (u64::from((w(2) >> 5) & 0xffff) << 16)
            }
        }
    }

    fn check(arch: Arch, machine: u16) {
        let msg = b"KEELSON FLOOR READY\n";
        let elf = trivial_init(arch, msg);
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(u16_at(&elf, 18), machine);
        let entry = u64_at(&elf, 24);
        assert_eq!(entry, LOAD_ADDR + CODE_OFFSET);
        // PT_LOAD covers the whole file.
        assert_eq!(u64_at(&elf, 64 + 32), elf.len() as u64);
        assert!(elf.len() < 256, "{} bytes", elf.len());
        let code = &elf[CODE_OFFSET as usize..];
        let at = (message_address(arch, code) - LOAD_ADDR) as usize;
        assert_eq!(&elf[at..], msg);
    }

    #[test]
    fn trivial_init_is_a_static_elf_that_points_at_its_message() {
        check(Arch::Amd64, 0x3e);
        check(Arch::Arm64, 0xb7);
    }
}
