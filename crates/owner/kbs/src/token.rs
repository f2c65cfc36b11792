//! Attestation tokens: ES256 JWTs in the EAR layout trustee's attestation
//! service issues (draft-ietf-rats-ear, veraison profile), signed by the KBS.
//!
//! The one appraisal is `submods.cpu0` (trustee names the primary attester
//! so); its `ear.veraison.annotated-evidence` holds the verified claims
//! under the TEE's name, the init-data digest, and `runtime_data_claims`
//! with the `tee-pubkey` a trustee KBS reads in passport mode
//! (`/submods/cpu0/ear.veraison.annotated-evidence/runtime_data_claims/tee-pubkey`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rand_core::OsRng;
use serde::{Deserialize, Serialize};

pub const ISSUER: &str = "kabuto-kbs";
/// The EAR profile trustee's tokens name.
pub const EAT_PROFILE: &str = "tag:github.com,2023:veraison/ear";
/// The submod of the primary (CPU) attester, as trustee names it.
pub const CPU_SUBMOD: &str = "cpu0";
/// The appraisal policy id trustee reports for its default policy.
pub const POLICY_ID: &str = "default";

/// The token's claims. `tee-pubkey` (in the CPU appraisal) lets a bearer
/// fetch resources without the session cookie; they are still encrypted to
/// that key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenClaims {
    pub eat_profile: String,
    pub iss: String,
    pub iat: u64,
    pub exp: u64,
    #[serde(rename = "ear.verifier-id")]
    pub verifier_id: VerifierId,
    pub submods: BTreeMap<String, Appraisal>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerifierId {
    pub developer: String,
    pub build: String,
}

/// One EAR appraisal.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Appraisal {
    #[serde(rename = "ear.status")]
    pub status: String,
    #[serde(rename = "ear.trustworthiness-vector")]
    pub trust_vector: serde_json::Value,
    #[serde(rename = "ear.appraisal-policy-id")]
    pub policy_id: String,
    #[serde(rename = "ear.veraison.annotated-evidence")]
    pub evidence: AnnotatedEvidence,
}

/// What the appraisal saw, as trustee's attestation service annotates it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AnnotatedEvidence {
    /// The verified claims (kabuto-verifier `Claims`) under the TEE's name
    /// (`snp`, `tdx`, `sample`, ...).
    #[serde(flatten)]
    pub platform: BTreeMap<String, serde_json::Value>,
    /// Digest of the init-data the guest presented (hex), if any. The
    /// document itself (trustee's `init_data_claims`) is not copied into
    /// the token: it can be megabytes, and every attested session keeps its
    /// token's claims; the attestation policy sees the document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_data: Option<String>,
    /// The runtime data the evidence's report data binds (`nonce`,
    /// `tee-pubkey`).
    pub runtime_data_claims: kbs_types::RuntimeData,
}

impl Appraisal {
    /// An appraisal of evidence from `tee` (its name in the KBS protocol)
    /// that yielded `claims`, bound to `runtime_data`.
    pub fn new(
        status: String,
        trust_vector: serde_json::Value,
        tee: String,
        claims: serde_json::Value,
        init_data: Option<String>,
        runtime_data: kbs_types::RuntimeData,
    ) -> Self {
        Appraisal {
            status,
            trust_vector,
            policy_id: POLICY_ID.into(),
            evidence: AnnotatedEvidence {
                platform: [(tee, claims)].into(),
                init_data,
                runtime_data_claims: runtime_data,
            },
        }
    }
}

impl TokenClaims {
    /// The primary (CPU) appraisal. Tokens without one are refused at
    /// verification, so every accepted token has it.
    pub fn cpu(&self) -> Option<&Appraisal> {
        self.submods.get(CPU_SUBMOD)
    }
}

pub struct TokenSigner {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// The verification key as a JWK, for the tokens' header.
    jwk: jsonwebtoken::jwk::Jwk,
    /// The verification key, for relying parties (PEM).
    pub public_pem: String,
}

#[derive(Debug, thiserror::Error)]
#[error("token key {path}")]
pub struct TokenKeyError {
    path: String,
    #[source]
    reason: TokenError,
}

/// Why a token key could not be used, or a token signed or accepted.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("not an ES256 private key in PKCS#8 PEM")]
    Pkcs8(#[from] p256::pkcs8::Error),
    #[error("encoding the verification key")]
    Spki(#[from] p256::pkcs8::spki::Error),
    #[error("the key")]
    Key(#[source] jsonwebtoken::errors::Error),
    #[error("signing the token")]
    Sign(#[source] jsonwebtoken::errors::Error),
    #[error(transparent)]
    Invalid(jsonwebtoken::errors::Error),
    #[error("the token has no {CPU_SUBMOD} appraisal")]
    NoCpu,
}

impl TokenSigner {
    /// Loads the ES256 key at `path`, generating it (0600) on first start.
    pub fn load_or_generate(path: &Path) -> Result<Self, TokenKeyError> {
        let load = || -> Result<Self, TokenError> {
            let secret = if path.exists() {
                let pem = std::fs::read_to_string(path)?;
                p256::SecretKey::from_pkcs8_pem(&pem)?
            } else {
                let secret = p256::SecretKey::random(&mut OsRng);
                let pem = secret.to_pkcs8_pem(LineEnding::LF)?;
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                write_private(path, pem.as_bytes())?;
                secret
            };
            Self::from_secret(&secret)
        };
        load().map_err(|reason| TokenKeyError {
            path: path.display().to_string(),
            reason,
        })
    }

    pub fn from_secret(secret: &p256::SecretKey) -> Result<Self, TokenError> {
        let private_pem = secret.to_pkcs8_pem(LineEnding::LF)?;
        let public_pem = secret.public_key().to_public_key_pem(LineEnding::LF)?;
        Ok(TokenSigner {
            encoding: EncodingKey::from_ec_pem(private_pem.as_bytes()).map_err(TokenError::Key)?,
            decoding: DecodingKey::from_ec_pem(public_pem.as_bytes()).map_err(TokenError::Key)?,
            jwk: public_jwk(&secret.public_key()),
            public_pem,
        })
    }

    /// Signs `claims`. The header carries the verification key as `jwk`,
    /// as trustee's tokens do; relying parties must still pin that key
    /// (`/kbs/v0/token-key`), not trust the header's.
    pub fn sign(&self, claims: &TokenClaims) -> Result<String, TokenError> {
        let mut header = Header::new(Algorithm::ES256);
        header.jwk = Some(self.jwk.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).map_err(TokenError::Sign)
    }

    /// Verifies signature, issuer and expiry (no leeway) with this KBS's
    /// own key (never the header's `jwk`), and that the token has a CPU
    /// appraisal.
    pub fn verify(&self, token: &str) -> Result<TokenClaims, TokenError> {
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_issuer(&[ISSUER]);
        validation.leeway = 0;
        let claims = jsonwebtoken::decode::<TokenClaims>(token, &self.decoding, &validation)
            .map(|d| d.claims)
            .map_err(TokenError::Invalid)?;
        if claims.cpu().is_none() {
            return Err(TokenError::NoCpu);
        }
        Ok(claims)
    }
}

fn public_jwk(key: &p256::PublicKey) -> jsonwebtoken::jwk::Jwk {
    use base64::Engine;
    use jsonwebtoken::jwk::{
        AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters,
        EllipticCurveKeyType, Jwk, KeyAlgorithm,
    };
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    let point = key.to_encoded_point(false);
    let b64 = |c: Option<&p256::FieldBytes>| {
        c.map(|c| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(c))
            .unwrap_or_default()
    };
    Jwk {
        common: CommonParameters {
            key_algorithm: Some(KeyAlgorithm::ES256),
            ..Default::default()
        },
        algorithm: AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
            key_type: EllipticCurveKeyType::EC,
            curve: EllipticCurve::P256,
            x: b64(point.x()),
            y: b64(point.y()),
        }),
    }
}

pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
