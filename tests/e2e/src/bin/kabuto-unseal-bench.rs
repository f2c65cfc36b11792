//! Unseal latency, in a confidential pod (software TEE, through
//! containerd, the KBS on the host's loopback): per request from the
//! pod's container to its data hub, `POST /cdh/unseal` of a vault and an
//! envelope secret next to `GET /cdh/resource` of the same resource (one
//! KBS fetch) and a 404 (no KBS at all), in the same run. Each row is one
//! `ctr task exec` running the request N times in a loop, less the same
//! exec with an empty loop, divided by N. Prints a Markdown table for
//! docs/benchmarks.md. Unsealing a container's env value at create does
//! the same work as one `POST /cdh/unseal`.
//!
//! Usage: kabuto-unseal-bench [--requests N] [--runs R]
//! Needs KABUTO_E2E_BIN_DIR / KABUTO_E2E_GUEST_DIR (scripts/bench.sh).

use std::time::{Duration, Instant};

use kabuto_e2e::confidential::{confidential_containerd, init_data_annotation, Kbs};
use kabuto_sealed_secret::{PrivateSigningKey, Secret};

const KID: &str = "kbs:///default/sealing-key/bench";

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let requests = arg(&args, "--requests", 20).max(1);
    let runs = arg(&args, "--runs", 3).max(1);
    let work = tempfile::tempdir().expect("tempdir");
    let kbs = Kbs::start(work.path());
    let swtee = work.path().join("swtee");
    let c = confidential_containerd(&swtee, "", Vec::new());
    let doc = kbs.init_data(kabuto_policy::ALLOW_ALL, "");
    kbs.trust(&c, &swtee, &[&doc]);
    let key = PrivateSigningKey::generate();
    let kek = [5u8; 32];
    for (path, value) in [
        (
            "default/sealing-key/bench",
            key.public().to_jwk(KID).into_bytes(),
        ),
        ("default/db/password", b"bench-plaintext".to_vec()),
        ("default/kek/bench", kek.to_vec()),
    ] {
        kbs.admin.set_resource(path, &value).expect("resource");
    }
    let vault = key.seal(
        &Secret::vault("kbs:///default/db/password").expect("vault"),
        KID,
    );
    let envelope = key.seal(
        &Secret::envelope("kbs:///default/kek/bench", &kek, b"bench-plaintext").expect("envelope"),
        KID,
    );
    // The secrets go in without their prefix: a sealed env value would be
    // unsealed at create.
    let unprefixed = |s: &str| {
        s.trim_start_matches(kabuto_sealed_secret::PREFIX)
            .to_string()
    };
    let pod = "unseal-bench";
    c.run_detached(
        pod,
        &[
            "--net-host",
            "--annotation",
            &init_data_annotation(&doc),
            "--env",
            &format!("VAULT={}", unprefixed(&vault)),
            "--env",
            &format!("ENVELOPE={}", unprefixed(&envelope)),
        ],
        &["sleep", "100000"],
    );
    let hub = "http://127.0.0.1:8006";
    let rows = [
        ("GET /nope (404, no KBS)", format!("wget -q -O- {hub}/nope")),
        (
            "GET /cdh/resource (one KBS fetch, baseline)",
            format!("wget -qO- {hub}/cdh/resource/default/db/password"),
        ),
        (
            "POST /cdh/unseal, vault",
            format!("wget -qO- --post-data \"sealed.$VAULT\" {hub}/cdh/unseal"),
        ),
        (
            "POST /cdh/unseal, envelope",
            format!("wget -qO- --post-data \"sealed.$ENVELOPE\" {hub}/cdh/unseal"),
        ),
    ];
    let mut exec_id = 0;
    let mut timed = |body: &str, n: usize| -> Duration {
        exec_id += 1;
        let script =
            format!("i=0; while [ $i -lt {n} ]; do {body} >/dev/null || true; i=$((i+1)); done");
        let started = Instant::now();
        let out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            &format!("b{exec_id}"),
            pod,
            "sh",
            "-c",
            &script,
        ]);
        let took = started.elapsed();
        assert!(out.status.success(), "{}", kabuto_e2e::stderr(&out));
        took
    };
    // Every request must work before it is timed.
    for (label, body) in &rows[1..] {
        let out = c.ctr(&["task", "exec", "--exec-id", "check", pod, "sh", "-c", body]);
        assert_eq!(
            kabuto_e2e::stdout(&out),
            "bench-plaintext",
            "{label}: {}",
            kabuto_e2e::stderr(&out)
        );
    }
    let mut per_call: Vec<f64> = Vec::new();
    for (_, body) in &rows {
        let mut samples: Vec<f64> = (0..runs)
            .map(|_| {
                let empty = timed(body, 0);
                let full = timed(body, requests);
                (full.as_secs_f64() - empty.as_secs_f64()) * 1e3 / requests as f64
            })
            .collect();
        samples.sort_by(f64::total_cmp);
        per_call.push(samples[samples.len() / 2]);
    }
    println!("\n| request from the pod's container | per request (ms) | vs GET /cdh/resource |");
    println!("| --- | --- | --- |");
    for ((label, _), ms) in rows.iter().zip(&per_call) {
        println!("| {label} | {ms:.1} | {:.2}× |", ms / per_call[1]);
    }
    println!(
        "\nmedian of {runs} runs of {requests} requests each (busybox wget in the container, 1 vCPU under TCG); \
         each run less an exec of an empty loop"
    );
    c.kill_and_delete(pod);
}
