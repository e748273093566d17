//! Shared set-up of the node API tests (the daemon's, and machinectl's, which include this
//! file): a generated cluster (configs, CA, client certificates for every role), the real
//! machined server on 127.0.0.1 with a random port and a temporary STATE, and a recording
//! backend in place of PID 1's control socket.

// Test helpers panic on purpose when a fixture is broken.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use keelson_api::client::Connector;
use keelson_api::clientconfig::{ClientConfig, Context};
use keelson_configs::generate::{GenerateOptions, generate};
use keelson_configs::pki::{self, CertAndKey, Role};
use keelson_configs::secrets::ClusterSecrets;
use keelson_machined::backend::{RecordingBackend, ServiceView};
use keelson_machined::etcd::EtcdPaths;
use keelson_machined::node::NodePaths;
use keelson_machined::server::{self, Options};

/// A generated cluster.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub ca: CertAndKey,
    pub controlplane: String,
}

impl Cluster {
    pub fn new() -> Cluster {
        let secrets = ClusterSecrets::generate().unwrap();
        let generated = generate(
            &GenerateOptions {
                cluster_name: "demo".into(),
                endpoint: "https://10.5.0.2:6443".into(),
                ..GenerateOptions::default()
            },
            &secrets,
        )
        .unwrap();
        Cluster {
            dir: tempfile::tempdir().unwrap(),
            ca: secrets.node_api_ca.clone(),
            controlplane: generated.control_plane.text,
        }
    }

    /// The control-plane config with `extra` TOML lines appended to `[machine]`'s
    /// sysctls table (e.g. `"vm.swappiness" = "10"`).
    pub fn with_sysctl(&self, key: &str, value: &str) -> String {
        let mut config: toml::Table = toml::from_str(&self.controlplane).unwrap();
        let machine = config.get_mut("machine").unwrap().as_table_mut().unwrap();
        let sysctls = machine
            .entry("sysctls")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .unwrap();
        sysctls.insert(key.into(), toml::Value::String(value.into()));
        toml::to_string(&config).unwrap()
    }

    /// The control-plane config with one key of `[machine]` changed.
    pub fn with_machine(&self, key: &str, value: toml::Value) -> String {
        let mut config: toml::Table = toml::from_str(&self.controlplane).unwrap();
        let machine = config.get_mut("machine").unwrap().as_table_mut().unwrap();
        machine.insert(key.into(), value);
        toml::to_string(&config).unwrap()
    }

    /// A client certificate for `role`, signed by the cluster's node API CA.
    pub fn client(&self, role: Role) -> CertAndKey {
        pki::issue_api_client(&self.ca, &format!("{role}-user"), role).unwrap()
    }

    /// A context for `address` with this certificate.
    pub fn context(&self, address: SocketAddr, cert: &CertAndKey) -> Context {
        Context {
            endpoints: vec![address.to_string()],
            nodes: Vec::new(),
            ca: self.ca.cert.clone(),
            cert: cert.cert.clone(),
            key: cert.key.clone(),
        }
    }

    /// A connector with a role's certificate.
    pub fn connector(&self, address: SocketAddr, role: Role) -> Connector {
        Connector::for_context(role.name(), &self.context(address, &self.client(role))).unwrap()
    }

    /// Writes a machinectl client config with one context per role (current: `role`).
    pub fn client_config(&self, address: SocketAddr, role: Role) -> PathBuf {
        let mut config = ClientConfig::default();
        for r in Role::ALL {
            config
                .contexts
                .insert(r.name().into(), self.context(address, &self.client(r)));
        }
        config.context = Some(role.name().into());
        let path = self
            .dir
            .path()
            .join(format!("machinectl-{}.toml", role.name()));
        config.save(&path).unwrap();
        path
    }
}

/// A running machined.
pub struct Node {
    pub address: SocketAddr,
    pub backend: Arc<RecordingBackend>,
    pub state: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

pub fn services() -> Vec<ServiceView> {
    ["containerd", "kubelet", "machined"]
        .into_iter()
        .enumerate()
        .map(|(i, name)| ServiceView {
            name: name.into(),
            state: if name == "kubelet" {
                "backoff"
            } else {
                "ready"
            }
            .into(),
            ready: name != "kubelet",
            pid: if name == "kubelet" { 0 } else { 100 + i as u32 },
            restarts: if name == "kubelet" { 2 } else { 0 },
            since_seconds: 0,
            message: if name == "kubelet" {
                "last exit: status 1".into()
            } else {
                String::new()
            },
        })
        .collect()
}

pub fn backend() -> Arc<RecordingBackend> {
    Arc::new(RecordingBackend::new(
        services(),
        vec![
            (
                "containerd".into(),
                (1..=5).map(|i| format!("containerd line {i}")).collect(),
            ),
            ("init".into(), vec!["[init] stage 2".into()]),
        ],
    ))
}

impl Node {
    /// Starts machined with STATE holding `config` (None: maintenance mode).
    pub fn start(config: Option<&str>) -> Node {
        let state = tempfile::tempdir().unwrap();
        if let Some(config) = config {
            std::fs::write(state.path().join("config.toml"), config).unwrap();
        }
        Node::start_in(state, backend())
    }

    /// Starts machined over an existing STATE directory. Its time sync and etcd controller
    /// do not run: they would reach the config's servers, which are not on this host.
    pub fn start_in(state: tempfile::TempDir, backend: Arc<RecordingBackend>) -> Node {
        Node::start_reading(state, backend, "/".into())
    }

    /// As [`Node::start_in`], with `read` serving `read_root` as the node's `/`.
    pub fn start_reading(
        state: tempfile::TempDir,
        backend: Arc<RecordingBackend>,
        read_root: PathBuf,
    ) -> Node {
        let os_release = state.path().join("os-release");
        std::fs::write(&os_release, "NAME=\"Keelson\"\nVERSION_ID=0.1.0\n").unwrap();
        let options = Options {
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: state.path().to_path_buf(),
            read_root,
            spool_dir: state.path().join("spool"),
            mode: keelson_configs::Mode::Metal,
            paths: NodePaths {
                os_release,
                containerd_socket: state.path().join("containerd.sock"),
                ..NodePaths::default()
            },
            etcd_paths: EtcdPaths {
                data_dir: state.path().join("etcd"),
                env_file: state.path().join("etcd.env"),
                pki_dir: state.path().join("pki"),
            },
            kube_paths: keelson_machined::kubernetes::KubePaths {
                root: state.path().join("root"),
                containerd_socket: state.path().join("containerd.sock"),
            },
            drive_cluster: false,
            clock: Arc::new(NoClock),
        };
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let b: Arc<dyn keelson_machined::backend::NodeBackend> = backend.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let bound = server::bind(options).await.map_err(|e| e.to_string())?;
                addr_tx.send(bound.local_addr().unwrap()).unwrap();
                bound
                    .serve(b, async move {
                        let _ = stop_rx.await;
                    })
                    .await
                    .map_err(|e| keelson_api::error_chain(&e))
            })
        });
        let address = addr_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("machined bound its port");
        Node {
            address,
            backend,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.state.path().join("config.toml")
    }

    pub fn state_config(&self) -> Option<String> {
        std::fs::read_to_string(self.config_path()).ok()
    }

    /// Stops the server and returns its STATE and backend (to start it again).
    pub fn stop(mut self) -> (tempfile::TempDir, Arc<RecordingBackend>) {
        self.shutdown();
        let state = std::mem::replace(&mut self.state, tempfile::tempdir().unwrap());
        (state, self.backend.clone())
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let result = t.join().expect("server thread");
            assert!(result.is_ok(), "machined ended with {result:?}");
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn assert_ok(out: &Output) {
    assert_eq!(out.status.code(), Some(0), "{}", text(out));
}

pub fn assert_fails(out: &Output, wants: &[&str]) {
    assert_eq!(out.status.code(), Some(1), "{}", text(out));
    let all = text(out);
    for want in wants {
        assert!(all.contains(want), "want {want:?} in {all}");
    }
}

/// A tokio runtime for async client calls in tests.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// An admin certificate signed by the cluster's CA, but expired (valid 2020-2021).
pub fn expired_admin(cluster: &Cluster) -> CertAndKey {
    let ca_key = rcgen::KeyPair::from_pem(&cluster.ca.key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&cluster.ca.cert, ca_key).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "keelson:admin");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "expired-admin");
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    CertAndKey {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// A small deterministic PRNG (xorshift64*) for fuzz loops with a fixed seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A clock nothing steps (the tests' machined never syncs time).
#[derive(Debug)]
pub struct NoClock;

impl keelson_machined::timesync::Clock for NoClock {
    fn step(
        &self,
        _offset: keelson_machined::timesync::Offset,
    ) -> Result<(), keelson_machined::timesync::TimeError> {
        Ok(())
    }
}
