#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sev::firmware::guest::AttestationReport;
use sev::firmware::host::{CertTableEntry, CertType};
use sev::parser::ByteParser;
use x509_cert::der::Decode;

use super::*;

/// Public test vectors live outside the project (see PROVENANCE.md there).
fn testdata(rel: &str) -> Option<Vec<u8>> {
    let dir = std::env::var_os("KABUTO_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../../../shared/testdata/attestation")
        });
    let path = dir.join(rel);
    match std::fs::read(&path) {
        Ok(bytes) => Some(bytes),
        Err(_) => {
            eprintln!(
                "SKIPPED: test vector {} not found (set KABUTO_TESTDATA to the shared testdata/attestation directory)",
                path.display()
            );
            None
        }
    }
}

fn verifier() -> Verifier {
    Verifier::new(TrustAnchors::default())
}

#[test]
fn real_snp_report_verifies_against_pinned_milan_root() {
    let (Some(report), Some(vcek)) = (
        testdata("snp/report-v2.bin"),
        testdata("snp/report-v2.vcek.der"),
    ) else {
        return;
    };
    let claims = verifier().verify_snp_report(&report, &[vcek]).unwrap();
    assert_eq!(claims.platform, Platform::AmdSevSnp);
    assert!(!claims.insecure);
    assert_eq!(claims.tcb["product"], "milan");
    assert_eq!(claims.tcb["signing_key"], "vcek");
    assert_eq!(claims.details["version"], 2);
    assert_eq!(claims.measurement.len(), 96);
}

#[test]
fn any_flipped_byte_in_the_signed_snp_region_fails() {
    let (Some(report), Some(vcek)) = (
        testdata("snp/report-v2.bin"),
        testdata("snp/report-v2.vcek.der"),
    ) else {
        return;
    };
    let v = verifier();
    for offset in (0..0x2A0)
        .step_by(7)
        .chain([0x50, 0x90, 0xC0, 0x180, 0x29F])
    {
        let mut bad = report.clone();
        bad[offset] ^= 0x01;
        assert!(
            v.verify_snp_report(&bad, std::slice::from_ref(&vcek))
                .is_err(),
            "flipping byte {offset:#x} went unnoticed"
        );
    }
    let mut bad_sig = report.clone();
    bad_sig[0x2A0] ^= 0x01;
    let err = v.verify_snp_report(&bad_sig, &[vcek]).unwrap_err();
    assert_eq!(err.check(), "signature", "{err}");
}

#[test]
fn malformed_or_missing_vceks_are_refused() {
    let Some(report) = testdata("snp/report-v2.bin") else {
        return;
    };
    let v = verifier();
    let err = v.verify_snp_report(&report, &[]).unwrap_err();
    assert!(err.to_string().contains("no VCEK certificate"), "{err}");
    for bad in ["snp/vcek-invalid-legacy.der", "snp/vcek-invalid-new.der"] {
        let Some(der) = testdata(bad) else { return };
        assert!(
            v.verify_snp_report(&report, &[der]).is_err(),
            "{bad} accepted"
        );
    }
}

fn tdx_collateral() -> Option<QuoteCollateralV3> {
    let text = testdata("tdx/quote-v4.collateral.json")?;
    Some(tdx::collateral_from_json(std::str::from_utf8(&text).unwrap()).unwrap())
}

/// Inside the collateral's validity window (TCB info issued 2025-06-19).
fn tdx_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_750_800_000) // 2025-06-24
}

#[test]
fn real_tdx_quote_verifies_with_offline_collateral() {
    let (Some(quote), Some(collateral)) = (testdata("tdx/quote-v4.bin"), tdx_collateral()) else {
        return;
    };
    let claims = verifier()
        .verify_tdx_quote(&quote, None, &collateral, tdx_time())
        .unwrap();
    assert_eq!(claims.platform, Platform::IntelTdx);
    assert_eq!(claims.details["quote_version"], 4);
    assert_eq!(claims.details["rtmr"].as_array().unwrap().len(), 4);
    assert!(claims.tcb["status"].is_string());
}

#[test]
fn tampered_or_expired_tdx_quotes_fail() {
    let (Some(quote), Some(collateral)) = (testdata("tdx/quote-v4.bin"), tdx_collateral()) else {
        return;
    };
    let v = verifier();
    // Header, TD report body (MRTD, REPORT_DATA), signature data.
    for offset in [8, 48 + 136, 48 + 520, quote.len() - 100] {
        let mut bad = quote.clone();
        bad[offset] ^= 0x01;
        assert!(
            v.verify_tdx_quote(&bad, None, &collateral, tdx_time())
                .is_err(),
            "flipping byte {offset} went unnoticed"
        );
    }
    // Years after the collateral's nextUpdate.
    let err = v
        .verify_tdx_quote(
            &quote,
            None,
            &collateral,
            UNIX_EPOCH + Duration::from_secs(1_900_000_000),
        )
        .unwrap_err();
    assert_eq!(err.check(), "tdx-quote");
}

#[test]
fn tdx_event_logs_must_replay_to_the_quotes_rtmrs() {
    let (Some(quote), Some(collateral)) = (testdata("tdx/quote-v4.bin"), tdx_collateral()) else {
        return;
    };
    let v = verifier();
    let claims = v
        .verify_tdx_quote(&quote, None, &collateral, tdx_time())
        .unwrap();
    assert!(claims.details["event_log"].is_null());
    // This public quote comes without its log: any log we make replays to
    // other RTMRs, and the quote, valid on its own, is refused with it.
    let log = crate::eventlog::tests::build_log(&[(1, 0xD, b"not this td's boot")]);
    let err = v
        .verify_tdx_quote(&quote, Some(&log), &collateral, tdx_time())
        .unwrap_err();
    assert_eq!(err.check(), "tdx-eventlog");
    assert!(err.to_string().contains("RTMR0 is 44c0197b"), "{err}");
    // The same through KBS-protocol evidence, and a malformed log.
    let anchors = TrustAnchors {
        tdx_collateral: Some(collateral.clone()),
        ..Default::default()
    };
    let json_verifier = Verifier::new(anchors);
    for (cc_eventlog, needle) in [
        (B64.encode(&log), "RTMR0 is"),
        (B64.encode(&log[..40]), "truncated"),
    ] {
        let evidence = serde_json::json!({"quote": B64.encode(&quote), "cc_eventlog": cc_eventlog});
        let err = json_verifier
            .verify(Tee::Tdx, &evidence, Expected::default(), tdx_time())
            .unwrap_err();
        assert_eq!(err.check(), "tdx-eventlog");
        assert!(err.to_string().contains(needle), "{err}");
    }
}

struct SoftwareTee {
    _dir: tempfile::TempDir,
    firmware: kabuto_swtee::Firmware,
}

fn software_tee() -> SoftwareTee {
    let dir = tempfile::tempdir().unwrap();
    kabuto_swtee::init(dir.path()).unwrap();
    let firmware = kabuto_swtee::Firmware::load(dir.path()).unwrap();
    SoftwareTee {
        _dir: dir,
        firmware,
    }
}

fn launch() -> kabuto_swtee::LaunchData {
    kabuto_swtee::LaunchData {
        measurement: kabuto_swtee::measurement(b"kernel", b"initrd", "cmdline"),
        host_data: [0x11; 32],
    }
}

/// A SHA-384 digest zero-padded to SNP's 64-byte REPORT_DATA.
fn report_data() -> [u8; 64] {
    fit_digest(&[0x22; 48], 64).try_into().unwrap()
}

/// The evidence a CoCo SNP attester would send, built from a report.
fn snp_json(report: &[u8], vcek: &[u8], root: &[u8]) -> serde_json::Value {
    let parsed = AttestationReport::from_bytes(report).unwrap();
    serde_json::json!({
        "attestation_report": parsed,
        "cert_chain": [
            CertTableEntry::new(CertType::VCEK, vcek.to_vec()),
            CertTableEntry::new(CertType::ARK, root.to_vec()),
        ],
    })
}

impl SoftwareTee {
    /// CoCo-style JSON evidence of a fresh report from this TEE.
    fn evidence(&self) -> serde_json::Value {
        let report = self.firmware.report(&launch(), &report_data()).unwrap();
        snp_json(
            &report,
            self.firmware.firmware_cert_der(),
            self.firmware.root_cert_der(),
        )
    }

    /// A verifier that trusts this TEE's root.
    fn trusting_verifier(&self) -> Verifier {
        Verifier::new(TrustAnchors {
            software_tee_roots: vec![self.firmware.root_cert_der().to_vec()],
            ..Default::default()
        })
    }
}

#[test]
fn software_tee_needs_explicit_trust() {
    let tee = software_tee();
    let evidence = tee.evidence();
    let now = SystemTime::now();

    let err = verifier()
        .verify(Tee::Snp, &evidence, Expected::default(), now)
        .unwrap_err();
    assert!(matches!(err, VerifyError::SoftwareTeeNotTrusted), "{err}");

    let trusted = tee.trusting_verifier();
    let claims = trusted
        .verify(
            Tee::Snp,
            &evidence,
            Expected {
                report_data: Some(&[0x22; 48]),
                init_data: Some(&[0x11; 32]),
            },
            now,
        )
        .unwrap();
    assert_eq!(claims.platform, Platform::SoftwareTee);
    assert!(claims.insecure);
    assert_eq!(claims.measurement, hex::encode(launch().measurement));

    // A different software root (another host's) is not trusted either.
    let evidence = software_tee().evidence();
    let err = trusted
        .verify(Tee::Snp, &evidence, Expected::default(), now)
        .unwrap_err();
    assert!(matches!(err, VerifyError::SoftwareTeeNotTrusted), "{err}");
}

#[test]
fn bindings_are_checked() {
    let tee = software_tee();
    let evidence = tee.evidence();
    let v = tee.trusting_verifier();
    let now = SystemTime::now();
    let err = v
        .verify(
            Tee::Snp,
            &evidence,
            Expected {
                report_data: Some(&[0x23; 48]),
                init_data: None,
            },
            now,
        )
        .unwrap_err();
    assert_eq!(err.check(), "report-data");
    let err = v
        .verify(
            Tee::Snp,
            &evidence,
            Expected {
                report_data: None,
                init_data: Some(&[0x12; 32]),
            },
            now,
        )
        .unwrap_err();
    assert_eq!(err.check(), "init-data");
    assert!(err.to_string().contains("HOST_DATA"));

    // A report edited in the JSON form no longer verifies.
    let mut edited = evidence.clone();
    edited["attestation_report"]["host_data"] = serde_json::json!(vec![0x12u8; 32]);
    let err = v
        .verify(Tee::Snp, &edited, Expected::default(), now)
        .unwrap_err();
    assert_eq!(err.check(), "signature", "{err}");
}

#[test]
fn sample_evidence_only_when_accepted() {
    let evidence = serde_json::json!({"svn": "1", "report_data": "AAEC"});
    let now = SystemTime::now();
    let err = verifier()
        .verify(Tee::Sample, &evidence, Expected::default(), now)
        .unwrap_err();
    assert!(matches!(err, VerifyError::SampleNotAccepted));
    let v = Verifier::new(TrustAnchors {
        accept_sample: true,
        ..Default::default()
    });
    let claims = v
        .verify(
            Tee::Sample,
            &evidence,
            Expected {
                report_data: Some(&[0, 1, 2]),
                init_data: None,
            },
            now,
        )
        .unwrap();
    assert!(claims.insecure);
    assert_eq!(claims.platform, Platform::Sample);
}

/// Samples that dependencies ship in their crates.io packages — dcap-qvl's
/// Intel TDX v5 quotes with collateral, sev's AMD reports and certificates —
/// read in place from the package sources `cargo metadata` names.
fn crate_sample(package: &str, rel: &str) -> Option<Vec<u8>> {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    static SOURCES: OnceLock<HashMap<String, Vec<PathBuf>>> = OnceLock::new();
    let sources = SOURCES.get_or_init(|| {
        let output = std::process::Command::new(env!("CARGO"))
            .args(["metadata", "--format-version", "1", "--offline"])
            // Offline, only this platform's dependencies are on disk.
            .arg("--filter-platform")
            .arg(format!("{}-unknown-linux-gnu", std::env::consts::ARCH))
            .arg("--manifest-path")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
            .output();
        let mut map: HashMap<String, Vec<PathBuf>> = HashMap::new();
        let Ok(output) = output else { return map };
        let Ok(meta) = serde_json::from_slice::<serde_json::Value>(&output.stdout) else {
            return map;
        };
        for pkg in meta["packages"].as_array().into_iter().flatten() {
            if let (Some(name), Some(manifest)) =
                (pkg["name"].as_str(), pkg["manifest_path"].as_str())
            {
                if let Some(dir) = std::path::Path::new(manifest).parent() {
                    map.entry(name.to_string())
                        .or_default()
                        .push(dir.to_path_buf());
                }
            }
        }
        map
    });
    let found = sources
        .get(package)
        .into_iter()
        .flatten()
        .find_map(|dir| std::fs::read(dir.join(rel)).ok());
    if found.is_none() {
        eprintln!("SKIPPED: {rel} of the {package} package not found (cargo metadata)");
    }
    found
}

fn dcap_sample(quote: &str) -> Option<(Vec<u8>, QuoteCollateralV3)> {
    let quote_bytes = crate_sample("dcap-qvl", &format!("sample/{quote}"))?;
    let collateral = crate_sample("dcap-qvl", &format!("sample/{quote}_collateral.json"))?;
    let collateral = tdx::collateral_from_json(std::str::from_utf8(&collateral).unwrap()).unwrap();
    Some((quote_bytes, collateral))
}

#[test]
fn real_tdx_v5_quotes_verify_and_any_flipped_signed_byte_fails() {
    // TDX 1.5 with the "ex" body (type 4): valid 2026-10-08 .. 2026-11-06.
    let Some((quote, collateral)) = dcap_sample("tdx_quote_td15ex") else {
        return;
    };
    let at = UNIX_EPOCH + Duration::from_secs(1_792_454_400); // 2026-10-20
    let v = verifier();
    let claims = v.verify_tdx_quote(&quote, None, &collateral, at).unwrap();
    assert_eq!(claims.details["quote_version"], 5);
    assert_eq!(claims.tcb["status"], "UpToDate");
    let td15 = &claims.details["td15"];
    assert_eq!(td15["td_id"].as_str().unwrap().len(), 64);
    assert_ne!(td15["td_id"], "0".repeat(64));
    assert_eq!(td15["mr_service_td"].as_str().unwrap().len(), 96);
    // v5 header, body type/size, TD report (MRTD, MRCONFIGID, REPORT_DATA,
    // the 1.5 and 1.5ex fields), signature and attestation key.
    let body = 48 + 6;
    for offset in [
        8,
        48,
        50,
        body + 136,
        body + 184,
        body + 520,
        body + 600,
        body + 649,
        body + 884,
        // After the signed 939 bytes and the 4-byte length: the quote's
        // ECDSA signature, then the attestation key.
        body + 885 + 4 + 10,
        body + 885 + 4 + 64 + 10,
    ] {
        let mut bad = quote.clone();
        bad[offset] ^= 0x01;
        assert!(
            v.verify_tdx_quote(&bad, None, &collateral, at).is_err(),
            "flipping byte {offset} of the v5 quote went unnoticed"
        );
    }
    // Before the collateral was issued.
    let err = v
        .verify_tdx_quote(&quote, None, &collateral, tdx_time())
        .unwrap_err();
    assert_eq!(err.check(), "tdx-quote");

    // A v5 quote from a platform whose TCB matches none of the collateral's
    // levels (dcap-qvl's "outdated" sample): refused, naming why.
    let Some((quote, collateral)) = dcap_sample("tdx_quote_outdated") else {
        return;
    };
    let at = UNIX_EPOCH + Duration::from_secs(1_772_323_200); // 2026-03-01
    let err = v
        .verify_tdx_quote(&quote, None, &collateral, at)
        .unwrap_err();
    assert_eq!(err.check(), "tdx-quote");
    assert!(err.to_string().contains("TCB level"), "{err}");
}

#[test]
fn second_real_milan_report_and_a_turin_vcek_chain_to_the_pinned_roots() {
    let (Some(report_hex), Some(vcek)) = (
        crate_sample("sev", "tests/certs_data/report_milan.hex"),
        crate_sample("sev", "tests/certs_data/vcek_milan.der"),
    ) else {
        return;
    };
    let report = hex::decode(String::from_utf8(report_hex).unwrap().trim()).unwrap();
    let v = verifier();
    let claims = v
        .verify_snp_report(&report, std::slice::from_ref(&vcek))
        .unwrap();
    assert_eq!(claims.tcb["product"], "milan");
    let mut bad = report.clone();
    bad[0x90] ^= 0x01; // measurement
    assert_eq!(
        v.verify_snp_report(&bad, &[vcek]).unwrap_err().check(),
        "signature"
    );

    let Some(turin) = crate_sample("sev", "tests/certs_data/vcek_turin.der") else {
        return;
    };
    let cert = x509_cert::Certificate::from_der(&turin).unwrap();
    let product = snp::amd_chain(&cert, &[], snp::SigningKey::Vcek).unwrap();
    assert_eq!(product, Some("turin"));
    // The same certificate with another serial number chains nowhere.
    let mut forged = cert.clone();
    forged.tbs_certificate.serial_number =
        x509_cert::serial_number::SerialNumber::new(&[0x01, 0x02, 0x03]).unwrap();
    assert_eq!(
        snp::amd_chain(&forged, &[], snp::SigningKey::Vcek).unwrap(),
        None
    );
}

/// The DER certificates of a PEM file.
fn pem_certificates(pem: &[u8]) -> Vec<Vec<u8>> {
    let pem = String::from_utf8(pem.to_vec()).unwrap();
    pem.split("-----END CERTIFICATE-----")
        .filter(|block| block.contains("BEGIN CERTIFICATE"))
        .map(|block| {
            let b64: String = block
                .lines()
                .filter(|l| !l.starts_with("-----") && !l.trim().is_empty())
                .collect();
            B64.decode(b64.trim()).unwrap()
        })
        .collect()
}

#[test]
fn real_vlek_report_verifies_with_amds_asvk_and_fails_with_any_flipped_signed_byte() {
    let (Some(report), Some(vlek), Some(pem)) = (
        testdata("snp/report-vlek.bin"),
        testdata("snp/report-vlek.vlek.der"),
        testdata("snp/amd-milan-ask-ark-asvk.pem"),
    ) else {
        return;
    };
    let amd = pem_certificates(&pem);
    // The evidence carries only the VLEK (as a cloud's extended report
    // does); the owner configured AMD's published chain.
    let configured = Verifier::new(TrustAnchors {
        amd_certs: amd.clone(),
        ..Default::default()
    });
    let claims = configured
        .verify_snp_report(&report, std::slice::from_ref(&vlek))
        .unwrap();
    assert_eq!(claims.platform, Platform::AmdSevSnp);
    assert!(!claims.insecure);
    assert_eq!(claims.tcb["product"], "milan");
    assert_eq!(claims.tcb["signing_key"], "vlek");
    // The same with the chain in the evidence instead.
    let mut in_evidence = vec![vlek.clone()];
    in_evidence.extend(amd.iter().cloned());
    let claims = verifier().verify_snp_report(&report, &in_evidence).unwrap();
    assert_eq!(claims.tcb["signing_key"], "vlek");

    // Without an ASVK: refused, naming where to get it.
    let err = verifier()
        .verify_snp_report(&report, std::slice::from_ref(&vlek))
        .unwrap_err();
    assert_eq!(err.check(), "certificate-chain");
    assert!(err.to_string().contains("kdsintf.amd.com/vlek"), "{err}");
    // The VCEK chain's ASK is no ASVK: configuring only ASK and ARK fails.
    let subject = |der: &Vec<u8>| {
        x509_cert::Certificate::from_der(der)
            .unwrap()
            .tbs_certificate
            .subject
            .to_string()
    };
    let without_asvk: Vec<Vec<u8>> = amd
        .iter()
        .filter(|c| !subject(c).contains("SEV-VLEK"))
        .cloned()
        .collect();
    assert_eq!(without_asvk.len(), amd.len() - 1);
    let err = Verifier::new(TrustAnchors {
        amd_certs: without_asvk,
        ..Default::default()
    })
    .verify_snp_report(&report, std::slice::from_ref(&vlek))
    .unwrap_err();
    assert_eq!(err.check(), "certificate-chain");

    // Every signed byte matters (a fresh verifier each time would only
    // re-check the cached chain; the report signature is per report).
    for offset in 0..0x2A0 {
        let mut tampered = report.clone();
        tampered[offset] ^= 0x01;
        let result = configured.verify_snp_report(&tampered, std::slice::from_ref(&vlek));
        assert!(result.is_err(), "flipping byte {offset:#x} still verified");
    }
    // A flipped byte in the VLEK certificate breaks its chain.
    let mut forged = vlek.clone();
    let last = forged.len() - 40;
    forged[last] ^= 0x01;
    assert!(configured
        .verify_snp_report(&report, std::slice::from_ref(&forged))
        .is_err());
}

#[test]
fn vlek_signatures_need_an_asvk_that_signed_the_key() {
    let (Some(vcek), Some(pem)) = (
        testdata("snp/report-v2.vcek.der"),
        testdata("snp/amd-milan-ask-ark-asvk.pem"),
    ) else {
        return;
    };
    let certs: Vec<x509_cert::Certificate> = pem_certificates(&pem)
        .iter()
        .map(|der| x509_cert::Certificate::from_der(der).unwrap())
        .collect();
    let subject = |c: &x509_cert::Certificate| c.tbs_certificate.subject.to_string();
    let asvk = certs
        .iter()
        .find(|c| subject(c).contains("SEV-VLEK-Milan"))
        .unwrap();
    let leaf = x509_cert::Certificate::from_der(&vcek).unwrap();
    // The VCEK chains through the pinned ASK ...
    assert_eq!(
        snp::amd_chain(&leaf, &[], snp::SigningKey::Vcek).unwrap(),
        Some("milan")
    );
    // ... but a report claiming a VLEK signature gets no pinned ASK: the
    // real ASVK (signed by the pinned ARK) did not sign this key.
    assert_eq!(
        snp::amd_chain(&leaf, &[asvk], snp::SigningKey::Vlek).unwrap(),
        None
    );
    assert_eq!(
        snp::amd_chain(&leaf, &[], snp::SigningKey::Vlek).unwrap(),
        None
    );
}
