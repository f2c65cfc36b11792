//! cosign signatures: simple-signing payloads in an image at the tag
//! `sha256-<hex>.sig` of the signed manifest, each with its ECDSA P-256
//! signature (base64 of DER) in a layer annotation. Verifying, and making
//! them (for `kabuto-owner image sign` and tests).

use base64::{engine::general_purpose::STANDARD, Engine as _};
use p256::ecdsa::{signature::Verifier as _, Signature, VerifyingKey};

use super::identity::{Expected, PayloadError};
use super::{Refusals, COSIGN_SIGNATURE_TYPE, SIGNATURE_ANNOTATION, SIMPLE_SIGNING_MEDIA_TYPE};
use crate::registry::{ImageReference, RegistryClient};
use crate::RegistryError;

const OCI_MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// No cosign signature satisfied a `sigstoreSigned` requirement.
#[derive(Debug, thiserror::Error)]
pub enum CosignError {
    #[error("no signatures at {tag}")]
    NoSignatures {
        tag: String,
        #[source]
        source: RegistryError,
    },
    #[error("reading a signature payload")]
    Payload(#[source] RegistryError),
    #[error("{0}")]
    NoneValid(Refusals<CosignRefusal>),
}

/// Why one signature of the signature image does not count.
#[derive(Debug, thiserror::Error)]
pub enum CosignRefusal {
    #[error("no simple-signing payloads")]
    NoPayloads,
    #[error("a payload without a signature annotation")]
    NoAnnotation,
    #[error("signature is not base64")]
    NotBase64(#[source] base64::DecodeError),
    #[error("signature is not DER")]
    NotDer(#[source] p256::ecdsa::Error),
    #[error("a signature does not verify with the policy's key")]
    DoesNotVerify,
    #[error(transparent)]
    Payload(#[from] PayloadError),
}

/// Some signature at `sha256-<hex>.sig` verifies with `key` and names
/// the manifest and an identity the policy accepts.
pub(super) fn verify(
    expected: &Expected<'_>,
    source: &ImageReference,
    key: &VerifyingKey,
    client: &mut RegistryClient,
) -> Result<(), CosignError> {
    let signatures = ImageReference {
        reference: signature_tag(expected.manifest_digest),
        ..source.clone()
    };
    let (_, manifest) =
        client
            .manifest(&signatures)
            .map_err(|source| CosignError::NoSignatures {
                tag: signatures.reference.clone(),
                source,
            })?;
    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    let mut refusals = Vec::new();
    for layer in layers {
        if layer["mediaType"].as_str() != Some(SIMPLE_SIGNING_MEDIA_TYPE) {
            continue;
        }
        let Some(signature) = layer["annotations"][SIGNATURE_ANNOTATION].as_str() else {
            refusals.push(CosignRefusal::NoAnnotation);
            continue;
        };
        let digest = layer["digest"].as_str().unwrap_or("");
        let payload = client
            .blob(&signatures, digest, "signature payload", 1 << 20, None)
            .map_err(CosignError::Payload)?;
        match check_payload(&payload, signature, key, expected) {
            Ok(()) => return Ok(()),
            Err(refusal) => refusals.push(refusal),
        }
    }
    if refusals.is_empty() {
        refusals.push(CosignRefusal::NoPayloads);
    }
    Err(CosignError::NoneValid(Refusals(refusals)))
}

pub(super) fn check_payload(
    payload: &[u8],
    signature_b64: &str,
    key: &VerifyingKey,
    expected: &Expected<'_>,
) -> Result<(), CosignRefusal> {
    let der = STANDARD
        .decode(signature_b64)
        .map_err(CosignRefusal::NotBase64)?;
    let signature = Signature::from_der(&der).map_err(CosignRefusal::NotDer)?;
    key.verify(payload, &signature)
        .map_err(|_| CosignRefusal::DoesNotVerify)?;
    Ok(expected.check(payload)?)
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

/// Signs `payload` the way cosign does (ECDSA P-256 over SHA-256, DER,
/// base64): for `kabuto-owner image sign` and tests.
pub fn sign_payload(key: &p256::ecdsa::SigningKey, payload: &[u8]) -> String {
    use p256::ecdsa::signature::Signer as _;
    let signature: Signature = key.sign(payload);
    STANDARD.encode(signature.to_der().as_bytes())
}

/// A cosign signature image (cosign's SIGNATURE_SPEC): a simple-signing
/// payload layer with the signature in its annotation, and a config.
pub struct CosignSignatureImage {
    pub config: Vec<u8>,
    pub payload: Vec<u8>,
    /// The OCI image manifest referring to both.
    pub manifest: Vec<u8>,
}

impl CosignSignatureImage {
    /// Signs `manifest_digest` for `docker_reference` (the repository).
    pub fn new(
        docker_reference: &str,
        manifest_digest: &str,
        key: &p256::ecdsa::SigningKey,
    ) -> CosignSignatureImage {
        let digest = crate::sha256_digest;
        let payload = simple_signing_payload(docker_reference, manifest_digest);
        let config = serde_json::json!({
            "architecture": "", "os": "", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [digest(&payload)]},
        })
        .to_string()
        .into_bytes();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST_MEDIA_TYPE,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": digest(&config), "size": config.len()},
            "layers": [{"mediaType": SIMPLE_SIGNING_MEDIA_TYPE, "digest": digest(&payload),
                        "size": payload.len(),
                        "annotations": {SIGNATURE_ANNOTATION: sign_payload(key, &payload)}}],
        })
        .to_string()
        .into_bytes();
        CosignSignatureImage {
            config,
            payload,
            manifest,
        }
    }

    /// Pushes it to `repository` (of `image`) at the tag cosign uses for
    /// `manifest_digest`; returns the tag.
    pub fn push(
        &self,
        image: &ImageReference,
        manifest_digest: &str,
        client: &mut RegistryClient,
    ) -> Result<String, RegistryError> {
        client.push_blob(image, &self.config)?;
        client.push_blob(image, &self.payload)?;
        let tag = signature_tag(manifest_digest);
        client.push_manifest(image, &tag, OCI_MANIFEST_MEDIA_TYPE, &self.manifest)?;
        Ok(tag)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("not a P-256 private key in PEM (PKCS#8 or SEC1)")]
    NotPem,
    #[error("not a P-256 private key")]
    Sec1(#[source] p256::elliptic_curve::Error),
}

/// A P-256 signing key from PEM: PKCS#8 (`openssl genpkey`) or SEC1
/// (`openssl ecparam -genkey`, whose EC PARAMETERS block is skipped).
pub fn signing_key_from_pem(pem: &str) -> Result<p256::ecdsa::SigningKey, SigningKeyError> {
    use p256::pkcs8::DecodePrivateKey as _;
    if let Ok(key) = p256::ecdsa::SigningKey::from_pkcs8_pem(pem) {
        return Ok(key);
    }
    let sec1 = pem
        .find("-----BEGIN EC PRIVATE KEY-----")
        .map(|start| &pem[start..])
        .ok_or(SigningKeyError::NotPem)?;
    p256::SecretKey::from_sec1_pem(sec1)
        .map(p256::ecdsa::SigningKey::from)
        .map_err(SigningKeyError::Sec1)
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
    let image = CosignSignatureImage::new(docker_reference, manifest_digest, key);
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    let put = |b: &[u8]| -> std::io::Result<String> {
        let d = crate::sha256_digest(b);
        std::fs::write(dir.join("blobs/sha256").join(&d[7..]), b)?;
        Ok(d)
    };
    put(&image.config)?;
    put(&image.payload)?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_MANIFEST_MEDIA_TYPE, "digest": put(&image.manifest)?,
        "size": image.manifest.len(), "annotations": {"org.opencontainers.image.ref.name": "sig"}}]});
    std::fs::write(dir.join("index.json"), index.to_string())?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
}
