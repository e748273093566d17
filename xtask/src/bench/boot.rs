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
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use keelson_cluster::cold_boot::ColdBoots;
use keelson_cluster::qemu::{self, Accel, Machine};
use keelson_configs::layout::{self, Arch};

use super::{BootReference, Ctx, Figure, Reference, Stats, Unit, floor, node, peer};

/// Guest memory for every machine of the comparison.
pub const MEMORY_MIB: u32 = 2048;
/// The ready line of init's stage 2 today.
pub const STAGE2_MARKER: &str = "KEELSON STAGE2 READY";
/// The ready line once init supervises containerd.
pub const CONTAINERD_MARKER: &str = "service containerd ready";
/// init's first line: where the firmware's and the kernel's part of our boot ends.
pub const STAGE1_MARKER: &str = "keelson-init: stage 1 started";
/// The console line the bench reads PID 1's memory from, once stage 2 prints it:
/// `pid1 rss_kb=<N>`.
pub const PID1_RSS_KEY: &str = "pid1 rss_kb=";
/// What starts a stage 2 phase record on the console: `keelson-init: phase NAME took N ms`.
pub const PHASE_KEY: &str = "keelson-init: phase ";
/// How long a VM may run past its watch's timeout (measurements through its API).
const VM_AFTER_WATCH: Duration = Duration::from_secs(1200);
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
    /// Each complete console line with the time it was first seen (to the poll's 20 ms),
    /// for finding where a boot's time goes.
    pub timed_lines: Vec<(Duration, String)>,
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
    /// Extra QEMU arguments (a network device).
    pub extra: Vec<String>,
    /// Console markers to time.
    pub markers: &'a [&'a str],
    /// Stop as soon as this says so (given what was seen so far).
    pub done: &'a dyn Fn(&BootRun, Duration) -> bool,
    /// Hard limit.
    pub timeout: Duration,
}

/// A running QEMU, killed when dropped.
pub struct Vm {
    qemu: ColdBoots,
    start: Instant,
    console: PathBuf,
}

/// What a VM may need beyond [`BootSpec`]; the default is [`Vm::start`]'s: a disk of the
/// image's own size, and a guest reboot ends QEMU.
#[derive(Debug, Clone, Copy, Default)]
pub struct VmOptions {
    /// The overlay's size in bytes (None: the image's).
    pub disk_bytes: Option<u64>,
    /// Let the guest reboot, each time as a cold boot: QEMU exits and is started again
    /// on the same disk and firmware variables ([`keelson_cluster::cold_boot`]; a warm
    /// reset under TCG sometimes costs 20-35 s more, which no reboot of ours causes).
    pub allow_reboot: bool,
}

impl Vm {
    /// Start the machine of `spec` (its directory is cleared first).
    pub fn start(spec: &BootSpec<'_>) -> Result<Vm> {
        Vm::start_with(spec, VmOptions::default())
    }

    /// [`Vm::start`] with a disk size and reboots of `options`.
    pub fn start_with(spec: &BootSpec<'_>, options: VmOptions) -> Result<Vm> {
        let dir = &spec.dir;
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let overlay = dir.join("disk.qcow2");
        qemu::create_overlay(spec.disk, &overlay, options.disk_bytes)?;
        let mut machine = Machine::new(spec.arch, spec.accel, overlay, dir.clone());
        machine.memory_mib = MEMORY_MIB;
        // Every reboot ends QEMU; with reboots allowed, ColdBoots starts it again.
        machine.no_reboot = true;
        machine.console_append = true;
        machine.fw_cfg = spec.fw_cfg.clone();
        machine.extra = spec.extra.clone();
        let console = machine.console_path();
        let qemu_log = dir.join("qemu.log");
        let qemu_cmd = machine.command()?;
        let program = qemu_cmd.get_program().to_owned();
        let args: Vec<_> = qemu_cmd.get_args().map(ToOwned::to_owned).collect();
        let envs: Vec<_> = qemu_cmd
            .get_envs()
            .map(|(k, v)| (k.to_owned(), v.map(ToOwned::to_owned)))
            .collect();
        let limit = (spec.timeout + VM_AFTER_WATCH).as_secs();
        let spawn = move || {
            // Under `timeout` too, so that QEMU ends even if this process dies before its
            // Drop runs (the measurements after the watch are bounded well within it).
            let mut cmd = Command::new("timeout");
            cmd.arg(limit.to_string())
                .arg(&program)
                .args(&args)
                .stdin(Stdio::null());
            for (key, value) in &envs {
                match value {
                    Some(v) => cmd.env(key, v),
                    None => cmd.env_remove(key),
                };
            }
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&qemu_log)?;
            cmd.stdout(Stdio::null()).stderr(log).spawn()
        };
        let start = Instant::now();
        let qemu = ColdBoots::start(Box::new(spawn), &console, options.allow_reboot)
            .context("starting QEMU")?;
        Ok(Vm {
            qemu,
            start,
            console,
        })
    }

    /// The console so far.
    pub fn console(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Watch the console for `spec`'s markers until `spec.done`, the VM's exit or the
    /// timeout (times are from QEMU's start).
    pub fn watch(&mut self, spec: &BootSpec<'_>) -> BootRun {
        let mut run = BootRun::default();
        loop {
            let elapsed = self.start.elapsed();
            let exited = self.qemu.exited().is_some();
            run.console = self.console();
            let complete = run.console.matches('\n').count();
            if complete > run.timed_lines.len() {
                let new: Vec<(Duration, String)> = run
                    .console
                    .split('\n')
                    .skip(run.timed_lines.len())
                    .take(complete - run.timed_lines.len())
                    .map(|line| (elapsed, line.trim_end_matches('\r').to_string()))
                    .collect();
                run.timed_lines.extend(new);
            }
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
        let timed: String = run
            .timed_lines
            .iter()
            .map(|(t, line)| format!("{:8.2} {line}\n", t.as_secs_f64()))
            .collect();
        let path = self.console.with_extension("timed");
        if let Err(e) = std::fs::write(&path, timed) {
            eprintln!("xtask: bench: cannot write {}: {e}", path.display());
        }
        run
    }
}

/// Boot a machine, time its markers, and stop it (it is always stopped on return).
pub fn boot(spec: &BootSpec<'_>) -> Result<BootRun> {
    let mut vm = Vm::start(spec)?;
    Ok(vm.watch(spec))
}

/// Say why a boot did not reach its marker: what it waited for, and the console tail.
pub fn missed(what: &str, marker: &str, run: &BootRun, dir: &Path) -> anyhow::Error {
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
    let without = |r| ctx.args.without.contains(&r);
    let (skip_floor, skip_peer) = (without(BootReference::Floor), without(BootReference::Peer));
    let peer = if skip_peer {
        None
    } else if arch == Arch::Amd64 {
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
    // Our node gets a config (containerd starts only with one) and its API on a
    // loopback port, through which machined's memory is read at idle.
    let bin = crate::cluster::machinectl()?;
    let files = node::prepare(&bin, &scratch.join("node"))?;
    let config = ctx
        .args
        .config
        .clone()
        .unwrap_or_else(|| files.configs[0].clone());
    let fw_cfg = vec![(layout::FW_CFG_CONFIG.to_string(), config)];

    let mut floor_t = Vec::new();
    let mut ours_t = Vec::new();
    let mut ours_own_t = Vec::new();
    // Stage 2's own phase records (`phase NAME took N ms`), by phase, in first-seen order.
    let mut phases: Vec<(String, Vec<Duration>)> = Vec::new();
    let mut peer_t = Vec::new();
    let mut peer_rss = Vec::new();
    let mut peer_pss = Vec::new();
    let mut pid1_rss = Vec::new();
    let mut both_rss = Vec::new();
    let mut containerd_rss = Vec::new();
    let mut peer_daemons = Vec::new();
    let mut machined_error = None;
    // Whether our image printed the primary marker; None until the first run says.
    let mut primary_works: Option<bool> = None;
    let runs = ctx.args.runs;
    for n in 1..=runs {
        eprintln!("xtask: bench: {group}: run {n}/{runs} ({})", accel.name());

        let dir = scratch.join("floor");
        if !skip_floor {
            let run = boot(&BootSpec {
                arch,
                accel,
                disk: &floor_disk,
                dir: dir.clone(),
                fw_cfg: Vec::new(),
                extra: Vec::new(),
                markers: &[floor::MARKER],
                done: &|r, _| r.at(floor::MARKER).is_some(),
                timeout: Duration::from_secs(180),
            })?;
            floor_t.push(
                run.at(floor::MARKER)
                    .ok_or_else(|| missed("the floor", floor::MARKER, &run, &dir))?,
            );
        }

        let dir = scratch.join("ours");
        let only_fallback = primary_works == Some(false);
        let primary_ref = primary.as_str();
        // After the ready line, the idle report (PID 1's memory) follows within a
        // minute: every service ready, then 10 s quiet.
        let done = |r: &BootRun, elapsed: Duration| {
            r.console.contains(PID1_RSS_KEY)
                || r.at(primary_ref)
                    .is_some_and(|t| elapsed > t + FALLBACK_GRACE)
                || r.at(STAGE2_MARKER)
                    .is_some_and(|t| only_fallback || elapsed > t + FALLBACK_GRACE)
        };
        let spec = BootSpec {
            arch,
            accel,
            disk: &image,
            dir: dir.clone(),
            fw_cfg: fw_cfg.clone(),
            extra: files.qemu_net(),
            markers: &[primary_ref, STAGE2_MARKER, STAGE1_MARKER],
            done: &done,
            timeout: Duration::from_secs(420),
        };
        let mut vm = Vm::start(&spec)?;
        let run = vm.watch(&spec);
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
        if let Some(s1) = run.at(STAGE1_MARKER) {
            ours_own_t.push(t.saturating_sub(s1));
        }
        for (name, took) in phase_records(&run.console) {
            match phases.iter_mut().find(|(n, _)| *n == name) {
                Some((_, runs)) => runs.push(took),
                None => phases.push((name, vec![took])),
            }
        }
        if let Some(kb) = pid1_rss_kb(&run.console) {
            pid1_rss.push(kb as f64 * 1024.0);
            let processes = node::wait_api(&bin, &files, Duration::from_secs(60))
                .and_then(|()| node::processes_json(&bin, &files));
            match processes.and_then(|json| Ok((node::rss_kb(&json, "machined")?, json))) {
                Ok((machined, json)) => {
                    both_rss.push((kb + machined) as f64 * 1024.0);
                    // For the record only: without containerd's row the rest still counts.
                    if let Ok(containerd) = node::rss_kb(&json, "containerd") {
                        containerd_rss.push(containerd as f64 * 1024.0);
                    }
                }
                Err(e) => machined_error = Some(format!("{e:#}")),
            }
        }
        drop(vm);

        if let Some(p) = &peer {
            let dir = scratch.join("peer");
            let run = boot(&BootSpec {
                arch,
                accel,
                disk: &p.disk,
                dir: dir.clone(),
                fw_cfg: Vec::new(),
                extra: Vec::new(),
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
            peer_daemons.extend(peer::parse_rss_without_containerd(&run.console).map(|b| b as f64));
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
    if let Some(stats) = Stats::durations(&ours_own_t) {
        ctx.figures.push(
            Figure::new(
                &group,
                &format!("ours: init's part, stage 1 start to `{marker_used}`"),
                Unit::Seconds,
                stats,
                None,
            )
            .note(
                "for the record: the part of our boot that is init's own, without the \
                 firmware's and the kernel's (whose time varies most from run to run)",
            ),
        );
    }
    for (name, runs) in &phases {
        if let Some(stats) = Stats::durations(runs) {
            ctx.figures.push(
                Figure::new(
                    &group,
                    &format!("ours: stage 2 phase `{name}`"),
                    Unit::Seconds,
                    stats,
                    None,
                )
                .note(
                    "for the record: PID 1's own record of the phase (its span's close, the \
                     line `machinectl logs init` shows too)",
                ),
            );
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
                None,
            )
            .target(Some(8.0 * 1048576.0), None)
            .note("from init's idle report `idle pid1 rss_kb=N` (every service ready, 10 s later)"),
        ),
        None => ctx.skip(
            format!("{group}: RSS of PID 1 at idle (target <= 8 MiB)"),
            format!(
                "init printed no idle report (`{PID1_RSS_KEY}<N>`) within a minute of \
                 `{primary}`: see the console in {}",
                scratch.join("ours").display()
            ),
        ),
    }
    let peer_daemons = Stats::of(&peer_daemons).map(|stats| Reference {
        name: "peer PID 1 + systemd-* (no containerd)".into(),
        stats,
    });
    match Stats::of(&both_rss) {
        Some(stats) => {
            let whole = peer_mem.as_ref().filter(|r| r.stats.median > 0.0).map(|r| {
                format!(
                    "; {:.2}x the peer's figure with containerd",
                    stats.median / r.stats.median
                )
            });
            ctx.figures.push(
                Figure::new(
                    &group,
                    "ours: RSS of PID 1 + machined at idle",
                    Unit::Bytes,
                    stats,
                    peer_daemons,
                )
                .target(Some(20.0 * 1048576.0), Some(0.3))
                .note(format!(
                    "PID 1 from its idle report, machined through `machinectl get processes` \
                     right after; containerd, which both run, is left out on both sides{}",
                    whole.unwrap_or_default()
                )),
            );
        }
        None => ctx.skip(
            format!("{group}: RSS of PID 1 + machined (target <= 20 MiB, <= 0.3x the peer)"),
            machined_error.unwrap_or_else(|| "no idle report from PID 1".into()),
        ),
    }
    if let Some(stats) = Stats::of(&containerd_rss) {
        ctx.figures.push(
            Figure::new(
                &group,
                "ours: containerd RSS at idle",
                Unit::Bytes,
                stats,
                None,
            )
            .note(
                "from the `machinectl get processes` answer machined's comes from; for the record: \
                 Debian's containerd, Go's default GC",
            ),
        );
    }
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

/// The phases stage 2 recorded on the console, in order: each `keelson-init: phase NAME
/// took N ms` line (the close of a phase's span; init's `logging::phase_line`).
pub fn phase_records(console: &str) -> Vec<(String, Duration)> {
    console
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(PHASE_KEY)? + PHASE_KEY.len()..];
            let (name, rest) = rest.split_once(" took ")?;
            let ms = rest
                .strip_suffix(" ms")
                .or_else(|| rest.split(" ms ").next())?;
            Some((
                name.to_string(),
                Duration::from_millis(ms.trim().parse().ok()?),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_records_from_the_console() {
        let console = "keelson-init: phase mounts took 12 ms\r\n\
                       containerd: phase x took 5 ms is not ours\n\
                       keelson-init: phase booting took 1500 ms\n\
                       keelson-init: phase starting_containerd took 1380 ms state=/dev/vda4\n\
                       keelson-init: phase broken took soon\n";
        assert_eq!(
            phase_records(console),
            [
                ("mounts".to_string(), Duration::from_millis(12)),
                ("booting".to_string(), Duration::from_millis(1500)),
                (
                    "starting_containerd".to_string(),
                    Duration::from_millis(1380)
                ),
            ]
        );
    }

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
