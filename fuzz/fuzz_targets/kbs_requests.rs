//! Request bodies a remote peer sends the KBS, through its real router
//! (axum, the same handlers `kabuto-kbs` serves): /auth, /attest, and the
//! admin endpoints (which must refuse without a token before reading the
//! body). The first byte picks the endpoint. The KBS is a real one with its
//! store in a temporary directory and the sample TEE accepted, so /attest
//! reaches evidence verification.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{header, Method, Request};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt as _;

const ENDPOINTS: &[(Method, &str)] = &[
    (Method::POST, "/kbs/v0/auth"),
    (Method::POST, "/kbs/v0/attest"),
    (Method::POST, "/kbs/v0/resource/default/key/1"),
    (Method::POST, "/kbs/v0/attestation-policy"),
    (Method::POST, "/kbs/v0/reference-values/measurement"),
    (Method::GET, "/kbs/v0/resource/default/key/1"),
];

struct Fixture {
    runtime: tokio::runtime::Runtime,
    kbs: Arc<kabuto_kbs::Kbs>,
    // A session cookie from a real /auth, so /attest gets past the session.
    cookie: String,
    _dir: std::path::PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kabuto-fuzz-kbs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("kbs dir");
        let config_path = dir.join("kbs.toml");
        std::fs::write(
            &config_path,
            format!(
                "listen = \"127.0.0.1:0\"\nstore = \"{d}/store.redb\"\ntoken_key = \"{d}/token.key\"\n\
                 [tls]\ninsecure_http = true\n[attestation]\naccept_sample = true\n",
                d = dir.display()
            ),
        )
        .expect("kbs config");
        let config = kabuto_kbs::config::Config::load(&config_path).expect("kbs config loads");
        let kbs = kabuto_kbs::Kbs::new(&config).expect("kbs starts");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let auth = Request::post("/kbs/v0/auth")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                r#"{"version":"0.4.0","tee":"sample","extra-params":""}"#,
            ))
            .expect("request");
        let response = runtime
            .block_on(kabuto_kbs::router(kbs.clone()).oneshot(auth))
            .expect("auth answers");
        let cookie = response
            .headers()
            .get(header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .unwrap_or_default()
            .to_string();
        Fixture {
            runtime,
            kbs,
            cookie,
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let f = fixture();
    let (method, path) = &ENDPOINTS[usize::from(which) % ENDPOINTS.len()];
    let Ok(request) = Request::builder()
        .method(method.clone())
        .uri(*path)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::COOKIE, &f.cookie)
        .body(Body::from(body.to_vec()))
    else {
        return;
    };
    let response = f
        .runtime
        .block_on(kabuto_kbs::router(f.kbs.clone()).oneshot(request));
    let Ok(response) = response;
    // Everything but a 2xx auth/attest is a refusal; a server error is a bug
    // (503 is the KBS's "busy", e.g. a full session table).
    assert!(
        !response.status().is_server_error() || response.status() == 503,
        "{method} {path}: {}",
        response.status()
    );
});
