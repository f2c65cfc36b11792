//! Which images the host leaves to the guest. containerd's CRI plugin
//! labels every layer it unpacks with the image reference and manifest
//! digest (`disable_snapshot_annotations = false`); images that match the
//! configured patterns, or have an encrypted layer, are not unpacked here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::SnapshotError;

/// The chain id containerd wants a layer committed as (set by its unpacker).
pub const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";

pub struct GuestPullPolicy {
    patterns: Vec<String>,
    encrypted: bool,
    content_blobs: PathBuf,
    /// Manifest digest → has an encrypted layer (content-addressed, so
    /// the answer never changes).
    encrypted_manifests: Mutex<HashMap<String, bool>>,
}

/// `host/repo` of `host/repo:tag` or `host/repo@sha256:…`.
fn repository_of(image: &str) -> &str {
    let name = image.split_once('@').map_or(image, |(n, _)| n);
    match (name.rfind(':'), name.rfind('/')) {
        (Some(colon), Some(slash)) if colon > slash => &name[..colon],
        (Some(colon), None) => &name[..colon],
        _ => name,
    }
}

fn matches(pattern: &str, image: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => image.starts_with(prefix),
        None => image == pattern || repository_of(image) == pattern,
    }
}

impl GuestPullPolicy {
    pub fn new(patterns: Vec<String>, encrypted: bool, containerd_root: &Path) -> GuestPullPolicy {
        GuestPullPolicy {
            patterns,
            encrypted,
            content_blobs: containerd_root.join("io.containerd.content.v1.content/blobs/sha256"),
            encrypted_manifests: Mutex::new(HashMap::new()),
        }
    }

    /// Why the layer these labels describe is left to the guest, or `None`
    /// to unpack it on the host.
    pub fn reason(
        &self,
        labels: &HashMap<String, String>,
    ) -> Result<Option<String>, SnapshotError> {
        let Some(image) = labels.get(CRI_IMAGE_REF) else {
            return Ok(None);
        };
        if let Some(p) = self.patterns.iter().find(|p| matches(p, image)) {
            return Ok(Some(format!(
                "{image} matches guest_pull_images entry {p:?}"
            )));
        }
        if self.encrypted {
            if let Some(digest) = labels.get(CRI_MANIFEST_DIGEST) {
                if self.has_encrypted_layer(digest)? {
                    return Ok(Some(format!("{image} has encrypted layers")));
                }
            }
        }
        Ok(None)
    }

    fn has_encrypted_layer(&self, digest: &str) -> Result<bool, SnapshotError> {
        let cached = self
            .encrypted_manifests
            .lock()
            .map_err(|_| SnapshotError::Store("manifest cache lock poisoned".into()))?
            .get(digest)
            .copied();
        if let Some(answer) = cached {
            return Ok(answer);
        }
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| {
                SnapshotError::InvalidArgument(format!(
                    "label {CRI_MANIFEST_DIGEST} is not a sha256 digest: {digest:?}"
                ))
            })?;
        let path = self.content_blobs.join(hex);
        let bytes = std::fs::read(&path).map_err(|e| {
            SnapshotError::Manifest(format!(
                "reading manifest {digest} from containerd's content store ({}): {e}; \
                 is snapshotter.containerd_root containerd's root?",
                path.display()
            ))
        })?;
        if hex::encode(Sha256::digest(&bytes)) != hex {
            return Err(SnapshotError::Manifest(format!(
                "{} does not hash to {digest}",
                path.display()
            )));
        }
        let manifest: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| SnapshotError::Manifest(format!("manifest {digest} is not JSON: {e}")))?;
        let encrypted = manifest["layers"].as_array().is_some_and(|layers| {
            layers.iter().any(|l| {
                l["mediaType"]
                    .as_str()
                    .is_some_and(|m| m.ends_with("+encrypted"))
            })
        });
        if let Ok(mut cache) = self.encrypted_manifests.lock() {
            cache.insert(digest.to_string(), encrypted);
        }
        Ok(encrypted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(image: &str, manifest: Option<&str>) -> HashMap<String, String> {
        let mut l = HashMap::from([(CRI_IMAGE_REF.to_string(), image.to_string())]);
        if let Some(m) = manifest {
            l.insert(CRI_MANIFEST_DIGEST.into(), m.into());
        }
        l
    }

    #[test]
    fn patterns_match_prefix_repository_or_reference() {
        assert!(matches("*", "a/b:c"));
        assert!(matches("reg:5000/secure/*", "reg:5000/secure/app:1"));
        assert!(!matches("reg:5000/secure/*", "reg:5000/open/app:1"));
        assert!(matches("reg:5000/app", "reg:5000/app:1"));
        assert!(matches("reg:5000/app", "reg:5000/app@sha256:00"));
        assert!(!matches("reg:5000/app", "reg:5000/application:1"));
        assert!(!matches("reg:5000/app", "reg:5000/app/sub:1"));
        assert!(matches("reg:5000/app:1", "reg:5000/app:1"));
        assert!(!matches("reg:5000/app:1", "reg:5000/app:2"));
        assert_eq!(repository_of("reg:5000/app"), "reg:5000/app");
    }

    fn blob(dir: &Path, body: &[u8]) -> String {
        let hex = hex::encode(Sha256::digest(body));
        let blobs = dir.join("io.containerd.content.v1.content/blobs/sha256");
        std::fs::create_dir_all(&blobs).expect("dir");
        std::fs::write(blobs.join(&hex), body).expect("write");
        format!("sha256:{hex}")
    }

    #[test]
    fn encrypted_layers_are_found_in_the_content_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let enc = blob(
            dir.path(),
            br#"{"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip"},{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip+encrypted"}]}"#,
        );
        let plain = blob(
            dir.path(),
            br#"{"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip"}]}"#,
        );
        let policy = GuestPullPolicy::new(vec!["r/secure/*".into()], true, dir.path());
        let why = policy.reason(&labels("r/x:1", Some(&enc))).expect("reason");
        assert_eq!(why.as_deref(), Some("r/x:1 has encrypted layers"));
        assert_eq!(
            policy
                .reason(&labels("r/x:1", Some(&plain)))
                .expect("plain"),
            None
        );
        assert!(policy
            .reason(&labels("r/secure/y:1", Some(&plain)))
            .expect("pattern")
            .is_some_and(|w| w.contains("guest_pull_images")));
        // Not a CRI pull (no image label): always unpacked here.
        assert_eq!(policy.reason(&HashMap::new()).expect("none"), None);
        // Encrypted images unpacked on the host when so configured.
        let off = GuestPullPolicy::new(vec![], false, dir.path());
        assert_eq!(off.reason(&labels("r/x:1", Some(&enc))).expect("off"), None);
    }

    #[test]
    fn unreadable_or_altered_manifests_are_errors_not_host_unpacks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy = GuestPullPolicy::new(vec![], true, dir.path());
        let missing = format!("sha256:{}", "ab".repeat(32));
        let err = policy
            .reason(&labels("r/x:1", Some(&missing)))
            .expect_err("missing manifest");
        assert!(err.to_string().contains("containerd_root"), "{err}");
        let digest = blob(dir.path(), b"{\"layers\":[]}");
        let path = dir
            .path()
            .join("io.containerd.content.v1.content/blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        std::fs::write(&path, b"{\"layers\":[{}]}").expect("alter");
        let err = policy
            .reason(&labels("r/x:1", Some(&digest)))
            .expect_err("altered manifest");
        assert!(err.to_string().contains("does not hash"), "{err}");
        let err = policy
            .reason(&labels("r/x:1", Some("md5:00")))
            .expect_err("bad digest");
        assert!(err.to_string().contains("not a sha256 digest"), "{err}");
    }
}
