//! The kernel-prerequisite modules against the host's real kernel, where that is safe:
//! `swapoff(2)` on a swap area the test creates on a loop device (root only), and sysctl
//! writes that set a key to the value it already has.

// A test harness: it builds fixtures and runs the host's tools to check what init did.
#![allow(clippy::disallowed_methods)]

use std::cell::RefCell;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use keelson_init::console::Log;
use keelson_init::swap;
use keelson_init::syscalls::Linux;
use keelson_init::sysctl;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(Default)]
struct Lines(RefCell<Vec<String>>);

impl Log for Lines {
    fn line(&self, message: &str) {
        eprintln!("keelson-init: {message}");
        self.0.borrow_mut().push(message.to_string());
    }

    fn raw(&self, text: &str) {
        self.0.borrow_mut().push(text.to_string());
    }
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output()?;
    if !out.status.success() {
        return Err(format!(
            "{program} {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A swap area on a loop device; turned off (if still on) and detached on drop.
struct LoopSwap {
    file: PathBuf,
    dev: String,
}

impl Drop for LoopSwap {
    fn drop(&mut self) {
        let _ = Command::new("swapoff")
            .arg(&self.dev)
            .stderr(std::process::Stdio::null())
            .status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = fs::remove_file(&self.file);
    }
}

/// Only the test's own area is touched: the host may have swap of its own.
#[test]
fn swapoff_turns_off_a_real_swap_area() -> Result {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root for loop devices and swapon");
        return Ok(());
    }
    let file = std::env::temp_dir().join(format!("keelson-swap-{}.img", std::process::id()));
    fs::File::create(&file)?.set_len(16 << 20)?;
    let dev = run("losetup", &["-f", "--show", &file.display().to_string()])?
        .trim()
        .to_string();
    let area = LoopSwap { file, dev };
    run("mkswap", &[&area.dev])?;
    run("swapon", &[&area.dev])?;
    let ours = |areas: Vec<swap::SwapArea>| -> Vec<swap::SwapArea> {
        areas.into_iter().filter(|a| a.path == area.dev).collect()
    };
    let active = ours(swap::active(&Linux)?);
    assert_eq!(active.len(), 1, "swapon did not activate {}", area.dev);
    assert_eq!(active[0].kind, "partition");

    let log = Lines::default();
    let report = swap::turn_off(&Linux, &log, &active);
    assert!(report.ok(), "{:?}", report.failed);
    assert!(ours(swap::active(&Linux)?).is_empty());
    assert_eq!(
        log.0.borrow().as_slice(),
        [format!("swap {} turned off", area.dev)]
    );
    // A second swapoff of the same area is EINVAL, explained.
    let report = swap::turn_off(&Linux, &log, &active);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(
        log.0.borrow().last().map(String::as_str),
        Some(
            format!(
                "swap {} could not be turned off: EINVAL (22): it is not an active swap area (already off?)",
                area.dev
            )
            .as_str()
        )
    );
    Ok(())
}

#[test]
fn the_host_swap_list_parses() -> Result {
    // Whatever the host has, every line of /proc/swaps but the header is an area.
    let text = fs::read_to_string(swap::PROC_SWAPS)?;
    assert_eq!(swap::parse_swaps(&text).len(), text.lines().count() - 1);
    Ok(())
}

#[test]
fn sysctls_round_trip_through_the_real_proc_sys() -> Result {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to write /proc/sys");
        return Ok(());
    }
    // Writing the value a key already has changes nothing on the host.
    let key = "net.ipv4.ip_forward";
    let path = sysctl::path_of(Path::new(sysctl::PROC_SYS), key)?;
    let current = fs::read_to_string(&path)?.trim().to_string();
    let log = Lines::default();
    let report = sysctl::apply(
        &Linux,
        &log,
        Path::new(sysctl::PROC_SYS),
        [(key, current.as_str()), ("net.ipv4.no_such_key", "1")],
    );
    assert_eq!(report.applied, [(key.to_string(), current.clone())]);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(
        log.0.borrow().first().map(String::as_str),
        Some(format!("sysctl {key}={current} applied").as_str())
    );
    assert_eq!(
        report.failed[0].1.to_string(),
        "cannot write /proc/sys/net/ipv4/no_such_key: ENOENT (2): this kernel has no such \
         sysctl: check the name"
    );
    Ok(())
}
