//! The host as the attacker of a confidential pod. Each test boots a real
//! guest in the software TEE and speaks the agent protocol directly, as a
//! hostile shim would (`Sandbox::boot` sends nothing to the agent), and
//! checks the refusal, its message, and that nothing happened.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kabuto_e2e::paths;
use kabuto_protocol::agent::{CreateContainerRequest, CreateSandboxRequest, ExecProcessRequest};
use kabuto_runtime::{
    agent_client::AgentClient,
    config::{Config, TeeKind},
    hypervisor::NetworkNamespace,
    sandbox::Sandbox,
};

fn config(state: &Path, tee: TeeKind) -> Config {
    let mut c = Config::default();
    c.guest.kernel = paths().guest_dir.join("vmlinux");
    c.guest.initramfs = paths().guest_dir.join("initramfs.cpio");
    c.runtime.state_dir = state.join("state");
    c.agent.vhost_user_vsock_path = PathBuf::from("vhost-device-vsock");
    if tee == TeeKind::Software {
        let swtee = state.join("swtee");
        // One key set per test directory (a test may boot several guests).
        if !swtee.exists() {
            kabuto_swtee::init(&swtee).expect("software TEE");
        }
        c.confidential.tee = TeeKind::Software;
        c.confidential.software_tee_dir = swtee;
    }
    c
}

/// A software-TEE guest booted with `doc` as its init-data and sent nothing
/// (the test plays the shim).
fn boot_confidential(dir: &Path, id: &str, doc: &[u8]) -> Sandbox {
    Sandbox::boot(
        &config(dir, TeeKind::Software),
        "default",
        id,
        Some(doc),
        &NetworkNamespace::Host,
    )
    .expect("boot")
}

/// An init-data document with `policy` as its policy.rego.
fn init_data(policy: &str) -> Vec<u8> {
    let doc = format!(
        "version = \"0.1.0\"\nalgorithm = \"sha256\"\n\n[data]\n\"policy.rego\" = '''\n{policy}\n'''\n"
    );
    kabuto_initdata::InitData::parse(doc.as_bytes()).expect("test init-data parses");
    doc.into_bytes()
}

fn create_sandbox(agent: &AgentClient, id: &str, init_data: &[u8]) -> Result<(), String> {
    agent
        .create_sandbox(&CreateSandboxRequest {
            sandbox_id: id.into(),
            shared_dir: kabuto_protocol::GUEST_SHARED_DIR.into(),
            init_data: init_data.to_vec(),
            ..Default::default()
        })
        .map_err(|e| e.to_string())
}

fn spec(id: &str, args: &[&str], annotations: &str) -> Vec<u8> {
    format!(
        r#"{{"ociVersion": "1.1.0",
            "annotations": {{{annotations}}},
            "process": {{"args": {}, "cwd": "/", "env": ["PATH=/bin"], "user": {{"uid": 0, "gid": 0}}}},
            "root": {{"path": "{}/{id}"}},
            "mounts": [{{"destination": "/proc", "type": "proc", "source": "proc"}},
                       {{"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}}],
            "linux": {{"namespaces": [{{"type": "pid"}}, {{"type": "mount"}}, {{"type": "ipc"}}, {{"type": "uts"}}, {{"type": "network"}}]}}}}"#,
        serde_json::to_string(args).expect("args"),
        kabuto_protocol::GUEST_ROOTFS_DIR,
    )
    .into_bytes()
}

fn create_request(id: &str, args: &[&str]) -> CreateContainerRequest {
    CreateContainerRequest {
        container_id: id.into(),
        oci_spec: spec(id, args, ""),
        ..Default::default()
    }
}

fn exec_request(id: &str, args: &[&str]) -> ExecProcessRequest {
    ExecProcessRequest {
        container_id: id.into(),
        exec_id: "e1".into(),
        process: format!(
            r#"{{"args": {}, "cwd": "/", "env": ["PATH=/bin"], "user": {{"uid": 0, "gid": 0}}}}"#,
            serde_json::to_string(args).expect("args")
        )
        .into_bytes(),
        ..Default::default()
    }
}

/// A root filesystem on the host: busybox with a few applets.
fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).expect("mkdir");
    for d in ["proc", "dev", "sys", "tmp"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    for applet in ["sh", "sleep", "true", "echo", "cat"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("symlink");
    }
    root
}

fn assert_blocked(result: Result<impl std::fmt::Debug, impl std::fmt::Display>, request: &str) {
    match result {
        Ok(v) => panic!("{request} was allowed: {v:?}"),
        Err(e) => assert!(
            e.to_string()
                .contains(&format!("{request} is blocked by policy")),
            "{request}: {e}"
        ),
    }
}

/// After a failed CreateSandbox: a second one (even with the right
/// init-data), containers and a policy swap are all refused.
fn assert_stays_closed(agent: &AgentClient, id: &str, doc: &[u8]) {
    assert_blocked(create_sandbox(agent, id, doc), "CreateSandboxRequest");
    assert_blocked(
        agent.create_container(&create_request("c1", &["sleep", "1000"])),
        "CreateContainerRequest",
    );
    assert_blocked(
        agent.set_policy(kabuto_policy::ALLOW_ALL),
        "SetPolicyRequest",
    );
}

/// The policy of these tests' pods: containers whose first arg is `sleep`
/// or `true`, recorded in the state; exec only in a `true` container.
const POD_POLICY: &str = r#"package agent_policy
default CreateSandboxRequest := true
default DestroySandboxRequest := true
default StartContainerRequest := true
default RemoveContainerRequest := true
default WaitProcessRequest := true
default SignalProcessRequest := true
default ReadStreamRequest := true
default GuestDetailsRequest := true
default CheckRequest := true
default ListProcessesRequest := true
CreateContainerRequest := {"allowed": true, "ops": [{"op": "add", "path": concat("/", ["", input.container_id]), "value": input.OCI.process.args[0]}]} if {
    input.OCI.process.args[0] in {"sleep", "true"}
}
ExecProcessRequest if data.state[input.container_id] == "true"
"#;

/// Before its one CreateSandbox a confidential guest accepts nothing else;
/// after it, no second one.
#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn a_confidential_guest_is_closed_until_its_one_create_sandbox() {
    let dir = tempfile::tempdir().expect("tempdir");
    let doc = init_data(POD_POLICY);
    let sandbox = boot_confidential(dir.path(), "closed", &doc);
    let agent = sandbox.agent();

    assert_blocked(
        agent.create_container(&create_request("c1", &["sleep", "1000"])),
        "CreateContainerRequest",
    );
    assert_blocked(
        agent.set_policy(kabuto_policy::ALLOW_ALL),
        "SetPolicyRequest",
    );
    assert_blocked(
        agent.exec_process(&exec_request("c1", &["true"])),
        "ExecProcessRequest",
    );
    assert_blocked(agent.guest_details(), "GuestDetailsRequest");

    create_sandbox(agent, "closed", &doc).expect("the one CreateSandbox");
    let again = create_sandbox(agent, "closed", &init_data(kabuto_policy::ALLOW_ALL))
        .expect_err("a second CreateSandbox");
    assert!(again.contains("already serves a sandbox"), "{again}");
    // The pod's policy is in force, not the second request's.
    let details = agent.guest_details().expect("the pod's policy allows it");
    let digest = kabuto_initdata::InitData::parse(&doc)
        .expect("doc")
        .digest();
    assert_eq!(details.init_data_digest, hex::encode(digest));
    assert_blocked(
        agent.set_policy(kabuto_policy::ALLOW_ALL),
        "SetPolicyRequest",
    );
    sandbox.destroy();
}

/// A CreateSandbox that fails (here: the owner's policy does not parse)
/// leaves the guest refusing everything, never the boot or allow-all policy.
#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn a_failed_create_sandbox_leaves_the_guest_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let doc = init_data("package agent_policy\nthis is not rego");
    let sandbox = boot_confidential(dir.path(), "failed", &doc);
    let agent = sandbox.agent();
    let err = create_sandbox(agent, "failed", &doc).expect_err("unparseable policy");
    assert!(err.contains("init-data policy.rego refused"), "{err}");
    assert_stays_closed(agent, "failed", &doc);
    assert_blocked(agent.guest_details(), "GuestDetailsRequest");
    let state = sandbox.dir().to_path_buf();
    assert!(state.exists());
    sandbox.destroy();
    assert!(!state.exists());
}

/// Init-data changed after its digest went into the launch data: refused,
/// and the guest stays closed.
#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn init_data_altered_after_launch_is_refused_by_the_guest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let doc = init_data(POD_POLICY);
    let sandbox = boot_confidential(dir.path(), "altered", &doc);
    let agent = sandbox.agent();
    let mut altered = doc.clone();
    altered.extend_from_slice(b"\n# altered by the host\n");
    let err = create_sandbox(agent, "altered", &altered).expect_err("altered");
    assert!(err.contains("does not match the TEE's HOST_DATA"), "{err}");
    assert_stays_closed(agent, "altered", &doc);
    sandbox.destroy();
}

/// A request the policy allowed but that failed changes nothing in the
/// policy's state: a CreateContainer reusing a running container's id with
/// another container's spec does not make that id judged as the other.
#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn a_failed_request_does_not_change_how_later_ones_are_judged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let doc = init_data(POD_POLICY);
    let rootfs = busybox_rootfs(dir.path());
    let sandbox = Sandbox::create(
        &config(dir.path(), TeeKind::Software),
        "default",
        "state",
        "",
        Some(&doc),
        &NetworkNamespace::Host,
    )
    .expect("sandbox");
    let agent = sandbox.agent();
    sandbox
        .share_container("x", Some((&[], &rootfs)), &[])
        .expect("share rootfs");
    agent
        .create_container(&create_request("x", &["sleep", "1000"]))
        .expect("allowed: a sleep container");
    agent.start_container("x").expect("start");
    assert_blocked(
        agent.exec_process(&exec_request("x", &["true"])),
        "ExecProcessRequest",
    );

    // Allowed by the policy (a `true` container), refused by the agent.
    let err = agent
        .create_container(&create_request("x", &["true"]))
        .expect_err("the id exists");
    assert!(err.to_string().contains("already exists"), "{err}");
    // Still judged as the sleep container it is.
    assert_blocked(
        agent.exec_process(&exec_request("x", &["true"])),
        "ExecProcessRequest",
    );
    assert_eq!(agent.list_processes("x").expect("ps").len(), 1);
    sandbox.destroy();
}

/// The sandbox container of a confidential pod runs the guest's own pause,
/// whatever rootfs and process the host gives it; a non-confidential pod
/// (the control) runs the host's.
#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn the_pause_of_a_confidential_pod_is_the_guests_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = busybox_rootfs(dir.path());
    let marker = rootfs.join("host-code-ran");
    let hostile_pause = ["sh", "-c", "echo ran > /host-code-ran; exec sleep 1000"];
    let sandbox_annotations = r#""io.kubernetes.cri.container-type": "sandbox""#;
    let run_pause = |tee: TeeKind, id: &str| {
        let sandbox = allow_all_sandbox(dir.path(), tee, id);
        let agent = sandbox.agent();
        sandbox
            .share_container(id, Some((&[], &rootfs)), &[])
            .expect("share rootfs");
        agent
            .create_container(&CreateContainerRequest {
                container_id: id.into(),
                sandbox_id: id.into(),
                oci_spec: spec(id, &hostile_pause, sandbox_annotations),
                ..Default::default()
            })
            .expect("create the pause");
        agent.start_container(id).expect("start the pause");
        let running = agent.list_processes(id).expect("ps");
        std::thread::sleep(Duration::from_secs(2));
        let ran = marker.exists();
        sandbox.destroy();
        (running, ran)
    };

    // The control: without a TEE the host's pause is what runs.
    let (_, ran) = run_pause(TeeKind::None, "plain-pause");
    assert!(ran, "the control pod should have run the host's pause");
    std::fs::remove_file(&marker).expect("remove marker");

    let (running, ran) = run_pause(TeeKind::Software, "cc-pause");
    assert!(!ran, "the host's pause ran in a confidential pod");
    assert_eq!(running.len(), 1, "the guest's pause runs: {running:?}");
}

/// A KBS the guest would reach without TLS, or over TLS it cannot check:
/// a host in the middle could serve its own policies and keys. Refused at
/// CreateSandbox, naming the problem; the guest stays closed.
#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn a_kbs_without_pinned_tls_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "url = \"http://10.0.2.2:8080\"\ncert = \"x\"",
            "is not https://",
        ),
        ("url = \"https://10.0.2.2:8080\"", "has no cert"),
    ];
    for (i, (kbs, why)) in cases.iter().enumerate() {
        let doc = format!(
            "version = \"0.1.0\"\nalgorithm = \"sha256\"\n\n[data]\n\"aa.toml\" = '''\n[token_configs.kbs]\n{kbs}\n'''\n"
        )
        .into_bytes();
        let id = format!("tls{i}");
        let sandbox = boot_confidential(dir.path(), &id, &doc);
        let err = create_sandbox(sandbox.agent(), &id, &doc).expect_err("refused");
        assert!(err.contains(why), "{kbs}: {err}");
        assert_stays_closed(sandbox.agent(), &id, &doc);
        sandbox.destroy();
    }
}

/// The shared directory is the host's: a symlink it plants there, named as
/// a bind source, would be followed in the guest's namespace and give the
/// container the guest's root. The agent resolves shared bind sources
/// beneath the shared directory without following symlinks (and a shared
/// root filesystem beneath the rootfs directory); a plain directory still
/// binds.
#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn a_symlink_the_host_plants_in_the_shared_directory_is_not_followed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = busybox_rootfs(dir.path());
    let sandbox = allow_all_sandbox(dir.path(), TeeKind::Software, "planted");
    let agent = sandbox.agent();
    let shared = sandbox.dir().join("shared");
    let with_bind = |id: &str, source: &str| {
        let spec = String::from_utf8(spec(id, &["cat", "/data/marker"], "")).expect("utf-8");
        let bind = format!(
            r#"{{"destination": "/data", "type": "bind", "source": "{}/{source}", "options": ["rbind", "ro"]}}, "#,
            kabuto_protocol::GUEST_SHARED_DIR
        );
        CreateContainerRequest {
            container_id: id.into(),
            oci_spec: spec
                .replacen(r#""mounts": ["#, &format!(r#""mounts": [{bind}"#), 1)
                .into_bytes(),
            ..Default::default()
        }
    };

    // The planted link to the guest's root, and one through a subdirectory.
    std::fs::create_dir_all(shared.join("evil")).expect("mkdir");
    std::os::unix::fs::symlink("/", shared.join("evil/root")).expect("symlink");
    std::os::unix::fs::symlink("/run", shared.join("evil/run")).expect("symlink");
    for (id, source) in [
        ("s1", "evil/root"),
        ("s2", "evil/run/kabuto"),
        ("s3", "evil/../evil/root"),
    ] {
        sandbox
            .share_container(id, Some((&[], &rootfs)), &[])
            .expect("share rootfs");
        let err = agent
            .create_container(&with_bind(id, source))
            .expect_err(source);
        let text = err.to_string();
        assert!(
            text.contains("resolves through a symlink") || text.contains("plain path"),
            "{source}: {text}"
        );
        assert!(agent.list_processes(id).is_err(), "{id} exists");
    }

    // The same for a root filesystem the host shares: its directory made a
    // symlink to the guest's root.
    std::os::unix::fs::symlink("/", sandbox.dir().join("rootfs/evilroot")).expect("symlink");
    let err = agent
        .create_container(&create_request("evilroot", &["true"]))
        .expect_err("a symlinked root");
    assert!(
        err.to_string().contains("resolves through a symlink"),
        "{err}"
    );

    // A plain directory from the host binds as before.
    std::fs::create_dir_all(shared.join("ok")).expect("mkdir");
    std::fs::write(shared.join("ok/marker"), b"from the volume").expect("marker");
    sandbox
        .share_container("ok", Some((&[], &rootfs)), &[])
        .expect("share rootfs");
    agent
        .create_container(&with_bind("ok", "ok"))
        .expect("a plain bind");
    agent.start_container("ok").expect("start");
    sandbox.destroy();
}

/// A confidential guest runs one pod: a second pod sandbox (a second pause,
/// or a container claiming to be its own sandbox) is refused by the agent
/// itself, even under a policy that allows everything — the policy judges
/// concurrent creates against the same state, so it cannot be the only
/// check.
#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn a_confidential_guest_refuses_a_second_pod_sandbox() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = busybox_rootfs(dir.path());
    let sandbox = allow_all_sandbox(dir.path(), TeeKind::Software, "one-pod");
    let agent = sandbox.agent();
    let pause = r#""io.kubernetes.cri.container-type": "sandbox""#;
    let create = |id: &str, sandbox_id: &str, annotations: &str| {
        sandbox
            .share_container(id, Some((&[], &rootfs)), &[])
            .expect("share rootfs");
        agent.create_container(&CreateContainerRequest {
            container_id: id.into(),
            sandbox_id: sandbox_id.into(),
            oci_spec: spec(id, &["sleep", "1000"], annotations),
            ..Default::default()
        })
    };
    create("one-pod", "one-pod", pause).expect("the pod's pause");
    for (id, annotations) in [("second-pause", pause), ("own-sandbox", "")] {
        let err = create(id, id, annotations).expect_err("a second pod sandbox");
        assert!(
            err.to_string()
                .contains("pod sandbox is one-pod; a second one is refused"),
            "{id}: {err}"
        );
    }
    // A member of the pod is still created.
    create("member", "one-pod", "").expect("a member joins the pod");
    sandbox.destroy();
}

/// A sandbox in `tee` whose pod policy allows everything: what the agent
/// refuses then, it refuses by itself.
fn allow_all_sandbox(dir: &Path, tee: TeeKind, id: &str) -> Sandbox {
    let allow_all = init_data(kabuto_policy::ALLOW_ALL);
    Sandbox::create(
        &config(dir, tee),
        "default",
        id,
        "",
        Some(&allow_all),
        &NetworkNamespace::Host,
    )
    .expect("sandbox")
}

/// No device cgroup is attached in the guest yet, so a confidential
/// container must not mknod (it would open the TEE's device or the guest's
/// disks through its own node): the agent drops CAP_MKNOD the host asks
/// for. The control, without a TEE, keeps it.
#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn a_confidential_container_cannot_make_device_nodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = busybox_rootfs(dir.path());
    let probe = [
        "sh",
        "-c",
        "mknod /dev/probe c 1 3 2>/dev/null && echo made || echo refused",
    ];
    let run = |tee: TeeKind, id: &str| -> String {
        let sandbox = allow_all_sandbox(dir.path(), tee, id);
        let agent = sandbox.agent();
        sandbox
            .share_container(id, Some((&[], &rootfs)), &[])
            .expect("share rootfs");
        let mut oci: serde_json::Value =
            serde_json::from_slice(&spec(id, &probe, "")).expect("spec");
        let caps = serde_json::json!(["CAP_MKNOD", "CAP_CHOWN"]);
        oci["process"]["capabilities"] = serde_json::json!({
            "bounding": caps, "effective": caps, "permitted": caps
        });
        agent
            .create_container(&CreateContainerRequest {
                container_id: id.into(),
                sandbox_id: id.into(),
                oci_spec: serde_json::to_vec(&oci).expect("json"),
                ..Default::default()
            })
            .expect("create");
        agent.start_container(id).expect("start");
        let mut out = Vec::new();
        loop {
            let chunk = agent.read_stream(id, "", false).expect("stdout");
            if chunk.is_empty() {
                break;
            }
            out.extend(chunk);
        }
        agent.wait_process(id, "").expect("wait");
        sandbox.destroy();
        String::from_utf8_lossy(&out).trim().to_string()
    };
    assert_eq!(run(TeeKind::None, "mknod-plain"), "made", "the control");
    assert_eq!(run(TeeKind::Software, "mknod-cc"), "refused");
}
