//! Image signature policy, with `containers-policy.json` semantics, and
//! cosign-format ("sigstore") signatures.
//!
//! Policy: `{"default": [...], "transports": {"docker": {"<scope>": [...]}}}`;
//! the most specific scope for the image applies (`registry/repo:tag` or
//! `@digest`, `registry/repo`, its parent namespaces, `registry`), else
//! `default`; every requirement of the list must hold. Requirements:
//! `reject`, `insecureAcceptAnything`, `sigstoreSigned` with `keyData`
//! (base64 of a PEM public key; `keyPath` is refused: the guest has no
//! owner files, policies come from the KBS or init-data). `signedBy` (GPG)
//! is parsed and refused as not supported yet.
//!
//! A cosign signature lives in the image's repository at tag
//! `sha256-<hex>.sig`: an image whose layers are simple-signing payloads
//! (`{"critical": {"identity": {"docker-reference"}, "image":
//! {"docker-manifest-digest"}, "type": "cosign container image signature"}}`)
//! with the ECDSA P-256 signature over the payload in the layer annotation
//! `dev.cosignproject.cosign/signature` (base64 of DER).

use std::collections::BTreeMap;

use base64::{engine::general_purpose::STANDARD, Engine as _};
use p256::ecdsa::{signature::Verifier as _, Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey as _;
use serde::Deserialize;

use crate::registry::{ImageReference, RegistryClient};

pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
pub const COSIGN_SIGNATURE_TYPE: &str = "cosign container image signature";

#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature policy is invalid: {0}")]
    Policy(String),
    #[error("image {image}: rejected by the signature policy (scope {scope})")]
    Rejected { image: String, scope: String },
    #[error("image {image}: no valid signature (scope {scope}): {reason}")]
    Unsigned {
        image: String,
        scope: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
enum Requirement {
    Reject,
    InsecureAcceptAnything,
    #[serde(rename_all = "camelCase")]
    SigstoreSigned {
        #[serde(default)]
        key_data: Option<String>,
        #[serde(default)]
        key_path: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    SignedBy {
        #[serde(default)]
        key_type: Option<String>,
    },
}

#[derive(Debug, Clone, Deserialize)]
struct PolicyFile {
    default: Vec<Requirement>,
    #[serde(default)]
    transports: BTreeMap<String, BTreeMap<String, Vec<Requirement>>>,
}

/// A parsed, checked signature policy.
#[derive(Debug, Clone)]
pub struct SignaturePolicy {
    file: PolicyFile,
}

impl SignaturePolicy {
    pub fn from_json(text: &[u8]) -> Result<SignaturePolicy, SignatureError> {
        let file: PolicyFile =
            serde_json::from_slice(text).map_err(|e| SignatureError::Policy(e.to_string()))?;
        let all = file
            .default
            .iter()
            .chain(file.transports.values().flat_map(|s| s.values().flatten()));
        for requirement in all {
            match requirement {
                Requirement::SigstoreSigned {
                    key_path: Some(p), ..
                } => {
                    return Err(SignatureError::Policy(format!(
                        "sigstoreSigned keyPath {p:?}: the guest reads keys only from keyData"
                    )))
                }
                Requirement::SigstoreSigned { key_data: None, .. } => {
                    return Err(SignatureError::Policy(
                        "sigstoreSigned needs keyData".into(),
                    ))
                }
                Requirement::SigstoreSigned {
                    key_data: Some(k), ..
                } => {
                    verifying_key(k).map_err(SignatureError::Policy)?;
                }
                Requirement::SignedBy { key_type } => {
                    return Err(SignatureError::Policy(format!(
                        "signedBy ({}) is not supported yet",
                        key_type.as_deref().unwrap_or("GPGKeys")
                    )))
                }
                Requirement::Reject | Requirement::InsecureAcceptAnything => {}
            }
        }
        Ok(SignaturePolicy { file })
    }

    /// The requirements for `image` and the scope they came from.
    fn requirements(&self, image: &ImageReference) -> (String, &[Requirement]) {
        if let Some(scopes) = self.file.transports.get("docker") {
            let repo = format!("{}/{}", image.registry, image.repository);
            let separator = if image.reference.starts_with("sha256:") {
                '@'
            } else {
                ':'
            };
            let mut candidates = vec![format!("{repo}{separator}{}", image.reference)];
            let mut namespace = repo.as_str();
            loop {
                candidates.push(namespace.to_string());
                match namespace.rfind('/') {
                    Some(i) => namespace = &namespace[..i],
                    None => break,
                }
            }
            for scope in candidates {
                if let Some(r) = scopes.get(&scope) {
                    return (scope, r);
                }
            }
        }
        ("default".into(), &self.file.default)
    }

    /// Checks `image` (whose platform manifest has `manifest_digest`)
    /// against the policy, fetching signatures with `client`.
    pub fn check(
        &self,
        image: &ImageReference,
        manifest_digest: &str,
        client: &mut RegistryClient,
    ) -> Result<(), SignatureError> {
        self.check_at(image, image, manifest_digest, client)
    }

    /// As [`SignaturePolicy::check`] for an image pulled from `source` (a
    /// mirror): scopes and signed identities are `image`'s, signatures are
    /// fetched from `source`.
    pub fn check_at(
        &self,
        image: &ImageReference,
        source: &ImageReference,
        manifest_digest: &str,
        client: &mut RegistryClient,
    ) -> Result<(), SignatureError> {
        let (scope, requirements) = self.requirements(image);
        let name = format!("{}/{}", image.registry, image.repository);
        if requirements.is_empty() {
            return Err(SignatureError::Rejected { image: name, scope });
        }
        for requirement in requirements {
            match requirement {
                Requirement::InsecureAcceptAnything => {}
                Requirement::Reject | Requirement::SignedBy { .. } => {
                    return Err(SignatureError::Rejected { image: name, scope })
                }
                Requirement::SigstoreSigned { key_data, .. } => {
                    let key = verifying_key(key_data.as_deref().unwrap_or(""))
                        .map_err(SignatureError::Policy)?;
                    verify_sigstore(image, source, manifest_digest, &key, client).map_err(
                        |reason| SignatureError::Unsigned {
                            image: name.clone(),
                            scope: scope.clone(),
                            reason,
                        },
                    )?;
                }
            }
        }
        Ok(())
    }
}

fn verifying_key(key_data: &str) -> Result<VerifyingKey, String> {
    let pem = STANDARD
        .decode(key_data.trim())
        .map_err(|e| format!("keyData is not base64: {e}"))?;
    let pem = String::from_utf8(pem).map_err(|_| "keyData is not a PEM text".to_string())?;
    VerifyingKey::from_public_key_pem(&pem)
        .map_err(|e| format!("keyData is not a P-256 public key: {e}"))
}

/// The tag cosign stores the signatures of `manifest_digest` under.
pub fn signature_tag(manifest_digest: &str) -> String {
    format!("{}.sig", manifest_digest.replace(':', "-"))
}

/// The simple-signing payload for `image` at `manifest_digest`.
pub fn simple_signing_payload(docker_reference: &str, manifest_digest: &str) -> Vec<u8> {
    serde_json::json!({
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": manifest_digest},
            "type": COSIGN_SIGNATURE_TYPE,
        },
        "optional": null,
    })
    .to_string()
    .into_bytes()
}

/// Some signature at `sha256-<hex>.sig` verifies with `key` and names
/// `manifest_digest` and this repository.
fn verify_sigstore(
    image: &ImageReference,
    source: &ImageReference,
    manifest_digest: &str,
    key: &VerifyingKey,
    client: &mut RegistryClient,
) -> Result<(), String> {
    let signatures = ImageReference {
        reference: signature_tag(manifest_digest),
        ..source.clone()
    };
    let (_, manifest) = client
        .manifest(&signatures)
        .map_err(|e| format!("no signatures at {}: {e}", signatures.reference))?;
    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    let mut reasons = Vec::new();
    for layer in layers {
        if layer["mediaType"].as_str() != Some(SIMPLE_SIGNING_MEDIA_TYPE) {
            continue;
        }
        let Some(signature) = layer["annotations"][SIGNATURE_ANNOTATION].as_str() else {
            reasons.push("a payload without a signature annotation".to_string());
            continue;
        };
        let digest = layer["digest"].as_str().unwrap_or("");
        let payload = client
            .blob(&signatures, digest, "signature payload", 1 << 20)
            .map_err(|e| e.to_string())?;
        match check_payload(&payload, signature, key, image, manifest_digest) {
            Ok(()) => return Ok(()),
            Err(reason) => reasons.push(reason),
        }
    }
    if reasons.is_empty() {
        reasons.push("no simple-signing payloads".into());
    }
    Err(reasons.join("; "))
}

fn check_payload(
    payload: &[u8],
    signature_b64: &str,
    key: &VerifyingKey,
    image: &ImageReference,
    manifest_digest: &str,
) -> Result<(), String> {
    let der = STANDARD
        .decode(signature_b64)
        .map_err(|e| format!("signature is not base64: {e}"))?;
    let signature = Signature::from_der(&der).map_err(|e| format!("signature is not DER: {e}"))?;
    key.verify(payload, &signature)
        .map_err(|_| "a signature does not verify with the policy's key".to_string())?;
    // Only a verified payload is read.
    let doc: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| format!("payload is not JSON: {e}"))?;
    let critical = &doc["critical"];
    if critical["type"].as_str() != Some(COSIGN_SIGNATURE_TYPE) {
        return Err(format!("payload type {:?}", critical["type"]));
    }
    let signed_digest = critical["image"]["docker-manifest-digest"]
        .as_str()
        .unwrap_or("");
    if signed_digest != manifest_digest {
        return Err(format!(
            "a valid signature is for manifest {signed_digest}, not {manifest_digest}"
        ));
    }
    let signed_reference = critical["identity"]["docker-reference"]
        .as_str()
        .unwrap_or("");
    let repo = format!("{}/{}", image.registry, image.repository);
    let signed_repo = signed_reference
        .split('@')
        .next()
        .map(|r| match r.rfind(':') {
            Some(i) if !r[i..].contains('/') => &r[..i],
            _ => r,
        })
        .unwrap_or("");
    if signed_repo != repo {
        return Err(format!(
            "a valid signature is for {signed_reference:?}, not {repo}"
        ));
    }
    Ok(())
}

/// Signs `payload` the way cosign does (ECDSA P-256 over SHA-256, DER,
/// base64): for `kabuto image sign` and tests.
pub fn sign_payload(key: &p256::ecdsa::SigningKey, payload: &[u8]) -> String {
    use p256::ecdsa::signature::Signer as _;
    let signature: Signature = key.sign(payload);
    STANDARD.encode(signature.to_der().as_bytes())
}

/// Writes an OCI layout (tag `sig`) holding the cosign signature image for
/// `docker_reference` at `manifest_digest`, ready for
/// `skopeo copy oci:DIR:sig docker://REPO:<signature_tag>`.
pub fn write_signature_layout(
    dir: &std::path::Path,
    docker_reference: &str,
    manifest_digest: &str,
    key: &p256::ecdsa::SigningKey,
) -> std::io::Result<()> {
    let digest = crate::sha256_digest;
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    let put = |b: &[u8]| -> std::io::Result<String> {
        let d = digest(b);
        std::fs::write(dir.join("blobs/sha256").join(&d[7..]), b)?;
        Ok(d)
    };
    let payload = simple_signing_payload(docker_reference, manifest_digest);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "", "os": "", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [digest(&payload)]},
    }))?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(&config)?, "size": config.len()},
        "layers": [{"mediaType": SIMPLE_SIGNING_MEDIA_TYPE, "digest": put(&payload)?,
                    "size": payload.len(),
                    "annotations": {SIGNATURE_ANNOTATION: sign_payload(key, &payload)}}],
    }))?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(&manifest)?,
        "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": "sig"}}]});
    std::fs::write(dir.join("index.json"), index.to_string())?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key_data(key: &p256::ecdsa::SigningKey) -> String {
        use p256::pkcs8::EncodePublicKey as _;
        let pem = key
            .verifying_key()
            .to_public_key_pem(Default::default())
            .unwrap();
        STANDARD.encode(pem)
    }

    fn image(text: &str) -> ImageReference {
        ImageReference::parse(text).unwrap()
    }

    #[test]
    fn the_most_specific_scope_applies() {
        let key = p256::ecdsa::SigningKey::random(&mut rand::thread_rng());
        let policy = SignaturePolicy::from_json(
            serde_json::json!({
                "default": [{"type": "reject"}],
                "transports": {"docker": {
                    "registry.example/team": [{"type": "insecureAcceptAnything"}],
                    "registry.example/team/app": [{"type": "sigstoreSigned", "keyData": key_data(&key)}],
                    "registry.example/team/app:debug": [{"type": "reject"}],
                }}
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let scope = |i: &str| policy.requirements(&image(i)).0;
        assert_eq!(
            scope("registry.example/team/app:v1"),
            "registry.example/team/app"
        );
        assert_eq!(
            scope("registry.example/team/app:debug"),
            "registry.example/team/app:debug"
        );
        assert_eq!(
            scope("registry.example/team/other:v1"),
            "registry.example/team"
        );
        assert_eq!(scope("elsewhere.example/x:1"), "default");
    }

    #[test]
    fn unusable_policies_are_refused() {
        for (policy, why) in [
            (
                r#"{"default": [{"type": "sigstoreSigned", "keyPath": "/k.pub"}]}"#,
                "keyPath",
            ),
            (
                r#"{"default": [{"type": "sigstoreSigned"}]}"#,
                "needs keyData",
            ),
            (
                r#"{"default": [{"type": "sigstoreSigned", "keyData": "bm90IGEga2V5"}]}"#,
                "not a P-256 public key",
            ),
            (
                r#"{"default": [{"type": "signedBy", "keyType": "GPGKeys"}]}"#,
                "not supported yet",
            ),
            (r#"{"default": [{"type": "bogus"}]}"#, "unknown variant"),
            (r#"{"transports": {}}"#, "missing field `default`"),
        ] {
            let e = SignaturePolicy::from_json(policy.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{policy}: {e}");
        }
    }

    #[test]
    fn payloads_must_verify_and_name_the_image() {
        let key = p256::ecdsa::SigningKey::random(&mut rand::thread_rng());
        let verifying = *key.verifying_key();
        let img = image("registry.example/team/app:v1");
        let digest = format!("sha256:{}", "1".repeat(64));
        let payload = simple_signing_payload("registry.example/team/app", &digest);
        let signature = sign_payload(&key, &payload);
        check_payload(&payload, &signature, &verifying, &img, &digest).unwrap();

        let other = p256::ecdsa::SigningKey::random(&mut rand::thread_rng());
        let e = check_payload(
            &payload,
            &sign_payload(&other, &payload),
            &verifying,
            &img,
            &digest,
        )
        .unwrap_err();
        assert!(e.contains("does not verify"), "{e}");

        let mut tampered = payload.clone();
        tampered[10] ^= 1;
        assert!(check_payload(&tampered, &signature, &verifying, &img, &digest).is_err());

        let e = check_payload(
            &payload,
            &signature,
            &verifying,
            &img,
            &format!("sha256:{}", "2".repeat(64)),
        )
        .unwrap_err();
        assert!(e.contains("is for manifest"), "{e}");

        let elsewhere = simple_signing_payload("registry.example/team/other", &digest);
        let e = check_payload(
            &elsewhere,
            &sign_payload(&key, &elsewhere),
            &verifying,
            &img,
            &digest,
        )
        .unwrap_err();
        assert!(e.contains("not registry.example/team/app"), "{e}");
    }
}
