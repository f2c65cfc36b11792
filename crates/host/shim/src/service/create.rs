//! Creating a task: a plan computed and checked first (spec, guest spec,
//! image, rootfs), then carried out — the sandbox chosen or booted, the
//! rootfs shared, the container created in the guest — under a guard that
//! undoes a partial create (the container's shares, and a VM this create
//! booted).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLockReadGuard};

use containerd_shim::api;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::TtrpcResult;
use kabuto_protocol::{GUEST_SHARED_DIR, IMAGE_ANNOTATION, STORAGE_IMAGE_GUEST_PULL};
use kabuto_runtime::config::{Config, ImagePull};
use kabuto_runtime::mount::MountSpec;
use kabuto_runtime::sandbox::Sandbox;
use kabuto_runtime::spec;

use super::options::{image_reference, is_pod_sandbox, pod_of};
use super::process::{lock, Container, Process};
use super::{agent_error, err, failed, Service, GUEST_PULL_ANSWER_GRACE};
use crate::io::{self, StdioPaths};

/// What a create will do, decided before anything changes.
struct CreatePlan<'a> {
    config: &'a Config,
    host_spec: oci_spec::runtime::Spec,
    guest: spec::GuestSpec,
    /// The guest spec, encoded for the agent.
    oci_spec: Vec<u8>,
    /// The image the guest pulls, when it pulls this container's.
    guest_image: Option<String>,
    /// The bundle's rootfs directory (the spec's root, or `rootfs`).
    spec_root: PathBuf,
    rootfs: Vec<MountSpec>,
}

/// Undoes a create that failed after its sandbox was chosen, unless
/// [`CreateGuard::disarm`]ed.
struct CreateGuard<'a> {
    service: &'a Service,
    id: &'a str,
    sandbox: Arc<Sandbox>,
    owns: bool,
    armed: bool,
}

impl CreateGuard<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for CreateGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        log::warn!(
            "container {} failed; guest console:\n{}",
            self.id,
            self.sandbox.console_tail()
        );
        self.sandbox.unshare_container(self.id);
        if self.owns {
            lock(&self.service.inner.state).sandbox = None;
            self.sandbox.destroy();
        }
    }
}

impl Service {
    pub(super) fn do_create(&self, req: &api::CreateTaskRequest) -> TtrpcResult<u32> {
        // Held for the whole create: a SIGTERM teardown waits for it.
        let _running = self.refuse_when_terminating(&req.id)?;
        let plan = self.plan_create(req)?;
        let (sandbox, owns, pod_id) =
            self.sandbox_for(&req.id, &plan.host_spec, req.options.as_ref())?;
        let guard = CreateGuard {
            service: self,
            id: &req.id,
            sandbox: sandbox.clone(),
            owns,
            armed: true,
        };
        share_rootfs(req, &plan, &sandbox)?;
        create_in_guest(req, &plan, &sandbox, owns, pod_id)?;
        guard.disarm();
        Ok(self.register_container(req, sandbox, owns))
    }

    fn refuse_when_terminating(&self, id: &str) -> TtrpcResult<RwLockReadGuard<'_, bool>> {
        let terminating = self
            .inner
            .terminating
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if *terminating {
            return Err(err(
                Code::UNAVAILABLE,
                format!("container {id}: the shim is shutting down (SIGTERM)"),
            ));
        }
        Ok(terminating)
    }

    /// Checks the request and converts its spec; changes nothing.
    fn plan_create(&self, req: &api::CreateTaskRequest) -> TtrpcResult<CreatePlan<'_>> {
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
        let host_spec =
            spec::load(&bundle, guest_pull).map_err(|e| failed(Code::INVALID_ARGUMENT, &e))?;
        let guest_image = guest_image(&req.id, &host_spec, guest_pull)?;
        let guest = spec::to_guest(&host_spec, &req.id, Path::new(GUEST_SHARED_DIR), guest_pull)
            .map_err(|e| failed(Code::INVALID_ARGUMENT, &e))?;
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
        let rootfs = req
            .rootfs
            .iter()
            .map(|m| MountSpec {
                fstype: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        Ok(CreatePlan {
            config,
            host_spec,
            guest,
            oci_spec,
            guest_image,
            spec_root,
            rootfs,
        })
    }

    /// Records the created container; its init's output starts flowing.
    fn register_container(
        &self,
        req: &api::CreateTaskRequest,
        sandbox: Arc<Sandbox>,
        owns: bool,
    ) -> u32 {
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
        pid
    }
}

/// The image the guest pulls for this container, if it pulls one. The
/// pause container is not pulled in the guest: it runs no code of the
/// workload's owner and carries no secrets.
fn guest_image(
    id: &str,
    host_spec: &oci_spec::runtime::Spec,
    guest_pull: bool,
) -> TtrpcResult<Option<String>> {
    if !guest_pull || is_pod_sandbox(host_spec) {
        return Ok(None);
    }
    image_reference(host_spec).map(Some).ok_or_else(|| {
        err(
            Code::INVALID_ARGUMENT,
            format!(
                "container {id}: the guest pulls images here (confidential.image_pull = \"guest\"), \
                 but the spec names no image: add the annotation {IMAGE_ANNOTATION}=<reference> \
                 (ctr run --annotation), or run it through CRI"
            ),
        )
    })
}

/// Shares the container's rootfs (unless the guest pulls it) and binds
/// into the VM.
fn share_rootfs(
    req: &api::CreateTaskRequest,
    plan: &CreatePlan<'_>,
    sandbox: &Sandbox,
) -> TtrpcResult<()> {
    let shared_rootfs = match &plan.guest_image {
        Some(image) => {
            log::info!("container {}: the guest pulls {image}", req.id);
            None
        }
        None => Some((plan.rootfs.as_slice(), plan.spec_root.as_path())),
    };
    sandbox
        .share_container(&req.id, shared_rootfs, &plan.guest.binds)
        .map_err(|e| {
            err(
                Code::INVALID_ARGUMENT,
                format!("container {} rootfs: {e}", req.id),
            )
        })
}

/// CreateContainer in the guest. A guest pull gets the configured
/// deadline, which the agent enforces itself; the host waits a little
/// longer to hear its answer.
fn create_in_guest(
    req: &api::CreateTaskRequest,
    plan: &CreatePlan<'_>,
    sandbox: &Sandbox,
    owns: bool,
    pod_id: String,
) -> TtrpcResult<()> {
    let own_vm = owns && pod_of(&plan.host_spec).is_none() && !is_pod_sandbox(&plan.host_spec);
    let mut create = kabuto_protocol::agent::CreateContainerRequest {
        container_id: req.id.clone(),
        oci_spec: plan.oci_spec.clone(),
        sandbox_id: if own_vm { String::new() } else { pod_id },
        storages: plan
            .guest_image
            .iter()
            .map(|image| kabuto_protocol::agent::Storage {
                driver: STORAGE_IMAGE_GUEST_PULL.into(),
                source: image.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let created = if plan.guest_image.is_some() {
        let timeout = plan.config.confidential.image_pull_timeout;
        create.timeout_secs = u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX);
        sandbox
            .agent()
            .create_container_within(&create, timeout + GUEST_PULL_ANSWER_GRACE)
    } else {
        sandbox.agent().create_container(&create)
    };
    created.map_err(agent_error)
}
