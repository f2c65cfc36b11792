//! One pod VM and everything the host runs for it: the virtio-fs daemon,
//! the vsock device, QEMU, and the agent connection.
//!
//! Creation is all-or-nothing: if any stage fails, what the earlier stages
//! started is stopped and removed before the error is returned, and the
//! error names the stage.

use std::{
    fs,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use kabuto_protocol::{
    agent::CreateSandboxRequest, AGENT_READY_MARKER, AGENT_VSOCK_PORT, GUEST_SHARED_DIR,
    KERNEL_PARAM_NET, KERNEL_PARAM_TEE, SWTEE_VSOCK_PORT,
};
use thiserror::Error;

use crate::{
    agent_client::{AgentAddress, AgentClient},
    config::{AgentChannel, Config, GuestNetwork, MachineType, TeeKind},
    hypervisor::{self, Accel, NetworkNamespace, TeeLaunch, Vm, VmSpec, VsockBackend},
    mount::{self, MountSpec},
    spec::SharedBind,
    swtee_service::FirmwareService,
};

#[derive(Debug, Error)]
#[error("sandbox {id}: {stage}: {reason}")]
pub struct SandboxError {
    pub id: String,
    pub stage: &'static str,
    pub reason: String,
}

/// Helper daemons get this long to create their sockets.
const HELPER_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection attempt to a ready agent may take.
const AGENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
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
    helpers: Mutex<Vec<Child>>,
    firmware: Mutex<Option<FirmwareService>>,
    agent: AgentClient,
    pub accel: Accel,
    /// Whether the guest pulls container images itself.
    pub image_pull: crate::config::ImagePull,
}

/// vsock port of the guest's debug console (see `kabuto exec`).
pub const DEBUG_CONSOLE_PORT: u32 = 1026;

/// Where the host reaches `port` of a running sandbox's guest.
pub fn guest_address(config: &Config, namespace: &str, id: &str, port: u32) -> AgentAddress {
    let uds = sandbox_dir(config, namespace, id).join("agent.vsock");
    if uds.exists() {
        AgentAddress::HybridVsock { uds, port }
    } else {
        AgentAddress::Vsock {
            cid: guest_cid(namespace, id),
            port,
        }
    }
}

/// Directory holding a sandbox's sockets, logs and shared directory. Keyed
/// by containerd namespace and id: the same id in two namespaces is two
/// sandboxes.
pub fn sandbox_dir(config: &Config, namespace: &str, id: &str) -> PathBuf {
    sandboxes_dir(config).join(sandbox_dir_name(namespace, id))
}

pub(crate) fn sandboxes_dir(config: &Config) -> PathBuf {
    config.runtime.state_dir.join("sandboxes")
}

/// The namespaces' sandbox directories named `id`: for `kabuto exec`, which
/// is given a pod id alone.
pub fn sandbox_namespaces(config: &Config, id: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(sandboxes_dir(config)) else {
        return Vec::new();
    };
    // Each directory records its namespace and id (long names are hashed).
    let mut found: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let text = fs::read_to_string(e.path().join(SANDBOX_NAME_FILE)).ok()?;
            let (namespace, dir_id) = text.split_once('\n')?;
            (dir_id.trim_end() == id).then(|| namespace.to_string())
        })
        .collect();
    found.sort();
    found
}

/// In each sandbox directory: `<namespace>\n<id>\n`.
pub(crate) const SANDBOX_NAME_FILE: &str = "sandbox";

/// Longest `<namespace>+<id>` used as a directory name unchanged.
const MAX_DIR_NAME: usize = 40;
/// Neither containerd namespaces nor ids may contain it.
const NAMESPACE_SEPARATOR: char = '+';

/// `<namespace>+<id>`, or for longer names (CRI ids are 64 hex digits) a
/// prefix plus a digest of both: Unix socket paths in the directory must
/// stay under the kernel's 108 bytes even below a long `state_dir`.
fn sandbox_dir_name(namespace: &str, id: &str) -> String {
    let name = format!("{namespace}{NAMESPACE_SEPARATOR}{id}");
    if name.len() <= MAX_DIR_NAME {
        return name;
    }
    let digest = hex::encode(sandbox_key_digest(namespace, id));
    let prefix: String = name.chars().take(15).collect();
    format!("{prefix}-{}", &digest[..16])
}

/// SHA-256 of a sandbox's namespace and id (NUL-separated: neither holds one).
fn sandbox_key_digest(namespace: &str, id: &str) -> [u8; 32] {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    hasher.update(namespace.as_bytes());
    hasher.update([0]);
    hasher.update(id.as_bytes());
    hasher.finalize().into()
}

/// containerd's identifier rule (namespaces and ids): alphanumeric words
/// joined by single `.`, `_` or `-`; at most 76 characters.
fn valid_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 76
        && name
            .split(['.', '_', '-'])
            .all(|word| !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric()))
}

/// An exclusive claim on a sandbox's namespace and id, held (flock) by the
/// process that owns the sandbox: a second create of the same pod is
/// refused instead of tearing down the running one, and a claim whose owner
/// died is free again (its state is stale).
struct Claim {
    file: fs::File,
    path: PathBuf,
}

impl Claim {
    fn take(config: &Config, namespace: &str, id: &str) -> Result<Claim, String> {
        let dir = sandboxes_dir(config);
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join(format!("{}.lock", sandbox_dir_name(namespace, id)));
        // A claim released meanwhile unlinks the file we may have opened:
        // the lock only counts if it is on the file still at the path.
        for _ in 0..8 {
            let file = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            use std::os::fd::AsRawFd as _;
            use std::os::unix::fs::MetadataExt as _;
            // `kabuto sandbox list` probes claims by locking them for a
            // moment: a few short retries tell that from a live owner.
            let mut rc = -1;
            for attempt in 0..5 {
                if attempt > 0 {
                    thread::sleep(Duration::from_millis(20));
                }
                // SAFETY: flock on a file descriptor we own.
                rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
                if rc == 0
                    || std::io::Error::last_os_error().raw_os_error() != Some(libc::EWOULDBLOCK)
                {
                    break;
                }
            }
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    format!(
                        "sandbox {id} of namespace {namespace} already exists and is running (its owner holds {})",
                        path.display()
                    )
                } else {
                    format!("locking {}: {e}", path.display())
                });
            }
            let held = file.metadata().map(|m| m.ino()).ok();
            let current = fs::metadata(&path).map(|m| m.ino()).ok();
            if held.is_some() && held == current {
                return Ok(Claim { file, path });
            }
        }
        Err(format!(
            "sandbox {id} of namespace {namespace}: its claim {} keeps changing",
            path.display()
        ))
    }

    /// Gives the claim up after the sandbox is gone.
    fn release(self) {
        // Unlinked while still held: a concurrent claimer either failed on
        // the lock already or opens a new file.
        let _ = fs::remove_file(&self.path);
        drop(self.file);
    }
}

/// Whether a live process holds the claim on `namespace`/`id`, without
/// taking it (a lock on our own open of the file, dropped at once).
pub(crate) fn claim_is_held(config: &Config, namespace: &str, id: &str) -> bool {
    let path = sandboxes_dir(config).join(format!("{}.lock", sandbox_dir_name(namespace, id)));
    let Ok(file) = fs::File::open(&path) else {
        return false;
    };
    use std::os::fd::AsRawFd as _;
    // SAFETY: flock on a file descriptor we own; closing it unlocks.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
}

/// What `create` has started so far; dropped (and so undone) on failure.
struct Partial {
    armed: bool,
    dir: PathBuf,
    vm: Option<Box<dyn Vm>>,
    helpers: Vec<Child>,
    firmware: Option<FirmwareService>,
    claim: Option<Claim>,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(mut vm) = self.vm.take() {
            let _ = vm.stop(Duration::ZERO);
        }
        self.firmware.take();
        stop_helpers(&mut self.helpers);
        remove_dir(&self.dir);
        if let Some(claim) = self.claim.take() {
            claim.release();
        }
    }
}

fn stop_helpers(helpers: &mut Vec<Child>) {
    for child in helpers.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
    helpers.clear();
}

fn remove_dir(dir: &Path) {
    if let Err(e) = mount::unmount_all_under(dir) {
        log::warn!("{e}");
    }
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("removing {}: {e}", dir.display());
        }
    }
}

fn tail(path: &Path, bytes: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(bytes)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    s.trim().to_string()
}

fn find_program(program: &Path) -> PathBuf {
    if program.components().count() > 1 {
        return program.to_path_buf();
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([
            PathBuf::from("/usr/local/bin"),
            PathBuf::from("/root/.cargo/bin"),
        ])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| program.to_path_buf())
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
                reason: e.to_string(),
            });
        }
        Ok(sandbox)
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
            move |reason: String| SandboxError { id, stage, reason }
        };
        for (what, name) in [("namespace", namespace), ("id", id)] {
            if !valid_identifier(name) {
                return Err(fail("checking the sandbox id")(format!(
                    "{what} {name:?} is not a containerd identifier (alphanumeric words joined by '.', '_' or '-', at most 76 characters)"
                )));
            }
        }
        // Claimed first: nothing of a running sandbox of this name is touched.
        let claim = Claim::take(config, namespace, id).map_err(fail("claiming the sandbox id"))?;
        let dir = sandbox_dir(config, namespace, id);
        if dir.exists() {
            log::warn!("removing stale state of sandbox {id} at {}", dir.display());
            cleanup_stale(&dir);
        }
        let mut partial = Partial {
            armed: true,
            dir: dir.clone(),
            vm: None,
            helpers: Vec::new(),
            firmware: None,
            claim: Some(claim),
        };
        fs::create_dir_all(&dir)
            .and_then(|_| fs::write(dir.join(SANDBOX_NAME_FILE), format!("{namespace}\n{id}\n")))
            .map_err(|e| {
                fail("preparing the state directory")(format!("{}: {e}", dir.display()))
            })?;
        // The init-data's digest is fixed into the TEE's launch data.
        let host_data = match init_data {
            Some(raw) => kabuto_initdata::InitData::parse(raw)
                .map_err(|e| fail("checking the init-data")(e.to_string()))?
                .digest(),
            None => Vec::new(),
        };
        let shared = dir.join("shared");
        let rootfs = dir.join("rootfs");
        fs::create_dir_all(&shared)
            .and_then(|_| fs::create_dir_all(&rootfs))
            .and_then(|_| fs::write(dir.join("owner"), "kabuto"))
            .map_err(|e| fail("preparing the state directory")(e.to_string()))?;
        for exported in [&shared, &rootfs] {
            mount::make_shared(exported)
                .map_err(|e| fail("sharing the container directory")(e.to_string()))?;
        }

        // virtio-fs daemons: the shared directory (volumes) and the root
        // filesystems, each with its own cache mode (see SharedFsConfig).
        let fs_cfg = &config.shared_fs;
        let fs_socket = dir.join("virtiofs.sock");
        let rootfs_socket = dir.join("rootfs.sock");
        let exports = [
            (&fs_socket, &shared, &fs_cfg.cache, "virtiofsd.log"),
            (
                &rootfs_socket,
                &rootfs,
                &fs_cfg.rootfs_cache,
                "virtiofsd-rootfs.log",
            ),
        ];
        for (socket, source, cache, log) in exports {
            let virtiofsd = spawn_helper(
                &fs_cfg.virtiofsd_path,
                &[
                    format!("--socket-path={}", socket.display()),
                    "-o".into(),
                    format!("source={}", source.display()),
                    "-o".into(),
                    format!("cache={cache}"),
                    "-o".into(),
                    "announce_submounts".into(),
                ],
                &dir.join(log),
            )
            .map_err(fail("starting virtiofsd"))?;
            partial.helpers.push(virtiofsd);
        }

        // vsock device and the address of the agent behind it.
        let use_kernel_vsock = match config.agent.channel {
            AgentChannel::VhostVsock => true,
            AgentChannel::VhostUserVsock => false,
            AgentChannel::Auto => Path::new("/dev/vhost-vsock").exists(),
        };
        let (vsock, address) = if use_kernel_vsock {
            let cid = guest_cid(namespace, id);
            (
                VsockBackend::Kernel { guest_cid: cid },
                AgentAddress::Vsock {
                    cid,
                    port: AGENT_VSOCK_PORT,
                },
            )
        } else {
            let socket = dir.join("vhost-vsock.sock");
            let uds = dir.join("agent.vsock");
            let daemon = spawn_helper(
                &find_program(&config.agent.vhost_user_vsock_path),
                &[
                    "--guest-cid".into(),
                    "3".into(),
                    "--socket".into(),
                    socket.display().to_string(),
                    "--uds-path".into(),
                    uds.display().to_string(),
                ],
                &dir.join("vsock.log"),
            )
            .map_err(fail("starting the vhost-user vsock device"))?;
            partial.helpers.push(daemon);
            (
                VsockBackend::VhostUser { socket },
                AgentAddress::HybridVsock {
                    uds,
                    port: AGENT_VSOCK_PORT,
                },
            )
        };
        write_pids(&dir, &partial.helpers);
        // The daemons start side by side; QEMU needs all their sockets.
        for (index, (socket, _, _, log)) in exports.iter().enumerate() {
            wait_for_socket(socket, partial.helpers.get_mut(index), &dir.join(log))
                .map_err(fail("starting virtiofsd"))?;
        }
        if let VsockBackend::VhostUser { socket } = &vsock {
            wait_for_socket(
                socket,
                partial.helpers.get_mut(exports.len()),
                &dir.join("vsock.log"),
            )
            .map_err(fail("starting the vhost-user vsock device"))?;
        }

        // The VM.
        let (accel, why) = hypervisor::choose_accelerator(config.hypervisor.accelerator);
        log::info!("sandbox {id}: accelerator {why}");
        if config.hypervisor.debug_console {
            log::warn!("sandbox {id}: debug console enabled (kabuto exec {id})");
        }
        let kernel_params = guest_kernel_params(config);
        let tee = match config.confidential.tee {
            TeeKind::None => TeeLaunch::None,
            TeeKind::Sample => {
                log::warn!(
                    "sandbox {id}: no TEE, CoCo's sample attester (insecure, for interop tests)"
                );
                TeeLaunch::None
            }
            TeeKind::Snp => TeeLaunch::Snp {
                host_data: fit(&host_data),
                firmware: config.confidential.firmware.clone(),
                cpu: config.confidential.snp_cpu.clone(),
            },
            TeeKind::Tdx => TeeLaunch::Tdx {
                mrconfigid: fit(&host_data),
                firmware: config.confidential.firmware.clone(),
            },
            TeeKind::Software => {
                let launch = kabuto_swtee::LaunchData {
                    measurement: software_tee_measurement(config)
                        .map_err(fail("preparing the software TEE"))?,
                    host_data: fit(&host_data),
                };
                let VsockBackend::VhostUser { .. } = &vsock else {
                    return Err(fail("preparing the software TEE")(
                        "the software TEE needs agent.channel = \"vhost-user-vsock\"".into(),
                    ));
                };
                let socket = PathBuf::from(format!(
                    "{}_{SWTEE_VSOCK_PORT}",
                    dir.join("agent.vsock").display()
                ));
                partial.firmware = Some(
                    FirmwareService::start(&config.confidential.software_tee_dir, socket, launch)
                        .map_err(fail("preparing the software TEE"))?,
                );
                log::warn!("sandbox {id}: software TEE (insecure, for testing)");
                TeeLaunch::Software(launch)
            }
        };
        let spec = VmSpec {
            id: id.to_string(),
            dir: dir.clone(),
            kernel: config.guest.kernel.clone(),
            initramfs: config.guest.initramfs.clone(),
            vcpus: config.hypervisor.vcpus,
            memory_mib: config.hypervisor.memory_mib,
            accel,
            kernel_params,
            shared_fs_socket: fs_socket,
            rootfs_fs_socket: rootfs_socket,
            vsock,
            tee,
            user_network: config.hypervisor.guest_network == GuestNetwork::User,
            network_namespace: network.clone(),
        };
        for (what, path) in [("kernel", &spec.kernel), ("initramfs", &spec.initramfs)] {
            if !path.is_file() {
                return Err(fail("starting the VM")(format!(
                    "guest {what} {} not found: run `kabuto guest build` and `kabuto install`, \
                     or set guest.{what} in the config",
                    path.display()
                )));
            }
        }
        let hv = hypervisor::new_hypervisor(&config.hypervisor);
        let vm = hv
            .launch(&spec)
            .map_err(|e| fail("starting the VM")(format!("{e}: {}", error_chain(&e))))?;
        log::info!("sandbox {id}: {} pid {} launched", hv.name(), vm.pid());
        let vm = partial.vm.insert(vm);

        // The agent.
        let agent = wait_for_agent(vm.as_mut(), &address, config, &spec)
            .map_err(fail("waiting for the agent"))?;

        let vm = partial.vm.take().ok_or_else(|| {
            fail("starting the VM")("internal error: VM handle vanished".to_string())
        })?;
        let helpers = std::mem::take(&mut partial.helpers);
        let firmware = partial.firmware.take();
        let claim = partial.claim.take();
        partial.armed = false;
        Ok(Sandbox {
            id: id.to_string(),
            namespace: namespace.to_string(),
            dir,
            claim: Mutex::new(claim),
            vm: Mutex::new(vm),
            helpers: Mutex::new(helpers),
            firmware: Mutex::new(firmware),
            agent,
            accel,
            image_pull: config.confidential.image_pull,
        })
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
                .map(|c| c.id()),
        );
        pids
    }

    /// Reaps the helpers (virtiofsd, the vsock device) that exited on their
    /// own — a virtiofsd ends with its VM — so that none stays a zombie;
    /// returns how each one ended, for the log.
    pub fn reap_exited_helpers(&self) -> Vec<String> {
        let mut helpers = self.helpers.lock().unwrap_or_else(|p| p.into_inner());
        let mut ended = Vec::new();
        helpers.retain_mut(|child| match child.try_wait() {
            Ok(Some(status)) => {
                ended.push(format!("helper {} exited ({status})", child.id()));
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
        remove_dir(&self.dir);
        if let Some(claim) = self.claim.lock().unwrap_or_else(|p| p.into_inner()).take() {
            claim.release();
        }
    }
}

/// The guest kernel parameters kabuto sets (before the driver's own), from
/// the config alone — so the software TEE's measurement is reproducible.
pub fn guest_kernel_params(config: &Config) -> Vec<String> {
    let mut params = vec![format!("kabuto.log={}", config.runtime.agent_log_level)];
    if config.hypervisor.debug_console {
        params.push("kabuto.debug_console=1".into());
    }
    if let Some(tee) = config.confidential.tee.kernel_param() {
        params.push(format!("{KERNEL_PARAM_TEE}={tee}"));
    }
    if config.hypervisor.guest_network == GuestNetwork::User {
        params.push(format!("{KERNEL_PARAM_NET}=user"));
    }
    params.extend(
        config
            .hypervisor
            .kernel_params
            .split_whitespace()
            .map(String::from),
    );
    params
}

/// MEASUREMENT a software-TEE guest of this config reports: the digest of
/// kernel, initramfs and kabuto's kernel parameters (the owner registers it
/// as a reference value; `kabuto guest measure` prints it).
pub fn software_tee_measurement(config: &Config) -> Result<[u8; 48], String> {
    let read = |what: &str, path: &Path| {
        fs::read(path).map_err(|e| format!("reading the guest {what} {}: {e}", path.display()))
    };
    let kernel = read("kernel", &config.guest.kernel)?;
    let initramfs = read("initramfs", &config.guest.initramfs)?;
    Ok(kabuto_swtee::measurement(
        &kernel,
        &initramfs,
        &guest_kernel_params(config).join(" "),
    ))
}

/// The `sev` measurement crate's vCPU type named like QEMU's `-cpu` model.
pub fn snp_cpu_type(model: &str) -> Option<sev::measurement::vcpu_types::CpuType> {
    sev::measurement::vcpu_types::CpuType::try_from(model).ok()
}

/// The SNP launch MEASUREMENT of this config's pods, computed without
/// booting: AmdSev OVMF pages, the kernel-hashes table (SHA-256 of kernel,
/// initrd and the exact command line QEMU passes) and one VMSA per vCPU —
/// the reference value owners register at their KBS.
pub fn snp_launch_measurement(config: &Config) -> Result<[u8; 48], String> {
    let c = &config.confidential;
    if c.firmware.as_os_str().is_empty() {
        return Err(
            "confidential.firmware is not set (an OVMF built from edk2's OvmfPkg/AmdSev)".into(),
        );
    }
    // SNP guests boot on KVM through q35 (config validation insists).
    let cmdline = crate::hypervisor::qemu::kernel_command_line(
        MachineType::Q35,
        Accel::Kvm,
        None,
        &guest_kernel_params(config),
    );
    snp_measurement(&SnpLaunchInputs {
        firmware: &c.firmware,
        kernel: &config.guest.kernel,
        initrd: &config.guest.initramfs,
        cmdline: &cmdline,
        vcpus: config.hypervisor.vcpus,
        cpu: &c.snp_cpu,
        guest_features: c.snp_guest_features,
    })
}

/// What an SNP launch with QEMU's kernel-hashes measures.
pub struct SnpLaunchInputs<'a> {
    pub firmware: &'a Path,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: &'a str,
    pub vcpus: u32,
    pub cpu: &'a str,
    pub guest_features: u64,
}

/// The SNP launch digest of `inputs` (the `sev` crate's implementation of
/// AMD's page-by-page launch digest).
pub fn snp_measurement(inputs: &SnpLaunchInputs<'_>) -> Result<[u8; 48], String> {
    use sev::measurement::snp::{snp_calc_launch_digest, SnpMeasurementArgs};
    use sev::measurement::vmsa::{GuestFeatures, VMMType};
    use sev::parser::ByteParser;
    let cpu = snp_cpu_type(inputs.cpu)
        .ok_or_else(|| format!("SNP vCPU model {:?} is not a known EPYC model", inputs.cpu))?;
    let features = GuestFeatures::from_bytes(&inputs.guest_features.to_le_bytes())
        .map_err(|e| format!("SNP guest features: {e}"))?;
    // The sev crate's OVMF parser indexes from the file's end and panics on
    // short files; OVMF images are whole pages.
    let size = fs::metadata(inputs.firmware)
        .map_err(|e| format!("SNP firmware {}: {e}", inputs.firmware.display()))?
        .len();
    if size < 4096 || size % 4096 != 0 {
        return Err(format!(
            "SNP firmware {}: {size} bytes is not an OVMF image (whole 4 KiB pages)",
            inputs.firmware.display()
        ));
    }
    let args = SnpMeasurementArgs {
        vcpus: inputs.vcpus,
        vcpu_type: cpu,
        ovmf_file: inputs.firmware.to_path_buf(),
        guest_features: features,
        kernel_file: Some(inputs.kernel.to_path_buf()),
        initrd_file: Some(inputs.initrd.to_path_buf()),
        append: Some(inputs.cmdline),
        ovmf_hash_str: None,
        vmm_type: Some(VMMType::QEMU),
    };
    // Any other malformed image must not take the caller down either.
    let digest = std::panic::catch_unwind(move || snp_calc_launch_digest(args))
        .map_err(|_| {
            format!(
                "SNP firmware {}: not an AmdSev OVMF image (its metadata does not parse)",
                inputs.firmware.display()
            )
        })?
        .map_err(|e| {
            format!(
                "SNP launch measurement of {}: {e}",
                inputs.firmware.display()
            )
        })?;
    let bytes = digest
        .to_bytes()
        .map_err(|e| format!("SNP launch measurement: {e}"))?;
    let mut out = [0u8; 48];
    out.copy_from_slice(bytes.as_ref());
    Ok(out)
}

/// A digest fitted to a TEE field of `N` bytes (see `kabuto_initdata::fit_digest`).
fn fit<const N: usize>(digest: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&kabuto_initdata::fit_digest(digest, N));
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}

fn spawn_helper(program: &Path, args: &[String], log: &Path) -> Result<Child, String> {
    let out = fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("{}: {e}", program.display()))
}

fn wait_for_socket(path: &Path, child: Option<&mut Child>, log: &Path) -> Result<(), String> {
    let deadline = Instant::now() + HELPER_START_TIMEOUT;
    let mut child = child;
    while !path.exists() {
        if let Some(c) = child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                return Err(format!("exited with {status}: {}", tail(log, 2000)));
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} did not appear within {HELPER_START_TIMEOUT:?}",
                path.display()
            ));
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn wait_for_agent(
    vm: &mut dyn Vm,
    address: &AgentAddress,
    config: &Config,
    spec: &VmSpec,
) -> Result<AgentClient, String> {
    let timeout = config.agent.boot_timeout();
    let started = Instant::now();
    let deadline = started + timeout;
    let exited = |vm: &mut dyn Vm| -> Option<String> {
        match vm.try_wait() {
            Ok(Some(status)) => Some(format!(
                "the VM exited ({status}) before the agent answered; qemu: {}; console: {}",
                tail(&spec.dir.join("qemu.log"), 1000),
                tail(&spec.console_log(), 2000)
            )),
            _ => None,
        }
    };
    let timed_out = |last: &str| {
        format!(
            "no answer within {timeout:?} ({last}); console: {}",
            tail(&spec.console_log(), 2000)
        )
    };
    // First the readiness line on the console (see AGENT_READY_MARKER).
    loop {
        if let Some(e) = exited(vm) {
            return Err(e);
        }
        let console = fs::read(spec.console_log()).unwrap_or_default();
        if String::from_utf8_lossy(&console).contains(AGENT_READY_MARKER) {
            break;
        }
        if Instant::now() > deadline {
            return Err(timed_out("the agent never reported ready"));
        }
        thread::sleep(Duration::from_millis(10));
    }
    // Then the connection, retried while the deadline allows.
    let mut last_error;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let handshake = remaining.clamp(Duration::from_millis(100), AGENT_HANDSHAKE_TIMEOUT);
        match AgentClient::connect(address, handshake, config.agent.request_timeout()) {
            Ok(client) => match client.check(handshake) {
                Ok(_) => {
                    log::info!(
                        "sandbox {}: agent answered {:?} after launch",
                        spec.id,
                        started.elapsed()
                    );
                    return Ok(client);
                }
                Err(e) => last_error = e.to_string(),
            },
            Err(e) => last_error = e.to_string(),
        }
        if let Some(e) = exited(vm) {
            return Err(e);
        }
        if Instant::now() > deadline {
            return Err(timed_out(&format!("last error: {last_error}")));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A context id for kernel vhost-vsock, derived from the sandbox's
/// namespace and id so that concurrent sandboxes rarely collide (QEMU
/// refuses a CID in use).
pub fn guest_cid(namespace: &str, id: &str) -> u32 {
    let d = sandbox_key_digest(namespace, id);
    let n = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
    3 + n % (u32::MAX / 2)
}

fn write_pids(dir: &Path, helpers: &[Child]) {
    let pids: Vec<String> = helpers.iter().map(|c| c.id().to_string()).collect();
    let _ = fs::write(dir.join("helpers.pid"), pids.join("\n"));
}

/// Removes what a crashed shim left of sandbox `id` of `namespace`, with its
/// claim; does nothing while the sandbox's owner is alive (it holds the
/// claim).
pub fn cleanup_stale_sandbox(config: &Config, namespace: &str, id: &str) {
    if let Err(e) = remove_stale_sandbox(config, namespace, id) {
        log::warn!("not cleaning up sandbox {id}: {e}");
    }
}

/// [`cleanup_stale_sandbox`], with the reason when the sandbox's owner is
/// still alive (it holds the claim) or the directory stays.
pub(crate) fn remove_stale_sandbox(
    config: &Config,
    namespace: &str,
    id: &str,
) -> Result<(), String> {
    let claim = Claim::take(config, namespace, id)?;
    let dir = sandbox_dir(config, namespace, id);
    cleanup_stale(&dir);
    claim.release();
    if dir.exists() {
        return Err(format!(
            "{} could not be removed (see the log)",
            dir.display()
        ));
    }
    Ok(())
}

/// Removes what a crashed shim left of a sandbox: kills its processes (only
/// those whose command line names this directory, so a recycled pid is never
/// hit), unmounts, and deletes the directory. Safe on a missing directory.
pub fn cleanup_stale(dir: &Path) {
    let mut pids = Vec::new();
    for file in ["qemu.pid", "helpers.pid"] {
        if let Ok(text) = fs::read_to_string(dir.join(file)) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    }
    // With the separator: `…/ns+pod/` is not a prefix of `…/ns+pod-2/`.
    let needle = format!("{}/", dir.display());
    for pid in pids {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            // Reap it if it was ours; otherwise wait until it is gone.
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            for _ in 0..100 {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
    remove_dir(dir);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn guest_cids_are_valid_and_stable() {
        for id in ["a", "pod-1", "0123456789abcdef"] {
            let cid = guest_cid("default", id);
            assert!(cid >= 3, "CIDs 0-2 are reserved");
            assert_eq!(cid, guest_cid("default", id));
        }
        assert_ne!(guest_cid("default", "a"), guest_cid("default", "b"));
        assert_ne!(guest_cid("default", "a"), guest_cid("k8s.io", "a"));
    }

    #[test]
    fn long_sandbox_ids_get_short_distinct_directories() {
        let mut config = Config::default();
        // As long as the e2e tests' state directories.
        config.runtime.state_dir = PathBuf::from("/tmp/kabuto-e2e-AbCdEf/kabuto");
        assert!(sandbox_dir(&config, "default", "pod-1").ends_with("sandboxes/default+pod-1"));
        let cri = "562fe45dc616ef0b7ddde3f278e0d31079e099f12546d29b9e77f7df2788652f";
        let other = "562fe45dc616ef0b7ddde3f278e0d31079e099f12546d29b9e77f7df2788652e";
        let dir = sandbox_dir(&config, "k8s.io", cri);
        assert_eq!(dir, sandbox_dir(&config, "k8s.io", cri), "stable");
        assert_ne!(dir, sandbox_dir(&config, "k8s.io", other));
        assert_ne!(dir, sandbox_dir(&config, "other", cri));
        assert!(dir.to_string_lossy().contains("/k8s.io+562fe45d-"));
        let longest_ns = "n".repeat(76);
        for dir in [dir, sandbox_dir(&config, &longest_ns, cri)] {
            let socket = dir.join("vhost-vsock.sock_1024");
            assert!(socket.as_os_str().len() < 108, "{}", socket.display());
        }
        // The same id in two namespaces: two directories.
        assert_ne!(
            sandbox_dir(&config, "a", "pod"),
            sandbox_dir(&config, "b", "pod")
        );
    }

    #[test]
    fn sandbox_names_must_be_containerd_identifiers() {
        for good in ["default", "k8s.io", "pod-1", "a_b.c-d", "0"] {
            assert!(valid_identifier(good), "{good}");
        }
        for bad in [
            "",
            "..",
            ".",
            "a/b",
            "a+b",
            "-a",
            "a-",
            "a..b",
            "a b",
            &"x".repeat(77),
        ] {
            assert!(!valid_identifier(bad), "{bad}");
        }
    }

    #[test]
    fn a_claimed_sandbox_name_is_refused_until_released() {
        let state = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.runtime.state_dir = state.path().to_path_buf();
        let first = Claim::take(&config, "default", "pod").unwrap();
        let err = Claim::take(&config, "default", "pod").err().unwrap();
        assert!(err.contains("already exists and is running"), "{err}");
        // Another namespace is another sandbox.
        let other = Claim::take(&config, "k8s.io", "pod").unwrap();
        first.release();
        Claim::take(&config, "default", "pod").unwrap().release();
        other.release();
    }

    #[test]
    fn kabuto_exec_finds_pods_by_id_even_with_hashed_directory_names() {
        let state = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.runtime.state_dir = state.path().to_path_buf();
        let cri = "562fe45dc616ef0b7ddde3f278e0d31079e099f12546d29b9e77f7df2788652f";
        for (ns, id) in [("k8s.io", cri), ("default", "pod"), ("other", "pod")] {
            let dir = sandbox_dir(&config, ns, id);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join(SANDBOX_NAME_FILE), format!("{ns}\n{id}\n")).unwrap();
        }
        assert_eq!(sandbox_namespaces(&config, cri), ["k8s.io"]);
        assert_eq!(sandbox_namespaces(&config, "pod"), ["default", "other"]);
        assert!(sandbox_namespaces(&config, "none").is_empty());
    }

    /// The AmdSev OVMF sample the `sev` crate publishes with its known
    /// launch digests, from the cargo registry this build used.
    fn sev_ovmf_sample() -> Option<PathBuf> {
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
        let registries = fs::read_dir(home.join("registry/src")).ok()?;
        for registry in registries.flatten() {
            let path = registry
                .path()
                .join("sev-8.0.0/tests/measurement/ovmf_AmdSev_suffix.bin");
            if path.is_file() {
                return Some(path);
            }
        }
        eprintln!("SKIPPED: the sev crate's OVMF sample is not in the cargo registry");
        None
    }

    #[test]
    fn snp_measurement_matches_the_published_vector_and_covers_every_input() {
        let Some(ovmf) = sev_ovmf_sample() else {
            return;
        };
        let null = Path::new("/dev/null");
        let inputs = SnpLaunchInputs {
            firmware: &ovmf,
            kernel: null,
            initrd: null,
            cmdline: "console=ttyS0 loglevel=7",
            vcpus: 1,
            cpu: "EPYC-v4",
            guest_features: 0x1,
        };
        // sev 8.0.0 tests/measurement.rs, test_sev_snp_only.
        assert_eq!(
            hex::encode(snp_measurement(&inputs).unwrap()),
            "6d287813eb5222d770f75005c664e34c204f385ce832cc2ce7d0d6f354454362f390ef83a92046c042e706363b4b08fa"
        );

        // A config's measurement covers kernel, initramfs, its exact command
        // line, the vCPU count and model.
        let dir = tempfile::tempdir().unwrap();
        let (kernel, initramfs) = (dir.path().join("vmlinuz"), dir.path().join("initramfs"));
        fs::write(&kernel, b"kernel").unwrap();
        fs::write(&initramfs, b"initramfs").unwrap();
        let mut config = Config::default();
        config.confidential.tee = TeeKind::Snp;
        config.confidential.firmware = ovmf.clone();
        config.hypervisor.machine = MachineType::Q35;
        config.guest.kernel = kernel.clone();
        config.guest.initramfs = initramfs.clone();
        let base = snp_launch_measurement(&config).unwrap();
        assert_eq!(base, snp_launch_measurement(&config).unwrap());
        let mut changed = Vec::new();
        fs::write(&kernel, b"kernel2").unwrap();
        changed.push(snp_launch_measurement(&config).unwrap());
        fs::write(&kernel, b"kernel").unwrap();
        fs::write(&initramfs, b"initramfs2").unwrap();
        changed.push(snp_launch_measurement(&config).unwrap());
        fs::write(&initramfs, b"initramfs").unwrap();
        for edit in [
            |c: &mut Config| c.hypervisor.kernel_params = "init=/bin/sh".into(),
            |c: &mut Config| c.hypervisor.vcpus = 2,
            |c: &mut Config| c.confidential.snp_cpu = "EPYC-Milan".into(),
            |c: &mut Config| c.confidential.snp_guest_features = 0x21,
        ] {
            let mut other = config.clone();
            edit(&mut other);
            changed.push(snp_launch_measurement(&other).unwrap());
        }
        for (i, m) in changed.iter().enumerate() {
            assert_ne!(*m, base, "change {i} did not change the measurement");
        }
        assert_eq!(base, snp_launch_measurement(&config).unwrap());

        // Not an AmdSev OVMF: refused with the reason, for a short file and
        // for a whole page without the SEV metadata (Debian's OVMF kind).
        config.confidential.firmware = initramfs.clone();
        assert!(snp_launch_measurement(&config)
            .unwrap_err()
            .contains("not an OVMF image"));
        let plain = dir.path().join("plain.fd");
        fs::write(&plain, vec![0u8; 8192]).unwrap();
        config.confidential.firmware = plain;
        assert!(snp_launch_measurement(&config).is_err());
        config.confidential.snp_cpu = "Skylake".into();
        assert!(snp_launch_measurement(&config)
            .unwrap_err()
            .contains("EPYC"));
    }

    #[test]
    fn cleanup_of_missing_dir_is_harmless() {
        cleanup_stale(Path::new("/nonexistent/kabuto/sandbox"));
    }
}
