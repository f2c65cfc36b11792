//! The shim v2 Task API over kabuto sandboxes.
//!
//! State is owned by [`Inner`]: the pod's sandbox (VM) and its containers,
//! each with its processes. Locks are never held while the agent works,
//! except the per-process state lock, which is short.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock},
    thread,
    time::Duration,
};

use containerd_shim::{
    api,
    protos::{
        cgroups_v2::metrics as cg2,
        events::task::{
            TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskStart,
        },
        protobuf::{
            well_known_types::any::Any, well_known_types::timestamp::Timestamp, MessageField,
        },
        topics,
        ttrpc::{self, Code},
        types::task::ProcessInfo,
    },
    synchronous::publisher::RemotePublisher,
    Config as ShimConfig, DeleteResponse, ExitSignal, Flags, StartOpts, TtrpcContext, TtrpcResult,
};
use kabuto_protocol::{
    agent::ExecProcessRequest, cri, GUEST_SHARED_DIR, IMAGE_ANNOTATION, STORAGE_IMAGE_GUEST_PULL,
};
use kabuto_runtime::{
    config::{Config, ImagePull},
    hypervisor::NetworkNamespace,
    inventory,
    mount::MountSpec,
    sandbox::{self, Sandbox},
    spec,
};

use crate::{
    events::EventSender,
    io::{self, OutputCopiers, StdioPaths},
};

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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Created,
    Running,
    Stopped,
}

struct ProcState {
    status: Status,
    pid: u32,
    exit_status: u32,
    exited_at: Option<Timestamp>,
}

struct Process {
    container_id: String,
    /// Empty for the container's init process.
    exec_id: String,
    stdio: StdioPaths,
    /// The OCI process (JSON) of an exec.
    exec_spec: Vec<u8>,
    state: Mutex<ProcState>,
    exited: Condvar,
    /// Set once a waiter for this process runs (started by Start, or by a
    /// kill before Start): one waiter per process.
    waited: std::sync::atomic::AtomicBool,
}

impl Process {
    fn new(container_id: &str, exec_id: &str, stdio: StdioPaths, pid: u32) -> Self {
        Process {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            stdio,
            exec_spec: Vec::new(),
            state: Mutex::new(ProcState {
                status: Status::Created,
                pid,
                exit_status: 0,
                exited_at: None,
            }),
            exited: Condvar::new(),
            waited: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn set_exited(&self, status: u32, at: Timestamp) {
        let mut s = lock(&self.state);
        if s.status == Status::Stopped {
            return;
        }
        s.status = Status::Stopped;
        s.exit_status = status;
        s.exited_at = Some(at);
        self.exited.notify_all();
    }

    fn wait(&self) -> (u32, Timestamp) {
        let mut s = lock(&self.state);
        while s.status != Status::Stopped {
            s = self.exited.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        (s.exit_status, s.exited_at.clone().unwrap_or_default())
    }
}

struct Container {
    id: String,
    bundle: String,
    /// The pod sandbox this container runs in.
    sandbox: Arc<Sandbox>,
    /// True for the container whose creation booted the VM.
    owns_sandbox: bool,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    /// Output copiers of the init process, joined when it exits.
    init_output: Mutex<Option<OutputCopiers>>,
}

impl Container {
    fn process(&self, exec_id: &str) -> TtrpcResult<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs).get(exec_id).cloned().ok_or_else(|| {
            err(
                Code::NOT_FOUND,
                format!("exec {exec_id} of {} not found", self.id),
            )
        })
    }
}

#[derive(Default)]
struct State {
    sandbox: Option<Arc<Sandbox>>,
    containers: HashMap<String, Arc<Container>>,
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

fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

fn timestamp_from_nanos(nanos: i64) -> Timestamp {
    if nanos <= 0 {
        return now();
    }
    Timestamp {
        seconds: nanos / 1_000_000_000,
        nanos: (nanos % 1_000_000_000) as i32,
        ..Default::default()
    }
}

/// The pod a bundle's container belongs to, from the CRI annotations:
/// `Some(pod id)` for a pod member, `None` for a pod's sandbox container or
/// a stand-alone container (each starts a VM of its own).
fn pod_of(spec: &oci_spec::runtime::Spec) -> Option<String> {
    let annotations = spec.annotations().as_ref()?;
    if annotations.get(cri::CONTAINER_TYPE).map(String::as_str) == Some("container") {
        annotations.get(cri::SANDBOX_ID).cloned()
    } else {
        None
    }
}

fn agent_error(e: kabuto_runtime::agent_client::AgentClientError) -> ttrpc::Error {
    let code = match &e {
        kabuto_runtime::agent_client::AgentClientError::Rpc { code, .. } => *code,
        _ => Code::UNAVAILABLE,
    };
    err(code, e.to_string())
}

impl Service {
    /// The config: the file named by the runtime options of the first task
    /// (`ctr run --runtime-config-path`, CRI `ConfigPath`), else the default
    /// lookup. Loaded once per shim.
    fn config(&self, options: Option<&Any>) -> TtrpcResult<&Config> {
        if let Some(c) = self.inner.config.get() {
            return Ok(c);
        }
        let explicit = options.and_then(runtime_options_config_path);
        let loaded = match &explicit {
            Some(path) => Config::from_file(Path::new(path)),
            None => Config::load(),
        }
        .map_err(|e| {
            let mut msg = e.to_string();
            if let Some(s) = std::error::Error::source(&e) {
                msg = format!("{msg}: {s}");
            }
            err(Code::INVALID_ARGUMENT, format!("kabuto config: {msg}"))
        })?;
        Ok(self.inner.config.get_or_init(|| loaded))
    }

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
        .map_err(|e| err(Code::UNAVAILABLE, e.to_string()))?;
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

    /// Forwards OOM events and notices a VM that dies under its processes.
    fn watch_sandbox(&self, sandbox: &Arc<Sandbox>) {
        let agent = sandbox.agent().clone();
        let service = self.clone();
        let _ = thread::Builder::new().name("oom".into()).spawn(move || {
            while let Ok(id) = agent.get_oom_event() {
                service.publish(
                    topics::TASK_OOM_EVENT_TOPIC,
                    Box::new(TaskOOM {
                        container_id: id,
                        ..Default::default()
                    }),
                );
            }
        });
        let service = self.clone();
        let weak = Arc::downgrade(sandbox);
        let _ = thread::Builder::new()
            .name("vm-watch".into())
            .spawn(move || loop {
                thread::sleep(Duration::from_millis(200));
                let Some(sb) = weak.upgrade() else { return };
                for ended in sb.reap_exited_helpers() {
                    log::warn!("sandbox {}: {ended}", sb.id);
                }
                if let Some(status) = sb.vm_exited() {
                    let owned = lock(&service.inner.state)
                        .sandbox
                        .as_ref()
                        .is_some_and(|s| Arc::ptr_eq(s, &sb));
                    if owned {
                        log::error!("sandbox {}: the VM exited unexpectedly ({status})", sb.id);
                        service.vm_gone(&sb);
                    }
                    sb.stop_helpers();
                    return;
                }
            });
    }

    /// Reports every process of a dead VM as exited.
    fn vm_gone(&self, sb: &Arc<Sandbox>) {
        let containers: Vec<Arc<Container>> = lock(&self.inner.state)
            .containers
            .values()
            .filter(|c| Arc::ptr_eq(&c.sandbox, sb))
            .cloned()
            .collect();
        self.report_gone(&containers);
    }

    /// Reports every process of `containers` that still ran as exited
    /// (their VM is gone).
    fn report_gone(&self, containers: &[Arc<Container>]) {
        for c in containers {
            let mut procs: Vec<Arc<Process>> = lock(&c.execs).values().cloned().collect();
            procs.push(c.init.clone());
            for p in procs {
                // report_exit skips processes already stopped.
                self.report_exit(&p, VM_GONE_STATUS, now());
            }
        }
    }

    fn report_exit(&self, p: &Process, status: u32, at: Timestamp) {
        let pid = {
            let s = lock(&p.state);
            if s.status == Status::Stopped {
                return;
            }
            s.pid
        };
        p.set_exited(status, at.clone());
        let id = if p.exec_id.is_empty() {
            p.container_id.clone()
        } else {
            p.exec_id.clone()
        };
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: p.container_id.clone(),
                id,
                pid,
                exit_status: status,
                exited_at: MessageField::some(at),
                ..Default::default()
            }),
        );
    }

    /// Waits in the guest for the process to exit, then reports it.
    fn spawn_waiter(&self, sandbox: Arc<Sandbox>, p: Arc<Process>, output: Option<OutputCopiers>) {
        if p.waited.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let service = self.clone();
        let agent = sandbox.agent().clone();
        let waited = p.clone();
        let spawned = thread::Builder::new()
            .name(format!("wait-{}", p.container_id))
            .spawn(move || {
                let result = agent.wait_process(&p.container_id, &p.exec_id);
                if let Some(o) = output {
                    o.join(OUTPUT_DRAIN_LIMIT);
                }
                match result {
                    Ok(r) => service.report_exit(
                        &p,
                        r.status as u32,
                        timestamp_from_nanos(r.exited_at_nanos),
                    ),
                    Err(e) => {
                        // A lost agent connection usually means the VM died;
                        // give the VMM a moment to be seen as exited.
                        let mut vm_status = sandbox.vm_exited();
                        for _ in 0..20 {
                            if vm_status.is_some() {
                                break;
                            }
                            thread::sleep(Duration::from_millis(50));
                            vm_status = sandbox.vm_exited();
                        }
                        match vm_status {
                            Some(status) => log::error!(
                                "sandbox {}: the VM exited unexpectedly ({status}) under {}/{}",
                                sandbox.id,
                                p.container_id,
                                p.exec_id
                            ),
                            None => {
                                log::error!("waiting for {}/{}: {e}", p.container_id, p.exec_id)
                            }
                        }
                        service.report_exit(&p, VM_GONE_STATUS, now());
                    }
                }
            });
        if let Err(e) = spawned {
            // Without a waiter the exit would never be reported: let a
            // later Start or kill try again.
            log::error!(
                "waiting for {}/{}: {e}",
                waited.container_id,
                waited.exec_id
            );
            waited
                .waited
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn remove_container(&self, c: &Container) {
        if c.sandbox.vm_exited().is_none() {
            if let Err(e) = c.sandbox.agent().remove_container(&c.id) {
                if !e.is_not_found() {
                    log::warn!("removing container {} in the guest: {e}", c.id);
                }
            }
        }
        c.sandbox.unshare_container(&c.id);
    }

    /// SIGTERM or SIGINT ends the shim with its sandbox: containerd-shim's
    /// own handler only logs them, which left shims (and their VMs) behind
    /// that only SIGKILL ended. Only the serving shim installs this.
    fn handle_termination(&self) {
        let mut signals = match signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT]) {
            Ok(s) => s,
            Err(e) => {
                log::error!("shim: cannot handle SIGTERM: {e}");
                return;
            }
        };
        let service = self.clone();
        let _ = thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    service.terminate(signal);
                }
            });
    }

    /// Tears everything down — the VM, its helpers, mounts and state — and
    /// ends the shim, reporting every process that still ran as exited.
    fn terminate(&self, signal: i32) {
        log::warn!("shim: signal {signal}: tearing down the sandbox and exiting");
        // Waits for the creates under way: what they boot is torn down below.
        *self
            .inner
            .terminating
            .write()
            .unwrap_or_else(|p| p.into_inner()) = true;
        let (containers, sandbox) = {
            let mut state = lock(&self.inner.state);
            let containers: Vec<Arc<Container>> =
                state.containers.drain().map(|(_, c)| c).collect();
            (containers, state.sandbox.take())
        };
        self.report_gone(&containers);
        if let Some(sb) = sandbox {
            // Also unmounts every container's rootfs and binds (all of
            // them live under the sandbox directory).
            sb.destroy();
        }
        self.inner.exit.signal();
    }

    fn destroy_sandbox_if_idle(&self) {
        let sandbox = {
            let mut state = lock(&self.inner.state);
            if !state.containers.is_empty() {
                return;
            }
            state.sandbox.take()
        };
        if let Some(sb) = sandbox {
            log::info!("sandbox {}: no containers left, destroying the VM", sb.id);
            sb.destroy();
        }
    }

    fn do_create(&self, req: &api::CreateTaskRequest) -> TtrpcResult<u32> {
        let terminating = self
            .inner
            .terminating
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if *terminating {
            return Err(err(
                Code::UNAVAILABLE,
                format!("container {}: the shim is shutting down (SIGTERM)", req.id),
            ));
        }
        if !req.checkpoint.is_empty() {
            return Err(err(
                Code::UNIMPLEMENTED,
                "kabuto cannot restore checkpoints",
            ));
        }
        if lock(&self.inner.state).containers.contains_key(&req.id) {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("container {} exists", req.id),
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let config = self.config(req.options.as_ref())?;
        let guest_pull = config.confidential.image_pull == ImagePull::Guest;
        let host_spec = spec::load(&bundle, guest_pull)
            .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        // The pause container is not pulled in the guest: it runs no code of
        // the workload's owner and carries no secrets.
        let guest_image = if guest_pull && !is_pod_sandbox(&host_spec) {
            Some(image_reference(&host_spec).ok_or_else(|| {
                err(
                    Code::INVALID_ARGUMENT,
                    format!(
                        "container {}: the guest pulls images here (confidential.image_pull = \"guest\"), \
                         but the spec names no image: add the annotation {IMAGE_ANNOTATION}=<reference> \
                         (ctr run --annotation), or run it through CRI",
                        req.id
                    ),
                )
            })?)
        } else {
            None
        };
        let guest = spec::to_guest(&host_spec, &req.id, Path::new(GUEST_SHARED_DIR), guest_pull)
            .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        for d in &guest.dropped {
            log::info!("container {}: not applied in the guest: {d}", req.id);
        }
        let oci_spec = serde_json::to_vec(&guest.spec).map_err(|e| {
            err(
                Code::INVALID_ARGUMENT,
                format!("encoding the guest spec: {e}"),
            )
        })?;

        // Without mounts (ctr run --rootfs), the spec's root is the rootfs.
        let spec_root = host_spec
            .root()
            .as_ref()
            .map(|r| bundle.join(r.path()))
            .unwrap_or_else(|| bundle.join("rootfs"));
        if guest_image.is_none() && req.rootfs.is_empty() && !spec_root.is_dir() {
            return Err(err(
                Code::INVALID_ARGUMENT,
                format!(
                    "container {} rootfs {} is not a directory",
                    req.id,
                    spec_root.display()
                ),
            ));
        }
        let (sandbox, owns, pod_id) =
            self.sandbox_for(&req.id, &host_spec, req.options.as_ref())?;
        let rollback = |sandbox: &Arc<Sandbox>| {
            log::warn!(
                "container {} failed; guest console:\n{}",
                req.id,
                sandbox.console_tail()
            );
            sandbox.unshare_container(&req.id);
            if owns {
                lock(&self.inner.state).sandbox = None;
                sandbox.destroy();
            }
        };
        let rootfs: Vec<MountSpec> = req
            .rootfs
            .iter()
            .map(|m| MountSpec {
                fstype: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let shared_rootfs = match &guest_image {
            Some(image) => {
                log::info!("container {}: the guest pulls {image}", req.id);
                None
            }
            None => Some((rootfs.as_slice(), spec_root.as_path())),
        };
        if let Err(e) = sandbox.share_container(&req.id, shared_rootfs, &guest.binds) {
            rollback(&sandbox);
            return Err(err(
                Code::INVALID_ARGUMENT,
                format!("container {} rootfs: {e}", req.id),
            ));
        }
        let create = kabuto_protocol::agent::CreateContainerRequest {
            container_id: req.id.clone(),
            oci_spec,
            sandbox_id: if owns && pod_of(&host_spec).is_none() && !is_pod_sandbox(&host_spec) {
                String::new()
            } else {
                pod_id
            },
            storages: guest_image
                .iter()
                .map(|image| kabuto_protocol::agent::Storage {
                    driver: STORAGE_IMAGE_GUEST_PULL.into(),
                    source: image.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let created = if guest_image.is_some() {
            // The agent abandons the pull at the timeout itself and cleans
            // up; the host waits a little longer to hear that answer.
            let mut create = create;
            create.timeout_secs =
                u32::try_from(config.confidential.image_pull_timeout_secs).unwrap_or(u32::MAX);
            sandbox.agent().create_container_within(
                &create,
                Duration::from_secs(config.confidential.image_pull_timeout_secs)
                    + GUEST_PULL_ANSWER_GRACE,
            )
        } else {
            sandbox.agent().create_container(&create)
        };
        if let Err(e) = created {
            rollback(&sandbox);
            return Err(agent_error(e));
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let pid = sandbox.vm_pid();
        let output = io::start(sandbox.agent(), &req.id, "", &stdio);
        let container = Arc::new(Container {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            sandbox,
            owns_sandbox: owns,
            init: Arc::new(Process::new(&req.id, "", stdio, pid)),
            execs: Mutex::new(HashMap::new()),
            init_output: Mutex::new(Some(output)),
        });
        lock(&self.inner.state)
            .containers
            .insert(req.id.clone(), container);
        Ok(pid)
    }
}

/// `config_path` (field 2) of containerd's `runtimeoptions.v1.Options`, the
/// message ctr and CRI send for non-runc runtimes. Its proto is not among
/// the generated containerd types, so the one string field is read here.
fn runtime_options_config_path(any: &Any) -> Option<String> {
    use containerd_shim::protos::protobuf::CodedInputStream;
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    let mut input = CodedInputStream::from_bytes(&any.value);
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire_type) = (tag >> 3, tag & 7);
        match (field, wire_type) {
            (2, 2) => return input.read_string().ok().filter(|p| !p.is_empty()),
            (_, 2) => {
                let len = input.read_raw_varint32().ok()?;
                input.skip_raw_bytes(len).ok()?;
            }
            (_, 0) => {
                input.read_raw_varint64().ok()?;
            }
            _ => return None,
        }
    }
    None
}

/// The image a guest-pull container runs: our annotation, else CRI's.
fn image_reference(spec: &oci_spec::runtime::Spec) -> Option<String> {
    let annotations = spec.annotations().as_ref()?;
    [IMAGE_ANNOTATION, cri::IMAGE_NAME]
        .iter()
        .find_map(|k| annotations.get(*k).filter(|v| !v.is_empty()).cloned())
}

fn is_pod_sandbox(spec: &oci_spec::runtime::Spec) -> bool {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(cri::CONTAINER_TYPE))
        .is_some_and(|t| t == "sandbox")
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

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = self
            .do_create(&req)
            .inspect_err(|e| log::error!("create {}: {e}", req.id))?;
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(containerd_shim::protos::events::task::TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if lock(&p.state).status != Status::Created {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("{}/{} was already started", req.id, req.exec_id),
            ));
        }
        let agent = c.sandbox.agent().clone();
        let pid = lock(&p.state).pid;
        // A process that cannot start is finished: release its waiters
        // (ctr waits before it starts), or they would hold the shim forever.
        let failed = |e: kabuto_runtime::agent_client::AgentClientError| {
            p.set_exited(VM_GONE_STATUS, now());
            agent_error(e)
        };
        if req.exec_id.is_empty() {
            agent.start_container(&req.id).map_err(failed)?;
            lock(&p.state).status = Status::Running;
            let output = lock(&c.init_output).take();
            self.spawn_waiter(c.sandbox.clone(), p.clone(), output);
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        } else {
            agent
                .exec_process(&ExecProcessRequest {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    process: p.exec_spec.clone(),
                    ..Default::default()
                })
                .map_err(failed)?;
            lock(&p.state).status = Status::Running;
            let output = io::start(&agent, &req.id, &req.exec_id, &p.stdio);
            self.spawn_waiter(c.sandbox.clone(), p.clone(), Some(output));
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let (status, pid, exit_status, exited_at) = {
            let s = lock(&p.state);
            (
                s.status,
                s.pid,
                s.exit_status,
                s.exited_at.clone().unwrap_or_else(now),
            )
        };
        if status == Status::Running {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!(
                    "{}/{} is running; kill it before deleting",
                    req.id, req.exec_id
                ),
            ));
        }
        if !req.exec_id.is_empty() {
            lock(&c.execs).remove(&req.exec_id);
        } else {
            let others_in_pod = lock(&self.inner.state)
                .containers
                .values()
                .any(|o| o.id != c.id && Arc::ptr_eq(&o.sandbox, &c.sandbox))
                && c.owns_sandbox;
            if others_in_pod {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("container {} is its pod's sandbox; delete the pod's other containers first", c.id),
                ));
            }
            self.remove_container(&c);
            // Execs that never ran or outlived nothing: no Wait may hang.
            for e in lock(&c.execs).values() {
                e.set_exited(VM_GONE_STATUS, now());
            }
            lock(&self.inner.state).containers.remove(&req.id);
            self.publish(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(TaskDelete {
                    container_id: req.id.clone(),
                    pid,
                    exit_status,
                    exited_at: MessageField::some(exited_at.clone()),
                    id: req.id.clone(),
                    ..Default::default()
                }),
            );
            if c.owns_sandbox {
                self.destroy_sandbox_if_idle();
            }
        }
        Ok(api::DeleteResponse {
            pid,
            exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let c = self.container(&req.id)?;
        let pids = c
            .sandbox
            .agent()
            .list_processes(&req.id)
            .map_err(agent_error)?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if lock(&p.state).status == Status::Stopped {
            return Err(err(
                Code::NOT_FOUND,
                format!("{}/{}: process already finished", req.id, req.exec_id),
            ));
        }
        let created = lock(&p.state).status == Status::Created;
        if created && !req.exec_id.is_empty() {
            // An exec that was never started has no process in the guest:
            // a signal ends it before it runs (signal 0 only probes).
            if req.signal != 0 {
                self.report_exit(&p, 128 + req.signal, now());
            }
            return Ok(api::Empty::new());
        }
        c.sandbox
            .agent()
            .signal_process(&req.id, &req.exec_id, req.signal, req.all)
            .map_err(agent_error)?;
        if created {
            // The init of a created container exists in the guest and may
            // die of the signal before Start: its exit must be reported, or
            // the task stays "created" and containerd never deletes it (as
            // after `ctr run -d` failed in CNI setup and `ctr task kill`).
            let output = lock(&c.init_output).take();
            self.spawn_waiter(c.sandbox.clone(), p.clone(), output);
        }
        Ok(api::Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        if lock(&c.init.state).status != Status::Running {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("container {} is not running", req.id),
            ));
        }
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| err(Code::INVALID_ARGUMENT, "exec without a process spec"))?;
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec)
            .map_err(|e| err(Code::INVALID_ARGUMENT, format!("exec process spec: {e}")))?;
        let mut execs = lock(&c.execs);
        if execs.contains_key(&req.exec_id) {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("exec {} exists", req.exec_id),
            ));
        }
        let mut p = Process::new(
            &req.id,
            &req.exec_id,
            StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
            c.sandbox.vm_pid(),
        );
        p.exec_spec = spec;
        execs.insert(req.exec_id.clone(), Arc::new(p));
        drop(execs);
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::new())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        c.process(&req.exec_id)?;
        c.sandbox
            .agent()
            .tty_win_resize(&req.id, &req.exec_id, req.height, req.width)
            .map_err(agent_error)?;
        Ok(api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        // The stdin copier closes the guest's stdin when the client closes
        // its end of the FIFO, which is what CloseIO announces.
        let c = self.container(&req.id)?;
        c.process(&req.exec_id)?;
        Ok(api::Empty::new())
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let s = lock(&p.state);
        let status = match s.status {
            Status::Created => containerd_shim::protos::types::task::Status::CREATED,
            Status::Running => containerd_shim::protos::types::task::Status::RUNNING,
            Status::Stopped => containerd_shim::protos::types::task::Status::STOPPED,
        };
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid: s.pid,
            status: status.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: s.exit_status,
            exited_at: MessageField::from_option(s.exited_at.clone()),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let (exit_status, exited_at) = p.wait();
        Ok(api::WaitResponse {
            exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let c = self.container(&req.id)?;
        let s = c
            .sandbox
            .agent()
            .stats_container(&req.id)
            .map_err(agent_error)?;
        let metrics = cg2::Metrics {
            pids: MessageField::some(cg2::PidsStat {
                current: s.pids_current,
                limit: s.pids_limit,
                ..Default::default()
            }),
            cpu: MessageField::some(cg2::CPUStat {
                usage_usec: s.cpu_usage_usec,
                user_usec: s.cpu_user_usec,
                system_usec: s.cpu_system_usec,
                nr_periods: s.cpu_nr_periods,
                nr_throttled: s.cpu_nr_throttled,
                throttled_usec: s.cpu_throttled_usec,
                ..Default::default()
            }),
            memory: MessageField::some(cg2::MemoryStat {
                usage: s.memory_usage,
                usage_limit: s.memory_limit,
                anon: s.memory_anon,
                file: s.memory_file,
                ..Default::default()
            }),
            memory_events: MessageField::some(cg2::MemoryEvents {
                oom_kill: s.memory_oom_kill,
                ..Default::default()
            }),
            ..Default::default()
        };
        let any = containerd_shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| err(Code::INTERNAL, e.to_string()))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let resources: &Any = req
            .resources
            .as_ref()
            .ok_or_else(|| err(Code::INVALID_ARGUMENT, "update without resources"))?;
        c.sandbox
            .agent()
            .update_container(&req.id, resources.value.clone())
            .map_err(agent_error)?;
        Ok(api::Empty::new())
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self
            .container(&req.id)
            .map(|c| c.sandbox.vm_pid())
            .unwrap_or_default();
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if !lock(&self.inner.state).containers.is_empty() {
            return Ok(api::Empty::new());
        }
        self.destroy_sandbox_if_idle();
        self.inner.exit.signal();
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(type_url: &str, fields: &[(u32, &str)]) -> Any {
        let mut value = Vec::new();
        for (field, text) in fields {
            value.push(((field << 3) | 2) as u8);
            value.push(text.len() as u8);
            value.extend_from_slice(text.as_bytes());
        }
        Any {
            type_url: type_url.into(),
            value,
            ..Default::default()
        }
    }

    #[test]
    fn reads_config_path_from_runtime_options() {
        let any = options(
            "runtimeoptions.v1.Options",
            &[
                (1, "io.containerd.kabuto.v2"),
                (2, "/etc/kabuto/other.toml"),
            ],
        );
        assert_eq!(
            runtime_options_config_path(&any).as_deref(),
            Some("/etc/kabuto/other.toml")
        );
        let runc = options("containerd.runc.v1.Options", &[(2, "/x")]);
        assert_eq!(runtime_options_config_path(&runc), None);
        let empty = options("runtimeoptions.v1.Options", &[(2, "")]);
        assert_eq!(runtime_options_config_path(&empty), None);
    }

    #[test]
    fn pod_membership_from_cri_annotations() {
        let spec = |pairs: &[(&str, &str)]| {
            let mut s = oci_spec::runtime::Spec::default();
            s.set_annotations(Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ));
            s
        };
        let member = spec(&[
            (cri::CONTAINER_TYPE, "container"),
            (cri::SANDBOX_ID, "pod1"),
        ]);
        assert_eq!(pod_of(&member).as_deref(), Some("pod1"));
        let sandbox = spec(&[(cri::CONTAINER_TYPE, "sandbox"), (cri::SANDBOX_ID, "pod1")]);
        assert_eq!(pod_of(&sandbox), None);
        assert!(is_pod_sandbox(&sandbox));
        assert_eq!(pod_of(&spec(&[])), None);
    }
}
