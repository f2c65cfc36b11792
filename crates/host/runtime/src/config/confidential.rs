//! `[confidential]`: the TEE, its firmware and where images are pulled.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

/// Confidential pods: the TEE their VMs launch in. A containerd runtime
/// handler with its own config file (runtime options `ConfigPath`) makes a
/// confidential runtime class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfidentialConfig {
    /// `none`, `snp`, `tdx`, or `software` — the insecure software TEE for
    /// hosts without TEE hardware (testing only; a KBS accepts its evidence
    /// only when the owner trusts its root explicitly).
    pub tee: TeeKind,
    /// The software TEE's firmware key and certificates (`kabuto install`
    /// creates them).
    pub software_tee_dir: PathBuf,
    /// Where container images are pulled: `host` (containerd's snapshots,
    /// shared into the guest) or `guest` (the agent pulls, verifies,
    /// decrypts and unpacks the image itself; the host passes only its
    /// reference and never sees the plaintext). `guest` needs
    /// `hypervisor.guest_network = "user"`.
    pub image_pull: ImagePull,
    /// How long a CreateContainer that pulls its image in the guest may
    /// take (pull, verify, decrypt, unpack).
    #[serde(rename = "image_pull_timeout_secs", with = "super::secs")]
    pub image_pull_timeout: Duration,
    /// The guest firmware of SNP and TDX launches (`-bios`): for SNP an
    /// OVMF built from edk2's `OvmfPkg/AmdSev` (it measures the kernel,
    /// initrd and command line: QEMU's `kernel-hashes=on`), for TDX a TDVF.
    /// Debian 12's `ovmf` package has neither; required for `snp`/`tdx`.
    pub firmware: PathBuf,
    /// The vCPU model of SNP guests (`-cpu`): its CPUID signature is part of
    /// every vCPU's measured VMSA, so it is fixed rather than `host`.
    pub snp_cpu: String,
    /// SEV features of SNP guests' VMSAs (bit 0 SNPActive; QEMU's default
    /// is 0x1). Part of the launch measurement.
    pub snp_guest_features: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImagePull {
    Host,
    Guest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TeeKind {
    None,
    Snp,
    Tdx,
    Software,
    /// CoCo's sample attester in the guest: no TEE at all, for interop
    /// tests with CoCo's KBS. The guest also needs its init-data to allow
    /// it. Built only with the software-tee feature, like the software TEE.
    Sample,
}

impl TeeKind {
    /// The value of the `kabuto.tee=` kernel parameter.
    pub fn kernel_param(self) -> Option<&'static str> {
        match self {
            TeeKind::None => None,
            TeeKind::Snp => Some("snp"),
            TeeKind::Tdx => Some("tdx"),
            TeeKind::Software => Some("software"),
            TeeKind::Sample => Some("sample"),
        }
    }
}

/// Why `tee = "software"` is refused by a production build.
pub const SOFTWARE_TEE_NOT_BUILT: &str =
    "confidential.tee = \"software\" needs a kabuto built with the \
     software-tee feature (scripts/setup.sh builds one for tests); a production build has no \
     software TEE: the host would sign its own attestation reports";

/// Why `tee = "sample"` is refused by a production build.
pub const SAMPLE_NOT_BUILT: &str =
    "confidential.tee = \"sample\" (CoCo's sample attester, no TEE) needs a kabuto built with \
     the software-tee feature; a production build has no insecure TEE kinds";

/// Where `kabuto install` creates the software TEE's key material.
pub const DEFAULT_SOFTWARE_TEE_DIR: &str = "/var/lib/kabuto/swtee";

impl Default for ConfidentialConfig {
    fn default() -> Self {
        ConfidentialConfig {
            tee: TeeKind::None,
            software_tee_dir: PathBuf::from(DEFAULT_SOFTWARE_TEE_DIR),
            image_pull: ImagePull::Host,
            image_pull_timeout: Duration::from_secs(1200),
            firmware: PathBuf::new(),
            snp_cpu: "EPYC-v4".into(),
            snp_guest_features: 1,
        }
    }
}
