//! The imager: turns pinned inputs (Debian packages, our own binaries, an image
//! definition from `images/`) into bootable disk images.
