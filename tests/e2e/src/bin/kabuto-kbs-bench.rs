//! Benchmark (not a test): RCAR handshakes per second with the KBS on one
//! core and the clients on the other, against a plain-HTTP baseline
//! (`GET /kbs/v0/token-key`) measured in the same run; and SNP report
//! verification time against a bare ECDSA P-384 verification.
//!
//! `--coco` drives the server with CoCo-shaped clients instead: CoCo's
//! sample evidence (`tee: sample`, `{svn, report_data}`) and EC P-256 TEE
//! keys, no init-data, as trustee's own test clients attest, so the figure
//! compares with a trustee KBS under the same client.
//!
//! Usage: kabuto-kbs-bench [--seconds N] [--testdata DIR] [--coco]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kabuto_attestation_agent::{evidence, KbsClient, TeeKind};

const INIT_DATA: &str = "version = \"0.1.0\"\nalgorithm = \"sha256\"\n\n[data]\n";

fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

struct Stats {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Runs `op` on `clients` threads (pinned to `cpu`) for `seconds`.
fn load(
    clients: usize,
    seconds: f64,
    cpu: usize,
    op: Arc<dyn Fn(usize) -> anyhow::Result<()> + Send + Sync>,
) -> anyhow::Result<Stats> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut threads = Vec::new();
    for id in 0..clients {
        let op = op.clone();
        threads.push(std::thread::spawn(
            move || -> anyhow::Result<Vec<Duration>> {
                pin_to_cpu(cpu);
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    op(id)?;
                    latencies.push(t.elapsed());
                }
                Ok(latencies)
            },
        ));
    }
    let mut all = Vec::new();
    for t in threads {
        all.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??,
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    Ok(Stats {
        per_second: all.len() as f64 / elapsed,
        p50_ms: percentile(&all, 0.50),
        p99_ms: percentile(&all, 0.99),
    })
}

fn main() -> anyhow::Result<()> {
    let mut seconds = 5.0;
    let mut testdata = PathBuf::from("../shared/testdata/attestation");
    let mut coco = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--coco" => coco = true,
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| anyhow::anyhow!("--seconds N"))?
            }
            "--testdata" => {
                testdata = args
                    .next()
                    .map(PathBuf::from)
                    .ok_or_else(|| anyhow::anyhow!("--testdata DIR"))?
            }
            other => {
                anyhow::bail!("unknown argument {other} (--seconds N, --testdata DIR, --coco)")
            }
        }
    }
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (server_cpu, client_cpu) = if cpus >= 2 { (0, 1) } else { (0, 0) };

    // The KBS, in process, on a single-threaded runtime pinned to one core.
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let (admin_private, admin_public) = kabuto_kbs::client::generate_admin_key()?;
    std::fs::write(dir.path().join("admin.pub"), admin_public)?;
    let config_text = format!(
        "listen = \"127.0.0.1:{port}\"\nstore = \"{d}/store.redb\"\ntoken_key = \"{d}/token.key\"\n[tls]\ninsecure_http = true\n[[admin_keys]]\npublic_key = \"{d}/admin.pub\"\nroles = [\"admin\"]\n[attestation]\naccept_sample = {coco}\n",
        d = dir.path().display()
    );
    std::fs::write(dir.path().join("kbs.toml"), config_text)?;
    let config = kabuto_kbs::config::Config::load(&dir.path().join("kbs.toml"))?;
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        pin_to_cpu(server_cpu);
        let _ = tid_tx.send(nix::unistd::gettid().as_raw());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        if let Ok(runtime) = runtime {
            let _ = runtime.block_on(kabuto_kbs::serve(config));
        }
    });
    let server_tid = tid_rx.recv()?;
    // Nanoseconds the (single-threaded) server has run on its CPU so far.
    let server_cpu_ns = move || -> u64 {
        std::fs::read_to_string(format!("/proc/self/task/{server_tid}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the KBS did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The software TEE's firmware, as the runtime runs it.
    kabuto_swtee::init(&dir.path().join("swtee"))?;
    let firmware = Arc::new(kabuto_swtee::Firmware::load(&dir.path().join("swtee"))?);
    let launch = kabuto_swtee::LaunchData {
        measurement: kabuto_swtee::measurement(b"k", b"i", "c"),
        host_data: kabuto_initdata::InitData::parse(INIT_DATA.as_bytes())?
            .digest_for_field(32)
            .try_into()
            .map_err(|_| anyhow::anyhow!("digest length"))?,
    };
    let admin = kabuto_kbs::client::AdminClient::new(&url, admin_private.into_bytes(), None)?;
    admin.set_software_tee_roots(&std::fs::read(kabuto_swtee::root_cert_path(
        &dir.path().join("swtee"),
    ))?)?;

    // In-process firmware: a duplex pipe per request.
    struct Pipe {
        input: std::io::Cursor<Vec<u8>>,
        firmware: Arc<kabuto_swtee::Firmware>,
        launch: kabuto_swtee::LaunchData,
        request: Vec<u8>,
    }
    impl std::io::Write for Pipe {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.request.extend_from_slice(b);
            if self.request.len() >= 64 {
                let mut out = Vec::new();
                let mut duplex = Duplex(std::io::Cursor::new(self.request.clone()), &mut out);
                self.firmware
                    .serve_one(&self.launch, &mut duplex)
                    .map_err(std::io::Error::other)?;
                self.input = std::io::Cursor::new(out);
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl std::io::Read for Pipe {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(b)
        }
    }
    struct Duplex<'a>(std::io::Cursor<Vec<u8>>, &'a mut Vec<u8>);
    impl std::io::Read for Duplex<'_> {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(b)
        }
    }
    impl std::io::Write for Duplex<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.1.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    // The owner's reference values: unregistered evidence is refused.
    if coco {
        // Sample evidence has no measurement and binds no init-data.
        for name in ["measurement", "init_data"] {
            admin.set_reference_values(name, &serde_json::json!([""]))?;
        }
    } else {
        admin.set_reference_values(
            "measurement",
            &serde_json::json!([hex::encode(launch.measurement)]),
        )?;
        admin.set_reference_values(
            "init_data",
            &serde_json::json!([hex::encode(launch.host_data)]),
        )?;
    }
    let make_client = || -> anyhow::Result<KbsClient> {
        if coco {
            return Ok(KbsClient::new(
                &url,
                None,
                Box::new(evidence::SampleAttester),
                None,
            )?);
        }
        let firmware = firmware.clone();
        let connect: evidence::Connector = Box::new(move || {
            Ok(Box::new(Pipe {
                input: std::io::Cursor::new(Vec::new()),
                firmware: firmware.clone(),
                launch,
                request: Vec::new(),
            }) as Box<dyn evidence::ReadWrite>)
        });
        let provider = kabuto_attestation_agent::provider(TeeKind::SoftwareTee, Some(connect))?;
        Ok(KbsClient::new(
            &url,
            None,
            provider,
            Some(INIT_DATA.into()),
        )?)
    };

    let clients_are = if coco {
        "CoCo-shaped clients: sample evidence, EC P-256 keys"
    } else {
        "kabuto clients: software-TEE SNP reports, EC P-256 keys, init-data"
    };
    println!("# kabuto-kbs benchmark ({seconds} s per row; KBS on CPU {server_cpu}, clients on CPU {client_cpu}; {clients_are})\n");
    println!("| clients | RCAR handshakes/s | p50 ms | p99 ms | KBS CPU ms per handshake | baseline GET/s | baseline p50 ms | baseline p99 ms |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for clients in [1usize, 8, 64] {
        let pool: Arc<Vec<KbsClient>> = Arc::new(
            (0..clients)
                .map(|_| make_client())
                .collect::<anyhow::Result<_>>()?,
        );
        let cpu_before = server_cpu_ns();
        let handshakes = {
            let pool = pool.clone();
            load(
                clients,
                seconds,
                client_cpu,
                Arc::new(move |id| {
                    pool[id].attest()?;
                    Ok(())
                }),
            )?
        };
        let server_ms = (server_cpu_ns() - cpu_before) as f64
            / 1e6
            / (handshakes.per_second * seconds).max(1.0);
        let agent = ureq::AgentBuilder::new().max_idle_connections(128).build();
        let token_url = format!("{url}/kbs/v0/token-key");
        let baseline = load(
            clients,
            seconds,
            client_cpu,
            Arc::new(move |_| {
                agent.get(&token_url).call()?.into_string()?;
                Ok(())
            }),
        )?;
        println!(
            "| {clients} | {:.0} | {:.2} | {:.2} | {server_ms:.2} | {:.0} | {:.2} | {:.2} |",
            handshakes.per_second,
            handshakes.p50_ms,
            handshakes.p99_ms,
            baseline.per_second,
            baseline.p50_ms,
            baseline.p99_ms
        );
    }

    if coco {
        return Ok(());
    }
    // SNP report verification (real Milan report) vs a bare P-384 verify.
    let report = std::fs::read(testdata.join("snp/report-v2.bin"));
    let vcek = std::fs::read(testdata.join("snp/report-v2.vcek.der"));
    match (report, vcek) {
        (Ok(report), Ok(vcek)) => {
            let verifier = kabuto_verifier::Verifier::new(Default::default());
            let n = 200;
            let t = Instant::now();
            for _ in 0..n {
                verifier.verify_snp_report(&report, std::slice::from_ref(&vcek))?;
            }
            let full = t.elapsed().as_secs_f64() * 1000.0 / n as f64;
            let bare = kabuto_verifier::snp::bench_bare_signature(&report, &vcek, n)?;
            println!("\n| SNP report verification (real Milan report, {n} runs) | ms per report |");
            println!("|---|---:|");
            println!("| full: parse, ARK→ASK→VCEK chain, signature, TCB, chip id | {full:.2} |");
            println!("| baseline: the report's ECDSA P-384 signature alone | {bare:.2} |");
            println!(
                "\nCeiling set by that one signature check per handshake: {:.0} handshakes/s per core.",
                1000.0 / bare
            );
        }
        _ => println!(
            "\nSKIPPED SNP verification timing: no test vectors under {}",
            testdata.display()
        ),
    }
    Ok(())
}
