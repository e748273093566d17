//! The machine configuration of a Keelson node: its strict TOML schema, validation,
//! cluster secrets and PKI, and generation of per-node configs.

pub mod layout;
pub mod patch;
pub mod pki;
pub mod secrets;
