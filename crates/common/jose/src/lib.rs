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

/// An ephemeral key pair a guest generates per attestation; the public half
/// travels as `tee-pubkey`, the private half never leaves the guest.
pub enum TeeKeyPair {
    /// P-256: what our attestation agent and CoCo's client use by default.
    Ec(p256::SecretKey),
    /// P-521, which CoCo's client may send instead.
    EcP521(p521::SecretKey),
    Rsa(Box<RsaPrivateKey>),
}

/// Never prints the private key.
impl std::fmt::Debug for TeeKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TeeKeyPair::Ec(_) => f.write_str("TeeKeyPair::Ec(<private>)"),
            TeeKeyPair::EcP521(_) => f.write_str("TeeKeyPair::EcP521(<private>)"),
            TeeKeyPair::Rsa(_) => f.write_str("TeeKeyPair::Rsa(<private>)"),
        }
    }
}

impl TeeKeyPair {
    /// A fresh P-256 key (fast to generate; the default).
    pub fn generate_ec() -> Self {
        TeeKeyPair::Ec(p256::SecretKey::random(&mut OsRng))
    }

    /// A fresh P-521 key.
    pub fn generate_ec_p521() -> Self {
        TeeKeyPair::EcP521(p521::SecretKey::random(&mut OsRng))
    }

    /// A fresh RSA key of `bits` (>= 2048) for KBSs that only speak RSA.
    pub fn generate_rsa(bits: usize) -> Result<Self> {
        if bits < MIN_RSA_BITS {
            return Err(JoseError::UnsupportedKey(format!(
                "RSA keys need at least {MIN_RSA_BITS} bits, asked for {bits}"
            )));
        }
        RsaPrivateKey::new(&mut OsRng, bits)
            .map(|k| TeeKeyPair::Rsa(Box::new(k)))
            .map_err(|e| JoseError::InvalidKey(e.to_string()))
    }

    /// A private key from PEM: RSA (PKCS#1 or PKCS#8), P-256 or P-521 (SEC1
    /// or PKCS#8), as `openssl genrsa` / `openssl ecparam -genkey` write them —
    /// the image-decryption keys an owner stores in the KBS.
    pub fn from_pem(pem: &str) -> Result<Self> {
        use p256::pkcs8::DecodePrivateKey as _;
        use rsa::pkcs1::DecodeRsaPrivateKey as _;
        if let Ok(key) = RsaPrivateKey::from_pkcs1_pem(pem) {
            return TeeKeyPair::checked_rsa(key);
        }
        if let Ok(key) = RsaPrivateKey::from_pkcs8_pem(pem) {
            return TeeKeyPair::checked_rsa(key);
        }
        if let Ok(key) = p256::SecretKey::from_sec1_pem(pem) {
            return Ok(TeeKeyPair::Ec(key));
        }
        if let Ok(key) = p256::SecretKey::from_pkcs8_pem(pem) {
            return Ok(TeeKeyPair::Ec(key));
        }
        if let Ok(key) = p521::SecretKey::from_sec1_pem(pem) {
            return Ok(TeeKeyPair::EcP521(key));
        }
        if let Ok(key) = p521::SecretKey::from_pkcs8_pem(pem) {
            return Ok(TeeKeyPair::EcP521(key));
        }
        Err(JoseError::UnsupportedKey(
            "not a PEM RSA, P-256 or P-521 private key (PKCS#1, SEC1 or PKCS#8)".into(),
        ))
    }

    fn checked_rsa(key: RsaPrivateKey) -> Result<Self> {
        let bits = key.n().bits();
        if bits < MIN_RSA_BITS {
            return Err(JoseError::UnsupportedKey(format!(
                "RSA keys need at least {MIN_RSA_BITS} bits, this one has {bits}"
            )));
        }
        Ok(TeeKeyPair::Rsa(Box::new(key)))
    }

    /// Decrypts a JWE in JSON serialization, general (several recipients,
    /// each with its own `header`) or flattened, as ocicrypt writes it:
    /// tries each recipient whose algorithm fits this key. The
    /// authenticated data is the `protected` member as sent (plus `aad`).
    pub fn decrypt_general_json(&self, body: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let raw: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| JoseError::Malformed(format!("JWE JSON: {e}")))?;
        let member = |name: &str| raw.get(name).and_then(|v| v.as_str());
        let protected_b64 = member("protected").unwrap_or("");
        let protected: serde_json::Map<String, serde_json::Value> = if protected_b64.is_empty() {
            serde_json::Map::new()
        } else {
            serde_json::from_slice(&decode_b64url_field("protected", protected_b64)?)
                .map_err(|e| JoseError::Malformed(format!("protected header: {e}")))?
        };
        let unprotected = raw
            .get("unprotected")
            .and_then(|v| v.as_object())
            .cloned()
            .unwrap_or_default();
        let recipients: Vec<serde_json::Value> = match raw.get("recipients") {
            Some(r) => r
                .as_array()
                .cloned()
                .ok_or_else(|| JoseError::Malformed("recipients is not an array".into()))?,
            None => vec![serde_json::json!({
                "header": raw.get("header").cloned().unwrap_or(serde_json::json!({})),
                "encrypted_key": raw.get("encrypted_key").cloned().unwrap_or_default(),
            })],
        };
        let field = |name: &'static str| -> Result<Vec<u8>> {
            decode_b64url_field(name, member(name).unwrap_or(""))
        };
        let iv = field("iv")?;
        let ciphertext = field("ciphertext")?;
        let tag = field("tag")?;
        let mut aad = protected_b64.as_bytes().to_vec();
        if let Some(extra) = member("aad") {
            aad.push(b'.');
            aad.extend_from_slice(extra.as_bytes());
        }
        let mut last_error = JoseError::Malformed("no recipients".into());
        for recipient in &recipients {
            // Header = protected ∪ unprotected ∪ per-recipient (RFC 7516 §7.2.1).
            let mut header = protected.clone();
            header.extend(unprotected.clone());
            if let Some(h) = recipient.get("header").and_then(|h| h.as_object()) {
                header.extend(h.clone());
            }
            let text = |name: &str| header.get(name).and_then(|v| v.as_str()).unwrap_or("");
            if text("enc") != ENC_A256GCM {
                return Err(JoseError::UnsupportedAlgorithm {
                    field: "enc",
                    value: text("enc").into(),
                });
            }
            let encrypted_key = decode_b64url_field(
                "encrypted_key",
                recipient
                    .get("encrypted_key")
                    .and_then(|k| k.as_str())
                    .unwrap_or(""),
            )?;
            let cek = match self.unwrap_cek(text("alg"), header.get("epk"), &encrypted_key) {
                Ok(cek) => cek,
                Err(e) => {
                    last_error = e;
                    continue;
                }
            };
            return decrypt_a256gcm(&cek, &iv, &ciphertext, &tag, &aad);
        }
        Err(last_error)
    }

    /// The content-encryption key from one recipient's `encrypted_key`.
    fn unwrap_cek(
        &self,
        alg: &str,
        epk: Option<&serde_json::Value>,
        encrypted_key: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let cek = match (self, alg) {
            (TeeKeyPair::Ec(secret), ALG_ECDH_ES_A256KW) => {
                ecdh_es_unwrap(secret, CRV_P256, epk, encrypted_key)?
            }
            (TeeKeyPair::EcP521(secret), ALG_ECDH_ES_A256KW) => {
                ecdh_es_unwrap(secret, CRV_P521, epk, encrypted_key)?
            }
            (TeeKeyPair::Rsa(key), ALG_RSA_OAEP_256) => Zeroizing::new(
                key.decrypt(Oaep::new::<Sha256>(), encrypted_key)
                    .map_err(|_| JoseError::Decrypt)?,
            ),
            (TeeKeyPair::Rsa(key), ALG_RSA_OAEP) => Zeroizing::new(
                key.decrypt(Oaep::new::<sha1::Sha1>(), encrypted_key)
                    .map_err(|_| JoseError::Decrypt)?,
            ),
            (_, other) => {
                return Err(JoseError::UnsupportedAlgorithm {
                    field: "alg",
                    value: format!("{other} for this key type"),
                })
            }
        };
        if cek.len() != 32 {
            return Err(JoseError::Decrypt);
        }
        Ok(cek)
    }

    /// The public JWK, as the `tee-pubkey` of the KBS protocol.
    pub fn public_jwk(&self) -> TeePubKey {
        match self {
            TeeKeyPair::Ec(secret) => ec_jwk(&secret.public_key(), CRV_P256),
            TeeKeyPair::EcP521(secret) => ec_jwk(&secret.public_key(), CRV_P521),
            TeeKeyPair::Rsa(key) => TeePubKey::RSA {
                alg: ALG_RSA_OAEP_256.to_string(),
                k_mod: B64URL.encode(key.n().to_bytes_be()),
                k_exp: B64URL.encode(key.e().to_bytes_be()),
            },
        }
    }

    /// Decrypts a JWE as received on the wire (flattened JSON). The
    /// authenticated data is the `protected` member exactly as sent (RFC
    /// 7516 §5.2), not a re-serialization of it: JSON object order is not
    /// stable across builds or implementations.
    pub fn decrypt_json(&self, body: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let raw: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| JoseError::Malformed(format!("JWE JSON: {e}")))?;
        let protected = raw
            .get("protected")
            .and_then(|p| p.as_str())
            .ok_or_else(|| JoseError::Malformed("no protected header".into()))?
            .to_string();
        let jwe: Response =
            serde_json::from_value(raw).map_err(|e| JoseError::Malformed(format!("JWE: {e}")))?;
        self.decrypt_with_aad(&jwe, protected.as_bytes())
    }

    /// Decrypts a JWE addressed to this key, re-serializing the protected
    /// header for the authenticated data (right when `jwe` was made by
    /// [`encrypt`] in this process; use [`TeeKeyPair::decrypt_json`] for
    /// bytes from the network).
    pub fn decrypt(&self, jwe: &Response) -> Result<Zeroizing<Vec<u8>>> {
        let aad = jwe
            .protected
            .generate_aad()
            .map_err(|e| JoseError::Malformed(format!("protected header: {e:?}")))?;
        self.decrypt_with_aad(jwe, &aad)
    }

    fn decrypt_with_aad(&self, jwe: &Response, aad: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        if jwe.protected.enc != ENC_A256GCM {
            return Err(JoseError::UnsupportedAlgorithm {
                field: "enc",
                value: jwe.protected.enc.clone(),
            });
        }
        let cek = self.unwrap_cek(
            &jwe.protected.alg,
            jwe.protected.other_fields.get("epk"),
            &jwe.encrypted_key,
        )?;
        decrypt_a256gcm(&cek, &jwe.iv, &jwe.ciphertext, &jwe.tag, aad)
    }
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
        TeePubKey::EC { crv, x, y, .. } => {
            let (epk, wrapped) = match crv.as_str() {
                CRV_P256 => {
                    ecdh_es_wrap(&ec_point::<p256::NistP256>(crv, x, y)?, crv, cek.as_ref())?
                }
                CRV_P521 => {
                    ecdh_es_wrap(&ec_point::<p521::NistP521>(crv, x, y)?, crv, cek.as_ref())?
                }
                other => {
                    return Err(JoseError::UnsupportedKey(format!(
                        "EC curve {other} (only {CRV_P256} and {CRV_P521})"
                    )))
                }
            };
            let mut other_fields = serde_json::Map::new();
            let epk = serde_json::to_value(epk).map_err(|e| JoseError::Encrypt(e.to_string()))?;
            other_fields.insert("epk".into(), with_sorted_keys(epk));
            (
                ProtectedHeader {
                    alg: ALG_ECDH_ES_A256KW.into(),
                    enc: ENC_A256GCM.into(),
                    other_fields,
                },
                wrapped,
            )
        }
        TeePubKey::RSA {
            alg, k_mod, k_exp, ..
        } => {
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
            // The algorithm the recipient's key names (RFC 7517 §4.4): a
            // client decrypts with the one it asked for.
            let alg = match alg.as_str() {
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
                ALG_RSA_OAEP => key.encrypt(&mut OsRng, Oaep::new::<sha1::Sha1>(), cek.as_ref()),
                ALG_RSA1_5 => key.encrypt(&mut OsRng, rsa::Pkcs1v15Encrypt, cek.as_ref()),
                _ => key.encrypt(&mut OsRng, Oaep::new::<Sha256>(), cek.as_ref()),
            }
            .map_err(|e| JoseError::Encrypt(format!("{alg}: {e}")))?;
            (
                ProtectedHeader {
                    alg: alg.into(),
                    enc: ENC_A256GCM.into(),
                    other_fields: serde_json::Map::new(),
                },
                wrapped,
            )
        }
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

/// ECDH-ES+A256KW (RFC 7518 §4.6) toward `recipient`: a fresh ephemeral
/// key on the recipient's curve, whose public half goes out as `epk`, and
/// the content key wrapped under the agreed key.
fn ecdh_es_wrap<C>(recipient: &PublicKey<C>, crv: &str, cek: &[u8]) -> Result<(TeePubKey, Vec<u8>)>
where
    C: CurveArithmetic,
    FieldBytesSize<C>: ModulusSize,
    AffinePoint<C>: FromEncodedPoint<C> + ToEncodedPoint<C>,
{
    let ephemeral = SecretKey::<C>::random(&mut OsRng);
    let shared =
        elliptic_curve::ecdh::diffie_hellman(ephemeral.to_nonzero_scalar(), recipient.as_affine());
    let wrapped = ecdh_kek(shared.raw_secret_bytes())?
        .wrap_vec(cek)
        .map_err(|e| JoseError::Encrypt(format!("AES key wrap: {e}")))?;
    Ok((ec_jwk(&ephemeral.public_key(), crv), wrapped))
}

/// The content key of an ECDH-ES+A256KW recipient, from the sender's `epk`
/// (which must be on our key's curve).
fn ecdh_es_unwrap<C>(
    secret: &SecretKey<C>,
    crv: &str,
    epk: Option<&serde_json::Value>,
    encrypted_key: &[u8],
) -> Result<Zeroizing<Vec<u8>>>
where
    C: CurveArithmetic,
    FieldBytesSize<C>: ModulusSize,
    AffinePoint<C>: FromEncodedPoint<C> + ToEncodedPoint<C>,
{
    let epk = epk.ok_or_else(|| JoseError::Malformed("ECDH-ES header has no epk".into()))?;
    // An epk need not carry `alg` (go-jose's does not), which kbs_types'
    // JWK type requires: read the point's fields.
    let member = |name: &str| epk.get(name).and_then(|v| v.as_str()).unwrap_or("");
    if member("kty") != "EC" {
        return Err(JoseError::Malformed("epk is not an EC key".into()));
    }
    if member("crv") != crv {
        return Err(JoseError::Malformed(format!(
            "epk is on {}, this key on {crv}",
            member("crv")
        )));
    }
    let epk = ec_point::<C>(crv, member("x"), member("y"))?;
    let shared = elliptic_curve::ecdh::diffie_hellman(secret.to_nonzero_scalar(), epk.as_affine());
    Ok(Zeroizing::new(
        ecdh_kek(shared.raw_secret_bytes())?
            .unwrap_vec(encrypted_key)
            .map_err(|_| JoseError::Decrypt)?,
    ))
}

fn ec_jwk<C>(key: &PublicKey<C>, crv: &str) -> TeePubKey
where
    C: CurveArithmetic,
    FieldBytesSize<C>: ModulusSize,
    AffinePoint<C>: FromEncodedPoint<C> + ToEncodedPoint<C>,
{
    let point = key.to_encoded_point(false);
    // An uncompressed point always has both coordinates.
    let x = point.x().map(|x| B64URL.encode(x)).unwrap_or_default();
    let y = point.y().map(|y| B64URL.encode(y)).unwrap_or_default();
    TeePubKey::EC {
        crv: crv.into(),
        alg: ALG_ECDH_ES_A256KW.into(),
        x,
        y,
    }
}

/// A point from base64url JWK coordinates, each exactly the curve's field
/// size (RFC 7518 §6.2.1.2), rejected when off the curve.
fn ec_point<C>(crv: &str, x: &str, y: &str) -> Result<PublicKey<C>>
where
    C: CurveArithmetic,
    FieldBytesSize<C>: ModulusSize,
    AffinePoint<C>: FromEncodedPoint<C> + ToEncodedPoint<C>,
{
    let x = decode_b64url("x", x)?;
    let y = decode_b64url("y", y)?;
    let size = FieldBytesSize::<C>::USIZE;
    if x.len() != size || y.len() != size {
        return Err(JoseError::InvalidKey(format!(
            "{crv} coordinates must be {size} bytes"
        )));
    }
    let point = EncodedPoint::<C>::from_affine_coordinates(
        GenericArray::from_slice(&x),
        GenericArray::from_slice(&y),
        false,
    );
    Option::from(PublicKey::<C>::from_encoded_point(&point))
        .ok_or_else(|| JoseError::InvalidKey(format!("point is not on {crv}")))
}

/// Parses an EC JWK into a P-256 public key (rejecting points off the curve).
pub fn ec_public_key(jwk: &TeePubKey) -> Result<p256::PublicKey> {
    let TeePubKey::EC { crv, x, y, .. } = jwk else {
        return Err(JoseError::UnsupportedKey("expected an EC key".into()));
    };
    if crv != CRV_P256 {
        return Err(JoseError::UnsupportedKey(format!(
            "EC curve {crv} (only {CRV_P256})"
        )));
    }
    ec_point::<p256::NistP256>(crv, x, y)
}

fn decode_b64url_field(field: &str, value: &str) -> Result<Vec<u8>> {
    B64URL
        .decode(value.trim_end_matches('='))
        .map_err(|e| JoseError::Malformed(format!("{field}: not base64url: {e}")))
}

fn decode_b64url(field: &str, value: &str) -> Result<Vec<u8>> {
    B64URL
        .decode(value)
        .map_err(|e| JoseError::InvalidKey(format!("{field}: not base64url: {e}")))
}

/// Concat KDF (NIST SP 800-56A, as RFC 7518 §4.6.2 profiles it) for outputs
/// up to 256 bits, which one SHA-256 round yields.
fn concat_kdf(
    z: &[u8],
    algorithm_id: &str,
    apu: &[u8],
    apv: &[u8],
    bits: u32,
) -> Zeroizing<Vec<u8>> {
    debug_assert!(bits <= 256 && bits.is_multiple_of(8));
    let mut hasher = Sha256::new();
    hasher.update(1u32.to_be_bytes());
    hasher.update(z);
    for field in [algorithm_id.as_bytes(), apu, apv] {
        hasher.update((field.len() as u32).to_be_bytes());
        hasher.update(field);
    }
    hasher.update(bits.to_be_bytes());
    let digest = hasher.finalize();
    Zeroizing::new(digest[..(bits / 8) as usize].to_vec())
}

/// The AES-256 key-encryption key for ECDH-ES+A256KW from the shared
/// secret's x coordinate.
fn ecdh_kek(shared: &[u8]) -> Result<aes_kw::KekAes256> {
    let kek = concat_kdf(shared, ALG_ECDH_ES_A256KW, b"", b"", 256);
    aes_kw::KekAes256::try_from(kek.as_slice()).map_err(|_| JoseError::Decrypt)
}

#[cfg(test)]
mod tests;
