//! Kernel modules for the initramfs, chosen from the modules' own metadata (a `depmod`
//! equivalent): the module tree of Debian's kernel package ships no `modules.dep`, so we
//! read the `.modinfo` ELF section of each `.ko` (`name=`, `depends=`, `alias=`,
//! `softdep=`) and compute the dependency closure ourselves.
//!
//! Debian trixie's 6.12 kernels compress every module with xz (`.ko.xz`,
//! `CONFIG_MODULE_COMPRESS_XZ=y`); `.ko.zst` and plain `.ko` are read too. Modules are
//! written into the initramfs decompressed (the initramfs as a whole is compressed), as
//! `modules/<name>.ko` plus `modules/order`, one file name per line, dependencies first
//! (the contract in `keelson_configs::layout`).
//!
//! A module's name is its file name with `-` turned into `_` (the kernel's
//! `KBUILD_MODNAME`, which is also what `name=` and `depends=` carry), so the index is
//! built from file names and `.modinfo` is read only for the modules a closure touches;
//! aliases (`fs-squashfs`, `crypto-sha256`, ...) trigger one full scan, the first time a
//! requested name or a soft dependency is not a module name, whose alias map the index
//! keeps (without it, every `softdep` on an alias such as `crc32c` rescanned and
//! decompressed all the kernel's modules: 17 s of a 53 s image build). Things built
//! into the kernel (`modules.builtin`, `modules.builtin.modinfo`, or `=y` in
//! `/boot/config-*`) are reported, not looked for.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use keelson_configs::layout::{
    INITRAMFS_MODULES_DIR, INITRAMFS_MODULES_ORDER, INITRAMFS_MODULES_PRELOAD,
};
use object::{Object, ObjectSection};

use crate::rootfs::{RootfsError, Tree};

/// Errors from indexing and resolving kernel modules.
#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    /// The module directory could not be read.
    #[error("cannot read the kernel module tree at {path}")]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A module file could not be read.
    #[error("cannot read kernel module {path}")]
    ReadModule {
        /// The module file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A module is compressed in a way we do not read.
    #[error(
        "kernel module {path} is compressed with an unsupported method: only .ko, .ko.xz and .ko.zst are read"
    )]
    UnsupportedCompression {
        /// The module file.
        path: String,
    },
    /// A module is not a valid ELF object with a `.modinfo` section.
    #[error("kernel module {path} is not an ELF object with a .modinfo section: {reason}")]
    BadModule {
        /// The module file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A requested module is neither a module, an alias nor built in.
    #[error(
        "unknown kernel module {name:?}: not a module, alias or built-in of this kernel{}; check the image definition's module list",
        did_you_mean(.suggestions)
    )]
    Unknown {
        /// The name asked for.
        name: String,
        /// Close module names.
        suggestions: Vec<String>,
    },
    /// A module depends on a module that is not in the tree.
    #[error(
        "kernel module {module} depends on {missing}, which is not in the module tree: the kernel package looks incomplete"
    )]
    MissingDependency {
        /// The module.
        module: String,
        /// The dependency.
        missing: String,
    },
    /// Adding the modules to the initramfs tree failed.
    #[error("cannot add kernel modules to the initramfs")]
    Tree(#[source] RootfsError),
}

fn did_you_mean(suggestions: &[String]) -> String {
    if suggestions.is_empty() {
        String::new()
    } else {
        format!(" (did you mean {}?)", suggestions.join(", "))
    }
}

/// A module name in the kernel's canonical form (`-` becomes `_`).
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name a file path stands for (`kernel/drivers/md/dm-verity.ko.xz` gives
/// `dm_verity`), if it is a module file.
fn module_name_of(path: &str) -> Option<String> {
    let base = path.rsplit('/').next()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| base.strip_suffix(ext))?;
    Some(normalize(stem))
}

/// The value of `key` (with or without the `CONFIG_` prefix) in a kernel `.config`:
/// `Some("y")`, `Some("m")`, `Some("\"...\"")`, or `None` when unset.
pub fn kernel_config_value<'a>(config: &'a str, key: &str) -> Option<&'a str> {
    let key = key.strip_prefix("CONFIG_").unwrap_or(key);
    config.lines().find_map(|line| {
        let rest = line.strip_prefix("CONFIG_")?;
        let (k, v) = rest.split_once('=')?;
        (k == key).then_some(v)
    })
}

/// Whether `key` is built into the kernel (`=y`) according to its `.config` text.
pub fn kernel_config_builtin(config: &str, key: &str) -> bool {
    kernel_config_value(config, key) == Some("y")
}

/// What `.modinfo` says about a module.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    /// `name=` (normalised), or the file's name when absent.
    pub name: String,
    /// `depends=`: modules that must be loaded first.
    pub depends: Vec<String>,
    /// `softdep=` `pre:` names (modules or aliases), loaded first when present.
    pub softdep_pre: Vec<String>,
    /// `softdep=` `post:` names, loaded after when present.
    pub softdep_post: Vec<String>,
    /// `alias=` patterns.
    pub aliases: Vec<String>,
}

/// Parse the NUL-separated `key=value` strings of a `.modinfo` section.
pub fn parse_modinfo(section: &[u8], fallback_name: &str) -> ModInfo {
    let mut info = ModInfo {
        name: fallback_name.to_string(),
        ..ModInfo::default()
    };
    for entry in section.split(|&b| b == 0) {
        let Ok(entry) = std::str::from_utf8(entry) else {
            continue;
        };
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        match key {
            "name" => info.name = normalize(value),
            "depends" => info
                .depends
                .extend(value.split(',').filter(|d| !d.is_empty()).map(normalize)),
            "alias" => info.aliases.push(value.to_string()),
            "softdep" => {
                let mut post = false;
                for word in value.split_whitespace() {
                    match word {
                        "pre:" => post = false,
                        "post:" => post = true,
                        name if post => info.softdep_post.push(name.to_string()),
                        name => info.softdep_pre.push(name.to_string()),
                    }
                }
            }
            _ => {}
        }
    }
    info
}

/// Where a module's (possibly compressed) bytes come from.
#[derive(Debug, Clone)]
enum Source {
    File(PathBuf),
    Memory(Arc<[u8]>),
}

/// One module file of the tree.
#[derive(Debug, Clone)]
pub struct ModuleFile {
    /// The module's name (normalised).
    pub name: String,
    /// Its path relative to the module directory (`kernel/drivers/...`).
    pub path: String,
    source: Source,
}

/// A resolved module: its file and metadata.
#[derive(Debug, Clone)]
pub struct Module {
    /// The file.
    pub file: ModuleFile,
    /// Its `.modinfo`.
    pub info: ModInfo,
}

/// The result of [`ModuleIndex::resolve`].
#[derive(Debug, Clone, Default)]
pub struct Resolution {
    /// Modules to load, dependencies first.
    pub modules: Vec<Module>,
    /// Requested names that are built into the kernel (nothing to load).
    pub builtin: Vec<String>,
}

impl Resolution {
    /// The names of the modules, in load order.
    pub fn names(&self) -> Vec<&str> {
        self.modules.iter().map(|m| m.info.name.as_str()).collect()
    }
}

/// The module tree of one kernel, indexed by module name.
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    files: BTreeMap<String, ModuleFile>,
    builtin: BTreeSet<String>,
    builtin_aliases: BTreeMap<String, String>,
    /// Alias → the first module (in name order) that declares it, from one scan of every
    /// module's `.modinfo`, made on the first alias lookup.
    aliases: OnceLock<BTreeMap<String, String>>,
}

/// Read the kernel's list of built-in modules (`modules.builtin`).
fn parse_builtin(text: &str) -> impl Iterator<Item = String> + '_ {
    text.lines().filter_map(module_name_of)
}

/// Read `modules.builtin.modinfo`: `module.alias=...` strings of built-in modules.
fn parse_builtin_modinfo(data: &[u8]) -> impl Iterator<Item = (String, String)> + '_ {
    data.split(|&b| b == 0).filter_map(|entry| {
        let entry = std::str::from_utf8(entry).ok()?;
        let (module, rest) = entry.split_once('.')?;
        let alias = rest.strip_prefix("alias=")?;
        Some((alias.to_string(), normalize(module)))
    })
}

fn decompress(path: &str, raw: &[u8]) -> Result<Vec<u8>, KmodError> {
    let read_err = |source| KmodError::ReadModule {
        path: path.to_string(),
        source,
    };
    if path.ends_with(".ko") {
        Ok(raw.to_vec())
    } else if path.ends_with(".ko.xz") {
        let mut out = Vec::with_capacity(raw.len() * 4);
        liblzma::read::XzDecoder::new(raw)
            .read_to_end(&mut out)
            .map_err(read_err)?;
        Ok(out)
    } else if path.ends_with(".ko.zst") {
        zstd::decode_all(raw).map_err(read_err)
    } else {
        Err(KmodError::UnsupportedCompression {
            path: path.to_string(),
        })
    }
}

/// Edit distance between two short strings.
fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

impl ModuleIndex {
    /// Index the module directory of one kernel (`.../lib/modules/<kver>`), including
    /// its `modules.builtin` lists when present.
    pub fn from_dir(dir: &Path) -> Result<ModuleIndex, KmodError> {
        let mut index = ModuleIndex::default();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(current) = stack.pop() {
            let entries = std::fs::read_dir(&current).map_err(|source| KmodError::ReadDir {
                path: current.clone(),
                source,
            })?;
            for entry in entries {
                let entry = entry.map_err(|source| KmodError::ReadDir {
                    path: current.clone(),
                    source,
                })?;
                let path = entry.path();
                let file_type = entry.file_type().map_err(|source| KmodError::ReadDir {
                    path: path.clone(),
                    source,
                })?;
                if file_type.is_dir() {
                    stack.push(path);
                    continue;
                }
                let rel = path
                    .strip_prefix(dir)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .into_owned();
                if let Some(name) = module_name_of(&rel) {
                    index.insert(ModuleFile {
                        name,
                        path: rel,
                        source: Source::File(path),
                    });
                }
            }
        }
        let read_opt = |name: &str| std::fs::read(dir.join(name)).ok();
        if let Some(text) = read_opt("modules.builtin") {
            index.add_builtin_list(&String::from_utf8_lossy(&text));
        }
        if let Some(data) = read_opt("modules.builtin.modinfo") {
            index.add_builtin_modinfo(&data);
        }
        Ok(index)
    }

    /// Index module files held in memory: `(path relative to the module directory,
    /// bytes)`. `modules.builtin` and `modules.builtin.modinfo` are recognised by name.
    pub fn from_files(files: impl IntoIterator<Item = (String, Vec<u8>)>) -> ModuleIndex {
        let mut index = ModuleIndex::default();
        for (path, data) in files {
            match path.rsplit('/').next() {
                Some("modules.builtin") => {
                    index.add_builtin_list(&String::from_utf8_lossy(&data));
                }
                Some("modules.builtin.modinfo") => index.add_builtin_modinfo(&data),
                _ => {
                    if let Some(name) = module_name_of(&path) {
                        index.insert(ModuleFile {
                            name,
                            path,
                            source: Source::Memory(data.into()),
                        });
                    }
                }
            }
        }
        index
    }

    fn insert(&mut self, file: ModuleFile) {
        // A new file may declare aliases the map lacks.
        self.aliases = OnceLock::new();
        // Two files for one name (e.g. .ko and .ko.xz): keep the first path in order.
        match self.files.get(&file.name) {
            Some(existing) if existing.path <= file.path => {}
            _ => {
                self.files.insert(file.name.clone(), file);
            }
        }
    }

    /// Add names from a `modules.builtin` text.
    pub fn add_builtin_list(&mut self, text: &str) {
        self.builtin.extend(parse_builtin(text));
    }

    /// Add built-in aliases from a `modules.builtin.modinfo` blob.
    pub fn add_builtin_modinfo(&mut self, data: &[u8]) {
        for (alias, module) in parse_builtin_modinfo(data) {
            self.builtin.insert(module.clone());
            self.builtin_aliases.insert(alias, module);
        }
    }

    /// Mark `name` as built in (e.g. from `kernel_config_builtin`).
    pub fn mark_builtin(&mut self, name: &str) {
        self.builtin.insert(normalize(name));
    }

    /// Number of module files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether the tree has no modules.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Whether `name` (a module name or alias) is built into the kernel.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name)) || self.builtin_aliases.contains_key(name)
    }

    /// The module file called `name` (`-`/`_` interchangeable).
    pub fn file(&self, name: &str) -> Option<&ModuleFile> {
        self.files.get(&normalize(name))
    }

    /// The module's raw (possibly compressed) bytes.
    fn raw(&self, file: &ModuleFile) -> Result<Arc<[u8]>, KmodError> {
        match &file.source {
            Source::Memory(data) => Ok(data.clone()),
            Source::File(path) => {
                std::fs::read(path)
                    .map(Arc::from)
                    .map_err(|source| KmodError::ReadModule {
                        path: file.path.clone(),
                        source,
                    })
            }
        }
    }

    /// The module's ELF bytes, decompressed.
    pub fn module_bytes(&self, file: &ModuleFile) -> Result<Vec<u8>, KmodError> {
        decompress(&file.path, &self.raw(file)?)
    }

    /// Read a module's `.modinfo`.
    pub fn modinfo(&self, file: &ModuleFile) -> Result<ModInfo, KmodError> {
        let elf = self.module_bytes(file)?;
        let bad = |reason: String| KmodError::BadModule {
            path: file.path.clone(),
            reason,
        };
        let object = object::File::parse(&*elf).map_err(|e| bad(e.to_string()))?;
        let section = object
            .section_by_name(".modinfo")
            .ok_or_else(|| bad("no .modinfo section".to_string()))?;
        let data = section.data().map_err(|e| bad(e.to_string()))?;
        Ok(parse_modinfo(data, &file.name))
    }

    /// Find the module that has `alias` among its aliases (the first lookup scans the
    /// whole tree and keeps the alias map for the next ones).
    fn find_by_alias(&self, alias: &str) -> Result<Option<String>, KmodError> {
        Ok(self.alias_map()?.get(alias).cloned())
    }

    /// Alias → module for the whole tree (scanned the first time it is asked for).
    pub fn alias_map(&self) -> Result<&BTreeMap<String, String>, KmodError> {
        if let Some(map) = self.aliases.get() {
            return Ok(map);
        }
        let mut map = BTreeMap::new();
        for file in self.files.values() {
            for a in self.modinfo(file)?.aliases {
                map.entry(a).or_insert_with(|| file.name.clone());
            }
        }
        // Another thread may have set it meanwhile; both maps are the same.
        Ok(self.aliases.get_or_init(|| map))
    }

    /// The alias map as bytes, to keep between builds: `alias NUL module LF` per alias.
    pub fn alias_map_bytes(&self) -> Result<Vec<u8>, KmodError> {
        let mut out = Vec::new();
        for (alias, module) in self.alias_map()? {
            out.extend_from_slice(alias.as_bytes());
            out.push(0);
            out.extend_from_slice(module.as_bytes());
            out.push(b'\n');
        }
        Ok(out)
    }

    /// Use an alias map kept from an earlier scan of the same module tree (bytes from
    /// [`ModuleIndex::alias_map_bytes`]) instead of scanning again; `false` (and nothing
    /// set) when the bytes are not such a map. An index that has its map already keeps it.
    pub fn preset_alias_map(&self, bytes: &[u8]) -> bool {
        if self.aliases.get().is_some() {
            return true;
        }
        let mut map = BTreeMap::new();
        for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let mut parts = line.splitn(2, |&b| b == 0);
            let (Some(alias), Some(module)) = (parts.next(), parts.next()) else {
                return false;
            };
            let (Ok(alias), Ok(module)) = (std::str::from_utf8(alias), std::str::from_utf8(module))
            else {
                return false;
            };
            if !self.files.contains_key(module) {
                return false;
            }
            map.insert(alias.to_string(), module.to_string());
        }
        self.aliases.set(map).is_ok()
    }

    fn suggestions(&self, name: &str) -> Vec<String> {
        let wanted = normalize(name);
        let mut scored: Vec<(usize, &String)> = self
            .files
            .keys()
            .chain(self.builtin.iter())
            .map(|candidate| {
                let distance = if candidate.contains(&wanted) || wanted.contains(candidate.as_str())
                {
                    1
                } else {
                    levenshtein(&wanted, candidate)
                };
                (distance, candidate)
            })
            .filter(|(d, _)| *d <= 2.max(wanted.len() / 4))
            .collect();
        scored.sort();
        scored.dedup_by(|a, b| a.1 == b.1);
        scored.into_iter().take(3).map(|(_, n)| n.clone()).collect()
    }

    /// Compute the closure of `requested` (module names or aliases, `-`/`_`
    /// interchangeable): every module to load, dependencies and `softdep` pre-modules
    /// first; requested names that are built in are listed apart.
    pub fn resolve(&self, requested: &[&str]) -> Result<Resolution, KmodError> {
        let mut resolution = Resolution::default();
        let mut infos: HashMap<String, ModInfo> = HashMap::new();
        let mut done: BTreeSet<String> = BTreeSet::new();
        for &name in requested {
            let normal = normalize(name);
            let module = if self.files.contains_key(&normal) {
                normal
            } else if self.is_builtin(name) {
                let canonical = self
                    .builtin_aliases
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| normal.clone());
                if !resolution.builtin.contains(&canonical) {
                    resolution.builtin.push(canonical);
                }
                continue;
            } else if let Some(found) = self.find_by_alias(name)? {
                found
            } else {
                return Err(KmodError::Unknown {
                    name: name.to_string(),
                    suggestions: self.suggestions(name),
                });
            };
            self.visit(&module, None, &mut infos, &mut done, &mut resolution)?;
        }
        Ok(resolution)
    }

    /// Depth-first: dependencies, then the module, then its post-softdeps.
    fn visit(
        &self,
        name: &str,
        needed_by: Option<&str>,
        infos: &mut HashMap<String, ModInfo>,
        done: &mut BTreeSet<String>,
        out: &mut Resolution,
    ) -> Result<(), KmodError> {
        if done.contains(name) || self.builtin.contains(name) && !self.files.contains_key(name) {
            return Ok(());
        }
        done.insert(name.to_string());
        let Some(file) = self.files.get(name) else {
            return Err(match needed_by {
                Some(module) => KmodError::MissingDependency {
                    module: module.to_string(),
                    missing: name.to_string(),
                },
                None => KmodError::Unknown {
                    name: name.to_string(),
                    suggestions: self.suggestions(name),
                },
            });
        };
        let info = match infos.get(name) {
            Some(info) => info.clone(),
            None => {
                let info = self.modinfo(file)?;
                infos.insert(name.to_string(), info.clone());
                info
            }
        };
        for soft in &info.softdep_pre {
            if let Some(found) = self.soft_target(soft) {
                self.visit(&found, Some(name), infos, done, out)?;
            }
        }
        for dep in &info.depends {
            self.visit(dep, Some(name), infos, done, out)?;
        }
        out.modules.push(Module {
            file: file.clone(),
            info: info.clone(),
        });
        for soft in &info.softdep_post {
            if let Some(found) = self.soft_target(soft) {
                self.visit(&found, Some(name), infos, done, out)?;
            }
        }
        Ok(())
    }

    /// A soft dependency names a module or an alias; it is optional, so one that is built
    /// in or absent is skipped.
    fn soft_target(&self, name: &str) -> Option<String> {
        let normal = normalize(name);
        if self.files.contains_key(&normal) {
            return Some(normal);
        }
        if self.is_builtin(name) {
            return None;
        }
        self.find_by_alias(name).ok().flatten()
    }

    /// Add `modules/<name>.ko` (decompressed) for each resolved module and
    /// `modules/order` to an initramfs tree. Returns the bytes of module files added.
    pub fn add_to_initramfs(
        &self,
        resolution: &Resolution,
        tree: &mut Tree,
    ) -> Result<u64, KmodError> {
        self.add_listed(resolution.modules.iter(), INITRAMFS_MODULES_ORDER, tree)
    }

    /// Add the modules of `preload` that `stage1` does not already carry, and
    /// `modules/preload` listing them in load order. Returns the bytes of files added.
    pub fn add_preload_to_initramfs(
        &self,
        stage1: &Resolution,
        preload: &Resolution,
        tree: &mut Tree,
    ) -> Result<u64, KmodError> {
        let extra = preload.modules.iter().filter(|module| {
            !stage1
                .modules
                .iter()
                .any(|m| m.info.name == module.info.name)
        });
        self.add_listed(extra, INITRAMFS_MODULES_PRELOAD, tree)
    }

    /// Add `modules/<name>.ko` for each of `modules` and the list file `list` naming
    /// them in order.
    fn add_listed<'m>(
        &self,
        modules: impl Iterator<Item = &'m Module>,
        list: &str,
        tree: &mut Tree,
    ) -> Result<u64, KmodError> {
        let mut order = String::new();
        let mut total = 0u64;
        for module in modules {
            let file_name = format!("{}.ko", module.info.name);
            let data = self.module_bytes(&module.file)?;
            total += data.len() as u64;
            tree.add_file(&format!("{INITRAMFS_MODULES_DIR}/{file_name}"), 0o644, data)
                .map_err(KmodError::Tree)?;
            order.push_str(&file_name);
            order.push('\n');
        }
        tree.add_file(list, 0o644, order).map_err(KmodError::Tree)?;
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alias_map_round_trips_through_bytes() {
        let elf = |aliases: &[&str]| -> Vec<u8> {
            let mut modinfo = Vec::new();
            for a in aliases {
                modinfo.extend_from_slice(format!("alias={a}").as_bytes());
                modinfo.push(0);
            }
            let mut obj = object::write::Object::new(
                object::BinaryFormat::Elf,
                object::Architecture::X86_64,
                object::Endianness::Little,
            );
            let section =
                obj.add_section(Vec::new(), b".modinfo".to_vec(), object::SectionKind::Data);
            obj.append_section_data(section, &modinfo, 1);
            obj.write().unwrap()
        };
        let files = || {
            [
                ("kernel/fs/squashfs.ko".to_string(), elf(&["fs-squashfs"])),
                (
                    "kernel/crypto/crc32c.ko".to_string(),
                    elf(&["crypto-crc32c", "crc32c"]),
                ),
            ]
        };
        let scanned = ModuleIndex::from_files(files());
        let bytes = scanned.alias_map_bytes().unwrap();
        let preset = ModuleIndex::from_files(files());
        assert!(preset.preset_alias_map(&bytes));
        assert_eq!(preset.alias_map().unwrap(), scanned.alias_map().unwrap());
        assert_eq!(
            preset.find_by_alias("fs-squashfs").unwrap().as_deref(),
            Some("squashfs")
        );
        // A map naming a module this tree lacks is refused.
        let other = ModuleIndex::from_files([files()[0].clone()]);
        assert!(!other.preset_alias_map(&bytes));
    }

    #[test]
    fn parses_modinfo_strings() {
        let section =
            b"license=GPL\0depends=dm-bufio,dm_mod\0name=dm_verity\0alias=dm-target-verity\0\
softdep=pre: crc32c post: foo bar\0intree=Y\0";
        let info = parse_modinfo(section, "x");
        assert_eq!(info.name, "dm_verity");
        assert_eq!(info.depends, ["dm_bufio", "dm_mod"]);
        assert_eq!(info.aliases, ["dm-target-verity"]);
        assert_eq!(info.softdep_pre, ["crc32c"]);
        assert_eq!(info.softdep_post, ["foo", "bar"]);
        assert_eq!(
            parse_modinfo(b"depends=\0", "virtio_blk").depends,
            Vec::<String>::new()
        );
        assert_eq!(parse_modinfo(b"", "virtio_blk").name, "virtio_blk");
    }

    #[test]
    fn reads_kernel_config() {
        let config = "# CONFIG_FOO is not set\nCONFIG_CRYPTO_SHA256=y\nCONFIG_DM_VERITY=m\n\
CONFIG_LOCALVERSION=\"\"\n";
        assert!(kernel_config_builtin(config, "CONFIG_CRYPTO_SHA256"));
        assert!(kernel_config_builtin(config, "CRYPTO_SHA256"));
        assert!(!kernel_config_builtin(config, "DM_VERITY"));
        assert!(!kernel_config_builtin(config, "FOO"));
        assert_eq!(kernel_config_value(config, "DM_VERITY"), Some("m"));
        assert_eq!(kernel_config_value(config, "CRYPTO_SHA"), None);
    }

    #[test]
    fn names_come_from_file_names() {
        assert_eq!(
            module_name_of("kernel/drivers/md/dm-verity.ko.xz").as_deref(),
            Some("dm_verity")
        );
        assert_eq!(module_name_of("modules.order"), None);
        assert_eq!(levenshtein("virtio_blk", "virtio_blc"), 1);
    }
}
