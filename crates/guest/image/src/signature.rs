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

use std::collections::BTreeMap;

use base64::{engine::general_purpose::STANDARD, Engine as _};
use p256::ecdsa::{signature::Verifier as _, Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey as _;
use serde::Deserialize;

use crate::registry::{ImageReference, RegistryClient};

pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
pub const COSIGN_SIGNATURE_TYPE: &str = "cosign container image signature";
/// The payload type of GPG simple signing (skopeo `--sign-by`).
pub const GPG_SIGNATURE_TYPE: &str = "atomic container signature";

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

/// Which signed identities a signature may carry for the image
/// (`signedIdentity`; default `matchRepoDigestOrExact`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
enum SignedIdentity {
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    default: Vec<RawRequirement>,
    #[serde(default)]
    transports: BTreeMap<String, BTreeMap<String, Vec<RawRequirement>>>,
}

/// A requirement with its keys parsed.
#[derive(Debug, Clone)]
enum Requirement {
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

/// Reads what a `keyPath` names (`kbs:///…`, `initdata:///…` in the
/// agent); the guest has no files of the owner's.
pub type KeyResolver<'a> = &'a dyn Fn(&str) -> Result<Vec<u8>, String>;

/// A parsed, checked signature policy.
#[derive(Debug, Clone)]
pub struct SignaturePolicy {
    default: Vec<Requirement>,
    docker: BTreeMap<String, Vec<Requirement>>,
}

impl SignaturePolicy {
    /// A policy whose keys are all inline (`keyData`).
    pub fn from_json(text: &[u8]) -> Result<SignaturePolicy, SignatureError> {
        Self::from_json_with(text, &|path| {
            Err(format!(
                "keyPath {path:?}: no key source here (the agent reads kbs:/// and initdata:/// paths)"
            ))
        })
    }

    /// A policy whose `keyPath`s are read with `resolve`.
    pub fn from_json_with(
        text: &[u8],
        resolve: KeyResolver<'_>,
    ) -> Result<SignaturePolicy, SignatureError> {
        let file: PolicyFile = serde_json::from_slice(text)
            .map_err(|e| SignatureError::Policy(crate::redact::json(&e)))?;
        let convert = |list: Vec<RawRequirement>| -> Result<Vec<Requirement>, SignatureError> {
            list.into_iter()
                .map(|r| Requirement::parse(r, resolve).map_err(SignatureError::Policy))
                .collect()
        };
        let mut docker = BTreeMap::new();
        for (transport, scopes) in file.transports {
            if transport != "docker" {
                return Err(SignatureError::Policy(format!(
                    "transport {transport:?} is not supported (only docker)"
                )));
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
    fn requirements(&self, image: &ImageReference) -> (String, &[Requirement]) {
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
            let unsigned = |reason| SignatureError::Unsigned {
                image: name.clone(),
                scope: scope.clone(),
                reason,
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
                    verify_sigstore(&expected, source, key, client).map_err(unsigned)?;
                }
                Requirement::Gpg { keys, identity } => {
                    let expected =
                        Expected::new(image, manifest_digest, identity, GPG_SIGNATURE_TYPE);
                    verify_gpg(&expected, keys, lookaside, client).map_err(unsigned)?;
                }
            }
        }
        Ok(())
    }
}

/// `registry/a/b` → `registry/a/b`, `registry/a`, `registry`.
fn namespaces(repo: &str) -> Vec<String> {
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
    fn parse(raw: RawRequirement, resolve: KeyResolver<'_>) -> Result<Requirement, String> {
        Ok(match raw {
            RawRequirement::Reject => Requirement::Reject,
            RawRequirement::InsecureAcceptAnything => Requirement::InsecureAcceptAnything,
            RawRequirement::SigstoreSigned {
                key_data,
                key_path,
                signed_identity,
            } => {
                let pem = match (key_data, key_path) {
                    (Some(data), None) => STANDARD
                        .decode(data.trim())
                        .map_err(|e| format!("sigstoreSigned keyData is not base64: {e}"))?,
                    (None, Some(path)) => resolve(&path)?,
                    _ => return Err("sigstoreSigned needs exactly one of keyData, keyPath".into()),
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
                if let Some(t) = key_type.as_deref().filter(|t| *t != "GPGKeys") {
                    return Err(format!(
                        "signedBy keyType {t:?} is not supported (only GPGKeys)"
                    ));
                }
                let rings = match (key_data, key_path, key_paths) {
                    (Some(data), None, None) => vec![STANDARD
                        .decode(data.trim())
                        .map_err(|e| format!("signedBy keyData is not base64: {e}"))?],
                    (None, Some(path), None) => vec![resolve(&path)?],
                    (None, None, Some(paths)) => {
                        paths.iter().map(|p| resolve(p)).collect::<Result<_, _>>()?
                    }
                    _ => {
                        return Err(
                            "signedBy needs exactly one of keyData, keyPath, keyPaths".into()
                        )
                    }
                };
                let mut keys = Vec::new();
                for ring in rings {
                    keys.extend(gpg_keys(&ring)?);
                }
                Requirement::Gpg {
                    keys,
                    identity: signed_identity.unwrap_or_default(),
                }
            }
        })
    }
}

fn verifying_key(pem: &[u8]) -> Result<VerifyingKey, String> {
    let pem = std::str::from_utf8(pem).map_err(|_| "the key is not a PEM text".to_string())?;
    VerifyingKey::from_public_key_pem(pem)
        .map_err(|e| format!("the key is not a P-256 public key: {e}"))
}

/// OpenPGP public keys, armored or binary (`gpg --export [--armor]`).
fn gpg_keys(ring: &[u8]) -> Result<Vec<pgp::composed::SignedPublicKey>, String> {
    use pgp::composed::{Deserializable as _, SignedPublicKey};
    let armored = ring.trim_ascii_start().starts_with(b"-----BEGIN PGP");
    let keys: Vec<SignedPublicKey> = if armored {
        let (keys, _) =
            SignedPublicKey::from_armor_many(ring).map_err(|e| format!("signedBy key: {e}"))?;
        keys.collect::<Result<_, _>>()
    } else {
        SignedPublicKey::from_bytes_many(ring)
            .map_err(|e| format!("signedBy key: {e}"))?
            .collect::<Result<_, _>>()
    }
    .map_err(|e| format!("signedBy key: {e}"))?;
    if keys.is_empty() {
        return Err("signedBy key data holds no OpenPGP public key".into());
    }
    Ok(keys)
}

/// Where GPG ("simple signing") signatures are read from: the lookaside
/// stores of a `registries.d` configuration (YAML: `default-docker` and
/// `docker: {<scope>: …}` with `lookaside`, or the older `sigstore`). A
/// signature of `registry/repo` at `sha256:<hex>` is at
/// `<lookaside>/repo@sha256=<hex>/signature-<n>`, n = 1, 2, …
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Lookaside {
    #[serde(default, rename = "default-docker")]
    default_docker: Option<LookasideEntry>,
    #[serde(default)]
    docker: BTreeMap<String, LookasideEntry>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct LookasideEntry {
    #[serde(default)]
    lookaside: Option<String>,
    #[serde(default)]
    sigstore: Option<String>,
}

impl LookasideEntry {
    fn url(&self) -> Option<&str> {
        self.lookaside.as_deref().or(self.sigstore.as_deref())
    }
}

impl Lookaside {
    pub fn parse(yaml: &str) -> Result<Lookaside, SignatureError> {
        let parsed: Lookaside = serde_yaml::from_str(yaml)
            .map_err(|e| SignatureError::Policy(format!("registries.d configuration: {e}")))?;
        for url in parsed
            .default_docker
            .iter()
            .chain(parsed.docker.values())
            .filter_map(LookasideEntry::url)
        {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(SignatureError::Policy(format!(
                    "lookaside {url:?}: the guest reads only http(s) lookaside stores"
                )));
            }
        }
        Ok(parsed)
    }

    /// The lookaside base URL for `image`: its most specific scope.
    fn url_for(&self, image: &ImageReference) -> Option<&str> {
        namespaces(&format!("{}/{}", image.registry, image.repository))
            .iter()
            .find_map(|scope| self.docker.get(scope).and_then(LookasideEntry::url))
            .or_else(|| self.default_docker.as_ref().and_then(LookasideEntry::url))
    }
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

/// What a signature's payload must say.
struct Expected<'a> {
    image: &'a ImageReference,
    manifest_digest: &'a str,
    identity: &'a SignedIdentity,
    payload_type: &'static str,
}

impl<'a> Expected<'a> {
    fn new(
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
}

/// Some signature at `sha256-<hex>.sig` verifies with `key` and names
/// the manifest and an identity the policy accepts.
fn verify_sigstore(
    expected: &Expected<'_>,
    source: &ImageReference,
    key: &VerifyingKey,
    client: &mut RegistryClient,
) -> Result<(), String> {
    let signatures = ImageReference {
        reference: signature_tag(expected.manifest_digest),
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
            .blob(&signatures, digest, "signature payload", 1 << 20, None)
            .map_err(|e| e.to_string())?;
        match check_payload(&payload, signature, key, expected) {
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
    expected: &Expected<'_>,
) -> Result<(), String> {
    let der = STANDARD
        .decode(signature_b64)
        .map_err(|e| format!("signature is not base64: {e}"))?;
    let signature = Signature::from_der(&der).map_err(|e| format!("signature is not DER: {e}"))?;
    key.verify(payload, &signature)
        .map_err(|_| "a signature does not verify with the policy's key".to_string())?;
    check_verified_payload(payload, expected)
}

/// Most signatures read per image from a lookaside store.
const MAX_LOOKASIDE_SIGNATURES: usize = 16;

/// Some `signature-<n>` in the lookaside store is an OpenPGP message
/// signed by one of `keys` whose payload names the manifest and an
/// identity the policy accepts, by a key that is neither revoked nor
/// expired (see [`gpg_signature_valid_at`]).
fn verify_gpg(
    expected: &Expected<'_>,
    keys: &[pgp::composed::SignedPublicKey],
    lookaside: &Lookaside,
    client: &mut RegistryClient,
) -> Result<(), String> {
    let image = expected.image;
    let base = lookaside.url_for(image).ok_or_else(|| {
        format!(
            "no lookaside store is configured for {}/{} (signedBy signatures are read from one: \
             sigstore_config_uri)",
            image.registry, image.repository
        )
    })?;
    let hex = expected
        .manifest_digest
        .strip_prefix("sha256:")
        .ok_or("the manifest digest is not sha256")?;
    let mut reasons = Vec::new();
    for n in 1..=MAX_LOOKASIDE_SIGNATURES {
        let url = format!(
            "{}/{}@sha256={hex}/signature-{n}",
            base.trim_end_matches('/'),
            image.repository
        );
        let Some(bytes) = client.get_url(&url, 1 << 20).map_err(|e| e.to_string())? else {
            if n == 1 {
                reasons.push(format!("no signatures at {url}"));
            }
            break;
        };
        match check_gpg_signature(&bytes, keys, expected) {
            Ok(()) => return Ok(()),
            Err(reason) => reasons.push(format!("signature-{n}: {reason}")),
        }
    }
    Err(reasons.join("; "))
}

fn check_gpg_signature(
    bytes: &[u8],
    keys: &[pgp::composed::SignedPublicKey],
    expected: &Expected<'_>,
) -> Result<(), String> {
    use pgp::composed::Message;
    let message = Message::from_bytes(bytes).map_err(|e| format!("not an OpenPGP message: {e}"))?;
    let mut message = message
        .decompress()
        .map_err(|e| format!("decompressing the OpenPGP message: {e}"))?;
    let payload = message
        .as_data_vec()
        .map_err(|e| format!("reading the OpenPGP message: {e}"))?;
    let now = std::time::SystemTime::now();
    let mut refusals = Vec::new();
    for key in keys {
        let by_primary = message.verify(key).ok().map(|sig| (sig, None));
        let by_subkey = || {
            key.public_subkeys
                .iter()
                .find_map(|sub| message.verify(sub).ok().map(|sig| (sig, Some(sub))))
        };
        if let Some((sig, subkey)) = by_primary.or_else(by_subkey) {
            match gpg_signature_valid_at(key, subkey, sig, now) {
                Ok(()) => return check_verified_payload(&payload, expected),
                Err(reason) => refusals.push(reason),
            }
        }
    }
    if refusals.is_empty() {
        return Err("not signed by a key of the policy".into());
    }
    Err(refusals.join("; "))
}

/// What gpgme (and so containers/image) also refuses: a signature by a
/// revoked or expired key or subkey, or an expired signature. `now` is the
/// guest's clock, which the host sets: a host could roll it back, so
/// expiry limits an old key's use only as far as the guest's time is
/// right (revocation does not depend on it).
fn gpg_signature_valid_at(
    key: &pgp::composed::SignedPublicKey,
    subkey: Option<&pgp::composed::SignedPublicSubKey>,
    sig: &pgp::packet::Signature,
    now: std::time::SystemTime,
) -> Result<(), String> {
    use pgp::packet::{Signature, SignatureType};
    use pgp::types::{KeyDetails as _, Tag};
    let primary = &key.primary_key;
    let id = hex::encode(primary.fingerprint().as_bytes());
    // Only signatures the key made itself count (keys may carry others'
    // certifications).
    if key
        .details
        .revocation_signatures
        .iter()
        .any(|r| r.verify_key(primary).is_ok())
    {
        return Err(format!("key {id} is revoked"));
    }
    let newest_validity = |sigs: Vec<&Signature>| {
        sigs.into_iter()
            .max_by_key(|s| s.created().map_or(0, |t| t.as_secs()))
            .and_then(|s| s.key_expiration_time())
    };
    let self_signatures: Vec<&Signature> = key
        .details
        .users
        .iter()
        .flat_map(|u| {
            u.signatures
                .iter()
                .filter(|s| s.verify_certification(primary, Tag::UserId, &u.id).is_ok())
        })
        .chain(
            key.details
                .direct_signatures
                .iter()
                .filter(|s| s.verify_key(primary).is_ok()),
        )
        .collect();
    if self_signatures.is_empty() {
        return Err(format!("key {id} has no valid self-signature"));
    }
    not_expired(
        primary.created_at().as_secs(),
        newest_validity(self_signatures),
        now,
        &format!("key {id}"),
    )?;
    if let Some(sub) = subkey {
        let sub_id = hex::encode(sub.key.fingerprint().as_bytes());
        let own: Vec<&Signature> = sub
            .signatures
            .iter()
            .filter(|s| s.verify_subkey_binding(primary, &sub.key).is_ok())
            .collect();
        if own
            .iter()
            .any(|s| s.typ() == Some(SignatureType::SubkeyRevocation))
        {
            return Err(format!("subkey {sub_id} of key {id} is revoked"));
        }
        let bindings: Vec<&Signature> = own
            .into_iter()
            .filter(|s| s.typ() == Some(SignatureType::SubkeyBinding))
            .collect();
        if bindings.is_empty() {
            return Err(format!("subkey {sub_id} of key {id} has no valid binding"));
        }
        not_expired(
            sub.key.created_at().as_secs(),
            newest_validity(bindings),
            now,
            &format!("subkey {sub_id} of key {id}"),
        )?;
    }
    if let Some(created) = sig.created() {
        not_expired(
            created.as_secs(),
            sig.signature_expiration_time(),
            now,
            "the signature",
        )?;
    }
    Ok(())
}

/// `what`, made at `created` (Unix seconds) and valid for `validity`
/// (none or zero: forever), has not expired at `now`.
fn not_expired(
    created: u32,
    validity: Option<pgp::types::Duration>,
    now: std::time::SystemTime,
    what: &str,
) -> Result<(), String> {
    let Some(secs) = validity.map(|v| v.as_secs()).filter(|&s| s > 0) else {
        return Ok(());
    };
    let expiry = u64::from(created) + u64::from(secs);
    let now = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if now >= expiry {
        return Err(format!(
            "{what} expired at {expiry} (Unix time; {} s ago)",
            now - expiry
        ));
    }
    Ok(())
}

/// Reads a payload whose signature verified: type, manifest digest and
/// identity (`signedIdentity`).
fn check_verified_payload(payload: &[u8], expected: &Expected<'_>) -> Result<(), String> {
    let doc: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| format!("payload is not JSON: {e}"))?;
    let critical = &doc["critical"];
    if critical["type"].as_str() != Some(expected.payload_type) {
        return Err(format!("payload type {:?}", critical["type"]));
    }
    let signed_digest = critical["image"]["docker-manifest-digest"]
        .as_str()
        .unwrap_or("");
    if signed_digest != expected.manifest_digest {
        return Err(format!(
            "a valid signature is for manifest {signed_digest}, not {}",
            expected.manifest_digest
        ));
    }
    let signed_reference = critical["identity"]["docker-reference"]
        .as_str()
        .unwrap_or("");
    identity_matches(expected.image, signed_reference, expected.identity)
}

/// containers-policy.json's `signedIdentity` rules.
fn identity_matches(
    image: &ImageReference,
    signed_reference: &str,
    identity: &SignedIdentity,
) -> Result<(), String> {
    let repo = format!("{}/{}", image.registry, image.repository);
    let by_digest = image.reference.starts_with("sha256:");
    let full = format!(
        "{repo}{}{}",
        if by_digest { '@' } else { ':' },
        image.reference
    );
    // A signed reference without tag or digest names the repository.
    let signed_has_reference = signed_reference
        .rsplit('/')
        .next()
        .is_some_and(|last| last.contains(':') || last.contains('@'));
    let signed = ImageReference::parse(signed_reference)
        .map_err(|_| format!("the signed identity {signed_reference:?} is not a reference"))?;
    let signed_repo = format!("{}/{}", signed.registry, signed.repository);
    let signed_full = format!(
        "{signed_repo}{}{}",
        if signed.reference.starts_with("sha256:") {
            '@'
        } else {
            ':'
        },
        signed.reference
    );
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
        Err(format!(
            "a valid signature is for {signed_reference:?}, not {full} ({identity:?})"
        ))
    }
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
    ) -> Result<String, crate::RegistryError> {
        client.push_blob(image, &self.config)?;
        client.push_blob(image, &self.payload)?;
        let tag = signature_tag(manifest_digest);
        client.push_manifest(image, &tag, OCI_MANIFEST_MEDIA_TYPE, &self.manifest)?;
        Ok(tag)
    }
}

const OCI_MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// A P-256 signing key from PEM: PKCS#8 (`openssl genpkey`) or SEC1
/// (`openssl ecparam -genkey`, whose EC PARAMETERS block is skipped).
pub fn signing_key_from_pem(pem: &str) -> Result<p256::ecdsa::SigningKey, String> {
    use p256::pkcs8::DecodePrivateKey as _;
    if let Ok(key) = p256::ecdsa::SigningKey::from_pkcs8_pem(pem) {
        return Ok(key);
    }
    let sec1 = pem
        .find("-----BEGIN EC PRIVATE KEY-----")
        .map(|start| &pem[start..])
        .ok_or("not a P-256 private key in PEM (PKCS#8 or SEC1)")?;
    p256::SecretKey::from_sec1_pem(sec1)
        .map(p256::ecdsa::SigningKey::from)
        .map_err(|e| format!("not a P-256 private key: {e}"))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn expiry_counts_from_creation_and_zero_means_never() {
        let at = |secs: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        let days = |d: u32| Some(pgp::types::Duration::from_secs(d * 86_400));
        assert!(not_expired(1_000, days(1), at(1_000 + 86_399), "key").is_ok());
        let err = not_expired(1_000, days(1), at(1_000 + 86_400 + 5), "key").unwrap_err();
        assert_eq!(err, "key expired at 87400 (Unix time; 5 s ago)");
        assert!(not_expired(1_000, None, at(u64::from(u32::MAX)), "key").is_ok());
        assert!(not_expired(1_000, days(0), at(u64::from(u32::MAX)), "key").is_ok());
    }

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
                "no key source here",
            ),
            (
                r#"{"default": [{"type": "sigstoreSigned"}]}"#,
                "exactly one of keyData, keyPath",
            ),
            (
                r#"{"default": [{"type": "sigstoreSigned", "keyData": "bm90IGEga2V5"}]}"#,
                "not a P-256 public key",
            ),
            (
                r#"{"default": [{"type": "signedBy", "keyType": "X509Certificates", "keyData": ""}]}"#,
                "only GPGKeys",
            ),
            (
                r#"{"default": [{"type": "signedBy", "keyType": "GPGKeys", "keyData": "bm90IGEga2V5"}]}"#,
                "signedBy key",
            ),
            (
                r#"{"default": [{"type": "signedBy", "keyData": "", "signedIdentity": {"type": "remapIdentity", "prefix": "a", "signedPrefix": "b"}}]}"#,
                "unknown variant",
            ),
            (r#"{"default": [{"type": "bogus"}]}"#, "unknown variant"),
            (r#"{"transports": {}}"#, "missing field `default`"),
            (
                r#"{"default": [], "transports": {"atomic": {}}}"#,
                "only docker",
            ),
        ] {
            let e = SignaturePolicy::from_json(policy.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{policy}: {e}");
        }
    }

    #[test]
    fn key_paths_are_read_with_the_resolver() {
        let key = p256::ecdsa::SigningKey::random(&mut rand::thread_rng());
        let pem = STANDARD.decode(key_data(&key)).unwrap();
        let policy = br#"{"default": [{"type": "sigstoreSigned", "keyPath": "kbs:///default/cosign-key/1"}]}"#;
        let seen = std::cell::RefCell::new(Vec::new());
        SignaturePolicy::from_json_with(policy, &|path| {
            seen.borrow_mut().push(path.to_string());
            Ok(pem.clone())
        })
        .unwrap();
        assert_eq!(*seen.borrow(), ["kbs:///default/cosign-key/1"]);
        let e = SignaturePolicy::from_json_with(policy, &|_| Err("KBS said no".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("KBS said no"), "{e}");
    }

    fn expected<'a>(
        image: &'a ImageReference,
        digest: &'a str,
        identity: &'a SignedIdentity,
    ) -> Expected<'a> {
        Expected::new(image, digest, identity, COSIGN_SIGNATURE_TYPE)
    }

    #[test]
    fn payloads_must_verify_and_name_the_image() {
        let key = p256::ecdsa::SigningKey::random(&mut rand::thread_rng());
        let verifying = *key.verifying_key();
        let img = image("registry.example/team/app:v1");
        let digest = format!("sha256:{}", "1".repeat(64));
        let repo = SignedIdentity::MatchRepository;
        let payload = simple_signing_payload("registry.example/team/app", &digest);
        let signature = sign_payload(&key, &payload);
        check_payload(
            &payload,
            &signature,
            &verifying,
            &expected(&img, &digest, &repo),
        )
        .unwrap();

        let other = p256::ecdsa::SigningKey::random(&mut rand::thread_rng());
        let e = check_payload(
            &payload,
            &sign_payload(&other, &payload),
            &verifying,
            &expected(&img, &digest, &repo),
        )
        .unwrap_err();
        assert!(e.contains("does not verify"), "{e}");

        let mut tampered = payload.clone();
        tampered[10] ^= 1;
        assert!(check_payload(
            &tampered,
            &signature,
            &verifying,
            &expected(&img, &digest, &repo)
        )
        .is_err());

        let two = format!("sha256:{}", "2".repeat(64));
        let e = check_payload(
            &payload,
            &signature,
            &verifying,
            &expected(&img, &two, &repo),
        )
        .unwrap_err();
        assert!(e.contains("is for manifest"), "{e}");

        let elsewhere = simple_signing_payload("registry.example/team/other", &digest);
        let e = check_payload(
            &elsewhere,
            &sign_payload(&key, &elsewhere),
            &verifying,
            &expected(&img, &digest, &repo),
        )
        .unwrap_err();
        assert!(e.contains("not registry.example/team/app"), "{e}");
    }

    #[test]
    fn signed_identities_follow_containers_policy() {
        let by_tag = image("registry.example/team/app:v1");
        let by_digest = image(&format!(
            "registry.example/team/app@sha256:{}",
            "1".repeat(64)
        ));
        use SignedIdentity::*;
        let default = MatchRepoDigestOrExact;
        for (img, signed, identity, ok) in [
            (&by_tag, "registry.example/team/app:v1", &default, true),
            (&by_tag, "registry.example/team/app:v2", &default, false),
            (&by_tag, "registry.example/team/app", &default, false),
            (&by_digest, "registry.example/team/app:v9", &default, true),
            (
                &by_digest,
                "registry.example/team/other:v9",
                &default,
                false,
            ),
            (&by_tag, "registry.example/team/app", &MatchRepository, true),
            (&by_tag, "registry.example/team/app:v1", &MatchExact, true),
            (
                &by_digest,
                "registry.example/team/app:v1",
                &MatchExact,
                false,
            ),
            (
                &by_tag,
                "registry.example/base:1",
                &ExactReference {
                    docker_reference: "registry.example/base:1".into(),
                },
                true,
            ),
            (
                &by_tag,
                "registry.example/base:2",
                &ExactRepository {
                    docker_repository: "registry.example/base".into(),
                },
                true,
            ),
            (
                &by_tag,
                "registry.example/other:2",
                &ExactRepository {
                    docker_repository: "registry.example/base".into(),
                },
                false,
            ),
        ] {
            assert_eq!(
                identity_matches(img, signed, identity).is_ok(),
                ok,
                "{img:?} {signed} {identity:?}"
            );
        }
    }

    #[test]
    fn lookaside_scopes() {
        let l = Lookaside::parse(
            "default-docker:\n  lookaside: http://10.0.2.2:1/default\n\
             docker:\n  registry.example/team:\n    sigstore: https://sigs.example/team\n",
        )
        .unwrap();
        assert_eq!(
            l.url_for(&image("registry.example/team/app:1")),
            Some("https://sigs.example/team")
        );
        assert_eq!(
            l.url_for(&image("quay.io/x:1")),
            Some("http://10.0.2.2:1/default")
        );
        assert!(Lookaside::parse("default-docker:\n  lookaside: file:///var/lib/sigs\n").is_err());
    }
}
