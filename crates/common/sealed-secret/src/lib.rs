//! CoCo's sealed secrets (guest-components' confidential-data-hub,
//! `docs/SEALED_SECRET.md`): `sealed.` followed by a compact JWS whose
//! header is `{"alg":"ES256","kid":…}`, whose payload is a [`Secret`] and
//! whose signature is ES256 (raw r‖s, 64 bytes) over the ASCII
//! `b64url(header).b64url(payload)`; every part URL-safe base64 without
//! padding.
//!
//! A secret is `vault` (its `name` is a KBS resource holding the plaintext)
//! or `envelope` (`encrypted_data` is AES-256-GCM under a data key that
//! `encrypted_key` holds wrapped). CoCo's envelope providers are cloud KMSs;
//! kabuto's is `kbs`: the key-encryption key is the KBS resource `key_id`
//! (32 bytes) and wraps the data key with AES key wrap (RFC 3394). The
//! envelope's binary fields are standard base64, as CoCo writes them.
//!
//! Written here because no crate reads this format; the JWS is three
//! base64 parts and one ECDSA signature, on RustCrypto.

use std::collections::BTreeMap;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use kabuto_kbs_protocol::ResourceUri;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// What every sealed secret starts with.
pub const PREFIX: &str = "sealed.";
/// The payload version CoCo writes and reads.
pub const VERSION: &str = "0.1.0";
/// The one signature algorithm CoCo's CDH accepts.
pub const ALGORITHM: &str = "ES256";
/// The one envelope provider kabuto has.
pub const KBS_PROVIDER: &str = "kbs";
/// The one envelope data cipher kabuto has.
pub const WRAP_TYPE: &str = "A256GCM";
/// The longest sealed secret read (a Kubernetes Secret holds at most 1 MiB).
pub const MAX_LEN: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SealedSecretError {
    #[error("not a sealed secret (it must start with \"sealed.\")")]
    NotSealed,
    #[error("the sealed secret is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("the sealed secret must be sealed.<header>.<payload>.<signature>")]
    Shape,
    #[error("the sealed secret's {0} is not URL-safe base64 without padding")]
    Base64(&'static str),
    #[error("the sealed secret's header")]
    Header(#[source] serde_json::Error),
    #[error("the sealed secret is signed with {0:?}: only ES256 is accepted")]
    Algorithm(String),
    #[error("the sealed secret's header names no signing key (kid)")]
    NoKid,
    #[error("the sealed secret's signature is not 64 bytes (ES256, r||s)")]
    SignatureLength,
    #[error("the sealed secret's signature does not verify with key {kid:?}")]
    BadSignature { kid: String },
    #[error("the sealed secret's payload")]
    Payload(#[source] serde_json::Error),
    #[error("the sealed secret's version is {0:?}: only 0.1.0 is supported")]
    Version(String),
    #[error("the signing key")]
    Jwk(#[source] serde_json::Error),
    #[error("the signing key: {0}")]
    Key(String),
    #[error("provider {0:?} is not supported (only \"kbs\")")]
    Provider(String),
    #[error("wrap_type {0:?} is not supported (only A256GCM)")]
    WrapType(String),
    #[error("{what} {uri:?}")]
    Uri {
        what: &'static str,
        uri: String,
        #[source]
        source: kabuto_kbs_protocol::ResourceUriError,
    },
    #[error("the envelope's {0} is not standard base64")]
    EnvelopeBase64(&'static str),
    // No length: what the KBS holds stays out of errors.
    #[error("the envelope's key-encryption key must be 32 bytes (AES-256)")]
    KekLength,
    #[error("the envelope's data key does not unwrap with its key-encryption key")]
    Unwrap,
    #[error("the envelope's iv must be 12 bytes")]
    IvLength,
    #[error("the envelope's data does not decrypt (wrong key, or tampered)")]
    Decrypt,
    #[error("fetching {uri}")]
    Fetch {
        uri: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

type Result<T> = std::result::Result<T, SealedSecretError>;

/// A sealed secret's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    pub version: String,
    #[serde(flatten)]
    pub kind: SecretKind,
}

/// The two kinds of secret, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SecretKind {
    Vault {
        /// The KBS resource (`kbs:///repository/type/tag`) holding the plaintext.
        name: String,
        provider: String,
        #[serde(default)]
        provider_settings: BTreeMap<String, serde_json::Value>,
        #[serde(default)]
        annotations: BTreeMap<String, serde_json::Value>,
    },
    Envelope {
        provider: String,
        /// The KBS resource holding the key-encryption key.
        key_id: String,
        /// The data key, wrapped (standard base64).
        encrypted_key: String,
        /// The data, AES-256-GCM ciphertext with its tag (standard base64).
        encrypted_data: String,
        wrap_type: String,
        /// The GCM nonce (standard base64, 12 bytes).
        iv: String,
        #[serde(default)]
        provider_settings: BTreeMap<String, serde_json::Value>,
        #[serde(default)]
        annotations: BTreeMap<String, serde_json::Value>,
    },
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: String,
}

/// True for a value to be unsealed (env values, file contents).
pub fn is_sealed(value: &[u8]) -> bool {
    value.starts_with(PREFIX.as_bytes())
}

/// A sealed secret parsed, its signature not yet checked.
#[derive(Debug, Clone)]
pub struct SealedSecret {
    /// The signing key's id (a `kbs:///` resource holding its public JWK,
    /// or a name the pod's init-data gives a key).
    pub kid: String,
    secret: Secret,
    signing_input: String,
    signature: Signature,
}

impl SealedSecret {
    /// Parses `text` (surrounding whitespace, as a file's trailing newline,
    /// is ignored); refuses anything but ES256 and version 0.1.0.
    pub fn parse(text: &str) -> Result<SealedSecret> {
        if text.len() > MAX_LEN {
            return Err(SealedSecretError::TooLong);
        }
        let jws = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(SealedSecretError::NotSealed)?;
        let parts: Vec<&str> = jws.split('.').collect();
        let [header, payload, signature] = parts.as_slice() else {
            return Err(SealedSecretError::Shape);
        };
        let decode = |part: &str, what| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| SealedSecretError::Base64(what))
        };
        let header_json: Header = serde_json::from_slice(&decode(header, "header")?)
            .map_err(SealedSecretError::Header)?;
        if header_json.alg != ALGORITHM {
            return Err(SealedSecretError::Algorithm(header_json.alg));
        }
        if header_json.kid.is_empty() {
            return Err(SealedSecretError::NoKid);
        }
        let signature = Signature::from_slice(&decode(signature, "signature")?)
            .map_err(|_| SealedSecretError::SignatureLength)?;
        let secret: Secret = serde_json::from_slice(&decode(payload, "payload")?)
            .map_err(SealedSecretError::Payload)?;
        if secret.version != VERSION {
            return Err(SealedSecretError::Version(secret.version));
        }
        Ok(SealedSecret {
            kid: header_json.kid,
            secret,
            signing_input: format!("{header}.{payload}"),
            signature,
        })
    }

    /// The payload, once its signature verifies with `key`.
    pub fn verify(self, key: &PublicSigningKey) -> Result<Secret> {
        key.key
            .verify(self.signing_input.as_bytes(), &self.signature)
            .map_err(|_| SealedSecretError::BadSignature { kid: self.kid })?;
        Ok(self.secret)
    }
}

/// An EC P-256 JWK as CoCo's keys are written (`d` only in private keys).
#[derive(Serialize, Deserialize)]
struct EcJwk {
    kty: String,
    crv: String,
    x: String,
    y: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    d: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    alg: Option<String>,
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    key_use: Option<String>,
}

fn parse_jwk(json: &[u8]) -> Result<EcJwk> {
    let jwk: EcJwk = serde_json::from_slice(json).map_err(SealedSecretError::Jwk)?;
    if jwk.kty != "EC" || jwk.crv != "P-256" {
        return Err(SealedSecretError::Key(format!(
            "a {} {} key: only EC P-256 signs sealed secrets",
            jwk.kty, jwk.crv
        )));
    }
    Ok(jwk)
}

fn coordinate(value: &str, what: &str) -> Result<[u8; 32]> {
    URL_SAFE_NO_PAD
        .decode(value)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| SealedSecretError::Key(format!("{what} is not 32 bytes of base64url")))
}

/// The public key that verifies sealed secrets.
#[derive(Debug, Clone)]
pub struct PublicSigningKey {
    key: VerifyingKey,
}

impl PublicSigningKey {
    /// From a JWK (`{"kty":"EC","crv":"P-256","x":…,"y":…}`); a private
    /// JWK is accepted too, its `d` ignored (CoCo's tests provision one).
    pub fn from_jwk(json: &[u8]) -> Result<PublicSigningKey> {
        let jwk = parse_jwk(json)?;
        let x = coordinate(&jwk.x, "x")?;
        let y = coordinate(&jwk.y, "y")?;
        let point = p256::EncodedPoint::from_affine_coordinates(&x.into(), &y.into(), false);
        let key = VerifyingKey::from_encoded_point(&point)
            .map_err(|_| SealedSecretError::Key("x, y is not a point on P-256".into()))?;
        Ok(PublicSigningKey { key })
    }

    /// The public JWK.
    pub fn to_jwk(&self, kid: &str) -> String {
        let point = self.key.to_encoded_point(false);
        let (Some(x), Some(y)) = (point.x(), point.y()) else {
            unreachable!("an uncompressed P-256 point has both coordinates")
        };
        let jwk = EcJwk {
            kty: "EC".into(),
            crv: "P-256".into(),
            x: URL_SAFE_NO_PAD.encode(x),
            y: URL_SAFE_NO_PAD.encode(y),
            d: None,
            kid: Some(kid.into()),
            alg: Some(ALGORITHM.into()),
            key_use: Some("sig".into()),
        };
        serde_json::to_string(&jwk).unwrap_or_default()
    }
}

/// The owner's key that signs sealed secrets.
pub struct PrivateSigningKey {
    key: SigningKey,
}

impl PrivateSigningKey {
    pub fn generate() -> PrivateSigningKey {
        PrivateSigningKey {
            key: SigningKey::random(&mut OsRng),
        }
    }

    /// From a private JWK (with `d`).
    pub fn from_jwk(json: &[u8]) -> Result<PrivateSigningKey> {
        let jwk = parse_jwk(json)?;
        let d = jwk
            .d
            .as_deref()
            .ok_or_else(|| SealedSecretError::Key("a public JWK cannot sign (no d)".into()))?;
        let d = Zeroizing::new(coordinate(d, "d")?);
        let key = SigningKey::from_slice(d.as_slice())
            .map_err(|_| SealedSecretError::Key("d is not a P-256 scalar".into()))?;
        let private = PrivateSigningKey { key };
        let public = PublicSigningKey::from_jwk(json)?;
        if public.key != *private.key.verifying_key() {
            return Err(SealedSecretError::Key("x, y are not d's public key".into()));
        }
        Ok(private)
    }

    pub fn public(&self) -> PublicSigningKey {
        PublicSigningKey {
            key: *self.key.verifying_key(),
        }
    }

    /// The private JWK (`d` included: keep it secret).
    pub fn to_jwk(&self, kid: &str) -> Zeroizing<String> {
        let public = self.public().to_jwk(kid);
        let mut jwk: EcJwk = serde_json::from_str(&public)
            .unwrap_or_else(|e| unreachable!("a JWK this crate wrote: {e}"));
        jwk.d = Some(URL_SAFE_NO_PAD.encode(self.key.to_bytes()));
        Zeroizing::new(serde_json::to_string(&jwk).unwrap_or_default())
    }

    /// `secret` sealed: signed as key `kid`.
    pub fn seal(&self, secret: &Secret, kid: &str) -> String {
        let header = serde_json::to_vec(&Header {
            alg: ALGORITHM.into(),
            kid: kid.into(),
        })
        .unwrap_or_default();
        let payload = serde_json::to_vec(secret).unwrap_or_default();
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let signature: Signature = self.key.sign(signing_input.as_bytes());
        format!(
            "{PREFIX}{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.to_bytes())
        )
    }
}

fn resource(what: &'static str, uri: &str) -> Result<ResourceUri> {
    uri.parse().map_err(|source| SealedSecretError::Uri {
        what,
        uri: uri.into(),
        source,
    })
}

impl Secret {
    /// A vault secret: the plaintext is the KBS resource `uri`.
    pub fn vault(uri: &str) -> Result<Secret> {
        let uri = resource("resource", uri)?;
        Ok(Secret {
            version: VERSION.into(),
            kind: SecretKind::Vault {
                name: uri.to_string(),
                provider: KBS_PROVIDER.into(),
                provider_settings: BTreeMap::new(),
                annotations: BTreeMap::new(),
            },
        })
    }

    /// An envelope secret: `plaintext` under a new data key, which the
    /// key-encryption key `kek` (the KBS resource `kek_uri`) wraps.
    pub fn envelope(kek_uri: &str, kek: &[u8], plaintext: &[u8]) -> Result<Secret> {
        let kek_uri = resource("key-encryption key", kek_uri)?;
        let kek = aes_kw::KekAes256::new(
            <&[u8; 32]>::try_from(kek)
                .map_err(|_| SealedSecretError::KekLength)?
                .into(),
        );
        let mut data_key = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(data_key.as_mut_slice());
        let mut iv = [0u8; 12];
        OsRng.fill_bytes(&mut iv);
        let wrapped = kek
            .wrap_vec(data_key.as_slice())
            .map_err(|_| SealedSecretError::Unwrap)?;
        let cipher = Aes256Gcm::new(data_key.as_slice().into());
        let encrypted = cipher
            .encrypt(Nonce::from_slice(&iv), plaintext)
            .map_err(|_| SealedSecretError::Decrypt)?;
        Ok(Secret {
            version: VERSION.into(),
            kind: SecretKind::Envelope {
                provider: KBS_PROVIDER.into(),
                key_id: kek_uri.to_string(),
                encrypted_key: STANDARD.encode(wrapped),
                encrypted_data: STANDARD.encode(encrypted),
                wrap_type: WRAP_TYPE.into(),
                iv: STANDARD.encode(iv),
                provider_settings: BTreeMap::new(),
                annotations: BTreeMap::new(),
            },
        })
    }

    /// The KBS resources unsealing needs, in order: the plaintext (vault)
    /// or the key-encryption key (envelope).
    pub fn resource(&self) -> Result<ResourceUri> {
        match &self.kind {
            SecretKind::Vault { name, provider, .. } => {
                check_provider(provider)?;
                resource("resource", name)
            }
            SecretKind::Envelope {
                key_id, provider, ..
            } => {
                check_provider(provider)?;
                resource("key-encryption key", key_id)
            }
        }
    }

    /// The plaintext, given the KBS resource [`Secret::resource`] names
    /// (`fetch` gets it from the KBS).
    pub fn unseal<E>(
        &self,
        fetch: impl FnOnce(&ResourceUri) -> std::result::Result<Zeroizing<Vec<u8>>, E>,
    ) -> Result<Zeroizing<Vec<u8>>>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let uri = self.resource()?;
        let fetched = fetch(&uri).map_err(|e| SealedSecretError::Fetch {
            uri: uri.to_string(),
            source: Box::new(e),
        })?;
        match &self.kind {
            SecretKind::Vault { .. } => Ok(fetched),
            SecretKind::Envelope {
                encrypted_key,
                encrypted_data,
                wrap_type,
                iv,
                ..
            } => open_envelope(&fetched, encrypted_key, encrypted_data, wrap_type, iv),
        }
    }
}

fn check_provider(provider: &str) -> Result<()> {
    if provider == KBS_PROVIDER {
        Ok(())
    } else {
        Err(SealedSecretError::Provider(provider.into()))
    }
}

fn open_envelope(
    kek: &[u8],
    encrypted_key: &str,
    encrypted_data: &str,
    wrap_type: &str,
    iv: &str,
) -> Result<Zeroizing<Vec<u8>>> {
    if wrap_type != WRAP_TYPE {
        return Err(SealedSecretError::WrapType(wrap_type.into()));
    }
    let decode = |value: &str, what| {
        STANDARD
            .decode(value)
            .map_err(|_| SealedSecretError::EnvelopeBase64(what))
    };
    let kek = aes_kw::KekAes256::new(
        <&[u8; 32]>::try_from(kek)
            .map_err(|_| SealedSecretError::KekLength)?
            .into(),
    );
    let data_key = Zeroizing::new(
        kek.unwrap_vec(&decode(encrypted_key, "encrypted_key")?)
            .map_err(|_| SealedSecretError::Unwrap)?,
    );
    let data_key =
        <&[u8; 32]>::try_from(data_key.as_slice()).map_err(|_| SealedSecretError::Unwrap)?;
    let iv = decode(iv, "iv")?;
    if iv.len() != 12 {
        return Err(SealedSecretError::IvLength);
    }
    Aes256Gcm::new(data_key.into())
        .decrypt(
            Nonce::from_slice(&iv),
            decode(encrypted_data, "encrypted_data")?.as_slice(),
        )
        .map(Zeroizing::new)
        .map_err(|_| SealedSecretError::Decrypt)
}

#[cfg(test)]
mod tests;
