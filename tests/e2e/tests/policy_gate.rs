//! The policy gate in a real guest: requests the policy denies fail with
//! "<Request> is blocked by policy" and run nothing.

use std::path::PathBuf;

use kabuto_e2e::paths;
use kabuto_protocol::agent::{CreateContainerRequest, ExecProcessRequest};
use kabuto_runtime::{config::Config, sandbox::Sandbox};

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
    let sandbox = Sandbox::create(&config(state.path()), "gate", "").expect("sandbox");
    let agent = sandbox.agent().clone();

    // Non-confidential pods start with allow-all.
    agent.guest_details().expect("allowed by allow-all");
    let err = agent
        .set_policy("package agent_policy\nnot rego at all")
        .expect_err("garbage policy");
    assert!(err.to_string().contains("new policy refused"), "{err}");

    agent
        .set_policy(kabuto_policy::DEFAULT_CONFIDENTIAL)
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

    sandbox.destroy();
    assert!(!state.path().join("sandboxes/gate").exists());
}
