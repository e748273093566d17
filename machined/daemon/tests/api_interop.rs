//! Clients that are not ours get the same answers: `openssl s_client` (TLS only) and
//! Python's grpcio with stubs generated from `machined/api/proto/machine.proto` at test time.
//!
//! The security matrix is run from grpcio too, with certificates made by the `openssl`
//! command line: every method of the .proto as every role (and as a certificate with no
//! role), each against a table written out in this file; and every method as each identity
//! the TLS handshake must refuse (no certificate, a foreign CA, expired, not yet valid, the
//! cluster's Kubernetes and etcd CAs), which must reach nothing.
//!
//! grpcio and grpcio-tools are installed with pip into a cache directory when the Python
//! on the machine lacks them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use api_support::*;
use keelson_configs::pki::{self, CertAndKey, Role};
use keelson_machined::backend::{Call, Power, ServiceOp};

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

/// The `.proto` the node serves.
fn machine_proto() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/proto/machine.proto")
}

/// Generates grpcio stubs of `machine.proto` into `dir/stubs`; returns the PYTHONPATH that
/// has grpcio, and the stubs' directory.
fn python_stubs(dir: &Path) -> (String, PathBuf) {
    let pythonpath = python_with_grpc();
    let stubs = dir.join("stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    let proto = machine_proto();
    let status = Command::new("python3")
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto.parent().unwrap().display()))
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg(&proto)
        .env("PYTHONPATH", &pythonpath)
        .status()
        .unwrap();
    assert!(status.success(), "grpc_tools.protoc failed");
    (pythonpath, stubs)
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
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let dir = cluster.dir.path();
    let (pythonpath, stubs) = python_stubs(dir);
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

// The security matrix from a client that is not ours: every method of machine.proto, as
// every role and as every identity the node must not let in, with certificates made by the
// `openssl` command line.

/// The `openssl` command line as a small CA, in one directory: its config (`openssl.cnf`),
/// the database `openssl ca` keeps, and every key and certificate it makes.
struct OpenSsl {
    dir: PathBuf,
}

/// `openssl ca`'s database, the extensions of a CA and of a client certificate, and a
/// policy that takes any subject with a common name.
const OPENSSL_CNF: &str = r#"
[req]
distinguished_name = req_dn
prompt = no
[req_dn]
CN = unused
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[ca]
default_ca = signer
[signer]
database = DIR/index.txt
new_certs_dir = DIR/newcerts
serial = DIR/serial
default_md = sha256
policy = any_subject
unique_subject = no
email_in_dn = no
copy_extensions = none
[any_subject]
organizationName = optional
commonName = supplied
[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
"#;

/// When a client certificate is valid.
#[derive(Clone, Copy)]
enum Validity {
    /// From now, for two days.
    Now,
    /// From one `openssl ca` date (`YYYYMMDDHHMMSSZ`) to another.
    Between(&'static str, &'static str),
}

impl OpenSsl {
    fn new(dir: PathBuf) -> OpenSsl {
        std::fs::create_dir_all(dir.join("newcerts")).unwrap();
        std::fs::write(dir.join("index.txt"), "").unwrap();
        std::fs::write(dir.join("serial"), "1000\n").unwrap();
        std::fs::write(
            dir.join("openssl.cnf"),
            OPENSSL_CNF.replace("DIR", dir.to_str().unwrap()),
        )
        .unwrap();
        OpenSsl { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }

    fn run(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .env("OPENSSL_CONF", self.path("openssl.cnf"))
            .stdin(Stdio::null())
            .output()
            .expect("run openssl (Debian package openssl)");
        assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
    }

    /// What `openssl verify` says of the certificate `NAME.crt` as a TLS client's against
    /// the node API CA.
    fn verify(&self, name: &str) -> String {
        let out = Command::new("openssl")
            .args(["verify", "-purpose", "sslclient", "-CAfile"])
            .arg(self.path("node-api-ca.crt"))
            .arg(self.path(&format!("{name}.crt")))
            .env("OPENSSL_CONF", self.path("openssl.cnf"))
            .stdin(Stdio::null())
            .output()
            .expect("run openssl (Debian package openssl)");
        text(&out)
    }

    /// Writes an existing CA as `NAME-ca.crt` and `NAME-ca.key`.
    fn import_ca(&self, name: &str, ca: &CertAndKey) {
        std::fs::write(self.path(&format!("{name}-ca.crt")), &ca.cert).unwrap();
        std::fs::write(self.path(&format!("{name}-ca.key")), &ca.key).unwrap();
    }

    /// A new self-signed CA, `NAME-ca.crt` and `NAME-ca.key`.
    fn new_ca(&self, name: &str) {
        let (cert, key) = (
            self.path(&format!("{name}-ca.crt")),
            self.path(&format!("{name}-ca.key")),
        );
        self.run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-subj",
            &format!("/CN={name} CA"),
            "-days",
            "2",
            "-extensions",
            "ca_ext",
        ]);
    }

    /// A client key and certificate `NAME.key`, `NAME.crt` with subject `subject`
    /// (`/O=keelson:admin/CN=admin`), signed by the CA `ca` with `openssl ca`.
    fn client(&self, name: &str, ca: &str, subject: &str, validity: Validity) {
        let (key, csr, cert) = (
            self.path(&format!("{name}.key")),
            self.path(&format!("{name}.csr")),
            self.path(&format!("{name}.crt")),
        );
        self.run(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &key,
        ]);
        self.run(&["req", "-new", "-key", &key, "-subj", subject, "-out", &csr]);
        let (ca_cert, ca_key) = (
            self.path(&format!("{ca}-ca.crt")),
            self.path(&format!("{ca}-ca.key")),
        );
        let mut args = vec![
            "ca",
            "-batch",
            "-notext",
            "-preserveDN",
            "-extensions",
            "client_ext",
            "-cert",
            &ca_cert,
            "-keyfile",
            &ca_key,
            "-in",
            &csr,
            "-out",
            &cert,
        ];
        match validity {
            Validity::Now => args.extend(["-days", "2"]),
            Validity::Between(start, end) => args.extend(["-startdate", start, "-enddate", end]),
        }
        self.run(&args);
    }
}

/// Who may call a method, as the node API's documentation splits it (Talos's split: reads
/// for readers, day-to-day operations for operators, what changes what the node is for
/// admins; etcd:backup takes snapshots and nothing else). Written out here on purpose:
/// the test checks the server's table, it does not read it.
struct Who {
    /// How the refusal names the roles that may call it.
    needs: &'static str,
    /// The roles that may call it.
    allowed: &'static [&'static str],
}

const READER: Who = Who {
    needs: "reader",
    allowed: &["admin", "operator", "reader"],
};
const OPERATOR: Who = Who {
    needs: "operator",
    allowed: &["admin", "operator"],
};
const ADMIN: Who = Who {
    needs: "admin",
    allowed: &["admin"],
};
const SNAPSHOT: Who = Who {
    needs: "operator or etcd:backup",
    allowed: &["admin", "operator", "etcd:backup"],
};

/// Every method of machine.proto: its command-line name (as refusals name it) and who may
/// call it. The ones that would change the node most come last.
const METHODS: &[(&str, &str, Who)] = &[
    ("Version", "version", READER),
    ("Health", "health", READER),
    ("Services", "services", READER),
    ("Logs", "logs", READER),
    ("Dmesg", "dmesg", READER),
    ("Get", "get", READER),
    ("Read", "read", READER),
    ("Containers", "containers", READER),
    ("Images", "image list", READER),
    ("Time", "time", READER),
    ("EtcdMembers", "etcd members", READER),
    ("EtcdStatus", "etcd status", READER),
    ("EtcdAlarmList", "etcd alarm list", READER),
    ("UpgradeStatus", "upgrade status", READER),
    ("EtcdSnapshot", "etcd snapshot", SNAPSHOT),
    ("ServiceAction", "service", OPERATOR),
    ("ImageImport", "image import", OPERATOR),
    ("ImagePull", "image pull", OPERATOR),
    ("EtcdDefrag", "etcd defrag", OPERATOR),
    ("EtcdAlarmDisarm", "etcd alarm disarm", OPERATOR),
    ("EtcdForfeitLeadership", "etcd forfeit-leadership", OPERATOR),
    ("Kubeconfig", "kubeconfig", ADMIN),
    ("ApplyConfig", "apply-config", ADMIN),
    ("ConfirmConfig", "apply-config --confirm", ADMIN),
    ("Rollback", "rollback", ADMIN),
    ("Upgrade", "upgrade", ADMIN),
    ("Bootstrap", "bootstrap", ADMIN),
    ("EtcdRemoveMember", "etcd remove-member", ADMIN),
    ("EtcdLeave", "etcd leave", ADMIN),
    ("Reboot", "reboot", OPERATOR),
    ("Shutdown", "shutdown", OPERATOR),
    ("Reset", "reset", ADMIN),
];

/// The client certificates of the cluster's node API CA: each role's, and one whose
/// Organization names no role of ours. Certificate name, then its subject.
const MEMBERS: &[(&str, &str)] = &[
    ("admin", "/O=keelson:admin/CN=admin-user"),
    ("operator", "/O=keelson:operator/CN=operator-user"),
    ("reader", "/O=keelson:reader/CN=reader-user"),
    ("etcd:backup", "/O=keelson:etcd:backup/CN=backup-user"),
    ("no role", "/O=system:masters/CN=norole-user"),
];

/// An identity the TLS handshake must refuse: an admin-named certificate from `signer`'s CA
/// (`None`: no client certificate at all), valid `validity`; `openssl verify` refuses it
/// with `why` (so it is refused for that reason, the rest of it being a member's).
struct Stranger {
    name: &'static str,
    signer: Option<&'static str>,
    validity: Validity,
    why: &'static str,
}

const STRANGERS: &[Stranger] = &[
    Stranger {
        name: "no certificate",
        signer: None,
        validity: Validity::Now,
        why: "",
    },
    Stranger {
        name: "foreign CA",
        signer: Some("foreign"),
        validity: Validity::Now,
        why: "unable to get local issuer certificate",
    },
    Stranger {
        name: "expired",
        signer: Some("node-api"),
        validity: Validity::Between("20200101000000Z", "20210101000000Z"),
        why: "certificate has expired",
    },
    Stranger {
        name: "not yet valid",
        signer: Some("node-api"),
        validity: Validity::Between("20900101000000Z", "20910101000000Z"),
        why: "certificate is not yet valid",
    },
    Stranger {
        name: "kubernetes CA",
        signer: Some("kubernetes"),
        validity: Validity::Now,
        why: "unable to get local issuer certificate",
    },
    Stranger {
        name: "etcd CA",
        signer: Some("etcd"),
        validity: Validity::Now,
        why: "unable to get local issuer certificate",
    },
];

/// Calls each `[who, method]` of a JSON plan with a minimal valid request, each on its own
/// channel; prints one JSON result per call. Streams are drained within the call's
/// deadline.
const MATRIX_CLIENT: &str = r##"
import json, sys
import grpc
sys.path.insert(0, sys.argv[1])
import machine_pb2 as pb, machine_pb2_grpc as rpc

address, ca, creds_dir = sys.argv[2], open(sys.argv[3], 'rb').read(), sys.argv[4]
plan, config = json.load(open(sys.argv[5])), open(sys.argv[6], 'rb').read()

REQUESTS = {
    "Version": lambda: pb.VersionRequest(),
    "Health": lambda: pb.HealthRequest(),
    "Services": lambda: pb.ServicesRequest(),
    "ServiceAction": lambda: pb.ServiceActionRequest(
        name="containerd", action=pb.SERVICE_ACTION_RESTART),
    "Logs": lambda: pb.LogsRequest(service="containerd"),
    "Dmesg": lambda: pb.DmesgRequest(tail=1),
    "Get": lambda: pb.GetRequest(resource="memory"),
    "Read": lambda: pb.ReadRequest(path="/proc/sys/kernel/ostype"),
    "ApplyConfig": lambda: pb.ApplyConfigRequest(
        config=config, mode=pb.APPLY_MODE_NO_REBOOT, dry_run=True),
    "ConfirmConfig": lambda: pb.ConfirmConfigRequest(),
    "Reboot": lambda: pb.RebootRequest(),
    "Shutdown": lambda: pb.ShutdownRequest(),
    "Reset": lambda: pb.ResetRequest(),
    "Containers": lambda: pb.ContainersRequest(),
    "Images": lambda: pb.ImagesRequest(),
    "ImageImport": lambda: iter([pb.ImageImportChunk(data=b"not an archive")]),
    "ImagePull": lambda: pb.ImagePullRequest(reference="localhost/pause:1"),
    "Time": lambda: pb.TimeRequest(),
    "Bootstrap": lambda: iter([pb.BootstrapRequest()]),
    "EtcdMembers": lambda: pb.EtcdMembersRequest(),
    "EtcdStatus": lambda: pb.EtcdStatusRequest(),
    "EtcdSnapshot": lambda: pb.EtcdSnapshotRequest(),
    "EtcdDefrag": lambda: pb.EtcdDefragRequest(),
    "EtcdAlarmList": lambda: pb.EtcdAlarmListRequest(),
    "EtcdAlarmDisarm": lambda: pb.EtcdAlarmDisarmRequest(),
    "EtcdLeave": lambda: pb.EtcdLeaveRequest(),
    "EtcdRemoveMember": lambda: pb.EtcdRemoveMemberRequest(id="1"),
    "EtcdForfeitLeadership": lambda: pb.EtcdForfeitLeadershipRequest(),
    "Kubeconfig": lambda: pb.KubeconfigRequest(),
    "Upgrade": lambda: iter([pb.UpgradeRequest(options=pb.UpgradeOptions(dry_run=True))]),
    "Rollback": lambda: pb.RollbackRequest(),
    "UpgradeStatus": lambda: pb.UpgradeStatusRequest(),
}

def creds(who):
    if who == "no certificate":
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=open(f"{creds_dir}/{who}.key", 'rb').read(),
        certificate_chain=open(f"{creds_dir}/{who}.crt", 'rb').read())

def call(who, method):
    opts = [('grpc.ssl_target_name_override', 'localhost')]
    with grpc.secure_channel(address, creds(who), options=opts) as ch:
        stub = rpc.MachineStub(ch)
        try:
            r = getattr(stub, method)(REQUESTS[method](), timeout=15)
            if hasattr(r, '__iter__') and not hasattr(r, 'ListFields'):
                r = list(r)
            return {"who": who, "method": method, "code": "OK", "details": ""}
        except grpc.RpcError as e:
            return {"who": who, "method": method, "code": e.code().name,
                    "details": e.details() or ""}

print(json.dumps([call(who, method) for who, method in plan]))
"##;

/// What a refusal at the TLS handshake looks like to grpcio: the connection failed, so
/// the status is grpcio's own, never one the node sent.
fn refused_at_handshake(code: &str, details: &str) -> bool {
    code == "UNAVAILABLE" && details.starts_with("failed to connect to all addresses")
}

/// One call of the matrix: who called what, what the test expects and what came back.
struct Row {
    who: String,
    method: String,
    expected: String,
    code: String,
    details: String,
    pass: bool,
}

/// The PYTHONPATH with grpcio, and the directory of the generated stubs.
type Python = (String, PathBuf);

/// Runs the plan's calls with `MATRIX_CLIENT` and returns grpcio's answers, in order.
fn run_matrix(
    (pythonpath, stubs): &Python,
    node: &Node,
    dir: &Path,
    creds: &Path,
    config: &Path,
    plan: &[(String, String)],
) -> Vec<serde_json::Value> {
    let plan_file = dir.join("plan.json");
    std::fs::write(&plan_file, serde_json::to_vec(plan).unwrap()).unwrap();
    let script = dir.join("matrix.py");
    std::fs::write(&script, MATRIX_CLIENT).unwrap();
    let out = Command::new("timeout")
        .arg("900")
        .arg("python3")
        .arg(&script)
        .arg(stubs)
        .arg(node.address.to_string())
        .arg(creds.join("node-api-ca.crt"))
        .arg(creds)
        .arg(&plan_file)
        .arg(config)
        .env("PYTHONPATH", pythonpath)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let results: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(results.len(), plan.len());
    results
}

/// The table, one line a call, failures marked.
fn print_table(rows: &[Row]) -> String {
    let mut out = String::new();
    for r in rows {
        out.push_str(&format!(
            "{} {:<22} {:<15} expected {:<55} got {} {}\n",
            if r.pass { "  " } else { "!!" },
            r.method,
            r.who,
            r.expected,
            r.code,
            r.details.replace('\n', " ")
        ));
    }
    out
}

/// The methods machine.proto declares, read from the file.
fn proto_methods() -> Vec<String> {
    std::fs::read_to_string(machine_proto())
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .map(|l| l.split('(').next().unwrap().trim().to_owned())
        .collect()
}

/// The certificates of the matrix, all made with `openssl`: the members of the cluster
/// (from the node API CA's key) and the strangers. The cluster's Kubernetes and etcd CAs
/// are the ones the node's config carries.
fn openssl_certificates(cluster: &Cluster, creds: &Path) {
    let ssl = OpenSsl::new(creds.to_path_buf());
    ssl.import_ca("node-api", &cluster.ca);
    let config: toml::Table = toml::from_str(&cluster.controlplane).unwrap();
    for (name, key) in [("kubernetes", "kubernetes_ca"), ("etcd", "etcd_ca")] {
        let ca = &config["cluster"]["secrets"][key];
        let ca = CertAndKey {
            cert: ca["cert"].as_str().unwrap().to_owned(),
            key: ca["key"].as_str().unwrap().to_owned(),
        };
        assert_ne!(ca.cert, cluster.ca.cert);
        ssl.import_ca(name, &ca);
    }
    ssl.new_ca("foreign");
    for (name, subject) in MEMBERS {
        ssl.client(name, "node-api", subject, Validity::Now);
        let verified = ssl.verify(name);
        assert!(verified.contains(": OK"), "{name}: {verified}");
    }
    for stranger in STRANGERS {
        if let Some(ca) = stranger.signer {
            let subject = "/O=keelson:admin/CN=admin-user";
            ssl.client(stranger.name, ca, subject, stranger.validity);
            let verified = ssl.verify(stranger.name);
            assert!(
                verified.contains(stranger.why) && !verified.contains(": OK"),
                "{}: {verified}",
                stranger.name
            );
        }
    }
}

#[test]
fn python_grpc_role_matrix_with_openssl_certificates() {
    let started = std::time::Instant::now();
    let mut methods: Vec<&str> = METHODS.iter().map(|(m, _, _)| *m).collect();
    methods.sort_unstable();
    let mut declared = proto_methods();
    declared.sort_unstable();
    assert_eq!(
        methods, declared,
        "the matrix must name every method of machine.proto, once"
    );

    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let dir = cluster.dir.path();
    let creds = dir.join("creds");
    openssl_certificates(&cluster, &creds);
    let config = dir.join("config.toml");
    std::fs::write(&config, &cluster.controlplane).unwrap();

    // The strangers first, on the fresh node: nothing they send may reach it.
    let mut plan = Vec::new();
    for (method, _, _) in METHODS {
        for stranger in STRANGERS {
            plan.push((stranger.name.to_string(), method.to_string()));
        }
    }
    let strangers = plan.len();
    for (method, _, _) in METHODS {
        for (who, _) in MEMBERS {
            plan.push((who.to_string(), method.to_string()));
        }
    }
    let python = python_stubs(dir);
    let mut results = run_matrix(&python, &node, dir, &creds, &config, &plan[..strangers]);
    let calls_after_strangers = node.backend.calls();
    let members = run_matrix(&python, &node, dir, &creds, &config, &plan[strangers..]);
    results.extend(members);

    let mut rows = Vec::new();
    for ((who, method), result) in plan.iter().zip(&results) {
        let code = result["code"].as_str().unwrap().to_owned();
        let details = result["details"].as_str().unwrap().to_owned();
        let (_, command, may) = METHODS.iter().find(|(m, _, _)| m == method).unwrap();
        let (expected, pass) = if STRANGERS.iter().any(|s| s.name == who) {
            (
                "UNAVAILABLE (refused at the TLS handshake)".to_owned(),
                refused_at_handshake(&code, &details),
            )
        } else if may.allowed.contains(&who.as_str()) {
            // The fake node has no containerd, etcd or upgrade engine: the handler's own
            // error (FAILED_PRECONDITION, UNIMPLEMENTED, even UNAVAILABLE naming what is
            // missing) shows the call got past the role check; grpcio's own UNAVAILABLE
            // (no connection) does not.
            (
                "served: any answer of the node but PERMISSION_DENIED/UNAUTHENTICATED".to_owned(),
                !matches!(code.as_str(), "PERMISSION_DENIED" | "UNAUTHENTICATED")
                    && !refused_at_handshake(&code, &details),
            )
        } else {
            let has = if who == "no role" {
                "(CN=\"norole-user\") carries no role".to_owned()
            } else {
                format!("has {who}")
            };
            let message = format!(
                "permission denied: {command} needs role {}, your certificate {has}",
                may.needs
            );
            let pass = code == "PERMISSION_DENIED" && details.starts_with(&message);
            (format!("PERMISSION_DENIED {message}"), pass)
        };
        rows.push(Row {
            who: who.clone(),
            method: method.clone(),
            expected,
            code,
            details,
            pass,
        });
    }
    let table = print_table(&rows);
    let failed = rows.iter().filter(|r| !r.pass).count();
    assert!(
        failed == 0,
        "{failed} of {} calls differ from the table (marked !!):\n{table}",
        rows.len()
    );
    assert_eq!(
        calls_after_strangers,
        [],
        "a refused identity reached the backend:\n{table}"
    );
    // What the members' allowed calls asked of PID 1, and nothing a refused call asked.
    let restart = Call::ServiceAction("containerd".into(), ServiceOp::Restart);
    assert_eq!(
        node.backend.calls(),
        [
            restart.clone(),
            restart,
            Call::Power(Power::Reboot),
            Call::Power(Power::Reboot),
            Call::Power(Power::Poweroff),
            Call::Power(Power::Poweroff),
            Call::Reset,
        ],
        "{table}"
    );
    assert_eq!(
        node.state_config().as_deref(),
        Some(cluster.controlplane.as_str())
    );
    eprintln!(
        "{} calls as expected in {:?}:\n{table}",
        rows.len(),
        started.elapsed()
    );
}
