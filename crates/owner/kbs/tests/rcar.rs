//! The KBS protocol end to end: the real `kabuto-kbs` binary on loopback,
//! the guest's attestation-agent client, and the software TEE's firmware
//! (the same code the runtime serves to guests) on a Unix socket.

#![allow(clippy::unwrap_used, clippy::result_large_err)]

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kabuto_attestation_agent::{evidence, AttestError, EvidenceProvider, KbsClient, TeeKind};
use kabuto_kbs::client::{generate_admin_key, AdminClient};

const INIT_DATA: &str = "version = \"0.1.0\"\nalgorithm = \"sha256\"\n\n[data]\n\"policy.rego\" = \"package agent_policy\"\n";

/// The digest of [`INIT_DATA`] as the software TEE's HOST_DATA holds it (hex).
fn init_data_digest() -> String {
    let doc = kabuto_initdata::InitData::parse(INIT_DATA.as_bytes()).unwrap();
    hex::encode(doc.digest_for_field(32))
}

struct Kbs {
    dir: tempfile::TempDir,
    child: Option<Child>,
    url: String,
    admin: AdminClient,
    ca_pem: Option<Vec<u8>>,
}

struct Options {
    session_ttl: u64,
    tls: bool,
    admin_roles: &'static str,
    accept_sample: bool,
    /// Also trust an Ed25519 admin key (trustee's admin auth), made with
    /// openssl as trustee's docs say, at `trustee-admin.key` / `.pub`.
    trustee_admin_key: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            session_ttl: 300,
            tls: false,
            admin_roles: "\"admin\"",
            accept_sample: false,
            trustee_admin_key: false,
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Kbs {
    fn start(options: Options) -> Kbs {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let (private, public) = generate_admin_key().unwrap();
        std::fs::write(dir.path().join("admin.pub"), public).unwrap();
        std::fs::write(dir.path().join("admin.key"), &private).unwrap();
        let (scheme, tls, ca_pem) = if options.tls {
            let key = rcgen::KeyPair::generate().unwrap();
            let params =
                rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
                    .unwrap();
            let cert = params.self_signed(&key).unwrap();
            std::fs::write(dir.path().join("tls.crt"), cert.pem()).unwrap();
            std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).unwrap();
            (
                "https",
                format!(
                    "cert = \"{0}/tls.crt\"\nkey = \"{0}/tls.key\"\n",
                    dir.path().display()
                ),
                Some(cert.pem().into_bytes()),
            )
        } else {
            ("http", "insecure_http = true\n".to_string(), None)
        };
        let config = format!(
            "listen = \"127.0.0.1:{port}\"\nstore = \"{d}/store.redb\"\ntoken_key = \"{d}/token.key\"\nsession_ttl_secs = {ttl}\n\n[tls]\n{tls}\n[[admin_keys]]\npublic_key = \"{d}/admin.pub\"\nroles = [{roles}]\n[attestation]\naccept_sample = {sample}\n",
            d = dir.path().display(),
            sample = options.accept_sample,
            ttl = options.session_ttl,
            roles = options.admin_roles,
        );
        let config = if options.trustee_admin_key {
            let key = dir.path().join("trustee-admin.key");
            let public = dir.path().join("trustee-admin.pub");
            let run = |args: &[&std::ffi::OsStr]| {
                let status = Command::new("openssl").args(args).status().unwrap();
                assert!(status.success(), "openssl {args:?}");
            };
            run(&[
                "genpkey".as_ref(),
                "-algorithm".as_ref(),
                "ed25519".as_ref(),
                "-out".as_ref(),
                key.as_os_str(),
            ]);
            run(&[
                "pkey".as_ref(),
                "-in".as_ref(),
                key.as_os_str(),
                "-pubout".as_ref(),
                "-out".as_ref(),
                public.as_os_str(),
            ]);
            format!(
                "{config}\n[[admin_keys]]\npublic_key = \"{}\"\nroles = [\"admin\"]\n",
                public.display()
            )
        } else {
            config
        };
        std::fs::write(dir.path().join("kbs.toml"), config).unwrap();
        let host = if options.tls {
            "localhost"
        } else {
            "127.0.0.1"
        };
        let url = format!("{scheme}://{host}:{port}");
        let admin = AdminClient::new(&url, private.into_bytes(), ca_pem.as_deref()).unwrap();
        let mut kbs = Kbs {
            dir,
            child: None,
            url,
            admin,
            ca_pem,
        };
        kbs.spawn();
        kbs
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("kbs.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kabuto-kbs"))
            .args(["serve", "--config"])
            .arg(self.dir.path().join("kbs.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let port: u16 = self.url.rsplit(':').next().unwrap().parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "kabuto-kbs did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kbs.log")).unwrap_or_default()
    }

    /// The owner's side: trust `fw`'s root and register its measurement and
    /// the digest of [`INIT_DATA`] (the default policy fails closed).
    fn trust(&self, fw: &Firmware) {
        self.admin.set_software_tee_roots(&fw.root_pem).unwrap();
        self.admin
            .set_reference_values("measurement", &serde_json::json!([fw.measurement_hex()]))
            .unwrap();
        self.admin
            .set_reference_values("init_data", &serde_json::json!([init_data_digest()]))
            .unwrap();
    }

    /// The error a guest of `firmware` with the test's init-data gets for
    /// `uri`.
    fn refused(&self, firmware: &Firmware, uri: &str) -> AttestError {
        self.client(firmware, Some(INIT_DATA))
            .get_resource(uri)
            .unwrap_err()
    }

    fn client(&self, firmware: &Firmware, init_data: Option<&str>) -> KbsClient {
        KbsClient::new(
            &self.url,
            self.ca_pem.as_deref(),
            firmware.provider(),
            init_data.map(str::to_owned),
        )
        .unwrap()
    }
}

impl Drop for Kbs {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The software TEE's firmware as the runtime serves it, on a Unix socket.
struct Firmware {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    root_pem: Vec<u8>,
    launch: kabuto_swtee::LaunchData,
}

impl Firmware {
    /// A guest launched with `init_data` fixed into HOST_DATA.
    fn start(init_data: &str) -> Firmware {
        let dir = tempfile::tempdir().unwrap();
        kabuto_swtee::init(&dir.path().join("swtee")).unwrap();
        let fw = Arc::new(kabuto_swtee::Firmware::load(&dir.path().join("swtee")).unwrap());
        let digest = kabuto_initdata::InitData::parse(init_data.as_bytes())
            .unwrap()
            .digest_for_field(32);
        let launch = kabuto_swtee::LaunchData {
            measurement: kabuto_swtee::measurement(b"kernel", b"initramfs", "console=hvc0"),
            host_data: digest.try_into().unwrap(),
        };
        let socket = dir.path().join("firmware.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let served = fw.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let _ = served.serve_one(&launch, &mut stream);
            }
        });
        let root_pem =
            std::fs::read(kabuto_swtee::root_cert_path(&dir.path().join("swtee"))).unwrap();
        Firmware {
            _dir: dir,
            socket,
            root_pem,
            launch,
        }
    }

    fn provider(&self) -> Box<dyn EvidenceProvider> {
        let socket = self.socket.clone();
        let connect: evidence::Connector = Box::new(move || {
            Ok(Box::new(std::os::unix::net::UnixStream::connect(&socket)?)
                as Box<dyn evidence::ReadWrite>)
        });
        kabuto_attestation_agent::provider(TeeKind::SoftwareTee, Some(connect)).unwrap()
    }

    fn measurement_hex(&self) -> String {
        hex::encode(self.launch.measurement)
    }
}

/// Raw protocol step 1: `/auth`; returns the cookie and the challenge.
fn auth(agent: &ureq::Agent, url: &str, tee: kbs_types::Tee) -> (String, kbs_types::Challenge) {
    let response = agent
        .post(&format!("{url}/kbs/v0/auth"))
        .send_json(kabuto_attestation_agent::request(tee))
        .unwrap();
    let cookie = response
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    (cookie, response.into_json().unwrap())
}

/// The body of a 401 answer, or a panic naming what came instead.
/// A session at `url` challenged for `provider`'s TEE (its cookie), and
/// the attestation that answers the challenge (not sent).
fn challenged(
    agent: &ureq::Agent,
    url: &str,
    provider: &dyn EvidenceProvider,
) -> (String, kbs_types::Attestation) {
    let (cookie, challenge) = auth(agent, url, provider.tee());
    let (attestation, _key) =
        kabuto_attestation_agent::attestation(provider, &challenge, Some(INIT_DATA)).unwrap();
    (cookie, attestation)
}

fn unauthorized<T: std::fmt::Debug>(result: Result<T, ureq::Error>, what: &str) -> String {
    match result {
        Err(ureq::Error::Status(401, r)) => r.into_string().unwrap(),
        other => panic!("{what} answered {other:?}"),
    }
}

fn check_of(err: &AttestError) -> String {
    err.check().unwrap_or("").to_string()
}

#[test]
fn resource_released_only_after_attestation_and_only_to_trusted_tees() {
    let kbs = Kbs::start(Options::default());
    let fw = Firmware::start(INIT_DATA);
    kbs.admin
        .set_resource("default/key/1", b"top secret")
        .unwrap();

    // No attestation: no resource.
    let raw = ureq::get(&format!("{}/kbs/v0/resource/default/key/1", kbs.url)).call();
    match raw {
        Err(ureq::Error::Status(401, r)) => {
            let body = r.into_string().unwrap();
            assert!(body.contains("session"), "{body}");
            assert!(!body.contains("top secret"));
        }
        other => panic!("unattested GET answered {other:?}"),
    }

    // The software TEE is refused until the owner trusts its root.
    let client = kbs.client(&fw, Some(INIT_DATA));
    let err = client.get_resource("kbs:///default/key/1").unwrap_err();
    assert_eq!(check_of(&err), "software-tee-trust", "{err}");

    kbs.trust(&fw);
    let secret = client.get_resource("kbs:///default/key/1").unwrap();
    assert_eq!(secret.as_slice(), b"top secret");

    // The token is cached: a second resource needs no new handshake.
    kbs.admin.set_resource("default/key/2", b"second").unwrap();
    assert_eq!(resource(&client, "kbs:///default/key/2"), b"second");
    let err = client.get_resource("kbs:///default/key/404").unwrap_err();
    assert!(matches!(err, AttestError::Kbs { status: 404, .. }), "{err}");
}

#[test]
fn appraisal_refusals_name_the_failed_check() {
    let kbs = Kbs::start(Options::default());
    let fw = Firmware::start(INIT_DATA);
    kbs.admin.set_software_tee_roots(&fw.root_pem).unwrap();
    kbs.admin.set_resource("default/key/1", b"s").unwrap();

    // Nothing registered: refused (fail closed), naming what is missing.
    let err = kbs.refused(&fw, "kbs:///default/key/1");
    assert_eq!(check_of(&err), "attestation-policy", "{err}");
    assert!(
        err.to_string()
            .contains("no reference values are registered"),
        "{err}"
    );

    // Wrong measurement.
    kbs.admin
        .set_reference_values("measurement", &serde_json::json!(["00ff"]))
        .unwrap();
    let err = kbs.refused(&fw, "kbs:///default/key/1");
    assert_eq!(check_of(&err), "attestation-policy", "{err}");
    assert!(err.to_string().contains("measurement"), "{err}");

    // Right measurement, wrong init-data reference value.
    kbs.admin
        .set_reference_values("measurement", &serde_json::json!([fw.measurement_hex()]))
        .unwrap();
    kbs.admin
        .set_reference_values("init_data", &serde_json::json!(["ab"]))
        .unwrap();
    let err = kbs.refused(&fw, "kbs:///default/key/1");
    assert!(err.to_string().contains("init-data digest"), "{err}");

    // A guest presenting init-data other than what its TEE was launched with.
    let forged = INIT_DATA.replace("agent_policy", "anything_goes");
    let err = kbs
        .client(&fw, Some(&forged))
        .get_resource("kbs:///default/key/1")
        .unwrap_err();
    assert_eq!(check_of(&err), "init-data", "{err}");
    assert!(err.to_string().contains("HOST_DATA"), "{err}");

    // Everything registered correctly: released.
    kbs.admin
        .set_reference_values("init_data", &serde_json::json!([init_data_digest()]))
        .unwrap();
    assert_eq!(
        resource(&kbs.client(&fw, Some(INIT_DATA)), "kbs:///default/key/1"),
        b"s"
    );
}

/// Flips one bit of the report signature in the evidence.
struct Tampering(Box<dyn EvidenceProvider>);

impl EvidenceProvider for Tampering {
    fn tee(&self) -> kbs_types::Tee {
        self.0.tee()
    }
    fn evidence(&self, report_data: &[u8]) -> Result<serde_json::Value, AttestError> {
        let mut evidence = self.0.evidence(report_data)?;
        let r = &mut evidence["attestation_report"]["signature"]["r"][0];
        *r = serde_json::json!(r.as_u64().unwrap() ^ 1);
        Ok(evidence)
    }
    fn describe(&self) -> String {
        "tampering".into()
    }
}

#[test]
fn tampered_evidence_and_replays_are_refused() {
    let kbs = Kbs::start(Options::default());
    let fw = Firmware::start(INIT_DATA);
    kbs.trust(&fw);

    let tampering = KbsClient::new(
        &kbs.url,
        None,
        Box::new(Tampering(fw.provider())),
        Some(INIT_DATA.into()),
    )
    .unwrap();
    let err = tampering.attest().unwrap_err();
    assert_eq!(check_of(&err), "signature", "{err}");

    // Replay: the same attestation twice on the same session.
    let agent = ureq::Agent::new();
    let provider = fw.provider();
    let (cookie, attestation) = challenged(&agent, &kbs.url, provider.as_ref());
    let attest = |cookie: &str| {
        agent
            .post(&format!("{}/kbs/v0/attest", kbs.url))
            .set("Cookie", cookie)
            .send_json(&attestation)
    };
    assert!(attest(&cookie).is_ok());
    let body = unauthorized(attest(&cookie), "replay");
    assert!(body.contains("single-use"), "{body}");
    // The old nonce on a fresh session.
    let (fresh_cookie, _) = auth(&agent, &kbs.url, provider.tee());
    let body = unauthorized(attest(&fresh_cookie), "stale nonce");
    assert!(body.contains("\"nonce\""), "{body}");
}

#[test]
fn sessions_expire() {
    let kbs = Kbs::start(Options {
        session_ttl: 1,
        ..Default::default()
    });
    let fw = Firmware::start(INIT_DATA);
    kbs.trust(&fw);
    let agent = ureq::Agent::new();
    let provider = fw.provider();
    let (cookie, attestation) = challenged(&agent, &kbs.url, provider.as_ref());
    std::thread::sleep(Duration::from_millis(1500));
    let result = agent
        .post(&format!("{}/kbs/v0/attest", kbs.url))
        .set("Cookie", &cookie)
        .send_json(&attestation);
    let body = unauthorized(result, "expired session");
    assert!(body.contains("expired"), "{body}");
}

/// Unauthenticated /auth calls cost nothing: a peer that floods them fills
/// only its own share of the challenge table, and a guest that attests
/// meanwhile is served (the table once filled for 300 s and answered 503).
#[test]
fn an_auth_flood_does_not_lock_guests_out() {
    let kbs = Kbs::start(Options::default());
    let fw = Firmware::start(INIT_DATA);
    kbs.trust(&fw);
    kbs.admin
        .set_resource("default/key/1", b"still served")
        .unwrap();
    let client = kbs.client(&fw, Some(INIT_DATA));
    let flooder = ureq::Agent::new();
    let request = serde_json::json!({"version": "0.4.0", "tee": "sample", "extra-params": ""});
    let flood = |n: usize| {
        for _ in 0..n {
            let response = flooder
                .post(&format!("{}/kbs/v0/auth", kbs.url))
                .send_json(&request)
                .expect("auth");
            assert_eq!(response.status(), 200);
        }
    };
    // More than one peer may hold: the oldest are dropped, never a 503.
    flood(kabuto_kbs::sessions::MAX_CHALLENGES_PER_PEER + 50);
    assert_eq!(resource(&client, "kbs:///default/key/1"), b"still served");
    assert!(
        kbs.log().contains("challenge bound reached"),
        "{}",
        kbs.log()
    );
}

#[test]
fn resource_policy_denies_by_path() {
    let kbs = Kbs::start(Options::default());
    let fw = Firmware::start(INIT_DATA);
    kbs.trust(&fw);
    kbs.admin.set_resource("team-a/key/1", b"a").unwrap();
    kbs.admin.set_resource("team-b/key/1", b"b").unwrap();
    kbs.admin
        .set_resource_policy(
            "package kabuto.resource\nimport rego.v1\ndefault allow := false\nallow if input.resource.repository == \"team-a\"\n",
        )
        .unwrap();
    let client = kbs.client(&fw, Some(INIT_DATA));
    assert_eq!(resource(&client, "kbs:///team-a/key/1"), b"a");
    let err = client.get_resource("kbs:///team-b/key/1").unwrap_err();
    assert!(matches!(err, AttestError::Kbs { status: 403, .. }), "{err}");
    assert_eq!(check_of(&err), "resource-policy");
    // A policy that does not compile is refused and the old one stays.
    assert!(kbs
        .admin
        .set_resource_policy("package kabuto.resource\nallow if {")
        .is_err());
    assert_eq!(resource(&client, "kbs:///team-a/key/1"), b"a");
}

#[test]
fn admin_api_needs_a_configured_key_and_role() {
    let kbs = Kbs::start(Options {
        admin_roles: "\"resource-writer\"",
        ..Default::default()
    });
    let fw = Firmware::start(INIT_DATA);
    kbs.admin
        .set_resource("default/key/1", b"original")
        .unwrap();

    let (stranger, _) = generate_admin_key().unwrap();
    let intruder = AdminClient::new(&kbs.url, stranger.into_bytes(), None).unwrap();
    let err = intruder.set_resource("default/key/1", b"evil").unwrap_err();
    assert!(err.to_string().contains("HTTP 401: admin-auth"), "{err}");
    let err = ureq::post(&format!("{}/kbs/v0/resource/default/key/1", kbs.url))
        .send_bytes(b"evil")
        .unwrap_err();
    assert!(matches!(err, ureq::Error::Status(401, _)));
    // A resource writer may not change policies.
    let err = kbs.admin.set_software_tee_roots(&fw.root_pem).unwrap_err();
    assert!(err.to_string().contains("HTTP 403: admin-role"), "{err}");

    // Nothing changed: the software TEE is still untrusted, the resource intact.
    let err = kbs.client(&fw, Some(INIT_DATA)).attest().unwrap_err();
    assert_eq!(check_of(&err), "software-tee-trust");
    kbs.admin.set_resource("default/key/2", b"x").unwrap();
    let db = kbs.dir.path().join("store.redb");
    assert!(db.exists());
}

/// An admin token seen on the wire cannot be replayed; tokens for another
/// audience or with an unbounded lifetime are no admin tokens.
#[test]
fn admin_tokens_are_single_use_bounded_and_for_this_api() {
    let kbs = Kbs::start(Options::default());
    let private = std::fs::read(kbs.dir.path().join("admin.key")).unwrap();
    let post = |token: &str| {
        ureq::post(&format!("{}/kbs/v0/resource/default/key/1", kbs.url))
            .set("Authorization", &format!("Bearer {token}"))
            .send_bytes(b"value")
    };
    let token = kabuto_kbs::client::admin_token(&private, "test", Duration::from_secs(60)).unwrap();
    assert_eq!(post(&token).unwrap().status(), 200);
    let replayed = unauthorized(post(&token), "replayed admin token");
    assert!(replayed.contains("already used"), "{replayed}");

    let sign = |claims: serde_json::Value| {
        let key = jsonwebtoken::EncodingKey::from_ec_pem(&private).unwrap();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &claims,
            &key,
        )
        .unwrap()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for (claims, what) in [
        (
            serde_json::json!({"exp": now + 60, "iat": now, "jti": "a"}),
            "no audience",
        ),
        (
            serde_json::json!({"exp": now + 60, "iat": now, "aud": "other", "jti": "b"}),
            "another audience",
        ),
        (
            serde_json::json!({"exp": now + 30 * 86400, "iat": now, "aud": "kabuto-kbs-admin", "jti": "c"}),
            "a 30-day lifetime",
        ),
        (
            serde_json::json!({"exp": now + 60, "aud": "kabuto-kbs-admin", "jti": "d"}),
            "no issue time",
        ),
        (
            serde_json::json!({"exp": now + 60, "iat": now, "aud": "kabuto-kbs-admin"}),
            "no jti",
        ),
    ] {
        unauthorized(post(&sign(claims)), what);
    }
    // The resource holds what the one accepted call wrote.
    kbs.admin.set_resource("default/key/2", b"x").unwrap();
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let mut kbs = Kbs::start(Options::default());
    let fw = Firmware::start(INIT_DATA);
    kbs.trust(&fw);
    for i in 0..20 {
        kbs.admin
            .set_resource(&format!("default/key/{i}"), format!("value {i}").as_bytes())
            .unwrap();
    }
    kbs.kill9();
    kbs.spawn();
    let client = kbs.client(&fw, Some(INIT_DATA));
    for i in [0, 7, 19] {
        assert_eq!(
            client
                .get_resource(&format!("kbs:///default/key/{i}"))
                .unwrap()
                .as_slice(),
            format!("value {i}").as_bytes()
        );
    }
}

#[test]
fn tls_with_the_owner_ca() {
    let kbs = Kbs::start(Options {
        tls: true,
        ..Default::default()
    });
    let fw = Firmware::start(INIT_DATA);
    kbs.trust(&fw);
    kbs.admin
        .set_resource("default/key/1", b"over tls")
        .unwrap();
    assert_eq!(
        resource(&kbs.client(&fw, Some(INIT_DATA)), "kbs:///default/key/1"),
        b"over tls"
    );
    // A guest that was not given the KBS certificate does not talk to it.
    let other_ca = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let wrong = KbsClient::new(
        &kbs.url,
        Some(other_ca.pem().as_bytes()),
        fw.provider(),
        Some(INIT_DATA.into()),
    )
    .unwrap();
    let err = wrong.attest().unwrap_err();
    assert!(matches!(err, AttestError::Transport { .. }), "{err}");
}

/// Raw protocol: auth, then attest with `evidence` built from the challenge.
fn handshake(
    url: &str,
    tee: kbs_types::Tee,
    evidence: impl Fn(&[u8]) -> serde_json::Value,
) -> Result<(String, kabuto_jose::TeeKeyPair), ureq::Error> {
    let key = kabuto_jose::TeeKeyPair::generate_ec();
    let token = handshake_with_key(url, tee, &key.public_jwk(), evidence)?;
    Ok((token, key))
}

/// [`handshake`] with the client's `tee-pubkey` chosen by the caller.
fn handshake_with_key(
    url: &str,
    tee: kbs_types::Tee,
    tee_pubkey: &kbs_types::TeePubKey,
    evidence: impl Fn(&[u8]) -> serde_json::Value,
) -> Result<String, ureq::Error> {
    handshake_with_devices(url, tee, tee_pubkey, |_| String::new(), evidence)
}

/// The whole RCAR handshake as CoCo's client runs it: the devices'
/// evidence (`devices`, given the digest of the runtime data alone) is the
/// `additional-evidence` string, which the primary evidence then binds.
fn handshake_with_devices(
    url: &str,
    tee: kbs_types::Tee,
    tee_pubkey: &kbs_types::TeePubKey,
    devices: impl Fn(&[u8]) -> String,
    evidence: impl Fn(&[u8]) -> serde_json::Value,
) -> Result<String, ureq::Error> {
    let agent = ureq::Agent::new();
    let (cookie, challenge) = auth(&agent, url, tee);
    let sha384 = |value: &serde_json::Value| {
        kbs_types::HashAlgorithm::Sha384.digest(&kabuto_jose::canonical_json(value).unwrap())
    };
    let additional = devices(&sha384(&serde_json::json!({
        "tee-pubkey": tee_pubkey,
        "nonce": challenge.nonce,
    })));
    let digest = sha384(&serde_json::json!({
        "tee-pubkey": tee_pubkey,
        "nonce": challenge.nonce,
        "additional-evidence": additional,
    }));
    let attestation = serde_json::json!({
        "runtime-data": {"nonce": challenge.nonce, "tee-pubkey": tee_pubkey},
        "tee-evidence": {"primary_evidence": evidence(&digest), "additional_evidence": additional},
    });
    let response: serde_json::Value = agent
        .post(&format!("{url}/kbs/v0/attest"))
        .set("Cookie", &cookie)
        .send_json(attestation)?
        .into_json()
        .unwrap();
    Ok(response["token"].as_str().unwrap().to_string())
}

/// CoCo's sample attester's evidence for `report_data`.
fn sample_evidence(report_data: &[u8]) -> serde_json::Value {
    use base64::Engine;
    serde_json::json!({
        "svn": "1",
        "report_data": base64::engine::general_purpose::STANDARD.encode(report_data),
    })
}

/// A KBS that takes sample evidence, with reference values that sample
/// evidence (no measurement, no init-data) meets, holding `resource`.
fn sample_kbs(resource: &str, value: &[u8]) -> Kbs {
    let kbs = Kbs::start(Options {
        accept_sample: true,
        ..Default::default()
    });
    kbs.admin.set_resource(resource, value).unwrap();
    for name in ["measurement", "init_data"] {
        kbs.admin
            .set_reference_values(name, &serde_json::json!([""]))
            .unwrap();
    }
    kbs
}

/// `response` (a resource JWE from the KBS) with its protected header
/// replaced by what CoCo's client authenticates: the header parsed and
/// re-serialized by kbs-types with serde_json's default features, which
/// sorts keys (this test's build has preserve_order on, so sort explicitly).
fn as_coco_client_reads_it(response: &str) -> (serde_json::Value, Vec<u8>) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut doc: serde_json::Value = serde_json::from_str(response).unwrap();
    let protected = b64.decode(doc["protected"].as_str().unwrap()).unwrap();
    let header: serde_json::Value = serde_json::from_slice(&protected).unwrap();
    doc["protected"] = b64
        .encode(kabuto_jose::canonical_json(&header).unwrap())
        .into();
    let wire = serde_json::to_vec(&doc).unwrap();
    (header, wire)
}

/// CoCo's `sample` attester output, as existing guest tooling sends it;
/// the token then works as a bearer credential without the cookie.
#[test]
fn sample_evidence_and_bearer_tokens() {
    let sample = sample_evidence;
    // Refused unless the KBS is configured to accept it.
    let strict = Kbs::start(Options::default());
    let body = unauthorized(
        handshake(&strict.url, kbs_types::Tee::Sample, sample).map(|(t, _)| t),
        "sample evidence",
    );
    assert!(body.contains("sample-trust"), "{body}");

    let kbs = sample_kbs("default/key/1", b"via bearer");
    let (token, key) = handshake(&kbs.url, kbs_types::Tee::Sample, sample).unwrap();
    let response = ureq::get(&format!("{}/kbs/v0/resource/default/key/1", kbs.url))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert_eq!(
        key.decrypt_json(response.as_bytes()).unwrap().as_slice(),
        b"via bearer"
    );
    // As CoCo's client decrypts it: the header re-serialized (kbs-types'
    // ProtectedHeader, serde_json's default features: sorted keys) is the
    // authenticated data. This KBS's build has preserve_order on.
    let (_, wire) = as_coco_client_reads_it(&response);
    assert_eq!(
        key.decrypt_json(&wire).unwrap().as_slice(),
        b"via bearer",
        "a CoCo client cannot decrypt this KBS's response"
    );
    assert!(kabuto_attestation_agent::token_expiry(&token).is_some());
    check_ear_layout(&kbs, &token, &key.public_jwk());

    // A token with one changed character is refused.
    let mut forged = token.into_bytes();
    let i = forged.len() - 5;
    forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let forged_get = ureq::get(&format!("{}/kbs/v0/resource/default/key/1", kbs.url))
        .set("Authorization", &format!("Bearer {forged}"))
        .call();
    let body = unauthorized(forged_get, "forged token");
    assert!(body.contains("token"), "{body}");
    // Evidence whose report data does not bind this nonce and key.
    let unbound = handshake(&kbs.url, kbs_types::Tee::Sample, |_| sample(&[0u8; 48]));
    let body = unauthorized(unbound.map(|(t, _)| t), "unbound evidence");
    assert!(body.contains("report-data"), "{body}");
}

/// The token in trustee's EAR layout, read at the paths trustee's docs name:
/// the CPU appraisal `submods.cpu0` with `ear.status` (sample evidence is
/// a warning), the trust vector, and `ear.veraison.annotated-evidence`
/// holding the claims under the TEE's name and, at the path a trustee KBS
/// reads in passport mode, the `tee-pubkey`. The header's `jwk` is the key
/// `/kbs/v0/token-key` serves, and it verifies the signature.
fn check_ear_layout(kbs: &Kbs, token: &str, tee_pubkey: &kbs_types::TeePubKey) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let part = |i: usize| -> serde_json::Value {
        serde_json::from_slice(&b64.decode(token.split('.').nth(i).unwrap()).unwrap()).unwrap()
    };
    let (header, claims) = (part(0), part(1));
    assert_eq!(claims["eat_profile"], "tag:github.com,2023:veraison/ear");
    assert!(claims["ear.verifier-id"]["build"].is_string(), "{claims}");
    let cpu = &claims["submods"]["cpu0"];
    assert_eq!(cpu["ear.status"], "warning", "{claims}");
    assert!(
        cpu["ear.trustworthiness-vector"]["hardware"].is_number(),
        "{claims}"
    );
    assert_eq!(cpu["ear.appraisal-policy-id"], "default");
    let evidence = &cpu["ear.veraison.annotated-evidence"];
    assert_eq!(evidence["sample"]["platform"], "sample", "{claims}");
    assert_eq!(
        claims
            .pointer("/submods/cpu0/ear.veraison.annotated-evidence/runtime_data_claims/tee-pubkey")
            .unwrap(),
        &serde_json::to_value(tee_pubkey).unwrap()
    );
    assert!(evidence["runtime_data_claims"]["nonce"].is_string());
    // The header key is the published one and verifies the token.
    assert_eq!(header["alg"], "ES256");
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(header["jwk"].clone()).unwrap();
    let published = ureq::get(&format!("{}/kbs/v0/token-key", kbs.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let from_header = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
    let from_pem = jsonwebtoken::DecodingKey::from_ec_pem(published.as_bytes()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_issuer(&["kabuto-kbs"]);
    for key in [&from_header, &from_pem] {
        jsonwebtoken::decode::<serde_json::Value>(token, key, &validation).unwrap();
    }
}

/// CoCo's `sample_device` attester beside the sample CPU: its evidence (a
/// JSON map from TEE name to evidence, as a string) binds the runtime data,
/// becomes the token's `gpu0` appraisal, and is accepted only when sample
/// evidence is; a device this KBS cannot verify, or device evidence bound
/// to something else, is refused.
#[test]
fn sample_device_evidence_is_a_gpu_appraisal() {
    let device = |report_data: &[u8]| {
        serde_json::json!({"sampledevice": {
            "svn": "2",
            "report_data": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, report_data),
        }})
        .to_string()
    };
    let strict = Kbs::start(Options::default());
    let key = kabuto_jose::TeeKeyPair::generate_ec();
    let attest = |kbs: &Kbs, devices: &dyn Fn(&[u8]) -> String| {
        handshake_with_devices(
            &kbs.url,
            kbs_types::Tee::Sample,
            &key.public_jwk(),
            devices,
            sample_evidence,
        )
    };
    let body = unauthorized(attest(&strict, &device), "sample evidence");
    assert!(body.contains("sample-trust"), "{body}");

    let kbs = sample_kbs("default/test/key", b"x");
    let token = attest(&kbs, &device).unwrap();
    use base64::Engine as _;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let gpu = &claims["submods"]["gpu0"];
    assert_eq!(gpu["ear.status"], "warning", "{claims}");
    assert_eq!(
        gpu["ear.veraison.annotated-evidence"]["sampledevice"]["platform"], "sample-device",
        "{claims}"
    );
    assert_eq!(claims["submods"]["cpu0"]["ear.status"], "warning");

    // Refused: a device this KBS does not verify, device evidence bound to
    // other runtime data, additional evidence that is no JSON object.
    let nvidia = |_: &[u8]| serde_json::json!({"nvidia": {"evidence_list": []}}).to_string();
    let body = unauthorized(attest(&kbs, &nvidia), "unverifiable device");
    assert!(body.contains("only device this KBS verifies"), "{body}");
    let unbound = |_: &[u8]| device(&[7u8; 48]);
    let body = unauthorized(attest(&kbs, &unbound), "unbound device evidence");
    assert!(
        body.contains("additional evidence from sampledevice"),
        "{body}"
    );
    assert!(body.contains("report-data"), "{body}");
    // Empty or truncated report data is no binding either.
    for short in [0usize, 1, 47] {
        let truncated = move |digest: &[u8]| device(&digest[..short]);
        let body = unauthorized(attest(&kbs, &truncated), "truncated device report data");
        assert!(body.contains("report-data"), "{short} bytes: {body}");
    }
    let truncated_primary = handshake_with_devices(
        &kbs.url,
        kbs_types::Tee::Sample,
        &key.public_jwk(),
        |_| String::new(),
        |digest| sample_evidence(&digest[..0]),
    );
    let body = unauthorized(truncated_primary, "empty sample report data");
    assert!(body.contains("report-data"), "{body}");
    let garbage = |_: &[u8]| "not json".to_string();
    let err = attest(&kbs, &garbage).unwrap_err();
    assert!(matches!(err, ureq::Error::Status(400, _)), "{err:?}");
}

/// An admin token as CoCo's `kbs-client` signs it with trustee's Ed25519
/// admin key: EdDSA, `iat`/`nbf` now, `exp` two hours on, nothing else
/// unless `extra` adds claims.
fn trustee_admin_token(kbs: &Kbs, lifetime: u64, extra: serde_json::Value) -> String {
    let pem = std::fs::read(kbs.dir.path().join("trustee-admin.key")).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&pem).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut claims = serde_json::json!({"iat": now, "nbf": now, "exp": now + lifetime});
    claims
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

/// trustee's admin API as `kbs-client` drives it: set a resource (raw
/// bytes), the resource policy (`{"policy": base64url}`) and the
/// attestation policy (`{"type", "policy_id", "policy"}`), each with an
/// Ed25519-signed token; then a guest reads what was set.
#[test]
fn kbs_client_administers_this_kbs_with_trustee_admin_tokens() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let kbs = Kbs::start(Options {
        accept_sample: true,
        trustee_admin_key: true,
        ..Default::default()
    });
    for name in ["measurement", "init_data"] {
        kbs.admin
            .set_reference_values(name, &serde_json::json!([""]))
            .unwrap();
    }
    let two_hours = 7200;
    let post = |path: &str, token: &str, content_type: &str, body: &[u8]| {
        ureq::post(&format!("{}/kbs/v0/{path}", kbs.url))
            .set("Authorization", &format!("Bearer {token}"))
            .set("Content-Type", content_type)
            .send_bytes(body)
    };
    // kbs-client config set-resource --path default/test/key
    post(
        "resource/default/test/key",
        &trustee_admin_token(&kbs, two_hours, serde_json::json!({})),
        "application/octet-stream",
        b"set by kbs-client",
    )
    .unwrap();
    // kbs-client config set-resource-policy: a trustee policy.
    let resource_policy = "package policy\nimport rego.v1\ndefault allow = false\nallow if {\n  input[\"submods\"][\"cpu0\"][\"ear.status\"] != \"contraindicated\"\n  data[\"resource-path\"] == \"default/test/key\"\n}\n";
    post(
        "resource-policy",
        &trustee_admin_token(&kbs, two_hours, serde_json::json!({})),
        "application/json",
        &serde_json::to_vec(&serde_json::json!({"policy": b64.encode(resource_policy)})).unwrap(),
    )
    .unwrap();
    // kbs-client config set-attestation-policy (our policy language).
    let attestation_policy = |id: &str| {
        serde_json::to_vec(&serde_json::json!({
            "type": "rego",
            "policy_id": id,
            "policy": b64.encode(kabuto_kbs::policy::DEFAULT_ATTESTATION_POLICY),
        }))
        .unwrap()
    };
    post(
        "attestation-policy",
        &trustee_admin_token(&kbs, two_hours, serde_json::json!({})),
        "application/json",
        &attestation_policy("default"),
    )
    .unwrap();
    let body = unauthorized_or(
        post(
            "attestation-policy",
            &trustee_admin_token(&kbs, two_hours, serde_json::json!({})),
            "application/json",
            &attestation_policy("other"),
        ),
        400,
    );
    assert!(body.contains("policy_id \"other\""), "{body}");

    // A guest reads the resource the policy releases, and only that one.
    let key = kabuto_jose::TeeKeyPair::generate_ec();
    let token = handshake_with_key(
        &kbs.url,
        kbs_types::Tee::Sample,
        &key.public_jwk(),
        sample_evidence,
    )
    .unwrap();
    let get = |path: &str| {
        ureq::get(&format!("{}/kbs/v0/resource/{path}", kbs.url))
            .set("Authorization", &format!("Bearer {token}"))
            .call()
    };
    let response = get("default/test/key").unwrap().into_string().unwrap();
    assert_eq!(
        key.decrypt_json(response.as_bytes()).unwrap().as_slice(),
        b"set by kbs-client"
    );
    assert!(matches!(
        get("default/test/other"),
        Err(ureq::Error::Status(403, _))
    ));

    // Refused: longer than kbs-client's two hours, for another audience, a
    // jti used twice, and a token from an Ed25519 key not configured.
    let refused = |token: &str| {
        unauthorized_or(
            post(
                "resource/default/test/key",
                token,
                "application/octet-stream",
                b"evil",
            ),
            401,
        )
    };
    let body = refused(&trustee_admin_token(&kbs, 3 * 3600, serde_json::json!({})));
    assert!(body.contains("lifetime"), "{body}");
    let body = refused(&trustee_admin_token(
        &kbs,
        two_hours,
        serde_json::json!({"aud": "elsewhere"}),
    ));
    assert!(body.contains("elsewhere"), "{body}");
    let once = trustee_admin_token(&kbs, two_hours, serde_json::json!({"jti": "one"}));
    post(
        "resource/default/test/jti",
        &once,
        "application/octet-stream",
        b"x",
    )
    .unwrap();
    let body = refused(&once);
    assert!(body.contains("single-use"), "{body}");
    let stranger = Kbs::start(Options {
        trustee_admin_key: true,
        ..Default::default()
    });
    let body = refused(&trustee_admin_token(
        &stranger,
        two_hours,
        serde_json::json!({}),
    ));
    assert!(
        body.contains("not signed by a configured admin key"),
        "{body}"
    );
    // None of the refused calls changed the resource.
    let response = get("default/test/key").unwrap().into_string().unwrap();
    assert_eq!(
        key.decrypt_json(response.as_bytes()).unwrap().as_slice(),
        b"set by kbs-client"
    );
}

/// The `detail` of a refused call's error body (trustee's ErrorInformation
/// shape: `type` and `detail`) with `status`.
fn unauthorized_or(result: Result<ureq::Response, ureq::Error>, status: u16) -> String {
    match result {
        Err(ureq::Error::Status(code, response)) if code == status => {
            let body: serde_json::Value = response.into_json().unwrap();
            assert!(body["type"].is_string(), "{body}");
            body["detail"].as_str().unwrap().to_string()
        }
        other => panic!("expected HTTP {status}, got {other:?}"),
    }
}

/// Every TEE key type CoCo's client may attest with gets a response it can
/// decrypt the way it does (header re-serialized): EC P-256, EC P-521, and
/// RSA with the wrapping its JWK's `alg` asks for, RSA1_5 included.
#[test]
fn coco_clients_of_every_key_type_decrypt_their_resources() {
    let kbs = sample_kbs("default/test/key", b"for every key");
    let fetch = |jwk: &kbs_types::TeePubKey| {
        let token =
            handshake_with_key(&kbs.url, kbs_types::Tee::Sample, jwk, sample_evidence).unwrap();
        ureq::get(&format!("{}/kbs/v0/resource/default/test/key", kbs.url))
            .set("Authorization", &format!("Bearer {token}"))
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    };
    for key in [
        kabuto_jose::TeeKeyPair::generate_ec(),
        kabuto_jose::TeeKeyPair::generate_ec_p521(),
        kabuto_jose::TeeKeyPair::generate_rsa(2048).unwrap(),
    ] {
        let (header, wire) = as_coco_client_reads_it(&fetch(&key.public_jwk()));
        assert_eq!(
            key.decrypt_json(&wire).unwrap().as_slice(),
            b"for every key",
            "{key:?}: header {header}"
        );
    }
    // RSA1_5 and RSA-OAEP, as the client may ask: the CEK is wrapped that
    // way (our own decryptor never takes RSA1_5, so unwrap it here).
    let kabuto_jose::TeeKeyPair::Rsa(private) =
        kabuto_jose::TeeKeyPair::generate_rsa(2048).unwrap()
    else {
        unreachable!()
    };
    use base64::Engine as _;
    use rsa::traits::PublicKeyParts;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    for (alg, unwrap) in [
        (
            "RSA1_5",
            &(|k: &[u8]| private.decrypt(rsa::Pkcs1v15Encrypt, k)) as &dyn Fn(&[u8]) -> _,
        ),
        (
            "RSA-OAEP",
            &(|k: &[u8]| private.decrypt(rsa::Oaep::new::<sha1::Sha1>(), k)),
        ),
    ] {
        let jwk = kbs_types::TeePubKey::RSA {
            alg: alg.into(),
            k_mod: b64.encode(private.n().to_bytes_be()),
            k_exp: b64.encode(private.e().to_bytes_be()),
        };
        let (header, wire) = as_coco_client_reads_it(&fetch(&jwk));
        assert_eq!(header["alg"], alg);
        let doc: serde_json::Value = serde_json::from_slice(&wire).unwrap();
        let field = |name: &str| b64.decode(doc[name].as_str().unwrap()).unwrap();
        let cek = unwrap(&field("encrypted_key")).unwrap();
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        let cipher = aes_gcm::Aes256Gcm::new_from_slice(&cek).unwrap();
        let mut sealed = field("ciphertext");
        sealed.extend(field("tag"));
        let plain = cipher
            .decrypt(
                aes_gcm::Nonce::from_slice(&field("iv")),
                Payload {
                    msg: &sealed,
                    aad: doc["protected"].as_str().unwrap().as_bytes(),
                },
            )
            .unwrap();
        assert_eq!(plain, b"for every key", "{alg}");
    }
}

/// What `client` reads at `uri` (the test fails if it cannot).
fn resource(client: &KbsClient, uri: &str) -> Vec<u8> {
    client.get_resource(uri).unwrap().to_vec()
}
