//! Image signature policy, with `containers-policy.json` semantics, and
//! the two signature formats it names.
//!
//! Policy: `{"default": [...], "transports": {"docker": {"<scope>": [...]}}}`;
//! the most specific scope for the image applies (`registry/repo:tag` or
//! `@digest`, `registry/repo`, its parent namespaces, `registry`), else
//! `default`; every requirement of the list must hold. Requirements:
//! `reject`, `insecureAcceptAnything`, `sigstoreSigned` (a PEM P-256 key)
//! and `signedBy` (`GPGKeys`), each with `signedIdentity` (default
//! `matchRepoDigestOrExact`; `matchExact`, `matchRepository`,
//! `exactReference`, `exactRepository`; `remapIdentity` is refused). Keys
//! are inline (`keyData`, base64) or read by the caller from a `keyPath`
//! (`kbs:///…` in the agent): the guest has no files of the owner's.
//!
//! A cosign signature lives in the image's repository at tag
//! `sha256-<hex>.sig`: an image whose layers are simple-signing payloads
//! (`{"critical": {"identity": {"docker-reference"}, "image":
//! {"docker-manifest-digest"}, "type": "cosign container image signature"}}`)
//! with the ECDSA P-256 signature over the payload in the layer annotation
//! `dev.cosignproject.cosign/signature` (base64 of DER).
//!
//! A GPG signature (skopeo `--sign-by`) is an OpenPGP message holding the
//! same kind of payload (type `atomic container signature`), read from a
//! lookaside store ([`Lookaside`]).

mod cosign;
mod gpg;
mod identity;
mod lookaside;
mod policy;

pub use cosign::{
    sign_payload, signature_tag, signing_key_from_pem, simple_signing_payload,
    write_signature_layout, CosignError, CosignRefusal, CosignSignatureImage, SigningKeyError,
};
pub use gpg::{GpgError, GpgRefusal, GpgSignatureError, KeyValidityError};
pub use identity::PayloadError;
pub use lookaside::{Lookaside, LookasideError};
pub use policy::{KeyPathError, KeyResolver, PolicyError, SignaturePolicy};

pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
pub const COSIGN_SIGNATURE_TYPE: &str = "cosign container image signature";
/// The payload type of GPG simple signing (skopeo `--sign-by`).
pub const GPG_SIGNATURE_TYPE: &str = "atomic container signature";

#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature policy is invalid")]
    Policy(#[source] PolicyError),
    #[error("image {image}: rejected by the signature policy (scope {scope})")]
    Rejected { image: String, scope: String },
    #[error("image {image}: no valid signature (scope {scope})")]
    Unsigned {
        image: String,
        scope: String,
        #[source]
        reason: Box<Unverified>,
    },
}

/// Why no signature of one format satisfied a requirement.
#[derive(Debug, thiserror::Error)]
pub enum Unverified {
    #[error(transparent)]
    Cosign(#[from] CosignError),
    #[error(transparent)]
    Gpg(#[from] GpgError),
}

/// Why each candidate failed, when several were tried: printed as their
/// chains joined by `"; "`.
#[derive(Debug)]
pub struct Refusals<T>(pub Vec<T>);

impl<T: std::error::Error> std::fmt::Display for Refusals<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, refusal) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}", kabuto_error::Chain(refusal))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
