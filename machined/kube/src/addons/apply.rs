//! The bootstrap manifests applied through the API server with kube-rs: server-side apply
//! of each object in order (field manager `keelson`, conflicts forced), its resource and
//! scope found by the API server's discovery; and the wait for the API server to be ready.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{GroupVersionKind, TypeMeta};
use kube::discovery::{ApiCapabilities, ApiResource, Scope};
use kube::{Client, Config};
use serde_json::Value;

use super::ObjectId;
use crate::KubeError;

/// The field manager of every object Keelson applies.
const FIELD_MANAGER: &str = "keelson";
/// How long one readiness request may take.
const READY_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause between readiness requests.
const READY_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// A client of the API server of a kubeconfig, and the server's URL for messages.
struct Connection {
    client: Client,
    server: String,
}

impl Connection {
    /// A client from `kubeconfig_yaml` (its current context).
    async fn new(kubeconfig_yaml: &str) -> Result<Connection, KubeError> {
        let kubeconfig = Kubeconfig::from_yaml(kubeconfig_yaml).map_err(|err| {
            KubeError::Kubeconfig(format!(
                "the kubeconfig for the bootstrap manifests does not parse: {err}"
            ))
        })?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|err| {
                KubeError::Kubeconfig(format!(
                    "the kubeconfig for the bootstrap manifests is unusable: {err}"
                ))
            })?;
        let server = config.cluster_url.to_string();
        let client = Client::try_from(config).map_err(|err| KubeError::Api {
            what: "making a client".into(),
            server: server.clone(),
            message: format!("{err}; check the kubeconfig's CA and client certificate"),
        })?;
        Ok(Connection { client, server })
    }

    /// An error of `what` through this connection.
    fn error(&self, what: String, err: impl std::fmt::Display) -> KubeError {
        KubeError::Api {
            what,
            server: self.server.clone(),
            message: err.to_string(),
        }
    }
}

/// Server-side applies `objects` in order through the API server of `kubeconfig_yaml`
/// (field manager `keelson`, conflicts forced, so that a second run converges) and gives
/// how many were applied. The first error stops it and names the object; objects before
/// it stay applied, and applying all again is safe.
///
/// A Node is marked only once the kubelet registered it (an absent one is an error, to
/// retry), keeping the taints it has besides ours, as kubeadm's `mark-control-plane` does.
/// Use `super-admin.conf` (group `system:masters`): `admin.conf`'s group gets its rights
/// from the `kubeadm:cluster-admins` binding applied here.
pub async fn apply(kubeconfig_yaml: &str, objects: &[Value]) -> Result<usize, KubeError> {
    let connection = Connection::new(kubeconfig_yaml).await?;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut resources: HashMap<(String, String), (ApiResource, ApiCapabilities)> = HashMap::new();
    for (index, object) in objects.iter().enumerate() {
        let id = ObjectId::of(object).ok_or_else(|| KubeError::Serialize {
            what: format!("bootstrap manifest {}", index + 1),
            message: "it has no apiVersion, kind or metadata.name".into(),
        })?;
        let key = (id.api_version.clone(), id.kind.clone());
        let (resource, capabilities) = match resources.get(&key) {
            Some(found) => found.clone(),
            None => {
                let found = discover(&connection, &id).await?;
                resources.insert(key, found.clone());
                found
            }
        };
        let api: Api<DynamicObject> = match (&capabilities.scope, &id.namespace) {
            (Scope::Cluster, _) => Api::all_with(connection.client.clone(), &resource),
            (Scope::Namespaced, Some(namespace)) => {
                Api::namespaced_with(connection.client.clone(), namespace, &resource)
            }
            (Scope::Namespaced, None) => {
                return Err(KubeError::Serialize {
                    what: id.to_string(),
                    message: format!("a {} is namespaced but it has no namespace", id.kind),
                });
            }
        };
        let body = if id.kind == "Node" && id.api_version == "v1" {
            with_node_taints(&connection, &api, &id, object).await?
        } else {
            object.clone()
        };
        api.patch(&id.name, &params, &Patch::Apply(&body))
            .await
            .map_err(|err| {
                connection.error(
                    format!("applying {id}"),
                    format!(
                        "{}; the kubeconfig's user must be a cluster admin (super-admin.conf)",
                        describe(&err)
                    ),
                )
            })?;
        tracing::debug!(object = %id, "applied");
    }
    Ok(objects.len())
}

/// The resource and scope of `id`'s kind, from the API server's discovery.
async fn discover(
    connection: &Connection,
    id: &ObjectId,
) -> Result<(ApiResource, ApiCapabilities), KubeError> {
    let gvk = GroupVersionKind::try_from(TypeMeta {
        api_version: id.api_version.clone(),
        kind: id.kind.clone(),
    })
    .map_err(|err| KubeError::Serialize {
        what: id.to_string(),
        message: err.to_string(),
    })?;
    kube::discovery::pinned_kind(&connection.client, &gvk)
        .await
        .map_err(|err| {
            connection.error(
                format!("finding the resource of {} {}", id.api_version, id.kind),
                describe(&err),
            )
        })
}

/// The Node object to apply: `object`'s taints, then those the registered node has
/// besides them (kubeadm keeps them). An unregistered node is an error.
async fn with_node_taints(
    connection: &Connection,
    api: &Api<DynamicObject>,
    id: &ObjectId,
    object: &Value,
) -> Result<Value, KubeError> {
    let node = api
        .get_opt(&id.name)
        .await
        .map_err(|err| connection.error(format!("reading {id}"), describe(&err)))?
        .ok_or_else(|| {
            connection.error(
                format!("marking {id} as a control plane"),
                "the node is not registered yet; its kubelet registers it once it runs: apply again then",
            )
        })?;
    let mut body = object.clone();
    let same = |a: &Value, b: &Value| a["key"] == b["key"] && a["effect"] == b["effect"];
    if let Some(taints) = body["spec"]["taints"].as_array_mut() {
        let existing = node.data["spec"]["taints"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for taint in existing {
            if !taints.iter().any(|ours| same(ours, &taint)) {
                taints.push(taint);
            }
        }
    }
    Ok(body)
}

/// Waits until the API server of `kubeconfig_yaml` says it is ready (`/readyz` answers
/// `ok`), asking every second, for at most `deadline`. The error names the server and
/// what it last answered.
pub async fn wait_for_api(kubeconfig_yaml: &str, deadline: Duration) -> Result<(), KubeError> {
    let connection = Connection::new(kubeconfig_yaml).await?;
    let started = Instant::now();
    loop {
        let last = match ready(&connection).await {
            Ok(()) => return Ok(()),
            Err(why) => why,
        };
        let waited = started.elapsed();
        if waited >= deadline {
            return Err(connection.error(
                format!(
                    "waiting {} s for the API server to be ready",
                    deadline.as_secs()
                ),
                format!("{last}; check that kube-apiserver runs (its static pod) and reaches etcd"),
            ));
        }
        tokio::time::sleep(READY_POLL_INTERVAL.min(deadline - waited)).await;
    }
}

/// One `/readyz` request: `Ok` when the server answers `ok`, else what it said.
async fn ready(connection: &Connection) -> Result<(), String> {
    let request = http::Request::get("/readyz")
        .body(Vec::new())
        .map_err(|err| err.to_string())?;
    match tokio::time::timeout(
        READY_REQUEST_TIMEOUT,
        connection.client.request_text(request),
    )
    .await
    {
        Ok(Ok(text)) if text.trim() == "ok" => Ok(()),
        Ok(Ok(text)) => Err(format!("/readyz answered {:?}", text.trim())),
        Ok(Err(err)) => Err(format!("/readyz: {}", describe(&err))),
        Err(_) => Err(format!(
            "/readyz did not answer within {} s",
            READY_REQUEST_TIMEOUT.as_secs()
        )),
    }
}

/// A kube-rs error in a line: an API server's answer as its message and HTTP status,
/// anything else with its causes (such as the connection's).
fn describe(err: &kube::Error) -> String {
    if let kube::Error::Api(status) = err {
        return format!("{} (HTTP {})", status.message, status.code);
    }
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}
