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

/// A policy compiled together with the data it was last evaluated with;
/// data (reference values) rarely changes, so most evaluations reuse the
/// compiled form and only bind the input.
pub struct Policy {
    state: RwLock<Compiled>,
    rule: &'static str,
    name: &'static str,
}

/// A policy that compiled, not yet in force.
pub struct Prepared(Compiled);

struct Compiled {
    rego: String,
    data_json: String,
    policy: regorus::CompiledPolicy,
}

fn compile(name: &str, rule: &str, rego: &str, data_json: &str) -> Result<Compiled, PolicyError> {
    let mut engine = regorus::Engine::new();
    engine
        .add_policy(name.to_string(), rego.to_string())
        .map_err(|e| PolicyError(format!("{name}: {e}")))?;
    let data = regorus::Value::from_json_str(data_json).map_err(|e| PolicyError(e.to_string()))?;
    engine
        .add_data(data)
        .map_err(|e| PolicyError(e.to_string()))?;
    let policy = engine
        .compile_with_entrypoint(&rule.into())
        .map_err(|e| PolicyError(format!("{name}: {e}")))?;
    Ok(Compiled {
        rego: rego.to_string(),
        data_json: data_json.to_string(),
        policy,
    })
}

impl Policy {
    pub fn attestation(rego: &str) -> Result<Self, PolicyError> {
        Self::new("attestation.rego", ATTESTATION_RULE, rego)
    }

    pub fn resource(rego: &str) -> Result<Self, PolicyError> {
        Self::new("resource.rego", RESOURCE_RULE, rego)
    }

    fn new(name: &'static str, rule: &'static str, rego: &str) -> Result<Self, PolicyError> {
        Ok(Policy {
            state: RwLock::new(compile(name, rule, rego, "{}")?),
            rule,
            name,
        })
    }

    /// Compiles `rego` and checks that it declares the package this policy
    /// is queried in, before it replaces the current one.
    pub fn replace(&self, rego: &str) -> Result<(), PolicyError> {
        let compiled = self.prepare(rego)?;
        self.install(compiled)
    }

    /// Checks and compiles `rego` without putting it in force: a caller
    /// persists it first, then [`Policy::install`]s it, so a policy in force
    /// is always the one a restart loads.
    pub fn prepare(&self, rego: &str) -> Result<Prepared, PolicyError> {
        let package = self.rule.trim_start_matches("data.");
        let package = package.rsplit_once('.').map(|(p, _)| p).unwrap_or(package);
        if !rego.contains(&format!("package {package}")) {
            return Err(PolicyError(format!(
                "{} must declare `package {package}` and define {}",
                self.name, self.rule
            )));
        }
        let data_json = self
            .state
            .read()
            .map_err(|_| PolicyError("policy lock poisoned".into()))?
            .data_json
            .clone();
        Ok(Prepared(compile(self.name, self.rule, rego, &data_json)?))
    }

    /// Puts a prepared policy in force.
    pub fn install(&self, prepared: Prepared) -> Result<(), PolicyError> {
        *self
            .state
            .write()
            .map_err(|_| PolicyError("policy lock poisoned".into()))? = prepared.0;
        Ok(())
    }

    pub fn evaluate(
        &self,
        input: &serde_json::Value,
        data: &serde_json::Value,
    ) -> Result<serde_json::Value, PolicyError> {
        let data_json = data.to_string();
        let policy = {
            let state = self
                .state
                .read()
                .map_err(|_| PolicyError("policy lock poisoned".into()))?;
            if state.data_json == data_json {
                Some(state.policy.clone())
            } else {
                None
            }
        };
        let policy = match policy {
            Some(p) => p,
            None => {
                let mut state = self
                    .state
                    .write()
                    .map_err(|_| PolicyError("policy lock poisoned".into()))?;
                let recompiled = compile(self.name, self.rule, &state.rego, &data_json)?;
                *state = recompiled;
                state.policy.clone()
            }
        };
        let input = regorus::Value::from_json_str(&input.to_string())
            .map_err(|e| PolicyError(e.to_string()))?;
        let value = policy
            .eval_with_input(input)
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
    fn default_appraisal_fails_closed() {
        let p = Policy::attestation(DEFAULT_ATTESTATION_POLICY).unwrap();
        // Nothing registered: refused, and the reasons say what to register.
        let r = p
            .evaluate(&claims("m1", false, false), &json!({"reference": {}}))
            .unwrap();
        assert_eq!(r["status"], "contraindicated", "{r}");
        let reasons = r["reasons"].to_string();
        assert!(reasons.contains("\\\"measurement\\\""), "{reasons}");
        assert!(reasons.contains("\\\"init_data\\\""), "{reasons}");
        // Setting an empty list registers nothing that matches.
        let empty = json!({"reference": {"measurement": [], "init_data": []}});
        let r = p.evaluate(&claims("m1", false, false), &empty).unwrap();
        assert_eq!(r["status"], "contraindicated", "{r}");
        // Only the measurement registered: still refused.
        let half = json!({"reference": {"measurement": ["m1"]}});
        let r = p.evaluate(&claims("m1", false, false), &half).unwrap();
        assert_eq!(r["status"], "contraindicated", "{r}");
        assert_eq!(r["trust_vector"]["configuration"], 96);

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

    fn tdx_claims(rtmr: [&str; 4], status: &str) -> serde_json::Value {
        json!({"claims": {
            "platform": "intel-tdx", "measurement": "td", "init_data": "aa",
            "insecure": false, "debug": false,
            "tcb": {"status": status},
            "details": {"rtmr": rtmr},
        }})
    }

    #[test]
    fn tdx_appraisal_covers_the_rtmrs_and_the_tcb_status() {
        let p = Policy::attestation(DEFAULT_ATTESTATION_POLICY).unwrap();
        let good = ["r0", "r1", "r2", "r3"];
        let refs = json!({"reference": {
            "measurement": ["td"], "init_data": ["aa"],
            "rtmr0": ["r0"], "rtmr1": ["r1"], "rtmr2": ["r2"], "rtmr3": ["r3"],
        }});
        let r = p.evaluate(&tdx_claims(good, "UpToDate"), &refs).unwrap();
        assert_eq!(r["status"], "affirming", "{r}");
        // Another kernel command line (RTMR2): refused, naming the register.
        let r = p
            .evaluate(&tdx_claims(["r0", "r1", "evil", "r3"], "UpToDate"), &refs)
            .unwrap();
        assert_eq!(r["status"], "contraindicated", "{r}");
        assert!(r["reasons"].to_string().contains("RTMR2"), "{r}");
        // MRTD alone registered (the RTMRs not): refused.
        let mrtd_only = json!({"reference": {"measurement": ["td"], "init_data": ["aa"]}});
        let r = p
            .evaluate(&tdx_claims(good, "UpToDate"), &mrtd_only)
            .unwrap();
        assert_eq!(r["status"], "contraindicated", "{r}");
        // An out-of-date TCB is refused unless the owner accepts that status.
        let r = p.evaluate(&tdx_claims(good, "OutOfDate"), &refs).unwrap();
        assert_eq!(r["status"], "contraindicated", "{r}");
        assert_eq!(r["trust_vector"]["hardware"], 96);
        assert!(r["reasons"].to_string().contains("OutOfDate"), "{r}");
        let mut accepting = refs.clone();
        accepting["reference"]["tdx_tcb_status"] = json!(["OutOfDate"]);
        let r = p
            .evaluate(&tdx_claims(good, "OutOfDate"), &accepting)
            .unwrap();
        assert_eq!(r["status"], "affirming", "{r}");
    }

    #[test]
    fn snp_appraisal_needs_a_tcb_floor_and_no_migration_agent() {
        let p = Policy::attestation(DEFAULT_ATTESTATION_POLICY).unwrap();
        let snp = |microcode: u8, migrate_ma: bool| {
            json!({"claims": {
                "platform": "amd-sev-snp", "measurement": "m1", "init_data": "aa",
                "insecure": false, "debug": false,
                "tcb": {"bootloader": 4, "tee": 0, "snp": 24, "microcode": microcode},
                "details": {"migrate_ma": migrate_ma},
            }})
        };
        let mut refs = json!({"reference": {"measurement": ["m1"], "init_data": ["aa"]}});
        // No floor registered: refused, naming it.
        let r = p.evaluate(&snp(217, false), &refs).unwrap();
        assert_eq!(r["status"], "contraindicated", "{r}");
        assert!(r["reasons"].to_string().contains("snp_min_tcb"), "{r}");
        refs["reference"]["snp_min_tcb"] =
            json!([{"bootloader": 4, "tee": 0, "snp": 22, "microcode": 213}]);
        let r = p.evaluate(&snp(217, false), &refs).unwrap();
        assert_eq!(r["status"], "affirming", "{r}");
        // Older microcode than the floor (a host on known-broken firmware).
        let r = p.evaluate(&snp(209, false), &refs).unwrap();
        assert_eq!(r["status"], "contraindicated", "{r}");
        assert_eq!(r["trust_vector"]["hardware"], 96);
        // A migration agent allowed by the guest policy.
        let r = p.evaluate(&snp(217, true), &refs).unwrap();
        assert_eq!(r["status"], "contraindicated", "{r}");
        assert!(r["reasons"].to_string().contains("migration agent"), "{r}");
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
