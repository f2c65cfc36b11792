//! `kabuto-bench`: start-up, exec and memory figures for kabuto next to
//! their baselines (runc, a bare QEMU boot of the same kernel), measured in
//! the same run. Prints a Markdown table; run it through scripts/bench.sh.
//!
//! Usage: kabuto-bench [--runs N] [--max-pods N]

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use kabuto_e2e::{paths, stderr, Containerd, IMAGE, RUNTIME};

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

fn ctr_cmd(c: &Containerd, args: &[&str]) -> Command {
    let mut cmd = Command::new("ctr");
    cmd.arg("--address").arg(c.socket()).args(args);
    cmd
}

/// An initramfs whose /init prints one line and powers off: the floor.
fn trivial_initramfs(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("floor-root");
    fs::create_dir_all(root.join("dev")).expect("mkdir");
    fs::copy("/bin/busybox", root.join("busybox")).expect("busybox");
    fs::write(
        root.join("init"),
        "#!/busybox sh\necho first-line\n/busybox poweroff -f\n",
    )
    .expect("init");
    Command::new("chmod")
        .arg("755")
        .arg(root.join("init"))
        .status()
        .expect("chmod");
    let out = dir.join("floor.cpio");
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc > {} 2>/dev/null",
            root.display(),
            out.display()
        ))
        .status()
        .expect("cpio")
        .success();
    assert!(ok, "cpio failed");
    out
}

fn bare_qemu_boot(initramfs: &Path) -> Duration {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let tsc = kabuto_runtime_tsc(&cpuinfo);
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

/// The same TSC reading the QEMU driver uses.
fn kabuto_runtime_tsc(cpuinfo: &str) -> u64 {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|mhz| (mhz * 1000.0).round() as u64)
        .unwrap_or(0)
}

fn pss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn smaps_field(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Host pids belonging to one sandbox (QEMU, helpers) and the shim.
fn sandbox_pids(c: &Containerd, sandbox: &str) -> Vec<(String, u32)> {
    let dir = c.state_dir().join("sandboxes").join(sandbox);
    let needle = dir.display().to_string();
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline =
            String::from_utf8_lossy(&fs::read(entry.path().join("cmdline")).unwrap_or_default())
                .replace('\0', " ");
        if cmdline.contains(&needle) {
            let name = cmdline
                .split_whitespace()
                .next()
                .unwrap_or("")
                .rsplit('/')
                .next()
                .unwrap_or("")
                .to_string();
            out.push((name, pid));
        }
    }
    // The shim serving this sandbox: its -id is the sandbox id.
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline =
            String::from_utf8_lossy(&fs::read(entry.path().join("cmdline")).unwrap_or_default())
                .replace('\0', " ");
        if cmdline.contains("containerd-shim-kabuto-v2")
            && cmdline.contains(&format!("-id {sandbox} "))
            && cmdline.contains(&c.dir.path().display().to_string())
        {
            out.push(("containerd-shim-kabuto-v2".into(), pid));
        }
    }
    out
}

fn start_detached(c: &Containerd, runtime: &str, id: &str, annotations: &[&str]) {
    let mut args = vec!["run", "-d", "--runtime", runtime];
    for a in annotations {
        args.push("--annotation");
        args.push(a);
    }
    args.extend_from_slice(&[IMAGE, id, "sleep", "100000"]);
    let out = c.ctr(&args);
    assert!(out.status.success(), "starting {id}: {}", stderr(&out));
}

fn stop(c: &Containerd, id: &str) {
    let _ = c.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    c.eventually(Duration::from_secs(30), || {
        c.ctr(&["task", "delete", id]).status.success()
    });
    let _ = c.ctr(&["container", "rm", id]);
}

fn exec_round_trip(c: &Containerd, id: &str, n: usize) -> Duration {
    let mut times = Vec::new();
    for i in 0..n {
        let exec_id = format!("x{i}");
        let started = Instant::now();
        let out = c.ctr(&["task", "exec", "--exec-id", &exec_id, id, "true"]);
        times.push(started.elapsed());
        assert!(out.status.success(), "exec: {}", stderr(&out));
    }
    median(times)
}

fn main() {
    let mut runs = 5usize;
    let mut max_pods = 24usize;
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
            other => {
                eprintln!(
                    "unknown argument {other}; usage: kabuto-bench [--runs N] [--max-pods N]"
                );
                std::process::exit(2);
            }
        }
    }
    let c = Containerd::start();
    let scratch = tempfile::tempdir().expect("tempdir");
    let floor_initramfs = trivial_initramfs(scratch.path());
    println!("| figure | kabuto | baseline | ratio |");
    println!("| --- | --- | --- | --- |");

    // (a) Cold start to the first output line.
    let mut kabuto = Vec::new();
    let mut runc = Vec::new();
    let mut floor = Vec::new();
    for i in 0..runs {
        floor.push(bare_qemu_boot(&floor_initramfs));
        let id = format!("cold-k{i}");
        kabuto.push(time_to_first_line(&mut ctr_cmd(
            &c,
            &[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                IMAGE,
                &id,
                "echo",
                "first-line",
            ],
        )));
        let id = format!("cold-r{i}");
        runc.push(time_to_first_line(&mut ctr_cmd(
            &c,
            &[
                "run",
                "--rm",
                "--runtime",
                RUNC,
                IMAGE,
                &id,
                "echo",
                "first-line",
            ],
        )));
    }
    let (k, r, f) = (median(kabuto), median(runc), median(floor));
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
    start_detached(
        &c,
        RUNTIME,
        "pod",
        &[
            "io.kubernetes.cri.container-type=sandbox",
            "io.kubernetes.cri.sandbox-id=pod",
        ],
    );
    let mut second = Vec::new();
    let mut runc_second = Vec::new();
    for i in 0..runs {
        let id = format!("second-k{i}");
        second.push(time_to_first_line(&mut ctr_cmd(
            &c,
            &[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                "--annotation",
                "io.kubernetes.cri.container-type=container",
                "--annotation",
                "io.kubernetes.cri.sandbox-id=pod",
                IMAGE,
                &id,
                "echo",
                "first-line",
            ],
        )));
        let id = format!("second-r{i}");
        runc_second.push(time_to_first_line(&mut ctr_cmd(
            &c,
            &[
                "run",
                "--rm",
                "--runtime",
                RUNC,
                IMAGE,
                &id,
                "echo",
                "first-line",
            ],
        )));
    }
    let (k, r) = (median(second), median(runc_second));
    println!(
        "| (b) second container in a running pod → first line (vs runc) | {} | {} | {:.2}× |",
        ms(k),
        ms(r),
        k.as_secs_f64() / r.as_secs_f64()
    );

    // (c) exec round trip.
    start_detached(&c, RUNC, "runc-idle", &[]);
    let k = exec_round_trip(&c, "pod", runs.max(5));
    let r = exec_round_trip(&c, "runc-idle", runs.max(5));
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
        let pss = pss_kib(*pid);
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
    stop(&c, "pod");
    stop(&c, "runc-idle");

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
    for id in ids {
        stop(&c, &id);
    }
}
