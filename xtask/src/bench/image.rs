//! `cargo xtask bench image`: how long an image takes to build with a warm cache, how
//! long a rebuild takes after a change to `init`, and how big each artefact is.
//!
//! - The build is the same code `cargo xtask image` runs (`image::build_binaries`,
//!   then `keelson_imager::build::build`), in process, writing every format (raw,
//!   raw.zst, qcow2) into `target/bench/images/<arch>/`. One unmeasured warm-up build
//!   first fills the package cache and compiles what is stale.
//! - The reference ("the floor") is writing the image's bytes with a plain sequential
//!   copy: `keelson.raw` read and written in 1 MiB blocks into a new file, then
//!   fsync. No build can write the disk image faster than that.
//! - The incremental rebuild touches `init/src/main.rs` (its modification time only)
//!   and runs the build again: cargo recompiles init, the imager rebuilds the image.
//! - Sizes are compared with the peer's (the Debian + systemd node, see
//!   [`super::peer`]), which is amd64: arm64 sizes are compared with it too.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use keelson_configs::layout::Arch;
use keelson_imager::build::{self, BuildOptions, BuildReport, Format};
use keelson_imager::debian::{self, fetch::Cache};
use keelson_imager::definition::Definition;

use super::peer::PeerSizes;
use super::{Ctx, Figure, Reference, Stats, Unit};
use crate::image::{build_binaries, definition_path};
use crate::workspace_root;

/// Timings of one build.
struct Timed {
    /// Cross-compiling our binaries (a no-op when nothing changed).
    binaries: Duration,
    /// `keelson_imager::build::build`, every format.
    imager: Duration,
    /// From the imager's start until the raw image was written.
    to_raw: Duration,
    /// What it built.
    report: BuildReport,
}

/// One build of `arch` into `out_dir`, timed.
fn timed_build(
    def: &Definition,
    arch: Arch,
    out_dir: &Path,
    cache: &Cache,
    mirror: Option<&debian::Mirror>,
    reuse_derived: bool,
) -> Result<Timed> {
    let t0 = Instant::now();
    let binaries = build_binaries(def, arch, None)?;
    let t1 = Instant::now();
    let opts = BuildOptions {
        definition: definition_path(),
        arch,
        binaries,
        out_dir: out_dir.to_path_buf(),
        formats: vec![Format::Raw, Format::RawZst, Format::Qcow2],
        mirror: mirror.cloned(),
        cache: cache.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        reuse_derived,
        kubernetes: None,
        trusted_keys: Default::default(),
    };
    // The raw image is complete when the imager starts on the derived formats.
    let raw_done: Mutex<Option<Instant>> = Mutex::new(None);
    let progress = |line: &str| {
        if line.contains("compressing") || line.contains("converting") {
            let mut at = raw_done.lock().unwrap_or_else(|e| e.into_inner());
            at.get_or_insert_with(Instant::now);
        }
    };
    let report = build::build(&opts, &progress)
        .with_context(|| format!("building the {arch} image in {}", out_dir.display()))?;
    let t2 = Instant::now();
    let raw_at = raw_done
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or(t2);
    Ok(Timed {
        binaries: t1 - t0,
        imager: t2 - t1,
        to_raw: raw_at - t1,
        report,
    })
}

/// The floor: copy `src` to `dst` with plain reads and writes, fsync, and time it.
fn plain_copy(src: &Path, dst: &Path) -> Result<Duration> {
    let start = Instant::now();
    let mut input = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut output = File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = input
            .read(&mut buf)
            .with_context(|| format!("reading {}", src.display()))?;
        if n == 0 {
            break;
        }
        output
            .write_all(&buf[..n])
            .with_context(|| format!("writing {}: check free space", dst.display()))?;
    }
    output
        .sync_all()
        .with_context(|| format!("syncing {}", dst.display()))?;
    let took = start.elapsed();
    drop(output);
    std::fs::remove_file(dst).ok();
    Ok(took)
}

/// Set a file's modification time to now without changing its content.
fn touch(path: &Path) -> Result<()> {
    File::options()
        .append(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now()))
        .with_context(|| format!("touching {}", path.display()))
}

/// `cargo xtask bench image`.
pub fn bench(ctx: &mut Ctx) -> Result<()> {
    let def = Definition::load(&definition_path())?;
    let mirror = debian::mirror_from_apt_sources().ok();
    let cache = Cache::from_env()?;
    let init_main = workspace_root().join("init/src/main.rs");
    let runs = ctx.args.runs;
    for arch in ctx.arches(&Arch::ALL)? {
        let group = format!("image {arch}");
        let out_dir = ctx.image_dir(arch);
        eprintln!("xtask: bench: {group}: warm-up build (not measured)");
        timed_build(&def, arch, &out_dir, &cache, mirror.as_ref(), true)?;
        ctx.built.push(arch);

        let copy_dst = ctx.dir.join("scratch").join("copy.raw");
        std::fs::create_dir_all(ctx.dir.join("scratch"))?;
        let (mut whole, mut binaries, mut imager, mut to_raw) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut incremental, mut copy, mut underived) = (Vec::new(), Vec::new(), Vec::new());
        let mut report = None;
        let mut incremental_error = None;
        for n in 1..=runs {
            eprintln!("xtask: bench: {group}: run {n}/{runs}");
            let t = timed_build(&def, arch, &out_dir, &cache, mirror.as_ref(), false)?;
            underived.push(t.binaries + t.imager);
            let t = timed_build(&def, arch, &out_dir, &cache, mirror.as_ref(), true)?;
            whole.push(t.binaries + t.imager);
            binaries.push(t.binaries);
            imager.push(t.imager);
            to_raw.push(t.to_raw);
            report = Some(t.report);
            copy.push(plain_copy(&out_dir.join("keelson.raw"), &copy_dst)?);
            if incremental_error.is_none() {
                touch(&init_main)?;
                match timed_build(&def, arch, &out_dir, &cache, mirror.as_ref(), true) {
                    Ok(t) => incremental.push(t.binaries + t.imager),
                    Err(e) => incremental_error = Some(e),
                }
            }
        }
        let floor = Stats::durations(&copy).map(|stats| Reference {
            name: "plain copy of keelson.raw".into(),
            stats,
        });
        let time = |name: &str, samples: &[Duration]| {
            Stats::durations(samples)
                .map(|s| Figure::new(&group, name, Unit::Seconds, s, floor.clone()))
        };
        ctx.figures.extend(
            time(
                "warm build, nothing derived kept: binaries + imager, all formats",
                &underived,
            )
            .map(|f| {
                f.target(Some(60.0), None).note(
                    "packages cached, but every squashfs block compressed and the module \
                     aliases scanned again (the derived cache off, as in a first build)",
                )
            })
            .into_iter()
            .chain(
                time("warm build: binaries + imager, all formats", &whole).map(|f| {
                    f.note(
                        "what `cargo xtask image --format raw --format raw.zst --format qcow2` \
                         does after its own start-up, its derived cache (squashfs blocks, \
                         module aliases) warm; the cross-compile is a no-op unless someone \
                         edited init or its dependencies since the previous build",
                    )
                }),
            )
            .chain(time("warm build: cross-compile of our binaries", &binaries))
            .chain(time("warm build: imager only, all formats", &imager))
            .chain(time(
                "warm build: imager until keelson.raw is written",
                &to_raw,
            )),
        );
        if let Some(f) = time("rebuild after touching init/src/main.rs", &incremental) {
            ctx.figures.push(f.target(Some(20.0), None));
        }
        if let Some(e) = incremental_error {
            ctx.skip(
                format!("{group}: rebuild after an init change"),
                format!("the rebuild failed (init may be mid-edit in this checkout): {e:#}"),
            );
        }

        if let Some(report) = report {
            let peer = match ctx.peer() {
                Ok(p) => Some(p.sizes),
                Err(e) => {
                    ctx.skip(
                        format!("{group}: the peer's sizes (references)"),
                        format!("{e:#}"),
                    );
                    None
                }
            };
            size_figures(ctx, &group, arch, &report, peer.as_ref());
        }
    }
    Ok(())
}

fn size_figures(
    ctx: &mut Ctx,
    group: &str,
    arch: Arch,
    report: &BuildReport,
    peer: Option<&PeerSizes>,
) {
    let one = |v: u64| Stats::of(&[v as f64]);
    let peer_ref = |name: &str, pick: fn(&PeerSizes) -> u64| {
        peer.and_then(|p| {
            one(pick(p)).map(|stats| Reference {
                name: format!("peer {name}"),
                stats,
            })
        })
    };
    let artefact = |name: &str| {
        report
            .artefacts
            .iter()
            .find_map(|(n, v)| (*n == name).then_some(*v))
    };
    let file = |ext: &str| {
        report.files.iter().find_map(|(p, v)| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy() == format!("keelson.{ext}"))
                .then_some(*v)
        })
    };
    let arch_note = (arch != Arch::Amd64).then_some("the peer is amd64: compared with it");
    let rows: Vec<(String, Option<u64>, Option<Reference>)> = vec![
        (
            "kernel".into(),
            artefact("kernel"),
            peer_ref("kernel (same package)", |p| p.kernel),
        ),
        (
            "initramfs (zstd)".into(),
            artefact("initramfs (zstd)"),
            peer_ref("initramfs (initramfs-tools)", |p| p.initramfs),
        ),
        (
            "root files".into(),
            artefact("root files"),
            peer_ref("root tree", |p| p.root_tree),
        ),
        (
            "squashfs".into(),
            artefact("squashfs"),
            peer_ref("root tree", |p| p.root_tree),
        ),
        (
            "verity tree".into(),
            artefact("verity tree"),
            artefact("squashfs").and_then(one).map(|stats| Reference {
                name: "our squashfs".into(),
                stats,
            }),
        ),
        (
            "keelson.raw".into(),
            file("raw"),
            peer_ref("raw disk", |p| p.raw),
        ),
        (
            "keelson.raw.zst".into(),
            file("raw.zst"),
            peer_ref("raw disk, zstd like ours", |p| p.raw_zst),
        ),
        (
            "keelson.qcow2".into(),
            file("qcow2"),
            peer_ref("qcow2", |p| p.qcow2),
        ),
    ];
    for (name, value, reference) in rows {
        let Some(stats) = value.and_then(one) else {
            ctx.skip(
                format!("{group}: size of {name}"),
                "the build report does not list it",
            );
            continue;
        };
        let mut f = Figure::new(
            group,
            &format!("size: {name}"),
            Unit::Bytes,
            stats,
            reference,
        );
        if name == "keelson.raw.zst" {
            f = f.target(
                (arch == Arch::Amd64).then_some(80.0 * 1_000_000.0),
                Some(0.5),
            );
        }
        if let Some(note) = arch_note {
            f = f.note(note);
        }
        ctx.figures.push(f);
    }
}
