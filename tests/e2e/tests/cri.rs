//! Kubernetes' path, without a kubelet: a CRI v1 client drives containerd
//! 1.6's own CRI plugin, which unpacks images with `kabuto-snapshotter`.
//! A pod of the kabuto runtime class (software TEE) runs an image skopeo
//! encrypted: CRI's PullImage succeeds although the host cannot decrypt
//! it — the snapshotter leaves its layers to the guest, so containerd
//! never even fetches them — and the guest pulls and decrypts it with a
//! key from the KBS. An image encrypted to someone else is refused by the
//! guest; a plain image sharing the encrypted one's layers is refused by
//! the snapshotter (its rootfs would have holes). A runc pod on the same
//! containerd runs a plain image the snapshotter unpacked on the host (its
//! overlay path), and containerd's GC removes what the pods left.

use std::collections::HashMap;
use std::time::Duration;

use kabuto_e2e::confidential::{confidential_options, Kbs};
use kabuto_e2e::cri::{Cri, Snapshotter};
use kabuto_e2e::{
    files_containing, image_with, openssl_key_pair, skopeo_encrypt, tar_of, Containerd,
    LayoutImage, Registry, NEEDS_ENV,
};

const MARKER: &str = "kabuto-cri-plaintext-marker-9a41c3";

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn cri_runs_encrypted_images_in_the_guest_and_plain_ones_from_the_host() {
    let _ = NEEDS_ENV;
    let work = tempfile::tempdir().expect("tempdir");
    let d = work.path();
    let registry = Registry::start();
    let host = registry.host.clone();
    let port = host.rsplit(':').next().expect("port").to_string();

    let pause = image_with(
        d,
        "pause",
        &[],
        serde_json::json!({"Cmd": ["sleep", "1000000"]}),
    );
    let app = image_with(
        d,
        "app",
        &[("srv/hello.txt", 0o644, b"hello from a plain image\n")],
        serde_json::json!({"Cmd": ["cat", "/srv/hello.txt"]}),
    );
    let secret = image_with(
        d,
        "secret",
        &[("secret/marker.txt", 0o600, MARKER.as_bytes())],
        serde_json::json!({"Cmd": ["cat", "/secret/marker.txt"]}),
    );
    let (_, rsa_pub) = openssl_key_pair(d, "rsa", false);
    let (_, stranger_pub) = openssl_key_pair(d, "stranger", true);
    skopeo_encrypt(&secret, &d.join("enc"), &[&rsa_pub]);
    skopeo_encrypt(&secret, &d.join("enc-stranger"), &[&stranger_pub]);
    let sandbox_image = registry.push_layout(&pause, "latest", "k8s/pause");
    let plain = registry.push_layout(&app, "latest", "open/app");
    let encrypted = registry.push_layout(&d.join("enc"), "latest", "open/enc");
    let stranger = registry.push_layout(&d.join("enc-stranger"), "latest", "open/enc-stranger");
    let encrypted_layers: Vec<String> = LayoutImage::open(&d.join("enc")).expect("layout").manifest
        ["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .filter(|l| {
            l["mediaType"]
                .as_str()
                .is_some_and(|m| m.ends_with("+encrypted"))
        })
        .map(|l| l["digest"].as_str().expect("digest").to_string())
        .collect();
    assert!(!encrypted_layers.is_empty());

    let kbs_dir = d.join("kbs");
    std::fs::create_dir(&kbs_dir).expect("kbs dir");
    let kbs = Kbs::start(&kbs_dir);
    kbs.admin
        .set_resource(
            "default/image-key/rsa",
            &std::fs::read(d.join("rsa.pem")).expect("rsa.pem"),
        )
        .expect("key");
    let extra = format!(
        "\"cdh.toml\" = '''\n[image]\nregistry_configuration_uri = \"initdata:///registries.conf\"\n\
         image_decryption_key_uris = [\"kbs:///default/image-key/rsa\"]\n'''\n\
         \"registries.conf\" = '''\n[[registry]]\nprefix = \"{host}\"\nlocation = \"10.0.2.2:{port}\"\ninsecure = true\n'''\n"
    );
    let doc = kbs.init_data(kabuto_policy::ALLOW_ALL, &extra);

    let swtee = d.join("swtee");
    let mut snapshotter = Snapshotter::new();
    let mut options = confidential_options(&swtee, "", "image_pull = \"guest\"\n", Vec::new());
    options.containerd_config = snapshotter.cri_config(&host, &sandbox_image);
    let c = Containerd::start_with(options);
    snapshotter.start(&c.dir.path().join("root"), &[]);
    snapshotter.wait_until_reachable(&c);
    kbs.trust(&c, &swtee, &[&doc]);
    let mut cri = Cri::connect(&c.socket());
    let context = |_: &Cri| {
        format!(
            "containerd log (tail):\n{}\nsnapshotter log:\n{}\nKBS log:\n{}",
            c.log()
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .join("\n"),
            snapshotter.log(),
            kbs.log()
        )
    };

    // The confidential pod (its pause container from the host's unpack).
    let annotations = HashMap::from([(
        kabuto_initdata::KATA_ANNOTATION.to_string(),
        doc.to_annotation(),
    )]);
    let pod = cri
        .run_pod("cpod", "kabuto", annotations)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", context(&cri)));

    // PullImage of the encrypted image succeeds; its layers never reach
    // the host (not fetched, so not in the content store).
    let image_ref = cri
        .pull(&encrypted, &pod)
        .unwrap_or_else(|e| panic!("PullImage {encrypted}: {e}\n{}", context(&cri)));
    assert!(
        snapshotter.log().contains("has encrypted layers"),
        "{}",
        snapshotter.log()
    );
    let blobs = c
        .dir
        .path()
        .join("root/io.containerd.content.v1.content/blobs/sha256");
    for layer in &encrypted_layers {
        let hex = layer.trim_start_matches("sha256:");
        assert!(
            !blobs.join(hex).exists(),
            "the host fetched encrypted layer {layer}"
        );
    }
    let id = cri
        .start_container(&pod, "secret", &image_ref, &[])
        .unwrap_or_else(|e| panic!("CreateContainer/StartContainer: {e}\n{}", context(&cri)));
    assert_eq!(
        cri.wait_exit(&id, Duration::from_secs(300)),
        Some(0),
        "{}",
        context(&cri)
    );
    assert_eq!(cri.log(&pod, "secret"), format!("{MARKER}\n"));

    // An image encrypted for someone else: CRI's pull succeeds (the host
    // cannot tell), the guest refuses it with the cause, nothing runs.
    let stranger_ref = cri.pull(&stranger, &pod).expect("pull stranger");
    let err = cri
        .start_container(&pod, "stranger", &stranger_ref, &[])
        .expect_err("an image nobody gave us the key of ran");
    assert!(err.contains("decryption key"), "{err}");

    // A plain image that shares the encrypted one's layers (encryption
    // keeps diff ids) and adds one: the host cannot unpack that layer onto
    // the guest-pulled, empty ones, and says which layer is shared.
    let twin = d.join("twin");
    kabuto_e2e::run_tool(
        "cp",
        &[
            "-a",
            secret.to_str().expect("utf-8"),
            twin.to_str().expect("utf-8"),
        ],
    );
    let mut image = LayoutImage::open(&twin).expect("layout");
    image
        .append_layer(&tar_of(&[("extra.txt", 0o644, b"one more layer\n")]).expect("tar"))
        .expect("layer");
    image.save().expect("save");
    let twin_ref = registry.push_layout(&twin, "latest", "open/twin");
    let err = cri
        .pull(&twin_ref, &pod)
        .expect_err("unpacked onto guest-pulled layers");
    assert!(
        err.contains("shares layer sha256:") && err.contains("open/twin"),
        "{err}"
    );

    // A runc pod runs a plain image the snapshotter unpacked on the host.
    let runc_pod = cri
        .run_pod("rpod", "runc", HashMap::new())
        .unwrap_or_else(|e| panic!("runc RunPodSandbox: {e}\n{}", context(&cri)));
    let plain_ref = cri.pull(&plain, &runc_pod).expect("pull plain");
    let id = cri
        .start_container(&runc_pod, "app", &plain_ref, &[])
        .unwrap_or_else(|e| panic!("runc container: {e}\n{}", context(&cri)));
    assert_eq!(cri.wait_exit(&id, Duration::from_secs(60)), Some(0));
    assert_eq!(cri.log(&runc_pod, "app"), "hello from a plain image\n");

    // The plaintext is in no host file: containerd's root and state,
    // kabuto's state, the snapshotter's directories.
    let leaks = files_containing(&[c.dir.path(), snapshotter.dir.path()], MARKER.as_bytes());
    assert!(leaks.is_empty(), "plaintext on the host: {leaks:?}");

    cri.remove_pod(&pod).expect("remove the kabuto pod");
    cri.remove_pod(&runc_pod).expect("remove the runc pod");
    for image in [&image_ref, &stranger_ref, &plain_ref] {
        cri.remove_image(image).expect("remove image");
    }
    c.assert_no_residue();
    // containerd's garbage collection removes the removed images'
    // snapshots through the snapshotter (Walk + Remove), the guest-pulled
    // placeholders included: left are the pause image's layers.
    let pause_layers = LayoutImage::open(&pause).expect("pause").manifest["layers"]
        .as_array()
        .map_or(0, Vec::len);
    let snapshot_dirs = || {
        std::fs::read_dir(snapshotter.root().join("snapshots"))
            .map(|d| d.count())
            .unwrap_or(usize::MAX)
    };
    assert!(
        c.eventually(Duration::from_secs(60), || snapshot_dirs() == pause_layers),
        "{} snapshot directories, {pause_layers} expected\n{}",
        snapshot_dirs(),
        snapshotter.log()
    );
}
