//! A small OCI distribution client for the guest: manifests (indexes and
//! Docker manifest lists resolved to linux/amd64), configs and layer blobs,
//! every one checked against its digest; anonymous, basic and bearer-token
//! auth. Hand-written on `ureq` (blocking, rustls) because the guest agent
//! is not async and `oci-client` would bring an async runtime into the
//! guest image.

use std::{collections::HashMap, io::Read, time::Duration};

use base64::{engine::general_purpose::STANDARD, Engine as _};

use crate::ocicrypt::LayerDescriptor;
pub use kabuto_oci::{platform_entry, ImageReference, INDEX_TYPES, MANIFEST_TYPES};

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
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
    #[error("{what} {digest}: the registry sent content with digest {actual}")]
    Digest {
        what: &'static str,
        digest: String,
        actual: String,
    },
    #[error("{0}")]
    Manifest(String),
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
    fn time_left(&self) -> Result<Option<Duration>, String> {
        match self.deadline {
            None => Ok(None),
            Some(d) => match d.checked_duration_since(std::time::Instant::now()) {
                Some(left) if !left.is_zero() => Ok(Some(left)),
                _ => Err(DEADLINE_PASSED.into()),
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
        let http = |reason: String| RegistryError::Http {
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
                            return Err(http("401: the credentials were refused".into()))
                        }
                        _ => return Err(http("401: the registry wants credentials".into())),
                    }
                }
                Err(ureq::Error::Status(code, response)) => {
                    let body = response.into_string().unwrap_or_default();
                    let body: String = body.chars().take(300).collect();
                    return Err(http(format!("{code}: {body}")));
                }
                Err(e) => return Err(http(e.to_string())),
            }
        }
        Err(http("401 after authenticating".into()))
    }

    /// A bearer token from the realm a `WWW-Authenticate: Bearer` names.
    /// The realm is the registry's word: credentials go to it only over
    /// https, or over plain http to the very host of a registry the owner
    /// configured as insecure (the challenge must not send them elsewhere in
    /// clear).
    fn token(&self, params: &str, registry_url: &str) -> Result<String, String> {
        let mut fields = HashMap::new();
        for part in params.split(',') {
            if let Some((k, v)) = part.trim().split_once('=') {
                fields.insert(k.to_string(), v.trim_matches('"').to_string());
            }
        }
        let realm = fields
            .get("realm")
            .ok_or("the bearer challenge has no realm")?;
        if self.credentials.is_some() && !realm_may_get_credentials(realm, registry_url) {
            return Err(format!(
                "the bearer challenge names the realm {realm}: credentials are sent only over https (or plain http to the insecure registry's own host)"
            ));
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
            .map_err(|e| format!("token from {realm}: {e}"))?
            .into_json()
            .map_err(|e| format!("token from {realm}: {e}"))?;
        body.get("token")
            .or_else(|| body.get("access_token"))
            .and_then(|t| t.as_str())
            .map(String::from)
            .ok_or_else(|| format!("token from {realm}: no token in the answer"))
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
                reason: e.to_string(),
            })?;
        if body.len() as u64 > limit {
            return Err(RegistryError::Http {
                url: url.into(),
                reason: format!("larger than {limit} bytes"),
            });
        }
        Ok(body)
    }

    /// Uploads `data` as a blob of `image`'s repository (monolithic
    /// upload: POST, then PUT with the digest); returns its digest.
    pub fn push_blob(
        &mut self,
        image: &ImageReference,
        data: &[u8],
    ) -> Result<String, RegistryError> {
        let digest = crate::sha256_digest(data);
        let start = self.url(image, "blobs/uploads/");
        let response = self.send(
            image,
            "POST",
            &start,
            "*/*",
            Some(("application/octet-stream", &[])),
            None,
        )?;
        let location = response
            .header("Location")
            .ok_or_else(|| RegistryError::Http {
                url: start.clone(),
                reason: "the upload has no Location".into(),
            })?
            .to_string();
        let location = if location.starts_with("http://") || location.starts_with("https://") {
            location
        } else {
            // Relative to the registry's root.
            let root = start.split("/v2/").next().unwrap_or_default();
            format!("{root}{location}")
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{separator}digest={digest}");
        self.send(
            image,
            "PUT",
            &put,
            "*/*",
            Some(("application/octet-stream", data)),
            None,
        )?;
        Ok(digest)
    }

    /// Uploads a manifest under `tag`; returns its digest.
    pub fn push_manifest(
        &mut self,
        image: &ImageReference,
        tag: &str,
        media_type: &str,
        manifest: &[u8],
    ) -> Result<String, RegistryError> {
        let url = self.url(image, &format!("manifests/{tag}"));
        self.send(
            image,
            "PUT",
            &url,
            "*/*",
            Some((media_type, manifest)),
            None,
        )?;
        Ok(crate::sha256_digest(manifest))
    }

    /// A plain GET of `url` (a lookaside signature store): `None` on 404.
    pub fn get_url(&self, url: &str, limit: u64) -> Result<Option<Vec<u8>>, RegistryError> {
        let http = |reason: String| RegistryError::Http {
            url: url.into(),
            reason,
        };
        match self.agent.get(url).call() {
            Ok(response) => Self::read_limited(response, limit, url).map(Some),
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(ureq::Error::Status(code, _)) => Err(http(format!("status {code}"))),
            Err(e) => Err(http(e.to_string())),
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
                    reason: format!("no memory for {size} bytes"),
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
                        reason: format!("{e} (after {MAX_RESUMES} resumed attempts)"),
                    })
                }
            }
        }
        if body.len() as u64 > limit {
            return Err(RegistryError::Http {
                url,
                reason: format!("larger than {limit} bytes"),
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

    /// Manifest, config and every layer of `image`.
    pub fn pull(&mut self, image: &ImageReference) -> Result<PulledImage, RegistryError> {
        let (manifest_digest, manifest) = self.manifest(image)?;
        self.fetch(image, manifest_digest, &manifest)
    }

    /// Config and layers of a manifest [`RegistryClient::manifest`] returned.
    pub fn fetch(
        &mut self,
        image: &ImageReference,
        manifest_digest: String,
        manifest: &serde_json::Value,
    ) -> Result<PulledImage, RegistryError> {
        let (config, descriptors) = self.fetch_config(image, manifest)?;
        let blobs = self.fetch_layers(image, &descriptors)?;
        Ok(PulledImage {
            manifest_digest,
            config,
            layers: descriptors.into_iter().zip(blobs).collect(),
        })
    }

    /// The config blob and the layer descriptors of a manifest (no layer is
    /// fetched).
    pub fn fetch_config(
        &mut self,
        image: &ImageReference,
        manifest: &serde_json::Value,
    ) -> Result<(Vec<u8>, Vec<LayerDescriptor>), RegistryError> {
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .ok_or_else(|| RegistryError::Manifest("the manifest has no config".into()))?
            .to_string();
        let config = self.blob(image, &config_digest, "config", MAX_MANIFEST_BYTES, None)?;
        let descriptors = manifest["layers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|layer| {
                serde_json::from_value::<LayerDescriptor>(layer)
                    .map_err(|e| RegistryError::Manifest(format!("a layer descriptor: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((config, descriptors))
    }

    /// Hands each layer blob to `consume` in order while later ones are
    /// fetched: up to [`PARALLEL_LAYER_FETCHES`] downloads at once, and no
    /// fetch runs further than that ahead of `consume`, so at most that many
    /// blobs (plus the one being consumed) are in memory, not the whole
    /// image. Stops at the first error of either side.
    pub fn for_each_layer<E>(
        &mut self,
        image: &ImageReference,
        descriptors: &[LayerDescriptor],
        mut consume: impl FnMut(usize, Vec<u8>) -> Result<(), E>,
        fetch_error: impl Fn(RegistryError) -> E,
    ) -> Result<(), E> {
        use std::sync::{Condvar, Mutex};
        struct Window {
            next_to_fetch: usize,
            consumed: usize,
            in_flight: usize,
            stop: bool,
            slots: Vec<Option<Result<Vec<u8>, RegistryError>>>,
        }
        let n = descriptors.len();
        let window = Mutex::new(Window {
            next_to_fetch: 0,
            consumed: 0,
            in_flight: 0,
            stop: false,
            slots: (0..n).map(|_| None).collect(),
        });
        let changed = Condvar::new();
        fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
            m.lock().unwrap_or_else(|p| p.into_inner())
        }
        std::thread::scope(|scope| {
            for _ in 0..PARALLEL_LAYER_FETCHES.min(n) {
                // Clones share the connection pool and the tokens so far.
                let mut client = self.clone();
                let (window, changed) = (&window, &changed);
                scope.spawn(move || loop {
                    let i = {
                        let mut w = lock(window);
                        while !w.stop
                            && w.next_to_fetch < n
                            && w.next_to_fetch >= w.consumed + PARALLEL_LAYER_FETCHES
                        {
                            w = changed.wait(w).unwrap_or_else(|p| p.into_inner());
                        }
                        if w.stop || w.next_to_fetch >= n {
                            break;
                        }
                        w.next_to_fetch += 1;
                        w.in_flight += 1;
                        w.next_to_fetch - 1
                    };
                    // The manifest's size bounds what the registry may send.
                    let size = Some(descriptors[i].size).filter(|&s| s > 0);
                    let limit = size.map_or(MAX_BLOB_BYTES, |s| s.min(MAX_BLOB_BYTES));
                    let blob = client.blob(image, &descriptors[i].digest, "layer", limit, size);
                    let mut w = lock(window);
                    w.in_flight -= 1;
                    w.stop |= blob.is_err();
                    w.slots[i] = Some(blob);
                    changed.notify_all();
                });
            }
            let mut result = Ok(());
            for i in 0..n {
                let blob = {
                    let mut w = lock(&window);
                    while w.slots[i].is_none() && !(w.stop && w.in_flight == 0) {
                        w = changed.wait(w).unwrap_or_else(|p| p.into_inner());
                    }
                    match w.slots[i].take() {
                        Some(Ok(blob)) => {
                            w.consumed = i + 1;
                            changed.notify_all();
                            blob
                        }
                        Some(Err(e)) => {
                            result = Err(fetch_error(e));
                            break;
                        }
                        None => {
                            // Stopped by a failed fetch of a later layer.
                            let e = w.slots.iter_mut().find_map(|s| match s.take() {
                                Some(Err(e)) => Some(e),
                                _ => None,
                            });
                            result = Err(fetch_error(e.unwrap_or_else(|| {
                                RegistryError::Manifest("a layer was not fetched".into())
                            })));
                            break;
                        }
                    }
                };
                if let Err(e) = consume(i, blob) {
                    result = Err(e);
                    break;
                }
            }
            let mut w = lock(&window);
            w.stop = true;
            changed.notify_all();
            drop(w);
            result
        })
    }

    /// Layer blobs, up to [`PARALLEL_LAYER_FETCHES`] at a time, in order
    /// (all of them in memory: for host tools; the guest pull streams).
    fn fetch_layers(
        &mut self,
        image: &ImageReference,
        descriptors: &[LayerDescriptor],
    ) -> Result<Vec<Vec<u8>>, RegistryError> {
        let mut blobs = Vec::with_capacity(descriptors.len());
        self.for_each_layer(
            image,
            descriptors,
            |_, blob| {
                blobs.push(blob);
                Ok(())
            },
            |e| e,
        )?;
        Ok(blobs)
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
mod tests {
    use super::*;

    /// Layers reach the consumer in order while later ones download, and
    /// downloads never run more than the window ahead of it: a pull holds a
    /// few blobs, not the image. A consumer's error stops the downloads.
    #[test]
    fn layers_stream_in_order_within_the_read_ahead_window() {
        use crate::sha256_digest;
        let blob = vec![9u8; 4096];
        let (address, seen) = flaky_blob_server(blob.clone(), 0);
        let image = ImageReference::parse(&format!("{address}/app:1")).expect("reference");
        let descriptor = crate::LayerDescriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            digest: sha256_digest(&blob),
            size: blob.len() as u64,
            annotations: Default::default(),
        };
        let descriptors = vec![descriptor; 8];
        let mut client = RegistryClient::new(vec![address.clone()], None);
        let mut order = Vec::new();
        let mut most_requested = 0;
        client
            .for_each_layer(
                &image,
                &descriptors,
                |i, got| {
                    // Give the fetchers time to run as far ahead as they may.
                    std::thread::sleep(Duration::from_millis(150));
                    let requested = seen.lock().expect("log").len();
                    most_requested = most_requested.max(requested - i);
                    assert_eq!(got, blob);
                    order.push(i);
                    Ok::<(), RegistryError>(())
                },
                |e| e,
            )
            .expect("streams");
        assert_eq!(order, (0..8).collect::<Vec<_>>());
        assert!(
            most_requested <= PARALLEL_LAYER_FETCHES + 1,
            "{most_requested} requests ahead of the consumer"
        );

        let before = seen.lock().expect("log").len();
        let err = client
            .for_each_layer(
                &image,
                &descriptors,
                |i, _| if i == 1 { Err("stop") } else { Ok(()) },
                |_| "fetch",
            )
            .expect_err("consumer error");
        assert_eq!(err, "stop");
        let fetched = seen.lock().expect("log").len() - before;
        assert!(
            fetched < descriptors.len(),
            "{fetched} fetched after the stop"
        );
    }

    #[test]
    fn no_request_runs_past_the_deadline() {
        let (address, seen) = flaky_blob_server(vec![7; 1024], 0);
        let image = ImageReference::parse(&format!("{address}/app:1")).expect("reference");
        let mut client = RegistryClient::new(vec![address.clone()], None)
            .with_deadline(Some(std::time::Instant::now()));
        let err = client
            .blob(&image, "sha256:00", "layer", 4096, None)
            .expect_err("past the deadline");
        assert!(err.to_string().contains(DEADLINE_PASSED), "{err}");
        assert!(
            seen.lock().expect("log").is_empty(),
            "nothing was sent after the deadline"
        );
    }

    #[test]
    fn credentials_go_only_to_realms_over_https_or_the_insecure_registry_itself() {
        let https_registry = "https://r.example/v2/app/manifests/1";
        let http_registry = "http://127.0.0.1:5000/v2/app/manifests/1";
        assert!(realm_may_get_credentials(
            "https://auth.example/token",
            https_registry
        ));
        assert!(realm_may_get_credentials(
            "HTTPS://auth.example/token",
            http_registry
        ));
        // A challenge naming a plain-http realm elsewhere: refused.
        assert!(!realm_may_get_credentials(
            "http://auth.example/token",
            https_registry
        ));
        assert!(!realm_may_get_credentials(
            "http://evil.example/token",
            http_registry
        ));
        assert!(!realm_may_get_credentials(
            "http://127.0.0.1:6000/token",
            http_registry
        ));
        // Plain http to the insecure registry's own host and port.
        assert!(realm_may_get_credentials(
            "http://127.0.0.1:5000/token?x=1",
            http_registry
        ));
        assert!(!realm_may_get_credentials(
            "ftp://auth.example/token",
            https_registry
        ));
        assert!(!realm_may_get_credentials("http://", http_registry));
    }

    /// A registry stand-in serving one blob: the first `drops` responses
    /// send half of it and close the connection; later ones honour Range.
    /// Returns its address and the request heads it saw.
    fn flaky_blob_server(
        blob: Vec<u8>,
        drops: usize,
    ) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use std::io::{BufRead as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone"));
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let from = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("range: bytes=")
                            .map(str::to_owned)
                    })
                    .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
                log.lock().expect("log").push(head);
                let _ = if n < drops {
                    let half = blob.len() / 2;
                    stream
                        .write_all(
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", blob.len())
                                .as_bytes(),
                        )
                        .and_then(|_| stream.write_all(&blob[..half]))
                } else if let Some(from) = from {
                    stream
                        .write_all(
                            format!(
                                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\n\r\n",
                                blob.len() - from,
                                blob.len() - 1,
                                blob.len()
                            )
                            .as_bytes(),
                        )
                        .and_then(|_| stream.write_all(&blob[from..]))
                } else {
                    stream
                        .write_all(
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", blob.len())
                                .as_bytes(),
                        )
                        .and_then(|_| stream.write_all(&blob))
                };
            }
        });
        (address, seen)
    }

    #[test]
    fn a_dropped_download_resumes_where_it_stopped() {
        let blob: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let digest = crate::sha256_digest(&blob);
        let (address, seen) = flaky_blob_server(blob.clone(), 1);
        let image = ImageReference::parse(&format!("{address}/r/x:1")).expect("reference");
        let mut client = RegistryClient::new(vec![address.clone()], None);
        let got = client
            .blob(&image, &digest, "layer", 1 << 30, None)
            .expect("resumed download");
        assert!(got == blob, "the resumed blob is the blob");
        let heads = seen.lock().expect("log").clone();
        assert_eq!(heads.len(), 2, "{heads:?}");
        assert!(
            heads[1]
                .to_ascii_lowercase()
                .contains("range: bytes=150000-"),
            "{}",
            heads[1]
        );

        // A server that always drops: an error once the resumes are spent.
        let (address, _) = flaky_blob_server(blob, usize::MAX);
        let image = ImageReference::parse(&format!("{address}/r/x:1")).expect("reference");
        let mut client = RegistryClient::new(vec![address], None);
        let e = client
            .blob(&image, &digest, "layer", 1 << 30, None)
            .expect_err("never completes");
        assert!(e.to_string().contains("resumed attempts"), "{e}");
    }

    #[test]
    fn references_parse_like_docker() {
        let r = |s: &str| ImageReference::parse(s).expect(s);
        assert_eq!(
            r("busybox"),
            ImageReference {
                registry: "docker.io".into(),
                repository: "library/busybox".into(),
                reference: "latest".into()
            }
        );
        assert_eq!(r("team/app:v1").repository, "team/app");
        let local = r("127.0.0.1:5000/kabuto/busybox:1");
        assert_eq!(
            (
                local.registry.as_str(),
                local.repository.as_str(),
                local.reference.as_str()
            ),
            ("127.0.0.1:5000", "kabuto/busybox", "1")
        );
        let pinned = r("localhost/app@sha256:ab");
        assert_eq!(pinned.reference, "sha256:ab");
        assert_eq!(r("busybox").api_host(), "registry-1.docker.io");
        assert!(ImageReference::parse("UPPER/case").is_err());
        assert!(ImageReference::parse("").is_err());
    }
}

/// A layer ready to unpack: decrypted where it was encrypted.
#[derive(Debug)]
pub struct PlainLayer {
    pub media_type: String,
    pub digest: String,
    pub data: Vec<u8>,
}

impl PlainLayer {
    /// The pulled `blob` of `descriptor`, decrypted in place with `keys` if
    /// it is encrypted (HMAC and digest checked).
    pub fn new(
        descriptor: LayerDescriptor,
        blob: Vec<u8>,
        keys: &[kabuto_jose::TeeKeyPair],
    ) -> Result<PlainLayer, crate::ocicrypt::DecryptError> {
        Ok(if descriptor.is_encrypted() {
            PlainLayer {
                media_type: descriptor.decrypted_media_type().to_string(),
                data: crate::ocicrypt::decrypt_layer(&descriptor, blob, keys)?,
                digest: descriptor.digest,
            }
        } else {
            PlainLayer {
                media_type: descriptor.media_type,
                digest: descriptor.digest,
                data: blob,
            }
        })
    }

    pub fn as_layer(&self) -> crate::unpack::Layer<'_> {
        crate::unpack::Layer {
            digest: &self.digest,
            media_type: &self.media_type,
            data: &self.data,
        }
    }
}

impl PulledImage {
    /// The layers in order, encrypted ones decrypted with `keys` (HMAC and
    /// digest checked); a plain layer is taken as pulled.
    pub fn plain_layers(
        self,
        keys: &[kabuto_jose::TeeKeyPair],
    ) -> Result<Vec<PlainLayer>, crate::ocicrypt::DecryptError> {
        self.layers
            .into_iter()
            .map(|(descriptor, blob)| PlainLayer::new(descriptor, blob, keys))
            .collect()
    }
}
