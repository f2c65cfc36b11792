//! GPG ("simple signing", skopeo `--sign-by`) signatures: OpenPGP messages
//! holding a simple-signing payload, read from a lookaside store, by keys
//! that must be neither revoked nor expired.

use pgp::composed::{SignedPublicKey, SignedPublicSubKey};

use super::identity::{Expected, PayloadError};
use super::{Lookaside, PolicyError, Refusals};
use crate::registry::RegistryClient;
use crate::RegistryError;

/// Most signatures read per image from a lookaside store.
const MAX_LOOKASIDE_SIGNATURES: usize = 16;

/// No GPG signature satisfied a `signedBy` requirement.
#[derive(Debug, thiserror::Error)]
pub enum GpgError {
    #[error(
        "no lookaside store is configured for {image} (signedBy signatures are read from one: \
         sigstore_config_uri)"
    )]
    NoLookaside { image: String },
    #[error("the manifest digest is not sha256")]
    NotSha256,
    #[error("reading the lookaside store")]
    Fetch(#[source] RegistryError),
    #[error("{0}")]
    NoneValid(Refusals<GpgRefusal>),
}

#[derive(Debug, thiserror::Error)]
pub enum GpgRefusal {
    #[error("no signatures at {0}")]
    NoSignatures(String),
    #[error("signature-{n}")]
    Signature {
        n: usize,
        #[source]
        reason: GpgSignatureError,
    },
}

/// Why one lookaside signature does not count.
#[derive(Debug, thiserror::Error)]
pub enum GpgSignatureError {
    #[error("not an OpenPGP message")]
    NotMessage(#[source] pgp::errors::Error),
    #[error("decompressing the OpenPGP message")]
    Decompress(#[source] pgp::errors::Error),
    #[error("reading the OpenPGP message")]
    Read(#[source] std::io::Error),
    #[error("not signed by a key of the policy")]
    NotSignedByPolicyKey,
    #[error("{0}")]
    KeyNotValid(Refusals<KeyValidityError>),
    #[error(transparent)]
    Payload(#[from] PayloadError),
}

/// What gpgme (and so containers/image) refuses in a key or signature.
#[derive(Debug, thiserror::Error)]
pub enum KeyValidityError {
    #[error("key {0} is revoked")]
    Revoked(String),
    #[error("key {0} has no valid self-signature")]
    NoSelfSignature(String),
    #[error("subkey {subkey} of key {key} is revoked")]
    SubkeyRevoked { subkey: String, key: String },
    #[error("subkey {subkey} of key {key} has no valid binding")]
    NoBinding { subkey: String, key: String },
    #[error("{what} expired at {expiry} (Unix time; {ago} s ago)")]
    Expired { what: String, expiry: u64, ago: u64 },
}

/// OpenPGP public keys, armored or binary (`gpg --export [--armor]`).
pub(super) fn public_keys(ring: &[u8]) -> Result<Vec<SignedPublicKey>, PolicyError> {
    use pgp::composed::Deserializable as _;
    let armored = ring.trim_ascii_start().starts_with(b"-----BEGIN PGP");
    let keys: Vec<SignedPublicKey> = if armored {
        let (keys, _) = SignedPublicKey::from_armor_many(ring).map_err(PolicyError::GpgKey)?;
        keys.collect::<Result<_, _>>()
    } else {
        SignedPublicKey::from_bytes_many(ring)
            .map_err(PolicyError::GpgKey)?
            .collect::<Result<_, _>>()
    }
    .map_err(PolicyError::GpgKey)?;
    if keys.is_empty() {
        return Err(PolicyError::NoGpgKey);
    }
    Ok(keys)
}

/// Some `signature-<n>` in the lookaside store is an OpenPGP message
/// signed by one of `keys` whose payload names the manifest and an
/// identity the policy accepts, by a key that is neither revoked nor
/// expired (see [`signature_valid_at`]).
pub(super) fn verify(
    expected: &Expected<'_>,
    keys: &[SignedPublicKey],
    lookaside: &Lookaside,
    client: &mut RegistryClient,
) -> Result<(), GpgError> {
    let image = expected.image;
    let base = lookaside
        .url_for(image)
        .ok_or_else(|| GpgError::NoLookaside {
            image: format!("{}/{}", image.registry, image.repository),
        })?;
    let hex = expected
        .manifest_digest
        .strip_prefix("sha256:")
        .ok_or(GpgError::NotSha256)?;
    let mut refusals = Vec::new();
    for n in 1..=MAX_LOOKASIDE_SIGNATURES {
        let url = format!(
            "{}/{}@sha256={hex}/signature-{n}",
            base.trim_end_matches('/'),
            image.repository
        );
        let Some(bytes) = client.get_url(&url, 1 << 20).map_err(GpgError::Fetch)? else {
            if n == 1 {
                refusals.push(GpgRefusal::NoSignatures(url));
            }
            break;
        };
        match check_signature(&bytes, keys, expected) {
            Ok(()) => return Ok(()),
            Err(reason) => refusals.push(GpgRefusal::Signature { n, reason }),
        }
    }
    Err(GpgError::NoneValid(Refusals(refusals)))
}

fn check_signature(
    bytes: &[u8],
    keys: &[SignedPublicKey],
    expected: &Expected<'_>,
) -> Result<(), GpgSignatureError> {
    use pgp::composed::Message;
    let message = Message::from_bytes(bytes).map_err(GpgSignatureError::NotMessage)?;
    let mut message = message
        .decompress()
        .map_err(GpgSignatureError::Decompress)?;
    let payload = message.as_data_vec().map_err(GpgSignatureError::Read)?;
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
            match signature_valid_at(key, subkey, sig, now) {
                Ok(()) => return Ok(expected.check(&payload)?),
                Err(reason) => refusals.push(reason),
            }
        }
    }
    if refusals.is_empty() {
        return Err(GpgSignatureError::NotSignedByPolicyKey);
    }
    Err(GpgSignatureError::KeyNotValid(Refusals(refusals)))
}

/// What gpgme (and so containers/image) also refuses: a signature by a
/// revoked or expired key or subkey, or an expired signature. `now` is the
/// guest's clock, which the host sets: a host could roll it back, so
/// expiry limits an old key's use only as far as the guest's time is
/// right (revocation does not depend on it).
fn signature_valid_at(
    key: &SignedPublicKey,
    subkey: Option<&SignedPublicSubKey>,
    sig: &pgp::packet::Signature,
    now: std::time::SystemTime,
) -> Result<(), KeyValidityError> {
    use pgp::types::KeyDetails as _;
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
        return Err(KeyValidityError::Revoked(id));
    }
    let self_signatures = self_signatures(key);
    if self_signatures.is_empty() {
        return Err(KeyValidityError::NoSelfSignature(id));
    }
    not_expired(
        primary.created_at().as_secs(),
        newest_validity(self_signatures),
        now,
        &format!("key {id}"),
    )?;
    if let Some(sub) = subkey {
        subkey_valid_at(key, sub, &id, now)?;
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

/// The key's own certifications of its user ids and its direct signatures.
fn self_signatures(key: &SignedPublicKey) -> Vec<&pgp::packet::Signature> {
    use pgp::types::Tag;
    let primary = &key.primary_key;
    key.details
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
        .collect()
}

/// The key expiration time of the newest of `signatures`.
fn newest_validity(signatures: Vec<&pgp::packet::Signature>) -> Option<pgp::types::Duration> {
    signatures
        .into_iter()
        .max_by_key(|s| s.created().map_or(0, |t| t.as_secs()))
        .and_then(|s| s.key_expiration_time())
}

fn subkey_valid_at(
    key: &SignedPublicKey,
    sub: &SignedPublicSubKey,
    id: &str,
    now: std::time::SystemTime,
) -> Result<(), KeyValidityError> {
    use pgp::packet::{Signature, SignatureType};
    use pgp::types::KeyDetails as _;
    let primary = &key.primary_key;
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
        return Err(KeyValidityError::SubkeyRevoked {
            subkey: sub_id,
            key: id.to_string(),
        });
    }
    let bindings: Vec<&Signature> = own
        .into_iter()
        .filter(|s| s.typ() == Some(SignatureType::SubkeyBinding))
        .collect();
    if bindings.is_empty() {
        return Err(KeyValidityError::NoBinding {
            subkey: sub_id,
            key: id.to_string(),
        });
    }
    not_expired(
        sub.key.created_at().as_secs(),
        newest_validity(bindings),
        now,
        &format!("subkey {sub_id} of key {id}"),
    )
}

/// `what`, made at `created` (Unix seconds) and valid for `validity`
/// (none or zero: forever), has not expired at `now`.
pub(super) fn not_expired(
    created: u32,
    validity: Option<pgp::types::Duration>,
    now: std::time::SystemTime,
    what: &str,
) -> Result<(), KeyValidityError> {
    let Some(secs) = validity.map(|v| v.as_secs()).filter(|&s| s > 0) else {
        return Ok(());
    };
    let expiry = u64::from(created) + u64::from(secs);
    let now = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if now >= expiry {
        return Err(KeyValidityError::Expired {
            what: what.to_string(),
            expiry,
            ago: now - expiry,
        });
    }
    Ok(())
}
