//! Container and process requests: create (the guest pull, the
//! confidential checks, libcontainer), start, remove, exec, signals, waits,
//! stdio, resize, stats and updates.

use super::*;

/// The OCI JSON `document` with CAP_MKNOD taken out of every capability
/// set of its process (`at`: the member holding the process, or the
/// document itself). In a confidential guest no device cgroup is attached
/// yet (libcontainer's `cgroupsv2_devices` is off), so a container that can
/// mknod could open any device — the TEE's, the guest's disks: it may not.
pub(super) fn without_mknod(document: &[u8], at: Option<&str>) -> Result<Vec<u8>> {
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

/// A container id claimed by the CreateContainer or RemoveContainer working
/// on it, with the pod sandbox a create joins; released when that request
/// is done, whatever its outcome.
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

/// The request's spec, parsed; in a confidential pod without device nodes
/// the process could make, and refused if it has hooks.
fn checked_spec(
    req: &agent::CreateContainerRequest,
    confidential: bool,
) -> Result<oci_spec::runtime::Spec> {
    let oci_spec = if confidential {
        without_mknod(&req.oci_spec, Some("process"))?
    } else {
        req.oci_spec.clone()
    };
    let spec = containers::parse_spec(&oci_spec)?;
    if confidential {
        // Hooks are programs the runtime would run, some as root in the
        // guest's namespaces; in a confidential pod they could only be the
        // host's (the shim drops the host's own hooks anyway).
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
    Ok(spec)
}

impl Agent {
    pub(super) fn create_container(
        &self,
        req: agent::CreateContainerRequest,
    ) -> Result<agent::Empty> {
        containers::validate_id(&req.container_id)?;
        // Reserved until this create is done: a second create of the same
        // id (a guest pull takes minutes) is refused instead of racing it.
        let _reservation = Reservation::take(&self.creating, &req.container_id, &req.sandbox_id)?;
        lock(&self.sandbox).network_sealed = true;
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
        let mut spec = checked_spec(&req, confidential)?;
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
        self.ensure_guest_network();
        // The registry and the KBS are reached the way the guest's traffic
        // leaves: the pod's network when it has one.
        let egress = self.pod_netns();
        self.unseal_env(&mut spec, &req.container_id, egress.as_deref())?;
        let pulled = crate::pod_network::in_egress(egress.as_deref(), || {
            self.pull_rootfs(&req, &mut spec)
        })??;
        let created = self
            .applied_spec(spec, &req.container_id, pod_namespaces)
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

    /// Sealed env values — the policy judged them sealed — become their
    /// plaintext (fetched from where the guest's traffic leaves), or the
    /// container is refused naming the variable.
    fn unseal_env(
        &self,
        spec: &mut oci_spec::runtime::Spec,
        container_id: &str,
        egress: Option<&crate::pod_network::PodNetns>,
    ) -> Result<()> {
        let kbs = lock(&self.sandbox).kbs.clone();
        crate::pod_network::in_egress(egress, || {
            crate::sealed::unseal_env(spec, container_id, kbs.as_deref())
        })??;
        Ok(())
    }

    /// The spec the guest applies: namespaces resolved (the pod's network
    /// namespace once the host gave it interfaces), shared files staged.
    fn applied_spec(
        &self,
        spec: oci_spec::runtime::Spec,
        container_id: &str,
        pod_namespaces: Option<&containers::PodNamespaces>,
    ) -> Result<oci_spec::runtime::Spec> {
        let pod_netns = self.pod_netns().map(|n| n.path());
        let mut spec =
            containers::prepare_spec(spec, container_id, pod_namespaces, pod_netns.as_deref())?;
        shared_binds::stage(&mut spec, container_id)?;
        // Sealed files in the volumes just staged: the container sees
        // their plaintext (fetched from where the guest's traffic leaves).
        let kbs = lock(&self.sandbox).kbs.clone();
        let egress = self.pod_netns();
        crate::pod_network::in_egress(egress.as_deref(), || {
            crate::sealed_files::unseal_files(&mut spec, container_id, kbs.as_deref())
        })??;
        shared_binds::stage_root(&mut spec, container_id)?;
        Ok(spec)
    }

    /// Pulls the image of the request's guest-pull storage, if it has one,
    /// and applies its config to `spec`; true when it pulled.
    fn pull_rootfs(
        &self,
        req: &agent::CreateContainerRequest,
        spec: &mut oci_spec::runtime::Spec,
    ) -> Result<bool> {
        let Some(reference) = images::guest_pull_source(&req.storages)? else {
            return Ok(false);
        };
        let pod_images = lock(&self.sandbox)
            .images
            .clone()
            .ok_or_else(|| AgentError::InvalidArgument("CreateSandbox must come first".into()))?;
        // The host's wait, as the pull's deadline: a create the host gave
        // up on must not finish later and stay.
        let deadline = (req.timeout_secs > 0).then(|| {
            std::time::Instant::now() + std::time::Duration::from_secs(req.timeout_secs.into())
        });
        let (rootfs, config) = images::pull(&req.container_id, reference, &pod_images, deadline)?;
        if let Err(source) = images::merge_config(spec, &config, &rootfs) {
            images::release(&req.container_id);
            return Err(AgentError::ImageConfig {
                image: reference.to_string(),
                source,
            });
        }
        Ok(true)
    }

    pub(super) fn start_container(
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

    pub(super) fn remove_container(
        &self,
        req: agent::RemoveContainerRequest,
    ) -> Result<agent::Empty> {
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

    pub(super) fn exec_process(
        &self,
        req: agent::ExecProcessRequest,
    ) -> Result<agent::ExecProcessResponse> {
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

    pub(super) fn signal_process(&self, req: agent::SignalProcessRequest) -> Result<agent::Empty> {
        let c = self.container(&req.container_id)?;
        self.runtime.signal(&c, &req.exec_id, req.signal, req.all)?;
        Ok(agent::Empty::new())
    }

    pub(super) fn wait_process(
        &self,
        req: agent::WaitProcessRequest,
    ) -> Result<agent::WaitProcessResponse> {
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

    pub(super) fn read_stream(
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

    pub(super) fn write_stdin(
        &self,
        req: agent::WriteStreamRequest,
    ) -> Result<agent::WriteStreamResponse> {
        let c = self.container(&req.container_id)?;
        let p = c.process(&req.exec_id)?;
        Ok(agent::WriteStreamResponse {
            len: p.stdio.write_stdin(&req.data)?,
            ..Default::default()
        })
    }

    pub(super) fn close_stdin(&self, req: agent::CloseStdinRequest) -> Result<agent::Empty> {
        let c = self.container(&req.container_id)?;
        c.process(&req.exec_id)?.stdio.close_stdin();
        Ok(agent::Empty::new())
    }

    pub(super) fn tty_win_resize(&self, req: agent::TtyWinResizeRequest) -> Result<agent::Empty> {
        let c = self.container(&req.container_id)?;
        c.process(&req.exec_id)?.stdio.resize(req.row, req.column)?;
        Ok(agent::Empty::new())
    }

    pub(super) fn list_processes(
        &self,
        req: agent::ListProcessesRequest,
    ) -> Result<agent::ListProcessesResponse> {
        let c = self.container(&req.container_id)?;
        Ok(agent::ListProcessesResponse {
            pids: self.runtime.pids(&c)?,
            ..Default::default()
        })
    }

    pub(super) fn stats_container(
        &self,
        req: agent::StatsContainerRequest,
    ) -> Result<agent::StatsContainerResponse> {
        let c = self.container(&req.container_id)?;
        stats::read(&c.cgroup_dir())
    }

    pub(super) fn update_container(
        &self,
        req: agent::UpdateContainerRequest,
    ) -> Result<agent::Empty> {
        let c = self.container(&req.container_id)?;
        stats::update(&c.cgroup_dir(), &req.resources)?;
        Ok(agent::Empty::new())
    }
}
