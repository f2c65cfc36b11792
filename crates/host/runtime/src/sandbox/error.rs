//! Why a sandbox could not be booted or removed: one variant per cause;
//! the stage it happened in is in [`SandboxError`].

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error)]
#[error("sandbox {id}: {stage}")]
pub struct SandboxError {
    pub id: String,
    pub stage: &'static str,
    #[source]
    pub reason: Box<BootError>,
}

#[derive(Debug, Error)]
pub enum BootError {
    #[error(
        "{what} {name:?} is not a containerd identifier (alphanumeric words joined by '.', '_' \
         or '-', at most 76 characters)"
    )]
    Identifier { what: &'static str, name: String },
    #[error(
        "sandbox {id} of namespace {namespace} already exists and is running (its owner holds {})",
        lock.display()
    )]
    Claimed {
        namespace: String,
        id: String,
        lock: PathBuf,
    },
    #[error("sandbox {id} of namespace {namespace}: its claim {} keeps changing", lock.display())]
    ClaimUnstable {
        namespace: String,
        id: String,
        lock: PathBuf,
    },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sharing {}", path.display())]
    Share {
        path: PathBuf,
        #[source]
        source: crate::mount::MountError,
    },
    #[error("the pod network")]
    Network(#[source] crate::network::NetworkError),
    #[error("the init-data")]
    InitData(#[source] kabuto_initdata::InitDataError),
    #[error("{helper}: {}", program.display())]
    Spawn {
        helper: &'static str,
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{helper} exited with {status}: {log}")]
    HelperExited {
        helper: &'static str,
        status: ExitStatus,
        log: String,
    },
    #[error("{helper}: {} did not appear within {timeout:?}", socket.display())]
    HelperTimeout {
        helper: &'static str,
        socket: PathBuf,
        timeout: Duration,
    },
    #[error("the software TEE needs agent.channel = \"vhost-user-vsock\"")]
    SoftwareTeeChannel,
    #[error(transparent)]
    Measure(#[from] MeasureError),
    #[error(transparent)]
    Firmware(#[from] crate::swtee_service::FirmwareError),
    #[error(
        "guest {what} {} not found: run `kabuto guest build` and `kabuto install`, or set \
         guest.{what} in the config",
        path.display()
    )]
    GuestFile { what: &'static str, path: PathBuf },
    #[error("launching {hypervisor}")]
    Launch {
        hypervisor: &'static str,
        #[source]
        source: crate::hypervisor::HypervisorError,
    },
    #[error(
        "the VM exited ({status}) before the agent answered; qemu: {qemu}; console: {console}"
    )]
    VmExited {
        status: ExitStatus,
        qemu: String,
        console: String,
    },
    /// `last` says what was seen last: no readiness line, or the last
    /// connection error.
    #[error("no answer within {timeout:?} ({last}); console: {console}")]
    AgentTimeout {
        timeout: Duration,
        last: String,
        console: String,
    },
    #[error("internal error: VM handle vanished")]
    VmHandleVanished,
    #[error(transparent)]
    Agent(#[from] crate::agent_client::AgentClientError),
    #[error("{} could not be removed (see the log)", dir.display())]
    NotRemoved { dir: PathBuf },
}

impl BootError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> BootError {
        let path = path.into();
        move |source| BootError::Io { path, source }
    }
}

/// Why a launch measurement could not be computed.
#[derive(Debug, Error)]
pub enum MeasureError {
    #[error("reading the guest {what} {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("confidential.firmware is not set (an OVMF built from edk2's OvmfPkg/AmdSev)")]
    NoFirmware,
    #[error("SNP vCPU model {0:?} is not a known EPYC model")]
    CpuModel(String),
    #[error("SNP guest features")]
    GuestFeatures(#[source] std::io::Error),
    #[error("SNP firmware {}", path.display())]
    Firmware {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("SNP firmware {}: {size} bytes is not an OVMF image (whole 4 KiB pages)", path.display())]
    FirmwareSize { path: PathBuf, size: u64 },
    #[error(
        "SNP firmware {}: not an AmdSev OVMF image (its metadata does not parse)",
        path.display()
    )]
    NotOvmf { path: PathBuf },
    #[error("SNP launch measurement of {}", path.display())]
    Digest {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}
