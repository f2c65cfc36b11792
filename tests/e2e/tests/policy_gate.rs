//! The policy gate in a real guest: requests the policy denies fail with
//! "<Request> is blocked by policy" and run nothing.

use std::path::PathBuf;

use kabuto_e2e::paths;
use kabuto_protocol::agent::{CreateContainerRequest, ExecProcessRequest};
use kabuto_runtime::{config::Config, hypervisor::NetworkNamespace, sandbox::Sandbox};

fn config(state: &std::path::Path) -> Config {
    let mut c = Config::default();
    c.guest.kernel = paths().guest_dir.join("vmlinux");
    c.guest.initramfs = paths().guest_dir.join("initramfs.cpio");
    c.runtime.state_dir = state.to_path_buf();
    c.agent.vhost_user_vsock_path = PathBuf::from("vhost-device-vsock");
    c
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn denied_requests_are_blocked_and_run_nothing() {
    let state = tempfile::tempdir().expect("tempdir");
    let sandbox = Sandbox::create(
        &config(state.path()),
        "default",
        "gate",
        "",
        None,
        &NetworkNamespace::Host,
    )
    .expect("sandbox");
    let agent = sandbox.agent().clone();

    // Non-confidential pods start with allow-all.
    agent.guest_details().expect("allowed by allow-all");
    let err = agent
        .set_policy("package agent_policy\nnot rego at all")
        .expect_err("garbage policy");
    assert!(err.to_string().contains("new policy refused"), "{err}");

    agent
        .set_policy(&kabuto_policy::DEFAULT_CONFIDENTIAL)
        .expect("allow-all lets the policy be replaced");
    let create = CreateContainerRequest {
        container_id: "c1".into(),
        oci_spec:
            br#"{"ociVersion":"1.1.0","process":{"args":["sh"],"cwd":"/"},"root":{"path":"/"}}"#
                .to_vec(),
        ..Default::default()
    };
    let err = agent.create_container(&create).expect_err("denied");
    assert!(
        err.to_string()
            .contains("CreateContainerRequest is blocked by policy"),
        "{err}"
    );
    let err = agent
        .exec_process(&ExecProcessRequest {
            container_id: "c1".into(),
            exec_id: "e1".into(),
            process: br#"{"args":["sh"],"cwd":"/"}"#.to_vec(),
            ..Default::default()
        })
        .expect_err("denied");
    assert!(
        err.to_string()
            .contains("ExecProcessRequest is blocked by policy"),
        "{err}"
    );
    // Nothing was created: the allowed RemoveContainer finds no container.
    let err = agent.remove_container("c1").expect_err("no such container");
    assert!(err.is_not_found(), "{err}");
    // The confidential default does not let the host swap the policy back.
    let err = agent
        .set_policy(kabuto_policy::ALLOW_ALL)
        .expect_err("denied");
    assert!(
        err.to_string()
            .contains("SetPolicyRequest is blocked by policy"),
        "{err}"
    );
    agent.guest_details().expect("still allowed");

    let dir = sandbox.dir().to_path_buf();
    assert!(dir.exists());
    sandbox.destroy();
    assert!(!dir.exists());
}

fn init_data_annotation(policy: &str) -> String {
    let doc = format!("version = \"0.1.0\"\nalgorithm = \"sha256\"\n\n[data]\n\"policy.rego\" = \'\'\'\n{policy}\n\'\'\'\n");
    let parsed = kabuto_initdata::InitData::parse(doc.as_bytes()).expect("test init-data parses");
    format!(
        "{}={}",
        kabuto_initdata::KABUTO_ANNOTATION,
        parsed.to_annotation()
    )
}

/// A pod's init-data policy allows exactly `echo allowed`; anything else, and
/// exec, are blocked, and nothing is left behind.
#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn pod_policy_from_init_data_is_enforced() {
    use kabuto_e2e::{stderr, stdout, Containerd};
    let c = Containerd::start();
    let policy = r#"package agent_policy
default CreateContainerRequest := {"allowed": false, "reason": "only `echo allowed` may run"}
CreateContainerRequest := true if input.OCI.process.args == ["echo", "allowed"]
CreateContainerRequest := true if input.OCI.process.args == ["sleep", "1000"]
default ExecProcessRequest := false
default ReadStreamRequest := true
default CreateSandboxRequest := true
default StartContainerRequest := true
default WaitProcessRequest := true
default SignalProcessRequest := true
default RemoveContainerRequest := true
default DestroySandboxRequest := true
default CheckRequest := true
default GetOOMEventRequest := true
default CloseStdinRequest := true
default WriteStreamRequest := true
"#;
    let annotation = init_data_annotation(policy);
    let out = c.run("ok", &["--annotation", &annotation], &["echo", "allowed"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "allowed\n");

    let out = c.run(
        "extra-arg",
        &["--annotation", &annotation],
        &["echo", "allowed", "extra"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out)
            .contains("CreateContainerRequest is blocked by policy: only `echo allowed` may run"),
        "{}",
        stderr(&out)
    );

    c.run_detached("keeps", &["--annotation", &annotation], &["sleep", "1000"]);
    let out = c.ctr(&["task", "exec", "--exec-id", "x", "keeps", "sh"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("ExecProcessRequest is blocked by policy"),
        "{}",
        stderr(&out)
    );
    c.kill_and_delete("keeps");

    let bad = format!("{}=not-base64!", kabuto_initdata::KABUTO_ANNOTATION);
    let out = c.run("bad", &["--annotation", &bad], &["echo", "allowed"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("init-data annotation is not base64"),
        "{}",
        stderr(&out)
    );
    c.assert_no_residue();
}
