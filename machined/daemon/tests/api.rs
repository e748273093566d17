//! The node API's security on the host, through the library client: the real machined
//! server (in-process, TLS on 127.0.0.1, a random port, a temporary STATE) with a
//! recording backend in place of PID 1's control socket. Covers the security matrix (no
//! certificate, another CA, an expired certificate, each role) and one apply at a time.
//! The commands through `machinectl` are tested in `machined/cli/tests/api.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use std::time::Duration;

use api_support::*;
use keelson_api::api::proto;
use keelson_api::client::{ClientError, Connector};
use keelson_api::clientconfig::Context;
use keelson_configs::pki::Role;
use keelson_machined::backend::{Call, Power};

fn apply_request(config: &str, mode: proto::ApplyMode) -> proto::ApplyConfigRequest {
    proto::ApplyConfigRequest {
        config: config.as_bytes().to_vec(),
        mode: mode.into(),
        try_timeout_seconds: 0,
        dry_run: false,
    }
}

/// Calls version and the three changing methods with `connector`; returns each outcome.
fn try_everything(
    connector: &Connector,
    node: &Node,
    cluster: &Cluster,
) -> Vec<Result<(), ClientError>> {
    let address = node.address.to_string();
    rt().block_on(async {
        let mut out = Vec::new();
        for method in ["version", "apply", "reboot", "reset"] {
            let result = async {
                let mut c = connector.connect(&address).await?;
                let r = match method {
                    "version" => c.version(proto::VersionRequest {}).await.map(|_| ()),
                    "apply" => c
                        .apply_config(apply_request(
                            &cluster.with_sysctl("vm.swappiness", "1"),
                            proto::ApplyMode::NoReboot,
                        ))
                        .await
                        .map(|_| ()),
                    "reboot" => c.reboot(proto::RebootRequest {}).await.map(|_| ()),
                    _ => c
                        .reset(proto::ResetRequest { force: false })
                        .await
                        .map(|_| ()),
                };
                r.map_err(|s| connector.status_error(&address, &s))
            }
            .await;
            out.push(result);
        }
        out
    })
}

#[test]
fn the_security_matrix() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    let address = node.address;

    // No client certificate at all (the CA is right).
    let no_cert = rustls::ClientConfig::builder_with_provider(keelson_api::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates({
            let mut roots = rustls::RootCertStore::empty();
            for c in keelson_api::tls::parse_certs(&cluster.ca.cert, "ca").unwrap() {
                roots.add(c).unwrap();
            }
            roots
        })
        .with_no_client_auth();
    let mut no_cert = no_cert;
    no_cert.alpn_protocols = vec![b"h2".to_vec()];
    let connector = Connector::from_rustls("no-cert", std::sync::Arc::new(no_cert));
    for r in try_everything(&connector, &node, &cluster) {
        let err = r.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::CertificateRequired { .. } | ClientError::ClientCertRefused { .. }
            ),
            "no certificate: {err:?}"
        );
    }

    // A certificate from another CA.
    let other_ca = keelson_configs::pki::generate_ca("other").unwrap();
    let other = keelson_configs::pki::issue_api_client(&other_ca, "mallory", Role::Admin).unwrap();
    let ctx = Context {
        cert: other.cert.clone(),
        key: other.key.clone(),
        ..cluster.context(address, &other)
    };
    let connector = Connector::for_context("other-ca", &ctx).unwrap();
    for r in try_everything(&connector, &node, &cluster) {
        let err = r.unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, ClientError::ClientCertRefused { .. }),
            "{err:?}"
        );
        assert!(text.contains("not signed by the node's API CA"), "{text}");
    }

    // An expired certificate, sent anyway (the CLI refuses it before connecting).
    let expired = expired_admin(&cluster);
    let ctx = cluster.context(address, &expired);
    let err = Connector::for_context("expired", &ctx).unwrap_err();
    assert!(
        matches!(err, ClientError::ClientCertExpired { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("expired on 2021-01-01"), "{err}");
    let connector = Connector::for_context_unchecked("expired", &ctx).unwrap();
    for r in try_everything(&connector, &node, &cluster) {
        let err = r.unwrap_err();
        assert!(
            err.to_string().contains("the certificate has expired"),
            "expired: {err:?}"
        );
    }

    // A reader: version yes; apply-config, reboot, reset no.
    let results = try_everything(&cluster.connector(address, Role::Reader), &node, &cluster);
    assert!(results[0].is_ok(), "{:?}", results[0]);
    let want = [
        "permission denied: apply-config needs role admin, your certificate has reader",
        "permission denied: reboot needs role operator, your certificate has reader",
        "permission denied: reset needs role admin, your certificate has reader",
    ];
    for (r, want) in results[1..].iter().zip(want) {
        match r {
            Err(ClientError::PermissionDenied(m)) => assert_eq!(m, want),
            other => panic!("reader: {other:?}"),
        }
    }

    // An operator calling reset (and apply-config).
    let results = try_everything(&cluster.connector(address, Role::Operator), &node, &cluster);
    match &results[3] {
        Err(ClientError::PermissionDenied(m)) => {
            assert_eq!(
                m,
                "permission denied: reset needs role admin, your certificate has operator"
            );
        }
        other => panic!("operator reset: {other:?}"),
    }
    assert!(matches!(results[1], Err(ClientError::PermissionDenied(_))));
    // The operator's reboot was the only call that reached the node.
    assert!(results[2].is_ok());
    assert_eq!(node.backend.calls(), [Call::Power(Power::Reboot)]);
    assert_eq!(
        node.state_config().as_deref(),
        Some(cluster.controlplane.as_str())
    );

    // etcd:backup takes snapshots and nothing else: every other call is refused before
    // it reaches the node, and a snapshot passes the role check (this node's etcd is not
    // running, which is what it then says).
    let backup = cluster.connector(address, Role::EtcdBackup);
    let results = try_everything(&backup, &node, &cluster);
    let want = [
        "permission denied: version needs role reader, your certificate has etcd:backup",
        "permission denied: apply-config needs role admin, your certificate has etcd:backup",
        "permission denied: reboot needs role operator, your certificate has etcd:backup",
        "permission denied: reset needs role admin, your certificate has etcd:backup",
    ];
    for (r, want) in results.iter().zip(want) {
        match r {
            Err(ClientError::PermissionDenied(m)) => assert_eq!(m, want),
            other => panic!("etcd:backup: {other:?}"),
        }
    }
    let snapshot = rt().block_on(async {
        let mut c = backup.connect(&address.to_string()).await.unwrap();
        c.etcd_snapshot(proto::EtcdSnapshotRequest {})
            .await
            .map(|_| ())
    });
    let status = snapshot.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("etcd does not run on this node"),
        "{status:?}"
    );
    let reader_snapshot = rt().block_on(async {
        let mut c = cluster
            .connector(address, Role::Reader)
            .connect(&address.to_string())
            .await
            .unwrap();
        c.etcd_snapshot(proto::EtcdSnapshotRequest {})
            .await
            .map(|_| ())
    });
    assert_eq!(
        reader_snapshot.unwrap_err().message(),
        "permission denied: etcd snapshot needs role operator or etcd:backup, your certificate has reader"
    );

    // A reader can read logs.
    let logs = rt().block_on(async {
        let mut c = cluster
            .connector(address, Role::Reader)
            .connect(&address.to_string())
            .await
            .unwrap();
        let mut s = c
            .logs(proto::LogsRequest {
                service: "containerd".into(),
                follow: false,
                tail_lines: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut lines = Vec::new();
        while let Some(m) = s.message().await.unwrap() {
            lines.extend(m.lines);
        }
        lines
    });
    assert_eq!(logs.len(), 5);
}

#[test]
fn one_apply_at_a_time() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    node.backend.set_apply_delay(Duration::from_millis(1500));
    let address = node.address.to_string();
    let connector = cluster.connector(node.address, Role::Admin);
    let (a, b) = (
        cluster.with_sysctl("vm.swappiness", "11"),
        cluster.with_sysctl("vm.swappiness", "12"),
    );
    let results = rt().block_on(async {
        let mut c1 = connector.connect(&address).await.unwrap();
        let mut c2 = connector.connect(&address).await.unwrap();
        let first = c1.apply_config(apply_request(&a, proto::ApplyMode::NoReboot));
        let second = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            c2.apply_config(apply_request(&b, proto::ApplyMode::NoReboot))
                .await
        };
        tokio::join!(first, second)
    });
    assert!(results.0.is_ok(), "{:?}", results.0);
    let err = results.1.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Aborted);
    assert_eq!(
        err.message(),
        "another apply-config is in progress on this node; try again when it has finished"
    );
    assert_eq!(node.state_config().as_deref(), Some(a.as_str()));
}
