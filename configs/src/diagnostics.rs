//! Diagnostics: what validation reports about a machine config.
//!
//! Every problem is a [`Diagnostic`] with a severity, the file, a line and column (1-based;
//! the column counts characters), the key path of the value (for example
//! `machine.network.interfaces[0].addresses[1]`), a message and a hint of what to do.
//! Displayed, it reads like a compiler message:
//!
//! ```text
//! controlplane.toml:12:5: error: machine.network.interfaces[1].mac: "zz" is not a MAC address (expected six hex pairs like 52:54:00:12:34:56)
//! ```
//!
//! A [`Report`] holds every diagnostic of one file and is the error type of
//! [`crate::load`].

use std::fmt;

/// How bad a problem is. Only errors make a config invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// The config is accepted, but something in it is probably a mistake.
    Warning,
    /// The config is refused: it is never applied, in whole or in part.
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// A position in the source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// 0-based byte offset.
    pub offset: usize,
}

impl Location {
    /// The location of byte `offset` in `src` (clamped to the text; never panics).
    pub fn of_offset(src: &str, offset: usize) -> Location {
        let mut offset = offset.min(src.len());
        while !src.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &src[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Location {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
            offset,
        }
    }
}

/// One problem found in a machine config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The file name as given by the caller.
    pub file: String,
    /// Where in the file, when the problem has a place (an unreadable file has none).
    pub location: Option<Location>,
    /// The key path of the value, like `machine.network.interfaces[0].mtu`; empty for
    /// problems with the document as a whole.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
}

impl Diagnostic {
    /// Whether this diagnostic makes the config invalid.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.file)?;
        if let Some(loc) = self.location {
            write!(f, "{}:{}:", loc.line, loc.column)?;
        }
        write!(f, " {}: ", self.severity)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, " ({hint})")?;
        }
        Ok(())
    }
}

/// Every diagnostic of one config file; the error of [`crate::load`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.diagnostics))]
pub struct Report {
    /// The diagnostics, in source order (errors and warnings).
    pub diagnostics: Vec<Diagnostic>,
}

impl Report {
    /// The diagnostics that make the config invalid.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.is_error())
    }
}

fn render(diagnostics: &[Diagnostic]) -> String {
    let errors = diagnostics.iter().filter(|d| d.is_error()).count();
    let mut out = format!(
        "invalid machine config: {errors} error{}",
        if errors == 1 { "" } else { "s" }
    );
    for d in diagnostics {
        out.push('\n');
        out.push_str(&d.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_count_lines_and_characters() {
        let src = "a = 1\nbé = \"x\"\n";
        assert_eq!(
            Location::of_offset(src, 0),
            Location {
                line: 1,
                column: 1,
                offset: 0
            }
        );
        // `=` on line 2 comes after two characters (three bytes) and a space.
        let eq = src.rfind('=').unwrap_or_default();
        let loc = Location::of_offset(src, eq);
        assert_eq!((loc.line, loc.column), (2, 4));
        // Offsets past the end or inside a character are clamped, never a panic.
        assert_eq!(Location::of_offset(src, 1000).line, 3);
        assert_eq!(Location::of_offset(src, 8).column, 2);
    }

    #[test]
    fn diagnostics_display_like_a_compiler() {
        let d = Diagnostic {
            severity: Severity::Error,
            file: "cp.toml".into(),
            location: Some(Location {
                line: 12,
                column: 5,
                offset: 0,
            }),
            path: "machine.network.interfaces[1].mac".into(),
            message: "\"zz\" is not a MAC address".into(),
            hint: Some("expected six hex pairs like 52:54:00:12:34:56".into()),
        };
        assert_eq!(
            d.to_string(),
            "cp.toml:12:5: error: machine.network.interfaces[1].mac: \"zz\" is not a MAC address (expected six hex pairs like 52:54:00:12:34:56)"
        );
    }
}
