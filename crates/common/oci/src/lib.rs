//! OCI image vocabulary shared by the guest (which pulls and runs images) and
//! the owner (whose policy pins what the guest will compute): see README.md.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Image manifest media types (OCI, Docker schema 2).
pub const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
/// Image index / manifest list media types.
pub const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an image reference")]
pub struct ReferenceError(pub String);

/// `registry/repository` with a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference {
    pub registry: String,
    pub repository: String,
    /// `sha256:…` or a tag.
    pub reference: String,
}

impl ImageReference {
    /// Docker's rules: no registry part means Docker Hub, a single name is
    /// `library/<name>`, no tag means `latest`.
    pub fn parse(text: &str) -> Result<ImageReference, ReferenceError> {
        let bad = || ReferenceError(text.into());
        let (name, reference) = match text.split_once('@') {
            Some((n, d)) => (n, d.to_string()),
            None => {
                let slash = text.rfind('/').map(|i| i + 1).unwrap_or(0);
                match text[slash..].rfind(':') {
                    Some(c) => (&text[..slash + c], text[slash + c + 1..].to_string()),
                    None => (text, "latest".to_string()),
                }
            }
        };
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ if name.contains('/') => ("docker.io".to_string(), name.to_string()),
            _ => ("docker.io".to_string(), format!("library/{name}")),
        };
        let valid = |s: &str| {
            s.split('/').all(|part| !part.is_empty())
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c))
        };
        if !valid(&repository) || reference.is_empty() || reference.contains('/') {
            return Err(bad());
        }
        Ok(ImageReference {
            registry,
            repository,
            reference,
        })
    }

    /// The host the registry API answers on (Docker Hub's differs from its name).
    pub fn api_host(&self) -> &str {
        if self.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }
}

/// The linux/amd64 entry of an image index (or Docker manifest list).
pub fn platform_entry(index: &serde_json::Value) -> Option<&serde_json::Value> {
    index["manifests"].as_array()?.iter().find(|m| {
        m["platform"]["os"].as_str() == Some("linux")
            && m["platform"]["architecture"].as_str() == Some("amd64")
    })
}

/// The `config` object of an OCI image configuration: what a container's
/// process comes from when the spec leaves it out.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub volumes: Option<BTreeMap<String, serde_json::Value>>,
}

/// An image configuration blob that does not parse; the source is
/// serde's error, which names the position and expected type.
#[derive(Debug, thiserror::Error)]
#[error("image config is not valid")]
pub struct ConfigError(#[source] serde_json::Error);

impl ImageConfig {
    /// The `config` of an image configuration blob (absent: all defaults).
    pub fn parse(config_blob: &[u8]) -> Result<ImageConfig, ConfigError> {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            config: Option<ImageConfig>,
        }
        let file: File = serde_json::from_slice(config_blob).map_err(ConfigError)?;
        Ok(file.config.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_follow_dockers_defaults() {
        let r = ImageReference::parse("busybox").expect("parses");
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.reference.as_str()
            ),
            ("docker.io", "library/busybox", "latest")
        );
        assert_eq!(r.api_host(), "registry-1.docker.io");
        let r = ImageReference::parse("127.0.0.1:5000/a/b@sha256:00").expect("parses");
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.reference.as_str()
            ),
            ("127.0.0.1:5000", "a/b", "sha256:00")
        );
        assert_eq!(r.api_host(), "127.0.0.1:5000");
        for bad in ["", "UPPER/case", "a//b", "a:", "localhost/x:a/b"] {
            assert_eq!(
                ImageReference::parse(bad),
                Err(ReferenceError(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_platform_entry_is_linux_amd64() {
        let index = serde_json::json!({"manifests": [
            {"digest": "a", "platform": {"os": "linux", "architecture": "arm64"}},
            {"digest": "b", "platform": {"os": "linux", "architecture": "amd64"}},
        ]});
        assert_eq!(
            platform_entry(&index).map(|m| m["digest"].clone()),
            Some("b".into())
        );
        assert!(platform_entry(&serde_json::json!({"manifests": []})).is_none());
    }

    #[test]
    fn the_image_config_reads_the_process_fields() {
        let c = ImageConfig::parse(
            br#"{"config":{"Entrypoint":["/e"],"Cmd":["c"],"Env":["A=1"],"User":"1:2","WorkingDir":"/w","Volumes":{"/v":{}}}}"#,
        )
        .expect("parses");
        assert_eq!(c.entrypoint, Some(vec!["/e".to_string()]));
        assert_eq!(c.user.as_deref(), Some("1:2"));
        assert!(c.volumes.is_some_and(|v| v.contains_key("/v")));
        assert_eq!(
            ImageConfig::parse(b"{}").expect("no config is an empty one"),
            ImageConfig::default()
        );
        assert!(ImageConfig::parse(br#"{"config":{"Cmd":"no list"}}"#).is_err());
    }
}
