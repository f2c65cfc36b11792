//! What a verified payload must say: its type, the manifest digest, and a
//! signed identity the policy's `signedIdentity` rule accepts.

use serde::Deserialize;

use crate::registry::ImageReference;

/// Which signed identities a signature may carry for the image
/// (`signedIdentity`; default `matchRepoDigestOrExact`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub(super) enum SignedIdentity {
    MatchExact,
    #[default]
    MatchRepoDigestOrExact,
    MatchRepository,
    #[serde(rename_all = "camelCase")]
    ExactReference {
        docker_reference: String,
    },
    #[serde(rename_all = "camelCase")]
    ExactRepository {
        docker_repository: String,
    },
}

/// Why a payload whose signature verified does not count.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("payload is not JSON")]
    NotJson(#[source] serde_json::Error),
    #[error("payload type {0}")]
    Type(String),
    #[error("a valid signature is for manifest {signed}, not {expected}")]
    Manifest { signed: String, expected: String },
    #[error("the signed identity {0:?} is not a reference")]
    NotReference(String),
    #[error("a valid signature is for {signed:?}, not {image} ({rule})")]
    Identity {
        signed: String,
        image: String,
        rule: String,
    },
}

/// What a signature's payload must say.
pub(super) struct Expected<'a> {
    pub(super) image: &'a ImageReference,
    pub(super) manifest_digest: &'a str,
    identity: &'a SignedIdentity,
    payload_type: &'static str,
}

impl<'a> Expected<'a> {
    pub(super) fn new(
        image: &'a ImageReference,
        manifest_digest: &'a str,
        identity: &'a SignedIdentity,
        payload_type: &'static str,
    ) -> Expected<'a> {
        Expected {
            image,
            manifest_digest,
            identity,
            payload_type,
        }
    }

    /// Reads a payload whose signature verified: type, manifest digest
    /// and identity (`signedIdentity`).
    pub(super) fn check(&self, payload: &[u8]) -> Result<(), PayloadError> {
        let doc: serde_json::Value =
            serde_json::from_slice(payload).map_err(PayloadError::NotJson)?;
        let critical = &doc["critical"];
        if critical["type"].as_str() != Some(self.payload_type) {
            return Err(PayloadError::Type(format!("{:?}", critical["type"])));
        }
        let signed_digest = critical["image"]["docker-manifest-digest"]
            .as_str()
            .unwrap_or("");
        if signed_digest != self.manifest_digest {
            return Err(PayloadError::Manifest {
                signed: signed_digest.to_string(),
                expected: self.manifest_digest.to_string(),
            });
        }
        let signed_reference = critical["identity"]["docker-reference"]
            .as_str()
            .unwrap_or("");
        identity_matches(self.image, signed_reference, self.identity)
    }
}

/// `registry/repo:tag` or `registry/repo@digest`.
fn full_name(image: &ImageReference) -> String {
    let separator = if image.reference.starts_with("sha256:") {
        '@'
    } else {
        ':'
    };
    format!(
        "{}/{}{separator}{}",
        image.registry, image.repository, image.reference
    )
}

/// containers-policy.json's `signedIdentity` rules.
pub(super) fn identity_matches(
    image: &ImageReference,
    signed_reference: &str,
    identity: &SignedIdentity,
) -> Result<(), PayloadError> {
    let repo = format!("{}/{}", image.registry, image.repository);
    let by_digest = image.reference.starts_with("sha256:");
    let full = full_name(image);
    // A signed reference without tag or digest names the repository.
    let signed_has_reference = signed_reference
        .rsplit('/')
        .next()
        .is_some_and(|last| last.contains(':') || last.contains('@'));
    let signed = ImageReference::parse(signed_reference)
        .map_err(|_| PayloadError::NotReference(signed_reference.to_string()))?;
    let signed_repo = format!("{}/{}", signed.registry, signed.repository);
    let signed_full = full_name(&signed);
    let ok = match identity {
        SignedIdentity::MatchRepository => signed_repo == repo,
        SignedIdentity::MatchExact => !by_digest && signed_has_reference && signed_full == full,
        SignedIdentity::MatchRepoDigestOrExact if by_digest => signed_repo == repo,
        SignedIdentity::MatchRepoDigestOrExact => signed_has_reference && signed_full == full,
        SignedIdentity::ExactReference { docker_reference } => {
            ImageReference::parse(docker_reference).is_ok_and(|r| r == signed)
                && signed_has_reference
        }
        SignedIdentity::ExactRepository { docker_repository } => {
            ImageReference::parse(docker_repository)
                .is_ok_and(|r| r.registry == signed.registry && r.repository == signed.repository)
        }
    };
    if ok {
        Ok(())
    } else {
        Err(PayloadError::Identity {
            signed: signed_reference.to_string(),
            image: full,
            rule: format!("{identity:?}"),
        })
    }
}
