//! Upgrade bundles: what `cargo xtask image` writes and what machined takes in an upgrade.
//!
//! A pure library (no async runtime, no I/O beyond `std::io` traits and the key files of
//! [`keys`]): xtask writes bundles with it, machined parses, verifies and checks them.
//!
//! | module | what it is |
//! |---|---|
//! | [`manifest`] | the signed manifest: version, architecture, minimum version, components, accepted config versions, command line, verity parameters, each part's size and sha256; parsed strictly and validated |
//! | [`bundle`] | the file format (`KEELSONB` ‖ manifest length ‖ manifest ‖ Ed25519 signature ‖ parts): the writer, and a sans-IO push parser that checks each part's sha256 as it streams |
//! | [`keys`] | Ed25519 key pairs in PEM (PKCS#8 / SPKI), key ids, the directory of keys a node trusts, signature verification |
//! | [`checks`] | the pure checks before an upgrade writes anything: architecture, version path, space, config version, components, versions that failed here |
//! | [`verity`] | the dm-verity hash tree: built for an image, and verified against a root hash after an upgrade wrote a slot |
//!
//! The bundle parser never trusts what it parses: a caller verifies the header's
//! signature ([`keys::verify`]) before it acts on a part's bytes, and acts on a part only
//! once its [`bundle::Event::PartEnd`] says its sha256 matched.

#![deny(missing_docs)]

pub mod bundle;
pub mod checks;
pub mod keys;
pub mod manifest;
pub mod verity;
