//! Applying a new machine config to the running node: the control socket's `apply`
//! request, which machined sends for `apply-config --mode no-reboot|try` and to revert.
//!
//! The request names the [`Part`]s that changed and carries the whole new config. PID 1
//! applies them in three steps, and refuses the request whole at the first two:
//!
//! 1. **Judge** ([`judge`]): the config is checked with `keelson_configs::check_bytes` in
//!    metal mode, as at boot; any error refuses it with the validator's messages.
//! 2. **Plan** ([`plan`]): every change is checked against the running node before any is
//!    made: each kernel module is in the module index (or built in, or loaded), each
//!    sysctl exists in `/proc/sys` (or comes with a module the same request loads) and its
//!    present value is read, each file's path is one `machine.files` may write (under
//!    /var or /etc, never STATE's own files: validation's rule, checked again) and its
//!    present content kept; no file is written through a symbolic link.
//!    Values already in effect are left out, so the plan holds only real changes.
//! 3. **Apply** ([`apply`]): modules, sysctls (each read back), files, hostname, in that
//!    order. When a step fails, the sysctls and files already changed are put back to
//!    what they were (modules loaded stay loaded: the kernel has no undo that is safe
//!    while something may use them), and the answer says so. The network is restarted by
//!    the caller (`stage2`), which owns the network engine.
//!
//! Every change is one boot-log line, and the same lines are the answer's `messages`.
//! `machine.kubelet` and `machine.time_servers` have nothing to apply yet (no service
//! reads them: the kubelet takes its flags from `services`, and the node runs no time
//! client); the answer says so instead of pretending.

use std::fmt;
use std::path::{Path, PathBuf};

use keelson_configs::layout::STATE_MOUNT;
use keelson_configs::validate::{check_machine_file_path, too_big};
use keelson_configs::{MachineConfig, Mode, check_bytes};
use keelson_netconf::resolv;

use crate::config_source::MAX_CONFIG;
use crate::console::Log;
use crate::etc_files::{self, Entry};
use crate::kmods::{self, ModuleIndex};
use crate::syscalls::{Syscalls, errno_name};
use crate::sysctl;

/// A part of the machine config that can change on a running node: the node protocol's,
/// as machined names it in `apply`.
pub use keelson_node_protocol::control::Part;

/// Where a live apply reads and writes: the node's own paths, or temporary ones in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// The sysctl tree (`/proc/sys`).
    pub proc_sys: PathBuf,
    /// What `machine.files` paths are relative to (`/`).
    pub root: PathBuf,
    /// The writable `/etc` (`None` when it stayed read-only).
    pub etc: Option<PathBuf>,
}

impl Paths {
    /// The paths of a running node.
    pub fn node(etc_writable: bool) -> Paths {
        Paths {
            proc_sys: PathBuf::from(sysctl::PROC_SYS),
            root: PathBuf::from("/"),
            etc: etc_writable.then(|| PathBuf::from("/etc")),
        }
    }
}

/// What a live apply works with.
#[derive(Clone, Copy)]
pub struct Env<'a> {
    /// The kernel.
    pub sys: &'a dyn Syscalls,
    /// The boot log.
    pub log: &'a dyn Log,
    /// The module index, if the root has one.
    pub modules: Option<&'a ModuleIndex>,
    /// Paths.
    pub paths: &'a Paths,
    /// The config in effect (for what the new one drops).
    pub current: Option<&'a MachineConfig>,
    /// The machine id (the default hostname derives from it).
    pub machine_id: &'a str,
}

impl fmt::Debug for Env<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Env")
            .field("paths", self.paths)
            .field("machine_id", &self.machine_id)
            .finish_non_exhaustive()
    }
}

/// One sysctl to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlChange {
    /// The name.
    pub name: String,
    /// The value wanted.
    pub value: String,
    /// The value now (`None`: the key appears with a module this apply loads).
    pub previous: Option<String>,
}

/// One file to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    /// The path as the config names it.
    pub path: String,
    /// Where it is written (under [`Paths::root`]).
    pub target: PathBuf,
    /// The content wanted.
    pub content: Vec<u8>,
    /// The mode wanted.
    pub mode: u32,
    /// The content and mode now, if the file exists.
    pub previous: Option<(Vec<u8>, u32)>,
}

/// Every change a request makes, checked against the node and not yet made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Modules to load (those not loaded or built in).
    pub modules: Vec<String>,
    /// Sysctls whose value changes.
    pub sysctls: Vec<SysctlChange>,
    /// Files whose content or mode changes.
    pub files: Vec<FileChange>,
    /// The hostname to set.
    pub hostname: Option<String>,
    /// Restart the network engine with the new `machine.network`.
    pub network: bool,
    /// What is not changed, and why (one line each, answered and logged).
    pub notes: Vec<String>,
}

/// Check the config as boot does: the config, or the validator's error messages.
pub fn judge(bytes: &[u8]) -> Result<MachineConfig, Vec<String>> {
    if bytes.len() > MAX_CONFIG {
        return Err(vec![too_big(bytes.len())]);
    }
    let checked = check_bytes(bytes, "the applied config", Mode::Metal);
    let errors: Vec<String> = checked
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(ToString::to_string)
        .collect();
    match checked.config {
        Some(config) if errors.is_empty() => Ok(config),
        _ => Err(errors),
    }
}

fn loaded_modules(sys: &dyn Syscalls) -> Vec<String> {
    sys.read_file(Path::new("/proc/modules"))
        .map(|b| {
            kmods::parse_proc_modules(&String::from_utf8_lossy(&b))
                .into_iter()
                .collect()
        })
        .unwrap_or_default()
}

/// The module a missing sysctl tree comes with.
fn module_of_sysctl(name: &str) -> Option<&'static str> {
    let dotted = name.replace('/', ".");
    if dotted.starts_with("net.bridge.") {
        Some("br_netfilter")
    } else if dotted.starts_with("net.netfilter.nf_conntrack") {
        Some("nf_conntrack")
    } else {
        None
    }
}

/// Step 2: check every change of `parts` against the node; nothing is changed. The
/// errors say, per key, what is wrong and what to do.
pub fn plan(env: &Env<'_>, parts: &[Part], new: &MachineConfig) -> Result<Plan, Vec<String>> {
    let mut plan = Plan::default();
    let mut errors = Vec::new();
    let machine = &new.machine;
    if parts.contains(&Part::KernelModules) {
        plan_modules(env, new, &mut plan, &mut errors);
    }
    if parts.contains(&Part::Sysctls) {
        // After the modules: a sysctl may come with a module this request loads.
        plan_sysctls(env, new, &mut plan, &mut errors);
    }
    if parts.contains(&Part::Files) {
        plan_files(env, new, &mut plan, &mut errors);
    }
    if parts.contains(&Part::Hostname) {
        plan.hostname = Some(
            machine
                .hostname
                .clone()
                .unwrap_or_else(|| etc_files::default_hostname(env.machine_id)),
        );
    }
    plan.network = parts.contains(&Part::Network);
    if parts.contains(&Part::Kubelet) {
        plan.notes.push(
            "machine.kubelet: nothing for PID 1 to apply: machined rewrites the kubelet's flags and configuration and restarts it".into(),
        );
    }
    if parts.contains(&Part::TimeServers) {
        plan.notes.push(
            "machine.time_servers: nothing to apply: this node runs no time client yet; it is kept in STATE".into(),
        );
    }
    if errors.is_empty() {
        Ok(plan)
    } else {
        Err(errors)
    }
}

/// The modules to load: each in the module index, and not built in or loaded already.
fn plan_modules(env: &Env<'_>, new: &MachineConfig, plan: &mut Plan, errors: &mut Vec<String>) {
    let machine = &new.machine;
    let loaded = loaded_modules(env.sys);
    match env.modules {
        None => errors.push(
            "machine.kernel_modules: this node has no module index, so no module can be loaded live; apply with --mode reboot".to_string(),
        ),
        Some(index) => {
            for requested in machine.effective_kernel_modules() {
                let name = kmods::normalize(&requested);
                if index.builtin.contains(&name)
                    || loaded.contains(&name)
                    || env.sys.exists(&Path::new("/sys/module").join(&name))
                {
                    continue;
                }
                if !index.modules.contains_key(&name) {
                    errors.push(format!(
                        "machine.kernel_modules: module {requested}: {}",
                        kmods::Failure::Unknown
                    ));
                    continue;
                }
                plan.modules.push(name);
            }
        }
    }
    if let Some(current) = env.current {
        let now = machine.effective_kernel_modules();
        for old in current.machine.effective_kernel_modules() {
            if !now.contains(&old) {
                plan.notes.push(format!(
                    "module {old} is no longer in the config: it stays loaded until the next boot"
                ));
            }
        }
    }
}

/// The sysctls to set: each exists (or comes with a module of [`Plan::modules`]) and
/// has another value now.
fn plan_sysctls(env: &Env<'_>, new: &MachineConfig, plan: &mut Plan, errors: &mut Vec<String>) {
    let machine = &new.machine;
    let sysctls = machine.effective_sysctls();
    for (name, value) in &sysctls {
        let path = match sysctl::path_of(&env.paths.proc_sys, name) {
            Ok(p) => p,
            Err(e) => {
                errors.push(format!("machine.sysctls: {e}"));
                continue;
            }
        };
        if value.contains('\n') || value.contains('\0') {
            errors.push(format!(
                "machine.sysctls: {}",
                sysctl::Error::InvalidValue {
                    name: name.clone(),
                    value: value.clone(),
                }
            ));
            continue;
        }
        match env.sys.read_file(&path) {
            Ok(bytes) => {
                let now = String::from_utf8_lossy(&bytes);
                let now: Vec<&str> = now.split_whitespace().collect();
                let want: Vec<&str> = value.split_whitespace().collect();
                if now != want {
                    plan.sysctls.push(SysctlChange {
                        name: name.clone(),
                        value: value.clone(),
                        previous: Some(now.join(" ")),
                    });
                }
            }
            Err(e)
                if e.raw_os_error() == Some(2)
                    && module_of_sysctl(name)
                        .is_some_and(|m| plan.modules.iter().any(|w| w == m)) =>
            {
                plan.sysctls.push(SysctlChange {
                    name: name.clone(),
                    value: value.clone(),
                    previous: None,
                });
            }
            Err(e) => errors.push(format!(
                "machine.sysctls: {name}: cannot read {}: {}: {}",
                path.display(),
                errno_name(&e),
                sysctl::hint(name, &e)
            )),
        }
    }
    if let Some(current) = env.current {
        for old in current.machine.effective_sysctls().keys() {
            if !sysctls.contains_key(old) {
                plan.notes.push(format!(
                    "sysctl {old} is no longer in the config: it keeps its value until the next boot"
                ));
            }
        }
    }
}

/// The files to write: each path absolute, its present content and mode kept for an
/// undo, those already in place left out.
fn plan_files(env: &Env<'_>, new: &MachineConfig, plan: &mut Plan, errors: &mut Vec<String>) {
    let machine = &new.machine;
    for (i, file) in machine.files.iter().enumerate() {
        // Validation refused it already; checked again before anything is read or written.
        if let Err(e) = check_machine_file_path(&file.path, STATE_MOUNT) {
            let hint = e
                .hint
                .as_ref()
                .map(|h| format!(" ({h})"))
                .unwrap_or_default();
            errors.push(format!("machine.files[{i}].path: {e}{hint}"));
            continue;
        }
        let Some(relative) = file.path.strip_prefix('/') else {
            continue;
        };
        let target = env.paths.root.join(relative);
        let previous = match env.sys.read_file(&target) {
            Ok(bytes) => Some((bytes, env.sys.file_mode(&target).unwrap_or(0o644))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                errors.push(format!(
                    "machine.files: cannot read the present {}: {e}",
                    file.path
                ));
                continue;
            }
        };
        let content = file.content.as_bytes().to_vec();
        if previous
            .as_ref()
            .is_some_and(|(c, m)| *c == content && *m == file.mode.0)
        {
            continue;
        }
        plan.files.push(FileChange {
            path: file.path.clone(),
            target,
            content,
            mode: file.mode.0,
            previous,
        });
    }
    if let Some(current) = env.current {
        for old in &current.machine.files {
            if !machine.files.iter().any(|f| f.path == old.path) {
                plan.notes.push(format!(
                    "file {} is no longer in the config: it is left in place",
                    old.path
                ));
            }
        }
    }
}

/// Write a file with its parents and mode, never through a symbolic link
/// ([`Syscalls::install_file`]).
fn write_file(sys: &dyn Syscalls, target: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    sys.install_file(target, content, mode)
}

/// A file's content and mode before a change (`None`: it did not exist).
type Previous = Option<(Vec<u8>, u32)>;

/// What was changed so far, to put back after a failure.
#[derive(Default)]
struct Undo {
    sysctls: Vec<(String, String)>,
    files: Vec<(PathBuf, Previous)>,
    modules: Vec<String>,
}

impl Undo {
    /// Put back what was changed; one line per key that could not be.
    fn run(self, env: &Env<'_>) -> String {
        let mut failed = Vec::new();
        for (name, value) in self.sysctls.iter().rev() {
            if let Err(e) = sysctl::set(env.sys, &env.paths.proc_sys, name, value) {
                failed.push(format!("sysctl {name}: {e}"));
            }
        }
        for (target, previous) in self.files.iter().rev() {
            let result = match previous {
                Some((content, mode)) => write_file(env.sys, target, content, *mode),
                // Never written (the write failed before creating it) is fine too.
                None => env.sys.remove_file(target).or_else(|e| {
                    if !env.sys.exists(target) {
                        Ok(())
                    } else {
                        Err(e)
                    }
                }),
            };
            if let Err(e) = result {
                failed.push(format!("file {}: {e}", target.display()));
            }
        }
        let mut text = if failed.is_empty() {
            "every change made before it was put back".to_string()
        } else {
            format!(
                "putting the changes back failed for: {}; reboot the node to return to the config in STATE",
                failed.join("; ")
            )
        };
        if !self.modules.is_empty() {
            text.push_str(&format!(
                " (modules loaded stay loaded: {})",
                self.modules.join(", ")
            ));
        }
        text
    }
}

/// Step 3: make the changes of `plan` (the network excepted). Returns the lines logged;
/// on a failure, what was changed is put back and the error says what failed.
pub fn apply(env: &Env<'_>, plan: &Plan) -> Result<Vec<String>, String> {
    let mut messages = Vec::new();
    let mut say = |line: String| {
        env.log.line(&line);
        messages.push(line);
    };
    let mut undo = Undo::default();
    if !plan.modules.is_empty()
        && let Some(index) = env.modules
    {
        let report = kmods::load(env.sys, &Silent, index, &plan.modules);
        undo.modules.clone_from(&report.loaded);
        for name in &report.loaded {
            say(format!("module {name} loaded"));
        }
        if let Some((name, why)) = report.failed.first() {
            let failure = format!("module {name} failed to load: {why}");
            env.log.line(&failure);
            return Err(format!("{failure}; {}", undo.run(env)));
        }
    }
    for change in &plan.sysctls {
        match sysctl::set(env.sys, &env.paths.proc_sys, &change.name, &change.value) {
            Ok(()) => {
                say(match &change.previous {
                    Some(old) => format!(
                        "sysctl {}={} applied (was {old})",
                        change.name, change.value
                    ),
                    None => format!("sysctl {}={} applied", change.name, change.value),
                });
                if let Some(old) = &change.previous {
                    undo.sysctls.push((change.name.clone(), old.clone()));
                }
            }
            Err(e) => {
                let failure = format!("sysctl {}={} failed: {e}", change.name, change.value);
                env.log.line(&failure);
                return Err(format!("{failure}; {}", undo.run(env)));
            }
        }
    }
    for file in &plan.files {
        match write_file(env.sys, &file.target, &file.content, file.mode) {
            Ok(()) => {
                say(format!("file {} written ({:o})", file.path, file.mode));
                undo.files
                    .push((file.target.clone(), file.previous.clone()));
            }
            Err(e) => {
                // A partial write is put back too.
                undo.files
                    .push((file.target.clone(), file.previous.clone()));
                let failure = format!("file {} not written: {e}", file.path);
                env.log.line(&failure);
                return Err(format!("{failure}; {}", undo.run(env)));
            }
        }
    }
    if let Some(name) = &plan.hostname {
        if let Err(e) = env.sys.sethostname(name) {
            let failure = format!("hostname {name} not set: {}", errno_name(&e));
            env.log.line(&failure);
            return Err(format!("{failure}; {}", undo.run(env)));
        }
        say(format!("hostname {name}"));
        if let Some(etc) = &env.paths.etc {
            let entries = [
                Entry::file("hostname", format!("{name}\n")),
                Entry::file("hosts", resolv::hosts(name, &[])),
            ];
            if let Err(e) = etc_files::write(env.sys, etc, &entries) {
                say(format!("/etc/hostname not written: {e}"));
            }
        }
    }
    for note in &plan.notes {
        say(note.clone());
    }
    Ok(messages)
}

/// A log that drops lines: `kmods::load` reports per module, and [`apply`] says it
/// itself once per module loaded.
struct Silent;

impl Log for Silent {
    fn line(&self, _message: &str) {}
    fn raw(&self, _text: &str) {}
}

#[cfg(test)]
// Tests build their fixtures on disk.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::console::memory::MemoryLog;
    use crate::syscalls::fake::{Call, Fake};

    const BASE: &str = include_str!("../../configs/tests/data/controlplane.toml");

    /// The test config without its own modules, sysctls and files, then edited by `f`
    /// (which gets the `[machine]` table).
    fn text(f: impl FnOnce(&mut toml::Table)) -> String {
        let mut all: toml::Table = toml::from_str(BASE).unwrap_or_default();
        if let Some(toml::Value::Table(machine)) = all.get_mut("machine") {
            for key in ["kernel_modules", "sysctls", "files"] {
                machine.remove(key);
            }
            f(machine);
        }
        toml::to_string(&all).unwrap_or_default()
    }

    fn config(text: &str) -> MachineConfig {
        match judge(text.as_bytes()) {
            Ok(c) => c,
            Err(e) => panic!("test config invalid: {e:?}\n{text}"),
        }
    }

    fn sysctls(pairs: &[(&str, &str)]) -> MachineConfig {
        config(&text(|m| {
            let table: toml::Table = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), toml::Value::String(v.to_string())))
                .collect();
            m.insert("sysctls".into(), toml::Value::Table(table));
        }))
    }

    fn proc_fake() -> Fake {
        let mut fake = Fake::new()
            .with_file("/proc/sys/net/ipv4/ip_forward", "1\n")
            .with_file("/proc/sys/net/bridge/bridge-nf-call-iptables", "1\n")
            .with_file("/proc/sys/net/bridge/bridge-nf-call-ip6tables", "1\n")
            .with_file("/proc/sys/vm/swappiness", "60\n")
            .with_file(
                "/proc/modules",
                "br_netfilter 32768 0 - Live 0x0\noverlay 1 0 - Live 0x0\n",
            );
        fake.strict_writes = true;
        fake
    }

    fn paths(root: &Path) -> Paths {
        Paths {
            proc_sys: PathBuf::from("/proc/sys"),
            root: root.to_path_buf(),
            etc: Some(root.join("etc")),
        }
    }

    fn env<'a>(
        sys: &'a Fake,
        log: &'a MemoryLog,
        paths: &'a Paths,
        current: Option<&'a MachineConfig>,
    ) -> Env<'a> {
        Env {
            sys,
            log,
            modules: None,
            paths,
            current,
            machine_id: "0123456789abcdef0123456789abcdef",
        }
    }

    fn plan_ok(env: &Env<'_>, parts: &[Part], new: &MachineConfig) -> Plan {
        plan(env, parts, new).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn an_invalid_config_is_refused_with_the_validators_messages() {
        let errors = judge(
            text(|m| {
                m.insert("type".into(), "nope".into());
            })
            .as_bytes(),
        )
        .err()
        .unwrap_or_default();
        assert!(
            errors.iter().any(|e| e.contains("machine.type")),
            "{errors:?}"
        );
        let big = vec![b'#'; MAX_CONFIG + 1];
        assert_eq!(
            judge(&big).err(),
            Some(vec![
                "the config is 1048577 bytes, over the 1048576-byte (1 MiB) limit".to_string()
            ])
        );
    }

    #[test]
    fn only_changed_sysctls_are_planned_and_applied_with_read_back() {
        let dir = tempdir();
        let fake = proc_fake().reading_real(dir.path());
        let log = MemoryLog::default();
        let paths = paths(dir.path());
        let old = sysctls(&[]);
        let new = sysctls(&[("vm.swappiness", "10")]);
        let env = env(&fake, &log, &paths, Some(&old));
        let plan = plan_ok(&env, &[Part::Sysctls], &new);
        assert_eq!(
            plan.sysctls,
            [SysctlChange {
                name: "vm.swappiness".into(),
                value: "10".into(),
                previous: Some("60".into()),
            }]
        );
        let messages = apply(&env, &plan).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(messages, ["sysctl vm.swappiness=10 applied (was 60)"]);
        assert_eq!(
            fake.read_file(Path::new("/proc/sys/vm/swappiness")).ok(),
            Some(b"10\n".to_vec())
        );
        assert_eq!(
            log.lines(),
            ["keelson-init: sysctl vm.swappiness=10 applied (was 60)"]
        );
        // Going back: the dropped key is named, its value stays.
        let env2 = Env {
            current: Some(&new),
            ..env
        };
        let back = plan_ok(&env2, &[Part::Sysctls], &old);
        assert!(back.sysctls.is_empty());
        assert_eq!(
            back.notes,
            [
                "sysctl vm.swappiness is no longer in the config: it keeps its value until the next boot"
            ]
        );
    }

    #[test]
    fn a_missing_sysctl_or_module_refuses_the_whole_request_before_any_change() {
        let dir = tempdir();
        let fake = proc_fake().reading_real(dir.path());
        let log = MemoryLog::default();
        let paths = paths(dir.path());
        let new = sysctls(&[("vm.swappiness", "10"), ("kernel.no_such_key", "1")]);
        let env = env(&fake, &log, &paths, None);
        let errors = plan(&env, &[Part::Sysctls, Part::KernelModules], &new)
            .err()
            .unwrap_or_default();
        assert_eq!(
            errors,
            [
                "machine.kernel_modules: this node has no module index, so no module can be loaded live; apply with --mode reboot",
                "machine.sysctls: kernel.no_such_key: cannot read /proc/sys/kernel/no_such_key: ENOENT (2): this kernel has no such sysctl: check the name",
            ]
        );
        assert!(fake.calls().is_empty(), "{:?}", fake.calls());
        assert!(log.lines().is_empty());

        let index = ModuleIndex {
            dir: PathBuf::from("/usr/lib/modules/6.12.0-test"),
            modules: kmods::parse_dep("kernel/net/sched/sch_fq.ko:\n"),
            builtin: Default::default(),
        };
        let env = Env {
            modules: Some(&index),
            ..env
        };
        let modules = |names: &[&str]| {
            config(&text(|m| {
                m.insert(
                    "kernel_modules".into(),
                    toml::Value::Array(names.iter().map(|n| (*n).into()).collect()),
                );
            }))
        };
        let errors = plan(
            &env,
            &[Part::KernelModules],
            &modules(&["sch_fq", "no_such_mod"]),
        )
        .err()
        .unwrap_or_default();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with(
                "machine.kernel_modules: module no_such_mod: not in this image's module tree"
            ),
            "{errors:?}"
        );
        let plan = plan_ok(&env, &[Part::KernelModules], &modules(&["sch_fq"]));
        assert_eq!(plan.modules, ["sch_fq"]);
        let messages = apply(&env, &plan).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(messages, ["module sch_fq loaded"]);
        assert_eq!(
            fake.calls(),
            [Call::FinitModule(
                "/usr/lib/modules/6.12.0-test/kernel/net/sched/sch_fq.ko".into(),
                false
            )]
        );
    }

    #[test]
    fn a_failure_half_way_puts_back_what_was_changed() {
        let dir = tempdir();
        let mut fake = proc_fake().reading_real(dir.path());
        fake.write_errors
            .insert(PathBuf::from("/proc/sys/vm/swappiness"), 22);
        let log = MemoryLog::default();
        let paths = paths(dir.path());
        let new = sysctls(&[("net.ipv4.ip_forward", "0"), ("vm.swappiness", "500")]);
        let env = env(&fake, &log, &paths, None);
        let plan = plan_ok(&env, &[Part::Sysctls], &new);
        let err = apply(&env, &plan).err().unwrap_or_default();
        assert_eq!(
            err,
            "sysctl vm.swappiness=500 failed: cannot write /proc/sys/vm/swappiness: EINVAL (22): the kernel refused the value: check its range and format; every change made before it was put back"
        );
        assert_eq!(
            fake.read_file(Path::new("/proc/sys/net/ipv4/ip_forward"))
                .ok(),
            Some(b"1\n".to_vec()),
            "ip_forward is back to 1"
        );
    }

    fn files(list: &[(&str, &str, Option<&str>)], hostname: Option<&str>) -> MachineConfig {
        config(&text(|m| {
            let files = list
                .iter()
                .map(|(path, content, mode)| {
                    let mut t = toml::Table::new();
                    t.insert("path".into(), (*path).into());
                    t.insert("content".into(), (*content).into());
                    if let Some(mode) = mode {
                        t.insert("mode".into(), (*mode).into());
                    }
                    toml::Value::Table(t)
                })
                .collect();
            m.insert("files".into(), toml::Value::Array(files));
            if let Some(h) = hostname {
                m.insert("hostname".into(), h.into());
            }
        }))
    }

    #[test]
    fn files_and_hostname_are_written_and_a_failed_file_is_undone() {
        let dir = tempdir();
        let root = dir.path();
        for d in ["etc", "var/lib"] {
            std::fs::create_dir_all(root.join(d)).unwrap_or_else(|e| panic!("{e}"));
        }
        std::fs::write(root.join("var/lib/old.conf"), "old\n").unwrap_or_else(|e| panic!("{e}"));
        let fake = proc_fake().reading_real(dir.path());
        let log = MemoryLog::default();
        let paths = paths(root);
        let new = files(
            &[
                ("/var/lib/old.conf", "new\n", Some("0600")),
                ("/var/lib/a/b.conf", "b\n", None),
            ],
            Some("live-node"),
        );
        let env = env(&fake, &log, &paths, None);
        let plan = plan_ok(&env, &[Part::Files, Part::Hostname], &new);
        let messages = apply(&env, &plan).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            messages,
            [
                "file /var/lib/old.conf written (600)",
                "file /var/lib/a/b.conf written (644)",
                "hostname live-node",
            ]
        );
        let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_default();
        assert_eq!(read("var/lib/old.conf"), "new\n");
        assert_eq!(read("var/lib/a/b.conf"), "b\n");
        assert_eq!(read("etc/hostname"), "live-node\n");
        assert!(
            fake.calls()
                .contains(&Call::Sethostname("live-node".into()))
        );

        // The same again: nothing to write.
        assert!(plan_ok(&env, &[Part::Files], &new).files.is_empty());

        // A file whose parent is a file is refused before anything is written.
        std::fs::write(root.join("var/blocker"), "x").unwrap_or_else(|e| panic!("{e}"));
        let blocked = files(&[("/var/blocker/c.conf", "c\n", None)], None);
        let errors = super::plan(&env, &[Part::Files], &blocked)
            .err()
            .unwrap_or_default();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("machine.files: cannot read the present /var/blocker/c.conf: "),
            "{errors:?}"
        );

        // A path outside /var and /etc, or STATE's own file, is refused by the plan too
        // (validation refuses it first), whatever the config's source.
        let mut outside = files(&[("/var/a", "x\n", None), ("/var/b", "x\n", None)], None);
        outside.machine.files[0].path = "/usr/lib/os-release".into();
        outside.machine.files[1].path = "/system/state/config.toml".into();
        let errors = super::plan(&env, &[Part::Files], &outside)
            .err()
            .unwrap_or_default();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with(
                "machine.files[0].path: \"/usr/lib/os-release\" is not under /var or /etc ("
            ),
            "{errors:?}"
        );
        assert!(
            errors[1]
                .starts_with("machine.files[1].path: \"/system/state/config.toml\" is in STATE"),
            "{errors:?}"
        );

        // A write that fails after the plan (the node changed in between): the file
        // written before it is put back.
        let bad = files(
            &[
                ("/var/lib/old.conf", "newer\n", Some("0600")),
                ("/var/lib/x/c.conf", "c\n", None),
            ],
            None,
        );
        let env = Env {
            current: Some(&new),
            ..env
        };
        let plan = plan_ok(&env, &[Part::Files], &bad);
        assert_eq!(
            plan.notes,
            ["file /var/lib/a/b.conf is no longer in the config: it is left in place"]
        );
        std::fs::write(root.join("var/lib/x"), "in the way").unwrap_or_else(|e| panic!("{e}"));
        let err = apply(&env, &plan).err().unwrap_or_default();
        assert!(
            err.starts_with("file /var/lib/x/c.conf not written: ")
                && err.ends_with("every change made before it was put back"),
            "{err}"
        );
        assert_eq!(read("var/lib/old.conf"), "new\n");
    }

    #[test]
    fn parts_use_machineds_names_on_the_wire() {
        let parts: Vec<Part> = serde_json::from_str(
            r#"["sysctls","kernel_modules","files","hostname","kubelet","network","time_servers"]"#,
        )
        .unwrap_or_default();
        assert_eq!(
            parts.iter().map(|p| p.key()).collect::<Vec<_>>(),
            [
                "machine.sysctls",
                "machine.kernel_modules",
                "machine.files",
                "machine.hostname",
                "machine.kubelet",
                "machine.network",
                "machine.time_servers"
            ]
        );
        assert!(serde_json::from_str::<Part>(r#""cluster""#).is_err());
    }
}
