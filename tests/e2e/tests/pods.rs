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
    let vms = c
        .residue()
        .processes
        .iter()
        .filter(|p| p.contains("qemu-system"))
        .count();
    assert_eq!(vms, 1, "{:?}", c.residue().processes);

    c.kill_and_delete("pod1");
    c.assert_no_residue();
}
