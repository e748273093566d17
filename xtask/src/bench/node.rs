//! One of our nodes as the benches that talk to it boot it: a control-plane config made
//! by `machinectl gen config` (a static address on QEMU's user network, so the node
//! needs no DHCP), given through `fw_cfg`; its admin client config pointed at a free
//! loopback port that a QEMU user-network forward (`restrict=on`: the guest reaches
//! nothing else) sends to the node API's port; and `machinectl` calls against it.
//!
//! Two configs are written, the same but for one sysctl's value, so that alternate
//! `apply-config --mode no-reboot` calls each change something on the node.

use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The node API's port on the node.
pub const API_PORT: u16 = 50000;
/// The sysctl whose value the two configs differ in.
pub const SYSCTL: &str = "net.core.somaxconn";
/// Its value in each config.
pub const SYSCTL_VALUES: [&str; 2] = ["4096", "4097"];
/// The MAC of the node's one network device.
const MAC: &str = "52:54:00:4b:42:01";

/// The files of one benched node.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    /// The two control-plane configs (the first is booted).
    pub configs: [PathBuf; 2],
    /// The admin client config, its endpoint on the loopback port.
    pub client: PathBuf,
    /// The loopback port forwarded to the node API.
    pub port: u16,
}

impl NodeFiles {
    /// The QEMU arguments of the node's network: user networking, `restrict=on`, the
    /// loopback port forwarded to the node API.
    pub fn qemu_net(&self) -> Vec<String> {
        vec![
            "-netdev".into(),
            format!(
                "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{}-:{API_PORT}",
                self.port
            ),
            "-device".into(),
            format!("virtio-net-pci,netdev=n0,mac={MAC}"),
        ]
    }
}

/// The config patch: the user network's static address, and the sysctl.
fn patch(value: &str) -> String {
    format!(
        r#"[machine]
hostname = "bench"

[machine.sysctls]
"{SYSCTL}" = "{value}"

[machine.network]
nameservers = ["10.0.2.3"]

[[machine.network.interfaces]]
name = "eth0"
addresses = ["10.0.2.15/24"]

[[machine.network.interfaces.routes]]
to = "0.0.0.0/0"
via = "10.0.2.2"
"#
    )
}

/// A free TCP port on 127.0.0.1 (free now; QEMU binds it a moment later).
fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// Write the configs and the client config under `dir` with `machinectl gen config`
/// (the second config reuses the first's secrets: the two differ only in [`SYSCTL`]).
pub fn prepare(machinectl: &Path, dir: &Path) -> Result<NodeFiles> {
    let _ = std::fs::remove_dir_all(dir);
    let mut configs = Vec::new();
    for (n, value) in SYSCTL_VALUES.iter().enumerate() {
        let out_dir = dir.join(format!("config{n}"));
        std::fs::create_dir_all(&out_dir)
            .with_context(|| format!("creating {}", out_dir.display()))?;
        let patch_file = out_dir.join("patch.toml");
        std::fs::write(&patch_file, patch(value))
            .with_context(|| format!("writing {}", patch_file.display()))?;
        let mut cmd = Command::new(machinectl);
        cmd.args([
            "gen",
            "config",
            "bench",
            "https://10.0.2.15:6443",
            "--force",
        ])
        .arg("--output-dir")
        .arg(&out_dir)
        .arg("--config-patch")
        .arg(&patch_file);
        if n > 0 {
            cmd.arg("--with-secrets")
                .arg(dir.join("config0").join("secrets.toml"));
        }
        let out = cmd.output().context("running machinectl gen config")?;
        if !out.status.success() {
            bail!(
                "machinectl gen config failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        configs.push(out_dir.join("controlplane.toml"));
    }
    let [a, b]: [PathBuf; 2] = configs
        .try_into()
        .map_err(|_| anyhow::anyhow!("two configs expected"))?;
    // The client config names the node's own address; the bench reaches it through
    // the forwarded loopback port.
    let port = free_port()?;
    let generated = dir.join("config0").join("machinectl.toml");
    let text = std::fs::read_to_string(&generated)
        .with_context(|| format!("reading {}", generated.display()))?;
    // The context's endpoint becomes the forwarded port; with no nodes named, calls go
    // to the endpoint itself.
    let mut rewritten = 0;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            if line.starts_with("endpoints = ") {
                rewritten += 1;
                format!("endpoints = [\"127.0.0.1:{port}\"]")
            } else if line.starts_with("nodes = ") {
                rewritten += 1;
                "nodes = []".to_string()
            } else {
                line.to_string()
            }
        })
        .collect();
    if rewritten != 2 {
        bail!(
            "{} has no `endpoints = ` and `nodes = ` lines to point at the forwarded port: \
             machinectl gen config's client config changed shape; update \
             xtask/src/bench/node.rs",
            generated.display()
        );
    }
    let client = dir.join("machinectl.toml");
    std::fs::write(&client, lines.join("\n") + "\n")
        .and_then(|()| std::fs::set_permissions(&client, Permissions::from_mode(0o600)))
        .with_context(|| format!("writing {}", client.display()))?;
    Ok(NodeFiles {
        configs: [a, b],
        client,
        port,
    })
}

/// The command `machinectl --machineconfig CLIENT ARGS...`, ended after `limit` (under
/// `timeout`), with no standard input.
pub fn machinectl_command(
    bin: &Path,
    files: &NodeFiles,
    args: &[&str],
    limit: Duration,
) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg(limit.as_secs().to_string())
        .arg(bin)
        .arg("--machineconfig")
        .arg(&files.client)
        .args(args)
        .env_remove("MACHINECONFIG")
        .stdin(Stdio::null());
    cmd
}

/// Run `machinectl --machineconfig CLIENT ARGS...` (60 s at most).
pub fn machinectl(bin: &Path, files: &NodeFiles, args: &[&str]) -> Result<Output> {
    machinectl_command(bin, files, args, Duration::from_secs(60))
        .output()
        .with_context(|| format!("running machinectl {}", args.join(" ")))
}

/// `machinectl ARGS...` that must succeed.
pub fn machinectl_ok(bin: &Path, files: &NodeFiles, args: &[&str]) -> Result<Output> {
    let out = machinectl(bin, files, args)?;
    if !out.status.success() {
        bail!(
            "machinectl {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Wait until `machinectl version` answers (machined is started before its listener is
/// bound); `within` at most.
pub fn wait_api(bin: &Path, files: &NodeFiles, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let out = machinectl(bin, files, &["version", "-o", "json"])?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the node API did not answer `version` within {} s: {}",
                within.as_secs(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// machined's RSS in KiB, from `machinectl get processes` (its own row).
pub fn machined_rss_kb(bin: &Path, files: &NodeFiles) -> Result<u64> {
    rss_kb(&processes_json(bin, files)?, "machined")
}

/// `machinectl get processes -o json`: one answer that [`rss_kb`] reads each program's
/// row from.
pub fn processes_json(bin: &Path, files: &NodeFiles) -> Result<String> {
    let out = machinectl_ok(bin, files, &["get", "processes", "-o", "json"])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `program`'s RSS in KiB (by command name) from a [`processes_json`] answer.
pub fn rss_kb(json: &str, program: &str) -> Result<u64> {
    parse_rss(json, program).with_context(|| {
        format!("no {program} row with an RSS in `machinectl get processes -o json`:\n{json}")
    })
}

/// `program`'s `RSS_KB` from `get processes -o json` (rows of objects, keyed by the
/// table's column names, possibly lower-cased; one list per node).
fn parse_rss(json: &str, program: &str) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    let mut rows = Vec::new();
    collect_rows(&value, &mut rows);
    rows.into_iter().find_map(|row| {
        let field = |key: &str| {
            row.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v)
        };
        let command = field("command")?;
        let command = command.as_str()?;
        let first = command.split_whitespace().next()?;
        if !(first == program || first.ends_with(&format!("/{program}"))) {
            return None;
        }
        let rss = field("rss_kb")?;
        rss.as_u64()
            .or_else(|| rss.as_str().and_then(|s| s.trim().parse().ok()))
    })
}

fn collect_rows<'a>(
    value: &'a serde_json::Value,
    rows: &mut Vec<&'a serde_json::Map<String, serde_json::Value>>,
) {
    match value {
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_rows(v, rows)),
        serde_json::Value::Object(map) => {
            if map.keys().any(|k| k.eq_ignore_ascii_case("rss_kb")) {
                rows.push(map);
            } else {
                map.values().for_each(|v| collect_rows(v, rows));
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machined_row() {
        let json = r#"[{"node":"n","rows":[
            {"pid":"1","command":"/sbin/init","rss_kb":"3000"},
            {"pid":"301","command":"/usr/bin/machined --x","rss_kb":"9100"}]}]"#;
        assert_eq!(parse_rss(json, "machined"), Some(9100));
        assert_eq!(parse_rss(json, "init"), Some(3000));
        let json = r#"[{"PID":301,"COMMAND":"machined","RSS_KB":9000}]"#;
        assert_eq!(parse_rss(json, "machined"), Some(9000));
        assert_eq!(
            parse_rss(r#"[{"command":"init","rss_kb":"1"}]"#, "machined"),
            None
        );
    }
}
