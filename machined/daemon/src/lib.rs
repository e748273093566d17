//! `machined`, the node's API daemon: PID 1 supervises it, and it serves the node API
//! (gRPC over mutual TLS 1.3, see `keelson-api`) on port 50000. The operator's CLI is
//! `machinectl` (`keelson-machinectl`); what both sides share is in `keelson-api`.
//!
//! | module | what it is |
//! |---|---|
//! | [`server`] | modes, listener, authorization, handlers, apply-config |
//! | [`backend`] | what machined asks of PID 1, over init's control socket |
//! | [`console`] | the few lines also printed on the node's console (maintenance mode's certificate fingerprint) |
//! | [`node`] | node facts from `/proc`, `/sys`, `/dev/kmsg` |
//! | [`etcd`] | a control plane's etcd member: certificates, bootstrap, joins as a learner, the `etcd` operations, leaving at reset |
//! | [`containerd`] | containers, images and image import through containerd's API |
//! | [`kubernetes`] | the Kubernetes node: kubeadm's phases from the config, the kubelet fetched, verified and started, the control-plane images pulled through the CRI |
//! | [`upgrade`] | upgrades by A/B slot: a signed bundle checked, written into the inactive slot, verified and given a boot entry on trial; rollback; the slots' status |
//! | [`timesync`] | SNTP time sync from the config's `time_servers`: steps the clock, keeps a status |

pub mod backend;
pub mod console;
pub mod containerd;
pub mod etcd;
pub mod kubernetes;
pub mod node;
pub mod server;
pub mod timesync;
pub mod upgrade;
