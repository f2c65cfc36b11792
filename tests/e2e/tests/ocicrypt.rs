//! Interop with the Go ocicrypt implementation: images encrypted by Debian's
//! skopeo (`--encryption-key jwe:…`) with keys made by openssl — RSA alone,
//! and EC + RSA recipients on one image — decrypt with `kabuto-image` to the
//! exact plain layers; another key opens nothing; an altered blob is
//! refused before decryption.

use std::{io::Read, path::Path};

use kabuto_e2e::{openssl_key_pair, skopeo_encrypt};

use kabuto_image::{decrypt_layer, DecryptError, LayerDescriptor};
use kabuto_jose::TeeKeyPair;

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json")
}

/// The layer descriptors of the image tagged `latest` in `layout`.
fn layers(layout: &Path) -> Vec<serde_json::Value> {
    let index = json(&layout.join("index.json"));
    let digest = index["manifests"][0]["digest"].as_str().expect("digest");
    let manifest = json(&layout.join("blobs/sha256").join(&digest[7..]));
    manifest["layers"].as_array().cloned().expect("layers")
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    std::fs::read(layout.join("blobs/sha256").join(&digest[7..])).expect("blob")
}

fn key(dir: &Path, name: &str) -> TeeKeyPair {
    TeeKeyPair::from_pem(&std::fs::read_to_string(dir.join(name)).expect("pem")).expect("key")
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn layers_encrypted_by_skopeo_decrypt_to_the_plain_layers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let plain = d.join("plain");
    kabuto_e2e::busybox_layout(&plain).expect("layout");
    let (_, rsa) = openssl_key_pair(d, "rsa", false);
    let (_, ec) = openssl_key_pair(d, "ec", true);
    openssl_key_pair(d, "other", false);
    skopeo_encrypt(&plain, &d.join("enc-rsa"), &[&rsa]);
    skopeo_encrypt(&plain, &d.join("enc-multi"), &[&ec, &rsa]);

    let plain_layers = layers(&plain);
    for (image, keys) in [
        ("enc-rsa", vec!["rsa.pem"]),
        ("enc-multi", vec!["ec.pem", "rsa.pem"]),
    ] {
        let layout = d.join(image);
        let encrypted = layers(&layout);
        assert_eq!(encrypted.len(), plain_layers.len());
        for (enc, plain_desc) in encrypted.iter().zip(&plain_layers) {
            let descriptor: LayerDescriptor =
                serde_json::from_value(enc.clone()).expect("descriptor");
            assert!(
                descriptor.is_encrypted(),
                "{image}: {}",
                descriptor.media_type
            );
            // skopeo compresses an uncompressed layer before encrypting it.
            assert_eq!(
                descriptor.decrypted_media_type(),
                "application/vnd.oci.image.layer.v1.tar+gzip"
            );
            let ciphertext = blob(&layout, &descriptor.digest);
            let expected = blob(&plain, plain_desc["digest"].as_str().expect("digest"));
            // Each recipient's key alone opens the layer.
            for k in &keys {
                let plaintext = decrypt_layer(&descriptor, ciphertext.clone(), &[key(d, k)])
                    .unwrap_or_else(|e| panic!("{image} with {k}: {e}"));
                let mut tar = Vec::new();
                flate2::read::GzDecoder::new(plaintext.as_slice())
                    .read_to_end(&mut tar)
                    .expect("the decrypted layer is gzip");
                assert!(tar == expected, "{image} with {k}: not the plain layer");
            }
            let e = decrypt_layer(&descriptor, ciphertext.clone(), &[key(d, "other.pem")])
                .expect_err("another key");
            assert!(matches!(e, DecryptError::NoKey { .. }), "{e}");
            let mut altered = ciphertext.clone();
            let last = altered.len() - 1;
            altered[last] ^= 0x80;
            let e =
                decrypt_layer(&descriptor, altered, &[key(d, keys[0])]).expect_err("altered blob");
            assert!(matches!(e, DecryptError::Hmac { .. }), "{e}");
        }
    }
}

/// The guest's pull path end to end, on the host: pull from a real registry
/// (docker-registry, images pushed by skopeo), decrypt, unpack; a corrupted
/// blob in the registry's storage is refused by its digest.
#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn pull_decrypt_and_unpack_from_a_registry() {
    use kabuto_image::{unpack_layers, ImageReference, Layer, RegistryClient, UnpackOptions};
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let plain = d.join("plain");
    kabuto_e2e::busybox_layout(&plain).expect("layout");
    let (_, rsa) = openssl_key_pair(d, "rsa", false);
    skopeo_encrypt(&plain, &d.join("enc"), &[&rsa]);
    let registry = kabuto_e2e::Registry::start();
    let plain_ref = registry.push_layout(&plain, "latest", "kabuto/plain");
    let enc_ref = registry.push_layout(&d.join("enc"), "latest", "kabuto/encrypted");
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox");

    let mut client = RegistryClient::new(vec![registry.host.clone()], None);
    for (reference, keys) in [(&plain_ref, vec![]), (&enc_ref, vec![key(d, "rsa.pem")])] {
        let image = ImageReference::parse(reference).expect("reference");
        let pulled = client.pull(&image).expect("pull");
        assert_eq!(
            pulled.layers.iter().any(|(d, _)| d.is_encrypted()),
            !keys.is_empty()
        );
        let plain_layers = pulled
            .plain_layers(&keys)
            .unwrap_or_else(|e| panic!("{reference}: {e}"));
        let layers: Vec<Layer<'_>> = plain_layers.iter().map(|l| l.as_layer()).collect();
        let root = d.join(format!("rootfs-{}", image.repository.replace('/', "-")));
        unpack_layers(&layers, &root, UnpackOptions::default()).expect("unpack");
        assert!(
            std::fs::read(root.join("bin/busybox")).expect("bin/busybox") == busybox,
            "{reference}: the unpacked busybox is the original"
        );
        assert_eq!(
            std::fs::read_link(root.join("bin/sh")).expect("bin/sh"),
            Path::new("busybox")
        );
    }

    // A digest the registry does not have.
    let missing = ImageReference::parse(&format!(
        "{}/kabuto/plain@sha256:{}",
        registry.host,
        "0".repeat(64)
    ))
    .expect("reference");
    let e = client.pull(&missing).expect_err("unknown manifest");
    let e = kabuto_error::chain(&e);
    assert!(e.contains("404"), "{e}");

    // A layer corrupted in the registry's storage: refused by its digest.
    let image = ImageReference::parse(&plain_ref).expect("reference");
    let (_, manifest) = client.manifest(&image).expect("manifest");
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .expect("layer digest")
        .to_string();
    let stored = registry.blob_path(&layer);
    let mut bytes = std::fs::read(&stored).expect("stored blob");
    bytes[100] ^= 0xff;
    std::fs::write(&stored, bytes).expect("corrupt");
    let e = client.pull(&image).expect_err("corrupted layer");
    assert!(
        e.to_string().contains(&format!(
            "layer {layer}: the registry sent content with digest"
        )),
        "{e}"
    );
}
