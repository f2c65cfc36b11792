//! JWEs a hostile KBS-in-the-middle or registry sends the guest: the KBS
//! response (flattened JSON), general JSON (ocicrypt's layer keys), with
//! EC (P-256, P-521) and RSA recipient keys. Must fail cleanly, never
//! panic. The first byte picks the key (bits 0-1) and the form (bit 2).
#![no_main]

use std::sync::OnceLock;

use kabuto_jose::TeeKeyPair;
use libfuzzer_sys::fuzz_target;

fn keys() -> &'static [TeeKeyPair; 3] {
    static KEYS: OnceLock<[TeeKeyPair; 3]> = OnceLock::new();
    KEYS.get_or_init(|| {
        [
            TeeKeyPair::generate_ec(),
            TeeKeyPair::generate_rsa(2048).expect("an RSA key"),
            TeeKeyPair::generate_ec_p521(),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let key = &keys()[usize::from(which & 3) % 3];
    if which & 4 == 0 {
        let _ = key.decrypt_json(body);
    } else {
        let _ = key.decrypt_general_json(body);
    }
});
