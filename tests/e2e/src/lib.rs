//! Test harness: a private containerd (own root, state and socket in a
//! temporary directory, so a system containerd is never touched), a locally
//! built busybox image imported into it, and `ctr`, the real client.
//!
//! The environment comes from `scripts/test.sh` (see README.md):
//! `KABUTO_E2E_BIN_DIR` holds `containerd-shim-kabuto-v2`,
//! `KABUTO_E2E_GUEST_DIR` the guest image.

use std::{fs, path::PathBuf};

mod fixtures;
mod harness;

pub use fixtures::{busybox::*, layout::*};
pub use harness::{cni::*, containerd::*, registry::*, tools::*};

pub mod confidential;
pub mod cri;
pub mod policy_bench;

pub const RUNTIME: &str = "io.containerd.kabuto.v2";
pub const IMAGE: &str = "localhost/busybox:latest";

/// Why an e2e test is ignored by a plain `cargo test`.
pub const NEEDS_ENV: &str = "needs the e2e environment: run scripts/test.sh";

pub struct Paths {
    pub bin_dir: PathBuf,
    pub guest_dir: PathBuf,
}

pub fn paths() -> Paths {
    let var = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                panic!("{name} is not set: run the e2e tests through scripts/test.sh")
            })
    };
    Paths {
        bin_dir: var("KABUTO_E2E_BIN_DIR"),
        guest_dir: var("KABUTO_E2E_GUEST_DIR"),
    }
}

/// The guest kernel's release, from the guest image manifest.
pub fn guest_kernel_release() -> String {
    let manifest = paths().guest_dir.join("manifest.json");
    let text = fs::read_to_string(&manifest).expect("guest manifest.json");
    let value: serde_json::Value = serde_json::from_str(&text).expect("manifest is JSON");
    value["kernel_release"]
        .as_str()
        .expect("kernel_release")
        .to_string()
}
