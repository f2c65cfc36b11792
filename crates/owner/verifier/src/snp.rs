//! AMD SEV-SNP reports (and the software TEE, which uses the same format).

use std::collections::HashMap;
use std::sync::Mutex;

// aws-lc-rs: its P-384 is ~4x faster than ring's here, and one P-384
// verification per report bounds the KBS's handshake rate.
use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P384_SHA384_ASN1, ECDSA_P384_SHA384_FIXED};
use sev::certs::snp::{builtin, ca, Certificate, Chain, Verifiable};
use sev::firmware::guest::AttestationReport;
use sev::firmware::host::{CertTableEntry, CertType};
use sev::parser::ByteParser;
use sha2::{Digest, Sha256};
use x509_cert::der::{Decode, Encode};

use crate::{Claims, Platform, Result, TrustAnchors, VerifyError};

const REPORT_LEN: usize = 0x4A0;
const SIGNED_LEN: usize = 0x2A0;
const SIG_R: usize = 0x2A0;
const SIG_S: usize = 0x2E8;
const SIG_ALGO_ECDSA_P384_SHA384: u32 = 1;

// VCEK/VLEK certificate extensions (AMD "VCEK Certificate and KDS Interface"
// spec, table 8).
const OID_BL_SPL: &str = "1.3.6.1.4.1.3704.1.3.1";
const OID_TEE_SPL: &str = "1.3.6.1.4.1.3704.1.3.2";
const OID_SNP_SPL: &str = "1.3.6.1.4.1.3704.1.3.3";
const OID_UCODE_SPL: &str = "1.3.6.1.4.1.3704.1.3.8";
const OID_FMC_SPL: &str = "1.3.6.1.4.1.3704.1.3.9";
const OID_HWID: &str = "1.3.6.1.4.1.3704.1.4";

/// CoCo's SNP evidence: `{attestation_report, cert_chain}`.
#[derive(serde::Deserialize)]
struct SnpEvidence {
    attestation_report: AttestationReport,
    #[serde(default)]
    cert_chain: Option<Vec<CertTableEntry>>,
}

pub(crate) fn verify_json(
    anchors: &TrustAnchors,
    cache: &ChainCache,
    evidence: &serde_json::Value,
) -> Result<Claims> {
    let evidence: SnpEvidence = serde_json::from_value(evidence.clone())
        .map_err(|e| VerifyError::Malformed(format!("SNP evidence: {e}")))?;
    let report = evidence
        .attestation_report
        .to_bytes()
        .map_err(|e| VerifyError::Malformed(format!("SNP report does not encode: {e}")))?;
    let certs: Vec<Vec<u8>> = evidence
        .cert_chain
        .unwrap_or_default()
        .into_iter()
        .filter(|entry| entry.cert_type != CertType::Empty)
        .map(|entry| entry.data().to_vec())
        .collect();
    verify_raw(anchors, cache, report.as_ref(), &certs)
}

/// Loads one of the AMD certificates pinned in the `sev` crate.
type PinnedCert = fn() -> std::io::Result<Certificate>;

/// Which endorsement key signed the report.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum SigningKey {
    Vcek,
    Vlek,
}

impl SigningKey {
    fn name(self) -> &'static str {
        match self {
            SigningKey::Vcek => "VCEK",
            SigningKey::Vlek => "VLEK",
        }
    }
}

/// Chains already verified, keyed by the digest of their certificates: a
/// VCEK signs many reports, and re-checking its RSA chain each time would
/// cost more than the report itself. Bounded; cleared when full.
#[derive(Default)]
pub struct ChainCache(Mutex<HashMap<[u8; 32], (Platform, &'static str)>>);

const CHAIN_CACHE_MAX: usize = 4096;

impl ChainCache {
    fn get(&self, key: &[u8; 32]) -> Option<(Platform, &'static str)> {
        self.0.lock().ok()?.get(key).copied()
    }
    fn put(&self, key: [u8; 32], value: (Platform, &'static str)) {
        if let Ok(mut map) = self.0.lock() {
            if map.len() >= CHAIN_CACHE_MAX {
                map.clear();
            }
            map.insert(key, value);
        }
    }
}

pub(crate) fn verify_raw(
    anchors: &TrustAnchors,
    cache: &ChainCache,
    raw: &[u8],
    certs: &[Vec<u8>],
) -> Result<Claims> {
    if raw.len() < REPORT_LEN {
        return Err(VerifyError::Malformed(format!(
            "SNP report of {} bytes, expected {REPORT_LEN}",
            raw.len()
        )));
    }
    let raw = &raw[..REPORT_LEN];
    let (report, signing_key) = parse_report(raw)?;
    let parsed: Vec<x509_cert::Certificate> = certs
        .iter()
        .map(|der| {
            x509_cert::Certificate::from_der(der)
                .map_err(|e| VerifyError::Certificate(format!("not a DER X.509 certificate: {e}")))
        })
        .collect::<Result<_>>()?;
    // The endorsement key is the certificate that is not a CA.
    let leaf = parsed
        .iter()
        .find(|c| is_endorsement_key(c))
        .ok_or_else(|| {
            VerifyError::Certificate(format!(
                "no {} certificate: supply it in the evidence's cert_chain or with --cert",
                signing_key.name()
            ))
        })?;
    let (platform, product) = endorsement(anchors, cache, certs, &parsed, leaf, signing_key)?;

    // The report signature, over the raw signed bytes.
    let signature = report_signature(raw);
    UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, spki_bytes(leaf))
        .verify(&raw[..SIGNED_LEN], &signature)
        .map_err(|_| {
            VerifyError::Signature(format!(
                "the report signature does not verify with the {} certificate's key",
                signing_key.name()
            ))
        })?;

    if platform == Platform::AmdSevSnp {
        check_tcb(leaf, &report)?;
        if signing_key == SigningKey::Vcek {
            check_chip_id(leaf, &report)?;
        }
    }
    Ok(claims(&report, raw, platform, product, signing_key))
}

/// The report's fields, once its version, signature algorithm and signing
/// key kind are ones this verifier reads.
fn parse_report(raw: &[u8]) -> Result<(AttestationReport, SigningKey)> {
    let version = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    if !(2..=5).contains(&version) {
        return Err(VerifyError::Unsupported(format!(
            "SNP report version {version} (2 to 5 are supported)"
        )));
    }
    let report = AttestationReport::from_bytes(raw)
        .map_err(|e| VerifyError::Malformed(format!("SNP report: {e}")))?;
    if report.sig_algo != SIG_ALGO_ECDSA_P384_SHA384 {
        return Err(VerifyError::Unsupported(format!(
            "SNP signature algorithm {} (only 1, ECDSA P-384 with SHA-384)",
            report.sig_algo
        )));
    }
    let signing_key = match report.key_info.signing_key() {
        0 => SigningKey::Vcek,
        1 => SigningKey::Vlek,
        other => {
            return Err(VerifyError::Unsupported(format!(
                "SNP report signed by key kind {other} (not VCEK or VLEK)"
            )))
        }
    };
    Ok((report, signing_key))
}

/// Who endorses `leaf`: AMD (through a pinned ARK) or a trusted
/// software-TEE root; verified chains are cached by their certificates.
fn endorsement(
    anchors: &TrustAnchors,
    cache: &ChainCache,
    certs: &[Vec<u8>],
    parsed: &[x509_cert::Certificate],
    leaf: &x509_cert::Certificate,
    signing_key: SigningKey,
) -> Result<(Platform, &'static str)> {
    let configured: Vec<x509_cert::Certificate> = anchors
        .amd_certs
        .iter()
        .filter_map(|der| x509_cert::Certificate::from_der(der).ok())
        .collect();
    // The evidence's CA certificates, then the owner's: both are checked
    // against the pinned ARKs, neither is trusted by itself.
    let intermediates: Vec<&x509_cert::Certificate> = parsed
        .iter()
        .filter(|c| !is_endorsement_key(c))
        .chain(configured.iter())
        .collect();
    let mut chain_key = Sha256::new();
    chain_key.update([signing_key as u8]);
    for der in certs {
        chain_key.update((der.len() as u64).to_le_bytes());
        chain_key.update(der);
    }
    let chain_key: [u8; 32] = chain_key.finalize().into();
    if let Some(known) = cache.get(&chain_key) {
        return Ok(known);
    }
    let outcome = match amd_chain(leaf, &intermediates, signing_key)? {
        Some(product) => (Platform::AmdSevSnp, product),
        None if signing_key == SigningKey::Vlek && is_amd_vlek(leaf) => return Err(no_asvk(leaf)),
        None => {
            software_chain(anchors, leaf)?;
            (Platform::SoftwareTee, "software")
        }
    };
    cache.put(chain_key, outcome);
    Ok(outcome)
}

/// The claims of a verified report.
fn claims(
    report: &AttestationReport,
    raw: &[u8],
    platform: Platform,
    product: &'static str,
    signing_key: SigningKey,
) -> Claims {
    let tcb = &report.reported_tcb;
    Claims {
        platform,
        insecure: platform != Platform::AmdSevSnp,
        report_data: hex::encode(report.report_data),
        init_data: hex::encode(report.host_data),
        measurement: hex::encode(report.measurement),
        debug: report.policy.debug_allowed(),
        tcb: serde_json::json!({
            "product": product,
            "signing_key": if signing_key == SigningKey::Vcek { "vcek" } else { "vlek" },
            "bootloader": tcb.bootloader,
            "tee": tcb.tee,
            "snp": tcb.snp,
            "microcode": tcb.microcode,
            "fmc": tcb.fmc,
        }),
        details: serde_json::json!({
            "version": report.version,
            "guest_svn": report.guest_svn,
            "policy": format!("{:#x}", u64::from_le_bytes(raw[0x08..0x10].try_into().unwrap_or_default())),
            "vmpl": report.vmpl,
            "migrate_ma": report.policy.migrate_ma_allowed(),
            "smt": report.policy.smt_allowed(),
            "family_id": hex::encode(report.family_id),
            "image_id": hex::encode(report.image_id),
            "id_key_digest": hex::encode(report.id_key_digest),
            "author_key_digest": hex::encode(report.author_key_digest),
            "report_id": hex::encode(report.report_id),
            "chip_id": hex::encode(report.chip_id),
        }),
    }
}

/// VCEKs and VLEKs are the P-384 certificates that are not self-signed
/// (AMD's ARK/ASK/ASVK are RSA; a software-TEE root is self-signed).
fn is_endorsement_key(cert: &x509_cert::Certificate) -> bool {
    cert.tbs_certificate.subject != cert.tbs_certificate.issuer && is_p384(cert)
}

/// Tries the pinned AMD roots. `Ok(Some(product))` when the leaf chains to
/// one, `Ok(None)` when it is not an AMD chain at all.
pub(crate) fn amd_chain(
    leaf: &x509_cert::Certificate,
    intermediates: &[&x509_cert::Certificate],
    signing_key: SigningKey,
) -> Result<Option<&'static str>> {
    let leaf_der = leaf
        .to_der()
        .map_err(|e| VerifyError::Certificate(e.to_string()))?;
    let vek =
        Certificate::from_der(&leaf_der).map_err(|e| VerifyError::Certificate(e.to_string()))?;
    let products: [(&str, PinnedCert, PinnedCert); 3] = [
        ("milan", builtin::milan::ark, builtin::milan::ask),
        ("genoa", builtin::genoa::ark, builtin::genoa::ask),
        ("turin", builtin::turin::ark, builtin::turin::ask),
    ];
    for (product, ark, ask) in products {
        let ark = ark().map_err(|e| VerifyError::Certificate(format!("pinned ARK: {e}")))?;
        // VCEKs are signed by the pinned ASK; VLEKs by the ASVK, which the
        // evidence supplies and which must itself be signed by the pinned ARK.
        let mut candidates = Vec::new();
        if signing_key == SigningKey::Vcek {
            candidates
                .push(ask().map_err(|e| VerifyError::Certificate(format!("pinned ASK: {e}")))?);
        }
        for cert in intermediates {
            let der = cert
                .to_der()
                .map_err(|e| VerifyError::Certificate(e.to_string()))?;
            if let Ok(c) = Certificate::from_der(&der) {
                candidates.push(c);
            }
        }
        for ask in candidates {
            let chain = Chain {
                ca: ca::Chain {
                    ark: ark.clone(),
                    ask,
                },
                vek: vek.clone(),
            };
            if (&chain).verify().is_ok() {
                return Ok(Some(product));
            }
        }
    }
    Ok(None)
}

/// Whether AMD's ASVK names itself the issuer (`CN=SEV-VLEK-<product>`).
fn is_amd_vlek(leaf: &x509_cert::Certificate) -> bool {
    leaf.tbs_certificate
        .issuer
        .to_string()
        .contains("CN=SEV-VLEK-")
}

/// A VLEK whose ASVK is neither in the evidence nor configured (or does not
/// chain): say where the owner gets it.
fn no_asvk(leaf: &x509_cert::Certificate) -> VerifyError {
    VerifyError::UntrustedChain(format!(
        "the VLEK certificate (issuer {}) is not signed by an ASVK that AMD's pinned Milan, Genoa or Turin ARK signed; \
         the evidence's cert_chain carried none that fits: configure AMD's ASVK chain \
         (https://kdsintf.amd.com/vlek/v1/<product>/cert_chain; kabuto-kbs [attestation] amd_certs, kabuto-owner attest verify --cert)",
        leaf.tbs_certificate.issuer
    ))
}

/// The leaf must be signed (ECDSA P-384) by a software-TEE root the owner
/// trusts explicitly.
fn software_chain(anchors: &TrustAnchors, leaf: &x509_cert::Certificate) -> Result<()> {
    let tbs = leaf
        .tbs_certificate
        .to_der()
        .map_err(|e| VerifyError::Certificate(e.to_string()))?;
    for root_der in &anchors.software_tee_roots {
        let Ok(root) = x509_cert::Certificate::from_der(root_der) else {
            continue;
        };
        if root.tbs_certificate.subject == leaf.tbs_certificate.issuer
            && UnparsedPublicKey::new(&ECDSA_P384_SHA384_ASN1, spki_bytes(&root))
                .verify(&tbs, leaf.signature.raw_bytes())
                .is_ok()
        {
            return Ok(());
        }
    }
    let issuer = leaf.tbs_certificate.issuer.to_string();
    if issuer.contains(kabuto_swtee::ROOT_COMMON_NAME) {
        return Err(VerifyError::SoftwareTeeNotTrusted);
    }
    Err(VerifyError::UntrustedChain(format!(
        "the endorsement key certificate (issuer {issuer}) is not signed by AMD's Milan, Genoa or Turin keys, nor by a trusted software-TEE root"
    )))
}

/// OID of the named curve secp384r1.
const OID_SECP384R1: &str = "1.3.132.0.34";

fn spki_bytes(cert: &x509_cert::Certificate) -> &[u8] {
    cert.tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .raw_bytes()
}

/// Whether the certificate holds an uncompressed P-384 point (aws-lc checks
/// that the point is on the curve when it verifies).
fn is_p384(cert: &x509_cert::Certificate) -> bool {
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<x509_cert::der::asn1::ObjectIdentifier>().ok())
        .map(|oid| oid.to_string());
    curve.as_deref() == Some(OID_SECP384R1) && spki_bytes(cert).len() == 97
}

/// The report stores r and s little-endian in 72-byte fields; the FIXED
/// encoding wants
/// them big-endian, 48 bytes each.
fn report_signature(raw: &[u8]) -> [u8; 96] {
    let mut out = [0u8; 96];
    for (dst, src) in out[..48]
        .iter_mut()
        .zip(raw[SIG_R..SIG_R + 48].iter().rev())
    {
        *dst = *src;
    }
    for (dst, src) in out[48..]
        .iter_mut()
        .zip(raw[SIG_S..SIG_S + 48].iter().rev())
    {
        *dst = *src;
    }
    out
}

fn extension<'a>(cert: &'a x509_cert::Certificate, oid: &str) -> Option<&'a [u8]> {
    cert.tbs_certificate
        .extensions
        .iter()
        .flatten()
        .find(|ext| ext.extn_id.to_string() == oid)
        .map(|ext| ext.extn_value.as_bytes())
}

fn extension_u8(cert: &x509_cert::Certificate, oid: &str) -> Result<Option<u8>> {
    let Some(value) = extension(cert, oid) else {
        return Ok(None);
    };
    // DER INTEGER; values are 0..=255 (may carry a leading zero byte).
    let int = x509_cert::der::asn1::Int::from_der(value)
        .map_err(|e| VerifyError::Certificate(format!("extension {oid}: {e}")))?;
    let bytes = int.as_bytes();
    match bytes {
        [b] => Ok(Some(*b)),
        [0, b] => Ok(Some(*b)),
        _ => Err(VerifyError::Certificate(format!(
            "extension {oid} is not an 8-bit SVN"
        ))),
    }
}

fn check_tcb(leaf: &x509_cert::Certificate, report: &AttestationReport) -> Result<()> {
    let tcb = &report.reported_tcb;
    let fields: [(&'static str, &str, Option<u8>); 5] = [
        ("bootloader", OID_BL_SPL, Some(tcb.bootloader)),
        ("tee", OID_TEE_SPL, Some(tcb.tee)),
        ("snp", OID_SNP_SPL, Some(tcb.snp)),
        ("microcode", OID_UCODE_SPL, Some(tcb.microcode)),
        ("fmc", OID_FMC_SPL, tcb.fmc),
    ];
    for (field, oid, reported) in fields {
        let certified = extension_u8(leaf, oid)?;
        match (certified, reported) {
            (Some(c), Some(r)) if c != r => {
                return Err(VerifyError::TcbMismatch {
                    field,
                    certificate: c,
                    report: r,
                })
            }
            (None, Some(_)) if field != "fmc" => {
                return Err(VerifyError::Certificate(format!(
                    "the endorsement key certificate has no {field} SVN extension ({oid})"
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_chip_id(leaf: &x509_cert::Certificate, report: &AttestationReport) -> Result<()> {
    // A masked chip id (all zero) cannot be compared.
    if report.chip_id.iter().all(|b| *b == 0) {
        return Ok(());
    }
    let Some(value) = extension(leaf, OID_HWID) else {
        return Err(VerifyError::Certificate(format!(
            "the VCEK has no hwID extension ({OID_HWID})"
        )));
    };
    let hwid: Vec<u8> = if value.len() == 64 {
        value.to_vec()
    } else {
        x509_cert::der::asn1::OctetString::from_der(value)
            .map(|o| o.as_bytes().to_vec())
            .map_err(|e| VerifyError::Certificate(format!("hwID extension: {e}")))?
    };
    // Turin VCEKs certify only the first 8 bytes of the chip id.
    let n = hwid.len().min(64);
    if hwid[..n] != report.chip_id[..n] {
        return Err(VerifyError::ChipIdMismatch);
    }
    Ok(())
}

/// For the benchmark's baseline: verifies only the report's ECDSA P-384
/// signature with the VCEK's key `runs` times; milliseconds per run.
pub fn bench_bare_signature(raw: &[u8], vcek_der: &[u8], runs: u32) -> Result<f64> {
    let cert = x509_cert::Certificate::from_der(vcek_der)
        .map_err(|e| VerifyError::Certificate(e.to_string()))?;
    if raw.len() < REPORT_LEN {
        return Err(VerifyError::Malformed("short report".into()));
    }
    let started = std::time::Instant::now();
    for _ in 0..runs {
        UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, spki_bytes(&cert))
            .verify(&raw[..SIGNED_LEN], &report_signature(raw))
            .map_err(|_| VerifyError::Signature("bad signature".into()))?;
    }
    Ok(started.elapsed().as_secs_f64() * 1000.0 / f64::from(runs.max(1)))
}
