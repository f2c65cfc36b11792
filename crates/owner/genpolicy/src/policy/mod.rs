//! From one pod spec and its resolved images to the policy's data and Rego.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    image::{ImageConfig, ResolvedImage},
    manifest::{Container, PodSpec, SecurityContext},
    settings::{MountRule, Settings},
    GenPolicyError,
};

mod env;
mod process;

use env::{common_env, env_rule};

/// Why a container's rule cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("an env entry has no name")]
    EnvWithoutName,
    #[error("no command: neither the pod nor the image config gives one")]
    NoCommand,
    #[error(
        "the image runs as user {0:?}, a name genpolicy cannot resolve to a uid (it reads no \
         image layers): set securityContext.runAsUser (and runAsGroup) to its numeric ids, or \
         build the image with a numeric USER"
    )]
    NamedUser(String),
    #[error(
        "the image runs as group {0:?}, a name genpolicy cannot resolve to a gid: set \
         securityContext.runAsGroup to its numeric id"
    )]
    NamedGroup(String),
    #[error("volumeMount {0:?} names no volume of the pod")]
    NoVolume(String),
    #[error("volumeMount {name:?}: mountPath {path:?} is not absolute")]
    RelativeMount { name: String, path: String },
}

/// The fixed rules every generated policy carries.
pub const RULES: &str = include_str!("rules.rego");

/// What the policy allows for one container.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ContainerRule {
    pub name: String,
    /// Accepted values of the `io.kubernetes.cri.image-name` annotation;
    /// empty: any.
    pub images: Vec<String>,
    /// The exact args, when no argument depends on a run-time value.
    pub args_exact: Option<Vec<String>>,
    /// Otherwise one anchored regex per argument.
    pub args_patterns: Option<Vec<String>>,
    /// One regex every `NAME=value` must match: the literal variables, the
    /// patterns of those only known at run time, and what Kubernetes and the
    /// container manager inject — one alternation, so one match per variable.
    pub env: String,
    /// Fast paths through `env` (it decides; each of these accepts a subset
    /// of it): the literal variables, looked up instead of matched ...
    pub env_exact: BTreeMap<String, bool>,
    /// ... and, by variable name, the alternation of the parts of `env`
    /// that name the variable literally. regorus hands every `regex.match`
    /// a regex with an empty lazy-DFA cache, so a small regex is much
    /// cheaper than the whole alternation.
    pub env_by_name: BTreeMap<String, String>,
    pub cwd: String,
    /// None: not known before the image is unpacked (a user name).
    pub uid: Option<i64>,
    pub gid: Option<i64>,
    /// None: any (privileged, or `add: [ALL]`).
    pub capabilities: Option<Vec<String>>,
    pub privileged: bool,
    pub read_only_root: bool,
    pub no_new_privileges: bool,
    /// The root must be the pinned image, pulled by the guest (one
    /// `image_guest_pull` storage); false: a host-unpacked rootfs is accepted.
    pub guest_pull: bool,
    /// The pod's sysctls (securityContext.sysctls), the only ones allowed.
    pub sysctls: BTreeMap<String, String>,
    /// The pod asks for a seccomp filter (seccompProfile).
    pub seccomp: bool,
    /// By destination: the settings' default mounts, then the container's
    /// own (which replace a default at the same destination).
    pub mounts: BTreeMap<String, PolicyMount>,
    /// Commands exec may run in this container, exactly (written to
    /// `policy_data.exec`, which exec decisions read).
    #[serde(skip)]
    pub exec: Vec<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct PolicyData {
    pub namespace: String,
    /// The shared directory with a trailing `/`: bind sources start with it.
    pub shared_prefix: String,
    /// The rootfs directory with a trailing `/`: `root.path` is it plus the
    /// container id.
    pub rootfs_prefix: String,
    pub sandbox: ContainerRule,
    /// By container name.
    pub containers: BTreeMap<String, ContainerRule>,
    pub allowed_exec: Vec<Vec<String>>,
}

/// A mount rule as the rules read it: the allowed values of "is a bind",
/// the filesystem type unless `any_type`, and the options required.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PolicyMount {
    pub bind: Vec<bool>,
    #[serde(rename = "type")]
    pub kind: String,
    pub any_type: bool,
    /// Options the mount must carry: `ro` for read-only mounts.
    pub options: Vec<String>,
}

impl From<&MountRule> for PolicyMount {
    fn from(m: &MountRule) -> PolicyMount {
        // "": a bind (CRI shares the sandbox's /dev/shm) or, if not a
        // bind, a tmpfs (what a runtime mounts there itself).
        let (bind, kind, any_type) = match m.kind.as_str() {
            "bind" => (vec![true], "bind", true),
            "" => (vec![true, false], "tmpfs", false),
            other => (vec![false], other, false),
        };
        PolicyMount {
            bind,
            kind: kind.to_string(),
            any_type,
            options: if m.readonly {
                vec!["ro".into()]
            } else {
                vec![]
            },
        }
    }
}

/// Mounts keyed by destination; later ones replace earlier ones.
pub fn by_destination(mounts: &[MountRule]) -> BTreeMap<String, PolicyMount> {
    mounts
        .iter()
        .map(|m| (m.destination.clone(), PolicyMount::from(m)))
        .collect()
}

/// The rule for one of the pod's containers.
pub fn container_rule(
    settings: &Settings,
    pod: &PodSpec,
    container: &Container,
    image: &ResolvedImage,
    written_image: &str,
) -> Result<ContainerRule, GenPolicyError> {
    let err = |reason: RuleError| GenPolicyError::Container {
        name: container.name.clone(),
        reason,
    };
    let config: &ImageConfig = &image.config;
    let (env, vars) = env::container_env(settings, pod, container, config).map_err(err)?;
    let args = process::args(container, config, &vars).map_err(err)?;
    let cwd = container
        .working_dir
        .clone()
        .or(config.working_dir.clone())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    let (uid, gid) = process::ids(pod, container, config).map_err(err)?;
    let mounts = container_mounts(settings, pod, container, config).map_err(err)?;
    let sc = container.security_context.as_ref();
    let privileged = sc.and_then(|s| s.privileged).unwrap_or(false);
    let mut images = vec![image.pinned.clone()];
    if written_image != image.pinned {
        images.push(written_image.to_string());
    }
    Ok(ContainerRule {
        name: container.name.clone(),
        images,
        args_exact: args.exact,
        args_patterns: args.patterns,
        env: env.env,
        env_exact: env.env_exact,
        env_by_name: env.env_by_name,
        cwd,
        uid,
        gid,
        capabilities: if privileged {
            None
        } else {
            process::capabilities(settings, sc)
        },
        privileged,
        read_only_root: sc
            .and_then(|s| s.read_only_root_filesystem)
            .unwrap_or(false),
        no_new_privileges: sc.and_then(|s| s.allow_privilege_escalation) == Some(false),
        guest_pull: !settings.allow_host_rootfs,
        sysctls: process::pod_sysctls(pod),
        seccomp: process::wants_seccomp(pod, sc),
        mounts: by_destination(&[settings.default_mounts.as_slice(), &mounts].concat()),
        exec: container.exec_commands(),
    })
}

/// The container's own mounts: its volumeMounts, the service account
/// token, the termination log and the image's VOLUMEs.
fn container_mounts(
    settings: &Settings,
    pod: &PodSpec,
    container: &Container,
    config: &ImageConfig,
) -> Result<Vec<MountRule>, RuleError> {
    let mut mounts = Vec::new();
    for vm in &container.volume_mounts {
        let volume = pod
            .volumes
            .iter()
            .find(|v| v.name == vm.name)
            .ok_or_else(|| RuleError::NoVolume(vm.name.clone()))?;
        if !vm.mount_path.starts_with('/') {
            return Err(RuleError::RelativeMount {
                name: vm.name.clone(),
                path: vm.mount_path.clone(),
            });
        }
        mounts.push(MountRule::new(
            &vm.mount_path,
            "bind",
            vm.read_only || volume.always_readonly(),
        ));
    }
    let sa = &settings.service_account_mount;
    if pod.automount_service_account_token != Some(false)
        && !mounts.iter().any(|m| &m.destination == sa)
    {
        mounts.push(MountRule::new(sa, "bind", true));
    }
    let termination = container
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());
    mounts.push(MountRule::new(&termination, "bind", false));
    for volume in config.volumes.iter().flat_map(|v| v.keys()) {
        if !mounts.iter().any(|m| &m.destination == volume) {
            mounts.push(MountRule::new(volume, "bind", false));
        }
    }
    Ok(mounts)
}

/// The rule for the pod's pause container.
pub fn sandbox_rule(settings: &Settings, pod: &PodSpec) -> ContainerRule {
    let mut env = settings.sandbox.env.clone();
    env.extend(common_env(settings, pod));
    let env = env_rule(&env, &[]);
    ContainerRule {
        name: "(sandbox)".into(),
        images: settings.sandbox.images.clone(),
        args_exact: Some(settings.sandbox.args.clone()),
        args_patterns: None,
        env: env.env,
        env_exact: env.env_exact,
        env_by_name: env.env_by_name,
        cwd: "/".into(),
        uid: None,
        gid: None,
        capabilities: Some(settings.default_capabilities.clone()),
        privileged: false,
        read_only_root: false,
        no_new_privileges: false,
        // A confidential guest runs its own pause and ignores the host's
        // rootfs for it; other guests use the host's pause image.
        guest_pull: false,
        sysctls: process::pod_sysctls(pod),
        // Runs no code of the pod's (a confidential guest runs its own).
        seccomp: false,
        mounts: by_destination(&settings.default_mounts),
        exec: vec![],
    }
}

/// The complete Rego policy for `data`: the rules, the pod-wide values
/// (each its own rule, so a decision builds only those it reads), and
/// `policy_container`: the sandbox's, then the containers as an `else`
/// chain by name, so a decision builds only the container it is about.
pub fn rego(data: &PolicyData, settings: &Settings) -> Result<String, GenPolicyError> {
    let exec: BTreeMap<&str, &Vec<Vec<String>>> = data
        .containers
        .values()
        .map(|c| (c.name.as_str(), &c.exec))
        .collect();
    let exec_data = serde_json::json!({
        "allowed_exec": data.allowed_exec,
        "exec": exec,
    });
    let mut out = String::from("package agent_policy\n\n");
    out.push_str(RULES);
    out.push('\n');
    if settings.pod_network {
        out.push_str(kabuto_policy::POD_NETWORK_RULES);
    } else {
        out.push_str(
            "# settings.pod_network = false: the pod gets no network.\n\
             default UpdateInterfaceRequest := false\n\
             default UpdateRoutesRequest := false\n\
             default AddARPNeighborsRequest := false\n",
        );
    }
    out.push_str("\n# The pod, as genpolicy resolved it.\npolicy_namespace := ");
    out.push_str(&json(&data.namespace)?);
    out.push_str("\n\npolicy_shared_prefix := ");
    out.push_str(&json(&data.shared_prefix)?);
    out.push_str("\n\npolicy_rootfs_prefix := ");
    out.push_str(&json(&data.rootfs_prefix)?);
    out.push_str(
        "\n\n# What exec may run: by container name, and in any container.\npolicy_data := ",
    );
    out.push_str(&json(&exec_data)?);
    out.push_str("\n\n# Its containers: the sandbox's, and one `else` chain by name (evaluated\n# until one matches).\npolicy_container := ");
    out.push_str(&json(&data.sandbox)?);
    out.push_str(" if container_type == \"sandbox\"\n");
    for (i, c) in data.containers.values().enumerate() {
        out.push_str(if i == 0 {
            "\npolicy_container := "
        } else {
            "\nelse := "
        });
        out.push_str(&json(c)?);
        out.push_str(&format!(" if container_name == {}", json(c.name.as_str())?));
    }
    out.push_str("\n# Requests the rules above do not decide (settings.request_defaults).\n");
    for (name, allowed) in &settings.request_defaults {
        out.push_str(&format!("default {name} := {allowed}\n"));
    }
    Ok(out)
}

/// Pretty JSON, which is also a Rego literal.
fn json<T: Serialize + ?Sized>(value: &T) -> Result<String, GenPolicyError> {
    serde_json::to_string_pretty(value)
        .map_err(|e| GenPolicyError::Policy(format!("policy data: {e}")))
}

#[cfg(test)]
mod tests;
