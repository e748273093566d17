//! Tidy checks of init's source, kept as tests (as rust-analyzer keeps its own): init's
//! modules import each other without a cycle, the places allowed to call what clippy's
//! `disallowed-methods` forbids PID 1 stay the few that are listed, and no file or
//! function outgrows the size rules ([`sizes`]).
//!
//! The checker ([`checker`]) is tested on small fixture trees under
//! `tests/tidy_fixtures/`: one without a cycle, one with a plain cycle, and one whose
//! cycle only shows through a grouped `use crate::{...}`.

mod checker;
mod sizes;

use std::path::{Path, PathBuf};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    crate_dir()
        .join("tests/tidy_fixtures")
        .join(name)
        .join("src")
}

/// The cycle the checker finds in `src`, as `a -> b -> a`, or `None`.
fn cycle_in(src: &Path) -> Option<String> {
    let graph = match checker::graph(src) {
        Ok(graph) => graph,
        Err(e) => panic!("cannot read {}: {e}", src.display()),
    };
    graph.cycle().map(|c| c.join(" -> "))
}

fn check_cycle(fixture_name: &str, expected: Option<&str>) {
    assert_eq!(
        cycle_in(&fixture(fixture_name)).as_deref(),
        expected,
        "fixture {fixture_name}"
    );
}

#[test]
fn the_checker_finds_no_cycle_where_there_is_none() {
    check_cycle("acyclic", None);
    let graph = checker::graph(&fixture("acyclic")).unwrap_or_default();
    let edges: Vec<(String, Vec<String>)> = graph
        .edges
        .iter()
        .map(|(from, to)| (from.clone(), to.iter().cloned().collect()))
        .collect();
    // Comments and strings that name modules are no edges; `super::super::log` is one.
    assert_eq!(
        edges,
        [
            ("api".into(), vec!["log".into(), "store".into()]),
            ("log".into(), vec![]),
            ("store".into(), vec!["log".into()]),
        ]
    );
}

#[test]
fn the_checker_names_a_cycle() {
    check_cycle("cycle", Some("a -> b -> c -> a"));
}

#[test]
fn the_checker_sees_a_cycle_hidden_in_a_grouped_use() {
    check_cycle("grouped", Some("events -> net -> events"));
}

#[test]
fn the_checker_reads_groups_and_super_chains() {
    let refs = |text: &str, module: &[&str]| -> Vec<String> {
        let module: Vec<String> = module.iter().map(|m| m.to_string()).collect();
        checker::references(text, &module).into_iter().collect()
    };
    assert_eq!(refs("use crate::{a, b::{c, d}, self};", &["x"]), ["a", "b"]);
    assert_eq!(refs("fn f() { crate::e::g(); }", &["x"]), ["e"]);
    assert_eq!(refs("use super::super::h;", &["x", "y"]), ["h"]);
    assert!(refs("use super::h;", &["x", "y"]).is_empty());
    assert!(refs("// use crate::a;\nlet s = \"crate::b\";", &["x"]).is_empty());
    assert!(
        refs(
            "let c = '\"'; /* crate::q */ let r = r#\"crate::z\"#;",
            &["x"]
        )
        .is_empty()
    );
}

#[test]
fn init_modules_import_each_other_without_a_cycle() {
    let src = crate_dir().join("src");
    let graph = match checker::graph(&src) {
        Ok(graph) => graph,
        Err(e) => panic!("cannot read {}: {e}", src.display()),
    };
    if let Some(cycle) = graph.cycle() {
        panic!(
            "init's modules import each other in a cycle: {}\n\
             break it: the producer owns its message type and gets a typed sender \
             (`sender::Sender`), or what both sides need moves into a leaf module",
            cycle.join(" -> ")
        );
    }
    println!(
        "init: {} modules, {} edges, no cycle",
        graph.edges.len(),
        graph.edge_count()
    );
}

/// The files whose non-test code may call what `init/clippy.toml`'s `disallowed-methods`
/// forbids (under an `#[allow]` with its reason): the supervisor's runner starts the
/// services, and the real `Syscalls` is where PID 1 writes (STATE's atomic write lives
/// in the node protocol crate, `init/protocol`).
const MAY_CALL_DISALLOWED: &[&str] = &["supervisor/runner.rs", "syscalls.rs"];

#[test]
fn only_the_listed_files_allow_disallowed_methods() {
    let src = crate_dir().join("src");
    let nodes = match checker::nodes(&src) {
        Ok(nodes) => nodes,
        Err(e) => panic!("cannot read {}: {e}", src.display()),
    };
    let mut roots = Vec::new();
    for root in checker::ROOTS {
        let path = src.join(root);
        if let Ok(text) = std::fs::read_to_string(&path) {
            roots.push(checker::SourceFile {
                path: PathBuf::from(root),
                module: Vec::new(),
                text,
            });
        }
    }
    let offenders: Vec<String> = nodes
        .values()
        .flatten()
        .chain(&roots)
        .filter(|file| {
            checker::non_test_part(file).contains("allow(clippy::disallowed_methods)")
                && !MAY_CALL_DISALLOWED.contains(&file.path.to_string_lossy().as_ref())
        })
        .map(|file| file.path.display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "init/src/{{{}}} allow clippy::disallowed_methods: PID 1 starts programs only in \
         the supervisor's runner and writes files only through `Syscalls` (see \
         init/clippy.toml); only {} may allow it",
        offenders.join(", "),
        MAY_CALL_DISALLOWED.join(", ")
    );
}

/// What `init/clippy.toml` must forbid PID 1 to call directly.
const DISALLOWED: &[&str] = &[
    "std::process::Command::new",
    "std::fs::write",
    "std::fs::File::create",
    "std::fs::OpenOptions::open",
    "std::fs::rename",
    "std::fs::remove_file",
    "std::fs::create_dir",
    "std::fs::create_dir_all",
    "std::fs::set_permissions",
];

#[test]
fn clippy_forbids_what_pid1_must_not_call_directly() {
    let path = crate_dir().join("clippy.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let missing: Vec<&str> = DISALLOWED
        .iter()
        .copied()
        .filter(|method| !text.contains(&format!("path = \"{method}\"")))
        .collect();
    assert!(
        missing.is_empty(),
        "{} does not list {} in disallowed-methods",
        path.display(),
        missing.join(", ")
    );
    // Clippy reads the nearest clippy.toml only: the root's settings must be repeated.
    let root = std::fs::read_to_string(crate_dir().join("../clippy.toml")).unwrap_or_default();
    for line in root
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        assert!(
            text.contains(line),
            "{} lacks the root's {line:?}",
            path.display()
        );
    }
}

#[test]
fn init_keeps_to_the_size_rules() {
    let mut found = Vec::new();
    for dir in ["src", "netconf/src", "protocol/src"] {
        let root = crate_dir().join(dir);
        match sizes::oversized(&root) {
            Ok(v) => found.extend(v),
            Err(e) => panic!("cannot read {}: {e}", root.display()),
        }
    }
    assert!(
        found.is_empty(),
        "init outgrew its size rules:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_size_rules_see_a_long_file_and_a_long_function() {
    let long_fn = |name: &str, indent: &str, body: usize| {
        let mut text = format!("{indent}pub(crate) async fn {name}(x: u8) -> u8 {{\n");
        for _ in 0..body {
            text.push_str(&format!("{indent}    let _ = x;\n"));
        }
        text.push_str(&format!("{indent}}}\n"));
        text
    };
    let path = Path::new("x.rs");
    // 118 body lines + 2 = 120: allowed; one more is not.
    assert!(sizes::check_file(path, &long_fn("fits", "", 118)).is_empty());
    assert_eq!(
        sizes::check_file(path, &long_fn("grew", "    ", 119)),
        ["x.rs:1 fn grew: 121 lines (at most 120): split it into steps"]
    );
    // A trait's declaration has no body; tests after `#[cfg(test)]` do not count.
    let text = format!(
        "trait T {{\n    fn f(&self)\n        -> u8;\n}}\n#[cfg(test)]\n{}",
        long_fn("test_helper", "", 500)
    );
    assert!(sizes::check_file(path, &text).is_empty());
    let long_file = "const X: u8 = 0;\n".repeat(801);
    assert_eq!(
        sizes::check_file(path, &long_file),
        ["x.rs: 801 lines before its tests (at most 800): split it by job"]
    );
}

/// The Markdown table under `header` in `text`, its rows without a `//! ` prefix.
fn table(text: &str, header: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.strip_prefix("//! ").unwrap_or(l))
        .skip_while(|l| !l.starts_with(header))
        .take_while(|l| l.starts_with('|'))
        .map(str::to_string)
        .collect()
}

#[test]
fn architecture_md_has_the_lifecycle_tables_of_the_code() {
    let read = |path: PathBuf| {
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
    };
    let architecture = read(crate_dir().join("../ARCHITECTURE.md"));
    for (file, header) in [
        ("src/lifecycle/mod.rs", "| phase | input |"),
        ("src/lifecycle/plan.rs", "| step | after | gate |"),
    ] {
        let code = table(&read(crate_dir().join(file)), header);
        assert!(code.len() > 2, "no table {header:?} in {file}");
        assert_eq!(
            table(&architecture, header),
            code,
            "ARCHITECTURE.md's table {header:?} differs from {file}'s doc: copy it over"
        );
    }
}
