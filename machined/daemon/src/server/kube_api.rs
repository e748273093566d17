//! The node API's Kubernetes methods: `kubeconfig` and `image pull`, each a thin
//! translation between the wire types and [`keelson_kube::kubeconfig`] /
//! [`crate::kubernetes::cri`].
//!
//! `kubeconfig` mints a new admin certificate from the Kubernetes CA each time it is
//! called (kubeadm's `admin.conf`), so only a control plane answers it: a worker's config
//! holds the CA's certificate but never its key. `image pull` checks the reference's syntax
//! before containerd is asked, and refuses a bad one whole, saying which part is wrong;
//! nothing is trimmed or guessed.

use std::net::Ipv6Addr;
use std::path::Path;

use keelson_api::api::proto;
use keelson_configs::MachineConfig;
use keelson_configs::schema::MachineType;
use keelson_kube::KubeError;
use tonic::Status;

use crate::kubernetes::cri::{self, CriError};

/// The longest image name (registry and path, without tag and digest), as the
/// distribution reference grammar bounds it.
const MAX_NAME: usize = 255;
/// The longest tag.
const MAX_TAG: usize = 128;

/// `machinectl kubeconfig`: a kubeconfig with a fresh admin certificate, on a control
/// plane, for the caller `user` (logged). `config` is the running config (`None` only before a config is installed, which
/// the access table already refuses).
pub async fn kubeconfig(
    config: Option<MachineConfig>,
    user: &str,
) -> Result<proto::KubeconfigResponse, Status> {
    let Some(config) = config else {
        return Err(Status::failed_precondition(
            "the node has no config yet: apply one first (`machinectl apply-config`)",
        ));
    };
    if config.machine.kind == MachineType::Worker {
        return Err(Status::failed_precondition(
            "this node is a worker: a worker holds no Kubernetes CA key, so it cannot mint an admin certificate; ask a control plane (--nodes CP)",
        ));
    }
    let text = tokio::task::spawn_blocking(move || keelson_kube::kubeconfig::admin(&config))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(kube_status)?;
    let context = current_context(&text).ok_or_else(|| {
        Status::internal("the admin kubeconfig names no current-context; this is a bug in machined")
    })?;
    tracing::info!(user = ?user, context = %context, "kubeconfig: an admin certificate was issued");
    Ok(proto::KubeconfigResponse {
        kubeconfig: text.into_bytes(),
        context,
    })
}

/// The status a kubeconfig error maps to: a secret missing from the config is the
/// operator's to fix; anything else is the node's.
fn kube_status(e: KubeError) -> Status {
    let message = keelson_api::error_chain(&e);
    match e {
        KubeError::MissingSecret { .. } => Status::failed_precondition(message),
        _ => Status::internal(message),
    }
}

/// The `current-context` of a kubeconfig as the renderer writes it (a top-level key, its
/// value plain or quoted on the same line).
fn current_context(kubeconfig: &str) -> Option<String> {
    let value = kubeconfig
        .lines()
        .find_map(|line| line.strip_prefix("current-context:"))?
        .trim();
    let value = [('"', '"'), ('\'', '\'')]
        .iter()
        .find_map(|(open, close)| value.strip_prefix(*open)?.strip_suffix(*close))
        .unwrap_or(value);
    (!value.is_empty()).then(|| value.to_owned())
}

/// `machinectl image pull REF`: the reference is checked, then pulled by containerd
/// through the CRI (into the `k8s.io` namespace, where the kubelet looks).
pub async fn image_pull(
    socket: &Path,
    reference: &str,
) -> Result<proto::ImagePullResponse, Status> {
    check_reference(reference).map_err(|why| {
        cri_status(CriError::BadReference {
            reference: reference.to_owned(),
            why,
        })
    })?;
    let image = cri::pull(socket, reference).await.map_err(cri_status)?;
    Ok(proto::ImagePullResponse { image })
}

/// The status a CRI error maps to: containerd's own code for a failed pull (NOT_FOUND for
/// an image the registry does not have, ...).
fn cri_status(e: CriError) -> Status {
    let message = keelson_api::error_chain(&e);
    match e {
        CriError::BadReference { .. } => Status::invalid_argument(message),
        CriError::NotBuilt => Status::unimplemented(message),
        CriError::Unavailable { .. } | CriError::Call { .. } => Status::unavailable(message),
        CriError::Pull { code, .. } => Status::new(code, message),
        CriError::Timeout { .. } => Status::deadline_exceeded(message),
    }
}

/// Checks an image reference against the distribution reference grammar
/// (`[domain[:port]/]path[:tag][@digest]`), whole: the error says which part is wrong.
pub fn check_reference(reference: &str) -> Result<(), String> {
    if reference.is_empty() {
        return Err("it is empty".into());
    }
    if let Some(c) = reference
        .chars()
        .find(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!("it contains {c:?}"));
    }
    let (rest, digest) = match reference.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (reference, None),
    };
    if let Some(digest) = digest {
        check_digest(digest)?;
    }
    // A tag follows the last ':' after the last '/' (an earlier ':' is the registry's port).
    let last = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest.get(last..).and_then(|t| t.rfind(':')) {
        Some(i) => (
            rest.get(..last + i).unwrap_or_default(),
            rest.get(last + i + 1..),
        ),
        None => (rest, None),
    };
    if let Some(tag) = tag {
        check_tag(tag)?;
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "its name is {} characters long, over the {MAX_NAME} allowed",
            name.len()
        ));
    }
    // The first component is a registry when it looks like a host (as docker decides).
    let (domain, path) = match name.split_once('/') {
        Some((first, path))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (Some(first), path)
        }
        _ => (None, name),
    };
    if let Some(domain) = domain {
        check_domain(domain)?;
    }
    path.split('/').try_for_each(check_path_component)
}

/// A path component: lowercase letters and digits, separated by `.`, `_`, `__` or dashes.
fn check_path_component(component: &str) -> Result<(), String> {
    if component.is_empty() {
        return Err("its path has an empty component (`//`, or a leading or trailing `/`)".into());
    }
    if let Some(c) = component
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '-'))
    {
        return Err(format!(
            "the path component {component:?} contains {c:?} (only a-z, 0-9 and the separators . _ __ - are allowed{})",
            if c.is_ascii_uppercase() {
                "; repository names are lowercase"
            } else {
                ""
            }
        ));
    }
    let alnum = |c: char| c.is_ascii_alphanumeric();
    let separators_ok = component
        .split(alnum)
        .filter(|s| !s.is_empty())
        .all(|s| matches!(s, "." | "_" | "__") || s.chars().all(|c| c == '-'));
    let ends_ok = component.starts_with(alnum) && component.ends_with(alnum);
    if !separators_ok || !ends_ok {
        return Err(format!(
            "the path component {component:?} must start and end with a letter or digit, with one `.`, `_`, `__` or dashes between them"
        ));
    }
    Ok(())
}

/// A registry: a host name, an IPv4 address or a bracketed IPv6 address, with an optional
/// port.
fn check_domain(domain: &str) -> Result<(), String> {
    let (host, port) = if let Some(inner) = domain.strip_prefix('[') {
        let Some((address, after)) = inner.split_once(']') else {
            return Err(format!("the registry {domain:?} opens `[` without `]`"));
        };
        if address.parse::<Ipv6Addr>().is_err() {
            return Err(format!(
                "the registry {domain:?} has {address:?} in brackets, which is not an IPv6 address"
            ));
        }
        match after {
            "" => (None, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return Err(format!("the registry {domain:?} has {after:?} after `]`")),
            },
        }
    } else {
        match domain.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(domain), None),
        }
    };
    if let Some(host) = host {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !host.split('.').all(label_ok) {
            return Err(format!(
                "the registry {domain:?} is not a host name (letters, digits and inner dashes, between dots)"
            ));
        }
    }
    if let Some(port) = port
        && !port.parse::<u16>().is_ok_and(|p| p > 0)
    {
        return Err(format!(
            "the registry {domain:?} has the port {port:?}, which is not a number from 1 to 65535"
        ));
    }
    Ok(())
}

/// A tag: a letter, digit or `_`, then up to 127 of those, `.` or `-`.
fn check_tag(tag: &str) -> Result<(), String> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    if tag.is_empty() {
        return Err("its tag is empty (nothing after `:`)".into());
    }
    if tag.len() > MAX_TAG {
        return Err(format!(
            "its tag is {} characters long, over the {MAX_TAG} allowed",
            tag.len()
        ));
    }
    if !tag.starts_with(word) || !tag.chars().all(|c| word(c) || c == '.' || c == '-') {
        return Err(format!(
            "its tag {tag:?} must be letters, digits, `_`, `.` and `-`, not starting with `.` or `-`"
        ));
    }
    Ok(())
}

/// A digest: `ALGORITHM:HEX`, and for sha256 exactly 64 lowercase hex digits.
fn check_digest(digest: &str) -> Result<(), String> {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Err(format!(
            "its digest {digest:?} has no algorithm (write @sha256:<64 hex digits>)"
        ));
    };
    let algorithm_ok = algorithm.split(['+', '.', '_', '-']).all(|c| {
        c.starts_with(|c: char| c.is_ascii_alphabetic())
            && c.chars().all(|c| c.is_ascii_alphanumeric())
    });
    if !algorithm_ok {
        return Err(format!("its digest's algorithm {algorithm:?} is not valid"));
    }
    let hex_ok = if algorithm == "sha256" {
        hex.len() == 64 && hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f'))
    } else {
        hex.len() >= 32 && hex.chars().all(|c| c.is_ascii_hexdigit())
    };
    if !hex_ok {
        return Err(format!(
            "its digest {digest:?} is not {algorithm}:<hex> (sha256 takes 64 lowercase hex digits)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(reference: &str, want: Result<(), &str>) {
        match (check_reference(reference), want) {
            (Ok(()), Ok(())) => {}
            (Err(got), Err(want)) => {
                assert!(got.contains(want), "{reference:?}: {got:?} lacks {want:?}")
            }
            (got, want) => panic!("{reference:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn references_that_registries_accept() {
        let digest = format!("sha256:{}", "a".repeat(64));
        for good in [
            "pause",
            "pause:3.10",
            "library/busybox:latest",
            "registry.k8s.io/kube-apiserver:v1.34.1",
            "registry.k8s.io/coredns/coredns:v1.12.1",
            "localhost/app",
            "localhost:5000/team/app:1.0",
            "10.0.2.2:5000/kube-proxy:v1.34.1",
            "[fd00::1]:5000/etcd:3.6.5-0",
            "[::1]/etcd",
            "Registry.Example/app",
            "a.b/x__y/z.w/p-q--r:T_a.g-1",
            &format!("registry.k8s.io/pause@{digest}"),
            &format!("registry.k8s.io/pause:3.10@{digest}"),
        ] {
            check(good, Ok(()));
        }
    }

    #[test]
    fn bad_references_say_which_part_is_wrong() {
        for (bad, why) in [
            ("", "it is empty"),
            (" pause", "contains ' '"),
            ("pause\n", "contains '\\n'"),
            ("Pause", "repository names are lowercase"),
            ("registry.k8s.io/Pause:1", "\"Pause\" contains 'P'"),
            ("registry.k8s.io//pause", "empty component"),
            ("registry.k8s.io/pause/", "empty component"),
            ("registry.k8s.io/-pause", "must start and end"),
            ("registry.k8s.io/pa...use", "must start and end"),
            ("pause:", "its tag is empty"),
            ("pause:.1", "its tag \".1\""),
            ("pause:a/b", "the port \"a\""),
            (
                &format!("pause:{}", "1".repeat(129)),
                "over the 128 allowed",
            ),
            ("reg_istry.io/pause", "is not a host name"),
            ("-registry.io/pause", "is not a host name"),
            ("registry.io:0/pause", "not a number from 1 to 65535"),
            ("registry.io:http/pause", "\"http\""),
            ("[fd00::1/pause", "without `]`"),
            ("[10.0.0.1]:5000/pause", "not an IPv6 address"),
            ("[::1]x/pause", "after `]`"),
            ("pause@sha256:abc", "64 lowercase hex"),
            (
                &format!("pause@sha256:{}", "A".repeat(64)),
                "64 lowercase hex",
            ),
            ("pause@abc", "no algorithm"),
            (
                &format!("pause@9sha:{}", "a".repeat(64)),
                "algorithm \"9sha\"",
            ),
            (&format!("r.io/{}", "a".repeat(300)), "over the 255 allowed"),
        ] {
            check(bad, Err(why));
        }
    }

    fn generated() -> keelson_configs::generate::Generated {
        let secrets = keelson_configs::secrets::ClusterSecrets::generate().unwrap();
        let options = keelson_configs::generate::GenerateOptions {
            cluster_name: "demo".into(),
            endpoint: "https://10.5.0.2:6443".into(),
            ..Default::default()
        };
        keelson_configs::generate::generate(&options, &secrets).unwrap()
    }

    #[tokio::test]
    async fn a_control_plane_mints_a_kubeconfig_and_a_worker_refuses() {
        let configs = generated();
        let r = kubeconfig(Some(configs.control_plane.config), "admin-user")
            .await
            .unwrap();
        let text = String::from_utf8(r.kubeconfig).unwrap();
        assert!(!r.context.is_empty());
        assert!(text.contains(&r.context), "{text}");

        let refused = kubeconfig(Some(configs.worker.config), "admin-user")
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        for want in [
            "worker holds no Kubernetes CA key",
            "ask a control plane (--nodes CP)",
        ] {
            assert!(refused.message().contains(want), "{refused:?}");
        }
        let none = kubeconfig(None, "").await.unwrap_err();
        assert_eq!(none.code(), tonic::Code::FailedPrecondition);
    }

    #[tokio::test]
    async fn a_bad_reference_is_refused_before_containerd_is_asked() {
        let nowhere = Path::new("/nonexistent/containerd.sock");
        let refused = image_pull(nowhere, "registry.k8s.io/Pause")
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().starts_with(
                "\"registry.k8s.io/Pause\" is not an image reference: the path component \"Pause\""
            ),
            "{refused:?}"
        );
    }

    #[test]
    fn the_context_is_read_from_the_kubeconfig() {
        let config = |line: &str| format!("apiVersion: v1\nkind: Config\n{line}\nusers: []\n");
        for (line, want) in [
            ("current-context: admin@demo", Some("admin@demo")),
            ("current-context: 'admin@demo'", Some("admin@demo")),
            (
                "current-context: \"kubernetes-admin@kubernetes\"",
                Some("kubernetes-admin@kubernetes"),
            ),
            ("current-context: \"\"", None),
            ("  current-context: nested", None),
        ] {
            assert_eq!(current_context(&config(line)).as_deref(), want, "{line}");
        }
    }
}
