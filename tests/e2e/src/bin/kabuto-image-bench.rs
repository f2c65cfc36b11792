//! Pull + decrypt + unpack of an encrypted image with kabuto's guest image
//! library against `skopeo copy --decryption-key` of the same image, both
//! on this host, from a local docker-registry; 5 MB and 100 MB images of
//! incompressible content plus busybox-static as /bin/true (one gzip
//! layer, RSA-encrypted by skopeo).
//!
//! With `--in-guest`, the same images are also pulled by the agent inside
//! a confidential pod (software TEE, through containerd, the key from
//! `kabuto-kbs` after attestation); the agent's own phase timings are read
//! from the guest console. Needs KABUTO_E2E_BIN_DIR / KABUTO_E2E_GUEST_DIR
//! (scripts/bench.sh sets them).
//!
//! Usage: kabuto-image-bench [--runs N] [--in-guest]
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
    // Something for the container to run in the in-guest rows (busybox
    // runs as the applet its name says).
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o755);
    h.set_size(busybox.len() as u64);
    h.set_mtime(0);
    tar.append_data(&mut h, "bin/true", busybox.as_slice())
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
    let mut pushed = Vec::new();

    println!("| image (encrypted, 1 gzip layer) | skopeo copy --decryption-key to an OCI dir (baseline) | kabuto: pull + decrypt + unpack | pull | decrypt (HMAC, AES-CTR, digest) | unpack (gunzip, tar) | ratio |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (label, size) in [("5 MB", 5 << 20), ("100 MB", 100 << 20)] {
        let plain = d.join(format!("plain-{size}"));
        make_image(&plain, size);
        let enc = d.join(format!("enc-{size}"));
        kabuto_e2e::skopeo_encrypt(&plain, &enc, &[&public]);
        let reference = registry.push_layout(&enc, "latest", &format!("bench/img{size}"));
        pushed.push((label, reference.clone(), Duration::ZERO));

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
        if let Some(last) = pushed.last_mut() {
            last.2 = s;
        }
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
    if args.iter().any(|a| a == "--in-guest") {
        in_guest(&registry, &pushed, &private, runs);
    }
}

/// The agent's phase timings from its log line for `container`.
fn agent_timings(console: &str, container: &str) -> Option<Vec<u64>> {
    let line = console
        .lines()
        .rev()
        .find(|l| l.contains(&format!("container {container}: pulled ")))?;
    // "… in T ms (settings+keys S ms, manifest+signatures M ms, fetch F ms,
    // decrypt D ms, unpack U ms; peak agent RSS R MiB)": the seven numbers
    // after the last " in " (the reference before it has digits too).
    let tail = &line[line.rfind(" in ")? + 4..];
    let numbers: Vec<u64> = tail
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse().unwrap_or(0))
        .collect();
    (numbers.len() >= 7).then(|| numbers[..7].to_vec())
}

/// The same encrypted images pulled by the agent of a confidential pod.
fn in_guest(
    registry: &kabuto_e2e::Registry,
    images: &[(&str, String, Duration)],
    private_key: &Path,
    runs: usize,
) {
    use kabuto_e2e::confidential::{confidential_containerd_with, init_data_annotation, Kbs};
    let work = tempfile::tempdir().expect("tempdir");
    let d = work.path();
    let port = registry.host.rsplit(':').next().expect("port");
    // The layers' size in the registry (encrypted, compressed).
    let blob_mib = |reference: &str| -> u64 {
        let image = kabuto_image::ImageReference::parse(reference).expect("reference");
        let (_, manifest) = RegistryClient::new(vec![registry.host.clone()], None)
            .manifest(&image)
            .expect("manifest");
        manifest["layers"].as_array().map_or(0, |layers| {
            layers
                .iter()
                .filter_map(|l| l["size"].as_u64())
                .sum::<u64>()
        }) >> 20
    };
    let kbs_dir = d.join("kbs");
    std::fs::create_dir(&kbs_dir).expect("kbs dir");
    let kbs = Kbs::start(&kbs_dir);
    kbs.admin
        .set_resource(
            "default/image-key/bench",
            &std::fs::read(private_key).expect("key"),
        )
        .expect("key");
    let extra = format!(
        "\"cdh.toml\" = '''\n[image]\nregistry_configuration_uri = \"initdata:///registries.conf\"\n\
         image_decryption_key_uris = [\"kbs:///default/image-key/bench\"]\n'''\n\
         \"registries.conf\" = '''\n[[registry]]\nprefix = \"{}\"\nlocation = \"10.0.2.2:{port}\"\ninsecure = true\n'''\n",
        registry.host
    );
    let doc = kbs.init_data(kabuto_policy::ALLOW_ALL, &extra);
    let swtee = d.join("swtee");
    // The pull holds blobs in memory (no streaming yet): room for 100 MB.
    let c = confidential_containerd_with(
        &swtee,
        "memory_mib = 2048\n",
        "image_pull = \"guest\"\n",
        Vec::new(),
    );
    kbs.trust(&c, &swtee, &[&doc]);
    let pod = "benchpod";
    c.run_detached(
        pod,
        &[
            "--annotation",
            "io.kubernetes.cri.container-type=sandbox",
            "--annotation",
            &format!("io.kubernetes.cri.sandbox-id={pod}"),
            "--annotation",
            &init_data_annotation(&doc),
        ],
        &["sleep", "100000"],
    );
    let empty = d.join("empty");
    std::fs::create_dir(&empty).expect("empty");
    let console = c.sandbox_dir(pod).join("console.log");

    println!("\n| image (encrypted, 1 gzip layer) | host: skopeo copy --decryption-key (baseline) | guest: pull + decrypt + unpack (agent) | settings + key from KBS | manifest | fetch (user-mode net) | decrypt | unpack | ctr run, total | ratio to host | peak agent RSS during the pull (blob size) |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (label, reference, host) in images {
        let mut rows: Vec<Vec<u64>> = Vec::new();
        let mut totals = Vec::new();
        for r in 0..runs {
            let id = format!("pull-{}-{r}", label.replace(' ', ""));
            let started = Instant::now();
            let out = c.ctr(&[
                "run",
                "--rm",
                "--runtime",
                kabuto_e2e::RUNTIME,
                "--rootfs",
                "--annotation",
                "io.kubernetes.cri.container-type=container",
                "--annotation",
                &format!("io.kubernetes.cri.sandbox-id={pod}"),
                "--annotation",
                &format!("{}={reference}", kabuto_protocol::IMAGE_ANNOTATION),
                empty.to_str().expect("utf-8"),
                &id,
                "true",
            ]);
            totals.push(started.elapsed());
            assert!(
                out.status.success(),
                "guest pull of {reference}: {}",
                kabuto_e2e::stderr(&out)
            );
            let log = std::fs::read_to_string(&console).unwrap_or_default();
            rows.push(
                agent_timings(&log, &id).expect("the agent's pull timings in the console log"),
            );
        }
        let median_of = |i: usize| {
            let mut v: Vec<u64> = rows.iter().map(|r| r[i]).collect();
            v.sort();
            v[v.len() / 2]
        };
        let total = median_of(0);
        println!(
            "| {label} | {} | {total} ms | {} ms | {} ms | {} ms | {} ms | {} ms | {} | {:.2}× | {} MiB ({} MiB) |",
            ms(*host),
            median_of(1),
            median_of(2),
            median_of(3),
            median_of(4),
            median_of(5),
            ms(median(totals)),
            total as f64 / (host.as_secs_f64() * 1e3),
            median_of(6),
            blob_mib(reference)
        );
    }
    println!(
        "\nmedian of {runs} runs; the guest: 1 vCPU under TCG, 2048 MiB, registry reached through QEMU user-mode networking"
    );
    c.kill_and_delete(pod);
}
