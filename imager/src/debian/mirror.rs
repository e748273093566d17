//! Where Debian packages come from: the mirror URL, found in the host's apt sources
//! (never written in this repository), and plain HTTP GETs against it.
//!
//! apt's source lists are read by hand: both formats (one-line `sources.list` and
//! deb822 `*.sources`) are a few lines of text, and apt itself is not a library we
//! can call. The mirror is plain HTTP: integrity comes from the sha256 sums in the
//! `Release` file and in our lock files, not from the transport.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An error finding the mirror or talking to it.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// `--mirror` was given something that is not an `http://` URL.
    #[error(
        "mirror URL `{0}` is not an http:// URL; pass the Debian archive's root, e.g. --mirror http://HOST/debian"
    )]
    BadUrl(String),
    /// No apt source names the main Debian archive over HTTP.
    #[error(
        "no Debian mirror found in {0}: no `deb` source with a Debian suite and component `main` over http://; pass --mirror http://HOST/debian"
    )]
    NotFound(String),
    /// Reading an apt source file failed.
    #[error("cannot read apt sources file {path}")]
    ReadSources {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The mirror answered 404.
    #[error(
        "{url} does not exist on the mirror (404); the mirror may have dropped this version: run `cargo xtask lock` to pin current packages, or pass another --mirror"
    )]
    Missing {
        /// The URL.
        url: String,
    },
    /// The mirror answered with another error status.
    #[error(
        "GET {url} failed with HTTP status {status}; check the mirror or pass another --mirror"
    )]
    Status {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// The request failed below HTTP (DNS, connection, timeout...).
    #[error("GET {url} failed; check the network and the mirror, or pass another --mirror")]
    Transport {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: Box<ureq::Error>,
    },
}

/// A Debian archive root such as `http://HOST/debian` (no trailing slash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    base: String,
}

impl Mirror {
    /// A mirror from a URL given by the user (`--mirror`).
    pub fn new(url: &str) -> Result<Mirror, MirrorError> {
        let url = url.trim();
        if !url.starts_with("http://") || url.len() <= "http://".len() {
            return Err(MirrorError::BadUrl(url.to_string()));
        }
        Ok(Mirror {
            base: url.trim_end_matches('/').to_string(),
        })
    }

    /// The archive root URL.
    pub fn as_str(&self) -> &str {
        &self.base
    }

    /// The URL of a path under the archive root (`pool/main/...`, `dists/...`).
    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    /// GET `path` under the mirror: the body as a stream, and its length if announced.
    pub fn get(&self, path: &str) -> Result<(Box<dyn Read + Send>, Option<u64>), MirrorError> {
        get(&self.url(path))
    }
}

/// GET a URL: the body as a stream, and its length if announced.
pub fn get(url: &str) -> Result<(Box<dyn Read + Send>, Option<u64>), MirrorError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_recv_body(Some(Duration::from_secs(900)))
        .build()
        .into();
    match agent.get(url).call() {
        Ok(response) => {
            let len = response.body().content_length();
            Ok((Box::new(response.into_body().into_reader()), len))
        }
        Err(ureq::Error::StatusCode(404)) => Err(MirrorError::Missing {
            url: url.to_string(),
        }),
        Err(ureq::Error::StatusCode(status)) => Err(MirrorError::Status {
            url: url.to_string(),
            status,
        }),
        Err(source) => Err(MirrorError::Transport {
            url: url.to_string(),
            source: Box::new(source),
        }),
    }
}

/// Debian release names and aliases a main-archive source may carry.
const DEBIAN_SUITES: &[&str] = &[
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "oldoldstable",
    "oldstable",
    "stable",
    "testing",
    "unstable",
];

fn is_main_archive_suite(suite: &str) -> bool {
    let base = suite
        .strip_suffix("-updates")
        .or_else(|| suite.strip_suffix("-backports"))
        .unwrap_or(suite);
    DEBIAN_SUITES.contains(&base)
}

fn is_candidate(uri: &str, suites: &[&str], components: &[&str]) -> bool {
    uri.starts_with("http://")
        && !uri.trim_end_matches('/').ends_with("-security")
        && suites.iter().any(|s| is_main_archive_suite(s))
        && components.contains(&"main")
}

/// The Debian mirror named by the host's apt sources (`/etc/apt`).
pub fn mirror_from_apt_sources() -> Result<Mirror, MirrorError> {
    mirror_from_apt_config(Path::new("/etc/apt"))
}

/// The Debian mirror named by the apt sources under `etc_apt` (a directory laid out
/// like `/etc/apt`): `sources.list` first, then `sources.list.d/*.list` and
/// `*.sources` in name order, as apt reads them. The first `http://` URI of a `deb`
/// source with a Debian suite and component `main`, not the security archive, wins.
pub fn mirror_from_apt_config(etc_apt: &Path) -> Result<Mirror, MirrorError> {
    let mut files = vec![etc_apt.join("sources.list")];
    if let Ok(dir) = std::fs::read_dir(etc_apt.join("sources.list.d")) {
        let mut more: Vec<PathBuf> = dir
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources"))
            .collect();
        more.sort();
        files.extend(more);
    }
    for path in files {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(MirrorError::ReadSources { path, source }),
        };
        let found = if path.extension().is_some_and(|e| e == "sources") {
            from_deb822(&text)
        } else {
            from_one_line(&text)
        };
        if let Some(uri) = found {
            return Mirror::new(&uri);
        }
    }
    Err(MirrorError::NotFound(etc_apt.display().to_string()))
}

/// The first main-archive URI of a one-line-format source list.
pub fn from_one_line(text: &str) -> Option<String> {
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        let mut rest: Vec<&str> = words.collect();
        // Options: `[arch=amd64 signed-by=...]`, possibly several words.
        if rest.first().is_some_and(|w| w.starts_with('[')) {
            let close = rest.iter().position(|w| w.ends_with(']'))?;
            rest.drain(..=close);
        }
        if let [uri, suite, components @ ..] = &rest[..]
            && is_candidate(uri, &[suite], components)
        {
            return Some(uri.to_string());
        }
    }
    None
}

/// The first main-archive URI of a deb822 `.sources` file.
pub fn from_deb822(text: &str) -> Option<String> {
    let mut stanza: Vec<(String, String)> = Vec::new();
    let lines = text.lines().chain(std::iter::once(""));
    for line in lines {
        if line.trim_start().starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            if let Some(uri) = stanza_candidate(&stanza) {
                return Some(uri);
            }
            stanza.clear();
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = stanza.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            stanza.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    None
}

fn stanza_candidate(stanza: &[(String, String)]) -> Option<String> {
    let field = |k: &str| {
        stanza
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>())
    };
    if field("enabled").is_some_and(|v| v.first().is_some_and(|e| e.eq_ignore_ascii_case("no"))) {
        return None;
    }
    if !field("types")?.contains(&"deb") {
        return None;
    }
    let suites = field("suites")?;
    let components = field("components")?;
    field("uris")?
        .into_iter()
        .find(|uri| is_candidate(uri, &suites, &components))
        .map(str::to_string)
}
