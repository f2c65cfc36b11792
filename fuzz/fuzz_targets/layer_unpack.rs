//! A hostile registry's layer (an uncompressed tar, whiteouts included),
//! unpacked into a fresh root on tmpfs. Beyond "no panic": nothing may
//! appear beside the root, and the sentinel beside it stays untouched.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use kabuto_image::{unpack_layer, Layer, UnpackOptions};
use libfuzzer_sys::fuzz_target;

const SENTINEL: &[u8] = b"outside the root";

/// `/dev/shm/kabuto-fuzz-<pid>/`: holds `root` and `sentinel` only.
fn base() -> &'static PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let base = PathBuf::from(format!("/dev/shm/kabuto-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).expect("fuzz base directory");
        std::fs::write(base.join("sentinel"), SENTINEL).expect("sentinel");
        base
    })
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    let root = base.join("root");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir(&root).expect("root");
    let layer = Layer {
        media_type: "application/vnd.oci.image.layer.v1.tar",
        digest: "sha256:fuzz",
        data,
    };
    let _ = unpack_layer(&layer, &root, UnpackOptions::default());
    let mut beside: Vec<_> = std::fs::read_dir(base)
        .expect("base")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    beside.sort();
    assert_eq!(beside, ["root", "sentinel"], "a layer wrote beside the root");
    assert_eq!(
        std::fs::read(base.join("sentinel")).ok().as_deref(),
        Some(SENTINEL),
        "a layer changed a file outside the root"
    );
    std::fs::remove_dir_all(&root).expect("clean root");
});
