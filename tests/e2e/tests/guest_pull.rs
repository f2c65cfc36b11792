//! Confidential images through containerd and a real VM (software TEE):
//! the guest pulls from a local docker-registry, checks the signature
//! policy and decrypts layers with a key it got from `kabuto-kbs` after
//! attestation; the host passes only the image reference (`ctr run
//! --rootfs` with an empty directory: containerd fetches nothing).
//! Images encrypted by skopeo (RSA recipient; several recipients), a
//! GPG-signed image (skopeo `--sign-by`, lookaside store), a cosign-format
//! signed image, and refused ones: unsigned (both kinds), signed by a
//! stranger's GPG key, by a GPG key that later expired or was revoked, path escape,
//! corrupted layer, manifest that is not its digest, tampered HMAC, no
//! key for any recipient. Nothing partial remains in the guest (the same
//! container id pulls again), and the plaintext of the encrypted layer
//! never reaches a file the host can read.

use std::path::Path;

use base64::Engine as _;
use kabuto_e2e::confidential::{confidential_containerd, init_data_annotation, Kbs};
use kabuto_e2e::{
    files_containing, image_with, openssl_key_pair, skopeo_encrypt, skopeo_push, stderr, stdout,
    Containerd, LayoutImage, Registry, RUNTIME,
};
use kabuto_image::signature::{signature_tag, write_signature_layout};
use p256::pkcs8::EncodePublicKey as _;

/// Planted in the encrypted image's layer; must never appear on the host.
const MARKER: &str = "kabuto-plaintext-marker-5c1e0b7d93";
const POD: &str = "gpod";

fn member(image: &str) -> Vec<String> {
    [
        "--annotation".to_string(),
        "io.kubernetes.cri.container-type=container".into(),
        "--annotation".into(),
        format!("io.kubernetes.cri.sandbox-id={POD}"),
        "--annotation".into(),
        format!("{}={image}", kabuto_protocol::IMAGE_ANNOTATION),
    ]
    .to_vec()
}

/// `ctr run --rm --rootfs EMPTY` of `image` in the pod, pulled by the guest.
fn run_pulled(
    c: &Containerd,
    empty: &Path,
    id: &str,
    image: &str,
    args: &[&str],
) -> std::process::Output {
    let annotations = member(image);
    let mut all = vec!["run", "--rm", "--runtime", RUNTIME, "--rootfs"];
    all.extend(annotations.iter().map(String::as_str));
    all.push(empty.to_str().expect("utf-8"));
    all.push(id);
    all.extend_from_slice(args);
    c.ctr(&all)
}

/// A GPG key pair (RSA, sign only, no passphrase) in a new `gnupg` home;
/// returns the armored public key.
fn gpg_key(gnupg: &Path, user: &str) -> Vec<u8> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir(gnupg).expect("gnupg home");
    std::fs::set_permissions(gnupg, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let gpg = |args: &[&str]| gpg_in(gnupg, args);
    gpg(&[
        "--passphrase",
        "",
        "--quick-gen-key",
        user,
        "rsa2048",
        "sign",
        "never",
    ]);
    gpg(&["--armor", "--export"])
}

/// The fingerprint of the (only) key in `gnupg`.
fn gpg_fingerprint(gnupg: &Path) -> String {
    let listing = std::process::Command::new("gpg")
        .env("GNUPGHOME", gnupg)
        .args(["--batch", "--with-colons", "--list-secret-keys"])
        .output()
        .expect("gpg");
    stdout(&listing)
        .lines()
        .find_map(|l| l.strip_prefix("fpr:"))
        .map(|l| l.trim_matches(':').to_string())
        .expect("a fingerprint")
}

/// Runs gpg on `gnupg`, returning its output.
fn gpg_in(gnupg: &Path, args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("gpg")
        .env("GNUPGHOME", gnupg)
        .args(["--batch", "--quiet", "--yes"])
        .args(args)
        .output()
        .expect("gpg");
    assert!(out.status.success(), "gpg {args:?}: {}", stderr(&out));
    out.stdout
}

/// `skopeo copy --sign-by` of `layout` to `target`, with the key of
/// `gnupg`, the signature written to the lookaside store `lookaside`.
fn skopeo_sign_push(gnupg: &Path, lookaside: &Path, layout: &Path, target: &str) -> String {
    let fingerprint = gpg_fingerprint(gnupg);
    let registries_d = gnupg.with_extension("registries.d");
    std::fs::create_dir_all(&registries_d).expect("registries.d");
    std::fs::write(
        registries_d.join("default.yaml"),
        format!(
            "default-docker:\n  lookaside-staging: file://{}\n",
            lookaside.display()
        ),
    )
    .expect("registries.d");
    let out = std::process::Command::new("skopeo")
        .env("GNUPGHOME", gnupg)
        .args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--registries.d",
        ])
        .arg(&registries_d)
        .args(["--sign-by", &fingerprint])
        .arg(format!("oci:{}:latest", layout.display()))
        .arg(format!("docker://{target}"))
        .output()
        .expect("skopeo");
    assert!(out.status.success(), "skopeo --sign-by: {}", stderr(&out));
    target.to_string()
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn confidential_images_are_pulled_verified_and_decrypted_in_the_guest() {
    let work = tempfile::tempdir().expect("tempdir");
    let d = work.path();
    let registry = Registry::start();
    // Images keep the names they were pushed and signed under; the pod's
    // registries.conf sends the guest to 10.0.2.2 (the host's loopback
    // from QEMU's user network), after a mirror that is down.
    let port = registry.host.rsplit(':').next().expect("port").to_string();
    let dead_mirror = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let host = registry.host.clone();

    // Images.
    let app = image_with(
        d,
        "app",
        &[("srv/hello.txt", 0o644, b"hello from a plain image\n")],
        serde_json::json!({
            "Cmd": ["/bin/sh", "-c", "cat hello.txt; echo cwd=$(pwd) mode=$MODE"],
            "Env": ["PATH=/bin", "MODE=from-image"],
            "WorkingDir": "/srv",
        }),
    );
    let secret = image_with(
        d,
        "secret",
        &[("secret/marker.txt", 0o600, MARKER.as_bytes())],
        serde_json::json!({"Cmd": ["cat", "/secret/marker.txt"]}),
    );
    let escape = image_with(
        d,
        "escape",
        &[("../../escaped.txt", 0o644, b"out\n")],
        serde_json::json!({}),
    );
    let (_, rsa_pub) = openssl_key_pair(d, "rsa", false);
    let (_, stranger_pub) = openssl_key_pair(d, "stranger", true);
    skopeo_encrypt(&secret, &d.join("enc-rsa"), &[&rsa_pub]);
    skopeo_encrypt(&secret, &d.join("enc-multi"), &[&stranger_pub, &rsa_pub]);
    skopeo_encrypt(&secret, &d.join("enc-stranger"), &[&stranger_pub]);
    skopeo_encrypt(&secret, &d.join("enc-hmac"), &[&rsa_pub]);
    // Tampered HMAC: the manifest's public options name another HMAC.
    let mut tampered = LayoutImage::open(&d.join("enc-hmac")).expect("layout");
    for layer in tampered.manifest["layers"].as_array_mut().expect("layers") {
        let key = "org.opencontainers.image.enc.pubopts";
        if let Some(opts) = layer["annotations"][key].as_str() {
            let b64 = base64::engine::general_purpose::STANDARD;
            let mut pubopts: serde_json::Value =
                serde_json::from_slice(&b64.decode(opts).expect("pubopts")).expect("json");
            pubopts["hmac"] = serde_json::json!(b64.encode([7u8; 32]));
            layer["annotations"][key] = serde_json::json!(b64.encode(pubopts.to_string()));
        }
    }
    tampered.save().expect("save");

    let push = |layout: &Path, repo: &str| registry.push_layout(layout, "latest", repo);
    let plain = push(&app, "open/plain");
    let cosigned = push(&app, "signed/app");
    let unsigned = push(&app, "signed/unsigned");
    let enc_rsa = push(&d.join("enc-rsa"), "open/enc-rsa");
    let enc_multi = push(&d.join("enc-multi"), "open/enc-multi");
    let enc_stranger = push(&d.join("enc-stranger"), "open/enc-stranger");
    let enc_hmac = push(&d.join("enc-hmac"), "open/enc-hmac");
    let escaped = push(&escape, "open/escape");

    // The owner signs signed/app (cosign format).
    let owner = p256::ecdsa::SigningKey::random(&mut rand::thread_rng());
    let host_client = || kabuto_image::RegistryClient::new(vec![registry.host.clone()], None);
    let manifest_digest = |reference: &str| {
        let image = kabuto_image::ImageReference::parse(reference).expect("reference");
        host_client().manifest(&image).expect("manifest")
    };
    let (app_digest, _) = manifest_digest(&cosigned);
    let sig_layout = d.join("sig");
    write_signature_layout(
        &sig_layout,
        &format!("{host}/signed/app"),
        &app_digest,
        &owner,
    )
    .expect("signature");
    skopeo_push(
        &sig_layout,
        "sig",
        &format!(
            "{}/signed/app:{}",
            registry.host,
            signature_tag(&app_digest)
        ),
    );
    // Corrupt: a layer blob altered in the registry's storage. Wrong digest:
    // the stored manifest altered, then pulled by digest. Each image has a
    // layer of its own: the registry shares blobs between repositories.
    let corrupt_layout = image_with(
        d,
        "corrupt",
        &[("corrupt-me", 0o644, &[0x55u8; 4096][..])],
        serde_json::json!({}),
    );
    let corrupt = push(&corrupt_layout, "open/corrupt");
    let wrong_digest_layout = image_with(
        d,
        "wrong-digest",
        &[("unique", 0o644, b"a manifest no other image shares\n")],
        serde_json::json!({}),
    );
    let wrong_digest = push(&wrong_digest_layout, "open/wrong-digest");
    let (_, corrupt_manifest) = manifest_digest(&corrupt);
    let last = corrupt_manifest["layers"]
        .as_array()
        .and_then(|l| l.last())
        .and_then(|l| l["digest"].as_str())
        .expect("layer digest")
        .to_string();
    let stored = registry.blob_path(&last);
    let mut bytes = std::fs::read(&stored).expect("blob");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&stored, bytes).expect("corrupt");
    let (wd_digest, _) = manifest_digest(&wrong_digest);
    let stored = registry.blob_path(&wd_digest);
    let mut manifest = std::fs::read(&stored).expect("manifest blob");
    manifest.push(b'\n');
    std::fs::write(&stored, manifest).expect("alter manifest");
    let wrong_digest = format!("{host}/open/wrong-digest@{wd_digest}");

    // GPG simple signing by skopeo --sign-by (signatures to a lookaside
    // store served over HTTP): the owner's key, and a stranger's.
    let gpg_owner_key = gpg_key(&d.join("gnupg-owner"), "Owner <owner@kabuto.invalid>");
    gpg_key(
        &d.join("gnupg-stranger"),
        "Stranger <stranger@kabuto.invalid>",
    );
    let lookaside = d.join("lookaside");
    let gpg_app = skopeo_sign_push(
        &d.join("gnupg-owner"),
        &lookaside,
        &app,
        &format!("{host}/gpg/app:latest"),
    );
    let gpg_stranger = skopeo_sign_push(
        &d.join("gnupg-stranger"),
        &lookaside,
        &app,
        &format!("{host}/gpg/stranger:latest"),
    );
    let gpg_unsigned = push(&app, "gpg/unsigned");
    // Keys that signed while valid, then expired / were revoked (the
    // revocation certificate gpg made at key generation, imported).
    let mut gpg_later_invalid = Vec::new();
    for name in ["expired", "revoked"] {
        let home = d.join(format!("gnupg-{name}"));
        gpg_key(&home, &format!("{name} <{name}@kabuto.invalid>"));
        let image = skopeo_sign_push(
            &home,
            &lookaside,
            &app,
            &format!("{host}/gpg/{name}:latest"),
        );
        let fpr = gpg_fingerprint(&home);
        if name == "expired" {
            gpg_in(&home, &["--quick-set-expire", &fpr, "seconds=1"]);
        } else {
            let cert = std::fs::read_to_string(home.join(format!("openpgp-revocs.d/{fpr}.rev")))
                .expect("revocation certificate");
            // gpg guards the certificate against accidental import with ':'.
            let cert = cert.replace(
                ":-----BEGIN PGP PUBLIC KEY BLOCK-----",
                "-----BEGIN PGP PUBLIC KEY BLOCK-----",
            );
            std::fs::write(home.join("revoke.asc"), cert).expect("write");
            gpg_in(
                &home,
                &["--import", home.join("revoke.asc").to_str().expect("utf-8")],
            );
        }
        gpg_later_invalid.push((name, image, gpg_in(&home, &["--armor", "--export"])));
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    let lookaside_server = kabuto_e2e::FileServer::start(&lookaside);

    // A registry that wants credentials; the guest gets them (auth.json)
    // from the KBS. Named `localhost:…`, the same registry gets wrong ones.
    let private_registry = Registry::start_with(Some(("owner", "s3cret")));
    let private_host = private_registry.host.clone();
    let private_port = private_host.rsplit(':').next().expect("port").to_string();
    let private_app = private_registry.push_layout(&app, "latest", "private/app");
    let wrong_name = private_app.replace("127.0.0.1", "localhost");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let auth_json = serde_json::json!({"auths": {
        private_host.clone(): {"auth": b64("owner:s3cret")},
        format!("localhost:{private_port}"): {"auth": b64("owner:not-the-password")},
    }});

    // The KBS: the decryption key and the signature policy, released only
    // to this attested pod.
    let kbs_dir = d.join("kbs");
    std::fs::create_dir(&kbs_dir).expect("kbs dir");
    let kbs = Kbs::start(&kbs_dir);
    let key_data = base64::engine::general_purpose::STANDARD.encode(
        owner
            .verifying_key()
            .to_public_key_pem(Default::default())
            .expect("pem"),
    );
    let policy = serde_json::json!({
        "default": [{"type": "reject"}],
        "transports": {"docker": {
            // cosign signs the repository, not a tag: podman's advice.
            format!("{host}/signed"): [{"type": "sigstoreSigned", "keyData": key_data,
                                        "signedIdentity": {"type": "matchRepository"}}],
            format!("{host}/gpg"): [{"type": "signedBy", "keyType": "GPGKeys",
                                     "keyPath": "kbs:///default/gpg-key/1"}],
            format!("{host}/gpg/expired"): [{"type": "signedBy", "keyType": "GPGKeys",
                                     "keyPath": "kbs:///default/gpg-key/expired"}],
            format!("{host}/gpg/revoked"): [{"type": "signedBy", "keyType": "GPGKeys",
                                     "keyPath": "kbs:///default/gpg-key/revoked"}],
            format!("{host}/open"): [{"type": "insecureAcceptAnything"}],
            private_host.clone(): [{"type": "insecureAcceptAnything"}],
            format!("localhost:{private_port}"): [{"type": "insecureAcceptAnything"}],
        }}
    });
    kbs.admin
        .set_resource("default/image-policy/1", policy.to_string().as_bytes())
        .expect("policy");
    kbs.admin
        .set_resource(
            "default/image-key/rsa",
            &std::fs::read(d.join("rsa.pem")).expect("rsa.pem"),
        )
        .expect("key");
    kbs.admin
        .set_resource("default/gpg-key/1", &gpg_owner_key)
        .expect("gpg key");
    for (name, _, key) in &gpg_later_invalid {
        kbs.admin
            .set_resource(&format!("default/gpg-key/{name}"), key)
            .expect("gpg key");
    }
    kbs.admin
        .set_resource("default/registry-auth/1", auth_json.to_string().as_bytes())
        .expect("credentials");
    let extra = format!(
        "\"cdh.toml\" = '''\n[image]\nimage_security_policy_uri = \"kbs:///default/image-policy/1\"\n\
         registry_configuration_uri = \"initdata:///registries.conf\"\n\
         sigstore_config_uri = \"initdata:///sigstore.yaml\"\n\
         authenticated_registry_credentials_uri = \"kbs:///default/registry-auth/1\"\n\
         image_decryption_key_uris = [\"kbs:///default/image-key/rsa\"]\n'''\n\
         \"registries.conf\" = '''\n[[registry]]\nprefix = \"{host}\"\nlocation = \"10.0.2.2:{port}\"\ninsecure = true\n\
         [[registry.mirror]]\nlocation = \"10.0.2.2:{dead_mirror}\"\ninsecure = true\n\
         [[registry]]\nprefix = \"{private_host}\"\nlocation = \"10.0.2.2:{private_port}\"\ninsecure = true\n\
         [[registry]]\nprefix = \"localhost:{private_port}\"\nlocation = \"10.0.2.2:{private_port}\"\ninsecure = true\n'''\n\
         \"sigstore.yaml\" = '''\ndocker:\n  {host}/gpg:\n    lookaside: http://10.0.2.2:{}\n'''\n",
        lookaside_server.port
    );
    let doc = kbs.init_data(kabuto_policy::ALLOW_ALL, &extra);
    let swtee = d.join("swtee");
    let c = confidential_containerd(&swtee, "image_pull = \"guest\"\n", Vec::new());
    kbs.trust(&c, &swtee, &[&doc]);

    // The pod: its pause-like sandbox container from the host's image.
    let annotation = init_data_annotation(&doc);
    c.run_detached(
        POD,
        &[
            // The guest reaches the KBS and the registry over the host's
            // network (QEMU's user networking in the pod's namespace).
            "--net-host",
            "--annotation",
            "io.kubernetes.cri.container-type=sandbox",
            "--annotation",
            &format!("io.kubernetes.cri.sandbox-id={POD}"),
            "--annotation",
            &annotation,
        ],
        &["sleep", "1000"],
    );
    let empty = d.join("empty-rootfs");
    std::fs::create_dir(&empty).expect("empty rootfs");
    let ok = |id: &str, image: &str, args: &[&str]| {
        let out = run_pulled(&c, &empty, id, image, args);
        assert!(
            out.status.success(),
            "{image}: {}\n{}\nKBS log:\n{}",
            stderr(&out),
            stdout(&out),
            kbs.log()
        );
        stdout(&out)
    };

    // Plain: the image config applies (Cmd, Env, WorkingDir).
    let out = ok("plain", &plain, &[]);
    assert!(out.contains("hello from a plain image"), "{out}");
    assert!(out.contains("cwd=/srv mode=from-image"), "{out}");
    // Signed by the owner's key; args from the command line.
    assert_eq!(
        ok("cosigned", &cosigned, &["cat", "/srv/hello.txt"]),
        "hello from a plain image\n"
    );
    // From a registry that wants credentials (they came from the KBS).
    assert_eq!(
        ok("private", &private_app, &["cat", "/srv/hello.txt"]),
        "hello from a plain image\n"
    );
    // GPG-signed by the owner (skopeo --sign-by), read from the lookaside.
    assert_eq!(
        ok("gpg", &gpg_app, &["cat", "/srv/hello.txt"]),
        "hello from a plain image\n"
    );
    // Encrypted by skopeo: to our RSA key; to a stranger and to us.
    assert_eq!(ok("enc-rsa", &enc_rsa, &[]), MARKER);
    assert_eq!(ok("enc-multi", &enc_multi, &[]), MARKER);

    // Each refused with its cause; then the same id pulls a good image, so
    // nothing of the failed pull remained in the guest.
    for (id, image, needle) in [
        (
            "unsigned",
            unsigned.as_str(),
            "no valid signature (scope 127.0.0.1",
        ),
        (
            "gpg-unsigned",
            gpg_unsigned.as_str(),
            "no signatures at http://10.0.2.2",
        ),
        (
            "gpg-stranger",
            gpg_stranger.as_str(),
            "not signed by a key of the policy",
        ),
        ("gpg-expired", gpg_later_invalid[0].1.as_str(), "expired at"),
        ("gpg-revoked", gpg_later_invalid[1].1.as_str(), "is revoked"),
        (
            "wrong-credentials",
            wrong_name.as_str(),
            "401: the credentials were refused",
        ),
        (
            "stranger",
            enc_stranger.as_str(),
            "none of the 1 decryption key(s) opens its key",
        ),
        (
            "hmac",
            enc_hmac.as_str(),
            "HMAC does not match: the layer was altered",
        ),
        ("escape", escaped.as_str(), "../../escaped.txt"),
        (
            "corrupt",
            corrupt.as_str(),
            "the registry sent content with digest",
        ),
        ("wrong-digest", wrong_digest.as_str(), "manifest sha256:"),
    ] {
        let out = run_pulled(&c, &empty, id, image, &["true"]);
        assert!(!out.status.success(), "{image} ran: {}", stdout(&out));
        let err = stderr(&out);
        assert!(
            err.contains("guest image pull") && err.contains(needle),
            "{image}: {err}"
        );
        let again = ok(id, &plain, &["cat", "/srv/hello.txt"]);
        assert_eq!(again, "hello from a plain image\n", "{id}");
    }
    // A container of a guest-pull pod that names no image is refused.
    let pod_only = member("x");
    let mut no_image = vec!["run", "--rm", "--runtime", RUNTIME, "--rootfs"];
    no_image.extend(pod_only[..4].iter().map(String::as_str));
    let e = empty.to_string_lossy().into_owned();
    no_image.extend([e.as_str(), "noimage", "true"]);
    let out = c.ctr(&no_image);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(kabuto_protocol::IMAGE_ANNOTATION),
        "{}",
        stderr(&out)
    );

    // The plaintext never reached the host: not in containerd's root and
    // state, kabuto's state (console log included), nor any log. The scan
    // does find it where it is (the layout the test built).
    let host_dirs = [c.dir.path(), kbs.dir.as_path(), registry.storage()];
    let leaks = files_containing(&host_dirs, MARKER.as_bytes());
    assert!(leaks.is_empty(), "plaintext on the host: {leaks:?}");
    assert!(!files_containing(&[&secret], MARKER.as_bytes()).is_empty());
    assert!(!Path::new("/escaped.txt").exists());

    c.kill_and_delete(POD);
    c.assert_no_residue();
    let leaks = files_containing(&[c.dir.path()], MARKER.as_bytes());
    assert!(leaks.is_empty(), "plaintext on the host: {leaks:?}");
}
