//! Atomic file writes: a power cut or a crash leaves the old file or the new one, never a
//! torn one. The one helper lives in the node protocol crate
//! ([`keelson_node_protocol::state`]), which STATE's writers on the node use too; this
//! module names it for the host's files (client configs, generated configs, cluster
//! records).

pub use keelson_node_protocol::state::{
    PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, WriteError, create_private_dir, write_atomic as write,
};
