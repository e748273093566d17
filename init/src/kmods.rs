//! Kernel modules in stage 2: load a module by name from the root's module tree, its
//! dependencies first, as `modprobe` would, without kmod.
//!
//! The imager ships the root's modules at `/usr/lib/modules/<release>/kernel/<name>.ko`
//! with a depmod-format `modules.dep` (`kernel/a.ko: kernel/b.ko kernel/c.ko`, the
//! dependencies listed so that loading them from last to first works) and
//! `modules.builtin.keelson` (the requested names that are built into the kernel). Debian's
//! own `modules.builtin` (`kernel/fs/ext4/ext4.ko` lines) is read too when present.
//!
//! A module that is built in or already loaded (`/proc/modules`, `/sys/module/<name>`) is
//! skipped; a dependency that fails stops the modules that need it, and each failure says
//! what its errno means. One console line per module loaded:
//! `keelson-init: module br_netfilter loaded`.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use crate::console::Log;
use crate::modules::{failure_hint, is_compressed, module_name};
use crate::syscalls::{Syscalls, errno_name};

/// Where the root filesystem keeps its module trees (one directory per kernel release).
pub const MODULES_ROOT: &str = "/usr/lib/modules";
/// The dependency index inside a release's directory.
pub const MODULES_DEP: &str = "modules.dep";
/// The imager's list of requested modules that are built into the kernel.
pub const MODULES_BUILTIN_KEELSON: &str = "modules.builtin.keelson";
/// The kernel package's list of built-in modules (`kernel/.../name.ko` lines).
pub const MODULES_BUILTIN: &str = "modules.builtin";

/// Errors of reading the module index.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `modules.dep` cannot be read.
    #[error(
        "cannot read the module index {path}: {errno}: the image must carry the modules of kernel {release} (built by the imager from [modules].root)",
        errno = errno_name(source)
    )]
    Index {
        /// The index file.
        path: String,
        /// The running kernel's release.
        release: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// One module of the index: its file (relative to the release directory) and the files
/// of its dependencies, as `modules.dep` lists them (load from last to first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `kernel/br_netfilter.ko`.
    pub file: String,
    /// `kernel/bridge.ko kernel/stp.ko kernel/llc.ko`.
    pub deps: Vec<String>,
}

/// The running kernel's module tree: where it is, what depends on what, what is built in.
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    /// `/usr/lib/modules/<release>`.
    pub dir: PathBuf,
    /// Modules by kernel name (`br_netfilter`).
    pub modules: BTreeMap<String, Entry>,
    /// Built-in module names.
    pub builtin: BTreeSet<String>,
}

/// The kernel's spelling of a module name: `br-netfilter` and `br_netfilter` are one.
pub fn normalize(name: &str) -> String {
    name.trim().replace('-', "_")
}

/// Parse `modules.dep`: `file: dep dep ...` a line; blank lines and `#` comments skipped.
pub fn parse_dep(text: &str) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((file, deps)) = line.split_once(':') else {
            continue;
        };
        let file = file.trim().to_string();
        out.insert(
            module_name(&file),
            Entry {
                deps: deps.split_whitespace().map(str::to_string).collect(),
                file,
            },
        );
    }
    out
}

/// Parse a built-in list: module names or `kernel/.../name.ko` paths, one a line.
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| normalize(&module_name(l)))
        .collect()
}

impl ModuleIndex {
    /// Read the index of the running kernel (`uname -r`) under `modules_root`
    /// (normally [`MODULES_ROOT`]).
    pub fn load(sys: &dyn Syscalls, modules_root: &Path) -> Result<ModuleIndex, Error> {
        let release = sys.uname().release;
        let dir = modules_root.join(&release);
        let dep_path = dir.join(MODULES_DEP);
        let text = sys.read_file(&dep_path).map_err(|source| Error::Index {
            path: dep_path.display().to_string(),
            release: release.clone(),
            source,
        })?;
        let mut builtin = BTreeSet::new();
        for list in [MODULES_BUILTIN_KEELSON, MODULES_BUILTIN] {
            if let Ok(bytes) = sys.read_file(&dir.join(list)) {
                builtin.extend(parse_builtin(&String::from_utf8_lossy(&bytes)));
            }
        }
        Ok(ModuleIndex {
            modules: parse_dep(&String::from_utf8_lossy(&text)),
            builtin,
            dir,
        })
    }
}

/// Why a module is not loaded.
#[derive(Debug)]
pub enum Failure {
    /// Neither in `modules.dep` nor built in.
    Unknown,
    /// `finit_module` failed.
    Load {
        /// The module file.
        path: PathBuf,
        /// The kernel's answer.
        error: io::Error,
    },
    /// A module it depends on failed first.
    Dependency {
        /// The dependency that failed.
        dependency: String,
    },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unknown => f.write_str(
                "not in this image's module tree: add it to [modules].root in images/keelson.toml",
            ),
            Failure::Load { path, error } => {
                write!(
                    f,
                    "finit_module {} failed with {}: {}",
                    path.display(),
                    errno_name(error),
                    failure_hint(error)
                )
            }
            Failure::Dependency { dependency } => {
                write!(f, "its dependency {dependency} failed to load")
            }
        }
    }
}

/// What happened to each module, requested or needed as a dependency.
#[derive(Debug, Default)]
pub struct Report {
    /// Modules loaded now, in load order.
    pub loaded: Vec<String>,
    /// Modules that were already loaded.
    pub already: Vec<String>,
    /// Modules built into the kernel.
    pub builtin: Vec<String>,
    /// Modules that are not loaded, and why.
    pub failed: Vec<(String, Failure)>,
}

impl Report {
    /// Whether `name` is usable now (loaded, already loaded or built in).
    pub fn is_available(&self, name: &str) -> bool {
        let name = normalize(name);
        [&self.loaded, &self.already, &self.builtin]
            .iter()
            .any(|list| list.contains(&name))
    }

    /// Whether every module is usable.
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }

    fn knows(&self, name: &str) -> bool {
        self.is_available(name) || self.failed.iter().any(|(n, _)| n == name)
    }

    fn failed(&self, name: &str) -> bool {
        self.failed.iter().any(|(n, _)| n == name)
    }
}

/// The names in `/proc/modules` (first word of each line).
pub fn parse_proc_modules(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Load `names` (and their dependencies, first) from `index`, in the order given.
/// Failures are logged and reported; loading goes on with the next module.
pub fn load<S: AsRef<str>>(
    sys: &dyn Syscalls,
    log: &dyn Log,
    index: &ModuleIndex,
    names: &[S],
) -> Report {
    load_with(sys, log, index, names, "")
}

/// [`load`], each module loaded with `params` (such as `modules::ASYNC_PROBE`).
pub fn load_with<S: AsRef<str>>(
    sys: &dyn Syscalls,
    log: &dyn Log,
    index: &ModuleIndex,
    names: &[S],
    params: &str,
) -> Report {
    let mut report = Report::default();
    let mut live = sys
        .read_file(Path::new("/proc/modules"))
        .map(|b| parse_proc_modules(&String::from_utf8_lossy(&b)))
        .unwrap_or_default();
    for requested in names {
        let name = normalize(requested.as_ref());
        if report.knows(&name) {
            continue;
        }
        if index.builtin.contains(&name) {
            log.line(&format!("module {name} is built into the kernel"));
            report.builtin.push(name);
            continue;
        }
        let Some(entry) = index.modules.get(&name) else {
            let failure = Failure::Unknown;
            log.line(&format!(
                "module {name} not loaded: {failure} (index: {})",
                index.dir.join(MODULES_DEP).display()
            ));
            report.failed.push((name, failure));
            continue;
        };
        // Dependencies from last to first, then the module itself.
        let chain = entry.deps.iter().rev().chain(std::iter::once(&entry.file));
        let mut broken: Option<String> = None;
        for file in chain {
            let module = module_name(file);
            if let Some(dependency) = &broken {
                if !report.knows(&module) {
                    let failure = Failure::Dependency {
                        dependency: dependency.clone(),
                    };
                    log.line(&format!("module {module} not loaded: {failure}"));
                    report.failed.push((module, failure));
                }
                continue;
            }
            if report.failed(&module) {
                broken = Some(module);
                continue;
            }
            if report.knows(&module) {
                continue;
            }
            if index.builtin.contains(&module) {
                report.builtin.push(module);
                continue;
            }
            if live.contains(&module) || sys.exists(&Path::new("/sys/module").join(&module)) {
                if module == name {
                    log.line(&format!("module {module} already loaded"));
                }
                report.already.push(module);
                continue;
            }
            let path = index.dir.join(file);
            match sys.finit_module(&path, params, is_compressed(file)) {
                Ok(()) => {
                    log.line(&format!("module {module} loaded"));
                    live.insert(module.clone());
                    report.loaded.push(module);
                }
                Err(e) if e.raw_os_error() == Some(17) => {
                    if module == name {
                        log.line(&format!("module {module} already loaded"));
                    }
                    report.already.push(module);
                }
                Err(error) => {
                    let failure = Failure::Load { path, error };
                    log.line(&format!("module {module} failed to load: {failure}"));
                    report.failed.push((module.clone(), failure));
                    broken = Some(module);
                }
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::memory::MemoryLog;
    use crate::syscalls::fake::{Call, Fake};

    const DIR: &str = "/usr/lib/modules/6.12.0-test";

    fn fake() -> Fake {
        Fake::new()
            .with_file(
                &format!("{DIR}/modules.dep"),
                "kernel/br_netfilter.ko: kernel/bridge.ko kernel/stp.ko kernel/llc.ko\n\
                 kernel/bridge.ko: kernel/stp.ko kernel/llc.ko\n\
                 kernel/stp.ko: kernel/llc.ko\n\
                 kernel/llc.ko:\n\
                 kernel/overlay.ko:\n\
                 kernel/ip_vs_rr.ko.xz: kernel/ip_vs.ko.zst kernel/nf_conntrack.ko\n\
                 kernel/ip_vs.ko.zst: kernel/nf_conntrack.ko\n\
                 kernel/nf_conntrack.ko:\n",
            )
            .with_file(&format!("{DIR}/modules.builtin.keelson"), "virtio_pci\n")
            .with_file(
                &format!("{DIR}/modules.builtin"),
                "kernel/fs/ext4/ext4.ko\nkernel/drivers/block/virtio-blk.ko\n",
            )
    }

    fn finit(files: &[&str]) -> Vec<Call> {
        files
            .iter()
            .map(|f| {
                Call::FinitModule(
                    format!("{DIR}/kernel/{f}"),
                    f.ends_with(".xz") || f.ends_with(".zst"),
                )
            })
            .collect()
    }

    fn check(fake: &Fake, names: &[&str], calls: &[&str], lines: &[&str]) -> Report {
        let index = match ModuleIndex::load(fake, Path::new(MODULES_ROOT)) {
            Ok(i) => i,
            Err(e) => panic!("index: {e}"),
        };
        let log = MemoryLog::default();
        let report = load(fake, &log, &index, names);
        assert_eq!(fake.calls(), finit(calls));
        let expected: Vec<String> = lines.iter().map(|l| format!("keelson-init: {l}")).collect();
        assert_eq!(log.lines(), expected);
        report
    }

    #[test]
    fn dependencies_load_first_from_last_to_first() {
        let report = check(
            &fake(),
            &["br_netfilter", "overlay"],
            &[
                "llc.ko",
                "stp.ko",
                "bridge.ko",
                "br_netfilter.ko",
                "overlay.ko",
            ],
            &[
                "module llc loaded",
                "module stp loaded",
                "module bridge loaded",
                "module br_netfilter loaded",
                "module overlay loaded",
            ],
        );
        assert_eq!(
            report.loaded,
            ["llc", "stp", "bridge", "br_netfilter", "overlay"]
        );
        assert!(report.ok() && report.is_available("br-netfilter"));
    }

    #[test]
    fn builtin_and_loaded_modules_are_skipped_and_names_normalised() {
        let fake = fake()
            .with_file(
                "/proc/modules",
                "llc 16384 1 stp, Live 0x0\nstp 12288 1 bridge, Live 0x0\n",
            )
            .with_file("/sys/module/overlay", "");
        let report = check(
            &fake,
            &[
                "virtio-pci",
                "ext4",
                "overlay",
                "br-netfilter",
                "bridge",
                "virtio_blk",
            ],
            &["bridge.ko", "br_netfilter.ko"],
            &[
                "module virtio_pci is built into the kernel",
                "module ext4 is built into the kernel",
                "module overlay already loaded",
                "module bridge loaded",
                "module br_netfilter loaded",
                "module virtio_blk is built into the kernel",
            ],
        );
        assert_eq!(report.already, ["overlay", "llc", "stp"]);
        assert_eq!(report.builtin, ["virtio_pci", "ext4", "virtio_blk"]);
    }

    #[test]
    fn compressed_files_ask_the_kernel_to_decompress() {
        let report = check(
            &fake(),
            &["ip_vs_rr"],
            &["nf_conntrack.ko", "ip_vs.ko.zst", "ip_vs_rr.ko.xz"],
            &[
                "module nf_conntrack loaded",
                "module ip_vs loaded",
                "module ip_vs_rr loaded",
            ],
        );
        assert!(report.ok());
    }

    #[test]
    fn a_failed_dependency_stops_what_needs_it_and_eexist_is_fine() {
        let mut fake = fake();
        fake.module_errors
            .insert(PathBuf::from(format!("{DIR}/kernel/stp.ko")), 22);
        fake.module_errors
            .insert(PathBuf::from(format!("{DIR}/kernel/overlay.ko")), 17);
        let report = check(
            &fake,
            &["br_netfilter", "bridge", "overlay", "nosuch"],
            &["llc.ko", "stp.ko", "overlay.ko"],
            &[
                "module llc loaded",
                &format!(
                    "module stp failed to load: finit_module {DIR}/kernel/stp.ko failed with \
                     EINVAL (22): the kernel refused it (wrong kernel version or a bad parameter)"
                ),
                "module bridge not loaded: its dependency stp failed to load",
                "module br_netfilter not loaded: its dependency stp failed to load",
                "module overlay already loaded",
                &format!(
                    "module nosuch not loaded: not in this image's module tree: add it to \
                     [modules].root in images/keelson.toml (index: {DIR}/modules.dep)"
                ),
            ],
        );
        let failed: Vec<&str> = report.failed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(failed, ["stp", "bridge", "br_netfilter", "nosuch"]);
        assert_eq!(report.already, ["overlay"]);
        assert!(!report.is_available("bridge"));
    }

    #[test]
    fn a_missing_index_names_the_release() {
        let err = ModuleIndex::load(&Fake::new(), Path::new(MODULES_ROOT))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.starts_with(
                "cannot read the module index /usr/lib/modules/6.12.0-test/modules.dep: ENOENT (2)"
            ),
            "{err}"
        );
    }

    #[test]
    fn dep_and_builtin_parsing() {
        let deps = parse_dep("# c\nkernel/a-b.ko.xz: kernel/c.ko\nbroken line\n\n");
        assert_eq!(
            deps.get("a_b"),
            Some(&Entry {
                file: "kernel/a-b.ko.xz".into(),
                deps: vec!["kernel/c.ko".into()]
            })
        );
        assert_eq!(deps.len(), 1);
        let b = parse_builtin("kernel/drivers/virtio/virtio_pci.ko\nsha256-generic\n");
        assert!(b.contains("virtio_pci") && b.contains("sha256_generic"));
    }
}
