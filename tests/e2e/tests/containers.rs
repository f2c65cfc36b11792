//! What a user does with `ctr` and runc works the same with kabuto.

use std::{process::Command, time::Duration};

use kabuto_e2e::{guest_kernel_release, stderr, stdout, Containerd, IMAGE, RUNTIME};

const RUNC: &str = "io.containerd.runc.v2";

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn container_runs_on_the_guest_kernel() {
    let c = Containerd::start();
    let out = c.run("uname", &[], &["uname", "-r"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let guest = stdout(&out).trim().to_string();
    assert_eq!(guest, guest_kernel_release());
    let host = Command::new("uname").arg("-r").output().expect("uname");
    assert_ne!(
        guest,
        stdout(&host).trim(),
        "the container ran on the host kernel"
    );
    c.assert_no_residue();
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn exit_codes_and_output_streams() {
    let c = Containerd::start();
    let out = c.run(
        "codes",
        &[],
        &["sh", "-c", "echo to-out; echo to-err >&2; exit 3"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(stdout(&out), "to-out\n");
    assert!(stderr(&out).contains("to-err\n"), "{}", stderr(&out));

    // Killed by a signal: 128 + signal number, like runc.
    c.run_detached("killed", &[], &["sleep", "1000"]);
    let deleted = c.kill_and_delete("killed");
    assert!(deleted.contains("exit code 137"), "{deleted}");
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn stdin_is_piped_in() {
    let c = Containerd::start();
    let input: Vec<u8> = (0..20_000)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .collect();
    let out = c.ctr_with_stdin(
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "stdin",
            "sh",
            "-c",
            "wc -l; exit 5",
        ],
        Some(&input),
    );
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "20000");
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn tty_gets_a_terminal_of_the_clients_size() {
    let c = Containerd::start();
    // script(1) gives ctr a terminal; stty sets the size ctr forwards.
    let inner = format!(
        "stty rows 33 cols 91; ctr --address {} run -t --rm --runtime {RUNTIME} {IMAGE} tty \
         sh -c 'tty; stty size; exit 4'",
        c.socket().display()
    );
    let out = Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .output()
        .expect("script(1)");
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(text.contains("/dev/pts/0"), "{text}");
    assert!(text.contains("33 91"), "{text}");
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn detached_task_exec_ps_metrics_kill_delete() {
    let c = Containerd::start();
    c.run_detached(
        "bg",
        &[],
        &[
            "sh",
            "-c",
            "trap 'exit 42' USR1; while true; do sleep 0.1; done",
        ],
    );

    let exec = |args: &[&str]| {
        let mut all = vec!["task", "exec", "--exec-id", "e1", "bg"];
        all.extend_from_slice(args);
        c.ctr(&all)
    };
    let out = exec(&["sh", "-c", "echo from-exec; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(stdout(&out), "from-exec\n");
    // An exec id can be used again once its process is gone.
    for _ in 0..2 {
        let out = exec(&["echo", "again"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), "again\n");
    }

    let out = c.ctr(&["task", "ps", "bg"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The header plus at least the shell (guest pids).
    assert!(stdout(&out).lines().count() >= 2, "{}", stdout(&out));

    let out = c.ctr(&["task", "metrics", "bg"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let metrics = stdout(&out);
    assert!(
        metrics.contains("memory.usage") && metrics.contains("cpu.usage_usec"),
        "{metrics}"
    );

    // Any signal reaches the process: the trap turns SIGUSR1 into exit 42.
    let out = c.ctr(&["task", "kill", "-s", "SIGUSR1", "bg"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(c.wait_stopped("bg"), "task did not stop");
    let deleted = c.delete("bg");
    assert!(deleted.contains("exit code 42"), "{deleted}");
    c.assert_no_residue();
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn exit_status_of_a_detached_task_is_kept_until_delete() {
    let c = Containerd::start();
    c.run_detached("quick", &[], &["sh", "-c", "exit 9"]);
    assert!(c.wait_stopped("quick"));
    std::thread::sleep(Duration::from_secs(1));
    let deleted = c.delete("quick");
    assert!(deleted.contains("exit code 9"), "{deleted}");
}

/// The same probe under runc and kabuto must report the same view of the
/// OCI spec: user, cwd, env, rlimits, capabilities, no_new_privileges,
/// read-only rootfs, masked and read-only paths, bind mounts.
#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn oci_spec_is_honoured_like_runc() {
    let c = Containerd::start();
    let host_dir = c.dir.path().join("shared-data");
    std::fs::create_dir_all(&host_dir).expect("mkdir");
    std::fs::write(host_dir.join("hello.txt"), "from the host\n").expect("write");
    let bind = format!(
        "type=bind,src={},dst=/data,options=rbind:ro",
        host_dir.display()
    );
    let probe = r#"
        echo "id=$(id)"; echo "cwd=$(pwd)"; echo "FOO=$FOO"; echo "nofile=$(ulimit -n)"
        grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status
        [ -s /proc/kcore ] && echo kcore=visible || echo kcore=hidden
        (echo 1 > /proc/sys/kernel/domainname) 2>/dev/null && echo procsys=rw || echo procsys=ro
        touch /rootfs-write 2>/dev/null && echo rootfs=rw || echo rootfs=ro
        cat /data/hello.txt; (touch /data/x 2>/dev/null && echo data=rw) || echo data=ro
        grep -c . /proc/mounts >/dev/null && echo mounts=ok
    "#;
    let run = |runtime: &str, id: &str| {
        let out = c.ctr(&[
            "run",
            "-d",
            "--runtime",
            runtime,
            "--env",
            "FOO=bar",
            "--read-only",
            "--mount",
            &bind,
            IMAGE,
            id,
            "sleep",
            "1000",
        ]);
        assert!(out.status.success(), "{runtime}: {}", stderr(&out));
        let probe_out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "probe",
            "--user",
            "65534",
            "--cwd",
            "/tmp",
            id,
            "sh",
            "-c",
            probe,
        ]);
        c.kill_and_delete(id);
        probe_out
    };
    let runc = run(RUNC, "probe-runc");
    assert!(runc.status.success(), "runc: {}", stderr(&runc));
    let kabuto = run(RUNTIME, "probe-kabuto");
    assert!(kabuto.status.success(), "kabuto: {}", stderr(&kabuto));
    assert_eq!(stdout(&kabuto), stdout(&runc), "kabuto and runc disagree");
    let text = stdout(&kabuto);
    for expected in [
        "uid=65534",
        "cwd=/tmp",
        "FOO=bar",
        "rootfs=ro",
        "from the host",
        "data=ro",
        "kcore=hidden",
        "procsys=ro",
    ] {
        assert!(text.contains(expected), "missing {expected}:\n{text}");
    }
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn privileged_and_memory_limit() {
    let c = Containerd::start();
    // Capabilities as runc grants them, privileged or not.
    for extra in [&[][..], &["--privileged"][..]] {
        let run = |runtime: &str, id: &str| {
            let mut args = vec!["run", "--rm", "--runtime", runtime];
            args.extend_from_slice(extra);
            args.extend_from_slice(&[IMAGE, id, "grep", "CapEff", "/proc/self/status"]);
            c.ctr(&args)
        };
        let runc = run(RUNC, "p-runc");
        let kabuto = run(RUNTIME, "p-kabuto");
        assert!(kabuto.status.success(), "{extra:?}: {}", stderr(&kabuto));
        assert_eq!(
            stdout(&kabuto),
            stdout(&runc),
            "capabilities differ for {extra:?}"
        );
    }
    // The memory limit lands on the container's cgroup in the guest.
    c.run_detached(
        "limited",
        &["--memory-limit", "67108864"],
        &["sleep", "1000"],
    );
    let metrics = stdout(&c.ctr(&["task", "metrics", "limited"]));
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("memory.usage_limit") && l.contains("67108864")),
        "{metrics}"
    );
    c.kill_and_delete("limited");
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn oom_kill_is_reported() {
    use std::io::Read;
    let c = Containerd::start();
    let mut events = Command::new("ctr")
        .arg("--address")
        .arg(c.socket())
        .arg("events")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ctr events");
    // Doubling a shell string until the 32 MiB limit is hit.
    let out = c.run(
        "hog",
        &["--memory-limit", "33554432"],
        &["sh", "-c", "x=0123456789; while true; do x=$x$x; done"],
    );
    assert_eq!(out.status.code(), Some(137), "{}", stderr(&out));
    std::thread::sleep(Duration::from_secs(1));
    let _ = events.kill();
    let mut text = String::new();
    events
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut text)
        .expect("events");
    let _ = events.wait();
    assert!(
        text.lines().any(|l| l.contains("/tasks/oom")),
        "no OOM event:\n{text}"
    );
}

/// Volumes stay live although root filesystems are cached (they come from a
/// second virtio-fs export with cache=always): a file the host replaces in a
/// bind-mounted directory the way kubelet updates a ConfigMap (write a new
/// file, rename it over the old one) reaches the running container.
#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn host_updates_to_volumes_reach_running_containers() {
    let c = Containerd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let volume = dir.path().join("config");
    std::fs::create_dir_all(&volume).expect("mkdir");
    std::fs::write(volume.join("setting"), "v1\n").expect("write");
    let bind = format!(
        "type=bind,src={},dst=/config,options=rbind:ro",
        volume.display()
    );
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--mount",
        &bind,
        IMAGE,
        "live",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "run: {}", stderr(&out));
    let execs = std::cell::Cell::new(0);
    let read = || {
        execs.set(execs.get() + 1);
        let exec_id = format!("r{}", execs.get());
        let out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            &exec_id,
            "live",
            "sh",
            "-c",
            "cat /config/setting",
        ]);
        assert!(out.status.success(), "exec: {}", stderr(&out));
        stdout(&out)
    };
    let first = read();
    assert!(first.starts_with("v1\n"), "{first}");
    std::fs::write(volume.join(".setting.new"), "v2\n").expect("write");
    std::fs::rename(volume.join(".setting.new"), volume.join("setting")).expect("rename");
    // The shared directory's cache mode (auto) revalidates within a second.
    let seen = c.eventually(Duration::from_secs(10), || read().starts_with("v2\n"));
    assert!(seen, "the update never reached the container: {}", read());
    c.kill_and_delete("live");
}
