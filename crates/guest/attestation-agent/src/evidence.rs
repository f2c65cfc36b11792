//! Evidence providers: where a guest gets a signed statement from its TEE.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use kbs_types::Tee;
use sev::firmware::guest::AttestationReport;
use sev::firmware::host::{CertTableEntry, CertType};
use sev::parser::ByteParser;

use crate::AttestError;

/// The configfs-tsm report interface (Linux >= 6.7): SNP and TDX alike.
pub const TSM_REPORT_DIR: &str = "/sys/kernel/config/tsm/report";
pub const SEV_GUEST_DEVICE: &str = "/dev/sev-guest";

/// A source of TEE evidence binding up to 64 bytes of report data.
pub trait EvidenceProvider: Send + Sync {
    /// The `tee` announced in the KBS request.
    fn tee(&self) -> Tee;
    /// The KBS protocol's `primary_evidence` for `report_data`.
    fn evidence(&self, report_data: &[u8]) -> Result<serde_json::Value, AttestError>;
    /// For logs.
    fn describe(&self) -> String;
}

/// The TEE a confidential pod asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TeeKind {
    Snp,
    Tdx,
    /// Insecure by construction; only when explicitly configured.
    SoftwareTee,
    /// CoCo's sample attester: no TEE at all, evidence anyone can forge.
    /// For interop tests with CoCo's KBS; the agent uses it only when the
    /// owner's init-data allows it (never as a fallback).
    Sample,
}

impl std::str::FromStr for TeeKind {
    type Err = AttestError;
    fn from_str(s: &str) -> Result<Self, AttestError> {
        match s {
            "snp" | "amd-sev-snp" => Ok(TeeKind::Snp),
            "tdx" | "intel-tdx" => Ok(TeeKind::Tdx),
            "software" | "software-tee" => Ok(TeeKind::SoftwareTee),
            "sample" => Ok(TeeKind::Sample),
            other => Err(AttestError::NoTee(format!(
                "unknown TEE kind {other:?} (snp, tdx, software, sample)"
            ))),
        }
    }
}

/// Opens a connection to the software-TEE firmware (vsock in a guest).
pub type Connector = Box<dyn Fn() -> std::io::Result<Box<dyn ReadWrite>> + Send + Sync>;

pub trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

/// The provider for `kind`, or an error naming what is missing. Never falls
/// back to a different kind of evidence.
pub fn provider(
    kind: TeeKind,
    software_tee: Option<Connector>,
) -> Result<Box<dyn EvidenceProvider>, AttestError> {
    match kind {
        TeeKind::Snp => {
            if Path::new(SEV_GUEST_DEVICE).exists() {
                Ok(Box::new(SnpDevice))
            } else if tsm_provider().as_deref() == Some("sev_guest") {
                Ok(Box::new(Tsm { tee: Tee::Snp }))
            } else {
                Err(AttestError::NoTee(format!(
                    "SEV-SNP was requested but this guest has neither {SEV_GUEST_DEVICE} nor a configfs-tsm sev_guest provider"
                )))
            }
        }
        TeeKind::Tdx => {
            if tsm_provider().as_deref() == Some("tdx_guest") {
                Ok(Box::new(Tsm { tee: Tee::Tdx }))
            } else {
                Err(AttestError::NoTee(
                    "TDX was requested but this guest has no configfs-tsm tdx_guest provider"
                        .into(),
                ))
            }
        }
        TeeKind::SoftwareTee => match software_tee {
            Some(connect) => Ok(Box::new(SoftwareTee { connect })),
            None => Err(AttestError::NoTee(
                "the software TEE was requested but no firmware channel is configured".into(),
            )),
        },
        TeeKind::Sample => Ok(Box::new(SampleAttester)),
    }
}

fn snp_evidence(
    report: &[u8],
    certs: Option<Vec<CertTableEntry>>,
) -> Result<serde_json::Value, AttestError> {
    let parsed = AttestationReport::from_bytes(report)
        .map_err(|e| AttestError::Evidence(format!("SNP report: {e}")))?;
    Ok(serde_json::json!({
        "attestation_report": parsed,
        "cert_chain": certs,
    }))
}

fn fit64(report_data: &[u8]) -> Result<[u8; 64], AttestError> {
    if report_data.len() > 64 {
        return Err(AttestError::Evidence(format!(
            "report data of {} bytes (at most 64)",
            report_data.len()
        )));
    }
    let mut out = [0u8; 64];
    out[..report_data.len()].copy_from_slice(report_data);
    Ok(out)
}

/// SEV-SNP through the sev-guest driver's ioctl.
struct SnpDevice;

impl EvidenceProvider for SnpDevice {
    fn tee(&self) -> Tee {
        Tee::Snp
    }
    fn evidence(&self, report_data: &[u8]) -> Result<serde_json::Value, AttestError> {
        let data = fit64(report_data)?;
        let mut fw = sev::firmware::guest::Firmware::open()
            .map_err(|e| AttestError::Evidence(format!("{SEV_GUEST_DEVICE}: {e}")))?;
        let (report, certs) = fw
            .get_ext_report(None, Some(data), Some(0))
            .map_err(|e| AttestError::Evidence(format!("SNP_GET_EXT_REPORT: {e}")))?;
        snp_evidence(&report, certs)
    }
    fn describe(&self) -> String {
        format!("AMD SEV-SNP ({SEV_GUEST_DEVICE})")
    }
}

fn tsm_provider() -> Option<String> {
    // The provider is only visible inside a report entry; probe with one.
    let entry = TsmEntry::create().ok()?;
    let provider = std::fs::read_to_string(entry.0.join("provider")).ok();
    provider.map(|p| p.trim().to_string())
}

/// A configfs-tsm report entry, removed on drop.
struct TsmEntry(PathBuf);

impl TsmEntry {
    fn create() -> std::io::Result<Self> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = Path::new(TSM_REPORT_DIR).join(format!("kabuto-{}-{n}", std::process::id()));
        std::fs::create_dir(&path)?;
        Ok(TsmEntry(path))
    }
}

impl Drop for TsmEntry {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The ACPI CCEL table's data: the TD's event log.
const CCEL_PATH: &str = "/sys/firmware/acpi/tables/data/CCEL";

/// SNP or TDX through configfs-tsm.
struct Tsm {
    tee: Tee,
}

impl EvidenceProvider for Tsm {
    fn tee(&self) -> Tee {
        self.tee
    }
    fn evidence(&self, report_data: &[u8]) -> Result<serde_json::Value, AttestError> {
        let data = fit64(report_data)?;
        let io = |what: &str, e: std::io::Error| {
            AttestError::Evidence(format!("configfs-tsm {what}: {e}"))
        };
        let entry = TsmEntry::create().map_err(|e| io("mkdir", e))?;
        std::fs::write(entry.0.join("inblob"), data).map_err(|e| io("inblob", e))?;
        let out = std::fs::read(entry.0.join("outblob")).map_err(|e| io("outblob", e))?;
        match self.tee {
            Tee::Tdx => {
                // The firmware's event log, for the verifier to replay
                // against the quote's RTMRs (absent without UEFI firmware).
                let b64 = base64::engine::general_purpose::STANDARD;
                let ccel = std::fs::read(CCEL_PATH).ok().map(|log| b64.encode(log));
                Ok(serde_json::json!({
                    "cc_eventlog": ccel,
                    "quote": b64.encode(out),
                    "aa_eventlog": null,
                }))
            }
            _ => {
                let certs = std::fs::read(entry.0.join("auxblob"))
                    .ok()
                    .filter(|b| !b.is_empty())
                    .and_then(|mut b| CertTableEntry::vec_bytes_to_cert_table(&mut b).ok());
                snp_evidence(&out, certs)
            }
        }
    }
    fn describe(&self) -> String {
        format!("{} (configfs-tsm)", self.tee)
    }
}

/// CoCo's sample attester, in its evidence format: `{"svn": "1",
/// "report_data": base64(report data)}` (the digest unpadded). No TEE signs
/// it; a KBS takes it only when its owner turned that on.
pub struct SampleAttester;

impl EvidenceProvider for SampleAttester {
    fn tee(&self) -> Tee {
        Tee::Sample
    }
    fn evidence(&self, report_data: &[u8]) -> Result<serde_json::Value, AttestError> {
        Ok(serde_json::json!({
            "svn": "1",
            "report_data": base64::engine::general_purpose::STANDARD.encode(report_data),
        }))
    }
    fn describe(&self) -> String {
        "CoCo sample attester (no TEE, INSECURE)".into()
    }
}

/// The kabuto software TEE: SNP-format reports from the host's simulated
/// firmware. The verifier accepts them only under explicit trust.
struct SoftwareTee {
    connect: Connector,
}

impl EvidenceProvider for SoftwareTee {
    fn tee(&self) -> Tee {
        Tee::Snp
    }
    fn evidence(&self, report_data: &[u8]) -> Result<serde_json::Value, AttestError> {
        let data = fit64(report_data)?;
        let mut stream = (self.connect)()
            .map_err(|e| AttestError::Evidence(format!("software-TEE firmware: {e}")))?;
        stream
            .write_all(&data)
            .map_err(|e| AttestError::Evidence(format!("software-TEE firmware: {e}")))?;
        let reply = kabuto_swtee::read_reply(&mut stream)
            .map_err(|e| AttestError::Evidence(e.to_string()))?;
        snp_evidence(
            &reply.report,
            Some(vec![
                CertTableEntry::new(CertType::VCEK, reply.firmware_cert_der),
                CertTableEntry::new(CertType::ARK, reply.root_cert_der),
            ]),
        )
    }
    fn describe(&self) -> String {
        "kabuto software TEE (INSECURE)".into()
    }
}
