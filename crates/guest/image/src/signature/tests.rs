#![allow(clippy::unwrap_used)]
use base64::{engine::general_purpose::STANDARD, Engine as _};

use super::cosign::check_payload;
use super::gpg::not_expired;
use super::identity::{identity_matches, Expected, SignedIdentity};
use super::*;
use crate::registry::ImageReference;

fn chain(e: &SignatureError) -> String {
    kabuto_error::chain(e)
}

#[test]
fn expiry_counts_from_creation_and_zero_means_never() {
    let at = |secs: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    let days = |d: u32| Some(pgp::types::Duration::from_secs(d * 86_400));
    assert!(not_expired(1_000, days(1), at(1_000 + 86_399), "key").is_ok());
    let err = not_expired(1_000, days(1), at(1_000 + 86_400 + 5), "key").unwrap_err();
    assert_eq!(err.to_string(), "key expired at 87400 (Unix time; 5 s ago)");
    assert!(not_expired(1_000, None, at(u64::from(u32::MAX)), "key").is_ok());
    assert!(not_expired(1_000, days(0), at(u64::from(u32::MAX)), "key").is_ok());
}

fn key_data(key: &p256::ecdsa::SigningKey) -> String {
    use p256::pkcs8::EncodePublicKey as _;
    let pem = key
        .verifying_key()
        .to_public_key_pem(Default::default())
        .unwrap();
    STANDARD.encode(pem)
}

fn image(text: &str) -> ImageReference {
    ImageReference::parse(text).unwrap()
}

#[test]
fn the_most_specific_scope_applies() {
    let key = p256::ecdsa::SigningKey::random(&mut rand::thread_rng());
    let policy = SignaturePolicy::from_json(
        serde_json::json!({
            "default": [{"type": "reject"}],
            "transports": {"docker": {
                "registry.example/team": [{"type": "insecureAcceptAnything"}],
                "registry.example/team/app": [{"type": "sigstoreSigned", "keyData": key_data(&key)}],
                "registry.example/team/app:debug": [{"type": "reject"}],
            }}
        })
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    let scope = |i: &str| policy.requirements(&image(i)).0;
    assert_eq!(
        scope("registry.example/team/app:v1"),
        "registry.example/team/app"
    );
    assert_eq!(
        scope("registry.example/team/app:debug"),
        "registry.example/team/app:debug"
    );
    assert_eq!(
        scope("registry.example/team/other:v1"),
        "registry.example/team"
    );
    assert_eq!(scope("elsewhere.example/x:1"), "default");
}

#[test]
fn unusable_policies_are_refused() {
    for (policy, why) in [
        (
            r#"{"default": [{"type": "sigstoreSigned", "keyPath": "/k.pub"}]}"#,
            "no key source here",
        ),
        (
            r#"{"default": [{"type": "sigstoreSigned"}]}"#,
            "exactly one of keyData, keyPath",
        ),
        (
            r#"{"default": [{"type": "sigstoreSigned", "keyData": "bm90IGEga2V5"}]}"#,
            "not a P-256 public key",
        ),
        (
            r#"{"default": [{"type": "signedBy", "keyType": "X509Certificates", "keyData": ""}]}"#,
            "only GPGKeys",
        ),
        (
            r#"{"default": [{"type": "signedBy", "keyType": "GPGKeys", "keyData": "bm90IGEga2V5"}]}"#,
            "signedBy key",
        ),
        (
            r#"{"default": [{"type": "signedBy", "keyData": "", "signedIdentity": {"type": "remapIdentity", "prefix": "a", "signedPrefix": "b"}}]}"#,
            "unknown variant",
        ),
        (r#"{"default": [{"type": "bogus"}]}"#, "unknown variant"),
        (r#"{"transports": {}}"#, "missing field `default`"),
        (
            r#"{"default": [], "transports": {"atomic": {}}}"#,
            "only docker",
        ),
    ] {
        let e = chain(&SignaturePolicy::from_json(policy.as_bytes()).unwrap_err());
        assert!(e.contains(why), "{policy}: {e}");
    }
}

#[test]
fn key_paths_are_read_with_the_resolver() {
    let key = p256::ecdsa::SigningKey::random(&mut rand::thread_rng());
    let pem = STANDARD.decode(key_data(&key)).unwrap();
    let policy =
        br#"{"default": [{"type": "sigstoreSigned", "keyPath": "kbs:///default/cosign-key/1"}]}"#;
    let seen = std::cell::RefCell::new(Vec::new());
    SignaturePolicy::from_json_with(policy, &|path| {
        seen.borrow_mut().push(path.to_string());
        Ok(pem.clone())
    })
    .unwrap();
    assert_eq!(*seen.borrow(), ["kbs:///default/cosign-key/1"]);
    let e = chain(
        &SignaturePolicy::from_json_with(policy, &|_| Err("KBS said no".into())).unwrap_err(),
    );
    assert!(e.contains("KBS said no"), "{e}");
}

fn expected<'a>(
    image: &'a ImageReference,
    digest: &'a str,
    identity: &'a SignedIdentity,
) -> Expected<'a> {
    Expected::new(image, digest, identity, COSIGN_SIGNATURE_TYPE)
}

#[test]
fn payloads_must_verify_and_name_the_image() {
    let key = p256::ecdsa::SigningKey::random(&mut rand::thread_rng());
    let verifying = *key.verifying_key();
    let img = image("registry.example/team/app:v1");
    let digest = format!("sha256:{}", "1".repeat(64));
    let repo = SignedIdentity::MatchRepository;
    let payload = simple_signing_payload("registry.example/team/app", &digest);
    let signature = sign_payload(&key, &payload);
    check_payload(
        &payload,
        &signature,
        &verifying,
        &expected(&img, &digest, &repo),
    )
    .unwrap();

    let other = p256::ecdsa::SigningKey::random(&mut rand::thread_rng());
    let e = check_payload(
        &payload,
        &sign_payload(&other, &payload),
        &verifying,
        &expected(&img, &digest, &repo),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("does not verify"), "{e}");

    let mut tampered = payload.clone();
    tampered[10] ^= 1;
    assert!(check_payload(
        &tampered,
        &signature,
        &verifying,
        &expected(&img, &digest, &repo)
    )
    .is_err());

    let two = format!("sha256:{}", "2".repeat(64));
    let e = check_payload(
        &payload,
        &signature,
        &verifying,
        &expected(&img, &two, &repo),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("is for manifest"), "{e}");

    let elsewhere = simple_signing_payload("registry.example/team/other", &digest);
    let e = check_payload(
        &elsewhere,
        &sign_payload(&key, &elsewhere),
        &verifying,
        &expected(&img, &digest, &repo),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not registry.example/team/app"), "{e}");
}

#[test]
fn signed_identities_follow_containers_policy() {
    let by_tag = image("registry.example/team/app:v1");
    let by_digest = image(&format!(
        "registry.example/team/app@sha256:{}",
        "1".repeat(64)
    ));
    use SignedIdentity::*;
    let default = MatchRepoDigestOrExact;
    for (img, signed, identity, ok) in [
        (&by_tag, "registry.example/team/app:v1", &default, true),
        (&by_tag, "registry.example/team/app:v2", &default, false),
        (&by_tag, "registry.example/team/app", &default, false),
        (&by_digest, "registry.example/team/app:v9", &default, true),
        (
            &by_digest,
            "registry.example/team/other:v9",
            &default,
            false,
        ),
        (&by_tag, "registry.example/team/app", &MatchRepository, true),
        (&by_tag, "registry.example/team/app:v1", &MatchExact, true),
        (
            &by_digest,
            "registry.example/team/app:v1",
            &MatchExact,
            false,
        ),
        (
            &by_tag,
            "registry.example/base:1",
            &ExactReference {
                docker_reference: "registry.example/base:1".into(),
            },
            true,
        ),
        (
            &by_tag,
            "registry.example/base:2",
            &ExactRepository {
                docker_repository: "registry.example/base".into(),
            },
            true,
        ),
        (
            &by_tag,
            "registry.example/other:2",
            &ExactRepository {
                docker_repository: "registry.example/base".into(),
            },
            false,
        ),
    ] {
        assert_eq!(
            identity_matches(img, signed, identity).is_ok(),
            ok,
            "{img:?} {signed} {identity:?}"
        );
    }
}

#[test]
fn lookaside_scopes() {
    let l = Lookaside::parse(
        "default-docker:\n  lookaside: http://10.0.2.2:1/default\n\
         docker:\n  registry.example/team:\n    sigstore: https://sigs.example/team\n",
    )
    .unwrap();
    assert_eq!(
        l.url_for(&image("registry.example/team/app:1")),
        Some("https://sigs.example/team")
    );
    assert_eq!(
        l.url_for(&image("quay.io/x:1")),
        Some("http://10.0.2.2:1/default")
    );
    assert!(Lookaside::parse("default-docker:\n  lookaside: file:///var/lib/sigs\n").is_err());
}
