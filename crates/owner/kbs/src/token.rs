//! Attestation tokens: ES256 JWTs with EAR-style claims, signed by the KBS.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rand_core::OsRng;
use serde::{Deserialize, Serialize};

pub const ISSUER: &str = "kabuto-kbs";

/// The token's claims. `tee-pubkey` lets a bearer fetch resources without
/// the session cookie; they are still encrypted to that key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenClaims {
    pub iss: String,
    pub iat: u64,
    pub exp: u64,
    #[serde(rename = "ear.status")]
    pub ear_status: String,
    #[serde(rename = "ear.trustworthiness-vector")]
    pub trust_vector: serde_json::Value,
    /// The verified evidence claims.
    pub claims: serde_json::Value,
    /// Digest of the init-data the guest presented (hex), if any.
    pub init_data_digest: Option<String>,
    #[serde(rename = "tee-pubkey")]
    pub tee_pubkey: kbs_types::TeePubKey,
}

pub struct TokenSigner {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// The verification key, for relying parties (PEM).
    pub public_pem: String,
}

#[derive(Debug, thiserror::Error)]
#[error("token key {path}: {message}")]
pub struct TokenKeyError {
    path: String,
    message: String,
}

impl TokenSigner {
    /// Loads the ES256 key at `path`, generating it (0600) on first start.
    pub fn load_or_generate(path: &Path) -> Result<Self, TokenKeyError> {
        let fail = |message: String| TokenKeyError {
            path: path.display().to_string(),
            message,
        };
        let secret = if path.exists() {
            let pem = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
            p256::SecretKey::from_pkcs8_pem(&pem).map_err(|e| fail(e.to_string()))?
        } else {
            let secret = p256::SecretKey::random(&mut OsRng);
            let pem = secret
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| fail(e.to_string()))?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| fail(e.to_string()))?;
            }
            write_private(path, pem.as_bytes()).map_err(|e| fail(e.to_string()))?;
            secret
        };
        Self::from_secret(&secret).map_err(fail)
    }

    pub fn from_secret(secret: &p256::SecretKey) -> Result<Self, String> {
        let private_pem = secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| e.to_string())?;
        let public_pem = secret
            .public_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| e.to_string())?;
        Ok(TokenSigner {
            encoding: EncodingKey::from_ec_pem(private_pem.as_bytes())
                .map_err(|e| e.to_string())?,
            decoding: DecodingKey::from_ec_pem(public_pem.as_bytes()).map_err(|e| e.to_string())?,
            public_pem,
        })
    }

    pub fn sign(&self, claims: &TokenClaims) -> Result<String, String> {
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), claims, &self.encoding)
            .map_err(|e| e.to_string())
    }

    /// Verifies signature, issuer and expiry (no leeway).
    pub fn verify(&self, token: &str) -> Result<TokenClaims, String> {
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_issuer(&[ISSUER]);
        validation.leeway = 0;
        jsonwebtoken::decode::<TokenClaims>(token, &self.decoding, &validation)
            .map(|d| d.claims)
            .map_err(|e| e.to_string())
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
