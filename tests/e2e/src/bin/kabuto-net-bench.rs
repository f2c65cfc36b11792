//! Pod networking benchmark (issue 17): kabuto pods next to runc pods on
//! the same CNI bridge (Debian's bridge + host-local plugins), measured in
//! the same run and printed as a Markdown table for docs/benchmarks.md:
//!
//! - TCP throughput host → pod and pod → pod (Debian's iperf3, copied with
//!   its libraries into a test image);
//! - HTTP request latency at a fixed request rate (busybox httpd in the
//!   pod, a new connection per request, as a probe or a plain client
//!   makes), p50 and p99;
//! - the start time a pod network adds (`ctr run -d` into a CNI
//!   namespace, against `ctr run -d` into an empty one).
//!
//! Usage: kabuto-net-bench [--runs N] [--seconds S] [--rate R]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use kabuto_e2e::{image_with, stderr, CniNetwork, Containerd, Registry};

const RUNC: &str = "io.containerd.runc.v2";
const NETWORK: &str = "bench";

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// An image of busybox plus Debian's iperf3 and the libraries it links.
fn iperf_image(dir: &Path) -> std::path::PathBuf {
    let ldd = std::process::Command::new("ldd")
        .arg("/usr/bin/iperf3")
        .output()
        .expect("ldd (apt-get install iperf3)");
    // At /bin, where the busybox image's PATH finds it.
    let mut paths = Vec::new();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(str::to_string);
        paths.extend(path);
    }
    let binary = (
        "bin/iperf3".to_string(),
        std::fs::read("/usr/bin/iperf3").expect("iperf3"),
    );
    let contents: Vec<(String, Vec<u8>)> = std::iter::once(binary)
        .chain(paths.iter().map(|p| {
            let real = std::fs::canonicalize(p).expect("library");
            (
                p.trim_start_matches('/').to_string(),
                std::fs::read(real).expect("read"),
            )
        }))
        .collect();
    let files: Vec<(&str, u32, &[u8])> = contents
        .iter()
        .map(|(p, data)| (p.as_str(), 0o755, data.as_slice()))
        .chain([("www/index.html", 0o644, b"kabuto-bench\n".as_slice())])
        .collect();
    image_with(dir, "iperf", &files, serde_json::json!({}))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Pod {
    id: String,
    net: CniNetwork,
}

/// Starts `args` in a new pod of `runtime` on the bench bridge; returns
/// the pod and how long `ctr run -d` took.
fn start(
    c: &Containerd,
    dir: &Path,
    image: &str,
    runtime: &str,
    id: &str,
    args: &[&str],
) -> (Pod, Duration) {
    let net = CniNetwork::join(dir, NETWORK, id, 241, 1500);
    let with_ns = format!("network:{}", net.netns);
    let mut all = vec![
        "run",
        "-d",
        "--runtime",
        runtime,
        "--with-ns",
        &with_ns,
        image,
        id,
    ];
    all.extend_from_slice(args);
    let started = Instant::now();
    let out = c.ctr(&all);
    let took = started.elapsed();
    assert!(out.status.success(), "{id}: {}", stderr(&out));
    (
        Pod {
            id: id.to_string(),
            net,
        },
        took,
    )
}

fn stop(c: &Containerd, pod: Pod) {
    let _ = c.ctr(&["task", "kill", "-s", "SIGKILL", &pod.id]);
    c.wait_stopped(&pod.id);
    let _ = c.ctr(&["task", "delete", &pod.id]);
    let _ = c.ctr(&["container", "rm", &pod.id]);
}

/// `ctr run -d` of `true`-like sleeper without a pod network.
fn start_plain(c: &Containerd, image: &str, runtime: &str, id: &str) -> Duration {
    let started = Instant::now();
    let out = c.ctr(&["run", "-d", "--runtime", runtime, image, id, "sleep", "100"]);
    let took = started.elapsed();
    assert!(out.status.success(), "{id}: {}", stderr(&out));
    let _ = c.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    c.wait_stopped(id);
    let _ = c.ctr(&["task", "delete", id]);
    let _ = c.ctr(&["container", "rm", id]);
    took
}

/// iperf3's received throughput (Gbit/s) from its JSON report; `None`
/// when it reports an error (the server not listening yet).
fn gbits(json: &str) -> Option<f64> {
    let report: serde_json::Value = serde_json::from_str(json).ok()?;
    Some(report["end"]["sum_received"]["bits_per_second"].as_f64()? / 1e9)
}

/// Runs an iperf3 client (`command`) until it reports, for up to a minute.
fn iperf(mut command: impl FnMut() -> std::process::Output) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = command();
        if let Some(rate) = gbits(&String::from_utf8_lossy(&out.stdout)) {
            return rate;
        }
        assert!(
            Instant::now() < deadline,
            "iperf3: {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn iperf_host_to(ip: &str, seconds: u64) -> f64 {
    iperf(|| {
        std::process::Command::new("iperf3")
            .args(["-c", ip, "-t", &seconds.to_string(), "-J"])
            .output()
            .expect("iperf3")
    })
}

fn iperf_pod_to(c: &Containerd, from: &Pod, ip: &str, seconds: u64) -> f64 {
    let mut attempt = 0;
    iperf(|| {
        attempt += 1;
        c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            &format!("iperf-client-{attempt}"),
            &from.id,
            "iperf3",
            "-c",
            ip,
            "-t",
            &seconds.to_string(),
            "-J",
        ])
    })
}

/// How long a TCP handshake with `address` takes (the guest's kernel
/// answers it: the network path alone, no server process).
fn connect(address: SocketAddr) -> Option<Duration> {
    let started = Instant::now();
    let stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).ok()?;
    let took = started.elapsed();
    drop(stream);
    Some(took)
}

fn get(address: SocketAddr) -> Option<Duration> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body).ok()?;
    body.starts_with(b"HTTP/1").then(|| started.elapsed())
}

/// p50 and p99 (ms) of `probe` at `rate` requests per second for
/// `seconds`, and how many failed.
fn latency(
    address: SocketAddr,
    probe: fn(SocketAddr) -> Option<Duration>,
    rate: u64,
    seconds: u64,
) -> (f64, f64, usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(address).is_none() {
        assert!(Instant::now() < deadline, "{address} does not answer");
        std::thread::sleep(Duration::from_millis(300));
    }
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut samples = Vec::new();
    let mut failures = 0;
    let begin = Instant::now();
    for i in 0..rate * seconds {
        let due = begin + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        match probe(address) {
            Some(d) => samples.push(d.as_secs_f64() * 1000.0),
            None => failures += 1,
        }
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    (
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        failures,
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs = arg(&args, "--runs", 3) as usize;
    let seconds = arg(&args, "--seconds", 5);
    let rate = arg(&args, "--rate", 20);
    let work = tempfile::tempdir().expect("tempdir");
    let d = work.path();
    let registry = Registry::start();
    let image = registry.push_layout(&iperf_image(d), "latest", "bench/iperf");
    let c = Containerd::start();
    let pull = c.ctr(&["image", "pull", "--plain-http", &image]);
    assert!(pull.status.success(), "{}", stderr(&pull));

    let serve = ["sh", "-c", "httpd -p 8080 -h /www && exec iperf3 -s"];
    let mut rows = Vec::new();
    let mut results = std::collections::HashMap::new();
    for (label, runtime) in [("kabuto", kabuto_e2e::RUNTIME), ("runc", RUNC)] {
        let mut with_net = Vec::new();
        let mut without = Vec::new();
        for r in 0..runs {
            let (pod, took) = start(
                &c,
                d,
                &image,
                runtime,
                &format!("{label}-s{r}"),
                &["sleep", "100"],
            );
            with_net.push(took.as_secs_f64());
            stop(&c, pod);
            without.push(start_plain(&c, &image, runtime, &format!("{label}-p{r}")).as_secs_f64());
        }
        let (server, _) = start(&c, d, &image, runtime, &format!("{label}-srv"), &serve);
        let (client, _) = start(
            &c,
            d,
            &image,
            runtime,
            &format!("{label}-cli"),
            &["sleep", "1000"],
        );
        let host_to_pod = iperf_host_to(&server.net.ipv4, seconds);
        let pod_to_pod = iperf_pod_to(&c, &client, &server.net.ipv4, seconds);
        let address: SocketAddr = format!("{}:8080", server.net.ipv4)
            .parse()
            .expect("address");
        let http = latency(address, get, rate, seconds);
        let handshake = latency(address, connect, rate, seconds);
        stop(&c, client);
        stop(&c, server);
        results.insert(
            label,
            (
                median(with_net) - median(without.clone()),
                median(without),
                host_to_pod,
                pod_to_pod,
                http,
                handshake,
            ),
        );
    }
    let k = results["kabuto"];
    let r = results["runc"];
    rows.push(format!(
        "| TCP host → pod (iperf3, {seconds} s) | {:.2} Gbit/s | {:.2} Gbit/s | {:.3}× |",
        k.2,
        r.2,
        k.2 / r.2
    ));
    rows.push(format!(
        "| TCP pod → pod, same bridge (iperf3, {seconds} s) | {:.2} Gbit/s | {:.2} Gbit/s | {:.3}× |",
        k.3,
        r.3,
        k.3 / r.3
    ));
    for (what, k_lat, r_lat) in [
        ("TCP handshake (connect)", k.5, r.5),
        ("HTTP GET (busybox httpd, a process per request)", k.4, r.4),
    ] {
        rows.push(format!(
            "| {what} p50, {rate}/s for {seconds} s | {:.2} ms | {:.2} ms | {:.1}× |",
            k_lat.0,
            r_lat.0,
            k_lat.0 / r_lat.0
        ));
        rows.push(format!(
            "| {what} p99 (failed: kabuto {}, runc {}) | {:.2} ms | {:.2} ms | {:.1}× |",
            k_lat.2,
            r_lat.2,
            k_lat.1,
            r_lat.1,
            k_lat.1 / r_lat.1
        ));
    }
    rows.push(format!(
        "| start time the pod network adds (median of {runs}; start without it) | {:+.0} ms ({:.0} ms) | {:+.0} ms ({:.0} ms) | |",
        k.0 * 1000.0,
        k.1 * 1000.0,
        r.0 * 1000.0,
        r.1 * 1000.0
    ));
    println!(
        "| pod networking (CNI bridge) | kabuto | runc (baseline, same run) | kabuto / runc |"
    );
    println!("| --- | --- | --- | --- |");
    for row in rows {
        println!("{row}");
    }
}
