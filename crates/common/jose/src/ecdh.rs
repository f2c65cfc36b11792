//! ECDH-ES+A256KW (RFC 7518 §4.6) over NIST curves: key agreement, the
//! Concat KDF, and EC public keys as JWKs.

use super::*;

/// ECDH-ES+A256KW (RFC 7518 §4.6) toward `recipient`: a fresh ephemeral
/// key on the recipient's curve, whose public half goes out as `epk`, and
/// the content key wrapped under the agreed key.
pub(crate) fn ecdh_es_wrap<C>(
    recipient: &PublicKey<C>,
    crv: &str,
    cek: &[u8],
) -> Result<(TeePubKey, Vec<u8>)>
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
pub(crate) fn ecdh_es_unwrap<C>(
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

pub(crate) fn ec_jwk<C>(key: &PublicKey<C>, crv: &str) -> TeePubKey
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
pub(crate) fn ec_point<C>(crv: &str, x: &str, y: &str) -> Result<PublicKey<C>>
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

pub(crate) fn decode_b64url_field(field: &str, value: &str) -> Result<Vec<u8>> {
    B64URL
        .decode(value.trim_end_matches('='))
        .map_err(|e| JoseError::Malformed(format!("{field}: not base64url: {e}")))
}

pub(crate) fn decode_b64url(field: &str, value: &str) -> Result<Vec<u8>> {
    B64URL
        .decode(value)
        .map_err(|e| JoseError::InvalidKey(format!("{field}: not base64url: {e}")))
}

/// Concat KDF (NIST SP 800-56A, as RFC 7518 §4.6.2 profiles it) for outputs
/// up to 256 bits, which one SHA-256 round yields.
pub(crate) fn concat_kdf(
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
pub(crate) fn ecdh_kek(shared: &[u8]) -> Result<aes_kw::KekAes256> {
    let kek = concat_kdf(shared, ALG_ECDH_ES_A256KW, b"", b"", 256);
    aes_kw::KekAes256::try_from(kek.as_slice()).map_err(|_| JoseError::Decrypt)
}
