//! The guest's ephemeral TEE key pair: generated, exported as a public
//! JWK, read from PEM, and used to open JWEs addressed to it.

use super::*;

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

    pub(crate) fn decrypt_with_aad(
        &self,
        jwe: &Response,
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
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
