//! Where kubeadm's phases put their files, as kubeadm does (so that documentation,
//! tools and habits written for kubeadm nodes hold on Keelson).

/// kubeadm's configuration directory (on the tmpfs `/etc`: rewritten at every boot).
pub const KUBERNETES_DIR: &str = "/etc/kubernetes";
/// Certificates and keys.
pub const PKI_DIR: &str = keelson_configs::layout::KUBERNETES_PKI_DIR;
/// Static pod manifests, which the kubelet runs.
pub const MANIFESTS_DIR: &str = "/etc/kubernetes/manifests";
/// The admin kubeconfig (group `kubeadm:cluster-admins`).
pub const ADMIN_CONF: &str = "/etc/kubernetes/admin.conf";
/// The break-glass kubeconfig (group `system:masters`).
pub const SUPER_ADMIN_CONF: &str = "/etc/kubernetes/super-admin.conf";
/// The kubelet's kubeconfig (on control planes written here; on workers the kubelet
/// writes it after TLS bootstrap).
pub const KUBELET_CONF: &str = "/etc/kubernetes/kubelet.conf";
/// A worker's bootstrap kubeconfig (the bootstrap token).
pub const BOOTSTRAP_KUBELET_CONF: &str = "/etc/kubernetes/bootstrap-kubelet.conf";
/// The controller manager's kubeconfig.
pub const CONTROLLER_MANAGER_CONF: &str = "/etc/kubernetes/controller-manager.conf";
/// The scheduler's kubeconfig.
pub const SCHEDULER_CONF: &str = "/etc/kubernetes/scheduler.conf";
/// The API server's encryption-at-rest config (`--encryption-provider-config`).
pub const ENCRYPTION_CONFIG: &str = "/etc/kubernetes/pki/encryption-config.yaml";
/// The kubelet's state directory (on EPHEMERAL).
pub const KUBELET_DIR: &str = "/var/lib/kubelet";
/// The KubeletConfiguration.
pub const KUBELET_CONFIG: &str = "/var/lib/kubelet/config.yaml";
/// The kubelet's own certificates (rotated by the kubelet).
pub const KUBELET_PKI_DIR: &str = "/var/lib/kubelet/pki";
/// The bootstrap manifests a bootstrapped control plane rendered, kept for inspection.
pub const ADDONS_DIR: &str = "/etc/kubernetes/addons";
/// FlexVolume drivers (the kubelet's `volumePluginDir`, the controller manager's
/// `--flex-volume-plugin-dir`): on EPHEMERAL, because the upstream default under `/usr`
/// is on the read-only root (kubeadm's advice for nodes whose `/usr` is read-only).
pub const VOLUME_PLUGIN_DIR: &str = "/var/lib/kubelet/volumeplugins";
