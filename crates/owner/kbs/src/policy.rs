//! Rego policies (regorus): the appraisal policy that turns claims into an
//! EAR-style result, and the resource policy deciding each release.

use std::sync::RwLock;

pub const DEFAULT_ATTESTATION_POLICY: &str = include_str!("../policies/attestation.rego");
pub const DEFAULT_RESOURCE_POLICY: &str = include_str!("../policies/resource.rego");

const ATTESTATION_RULE: &str = "data.kabuto.attestation.result";
const RESOURCE_RULE: &str = "data.kabuto.resource.allow";

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// A compiled policy; evaluation clones the engine (cheap, `arc` feature)
/// so concurrent requests never share mutable state.
pub struct Policy {
    engine: RwLock<regorus::Engine>,
    rule: &'static str,
}

fn compile(name: &str, rego: &str) -> Result<regorus::Engine, PolicyError> {
    let mut engine = regorus::Engine::new();
    engine
        .add_policy(name.to_string(), rego.to_string())
        .map_err(|e| PolicyError(format!("{name}: {e}")))?;
    Ok(engine)
}

impl Policy {
    pub fn attestation(rego: &str) -> Result<Self, PolicyError> {
        let policy = Policy {
            engine: RwLock::new(compile("attestation.rego", rego)?),
            rule: ATTESTATION_RULE,
        };
        Ok(policy)
    }

    pub fn resource(rego: &str) -> Result<Self, PolicyError> {
        Ok(Policy {
            engine: RwLock::new(compile("resource.rego", rego)?),
            rule: RESOURCE_RULE,
        })
    }

    /// Compiles `rego` and checks that it defines the rule this policy is
    /// queried for, before it replaces the current one.
    pub fn replace(&self, rego: &str) -> Result<(), PolicyError> {
        let name = if self.rule == ATTESTATION_RULE {
            "attestation.rego"
        } else {
            "resource.rego"
        };
        let engine = compile(name, rego)?;
        let package = self.rule.trim_start_matches("data.");
        let package = package.rsplit_once('.').map(|(p, _)| p).unwrap_or(package);
        if !rego.contains(&format!("package {package}")) {
            return Err(PolicyError(format!(
                "{name} must declare `package {package}` and define {}",
                self.rule
            )));
        }
        let mut current = self
            .engine
            .write()
            .map_err(|_| PolicyError("policy lock poisoned".into()))?;
        *current = engine;
        Ok(())
    }

    pub fn evaluate(
        &self,
        input: &serde_json::Value,
        data: &serde_json::Value,
    ) -> Result<serde_json::Value, PolicyError> {
        let mut engine = self
            .engine
            .read()
            .map_err(|_| PolicyError("policy lock poisoned".into()))?
            .clone();
        let to_value = |v: &serde_json::Value| {
            regorus::Value::from_json_str(&v.to_string()).map_err(|e| PolicyError(e.to_string()))
        };
        engine.set_input(to_value(input)?);
        engine
            .add_data(to_value(data)?)
            .map_err(|e| PolicyError(e.to_string()))?;
        let value = engine
            .eval_rule(self.rule.to_string())
            .map_err(|e| PolicyError(format!("evaluating {}: {e}", self.rule)))?;
        if value == regorus::Value::Undefined {
            return Ok(serde_json::Value::Null);
        }
        let json = value
            .to_json_str()
            .map_err(|e| PolicyError(e.to_string()))?;
        serde_json::from_str(&json).map_err(|e| PolicyError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn claims(measurement: &str, insecure: bool, debug: bool) -> serde_json::Value {
        json!({"claims": {"measurement": measurement, "init_data": "aa", "insecure": insecure, "debug": debug}})
    }

    #[test]
    fn default_appraisal() {
        let p = Policy::attestation(DEFAULT_ATTESTATION_POLICY).unwrap();
        let none = json!({"reference": {}});
        let r = p.evaluate(&claims("m1", false, false), &none).unwrap();
        assert_eq!(r["status"], "warning", "{r}"); // nothing registered
        let refs = json!({"reference": {"measurement": ["m1"], "init_data": ["aa"]}});
        let r = p.evaluate(&claims("m1", false, false), &refs).unwrap();
        assert_eq!(r["status"], "affirming", "{r}");
        let r = p.evaluate(&claims("m2", false, false), &refs).unwrap();
        assert_eq!(r["status"], "contraindicated");
        assert_eq!(r["trust_vector"]["executables"], 96);
        assert!(r["reasons"][0].as_str().unwrap().contains("measurement"));
        let r = p.evaluate(&claims("m1", true, false), &refs).unwrap();
        assert_eq!(r["status"], "warning");
        let r = p.evaluate(&claims("m1", false, true), &refs).unwrap();
        assert_eq!(r["status"], "contraindicated");
    }

    #[test]
    fn resource_policy_and_replacement() {
        let p = Policy::resource(DEFAULT_RESOURCE_POLICY).unwrap();
        let input =
            json!({"token": {"ear.status": "warning"}, "resource": {"repository": "default"}});
        assert_eq!(p.evaluate(&input, &json!({})).unwrap(), json!(true));
        assert!(p.replace("package other\nallow := true").is_err());
        assert!(p.replace("package kabuto.resource\nallow if {").is_err());
        p.replace("package kabuto.resource\nimport rego.v1\ndefault allow := false\nallow if input.resource.repository == \"other\"")
            .unwrap();
        assert_eq!(p.evaluate(&input, &json!({})).unwrap(), json!(false));
    }
}
