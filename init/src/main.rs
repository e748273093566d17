//! The `init` binary: stage 1 in the initramfs, stage 2 as PID 1 of the root filesystem.
fn main() {}
