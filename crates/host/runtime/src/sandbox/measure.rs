//! What a sandbox's launch measures, computed from the config without
//! booting: the kernel parameters kabuto sets, the software TEE's
//! MEASUREMENT and the SNP launch digest (the reference values owners
//! register at their KBS).

use std::fs;
use std::path::Path;

use kabuto_protocol::{KERNEL_PARAM_NET, KERNEL_PARAM_TEE};

use super::error::MeasureError;
use crate::config::{Config, GuestNetwork, MachineType};
use crate::hypervisor::Accel;

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
pub fn software_tee_measurement(config: &Config) -> Result<[u8; 48], MeasureError> {
    let read = |what: &'static str, path: &Path| {
        fs::read(path).map_err(|source| MeasureError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })
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
pub fn snp_launch_measurement(config: &Config) -> Result<[u8; 48], MeasureError> {
    let c = &config.confidential;
    if c.firmware.as_os_str().is_empty() {
        return Err(MeasureError::NoFirmware);
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
pub fn snp_measurement(inputs: &SnpLaunchInputs<'_>) -> Result<[u8; 48], MeasureError> {
    use sev::measurement::snp::{snp_calc_launch_digest, SnpMeasurementArgs};
    use sev::measurement::vmsa::{GuestFeatures, VMMType};
    use sev::parser::ByteParser;
    let cpu =
        snp_cpu_type(inputs.cpu).ok_or_else(|| MeasureError::CpuModel(inputs.cpu.to_string()))?;
    let features = GuestFeatures::from_bytes(&inputs.guest_features.to_le_bytes())
        .map_err(MeasureError::GuestFeatures)?;
    let firmware = inputs.firmware.to_path_buf();
    // The sev crate's OVMF parser indexes from the file's end and panics on
    // short files; OVMF images are whole pages.
    let size = fs::metadata(inputs.firmware)
        .map_err(|source| MeasureError::Firmware {
            path: firmware.clone(),
            source,
        })?
        .len();
    if size < 4096 || size % 4096 != 0 {
        return Err(MeasureError::FirmwareSize {
            path: firmware,
            size,
        });
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
        .map_err(|_| MeasureError::NotOvmf {
            path: firmware.clone(),
        })?
        .map_err(|e| MeasureError::Digest {
            path: firmware.clone(),
            source: Box::new(e),
        })?;
    let bytes = digest.to_bytes().map_err(|e| MeasureError::Digest {
        path: firmware,
        source: Box::new(e),
    })?;
    let mut out = [0u8; 48];
    out.copy_from_slice(bytes.as_ref());
    Ok(out)
}

/// A digest fitted to a TEE field of `N` bytes (see `kabuto_initdata::fit_digest`).
pub(super) fn fit<const N: usize>(digest: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&kabuto_initdata::fit_digest(digest, N));
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::TeeKind;
    use std::path::PathBuf;

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
            .to_string()
            .contains("not an OVMF image"));
        let plain = dir.path().join("plain.fd");
        fs::write(&plain, vec![0u8; 8192]).unwrap();
        config.confidential.firmware = plain;
        assert!(snp_launch_measurement(&config).is_err());
        config.confidential.snp_cpu = "Skylake".into();
        assert!(snp_launch_measurement(&config)
            .unwrap_err()
            .to_string()
            .contains("EPYC"));
    }
}
