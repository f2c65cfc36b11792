//! The boundary between a sandbox and the VMM that runs it.
//!
//! A driver turns a [`VmSpec`] into a running [`Vm`]; the sandbox code never
//! sees QEMU arguments. Adding Cloud Hypervisor or a built-in VMM means a new
//! module implementing [`Hypervisor`] and a match arm in [`new_hypervisor`].

pub mod qemu;

use std::{
    path::{Path, PathBuf},
    process::ExitStatus,
    time::Duration,
};

use thiserror::Error;

use crate::config::{Accelerator, HypervisorConfig, HypervisorKind};

#[derive(Debug, Error)]
pub enum HypervisorError {
    #[error("starting {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the pod's network namespace {path}")]
    NetworkNamespace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("waiting for the VM process")]
    Wait(#[source] std::io::Error),
}

/// The accelerator a VM runs with, after `auto` was resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// How the guest's virtio-vsock device is backed on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsockBackend {
    /// The kernel's vhost-vsock (/dev/vhost-vsock); the host connects with
    /// AF_VSOCK to this context id.
    Kernel { guest_cid: u32 },
    /// A vhost-user vsock device daemon listening on this socket.
    VhostUser { socket: PathBuf },
}

/// The TEE a VM is launched in, with the launch data fixed before boot (the
/// init-data digest, fitted to the field; see `kabuto-initdata`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TeeLaunch {
    /// An ordinary VM.
    None,
    /// AMD SEV-SNP: HOST_DATA is part of the signed attestation report; the
    /// firmware (an AmdSev OVMF) adds the kernel, initrd and command line
    /// hashes to the launch measurement; `cpu` is the fixed vCPU model.
    Snp {
        host_data: [u8; 32],
        firmware: PathBuf,
        cpu: String,
    },
    /// Intel TDX: MRCONFIGID is part of the TD report and quote; the TDVF
    /// firmware measures kernel, command line and initrd into RTMR1/2.
    Tdx {
        mrconfigid: [u8; 48],
        firmware: PathBuf,
    },
    /// The software TEE: an ordinary VM; the runtime's simulated firmware
    /// reports this launch data (see `kabuto-swtee`). Insecure.
    Software(kabuto_swtee::LaunchData),
}

/// Everything a driver needs to start one pod VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub id: String,
    /// Private directory for the VM's sockets and logs.
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub accel: Accel,
    /// Guest kernel parameters, without the driver's own.
    pub kernel_params: Vec<String>,
    /// vhost-user-fs socket of the virtio-fs daemon of the shared directory.
    pub shared_fs_socket: PathBuf,
    /// vhost-user-fs socket of the virtio-fs daemon of the root filesystems.
    pub rootfs_fs_socket: PathBuf,
    pub vsock: VsockBackend,
    pub tee: TeeLaunch,
    /// QEMU user-mode networking for the guest (virtio-net).
    pub user_network: bool,
    /// The host network namespace the VMM runs in.
    pub network_namespace: NetworkNamespace,
    /// The pod's NICs: each a tap joined to a CNI interface.
    pub nics: Vec<crate::network::GuestNic>,
}

/// The pod's network namespace, where the VMM runs: the pod's network is
/// what that namespace has (CNI's interfaces; QEMU's user-mode networking
/// reaches what the namespace reaches). ctr's `--cni` configures the
/// namespace of the task's pid — the VMM's — so a VMM left in the host's
/// namespace would have CNI rewire the host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NetworkNamespace {
    /// The host's: the spec names no network namespace (host-network pods,
    /// `ctr run --net-host`).
    #[default]
    Host,
    /// A new, empty one: the spec asks for one without a path (`ctr run`).
    New,
    /// An existing one: the spec's path (CRI's pod network namespace).
    Path(PathBuf),
}

impl NetworkNamespace {
    /// From the OCI spec's `linux.namespaces`.
    pub fn of_spec(spec: &oci_spec::runtime::Spec) -> NetworkNamespace {
        use oci_spec::runtime::LinuxNamespaceType;
        let network = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .and_then(|n| n.iter().find(|n| n.typ() == LinuxNamespaceType::Network));
        match network {
            None => NetworkNamespace::Host,
            Some(n) => match n.path() {
                Some(path) if !path.as_os_str().is_empty() => NetworkNamespace::Path(path.clone()),
                _ => NetworkNamespace::New,
            },
        }
    }
}

impl VmSpec {
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
}

/// A running VM.
pub trait Vm: Send {
    /// Host pid of the VMM process.
    fn pid(&self) -> u32;
    /// `Some` once the VMM process has exited.
    fn try_wait(&mut self) -> Result<Option<ExitStatus>, HypervisorError>;
    /// Asks the VMM to stop, waits up to `grace`, then kills it. Always
    /// reaps the process.
    fn stop(&mut self, grace: Duration) -> Result<ExitStatus, HypervisorError>;
}

pub trait Hypervisor: Send + Sync {
    fn name(&self) -> &'static str;
    fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, HypervisorError>;
}

pub fn new_hypervisor(config: &HypervisorConfig) -> Box<dyn Hypervisor> {
    match config.kind {
        HypervisorKind::Qemu => Box::new(qemu::Qemu::new(config)),
    }
}

/// Resolves the configured accelerator and says why.
pub fn choose_accelerator(configured: Accelerator) -> (Accel, String) {
    match configured {
        Accelerator::Kvm => (Accel::Kvm, "kvm (forced in config)".into()),
        Accelerator::Tcg => (Accel::Tcg, "tcg (forced in config)".into()),
        Accelerator::Auto => {
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            match kvm_usable(Path::new("/dev/kvm"), &cpuinfo) {
                Ok(()) => (Accel::Kvm, "kvm (/dev/kvm usable, CPU has VMX/SVM)".into()),
                Err(why) => (
                    Accel::Tcg,
                    format!("tcg (software emulation): {}", kabuto_error::chain(&why)),
                ),
            }
        }
    }
}

/// Why KVM is not used.
#[derive(Debug, Error)]
pub enum KvmUnusable {
    #[error("the CPU has no vmx/svm flag")]
    NoHardwareVirtualization,
    #[error("cannot open {}", path.display())]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// KVM is worth using only with hardware virtualization: a paravirtual
/// /dev/kvm without VMX/SVM runs guests far slower than TCG.
pub fn kvm_usable(dev: &Path, cpuinfo: &str) -> Result<(), KvmUnusable> {
    let has_hw_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !has_hw_virt {
        return Err(KvmUnusable::NoHardwareVirtualization);
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map(|_| ())
        .map_err(|source| KvmUnusable::Open {
            path: dev.to_path_buf(),
            source,
        })
}

/// The host TSC frequency in kHz, which microvm guests under TCG need on the
/// kernel command line (`tsc_early_khz`) or about 40% of boots hang while
/// calibrating.
pub fn host_tsc_khz(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(namespaces: &str) -> oci_spec::runtime::Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion":"1.0.2","linux":{{"namespaces":{namespaces}}}}}"#
        ))
        .expect("spec")
    }

    #[test]
    fn the_vmm_runs_in_the_network_namespace_the_spec_names() {
        assert_eq!(
            NetworkNamespace::of_spec(&spec_with(r#"[{"type":"pid"},{"type":"mount"}]"#)),
            NetworkNamespace::Host
        );
        assert_eq!(
            NetworkNamespace::of_spec(&spec_with(r#"[{"type":"network"}]"#)),
            NetworkNamespace::New
        );
        assert_eq!(
            NetworkNamespace::of_spec(&spec_with(
                r#"[{"type":"network","path":"/var/run/netns/cni-1"}]"#
            )),
            NetworkNamespace::Path("/var/run/netns/cni-1".into())
        );
    }

    #[test]
    fn kvm_needs_hardware_virtualization() {
        let err = kvm_usable(Path::new("/dev/null"), "flags\t: fpu sse hypervisor\n")
            .expect_err("no vmx/svm")
            .to_string();
        assert!(err.contains("vmx/svm"), "{err}");
        let err = kvm_usable(Path::new("/nonexistent/kvm"), "flags\t: fpu svm\n")
            .expect_err("missing device")
            .to_string();
        assert!(err.contains("/nonexistent/kvm"), "{err}");
        kvm_usable(Path::new("/dev/null"), "flags\t: fpu vmx\n").expect("usable");
    }

    #[test]
    fn forced_accelerators_are_honoured() {
        assert_eq!(choose_accelerator(Accelerator::Tcg).0, Accel::Tcg);
        assert_eq!(choose_accelerator(Accelerator::Kvm).0, Accel::Kvm);
    }

    #[test]
    fn reads_tsc_frequency() {
        let cpuinfo = "processor\t: 0\ncpu MHz\t\t: 2445.428\n";
        assert_eq!(host_tsc_khz(cpuinfo), Some(2_445_428));
        assert_eq!(host_tsc_khz("nothing"), None);
    }
}
