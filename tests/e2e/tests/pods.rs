//! Containers carrying the CRI sandbox annotations join their pod's VM.

use kabuto_e2e::{stderr, stdout, Containerd, IMAGE, RUNTIME};

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn containers_of_a_pod_share_one_vm() {
    let c = Containerd::start();
    let sandbox = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod1",
        IMAGE,
        "pod1",
        "sleep",
        "1000",
    ]);
    assert!(sandbox.status.success(), "{}", stderr(&sandbox));
    let member = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod1",
        IMAGE,
        "app",
        "cat",
        "/proc/sys/kernel/random/boot_id",
    ]);
    assert!(member.status.success(), "{}", stderr(&member));
    let boot_in_pod = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "b",
        "pod1",
        "cat",
        "/proc/sys/kernel/random/boot_id",
    ]);
    assert!(boot_in_pod.status.success(), "{}", stderr(&boot_in_pod));
    assert_eq!(
        stdout(&member),
        stdout(&boot_in_pod),
        "the container booted its own VM"
    );
    let vms = c
        .residue()
        .processes
        .iter()
        .filter(|p| p.contains("qemu-system"))
        .count();
    assert_eq!(vms, 1, "{:?}", c.residue().processes);

    assert!(c
        .ctr(&["task", "kill", "-s", "SIGKILL", "pod1"])
        .status
        .success());
    assert!(c.eventually(std::time::Duration::from_secs(20), || stdout(
        &c.ctr(&["task", "ls"])
    )
    .contains("STOPPED")));
    assert!(c.ctr(&["task", "delete", "pod1"]).status.success());
    assert!(c.ctr(&["container", "rm", "pod1"]).status.success());
    assert!(
        c.eventually(std::time::Duration::from_secs(10), || c
            .residue()
            .is_empty()),
        "{:?}",
        c.residue()
    );
}
