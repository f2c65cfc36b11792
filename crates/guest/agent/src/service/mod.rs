//! The agent API. Every request enters through [`Agent::dispatch`], the one
//! place where requests are logged and where the policy gate plugs in.

mod gate;
mod network;
mod oom;
mod pod;
mod requests;
pub mod setup;

#[cfg(test)]
use gate::policy_input;
use gate::{GateSlot, Phase};
use pod::Sandbox;
#[cfg(test)]
use requests::without_mknod;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Condvar, Mutex, RwLock},
    thread,
    time::{Duration, Instant},
};

use kabuto_policy::{Decision, Judgement, PolicyGate};
use kabuto_protocol::{
    agent::{self, health_check_response::ServingStatus},
    agent_ttrpc::{AgentService, Health},
    GUEST_ROOTFS_DIR, GUEST_SHARED_DIR,
};
use protobuf::MessageFull;
use ttrpc::TtrpcContext;

use crate::{
    confidential,
    containers::{self, Container, Runtime},
    error::{AgentError, Result},
    images, pause,
    process::Stream,
    reaper::Reaper,
    shared_binds, stats,
};

pub struct Agent {
    runtime: Runtime,
    /// The TEE the kernel command line names (`kabuto.tee=`); an error for
    /// a value this agent does not know, which no CreateSandbox survives.
    tee: std::result::Result<
        Option<kabuto_attestation_agent::TeeKind>,
        Arc<confidential::ConfidentialError>,
    >,
    gate: Mutex<GateSlot>,
    containers: RwLock<HashMap<String, Arc<Container>>>,
    /// The containers whose processes the data hub answers: the pod's own,
    /// not the guest's pause.
    data_hub_clients: Arc<Mutex<HashSet<String>>>,
    /// Container ids a CreateContainer or RemoveContainer is working on,
    /// with the pod sandbox each create joins.
    creating: Mutex<HashMap<String, String>>,
    sandbox: Mutex<Sandbox>,
    loaded_modules: Vec<String>,
    oom_events: Mutex<VecDeque<String>>,
    oom_ready: Condvar,
    /// OOM kills already reported, per container.
    oom_seen: Mutex<HashMap<String, u64>>,
    shutdown: Mutex<bool>,
    shutdown_ready: Condvar,
    /// The kernel command line asks for QEMU's user network
    /// (`kabuto.net=user`), set up once, for a pod without its own.
    user_network: bool,
    user_network_up: Mutex<bool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Agent {
    /// `cmdline` is the kernel command line: a guest that it names a TEE
    /// (any `kabuto.tee=` value, even one this agent does not know) starts
    /// closed, accepting only CreateSandbox, whose init-data brings the
    /// pod's policy.
    pub fn new(reaper: Reaper, loaded_modules: Vec<String>, cmdline: &str) -> Self {
        let tee = match (
            confidential::tee_from_cmdline(cmdline),
            confidential::tee_hardware(),
        ) {
            // The host left kabuto.tee out of a TEE guest's command line:
            // believed, it would open the guest to the host.
            (Ok(None), Some(hardware)) => Err(Arc::new(
                confidential::ConfidentialError::UnnamedTee(hardware),
            )),
            (named, _) => named.map_err(Arc::new),
        };
        // Confidential exactly when `tee` is not Ok(None) (is_confidential).
        let gate = if confidential::is_confidential(cmdline) {
            PolicyGate::new(kabuto_policy::CONFIDENTIAL_BOOT)
        } else {
            // Pods that are not confidential: the host is trusted.
            PolicyGate::new(kabuto_policy::ALLOW_ALL)
        }
        .unwrap_or_else(|e| panic!("shipped policy: {e}"));
        Agent {
            runtime: Runtime::new(reaper),
            tee,
            gate: Mutex::new(GateSlot {
                gate,
                generation: 0,
            }),
            containers: RwLock::new(HashMap::new()),
            data_hub_clients: Arc::new(Mutex::new(HashSet::new())),
            creating: Mutex::new(HashMap::new()),
            sandbox: Mutex::new(Sandbox::default()),
            loaded_modules,
            oom_events: Mutex::new(VecDeque::new()),
            oom_ready: Condvar::new(),
            oom_seen: Mutex::new(HashMap::new()),
            shutdown: Mutex::new(false),
            shutdown_ready: Condvar::new(),
            user_network: crate::net::requested(cmdline),
            user_network_up: Mutex::new(false),
        }
    }

    /// True when the host is the attacker: a TEE named (even one this agent
    /// does not know) or present.
    fn is_confidential(&self) -> bool {
        !matches!(self.tee, Ok(None))
    }

    pub fn wait_for_shutdown(&self) {
        let mut done = lock(&self.shutdown);
        while !*done {
            done = self
                .shutdown_ready
                .wait(done)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.containers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::ContainerNotFound(id.to_string()))
    }

    fn set_policy(&self, req: agent::SetPolicyRequest) -> Result<agent::Empty> {
        let gate = PolicyGate::new(&req.policy)
            .map_err(|e| AgentError::InvalidArgument(format!("new policy refused: {e}")))?;
        lock(&self.gate).replace(gate);
        log::info!("policy replaced");
        Ok(agent::Empty::new())
    }

    fn guest_details(
        &self,
        _req: agent::GuestDetailsRequest,
    ) -> Result<agent::GuestDetailsResponse> {
        let uname = nix::sys::utsname::uname().map_err(AgentError::sys("uname"))?;
        Ok(agent::GuestDetailsResponse {
            kernel_release: uname.release().to_string_lossy().into_owned(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            loaded_modules: self.loaded_modules.clone(),
            init_data_digest: lock(&self.sandbox).init_data_digest.clone(),
            ..Default::default()
        })
    }
}

macro_rules! rpc {
    ($method:ident, $req:ty, $resp:ty) => {
        fn $method(&self, _ctx: &TtrpcContext, req: $req) -> ttrpc::Result<$resp> {
            self.dispatch(req, Agent::$method)
        }
    };
}

impl AgentService for Agent {
    rpc!(create_sandbox, agent::CreateSandboxRequest, agent::Empty);
    rpc!(destroy_sandbox, agent::DestroySandboxRequest, agent::Empty);
    rpc!(
        create_container,
        agent::CreateContainerRequest,
        agent::Empty
    );
    rpc!(
        start_container,
        agent::StartContainerRequest,
        agent::StartContainerResponse
    );
    rpc!(
        remove_container,
        agent::RemoveContainerRequest,
        agent::Empty
    );
    rpc!(
        exec_process,
        agent::ExecProcessRequest,
        agent::ExecProcessResponse
    );
    rpc!(signal_process, agent::SignalProcessRequest, agent::Empty);
    rpc!(
        wait_process,
        agent::WaitProcessRequest,
        agent::WaitProcessResponse
    );
    rpc!(
        write_stdin,
        agent::WriteStreamRequest,
        agent::WriteStreamResponse
    );
    rpc!(close_stdin, agent::CloseStdinRequest, agent::Empty);
    rpc!(tty_win_resize, agent::TtyWinResizeRequest, agent::Empty);
    rpc!(
        list_processes,
        agent::ListProcessesRequest,
        agent::ListProcessesResponse
    );
    rpc!(
        stats_container,
        agent::StatsContainerRequest,
        agent::StatsContainerResponse
    );
    rpc!(
        update_container,
        agent::UpdateContainerRequest,
        agent::Empty
    );
    rpc!(get_oom_event, agent::GetOOMEventRequest, agent::OOMEvent);
    rpc!(
        guest_details,
        agent::GuestDetailsRequest,
        agent::GuestDetailsResponse
    );
    rpc!(set_policy, agent::SetPolicyRequest, agent::Empty);
    rpc!(
        update_interface,
        agent::UpdateInterfaceRequest,
        agent::Interface
    );
    rpc!(update_routes, agent::UpdateRoutesRequest, agent::Routes);
    rpc!(
        list_interfaces,
        agent::ListInterfacesRequest,
        agent::Interfaces
    );
    rpc!(list_routes, agent::ListRoutesRequest, agent::Routes);
    rpc!(
        add_arp_neighbors,
        agent::AddARPNeighborsRequest,
        agent::Empty
    );

    fn read_stdout(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ReadStreamRequest,
    ) -> ttrpc::Result<agent::ReadStreamResponse> {
        self.dispatch(req, |a, r| a.read_stream(r, Stream::Stdout))
    }

    fn read_stderr(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ReadStreamRequest,
    ) -> ttrpc::Result<agent::ReadStreamResponse> {
        self.dispatch(req, |a, r| a.read_stream(r, Stream::Stderr))
    }
}

impl Health for Agent {
    fn check(
        &self,
        _ctx: &TtrpcContext,
        req: agent::CheckRequest,
    ) -> ttrpc::Result<agent::HealthCheckResponse> {
        self.dispatch(req, |_, _| {
            Ok(agent::HealthCheckResponse {
                status: ServingStatus::SERVING.into(),
                ..Default::default()
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_container_input_carries_the_spec_as_oci() {
        let req = agent::CreateContainerRequest {
            container_id: "c1".into(),
            oci_spec: br#"{"ociVersion":"1.1.0","process":{"args":["sh"]}}"#.to_vec(),
            ..Default::default()
        };
        let input = policy_input(&req).expect("input");
        assert_eq!(input["container_id"], "c1");
        assert_eq!(input["OCI"]["process"]["args"][0], "sh");
        assert!(input.get("oci_spec").is_none());
        assert_eq!(input["sandbox_id"], "", "defaults are present");
    }

    #[test]
    fn confidential_processes_lose_cap_mknod() {
        let spec = br#"{"ociVersion":"1.1.0","process":{"args":["sh"],"capabilities":{"bounding":["CAP_CHOWN","CAP_MKNOD"],"effective":["CAP_MKNOD"],"permitted":["CAP_MKNOD","CAP_KILL"]}}}"#;
        let out: serde_json::Value =
            serde_json::from_slice(&without_mknod(spec, Some("process")).expect("spec"))
                .expect("json");
        assert_eq!(
            out["process"]["capabilities"]["bounding"],
            serde_json::json!(["CAP_CHOWN"])
        );
        assert_eq!(
            out["process"]["capabilities"]["effective"],
            serde_json::json!([])
        );
        assert_eq!(
            out["process"]["capabilities"]["permitted"],
            serde_json::json!(["CAP_KILL"])
        );
        assert_eq!(out["process"]["args"][0], "sh");
        let exec = br#"{"args":["id"],"capabilities":{"ambient":["CAP_MKNOD"]}}"#;
        let out: serde_json::Value =
            serde_json::from_slice(&without_mknod(exec, None).expect("exec")).expect("json");
        assert_eq!(out["capabilities"]["ambient"], serde_json::json!([]));
        assert!(without_mknod(b"not json", None).is_err());
    }

    #[test]
    fn non_json_spec_is_refused() {
        let req = agent::ExecProcessRequest {
            process: b"not json".to_vec(),
            ..Default::default()
        };
        assert!(policy_input(&req).is_err());
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(
            kabuto_policy::base64_decode("aGVsbG8=").as_deref(),
            Some(&b"hello"[..])
        );
        assert_eq!(kabuto_policy::base64_decode("").as_deref(), Some(&b""[..]));
        assert_eq!(kabuto_policy::base64_decode("!!").as_deref(), None);
    }
}
