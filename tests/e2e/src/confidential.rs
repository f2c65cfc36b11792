//! Confidential pods for the tests: the real `kabuto-kbs` on loopback with
//! TLS, init-data pointing the guest at it, and a containerd whose kabuto
//! config launches pods in the software TEE.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kabuto_kbs::client::{generate_admin_key, AdminClient};

use crate::{paths, Containerd, Options};

/// A running `kabuto-kbs`; killed on drop.
pub struct Kbs {
    child: Child,
    pub admin: AdminClient,
    pub port: u16,
    pub cert_pem: String,
    pub dir: PathBuf,
    /// The address guests reach it at (init-data's KBS URL).
    pub guest_host: String,
}

impl Drop for Kbs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Kbs {
    /// The real KBS binary with TLS; its certificate names 10.0.2.2, the
    /// host as the guest's user-mode network sees it.
    pub fn start(dir: &Path) -> Kbs {
        Kbs::start_with(dir, "")
    }

    /// [`Kbs::start`] with `extra` appended to its configuration (e.g. an
    /// `[attestation]` table).
    pub fn start_with(dir: &Path, extra: &str) -> Kbs {
        Kbs::start_at(dir, "127.0.0.1", "10.0.2.2", extra)
    }

    /// Listening on `listen` (an address of this host), named `guest_host`
    /// in its certificate and in the init-data it writes: e.g. a pod
    /// bridge's address, for guests that reach it through their pod
    /// network.
    pub fn start_at(dir: &Path, listen: &str, guest_host: &str, extra: &str) -> Kbs {
        let port = TcpListener::bind((listen, 0))
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![
            guest_host.into(),
            listen.into(),
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
                "listen = \"{listen}:{port}\"\nstore = \"{d}/store.redb\"\ntoken_key = \"{d}/token.key\"\n\
                 [tls]\ncert = \"{d}/tls.crt\"\nkey = \"{d}/tls.key\"\n\
                 [[admin_keys]]\npublic_key = \"{d}/admin.pub\"\nroles = [\"admin\"]\n{extra}",
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
        while std::net::TcpStream::connect((listen, port)).is_err() {
            assert!(Instant::now() < deadline, "kabuto-kbs did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let admin = AdminClient::new(
            &format!("https://{listen}:{port}"),
            private.into_bytes(),
            Some(cert.pem().as_bytes()),
        )
        .expect("admin client");
        Kbs {
            child,
            admin,
            port,
            cert_pem: cert.pem(),
            dir: dir.to_path_buf(),
            guest_host: guest_host.to_string(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kbs.log")).unwrap_or_default()
    }

    /// An init-data document naming this KBS (`aa.toml`), with `policy`
    /// as its `policy.rego` and `extra` appended to `[data]`.
    pub fn init_data(&self, policy: &str, extra: &str) -> kabuto_initdata::InitData {
        self.init_data_with_aa(policy, "", extra)
    }

    /// [`Kbs::init_data`] with `aa_extra` appended to its `aa.toml`.
    pub fn init_data_with_aa(
        &self,
        policy: &str,
        aa_extra: &str,
        extra: &str,
    ) -> kabuto_initdata::InitData {
        let doc = format!(
            "version = \"0.1.0\"\nalgorithm = \"sha256\"\n\n[data]\n\"aa.toml\" = '''\n[token_configs.kbs]\nurl = \"https://{}:{}\"\ncert = \"\"\"\n{}\"\"\"\n{aa_extra}'''\n\"policy.rego\" = '''\n{policy}\n'''\n{extra}",
            self.guest_host, self.port, self.cert_pem,
        );
        kabuto_initdata::InitData::parse(doc.as_bytes()).expect("test init-data parses")
    }

    /// The owner's side for a test: trust this host's software TEE, its
    /// guest measurement (from `containerd`'s kabuto config) and `docs`.
    pub fn trust(
        &self,
        containerd: &Containerd,
        swtee: &Path,
        docs: &[&kabuto_initdata::InitData],
    ) {
        let config =
            kabuto_runtime::config::Config::from_file(&containerd.config_path()).expect("config");
        let measurement =
            kabuto_runtime::sandbox::software_tee_measurement(&config).expect("measurement");
        self.admin
            .set_software_tee_roots(
                &std::fs::read(kabuto_swtee::root_cert_path(swtee)).expect("root"),
            )
            .expect("trust");
        self.admin
            .set_reference_values(
                "measurement",
                &serde_json::json!([hex::encode(measurement)]),
            )
            .expect("measurement");
        let digests: Vec<String> = docs
            .iter()
            .map(|d| hex::encode(d.digest_for_field(32)))
            .collect();
        self.admin
            .set_reference_values("init_data", &serde_json::json!(digests))
            .expect("init-data");
    }
}

/// `--annotation` value carrying `doc` under Kata's name.
pub fn init_data_annotation(doc: &kabuto_initdata::InitData) -> String {
    format!(
        "{}={}",
        kabuto_initdata::KATA_ANNOTATION,
        doc.to_annotation()
    )
}

/// A containerd whose kabuto runtime launches pods in the software TEE
/// (key material in `swtee`, made here), with user-mode networking and
/// `extra` kabuto config appended to `[confidential]`.
pub fn confidential_containerd(
    swtee: &Path,
    extra: &str,
    env: Vec<(String, String)>,
) -> Containerd {
    confidential_containerd_with(swtee, "", extra, env)
}

/// As [`confidential_containerd`], with `hypervisor` appended to
/// `[hypervisor]` (memory, say).
pub fn confidential_containerd_with(
    swtee: &Path,
    hypervisor: &str,
    confidential: &str,
    env: Vec<(String, String)>,
) -> Containerd {
    Containerd::start_with(confidential_options(swtee, hypervisor, confidential, env))
}

/// The [`Options`] of [`confidential_containerd_with`], for tests that add
/// their own (makes the software TEE's key material in `swtee`).
pub fn confidential_options(
    swtee: &Path,
    hypervisor: &str,
    confidential: &str,
    env: Vec<(String, String)>,
) -> Options {
    kabuto_swtee::init(swtee).expect("software TEE");
    Options {
        kabuto_config: format!(
            "[hypervisor]\nguest_network = \"user\"\n{hypervisor}[confidential]\ntee = \"software\"\nsoftware_tee_dir = \"{}\"\n{confidential}",
            swtee.display()
        ),
        env,
        ..Default::default()
    }
}
