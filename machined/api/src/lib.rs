//! The node API as both sides see it: the wire types and the role each method needs, TLS,
//! and the client. Used by `machined` (the daemon, `keelson-machined`), `machinectl` (the
//! CLI, `keelson-machinectl`) and local clusters (`keelson-cluster`).
//!
//! | module | what it is |
//! |---|---|
//! | [`api`] | the wire types (generated from `proto/machine.proto`) and the role each method needs |
//! | [`tls`] | TLS 1.3 configurations (rustls, ring) and reading the caller's role |
//! | [`client`] | connecting to a node and naming what went wrong |
//! | [`clientconfig`] | machinectl's client config (contexts) |
//! | [`atomic`] | atomic file writes |

pub mod api;
pub mod atomic;
pub mod client;
pub mod clientconfig;
pub mod tls;

/// An error and its sources, joined with `: ` (the chain printed once, at the top).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
