//! `init`: Keelson's PID 1, in two stages (initramfs, then the verity-protected root).
