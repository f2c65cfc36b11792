//! Decision latency of the policy gate for a policy shaped like a generated
//! one: ten containers, each pinned by args, image, env patterns and mounts.

use std::time::{Duration, Instant};

use kabuto_policy::{Decision, PolicyGate};
use serde_json::json;

pub const CONTAINERS: usize = 10;

/// A policy allowing exactly the ten containers `spec(i)` describes.
pub fn ten_container_policy() -> String {
    let containers: Vec<serde_json::Value> = (0..CONTAINERS)
        .map(|i| {
            json!({
                "image": format!("registry.example/app{i}@sha256:{:064x}", i + 1),
                "args": ["/bin/app", format!("--instance={i}"), "--listen=:8080"],
                "env": [
                    "^PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin$",
                    "^HOSTNAME=[a-z0-9-]+$",
                    "^KUBERNETES_[A-Z_]+=.*$",
                    format!("^APP_ID={i}$"),
                ],
                "mounts": ["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys",
                           "/etc/hosts", "/etc/resolv.conf", "/var/run/secrets/kubernetes.io/serviceaccount"],
                "readonly_root": i.is_multiple_of(2),
            })
        })
        .collect();
    format!(
        r#"package agent_policy

containers := {containers}

default CreateContainerRequest := {{"allowed": false, "reason": "no container of the policy matches"}}

CreateContainerRequest := true if {{
    some c in containers
    input.OCI.annotations["io.kubernetes.cri.image-name"] == c.image
    input.OCI.process.args == c.args
    every e in input.OCI.process.env {{
        some p in c.env
        regex.match(p, e)
    }}
    every m in input.OCI.mounts {{
        m.destination in c.mounts
    }}
    input.OCI.root.readonly == c.readonly_root
}}

default ExecProcessRequest := false
default ReadStreamRequest := true
default WaitProcessRequest := true
"#,
        containers = serde_json::to_string_pretty(&containers).unwrap_or_default()
    )
}

/// A CreateContainerRequest input for container `i`.
pub fn input(i: usize) -> serde_json::Value {
    let mounts: Vec<serde_json::Value> = [
        "/proc",
        "/dev",
        "/dev/pts",
        "/dev/shm",
        "/dev/mqueue",
        "/sys",
        "/etc/hosts",
        "/etc/resolv.conf",
        "/var/run/secrets/kubernetes.io/serviceaccount",
    ]
    .iter()
    .map(|d| json!({"destination": d, "type": "bind", "source": format!("/run/x{d}")}))
    .collect();
    json!({
        "container_id": format!("c{i}"),
        "exec_id": "",
        "sandbox_id": "pod",
        "OCI": {
            "ociVersion": "1.1.0",
            "annotations": {"io.kubernetes.cri.image-name": format!("registry.example/app{i}@sha256:{:064x}", i + 1)},
            "process": {
                "args": ["/bin/app", format!("--instance={i}"), "--listen=:8080"],
                "env": [
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "HOSTNAME=pod-abc",
                    "KUBERNETES_SERVICE_HOST=10.0.0.1",
                    "KUBERNETES_SERVICE_PORT=443",
                    format!("APP_ID={i}"),
                ],
                "cwd": "/",
            },
            "root": {"path": "/run/kabuto/shared/c/rootfs", "readonly": i.is_multiple_of(2)},
            "mounts": mounts,
        }
    })
}

/// p50 and p99 of `rounds` decisions over the ten containers (all allowed),
/// plus one denied request checked to be denied.
pub fn measure(rounds: usize) -> (Duration, Duration) {
    let mut gate = PolicyGate::new(&ten_container_policy()).expect("bench policy parses");
    let mut denied = input(3);
    denied["OCI"]["process"]["args"][1] = json!("--instance=evil");
    assert!(
        matches!(
            gate.decide("CreateContainerRequest", &denied),
            Ok(Decision::Denied { .. })
        ),
        "the bench policy must deny a changed arg"
    );
    let mut times = Vec::with_capacity(rounds);
    for r in 0..rounds {
        let req = input(r % CONTAINERS);
        let started = Instant::now();
        let decision = gate.decide("CreateContainerRequest", &req);
        times.push(started.elapsed());
        assert_eq!(
            decision.ok(),
            Some(Decision::Allowed),
            "container {} must be allowed",
            r % CONTAINERS
        );
    }
    times.sort();
    (times[times.len() / 2], times[times.len() * 99 / 100])
}
