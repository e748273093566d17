//! `cargo xtask bench etcd`: how long a local cluster of three control planes takes from
//! `machinectl bootstrap` to a healthy etcd, set beside one node's boot measured in the
//! same run, and what `etcdctl check perf` makes of that cluster. Per run:
//!
//! 1. `machinectl cluster create` of 3 control planes and no worker, `--no-bootstrap`,
//!    1 vCPU and 1 GiB per node, from `target/images/amd64/keelson.raw` (built only when
//!    missing), in a state directory and client config of its own under
//!    `target/bench/scratch/etcd/`;
//! 2. one node's boot: the third control plane is power-cut (SIGKILL of its QEMU) and
//!    `machinectl cluster start` boots it again until its API answers `version`; this is
//!    the reference, since `create`'s own wait is three nodes booting at once;
//! 3. `machinectl bootstrap` on the first control plane, timed from the call until every
//!    control plane's `etcd members` lists 3 started voting members and the real
//!    `etcdctl endpoint health --cluster` (Debian's etcd-client, run in the cluster's
//!    network namespace with the healthcheck-client certificate) reports 3 healthy;
//! 4. `etcdctl check perf --load s` against the three members: its PASS/FAIL lines are
//!    kept as it prints them, its throughput, slowest request and stddev become figures;
//! 5. `machinectl cluster destroy`, on error too.
//!
//! Runs as root (the network namespace); `--runs` defaults to 1 here, as one run takes
//! minutes under software emulation.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use keelson_configs::layout::Arch;
use serde_json::Value;

use super::{Ctx, Figure, Reference, Stats, Unit};

/// Memory per node, MiB (as `bench cluster`).
const MEMORY_MIB: &str = "1024";
/// Control planes in the cluster.
const CONTROL_PLANES: usize = 3;
/// How long `bootstrap` may take to be healthy on every control plane.
const HEALTHY_LIMIT: Duration = Duration::from_secs(20 * 60);
/// The pause between two looks at the cluster while it forms.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// etcdctl's own bounds for `check perf` (its PASS lines): at least 90% of the load's
/// 150 writes/s, the slowest request at most 0.5 s, the stddev at most 0.1 s.
const PERF_SLOWEST_MAX: f64 = 0.5;
const PERF_STDDEV_MAX: f64 = 0.1;
/// The etcd client files the bench reads from the first control plane.
const PKI_FILES: [&str; 3] = ["ca.crt", "healthcheck-client.crt", "healthcheck-client.key"];

/// One control plane, as `cluster show` lists it.
#[derive(Debug, Clone)]
struct Node {
    name: String,
    api: String,
    address: String,
}

/// A cluster of this bench: its machinectl environment, destroyed when dropped.
struct Cluster {
    bin: PathBuf,
    config: PathBuf,
    state: PathBuf,
    pki: PathBuf,
    name: String,
    nodes: Vec<Node>,
    destroyed: bool,
}

impl Cluster {
    /// machinectl with the bench's state and client config, bounded by `limit`.
    fn run(&self, args: &[&str], limit: Duration) -> Result<Output> {
        Command::new("timeout")
            .arg(limit.as_secs().to_string())
            .arg(&self.bin)
            .arg("--machineconfig")
            .arg(&self.config)
            .args(args)
            .env("XDG_STATE_HOME", &self.state)
            .env_remove("MACHINECONFIG")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running machinectl {}", args.join(" ")))
    }

    /// machinectl; it must succeed. Its standard output.
    fn ok(&self, args: &[&str], limit: Duration) -> Result<String> {
        let out = self.run(args, limit)?;
        if !out.status.success() {
            bail!("machinectl {} failed: {}", args.join(" "), shown(&out));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// machinectl against one node.
    fn on(&self, node: &Node, args: &[&str], limit: Duration) -> Result<Output> {
        let mut all = vec!["--nodes", node.api.as_str()];
        all.extend_from_slice(args);
        self.run(&all, limit)
    }

    /// `cluster show -o json`.
    fn show(&self) -> Result<Vec<Value>> {
        let out = self.ok(
            &["cluster", "show", "--name", &self.name, "-o", "json"],
            Duration::from_secs(60),
        )?;
        let shown: Value = serde_json::from_str(&out)
            .with_context(|| format!("reading `cluster show -o json`: {out}"))?;
        Ok(shown.as_array().cloned().unwrap_or_default())
    }

    /// The etcd client with the healthcheck-client certificate, in the cluster's network
    /// namespace, against every control plane; bounded by `limit`.
    fn etcdctl(&self, args: &[&str], limit: Duration) -> Result<Output> {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("https://{}:2379", n.address))
            .collect();
        let ns = format!("keelson-{}", self.name);
        Command::new("timeout")
            .arg(limit.as_secs().to_string())
            .args(["ip", "netns", "exec", &ns, "etcdctl"])
            .arg(format!("--endpoints={}", urls.join(",")))
            .arg(format!("--cacert={}", self.pki.join("ca.crt").display()))
            .arg(format!(
                "--cert={}",
                self.pki.join("healthcheck-client.crt").display()
            ))
            .arg(format!(
                "--key={}",
                self.pki.join("healthcheck-client.key").display()
            ))
            .args(["--dial-timeout=5s", "--command-timeout=15s"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running etcdctl in the cluster's network namespace")
    }

    fn destroy(&mut self) -> Result<()> {
        self.destroyed = true;
        self.ok(
            &["cluster", "destroy", "--name", &self.name],
            Duration::from_secs(300),
        )
        .map(drop)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.destroyed {
            let _ = self.destroy();
        }
    }
}

fn shown(out: &Output) -> String {
    format!(
        "{}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What `etcdctl check perf` printed and the figures in it.
#[derive(Debug, Clone, PartialEq)]
struct Perf {
    /// Its verdict lines (`PASS: ...`, `Slowest request took too long: ...`, `FAIL`), as
    /// printed.
    lines: Vec<String>,
    /// Writes per second.
    throughput: Option<f64>,
    /// The slowest request, seconds.
    slowest: Option<f64>,
    /// The requests' standard deviation, seconds.
    stddev: Option<f64>,
}

/// The number in a `check perf` line: the token before `writes/s`, or the last one
/// without its trailing `s`.
fn perf_number(line: &str) -> Option<f64> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let token = match tokens.iter().position(|t| *t == "writes/s") {
        Some(i) => tokens.get(i.checked_sub(1)?)?,
        None => tokens.last()?.strip_suffix('s')?,
    };
    token.parse().ok()
}

/// Reads `etcdctl check perf`'s output (its progress bar redraws with carriage returns).
fn parse_perf(output: &str) -> Perf {
    let lines: Vec<String> = output
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| {
            l.starts_with("PASS")
                || l.starts_with("FAIL")
                || l.starts_with("Slowest request")
                || l.starts_with("Stddev")
        })
        .map(str::to_owned)
        .collect();
    let find = |word: &str| {
        lines
            .iter()
            .find(|l| l.contains(word))
            .and_then(|l| perf_number(l))
    };
    Perf {
        throughput: find("Throughput"),
        slowest: find("Slowest request"),
        stddev: find("Stddev"),
        lines,
    }
}

/// The cluster's control planes from `cluster show`, sorted by name.
fn read_nodes(cluster: &Cluster) -> Result<Vec<Node>> {
    let field = |n: &Value, key: &str| {
        n[key]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("`cluster show` lacks {key}: {n}"))
    };
    let mut nodes = cluster
        .show()?
        .iter()
        .map(|n| {
            Ok(Node {
                name: field(n, "node")?,
                api: field(n, "api")?,
                address: field(n, "address")?,
            })
        })
        .collect::<Result<Vec<Node>>>()?;
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    if nodes.len() != CONTROL_PLANES {
        bail!(
            "`cluster show` lists {} nodes, not {CONTROL_PLANES}",
            nodes.len()
        );
    }
    Ok(nodes)
}

/// `state` (and `pid`) of `node` in `cluster show`.
fn vm_of(cluster: &Cluster, node: &Node) -> Result<(String, Option<u64>)> {
    let shown = cluster.show()?;
    let row = shown
        .iter()
        .find(|n| n["node"] == node.name.as_str())
        .with_context(|| format!("`cluster show` no longer lists {}", node.name))?;
    Ok((
        row["state"].as_str().unwrap_or_default().to_owned(),
        row["pid"].as_u64(),
    ))
}

/// Power-cuts `node` (SIGKILL of its QEMU), then times `cluster start` until its API
/// answers.
fn one_node_boot(cluster: &Cluster, node: &Node) -> Result<Duration> {
    let (_, pid) = vm_of(cluster, node)?;
    let pid = pid.with_context(|| format!("`cluster show` has no QEMU pid for {}", node.name))?;
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -KILL {pid} ({}'s QEMU) failed", node.name);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm_of(cluster, node)?.0 != "down" {
        if Instant::now() > deadline {
            bail!("{} is still up 30 s after SIGKILL of its QEMU", node.name);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let started = Instant::now();
    cluster.ok(
        &["cluster", "start", "--name", &cluster.name, &node.name],
        Duration::from_secs(30 * 60),
    )?;
    Ok(started.elapsed())
}

/// Fetches the etcd client files from `node` into `cluster.pki` (they are written at
/// machined's start, before any bootstrap).
fn fetch_pki(cluster: &Cluster, node: &Node) -> Result<()> {
    std::fs::create_dir_all(&cluster.pki)
        .with_context(|| format!("creating {}", cluster.pki.display()))?;
    for file in PKI_FILES {
        let path = format!("/etc/kubernetes/pki/etcd/{file}");
        let deadline = Instant::now() + Duration::from_secs(300);
        let bytes = loop {
            let out = cluster.on(node, &["read", &path], Duration::from_secs(60))?;
            if out.status.success() && !out.stdout.is_empty() {
                break out.stdout;
            }
            if Instant::now() > deadline {
                bail!("reading {path} on {}: {}", node.name, shown(&out));
            }
            std::thread::sleep(Duration::from_secs(2));
        };
        let to = cluster.pki.join(file);
        std::fs::write(&to, bytes).with_context(|| format!("writing {}", to.display()))?;
    }
    Ok(())
}

/// Why the cluster is not formed yet, or None once every control plane lists 3 started
/// voting members and etcdctl finds 3 healthy endpoints.
fn not_formed(cluster: &Cluster) -> Result<Option<String>> {
    for node in &cluster.nodes {
        let out = cluster.on(
            node,
            &["etcd", "members", "-o", "json"],
            Duration::from_secs(60),
        )?;
        if !out.status.success() {
            return Ok(Some(format!(
                "etcd members on {}: {}",
                node.name,
                shown(&out)
            )));
        }
        let members: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let members = members.as_array().cloned().unwrap_or_default();
        let voting = members
            .iter()
            .filter(|m| m["learner"] == false && m["started"] == true)
            .count();
        if members.len() != CONTROL_PLANES || voting != CONTROL_PLANES {
            return Ok(Some(format!(
                "{} lists {} members, {voting} of them started and voting",
                node.name,
                members.len()
            )));
        }
    }
    let out = cluster.etcdctl(
        &["endpoint", "health", "--cluster", "-w", "json"],
        Duration::from_secs(60),
    )?;
    let health: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let healthy = health
        .as_array()
        .map_or(0, |a| a.iter().filter(|h| h["health"] == true).count());
    if healthy != CONTROL_PLANES {
        return Ok(Some(format!(
            "etcdctl endpoint health --cluster: {healthy} healthy: {}",
            shown(&out)
        )));
    }
    Ok(None)
}

/// Times `bootstrap` on the first control plane until the cluster is formed.
fn bootstrap_to_healthy(cluster: &Cluster) -> Result<Duration> {
    let first = &cluster.nodes[0];
    let started = Instant::now();
    let out = cluster.on(first, &["bootstrap"], Duration::from_secs(600))?;
    if !out.status.success() {
        bail!("bootstrap on {}: {}", first.name, shown(&out));
    }
    loop {
        match not_formed(cluster)? {
            None => return Ok(started.elapsed()),
            Some(why) if started.elapsed() > HEALTHY_LIMIT => bail!(
                "etcd not healthy {} min after bootstrap: {why}",
                HEALTHY_LIMIT.as_secs() / 60
            ),
            Some(_) => std::thread::sleep(LOOK_EVERY),
        }
    }
}

/// `etcdctl check perf --load s` against the cluster.
fn check_perf(cluster: &Cluster) -> Result<Perf> {
    let out = cluster.etcdctl(&["check", "perf", "--load", "s"], Duration::from_secs(600))?;
    let perf = parse_perf(&String::from_utf8_lossy(&out.stdout));
    if perf.throughput.is_none() {
        bail!("etcdctl check perf printed no throughput: {}", shown(&out));
    }
    Ok(perf)
}

/// What one run measured.
struct EtcdRun {
    boot: Duration,
    bootstrap: Duration,
    /// `check perf`, or why it gave nothing.
    perf: Result<Perf, String>,
}

/// One run: create, one node's boot, bootstrap to healthy, check perf, destroy.
fn run_once(bin: &Path, image: &Path, scratch: &Path, run: usize) -> Result<EtcdRun> {
    let dir = scratch.join(format!("run{run}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cluster = Cluster {
        bin: bin.to_owned(),
        config: dir.join("machinectl.toml"),
        state: dir.join("state"),
        pki: dir.join("pki"),
        name: format!("benchetcd{}", std::process::id()),
        nodes: Vec::new(),
        destroyed: false,
    };
    let name = cluster.name.clone();
    let image = image.to_str().context("the image path is not UTF-8")?;
    let started = Instant::now();
    cluster.ok(
        &[
            "cluster",
            "create",
            "--name",
            &name,
            "--controlplanes",
            "3",
            "--workers",
            "0",
            "--cpus",
            "1",
            "--memory",
            MEMORY_MIB,
            "--no-bootstrap",
            "--wait",
            "30m",
            "--image",
            image,
        ],
        Duration::from_secs(40 * 60),
    )?;
    eprintln!(
        "xtask: bench: {name}: 3 control planes up after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    cluster.nodes = read_nodes(&cluster)?;
    let boot = one_node_boot(&cluster, &cluster.nodes[2])?;
    eprintln!(
        "xtask: bench: {}: booted again to its API in {:.1} s",
        cluster.nodes[2].name,
        boot.as_secs_f64()
    );
    fetch_pki(&cluster, &cluster.nodes[0])?;
    let bootstrap = bootstrap_to_healthy(&cluster)?;
    eprintln!(
        "xtask: bench: {name}: bootstrap to 3/3 healthy in {:.1} s",
        bootstrap.as_secs_f64()
    );
    let perf = check_perf(&cluster).map_err(|e| format!("{e:#}"));
    if let Ok(perf) = &perf {
        for line in &perf.lines {
            eprintln!("xtask: bench: {name}: etcdctl check perf: {line}");
        }
    }
    cluster.destroy()?;
    Ok(EtcdRun {
        boot,
        bootstrap,
        perf,
    })
}

fn need_host() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("bench etcd runs etcdctl inside the cluster's network namespace: run it as root");
    }
    let etcdctl = Command::new("etcdctl")
        .arg("version")
        .stdout(Stdio::null())
        .status();
    if !etcdctl.is_ok_and(|s| s.success()) {
        bail!("bench etcd needs etcdctl: install Debian's etcd-client (cargo xtask test does)");
    }
    Ok(())
}

/// `cargo xtask bench etcd` (amd64).
pub fn bench(ctx: &mut Ctx) -> Result<()> {
    need_host()?;
    let arch = Arch::Amd64;
    let image = crate::cluster::ensure_image(arch, true)?;
    let bin = crate::cluster::machinectl()?;
    let scratch = ctx.dir.join("scratch").join("etcd");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let runs = ctx.args.runs_given.unwrap_or(1);
    let mut measured = Vec::new();
    for run in 1..=runs {
        let one = run_once(&bin, &image, &scratch, run)?;
        if let Err(why) = &one.perf {
            ctx.skip(format!("etcdctl check perf (run {run})"), why.clone());
        }
        measured.push(one);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    push_figures(ctx, &format!("etcd {arch}"), &image, &measured)
}

/// The figures of every run.
fn push_figures(ctx: &mut Ctx, group: &str, image: &Path, runs: &[EtcdRun]) -> Result<()> {
    let boot: Vec<Duration> = runs.iter().map(|r| r.boot).collect();
    let bootstrap: Vec<Duration> = runs.iter().map(|r| r.bootstrap).collect();
    let (Some(boot), Some(bootstrap)) = (Stats::durations(&boot), Stats::durations(&bootstrap))
    else {
        bail!("no etcd cluster was measured");
    };
    ctx.figures.push(
        Figure::new(group, "one node's boot to API", Unit::Seconds, boot.clone(), None).note(
            format!(
                "`cluster start` of the third control plane after a power cut (SIGKILL of its QEMU) until its API answers `version`: its second boot, the other two up; 1 vCPU, 1 GiB per node; {}",
                image.display()
            ),
        ),
    );
    ctx.figures.push(
        Figure::new(
            group,
            "bootstrap to 3/3 healthy",
            Unit::Seconds,
            bootstrap,
            Some(Reference {
                name: "one node's boot to API".into(),
                stats: boot,
            }),
        )
        .note(format!(
            "`machinectl bootstrap` on the first control plane until every control plane's `etcd members` lists 3 started voting members and `etcdctl endpoint health --cluster` 3 healthy (looked at every {} s plus the looks' own time)",
            LOOK_EVERY.as_secs()
        )),
    );
    let perfs: Vec<&Perf> = runs.iter().filter_map(|r| r.perf.as_ref().ok()).collect();
    let stats = |pick: fn(&Perf) -> Option<f64>| {
        Stats::of(&perfs.iter().filter_map(|p| pick(p)).collect::<Vec<_>>())
    };
    let said: Vec<String> = perfs
        .iter()
        .enumerate()
        .map(|(n, p)| format!("run {}: {}", n + 1, p.lines.join("; ")))
        .collect();
    if let Some(s) = stats(|p| p.throughput) {
        ctx.figures.push(
            Figure::new(group, "etcdctl check perf: throughput", Unit::PerSecond, s, None).note(
                format!(
                    "`etcdctl check perf --load s` (50 clients, 150 writes/s for 60 s; PASS from 135/s) against the 3 members; {}",
                    said.join(" | ")
                ),
            ),
        );
    }
    for (name, pick, max) in [
        (
            "etcdctl check perf: slowest request",
            (|p: &Perf| p.slowest) as fn(&Perf) -> Option<f64>,
            PERF_SLOWEST_MAX,
        ),
        ("etcdctl check perf: stddev", |p| p.stddev, PERF_STDDEV_MAX),
    ] {
        if let Some(s) = stats(pick) {
            ctx.figures.push(
                Figure::new(group, name, Unit::Seconds, s, None)
                    .target(Some(max), None)
                    .note("target: etcdctl's own PASS bound"),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_perf_passing() {
        let out = " 60 / 60 Boooooooooooooooooooooooooooooooooooooooom  !  100.00% 1m0s\r\
                   \nPASS: Throughput is 151 writes/s\nPASS: Slowest request took 0.041620s\n\
                   PASS: Stddev is 0.001876s\nPASS\n";
        let perf = parse_perf(out);
        assert_eq!(perf.throughput, Some(151.0));
        assert_eq!(perf.slowest, Some(0.041620));
        assert_eq!(perf.stddev, Some(0.001876));
        assert_eq!(
            perf.lines,
            [
                "PASS: Throughput is 151 writes/s",
                "PASS: Slowest request took 0.041620s",
                "PASS: Stddev is 0.001876s",
                "PASS"
            ]
        );
    }

    #[test]
    fn check_perf_failing() {
        let out = " 10 / 60 Booo  16.67% 50s\r 60 / 60 Boooom !  100.00% 1m0s\n\
                   FAIL: Throughput too low: 98 writes/s\n\
                   Slowest request took too long: 1.204311s\nStddev too high: 0.130502s\nFAIL\n";
        let perf = parse_perf(out);
        assert_eq!(perf.throughput, Some(98.0));
        assert_eq!(perf.slowest, Some(1.204311));
        assert_eq!(perf.stddev, Some(0.130502));
        assert_eq!(perf.lines.len(), 4);
        assert_eq!(perf.lines[3], "FAIL");
    }

    #[test]
    fn check_perf_errors_only() {
        let perf =
            parse_perf("FAIL: too many errors\nFAIL: ERROR(context deadline exceeded) -> 3\n");
        assert_eq!(perf.throughput, None);
        assert_eq!(perf.lines.len(), 2);
    }
}
