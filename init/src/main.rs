//! The `init` binary: stage 1 in the initramfs, stage 2 as PID 1 of the root filesystem.
//! All of it lives in the library; see `keelson_init::pid1_main`.

fn main() {
    keelson_init::pid1_main()
}
