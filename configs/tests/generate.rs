//! Tests of config generation and TOML merge patches.

// Test helpers outside `#[test]` functions panic on purpose when a fixture is broken.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_configs::patch::{Patch, PatchError};

/// Applies `patch` to `target` and compares with `expected` (all TOML text).
fn check_patch(target: &str, patch: &str, expected: &str) {
    let mut table: toml::Table = toml::from_str(target).expect("target");
    let patch = Patch::from_toml_str(patch, "p.toml").expect("patch");
    patch.apply(&mut table);
    let expected: toml::Table = toml::from_str(expected).expect("expected");
    assert_eq!(table, expected, "patch {:?}", patch.table());
}

#[test]
fn merge_patch_semantics() {
    // Tables merge recursively; other keys are kept.
    check_patch(
        "[machine]\nhostname = \"a\"\ninstall_disk = \"/dev/vda\"",
        "[machine]\nhostname = \"b\"",
        "[machine]\nhostname = \"b\"\ninstall_disk = \"/dev/vda\"",
    );
    // New keys and new tables are added.
    check_patch(
        "[machine]\nhostname = \"a\"",
        "[machine.kubelet.extra_args]\nmax-pods = \"200\"",
        "[machine]\nhostname = \"a\"\n[machine.kubelet.extra_args]\nmax-pods = \"200\"",
    );
    // Arrays replace whole, never merge element-wise.
    check_patch(
        "[machine]\ntime_servers = [\"a\", \"b\"]",
        "[machine]\ntime_servers = [\"c\"]",
        "[machine]\ntime_servers = [\"c\"]",
    );
    // Arrays of tables replace whole too.
    check_patch(
        "[[machine.files]]\npath = \"/a\"\ncontent = \"x\"\n[[machine.files]]\npath = \"/b\"\ncontent = \"y\"",
        "[[machine.files]]\npath = \"/c\"\ncontent = \"z\"",
        "[[machine.files]]\npath = \"/c\"\ncontent = \"z\"",
    );
    // A scalar replaces a table, and a table replaces a scalar.
    check_patch("a = { b = 1 }", "a = 2", "a = 2");
    check_patch("a = 2", "a = { b = 1 }", "a = { b = 1 }");
    // The delete directive removes a key, a whole table, or nothing when absent.
    check_patch(
        "[machine]\nhostname = \"a\"\nswap = \"off\"",
        "[machine]\nhostname = { \"$patch\" = \"delete\" }",
        "[machine]\nswap = \"off\"",
    );
    check_patch(
        "[machine]\nhostname = \"a\"\n[machine.kubelet]\nextra_args = { a = \"1\" }",
        "machine.kubelet = { \"$patch\" = \"delete\" }",
        "[machine]\nhostname = \"a\"",
    );
    check_patch("a = 1", "missing = { \"$patch\" = \"delete\" }", "a = 1");
    // A directive inside a table that replaces a scalar is dropped (RFC 7386: starts from {}).
    check_patch(
        "a = 1",
        "a = { b = 2, c = { \"$patch\" = \"delete\" } }",
        "a = { b = 2 }",
    );
    // An empty patch changes nothing; an empty table adds an empty table only where none is.
    check_patch("a = { b = 1 }", "", "a = { b = 1 }");
    check_patch("a = { b = 1 }", "a = {}", "a = { b = 1 }");
}

#[test]
fn patches_apply_in_order() {
    let mut table: toml::Table = toml::from_str("x = 1").expect("target");
    for text in ["x = 2\ny = 1", "x = 3", "y = { \"$patch\" = \"delete\" }"] {
        Patch::from_toml_str(text, "p.toml")
            .expect("patch")
            .apply(&mut table);
    }
    assert_eq!(
        table,
        toml::from_str::<toml::Table>("x = 3").expect("expected")
    );
}

/// Loads a bad patch and checks the error message contains every `expected` part.
fn check_bad_patch(patch: &str, expected: &[&str]) {
    let err = Patch::from_toml_str(patch, "p.toml").expect_err(patch);
    let msg = err.to_string();
    for want in expected {
        assert!(msg.contains(want), "want {want:?} in {msg:?}");
    }
}

#[test]
fn bad_patches_are_refused_with_file_and_key() {
    check_bad_patch("a = ", &["p.toml:1:5", "not valid TOML"]);
    check_bad_patch("a = 1\na = 2", &["p.toml:2:1", "not valid TOML"]);
    check_bad_patch(
        "[machine]\nhostname = { \"$patch\" = \"remove\" }",
        &[
            "key `machine.hostname.$patch`",
            "the only directive is the string \"delete\"",
        ],
    );
    check_bad_patch(
        "[machine]\nhostname = { \"$patch\" = \"delete\", x = 1 }",
        &["key `machine.hostname`", "must be the only key"],
    );
    check_bad_patch(
        "\"$patch\" = \"delete\"",
        &["(the document)", "cannot be deleted"],
    );
    check_bad_patch(
        "[[machine.files]]\n\"$patch\" = \"delete\"",
        &["key `machine.files[0]`", "inside arrays"],
    );
    check_bad_patch(
        "x = { \"$patch\" = 1 }",
        &["key `x.$patch`", "to delete a key write"],
    );
}

#[test]
fn unreadable_and_binary_patch_files_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = Patch::load(&dir.path().join("nope.toml")).expect_err("missing");
    assert!(matches!(err, PatchError::Read { .. }));
    assert!(err.to_string().contains("nope.toml"), "{err}");
    let bin = dir.path().join("bin.toml");
    std::fs::write(&bin, b"a = 1\n\x80\x81").expect("write");
    let err = Patch::load(&bin).expect_err("binary");
    assert!(err.to_string().contains("not UTF-8"), "{err}");
    assert!(err.to_string().contains("offset 6"), "{err}");
}
