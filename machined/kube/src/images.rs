//! The container images a node pulls before its kubelet starts, as kubeadm's
//! `config images list` gives them for the config's `kubernetes_version`, from the
//! configured registry ([`keelson_configs::schema::Cluster::image_repository`]).
//!
//! kubeadm lists etcd too; a Keelson control plane runs etcd itself (PID 1 supervises
//! it), so no etcd image is listed. Workers need only kube-proxy and the pod sandbox.

use keelson_configs::MachineConfig;
use keelson_configs::schema::Cluster;

/// The CoreDNS tag kubeadm deploys with a Kubernetes minor version: kubeadm's
/// `CoreDNSVersion` (cmd/kubeadm/app/constants/constants.go) of each release branch:
/// v1.11.3 on release-1.31 and release-1.32, v1.12.0 on release-1.33, v1.12.1 on
/// release-1.34.
pub fn coredns_tag(minor: u32) -> &'static str {
    match minor {
        ..=32 => "v1.11.3",
        33 => "v1.12.0",
        _ => "v1.12.1",
    }
}

/// One Kubernetes component's image (`kube-apiserver`, `kube-proxy`, ...) at the
/// config's version tag: `<repository>/<name>:v1.X.Y`.
pub fn kubernetes_component(cluster: &Cluster, name: &str) -> String {
    format!(
        "{}/{name}:{}",
        cluster.image_repository(),
        cluster.kubernetes_version.tag()
    )
}

/// The CoreDNS image, as kubeadm's `GetDNSImage` names it: `coredns/coredns` under the
/// upstream registry, plain `coredns` under any other repository (a mirror flattens it).
pub fn coredns(cluster: &Cluster) -> String {
    let repository = cluster.image_repository();
    let path = if repository == keelson_configs::schema::DEFAULT_IMAGE_REPOSITORY {
        "coredns/coredns"
    } else {
        "coredns"
    };
    format!(
        "{repository}/{path}:{}",
        coredns_tag(cluster.kubernetes_version.minor)
    )
}

/// The kube-proxy image.
pub fn kube_proxy(cluster: &Cluster) -> String {
    kubernetes_component(cluster, "kube-proxy")
}

/// A control plane's images, in kubeadm's order: kube-apiserver, kube-controller-manager,
/// kube-scheduler, kube-proxy, CoreDNS, pause.
pub fn control_plane(config: &MachineConfig) -> Vec<String> {
    let cluster = &config.cluster;
    let mut images: Vec<String> = [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kube-proxy",
    ]
    .iter()
    .map(|name| kubernetes_component(cluster, name))
    .collect();
    images.push(coredns(cluster));
    images.push(cluster.pause_image());
    images
}

/// A worker's images: kube-proxy and pause.
pub fn worker(config: &MachineConfig) -> Vec<String> {
    vec![kube_proxy(&config.cluster), config.cluster.pause_image()]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::manifests::fixtures::{control_plane_config, worker_config};

    #[test]
    fn control_plane_images_per_minor_from_the_default_registry() {
        // kubeadm's `config images list` (without etcd) for each supported minor.
        let cases = [
            (31, "v1.11.3", "3.10"),
            (32, "v1.11.3", "3.10"),
            (33, "v1.12.0", "3.10"),
            (34, "v1.12.1", "3.10.1"),
        ];
        for (minor, coredns, pause) in cases {
            let mut config = control_plane_config();
            config.cluster.kubernetes_version.minor = minor;
            config.cluster.kubernetes_version.patch = 2;
            let r = "registry.k8s.io";
            let expected = vec![
                format!("{r}/kube-apiserver:v1.{minor}.2"),
                format!("{r}/kube-controller-manager:v1.{minor}.2"),
                format!("{r}/kube-scheduler:v1.{minor}.2"),
                format!("{r}/kube-proxy:v1.{minor}.2"),
                format!("{r}/coredns/coredns:{coredns}"),
                format!("{r}/pause:{pause}"),
            ];
            assert_eq!(control_plane(&config), expected, "1.{minor}");
        }
    }

    #[test]
    fn a_mirror_names_every_image() {
        let mut config = worker_config();
        config.cluster.image_repository = Some("10.5.0.1:5000/k8s".into());
        assert_eq!(
            worker(&config),
            vec![
                "10.5.0.1:5000/k8s/kube-proxy:v1.31.0".to_string(),
                "10.5.0.1:5000/k8s/pause:3.10".to_string(),
            ]
        );
        let mut cp = control_plane_config();
        cp.cluster.image_repository = Some("mirror.internal/k8s".into());
        assert!(
            control_plane(&cp)
                .iter()
                .all(|i| i.starts_with("mirror.internal/k8s/"))
        );
        // kubeadm's GetDNSImage: a custom repository holds CoreDNS flat.
        assert_eq!(coredns(&cp.cluster), "mirror.internal/k8s/coredns:v1.12.1");
        cp.cluster.image_repository = None;
        assert_eq!(
            coredns(&cp.cluster),
            "registry.k8s.io/coredns/coredns:v1.12.1"
        );
    }
}
