//! Remote attestation from a real guest: a confidential pod (software TEE,
//! through containerd) attests to `kabuto-kbs` on the host's loopback and
//! its container reads a KBS resource from the data hub — only when the
//! owner's reference values match; and a host that alters the init-data
//! after launch gets no pod at all.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kabuto_e2e::{paths, stderr, stdout, Containerd, Options};
use kabuto_kbs::client::{generate_admin_key, AdminClient};

const SECRET: &str = "kabuto-secret-42";
const FETCH: [&str; 3] = [
    "wget",
    "-qO-",
    "http://127.0.0.1:8006/cdh/resource/default/key/1",
];

struct Kbs {
    child: Child,
    admin: AdminClient,
    port: u16,
    cert_pem: String,
}

impl Drop for Kbs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real KBS binary with TLS; its certificate names 10.0.2.2, the host
/// as the guest's user-mode network sees it.
fn start_kbs(dir: &Path) -> Kbs {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![
        "10.0.2.2".into(),
        "127.0.0.1".into(),
        "localhost".into(),
    ])
    .expect("params")
    .self_signed(&key)
    .expect("cert");
    std::fs::write(dir.join("tls.crt"), cert.pem()).expect("write");
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).expect("write");
    let (private, public) = generate_admin_key().expect("admin key");
    std::fs::write(dir.join("admin.pub"), public).expect("write");
    std::fs::write(
        dir.join("kbs.toml"),
        format!(
            "listen = \"127.0.0.1:{port}\"\nstore = \"{d}/store.redb\"\ntoken_key = \"{d}/token.key\"\n\
             [tls]\ncert = \"{d}/tls.crt\"\nkey = \"{d}/tls.key\"\n\
             [[admin_keys]]\npublic_key = \"{d}/admin.pub\"\nroles = [\"admin\"]\n",
            d = dir.display()
        ),
    )
    .expect("write");
    let log = std::fs::File::create(dir.join("kbs.log")).expect("log");
    let child = Command::new(paths().bin_dir.join("kabuto-kbs"))
        .args(["serve", "--config"])
        .arg(dir.join("kbs.toml"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting kabuto-kbs");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "kabuto-kbs did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let admin = AdminClient::new(
        &format!("https://127.0.0.1:{port}"),
        private.into_bytes(),
        Some(cert.pem().as_bytes()),
    )
    .expect("admin client");
    Kbs {
        child,
        admin,
        port,
        cert_pem: cert.pem(),
    }
}

fn init_data(kbs: &Kbs, extra: &str) -> kabuto_initdata::InitData {
    let doc = format!(
        "version = \"0.1.0\"\nalgorithm = \"sha256\"\n\n[data]\n\"aa.toml\" = '''\n[token_configs.kbs]\nurl = \"https://10.0.2.2:{}\"\ncert = \"\"\"\n{}\"\"\"\n'''\n\"policy.rego\" = '''\n{}\n'''\n{extra}",
        kbs.port,
        kbs.cert_pem,
        kabuto_policy::ALLOW_ALL
    );
    kabuto_initdata::InitData::parse(doc.as_bytes()).expect("test init-data parses")
}

fn annotation(doc: &kabuto_initdata::InitData) -> String {
    format!(
        "{}={}",
        kabuto_initdata::KATA_ANNOTATION,
        doc.to_annotation()
    )
}

fn confidential_containerd(swtee: &Path, env: Vec<(String, String)>) -> Containerd {
    Containerd::start_with(Options {
        kabuto_config: format!(
            "[hypervisor]\nguest_network = \"user\"\n[confidential]\ntee = \"software\"\nsoftware_tee_dir = \"{}\"\n",
            swtee.display()
        ),
        env,
        ..Default::default()
    })
}

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn confidential_pod_gets_its_secret_only_after_attestation() {
    let work = tempfile::tempdir().expect("tempdir");
    let kbs = start_kbs(work.path());
    let swtee = work.path().join("swtee");
    kabuto_swtee::init(&swtee).expect("software TEE");
    let c = confidential_containerd(&swtee, Vec::new());

    // The owner: trusts this host's software TEE (testing), registers the
    // guest's measurement and the pod's init-data digest, stores a secret.
    let config = kabuto_runtime::config::Config::from_file(&c.config_path()).expect("config");
    let measurement =
        kabuto_runtime::sandbox::software_tee_measurement(&config).expect("measurement");
    let doc = init_data(&kbs, "");
    kbs.admin
        .set_software_tee_roots(&std::fs::read(kabuto_swtee::root_cert_path(&swtee)).expect("root"))
        .expect("trust");
    kbs.admin
        .set_reference_values(
            "measurement",
            &serde_json::json!([hex::encode(measurement)]),
        )
        .expect("measurement");
    kbs.admin
        .set_reference_values(
            "init_data",
            &serde_json::json!([hex::encode(doc.digest_for_field(32))]),
        )
        .expect("init-data");
    kbs.admin
        .set_resource("default/key/1", SECRET.as_bytes())
        .expect("resource");

    let out = c.run("attested", &["--annotation", &annotation(&doc)], &FETCH);
    assert!(out.status.success(), "{}\n{}", stderr(&out), stdout(&out));
    assert_eq!(stdout(&out), SECRET);

    // A pod whose init-data the owner did not register: the KBS refuses.
    let other = init_data(&kbs, "\"note.txt\" = \"another pod\"\n");
    let out = c.run(
        "unregistered",
        &["--annotation", &annotation(&other)],
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

#[test]
#[ignore = "needs the e2e environment: run scripts/test.sh"]
fn init_data_altered_after_launch_is_refused_by_the_guest() {
    let work = tempfile::tempdir().expect("tempdir");
    let kbs = start_kbs(work.path());
    let swtee = work.path().join("swtee");
    kabuto_swtee::init(&swtee).expect("software TEE");
    let c = confidential_containerd(
        &swtee,
        vec![(
            kabuto_runtime::sandbox::TEST_ALTER_INIT_DATA_ENV.into(),
            "1".into(),
        )],
    );
    let doc = init_data(&kbs, "");
    let out = c.run("tampered", &["--annotation", &annotation(&doc)], &["true"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does not match the TEE's HOST_DATA"),
        "{}",
        stderr(&out)
    );
    c.assert_no_residue();
}
