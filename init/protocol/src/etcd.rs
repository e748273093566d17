//! etcd as PID 1 runs it and machined drives it.
//!
//! PID 1 registers etcd on control planes with its static flags (TLS files, listen URLs,
//! data directory, the config's extra flags) and never starts it by itself. machined
//! decides how the member starts (a new cluster at bootstrap, a learner that joins, or
//! a member with data of its own), writes that into [`ENV_FILE`] as etcd's own
//! environment variables, and then asks PID 1 to start the service. The file is read at
//! every start, so a restart after a power cut starts the member as it was.

/// The service's name.
pub const SERVICE: &str = "etcd";

/// etcd's data directory (on EPHEMERAL, where kubeadm puts it).
pub const DATA_DIR: &str = "/var/lib/etcd";

/// What machined decided about this member, read by PID 1 at every start of etcd
/// (`KEY=VALUE` lines). On EPHEMERAL beside the data, so both go together.
pub const ENV_FILE: &str = "/var/lib/keelson/etcd.env";

/// Where the etcd CA certificate and the leaves issued from it are written (kubeadm's
/// layout, in the tmpfs `/etc`: made again at every boot from the config).
pub const PKI_DIR: &str = "/etc/kubernetes/pki/etcd";

/// The client port.
pub const CLIENT_PORT: u16 = 2379;
/// The peer port.
pub const PEER_PORT: u16 = 2380;
/// The metrics and health port, on loopback and plain HTTP.
pub const METRICS_PORT: u16 = 2381;

/// The flags PID 1 gives etcd whatever the member: TLS on both sides with client
/// certificates required, TLS 1.3 at least, kubeadm's snapshot count, metrics on loopback.
/// The config's `cluster.etcd.extra_args` come after these, and win.
pub fn static_flags() -> Vec<String> {
    vec![
        format!("--data-dir={DATA_DIR}"),
        format!("--listen-client-urls=https://[::]:{CLIENT_PORT}"),
        format!("--listen-peer-urls=https://[::]:{PEER_PORT}"),
        format!("--listen-metrics-urls=http://127.0.0.1:{METRICS_PORT}"),
        format!("--cert-file={PKI_DIR}/server.crt"),
        format!("--key-file={PKI_DIR}/server.key"),
        format!("--trusted-ca-file={PKI_DIR}/ca.crt"),
        "--client-cert-auth=true".into(),
        format!("--peer-cert-file={PKI_DIR}/peer.crt"),
        format!("--peer-key-file={PKI_DIR}/peer.key"),
        format!("--peer-trusted-ca-file={PKI_DIR}/ca.crt"),
        "--peer-client-cert-auth=true".into(),
        "--tls-min-version=TLS1.3".into(),
        "--snapshot-count=10000".into(),
        "--experimental-initial-corrupt-check=true".into(),
    ]
}
