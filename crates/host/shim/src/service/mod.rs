//! The shim v2 Task API over kabuto sandboxes.
//!
//! State is owned by [`Inner`]: the pod's sandbox (VM) and its containers,
//! each with its processes. Locks are never held while the agent works,
//! except the per-process state lock, which is short.

mod create;
mod lifecycle;
mod metrics;
mod options;
mod process;
mod task;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use containerd_shim::{
    protos::{
        protobuf::{well_known_types::any::Any, MessageField},
        ttrpc::{self, Code},
    },
    synchronous::publisher::RemotePublisher,
    Config as ShimConfig, DeleteResponse, ExitSignal, Flags, StartOpts, TtrpcResult,
};
use kabuto_runtime::{
    config::Config,
    hypervisor::NetworkNamespace,
    inventory,
    sandbox::{self, Sandbox},
    spec,
};

use crate::events::EventSender;
use options::pod_of;
use process::{lock, now, Container, State};

pub const RUNTIME_ID: &str = "io.containerd.kabuto.v2";
/// How long a process's output may stay open after it exited before its
/// exit is reported anyway.
const OUTPUT_DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// Exit status reported when the VM died under a process.
const VM_GONE_STATUS: u32 = 255;
/// How much longer than its own deadline the host waits for the agent to
/// report an abandoned guest pull.
const GUEST_PULL_ANSWER_GRACE: Duration = Duration::from_secs(15);

fn err(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// `e` with its causes (see kabuto-error), as a ttrpc status.
fn failed(code: Code, e: &dyn std::error::Error) -> ttrpc::Error {
    err(code, kabuto_error::chain(e))
}

struct Inner {
    namespace: String,
    /// containerd's API socket, recorded for `kabuto sandbox list`.
    containerd_address: String,
    exit: ExitSignal,
    events: Mutex<EventSender>,
    config: OnceLock<Config>,
    state: Mutex<State>,
    /// True once SIGTERM tore the shim down. Creates hold it read for their
    /// whole run, so the teardown waits for those under way (a VM booting
    /// then is torn down too, never left behind) and refuses later ones.
    terminating: std::sync::RwLock<bool>,
}

#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

fn agent_error(e: kabuto_runtime::agent_client::AgentClientError) -> ttrpc::Error {
    let code = match &e {
        kabuto_runtime::agent_client::AgentClientError::Rpc { code, .. } => *code,
        _ => Code::UNAVAILABLE,
    };
    failed(code, &e)
}

impl Service {
    fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        lock(&self.inner.state)
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {id} not found")))
    }

    fn publish(
        &self,
        topic: &'static str,
        message: Box<dyn containerd_shim::protos::protobuf::MessageDyn>,
    ) {
        lock(&self.inner.events).send(topic, message);
    }

    /// Finds or boots the VM the container runs in.
    fn sandbox_for(
        &self,
        id: &str,
        spec: &oci_spec::runtime::Spec,
        options: Option<&Any>,
    ) -> TtrpcResult<(Arc<Sandbox>, bool, String)> {
        let config = self.config(options)?;
        if let Some(pod) = pod_of(spec) {
            let state = lock(&self.inner.state);
            return match &state.sandbox {
                Some(sb) if sb.id == pod => Ok((sb.clone(), false, pod)),
                _ => Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("pod sandbox {pod} of container {id} is not running in this shim"),
                )),
            };
        }
        if lock(&self.inner.state).sandbox.is_some() {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("this shim already runs a VM; container {id} names no pod to join"),
            ));
        }
        let hostname = spec.hostname().clone().unwrap_or_default();
        // Refuse a broken init-data document before booting anything.
        let init_data = match spec
            .annotations()
            .as_ref()
            .and_then(|a| kabuto_initdata::from_annotations(a.iter()))
        {
            Some(value) => Some(
                kabuto_initdata::InitData::from_annotation(value)
                    .map_err(|e| err(Code::INVALID_ARGUMENT, format!("pod {id}: {e}")))?,
            ),
            None => None,
        };
        let sandbox = Sandbox::create(
            config,
            &self.inner.namespace,
            id,
            &hostname,
            init_data.as_ref().map(|d| d.raw()),
            &NetworkNamespace::of_spec(spec),
        )
        .map_err(|e| failed(Code::UNAVAILABLE, &e))?;
        let owner = inventory::Owner {
            pid: std::process::id(),
            start_time: inventory::process_start_time(std::process::id()).unwrap_or_default(),
            containerd_address: self.inner.containerd_address.clone(),
        };
        // Without the record `kabuto sandbox remove` cannot tell an orphan.
        if let Err(e) = owner.record(sandbox.dir()) {
            log::warn!("sandbox {id}: recording its owner: {e}");
        }
        let sandbox = Arc::new(sandbox);
        lock(&self.inner.state).sandbox = Some(sandbox.clone());
        self.watch_sandbox(&sandbox);
        Ok((sandbox, true, id.to_string()))
    }
}

impl containerd_shim::Shim for Service {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut ShimConfig) -> Self {
        Service {
            inner: Arc::new(Inner {
                namespace: args.namespace.clone(),
                containerd_address: args.address.clone(),
                exit: ExitSignal::default(),
                events: Mutex::new(EventSender::disconnected()),
                config: OnceLock::new(),
                state: Mutex::new(State::default()),
                terminating: std::sync::RwLock::new(false),
            }),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        // Containers of one pod share one shim (and VM): group by pod id.
        let grouping = std::env::current_dir()
            .ok()
            .and_then(|bundle| spec::load(&bundle, true).ok())
            .and_then(|s| pod_of(&s))
            .unwrap_or_else(|| opts.id.clone());
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        containerd_shim::synchronous::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<DeleteResponse, containerd_shim::Error> {
        // Called when a shim died: remove whatever it left behind.
        if let (Ok(config), Ok(bundle)) = (Config::load(), std::env::current_dir()) {
            let id = bundle
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            match spec::load(&bundle, true).ok().and_then(|s| pod_of(&s)) {
                Some(pod) => {
                    let dir = sandbox::sandbox_dir(&config, &self.inner.namespace, &pod)
                        .join("shared")
                        .join(&id);
                    let _ = kabuto_runtime::mount::unmount_all_under(&dir);
                    let _ = std::fs::remove_dir_all(&dir);
                }
                None if !id.is_empty() => {
                    sandbox::cleanup_stale_sandbox(&config, &self.inner.namespace, &id)
                }
                None => {}
            }
        }
        Ok(DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(now()),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.inner.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        *lock(&self.inner.events) = EventSender::start(publisher, self.inner.namespace.clone());
        self.handle_termination();
        self.clone()
    }
}
