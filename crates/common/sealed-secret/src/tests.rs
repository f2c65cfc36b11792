#![allow(clippy::unwrap_used)]

use super::*;

#[derive(Debug, thiserror::Error)]
#[error("no such resource")]
struct Missing;

type Fetched = std::result::Result<Zeroizing<Vec<u8>>, Missing>;

/// A KBS holding `resources`.
fn kbs<'a>(resources: &'a [(&'a str, &'a [u8])]) -> impl Fn(&ResourceUri) -> Fetched + 'a {
    move |uri| {
        resources
            .iter()
            .find(|(at, _)| *at == uri.to_string())
            .map(|(_, value)| Zeroizing::new(value.to_vec()))
            .ok_or(Missing)
    }
}

const KID: &str = "kbs:///default/sealed-secret-key/1";

#[test]
fn a_vault_secret_unseals_to_its_resource() {
    let key = PrivateSigningKey::generate();
    let sealed = key.seal(&Secret::vault("kbs:///default/db/password").unwrap(), KID);
    assert!(is_sealed(sealed.as_bytes()));
    let parsed = SealedSecret::parse(&sealed).unwrap();
    assert_eq!(parsed.kid, KID);
    let secret = parsed.verify(&key.public()).unwrap();
    let plaintext = secret
        .unseal(kbs(&[("kbs:///default/db/password", b"hunter2")]))
        .unwrap();
    assert_eq!(plaintext.as_slice(), b"hunter2");
    // A file's trailing newline is not part of it.
    assert!(SealedSecret::parse(&format!("{sealed}\n")).is_ok());
}

#[test]
fn an_envelope_secret_unseals_with_its_key_encryption_key_only() {
    let key = PrivateSigningKey::generate();
    let kek = [7u8; 32];
    let secret = Secret::envelope("kbs:///default/kek/1", &kek, b"the plaintext").unwrap();
    let sealed = key.seal(&secret, KID);
    // The plaintext is nowhere in the sealed form.
    assert!(!sealed.contains("plaintext"));
    let secret = SealedSecret::parse(&sealed)
        .unwrap()
        .verify(&key.public())
        .unwrap();
    let plaintext = secret
        .unseal(kbs(&[("kbs:///default/kek/1", &kek)]))
        .unwrap();
    assert_eq!(plaintext.as_slice(), b"the plaintext");
    let wrong = secret.unseal(kbs(&[("kbs:///default/kek/1", &[8u8; 32])]));
    assert!(matches!(wrong, Err(SealedSecretError::Unwrap)), "{wrong:?}");
    let short = secret.unseal(kbs(&[("kbs:///default/kek/1", &[8u8; 16])]));
    assert!(
        matches!(short, Err(SealedSecretError::KekLength)),
        "{short:?}"
    );
    let absent = secret.unseal(kbs(&[]));
    assert!(
        matches!(&absent, Err(SealedSecretError::Fetch { uri, .. }) if uri == "kbs:///default/kek/1"),
        "{absent:?}"
    );

    // Flipped ciphertext: refused, never wrong plaintext.
    let SecretKind::Envelope { encrypted_data, .. } = &secret.kind else {
        panic!("an envelope");
    };
    let mut data = STANDARD.decode(encrypted_data).unwrap();
    data[0] ^= 1;
    let mut tampered = secret.clone();
    if let SecretKind::Envelope { encrypted_data, .. } = &mut tampered.kind {
        *encrypted_data = STANDARD.encode(data);
    }
    let e = tampered.unseal(kbs(&[("kbs:///default/kek/1", &kek)]));
    assert!(matches!(e, Err(SealedSecretError::Decrypt)), "{e:?}");
}

/// Built from CoCo's documented format alone, not with this crate's
/// sealing: header and payload JSON written out, ES256 over
/// `b64url(header).b64url(payload)`, raw r||s.
#[test]
fn a_secret_sealed_as_coco_documents_it_unseals() {
    let signing = SigningKey::random(&mut OsRng);
    let header = r#"{"alg":"ES256","kid":"kbs:///default/signing-key/coco"}"#;
    let payload = r#"{"version":"0.1.0","type":"vault","name":"kbs:///default/app/token","provider":"kbs","provider_settings":{},"annotations":{}}"#;
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let signature: Signature = signing.sign(input.as_bytes());
    let sealed = format!(
        "sealed.{input}.{}",
        URL_SAFE_NO_PAD.encode(signature.to_bytes())
    );
    let point = signing.verifying_key().to_encoded_point(false);
    let jwk = format!(
        r#"{{"kty":"EC","crv":"P-256","x":"{}","y":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(point.x().unwrap()),
        URL_SAFE_NO_PAD.encode(point.y().unwrap())
    );
    let key = PublicSigningKey::from_jwk(jwk.as_bytes()).unwrap();
    let parsed = SealedSecret::parse(&sealed).unwrap();
    assert_eq!(parsed.kid, "kbs:///default/signing-key/coco");
    let secret = parsed.verify(&key).unwrap();
    assert_eq!(
        secret.resource().unwrap().to_string(),
        "kbs:///default/app/token"
    );
}

#[test]
fn a_secret_signed_by_another_key_or_tampered_with_is_refused() {
    let owner = PrivateSigningKey::generate();
    let other = PrivateSigningKey::generate();
    let secret = Secret::vault("kbs:///default/db/password").unwrap();
    let sealed = other.seal(&secret, KID);
    let e = SealedSecret::parse(&sealed)
        .unwrap()
        .verify(&owner.public())
        .unwrap_err();
    assert!(matches!(e, SealedSecretError::BadSignature { .. }), "{e}");

    // The payload changed to name another resource, signature kept.
    let sealed = owner.seal(&secret, KID);
    let parts: Vec<&str> = sealed.trim_start_matches(PREFIX).split('.').collect();
    let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    let changed = payload.replace("db/password", "db/admin-password");
    let forged = format!(
        "{PREFIX}{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(changed),
        parts[2]
    );
    let e = SealedSecret::parse(&forged)
        .unwrap()
        .verify(&owner.public())
        .unwrap_err();
    assert!(matches!(e, SealedSecretError::BadSignature { .. }), "{e}");
}

#[test]
fn malformed_sealed_secrets_are_refused_naming_the_problem() {
    let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
    let signature = URL_SAFE_NO_PAD.encode([1u8; 64]);
    let payload =
        b64(r#"{"version":"0.1.0","type":"vault","name":"kbs:///a/b/c","provider":"kbs"}"#);
    let with = |header: &str, payload: &str, signature: &str| {
        SealedSecret::parse(&format!("sealed.{}.{payload}.{signature}", b64(header))).unwrap_err()
    };
    assert!(matches!(
        SealedSecret::parse("plain"),
        Err(SealedSecretError::NotSealed)
    ));
    assert!(matches!(
        SealedSecret::parse("sealed.a.b"),
        Err(SealedSecretError::Shape)
    ));
    // CoCo's old unsigned form.
    assert!(matches!(
        SealedSecret::parse(&format!("sealed.fakejwsheader.{payload}.fakesignature")),
        Err(SealedSecretError::Header(_) | SealedSecretError::Base64(_))
    ));
    assert!(matches!(
        with(r#"{"alg":"none","kid":"k"}"#, &payload, &signature),
        SealedSecretError::Algorithm(a) if a == "none"
    ));
    assert!(matches!(
        with(r#"{"alg":"ES256"}"#, &payload, &signature),
        SealedSecretError::NoKid
    ));
    assert!(matches!(
        with(r#"{"alg":"ES256","kid":"k"}"#, &payload, "AAAA"),
        SealedSecretError::SignatureLength
    ));
    let v2 = b64(r#"{"version":"0.2.0","type":"vault","name":"kbs:///a/b/c","provider":"kbs"}"#);
    assert!(matches!(
        with(r#"{"alg":"ES256","kid":"k"}"#, &v2, &signature),
        SealedSecretError::Version(v) if v == "0.2.0"
    ));
    let unknown = b64(r#"{"version":"0.1.0","type":"kms"}"#);
    assert!(matches!(
        with(r#"{"alg":"ES256","kid":"k"}"#, &unknown, &signature),
        SealedSecretError::Payload(_)
    ));
    assert!(matches!(
        SealedSecret::parse(&"x".repeat(MAX_LEN + 1)),
        Err(SealedSecretError::TooLong)
    ));
}

#[test]
fn only_the_kbs_provider_and_a256gcm_are_unsealed() {
    let mut secret = Secret::vault("kbs:///default/db/password").unwrap();
    if let SecretKind::Vault { provider, .. } = &mut secret.kind {
        *provider = "aliyun".into();
    }
    let e = secret.unseal(kbs(&[])).unwrap_err();
    assert!(matches!(e, SealedSecretError::Provider(p) if p == "aliyun"));
    let mut envelope = Secret::envelope("kbs:///default/kek/1", &[7u8; 32], b"x").unwrap();
    if let SecretKind::Envelope { wrap_type, .. } = &mut envelope.kind {
        *wrap_type = "A256CTR".into();
    }
    let e = envelope
        .unseal(kbs(&[("kbs:///default/kek/1", &[7u8; 32])]))
        .unwrap_err();
    assert!(matches!(e, SealedSecretError::WrapType(w) if w == "A256CTR"));
    assert!(matches!(
        Secret::vault("https://example.com/x"),
        Err(SealedSecretError::Uri { .. })
    ));
}

#[test]
fn signing_keys_round_trip_as_jwks() {
    let key = PrivateSigningKey::generate();
    let private = key.to_jwk("k1");
    let public = key.public().to_jwk("k1");
    assert!(private.contains("\"d\"") && !public.contains("\"d\""));
    let again = PrivateSigningKey::from_jwk(private.as_bytes()).unwrap();
    let sealed = again.seal(&Secret::vault("kbs:///a/b/c").unwrap(), "k1");
    let verifying = PublicSigningKey::from_jwk(public.as_bytes()).unwrap();
    SealedSecret::parse(&sealed)
        .unwrap()
        .verify(&verifying)
        .unwrap();
    // A private JWK verifies too (its d ignored), as CoCo provisions them.
    let from_private = PublicSigningKey::from_jwk(private.as_bytes()).unwrap();
    SealedSecret::parse(&sealed)
        .unwrap()
        .verify(&from_private)
        .unwrap();

    assert!(
        PrivateSigningKey::from_jwk(public.as_bytes()).is_err(),
        "no d"
    );
    let rsa = r#"{"kty":"RSA","crv":"","x":"","y":""}"#;
    assert!(PublicSigningKey::from_jwk(rsa.as_bytes()).is_err());
    // d of one key with x, y of another.
    let mut mixed: serde_json::Value = serde_json::from_str(&private).unwrap();
    let other: serde_json::Value =
        serde_json::from_str(&PrivateSigningKey::generate().public().to_jwk("k2")).unwrap();
    mixed["x"] = other["x"].clone();
    mixed["y"] = other["y"].clone();
    assert!(PrivateSigningKey::from_jwk(mixed.to_string().as_bytes()).is_err());
}
