//! An init-data document (the host passes it in an annotation; the guest
//! parses it before the policy exists): parse, and digest what parsed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(doc) = kabuto_initdata::InitData::parse(data) {
        let _ = doc.digest();
    }
});
