//! The tidy checks' engine: init's module graph, read from the source text.
//!
//! A node is a top-level module of a crate's `src` directory: a file `x.rs`, or a
//! directory `x/` (with `mod.rs` or beside an `x.rs`) together with every file below it.
//! The crate roots (`lib.rs`, `main.rs`, `stage1_main.rs`) are not nodes. An edge
//! `a -> b` is a reference from `a`'s code to `crate::b`, found in `use` trees (also
//! inside groups: `use crate::{b, c::d}`), in paths in code (`crate::b::f()`), and in
//! `super::` chains that climb to the crate root. Comments, strings and character
//! literals are skipped, so a doc link or a message naming a module is no edge.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Files of a crate's `src` that are roots, not modules.
pub const ROOTS: &[&str] = &["lib.rs", "main.rs", "stage1_main.rs"];

/// One source file of a node.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// The path, relative to `src`.
    pub path: PathBuf,
    /// Its module path below the crate root (`["supervisor", "runner"]`).
    pub module: Vec<String>,
    /// The text.
    pub text: String,
}

/// The module graph: each node with the nodes it references.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Graph {
    /// Node -> nodes it references (never itself).
    pub edges: BTreeMap<String, BTreeSet<String>>,
}

impl Graph {
    /// How many edges there are.
    pub fn edge_count(&self) -> usize {
        self.edges.values().map(BTreeSet::len).sum()
    }

    /// A cycle, as its nodes from the first back to the first (`["a", "b", "a"]`); the
    /// one met first in name order, or none.
    pub fn cycle(&self) -> Option<Vec<String>> {
        #[derive(Clone, Copy, PartialEq, Eq)]
        enum Mark {
            Open,
            Done,
        }
        fn visit(
            graph: &Graph,
            node: &str,
            marks: &mut BTreeMap<String, Mark>,
            stack: &mut Vec<String>,
        ) -> Option<Vec<String>> {
            match marks.get(node) {
                Some(Mark::Done) => return None,
                Some(Mark::Open) => {
                    let start = stack.iter().position(|n| n == node).unwrap_or(0);
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(node.to_string());
                    return Some(cycle);
                }
                None => {}
            }
            marks.insert(node.to_string(), Mark::Open);
            stack.push(node.to_string());
            for next in graph.edges.get(node).into_iter().flatten() {
                if let Some(cycle) = visit(graph, next, marks, stack) {
                    return Some(cycle);
                }
            }
            stack.pop();
            marks.insert(node.to_string(), Mark::Done);
            None
        }
        let mut marks = BTreeMap::new();
        for node in self.edges.keys() {
            let mut stack = Vec::new();
            if let Some(cycle) = visit(self, node, &mut marks, &mut stack) {
                return Some(cycle);
            }
        }
        None
    }
}

/// Every node of the crate whose sources are in `src`, with its files.
pub fn nodes(src: &Path) -> io::Result<BTreeMap<String, Vec<SourceFile>>> {
    let mut out: BTreeMap<String, Vec<SourceFile>> = BTreeMap::new();
    let mut entries: Vec<PathBuf> = fs::read_dir(src)?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<_>>()?;
    entries.sort();
    for path in entries {
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        if path.is_dir() {
            let files = out.entry(name.clone()).or_default();
            collect_dir(src, &path, &[name], files)?;
        } else if let Some(stem) = name.strip_suffix(".rs") {
            if ROOTS.contains(&name.as_str()) {
                continue;
            }
            out.entry(stem.to_string()).or_default().push(SourceFile {
                path: PathBuf::from(&name),
                module: vec![stem.to_string()],
                text: fs::read_to_string(&path)?,
            });
        }
    }
    Ok(out)
}

fn collect_dir(
    src: &Path,
    dir: &Path,
    module: &[String],
    files: &mut Vec<SourceFile>,
) -> io::Result<()> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<_>>()?;
    entries.sort();
    for path in entries {
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        let mut inner = module.to_vec();
        if path.is_dir() {
            inner.push(name);
            collect_dir(src, &path, &inner, files)?;
        } else if let Some(stem) = name.strip_suffix(".rs") {
            if stem != "mod" {
                inner.push(stem.to_string());
            }
            files.push(SourceFile {
                path: path.strip_prefix(src).unwrap_or(&path).to_path_buf(),
                module: inner,
                text: fs::read_to_string(&path)?,
            });
        }
    }
    Ok(())
}

/// The graph of the crate whose sources are in `src`.
pub fn graph(src: &Path) -> io::Result<Graph> {
    let nodes = nodes(src)?;
    let known: BTreeSet<&str> = nodes.keys().map(String::as_str).collect();
    let mut graph = Graph::default();
    for (name, files) in &nodes {
        let targets = graph.edges.entry(name.clone()).or_default();
        for file in files {
            for target in references(&file.text, &file.module) {
                if target != *name && known.contains(target.as_str()) {
                    targets.insert(target);
                }
            }
        }
    }
    Ok(graph)
}

/// The top-level modules a file's code names: `crate::x`, `crate::{x, y::z}` and
/// `super::` chains that reach the crate root (`module` is the file's module path).
pub fn references(text: &str, module: &[String]) -> BTreeSet<String> {
    let tokens = tokens(&code_only(text));
    let mut out = BTreeSet::new();
    for (i, token) in tokens.iter().enumerate() {
        let after = match token.as_str() {
            "crate" if tokens.get(i + 1).is_some_and(|t| t == "::") => i + 2,
            "super" if (i == 0 || tokens[i - 1] != "::") => {
                // `super::super::x`: each `super` climbs one level of the module path.
                let mut j = i;
                let mut depth = 0;
                while tokens.get(j).is_some_and(|t| t == "super")
                    && tokens.get(j + 1).is_some_and(|t| t == "::")
                {
                    depth += 1;
                    j += 2;
                }
                if depth == 0 || depth < module.len() {
                    continue;
                }
                j
            }
            _ => continue,
        };
        collect_tree(&tokens, after, &mut out);
    }
    out
}

/// From `tokens[at]` (just after `crate::`): a name, or a `{...}` group of paths whose
/// first segments are names.
fn collect_tree(tokens: &[String], at: usize, out: &mut BTreeSet<String>) {
    match tokens.get(at).map(String::as_str) {
        Some("{") => {
            let mut depth = 0;
            let mut expect_name = true;
            for token in &tokens[at..] {
                match token.as_str() {
                    "{" => {
                        depth += 1;
                        if depth == 1 {
                            expect_name = true;
                        }
                    }
                    "}" => {
                        depth -= 1;
                        if depth == 0 {
                            return;
                        }
                    }
                    "," if depth == 1 => expect_name = true,
                    name if depth == 1 && expect_name => {
                        if is_ident(name) && name != "self" {
                            out.insert(name.to_string());
                        }
                        expect_name = false;
                    }
                    _ => {}
                }
            }
        }
        Some(name) if is_ident(name) => {
            out.insert(name.to_string());
        }
        _ => {}
    }
}

fn is_ident(token: &str) -> bool {
    token
        .chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
}

/// Identifiers, `::` and single punctuation characters.
fn tokens(code: &str) -> Vec<String> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(chars[start..i].iter().collect());
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push("::".to_string());
            i += 2;
        } else {
            if !c.is_whitespace() {
                out.push(c.to_string());
            }
            i += 1;
        }
    }
    out
}

/// The text with comments, strings and character literals blanked out.
pub fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == 'r' && (next == Some('#') || next == Some('"')) && !prev_is_ident(&chars, i)
        {
            // A raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= chars.len() {
                    break;
                }
                if chars[j] == '"' && (0..hashes).all(|k| chars.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            i = j;
            out.push_str("\"\"");
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' {
            // A character literal ('a', '\n', '\u{..}'), or a lifetime ('a).
            let close = if next == Some('\\') {
                (i + 2..chars.len().min(i + 12)).find(|&k| chars[k] == '\'')
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match close {
                Some(end) => {
                    out.push_str("' '");
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prev_is_ident(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

/// The part of a source file that is not test code: all of it but what follows its
/// first `#[cfg(test)]`; nothing for a file of tests (`tests.rs`).
pub fn non_test_part(file: &SourceFile) -> &str {
    if file.path.file_name().is_some_and(|n| n == "tests.rs") {
        return "";
    }
    match file.text.find("#[cfg(test)]") {
        Some(at) => &file.text[..at],
        None => &file.text,
    }
}
