//! What a pod's init-data decides, computed without touching the guest:
//! the policy the gate runs and, in a confidential pod, the KBS its
//! `aa.toml` names. CreateSandbox then applies it (TEE binding, KBS
//! client, gate, image settings).

use kabuto_attestation_agent::TeeKind;
use kabuto_initdata::InitData;

use crate::confidential::{self, ConfidentialError, KbsSettings};

/// The decisions of one pod's init-data.
#[derive(Debug)]
pub struct PodSetup {
    /// The Rego the policy gate runs: the init-data's, else (confidential
    /// pods) the confidential default; `None`: the boot policy is lifted.
    pub policy: Option<String>,
    /// Where a confidential pod attests, from `aa.toml`.
    pub kbs: Option<KbsSettings>,
    /// Hex digest of the init-data (empty without one).
    pub init_data_digest: String,
}

impl PodSetup {
    /// From the parsed init-data and the TEE the guest runs in (`None`: not
    /// a confidential guest, whose `aa.toml` is ignored).
    pub fn from_init_data(
        init_data: Option<&InitData>,
        tee: Option<TeeKind>,
    ) -> Result<PodSetup, ConfidentialError> {
        let confidential = tee.is_some();
        let policy = init_data
            .and_then(|d| d.policy())
            .map(str::to_owned)
            .or_else(|| confidential.then(|| kabuto_policy::DEFAULT_CONFIDENTIAL.to_string()));
        let kbs = match init_data.and_then(|d| d.data.get("aa.toml")) {
            Some(aa) if confidential => confidential::kbs_settings(aa)?,
            _ => None,
        };
        Ok(PodSetup {
            policy,
            kbs,
            init_data_digest: init_data
                .map(|d| hex::encode(d.digest()))
                .unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn init_data(files: &[(&str, &str)]) -> InitData {
        let mut doc = String::from("version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n");
        for (name, text) in files {
            doc.push_str(&format!("\"{name}\" = '''\n{text}\n'''\n"));
        }
        InitData::parse(doc.as_bytes()).unwrap()
    }

    const AA: &str = "[token_configs.kbs]\nurl = \"https://10.0.2.2:8443\"\ncert = \"PEM\"\n";

    #[test]
    fn the_init_data_policy_wins_and_confidential_pods_get_the_default() {
        let own = init_data(&[("policy.rego", "package agent_policy\ndefault x := true")]);
        for tee in [None, Some(TeeKind::SoftwareTee)] {
            let setup = PodSetup::from_init_data(Some(&own), tee).unwrap();
            assert!(setup.policy.unwrap().contains("default x := true"));
        }
        let none = PodSetup::from_init_data(None, None).unwrap();
        assert_eq!(none.policy, None);
        assert_eq!(none.init_data_digest, "");
        let confidential = PodSetup::from_init_data(None, Some(TeeKind::Snp)).unwrap();
        assert_eq!(
            confidential.policy.as_deref(),
            Some(kabuto_policy::DEFAULT_CONFIDENTIAL.as_str())
        );
    }

    #[test]
    fn only_a_confidential_pod_reads_its_kbs_from_aa_toml() {
        let doc = init_data(&[("aa.toml", AA)]);
        let setup = PodSetup::from_init_data(Some(&doc), Some(TeeKind::SoftwareTee)).unwrap();
        assert_eq!(setup.kbs.unwrap().url, "https://10.0.2.2:8443");
        assert_eq!(setup.init_data_digest, hex::encode(doc.digest()));
        // Not confidential: the host is trusted, aa.toml is not acted on.
        assert!(PodSetup::from_init_data(Some(&doc), None)
            .unwrap()
            .kbs
            .is_none());
    }

    #[test]
    fn a_kbs_without_pinned_tls_is_refused() {
        let doc = init_data(&[(
            "aa.toml",
            "[token_configs.kbs]\nurl = \"http://10.0.2.2:8080\"\ncert = \"PEM\"\n",
        )]);
        let err = PodSetup::from_init_data(Some(&doc), Some(TeeKind::Snp)).unwrap_err();
        assert!(err.to_string().contains("not https://"), "{err}");
    }
}
