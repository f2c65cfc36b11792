//! Rego policies (regorus): the appraisal policy that turns claims into an
//! EAR-style result, and the resource policy deciding each release.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

pub const DEFAULT_ATTESTATION_POLICY: &str = include_str!("../policies/attestation.rego");
pub const DEFAULT_RESOURCE_POLICY: &str = include_str!("../policies/resource.rego");

const ATTESTATION_RULES: &[&str] = &["data.kabuto.attestation.result"];
/// Ours, and trustee's (`package policy`, `allow`), so an owner's trustee
/// resource policy works unchanged.
const RESOURCE_RULES: &[&str] = &["data.kabuto.resource.allow", "data.policy.allow"];
/// Compiled variants kept per distinct `data` (reference values, and the
/// resource path trustee's policies read from `data`); beyond this many the
/// oldest is dropped.
const MAX_VARIANTS: usize = 256;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// A policy with its compiled forms, one per `data` it was evaluated with:
/// data (reference values, resource paths) takes few distinct values, so
/// most evaluations reuse a compiled form and only bind the input.
pub struct Policy {
    state: RwLock<Compiled>,
    rules: &'static [&'static str],
    name: &'static str,
}

/// A policy that compiled, not yet in force.
pub struct Prepared(Compiled);

struct Compiled {
    rego: String,
    /// The entry point this policy's package defines.
    rule: &'static str,
    variants: Mutex<Variants>,
}

/// Compiled forms by `data` (JSON), the oldest evicted first.
#[derive(Default)]
struct Variants {
    by_data: HashMap<String, regorus::CompiledPolicy>,
    order: std::collections::VecDeque<String>,
    /// Compilations so far (for tests).
    compiled: usize,
}

impl Variants {
    fn insert(&mut self, data_json: String, policy: regorus::CompiledPolicy) {
        if self.by_data.contains_key(&data_json) {
            return;
        }
        while self.order.len() >= MAX_VARIANTS {
            if let Some(oldest) = self.order.pop_front() {
                self.by_data.remove(&oldest);
            }
        }
        self.order.push_back(data_json.clone());
        self.by_data.insert(data_json, policy);
        self.compiled += 1;
    }
}

fn compile(
    name: &str,
    rule: &str,
    rego: &str,
    data_json: &str,
) -> Result<regorus::CompiledPolicy, PolicyError> {
    let mut engine = regorus::Engine::new();
    engine
        .add_policy(name.to_string(), rego.to_string())
        .map_err(|e| PolicyError(format!("{name}: {e}")))?;
    let data = regorus::Value::from_json_str(data_json).map_err(|e| PolicyError(e.to_string()))?;
    engine
        .add_data(data)
        .map_err(|e| PolicyError(e.to_string()))?;
    engine
        .compile_with_entrypoint(&rule.into())
        .map_err(|e| PolicyError(format!("{name}: {e}")))
}

/// The package a Rego module declares (its first `package` line).
fn declared_package(rego: &str) -> Option<&str> {
    rego.lines()
        .map(str::trim)
        .find_map(|line| line.strip_prefix("package "))
        .map(str::trim)
}

impl Policy {
    pub fn attestation(rego: &str) -> Result<Self, PolicyError> {
        Self::new("attestation.rego", ATTESTATION_RULES, rego)
    }

    pub fn resource(rego: &str) -> Result<Self, PolicyError> {
        Self::new("resource.rego", RESOURCE_RULES, rego)
    }

    fn new(
        name: &'static str,
        rules: &'static [&'static str],
        rego: &str,
    ) -> Result<Self, PolicyError> {
        let policy = Policy {
            state: RwLock::new(Compiled {
                rego: String::new(),
                rule: rules[0],
                variants: Mutex::default(),
            }),
            rules,
            name,
        };
        policy.replace(rego)?;
        Ok(policy)
    }

    /// Compiles `rego` and checks that it declares a package this policy
    /// is queried in, before it replaces the current one.
    pub fn replace(&self, rego: &str) -> Result<(), PolicyError> {
        let compiled = self.prepare(rego)?;
        self.install(compiled)
    }

    /// Checks and compiles `rego` without putting it in force: a caller
    /// persists it first, then [`Policy::install`]s it, so a policy in force
    /// is always the one a restart loads.
    pub fn prepare(&self, rego: &str) -> Result<Prepared, PolicyError> {
        let package_of = |rule: &str| {
            let path = rule.trim_start_matches("data.");
            path.rsplit_once('.')
                .map(|(p, _)| p)
                .unwrap_or(path)
                .to_string()
        };
        // Resource policies once read the token as `input.token`; the
        // input is the token's claims now. Such a policy would still
        // compile, and a negated check in it would quietly allow.
        if self.rules == RESOURCE_RULES
            && (rego.contains("input.token") || rego.contains("input[\"token\"]"))
        {
            return Err(PolicyError(format!(
                "{} reads input.token, which this KBS no longer provides: the input is the \
                 token's claims (input.submods.cpu0[\"ear.status\"], ...) plus input.resource; \
                 rewrite the policy",
                self.name
            )));
        }
        let declared = declared_package(rego);
        let rule = self
            .rules
            .iter()
            .find(|rule| declared == Some(package_of(rule).as_str()))
            .ok_or_else(|| {
                let wanted: Vec<String> = self
                    .rules
                    .iter()
                    .map(|r| format!("`package {}` defining {r}", package_of(r)))
                    .collect();
                PolicyError(format!(
                    "{} must declare {}",
                    self.name,
                    wanted.join(", or ")
                ))
            })?;
        // Compiled against empty data as a check; evaluation compiles the
        // variant for its data.
        let checked = compile(self.name, rule, rego, "{}")?;
        let mut variants = Variants::default();
        variants.insert("{}".to_string(), checked);
        Ok(Prepared(Compiled {
            rego: rego.to_string(),
            rule,
            variants: Mutex::new(variants),
        }))
    }

    /// How many compiled forms the policy in force has made.
    #[cfg(test)]
    fn compilations(&self) -> usize {
        self.state
            .read()
            .map(|s| s.variants.lock().map(|v| v.compiled).unwrap_or(0))
            .unwrap_or(0)
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
        let poisoned = || PolicyError("policy lock poisoned".into());
        let (policy, rule) = {
            let state = self.state.read().map_err(|_| poisoned())?;
            let cached = state
                .variants
                .lock()
                .map_err(|_| poisoned())?
                .by_data
                .get(&data_json)
                .cloned();
            let policy = match cached {
                Some(policy) => policy,
                None => {
                    let policy = compile(self.name, state.rule, &state.rego, &data_json)?;
                    state
                        .variants
                        .lock()
                        .map_err(|_| poisoned())?
                        .insert(data_json, policy.clone());
                    policy
                }
            };
            (policy, state.rule)
        };
        let input = regorus::Value::from_json_str(&input.to_string())
            .map_err(|e| PolicyError(e.to_string()))?;
        let value = policy
            .eval_with_input(input)
            .map_err(|e| PolicyError(format!("evaluating {rule}: {e}")))?;
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
        let input = json!({"submods": {"cpu0": {"ear.status": "warning"}}, "resource": {"repository": "default"}});
        assert_eq!(p.evaluate(&input, &json!({})).unwrap(), json!(true));
        assert!(p.replace("package other\nallow := true").is_err());
        assert!(p.replace("package kabuto.resource\nallow if {").is_err());
        p.replace("package kabuto.resource\nimport rego.v1\ndefault allow := false\nallow if input.resource.repository == \"other\"")
            .unwrap();
        assert_eq!(p.evaluate(&input, &json!({})).unwrap(), json!(false));
    }

    /// A resource policy written for trustee (`package policy`, the token's
    /// EAR claims as input, the path in `data["resource-path"]`) runs as is,
    /// each path's variant compiled once.
    #[test]
    fn trustee_resource_policies_run_unchanged() {
        let trustee = r#"package policy
import rego.v1
default allow = false
allow if {
    input["submods"]["cpu0"]["ear.status"] == "affirming"
    startswith(data["resource-path"], "default/")
}
"#;
        let p = Policy::resource(trustee).unwrap();
        let token = |status: &str| json!({"submods": {"cpu0": {"ear.status": status}}});
        let data = |path: &str| json!({"resource-path": path, "plugin": "resource"});
        assert_eq!(
            p.evaluate(&token("affirming"), &data("default/key/1"))
                .unwrap(),
            json!(true)
        );
        assert_eq!(
            p.evaluate(&token("warning"), &data("default/key/1"))
                .unwrap(),
            json!(false)
        );
        assert_eq!(
            p.evaluate(&token("affirming"), &data("other/key/1"))
                .unwrap(),
            json!(false)
        );
        // Each path's variant was compiled once (and the check at install).
        assert_eq!(p.compilations(), 3);
        let err = Policy::resource("package elsewhere\nallow := true")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("`package policy`"), "{err}");
    }

    /// A resource policy written for the old input (`input.token`) is
    /// refused rather than left to quietly allow.
    #[test]
    fn resource_policies_for_the_old_input_are_refused() {
        let old = "package kabuto.resource\nimport rego.v1\ndefault allow := true\nallow := false if input.token.claims.insecure\n";
        let err = Policy::resource(old).err().unwrap().to_string();
        assert!(err.contains("input.token"), "{err}");
        let p = Policy::resource(DEFAULT_RESOURCE_POLICY).unwrap();
        assert!(p.replace(old).is_err());
    }

    /// At most MAX_VARIANTS compiled forms are kept; the oldest goes first.
    #[test]
    fn compiled_variants_are_bounded() {
        let p = Policy::resource(DEFAULT_RESOURCE_POLICY).unwrap();
        let input = json!({"submods": {"cpu0": {"ear.status": "affirming"}}});
        for i in 0..MAX_VARIANTS + 10 {
            p.evaluate(&input, &json!({"resource-path": format!("a/b/{i}")}))
                .unwrap();
        }
        let state = p.state.read().unwrap();
        let variants = state.variants.lock().unwrap();
        assert_eq!(variants.by_data.len(), MAX_VARIANTS);
        assert!(!variants
            .by_data
            .contains_key(&json!({"resource-path": "a/b/0"}).to_string()));
    }
}
