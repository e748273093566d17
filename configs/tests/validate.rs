//! Table-driven tests of machine-config validation: every invalid config gets its exact
//! diagnostics (message, line:column, key path, hint), through one `check` helper.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_configs::schema::MachineType;
use keelson_configs::{Mode, Severity, check_bytes, check_str, load};

const CP: &str = include_str!("data/controlplane.toml");
const WORKER: &str = include_str!("data/worker.toml");

/// `base` with each `(from, to)` applied; `from` must occur exactly once.
fn edit(base: &str, edits: &[(&str, &str)]) -> String {
    let mut out = base.to_string();
    for (from, to) in edits {
        assert_eq!(
            out.matches(from).count(),
            1,
            "edit anchor {from:?} must occur once"
        );
        out = out.replacen(from, to, 1);
    }
    out
}

/// `base` without the `key = """..."""` block of the CA table `ca`.
fn without_ca_key(base: &str, ca: &str) -> String {
    let header = format!("[cluster.secrets.{ca}]\n");
    let start = base.find(&header).unwrap();
    let key = start + base[start..].find("key = \"\"\"").unwrap();
    let end = key + base[key + 9..].find("\"\"\"\n").unwrap() + 9 + 4;
    format!("{}{}", &base[..key], &base[end..])
}

/// `base` without the whole CA table `ca`.
fn without_ca(base: &str, ca: &str) -> String {
    let header = format!("[cluster.secrets.{ca}]\n");
    let start = base.find(&header).unwrap();
    let end = base[start + 1..]
        .find("\n[")
        .map_or(base.len(), |i| start + 1 + i + 1);
    format!("{}{}", &base[..start], &base[end..])
}

/// Checks `input` in `mode` and compares every diagnostic, rendered one per line, with
/// `expected`; the config must be valid exactly when no line is an error.
fn check(input: &str, mode: Mode, expected: &str) -> Result<(), String> {
    let checked = check_str(input, "cp.toml", mode);
    let actual: Vec<String> = checked.diagnostics.iter().map(|d| d.to_string()).collect();
    let actual = actual.join("\n");
    if actual != expected.trim() {
        return Err(format!(
            "expected:\n{}\nactual:\n{actual}\n",
            expected.trim()
        ));
    }
    let has_error = checked.diagnostics.iter().any(|d| d.is_error());
    if checked.is_valid() == has_error || checked.is_valid() == expected.contains(": error: ") {
        return Err(format!("validity does not match the diagnostics: {actual}"));
    }
    Ok(())
}

#[test]
fn valid_configs_have_no_diagnostics() {
    check(CP, Mode::Metal, "").unwrap();
    check(WORKER, Mode::Metal, "").unwrap();
}

#[test]
fn invalid_configs() {
    let cases: Vec<(&str, String, Mode, &str)> = vec![
        // name, input, mode, expected diagnostics
        (
            "unknown key with a suggestion",
            edit(CP, &[("hostname = ", "hostnme = ")]),
            Mode::Metal,
            r##"
cp.toml:6:1: error: machine.hostnme: unknown key `hostnme` (did you mean `hostname`?)
"##,
        ),
        (
            "unknown key without a suggestion",
            edit(
                CP,
                &[("swap = \"off\"\n", "swap = \"off\"\ncolour = \"blue\"\n")],
            ),
            Mode::Metal,
            r##"
cp.toml:9:1: error: machine.colour: unknown key `colour` (expected one of `type`, `hostname`, `install_disk`, `swap`, `kernel_modules`, `disabled_kernel_modules`, `sysctls`, `time_servers`, `network`, `kubelet`, `api`, `registries`, `files`, `services`)
"##,
        ),
        (
            "unknown top-level table",
            format!("{CP}\n[extras]\nfoo = 1\n"),
            Mode::Metal,
            r##"
cp.toml:120:2: error: extras: unknown key `extras` (expected one of `version`, `machine`, `cluster`)
"##,
        ),
        (
            "unknown key in an array of tables",
            edit(CP, &[("dhcp = true", "dchp = true")]),
            Mode::Metal,
            r##"
cp.toml:29:1: warning: machine.network.interfaces[1]: the interface has neither dhcp nor static addresses (set dhcp = true or add addresses)
cp.toml:31:1: error: machine.network.interfaces[1].dchp: unknown key `dchp` (did you mean `dhcp`?)
"##,
        ),
        (
            "key in the wrong table",
            edit(
                CP,
                &[(
                    "name = \"demo\"\n",
                    "name = \"demo\"\nhostname = \"cp-1\"\n",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:48:1: error: cluster.hostname: unknown key `hostname` (`hostname` belongs in `machine`)
"##,
        ),
        (
            "unknown key spelt with dashes",
            edit(CP, &[("install_disk =", "install-disk =")]),
            Mode::Cloud,
            r##"
cp.toml:7:1: error: machine.install-disk: unknown key `install-disk` (did you mean `install_disk`?)
"##,
        ),
        (
            "string expected",
            edit(CP, &[("hostname = \"cp-1\"", "hostname = 5")]),
            Mode::Metal,
            r##"
cp.toml:6:12: error: machine.hostname: expected a string, found an integer (put the value in quotes)
"##,
        ),
        (
            "integer expected",
            edit(CP, &[("mtu = 1500", "mtu = \"1500\"")]),
            Mode::Metal,
            r##"
cp.toml:22:7: error: machine.network.interfaces[0].mtu: expected an integer, found a string (remove the quotes)
"##,
        ),
        (
            "array expected",
            edit(
                CP,
                &[(
                    "kernel_modules = [\"ip_vs\", \"nf_conntrack\"]",
                    "kernel_modules = \"ip_vs\"",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:9:18: error: machine.kernel_modules: expected an array, found a string (write a list in brackets, like ["a", "b"])
"##,
        ),
        (
            "boolean expected",
            edit(CP, &[("dhcp = true", "dhcp = \"true\"")]),
            Mode::Metal,
            r##"
cp.toml:31:8: error: machine.network.interfaces[1].dhcp: expected a boolean, found a string (remove the quotes)
"##,
        ),
        (
            "table expected",
            edit(
                CP,
                &[
                    (
                        "[machine.api]\ncert_sans = [\"cp-1.example.com\", \"10.5.0.2\"]\n",
                        "",
                    ),
                    ("swap = \"off\"\n", "swap = \"off\"\napi = true\n"),
                ],
            ),
            Mode::Metal,
            r##"
cp.toml:9:7: error: machine.api: expected a table, found a boolean (write it as a [section] or an inline table like { key = "value" })
"##,
        ),
        (
            "bad CIDR",
            edit(
                CP,
                &[(
                    "\"10.5.0.2/24\", \"fd00::2/64\"",
                    "\"10.5.0.2/24\", \"fd00::2/129\"",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:21:29: error: machine.network.interfaces[0].addresses[1]: "fd00::2/129" is not an address in CIDR form (expected an address and prefix length like 10.5.0.2/24 or fd00::2/64)
"##,
        ),
        (
            "address without prefix length",
            edit(
                CP,
                &[(
                    "\"10.5.0.2/24\", \"fd00::2/64\"",
                    "\"10.5.0.2\", \"fd00::2/64\"",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:21:14: error: machine.network.interfaces[0].addresses[0]: "10.5.0.2" has no prefix length (write it in CIDR form, like 10.5.0.2/24)
"##,
        ),
        (
            "subnet with host bits",
            edit(
                CP,
                &[(
                    "pod_subnets = [\"10.244.0.0/16\"]",
                    "pod_subnets = [\"10.244.0.1/16\"]",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:50:16: error: cluster.pod_subnets[0]: "10.244.0.1/16" has host bits set (did you mean 10.244.0.0/16?)
"##,
        ),
        (
            "bad IP address",
            edit(
                CP,
                &[(
                    "nameservers = [\"10.5.0.1\"",
                    "nameservers = [\"10.5.0.256\"",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:17:16: error: machine.network.nameservers[0]: "10.5.0.256" is not an IP address (expected an address like 10.5.0.1 or fd00::1)
"##,
        ),
        (
            "pod and service subnets overlap",
            edit(
                CP,
                &[(
                    "service_subnets = [\"10.96.0.0/12\"]",
                    "service_subnets = [\"10.240.0.0/12\"]",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:51:20: error: cluster.service_subnets[0]: service subnet 10.240.0.0/12 overlaps pod subnet 10.244.0.0/16 (cluster.pod_subnets[0]) (pod, service and node networks must not overlap)
"##,
        ),
        (
            "node network overlaps the pod subnet",
            edit(
                CP,
                &[(
                    "pod_subnets = [\"10.244.0.0/16\"]",
                    "pod_subnets = [\"10.5.0.0/16\"]",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:21:14: error: machine.network.interfaces[0].addresses[0]: node network 10.5.0.0/24 overlaps pod subnet 10.5.0.0/16 (cluster.pod_subnets[0]) (pod, service and node networks must not overlap)
cp.toml:34:20: error: machine.kubelet.node_ip_subnets[0]: node network 10.5.0.0/24 overlaps pod subnet 10.5.0.0/16 (cluster.pod_subnets[0]) (pod, service and node networks must not overlap)
"##,
        ),
        (
            "service subnet too large",
            edit(
                CP,
                &[(
                    "service_subnets = [\"10.96.0.0/12\"]",
                    "service_subnets = [\"10.96.0.0/11\"]",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:51:20: error: cluster.service_subnets[0]: service subnet 10.96.0.0/11 is larger than Kubernetes allows (use a prefix of /12 or longer)
"##,
        ),
        (
            "pod and service families differ",
            edit(
                CP,
                &[(
                    "pod_subnets = [\"10.244.0.0/16\"]",
                    "pod_subnets = [\"10.244.0.0/16\", \"fd10::/56\"]",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:51:19: error: cluster.service_subnets: pod and service subnets cover different IP families (give both an IPv4 subnet, an IPv6 subnet, or one of each)
"##,
        ),
        (
            "two pod subnets of one family",
            edit(
                CP,
                &[(
                    "pod_subnets = [\"10.244.0.0/16\"]",
                    "pod_subnets = [\"10.244.0.0/16\", \"10.245.0.0/16\"]",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:50:33: error: cluster.pod_subnets[1]: a second IPv4 subnet (cluster.pod_subnets[0] is the first) (give at most one subnet per IP family)
"##,
        ),
        (
            "endpoint not https",
            edit(
                CP,
                &[(
                    "endpoint = \"https://10.5.0.2:6443\"",
                    "endpoint = \"http://10.5.0.2:6443\"",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:48:12: error: cluster.endpoint: "http://10.5.0.2:6443" is not an https URL (its scheme is "http") (the control-plane endpoint must use https, like https://10.5.0.2:6443)
"##,
        ),
        (
            "endpoint without port",
            edit(
                CP,
                &[(
                    "endpoint = \"https://10.5.0.2:6443\"",
                    "endpoint = \"https://10.5.0.2\"",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:48:12: error: cluster.endpoint: "https://10.5.0.2" has no port (add the API server port, like https://10.5.0.2:6443)
"##,
        ),
        (
            "endpoint with a path",
            edit(
                CP,
                &[(
                    "endpoint = \"https://10.5.0.2:6443\"",
                    "endpoint = \"https://10.5.0.2:6443/api\"",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:48:12: error: cluster.endpoint: "https://10.5.0.2:6443/api" has a path (give only the scheme, host and port, like https://10.5.0.2:6443)
"##,
        ),
        (
            "endpoint with bare IPv6",
            edit(
                CP,
                &[(
                    "endpoint = \"https://10.5.0.2:6443\"",
                    "endpoint = \"https://fd00::2:6443\"",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:48:12: error: cluster.endpoint: "https://fd00::2:6443" has an IPv6 address without brackets (write IPv6 endpoints like https://[fd00::2]:6443)
"##,
        ),
        (
            "hostname with underscore",
            edit(CP, &[("hostname = \"cp-1\"", "hostname = \"cp_1\"")]),
            Mode::Metal,
            r##"
cp.toml:6:12: error: machine.hostname: "cp_1" is not an RFC 1123 hostname: '_' is not allowed (use lower-case letters, digits and '-' in dot-separated labels that do not start or end with '-', like cp-1)
"##,
        ),
        (
            "hostname in upper case",
            edit(CP, &[("hostname = \"cp-1\"", "hostname = \"CP-1\"")]),
            Mode::Metal,
            r##"
cp.toml:6:12: error: machine.hostname: "CP-1" is not an RFC 1123 hostname: upper-case letters are not allowed (use lower-case letters, digits and '-' in dot-separated labels that do not start or end with '-', like cp-1)
"##,
        ),
        (
            "hostname starting with a dash",
            edit(CP, &[("hostname = \"cp-1\"", "hostname = \"-cp\"")]),
            Mode::Metal,
            r##"
cp.toml:6:12: error: machine.hostname: "-cp" is not an RFC 1123 hostname: label "-cp" starts or ends with '-' (use lower-case letters, digits and '-' in dot-separated labels that do not start or end with '-', like cp-1)
"##,
        ),
        (
            "cluster name with spaces",
            edit(CP, &[("name = \"demo\"", "name = \"Demo Cluster\"")]),
            Mode::Metal,
            r##"
cp.toml:47:8: error: cluster.name: "Demo Cluster" is not an RFC 1123 label: ' ' is not allowed (use up to 63 lower-case letters, digits and '-', not starting or ending with '-', like demo)
"##,
        ),
        (
            "control plane without a CA key",
            without_ca_key(CP, "kubernetes_ca"),
            Mode::Metal,
            r##"
cp.toml:72:1: error: cluster.secrets.kubernetes_ca.key: a control plane needs the kubernetes_ca private key (add `key` from secrets.toml, or regenerate with `machinectl gen config`)
"##,
        ),
        (
            "control plane without the etcd CA",
            without_ca(CP, "etcd_ca"),
            Mode::Metal,
            r##"
cp.toml:62:1: error: cluster.secrets.etcd_ca: a control plane needs the etcd_ca certificate and key (add them from secrets.toml, or regenerate with `machinectl gen config`)
"##,
        ),
        (
            "control plane without the encryption key",
            edit(
                CP,
                &[(
                    "encryption_key = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"\n",
                    "",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:62:1: error: cluster.secrets.encryption_key: a control plane needs `encryption_key` (add it from secrets.toml, or regenerate with `machinectl gen config`)
"##,
        ),
        (
            "worker carrying CA keys",
            edit(
                CP,
                &[
                    ("type = \"controlplane\"", "type = \"worker\""),
                    (
                        "[cluster.etcd]\nadvertised_subnets = [\"10.5.0.0/24\"]\nextra_args = { \"snapshot-count\" = \"10000\" }\n",
                        "",
                    ),
                ],
            ),
            Mode::Metal,
            r##"
cp.toml:62:18: error: cluster.secrets.encryption_key: a worker config must not carry `encryption_key` (remove it: only control planes hold it)
cp.toml:63:23: error: cluster.secrets.service_account_key: a worker config must not carry `service_account_key` (remove it: only control planes hold it)
cp.toml:75:7: error: cluster.secrets.kubernetes_ca.key: a worker config must not carry the kubernetes_ca private key (remove it: only control planes hold CA keys)
cp.toml:87:7: error: cluster.secrets.node_api_ca.key: a worker config must not carry the node_api_ca private key (remove it: only control planes hold CA keys)
cp.toml:99:7: error: cluster.secrets.etcd_ca.key: a worker config must not carry the etcd_ca private key (remove it: only control planes hold CA keys)
cp.toml:111:7: error: cluster.secrets.front_proxy_ca.key: a worker config must not carry the front_proxy_ca private key (remove it: only control planes hold CA keys)
"##,
        ),
        (
            "worker carrying the service-account key",
            edit(
                WORKER,
                &[(
                    "api_join_token = \"ghijkl.0123456789abcdef\"\n",
                    "api_join_token = \"ghijkl.0123456789abcdef\"\nservice_account_key = \"-----BEGIN PRIVATE KEY-----\\nAA==\\n-----END PRIVATE KEY-----\"\n",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:20:23: error: cluster.secrets.service_account_key: a worker config must not carry `service_account_key` (remove it: only control planes hold it)
"##,
        ),
        (
            "worker with etcd settings",
            format!("{WORKER}\n[cluster.etcd]\nextra_args = {{ quota-backend-bytes = \"1\" }}\n"),
            Mode::Metal,
            r##"
cp.toml:35:1: warning: cluster.etcd: etcd settings are ignored on workers (remove [cluster.etcd] from worker configs)
"##,
        ),
        (
            "bootstrap token in upper case",
            edit(
                CP,
                &[(
                    "bootstrap_token = \"abcdef.0123456789abcdef\"",
                    "bootstrap_token = \"abcdef.0123456789ABCDEF\"",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:63:19: error: cluster.secrets.bootstrap_token: not a token in the form [a-z0-9]{6}.[a-z0-9]{16} (expected 6 and 16 lower-case letters or digits joined by '.', like abcdef.0123456789abcdef)
"##,
        ),
        (
            "bootstrap token too short",
            edit(
                CP,
                &[(
                    "bootstrap_token = \"abcdef.0123456789abcdef\"",
                    "bootstrap_token = \"abc.def\"",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:63:19: error: cluster.secrets.bootstrap_token: not a token in the form [a-z0-9]{6}.[a-z0-9]{16} (expected 6 and 16 lower-case letters or digits joined by '.', like abcdef.0123456789abcdef)
"##,
        ),
        (
            "join token equal to the bootstrap token",
            edit(
                CP,
                &[(
                    "api_join_token = \"ghijkl.0123456789abcdef\"",
                    "api_join_token = \"abcdef.0123456789abcdef\"",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:64:18: error: cluster.secrets.api_join_token: api_join_token is the same as bootstrap_token (generate a separate token for each purpose)
"##,
        ),
        (
            "unsupported Kubernetes version",
            edit(
                CP,
                &[(
                    "kubernetes_version = \"1.34.1\"",
                    "kubernetes_version = \"1.29.3\"",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:49:22: error: cluster.kubernetes_version: Kubernetes 1.29.3 is not supported (supported versions are 1.31.x to 1.34.x)
"##,
        ),
        (
            "malformed Kubernetes version",
            edit(
                CP,
                &[(
                    "kubernetes_version = \"1.34.1\"",
                    "kubernetes_version = \"1.34\"",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:49:22: error: cluster.kubernetes_version: "1.34" is not a Kubernetes version (expected MAJOR.MINOR.PATCH like 1.34.1)
"##,
        ),
        (
            "duplicate interface names",
            edit(CP, &[("mac = \"52:54:00:12:34:56\"", "name = \"eth0\"")]),
            Mode::Metal,
            r##"
cp.toml:30:8: error: machine.network.interfaces[1].name: interface "eth0" is already configured at machine.network.interfaces[0].name (merge the two entries)
"##,
        ),
        (
            "duplicate MAC addresses",
            edit(
                CP,
                &[(
                    "dhcp = true\n",
                    "dhcp = true\n\n[[machine.network.interfaces]]\nmac = \"52:54:00:12:34:56\"\ndhcp = true\n",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:34:7: error: machine.network.interfaces[2].mac: MAC address 52:54:00:12:34:56 is already configured at machine.network.interfaces[1].mac (merge the two entries)
"##,
        ),
        (
            "interface selected by name and MAC",
            edit(
                CP,
                &[(
                    "name = \"eth0\"\n",
                    "name = \"eth0\"\nmac = \"52:54:00:aa:bb:cc\"\n",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:21:7: error: machine.network.interfaces[0].mac: the interface is selected by both `name` and `mac` (keep one of them)
"##,
        ),
        (
            "interface selected by nothing",
            edit(CP, &[("mac = \"52:54:00:12:34:56\"\n", "")]),
            Mode::Metal,
            r##"
cp.toml:29:1: error: machine.network.interfaces[1]: the interface is selected by neither `name` nor `mac` (set one of them, like name = "eth0")
"##,
        ),
        (
            "bad MAC address",
            edit(
                CP,
                &[("mac = \"52:54:00:12:34:56\"", "mac = \"zz:54:00:12:34:56\"")],
            ),
            Mode::Metal,
            r##"
cp.toml:30:7: error: machine.network.interfaces[1].mac: "zz:54:00:12:34:56" is not a MAC address (expected six hex pairs like 52:54:00:12:34:56)
"##,
        ),
        (
            "route gateway of the wrong family",
            edit(CP, &[("via = \"10.5.0.1\"", "via = \"fd00::1\"")]),
            Mode::Metal,
            r##"
cp.toml:26:7: error: machine.network.interfaces[0].routes[0].via: gateway fd00::1 and destination 0.0.0.0/0 are of different IP families (use a gateway of the destination's family)
"##,
        ),
        (
            "MTU out of range",
            edit(CP, &[("mtu = 1500", "mtu = 100000")]),
            Mode::Metal,
            r##"
cp.toml:22:7: error: machine.network.interfaces[0].mtu: 100000 is out of range (expected 576 to 9216)
"##,
        ),
        (
            "bad sha256 sum",
            edit(CP, &[("amd64 = \"2f5a0b1d", "amd64 = \"2f5a0b1")]),
            Mode::Metal,
            r##"
cp.toml:56:20: error: cluster.kubelet.sha256.amd64: "2f5a0b15e0b7f4c6d8e9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d" is not a sha256 sum (expected 64 hex digits, as `sha256sum` prints them)
"##,
        ),
        (
            "sha256 for an unknown architecture",
            edit(CP, &[("arm64 = \"0d9c", "aarch64 = \"0d9c")]),
            Mode::Metal,
            r##"
cp.toml:56:88: error: cluster.kubelet.sha256.aarch64: "aarch64" is not one of "amd64", "arm64" (use one of the listed values)
"##,
        ),
        (
            "malformed sysctl name",
            edit(
                CP,
                &[(
                    "\"vm.overcommit_memory\" = 1",
                    "\"vm..overcommit_memory\" = 1",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:13:1: error: machine.sysctls."vm..overcommit_memory": "vm..overcommit_memory" is not a sysctl name (use the dotted name under /proc/sys, like net.ipv4.ip_forward)
"##,
        ),
        (
            "sysctl outside /proc/sys",
            edit(
                CP,
                &[("\"kernel.panic\" = \"10\"", "\"kernal.panic\" = \"10\"")],
            ),
            Mode::Metal,
            r##"
cp.toml:14:1: error: machine.sysctls."kernal.panic": "kernal.panic" is not a sysctl name: there is no /proc/sys/kernal (sysctl names start with one of abi, debug, dev, fs, kernel, net, user, vm)
"##,
        ),
        (
            "sysctl value of the wrong type",
            edit(
                CP,
                &[("\"kernel.panic\" = \"10\"", "\"kernel.panic\" = [10]")],
            ),
            Mode::Metal,
            r##"
cp.toml:14:18: error: machine.sysctls."kernel.panic": expected a string or an integer, found an array
"##,
        ),
        (
            "bad kernel module name",
            edit(CP, &[("\"nf_conntrack\"]", "\"nf_conntrack.ko\"]")]),
            Mode::Metal,
            r##"
cp.toml:9:28: error: machine.kernel_modules[1]: "nf_conntrack.ko" is not a kernel module name (use the module's name without path or .ko suffix, like br_netfilter)
"##,
        ),
        (
            "file mode not octal",
            edit(CP, &[("mode = \"0644\"", "mode = \"0999\"")]),
            Mode::Metal,
            r##"
cp.toml:44:8: error: machine.files[0].mode: "0999" is not an octal file mode (write the permission bits in octal, like "0644")
"##,
        ),
        (
            "setuid file mode",
            edit(CP, &[("mode = \"0644\"", "mode = \"4755\"")]),
            Mode::Metal,
            r##"
cp.toml:44:8: error: machine.files[0].mode: "4755" sets the setuid, setgid or sticky bit (Keelson never writes such files; use permission bits up to "0777")
"##,
        ),
        (
            "relative file path",
            edit(
                CP,
                &[("path = \"/var/etc/motd\"", "path = \"var/etc/motd\"")],
            ),
            Mode::Metal,
            r##"
cp.toml:42:8: error: machine.files[0].path: "var/etc/motd" is not an absolute path (start it with '/', like /var/etc/motd)
"##,
        ),
        (
            "file path with ..",
            edit(
                CP,
                &[("path = \"/var/etc/motd\"", "path = \"/var/../etc/motd\"")],
            ),
            Mode::Metal,
            r##"
cp.toml:42:8: error: machine.files[0].path: "/var/../etc/motd" is not a normalized file path (remove empty, '.' and '..' components and any trailing '/')
"##,
        ),
        (
            "file under /proc",
            edit(
                CP,
                &[(
                    "path = \"/var/etc/motd\"",
                    "path = \"/proc/sys/vm/swappiness\"",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:42:8: error: machine.files[0].path: "/proc/sys/vm/swappiness" is under /proc, a kernel filesystem (use machine.sysctls or machine.kernel_modules for kernel settings; files go under /var or /etc)
"##,
        ),
        (
            "file outside /var and /etc",
            edit(
                CP,
                &[(
                    "path = \"/var/etc/motd\"",
                    "path = \"/usr/local/bin/agent\"",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:42:8: error: machine.files[0].path: "/usr/local/bin/agent" is not under /var or /etc (machine.files writes only under /var (kept on EPHEMERAL) and /etc (made at every boot), and CNI plugins in /opt/cni/bin; the rest of the root is read-only)
"##,
        ),
        (
            "file that is STATE's own",
            edit(
                CP,
                &[(
                    "path = \"/var/etc/motd\"",
                    "path = \"/system/state/config.toml\"",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:42:8: error: machine.files[0].path: "/system/state/config.toml" is in STATE (/system/state), whose files keelson keeps itself (a config writes only /system/state/node-api/server.crt and /system/state/node-api/server.key there; put other files under /var or /etc)
"##,
        ),
        (
            "file below the CNI plugins",
            edit(
                CP,
                &[(
                    "path = \"/var/etc/motd\"",
                    "path = \"/opt/cni/bin/sub/plugin\"",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:42:8: error: machine.files[0].path: "/opt/cni/bin/sub/plugin" is in a directory under /opt/cni/bin (put CNI plugins directly in /opt/cni/bin, like /opt/cni/bin/my-plugin)
"##,
        ),
        (
            "duplicate file paths",
            edit(
                CP,
                &[(
                    "mode = \"0644\"\n",
                    "mode = \"0644\"\n\n[[machine.files]]\npath = \"/var/etc/motd\"\ncontent = \"again\"\n",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:47:8: error: machine.files[1].path: "/var/etc/motd" is already written by machine.files[0].path (merge the two entries)
"##,
        ),
        (
            "install disk not under /dev",
            edit(
                CP,
                &[("install_disk = \"/dev/vda\"", "install_disk = \"sda\"")],
            ),
            Mode::Metal,
            r##"
cp.toml:7:16: error: machine.install_disk: "sda" is not a device path (expected a path under /dev, like /dev/vda or /dev/disk/by-id/...)
"##,
        ),
        (
            "metal mode without install disk",
            edit(CP, &[("install_disk = \"/dev/vda\"\n", "")]),
            Mode::Metal,
            r##"
cp.toml:4:1: error: machine.install_disk: metal mode needs an install disk (set install_disk, like install_disk = "/dev/vda")
"##,
        ),
        (
            "cloud mode with install disk",
            CP.to_string(),
            Mode::Cloud,
            r##"
cp.toml:7:16: warning: machine.install_disk: install_disk is ignored in cloud mode (the cloud image already runs from its disk; remove the key)
"##,
        ),
        (
            "container mode with disks, modules and interfaces",
            CP.to_string(),
            Mode::Container,
            r##"
cp.toml:7:16: error: machine.install_disk: container mode cannot set an install disk (the container's host owns them; remove the key)
cp.toml:9:18: error: machine.kernel_modules: container mode cannot set kernel modules (the container's host owns them; remove the key)
cp.toml:19:1: error: machine.network.interfaces: container mode cannot set network interfaces (the container's host owns them; remove the key)
"##,
        ),
        (
            "kubelet prerequisites turned off",
            edit(
                CP,
                &[
                    (
                        "swap = \"off\"\n",
                        "swap = \"on\"\ndisabled_kernel_modules = [\"br_netfilter\", \"zram\"]\n",
                    ),
                    (
                        "\"kernel.panic\" = \"10\"",
                        "\"kernel.panic\" = \"10\"\n\"net.ipv4.ip_forward\" = 0",
                    ),
                ],
            ),
            Mode::Metal,
            r##"
cp.toml:8:8: warning: machine.swap: swap is on: the kubelet refuses to start unless its configuration sets failSwapOn = false (set swap = "off", or failSwapOn = false in machine.kubelet.extra_config)
cp.toml:9:28: warning: machine.disabled_kernel_modules[0]: br_netfilter is a kubelet prerequisite: without it, bridged pod traffic bypasses iptables (remove it from disabled_kernel_modules unless you know the cluster does without it)
cp.toml:9:44: warning: machine.disabled_kernel_modules[1]: zram is not a default module, so there is nothing to disable (the defaults are br_netfilter, overlay)
cp.toml:16:25: warning: machine.sysctls."net.ipv4.ip_forward": net.ipv4.ip_forward = "0" turns off a kubelet prerequisite (net.ipv4.ip_forward = 1) (remove the override unless you know the cluster does without it)
"##,
        ),
        (
            "module both loaded and disabled",
            edit(
                CP,
                &[(
                    "swap = \"off\"\n",
                    "swap = \"off\"\ndisabled_kernel_modules = [\"ip_vs\"]\n",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:9:28: error: machine.disabled_kernel_modules[0]: ip_vs is both loaded (machine.kernel_modules[0]) and disabled (keep it in one of the two lists)
"##,
        ),
        (
            "missing required keys",
            edit(
                CP,
                &[
                    ("endpoint = \"https://10.5.0.2:6443\"\n", ""),
                    ("type = \"controlplane\"\n", ""),
                ],
            ),
            Mode::Metal,
            r##"
cp.toml:4:1: error: machine.type: missing required key `type` (add it, like type = "worker")
cp.toml:45:1: error: cluster.endpoint: missing required key `endpoint` (add it, like endpoint = "https://10.5.0.2:6443")
"##,
        ),
        (
            "unknown config version",
            edit(CP, &[("version = \"v1\"", "version = \"v2\"")]),
            Mode::Metal,
            r##"
cp.toml:2:11: error: version: "v2" is not one of "v1" (did you mean "v1"?)
"##,
        ),
        (
            "misspelt machine type",
            edit(CP, &[("type = \"controlplane\"", "type = \"controlplan\"")]),
            Mode::Metal,
            r##"
cp.toml:5:8: error: machine.type: "controlplan" is not one of "controlplane", "worker" (did you mean "controlplane"?)
"##,
        ),
        (
            "truncated certificate",
            edit(
                CP,
                &[(
                    "bm90IGEgcmVhbCBjZXJ0aWZpY2F0ZSwgb25seSBQRU0tc2hhcGVk\n-----END CERTIFICATE-----\n\"\"\"\nkey = \"\"\"\n-----BEGIN EC",
                    "bm90IGEgcmVhbCBjZXJ0aWZpY2F0ZSwgb25seSBQRU0tc2hhcGVk\n\"\"\"\nkey = \"\"\"\n-----BEGIN EC",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:85:8: error: cluster.secrets.node_api_ca.cert: not a PEM certificate: it does not end with "-----END CERTIFICATE-----" (more than one block, or truncated) (paste one PEM block from -----BEGIN CERTIFICATE----- to -----END CERTIFICATE-----)
"##,
        ),
        (
            "certificate where a key belongs",
            edit(
                CP,
                &[(
                    "-----BEGIN EC PRIVATE KEY-----\nbm90IGEgcmVhbCBrZXksIG9ubHkgUEVNLXNoYXBlZCE=\n-----END EC PRIVATE KEY-----",
                    "-----BEGIN CERTIFICATE-----\nbm90IGEgcmVhbCBrZXksIG9ubHkgUEVNLXNoYXBlZCE=\n-----END CERTIFICATE-----",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:90:7: error: cluster.secrets.node_api_ca.key: not a PEM private key: found a "CERTIFICATE" block (paste one PEM block from -----BEGIN PRIVATE KEY----- to -----END PRIVATE KEY-----)
"##,
        ),
        (
            "short encryption key",
            edit(
                CP,
                &[(
                    "encryption_key = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"",
                    "encryption_key = \"AAECAw==\"",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:65:18: error: cluster.secrets.encryption_key: not a base64-encoded 32-byte key (generate one with `head -c 32 /dev/urandom | base64`)
"##,
        ),
        (
            "kubelet flag with dashes",
            edit(
                CP,
                &[(
                    "extra_args = { \"max-pods\" = \"200\" }",
                    "extra_args = { \"--max-pods\" = \"200\" }",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:35:16: error: machine.kubelet.extra_args.--max-pods: "--max-pods" starts with '-' (write the flag name without dashes: "max-pods")
"##,
        ),
        (
            "node-ip set twice",
            edit(
                CP,
                &[(
                    "extra_args = { \"max-pods\" = \"200\" }",
                    "extra_args = { \"node-ip\" = \"10.5.0.2\" }",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:35:28: error: machine.kubelet.extra_args.node-ip: node-ip is set both here and by node_ip_subnets (keep one of the two)
"##,
        ),
        (
            "bad certificate SAN",
            edit(
                CP,
                &[(
                    "cert_sans = [\"cp-1.example.com\"",
                    "cert_sans = [\"cp_1.example.com\"",
                )],
            ),
            Mode::Metal,
            r##"
cp.toml:39:14: error: machine.api.cert_sans[0]: "cp_1.example.com" is not an IP address or a DNS name: '_' is not allowed (write an IP address like 10.5.0.2 or a name like cp.example.com)
"##,
        ),
        (
            "bad time server",
            edit(CP, &[("\"time.example.com\"", "\"time example com\"")]),
            Mode::Metal,
            r##"
cp.toml:10:32: error: machine.time_servers[1]: "time example com" is not an IP address or a DNS name: ' ' is not allowed (write an IP address like 192.0.2.123 or a name like time.example.com)
"##,
        ),
        (
            "kubelet URL not http",
            edit(CP, &[("base_url = \"https://", "base_url = \"ftp://")]),
            Mode::Metal,
            r##"
cp.toml:55:12: error: cluster.kubelet.base_url: "ftp://mirror.example.com/kubernetes/release" is not an http(s) URL (write a URL like https://mirror.example.com/kubernetes/release)
"##,
        ),
        (
            "image repository and registry mirrors",
            edit(
                CP,
                &[
                    (
                        "dns_domain = \"cluster.local\"",
                        "dns_domain = \"cluster.local\"\nimage_repository = \"https://registry.example.com/K8s\"",
                    ),
                    (
                        "[machine.api]",
                        "[machine.registries.mirrors.\"10.5.0.1:5000\"]\nendpoints = [\"ftp://10.5.0.1\"]\n[machine.api]",
                    ),
                ],
            ),
            Mode::Metal,
            r##"
cp.toml:39:14: error: machine.registries.mirrors."10.5.0.1:5000".endpoints[0]: "ftp://10.5.0.1" is not an http(s) URL (write a URL like https://mirror.example.com/kubernetes/release)
cp.toml:55:20: error: cluster.image_repository: "https://registry.example.com/K8s" is a URL (its scheme is "https") (write the registry host and an optional path without a scheme, like registry.k8s.io or 10.5.0.1:5000/k8s; a registry served over plain HTTP is named in machine.registries.mirrors)
"##,
        ),
        (
            "registry host with a bad port, repository path in capitals",
            edit(
                CP,
                &[
                    (
                        "dns_domain = \"cluster.local\"",
                        "dns_domain = \"cluster.local\"\nimage_repository = \"10.5.0.1:5000/K8s\"",
                    ),
                    (
                        "[machine.api]",
                        "[machine.registries.mirrors.\"10.5.0.1:99999\"]\nendpoints = [\"http://10.5.0.1\"]\n[machine.api]",
                    ),
                ],
            ),
            Mode::Metal,
            r##"
cp.toml:38:29: error: machine.registries.mirrors."10.5.0.1:99999": "10.5.0.1:99999" has an invalid port (write a registry host like registry.k8s.io or 10.5.0.1:5000 (no scheme, no path))
cp.toml:55:20: error: cluster.image_repository: "10.5.0.1:5000/K8s" has an invalid repository path "K8s" (path components are lower-case letters, digits, '.', '_' and '-', starting with a letter or digit)
"##,
        ),
        (
            "TOML syntax errors",
            edit(
                CP,
                &[
                    ("hostname = \"cp-1\"", "hostname = \"cp-1"),
                    ("mtu = 1500", "mtu = = 1500"),
                ],
            ),
            Mode::Metal,
            r##"
cp.toml:6:17: error: invalid basic string, expected `"`
cp.toml:22:7: error: extra `=`, expected nothing
cp.toml:22:9: error: unexpected key or value, expected newline, `#`
"##,
        ),
        (
            "duplicate key",
            edit(
                CP,
                &[("swap = \"off\"\n", "swap = \"off\"\nswap = \"on\"\n")],
            ),
            Mode::Metal,
            r##"
cp.toml:9:1: error: duplicate key (each key may appear once in a table)
"##,
        ),
        (
            "many problems in one run",
            edit(
                CP,
                &[
                    ("hostname = ", "hostnme = "),
                    ("mtu = 1500", "mtu = 1"),
                    (
                        "kubernetes_version = \"1.34.1\"",
                        "kubernetes_version = \"2.0.0\"",
                    ),
                    (
                        "endpoint = \"https://10.5.0.2:6443\"",
                        "endpoint = \"https://10.5.0.2\"",
                    ),
                ],
            ),
            Mode::Metal,
            r##"
cp.toml:6:1: error: machine.hostnme: unknown key `hostnme` (did you mean `hostname`?)
cp.toml:22:7: error: machine.network.interfaces[0].mtu: 1 is out of range (expected 576 to 9216)
cp.toml:48:12: error: cluster.endpoint: "https://10.5.0.2" has no port (add the API server port, like https://10.5.0.2:6443)
cp.toml:49:22: error: cluster.kubernetes_version: Kubernetes 2.0.0 is not supported (supported versions are 1.31.x to 1.34.x)
"##,
        ),
        // Extension services, appended after the base config (its line 118): the first
        // appended line is line 120.
        (
            "extension services that are valid",
            format!(
                "{CP}\n{}",
                r#"[[machine.services]]
name = "node-agent"
command = ["/usr/bin/agent", "--port=9100"]
depends_on = ["containerd", "helper"]
environment = { LOG_LEVEL = "info", _X2 = "" }
[[machine.services]]
name = "helper"
command = ["/usr/bin/helper"]
depends_on = ["etcd"]
"#
            ),
            Mode::Metal,
            "",
        ),
        (
            "extension service with an invalid name",
            format!(
                "{CP}\n{}",
                "[[machine.services]]\nname = \"Node_Agent\"\ncommand = [\"/usr/bin/agent\"]\n"
            ),
            Mode::Metal,
            r##"
cp.toml:121:8: error: machine.services[0].name: "Node_Agent" is not a valid service name (use up to 63 lower-case letters, digits and '-', not starting or ending with '-', like node-agent)
"##,
        ),
        (
            "extension service named like a built-in one",
            format!(
                "{CP}\n{}",
                "[[machine.services]]\nname = \"kubelet\"\ncommand = [\"/usr/bin/agent\"]\n"
            ),
            Mode::Metal,
            r##"
cp.toml:121:8: error: machine.services[0].name: kubelet is a built-in service (choose another name; the built-in services are containerd, etcd, kubelet, machined)
"##,
        ),
        (
            "extension service defined twice",
            format!(
                "{CP}\n{}",
                "[[machine.services]]\nname = \"agent\"\ncommand = [\"/usr/bin/agent\"]\n\
                 [[machine.services]]\nname = \"agent\"\ncommand = [\"/usr/bin/other\"]\n"
            ),
            Mode::Metal,
            r##"
cp.toml:124:8: error: machine.services[1].name: service agent is already defined at machine.services[0].name (rename one of them, or merge the two entries)
"##,
        ),
        (
            "extension service with an empty command",
            format!(
                "{CP}\n{}",
                "[[machine.services]]\nname = \"agent\"\ncommand = []\n"
            ),
            Mode::Metal,
            r##"
cp.toml:122:11: error: machine.services[0].command: the command is empty (give the absolute program path first, like command = ["/usr/bin/agent", "--flag"])
"##,
        ),
        (
            "extension service without a command",
            format!("{CP}\n{}", "[[machine.services]]\nname = \"agent\"\n"),
            Mode::Metal,
            r##"
cp.toml:120:1: error: machine.services[0].command: missing required key `command` (add it, like command = ["/usr/bin/agent", "--flag"])
"##,
        ),
        (
            "extension service whose program is not an absolute path",
            format!(
                "{CP}\n{}",
                "[[machine.services]]\nname = \"agent\"\ncommand = [\"agent\", \"--flag\"]\n"
            ),
            Mode::Metal,
            r##"
cp.toml:122:12: error: machine.services[0].command[0]: the program "agent" is not an absolute path (name the program by its absolute path, like /usr/bin/agent: it is run directly, not through a shell)
"##,
        ),
        (
            "extension service depending on an unknown service",
            format!(
                "{CP}\n{}",
                "[[machine.services]]\nname = \"agent\"\ncommand = [\"/usr/bin/agent\"]\ndepends_on = [\"containrd\", \"nothing-here\"]\n"
            ),
            Mode::Metal,
            r##"
cp.toml:123:15: error: machine.services[0].depends_on[0]: "containrd" is not a service of this node (did you mean "containerd"?)
cp.toml:123:28: error: machine.services[0].depends_on[1]: "nothing-here" is not a service of this node (name a built-in service (containerd, etcd, kubelet, machined) or one defined in machine.services)
"##,
        ),
        (
            "extension service on a worker depending on etcd",
            format!(
                "{WORKER}\n{}",
                "[[machine.services]]\nname = \"agent\"\ncommand = [\"/usr/bin/agent\"]\ndepends_on = [\"etcd\"]\n"
            ),
            Mode::Metal,
            r##"
cp.toml:38:15: error: machine.services[0].depends_on[0]: etcd runs on control planes only, so this worker service would never start (remove the dependency, or run the service on control planes)
"##,
        ),
        (
            "extension services depending on each other in cycles",
            format!(
                "{CP}\n{}",
                r#"[[machine.services]]
name = "a"
command = ["/usr/bin/a"]
depends_on = ["containerd", "b"]
[[machine.services]]
name = "b"
command = ["/usr/bin/b"]
depends_on = ["a"]
[[machine.services]]
name = "c"
command = ["/usr/bin/c"]
depends_on = ["c"]
"#
            ),
            Mode::Metal,
            r##"
cp.toml:123:29: error: machine.services[0].depends_on[1]: the services depend on each other in a cycle: a -> b -> a (remove one of these dependencies: a service in a cycle never starts)
cp.toml:131:15: error: machine.services[2].depends_on[0]: the services depend on each other in a cycle: c -> c (remove one of these dependencies: a service in a cycle never starts)
"##,
        ),
        (
            "extension service with a bad environment variable name",
            format!(
                "{CP}\n{}",
                "[[machine.services]]\nname = \"agent\"\ncommand = [\"/usr/bin/agent\"]\nenvironment = { \"1X\" = \"y\", \"A=B\" = \"z\" }\n"
            ),
            Mode::Metal,
            r##"
cp.toml:123:24: error: machine.services[0].environment.1X: "1X" is not a valid environment variable name (use letters, digits and '_', not starting with a digit, like LOG_LEVEL)
cp.toml:123:37: error: machine.services[0].environment."A=B": "A=B" is not a valid environment variable name (use letters, digits and '_', not starting with a digit, like LOG_LEVEL)
"##,
        ),
    ];
    let mut failures = Vec::new();
    for (name, input, mode, expected) in &cases {
        if let Err(why) = check(input, *mode, expected) {
            failures.push(format!("--- {name}\n{why}"));
        }
    }
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn bytes_that_are_not_utf8_are_reported_with_their_offset() {
    let mut bytes = b"version = \"v1\"\n[machine]\nhostname = \"cp".to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe, b'"', b'\n']);
    let checked = check_bytes(&bytes, "cp.toml", Mode::Metal);
    let shown: Vec<String> = checked.diagnostics.iter().map(|d| d.to_string()).collect();
    assert_eq!(
        shown,
        ["cp.toml:3:15: error: not UTF-8 at byte 39 (a machine config is UTF-8 TOML text)"]
    );
    assert!(!checked.is_valid());
}

/// A config with one `[[machine.files]]` entry per path, after the fixture's own.
fn with_files(paths: &[&str]) -> String {
    let entries: String = paths
        .iter()
        .map(|p| format!("\n[[machine.files]]\npath = \"{p}\"\ncontent = \"x\"\n"))
        .collect();
    edit(
        CP,
        &[("mode = \"0644\"\n", &format!("mode = \"0644\"\n{entries}"))],
    )
}

#[test]
fn files_are_written_only_under_var_and_etc_and_never_over_state() {
    let allowed = [
        "/var/lib/agent/agent.conf",
        "/etc/cni/net.d/10-demo.conflist",
        "/opt/cni/bin/demo-plugin",
        "/system/state/node-api/server.crt",
        "/system/state/node-api/server.key",
    ];
    let checked = check_str(&with_files(&allowed), "cp.toml", Mode::Metal);
    assert_eq!(checked.diagnostics, [], "{allowed:?}");
    // Each refused path is named by its key path, and one bad entry among good ones
    // refuses the whole config.
    let refused = [
        ("/var", "is not under /var or /etc"),
        ("/etc", "is not under /var or /etc"),
        ("/variable/x", "is not under /var or /etc"),
        ("/usr/lib/os-release", "is not under /var or /etc"),
        ("/sbin/init", "is not under /var or /etc"),
        ("/opt/other/x", "is not under /var or /etc"),
        ("/run/keelson/init.sock", "is not under /var or /etc"),
        ("/system/state/config.toml", "is in STATE"),
        ("/system/state/config.staged.toml", "is in STATE"),
        ("/system/state/machine-id", "is in STATE"),
        ("/system/state/apply-try.json", "is in STATE"),
        ("/system/state/node-api/other.pem", "is in STATE"),
        ("var/lib/x", "is not an absolute path"),
        ("/var/lib/../../sbin/init", "is not a normalized file path"),
        ("/etc/./x", "is not a normalized file path"),
    ];
    for (path, why) in refused {
        let checked = check_str(&with_files(&[allowed[0], path]), "cp.toml", Mode::Metal);
        assert!(!checked.is_valid(), "{path} was accepted");
        let errors: Vec<String> = checked.diagnostics.iter().map(|d| d.to_string()).collect();
        assert_eq!(errors.len(), 1, "{path}: {errors:?}");
        let want = format!("error: machine.files[2].path: {path:?} {why}");
        assert!(
            errors[0].contains(&want),
            "{path}: {} lacks {want:?}",
            errors[0]
        );
        assert!(errors[0].contains(" ("), "{path}: no hint in {}", errors[0]);
    }
}

#[test]
fn a_config_over_the_size_limit_is_refused_whole() {
    assert_eq!(keelson_configs::MAX_CONFIG_BYTES, 1024 * 1024);
    let mut big = CP.to_string();
    big.push_str(&"#".repeat(keelson_configs::MAX_CONFIG_BYTES + 1 - big.len()));
    let checked = check_bytes(big.as_bytes(), "cp.toml", Mode::Metal);
    assert!(!checked.is_valid());
    let shown: Vec<String> = checked.diagnostics.iter().map(|d| d.to_string()).collect();
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert!(
        shown[0].starts_with(
            "cp.toml: error: the config is 1048577 bytes, over the 1048576-byte (1 MiB) limit ("
        ),
        "{shown:?}"
    );
    // At the limit exactly, it is checked as usual.
    big.pop();
    assert!(check_bytes(big.as_bytes(), "cp.toml", Mode::Metal).is_valid());
}

#[test]
fn unreadable_files_are_reported_without_a_location() {
    let report = load(std::path::Path::new("/nonexistent/cp.toml"), Mode::Metal).unwrap_err();
    assert_eq!(report.diagnostics.len(), 1);
    let shown = report.diagnostics[0].to_string();
    assert!(
        shown.starts_with("/nonexistent/cp.toml: error: cannot read the file: "),
        "{shown}"
    );
    assert!(
        report
            .to_string()
            .starts_with("invalid machine config: 1 error\n")
    );
}

#[test]
fn valid_configs_round_trip_unchanged() {
    for src in [CP, WORKER] {
        let first = check_str(src, "in.toml", Mode::Metal)
            .into_result()
            .unwrap();
        let text = first.to_toml_string().unwrap();
        let again = check_str(&text, "out.toml", Mode::Metal);
        assert_eq!(again.diagnostics, [], "{text}");
        assert_eq!(again.config.as_ref(), Some(&first), "{text}");
        // Serializing is stable too.
        assert_eq!(again.config.unwrap().to_toml_string().unwrap(), text);
    }
}

#[test]
fn loading_from_a_file_gives_the_typed_config() {
    let dir = std::env::temp_dir().join(format!("keelson-configs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("worker.toml");
    std::fs::write(&path, WORKER).unwrap();
    let config = load(&path, Mode::Metal).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(config.machine.kind, MachineType::Worker);
    assert_eq!(config.cluster.kubernetes_version.tag(), "v1.31.0");
    assert_eq!(config.cluster.endpoint.port, 6443);
    assert_eq!(config.cluster.pod_subnets[0].to_string(), "10.244.0.0/16");
    assert_eq!(config.cluster.dns_domain, "cluster.local");
}

#[test]
fn defaults_encode_the_kubelet_prerequisites() {
    let config = check_str(WORKER, "w.toml", Mode::Metal)
        .into_result()
        .unwrap();
    assert_eq!(
        config.machine.effective_kernel_modules(),
        ["br_netfilter", "overlay"]
    );
    let sysctls = config.machine.effective_sysctls();
    assert_eq!(sysctls["net.ipv4.ip_forward"], "1");
    assert_eq!(sysctls["net.bridge.bridge-nf-call-iptables"], "1");
    assert_eq!(sysctls["net.bridge.bridge-nf-call-ip6tables"], "1");
    assert_eq!(config.machine.swap, keelson_configs::schema::Swap::Off);

    // Overrides merge over the defaults and are still accepted, with warnings.
    let src = WORKER.replace(
        "type = \"worker\"\n",
        "type = \"worker\"\nkernel_modules = [\"ip_vs\"]\ndisabled_kernel_modules = [\"overlay\"]\nsysctls = { \"net.ipv4.ip_forward\" = 0, \"vm.swappiness\" = \"10\" }\n",
    );
    let checked = check_str(&src, "w.toml", Mode::Metal);
    assert!(checked.is_valid(), "{:?}", checked.diagnostics);
    let warnings = checked
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Warning)
        .count();
    assert_eq!(warnings, 2);
    let machine = checked.config.unwrap().machine;
    assert_eq!(
        machine.effective_kernel_modules(),
        ["br_netfilter", "ip_vs"]
    );
    let sysctls = machine.effective_sysctls();
    assert_eq!(sysctls["net.ipv4.ip_forward"], "0");
    assert_eq!(sysctls["vm.swappiness"], "10");
    assert_eq!(sysctls.len(), 4);
}

/// A small deterministic generator, so that failures reproduce.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Whatever the input, checking it never panics, and the config is given exactly when
/// no diagnostic is an error; an invalid input always says why.
fn assert_sane(bytes: &[u8]) {
    let checked = check_bytes(bytes, "garbage.toml", Mode::Metal);
    let errors = checked.diagnostics.iter().filter(|d| d.is_error()).count();
    assert_eq!(checked.is_valid(), errors == 0, "{bytes:?}");
    for d in &checked.diagnostics {
        assert!(!d.message.is_empty());
        assert!(d.location.is_some(), "{d}");
    }
}

#[test]
fn every_truncation_of_a_valid_config_is_handled() {
    for end in 0..=CP.len() {
        assert_sane(&CP.as_bytes()[..end]);
    }
    for end in 0..=WORKER.len() {
        assert_sane(&WORKER.as_bytes()[..end]);
    }
}

#[test]
fn mutated_and_random_inputs_never_panic() {
    let mut rng = XorShift(0x5eed_cafe_f00d_d00d);
    let alphabet = b"[]{}=\"'.,#\n \\-_0123456789abcxyz:/\t\0\xff";
    for _ in 0..3000 {
        let mut bytes = CP.as_bytes().to_vec();
        for _ in 0..1 + rng.below(8) {
            let at = rng.below(bytes.len());
            match rng.below(3) {
                0 => bytes[at] = alphabet[rng.below(alphabet.len())],
                1 => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, alphabet[rng.below(alphabet.len())]),
            }
        }
        assert_sane(&bytes);
    }
    for len in [0, 1, 7, 64, 1000, 10_000] {
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        assert_sane(&bytes);
        let text: Vec<u8> = (0..len)
            .map(|_| alphabet[rng.below(alphabet.len())])
            .collect();
        assert_sane(&text);
    }
    // Deep nesting in the pass-through table and in the document itself.
    let deep = format!(
        "{}\n[machine.kubelet.extra_config]\nx = {}1{}\n",
        WORKER,
        "[".repeat(200),
        "]".repeat(200)
    );
    assert_sane(deep.as_bytes());
    assert_sane(format!("a = {}", "[".repeat(100_000)).as_bytes());
}

/// `CP` with `cluster.etcd.endpoints = [ENTRIES]` on line 61.
fn with_etcd_endpoints(entries: &str) -> String {
    edit(
        CP,
        &[(
            "extra_args = { \"snapshot-count\" = \"10000\" }\n",
            &format!(
                "extra_args = {{ \"snapshot-count\" = \"10000\" }}\nendpoints = [{entries}]\n"
            ),
        )],
    )
}

#[test]
fn etcd_endpoints_are_checked_one_by_one() {
    let cases: Vec<(&str, &str, &str)> = vec![
        // name, entries, expected diagnostics
        (
            "addresses, names, ports and IPv6",
            r#""10.5.0.2", "cp-2.example.com:2379", "fd00::4", "[fd00::5]:12379", "[fd00::6]""#,
            "",
        ),
        (
            "a URL",
            r#""https://10.5.0.2:2379""#,
            r#"
cp.toml:61:14: error: cluster.etcd.endpoints[0]: "https://10.5.0.2:2379" is a URL (its scheme is "https") (give the host and port alone (etcd is always reached over TLS); write an address or a name, with an optional port, like 10.5.0.2, cp-1.example.com:2379, fd00::2 or [fd00::2]:2379)
"#,
        ),
        (
            "an empty string",
            r#""10.5.0.2", """#,
            r#"
cp.toml:61:26: error: cluster.etcd.endpoints[1]: the endpoint is empty (write an address or a name, with an optional port, like 10.5.0.2, cp-1.example.com:2379, fd00::2 or [fd00::2]:2379)
"#,
        ),
        (
            "bad ports",
            r#""10.5.0.2:0", "10.5.0.3:65536", "10.5.0.4:", "cp-1:+5""#,
            r#"
cp.toml:61:14: error: cluster.etcd.endpoints[0]: "10.5.0.2:0" has an invalid port "0"; use a port from 1 to 65535 (write an address or a name, with an optional port, like 10.5.0.2, cp-1.example.com:2379, fd00::2 or [fd00::2]:2379)
cp.toml:61:28: error: cluster.etcd.endpoints[1]: "10.5.0.3:65536" has an invalid port "65536"; use a port from 1 to 65535 (write an address or a name, with an optional port, like 10.5.0.2, cp-1.example.com:2379, fd00::2 or [fd00::2]:2379)
cp.toml:61:46: error: cluster.etcd.endpoints[2]: "10.5.0.4:" has an invalid port ""; use a port from 1 to 65535 (write an address or a name, with an optional port, like 10.5.0.2, cp-1.example.com:2379, fd00::2 or [fd00::2]:2379)
cp.toml:61:59: error: cluster.etcd.endpoints[3]: "cp-1:+5" has an invalid port "+5"; use a port from 1 to 65535 (write an address or a name, with an optional port, like 10.5.0.2, cp-1.example.com:2379, fd00::2 or [fd00::2]:2379)
"#,
        ),
        (
            "bad names and IPv6 forms",
            r#""cp_1", "-cp", "fd00::5:2379:x", "[fd00::5", "[cp-1]:2379", "[fd00::5]2379""#,
            r#"
cp.toml:61:14: error: cluster.etcd.endpoints[0]: "cp_1" is not an IP address or a DNS name: '_' is not allowed (write an address or a name, with an optional port, like 10.5.0.2, cp-1.example.com:2379, fd00::2 or [fd00::2]:2379)
cp.toml:61:22: error: cluster.etcd.endpoints[1]: "-cp" is not an IP address or a DNS name: label "-cp" starts or ends with '-' (write an address or a name, with an optional port, like 10.5.0.2, cp-1.example.com:2379, fd00::2 or [fd00::2]:2379)
cp.toml:61:29: error: cluster.etcd.endpoints[2]: "fd00::5:2379:x" is not an IPv6 address; with a port, an IPv6 address goes in brackets (write an address or a name, with an optional port, like 10.5.0.2, cp-1.example.com:2379, fd00::2 or [fd00::2]:2379)
cp.toml:61:47: error: cluster.etcd.endpoints[3]: "[fd00::5" has no closing `]` (write an address or a name, with an optional port, like 10.5.0.2, cp-1.example.com:2379, fd00::2 or [fd00::2]:2379)
cp.toml:61:59: error: cluster.etcd.endpoints[4]: "[cp-1]:2379" has something other than an IPv6 address in brackets (write an address or a name, with an optional port, like 10.5.0.2, cp-1.example.com:2379, fd00::2 or [fd00::2]:2379)
cp.toml:61:74: error: cluster.etcd.endpoints[5]: "[fd00::5]2379" has something other than `:PORT` after `]` (write an address or a name, with an optional port, like 10.5.0.2, cp-1.example.com:2379, fd00::2 or [fd00::2]:2379)
"#,
        ),
        (
            "the same endpoint twice",
            r#""10.5.0.2", "10.5.0.2:2379", "CP-1.example.com", "cp-1.example.com""#,
            r#"
cp.toml:61:26: error: cluster.etcd.endpoints[1]: 10.5.0.2 port 2379 is already listed at cluster.etcd.endpoints[0] (list each etcd endpoint once)
cp.toml:61:63: error: cluster.etcd.endpoints[3]: cp-1.example.com port 2379 is already listed at cluster.etcd.endpoints[2] (list each etcd endpoint once)
"#,
        ),
        (
            "not an array of strings",
            r#"2379"#,
            r#"
cp.toml:61:14: error: cluster.etcd.endpoints[0]: expected a string, found an integer (put the value in quotes)
"#,
        ),
    ];
    let mut failures = Vec::new();
    for (name, entries, expected) in &cases {
        if let Err(why) = check(&with_etcd_endpoints(entries), Mode::Metal, expected) {
            failures.push(format!("--- {name}\n{why}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn etcd_join_endpoints_default_to_the_cluster_endpoint_host() {
    let join = |input: &str| {
        let config = check_str(input, "cp.toml", Mode::Metal)
            .into_result()
            .unwrap_or_else(|r| panic!("{r}"));
        config.cluster.etcd_join_endpoints()
    };
    let endpoint_host = check_str(CP, "cp.toml", Mode::Metal)
        .config
        .unwrap()
        .cluster
        .endpoint
        .host;
    assert_eq!(join(CP), [(endpoint_host, 2379)]);
    assert_eq!(
        join(&with_etcd_endpoints(
            r#""10.5.0.2", "cp-2.example.com:12379", "[fd00:0::5]:2380", "fd00::6""#
        )),
        [
            ("10.5.0.2".to_string(), 2379),
            ("cp-2.example.com".to_string(), 12379),
            ("fd00::5".to_string(), 2380),
            ("fd00::6".to_string(), 2379),
        ]
    );
}
