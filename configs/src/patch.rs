//! TOML merge patches: RFC 7386 (JSON Merge Patch) applied to TOML tables.
//!
//! A patch is a TOML document. Applying it to a config:
//!
//! - a table in the patch merges into the table of the same key, recursively;
//! - any other value (string, integer, boolean, datetime, array, array of tables) replaces
//!   the value of the same key whole, or adds the key; arrays are never merged element-wise;
//! - TOML has no `null`, so deleting a key is spelled with the directive table
//!   `{ "$patch" = "delete" }` (the `$patch` name cannot clash with a config key, since no
//!   key of the machine config starts with `$`):
//!
//! ```toml
//! [machine]
//! hostname = "cp-1"                       # set or replace
//! time_servers = ["time.example.com"]     # arrays replace whole
//! kubelet.extra_args = { "$patch" = "delete" }   # remove the key and everything under it
//! ```
//!
//! Deleting a key that is absent is not an error (RFC 7386: the result is the same). A
//! `$patch` key anywhere else, or with any other value, is refused when the patch is loaded.
//! Patches apply in the order given; `machinectl gen config` applies `--config-patch` files
//! to both configs first, then `--config-patch-control-plane` / `--config-patch-worker`.

use std::path::Path;

use toml::{Table, Value};

/// The key of the directive table.
pub const DIRECTIVE_KEY: &str = "$patch";
/// The only directive: remove the key the directive table is the value of.
pub const DELETE: &str = "delete";

/// Errors from loading a patch file.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The patch file could not be read.
    #[error("cannot read config patch {path}; check the path given to --config-patch")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The patch file is not UTF-8 text.
    #[error(
        "config patch {path} is not UTF-8 text (invalid byte at offset {offset}); a patch is a TOML document"
    )]
    NotUtf8 {
        /// The file.
        path: String,
        /// Byte offset of the first invalid byte.
        offset: usize,
    },
    /// The patch file is not TOML.
    #[error("{path}:{line}:{column}: config patch is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the TOML parser reported.
        message: String,
    },
    /// A `$patch` directive is misused.
    #[error(
        "{path}: key `{key}`: {problem}; to delete a key write `key = {{ \"$patch\" = \"delete\" }}`"
    )]
    Directive {
        /// The file.
        path: String,
        /// The dotted key path of the offending table.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

/// A parsed, checked merge patch.
#[derive(Debug, Clone, PartialEq)]
pub struct Patch {
    origin: String,
    table: Table,
}

impl Patch {
    /// Reads and checks a patch file.
    pub fn load(path: &Path) -> Result<Patch, PatchError> {
        let display = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| PatchError::Read {
            path: display.clone(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|e| PatchError::NotUtf8 {
            path: display.clone(),
            offset: e.utf8_error().valid_up_to(),
        })?;
        Patch::from_toml_str(&text, &display)
    }

    /// Parses and checks the text of a patch; `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Patch, PatchError> {
        let table: Table = toml::from_str(text).map_err(|e| {
            let start = e.span().map_or(0, |s| s.start);
            let (line, column) = line_column(text, start);
            PatchError::Syntax {
                path: origin.to_owned(),
                line,
                column,
                message: e.message().trim_end().to_owned(),
            }
        })?;
        check_directives(&table, origin, "")?;
        Ok(Patch {
            origin: origin.to_owned(),
            table,
        })
    }

    /// Where the patch came from (its file name).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The patch document.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Applies the patch to `target`.
    pub fn apply(&self, target: &mut Table) {
        merge(target, &self.table);
    }

    /// Whether applying this patch sets, replaces or deletes the value at `key_path` (a
    /// diagnostic's path such as `machine.network.interfaces[0].mtu` or
    /// `machine.sysctls."net.ipv4.ip_forward"`), one of its parents, or something inside it.
    pub fn touches(&self, key_path: &str) -> bool {
        let mut table = &self.table;
        let segments = split_key_path(key_path);
        if segments.is_empty() {
            return false;
        }
        for key in &segments {
            match table.get(key.as_str()) {
                None => return false,
                Some(Value::Table(sub)) if !is_delete_table(sub) => table = sub,
                Some(_) => return true,
            }
        }
        true
    }
}

/// The keys of a dotted key path, unquoting `"..."` segments and dropping `[N]` indices.
fn split_key_path(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut chars = path.chars();
    let mut in_quotes = false;
    let mut in_index = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' if in_quotes => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            '"' => in_quotes = !in_quotes,
            _ if in_quotes => current.push(c),
            '[' => in_index = true,
            ']' => in_index = false,
            _ if in_index => {}
            '.' => out.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    out.push(current);
    out.retain(|k| !k.is_empty());
    out
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = text.get(..offset).unwrap_or_default();
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (before.matches('\n').count() + 1, column)
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Whether `value` is exactly the delete directive `{ "$patch" = "delete" }`.
fn is_delete(value: &Value) -> bool {
    matches!(value, Value::Table(t) if is_delete_table(t))
}

fn is_delete_table(t: &Table) -> bool {
    t.len() == 1 && t.get(DIRECTIVE_KEY).and_then(Value::as_str) == Some(DELETE)
}

fn check_directives(table: &Table, origin: &str, prefix: &str) -> Result<(), PatchError> {
    let err = |key: String, problem: &str| PatchError::Directive {
        path: origin.to_owned(),
        key,
        problem: problem.to_owned(),
    };
    if table.contains_key(DIRECTIVE_KEY) {
        let holder = if prefix.is_empty() {
            "(the document)".to_owned()
        } else {
            prefix.to_owned()
        };
        return match table.get(DIRECTIVE_KEY) {
            Some(Value::String(s)) if s == DELETE => Err(err(
                holder,
                "a delete directive must be the only key of its table, and the document itself cannot be deleted",
            )),
            _ => Err(err(
                join(prefix, DIRECTIVE_KEY),
                "the only directive is the string \"delete\"",
            )),
        };
    }
    for (key, value) in table {
        let path = join(prefix, key);
        match value {
            v if is_delete(v) => {}
            Value::Table(t) => check_directives(t, origin, &path)?,
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Value::Table(t) = item {
                        if t.contains_key(DIRECTIVE_KEY) {
                            return Err(err(
                                format!("{path}[{i}]"),
                                "directives cannot appear inside arrays (arrays replace whole)",
                            ));
                        }
                        check_directives(t, origin, &format!("{path}[{i}]"))?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Merges `patch` into `target` (RFC 7386 on TOML tables, with the delete directive).
pub fn merge(target: &mut Table, patch: &Table) {
    for (key, value) in patch {
        if is_delete(value) {
            target.remove(key);
            continue;
        }
        match (target.get_mut(key), value) {
            (Some(Value::Table(existing)), Value::Table(sub)) => merge(existing, sub),
            (_, Value::Table(sub)) => {
                // RFC 7386: a patch object merged into a non-object starts from `{}`, so
                // directives inside it are dropped rather than copied.
                let mut fresh = Table::new();
                merge(&mut fresh, sub);
                target.insert(key.clone(), Value::Table(fresh));
            }
            (_, other) => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
}
