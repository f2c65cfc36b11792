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

/// A confidential containerd, a KBS that trusts it and holds the owner's
/// public signing key, the plaintext of the vault secret and the KEK.
struct Pod {
    work: tempfile::TempDir,
    kbs: Kbs,
    swtee: std::path::PathBuf,
    c: kabuto_e2e::Containerd,
    doc: kabuto_initdata::InitData,
    key: PrivateSigningKey,
}

impl Pod {
    fn start() -> Pod {
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
        Pod {
            work,
            kbs,
            swtee,
            c,
            doc,
            key,
        }
    }
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn sealed_env_values_unseal_in_a_confidential_pod_and_bad_ones_refuse_it() {
    let Pod {
        work: _work,
        kbs: _kbs,
        c,
        doc,
        key,
        ..
    } = Pod::start();
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

/// A Kubernetes-style Secret volume (the atomic writer's `..data` layout)
/// and a single-file bind: the container reads the plaintext at the same
/// paths, the host's files keep the sealed form; a sealed file that does
/// not verify refuses the container, naming the file. The workload API
/// gives the pod its KBS token, which the KBS's key verifies, and fresh
/// evidence binding the caller's data.
#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn sealed_files_in_volumes_unseal_and_the_workload_api_attests() {
    let Pod {
        work,
        kbs: _kbs,
        swtee,
        c,
        doc,
        key,
    } = Pod::start();
    let sealed = format!(
        "{}\n",
        key.seal(
            &Secret::vault("kbs:///default/db/password").expect("vault"),
            KID
        )
    );

    // What the kubelet writes for a Secret with keys db and plain.
    let volume = work.path().join("secret-volume");
    let data = volume.join("..2026_12_03_10_00_00.1");
    std::fs::create_dir_all(&data).expect("volume");
    std::fs::write(data.join("db"), &sealed).expect("db");
    std::fs::write(data.join("plain"), "not-a-secret").expect("plain");
    std::os::unix::fs::symlink("..2026_12_03_10_00_00.1", volume.join("..data")).expect("..data");
    for name in ["db", "plain"] {
        std::os::unix::fs::symlink(format!("..data/{name}"), volume.join(name)).expect("link");
    }
    let token_file = work.path().join("token");
    std::fs::write(&token_file, &sealed).expect("token file");
    let init_data = annotation(&doc);
    let mount = |src: &std::path::Path, dst: &str| {
        format!("type=bind,src={},dst={dst},options=rbind:ro", src.display())
    };
    let volume_mount = mount(&volume, "/etc/secret");
    let file_mount = mount(&token_file, "/etc/token");
    let out = c.run(
        "volumes",
        &[
            "--net-host",
            "--annotation",
            &init_data,
            "--mount",
            &volume_mount,
            "--mount",
            &file_mount,
        ],
        &[
            "sh",
            "-c",
            "cat /etc/secret/db; echo; cat /etc/secret/plain; echo; cat /etc/token; echo; readlink /etc/secret/db",
        ],
    );
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.log());
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(
        lines,
        [
            VAULT_PLAINTEXT,
            "not-a-secret",
            VAULT_PLAINTEXT,
            "..data/db"
        ],
        "{}",
        stdout(&out)
    );
    assert_eq!(
        std::fs::read_to_string(data.join("db")).expect("host file"),
        sealed,
        "the host's file changed"
    );

    // The workload API: the KBS token, verified with the KBS's own key.
    let out = c.run(
        "token",
        &["--net-host", "--annotation", &init_data],
        &[
            "wget",
            "-qO-",
            "http://127.0.0.1:8006/aa/token?token_type=kbs",
        ],
    );
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.log());
    let body: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("token JSON");
    let token = body["token"].as_str().expect("a token");
    let signer = kabuto_kbs::token::TokenSigner::load_or_generate(&work.path().join("token.key"))
        .expect("the KBS's token key");
    signer
        .verify(token)
        .expect("the KBS's key verifies the token");
    let out = c.run(
        "evidence",
        &["--net-host", "--annotation", &init_data],
        &[
            "wget",
            "-qO-",
            "http://127.0.0.1:8006/aa/evidence?runtime_data=caller-nonce-1",
        ],
    );
    assert!(out.status.success(), "{}\n{}", stderr(&out), c.log());
    // It verifies as the software TEE's and binds the caller's bytes
    // (zero-padded to the report's 64).
    let evidence: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("evidence JSON");
    let root = std::fs::read(kabuto_swtee::root_cert_path(&swtee)).expect("root");
    let verifier = kabuto_verifier::Verifier::new(kabuto_verifier::TrustAnchors {
        software_tee_roots: vec![kabuto_swtee::pem_to_der(&root).expect("root DER")],
        ..Default::default()
    });
    let claims = verifier
        .verify(
            kabuto_verifier::Tee::Snp,
            &evidence,
            kabuto_verifier::Expected {
                report_data: Some(b"caller-nonce-1"),
                init_data: None,
            },
            std::time::SystemTime::now(),
        )
        .expect("the evidence verifies and binds the caller's data");
    assert!(claims
        .report_data
        .starts_with(&hex::encode(b"caller-nonce-1")));

    // A sealed file signed by another key: refused, naming the file.
    let forged = format!(
        "{}\n",
        PrivateSigningKey::generate().seal(
            &Secret::vault("kbs:///default/db/password").expect("vault"),
            KID
        )
    );
    std::fs::write(data.join("db"), &forged).expect("db");
    let out = c.run(
        "forged",
        &[
            "--net-host",
            "--annotation",
            &init_data,
            "--mount",
            &volume_mount,
        ],
        &["true"],
    );
    assert!(!out.status.success(), "a forged sealed file was accepted");
    let error = stderr(&out);
    assert!(
        error.contains("/etc/secret/") && error.contains("db") && error.contains("does not verify"),
        "{error}"
    );
    let _ = c.ctr(&["container", "delete", "forged"]);
    c.assert_no_residue();
}
