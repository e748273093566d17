//! Clients that are not ours get the same answers: `openssl s_client` (TLS only) and
//! Python's grpcio with stubs generated from `machined/api/proto/machine.proto` at test time.
//!
//! grpcio and grpcio-tools are installed with pip into a cache directory when the Python
//! on the machine lacks them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use api_support::*;
use keelson_configs::pki::{self, CertAndKey, Role};

fn write_pair(dir: &Path, name: &str, pair: &CertAndKey) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &pair.cert).unwrap();
    std::fs::write(&key, &pair.key).unwrap();
    (cert, key)
}

/// Runs `openssl s_client` with stdin closed; returns everything it printed.
fn s_client(address: &str, extra: &[&str]) -> String {
    let out = Command::new("timeout")
        .args([
            "20",
            "openssl",
            "s_client",
            "-connect",
            address,
            "-servername",
            "localhost",
            "-alpn",
            "h2",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl (Debian package openssl)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn openssl_s_client_sees_tls13_mutual_authentication() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let dir = cluster.dir.path();
    let address = node.address.to_string();
    let ca = dir.join("ca.crt");
    std::fs::write(&ca, &cluster.ca.cert).unwrap();
    let ca = ca.to_str().unwrap();

    // No client certificate: the node ends the session with "certificate required".
    let out = s_client(&address, &["-tls1_3", "-CAfile", ca, "-ign_eof"]);
    assert!(
        out.contains("alert certificate required") || out.contains("alert number 116"),
        "{out}"
    );

    // TLS 1.2 is refused outright.
    let (cert, key) = write_pair(dir, "reader", &cluster.client(Role::Reader));
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let out = s_client(
        &address,
        &["-tls1_2", "-CAfile", ca, "-cert", cert, "-key", key],
    );
    assert!(
        out.contains("alert protocol version") || out.contains("alert number 70"),
        "{out}"
    );

    // A certificate from another CA.
    let other = pki::generate_ca("other").unwrap();
    let (ocert, okey) = write_pair(
        dir,
        "other",
        &pki::issue_api_client(&other, "m", Role::Admin).unwrap(),
    );
    let out = s_client(
        &address,
        &[
            "-tls1_3",
            "-CAfile",
            ca,
            "-cert",
            ocert.to_str().unwrap(),
            "-key",
            okey.to_str().unwrap(),
            "-ign_eof",
        ],
    );
    assert!(
        out.contains("alert unknown ca") || out.contains("alert bad certificate"),
        "{out}"
    );

    // A good reader certificate: TLS 1.3, h2, the node's certificate verifies.
    let out = s_client(
        &address,
        &["-tls1_3", "-CAfile", ca, "-cert", cert, "-key", key],
    );
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(out.contains("TLSv1.3"), "{out}");
    assert!(out.contains("ALPN protocol: h2"), "{out}");
    assert_eq!(node.backend.calls(), []);
}

/// A Python with grpcio and grpcio-tools importable, and the PYTHONPATH to use.
fn python_with_grpc() -> String {
    let check = |path: &str| {
        Command::new("python3")
            .args(["-c", "import grpc, grpc_tools.protoc"])
            .env("PYTHONPATH", path)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if check("") {
        return String::new();
    }
    let cache = std::env::temp_dir().join("keelson-test-python-grpc");
    let cache = cache.to_str().unwrap().to_owned();
    if check(&cache) {
        return cache;
    }
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--root-user-action=ignore",
            "--target",
            &cache,
            "grpcio",
            "grpcio-tools",
        ])
        .status()
        .expect("run python3 -m pip");
    assert!(
        status.success(),
        "pip could not install grpcio and grpcio-tools into {cache}"
    );
    assert!(check(&cache), "grpcio still not importable from {cache}");
    cache
}

const CLIENT: &str = r##"
import json, sys
import grpc
sys.path.insert(0, sys.argv[1])
import machine_pb2 as pb, machine_pb2_grpc as rpc

address, ca = sys.argv[2], open(sys.argv[3], 'rb').read()
def creds(name):
    if name is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=open(f"{sys.argv[4]}/{name}.key", 'rb').read(),
        certificate_chain=open(f"{sys.argv[4]}/{name}.crt", 'rb').read())

def call(who, method, request):
    opts = [('grpc.ssl_target_name_override', 'localhost')]
    with grpc.secure_channel(address, creds(who), options=opts) as ch:
        stub = rpc.MachineStub(ch)
        try:
            r = getattr(stub, method)(request, timeout=10)
            if hasattr(r, '__iter__') and not hasattr(r, 'ListFields'):
                r = list(r)
                return {"who": who, "method": method, "code": "OK", "n": len(r),
                        "data": "".join(c.data.decode() for c in r if hasattr(c, 'data'))}
            return {"who": who, "method": method, "code": "OK", "os": getattr(r, 'os_name', '')}
        except grpc.RpcError as e:
            return {"who": who, "method": method, "code": e.code().name, "details": e.details()}

results = [
    call("reader", "Version", pb.VersionRequest()),
    call("reader", "ApplyConfig", pb.ApplyConfigRequest(config=b"x", mode=pb.APPLY_MODE_NO_REBOOT)),
    call("reader", "Reboot", pb.RebootRequest()),
    call("reader", "Reset", pb.ResetRequest()),
    call("operator", "Reset", pb.ResetRequest()),
    call("reader", "Logs", pb.LogsRequest(service="containerd")),
    call("reader", "Read", pb.ReadRequest(path="/proc/sys/kernel/ostype")),
    call(None, "Version", pb.VersionRequest()),
    call("other", "Version", pb.VersionRequest()),
    call("expired", "Version", pb.VersionRequest()),
    call("admin", "ApplyConfig", pb.ApplyConfigRequest(config=b"#" * (9 * 1024 * 1024))),
    call("admin", "ApplyConfig", pb.ApplyConfigRequest(config=b"version = 1", mode=pb.APPLY_MODE_NO_REBOOT)),
]
print(json.dumps(results))
"##;

#[test]
fn python_grpc_gets_the_same_answers() {
    let pythonpath = python_with_grpc();
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let dir = cluster.dir.path();
    let stubs = dir.join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let proto_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/proto");
    let status = Command::new("python3")
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto_dir.display()))
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg(proto_dir.join("machine.proto"))
        .env("PYTHONPATH", &pythonpath)
        .status()
        .unwrap();
    assert!(status.success(), "grpc_tools.protoc failed");
    let creds = dir.join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    for role in Role::ALL {
        write_pair(&creds, role.name(), &cluster.client(role));
    }
    let other = pki::generate_ca("other").unwrap();
    write_pair(
        &creds,
        "other",
        &pki::issue_api_client(&other, "m", Role::Admin).unwrap(),
    );
    // An admin certificate of the right CA that expired in 2021.
    let ca_key = rcgen::KeyPair::from_pem(&cluster.ca.key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&cluster.ca.cert, ca_key).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "keelson:admin");
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    write_pair(
        &creds,
        "expired",
        &CertAndKey {
            cert: cert.pem(),
            key: key.serialize_pem(),
        },
    );
    let ca = dir.join("ca.crt");
    std::fs::write(&ca, &cluster.ca.cert).unwrap();
    let script = dir.join("client.py");
    std::fs::write(&script, CLIENT).unwrap();
    let out = Command::new("timeout")
        .arg("120")
        .arg("python3")
        .arg(&script)
        .arg(&stubs)
        .arg(node.address.to_string())
        .arg(&ca)
        .arg(&creds)
        .env("PYTHONPATH", &pythonpath)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let results: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let check = |i: usize, code: &str, details: &str| {
        let r = &results[i];
        assert_eq!(r["code"], code, "{r}");
        if !details.is_empty() {
            assert!(
                r["details"].as_str().unwrap_or_default().contains(details),
                "{r}"
            );
        }
    };
    check(0, "OK", "");
    assert_eq!(results[0]["os"], "Keelson");
    check(
        1,
        "PERMISSION_DENIED",
        "apply-config needs role admin, your certificate has reader",
    );
    check(
        2,
        "PERMISSION_DENIED",
        "reboot needs role operator, your certificate has reader",
    );
    check(
        3,
        "PERMISSION_DENIED",
        "reset needs role admin, your certificate has reader",
    );
    check(
        4,
        "PERMISSION_DENIED",
        "reset needs role admin, your certificate has operator",
    );
    check(5, "OK", "");
    assert_eq!(results[5]["n"], 1);
    check(6, "OK", "");
    assert_eq!(results[6]["data"], "Linux\n");
    check(7, "UNAVAILABLE", "");
    check(8, "UNAVAILABLE", "");
    check(9, "UNAVAILABLE", "");
    check(10, "RESOURCE_EXHAUSTED", "too large");
    check(11, "INVALID_ARGUMENT", "invalid machine config");
    assert_eq!(node.backend.calls(), []);
    assert_eq!(
        node.state_config().as_deref(),
        Some(cluster.controlplane.as_str())
    );
}
