//! The `init` binary: the root's `/sbin/init`, stage 2 as PID 1 of the node (the
//! initramfs carries `init-stage1`). All of it lives in the library; see
//! `keelson_init::pid1_main`.

fn main() {
    keelson_init::pid1_main()
}
