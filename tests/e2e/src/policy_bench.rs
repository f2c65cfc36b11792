//! Decision latency of the policy gate for a policy made by the real
//! generator (`kabuto_genpolicy`) from a ten-container pod: each container
//! pinned by image digest, args, env, mounts, capabilities and user.

use std::time::{Duration, Instant};

use kabuto_genpolicy::{GenPolicyError, ImageConfig, ImageResolver, ResolvedImage, Settings};
use kabuto_policy::{Decision, PolicyGate};
use serde_json::json;

pub const CONTAINERS: usize = 10;

const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Images of the benchmark pod, resolved without a registry: the bench
/// measures the gate, not image lookups.
struct BenchImages;

fn digest(i: usize) -> String {
    format!("sha256:{:064x}", i + 1)
}

impl ImageResolver for BenchImages {
    fn resolve(&mut self, image: &str) -> Result<ResolvedImage, GenPolicyError> {
        let i: usize = image
            .trim_start_matches("registry.example/app")
            .trim_end_matches(":v1")
            .parse()
            .map_err(|_| GenPolicyError::Image {
                image: image.into(),
                reason: "not a bench image".into(),
            })?;
        Ok(ResolvedImage {
            pinned: format!("registry.example/app{i}@{}", digest(i)),
            digest: digest(i),
            config: ImageConfig {
                entrypoint: Some(vec!["/bin/app".into()]),
                env: Some(vec![PATH.into(), format!("APP_VERSION=1.{i}")]),
                working_dir: Some("/srv".into()),
                ..Default::default()
            },
        })
    }
}

fn pod_manifest() -> String {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: bench, namespace: default}\nspec:\n  \
         volumes:\n  - {name: conf, configMap: {name: conf}}\n  containers:\n",
    );
    for i in 0..CONTAINERS {
        yaml.push_str(&format!(
            "  - name: app{i}\n    image: registry.example/app{i}:v1\n    \
             args: [\"--instance={i}\", \"--listen=:8080\"]\n    \
             env:\n    - {{name: APP_ID, value: \"{i}\"}}\n    \
             - name: TOKEN\n      valueFrom: {{secretKeyRef: {{name: t, key: t}}}}\n    \
             volumeMounts:\n    - {{name: conf, mountPath: /etc/app}}\n    \
             readinessProbe: {{exec: {{command: [\"/bin/app\", \"--check\"]}}}}\n"
        ));
    }
    yaml
}

/// The generated policy of the ten-container pod.
pub fn generated_policy() -> String {
    let generated =
        kabuto_genpolicy::generate(&pod_manifest(), &Settings::default(), &mut BenchImages)
            .expect("the bench pod generates");
    generated.pods[0].rego.clone()
}

/// The CreateContainerRequest containerd's CRI plugin sends for container `i`.
pub fn input(i: usize) -> serde_json::Value {
    let shared = "/run/kabuto/shared";
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs"}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts"}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue"}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]}),
    ];
    for (n, (dest, ro)) in [
        ("/etc/hosts", false),
        ("/etc/hostname", false),
        ("/etc/resolv.conf", false),
        ("/dev/shm", false),
        ("/dev/termination-log", false),
        ("/etc/app", true),
        ("/var/run/secrets/kubernetes.io/serviceaccount", true),
    ]
    .iter()
    .enumerate()
    {
        mounts.push(json!({"destination": dest, "type": "bind",
            "source": format!("{shared}/c{i}/mounts/{n}"),
            "options": ["rbind", if *ro { "ro" } else { "rw" }]}));
    }
    let caps = Settings::default().default_capabilities;
    let image = format!("registry.example/app{i}@{}", digest(i));
    json!({
        "container_id": format!("c{i}"),
        "exec_id": "",
        "sandbox_id": "pod",
        "storages": [{"driver": "image_guest_pull", "source": image}],
        "OCI": {
            "ociVersion": "1.1.0",
            "annotations": {
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.container-name": format!("app{i}"),
                "io.kubernetes.cri.image-name": image,
                "io.kubernetes.cri.sandbox-namespace": "default",
            },
            "process": {
                "user": {"uid": 0, "gid": 0},
                "args": ["/bin/app", format!("--instance={i}"), "--listen=:8080"],
                "env": [
                    PATH, format!("APP_VERSION=1.{i}"), format!("APP_ID={i}"), "TOKEN=s3cr3t",
                    "HOSTNAME=bench", "KUBERNETES_SERVICE_HOST=10.96.0.1", "KUBERNETES_SERVICE_PORT=443",
                ],
                "cwd": "/srv",
                "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            },
            "root": {"path": format!("/run/kabuto/rootfs/c{i}"), "readonly": false},
            "mounts": mounts,
            "linux": {"maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"], "readonlyPaths": ["/proc/bus", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
                      "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]},
        }
    })
}

/// The pod's pause, created before its containers (they join it).
fn sandbox_input() -> serde_json::Value {
    json!({
        "container_id": "pod", "exec_id": "", "sandbox_id": "pod",
        "OCI": {
            "ociVersion": "1.1.0",
            "annotations": {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "pod"},
            "process": {"user": {"uid": 65535, "gid": 65535}, "args": ["/pause"],
                        "env": [PATH], "cwd": "/",
                        "capabilities": {"bounding": ["CAP_CHOWN"]}, "noNewPrivileges": true},
            "root": {"path": "/run/kabuto/rootfs/pod", "readonly": true},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                       {"destination": "/dev/shm", "type": "bind", "source": "/run/kabuto/shared/pod/mounts/1-shm", "options": ["rbind", "ro"]}],
            "linux": {"maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
                      "readonlyPaths": ["/proc/bus", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
                      "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]},
        }
    })
}

/// One row of the benchmark: a request kind's p50 and p99 under the
/// generated policy and under allow-all (the gate's floor: JSON in, a
/// trivial rule, JSON out).
pub struct Row {
    pub request: &'static str,
    pub p50: Duration,
    pub p99: Duration,
    pub floor_p50: Duration,
    pub floor_p99: Duration,
}

fn percentiles(mut times: Vec<Duration>) -> (Duration, Duration) {
    times.sort();
    (times[times.len() / 2], times[times.len() * 99 / 100])
}

/// Builds the input of round `r`.
type MakeInput<'a> = dyn Fn(usize) -> serde_json::Value + 'a;

/// `rounds` decisions of `request` with inputs from `make`; each must
/// come out as `expect`.
fn time_request(
    gate: &mut PolicyGate,
    request: &str,
    rounds: usize,
    make: &MakeInput<'_>,
    expect: &Decision,
) -> (Duration, Duration) {
    let mut times = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let req = make(r);
        let started = Instant::now();
        let decision = gate.decide(request, &req);
        times.push(started.elapsed());
        assert_eq!(decision.ok().as_ref(), Some(expect), "{request} round {r}");
    }
    percentiles(times)
}

/// Decisions over the ten containers, after checking a changed arg is
/// denied: CreateContainerRequest (allowed), ExecProcessRequest of a probe
/// (allowed, reads the policy state) and of a shell (denied, with its
/// reason), ReadStreamRequest (a settings default).
pub fn measure(rounds: usize) -> Vec<Row> {
    let policy = generated_policy();
    let mut gate = PolicyGate::new(&policy).expect("generated policy parses");
    assert_eq!(
        gate.decide("CreateContainerRequest", &sandbox_input()).ok(),
        Some(Decision::Allowed),
        "the bench pod's pause"
    );
    let mut floor = PolicyGate::allow_all();
    let mut denied = input(3);
    denied["OCI"]["process"]["args"][1] = json!("--instance=evil");
    assert!(
        matches!(
            gate.decide("CreateContainerRequest", &denied),
            Ok(Decision::Denied { .. })
        ),
        "the bench policy must deny a changed arg"
    );
    let create = |r: usize| input(r % CONTAINERS);
    // containerd builds an exec from the container's process.
    let probe = |r: usize| {
        let mut process = input(r % CONTAINERS)["OCI"]["process"].clone();
        process["args"] = json!(["/bin/app", "--check"]);
        json!({"container_id": format!("c{}", r % CONTAINERS), "exec_id": "p", "process": process})
    };
    let shell = |r: usize| {
        json!({"container_id": format!("c{}", r % CONTAINERS), "exec_id": "s",
               "process": {"args": ["sh"], "cwd": "/"}})
    };
    let read = |r: usize| json!({"container_id": format!("c{}", r % CONTAINERS), "exec_id": "", "len": 32768});
    let shell_denied = Decision::Denied {
        reason: Some("exec of [\"sh\"] in container \"app0\" is not in the pod's policy".into()),
    };
    let mut rows = Vec::new();
    let cases: [(&'static str, &MakeInput<'_>, Decision); 4] = [
        ("CreateContainerRequest", &create, Decision::Allowed),
        ("ExecProcessRequest", &probe, Decision::Allowed),
        ("ExecProcessRequest", &shell, shell_denied),
        ("ReadStreamRequest", &read, Decision::Allowed),
    ];
    for (request, make, expect) in cases {
        // The denied shell's reason names the container: check it on c0 only.
        let (p50, p99) = if matches!(expect, Decision::Denied { .. }) {
            time_request(&mut gate, request, rounds, &|_| make(0), &expect)
        } else {
            time_request(&mut gate, request, rounds, make, &expect)
        };
        let (floor_p50, floor_p99) =
            time_request(&mut floor, request, rounds, make, &Decision::Allowed);
        rows.push(Row {
            request: if matches!(expect, Decision::Denied { .. }) {
                "ExecProcessRequest (denied)"
            } else {
                request
            },
            p50,
            p99,
            floor_p50,
            floor_p99,
        });
    }
    rows
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_bench_decision_comes_out_as_expected() {
        let rows = super::measure(20);
        assert_eq!(rows.len(), 4);
        assert!(rows.iter().all(|r| r.p50 <= r.p99));
    }
}
