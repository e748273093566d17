//! Where a service is and how its process ended, as the supervisor tracks them and the
//! control socket reports them: the node protocol's types
//! ([`keelson_node_protocol::control`]), so that what PID 1 keeps and what machined reads
//! are one definition.

pub use keelson_node_protocol::control::{
    ExitInfo, ServiceState as State, ServiceStatus, signal_name,
};
