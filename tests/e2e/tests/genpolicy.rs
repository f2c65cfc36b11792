//! `kabuto-owner genpolicy` end to end: a pod manifest's images resolved from a
//! real registry (docker-registry, pushed with skopeo) and from an OCI
//! layout; the generated init-data run through containerd in a real VM,
//! where the pod's own container runs and every change is blocked by the
//! policy, leaving nothing behind.
//!
//! The requests come from `ctr`, not the CRI plugin, so the test passes
//! the CRI annotations a kubelet-driven containerd would set, and its
//! settings add the one mount ctr makes that CRI does not (`/run`).

use std::{path::Path, process::Command};

use kabuto_e2e::{paths, stderr, stdout, Containerd, Registry, IMAGE};
use kabuto_genpolicy::{MountRule, Settings};

const POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: genpolicy-e2e
spec:
  automountServiceAccountToken: false
  containers:
  - name: app
    image: IMAGE
    command: ["sh", "-c", "echo generated-policy-ok"]
    env:
    - {name: GREETING, value: hello}
  - name: waiter
    image: IMAGE
    command: ["sleep", "1000"]
    livenessProbe:
      exec:
        command: ["true"]
"#;

/// Runs `kabuto-owner genpolicy`; returns (annotated manifest, stderr).
fn genpolicy(dir: &Path, manifest: &str, settings: &Settings, extra: &[&str]) -> (String, String) {
    let pod = dir.join("pod.yaml");
    let settings_path = dir.join("settings.json");
    std::fs::write(&pod, manifest).expect("pod.yaml");
    std::fs::write(
        &settings_path,
        serde_json::to_string(settings).expect("settings"),
    )
    .expect("settings.json");
    let out = Command::new(paths().bin_dir.join("kabuto-owner"))
        .arg("genpolicy")
        .arg(&pod)
        .arg("--settings")
        .arg(&settings_path)
        .args(extra)
        .output()
        .expect("running kabuto-owner genpolicy");
    assert!(out.status.success(), "genpolicy: {}", stderr(&out));
    (stdout(&out), stderr(&out))
}

/// (init-data annotation, pinned image of the first container).
fn annotation_and_image(manifest: &str) -> (String, String) {
    let doc: serde_json::Value = serde_yaml::from_str(manifest).expect("output is YAML");
    let annotation = doc["metadata"]["annotations"][kabuto_initdata::KATA_ANNOTATION]
        .as_str()
        .expect("the init-data annotation")
        .to_string();
    let image = doc["spec"]["containers"][0]["image"]
        .as_str()
        .expect("image")
        .to_string();
    (annotation, image)
}

/// ctr's default mounts include a tmpfs on /run, which CRI's do not. The
/// pod is not confidential and containerd unpacks its image on the host,
/// so the owner's settings accept a host rootfs.
fn ctr_settings() -> Settings {
    let mut s = Settings {
        allow_host_rootfs: true,
        ..Default::default()
    };
    s.default_mounts
        .push(MountRule::new("/run", "tmpfs", false));
    s
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn images_resolve_from_a_registry_and_a_layout_alike() {
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = dir.path().join("layout");
    kabuto_e2e::busybox_layout(&layout).expect("layout");
    let registry = Registry::start();
    let pushed = registry.push_layout(&layout, "latest", "kabuto/busybox");

    let (from_registry, err) = genpolicy(
        dir.path(),
        &POD.replace("IMAGE", &pushed),
        &ctr_settings(),
        &["--insecure-registry", &registry.host],
    );
    let (_, pinned) = annotation_and_image(&from_registry);
    assert!(
        pinned.starts_with(&format!("{}/kabuto/busybox@sha256:", registry.host)),
        "{pinned}"
    );
    assert!(
        err.contains("Pod/genpolicy-e2e: init-data sha256 digest"),
        "{err}"
    );

    // What the registry serves, as skopeo sees it (skopeo compressed the
    // layer on push, so it is not the layout's manifest).
    let inspect = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"])
        .arg(format!("docker://{pushed}"))
        .output()
        .expect("skopeo inspect");
    assert!(inspect.status.success(), "{}", stderr(&inspect));
    assert_eq!(
        pinned,
        format!(
            "{}/kabuto/busybox@{}",
            registry.host,
            stdout(&inspect).trim()
        )
    );

    // The layout, offline: its own manifest digest.
    let (from_layout, _) = genpolicy(
        dir.path(),
        &POD.replace("IMAGE", &pushed),
        &ctr_settings(),
        &["--offline", "--oci-layout", layout.to_str().expect("utf-8")],
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index.json"))
            .expect("index");
    let layout_digest = index["manifests"][0]["digest"].as_str().expect("digest");
    assert_eq!(
        annotation_and_image(&from_layout).1,
        format!("{}/kabuto/busybox@{layout_digest}", registry.host)
    );

    // An image the registry does not have: a clear error, no output.
    let pod = dir.path().join("missing.yaml");
    std::fs::write(
        &pod,
        POD.replace("IMAGE", &format!("{}/kabuto/missing:1", registry.host)),
    )
    .expect("pod");
    let out = Command::new(paths().bin_dir.join("kabuto-owner"))
        .args(["genpolicy", "--insecure-registry", &registry.host])
        .arg(&pod)
        .output()
        .expect("kabuto-owner genpolicy");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("kabuto/missing:1: from the registry"),
        "{}\n{}",
        stderr(&out),
        registry.log()
    );
    assert!(stdout(&out).is_empty());
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn a_generated_policy_runs_its_pod_and_blocks_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = dir.path().join("layout");
    kabuto_e2e::busybox_layout(&layout).expect("layout");
    let (manifest, _) = genpolicy(
        dir.path(),
        &POD.replace("IMAGE", IMAGE),
        &ctr_settings(),
        &["--offline", "--oci-layout", layout.to_str().expect("utf-8")],
    );
    let (init_data, pinned) = annotation_and_image(&manifest);
    let digest = pinned.split('@').nth(1).expect("pinned").to_string();

    let c = Containerd::start();
    let init_data = format!("{}={init_data}", kabuto_initdata::KATA_ANNOTATION);
    let image_name = |image: &str| format!("io.kubernetes.cri.image-name={image}");
    let pinned_image = image_name(&format!("localhost/busybox@{digest}"));
    let as_app = [
        "--annotation",
        init_data.as_str(),
        "--annotation",
        "io.kubernetes.cri.container-name=app",
        "--annotation",
        pinned_image.as_str(),
    ];
    let app_args = ["sh", "-c", "echo generated-policy-ok"];

    let blocked = |id: &str, extra: &[&str], args: &[&str], why: &str| {
        let mut all: Vec<&str> = as_app.to_vec();
        all.extend_from_slice(extra);
        let out = c.run(id, &all, args);
        assert!(!out.status.success(), "{id}: ran: {}", stdout(&out));
        assert!(
            stderr(&out).contains("CreateContainerRequest is blocked by policy")
                && stderr(&out).contains(why),
            "{id}: {}",
            stderr(&out)
        );
        assert!(
            !stdout(&out).contains("generated-policy-ok"),
            "{id}: nothing ran"
        );
    };

    // The pod's own container runs.
    let out = c.run(
        "ok",
        &[&as_app[..], &["--env", "GREETING=hello"]].concat(),
        &app_args,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "generated-policy-ok\n");

    let other_digest = image_name(&format!("localhost/busybox@sha256:{}", "0".repeat(64)));
    blocked(
        "digest",
        &["--annotation", &other_digest],
        &app_args,
        "image \"localhost/busybox@sha256:0000",
    );
    blocked(
        "extra-arg",
        &[],
        &["sh", "-c", "echo generated-policy-ok", "extra"],
        "args [\"sh\", \"-c\", \"echo generated-policy-ok\", \"extra\"] are not allowed for container \"app\"",
    );
    blocked(
        "extra-env",
        &["--env", "LD_PRELOAD=/x.so"],
        &app_args,
        "env variable LD_PRELOAD is not allowed for container \"app\"",
    );
    blocked(
        "privileged",
        &["--privileged"],
        &app_args,
        "privileged mode is not allowed for container \"app\"",
    );
    let host_dir = dir.path().join("host-dir");
    std::fs::create_dir_all(&host_dir).expect("host dir");
    let mount = format!(
        "type=bind,src={},dst=/host,options=rbind:ro",
        host_dir.display()
    );
    blocked(
        "host-mount",
        &["--mount", &mount],
        &app_args,
        "mount /host is not allowed for container \"app\"",
    );

    // Exec: only the waiter's liveness probe command.
    let waiter_image = pinned_image.clone();
    c.run_detached(
        "waiter",
        &[
            "--annotation",
            &init_data,
            "--annotation",
            "io.kubernetes.cri.container-name=waiter",
            "--annotation",
            &waiter_image,
        ],
        &["sleep", "1000"],
    );
    let out = c.ctr(&["task", "exec", "--exec-id", "probe", "waiter", "true"]);
    assert!(out.status.success(), "probe: {}", stderr(&out));
    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "sh",
        "waiter",
        "sh",
        "-c",
        "id",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(
            "ExecProcessRequest is blocked by policy: exec of [\"sh\", \"-c\", \"id\"] in container \"waiter\""
        ),
        "{}",
        stderr(&out)
    );
    c.kill_and_delete("waiter");
    c.assert_no_residue();
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn output_is_withheld_when_the_policy_denies_reading_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = dir.path().join("layout");
    kabuto_e2e::busybox_layout(&layout).expect("layout");
    let mut settings = ctr_settings();
    settings
        .request_defaults
        .insert("ReadStreamRequest".into(), false);
    let (manifest, _) = genpolicy(
        dir.path(),
        &POD.replace("IMAGE", IMAGE),
        &settings,
        &["--offline", "--oci-layout", layout.to_str().expect("utf-8")],
    );
    let (init_data, pinned) = annotation_and_image(&manifest);
    let digest = pinned.split('@').nth(1).expect("pinned");
    let c = Containerd::start();
    let out = c.run(
        "quiet",
        &[
            "--annotation",
            &format!("{}={init_data}", kabuto_initdata::KATA_ANNOTATION),
            "--annotation",
            "io.kubernetes.cri.container-name=app",
            "--annotation",
            &format!("io.kubernetes.cri.image-name=localhost/busybox@{digest}"),
            "--env",
            "GREETING=hello",
        ],
        &["sh", "-c", "echo generated-policy-ok"],
    );
    assert!(
        !stdout(&out).contains("generated-policy-ok"),
        "output must not leave the guest: {}",
        stdout(&out)
    );
    assert!(
        c.log().contains("ReadStreamRequest is blocked by policy"),
        "the shim reports the denial"
    );
    c.assert_no_residue();
}
