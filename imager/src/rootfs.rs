//! An in-memory file tree: the root filesystem (and the initramfs) before it is written
//! out as squashfs or cpio.
//!
//! Every owner, mode and timestamp in a [`Tree`] is chosen by our code: every entry is
//! owned by uid/gid 0 and carries the tree's single modification time (a
//! `SOURCE_DATE_EPOCH`-style value given by the caller), so that two builds from the same
//! inputs write the same bytes. Setuid and setgid bits are stripped as entries are added
//! (and the paths recorded), and [`audit`] reports any shell, package manager or
//! shell script left in the tree: the image invariant is "no shell, no setuid file".
//!
//! Paths are relative to the tree's root, `/`-separated, without `.` or `..` components;
//! a leading `/` or `./` is accepted and dropped. Hard links are stored as copies (the
//! squashfs writer deduplicates identical file data, so they cost no space).

use std::collections::BTreeMap;

/// Permission bits we keep: rwx for user/group/other plus the sticky bit (setuid and
/// setgid are stripped).
const KEPT_MODE_BITS: u16 = 0o1777;
/// The setuid and setgid bits.
const SETID_BITS: u16 = 0o6000;

/// Directories that hold documentation, manual pages and translations: nothing on a node
/// reads them, so [`Tree::strip_docs`] removes them.
pub const DOC_DIRS: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/gtk-doc",
    "usr/share/help",
    "usr/share/bash-completion",
    "usr/share/zsh",
    "usr/share/fish",
];

/// File names of shells (and multi-call binaries that contain one).
pub const SHELL_NAMES: &[&str] = &[
    "sh", "bash", "rbash", "dash", "ash", "busybox", "toybox", "zsh", "ksh", "ksh93", "mksh",
    "pdksh", "lksh", "csh", "tcsh", "fish", "yash", "posh", "elvish", "nu", "xonsh",
];

/// File names of package managers and of the maintainer-script machinery.
pub const PACKAGE_MANAGER_NAMES: &[&str] = &[
    "dpkg",
    "dpkg-deb",
    "dpkg-divert",
    "dpkg-maintscript-helper",
    "apt",
    "apt-get",
    "aptitude",
    "rpm",
    "yum",
    "dnf",
    "apk",
    "pacman",
    "update-alternatives",
];

/// Errors from building a [`Tree`].
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The path is empty, absolute after normalisation, or has `.`/`..`/empty components.
    #[error(
        "invalid path {path:?} in the root filesystem: use a relative path without '.', '..' or empty components"
    )]
    InvalidPath {
        /// The path as given.
        path: String,
    },
    /// A file or symlink is in the way of a directory that must exist.
    #[error(
        "cannot create {path:?} in the root filesystem: {parent:?} exists and is not a directory"
    )]
    NotADirectory {
        /// The path being added.
        path: String,
        /// The ancestor that is not a directory.
        parent: String,
    },
    /// A directory is in the way of a file, symlink or hard link.
    #[error(
        "cannot add {path:?} to the root filesystem: a directory exists there; remove it first"
    )]
    IsADirectory {
        /// The path being added.
        path: String,
    },
    /// A hard link names a target that is not a regular file in the tree.
    #[error(
        "hard link {path:?} points to {target:?}, which is not a regular file in the root filesystem; add the target first"
    )]
    BadHardlink {
        /// The link being added.
        path: String,
        /// Its target.
        target: String,
    },
}

/// What an entry of the tree is.
#[derive(Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory.
    Dir,
    /// A regular file and its content.
    File(Vec<u8>),
    /// A symbolic link and its target (as stored, relative or absolute).
    Symlink(String),
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::Dir => f.write_str("Dir"),
            Node::File(data) => write!(f, "File({} bytes)", data.len()),
            Node::Symlink(target) => write!(f, "Symlink({target:?})"),
        }
    }
}

/// One entry of the tree: what it is and its permission bits (owner is always 0:0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    node: Node,
    mode: u16,
}

impl Entry {
    /// What the entry is.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Permission bits (`0o1777` at most: setuid/setgid never survive).
    pub fn mode(&self) -> u16 {
        self.mode
    }
}

/// An in-memory file tree with deterministic metadata (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    entries: BTreeMap<String, Entry>,
    mtime: u32,
    stripped_setid: Vec<String>,
}

/// Normalise a tree path: drop a leading `/` or `./`, reject `.`, `..` and empty parts.
fn normalise(path: &str) -> Result<String, RootfsError> {
    let trimmed = path.trim_start_matches('/');
    let trimmed = trimmed.strip_prefix("./").unwrap_or(trimmed);
    let trimmed = trimmed.trim_end_matches('/');
    let bad = trimmed.is_empty()
        || trimmed.contains('\0')
        || trimmed
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if bad {
        return Err(RootfsError::InvalidPath {
            path: path.to_string(),
        });
    }
    Ok(trimmed.to_string())
}

/// The parent directories of `path`, outermost first (`a/b/c` gives `a`, `a/b`).
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

impl Tree {
    /// An empty tree whose entries will all carry `mtime` (seconds since the epoch).
    pub fn new(mtime: u32) -> Tree {
        Tree {
            entries: BTreeMap::new(),
            mtime,
            stripped_setid: Vec::new(),
        }
    }

    /// The modification time of every entry.
    pub fn mtime(&self) -> u32 {
        self.mtime
    }

    /// Create the parents of `path` as directories (mode 0755) where missing.
    fn make_parents(&mut self, path: &str) -> Result<(), RootfsError> {
        for parent in ancestors(path) {
            match self.entries.get(parent) {
                Some(Entry {
                    node: Node::Dir, ..
                }) => {}
                Some(_) => {
                    return Err(RootfsError::NotADirectory {
                        path: path.to_string(),
                        parent: parent.to_string(),
                    });
                }
                None => {
                    self.entries.insert(
                        parent.to_string(),
                        Entry {
                            node: Node::Dir,
                            mode: 0o755,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    fn clean_mode(&mut self, path: &str, mode: u32) -> u16 {
        // Only the low 12 bits are permission bits; the file type comes from `Node`.
        let bits = (mode & 0o7777) as u16;
        if bits & SETID_BITS != 0 {
            self.stripped_setid.push(path.to_string());
        }
        bits & KEPT_MODE_BITS
    }

    fn insert_leaf(&mut self, path: &str, node: Node, mode: u32) -> Result<(), RootfsError> {
        let path = normalise(path)?;
        if let Some(Entry {
            node: Node::Dir, ..
        }) = self.entries.get(&path)
        {
            return Err(RootfsError::IsADirectory { path });
        }
        self.make_parents(&path)?;
        let mode = self.clean_mode(&path, mode);
        self.entries.insert(path, Entry { node, mode });
        Ok(())
    }

    /// Add a directory (and its missing parents). Adding an existing directory only
    /// updates its mode.
    pub fn add_dir(&mut self, path: &str, mode: u32) -> Result<(), RootfsError> {
        let path = normalise(path)?;
        if let Some(entry) = self.entries.get(&path)
            && entry.node != Node::Dir
        {
            return Err(RootfsError::NotADirectory {
                parent: path.clone(),
                path,
            });
        }
        self.make_parents(&path)?;
        let mode = self.clean_mode(&path, mode);
        self.entries.insert(
            path,
            Entry {
                node: Node::Dir,
                mode,
            },
        );
        Ok(())
    }

    /// Add a regular file (and its missing parents). A file or symlink already at `path`
    /// is replaced (the later package wins, as dpkg would have it).
    pub fn add_file(
        &mut self,
        path: &str,
        mode: u32,
        data: impl Into<Vec<u8>>,
    ) -> Result<(), RootfsError> {
        self.insert_leaf(path, Node::File(data.into()), mode)
    }

    /// Add a symbolic link to `target` (and the link's missing parents).
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), RootfsError> {
        self.insert_leaf(path, Node::Symlink(target.to_string()), 0o777)
    }

    /// Add a hard link to the regular file `target` (stored as a copy, see module docs).
    pub fn add_hardlink(&mut self, path: &str, target: &str) -> Result<(), RootfsError> {
        let target_path = normalise(target)?;
        let Some(Entry {
            node: Node::File(data),
            mode,
        }) = self.entries.get(&target_path)
        else {
            return Err(RootfsError::BadHardlink {
                path: path.to_string(),
                target: target.to_string(),
            });
        };
        let (data, mode) = (data.clone(), u32::from(*mode));
        self.add_file(path, mode, data)
    }

    /// The entry at `path`, if any.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        normalise(path).ok().and_then(|p| self.entries.get(&p))
    }

    /// The content of the regular file at `path`, if it is one.
    pub fn file(&self, path: &str) -> Option<&[u8]> {
        match self.get(path)?.node() {
            Node::File(data) => Some(data),
            _ => None,
        }
    }

    /// Remove `path` and, for a directory, everything below it. Returns how many entries
    /// were removed.
    pub fn remove(&mut self, path: &str) -> usize {
        let Ok(path) = normalise(path) else {
            return 0;
        };
        let prefix = format!("{path}/");
        let before = self.entries.len();
        self.entries
            .retain(|p, _| p != &path && !p.starts_with(&prefix));
        before - self.entries.len()
    }

    /// Remove every entry for which `matches(path)` is true, together with everything
    /// below a matching directory. Returns how many entries were removed.
    pub fn remove_matching(&mut self, matches: impl Fn(&str) -> bool) -> usize {
        let doomed: Vec<String> = self
            .entries
            .keys()
            .filter(|p| matches(p))
            .cloned()
            .collect();
        doomed.iter().map(|p| self.remove(p)).sum()
    }

    /// Remove documentation, manual pages and translations ([`DOC_DIRS`]). Returns how
    /// many entries were removed.
    pub fn strip_docs(&mut self) -> usize {
        DOC_DIRS.iter().map(|dir| self.remove(dir)).sum()
    }

    /// Every entry, sorted by path (a directory always comes before what it contains).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(p, e)| (p.as_str(), e))
    }

    /// Number of entries (the root directory is implicit and not counted).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the tree has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total size of all regular files' content, in bytes.
    pub fn file_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| match &e.node {
                Node::File(data) => data.len() as u64,
                _ => 0,
            })
            .sum()
    }

    /// Paths whose setuid/setgid bits were stripped as they were added.
    pub fn stripped_setid(&self) -> &[String] {
        &self.stripped_setid
    }
}

/// Something [`audit`] found that must not be in an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Where in the tree.
    pub path: String,
    /// What it is.
    pub kind: FindingKind,
}

/// The kinds of [`Finding`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FindingKind {
    /// A file or symlink named like a shell.
    Shell,
    /// A file or symlink named like a package manager.
    PackageManager,
    /// A file with the setuid or setgid bit.
    SetId {
        /// Its permission bits.
        mode: u16,
    },
    /// A script whose `#!` line names a shell: it cannot run on a node.
    ShellScript {
        /// The interpreter named on the `#!` line.
        interpreter: String,
    },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            FindingKind::Shell => write!(f, "/{}: a shell", self.path),
            FindingKind::PackageManager => write!(f, "/{}: a package manager", self.path),
            FindingKind::SetId { mode } => {
                write!(f, "/{}: setuid/setgid (mode {mode:04o})", self.path)
            }
            FindingKind::ShellScript { interpreter } => {
                write!(f, "/{}: a shell script (#!{interpreter})", self.path)
            }
        }
    }
}

/// The interpreter of a `#!` script, if the file is one.
fn shebang_interpreter(data: &[u8]) -> Option<String> {
    let rest = data.strip_prefix(b"#!")?;
    let line = rest.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim();
    let mut words = line.split_whitespace();
    let first = words.next()?;
    // `#!/usr/bin/env bash` names its interpreter in the second word.
    let program = if first.rsplit('/').next() == Some("env") {
        words.find(|w| !w.starts_with('-'))?
    } else {
        first
    };
    Some(program.to_string())
}

/// Report every shell, package manager, shell script and setuid/setgid file in `tree`.
/// An image is acceptable only when this is empty.
pub fn audit(tree: &Tree) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (path, entry) in tree.iter() {
        let base = path.rsplit('/').next().unwrap_or(path);
        let is_leaf = !matches!(entry.node, Node::Dir);
        let mut push = |kind| {
            findings.push(Finding {
                path: path.to_string(),
                kind,
            })
        };
        if is_leaf && SHELL_NAMES.contains(&base) {
            push(FindingKind::Shell);
        }
        if is_leaf && PACKAGE_MANAGER_NAMES.contains(&base) {
            push(FindingKind::PackageManager);
        }
        if entry.mode & SETID_BITS != 0 {
            push(FindingKind::SetId { mode: entry.mode });
        }
        if let Node::File(data) = &entry.node
            && let Some(interpreter) = shebang_interpreter(data)
        {
            let name = interpreter.rsplit('/').next().unwrap_or(&interpreter);
            if SHELL_NAMES.contains(&name) {
                push(FindingKind::ShellScript { interpreter });
            }
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_parents_and_sorts_parents_first() {
        let mut t = Tree::new(1);
        t.add_file("/usr/bin/containerd", 0o755, b"ELF".to_vec())
            .unwrap();
        t.add_symlink("bin", "usr/bin").unwrap();
        let paths: Vec<_> = t.iter().map(|(p, _)| p).collect();
        assert_eq!(paths, ["bin", "usr", "usr/bin", "usr/bin/containerd"]);
        assert_eq!(t.get("usr").unwrap().mode(), 0o755);
        assert_eq!(t.file("./usr/bin/containerd"), Some(&b"ELF"[..]));
    }

    #[test]
    fn rejects_bad_paths_and_conflicts() {
        let mut t = Tree::new(1);
        for bad in ["", "/", "a/../b", "a//b", "./."] {
            assert!(
                matches!(
                    t.add_file(bad, 0o644, vec![]),
                    Err(RootfsError::InvalidPath { .. })
                ),
                "{bad:?}"
            );
        }
        t.add_file("etc/x", 0o644, vec![]).unwrap();
        assert!(matches!(
            t.add_file("etc/x/y", 0o644, vec![]),
            Err(RootfsError::NotADirectory { .. })
        ));
        assert!(matches!(
            t.add_file("etc", 0o644, vec![]),
            Err(RootfsError::IsADirectory { .. })
        ));
        assert!(matches!(
            t.add_hardlink("etc/z", "etc/missing"),
            Err(RootfsError::BadHardlink { .. })
        ));
        t.add_hardlink("etc/z", "etc/x").unwrap();
        assert_eq!(t.file("etc/z"), Some(&b""[..]));
    }

    #[test]
    fn strips_setid_and_docs() {
        let mut t = Tree::new(1);
        t.add_file("usr/bin/mount", 0o4755, vec![1]).unwrap();
        t.add_dir("tmp", 0o1777).unwrap();
        t.add_file("usr/share/doc/runc/copyright", 0o644, vec![])
            .unwrap();
        t.add_file("usr/share/man/man8/runc.8.gz", 0o644, vec![])
            .unwrap();
        t.add_file("usr/share/zoneinfo/UTC", 0o644, vec![]).unwrap();
        assert_eq!(t.get("usr/bin/mount").unwrap().mode(), 0o755);
        assert_eq!(t.get("tmp").unwrap().mode(), 0o1777);
        assert_eq!(t.stripped_setid(), ["usr/bin/mount"]);
        assert_eq!(t.strip_docs(), 6);
        assert!(t.get("usr/share/zoneinfo/UTC").is_some());
        assert_eq!(t.remove_matching(|p| p.ends_with("zoneinfo")), 2);
    }

    fn check(tree: &Tree, expected: &[(&str, FindingKind)]) {
        let got: Vec<(String, FindingKind)> =
            audit(tree).into_iter().map(|f| (f.path, f.kind)).collect();
        let want: Vec<(String, FindingKind)> = expected
            .iter()
            .map(|(p, k)| (p.to_string(), k.clone()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn audit_finds_shells_package_managers_and_scripts() {
        let mut t = Tree::new(1);
        t.add_file("usr/bin/dash", 0o755, vec![]).unwrap();
        t.add_symlink("bin/sh", "/usr/bin/dash").unwrap();
        t.add_file("usr/local/lib/busybox", 0o755, vec![]).unwrap();
        t.add_file("usr/bin/dpkg", 0o755, vec![]).unwrap();
        t.add_file("usr/sbin/e2scrub", 0o755, b"#!/bin/bash\n".to_vec())
            .unwrap();
        t.add_file(
            "usr/bin/tool",
            0o755,
            b"#! /usr/bin/env -S zsh -e\n".to_vec(),
        )
        .unwrap();
        t.add_file("usr/bin/py", 0o755, b"#!/usr/bin/python3\n".to_vec())
            .unwrap();
        t.add_dir("usr/share/sh", 0o755).unwrap();
        t.add_file("usr/bin/bash-not", 0o755, vec![]).unwrap();
        check(
            &t,
            &[
                ("bin/sh", FindingKind::Shell),
                ("usr/bin/dash", FindingKind::Shell),
                ("usr/bin/dpkg", FindingKind::PackageManager),
                (
                    "usr/bin/tool",
                    FindingKind::ShellScript {
                        interpreter: "zsh".into(),
                    },
                ),
                ("usr/local/lib/busybox", FindingKind::Shell),
                (
                    "usr/sbin/e2scrub",
                    FindingKind::ShellScript {
                        interpreter: "/bin/bash".into(),
                    },
                ),
            ],
        );
    }

    #[test]
    fn audit_of_a_clean_tree_is_empty() {
        let mut t = Tree::new(1);
        t.add_file("sbin/init", 0o755, b"\x7fELF".to_vec()).unwrap();
        t.add_file("usr/bin/passwd", 0o4755, vec![]).unwrap();
        check(&t, &[]);
    }
}
