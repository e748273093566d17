//! The imager: turns pinned inputs (Debian packages, our own binaries, an image
//! definition from `images/`) into bootable disk images.
pub mod build;
pub mod compress;
pub mod cpio;
pub mod debian;
pub mod definition;
pub mod derived;
pub mod esp;
pub mod gpt;
pub mod inspect;
pub mod kmod;
pub mod kubernetes;
pub mod prefetch;
pub mod rootfs;
pub mod squashfs;
pub mod verity;
