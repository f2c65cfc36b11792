//! kabuto-kbs: the owner's Key Broker Service.
//!
//! Speaks the CoCo KBS attestation protocol (Request–Challenge–Attestation–
//! Response, `kbs_types`), verifies evidence with `kabuto-verifier`, appraises
//! the claims with a Rego policy into an EAR-style token, and releases
//! resources — encrypted to the guest's ephemeral key — when the resource
//! policy allows. Admin calls need a JWT signed by a configured admin key.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::Router;

pub mod admin;
pub mod api;
pub mod client;
pub mod config;
pub mod error;
pub mod policy;
pub mod sessions;
pub mod store;
pub mod token;

use config::{Config, Role};
use kabuto_verifier::{TrustAnchors, Verifier};
use policy::Policy;
use store::Store;
use token::{TokenClaims, TokenSigner};

/// Protocol version this KBS speaks (CoCo KBS protocol).
pub use kabuto_kbs_protocol::PROTOCOL_VERSION;
/// Largest request body accepted (resources and evidence).
pub const MAX_BODY_BYTES: usize = 8 << 20;

pub(crate) enum SessionState {
    Challenged {
        nonce: String,
        tee: kbs_types::Tee,
        hash: kbs_types::HashAlgorithm,
        /// The address that asked for the challenge (bounds per peer).
        peer: std::net::IpAddr,
    },
    Attested(Box<TokenClaims>),
}

pub(crate) struct Session {
    state: SessionState,
    expires: Instant,
}

pub(crate) struct AdminKey {
    key: jsonwebtoken::DecodingKey,
    roles: Vec<Role>,
    kind: AdminKeyKind,
}

/// Which admin tokens a key signs, decided by the key's type.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum AdminKeyKind {
    /// P-256: our own admin tokens (ES256, `aud`, single-use `jti`, at most
    /// an hour).
    Es256,
    /// Ed25519: trustee's admin auth, as CoCo's `kbs-client` signs it
    /// (EdDSA, `iat`/`nbf`/`exp` two hours apart, no `aud` or `jti`).
    TrusteeEd25519,
}

/// Shared server state.
pub struct Kbs {
    pub(crate) store: Store,
    pub(crate) verifier: RwLock<Arc<Verifier>>,
    pub(crate) attestation_policy: Policy,
    pub(crate) resource_policy: Policy,
    pub(crate) tokens: TokenSigner,
    pub(crate) sessions: Mutex<sessions::SessionTable>,
    pub(crate) admin_keys: Vec<AdminKey>,
    /// Admin token ids already used, with their expiry (unix seconds).
    pub(crate) admin_jtis: Mutex<std::collections::HashMap<String, u64>>,
    /// When this process started (unix seconds): older admin tokens are refused.
    pub(crate) started_secs: u64,
    /// Serialises storing and installing a policy.
    pub(crate) policy_writes: Mutex<()>,
    pub(crate) session_ttl: Duration,
    pub(crate) token_ttl: Duration,
    base_anchors: TrustAnchors,
}

impl Kbs {
    /// Opens the store, loads keys and policies (stored ones replace the
    /// defaults) and prepares the verifier.
    pub fn new(config: &Config) -> Result<Arc<Self>, KbsError> {
        let store = Store::open(&config.store)?;
        let tokens = TokenSigner::load_or_generate(&config.token_key)?;
        let mut admin_keys = Vec::new();
        for key in &config.admin_keys {
            let pem = std::fs::read(&key.public_key)
                .map_err(|e| KbsError::AdminKeyRead(key.public_key.clone(), e))?;
            let (decoding, kind) = if let Ok(ec) = jsonwebtoken::DecodingKey::from_ec_pem(&pem) {
                (ec, AdminKeyKind::Es256)
            } else if let Ok(ed) = jsonwebtoken::DecodingKey::from_ed_pem(&pem) {
                log::warn!(
                    "admin key {}: Ed25519, accepting trustee-style admin tokens (kbs-client): \
                     no audience and no single-use id, so a token seen on the wire can be \
                     replayed until it expires (at most {} s); serve the KBS over TLS",
                    key.public_key.display(),
                    admin::MAX_TRUSTEE_TOKEN_SECS
                );
                (ed, AdminKeyKind::TrusteeEd25519)
            } else {
                return Err(KbsError::AdminKey(key.public_key.clone()));
            };
            admin_keys.push(AdminKey {
                key: decoding,
                roles: key.roles.clone(),
                kind,
            });
        }
        let tdx_collateral = match &config.attestation.tdx_collateral {
            Some(path) => Some(load_collateral(path)?),
            None => None,
        };
        let amd_certs = match &config.attestation.amd_certs {
            Some(path) => {
                let pem =
                    std::fs::read(path).map_err(|e| KbsError::AmdCertsRead(path.clone(), e))?;
                parse_pem_certificates(&pem).map_err(|e| KbsError::AmdCerts(path.clone(), e))?
            }
            None => Vec::new(),
        };
        let base_anchors = TrustAnchors {
            software_tee_roots: Vec::new(),
            accept_sample: config.attestation.accept_sample,
            tdx_collateral,
            amd_certs,
        };
        let attestation_rego = stored_text(&store, store::ATTESTATION_POLICY)?
            .unwrap_or_else(|| policy::DEFAULT_ATTESTATION_POLICY.to_string());
        let resource_rego = stored_text(&store, store::RESOURCE_POLICY)?
            .unwrap_or_else(|| policy::DEFAULT_RESOURCE_POLICY.to_string());
        let kbs = Kbs {
            attestation_policy: Policy::attestation(&attestation_rego)?,
            resource_policy: Policy::resource(&resource_rego)?,
            verifier: RwLock::new(Arc::new(Verifier::new(base_anchors.clone()))),
            store,
            tokens,
            sessions: Mutex::new(sessions::SessionTable::default()),
            admin_keys,
            admin_jtis: Mutex::new(std::collections::HashMap::new()),
            started_secs: token::now_secs(),
            policy_writes: Mutex::new(()),
            session_ttl: Duration::from_secs(config.session_ttl_secs),
            token_ttl: Duration::from_secs(config.token_ttl_secs),
            base_anchors,
        };
        kbs.reload_software_roots()?;
        Ok(Arc::new(kbs))
    }

    /// Rebuilds the verifier with the software-TEE roots in the store.
    pub(crate) fn reload_software_roots(&self) -> Result<(), KbsError> {
        let roots = match self.store.setting(store::SOFTWARE_TEE_ROOTS)? {
            Some(pem) => parse_pem_certificates(&pem).map_err(KbsError::Roots)?,
            None => Vec::new(),
        };
        let anchors = TrustAnchors {
            software_tee_roots: roots,
            ..self.base_anchors.clone()
        };
        let mut verifier = self.verifier.write().map_err(|_| KbsError::Poisoned)?;
        *verifier = Arc::new(Verifier::new(anchors));
        Ok(())
    }

    pub(crate) fn verifier(&self) -> Arc<Verifier> {
        match self.verifier.read() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Records admin token `jti`; false if it was seen before. Only tokens
    /// with a valid admin signature get here, so the set is bounded by what
    /// admins send within the tokens' (capped) lifetimes.
    pub(crate) fn admin_token_first_use(&self, jti: &str, exp: u64) -> bool {
        let Ok(mut seen) = self.admin_jtis.lock() else {
            return false;
        };
        let now = token::now_secs();
        seen.retain(|_, e| *e + 60 >= now);
        seen.insert(jti.to_string(), exp).is_none()
    }

    /// Drops expired sessions.
    pub fn purge_expired(&self) {
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.purge_expired(Instant::now());
        }
    }

    /// The PEM public key that verifies this KBS's tokens.
    pub fn token_public_key(&self) -> &str {
        &self.tokens.public_pem
    }
}

fn stored_text(store: &Store, key: &str) -> Result<Option<String>, KbsError> {
    match store.setting(key)? {
        Some(bytes) => Ok(Some(
            String::from_utf8(bytes).map_err(|_| KbsError::StoredText(key.to_string()))?,
        )),
        None => Ok(None),
    }
}

fn load_collateral(path: &Path) -> Result<kabuto_verifier::QuoteCollateralV3, KbsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| KbsError::CollateralRead(path.to_path_buf(), e))?;
    kabuto_verifier::tdx::collateral_from_json(&text)
        .map_err(|e| KbsError::Collateral(path.to_path_buf(), e))
}

/// A PEM bundle that is not certificates.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("PEM")]
    Pem(#[source] std::io::Error),
    #[error("no PEM CERTIFICATE blocks found")]
    NoCertificates,
}

/// DER certificates from a PEM bundle; anything else is an error.
pub fn parse_pem_certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, PemError> {
    let mut out = Vec::new();
    for item in rustls_pemfile::certs(&mut &pem[..]) {
        out.push(item.map_err(PemError::Pem)?.to_vec());
    }
    if out.is_empty() && !pem.iter().all(u8::is_ascii_whitespace) {
        return Err(PemError::NoCertificates);
    }
    Ok(out)
}

/// Why the KBS could not start (or reload its trust anchors).
#[derive(Debug, thiserror::Error)]
pub enum KbsError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    TokenKey(#[from] token::TokenKeyError),
    #[error("admin key {}", .0.display())]
    AdminKeyRead(std::path::PathBuf, #[source] std::io::Error),
    #[error("admin key {}: not a P-256 (ES256) or Ed25519 public key PEM", .0.display())]
    AdminKey(std::path::PathBuf),
    #[error("TDX collateral {}", .0.display())]
    CollateralRead(std::path::PathBuf, #[source] std::io::Error),
    #[error("TDX collateral {}", .0.display())]
    Collateral(std::path::PathBuf, #[source] kabuto_verifier::VerifyError),
    #[error("attestation.amd_certs {}", .0.display())]
    AmdCertsRead(std::path::PathBuf, #[source] std::io::Error),
    #[error("attestation.amd_certs {}", .0.display())]
    AmdCerts(std::path::PathBuf, #[source] PemError),
    #[error("stored {0} is not UTF-8")]
    StoredText(String),
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    #[error("the stored software-TEE roots")]
    Roots(#[source] PemError),
    #[error("verifier lock poisoned")]
    Poisoned,
    #[error("tls.cert and tls.key are required")]
    NoTlsKeyPair,
    #[error("TLS key pair {} / {}", cert.display(), key.display())]
    TlsKeyPair {
        cert: std::path::PathBuf,
        key: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serving")]
    Serve(#[source] std::io::Error),
}

/// All routes. Paths follow the CoCo KBS API.
pub fn router(kbs: Arc<Kbs>) -> Router {
    Router::new()
        .route("/kbs/v0/auth", post(api::auth))
        .route("/kbs/v0/attest", post(api::attest))
        .route(
            "/kbs/v0/resource/{repository}/{kind}/{tag}",
            get(api::get_resource)
                .post(admin::set_resource)
                .delete(admin::delete_resource),
        )
        .route(
            "/kbs/v0/attestation-policy",
            post(admin::set_attestation_policy),
        )
        .route("/kbs/v0/resource-policy", post(admin::set_resource_policy))
        .route("/kbs/v0/reference-values", get(admin::get_reference_values))
        .route(
            "/kbs/v0/reference-values/{name}",
            post(admin::set_reference_values),
        )
        .route(
            "/kbs/v0/software-tee-roots",
            post(admin::set_software_tee_roots),
        )
        .route("/kbs/v0/token-key", get(api::token_key))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(kbs)
}

/// Serves until SIGINT/SIGTERM.
pub async fn serve(config: Config) -> Result<(), KbsError> {
    let kbs = Kbs::new(&config)?;
    let purger = kbs.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            purger.purge_expired();
        }
    });
    let app = router(kbs);
    let handle = axum_server::Handle::new();
    let shutdown = handle.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        shutdown.graceful_shutdown(Some(Duration::from_secs(5)));
    });
    if config.tls.insecure_http {
        log::warn!(
            "serving plain HTTP on {} (tls.insecure_http; loopback only)",
            config.listen
        );
        axum_server::bind(config.listen)
            .handle(handle)
            .serve(app.into_make_service_with_connect_info::<std::net::SocketAddr>())
            .await
            .map_err(KbsError::Serve)?;
    } else {
        let (cert, key) = match (&config.tls.cert, &config.tls.key) {
            (Some(c), Some(k)) => (c, k),
            _ => return Err(KbsError::NoTlsKeyPair),
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
            .await
            .map_err(|e| KbsError::TlsKeyPair {
                cert: cert.clone(),
                key: key.clone(),
                source: e,
            })?;
        log::info!("serving HTTPS on {}", config.listen);
        axum_server::bind_rustls(config.listen, tls)
            .handle(handle)
            .serve(app.into_make_service_with_connect_info::<std::net::SocketAddr>())
            .await
            .map_err(KbsError::Serve)?;
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}
