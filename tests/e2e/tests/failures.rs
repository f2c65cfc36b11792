//! Bad input and broken parts: a clear error, and nothing left behind.

use std::{
    fs,
    time::{Duration, Instant},
};

use kabuto_e2e::{stderr, Containerd, Options, RUNTIME};

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
    c.assert_no_residue();
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
    c.assert_no_residue();
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn agent_that_never_answers_fails_create_within_the_timeout() {
    let probe = tempfile::tempdir().expect("tempdir");
    // An /init that never starts an agent.
    let initramfs = kabuto_e2e::busybox_initramfs(probe.path(), "silent", "/busybox sleep 100000");
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
    c.assert_no_residue();
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
    c.assert_no_residue();
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn qemu_killed_under_a_running_task() {
    let c = Containerd::start();
    c.run_detached("victim", &[], &["sleep", "1000"]);
    let qemu_pid: i32 = fs::read_to_string(c.sandbox_dir("victim").join("qemu.pid"))
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
        c.wait_stopped("victim"),
        "containerd did not see the task exit"
    );
    let deleted = c.delete("victim");
    assert!(
        deleted.contains("exit code 255"),
        "non-zero exit expected: {deleted}"
    );
    assert!(
        c.log().contains("the VM exited unexpectedly"),
        "no reason logged"
    );
    c.assert_no_residue();
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
