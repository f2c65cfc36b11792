//! The host's connection to the guest agent: the vsock transports and a
//! typed client over the generated ttrpc stubs.

use std::{
    io::{Read, Write},
    os::{
        fd::{FromRawFd, IntoRawFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use kabuto_protocol::{
    agent::*,
    agent_ttrpc::{AgentServiceClient, HealthClient},
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AgentClientError {
    #[error("connecting to the agent over {transport}: {reason}")]
    Connect { transport: String, reason: String },
    #[error("connecting to the agent over {transport}: no answer within {timeout:?}")]
    ConnectTimeout {
        transport: String,
        timeout: Duration,
    },
    #[error("agent {method}: {message}")]
    Rpc {
        method: &'static str,
        code: ttrpc::Code,
        message: String,
    },
}

impl AgentClientError {
    /// True when a connection attempt got no answer in time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, AgentClientError::ConnectTimeout { .. })
    }

    /// True when the agent says the container or process does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, AgentClientError::Rpc { code, .. } if *code == ttrpc::Code::NOT_FOUND)
    }
}

/// Where the agent's vsock port is reached from the host.
#[derive(Debug, Clone)]
pub enum AgentAddress {
    /// Kernel vhost-vsock: AF_VSOCK to (cid, port).
    Vsock { cid: u32, port: u32 },
    /// A vhost-user vsock device's host socket: connect, then the
    /// `CONNECT <port>\n` / `OK <host port>\n` handshake.
    HybridVsock { uds: PathBuf, port: u32 },
}

impl AgentAddress {
    pub fn connect(&self, timeout: Duration) -> Result<OwnedFd, AgentClientError> {
        match self {
            AgentAddress::Vsock { cid, port } => connect_vsock(*cid, *port),
            AgentAddress::HybridVsock { uds, port } => connect_hybrid(uds, *port, timeout),
        }
    }

    fn describe(&self) -> String {
        match self {
            AgentAddress::Vsock { cid, port } => format!("vsock {cid}:{port}"),
            AgentAddress::HybridVsock { uds, port } => {
                format!("hybrid vsock {} port {port}", uds.display())
            }
        }
    }
}

fn connect_vsock(cid: u32, port: u32) -> Result<OwnedFd, AgentClientError> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
    let err = |e: nix::Error| AgentClientError::Connect {
        transport: format!("vsock {cid}:{port}"),
        reason: e.to_string(),
    };
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err)?;
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &VsockAddr::new(cid, port),
    )
    .map_err(err)?;
    Ok(fd)
}

fn connect_hybrid(uds: &Path, port: u32, timeout: Duration) -> Result<OwnedFd, AgentClientError> {
    let err = |reason: String| AgentClientError::Connect {
        transport: format!("hybrid vsock {} port {port}", uds.display()),
        reason,
    };
    let mut stream = UnixStream::connect(uds).map_err(|e| err(e.to_string()))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| err(e.to_string()))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| err(e.to_string()))?;
    // Read the reply a byte at a time: what follows the newline is ttrpc.
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(err(
                    "closed before answering (is the agent listening?)".into()
                ))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if reply.len() < 64 => reply.push(byte[0]),
            Ok(_) => return Err(err("handshake reply too long".into())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(AgentClientError::ConnectTimeout {
                    transport: format!("hybrid vsock {} port {port}", uds.display()),
                    timeout,
                })
            }
            Err(e) => return Err(err(e.to_string())),
        }
    }
    let reply = String::from_utf8_lossy(&reply);
    if !reply.starts_with("OK ") {
        return Err(err(format!("unexpected handshake reply {reply:?}")));
    }
    stream
        .set_read_timeout(None)
        .map_err(|e| err(e.to_string()))?;
    // SAFETY: into_raw_fd transfers sole ownership of the open socket.
    Ok(unsafe { OwnedFd::from_raw_fd(stream.into_raw_fd()) })
}

/// A typed client for the agent API. Cheap to clone; all clones share one
/// connection, on which ttrpc multiplexes concurrent requests.
#[derive(Clone)]
pub struct AgentClient {
    agent: AgentServiceClient,
    health: HealthClient,
    timeout: Duration,
}

/// No deadline: for calls that block until something happens in the guest
/// (process exit, output, OOM).
const NO_TIMEOUT: i64 = 0;

impl AgentClient {
    /// Connects (waiting at most `connect_timeout` for the handshake);
    /// short requests then get `request_timeout` each.
    pub fn connect(
        address: &AgentAddress,
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Self, AgentClientError> {
        let fd = address.connect(connect_timeout)?;
        let client =
            ttrpc::Client::new(fd.into_raw_fd()).map_err(|e| AgentClientError::Connect {
                transport: address.describe(),
                reason: e.to_string(),
            })?;
        Ok(AgentClient {
            agent: AgentServiceClient::new(client.clone()),
            health: HealthClient::new(client),
            timeout: request_timeout,
        })
    }

    fn ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(self.timeout.as_nanos() as i64)
    }

    fn blocking_ctx() -> ttrpc::context::Context {
        ttrpc::context::with_timeout(NO_TIMEOUT)
    }

    pub fn check(&self, timeout: Duration) -> Result<HealthCheckResponse, AgentClientError> {
        rpc(
            "Check",
            self.health.check(
                ttrpc::context::with_timeout(timeout.as_nanos() as i64),
                &CheckRequest::default(),
            ),
        )
    }

    pub fn create_sandbox(&self, req: &CreateSandboxRequest) -> Result<(), AgentClientError> {
        rpc("CreateSandbox", self.agent.create_sandbox(self.ctx(), req)).map(|_| ())
    }

    pub fn destroy_sandbox(&self, timeout: Duration) -> Result<(), AgentClientError> {
        rpc(
            "DestroySandbox",
            self.agent.destroy_sandbox(
                ttrpc::context::with_timeout(timeout.as_nanos() as i64),
                &DestroySandboxRequest::default(),
            ),
        )
        .map(|_| ())
    }

    pub fn create_container(&self, req: &CreateContainerRequest) -> Result<(), AgentClientError> {
        self.create_container_within(req, self.timeout)
    }

    /// CreateContainer with its own deadline: a guest pull takes as long as
    /// the image needs, not a short request's time.
    pub fn create_container_within(
        &self,
        req: &CreateContainerRequest,
        timeout: Duration,
    ) -> Result<(), AgentClientError> {
        rpc(
            "CreateContainer",
            self.agent
                .create_container(ttrpc::context::with_timeout(timeout.as_nanos() as i64), req),
        )
        .map(|_| ())
    }

    pub fn start_container(&self, container_id: &str) -> Result<u32, AgentClientError> {
        let req = StartContainerRequest {
            container_id: container_id.into(),
            ..Default::default()
        };
        rpc(
            "StartContainer",
            self.agent.start_container(self.ctx(), &req),
        )
        .map(|r| r.pid)
    }

    pub fn remove_container(&self, container_id: &str) -> Result<(), AgentClientError> {
        let req = RemoveContainerRequest {
            container_id: container_id.into(),
            ..Default::default()
        };
        rpc(
            "RemoveContainer",
            self.agent.remove_container(self.ctx(), &req),
        )
        .map(|_| ())
    }

    pub fn exec_process(&self, req: &ExecProcessRequest) -> Result<u32, AgentClientError> {
        rpc("ExecProcess", self.agent.exec_process(self.ctx(), req)).map(|r| r.pid)
    }

    pub fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentClientError> {
        let req = SignalProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            signal,
            all,
            ..Default::default()
        };
        rpc("SignalProcess", self.agent.signal_process(self.ctx(), &req)).map(|_| ())
    }

    pub fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<WaitProcessResponse, AgentClientError> {
        let req = WaitProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        rpc(
            "WaitProcess",
            self.agent.wait_process(Self::blocking_ctx(), &req),
        )
    }

    /// Blocks until output is available; an empty result is end of stream.
    pub fn read_stream(
        &self,
        container_id: &str,
        exec_id: &str,
        stderr: bool,
    ) -> Result<Vec<u8>, AgentClientError> {
        let req = ReadStreamRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            len: 32 * 1024,
            ..Default::default()
        };
        let result = if stderr {
            rpc(
                "ReadStderr",
                self.agent.read_stderr(Self::blocking_ctx(), &req),
            )
        } else {
            rpc(
                "ReadStdout",
                self.agent.read_stdout(Self::blocking_ctx(), &req),
            )
        };
        result.map(|r| r.data)
    }

    pub fn write_stdin(
        &self,
        container_id: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<u32, AgentClientError> {
        let req = WriteStreamRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            data: data.to_vec(),
            ..Default::default()
        };
        // Writing blocks while the container does not read its input.
        rpc(
            "WriteStdin",
            self.agent.write_stdin(Self::blocking_ctx(), &req),
        )
        .map(|r| r.len)
    }

    pub fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentClientError> {
        let req = CloseStdinRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        rpc("CloseStdin", self.agent.close_stdin(self.ctx(), &req)).map(|_| ())
    }

    pub fn tty_win_resize(
        &self,
        container_id: &str,
        exec_id: &str,
        row: u32,
        column: u32,
    ) -> Result<(), AgentClientError> {
        let req = TtyWinResizeRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            row,
            column,
            ..Default::default()
        };
        rpc("TtyWinResize", self.agent.tty_win_resize(self.ctx(), &req)).map(|_| ())
    }

    pub fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, AgentClientError> {
        let req = ListProcessesRequest {
            container_id: container_id.into(),
            ..Default::default()
        };
        rpc("ListProcesses", self.agent.list_processes(self.ctx(), &req)).map(|r| r.pids)
    }

    pub fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<StatsContainerResponse, AgentClientError> {
        let req = StatsContainerRequest {
            container_id: container_id.into(),
            ..Default::default()
        };
        rpc(
            "StatsContainer",
            self.agent.stats_container(self.ctx(), &req),
        )
    }

    pub fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<(), AgentClientError> {
        let req = UpdateContainerRequest {
            container_id: container_id.into(),
            resources: resources_json,
            ..Default::default()
        };
        rpc(
            "UpdateContainer",
            self.agent.update_container(self.ctx(), &req),
        )
        .map(|_| ())
    }

    /// Blocks until a container in the guest is OOM-killed.
    pub fn get_oom_event(&self) -> Result<String, AgentClientError> {
        rpc(
            "GetOOMEvent",
            self.agent
                .get_oom_event(Self::blocking_ctx(), &GetOOMEventRequest::default()),
        )
        .map(|r| r.container_id)
    }

    pub fn set_policy(&self, policy: &str) -> Result<(), AgentClientError> {
        let req = SetPolicyRequest {
            policy: policy.into(),
            ..Default::default()
        };
        rpc("SetPolicy", self.agent.set_policy(self.ctx(), &req)).map(|_| ())
    }

    pub fn update_interface(
        &self,
        interface: &kabuto_protocol::agent::Interface,
    ) -> Result<kabuto_protocol::agent::Interface, AgentClientError> {
        let req = kabuto_protocol::agent::UpdateInterfaceRequest {
            interface: protobuf::MessageField::some(interface.clone()),
            ..Default::default()
        };
        rpc(
            "UpdateInterface",
            self.agent.update_interface(self.ctx(), &req),
        )
    }

    pub fn update_routes(
        &self,
        routes: Vec<kabuto_protocol::agent::Route>,
    ) -> Result<kabuto_protocol::agent::Routes, AgentClientError> {
        let req = kabuto_protocol::agent::UpdateRoutesRequest {
            routes: protobuf::MessageField::some(kabuto_protocol::agent::Routes {
                Routes: routes,
                ..Default::default()
            }),
            ..Default::default()
        };
        rpc("UpdateRoutes", self.agent.update_routes(self.ctx(), &req))
    }

    pub fn add_arp_neighbors(
        &self,
        neighbours: Vec<kabuto_protocol::agent::ARPNeighbor>,
    ) -> Result<(), AgentClientError> {
        let req = kabuto_protocol::agent::AddARPNeighborsRequest {
            neighbors: protobuf::MessageField::some(kabuto_protocol::agent::ARPNeighbors {
                ARPNeighbors: neighbours,
                ..Default::default()
            }),
            ..Default::default()
        };
        rpc(
            "AddARPNeighbors",
            self.agent.add_arp_neighbors(self.ctx(), &req),
        )
        .map(|_| ())
    }

    pub fn list_interfaces(&self) -> Result<kabuto_protocol::agent::Interfaces, AgentClientError> {
        rpc(
            "ListInterfaces",
            self.agent.list_interfaces(self.ctx(), &Default::default()),
        )
    }

    pub fn list_routes(&self) -> Result<kabuto_protocol::agent::Routes, AgentClientError> {
        rpc(
            "ListRoutes",
            self.agent.list_routes(self.ctx(), &Default::default()),
        )
    }

    pub fn guest_details(&self) -> Result<GuestDetailsResponse, AgentClientError> {
        rpc(
            "GuestDetails",
            self.agent
                .guest_details(self.ctx(), &GuestDetailsRequest::default()),
        )
    }
}

fn rpc<T>(method: &'static str, result: ttrpc::Result<T>) -> Result<T, AgentClientError> {
    result.map_err(|e| match e {
        ttrpc::Error::RpcStatus(status) => AgentClientError::Rpc {
            method,
            code: status.code(),
            message: status.message().to_string(),
        },
        other => AgentClientError::Rpc {
            method,
            code: ttrpc::Code::UNAVAILABLE,
            message: other.to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use std::{os::unix::net::UnixListener, thread};

    use super::*;

    /// Plays the vhost-user vsock device's side of the handshake.
    fn fake_device(
        reply: &'static str,
    ) -> (tempfile::TempDir, PathBuf, thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.vsock");
        let listener = UnixListener::bind(&path).expect("bind");
        let handle = thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).expect("read");
            s.write_all(reply.as_bytes()).expect("write");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        (dir, path, handle)
    }

    #[test]
    fn hybrid_vsock_handshake() {
        let (_dir, path, handle) = fake_device("OK 1073741824\n");
        let fd = connect_hybrid(&path, 1024, Duration::from_secs(2)).expect("connect");
        drop(fd);
        assert_eq!(handle.join().expect("thread"), "CONNECT 1024\n");
    }

    #[test]
    fn hybrid_vsock_refused() {
        let (_dir, path, handle) = fake_device("");
        let err = connect_hybrid(&path, 1024, Duration::from_secs(2)).expect_err("refused");
        assert!(err.to_string().contains("closed before answering"), "{err}");
        let _ = handle.join();
    }
}
