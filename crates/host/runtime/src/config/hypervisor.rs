//! `[hypervisor]` and `[guest]`: the VMM, the VM's shape and the guest's kernel.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::DEFAULT_GUEST_DIR;

/// Which hypervisor runs the pod VMs and how big they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HypervisorConfig {
    /// The VMM driver. Only `qemu` exists today.
    pub kind: HypervisorKind,
    /// Path of the QEMU system emulator.
    pub qemu_path: PathBuf,
    /// `auto` picks KVM when /dev/kvm is usable and the CPU has VMX or SVM,
    /// TCG (software emulation) otherwise. `kvm` or `tcg` forces one.
    pub accelerator: Accelerator,
    /// QEMU machine type: `microvm` (fastest boot) or `q35`.
    pub machine: MachineType,
    /// Virtual CPUs per pod VM.
    pub vcpus: u32,
    /// Guest memory per pod VM, in MiB.
    pub memory_mib: u32,
    /// Extra kernel command-line parameters, appended after kabuto's own.
    pub kernel_params: String,
    /// Keep a debug shell reachable with `kabuto exec <pod>`. Off by
    /// default: it gives whoever controls the host a shell in the guest.
    pub debug_console: bool,
    /// `none`, or `user`: QEMU user-mode networking (NAT, no host setup) so
    /// the guest itself reaches a KBS or registry; the host is 10.0.2.2.
    /// Containers still get only the network their pod asks for.
    pub guest_network: GuestNetwork,
    /// Give a pod that asks for a new network namespace (`ctr run`, not
    /// CRI: CRI names the pod's) one NIC at boot for the interface CNI may
    /// add between create and start (`ctr run --cni`). Not in confidential
    /// pods (their network is fixed at boot) nor with `guest_network =
    /// "user"`. Costs the virtio-net driver's probe at boot.
    pub reserve_nic: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestNetwork {
    None,
    User,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HypervisorKind {
    Qemu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Accelerator {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MachineType {
    Microvm,
    Q35,
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        HypervisorConfig {
            kind: HypervisorKind::Qemu,
            qemu_path: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            accelerator: Accelerator::Auto,
            machine: MachineType::Microvm,
            vcpus: 1,
            memory_mib: 512,
            kernel_params: String::new(),
            debug_console: false,
            guest_network: GuestNetwork::None,
            reserve_nic: true,
        }
    }
}

/// The guest image built by `kabuto guest build`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestConfig {
    /// Uncompressed kernel (PVH entry) for microvm, or bzImage for q35.
    pub kernel: PathBuf,
    /// Initramfs whose /init is kabuto-agent.
    pub initramfs: PathBuf,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            kernel: Path::new(DEFAULT_GUEST_DIR).join("vmlinux"),
            initramfs: Path::new(DEFAULT_GUEST_DIR).join("initramfs.cpio"),
        }
    }
}
