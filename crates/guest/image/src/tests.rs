//! Layers encrypted here the way ocicrypt does, then decrypted, altered,
//! and opened with the wrong key. Interop with skopeo's own output is tested
//! in tests/e2e (it needs skopeo).
#![allow(clippy::unwrap_used)]

use aes::cipher::{KeyIvInit, StreamCipher};
use base64::{engine::general_purpose::STANDARD, Engine as _};
use hmac::{Hmac, Mac};
use kabuto_jose::TeeKeyPair;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::ocicrypt::*;

/// Encrypts `layer` to `recipient` as ocicrypt does.
fn encrypt(layer: &[u8], recipient: &TeeKeyPair) -> (LayerDescriptor, Vec<u8>) {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(layer)));
    encrypt_naming(layer, &digest, recipient)
}

/// As [`encrypt`], with `digest` as the private options' digest.
fn encrypt_naming(
    layer: &[u8],
    digest: &str,
    recipient: &TeeKeyPair,
) -> (LayerDescriptor, Vec<u8>) {
    let mut key = [0u8; 32];
    let mut nonce = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut key);
    rand::thread_rng().fill_bytes(&mut nonce);
    let mut blob = layer.to_vec();
    ctr::Ctr128BE::<aes::Aes256>::new_from_slices(&key, &nonce)
        .unwrap()
        .apply_keystream(&mut blob);
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).unwrap();
    mac.update(&blob);
    let hmac = mac.finalize().into_bytes();
    let private = serde_json::json!({
        "symkey": STANDARD.encode(key),
        "digest": digest,
        "cipheroptions": {"nonce": STANDARD.encode(nonce)},
    });
    let jwe = kabuto_jose::encrypt(
        &recipient.public_jwk(),
        serde_json::to_string(&private).unwrap().as_bytes(),
    )
    .unwrap();
    let pubopts = serde_json::json!({"cipher": CIPHER_AES_CTR_HMAC, "hmac": STANDARD.encode(hmac), "cipheroptions": {}});
    let descriptor = LayerDescriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip+encrypted".into(),
        digest: format!("sha256:{}", hex::encode(Sha256::digest(&blob))),
        size: blob.len() as u64,
        annotations: [
            (
                KEYS_JWE_ANNOTATION.to_string(),
                STANDARD.encode(serde_json::to_vec(&jwe).unwrap()),
            ),
            (
                PUBOPTS_ANNOTATION.to_string(),
                STANDARD.encode(serde_json::to_vec(&pubopts).unwrap()),
            ),
        ]
        .into_iter()
        .collect(),
    };
    (descriptor, blob)
}

fn layer() -> Vec<u8> {
    (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect()
}

#[test]
fn decrypts_what_it_was_given_the_key_for() {
    for key in [
        TeeKeyPair::generate_ec(),
        TeeKeyPair::generate_rsa(2048).unwrap(),
    ] {
        let (d, blob) = encrypt(&layer(), &key);
        assert!(d.is_encrypted());
        assert_eq!(
            d.decrypted_media_type(),
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        let other = TeeKeyPair::generate_ec();
        assert_eq!(
            decrypt_layer(&d, blob.clone(), &[other, key]).unwrap(),
            layer()
        );
    }
}

#[test]
fn an_altered_ciphertext_is_refused_before_decryption() {
    let key = TeeKeyPair::generate_ec();
    let (d, mut blob) = encrypt(&layer(), &key);
    blob[1234] ^= 1;
    let e = decrypt_layer(&d, blob.clone(), &[key]).unwrap_err();
    assert!(matches!(e, DecryptError::Hmac { .. }), "{e}");
    assert!(e.to_string().contains("the layer was altered"), "{e}");
}

#[test]
fn the_wrong_key_opens_nothing() {
    let (d, blob) = encrypt(&layer(), &TeeKeyPair::generate_ec());
    let e = decrypt_layer(&d, blob.clone(), &[TeeKeyPair::generate_ec()]).unwrap_err();
    assert!(matches!(e, DecryptError::NoKey { keys: 1, .. }), "{e}");
    let e = decrypt_layer(&d, blob.clone(), &[]).unwrap_err();
    assert!(e.to_string().contains("no keys were provided"), "{e}");
}

#[test]
fn the_private_digest_is_checked() {
    let key = TeeKeyPair::generate_ec();
    // Names some other content: refused, though key and HMAC are right.
    let other = format!("sha256:{}", "ab".repeat(32));
    let (d, blob) = encrypt_naming(&layer(), &other, &key);
    let e = decrypt_layer(&d, blob.clone(), &[key]).unwrap_err();
    assert!(matches!(e, DecryptError::Digest { .. }), "{e}");
    assert!(e.to_string().contains(&other), "{e}");
}

#[test]
fn a_layer_compressed_before_encryption_may_name_its_uncompressed_digest() {
    // What skopeo does with an uncompressed layer: gzip, then encrypt,
    // keeping the uncompressed layer's digest in the private options.
    use std::io::Write as _;
    let key = TeeKeyPair::generate_ec();
    let tar = layer();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gzipped = gz.finish().unwrap();
    let tar_digest = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
    let (d, blob) = encrypt_naming(&gzipped, &tar_digest, &key);
    assert_eq!(decrypt_layer(&d, blob.clone(), &[key]).unwrap(), gzipped);

    // Not for a layer that says it is uncompressed.
    let key = TeeKeyPair::generate_ec();
    let (mut d, blob) = encrypt_naming(&gzipped, &tar_digest, &key);
    d.media_type = "application/vnd.oci.image.layer.v1.tar+encrypted".into();
    assert!(matches!(
        decrypt_layer(&d, blob.clone(), &[key]).unwrap_err(),
        DecryptError::Digest { .. }
    ));
}

#[test]
fn another_layers_key_does_not_open_this_one() {
    // The keys annotation of another layer (same recipient) on this blob.
    let key = TeeKeyPair::generate_ec();
    let (d, blob) = encrypt(&layer(), &key);
    let (d2, _) = encrypt(b"another layer", &key);
    let mut swapped = d.clone();
    swapped.annotations.insert(
        KEYS_JWE_ANNOTATION.into(),
        d2.annotations[KEYS_JWE_ANNOTATION].clone(),
    );
    let e = decrypt_layer(&swapped, blob.clone(), &[key]).unwrap_err();
    assert!(matches!(e, DecryptError::Hmac { .. }), "{e}");
}

#[test]
fn malformed_descriptors_name_the_problem() {
    let key = TeeKeyPair::generate_ec();
    let (d, blob) = encrypt(&layer(), &key);

    let mut plain = d.clone();
    plain.media_type = "application/vnd.oci.image.layer.v1.tar+gzip".into();
    assert!(matches!(
        decrypt_layer(&plain, blob.clone(), &[]).unwrap_err(),
        DecryptError::NotEncrypted { .. }
    ));

    let mut missing = d.clone();
    missing.annotations.remove(PUBOPTS_ANNOTATION);
    let e = decrypt_layer(&missing, blob.clone(), &[]).unwrap_err();
    assert!(e.to_string().contains(PUBOPTS_ANNOTATION), "{e}");

    let mut cipher = d.clone();
    cipher.annotations.insert(
        PUBOPTS_ANNOTATION.into(),
        STANDARD.encode(br#"{"cipher":"AES_128_CBC","hmac":""}"#),
    );
    let e = decrypt_layer(&cipher, blob.clone(), &[]).unwrap_err();
    assert!(
        e.to_string()
            .contains("cipher AES_128_CBC is not supported"),
        "{e}"
    );

    let mut garbage = d;
    garbage
        .annotations
        .insert(KEYS_JWE_ANNOTATION.into(), "!!!".into());
    let e = decrypt_layer(&garbage, blob.clone(), &[key]).unwrap_err();
    assert!(e.to_string().contains("not base64"), "{e}");
}

#[test]
fn keys_load_from_the_pem_openssl_writes() {
    // PKCS#8 as written by `openssl genpkey`; SEC1 / PKCS#1 are covered by
    // the skopeo interop test, which uses `openssl genrsa` / `ecparam`.
    use p256::pkcs8::EncodePrivateKey as _;
    let ec = p256::SecretKey::random(&mut rand::thread_rng());
    let pem = ec.to_pkcs8_pem(Default::default()).unwrap();
    assert!(matches!(TeeKeyPair::from_pem(&pem), Ok(TeeKeyPair::Ec(_))));
    assert!(TeeKeyPair::from_pem("-----BEGIN NOTHING-----").is_err());
}

/// Settings fetched from the KBS may hold secrets; a parse error says where
/// the document is wrong without quoting it (serde's messages would, and
/// errors reach the host through agent responses and the console).
#[test]
fn errors_in_kbs_fetched_settings_do_not_quote_them() {
    const SECRET: &str = "s3cr3t-MARKER";
    let registries = format!("[[registry]]\nprefix = \"r.example\"\ninsecure = \"{SECRET}\"\n");
    let err = crate::RegistriesConf::parse(&registries)
        .unwrap_err()
        .to_string();
    assert!(!err.contains(SECRET), "{err}");
    assert!(err.contains("line 3"), "{err}");

    let credentials = format!("{{\"auths\": {{\"r.example\": {{\"auth\": \"x\", \"extra\": 1, \"username\": {{\"{SECRET}\": 1}}}}}}}}");
    let err = crate::Credentials::parse(credentials.as_bytes())
        .err()
        .unwrap()
        .to_string();
    assert!(!err.contains(SECRET), "{err}");

    let policy = format!("{{\"default\": [{{\"type\": \"{SECRET}\"}}]}}");
    let err =
        kabuto_error::chain(&crate::SignaturePolicy::from_json(policy.as_bytes()).unwrap_err());
    assert!(!err.contains(SECRET), "{err}");
    assert!(err.contains("line 1 column"), "{err}");
}
