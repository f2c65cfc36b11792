//! Kubernetes pod networking, end to end without a kubelet: containerd
//! 1.6's CRI plugin runs Debian's CNI plugins (bridge with host-local
//! IPv4 and IPv6 addresses, then portmap) from a test-owned CNI config dir
//! and starts the kabuto sandbox in the namespace they made. The pod's
//! HTTP server answers the host at its pod addresses and at its hostPort;
//! a runc pod and a second kabuto pod on the same bridge reach it; the
//! container sees CRI's resolv.conf, hostname and hosts file and its
//! namespace's MTU; removing the pods leaves no VM, tap or namespace.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use k8s_cri::v1 as cri;
use kabuto_e2e::cri::Cri;
use kabuto_e2e::{http_get, image_with, Containerd, Options, Registry, CNI_BIN_DIR, NEEDS_ENV};

const MARKER: &str = "kabuto-cri-pod-answers";
const BRIDGE: &str = "kbcri0";

/// The bridge CNI made on the host, removed however the test ends.
struct BridgeGuard;

impl Drop for BridgeGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", BRIDGE])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn cni_config(dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "kabuto-cri",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "mtu": 1450,
                "ipam": {
                    "type": "host-local",
                    "dataDir": dir.join("ipam"),
                    "ranges": [
                        [{"subnet": "10.238.0.0/24"}],
                        [{"subnet": "fd00:238::/64"}]
                    ],
                    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
    .to_string()
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn cri_pods_on_a_cni_bridge_serve_the_host_and_each_other() {
    let _ = NEEDS_ENV;
    let _bridge = BridgeGuard;
    let work = tempfile::tempdir().expect("tempdir");
    let d = work.path();
    let registry = Registry::start();
    let pause = image_with(
        d,
        "pause",
        &[],
        serde_json::json!({"Cmd": ["sleep", "1000000"]}),
    );
    let web = image_with(
        d,
        "web",
        &[("www/index.html", 0o644, format!("{MARKER}\n").as_bytes())],
        serde_json::json!({"Cmd": ["httpd", "-f", "-p", "8080", "-h", "/www"]}),
    );
    let sandbox_image = registry.push_layout(&pause, "latest", "k8s/pause");
    let web_image = registry.push_layout(&web, "latest", "open/web");
    let cni_dir = d.join("cni");
    std::fs::create_dir(&cni_dir).expect("cni dir");
    std::fs::write(cni_dir.join("10-kabuto.conflist"), cni_config(d)).expect("CNI config");
    let options = Options {
        containerd_config: format!(
            "  sandbox_image = \"{sandbox_image}\"\n\
             \x20 restrict_oom_score_adj = true\n\
             [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
             \x20 bin_dir = \"{CNI_BIN_DIR}\"\n\
             \x20 conf_dir = \"{}\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kabuto]\n\
             \x20 runtime_type = \"{}\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
             \x20 runtime_type = \"io.containerd.runc.v2\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{}\"]\n\
             \x20 endpoint = [\"http://{}\"]\n",
            cni_dir.display(),
            kabuto_e2e::RUNTIME,
            registry.host,
            registry.host
        ),
        ..Default::default()
    };
    let c = Containerd::start_with(options);
    let mut cri = Cri::connect(&c.socket());
    let log = |c: &Containerd| {
        c.log()
            .lines()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let dns = cri::DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec!["svc.cluster.local".into()],
        options: vec!["ndots:5".into()],
    };

    let pod = cri
        .run_networked_pod(
            "web",
            "kabuto",
            "web-pod",
            &[(8080, 18080)],
            dns.clone(),
            // A namespaced sysctl kubelet allows: the pod's network
            // namespace takes it (the guest's does not).
            &[("net.ipv4.ip_unprivileged_port_start", "0")],
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", log(&c)));
    let web_ref = cri.pull(&web_image, &pod).expect("pull");
    let server = cri
        .start_container(&pod, "web", &web_ref, &[])
        .unwrap_or_else(|e| panic!("{e}\n{}", log(&c)));
    let ips = cri.pod_ips(&pod).expect("pod IPs");
    let v4 = ips
        .iter()
        .find(|ip| !ip.contains(':'))
        .expect("IPv4")
        .clone();
    let v6 = ips
        .iter()
        .find(|ip| ip.contains(':'))
        .expect("IPv6")
        .clone();
    assert!(v4.starts_with("10.238.0."), "{ips:?}");

    // The host reaches the pod at its addresses and at its hostPort.
    for address in [
        format!("{v4}:8080"),
        format!("[{v6}]:8080"),
        "10.238.0.1:18080".into(),
    ] {
        let address: SocketAddr = address.parse().expect("address");
        let body = http_get(address, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}\n{}", log(&c)));
        assert!(body.contains(MARKER), "{address}: {body}");
    }

    // What the container sees is the pod's: CRI's files, the namespace's MTU.
    let files = c
        .dir
        .path()
        .join("root/io.containerd.grpc.v1.cri/sandboxes")
        .join(&pod.id);
    for (path, host_file) in [
        ("/etc/resolv.conf", "resolv.conf"),
        ("/etc/hostname", "hostname"),
        ("/etc/hosts", "hosts"),
    ] {
        let (code, seen) = cri.exec_sync(&server, &["cat", path]).expect("exec");
        assert_eq!(code, 0, "{seen}");
        let written = std::fs::read_to_string(files.join(host_file)).expect("CRI's file");
        assert_eq!(seen, written, "{path}");
    }
    let (_, resolv) = cri
        .exec_sync(&server, &["cat", "/etc/resolv.conf"])
        .expect("exec");
    assert!(
        resolv.contains("nameserver 10.96.0.10") && resolv.contains("ndots:5"),
        "{resolv}"
    );
    let (_, port_start) = cri
        .exec_sync(
            &server,
            &["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"],
        )
        .expect("exec");
    assert_eq!(port_start.trim(), "0", "the pod's sysctl");
    let (_, hostname) = cri.exec_sync(&server, &["hostname"]).expect("exec");
    assert_eq!(hostname.trim(), "web-pod");
    let (_, link) = cri
        .exec_sync(&server, &["ip", "addr", "show", "eth0"])
        .expect("exec");
    assert!(link.contains("mtu 1450") && link.contains(&v4), "{link}");

    // A runc pod and a second kabuto pod on the bridge reach it.
    let url = format!("http://{v4}:8080/");
    for handler in ["runc", "kabuto"] {
        let name = format!("client-{handler}");
        let client = cri
            .run_networked_pod(&name, handler, &name, &[], dns.clone(), &[])
            .unwrap_or_else(|e| panic!("{e}\n{}", log(&c)));
        let image = cri.pull(&web_image, &client).expect("pull");
        let id = cri
            .start_container(&client, &name, &image, &["sleep", "1000"])
            .unwrap_or_else(|e| panic!("{e}\n{}", log(&c)));
        let (code, fetched) = cri
            .exec_sync(&id, &["wget", "-q", "-O", "-", &url])
            .expect("exec");
        assert!(
            code == 0 && fetched.contains(MARKER),
            "{handler}: {fetched}"
        );
        cri.remove_pod(&client).expect("remove client");
    }

    cri.remove_pod(&pod).expect("remove pod");
    c.assert_no_residue();
    let netns: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for ns in netns.iter().filter(|n| n.starts_with("cni-")) {
        let links = kabuto_e2e::sh("ip", &["-n", ns, "-o", "link"]);
        assert!(!links.contains("tap0_kb"), "a tap left in {ns}: {links}");
    }
}
