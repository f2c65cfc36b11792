//! The env rule of a container: the image's and the pod's variables, what
//! Kubernetes and the container manager inject, as one alternation with
//! fast paths; and the `$(VAR)` expansion Kubernetes does.

use std::collections::BTreeMap;

use super::*;

/// A container's env rule: `env` (the alternation of `parts`, which
/// decides) and its fast paths.
pub(super) struct EnvRule {
    pub(super) env: String,
    pub(super) env_exact: BTreeMap<String, bool>,
    pub(super) env_by_name: BTreeMap<String, String>,
}

/// The env rule from its parts (regexes) and the literal variables among
/// them.
pub(super) fn env_rule(parts: &[String], exact: &[String]) -> EnvRule {
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
pub(super) fn literal_name(part: &str) -> Option<&str> {
    let (name, _) = part.strip_prefix('^').unwrap_or(part).split_once('=')?;
    let literal = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    literal.then_some(name)
}

/// One anchored regex matching any of `parts` (each a regex).
pub(super) fn alternation(parts: &[String]) -> String {
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
pub(super) fn expand(text: &str, vars: &BTreeMap<String, Option<String>>) -> String {
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
pub(super) fn expand_literal(
    text: &str,
    vars: &BTreeMap<String, Option<String>>,
) -> Option<String> {
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

pub(super) fn anchored(regex: &str) -> String {
    format!("(?s)^{regex}$")
}

/// The container's env rule, and the variables `$(VAR)` may name in its
/// args (None: known only at run time). Image env first; the pod's env
/// replaces variables of the same name.
pub(super) fn container_env(
    settings: &Settings,
    pod: &PodSpec,
    container: &Container,
    config: &ImageConfig,
) -> Result<(EnvRule, BTreeMap<String, Option<String>>), RuleError> {
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
            return Err(RuleError::EnvWithoutName);
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
    Ok((env_rule(&env_parts, &env_exact), vars))
}
