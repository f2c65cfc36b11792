//! Confidential pods: the init-data binding check against the TEE's launch
//! data, the KBS client from init-data, and the data hub that serves KBS
//! resources to the pod's containers.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use kabuto_attestation_agent::{evidence, EvidenceProvider, KbsClient, TeeKind};
use kabuto_protocol::{DATA_HUB_PORT, KERNEL_PARAM_TEE, SWTEE_VSOCK_PORT};

/// The host's vsock context id.
const HOST_CID: u32 = 2;
/// A request line and headers larger than this are refused.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// The TEE the runtime launched this guest in, from the kernel command
/// line. The host could lie here, but only to its own loss: without
/// evidence from the claimed TEE no KBS releases anything.
pub fn tee_from_cmdline(cmdline: &str) -> Result<Option<TeeKind>, String> {
    let prefix = format!("{KERNEL_PARAM_TEE}=");
    match cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
    {
        None => Ok(None),
        Some(kind) => kind.parse::<TeeKind>().map(Some).map_err(|e| e.to_string()),
    }
}

/// True when the command line has a `kabuto.tee=` parameter, whatever its
/// value: such a guest starts closed (an unknown value must not open it).
pub fn names_a_tee(cmdline: &str) -> bool {
    let prefix = format!("{KERNEL_PARAM_TEE}=");
    cmdline
        .split_whitespace()
        .any(|w| w.starts_with(prefix.as_str()))
}

/// The TEE guest interface this guest has, if any: such a guest is
/// confidential whatever its (host-written) command line says.
pub fn tee_hardware() -> Option<&'static str> {
    [
        ("/dev/sev-guest", "SEV-SNP"),
        ("/dev/tdx_guest", "TDX"),
        ("/sys/kernel/config/tsm/report", "configfs-tsm"),
    ]
    .into_iter()
    .find(|(path, _)| std::path::Path::new(path).exists())
    .map(|(_, name)| name)
}

/// True for a guest that must treat the host as the attacker: its command
/// line names a TEE (any value), or it has TEE hardware whatever the
/// command line says.
pub fn is_confidential(cmdline: &str) -> bool {
    names_a_tee(cmdline) || tee_hardware().is_some()
}

/// Connects to the software TEE's firmware on the host.
fn software_tee_connector() -> evidence::Connector {
    Box::new(|| {
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(std::io::Error::from)?;
        connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &VsockAddr::new(HOST_CID, SWTEE_VSOCK_PORT),
        )
        .map_err(std::io::Error::from)?;
        let stream = std::os::unix::net::UnixStream::from(fd);
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Box::new(stream) as Box<dyn evidence::ReadWrite>)
    })
}

/// The evidence provider for `kind`; never another kind.
pub fn provider(kind: TeeKind) -> Result<Box<dyn EvidenceProvider>, String> {
    let connector = (kind == TeeKind::SoftwareTee).then(software_tee_connector);
    kabuto_attestation_agent::provider(kind, connector).map_err(|e| e.to_string())
}

/// The launch data the TEE reports: SNP HOST_DATA (32 bytes) or TDX
/// MRCONFIGID (48 bytes), read from fresh evidence.
pub fn launch_data(provider: &dyn EvidenceProvider) -> Result<Vec<u8>, String> {
    let evidence = provider
        .evidence(&[0u8; 64])
        .map_err(|e| format!("reading the TEE's launch data: {e}"))?;
    if let Some(host_data) = evidence
        .get("attestation_report")
        .and_then(|r| r.get("host_data"))
        .and_then(|h| h.as_array())
    {
        return host_data
            .iter()
            .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| "malformed HOST_DATA in the SNP report".to_string());
    }
    if let Some(quote) = evidence.get("quote").and_then(|q| q.as_str()) {
        // Quote header (48 bytes), then the TD report body, whose
        // MRCONFIGID sits at offset 184.
        const MRCONFIGID: std::ops::Range<usize> = 48 + 184..48 + 232;
        let quote = base64::engine::general_purpose::STANDARD
            .decode(quote)
            .map_err(|e| format!("TDX quote: {e}"))?;
        return quote
            .get(MRCONFIGID)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| "TDX quote too short".to_string());
    }
    Err("the TEE's evidence carries no launch data".into())
}

/// Refuses init-data whose digest is not what the TEE was launched with.
pub fn check_binding(digest: &[u8], launch: &[u8]) -> Result<(), String> {
    let field = if launch.len() == 48 {
        "MRCONFIGID"
    } else {
        "HOST_DATA"
    };
    let expected = kabuto_initdata::fit_digest(digest, launch.len());
    if expected != launch {
        return Err(format!(
            "the init-data's digest {} does not match the TEE's {field} {}: the host changed the init-data after launch; refusing it and every container",
            hex::encode(&expected),
            hex::encode(launch)
        ));
    }
    Ok(())
}

/// Whether the owner's init-data allows CoCo's sample attester: `aa.toml`
/// `[kabuto] allow_sample_attester = true`. CoCo falls back to sample
/// evidence when it finds no TEE; kabuto uses it only when the host
/// launched the guest with `kabuto.tee=sample`, this says yes, and the guest
/// has no TEE hardware.
pub fn sample_attester_allowed(aa_toml: Option<&str>) -> Result<(), String> {
    const HOW: &str = "init-data aa.toml [kabuto] allow_sample_attester = true";
    if let Some(hardware) = tee_hardware() {
        return Err(format!(
            "kabuto.tee=sample on a guest with {hardware}: a TEE guest attests with its TEE, never with sample evidence"
        ));
    }
    let Some(aa_toml) = aa_toml else {
        return Err(format!(
            "kabuto.tee=sample needs init-data that allows CoCo's sample attester ({HOW})"
        ));
    };
    let doc: toml::Value =
        toml::from_str(aa_toml).map_err(|e| format!("init-data aa.toml: {e}"))?;
    match doc
        .get("kabuto")
        .and_then(|k| k.get("allow_sample_attester"))
    {
        Some(toml::Value::Boolean(true)) => Ok(()),
        Some(toml::Value::Boolean(false)) | None => Err(format!(
            "kabuto.tee=sample, but the init-data does not allow CoCo's sample attester ({HOW})"
        )),
        Some(other) => Err(format!(
            "init-data aa.toml: kabuto.allow_sample_attester must be true or false, not {other}"
        )),
    }
}

/// KBS settings from init-data `aa.toml`, as CoCo writes them:
/// `[token_configs.kbs] url = "...", cert = "PEM"`.
#[derive(Debug)]
pub struct KbsSettings {
    pub url: String,
    pub cert: Option<String>,
}

pub fn kbs_settings(aa_toml: &str) -> Result<Option<KbsSettings>, String> {
    let doc: toml::Value =
        toml::from_str(aa_toml).map_err(|e| format!("init-data aa.toml: {e}"))?;
    let Some(kbs) = doc.get("token_configs").and_then(|t| t.get("kbs")) else {
        return Ok(None);
    };
    let url = kbs
        .get("url")
        .and_then(|u| u.as_str())
        .ok_or("init-data aa.toml: token_configs.kbs has no url")?
        .to_string();
    let cert = kbs
        .get("cert")
        .and_then(|c| c.as_str())
        .filter(|c| !c.trim().is_empty())
        .map(str::to_owned);
    // Encryption to the guest's key keeps a resource from the host, but only
    // TLS to a certificate the owner pinned proves it came from the KBS: a
    // host in the middle would serve its own image policy and keys.
    if !url.starts_with("https://") {
        return Err(format!(
            "init-data aa.toml: the KBS URL {url:?} is not https://: a confidential guest reaches \
             its KBS only over TLS"
        ));
    }
    if cert.is_none() {
        return Err(
            "init-data aa.toml: token_configs.kbs has no cert: a confidential guest trusts only \
             the KBS certificate (or CA) its init-data pins"
                .into(),
        );
    }
    Ok(Some(KbsSettings { url, cert }))
}

pub fn kbs_client(
    settings: &KbsSettings,
    provider: Box<dyn EvidenceProvider>,
    init_data: &[u8],
) -> Result<KbsClient, String> {
    let init_data =
        String::from_utf8(init_data.to_vec()).map_err(|_| "init-data is not UTF-8".to_string())?;
    KbsClient::new(
        &settings.url,
        settings.cert.as_deref().map(str::as_bytes),
        provider,
        Some(init_data),
    )
    .map_err(|e| e.to_string())
}

/// The containers whose processes the data hub answers.
pub type DataHubClients = Arc<std::sync::Mutex<std::collections::HashSet<String>>>;

/// Starts the data hub in the network namespace of process `pid` (the
/// pod's first container): `GET /cdh/resource/<repo>/<type>/<tag>` on
/// 127.0.0.1:8006 answers with the KBS resource, fetched after attestation
/// — to processes of the containers in `clients` only (the peer is found
/// from its socket, see [`peer_containers`]); anything else in the pod's
/// network namespace gets 403.
pub fn start_data_hub(
    pid: i32,
    kbs: Arc<KbsClient>,
    clients: DataHubClients,
) -> Result<(), String> {
    let netns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|e| format!("the pod's network namespace: {e}"))?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    // Threads inherit their creator's network namespace. Requests are
    // served by threads spawned from this (the guest's) namespace, where
    // the KBS is reachable; only the listener enters the pod's namespace.
    let (stream_tx, stream_rx) = std::sync::mpsc::channel::<TcpStream>();
    std::thread::Builder::new()
        .name("data-hub-dispatch".into())
        .spawn(move || {
            for stream in stream_rx {
                let kbs = kbs.clone();
                let _ = std::thread::Builder::new()
                    .name("data-hub-request".into())
                    .spawn(move || serve(stream, &kbs));
            }
        })
        .map_err(|e| format!("starting the data hub: {e}"))?;
    std::thread::Builder::new()
        .name("data-hub".into())
        .spawn(move || {
            // setns affects only this thread.
            let bound = nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns: {e}"))
                .and_then(|()| crate::net::bring_up("lo"))
                .and_then(|()| {
                    TcpListener::bind((Ipv4Addr::LOCALHOST, DATA_HUB_PORT))
                        .map_err(|e| format!("binding 127.0.0.1:{DATA_HUB_PORT}: {e}"))
                });
            let listener = match bound {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            for stream in listener.incoming().flatten() {
                // Checked here, in the pod's namespace, whose sockets
                // /proc/thread-self/net lists.
                if let Err(reason) = check_peer(&stream, &clients) {
                    log::warn!("data hub: refused a connection: {reason}");
                    respond(&stream, 403, format!("{reason}\n").as_bytes());
                    continue;
                }
                if stream_tx.send(stream).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| format!("starting the data hub: {e}"))?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| "the data hub did not start".to_string())?
}

/// Refuses a connection unless every process holding its client end is
/// in one of `clients`' containers.
fn check_peer(stream: &TcpStream, clients: &DataHubClients) -> Result<(), String> {
    let peer = stream
        .peer_addr()
        .map_err(|e| format!("peer address: {e}"))?;
    let local = stream
        .local_addr()
        .map_err(|e| format!("local address: {e}"))?;
    let holders = peer_containers(peer, local)?;
    let allowed = clients.lock().unwrap_or_else(|p| p.into_inner());
    match holders.iter().find(|c| !c.as_deref().is_some_and(|id| allowed.contains(id))) {
        None => Ok(()),
        Some(Some(id)) => Err(format!(
            "container {id} is not one of the pod's own containers (the data hub answers only those)"
        )),
        Some(None) => Err("the connecting process is not in a container of this pod".into()),
    }
}

/// The containers (by cgroup; `None` for a process in none) of every
/// process holding the TCP socket whose local end is `peer` and remote end
/// `local`, as this thread's network namespace sees it. An empty answer is
/// an error: a socket nobody holds cannot be attributed.
fn peer_containers(
    peer: std::net::SocketAddr,
    local: std::net::SocketAddr,
) -> Result<Vec<Option<String>>, String> {
    let table = std::fs::read_to_string("/proc/thread-self/net/tcp")
        .map_err(|e| format!("reading the socket table: {e}"))?;
    let inode = socket_inode(&table, peer, local)
        .ok_or_else(|| format!("no socket {peer} -> {local} in the pod's namespace"))?;
    let target = format!("socket:[{inode}]");
    let mut holders = Vec::new();
    let procs = std::fs::read_dir("/proc").map_err(|e| format!("reading /proc: {e}"))?;
    for entry in procs.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str())
        });
        if holds {
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            holders.push(container_of_cgroup(&cgroup));
        }
    }
    if holders.is_empty() {
        return Err(format!("no process holds the socket {peer} -> {local}"));
    }
    Ok(holders)
}

/// The inode of the IPv4 socket with local address `local` and remote
/// `remote` in a `/proc/net/tcp` table (addresses as the kernel prints them:
/// the 32-bit address in host byte order, the port big-endian, hex).
fn socket_inode(
    table: &str,
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
) -> Option<u64> {
    let hex = |a: std::net::SocketAddr| match a {
        std::net::SocketAddr::V4(v4) => Some(format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        )),
        std::net::SocketAddr::V6(_) => None,
    };
    let (local, remote) = (hex(local)?, hex(remote)?);
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&local.as_str()) && fields.get(2) == Some(&remote.as_str()))
            .then(|| fields.get(9)?.parse().ok())
            .flatten()
    })
}

/// The container of a process from its `/proc/PID/cgroup` (cgroup v2:
/// `0::/kabuto/<id>[/…]`), as the agent places containers.
fn container_of_cgroup(cgroup: &str) -> Option<String> {
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let rest = path.strip_prefix(&format!("/{}/", crate::containers::CGROUP_PARENT))?;
    rest.split('/')
        .next()
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
}

/// One HTTP/1.1 request. Hand-written: one GET route on loopback does not
/// justify an HTTP server crate in the guest image.
fn serve(stream: TcpStream, kbs: &KbsClient) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(&stream);
    let mut head = String::new();
    let mut request_line = String::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if request_line.is_empty() {
            request_line = line.trim_end().to_string();
        }
        head.push_str(&line);
        if line == "\r\n" || line == "\n" {
            break;
        }
        if head.len() > MAX_REQUEST_HEAD {
            return respond(&stream, 431, "request head too large\n".as_bytes());
        }
    }
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return respond(&stream, 400, b"malformed request line\n");
    };
    if method != "GET" {
        return respond(&stream, 405, b"only GET\n");
    }
    let Some(resource) = path.strip_prefix("/cdh/resource/") else {
        return respond(
            &stream,
            404,
            b"use /cdh/resource/<repository>/<type>/<tag>\n",
        );
    };
    match kbs.get_resource(&format!("kbs:///{resource}")) {
        Ok(value) => {
            log::info!("data hub: released kbs:///{resource} to the pod");
            respond(&stream, 200, &value)
        }
        Err(e) => {
            log::warn!("data hub: kbs:///{resource}: {e}");
            let status = match &e {
                kabuto_attestation_agent::AttestError::Kbs { status, .. } => *status,
                kabuto_attestation_agent::AttestError::Resource(_) => 400,
                _ => 502,
            };
            respond(&stream, status, format!("{e}\n").as_bytes())
        }
    }
}

fn respond(mut stream: &TcpStream, status: u16, body: &[u8]) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_kbs_is_reached_over_pinned_tls_only() {
        let pem = "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n";
        let ok =
            format!("[token_configs.kbs]\nurl = \"https://10.0.2.2:8080\"\ncert = '''\n{pem}'''\n");
        let settings = kbs_settings(&ok).unwrap().unwrap();
        assert_eq!(settings.url, "https://10.0.2.2:8080");
        let http = "[token_configs.kbs]\nurl = \"http://10.0.2.2:8080\"\ncert = \"x\"\n";
        assert!(kbs_settings(http).unwrap_err().contains("not https://"));
        let no_cert = "[token_configs.kbs]\nurl = \"https://10.0.2.2:8080\"\n";
        assert!(kbs_settings(no_cert).unwrap_err().contains("has no cert"));
        let empty_cert = "[token_configs.kbs]\nurl = \"https://kbs\"\ncert = \"\"\n";
        assert!(kbs_settings(empty_cert)
            .unwrap_err()
            .contains("has no cert"));
        assert!(kbs_settings("[other]\n").unwrap().is_none());
    }

    #[test]
    fn sockets_are_found_as_the_kernel_prints_them() {
        // Two lines in /proc/net/tcp's format: the data hub's listener and a
        // client at 127.0.0.1:41236 connected to it.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F46 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 18250 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:A0D4 0100007F:1F46 01 00000000:00000000 00:00000000 00000000     0        0 18977 1 0000000000000000 20 4 30 10 -1\n";
        let client: std::net::SocketAddr = "127.0.0.1:41172".parse().unwrap();
        let hub: std::net::SocketAddr = "127.0.0.1:8006".parse().unwrap();
        assert_eq!(socket_inode(table, client, hub), Some(18977));
        assert_eq!(socket_inode(table, hub, client), None);
        let other: std::net::SocketAddr = "127.0.0.1:41173".parse().unwrap();
        assert_eq!(socket_inode(table, other, hub), None);
    }

    #[test]
    fn containers_are_found_by_cgroup() {
        assert_eq!(
            container_of_cgroup("0::/kabuto/web\n").as_deref(),
            Some("web")
        );
        assert_eq!(
            container_of_cgroup("0::/kabuto/web/sub\n").as_deref(),
            Some("web")
        );
        assert_eq!(container_of_cgroup("0::/\n"), None);
        assert_eq!(container_of_cgroup("0::/kabuto/\n"), None);
        assert_eq!(container_of_cgroup("0::/kabutox/web\n"), None);
        assert_eq!(container_of_cgroup(""), None);
    }

    #[test]
    fn binding_check() {
        assert!(check_binding(&[1; 32], &[1; 32]).is_ok());
        assert!(check_binding(
            &[1; 32],
            &[1; 32].iter().chain(&[0; 16]).copied().collect::<Vec<_>>()
        )
        .is_ok());
        let err = check_binding(&[1; 32], &[2; 32]).unwrap_err();
        assert!(err.contains("HOST_DATA"), "{err}");
        // No init-data: the launch data must be empty (all zero) too.
        assert!(check_binding(&[], &[0; 32]).is_ok());
        assert!(check_binding(&[], &[1; 32]).is_err());
    }

    #[test]
    fn cmdline_and_settings() {
        assert_eq!(
            tee_from_cmdline("a kabuto.tee=software b"),
            Ok(Some(TeeKind::SoftwareTee))
        );
        assert_eq!(tee_from_cmdline("console=hvc0"), Ok(None));
        assert_eq!(
            tee_from_cmdline("kabuto.tee=sample"),
            Ok(Some(TeeKind::Sample))
        );
    }

    /// The sample attester needs the owner's explicit yes in init-data, and
    /// never replaces TEE hardware.
    #[test]
    fn the_sample_attester_only_when_init_data_allows_it() {
        if let Some(hardware) = tee_hardware() {
            eprintln!("SKIPPED: this machine has {hardware}; the sample attester is refused on it");
            assert!(
                sample_attester_allowed(Some("[kabuto]\nallow_sample_attester = true")).is_err()
            );
            return;
        }
        assert!(sample_attester_allowed(Some("[kabuto]\nallow_sample_attester = true\n")).is_ok());
        for (aa, says) in [
            (None, "needs init-data"),
            (Some(""), "does not allow"),
            (
                Some("[kabuto]\nallow_sample_attester = false\n"),
                "does not allow",
            ),
            (
                Some("[kabuto]\nallow_sample_attester = \"yes\"\n"),
                "true or false",
            ),
        ] {
            let err = sample_attester_allowed(aa).unwrap_err();
            assert!(err.contains(says), "{aa:?}: {err}");
            assert!(err.contains("allow_sample_attester"), "{err}");
        }
        assert!(tee_from_cmdline("kabuto.tee=bogus").is_err());
        assert!(names_a_tee("a kabuto.tee=bogus"));
        assert!(names_a_tee("kabuto.tee=software"));
        assert!(!names_a_tee("console=hvc0 xkabuto.tee=snp"));
        let s =
            kbs_settings("[token_configs.kbs]\nurl = \"https://10.0.2.2:8443\"\ncert = \"PEM\"\n")
                .unwrap()
                .unwrap();
        assert_eq!(s.url, "https://10.0.2.2:8443");
        assert_eq!(s.cert.as_deref(), Some("PEM"));
        assert!(kbs_settings("[other]\n").unwrap().is_none());
        assert!(kbs_settings("[token_configs.kbs]\n").is_err());
    }
}
