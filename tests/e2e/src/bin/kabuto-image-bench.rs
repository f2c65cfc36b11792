//! Pull + decrypt + unpack of an encrypted image with kabuto's guest image
//! library against `skopeo copy --decryption-key` of the same image, both
//! on this host, from a local docker-registry; 5 MB and 100 MB images of
//! incompressible content (one gzip layer, RSA-encrypted by skopeo).
//!
//! Usage: kabuto-image-bench [--runs N]
//! Needs skopeo, docker-registry, openssl (scripts/setup.sh installs them).

use std::{
    io::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use kabuto_image::{unpack_layers, ImageReference, Layer, RegistryClient};
use sha2::{Digest, Sha256};

/// An OCI layout with one gzip layer holding `size` bytes of pseudo-random
/// (incompressible) data in `data/blob`.
fn make_image(dir: &Path, size: usize) {
    let mut data = vec![0u8; size];
    let mut state = Sha256::digest(b"kabuto-image-bench");
    for chunk in data.chunks_mut(32) {
        state = Sha256::digest(state);
        chunk.copy_from_slice(&state[..chunk.len()]);
    }
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o644);
    h.set_size(size as u64);
    h.set_mtime(0);
    tar.append_data(&mut h, "data/blob", data.as_slice())
        .expect("tar");
    let tar = tar.into_inner().expect("tar");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip");
    let layer = gz.finish().expect("gzip");
    let digest = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
    std::fs::create_dir_all(dir.join("blobs/sha256")).expect("layout");
    let put = |b: &[u8]| {
        let d = digest(b);
        std::fs::write(dir.join("blobs/sha256").join(&d[7..]), b).expect("blob");
        d
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [digest(&tar)]},
    }))
    .expect("config");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(&layer), "size": layer.len()}],
    }))
    .expect("manifest");
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(&manifest),
        "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
    std::fs::write(dir.join("index.json"), index.to_string()).expect("index");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("layout");
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(3usize);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (private, public) = kabuto_e2e::openssl_key_pair(d, "key", false);
    let key = kabuto_jose::TeeKeyPair::from_pem(&std::fs::read_to_string(&private).expect("key"))
        .expect("key");
    let registry = kabuto_e2e::Registry::start();

    println!("| image (encrypted, 1 gzip layer) | skopeo copy --decryption-key to an OCI dir (baseline) | kabuto: pull + decrypt + unpack | pull | decrypt (HMAC, AES-CTR, digest) | unpack (gunzip, tar) | ratio |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (label, size) in [("5 MB", 5 << 20), ("100 MB", 100 << 20)] {
        let plain = d.join(format!("plain-{size}"));
        make_image(&plain, size);
        let enc = d.join(format!("enc-{size}"));
        kabuto_e2e::skopeo_encrypt(&plain, &enc, &[&public]);
        let reference = registry.push_layout(&enc, "latest", &format!("bench/img{size}"));

        let mut skopeo = Vec::new();
        let (mut pull, mut decrypt, mut unpack, mut total) = (vec![], vec![], vec![], vec![]);
        for r in 0..runs {
            let out = d.join(format!("skopeo-out-{size}-{r}"));
            let started = Instant::now();
            kabuto_e2e::run_tool(
                "skopeo",
                &[
                    "copy",
                    "--quiet",
                    "--src-tls-verify=false",
                    "--decryption-key",
                    &private.to_string_lossy(),
                    &format!("docker://{reference}"),
                    &format!("oci:{}:latest", out.display()),
                ],
            );
            skopeo.push(started.elapsed());
            let _ = std::fs::remove_dir_all(&out);

            let started = Instant::now();
            let mut client = RegistryClient::new(vec![registry.host.clone()], None);
            let pulled = client
                .pull(&ImageReference::parse(&reference).expect("reference"))
                .expect("pull");
            let pulled_at = started.elapsed();
            let plain_layers = pulled
                .plain_layers(std::slice::from_ref(&key))
                .expect("decrypt");
            let decrypted_at = started.elapsed();
            let layers: Vec<Layer<'_>> = plain_layers.iter().map(|l| l.as_layer()).collect();
            let root = d.join(format!("rootfs-{size}-{r}"));
            unpack_layers(&layers, &root, Default::default()).expect("unpack");
            let done = started.elapsed();
            assert_eq!(
                std::fs::metadata(root.join("data/blob"))
                    .expect("unpacked")
                    .len(),
                size as u64
            );
            let _ = std::fs::remove_dir_all(&root);
            pull.push(pulled_at);
            decrypt.push(decrypted_at - pulled_at);
            unpack.push(done - decrypted_at);
            total.push(done);
        }
        let (s, t) = (median(skopeo), median(total));
        println!(
            "| {label} | {} | {} | {} | {} | {} | {:.2}× |",
            ms(s),
            ms(t),
            ms(median(pull)),
            ms(median(decrypt)),
            ms(median(unpack)),
            t.as_secs_f64() / s.as_secs_f64()
        );
    }
    println!(
        "\nmedian of {runs} runs; both sides on this host against docker-registry on loopback"
    );
}
