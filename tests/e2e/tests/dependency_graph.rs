//! The crate graph a reviewer reads to check the threat model: the host's
//! binaries, as a production build links them, hold no owner or guest code
//! (no verifier, policy generator, image signing or decryption, KBS,
//! attestation agent) and no software-TEE signer; the owner's KBS and policy
//! generator link no guest code. `cargo tree -e normal -p …` shows the same.

use std::process::Command;

/// Owner and guest crates: never linked into a host binary.
const OWNER_AND_GUEST: &[&str] = &[
    "kabuto-verifier",
    "kabuto-genpolicy",
    "kabuto-kbs",
    "kabuto-owner-cli",
    "kabuto-image",
    "kabuto-agent",
    "kabuto-attestation-agent",
    "kabuto-jose",
    "kabuto-policy",
    "kabuto-kbs-protocol",
];
const GUEST: &[&str] = &["kabuto-image", "kabuto-agent", "kabuto-attestation-agent"];
/// The software TEE's signing side (kabuto-swtee's `firmware` feature).
const SIGNER: &[&str] = &["rcgen", "aws-lc-rs"];

/// The crates `packages` link (normal edges only: no tests, no build scripts).
fn linked(packages: &[&str], features: &[&str]) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["tree", "--offline", "-e", "normal", "--prefix", "none"])
        .args(["--format", "{p}"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    for p in packages {
        cmd.args(["-p", p]);
    }
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    let out = cmd.output().expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let graph: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect();
    assert!(
        graph.iter().any(|c| c == packages[0]),
        "not the graph of {packages:?}: {graph:?}"
    );
    graph
}

fn present<'a>(graph: &[String], crates: &[&'a str]) -> Vec<&'a str> {
    crates
        .iter()
        .copied()
        .filter(|c| graph.iter().any(|g| g == c))
        .collect()
}

const HOST: &[&str] = &[
    "kabuto-runtime",
    "kabuto-cli",
    "kabuto-shim",
    "kabuto-snapshotter",
];

#[test]
fn a_production_host_build_links_no_owner_guest_or_signer_crate() {
    let graph = linked(HOST, &[]);
    assert_eq!(present(&graph, OWNER_AND_GUEST), Vec::<&str>::new());
    assert_eq!(present(&graph, SIGNER), Vec::<&str>::new());
}

#[test]
fn the_software_tee_signer_comes_only_with_its_feature() {
    let graph = linked(
        HOST,
        &["kabuto-shim/software-tee", "kabuto-cli/software-tee"],
    );
    assert_eq!(present(&graph, SIGNER), SIGNER.to_vec());
    assert_eq!(present(&graph, OWNER_AND_GUEST), Vec::<&str>::new());
}

#[test]
fn the_owners_kbs_and_policy_generator_link_no_guest_crate() {
    for owner in ["kabuto-kbs", "kabuto-genpolicy", "kabuto-verifier"] {
        let graph = linked(&[owner], &[]);
        assert_eq!(present(&graph, GUEST), Vec::<&str>::new(), "{owner}");
        // aws-lc-rs is the verifier's own signature checking; rcgen marks
        // the software TEE's firmware (certificate making).
        assert_eq!(present(&graph, &["rcgen"]), Vec::<&str>::new(), "{owner}");
    }
}
