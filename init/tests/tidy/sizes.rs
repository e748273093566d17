//! The size rules for init's code: no file over [`MAX_FILE_LINES`] lines before its
//! `#[cfg(test)]` part, and no function outside tests over [`MAX_FN_LINES`] lines, so
//! that each file keeps one job and each function can be read at once.
//!
//! The reader relies on rustfmt's layout (the repository is formatted by `cargo fmt
//! --check` before any test runs): a function starts on a line with `fn name` and ends at
//! the first line that is its own indentation followed by `}`; a declaration without a
//! body ends with `;` before any `{`. Files named `tests.rs` are test modules.

use std::path::{Path, PathBuf};

/// Lines a file may have before its tests.
pub const MAX_FILE_LINES: usize = 800;
/// Lines a function outside tests may have, its signature and closing brace included.
pub const MAX_FN_LINES: usize = 120;

/// Every file over the limit and every function over the limit under `root`, one line
/// each (`path: N lines before its tests`, `path:LINE fn name: N lines`).
pub fn oversized(root: &Path) -> std::io::Result<Vec<String>> {
    let mut files = Vec::new();
    collect(root, &mut files)?;
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path)?;
        out.extend(check_file(&path, &text));
    }
    Ok(out)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs")
            && path.file_name().is_some_and(|n| n != "tests.rs")
        {
            out.push(path);
        }
    }
    Ok(())
}

/// The violations in one file's text.
pub fn check_file(path: &Path, text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let cut = lines
        .iter()
        .position(|l| l.starts_with("#[cfg(test)]"))
        .unwrap_or(lines.len());
    let mut out = Vec::new();
    if cut > MAX_FILE_LINES {
        out.push(format!(
            "{}: {cut} lines before its tests (at most {MAX_FILE_LINES}): split it by job",
            path.display()
        ));
    }
    for (i, line) in lines[..cut].iter().enumerate() {
        let Some((indent, name)) = fn_start(line) else {
            continue;
        };
        // A declaration without a body (a trait's) ends with `;` before any `{`.
        let Some(sig_end) = lines[i..cut]
            .iter()
            .position(|l| l.trim_end().ends_with('{') || l.trim_end().ends_with(';'))
        else {
            continue;
        };
        if lines[i + sig_end].trim_end().ends_with(';') {
            continue;
        }
        let close = format!("{indent}}}");
        let Some(end) = lines[i + 1..].iter().position(|l| *l == close) else {
            continue;
        };
        let n = end + 2;
        if n > MAX_FN_LINES {
            out.push(format!(
                "{}:{} fn {name}: {n} lines (at most {MAX_FN_LINES}): split it into steps",
                path.display(),
                i + 1
            ));
        }
    }
    out
}

/// The indentation and name of a line that starts a function.
fn fn_start(line: &str) -> Option<(&str, &str)> {
    let rest = line.trim_start();
    let indent = &line[..line.len() - rest.len()];
    let mut words = rest.split_whitespace().peekable();
    while let Some(word) = words.next() {
        match word {
            "pub" | "const" | "async" | "unsafe" | "extern" => continue,
            w if w.starts_with("pub(") => continue,
            w if w.starts_with('"') => continue,
            "fn" => {
                let name = words.next()?;
                let end = name
                    .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .unwrap_or(name.len());
                return (end > 0).then(|| (indent, &name[..end]));
            }
            _ => return None,
        }
    }
    None
}
