//! The first config goes to the node the operator means: a node in maintenance mode is
//! reached by its certificate's SHA-256 fingerprint. Through the real `machinectl` binary
//! against the real machined (in-process, maintenance mode, 127.0.0.1): `--insecure` shows
//! the fingerprint it saw, `--cert-fingerprint` with that fingerprint is served, and with
//! any other is refused before anything is sent, naming the node and both fingerprints.

#![allow(clippy::unwrap_used, clippy::expect_used)]

// The daemon's test support: a generated cluster and a running machined.
#[path = "../../daemon/tests/api_support/mod.rs"]
mod api_support;

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api_support::*;
use keelson_configs::pki::Role;
use keelson_machined::backend::Call;
use sha2::{Digest as _, Sha256};

/// Runs the built machinectl.
fn machinectl(config: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_machinectl"))
        .arg("--machineconfig")
        .arg(config)
        .args(args)
        .env_remove("MACHINECONFIG")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run machinectl")
}

/// Accepts any server certificate (as a curious operator's own TLS client would).
#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The SHA-256 of the certificate the node serves, as `openssl x509 -fingerprint
/// -sha256` prints it, found without machinectl's code: a plain TLS handshake.
fn served_fingerprint(address: SocketAddr) -> String {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider)))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::from(address.ip());
    let mut tls = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tcp = TcpStream::connect(address).unwrap();
    while tls.is_handshaking() {
        tls.complete_io(&mut tcp).unwrap();
    }
    let _ = tcp.flush();
    let der = tls.peer_certificates().unwrap()[0].clone();
    Sha256::digest(der.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[test]
fn the_maintenance_certificate_is_shown_and_pinned_by_its_fingerprint() {
    let cluster = Cluster::new();
    let node = Node::start(None);
    let address = node.address.to_string();
    let config = cluster.client_config(node.address, Role::Admin);
    let fingerprint = served_fingerprint(node.address);
    let call = |flags: &[&str], args: &[&str]| {
        let mut all = flags.to_vec();
        all.extend(["--nodes", address.as_str()]);
        all.extend_from_slice(args);
        machinectl(&config, &all)
    };

    // --insecure shows what it saw, on one line of stderr, and the output is the call's.
    let out = call(&["--insecure"], &["version", "-o", "json"]);
    assert_ok(&out);
    let shown: Vec<String> = stderr(&out)
        .lines()
        .filter(|l| l.contains("SHA-256 fingerprint"))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        shown,
        [format!(
            "machinectl: {address} presented a certificate with SHA-256 fingerprint {fingerprint}, not verified (--insecure): compare it with the fingerprint on the node's console, and pass it as --cert-fingerprint to refuse any other"
        )],
        "{}",
        text(&out)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["maintenance"], true);

    // The right fingerprint, as typed (colons optional, any case): served, and nothing
    // more to compare.
    let bare = fingerprint.replace(':', "").to_lowercase();
    for pin in [fingerprint.as_str(), bare.as_str()] {
        let out = call(&["--cert-fingerprint", pin], &["version", "-o", "json"]);
        assert_ok(&out);
        assert!(!stderr(&out).contains("fingerprint"), "{}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v[0]["maintenance"], true);
    }

    // Any other is refused before anything is sent: the node, both fingerprints, and what
    // to do.
    let file = cluster.dir.path().join("first.toml");
    std::fs::write(&file, &cluster.controlplane).unwrap();
    let wrong = format!(
        "{}{}",
        if bare.starts_with('0') { "1" } else { "0" },
        &bare[1..]
    );
    let wrong_shown = wrong
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|pair| String::from_utf8_lossy(pair).into_owned())
        .collect::<Vec<_>>()
        .join(":");
    let out = call(
        &["--cert-fingerprint", &wrong],
        &["apply-config", "--file", file.to_str().unwrap()],
    );
    assert_fails(
        &out,
        &[
            &format!("refused the node at {address}"),
            &format!("fingerprint is {fingerprint}, not {wrong_shown}"),
            "--cert-fingerprint",
            "console",
        ],
    );
    assert_eq!(node.state_config(), None, "nothing reached the node");
    assert!(
        node.backend.calls().is_empty(),
        "{:?}",
        node.backend.calls()
    );

    // Not a fingerprint at all: a usage error, before any connection.
    let out = call(&["--cert-fingerprint", "AB:CD"], &["version"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("4 hexadecimal digits, not 64"),
        "{}",
        text(&out)
    );

    // The first config, pinned: applied, and the node leaves maintenance mode.
    let out = call(
        &["--cert-fingerprint", &fingerprint],
        &["apply-config", "--file", file.to_str().unwrap()],
    );
    assert_ok(&out);
    assert_eq!(
        node.state_config().as_deref(),
        Some(cluster.controlplane.as_str())
    );
    assert_eq!(node.backend.calls(), [Call::ConfigInstalled]);

    // Configured, the node serves a certificate from its node API CA: the maintenance
    // pin no longer matches, and the refusal says to use the context.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = call(&["--cert-fingerprint", &fingerprint], &["version"]);
        if !out.status.success() {
            assert_fails(
                &out,
                &[
                    &format!("refused the node at {address}"),
                    "a configured node is reached through its context",
                ],
            );
            break;
        }
        assert!(Instant::now() < deadline, "still in maintenance mode");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_ok(&machinectl(&config, &["version"]));
}
