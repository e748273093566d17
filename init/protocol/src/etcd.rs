//! etcd as PID 1 runs it and machined drives it.
//!
//! PID 1 registers etcd on control planes with its static flags (TLS files, listen URLs,
//! data directory, the config's extra flags; `init`'s `services`, on the paths and ports
//! of `keelson_configs::layout`) and never starts it by itself. machined
//! decides how the member starts (a new cluster at bootstrap, a learner that joins, or
//! a member with data of its own), writes that into [`ENV_FILE`] as etcd's own
//! environment variables, and then asks PID 1 to start the service. The file is read at
//! every start, so a restart after a power cut starts the member as it was.

/// The service's name.
pub const SERVICE: &str = "etcd";

/// What machined decided about this member, read by PID 1 at every start of etcd
/// (`KEY=VALUE` lines). On EPHEMERAL beside the data, so both go together.
pub const ENV_FILE: &str = "/var/lib/keelson/etcd.env";
