//! Resolving an image reference to its manifest digest and config: from
//! local OCI image layouts (offline) first, then from its registry.

use std::path::{Path, PathBuf};

use oci_client::{secrets::RegistryAuth, Reference};
use sha2::{Digest, Sha256};

use crate::GenPolicyError;

/// What the policy needs from an image.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResolvedImage {
    /// `registry/repository@sha256:…` of the platform's image manifest.
    pub pinned: String,
    /// The digest alone.
    pub digest: String,
    pub config: ImageConfig,
}

/// The `config` object of an OCI image configuration: the guest's type, so
/// what the policy pins is what the guest computes.
pub use kabuto_oci::ImageConfig;

pub fn parse_config(json: &[u8]) -> Result<ImageConfig, kabuto_oci::ConfigError> {
    ImageConfig::parse(json)
}

/// Why an image could not be read from an OCI layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("reading index.json")]
    ReadIndex(#[source] std::io::Error),
    #[error("index.json is not valid JSON")]
    IndexJson(#[source] serde_json::Error),
    #[error("unsupported digest {0:?}")]
    Digest(String),
    #[error("blob {0}")]
    Blob(String, #[source] std::io::Error),
    #[error("blob {0} does not match its digest")]
    Mismatch(String),
    #[error("the manifest has no config digest")]
    NoConfig,
    #[error(transparent)]
    Config(#[from] kabuto_oci::ConfigError),
    #[error("nested indexes deeper than 4")]
    TooDeep,
    #[error("a descriptor has no digest")]
    NoDigest,
    #[error("manifest {0}")]
    Manifest(String, #[source] serde_json::Error),
    #[error("index {0} has no linux/amd64 image")]
    NoPlatform(String),
}

/// Something that turns an image reference into a [`ResolvedImage`].
pub trait ImageResolver {
    fn resolve(&mut self, image: &str) -> Result<ResolvedImage, GenPolicyError>;
}

/// Fully qualified form of a reference (`busybox` →
/// `docker.io/library/busybox:latest`).
pub fn normalize(image: &str) -> Result<Reference, GenPolicyError> {
    image
        .parse::<Reference>()
        .map_err(|e| GenPolicyError::Image {
            image: image.into(),
            reason: format!("not an image reference: {e}"),
        })
}

fn pinned(reference: &Reference, digest: &str) -> String {
    format!(
        "{}/{}@{}",
        reference.registry(),
        reference.repository(),
        digest
    )
}

/// Local layouts first, then registries.
pub struct Resolver {
    layouts: Vec<PathBuf>,
    insecure_registries: Vec<String>,
    offline: bool,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Resolver {
    pub fn new(layouts: Vec<PathBuf>, insecure_registries: Vec<String>) -> Resolver {
        Resolver {
            layouts,
            insecure_registries,
            offline: false,
            runtime: None,
        }
    }

    /// Only the local layouts: no registry is contacted.
    pub fn offline(layouts: Vec<PathBuf>) -> Resolver {
        Resolver {
            offline: true,
            ..Resolver::new(layouts, vec![])
        }
    }

    fn fetch_from_registry(
        &mut self,
        reference: &Reference,
    ) -> Result<ResolvedImage, GenPolicyError> {
        let image = reference.whole();
        let err = |reason: String| GenPolicyError::Image {
            image: image.clone(),
            reason,
        };
        if self.runtime.is_none() {
            self.runtime = Some(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| err(format!("starting the HTTP client: {e}")))?,
            );
        }
        let Some(runtime) = self.runtime.as_ref() else {
            return Err(err("no HTTP client".into()));
        };
        let config = oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::HttpsExcept(
                self.insecure_registries.clone(),
            ),
            ..Default::default()
        };
        let client = oci_client::Client::new(config);
        let auth = docker_config_auth(reference.resolve_registry());
        let (_manifest, digest, config) = runtime
            .block_on(client.pull_manifest_and_config(reference, &auth))
            .map_err(|e| err(format!("from the registry: {e}")))?;
        Ok(ResolvedImage {
            pinned: pinned(reference, &digest),
            config: parse_config(config.as_bytes()).map_err(|source| GenPolicyError::Config {
                image: reference.whole(),
                source,
            })?,
            digest,
        })
    }
}

impl ImageResolver for Resolver {
    fn resolve(&mut self, image: &str) -> Result<ResolvedImage, GenPolicyError> {
        let reference = normalize(image)?;
        for layout in &self.layouts {
            if let Some(found) = OciLayout::open(layout)
                .and_then(|l| l.find(&reference))
                .map_err(|reason| GenPolicyError::Layout {
                    image: image.into(),
                    layout: layout.clone(),
                    reason,
                })?
            {
                return Ok(found);
            }
        }
        if self.offline {
            return Err(GenPolicyError::Image {
                image: image.into(),
                reason: format!(
                    "{} is in none of the OCI layouts and registries are off (offline)",
                    reference.whole()
                ),
            });
        }
        self.fetch_from_registry(&reference)
    }
}

/// Basic credentials for `registry` from the Docker config file
/// (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`), if any.
fn docker_config_auth(registry: &str) -> RegistryAuth {
    use base64::Engine as _;
    let path = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))
        .map(|d| d.join("config.json"));
    let Some(text) = path.and_then(|p| std::fs::read_to_string(p).ok()) else {
        return RegistryAuth::Anonymous;
    };
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(&text) else {
        return RegistryAuth::Anonymous;
    };
    let auth = doc["auths"][registry]["auth"].as_str().and_then(|a| {
        base64::engine::general_purpose::STANDARD
            .decode(a)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
    });
    match auth.as_deref().and_then(|a| a.split_once(':')) {
        Some((user, pass)) => RegistryAuth::Basic(user.into(), pass.into()),
        None => RegistryAuth::Anonymous,
    }
}

/// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/`),
/// as `skopeo copy … oci:DIR:TAG` or `ctr export` write it.
pub struct OciLayout {
    dir: PathBuf,
    index: serde_json::Value,
}

const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

impl OciLayout {
    pub fn open(dir: &Path) -> Result<OciLayout, LayoutError> {
        let index = std::fs::read(dir.join("index.json")).map_err(LayoutError::ReadIndex)?;
        let index = serde_json::from_slice(&index).map_err(LayoutError::IndexJson)?;
        Ok(OciLayout {
            dir: dir.into(),
            index,
        })
    }

    /// Reads a blob and checks it has the digest it is named by.
    fn blob(&self, digest: &str) -> Result<Vec<u8>, LayoutError> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
            .ok_or_else(|| LayoutError::Digest(digest.to_string()))?;
        let bytes = std::fs::read(self.dir.join("blobs/sha256").join(hex))
            .map_err(|e| LayoutError::Blob(digest.to_string(), e))?;
        if hex::encode(Sha256::digest(&bytes)) != hex {
            return Err(LayoutError::Mismatch(digest.to_string()));
        }
        Ok(bytes)
    }

    /// The image in this layout named `reference`, if there is one: its
    /// `org.opencontainers.image.ref.name` is the full reference or its tag,
    /// or its `io.containerd.image.name` is the full reference.
    pub fn find(&self, reference: &Reference) -> Result<Option<ResolvedImage>, LayoutError> {
        let full = reference.whole();
        let tag = reference.tag().unwrap_or("latest");
        let wanted_digest = reference.digest();
        let manifests = self.index["manifests"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let found = manifests.iter().find(|m| {
            let annotation = |k: &str| m["annotations"][k].as_str();
            match wanted_digest {
                Some(d) => m["digest"].as_str() == Some(d),
                None => {
                    annotation("org.opencontainers.image.ref.name")
                        .is_some_and(|n| n == full || n == tag)
                        || annotation("io.containerd.image.name") == Some(full.as_str())
                }
            }
        });
        let Some(descriptor) = found else {
            return Ok(None);
        };
        let (digest, manifest) = self.platform_manifest(descriptor, 0)?;
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .ok_or(LayoutError::NoConfig)?;
        let config = parse_config(&self.blob(config_digest)?)?;
        Ok(Some(ResolvedImage {
            pinned: pinned(reference, &digest),
            digest,
            config,
        }))
    }

    /// Follows indexes down to the linux/amd64 image manifest.
    fn platform_manifest(
        &self,
        descriptor: &serde_json::Value,
        depth: usize,
    ) -> Result<(String, serde_json::Value), LayoutError> {
        if depth > 4 {
            return Err(LayoutError::TooDeep);
        }
        let digest = descriptor["digest"]
            .as_str()
            .ok_or(LayoutError::NoDigest)?
            .to_string();
        let manifest: serde_json::Value = serde_json::from_slice(&self.blob(&digest)?)
            .map_err(|e| LayoutError::Manifest(digest.clone(), e))?;
        let media_type = manifest["mediaType"]
            .as_str()
            .or(descriptor["mediaType"].as_str())
            .unwrap_or("");
        if !INDEX_TYPES.contains(&media_type) && manifest.get("manifests").is_none() {
            return Ok((digest, manifest));
        }
        let entry = kabuto_oci::platform_entry(&manifest)
            .ok_or_else(|| LayoutError::NoPlatform(digest.clone()))?;
        self.platform_manifest(entry, depth + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_docker_hub_names() {
        let r = normalize("busybox").expect("parses");
        assert_eq!(r.whole(), "docker.io/library/busybox:latest");
        assert_eq!(
            pinned(&r, "sha256:ab"),
            "docker.io/library/busybox@sha256:ab"
        );
        let r = normalize("localhost:5000/app:1").expect("parses");
        assert_eq!(pinned(&r, "sha256:cd"), "localhost:5000/app@sha256:cd");
        assert!(normalize("not a reference").is_err());
    }

    #[test]
    fn parses_image_configs() {
        let c = parse_config(
            br#"{"architecture":"amd64","config":{"Entrypoint":["/e"],"Cmd":["a"],
                "Env":["PATH=/bin"],"WorkingDir":"/w","User":"10:20","Volumes":{"/data":{}}}}"#,
        )
        .expect("parses");
        assert_eq!(c.entrypoint, Some(vec!["/e".to_string()]));
        assert_eq!(c.user.as_deref(), Some("10:20"));
        assert!(c.volumes.expect("volumes").contains_key("/data"));
        assert_eq!(
            parse_config(b"{}").expect("no config is an empty one"),
            ImageConfig::default()
        );
        assert!(parse_config(b"[").is_err());
    }
}
