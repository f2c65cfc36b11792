//! One pod VM and everything the host runs for it: the virtio-fs daemon,
//! the vsock device, QEMU, and the agent connection.
//!
//! Creation is all-or-nothing: if any stage fails, what the earlier stages
//! started is stopped and removed before the error is returned, and the
//! error names the stage.

mod boot;
mod cleanup;
mod error;
mod helpers;
mod measure;
mod naming;

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use kabuto_protocol::{agent::CreateSandboxRequest, GUEST_SHARED_DIR};

use crate::{
    agent_client::AgentClient,
    config::{Config, GuestNetwork, TeeKind},
    hypervisor::{self, Accel, NetworkNamespace, Vm, VmSpec},
    mount::{self, MountSpec},
    network::PodNetwork,
    spec::SharedBind,
    swtee_service::FirmwareService,
};

use boot::{launch, prepare_state_dir, start_shared_fs, start_vsock, tee_launch, wait_for_agent};
use cleanup::remove_dir;
pub(crate) use cleanup::remove_stale_sandbox;
pub use cleanup::{cleanup_stale, cleanup_stale_sandbox};
use helpers::{stop_helpers, tail, write_pids, Helper};
pub use measure::{
    guest_kernel_params, snp_cpu_type, snp_launch_measurement, snp_measurement,
    software_tee_measurement, SnpLaunchInputs,
};
pub(crate) use naming::{claim_is_held, sandboxes_dir, SANDBOX_NAME_FILE};
pub use naming::{guest_address, guest_cid, sandbox_dir, sandbox_namespaces};
use naming::{valid_identifier, Claim};

pub use error::{BootError, MeasureError, SandboxError};

/// How long a VM gets to power off after DestroySandbox before QEMU is told
/// to quit (and then killed).
const VM_STOP_GRACE: Duration = Duration::from_secs(3);

pub struct Sandbox {
    pub id: String,
    /// The containerd namespace the sandbox belongs to.
    pub namespace: String,
    dir: PathBuf,
    claim: Mutex<Option<Claim>>,
    vm: Mutex<Box<dyn Vm>>,
    helpers: Mutex<Vec<Helper>>,
    firmware: Mutex<Option<FirmwareService>>,
    /// The pod namespace's interfaces joined to the VM's NICs.
    network: Mutex<Option<PodNetwork>>,
    /// The namespace the VMM runs in.
    network_namespace: NetworkNamespace,
    agent: AgentClient,
    pub accel: Accel,
    /// Whether the guest pulls container images itself.
    pub image_pull: crate::config::ImagePull,
}

/// vsock port of the guest's debug console (see `kabuto exec`).
pub const DEBUG_CONSOLE_PORT: u32 = 1026;

/// What `create` has started so far; dropped (and so undone) on failure.
struct Partial {
    armed: bool,
    dir: PathBuf,
    vm: Option<Box<dyn Vm>>,
    helpers: Vec<Helper>,
    firmware: Option<FirmwareService>,
    network: Option<PodNetwork>,
    claim: Option<Claim>,
}

impl Partial {
    /// Checks the names, takes the claim and clears a crashed owner's
    /// state: the start of every boot. Errors carry their stage.
    fn begin(
        config: &Config,
        namespace: &str,
        id: &str,
    ) -> Result<Partial, (&'static str, BootError)> {
        for (what, name) in [("namespace", namespace), ("id", id)] {
            if !valid_identifier(name) {
                return Err((
                    "checking the sandbox id",
                    BootError::Identifier {
                        what,
                        name: name.to_string(),
                    },
                ));
            }
        }
        // Claimed first: nothing of a running sandbox of this name is touched.
        let claim =
            Claim::take(config, namespace, id).map_err(|e| ("claiming the sandbox id", e))?;
        let dir = sandbox_dir(config, namespace, id);
        if dir.exists() {
            log::warn!("removing stale state of sandbox {id} at {}", dir.display());
            cleanup_stale(&dir);
        }
        Ok(Partial {
            armed: true,
            dir,
            vm: None,
            helpers: Vec::new(),
            firmware: None,
            network: None,
            claim: Some(claim),
        })
    }

    /// The booted sandbox: what was started now belongs to it.
    fn finish(
        mut self,
        id: &str,
        namespace: &str,
        agent: AgentClient,
        accel: Accel,
        config: &Config,
        network_namespace: &NetworkNamespace,
    ) -> Result<Sandbox, BootError> {
        let vm = self.vm.take().ok_or(BootError::VmHandleVanished)?;
        self.armed = false;
        Ok(Sandbox {
            id: id.to_string(),
            namespace: namespace.to_string(),
            dir: std::mem::take(&mut self.dir),
            claim: Mutex::new(self.claim.take()),
            vm: Mutex::new(vm),
            helpers: Mutex::new(std::mem::take(&mut self.helpers)),
            firmware: Mutex::new(self.firmware.take()),
            network: Mutex::new(self.network.take()),
            network_namespace: network_namespace.clone(),
            agent,
            accel,
            image_pull: config.confidential.image_pull,
        })
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(mut vm) = self.vm.take() {
            let _ = vm.stop(Duration::ZERO);
        }
        self.network.take();
        self.firmware.take();
        stop_helpers(&mut self.helpers);
        remove_dir(&self.dir);
        if let Some(claim) = self.claim.take() {
            claim.release();
        }
    }
}

impl Sandbox {
    /// Boots the pod VM, waits until its agent serves requests and creates
    /// the sandbox in the guest (CreateSandbox). `init_data` is the pod's
    /// raw init-data document: its digest goes into the TEE's launch data
    /// and the document to the agent.
    pub fn create(
        config: &Config,
        namespace: &str,
        id: &str,
        hostname: &str,
        init_data: Option<&[u8]>,
        network: &NetworkNamespace,
    ) -> Result<Sandbox, SandboxError> {
        let sandbox = Sandbox::boot(config, namespace, id, init_data, network)?;
        let request = CreateSandboxRequest {
            sandbox_id: id.to_string(),
            hostname: hostname.to_string(),
            shared_dir: GUEST_SHARED_DIR.to_string(),
            init_data: init_data.map(<[u8]>::to_vec).unwrap_or_default(),
            ..Default::default()
        };
        if let Err(e) = sandbox.agent.create_sandbox(&request) {
            sandbox.destroy();
            return Err(SandboxError {
                id: id.to_string(),
                stage: "creating the sandbox in the guest",
                reason: Box::new(e.into()),
            });
        }
        if let Err(e) = sandbox.configure_network() {
            log::warn!(
                "sandbox {id}: the guest refused its network; console:\n{}",
                sandbox.console_tail()
            );
            sandbox.destroy();
            return Err(SandboxError {
                id: id.to_string(),
                stage: "configuring the pod network in the guest",
                reason: Box::new(e.into()),
            });
        }
        Ok(sandbox)
    }

    /// Tells the agent the pod's interfaces, routes and static neighbours
    /// (nothing for a pod without a network namespace of CNI's).
    fn configure_network(&self) -> Result<(), crate::agent_client::AgentClientError> {
        let network = self.network.lock().unwrap_or_else(|p| p.into_inner());
        let Some(network) = network.as_ref().filter(|n| !n.interfaces().is_empty()) else {
            return Ok(());
        };
        for interface in network.interfaces() {
            self.agent.update_interface(&interface)?;
        }
        self.agent.update_routes(network.routes())?;
        let neighbours = network.neighbours();
        if !neighbours.is_empty() {
            self.agent.add_arp_neighbors(neighbours)?;
        }
        log::info!("sandbox {}: pod network configured in the guest", self.id);
        Ok(())
    }

    /// Gives the guest the interface CNI added to the VMM's namespace
    /// between create and start (`ctr run --cni` configures the namespace
    /// of the task's pid then): joined to the NIC the VM reserved at boot,
    /// which the guest gives the interface's MAC, name, addresses and
    /// routes. Any other interface that appeared after boot is refused
    /// ([`Sandbox::check_late_interfaces`]); on error nothing changed.
    pub fn join_late_network(&self) -> Result<(), crate::network::NetworkError> {
        let mut network = self.network.lock().unwrap_or_else(|p| p.into_inner());
        let Some(pod) = network.as_mut().filter(|n| n.has_reserved_nic()) else {
            drop(network);
            return self.check_late_interfaces();
        };
        let Some(interface) = pod.join_late_interface()? else {
            return Ok(());
        };
        let told = (|| {
            self.agent.update_interface(&interface)?;
            self.agent.update_routes(pod.routes())?;
            let neighbours = pod.neighbours();
            if !neighbours.is_empty() {
                self.agent.add_arp_neighbors(neighbours)?;
            }
            Ok(())
        })();
        if let Err(source) = told {
            pod.unjoin_late_interface(&interface.name);
            return Err(crate::network::NetworkError::Guest {
                interface: interface.name,
                source,
            });
        }
        log::info!(
            "sandbox {}: interface {} added after create is the guest's",
            self.id,
            interface.name
        );
        Ok(())
    }

    /// Refuses interfaces that CNI added to the pod's namespace after the
    /// VM started (CNI chaining, multus-style second networks, `ctr run
    /// --cni` of a pod without a reserved NIC): the guest's NICs are fixed
    /// at boot — the microvm machine has no hot-plug — so such a container
    /// would silently run without them.
    fn check_late_interfaces(&self) -> Result<(), crate::network::NetworkError> {
        let path = match &self.network_namespace {
            NetworkNamespace::Host => return Ok(()),
            NetworkNamespace::New => PathBuf::from(format!("/proc/{}/ns/net", self.vm_pid())),
            NetworkNamespace::Path(path) => path.clone(),
        };
        let joined = self
            .network
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(PodNetwork::joined)
            .unwrap_or_default();
        let late = PodNetwork::unjoined_interfaces(&path, &joined)?;
        if late.is_empty() {
            Ok(())
        } else {
            Err(crate::network::NetworkError::LateInterfaces(late))
        }
    }

    /// Boots the pod VM (with `init_data`'s digest in the TEE's launch data)
    /// and waits until its agent serves requests; sends nothing to it. For
    /// callers that speak the agent protocol themselves — [`Sandbox::create`],
    /// and tests that play a hostile host.
    pub fn boot(
        config: &Config,
        namespace: &str,
        id: &str,
        init_data: Option<&[u8]>,
        network: &NetworkNamespace,
    ) -> Result<Sandbox, SandboxError> {
        let fail = |stage: &'static str| {
            let id = id.to_string();
            move |reason: BootError| SandboxError {
                id,
                stage,
                reason: Box::new(reason),
            }
        };
        let mut partial =
            Partial::begin(config, namespace, id).map_err(|(stage, reason)| SandboxError {
                id: id.to_string(),
                stage,
                reason: Box::new(reason),
            })?;
        let dir = partial.dir.clone();
        // The init-data's digest is fixed into the TEE's launch data.
        let host_data = match init_data {
            Some(raw) => kabuto_initdata::InitData::parse(raw)
                .map_err(|e| fail("checking the init-data")(BootError::InitData(e)))?
                .digest(),
            None => Vec::new(),
        };
        prepare_state_dir(&dir, namespace, id).map_err(fail("preparing the state directory"))?;
        let (fs_socket, rootfs_socket) = start_shared_fs(config, &dir, &mut partial.helpers)
            .map_err(fail("starting virtiofsd"))?;
        let (vsock, address) = start_vsock(config, namespace, id, &dir, &mut partial.helpers)
            .map_err(fail("starting the vhost-user vsock device"))?;
        write_pids(&dir, &partial.helpers);
        // The daemons start side by side; QEMU needs all their sockets.
        for helper in &mut partial.helpers {
            helper
                .wait_ready()
                .map_err(fail("starting the helper daemons"))?;
        }

        let (accel, why) = hypervisor::choose_accelerator(config.hypervisor.accelerator);
        log::info!("sandbox {id}: accelerator {why}");
        if config.hypervisor.debug_console {
            log::warn!("sandbox {id}: debug console enabled (kabuto exec {id})");
        }
        let tee = tee_launch(config, id, &dir, &host_data, &vsock, &mut partial.firmware)
            .map_err(fail("preparing the TEE"))?;
        let (pod_network, vmm_network) = join_pod_network(config, network)
            .map_err(|(stage, e)| fail(stage)(BootError::Network(e)))?;
        partial.network = pod_network;
        if let Some(record) = partial.network.as_ref().and_then(PodNetwork::record) {
            cleanup::write_network_record(&dir, &record)
                .map_err(fail("preparing the state directory"))?;
        }
        let nics = partial
            .network
            .as_ref()
            .map(PodNetwork::guest_nics)
            .unwrap_or_default();
        let spec = VmSpec {
            id: id.to_string(),
            dir: dir.clone(),
            kernel: config.guest.kernel.clone(),
            initramfs: config.guest.initramfs.clone(),
            vcpus: config.hypervisor.vcpus,
            memory_mib: config.hypervisor.memory_mib,
            accel,
            kernel_params: guest_kernel_params(config),
            shared_fs_socket: fs_socket,
            rootfs_fs_socket: rootfs_socket,
            vsock,
            tee,
            // The pod's network, where it has one, is the guest's too.
            user_network: config.hypervisor.guest_network == GuestNetwork::User && nics.is_empty(),
            network_namespace: vmm_network,
            nics,
        };
        let vm = partial
            .vm
            .insert(launch(config, &spec).map_err(fail("starting the VM"))?);
        if let Some(network) = partial.network.as_mut() {
            network.release_taps();
        }
        let agent = wait_for_agent(vm.as_mut(), &address, config, &spec)
            .map_err(fail("waiting for the agent"))?;

        partial
            .finish(id, namespace, agent, accel, config, network)
            .map_err(fail("starting the VM"))
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn vm_pid(&self) -> u32 {
        self.vm.lock().unwrap_or_else(|p| p.into_inner()).pid()
    }

    /// Host pids of the VMM and its helpers (for memory accounting).
    pub fn host_pids(&self) -> Vec<u32> {
        let mut pids = vec![self.vm_pid()];
        pids.extend(
            self.helpers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|h| h.child.id()),
        );
        pids
    }

    /// Reaps the helpers (virtiofsd, the vsock device) that exited on their
    /// own — a virtiofsd ends with its VM — so that none stays a zombie;
    /// returns how each one ended, for the log.
    pub fn reap_exited_helpers(&self) -> Vec<String> {
        let mut helpers = self.helpers.lock().unwrap_or_else(|p| p.into_inner());
        let mut ended = Vec::new();
        helpers.retain_mut(|helper| match helper.child.try_wait() {
            Ok(Some(status)) => {
                ended.push(format!(
                    "{} (pid {}) exited ({status})",
                    helper.name,
                    helper.child.id()
                ));
                false
            }
            _ => true,
        });
        ended
    }

    /// Stops and reaps the helpers: after the VM is gone they serve nothing.
    pub fn stop_helpers(&self) {
        stop_helpers(&mut self.helpers.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// True once the VM process has exited.
    pub fn vm_exited(&self) -> Option<String> {
        let mut vm = self.vm.lock().unwrap_or_else(|p| p.into_inner());
        match vm.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// The last lines of the guest console (kernel and agent log).
    pub fn console_tail(&self) -> String {
        tail(&self.dir.join("console.log"), 4000)
    }

    fn shared_dir(&self) -> PathBuf {
        self.dir.join("shared")
    }

    /// Exported as the root filesystems (the guest's [`GUEST_ROOTFS_DIR`]).
    fn rootfs_dir(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// Mounts a container's rootfs (containerd's mounts, or the bundle's
    /// already-mounted rootfs; `None` when the guest pulls the image) and its
    /// bind mounts into the shared directory.
    pub fn share_container(
        &self,
        container_id: &str,
        rootfs: Option<(&[MountSpec], &Path)>,
        binds: &[SharedBind],
    ) -> Result<(), mount::MountError> {
        let target = self.rootfs_dir().join(container_id);
        let result = (|| {
            match rootfs {
                None => {}
                Some(([], bundle_rootfs)) => mount::bind(bundle_rootfs, &target, false)?,
                Some((mounts, _)) => mount::mount_rootfs(mounts, &target)?,
            }
            for b in binds {
                mount::bind(
                    &b.host_source,
                    &self.shared_dir().join(&b.shared_path),
                    b.readonly,
                )?;
            }
            Ok(())
        })();
        if result.is_err() {
            self.unshare_container(container_id);
        }
        result
    }

    /// Removes what [`Sandbox::share_container`] mounted.
    pub fn unshare_container(&self, container_id: &str) {
        remove_dir(&self.rootfs_dir().join(container_id));
        remove_dir(&self.shared_dir().join(container_id));
    }

    /// Stops the VM and its helpers and removes all host state.
    pub fn destroy(&self) {
        if self.vm_exited().is_none() {
            if let Err(e) = self.agent.destroy_sandbox(Duration::from_secs(5)) {
                log::debug!("sandbox {}: DestroySandbox: {e}", self.id);
            }
        }
        {
            let mut vm = self.vm.lock().unwrap_or_else(|p| p.into_inner());
            match vm.stop(VM_STOP_GRACE) {
                Ok(status) => log::info!("sandbox {}: VM exited ({status})", self.id),
                Err(e) => log::warn!("sandbox {}: stopping the VM: {e}", self.id),
            }
        }
        self.stop_helpers();
        self.firmware
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // After the VM: its taps are gone, the namespace is CNI's again.
        self.network
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        remove_dir(&self.dir);
        if let Some(claim) = self.claim.lock().unwrap_or_else(|p| p.into_inner()).take() {
            claim.release();
        }
    }
}

/// The pod network the VM gets and the namespace its VMM runs in: CRI's
/// namespace joined to taps, or — for a pod that asks for a new one and a
/// trusted host — a new namespace with a reserved NIC (the host may give
/// the pod its network after create); errors carry their stage.
fn join_pod_network(
    config: &Config,
    network: &NetworkNamespace,
) -> Result<(Option<PodNetwork>, NetworkNamespace), (&'static str, crate::network::NetworkError)> {
    match network {
        NetworkNamespace::Path(path) => Ok((
            PodNetwork::attach(path).map_err(|e| ("joining the pod network to the VM", e))?,
            network.clone(),
        )),
        NetworkNamespace::New
            if config.hypervisor.reserve_nic
                && config.confidential.tee == TeeKind::None
                && config.hypervisor.guest_network == GuestNetwork::None =>
        {
            let pod =
                PodNetwork::reserve().map_err(|e| ("reserving a NIC for the pod network", e))?;
            // QEMU joins the namespace made here.
            let vmm = NetworkNamespace::Path(pod.path().to_path_buf());
            Ok((Some(pod), vmm))
        }
        _ => Ok((None, network.clone())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::fs;

    fn config(state: &Path) -> Config {
        let mut config = Config::default();
        config.runtime.state_dir = state.to_path_buf();
        config
    }

    /// What a boot started is undone when a later stage fails (the
    /// `Partial` is dropped unfinished): its helpers killed and reaped, the
    /// state directory removed, the claim free for a new pod of that name.
    #[test]
    fn a_failed_boot_leaves_nothing_behind() {
        let state = tempfile::tempdir().unwrap();
        let config = config(state.path());
        let mut partial = Partial::begin(&config, "default", "pod").unwrap();
        fs::create_dir_all(partial.dir.join("shared")).unwrap();
        let helper = Helper::spawn(
            "sleeper",
            Path::new("sleep"),
            &["60".into()],
            partial.dir.join("never.sock"),
            partial.dir.join("sleeper.log"),
        )
        .unwrap();
        let pid = helper.child.id();
        partial.helpers.push(helper);
        assert!(claim_is_held(&config, "default", "pod"));
        // A second boot of the same pod is refused while this one is under way.
        let (stage, _) = Partial::begin(&config, "default", "pod").err().unwrap();
        assert_eq!(stage, "claiming the sandbox id");

        let dir = partial.dir.clone();
        drop(partial);
        assert!(!dir.exists(), "the state directory stays");
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the helper still runs (or was not reaped)"
        );
        assert!(!claim_is_held(&config, "default", "pod"));
        drop(Partial::begin(&config, "default", "pod").unwrap());
    }

    #[test]
    fn names_are_checked_before_anything_is_claimed() {
        let state = tempfile::tempdir().unwrap();
        let config = config(state.path());
        for (namespace, id) in [("default", "../escape"), ("a/b", "pod"), ("default", "")] {
            let (stage, reason) = Partial::begin(&config, namespace, id).err().unwrap();
            assert_eq!(stage, "checking the sandbox id");
            assert!(matches!(reason, BootError::Identifier { .. }), "{reason}");
        }
        assert!(!sandboxes_dir(&config).exists(), "something was claimed");
    }
}
