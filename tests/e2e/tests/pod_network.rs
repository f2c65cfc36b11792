//! Pod networking with the real parts: Debian's CNI plugins (bridge,
//! host-local) make a pod network namespace as containerd's CRI plugin
//! would, `ctr run --with-ns network:<path>` starts a kabuto container in
//! it, and the container serves at the pod's addresses (IPv4 and IPv6) and
//! reaches the host through the bridge, with the namespace's MTU and
//! routes. Removing the pod, or killing its QEMU, leaves the namespace as
//! CNI made it; a route the guest cannot apply fails the create naming the
//! route, with nothing left behind.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use kabuto_e2e::{http_get, stderr, stdout, CniNetwork, Containerd, NEEDS_ENV};

const SERVE: &str = "echo kabuto-pod-answers > /tmp/index.html && exec httpd -f -p 8080 -h /tmp";

fn exec(c: &Containerd, id: &str, exec_id: &str, args: &[&str]) -> String {
    let mut all = vec!["task", "exec", "--exec-id", exec_id, id];
    all.extend_from_slice(args);
    let out = c.ctr(&all);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    stdout(&out)
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn a_container_in_a_cni_namespace_serves_at_its_pod_addresses() {
    let _ = NEEDS_ENV;
    let work = tempfile::tempdir().expect("tempdir");
    let net = CniNetwork::add(work.path(), "pn1", 231, 1400);
    // A route with an MTU of its own (Kata copies only the device's).
    net.ip(&[
        "route",
        "add",
        "10.232.0.0/16",
        "via",
        &net.gateway4,
        "mtu",
        "1300",
    ]);
    let c = Containerd::start();
    let with_ns = format!("network:{}", net.netns);
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        kabuto_e2e::RUNTIME,
        "--with-ns",
        &with_ns,
        kabuto_e2e::IMAGE,
        "web",
        "sh",
        "-c",
        SERVE,
    ]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.log());
    let residue = net.residue();
    assert!(
        residue.iter().any(|l| l == "tap0_kb"),
        "eth0 is not joined to a tap: {residue:?}"
    );

    let v4: SocketAddr = format!("{}:8080", net.ipv4).parse().expect("address");
    let body = http_get(v4, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", c.log()));
    assert!(body.contains("kabuto-pod-answers"), "{body}");
    let v6: SocketAddr = format!("[{}]:8080", net.ipv6).parse().expect("address");
    let body = http_get(v6, Duration::from_secs(20)).expect("the pod's IPv6 address");
    assert!(body.contains("kabuto-pod-answers"), "{body}");

    // What the container sees is the namespace's.
    let addresses = exec(&c, "web", "addr", &["ip", "addr", "show", "eth0"]);
    assert!(addresses.contains("mtu 1400"), "{addresses}");
    assert!(
        addresses.contains(&format!("{}/24", net.ipv4)),
        "{addresses}"
    );
    assert!(
        addresses.contains(&format!("{}/64", net.ipv6)),
        "{addresses}"
    );
    let routes = exec(&c, "web", "route", &["ip", "route", "show"]);
    assert!(
        routes.contains(&format!("default via {} dev eth0", net.gateway4)),
        "{routes}"
    );
    // busybox's `ip` does not print a route's metrics: that the route's
    // own MTU arrives is read back from the kernel by the agent's
    // pod_network tests; here the route itself must be there.
    assert!(
        routes.contains(&format!("10.232.0.0/16 via {} dev eth0", net.gateway4)),
        "{routes}"
    );

    // The pod reaches the host through the bridge.
    let listener = TcpListener::bind((net.gateway4.as_str(), 0)).expect("listener");
    let port = listener.local_addr().expect("port").port();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut request = [0u8; 512];
        let _ = stream.read(&mut request);
        let _ = stream.write_all(b"HTTP/1.0 200 OK\r\n\r\nthe-host-answers\n");
    });
    let url = format!("http://{}:{port}/", net.gateway4);
    let fetched = exec(&c, "web", "wget", &["wget", "-q", "-O", "-", &url]);
    assert!(fetched.contains("the-host-answers"), "{fetched}");
    server.join().expect("host server");

    c.kill_and_delete("web");
    c.assert_no_residue();
    assert!(
        c.eventually(Duration::from_secs(10), || net.residue().is_empty()),
        "left in the pod namespace: {:?}",
        net.residue()
    );
    assert_eq!(net.links().len(), 2, "{:?}", net.links());
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn a_killed_qemu_leaves_the_pod_namespace_as_cni_made_it() {
    let work = tempfile::tempdir().expect("tempdir");
    let net = CniNetwork::add(work.path(), "pn2", 233, 1500);
    let c = Containerd::start();
    let with_ns = format!("network:{}", net.netns);
    c.run_detached("victim", &["--with-ns", &with_ns], &["sleep", "1000"]);
    assert!(!net.residue().is_empty(), "no tap bridge");
    let qemu = c
        .residue()
        .processes
        .iter()
        .find(|p| p.contains("qemu-system"))
        .and_then(|p| p.split(':').next()?.parse::<i32>().ok())
        .expect("QEMU's pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 QEMU");
    assert!(c.wait_stopped("victim"), "the task did not stop");
    c.delete("victim");
    c.assert_no_residue();
    assert!(
        c.eventually(Duration::from_secs(10), || net.residue().is_empty()),
        "left in the pod namespace: {:?}",
        net.residue()
    );
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn a_route_the_guest_cannot_apply_fails_the_create_naming_it() {
    let work = tempfile::tempdir().expect("tempdir");
    let net = CniNetwork::add(work.path(), "pn3", 235, 1500);
    // onlink: the host's kernel takes a gateway outside every subnet; the
    // guest is sent the route without that flag and refuses it.
    net.ip(&[
        "route",
        "add",
        "10.236.0.0/16",
        "via",
        "10.99.0.1",
        "dev",
        "eth0",
        "onlink",
    ]);
    let c = Containerd::start();
    let with_ns = format!("network:{}", net.netns);
    let out = c.run("bad-route", &["--with-ns", &with_ns], &["true"]);
    assert!(!out.status.success(), "created: {}", stdout(&out));
    let error = stderr(&out);
    assert!(
        error.contains("10.236.0.0/16") && error.contains("pod network"),
        "{error}"
    );
    let _ = c.ctr(&["container", "rm", "bad-route"]);
    c.assert_no_residue();
    assert!(
        c.eventually(Duration::from_secs(10), || net.residue().is_empty()),
        "left in the pod namespace: {:?}",
        net.residue()
    );

    // Not a network namespace at all: refused by path.
    let file = work.path().join("not-a-netns");
    std::fs::write(&file, b"").expect("file");
    let with_file = format!("network:{}", file.display());
    let out = c.run("bad-netns", &["--with-ns", &with_file], &["true"]);
    assert!(!out.status.success());
    let error = stderr(&out);
    assert!(
        error.contains("not-a-netns") && error.contains("not a network namespace"),
        "{error}"
    );
    let _ = c.ctr(&["container", "rm", "bad-netns"]);
    c.assert_no_residue();
}

/// A confidential pod (software TEE) in a CNI namespace: the guest has no
/// network but the pod's — QEMU's user network is not added — so its data
/// hub reaches the KBS, listening on the pod bridge's address only,
/// through the pod network, attests and hands the container its secret.
#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn a_confidential_pod_attests_through_its_pod_network() {
    use kabuto_e2e::confidential::{confidential_options, init_data_annotation, Kbs};
    let work = tempfile::tempdir().expect("tempdir");
    let net = CniNetwork::add(work.path(), "pn4", 237, 1500);
    let kbs_dir = work.path().join("kbs");
    std::fs::create_dir(&kbs_dir).expect("kbs dir");
    let kbs = Kbs::start_at(&kbs_dir, &net.gateway4, &net.gateway4, "");
    let swtee = work.path().join("swtee");
    let c = Containerd::start_with(confidential_options(&swtee, "", "", Vec::new()));
    let doc = kbs.init_data(kabuto_policy::ALLOW_ALL, "");
    kbs.trust(&c, &swtee, &[&doc]);
    kbs.admin
        .set_resource("default/key/pod", b"kabuto-pod-network-secret")
        .expect("resource");
    let with_ns = format!("network:{}", net.netns);
    let annotation = init_data_annotation(&doc);
    let out = c.run(
        "attested",
        &["--with-ns", &with_ns, "--annotation", &annotation],
        &[
            "wget",
            "-qO-",
            "http://127.0.0.1:8006/cdh/resource/default/key/pod",
        ],
    );
    assert!(
        out.status.success(),
        "{}\n{}\nKBS log:\n{}",
        stderr(&out),
        stdout(&out),
        kbs.log()
    );
    assert_eq!(stdout(&out), "kabuto-pod-network-secret");
    c.assert_no_residue();
    assert!(
        c.eventually(Duration::from_secs(10), || net.residue().is_empty()),
        "{:?}",
        net.residue()
    );
}

/// kill -9 of the shim: containerd's cleanup of the dead shim (`shim
/// delete`) kills its QEMU and removes the redirect the shim recorded, so
/// the pod namespace is as CNI made it.
#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn a_killed_shim_leaves_the_pod_namespace_as_cni_made_it() {
    let work = tempfile::tempdir().expect("tempdir");
    let net = CniNetwork::add(work.path(), "pn5", 239, 1500);
    let c = Containerd::start();
    let with_ns = format!("network:{}", net.netns);
    c.run_detached("orphan", &["--with-ns", &with_ns], &["sleep", "1000"]);
    assert!(!net.residue().is_empty(), "no tap bridge");
    let shim = c.shim_pid("orphan").expect("the shim runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the shim");
    // containerd cleans up after a dead shim: the task ends (or is gone).
    let running = || {
        stdout(&c.ctr(&["task", "ls"]))
            .lines()
            .any(|l| l.starts_with("orphan ") && l.contains("RUNNING"))
    };
    assert!(
        c.eventually(Duration::from_secs(30), || !running()),
        "the task still runs: {}",
        stdout(&c.ctr(&["task", "ls"]))
    );
    let _ = c.ctr(&["task", "delete", "orphan"]);
    let rm = c.ctr(&["container", "rm", "orphan"]);
    assert!(rm.status.success(), "{}", stderr(&rm));
    c.assert_no_residue();
    assert!(
        c.eventually(Duration::from_secs(10), || net.residue().is_empty()),
        "left in the pod namespace: {:?}",
        net.residue()
    );
}
