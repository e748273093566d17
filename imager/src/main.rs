//! `imager`: the command-line front of [`keelson_imager`].
fn main() {}
