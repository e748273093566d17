//! The prefetch list of the root: the files stage 2 reads into the page cache on a
//! thread of its own while it does its first work (init's `prefetch` module), so that
//! the programs it then starts (mke2fs on a first boot, containerd, machined) do not
//! fault their pages in one by one through squashfs and dm-verity.
//!
//! For each program the definition names, the list holds the shared objects it loads
//! first (its ELF interpreter and the `DT_NEEDED` closure, looked up in the root's
//! library directories as the dynamic loader would), then the program itself; each
//! file once, as the absolute path of the regular file (symlinks followed), one a line.

use std::collections::BTreeSet;

use object::elf;
use object::read::elf::{Dyn, ElfFile64, FileHeader, ProgramHeader};

use crate::rootfs::{Node, Tree};

/// Where the list lives in the root (init reads it from there).
pub const LIST_PATH: &str = keelson_configs::layout::PREFETCH_LIST;

/// The library directories searched for a `DT_NEEDED` name, in order: Debian's
/// multiarch directories (only the image's own architecture has one), then the rest.
const LIB_DIRS: [&str; 4] = [
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib64",
    "usr/lib",
];

/// Symlink hops followed before a path is called a loop.
const MAX_HOPS: usize = 40;

/// Why the list cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    /// A program named by the definition is not a file of the root.
    #[error(
        "prefetch program /{0} is not a file of the root filesystem: fix `[prefetch] programs` in the image definition"
    )]
    NoProgram(String),
    /// A program or library is not an ELF file the list can read.
    #[error("prefetch: /{path} is not a 64-bit ELF file: {reason}")]
    BadElf {
        /// The file.
        path: String,
        /// What the ELF reader said.
        reason: String,
    },
    /// A shared object a program needs is missing.
    #[error(
        "prefetch: /{path} needs {name}, which the root filesystem does not have (looked in {dirs}): the image would not run it"
    )]
    Missing {
        /// The file that needs it.
        path: String,
        /// The missing name.
        name: String,
        /// Where it was looked for.
        dirs: String,
    },
}

/// The list for `programs` (root paths, with or without a leading `/`), in load order.
pub fn list(tree: &Tree, programs: &[String]) -> Result<Vec<String>, PrefetchError> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for program in programs {
        let path = resolve(tree, program.trim_start_matches('/'))
            .ok_or_else(|| PrefetchError::NoProgram(program.trim_start_matches('/').into()))?;
        visit(tree, &path, &mut seen, &mut out)?;
    }
    Ok(out.into_iter().map(|p| format!("/{p}")).collect())
}

/// Add `path`'s shared objects, then `path`, unless already there.
fn visit(
    tree: &Tree,
    path: &str,
    seen: &mut BTreeSet<String>,
    out: &mut Vec<String>,
) -> Result<(), PrefetchError> {
    if !seen.insert(path.to_string()) {
        return Ok(());
    }
    let data = tree.file(path).unwrap_or_default();
    let (interp, needed) = dynamic_deps(data).map_err(|reason| PrefetchError::BadElf {
        path: path.to_string(),
        reason,
    })?;
    let mut deps = Vec::new();
    if let Some(interp) = interp {
        let found = resolve(tree, interp.trim_start_matches('/')).ok_or_else(|| {
            PrefetchError::Missing {
                path: path.to_string(),
                name: interp.clone(),
                dirs: "its interpreter path".into(),
            }
        })?;
        deps.push(found);
    }
    for name in needed {
        let found = LIB_DIRS
            .iter()
            .find_map(|dir| resolve(tree, &format!("{dir}/{name}")))
            .ok_or_else(|| PrefetchError::Missing {
                path: path.to_string(),
                name: name.clone(),
                dirs: LIB_DIRS.map(|d| format!("/{d}")).join(", "),
            })?;
        deps.push(found);
    }
    for dep in deps {
        visit(tree, &dep, seen, out)?;
    }
    out.push(path.to_string());
    Ok(())
}

/// Follow symlinks (of the file and of the directories on its way, the `/lib64` of
/// merged-/usr included) to a regular file of the tree.
pub fn resolve(tree: &Tree, path: &str) -> Option<String> {
    let mut path = path.trim_start_matches('/').to_string();
    'hops: for _ in 0..MAX_HOPS {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for i in 0..parts.len() {
            let prefix = parts[..=i].join("/");
            match tree.get(&prefix).map(|e| e.node()) {
                Some(Node::Symlink(target)) => {
                    let base = if target.starts_with('/') {
                        String::new()
                    } else {
                        parts[..i].join("/")
                    };
                    let rest = parts[i + 1..].join("/");
                    path = normalise(&format!("{base}/{target}/{rest}"))?;
                    continue 'hops;
                }
                Some(Node::File(_)) if i + 1 == parts.len() => return Some(prefix),
                Some(Node::Dir) if i + 1 < parts.len() => {}
                _ => return None,
            }
        }
        return None;
    }
    None
}

/// `a/./b/../c` → `a/c`; `None` when `..` climbs above the root.
fn normalise(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// The ELF interpreter and the `DT_NEEDED` names of a 64-bit ELF file (none for a
/// static one).
pub fn dynamic_deps(data: &[u8]) -> Result<(Option<String>, Vec<String>), String> {
    let file = ElfFile64::<object::Endianness>::parse(data).map_err(|e| e.to_string())?;
    let endian = file.endian();
    let header = file.elf_header();
    let mut interp = None;
    for ph in header
        .program_headers(endian, data)
        .map_err(|e| e.to_string())?
    {
        if let Some(bytes) = ph.interpreter(endian, data).map_err(|e| e.to_string())? {
            interp = Some(String::from_utf8_lossy(bytes).into_owned());
        }
    }
    let sections = header.sections(endian, data).map_err(|e| e.to_string())?;
    let mut needed = Vec::new();
    // The index that comes with the entries is their string table's (`sh_link`).
    if let Some((entries, strtab)) = sections.dynamic(endian, data).map_err(|e| e.to_string())? {
        let strings = sections
            .strings(endian, data, strtab)
            .map_err(|e| e.to_string())?;
        for entry in entries {
            if entry.tag(endian) == elf::DT_NEEDED {
                let name = entry.string(endian, strings).map_err(|e| e.to_string())?;
                needed.push(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    Ok((interp, needed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test binary itself: a dynamic ELF on the gnu targets the suite runs on.
    fn own_binary() -> Vec<u8> {
        let exe = std::env::current_exe().unwrap();
        std::fs::read(exe).unwrap()
    }

    #[test]
    fn a_program_comes_after_its_interpreter_and_libraries_each_once() {
        let exe = own_binary();
        let (interp, needed) = dynamic_deps(&exe).unwrap();
        let Some(interp) = interp else {
            // A static test binary (musl host): nothing to follow.
            return;
        };
        assert!(
            needed.iter().any(|n| n.starts_with("libc.so")),
            "{needed:?}"
        );
        let mut tree = Tree::new(0);
        // Merged /usr: /lib64 -> usr/lib64; the interpreter a symlink into multiarch.
        tree.add_symlink("lib64", "usr/lib64").unwrap();
        let interp_name = interp.rsplit('/').next().unwrap().to_string();
        tree.add_symlink(
            &format!("usr/lib64/{interp_name}"),
            &format!("../lib/x86_64-linux-gnu/{interp_name}"),
        )
        .unwrap();
        // Every shared object is a copy of the test binary: an ELF file with the same
        // needs, which are then seen already.
        tree.add_file(
            &format!("usr/lib/x86_64-linux-gnu/{interp_name}"),
            0o755,
            exe.clone(),
        )
        .unwrap();
        for name in &needed {
            tree.add_file(
                &format!("usr/lib/x86_64-linux-gnu/{name}"),
                0o644,
                exe.clone(),
            )
            .unwrap();
        }
        tree.add_file("usr/bin/one", 0o755, exe.clone()).unwrap();
        tree.add_file("usr/bin/two", 0o755, exe).unwrap();
        let got = list(&tree, &["/usr/bin/one".into(), "usr/bin/two".into()]).unwrap();
        let lib = |name: &str| format!("/usr/lib/x86_64-linux-gnu/{name}");
        // Depth first: every shared object before the programs, each once.
        let mut want: BTreeSet<String> = needed.iter().map(|n| lib(n)).collect();
        want.insert(lib(&interp_name));
        let (shared, programs) = got.split_at(got.len() - 2);
        assert_eq!(programs, ["/usr/bin/one", "/usr/bin/two"]);
        assert_eq!(shared.len(), want.len(), "{got:?}");
        assert_eq!(shared.iter().cloned().collect::<BTreeSet<_>>(), want);

        // A library that is missing is named, with where it was looked for.
        tree.remove(&lib(&needed[0]));
        let err = list(&tree, &["usr/bin/one".into()]).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "prefetch: /usr/bin/one needs {}, which the root filesystem does not have",
                needed[0]
            )),
            "{err}"
        );
    }

    #[test]
    fn symlinks_are_followed_and_missing_things_are_named() {
        let mut tree = Tree::new(0);
        tree.add_symlink("sbin", "usr/sbin").unwrap();
        tree.add_file("usr/sbin/real", 0o755, b"x".to_vec())
            .unwrap();
        tree.add_symlink("usr/sbin/link", "real").unwrap();
        tree.add_symlink("usr/sbin/up", "../sbin/./link").unwrap();
        assert_eq!(resolve(&tree, "/sbin/up").as_deref(), Some("usr/sbin/real"));
        tree.add_symlink("usr/sbin/loop", "loop").unwrap();
        assert_eq!(resolve(&tree, "usr/sbin/loop"), None);
        assert_eq!(resolve(&tree, "usr/sbin"), None);
        let err = list(&tree, &["/usr/bin/containerd".into()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "prefetch program /usr/bin/containerd is not a file of the root filesystem: fix `[prefetch] programs` in the image definition"
        );
    }
}
