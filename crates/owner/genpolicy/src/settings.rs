//! The defaults a user tunes: what the container manager adds to every
//! container (mounts, env, capabilities), the pause container, which
//! requests are allowed outright, and extra init-data files.
//!
//! The built-in values describe containerd's CRI plugin (Kubernetes). A
//! settings file is JSON; each top-level field it names replaces the
//! built-in one, fields it leaves out keep their default.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::GenPolicyError;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MountRule {
    pub destination: String,
    /// `bind`, a filesystem type (`proc`, `tmpfs`, ...), or "" for any.
    #[serde(default, rename = "type")]
    pub kind: String,
    /// The mount must carry the `ro` option.
    #[serde(default)]
    pub readonly: bool,
}

impl MountRule {
    pub fn new(destination: &str, kind: &str, readonly: bool) -> MountRule {
        MountRule {
            destination: destination.into(),
            kind: kind.into(),
            readonly,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SandboxSettings {
    /// The pause container's args.
    pub args: Vec<String>,
    /// Accepted pause image references; empty: any (the pause image is the
    /// container manager's choice, not the pod's).
    pub images: Vec<String>,
    /// Env patterns (regexes) of the pause container.
    pub env: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Digest algorithm of the init-data document: sha256, sha384, sha512.
    pub algorithm: String,
    /// Rewrite each container's `image:` to `repository@sha256:<digest>`, so
    /// the pod deploys exactly what the policy allows.
    pub pin_images: bool,
    /// Where the runtime shares host directories into the guest; bind
    /// mounts must come from there.
    pub shared_dir: String,
    /// Where the runtime puts each container's root in the guest
    /// (`<rootfs_dir>/<container id>`); `root.path` must be exactly that.
    pub rootfs_dir: String,
    /// Also accept containers whose root filesystem the host unpacked (no
    /// guest-pull storage). Off by default: a confidential pod's containers
    /// must run the pinned image the guest pulled itself, since a
    /// host-provided rootfs is whatever the host wants it to be. Only for
    /// pods whose host is trusted.
    pub allow_host_rootfs: bool,
    /// Mounts the container manager adds to every container.
    pub default_mounts: Vec<MountRule>,
    /// Env patterns (regexes) every container may carry: what the
    /// container manager and Kubernetes inject.
    pub default_env: Vec<String>,
    /// Env patterns of Kubernetes service links (`enableServiceLinks`,
    /// on unless the pod turns it off).
    pub service_link_env: Vec<String>,
    /// Capabilities a container has unless its securityContext changes them.
    pub default_capabilities: Vec<String>,
    /// Where Kubernetes mounts the service account token.
    pub service_account_mount: String,
    pub sandbox: SandboxSettings,
    /// Exec commands allowed in every container (args, exactly).
    pub allowed_exec: Vec<Vec<String>>,
    /// Decisions for the requests the generated rules do not decide.
    pub request_defaults: BTreeMap<String, bool>,
    /// Registries reached over plain HTTP (`host:port`).
    pub insecure_registries: Vec<String>,
    /// Local OCI image layouts searched before any registry.
    pub oci_layouts: Vec<String>,
    /// Extra init-data files, verbatim (e.g. `aa.toml` naming the KBS).
    pub init_data: BTreeMap<String, String>,
    /// The pod may get the network of its CNI namespace (UpdateInterface,
    /// UpdateRoutes, AddARPNeighbors on eth<N> NICs). Off: the host cannot
    /// give the pod's containers a network at all (a pod that only talks
    /// to its data hub), and the pod's creation fails where it tries.
    pub pod_network: bool,
}

/// Requests the generated rules decide themselves.
pub const RULE_DECIDED: &[&str] = &[
    "CreateContainerRequest",
    "ExecProcessRequest",
    "RemoveContainerRequest",
    "UpdateInterfaceRequest",
    "UpdateRoutesRequest",
    "AddARPNeighborsRequest",
];

const CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

impl Default for Settings {
    fn default() -> Settings {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let request_defaults = [
            ("CreateSandboxRequest", true),
            ("DestroySandboxRequest", true),
            ("StartContainerRequest", true),
            ("SignalProcessRequest", true),
            ("WaitProcessRequest", true),
            // `kubectl logs` reads the container's output.
            ("ReadStreamRequest", true),
            // stdin into a container could drive an interactive shell.
            ("WriteStreamRequest", false),
            ("CloseStdinRequest", true),
            ("TtyWinResizeRequest", true),
            ("ListProcessesRequest", true),
            ("StatsContainerRequest", true),
            ("UpdateContainerRequest", true),
            ("GetOOMEventRequest", true),
            ("GuestDetailsRequest", true),
            ("ListInterfacesRequest", true),
            ("ListRoutesRequest", true),
            ("SetPolicyRequest", false),
            ("CheckRequest", true),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Settings {
            algorithm: "sha256".into(),
            pin_images: true,
            shared_dir: "/run/kabuto/shared".into(),
            rootfs_dir: "/run/kabuto/rootfs".into(),
            allow_host_rootfs: false,
            default_mounts: vec![
                MountRule::new("/proc", "proc", false),
                MountRule::new("/dev", "tmpfs", false),
                MountRule::new("/dev/pts", "devpts", false),
                MountRule::new("/dev/mqueue", "mqueue", false),
                MountRule::new("/sys", "sysfs", true),
                MountRule::new("/sys/fs/cgroup", "cgroup", true),
                MountRule::new("/dev/shm", "", false),
                MountRule::new("/etc/hosts", "bind", false),
                MountRule::new("/etc/hostname", "bind", false),
                MountRule::new("/etc/resolv.conf", "bind", false),
            ],
            default_env: s(&[
                "^PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin$",
                "^HOSTNAME=[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                "^KUBERNETES_SERVICE_HOST=[0-9a-fA-F.:]+$",
                "^KUBERNETES_SERVICE_PORT=[0-9]+$",
                "^KUBERNETES_SERVICE_PORT_HTTPS=[0-9]+$",
                "^KUBERNETES_PORT=tcp://[0-9a-fA-F.:\\[\\]]+:[0-9]+$",
                "^KUBERNETES_PORT_443_TCP=tcp://[0-9a-fA-F.:\\[\\]]+:[0-9]+$",
                "^KUBERNETES_PORT_443_TCP_PROTO=tcp$",
                "^KUBERNETES_PORT_443_TCP_PORT=[0-9]+$",
                "^KUBERNETES_PORT_443_TCP_ADDR=[0-9a-fA-F.:]+$",
            ]),
            service_link_env: s(&[
                "^[A-Z_][A-Z0-9_]*_SERVICE_HOST=[0-9a-fA-F.:]+$",
                "^[A-Z_][A-Z0-9_]*_SERVICE_PORT(_[A-Z0-9_]+)?=[0-9]+$",
                "^[A-Z_][A-Z0-9_]*_PORT=(tcp|udp|sctp)://[0-9a-fA-F.:\\[\\]]+:[0-9]+$",
                "^[A-Z_][A-Z0-9_]*_PORT_[0-9]+_(TCP|UDP|SCTP)=(tcp|udp|sctp)://[0-9a-fA-F.:\\[\\]]+:[0-9]+$",
                "^[A-Z_][A-Z0-9_]*_PORT_[0-9]+_(TCP|UDP|SCTP)_PROTO=(tcp|udp|sctp)$",
                "^[A-Z_][A-Z0-9_]*_PORT_[0-9]+_(TCP|UDP|SCTP)_PORT=[0-9]+$",
                "^[A-Z_][A-Z0-9_]*_PORT_[0-9]+_(TCP|UDP|SCTP)_ADDR=[0-9a-fA-F.:]+$",
            ]),
            default_capabilities: s(CAPS),
            service_account_mount: "/var/run/secrets/kubernetes.io/serviceaccount".into(),
            sandbox: SandboxSettings {
                args: s(&["/pause"]),
                images: vec![],
                env: s(&[
                    "^PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin$",
                ]),
            },
            allowed_exec: vec![],
            request_defaults,
            insecure_registries: vec![],
            oci_layouts: vec![],
            init_data: BTreeMap::new(),
            pod_network: true,
        }
    }
}

impl Settings {
    /// Parses a settings file over the defaults.
    pub fn from_json(text: &str) -> Result<Settings, GenPolicyError> {
        let settings: Settings =
            serde_json::from_str(text).map_err(|e| GenPolicyError::Settings(e.to_string()))?;
        settings.check()?;
        Ok(settings)
    }

    pub fn check(&self) -> Result<(), GenPolicyError> {
        for name in self.request_defaults.keys() {
            if RULE_DECIDED.contains(&name.as_str()) {
                return Err(GenPolicyError::Settings(format!(
                    "request_defaults.{name}: decided by the generated rules, not a default"
                )));
            }
            if name.is_empty()
                || !name.ends_with("Request")
                || !name.chars().all(|c| c.is_ascii_alphanumeric())
            {
                return Err(GenPolicyError::Settings(format!(
                    "request_defaults: {name:?} is not a request name"
                )));
            }
        }
        if self.init_data.contains_key("policy.rego") {
            return Err(GenPolicyError::Settings(
                "init_data.\"policy.rego\": the policy is what genpolicy generates".into(),
            ));
        }
        if !self.shared_dir.starts_with('/') {
            return Err(GenPolicyError::Settings(format!(
                "shared_dir {:?} is not an absolute path",
                self.shared_dir
            )));
        }
        Ok(())
    }

    /// The built-in settings as a JSON document to start from.
    pub fn default_json() -> String {
        serde_json::to_string_pretty(&Settings::default()).unwrap_or_default()
    }
}
