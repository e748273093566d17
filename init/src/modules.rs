//! Kernel modules: load the initramfs's module list in order with `finit_module`.
//!
//! The imager writes `/modules/order` (one `.ko` file name a line, dependencies first,
//! see `keelson_configs::layout::INITRAMFS_MODULES_ORDER`) and the files beside it. A
//! module that is already loaded (EEXIST) is fine; any other failure is logged with the
//! module's name and errno and loading goes on: whether the boot can continue is decided
//! by what comes next (a missing disk driver shows up as a root partition that never
//! appears, and that message names the modules that failed).

use std::io;
use std::path::{Path, PathBuf};

use crate::console::Log;
use crate::syscalls::{Syscalls, errno_name};

/// Errors of module loading.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The order file exists but cannot be read.
    #[error("cannot read the module list {path}: {errno}", errno = errno_name(source))]
    Order {
        /// The order file.
        path: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
}

/// What happened to each module.
#[derive(Debug, Default)]
pub struct Report {
    /// Modules loaded now.
    pub loaded: Vec<String>,
    /// Modules that were already loaded (EEXIST).
    pub already: Vec<String>,
    /// Modules that failed, with the error.
    pub failed: Vec<(String, io::Error)>,
}

impl Report {
    /// `name (ERRNO), ...` of the failed modules, for later error messages.
    pub fn failures(&self) -> String {
        self.failed
            .iter()
            .map(|(name, err)| format!("{name} ({})", errno_name(err)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Compressed module suffixes the kernel decompresses itself (Debian trixie ships `.ko.xz`).
pub const COMPRESSED_SUFFIXES: [&str; 3] = [".ko.xz", ".ko.zst", ".ko.gz"];

/// Whether a module file is compressed (the kernel is asked to decompress it).
pub fn is_compressed(file: &str) -> bool {
    COMPRESSED_SUFFIXES.iter().any(|s| file.ends_with(s))
}

/// The kernel's name of a module file: `dm-verity.ko` (or `.ko.xz`) -> `dm_verity`.
pub fn module_name(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    let stem = COMPRESSED_SUFFIXES
        .iter()
        .chain(&[".ko"])
        .find_map(|s| base.strip_suffix(s))
        .unwrap_or(base);
    stem.replace('-', "_")
}

/// What a `finit_module` errno usually means (the kernel log above says exactly why).
pub fn failure_hint(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(2) => {
            "an unknown symbol or a missing algorithm: a module it needs (or a soft dependency) was not loaded before it"
        }
        Some(8) => "not a module for this kernel",
        Some(22) => "the kernel refused it (wrong kernel version or a bad parameter)",
        Some(126) | Some(129) => "its signature was rejected",
        Some(16) => "a module of that name is being loaded or unloaded",
        _ => "see the kernel log",
    }
}

/// The parameter every initramfs module is loaded with: the kernel probes the module's
/// devices in the background instead of inside `finit_module` (an AHCI controller's reset
/// took 0.5 s of a boot under TCG on q35, with no disk behind it). Stage 1 waits for the
/// root partition to appear anyway (`stage1::PARTITION_POLL`). The kernel takes this
/// parameter for every module (`kernel/module/main.c`, `unknown_module_param_cb`).
pub const ASYNC_PROBE: &str = "async_probe=1";

/// Parse an order file: one file name a line; blank lines and `#` comments are skipped.
pub fn parse_order(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// The modules that read and verify the root: once they and a disk driver are loaded,
/// the root can be found and its verity read started.
pub const ROOT_CHAIN: [&str; 3] = ["dm_verity", "squashfs", "erofs"];

/// How many of `files` (in load order) it takes to have every [`ROOT_CHAIN`] module
/// among them that the list has; 0 when it has none.
pub fn root_chain_end<S: AsRef<str>>(files: &[S]) -> usize {
    files
        .iter()
        .rposition(|f| ROOT_CHAIN.contains(&module_name(f.as_ref()).as_str()))
        .map_or(0, |i| i + 1)
}

/// The module files listed in `order_file`, in order; an absent file is an empty list
/// (said on the log: the kernel must have the drivers built in).
pub fn read_order(
    sys: &dyn Syscalls,
    log: &dyn Log,
    order_file: &Path,
) -> Result<Vec<String>, Error> {
    match sys.read_file(order_file) {
        Ok(bytes) => Ok(parse_order(&String::from_utf8_lossy(&bytes))
            .into_iter()
            .map(str::to_string)
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            log.line(&format!(
                "no module list at {}: relying on built-in drivers",
                order_file.display()
            ));
            Ok(Vec::new())
        }
        Err(source) => Err(Error::Order {
            path: order_file.display().to_string(),
            source,
        }),
    }
}

/// Load every module listed in `order_file` from `dir`, in order, each with `params`
/// ([`ASYNC_PROBE`] for the drivers that reach the root disk).
pub fn load_all(
    sys: &dyn Syscalls,
    log: &dyn Log,
    dir: &Path,
    order_file: &Path,
    params: &str,
) -> Result<Report, Error> {
    let mut report = Report::default();
    let files = read_order(sys, log, order_file)?;
    load_files(sys, log, dir, &files, params, &mut report);
    Ok(report)
}

/// Load `files` from `dir`, in order, each with `params`, adding to `report`.
pub fn load_files<S: AsRef<str>>(
    sys: &dyn Syscalls,
    log: &dyn Log,
    dir: &Path,
    files: &[S],
    params: &str,
    report: &mut Report,
) {
    for file in files {
        let file = file.as_ref();
        let name = module_name(file);
        let path: PathBuf = dir.join(file);
        match sys.finit_module(&path, params, is_compressed(file)) {
            Ok(()) => {
                log.line(&format!("module {name} loaded"));
                report.loaded.push(name);
            }
            Err(e) if e.raw_os_error() == Some(17) => {
                log.line(&format!("module {name} already loaded"));
                report.already.push(name);
            }
            Err(e) => {
                let why = if sys.exists(&path) {
                    failure_hint(&e)
                } else {
                    "the file is missing from the initramfs"
                };
                log.line(&format!(
                    "module {name} failed to load from {}: {}: {why}",
                    path.display(),
                    errno_name(&e),
                ));
                report.failed.push((name, e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::memory::MemoryLog;
    use crate::syscalls::fake::{Call, Fake};

    #[test]
    fn the_root_chain_ends_after_its_last_module() {
        let files = [
            "virtio_blk.ko",
            "dm-mod.ko",
            "dm-verity.ko",
            "squashfs.ko",
            "nvme.ko",
        ];
        assert_eq!(root_chain_end(&files), 4);
        assert_eq!(root_chain_end(&["nvme.ko", "ahci.ko"]), 0);
        assert_eq!(root_chain_end::<&str>(&[]), 0);
    }

    #[test]
    fn names_follow_the_kernel() {
        assert_eq!(module_name("dm-verity.ko"), "dm_verity");
        assert_eq!(module_name("virtio_blk.ko"), "virtio_blk");
        assert_eq!(module_name("sub/dm-bufio.ko"), "dm_bufio");
        assert_eq!(module_name("dm-verity.ko.xz"), "dm_verity");
        assert!(is_compressed("squashfs.ko.xz") && !is_compressed("squashfs.ko"));
    }

    #[test]
    fn modules_load_in_order_and_eexist_is_fine() -> Result<(), Error> {
        let mut fake = Fake::new().with_file("/modules/squashfs.ko", "").with_file(
            "/modules/order",
            "# closure\nvirtio_pci.ko\n\ndm-mod.ko\ndm-bufio.ko.xz\n  dm-verity.ko  \nsquashfs.ko\n",
        );
        fake.module_errors
            .insert(PathBuf::from("/modules/dm-mod.ko"), 17);
        fake.module_errors
            .insert(PathBuf::from("/modules/squashfs.ko"), 2);
        fake.module_errors
            .insert(PathBuf::from("/modules/virtio_pci.ko"), 2);
        let log = MemoryLog::default();
        let report = load_all(
            &fake,
            &log,
            Path::new("/modules"),
            Path::new("/modules/order"),
            ASYNC_PROBE,
        )?;
        let order: Vec<Call> = [
            "virtio_pci.ko",
            "dm-mod.ko",
            "dm-bufio.ko.xz",
            "dm-verity.ko",
            "squashfs.ko",
        ]
        .iter()
        .map(|f| Call::FinitModule(format!("/modules/{f}"), f.ends_with(".xz")))
        .collect();
        assert_eq!(fake.calls(), order);
        assert_eq!(report.loaded, ["dm_bufio", "dm_verity"]);
        assert_eq!(report.already, ["dm_mod"]);
        assert_eq!(
            report.failures(),
            "virtio_pci (ENOENT (2)), squashfs (ENOENT (2))"
        );
        assert_eq!(
            log.lines(),
            [
                "keelson-init: module virtio_pci failed to load from /modules/virtio_pci.ko: \
                 ENOENT (2): the file is missing from the initramfs",
                "keelson-init: module dm_mod already loaded",
                "keelson-init: module dm_bufio loaded",
                "keelson-init: module dm_verity loaded",
                "keelson-init: module squashfs failed to load from /modules/squashfs.ko: \
                 ENOENT (2): an unknown symbol or a missing algorithm: a module it needs (or \
                 a soft dependency) was not loaded before it",
            ]
        );
        Ok(())
    }

    #[test]
    fn a_missing_order_file_means_built_in_drivers() -> Result<(), Error> {
        let fake = Fake::new();
        let log = MemoryLog::default();
        let report = load_all(
            &fake,
            &log,
            Path::new("/modules"),
            Path::new("/modules/order"),
            ASYNC_PROBE,
        )?;
        assert!(report.loaded.is_empty() && fake.calls().is_empty());
        assert_eq!(log.lines().len(), 1);
        Ok(())
    }
}
