//! The agent API. Every request enters through [`Agent::dispatch`], the one
//! place where requests are logged and where the policy gate plugs in.

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

/// A container id claimed by the CreateContainer or RemoveContainer working
/// on it, with the pod sandbox a create joins; released when that request
/// is done, whatever its outcome.
/// The OCI JSON `document` with CAP_MKNOD taken out of every capability
/// set of its process (`at`: the member holding the process, or the
/// document itself). In a confidential guest no device cgroup is attached
/// yet (libcontainer's `cgroupsv2_devices` is off), so a container that can
/// mknod could open any device — the TEE's, the guest's disks: it may not.
fn without_mknod(document: &[u8], at: Option<&str>) -> Result<Vec<u8>> {
    let mut value: serde_json::Value = serde_json::from_slice(document)
        .map_err(|e| AgentError::InvalidArgument(format!("OCI JSON: {e}")))?;
    let process = match at {
        Some(member) => value.get_mut(member),
        None => Some(&mut value),
    };
    if let Some(sets) = process
        .and_then(|p| p.get_mut("capabilities"))
        .and_then(|c| c.as_object_mut())
    {
        for set in sets.values_mut() {
            if let Some(list) = set.as_array_mut() {
                list.retain(|cap| cap.as_str() != Some("CAP_MKNOD"));
            }
        }
    }
    serde_json::to_vec(&value).map_err(|e| AgentError::InvalidArgument(format!("OCI JSON: {e}")))
}

struct Reservation<'a> {
    set: &'a Mutex<HashMap<String, String>>,
    id: String,
}

impl<'a> Reservation<'a> {
    fn take(
        set: &'a Mutex<HashMap<String, String>>,
        id: &str,
        sandbox_id: &str,
    ) -> Result<Reservation<'a>> {
        let mut set_guard = lock(set);
        if set_guard.contains_key(id) {
            return Err(AgentError::ContainerExists(format!(
                "{id} (another CreateContainer or RemoveContainer of it is under way)"
            )));
        }
        set_guard.insert(id.to_string(), sandbox_id.to_string());
        Ok(Reservation {
            set,
            id: id.to_string(),
        })
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.id);
    }
}

/// How often the OOM watcher reads the containers' memory.events.
const OOM_POLL: Duration = Duration::from_millis(500);

/// Where the guest is in its one sandbox's life. A guest serves exactly one
/// CreateSandbox; until it succeeded only it is accepted, and after it
/// failed nothing is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Phase {
    #[default]
    Booted,
    Creating,
    Created,
    /// Why CreateSandbox failed (init-data refused, not bound to the TEE …).
    Failed(String),
}

impl Phase {
    /// Refuses `request` if the phase does not allow it.
    fn admits(&self, request: &str) -> Result<()> {
        let early = matches!(
            request,
            "CreateSandboxRequest"
                | "CheckRequest"
                | "GuestDetailsRequest"
                | "DestroySandboxRequest"
        );
        match self {
            Phase::Created if request == "CreateSandboxRequest" => Err(AgentError::Lifecycle(
                "CreateSandboxRequest refused: this guest already serves a sandbox".into(),
            )),
            Phase::Creating if request == "CreateSandboxRequest" => Err(AgentError::Lifecycle(
                "CreateSandboxRequest refused: another CreateSandbox is in progress".into(),
            )),
            Phase::Booted | Phase::Creating if !early => Err(AgentError::Lifecycle(format!(
                "{request} refused: CreateSandbox must come first"
            ))),
            Phase::Failed(reason)
                if !matches!(request, "CheckRequest" | "DestroySandboxRequest") =>
            {
                Err(AgentError::Lifecycle(format!(
                    "{request} refused: the sandbox could not be created ({reason}); \
                     this guest accepts no other request"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The policy in force, and how many times it was replaced: a state update
/// judged under one policy must not land in the state of the next.
struct GateSlot {
    gate: PolicyGate,
    generation: u64,
}

impl GateSlot {
    fn replace(&mut self, gate: PolicyGate) {
        self.gate = gate;
        self.generation += 1;
    }
}

/// What a successful CreateSandbox applies.
struct PreparedSandbox {
    gate: Option<PolicyGate>,
    init_data_digest: String,
    kbs: Option<Arc<kabuto_attestation_agent::KbsClient>>,
    images: images::PodImages,
}

#[derive(Default)]
struct Sandbox {
    id: String,
    phase: Phase,
    /// Hex digest of the applied init-data.
    init_data_digest: String,
    /// The KBS client of a confidential pod whose init-data names a KBS.
    kbs: Option<Arc<kabuto_attestation_agent::KbsClient>>,
    data_hub_started: bool,
    /// Where guest pulls come from and what they must satisfy.
    images: Option<Arc<images::PodImages>>,
}

pub struct Agent {
    runtime: Runtime,
    /// The TEE the kernel command line names (`kabuto.tee=`); an error for
    /// a value this agent does not know, which no CreateSandbox survives.
    tee: std::result::Result<Option<kabuto_attestation_agent::TeeKind>, String>,
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
            (Ok(None), Some(hardware)) => Err(format!(
                "this guest runs in a TEE ({hardware}) but its kernel command line names none \
                 (kabuto.tee=): refusing to serve a sandbox"
            )),
            (named, _) => named,
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
        }
    }

    /// True when the host is the attacker: a TEE named (even one this agent
    /// does not know) or present.
    fn is_confidential(&self) -> bool {
        !matches!(self.tee, Ok(None))
    }

    /// The single entry point of every request: names it after its message
    /// type, asks the policy gate, runs it if allowed, and logs the outcome
    /// (name, decision, duration; never the request's contents).
    fn dispatch<Req, Resp>(
        &self,
        req: Req,
        handler: impl FnOnce(&Self, Req) -> Result<Resp>,
    ) -> ttrpc::Result<Resp>
    where
        Req: MessageFull,
    {
        let name = Req::descriptor().name().to_string();
        let started = Instant::now();
        let judged = self.judge(&name, &req);
        let decided = started.elapsed();
        let (update, generation) = match judged {
            Ok((
                Judgement {
                    decision: Decision::Allowed,
                    update,
                },
                generation,
            )) => {
                log::debug!("{name}: allowed by policy in {decided:?}");
                (update, generation)
            }
            Ok((
                Judgement {
                    decision: Decision::Denied { reason },
                    ..
                },
                _,
            )) => {
                log::warn!("{name}: denied by policy in {decided:?}");
                let msg = match reason {
                    Some(r) => format!("{name} is blocked by policy: {r}"),
                    None => format!("{name} is blocked by policy"),
                };
                return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                    ttrpc::Code::PERMISSION_DENIED,
                    msg,
                )));
            }
            Err(e) => {
                log::warn!("{name}: denied, the policy could not decide: {e}");
                return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                    ttrpc::Code::PERMISSION_DENIED,
                    format!("{name} is blocked by policy: {e}"),
                )));
            }
        };
        // (The phase's lock is released before the handler runs.)
        let admitted = lock(&self.sandbox).phase.admits(&name);
        let result = admitted.and_then(|()| handler(self, req));
        let elapsed = started.elapsed();
        match &result {
            Ok(_) => {
                log::debug!("{name}: ok in {elapsed:?}");
                // Only a request that succeeded changes how later ones are
                // judged, and only under the policy that judged it.
                if let Some(update) = update {
                    let mut slot = lock(&self.gate);
                    if slot.generation != generation {
                        log::warn!("{name}: the policy was replaced meanwhile; its state update is dropped");
                    } else if let Err(e) = slot.gate.commit(update) {
                        log::error!("{name}: {e}");
                    }
                }
            }
            Err(e) => log::warn!("{name}: failed in {elapsed:?}: {e}"),
        }
        result.map_err(AgentError::into_ttrpc)
    }

    /// The policy's judgement of a request, and the generation of the policy
    /// that made it. The request is converted outside the lock.
    fn judge<Req: MessageFull>(&self, name: &str, req: &Req) -> Result<(Judgement, u64)> {
        {
            let slot = lock(&self.gate);
            if slot.gate.allows_without_input(name) {
                let allowed = Judgement {
                    decision: Decision::Allowed,
                    update: None,
                };
                return Ok((allowed, slot.generation));
            }
        }
        let input = policy_input(req)?;
        let mut slot = lock(&self.gate);
        let judgement = slot
            .gate
            .judge(name, &input)
            .map_err(|e| AgentError::InvalidArgument(e.to_string()))?;
        Ok((judgement, slot.generation))
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

    /// Queues an OOM event if the container's cgroup counted new OOM kills.
    fn check_oom(&self, id: &str, cgroup: &std::path::Path) {
        let kills = stats::oom_kills(cgroup);
        let before = lock(&self.oom_seen)
            .insert(id.to_string(), kills)
            .unwrap_or(0);
        if kills > before {
            log::info!("container {id}: OOM kill");
            lock(&self.oom_events).push_back(id.to_string());
            self.oom_ready.notify_all();
        }
    }

    /// Watches every container's cgroup for OOM kills (a process other than
    /// init may be the one killed, so exits alone do not tell).
    pub fn start_oom_watch(self: &Arc<Self>) {
        let agent = Arc::downgrade(self);
        let spawned = thread::Builder::new()
            .name("oom-watch".into())
            .spawn(move || loop {
                thread::sleep(OOM_POLL);
                let Some(agent) = agent.upgrade() else { return };
                let dirs: Vec<(String, std::path::PathBuf)> = agent
                    .containers
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .map(|c| (c.id.clone(), c.cgroup_dir()))
                    .collect();
                lock(&agent.oom_seen).retain(|id, _| dirs.iter().any(|(d, _)| d == id));
                for (id, dir) in dirs {
                    agent.check_oom(&id, &dir);
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the OOM watcher: {e}");
        }
    }

    /// The guest's one sandbox. Everything is checked and built first and
    /// applied together at the end; if anything fails the guest is left
    /// refusing every request (a confidential one under the deny-all policy),
    /// never with a partial sandbox or the boot policy still in force.
    fn create_sandbox(&self, req: agent::CreateSandboxRequest) -> Result<agent::Empty> {
        {
            let mut sandbox = lock(&self.sandbox);
            sandbox.phase.admits("CreateSandboxRequest")?;
            sandbox.phase = Phase::Creating;
        }
        match self.prepare_sandbox(&req) {
            Ok(prepared) => {
                if let Some(gate) = prepared.gate {
                    lock(&self.gate).replace(gate);
                    log::info!("pod policy applied");
                }
                let mut sandbox = lock(&self.sandbox);
                sandbox.id = req.sandbox_id;
                sandbox.init_data_digest = prepared.init_data_digest;
                sandbox.kbs = prepared.kbs;
                sandbox.images = Some(Arc::new(prepared.images));
                sandbox.phase = Phase::Created;
                Ok(agent::Empty::new())
            }
            Err(e) => {
                log::error!("CreateSandbox failed: {e}");
                if self.is_confidential() {
                    let deny_all = PolicyGate::new(kabuto_policy::DENY_ALL)
                        .unwrap_or_else(|e| panic!("shipped deny-all policy: {e}"));
                    lock(&self.gate).replace(deny_all);
                }
                lock(&self.sandbox).phase = Phase::Failed(e.to_string());
                Err(e)
            }
        }
    }

    /// Everything CreateSandbox applies, checked; the guest is unchanged but
    /// for the hostname, set last.
    fn prepare_sandbox(&self, req: &agent::CreateSandboxRequest) -> Result<PreparedSandbox> {
        containers::validate_id(&req.sandbox_id)?;
        for dir in [GUEST_SHARED_DIR, GUEST_ROOTFS_DIR] {
            if !is_mount_point(dir) {
                return Err(AgentError::InvalidArgument(format!(
                    "{dir} is not mounted: is its virtio-fs device missing from the VM?"
                )));
            }
        }
        let init_data = if req.init_data.is_empty() {
            None
        } else {
            Some(
                kabuto_initdata::InitData::parse(&req.init_data)
                    .map_err(|e| AgentError::InvalidArgument(format!("init-data refused: {e}")))?,
            )
        };
        let tee = self.tee.clone().map_err(AgentError::Confidential)?;
        let mut kbs = None;
        let mut policy = init_data
            .as_ref()
            .and_then(|d| d.policy())
            .map(str::to_owned);
        match tee {
            Some(kind) => {
                // The check the upstream agent leaves to remote attestation:
                // init-data whose digest is not the TEE's launch data is
                // refused here, and with it every later request.
                let provider = confidential::provider(kind).map_err(AgentError::Confidential)?;
                if kind == kabuto_attestation_agent::TeeKind::Sample {
                    // No TEE, so no launch data to bind the init-data to.
                    confidential::sample_attester_allowed(
                        init_data
                            .as_ref()
                            .and_then(|d| d.data.get("aa.toml"))
                            .map(String::as_str),
                    )
                    .map_err(AgentError::Confidential)?;
                    log::warn!(
                        "CoCo's sample attester, as the init-data allows: no TEE, the init-data \
                         is bound to nothing, and a KBS releases secrets only if its owner \
                         accepts sample evidence (interop tests only)"
                    );
                } else {
                    let launch = confidential::launch_data(provider.as_ref())
                        .map_err(AgentError::Confidential)?;
                    let digest = init_data.as_ref().map(|d| d.digest()).unwrap_or_default();
                    confidential::check_binding(&digest, &launch)
                        .map_err(AgentError::Confidential)?;
                    log::info!(
                        "init-data bound to the TEE's launch data ({})",
                        provider.describe()
                    );
                }
                if let Some(aa) = init_data.as_ref().and_then(|d| d.data.get("aa.toml")) {
                    if let Some(settings) =
                        confidential::kbs_settings(aa).map_err(AgentError::Confidential)?
                    {
                        let client = confidential::kbs_client(&settings, provider, &req.init_data)
                            .map_err(AgentError::Confidential)?;
                        log::info!("KBS {} configured from init-data", settings.url);
                        kbs = Some(Arc::new(client));
                    }
                }
                if policy.is_none() {
                    policy = Some(kabuto_policy::DEFAULT_CONFIDENTIAL.to_string());
                    log::info!("no policy in init-data: the confidential default applies");
                }
            }
            None if init_data.is_some() => {
                // Without a TEE there is no launch data to check the digest
                // against: the policy still applies, but proves nothing to a
                // remote party.
                log::warn!(
                    "init-data applied without a TEE: its digest is not bound to launch data"
                );
            }
            None => {}
        }
        let gate = policy
            .map(|policy| {
                PolicyGate::new(&policy).map_err(|e| {
                    AgentError::InvalidArgument(format!("init-data policy.rego refused: {e}"))
                })
            })
            .transpose()?;
        let images = images::PodImages::new(init_data.as_ref(), kbs.clone())
            .map_err(|e| AgentError::InvalidArgument(format!("init-data refused: {e}")))?;
        let init_data_digest = init_data
            .as_ref()
            .map(|d| hex::encode(d.digest()))
            .unwrap_or_default();
        if !req.hostname.is_empty() {
            nix::unistd::sethostname(&req.hostname).map_err(AgentError::sys("sethostname"))?;
        }
        Ok(PreparedSandbox {
            gate,
            init_data_digest,
            kbs,
            images,
        })
    }

    /// Serves KBS resources in the pod's network namespace, once the first
    /// container made it (confidential pods with a KBS in init-data).
    fn start_data_hub_once(&self, pid: i32) {
        let mut sandbox = lock(&self.sandbox);
        let Some(kbs) = sandbox.kbs.clone() else {
            return;
        };
        if sandbox.data_hub_started {
            return;
        }
        match confidential::start_data_hub(pid, kbs, self.data_hub_clients.clone()) {
            Ok(()) => {
                sandbox.data_hub_started = true;
                log::info!(
                    "data hub serving http://127.0.0.1:{}/cdh/resource/ in the pod",
                    kabuto_protocol::DATA_HUB_PORT
                );
            }
            Err(e) => log::error!("data hub: {e}"),
        }
    }

    fn destroy_sandbox(&self, _req: agent::DestroySandboxRequest) -> Result<agent::Empty> {
        lock(&self.data_hub_clients).clear();
        let all: Vec<Arc<Container>> = self
            .containers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, c)| c)
            .collect();
        for c in all {
            if let Err(e) = self.runtime.remove(&c) {
                log::warn!("removing container {}: {e}", c.id);
            }
            images::release(&c.id);
        }
        // Answer first; the main thread powers off once told.
        *lock(&self.shutdown) = true;
        self.shutdown_ready.notify_all();
        Ok(agent::Empty::new())
    }

    /// A confidential guest runs one pod: one container with namespaces of
    /// its own (its sandbox), never a second one created beside it or at
    /// the same time. The policy admits one pause, but judges concurrent
    /// creates against the same state; this check, made while holding the
    /// id's reservation, sees every create under way.
    fn check_one_pod_sandbox(&self, container_id: &str) -> Result<()> {
        let other_creating = lock(&self.creating)
            .iter()
            .any(|(id, sandbox)| id != container_id && (sandbox.is_empty() || sandbox == id));
        let existing = self
            .containers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|c| c.pod_namespaces.is_some())
            .map(|c| c.id.clone());
        if let Some(existing) = existing {
            return Err(AgentError::InvalidArgument(format!(
                "container {container_id}: this confidential guest's pod sandbox is {existing}; a second one is refused (join it with its sandbox_id)"
            )));
        }
        if other_creating {
            return Err(AgentError::InvalidArgument(format!(
                "container {container_id}: another pod sandbox is being created in this confidential guest; a second one is refused"
            )));
        }
        Ok(())
    }

    fn create_container(&self, req: agent::CreateContainerRequest) -> Result<agent::Empty> {
        containers::validate_id(&req.container_id)?;
        // Reserved until this create is done: a second create of the same
        // id (a guest pull takes minutes) is refused instead of racing it.
        let _reservation = Reservation::take(&self.creating, &req.container_id, &req.sandbox_id)?;
        if self.container(&req.container_id).is_ok() {
            return Err(AgentError::ContainerExists(req.container_id));
        }
        // Containers of a pod join the namespaces of its sandbox container
        // (which cannot be removed while this create is under way).
        let sandbox = if req.sandbox_id.is_empty() || req.sandbox_id == req.container_id {
            None
        } else {
            Some(self.container(&req.sandbox_id)?)
        };
        if sandbox.is_none() && self.is_confidential() {
            self.check_one_pod_sandbox(&req.container_id)?;
        }
        let pod_namespaces = match &sandbox {
            None => None,
            Some(s) => Some(s.pod_namespaces.as_ref().ok_or_else(|| {
                AgentError::InvalidArgument(format!(
                    "container {} is a member of pod {}, not a pod sandbox",
                    s.id, s.sandbox_id
                ))
            })?),
        };
        let confidential = self.is_confidential();
        let oci_spec = if confidential {
            without_mknod(&req.oci_spec, Some("process"))?
        } else {
            req.oci_spec.clone()
        };
        let mut spec = containers::parse_spec(&oci_spec)?;
        if confidential {
            // Hooks are programs the runtime would run, some as root in the
            // guest's namespaces; in a confidential pod they could only be
            // the host's (the shim drops the host's own hooks anyway).
            let hooks = spec.hooks().as_ref().map(serde_json::to_value);
            if let Some(Ok(serde_json::Value::Object(kinds))) = hooks {
                if let Some(kind) = kinds
                    .iter()
                    .find(|(_, list)| list.as_array().is_some_and(|l| !l.is_empty()))
                    .map(|(kind, _)| kind.clone())
                {
                    return Err(AgentError::InvalidArgument(format!(
                        "container {}: hooks ({kind}) are not run in a confidential pod",
                        req.container_id
                    )));
                }
            }
        }
        let guest_pause = confidential && pause::is_sandbox_container(&spec);
        if guest_pause {
            if !req.storages.is_empty() {
                return Err(AgentError::InvalidArgument(format!(
                    "container {}: the sandbox container of a confidential pod runs the guest's \
                     own pause process and takes no storages",
                    req.container_id
                )));
            }
            log::info!(
                "container {}: the pod's sandbox runs the guest's pause (the host's rootfs and process are ignored)",
                req.container_id
            );
            spec = pause::guest_pause_spec(spec)?;
        }
        let pulled = match images::guest_pull_source(&req.storages)? {
            None => false,
            Some(reference) => {
                let pod_images = lock(&self.sandbox).images.clone().ok_or_else(|| {
                    AgentError::InvalidArgument("CreateSandbox must come first".into())
                })?;
                // The host's wait, as the pull's deadline: a create the host
                // gave up on must not finish later and stay.
                let deadline = (req.timeout_secs > 0).then(|| {
                    std::time::Instant::now()
                        + std::time::Duration::from_secs(req.timeout_secs.into())
                });
                let (rootfs, config) =
                    images::pull(&req.container_id, reference, &pod_images, deadline)?;
                if let Err(e) = images::merge_config(&mut spec, &config, &rootfs) {
                    images::release(&req.container_id);
                    return Err(AgentError::InvalidArgument(format!(
                        "image {reference}: {e}"
                    )));
                }
                true
            }
        };
        let created = containers::prepare_spec(spec, &req.container_id, pod_namespaces)
            .and_then(|mut spec| {
                shared_binds::stage(&mut spec, &req.container_id)?;
                shared_binds::stage_root(&mut spec, &req.container_id)?;
                Ok(spec)
            })
            .and_then(|spec| {
                self.runtime
                    .create(&req.container_id, &req.sandbox_id, &spec)
            });
        let container = match created {
            Ok(c) => c,
            Err(e) => {
                shared_binds::release(&req.container_id);
                if pulled {
                    images::release(&req.container_id);
                }
                return Err(e);
            }
        };
        log::info!(
            "container {} created, init pid {}",
            container.id,
            container.init.pid
        );
        if !guest_pause {
            lock(&self.data_hub_clients).insert(container.id.clone());
        }
        // The data hub listens in the pod's network namespace: its sandbox
        // container's (the pause of a CRI pod), never a member's, whose
        // namespace a host could make its own.
        if sandbox.is_none() {
            self.start_data_hub_once(container.init.pid);
        }
        self.containers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req.container_id, Arc::new(container));
        Ok(agent::Empty::new())
    }

    fn start_container(
        &self,
        req: agent::StartContainerRequest,
    ) -> Result<agent::StartContainerResponse> {
        let c = self.container(&req.container_id)?;
        let pid = self.runtime.start(&c)?;
        Ok(agent::StartContainerResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    fn remove_container(&self, req: agent::RemoveContainerRequest) -> Result<agent::Empty> {
        // Not while it is being created (its staged binds are the new
        // one's), nor while a member that joins it is.
        let _reservation = Reservation::take(&self.creating, &req.container_id, "")?;
        if let Some(member) = lock(&self.creating)
            .iter()
            .find(|(id, sandbox)| **sandbox == req.container_id && **id != req.container_id)
            .map(|(id, _)| id.clone())
        {
            return Err(AgentError::InvalidArgument(format!(
                "container {} is the sandbox of {member}, which is being created",
                req.container_id
            )));
        }
        let c = self.container(&req.container_id)?;
        let others = self
            .containers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|o| o.id != c.id && o.sandbox_id == c.id);
        if others {
            return Err(AgentError::InvalidArgument(format!(
                "container {} is the sandbox of other containers; remove them first",
                c.id
            )));
        }
        self.containers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&req.container_id);
        lock(&self.data_hub_clients).remove(&req.container_id);
        let removed = self.runtime.remove(&c);
        shared_binds::release(&c.id);
        images::release(&c.id);
        removed?;
        Ok(agent::Empty::new())
    }

    fn exec_process(&self, req: agent::ExecProcessRequest) -> Result<agent::ExecProcessResponse> {
        let c = self.container(&req.container_id)?;
        let process = if self.is_confidential() {
            without_mknod(&req.process, None)?
        } else {
            req.process.clone()
        };
        let pid = self.runtime.exec(&c, &req.exec_id, &process)?;
        Ok(agent::ExecProcessResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    fn signal_process(&self, req: agent::SignalProcessRequest) -> Result<agent::Empty> {
        let c = self.container(&req.container_id)?;
        self.runtime.signal(&c, &req.exec_id, req.signal, req.all)?;
        Ok(agent::Empty::new())
    }

    fn wait_process(&self, req: agent::WaitProcessRequest) -> Result<agent::WaitProcessResponse> {
        let c = self.container(&req.container_id)?;
        let p = c.process(&req.exec_id)?;
        let exit = self.runtime.reaper().wait(p.pid);
        // An OOM kill that ended the process is reported before its exit
        // is, while the cgroup still exists.
        self.check_oom(&c.id, &c.cgroup_dir());
        p.waited.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(agent::WaitProcessResponse {
            status: exit.status,
            exited_at_nanos: exit.at_nanos,
            ..Default::default()
        })
    }

    fn read_stream(
        &self,
        req: agent::ReadStreamRequest,
        stream: Stream,
    ) -> Result<agent::ReadStreamResponse> {
        let c = self.container(&req.container_id)?;
        let p = c.process(&req.exec_id)?;
        Ok(agent::ReadStreamResponse {
            data: p.stdio.read(stream, req.len)?,
            ..Default::default()
        })
    }

    fn write_stdin(&self, req: agent::WriteStreamRequest) -> Result<agent::WriteStreamResponse> {
        let c = self.container(&req.container_id)?;
        let p = c.process(&req.exec_id)?;
        Ok(agent::WriteStreamResponse {
            len: p.stdio.write_stdin(&req.data)?,
            ..Default::default()
        })
    }

    fn close_stdin(&self, req: agent::CloseStdinRequest) -> Result<agent::Empty> {
        let c = self.container(&req.container_id)?;
        c.process(&req.exec_id)?.stdio.close_stdin();
        Ok(agent::Empty::new())
    }

    fn tty_win_resize(&self, req: agent::TtyWinResizeRequest) -> Result<agent::Empty> {
        let c = self.container(&req.container_id)?;
        c.process(&req.exec_id)?.stdio.resize(req.row, req.column)?;
        Ok(agent::Empty::new())
    }

    fn list_processes(
        &self,
        req: agent::ListProcessesRequest,
    ) -> Result<agent::ListProcessesResponse> {
        let c = self.container(&req.container_id)?;
        Ok(agent::ListProcessesResponse {
            pids: self.runtime.pids(&c)?,
            ..Default::default()
        })
    }

    fn stats_container(
        &self,
        req: agent::StatsContainerRequest,
    ) -> Result<agent::StatsContainerResponse> {
        let c = self.container(&req.container_id)?;
        stats::read(&c.cgroup_dir())
    }

    fn update_container(&self, req: agent::UpdateContainerRequest) -> Result<agent::Empty> {
        let c = self.container(&req.container_id)?;
        stats::update(&c.cgroup_dir(), &req.resources)?;
        Ok(agent::Empty::new())
    }

    fn get_oom_event(&self, _req: agent::GetOOMEventRequest) -> Result<agent::OOMEvent> {
        let mut events = lock(&self.oom_events);
        loop {
            if let Some(id) = events.pop_front() {
                return Ok(agent::OOMEvent {
                    container_id: id,
                    ..Default::default()
                });
            }
            events = self
                .oom_ready
                .wait(events)
                .unwrap_or_else(|p| p.into_inner());
        }
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

/// The request as the policy sees it ([`kabuto_policy::request_input`]).
pub fn policy_input(req: &dyn protobuf::MessageDyn) -> Result<serde_json::Value> {
    kabuto_policy::request_input(req).map_err(AgentError::InvalidArgument)
}

fn is_mount_point(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(path)))
        .unwrap_or(false)
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
