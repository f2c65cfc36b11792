//! A container's process: its args (Kubernetes' command/args over the
//! image's ENTRYPOINT/CMD), user and group, capabilities, sysctls and
//! seccomp.

use std::collections::BTreeMap;

use super::env::{anchored, expand, expand_literal};
use super::*;

/// `USER` of an image config → (uid, gid) when numeric.
pub(super) fn image_user(user: Option<&str>) -> (Option<i64>, Option<i64>) {
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

pub(super) fn cap_name(name: &str) -> String {
    let upper = name.to_ascii_uppercase();
    if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    }
}

pub(super) fn capabilities(
    settings: &Settings,
    sc: Option<&SecurityContext>,
) -> Option<Vec<String>> {
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
pub(super) fn pod_sysctls(pod: &PodSpec) -> BTreeMap<String, String> {
    pod.security_context
        .iter()
        .flat_map(|sc| &sc.sysctls)
        .map(|s| (s.name.clone(), s.value.clone()))
        .collect()
}

/// True when the container (or else the pod) asks for a seccomp filter.
pub(super) fn wants_seccomp(pod: &PodSpec, sc: Option<&SecurityContext>) -> bool {
    sc.and_then(|s| s.seccomp_profile.as_ref())
        .or(pod
            .security_context
            .as_ref()
            .and_then(|s| s.seccomp_profile.as_ref()))
        .is_some_and(|p| p.confines())
}

/// A container's args as the policy allows them: exactly, or (when one
/// depends on a run-time value) one anchored pattern per argument.
pub(super) struct Args {
    pub(super) exact: Option<Vec<String>>,
    pub(super) patterns: Option<Vec<String>>,
}

pub(super) fn args(
    container: &Container,
    config: &ImageConfig,
    vars: &BTreeMap<String, Option<String>>,
) -> Result<Args, RuleError> {
    let entrypoint = config.entrypoint.clone().unwrap_or_default();
    let cmd = config.cmd.clone().unwrap_or_default();
    let args: Vec<String> = match (&container.command, &container.args) {
        (Some(command), Some(args)) => command.iter().chain(args).cloned().collect(),
        (Some(command), None) => command.clone(),
        (None, Some(args)) => entrypoint.iter().chain(args).cloned().collect(),
        (None, None) => entrypoint.iter().chain(&cmd).cloned().collect(),
    };
    if args.is_empty() {
        return Err(RuleError::NoCommand);
    }
    let args_exact: Option<Vec<String>> = args.iter().map(|a| expand_literal(a, vars)).collect();
    let args_patterns = match args_exact {
        Some(_) => None,
        None => Some(args.iter().map(|a| anchored(&expand(a, vars))).collect()),
    };
    Ok(Args {
        exact: args_exact,
        patterns: args_patterns,
    })
}

/// The uid and gid the container runs as: the security contexts over the
/// image's USER.
pub(super) fn ids(
    pod: &PodSpec,
    container: &Container,
    config: &ImageConfig,
) -> Result<(Option<i64>, Option<i64>), RuleError> {
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
        return Err(RuleError::NamedUser(image_user_text.to_string()));
    }
    if gid.is_none() && named_group {
        return Err(RuleError::NamedGroup(image_user_text.to_string()));
    }
    Ok((uid, gid))
}
