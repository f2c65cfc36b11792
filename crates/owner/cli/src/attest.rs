//! `kabuto-owner attest verify`: offline verification of TEE evidence for
//! operators debugging attestation.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Context;
use kabuto_verifier::{Expected, Tee, TrustAnchors, Verifier};

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The TEE that produced the evidence.
    #[arg(long, value_parser = ["snp", "tdx"])]
    tee: String,
    /// A raw SNP report, a raw TDX quote, or the JSON evidence the KBS
    /// protocol carries (primary evidence, tee-evidence, or a whole attestation).
    #[arg(long)]
    evidence: PathBuf,
    /// VCEK or VLEK (and optionally ASK/ASVK) certificates, DER or PEM.
    #[arg(long)]
    cert: Vec<PathBuf>,
    /// DCAP collateral for a TDX quote (JSON).
    #[arg(long)]
    collateral: Option<PathBuf>,
    /// The TD's event log (the ACPI CCEL table's data) to replay against a
    /// raw quote's RTMRs. (JSON evidence carries it as `cc_eventlog`.)
    #[arg(long)]
    event_log: Option<PathBuf>,
    /// Verify as of this time (RFC 3339), e.g. inside the collateral's window.
    #[arg(long)]
    at: Option<String>,
    /// Trust this software-TEE root certificate (PEM). INSECURE.
    #[arg(long)]
    trust_software_root: Vec<PathBuf>,
}

fn read(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// DER certificates from a DER file or a PEM file (every CERTIFICATE block).
fn certificates(bytes: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Ok(vec![bytes.to_vec()]);
    }
    let certs = rustls_pemfile::certs(&mut &bytes[..])
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .context("malformed PEM")?;
    anyhow::ensure!(!certs.is_empty(), "the PEM file holds no CERTIFICATE block");
    Ok(certs)
}

/// The primary evidence inside whatever JSON shape was given.
fn primary_evidence(json: serde_json::Value) -> serde_json::Value {
    if let Some(e) = json
        .get("tee-evidence")
        .and_then(|t| t.get("primary_evidence"))
    {
        return e.clone();
    }
    if let Some(e) = json.get("primary_evidence") {
        return e.clone();
    }
    json
}

pub fn verify(args: &VerifyArgs) -> anyhow::Result<()> {
    let now = match &args.at {
        Some(at) => {
            let t = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                .with_context(|| format!("--at {at:?} is not an RFC 3339 time"))?;
            SystemTime::from(t)
        }
        None => SystemTime::now(),
    };
    let mut anchors = TrustAnchors::default();
    for root in &args.trust_software_root {
        anchors
            .software_tee_roots
            .extend(certificates(&read(root)?)?);
    }
    if let Some(path) = &args.collateral {
        let text = String::from_utf8(read(path)?).context("collateral is not UTF-8")?;
        anchors.tdx_collateral = Some(kabuto_verifier::tdx::collateral_from_json(&text)?);
    }
    let mut certs = Vec::new();
    for c in &args.cert {
        certs.extend(certificates(&read(c)?)?);
    }
    // Also for JSON evidence: an ASVK given here completes a VLEK chain.
    anchors.amd_certs = certs.clone();
    let verifier = Verifier::new(anchors.clone());
    let evidence = read(&args.evidence)?;
    let is_json = evidence
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{');
    let result = if is_json {
        let json: serde_json::Value =
            serde_json::from_slice(&evidence).context("evidence is not valid JSON")?;
        let tee = if args.tee == "snp" {
            Tee::Snp
        } else {
            Tee::Tdx
        };
        verifier.verify(tee, &primary_evidence(json), Expected::default(), now)
    } else if args.tee == "snp" {
        verifier.verify_snp_report(&evidence, &certs)
    } else {
        let collateral = anchors
            .tdx_collateral
            .as_ref()
            .context("a raw TDX quote needs --collateral (this tool works offline)")?;
        let event_log = args.event_log.as_ref().map(read).transpose()?;
        verifier.verify_tdx_quote(&evidence, event_log.as_deref(), collateral, now)
    };
    match result {
        Ok(claims) => {
            println!("{}", serde_json::to_string_pretty(&claims)?);
            Ok(())
        }
        Err(e) => anyhow::bail!("verification failed ({} check): {e}", e.check()),
    }
}
