//! `cargo xtask`: the project's only build system.
fn main() {}
