//! JOSE for the KBS protocol and OCI image encryption: public JWKs, JWE
//! (flattened and general JSON serialization), canonical JSON.
//!
//! Hand-written on RustCrypto primitives because no maintained pure-Rust JWE
//! crate supports ECDH-ES+A256KW and RSA-OAEP(-256) in the flattened form that
//! `kbs_types::Response` carries and the multi-recipient general form that
//! ocicrypt (`org.opencontainers.image.enc.keys.jwe`) writes.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use elliptic_curve::generic_array::typenum::Unsigned;
use elliptic_curve::generic_array::GenericArray;
use elliptic_curve::sec1::{EncodedPoint, FromEncodedPoint, ModulusSize, ToEncodedPoint};
use elliptic_curve::{AffinePoint, CurveArithmetic, FieldBytesSize, PublicKey, SecretKey};
pub use kbs_types::{ProtectedHeader, Response, TeePubKey};
use rand_core::{OsRng, RngCore};
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, Oaep, RsaPrivateKey, RsaPublicKey};
use serde::Serialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

mod ecdh;
mod key;

pub use ecdh::ec_public_key;
use ecdh::*;
pub use key::TeeKeyPair;

/// Key management algorithm for EC (P-256, P-521) recipient keys.
pub const ALG_ECDH_ES_A256KW: &str = "ECDH-ES+A256KW";
/// Key management algorithm for RSA recipient keys.
pub const ALG_RSA_OAEP_256: &str = "RSA-OAEP-256";
/// RSA-OAEP with SHA-1, what ocicrypt (go-jose `RSA_OAEP`) writes for RSA keys.
pub const ALG_RSA_OAEP: &str = "RSA-OAEP";
/// RSAES-PKCS1-v1_5: what CoCo's KBS client may ask for with an RSA key.
/// Only ever produced (a KBS answering such a client), never accepted: a
/// decryptor that tells padding errors apart is Bleichenbacher's oracle.
pub const ALG_RSA1_5: &str = "RSA1_5";
/// The only content encryption we produce or accept.
pub const ENC_A256GCM: &str = "A256GCM";

/// RSA keys smaller than this are refused on both sides.
const MIN_RSA_BITS: usize = 2048;
/// JWK `crv` names (RFC 7518 §6.2.1.1) of the curves we speak.
const CRV_P256: &str = "P-256";
const CRV_P521: &str = "P-521";
const GCM_IV_LEN: usize = 12;
const GCM_TAG_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum JoseError {
    #[error("unsupported key: {0}")]
    UnsupportedKey(String),
    #[error("invalid key: {0}")]
    InvalidKey(String),
    #[error("unsupported JWE algorithm {field}={value}")]
    UnsupportedAlgorithm { field: &'static str, value: String },
    #[error("malformed JWE: {0}")]
    Malformed(String),
    #[error("JWE decryption failed: the key unwrap or the authentication tag did not verify")]
    Decrypt,
    #[error("encryption failed: {0}")]
    Encrypt(String),
    #[error("canonical JSON: {0}")]
    Canonical(String),
}

pub type Result<T> = std::result::Result<T, JoseError>;

/// RFC 8785 (JCS) canonical JSON of `value`.
pub fn canonical_json<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    serde_jcs::to_vec(value).map_err(|e| JoseError::Canonical(e.to_string()))
}

/// A256GCM content decryption.
fn decrypt_a256gcm(
    cek: &[u8],
    iv: &[u8],
    ciphertext: &[u8],
    tag: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    if iv.len() != GCM_IV_LEN || tag.len() != GCM_TAG_LEN {
        return Err(JoseError::Malformed(format!(
            "A256GCM needs a {GCM_IV_LEN}-byte iv and a {GCM_TAG_LEN}-byte tag, got {} and {}",
            iv.len(),
            tag.len()
        )));
    }
    let cipher = Aes256Gcm::new_from_slice(cek).map_err(|_| JoseError::Decrypt)?;
    let mut plaintext = Zeroizing::new(ciphertext.to_vec());
    cipher
        .decrypt_in_place_detached(
            Nonce::from_slice(iv),
            aad,
            &mut plaintext,
            aes_gcm::Tag::from_slice(tag),
        )
        .map_err(|_| JoseError::Decrypt)?;
    Ok(plaintext)
}

/// Encrypts `plaintext` to `recipient` (A256GCM content; ECDH-ES+A256KW for
/// EC keys on P-256 or P-521; for RSA keys the wrapping their `alg` names).
pub fn encrypt(recipient: &TeePubKey, plaintext: &[u8]) -> Result<Response> {
    let mut cek = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(cek.as_mut());
    let (protected, encrypted_key) = match recipient {
        TeePubKey::EC { crv, x, y, .. } => wrap_for_ec(crv, x, y, cek.as_ref())?,
        TeePubKey::RSA {
            alg, k_mod, k_exp, ..
        } => wrap_for_rsa(alg, k_mod, k_exp, cek.as_ref())?,
        TeePubKey::AKP { alg, .. } => {
            return Err(JoseError::UnsupportedKey(format!(
                "AKP (post-quantum) key with alg {alg}"
            )))
        }
    };
    let aad = protected
        .generate_aad()
        .map_err(|e| JoseError::Encrypt(format!("protected header: {e:?}")))?;
    let mut iv = [0u8; GCM_IV_LEN];
    OsRng.fill_bytes(&mut iv);
    let cipher =
        Aes256Gcm::new_from_slice(cek.as_ref()).map_err(|e| JoseError::Encrypt(e.to_string()))?;
    let mut ciphertext = plaintext.to_vec();
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(&iv), &aad, &mut ciphertext)
        .map_err(|e| JoseError::Encrypt(e.to_string()))?;
    Ok(Response {
        protected,
        encrypted_key,
        aad: None,
        iv: iv.to_vec(),
        ciphertext,
        tag: tag.to_vec(),
    })
}

/// ECDH-ES+A256KW to an EC key: the header (with `epk`) and the wrapped
/// content key.
fn wrap_for_ec(crv: &str, x: &str, y: &str, cek: &[u8]) -> Result<(ProtectedHeader, Vec<u8>)> {
    let (epk, wrapped) = match crv {
        CRV_P256 => ecdh_es_wrap(&ec_point::<p256::NistP256>(crv, x, y)?, crv, cek)?,
        CRV_P521 => ecdh_es_wrap(&ec_point::<p521::NistP521>(crv, x, y)?, crv, cek)?,
        other => {
            return Err(JoseError::UnsupportedKey(format!(
                "EC curve {other} (only {CRV_P256} and {CRV_P521})"
            )))
        }
    };
    let mut other_fields = serde_json::Map::new();
    let epk = serde_json::to_value(epk).map_err(|e| JoseError::Encrypt(e.to_string()))?;
    other_fields.insert("epk".into(), with_sorted_keys(epk));
    Ok((
        ProtectedHeader {
            alg: ALG_ECDH_ES_A256KW.into(),
            enc: ENC_A256GCM.into(),
            other_fields,
        },
        wrapped,
    ))
}

/// The content key wrapped to an RSA key with the algorithm the key names
/// (RFC 7517 §4.4: a client decrypts with the one it asked for).
fn wrap_for_rsa(
    alg: &str,
    k_mod: &str,
    k_exp: &str,
    cek: &[u8],
) -> Result<(ProtectedHeader, Vec<u8>)> {
    let n = decode_b64url("n", k_mod)?;
    let e = decode_b64url("e", k_exp)?;
    let key = RsaPublicKey::new(BigUint::from_bytes_be(&n), BigUint::from_bytes_be(&e))
        .map_err(|e| JoseError::InvalidKey(format!("RSA: {e}")))?;
    if key.size() * 8 < MIN_RSA_BITS {
        return Err(JoseError::UnsupportedKey(format!(
            "RSA key of {} bits; at least {MIN_RSA_BITS} required",
            key.size() * 8
        )));
    }
    let alg = match alg {
        "" | ALG_RSA_OAEP_256 => ALG_RSA_OAEP_256,
        ALG_RSA_OAEP => ALG_RSA_OAEP,
        ALG_RSA1_5 => ALG_RSA1_5,
        other => {
            return Err(JoseError::UnsupportedAlgorithm {
                field: "alg",
                value: format!("{other} for an RSA key"),
            })
        }
    };
    let wrapped = match alg {
        ALG_RSA_OAEP => key.encrypt(&mut OsRng, Oaep::new::<sha1::Sha1>(), cek),
        ALG_RSA1_5 => key.encrypt(&mut OsRng, rsa::Pkcs1v15Encrypt, cek),
        _ => key.encrypt(&mut OsRng, Oaep::new::<Sha256>(), cek),
    }
    .map_err(|e| JoseError::Encrypt(format!("{alg}: {e}")))?;
    Ok((
        ProtectedHeader {
            alg: alg.into(),
            enc: ENC_A256GCM.into(),
            other_fields: serde_json::Map::new(),
        },
        wrapped,
    ))
}

/// `value` with every object's keys inserted in sorted order. CoCo's KBS
/// client does not authenticate the protected header as received: it
/// re-serializes kbs-types' `ProtectedHeader`, whose maps come out sorted
/// when its serde_json lacks `preserve_order` and in wire order when it has
/// it. A header sorted at every level is the same bytes either way, whatever
/// our own build unifies (dcap-qvl turns `preserve_order` on here, and
/// `TeePubKey` serializes `kty, crv, alg, x, y`).
fn with_sorted_keys(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<(String, serde_json::Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, with_sorted_keys(v)))
                    .collect(),
            )
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(with_sorted_keys).collect())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests;
