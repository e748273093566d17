//! The Kubernetes node: kubeadm's phases done from the machine config (being written).

pub mod cri;
pub mod fetch;
