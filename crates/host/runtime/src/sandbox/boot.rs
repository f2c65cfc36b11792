//! The stages of booting a sandbox: its state directory, the helper
//! daemons, the TEE launch, QEMU, and the wait for the agent.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use kabuto_protocol::{AGENT_READY_MARKER, AGENT_VSOCK_PORT, SWTEE_VSOCK_PORT};

use super::error::BootError;
use super::helpers::{tail, Helper};
use super::measure::{fit, software_tee_measurement};
use super::naming::{guest_cid, SANDBOX_NAME_FILE};
use crate::agent_client::{AgentAddress, AgentClient};
use crate::config::{AgentChannel, Config, TeeKind};
use crate::hypervisor::{self, TeeLaunch, Vm, VmSpec, VsockBackend};
use crate::mount;
use crate::swtee_service::FirmwareService;

/// How long one connection attempt to a ready agent may take.
const AGENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The state directory: its name record, the shared and rootfs exports
/// (shared mounts, so what is mounted later reaches virtiofsd).
pub(super) fn prepare_state_dir(dir: &Path, namespace: &str, id: &str) -> Result<(), BootError> {
    fs::create_dir_all(dir)
        .and_then(|_| fs::write(dir.join(SANDBOX_NAME_FILE), format!("{namespace}\n{id}\n")))
        .map_err(BootError::io(dir))?;
    let shared = dir.join("shared");
    let rootfs = dir.join("rootfs");
    fs::create_dir_all(&shared)
        .and_then(|_| fs::create_dir_all(&rootfs))
        .and_then(|_| fs::write(dir.join("owner"), "kabuto"))
        .map_err(BootError::io(dir))?;
    for exported in [&shared, &rootfs] {
        mount::make_shared(exported).map_err(|source| BootError::Share {
            path: exported.clone(),
            source,
        })?;
    }
    Ok(())
}

/// The two virtio-fs daemons: the shared directory (volumes) and the root
/// filesystems, each with its own cache mode (see `SharedFsConfig`).
/// Returns their sockets.
pub(super) fn start_shared_fs(
    config: &Config,
    dir: &Path,
    helpers: &mut Vec<Helper>,
) -> Result<(PathBuf, PathBuf), BootError> {
    let fs_cfg = &config.shared_fs;
    let fs_socket = dir.join("virtiofs.sock");
    let rootfs_socket = dir.join("rootfs.sock");
    let exports = [
        (&fs_socket, "shared", &fs_cfg.cache, "virtiofsd.log"),
        (
            &rootfs_socket,
            "rootfs",
            &fs_cfg.rootfs_cache,
            "virtiofsd-rootfs.log",
        ),
    ];
    for (socket, source, cache, log) in exports {
        helpers.push(Helper::virtiofsd(
            fs_cfg,
            socket,
            &dir.join(source),
            *cache,
            dir.join(log),
        )?);
    }
    Ok((fs_socket, rootfs_socket))
}

/// The vsock device and the address of the agent behind it: the kernel's
/// vhost-vsock where it exists (or is configured), else the vhost-user
/// device.
pub(super) fn start_vsock(
    config: &Config,
    namespace: &str,
    id: &str,
    dir: &Path,
    helpers: &mut Vec<Helper>,
) -> Result<(VsockBackend, AgentAddress), BootError> {
    let use_kernel_vsock = match config.agent.channel {
        AgentChannel::VhostVsock => true,
        AgentChannel::VhostUserVsock => false,
        AgentChannel::Auto => Path::new("/dev/vhost-vsock").exists(),
    };
    if use_kernel_vsock {
        let cid = guest_cid(namespace, id);
        return Ok((
            VsockBackend::Kernel { guest_cid: cid },
            AgentAddress::Vsock {
                cid,
                port: AGENT_VSOCK_PORT,
            },
        ));
    }
    let socket = dir.join("vhost-vsock.sock");
    let uds = dir.join("agent.vsock");
    helpers.push(Helper::vhost_user_vsock(
        &config.agent.vhost_user_vsock_path,
        &socket,
        &uds,
        dir.join("vsock.log"),
    )?);
    Ok((
        VsockBackend::VhostUser { socket },
        AgentAddress::HybridVsock {
            uds,
            port: AGENT_VSOCK_PORT,
        },
    ))
}

/// How the VM is launched as a TEE, with `host_data` (the init-data digest)
/// in its launch data; for the software TEE, starts its firmware service
/// into `firmware`.
pub(super) fn tee_launch(
    config: &Config,
    id: &str,
    dir: &Path,
    host_data: &[u8],
    vsock: &VsockBackend,
    firmware: &mut Option<FirmwareService>,
) -> Result<TeeLaunch, BootError> {
    Ok(match config.confidential.tee {
        TeeKind::None => TeeLaunch::None,
        TeeKind::Sample => {
            log::warn!(
                "sandbox {id}: no TEE, CoCo's sample attester (insecure, for interop tests)"
            );
            TeeLaunch::None
        }
        TeeKind::Snp => TeeLaunch::Snp {
            host_data: fit(host_data),
            firmware: config.confidential.firmware.clone(),
            cpu: config.confidential.snp_cpu.clone(),
        },
        TeeKind::Tdx => TeeLaunch::Tdx {
            mrconfigid: fit(host_data),
            firmware: config.confidential.firmware.clone(),
        },
        TeeKind::Software => {
            let launch = kabuto_swtee::LaunchData {
                measurement: software_tee_measurement(config)?,
                host_data: fit(host_data),
            };
            let VsockBackend::VhostUser { .. } = vsock else {
                return Err(BootError::SoftwareTeeChannel);
            };
            let socket = PathBuf::from(format!(
                "{}_{SWTEE_VSOCK_PORT}",
                dir.join("agent.vsock").display()
            ));
            *firmware = Some(FirmwareService::start(
                &config.confidential.software_tee_dir,
                socket,
                launch,
            )?);
            log::warn!("sandbox {id}: software TEE (insecure, for testing)");
            TeeLaunch::Software(launch)
        }
    })
}

/// Launches the VM of `spec` once its kernel and initramfs exist.
pub(super) fn launch(config: &Config, spec: &VmSpec) -> Result<Box<dyn Vm>, BootError> {
    for (what, path) in [("kernel", &spec.kernel), ("initramfs", &spec.initramfs)] {
        if !path.is_file() {
            return Err(BootError::GuestFile {
                what,
                path: path.clone(),
            });
        }
    }
    let hv = hypervisor::new_hypervisor(&config.hypervisor);
    let vm = hv.launch(spec).map_err(|source| BootError::Launch {
        hypervisor: hv.name(),
        source,
    })?;
    log::info!(
        "sandbox {}: {} pid {} launched",
        spec.id,
        hv.name(),
        vm.pid()
    );
    Ok(vm)
}

pub(super) fn wait_for_agent(
    vm: &mut dyn Vm,
    address: &AgentAddress,
    config: &Config,
    spec: &VmSpec,
) -> Result<AgentClient, BootError> {
    let timeout = config.agent.boot_timeout;
    let started = Instant::now();
    let deadline = started + timeout;
    let exited = |vm: &mut dyn Vm| -> Option<BootError> {
        match vm.try_wait() {
            Ok(Some(status)) => Some(BootError::VmExited {
                status,
                qemu: tail(&spec.dir.join("qemu.log"), 1000),
                console: tail(&spec.console_log(), 2000),
            }),
            _ => None,
        }
    };
    let timed_out = |last: &str| BootError::AgentTimeout {
        timeout,
        last: last.to_string(),
        console: tail(&spec.console_log(), 2000),
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
        match AgentClient::connect(address, handshake, config.agent.request_timeout) {
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
