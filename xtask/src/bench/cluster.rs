//! `cargo xtask bench cluster`: wall time of `machinectl cluster create` until every
//! node's API answers and it is healthy, for a 1-node and a 3-node cluster (1 control
//! plane + 2 workers), each node 1 vCPU and 1 GiB. The 3-node figure is set beside the
//! 1-node one: the ratio is how creation time grows with node count on this machine
//! (the nodes boot concurrently, so on a 2-core host under software emulation they
//! share the CPUs). Runs alternate (1, 3, 1, 3, ...) so that load changes touch both.
//!
//! Each run uses its own state directory and client config under `target/bench/`, and
//! destroys its cluster before the next.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use keelson_configs::layout::Arch;

use super::{Ctx, Figure, Reference, Stats, Unit};

/// Memory per node, MiB.
const MEMORY_MIB: &str = "1024";

fn create_once(bin: &Path, image: &Path, scratch: &Path, nodes: u32) -> Result<Duration> {
    let name = format!("bench{nodes}n{}", std::process::id());
    let state = scratch.join("state");
    let config = scratch.join("machinectl.toml");
    let machinectl = |args: &[&str]| {
        let mut cmd = Command::new("timeout");
        cmd.arg("2400")
            .arg(bin)
            .arg("--machineconfig")
            .arg(&config)
            .args(args)
            .env("XDG_STATE_HOME", &state)
            .env_remove("MACHINECONFIG");
        cmd
    };
    let workers = (nodes - 1).to_string();
    let started = Instant::now();
    let out = machinectl(&[
        "cluster",
        "create",
        "--name",
        &name,
        "--controlplanes",
        "1",
        "--workers",
        &workers,
        "--cpus",
        "1",
        "--memory",
        MEMORY_MIB,
        "--wait",
        "30m",
        "--image",
        image.to_str().context("the image path is not UTF-8")?,
    ])
    .output()
    .context("running machinectl cluster create")?;
    let took = started.elapsed();
    let destroyed = machinectl(&["cluster", "destroy", "--name", &name]).output();
    if !out.status.success() {
        bail!(
            "machinectl cluster create ({nodes} nodes) failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    match destroyed {
        Ok(d) if d.status.success() => {}
        Ok(d) => bail!(
            "machinectl cluster destroy failed: {}",
            String::from_utf8_lossy(&d.stderr)
        ),
        Err(e) => bail!("running machinectl cluster destroy: {e}"),
    }
    eprintln!(
        "xtask: bench: {nodes}-node cluster healthy after {:.1} s",
        took.as_secs_f64()
    );
    Ok(took)
}

/// `cargo xtask bench cluster` (amd64).
pub fn bench(ctx: &mut Ctx) -> Result<()> {
    let arch = Arch::Amd64;
    let image = ctx.built_image(arch)?;
    let bin = crate::cluster::machinectl()?;
    let scratch = ctx.dir.join("scratch").join("cluster");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let (mut one, mut three) = (Vec::new(), Vec::new());
    for _ in 0..ctx.args.runs {
        one.push(create_once(&bin, &image, &scratch, 1)?);
        three.push(create_once(&bin, &image, &scratch, 3)?);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let group = format!("cluster {arch}");
    let (Some(one), Some(three)) = (Stats::durations(&one), Stats::durations(&three)) else {
        bail!("no cluster was measured");
    };
    let per_node = (three.median - one.median) / 2.0;
    ctx.figures.push(
        Figure::new(&group, "1-node cluster healthy", Unit::Seconds, one.clone(), None)
            .note("machinectl cluster create to every node's API answering and healthy; 1 vCPU, 1 GiB per node"),
    );
    ctx.figures.push(
        Figure::new(
            &group,
            "3-node cluster healthy",
            Unit::Seconds,
            three,
            Some(Reference {
                name: "1-node cluster".into(),
                stats: one,
            }),
        )
        .note(format!(
            "ratio = growth from 1 to 3 nodes booting concurrently; {per_node:.1} s per added node"
        )),
    );
    Ok(())
}
