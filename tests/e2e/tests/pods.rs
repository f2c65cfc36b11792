//! Containers carrying the CRI sandbox annotations join their pod's VM.

use kabuto_e2e::{stderr, stdout, Containerd};

const SANDBOX: [&str; 4] = [
    "--annotation",
    "io.kubernetes.cri.container-type=sandbox",
    "--annotation",
    "io.kubernetes.cri.sandbox-id=pod1",
];
const MEMBER: [&str; 4] = [
    "--annotation",
    "io.kubernetes.cri.container-type=container",
    "--annotation",
    "io.kubernetes.cri.sandbox-id=pod1",
];

/// QEMU processes of this containerd's pods.
fn vm_count(c: &Containerd) -> usize {
    c.residue()
        .processes
        .iter()
        .filter(|p| p.contains("qemu-system"))
        .count()
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn containers_of_a_pod_share_one_vm() {
    let c = Containerd::start();
    c.run_detached("pod1", &SANDBOX, &["sleep", "1000"]);
    let boot_id = ["cat", "/proc/sys/kernel/random/boot_id"];
    let member = c.run("app", &MEMBER, &boot_id);
    assert!(member.status.success(), "{}", stderr(&member));
    let mut exec = vec!["task", "exec", "--exec-id", "b", "pod1"];
    exec.extend_from_slice(&boot_id);
    let in_pod = c.ctr(&exec);
    assert!(in_pod.status.success(), "{}", stderr(&in_pod));
    assert_eq!(
        stdout(&member),
        stdout(&in_pod),
        "the container booted its own VM"
    );
    assert_eq!(vm_count(&c), 1, "{:?}", c.residue().processes);

    c.kill_and_delete("pod1");
    c.assert_no_residue();
}

/// containerd namespaces are separate worlds: the same pod id in two of
/// them is two pods, and starting the second leaves the first running
/// (kabuto's state was once keyed by the id alone, so the second create
/// "cleaned up" the first's VM).
#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn the_same_pod_id_in_two_namespaces_is_two_pods() {
    let c = Containerd::start();
    let image = c.dir.path().join("busybox-oci.tar");
    let import = c.ctr(&[
        "-n",
        "other",
        "image",
        "import",
        image.to_str().expect("utf-8"),
    ]);
    assert!(import.status.success(), "{}", stderr(&import));

    c.run_detached("twin", &[], &["sleep", "1000"]);
    let second = c.ctr(&[
        "-n",
        "other",
        "run",
        "-d",
        "--runtime",
        kabuto_e2e::RUNTIME,
        kabuto_e2e::IMAGE,
        "twin",
        "sleep",
        "1000",
    ]);
    assert!(second.status.success(), "{}", stderr(&second));

    let boot_id = |namespace: &str, exec_id: &str| {
        let out = c.ctr(&[
            "-n",
            namespace,
            "task",
            "exec",
            "--exec-id",
            exec_id,
            "twin",
            "cat",
            "/proc/sys/kernel/random/boot_id",
        ]);
        assert!(out.status.success(), "{namespace}: {}", stderr(&out));
        stdout(&out)
    };
    // Both answer, from two different guests.
    let first_boot = boot_id("default", "e1");
    assert_ne!(first_boot, boot_id("other", "e2"));
    assert_eq!(vm_count(&c), 2, "{:?}", c.residue().processes);

    // Removing the second pod leaves the first as it was.
    let kill = c.ctr(&["-n", "other", "task", "kill", "-s", "SIGKILL", "twin"]);
    assert!(kill.status.success(), "{}", stderr(&kill));
    assert!(c.eventually(std::time::Duration::from_secs(30), || {
        c.ctr(&["-n", "other", "task", "delete", "twin"])
            .status
            .success()
    }));
    let rm = c.ctr(&["-n", "other", "container", "rm", "twin"]);
    assert!(rm.status.success(), "{}", stderr(&rm));
    assert_eq!(boot_id("default", "e3"), first_boot);

    c.kill_and_delete("twin");
    c.assert_no_residue();
}
