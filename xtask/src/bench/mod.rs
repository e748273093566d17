//! `cargo xtask bench [image|boot|api|cluster|etcd|upgrade|all]`: how we hold ourselves
//! to the targets of BENCHMARKS.md. Timed tests are flaky on shared machines; these
//! figures are not tests but measurements, each taken several times (min/median/max) and
//! each set beside a reference measured in the same run, so that a slow or busy machine
//! moves both and the ratio stays meaningful:
//!
//! - `image`: build times against the floor of writing the image's bytes with a plain
//!   sequential copy; artefact sizes against the peer's disk image ([`image`]);
//! - `boot`: QEMU start to the ready marker against the floor (same firmware, boot
//!   loader and kernel, a trivial init: [`floor`]) and the Debian + systemd peer built
//!   with debootstrap ([`peer`]); memory at idle against the peer's ([`boot`]);
//! - `cluster`: time to a healthy 1-node and 3-node local cluster ([`cluster`]);
//! - `api`: machined's memory at idle and the latency of `version` and `apply-config
//!   --mode no-reboot` against one node ([`api`]);
//! - `etcd`: a 3-control-plane cluster from `bootstrap` to healthy, beside one node's boot,
//!   and `etcdctl check perf` on it ([`etcd`]);
//! - `upgrade`: an upgrade by A/B image swap to the new version answering, beside a
//!   plain reboot to API of the same node in the same run ([`upgrade`]; by name only,
//!   not in `all`: it takes `cargo xtask upgrade-inputs`' v2 bundle).
//!
//! Results go to the terminal (a table) and to `<target>/bench/<what>-<date>.json` and
//! `<target>/bench/latest.json`, where `<target>` is `CARGO_TARGET_DIR` when set, else
//! the workspace's `target/`.

mod api;
mod boot;
mod cluster;
mod etcd;
mod floor;
mod image;
mod node;
mod peer;
mod upgrade;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use keelson_configs::layout::Arch;
use serde::Serialize;

use crate::workspace_root;

/// What `cargo xtask bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum What {
    /// Build times and artefact sizes.
    Image,
    /// Boot time to ready and memory at idle, beside the floor and the peer.
    Boot,
    /// machined's memory and API latency.
    Api,
    /// Local cluster creation.
    Cluster,
    /// A 3-control-plane etcd from bootstrap to healthy, and `etcdctl check perf`.
    Etcd,
    /// An upgrade to the new version answering, beside a plain reboot (not in `all`).
    Upgrade,
    /// Everything available; lists what was skipped and why.
    All,
}

impl What {
    fn name(self) -> &'static str {
        match self {
            What::Image => "image",
            What::Boot => "boot",
            What::Api => "api",
            What::Cluster => "cluster",
            What::Etcd => "etcd",
            What::Upgrade => "upgrade",
            What::All => "all",
        }
    }
}

/// Options of `cargo xtask bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// What to measure (default: all).
    #[arg(value_enum)]
    pub what: Option<What>,
    /// Runs per measurement (min/median/max are over these; default 3, and 1 for
    /// `etcd` and `upgrade`, whose runs take minutes).
    #[arg(long = "runs", value_name = "N")]
    pub runs_given: Option<usize>,
    /// `--runs`, or its default for what is measured.
    #[arg(skip)]
    pub runs: usize,
    /// Architecture(s) for `image` (default: amd64 and arm64) and `boot` (default:
    /// amd64; the peer is amd64 only).
    #[arg(long = "arch")]
    pub arches: Vec<String>,
    /// The console line that means "ready" for our image (default: `service
    /// containerd ready`, falling back to `KEELSON STAGE2 READY` when the image does
    /// not print it yet).
    #[arg(long)]
    pub marker: Option<String>,
    /// A machine config to give our image through QEMU `fw_cfg`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Rebuild the peer (debootstrap) even if a cached one matches the mirror.
    #[arg(long)]
    pub rebuild_peer: bool,
    /// Where built peers are cached (default: `<target>/bench/peer`); another
    /// checkout's cache can be shared this way. A peer is still built when none there
    /// matches the mirror snapshot, kernel and recipe.
    #[arg(long, value_name = "DIR")]
    pub peer_cache: Option<PathBuf>,
    /// `bench boot`: leave out the references (`--without floor --without peer`) for a
    /// quick look at our own boot; ratios against a left-out reference are not reported.
    #[arg(long, value_enum)]
    pub without: Vec<BootReference>,
    /// `bench api`: calls of `version` (and of `apply-config --mode no-reboot`) per run.
    #[arg(long, default_value_t = 50)]
    pub calls: usize,
}

/// A reference system of `bench boot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BootReference {
    /// The same firmware and kernel with a trivial init.
    Floor,
    /// Debian + systemd.
    Peer,
}

/// Units a figure is measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// Wall-clock seconds.
    Seconds,
    /// Bytes (files, memory).
    Bytes,
    /// Operations per second.
    #[serde(rename = "per_second")]
    PerSecond,
}

impl Unit {
    fn show(self, v: f64) -> String {
        match self {
            Unit::Seconds => format!("{v:.2} s"),
            Unit::Bytes if v >= 1048576.0 => format!("{:.1} MiB", v / 1048576.0),
            Unit::Bytes => format!("{:.0} KiB", v / 1024.0),
            Unit::PerSecond => format!("{v:.0} /s"),
        }
    }
}

/// min/median/max over the runs.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Every sample, in run order.
    pub samples: Vec<f64>,
    /// Smallest sample.
    pub min: f64,
    /// Median (the mean of the middle two for an even count).
    pub median: f64,
    /// Largest sample.
    pub max: f64,
}

impl Stats {
    /// Statistics of `samples` (None when empty).
    pub fn of(samples: &[f64]) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Stats {
            samples: samples.to_vec(),
            min: sorted[0],
            median,
            max: sorted[n - 1],
        })
    }

    fn durations(samples: &[Duration]) -> Option<Stats> {
        Stats::of(
            &samples
                .iter()
                .map(Duration::as_secs_f64)
                .collect::<Vec<_>>(),
        )
    }
}

/// A target a figure is held to: an absolute bound and/or a bound on its ratio to
/// the reference.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Target {
    /// Upper bound on the median, in the figure's unit.
    pub max_value: Option<f64>,
    /// Upper bound on the median's ratio to the reference's median.
    pub max_ratio: Option<f64>,
}

impl Target {
    fn show(&self, unit: Unit) -> String {
        let mut parts = Vec::new();
        if let Some(v) = self.max_value {
            parts.push(format!("<= {}", unit.show(v)));
        }
        if let Some(r) = self.max_ratio {
            parts.push(format!("<= {r}x"));
        }
        parts.join(", ")
    }
}

/// The reference a figure is compared with.
#[derive(Debug, Clone, Serialize)]
pub struct Reference {
    /// What it is.
    pub name: String,
    /// Its statistics (same unit as the figure).
    pub stats: Stats,
}

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// The group it belongs to (`image amd64`, `boot amd64`).
    pub group: String,
    /// What it measures.
    pub name: String,
    /// Its unit.
    pub unit: Unit,
    /// Our measurement.
    pub stats: Stats,
    /// The reference measured in the same run.
    pub reference: Option<Reference>,
    /// Median over the reference's median.
    pub ratio: Option<f64>,
    /// The target, if the figure has one.
    pub target: Option<Target>,
    /// Whether the target is met (None without a target).
    pub met: Option<bool>,
    /// Anything the reader must know to read the figure.
    pub note: Option<String>,
}

impl Figure {
    /// A figure from samples, with an optional reference.
    pub fn new(
        group: &str,
        name: &str,
        unit: Unit,
        stats: Stats,
        reference: Option<Reference>,
    ) -> Figure {
        let ratio = reference
            .as_ref()
            .filter(|r| r.stats.median > 0.0)
            .map(|r| stats.median / r.stats.median);
        Figure {
            group: group.to_string(),
            name: name.to_string(),
            unit,
            stats,
            reference,
            ratio,
            target: None,
            met: None,
            note: None,
        }
    }

    /// Hold the figure to a target.
    pub fn target(mut self, max_value: Option<f64>, max_ratio: Option<f64>) -> Figure {
        let value_ok = max_value.map(|v| self.stats.median <= v);
        let ratio_ok = match (max_ratio, self.ratio) {
            (Some(max), Some(r)) => Some(r <= max),
            (Some(_), None) => None,
            (None, _) => Some(true),
        };
        self.met = match (value_ok, ratio_ok) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (_, None) => None,
            (Some(true), Some(true)) | (None, Some(true)) => Some(true),
        };
        self.target = Some(Target {
            max_value,
            max_ratio,
        });
        self
    }

    /// Attach a note.
    pub fn note(mut self, note: impl Into<String>) -> Figure {
        self.note = Some(note.into());
        self
    }
}

/// Something that was not measured, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// What was not measured.
    pub what: String,
    /// Why, and what it needs.
    pub why: String,
}

/// The machine the figures were taken on.
#[derive(Debug, Clone, Serialize)]
pub struct MachineInfo {
    /// CPUs available to us.
    pub cpus: usize,
    /// CPU model.
    pub cpu_model: String,
    /// Host kernel release.
    pub kernel: String,
    /// `qemu-system-x86_64 --version`, first line.
    pub qemu: String,
    /// 1/5/15-minute load averages when the run started.
    pub load_start: String,
    /// ... and when it ended.
    pub load_end: String,
}

/// Everything one `cargo xtask bench` run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `image`, `boot`, ..., `all`.
    pub what: String,
    /// UTC start time (ISO 8601).
    pub date: String,
    /// Runs per measurement.
    pub runs: usize,
    /// The machine.
    pub machine: MachineInfo,
    /// The figures.
    pub figures: Vec<Figure>,
    /// What was not measured.
    pub skipped: Vec<Skipped>,
}

/// Shared state of one bench run: options, and the images already built in it.
#[derive(Debug)]
pub struct Ctx {
    /// The command's options.
    pub args: BenchArgs,
    /// Where results, images and the peer go: `target/bench/`.
    pub dir: PathBuf,
    /// Architectures whose image was built by this run (boot reuses them).
    pub built: Vec<Arch>,
    /// Figures so far.
    pub figures: Vec<Figure>,
    /// Skipped measurements so far.
    pub skipped: Vec<Skipped>,
    /// The peer, once built or found in the cache by this run.
    pub peer: Option<peer::Peer>,
}

impl Ctx {
    /// Where this run keeps an architecture's image.
    pub fn image_dir(&self, arch: Arch) -> PathBuf {
        self.dir.join("images").join(arch.debian())
    }

    /// Record a skipped measurement (also said on the terminal).
    pub fn skip(&mut self, what: impl Into<String>, why: impl Into<String>) {
        let (what, why) = (what.into(), why.into());
        eprintln!("xtask: bench: skipping {what}: {why}");
        self.skipped.push(Skipped { what, why });
    }

    fn arches(&self, default: &[Arch]) -> Result<Vec<Arch>> {
        crate::arches_or(&self.args.arches, default)
    }

    /// Our raw image for `arch`: the one this run built, else built now (raw only).
    pub fn built_image(&mut self, arch: Arch) -> Result<PathBuf> {
        let path = self.image_dir(arch).join("keelson.raw");
        if !self.built.contains(&arch) {
            let built = crate::image::image(&crate::image::ImageArgs {
                out: Some(self.image_dir(arch)),
                ..crate::image::ImageArgs::new(vec![arch], vec![keelson_imager::build::Format::Raw])
            });
            match built {
                Ok(_) => {}
                // In a shared checkout init may be mid-edit: measure the last image
                // built, and say so.
                Err(e) if path.is_file() => self.skip(
                    format!("fresh {arch} image"),
                    format!(
                        "the build failed ({e:#}); measured the image built earlier at {}",
                        path.display()
                    ),
                ),
                Err(e) => return Err(e),
            }
            self.built.push(arch);
        }
        Ok(path)
    }

    /// The peer (amd64), from the cache or built now; once per run.
    pub fn peer(&mut self) -> Result<peer::Peer> {
        if let Some(p) = &self.peer {
            return Ok(p.clone());
        }
        let image = self.built_image(Arch::Amd64)?;
        let cache = self
            .args
            .peer_cache
            .clone()
            .unwrap_or_else(|| self.dir.join("peer"));
        let p = peer::ensure(&cache, &image, self.args.rebuild_peer)?;
        self.peer = Some(p.clone());
        Ok(p)
    }
}

/// `cargo xtask bench`.
pub fn run(mut args: BenchArgs) -> Result<()> {
    if args.runs_given == Some(0) {
        bail!("--runs 0 measures nothing: give at least 1 (3 or more for a median)");
    }
    let what = args.what.unwrap_or(What::All);
    args.runs = args
        .runs_given
        .unwrap_or(if matches!(what, What::Etcd | What::Upgrade) {
            1
        } else {
            3
        });
    let date = utc_now();
    let load_start = load_average();
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let runs = args.runs;
    let mut ctx = Ctx {
        args,
        dir,
        built: Vec::new(),
        figures: Vec::new(),
        skipped: Vec::new(),
        peer: None,
    };
    match what {
        What::Image => image::bench(&mut ctx)?,
        What::Boot => boot::bench(&mut ctx)?,
        What::Api => api::bench(&mut ctx)?,
        What::Cluster => cluster::bench(&mut ctx)?,
        What::Etcd => etcd::bench(&mut ctx)?,
        What::Upgrade => upgrade::bench(&mut ctx)?,
        What::All => {
            for (name, result) in [
                ("image", image::bench(&mut ctx)),
                ("boot", boot::bench(&mut ctx)),
                ("api", api::bench(&mut ctx)),
                ("cluster", cluster::bench(&mut ctx)),
                ("etcd", etcd::bench(&mut ctx)),
            ] {
                if let Err(e) = result {
                    ctx.skip(name, format!("failed: {e:#}"));
                }
            }
        }
    }
    let report = Report {
        what: what.name().to_string(),
        date: date.clone(),
        runs,
        machine: machine_info(load_start),
        figures: ctx.figures,
        skipped: ctx.skipped,
    };
    print!("{}", table(&report));
    let json = serde_json::to_string_pretty(&report).context("encoding the results as JSON")?;
    let file = ctx
        .dir
        .join(format!("{}-{}.json", report.what, date.replace(':', "")));
    for path in [&file, &ctx.dir.join("latest.json")] {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!("xtask: bench: results in {}", file.display());
    Ok(())
}

/// The results as a text table.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nKeelson bench `{}` {} ({} run(s) each; {} CPUs, {}; load {} -> {})",
        report.what,
        report.date,
        report.runs,
        report.machine.cpus,
        report.machine.cpu_model,
        report.machine.load_start,
        report.machine.load_end
    );
    let header = [
        "group",
        "figure",
        "median",
        "min",
        "max",
        "reference",
        "ref median",
        "ratio",
        "target",
        "met",
    ];
    let mut rows: Vec<[String; 10]> = vec![header.map(String::from)];
    for f in &report.figures {
        rows.push([
            f.group.clone(),
            f.name.clone(),
            f.unit.show(f.stats.median),
            f.unit.show(f.stats.min),
            f.unit.show(f.stats.max),
            f.reference
                .as_ref()
                .map(|r| r.name.clone())
                .unwrap_or_else(|| "-".into()),
            f.reference
                .as_ref()
                .map(|r| f.unit.show(r.stats.median))
                .unwrap_or_else(|| "-".into()),
            f.ratio
                .map(|r| format!("{r:.2}x"))
                .unwrap_or_else(|| "-".into()),
            f.target
                .map(|t| t.show(f.unit))
                .unwrap_or_else(|| "-".into()),
            match f.met {
                Some(true) => "yes".into(),
                Some(false) => "NO".into(),
                None => "-".into(),
            },
        ]);
    }
    let widths: Vec<usize> = (0..10)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for (n, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "| {} |", line.join(" | "));
        if n == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            let _ = writeln!(out, "|-{}-|", rule.join("-|-"));
        }
    }
    let mut notes: Vec<String> = report
        .figures
        .iter()
        .filter_map(|f| {
            f.note
                .as_ref()
                .map(|n| format!("- {} / {}: {n}", f.group, f.name))
        })
        .collect();
    // A figure shown against two references carries its note once.
    notes.dedup();
    if !notes.is_empty() {
        let _ = writeln!(out, "\nNotes:\n{}", notes.join("\n"));
    }
    if !report.skipped.is_empty() {
        let _ = writeln!(out, "\nNot measured:");
        for s in &report.skipped {
            let _ = writeln!(out, "- {}: {}", s.what, s.why);
        }
    }
    out
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn machine_info(load_start: String) -> MachineInfo {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into());
    MachineInfo {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into()),
        qemu,
        load_start,
        load_end: load_average(),
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    keelson_node_protocol::clock::utc(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_stats(samples: &[f64], expected: (f64, f64, f64)) {
        let s = Stats::of(samples).unwrap();
        assert_eq!((s.min, s.median, s.max), expected, "{samples:?}");
    }

    #[test]
    fn stats_min_median_max() {
        check_stats(&[3.0], (3.0, 3.0, 3.0));
        check_stats(&[5.0, 1.0, 3.0], (1.0, 3.0, 5.0));
        check_stats(&[4.0, 1.0, 3.0, 2.0], (1.0, 2.5, 4.0));
        assert!(Stats::of(&[]).is_none());
    }

    fn figure(median: f64, reference: Option<f64>) -> Figure {
        let stats = Stats::of(&[median]).unwrap();
        let reference = reference.map(|r| Reference {
            name: "ref".into(),
            stats: Stats::of(&[r]).unwrap(),
        });
        Figure::new("g", "f", Unit::Seconds, stats, reference)
    }

    #[test]
    fn targets_on_value_and_ratio() {
        assert_eq!(figure(10.0, None).target(Some(20.0), None).met, Some(true));
        assert_eq!(figure(30.0, None).target(Some(20.0), None).met, Some(false));
        assert_eq!(
            figure(10.0, Some(5.0)).target(None, Some(1.5)).met,
            Some(false)
        );
        assert_eq!(
            figure(7.0, Some(5.0)).target(None, Some(1.5)).met,
            Some(true)
        );
        // A ratio target without a reference cannot be judged...
        assert_eq!(figure(7.0, None).target(None, Some(1.5)).met, None);
        // ...unless the absolute bound already fails.
        assert_eq!(
            figure(70.0, None).target(Some(60.0), Some(1.5)).met,
            Some(false)
        );
        let f = figure(6.0, Some(4.0));
        assert_eq!(f.ratio, Some(1.5));
    }
}
