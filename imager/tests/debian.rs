//! Tests of the Debian inputs: versions, Packages/Release parsing, resolution, the
//! image definition, lock files, the download cache (against a local HTTP server on
//! 127.0.0.1) and `.deb` reading. No test touches the network beyond loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};

use keelson_configs::layout::Arch;
use keelson_imager::debian::deb::{self, Entry, EntryKind};
use keelson_imager::debian::fetch::Cache;
use keelson_imager::debian::index::{Index, Release};
use keelson_imager::debian::lock::{Lock, LockError};
use keelson_imager::debian::mirror::{self, Mirror};
use keelson_imager::debian::resolve::{Exclusion, Request, resolve};
use keelson_imager::debian::version::Version;
use keelson_imager::debian::{Progress, quiet_progress};
use keelson_imager::definition::Definition;
use sha2::{Digest, Sha256};

/// A temporary directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "keelson-debian-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, AtomicOrdering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

// ---------------------------------------------------------------- versions

#[test]
fn debian_versions_compare_like_dpkg() {
    fn check(a: &str, b: &str, expected: Ordering) {
        let (va, vb) = (Version::parse(a).unwrap(), Version::parse(b).unwrap());
        assert_eq!(va.cmp(&vb), expected, "{a} vs {b}");
        assert_eq!(vb.cmp(&va), expected.reverse(), "{b} vs {a}");
    }
    use Ordering::*;
    check("1.0", "1.0", Equal);
    check("1.0", "1.00", Equal);
    check("0:1.0", "1.0", Equal);
    check("1.0", "1.0-0", Equal);
    check("1.0~rc1", "1.0", Less);
    check("1.0~~", "1.0~", Less);
    check("1.0~", "1.0", Less);
    check("1.0a", "1.0", Greater);
    check("1.0a", "1.0.", Less);
    check("1.0.", "1.0", Greater);
    check("1.0+b1", "1.0", Greater);
    check("1.2.10", "1.2.9", Greater);
    check("1:0.1", "2.0", Greater);
    check("1.0-1", "1.0-2", Less);
    check("1.0-10", "1.0-9", Greater);
    check("2.41-12+deb13u5", "2.41-12", Greater);
    check("1.7.24~ds1-6+deb13u1", "1.7.24-1", Less);
    check("257.13-1~deb13u1", "257.13-1", Less);
    check("1:4.17.4-2", "4.17.4-2", Greater);
    check("6.12.117-1", "6.12.57-1", Greater);
    check("1.0-a-1", "1.0-a-2", Less);

    let v = Version::parse("1:2.5.2-3+b1").unwrap();
    assert_eq!(
        (v.epoch(), v.upstream(), v.revision()),
        (1, "2.5.2", "3+b1")
    );
    assert_eq!(v.to_string(), "1:2.5.2-3+b1");
    assert!(Version::parse("").is_err());
    assert!(Version::parse("x:1.0").is_err());
    assert!(Version::parse("-1").is_err());
}

// ---------------------------------------------------------------- index

fn entry(name: &str, version: &str, fields: &str) -> String {
    let sum = sha256(name.as_bytes());
    format!(
        "Package: {name}\nVersion: {version}\nArchitecture: amd64\n{fields}Filename: pool/main/{n}/{name}/{name}_{version}_amd64.deb\nSize: {}\nSHA256: {sum}\nDescription: the {name} package\n long description line\n .\n more\n\n",
        100 + name.len(),
        n = &name[..1],
    )
}

#[test]
fn packages_index_parses_relations() {
    let text = entry(
        "app",
        "1:2.0-1",
        "Pre-Depends: libc6 (>= 2.38)\nDepends: libfoo (<< 2.0~) | libbar:any, sh-thing [amd64],\n python3:any (>= 3.11)\nProvides: app-virtual (= 1:2.0-1), plain-virtual\n",
    ) + &entry("libc6", "2.41-12", "");
    let index = Index::parse(&text, "test Packages").unwrap();
    assert_eq!(index.packages().len(), 2);
    let app = index.get(index.named("app")[0]);
    assert_eq!(app.version.to_string(), "1:2.0-1");
    assert_eq!(app.arch, "amd64");
    assert_eq!(app.filename, "pool/main/a/app/app_1:2.0-1_amd64.deb");
    assert_eq!(app.size, 103);
    assert_eq!(app.sha256, sha256(b"app"));
    let deps: Vec<String> = app
        .pre_depends
        .iter()
        .chain(&app.depends)
        .map(|d| d.to_string())
        .collect();
    assert_eq!(
        deps,
        [
            "libc6 (>= 2.38)",
            "libfoo (<< 2.0~) | libbar",
            "sh-thing",
            "python3 (>= 3.11)"
        ]
    );
    assert_eq!(app.provides.len(), 2);
    assert_eq!(app.provides[0].name, "app-virtual");
    assert_eq!(
        app.provides[0].version.as_ref().map(|v| v.to_string()),
        Some("1:2.0-1".to_string())
    );
    assert!(app.provides[1].version.is_none());
    assert_eq!(index.providers("plain-virtual"), index.named("app"));
    assert!(index.named("nothing").is_empty());

    let err = Index::parse("Package: x\nVersion: 1\n\n", "test Packages").unwrap_err();
    assert_eq!(
        err.to_string(),
        "test Packages: paragraph 1 (x) has no `Size` field"
    );
}

#[test]
fn release_file_lists_index_sums() {
    let text = "Origin: Debian\nCodename: trixie\nVersion: 13.2\nDate: Sat, 15 Nov 2025 10:00:00 UTC\nMD5Sum:\n 0123 10 main/binary-amd64/Packages.xz\nSHA256:\n ABCDEF 1234 main/binary-amd64/Packages.xz\n 999999 77 main/binary-arm64/Packages.xz\n";
    let r = Release::parse(text, "test Release").unwrap();
    assert_eq!(r.codename, "trixie");
    assert_eq!(r.version, "13.2");
    assert_eq!(r.date, "Sat, 15 Nov 2025 10:00:00 UTC");
    assert_eq!(
        r.entry("main/binary-amd64/Packages.xz"),
        Some((1234, "abcdef"))
    );
    assert_eq!(
        r.entry("main/binary-arm64/Packages.xz"),
        Some((77, "999999"))
    );
    assert_eq!(r.entry("main/binary-i386/Packages.xz"), None);
}

// ---------------------------------------------------------------- resolver

fn synthetic_index() -> Index {
    let mut text = String::new();
    for (name, version, fields) in [
        ("libc6", "2.41-12", "Depends: libgcc-s1\n"),
        ("libgcc-s1", "14.2.0-19", "Depends: libc6 (>= 2.35)\n"),
        ("libfoo", "1.0-1", "Depends: libc6\n"),
        ("libfoo", "2.0-1", "Depends: libc6\n"),
        (
            "app",
            "1.0-1",
            "Pre-Depends: dash\nDepends: libfoo (<< 2.0), exim4 | postfix, awk, sh | dash, debconf (>= 0.5) | debconf-2.0\n",
        ),
        ("exim4", "4.98-1", ""),
        ("postfix", "3.9-1", "Depends: libc6\n"),
        ("mawk", "1.3.4-1", "Provides: awk\n"),
        ("gawk", "5.2-1", "Provides: awk\n"),
        ("dash", "0.5.12-1", "Provides: sh\n"),
        ("debconf", "1.5.91", "Provides: debconf-2.0\n"),
        ("cdebconf", "0.280", "Provides: debconf-2.0\n"),
        ("tool", "3.0-1", "Depends: app, awk, libfoo\n"),
        (
            "linux-image-amd64",
            "6.12.57-1",
            "Depends: linux-image-6.12.57+deb13-amd64 (= 6.12.57-1)\n",
        ),
        (
            "linux-image-6.12.57+deb13-amd64",
            "6.12.57-1",
            "Depends: kmod, linux-base\n",
        ),
        ("broken", "1.0", "Depends: nowhere-to-be-found (>= 1)\n"),
    ] {
        text.push_str(&entry(name, version, fields));
    }
    Index::parse(&text, "synthetic Packages").unwrap()
}

fn req(name: &str, deps: bool, metapackage: bool) -> Request {
    Request {
        name: name.to_string(),
        deps,
        metapackage,
        location: "images/test.toml:3:9".to_string(),
        why: "requested".to_string(),
    }
}

fn exclusions() -> Vec<Exclusion> {
    ["dash", "exim4", "debconf", "debconf-2.0", "sh"]
        .iter()
        .map(|n| Exclusion {
            name: n.to_string(),
            reason: format!("no {n}"),
        })
        .collect()
}

#[test]
fn resolver_closes_over_dependencies_and_records_exclusions() {
    fn check(requests: &[Request], packages: &[(&str, &str, &str)], excluded: &[(&str, &str)]) {
        let index = synthetic_index();
        let r = resolve(&index, requests, &exclusions()).unwrap();
        let got: Vec<(String, String, String)> = r
            .packages
            .iter()
            .map(|p| {
                (
                    p.package.name.clone(),
                    p.package.version.to_string(),
                    p.why.clone(),
                )
            })
            .collect();
        let want: Vec<(String, String, String)> = packages
            .iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect();
        assert_eq!(got, want);
        let got: Vec<(String, String)> = r
            .excluded
            .iter()
            .map(|e| (e.name.clone(), e.required_by.clone()))
            .collect();
        let want: Vec<(String, String)> = excluded
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(got, want);
        assert!(
            r.excluded
                .iter()
                .all(|e| e.reason == format!("no {}", e.name))
        );
    }

    // Alternatives (exim4 excluded -> postfix), virtual packages (awk -> first
    // provider by name), version constraints (libfoo << 2.0 -> 1.0-1), exclusions
    // recorded (dash directly and via `sh | dash`, debconf via `debconf | debconf-2.0`).
    check(
        &[req("app", true, false)],
        &[
            ("app", "1.0-1", "requested"),
            ("gawk", "5.2-1", "dependency of app"),
            (
                "libc6",
                "2.41-12",
                "dependency of libfoo, libgcc-s1, postfix",
            ),
            ("libfoo", "1.0-1", "dependency of app"),
            ("libgcc-s1", "14.2.0-19", "dependency of libc6"),
            ("postfix", "3.9-1", "dependency of app"),
        ],
        &[("dash", "app"), ("debconf", "app"), ("sh", "app")],
    );
    // An already chosen package satisfies later dependencies: `tool` wants libfoo
    // (any version) and awk, both already there through `app`.
    check(
        &[req("app", true, false), req("tool", true, false)],
        &[
            ("app", "1.0-1", "requested"),
            ("gawk", "5.2-1", "dependency of app, tool"),
            (
                "libc6",
                "2.41-12",
                "dependency of libfoo, libgcc-s1, postfix",
            ),
            ("libfoo", "1.0-1", "dependency of app, tool"),
            ("libgcc-s1", "14.2.0-19", "dependency of libc6"),
            ("postfix", "3.9-1", "dependency of app"),
            ("tool", "3.0-1", "requested"),
        ],
        &[("dash", "app"), ("debconf", "app"), ("sh", "app")],
    );
    // A metapackage taken "files only": the versioned kernel, none of its dependencies.
    check(
        &[Request {
            why: "kernel".to_string(),
            ..req("linux-image-amd64", false, true)
        }],
        &[(
            "linux-image-6.12.57+deb13-amd64",
            "6.12.57-1",
            "kernel (via linux-image-amd64 6.12.57-1)",
        )],
        &[],
    );
    // Without a constraint, the highest version wins.
    check(
        &[req("libfoo", true, false)],
        &[
            ("libc6", "2.41-12", "dependency of libfoo, libgcc-s1"),
            ("libfoo", "2.0-1", "requested"),
            ("libgcc-s1", "14.2.0-19", "dependency of libc6"),
        ],
        &[],
    );
}

#[test]
fn resolver_errors_name_the_input() {
    fn check(requests: &[Request], expected: &str) {
        let err = resolve(&synthetic_index(), requests, &exclusions()).unwrap_err();
        assert_eq!(err.to_string(), expected);
    }
    check(
        &[req("ap", true, false)],
        "unknown package `ap` in images/test.toml:3:9; did you mean `app`?; fix the name or remove it",
    );
    check(
        &[req("zzzzzzzzzzzz", true, false)],
        "unknown package `zzzzzzzzzzzz` in images/test.toml:3:9; fix the name or remove it",
    );
    check(
        &[req("dash", true, false)],
        "package `dash` requested in images/test.toml:3:9 is excluded (no dash); remove it from the packages or from the exclude list",
    );
    check(
        &[req("broken", true, false)],
        "dependency `nowhere-to-be-found (>= 1)` of `broken` is satisfied by no package of the index; the suite may be inconsistent, or exclude `broken`'s requester",
    );
}

// ---------------------------------------------------------------- definition and lock

const DEFINITION: &str = r#"name = "test"
suite = "trixie"
cmdline = ["quiet"]

[partitions]
efi_mib = 128
root_mib = 512
state_mib = 100
ephemeral_mib = 64

[arch.amd64]
kernel = { package = "linux-image-amd64", metapackage = true }
cmdline = ["console=ttyS0"]

[[package]]
name = "app"

[[package]]
name = "tool"
deps = false
arch = ["amd64"]

[[exclude]]
name = "dash"
reason = "no dash"

[modules]
initramfs = ["dm_verity"]
root = ["overlay"]
"#;

#[test]
fn definition_loads_and_locates_packages() {
    let def = Definition::parse(DEFINITION, Path::new("images/test.toml")).unwrap();
    assert_eq!(def.cmdline(Arch::Amd64).unwrap(), "quiet console=ttyS0");
    assert_eq!(def.partitions.root_mib, 512);
    assert_eq!(
        def.lock_path(Arch::Amd64),
        PathBuf::from("images/test-amd64.lock")
    );
    let reqs = def.requests(Arch::Amd64).unwrap();
    let got: Vec<(&str, bool, bool, &str, &str)> = reqs
        .iter()
        .map(|r| {
            (
                r.name.as_str(),
                r.deps,
                r.metapackage,
                r.location.as_str(),
                r.why.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "linux-image-amd64",
                false,
                true,
                "images/test.toml:12:22",
                "kernel"
            ),
            ("app", true, false, "images/test.toml:16:8", "requested"),
            (
                "tool",
                false,
                false,
                "images/test.toml:19:8",
                "requested (files only)"
            ),
        ]
    );
    let err = def.requests(Arch::Arm64).unwrap_err();
    assert!(err.to_string().contains("no [arch.arm64] section"), "{err}");

    // Unknown package, reported at its place in the file.
    let typo = DEFINITION.replace("name = \"app\"", "name = \"appp\"");
    let def = Definition::parse(&typo, Path::new("images/test.toml")).unwrap();
    let err = resolve(
        &synthetic_index(),
        &def.requests(Arch::Amd64).unwrap(),
        &def.exclusions(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown package `appp` in images/test.toml:16:8; did you mean `app`?; fix the name or remove it"
    );

    // Strict: unknown keys are refused.
    let bad = DEFINITION.replace("suite = ", "suit = ");
    let err = Definition::parse(&bad, Path::new("images/test.toml")).unwrap_err();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(chain.contains("images/test.toml is invalid"), "{chain}");
    assert!(chain.contains("suit"), "{chain}");
}

fn lock_text(packages: &[(&str, &[u8])], definition_sha256: &str) -> String {
    let mut text = format!(
        "format = 1\ndefinition_sha256 = \"{definition_sha256}\"\nsuite = \"trixie\"\narch = \"amd64\"\nrelease_version = \"13.2\"\nrelease_date = \"Sat, 15 Nov 2025 10:00:00 UTC\"\npackages_index_sha256 = \"{}\"\nkernel = \"linux-image-6.12.57+deb13-amd64\"\n",
        sha256(b"index")
    );
    for (name, data) in packages {
        text.push_str(&format!(
            "\n[[package]]\nname = \"{name}\"\nversion = \"1.0-1\"\narch = \"amd64\"\nfilename = \"pool/main/{n}/{name}/{name}_1.0-1_amd64.deb\"\nsize = {}\nsha256 = \"{}\"\nwhy = \"requested\"\n",
            data.len(),
            sha256(data),
            n = &name[..1],
        ));
    }
    text.push_str("\n[[excluded]]\nname = \"dash\"\nrequired_by = \"app\"\nreason = \"no dash\"\n");
    text
}

#[test]
fn lock_round_trips_and_detects_staleness() {
    let dir = TempDir::new("lock");
    let def = Definition::parse(DEFINITION, &dir.0.join("test.toml")).unwrap();
    let hash = def.resolution_sha256(Arch::Amd64).unwrap();
    let mut lock = Lock::parse(
        &lock_text(&[("app", b"app data"), ("tool", b"tool")], &hash),
        Path::new("x.lock"),
    )
    .unwrap();
    assert_eq!(lock.kernel_release(), "6.12.57+deb13-amd64");
    assert_eq!(lock.total_size(), 12);
    assert_eq!(lock.excluded[0].name, "dash");

    let path = def.lock_path(Arch::Amd64);
    lock.save(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.starts_with("# Generated by `cargo xtask lock`"),
        "{text}"
    );
    let loaded = Lock::load(&path).unwrap();
    assert_eq!(loaded.packages, lock.packages);
    assert_eq!(loaded.excluded, lock.excluded);
    assert_eq!(loaded.to_text().unwrap(), text);
    loaded.check_matches(&def, Arch::Amd64).unwrap();

    // What does not affect resolution does not make the lock stale...
    let changed = DEFINITION
        .replace("[\"quiet\"]", "[\"quiet\", \"debug\"]")
        .replace("\"overlay\"", "\"overlay\", \"veth\"");
    let def2 = Definition::parse(&changed, &dir.0.join("test.toml")).unwrap();
    loaded.check_matches(&def2, Arch::Amd64).unwrap();

    // ...but a package, an exclusion or the suite does.
    for change in [
        DEFINITION.replace("name = \"app\"", "name = \"app2\""),
        DEFINITION.replace("deps = false\n", ""),
        DEFINITION.replace("reason = \"no dash\"", "reason = \"no shells\""),
        DEFINITION.replace("suite = \"trixie\"", "suite = \"forky\""),
    ] {
        let def3 = Definition::parse(&change, &dir.0.join("test.toml")).unwrap();
        let err = loaded.check_matches(&def3, Arch::Amd64).unwrap_err();
        assert!(matches!(err, LockError::Stale { .. }));
        assert_eq!(
            err.to_string(),
            format!(
                "{} is stale: it was made from a different {} (packages, kernel, exclusions or suite changed); run `cargo xtask lock`",
                path.display(),
                dir.0.join("test.toml").display()
            )
        );
    }

    let err = Lock::parse("format = 2", Path::new("x.lock")).unwrap_err();
    assert!(err.to_string().contains("run `cargo xtask lock`"), "{err}");
}

#[test]
fn committed_definition_and_locks_agree() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images");
    let def = Definition::load(&root.join("keelson.toml")).unwrap();
    for arch in Arch::ALL {
        let lock = Lock::load(&def.lock_path(arch)).unwrap();
        lock.check_matches(&def, arch).unwrap();
        let names: Vec<&str> = lock.packages.iter().map(|p| p.name.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "lock packages are sorted");
        for shell in [
            "dash",
            "bash",
            "busybox",
            "dpkg",
            "apt",
            "perl-base",
            "debconf",
        ] {
            assert!(!names.contains(&shell), "{shell} in the {arch} lock");
        }
        for wanted in ["containerd", "runc", "etcd-server", "e2fsprogs", "libc6"] {
            assert!(
                names.contains(&wanted),
                "{wanted} missing from the {arch} lock"
            );
        }
        assert!(
            lock.kernel.starts_with("linux-image-6.12"),
            "{}",
            lock.kernel
        );
        assert!(lock.kernel_release().ends_with(arch.debian()));
        for p in &lock.packages {
            assert!(p.filename.starts_with("pool/"), "{}", p.filename);
            assert_eq!(p.sha256.len(), 64);
        }
    }
}

// ---------------------------------------------------------------- mirror discovery

#[test]
fn apt_sources_name_the_mirror() {
    fn check_deb822(text: &str, expected: Option<&str>) {
        assert_eq!(mirror::from_deb822(text).as_deref(), expected, "{text}");
    }
    check_deb822(
        "Types: deb\nURIs: http://mirror.test/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://mirror.test/debian-security\nSuites: bookworm-security\nComponents: main\n",
        Some("http://mirror.test/debian"),
    );
    check_deb822(
        "Types: deb\nURIs: http://mirror.test/debian-security\nSuites: bookworm-security\nComponents: main\n\n# comment\nTypes: deb-src deb\nURIs: https://tls.test/debian http://second.test/debian/\nSuites: trixie\nComponents: contrib main\n",
        Some("http://second.test/debian/"),
    );
    check_deb822(
        "Types: deb\nURIs: http://mirror.test/debian\nSuites: bookworm\nComponents: contrib\n",
        None,
    );
    check_deb822(
        "Enabled: no\nTypes: deb\nURIs: http://mirror.test/debian\nSuites: bookworm\nComponents: main\n",
        None,
    );
    check_deb822(
        "Types: deb-src\nURIs: http://mirror.test/debian\nSuites: bookworm\nComponents: main\n",
        None,
    );
    check_deb822(
        "Types: deb\nURIs: http://ppa.test/ubuntu\nSuites: noble\nComponents: main\n",
        None,
    );

    fn check_one_line(text: &str, expected: Option<&str>) {
        assert_eq!(mirror::from_one_line(text).as_deref(), expected, "{text}");
    }
    check_one_line(
        "# comment\ndeb http://mirror.test/debian-security bookworm-security main\ndeb-src http://src.test/debian bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.test/debian bookworm main contrib\n",
        Some("http://mirror.test/debian"),
    );
    check_one_line("deb https://tls.test/debian trixie main\n", None);
    check_one_line("deb http://mirror.test/debian trixie contrib\n", None);

    let dir = TempDir::new("apt");
    let err = mirror::mirror_from_apt_config(&dir.0).unwrap_err();
    assert!(err.to_string().contains("pass --mirror"), "{err}");
    std::fs::create_dir_all(dir.0.join("sources.list.d")).unwrap();
    std::fs::write(
        dir.0.join("sources.list.d/debian.sources"),
        "Types: deb\nURIs: http://mirror.test/debian\nSuites: bookworm\nComponents: main\n",
    )
    .unwrap();
    let m = mirror::mirror_from_apt_config(&dir.0).unwrap();
    assert_eq!(m.as_str(), "http://mirror.test/debian");
    assert_eq!(
        m.url("pool/main/x.deb"),
        "http://mirror.test/debian/pool/main/x.deb"
    );
    // sources.list is read first, as apt does.
    std::fs::write(
        dir.0.join("sources.list"),
        "deb http://first.test/debian trixie main\n",
    )
    .unwrap();
    let m = mirror::mirror_from_apt_config(&dir.0).unwrap();
    assert_eq!(m.as_str(), "http://first.test/debian");

    assert!(Mirror::new("https://tls.test/debian").is_err());
    assert!(Mirror::new("mirror.test").is_err());
    assert_eq!(
        Mirror::new("http://m.test/debian/").unwrap().as_str(),
        "http://m.test/debian"
    );
}

// ---------------------------------------------------------------- fetch cache

/// A tiny HTTP/1.1 server on 127.0.0.1 that serves `files` and counts requests.
struct Server {
    url: String,
    files: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    requests: Arc<AtomicUsize>,
}

impl Server {
    fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/debian", listener.local_addr().unwrap());
        let files: Arc<Mutex<BTreeMap<String, Vec<u8>>>> = Arc::default();
        let requests = Arc::new(AtomicUsize::new(0));
        let (f, r) = (files.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { break };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
                        break;
                    }
                }
                r.fetch_add(1, AtomicOrdering::SeqCst);
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let body = f.lock().unwrap().get(&path).cloned();
                let response = match body {
                    Some(body) => {
                        let mut out = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        out.extend(body);
                        out
                    }
                    None => {
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_vec()
                    }
                };
                let _ = stream.write_all(&response);
            }
        });
        Server {
            url,
            files,
            requests,
        }
    }

    fn serve(&self, mirror_path: &str, data: &[u8]) {
        self.files
            .lock()
            .unwrap()
            .insert(format!("/debian/{mirror_path}"), data.to_vec());
    }

    fn requests(&self) -> usize {
        self.requests.load(AtomicOrdering::SeqCst)
    }
}

#[test]
fn cache_verifies_refetches_and_works_offline() {
    let server = Server::start();
    let mirror = Mirror::new(&server.url).unwrap();
    let app: &[u8] = b"the app package";
    let tool: &[u8] = b"the tool package, a bit longer";
    let lock = Lock::parse(
        &lock_text(&[("app", app), ("tool", tool)], "x"),
        Path::new("x.lock"),
    )
    .unwrap();
    server.serve(&lock.packages[0].filename, app);
    server.serve(&lock.packages[1].filename, tool);
    let dir = TempDir::new("cache");
    let cache = Cache::new(&dir.0);
    let progress: Progress<'_> = &quiet_progress;

    // Cold: both downloaded, stored by sha256.
    let paths = cache.fetch_all(&lock, Some(&mirror), progress).unwrap();
    assert_eq!(
        paths,
        [
            dir.0.join(format!("debs/{}.deb", sha256(app))),
            dir.0.join(format!("debs/{}.deb", sha256(tool)))
        ]
    );
    assert_eq!(std::fs::read(&paths[0]).unwrap(), app);
    assert_eq!(server.requests(), 2);

    // Warm: no mirror at all, no request.
    cache.fetch_all(&lock, None, progress).unwrap();
    assert_eq!(server.requests(), 2);

    // A corrupt cached file is refused, reported and fetched again.
    std::fs::write(&paths[1], b"the tool package, a bit LONGER").unwrap();
    let lines = Mutex::new(Vec::new());
    let record = |l: &str| lines.lock().unwrap().push(l.to_string());
    cache.fetch_all(&lock, Some(&mirror), &record).unwrap();
    assert_eq!(std::fs::read(&paths[1]).unwrap(), tool);
    assert_eq!(server.requests(), 3);
    let lines = lines.into_inner().unwrap();
    assert!(
        lines[0].starts_with("cached package tool 1.0-1 (amd64) at ")
            && lines[0].contains("is corrupt"),
        "{lines:?}"
    );
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("2 packages for amd64 (0.0 MiB) verified in "),
        "{lines:?}"
    );

    // Corrupt and offline: a clear error, not a silent use of the bad file.
    std::fs::write(&paths[0], b"garbage").unwrap();
    let err = cache.fetch_all(&lock, None, progress).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("package app 1.0-1 (amd64) is not in the cache")
            && err.to_string().contains("pass --mirror"),
        "{err}"
    );
    assert!(!paths[0].exists());

    // The mirror serves a corrupt file: refused, nothing left in the cache.
    server.serve(&lock.packages[0].filename, b"the app package, tampered");
    let err = cache.fetch_all(&lock, Some(&mirror), progress).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "download of package app 1.0-1 (amd64) from {} is corrupt",
            mirror.url(&lock.packages[0].filename)
        )) && msg.contains("run `cargo xtask lock`"),
        "{msg}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.0.join("debs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(leftovers, [format!("{}.deb", sha256(tool))]);

    // The mirror lacks the file: the error names the package, URL and what to do.
    server.files.lock().unwrap().clear();
    let err = cache.fetch_all(&lock, Some(&mirror), progress).unwrap_err();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert_eq!(
        chain,
        format!(
            "cannot download package app 1.0-1 (amd64): {} does not exist on the mirror (404); the mirror may have dropped this version: run `cargo xtask lock` to pin current packages, or pass another --mirror",
            mirror.url(&lock.packages[0].filename)
        )
    );
}

// ---------------------------------------------------------------- .deb reading

/// Write an `ar` archive (the `.deb` container) by hand.
fn ar(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = b"!<arch>\n".to_vec();
    for (name, data) in members {
        let header = format!(
            "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
            name,
            0,
            0,
            0,
            "100644",
            data.len()
        );
        assert_eq!(header.len(), 60);
        out.extend(header.as_bytes());
        out.extend(*data);
        if data.len() % 2 == 1 {
            out.push(b'\n');
        }
    }
    out
}

/// A data.tar with a directory, a file, a symlink, a hard link, a setuid file and a FIFO.
fn data_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, mode: u32, link: Option<&str>, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        if let Some(link) = link {
            h.set_link_name(link).unwrap();
        }
        b.append_data(&mut h, path, data).unwrap();
    };
    add("./", tar::EntryType::Directory, 0o755, None, b"");
    add("./usr/", tar::EntryType::Directory, 0o755, None, b"");
    add("./usr/bin/", tar::EntryType::Directory, 0o755, None, b"");
    add(
        "./usr/bin/tool",
        tar::EntryType::Regular,
        0o755,
        None,
        b"#tool\n",
    );
    add(
        "./usr/bin/alias",
        tar::EntryType::Symlink,
        0o777,
        Some("tool"),
        b"",
    );
    add(
        "./usr/bin/tool2",
        tar::EntryType::Link,
        0o755,
        Some("./usr/bin/tool"),
        b"",
    );
    add(
        "./usr/bin/suid",
        tar::EntryType::Regular,
        0o4755,
        None,
        b"s",
    );
    add("./usr/fifo", tar::EntryType::Fifo, 0o644, None, b"");
    let long = format!("./usr/share/{}/file", "d".repeat(120));
    add(&long, tar::EntryType::Regular, 0o644, None, b"long");
    b.into_inner().unwrap()
}

fn build_deb(compression: &str) -> Vec<u8> {
    let tar = data_tar();
    let data = match compression {
        "" => tar,
        ".xz" => {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
            e.write_all(&tar).unwrap();
            e.finish().unwrap()
        }
        ".zst" => zstd::encode_all(&tar[..], 3).unwrap(),
        ".gz" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(&tar).unwrap();
            e.finish().unwrap()
        }
        other => panic!("no compression {other}"),
    };
    let control = tar::Builder::new(Vec::new()).into_inner().unwrap();
    ar(&[
        ("debian-binary", b"2.0\n"),
        ("control.tar", &control),
        (&format!("data.tar{compression}"), &data),
    ])
}

fn summary(entries: &[Entry]) -> Vec<(String, String, u32)> {
    entries
        .iter()
        .map(|e| {
            let kind = match &e.kind {
                EntryKind::Dir => "dir".to_string(),
                EntryKind::File(d) => format!("file {}", String::from_utf8_lossy(d).trim()),
                EntryKind::Symlink(t) => format!("symlink {t}"),
            };
            (e.path.clone(), kind, e.mode)
        })
        .collect()
}

#[test]
fn debs_unpack_with_every_compression() {
    let long = format!("usr/share/{}/file", "d".repeat(120));
    let expected: Vec<(String, String, u32)> = [
        ("usr", "dir", 0o755),
        ("usr/bin", "dir", 0o755),
        ("usr/bin/tool", "file #tool", 0o755),
        ("usr/bin/alias", "symlink tool", 0o777),
        ("usr/bin/tool2", "file #tool", 0o755),
        ("usr/bin/suid", "file s", 0o4755),
        (long.as_str(), "file long", 0o644),
    ]
    .iter()
    .map(|(p, k, m)| (p.to_string(), k.to_string(), *m))
    .collect();
    for compression in ["", ".xz", ".zst", ".gz"] {
        let deb = build_deb(compression);
        let entries = deb::read_bytes(&deb, Path::new("test.deb")).unwrap();
        assert_eq!(summary(&entries), expected, "data.tar{compression}");
        assert!(
            entries
                .iter()
                .all(|e| e.mtime == 1_700_000_000 && e.uid == 0)
        );
    }

    // Read from disk, filtered, then placed in a directory without root.
    let dir = TempDir::new("deb");
    let path = dir.0.join("test.deb");
    std::fs::write(&path, build_deb(".xz")).unwrap();
    let entries = deb::read_filtered(&path, &mut |p| !p.starts_with("usr/share")).unwrap();
    assert_eq!(summary(&entries), expected[..6]);
    let root = dir.0.join("root");
    deb::unpack_debs(std::slice::from_ref(&path), &root).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| {
        std::fs::symlink_metadata(root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(
        std::fs::read(root.join("usr/bin/tool2")).unwrap(),
        b"#tool\n"
    );
    assert_eq!(mode("usr/bin/tool"), 0o755);
    assert_eq!(mode("usr/bin"), 0o755);
    assert_eq!(
        std::fs::read_link(root.join("usr/bin/alias")).unwrap(),
        PathBuf::from("tool")
    );
    assert!(!root.join("usr/fifo").exists());
    assert_eq!(std::fs::read(root.join(&long)).unwrap(), b"long");
    // Unpacking again over the same tree replaces what is there.
    deb::unpack_debs(&[path], &root).unwrap();
}

#[test]
fn bad_debs_are_refused_with_their_name() {
    fn check(bytes: &[u8], expected: &str) {
        let err = deb::read_bytes(bytes, Path::new("cache/debs/abc.deb")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("cache/debs/abc.deb"), "{msg}");
        assert!(msg.contains(expected), "{msg} lacks {expected}");
    }
    let good = build_deb(".xz");
    check(b"PK\x03\x04 a zip", "no ar magic");
    check(&good[..100], "truncated");
    check(&ar(&[("debian-binary", b"2.0\n")]), "no data.tar member");
    check(
        &ar(&[("data.tar.xz", b"x")]),
        "first member is not debian-binary",
    );
    check(
        &ar(&[("debian-binary", b"2.0\n"), ("data.tar.bz2", b"x")]),
        "unsupported compression of data.tar.bz2",
    );
    check(
        &ar(&[
            ("debian-binary", b"2.0\n"),
            ("data.tar.xz", b"not xz at all"),
        ]),
        "cannot read its data.tar.xz",
    );
    // A data.tar cut short inside the compressed stream.
    let tar = data_tar();
    let xz = {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
        e.write_all(&tar).unwrap();
        e.finish().unwrap()
    };
    check(
        &ar(&[
            ("debian-binary", b"2.0\n"),
            ("data.tar.xz", &xz[..xz.len() / 2]),
        ]),
        "cannot read its data.tar.xz",
    );

    // Through a file on disk, the error names the file.
    let dir = TempDir::new("baddeb");
    let path = dir.0.join("broken.deb");
    std::fs::write(&path, b"!<arch>\nnonsense").unwrap();
    let err = deb::read(&path).unwrap_err();
    assert!(
        err.to_string().starts_with(&path.display().to_string()),
        "{err}"
    );
    assert!(err.to_string().contains("delete it"), "{err}");
}

#[test]
fn unpack_never_writes_through_symlinks() {
    let dir = TempDir::new("escape");
    let outside = dir.0.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let entries = vec![
        Entry {
            path: "lib".to_string(),
            kind: EntryKind::Symlink(outside.display().to_string()),
            mode: 0o777,
            uid: 0,
            gid: 0,
            mtime: 0,
        },
        Entry {
            path: "lib/evil".to_string(),
            kind: EntryKind::File(b"x".to_vec()),
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
        },
    ];
    let err = deb::unpack(&entries, &dir.0.join("root")).unwrap_err();
    assert!(err.to_string().contains("through the symlink"), "{err}");
    assert!(!outside.join("evil").exists());
}
