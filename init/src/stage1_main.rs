//! The `init-stage1` binary: the initramfs's `/init`, stage 1 alone (see
//! `keelson_init::stage1_main`). Stage 2 runs from the root's `/sbin/init`, the `init`
//! binary.

fn main() {
    keelson_init::stage1_main()
}
