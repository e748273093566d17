//! `cargo xtask bench api`: machined on one booted node (amd64, the boot bench's QEMU
//! flags, a control-plane config through `fw_cfg`, the node API forwarded to a loopback
//! port: [`super::node`]):
//!
//! - machined's RSS at idle: read through the API (`machinectl get processes`) once
//!   init has printed its idle report (every service ready, 10 s quiet);
//! - the latency of `machinectl version` and of `machinectl apply-config --mode
//!   no-reboot`, `--calls` of each per run, one after another. The two configs differ
//!   in one sysctl's value and the calls alternate between them, so every apply changes
//!   something on the node; the value read back through `get sysctls` afterwards must
//!   be the last one applied.
//!
//! Each latency is what an operator sees: host wall time of one `machinectl` process
//! (start, TLS 1.3 handshake with client certificates, the call, exit). Per run the
//! p50 and p99 (nearest rank) are taken; the table's min/median/max are over runs.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use keelson_cluster::qemu;
use keelson_configs::layout::{self, Arch};

use super::boot::{self, BootRun, BootSpec, CONTAINERD_MARKER, PID1_RSS_KEY, Vm};
use super::node::{self, NodeFiles};
use super::{Ctx, Figure, Stats, Unit};

/// One boot of the node to its idle report, with room to spare under TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(480);

/// The `p`-th percentile (0-100) by nearest rank.
fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// What one run measured.
struct ApiRun {
    machined_rss: f64,
    version: Vec<f64>,
    apply: Vec<f64>,
}

/// Time `calls` runs of `machinectl ARGS` (each must succeed).
fn time_calls(
    bin: &Path,
    files: &NodeFiles,
    calls: usize,
    args: impl Fn(usize) -> Vec<String>,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(calls);
    for n in 0..calls {
        let args = args(n);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = Instant::now();
        node::machinectl_ok(bin, files, &args)?;
        out.push(started.elapsed().as_secs_f64());
    }
    Ok(out)
}

fn run_once(ctx: &Ctx, bin: &Path, image: &Path, files: &NodeFiles) -> Result<ApiRun> {
    let arch = Arch::Amd64;
    let dir = ctx.dir.join("scratch").join("api").join("vm");
    let accel = qemu::probe_accel(arch, &ctx.dir.join("scratch").join("api"));
    let done = |r: &BootRun, _: Duration| r.console.contains(PID1_RSS_KEY);
    let spec = BootSpec {
        arch,
        accel,
        disk: image,
        dir: dir.clone(),
        fw_cfg: vec![(layout::FW_CFG_CONFIG.to_string(), files.configs[0].clone())],
        extra: files.qemu_net(),
        markers: &[CONTAINERD_MARKER],
        done: &done,
        timeout: BOOT_TIMEOUT,
    };
    let mut vm = Vm::start(&spec)?;
    let run = vm.watch(&spec);
    if !run.console.contains(PID1_RSS_KEY) {
        return Err(boot::missed("our node", PID1_RSS_KEY, &run, &dir));
    }
    node::wait_api(bin, files, Duration::from_secs(60))
        .with_context(|| qemu::console_tail(&dir.join("console.log"), 20))?;
    let machined_rss = node::machined_rss_kb(bin, files)? as f64 * 1024.0;
    let calls = ctx.args.calls;
    let version = time_calls(bin, files, calls, |_| {
        vec!["version".into(), "-o".into(), "json".into()]
    })?;
    let configs = files.configs.clone();
    // The node booted with configs[0]: the first apply changes to configs[1].
    let apply = time_calls(bin, files, calls, |n| {
        vec![
            "apply-config".into(),
            "--mode".into(),
            "no-reboot".into(),
            "--file".into(),
            configs[(n + 1) % 2].display().to_string(),
        ]
    })?;
    let expected = node::SYSCTL_VALUES[calls % 2];
    let out = node::machinectl_ok(bin, files, &["get", "sysctls", node::SYSCTL, "-o", "json"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.contains(&format!("\"{expected}\"")) {
        bail!(
            "after {calls} apply-config calls {} should be {expected}; the node says:\n{text}",
            node::SYSCTL
        );
    }
    drop(vm);
    Ok(ApiRun {
        machined_rss,
        version,
        apply,
    })
}

/// `cargo xtask bench api` (amd64).
pub fn bench(ctx: &mut Ctx) -> Result<()> {
    if ctx.args.calls == 0 {
        bail!("--calls 0 measures nothing: give at least 1 (100 for a meaningful p99)");
    }
    let arch = Arch::Amd64;
    let image = ctx.built_image(arch)?;
    let bin = crate::cluster::machinectl()?;
    let scratch = ctx.dir.join("scratch").join("api");
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let files = node::prepare(&bin, &scratch.join("node"))?;
    let group = format!("api {arch}");
    let mut rss = Vec::new();
    let (mut v50, mut v99, mut a50, mut a99) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let runs = ctx.args.runs;
    for n in 1..=runs {
        eprintln!(
            "xtask: bench: {group}: run {n}/{runs}: boot, then {} calls of version and of apply-config",
            ctx.args.calls
        );
        let r = run_once(ctx, &bin, &image, &files)?;
        eprintln!(
            "xtask: bench: {group}: machined {:.1} MiB; version p50 {:.3} s; apply-config p50 {:.3} s",
            r.machined_rss / 1048576.0,
            percentile(&r.version, 50.0).unwrap_or(0.0),
            percentile(&r.apply, 50.0).unwrap_or(0.0)
        );
        rss.push(r.machined_rss);
        for (samples, p50, p99) in [
            (&r.version, &mut v50, &mut v99),
            (&r.apply, &mut a50, &mut a99),
        ] {
            p50.extend(percentile(samples, 50.0));
            p99.extend(percentile(samples, 99.0));
        }
    }
    let calls = ctx.args.calls;
    if let Some(stats) = Stats::of(&rss) {
        ctx.figures.push(
            Figure::new(&group, "machined RSS at idle", Unit::Bytes, stats, None)
                .target(Some(12.0 * 1048576.0), None)
                .note("VmRSS of machined through `machinectl get processes`, after init's idle report"),
        );
    }
    for (name, samples) in [
        ("`version` latency p50", &v50),
        ("`version` latency p99", &v99),
        ("`apply-config --mode no-reboot` latency p50", &a50),
        ("`apply-config --mode no-reboot` latency p99", &a99),
    ] {
        if let Some(stats) = Stats::of(samples) {
            let mut f = Figure::new(&group, name, Unit::Seconds, stats, None);
            if name.starts_with("`version` latency p50") {
                f = f.note(format!(
                    "{calls} calls of each per run, each one `machinectl` process (start, \
                     mutual TLS handshake, call); apply-config alternates a sysctl so each \
                     call changes it; min/median/max over runs"
                ));
            }
            ctx.figures.push(f);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&s, 50.0), Some(50.0));
        assert_eq!(percentile(&s, 99.0), Some(99.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
