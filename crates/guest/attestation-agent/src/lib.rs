//! Guest attestation agent: evidence + the KBS protocol client.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use kabuto_jose::TeeKeyPair;
use kbs_types::{
    Attestation, Challenge, CompositeEvidence, HashAlgorithm, InitData, Request, RuntimeData, Tee,
};
use zeroize::Zeroizing;

pub mod evidence;

pub use evidence::{provider, Connector, EvidenceProvider, TeeKind};

const SESSION_COOKIE: &str = "kbs-session-id";
/// Upper bound of a resource response (a JWE around up to 8 MiB).
const MAX_RESOURCE_RESPONSE: u64 = 12 << 20;
/// Re-attest this long before the token's expiry.
const TOKEN_MARGIN_SECS: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("no TEE: {0}")]
    NoTee(String),
    #[error("evidence: {0}")]
    Evidence(String),
    #[error("KBS {step}: HTTP {status}: {detail}")]
    Kbs {
        step: &'static str,
        status: u16,
        /// The problem document's title (the failed check), if any.
        check: String,
        detail: String,
    },
    #[error("KBS {step}: {detail}")]
    Transport { step: &'static str, detail: String },
    #[error("resource: {0}")]
    Resource(String),
}

impl AttestError {
    /// The check the KBS named when it refused (problem document title).
    pub fn check(&self) -> Option<&str> {
        match self {
            AttestError::Kbs { check, .. } => Some(check),
            _ => None,
        }
    }
}

pub use kabuto_kbs_protocol::{ResourceUri, PROTOCOL_VERSION};

impl From<kabuto_kbs_protocol::ResourceUriError> for AttestError {
    fn from(e: kabuto_kbs_protocol::ResourceUriError) -> Self {
        AttestError::Resource(e.to_string())
    }
}

/// The auth request this client sends.
pub fn request(tee: Tee) -> Request {
    Request {
        version: PROTOCOL_VERSION.into(),
        tee,
        extra_params: serde_json::json!({
            "supported-hash-algorithms": ["sha384", "sha512", "sha256"],
        }),
    }
}

/// Builds the attestation for `challenge` with a fresh key pair: the
/// report data is the hash (the KBS's choice) of the canonical JSON of
/// {tee-pubkey, nonce, additional-evidence}.
pub fn attestation(
    provider: &dyn EvidenceProvider,
    challenge: &Challenge,
    init_data: Option<&str>,
) -> Result<(Attestation, TeeKeyPair), AttestError> {
    let hash = match challenge
        .extra_params
        .get("selected-hash-algorithm")
        .and_then(|v| v.as_str())
    {
        Some(name) => name
            .parse::<HashAlgorithm>()
            .map_err(|_| AttestError::Kbs {
                step: "auth",
                status: 200,
                check: "hash-algorithm".into(),
                detail: format!("the KBS selected an unknown hash algorithm {name:?}"),
            })?,
        None => HashAlgorithm::Sha384,
    };
    let key = TeeKeyPair::generate_ec();
    let runtime_data = RuntimeData {
        nonce: challenge.nonce.clone(),
        tee_pubkey: key.public_jwk(),
    };
    let additional_evidence = String::new();
    let report_data = kabuto_kbs_protocol::report_data(hash, &runtime_data, &additional_evidence)
        .map_err(|e| AttestError::Evidence(e.to_string()))?;
    let primary_evidence = provider.evidence(&report_data)?;
    Ok((
        Attestation {
            init_data: init_data.map(|body| InitData {
                format: "toml".into(),
                body: body.to_string(),
            }),
            runtime_data,
            tee_evidence: CompositeEvidence {
                primary_evidence,
                additional_evidence,
            },
        },
        key,
    ))
}

struct Attested {
    key: TeeKeyPair,
    token: String,
    expires: u64,
    cookie: String,
}

/// A KBS client with a token cache. Blocking; safe to share across threads.
pub struct KbsClient {
    base: String,
    agent: ureq::Agent,
    provider: Box<dyn EvidenceProvider>,
    init_data: Option<String>,
    attested: Mutex<Option<Attested>>,
}

impl KbsClient {
    /// `ca_pem`: the KBS certificate (or its CA) to trust, normally from
    /// init-data; `None` uses no TLS roots at all and only works for
    /// `http://` (loopback tests).
    pub fn new(
        url: &str,
        ca_pem: Option<&[u8]>,
        provider: Box<dyn EvidenceProvider>,
        init_data: Option<String>,
    ) -> Result<Self, AttestError> {
        let transport = |detail: String| AttestError::Transport {
            step: "setup",
            detail,
        };
        let mut builder = ureq::AgentBuilder::new().timeout(Duration::from_secs(30));
        if let Some(pem) = ca_pem {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut &pem[..]) {
                let cert = cert.map_err(|e| transport(format!("KBS CA PEM: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| transport(format!("KBS CA certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(transport("the KBS CA PEM holds no certificate".into()));
            }
            let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| transport(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
            builder = builder.tls_config(Arc::new(tls));
        }
        Ok(KbsClient {
            base: url.trim_end_matches('/').to_string(),
            agent: builder.build(),
            provider,
            init_data,
            attested: Mutex::new(None),
        })
    }

    pub fn describe_tee(&self) -> String {
        self.provider.describe()
    }

    /// Runs a full handshake and returns the token.
    pub fn attest(&self) -> Result<String, AttestError> {
        let mut attested = self.lock();
        self.handshake(&mut attested)?;
        Ok(attested
            .as_ref()
            .map(|a| a.token.clone())
            .unwrap_or_default())
    }

    /// A KBS token still valid for a while: the cached one, else one from a
    /// fresh handshake (the data hub's `/aa/token`).
    pub fn token(&self) -> Result<String, AttestError> {
        let mut slot = self.lock();
        let fresh = slot
            .as_ref()
            .is_some_and(|a| a.expires > now_secs() + TOKEN_MARGIN_SECS);
        if !fresh {
            self.handshake(&mut slot)?;
        }
        Ok(slot.as_ref().map(|a| a.token.clone()).unwrap_or_default())
    }

    /// Fresh evidence whose report data is `runtime_data`, zero-padded to
    /// 64 bytes as CoCo's attesters take it (the data hub's
    /// `/aa/evidence`, for workload-to-workload attestation).
    pub fn evidence(&self, runtime_data: &[u8]) -> Result<serde_json::Value, AttestError> {
        self.provider.evidence(runtime_data)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Attested>> {
        match self.attested.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn handshake(&self, slot: &mut Option<Attested>) -> Result<(), AttestError> {
        *slot = None;
        let auth = self
            .agent
            .post(&format!("{}/kbs/v0/auth", self.base))
            .send_json(request(self.provider.tee()));
        let response = check("auth", auth)?;
        let cookie = session_cookie(&response).ok_or_else(|| AttestError::Transport {
            step: "auth",
            detail: "the KBS set no kbs-session-id cookie".into(),
        })?;
        let challenge: Challenge = response.into_json().map_err(|e| AttestError::Transport {
            step: "auth",
            detail: format!("challenge: {e}"),
        })?;
        let (attestation, key) = attestation(
            self.provider.as_ref(),
            &challenge,
            self.init_data.as_deref(),
        )?;
        let attest = self
            .agent
            .post(&format!("{}/kbs/v0/attest", self.base))
            .set("Cookie", &format!("{SESSION_COOKIE}={cookie}"))
            .send_json(&attestation);
        let response = check("attest", attest)?;
        let cookie = session_cookie(&response).unwrap_or(cookie);
        let body: serde_json::Value = response.into_json().map_err(|e| AttestError::Transport {
            step: "attest",
            detail: format!("token response: {e}"),
        })?;
        let token = body
            .get("token")
            .and_then(|t| t.as_str())
            .ok_or_else(|| AttestError::Transport {
                step: "attest",
                detail: "no token in the response".into(),
            })?
            .to_string();
        let expires = token_expiry(&token).unwrap_or(0);
        log::info!(
            "attested to {} with {}",
            self.base,
            self.provider.describe()
        );
        *slot = Some(Attested {
            key,
            token,
            expires,
            cookie,
        });
        Ok(())
    }

    /// Fetches and decrypts `uri` (`kbs:///repo/type/tag`), attesting first
    /// when there is no valid token, and once more if the KBS has forgotten
    /// the session.
    pub fn get_resource(&self, uri: &str) -> Result<Zeroizing<Vec<u8>>, AttestError> {
        let uri: ResourceUri = uri.parse()?;
        let url = format!(
            "{}/kbs/v0/resource/{}/{}/{}",
            self.base, uri.repository, uri.kind, uri.tag
        );
        let mut slot = self.lock();
        for attempt in 0..2 {
            let fresh = slot
                .as_ref()
                .map(|a| a.expires > now_secs() + TOKEN_MARGIN_SECS)
                .unwrap_or(false);
            if !fresh {
                self.handshake(&mut slot)?;
            }
            let Some(attested) = slot.as_ref() else {
                continue;
            };
            let result = self
                .agent
                .get(&url)
                .set("Cookie", &format!("{SESSION_COOKIE}={}", attested.cookie))
                .call();
            match check("resource", result) {
                Ok(response) => {
                    let mut body = Vec::new();
                    response
                        .into_reader()
                        .take(MAX_RESOURCE_RESPONSE)
                        .read_to_end(&mut body)
                        .map_err(|e| AttestError::Transport {
                            step: "resource",
                            detail: format!("reading the JWE: {e}"),
                        })?;
                    return attested
                        .key
                        .decrypt_json(&body)
                        .map_err(|e| AttestError::Resource(e.to_string()));
                }
                Err(AttestError::Kbs { status: 401, .. }) if attempt == 0 => {
                    *slot = None;
                }
                Err(e) => return Err(e),
            }
        }
        Err(AttestError::Resource(
            "the KBS kept refusing the session".into(),
        ))
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `exp` of a JWT, read without verification (only to know when to renew;
/// the KBS verifies its own tokens).
pub fn token_expiry(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()?
        .get("exp")?
        .as_u64()
}

fn session_cookie(response: &ureq::Response) -> Option<String> {
    response
        .all("set-cookie")
        .into_iter()
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.to_string())
}

fn check(
    step: &'static str,
    result: Result<ureq::Response, ureq::Error>,
) -> Result<ureq::Response, AttestError> {
    match result {
        Ok(r) => Ok(r),
        Err(ureq::Error::Status(status, response)) => {
            let body = response.into_string().unwrap_or_default();
            let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let field = |k: &str| doc.get(k).and_then(|v| v.as_str()).map(str::to_owned);
            Err(AttestError::Kbs {
                step,
                status,
                check: field("title").unwrap_or_default(),
                detail: field("detail").unwrap_or(body),
            })
        }
        Err(e) => Err(AttestError::Transport {
            step,
            detail: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn no_fallback_when_a_tee_is_missing() {
        // This machine has no SNP or TDX; asking for them must fail, not degrade.
        if std::path::Path::new(evidence::SEV_GUEST_DEVICE).exists() {
            eprintln!("SKIPPED: this machine has {}", evidence::SEV_GUEST_DEVICE);
            return;
        }
        let err = provider(TeeKind::Snp, None).err().unwrap();
        assert!(err.to_string().contains("SEV-SNP was requested"), "{err}");
        let err = provider(TeeKind::SoftwareTee, None).err().unwrap();
        assert!(err.to_string().contains("software TEE"), "{err}");
    }
}
