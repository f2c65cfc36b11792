//! OCI image layer decryption, in the format ocicrypt writes (skopeo
//! `--encryption-key jwe:…`, containerd imgcrypt).
//!
//! An encrypted layer's descriptor carries:
//! - `org.opencontainers.image.enc.keys.jwe`: base64 of a JWE (JSON
//!   serialization; comma-separated when several were added) whose plaintext
//!   is the private options `{"symkey", "digest", "cipheroptions": {"nonce"}}`;
//! - `org.opencontainers.image.enc.pubopts`: base64 of
//!   `{"cipher": "AES_256_CTR_HMAC_SHA256", "hmac", "cipheroptions"}`.
//!
//! The blob is AES-256-CTR (16-byte nonce as the initial counter block,
//! big-endian increment) of the plain layer; HMAC-SHA256 keyed with the same
//! symmetric key covers the whole ciphertext.

use std::collections::BTreeMap;

use aes::cipher::{KeyIvInit, StreamCipher};
use base64::{engine::general_purpose::STANDARD, Engine as _};
use hmac::{Hmac, Mac};
use kabuto_jose::TeeKeyPair;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Annotation holding the wrapped private options (JWE).
pub const KEYS_JWE_ANNOTATION: &str = "org.opencontainers.image.enc.keys.jwe";
/// Annotation holding the public options (cipher, HMAC).
pub const PUBOPTS_ANNOTATION: &str = "org.opencontainers.image.enc.pubopts";
/// Media type suffix of encrypted layers.
pub const ENCRYPTED_SUFFIX: &str = "+encrypted";
/// The only cipher ocicrypt defines.
pub const CIPHER_AES_CTR_HMAC: &str = "AES_256_CTR_HMAC_SHA256";

type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;

#[derive(Debug, thiserror::Error)]
pub enum DecryptError {
    #[error("layer {digest}: media type {media_type} is not an encrypted layer")]
    NotEncrypted { digest: String, media_type: String },
    #[error("layer {digest}: annotation {annotation} is missing")]
    MissingAnnotation {
        digest: String,
        annotation: &'static str,
    },
    #[error("layer {digest}: {what} is malformed: {reason}")]
    Malformed {
        digest: String,
        what: &'static str,
        reason: String,
    },
    #[error("layer {digest}: cipher {cipher} is not supported (only {CIPHER_AES_CTR_HMAC})")]
    Cipher { digest: String, cipher: String },
    #[error("layer {digest}: none of the {keys} decryption key(s) opens its key ({reason})")]
    NoKey {
        digest: String,
        keys: usize,
        reason: KeyOpenError,
    },
    #[error("layer {digest}: the ciphertext's HMAC does not match: the layer was altered")]
    Hmac { digest: String },
    #[error("layer {digest}: the decrypted layer has digest {actual}, not {expected}")]
    Digest {
        digest: String,
        expected: String,
        actual: String,
    },
}

/// The part of an OCI descriptor decryption reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerDescriptor {
    pub media_type: String,
    pub digest: String,
    /// Bytes, as the manifest states (0 when it does not).
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl LayerDescriptor {
    pub fn is_encrypted(&self) -> bool {
        self.media_type.ends_with(ENCRYPTED_SUFFIX)
    }

    /// The media type of the layer once decrypted.
    pub fn decrypted_media_type(&self) -> &str {
        self.media_type
            .strip_suffix(ENCRYPTED_SUFFIX)
            .unwrap_or(&self.media_type)
    }
}

/// Why no key opened a layer's private options.
#[derive(Debug, thiserror::Error)]
pub enum KeyOpenError {
    #[error("no keys were provided")]
    NoKeys,
    #[error("the annotation holds no JWE")]
    NoJwe,
    #[error("the keys annotation is not base64: {0}")]
    NotBase64(base64::DecodeError),
    #[error("{0}")]
    Jwe(kabuto_jose::JoseError),
}

#[derive(Deserialize)]
struct PublicOptions {
    cipher: String,
    hmac: String,
}

#[derive(Deserialize)]
struct PrivateOptions {
    symkey: String,
    digest: String,
    #[serde(default)]
    cipheroptions: BTreeMap<String, String>,
}

/// Decrypts one encrypted layer blob with the first of `keys` that opens
/// it, in place (a layer is never held twice). The HMAC is checked before
/// decrypting, the plaintext digest after; nothing is returned unless both
/// hold.
pub fn decrypt_layer(
    descriptor: &LayerDescriptor,
    mut blob: Vec<u8>,
    keys: &[TeeKeyPair],
) -> Result<Vec<u8>, DecryptError> {
    let digest = descriptor.digest.clone();
    if !descriptor.is_encrypted() {
        return Err(DecryptError::NotEncrypted {
            digest,
            media_type: descriptor.media_type.clone(),
        });
    }
    let malformed = |what: &'static str, reason: String| DecryptError::Malformed {
        digest: digest.clone(),
        what,
        reason,
    };
    let (expected_hmac, private) = layer_options(descriptor, keys)?;
    let symkey = Zeroizing::new(
        STANDARD
            .decode(&private.symkey)
            .map_err(|e| malformed("symkey", e.to_string()))?,
    );
    let nonce = STANDARD
        .decode(
            private
                .cipheroptions
                .get("nonce")
                .map(String::as_str)
                .unwrap_or(""),
        )
        .map_err(|e| malformed("nonce", e.to_string()))?;
    if symkey.len() != 32 || nonce.len() != 16 {
        return Err(malformed(
            "private options",
            format!(
                "AES-256-CTR needs a 32-byte key and a 16-byte nonce, got {} and {}",
                symkey.len(),
                nonce.len()
            ),
        ));
    }

    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&symkey)
        .map_err(|e| malformed("symkey", e.to_string()))?;
    mac.update(&blob);
    let actual_hmac = mac.finalize().into_bytes();
    if !bool::from(actual_hmac.as_slice().ct_eq(&expected_hmac)) {
        return Err(DecryptError::Hmac { digest });
    }

    let mut cipher = Aes256Ctr::new_from_slices(&symkey, &nonce)
        .map_err(|e| malformed("private options", e.to_string()))?;
    cipher.apply_keystream(&mut blob);
    check_plaintext_digest(descriptor, blob, private.digest)
}

/// The public options' HMAC and the private options (opened with the
/// first of `keys` that can) of an encrypted layer.
fn layer_options(
    descriptor: &LayerDescriptor,
    keys: &[TeeKeyPair],
) -> Result<(Vec<u8>, PrivateOptions), DecryptError> {
    let digest = &descriptor.digest;
    let annotation = |name: &'static str| {
        descriptor
            .annotations
            .get(name)
            .ok_or(DecryptError::MissingAnnotation {
                digest: digest.clone(),
                annotation: name,
            })
    };
    let malformed = |what: &'static str, reason: String| DecryptError::Malformed {
        digest: digest.clone(),
        what,
        reason,
    };
    let pubopts = STANDARD
        .decode(annotation(PUBOPTS_ANNOTATION)?)
        .map_err(|e| malformed("pubopts", e.to_string()))?;
    let pubopts: PublicOptions =
        serde_json::from_slice(&pubopts).map_err(|e| malformed("pubopts", e.to_string()))?;
    if pubopts.cipher != CIPHER_AES_CTR_HMAC {
        return Err(DecryptError::Cipher {
            digest: digest.clone(),
            cipher: pubopts.cipher,
        });
    }
    let expected_hmac = STANDARD
        .decode(&pubopts.hmac)
        .map_err(|e| malformed("pubopts hmac", e.to_string()))?;

    let private =
        open_private_options(annotation(KEYS_JWE_ANNOTATION)?, keys).map_err(|reason| {
            DecryptError::NoKey {
                digest: digest.clone(),
                keys: keys.len(),
                reason,
            }
        })?;
    let private: PrivateOptions = serde_json::from_slice(&private)
        .map_err(|e| malformed("private options", crate::redact::json(&e)))?;
    Ok((expected_hmac, private))
}

/// The decrypted layer, if it has the digest its private options name.
fn check_plaintext_digest(
    descriptor: &LayerDescriptor,
    plaintext: Vec<u8>,
    expected: String,
) -> Result<Vec<u8>, DecryptError> {
    let digest = descriptor.digest.clone();
    let private_digest = expected;
    // The private digest names the layer as handed to the encrypter: the
    // decrypted blob itself, or — when the tool compressed the layer on the
    // fly before encrypting it, as skopeo does with uncompressed layers —
    // its uncompressed content.
    let actual = crate::sha256_digest(&plaintext);
    if actual == private_digest {
        return Ok(plaintext);
    }
    let uncompressed = match descriptor.decrypted_media_type() {
        m if m.ends_with("+gzip") => gunzip_digest(&plaintext),
        _ => None,
    };
    if uncompressed.as_deref() == Some(private_digest.as_str()) {
        return Ok(plaintext);
    }
    Err(DecryptError::Digest {
        digest,
        expected: private_digest,
        actual: match uncompressed {
            Some(u) => format!("{actual} (uncompressed {u})"),
            None => actual,
        },
    })
}

/// The digest of gzip data's uncompressed content, hashed as it streams.
fn gunzip_digest(data: &[u8]) -> Option<String> {
    // Sha256 is an io::Write: the content is hashed as it is decompressed.
    let mut hasher = Sha256::new();
    std::io::copy(&mut flate2::read::GzDecoder::new(data), &mut hasher).ok()?;
    Some(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// The private options from the keys annotation: each comma-separated JWE,
/// each key, until one opens.
fn open_private_options(
    annotation: &str,
    keys: &[TeeKeyPair],
) -> Result<Zeroizing<Vec<u8>>, KeyOpenError> {
    if keys.is_empty() {
        return Err(KeyOpenError::NoKeys);
    }
    let mut reason = KeyOpenError::NoJwe;
    for part in annotation.split(',').filter(|p| !p.is_empty()) {
        let jwe = STANDARD.decode(part).map_err(KeyOpenError::NotBase64)?;
        for key in keys {
            match key.decrypt_general_json(&jwe) {
                Ok(plaintext) => return Ok(plaintext),
                Err(e) => reason = KeyOpenError::Jwe(e),
            }
        }
    }
    Err(reason)
}
