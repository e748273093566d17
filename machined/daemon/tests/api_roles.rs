//! No escalation between roles, through the real in-process server: what `read` serves
//! readers and operators (an allowlist; no symlink followed) and how `image import` runs
//! (one at a time, its spool removed whatever happens). Whether an operator may repoint an
//! existing image name needs containerd: the decision is unit-tested in `containerd.rs`
//! (`oci::may_import`), the containerd call only by the VM tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use std::path::Path;
use std::time::Duration;

use api_support::*;
use keelson_api::api::proto;
use keelson_configs::pki::Role;
use tonic::Code;

/// Reads `path` as `role`: the file's bytes, or the refusal's code and message.
fn read(cluster: &Cluster, node: &Node, role: Role, path: &str) -> Result<Vec<u8>, (Code, String)> {
    let address = node.address.to_string();
    let connector = cluster.connector(node.address, role);
    rt().block_on(async {
        let mut c = connector.connect(&address).await.unwrap();
        let status = |s: tonic::Status| (s.code(), s.message().to_owned());
        let mut stream = c
            .read(proto::ReadRequest { path: path.into() })
            .await
            .map_err(status)?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.message().await.map_err(status)? {
            out.extend(chunk.data);
        }
        Ok(out)
    })
}

#[test]
fn readers_are_refused_kernel_addresses_environments_and_debugfs() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    for role in [Role::Reader, Role::Operator] {
        assert_eq!(
            read(&cluster, &node, role, "/proc/sys/kernel/ostype").unwrap(),
            b"Linux\n"
        );
        for (path, why) in [
            ("/proc/kallsyms", "kernel addresses"),
            ("/proc/1/stack", "kernel addresses"),
            ("/proc/1/environ", "process environments may hold secrets"),
            ("/proc/1/cmdline", "command lines may hold secrets"),
            ("/sys/kernel/debug/sched/debug", "debugfs"),
            ("/var/log/pods/ns_pod_uid/app/0.log", "pods' logs"),
        ] {
            let (code, message) = read(&cluster, &node, role, path).unwrap_err();
            assert_eq!(code, Code::PermissionDenied, "{path}: {message}");
            assert!(
                message.contains(&format!("reading {path} needs role admin ("))
                    && message.contains(why)
                    && message.contains(&format!("your certificate has {role}")),
                "{path}: {message}"
            );
        }
    }
    let environ = read(&cluster, &node, Role::Admin, "/proc/self/environ");
    assert!(environ.is_ok(), "{environ:?}");
}

#[test]
fn a_symlink_inside_a_readable_tree_is_refused() {
    let cluster = Cluster::new();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("system/state")).unwrap();
    std::fs::write(r.join("system/state/config.toml"), "secret").unwrap();
    std::fs::create_dir_all(r.join("var/log")).unwrap();
    std::fs::write(r.join("var/log/boot.log"), "booted").unwrap();
    std::os::unix::fs::symlink("../../system/state/config.toml", r.join("var/log/state")).unwrap();
    std::os::unix::fs::symlink("/", r.join("var/log/up")).unwrap();
    std::os::unix::fs::symlink("boot.log", r.join("var/log/alias")).unwrap();
    let state = tempfile::tempdir().unwrap();
    std::fs::write(state.path().join("config.toml"), &cluster.controlplane).unwrap();
    let node = Node::start_reading(state, backend(), r.canonicalize().unwrap());

    assert_eq!(
        read(&cluster, &node, Role::Reader, "/var/log/boot.log").unwrap(),
        b"booted"
    );
    for (path, link) in [
        ("/var/log/state", "/var/log/state"),
        ("/var/log/up/system/state/config.toml", "/var/log/up"),
        ("/var/log/alias", "/var/log/alias"),
    ] {
        for role in [Role::Reader, Role::Admin] {
            let (code, message) = read(&cluster, &node, role, path).unwrap_err();
            assert_eq!(code, Code::InvalidArgument, "{path}: {message}");
            assert!(
                message.contains(&format!("{link} is a symlink"))
                    && message.contains("follows no symlinks"),
                "{path}: {message}"
            );
        }
    }
}

fn spool_files(node: &Node) -> Vec<String> {
    match std::fs::read_dir(node.state.path().join("spool")) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn chunk(data: &[u8]) -> proto::ImageImportChunk {
    proto::ImageImportChunk {
        namespace: String::new(),
        data: data.to_vec(),
    }
}

#[test]
fn one_import_at_a_time_and_no_spool_left_behind() {
    let cluster = Cluster::new();
    let node = Node::start(Some(&cluster.controlplane));
    // What a crashed import left: the next import removes it.
    let spool = node.state.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    std::fs::write(spool.join("import-1-2-0.tar"), "stale").unwrap();

    let address = node.address.to_string();
    let connector = cluster.connector(node.address, Role::Operator);
    rt().block_on(async {
        // The first import streams its first bytes and keeps its stream open.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(chunk(b"not a tar archive")).await.unwrap();
        let mut first_client = connector.connect(&address).await.unwrap();
        let first = tokio::spawn(async move {
            first_client
                .image_import(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while spool_files(&node).len() != 1 || spool.join("import-1-2-0.tar").exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                spool_files(&node)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let mut second_client = connector.connect(&address).await.unwrap();
        let second = second_client
            .image_import(tokio_stream::iter([chunk(b"x")]))
            .await
            .unwrap_err();
        assert_eq!(second.code(), Code::Aborted, "{second:?}");
        assert!(
            second
                .message()
                .contains("another image import is running on this node; one runs at a time"),
            "{second:?}"
        );

        // The first fails (not an OCI archive, or no containerd here) and removes its spool.
        drop(tx);
        let failed = first.await.unwrap().unwrap_err();
        assert_ne!(failed.code(), Code::Ok, "{failed:?}");
        assert!(spool_files(&node).is_empty(), "{:?}", spool_files(&node));

        // An import cut off mid-stream removes its spool too, and frees the lock.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(chunk(b"partial")).await.unwrap();
        let mut cut_client = connector.connect(&address).await.unwrap();
        let cut = tokio::spawn(async move {
            cut_client
                .image_import(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while spool_files(&node).is_empty() {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cut.abort();
        drop(tx);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !spool_files(&node).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                spool_files(&node)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut last = connector.connect(&address).await.unwrap();
        let err = last
            .image_import(tokio_stream::iter([chunk(b"x")]))
            .await
            .unwrap_err();
        assert_ne!(err.code(), Code::Aborted, "{err:?}");
    });
    assert!(spool_files(&node).is_empty(), "{:?}", spool_files(&node));
    assert!(!Path::new(&spool).join("import-1-2-0.tar").exists());
}
