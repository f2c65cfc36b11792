//! Intel TDX quotes (v4, v5) via `dcap-qvl`, with collateral supplied offline.

use std::time::SystemTime;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use dcap_qvl::quote::{Report, TDReport10};
use dcap_qvl::QuoteCollateralV3;

use crate::{unix_seconds, Claims, Platform, Result, TrustAnchors, VerifyError};

/// TD_ATTRIBUTES bit 0: the TD is debuggable.
const TD_ATTRIBUTE_DEBUG: u8 = 0x01;

/// CoCo's TDX evidence: `{quote: base64, cc_eventlog?: base64}`.
#[derive(serde::Deserialize)]
struct TdxEvidence {
    quote: String,
    #[serde(default)]
    cc_eventlog: Option<String>,
}

pub(crate) fn verify_json(
    anchors: &TrustAnchors,
    evidence: &serde_json::Value,
    now: SystemTime,
) -> Result<Claims> {
    let evidence: TdxEvidence = serde_json::from_value(evidence.clone())
        .map_err(|e| VerifyError::Malformed(format!("TDX evidence: {e}")))?;
    let quote = B64
        .decode(evidence.quote.trim())
        .map_err(|e| VerifyError::Malformed(format!("TDX quote is not base64: {e}")))?;
    let event_log = match evidence.cc_eventlog.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(
            B64.decode(text)
                .map_err(|e| VerifyError::Malformed(format!("cc_eventlog is not base64: {e}")))?,
        ),
    };
    let collateral = anchors.tdx_collateral.as_ref().ok_or_else(|| {
        VerifyError::Tdx("no DCAP collateral is configured (this verifier works offline)".into())
    })?;
    verify_raw(&quote, event_log.as_deref(), collateral, now)
}

/// Verifies `quote`, then, when given, replays `event_log` against its
/// RTMRs; the claims list the log's events (`details.event_log`).
pub(crate) fn verify_raw(
    quote: &[u8],
    event_log: Option<&[u8]>,
    collateral: &QuoteCollateralV3,
    now: SystemTime,
) -> Result<Claims> {
    if quote.len() < 4 {
        return Err(VerifyError::Malformed("TDX quote too short".into()));
    }
    let version = u16::from_le_bytes([quote[0], quote[1]]);
    if !(4..=5).contains(&version) {
        return Err(VerifyError::Unsupported(format!(
            "TDX quote version {version} (4 and 5 are supported)"
        )));
    }
    let verified = dcap_qvl::verify::verify(quote, collateral, unix_seconds(now))
        .map_err(|e| VerifyError::Tdx(format!("{e:#}")))?;
    let (td, extra) = match &verified.report {
        Report::TD10(r) => (r, serde_json::json!({})),
        Report::TD15(r) => (
            &r.base,
            serde_json::json!({
                "tee_tcb_svn2": hex::encode(r.tee_tcb_svn2),
                "mr_service_td": hex::encode(r.mr_service_td),
            }),
        ),
        Report::TD15Ex(r) => (
            &r.base.base,
            serde_json::json!({
                "tee_tcb_svn2": hex::encode(r.base.tee_tcb_svn2),
                "mr_service_td": hex::encode(r.base.mr_service_td),
                "vmid": r.vmid,
                "td_id": hex::encode(r.td_id),
            }),
        ),
        Report::SgxEnclave(_) => {
            return Err(VerifyError::Unsupported(
                "an SGX enclave quote, not a TDX quote".into(),
            ))
        }
    };
    let mut claims = claims(td, &verified, version, extra);
    claims.details["event_log"] = match event_log {
        None => serde_json::Value::Null,
        Some(log) => {
            let events = crate::eventlog::parse(log).map_err(VerifyError::EventLog)?;
            crate::eventlog::check(&events, [&td.rt_mr0, &td.rt_mr1, &td.rt_mr2, &td.rt_mr3])
                .map_err(VerifyError::EventLog)?;
            serde_json::Value::Array(
                events
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "rtmr": e.rtmr,
                            "type": e.event_type,
                            "digest": hex::encode(e.sha384),
                        })
                    })
                    .collect(),
            )
        }
    };
    Ok(claims)
}

fn claims(
    td: &TDReport10,
    verified: &dcap_qvl::verify::VerifiedReport,
    version: u16,
    extra: serde_json::Value,
) -> Claims {
    Claims {
        platform: Platform::IntelTdx,
        insecure: false,
        report_data: hex::encode(td.report_data),
        init_data: hex::encode(td.mr_config_id),
        measurement: hex::encode(td.mr_td),
        debug: td.td_attributes[0] & TD_ATTRIBUTE_DEBUG != 0,
        tcb: serde_json::json!({
            "status": verified.status,
            "advisory_ids": verified.advisory_ids,
            "tee_tcb_svn": hex::encode(td.tee_tcb_svn),
        }),
        details: serde_json::json!({
            "quote_version": version,
            "mr_seam": hex::encode(td.mr_seam),
            "mr_signer_seam": hex::encode(td.mr_signer_seam),
            "seam_attributes": hex::encode(td.seam_attributes),
            "td_attributes": hex::encode(td.td_attributes),
            "xfam": hex::encode(td.xfam),
            "mr_owner": hex::encode(td.mr_owner),
            "mr_owner_config": hex::encode(td.mr_owner_config),
            "rtmr": [
                hex::encode(td.rt_mr0),
                hex::encode(td.rt_mr1),
                hex::encode(td.rt_mr2),
                hex::encode(td.rt_mr3),
            ],
            "td15": extra,
        }),
    }
}

/// Reads collateral in the JSON layout of dcap-qvl / PCCS tools: PEM chains
/// and JSON bodies as strings, CRLs and signatures as hex.
pub fn collateral_from_json(text: &str) -> Result<QuoteCollateralV3> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| VerifyError::Malformed(format!("collateral JSON: {e}")))?;
    let string = |key: &str| -> Result<String> {
        value
            .get(key)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .ok_or_else(|| VerifyError::Malformed(format!("collateral has no string {key}")))
    };
    let bytes = |key: &str| -> Result<Vec<u8>> {
        hex::decode(string(key)?)
            .map_err(|e| VerifyError::Malformed(format!("collateral {key} is not hex: {e}")))
    };
    Ok(QuoteCollateralV3 {
        pck_crl_issuer_chain: string("pck_crl_issuer_chain")?,
        root_ca_crl: bytes("root_ca_crl")?,
        pck_crl: bytes("pck_crl")?,
        tcb_info_issuer_chain: string("tcb_info_issuer_chain")?,
        tcb_info: string("tcb_info")?,
        tcb_info_signature: bytes("tcb_info_signature")?,
        qe_identity_issuer_chain: string("qe_identity_issuer_chain")?,
        qe_identity: string("qe_identity")?,
        qe_identity_signature: bytes("qe_identity_signature")?,
        pck_certificate_chain: value
            .get("pck_certificate_chain")
            .and_then(|v| v.as_str())
            .map(str::to_owned),
    })
}
