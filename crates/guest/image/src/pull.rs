//! One image pull as the guest does it: the registry to use (mirrors,
//! insecure opt-in, blocked registries from a `registries.conf`), the
//! signature policy, then config and layers, decryption and unpacking into
//! a directory nothing else can see. The host only ever names the image.

use std::collections::HashMap;
use std::path::Path;

use base64::{engine::general_purpose::STANDARD, Engine as _};
use serde::Deserialize;

use crate::{
    DecryptError, ImageReference, PlainLayer, RegistryClient, RegistryError, ResolvedManifest,
    SignatureError, SignaturePolicy, UnpackError, UnpackOptions,
};

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("image {image}")]
    Registry {
        image: String,
        #[source]
        source: RegistryError,
    },
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("image {image}")]
    Decrypt {
        image: String,
        #[source]
        source: DecryptError,
    },
    #[error("image {image}")]
    Unpack {
        image: String,
        #[source]
        source: UnpackError,
    },
    #[error("image {image}")]
    Config {
        image: String,
        #[source]
        source: kabuto_oci::ConfigError,
    },
    #[error("registries.conf: {0}")]
    Registries(String),
    #[error("registry credentials: {0}")]
    Credentials(String),
    #[error("image {image}: registry {registry} is blocked by registries.conf")]
    Blocked { image: String, registry: String },
}

/// `containers-registries.conf(5)` v2, the parts a guest pull uses:
/// `[[registry]]` with `prefix`, `location`, `insecure`, `blocked` and
/// `[[registry.mirror]]` (`location`, `insecure`). Other keys of a
/// `[[registry]]` are refused rather than silently ignored.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RegistriesConf {
    #[serde(default)]
    registry: Vec<RegistryEntry>,
    /// Accepted for compatibility; references are always fully qualified
    /// (Docker Hub when no registry is named).
    #[serde(default, rename = "unqualified-search-registries")]
    _unqualified_search_registries: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryEntry {
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    location: Option<String>,
    #[serde(default)]
    insecure: bool,
    #[serde(default)]
    blocked: bool,
    #[serde(default)]
    mirror: Vec<Mirror>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Mirror {
    location: String,
    #[serde(default)]
    insecure: bool,
}

/// Where one pull may come from, in the order to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub image: ImageReference,
    pub insecure: bool,
}

impl RegistriesConf {
    pub fn parse(text: &str) -> Result<RegistriesConf, PullError> {
        let conf: RegistriesConf = toml::from_str(text)
            .map_err(|e| PullError::Registries(crate::redact::toml(text, &e)))?;
        for entry in &conf.registry {
            if entry.prefix.is_none() && entry.location.is_none() {
                return Err(PullError::Registries(
                    "a [[registry]] has neither prefix nor location".into(),
                ));
            }
        }
        Ok(conf)
    }

    /// Plain HTTP for exactly these `host[:port]`s (a test's loopback
    /// registry, say), nothing else configured.
    pub fn insecure(hosts: &[&str]) -> RegistriesConf {
        RegistriesConf {
            registry: hosts
                .iter()
                .map(|h| RegistryEntry {
                    prefix: None,
                    location: Some(h.to_string()),
                    insecure: true,
                    blocked: false,
                    mirror: Vec::new(),
                })
                .collect(),
            _unqualified_search_registries: Vec::new(),
        }
    }

    /// Mirrors first, then the (possibly rewritten) primary location.
    pub fn sources(&self, image: &ImageReference) -> Result<Vec<Source>, PullError> {
        let name = format!("{}/{}", image.registry, image.repository);
        // The longest prefix wins; a prefix matches whole path components.
        let matches = |prefix: &str| {
            name == prefix
                || name
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('/'))
        };
        let entry = self
            .registry
            .iter()
            .filter_map(|e| {
                let prefix = e.prefix.as_deref().or(e.location.as_deref())?;
                matches(prefix).then_some((prefix, e))
            })
            .max_by_key(|(prefix, _)| prefix.len());
        let Some((prefix, entry)) = entry else {
            return Ok(vec![Source {
                image: image.clone(),
                insecure: false,
            }]);
        };
        if entry.blocked {
            return Err(PullError::Blocked {
                image: name,
                registry: prefix.to_string(),
            });
        }
        let rewrite = |location: &str| -> Result<ImageReference, PullError> {
            let rest = &name[prefix.len()..];
            let separator = if image.reference.starts_with("sha256:") {
                '@'
            } else {
                ':'
            };
            ImageReference::parse(&format!("{location}{rest}{separator}{}", image.reference))
                .map_err(|e| PullError::Registries(format!("location {location:?}: {e}")))
        };
        let mut sources = Vec::new();
        for mirror in &entry.mirror {
            sources.push(Source {
                image: rewrite(&mirror.location)?,
                insecure: mirror.insecure,
            });
        }
        sources.push(Source {
            image: rewrite(entry.location.as_deref().unwrap_or(prefix))?,
            insecure: entry.insecure,
        });
        Ok(sources)
    }
}

/// Registry credentials in the `auth.json` format of podman/skopeo and
/// Docker's `config.json`: `{"auths": {"host": {"auth": base64("user:pass")}}}`.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    by_registry: HashMap<String, (String, String)>,
}

impl Credentials {
    pub fn parse(json: &[u8]) -> Result<Credentials, PullError> {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            auths: HashMap<String, Entry>,
        }
        #[derive(Deserialize)]
        struct Entry {
            #[serde(default)]
            auth: Option<String>,
            #[serde(default)]
            username: Option<String>,
            #[serde(default)]
            password: Option<String>,
        }
        let file: File = serde_json::from_slice(json)
            .map_err(|e| PullError::Credentials(crate::redact::json(&e)))?;
        let mut by_registry = HashMap::new();
        for (host, entry) in file.auths {
            let pair = match (entry.auth, entry.username, entry.password) {
                (Some(auth), _, _) => {
                    let decoded = STANDARD
                        .decode(auth.trim())
                        .ok()
                        .and_then(|d| String::from_utf8(d).ok())
                        .ok_or_else(|| {
                            PullError::Credentials(format!("{host}: auth is not base64 text"))
                        })?;
                    let (user, pass) = decoded.split_once(':').ok_or_else(|| {
                        PullError::Credentials(format!("{host}: auth is not user:password"))
                    })?;
                    (user.to_string(), pass.to_string())
                }
                (None, Some(user), Some(pass)) => (user, pass),
                _ => {
                    return Err(PullError::Credentials(format!(
                        "{host}: neither auth nor username and password"
                    )))
                }
            };
            // Docker writes Hub's entry as a URL.
            let host = host
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string();
            by_registry.insert(host, pair);
        }
        Ok(Credentials { by_registry })
    }

    pub fn for_registry(&self, registry: &str) -> Option<(String, String)> {
        let hub = ["docker.io", "index.docker.io", "registry-1.docker.io"];
        self.by_registry.get(registry).cloned().or_else(|| {
            hub.contains(&registry)
                .then(|| hub.iter().find_map(|h| self.by_registry.get(*h).cloned()))
                .flatten()
        })
    }
}

/// Everything a pull needs besides the reference; all of it comes from the
/// pod's owner (init-data or the KBS), none from the host.
#[derive(Default)]
pub struct PullSettings {
    pub registries: RegistriesConf,
    pub credentials: Credentials,
    /// `None`: no policy set, any image is accepted.
    pub signature_policy: Option<SignaturePolicy>,
    /// Where `signedBy` (GPG) signatures are read from.
    pub lookaside: crate::signature::Lookaside,
    pub keys: Vec<kabuto_jose::TeeKeyPair>,
    pub unpack: UnpackOptions,
    /// The pull, with every request and the unpacking, ends by then or
    /// fails (nothing remains at the rootfs).
    pub deadline: Option<std::time::Instant>,
}

/// The parts of an image's config the runtime applies (OCI image spec
/// `config`), as containerd reads them; the owner's genpolicy reads the same
/// type.
pub use kabuto_oci::ImageConfig;

/// Where a pull's time went.
#[derive(Debug, Clone, Copy, Default)]
pub struct PullTimings {
    /// Manifest (mirrors tried in order) and the signature policy.
    pub manifest_and_signatures: std::time::Duration,
    /// Config and layer blobs, each checked against its digest.
    pub fetch: std::time::Duration,
    /// HMAC, AES-CTR and digest of encrypted layers.
    pub decrypt: std::time::Duration,
    /// Decompression and tar extraction.
    pub unpack: std::time::Duration,
}

impl std::fmt::Display for PullTimings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: std::time::Duration| d.as_millis();
        write!(
            f,
            "manifest+signatures {} ms, fetch {} ms, decrypt {} ms, unpack {} ms",
            ms(self.manifest_and_signatures),
            ms(self.fetch),
            ms(self.decrypt),
            ms(self.unpack)
        )
    }
}

/// What a pull produced.
#[derive(Debug)]
pub struct PulledRootfs {
    /// `registry/repository@sha256:…` of what the reference named.
    pub pinned: String,
    /// Where it came from (a mirror, or the image's own registry).
    pub source: String,
    pub config: ImageConfig,
    pub timings: PullTimings,
}

/// The manifest of `image` from the first of its sources (mirrors in
/// order, then its own registry) that answers, with the client that got it.
fn resolve_first(
    reference: &str,
    image: &ImageReference,
    settings: &PullSettings,
) -> Result<(Source, RegistryClient, ResolvedManifest), PullError> {
    let mut last_failure = None;
    for source in settings.registries.sources(image)? {
        let host = source.image.registry.clone();
        let insecure = if source.insecure {
            vec![host.clone()]
        } else {
            Vec::new()
        };
        // Credentials of the endpoint, else of the name the image was given.
        let credentials = settings
            .credentials
            .for_registry(&host)
            .or_else(|| settings.credentials.for_registry(&image.registry));
        let mut client =
            RegistryClient::new(insecure, credentials).with_deadline(settings.deadline);
        match client.resolve(&source.image) {
            Ok(resolved) => return Ok((source, client, resolved)),
            Err(e) => {
                log::warn!(
                    "pulling {reference} from {host}: {}",
                    kabuto_error::Chain(&e)
                );
                last_failure = Some(e);
            }
        }
    }
    Err(PullError::Registry {
        image: reference.into(),
        source: last_failure
            .unwrap_or_else(|| RegistryError::Manifest("no registry to pull from".to_string())),
    })
}

/// Where a pull's layers go, as they arrive.
struct LayerTarget<'a> {
    name: &'a str,
    reference: &'a str,
    settings: &'a PullSettings,
    rootfs: &'a Path,
}

impl LayerTarget<'_> {
    /// Decrypts (where encrypted) and unpacks one layer, unless the pull's
    /// deadline passed.
    fn apply(
        &self,
        descriptor: crate::LayerDescriptor,
        blob: Vec<u8>,
        timings: &mut PullTimings,
    ) -> Result<(), PullError> {
        let image = || self.name.to_string();
        if self
            .settings
            .deadline
            .is_some_and(|d| std::time::Instant::now() >= d)
        {
            return Err(PullError::Registry {
                image: image(),
                source: RegistryError::Http {
                    url: self.reference.into(),
                    reason: crate::registry::HttpError::DeadlinePassed,
                },
            });
        }
        let started = std::time::Instant::now();
        let layer = PlainLayer::new(descriptor, blob, &self.settings.keys).map_err(|source| {
            PullError::Decrypt {
                image: image(),
                source,
            }
        })?;
        timings.decrypt += started.elapsed();
        let started = std::time::Instant::now();
        crate::unpack_layer(&layer.as_layer(), self.rootfs, self.settings.unpack).map_err(
            |source| PullError::Unpack {
                image: image(),
                source,
            },
        )?;
        timings.unpack += started.elapsed();
        Ok(())
    }
}

/// Pulls `reference` and unpacks it into `rootfs` (which must not exist):
/// the manifest from the first source that answers, the signature policy
/// checked before any layer is fetched, every blob checked against its
/// digest, encrypted layers decrypted (HMAC before, digest after). On any
/// error nothing remains at `rootfs`.
pub fn pull_and_unpack(
    reference: &str,
    settings: &PullSettings,
    rootfs: &Path,
) -> Result<PulledRootfs, PullError> {
    let image = ImageReference::parse(reference).map_err(|e| PullError::Registry {
        image: reference.into(),
        source: e.into(),
    })?;
    let name = format!("{}/{}", image.registry, image.repository);
    let mut timings = PullTimings::default();
    let mut phase = std::time::Instant::now();
    let mut lap = |slot: &mut std::time::Duration| {
        *slot = phase.elapsed();
        phase = std::time::Instant::now();
    };
    let (source, mut client, resolved) = resolve_first(reference, &image, settings)?;
    if let Some(policy) = &settings.signature_policy {
        // Signatures sign what the reference names (an index, for a
        // multi-platform image), whose digests pin the platform manifest.
        policy.check_at(
            &image,
            &source.image,
            &resolved.top_digest,
            &settings.lookaside,
            &mut client,
        )?;
    }
    lap(&mut timings.manifest_and_signatures);
    let registry_err = |source| PullError::Registry {
        image: name.clone(),
        source,
    };
    let (config_blob, descriptors) = client
        .fetch_config(&source.image, &resolved.manifest)
        .map_err(registry_err)?;
    let config = ImageConfig::parse(&config_blob).map_err(|source| PullError::Config {
        image: name.clone(),
        source,
    })?;
    // One layer at a time as it arrives: decrypted in place, applied,
    // dropped, while the next few download — never the whole image in
    // memory.
    let unpack_err = |source| PullError::Unpack {
        image: name.clone(),
        source,
    };
    let layers_started = std::time::Instant::now();
    crate::into_new_root(rootfs, unpack_err, || {
        client.for_each_layer(
            &source.image,
            &descriptors,
            |i, blob| {
                let target = LayerTarget {
                    name: &name,
                    reference,
                    settings,
                    rootfs,
                };
                target.apply(descriptors[i].clone(), blob, &mut timings)
            },
            registry_err,
        )
    })?;
    // Downloads overlap the unpacking: what the layers took beyond it.
    timings.fetch += layers_started
        .elapsed()
        .saturating_sub(timings.decrypt + timings.unpack);
    Ok(PulledRootfs {
        pinned: format!("{name}@{}", resolved.top_digest),
        source: format!("{}/{}", source.image.registry, source.image.repository),
        config,
        timings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(s: &str) -> ImageReference {
        ImageReference::parse(s).expect(s)
    }

    /// A pull whose deadline (the host's wait) has passed sends nothing
    /// more, fails saying so, and leaves no rootfs.
    #[test]
    fn a_pull_past_its_deadline_fails_and_leaves_nothing() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        listener.set_nonblocking(true).expect("nonblocking");
        let settings = PullSettings {
            registries: RegistriesConf::insecure(&[&address]),
            deadline: Some(std::time::Instant::now()),
            ..Default::default()
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("rootfs");
        let err = pull_and_unpack(&format!("{address}/app:1"), &settings, &root)
            .expect_err("past the deadline");
        let err = kabuto_error::chain(&err);
        assert!(err.contains(crate::registry::DEADLINE_PASSED), "{err}");
        assert!(!root.exists());
        assert!(listener.accept().is_err(), "the registry was contacted");
    }

    #[test]
    fn mirrors_come_first_and_prefixes_rewrite() {
        let conf = RegistriesConf::parse(
            r#"
unqualified-search-registries = ["docker.io"]
[[registry]]
prefix = "example.com/team"
location = "internal.example:5000/mirror/team"
[[registry.mirror]]
location = "10.0.2.2:5000/team"
insecure = true
[[registry]]
location = "example.com"
blocked = true
"#,
        )
        .expect("parses");
        let sources = conf
            .sources(&image("example.com/team/app@sha256:ab"))
            .expect("sources");
        assert_eq!(
            sources,
            vec![
                Source {
                    image: image("10.0.2.2:5000/team/app@sha256:ab"),
                    insecure: true
                },
                Source {
                    image: image("internal.example:5000/mirror/team/app@sha256:ab"),
                    insecure: false
                },
            ]
        );
        // Whole components only: "team2" is not under "team".
        let e = conf
            .sources(&image("example.com/team2/app:1"))
            .expect_err("blocked");
        assert!(e.to_string().contains("blocked"), "{e}");
        let other = conf.sources(&image("quay.io/x/y:1")).expect("unlisted");
        assert_eq!(
            other,
            vec![Source {
                image: image("quay.io/x/y:1"),
                insecure: false
            }]
        );
    }

    #[test]
    fn unknown_registry_keys_are_refused() {
        let e = RegistriesConf::parse(
            "[[registry]]\nlocation = \"a.io\"\npull-from-mirror = \"all\"\n",
        )
        .expect_err("unknown key");
        assert!(e.to_string().contains("pull-from-mirror"), "{e}");
        assert!(RegistriesConf::parse("[[registry]]\ninsecure = true\n").is_err());
    }

    #[test]
    fn credentials_in_auth_json_form() {
        let creds = Credentials::parse(
            br#"{"auths": {"10.0.2.2:5000": {"auth": "dXNlcjpwYXNz"},
                 "https://index.docker.io/v1/": {"username": "u", "password": "p"}}}"#,
        )
        .expect("parses");
        assert_eq!(
            creds.for_registry("10.0.2.2:5000"),
            Some(("user".into(), "pass".into()))
        );
        assert_eq!(
            creds.for_registry("docker.io"),
            Some(("u".into(), "p".into()))
        );
        assert_eq!(creds.for_registry("quay.io"), None);
        assert!(Credentials::parse(br#"{"auths": {"a": {"auth": "!!"}}}"#).is_err());
    }

    #[test]
    fn image_config_fields() {
        let config = ImageConfig::parse(
            br#"{"architecture":"amd64","config":{"Entrypoint":["/bin/sh"],"Cmd":["-c","true"],
                "Env":["PATH=/bin"],"User":"1000:1000","WorkingDir":"/srv"}}"#,
        )
        .expect("parses");
        assert_eq!(
            config.entrypoint.as_deref(),
            Some(&["/bin/sh".to_string()][..])
        );
        assert_eq!(config.user.as_deref(), Some("1000:1000"));
        assert_eq!(
            ImageConfig::parse(b"{}").expect("no config"),
            ImageConfig::default()
        );
    }
}
