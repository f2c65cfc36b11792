//! What a registry or the host names and serves: image references, image
//! indexes (platform choice), image configs, layer descriptors (with
//! ocicrypt annotations). The first byte picks the parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(r) = kabuto_oci::ImageReference::parse(&String::from_utf8_lossy(body)) {
                let _ = r.api_host();
            }
        }
        1 => {
            if let Ok(index) = serde_json::from_slice::<serde_json::Value>(body) {
                let _ = kabuto_oci::platform_entry(&index);
            }
        }
        2 => {
            let _ = kabuto_oci::ImageConfig::parse(body);
        }
        _ => {
            if let Ok(d) = serde_json::from_slice::<kabuto_image::LayerDescriptor>(body) {
                let _ = d.is_encrypted();
            }
        }
    }
});
