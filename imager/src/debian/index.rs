//! Debian archive metadata: the `Packages` index of one suite, component and
//! architecture (deb822 paragraphs), the dependency relations inside it, and the
//! suite's `Release` file (its date and the sha256 of every index).
//!
//! Parsed by hand: deb822 is "Key: value" lines with indented continuations and
//! blank lines between paragraphs, and we only need a dozen fields of it.

use std::collections::HashMap;
use std::fmt;

use super::version::{Version, VersionError};

/// An error in a `Packages` or `Release` file.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// A paragraph lacks a field we need.
    #[error("{what}: paragraph {paragraph} ({package}) has no `{field}` field")]
    MissingField {
        /// Which file (e.g. `trixie main/binary-amd64 Packages`).
        what: String,
        /// 1-based paragraph number.
        paragraph: usize,
        /// The package name, or `?`.
        package: String,
        /// The missing field.
        field: &'static str,
    },
    /// A field's value does not parse.
    #[error("{what}: package `{package}` has a bad `{field}` field `{value}`: {message}")]
    BadField {
        /// Which file.
        what: String,
        /// The package name.
        package: String,
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        message: String,
    },
    /// A version does not parse.
    #[error("{what}: package `{package}` has a bad version")]
    BadVersion {
        /// Which file.
        what: String,
        /// The package name.
        package: String,
        /// The parse error.
        #[source]
        source: VersionError,
    },
}

/// A version constraint operator in a relation (`<<`, `<=`, `=`, `>=`, `>>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `<<`: strictly earlier.
    Lt,
    /// `<=` (and the obsolete `<`).
    Le,
    /// `=`.
    Eq,
    /// `>=` (and the obsolete `>`).
    Ge,
    /// `>>`: strictly later.
    Gt,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "<<" => Op::Lt,
            "<=" | "<" => Op::Le,
            "=" => Op::Eq,
            ">=" | ">" => Op::Ge,
            ">>" => Op::Gt,
            _ => return None,
        })
    }

    /// Whether `have OP want` holds.
    pub fn holds(self, have: &Version, want: &Version) -> bool {
        use std::cmp::Ordering::*;
        let ord = have.cmp(want);
        match self {
            Op::Lt => ord == Less,
            Op::Le => ord != Greater,
            Op::Eq => ord == Equal,
            Op::Ge => ord != Less,
            Op::Gt => ord == Greater,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Lt => "<<",
            Op::Le => "<=",
            Op::Eq => "=",
            Op::Ge => ">=",
            Op::Gt => ">>",
        })
    }
}

/// One alternative of a dependency: `name[:qualifier] [(op version)]`.
#[derive(Debug, Clone)]
pub struct Relation {
    /// The package (or virtual package) name, without any `:any` qualifier.
    pub name: String,
    /// The version constraint, if any.
    pub constraint: Option<(Op, Version)>,
}

impl Relation {
    /// Whether a package (or a `Provides` entry) of `version` satisfies this relation.
    /// An unversioned `Provides` (`None`) satisfies only unversioned relations.
    pub fn accepts(&self, version: Option<&Version>) -> bool {
        match (&self.constraint, version) {
            (None, _) => true,
            (Some((op, want)), Some(have)) => op.holds(have, want),
            (Some(_), None) => false,
        }
    }
}

impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.constraint {
            Some((op, v)) => write!(f, "{} ({op} {v})", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// One dependency: alternatives separated by `|`, the first satisfiable one wins.
#[derive(Debug, Clone)]
pub struct Dependency(pub Vec<Relation>);

impl fmt::Display for Dependency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" | ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// A `Provides` entry: a virtual package name and the version it is provided at, if any.
#[derive(Debug, Clone)]
pub struct Provide {
    /// The virtual package name.
    pub name: String,
    /// `(= version)`, when given.
    pub version: Option<Version>,
}

/// One binary package of a `Packages` index.
#[derive(Debug, Clone)]
pub struct Package {
    /// `Package`.
    pub name: String,
    /// `Version`.
    pub version: Version,
    /// `Architecture` (`amd64`, `arm64` or `all`).
    pub arch: String,
    /// `Pre-Depends`.
    pub pre_depends: Vec<Dependency>,
    /// `Depends`.
    pub depends: Vec<Dependency>,
    /// `Provides`.
    pub provides: Vec<Provide>,
    /// `Filename`: the path of the `.deb` under the mirror's root.
    pub filename: String,
    /// `Size` in bytes.
    pub size: u64,
    /// `SHA256` in lower-case hex.
    pub sha256: String,
}

/// A parsed `Packages` index with lookups by name and by provided (virtual) name.
#[derive(Debug, Default)]
pub struct Index {
    packages: Vec<Package>,
    by_name: HashMap<String, Vec<usize>>,
    providers: HashMap<String, Vec<usize>>,
}

impl Index {
    /// Parse a `Packages` file. `what` names it in errors.
    pub fn parse(text: &str, what: &str) -> Result<Index, IndexError> {
        let mut index = Index::default();
        for (n, para) in paragraphs(text).enumerate() {
            let pkg = parse_package(&para, n + 1, what)?;
            let i = index.packages.len();
            index.by_name.entry(pkg.name.clone()).or_default().push(i);
            for p in &pkg.provides {
                index.providers.entry(p.name.clone()).or_default().push(i);
            }
            index.packages.push(pkg);
        }
        Ok(index)
    }

    /// Every package, in file order.
    pub fn packages(&self) -> &[Package] {
        &self.packages
    }

    /// The package at `i` (as returned by [`Index::named`] and [`Index::providers`]).
    pub fn get(&self, i: usize) -> &Package {
        &self.packages[i]
    }

    /// Indices of the real packages called `name`, in file order.
    pub fn named(&self, name: &str) -> &[usize] {
        self.by_name.get(name).map_or(&[], Vec::as_slice)
    }

    /// Indices of the packages that `Provides` `name`, in file order.
    pub fn providers(&self, name: &str) -> &[usize] {
        self.providers.get(name).map_or(&[], Vec::as_slice)
    }

    /// Every real package name (unordered).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

/// The parts of a suite's `Release` file we use.
#[derive(Debug, Clone)]
pub struct Release {
    /// `Date`.
    pub date: String,
    /// `Codename` (e.g. `trixie`), empty if absent.
    pub codename: String,
    /// `Version` (e.g. `13.2`), empty if absent.
    pub version: String,
    /// `SHA256` entries: path (relative to `dists/<suite>/`), size, sha256.
    pub sha256: Vec<(String, u64, String)>,
}

impl Release {
    /// Parse a `Release` (or the text of an `InRelease`) file.
    pub fn parse(text: &str, what: &str) -> Result<Release, IndexError> {
        let para = paragraphs(text).next().unwrap_or_default();
        let field = |k: &str| {
            para.iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.clone())
        };
        let date = field("Date").ok_or_else(|| IndexError::MissingField {
            what: what.to_string(),
            paragraph: 1,
            package: "Release".to_string(),
            field: "Date",
        })?;
        let mut sha256 = Vec::new();
        for line in field("SHA256").unwrap_or_default().lines() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if let [sum, size, path] = parts[..]
                && let Ok(size) = size.parse()
            {
                sha256.push((path.to_string(), size, sum.to_ascii_lowercase()));
            }
        }
        Ok(Release {
            date,
            codename: field("Codename").unwrap_or_default(),
            version: field("Version").unwrap_or_default(),
            sha256,
        })
    }

    /// The size and sha256 the Release file gives for `path`.
    pub fn entry(&self, path: &str) -> Option<(u64, &str)> {
        self.sha256
            .iter()
            .find(|(p, _, _)| p == path)
            .map(|(_, size, sum)| (*size, sum.as_str()))
    }
}

/// Split deb822 text into paragraphs of `(field, value)`; continuation lines are
/// joined to the value with newlines (the leading space removed).
fn paragraphs(text: &str) -> impl Iterator<Item = Vec<(String, String)>> + '_ {
    let mut lines = text.lines().peekable();
    std::iter::from_fn(move || {
        while lines.peek().is_some_and(|l| l.trim().is_empty()) {
            lines.next();
        }
        lines.peek()?;
        let mut para: Vec<(String, String)> = Vec::new();
        while let Some(line) = lines.next_if(|l| !l.trim().is_empty()) {
            if line.starts_with([' ', '\t']) {
                if let Some((_, v)) = para.last_mut() {
                    if !v.is_empty() {
                        v.push('\n');
                    }
                    v.push_str(line.trim());
                }
            } else if line.starts_with('#') {
                continue;
            } else if let Some((k, v)) = line.split_once(':') {
                para.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        Some(para)
    })
}

fn parse_package(
    para: &[(String, String)],
    paragraph: usize,
    what: &str,
) -> Result<Package, IndexError> {
    let get = |k: &str| {
        para.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let name = get("Package").unwrap_or("?").to_string();
    let need = |field: &'static str| {
        get(field).ok_or_else(|| IndexError::MissingField {
            what: what.to_string(),
            paragraph,
            package: name.clone(),
            field,
        })
    };
    need("Package")?;
    let version = Version::parse(need("Version")?).map_err(|source| IndexError::BadVersion {
        what: what.to_string(),
        package: name.clone(),
        source,
    })?;
    let bad = |field: &'static str, value: &str, message: String| IndexError::BadField {
        what: what.to_string(),
        package: name.clone(),
        field,
        value: value.to_string(),
        message,
    };
    let relations = |field: &'static str| -> Result<Vec<Dependency>, IndexError> {
        match get(field) {
            Some(v) => parse_dependencies(v).map_err(|m| bad(field, v, m)),
            None => Ok(Vec::new()),
        }
    };
    let pre_depends = relations("Pre-Depends")?;
    let depends = relations("Depends")?;
    let provides = relations("Provides")?
        .into_iter()
        .flat_map(|d| d.0)
        .map(|r| Provide {
            name: r.name,
            version: r.constraint.map(|(_, v)| v),
        })
        .collect();
    let size_text = need("Size")?;
    let size = size_text
        .parse()
        .map_err(|e| bad("Size", size_text, format!("{e}")))?;
    let sha256 = need("SHA256")?.to_ascii_lowercase();
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("SHA256", &sha256, "not 64 hex digits".to_string()));
    }
    Ok(Package {
        arch: need("Architecture")?.to_string(),
        filename: need("Filename")?.to_string(),
        name,
        version,
        pre_depends,
        depends,
        provides,
        size,
        sha256,
    })
}

/// Parse a relation field (`Depends`, `Pre-Depends`, `Provides`):
/// `a (>= 1), b:any | c [amd64] <!nocheck>`.
pub fn parse_dependencies(text: &str) -> Result<Vec<Dependency>, String> {
    let mut out = Vec::new();
    for clause in text.split(',') {
        let clause = clause.trim();
        if clause.is_empty() {
            continue;
        }
        let mut alts = Vec::new();
        for alt in clause.split('|') {
            alts.push(parse_relation(alt.trim())?);
        }
        out.push(Dependency(alts));
    }
    Ok(out)
}

fn parse_relation(text: &str) -> Result<Relation, String> {
    let end = text
        .find(|c: char| c.is_whitespace() || matches!(c, '(' | '[' | '<'))
        .unwrap_or(text.len());
    let name = &text[..end];
    // `name:any` / `name:amd64`: one architecture per image, so the qualifier is moot.
    let name = name.split(':').next().unwrap_or(name);
    if name.is_empty() {
        return Err(format!("relation `{text}` has no package name"));
    }
    let rest = text[end..].trim_start();
    let constraint = match rest.strip_prefix('(') {
        Some(inner) => {
            let inner = inner
                .split_once(')')
                .map(|(c, _)| c)
                .ok_or_else(|| format!("relation `{text}` lacks a closing `)`"))?
                .trim();
            let op_end = inner
                .find(|c: char| !matches!(c, '<' | '>' | '='))
                .unwrap_or(inner.len());
            let op = Op::parse(&inner[..op_end])
                .ok_or_else(|| format!("relation `{text}` has an unknown operator"))?;
            let version = Version::parse(&inner[op_end..]).map_err(|e| e.to_string())?;
            Some((op, version))
        }
        None => None,
    };
    Ok(Relation {
        name: name.to_string(),
        constraint,
    })
}
