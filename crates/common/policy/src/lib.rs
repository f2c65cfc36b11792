//! The agent policy gate: a Rego policy (evaluated with regorus) decides
//! every agent request before it runs.
//!
//! For a request named `R` (its protobuf message name, e.g.
//! `CreateContainerRequest`) the gate evaluates `data.agent_policy.R` with
//! the request as `input`. The result must be a bool, or an object
//! `{"allowed": bool, "ops": [...], "reason": "..."}` where `ops` is a JSON
//! Patch (RFC 6902) applied to the policy state once the allowed request
//! *succeeded* ([`PolicyGate::judge`] then [`PolicyGate::commit`]): a request
//! that fails in its handler must not change how later requests are judged.
//! Rules read that state as `data.state`. Anything else is a deny.
//!
//! Policies use Rego v1 syntax (OPA 1.0: `if`, `contains`).

use std::num::{NonZeroU32, NonZeroUsize};

use thiserror::Error;

/// Every request allowed: pods that are not confidential.
pub const ALLOW_ALL: &str = include_str!("../policies/allow-all.rego");
/// What a confidential guest enforces from boot until its one CreateSandbox
/// succeeded: that request (and health checks), nothing else.
pub const CONFIDENTIAL_BOOT: &str = include_str!("../policies/confidential-boot.rego");
/// The pod network's requests as a confidential pod allows them (no
/// package line: appended to the confidential default and to every
/// generated policy).
pub const POD_NETWORK_RULES: &str = include_str!("../policies/pod-network.rego");
/// Deny by default: the starting point of confidential pods, with the pod
/// network's rules.
pub static DEFAULT_CONFIDENTIAL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{}\n{POD_NETWORK_RULES}",
        include_str!("../policies/default-confidential.rego")
    )
});
/// Every request denied: a confidential guest whose CreateSandbox failed.
pub const DENY_ALL: &str = include_str!("../policies/deny-all.rego");

#[derive(Debug, Error)]
pub enum PolicyError {
    #[error("the policy does not parse: {0}")]
    Parse(String),
    #[error("the policy must be `package agent_policy`, not {0}")]
    Package(String),
    #[error("{0:?} is not a request name")]
    RequestName(String),
    #[error("evaluating {request}: {reason}")]
    Eval { request: String, reason: String },
    #[error("the policy's state update no longer applies: {0}")]
    State(String),
}

/// The request as the policy sees it: the protobuf message as JSON (proto
/// field names, defaults included), with the fields that carry JSON (the OCI
/// spec, an exec's process, resources) expanded into objects. The spec
/// appears as `input.OCI`, as in Kata's policies. The error names the field
/// that is not JSON (never its content).
/// A request that cannot be turned into policy input.
#[derive(Debug, Error)]
pub enum InputError {
    #[error("request to JSON")]
    Print(#[source] protobuf_json_mapping::PrintError),
    #[error("request to JSON")]
    Json(#[source] serde_json::Error),
    #[error("{0} is not JSON")]
    NotJson(&'static str),
}

pub fn request_input(req: &dyn protobuf::MessageDyn) -> Result<serde_json::Value, InputError> {
    let options = protobuf_json_mapping::PrintOptions {
        proto_field_name: true,
        always_output_default_values: true,
        ..Default::default()
    };
    let text = protobuf_json_mapping::print_to_string_with_options(req, &options)
        .map_err(InputError::Print)?;
    let mut value: serde_json::Value = serde_json::from_str(&text).map_err(InputError::Json)?;
    if let Some(obj) = value.as_object_mut() {
        for (field, name) in [
            ("oci_spec", "OCI"),
            ("process", "process"),
            ("resources", "resources"),
        ] {
            let Some(encoded) = obj.get(field).and_then(|v| v.as_str()).map(String::from) else {
                continue;
            };
            let decoded = base64_decode(&encoded)
                .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
                .ok_or(InputError::NotJson(field))?;
            obj.remove(field);
            obj.insert(name.to_string(), decoded);
        }
    }
    Ok(value)
}

/// Standard base64, as protobuf's JSON mapping prints bytes.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// The outcome for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Denied { reason: Option<String> },
}

/// An allowed request's change to the policy state, applied with
/// [`PolicyGate::commit`] only after the request succeeded.
#[derive(Debug, Clone, PartialEq)]
#[must_use = "a state update does nothing until committed"]
pub struct StateUpdate {
    patch: json_patch::Patch,
}

/// A decision and, when allowed, the state update it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    pub decision: Decision,
    pub update: Option<StateUpdate>,
}

/// The input key that carries the policy state to the query (not a field
/// of any request: those are the protobuf messages' snake_case names).
const STATE_INPUT_KEY: &str = "__kabuto_policy_state";

/// Fills what the OCI spec leaves implicit in each of `input.OCI.mounts`
/// (`type` and `source` "", `options` []), as Kata's protobuf-derived input
/// has them: rules read the fields directly, cheaper than `object.get` in
/// a per-mount loop. Nothing present is changed.
fn fill_mount_defaults(input: &mut regorus::Value) {
    let Some(mounts) = input
        .as_object_mut()
        .ok()
        .and_then(|request| request.get_mut(&regorus::Value::from("OCI")))
        .and_then(|oci| oci.as_object_mut().ok())
        .and_then(|oci| oci.get_mut(&regorus::Value::from("mounts")))
        .and_then(|mounts| mounts.as_array_mut().ok())
    else {
        return;
    };
    for mount in mounts.iter_mut() {
        let Ok(mount) = mount.as_object_mut() else {
            continue;
        };
        for (key, default) in [
            ("type", regorus::Value::from("")),
            ("source", regorus::Value::from("")),
            ("options", regorus::Value::new_array()),
        ] {
            let key = regorus::Value::from(key);
            if !mount.contains_key(&key) {
                mount.insert(key, default);
            }
        }
    }
}

pub struct PolicyGate {
    engine: regorus::Engine,
    state: serde_json::Value,
    /// Requests whose rule is a constant `true`, so their decision needs
    /// neither the request as input nor the engine. Only known for the
    /// shipped allow-all policy (recognised by its exact text): building
    /// the input and evaluating costs a TCG guest milliseconds per request,
    /// on every exec and stream read of a non-confidential pod.
    always_allowed: Vec<&'static str>,
}

/// Generated policies list every container and layer; they are far larger
/// than what regorus accepts by default (1 MiB, 20 000 lines, 1024 columns).
fn length_limits() -> regorus::PolicyLengthConfig {
    regorus::PolicyLengthConfig {
        max_col: NonZeroU32::new(1 << 20).unwrap_or(NonZeroU32::MIN),
        max_file_bytes: NonZeroUsize::new(64 << 20).unwrap_or(NonZeroUsize::MIN),
        max_lines: NonZeroUsize::new(2_000_000).unwrap_or(NonZeroUsize::MIN),
    }
}

/// The state a policy starts from: its `initial_state` object if it defines
/// one, else `{}`. Rules that record per-key entries declare the parent
/// objects here, so every update is an `add` of its own key: two requests
/// judged against the same state then both apply, where the first one's
/// "create the whole object" would be replaced by the second's.
fn initial_state(
    engine: &mut regorus::Engine,
    rego: &str,
) -> Result<serde_json::Value, PolicyError> {
    // Evaluating an undefined rule is an error in regorus; only a policy
    // that names one is asked.
    if !rego.contains("initial_state") {
        return Ok(serde_json::json!({}));
    }
    let value = engine
        .eval_rule("data.agent_policy.initial_state".into())
        .map_err(|e| PolicyError::Parse(format!("initial_state: {e}")))?;
    let json = value
        .to_json_str()
        .map_err(|e| PolicyError::Parse(format!("initial_state: {e}")))?;
    match serde_json::from_str::<serde_json::Value>(&json) {
        Ok(state @ serde_json::Value::Object(_)) => Ok(state),
        _ => Err(PolicyError::Parse("initial_state must be an object".into())),
    }
}

impl PolicyGate {
    /// Parses `rego`; refuses anything but a parseable `package agent_policy`.
    pub fn new(rego: &str) -> Result<PolicyGate, PolicyError> {
        let mut engine = regorus::Engine::new();
        engine.set_policy_length_config(length_limits());
        let package = engine
            .add_policy("agent_policy.rego".into(), rego.into())
            .map_err(|e| PolicyError::Parse(e.to_string()))?;
        if package != "data.agent_policy" {
            return Err(PolicyError::Package(package));
        }
        let always_allowed = if rego == ALLOW_ALL {
            ALLOW_ALL
                .lines()
                .filter_map(|l| l.strip_prefix("default ")?.strip_suffix(" := true"))
                .collect()
        } else {
            Vec::new()
        };
        let state = initial_state(&mut engine, rego)?;
        Ok(PolicyGate {
            engine,
            state,
            always_allowed,
        })
    }

    pub fn allow_all() -> PolicyGate {
        // The shipped policy is tested to parse.
        PolicyGate::new(ALLOW_ALL).unwrap_or_else(|e| panic!("shipped allow-all policy: {e}"))
    }

    /// True when `request` is allowed whatever its input, so a caller may
    /// skip building the input for [`PolicyGate::decide`]. A false answer
    /// says nothing: the request must be decided.
    pub fn allows_without_input(&self, request: &str) -> bool {
        self.always_allowed.contains(&request)
    }

    /// The policy state rules read as `data.state`.
    pub fn state(&self) -> &serde_json::Value {
        &self.state
    }

    /// Decides one request and applies its state update at once: for
    /// callers (tests, benchmarks, genpolicy's checks) that do not run the
    /// request. The agent uses [`PolicyGate::judge`] and commits only what
    /// succeeded.
    pub fn decide(
        &mut self,
        request: &str,
        input: &serde_json::Value,
    ) -> Result<Decision, PolicyError> {
        let judgement = self.judge(request, input)?;
        if let Some(update) = judgement.update {
            self.commit(update)?;
        }
        Ok(judgement.decision)
    }

    /// Applies the state update of a request that succeeded. It was checked
    /// against the state at decision time; an update that no longer applies
    /// (another request changed the state in between) changes nothing and
    /// is an error.
    pub fn commit(&mut self, update: StateUpdate) -> Result<(), PolicyError> {
        let mut next = self.state.clone();
        json_patch::patch(&mut next, &update.patch)
            .map_err(|e| PolicyError::State(e.to_string()))?;
        self.state = next;
        Ok(())
    }

    /// Decides one request without changing the policy state. `request` is
    /// the message name; `input` the request as JSON.
    pub fn judge(
        &mut self,
        request: &str,
        input: &serde_json::Value,
    ) -> Result<Judgement, PolicyError> {
        if request.is_empty() || !request.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(PolicyError::RequestName(request.into()));
        }
        let eval_err = |reason: String| PolicyError::Eval {
            request: request.into(),
            reason,
        };
        let mut input = <regorus::Value as serde::Deserialize>::deserialize(input)
            .map_err(|e| eval_err(e.to_string()))?;
        fill_mount_defaults(&mut input);
        // The state reaches the rules as `data.state`, through `with` from
        // a reserved input key rather than as engine data: changing regorus'
        // data makes it re-analyse the whole policy on the next evaluation,
        // which for a generated policy costs more than the decision itself;
        // and a constant query is cheaper to parse than one carrying the
        // state as a literal.
        let state = <regorus::Value as serde::Deserialize>::deserialize(&self.state)
            .map_err(|e| eval_err(e.to_string()))?;
        input
            .as_object_mut()
            .map_err(|_| eval_err("the request is not a JSON object".into()))?
            .insert(regorus::Value::from(STATE_INPUT_KEY), state);
        self.engine.set_input(input);
        let query =
            format!("data.agent_policy.{request} with data.state as input.{STATE_INPUT_KEY}");
        // A rule that does not exist, or fails to evaluate, denies.
        let result = match self.engine.eval_query(query, false) {
            Ok(results) => results
                .result
                .into_iter()
                .next()
                .and_then(|r| r.expressions.into_iter().next())
                .map(|e| e.value)
                .unwrap_or(regorus::Value::Undefined),
            Err(e) => return Ok(denied(format!("no decision for {request}: {e}"))),
        };
        if result == regorus::Value::Undefined {
            return Ok(denied(format!("the policy has no rule for {request}")));
        }
        let json: serde_json::Value = result
            .to_json_str()
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null);
        Ok(self.interpret(request, json))
    }

    fn interpret(&self, request: &str, result: serde_json::Value) -> Judgement {
        let malformed = || {
            denied(format!(
                "the policy's result for {request} is not a bool or {{allowed, ops}}"
            ))
        };
        let allowed = |update| Judgement {
            decision: Decision::Allowed,
            update,
        };
        match result {
            serde_json::Value::Bool(true) => allowed(None),
            serde_json::Value::Bool(false) => Judgement {
                decision: Decision::Denied { reason: None },
                update: None,
            },
            serde_json::Value::Object(map) => {
                let Some(is_allowed) = map.get("allowed").and_then(|a| a.as_bool()) else {
                    return malformed();
                };
                if !is_allowed {
                    let reason = map.get("reason").and_then(|r| r.as_str()).map(String::from);
                    return Judgement {
                        decision: Decision::Denied { reason },
                        update: None,
                    };
                }
                let Some(ops) = map.get("ops") else {
                    return allowed(None);
                };
                let Ok(patch) = serde_json::from_value::<json_patch::Patch>(ops.clone()) else {
                    return malformed();
                };
                // Tried on a copy now, so a patch that cannot apply denies
                // the request rather than failing after it ran.
                let mut next = self.state.clone();
                if let Err(e) = json_patch::patch(&mut next, &patch) {
                    return denied(format!("the policy's state update failed: {e}"));
                }
                allowed(Some(StateUpdate { patch }))
            }
            _ => malformed(),
        }
    }
}

fn denied(reason: String) -> Judgement {
    Judgement {
        decision: Decision::Denied {
            reason: Some(reason),
        },
        update: None,
    }
}

#[cfg(test)]
mod tests;
