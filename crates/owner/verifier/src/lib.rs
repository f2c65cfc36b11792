//! Evidence → claims. Each TEE has its own module; [`Verifier::verify`]
//! dispatches on the KBS protocol's `tee` and checks the bindings every
//! platform shares (report data, init-data digest).

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use kabuto_initdata::fit_digest;
pub use kbs_types::Tee;
use serde::Serialize;

pub mod eventlog;
pub mod snp;
pub mod tdx;

pub use dcap_qvl::QuoteCollateralV3;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("malformed evidence: {0}")]
    Malformed(String),
    #[error("unsupported evidence: {0}")]
    Unsupported(String),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("certificate chain: {0}")]
    UntrustedChain(String),
    #[error("signature: {0}")]
    Signature(String),
    #[error("TCB: the certificate's {field} SVN is {certificate} but the report's reported TCB says {report}")]
    TcbMismatch {
        field: &'static str,
        certificate: u8,
        report: u8,
    },
    #[error("chip id: the VCEK's hwID does not match the report's CHIP_ID")]
    ChipIdMismatch,
    #[error("report data: evidence carries {found}, expected {expected} (nonce or tee-pubkey not bound)")]
    ReportDataMismatch { expected: String, found: String },
    #[error("init-data: the TEE's {field} is {found}, but the digest of the init-data sent is {expected}")]
    InitDataMismatch {
        field: &'static str,
        expected: String,
        found: String,
    },
    #[error("TDX quote: {0}")]
    Tdx(String),
    #[error("TDX event log: {0}")]
    EventLog(crate::eventlog::EventLogError),
    #[error("software TEE evidence refused: its root is not among the trusted software-TEE roots (it is insecure by construction; trust it explicitly to use it)")]
    SoftwareTeeNotTrusted,
    #[error("sample evidence refused: accept it explicitly (insecure, for testing)")]
    SampleNotAccepted,
    #[error("TEE {0} is not supported by this verifier")]
    UnsupportedTee(String),
}

impl VerifyError {
    /// A short machine-readable name of the failed check.
    pub fn check(&self) -> &'static str {
        match self {
            VerifyError::Malformed(_) => "evidence-format",
            VerifyError::Unsupported(_) => "evidence-version",
            VerifyError::Certificate(_) => "certificate",
            VerifyError::UntrustedChain(_) => "certificate-chain",
            VerifyError::Signature(_) => "signature",
            VerifyError::TcbMismatch { .. } => "tcb",
            VerifyError::ChipIdMismatch => "chip-id",
            VerifyError::ReportDataMismatch { .. } => "report-data",
            VerifyError::InitDataMismatch { .. } => "init-data",
            VerifyError::Tdx(_) => "tdx-quote",
            VerifyError::EventLog(_) => "tdx-eventlog",
            VerifyError::SoftwareTeeNotTrusted => "software-tee-trust",
            VerifyError::SampleNotAccepted => "sample-trust",
            VerifyError::UnsupportedTee(_) => "tee",
        }
    }
}

pub type Result<T> = std::result::Result<T, VerifyError>;

/// What the verifier trusts beyond the pinned vendor roots.
#[derive(Clone, Default)]
pub struct TrustAnchors {
    /// Software-TEE roots (DER) the owner explicitly trusts. Empty: refused.
    pub software_tee_roots: Vec<Vec<u8>>,
    /// Accept CoCo's `sample` evidence (no hardware at all).
    pub accept_sample: bool,
    /// DCAP collateral for TDX quotes (offline; no PCS access).
    pub tdx_collateral: Option<QuoteCollateralV3>,
    /// AMD ASK / ASVK certificates (DER) the owner fetched from AMD's KDS
    /// (`https://kdsintf.amd.com/vlek/v1/{Milan,Genoa,Turin}/cert_chain`):
    /// VLEK reports need the ASVK, which SNP evidence usually lacks. Not
    /// trusted by themselves: each is used only if the pinned ARK signed it.
    pub amd_certs: Vec<Vec<u8>>,
}

/// Which kind of platform produced the evidence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Platform {
    AmdSevSnp,
    IntelTdx,
    SoftwareTee,
    Sample,
    /// CoCo's `sample_device` attester: a stand-in for a device (GPU)
    /// beside the CPU's TEE, sent as additional evidence.
    SampleDevice,
}

impl Platform {
    /// CoCo's sample attesters: no TEE at all.
    fn is_sample(self) -> bool {
        matches!(self, Platform::Sample | Platform::SampleDevice)
    }
}

/// Verified claims. Serialized as the `input.claims` of appraisal policies.
#[derive(Clone, Debug, Serialize)]
pub struct Claims {
    pub platform: Platform,
    /// True for the software TEE and sample evidence.
    pub insecure: bool,
    /// REPORT_DATA (hex).
    pub report_data: String,
    /// The launch-time data the host fixed: SNP HOST_DATA, TDX MRCONFIGID (hex).
    pub init_data: String,
    /// SNP MEASUREMENT or TDX MRTD (hex).
    pub measurement: String,
    /// Whether the guest can be debugged (SNP policy DEBUG, TDX attribute).
    pub debug: bool,
    /// Platform TCB facts (versions, status).
    pub tcb: serde_json::Value,
    /// Everything else the evidence states, per platform.
    pub details: serde_json::Value,
}

/// What the relying party expects the evidence to be bound to.
#[derive(Clone, Copy, Default)]
pub struct Expected<'a> {
    /// The digest of the runtime data (nonce, key); zero-padded to compare.
    pub report_data: Option<&'a [u8]>,
    /// The init-data digest the guest presented; zero-padded / truncated to
    /// the platform's field.
    pub init_data: Option<&'a [u8]>,
}

pub struct Verifier {
    anchors: TrustAnchors,
    chains: snp::ChainCache,
}

impl Verifier {
    pub fn new(anchors: TrustAnchors) -> Self {
        Verifier {
            anchors,
            chains: snp::ChainCache::default(),
        }
    }

    pub fn anchors(&self) -> &TrustAnchors {
        &self.anchors
    }

    /// Verifies KBS-protocol evidence (`tee-evidence.primary_evidence`).
    pub fn verify(
        &self,
        tee: Tee,
        evidence: &serde_json::Value,
        expected: Expected<'_>,
        now: SystemTime,
    ) -> Result<Claims> {
        let claims = match tee {
            Tee::Snp => snp::verify_json(&self.anchors, &self.chains, evidence)?,
            Tee::Tdx => tdx::verify_json(&self.anchors, evidence, now)?,
            Tee::Sample => self.verify_sample(evidence, Platform::Sample)?,
            Tee::SampleDevice => self.verify_sample(evidence, Platform::SampleDevice)?,
            other => return Err(VerifyError::UnsupportedTee(other.to_string())),
        };
        check_bindings(&claims, expected)?;
        Ok(claims)
    }

    /// Verifies a raw SNP report with the certificates given (DER, any
    /// order: VCEK or VLEK, and optionally ASK/ASVK, ARK).
    pub fn verify_snp_report(&self, report: &[u8], certs: &[Vec<u8>]) -> Result<Claims> {
        snp::verify_raw(&self.anchors, &self.chains, report, certs)
    }

    /// Verifies a raw TDX quote against `collateral` at time `now`; with
    /// `event_log` (the CCEL log area), its replay must equal the quote's
    /// RTMRs.
    pub fn verify_tdx_quote(
        &self,
        quote: &[u8],
        event_log: Option<&[u8]>,
        collateral: &QuoteCollateralV3,
        now: SystemTime,
    ) -> Result<Claims> {
        tdx::verify_raw(quote, event_log, collateral, now)
    }

    /// CoCo's sample and sample_device evidence (the same shape).
    fn verify_sample(&self, evidence: &serde_json::Value, platform: Platform) -> Result<Claims> {
        if !self.anchors.accept_sample {
            return Err(VerifyError::SampleNotAccepted);
        }
        // CoCo's sample attester sends {"svn": "...", "report_data": base64},
        // either as an object or as a JSON string holding one.
        let parsed;
        let evidence = match evidence {
            serde_json::Value::String(s) => {
                parsed = serde_json::from_str::<serde_json::Value>(s)
                    .map_err(|e| VerifyError::Malformed(format!("sample evidence: {e}")))?;
                &parsed
            }
            other => other,
        };
        let report_data = evidence
            .get("report_data")
            .and_then(|v| v.as_str())
            .ok_or_else(|| VerifyError::Malformed("sample evidence without report_data".into()))?;
        let report_data = B64
            .decode(report_data)
            .map_err(|e| VerifyError::Malformed(format!("sample report_data: {e}")))?;
        let svn = evidence.get("svn").cloned().unwrap_or_default();
        Ok(Claims {
            platform,
            insecure: true,
            report_data: hex::encode(report_data),
            init_data: String::new(),
            measurement: String::new(),
            // Nothing to debug: there is no TEE; `insecure` says it all.
            debug: false,
            tcb: serde_json::json!({ "svn": svn }),
            details: serde_json::json!({}),
        })
    }
}

fn check_bindings(claims: &Claims, expected: Expected<'_>) -> Result<()> {
    if let Some(want) = expected.report_data {
        let found = claims.report_data.clone();
        // A TEE's field has its own size; sample evidence has none, so its
        // report data must be the digest itself (as CoCo's sample attester
        // sends it) or that digest padded to 64 bytes, never a prefix.
        let (want, matches) = if claims.platform.is_sample() {
            let exact = hex::encode(want);
            let padded = hex::encode(fit_digest(want, 64));
            let matches = found == exact || found == padded;
            (exact, matches)
        } else {
            let want = hex::encode(fit_digest(want, found.len() / 2));
            let matches = found == want;
            (want, matches)
        };
        if !matches {
            return Err(VerifyError::ReportDataMismatch {
                expected: want,
                found,
            });
        }
    }
    if let Some(want) = expected.init_data {
        if claims.platform.is_sample() {
            return Ok(());
        }
        let field = match claims.platform {
            Platform::IntelTdx => "MRCONFIGID",
            _ => "HOST_DATA",
        };
        let found = claims.init_data.clone();
        let want = hex::encode(fit_digest(want, found.len() / 2));
        if found != want {
            return Err(VerifyError::InitDataMismatch {
                field,
                expected: want,
                found,
            });
        }
    }
    Ok(())
}

pub(crate) fn unix_seconds(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
