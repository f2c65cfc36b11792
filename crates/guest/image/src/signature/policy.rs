//! containers-policy.json: scopes, requirements and their keys.

use std::collections::BTreeMap;

use base64::{engine::general_purpose::STANDARD, Engine as _};
use p256::ecdsa::VerifyingKey;
use p256::pkcs8::DecodePublicKey as _;
use serde::Deserialize;

use super::identity::{Expected, SignedIdentity};
use super::{cosign, gpg, Lookaside, SignatureError, Unverified};
use super::{COSIGN_SIGNATURE_TYPE, GPG_SIGNATURE_TYPE};
use crate::registry::{ImageReference, RegistryClient};

/// Why a policy cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Not a policy document (the message names the field, never echoes
    /// the document).
    #[error("{0}")]
    Json(String),
    #[error("transport {0:?} is not supported (only docker)")]
    Transport(String),
    #[error("{requirement} keyData is not base64")]
    KeyData {
        requirement: &'static str,
        #[source]
        source: base64::DecodeError,
    },
    #[error("{requirement} needs exactly one of {fields}")]
    KeySource {
        requirement: &'static str,
        fields: &'static str,
    },
    #[error("keyPath {path:?}")]
    KeyPath {
        path: String,
        #[source]
        source: KeyPathError,
    },
    #[error("signedBy keyType {0:?} is not supported (only GPGKeys)")]
    KeyType(String),
    #[error("the key is not a PEM text")]
    NotPem,
    #[error("the key is not a P-256 public key")]
    NotP256(#[source] p256::pkcs8::spki::Error),
    #[error("signedBy key")]
    GpgKey(#[source] pgp::errors::Error),
    #[error("signedBy key data holds no OpenPGP public key")]
    NoGpgKey,
}

/// Why a [`KeyResolver`] could not read a `keyPath`: the caller's error.
pub type KeyPathError = Box<dyn std::error::Error + Send + Sync>;

/// Reads what a `keyPath` names (`kbs:///…`, `initdata:///…` in the
/// agent); the guest has no files of the owner's.
pub type KeyResolver<'a> = &'a dyn Fn(&str) -> Result<Vec<u8>, KeyPathError>;

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
enum RawRequirement {
    Reject,
    InsecureAcceptAnything,
    #[serde(rename_all = "camelCase")]
    SigstoreSigned {
        #[serde(default)]
        key_data: Option<String>,
        #[serde(default)]
        key_path: Option<String>,
        #[serde(default)]
        signed_identity: Option<SignedIdentity>,
    },
    #[serde(rename_all = "camelCase")]
    SignedBy {
        #[serde(default)]
        key_type: Option<String>,
        #[serde(default)]
        key_data: Option<String>,
        #[serde(default)]
        key_path: Option<String>,
        #[serde(default)]
        key_paths: Option<Vec<String>>,
        #[serde(default)]
        signed_identity: Option<SignedIdentity>,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    default: Vec<RawRequirement>,
    #[serde(default)]
    transports: BTreeMap<String, BTreeMap<String, Vec<RawRequirement>>>,
}

/// A requirement with its keys parsed.
#[derive(Debug, Clone)]
pub(super) enum Requirement {
    Reject,
    InsecureAcceptAnything,
    Sigstore {
        key: VerifyingKey,
        identity: SignedIdentity,
    },
    Gpg {
        keys: Vec<pgp::composed::SignedPublicKey>,
        identity: SignedIdentity,
    },
}

/// A parsed, checked signature policy.
#[derive(Debug, Clone)]
pub struct SignaturePolicy {
    default: Vec<Requirement>,
    docker: BTreeMap<String, Vec<Requirement>>,
}

#[derive(Debug, thiserror::Error)]
#[error("no key source here (the agent reads kbs:/// and initdata:/// paths)")]
struct NoKeySource;

impl SignaturePolicy {
    /// A policy whose keys are all inline (`keyData`).
    pub fn from_json(text: &[u8]) -> Result<SignaturePolicy, SignatureError> {
        Self::from_json_with(text, &|_| Err(Box::new(NoKeySource)))
    }

    /// A policy whose `keyPath`s are read with `resolve`.
    pub fn from_json_with(
        text: &[u8],
        resolve: KeyResolver<'_>,
    ) -> Result<SignaturePolicy, SignatureError> {
        Self::parse(text, resolve).map_err(SignatureError::Policy)
    }

    fn parse(text: &[u8], resolve: KeyResolver<'_>) -> Result<SignaturePolicy, PolicyError> {
        let file: PolicyFile =
            serde_json::from_slice(text).map_err(|e| PolicyError::Json(crate::redact::json(&e)))?;
        let convert = |list: Vec<RawRequirement>| -> Result<Vec<Requirement>, PolicyError> {
            list.into_iter()
                .map(|r| Requirement::parse(r, resolve))
                .collect()
        };
        let mut docker = BTreeMap::new();
        for (transport, scopes) in file.transports {
            if transport != "docker" {
                return Err(PolicyError::Transport(transport));
            }
            for (scope, list) in scopes {
                docker.insert(scope, convert(list)?);
            }
        }
        Ok(SignaturePolicy {
            default: convert(file.default)?,
            docker,
        })
    }

    /// The requirements for `image` and the scope they came from.
    pub(super) fn requirements(&self, image: &ImageReference) -> (String, &[Requirement]) {
        let repo = format!("{}/{}", image.registry, image.repository);
        let separator = if image.reference.starts_with("sha256:") {
            '@'
        } else {
            ':'
        };
        let mut candidates = vec![format!("{repo}{separator}{}", image.reference)];
        candidates.extend(namespaces(&repo));
        for scope in candidates {
            if let Some(r) = self.docker.get(&scope) {
                return (scope, r);
            }
        }
        ("default".into(), &self.default)
    }

    /// Checks `image` (whose platform manifest has `manifest_digest`)
    /// against the policy, fetching signatures with `client`.
    pub fn check(
        &self,
        image: &ImageReference,
        manifest_digest: &str,
        client: &mut RegistryClient,
    ) -> Result<(), SignatureError> {
        self.check_at(image, image, manifest_digest, &Lookaside::default(), client)
    }

    /// As [`SignaturePolicy::check`] for an image pulled from `source` (a
    /// mirror): scopes and signed identities are `image`'s; cosign
    /// signatures are fetched from `source`, GPG signatures from the
    /// `lookaside` store configured for `image`.
    pub fn check_at(
        &self,
        image: &ImageReference,
        source: &ImageReference,
        manifest_digest: &str,
        lookaside: &Lookaside,
        client: &mut RegistryClient,
    ) -> Result<(), SignatureError> {
        let (scope, requirements) = self.requirements(image);
        let name = format!("{}/{}", image.registry, image.repository);
        if requirements.is_empty() {
            return Err(SignatureError::Rejected { image: name, scope });
        }
        for requirement in requirements {
            let unsigned = |reason: Unverified| SignatureError::Unsigned {
                image: name.clone(),
                scope: scope.clone(),
                reason: Box::new(reason),
            };
            match requirement {
                Requirement::InsecureAcceptAnything => {}
                Requirement::Reject => {
                    return Err(SignatureError::Rejected {
                        image: name.clone(),
                        scope,
                    })
                }
                Requirement::Sigstore { key, identity } => {
                    let expected =
                        Expected::new(image, manifest_digest, identity, COSIGN_SIGNATURE_TYPE);
                    cosign::verify(&expected, source, key, client)
                        .map_err(|e| unsigned(e.into()))?;
                }
                Requirement::Gpg { keys, identity } => {
                    let expected =
                        Expected::new(image, manifest_digest, identity, GPG_SIGNATURE_TYPE);
                    gpg::verify(&expected, keys, lookaside, client)
                        .map_err(|e| unsigned(e.into()))?;
                }
            }
        }
        Ok(())
    }
}

/// `registry/a/b` → `registry/a/b`, `registry/a`, `registry`.
pub(super) fn namespaces(repo: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut namespace = repo;
    loop {
        out.push(namespace.to_string());
        match namespace.rfind('/') {
            Some(i) => namespace = &namespace[..i],
            None => return out,
        }
    }
}

impl Requirement {
    fn parse(raw: RawRequirement, resolve: KeyResolver<'_>) -> Result<Requirement, PolicyError> {
        let read = |path: &str| {
            resolve(path).map_err(|source| PolicyError::KeyPath {
                path: path.to_string(),
                source,
            })
        };
        let inline = |requirement, data: String| {
            STANDARD
                .decode(data.trim())
                .map_err(|source| PolicyError::KeyData {
                    requirement,
                    source,
                })
        };
        Ok(match raw {
            RawRequirement::Reject => Requirement::Reject,
            RawRequirement::InsecureAcceptAnything => Requirement::InsecureAcceptAnything,
            RawRequirement::SigstoreSigned {
                key_data,
                key_path,
                signed_identity,
            } => {
                let pem = match (key_data, key_path) {
                    (Some(data), None) => inline("sigstoreSigned", data)?,
                    (None, Some(path)) => read(&path)?,
                    _ => {
                        return Err(PolicyError::KeySource {
                            requirement: "sigstoreSigned",
                            fields: "keyData, keyPath",
                        })
                    }
                };
                Requirement::Sigstore {
                    key: verifying_key(&pem)?,
                    identity: signed_identity.unwrap_or_default(),
                }
            }
            RawRequirement::SignedBy {
                key_type,
                key_data,
                key_path,
                key_paths,
                signed_identity,
            } => {
                if let Some(t) = key_type.filter(|t| t != "GPGKeys") {
                    return Err(PolicyError::KeyType(t));
                }
                let rings = match (key_data, key_path, key_paths) {
                    (Some(data), None, None) => vec![inline("signedBy", data)?],
                    (None, Some(path), None) => vec![read(&path)?],
                    (None, None, Some(paths)) => {
                        paths.iter().map(|p| read(p)).collect::<Result<_, _>>()?
                    }
                    _ => {
                        return Err(PolicyError::KeySource {
                            requirement: "signedBy",
                            fields: "keyData, keyPath, keyPaths",
                        })
                    }
                };
                let mut keys = Vec::new();
                for ring in rings {
                    keys.extend(gpg::public_keys(&ring)?);
                }
                Requirement::Gpg {
                    keys,
                    identity: signed_identity.unwrap_or_default(),
                }
            }
        })
    }
}

fn verifying_key(pem: &[u8]) -> Result<VerifyingKey, PolicyError> {
    let pem = std::str::from_utf8(pem).map_err(|_| PolicyError::NotPem)?;
    VerifyingKey::from_public_key_pem(pem).map_err(PolicyError::NotP256)
}
