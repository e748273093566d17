//! The Kubernetes Container Runtime Interface (CRI v1, the `k8s-cri` crate) over
//! containerd's socket: image pulls as `kubeadm config images pull` makes them, and the
//! containers of the pods the kubelet runs, for `health`.
//!
//! containerd's CRI plugin keeps its images and containers in the containerd namespace
//! [`CRI_NAMESPACE`], where the kubelet finds them: an image pulled here is the kubelet's,
//! and containerd's own API (`crate::containerd`) lists it under that namespace.
//!
//! Each call opens its own connection to the socket (a tonic channel over a Unix stream, as
//! `crate::containerd` connects) and has a deadline: [`PULL_DEADLINE`] for a pull,
//! [`CALL_DEADLINE`] for the others, sent to containerd as the gRPC timeout too. Without the
//! `containerd` feature every function answers [`CriError::NotBuilt`].

use std::path::{Path, PathBuf};
use std::time::Duration;

/// containerd's namespace for the CRI's images and containers (the kubelet's).
pub const CRI_NAMESPACE: &str = "k8s.io";

/// The deadline of an image pull.
pub const PULL_DEADLINE: Duration = Duration::from_secs(10 * 60);

/// The deadline of every other call.
pub const CALL_DEADLINE: Duration = Duration::from_secs(10);

/// The longest image reference accepted (the distribution spec's bound on a name, with
/// room for a tag and a digest).
const MAX_REFERENCE: usize = 512;

/// A container of a pod, as the CRI lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    /// The runtime's container ID.
    pub id: String,
    /// The container's name in its pod.
    pub name: String,
    /// Its pod's name.
    pub pod_name: String,
    /// Its pod's namespace.
    pub pod_namespace: String,
    /// `created`, `running`, `exited` or `unknown`.
    pub state: String,
    /// The kubelet's attempt number for this container (0 for the first).
    pub attempt: u32,
    /// The kubelet's restart count (its `io.kubernetes.container.restartCount` annotation),
    /// else the attempt number.
    pub restarts: u32,
    /// The image it runs.
    pub image: String,
}

/// Errors of the CRI calls. Each names the socket or the image and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// This machined has no CRI client.
    #[error(
        "this machined was built without containerd support (feature `containerd`): build it with the default features"
    )]
    NotBuilt,
    /// The reference cannot be an image reference.
    #[error(
        "{reference:?} is not an image reference: {why}; write [REGISTRY[:PORT]/]PATH[:TAG][@sha256:DIGEST]"
    )]
    BadReference {
        /// What was given.
        reference: String,
        /// What is wrong with it.
        why: String,
    },
    /// containerd's socket did not answer.
    #[error(
        "cannot reach containerd's CRI at {}: {detail} (is the containerd service running? see `machinectl services`)",
        socket.display()
    )]
    Unavailable {
        /// The socket.
        socket: PathBuf,
        /// The connection error's chain.
        detail: String,
    },
    /// containerd refused or failed the pull.
    #[error(
        "containerd could not pull {reference}: {message} ({code:?}); check the registry's name, that the node reaches it, and that the image and tag exist"
    )]
    Pull {
        /// The image.
        reference: String,
        /// The gRPC code.
        code: tonic::Code,
        /// containerd's message (often the registry's answer).
        message: String,
    },
    /// Another CRI call failed.
    #[error(
        "containerd's CRI failed {what}: {message} ({code:?}); see `machinectl logs containerd`"
    )]
    Call {
        /// The call, with its subject.
        what: String,
        /// The gRPC code.
        code: tonic::Code,
        /// containerd's message.
        message: String,
    },
    /// A call took longer than its deadline.
    #[error(
        "containerd's CRI did not finish {what} within {after:?}: check `machinectl logs containerd` and the node's network, then retry"
    )]
    Timeout {
        /// The call, with its subject.
        what: String,
        /// The deadline.
        after: Duration,
    },
}

/// Checks the shape of an image reference that containerd's own parser judges in full: not
/// empty, no blanks or control characters, no scheme, not absurdly long.
pub fn check_reference(reference: &str) -> Result<(), CriError> {
    let bad = |why: &str| {
        Err(CriError::BadReference {
            reference: reference.to_owned(),
            why: why.to_owned(),
        })
    };
    if reference.is_empty() {
        return bad("it is empty");
    }
    if reference.len() > MAX_REFERENCE {
        return bad(&format!("it is longer than {MAX_REFERENCE} bytes"));
    }
    if let Some(c) = reference
        .chars()
        .find(|c| c.is_whitespace() || c.is_control())
    {
        return bad(&format!("it contains {c:?}"));
    }
    if reference.contains("://") {
        return bad("a reference has no scheme (drop the http:// or https://)");
    }
    if reference.starts_with(['/', ':', '@']) || reference.ends_with(['/', ':', '@']) {
        return bad("it starts or ends with a separator");
    }
    Ok(())
}

/// Pulls `reference` into [`CRI_NAMESPACE`]; answers the image's ID as containerd reports it.
pub async fn pull(socket: &Path, reference: &str) -> Result<String, CriError> {
    check_reference(reference)?;
    imp::pull(socket, reference).await
}

/// Whether `reference` is in [`CRI_NAMESPACE`].
pub async fn image_present(socket: &Path, reference: &str) -> Result<bool, CriError> {
    check_reference(reference)?;
    imp::image_present(socket, reference).await
}

/// Every container the CRI knows, with its pod's name and namespace, sorted by pod and name
/// with the latest attempt of each container first.
pub async fn containers(socket: &Path) -> Result<Vec<PodContainer>, CriError> {
    imp::containers(socket).await
}

#[cfg(not(feature = "containerd"))]
mod imp {
    use std::path::Path;

    use super::{CriError, PodContainer};

    pub(super) async fn pull(_socket: &Path, _reference: &str) -> Result<String, CriError> {
        Err(CriError::NotBuilt)
    }

    pub(super) async fn image_present(_socket: &Path, _reference: &str) -> Result<bool, CriError> {
        Err(CriError::NotBuilt)
    }

    pub(super) async fn containers(_socket: &Path) -> Result<Vec<PodContainer>, CriError> {
        Err(CriError::NotBuilt)
    }
}

#[cfg(feature = "containerd")]
mod imp {
    use std::collections::HashMap;
    use std::future::Future;
    use std::path::Path;
    use std::time::Duration;

    use k8s_cri::v1::image_service_client::ImageServiceClient;
    use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
    use k8s_cri::v1::{
        Container, ImageSpec, ImageStatusRequest, ListContainersRequest, ListPodSandboxRequest,
        PodSandboxMetadata, PullImageRequest,
    };
    use tonic::transport::Channel;
    use tonic::{Request, Status};

    use super::{CALL_DEADLINE, CriError, PULL_DEADLINE, PodContainer};

    /// The word for a CRI container state.
    fn state_word(state: i32) -> &'static str {
        match state {
            0 => "created",
            1 => "running",
            2 => "exited",
            _ => "unknown",
        }
    }

    async fn connect(socket: &Path) -> Result<Channel, CriError> {
        containerd_client::connect(socket)
            .await
            .map_err(|e| CriError::Unavailable {
                socket: socket.to_owned(),
                detail: keelson_api::error_chain(&e),
            })
    }

    /// A request that carries its deadline to containerd.
    fn request<T>(msg: T, deadline: Duration) -> Request<T> {
        let mut req = Request::new(msg);
        req.set_timeout(deadline);
        req
    }

    fn image_spec(reference: &str) -> ImageSpec {
        ImageSpec {
            image: reference.to_owned(),
            ..Default::default()
        }
    }

    /// Runs `call` within `deadline`, mapping a failure with `failed`.
    async fn within<T>(
        what: impl Fn() -> String,
        deadline: Duration,
        call: impl Future<Output = Result<T, Status>>,
        failed: impl FnOnce(Status) -> CriError,
    ) -> Result<T, CriError> {
        match tokio::time::timeout(deadline, call).await {
            Err(_) => Err(CriError::Timeout {
                what: what(),
                after: deadline,
            }),
            Ok(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => {
                Err(CriError::Timeout {
                    what: what(),
                    after: deadline,
                })
            }
            Ok(Err(status)) => Err(failed(status)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    fn call_failed(what: String) -> impl FnOnce(Status) -> CriError {
        move |s| CriError::Call {
            what,
            code: s.code(),
            message: s.message().to_owned(),
        }
    }

    pub(super) async fn pull(socket: &Path, reference: &str) -> Result<String, CriError> {
        let mut client = ImageServiceClient::new(connect(socket).await?);
        let msg = PullImageRequest {
            image: Some(image_spec(reference)),
            ..Default::default()
        };
        let what = || format!("pulling {reference}");
        let response = within(
            what,
            PULL_DEADLINE,
            client.pull_image(request(msg, PULL_DEADLINE)),
            |s| CriError::Pull {
                reference: reference.to_owned(),
                code: s.code(),
                message: s.message().to_owned(),
            },
        )
        .await?;
        Ok(response.into_inner().image_ref)
    }

    pub(super) async fn image_present(socket: &Path, reference: &str) -> Result<bool, CriError> {
        let mut client = ImageServiceClient::new(connect(socket).await?);
        let msg = ImageStatusRequest {
            image: Some(image_spec(reference)),
            verbose: false,
        };
        let what = || format!("the status of image {reference}");
        let response = within(
            what,
            CALL_DEADLINE,
            client.image_status(request(msg, CALL_DEADLINE)),
            call_failed(what()),
        )
        .await?;
        Ok(response.into_inner().image.is_some())
    }

    pub(super) async fn containers(socket: &Path) -> Result<Vec<PodContainer>, CriError> {
        let mut client = RuntimeServiceClient::new(connect(socket).await?);
        let what = || "listing pod sandboxes".to_owned();
        let sandboxes = within(
            what,
            CALL_DEADLINE,
            client.list_pod_sandbox(request(ListPodSandboxRequest::default(), CALL_DEADLINE)),
            call_failed(what()),
        )
        .await?
        .into_inner()
        .items;
        let pods: HashMap<String, PodSandboxMetadata> = sandboxes
            .into_iter()
            .filter_map(|s| Some((s.id, s.metadata?)))
            .collect();
        let what = || "listing containers".to_owned();
        let listed = within(
            what,
            CALL_DEADLINE,
            client.list_containers(request(ListContainersRequest::default(), CALL_DEADLINE)),
            call_failed(what()),
        )
        .await?
        .into_inner()
        .containers;
        let mut out: Vec<PodContainer> = listed
            .into_iter()
            .map(|c| {
                let pod = pods.get(&c.pod_sandbox_id);
                pod_container(c, pod)
            })
            .collect();
        newest_first(&mut out);
        Ok(out)
    }

    /// Sorts by pod and container name, the latest attempt of each first (the kubelet keeps
    /// the exited container of the attempt before).
    fn newest_first(containers: &mut [PodContainer]) {
        containers.sort_by(|a, b| {
            (&a.pod_namespace, &a.pod_name, &a.name)
                .cmp(&(&b.pod_namespace, &b.pod_name, &b.name))
                .then(b.attempt.cmp(&a.attempt))
        });
    }

    /// One container with its pod's names: the sandbox's metadata, else the kubelet's labels.
    fn pod_container(c: Container, pod: Option<&PodSandboxMetadata>) -> PodContainer {
        let labels = &c.labels;
        let label = |key: &str| labels.get(key).cloned().unwrap_or_default();
        let (name, attempt) = c
            .metadata
            .map(|m| (m.name, m.attempt))
            .unwrap_or_else(|| (label("io.kubernetes.container.name"), 0));
        let restarts = c
            .annotations
            .get("io.kubernetes.container.restartCount")
            .and_then(|v| v.parse().ok())
            .unwrap_or(attempt);
        PodContainer {
            id: c.id,
            name,
            pod_name: pod.map_or_else(|| label("io.kubernetes.pod.name"), |p| p.name.clone()),
            pod_namespace: pod.map_or_else(
                || label("io.kubernetes.pod.namespace"),
                |p| p.namespace.clone(),
            ),
            state: state_word(c.state).to_owned(),
            attempt,
            restarts,
            image: c
                .image
                .map(|i| i.image)
                .filter(|i| !i.is_empty())
                .unwrap_or(c.image_ref),
        }
    }

    #[cfg(test)]
    mod tests {
        use std::collections::HashMap;

        use k8s_cri::v1::{Container, ContainerMetadata, ImageSpec, PodSandboxMetadata};

        use super::{PodContainer, newest_first, pod_container, state_word};

        #[test]
        fn states_are_words() {
            assert_eq!(
                [0, 1, 2, 3, 9].map(state_word),
                ["created", "running", "exited", "unknown", "unknown"]
            );
        }

        #[test]
        fn the_latest_attempt_comes_first() {
            let c = |pod: &str, name: &str, attempt: u32| PodContainer {
                id: format!("{pod}-{name}-{attempt}"),
                name: name.into(),
                pod_name: pod.into(),
                pod_namespace: "kube-system".into(),
                state: "running".into(),
                attempt,
                restarts: attempt,
                image: String::new(),
            };
            let mut list = vec![
                c("b", "x", 0),
                c("a", "y", 1),
                c("a", "y", 2),
                c("a", "x", 0),
            ];
            newest_first(&mut list);
            let ids: Vec<&str> = list.iter().map(|c| c.id.as_str()).collect();
            assert_eq!(ids, ["a-x-0", "a-y-2", "a-y-1", "b-x-0"]);
        }

        #[test]
        fn a_container_gets_its_pods_names_and_restart_count() {
            let labels = HashMap::from([
                ("io.kubernetes.pod.name".to_owned(), "from-label".to_owned()),
                (
                    "io.kubernetes.pod.namespace".to_owned(),
                    "ns-label".to_owned(),
                ),
            ]);
            let container = Container {
                id: "abc".into(),
                pod_sandbox_id: "pod1".into(),
                metadata: Some(ContainerMetadata {
                    name: "kube-apiserver".into(),
                    attempt: 2,
                }),
                image: Some(ImageSpec {
                    image: "registry.example/kube-apiserver:v1.34.1".into(),
                    ..Default::default()
                }),
                state: 1,
                labels,
                annotations: HashMap::from([(
                    "io.kubernetes.container.restartCount".to_owned(),
                    "3".to_owned(),
                )]),
                ..Default::default()
            };
            let pod = PodSandboxMetadata {
                name: "kube-apiserver-node1".into(),
                namespace: "kube-system".into(),
                ..Default::default()
            };
            let with_pod = pod_container(container.clone(), Some(&pod));
            assert_eq!(with_pod.name, "kube-apiserver");
            assert_eq!(with_pod.pod_name, "kube-apiserver-node1");
            assert_eq!(with_pod.pod_namespace, "kube-system");
            assert_eq!(with_pod.state, "running");
            assert_eq!((with_pod.attempt, with_pod.restarts), (2, 3));
            assert_eq!(with_pod.image, "registry.example/kube-apiserver:v1.34.1");

            let without_pod = pod_container(
                Container {
                    annotations: HashMap::new(),
                    ..container
                },
                None,
            );
            assert_eq!(without_pod.pod_name, "from-label");
            assert_eq!(without_pod.pod_namespace, "ns-label");
            assert_eq!(without_pod.restarts, 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(reference: &str, expected_why: Option<&str>) {
        let got = check_reference(reference).err().map(|e| e.to_string());
        match (got, expected_why) {
            (None, None) => {}
            (Some(msg), Some(why)) => {
                assert!(msg.contains(why), "{reference:?}: {msg}");
                assert!(msg.contains(&format!("{reference:?}")), "{msg}");
            }
            (got, want) => panic!("{reference:?}: got {got:?}, wanted {want:?}"),
        }
    }

    #[test]
    fn references_are_checked_before_containerd_is_asked() {
        check("registry.k8s.io/kube-apiserver:v1.34.1", None);
        check("10.0.2.2:5000/pause:3.10", None);
        check("pause", None);
        check(
            "registry.k8s.io/pause@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            None,
        );
        check("", Some("it is empty"));
        check("pause 3.10", Some("it contains ' '"));
        check("pause\n", Some("it contains '\\n'"));
        check("https://registry.k8s.io/pause", Some("no scheme"));
        check("pause:", Some("separator"));
        check(&"a".repeat(600), Some("longer than 512"));
    }

    #[tokio::test]
    async fn errors_name_the_socket_and_the_image() {
        let socket = Path::new("/nonexistent/containerd.sock");
        let err = pull(socket, "registry.example/pause:3.10")
            .await
            .expect_err("no containerd here");
        let msg = err.to_string();
        if cfg!(feature = "containerd") {
            assert!(msg.contains("/nonexistent/containerd.sock"), "{msg}");
            assert!(msg.contains("machinectl services"), "{msg}");
        } else {
            assert!(msg.contains("without containerd support"), "{msg}");
        }
        let refused = CriError::Pull {
            reference: "registry.example/pause:3.10".into(),
            code: tonic::Code::NotFound,
            message: "failed to resolve reference: not found".into(),
        }
        .to_string();
        assert!(refused.contains("registry.example/pause:3.10"), "{refused}");
        assert!(refused.contains("failed to resolve reference"), "{refused}");
        assert!(refused.contains("(NotFound)"), "{refused}");
    }
}
