//! The policy gate at the one entry of every request: the guest's phase
//! (one CreateSandbox, nothing before it), the policy's judgement and the
//! state updates it commits only when the request succeeded.

use super::*;

/// Where the guest is in its one sandbox's life. A guest serves exactly one
/// CreateSandbox; until it succeeded only it is accepted, and after it
/// failed nothing is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) enum Phase {
    #[default]
    Booted,
    Creating,
    Created,
    /// Why CreateSandbox failed (init-data refused, not bound to the TEE …).
    Failed(String),
}

impl Phase {
    /// Refuses `request` if the phase does not allow it.
    pub(super) fn admits(&self, request: &str) -> Result<()> {
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
pub(super) struct GateSlot {
    pub(super) gate: PolicyGate,
    pub(super) generation: u64,
}

impl GateSlot {
    pub(super) fn replace(&mut self, gate: PolicyGate) {
        self.gate = gate;
        self.generation += 1;
    }
}

pub(super) fn policy_input(req: &dyn protobuf::MessageDyn) -> Result<serde_json::Value> {
    kabuto_policy::request_input(req)
        .map_err(|e| AgentError::InvalidArgument(kabuto_error::chain(&e)))
}

impl Agent {
    /// The single entry point of every request: names it after its message
    /// type, asks the policy gate, runs it if allowed, and logs the outcome
    /// (name, decision, duration; never the request's contents).
    pub(super) fn dispatch<Req, Resp>(
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
    pub(super) fn judge<Req: MessageFull>(
        &self,
        name: &str,
        req: &Req,
    ) -> Result<(Judgement, u64)> {
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
}
