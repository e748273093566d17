//! Where a service is and how its process ended, as the supervisor tracks them and the
//! control socket reports them: the node protocol's types
//! ([`keelson_node_protocol::control`]), so that what PID 1 keeps and what machined reads
//! are one definition.

use rustix::process::WaitStatus;

pub use keelson_node_protocol::control::{
    ExitInfo, ServiceState as State, ServiceStatus, signal_name,
};

/// How a process ended, from `waitpid`'s status.
pub fn exit_info(status: WaitStatus) -> ExitInfo {
    ExitInfo {
        code: status.exit_status(),
        signal: status.terminating_signal(),
    }
}
