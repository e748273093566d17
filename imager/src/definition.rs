//! The image definition (`images/keelson.toml`): what goes into an image, in strict
//! TOML. Debian suite, kernel and packages per architecture, the packages that must
//! never be pulled in (with the reason), the kernel modules for the initramfs and
//! the root, our own binaries, the default kernel command line and the partition sizes.
//!
//! Package names keep their position in the file so that an unknown package is
//! reported as `images/keelson.toml:12:3`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use keelson_configs::layout::Arch;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::debian::resolve::{Exclusion, Request};

/// An error loading an image definition.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    /// The file could not be read.
    #[error("cannot read image definition {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("image definition {path} is invalid; fix the file")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error (with line and column).
        #[source]
        source: toml::de::Error,
    },
    /// The file parses but breaks a rule.
    #[error("image definition {location}: {message}")]
    Invalid {
        /// `path:line:column`.
        location: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// The definition has no section for an architecture.
    #[error("image definition {path} has no [arch.{arch}] section; add one to build for {arch}")]
    NoArch {
        /// The file.
        path: PathBuf,
        /// The architecture.
        arch: Arch,
    },
}

/// An image definition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    /// The image (and OS) name, e.g. `keelson`.
    pub name: String,
    /// The Debian suite the packages come from (`trixie`).
    pub suite: String,
    /// The kernel command line shared by every architecture (the boot entry adds the
    /// slot and verity parameters, the architecture adds its console).
    pub cmdline: Vec<String>,
    /// Partition sizes.
    pub partitions: Partitions,
    /// Per-architecture inputs, keyed by Debian architecture name.
    pub arch: BTreeMap<String, ArchSpec>,
    /// Userspace packages.
    #[serde(rename = "package")]
    pub packages: Vec<PackageSpec>,
    /// Packages (or virtual packages) the resolver must never choose.
    #[serde(rename = "exclude")]
    pub excludes: Vec<ExcludeSpec>,
    /// Kernel modules (names, without `.ko`); closures are computed by the imager.
    pub modules: Modules,
    /// Our own binaries and where they go.
    #[serde(rename = "binary", default)]
    pub binaries: Vec<BinarySpec>,
    /// Files of the pinned packages left out of the root filesystem.
    #[serde(rename = "drop", default)]
    pub drops: Vec<DropSpec>,
    /// What stage 2 reads into the page cache first.
    #[serde(default)]
    pub prefetch: Prefetch,
    /// The file this was loaded from.
    #[serde(skip)]
    pub path: PathBuf,
    #[serde(skip)]
    source: String,
}

/// Partition sizes in MiB.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partitions {
    /// The EFI system partition.
    pub efi_mib: u64,
    /// Each root slot (ROOT-A, ROOT-B): filesystem plus verity hash tree.
    pub root_mib: u64,
    /// STATE.
    pub state_mib: u64,
    /// EPHEMERAL as written in the image; grown to fill the disk at first boot.
    pub ephemeral_mib: u64,
}

/// Inputs for one architecture.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchSpec {
    /// The kernel package. Only its files are taken, never its dependencies.
    pub kernel: KernelSpec,
    /// Command-line arguments added for this architecture (the console).
    #[serde(default)]
    pub cmdline: Vec<String>,
    /// Modules stage 1 loads first on this architecture, before the shared
    /// `[modules] initramfs` (the SHA-256 accelerators dm-verity then picks).
    #[serde(default)]
    pub initramfs_modules: Vec<String>,
}

/// The kernel package of an architecture.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelSpec {
    /// The package name (`linux-image-amd64`).
    pub package: Spanned<String>,
    /// The package is a metapackage: pin the versioned kernel package it depends on.
    #[serde(default)]
    pub metapackage: bool,
}

/// A requested package.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageSpec {
    /// The Debian package name.
    pub name: Spanned<String>,
    /// Take its dependencies too (default). `false`: its files only.
    #[serde(default = "yes")]
    pub deps: bool,
    /// Only for these architectures (default: all).
    #[serde(default)]
    pub arch: Option<Vec<String>>,
    /// Why it is in the image.
    #[serde(default)]
    pub reason: Option<String>,
}

fn yes() -> bool {
    true
}

/// A package that must never be chosen.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExcludeSpec {
    /// The package or virtual package name.
    pub name: String,
    /// Why (recorded in the lock file next to each dependency it drops).
    pub reason: String,
}

/// Kernel modules by destination (names as in `modinfo`, `_` or `-` alike).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Modules {
    /// Loaded by stage 1 to reach and verify the root disk.
    pub initramfs: Vec<String>,
    /// Stage 2's first modules, carried in the initramfs too and loaded by stage 1
    /// while it reads the root through dm-verity (on the CPU that read leaves idle).
    #[serde(default)]
    pub preload: Vec<String>,
    /// Shipped in the root filesystem for stage 2 and the workloads.
    pub root: Vec<String>,
}

/// The programs stage 2 starts early, read with their shared objects into the page
/// cache on a thread of their own (see `crate::prefetch`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prefetch {
    /// Root paths of the programs, in the order stage 2 starts them.
    #[serde(default)]
    pub programs: Vec<String>,
}

/// Files of the packages that the image leaves out (a path, or a directory prefix
/// ending in `/`), with the reason.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropSpec {
    /// The path in the root filesystem (merged-/usr form, no leading `/`); a trailing
    /// `/` drops the directory and everything below it.
    pub path: String,
    /// Why the node does without it.
    pub reason: String,
}

impl DropSpec {
    /// Whether this drop covers `path`.
    pub fn covers(&self, path: &str) -> bool {
        match self.path.strip_suffix('/') {
            Some(dir) => path == dir || path.starts_with(&self.path),
            None => path == self.path,
        }
    }
}

/// One of our binaries, cross-compiled for the image's architecture.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BinarySpec {
    /// The cargo package.
    pub package: String,
    /// The binary target name.
    pub bin: String,
    /// Its path in the initramfs, if it goes there.
    #[serde(default)]
    pub initramfs: Option<String>,
    /// Its path in the root filesystem, if it goes there.
    #[serde(default)]
    pub root: Option<String>,
}

impl Definition {
    /// Load and check a definition.
    pub fn load(path: &Path) -> Result<Definition, DefinitionError> {
        let source = std::fs::read_to_string(path).map_err(|source| DefinitionError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Definition::parse(&source, path)
    }

    /// Parse and check a definition's text; `path` names it in errors.
    pub fn parse(source: &str, path: &Path) -> Result<Definition, DefinitionError> {
        let mut def: Definition =
            toml::from_str(source).map_err(|source| DefinitionError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        def.path = path.to_path_buf();
        def.source = source.to_string();
        def.check()?;
        Ok(def)
    }

    fn invalid(&self, span: Option<std::ops::Range<usize>>, message: String) -> DefinitionError {
        DefinitionError::Invalid {
            location: match span {
                Some(s) => self.location(s),
                None => self.path.display().to_string(),
            },
            message,
        }
    }

    fn check(&self) -> Result<(), DefinitionError> {
        if self.arch.is_empty() {
            return Err(self.invalid(None, "no [arch.*] section; add [arch.amd64]".into()));
        }
        for name in self.arch.keys() {
            if Arch::from_debian(name).is_none() {
                return Err(self.invalid(
                    None,
                    format!("unknown architecture `{name}` in [arch.{name}]; use amd64 or arm64"),
                ));
            }
        }
        let mut seen = BTreeSet::new();
        for p in &self.packages {
            if !seen.insert(p.name.get_ref().as_str()) {
                return Err(self.invalid(
                    Some(p.name.span()),
                    format!("package `{}` is listed twice; remove one", p.name.get_ref()),
                ));
            }
            for a in p.arch.iter().flatten() {
                if !self.arch.contains_key(a) {
                    return Err(self.invalid(
                        Some(p.name.span()),
                        format!(
                            "package `{}` names architecture `{a}`, which has no [arch.{a}] section",
                            p.name.get_ref()
                        ),
                    ));
                }
            }
        }
        let mut seen = BTreeSet::new();
        for e in &self.excludes {
            if !seen.insert(e.name.as_str()) {
                return Err(self.invalid(
                    None,
                    format!("`{}` is excluded twice; remove one [[exclude]]", e.name),
                ));
            }
            if e.reason.trim().is_empty() {
                return Err(self.invalid(
                    None,
                    format!("exclusion of `{}` has no reason; say why", e.name),
                ));
            }
        }
        let p = &self.partitions;
        for (what, mib) in [
            ("efi_mib", p.efi_mib),
            ("root_mib", p.root_mib),
            ("state_mib", p.state_mib),
            ("ephemeral_mib", p.ephemeral_mib),
        ] {
            if mib == 0 {
                return Err(self.invalid(None, format!("partitions.{what} is 0; give a size")));
            }
        }
        Ok(())
    }

    /// `path:line:column` of a byte span of the source.
    pub fn location(&self, span: std::ops::Range<usize>) -> String {
        let before = &self.source[..span.start.min(self.source.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("{}:{line}:{column}", self.path.display())
    }

    /// The inputs for `arch`.
    pub fn arch(&self, arch: Arch) -> Result<&ArchSpec, DefinitionError> {
        self.arch
            .get(arch.debian())
            .ok_or_else(|| DefinitionError::NoArch {
                path: self.path.clone(),
                arch,
            })
    }

    /// The full default kernel command line for `arch`: shared arguments, then the
    /// architecture's own.
    pub fn cmdline(&self, arch: Arch) -> Result<String, DefinitionError> {
        let spec = self.arch(arch)?;
        Ok(self
            .cmdline
            .iter()
            .chain(&spec.cmdline)
            .cloned()
            .collect::<Vec<_>>()
            .join(" "))
    }

    /// The modules of the initramfs for `arch`: the architecture's own, then the shared.
    pub fn initramfs_modules(&self, arch: Arch) -> Result<Vec<String>, DefinitionError> {
        let spec = self.arch(arch)?;
        Ok(spec
            .initramfs_modules
            .iter()
            .chain(&self.modules.initramfs)
            .cloned()
            .collect())
    }

    /// Where the lock file for `arch` lives: next to the definition, named
    /// `<file stem>-<arch>.lock` (`images/keelson-amd64.lock`).
    pub fn lock_path(&self, arch: Arch) -> PathBuf {
        let stem = self
            .path
            .file_stem()
            .map_or_else(|| self.name.clone(), |s| s.to_string_lossy().into_owned());
        self.path
            .with_file_name(format!("{stem}-{}.lock", arch.debian()))
    }

    /// What the resolver is asked for on `arch`: the kernel first, then the packages.
    pub fn requests(&self, arch: Arch) -> Result<Vec<Request>, DefinitionError> {
        let spec = self.arch(arch)?;
        let mut out = vec![Request {
            name: spec.kernel.package.get_ref().clone(),
            deps: false,
            metapackage: spec.kernel.metapackage,
            location: self.location(spec.kernel.package.span()),
            why: "kernel".to_string(),
        }];
        for p in &self.packages {
            if p.arch
                .as_ref()
                .is_some_and(|a| !a.iter().any(|a| a == arch.debian()))
            {
                continue;
            }
            out.push(Request {
                name: p.name.get_ref().clone(),
                deps: p.deps,
                metapackage: false,
                location: self.location(p.name.span()),
                why: if p.deps {
                    "requested".to_string()
                } else {
                    "requested (files only)".to_string()
                },
            });
        }
        Ok(out)
    }

    /// The exclusions, for the resolver.
    pub fn exclusions(&self) -> Vec<Exclusion> {
        self.excludes
            .iter()
            .map(|e| Exclusion {
                name: e.name.clone(),
                reason: e.reason.clone(),
            })
            .collect()
    }

    /// The sha256 of everything in the definition that affects resolution on `arch`
    /// (suite, kernel, packages, exclusions). A lock records it; a lock whose value
    /// differs is stale. Command line, modules and partition sizes are not part of
    /// it: changing them does not need new packages.
    pub fn resolution_sha256(&self, arch: Arch) -> Result<String, DefinitionError> {
        let mut text = String::new();
        let _ = writeln!(text, "keelson-resolution-inputs 1");
        let _ = writeln!(text, "suite {}", self.suite);
        let _ = writeln!(text, "arch {}", arch.debian());
        for r in self.requests(arch)? {
            let _ = writeln!(
                text,
                "request {} deps={} metapackage={} why={}",
                r.name, r.deps, r.metapackage, r.why
            );
        }
        let mut excludes: Vec<_> = self.excludes.iter().collect();
        excludes.sort_by(|a, b| a.name.cmp(&b.name));
        for e in excludes {
            let _ = writeln!(text, "exclude {} {}", e.name, e.reason);
        }
        Ok(hex::encode(Sha256::digest(text.as_bytes())))
    }
}
