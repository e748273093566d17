//! The imager: turns pinned inputs (Debian packages, our own binaries, an image
//! definition from `images/`) into bootable disk images.
pub mod debian;
pub mod definition;
pub mod rootfs;
pub mod squashfs;
pub mod verity;
pub mod cpio;
pub mod compress;
pub mod kmod;
pub mod gpt;
pub mod esp;
pub mod inspect;
