//! TDX evidence: a quote (v4/v5) with the TD's CCEL event log, verified
//! against DCAP collateral, and the event log parsed and replayed alone.
//! Input: a u16 LE quote length, the quote, then the event log. The
//! collateral is the JSON file named by KABUTO_FUZZ_TDX_COLLATERAL
//! (scripts/fuzz.sh passes the public test vector's when it exists);
//! without it only the event log and the quote's header checks run.
#![no_main]

use std::sync::OnceLock;
use std::time::SystemTime;

use kabuto_verifier::{eventlog, QuoteCollateralV3, TrustAnchors, Verifier};
use libfuzzer_sys::fuzz_target;

fn collateral() -> Option<&'static QuoteCollateralV3> {
    static COLLATERAL: OnceLock<Option<QuoteCollateralV3>> = OnceLock::new();
    COLLATERAL
        .get_or_init(|| {
            let path = std::env::var("KABUTO_FUZZ_TDX_COLLATERAL").ok()?;
            let text = std::fs::read_to_string(path).ok()?;
            kabuto_verifier::tdx::collateral_from_json(&text).ok()
        })
        .as_ref()
}

fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| Verifier::new(TrustAnchors::default()))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let len = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
    let (quote, log) = data[2..].split_at(len);
    if let Ok(events) = eventlog::parse(log) {
        let rtmrs = eventlog::replay(&events);
        let _ = eventlog::check(&events, [&rtmrs[0], &rtmrs[1], &rtmrs[2], &rtmrs[3]]);
    }
    match collateral() {
        Some(c) => {
            let _ = verifier().verify_tdx_quote(quote, Some(log), c, SystemTime::UNIX_EPOCH);
        }
        None => {
            let _ = kabuto_verifier::tdx::collateral_from_json(&String::from_utf8_lossy(quote));
        }
    }
});
