//! The key tree of the machine config, and the walk that checks a parsed document against it.
//!
//! serde stops at the first problem; operators want every problem of a file at once. So the
//! validator first walks the spanned document ([`toml::de::DeTable`]) along [`ROOT`], a
//! static description of every table, key and value rule that mirrors the types in
//! [`crate::schema`] (a test keeps the two in step). The walk reports unknown keys (with a
//! "did you mean" suggestion), wrong types, missing keys and values that break their rule,
//! each at its own line and column, and records where every key path sits in the file.
//!
//! It also produces a cleaned copy of the document that serde can always deserialize:
//! unknown keys are dropped and bad or missing values are replaced with placeholders. Those
//! paths are "poisoned": the semantic checks that follow still run on the whole config, but
//! anything they would say about a poisoned value is suppressed, since it is already reported.

use std::collections::HashMap;
use std::fmt::Write as _;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::diagnostics::{Diagnostic, Location, Severity};
use crate::values::{self, ValueError, quote};

/// The rule a string value follows.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Leaf {
    /// Any string.
    Any,
    /// One of a fixed set of words.
    OneOf(&'static [&'static str]),
    Hostname,
    DnsLabel,
    DnsDomain,
    Host,
    San,
    Cidr,
    Subnet,
    Ip,
    Mac,
    InterfaceName,
    Endpoint,
    KubernetesVersion,
    Sha256,
    CertificatePem,
    PrivateKeyPem,
    Token,
    Base64Key,
    FileMode,
    FilePath,
    DevicePath,
    ModuleName,
    SysctlName,
    FlagName,
    BaseUrl,
    ImageRepository,
    RegistryHost,
}

const PLACEHOLDER_PEM_CERT: &str = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";
const PLACEHOLDER_PEM_KEY: &str = "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n";

impl Leaf {
    fn check(self, s: &str) -> Result<(), ValueError> {
        use std::str::FromStr;
        fn parses<T: FromStr<Err = ValueError>>(s: &str) -> Result<(), ValueError> {
            T::from_str(s).map(|_| ())
        }
        match self {
            Leaf::Any => Ok(()),
            Leaf::OneOf(words) => check_one_of(s, words),
            Leaf::Hostname => values::check_hostname(s),
            Leaf::DnsLabel => values::check_dns_label(s),
            Leaf::DnsDomain => values::check_dns_domain(s),
            Leaf::Host => values::check_host(s),
            Leaf::San => values::check_san(s),
            Leaf::Cidr => values::check_cidr(s),
            Leaf::Subnet => values::check_subnet(s),
            Leaf::Ip => values::check_ip(s),
            Leaf::Mac => parses::<values::MacAddr>(s),
            Leaf::InterfaceName => values::check_interface_name(s),
            Leaf::Endpoint => parses::<values::Endpoint>(s),
            Leaf::KubernetesVersion => parses::<values::KubernetesVersion>(s),
            Leaf::Sha256 => parses::<values::Sha256Sum>(s),
            Leaf::CertificatePem => parses::<values::CertificatePem>(s),
            Leaf::PrivateKeyPem => parses::<values::PrivateKeyPem>(s),
            Leaf::Token => parses::<values::Token>(s),
            Leaf::Base64Key => parses::<values::Base64Key>(s),
            Leaf::FileMode => parses::<values::FileMode>(s),
            Leaf::FilePath => values::check_file_path(s),
            Leaf::DevicePath => values::check_device_path(s),
            Leaf::ModuleName => values::check_module_name(s),
            Leaf::SysctlName => values::check_sysctl_name(s),
            Leaf::FlagName => values::check_flag_name(s),
            Leaf::BaseUrl => values::check_base_url(s),
            Leaf::ImageRepository => values::check_image_repository(s),
            Leaf::RegistryHost => values::check_registry_host(s),
        }
    }

    /// A value that passes [`Leaf::check`], put in place of a bad one.
    fn placeholder(self) -> String {
        let s = match self {
            Leaf::OneOf(words) => words.first().copied().unwrap_or_default(),
            Leaf::Any | Leaf::Hostname | Leaf::DnsLabel | Leaf::DnsDomain => "placeholder",
            Leaf::Host | Leaf::San | Leaf::Ip => "192.0.2.1",
            Leaf::Cidr | Leaf::Subnet => "192.0.2.0/24",
            Leaf::Mac => "02:00:00:00:00:00",
            Leaf::InterfaceName => "placeholder0",
            Leaf::Endpoint => "https://192.0.2.1:6443",
            Leaf::KubernetesVersion => {
                return format!("1.{}.0", values::SUPPORTED_KUBERNETES_MINORS.end());
            }
            Leaf::Sha256 => "0000000000000000000000000000000000000000000000000000000000000000",
            Leaf::CertificatePem => PLACEHOLDER_PEM_CERT,
            Leaf::PrivateKeyPem => PLACEHOLDER_PEM_KEY,
            Leaf::Token => "aaaaaa.aaaaaaaaaaaaaaaa",
            Leaf::Base64Key => "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            Leaf::FileMode => "0644",
            Leaf::FilePath => "/var/placeholder",
            Leaf::DevicePath => "/dev/placeholder",
            Leaf::ModuleName => "placeholder",
            Leaf::SysctlName => "net.placeholder",
            Leaf::FlagName => "placeholder",
            Leaf::BaseUrl => "https://192.0.2.1/",
            Leaf::ImageRepository => "192.0.2.1:5000/placeholder",
            Leaf::RegistryHost => "192.0.2.1:5000",
        };
        s.to_string()
    }
}

fn check_one_of(s: &str, words: &[&str]) -> Result<(), ValueError> {
    if words.contains(&s) {
        return Ok(());
    }
    let listed: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
    Err(ValueError {
        message: format!("{} is not one of {}", quote(s), listed.join(", ")),
        hint: Some(match suggest(s, words.iter().copied()) {
            Some(best) => format!("did you mean {best:?}?"),
            None => "use one of the listed values".into(),
        }),
    })
}

/// The closest of `candidates` to a misspelt `word`, if one is close enough.
pub(crate) fn suggest<'a>(
    word: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let norm = |s: &str| s.to_lowercase().replace('-', "_");
    let word_n = norm(word);
    let limit = (word.chars().count() / 3).max(1);
    let mut best: Option<(usize, &str)> = None;
    for candidate in candidates {
        let cand_n = norm(candidate);
        let distance = if cand_n == word_n || cand_n.replace('_', "") == word_n.replace('_', "") {
            0
        } else if word_n.len() >= 3 && cand_n.starts_with(&word_n) {
            1
        } else {
            strsim::damerau_levenshtein(&word_n, &cand_n)
        };
        if distance <= limit && best.is_none_or(|(d, _)| distance < d) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, c)| c)
}

/// What a value must look like.
#[derive(Debug)]
pub(crate) enum Shape {
    /// A string following a rule.
    Str(Leaf),
    /// A boolean.
    Bool,
    /// An integer in a range.
    Int(i64, i64),
    /// A string or an integer (sysctl values).
    Scalar,
    /// An array of values of one shape.
    Array(&'static Shape),
    /// A table with a fixed set of keys.
    Table(&'static [Field]),
    /// A table with free keys following a rule and values of one shape.
    Map(Leaf, &'static Shape),
    /// Any table (passed through, like the kubelet's extra config).
    AnyTable,
}

impl Shape {
    fn expected(&self) -> &'static str {
        match self {
            Shape::Str(_) => "a string",
            Shape::Bool => "a boolean",
            Shape::Int(..) => "an integer",
            Shape::Scalar => "a string or an integer",
            Shape::Array(_) => "an array",
            Shape::Table(_) | Shape::Map(..) | Shape::AnyTable => "a table",
        }
    }

    /// A value of this shape that deserializes; required keys of tables are filled in.
    fn placeholder(&self) -> toml::Value {
        match self {
            Shape::Str(leaf) => toml::Value::String(leaf.placeholder()),
            Shape::Bool => toml::Value::Boolean(false),
            Shape::Int(min, _) => toml::Value::Integer(*min),
            Shape::Scalar => toml::Value::String("0".into()),
            Shape::Array(_) => toml::Value::Array(Vec::new()),
            Shape::Map(..) | Shape::AnyTable => toml::Value::Table(toml::Table::new()),
            Shape::Table(fields) => toml::Value::Table(
                fields
                    .iter()
                    .filter(|f| f.required.is_some())
                    .map(|f| (f.name.to_string(), f.shape.placeholder()))
                    .collect(),
            ),
        }
    }
}

/// One key of a table.
#[derive(Debug)]
pub(crate) struct Field {
    pub(crate) name: &'static str,
    pub(crate) shape: Shape,
    /// For a required key, an example of it for the "missing key" hint.
    pub(crate) required: Option<&'static str>,
}

const fn req(name: &'static str, example: &'static str, shape: Shape) -> Field {
    Field {
        name,
        shape,
        required: Some(example),
    }
}

const fn opt(name: &'static str, shape: Shape) -> Field {
    Field {
        name,
        shape,
        required: None,
    }
}

const STR: Shape = Shape::Str(Leaf::Any);
const SUBNETS: Shape = Shape::Array(&Shape::Str(Leaf::Subnet));
const FLAGS: Shape = Shape::Map(Leaf::FlagName, &STR);

/// The whole document.
pub(crate) const ROOT: &[Field] = &[
    req(
        "version",
        "version = \"v1\"",
        Shape::Str(Leaf::OneOf(&["v1"])),
    ),
    req("machine", "[machine]", Shape::Table(MACHINE)),
    req("cluster", "[cluster]", Shape::Table(CLUSTER)),
];

const MACHINE: &[Field] = &[
    req(
        "type",
        "type = \"worker\"",
        Shape::Str(Leaf::OneOf(&["controlplane", "worker"])),
    ),
    opt("hostname", Shape::Str(Leaf::Hostname)),
    opt("install_disk", Shape::Str(Leaf::DevicePath)),
    opt("swap", Shape::Str(Leaf::OneOf(&["off", "on"]))),
    opt(
        "kernel_modules",
        Shape::Array(&Shape::Str(Leaf::ModuleName)),
    ),
    opt(
        "disabled_kernel_modules",
        Shape::Array(&Shape::Str(Leaf::ModuleName)),
    ),
    opt("sysctls", Shape::Map(Leaf::SysctlName, &Shape::Scalar)),
    opt("time_servers", Shape::Array(&Shape::Str(Leaf::Host))),
    opt("network", Shape::Table(NETWORK)),
    opt("kubelet", Shape::Table(KUBELET)),
    opt("api", Shape::Table(API)),
    opt("registries", Shape::Table(REGISTRIES)),
    opt("files", Shape::Array(&Shape::Table(FILE))),
    opt("services", Shape::Array(&Shape::Table(SERVICE))),
];

const NETWORK: &[Field] = &[
    opt("nameservers", Shape::Array(&Shape::Str(Leaf::Ip))),
    opt("interfaces", Shape::Array(&Shape::Table(INTERFACE))),
];

const INTERFACE: &[Field] = &[
    opt("name", Shape::Str(Leaf::InterfaceName)),
    opt("mac", Shape::Str(Leaf::Mac)),
    opt("dhcp", Shape::Bool),
    opt("addresses", Shape::Array(&Shape::Str(Leaf::Cidr))),
    opt("routes", Shape::Array(&Shape::Table(ROUTE))),
    opt(
        "mtu",
        Shape::Int(*values::MTU_RANGE.start(), *values::MTU_RANGE.end()),
    ),
];

const ROUTE: &[Field] = &[
    req("to", "to = \"0.0.0.0/0\"", Shape::Str(Leaf::Subnet)),
    opt("via", Shape::Str(Leaf::Ip)),
    opt("metric", Shape::Int(0, u32::MAX as i64)),
];

const KUBELET: &[Field] = &[
    opt("extra_args", FLAGS),
    opt("node_ip_subnets", SUBNETS),
    opt("extra_config", Shape::AnyTable),
];

const REGISTRIES: &[Field] = &[opt(
    "mirrors",
    Shape::Map(Leaf::RegistryHost, &Shape::Table(MIRROR)),
)];

const MIRROR: &[Field] = &[req(
    "endpoints",
    "endpoints = [\"http://10.5.0.1:5000\"]",
    Shape::Array(&Shape::Str(Leaf::BaseUrl)),
)];

const API: &[Field] = &[opt("cert_sans", Shape::Array(&Shape::Str(Leaf::San)))];

const FILE: &[Field] = &[
    req(
        "path",
        "path = \"/var/etc/example.conf\"",
        Shape::Str(Leaf::FilePath),
    ),
    req("content", "content = \"...\"", STR),
    opt("mode", Shape::Str(Leaf::FileMode)),
];

/// Names, paths and variables of extension services are checked in `validate`, which
/// relates them to each other and to the built-in services.
const SERVICE: &[Field] = &[
    req("name", "name = \"node-agent\"", STR),
    req(
        "command",
        "command = [\"/usr/bin/agent\", \"--flag\"]",
        Shape::Array(&STR),
    ),
    opt("depends_on", Shape::Array(&STR)),
    opt("environment", Shape::Map(Leaf::Any, &STR)),
];

const CLUSTER: &[Field] = &[
    req("name", "name = \"demo\"", Shape::Str(Leaf::DnsLabel)),
    req(
        "endpoint",
        "endpoint = \"https://10.5.0.2:6443\"",
        Shape::Str(Leaf::Endpoint),
    ),
    req(
        "kubernetes_version",
        "kubernetes_version = \"1.34.1\"",
        Shape::Str(Leaf::KubernetesVersion),
    ),
    opt("pod_subnets", SUBNETS),
    opt("service_subnets", SUBNETS),
    opt("dns_domain", Shape::Str(Leaf::DnsDomain)),
    opt("image_repository", Shape::Str(Leaf::ImageRepository)),
    opt("kubelet", Shape::Table(KUBELET_ARTIFACTS)),
    opt("etcd", Shape::Table(ETCD)),
    req("secrets", "[cluster.secrets]", Shape::Table(SECRETS)),
];

const KUBELET_ARTIFACTS: &[Field] = &[
    opt("base_url", Shape::Str(Leaf::BaseUrl)),
    opt(
        "sha256",
        Shape::Map(Leaf::OneOf(&["amd64", "arm64"]), &Shape::Str(Leaf::Sha256)),
    ),
];

/// Each of `endpoints` is parsed in `validate`, which also finds duplicates.
const ETCD: &[Field] = &[
    opt("advertised_subnets", SUBNETS),
    opt("extra_args", FLAGS),
    opt("endpoints", Shape::Array(&STR)),
];

const SECRETS: &[Field] = &[
    req(
        "bootstrap_token",
        "bootstrap_token = \"abcdef.0123456789abcdef\"",
        Shape::Str(Leaf::Token),
    ),
    req(
        "api_join_token",
        "api_join_token = \"abcdef.0123456789abcdef\"",
        Shape::Str(Leaf::Token),
    ),
    opt("encryption_key", Shape::Str(Leaf::Base64Key)),
    opt("service_account_key", Shape::Str(Leaf::PrivateKeyPem)),
    req(
        "kubernetes_ca",
        "[cluster.secrets.kubernetes_ca]",
        Shape::Table(CA),
    ),
    req(
        "node_api_ca",
        "[cluster.secrets.node_api_ca]",
        Shape::Table(CA),
    ),
    opt("etcd_ca", Shape::Table(CA)),
    opt("front_proxy_ca", Shape::Table(CA)),
];

const CA: &[Field] = &[
    req(
        "cert",
        "cert = \"-----BEGIN CERTIFICATE-----...\"",
        Shape::Str(Leaf::CertificatePem),
    ),
    opt("key", Shape::Str(Leaf::PrivateKeyPem)),
];

/// `parent.key`, with the key quoted when it is not a bare TOML key.
pub(crate) fn key_path(parent: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let mut out = String::from(parent);
    if !out.is_empty() {
        out.push('.');
    }
    if bare {
        out.push_str(key);
    } else {
        let _ = write!(out, "{key:?}");
    }
    out
}

/// The path one level up (`a.b[2]` -> `a.b`, `a."x.y"` -> `a`, `a` -> ``).
pub(crate) fn parent_path(path: &str) -> &str {
    // Find where the last segment starts, honouring quoted keys.
    let mut last = 0;
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in path.char_indices() {
        if in_quotes {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_quotes = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_quotes = true,
            '.' | '[' => last = i,
            _ => {}
        }
    }
    &path[..last]
}

/// Collects diagnostics for one file, knows where each key path sits, and which paths are
/// poisoned (already reported; see the module documentation).
#[derive(Debug)]
pub(crate) struct Sink<'s> {
    src: &'s str,
    file: &'s str,
    diagnostics: Vec<Diagnostic>,
    offsets: HashMap<String, usize>,
    poisoned: Vec<String>,
}

/// Whether `path` is `ancestor` or lies inside it.
fn is_within(path: &str, ancestor: &str) -> bool {
    path.strip_prefix(ancestor)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

impl<'s> Sink<'s> {
    pub(crate) fn new(src: &'s str, file: &'s str) -> Sink<'s> {
        Sink {
            src,
            file,
            diagnostics: Vec::new(),
            offsets: HashMap::new(),
            poisoned: Vec::new(),
        }
    }

    pub(crate) fn into_diagnostics(self) -> Vec<Diagnostic> {
        self.diagnostics
    }

    /// Reports a problem at a byte offset.
    pub(crate) fn at(
        &mut self,
        severity: Severity,
        offset: usize,
        path: &str,
        message: String,
        hint: Option<String>,
    ) {
        self.diagnostics.push(Diagnostic {
            severity,
            file: self.file.to_string(),
            location: Some(Location::of_offset(self.src, offset)),
            path: path.to_string(),
            message,
            hint,
        });
    }

    /// Reports a problem about `path` (found where the path, or its nearest ancestor,
    /// sits in the file), unless `path` or one of `related` lies in a poisoned path.
    pub(crate) fn report(
        &mut self,
        severity: Severity,
        path: &str,
        related: &[&str],
        message: String,
        hint: impl Into<Option<String>>,
    ) {
        let poisoned = std::iter::once(path)
            .chain(related.iter().copied())
            .any(|p| self.poisoned.iter().any(|bad| is_within(p, bad)));
        if poisoned {
            return;
        }
        let mut at = path;
        let offset = loop {
            if let Some(offset) = self.offsets.get(at) {
                break *offset;
            }
            if at.is_empty() {
                break 0;
            }
            at = parent_path(at);
        };
        self.at(severity, offset, path, message, hint.into());
    }

    fn value_error(&mut self, offset: usize, path: &str, err: ValueError) {
        self.poisoned.push(path.to_string());
        self.at(Severity::Error, offset, path, err.message, err.hint);
    }

    fn type_error(&mut self, value: &Spanned<DeValue<'_>>, shape: &Shape, path: &str) {
        let found = value.get_ref().type_str();
        let article = if found.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        let hint = match (shape, value.get_ref()) {
            (Shape::Str(_), DeValue::Integer(_) | DeValue::Float(_) | DeValue::Boolean(_)) => {
                Some("put the value in quotes".to_string())
            }
            (Shape::Int(..) | Shape::Scalar, DeValue::String(s)) if s.parse::<i64>().is_ok() => {
                Some("remove the quotes".to_string())
            }
            (Shape::Bool, DeValue::String(s)) if s == "true" || s == "false" => {
                Some("remove the quotes".to_string())
            }
            (Shape::Table(_) | Shape::Map(..) | Shape::AnyTable, _) => Some(
                "write it as a [section] or an inline table like { key = \"value\" }".to_string(),
            ),
            (Shape::Array(_), _) => {
                Some("write a list in brackets, like [\"a\", \"b\"]".to_string())
            }
            _ => None,
        };
        let err = ValueError {
            message: format!("expected {}, found {article} {found}", shape.expected()),
            hint,
        };
        self.value_error(value.span().start, path, err);
    }

    /// Checks the whole document; returns the cleaned copy for serde.
    pub(crate) fn walk_document(&mut self, root: &Spanned<DeTable<'_>>) -> toml::Value {
        self.walk_table(root.get_ref(), 0, ROOT, "")
    }

    fn walk(&mut self, value: &Spanned<DeValue<'_>>, shape: &Shape, path: &str) -> toml::Value {
        let offset = value.span().start;
        self.offsets.insert(path.to_string(), offset);
        match (shape, value.get_ref()) {
            (Shape::Str(leaf), DeValue::String(s)) => match leaf.check(s) {
                Ok(()) => toml::Value::String(s.to_string()),
                Err(err) => {
                    self.value_error(offset, path, err);
                    shape.placeholder()
                }
            },
            (Shape::Bool, DeValue::Boolean(b)) => toml::Value::Boolean(*b),
            (Shape::Int(min, max), DeValue::Integer(i)) => {
                let n = i128::from_str_radix(&i.as_str().replace('_', ""), i.radix()).ok();
                match n.and_then(|n| i64::try_from(n).ok()) {
                    Some(n) if (*min..=*max).contains(&n) => toml::Value::Integer(n),
                    _ => {
                        let err = ValueError {
                            message: format!("{i} is out of range"),
                            hint: Some(format!("expected {min} to {max}")),
                        };
                        self.value_error(offset, path, err);
                        shape.placeholder()
                    }
                }
            }
            (Shape::Scalar, DeValue::String(s)) => {
                if s.contains(['\n', '\0']) {
                    let err = ValueError {
                        message: format!("{} spans several lines", quote(s)),
                        hint: Some("write the value on one line".into()),
                    };
                    self.value_error(offset, path, err);
                    return shape.placeholder();
                }
                toml::Value::String(s.to_string())
            }
            (Shape::Scalar, DeValue::Integer(i)) => {
                match i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()) {
                    Ok(n) => toml::Value::Integer(n),
                    Err(_) => {
                        let err = ValueError {
                            message: format!("{i} is out of range"),
                            hint: Some("write large values as strings".into()),
                        };
                        self.value_error(offset, path, err);
                        shape.placeholder()
                    }
                }
            }
            (Shape::Array(item), DeValue::Array(items)) => toml::Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| self.walk(v, item, &format!("{path}[{i}]")))
                    .collect(),
            ),
            (Shape::Table(fields), DeValue::Table(table)) => {
                self.walk_table(table, offset, fields, path)
            }
            (Shape::Map(key_rule, item), DeValue::Table(table)) => {
                let mut out = toml::Table::new();
                for (key, v) in table.iter() {
                    let child = key_path(path, key.get_ref());
                    match key_rule.check(key.get_ref()) {
                        Ok(()) => {
                            let v = self.walk(v, item, &child);
                            out.insert(key.get_ref().to_string(), v);
                        }
                        Err(err) => self.value_error(key.span().start, &child, err),
                    }
                }
                toml::Value::Table(out)
            }
            (Shape::AnyTable, DeValue::Table(_)) => match any_value(value.get_ref(), 0) {
                Ok(v) => v,
                Err(err) => {
                    self.value_error(offset, path, err);
                    shape.placeholder()
                }
            },
            _ => {
                self.type_error(value, shape, path);
                shape.placeholder()
            }
        }
    }

    fn walk_table(
        &mut self,
        table: &DeTable<'_>,
        offset: usize,
        fields: &'static [Field],
        path: &str,
    ) -> toml::Value {
        self.offsets.insert(path.to_string(), offset);
        let mut out = toml::Table::new();
        for (key, value) in table.iter() {
            let name = key.get_ref();
            let child = key_path(path, name);
            match fields.iter().find(|f| f.name == name) {
                Some(field) => {
                    let v = self.walk(value, &field.shape, &child);
                    out.insert(field.name.to_string(), v);
                }
                None => {
                    let hint = match suggest(name, fields.iter().map(|f| f.name)) {
                        Some(best) => format!("did you mean `{best}`?"),
                        None if let Some(home) = find_key(ROOT, name, "") => {
                            format!("`{name}` belongs in `{home}`")
                        }
                        None => {
                            let names: Vec<String> =
                                fields.iter().map(|f| format!("`{}`", f.name)).collect();
                            format!("expected one of {}", names.join(", "))
                        }
                    };
                    let message = format!("unknown key `{}`", name.escape_debug());
                    self.at(
                        Severity::Error,
                        key.span().start,
                        &child,
                        message,
                        Some(hint),
                    );
                }
            }
        }
        for field in fields {
            if let Some(example) = field.required
                && !out.contains_key(field.name)
            {
                let child = key_path(path, field.name);
                let message = format!("missing required key `{}`", field.name);
                self.at(
                    Severity::Error,
                    offset,
                    &child,
                    message,
                    Some(format!("add it, like {example}")),
                );
                self.poisoned.push(child);
                out.insert(field.name.to_string(), field.shape.placeholder());
            }
        }
        toml::Value::Table(out)
    }
}

/// The path of the table that has a key called `name`, searching the whole key tree.
fn find_key(fields: &[Field], name: &str, path: &str) -> Option<String> {
    for field in fields {
        if field.name == name {
            return Some(if path.is_empty() {
                "the top level".to_string()
            } else {
                path.to_string()
            });
        }
    }
    fields.iter().find_map(|field| {
        let child = key_path(path, field.name);
        match &field.shape {
            Shape::Table(inner) => find_key(inner, name, &child),
            Shape::Array(Shape::Table(inner)) => find_key(inner, name, &format!("{child}[]")),
            _ => None,
        }
    })
}

/// How deeply a pass-through table may nest.
const MAX_DEPTH: usize = 32;

/// Converts a pass-through value (the kubelet's extra config) as it is.
fn any_value(value: &DeValue<'_>, depth: usize) -> Result<toml::Value, ValueError> {
    if depth > MAX_DEPTH {
        return Err(ValueError {
            message: format!("nested more than {MAX_DEPTH} levels deep"),
            hint: Some("flatten the value".into()),
        });
    }
    let number_error = |what: &str| ValueError {
        message: format!("{what} is not a number this config can hold"),
        hint: Some("write it as a string".into()),
    };
    Ok(match value {
        DeValue::String(s) => toml::Value::String(s.to_string()),
        DeValue::Integer(i) => toml::Value::Integer(
            i64::from_str_radix(&i.as_str().replace('_', ""), i.radix())
                .map_err(|_| number_error(i.as_str()))?,
        ),
        DeValue::Float(f) => toml::Value::Float(
            f.as_str()
                .replace('_', "")
                .parse()
                .map_err(|_| number_error(f.as_str()))?,
        ),
        DeValue::Boolean(b) => toml::Value::Boolean(*b),
        DeValue::Datetime(d) => toml::Value::Datetime(*d),
        DeValue::Array(items) => toml::Value::Array(
            items
                .iter()
                .map(|v| any_value(v.get_ref(), depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        DeValue::Table(table) => toml::Value::Table(
            table
                .iter()
                .map(|(k, v)| Ok((k.get_ref().to_string(), any_value(v.get_ref(), depth + 1)?)))
                .collect::<Result<_, ValueError>>()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_quote_keys_and_find_their_parents() {
        let p = key_path("machine.sysctls", "net.ipv4.ip_forward");
        assert_eq!(p, "machine.sysctls.\"net.ipv4.ip_forward\"");
        assert_eq!(parent_path(&p), "machine.sysctls");
        assert_eq!(parent_path("a.b[2]"), "a.b");
        assert_eq!(parent_path("a"), "");
        assert!(is_within("a.b[1].c", "a.b[1]"));
        assert!(!is_within("a.bc", "a.b"));
    }

    #[test]
    fn suggestions_pick_the_closest_key() {
        let keys = ["hostname", "install_disk", "interfaces"];
        assert_eq!(suggest("hostnme", keys.into_iter()), Some("hostname"));
        assert_eq!(
            suggest("install-disk", keys.into_iter()),
            Some("install_disk")
        );
        assert_eq!(suggest("interface", keys.into_iter()), Some("interfaces"));
        assert_eq!(suggest("zzz", keys.into_iter()), None);
    }

    /// A value of `shape` that sets every optional key too.
    fn full(shape: &Shape) -> toml::Value {
        match shape {
            Shape::Array(item) => toml::Value::Array(vec![full(item)]),
            Shape::Map(key, item) => {
                toml::Value::Table([(key.placeholder(), full(item))].into_iter().collect())
            }
            Shape::AnyTable => toml::Value::Table(
                [("x".to_string(), toml::Value::Integer(1))]
                    .into_iter()
                    .collect(),
            ),
            Shape::Table(fields) => toml::Value::Table(
                fields
                    .iter()
                    .map(|f| (f.name.to_string(), full(&f.shape)))
                    .collect(),
            ),
            other => other.placeholder(),
        }
    }

    /// The key tree and the serde types describe the same document: a document with every
    /// key of the tree deserializes, and serializes back to the same document.
    #[test]
    fn the_key_tree_matches_the_schema() {
        let doc = full(&Shape::Table(ROOT));
        let config: crate::MachineConfig = doc.clone().try_into().unwrap();
        assert_eq!(toml::Value::try_from(&config).unwrap(), doc);
        // And the walk accepts it without a word.
        let text = toml::to_string(&doc).unwrap();
        let checked = crate::check_str(&text, "full.toml", crate::Mode::Cloud);
        let errors: Vec<String> = checked
            .diagnostics
            .iter()
            .filter(|d| d.message.starts_with("unknown key") || d.message.starts_with("expected"))
            .map(|d| d.to_string())
            .collect();
        assert_eq!(errors, Vec::<String>::new());
    }

    #[test]
    fn placeholders_pass_their_own_rules() {
        let leaves = [
            Leaf::Hostname,
            Leaf::DnsLabel,
            Leaf::DnsDomain,
            Leaf::Host,
            Leaf::San,
            Leaf::Cidr,
            Leaf::Subnet,
            Leaf::Ip,
            Leaf::Mac,
            Leaf::InterfaceName,
            Leaf::Endpoint,
            Leaf::KubernetesVersion,
            Leaf::Sha256,
            Leaf::CertificatePem,
            Leaf::PrivateKeyPem,
            Leaf::Token,
            Leaf::Base64Key,
            Leaf::FileMode,
            Leaf::FilePath,
            Leaf::DevicePath,
            Leaf::ModuleName,
            Leaf::SysctlName,
            Leaf::FlagName,
            Leaf::BaseUrl,
            Leaf::ImageRepository,
            Leaf::RegistryHost,
            Leaf::OneOf(&["x"]),
        ];
        for leaf in leaves {
            assert_eq!(leaf.check(&leaf.placeholder()), Ok(()), "{leaf:?}");
        }
    }
}
