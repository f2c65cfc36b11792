//! Cosign-format signatures in a real registry (docker-registry; images and
//! signature images pushed by skopeo) checked by the guest's signature
//! policy: a signed image passes, an unsigned one, one signed by another
//! key, and a signature moved to another image are refused, each naming
//! why; scopes and reject / insecureAcceptAnything behave as in
//! containers-policy.json.

use base64::Engine as _;
use kabuto_e2e::skopeo_push;
use kabuto_image::{
    signature::{signature_tag, write_signature_layout},
    ImageReference, RegistryClient, SignaturePolicy,
};
use p256::pkcs8::EncodePublicKey as _;

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn sigstore_signatures_are_checked_against_the_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = dir.path().join("plain");
    kabuto_e2e::busybox_layout(&plain).expect("layout");
    let registry = kabuto_e2e::Registry::start();
    let signed = registry.push_layout(&plain, "latest", "kabuto/signed");
    let unsigned = registry.push_layout(&plain, "latest", "kabuto/unsigned");
    let wrong_key = registry.push_layout(&plain, "latest", "kabuto/wrongkey");
    let mut client = RegistryClient::new(vec![registry.host.clone()], None);

    let owner = p256::ecdsa::SigningKey::random(&mut rand::thread_rng());
    let stranger = p256::ecdsa::SigningKey::random(&mut rand::thread_rng());
    let sign = |reference: &str, key: &p256::ecdsa::SigningKey, name: &str| {
        let image = ImageReference::parse(reference).expect("reference");
        let (digest, _) = RegistryClient::new(vec![registry.host.clone()], None)
            .manifest(&image)
            .expect("manifest");
        let layout = dir.path().join(name);
        let repo = format!("{}/{}", image.registry, image.repository);
        write_signature_layout(&layout, &repo, &digest, key).expect("signature layout");
        skopeo_push(
            &layout,
            "sig",
            &format!("{repo}:{}", signature_tag(&digest)),
        );
        digest
    };
    sign(&signed, &owner, "sig-owner");
    sign(&wrong_key, &stranger, "sig-stranger");

    let key_data = base64::engine::general_purpose::STANDARD.encode(
        owner
            .verifying_key()
            .to_public_key_pem(Default::default())
            .expect("pem"),
    );
    let policy = SignaturePolicy::from_json(
        serde_json::json!({
            "default": [{"type": "reject"}],
            "transports": {"docker": {
                // cosign signs the repository, not a tag: podman's advice.
                format!("{}/kabuto", registry.host): [{"type": "sigstoreSigned", "keyData": key_data,
                                                         "signedIdentity": {"type": "matchRepository"}}],
                format!("{}/kabuto/open", registry.host): [{"type": "insecureAcceptAnything"}],
            }}
        })
        .to_string()
        .as_bytes(),
    )
    .expect("policy");
    let check = |reference: &str, client: &mut RegistryClient| {
        let image = ImageReference::parse(reference).expect("reference");
        let (digest, _) = client.manifest(&image).expect("manifest");
        policy.check(&image, &digest, client)
    };

    check(&signed, &mut client).expect("signed by the owner");
    let e = kabuto_error::chain(&check(&unsigned, &mut client).expect_err("unsigned"));
    assert!(
        e.contains("no valid signature") && e.contains("no signatures at sha256-"),
        "{e}"
    );
    let e = kabuto_error::chain(&check(&wrong_key, &mut client).expect_err("stranger's key"));
    assert!(e.contains("does not verify with the policy's key"), "{e}");

    // The owner's signature of `signed`, copied onto another repository.
    let moved = registry.push_layout(&plain, "latest", "kabuto/moved");
    let image = ImageReference::parse(&moved).expect("reference");
    let (digest, _) = client.manifest(&image).expect("manifest");
    skopeo_push(
        &dir.path().join("sig-owner"),
        "sig",
        &format!(
            "{}/{}:{}",
            image.registry,
            image.repository,
            signature_tag(&digest)
        ),
    );
    let e = kabuto_error::chain(&check(&moved, &mut client).expect_err("moved signature"));
    assert!(e.contains("kabuto/signed") && e.contains("not "), "{e}");

    // Scopes: an open repository, and the default.
    let open = registry.push_layout(&plain, "latest", "kabuto/open");
    check(&open, &mut client).expect("insecureAcceptAnything");
    let elsewhere = registry.push_layout(&plain, "latest", "other/img");
    let e = kabuto_error::chain(&check(&elsewhere, &mut client).expect_err("default reject"));
    assert!(
        e.contains("rejected by the signature policy (scope default)"),
        "{e}"
    );
}

/// A policy accepting any image whose repository the PEM key at `public`
/// signed in cosign's format.
fn repository_policy(public: &std::path::Path) -> SignaturePolicy {
    let key_data = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(public).expect("public key"));
    SignaturePolicy::from_json(
        serde_json::json!({"default": [{"type": "sigstoreSigned", "keyData": key_data,
                            "signedIdentity": {"type": "matchRepository"}}]})
        .to_string()
        .as_bytes(),
    )
    .expect("policy")
}

/// `kabuto-owner image sign` (the owner's tool) pushes a signature in cosign's
/// format (SIGNATURE_SPEC: OCI manifest at `sha256-<hex>.sig`, one
/// `application/vnd.dev.cosign.simplesigning.v1+json` layer whose
/// `dev.cosignproject.cosign/signature` annotation is the base64 ECDSA
/// signature of the payload) that the guest's policy accepts; `kabuto image
/// inspect` sees it and an image's encrypted layers.
#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn kabuto_owner_image_sign_makes_cosign_signatures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let plain = d.join("plain");
    kabuto_e2e::busybox_layout(&plain).expect("layout");
    let registry = kabuto_e2e::Registry::start();
    let reference = registry.push_layout(&plain, "latest", "owner/app");
    let (private, public) = kabuto_e2e::openssl_key_pair(d, "cosign", true);
    let kabuto = |args: &[&str]| {
        let out = std::process::Command::new(kabuto_e2e::paths().bin_dir.join("kabuto-owner"))
            .args(args)
            .output()
            .expect("kabuto-owner");
        assert!(
            out.status.success(),
            "kabuto {args:?}: {}",
            kabuto_e2e::stderr(&out)
        );
        kabuto_e2e::stdout(&out)
    };
    let key = private.to_string_lossy();
    let insecure = ["--insecure-registry", registry.host.as_str()];
    let mut sign = vec!["image", "sign", "--key", &key];
    sign.extend(insecure);
    sign.push(&reference);
    let out = kabuto(&sign);
    assert!(out.contains("signed "), "{out}");

    // The pushed signature, read as cosign's spec describes it.
    let image = ImageReference::parse(&reference).expect("reference");
    let mut client = RegistryClient::new(vec![registry.host.clone()], None);
    let (digest, _) = client.manifest(&image).expect("manifest");
    let sig = ImageReference {
        reference: signature_tag(&digest),
        ..image.clone()
    };
    let (_, manifest) = client.manifest(&sig).expect("signature manifest");
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let layer = &manifest["layers"][0];
    assert_eq!(
        layer["mediaType"],
        "application/vnd.dev.cosign.simplesigning.v1+json"
    );
    let payload = client
        .blob(
            &sig,
            layer["digest"].as_str().expect("digest"),
            "payload",
            1 << 20,
            None,
        )
        .expect("payload");
    let payload: serde_json::Value = serde_json::from_slice(&payload).expect("json");
    assert_eq!(
        payload["critical"]["type"],
        "cosign container image signature"
    );
    assert_eq!(
        payload["critical"]["image"]["docker-manifest-digest"],
        digest
    );
    assert_eq!(
        payload["critical"]["identity"]["docker-reference"],
        format!("{}/owner/app", registry.host)
    );
    assert!(layer["annotations"]["dev.cosignproject.cosign/signature"].is_string());

    let policy = repository_policy(&public);
    policy
        .check(&image, &digest, &mut client)
        .expect("signed by kabuto-owner image sign");

    let mut inspect = vec!["image", "inspect"];
    inspect.extend(insecure);
    inspect.push(&reference);
    let report: serde_json::Value = serde_json::from_str(&kabuto(&inspect)).expect("json");
    assert_eq!(report["manifest_digest"], digest);
    assert_eq!(report["cosign_signature"], sig.reference);
    assert_eq!(report["layers"][0]["encrypted"], false);

    let (_, rsa) = kabuto_e2e::openssl_key_pair(d, "rsa", false);
    let (_, ec) = kabuto_e2e::openssl_key_pair(d, "ec", true);
    kabuto_e2e::skopeo_encrypt(&plain, &d.join("enc"), &[&rsa, &ec]);
    let encrypted = registry.push_layout(&d.join("enc"), "latest", "owner/secret");
    let mut inspect = vec!["image", "inspect"];
    inspect.extend(insecure);
    inspect.push(&encrypted);
    let report: serde_json::Value = serde_json::from_str(&kabuto(&inspect)).expect("json");
    assert_eq!(report["layers"][0]["encrypted"], true);
    assert_eq!(report["layers"][0]["jwe_recipients"], 2);
    assert!(report["cosign_signature"].is_null());
}

/// A multi-platform image (an index): the signature covers the index
/// digest — what the reference names, as cosign signs it — and a guest pull
/// accepts it, then pulls the linux/amd64 manifest the index pins.
#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn signatures_of_an_index_cover_its_platform_image() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let layout = d.join("multi");
    kabuto_e2e::busybox_layout(&layout).expect("layout");
    // index.json → an image index → the linux/amd64 manifest.
    let index_path = layout.join("index.json");
    let mut outer: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).expect("index")).expect("json");
    let platform = outer["manifests"][0].clone();
    assert_ne!(
        platform["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let inner = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": platform["mediaType"], "digest": platform["digest"],
                       "size": platform["size"],
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    })
    .to_string();
    let image_tool = kabuto_e2e::LayoutImage::open(&layout).expect("open");
    let inner_digest = image_tool.write_blob(inner.as_bytes()).expect("blob");
    outer["manifests"][0] = serde_json::json!({
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": inner_digest, "size": inner.len(),
        "annotations": {"org.opencontainers.image.ref.name": "latest"}});
    std::fs::write(&index_path, outer.to_string()).expect("index");
    let registry = kabuto_e2e::Registry::start();
    let reference = format!("{}/owner/multi:latest", registry.host);
    kabuto_e2e::run_tool(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--all",
            "--dest-tls-verify=false",
            &format!("oci:{}:latest", layout.display()),
            &format!("docker://{reference}"),
        ],
    );

    let (private, public) = kabuto_e2e::openssl_key_pair(d, "cosign", true);
    let out = std::process::Command::new(kabuto_e2e::paths().bin_dir.join("kabuto-owner"))
        .args(["image", "sign", "--key"])
        .arg(&private)
        .args(["--insecure-registry", &registry.host, &reference])
        .output()
        .expect("kabuto-owner");
    assert!(out.status.success(), "{}", kabuto_e2e::stderr(&out));

    let image = ImageReference::parse(&reference).expect("reference");
    let mut client = RegistryClient::new(vec![registry.host.clone()], None);
    let resolved = client.resolve(&image).expect("resolve");
    // skopeo rewrites both on push (it compresses the layer): compare shapes.
    assert_ne!(
        resolved.top_digest, resolved.digest,
        "the tag names an index"
    );
    assert_eq!(
        resolved.manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let policy = repository_policy(&public);
    // The platform manifest itself carries no signature of its own.
    assert!(policy.check(&image, &resolved.digest, &mut client).is_err());
    let settings = kabuto_image::PullSettings {
        registries: kabuto_image::RegistriesConf::insecure(&[registry.host.as_str()]),
        signature_policy: Some(policy),
        ..Default::default()
    };
    let rootfs = d.join("rootfs");
    let pulled = kabuto_image::pull_and_unpack(&reference, &settings, &rootfs).expect("pull");
    assert_eq!(
        pulled.pinned,
        format!("{}/owner/multi@{}", registry.host, resolved.top_digest)
    );
    assert!(rootfs.join("bin/busybox").is_file());
}
