//! The value types of the machine config and the rules each value must follow.
//!
//! Every rule lives in one `check_*` function that returns a [`ValueError`] with a message
//! naming the value and a hint of what a good value looks like. The same functions back
//! the typed values' `FromStr` (and so their serde `Deserialize`) and the validator's walk
//! over the raw document, so a value is judged the same way wherever it comes from.

use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ipnet::IpNet;

/// The Kubernetes minor versions (of major version 1) that Keelson supports.
pub const SUPPORTED_KUBERNETES_MINORS: RangeInclusive<u32> = 31..=34;

/// The Kubernetes version `machinectl gen config` uses when none is given.
pub const DEFAULT_KUBERNETES_VERSION: &str = "1.34.1";

/// The MTUs an interface may be given.
pub const MTU_RANGE: RangeInclusive<i64> = 576..=9216;

/// A value that breaks its rule: what is wrong and what a good value looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValueError {
    /// What is wrong, naming the value.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
}

impl ValueError {
    fn new(message: impl Into<String>, hint: impl Into<String>) -> ValueError {
        ValueError {
            message: message.into(),
            hint: Some(hint.into()),
        }
    }
}

/// `s` quoted for a message, shortened when long, with control characters escaped.
pub(crate) fn quote(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let short: String = s.chars().take(MAX).collect();
        format!("{short:?}...")
    }
}

/// Implements `Display`-based `Serialize` and `FromStr`-based `Deserialize` for a value type.
macro_rules! string_serde {
    ($ty:ty) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <String as serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

// ---------------------------------------------------------------------------------------
// Names

/// How strict a DNS-name check is.
#[derive(Debug, Clone, Copy)]
struct NameRules {
    /// What the value is called in messages ("hostname", "DNS name").
    what: &'static str,
    /// Longest accepted name.
    max_len: usize,
    /// Only one label (no dots).
    single_label: bool,
    /// Upper-case letters are refused (Kubernetes object names are lower case).
    lowercase: bool,
    /// `*.` may start the name (certificate SANs).
    wildcard: bool,
}

fn name_problem(s: &str, rules: NameRules) -> Option<String> {
    if s.is_empty() {
        return Some("it is empty".into());
    }
    if s.len() > rules.max_len {
        return Some(format!("it is longer than {} characters", rules.max_len));
    }
    let body = match s.strip_prefix("*.") {
        Some(rest) if rules.wildcard => rest,
        _ => s,
    };
    if rules.single_label && body.contains('.') {
        return Some("'.' is not allowed".into());
    }
    for label in body.split('.') {
        if label.is_empty() {
            return Some(
                "it has an empty label (two dots in a row, or a leading or trailing dot)".into(),
            );
        }
        if label.len() > 63 {
            return Some(format!(
                "label {} is longer than 63 characters",
                quote(label)
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Some(format!("{c:?} is not allowed"));
        }
        if rules.lowercase && label.chars().any(|c| c.is_ascii_uppercase()) {
            return Some("upper-case letters are not allowed".into());
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some(format!("label {} starts or ends with '-'", quote(label)));
        }
    }
    None
}

fn check_name(s: &str, rules: NameRules, hint: &str) -> Result<(), ValueError> {
    match name_problem(s, rules) {
        None => Ok(()),
        Some(why) => Err(ValueError::new(
            format!("{} is not {}: {why}", quote(s), rules.what),
            hint,
        )),
    }
}

/// A node's hostname: an RFC 1123 name in lower case, at most 64 characters (the kernel's limit).
pub fn check_hostname(s: &str) -> Result<(), ValueError> {
    let rules = NameRules {
        what: "an RFC 1123 hostname",
        max_len: 64,
        single_label: false,
        lowercase: true,
        wildcard: false,
    };
    check_name(
        s,
        rules,
        "use lower-case letters, digits and '-' in dot-separated labels that do not start or end with '-', like cp-1",
    )
}

/// An RFC 1123 label in lower case (the cluster name).
pub fn check_dns_label(s: &str) -> Result<(), ValueError> {
    let rules = NameRules {
        what: "an RFC 1123 label",
        max_len: 63,
        single_label: true,
        lowercase: true,
        wildcard: false,
    };
    check_name(
        s,
        rules,
        "use up to 63 lower-case letters, digits and '-', not starting or ending with '-', like demo",
    )
}

/// A DNS domain in lower case (the cluster's DNS domain).
pub fn check_dns_domain(s: &str) -> Result<(), ValueError> {
    let rules = NameRules {
        what: "a DNS domain",
        max_len: 253,
        single_label: false,
        lowercase: true,
        wildcard: false,
    };
    check_name(s, rules, "use a lower-case DNS name like cluster.local")
}

/// A host: an IP address or a DNS name (time servers).
pub fn check_host(s: &str) -> Result<(), ValueError> {
    if s.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let rules = NameRules {
        what: "an IP address or a DNS name",
        max_len: 253,
        single_label: false,
        lowercase: false,
        wildcard: false,
    };
    check_name(
        s,
        rules,
        "write an IP address like 192.0.2.123 or a name like time.example.com",
    )
}

/// A certificate subject alternative name: an IP address or a DNS name, `*.` allowed.
pub fn check_san(s: &str) -> Result<(), ValueError> {
    if s.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let rules = NameRules {
        what: "an IP address or a DNS name",
        max_len: 253,
        single_label: false,
        lowercase: false,
        wildcard: true,
    };
    check_name(
        s,
        rules,
        "write an IP address like 10.5.0.2 or a name like cp.example.com",
    )
}

/// A Linux network interface name.
pub fn check_interface_name(s: &str) -> Result<(), ValueError> {
    let bad = s.is_empty()
        || s.len() > 15
        || s == "."
        || s == ".."
        || s.chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if bad {
        return Err(ValueError::new(
            format!("{} is not an interface name", quote(s)),
            "use 1 to 15 characters without '/', ':' or spaces, like eth0 or enp1s0",
        ));
    }
    Ok(())
}

/// A kernel module name.
pub fn check_module_name(s: &str) -> Result<(), ValueError> {
    let ok = !s.is_empty()
        && s.len() <= 55
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !ok {
        return Err(ValueError::new(
            format!("{} is not a kernel module name", quote(s)),
            "use the module's name without path or .ko suffix, like br_netfilter",
        ));
    }
    Ok(())
}

/// The top-level directories of `/proc/sys`.
const SYSCTL_ROOTS: [&str; 8] = ["abi", "debug", "dev", "fs", "kernel", "net", "user", "vm"];

/// A sysctl name in dotted form, like `net.ipv4.ip_forward`.
pub fn check_sysctl_name(s: &str) -> Result<(), ValueError> {
    let hint = "use the dotted name under /proc/sys, like net.ipv4.ip_forward";
    let segments: Vec<&str> = s.split('.').collect();
    let well_formed = segments.len() >= 2
        && segments.iter().all(|seg| {
            !seg.is_empty()
                && seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '/')
        });
    if !well_formed {
        return Err(ValueError::new(
            format!("{} is not a sysctl name", quote(s)),
            hint,
        ));
    }
    if !SYSCTL_ROOTS.contains(&segments[0]) {
        let roots = SYSCTL_ROOTS.join(", ");
        return Err(ValueError::new(
            format!(
                "{} is not a sysctl name: there is no /proc/sys/{}",
                quote(s),
                segments[0]
            ),
            format!("sysctl names start with one of {roots}"),
        ));
    }
    Ok(())
}

/// A command-line flag name without its dashes, like `max-pods`.
pub fn check_flag_name(s: &str) -> Result<(), ValueError> {
    if let Some(bare) = s.strip_prefix("--").or_else(|| s.strip_prefix('-')) {
        return Err(ValueError::new(
            format!("{} starts with '-'", quote(s)),
            format!("write the flag name without dashes: {}", quote(bare)),
        ));
    }
    let ok = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !ok {
        return Err(ValueError::new(
            format!("{} is not a flag name", quote(s)),
            "use letters, digits and '-', like max-pods",
        ));
    }
    Ok(())
}

/// A base URL to download artifacts from: `https://` or `http://` (the download is
/// verified by its pinned sha256 either way).
pub fn check_base_url(s: &str) -> Result<(), ValueError> {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"));
    let ok = match rest {
        Some(rest) => {
            let host = rest.split('/').next().unwrap_or_default();
            !host.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        None => false,
    };
    if !ok {
        return Err(ValueError::new(
            format!("{} is not an http(s) URL", quote(s)),
            "write a URL like https://mirror.example.com/kubernetes/release",
        ));
    }
    Ok(())
}

/// A registry host as image references name it: a DNS name or an IP address, with an
/// optional port (`registry.k8s.io`, `10.5.0.1:5000`, `[fd00::1]:5000`).
pub fn check_registry_host(s: &str) -> Result<(), ValueError> {
    let hint = "write a registry host like registry.k8s.io or 10.5.0.1:5000 (no scheme, no path)";
    if s.contains("://") || s.contains('/') {
        return Err(ValueError::new(
            format!("{} is not a registry host", quote(s)),
            hint,
        ));
    }
    let host = if let Some(rest) = s.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return Err(ValueError::new(
                format!("{} has no closing `]`", quote(s)),
                hint,
            ));
        };
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(ValueError::new(
                format!(
                    "{} has something other than an IPv6 address in brackets",
                    quote(s)
                ),
                hint,
            ));
        }
        check_registry_port(s, after.strip_prefix(':'), after.is_empty(), hint)?;
        return Ok(());
    } else {
        match s.split_once(':') {
            Some((host, port)) => {
                check_registry_port(s, Some(port), false, hint)?;
                host
            }
            None => s,
        }
    };
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    check_host(host).map_err(|err| ValueError::new(err.message, hint))
}

fn check_registry_port(
    s: &str,
    port: Option<&str>,
    none_ok: bool,
    hint: &str,
) -> Result<(), ValueError> {
    match port {
        None if none_ok => Ok(()),
        Some(p)
            if !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u16>().is_ok_and(|n| n > 0) =>
        {
            Ok(())
        }
        _ => Err(ValueError::new(
            format!("{} has an invalid port", quote(s)),
            hint,
        )),
    }
}

/// Where images come from (kubeadm's `imageRepository`): a registry host with an
/// optional port, then an optional path of lower-case repository components
/// (`registry.k8s.io`, `10.5.0.1:5000/k8s`).
pub fn check_image_repository(s: &str) -> Result<(), ValueError> {
    if let Some((scheme, _)) = s.split_once("://") {
        return Err(ValueError::new(
            format!("{} is a URL (its scheme is {})", quote(s), quote(scheme)),
            "write the registry host and an optional path without a scheme, like registry.k8s.io or 10.5.0.1:5000/k8s; a registry served over plain HTTP is named in machine.registries.mirrors",
        ));
    }
    let (host, path) = match s.split_once('/') {
        Some((host, path)) => (host, Some(path)),
        None => (s, None),
    };
    check_registry_host(host).map_err(|err| ValueError::new(
        format!("{}: {}", quote(s), err.message),
        "write a registry host and an optional path, like registry.k8s.io or 10.5.0.1:5000/k8s (no scheme)",
    ))?;
    if let Some(path) = path {
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        };
        if !path.split('/').all(component_ok) {
            return Err(ValueError::new(
                format!(
                    "{} has an invalid repository path {}",
                    quote(s),
                    quote(path)
                ),
                "path components are lower-case letters, digits, '.', '_' and '-', starting with a letter or digit",
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Addresses

/// An IP address.
pub fn check_ip(s: &str) -> Result<(), ValueError> {
    s.parse::<IpAddr>().map(|_| ()).map_err(|_| {
        ValueError::new(
            format!("{} is not an IP address", quote(s)),
            "expected an address like 10.5.0.1 or fd00::1",
        )
    })
}

/// An address with its prefix length, like `10.5.0.2/24` (host bits allowed).
pub fn check_cidr(s: &str) -> Result<(), ValueError> {
    parse_cidr(s).map(|_| ())
}

fn parse_cidr(s: &str) -> Result<IpNet, ValueError> {
    s.parse::<IpNet>().map_err(|_| {
        if s.parse::<IpAddr>().is_ok() {
            ValueError::new(
                format!("{} has no prefix length", quote(s)),
                format!("write it in CIDR form, like {s}/24"),
            )
        } else {
            ValueError::new(
                format!("{} is not an address in CIDR form", quote(s)),
                "expected an address and prefix length like 10.5.0.2/24 or fd00::2/64",
            )
        }
    })
}

/// A network in CIDR form with no host bits set, like `10.244.0.0/16`.
pub fn check_subnet(s: &str) -> Result<(), ValueError> {
    let net = parse_cidr(s)?;
    if net.trunc() != net {
        return Err(ValueError::new(
            format!("{} has host bits set", quote(s)),
            format!("did you mean {}?", net.trunc()),
        ));
    }
    Ok(())
}

/// A hardware (MAC) address: six hex pairs separated by ':'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<MacAddr, ValueError> {
        let err = || {
            ValueError::new(
                format!("{} is not a MAC address", quote(s)),
                "expected six hex pairs like 52:54:00:12:34:56",
            )
        };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 || !part.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

string_serde!(MacAddr);

// ---------------------------------------------------------------------------------------
// Cluster values

/// The control-plane endpoint: `https://HOST:PORT`, where HOST is an IP address or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The host, without brackets for IPv6.
    pub host: String,
    /// The port.
    pub port: u16,
}

impl FromStr for Endpoint {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Endpoint, ValueError> {
        const EXAMPLE: &str = "like https://10.5.0.2:6443";
        let Some(rest) = s.strip_prefix("https://") else {
            return Err(match s.split_once("://") {
                Some((scheme, _)) => ValueError::new(
                    format!(
                        "{} is not an https URL (its scheme is {})",
                        quote(s),
                        quote(scheme)
                    ),
                    format!("the control-plane endpoint must use https, {EXAMPLE}"),
                ),
                None => ValueError::new(
                    format!("{} is not an https URL", quote(s)),
                    format!("write the endpoint as a URL with a port, {EXAMPLE}"),
                ),
            });
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if !(path.is_empty() || path == "/") {
            return Err(ValueError::new(
                format!("{} has a path", quote(s)),
                format!("give only the scheme, host and port, {EXAMPLE}"),
            ));
        }
        let bad_host = || {
            ValueError::new(
                format!("{} does not name a valid host", quote(s)),
                format!("use an IP address or a DNS name, {EXAMPLE}"),
            )
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(bad_host)?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad_host());
            }
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((host, _)) if host.contains(':') => {
                    return Err(ValueError::new(
                        format!("{} has an IPv6 address without brackets", quote(s)),
                        "write IPv6 endpoints like https://[fd00::2]:6443",
                    ));
                }
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let Some(port) = port.filter(|p| !p.is_empty()) else {
            return Err(ValueError::new(
                format!("{} has no port", quote(s)),
                format!("add the API server port, {EXAMPLE}"),
            ));
        };
        let port = match port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(ValueError::new(
                    format!("{} has an invalid port {}", quote(s), quote(port)),
                    format!("use a port from 1 to 65535, {EXAMPLE}"),
                ));
            }
        };
        if host.contains('@') {
            return Err(ValueError::new(
                format!("{} carries user information", quote(s)),
                format!("remove the user part, {EXAMPLE}"),
            ));
        }
        let rules = NameRules {
            what: "",
            max_len: 253,
            single_label: false,
            lowercase: false,
            wildcard: false,
        };
        if host.parse::<IpAddr>().is_err() && name_problem(host, rules).is_some() {
            return Err(bad_host());
        }
        Ok(Endpoint {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "https://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "https://{}:{}", self.host, self.port)
        }
    }
}

string_serde!(Endpoint);

/// A Kubernetes release, `MAJOR.MINOR.PATCH` (a leading `v` is accepted), within
/// [`SUPPORTED_KUBERNETES_MINORS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KubernetesVersion {
    /// Major version (1).
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch version.
    pub patch: u32,
}

impl KubernetesVersion {
    /// The release tag, like `v1.33.4`, as download URLs spell it.
    pub fn tag(&self) -> String {
        format!("v{self}")
    }
}

impl FromStr for KubernetesVersion {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<KubernetesVersion, ValueError> {
        let bare = s.strip_prefix('v').unwrap_or(s);
        let parts: Vec<&str> = bare.split('.').collect();
        let numbers: Option<Vec<u32>> = parts
            .iter()
            .map(|p| {
                if !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) {
                    p.parse().ok()
                } else {
                    None
                }
            })
            .collect();
        let (min, max) = (
            SUPPORTED_KUBERNETES_MINORS.start(),
            SUPPORTED_KUBERNETES_MINORS.end(),
        );
        let Some(&[major, minor, patch]) = numbers.as_deref() else {
            return Err(ValueError::new(
                format!("{} is not a Kubernetes version", quote(s)),
                format!("expected MAJOR.MINOR.PATCH like 1.{max}.1"),
            ));
        };
        if major != 1 || !SUPPORTED_KUBERNETES_MINORS.contains(&minor) {
            return Err(ValueError::new(
                format!("Kubernetes {major}.{minor}.{patch} is not supported"),
                format!("supported versions are 1.{min}.x to 1.{max}.x"),
            ));
        }
        Ok(KubernetesVersion {
            major,
            minor,
            patch,
        })
    }
}

impl fmt::Display for KubernetesVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

string_serde!(KubernetesVersion);

/// A sha256 sum: 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sha256Sum(pub [u8; 32]);

impl FromStr for Sha256Sum {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Sha256Sum, ValueError> {
        let err = || {
            ValueError::new(
                format!("{} is not a sha256 sum", quote(s)),
                "expected 64 hex digits, as `sha256sum` prints them",
            )
        };
        if s.len() != 64 || !s.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(err());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            let pair = s.get(2 * i..2 * i + 2).ok_or_else(err)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| err())?;
        }
        Ok(Sha256Sum(out))
    }
}

impl fmt::Display for Sha256Sum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Sha256Sum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Sum({self})")
    }
}

string_serde!(Sha256Sum);

// ---------------------------------------------------------------------------------------
// Secrets

/// The label and base64 body of the single PEM block in `s`, or why there is none.
fn pem_block(s: &str) -> Result<&str, String> {
    let text = s.trim();
    let Some(rest) = text.strip_prefix("-----BEGIN ") else {
        return Err("it does not start with a -----BEGIN line".into());
    };
    let Some((label, rest)) = rest.split_once("-----") else {
        return Err("its -----BEGIN line is not closed".into());
    };
    let end = format!("-----END {label}-----");
    let Some(body) = rest.strip_suffix(end.as_str()) else {
        return Err(format!(
            "it does not end with {end:?} (more than one block, or truncated)"
        ));
    };
    let b64: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    if b64.is_empty() || BASE64.decode(b64.as_bytes()).is_err() {
        return Err("its body is not base64".into());
    }
    Ok(label)
}

/// One certificate in PEM form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertificatePem(String);

impl CertificatePem {
    /// The PEM text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CertificatePem {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<CertificatePem, ValueError> {
        let hint =
            "paste one PEM block from -----BEGIN CERTIFICATE----- to -----END CERTIFICATE-----";
        match pem_block(s) {
            Ok("CERTIFICATE") => Ok(CertificatePem(s.to_string())),
            Ok(label) => Err(ValueError::new(
                format!("not a PEM certificate: found a {label:?} block"),
                hint,
            )),
            Err(why) => Err(ValueError::new(
                format!("not a PEM certificate: {why}"),
                hint,
            )),
        }
    }
}

impl fmt::Display for CertificatePem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_serde!(CertificatePem);

/// One private key in PEM form (PKCS#8, SEC1 or PKCS#1). `Debug` does not show it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PrivateKeyPem(String);

impl PrivateKeyPem {
    /// The PEM text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PrivateKeyPem {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<PrivateKeyPem, ValueError> {
        let hint =
            "paste one PEM block from -----BEGIN PRIVATE KEY----- to -----END PRIVATE KEY-----";
        match pem_block(s) {
            Ok("PRIVATE KEY" | "EC PRIVATE KEY" | "RSA PRIVATE KEY") => {
                Ok(PrivateKeyPem(s.to_string()))
            }
            Ok(label) => Err(ValueError::new(
                format!("not a PEM private key: found a {label:?} block"),
                hint,
            )),
            Err(why) => Err(ValueError::new(
                format!("not a PEM private key: {why}"),
                hint,
            )),
        }
    }
}

impl fmt::Display for PrivateKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PrivateKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKeyPem(<redacted>)")
    }
}

string_serde!(PrivateKeyPem);

/// A token in kubeadm's bootstrap-token format, `[a-z0-9]{6}.[a-z0-9]{16}`.
/// `Debug` shows only the public id.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Token(String);

impl Token {
    /// The public part before the dot.
    pub fn id(&self) -> &str {
        self.0.split('.').next().unwrap_or_default()
    }

    /// The whole token.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Token {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Token, ValueError> {
        let part = |p: &str, n: usize| {
            p.len() == n
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        };
        match s.split_once('.') {
            Some((id, secret)) if part(id, 6) && part(secret, 16) => Ok(Token(s.to_string())),
            _ => Err(ValueError::new(
                "not a token in the form [a-z0-9]{6}.[a-z0-9]{16}",
                "expected 6 and 16 lower-case letters or digits joined by '.', like abcdef.0123456789abcdef",
            )),
        }
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}.<redacted>)", self.id())
    }
}

string_serde!(Token);

/// 32 random bytes in standard base64 (the encryption-at-rest key). `Debug` does not show it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Base64Key(pub [u8; 32]);

impl FromStr for Base64Key {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Base64Key, ValueError> {
        let err = || {
            ValueError::new(
                "not a base64-encoded 32-byte key",
                "generate one with `head -c 32 /dev/urandom | base64`",
            )
        };
        let bytes = BASE64.decode(s.as_bytes()).map_err(|_| err())?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| err())?;
        Ok(Base64Key(key))
    }
}

impl fmt::Display for Base64Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE64.encode(self.0))
    }
}

impl fmt::Debug for Base64Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Base64Key(<redacted>)")
    }
}

string_serde!(Base64Key);

// ---------------------------------------------------------------------------------------
// Files

/// Permission bits of a file, written as an octal string like `"0644"`. Set-user-ID,
/// set-group-ID and sticky bits are refused: no Keelson image carries a setuid file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileMode(pub u32);

impl FromStr for FileMode {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<FileMode, ValueError> {
        let digits = s.strip_prefix("0o").unwrap_or(s);
        let ok =
            (3..=4).contains(&digits.len()) && digits.chars().all(|c| ('0'..='7').contains(&c));
        let mode = match u32::from_str_radix(digits, 8) {
            Ok(mode) if ok => mode,
            _ => {
                return Err(ValueError::new(
                    format!("{} is not an octal file mode", quote(s)),
                    "write the permission bits in octal, like \"0644\"",
                ));
            }
        };
        if mode > 0o777 {
            return Err(ValueError::new(
                format!("{} sets the setuid, setgid or sticky bit", quote(s)),
                "Keelson never writes such files; use permission bits up to \"0777\"",
            ));
        }
        Ok(FileMode(mode))
    }
}

impl fmt::Display for FileMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

string_serde!(FileMode);

/// Kernel filesystems no config may write into.
const KERNEL_FS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// An absolute, normalized path of a file to write.
pub fn check_file_path(s: &str) -> Result<(), ValueError> {
    if !s.starts_with('/') {
        return Err(ValueError::new(
            format!("{} is not an absolute path", quote(s)),
            format!("start it with '/', like /{}", s.trim_start_matches("./")),
        ));
    }
    let normal = s.len() > 1
        && !s.contains('\0')
        && s[1..]
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if !normal {
        return Err(ValueError::new(
            format!("{} is not a normalized file path", quote(s)),
            "remove empty, '.' and '..' components and any trailing '/'",
        ));
    }
    if let Some(fs) = KERNEL_FS
        .iter()
        .find(|fs| s.strip_prefix(**fs).is_some_and(|r| r.starts_with('/')))
    {
        return Err(ValueError::new(
            format!("{} is under {fs}, a kernel filesystem", quote(s)),
            "use machine.sysctls or machine.kernel_modules for kernel settings; files go under /var or /etc",
        ));
    }
    Ok(())
}

/// A block device path, like `/dev/vda` or `/dev/disk/by-id/...`.
pub fn check_device_path(s: &str) -> Result<(), ValueError> {
    let ok = s.strip_prefix("/dev/").is_some_and(|rest| {
        !rest.is_empty() && rest.split('/').all(|c| !c.is_empty() && c != "..")
    }) && !s.chars().any(|c| c.is_whitespace() || c.is_control());
    if !ok {
        return Err(ValueError::new(
            format!("{} is not a device path", quote(s)),
            "expected a path under /dev, like /dev/vda or /dev/disk/by-id/...",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_display() {
        for s in [
            "52:54:00:12:34:56",
            "https://10.5.0.2:6443",
            "https://[fd00::2]:6443",
        ] {
            let shown = match s.parse::<MacAddr>() {
                Ok(mac) => mac.to_string(),
                Err(_) => s
                    .parse::<Endpoint>()
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
            };
            assert_eq!(shown, s);
        }
        assert_eq!(
            "v1.33.4".parse::<KubernetesVersion>().map(|v| v.tag()),
            Ok("v1.33.4".into())
        );
        assert_eq!(
            "644".parse::<FileMode>().map(|m| m.to_string()),
            Ok("0644".into())
        );
    }

    #[test]
    fn secrets_are_not_shown_by_debug() {
        let token: Token = "abcdef.0123456789abcdef".parse().unwrap();
        assert_eq!(format!("{token:?}"), "Token(abcdef.<redacted>)");
    }

    #[test]
    fn endpoints_need_https_and_a_port() {
        for bad in [
            "http://a:1",
            "https://a",
            "https://a:",
            "https://a:0",
            "https://a:70000",
            "https://fd00::1:6443",
            "https://a:6443/x",
            "https://u@a:1",
            "https://[zz]:1",
            "https://-a-:1",
            "https://",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }
}
