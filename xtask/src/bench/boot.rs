//! `cargo xtask bench boot`: host wall time from QEMU's start to a ready line on the
//! serial console, for three systems booted the same way — the same QEMU flags
//! (`Machine`: q35/virt, 2 vCPUs, [`MEMORY_MIB`], virtio-blk, a fresh copy of the
//! firmware variables, a qcow2 overlay over the disk), the same UEFI firmware, the
//! same systemd-boot, the same kernel:
//!
//! - the floor ([`super::floor`]): a trivial init that prints a line and powers off;
//! - our image, to `service containerd ready` (or `--marker`), falling back to the
//!   stage 2 banner `KEELSON STAGE2 READY` while init does not start containerd yet;
//! - the peer ([`super::peer`], amd64 only): Debian + systemd to `ctr version`
//!   answering, then the RSS of its init and system daemons at idle.
//!
//! Runs are interleaved (floor, ours, peer, floor, ...) so that a change in the
//! machine's load touches all three alike.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use keelson_configs::layout::{self, Arch};
use keelson_imager::qemu::{self, Accel, Machine};

use super::{Ctx, Figure, Reference, Stats, Unit, floor, peer};

/// Guest memory for every machine of the comparison.
pub const MEMORY_MIB: u32 = 2048;
/// The ready line of init's stage 2 today.
pub const STAGE2_MARKER: &str = "KEELSON STAGE2 READY";
/// The ready line once init supervises containerd.
pub const CONTAINERD_MARKER: &str = "service containerd ready";
/// The console line the bench reads PID 1's memory from, once stage 2 prints it:
/// `pid1 rss_kb=<N>`.
pub const PID1_RSS_KEY: &str = "pid1 rss_kb=";
/// How long to wait for the primary marker once the fallback has been seen.
const FALLBACK_GRACE: Duration = Duration::from_secs(60);

/// What one boot saw.
#[derive(Debug, Clone, Default)]
pub struct BootRun {
    /// Markers seen, with the time from QEMU's start.
    pub seen: Vec<(String, Duration)>,
    /// The console text at the end.
    pub console: String,
    /// Whether QEMU exited by itself (the guest powered off).
    pub exited: bool,
    /// Whether the run hit its timeout.
    pub timed_out: bool,
}

impl BootRun {
    /// When `marker` appeared.
    pub fn at(&self, marker: &str) -> Option<Duration> {
        self.seen
            .iter()
            .find_map(|(m, t)| (m == marker).then_some(*t))
    }
}

/// One machine to boot and watch.
pub struct BootSpec<'a> {
    /// Guest architecture.
    pub arch: Arch,
    /// Accelerator.
    pub accel: Accel,
    /// The raw disk image (booted through a fresh overlay).
    pub disk: &'a Path,
    /// Scratch directory for this run (overlay, firmware variables, console).
    pub dir: PathBuf,
    /// `fw_cfg` entries.
    pub fw_cfg: Vec<(String, PathBuf)>,
    /// Console markers to time.
    pub markers: &'a [&'a str],
    /// Stop as soon as this says so (given what was seen so far).
    pub done: &'a dyn Fn(&BootRun, Duration) -> bool,
    /// Hard limit.
    pub timeout: Duration,
}

/// Boot a machine, time its markers, and stop it (it is always stopped on return).
pub fn boot(spec: &BootSpec<'_>) -> Result<BootRun> {
    let dir = &spec.dir;
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let overlay = dir.join("disk.qcow2");
    qemu::create_overlay(spec.disk, &overlay, None)?;
    let mut machine = Machine::new(spec.arch, spec.accel, overlay, dir.clone());
    machine.memory_mib = MEMORY_MIB;
    machine.no_reboot = true;
    machine.fw_cfg = spec.fw_cfg.clone();
    let console = machine.console_path();
    let qemu_log = dir.join("qemu.log");
    let mut cmd = machine.command()?;
    cmd.stdout(Stdio::null()).stderr(
        std::fs::File::create(&qemu_log)
            .with_context(|| format!("creating {}", qemu_log.display()))?,
    );
    let start = Instant::now();
    let mut child = cmd.spawn().context("starting QEMU")?;
    let mut run = BootRun::default();
    loop {
        let elapsed = start.elapsed();
        let exited = matches!(child.try_wait(), Ok(Some(_)));
        run.console = std::fs::read(&console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        for marker in spec.markers {
            if run.at(marker).is_none() && run.console.contains(marker) {
                run.seen.push((marker.to_string(), elapsed));
            }
        }
        if exited {
            run.exited = true;
            break;
        }
        if (spec.done)(&run, elapsed) {
            break;
        }
        if elapsed > spec.timeout {
            run.timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(run)
}

/// Say why a boot did not reach its marker: what it waited for, and the console tail.
fn missed(what: &str, marker: &str, run: &BootRun, dir: &Path) -> anyhow::Error {
    let how = if run.timed_out {
        "timed out"
    } else if run.exited {
        "the VM stopped"
    } else {
        "gave up"
    };
    let tail: Vec<&str> = run.console.lines().collect();
    anyhow::anyhow!(
        "{what}: {how} before `{marker}` appeared on the console (files in {}); the \
         console ended with:\n{}",
        dir.display(),
        tail[tail.len().saturating_sub(20)..].join("\n")
    )
}

/// `cargo xtask bench boot`.
pub fn bench(ctx: &mut Ctx) -> Result<()> {
    for arch in ctx.arches(&[Arch::Amd64])? {
        bench_arch(ctx, arch)?;
    }
    Ok(())
}

fn bench_arch(ctx: &mut Ctx, arch: Arch) -> Result<()> {
    let group = format!("boot {arch}");
    let image = ctx.built_image(arch)?;
    let scratch = ctx.dir.join("scratch").join(format!("boot-{arch}"));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let accel = qemu::probe_accel(arch, &scratch);
    let floor_disk = floor::disk(arch, &image, &ctx.dir.join("floor").join(arch.debian()))?;
    let peer = if arch == Arch::Amd64 {
        match ctx.peer() {
            Ok(p) => Some(p),
            Err(e) => {
                ctx.skip(format!("{group}: the peer"), format!("{e:#}"));
                None
            }
        }
    } else {
        ctx.skip(
            format!("{group}: the peer"),
            "the peer is amd64 only (debootstrap of a foreign architecture needs \
             qemu-user binfmt support)",
        );
        None
    };
    let primary = ctx
        .args
        .marker
        .clone()
        .unwrap_or_else(|| CONTAINERD_MARKER.to_string());
    let fw_cfg: Vec<(String, PathBuf)> = ctx
        .args
        .config
        .iter()
        .map(|c| (layout::FW_CFG_CONFIG.to_string(), c.clone()))
        .collect();

    let mut floor_t = Vec::new();
    let mut ours_t = Vec::new();
    let mut peer_t = Vec::new();
    let mut peer_rss = Vec::new();
    let mut peer_pss = Vec::new();
    let mut pid1_rss = Vec::new();
    // Whether our image printed the primary marker; None until the first run says.
    let mut primary_works: Option<bool> = None;
    let runs = ctx.args.runs;
    for n in 1..=runs {
        eprintln!("xtask: bench: {group}: run {n}/{runs} ({})", accel.name());

        let dir = scratch.join("floor");
        let run = boot(&BootSpec {
            arch,
            accel,
            disk: &floor_disk,
            dir: dir.clone(),
            fw_cfg: Vec::new(),
            markers: &[floor::MARKER],
            done: &|r, _| r.at(floor::MARKER).is_some(),
            timeout: Duration::from_secs(180),
        })?;
        floor_t.push(
            run.at(floor::MARKER)
                .ok_or_else(|| missed("the floor", floor::MARKER, &run, &dir))?,
        );

        let dir = scratch.join("ours");
        let only_fallback = primary_works == Some(false);
        let primary_ref = primary.as_str();
        let done = |r: &BootRun, elapsed: Duration| {
            r.at(primary_ref).is_some()
                || r.at(STAGE2_MARKER)
                    .is_some_and(|t| only_fallback || elapsed > t + FALLBACK_GRACE)
        };
        let run = boot(&BootSpec {
            arch,
            accel,
            disk: &image,
            dir: dir.clone(),
            fw_cfg: fw_cfg.clone(),
            markers: &[primary_ref, STAGE2_MARKER],
            done: &done,
            timeout: Duration::from_secs(300),
        })?;
        let t = match (run.at(primary_ref), run.at(STAGE2_MARKER)) {
            (Some(t), _) => {
                primary_works = Some(true);
                t
            }
            (None, Some(t)) if primary_works != Some(true) => {
                primary_works = Some(false);
                t
            }
            _ => return Err(missed("our image", primary_ref, &run, &dir)),
        };
        ours_t.push(t);
        if let Some(kb) = pid1_rss_kb(&run.console) {
            pid1_rss.push(kb as f64 * 1024.0);
        }

        if let Some(p) = &peer {
            let dir = scratch.join("peer");
            let run = boot(&BootSpec {
                arch,
                accel,
                disk: &p.disk,
                dir: dir.clone(),
                fw_cfg: Vec::new(),
                markers: &[peer::READY_MARKER, peer::RSS_MARKER],
                done: &|r, _| r.at(peer::RSS_MARKER).is_some(),
                timeout: Duration::from_secs(400),
            })?;
            peer_t.push(
                run.at(peer::READY_MARKER)
                    .ok_or_else(|| missed("the peer", peer::READY_MARKER, &run, &dir))?,
            );
            if let Some((rss, pss)) = peer::parse_rss(&run.console) {
                peer_rss.push(rss as f64);
                peer_pss.push(pss as f64);
            }
        }
    }

    let floor_ref = Stats::durations(&floor_t).map(|stats| Reference {
        name: "floor (trivial init)".into(),
        stats,
    });
    let peer_ref = Stats::durations(&peer_t).map(|stats| Reference {
        name: "peer (Debian+systemd)".into(),
        stats,
    });
    if let Some(r) = &floor_ref {
        ctx.figures.push(
            Figure::new(
                &group,
                "floor: QEMU start to a trivial init's line",
                Unit::Seconds,
                r.stats.clone(),
                None,
            )
            .note(
                "the reference for boot times: same firmware, systemd-boot, kernel and QEMU flags",
            ),
        );
    }
    let marker_used = if primary_works == Some(true) {
        primary.clone()
    } else {
        STAGE2_MARKER.to_string()
    };
    let fallback_note = (primary_works != Some(true)).then(|| {
        format!(
            "our image does not print `{primary}` yet: timed to `{STAGE2_MARKER}` instead; \
             the target (boot to containerd ready) is not judged"
        )
    });
    if let Some(stats) = Stats::durations(&ours_t) {
        let name = format!("ours: QEMU start to `{marker_used}`");
        for (reference, max_ratio) in [(floor_ref.clone(), 1.5), (peer_ref.clone(), 0.5)] {
            let Some(reference) = reference else { continue };
            let mut f = Figure::new(&group, &name, Unit::Seconds, stats.clone(), Some(reference));
            if fallback_note.is_none() {
                f = f.target(None, Some(max_ratio));
            }
            if let Some(note) = &fallback_note {
                f = f.note(note.clone());
            }
            ctx.figures.push(f);
        }
    }
    if let Some(stats) = Stats::durations(&peer_t) {
        ctx.figures.push(Figure::new(
            &group,
            "peer: QEMU start to `ctr version` answering",
            Unit::Seconds,
            stats,
            floor_ref.clone(),
        ));
    }
    let peer_mem = Stats::of(&peer_rss).map(|stats| Reference {
        name: "peer init + system daemons".into(),
        stats,
    });
    if let Some(r) = &peer_mem {
        let pss = Stats::of(&peer_pss).map_or(0.0, |s| s.median);
        ctx.figures.push(
            Figure::new(
                &group,
                "peer: RSS of PID 1 + systemd-* + containerd at idle",
                Unit::Bytes,
                r.stats.clone(),
                None,
            )
            .note(format!(
                "the reference for memory; measured 10 s after containerd answers; PSS {:.1} MiB",
                pss / 1048576.0
            )),
        );
    }
    match Stats::of(&pid1_rss) {
        Some(stats) => ctx.figures.push(
            Figure::new(
                &group,
                "ours: RSS of PID 1 at idle",
                Unit::Bytes,
                stats,
                peer_mem,
            )
            .target(Some(8.0 * 1048576.0), None),
        ),
        None => ctx.skip(
            format!("{group}: RSS of PID 1 at idle (target <= 8 MiB)"),
            format!(
                "not measurable yet: stage 2 prints no memory line (the bench reads \
                 `{PID1_RSS_KEY}<N>` from the console) and machined's API does not exist yet"
            ),
        ),
    }
    ctx.skip(
        format!("{group}: RSS of PID 1 + machined (target <= 20 MiB, <= 0.3x the peer)"),
        "not measurable yet: needs machined running in the image",
    );
    Ok(())
}

/// PID 1's RSS from a console line `... pid1 rss_kb=<N> ...` (the last one printed).
pub fn pid1_rss_kb(console: &str) -> Option<u64> {
    console.lines().rev().find_map(|l| {
        let rest = &l[l.find(PID1_RSS_KEY)? + PID1_RSS_KEY.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid1_rss_line() {
        assert_eq!(
            pid1_rss_kb("x\ninit: idle pid1 rss_kb=5120 services=3\n"),
            Some(5120)
        );
        assert_eq!(
            pid1_rss_kb("pid1 rss_kb=1\npid1 rss_kb=2\n"),
            Some(2),
            "the last line wins"
        );
        assert_eq!(pid1_rss_kb("KEELSON STAGE2 READY\n"), None);
    }
}
