//! The machine configuration of a Keelson node: its strict TOML schema, validation,
//! cluster secrets and PKI, and generation of per-node configs.
//!
//! The machine config is one strict TOML document per node ([`schema`]). Check one with
//! [`check_str`], [`check_bytes`] or [`check_file`], which report every problem at once
//! as [`Diagnostic`]s with file, line, column and key path; [`load`] returns the config or
//! a [`Report`] of its problems. [`MachineConfig::to_toml_string`] writes a config back.

pub mod boot;
pub mod diagnostics;
#[cfg(feature = "pki")]
pub mod generate;
pub mod layout;
pub mod patch;
#[cfg(feature = "pki")]
pub mod pki;
pub mod schema;
#[cfg(feature = "pki")]
pub mod secrets;
mod shape;
pub mod validate;
pub mod values;

pub use diagnostics::{Diagnostic, Location, Report, Severity};
pub use schema::MachineConfig;
pub use validate::MAX_CONFIG_BYTES;
pub use validate::{Checked, Mode, check_bytes, check_file, check_str, load};
