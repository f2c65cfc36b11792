//! Bad input and broken parts: a clear error, and nothing left behind.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use kabuto_e2e::{stderr, stdout, Containerd, Options, IMAGE, RUNTIME};

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn invalid_spec_is_refused_before_any_vm() {
    let c = Containerd::start();
    let spec = c.dir.path().join("bad.json");
    fs::write(
        &spec,
        r#"{"ociVersion":"0.9.0","process":{"args":["true"],"cwd":"/"},"root":{"path":"rootfs"}}"#,
    )
    .expect("write spec");
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "-c",
        spec.to_str().expect("utf-8"),
        "bad",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("ociVersion \"0.9.0\" is not supported"),
        "{}",
        stderr(&out)
    );
    assert!(c.residue().is_empty(), "{:?}", c.residue());
    assert!(
        !c.log().contains("sandbox bad: qemu"),
        "a VM was started for an invalid spec"
    );
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn missing_rootfs_is_refused_before_any_vm() {
    let c = Containerd::start();
    let not_a_dir = c.dir.path().join("not-a-dir");
    fs::write(&not_a_dir, "").expect("write");
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--rootfs",
        not_a_dir.to_str().expect("utf-8"),
        "nofs",
        "true",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is not a directory"),
        "{}",
        stderr(&out)
    );
    assert!(c.residue().is_empty(), "{:?}", c.residue());
}

/// An initramfs whose /init never starts an agent (busybox sleeps forever).
fn silent_initramfs(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("silent-root");
    fs::create_dir_all(root.join("dev")).expect("mkdir");
    fs::copy("/bin/busybox", root.join("busybox")).expect("copy busybox");
    fs::write(root.join("init"), "#!/busybox sh\n/busybox sleep 100000\n").expect("init");
    fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = dir.join("silent.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc > {} 2>/dev/null",
            root.display(),
            out.display()
        ))
        .status()
        .expect("cpio");
    assert!(status.success());
    out
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn agent_that_never_answers_fails_create_within_the_timeout() {
    let probe = tempfile::tempdir().expect("tempdir");
    let initramfs = silent_initramfs(probe.path());
    let c = Containerd::start_with(Options {
        kabuto_config: "[agent]\nboot_timeout_secs = 8\n".into(),
        ..Default::default()
    });
    // Point the guest at the silent initramfs.
    let config = c.dir.path().join("kabuto.toml");
    let text = fs::read_to_string(&config).expect("config");
    let text = text.replace(
        &format!("{}/initramfs.cpio", kabuto_e2e::paths().guest_dir.display()),
        &initramfs.display().to_string(),
    );
    fs::write(&config, text).expect("config");

    let started = Instant::now();
    let out = c.run("silent", &[], &["true"]);
    let took = started.elapsed();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("waiting for the agent") && err.contains("no answer within 8s"),
        "{err}"
    );
    assert!(took < Duration::from_secs(40), "took {took:?}");
    assert!(
        c.eventually(Duration::from_secs(10), || c.residue().is_empty()),
        "{:?}",
        c.residue()
    );
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn vm_that_dies_during_boot_is_reported() {
    let c = Containerd::start_with(Options {
        // No such init: the kernel panics, QEMU exits (-no-reboot).
        kabuto_config: "[hypervisor]\nkernel_params = \"rdinit=/no/such/init\"\n".into(),
        ..Default::default()
    });
    let out = c.run("dies", &[], &["true"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("waiting for the agent") && err.contains("the VM exited"),
        "{err}"
    );
    assert!(
        c.eventually(Duration::from_secs(10), || c.residue().is_empty()),
        "{:?}",
        c.residue()
    );
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn qemu_killed_under_a_running_task() {
    let c = Containerd::start();
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "victim",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let qemu_pid: i32 = fs::read_to_string(c.state_dir().join("sandboxes/victim/qemu.pid"))
        .expect("qemu.pid")
        .trim()
        .parse()
        .expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill qemu");
    assert!(
        c.eventually(Duration::from_secs(20), || stdout(&c.ctr(&["task", "ls"]))
            .contains("STOPPED")),
        "containerd did not see the task exit: {}",
        stdout(&c.ctr(&["task", "ls"]))
    );
    let out = c.ctr(&["task", "delete", "victim"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("exit code 255"),
        "non-zero exit expected: {}",
        stderr(&out)
    );
    assert!(c.ctr(&["container", "rm", "victim"]).status.success());
    assert!(
        c.log().contains("the VM exited unexpectedly"),
        "no reason logged"
    );
    assert!(
        c.eventually(Duration::from_secs(10), || c.residue().is_empty()),
        "{:?}",
        c.residue()
    );
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn twenty_runs_leave_no_residue() {
    let c = Containerd::start();
    let before = c.residue();
    for i in 0..20 {
        let id = format!("seq{i}");
        let out = c.run(&id, &[], &["true"]);
        assert!(out.status.success(), "run {i}: {}", stderr(&out));
    }
    assert!(
        c.eventually(Duration::from_secs(10), || c.residue() == before),
        "{:?}",
        c.residue()
    );
    assert!(before.is_empty(), "{before:?}");
}
