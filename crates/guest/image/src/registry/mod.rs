//! A small OCI distribution client for the guest: manifests (indexes and
//! Docker manifest lists resolved to linux/amd64), configs and layer blobs,
//! every one checked against its digest; anonymous, basic and bearer-token
//! auth. Hand-written on `ureq` (blocking, rustls) because the guest agent
//! is not async and `oci-client` would bring an async runtime into the
//! guest image.

use std::{collections::HashMap, io::Read, time::Duration};

use base64::{engine::general_purpose::STANDARD, Engine as _};

mod layers;
mod push;

use crate::ocicrypt::LayerDescriptor;
pub use kabuto_oci::{platform_entry, ImageReference, INDEX_TYPES, MANIFEST_TYPES};
pub use layers::PlainLayer;

/// Largest manifest or config accepted.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Largest layer blob accepted.
const MAX_BLOB_BYTES: u64 = 8 << 30;
/// Layers fetched at once (CoCo's default is 3 too).
const PARALLEL_LAYER_FETCHES: usize = 3;
/// How often one blob download resumes (`Range`) after a dropped connection.
const MAX_RESUMES: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0:?} is not an image reference")]
    Reference(String),
    #[error("{url}")]
    Http {
        url: String,
        #[source]
        reason: HttpError,
    },
    #[error("{what} {digest}: the registry sent content with digest {actual}")]
    Digest {
        what: &'static str,
        digest: String,
        actual: String,
    },
    #[error("{0}")]
    Manifest(String),
}

/// What went wrong with one request to a registry (or a lookaside store).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{DEADLINE_PASSED}")]
    DeadlinePassed,
    #[error("the bearer challenge has no realm")]
    NoRealm,
    #[error(
        "the bearer challenge names the realm {0}: credentials are sent only over https (or \
         plain http to the insecure registry's own host)"
    )]
    CleartextRealm(String),
    #[error("token from {0}")]
    Token(String, #[source] Box<ureq::Error>),
    #[error("token from {0}")]
    TokenBody(String, #[source] std::io::Error),
    #[error("token from {0}: no token in the answer")]
    NoToken(String),
    #[error("401: the credentials were refused")]
    CredentialsRefused,
    #[error("401: the registry wants credentials")]
    CredentialsWanted,
    #[error("401 after authenticating")]
    Unauthorized,
    #[error("{code}: {body}")]
    Status { code: u16, body: String },
    #[error("status {0}")]
    StatusCode(u16),
    #[error(transparent)]
    Transport(Box<ureq::Error>),
    #[error("reading the body")]
    Read(#[source] std::io::Error),
    #[error("reading the body (after {MAX_RESUMES} resumed attempts)")]
    ReadResumed(#[source] std::io::Error),
    #[error("larger than {0} bytes")]
    TooLarge(u64),
    #[error("no memory for {0} bytes")]
    NoMemory(u64),
    #[error("the upload has no Location")]
    NoLocation,
}

impl From<kabuto_oci::ReferenceError> for RegistryError {
    fn from(e: kabuto_oci::ReferenceError) -> Self {
        RegistryError::Reference(e.0)
    }
}

/// A reference resolved to its platform's image manifest.
#[derive(Debug, Clone)]
pub struct ResolvedManifest {
    /// Digest of what the reference names — an index for multi-platform
    /// images: what signatures sign (as cosign and containers/image do).
    pub top_digest: String,
    /// Digest of the linux/amd64 image manifest.
    pub digest: String,
    pub manifest: serde_json::Value,
}

/// An image pulled from a registry, checked against its digests.
#[derive(Debug)]
pub struct PulledImage {
    /// Digest of the platform's image manifest.
    pub manifest_digest: String,
    pub config: Vec<u8>,
    /// Layer descriptors and blobs, in order.
    pub layers: Vec<(LayerDescriptor, Vec<u8>)>,
}

#[derive(Clone)]
pub struct RegistryClient {
    agent: ureq::Agent,
    /// `host:port`s reached over plain HTTP.
    insecure: Vec<String>,
    credentials: Option<(String, String)>,
    /// Bearer tokens by `registry/repository`.
    tokens: HashMap<String, String>,
    /// No request may run past this (the whole pull's deadline).
    deadline: Option<std::time::Instant>,
}

impl RegistryClient {
    pub fn new(insecure: Vec<String>, credentials: Option<(String, String)>) -> RegistryClient {
        RegistryClient {
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(10))
                .timeout_read(Duration::from_secs(60))
                .build(),
            insecure,
            credentials,
            tokens: HashMap::new(),
            deadline: None,
        }
    }

    /// Every request of this client ends by `deadline` (connect, send and
    /// the whole body), or fails saying so.
    pub fn with_deadline(mut self, deadline: Option<std::time::Instant>) -> RegistryClient {
        self.deadline = deadline;
        self
    }

    /// The time left before the deadline; an error once it has passed.
    fn time_left(&self) -> Result<Option<Duration>, HttpError> {
        match self.deadline {
            None => Ok(None),
            Some(d) => match d.checked_duration_since(std::time::Instant::now()) {
                Some(left) if !left.is_zero() => Ok(Some(left)),
                _ => Err(HttpError::DeadlinePassed),
            },
        }
    }

    fn url(&self, image: &ImageReference, path: &str) -> String {
        let host = image.api_host();
        let scheme = if self.insecure.iter().any(|h| h == host) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{host}/v2/{}/{path}", image.repository)
    }

    /// GET with the auth the registry asks for; returns the response.
    fn get(
        &mut self,
        image: &ImageReference,
        path: &str,
        accept: &str,
    ) -> Result<ureq::Response, RegistryError> {
        let url = self.url(image, path);
        self.send(image, "GET", &url, accept, None, None)
    }

    /// One request with the auth the registry asks for (a bearer token for
    /// the scope its challenge names, or basic credentials). `body`:
    /// content type and bytes.
    fn send(
        &mut self,
        image: &ImageReference,
        method: &str,
        url: &str,
        accept: &str,
        body: Option<(&str, &[u8])>,
        range: Option<&str>,
    ) -> Result<ureq::Response, RegistryError> {
        let url = url.to_string();
        let key = format!("{}/{}", image.registry, image.repository);
        let http = |reason: HttpError| RegistryError::Http {
            url: url.clone(),
            reason,
        };
        for attempt in 0..2 {
            let mut request = self.agent.request(method, &url).set("Accept", accept);
            if let Some(left) = self.time_left().map_err(http)? {
                request = request.timeout(left);
            }
            if let Some(range) = range {
                request = request.set("Range", range);
            }
            if let Some(token) = self.tokens.get(&key) {
                request = request.set("Authorization", &format!("Bearer {token}"));
            } else if let Some((user, pass)) = &self.credentials {
                let basic = STANDARD.encode(format!("{user}:{pass}"));
                request = request.set("Authorization", &format!("Basic {basic}"));
            }
            let sent = match body {
                Some((content_type, bytes)) => {
                    request.set("Content-Type", content_type).send_bytes(bytes)
                }
                None => request.call(),
            };
            match sent {
                Ok(response) => return Ok(response),
                Err(ureq::Error::Status(401, response)) if attempt == 0 => {
                    let challenge = response
                        .header("WWW-Authenticate")
                        .unwrap_or("")
                        .to_string();
                    match challenge.split_once(' ') {
                        Some((scheme, params)) if scheme.eq_ignore_ascii_case("bearer") => {
                            let token = self.token(params, &url).map_err(http)?;
                            self.tokens.insert(key.clone(), token);
                        }
                        _ if self.credentials.is_some() => {
                            return Err(http(HttpError::CredentialsRefused))
                        }
                        _ => return Err(http(HttpError::CredentialsWanted)),
                    }
                }
                Err(ureq::Error::Status(code, response)) => {
                    let body = response.into_string().unwrap_or_default();
                    let body: String = body.chars().take(300).collect();
                    return Err(http(HttpError::Status { code, body }));
                }
                Err(e) => return Err(http(HttpError::Transport(Box::new(e)))),
            }
        }
        Err(http(HttpError::Unauthorized))
    }

    /// A bearer token from the realm a `WWW-Authenticate: Bearer` names.
    /// The realm is the registry's word: credentials go to it only over
    /// https, or over plain http to the very host of a registry the owner
    /// configured as insecure (the challenge must not send them elsewhere in
    /// clear).
    fn token(&self, params: &str, registry_url: &str) -> Result<String, HttpError> {
        let mut fields = HashMap::new();
        for part in params.split(',') {
            if let Some((k, v)) = part.trim().split_once('=') {
                fields.insert(k.to_string(), v.trim_matches('"').to_string());
            }
        }
        let realm = fields.get("realm").ok_or(HttpError::NoRealm)?;
        if self.credentials.is_some() && !realm_may_get_credentials(realm, registry_url) {
            return Err(HttpError::CleartextRealm(realm.clone()));
        }
        let mut request = self.agent.get(realm);
        if let Some(left) = self.time_left()? {
            request = request.timeout(left);
        }
        for name in ["service", "scope"] {
            if let Some(v) = fields.get(name) {
                request = request.query(name, v);
            }
        }
        if let Some((user, pass)) = &self.credentials {
            let basic = STANDARD.encode(format!("{user}:{pass}"));
            request = request.set("Authorization", &format!("Basic {basic}"));
        }
        let body: serde_json::Value = request
            .call()
            .map_err(|e| HttpError::Token(realm.clone(), Box::new(e)))?
            .into_json()
            .map_err(|e| HttpError::TokenBody(realm.clone(), e))?;
        body.get("token")
            .or_else(|| body.get("access_token"))
            .and_then(|t| t.as_str())
            .map(String::from)
            .ok_or_else(|| HttpError::NoToken(realm.clone()))
    }

    fn read_limited(
        response: ureq::Response,
        limit: u64,
        url: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        let mut body = Vec::new();
        response
            .into_reader()
            .take(limit + 1)
            .read_to_end(&mut body)
            .map_err(|e| RegistryError::Http {
                url: url.into(),
                reason: HttpError::Read(e),
            })?;
        if body.len() as u64 > limit {
            return Err(RegistryError::Http {
                url: url.into(),
                reason: HttpError::TooLarge(limit),
            });
        }
        Ok(body)
    }

    /// A plain GET of `url` (a lookaside signature store): `None` on 404.
    pub fn get_url(&self, url: &str, limit: u64) -> Result<Option<Vec<u8>>, RegistryError> {
        let http = |reason: HttpError| RegistryError::Http {
            url: url.into(),
            reason,
        };
        match self.agent.get(url).call() {
            Ok(response) => Self::read_limited(response, limit, url).map(Some),
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(ureq::Error::Status(code, _)) => Err(http(HttpError::StatusCode(code))),
            Err(e) => Err(http(HttpError::Transport(Box::new(e)))),
        }
    }

    /// The manifest `reference` names, followed through indexes to
    /// linux/amd64: (digest, manifest JSON).
    pub fn manifest(
        &mut self,
        image: &ImageReference,
    ) -> Result<(String, serde_json::Value), RegistryError> {
        let resolved = self.resolve(image)?;
        Ok((resolved.digest, resolved.manifest))
    }

    /// The reference resolved through indexes to the linux/amd64 image
    /// manifest, remembering what the reference itself named.
    pub fn resolve(&mut self, image: &ImageReference) -> Result<ResolvedManifest, RegistryError> {
        let mut reference = image.reference.clone();
        let mut top_digest = None;
        for _ in 0..3 {
            let accept = [MANIFEST_TYPES, INDEX_TYPES].concat().join(", ");
            let url = self.url(image, &format!("manifests/{reference}"));
            let response = self.get(image, &format!("manifests/{reference}"), &accept)?;
            let body = Self::read_limited(response, MAX_MANIFEST_BYTES, &url)?;
            let digest = crate::sha256_digest(&body);
            if reference.starts_with("sha256:") && digest != reference {
                return Err(RegistryError::Digest {
                    what: "manifest",
                    digest: reference,
                    actual: digest,
                });
            }
            let top_digest = top_digest.get_or_insert_with(|| digest.clone()).clone();
            let manifest: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| RegistryError::Manifest(format!("manifest {digest}: {e}")))?;
            let media_type = manifest["mediaType"].as_str().unwrap_or("");
            if INDEX_TYPES.contains(&media_type) || manifest.get("manifests").is_some() {
                let entry = platform_entry(&manifest).ok_or_else(|| {
                    RegistryError::Manifest(format!("index {digest} has no linux/amd64 image"))
                })?;
                reference = entry["digest"]
                    .as_str()
                    .ok_or_else(|| RegistryError::Manifest("an index entry has no digest".into()))?
                    .to_string();
                continue;
            }
            return Ok(ResolvedManifest {
                top_digest,
                digest,
                manifest,
            });
        }
        Err(RegistryError::Manifest("indexes nested too deep".into()))
    }

    /// A blob of at most `limit` bytes, checked against its digest. With
    /// `size` (the descriptor's), the buffer is allocated once: a layer is
    /// never copied while it grows.
    pub fn blob(
        &mut self,
        image: &ImageReference,
        digest: &str,
        what: &'static str,
        limit: u64,
        size: Option<u64>,
    ) -> Result<Vec<u8>, RegistryError> {
        if !digest.starts_with("sha256:") {
            return Err(RegistryError::Manifest(format!(
                "{what} digest {digest:?} is not sha256"
            )));
        }
        let url = self.url(image, &format!("blobs/{digest}"));
        let mut body = Vec::new();
        if let Some(size) = size.filter(|&s| s <= limit) {
            let bytes = usize::try_from(size + 1).unwrap_or(usize::MAX);
            body.try_reserve_exact(bytes)
                .map_err(|_| RegistryError::Http {
                    url: url.clone(),
                    reason: HttpError::NoMemory(size),
                })?;
        }
        let mut resumes = 0;
        loop {
            // After a dropped connection, ask for the rest only.
            let range = (!body.is_empty()).then(|| format!("bytes={}-", body.len()));
            let response = self.send(image, "GET", &url, "*/*", None, range.as_deref())?;
            if response.status() != 206 {
                body.clear();
            }
            let mut reader = response.into_reader().take(limit + 1 - body.len() as u64);
            match reader.read_to_end(&mut body) {
                Ok(_) => break,
                Err(e) if resumes < MAX_RESUMES => {
                    resumes += 1;
                    log::warn!(
                        "{url}: {e} after {} bytes; resuming ({resumes}/{MAX_RESUMES})",
                        body.len()
                    );
                }
                Err(e) => {
                    return Err(RegistryError::Http {
                        url,
                        reason: HttpError::ReadResumed(e),
                    })
                }
            }
        }
        if body.len() as u64 > limit {
            return Err(RegistryError::Http {
                url,
                reason: HttpError::TooLarge(limit),
            });
        }
        let actual = crate::sha256_digest(&body);
        if actual != digest {
            return Err(RegistryError::Digest {
                what,
                digest: digest.into(),
                actual,
            });
        }
        Ok(body)
    }
}

/// What a request made after the pull's deadline fails with.
pub const DEADLINE_PASSED: &str = "the pull's deadline passed";

/// Whether a bearer realm may receive the registry credentials.
fn realm_may_get_credentials(realm: &str, registry_url: &str) -> bool {
    let host_of = |rest: &str| {
        rest.split(['/', '?', '#'])
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    if realm.len() > 8 && realm[..8].eq_ignore_ascii_case("https://") {
        return true;
    }
    match (
        realm.strip_prefix("http://"),
        registry_url.strip_prefix("http://"),
    ) {
        (Some(realm_rest), Some(registry_rest)) => {
            let host = host_of(realm_rest);
            !host.is_empty() && host == host_of(registry_rest)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests;
