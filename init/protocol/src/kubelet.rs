//! The kubelet as PID 1 runs it and machined drives it.
//!
//! PID 1 registers the kubelet on every configured node and never starts it by itself.
//! machined renders its configuration (kubeadm's phases, `keelson-kube`), makes sure its
//! binary is in place and verified and the control-plane images are pulled, writes the
//! kubelet's flags into [`ARGS_FILE`] and then asks PID 1 to start the service. The file
//! is read at every start, so a restart runs the kubelet with the flags last written.

/// The service's name.
pub const SERVICE: &str = "kubelet";

/// The kubelet's flags, one per line, read by PID 1 at every start of the kubelet. On
/// EPHEMERAL with the kubelet's state.
pub const ARGS_FILE: &str = "/var/lib/keelson/kubelet.args";

/// Where a kubelet fetched for the cluster's Kubernetes version is kept (on EPHEMERAL),
/// made executable only once its sha256 matched the config's pin.
pub const FETCHED_BINARY: &str = "/var/lib/keelson/bin/kubelet";

/// Where an image that bakes a kubelet in (`cargo xtask image --kubernetes DIR`) has it.
pub const IMAGE_BINARY: &str = "/usr/bin/kubelet";

/// Where such an image keeps the control-plane images as OCI archives, imported into
/// containerd's `k8s.io` namespace before any pull.
pub const IMAGE_ARCHIVES_DIR: &str = "/usr/share/keelson/images";

/// The kubelet's health endpoint (its `healthzBindAddress` and `healthzPort`), its
/// readiness.
pub const HEALTHZ: (std::net::Ipv4Addr, u16) = (std::net::Ipv4Addr::LOCALHOST, 10248);
