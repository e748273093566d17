//! The download cache: files stored by sha256 (`debs/<sha256>.deb`,
//! `indexes/<sha256>-Packages.xz`), each downloaded to a temporary file in the same
//! directory, checked for size and sha256, then renamed into place. A cached file is
//! re-hashed before use; one that does not match is deleted and fetched again. A
//! warm cache needs no network at all (no mirror is even looked up).
//!
//! The cache lives in `$KEELSON_CACHE`, else `$XDG_CACHE_HOME/keelson`, else
//! `~/.cache/keelson`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::Progress;
use super::lock::{Lock, LockedPackage};
use super::mirror::{Mirror, MirrorError};

/// A cache or download failure.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No cache directory could be chosen.
    #[error("no cache directory: set KEELSON_CACHE (or XDG_CACHE_HOME or HOME)")]
    NoCacheDir,
    /// A file or directory of the cache could not be used.
    #[error(
        "cache I/O on {path} failed; check the disk (space, permissions) or set KEELSON_CACHE elsewhere"
    )]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The mirror could not serve a file.
    #[error("cannot download {what}")]
    Download {
        /// Which input (`package containerd 1.7.24~ds1-6`).
        what: String,
        /// Why.
        #[source]
        source: MirrorError,
    },
    /// Reading the body from the mirror failed.
    #[error("download of {what} from {url} broke off; retry, or pass another --mirror")]
    Read {
        /// Which input.
        what: String,
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The downloaded file is not what the lock (or Release file) pins.
    #[error(
        "download of {what} from {url} is corrupt: got {got_size} bytes with sha256 {got_sha256}, expected {size} bytes with sha256 {sha256}; retry, or if the mirror changed the file, run `cargo xtask lock`"
    )]
    Mismatch {
        /// Which input.
        what: String,
        /// The URL.
        url: String,
        /// Expected size.
        size: u64,
        /// Expected sha256.
        sha256: String,
        /// Size received.
        got_size: u64,
        /// sha256 received.
        got_sha256: String,
    },
    /// A file is missing from the cache and no mirror was given.
    #[error(
        "{what} is not in the cache ({path}) and no mirror was given; pass --mirror or configure a Debian mirror in apt's sources"
    )]
    NotCached {
        /// Which input.
        what: String,
        /// Where it would be.
        path: PathBuf,
    },
    /// A download thread panicked.
    #[error("a download worker failed unexpectedly")]
    Worker,
}

/// One file to fetch: where it is on the mirror and what it must be.
#[derive(Debug, Clone)]
pub struct Pinned<'a> {
    /// For messages: `package containerd 1.7.24~ds1-6`.
    pub what: String,
    /// The path under the mirror's root.
    pub mirror_path: &'a str,
    /// The exact size in bytes.
    pub size: u64,
    /// The sha256, lower-case hex.
    pub sha256: &'a str,
}

/// The download cache.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Cache {
    /// A cache rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Cache {
        Cache { root: root.into() }
    }

    /// The cache named by the environment: `$KEELSON_CACHE`, else
    /// `$XDG_CACHE_HOME/keelson`, else `$HOME/.cache/keelson`.
    pub fn from_env() -> Result<Cache, FetchError> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        if let Some(dir) = var("KEELSON_CACHE") {
            return Ok(Cache::new(dir));
        }
        if let Some(dir) = var("XDG_CACHE_HOME") {
            return Ok(Cache::new(PathBuf::from(dir).join("keelson")));
        }
        if let Some(home) = var("HOME") {
            return Ok(Cache::new(PathBuf::from(home).join(".cache/keelson")));
        }
        Err(FetchError::NoCacheDir)
    }

    /// The cache's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a locked package is (or would be) cached.
    pub fn deb_path(&self, package: &LockedPackage) -> PathBuf {
        self.root
            .join("debs")
            .join(format!("{}.deb", package.sha256))
    }

    /// Every package of `lock`, verified, in the lock's order. Missing or corrupt
    /// files are downloaded from `mirror` (four at a time); with a warm cache,
    /// `mirror` may be `None` and nothing touches the network.
    pub fn fetch_all(
        &self,
        lock: &Lock,
        mirror: Option<&Mirror>,
        progress: Progress<'_>,
    ) -> Result<Vec<PathBuf>, FetchError> {
        let dir = self.root.join("debs");
        let jobs: Vec<(PathBuf, Pinned<'_>)> = lock
            .packages
            .iter()
            .map(|p| {
                let pinned = Pinned {
                    what: format!("package {} {} ({})", p.name, p.version, p.arch),
                    mirror_path: &p.filename,
                    size: p.size,
                    sha256: &p.sha256,
                };
                (dir.join(format!("{}.deb", p.sha256)), pinned)
            })
            .collect();
        let next = Mutex::new(jobs.iter());
        let first_error: Mutex<Option<FetchError>> = Mutex::new(None);
        let workers = 4.min(jobs.len()).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    s.spawn(|| {
                        loop {
                            let job = match next.lock() {
                                Ok(mut it) => it.next(),
                                Err(_) => None,
                            };
                            let Some((path, pinned)) = job else { break };
                            if first_error.lock().map_or(true, |e| e.is_some()) {
                                break;
                            }
                            if let Err(e) = self.fetch_to(path, pinned, mirror, progress)
                                && let Ok(mut slot) = first_error.lock()
                            {
                                slot.get_or_insert(e);
                            }
                        }
                    })
                })
                .collect();
            for h in handles {
                if h.join().is_err()
                    && let Ok(mut slot) = first_error.lock()
                {
                    slot.get_or_insert(FetchError::Worker);
                }
            }
        });
        if let Some(e) = first_error.into_inner().ok().flatten() {
            return Err(e);
        }
        progress(&format!(
            "{} packages for {} ({:.1} MiB) verified in {}",
            lock.packages.len(),
            lock.arch,
            lock.total_size() as f64 / 1048576.0,
            dir.display()
        ));
        Ok(jobs.into_iter().map(|(path, _)| path).collect())
    }

    /// One pinned file into `subdir/<name>` of the cache, verified.
    pub fn fetch(
        &self,
        subdir: &str,
        name: &str,
        pinned: &Pinned<'_>,
        mirror: Option<&Mirror>,
        progress: Progress<'_>,
    ) -> Result<PathBuf, FetchError> {
        let path = self.root.join(subdir).join(name);
        self.fetch_to(&path, pinned, mirror, progress)?;
        Ok(path)
    }

    fn fetch_to(
        &self,
        path: &Path,
        pinned: &Pinned<'_>,
        mirror: Option<&Mirror>,
        progress: Progress<'_>,
    ) -> Result<(), FetchError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| FetchError::Io { path, source }
        };
        match hash_file(path) {
            Ok((size, sum)) if size == pinned.size && sum == pinned.sha256 => return Ok(()),
            Ok((size, sum)) => {
                progress(&format!(
                    "cached {} at {} is corrupt ({size} bytes, sha256 {sum}); deleting it and fetching again",
                    pinned.what,
                    path.display()
                ));
                std::fs::remove_file(path).map_err(io_err(path))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(io_err(path)(source)),
        }
        let Some(mirror) = mirror else {
            return Err(FetchError::NotCached {
                what: pinned.what.clone(),
                path: path.to_path_buf(),
            });
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let url = mirror.url(pinned.mirror_path);
        progress(&format!(
            "fetching {} ({:.1} MiB) from {url}",
            pinned.what,
            pinned.size as f64 / 1048576.0
        ));
        let (mut body, _) =
            mirror
                .get(pinned.mirror_path)
                .map_err(|source| FetchError::Download {
                    what: pinned.what.clone(),
                    source,
                })?;
        let temp = dir.join(format!(
            ".tmp-{}-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed),
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ));
        let result = (|| {
            let mut file = File::create(&temp).map_err(io_err(&temp))?;
            let (size, sum) =
                copy_hashing(&mut body, &mut file, pinned.size).map_err(|e| match e {
                    CopyError::Read(source) => FetchError::Read {
                        what: pinned.what.clone(),
                        url: url.clone(),
                        source,
                    },
                    CopyError::Write(source) => io_err(&temp)(source),
                })?;
            if size != pinned.size || sum != pinned.sha256 {
                return Err(FetchError::Mismatch {
                    what: pinned.what.clone(),
                    url: url.clone(),
                    size: pinned.size,
                    sha256: pinned.sha256.to_string(),
                    got_size: size,
                    got_sha256: sum,
                });
            }
            file.sync_all().map_err(io_err(&temp))?;
            std::fs::rename(&temp, path).map_err(io_err(path))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        result
    }
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// Copy at most `limit + 1` bytes (enough to notice an oversized body), hashing them.
fn copy_hashing(
    from: &mut dyn Read,
    to: &mut dyn Write,
    limit: u64,
) -> Result<(u64, String), CopyError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n]).map_err(CopyError::Write)?;
        total += n as u64;
        if total > limit {
            break;
        }
    }
    Ok((total, hex::encode(hasher.finalize())))
}

/// The size and sha256 of a file.
pub fn hash_file(path: &Path) -> io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let size = io::copy(&mut file, &mut hasher)?;
    Ok((size, hex::encode(hasher.finalize())))
}
