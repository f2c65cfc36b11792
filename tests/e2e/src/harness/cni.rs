//! A pod network as CNI makes one, with Debian's real plugins: a network
//! namespace of the test's own, the `bridge` plugin (with `host-local`
//! addresses, IPv4 and IPv6) putting a veth `eth0` into it, and what the
//! namespace holds afterwards (links, qdiscs) for the residue checks.

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// Where Debian's containernetworking-plugins puts the plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

pub struct CniNetwork {
    pub name: String,
    pub bridge: String,
    pub netns: String,
    /// The pod's addresses as the plugin reported them.
    pub ipv4: String,
    pub ipv6: String,
    /// The bridge's own addresses (the pod's gateways).
    pub gateway4: String,
    conf: String,
    data_dir: PathBuf,
    added: bool,
}

/// The answer to `GET /` at `address` (status line included), retried
/// until `limit`: a pod's server starts after its VM boots.
pub fn http_get(address: SocketAddr, limit: Duration) -> Result<String, String> {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    while Instant::now() < deadline {
        match TcpStream::connect_timeout(&address, Duration::from_secs(2)) {
            Ok(mut stream) => {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut response = String::new();
                let read = stream
                    .write_all(b"GET / HTTP/1.0\r\n\r\n")
                    .and_then(|()| stream.read_to_string(&mut response));
                match read {
                    Ok(_) if response.starts_with("HTTP/1") => return Ok(response),
                    Ok(_) => last = format!("answer {response:?}"),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Err(format!("{address}: {last}"))
}

/// Runs `program args…`, panicking with its stderr on failure.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `program args…` for its effect where failing is fine (removing
/// what may not exist).
fn quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

impl CniNetwork {
    /// A namespace `kabuto-<tag>` with eth0 on bridge `kb<tag>` in
    /// 10.<n>.0.0/24 and fd00:<n>::/64, MTU `mtu`. `n` keeps parallel
    /// tests apart.
    pub fn add(dir: &Path, tag: &str, n: u8, mtu: u32) -> CniNetwork {
        quiet("ip", &["link", "del", &format!("kb{tag}")]);
        CniNetwork::join(dir, tag, tag, n, mtu)
    }

    /// Pod `pod`'s namespace `kabuto-<pod>` on network `network` (bridge
    /// `kb<network>`, made by the first pod that joins): several pods on one
    /// bridge reach each other.
    pub fn join(dir: &Path, network: &str, pod: &str, n: u8, mtu: u32) -> CniNetwork {
        let name = format!("kabuto-{pod}");
        let bridge = format!("kb{network}");
        assert!(bridge.len() < 16, "bridge name {bridge} too long");
        // A stale one from a killed run.
        quiet("ip", &["netns", "del", &name]);
        sh("ip", &["netns", "add", &name]);
        let data_dir = dir.join(format!("ipam-{network}"));
        let conf = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": format!("kabuto-{network}"),
            "type": "bridge",
            "bridge": bridge,
            "isGateway": true,
            "ipMasq": false,
            "mtu": mtu,
            "ipam": {
                "type": "host-local",
                "dataDir": data_dir,
                "ranges": [
                    [{"subnet": format!("10.{n}.0.0/24")}],
                    [{"subnet": format!("fd00:{n}::/64")}]
                ],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
            }
        })
        .to_string();
        let mut network = CniNetwork {
            netns: format!("/run/netns/{name}"),
            name,
            bridge,
            ipv4: String::new(),
            ipv6: String::new(),
            gateway4: format!("10.{n}.0.1"),
            conf,
            data_dir,
            added: false,
        };
        let result = network.plugin("ADD");
        network.added = true;
        let result: serde_json::Value = serde_json::from_str(&result).expect("CNI result");
        for ip in result["ips"].as_array().expect("ips") {
            let address = ip["address"].as_str().expect("address");
            let bare = address.split('/').next().expect("ip").to_string();
            if bare.contains(':') {
                network.ipv6 = bare;
            } else {
                network.ipv4 = bare;
            }
        }
        assert!(
            !network.ipv4.is_empty() && !network.ipv6.is_empty(),
            "{result}"
        );
        network
    }

    fn plugin(&self, command: &str) -> String {
        let mut child = Command::new(Path::new(CNI_BIN_DIR).join("bridge"))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.name)
            .env("CNI_NETNS", &self.netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_BIN_DIR)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running the CNI bridge plugin (apt-get install containernetworking-plugins)");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(self.conf.as_bytes())
            .expect("CNI config");
        let out = child.wait_with_output().expect("CNI plugin");
        assert!(
            out.status.success(),
            "CNI {command}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// The namespace's link names.
    pub fn links(&self) -> Vec<String> {
        self.ip(&["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    /// What the pod network leaves in the namespace beyond CNI's own: taps
    /// and ingress qdiscs (with their filters).
    pub fn residue(&self) -> Vec<String> {
        let mut left: Vec<String> = self
            .links()
            .into_iter()
            .filter(|l| l.starts_with("tap"))
            .collect();
        let qdiscs = sh("tc", &["-n", &self.name, "qdisc", "show"]);
        left.extend(
            qdiscs
                .lines()
                .filter(|l| l.contains("ingress"))
                .map(String::from),
        );
        left
    }
}

impl Drop for CniNetwork {
    fn drop(&mut self) {
        if self.added {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.plugin("DEL")));
        }
        quiet("ip", &["netns", "del", &self.name]);
        quiet("ip", &["link", "del", &self.bridge]);
        let _ = fs::remove_dir_all(&self.data_dir);
    }
}
