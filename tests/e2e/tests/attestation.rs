//! Remote attestation from a real guest: a confidential pod (software TEE,
//! through containerd) attests to `kabuto-kbs` on the host's loopback and
//! its container reads a KBS resource from the data hub — only when the
//! owner's reference values match. (A host that alters the init-data after
//! launch: hostile_host.rs.)

use kabuto_e2e::confidential::{confidential_containerd, init_data_annotation as annotation, Kbs};
use kabuto_e2e::{stderr, stdout, Containerd, Options};

const SECRET: &str = "kabuto-secret-42";
const FETCH: [&str; 3] = [
    "wget",
    "-qO-",
    "http://127.0.0.1:8006/cdh/resource/default/key/1",
];

fn init_data(kbs: &Kbs, extra: &str) -> kabuto_initdata::InitData {
    kbs.init_data(kabuto_policy::ALLOW_ALL, extra)
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn confidential_pod_gets_its_secret_only_after_attestation() {
    let work = tempfile::tempdir().expect("tempdir");
    let kbs = Kbs::start(work.path());
    let swtee = work.path().join("swtee");
    let c = confidential_containerd(&swtee, "", Vec::new());

    // The owner: trusts this host's software TEE (testing), registers the
    // guest's measurement and the pod's init-data digest, stores a secret.
    let doc = init_data(&kbs, "");
    kbs.trust(&c, &swtee, &[&doc]);
    kbs.admin
        .set_resource("default/key/1", SECRET.as_bytes())
        .expect("resource");

    let out = c.run(
        "attested",
        &["--net-host", "--annotation", &annotation(&doc)],
        &FETCH,
    );
    assert!(out.status.success(), "{}\n{}", stderr(&out), stdout(&out));
    assert_eq!(stdout(&out), SECRET);

    // A pod whose init-data the owner did not register: the KBS refuses.
    let other = init_data(&kbs, "\"note.txt\" = \"another pod\"\n");
    let out = c.run(
        "unregistered",
        &["--net-host", "--annotation", &annotation(&other)],
        &FETCH,
    );
    assert!(!out.status.success());
    assert!(!stdout(&out).contains(SECRET));
    assert!(
        stderr(&out).contains("401") || stdout(&out).contains("401"),
        "{}\n{}",
        stderr(&out),
        stdout(&out)
    );
    c.assert_no_residue();
}

/// CoCo's sample attester in a real guest (`confidential.tee = "sample"`:
/// no TEE): with init-data that allows it, the pod attests to a KBS that
/// accepts sample evidence, in CoCo's evidence format, and reads its
/// secret; without that init-data setting the guest refuses the pod
/// rather than fall back to sample evidence.
#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn the_sample_attester_only_when_init_data_allows_it() {
    let work = tempfile::tempdir().expect("tempdir");
    let kbs = Kbs::start_with(work.path(), "[attestation]\naccept_sample = true\n");
    let c = Containerd::start_with(Options {
        kabuto_config: "[hypervisor]\nguest_network = \"user\"\n[confidential]\ntee = \"sample\"\n"
            .into(),
        ..Default::default()
    });
    // Sample evidence has no measurement and binds no init-data.
    for name in ["measurement", "init_data"] {
        kbs.admin
            .set_reference_values(name, &serde_json::json!([""]))
            .expect("reference values");
    }
    kbs.admin
        .set_resource("default/key/1", SECRET.as_bytes())
        .expect("resource");

    let allowed = kbs.init_data_with_aa(
        kabuto_policy::ALLOW_ALL,
        "[kabuto]\nallow_sample_attester = true\n",
        "",
    );
    let out = c.run(
        "sampled",
        &["--net-host", "--annotation", &annotation(&allowed)],
        &FETCH,
    );
    assert!(out.status.success(), "{}\n{}", stderr(&out), stdout(&out));
    assert_eq!(stdout(&out), SECRET);
    assert!(
        kbs.log().contains("released"),
        "the KBS did not release the resource: {}",
        kbs.log()
    );

    let silent = init_data(&kbs, "");
    let out = c.run(
        "not-allowed",
        &["--net-host", "--annotation", &annotation(&silent)],
        &FETCH,
    );
    assert!(!out.status.success());
    assert!(!stdout(&out).contains(SECRET));
    assert!(
        stderr(&out).contains("allow_sample_attester"),
        "{}\n{}",
        stderr(&out),
        stdout(&out)
    );
    c.assert_no_residue();
}
