//! The node API's wire types and the role every method needs.
//!
//! [`proto`] is generated from `machined/api/proto/machine.proto` by `build.rs` (protox, no
//! system `protoc`); daemon and client share it. [`ACCESS`] is the access table:
//! each method of the service declares the least role allowed to call it, and a method
//! missing from the table is refused for everyone (a unit test checks that the table
//! covers the .proto exactly).

use keelson_configs::pki::Role;

/// The generated messages, server and client of `keelson.machine.v1`.
#[allow(
    missing_docs,
    missing_debug_implementations,
    unused_qualifications,
    clippy::all,
    clippy::pedantic
)]
pub mod proto {
    tonic::include_proto!("keelson.machine.v1");
}

include!(concat!(env!("OUT_DIR"), "/api_methods.rs"));

/// The gRPC service name, as it appears in request paths.
pub const SERVICE: &str = "keelson.machine.v1.Machine";

/// The largest message the node decodes (8 MiB); a larger one gets RESOURCE_EXHAUSTED.
pub const MAX_MESSAGE_SIZE: usize = 8 * 1024 * 1024;

/// The most bytes one `Read` returns (4 MiB); a longer file is cut and marked truncated.
pub const MAX_READ: u64 = 4 * 1024 * 1024;

/// The containerd namespace that `Containers`, `Images` and `ImageImport` use when the
/// request names none: the one the kubelet (CRI) uses.
pub const DEFAULT_NAMESPACE: &str = "k8s.io";

/// The health check of the node's way to a running kubelet (kubeadm's phases, images,
/// the kubelet's binary and start).
pub const KUBERNETES_CHECK: &str = "kubernetes";
/// The prefix of a control plane's health checks of its static pods' containers.
pub const STATIC_POD_CHECK_PREFIX: &str = "static pod ";

/// Whether a health check is one of the Kubernetes ones, which a local cluster whose
/// nodes cannot reach a kubelet or the control-plane images never passes (`cluster
/// create` waits for the others).
pub fn is_kubernetes_check(name: &str) -> bool {
    name == KUBERNETES_CHECK || name.starts_with(STATIC_POD_CHECK_PREFIX)
}

/// An apply mode as the command line spells it (`Unspecified` is `auto`).
pub fn apply_mode_name(mode: proto::ApplyMode) -> &'static str {
    use proto::ApplyMode;
    match mode {
        ApplyMode::Unspecified | ApplyMode::Auto => "auto",
        ApplyMode::NoReboot => "no-reboot",
        ApplyMode::Reboot => "reboot",
        ApplyMode::Staged => "staged",
        ApplyMode::Try => "try",
    }
}

/// How the roles rank: admin can do everything an operator can, who can do everything a
/// reader can. etcd:backup is outside the ladder (below reader): it may call only the
/// methods whose row names it in `also`.
pub fn rank(role: Role) -> u8 {
    match role {
        Role::EtcdBackup => 0,
        Role::Reader => 1,
        Role::Operator => 2,
        Role::Admin => 3,
    }
}

/// Whether `have` may do what needs `need`: a role on the ladder reaches everything
/// below it; etcd:backup reaches only what needs etcd:backup.
pub fn allows(have: Role, need: Role) -> bool {
    match have {
        Role::EtcdBackup => need == Role::EtcdBackup,
        _ => rank(have) >= rank(need),
    }
}

/// One row of the access table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodAccess {
    /// The method name (`ApplyConfig`).
    pub method: &'static str,
    /// The command-line name operators know it by (`apply-config`).
    pub command: &'static str,
    /// The least role on the ladder that may call it.
    pub role: Role,
    /// Roles outside the ladder that may call it too (etcd:backup for snapshots).
    pub also: &'static [Role],
    /// Whether a node in maintenance mode (no config, no client certificates) serves it.
    pub maintenance: bool,
}

impl MethodAccess {
    /// Whether a caller with `role` may call this method.
    pub fn allows(&self, role: Role) -> bool {
        allows(role, self.role) || self.also.contains(&role)
    }

    /// The roles that may call it, for messages: `operator`, or `operator or etcd:backup`.
    pub fn needs(&self) -> String {
        std::iter::once(self.role)
            .chain(self.also.iter().copied())
            .map(Role::name)
            .collect::<Vec<_>>()
            .join(" or ")
    }
}

const fn access(
    method: &'static str,
    command: &'static str,
    role: Role,
    maintenance: bool,
) -> MethodAccess {
    MethodAccess {
        method,
        command,
        role,
        also: &[],
        maintenance,
    }
}

/// The access table: every method of the node API and the role it needs (Talos's split:
/// reads for readers, day-to-day operations for operators, anything that changes what the
/// node is for admins).
pub const ACCESS: &[MethodAccess] = &[
    access("Version", "version", Role::Reader, true),
    access("Health", "health", Role::Reader, false),
    access("Services", "services", Role::Reader, false),
    access("Logs", "logs", Role::Reader, false),
    access("Dmesg", "dmesg", Role::Reader, false),
    access("Get", "get", Role::Reader, false),
    access("Read", "read", Role::Reader, false),
    access("Containers", "containers", Role::Reader, false),
    access("Images", "image list", Role::Reader, false),
    access("ServiceAction", "service", Role::Operator, false),
    access("Reboot", "reboot", Role::Operator, false),
    access("Shutdown", "shutdown", Role::Operator, false),
    access("ImageImport", "image import", Role::Operator, false),
    access("ImagePull", "image pull", Role::Operator, false),
    access("ApplyConfig", "apply-config", Role::Admin, true),
    access(
        "ConfirmConfig",
        "apply-config --confirm",
        Role::Admin,
        false,
    ),
    access("Reset", "reset", Role::Admin, false),
    access("Time", "time", Role::Reader, false),
    access("Bootstrap", "bootstrap", Role::Admin, false),
    access("EtcdMembers", "etcd members", Role::Reader, false),
    access("EtcdStatus", "etcd status", Role::Reader, false),
    access("EtcdAlarmList", "etcd alarm list", Role::Reader, false),
    MethodAccess {
        method: "EtcdSnapshot",
        command: "etcd snapshot",
        role: Role::Operator,
        also: &[Role::EtcdBackup],
        maintenance: false,
    },
    access("EtcdDefrag", "etcd defrag", Role::Operator, false),
    access(
        "EtcdAlarmDisarm",
        "etcd alarm disarm",
        Role::Operator,
        false,
    ),
    access(
        "EtcdForfeitLeadership",
        "etcd forfeit-leadership",
        Role::Operator,
        false,
    ),
    access("EtcdLeave", "etcd leave", Role::Admin, false),
    access("EtcdRemoveMember", "etcd remove-member", Role::Admin, false),
    // The kubeconfig holds a new cluster-admin certificate: as much as the node API's admin.
    access("Kubeconfig", "kubeconfig", Role::Admin, false),
    // An upgrade replaces the node's code: as much as the node API's admin.
    access("Upgrade", "upgrade", Role::Admin, false),
    access("Rollback", "rollback", Role::Admin, false),
    access("UpgradeStatus", "upgrade status", Role::Reader, false),
];

/// The access table's row for a request path (`/keelson.machine.v1.Machine/Version`);
/// `None` for a path that is not a method of the node API.
pub fn access_for_path(path: &str) -> Option<&'static MethodAccess> {
    let method = path
        .strip_prefix('/')?
        .strip_prefix(SERVICE)?
        .strip_prefix('/')?;
    ACCESS.iter().find(|a| a.method == method)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_of_the_proto_declares_a_role_and_nothing_else_does() {
        for path in API_METHODS {
            assert!(
                access_for_path(path).is_some(),
                "{path} has no row in api::ACCESS: declare the role it needs"
            );
        }
        for row in ACCESS {
            let path = format!("/{SERVICE}/{}", row.method);
            assert!(
                API_METHODS.contains(&path.as_str()),
                "api::ACCESS names {path}, which the .proto does not define"
            );
        }
        assert_eq!(API_METHODS.len(), ACCESS.len());
    }

    #[test]
    fn the_table_follows_the_documented_split() {
        let check = |method: &str, role: Role| {
            let row = access_for_path(&format!("/{SERVICE}/{method}")).unwrap_or_else(|| {
                panic!("{method} missing");
            });
            assert_eq!(row.role, role, "{method}");
        };
        for m in [
            "Version",
            "Health",
            "Services",
            "Logs",
            "Dmesg",
            "Get",
            "Read",
            "Containers",
            "Time",
            "EtcdMembers",
            "EtcdStatus",
            "EtcdAlarmList",
        ] {
            check(m, Role::Reader);
        }
        for m in [
            "ServiceAction",
            "Reboot",
            "Shutdown",
            "ImageImport",
            "ImagePull",
            "EtcdSnapshot",
            "EtcdDefrag",
            "EtcdAlarmDisarm",
            "EtcdForfeitLeadership",
        ] {
            check(m, Role::Operator);
        }
        for m in [
            "ApplyConfig",
            "Reset",
            "ConfirmConfig",
            "Bootstrap",
            "EtcdLeave",
            "EtcdRemoveMember",
            "Kubeconfig",
        ] {
            check(m, Role::Admin);
        }
        // etcd:backup takes snapshots and does nothing else.
        let backup: Vec<&str> = ACCESS
            .iter()
            .filter(|a| a.allows(Role::EtcdBackup))
            .map(|a| a.method)
            .collect();
        assert_eq!(backup, ["EtcdSnapshot"]);
        let maintenance: Vec<&str> = ACCESS
            .iter()
            .filter(|a| a.maintenance)
            .map(|a| a.method)
            .collect();
        assert_eq!(maintenance, ["Version", "ApplyConfig"]);
    }

    #[test]
    fn roles_rank_admin_over_operator_over_reader() {
        assert!(allows(Role::Admin, Role::Reader));
        assert!(allows(Role::Operator, Role::Operator));
        assert!(!allows(Role::Reader, Role::Operator));
        assert!(!allows(Role::Operator, Role::Admin));
        assert!(!allows(Role::EtcdBackup, Role::Reader));
        assert!(
            allows(Role::Admin, Role::EtcdBackup) && allows(Role::EtcdBackup, Role::EtcdBackup)
        );
        assert_eq!(access_for_path("/other.Service/Version"), None);
        assert_eq!(access_for_path("/keelson.machine.v1.Machine/Nope"), None);
    }
}
