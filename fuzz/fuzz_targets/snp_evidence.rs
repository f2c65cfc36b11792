//! SNP evidence as a hostile guest or host sends it to the verifier: a raw
//! report with certificates (VCEK/VLEK, ASK/ASVK, ARK, DER), and the KBS
//! protocol's JSON form. Layout of the input: a flag byte (bit 0: JSON),
//! then length-prefixed (u16 LE) chunks: the report, then certificates.
#![no_main]

use std::sync::OnceLock;
use std::time::SystemTime;

use kabuto_verifier::{Expected, Tee, TrustAnchors, Verifier};
use libfuzzer_sys::fuzz_target;

fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| Verifier::new(TrustAnchors::default()))
}

/// Splits `data` into u16-length-prefixed chunks (the last may be short).
fn chunks(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([data[0], data[1]]));
        let end = (2 + len).min(data.len());
        out.push(&data[2..end]);
        data = &data[end..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    if flags & 1 == 1 {
        if let Ok(evidence) = serde_json::from_slice::<serde_json::Value>(body) {
            let _ = verifier().verify(
                Tee::Snp,
                &evidence,
                Expected::default(),
                SystemTime::UNIX_EPOCH,
            );
        }
        return;
    }
    let parts = chunks(body);
    let Some((report, certs)) = parts.split_first() else {
        return;
    };
    let certs: Vec<Vec<u8>> = certs.iter().map(|c| c.to_vec()).collect();
    let _ = verifier().verify_snp_report(report, &certs);
});
