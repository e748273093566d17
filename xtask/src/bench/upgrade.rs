//! `cargo xtask bench upgrade`: how long an upgrade by A/B image swap takes, from the
//! call to the new version answering, beside a plain reboot to API of the same node in
//! the same run (issue 18's target: at most 1.3x the reboot). Each run boots one VM:
//!
//! 1. the suite's v1 image (`target/images/amd64/keelson.raw`) through a 4 GiB qcow2
//!    overlay (EPHEMERAL holds the upgrade's spool, the bundle's ~75 MB, which the
//!    image's own size leaves no room for), guest reboots passed through (no
//!    `-no-reboot`), a control-plane config through `fw_cfg`, the node API on a loopback
//!    port ([`super::node`]); the bench waits for init's idle report and for slot a to
//!    be blessed;
//! 2. **reboot to API** (the reference): `machinectl reboot`, timed from the call until
//!    `machinectl version` answers from the next boot (the console shows stage 1 once
//!    more), looked at every 2 s as machinectl's own wait after an upgrade does;
//! 3. the idle report of that boot, so that the upgrade starts from a node as settled
//!    as the reboot did;
//! 4. **upgrade to API**: the wall time of the whole `machinectl upgrade --image <v2
//!    bundle>` (`target/images/amd64-v2/keelson-amd64.bundle`, from `cargo xtask
//!    upgrade-inputs`): it streams the bundle, the node checks it, writes and verifies
//!    slot b, writes its entry and reboots, and machinectl waits until `version` answers
//!    with v2 from slot b. Each line machinectl prints is timed (kept in the VM's
//!    directory as `machinectl-upgrade.timed`), which splits the figure at its `write:`
//!    line (the transfer and checks are over) and at `the node is rebooting into it`;
//! 5. slot b's blessing, then the phases the node recorded (`upgrade status -o json`:
//!    `attempt.phases[].took_ms`, each the time since the phase before; the first,
//!    `transfer`, has none).
//!
//! Every console line of the run is timed on the host ([`ConsoleClock`], kept in the
//! VM's directory as `console.run.timed`), so that each reboot's span from PID 1's
//! `reboot: now` to the next boot's stage 1 (firmware, systemd-boot, kernel) is a figure
//! of its own: the part of both reboots that no code of ours runs in.

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use keelson_cluster::qemu;
use keelson_configs::layout::{self, Arch};
use keelson_upgrade::bundle::{BundleParser, Event, ParserLimits};
use serde_json::Value;

use super::boot::{self, BootRun, BootSpec, PID1_RSS_KEY, STAGE1_MARKER, Vm, VmOptions};
use super::node::{self, NodeFiles};
use super::{Ctx, Figure, Reference, Stats, Unit};

/// The VM's disk: room on EPHEMERAL for the upgrade's spool (as `tests/tests/upgrade.rs`).
const DISK_BYTES: u64 = 4 << 30;
/// One boot to the idle report, or to a blessing, under software emulation.
const BOOT_TIMEOUT: Duration = Duration::from_secs(480);
/// How long the idle report of a boot after the first is waited for (the upgrade then
/// starts without it, and the run's note says so).
const IDLE_TIMEOUT: Duration = Duration::from_secs(180);
/// What `machinectl upgrade --wait` gets, and how much longer its process may run
/// (the transfer, write and verify come before the wait).
const UPGRADE_WAIT: &str = "15m";
const UPGRADE_LIMIT: Duration = Duration::from_secs(20 * 60);
/// The pause between two looks at a rebooting node: machinectl's own after an upgrade
/// (`POLL_INTERVAL` of `machined/cli/src/upgrade.rs`), so both figures have the same
/// resolution.
const POLL: Duration = Duration::from_secs(2);
/// One look's bound: machinectl's own (`ATTEMPT_TIMEOUT`).
const LOOK_LIMIT: Duration = Duration::from_secs(5);
/// The line machinectl prints when the node has the new slot written and reboots.
const REBOOTING_LINE: &str = "the node is rebooting into it";
/// The line machinectl prints when the node answers with the new version.
const ANSWERS_LINE: &str = " answers from slot ";
/// What starts machinectl's line when the node begins to write slot b (the transfer and
/// its checks are over).
const WRITE_LINE: &str = ": write: ";
/// PID 1's last line before the kernel restarts the machine.
const REBOOT_NOW: &str = "keelson-init: reboot: now";
/// How often [`ConsoleClock`] reads the console.
const CLOCK_TICK: Duration = Duration::from_millis(100);

/// The upgrade inputs: the suite's v1 image and the v2 bundle, with v2's version.
struct Inputs {
    image: PathBuf,
    bundle: PathBuf,
    version: String,
}

impl Inputs {
    /// The suite's image and `cargo xtask upgrade-inputs`' v2 bundle, which must exist.
    fn find(arch: Arch) -> Result<Inputs> {
        let image = crate::image::image_dir(arch).join("keelson.raw");
        if !image.is_file() {
            bail!(
                "no v1 image at {}: build it with `cargo xtask image --arch {arch}` (or \
                 `cargo xtask test`, which builds the suite's images)",
                image.display()
            );
        }
        let bundle = crate::workspace_root()
            .join("target/images")
            .join(format!("{}-v2", arch.debian()))
            .join(crate::bundle::file_name(arch));
        if !bundle.is_file() {
            bail!(
                "no v2 bundle at {}: build it with `cargo xtask upgrade-inputs` (after the \
                 suite's image; `cargo xtask test` builds both)",
                bundle.display()
            );
        }
        let version = bundle_version(&bundle, arch)?;
        Ok(Inputs {
            image,
            bundle,
            version,
        })
    }
}

/// The version a bundle's manifest installs, read from its header alone; the bundle
/// must be for `arch`.
fn bundle_version(path: &Path, arch: Arch) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut parser = BundleParser::new(ParserLimits::default());
    let mut buf = vec![0u8; 128 << 10];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            bail!(
                "{} ended before its manifest: rebuild it with `cargo xtask upgrade-inputs`",
                path.display()
            );
        }
        let events = parser
            .feed(&buf[..n])
            .with_context(|| format!("reading the bundle {}", path.display()))?;
        if let Some(Event::Header(header)) = events.into_iter().next() {
            let manifest = header.manifest;
            if manifest.arch != arch.debian() {
                bail!(
                    "{} is a bundle for {}, not {arch}",
                    path.display(),
                    manifest.arch
                );
            }
            return Ok(manifest.version);
        }
    }
}

/// A command's run: its status, each line of its standard output with the time since
/// it was started, its standard error and its whole wall time.
struct TimedOutput {
    status: ExitStatus,
    lines: Vec<(Duration, String)>,
    stderr: String,
    took: Duration,
}

impl TimedOutput {
    /// When the first line containing `text` was printed.
    fn at(&self, text: &str) -> Option<Duration> {
        self.lines
            .iter()
            .find_map(|(t, line)| line.contains(text).then_some(*t))
    }

    /// The first line containing `text`.
    fn line(&self, text: &str) -> Option<&str> {
        self.lines
            .iter()
            .find_map(|(_, line)| line.contains(text).then_some(line.as_str()))
    }

    /// Everything it printed, for an error.
    fn shown(&self) -> String {
        let out: Vec<&str> = self.lines.iter().map(|(_, l)| l.as_str()).collect();
        format!("{}\n{}", out.join("\n"), self.stderr)
    }
}

/// Run `cmd`, timing each line of its standard output (echoed to the terminal).
fn run_timed(mut cmd: Command, label: &str) -> Result<TimedOutput> {
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {label}"))?;
    let stderr = child.stderr.take();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = stderr {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    });
    let mut lines = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.with_context(|| format!("reading {label}'s output"))?;
            eprintln!("xtask: bench: {label}: {line}");
            lines.push((started.elapsed(), line));
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {label}"))?;
    let took = started.elapsed();
    Ok(TimedOutput {
        status,
        lines,
        stderr: stderr.join().unwrap_or_default(),
        took,
    })
}

/// Every console line of a VM with the host time it was first seen, from the VM's start
/// to the end of the run, across the guest's reboots ([`Vm::watch`] times the first boot
/// alone). The lines are written to `console.run.timed` beside the console.
struct ConsoleClock {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<(Duration, String)>>>,
    out: PathBuf,
}

impl ConsoleClock {
    /// Start timing `console` (a VM's `console.log`, started a moment before).
    fn start(console: PathBuf) -> ConsoleClock {
        let stop = Arc::new(AtomicBool::new(false));
        let out = console.with_extension("run.timed");
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut lines: Vec<(Duration, String)> = Vec::new();
            loop {
                let last_look = stopped.load(Ordering::Relaxed);
                let text = std::fs::read(&console)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                let at = started.elapsed();
                // The last piece is a line not yet ended (or empty).
                let pieces: Vec<&str> = text.split('\n').collect();
                let complete = &pieces[..pieces.len() - 1];
                lines.extend(
                    complete[lines.len().min(complete.len())..]
                        .iter()
                        .map(|l| (at, l.trim_end_matches('\r').to_string())),
                );
                if last_look {
                    return lines;
                }
                std::thread::sleep(CLOCK_TICK);
            }
        });
        ConsoleClock {
            stop,
            thread: Some(thread),
            out,
        }
    }

    /// Stop, write `console.run.timed`, and return the timed lines.
    fn finish(mut self) -> Vec<(Duration, String)> {
        self.stop.store(true, Ordering::Relaxed);
        let lines = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        write_timed(&self.out, &lines);
        lines
    }
}

impl Drop for ConsoleClock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Keep timed lines in `path`, each as `<seconds> <line>` (as `console.timed`).
fn write_timed(path: &Path, lines: &[(Duration, String)]) {
    let text: String = lines
        .iter()
        .map(|(t, line)| format!("{:8.2} {line}\n", t.as_secs_f64()))
        .collect();
    if let Err(e) = std::fs::write(path, text) {
        eprintln!("xtask: bench: cannot write {}: {e}", path.display());
    }
}

/// Each reboot's span on a timed console: from PID 1's [`REBOOT_NOW`] to the next
/// boot's [`STAGE1_MARKER`] (firmware, systemd-boot, the kernel and its initramfs).
fn reboot_spans(lines: &[(Duration, String)]) -> Vec<Duration> {
    let mut spans = Vec::new();
    let mut rebooting: Option<Duration> = None;
    for (t, line) in lines {
        if line.contains(REBOOT_NOW) {
            rebooting = Some(*t);
        } else if line.contains(STAGE1_MARKER)
            && let Some(from) = rebooting.take()
        {
            spans.push(t.saturating_sub(from));
        }
    }
    spans
}

/// How many console lines contain `marker` (one per boot for init's stage 1 line and
/// its idle report).
fn count_lines(console: &str, marker: &str) -> usize {
    console.lines().filter(|l| l.contains(marker)).count()
}

/// Whether `upgrade status -o json` (one node) says `slot` is booted and blessed.
fn booted_and_blessed(status: &Value, slot: &str) -> bool {
    status[0]["slots"].as_array().is_some_and(|slots| {
        slots
            .iter()
            .any(|s| s["slot"] == slot && s["booted"] == true && s["blessed"] == true)
    })
}

/// The phases of the newest attempt in `upgrade status -o json` (one node): each name
/// with its `took_ms` (None for the first, whose start is not recorded).
fn phase_times(status: &Value) -> Vec<(String, Option<u64>)> {
    status[0]["attempt"]["phases"]
        .as_array()
        .map(|phases| {
            phases
                .iter()
                .filter_map(|p| Some((p["phase"].as_str()?.to_string(), p["took_ms"].as_u64())))
                .collect()
        })
        .unwrap_or_default()
}

/// The node's `version -o json` answer: its version and slot.
fn version_and_slot(answer: &Value) -> (String, String) {
    let field = |key: &str| answer[0][key].as_str().unwrap_or_default().to_string();
    (field("version"), field("slot"))
}

/// A node booted for one run, with what the bench needs to talk to it.
struct Booted<'a> {
    vm: Vm,
    bin: &'a Path,
    files: &'a NodeFiles,
    dir: PathBuf,
}

impl Booted<'_> {
    /// An error with the console's tail.
    fn fail(&self, what: String) -> anyhow::Error {
        anyhow::anyhow!(
            "{what} (files in {}); the console ended with:\n{}",
            self.dir.display(),
            qemu::console_tail(&self.dir.join("console.log"), 30)
        )
    }

    /// `machinectl ARGS -o json` as JSON, or None when the node does not answer.
    fn json(&self, args: &[&str]) -> Result<Option<Value>> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = node::machinectl(self.bin, self.files, &all)?;
        if !out.status.success() {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("reading `machinectl {}`: {text}", all.join(" ")))
    }

    /// Wait until `slot` is booted and blessed; the status that said so.
    fn wait_blessed(&self, slot: &str) -> Result<Value> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let status = self.json(&["upgrade", "status"])?;
            if let Some(status) = status.filter(|s| booted_and_blessed(s, slot)) {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(self.fail(format!(
                    "slot {slot} was not booted and blessed within {} s",
                    BOOT_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Wait until the node answers `version` from a boot after the `boots`-th (the
    /// console shows stage 1 once more), looking every [`POLL`].
    fn wait_rebooted(&self, boots: usize) -> Result<()> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if count_lines(&self.vm.console(), STAGE1_MARKER) > boots {
                let look = node::machinectl_command(
                    self.bin,
                    self.files,
                    &["version", "-o", "json"],
                    LOOK_LIMIT,
                )
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .context("running machinectl version")?;
                if look.success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(self.fail(format!(
                    "the node did not answer `version` within {} s of `machinectl reboot`",
                    BOOT_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Wait for the idle report of the `boots`-th boot; whether it came.
    fn wait_idle(&self, boots: usize) -> bool {
        let deadline = Instant::now() + IDLE_TIMEOUT;
        while Instant::now() < deadline {
            if count_lines(&self.vm.console(), PID1_RSS_KEY) >= boots {
                return true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        false
    }
}

/// What one run measured.
struct UpgradeRun {
    reboot: Duration,
    upgrade: TimedOutput,
    phases: Vec<(String, Option<u64>)>,
    /// [`reboot_spans`]: the plain reboot's, then the upgrade's.
    spans: Vec<Duration>,
    /// Whether the upgrade started without the idle report of the boot before it.
    not_idle: bool,
}

fn run_once(ctx: &Ctx, bin: &Path, inputs: &Inputs, files: &NodeFiles) -> Result<UpgradeRun> {
    let arch = Arch::Amd64;
    let scratch = ctx.dir.join("scratch").join("upgrade");
    let dir = scratch.join("vm");
    let done = |r: &BootRun, _: Duration| r.console.contains(PID1_RSS_KEY);
    let spec = BootSpec {
        arch,
        accel: qemu::probe_accel(arch, &scratch),
        disk: &inputs.image,
        dir: dir.clone(),
        fw_cfg: vec![(layout::FW_CFG_CONFIG.to_string(), files.configs[0].clone())],
        extra: files.qemu_net(),
        markers: &[STAGE1_MARKER],
        done: &done,
        timeout: BOOT_TIMEOUT,
    };
    let options = VmOptions {
        disk_bytes: Some(DISK_BYTES),
        allow_reboot: true,
    };
    let mut vm = Vm::start_with(&spec, options)?;
    let clock = ConsoleClock::start(dir.join("console.log"));
    let first = vm.watch(&spec);
    if !first.console.contains(PID1_RSS_KEY) {
        return Err(boot::missed("the v1 node", PID1_RSS_KEY, &first, &dir));
    }
    let node = Booted {
        vm,
        bin,
        files,
        dir,
    };
    node::wait_api(bin, files, Duration::from_secs(60)).map_err(|e| node.fail(format!("{e:#}")))?;
    eprintln!("xtask: bench: upgrade: booted; waiting for slot a's blessing");
    node.wait_blessed("a")?;

    let boots = count_lines(&node.vm.console(), STAGE1_MARKER);
    eprintln!("xtask: bench: upgrade: machinectl reboot, until version answers again");
    let started = Instant::now();
    node::machinectl_ok(bin, files, &["reboot"])?;
    node.wait_rebooted(boots)?;
    let reboot = started.elapsed();
    eprintln!(
        "xtask: bench: upgrade: reboot to API {:.2} s; waiting for the idle report",
        reboot.as_secs_f64()
    );
    let not_idle = !node.wait_idle(boots + 1);

    let bundle = inputs.bundle.display().to_string();
    let args = ["upgrade", "--image", &bundle, "--wait", UPGRADE_WAIT];
    eprintln!("xtask: bench: upgrade: machinectl {}", args.join(" "));
    let cmd = node::machinectl_command(bin, files, &args, UPGRADE_LIMIT);
    let upgrade = run_timed(cmd, "machinectl upgrade")?;
    write_timed(&node.dir.join("machinectl-upgrade.timed"), &upgrade.lines);
    if !upgrade.status.success() {
        return Err(node.fail(format!(
            "machinectl upgrade failed ({}):\n{}",
            upgrade.status,
            upgrade.shown()
        )));
    }
    let answer = node.json(&["version"])?.ok_or_else(|| {
        node.fail("the node stopped answering `version` after the upgrade".into())
    })?;
    let (version, slot) = version_and_slot(&answer);
    if (version.as_str(), slot.as_str()) != (inputs.version.as_str(), "b") {
        return Err(node.fail(format!(
            "after the upgrade the node runs {version} from slot {slot}, not {} from slot b",
            inputs.version
        )));
    }
    eprintln!(
        "xtask: bench: upgrade: upgrade to API {:.2} s; waiting for slot b's blessing",
        upgrade.took.as_secs_f64()
    );
    let status = node.wait_blessed("b")?;
    Ok(UpgradeRun {
        reboot,
        upgrade,
        phases: phase_times(&status),
        spans: reboot_spans(&clock.finish()),
        not_idle,
    })
}

/// `cargo xtask bench upgrade` (amd64).
pub fn bench(ctx: &mut Ctx) -> Result<()> {
    let arch = Arch::Amd64;
    let group = format!("upgrade {arch}");
    let inputs = Inputs::find(arch)?;
    let bin = crate::cluster::machinectl()?;
    let scratch = ctx.dir.join("scratch").join("upgrade");
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let files = node::prepare(&bin, &scratch.join("node"))?;

    let mut reboot_t = Vec::new();
    let mut upgrade_t = Vec::new();
    let mut before_reboot_t = Vec::new();
    let mut after_reboot_t = Vec::new();
    let mut transfer_t = Vec::new();
    let mut plain_span_t = Vec::new();
    let mut upgrade_span_t = Vec::new();
    let mut answered = Vec::new();
    // The node's own phase records, by phase, in first-seen order.
    let mut phases: Vec<(String, Vec<Duration>)> = Vec::new();
    let mut not_idle = 0;
    let runs = ctx.args.runs;
    for n in 1..=runs {
        eprintln!(
            "xtask: bench: {group}: run {n}/{runs}: boot v1, reboot, upgrade to {}",
            inputs.version
        );
        let r = run_once(ctx, &bin, &inputs, &files)?;
        reboot_t.push(r.reboot);
        upgrade_t.push(r.upgrade.took);
        if let Some(t) = r.upgrade.at(REBOOTING_LINE) {
            before_reboot_t.push(t);
            after_reboot_t.push(r.upgrade.took.saturating_sub(t));
        }
        transfer_t.extend(r.upgrade.at(WRITE_LINE));
        if let [plain, upgrade] = r.spans[..] {
            plain_span_t.push(plain);
            upgrade_span_t.push(upgrade);
        }
        answered.extend(r.upgrade.line(ANSWERS_LINE).map(str::to_string));
        for (name, took) in r.phases {
            let Some(ms) = took else { continue };
            let took = Duration::from_millis(ms);
            match phases.iter_mut().find(|(n, _)| *n == name) {
                Some((_, samples)) => samples.push(took),
                None => phases.push((name, vec![took])),
            }
        }
        not_idle += usize::from(r.not_idle);
    }

    let Some(reboot) = Stats::durations(&reboot_t) else {
        return Ok(());
    };
    let reference = Reference {
        name: "plain reboot to API".into(),
        stats: reboot.clone(),
    };
    ctx.figures.push(
        Figure::new(
            &group,
            "reboot to API: `machinectl reboot` until `version` answers again",
            Unit::Seconds,
            reboot,
            None,
        )
        .note(format!(
            "the reference: the v1 node (slot a blessed, idle) rebooted through firmware and \
             systemd-boot; `version` looked at every {} s once the console shows stage 1 again",
            POLL.as_secs()
        )),
    );
    if let Some(stats) = Stats::durations(&upgrade_t) {
        let idle = if not_idle > 0 {
            format!(
                "; in {not_idle} run(s) the upgrade started without the idle report of the \
                 boot before it"
            )
        } else {
            String::new()
        };
        ctx.figures.push(
            Figure::new(
                &group,
                &format!(
                    "upgrade to API: `machinectl upgrade --image` {} until it answers from slot b",
                    inputs.version
                ),
                Unit::Seconds,
                stats,
                Some(reference.clone()),
            )
            .target(None, Some(1.3))
            .note(format!(
                "the whole command's wall time (stream, checks, write, verify, entry, reboot, \
                 machinectl's own wait, every 2 s); machinectl said: {}{idle}",
                answered.join(" | ")
            )),
        );
    }
    for (name, samples, note) in [
        (
            "upgrade: the call until the node reboots",
            &before_reboot_t,
            "machinectl's line `the node is rebooting into it`: the bundle streamed, checked, \
             slot b written and verified, its entry in place",
        ),
        (
            "upgrade: the node's reboot until it answers from slot b",
            &after_reboot_t,
            "from that line to the command's end; beside the plain reboot for the record",
        ),
    ] {
        if let Some(stats) = Stats::durations(samples) {
            ctx.figures.push(
                Figure::new(&group, name, Unit::Seconds, stats, Some(reference.clone())).note(note),
            );
        }
    }
    if let Some(stats) = Stats::durations(&transfer_t) {
        ctx.figures.push(
            Figure::new(
                &group,
                "upgrade: the call until the node writes (transfer and checks)",
                Unit::Seconds,
                stats,
                None,
            )
            .note(
                "host time from the call to machinectl's `write:` line: the bundle streamed \
                 into the node's spool and every part's sha256 matched (the node records no \
                 start for `transfer`)",
            ),
        );
    }
    let plain_span = Stats::durations(&plain_span_t).map(|stats| Reference {
        name: "the plain reboot's span".into(),
        stats,
    });
    for (name, samples, reference) in [
        (
            "plain reboot: `reboot: now` to stage 1",
            &plain_span_t,
            None,
        ),
        (
            "upgrade's reboot: `reboot: now` to stage 1",
            &upgrade_span_t,
            plain_span,
        ),
    ] {
        if let Some(stats) = Stats::durations(samples) {
            ctx.figures.push(
                Figure::new(&group, name, Unit::Seconds, stats, reference).note(
                    "host time between the two console lines (read every 0.1 s): the kernel's \
                     restart, the firmware, systemd-boot, the kernel and its initramfs",
                ),
            );
        }
    }
    for (name, samples) in &phases {
        if let Some(stats) = Stats::durations(samples) {
            ctx.figures.push(
                Figure::new(
                    &group,
                    &format!("node phase `{name}`"),
                    Unit::Seconds,
                    stats,
                    None,
                )
                .note(
                    "the node's record (`upgrade status -o json`: attempt.phases[].took_ms, \
                     the time since the phase before; `transfer`, the first, has none)",
                ),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn blessed_slot_from_the_status() {
        let s = status(
            r#"[{"node":"n","slots":[
                {"slot":"a","blessed":true,"booted":true},
                {"slot":"b","blessed":false,"booted":false,"entry":""}],
                "attempt":null,"failed":[]}]"#,
        );
        assert!(booted_and_blessed(&s, "a"));
        assert!(!booted_and_blessed(&s, "b"));
        let trial = status(r#"[{"slots":[{"slot":"b","blessed":false,"booted":true}]}]"#);
        assert!(!booted_and_blessed(&trial, "b"));
        assert!(!booted_and_blessed(&status("[]"), "a"));
    }

    #[test]
    fn phases_from_the_status() {
        let s = status(
            r#"[{"attempt":{"outcome":"blessed","phases":[
                {"phase":"transfer","at_ms":1000,"took_ms":null},
                {"phase":"write","at_ms":5250,"took_ms":4250},
                {"phase":"healthy","at_ms":9000,"took_ms":3750}]}}]"#,
        );
        assert_eq!(
            phase_times(&s),
            [
                ("transfer".to_string(), None),
                ("write".to_string(), Some(4250)),
                ("healthy".to_string(), Some(3750)),
            ]
        );
        assert!(phase_times(&status(r#"[{"attempt":null}]"#)).is_empty());
    }

    #[test]
    fn version_answer() {
        let v = status(r#"[{"node":"n","version":"0.2.0","slot":"b"}]"#);
        assert_eq!(version_and_slot(&v), ("0.2.0".into(), "b".into()));
        assert_eq!(
            version_and_slot(&status("[]")),
            (String::new(), String::new())
        );
    }

    #[test]
    fn reboot_spans_on_a_timed_console() {
        let at = |s: f64, line: &str| (Duration::from_secs_f64(s), line.to_string());
        let lines = [
            at(8.0, STAGE1_MARKER),
            at(20.0, REBOOT_NOW),
            at(20.1, "[   22.4] reboot: Restarting system"),
            at(32.5, STAGE1_MARKER),
            at(70.0, REBOOT_NOW),
            at(79.0, &format!("{STAGE1_MARKER} (keelson-init 0.2.0)")),
            at(90.0, "keelson-init: power off: now"),
        ];
        assert_eq!(
            reboot_spans(&lines),
            [Duration::from_millis(12_500), Duration::from_secs(9)]
        );
    }

    #[test]
    fn console_clock_times_lines_across_writes() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        std::fs::write(&console, "first\r\nhalf").unwrap();
        let clock = ConsoleClock::start(console.clone());
        std::thread::sleep(CLOCK_TICK * 3);
        std::fs::write(&console, "first\r\nhalf a line\nthird\n").unwrap();
        std::thread::sleep(CLOCK_TICK * 3);
        let lines = clock.finish();
        let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(text, ["first", "half a line", "third"]);
        assert!(lines[1].0 > lines[0].0, "{lines:?}");
        let kept = std::fs::read_to_string(dir.path().join("console.run.timed")).unwrap();
        assert!(kept.ends_with(" third\n"), "{kept}");
    }

    #[test]
    fn boots_counted_on_the_console() {
        let console = format!("{STAGE1_MARKER}\nx\n{PID1_RSS_KEY}4000\n{STAGE1_MARKER}\n");
        assert_eq!(count_lines(&console, STAGE1_MARKER), 2);
        assert_eq!(count_lines(&console, PID1_RSS_KEY), 1);
    }

    #[test]
    fn machinectl_lines_timed() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo 'n: 0.2.0 installed in slot b; the node is rebooting into it'; sleep 0.3; \
             echo 'n: 0.2.0 answers from slot b after 2s (upgrade booting)'; echo oops >&2",
        ]);
        let out = run_timed(cmd, "sh").unwrap();
        assert!(out.status.success());
        let rebooting = out.at(REBOOTING_LINE).unwrap();
        assert!(
            out.took >= rebooting + Duration::from_millis(300),
            "{:?}",
            out.took
        );
        assert_eq!(
            out.line(ANSWERS_LINE),
            Some("n: 0.2.0 answers from slot b after 2s (upgrade booting)")
        );
        assert_eq!(out.stderr, "oops\n");
        assert!(out.at("nothing like it").is_none());
    }

    #[test]
    fn v2_version_from_a_bundle_header() {
        use keelson_upgrade::manifest::{FORMAT, Manifest};
        let dir = tempfile::tempdir().unwrap();
        let key = keelson_upgrade::keys::SigningKey::from_bytes(&[7; 32]);
        let verity = keelson_configs::boot::VerityParams {
            roothash: "00".repeat(32),
            salt: "00".repeat(32),
            data_blocks: 1,
            hash_offset: 4096,
        };
        let manifest = Manifest {
            format: FORMAT,
            version: "0.2.0".into(),
            arch: "amd64".into(),
            min_version: None,
            components: Vec::new(),
            config_versions: vec!["v1alpha1".into()],
            cmdline: "console=ttyS0".into(),
            verity,
            key_id: String::new(),
            parts: Vec::new(),
        };
        let path = dir.path().join("v2.bundle");
        let parts = crate::bundle::Parts {
            root: vec![1; 8192],
            kernel: vec![2; 10],
            initrd: vec![3; 10],
        };
        crate::bundle::write(&path, manifest, &parts, &key).unwrap();
        assert_eq!(bundle_version(&path, Arch::Amd64).unwrap(), "0.2.0");
        let err = bundle_version(&path, Arch::Arm64).unwrap_err();
        assert!(
            format!("{err:#}").contains("for amd64, not arm64"),
            "{err:#}"
        );
        std::fs::write(&path, b"KEELSONB").unwrap();
        assert!(bundle_version(&path, Arch::Amd64).is_err());
    }
}
