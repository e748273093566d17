//! Debian package versions (`[epoch:]upstream[-revision]`) and their ordering, as
//! dpkg defines it (deb-version(7)): epochs compare numerically, `~` sorts before
//! everything (even the end of the string), letters sort before other punctuation,
//! and runs of digits compare as numbers.
//!
//! Written here rather than taken from a crate: the algorithm is thirty lines of
//! dpkg's `verrevcmp`, and the crates that implement it pull in regex machinery we
//! have no other use for.

use std::cmp::Ordering;
use std::fmt;

/// A parse error for a Debian version string.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    /// The string was empty.
    #[error("empty Debian version")]
    Empty,
    /// The epoch (before the first `:`) was not a number.
    #[error("Debian version `{0}` has an epoch that is not a number")]
    BadEpoch(String),
    /// The upstream part was empty or did not start with a digit.
    #[error("Debian version `{0}` has an empty upstream version")]
    EmptyUpstream(String),
}

/// A Debian version. Equality and ordering follow dpkg (`1.0` equals `1.00`); the
/// original spelling is kept for display.
#[derive(Debug, Clone)]
pub struct Version {
    raw: String,
    epoch: u64,
    upstream_start: usize,
    upstream_end: usize,
}

impl Version {
    /// Parse a version such as `1:2.5.2-3`, `1.7.24~ds1-6+deb13u1` or `2.41`.
    pub fn parse(s: &str) -> Result<Version, VersionError> {
        let raw = s.trim();
        if raw.is_empty() {
            return Err(VersionError::Empty);
        }
        let (epoch, upstream_start) = match raw.split_once(':') {
            Some((e, _)) => {
                let epoch = e
                    .parse::<u64>()
                    .map_err(|_| VersionError::BadEpoch(raw.to_string()))?;
                (epoch, e.len() + 1)
            }
            None => (0, 0),
        };
        let upstream_end = match raw[upstream_start..].rfind('-') {
            Some(i) => upstream_start + i,
            None => raw.len(),
        };
        if upstream_end == upstream_start {
            return Err(VersionError::EmptyUpstream(raw.to_string()));
        }
        Ok(Version {
            raw: raw.to_string(),
            epoch,
            upstream_start,
            upstream_end,
        })
    }

    /// The version as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The epoch (0 when absent).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The upstream part.
    pub fn upstream(&self) -> &str {
        &self.raw[self.upstream_start..self.upstream_end]
    }

    /// The Debian revision (empty when absent).
    pub fn revision(&self) -> &str {
        if self.upstream_end < self.raw.len() {
            &self.raw[self.upstream_end + 1..]
        } else {
            ""
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.epoch
            .cmp(&other.epoch)
            .then_with(|| verrevcmp(self.upstream(), other.upstream()))
            .then_with(|| verrevcmp(self.revision(), other.revision()))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Version {}

/// The weight dpkg gives a character in the non-digit part of a version.
fn order(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(b'~') => -1,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(c) => i32::from(c) + 256,
    }
}

/// dpkg's `verrevcmp`: alternate non-digit and digit runs.
fn verrevcmp(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    let digit = |s: &[u8], k: usize| s.get(k).is_some_and(u8::is_ascii_digit);
    while i < a.len() || j < b.len() {
        while (i < a.len() && !digit(a, i)) || (j < b.len() && !digit(b, j)) {
            let (ac, bc) = (order(a.get(i).copied()), order(b.get(j).copied()));
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        while a.get(i) == Some(&b'0') {
            i += 1;
        }
        while b.get(j) == Some(&b'0') {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while digit(a, i) && digit(b, j) {
            if first_diff == Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if digit(a, i) {
            return Ordering::Greater;
        }
        if digit(b, j) {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}
