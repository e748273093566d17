//! Tests of the cluster PKI and the secrets file: every certificate verifies with the
//! `openssl` CLI against its CA, and a real X.509 parser checks key usages, extended key
//! usages, basic constraints, key identifiers, validity, SANs and the role Organization.

// Test helpers outside `#[test]` functions panic on purpose when a fixture is broken.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use keelson_configs::pki::{
    self, BootstrapToken, CertAndKey, EncryptionKey, LeafRequest, Role, Usage,
};
use keelson_configs::secrets::{ClusterSecrets, SecretsError, ca_names};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

const DAY: i64 = 86_400;

/// What one certificate must look like.
#[derive(Debug, Default)]
struct Expect {
    common_name: &'static str,
    organizations: Vec<&'static str>,
    ca: bool,
    /// Validity in days, not counting the 5-minute backdate.
    days: i64,
    key_cert_sign: bool,
    key_encipherment: bool,
    client_auth: bool,
    server_auth: bool,
    dns_sans: Vec<&'static str>,
    ip_sans: Vec<std::net::IpAddr>,
}

fn der(pem: &str) -> Vec<u8> {
    pki::pem_certificate_der(pem).expect("certificate PEM")
}

/// Checks a certificate with x509-parser against `expect`, and that `issuer` signed it.
fn check(pem: &str, issuer_pem: &str, expect: &Expect) {
    let der = der(pem);
    let (_, cert) = X509Certificate::from_der(&der).expect("parse certificate");
    let issuer_der = self::der(issuer_pem);
    let (_, issuer) = X509Certificate::from_der(&issuer_der).expect("parse issuer");
    let what = expect.common_name;

    let cn: Vec<_> = cert
        .subject()
        .iter_common_name()
        .map(|a| a.as_str().expect("utf-8 CN"))
        .collect();
    assert_eq!(cn, [expect.common_name], "{what}: common name");
    let orgs: Vec<_> = cert
        .subject()
        .iter_organization()
        .map(|a| a.as_str().expect("utf-8 O"))
        .collect();
    assert_eq!(orgs, expect.organizations, "{what}: organizations");
    assert_eq!(cert.issuer(), issuer.subject(), "{what}: issuer name");
    cert.verify_signature(Some(issuer.public_key()))
        .unwrap_or_else(|e| panic!("{what}: signature does not verify: {e}"));

    let bc = cert
        .basic_constraints()
        .expect("basic constraints parse")
        .expect("basic constraints present");
    assert!(bc.critical, "{what}: basicConstraints must be critical");
    assert_eq!(bc.value.ca, expect.ca, "{what}: CA flag");

    let ku = cert
        .key_usage()
        .expect("key usage parses")
        .expect("key usage present");
    assert!(ku.critical, "{what}: keyUsage must be critical");
    assert!(ku.value.digital_signature(), "{what}: digitalSignature");
    assert_eq!(
        ku.value.key_cert_sign(),
        expect.key_cert_sign,
        "{what}: keyCertSign"
    );
    assert_eq!(ku.value.crl_sign(), expect.key_cert_sign, "{what}: cRLSign");
    assert_eq!(
        ku.value.key_encipherment(),
        expect.key_encipherment,
        "{what}: keyEncipherment"
    );

    let eku = cert.extended_key_usage().expect("EKU parses");
    if expect.ca {
        assert!(eku.is_none(), "{what}: a CA has no extended key usage");
    } else {
        let eku = eku.expect("EKU present").value;
        assert_eq!(eku.client_auth, expect.client_auth, "{what}: clientAuth");
        assert_eq!(eku.server_auth, expect.server_auth, "{what}: serverAuth");
        assert!(!eku.any, "{what}: anyExtendedKeyUsage");
    }

    let validity = cert.validity();
    let span = validity.not_after.timestamp() - validity.not_before.timestamp();
    let expected = expect.days * DAY + 300;
    assert!(
        (span - expected).abs() < 60,
        "{what}: validity {span}s, expected {expected}s"
    );
    assert!(cert.validity().is_valid(), "{what}: valid now");

    let ski = cert
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        });
    let ski = ski.unwrap_or_else(|| panic!("{what}: subject key identifier"));
    if !expect.ca {
        let issuer_ski = issuer
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            })
            .expect("issuer SKI");
        let aki = cert
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("{what}: authority key identifier"));
        assert_eq!(aki, issuer_ski, "{what}: AKI = issuer SKI");
        assert_ne!(ski, issuer_ski, "{what}: own SKI");
    }

    let mut dns = Vec::new();
    let mut ips = Vec::new();
    if let Some(san) = cert.subject_alternative_name().expect("SAN parses") {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(b) => ips.push(match b.len() {
                    4 => std::net::IpAddr::from(<[u8; 4]>::try_from(*b).expect("v4")),
                    _ => std::net::IpAddr::from(<[u8; 16]>::try_from(*b).expect("v6")),
                }),
                other => panic!("{what}: unexpected SAN {other:?}"),
            }
        }
    }
    assert_eq!(dns, expect.dns_sans, "{what}: DNS SANs");
    assert_eq!(ips, expect.ip_sans, "{what}: IP SANs");
}

/// Runs `openssl verify -CAfile ca [-purpose p] cert` and asserts success.
fn openssl_verify(dir: &Path, name: &str, ca_pem: &str, cert_pem: &str, purpose: Option<&str>) {
    let ca = dir.join(format!("{name}-ca.pem"));
    let cert = dir.join(format!("{name}.pem"));
    std::fs::write(&ca, ca_pem).expect("write CA");
    std::fs::write(&cert, cert_pem).expect("write cert");
    let mut cmd = Command::new("openssl");
    cmd.arg("verify")
        .arg("-x509_strict")
        .arg("-CAfile")
        .arg(&ca);
    if let Some(p) = purpose {
        cmd.args(["-purpose", p]);
    }
    let out = cmd.arg(&cert).output().expect("run openssl");
    assert!(
        out.status.success(),
        "openssl verify {name} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(": OK"));
}

/// openssl's view of the key: it must parse, and be the key of the certificate.
fn openssl_key_matches(dir: &Path, name: &str, pair: &CertAndKey) {
    let key = dir.join(format!("{name}.key"));
    let cert = dir.join(format!("{name}.crt"));
    std::fs::write(&key, &pair.key).expect("write key");
    std::fs::write(&cert, &pair.cert).expect("write cert");
    let from_key = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key)
        .output()
        .expect("openssl pkey");
    assert!(
        from_key.status.success(),
        "{name}: openssl cannot read the key"
    );
    let from_cert = Command::new("openssl")
        .args(["x509", "-noout", "-pubkey", "-in"])
        .arg(&cert)
        .output()
        .expect("openssl x509");
    assert!(
        from_cert.status.success(),
        "{name}: openssl cannot read the cert"
    );
    assert_eq!(
        from_key.stdout, from_cert.stdout,
        "{name}: key matches cert"
    );
}

fn ca_expect(common_name: &'static str) -> Expect {
    Expect {
        common_name,
        ca: true,
        days: 3650,
        key_cert_sign: true,
        ..Expect::default()
    }
}

#[test]
fn every_ca_verifies_with_openssl_and_has_kubeadm_extensions() {
    let secrets = ClusterSecrets::generate().expect("generate");
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, ca, cn) in [
        ("kubernetes", &secrets.kubernetes_ca, ca_names::KUBERNETES),
        ("etcd", &secrets.etcd_ca, ca_names::ETCD),
        (
            "front-proxy",
            &secrets.front_proxy_ca,
            ca_names::FRONT_PROXY,
        ),
        ("node-api", &secrets.node_api_ca, ca_names::NODE_API),
    ] {
        check(&ca.cert, &ca.cert, &ca_expect(cn));
        openssl_verify(dir.path(), name, &ca.cert, &ca.cert, None);
        openssl_key_matches(dir.path(), name, ca);
        pki::check_ca(ca).expect("check_ca");
        assert!(ca.key.starts_with("-----BEGIN PRIVATE KEY-----"));
    }
    let cas = [
        &secrets.kubernetes_ca.cert,
        &secrets.etcd_ca.cert,
        &secrets.front_proxy_ca.cert,
        &secrets.node_api_ca.cert,
    ];
    for (i, a) in cas.iter().enumerate() {
        for b in &cas[i + 1..] {
            assert_ne!(a, b, "each CA is distinct");
        }
    }
}

#[test]
fn leaves_verify_with_openssl_and_carry_usages_sans_and_roles() {
    let secrets = ClusterSecrets::generate().expect("generate");
    let dir = tempfile::tempdir().expect("tempdir");
    let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");

    struct Case {
        name: &'static str,
        ca: CertAndKey,
        request: LeafRequest,
        purpose: &'static str,
        expect: Expect,
    }
    let leaf = |cn: &'static str, orgs: Vec<&'static str>, usage: Usage| Expect {
        common_name: cn,
        organizations: orgs,
        days: 365,
        key_encipherment: true,
        client_auth: usage != Usage::Server,
        server_auth: usage != Usage::Client,
        ..Expect::default()
    };
    let cases = vec![
        Case {
            name: "apiserver",
            ca: secrets.kubernetes_ca.clone(),
            request: LeafRequest {
                common_name: "kube-apiserver".into(),
                organizations: vec![],
                sans: vec![
                    "10.5.0.2".into(),
                    "api.example.com".into(),
                    "kubernetes.default.svc".into(),
                    "fd00::1".into(),
                ],
                usage: Usage::Server,
            },
            purpose: "sslserver",
            expect: Expect {
                dns_sans: vec!["api.example.com", "kubernetes.default.svc"],
                ip_sans: vec![ip("10.5.0.2"), ip("fd00::1")],
                ..leaf("kube-apiserver", vec![], Usage::Server)
            },
        },
        Case {
            name: "apiserver-kubelet-client",
            ca: secrets.kubernetes_ca.clone(),
            request: LeafRequest {
                common_name: "kube-apiserver-kubelet-client".into(),
                organizations: vec!["kubeadm:cluster-admins".into()],
                sans: vec![],
                usage: Usage::Client,
            },
            purpose: "sslclient",
            expect: leaf(
                "kube-apiserver-kubelet-client",
                vec!["kubeadm:cluster-admins"],
                Usage::Client,
            ),
        },
        Case {
            name: "etcd-peer",
            ca: secrets.etcd_ca.clone(),
            request: LeafRequest {
                common_name: "cp-1".into(),
                organizations: vec![],
                sans: vec!["cp-1".into(), "10.5.0.2".into()],
                usage: Usage::ClientAndServer,
            },
            purpose: "sslserver",
            expect: Expect {
                dns_sans: vec!["cp-1"],
                ip_sans: vec![ip("10.5.0.2")],
                ..leaf("cp-1", vec![], Usage::ClientAndServer)
            },
        },
        Case {
            name: "front-proxy-client",
            ca: secrets.front_proxy_ca.clone(),
            request: LeafRequest {
                common_name: "front-proxy-client".into(),
                organizations: vec![],
                sans: vec![],
                usage: Usage::Client,
            },
            purpose: "sslclient",
            expect: leaf("front-proxy-client", vec![], Usage::Client),
        },
    ];
    for case in cases {
        let issued = pki::issue(&case.ca, &case.request).expect("issue");
        check(&issued.cert, &case.ca.cert, &case.expect);
        openssl_verify(
            dir.path(),
            case.name,
            &case.ca.cert,
            &issued.cert,
            Some(case.purpose),
        );
        openssl_key_matches(dir.path(), case.name, &issued);
    }

    for role in Role::ALL {
        let issued = pki::issue_api_client(&secrets.node_api_ca, "alice", role).expect("issue");
        check(
            &issued.cert,
            &secrets.node_api_ca.cert,
            &leaf("alice", vec![role.organization()], Usage::Client),
        );
        openssl_verify(
            dir.path(),
            role.name(),
            &secrets.node_api_ca.cert,
            &issued.cert,
            Some("sslclient"),
        );
    }
}

#[test]
fn a_leaf_does_not_verify_against_another_ca() {
    let secrets = ClusterSecrets::generate().expect("generate");
    let leaf = pki::issue_api_client(&secrets.node_api_ca, "admin", Role::Admin).expect("issue");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ca.pem"), &secrets.kubernetes_ca.cert).expect("write");
    std::fs::write(dir.path().join("leaf.pem"), &leaf.cert).expect("write");
    let out = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.path().join("ca.pem"))
        .arg(dir.path().join("leaf.pem"))
        .output()
        .expect("run openssl");
    assert!(
        !out.status.success(),
        "a foreign CA must not verify the leaf"
    );
}

#[test]
fn roles_map_to_organizations() {
    for (role, org, name) in [
        (Role::Admin, "keelson:admin", "admin"),
        (Role::Operator, "keelson:operator", "operator"),
        (Role::Reader, "keelson:reader", "reader"),
    ] {
        assert_eq!(role.organization(), org);
        assert_eq!(Role::from_organization(org), Some(role));
        assert_eq!(name.parse::<Role>(), Ok(role));
        assert_eq!(org.parse::<Role>(), Ok(role));
    }
    assert_eq!(Role::from_organization("system:masters"), None);
    assert!("root".parse::<Role>().is_err());
}

#[test]
fn bad_sans_are_refused() {
    let ca = pki::generate_ca("test-ca").expect("ca");
    for bad in ["", "exa mple.com", "bücher.de", "a..b", "-x;rm"] {
        let err = pki::issue(
            &ca,
            &LeafRequest {
                common_name: "x".into(),
                organizations: vec![],
                sans: vec![bad.into()],
                usage: Usage::Server,
            },
        )
        .expect_err(bad);
        assert!(
            err.to_string().contains("subject alternative name"),
            "{bad:?}: {err}"
        );
    }
}

#[test]
fn issuing_from_a_non_ca_or_mismatched_key_is_refused() {
    let ca = pki::generate_ca("test-ca").expect("ca");
    let other = pki::generate_ca("other-ca").expect("ca");
    let leaf = pki::issue_api_client(&ca, "u", Role::Reader).expect("leaf");
    let request = LeafRequest {
        common_name: "x".into(),
        organizations: vec![],
        sans: vec![],
        usage: Usage::Client,
    };
    let err = pki::issue(&leaf, &request).expect_err("leaf is not a CA");
    assert!(
        err.to_string().contains("not a certificate authority"),
        "{err}"
    );
    let mixed = CertAndKey {
        cert: ca.cert.clone(),
        key: other.key.clone(),
    };
    let err = pki::issue(&mixed, &request).expect_err("mismatched key");
    assert!(err.to_string().contains("does not belong"), "{err}");
}

#[test]
fn bootstrap_tokens_have_kubeadm_format_and_are_random() {
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let token = BootstrapToken::generate().expect("token").to_string();
        let (id, secret) = token.split_once('.').expect("dot");
        assert_eq!(id.len(), 6, "{token}");
        assert_eq!(secret.len(), 16, "{token}");
        assert!(
            token
                .bytes()
                .all(|b| b == b'.' || b.is_ascii_lowercase() || b.is_ascii_digit()),
            "{token}"
        );
        assert_eq!(
            token.parse::<BootstrapToken>().expect("parse").to_string(),
            token
        );
        assert!(seen.insert(token), "tokens repeat");
    }
    let token: BootstrapToken = "abcdef.0123456789abcdef".parse().expect("parse");
    assert_eq!(token.id(), "abcdef");
    assert_eq!(token.secret(), "0123456789abcdef");
    assert!(
        !format!("{token:?}").contains("0123456789abcdef"),
        "Debug hides it"
    );
}

#[test]
fn malformed_bootstrap_tokens_are_refused() {
    for (bad, reason) in [
        ("", "no `.`"),
        ("abcdef0123456789abcdef", "no `.`"),
        ("abcde.0123456789abcdef", "the id"),
        ("ABCDEF.0123456789abcdef", "the id"),
        ("abcdef.0123456789abcde", "the secret"),
        ("abcdef.0123456789abcdeF", "the secret"),
        ("abcdef.0123456789abcdef.x", "the secret"),
        ("abc-ef.0123456789abcdef", "the id"),
    ] {
        let err = bad.parse::<BootstrapToken>().expect_err(bad).to_string();
        assert!(err.contains(reason), "{bad:?}: {err}");
        assert!(err.contains("[a-z0-9]{6}.[a-z0-9]{16}"), "{bad:?}: {err}");
    }
}

#[test]
fn encryption_keys_are_32_random_bytes_in_base64() {
    use base64::Engine as _;
    let a = EncryptionKey::generate().expect("key");
    let b = EncryptionKey::generate().expect("key");
    assert_ne!(a, b);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(a.as_base64())
        .expect("base64");
    assert_eq!(bytes.len(), 32);
    assert!(!format!("{a:?}").contains(a.as_base64()), "Debug hides it");
    for (bad, reason) in [
        ("", "decodes to 0 bytes"),
        ("not base64!", "not standard base64"),
        ("AAAA", "decodes to 3 bytes"),
    ] {
        let err = bad.parse::<EncryptionKey>().expect_err(bad).to_string();
        assert!(err.contains(reason), "{bad:?}: {err}");
    }
}

#[test]
fn service_account_key_is_a_pkcs8_key_openssl_reads() {
    let key = pki::generate_service_account_key().expect("key");
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    let public = pki::public_key_pem(&key).expect("public");
    assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sa.key");
    std::fs::write(&path, &key).expect("write");
    let out = Command::new("openssl")
        .args(["pkey", "-check", "-noout", "-in"])
        .arg(&path)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&path)
        .output()
        .expect("openssl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), public);
}

#[test]
fn a_certificates_spki_is_its_keys_public_key() {
    use base64::Engine as _;
    let ca = pki::generate_ca("spki-test").expect("ca");
    let public = pki::public_key_pem(&ca.key).expect("public key");
    let body: String = public.lines().filter(|l| !l.starts_with("-----")).collect();
    let expected = base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("base64");
    assert_eq!(pki::certificate_spki_der(&ca.cert).expect("spki"), expected);
    assert!(matches!(
        pki::certificate_spki_der(&ca.key),
        Err(pki::PkiError::Certificate { .. })
    ));
}

#[test]
fn secrets_round_trip_through_toml() {
    let secrets = ClusterSecrets::generate().expect("generate");
    let text = secrets.to_toml_string().expect("serialize");
    assert!(text.starts_with("# Keelson cluster secrets"));
    let back = ClusterSecrets::from_toml_str(&text, "secrets.toml").expect("parse");
    assert_eq!(back, secrets);
    assert!(
        !format!("{secrets:?}").contains("PRIVATE KEY"),
        "Debug hides keys"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("secrets.toml");
    std::fs::write(&path, &text).expect("write");
    assert_eq!(ClusterSecrets::load(&path).expect("load"), secrets);
}

/// Applies `edit` to a fresh secrets file and checks the load error's message.
fn check_bad_secrets(edit: impl Fn(&str, &ClusterSecrets) -> String, expected: &[&str]) {
    let secrets = ClusterSecrets::generate().expect("generate");
    let text = secrets.to_toml_string().expect("serialize");
    let bad = edit(&text, &secrets);
    let err = ClusterSecrets::from_toml_str(&bad, "s.toml").expect_err("must fail");
    let mut chain = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    for want in expected {
        assert!(chain.contains(want), "want {want:?} in {chain:?}");
    }
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .expect("needle")
}

#[test]
fn malformed_secrets_name_file_line_key_and_fix() {
    // A value swapped for junk: the error names the key and its line.
    check_bad_secrets(
        |t, _| t.replace("bootstrap_token = \"", "bootstrap_token = \"x"),
        &[
            "s.toml:",
            "`bootstrap_token` is invalid",
            "bootstrap token is malformed",
            "without --with-secrets",
        ],
    );
    check_bad_secrets(
        |t, s| t.replace(s.encryption_key.as_base64(), "c2hvcnQ="),
        &["`encryption_key` is invalid", "decodes to 5 bytes"],
    );
    // The etcd CA's key replaced by the Kubernetes CA's key.
    check_bad_secrets(
        |t, s| {
            let pos = t.find("[etcd_ca]").expect("etcd_ca");
            let (head, tail) = t.split_at(pos);
            format!(
                "{head}{}",
                tail.replacen(&s.etcd_ca.key, &s.kubernetes_ca.key, 1)
            )
        },
        &[
            "`etcd_ca.key` is invalid",
            "does not belong to the certificate",
        ],
    );
    // A certificate with its body damaged.
    check_bad_secrets(
        |t, s| {
            let damaged = s.front_proxy_ca.cert.replacen("MII", "XXX", 1);
            t.replacen(&s.front_proxy_ca.cert, &damaged, 1)
        },
        &["`front_proxy_ca.cert` is invalid"],
    );
    // A leaf where a CA belongs.
    check_bad_secrets(
        |t, s| {
            let leaf = pki::issue_api_client(&s.node_api_ca, "x", Role::Admin).expect("leaf");
            t.replacen(&s.node_api_ca.cert, &leaf.cert, 1).replacen(
                &s.node_api_ca.key,
                &leaf.key,
                1,
            )
        },
        &[
            "`node_api_ca.cert` is invalid",
            "not a certificate authority",
        ],
    );
    check_bad_secrets(
        |t, s| t.replacen(&s.service_account_key, "nope", 1),
        &["`service_account_key` is invalid", "PKCS#8"],
    );
    // Structure: unknown key, missing table, wrong type, version, not TOML.
    check_bad_secrets(
        |t, _| t.replace("version = 1", "version = 1\nverison = 2"),
        &["s.toml:6:1", "unknown field `verison`"],
    );
    check_bad_secrets(
        |t, _| t.replace("[etcd_ca]", "[etcd_cax]"),
        &["unknown field `etcd_cax`"],
    );
    check_bad_secrets(
        |t, _| t.replace("version = 1", "version = \"1\""),
        &["s.toml:5:11", "invalid type"],
    );
    check_bad_secrets(
        |t, _| t.replace("version = 1", "version = 7"),
        &["s.toml:5:11", "version 7 is not supported"],
    );
    check_bad_secrets(|_, _| "this is = = not toml".into(), &["s.toml:1:"]);
    check_bad_secrets(|_, _| String::new(), &["missing field `version`"]);
    // Positions point at the offending value.
    let secrets = ClusterSecrets::generate().expect("generate");
    let text = secrets.to_toml_string().expect("serialize");
    let line = line_of(&text, "encryption_key");
    let bad = text.replace(secrets.encryption_key.as_base64(), "AAAA");
    let err = ClusterSecrets::from_toml_str(&bad, "s.toml").expect_err("bad");
    assert!(
        matches!(&err, SecretsError::Invalid { line: l, key, .. } if *l == line && key == "encryption_key"),
        "{err:?}"
    );
}

#[test]
fn unreadable_and_non_utf8_secrets_files_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.toml");
    let err = ClusterSecrets::load(&missing).expect_err("missing");
    assert!(err.to_string().contains("missing.toml"), "{err}");
    assert!(err.to_string().contains("--with-secrets"), "{err}");

    let binary = dir.path().join("binary.toml");
    std::fs::write(&binary, b"version = 1\n\xff\xfe\x00garbage").expect("write");
    let err = ClusterSecrets::load(&binary).expect_err("binary");
    assert!(err.to_string().contains("not UTF-8"), "{err}");
    assert!(err.to_string().contains("offset 12"), "{err}");
}

/// What `openssl x509 -noout -subject -ext subjectAltName,extendedKeyUsage` prints for
/// the certificate at `path`, as one line: the subject, then each extension's value.
fn openssl_subject_sans_usages(path: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-ext"])
        .arg("subjectAltName,extendedKeyUsage")
        .arg("-in")
        .arg(path)
        .output()
        .expect("run openssl x509");
    assert!(
        out.status.success(),
        "openssl x509 {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("X509v3"))
        .collect();
    lines.join(" | ")
}

#[test]
fn etcd_certificates_verify_with_openssl_and_match_kubeadm() {
    let ca = pki::generate_ca(ca_names::ETCD).expect("etcd CA");
    let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
    // An address given twice and a loopback among the addresses each appear once.
    let addresses = [
        ip("10.5.0.2"),
        ip("fd00::2"),
        ip("10.5.0.2"),
        ip("127.0.0.1"),
    ];
    let certs = pki::etcd_certificates(&ca, "cp-1", &addresses).expect("issue");

    // The files, written as a node writes them, with their modes.
    let dir = tempfile::tempdir().expect("tempdir");
    let files = certs.files(&ca.cert);
    let listed: Vec<(&str, u32)> = files.iter().map(|f| (f.path, f.mode)).collect();
    assert_eq!(
        listed,
        [
            ("etcd/ca.crt", 0o644),
            ("etcd/server.crt", 0o600),
            ("etcd/server.key", 0o600),
            ("etcd/peer.crt", 0o600),
            ("etcd/peer.key", 0o600),
            ("etcd/healthcheck-client.crt", 0o600),
            ("etcd/healthcheck-client.key", 0o600),
            ("apiserver-etcd-client.crt", 0o600),
            ("apiserver-etcd-client.key", 0o600),
        ]
    );
    for file in &files {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = dir.path().join(file.path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(file.mode)
            .open(&path)
            .and_then(|mut f| f.write_all(file.content.as_bytes()))
            .expect("write");
    }
    let ca_file = dir.path().join("etcd/ca.crt");

    let member_sans = "DNS:cp-1, DNS:localhost, IP Address:10.5.0.2, IP Address:FD00:0:0:0:0:0:0:2, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1";
    let both = "TLS Web Server Authentication, TLS Web Client Authentication";
    let client = "TLS Web Client Authentication";
    let expected = [
        (
            "etcd/server",
            &certs.server,
            format!("subject=CN = cp-1 | {member_sans} | {both}"),
        ),
        (
            "etcd/peer",
            &certs.peer,
            format!("subject=CN = cp-1 | {member_sans} | {both}"),
        ),
        (
            "etcd/healthcheck-client",
            &certs.healthcheck_client,
            format!("subject=CN = kube-etcd-healthcheck-client | {client}"),
        ),
        (
            "apiserver-etcd-client",
            &certs.apiserver_etcd_client,
            format!("subject=CN = kube-apiserver-etcd-client | {client}"),
        ),
    ];
    for (name, pair, openssl_view) in &expected {
        let crt = dir.path().join(format!("{name}.crt"));
        let key = dir.path().join(format!("{name}.key"));
        assert_eq!(std::fs::read_to_string(&crt).expect("read"), pair.cert);
        assert_eq!(std::fs::read_to_string(&key).expect("read"), pair.key);
        let purposes: &[&str] = if name.ends_with("client") {
            &["sslclient"]
        } else {
            &["sslserver", "sslclient"]
        };
        for purpose in purposes {
            let out = Command::new("openssl")
                .args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
                .arg(&ca_file)
                .arg(&crt)
                .output()
                .expect("run openssl verify");
            assert!(
                out.status.success() && String::from_utf8_lossy(&out.stdout).contains(": OK"),
                "openssl verify -purpose {purpose} {name}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(
            &openssl_subject_sans_usages(&crt),
            openssl_view,
            "{name}: subject, SANs and extended key usages"
        );
        let safe_name = name.replace('/', "-");
        openssl_key_matches(dir.path(), &safe_name, pair);
    }

    // The client certificates are not server certificates.
    let out = Command::new("openssl")
        .args(["verify", "-purpose", "sslserver", "-CAfile"])
        .arg(&ca_file)
        .arg(dir.path().join("etcd/healthcheck-client.crt"))
        .output()
        .expect("run openssl verify");
    assert!(!out.status.success(), "a client certificate serves TLS");

    // The same checks through a real X.509 parser (key usages, identifiers, validity).
    let member = |cn| Expect {
        common_name: cn,
        days: 365,
        key_encipherment: true,
        client_auth: true,
        server_auth: true,
        dns_sans: vec!["cp-1", "localhost"],
        ip_sans: vec![ip("10.5.0.2"), ip("fd00::2"), ip("127.0.0.1"), ip("::1")],
        ..Expect::default()
    };
    let client = |cn| Expect {
        common_name: cn,
        days: 365,
        key_encipherment: true,
        client_auth: true,
        ..Expect::default()
    };
    check(&certs.server.cert, &ca.cert, &member("cp-1"));
    check(&certs.peer.cert, &ca.cert, &member("cp-1"));
    check(
        &certs.healthcheck_client.cert,
        &ca.cert,
        &client("kube-etcd-healthcheck-client"),
    );
    check(
        &certs.apiserver_etcd_client.cert,
        &ca.cert,
        &client("kube-apiserver-etcd-client"),
    );
    assert_ne!(
        certs.server.key, certs.peer.key,
        "each leaf has its own key"
    );

    // Debug shows no key.
    let shown = format!("{certs:?} {files:?}");
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    assert!(shown.contains("etcd/server.key"), "{shown}");
}

#[test]
fn etcd_sans_list_each_name_once() {
    let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
    assert_eq!(
        pki::etcd_sans("cp-1", &[]),
        ["cp-1", "localhost", "127.0.0.1", "::1"]
    );
    assert_eq!(
        pki::etcd_sans("localhost", &[ip("::1"), ip("10.5.0.3"), ip("10.5.0.3")]),
        ["localhost", "::1", "10.5.0.3", "127.0.0.1"]
    );
}

#[test]
fn etcd_certificates_refuse_a_bad_node_name() {
    let ca = pki::generate_ca(ca_names::ETCD).expect("etcd CA");
    for bad in ["", "cp 1", "cp_1;"] {
        let err = pki::etcd_certificates(&ca, bad, &[]).expect_err(bad);
        assert!(
            err.to_string().contains("subject alternative name"),
            "{bad:?}: {err}"
        );
    }
}
