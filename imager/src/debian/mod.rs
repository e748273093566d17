//! Pinned Debian inputs: from the image definition to verified `.deb` files and
//! their unpacked contents.
//!
//! - [`mirror`]: the mirror URL (from `--mirror` or the host's apt sources) and HTTP GETs;
//! - [`index`]: the `Release` file and the `Packages` index of a suite;
//! - [`version`]: Debian version ordering;
//! - [`resolve`]: the dependency closure of the requested packages, honouring exclusions;
//! - [`lock`]: the per-architecture lock file (`images/<name>-<arch>.lock`) and its generation;
//! - [`fetch`]: the content-addressed download cache;
//! - [`deb`]: reading `.deb` archives (ar + tar) into entries, in Rust, without
//!   maintainer scripts.
//!
//! Long operations report progress as lines through a [`Progress`] callback;
//! [`stderr_progress`] prints them.

pub mod deb;
pub mod fetch;
pub mod index;
pub mod lock;
pub mod mirror;
pub mod resolve;
pub mod version;

pub use mirror::{Mirror, mirror_from_apt_sources};

/// A progress callback: called with one human-readable line per step.
pub type Progress<'a> = &'a (dyn Fn(&str) + Sync);

/// A [`Progress`] callback that prints each line to stderr.
pub fn stderr_progress(line: &str) {
    eprintln!("{line}");
}

/// A [`Progress`] callback that discards everything.
pub fn quiet_progress(_line: &str) {}
