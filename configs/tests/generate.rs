//! Tests of config generation and TOML merge patches.

// Test helpers outside `#[test]` functions panic on purpose when a fixture is broken.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_configs::Mode;
use keelson_configs::generate::{self, GenerateError, GenerateOptions};
use keelson_configs::patch::{Patch, PatchError};
use keelson_configs::pki::{self, CertAndKey, LeafRequest, Usage};
use keelson_configs::schema::MachineType;
use keelson_configs::secrets::ClusterSecrets;

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

fn options(extra: impl FnOnce(&mut GenerateOptions)) -> GenerateOptions {
    let mut o = GenerateOptions {
        cluster_name: "demo".into(),
        endpoint: "https://10.5.0.2:6443".into(),
        ..GenerateOptions::default()
    };
    extra(&mut o);
    o
}

#[test]
fn generated_configs_are_valid_and_round_trip() {
    let secrets = ClusterSecrets::generate().expect("secrets");
    let generated = generate::generate(&options(|_| {}), &secrets).expect("generate");
    for (g, kind, file) in [
        (
            &generated.control_plane,
            MachineType::ControlPlane,
            "controlplane.toml",
        ),
        (&generated.worker, MachineType::Worker, "worker.toml"),
    ] {
        assert_eq!(g.config.machine.kind, kind);
        assert!(g.warnings.is_empty(), "{:?}", g.warnings);
        let checked = keelson_configs::check_str(&g.text, file, Mode::Metal);
        assert_eq!(
            checked.config.as_ref(),
            Some(&g.config),
            "{:?}",
            checked.diagnostics
        );
        assert_eq!(g.config.machine.install_disk.as_deref(), Some("/dev/vda"));
        assert_eq!(g.config.cluster.kubernetes_version.to_string(), "1.34.1");
    }
    let back = ClusterSecrets::from_toml_str(&generated.secrets_text, "s").expect("secrets");
    assert_eq!(back, secrets);
}

#[test]
fn control_planes_carry_every_key_and_workers_none() {
    let secrets = ClusterSecrets::generate().expect("secrets");
    let generated = generate::generate(&options(|_| {}), &secrets).expect("generate");
    let cp = &generated.control_plane.config.cluster.secrets;
    let w = &generated.worker.config.cluster.secrets;
    let key_of =
        |pair: &keelson_configs::schema::CaPair| pair.key.as_ref().map(|k| k.as_str().to_owned());
    assert_eq!(
        key_of(&cp.kubernetes_ca),
        Some(secrets.kubernetes_ca.key.clone())
    );
    assert_eq!(
        key_of(&cp.node_api_ca),
        Some(secrets.node_api_ca.key.clone())
    );
    assert_eq!(
        cp.etcd_ca.as_ref().and_then(key_of),
        Some(secrets.etcd_ca.key.clone())
    );
    assert_eq!(
        cp.front_proxy_ca.as_ref().and_then(key_of),
        Some(secrets.front_proxy_ca.key.clone())
    );
    assert!(cp.service_account_key.is_some() && cp.encryption_key.is_some());

    assert_eq!(key_of(&w.kubernetes_ca), None);
    assert_eq!(key_of(&w.node_api_ca), None);
    assert!(w.etcd_ca.is_none() && w.front_proxy_ca.is_none());
    assert!(w.service_account_key.is_none() && w.encryption_key.is_none());
    assert_eq!(w.kubernetes_ca.cert.as_str(), secrets.kubernetes_ca.cert);
    assert_eq!(
        w.bootstrap_token.as_str(),
        secrets.bootstrap_token.to_string()
    );
    assert!(!generated.worker.text.contains("PRIVATE KEY"));
}

#[test]
fn node_api_certificates_carry_the_endpoint_and_additional_sans() {
    let secrets = ClusterSecrets::generate().expect("secrets");
    let generated = generate::generate(
        &options(|o| {
            o.additional_sans = vec![
                "api.example.com".into(),
                " 10.5.0.100".into(),
                "10.5.0.2".into(),
                String::new(),
            ]
        }),
        &secrets,
    )
    .expect("generate");
    let cp = &generated.control_plane.config;
    assert_eq!(
        cp.machine.api.cert_sans,
        ["10.5.0.2", "api.example.com", "10.5.0.100"]
    );
    assert_eq!(
        generated.worker.config.machine.api.cert_sans,
        ["api.example.com", "10.5.0.100", "10.5.0.2"]
    );

    // A control plane issues its node API server certificate from the CA in its config.
    let ca = &cp.cluster.secrets.node_api_ca;
    let ca = CertAndKey {
        cert: ca.cert.as_str().to_owned(),
        key: ca.key.as_ref().expect("CA key").as_str().to_owned(),
    };
    let issued = pki::issue(
        &ca,
        &LeafRequest {
            common_name: "cp-1".into(),
            organizations: vec![],
            sans: cp.machine.api.cert_sans.clone(),
            usage: Usage::Server,
        },
    )
    .expect("issue");
    let der = pki::pem_certificate_der(&issued.cert).expect("der");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse");
    let san = cert
        .subject_alternative_name()
        .expect("SAN parses")
        .expect("SAN present");
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
            x509_parser::extensions::GeneralName::IPAddress(b) => {
                std::net::IpAddr::from(<[u8; 4]>::try_from(*b).expect("v4")).to_string()
            }
            other => panic!("unexpected SAN {other:?}"),
        })
        .collect();
    assert_eq!(names, ["10.5.0.2", "api.example.com", "10.5.0.100"]);

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ca.pem"), &ca.cert).expect("write");
    std::fs::write(dir.path().join("leaf.pem"), &issued.cert).expect("write");
    let out = std::process::Command::new("openssl")
        .args(["verify", "-purpose", "sslserver", "-CAfile"])
        .arg(dir.path().join("ca.pem"))
        .arg(dir.path().join("leaf.pem"))
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn modes_decide_the_install_disk() {
    let secrets = ClusterSecrets::generate().expect("secrets");
    for (mode, disk) in [
        (Mode::Metal, Some("/dev/sda")),
        (Mode::Cloud, None),
        (Mode::Container, None),
    ] {
        let generated = generate::generate(
            &options(|o| {
                o.mode = mode;
                o.install_disk = Some("/dev/sda".into());
            }),
            &secrets,
        )
        .unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_eq!(
            generated
                .control_plane
                .config
                .machine
                .install_disk
                .as_deref(),
            disk,
            "{mode}"
        );
    }
}

/// Generates with `patch` applied to both configs and expects it to be refused with each
/// of `paths` among the diagnostics' key paths.
fn check_refused(patch: &str, file: &str, paths: &[&str]) {
    let secrets = ClusterSecrets::generate().expect("secrets");
    let patch = Patch::from_toml_str(patch, "p.toml").expect("patch parses");
    let err = generate::generate(&options(|o| o.patches = vec![patch]), &secrets)
        .expect_err("must be refused");
    let GenerateError::Invalid { file: f, report } = err else {
        panic!("unexpected error {err}");
    };
    assert_eq!(f, file);
    let got: Vec<&str> = report.errors().map(|d| d.path.as_str()).collect();
    for want in paths {
        assert!(got.contains(want), "want {want} in {got:?}");
    }
    for d in report.errors() {
        assert_eq!(
            d.location, None,
            "lines of the unseen patched text are not shown"
        );
        assert_eq!(d.file, format!("p.toml (patching {file})"), "{d}");
    }
}

#[test]
fn invalid_patched_configs_are_refused() {
    check_refused(
        "[cluster]\nendpoint = \"http://10.5.0.2:6443\"",
        "controlplane.toml",
        &["cluster.endpoint"],
    );
    check_refused(
        "[machine]\nhostnme = \"x\"\nswap = \"maybe\"",
        "controlplane.toml",
        &["machine.hostnme", "machine.swap"],
    );
    check_refused(
        "machine.install_disk = { \"$patch\" = \"delete\" }",
        "controlplane.toml",
        &["machine.install_disk"],
    );
    check_refused(
        "cluster.secrets.etcd_ca = { \"$patch\" = \"delete\" }",
        "controlplane.toml",
        &["cluster.secrets.etcd_ca"],
    );
    // A patch for both configs that breaks both is reported for the first one checked.
    check_refused(
        "cluster.secrets.bootstrap_token = \"not-a-token\"",
        "controlplane.toml",
        &["cluster.secrets.bootstrap_token"],
    );
}

#[test]
fn bad_inputs_are_refused_before_anything_is_built() {
    let secrets = ClusterSecrets::generate().expect("secrets");
    for (o, want) in [
        (
            options(|o| o.cluster_name = "Demo".into()),
            "cluster name \"Demo\"",
        ),
        (
            options(|o| o.cluster_name = String::new()),
            "cluster name \"\"",
        ),
        (
            options(|o| o.endpoint = "10.5.0.2:6443".into()),
            "endpoint \"10.5.0.2:6443\"",
        ),
        (
            options(|o| o.kubernetes_version = Some("v2.0.0".into())),
            "--kubernetes-version \"v2.0.0\"",
        ),
        (
            options(|o| o.additional_sans = vec!["under_score!".into()]),
            "--additional-sans entry \"under_score!\"",
        ),
    ] {
        let err = generate::generate(&o, &secrets)
            .expect_err(want)
            .to_string();
        assert!(err.contains(want), "want {want:?} in {err:?}");
    }
}

#[test]
fn patches_know_which_key_paths_they_touch() {
    let patch = Patch::from_toml_str(
        "[machine]\nhostname = \"x\"\ninstall_disk = { \"$patch\" = \"delete\" }\n\
         [machine.sysctls]\n\"net.ipv4.ip_forward\" = 0\n\
         [[machine.network.interfaces]]\nname = \"eth0\"\n",
        "p.toml",
    )
    .expect("patch");
    for (path, touched) in [
        ("machine.hostname", true),
        ("machine.install_disk", true),
        ("machine.sysctls.\"net.ipv4.ip_forward\"", true),
        ("machine.sysctls.\"vm.swappiness\"", false),
        ("machine.network.interfaces[0].mtu", true),
        ("machine", true),
        ("machine.swap", false),
        ("cluster.endpoint", false),
        ("", false),
    ] {
        assert_eq!(patch.touches(path), touched, "{path}");
    }
}
