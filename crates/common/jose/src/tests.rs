#![allow(clippy::unwrap_used)]

use super::*;

fn b64(s: &str) -> Vec<u8> {
    B64URL.decode(s).unwrap()
}

/// RFC 7518 Appendix C: ECDH-ES key agreement between Alice's ephemeral key
/// and Bob's static key, Concat KDF with apu "Alice", apv "Bob", A128GCM.
#[test]
fn concat_kdf_matches_rfc7518_appendix_c() {
    let alice_d = b64("0_NxaRPUMQoAJt50Gz8YiTr8gRTwyEaCumd-MToTmIo");
    let bob = TeePubKey::EC {
        crv: "P-256".into(),
        alg: "ECDH-ES".into(),
        x: "weNJy2HscCSM6AEDTDg04biOvhFhyyWvOHQfeF_PxMQ".into(),
        y: "e8lnCO-AlStT-NJVX-crhB7QRYhiix03illJOVAOyck".into(),
    };
    let alice = p256::SecretKey::from_slice(&alice_d).unwrap();
    let shared = p256::ecdh::diffie_hellman(
        alice.to_nonzero_scalar(),
        ec_public_key(&bob).unwrap().as_affine(),
    );
    let derived = concat_kdf(shared.raw_secret_bytes(), "A128GCM", b"Alice", b"Bob", 128);
    assert_eq!(B64URL.encode(derived.as_slice()), "VqqN6vgjbSBcIijNcacQGg");
}

/// RFC 8785 §3.2.2: the canonical form of the sample object.
#[test]
fn canonical_json_matches_rfc8785_example() {
    let input = r#"{
        "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
        "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
        "literals": [null, true, false]
    }"#;
    let value: serde_json::Value = serde_json::from_str(input).unwrap();
    let canonical = String::from_utf8(canonical_json(&value).unwrap()).unwrap();
    assert_eq!(
        canonical,
        r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#
    );
}

/// RFC 8785 sorts keys by UTF-16 code units, not UTF-8 bytes.
#[test]
fn canonical_json_sorts_by_utf16() {
    let value = serde_json::json!({"\u{e9}": 1, "\u{1f600}": 2, "a": 3});
    let canonical = String::from_utf8(canonical_json(&value).unwrap()).unwrap();
    assert_eq!(canonical, "{\"a\":3,\"\u{e9}\":1,\"\u{1f600}\":2}");
}

#[test]
fn ec_round_trip() {
    let key = TeeKeyPair::generate_ec();
    let jwe = encrypt(&key.public_jwk(), b"the secret").unwrap();
    assert_eq!(jwe.protected.alg, ALG_ECDH_ES_A256KW);
    assert!(jwe.protected.other_fields.contains_key("epk"));
    assert_eq!(key.decrypt(&jwe).unwrap().as_slice(), b"the secret");
}

/// P-521 keys, which CoCo's client may send: the epk is on P-521 with
/// 66-byte coordinates, and a P-256 key cannot take it.
#[test]
fn p521_round_trip() {
    let key = TeeKeyPair::generate_ec_p521();
    let TeePubKey::EC { crv, x, .. } = key.public_jwk() else {
        panic!("not an EC JWK");
    };
    assert_eq!((crv.as_str(), b64(&x).len()), ("P-521", 66));
    let jwe = encrypt(&key.public_jwk(), b"p521 secret").unwrap();
    assert_eq!(jwe.protected.other_fields["epk"]["crv"], "P-521");
    assert_eq!(key.decrypt(&jwe).unwrap().as_slice(), b"p521 secret");
    let p256 = TeeKeyPair::generate_ec();
    let err = p256.decrypt(&jwe).unwrap_err();
    assert!(err.to_string().contains("epk is on P-521"), "{err}");
    // A P-521 JWK with P-256-sized coordinates is refused by size.
    let short = TeePubKey::EC {
        crv: "P-521".into(),
        alg: ALG_ECDH_ES_A256KW.into(),
        x: B64URL.encode([1u8; 32]),
        y: B64URL.encode([2u8; 32]),
    };
    let err = encrypt(&short, b"x").unwrap_err();
    assert!(err.to_string().contains("66 bytes"), "{err}");
}

#[test]
fn rsa_round_trip() {
    let key = TeeKeyPair::generate_rsa(2048).unwrap();
    let jwe = encrypt(&key.public_jwk(), b"rsa secret").unwrap();
    assert_eq!(jwe.protected.alg, ALG_RSA_OAEP_256);
    assert_eq!(key.decrypt(&jwe).unwrap().as_slice(), b"rsa secret");
}

#[test]
fn survives_json_wire_form() {
    let key = TeeKeyPair::generate_ec();
    let jwe = encrypt(&key.public_jwk(), b"over the wire").unwrap();
    let wire = serde_json::to_string(&jwe).unwrap();
    let parsed: Response = serde_json::from_str(&wire).unwrap();
    assert_eq!(key.decrypt(&parsed).unwrap().as_slice(), b"over the wire");
}

/// The authenticated data is the header as sent, whatever its key order.
#[test]
fn decrypts_wire_json_with_any_header_key_order() {
    let key = TeeKeyPair::generate_ec();
    let jwe = encrypt(&key.public_jwk(), b"order independent").unwrap();
    let wire = serde_json::to_vec(&jwe).unwrap();
    assert_eq!(
        key.decrypt_json(&wire).unwrap().as_slice(),
        b"order independent"
    );
    // The same header with its members in another order is other bytes,
    // which the sender did not authenticate.
    let reordered = B64URL.encode(format!(
        r#"{{"enc":"{}","alg":"{}","epk":{}}}"#,
        jwe.protected.enc, jwe.protected.alg, jwe.protected.other_fields["epk"]
    ));
    let mut doc: serde_json::Value = serde_json::from_slice(&wire).unwrap();
    doc["protected"] = serde_json::json!(reordered);
    assert!(matches!(
        key.decrypt_json(&serde_json::to_vec(&doc).unwrap()),
        Err(JoseError::Decrypt)
    ));
}

#[test]
fn tampering_anywhere_fails() {
    let key = TeeKeyPair::generate_ec();
    let jwe = encrypt(&key.public_jwk(), b"integrity matters").unwrap();
    let mut c = jwe.clone();
    c.ciphertext[0] ^= 1;
    assert!(matches!(key.decrypt(&c), Err(JoseError::Decrypt)));
    let mut t = jwe.clone();
    t.tag[15] ^= 1;
    assert!(matches!(key.decrypt(&t), Err(JoseError::Decrypt)));
    let mut k = jwe.clone();
    k.encrypted_key[3] ^= 1;
    assert!(matches!(key.decrypt(&k), Err(JoseError::Decrypt)));
    let mut i = jwe.clone();
    i.iv[0] ^= 1;
    assert!(matches!(key.decrypt(&i), Err(JoseError::Decrypt)));
    // The protected header is authenticated data.
    let mut h = jwe;
    h.protected
        .other_fields
        .insert("kid".into(), serde_json::json!("x"));
    assert!(matches!(key.decrypt(&h), Err(JoseError::Decrypt)));
}

#[test]
fn wrong_key_fails() {
    let key = TeeKeyPair::generate_ec();
    let other = TeeKeyPair::generate_ec();
    let jwe = encrypt(&key.public_jwk(), b"not for you").unwrap();
    assert!(matches!(other.decrypt(&jwe), Err(JoseError::Decrypt)));
}

#[test]
fn rejects_bad_keys_and_algorithms() {
    let off_curve = TeePubKey::EC {
        crv: "P-256".into(),
        alg: ALG_ECDH_ES_A256KW.into(),
        x: B64URL.encode([1u8; 32]),
        y: B64URL.encode([2u8; 32]),
    };
    assert!(matches!(
        encrypt(&off_curve, b"x"),
        Err(JoseError::InvalidKey(_))
    ));
    let p384 = TeePubKey::EC {
        crv: "P-384".into(),
        alg: ALG_ECDH_ES_A256KW.into(),
        x: String::new(),
        y: String::new(),
    };
    assert!(matches!(
        encrypt(&p384, b"x"),
        Err(JoseError::UnsupportedKey(_))
    ));
    assert!(matches!(
        TeeKeyPair::generate_rsa(1024),
        Err(JoseError::UnsupportedKey(_))
    ));
    let key = TeeKeyPair::generate_ec();
    let mut jwe = encrypt(&key.public_jwk(), b"x").unwrap();
    jwe.protected.enc = "A128CBC-HS256".into();
    assert!(matches!(
        key.decrypt(&jwe),
        Err(JoseError::UnsupportedAlgorithm { field: "enc", .. })
    ));
}

/// How CoCo's KBS client decrypts a response: it parses the protected
/// header into kbs-types' `ProtectedHeader` and re-serializes it for the
/// authenticated data. Built with serde_json's default features (no
/// `preserve_order`), that re-serialization sorts every object's keys —
/// what `canonical_json` writes for a header of strings. Our KBS's own
/// build has `preserve_order` on (dcap-qvl enables it), so a header is only
/// safe when its keys are sorted at every level on the wire.
fn decrypt_as_coco_client_does(key: &TeeKeyPair, wire: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    let doc: serde_json::Value = serde_json::from_slice(wire).unwrap();
    let protected = B64URL.decode(doc["protected"].as_str().unwrap()).unwrap();
    let header: serde_json::Value = serde_json::from_slice(&protected).unwrap();
    let reserialized = B64URL.encode(canonical_json(&header).unwrap());
    let jwe: Response = serde_json::from_value(doc).unwrap();
    key.decrypt_with_aad(&jwe, reserialized.as_bytes())
}

#[test]
fn a_coco_client_re_serializing_the_header_decrypts_our_responses() {
    let ec = TeeKeyPair::generate_ec();
    let p521 = TeeKeyPair::generate_ec_p521();
    let rsa = TeeKeyPair::generate_rsa(2048).unwrap();
    for key in [&ec, &p521, &rsa] {
        let jwe = encrypt(&key.public_jwk(), b"for a coco client").unwrap();
        let wire = serde_json::to_vec(&jwe).unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&wire).unwrap();
        let protected = B64URL.decode(doc["protected"].as_str().unwrap()).unwrap();
        let header: serde_json::Value = serde_json::from_slice(&protected).unwrap();
        assert_eq!(
            String::from_utf8(protected.clone()).unwrap(),
            String::from_utf8(canonical_json(&header).unwrap()).unwrap(),
            "the protected header on the wire is not in sorted-key form"
        );
        assert_eq!(
            decrypt_as_coco_client_does(key, &wire).unwrap().as_slice(),
            b"for a coco client"
        );
        // And a client that keeps the wire order (preserve_order on), or
        // takes the bytes as sent, agrees.
        assert_eq!(
            key.decrypt_json(&wire).unwrap().as_slice(),
            b"for a coco client"
        );
    }
}

/// An RSA key's `alg` picks the key wrapping, as CoCo's client expects:
/// RSA-OAEP-256 (also for no alg), RSA-OAEP (SHA-1), RSA1_5. The guest never
/// accepts RSA1_5 itself.
#[test]
fn rsa_responses_use_the_algorithm_the_key_names() {
    use rsa::traits::PublicKeyParts as _;
    let private = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap();
    let jwk = |alg: &str| TeePubKey::RSA {
        alg: alg.into(),
        k_mod: B64URL.encode(private.n().to_bytes_be()),
        k_exp: B64URL.encode(private.e().to_bytes_be()),
    };
    let key = TeeKeyPair::Rsa(Box::new(private.clone()));
    for (asked, sent) in [
        ("", ALG_RSA_OAEP_256),
        (ALG_RSA_OAEP_256, ALG_RSA_OAEP_256),
        (ALG_RSA_OAEP, ALG_RSA_OAEP),
    ] {
        let jwe = encrypt(&jwk(asked), b"wrapped as asked").unwrap();
        assert_eq!(jwe.protected.alg, sent);
        let wire = serde_json::to_vec(&jwe).unwrap();
        assert_eq!(
            decrypt_as_coco_client_does(&key, &wire).unwrap().as_slice(),
            b"wrapped as asked"
        );
    }
    let jwe = encrypt(&jwk(ALG_RSA1_5), b"pkcs1").unwrap();
    assert_eq!(jwe.protected.alg, ALG_RSA1_5);
    let cek = private
        .decrypt(rsa::Pkcs1v15Encrypt, &jwe.encrypted_key)
        .unwrap();
    assert_eq!(
        decrypt_a256gcm(
            &cek,
            &jwe.iv,
            &jwe.ciphertext,
            &jwe.tag,
            &jwe.protected.generate_aad().unwrap()
        )
        .unwrap()
        .as_slice(),
        b"pkcs1"
    );
    assert!(matches!(
        key.decrypt(&jwe),
        Err(JoseError::UnsupportedAlgorithm { field: "alg", .. })
    ));
    assert!(matches!(
        encrypt(&jwk("RSA-OAEP-512"), b"x"),
        Err(JoseError::UnsupportedAlgorithm { field: "alg", .. })
    ));
}
