//! The lock file (`images/<name>-<arch>.lock`): every Debian input of one
//! architecture pinned by mirror path, size and sha256, plus the dependencies that
//! exclusions dropped. [`generate`] makes one from the definition and the mirror's
//! `Release` and `Packages` files; [`Lock::check_matches`] tells when it is stale.
//!
//! The `Release` file is fetched over plain HTTP and its `InRelease` signature is not
//! checked yet: the `Packages.xz` index is verified against the sha256 it gives, and
//! every `.deb` against the sha256 the index gives, so a reviewer of the committed lock
//! sees exactly what was pinned.

use std::io::Read;
use std::path::{Path, PathBuf};

use keelson_configs::layout::Arch;
use serde::{Deserialize, Serialize};

use super::Progress;
use super::fetch::{Cache, FetchError, Pinned};
use super::index::{Index, IndexError, Release};
use super::mirror::{Mirror, MirrorError};
use super::resolve::{ResolveError, resolve};
use crate::definition::{Definition, DefinitionError};

/// The lock format this code reads and writes.
pub const FORMAT: u32 = 1;

/// A lock file problem.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock file could not be read.
    #[error("cannot read lock file {path}; run `cargo xtask lock` to create it")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The lock file does not parse.
    #[error("lock file {path} is not valid; run `cargo xtask lock` to regenerate it")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
    /// The lock file has another format version.
    #[error(
        "lock file {path} has format {found}, this imager reads format {FORMAT}; run `cargo xtask lock`"
    )]
    Format {
        /// The file.
        path: PathBuf,
        /// The format found.
        found: u32,
    },
    /// The lock file could not be written.
    #[error("cannot write lock file {path}; check the disk")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Serialising the lock failed (a bug).
    #[error("cannot serialise the lock file {path}")]
    Serialize {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::ser::Error,
    },
    /// The lock was made from another definition.
    #[error(
        "{lock} is stale: it was made from a different {definition} (packages, kernel, exclusions or suite changed); run `cargo xtask lock`"
    )]
    Stale {
        /// The lock file.
        lock: String,
        /// The definition file.
        definition: String,
    },
    /// The lock is for another architecture or an unknown one.
    #[error("{lock} pins architecture `{found}`, expected `{expected}`; run `cargo xtask lock`")]
    WrongArch {
        /// The lock file.
        lock: String,
        /// Its architecture.
        found: String,
        /// The one wanted.
        expected: String,
    },
    /// The definition could not be used.
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    /// The mirror could not serve the Release file.
    #[error("cannot get the {suite} Release file")]
    Release {
        /// The suite.
        suite: String,
        /// Why.
        #[source]
        source: MirrorError,
    },
    /// Reading the Release file's body failed.
    #[error("download of {url} broke off; retry")]
    ReleaseBody {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The Release file does not list the index we need.
    #[error(
        "the {suite} Release file lists no {path}; is `{suite}` a suite this mirror carries for {arch}?"
    )]
    NoIndex {
        /// The suite.
        suite: String,
        /// The index path.
        path: String,
        /// The architecture.
        arch: String,
    },
    /// A Release or Packages file is malformed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// Downloading the Packages index failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// Decompressing the Packages index failed.
    #[error(
        "cannot decompress {path} (a cached index that passed its sha256 check); delete it and retry"
    )]
    Decompress {
        /// The cached file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Resolution failed.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
}

/// A lock file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    /// The lock format ([`FORMAT`]).
    pub format: u32,
    /// [`Definition::resolution_sha256`] of the definition it was made from.
    pub definition_sha256: String,
    /// The Debian suite.
    pub suite: String,
    /// The Debian architecture.
    pub arch: String,
    /// The suite's release version when locked (`13.2`).
    pub release_version: String,
    /// The `Date` of the suite's Release file when locked.
    pub release_date: String,
    /// The sha256 of the `Packages.xz` index resolved against.
    pub packages_index_sha256: String,
    /// The pinned kernel package (`linux-image-6.12.57+deb13-amd64`).
    pub kernel: String,
    /// Every pinned package, sorted by name.
    #[serde(rename = "package", default)]
    pub packages: Vec<LockedPackage>,
    /// Dependencies left out because only excluded packages satisfy them.
    #[serde(default)]
    pub excluded: Vec<ExcludedEntry>,
    #[serde(skip)]
    path: Option<PathBuf>,
}

/// One pinned package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedPackage {
    /// The package name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Its architecture (`amd64`, `arm64` or `all`).
    pub arch: String,
    /// The path of the `.deb` under the mirror's root.
    pub filename: String,
    /// The size in bytes.
    pub size: u64,
    /// The sha256, lower-case hex.
    pub sha256: String,
    /// Why it is in the image.
    pub why: String,
}

/// A dependency left out of the image on purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExcludedEntry {
    /// The excluded package (or virtual package).
    pub name: String,
    /// The package that depends on it.
    pub required_by: String,
    /// The reason from the definition.
    pub reason: String,
}

impl Lock {
    /// Read a lock file.
    pub fn load(path: &Path) -> Result<Lock, LockError> {
        let text = std::fs::read_to_string(path).map_err(|source| LockError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut lock = Lock::parse(&text, path)?;
        lock.path = Some(path.to_path_buf());
        Ok(lock)
    }

    /// Parse a lock file's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Lock, LockError> {
        let lock: Lock = toml::from_str(text).map_err(|source| LockError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        if lock.format != FORMAT {
            return Err(LockError::Format {
                path: path.to_path_buf(),
                found: lock.format,
            });
        }
        Ok(lock)
    }

    /// The lock file's text.
    pub fn to_text(&self) -> Result<String, LockError> {
        let body = toml::to_string(self).map_err(|source| LockError::Serialize {
            path: self.path.clone().unwrap_or_default(),
            source,
        })?;
        Ok(format!(
            "# Generated by `cargo xtask lock` from the image definition: do not edit.\n\
             # Every Debian input of one architecture, pinned by sha256.\n\n{body}"
        ))
    }

    /// Write the lock file atomically (temporary file, then rename).
    pub fn save(&mut self, path: &Path) -> Result<(), LockError> {
        self.path = Some(path.to_path_buf());
        let text = self.to_text()?;
        let write_err = |source| LockError::Write {
            path: path.to_path_buf(),
            source,
        };
        let temp = path.with_extension("lock.tmp");
        std::fs::write(&temp, text).map_err(write_err)?;
        std::fs::rename(&temp, path).map_err(|source| {
            let _ = std::fs::remove_file(&temp);
            write_err(source)
        })
    }

    /// The file this lock was loaded from or saved to, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The kernel release (`6.12.57+deb13-amd64`): the kernel package's name without
    /// `linux-image-`, which is also the directory name under `/usr/lib/modules`.
    pub fn kernel_release(&self) -> &str {
        self.kernel
            .strip_prefix("linux-image-")
            .unwrap_or(&self.kernel)
    }

    /// The pinned package called `name`.
    pub fn package(&self, name: &str) -> Option<&LockedPackage> {
        self.packages.iter().find(|p| p.name == name)
    }

    /// Total size of the pinned `.deb` files in bytes.
    pub fn total_size(&self) -> u64 {
        self.packages.iter().map(|p| p.size).sum()
    }

    /// Fail unless this lock was made from `definition` for `arch`.
    pub fn check_matches(&self, definition: &Definition, arch: Arch) -> Result<(), LockError> {
        let lock = self.path.as_ref().map_or_else(
            || definition.lock_path(arch).display().to_string(),
            |p| p.display().to_string(),
        );
        if self.arch != arch.debian() {
            return Err(LockError::WrongArch {
                lock,
                found: self.arch.clone(),
                expected: arch.debian().to_string(),
            });
        }
        if self.definition_sha256 != definition.resolution_sha256(arch)? {
            return Err(LockError::Stale {
                lock,
                definition: definition.path.display().to_string(),
            });
        }
        Ok(())
    }
}

/// Make the lock for `arch`: fetch the suite's `Release` and `Packages.xz` (the index
/// verified and cached by sha256), resolve the definition's requests and write nothing.
pub fn generate(
    definition: &Definition,
    arch: Arch,
    mirror: &Mirror,
    cache: &Cache,
    progress: Progress<'_>,
) -> Result<Lock, LockError> {
    let suite = &definition.suite;
    let release_path = format!("dists/{suite}/Release");
    progress(&format!("reading {}", mirror.url(&release_path)));
    let (mut body, _) = mirror
        .get(&release_path)
        .map_err(|source| LockError::Release {
            suite: suite.clone(),
            source,
        })?;
    let mut text = String::new();
    body.read_to_string(&mut text)
        .map_err(|source| LockError::ReleaseBody {
            url: mirror.url(&release_path),
            source,
        })?;
    let release = Release::parse(&text, &format!("{suite} Release"))?;
    let index = load_index(suite, &release, arch, mirror, cache, progress)?;
    let (index, index_sha256) = index;
    progress(&format!(
        "resolving {} packages for {arch} against {} packages of {suite} {}",
        definition.requests(arch)?.len(),
        index.packages().len(),
        release.version
    ));
    let resolution = resolve(
        &index,
        &definition.requests(arch)?,
        &definition.exclusions(),
    )?;
    let kernel = resolution
        .packages
        .iter()
        .find(|r| r.why.starts_with("kernel"))
        .map(|r| r.package.name.clone())
        .unwrap_or_default();
    let lock = Lock {
        format: FORMAT,
        definition_sha256: definition.resolution_sha256(arch)?,
        suite: suite.clone(),
        arch: arch.debian().to_string(),
        release_version: release.version.clone(),
        release_date: release.date.clone(),
        packages_index_sha256: index_sha256,
        kernel,
        packages: resolution
            .packages
            .into_iter()
            .map(|r| LockedPackage {
                name: r.package.name,
                version: r.package.version.to_string(),
                arch: r.package.arch,
                filename: r.package.filename,
                size: r.package.size,
                sha256: r.package.sha256,
                why: r.why,
            })
            .collect(),
        excluded: resolution
            .excluded
            .into_iter()
            .map(|e| ExcludedEntry {
                name: e.name,
                required_by: e.required_by,
                reason: e.reason,
            })
            .collect(),
        path: None,
    };
    progress(&format!(
        "{arch}: {} packages, {:.1} MiB of .deb files, {} dependencies excluded",
        lock.packages.len(),
        lock.total_size() as f64 / 1048576.0,
        lock.excluded.len()
    ));
    Ok(lock)
}

/// The suite's `main` `Packages` index for `arch`, verified against the Release file.
fn load_index(
    suite: &str,
    release: &Release,
    arch: Arch,
    mirror: &Mirror,
    cache: &Cache,
    progress: Progress<'_>,
) -> Result<(Index, String), LockError> {
    let rel_path = format!("main/binary-{}/Packages.xz", arch.debian());
    let (size, sha256) = release.entry(&rel_path).ok_or_else(|| LockError::NoIndex {
        suite: suite.to_string(),
        path: rel_path.clone(),
        arch: arch.debian().to_string(),
    })?;
    let mirror_path = format!("dists/{suite}/{rel_path}");
    let pinned = Pinned {
        what: format!("the {suite} {rel_path} index"),
        mirror_path: &mirror_path,
        size,
        sha256,
    };
    let path = cache.fetch(
        "indexes",
        &format!("{sha256}-Packages.xz"),
        &pinned,
        Some(mirror),
        progress,
    )?;
    let decompress_err = |source| LockError::Decompress {
        path: path.clone(),
        source,
    };
    let file = std::fs::File::open(&path).map_err(decompress_err)?;
    let mut text = String::new();
    liblzma::read::XzDecoder::new(std::io::BufReader::new(file))
        .read_to_string(&mut text)
        .map_err(decompress_err)?;
    let index = Index::parse(&text, &format!("{suite} {rel_path}"))?;
    Ok((index, sha256.to_string()))
}
