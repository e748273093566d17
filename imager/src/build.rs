//! Building a disk image: from the definition, its lock and our cross-compiled binaries
//! to `keelson.raw` (and `.raw.zst`, `.qcow2`), through the root filesystem, its
//! dm-verity tree, the initramfs, the ESP and the GPT.
//!
//! Every step is in memory or writes under the output directory with a temporary name;
//! the final files are renamed into place only when they are complete, so a failed build
//! never leaves a half-written image under the output name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use keelson_configs::boot::{EntryName, EntryVersion, VerityParams};
use keelson_configs::layout::{self, Arch, Slot};

use crate::debian::deb::{self, EntryKind};
use crate::debian::fetch::Cache;
use crate::debian::lock::Lock;
use crate::debian::{Mirror, Progress};
use crate::definition::Definition;
use crate::derived::DerivedCache;
use crate::esp::{BootEntry, Esp, LoaderConf};
use crate::gpt::{Content, DiskSpec, Guid, PartitionSpec};
use crate::kmod::ModuleIndex;
use crate::kubernetes::{self, BakedFile};
use crate::rootfs::{self, Tree};
use crate::{compress, cpio, gpt, squashfs, verity};

/// Errors building an image. Each names the input or step and what to do.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The definition could not be loaded.
    #[error(transparent)]
    Definition(#[from] crate::definition::DefinitionError),
    /// The lock file could not be loaded or does not match the definition.
    #[error(transparent)]
    Lock(#[from] crate::debian::lock::LockError),
    /// Fetching the pinned packages failed.
    #[error(transparent)]
    Fetch(#[from] crate::debian::fetch::FetchError),
    /// A package could not be read.
    #[error(transparent)]
    Deb(#[from] deb::DebError),
    /// A package the image needs is not in the lock.
    #[error(
        "{lock} pins no package `{package}`, which the image needs ({what}); \
         add it to {definition} and run `cargo xtask lock`"
    )]
    MissingPackage {
        /// The lock file.
        lock: PathBuf,
        /// The definition file.
        definition: PathBuf,
        /// The package.
        package: String,
        /// What it is needed for.
        what: &'static str,
    },
    /// A file the image needs is not in its package.
    #[error(
        "package `{package}` has no {what} (looked for {pattern}); is the lock for the right architecture?"
    )]
    MissingFile {
        /// The package.
        package: String,
        /// What was looked for.
        what: &'static str,
        /// The path pattern.
        pattern: String,
    },
    /// One of our binaries is missing.
    #[error(
        "binary {path} ({what}) does not exist: build it with `cargo xtask image`, which cross-compiles it"
    )]
    MissingBinary {
        /// The expected path.
        path: PathBuf,
        /// Which binary.
        what: String,
    },
    /// Kernel modules could not be resolved.
    #[error("kernel modules for the {what}")]
    Modules {
        /// Initramfs or root.
        what: &'static str,
        /// The cause.
        #[source]
        source: crate::kmod::KmodError,
    },
    /// The directory of an air-gapped Kubernetes could not be baked in.
    #[error(transparent)]
    Kubernetes(#[from] kubernetes::KubernetesError),
    /// The prefetch list could not be made.
    #[error(transparent)]
    Prefetch(#[from] crate::prefetch::PrefetchError),
    /// The file tree could not be assembled.
    #[error("assembling the {what}")]
    Tree {
        /// Which tree.
        what: &'static str,
        /// The cause.
        #[source]
        source: rootfs::RootfsError,
    },
    /// The root filesystem holds a shell or a setuid file.
    #[error(
        "the root filesystem fails its audit (no shell, no setuid file):\n  {0}\n\
         exclude the package that brings it in images/keelson.toml and run `cargo xtask lock`"
    )]
    Audit(String),
    /// The root filesystem could not be written.
    #[error(transparent)]
    Squashfs(#[from] squashfs::SquashfsError),
    /// The verity tree could not be built.
    #[error(transparent)]
    Verity(#[from] verity::VerityError),
    /// The initramfs could not be written.
    #[error(transparent)]
    Cpio(#[from] cpio::CpioError),
    /// The ESP could not be written.
    #[error(transparent)]
    Esp(#[from] crate::esp::EspError),
    /// The disk could not be written.
    #[error(transparent)]
    Gpt(#[from] gpt::GptError),
    /// Compression failed.
    #[error(transparent)]
    Compress(#[from] compress::CompressError),
    /// Something does not fit its partition.
    #[error(
        "the {what} needs {need} bytes but its partition holds {have}: \
         raise `{key}` in {definition}"
    )]
    TooBig {
        /// What does not fit.
        what: &'static str,
        /// Bytes needed.
        need: u64,
        /// Bytes available.
        have: u64,
        /// The definition key to raise.
        key: &'static str,
        /// The definition file.
        definition: PathBuf,
    },
    /// Output files could not be written.
    #[error("writing {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A recorded `build-inputs.toml` could not be read.
    #[error("build-inputs.toml is malformed: {message}; rebuild with `cargo xtask image`")]
    Inputs {
        /// What is wrong.
        message: String,
    },
    /// `qemu-img convert` failed.
    #[error("qemu-img could not convert {path} to qcow2: {stderr} (install qemu-utils)")]
    QemuImg {
        /// The source image.
        path: PathBuf,
        /// What it said.
        stderr: String,
    },
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// A raw disk image (`keelson.raw`), to `dd` onto a disk or boot in QEMU.
    Raw,
    /// The raw image compressed with zstd (`keelson.raw.zst`), for download.
    RawZst,
    /// QEMU's copy-on-write format (`keelson.qcow2`).
    Qcow2,
}

impl Format {
    /// Parse `raw`, `raw.zst` or `qcow2`.
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "raw" => Some(Format::Raw),
            "raw.zst" => Some(Format::RawZst),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }

    /// The file name extension.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::RawZst => "raw.zst",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The image definition (`images/keelson.toml`).
    pub definition: PathBuf,
    /// The architecture.
    pub arch: Arch,
    /// Our cross-compiled binaries, by binary name (`init` → path).
    pub binaries: BTreeMap<String, PathBuf>,
    /// Where the image files go.
    pub out_dir: PathBuf,
    /// Formats to write (the raw image is always written: the others derive from it).
    pub formats: Vec<Format>,
    /// Mirror for packages missing from the cache (`None`: the cache must be warm).
    pub mirror: Option<Mirror>,
    /// The package cache.
    pub cache: Cache,
    /// The OS version written into the image.
    pub version: String,
    /// Reuse what earlier builds derived from the same bytes (compressed squashfs blocks,
    /// in the package cache's `derived/`): the image is the same either way, only the
    /// time differs. Off for "clean" builds (the reproducibility test).
    pub reuse_derived: bool,
    /// A directory of an air-gapped Kubernetes to bake into the root (`kubelet`,
    /// `images/*.tar`: see [`crate::kubernetes`]).
    pub kubernetes: Option<PathBuf>,
    /// The public keys whose upgrade bundles the node accepts, by name → PEM text: each
    /// goes to [`UPGRADE_KEYS_DIR`]`/<name>.pub` in the root.
    pub trusted_keys: BTreeMap<String, String>,
}

/// The inputs of a build as recorded next to its output (`build-inputs.toml`), so
/// that the same build can be repeated (the reproducibility test does).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildInputs {
    definition: PathBuf,
    arch: String,
    binaries: BTreeMap<String, PathBuf>,
    cache: PathBuf,
    version: String,
    /// The air-gapped Kubernetes baked in, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kubernetes: Option<KubernetesInputs>,
    /// The trusted upgrade keys baked in (name → PEM text), recorded whole so that a
    /// repeated build bakes the same bytes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    trusted_keys: BTreeMap<String, String>,
}

/// The recorded `--kubernetes` directory and the files baked from it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KubernetesInputs {
    dir: PathBuf,
    files: Vec<BakedFile>,
}

/// The file a build records its inputs in, inside the output directory.
pub const BUILD_INPUTS: &str = "build-inputs.toml";

impl BuildOptions {
    /// Options that repeat a recorded build (raw output only, no mirror: the cache
    /// holds every input). The caller sets the output directory.
    pub fn from_inputs_toml(text: &str) -> Result<BuildOptions, BuildError> {
        let inputs: BuildInputs = toml::from_str(text).map_err(|e| BuildError::Inputs {
            message: e.to_string(),
        })?;
        let arch = Arch::from_debian(&inputs.arch).ok_or_else(|| BuildError::Inputs {
            message: format!("unknown architecture `{}`", inputs.arch),
        })?;
        Ok(BuildOptions {
            definition: inputs.definition,
            arch,
            binaries: inputs.binaries,
            out_dir: PathBuf::new(),
            formats: Vec::new(),
            mirror: None,
            cache: Cache::new(inputs.cache),
            version: inputs.version,
            reuse_derived: false,
            kubernetes: inputs.kubernetes.map(|k| k.dir),
            trusted_keys: inputs.trusted_keys,
        })
    }

    /// The record of this build's inputs, with the files `baked` from its Kubernetes
    /// directory.
    fn inputs_toml(&self, baked: Vec<BakedFile>) -> Result<String, BuildError> {
        let kubernetes = self
            .kubernetes
            .clone()
            .map(|dir| KubernetesInputs { dir, files: baked });
        let inputs = BuildInputs {
            definition: self.definition.clone(),
            arch: self.arch.debian().to_string(),
            binaries: self.binaries.clone(),
            cache: self.cache.root().to_path_buf(),
            version: self.version.clone(),
            kubernetes,
            trusted_keys: self.trusted_keys.clone(),
        };
        toml::to_string(&inputs).map_err(|e| BuildError::Inputs {
            message: e.to_string(),
        })
    }
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct BuildReport {
    /// Files written, with their sizes.
    pub files: Vec<(PathBuf, u64)>,
    /// The slot A verity root hash.
    pub root_hash: String,
    /// Kernel release.
    pub kernel_release: String,
    /// Sizes of intermediate artefacts: (name, bytes).
    pub artefacts: Vec<(&'static str, u64)>,
    /// Slot A's verity parameters (its root is the first `hash_offset` bytes of ROOT-A,
    /// then the hash tree).
    pub verity: VerityParams,
    /// The components the image carries, as written to [`COMPONENTS_PATH`].
    pub components: Vec<String>,
}

/// Where the root holds the public keys of the upgrade bundles it accepts
/// (`<name>.pub`, PEM).
pub const UPGRADE_KEYS_DIR: &str = "usr/share/keelson/upgrade-keys";
/// Where the root lists the components it carries, one a line: an upgrade may not drop
/// one ([`components`]).
pub const COMPONENTS_PATH: &str = "usr/lib/keelson/components";

/// The definition's packages that are components (Debian package → component name): the
/// parts of a node its workloads or cluster depend on, which an upgrade must keep.
const PACKAGE_COMPONENTS: &[(&str, &str)] = &[
    ("containerd", "containerd"),
    ("runc", "runc"),
    ("etcd-server", "etcd"),
    ("containernetworking-plugins", "cni-plugins"),
];

/// The components an image for `arch` carries, sorted: those of [`PACKAGE_COMPONENTS`]
/// that the definition requests for `arch`, and `kubelet` when a Kubernetes directory
/// bakes one in (`kubelet_baked`).
pub fn components(
    def: &Definition,
    arch: Arch,
    kubelet_baked: bool,
) -> Result<Vec<String>, BuildError> {
    let requested: Vec<String> = def
        .requests(arch)?
        .into_iter()
        .map(|r| r.name.to_string())
        .collect();
    let mut list: Vec<String> = PACKAGE_COMPONENTS
        .iter()
        .filter(|(package, _)| requested.iter().any(|r| r == package))
        .map(|(_, component)| component.to_string())
        .collect();
    if kubelet_baked {
        list.push("kubelet".to_string());
    }
    list.sort();
    Ok(list)
}

/// The fixed timestamp every file in the image carries: `SOURCE_DATE_EPOCH` if set,
/// else the pinned Debian release's date, so that the same inputs give the same bytes.
fn build_epoch(lock: &Lock) -> u64 {
    if let Some(v) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return v;
    }
    // Debian writes `Sat, 15 Nov 2025 10:07:05 UTC`; HTTP dates say GMT.
    let date = lock.release_date.replace("UTC", "GMT");
    httpdate::parse_http_date(&date)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(1_735_689_600) // 2025-01-01, for a lock without a parsable date
}

/// Debian's merged-/usr: top-level directories that are symlinks into /usr.
const USRMERGE: &[&str] = &["bin", "sbin", "lib", "lib64"];

/// Map a package path onto the merged-/usr layout (`sbin/x` → `usr/sbin/x`).
fn usrmerge(path: &str) -> String {
    let path = path.trim_start_matches("./").trim_start_matches('/');
    for dir in USRMERGE {
        if path == *dir {
            return format!("usr/{dir}");
        }
        if let Some(rest) = path.strip_prefix(&format!("{dir}/")) {
            return format!("usr/{dir}/{rest}");
        }
    }
    path.to_string()
}

/// Paths dropped from every package: documentation, locales, init scripts and cron
/// jobs (nothing runs them), and maintainer leftovers.
fn unwanted(path: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "usr/share/doc/",
        "usr/share/man/",
        "usr/share/info/",
        "usr/share/locale/",
        "usr/share/lintian/",
        "usr/share/bug/",
        "usr/share/bash-completion/",
        "usr/share/zsh/",
        "usr/share/fish/",
        "usr/share/doc-base/",
        "etc/init.d/",
        "etc/cron.d/",
        "etc/cron.daily/",
        "etc/cron.weekly/",
        "etc/cron.monthly/",
        "etc/logrotate.d/",
        "etc/default/",
        "usr/lib/systemd/",
        "lib/systemd/",
        "etc/systemd/",
    ];
    PREFIXES
        .iter()
        .any(|p| path.starts_with(p) || path == p.trim_end_matches('/'))
}

/// The systemd-boot binary's path in `systemd-boot-efi`.
fn systemd_boot_path(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => "usr/lib/systemd/boot/efi/systemd-bootx64.efi",
        Arch::Arm64 => "usr/lib/systemd/boot/efi/systemd-bootaa64.efi",
    }
}

/// Links Debian's maintainer scripts would make (update-alternatives) and that the
/// node needs: iptables through the nft backend.
const ALTERNATIVES: &[(&str, &str)] = &[
    ("usr/sbin/iptables", "xtables-nft-multi"),
    ("usr/sbin/iptables-save", "xtables-nft-multi"),
    ("usr/sbin/iptables-restore", "xtables-nft-multi"),
    ("usr/sbin/ip6tables", "xtables-nft-multi"),
    ("usr/sbin/ip6tables-save", "xtables-nft-multi"),
    ("usr/sbin/ip6tables-restore", "xtables-nft-multi"),
];

/// Directories every root needs as mount points or for the running system.
const ROOT_DIRS: &[&str] = &[
    "dev",
    "proc",
    "sys",
    "run",
    "tmp",
    "var",
    "etc",
    "mnt",
    // Mount point of STATE (`layout::STATE_MOUNT`): the root is read-only, so PID 1
    // cannot create it at boot.
    "system",
    "system/state",
    // Mount point of the ESP (`keelson_configs::boot::ESP_MOUNT`): stage 2 mounts it for
    // the boot assessment and upgrades.
    "boot",
    // Mount point of the CNI plugins' overlay (init's `stage2::CNI_BIN_DIR`), where pod
    // networks install their plugins.
    "opt",
    "opt/cni",
    "opt/cni/bin",
    "usr",
    "usr/bin",
    "usr/sbin",
    "usr/lib",
    "usr/lib64",
];

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn tree_err(what: &'static str) -> impl FnOnce(rootfs::RootfsError) -> BuildError {
    move |source| BuildError::Tree { what, source }
}

fn modules_err(what: &'static str) -> impl FnOnce(crate::kmod::KmodError) -> BuildError {
    move |source| BuildError::Modules { what, source }
}

/// The kernel's parts, taken from its package.
struct Kernel {
    release: String,
    image: Vec<u8>,
    modules: ModuleIndex,
}

fn read_kernel(path: &Path, package: &str, arch: Arch) -> Result<Kernel, BuildError> {
    let entries = deb::read_filtered(path, &mut |p: &str| {
        let p = usrmerge(p);
        p.starts_with("boot/vmlinu")
            || p.starts_with("boot/config-")
            || (p.starts_with("usr/lib/modules/")
                && (p.ends_with(".ko")
                    || p.ends_with(".ko.xz")
                    || p.ends_with(".ko.zst")
                    || p.ends_with("/modules.builtin")
                    || p.ends_with("/modules.builtin.modinfo")))
    })?;
    let mut image = None;
    let mut release = None;
    let mut files = Vec::new();
    let mut builtin = Vec::new();
    let mut builtin_modinfo = Vec::new();
    for e in entries {
        let EntryKind::File(data) = e.kind else {
            continue;
        };
        let p = usrmerge(&e.path);
        if let Some(name) = p.strip_prefix("boot/") {
            if let Some(rel) = name
                .strip_prefix("vmlinuz-")
                .or_else(|| name.strip_prefix("vmlinux-"))
            {
                release = Some(rel.to_string());
                image = Some(data);
            }
        } else if p.ends_with("/modules.builtin") {
            builtin.push(data);
        } else if p.ends_with("/modules.builtin.modinfo") {
            builtin_modinfo.push(data);
        } else {
            files.push((p, data));
        }
    }
    let (Some(image), Some(release)) = (image, release) else {
        return Err(BuildError::MissingFile {
            package: package.to_string(),
            what: "kernel image",
            pattern: format!("boot/vmlinuz-* ({arch})"),
        });
    };
    let mut modules = ModuleIndex::from_files(files);
    for b in &builtin {
        modules.add_builtin_list(&String::from_utf8_lossy(b));
    }
    for b in &builtin_modinfo {
        modules.add_builtin_modinfo(b);
    }
    Ok(Kernel {
        release,
        image,
        modules,
    })
}

fn os_release(def: &Definition, version: &str) -> String {
    let pretty = format!("Keelson {version}");
    format!(
        "NAME=\"Keelson\"\nID={}\nVERSION_ID=\"{version}\"\nVERSION=\"{version}\"\n\
         PRETTY_NAME=\"{pretty}\"\nHOME_URL=\"\"\n",
        def.name
    )
}

/// Build the root filesystem tree: userspace packages, kernel modules for the running
/// system, our binaries, the air-gapped Kubernetes read from the `--kubernetes`
/// directory (`baked`), the upgrade files ([`add_upgrade_files`]), os-release.
fn root_tree(
    def: &Definition,
    opts: &BuildOptions,
    epoch: u64,
    packages: &[(String, PathBuf)],
    kernel: &Kernel,
    baked: Vec<(BakedFile, Vec<u8>)>,
    components: &[String],
) -> Result<Tree, BuildError> {
    let mut tree = Tree::new(epoch as u32);
    for dir in ROOT_DIRS {
        tree.add_dir(dir, 0o755)
            .map_err(tree_err("root filesystem"))?;
    }
    for dir in USRMERGE {
        tree.add_symlink(dir, &format!("usr/{dir}"))
            .map_err(tree_err("root filesystem"))?;
    }
    for (name, path) in packages {
        let keep = &mut |p: &str| {
            let p = usrmerge(p);
            !unwanted(&p) && !def.drops.iter().any(|d| d.covers(&p))
        };
        for e in deb::read_filtered(path, keep)? {
            let p = usrmerge(&e.path);
            if p.is_empty() || USRMERGE.contains(&p.as_str()) {
                continue;
            }
            let added = match e.kind {
                EntryKind::Dir => tree.add_dir(&p, e.mode),
                EntryKind::File(data) => {
                    // A script cannot run on a node without a shell or interpreter.
                    if data.starts_with(b"#!") {
                        continue;
                    }
                    tree.add_file(&p, e.mode, data)
                }
                EntryKind::Symlink(target) => tree.add_symlink(&p, &target),
            };
            added.map_err(|source| BuildError::Tree {
                what: if name.is_empty() {
                    "root filesystem"
                } else {
                    "root filesystem (package contents)"
                },
                source,
            })?;
        }
    }
    for (link, target) in ALTERNATIVES {
        if tree.get(link).is_none() {
            tree.add_symlink(link, target)
                .map_err(tree_err("root filesystem"))?;
        }
    }
    // Kernel modules for the running system, with a depmod-style index that stage 2
    // reads to load a module's dependencies first.
    let root_names: Vec<&str> = def.modules.root.iter().map(String::as_str).collect();
    let resolution = kernel
        .modules
        .resolve(&root_names)
        .map_err(modules_err("root filesystem"))?;
    let moddir = format!("usr/lib/modules/{}", kernel.release);
    let mut dep = String::new();
    for module in &resolution.modules {
        let data = kernel
            .modules
            .module_bytes(&module.file)
            .map_err(modules_err("root filesystem"))?;
        let rel = format!("kernel/{}.ko", module.info.name);
        tree.add_file(&format!("{moddir}/{rel}"), 0o644, data)
            .map_err(tree_err("root filesystem"))?;
        let closure = kernel
            .modules
            .resolve(&[module.info.name.as_str()])
            .map_err(modules_err("root filesystem"))?;
        let deps: Vec<String> = closure
            .modules
            .iter()
            .rev()
            .filter(|m| m.info.name != module.info.name)
            .map(|m| format!("kernel/{}.ko", m.info.name))
            .collect();
        dep.push_str(&format!("{rel}: {}\n", deps.join(" ")));
    }
    tree.add_file(&format!("{moddir}/modules.dep"), 0o644, dep)
        .map_err(tree_err("root filesystem"))?;
    let builtin: String = resolution
        .builtin
        .iter()
        .map(|b| format!("{b}\n"))
        .collect();
    tree.add_file(&format!("{moddir}/modules.builtin.keelson"), 0o644, builtin)
        .map_err(tree_err("root filesystem"))?;

    for bin in &def.binaries {
        let Some(dest) = &bin.root else { continue };
        let data = read_binary(opts, &bin.bin)?;
        tree.add_file(&usrmerge(dest), 0o755, data)
            .map_err(tree_err("root filesystem"))?;
    }
    kubernetes::add_to_tree(&mut tree, baked).map_err(tree_err("root filesystem"))?;
    add_upgrade_files(&mut tree, &opts.trusted_keys, components)
        .map_err(tree_err("root filesystem"))?;
    let release = os_release(def, &opts.version);
    tree.add_file(layout::OS_RELEASE, 0o644, release)
        .map_err(tree_err("root filesystem"))?;
    tree.add_symlink("etc/os-release", "../usr/lib/os-release")
        .map_err(tree_err("root filesystem"))?;
    tree.strip_docs();
    let prefetch = crate::prefetch::list(&tree, &def.prefetch.programs)?;
    if !prefetch.is_empty() {
        let mut text = prefetch.join("\n");
        text.push('\n');
        tree.add_file(crate::prefetch::LIST_PATH, 0o644, text)
            .map_err(tree_err("root filesystem"))?;
    }
    let findings = rootfs::audit(&tree);
    if !findings.is_empty() {
        let list: Vec<String> = findings.iter().map(|f| f.to_string()).collect();
        return Err(BuildError::Audit(list.join("\n  ")));
    }
    Ok(tree)
}

/// What upgrades read in the root: the trusted public keys
/// ([`UPGRADE_KEYS_DIR`]`/<name>.pub`) and the component list ([`COMPONENTS_PATH`]).
fn add_upgrade_files(
    tree: &mut Tree,
    trusted_keys: &BTreeMap<String, String>,
    components: &[String],
) -> Result<(), rootfs::RootfsError> {
    tree.add_dir(UPGRADE_KEYS_DIR, 0o755)?;
    for (name, pem) in trusted_keys {
        tree.add_file(
            &format!("{UPGRADE_KEYS_DIR}/{name}.pub"),
            0o644,
            pem.as_bytes(),
        )?;
    }
    let list: String = components.iter().map(|c| format!("{c}\n")).collect();
    tree.add_file(COMPONENTS_PATH, 0o644, list)
}

fn read_binary(opts: &BuildOptions, name: &str) -> Result<Vec<u8>, BuildError> {
    let path = opts
        .binaries
        .get(name)
        .cloned()
        .unwrap_or_else(|| PathBuf::from(name));
    std::fs::read(&path).map_err(|_| BuildError::MissingBinary {
        path,
        what: name.to_string(),
    })
}

/// Build the initramfs: stage 1, the modules that reach and verify the root disk, and
/// stage 2's first modules, which stage 1 loads during the verity read.
fn initramfs(
    def: &Definition,
    arch: Arch,
    opts: &BuildOptions,
    epoch: u64,
    kernel: &Kernel,
) -> Result<Vec<u8>, BuildError> {
    let mut tree = Tree::new(epoch as u32);
    for dir in ["dev", "proc", "sys", "sysroot", "run"] {
        tree.add_dir(dir, 0o755).map_err(tree_err("initramfs"))?;
    }
    for bin in &def.binaries {
        let Some(dest) = &bin.initramfs else { continue };
        let data = read_binary(opts, &bin.bin)?;
        tree.add_file(dest, 0o755, data)
            .map_err(tree_err("initramfs"))?;
    }
    let resolve = |names: &[String], what| {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        kernel.modules.resolve(&names).map_err(modules_err(what))
    };
    let resolution = resolve(&def.initramfs_modules(arch)?, "initramfs")?;
    kernel
        .modules
        .add_to_initramfs(&resolution, &mut tree)
        .map_err(modules_err("initramfs"))?;
    let preload = resolve(&def.modules.preload, "initramfs preload")?;
    kernel
        .modules
        .add_preload_to_initramfs(&resolution, &preload, &mut tree)
        .map_err(modules_err("initramfs preload"))?;
    let mut writer = cpio::CpioWriter::new(Vec::new(), epoch as u32);
    writer.tree(&tree)?;
    // The console device must exist before the kernel starts /init (Rust's runtime
    // needs open standard descriptors); after the tree, so that `dev/` exists.
    writer.char_device("dev/console", 0o600, 5, 1)?;
    let archive = writer.finish()?;
    Ok(compress::zstd_bytes(
        &archive,
        compress::DEFAULT_INITRAMFS_LEVEL,
    )?)
}

/// Build an image.
pub fn build(opts: &BuildOptions, progress: Progress) -> Result<BuildReport, BuildError> {
    let def = Definition::load(&opts.definition)?;
    let arch = opts.arch;
    let lock_path = def.lock_path(arch);
    let lock = Lock::load(&lock_path)?;
    lock.check_matches(&def, arch)?;
    let epoch = build_epoch(&lock);
    // Read (and judge) the Kubernetes directory before any download: a wrong one is
    // refused at once.
    let baked = match &opts.kubernetes {
        Some(dir) => {
            progress(&format!(
                "{arch}: reading Kubernetes from {}",
                dir.display()
            ));
            kubernetes::read(dir, arch)?
        }
        None => Vec::new(),
    };
    let baked_record: Vec<BakedFile> = baked.iter().map(|(file, _)| file.clone()).collect();
    let debs = opts
        .cache
        .fetch_all(&lock, opts.mirror.as_ref(), progress)?;

    let missing = |package: &str, what: &'static str| BuildError::MissingPackage {
        lock: lock_path.clone(),
        definition: opts.definition.clone(),
        package: package.to_string(),
        what,
    };
    let mut kernel_deb = None;
    let mut boot_deb = None;
    let mut userspace = Vec::new();
    for (pkg, path) in lock.packages.iter().zip(&debs) {
        if pkg.name == lock.kernel {
            kernel_deb = Some(path.clone());
        } else if pkg.name == "systemd-boot-efi" {
            boot_deb = Some(path.clone());
        } else if pkg.name.starts_with("linux-image-") {
            // The metapackage: it carries only documentation.
        } else {
            userspace.push((pkg.name.clone(), path.clone()));
        }
    }
    let kernel_deb = kernel_deb.ok_or_else(|| missing(&lock.kernel, "the kernel"))?;
    let boot_deb = boot_deb.ok_or_else(|| missing("systemd-boot-efi", "the boot loader"))?;

    progress(&format!("{arch}: reading kernel {}", lock.kernel));
    let kernel = read_kernel(&kernel_deb, &lock.kernel, arch)?;
    let derived_dir = opts.cache.root().join("derived");
    if opts.reuse_derived {
        // Finding modules by alias (softdeps such as crc32c) needs every module's
        // `.modinfo`: decompressing the whole tree, seconds a build. The map is a function
        // of the kernel package, whose SHA-256 the lock pins.
        let mut aliases = DerivedCache::open(
            &derived_dir.join(format!("kmod-aliases-{}.cache", arch.debian())),
            "kernel module aliases v1".into(),
        );
        let key = lock
            .packages
            .iter()
            .find(|p| p.name == lock.kernel)
            .and_then(|p| hex::decode(&p.sha256).ok())
            .and_then(|k| <[u8; 32]>::try_from(k).ok());
        if let Some(key) = key {
            let bytes = aliases.get_or_derive(key, || kernel.modules.alias_map_bytes());
            let kept = bytes.is_ok_and(|b| kernel.modules.preset_alias_map(&b));
            if kept
                && aliases.misses > 0
                && let Err(e) = aliases.save()
            {
                progress(&format!("{arch}: the module alias map was not kept ({e})"));
            }
        }
    }

    let boot_path = systemd_boot_path(arch);
    let bootloader = deb::read_filtered(&boot_deb, &mut |p: &str| usrmerge(p) == boot_path)?
        .into_iter()
        .find_map(|e| match e.kind {
            EntryKind::File(data) => Some(data),
            _ => None,
        })
        .ok_or_else(|| BuildError::MissingFile {
            package: "systemd-boot-efi".into(),
            what: "systemd-boot EFI binary",
            pattern: boot_path.into(),
        })?;

    progress(&format!("{arch}: assembling the root filesystem"));
    let components = components(&def, arch, opts.kubernetes.is_some())?;
    let tree = root_tree(&def, opts, epoch, &userspace, &kernel, baked, &components)?;
    let mut artefacts = vec![("root files", tree.file_bytes())];
    progress(&format!(
        "{arch}: writing squashfs ({} entries, {} MiB of files)",
        tree.len(),
        tree.file_bytes() >> 20
    ));
    let squashfs_options = squashfs::SquashfsOptions::default();
    let mut blocks = if opts.reuse_derived {
        DerivedCache::open(
            &derived_dir.join(format!("squashfs-{}.blocks", arch.debian())),
            squashfs::cache_header(squashfs_options),
        )
    } else {
        DerivedCache::disabled()
    };
    if let Some(note) = &blocks.note {
        progress(&format!("{arch}: squashfs block cache {note}"));
    }
    let mut root = squashfs::to_vec_cached(&tree, squashfs_options, &mut blocks)?;
    drop(tree);
    if opts.reuse_derived {
        progress(&format!(
            "{arch}: squashfs blocks: {} from the cache, {} compressed",
            blocks.hits, blocks.misses
        ));
        if let Err(e) = blocks.save() {
            progress(&format!(
                "{arch}: the squashfs block cache was not saved ({e}); the next build \
                 compresses every block again"
            ));
        }
    }
    drop(blocks);
    artefacts.push(("squashfs", root.len() as u64));
    let salt = verity::derive_salt(&root);
    let uuid = verity::derive_uuid(&root);
    let hash_tree = verity::build(&root[..], &salt, uuid)?;
    artefacts.push(("verity tree", hash_tree.bytes.len() as u64));
    let params = hash_tree.params.clone();
    root.extend_from_slice(&hash_tree.bytes);
    let root_part = def.partitions.root_mib << 20;
    if root.len() as u64 > root_part {
        return Err(BuildError::TooBig {
            what: "root filesystem with its verity tree",
            need: root.len() as u64,
            have: root_part,
            key: "partitions.root_mib",
            definition: opts.definition.clone(),
        });
    }

    progress(&format!("{arch}: writing the initramfs"));
    let initrd = initramfs(&def, arch, opts, epoch, &kernel)?;
    artefacts.push(("initramfs (zstd)", initrd.len() as u64));
    artefacts.push(("kernel", kernel.image.len() as u64));

    let verity = VerityParams {
        roothash: params.root_hash_hex(),
        salt: params.salt_hex(),
        data_blocks: params.data_blocks,
        hash_offset: params.hash_offset,
    };
    let base_cmdline = def.cmdline(arch)?;
    let mut esp = Esp::new();
    esp.add_bootloader(arch, bootloader);
    esp.add_loader_conf(&LoaderConf {
        timeout: 0,
        default: None,
        editor: false,
    });
    let kernel_bytes = kernel.image.len() as u64;
    esp.add_slot(Slot::A, kernel.image, initrd);
    // The first entry is generation 1, on trial like every new one: PID 1 blesses it
    // once the node is healthy.
    esp.add_entry(
        &EntryName::new_trial(Slot::A).file_name(),
        &BootEntry::for_slot(
            Slot::A,
            &EntryVersion {
                generation: 1,
                os_version: opts.version.clone(),
            },
            &base_cmdline,
            &verity,
        ),
    );
    let esp_size = def.partitions.efi_mib << 20;
    let esp_bytes = esp.to_vec(esp_size, epoch)?;
    let _ = kernel_bytes;

    std::fs::create_dir_all(&opts.out_dir).map_err(io_err(&opts.out_dir))?;
    let raw = opts.out_dir.join("keelson.raw");
    let tmp = opts.out_dir.join(".keelson.raw.partial");
    let _ = std::fs::remove_file(&tmp);
    let guid = |s: &str| Guid::parse(s).map_err(BuildError::Gpt);
    let spec = DiskSpec {
        seed: format!(
            "{}-{}-{}-{}",
            def.name,
            opts.version,
            arch,
            params.root_hash_hex()
        )
        .into_bytes(),
        partitions: vec![
            PartitionSpec {
                name: layout::PART_EFI.into(),
                type_guid: guid(layout::TYPE_GUID_EFI)?,
                size: esp_size,
                attributes: 0,
                content: Content::Bytes(esp_bytes),
            },
            PartitionSpec {
                name: layout::PART_ROOT_A.into(),
                type_guid: guid(arch.root_type_guid())?,
                size: root_part,
                attributes: 0,
                content: Content::Bytes(root),
            },
            PartitionSpec {
                name: layout::PART_ROOT_B.into(),
                type_guid: guid(arch.root_type_guid())?,
                size: root_part,
                attributes: 0,
                content: Content::Zero,
            },
            PartitionSpec {
                name: layout::PART_STATE.into(),
                type_guid: guid(layout::TYPE_GUID_LINUX_DATA)?,
                size: def.partitions.state_mib << 20,
                attributes: 0,
                content: Content::Zero,
            },
            PartitionSpec {
                name: layout::PART_EPHEMERAL.into(),
                type_guid: guid(layout::TYPE_GUID_VAR)?,
                size: def.partitions.ephemeral_mib << 20,
                attributes: 0,
                content: Content::Zero,
            },
        ],
        disk_size: None,
    };
    progress(&format!("{arch}: writing {}", raw.display()));
    let result = gpt::write_disk(&tmp, &spec);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    std::fs::rename(&tmp, &raw).map_err(io_err(&raw))?;
    let mut files = vec![(raw.clone(), file_size(&raw))];
    let inputs = opts.out_dir.join(BUILD_INPUTS);
    std::fs::write(&inputs, opts.inputs_toml(baked_record)?).map_err(io_err(&inputs))?;

    if opts.formats.contains(&Format::RawZst) {
        let dst = opts.out_dir.join("keelson.raw.zst");
        progress(&format!("{arch}: compressing {}", dst.display()));
        // Writes a temporary file and renames it into place itself.
        compress::zstd_file(&raw, &dst, compress::DEFAULT_IMAGE_LEVEL)?;
        files.push((dst.clone(), file_size(&dst)));
    }
    if opts.formats.contains(&Format::Qcow2) {
        let dst = opts.out_dir.join("keelson.qcow2");
        let tmp = opts.out_dir.join(".keelson.qcow2.partial");
        progress(&format!("{arch}: converting to {}", dst.display()));
        let out = Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&tmp)
            .output()
            .map_err(io_err(Path::new("qemu-img")))?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&tmp);
            return Err(BuildError::QemuImg {
                path: raw,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        std::fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
        files.push((dst.clone(), file_size(&dst)));
    }
    Ok(BuildReport {
        files,
        root_hash: params.root_hash_hex(),
        kernel_release: kernel.release,
        artefacts,
        verity,
        components,
    })
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usrmerge_maps_top_level_dirs_into_usr() {
        assert_eq!(usrmerge("./sbin/mke2fs"), "usr/sbin/mke2fs");
        assert_eq!(
            usrmerge("lib64/ld-linux-x86-64.so.2"),
            "usr/lib64/ld-linux-x86-64.so.2"
        );
        assert_eq!(usrmerge("lib"), "usr/lib");
        assert_eq!(usrmerge("usr/bin/runc"), "usr/bin/runc");
        assert_eq!(usrmerge("library/x"), "library/x");
        assert_eq!(
            usrmerge("etc/containerd/config.toml"),
            "etc/containerd/config.toml"
        );
    }

    #[test]
    fn unwanted_paths_are_docs_and_script_machinery() {
        assert!(unwanted("usr/share/doc/runc/copyright"));
        assert!(unwanted("etc/init.d/etcd"));
        assert!(unwanted("usr/lib/systemd/system/containerd.service"));
        assert!(!unwanted("usr/bin/containerd"));
        assert!(!unwanted("usr/share/zoneinfo"));
    }

    #[test]
    fn components_are_the_requested_packages_and_a_baked_kubelet() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/keelson.toml");
        let def = Definition::load(&path).unwrap();
        assert_eq!(
            components(&def, Arch::Amd64, false).unwrap(),
            ["cni-plugins", "containerd", "etcd", "runc"]
        );
        assert_eq!(
            components(&def, Arch::Arm64, true).unwrap(),
            ["cni-plugins", "containerd", "etcd", "kubelet", "runc"]
        );
    }

    #[test]
    fn upgrade_files_hold_the_keys_and_the_components() {
        let mut tree = Tree::new(0);
        let keys = BTreeMap::from([("dev-1234".to_string(), "PEM".to_string())]);
        add_upgrade_files(&mut tree, &keys, &["containerd".into(), "etcd".into()]).unwrap();
        let file = |path: &str| String::from_utf8(tree.file(path).unwrap().to_vec()).unwrap();
        assert_eq!(file("usr/share/keelson/upgrade-keys/dev-1234.pub"), "PEM");
        assert_eq!(file("usr/lib/keelson/components"), "containerd\netcd\n");
    }

    #[test]
    fn formats_parse() {
        assert_eq!(Format::parse("raw.zst"), Some(Format::RawZst));
        assert_eq!(Format::parse("qcow2").map(Format::extension), Some("qcow2"));
        assert_eq!(Format::parse("vhd"), None);
    }
}
