//! The guest's image settings, which come from init-data or the KBS:
//! registries.conf (TOML), containers-policy.json, sigstore lookaside YAML,
//! registry credentials (auth.json). The first byte picks the parser.
#![no_main]

use kabuto_image::{signature::Lookaside, Credentials, RegistriesConf, SignaturePolicy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(body);
    match which % 4 {
        0 => {
            let _ = RegistriesConf::parse(&text);
        }
        1 => {
            let _ = SignaturePolicy::from_json(body);
        }
        2 => {
            let _ = Lookaside::parse(&text);
        }
        _ => {
            let _ = Credentials::parse(body);
        }
    }
});
