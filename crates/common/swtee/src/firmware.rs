//! The signing side: chain generation and the simulated firmware.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};
use sha2::{Digest, Sha384};

use crate::*;

const ROOT_CERT_FILE: &str = "root.crt";
const FIRMWARE_CERT_FILE: &str = "firmware.crt";
const FIRMWARE_KEY_FILE: &str = "firmware.key";

// Offsets in the SNP report (AMD SEV-SNP ABI spec, table "ATTESTATION_REPORT").
const OFF_VERSION: usize = 0x00;
const OFF_POLICY: usize = 0x08;
const OFF_SIG_ALGO: usize = 0x34;
const OFF_CURRENT_TCB: usize = 0x38;
const OFF_REPORT_DATA: usize = 0x50;
const OFF_MEASUREMENT: usize = 0x90;
const OFF_HOST_DATA: usize = 0xC0;
const OFF_REPORT_ID: usize = 0x140;
const OFF_REPORTED_TCB: usize = 0x180;
const OFF_CPUID: usize = 0x188;
const OFF_CHIP_ID: usize = 0x1A0;
const OFF_COMMITTED_TCB: usize = 0x1E0;
const OFF_CURRENT_VERSION: usize = 0x1E8;
const OFF_COMMITTED_VERSION: usize = 0x1EC;
const OFF_LAUNCH_TCB: usize = 0x1F0;
const OFF_SIG_R: usize = 0x2A0;
const OFF_SIG_S: usize = 0x2E8;

/// Report version we emit (3: with CPUID fields).
const REPORT_VERSION: u32 = 3;
/// SIG_ALGO 1 = ECDSA P-384 with SHA-384.
const SIG_ALGO_ECDSA_P384: u32 = 1;
/// Guest policy: ABI 0.0, SMT allowed (bit 16), reserved bit 17 set, debug off.
const GUEST_POLICY: u64 = 0x3_0000;
/// A Genoa-family CPUID so report parsers pick the Genoa TCB layout.
const CPUID_FAMILY: u8 = 0x19;
const CPUID_MODEL: u8 = 0x11;
const CPUID_STEPPING: u8 = 0x01;
/// TCB in the Genoa layout: bootloader, tee, 4 reserved, snp, microcode.
const SOFTWARE_TCB: [u8; 8] = [0x09, 0x00, 0, 0, 0, 0, 0x17, 0x48];

/// Creates a fresh root and firmware key pair in `dir` (0700). The root's
/// private key is discarded: the chain can sign reports but never be
/// extended.
pub fn init(dir: &Path) -> Result<()> {
    let io = |source| SwteeError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    if dir.join(FIRMWARE_KEY_FILE).exists() {
        return Err(SwteeError::Exists(dir.to_path_buf()));
    }
    fs::create_dir_all(dir).map_err(io)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
    let key_err = |e: rcgen::Error| SwteeError::Key(e.to_string());

    let root_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).map_err(key_err)?;
    let mut root_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(key_err)?;
    root_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ROOT_COMMON_NAME);
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    root_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut root_params);
    let root_cert = root_params.self_signed(&root_key).map_err(key_err)?;

    let fw_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).map_err(key_err)?;
    let mut fw_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(key_err)?;
    fw_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "kabuto software TEE firmware (INSECURE)",
    );
    fw_params.is_ca = rcgen::IsCa::ExplicitNoCa;
    fw_params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    set_validity(&mut fw_params);
    let fw_cert = fw_params
        .signed_by(&fw_key, &root_cert, &root_key)
        .map_err(key_err)?;

    write_file(dir, ROOT_CERT_FILE, root_cert.pem().as_bytes(), 0o644)?;
    write_file(dir, FIRMWARE_CERT_FILE, fw_cert.pem().as_bytes(), 0o644)?;
    write_file(
        dir,
        FIRMWARE_KEY_FILE,
        fw_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    Ok(())
}

fn set_validity(params: &mut rcgen::CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
}

fn write_file(dir: &Path, name: &str, contents: &[u8], mode: u32) -> Result<()> {
    let io = |source| SwteeError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(mode)
        .open(dir.join(name))
        .map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)
}

/// The path of the root certificate an owner must explicitly trust.
pub fn root_cert_path(dir: &Path) -> PathBuf {
    dir.join(ROOT_CERT_FILE)
}

/// Decodes the first PEM certificate in `pem` to DER.
pub fn pem_to_der(pem_text: &[u8]) -> Result<Vec<u8>> {
    let parsed = pem::parse(pem_text).map_err(|e| SwteeError::Key(format!("PEM: {e}")))?;
    if parsed.tag() != "CERTIFICATE" {
        return Err(SwteeError::Key(format!(
            "expected a CERTIFICATE PEM block, found {}",
            parsed.tag()
        )));
    }
    Ok(parsed.into_contents())
}

/// The simulated firmware: signs reports for guests.
pub struct Firmware {
    key: EcdsaKeyPair,
    rng: aws_lc_rs::rand::SystemRandom,
    firmware_cert_der: Vec<u8>,
    root_cert_der: Vec<u8>,
}

impl Firmware {
    pub fn load(dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            fs::read(dir.join(name)).map_err(|source| SwteeError::Io {
                dir: dir.to_path_buf(),
                source,
            })
        };
        let key_pem = String::from_utf8(read(FIRMWARE_KEY_FILE)?)
            .map_err(|_| SwteeError::Key("firmware.key is not UTF-8 PEM".into()))?;
        let key_der = pem::parse(key_pem.as_bytes())
            .map_err(|e| SwteeError::Key(format!("firmware.key: {e}")))?
            .into_contents();
        let rng = aws_lc_rs::rand::SystemRandom::new();
        // aws-lc signs P-384 several times faster than ring or p384 here.
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &key_der)
            .map_err(|e| SwteeError::Key(format!("firmware.key: {e}")))?;
        Ok(Firmware {
            key,
            rng,
            firmware_cert_der: pem_to_der(&read(FIRMWARE_CERT_FILE)?)?,
            root_cert_der: pem_to_der(&read(ROOT_CERT_FILE)?)?,
        })
    }

    /// A signed SNP-format report carrying `report_data` and the launch data.
    pub fn report(&self, launch: &LaunchData, report_data: &[u8; 64]) -> Result<Vec<u8>> {
        let mut r = vec![0u8; REPORT_LEN];
        put(&mut r, OFF_VERSION, &REPORT_VERSION.to_le_bytes());
        put(&mut r, OFF_POLICY, &GUEST_POLICY.to_le_bytes());
        put(&mut r, OFF_SIG_ALGO, &SIG_ALGO_ECDSA_P384.to_le_bytes());
        for off in [
            OFF_CURRENT_TCB,
            OFF_REPORTED_TCB,
            OFF_COMMITTED_TCB,
            OFF_LAUNCH_TCB,
        ] {
            put(&mut r, off, &SOFTWARE_TCB);
        }
        put(&mut r, OFF_REPORT_DATA, report_data);
        put(&mut r, OFF_MEASUREMENT, &launch.measurement);
        put(&mut r, OFF_HOST_DATA, &launch.host_data);
        let report_id: [u8; 32] = Sha384::digest(self.key.public_key().as_ref())[..32]
            .try_into()
            .unwrap_or([0; 32]);
        put(&mut r, OFF_REPORT_ID, &report_id);
        put(
            &mut r,
            OFF_CPUID,
            &[CPUID_FAMILY, CPUID_MODEL, CPUID_STEPPING],
        );
        // CHIP_ID: a label, so a software report is recognisable at a glance.
        let mut chip_id = [0u8; 64];
        chip_id[..13].copy_from_slice(b"kabuto-swtee\0");
        put(&mut r, OFF_CHIP_ID, &chip_id);
        put(&mut r, OFF_CURRENT_VERSION, &[0x37, 0x01, 0x01]);
        put(&mut r, OFF_COMMITTED_VERSION, &[0x37, 0x01, 0x01]);

        let signature = self
            .key
            .sign(&self.rng, &r[..SIGNED_LEN])
            .map_err(|_| SwteeError::Key("signing the report failed".into()))?;
        // FIXED encoding: r then s, 48 bytes each, big-endian.
        let (sig_r, sig_s) = signature.as_ref().split_at(48);
        // The report stores r and s little-endian in 72-byte fields.
        let mut le = [0u8; 72];
        for (dst, src) in le.iter_mut().zip(sig_r.iter().rev()) {
            *dst = *src;
        }
        put(&mut r, OFF_SIG_R, &le);
        le = [0u8; 72];
        for (dst, src) in le.iter_mut().zip(sig_s.iter().rev()) {
            *dst = *src;
        }
        put(&mut r, OFF_SIG_S, &le);
        Ok(r)
    }

    pub fn firmware_cert_der(&self) -> &[u8] {
        &self.firmware_cert_der
    }

    pub fn root_cert_der(&self) -> &[u8] {
        &self.root_cert_der
    }

    /// Answers one guest request on `stream`: reads 64 bytes of report data,
    /// writes report, firmware certificate and root certificate.
    pub fn serve_one(&self, launch: &LaunchData, stream: &mut (impl Read + Write)) -> Result<()> {
        let wire = |e: std::io::Error| SwteeError::Wire(e.to_string());
        let mut report_data = [0u8; 64];
        stream.read_exact(&mut report_data).map_err(wire)?;
        let report = self.report(launch, &report_data)?;
        for blob in [
            report.as_slice(),
            self.firmware_cert_der.as_slice(),
            self.root_cert_der.as_slice(),
        ] {
            stream
                .write_all(&(blob.len() as u32).to_le_bytes())
                .map_err(wire)?;
            stream.write_all(blob).map_err(wire)?;
        }
        stream.flush().map_err(wire)
    }
}

fn put(report: &mut [u8], offset: usize, bytes: &[u8]) {
    report[offset..offset + bytes.len()].copy_from_slice(bytes);
}
