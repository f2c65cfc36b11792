//! The owner's admin client (used by `kabuto-kbs admin …` and tests):
//! key generation, admin tokens, and the admin API calls.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use rand_core::OsRng;

use crate::admin::AdminClaims;
use crate::token::now_secs;

/// Why an admin request could not be made, or what the KBS refused.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("encoding the key")]
    Pkcs8(#[from] p256::pkcs8::Error),
    #[error("encoding the key")]
    Spki(#[from] p256::pkcs8::spki::Error),
    #[error("admin key: not an ES256 private key PEM")]
    AdminKey(#[source] jsonwebtoken::errors::Error),
    #[error("signing the admin token")]
    Sign(#[source] jsonwebtoken::errors::Error),
    #[error("the CA certificate")]
    Ca(#[from] crate::PemError),
    #[error("the CA certificate")]
    Tls(#[from] rustls::Error),
    #[error("HTTP {code}: {detail}")]
    Status { code: u16, detail: String },
    #[error(transparent)]
    Transport(Box<ureq::Error>),
    #[error("reading the response")]
    Read(#[source] std::io::Error),
}

/// A fresh ES256 admin key pair: (private PKCS#8 PEM, public SPKI PEM).
pub fn generate_admin_key() -> Result<(String, String), ClientError> {
    let secret = p256::SecretKey::random(&mut OsRng);
    let private = secret.to_pkcs8_pem(LineEnding::LF)?.to_string();
    let public = secret.public_key().to_public_key_pem(LineEnding::LF)?;
    Ok((private, public))
}

/// A short-lived, single-use admin token signed with `private_pem`.
pub fn admin_token(
    private_pem: &[u8],
    subject: &str,
    ttl: Duration,
) -> Result<String, ClientError> {
    let key = EncodingKey::from_ec_pem(private_pem).map_err(ClientError::AdminKey)?;
    let now = now_secs();
    let mut jti = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut OsRng, &mut jti);
    let claims = AdminClaims {
        exp: now + ttl.as_secs(),
        iat: now,
        aud: crate::admin::ADMIN_AUDIENCE.to_string(),
        jti: hex::encode(jti),
        sub: subject.to_string(),
    };
    jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &key).map_err(ClientError::Sign)
}

/// An HTTP agent; `ca_pem` adds a trusted CA (the KBS's own certificate)
/// instead of the system roots.
pub fn http_agent(ca_pem: Option<&[u8]>) -> Result<ureq::Agent, ClientError> {
    let mut builder = ureq::AgentBuilder::new().timeout(Duration::from_secs(30));
    if let Some(pem) = ca_pem {
        let mut roots = rustls::RootCertStore::empty();
        for cert in crate::parse_pem_certificates(pem)? {
            roots.add(cert.into())?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        builder = builder.tls_config(Arc::new(tls));
    }
    Ok(builder.build())
}

pub struct AdminClient {
    url: String,
    private_pem: Vec<u8>,
    agent: ureq::Agent,
}

impl AdminClient {
    pub fn new(
        url: &str,
        private_pem: Vec<u8>,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, ClientError> {
        Ok(AdminClient {
            url: url.trim_end_matches('/').to_string(),
            private_pem,
            agent: http_agent(ca_pem)?,
        })
    }

    fn post(&self, path: &str, body: &[u8]) -> Result<String, ClientError> {
        let token = admin_token(
            &self.private_pem,
            "kabuto-kbs-admin",
            Duration::from_secs(60),
        )?;
        let result = self
            .agent
            .post(&format!("{}{path}", self.url))
            .set("Authorization", &format!("Bearer {token}"))
            .send_bytes(body);
        response_text(result)
    }

    pub fn set_resource(&self, path: &str, value: &[u8]) -> Result<String, ClientError> {
        self.post(&format!("/kbs/v0/resource/{path}"), value)
    }

    pub fn set_attestation_policy(&self, rego: &str) -> Result<String, ClientError> {
        self.post("/kbs/v0/attestation-policy", rego.as_bytes())
    }

    pub fn set_resource_policy(&self, rego: &str) -> Result<String, ClientError> {
        self.post("/kbs/v0/resource-policy", rego.as_bytes())
    }

    pub fn set_reference_values(
        &self,
        name: &str,
        values: &serde_json::Value,
    ) -> Result<String, ClientError> {
        self.post(
            &format!("/kbs/v0/reference-values/{name}"),
            values.to_string().as_bytes(),
        )
    }

    pub fn set_software_tee_roots(&self, pem: &[u8]) -> Result<String, ClientError> {
        self.post("/kbs/v0/software-tee-roots", pem)
    }
}

/// The body on success; on an HTTP error, the problem document's detail.
pub fn response_text(result: Result<ureq::Response, ureq::Error>) -> Result<String, ClientError> {
    match result {
        Ok(response) => response.into_string().map_err(ClientError::Read),
        Err(ureq::Error::Status(code, response)) => {
            let body = response.into_string().unwrap_or_default();
            let detail = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| {
                    Some(format!(
                        "{}: {}",
                        v.get("title")?.as_str()?,
                        v.get("detail")?.as_str()?
                    ))
                })
                .unwrap_or(body);
            Err(ClientError::Status { code, detail })
        }
        Err(e) => Err(ClientError::Transport(Box::new(e))),
    }
}
