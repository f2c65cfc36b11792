//! Sealed secrets (CoCo's format) in a real confidential pod (software
//! TEE, through containerd): env values that start with `sealed.` reach the
//! container as their plaintext, unsealed in the guest with keys and
//! resources the KBS released after attestation; the data hub's
//! `POST /cdh/unseal` does the same for workloads. A value signed by
//! another key, tampered with or naming an unknown key refuses the
//! container, naming the variable and never the value.

use kabuto_e2e::confidential::{confidential_containerd, init_data_annotation as annotation, Kbs};
use kabuto_e2e::{stderr, stdout};
use kabuto_sealed_secret::{PrivateSigningKey, Secret};

const KID: &str = "kbs:///default/sealing-key/1";
const VAULT_PLAINTEXT: &str = "vault-plaintext-17";
const ENVELOPE_PLAINTEXT: &str = "envelope-plaintext-23";
const KEK: [u8; 32] = [9; 32];

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn sealed_env_values_unseal_in_a_confidential_pod_and_bad_ones_refuse_it() {
    let work = tempfile::tempdir().expect("tempdir");
    let kbs = Kbs::start(work.path());
    let swtee = work.path().join("swtee");
    let c = confidential_containerd(&swtee, "", Vec::new());
    let doc = kbs.init_data(kabuto_policy::ALLOW_ALL, "");
    kbs.trust(&c, &swtee, &[&doc]);
    let key = PrivateSigningKey::generate();
    for (path, value) in [
        (
            "default/sealing-key/1",
            key.public().to_jwk(KID).into_bytes(),
        ),
        ("default/db/password", VAULT_PLAINTEXT.as_bytes().to_vec()),
        ("default/kek/1", KEK.to_vec()),
    ] {
        kbs.admin.set_resource(path, &value).expect("resource");
    }
    let vault = Secret::vault("kbs:///default/db/password").expect("vault");
    let sealed_vault = key.seal(&vault, KID);
    let envelope = Secret::envelope("kbs:///default/kek/1", &KEK, ENVELOPE_PLAINTEXT.as_bytes())
        .expect("envelope");
    let sealed_envelope = key.seal(&envelope, KID);
    let init_data = annotation(&doc);
    let run = |id: &str, env: &[String], args: &[&str]| {
        let mut extra = vec!["--net-host", "--annotation", init_data.as_str()];
        for e in env {
            extra.extend(["--env", e.as_str()]);
        }
        c.run(id, &extra, args)
    };

    let out = run(
        "sealed",
        &[
            format!("DB={sealed_vault}"),
            format!("API={sealed_envelope}"),
        ],
        &["sh", "-c", "echo \"$DB $API\""],
    );
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.log());
    assert_eq!(
        stdout(&out).trim(),
        format!("{VAULT_PLAINTEXT} {ENVELOPE_PLAINTEXT}")
    );

    // The workload API unseals too.
    let out = run(
        "api",
        &[],
        &[
            "wget",
            "-qO-",
            "--post-data",
            &sealed_vault,
            "http://127.0.0.1:8006/cdh/unseal",
        ],
    );
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.log());
    assert_eq!(stdout(&out), VAULT_PLAINTEXT);

    // Refused, naming the variable, never the value.
    let other_key = PrivateSigningKey::generate().seal(&vault, KID);
    let unknown_kid = key.seal(&vault, "kbs:///default/sealing-key/absent");
    let parts: Vec<&str> = sealed_vault.split('.').collect();
    let tampered = format!("{}.{}.{}x.{}", parts[0], parts[1], parts[2], parts[3]);
    for (id, value, why) in [
        ("other-key", &other_key, "does not verify"),
        ("unknown-kid", &unknown_kid, "sealing-key/absent"),
        ("tampered", &tampered, "sealed secret"),
    ] {
        let out = run(id, &[format!("DB_PASSWORD={value}")], &["true"]);
        assert!(!out.status.success(), "{id}: the container started");
        let error = stderr(&out);
        assert!(
            error.contains("env DB_PASSWORD") && error.contains(why),
            "{id}: {error}"
        );
        assert!(
            !error.contains(value.as_str()),
            "{id}: the value is in the error"
        );
        let _ = c.ctr(&["container", "delete", id]);
    }
    let log = c.log();
    for plaintext in [VAULT_PLAINTEXT, ENVELOPE_PLAINTEXT] {
        assert!(!log.contains(plaintext), "the host's logs hold a plaintext");
    }
    c.assert_no_residue();
}
