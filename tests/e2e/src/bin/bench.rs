//! `kabuto-bench`: start-up, exec and memory figures for kabuto next to
//! their baselines (runc, a bare QEMU boot of the same kernel), measured in
//! the same run. Prints a Markdown table; run it through scripts/bench.sh.
//!
//! Usage: kabuto-bench [--runs N] [--max-pods N] [--policy-only]
//!
//! Each figure is a median: of N samples for (a), of 3N for (b) and (c);
//! kabuto and its baseline take turns, sample by sample.

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use kabuto_e2e::{paths, processes_matching, stderr, Containerd, IMAGE, RUNTIME};

const RUNC: &str = "io.containerd.runc.v2";

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Time from spawning `cmd` until its first stdout line.
fn time_to_first_line(cmd: &mut Command) -> Duration {
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let took = started.elapsed();
    let status = child.wait().expect("wait");
    if line.trim().is_empty() || !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        panic!("no first line ({status}): {err}");
    }
    took
}

/// `ctr run --rm --runtime RUNTIME [extra] IMAGE id echo first-line`, timed
/// to its first output line.
fn first_line(c: &Containerd, runtime: &str, id: &str, extra: &[&str]) -> Duration {
    let mut args = vec!["run", "--rm", "--runtime", runtime];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, id, "echo", "first-line"]);
    time_to_first_line(&mut ctr_cmd(c, &args))
}

fn ctr_cmd(c: &Containerd, args: &[&str]) -> Command {
    let mut cmd = Command::new("ctr");
    cmd.arg("--address").arg(c.socket()).args(args);
    cmd
}

fn bare_qemu_boot(initramfs: &Path) -> Duration {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let tsc = kabuto_runtime::hypervisor::host_tsc_khz(&cpuinfo).unwrap_or(0);
    let kernel = paths().guest_dir.join("vmlinux");
    let append = format!(
        "console=ttyS0 reboot=k panic=-1 quiet rdinit=/init cryptomgr.notests i8042.noaux \
         i8042.nomux i8042.nopnp i8042.dumbkbd random.trust_cpu=on pci=off tsc_early_khz={tsc}"
    );
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,rtc=on,isa-serial=on,acpi=on",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        "1",
        "-m",
        "512M",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
    ]);
    cmd.arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(append);
    time_to_first_line(&mut cmd)
}

/// A field of /proc/<pid>/smaps_rollup, in KiB.
fn smaps_field(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Host processes of one sandbox (QEMU, helpers) and its shim: (name, pid).
fn sandbox_pids(c: &Containerd, sandbox: &str) -> Vec<(String, u32)> {
    let dir = c.sandbox_dir(sandbox);
    let mut procs = processes_matching(&dir.display().to_string());
    // The shim serving this sandbox: its -id is the sandbox id.
    procs.extend(
        processes_matching(&format!("-id {sandbox} "))
            .into_iter()
            .filter(|(_, cmd)| {
                cmd.contains("containerd-shim-kabuto-v2")
                    && cmd.contains(&c.dir.path().display().to_string())
            }),
    );
    procs
        .into_iter()
        .map(|(pid, cmd)| {
            let exe = cmd.split_whitespace().next().unwrap_or("");
            (exe.rsplit('/').next().unwrap_or("").to_string(), pid)
        })
        .collect()
}

/// Median exec round trips into each task, the tasks taking turns so that a
/// slow phase of the machine hits both alike.
fn exec_round_trips(c: &Containerd, ids: [&str; 2], n: usize) -> [Duration; 2] {
    let mut times = [Vec::new(), Vec::new()];
    for i in 0..n {
        for (id, samples) in ids.iter().zip(times.iter_mut()) {
            let exec_id = format!("x{i}");
            let started = Instant::now();
            let out = c.ctr(&["task", "exec", "--exec-id", &exec_id, id, "true"]);
            samples.push(started.elapsed());
            assert!(out.status.success(), "exec: {}", stderr(&out));
        }
    }
    let [k, r] = times;
    [median(k), median(r)]
}

fn main() {
    let mut runs = 5usize;
    let mut max_pods = 24usize;
    let mut policy_only = false;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => {
                runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(runs)
                    .max(1)
            }
            "--max-pods" => max_pods = it.next().and_then(|v| v.parse().ok()).unwrap_or(max_pods),
            "--policy-only" => policy_only = true,
            other => {
                eprintln!(
                    "unknown argument {other}; usage: kabuto-bench [--runs N] [--max-pods N]"
                );
                std::process::exit(2);
            }
        }
    }
    // Policy gate decision latency (no VM needed).
    let policy_rows = kabuto_e2e::policy_bench::measure(10_000);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let policy_row = |cold: Option<Duration>| {
        for row in &policy_rows {
            let share = cold
                .map(|c| {
                    format!(
                        "{:.3}% of a cold start",
                        row.p99.as_secs_f64() * 100.0 / c.as_secs_f64()
                    )
                })
                .unwrap_or_else(|| "–".into());
            println!(
                "| policy gate: {}, generated {}-container policy (p50 / p99; target p99 < 1 ms) | {:.0} µs / {:.0} µs | allow-all {:.0} µs / {:.0} µs | {share} |",
                row.request,
                kabuto_e2e::policy_bench::CONTAINERS,
                us(row.p50),
                us(row.p99),
                us(row.floor_p50),
                us(row.floor_p99),
            );
        }
    };
    if policy_only {
        println!("| figure | kabuto | baseline | ratio |");
        println!("| --- | --- | --- | --- |");
        policy_row(None);
        return;
    }
    let c = Containerd::start();
    let scratch = tempfile::tempdir().expect("tempdir");
    // The floor: an /init that prints one line and powers off.
    let floor_initramfs = kabuto_e2e::busybox_initramfs(
        scratch.path(),
        "floor",
        "echo first-line\n/busybox poweroff -f",
    );
    println!("| figure | kabuto | baseline | ratio |");
    println!("| --- | --- | --- | --- |");

    // (a) Cold start to the first output line.
    let mut kabuto = Vec::new();
    let mut runc = Vec::new();
    let mut floor = Vec::new();
    for i in 0..runs {
        floor.push(bare_qemu_boot(&floor_initramfs));
        let id = format!("cold-k{i}");
        kabuto.push(first_line(&c, RUNTIME, &id, &[]));
        let id = format!("cold-r{i}");
        runc.push(first_line(&c, RUNC, &id, &[]));
    }
    let (k, r, f) = (median(kabuto), median(runc), median(floor));
    let cold_start = k;
    println!(
        "| (a) cold pod start → first line (vs bare QEMU boot, the floor) | {} | {} | {:.2}× |",
        ms(k),
        ms(f),
        k.as_secs_f64() / f.as_secs_f64()
    );
    println!(
        "| (a) cold pod start → first line (vs runc) | {} | {} | {:.1}× |",
        ms(k),
        ms(r),
        k.as_secs_f64() / r.as_secs_f64()
    );

    // (b) A second container in a running pod.
    c.run_detached(
        "pod",
        &[
            "--annotation",
            "io.kubernetes.cri.container-type=sandbox",
            "--annotation",
            "io.kubernetes.cri.sandbox-id=pod",
        ],
        &["sleep", "100000"],
    );
    // (b) and (c) are cheap and noisier than (a): three samples per run.
    let warm_samples = runs * 3;
    let mut second = Vec::new();
    let mut runc_second = Vec::new();
    for i in 0..warm_samples {
        let id = format!("second-k{i}");
        second.push(first_line(
            &c,
            RUNTIME,
            &id,
            &[
                "--annotation",
                "io.kubernetes.cri.container-type=container",
                "--annotation",
                "io.kubernetes.cri.sandbox-id=pod",
            ],
        ));
        let id = format!("second-r{i}");
        runc_second.push(first_line(&c, RUNC, &id, &[]));
    }
    let (k, r) = (median(second), median(runc_second));
    println!(
        "| (b) second container in a running pod → first line (vs runc) | {} | {} | {:.2}× |",
        ms(k),
        ms(r),
        k.as_secs_f64() / r.as_secs_f64()
    );

    // (c) exec round trip.
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNC,
        IMAGE,
        "runc-idle",
        "sleep",
        "100000",
    ]);
    assert!(out.status.success(), "runc: {}", stderr(&out));
    let [k, r] = exec_round_trips(&c, ["pod", "runc-idle"], warm_samples);
    println!(
        "| (c) `ctr task exec … true` round trip (vs runc) | {} | {} | {:.2}× |",
        ms(k),
        ms(r),
        k.as_secs_f64() / r.as_secs_f64()
    );

    // (d) Host memory of one idle pod.
    std::thread::sleep(Duration::from_secs(2));
    let pids = sandbox_pids(&c, "pod");
    let mut total = 0;
    let mut parts = Vec::new();
    for (name, pid) in &pids {
        let pss = smaps_field(*pid, "Pss:");
        total += pss;
        parts.push(format!("{name} {} MiB", pss / 1024));
    }
    println!(
        "| (d) host memory per idle pod (PSS: {}) | {} MiB | – | – |",
        parts.join(", "),
        total / 1024
    );
    if let Some((_, qemu)) = pids.iter().find(|(n, _)| n.starts_with("qemu")) {
        println!(
            "| (d) qemu detail: anonymous {} MiB (guest RAM touched + TCG code cache), shared-memory guest RAM {} MiB, file-backed {} MiB | | | |",
            smaps_field(*qemu, "Pss_Anon:") / 1024,
            smaps_field(*qemu, "Pss_Shmem:") / 1024,
            smaps_field(*qemu, "Pss_File:") / 1024,
        );
    }
    c.kill_and_delete("pod");
    c.kill_and_delete("runc-idle");

    // (e) Idle pods this machine holds, all still answering exec.
    let mut held = 0;
    let mut reason = format!("stopped at --max-pods {max_pods}");
    let mut ids = Vec::new();
    for i in 0..max_pods {
        let id = format!("idle{i}");
        let out = c.ctr(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            IMAGE,
            &id,
            "sleep",
            "100000",
        ]);
        if !out.status.success() {
            reason = format!("pod {} failed to start: {}", i + 1, stderr(&out).trim());
            break;
        }
        ids.push(id);
        let all_answer = ids.iter().all(|id| {
            c.ctr(&["task", "exec", "--exec-id", "ping", id, "true"])
                .status
                .success()
        });
        if !all_answer {
            reason = format!("with {} pods, not all answered exec", i + 1);
            break;
        }
        held = i + 1;
        let avail = fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if avail < 1024 * 1024 {
            reason = format!("stopped with {} MiB available", avail / 1024);
            break;
        }
    }
    println!("| (e) idle pods held, all answering exec | {held} ({reason}) | – | – |");
    policy_row(Some(cold_start));
    for id in ids {
        c.kill_and_delete(&id);
    }
}
