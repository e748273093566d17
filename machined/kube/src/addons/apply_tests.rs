//! Tests of `apply` and `wait_for_api` through kube-rs's real client against a recording
//! stand-in of the API server's HTTP (no Kubernetes runs here): discovery answers for the
//! kinds used, server-side apply requests recorded, `/readyz` answered as told. They show
//! what our code asks of an API server; a real one judges the objects in the end-to-end test.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use super::tests::{config, facts};
use super::{apply, render, wait_for_api};

/// One request the stand-in received.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    target: String,
    content_type: String,
    body: String,
}

type Handler = dyn Fn(&str, &str) -> (u16, String) + Send + Sync;

/// Serves HTTP/1.1 on a loopback port with `handler` (method, target → status, JSON
/// body), recording every request; gives its URL and the record.
fn stand_in(handler: Box<Handler>) -> (String, Arc<Mutex<Vec<Request>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let record = Arc::new(Mutex::new(Vec::new()));
    let handler: Arc<Handler> = Arc::from(handler);
    let kept = record.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let (handler, record) = (handler.clone(), kept.clone());
            std::thread::spawn(move || connection(stream, &*handler, &record));
        }
    });
    (url, record)
}

/// Answers the requests of one connection until the client closes it.
fn connection(stream: TcpStream, handler: &Handler, record: &Mutex<Vec<Request>>) {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or_default().to_owned(),
            parts.next().unwrap_or_default().to_owned(),
        );
        let (mut length, mut content_type) = (0, String::new());
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).unwrap();
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap(),
                "content-type" => content_type = value.trim().to_owned(),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let (status, answer) = handler(&method, &target);
        record.lock().unwrap().push(Request {
            method,
            target,
            content_type,
            body: String::from_utf8(body).unwrap(),
        });
        let response = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// A kubeconfig for `url` with a bearer token.
fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {url}\n\
         users:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n\
         current-context: x\n"
    )
}

/// The discovery documents and a registered node `cp-1` with two taints.
fn api_server(method: &str, target: &str) -> (u16, String) {
    let resource = |name: &str, kind: &str, namespaced: bool| {
        json!({"name": name, "singularName": "", "namespaced": namespaced, "kind": kind,
               "verbs": ["get", "patch"]})
    };
    let list = |group_version: &str, resources: Vec<Value>| {
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
               "resources": resources})
        .to_string()
    };
    match (method, target.split('?').next().unwrap_or_default()) {
        ("GET", "/api/v1") => (
            200,
            list(
                "v1",
                vec![
                    resource("configmaps", "ConfigMap", true),
                    resource("nodes", "Node", false),
                ],
            ),
        ),
        ("GET", "/apis/rbac.authorization.k8s.io/v1") => (
            200,
            list(
                "rbac.authorization.k8s.io/v1",
                vec![resource("clusterrolebindings", "ClusterRoleBinding", false)],
            ),
        ),
        ("GET", "/api/v1/nodes/cp-1") => (
            200,
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "cp-1"},
                   "spec": {"taints": [
                       {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"},
                       {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"},
                   ]}})
            .to_string(),
        ),
        ("PATCH", path) if path.contains("clusterrolebindings/kubeadm:get-nodes") => (
            403,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
                   "message": "forbidden: User \"u\" cannot patch", "code": 403})
            .to_string(),
        ),
        ("PATCH", _) => (200, "{}".into()),
        _ => (
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                   "message": "not found", "code": 404})
            .to_string(),
        ),
    }
}

fn objects_named(names: &[(&str, &str)]) -> Vec<Value> {
    let all = render(&config(), &facts()).unwrap();
    names
        .iter()
        .map(|(kind, name)| {
            all.iter()
                .find(|o| o["kind"] == *kind && o["metadata"]["name"] == *name)
                .unwrap()
                .clone()
        })
        .collect()
}

#[tokio::test]
async fn apply_server_side_applies_each_object_at_its_scope_and_keeps_the_nodes_taints() {
    let (url, record) = stand_in(Box::new(api_server));
    let objects = objects_named(&[("ConfigMap", "coredns"), ("Node", "cp-1")]);
    let applied = apply(&kubeconfig(&url), &objects).await.unwrap();
    assert_eq!(applied, 2);

    let patches: Vec<Request> = record
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.method == "PATCH")
        .cloned()
        .collect();
    assert_eq!(patches.len(), 2, "{patches:?}");
    let (path, query) = patches[0].target.split_once('?').unwrap();
    assert_eq!(path, "/api/v1/namespaces/kube-system/configmaps/coredns");
    assert!(
        query.contains("fieldManager=keelson") && query.contains("force=true"),
        "{query}"
    );
    assert_eq!(patches[0].content_type, "application/apply-patch+yaml");
    let sent: Value = serde_json::from_str(&patches[0].body).unwrap();
    assert_eq!(sent, objects[0]);

    assert!(
        patches[1].target.starts_with("/api/v1/nodes/cp-1?"),
        "{}",
        patches[1].target
    );
    let node: Value = serde_json::from_str(&patches[1].body).unwrap();
    assert_eq!(
        node["spec"]["taints"],
        json!([
            {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"},
            {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"},
        ])
    );
    assert_eq!(node["metadata"], objects[1]["metadata"]);
}

#[tokio::test]
async fn a_refused_object_stops_apply_and_is_named_with_the_server() {
    let (url, record) = stand_in(Box::new(api_server));
    let objects = objects_named(&[
        ("ConfigMap", "coredns"),
        ("ClusterRoleBinding", "kubeadm:get-nodes"),
        ("ConfigMap", "kube-proxy"),
    ]);
    let err = apply(&kubeconfig(&url), &objects)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("applying ClusterRoleBinding kubeadm:get-nodes"),
        "{err}"
    );
    assert!(err.contains(url.trim_start_matches("http://")), "{err}");
    assert!(err.contains("forbidden"), "{err}");
    let patched = record
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();
    assert_eq!(
        patched, 2,
        "the objects after the refused one are not applied"
    );
}

#[tokio::test]
async fn an_unregistered_node_is_not_created() {
    let (url, record) = stand_in(Box::new(api_server));
    let mut node = objects_named(&[("Node", "cp-1")]);
    node[0]["metadata"]["name"] = json!("cp-2");
    let err = apply(&kubeconfig(&url), &node)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Node cp-2") && err.contains("not registered yet"),
        "{err}"
    );
    assert!(!record.lock().unwrap().iter().any(|r| r.method == "PATCH"));
}

#[tokio::test]
async fn wait_for_api_returns_once_readyz_says_ok() {
    let calls = Arc::new(Mutex::new(0));
    let counted = calls.clone();
    let (url, _) = stand_in(Box::new(move |_, target| {
        let mut calls = counted.lock().unwrap();
        *calls += 1;
        match (target, *calls) {
            ("/readyz", 1) => (500, "[-]etcd failed".into()),
            ("/readyz", _) => (200, "ok".into()),
            _ => (404, "{}".into()),
        }
    }));
    wait_for_api(&kubeconfig(&url), Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(*calls.lock().unwrap(), 2);
}

#[tokio::test]
async fn wait_for_api_gives_up_at_its_deadline_naming_the_server_and_its_last_answer() {
    let (url, _) = stand_in(Box::new(|_, _| (500, "[-]etcd failed".into())));
    let err = wait_for_api(&kubeconfig(&url), Duration::from_secs(2))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(url.trim_start_matches("http://")), "{err}");
    assert!(
        err.contains("/readyz") && err.contains("etcd failed"),
        "{err}"
    );

    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let err = wait_for_api(&kubeconfig(&closed_url), Duration::from_secs(1))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(closed_url.trim_start_matches("http://")),
        "{err}"
    );
}

#[tokio::test]
async fn a_kubeconfig_that_does_not_parse_is_refused() {
    let err = wait_for_api("clusters: [", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not parse"), "{err}");
}

#[tokio::test]
async fn a_client_certificate_kubeconfig_makes_a_tls_client_that_names_the_unreachable_server() {
    use base64::Engine as _;
    use keelson_configs::pki::{self, LeafRequest, Usage};
    let ca = pki::generate_ca("kubernetes").unwrap();
    let leaf = pki::issue(
        &ca,
        &LeafRequest {
            common_name: "kubernetes-super-admin".into(),
            organizations: vec!["system:masters".into()],
            sans: Vec::new(),
            usage: Usage::Client,
        },
    )
    .unwrap();
    let b64 = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = format!("https://{}", closed.local_addr().unwrap());
    drop(closed);
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {}\nusers:\n- name: u\n  user:\n    client-certificate-data: {}\n    \
         client-key-data: {}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n\
         current-context: x\n",
        b64(&ca.cert),
        b64(&leaf.cert),
        b64(&leaf.key),
    );
    let err = wait_for_api(&kubeconfig, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, crate::KubeError::Api { server: s, .. } if s.starts_with(&server)),
        "{err}"
    );
}
