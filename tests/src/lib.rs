//! End-to-end test support: one guest builder that boots built images under QEMU
//! (`Guest::new(Arch::Amd64).boot()`), and waits on the serial console, reporting what
//! it waited for and the console's tail when it times out. A guest that shows no stage-1
//! line within a deadline of its power-on is hung and power-cycled, at most twice, as
//! `machinectl cluster create` does (`keelson_cluster::stage1_watch`).
//!
//! The images come from `cargo xtask image` (or `cargo xtask test`, which builds them
//! once for the whole suite) under `target/images/<arch>/`; tests never build their own.

pub mod cluster_env;
pub mod http_server;
pub mod kubelet_standin;
pub mod ntp;
pub mod registry;
pub mod upgrade;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use keelson_cluster::cold_boot::{self, ColdBoots};
use keelson_cluster::qemu::{self, Accel, Machine};
use keelson_cluster::stage1_watch::{self, MAX_POWER_CYCLES, Step, Watch};
use keelson_configs::generate::{GenerateOptions, generate};
pub use keelson_configs::layout::Arch;
use keelson_configs::pki::{self, CertAndKey, Role};
use keelson_configs::secrets::ClusterSecrets;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Where `cargo xtask image` puts an architecture's artefacts.
pub fn image_dir(arch: Arch) -> PathBuf {
    workspace_root().join("target/images").join(arch.debian())
}

/// The built raw disk image for an architecture, or an error saying how to build it.
pub fn built_image(arch: Arch) -> Result<PathBuf> {
    let path = image_dir(arch).join("keelson.raw");
    if !path.is_file() {
        bail!(
            "no built image at {}: run `cargo xtask image --arch {arch}` first \
             (`cargo xtask test` builds both architectures before the tests)",
            path.display()
        );
    }
    Ok(path)
}

/// What init prints once the power button is watched (`power button <device>: a press
/// powers off`): a press before it is lost, so tests wait for it before pressing.
pub const POWER_BUTTON_WATCHED: &str = ": a press powers off";

/// The image an end-to-end test boots: `KEELSON_TEST_IMAGE_AMD64` or
/// `KEELSON_TEST_IMAGE_ARM64` when set (an image built elsewhere), else the suite's
/// built image.
pub fn test_image(arch: Arch) -> Result<PathBuf> {
    let var = match arch {
        Arch::Amd64 => "KEELSON_TEST_IMAGE_AMD64",
        Arch::Arm64 => "KEELSON_TEST_IMAGE_ARM64",
    };
    match std::env::var_os(var) {
        Some(path) => Ok(PathBuf::from(path)),
        None => built_image(arch),
    }
}

/// The workspace's `machinectl` next to the running test binary
/// (`target/<profile>/machinectl`), built first if the workspace build has not made it.
pub fn machinectl_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the test binary")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .with_context(|| format!("{} has no target/<profile> directory", exe.display()))?;
    let bin = profile_dir.join("machinectl");
    if !bin.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "keelson-machinectl", "--bin", "machinectl"])
            .status()
            .context("starting cargo to build machinectl")?;
        if !status.success() {
            bail!("building machinectl failed ({status})");
        }
    }
    if !bin.is_file() {
        bail!("no machinectl at {} after building it", bin.display());
    }
    Ok(bin)
}

/// Run `machinectl --machineconfig CONFIG ARGS` under `timeout` (ignoring the caller's
/// `MACHINECONFIG`, with no stdin), and return what it did.
pub fn machinectl(bin: &Path, config: &Path, timeout: Duration, args: &[&str]) -> Result<Output> {
    Command::new("timeout")
        .arg(timeout.as_secs().to_string())
        .arg(bin)
        .arg("--machineconfig")
        .arg(config)
        .args(args)
        .env_remove("MACHINECONFIG")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} {}", bin.display(), args.join(" ")))
}

/// A free TCP port on 127.0.0.1 (bound, read, released), for a QEMU port forward.
pub fn free_loopback_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("binding a port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// The control-plane config `machinectl gen config` makes for `cluster_name` (endpoint
/// 10.0.2.15, QEMU's user network) with fresh secrets, as a table, and those secrets.
fn generated_control_plane(cluster_name: &str) -> Result<(toml::Table, ClusterSecrets)> {
    let secrets = ClusterSecrets::generate().context("generating cluster secrets")?;
    let generated = generate(
        &GenerateOptions {
            cluster_name: cluster_name.into(),
            endpoint: "https://10.0.2.15:6443".into(),
            ..GenerateOptions::default()
        },
        &secrets,
    )
    .context("generating the configs")?;
    let mut config: toml::Table = toml::from_str(&generated.control_plane.text)?;
    keep_kubernetes_local(&mut config)?;
    Ok((config, secrets))
}

/// Points the config's image repository and kubelet download at the node's own
/// loopback (port 1, closed): these tests' nodes reach no registry or release site, and
/// on QEMU's user network a name to resolve would go to the host's resolver through
/// QEMU's DNS. The node's Kubernetes controller then fails at once, on the node, and
/// says so in `health` (the Kubernetes test serves both for real).
fn keep_kubernetes_local(config: &mut toml::Table) -> Result<()> {
    let cluster = config
        .get_mut("cluster")
        .and_then(toml::Value::as_table_mut)
        .context("the config has no [cluster] table")?;
    cluster.insert("image_repository".into(), "127.0.0.1:1".into());
    let kubelet = cluster
        .entry("kubelet")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let Some(kubelet) = kubelet.as_table_mut() {
        kubelet.insert("base_url".into(), "http://127.0.0.1:1/release".into());
    }
    Ok(())
}

/// A control-plane config (as `machinectl gen config` makes it, with fresh secrets) for
/// QEMU's user network: eth0 = 10.0.2.15/24 through 10.0.2.2, nameserver 10.0.2.3.
/// `machine_extra` is TOML whose top-level keys are set in `[machine]` (a hostname,
/// services...). Returns the config as a table to edit and the node API CA it carries.
pub fn user_net_control_plane(
    cluster_name: &str,
    machine_extra: &str,
) -> Result<(toml::Table, CertAndKey)> {
    let (mut config, secrets) = generated_control_plane(cluster_name)?;
    let network: toml::Table = toml::from_str(
        r#"
nameservers = ["10.0.2.3"]
[[interfaces]]
name = "eth0"
addresses = ["10.0.2.15/24"]
[[interfaces.routes]]
to = "0.0.0.0/0"
via = "10.0.2.2"
"#,
    )?;
    let extra: toml::Table = toml::from_str(machine_extra).context("parsing machine_extra")?;
    let machine = config
        .get_mut("machine")
        .and_then(toml::Value::as_table_mut)
        .context("the generated config has no [machine] table")?;
    machine.insert("network".into(), toml::Value::Table(network));
    machine.extend(extra);
    Ok((config, secrets.node_api_ca))
}

/// `config` (a machine config's text, such as the config tests' fixture) with its
/// `[cluster.secrets]` replaced by fresh ones, as `machinectl gen config` makes them: the
/// fixture's certificates are placeholders that parse as PEM but not as X.509, and a node
/// booted with them would have machined fail on its CA and restart over and over.
pub fn with_fresh_secrets(config: &str) -> Result<String> {
    let (fresh, _) = generated_control_plane("fresh")?;
    let fresh = fresh
        .get("cluster")
        .and_then(|c| c.get("secrets"))
        .context("the generated config has no [cluster.secrets]")?
        .clone();
    let mut table: toml::Table = toml::from_str(config).context("parsing the config")?;
    let cluster = table
        .get_mut("cluster")
        .and_then(toml::Value::as_table_mut)
        .context("the config has no [cluster] table")?;
    cluster.insert("secrets".into(), fresh);
    keep_kubernetes_local(&mut table)?;
    Ok(toml::to_string(&table)?)
}

/// Whether the first occurrence of `needle` in `console` is on a complete line.
fn shows_line(console: &str, needle: &str) -> bool {
    console
        .find(needle)
        .is_some_and(|at| console[at + needle.len()..].contains('\n'))
}

/// Write a `machinectl` client config to `path` with one context per role (named for the
/// role, the first role's current), each with a client certificate issued by `ca` and the node
/// API at `endpoint`.
pub fn api_client_config(
    ca: &CertAndKey,
    endpoint: &str,
    roles: &[Role],
    path: &Path,
) -> Result<()> {
    use keelson_api::clientconfig::{ClientConfig, Context};
    let mut clients = ClientConfig::default();
    for &role in roles {
        let cert = pki::issue_api_client(ca, &format!("{role}-user"), role)
            .with_context(|| format!("issuing a {role} client certificate"))?;
        let context = Context {
            endpoints: vec![endpoint.to_string()],
            nodes: Vec::new(),
            ca: ca.cert.clone(),
            cert: cert.cert,
            key: cert.key,
        };
        clients.contexts.insert(role.name().into(), context);
    }
    clients.context = roles.first().map(|r| r.name().to_owned());
    clients
        .save(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A finished command for an assertion message: its status, stdout and stderr.
pub fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A VM to boot: architecture, disk, firmware inputs.
#[derive(Debug, Clone)]
pub struct Guest {
    arch: Arch,
    image: Option<PathBuf>,
    memory_mib: u32,
    no_reboot: bool,
    fw_cfg: Vec<(String, PathBuf)>,
    raw_disk: bool,
    disk_size: Option<u64>,
    extra: Vec<String>,
    netns: Option<String>,
}

impl Guest {
    /// A guest of this architecture booting the built image through a fresh overlay.
    pub fn new(arch: Arch) -> Guest {
        Guest {
            arch,
            image: None,
            memory_mib: 1024,
            no_reboot: true,
            fw_cfg: Vec::new(),
            raw_disk: false,
            disk_size: None,
            extra: Vec::new(),
            netns: None,
        }
    }

    /// Boot this image instead of the built one.
    pub fn image(mut self, path: impl Into<PathBuf>) -> Guest {
        self.image = Some(path.into());
        self
    }

    /// Boot the image file itself (writable, raw) rather than an overlay over it, so the
    /// test can read the disk back after the VM stops.
    pub fn raw_disk(mut self) -> Guest {
        self.raw_disk = true;
        self
    }

    /// Make the overlay disk this many bytes (the image's own size by default, where
    /// EPHEMERAL, and so `/var`, stays at its 64 MiB placeholder): the node grows
    /// EPHEMERAL into the rest at first boot.
    pub fn disk_size(mut self, bytes: u64) -> Guest {
        self.disk_size = Some(bytes);
        self
    }

    /// Let guest reboots happen, each as a cold boot: QEMU exits when the guest reboots
    /// and is started again on the same disk and firmware variables, the console appended
    /// to ([`keelson_cluster::cold_boot`]: a warm reset under software emulation sometimes
    /// costs 20-35 s more). By default QEMU exits when the guest reboots, for good.
    pub fn allow_reboot(mut self) -> Guest {
        self.no_reboot = false;
        self
    }

    /// Memory in MiB.
    pub fn memory(mut self, mib: u32) -> Guest {
        self.memory_mib = mib;
        self
    }

    /// Add a QEMU `fw_cfg` entry.
    pub fn fw_cfg(mut self, name: &str, file: impl Into<PathBuf>) -> Guest {
        self.fw_cfg.push((name.to_string(), file.into()));
        self
    }

    /// A virtio network card with this MAC on QEMU's user-mode network, restricted
    /// (`restrict=on`: the guest reaches nothing outside the VM; it sees 10.0.2.0/24).
    pub fn nic(mut self, mac: &str) -> Guest {
        self.extra.extend([
            "-netdev".to_string(),
            "user,id=net0,restrict=on".to_string(),
            "-device".to_string(),
            format!("virtio-net-pci,netdev=net0,mac={mac}"),
        ]);
        self
    }

    /// A virtio network card with this MAC on QEMU's restricted user-mode network, as
    /// [`Guest::nic`], with the node API (port 50000) forwarded from `127.0.0.1:port`.
    pub fn api_forward(mut self, port: u16, mac: &str) -> Guest {
        self.extra.extend([
            "-netdev".to_string(),
            format!("user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:50000"),
            "-device".to_string(),
            format!("virtio-net-pci,netdev=n0,mac={mac}"),
        ]);
        self
    }

    /// More QEMU arguments (a `-netdev tap,...` and its `-device`, say).
    pub fn qemu_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Guest {
        self.extra.extend(args.into_iter().map(Into::into));
        self
    }

    /// Run QEMU inside this network namespace (`ip netns exec NS qemu...`), where its tap
    /// devices live, so that guest traffic stays in the namespace.
    pub fn netns(mut self, name: &str) -> Guest {
        self.netns = Some(name.to_string());
        self
    }

    /// Start the VM.
    pub fn boot(self) -> Result<Running> {
        let image = match self.image {
            Some(p) => p,
            None => built_image(self.arch)?,
        };
        let dir = tempfile::Builder::new()
            .prefix(&format!("keelson-guest-{}-", self.arch))
            .tempdir()
            .context("creating the guest's scratch directory")?;
        let disk = if self.raw_disk {
            image
        } else {
            let overlay = dir.path().join("disk.qcow2");
            qemu::create_overlay(&image, &overlay, self.disk_size)?;
            overlay
        };
        let accel = qemu::probe_accel(self.arch, dir.path());
        let stage1_deadline =
            stage1_watch::deadline(self.arch, accel).map_err(anyhow::Error::msg)?;
        let mut machine = Machine::new(self.arch, accel, disk, dir.path().to_path_buf());
        machine.memory_mib = self.memory_mib;
        // Every reboot ends QEMU; with reboots allowed, ColdBoots starts it again.
        machine.no_reboot = true;
        machine.console_append = true;
        machine.fw_cfg = self.fw_cfg;
        machine.extra = self.extra;
        let monitor = dir.path().join("monitor.sock");
        machine.extra.extend([
            "-monitor".to_string(),
            format!("unix:{},server=on,wait=off", monitor.display()),
        ]);
        let mut cmd = machine.command()?;
        if let Some(ns) = &self.netns {
            let mut inside = Command::new("ip");
            inside.args(["netns", "exec", ns]).arg(cmd.get_program());
            inside.args(cmd.get_args());
            for (key, value) in cmd.get_envs() {
                match value {
                    Some(value) => inside.env(key, value),
                    None => inside.env_remove(key),
                };
            }
            if let Some(cwd) = cmd.get_current_dir() {
                inside.current_dir(cwd);
            }
            cmd = inside;
        }
        let recipe = Recipe {
            program: cmd.get_program().to_owned(),
            args: cmd.get_args().map(ToOwned::to_owned).collect(),
            envs: cmd
                .get_envs()
                .map(|(k, v)| (k.to_owned(), v.map(ToOwned::to_owned)))
                .collect(),
        };
        let spawn = {
            let (recipe, dir) = (recipe.clone(), dir.path().to_path_buf());
            Box::new(move || recipe.spawn(&dir)) as cold_boot::Spawn
        };
        let qemu = ColdBoots::start(spawn, &machine.console_path(), !self.no_reboot)
            .with_context(|| format!("starting {}", recipe.program.to_string_lossy()))?;
        eprintln!(
            "guest: {} ({}) booting, console at {}",
            self.arch,
            accel.name(),
            machine.console_path().display()
        );
        Ok(Running {
            qemu,
            console: machine.console_path(),
            monitor,
            dir,
            started: Instant::now(),
            accel,
            watch: Watch::new(stage1_deadline, Instant::now()),
        })
    }
}

/// How a guest's QEMU was started, to start it again.
#[derive(Debug, Clone)]
struct Recipe {
    program: std::ffi::OsString,
    args: Vec<std::ffi::OsString>,
    envs: Vec<(std::ffi::OsString, Option<std::ffi::OsString>)>,
}

impl Recipe {
    /// Starts QEMU; its standard error is appended to `qemu.stderr` across its starts.
    fn spawn(&self, dir: &Path) -> std::io::Result<Child> {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        for (key, value) in &self.envs {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        cmd.stdin(Stdio::null());
        cmd.stdout(Stdio::null());
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("qemu.stderr"))?;
        cmd.stderr(stderr);
        cmd.spawn()
    }
}

/// A running VM. Dropping it kills QEMU and removes its scratch files.
#[derive(Debug)]
pub struct Running {
    /// QEMU, started again after each guest reboot when reboots are allowed.
    qemu: ColdBoots,
    console: PathBuf,
    monitor: PathBuf,
    dir: tempfile::TempDir,
    started: Instant,
    accel: Accel,
    /// Whether stage 1 started since the last power-on, and the power cycles so far.
    watch: Watch,
}

impl Running {
    /// Run `f` every 2 s until its command succeeds (the API comes up, or back after a
    /// reboot or a change of mode); panics at `timeout` with the last output and the
    /// console's tail.
    pub fn until_ok(&self, timeout: Duration, what: &str, f: impl Fn() -> Output) -> Output {
        let deadline = Instant::now() + timeout;
        loop {
            let out = f();
            if out.status.success() {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "{what} never succeeded: {}\n--- console ---\n{}",
                show(&out),
                tail(&self.console(), 60)
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Everything the guest has printed so far.
    pub fn console(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The accelerator the VM runs with.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// Time since QEMU started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The scratch directory (console log, firmware variables, overlay).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn tail(&self) -> String {
        let stderr =
            std::fs::read_to_string(self.dir.path().join("qemu.stderr")).unwrap_or_default();
        format!(
            "--- console tail ---\n{}\n--- qemu stderr ---\n{}",
            qemu::console_tail(&self.console, 40),
            stderr.trim()
        )
    }

    /// Wait until the console shows `needle` in a complete line (its first occurrence is
    /// followed by a newline: QEMU writes the serial console as the characters arrive, and
    /// a caller that reads the line right after must not get half of it); on timeout or
    /// early exit, say what was awaited and show the console's tail.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let console = self.console();
            if shows_line(&console, needle) {
                return Ok(());
            }
            if self.watch_stage1(&console)? {
                continue;
            }
            if let Some(status) = self.qemu.exited() {
                if self.console().contains(needle) {
                    return Ok(());
                }
                bail!(
                    "QEMU exited ({status}) after {:.1}s before the console showed {needle:?}\n{}",
                    self.elapsed().as_secs_f64(),
                    self.tail()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {:.1}s waiting for the console to show {needle:?}\n{}",
                    self.elapsed().as_secs_f64(),
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Applies the stage-1 rule to the console so far: a guest without its stage-1 line
    /// within the deadline of its power-on (or whose kernel stalled before it) is
    /// power-cycled, said on stderr, at most twice; hung after that, an error. Returns
    /// whether it was power-cycled now. The test's own deadline keeps running.
    fn watch_stage1(&mut self, console: &str) -> Result<bool> {
        match self.watch.check(console, Instant::now()) {
            Step::Booted | Step::Waiting => Ok(false),
            Step::PowerCycle { cycle, hang } => {
                eprintln!(
                    "guest: the VM ({}, console {}) {}; power-cycling it ({cycle} of {MAX_POWER_CYCLES}; its console so far goes to {})",
                    self.accel.name(),
                    self.console.display(),
                    stage1_watch::describe(hang, console),
                    self.hung_log().display()
                );
                self.power_cycle_hung(cycle)?;
                Ok(true)
            }
            Step::GiveUp(hang) => bail!(
                "the guest {}, at the last of its {} power-ons ({} power cycles did not help; the earlier consoles are in {})\n{}",
                stage1_watch::describe(hang, console),
                self.watch.cycles() + 1,
                self.watch.cycles(),
                self.hung_log().display(),
                self.tail()
            ),
        }
    }

    /// Where the consoles of a hung guest's earlier power-ons are kept.
    fn hung_log(&self) -> PathBuf {
        self.dir.path().join("console.hung.log")
    }

    /// Kills a guest hung before stage 1 and starts it again with the same disk and
    /// firmware variables and an empty console (the hung one appended to
    /// `console.hung.log`, then a `===== power cycle N =====` line).
    fn power_cycle_hung(&mut self, cycle: u32) -> Result<()> {
        let marker = stage1_watch::power_cycle_marker(cycle);
        self.restart_keeping_console(&self.hung_log(), &marker)?;
        self.watch.power_cycled(Instant::now());
        Ok(())
    }

    /// Kills QEMU, appends its console and `marker` to `history`, empties the console
    /// and starts QEMU again with the same disk and firmware variables.
    fn restart_keeping_console(&self, history: &Path, marker: &str) -> Result<()> {
        self.qemu.power_cycle(|| {
            use std::io::Write as _;
            let before = self.console();
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(history)?;
            writeln!(file, "{before}\n{marker}")?;
            std::fs::File::create(&self.console).map(drop)
        })?;
        Ok(())
    }

    /// Cut the power: kill QEMU at once (SIGKILL: nothing is flushed, the guest gets no
    /// word) and start it again with the same disk and firmware variables, as a machine
    /// whose power came back. The console starts empty; what the guest printed before the
    /// cut is appended to `console.before-cuts.log` in the scratch directory.
    pub fn power_cycle(&mut self) -> Result<()> {
        let history = self.dir.path().join("console.before-cuts.log");
        self.restart_keeping_console(&history, "===== power cut =====")?;
        // A new power-on: stage 1 is watched for again, with the power cycles it may take.
        self.watch = Watch::new(self.watch.deadline(), Instant::now());
        Ok(())
    }

    /// Send one command to the QEMU monitor (`system_powerdown`, `sendkey
    /// ctrl-alt-delete`) and return what it answered.
    pub fn monitor(&self, command: &str) -> Result<String> {
        use std::io::{Read, Write};
        let mut conn =
            std::os::unix::net::UnixStream::connect(&self.monitor).with_context(|| {
                format!("connecting to the QEMU monitor {}", self.monitor.display())
            })?;
        conn.set_read_timeout(Some(Duration::from_millis(500)))?;
        conn.write_all(format!("{command}\n").as_bytes())?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        // The monitor prints a banner and prompts; read until it goes quiet.
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }

    /// Wait for QEMU to exit by itself (guest power-off, or reboot with `-no-reboot`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.qemu.exited().is_some() {
                return Ok(());
            }
            let console = self.console();
            self.watch_stage1(&console)?;
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {:.1}s waiting for the VM to stop\n{}",
                    self.elapsed().as_secs_f64(),
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // `qemu`, dropped after this, kills QEMU.
        // A failing test's console outlives the scratch directory, for the post-mortem.
        if std::thread::panicking() {
            let name = self
                .dir
                .path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let kept = std::env::temp_dir().join(format!("{name}-console.log"));
            if std::fs::copy(&self.console, &kept).is_ok() {
                eprintln!("guest: console kept at {}", kept.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::shows_line;

    #[test]
    fn a_line_counts_once_it_is_complete() {
        let needle = "dhcp lease 10.5.98.";
        assert!(!shows_line(
            "boot\nkeelson-init: dhcp lease 10.5.98.50/24, d",
            needle
        ));
        assert!(shows_line(
            "keelson-init: dhcp lease 10.5.98.50/24, dns x\nmore",
            needle
        ));
        assert!(!shows_line("nothing here\n", needle));
    }
}
