//! The node protocol: what PID 1 (`keelson-init`) and the node API daemon
//! (`keelson-machined`) say to each other, and what they keep in STATE. Both sides use
//! this crate and nothing else for it, so the two cannot drift apart.
//!
//! | module | what it is |
//! |---|---|
//! | [`clock`] | wall-clock times as `YYYY-MM-DDTHH:MM:SSZ` (UTC), for records and what the CLI shows |
//! | [`control`] | the control socket: its path, its framing and size limits, every request with its own typed answer, and the wire types they carry (service statuses, live config parts, PID 1's figures) |
//! | [`etcd`] | how etcd is started: the file of member settings machined writes before it asks PID 1 to start etcd |
//! | [`kubelet`] | how the kubelet is started: its flags file machined writes before it asks PID 1 to start it, and where its binary is |
//! | [`reset`] | a reset that did not finish: PID 1's record in STATE, which machined's `health` reports |
//! | [`state`] | the STATE layout (where the config, the staged config, the machine id and the node API certificate live) and the one atomic-write helper both sides write STATE with |
//!
//! It depends on serde alone, so PID 1's static build stays small.

pub mod clock;
pub mod control;
pub mod etcd;
pub mod kubelet;
pub mod reset;
pub mod state;
pub mod upgrade;
