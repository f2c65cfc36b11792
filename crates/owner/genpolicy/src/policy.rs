//! From one pod spec and its resolved images to the policy's data and Rego.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    image::{ImageConfig, ResolvedImage},
    manifest::{Container, PodSpec, SecurityContext},
    settings::{MountRule, Settings},
    GenPolicyError,
};

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

/// A container's env rule: `env` (the alternation of `parts`, which
/// decides) and its fast paths.
struct EnvRule {
    env: String,
    env_exact: BTreeMap<String, bool>,
    env_by_name: BTreeMap<String, String>,
}

/// The env rule from its parts (regexes) and the literal variables among
/// them.
fn env_rule(parts: &[String], exact: &[String]) -> EnvRule {
    let mut by_name: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for part in parts {
        if let Some(name) = literal_name(part) {
            by_name.entry(name).or_default().push(part.clone());
        }
    }
    EnvRule {
        env: alternation(parts),
        env_exact: exact.iter().map(|e| (e.clone(), true)).collect(),
        env_by_name: by_name
            .into_iter()
            .map(|(name, parts)| (name.to_string(), alternation(&parts)))
            .collect(),
    }
}

/// The variable name a pattern part spells out literally before its `=`
/// (`^TOKEN=.*$` → `TOKEN`); None when the name is itself a pattern.
/// Only speed depends on this: a part filed under a name it does not match
/// just makes that fast path miss.
fn literal_name(part: &str) -> Option<&str> {
    let (name, _) = part.strip_prefix('^').unwrap_or(part).split_once('=')?;
    let literal = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    literal.then_some(name)
}

/// One anchored regex matching any of `parts` (each a regex).
fn alternation(parts: &[String]) -> String {
    let inner: Vec<String> = parts.iter().map(|p| format!("(?:{p})")).collect();
    format!("(?s)^(?:{})$", inner.join("|"))
}

/// The env patterns common to all of `pod`'s containers.
pub fn common_env(settings: &Settings, pod: &PodSpec) -> Vec<String> {
    let mut env = settings.default_env.clone();
    if pod.enable_service_links != Some(false) {
        env.extend(settings.service_link_env.iter().cloned());
    }
    env
}

/// `text` as a regex matching exactly itself.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Kubernetes' `$(VAR)` expansion in command, args and env values, as a
/// regex: a variable with a literal value is substituted, one whose value is
/// only known at run time (valueFrom) matches anything, an unknown one stays
/// as written; `$$` is a literal `$`.
fn expand(text: &str, vars: &BTreeMap<String, Option<String>>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&escape(&rest[..pos]));
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push_str(&escape("$"));
            rest = after;
            continue;
        }
        if let Some(inner) = tail.strip_prefix("$(") {
            if let Some(end) = inner.find(')') {
                let name = &inner[..end];
                match vars.get(name) {
                    Some(Some(value)) => out.push_str(&escape(value)),
                    Some(None) => out.push_str(".*"),
                    None => out.push_str(&escape(&tail[..end + 3])),
                }
                rest = &inner[end + 1..];
                continue;
            }
        }
        out.push_str(&escape("$"));
        rest = &tail[1..];
    }
    out.push_str(&escape(rest));
    out
}

/// The same expansion as plain text, when it needs no run-time value.
fn expand_literal(text: &str, vars: &BTreeMap<String, Option<String>>) -> Option<String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
            continue;
        }
        if let Some(inner) = tail.strip_prefix("$(") {
            if let Some(end) = inner.find(')') {
                match vars.get(&inner[..end]) {
                    Some(Some(value)) => out.push_str(value),
                    Some(None) => return None,
                    None => out.push_str(&tail[..end + 3]),
                }
                rest = &inner[end + 1..];
                continue;
            }
        }
        out.push('$');
        rest = &tail[1..];
    }
    out.push_str(rest);
    Some(out)
}

fn anchored(regex: &str) -> String {
    format!("(?s)^{regex}$")
}

/// `USER` of an image config → (uid, gid) when numeric.
fn image_user(user: Option<&str>) -> (Option<i64>, Option<i64>) {
    let user = user.unwrap_or("");
    if user.is_empty() {
        return (Some(0), Some(0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let uid = u.parse::<i64>().ok();
    let gid = match g {
        Some(g) => g.parse::<i64>().ok(),
        // A numeric uid alone: containerd looks the group up in the image's
        // /etc/passwd, which only the image's layers know.
        None => None,
    };
    (uid, gid)
}

fn cap_name(name: &str) -> String {
    let upper = name.to_ascii_uppercase();
    if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    }
}

fn capabilities(settings: &Settings, sc: Option<&SecurityContext>) -> Option<Vec<String>> {
    let caps = sc.and_then(|s| s.capabilities.clone()).unwrap_or_default();
    if caps.add.iter().any(|c| c.eq_ignore_ascii_case("ALL")) {
        return None;
    }
    let drop_all = caps.drop.iter().any(|c| c.eq_ignore_ascii_case("ALL"));
    let dropped: Vec<String> = caps.drop.iter().map(|c| cap_name(c)).collect();
    let mut out: Vec<String> = if drop_all {
        vec![]
    } else {
        settings
            .default_capabilities
            .iter()
            .filter(|c| !dropped.contains(c))
            .cloned()
            .collect()
    };
    for add in &caps.add {
        let add = cap_name(add);
        if !out.contains(&add) {
            out.push(add);
        }
    }
    Some(out)
}

/// The pod's sysctls, by name.
fn pod_sysctls(pod: &PodSpec) -> BTreeMap<String, String> {
    pod.security_context
        .iter()
        .flat_map(|sc| &sc.sysctls)
        .map(|s| (s.name.clone(), s.value.clone()))
        .collect()
}

/// True when the container (or else the pod) asks for a seccomp filter.
fn wants_seccomp(pod: &PodSpec, sc: Option<&SecurityContext>) -> bool {
    sc.and_then(|s| s.seccomp_profile.as_ref())
        .or(pod
            .security_context
            .as_ref()
            .and_then(|s| s.seccomp_profile.as_ref()))
        .is_some_and(|p| p.confines())
}

/// The rule for one of the pod's containers.
pub fn container_rule(
    settings: &Settings,
    pod: &PodSpec,
    container: &Container,
    image: &ResolvedImage,
    written_image: &str,
) -> Result<ContainerRule, GenPolicyError> {
    let err = |reason: String| GenPolicyError::Manifest {
        what: format!("container {:?}", container.name),
        reason,
    };
    let config: &ImageConfig = &image.config;

    // Env: image first, the pod's env replaces variables of the same name.
    enum Allowed {
        Exact(String),
        Pattern(String),
    }
    let mut env: BTreeMap<String, Allowed> = BTreeMap::new();
    for var in config.env.iter().flatten() {
        let name = var.split('=').next().unwrap_or_default().to_string();
        env.insert(name, Allowed::Exact(var.clone()));
    }
    let mut vars: BTreeMap<String, Option<String>> = BTreeMap::new();
    for var in &container.env {
        if var.name.is_empty() {
            return Err(err("an env entry has no name".into()));
        }
        let allowed = match (&var.value, &var.value_from) {
            (_, Some(_)) => {
                vars.insert(var.name.clone(), None);
                Allowed::Pattern(format!("{}=.*", escape(&var.name)))
            }
            (value, None) => {
                let value = value.clone().unwrap_or_default();
                let allowed = match expand_literal(&value, &vars) {
                    Some(v) => Allowed::Exact(format!("{}={v}", var.name)),
                    None => {
                        Allowed::Pattern(format!("{}={}", escape(&var.name), expand(&value, &vars)))
                    }
                };
                // Later references see the expanded value.
                vars.insert(var.name.clone(), expand_literal(&value, &vars));
                allowed
            }
        };
        env.insert(var.name.clone(), allowed);
    }
    if container.tty {
        env.insert("TERM".into(), Allowed::Exact("TERM=xterm".into()));
    }
    let mut env_exact = Vec::new();
    let mut env_parts: Vec<String> = env
        .into_values()
        .map(|allowed| match allowed {
            Allowed::Exact(e) => {
                let part = escape(&e);
                env_exact.push(e);
                part
            }
            Allowed::Pattern(p) => p,
        })
        .collect();
    for from in &container.env_from {
        env_parts.push(format!(
            "{}[A-Za-z_][A-Za-z0-9_.-]*=.*",
            escape(&from.prefix)
        ));
    }
    env_parts.extend(common_env(settings, pod));
    let env = env_rule(&env_parts, &env_exact);

    // Args: Kubernetes' rules for command/args over ENTRYPOINT/CMD.
    let entrypoint = config.entrypoint.clone().unwrap_or_default();
    let cmd = config.cmd.clone().unwrap_or_default();
    let args: Vec<String> = match (&container.command, &container.args) {
        (Some(command), Some(args)) => command.iter().chain(args).cloned().collect(),
        (Some(command), None) => command.clone(),
        (None, Some(args)) => entrypoint.iter().chain(args).cloned().collect(),
        (None, None) => entrypoint.iter().chain(&cmd).cloned().collect(),
    };
    if args.is_empty() {
        return Err(err(
            "no command: neither the pod nor the image config gives one".into(),
        ));
    }
    let args_exact: Option<Vec<String>> = args.iter().map(|a| expand_literal(a, &vars)).collect();
    let args_patterns = match args_exact {
        Some(_) => None,
        None => Some(args.iter().map(|a| anchored(&expand(a, &vars))).collect()),
    };

    let cwd = container
        .working_dir
        .clone()
        .or(config.working_dir.clone())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());

    let pod_sc = pod.security_context.as_ref();
    let sc = container.security_context.as_ref();
    let (image_uid, image_gid) = image_user(config.user.as_deref());
    let uid = sc
        .and_then(|s| s.run_as_user)
        .or(pod_sc.and_then(|s| s.run_as_user));
    let gid = sc
        .and_then(|s| s.run_as_group)
        .or(pod_sc.and_then(|s| s.run_as_group));
    let (uid, gid) = match uid {
        // runAsUser without runAsGroup: the group still comes from the image.
        Some(uid) => (Some(uid), gid.or(image_gid.filter(|_| image_uid.is_some()))),
        None => (image_uid, gid.or(image_gid)),
    };
    // A user or group the image names (`USER nginx`, `USER 10:staff`) is
    // resolved by the host from the rootfs' /etc/passwd and /etc/group,
    // which genpolicy does not read (it fetches no layers): pinning nothing
    // would let the host run the container as any uid, root included.
    // Refused, with the fix.
    let image_user_text = config.user.as_deref().unwrap_or("");
    let (named_user, named_group) = match image_user_text.split_once(':') {
        Some((u, g)) => (u.parse::<i64>().is_err(), g.parse::<i64>().is_err()),
        None => (
            !image_user_text.is_empty() && image_user_text.parse::<i64>().is_err(),
            false,
        ),
    };
    if uid.is_none() && named_user {
        return Err(err(format!(
            "the image runs as user {image_user_text:?}, a name genpolicy cannot resolve to a uid (it reads no image layers): set securityContext.runAsUser (and runAsGroup) to its numeric ids, or build the image with a numeric USER"
        )));
    }
    if gid.is_none() && named_group {
        return Err(err(format!(
            "the image runs as group {image_user_text:?}, a name genpolicy cannot resolve to a gid: set securityContext.runAsGroup to its numeric id"
        )));
    }
    let privileged = sc.and_then(|s| s.privileged).unwrap_or(false);

    let mut mounts = Vec::new();
    for vm in &container.volume_mounts {
        let volume = pod
            .volumes
            .iter()
            .find(|v| v.name == vm.name)
            .ok_or_else(|| {
                err(format!(
                    "volumeMount {:?} names no volume of the pod",
                    vm.name
                ))
            })?;
        if !vm.mount_path.starts_with('/') {
            return Err(err(format!(
                "volumeMount {:?}: mountPath {:?} is not absolute",
                vm.name, vm.mount_path
            )));
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

    let mut images = vec![image.pinned.clone()];
    if written_image != image.pinned {
        images.push(written_image.to_string());
    }
    Ok(ContainerRule {
        name: container.name.clone(),
        images,
        args_exact,
        args_patterns,
        env: env.env,
        env_exact: env.env_exact,
        env_by_name: env.env_by_name,
        cwd,
        uid,
        gid,
        capabilities: if privileged {
            None
        } else {
            capabilities(settings, sc)
        },
        privileged,
        read_only_root: sc
            .and_then(|s| s.read_only_root_filesystem)
            .unwrap_or(false),
        no_new_privileges: sc.and_then(|s| s.allow_privilege_escalation) == Some(false),
        guest_pull: !settings.allow_host_rootfs,
        sysctls: pod_sysctls(pod),
        seccomp: wants_seccomp(pod, sc),
        mounts: by_destination(&[settings.default_mounts.as_slice(), &mounts].concat()),
        exec: container.exec_commands(),
    })
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
        sysctls: pod_sysctls(pod),
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
mod tests {
    use super::*;

    #[test]
    fn expansion_follows_kubernetes() {
        let vars: BTreeMap<String, Option<String>> = [
            ("A".to_string(), Some("x.y".to_string())),
            ("S".to_string(), None),
        ]
        .into_iter()
        .collect();
        assert_eq!(expand("$(A)-$(S)", &vars), "x\\.y\\-.*");
        assert_eq!(expand("$$(A)", &vars), "\\$\\(A\\)");
        assert_eq!(expand("$(UNSET) $", &vars), "\\$\\(UNSET\\) \\$");
        assert_eq!(
            expand_literal("$(A)/$$(A)/$(UNSET)", &vars).as_deref(),
            Some("x.y/$(A)/$(UNSET)")
        );
        assert_eq!(expand_literal("$(S)", &vars), None);
    }

    #[test]
    fn image_users() {
        assert_eq!(image_user(None), (Some(0), Some(0)));
        assert_eq!(image_user(Some("10:20")), (Some(10), Some(20)));
        assert_eq!(image_user(Some("10")), (Some(10), None));
        assert_eq!(image_user(Some("nginx")), (None, None));
    }

    #[test]
    fn capabilities_follow_the_security_context() {
        let s = Settings::default();
        let sc = |add: &[&str], drop: &[&str]| SecurityContext {
            capabilities: Some(crate::manifest::Capabilities {
                add: add.iter().map(|x| x.to_string()).collect(),
                drop: drop.iter().map(|x| x.to_string()).collect(),
            }),
            ..Default::default()
        };
        let caps = capabilities(&s, Some(&sc(&["NET_ADMIN"], &["ALL"]))).expect("some");
        assert_eq!(caps, vec!["CAP_NET_ADMIN".to_string()]);
        let caps = capabilities(&s, Some(&sc(&[], &["chown"]))).expect("some");
        assert!(!caps.contains(&"CAP_CHOWN".to_string()));
        assert_eq!(caps.len(), s.default_capabilities.len() - 1);
        assert_eq!(capabilities(&s, Some(&sc(&["ALL"], &[]))), None);
    }
}
