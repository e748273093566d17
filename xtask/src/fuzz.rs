//! The test command's short fuzzing run.
//!
//! Its builds (cargo-fuzz itself on a fresh host, then each fuzz crate with libFuzzer and
//! AddressSanitizer) start in the background when `cargo xtask test` starts, under
//! `nice -n 19`: they take the cycles the other stages leave idle, mostly while the VM
//! tests wait on boots and deadlines (the upgrade tests left 28% of two cores idle,
//! measured 2026-12-07). Run after the VM tests instead, the builds were 6 of the fuzz
//! stage's 10 minutes. The stage itself then runs the targets, two at a time (each
//! libFuzzer process is one thread, and this host has two cores).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{cargo, workspace_root};

/// The fuzz targets of the short fuzzing run: the crate directory whose `fuzz/` holds
/// the target, the target, and its seed inputs (relative to that directory).
const FUZZ_TARGETS: &[(&str, &str, &str)] = &[
    // The machine config: parse and validate.
    ("configs", "check_config", "tests/data"),
    // PID 1's reader of the config URL's HTTP answer.
    ("init", "http_response", "fuzz/seeds/http_response"),
    // PID 1's control socket: its line framing and the requests on it.
    ("init", "control_frames", "fuzz/seeds/control_frames"),
    // PID 1's sniffers of a device's first bytes: config-drive labels, ext4 superblocks.
    ("init", "volume_head", "fuzz/seeds/volume_head"),
    // PID 1's reader of the boot disk's GPT, and the first boot's plan for it.
    ("init", "gpt_table", "fuzz/seeds/gpt_table"),
    // PID 1's DHCP client: packets from any host on the link, and the leases they grant.
    ("init/netconf", "dhcp_packet", "fuzz/seeds/dhcp_packet"),
    // machined's parser of upgrade bundles (an upload or a download, not yet trusted).
    (
        "machined/upgrade",
        "bundle_parser",
        "fuzz/seeds/bundle_parser",
    ),
];

/// Where the fuzz builds and runs keep their output.
fn fuzz_dir() -> PathBuf {
    workspace_root().join("target/fuzz")
}

/// A `cargo fuzz` command in the crate directory `dir`. cargo-fuzz needs nightly
/// features; `RUSTC_BOOTSTRAP` unlocks them on the stable toolchain this project pins.
fn cargo_fuzz(dir: &str) -> Command {
    let mut cmd = cargo();
    cmd.current_dir(workspace_root().join(dir))
        .env("RUSTC_BOOTSTRAP", "1")
        .arg("fuzz");
    cmd
}

/// The fuzz builds running in the background; [`Builds::finish`] waits for them. Dropped
/// unfinished (an earlier stage failed), it stops the one running.
pub struct Builds {
    thread: Option<JoinHandle<Result<()>>>,
    /// The process group of the build running now.
    running: Arc<Mutex<Option<u32>>>,
    log: PathBuf,
}

/// Start the builds: cargo-fuzz when the host lacks it, then each fuzz crate, one after
/// the other, at the lowest CPU priority, their output in `target/fuzz/build.log`.
pub fn start_builds() -> Result<Builds> {
    let dir = fuzz_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("could not create {}", dir.display()))?;
    let log = dir.join("build.log");
    let file = std::fs::File::create(&log)
        .with_context(|| format!("could not create {}", log.display()))?;
    let running = Arc::new(Mutex::new(None));
    let shared = Arc::clone(&running);
    let thread = std::thread::spawn(move || build_all(&file, &shared));
    eprintln!(
        "xtask: fuzz: the targets build in the background at the lowest priority (log: {})",
        log.display()
    );
    Ok(Builds {
        thread: Some(thread),
        running,
        log,
    })
}

fn build_all(log: &std::fs::File, running: &Mutex<Option<u32>>) -> Result<()> {
    let have_fuzz = cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_fuzz {
        let mut install = cargo();
        install.args(["install", "--locked", "cargo-fuzz"]);
        niced(install, log, running)?;
    }
    let mut crates: Vec<&str> = FUZZ_TARGETS.iter().map(|(dir, _, _)| *dir).collect();
    crates.dedup();
    for dir in crates {
        let mut build = cargo_fuzz(dir);
        build.arg("build").arg("--target-dir").arg(fuzz_dir());
        niced(build, log, running)?;
    }
    Ok(())
}

/// Run `cmd` under `nice -n 19` in its own process group (so that it can be stopped
/// whole), its output appended to `log`.
fn niced(cmd: Command, log: &std::fs::File, running: &Mutex<Option<u32>>) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let shown = format!("{cmd:?}");
    let mut niced = Command::new("nice");
    niced
        .args(["-n", "19"])
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .envs(
            cmd.get_envs()
                .filter_map(|(key, value)| value.map(|value| (key, value))),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?)
        .process_group(0);
    if let Some(dir) = cmd.get_current_dir() {
        niced.current_dir(dir);
    }
    let mut child = niced
        .spawn()
        .with_context(|| format!("could not start {shown}"))?;
    if let Ok(mut slot) = running.lock() {
        *slot = Some(child.id());
    }
    let status = child.wait();
    if let Ok(mut slot) = running.lock() {
        *slot = None;
    }
    let status = status.with_context(|| format!("could not wait for {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

impl Builds {
    /// Wait for the builds; a failure shows the end of their log.
    pub fn finish(mut self) -> Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let result = match thread.join() {
            Ok(result) => result,
            Err(_) => Err(anyhow::anyhow!("the fuzz builds' thread panicked")),
        };
        result.map_err(|error| {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            anyhow::anyhow!(
                "{error:#}\n--- the end of {} ---\n{}",
                self.log.display(),
                tail(&log, 60)
            )
        })
    }
}

impl Drop for Builds {
    fn drop(&mut self) {
        if self.thread.is_none() {
            return;
        }
        let group = self.running.lock().ok().and_then(|slot| *slot);
        if let Some(pid) = group.and_then(|g| rustix::process::Pid::from_raw(g as i32)) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::TERM);
        }
    }
}

/// Wait for the builds, then run each target of [`FUZZ_TARGETS`] for `duration`, two at
/// a time: each must find no crash. Each run's output goes to `target/fuzz/<target>.log`;
/// a failure shows its end (libFuzzer's report names the crashing input it saved).
pub fn run(builds: Builds, duration: Duration) -> Result<()> {
    builds.finish()?;
    for pair in FUZZ_TARGETS.chunks(2) {
        let started: Vec<(&str, PathBuf, Child)> = pair
            .iter()
            .map(|&(dir, target, seeds)| start_target(dir, target, seeds, duration))
            .collect::<Result<_>>()?;
        for (target, log, mut child) in started {
            let status = child
                .wait()
                .with_context(|| format!("could not wait for the fuzzer of {target}"))?;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if !status.success() {
                bail!(
                    "fuzz target {target} failed with {status}\n--- the end of {} ---\n{}",
                    log.display(),
                    tail(&text, 60)
                );
            }
            let done = text
                .lines()
                .rfind(|l| l.starts_with("Done "))
                .unwrap_or("(libFuzzer printed no summary)");
            eprintln!("xtask: fuzz {target}: no crash; {done}");
        }
    }
    Ok(())
}

fn start_target(
    dir: &str,
    target: &'static str,
    seeds: &str,
    duration: Duration,
) -> Result<(&'static str, PathBuf, Child)> {
    let corpus = std::env::temp_dir().join(format!("keelson-fuzz-corpus-{target}"));
    std::fs::create_dir_all(&corpus)
        .with_context(|| format!("could not create {}", corpus.display()))?;
    let log = fuzz_dir().join(format!("{target}.log"));
    let file = std::fs::File::create(&log)
        .with_context(|| format!("could not create {}", log.display()))?;
    let mut cmd = cargo_fuzz(dir);
    cmd.args(["run", target, "--target-dir"])
        .arg(fuzz_dir())
        .arg(&corpus)
        .arg(seeds)
        .arg("--")
        .arg(format!("-max_total_time={}", duration.as_secs()))
        .arg("-max_len=8192")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    eprintln!("xtask: running {cmd:?} (output: {})", log.display());
    let child = cmd
        .spawn()
        .with_context(|| format!("could not start the fuzzer of {target}"))?;
    Ok((target, log, child))
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fuzz_target_is_a_bin_of_its_crate_with_seeds() {
        for &(dir, target, seeds) in FUZZ_TARGETS {
            let root = workspace_root().join(dir);
            let manifest = std::fs::read_to_string(root.join("fuzz/Cargo.toml")).unwrap();
            assert!(
                manifest.contains(&format!("name = \"{target}\"")),
                "{dir}/fuzz/Cargo.toml has no bin {target}"
            );
            assert!(root.join(seeds).is_dir(), "{dir}/{seeds}");
        }
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
