//! `machined`, the node's API daemon, and `machinectl`, the operator's CLI.
//!
//! | module | what it is |
//! |---|---|
//! | [`api`] | the wire types (generated from `proto/machine.proto`) and the role each method needs |
//! | [`tls`] | TLS 1.3 configurations (rustls, ring) and reading the caller's role |
//! | [`server`] | machined: modes, listener, authorization, handlers, apply-config |
//! | [`backend`] | what machined asks of PID 1, over init's control socket |
//! | [`node`] | node facts from `/proc`, `/sys`, `/dev/kmsg` |
//! | [`containerd`] | containers, images and image import through containerd's API |
//! | [`client`] | connecting `machinectl` to a node and naming what went wrong |
//! | [`cli`] | `machinectl`'s commands |
//! | [`clientconfig`] | the client config (contexts) |
//! | [`atomic`] | atomic file writes |

pub mod backend;
pub mod cli;
pub mod containerd;
pub mod node;
pub mod server;

pub use keelson_api::{api, atomic, client, clientconfig, error_chain, tls};
