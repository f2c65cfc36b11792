//! Sealed secrets in the guest (CoCo's format, `kabuto_sealed_secret`):
//! a container's env values that start with `sealed.` are unsealed before
//! the container is created, and the data hub's `POST /cdh/unseal` does the
//! same for workloads. The signing key is the KBS resource the secret's
//! `kid` names (a P-256 public JWK), fetched after attestation like the
//! secret's own resource; the signature is always checked.
//!
//! Unlike upstream Kata, which warns and starts the container with the
//! sealed value, a value that does not unseal refuses the container, naming
//! the variable, never its value.

use kabuto_attestation_agent::{AttestError, KbsClient};
use kabuto_sealed_secret::{PublicSigningKey, SealedSecret, SealedSecretError};
use zeroize::Zeroizing;

use crate::error::{AgentError, Result};

#[derive(Debug, thiserror::Error)]
pub enum UnsealError {
    #[error(transparent)]
    Sealed(#[from] SealedSecretError),
    #[error("the signing key {kid:?} is not a KBS resource (kbs:///repository/type/tag)")]
    KidNotKbs { kid: String },
    #[error("fetching the signing key {kid}")]
    Key {
        kid: String,
        #[source]
        source: AttestError,
    },
    // Without the parser's error: the resource the host's `kid` named may
    // be any of the pod's secrets, and the error reaches the host.
    #[error("the resource at {kid} is not a P-256 public JWK")]
    NotAKey { kid: String },
    #[error("the plaintext is not UTF-8 (an env value must be)")]
    NotUtf8,
}

impl UnsealError {
    /// The data hub's status for this error.
    pub fn http_status(&self) -> u16 {
        match self {
            UnsealError::Key {
                source: AttestError::Kbs { status, .. },
                ..
            } => *status,
            UnsealError::Sealed(SealedSecretError::Fetch { .. }) | UnsealError::Key { .. } => 502,
            _ => 400,
        }
    }
}

/// The plaintext of `sealed`, its signature verified with the key its
/// `kid` names in the KBS.
pub fn unseal(
    kbs: &KbsClient,
    sealed: &str,
) -> std::result::Result<Zeroizing<Vec<u8>>, UnsealError> {
    let parsed = SealedSecret::parse(sealed)?;
    let kid = parsed.kid.clone();
    if kid.parse::<kabuto_kbs_protocol::ResourceUri>().is_err() {
        return Err(UnsealError::KidNotKbs { kid });
    }
    let jwk = kbs.get_resource(&kid).map_err(|source| UnsealError::Key {
        kid: kid.clone(),
        source,
    })?;
    // Before the signature is checked the kid is the host's choice: what it
    // names is read as a key and never shown.
    let key = PublicSigningKey::from_jwk(&jwk).map_err(|_| UnsealError::NotAKey { kid })?;
    let secret = parsed.verify(&key)?;
    Ok(secret.unseal(|uri| kbs.get_resource(&uri.to_string()))?)
}

fn refused(container: &str, what: &str, why: String) -> AgentError {
    AgentError::InvalidArgument(format!(
        "container {container}: {what} holds a sealed secret that does not unseal: {why}"
    ))
}

/// The plaintext of the sealed `content` of `what` (an env variable, a
/// file) in `container`, or the error refusing the container; a pod
/// without a KBS cannot unseal.
pub fn unseal_for(
    kbs: Option<&KbsClient>,
    content: &[u8],
    container: &str,
    what: &str,
) -> Result<Zeroizing<Vec<u8>>> {
    let kbs = kbs.ok_or_else(|| {
        refused(
            container,
            what,
            "the pod has no KBS (a confidential pod whose init-data names one)".into(),
        )
    })?;
    let text = std::str::from_utf8(content)
        .map_err(|_| refused(container, what, "it is not UTF-8".into()))?;
    unseal(kbs, text).map_err(|e| refused(container, what, kabuto_error::chain(&e)))
}

/// Replaces every `NAME=sealed.…` of the spec's process env by its
/// plaintext; the number unsealed. A pod without a KBS (not confidential,
/// or none in its init-data) cannot unseal: its sealed values refuse the
/// container.
pub fn unseal_env(
    spec: &mut oci_spec::runtime::Spec,
    container: &str,
    kbs: Option<&KbsClient>,
) -> Result<usize> {
    let Some(process) = spec.process_mut() else {
        return Ok(0);
    };
    let Some(mut env) = process.env().clone() else {
        return Ok(0);
    };
    let mut unsealed = 0;
    for entry in env.iter_mut() {
        let Some((name, value)) = entry.split_once('=') else {
            continue;
        };
        if !kabuto_sealed_secret::is_sealed(value.as_bytes()) {
            continue;
        }
        let what = format!("env {name}");
        let plaintext = unseal_for(kbs, value.as_bytes(), container, &what)?;
        let plaintext = String::from_utf8(plaintext.to_vec())
            .map_err(|_| refused(container, &what, UnsealError::NotUtf8.to_string()))?;
        *entry = format!("{name}={plaintext}");
        unsealed += 1;
    }
    if unsealed > 0 {
        process.set_env(Some(env));
        log::info!("container {container}: {unsealed} sealed env value(s) unsealed");
    }
    Ok(unsealed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec_with_env(env: &[&str]) -> oci_spec::runtime::Spec {
        let mut spec = oci_spec::runtime::Spec::default();
        let mut process = oci_spec::runtime::Process::default();
        process.set_env(Some(env.iter().map(|e| e.to_string()).collect()));
        spec.set_process(Some(process));
        spec
    }

    #[test]
    fn plain_env_is_kept_and_a_sealed_value_without_a_kbs_refuses_naming_it() {
        let mut spec = spec_with_env(&["PATH=/bin", "EMPTY=", "NOEQUALS"]);
        assert_eq!(unseal_env(&mut spec, "c1", None).unwrap(), 0);
        let key = kabuto_sealed_secret::PrivateSigningKey::generate();
        let sealed = key.seal(
            &kabuto_sealed_secret::Secret::vault("kbs:///default/db/password").unwrap(),
            "kbs:///default/key/1",
        );
        let mut spec = spec_with_env(&["PATH=/bin", &format!("DB_PASSWORD={sealed}")]);
        let e = unseal_env(&mut spec, "c1", None).unwrap_err().to_string();
        assert!(e.contains("env DB_PASSWORD") && e.contains("no KBS"), "{e}");
        assert!(!e.contains(&sealed), "the value is not in the error: {e}");
    }
}
