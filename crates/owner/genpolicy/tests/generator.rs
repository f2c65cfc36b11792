//! The generator on a dozen real-world manifests (tests/manifests/): each
//! generated policy is run through the real policy gate against the
//! requests containerd's CRI plugin would send for those pods (built here
//! independently of the generator, with concrete values), and against
//! changed requests, which must be denied with the check that failed.
#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use kabuto_genpolicy::{generate, GenPolicyError, Generated, Resolver, Settings};
use kabuto_policy::{Decision, PolicyGate};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const SHARED: &str = "/run/kabuto/shared";
const ROOTFS: &str = "/run/kabuto/rootfs";

/// Image configs as their registries publish them (trimmed).
fn images() -> Vec<(&'static str, Value)> {
    vec![
        (
            "docker.io/library/busybox:1.36",
            json!({"Cmd": ["sh"], "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}),
        ),
        (
            "docker.io/library/nginx:1.25",
            json!({"Entrypoint": ["/docker-entrypoint.sh"], "Cmd": ["nginx", "-g", "daemon off;"],
                   "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                           "NGINX_VERSION=1.25.3", "NJS_VERSION=0.8.2", "PKG_RELEASE=1~bookworm"],
                   "ExposedPorts": {"80/tcp": {}}, "StopSignal": "SIGQUIT"}),
        ),
        (
            "docker.io/library/redis:7.2",
            json!({"Entrypoint": ["docker-entrypoint.sh"], "Cmd": ["redis-server"], "WorkingDir": "/data",
                   "Volumes": {"/data": {}},
                   "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                           "GOSU_VERSION=1.17", "REDIS_VERSION=7.2.4"]}),
        ),
        (
            "quay.io/prometheus/node-exporter:v1.7.0",
            json!({"Entrypoint": ["/bin/node_exporter"], "User": "nobody",
                   "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}),
        ),
        (
            "registry.example.com/team/app:v3",
            json!({"Entrypoint": ["/app/server"], "WorkingDir": "/app", "User": "10001:10001",
                   "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "APP_MODE=prod"]}),
        ),
        (
            "registry.example.com/team/log-shipper:v2",
            json!({"Entrypoint": ["/fluent-bit/bin/fluent-bit"], "Cmd": ["-c", "/fluent-bit/etc/fluent-bit.conf"],
                   "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}),
        ),
    ]
}

fn put_blob(dir: &Path, bytes: &[u8]) -> String {
    let hex = hex::encode(Sha256::digest(bytes));
    std::fs::write(dir.join("blobs/sha256").join(&hex), bytes).unwrap();
    format!("sha256:{hex}")
}

/// An OCI image layout holding `images()`; nginx behind a two-platform
/// index. Returns the layout and each image's platform manifest digest.
fn layout(dir: &Path) -> BTreeMap<String, String> {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut digests = BTreeMap::new();
    let mut index = vec![];
    for (name, config) in images() {
        let config = json!({"architecture": "amd64", "os": "linux", "config": config,
                            "rootfs": {"type": "layers", "diff_ids": []}});
        let config = serde_json::to_vec(&config).unwrap();
        let config_digest = put_blob(dir, &config);
        let layer_digest = put_blob(dir, format!("layer of {name}").as_bytes());
        let manifest = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": 1}]});
        let manifest = serde_json::to_vec(&manifest).unwrap();
        let manifest_digest = put_blob(dir, &manifest);
        digests.insert(name.to_string(), manifest_digest.clone());
        let mut top = json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                             "digest": manifest_digest, "size": manifest.len()});
        if name.contains("nginx") {
            let other = put_blob(dir, b"{\"schemaVersion\":2}");
            let idx = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [
                    {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": other, "size": 1,
                     "platform": {"architecture": "arm64", "os": "linux"}},
                    {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
                     "size": manifest.len(), "platform": {"architecture": "amd64", "os": "linux"}}]});
            let idx = serde_json::to_vec(&idx).unwrap();
            top = json!({"mediaType": "application/vnd.oci.image.index.v1+json",
                         "digest": put_blob(dir, &idx), "size": idx.len()});
        }
        top["annotations"] = json!({"org.opencontainers.image.ref.name": name});
        index.push(top);
    }
    let index = json!({"schemaVersion": 2, "manifests": index});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    digests
}

struct Fixture {
    _dir: tempfile::TempDir,
    layout: PathBuf,
    digests: BTreeMap<String, String>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let layout_dir = dir.path().join("layout");
    let digests = layout(&layout_dir);
    Fixture {
        _dir: dir,
        layout: layout_dir,
        digests,
    }
}

fn manifest(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/manifests")
        .join(name);
    std::fs::read_to_string(path).unwrap()
}

fn gen(f: &Fixture, yaml: &str, settings: &Settings) -> Result<Generated, GenPolicyError> {
    generate(
        yaml,
        settings,
        &mut Resolver::offline(vec![f.layout.clone()]),
    )
}

/// The config of `image` (tagged or pinned: each repository holds one image).
fn config_of(image: &str) -> Value {
    let wanted = kabuto_genpolicy::normalize(image).unwrap();
    images()
        .into_iter()
        .find(|(n, _)| {
            let r = kabuto_genpolicy::normalize(n).unwrap();
            (r.registry(), r.repository()) == (wanted.registry(), wanted.repository())
        })
        .map(|(_, c)| c)
        .unwrap()
}

/// Concrete values for what is only known at run time.
fn runtime_value(name: &str) -> String {
    match name {
        "DB_USER" => "admin".into(),
        "POD_IP" => "10.244.1.7".into(),
        "MEM_LIMIT" => "134217728".into(),
        _ => format!("value-of-{name}"),
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// Kubernetes' `$(VAR)` expansion with concrete values.
fn expand(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = text.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("$({k})"), v);
    }
    out.replace("$$", "$")
}

/// The guest-side OCI spec containerd's CRI plugin (through the kabuto
/// runtime) produces for `container` of `pod`.
fn cri_request(pod: &Value, namespace: &str, container: &Value, cid: &str) -> Value {
    let image = container["image"].as_str().unwrap();
    let config = config_of(image);
    let mut vars = BTreeMap::new();
    let mut env: Vec<(String, String)> = vec![];
    for e in strings(&config["Env"]) {
        let (k, v) = e.split_once('=').unwrap();
        env.push((k.into(), v.into()));
    }
    let set = |env: &mut Vec<(String, String)>, k: &str, v: String| {
        env.retain(|(n, _)| n != k);
        env.push((k.into(), v));
    };
    for e in container["env"].as_array().cloned().unwrap_or_default() {
        let name = e["name"].as_str().unwrap();
        let value = match e["value"].as_str() {
            Some(v) => expand(v, &vars),
            None => runtime_value(name),
        };
        vars.insert(name.to_string(), value.clone());
        set(&mut env, name, value);
    }
    for from in container["envFrom"].as_array().cloned().unwrap_or_default() {
        let prefix = from["prefix"].as_str().unwrap_or("");
        set(&mut env, &format!("{prefix}LOG_LEVEL"), "debug".into());
    }
    set(&mut env, "HOSTNAME", "web-5d8f7c9b6-x2x7q".into());
    set(&mut env, "KUBERNETES_SERVICE_HOST", "10.96.0.1".into());
    set(&mut env, "KUBERNETES_SERVICE_PORT", "443".into());
    set(
        &mut env,
        "KUBERNETES_PORT_443_TCP",
        "tcp://10.96.0.1:443".into(),
    );
    if pod["spec"]["enableServiceLinks"] != json!(false) {
        set(&mut env, "WEB_SERVICE_HOST", "10.96.3.4".into());
        set(&mut env, "WEB_PORT_80_TCP_PORT", "80".into());
    }
    if container["tty"] == json!(true) {
        set(&mut env, "TERM", "xterm".into());
    }

    let entrypoint = strings(&config["Entrypoint"]);
    let cmd = strings(&config["Cmd"]);
    let command = container.get("command").map(strings);
    let args = container.get("args").map(strings);
    let argv: Vec<String> = match (command, args) {
        (Some(c), Some(a)) => c.into_iter().chain(a).collect(),
        (Some(c), None) => c,
        (None, Some(a)) => entrypoint.into_iter().chain(a).collect(),
        (None, None) => entrypoint.into_iter().chain(cmd).collect(),
    };
    let argv: Vec<String> = argv.iter().map(|a| expand(a, &vars)).collect();

    let sc = &container["securityContext"];
    let psc = &pod["spec"]["securityContext"];
    let privileged = sc["privileged"] == json!(true);
    let mut caps: Vec<String> = [
        "CHOWN",
        "DAC_OVERRIDE",
        "FSETID",
        "FOWNER",
        "MKNOD",
        "NET_RAW",
        "SETGID",
        "SETUID",
        "SETFCAP",
        "SETPCAP",
        "NET_BIND_SERVICE",
        "SYS_CHROOT",
        "KILL",
        "AUDIT_WRITE",
    ]
    .iter()
    .map(|c| format!("CAP_{c}"))
    .collect();
    let drop = strings(&sc["capabilities"]["drop"]);
    if drop.contains(&"ALL".to_string()) {
        caps.clear();
    }
    caps.retain(|c| !drop.iter().any(|d| c == &format!("CAP_{d}")));
    for a in strings(&sc["capabilities"]["add"]) {
        caps.push(format!("CAP_{a}"));
    }
    if privileged {
        caps = [
            "CAP_SYS_ADMIN",
            "CAP_NET_ADMIN",
            "CAP_SYS_PTRACE",
            "CAP_CHOWN",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
    }
    let (img_uid, img_gid) = match config["User"].as_str() {
        Some("nobody") => (65534, 65534),
        Some(u) if u.contains(':') => {
            let (a, b) = u.split_once(':').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        }
        _ => (0, 0),
    };
    let uid = sc["runAsUser"]
        .as_i64()
        .or(psc["runAsUser"].as_i64())
        .unwrap_or(img_uid);
    let gid = sc["runAsGroup"]
        .as_i64()
        .or(psc["runAsGroup"].as_i64())
        .unwrap_or(img_gid);

    // containerd's default profile when the pod asks for RuntimeDefault (trimmed).
    let profile = sc["seccompProfile"]["type"]
        .as_str()
        .or(psc["seccompProfile"]["type"].as_str());
    let seccomp = (profile == Some("RuntimeDefault")).then(|| {
        json!({"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
               "syscalls": [{"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW"}]})
    });
    let sysctl: serde_json::Map<String, Value> = psc["sysctls"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| (s["name"].as_str().unwrap().to_string(), s["value"].clone()))
        .collect();
    let shared = |i: usize, name: &str| format!("{SHARED}/{cid}/mounts/{i}-{name}");
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
    ];
    let bind = |mounts: &mut Vec<Value>, dest: &str, ro: bool| {
        let i = mounts.len();
        let name = dest.rsplit('/').next().unwrap().to_string();
        let mut options = vec!["rbind", "rprivate"];
        options.push(if ro { "ro" } else { "rw" });
        mounts.push(json!({"destination": dest, "type": "bind", "source": shared(i, &name), "options": options}));
    };
    bind(&mut mounts, "/etc/hosts", false);
    bind(&mut mounts, "/etc/hostname", false);
    bind(&mut mounts, "/etc/resolv.conf", false);
    bind(&mut mounts, "/dev/shm", false);
    bind(
        &mut mounts,
        container["terminationMessagePath"]
            .as_str()
            .unwrap_or("/dev/termination-log"),
        false,
    );
    let volumes = pod["spec"]["volumes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut has_sa = false;
    for vm in container["volumeMounts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        // Not among the volumes: a StatefulSet's volumeClaimTemplate.
        let volume = volumes.iter().find(|v| v["name"] == vm["name"]);
        let api = ["configMap", "secret", "projected", "downwardAPI"]
            .iter()
            .any(|k| volume.is_some_and(|v| v.get(*k).is_some()));
        let dest = vm["mountPath"].as_str().unwrap();
        has_sa |= dest == "/var/run/secrets/kubernetes.io/serviceaccount";
        bind(&mut mounts, dest, vm["readOnly"] == json!(true) || api);
    }
    if pod["spec"]["automountServiceAccountToken"] != json!(false) && !has_sa {
        bind(
            &mut mounts,
            "/var/run/secrets/kubernetes.io/serviceaccount",
            true,
        );
    }
    for v in config["Volumes"]
        .as_object()
        .map(|o| o.keys().cloned().collect::<Vec<_>>())
        .unwrap_or_default()
    {
        if !mounts.iter().any(|m| m["destination"] == json!(v)) {
            bind(&mut mounts, &v, false);
        }
    }

    let full = kabuto_genpolicy::normalize(image).unwrap();
    let image_name = format!(
        "{}/{}@{}",
        full.registry(),
        full.repository(),
        full.digest().unwrap()
    );
    let mut request = json!({
        "container_id": cid,
        "exec_id": "",
        "sandbox_id": "pod1",
        // Containers of confidential pods run the pinned image the guest pulls.
        "storages": [{"driver": "image_guest_pull", "source": image_name, "mount_point": "", "fstype": "", "options": [], "driver_options": []}],
        "OCI": {
            "ociVersion": "1.1.0",
            "annotations": {
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.container-name": container["name"],
                "io.kubernetes.cri.image-name": image_name,
                "io.kubernetes.cri.sandbox-id": "pod1",
                "io.kubernetes.cri.sandbox-namespace": namespace,
            },
            "process": {
                "terminal": container["tty"] == json!(true),
                "user": {"uid": uid, "gid": gid},
                "args": argv,
                "env": env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
                "cwd": container["workingDir"].as_str().or(config["WorkingDir"].as_str()).unwrap_or("/"),
                "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
                "noNewPrivileges": sc["allowPrivilegeEscalation"] == json!(false),
            },
            "root": {"path": format!("{ROOTFS}/{cid}"), "readonly": sc["readOnlyRootFilesystem"] == json!(true)},
            "hostname": "web-5d8f7c9b6-x2x7q",
            "mounts": mounts,
            "linux": {
                "maskedPaths": if privileged { json!([]) } else {
                    json!(["/proc/acpi", "/proc/kcore", "/proc/keys", "/sys/firmware"]) },
                "readonlyPaths": if privileged { json!([]) } else {
                    json!(["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]) },
                "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}],
                "seccomp": seccomp,
                "sysctl": sysctl,
                // containerd's device cgroup for an unprivileged container.
                "resources": {"devices": [
                    {"allow": false, "access": "rwm"},
                    {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
                    {"allow": true, "type": "c", "major": 1, "minor": 8, "access": "rwm"},
                    {"allow": true, "type": "c", "major": 1, "minor": 7, "access": "rwm"},
                    {"allow": true, "type": "c", "major": 5, "minor": 0, "access": "rwm"},
                    {"allow": true, "type": "c", "major": 1, "minor": 5, "access": "rwm"},
                    {"allow": true, "type": "c", "major": 1, "minor": 9, "access": "rwm"},
                    {"allow": true, "type": "c", "major": 5, "minor": 1, "access": "rwm"},
                    {"allow": true, "type": "c", "major": 136, "access": "rwm"},
                    {"allow": true, "type": "c", "major": 5, "minor": 2, "access": "rwm"},
                    {"allow": true, "type": "c", "major": 10, "minor": 200, "access": "rwm"},
                ]},
            },
        }
    });
    if seccomp.is_none() {
        request["OCI"]["linux"]
            .as_object_mut()
            .unwrap()
            .remove("seccomp");
    }
    request
}

fn sandbox_request() -> Value {
    json!({
        "container_id": "pod1", "exec_id": "", "sandbox_id": "pod1",
        "OCI": {
            "ociVersion": "1.1.0",
            "annotations": {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "pod1"},
            "process": {"user": {"uid": 65535, "gid": 65535}, "args": ["/pause"],
                        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "cwd": "/",
                        "capabilities": {"bounding": ["CAP_CHOWN"]}, "noNewPrivileges": true},
            "root": {"path": format!("{ROOTFS}/pod1"), "readonly": true},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                       {"destination": "/dev/shm", "type": "bind", "source": format!("{SHARED}/pod1/mounts/1-shm"), "options": ["rbind", "ro"]}],
            "linux": {"maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
                      "readonlyPaths": ["/proc/bus", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
                      "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]},
        }
    })
}

/// Each pod template of the output, with the manifest's pinned images.
fn pod_templates(output: &str) -> Vec<(Value, String)> {
    let mut out = vec![];
    for doc in serde_yaml::Deserializer::from_str(output) {
        let doc: Value = serde::Deserialize::deserialize(doc).unwrap();
        let ns = doc["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let template = match doc["kind"].as_str().unwrap() {
            "Pod" => doc.clone(),
            "CronJob" => doc["spec"]["jobTemplate"]["spec"]["template"].clone(),
            "ConfigMap" | "Service" => continue,
            _ => doc["spec"]["template"].clone(),
        };
        out.push((template, ns));
    }
    out
}

type Gate = PolicyGate;

/// A gate for `rego` that has admitted the pod's sandbox (pause), as the
/// guest's gate has before any of the pod's containers.
fn pod_gate(rego: &str) -> Gate {
    let mut gate = PolicyGate::new(rego).unwrap();
    assert_eq!(
        decide(&mut gate, "CreateContainerRequest", &sandbox_request()),
        Decision::Allowed,
        "the pause container"
    );
    gate
}

/// The ExecProcessRequest containerd sends for `args` in the container
/// created by `create`: the container's process with other args.
fn exec_request(create: &Value, args: &Value) -> Value {
    let mut process = create["OCI"]["process"].clone();
    process["args"] = args.clone();
    json!({"container_id": create["container_id"], "exec_id": "e", "process": process})
}

fn decide(gate: &mut Gate, request: &str, input: &Value) -> Decision {
    gate.decide(request, input).unwrap()
}

fn denied_reason(gate: &mut Gate, input: &Value) -> String {
    match decide(gate, "CreateContainerRequest", input) {
        Decision::Denied { reason } => reason.unwrap_or_default(),
        Decision::Allowed => panic!("allowed: {input:#}"),
    }
}

const MANIFESTS: &[&str] = &[
    "01-pod-busybox.yaml",
    "02-deployment-nginx.yaml",
    "03-statefulset-redis.yaml",
    "04-job.yaml",
    "05-cronjob.yaml",
    "06-daemonset-node-exporter.yaml",
    "07-pod-init-and-sidecar.yaml",
    "08-pod-env-sources.yaml",
    "09-pod-restricted.yaml",
    "10-pod-projected-no-token.yaml",
    "11-multi-document.yaml",
    "12-pod-lifecycle-tty.yaml",
];

#[test]
fn every_manifest_admits_exactly_its_own_pods() {
    let f = fixture();
    for name in MANIFESTS {
        let generated = gen(&f, &manifest(name), &Settings::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let templates = pod_templates(&generated.manifest);
        assert_eq!(templates.len(), generated.pods.len(), "{name}");
        for ((template, ns), pod) in templates.iter().zip(&generated.pods) {
            // The annotation carries exactly this policy.
            let annotation = template["metadata"]["annotations"][kabuto_initdata::KATA_ANNOTATION]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: no init-data annotation"));
            let init_data = kabuto_initdata::InitData::from_annotation(annotation).unwrap();
            assert_eq!(init_data.policy(), Some(pod.rego.as_str()), "{name}");
            assert_eq!(init_data.digest(), pod.init_data.digest(), "{name}");

            let mut gate = PolicyGate::new(&pod.rego).unwrap();
            assert_eq!(
                decide(&mut gate, "CreateContainerRequest", &sandbox_request()),
                Decision::Allowed,
                "{name}: the pause container"
            );
            let containers: Vec<Value> = ["initContainers", "containers"]
                .iter()
                .flat_map(|k| template["spec"][k].as_array().cloned().unwrap_or_default())
                .collect();
            for (i, c) in containers.iter().enumerate() {
                assert!(
                    c["image"].as_str().unwrap().contains("@sha256:"),
                    "{name}: images are pinned"
                );
                let cid = format!("c{i}");
                let req = cri_request(template, ns, c, &cid);
                assert_eq!(
                    decide(&mut gate, "CreateContainerRequest", &req),
                    Decision::Allowed,
                    "{name}: container {}: {req:#}",
                    c["name"]
                );
                assert_eq!(gate.state()["containers"][&cid], c["name"], "{name}");
                // Probes and hooks may exec; nothing else.
                for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                    if let Some(cmd) = c[probe]["exec"]["command"].as_array() {
                        let exec = exec_request(&req, &json!(cmd));
                        assert_eq!(
                            decide(&mut gate, "ExecProcessRequest", &exec),
                            Decision::Allowed,
                            "{name}: {probe}"
                        );
                    }
                }
                let sh = exec_request(&req, &json!(["sh"]));
                assert!(
                    matches!(decide(&mut gate, "ExecProcessRequest", &sh),
                        Decision::Denied { reason: Some(r) } if r.contains("exec of [\"sh\"]")),
                    "{name}: exec sh"
                );
            }
            assert_eq!(
                decide(&mut gate, "ReadStreamRequest", &json!({})),
                Decision::Allowed
            );
            assert_eq!(
                decide(&mut gate, "SetPolicyRequest", &json!({"policy": ""})),
                Decision::Denied { reason: None }
            );
            assert_eq!(
                decide(
                    &mut gate,
                    "RemoveContainerRequest",
                    &json!({"container_id": "c0"})
                ),
                Decision::Allowed
            );
            assert!(gate.state()["containers"].get("c0").is_none(), "{name}");
        }
    }
}

/// The generated policy of 07 (init container + sidecar) and a valid
/// request for its `app` container.
fn sidecar_case(f: &Fixture) -> (Gate, Value, Value, String) {
    let generated = gen(
        f,
        &manifest("07-pod-init-and-sidecar.yaml"),
        &Settings::default(),
    )
    .unwrap();
    let (template, ns) = pod_templates(&generated.manifest).remove(0);
    let app = template["spec"]["containers"][0].clone();
    let req = cri_request(&template, &ns, &app, "c1");
    let gate = pod_gate(&generated.pods[0].rego);
    (gate, template, req, ns)
}

#[test]
fn changed_requests_are_denied_naming_the_check() {
    let f = fixture();
    let (mut gate, _template, req, _) = sidecar_case(&f);
    assert_eq!(
        decide(&mut gate, "CreateContainerRequest", &req),
        Decision::Allowed
    );

    let mut r = req.clone();
    r["OCI"]["annotations"]["io.kubernetes.cri.image-name"] = json!(format!(
        "registry.example.com/team/app@sha256:{}",
        "1".repeat(64)
    ));
    assert!(
        denied_reason(&mut gate, &r).contains("image \"registry.example.com/team/app@sha256:111")
    );

    // Guest pull: the storage names what the agent pulls; an allowed
    // annotation does not cover another image there.
    let image = req["OCI"]["annotations"]["io.kubernetes.cri.image-name"].clone();
    let mut r = req.clone();
    r["storages"] = json!([{"driver": "image_guest_pull", "source": image}]);
    assert_eq!(
        decide(&mut gate, "CreateContainerRequest", &r),
        Decision::Allowed
    );
    r["storages"][0]["source"] = json!("registry.example.com/team/other:latest");
    let reason = denied_reason(&mut gate, &r);
    assert!(
        reason.contains("guest pull of \"registry.example.com/team/other:latest\""),
        "{reason}"
    );
    r["storages"][0] = json!({"driver": "blk", "source": image});
    let reason = denied_reason(&mut gate, &r);
    assert!(reason.contains("storage driver \"blk\""), "{reason}");

    let mut r = req.clone();
    r["OCI"]["process"]["args"]
        .as_array_mut()
        .unwrap()
        .push(json!("--debug"));
    assert!(denied_reason(&mut gate, &r)
        .contains("args [\"/app/server\", \"--debug\"] are not allowed for container \"app\""));

    let mut r = req.clone();
    r["OCI"]["process"]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!("LD_PRELOAD=/tmp/evil.so"));
    let reason = denied_reason(&mut gate, &r);
    assert!(
        reason.contains("env variable LD_PRELOAD is not allowed"),
        "{reason}"
    );
    assert!(
        !reason.contains("evil.so"),
        "values stay out of reasons: {reason}"
    );

    let mut r = req.clone();
    r["OCI"]["linux"]["maskedPaths"] = json!([]);
    r["OCI"]["process"]["capabilities"]["bounding"] = json!(["CAP_SYS_ADMIN"]);
    let reason = denied_reason(&mut gate, &r);
    assert!(
        reason.contains("privileged mode is not allowed for container \"app\""),
        "{reason}"
    );
    assert!(
        reason.contains("capability CAP_SYS_ADMIN is not allowed"),
        "{reason}"
    );

    let mut r = req.clone();
    r["OCI"]["mounts"].as_array_mut().unwrap().push(
        json!({"destination": "/host", "type": "bind", "source": format!("{SHARED}/c1/mounts/20-host"), "options": ["rbind"]}),
    );
    assert!(
        denied_reason(&mut gate, &r).contains("mount /host is not allowed for container \"app\"")
    );

    // An allowed destination, but bound from the guest's own filesystem.
    let mut r = req.clone();
    for m in r["OCI"]["mounts"].as_array_mut().unwrap() {
        if m["destination"] == json!("/etc/app") {
            m["source"] = json!("/");
        }
    }
    assert!(denied_reason(&mut gate, &r).contains("mount /etc/app is not allowed"));

    // A tmpfs where the pod has a volume, and /proc as a bind.
    let mut r = req.clone();
    for m in r["OCI"]["mounts"].as_array_mut().unwrap() {
        if m["destination"] == json!("/proc") {
            *m = json!({"destination": "/proc", "type": "bind", "source": format!("{SHARED}/c1/x"), "options": ["rbind"]});
        }
    }
    assert!(denied_reason(&mut gate, &r).contains("mount /proc is not allowed"));

    // A bind by its options alone (no type) from a guest path; the
    // read-only service account token mounted writable; /proc with no type.
    let token = "/var/run/secrets/kubernetes.io/serviceaccount";
    for (dest, change) in [
        (
            "/etc/app",
            json!({"type": null, "source": "/etc", "options": ["rbind", "ro"]}),
        ),
        (token, json!({"options": ["rbind", "rw"]})),
        ("/proc", json!({"type": null})),
    ] {
        let mut r = req.clone();
        for m in r["OCI"]["mounts"].as_array_mut().unwrap() {
            if m["destination"] == json!(dest) {
                for (k, v) in change.as_object().unwrap() {
                    if v.is_null() {
                        m.as_object_mut().unwrap().remove(k);
                    } else {
                        m[k] = v.clone();
                    }
                }
            }
        }
        let reason = denied_reason(&mut gate, &r);
        assert!(
            reason.contains(&format!("mount {dest} is not allowed")),
            "{change}: {reason}"
        );
    }

    // A request claiming to be the sandbox and a named container at once
    // matches two definitions of the container rule: denied.
    let mut r = req.clone();
    r["OCI"]["annotations"]["io.kubernetes.cri.container-type"] = json!("sandbox");
    let reason = denied_reason(&mut gate, &r);
    assert!(reason.contains("no decision"), "{reason}");

    let mut r = req.clone();
    r["OCI"]["process"]["cwd"] = json!("/tmp");
    assert!(denied_reason(&mut gate, &r).contains("working directory \"/tmp\""));

    let mut r = req.clone();
    r["OCI"]["process"]["user"]["uid"] = json!(0);
    assert!(denied_reason(&mut gate, &r)
        .contains("uid 0 is not allowed for container \"app\" (expected 10001)"));

    let mut r = req.clone();
    r["OCI"]["annotations"]["io.kubernetes.cri.container-name"] = json!("intruder");
    assert!(
        denied_reason(&mut gate, &r).contains("container \"intruder\" is not in the pod's policy")
    );

    let mut r = req.clone();
    r["OCI"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("io.kubernetes.cri.container-name");
    assert!(denied_reason(&mut gate, &r).contains("no io.kubernetes.cri.container-name annotation"));

    // The init container's request under the app's name: wrong image and args.
    let mut r = req.clone();
    r["OCI"]["process"]["args"] = json!(["sh", "-c", "id"]);
    assert!(denied_reason(&mut gate, &r).contains("args"));

    // Only the allowed request changed the state.
    assert_eq!(
        gate.state()["containers"],
        json!({"pod1": "(sandbox)", "c1": "app"})
    );
}

#[test]
fn restricted_security_context_is_enforced() {
    let (rego, req) = first_container_case(
        &fixture(),
        &manifest("09-pod-restricted.yaml"),
        &Settings::default(),
    );
    let mut gate = pod_gate(&rego);
    assert_eq!(
        decide(&mut gate, "CreateContainerRequest", &req),
        Decision::Allowed
    );

    let mut r = req.clone();
    r["OCI"]["root"]["readonly"] = json!(false);
    assert!(denied_reason(&mut gate, &r).contains("must have a read-only root filesystem"));
    let mut r = req.clone();
    r["OCI"]["process"]["noNewPrivileges"] = json!(false);
    assert!(denied_reason(&mut gate, &r).contains("must run with no_new_privileges"));
    let mut r = req.clone();
    r["OCI"]["process"]["capabilities"]["effective"] = json!(["CAP_NET_BIND_SERVICE", "CAP_CHOWN"]);
    assert!(denied_reason(&mut gate, &r).contains("capability CAP_CHOWN is not allowed"));
    let mut r = req.clone();
    r["OCI"]["process"]["user"]["gid"] = json!(0);
    assert!(denied_reason(&mut gate, &r)
        .contains("gid 0 is not allowed for container \"web\" (expected 3000)"));
}

#[test]
fn namespaces_and_privileged_daemonsets() {
    let f = fixture();
    // redis lives in namespace `cache`: a request from another namespace is not its pod.
    let generated = gen(
        &f,
        &manifest("03-statefulset-redis.yaml"),
        &Settings::default(),
    )
    .unwrap();
    let (template, ns) = pod_templates(&generated.manifest).remove(0);
    assert_eq!(ns, "cache");
    let mut req = cri_request(
        &template,
        "default",
        &template["spec"]["containers"][0],
        "c1",
    );
    let mut gate = pod_gate(&generated.pods[0].rego);
    assert!(denied_reason(&mut gate, &req)
        .contains("the pod's namespace is \"cache\", not \"default\""));
    req["OCI"]["annotations"]["io.kubernetes.cri.sandbox-namespace"] = json!("cache");
    assert_eq!(
        decide(&mut gate, "CreateContainerRequest", &req),
        Decision::Allowed
    );

    // The privileged node exporter is allowed to be privileged; its image
    // user is a name, so the pod gives the ids and they are pinned.
    let (rego, mut req) = first_container_case(
        &f,
        &manifest("06-daemonset-node-exporter.yaml"),
        &Settings::default(),
    );
    let mut gate = pod_gate(&rego);
    assert_eq!(
        decide(&mut gate, "CreateContainerRequest", &req),
        Decision::Allowed
    );
    let mut as_root = req.clone();
    as_root["OCI"]["process"]["user"]["uid"] = json!(0);
    assert_ne!(
        decide(&mut gate, "CreateContainerRequest", &as_root),
        Decision::Allowed,
        "a named image user must not admit uid 0"
    );
    // ... but its host root stays read-only.
    for m in req["OCI"]["mounts"].as_array_mut().unwrap() {
        if m["destination"] == json!("/host") {
            m["options"] = json!(["rbind", "rw"]);
        }
    }
    assert!(denied_reason(&mut gate, &req).contains("mount /host is not allowed"));
}

#[test]
fn output_keeps_other_documents_and_is_reproducible() {
    let f = fixture();
    let yaml = manifest("11-multi-document.yaml");
    let a = gen(&f, &yaml, &Settings::default()).unwrap();
    let b = gen(&f, &yaml, &Settings::default()).unwrap();
    assert_eq!(a.manifest, b.manifest, "same input, same output");
    assert_eq!(a.pods.len(), 1);
    assert_eq!(a.pods[0].source, "Deployment/web");
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&a.manifest)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 3);
    assert_eq!(docs[0]["kind"], "ConfigMap");
    assert_eq!(docs[0]["data"]["default.conf"], "server { listen 80; }\n");
    assert_eq!(docs[1]["kind"], "Service");
    let template = &docs[2]["spec"]["template"];
    assert_eq!(
        template["metadata"]["annotations"]["prometheus.io/scrape"], "true",
        "existing annotations are kept"
    );
    let digest = &f.digests["docker.io/library/nginx:1.25"];
    assert_eq!(
        template["spec"]["containers"][0]["image"],
        json!(format!("docker.io/library/nginx@{digest}"))
    );
}

#[test]
fn settings_tune_the_policy() {
    let f = fixture();
    let settings = Settings::from_json(
        r#"{"request_defaults": {"ReadStreamRequest": false, "SetPolicyRequest": false},
            "allowed_exec": [["date"]],
            "pin_images": false,
            "init_data": {"aa.toml": "[token_configs.kbs]\nurl = \"https://10.0.2.2:8080\"\n"}}"#,
    )
    .unwrap();
    let generated = gen(&f, &manifest("01-pod-busybox.yaml"), &settings).unwrap();
    let pod = &generated.pods[0];
    assert!(pod.init_data.data["aa.toml"].contains("10.0.2.2:8080"));
    let mut gate = pod_gate(&pod.rego);
    assert_eq!(
        decide(&mut gate, "ReadStreamRequest", &json!({})),
        Decision::Denied { reason: None }
    );
    // Requests the settings leave out have no rule: denied.
    assert!(matches!(
        decide(&mut gate, "GuestDetailsRequest", &json!({})),
        Decision::Denied { .. }
    ));
    // Unpinned: the image stays as written, and the policy accepts it.
    let (template, ns) = pod_templates(&generated.manifest).remove(0);
    assert_eq!(template["spec"]["containers"][0]["image"], "busybox:1.36");
    let mut c = template["spec"]["containers"][0].clone();
    c["image"] = json!(format!(
        "busybox@{}",
        f.digests["docker.io/library/busybox:1.36"]
    ));
    let mut req = cri_request(&template, &ns, &c, "c1");
    assert_eq!(
        decide(&mut gate, "CreateContainerRequest", &req),
        Decision::Allowed
    );
    req["OCI"]["annotations"]["io.kubernetes.cri.image-name"] = json!("busybox:1.36");
    assert_eq!(
        decide(&mut gate, "CreateContainerRequest", &req),
        Decision::Allowed
    );
    // allowed_exec: in every container the pod's policy created.
    assert_eq!(
        decide(
            &mut gate,
            "ExecProcessRequest",
            &exec_request(&req, &json!(["date"]))
        ),
        Decision::Allowed
    );
    let mut elsewhere = exec_request(&req, &json!(["date"]));
    elsewhere["container_id"] = json!("not-created");
    assert!(matches!(
        decide(&mut gate, "ExecProcessRequest", &elsewhere),
        Decision::Denied { reason: Some(r) } if r.contains("not created under this policy")
    ));

    for (bad, why) in [
        (
            r#"{"request_defaults": {"CreateContainerRequest": true}}"#,
            "decided by the generated rules",
        ),
        (r#"{"no_such_setting": 1}"#, "unknown field"),
        (
            r#"{"init_data": {"policy.rego": "x"}}"#,
            "what genpolicy generates",
        ),
        (r#"{"shared_dir": "relative"}"#, "not an absolute path"),
    ] {
        let e = Settings::from_json(bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[test]
fn bad_manifests_and_images_are_refused() {
    let f = fixture();
    let s = Settings::default();
    let cases = [
        ("kind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: a\n    image: busybox:1.36\n    volumeMounts: [{name: nope, mountPath: /x}]\n",
         "volumeMount \"nope\" names no volume"),
        ("kind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: a\n", "needs a name and an image"),
        ("kind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n", "no containers"),
        ("kind: Service\nmetadata: {name: s}\n", "has no Pod"),
        ("kind: Pod\nspec: [\n", "not valid YAML"),
        ("kind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - {name: a, image: example.org/missing:1}\n",
         "example.org/missing:1 is in none of the OCI layouts"),
        ("kind: Deployment\nmetadata: {name: d}\nspec: {}\n", "Deployment/d: has no spec.template"),
        ("kind: Pod\nmetadata: {name: p}\nspec:\n  hostNetwork: true\n  containers:\n  - {name: a, image: busybox:1.36}\n",
         "hostNetwork: true is not supported"),
        ("kind: Pod\nmetadata: {name: p}\nspec:\n  hostPID: true\n  containers:\n  - {name: a, image: busybox:1.36}\n",
         "hostPID: true is not supported"),
        ("kind: Pod\nmetadata: {name: p}\nspec:\n  hostIPC: true\n  containers:\n  - {name: a, image: busybox:1.36}\n",
         "hostIPC: true is not supported"),
        // An image USER that is a name: its uid is the host's to choose.
        ("kind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - {name: a, image: \"quay.io/prometheus/node-exporter:v1.7.0\"}\n",
         "runs as user \"nobody\", a name genpolicy cannot resolve to a uid"),
        ("kind: Pod\nmetadata: {name: p}\nspec:\n  securityContext: {runAsGroup: 1}\n  containers:\n  - {name: a, image: \"quay.io/prometheus/node-exporter:v1.7.0\"}\n",
         "set securityContext.runAsUser"),
    ];
    for (yaml, why) in cases {
        let e = kabuto_error::chain(&gen(&f, yaml, &s).unwrap_err());
        assert!(e.contains(why), "{yaml}: {e}");
    }

    // A layout whose blob was changed after it was written.
    let digest = &f.digests["docker.io/library/busybox:1.36"];
    let path = f.layout.join("blobs/sha256").join(&digest[7..]);
    std::fs::write(&path, b"{}").unwrap();
    let e = kabuto_error::chain(&gen(&f, &manifest("01-pod-busybox.yaml"), &s).unwrap_err());
    assert!(e.contains("does not match its digest"), "{e}");
}

/// The rule the policy holds for `container` (its JSON literal).
fn container_rule(rego: &str, container: &str) -> Value {
    let tail = format!("}} if container_name == \"{container}\"");
    let end = rego.find(&tail).unwrap() + 1;
    let head = &rego[..end];
    let start = ["policy_container := {", "else := {"]
        .iter()
        .filter_map(|marker| head.rfind(marker).map(|at| at + marker.len() - 1))
        .max()
        .unwrap();
    serde_json::from_str(&rego[start..end]).unwrap()
}

/// The env check's fast paths (literal values, any-value names, per-name
/// regexes) must decide exactly as the full alternation `env` does, which
/// is matched here with the regex crate itself.
#[test]
fn env_fast_paths_decide_as_the_full_regex() {
    let f = fixture();
    for name in ["07-pod-init-and-sidecar.yaml", "08-pod-env-sources.yaml"] {
        let generated = gen(&f, &manifest(name), &Settings::default()).unwrap();
        let (template, ns) = pod_templates(&generated.manifest).remove(0);
        let rego = &generated.pods[0].rego;
        let mut gate = pod_gate(rego);
        for container in template["spec"]["containers"].as_array().unwrap() {
            let cname = container["name"].as_str().unwrap();
            let full =
                regex::Regex::new(container_rule(rego, cname)["env"].as_str().unwrap()).unwrap();
            let req = cri_request(&template, &ns, container, "c1");
            let mut candidates: Vec<String> = vec![
                "WEB_SERVICE_HOST=10.0.0.1".into(),
                "DB_HOST_SERVICE_HOST=10.0.0.1".into(),
                "DB_PORT=10.96.0.1".into(),
                "HOSTNAME=Bad_Host".into(),
                "APP_LOG=1".into(),
                "SECRET_X=y\nz".into(),
                "PATH=/tmp".into(),
                "DB_USER=any thing=with=equals\n".into(),
                "POD_IP=".into(),
                "TERM=xterm".into(),
                "KUBERNETES_SERVICE_PORT=abc".into(),
                "=x".into(),
                "NOEQUALS".into(),
            ];
            for var in req["OCI"]["process"]["env"].as_array().unwrap() {
                let var = var.as_str().unwrap();
                let (n, v) = var.split_once('=').unwrap();
                candidates.extend([
                    var.to_string(),
                    format!("{n}="),
                    format!("{var}\n"),
                    format!("{var}x"),
                    format!("{n}=x{v}"),
                    format!("{n}x={v}"),
                    format!("{}={v}", n.to_lowercase()),
                    n.to_string(),
                ]);
            }
            for candidate in candidates {
                let mut r = req.clone();
                r["OCI"]["process"]["env"] = json!([candidate]);
                let allowed = decide(&mut gate, "CreateContainerRequest", &r) == Decision::Allowed;
                assert_eq!(
                    allowed,
                    full.is_match(&candidate),
                    "{name} {cname}: {candidate:?}"
                );
            }
        }
    }
}

/// The generated policy of `yaml`'s first pod and a valid CreateContainer
/// of its first container as `c1`.
fn first_container_case(f: &Fixture, yaml: &str, settings: &Settings) -> (String, Value) {
    let generated = gen(f, yaml, settings).unwrap();
    let (template, ns) = pod_templates(&generated.manifest).remove(0);
    let req = cri_request(&template, &ns, &template["spec"]["containers"][0], "c1");
    (generated.pods[0].rego.clone(), req)
}

/// The generated policy of 03 (redis, with an exec readiness probe) and a
/// valid CreateContainer of its container as `c1`.
fn redis_case() -> (Gate, Value) {
    let (rego, req) = first_container_case(
        &fixture(),
        &manifest("03-statefulset-redis.yaml"),
        &Settings::default(),
    );
    (pod_gate(&rego), req)
}

/// What a hostile host changes in an otherwise valid CreateContainer of a
/// confidential pod: each is denied, naming the check, and changes no state.
#[test]
fn host_changes_to_the_container_are_denied() {
    let (mut gate, req) = redis_case();

    // The host's own rootfs instead of the guest-pulled, pinned image.
    let mut r = req.clone();
    r["storages"] = json!([]);
    assert!(denied_reason(&mut gate, &r).contains("must run the pinned image pulled by the guest"));
    let mut r = req.clone();
    r["storages"][0]["source"] = json!("docker.io/library/redis:7.2");
    assert!(denied_reason(&mut gate, &r).contains("guest pull of \"docker.io/library/redis:7.2\""));
    let mut r = req.clone();
    let extra = r["storages"][0].clone();
    r["storages"].as_array_mut().unwrap().push(extra);
    assert!(denied_reason(&mut gate, &r).contains("exactly one image_guest_pull storage"));
    // A root elsewhere: the guest's own files, another container's root.
    for path in ["/", "/run/kabuto/rootfs/c2", "/run/kabuto/rootfs/c1/../c2"] {
        let mut r = req.clone();
        r["OCI"]["root"]["path"] = json!(path);
        assert!(
            denied_reason(&mut gate, &r)
                .contains(&format!("root.path \"{path}\" is not the container's root")),
            "{path}"
        );
    }
    // A hook: a program of the host's, run as root in the guest.
    let mut r = req.clone();
    r["OCI"]["hooks"] = json!({"createRuntime": [{"path": "/run/kabuto/shared/c1/x"}]});
    assert!(denied_reason(&mut gate, &r).contains("hooks (createRuntime) are not allowed"));
    // The TEE's device, a shared namespace, a sysctl, a seccomp listener.
    let mut r = req.clone();
    r["OCI"]["linux"]["devices"] =
        json!([{"path": "/dev/sev-guest", "type": "c", "major": 10, "minor": 124}]);
    assert!(denied_reason(&mut gate, &r).contains("device /dev/sev-guest is not allowed"));
    // Device cgroup grants beyond containerd's (with CAP_MKNOD a container
    // makes the node itself): the guest's disk, every device.
    for grant in [
        json!({"allow": true, "type": "b", "major": 254, "minor": 0, "access": "rw"}),
        json!({"allow": true, "access": "rwm"}),
        json!({"allow": true, "type": "c", "major": 1, "minor": 1, "access": "r"}),
    ] {
        let mut r = req.clone();
        r["OCI"]["linux"]["resources"]["devices"]
            .as_array_mut()
            .unwrap()
            .push(grant.clone());
        assert!(
            denied_reason(&mut gate, &r).contains("device cgroup rule"),
            "{grant}"
        );
    }
    for ns_type in ["mount", "pid", "network"] {
        let mut r = req.clone();
        r["OCI"]["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .retain(|n| n["type"] != ns_type);
        assert!(
            denied_reason(&mut gate, &r)
                .contains(&format!("must have its own {ns_type} namespace")),
            "{ns_type}"
        );
    }
    let mut r = req.clone();
    r["OCI"]["linux"]["sysctl"] = json!({"kernel.core_pattern": "|/vol/x"});
    assert!(
        denied_reason(&mut gate, &r).contains("sysctl kernel.core_pattern=|/vol/x is not allowed")
    );
    let mut r = req.clone();
    r["OCI"]["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/x.sock",
        "syscalls": [{"names": ["openat"], "action": "SCMP_ACT_NOTIFY"}]});
    assert!(denied_reason(&mut gate, &r).contains("seccomp user notification is not allowed"));
    // A writable /proc/sys (the guest kernel's sysctls) or an unmasked /proc/kcore.
    let mut r = req.clone();
    r["OCI"]["linux"]["readonlyPaths"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p != "/proc/sys");
    assert!(denied_reason(&mut gate, &r).contains("must keep /proc/sys masked or read-only"));
    let mut r = req.clone();
    r["OCI"]["linux"]["maskedPaths"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p != "/proc/kcore");
    assert!(denied_reason(&mut gate, &r).contains("must keep /proc/kcore masked or read-only"));
    // Mounts: a read-only mount also marked rw, a bind from outside the
    // shared directory by `..`, a /dev/shm that is some other filesystem.
    let mounts = req["OCI"]["mounts"].as_array().unwrap().clone();
    let ro_index = mounts
        .iter()
        .position(|m| {
            m["options"]
                .as_array()
                .is_some_and(|o| o.contains(&json!("ro")))
        })
        .expect("a read-only mount");
    let mut r = req.clone();
    r["OCI"]["mounts"][ro_index]["options"]
        .as_array_mut()
        .unwrap()
        .push(json!("rw"));
    let destination = mounts[ro_index]["destination"].as_str().unwrap();
    assert!(denied_reason(&mut gate, &r).contains(&format!("mount {destination} is not allowed")));
    // The recursive forms libcontainer applies last: rrw lifts ro, rsuid /
    // rdev lift nosuid / nodev on host files.
    for lifting in ["rrw", "rsuid", "rdev", "suid", "dev"] {
        let mut r = req.clone();
        r["OCI"]["mounts"][ro_index]["options"]
            .as_array_mut()
            .unwrap()
            .push(json!(lifting));
        assert!(
            denied_reason(&mut gate, &r).contains(&format!("mount {destination} is not allowed")),
            "{lifting}"
        );
    }
    let bind_index = mounts
        .iter()
        .position(|m| {
            m["source"]
                .as_str()
                .is_some_and(|s| s.starts_with("/run/kabuto/shared/"))
        })
        .expect("a shared bind");
    let mut r = req.clone();
    r["OCI"]["mounts"][bind_index]["source"] = json!("/run/kabuto/shared/../../../etc");
    assert!(denied_reason(&mut gate, &r).contains("is not allowed"));
    let mut r = req.clone();
    r["OCI"]["mounts"]
        .as_array_mut()
        .unwrap()
        .retain(|m| m["destination"] != "/dev/shm");
    r["OCI"]["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/dev/shm", "type": "proc", "source": "proc", "options": []}));
    assert!(denied_reason(&mut gate, &r).contains("mount /dev/shm is not allowed"));
    let (sandbox_only, _) = redis_case();
    assert_eq!(
        gate.state(),
        sandbox_only.state(),
        "denied requests change nothing"
    );

    // The valid request; then exec of the allowed probe, changed by the host.
    assert_eq!(
        decide(&mut gate, "CreateContainerRequest", &req),
        Decision::Allowed
    );
    let probe = exec_request(&req, &json!(["redis-cli", "ping"]));
    assert_eq!(
        decide(&mut gate, "ExecProcessRequest", &probe),
        Decision::Allowed
    );
    let exec_denied = |gate: &mut Gate, exec: &Value| match decide(gate, "ExecProcessRequest", exec)
    {
        Decision::Denied { reason } => reason.unwrap_or_default(),
        Decision::Allowed => panic!("allowed: {exec:#}"),
    };
    let mut e = probe.clone();
    e["process"]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!("LD_PRELOAD=/data/x.so"));
    assert!(exec_denied(&mut gate, &e).contains("must keep the container's env"));
    let mut e = probe.clone();
    for v in e["process"]["env"].as_array_mut().unwrap() {
        if v.as_str().unwrap().starts_with("PATH=") {
            *v = json!("PATH=/data");
        }
    }
    assert!(exec_denied(&mut gate, &e).contains("env"));
    let mut e = probe.clone();
    // redis runs as root already: the host adds supplementary groups.
    e["process"]["user"] = json!({"uid": 0, "gid": 0, "additionalGids": [6, 42]});
    assert!(exec_denied(&mut gate, &e).contains("user"));
    let mut e = probe.clone();
    e["process"]["capabilities"]["effective"]
        .as_array_mut()
        .unwrap()
        .push(json!("CAP_SYS_ADMIN"));
    assert!(exec_denied(&mut gate, &e).contains("capabilities"));
    let mut e = probe.clone();
    e["process"]["cwd"] = json!("/tmp");
    assert!(exec_denied(&mut gate, &e).contains("cwd"));
    // A terminal may set TERM; no_new_privileges may be added.
    let mut e = probe.clone();
    e["process"]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!("TERM=xterm"));
    e["process"]["noNewPrivileges"] = json!(true);
    assert_eq!(
        decide(&mut gate, "ExecProcessRequest", &e),
        Decision::Allowed
    );
}

#[test]
fn host_rootfs_only_when_the_owner_allows_it() {
    let f = fixture();
    let settings = Settings::from_json(r#"{"allow_host_rootfs": true}"#).unwrap();
    let (rego, mut req) = first_container_case(&f, &manifest("01-pod-busybox.yaml"), &settings);
    let mut gate = pod_gate(&rego);
    assert_eq!(
        decide(&mut gate, "CreateContainerRequest", &req),
        Decision::Allowed
    );
    req["storages"] = json!([]);
    assert_eq!(
        decide(&mut gate, "CreateContainerRequest", &req),
        Decision::Allowed
    );
    // Still its own root path.
    req["OCI"]["root"]["path"] = json!("/");
    assert!(denied_reason(&mut gate, &req).contains("root.path \"/\""));
}

/// The runtime may send lists in another order than the create did
/// (capabilities are hash sets in oci-spec): an exec is judged by content.
#[test]
fn exec_capabilities_and_groups_compare_as_sets() {
    let (mut gate, mut req) = redis_case();
    req["OCI"]["process"]["user"]["additionalGids"] = json!([10, 20]);
    assert_eq!(
        decide(&mut gate, "CreateContainerRequest", &req),
        Decision::Allowed
    );
    let mut exec = exec_request(&req, &json!(["redis-cli", "ping"]));
    exec["process"]["capabilities"]["bounding"]
        .as_array_mut()
        .unwrap()
        .reverse();
    exec["process"]["user"]["additionalGids"] = json!([20, 10]);
    assert_eq!(
        decide(&mut gate, "ExecProcessRequest", &exec),
        Decision::Allowed
    );
    exec["process"]["user"]["additionalGids"] = json!([20, 10, 0]);
    assert!(matches!(
        decide(&mut gate, "ExecProcessRequest", &exec),
        Decision::Denied { reason: Some(r) } if r.contains("user")
    ));
}

/// envFrom admits any name with its prefix (a ConfigMap's keys are not in
/// the manifest); without a prefix, that must not include what changes
/// what a process loads or runs.
#[test]
fn env_from_patterns_never_admit_loader_variables() {
    let f = fixture();
    let yaml = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: envfrom\n  namespace: default\nspec:\n  containers:\n  - name: app\n    image: busybox:1.36\n    command: [\"sleep\", \"3600\"]\n    envFrom:\n    - configMapRef: {name: settings}\n";
    let (rego, req) = first_container_case(&f, yaml, &Settings::default());
    let mut gate = pod_gate(&rego);
    let with_env = |extra: &str| {
        let mut r = req.clone();
        r["OCI"]["process"]["env"]
            .as_array_mut()
            .unwrap()
            .push(json!(extra));
        r
    };
    assert_eq!(
        decide(
            &mut gate,
            "CreateContainerRequest",
            &with_env("LOG_LEVEL=debug")
        ),
        Decision::Allowed,
        "an ordinary ConfigMap key"
    );
    let mut gate = pod_gate(&rego);
    for var in [
        "LD_PRELOAD=/vol/x.so",
        "LD_LIBRARY_PATH=/vol",
        "PATH=/vol:/bin",
        "GLIBC_TUNABLES=x",
    ] {
        let reason = denied_reason(&mut gate, &with_env(var));
        let name = var.split('=').next().unwrap();
        assert!(
            reason.contains(&format!(
                "env variable {name} is only allowed with the exact value"
            )),
            "{var}: {reason}"
        );
    }
    // The image's own PATH (exact) stays allowed: the plain request.
    assert_eq!(
        decide(&mut gate, "CreateContainerRequest", &req),
        Decision::Allowed
    );
}

/// The pod's members join its one pause: a second pause, a member naming
/// another sandbox, or a member before the pause are denied, each named.
#[test]
fn members_join_the_pods_one_sandbox() {
    let (mut gate, req) = redis_case();
    let mut second = sandbox_request();
    second["container_id"] = json!("pod2");
    second["sandbox_id"] = json!("pod2");
    second["OCI"]["root"]["path"] = json!(format!("{ROOTFS}/pod2"));
    assert!(denied_reason(&mut gate, &second).contains("the pod's sandbox is \"pod1\" already"));
    let mut elsewhere = req.clone();
    elsewhere["sandbox_id"] = json!("pod2");
    assert!(denied_reason(&mut gate, &elsewhere)
        .contains("sandbox_id \"pod2\" is not the pod's sandbox \"pod1\""));
    let mut own = req.clone();
    own["sandbox_id"] = own["container_id"].clone();
    assert!(denied_reason(&mut gate, &own).contains("cannot be a second one"));
    let mut as_pause = req.clone();
    as_pause["container_id"] = json!("pod1");
    as_pause["OCI"]["root"]["path"] = json!(format!("{ROOTFS}/pod1"));
    assert!(
        denied_reason(&mut gate, &as_pause).contains("container id \"pod1\" is the pod sandbox's")
    );
    assert_eq!(
        decide(&mut gate, "CreateContainerRequest", &req),
        Decision::Allowed
    );

    // A fresh guest: no member before its pause, and a pause is its own sandbox.
    let (rego, _) = first_container_case(
        &fixture(),
        &manifest("03-statefulset-redis.yaml"),
        &Settings::default(),
    );
    let mut fresh = PolicyGate::new(&rego).unwrap();
    assert!(
        denied_reason(&mut fresh, &req).contains("the pod's sandbox \"pod1\" has not been created")
    );
    let mut member_pause = sandbox_request();
    member_pause["sandbox_id"] = json!("other");
    assert!(denied_reason(&mut fresh, &member_pause).contains("must be its own sandbox"));
    // A container run as a VM of its own (ctr run, no pause) is the pod's
    // sandbox, and then the only one.
    let mut alone = req.clone();
    alone["sandbox_id"] = alone["container_id"].clone();
    assert_eq!(
        decide(&mut fresh, "CreateContainerRequest", &alone),
        Decision::Allowed
    );
    assert!(denied_reason(&mut fresh, &sandbox_request()).contains("already"));
}

/// The pod network's requests as the runtime builds them from a CNI
/// namespace (eth0 on a bridge, IPv4 and IPv6, a default route), in the
/// JSON the guest's gate judges.
fn network_requests() -> Vec<(&'static str, Value)> {
    use kabuto_netlink::{Interface, LinkKind, Neighbour, Route};
    use kabuto_protocol::{agent, network};
    let eth0 = Interface {
        name: "eth0".into(),
        index: 2,
        mac: vec![0x0a, 0x58, 10, 88, 0, 5],
        mtu: 1500,
        kind: LinkKind::Veth,
        addresses: vec![
            ("10.88.0.5".parse().unwrap(), 16),
            ("fd00:88::5".parse().unwrap(), 64),
        ],
    };
    let default = Route {
        destination: None,
        gateway: Some("10.88.0.1".parse().unwrap()),
        source: None,
        device: Some(2),
        mtu: None,
    };
    let subnet = Route {
        destination: Some(("10.88.0.0".parse().unwrap(), 16)),
        gateway: None,
        source: Some("10.88.0.5".parse().unwrap()),
        device: Some(2),
        mtu: None,
    };
    let neighbour = Neighbour {
        ip: "10.88.0.1".parse().unwrap(),
        mac: vec![2, 0, 0, 0, 0, 1],
        device: 2,
    };
    let input = |m: &dyn protobuf::MessageDyn| kabuto_policy::request_input(m).unwrap();
    vec![
        (
            "UpdateInterfaceRequest",
            input(&agent::UpdateInterfaceRequest {
                interface: protobuf::MessageField::some(network::interface_message(&eth0)),
                ..Default::default()
            }),
        ),
        (
            "UpdateRoutesRequest",
            input(&agent::UpdateRoutesRequest {
                routes: protobuf::MessageField::some(agent::Routes {
                    Routes: vec![
                        network::route_message(&subnet, "eth0"),
                        network::route_message(&default, "eth0"),
                    ],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        (
            "AddARPNeighborsRequest",
            input(&agent::AddARPNeighborsRequest {
                neighbors: protobuf::MessageField::some(agent::ARPNeighbors {
                    ARPNeighbors: vec![network::neighbour_message(&neighbour, "eth0")],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
    ]
}

#[test]
fn the_pods_network_is_allowed_and_nothing_that_leads_elsewhere() {
    let f = fixture();
    let generated = gen(&f, &manifest("01-pod-busybox.yaml"), &Settings::default()).unwrap();
    let mut gate = pod_gate(&generated.pods[0].rego);
    let requests = network_requests();
    for (name, input) in &requests {
        assert_eq!(
            decide(&mut gate, name, input),
            Decision::Allowed,
            "{name}: {input:#}"
        );
    }
    for name in ["ListInterfacesRequest", "ListRoutesRequest"] {
        assert_eq!(
            decide(&mut gate, name, &json!({})),
            Decision::Allowed,
            "{name}"
        );
    }
    let denied = |gate: &mut Gate, name: &str, input: &Value, why: &str| {
        assert!(
            matches!(decide(gate, name, input), Decision::Denied { .. }),
            "{why}: {input:#}"
        );
    };
    let (_, interface) = &requests[0];
    for (field, value, why) in [
        ("name", json!("lo"), "the loopback"),
        ("name", json!("vxlan0"), "a NIC that is not a pod's"),
        ("devicePath", json!("0000:00:03.0"), "a hot-plug path"),
        (
            "reserved_hwAddr",
            json!("02:6b:62:00:00:01"),
            "a reserved NIC taken over",
        ),
        ("raw_flags", json!(1), "raw link flags"),
        ("type", json!("tap"), "a link type"),
    ] {
        let mut changed = interface.clone();
        changed["interface"][field] = value;
        denied(&mut gate, "UpdateInterfaceRequest", &changed, why);
    }
    let (_, routes) = &requests[1];
    let mut to_loopback = routes.clone();
    to_loopback["routes"]["Routes"][1]["device"] = json!("lo");
    denied(
        &mut gate,
        "UpdateRoutesRequest",
        &to_loopback,
        "a route into the guest itself",
    );
    let mut flagged = routes.clone();
    flagged["routes"]["Routes"][0]["flags"] = json!(4);
    denied(&mut gate, "UpdateRoutesRequest", &flagged, "route flags");
    let (_, neighbours) = &requests[2];
    let mut learnt = neighbours.clone();
    learnt["neighbors"]["ARPNeighbors"][0]["state"] = json!(2);
    denied(
        &mut gate,
        "AddARPNeighborsRequest",
        &learnt,
        "a neighbour that is not static",
    );
}

#[test]
fn a_pod_without_a_network_is_denied_one() {
    let f = fixture();
    let settings = Settings {
        pod_network: false,
        ..Settings::default()
    };
    let generated = gen(&f, &manifest("01-pod-busybox.yaml"), &settings).unwrap();
    let mut gate = pod_gate(&generated.pods[0].rego);
    for (name, input) in network_requests() {
        assert!(
            matches!(decide(&mut gate, name, &input), Decision::Denied { .. }),
            "{name} allowed"
        );
    }
}

/// A sealed secret in a manifest's env is pinned as the sealed string: the
/// guest unseals it after the policy judged the request, so the plaintext
/// (or another sealed value) in its place is denied.
#[test]
fn a_sealed_env_value_is_pinned_sealed() {
    let f = fixture();
    let sealed = "sealed.eyJhbGciOiJFUzI1NiIsImtpZCI6ImsifQ.eyJ2ZXJzaW9uIjoiMC4xLjAifQ.c2ln";
    let yaml = manifest("07-pod-init-and-sidecar.yaml").replace(
        "    image: registry.example.com/team/app:v3\n",
        &format!(
            "    image: registry.example.com/team/app:v3\n    env:\n    - {{name: DB_PASSWORD, value: \"{sealed}\"}}\n"
        ),
    );
    assert!(yaml.contains(sealed));
    let generated = gen(&f, &yaml, &Settings::default()).unwrap();
    let (template, ns) = pod_templates(&generated.manifest).remove(0);
    let app = template["spec"]["containers"][0].clone();
    let req = cri_request(&template, &ns, &app, "c1");
    let mut gate = pod_gate(&generated.pods[0].rego);
    assert!(req["OCI"]["process"]["env"]
        .as_array()
        .unwrap()
        .contains(&json!(format!("DB_PASSWORD={sealed}"))));
    assert_eq!(
        decide(&mut gate, "CreateContainerRequest", &req),
        Decision::Allowed
    );
    for other in [
        "hunter2",
        "sealed.eyJhbGciOiJFUzI1NiIsImtpZCI6ImsifQ.e30.c2ln",
    ] {
        let mut r = req.clone();
        for e in r["OCI"]["process"]["env"].as_array_mut().unwrap() {
            if e.as_str().is_some_and(|v| v.starts_with("DB_PASSWORD=")) {
                *e = json!(format!("DB_PASSWORD={other}"));
            }
        }
        let reason = denied_reason(&mut gate, &r);
        assert!(reason.contains("DB_PASSWORD"), "{other}: {reason}");
    }
}
