//! The pod's sandbox in the guest: CreateSandbox (init-data checked and,
//! in a confidential guest, bound to the TEE; the KBS client, the policy,
//! the image settings), the data hub, DestroySandbox.

use super::*;

/// What a successful CreateSandbox applies.
pub(super) struct PreparedSandbox {
    pub(super) gate: Option<PolicyGate>,
    pub(super) init_data_digest: String,
    pub(super) kbs: Option<Arc<kabuto_attestation_agent::KbsClient>>,
    pub(super) images: images::PodImages,
}

#[derive(Default)]
pub(super) struct Sandbox {
    pub(super) id: String,
    pub(super) phase: Phase,
    /// Hex digest of the applied init-data.
    pub(super) init_data_digest: String,
    /// The KBS client of a confidential pod whose init-data names a KBS.
    pub(super) kbs: Option<Arc<kabuto_attestation_agent::KbsClient>>,
    pub(super) data_hub_started: bool,
    /// Where guest pulls come from and what they must satisfy.
    pub(super) images: Option<Arc<images::PodImages>>,
    /// The interfaces UpdateInterface configured (the pod's network).
    pub(super) interfaces: Vec<String>,
    /// Their network namespace, which the pod's containers join.
    pub(super) network: Option<Arc<crate::pod_network::PodNetns>>,
    /// A CreateContainer began: the pod's network no longer changes.
    pub(super) network_sealed: bool,
}

fn is_mount_point(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(path)))
        .unwrap_or(false)
}

impl Agent {
    /// The guest's one sandbox. Everything is checked and built first and
    /// applied together at the end; if anything fails the guest is left
    /// refusing every request (a confidential one under the deny-all policy),
    /// never with a partial sandbox or the boot policy still in force.
    pub(super) fn create_sandbox(&self, req: agent::CreateSandboxRequest) -> Result<agent::Empty> {
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
                log::error!("CreateSandbox failed: {}", kabuto_error::chain(&e));
                if self.is_confidential() {
                    let deny_all = PolicyGate::new(kabuto_policy::DENY_ALL)
                        .unwrap_or_else(|e| panic!("shipped deny-all policy: {e}"));
                    lock(&self.gate).replace(deny_all);
                }
                lock(&self.sandbox).phase = Phase::Failed(kabuto_error::chain(&e));
                Err(e)
            }
        }
    }

    /// Everything CreateSandbox applies, checked; the guest is unchanged but
    /// for the hostname, set last.
    pub(super) fn prepare_sandbox(
        &self,
        req: &agent::CreateSandboxRequest,
    ) -> Result<PreparedSandbox> {
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
        let tee = self.tee.clone().map_err(AgentError::Tee)?;
        // The binding first: init-data the host changed is refused as that,
        // before anything in it is read.
        let provider = tee
            .map(|kind| bind_to_tee(kind, init_data.as_ref()))
            .transpose()?;
        let setup = setup::PodSetup::from_init_data(init_data.as_ref(), tee)?;
        let kbs = match (provider, &setup.kbs) {
            (Some(provider), Some(settings)) => {
                let client = confidential::kbs_client(settings, provider, &req.init_data)?;
                log::info!("KBS {} configured from init-data", settings.url);
                Some(Arc::new(client))
            }
            _ => None,
        };
        match tee {
            Some(_) if init_data.as_ref().and_then(|d| d.policy()).is_none() => {
                log::info!("no policy in init-data: the confidential default applies");
            }
            Some(_) => {}
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
        let gate = setup
            .policy
            .map(|policy| {
                PolicyGate::new(&policy).map_err(|e| {
                    AgentError::InvalidArgument(format!("init-data policy.rego refused: {e}"))
                })
            })
            .transpose()?;
        let images = images::PodImages::new(init_data.as_ref(), kbs.clone())
            .map_err(|e| AgentError::InitDataSettings(Box::new(e)))?;
        let init_data_digest = setup.init_data_digest;
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
    pub(super) fn start_data_hub_once(&self, pid: i32) {
        let mut sandbox = lock(&self.sandbox);
        let Some(kbs) = sandbox.kbs.clone() else {
            return;
        };
        if sandbox.data_hub_started {
            return;
        }
        let egress = sandbox.network.clone();
        match crate::data_hub::start_data_hub(pid, kbs, self.data_hub_clients.clone(), egress) {
            Ok(()) => {
                sandbox.data_hub_started = true;
                log::info!(
                    "data hub serving http://127.0.0.1:{}/cdh/resource/ in the pod",
                    kabuto_protocol::DATA_HUB_PORT
                );
            }
            Err(e) => log::error!("data hub: {}", kabuto_error::chain(&e)),
        }
    }

    pub(super) fn destroy_sandbox(
        &self,
        _req: agent::DestroySandboxRequest,
    ) -> Result<agent::Empty> {
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
    pub(super) fn check_one_pod_sandbox(&self, container_id: &str) -> Result<()> {
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
}

/// A confidential pod's binding to its TEE: the init-data must be what the
/// TEE was launched with (the check the upstream agent leaves to remote
/// attestation; refused here, and with it every later request). Returns
/// the TEE's evidence provider, for the pod's KBS client.
fn bind_to_tee(
    kind: kabuto_attestation_agent::TeeKind,
    init_data: Option<&kabuto_initdata::InitData>,
) -> Result<Box<dyn kabuto_attestation_agent::EvidenceProvider>> {
    let provider = confidential::provider(kind)?;
    if kind == kabuto_attestation_agent::TeeKind::Sample {
        // No TEE, so no launch data to bind the init-data to.
        let aa_toml = init_data.and_then(|d| d.data.get("aa.toml"));
        confidential::sample_attester_allowed(aa_toml.map(String::as_str))?;
        log::warn!(
            "CoCo's sample attester, as the init-data allows: no TEE, the init-data is bound \
             to nothing, and a KBS releases secrets only if its owner accepts sample evidence \
             (interop tests only)"
        );
    } else {
        let launch = confidential::launch_data(provider.as_ref())?;
        let digest = init_data.map(|d| d.digest()).unwrap_or_default();
        confidential::check_binding(&digest, &launch)?;
        log::info!(
            "init-data bound to the TEE's launch data ({})",
            provider.describe()
        );
    }
    Ok(provider)
}
