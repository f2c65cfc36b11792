//! The data hub, on the pod's 127.0.0.1:8006, for processes of the pod's
//! own containers only: `GET /cdh/resource/<repo>/<type>/<tag>` answers
//! with the KBS resource, fetched after attestation; `POST /cdh/unseal`
//! with the plaintext of the sealed secret in the body; `GET /aa/token`
//! with the KBS token, `GET /aa/evidence?runtime_data=…` with fresh
//! evidence binding the caller's data (CoCo's API server's paths).

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use kabuto_attestation_agent::KbsClient;
use kabuto_protocol::DATA_HUB_PORT;

/// A request line and headers larger than this are refused.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Why the data hub did not start.
#[derive(Debug, thiserror::Error)]
pub enum DataHubError {
    #[error("entering the pod's network, where the KBS is reached")]
    Egress(#[source] Box<crate::pod_network::PodNetworkError>),
    #[error("the pod's network namespace")]
    Netns(#[source] std::io::Error),
    #[error("entering the pod's network namespace")]
    Setns(#[source] nix::Error),
    #[error(transparent)]
    Loopback(#[from] crate::net::NetError),
    #[error("binding 127.0.0.1:{DATA_HUB_PORT}")]
    Bind(#[source] std::io::Error),
    #[error("starting the data hub")]
    Thread(#[source] std::io::Error),
    #[error("the data hub did not start")]
    NotStarted,
}

/// Why a connection to the data hub is refused (its text is the 403 body).
#[derive(Debug, thiserror::Error)]
enum PeerError {
    #[error("peer address")]
    PeerAddress(#[source] std::io::Error),
    #[error("local address")]
    LocalAddress(#[source] std::io::Error),
    #[error("reading the socket table")]
    SocketTable(#[source] std::io::Error),
    #[error("no socket {peer} -> {local} in the pod's namespace")]
    NoSocket { peer: SocketAddr, local: SocketAddr },
    #[error("reading /proc")]
    Proc(#[source] std::io::Error),
    #[error("no process holds the socket {peer} -> {local}")]
    NoHolder { peer: SocketAddr, local: SocketAddr },
    #[error(
        "container {0} is not one of the pod's own containers (the data hub answers only those)"
    )]
    OtherContainer(String),
    #[error("the connecting process is not in a container of this pod")]
    NoContainer,
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
    egress: Option<Arc<crate::pod_network::PodNetns>>,
) -> Result<(), DataHubError> {
    let netns = std::fs::File::open(format!("/proc/{pid}/ns/net")).map_err(DataHubError::Netns)?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    // Threads inherit their creator's network namespace. Requests are
    // served by threads spawned from where the guest's traffic leaves (the
    // pod's network, else the guest's namespace with QEMU's user network),
    // where the KBS is reachable; only the listener enters the pod's
    // namespace.
    let (stream_tx, stream_rx) = std::sync::mpsc::channel::<TcpStream>();
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("data-hub-dispatch".into())
        .spawn(move || {
            let entered = egress.map(|netns| netns.enter()).transpose();
            let failed = entered.is_err();
            let _ = entered_tx.send(entered);
            if failed {
                return;
            }
            for stream in stream_rx {
                let kbs = kbs.clone();
                let _ = std::thread::Builder::new()
                    .name("data-hub-request".into())
                    .spawn(move || serve(stream, &kbs));
            }
        })
        .map_err(DataHubError::Thread)?;
    // Not started (and not said to be) unless requests can reach the KBS.
    entered_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| DataHubError::NotStarted)?
        .map_err(|e| DataHubError::Egress(Box::new(e)))?;
    std::thread::Builder::new()
        .name("data-hub".into())
        .spawn(move || {
            // setns affects only this thread.
            let bound = nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(DataHubError::Setns)
                .and_then(|()| Ok(crate::net::bring_up("lo")?))
                .and_then(|()| {
                    TcpListener::bind((Ipv4Addr::LOCALHOST, DATA_HUB_PORT))
                        .map_err(DataHubError::Bind)
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
                    let reason = kabuto_error::chain(&reason);
                    log::warn!("data hub: refused a connection: {reason}");
                    respond(&stream, 403, format!("{reason}\n").as_bytes());
                    continue;
                }
                if stream_tx.send(stream).is_err() {
                    return;
                }
            }
        })
        .map_err(DataHubError::Thread)?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| DataHubError::NotStarted)?
}

/// Refuses a connection unless every process holding its client end is
/// in one of `clients`' containers.
fn check_peer(stream: &TcpStream, clients: &DataHubClients) -> Result<(), PeerError> {
    let peer = stream.peer_addr().map_err(PeerError::PeerAddress)?;
    let local = stream.local_addr().map_err(PeerError::LocalAddress)?;
    let holders = peer_containers(peer, local)?;
    let allowed = clients.lock().unwrap_or_else(|p| p.into_inner());
    match holders
        .iter()
        .find(|c| !c.as_deref().is_some_and(|id| allowed.contains(id)))
    {
        None => Ok(()),
        Some(Some(id)) => Err(PeerError::OtherContainer(id.clone())),
        Some(None) => Err(PeerError::NoContainer),
    }
}

/// The containers (by cgroup; `None` for a process in none) of every
/// process holding the TCP socket whose local end is `peer` and remote end
/// `local`, as this thread's network namespace sees it. An empty answer is
/// an error: a socket nobody holds cannot be attributed.
fn peer_containers(peer: SocketAddr, local: SocketAddr) -> Result<Vec<Option<String>>, PeerError> {
    let table =
        std::fs::read_to_string("/proc/thread-self/net/tcp").map_err(PeerError::SocketTable)?;
    let inode = socket_inode(&table, peer, local).ok_or(PeerError::NoSocket { peer, local })?;
    let target = format!("socket:[{inode}]");
    let mut holders = Vec::new();
    let procs = std::fs::read_dir("/proc").map_err(PeerError::Proc)?;
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
        return Err(PeerError::NoHolder { peer, local });
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

/// One HTTP/1.1 request. Hand-written: four routes on loopback do not
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
    let (route, query) = path.split_once('?').unwrap_or((path, ""));
    match (method, route) {
        ("POST", "/cdh/unseal") => match read_body(&mut reader, &head) {
            Ok(body) => unseal(&stream, kbs, &body),
            Err((status, why)) => respond(&stream, status, why.as_bytes()),
        },
        ("GET", "/aa/token") => token(&stream, kbs, query),
        ("GET", "/aa/evidence") => evidence(&stream, kbs, query),
        ("GET", _) if route.starts_with("/cdh/resource/") => {
            resource(&stream, kbs, &route["/cdh/resource/".len()..])
        }
        (_, "/cdh/unseal" | "/aa/token" | "/aa/evidence") => {
            respond(&stream, 405, b"POST /cdh/unseal; GET the others\n")
        }
        _ if route.starts_with("/cdh/resource/") => respond(&stream, 405, b"only GET\n"),
        _ => respond(
            &stream,
            404,
            b"GET /cdh/resource/<repository>/<type>/<tag>, POST /cdh/unseal, \
              GET /aa/token?token_type=kbs, GET /aa/evidence?runtime_data=...\n",
        ),
    }
}

/// The status for a KBS client error: the KBS's own, 400 for what the
/// request got wrong, 502 for the rest.
fn kbs_status(e: &kabuto_attestation_agent::AttestError) -> u16 {
    match e {
        kabuto_attestation_agent::AttestError::Kbs { status, .. } => *status,
        kabuto_attestation_agent::AttestError::Resource(_) => 400,
        _ => 502,
    }
}

/// `GET /cdh/resource/<repository>/<type>/<tag>`.
fn resource(stream: &TcpStream, kbs: &KbsClient, resource: &str) {
    match kbs.get_resource(&format!("kbs:///{resource}")) {
        Ok(value) => {
            log::info!("data hub: released kbs:///{resource} to the pod");
            respond(stream, 200, &value)
        }
        Err(e) => {
            log::warn!("data hub: kbs:///{resource}: {e}");
            respond(stream, kbs_status(&e), format!("{e}\n").as_bytes())
        }
    }
}

/// The value of `name` in a query string, percent-decoded.
fn query_value(query: &str, name: &str) -> Option<Vec<u8>> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| percent_encoding::percent_decode_str(&value.replace('+', " ")).collect())
}

/// `GET /aa/token[?token_type=kbs]`: `{"token": <the KBS's attestation
/// token>}` as CoCo's API server answers, without its `tee_keypair` (the
/// TEE key stays with the agent; resources come through /cdh/resource).
fn token(stream: &TcpStream, kbs: &KbsClient, query: &str) {
    let kind = query_value(query, "token_type").unwrap_or_else(|| b"kbs".to_vec());
    if kind != b"kbs" {
        return respond(stream, 400, b"token_type must be kbs\n");
    }
    match kbs.token() {
        Ok(token) => {
            log::info!("data hub: gave the pod its KBS token");
            let body = serde_json::json!({ "token": token }).to_string();
            respond(stream, 200, body.as_bytes())
        }
        Err(e) => {
            log::warn!("data hub: token: {e}");
            respond(stream, kbs_status(&e), format!("{e}\n").as_bytes())
        }
    }
}

/// `GET /aa/evidence?runtime_data=…[&encoding=base64]`: fresh evidence
/// whose report data is the caller's (at most 64 bytes; base64 is
/// URL-safe without padding, as CoCo's API server reads it).
fn evidence(stream: &TcpStream, kbs: &KbsClient, query: &str) {
    use base64::Engine as _;
    let Some(raw) = query_value(query, "runtime_data") else {
        return respond(stream, 400, b"runtime_data is required\n");
    };
    let runtime_data = match query_value(query, "encoding").as_deref() {
        None => raw,
        Some(b"base64") => match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&raw) {
            Ok(data) => data,
            Err(_) => return respond(stream, 400, b"runtime_data is not base64url\n"),
        },
        Some(_) => return respond(stream, 400, b"encoding must be base64 (or absent)\n"),
    };
    match kbs.evidence(&runtime_data) {
        Ok(evidence) => respond(stream, 200, evidence.to_string().as_bytes()),
        Err(e) => {
            log::warn!("data hub: evidence: {e}");
            let status = match e {
                kabuto_attestation_agent::AttestError::Evidence(_) => 400,
                _ => 500,
            };
            respond(stream, status, format!("{e}\n").as_bytes())
        }
    }
}

/// The body of a request whose head is `head`: exactly its Content-Length
/// bytes, at most a sealed secret's limit.
fn read_body(
    reader: &mut BufReader<&TcpStream>,
    head: &str,
) -> Result<Vec<u8>, (u16, &'static str)> {
    use std::io::Read as _;
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .ok_or((411, "a Content-Length is required\n"))?;
    if length > kabuto_sealed_secret::MAX_LEN {
        return Err((413, "a sealed secret is at most 1 MiB\n"));
    }
    let mut body = vec![0u8; length];
    reader
        .read_exact(&mut body)
        .map_err(|_| (400, "the body is shorter than its Content-Length\n"))?;
    Ok(body)
}

/// `POST /cdh/unseal`: the plaintext of the sealed secret in the body.
fn unseal(stream: &TcpStream, kbs: &KbsClient, body: &[u8]) {
    let Ok(text) = std::str::from_utf8(body) else {
        return respond(stream, 400, b"the sealed secret is not UTF-8\n");
    };
    match crate::sealed::unseal(kbs, text) {
        Ok(plaintext) => {
            log::info!("data hub: unsealed a secret for the pod");
            respond(stream, 200, &plaintext)
        }
        Err(e) => {
            let reason = kabuto_error::chain(&e);
            log::warn!("data hub: unseal: {reason}");
            respond(stream, e.http_status(), format!("{reason}\n").as_bytes())
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
        411 => "Length Required",
        413 => "Content Too Large",
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
}
