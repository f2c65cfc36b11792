//! JWEs a hostile KBS-in-the-middle or registry sends the guest: the KBS
//! response (flattened JSON), general JSON (ocicrypt's layer keys), with
//! EC and RSA recipient keys. Must fail cleanly, never panic.
#![no_main]

use std::sync::OnceLock;

use kabuto_jose::TeeKeyPair;
use libfuzzer_sys::fuzz_target;

fn keys() -> &'static [TeeKeyPair; 2] {
    static KEYS: OnceLock<[TeeKeyPair; 2]> = OnceLock::new();
    KEYS.get_or_init(|| [
            TeeKeyPair::generate_ec(),
            TeeKeyPair::generate_rsa(2048).expect("an RSA key"),
        ])
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let key = &keys()[usize::from(which & 1)];
    if which & 2 == 0 {
        let _ = key.decrypt_json(body);
    } else {
        let _ = key.decrypt_general_json(body);
    }
});
