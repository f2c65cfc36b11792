//! `kabuto exec <pod>`: the debug shell, only when the config enables it.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use kabuto_e2e::{guest_kernel_release, paths, stderr, stdout, Containerd, Options};

fn kabuto_exec(c: &Containerd, pod: &str, input: &str) -> std::process::Output {
    let mut child = Command::new(paths().bin_dir.join("kabuto"))
        .args(["exec", pod])
        .env("KABUTO_CONFIG_PATH", c.config_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kabuto exec");
    // A refused exec may exit before reading its input: a broken pipe here
    // is that refusal, which the caller checks in the output.
    let written = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes());
    if let Err(e) = written {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write: {e}");
    }
    child.wait_with_output().expect("output")
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn debug_shell_when_enabled() {
    let debug_guest = paths().guest_dir.with_file_name("guest-debug");
    let c = Containerd::start_with(Options {
        kabuto_config: "[hypervisor]\ndebug_console = true\n".into(),
        guest_dir: Some(debug_guest),
        ..Default::default()
    });
    c.run_detached("dbg", &[], &["sleep", "1000"]);
    let out = kabuto_exec(&c, "dbg", "uname -r\ngrep cgroup2 /proc/mounts\nexit\n");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&guest_kernel_release()),
        "{}",
        stdout(&out)
    );
    // The agent's cgroup2 mount carries favordynmods (the pinned kernel
    // knows it; without it every container create and exec waits for an
    // RCU grace period).
    assert!(
        stdout(&out).contains("nsdelegate,favordynmods"),
        "{}",
        stdout(&out)
    );
    c.kill_and_delete("dbg");
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn no_debug_shell_by_default() {
    let c = Containerd::start();
    c.run_detached("nodbg", &[], &["sleep", "1000"]);
    let out = kabuto_exec(&c, "nodbg", "uname -r\nexit\n");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("debug console is off"),
        "{}",
        stderr(&out)
    );
    c.kill_and_delete("nodbg");
}
