//! Our KBS client against a server written to trustee's documented KBS
//! behaviour (protocol v0.4.0), sharing no code with our KBS or our JOSE
//! crate: its report-data check, JCS and JWE are written here from the
//! protocol document and RFC 7518, so a mistake both sides of kabuto make
//! alike cannot hide. CoCo's sample evidence stands in for a TEE.
//!
//! trustee's behaviour as documented: `/auth` answers a nonce with
//! `extra-params` empty (so the client hashes with SHA-384), sets the
//! `kbs-session-id` cookie; `/attest` checks the evidence's report data
//! against SHA-384 over the JCS form of {additional-evidence, nonce,
//! tee-pubkey} and answers `{"token": JWT}`; resources come as a flattened
//! JWE (ECDH-ES+A256KW, A256GCM) whose protected header is authenticated as
//! sent; an unknown session gets 401 with `{"type", "detail"}`.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use kabuto_attestation_agent::evidence::SampleAttester;
use kabuto_attestation_agent::KbsClient;
use p256::elliptic_curve::sec1::{FromEncodedPoint, ToEncodedPoint};
use sha2::{Digest, Sha256, Sha384};

const SECRET: &[u8] = b"from a trustee-shaped KBS";

#[derive(Default)]
struct State {
    /// Session id -> nonce, until attested; then -> the attested key (x, y).
    challenges: Vec<(String, String)>,
    attested: Vec<(String, (String, String))>,
    /// Answer the next resource request 401, as after a KBS restart.
    forget_once: bool,
    log: Vec<String>,
}

struct Request {
    method: String,
    path: String,
    cookie: Option<String>,
    body: Vec<u8>,
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let (mut length, mut cookie) = (0, None);
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().ok()?,
            "cookie" => {
                cookie = value
                    .split(';')
                    .filter_map(|kv| kv.trim().split_once('='))
                    .find(|(k, _)| *k == "kbs-session-id")
                    .map(|(_, v)| v.to_string())
            }
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        path,
        cookie,
        body,
    })
}

fn respond(mut stream: &TcpStream, status: u16, headers: &str, body: &str) {
    let reason = if status == 200 { "OK" } else { "Unauthorized" };
    let _ = write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n{body}",
        body.len()
    );
}

fn error_information(kind: &str, detail: &str) -> String {
    serde_json::json!({
        "type": format!("https://github.com/confidential-containers/kbs/errors/{kind}"),
        "detail": detail,
    })
    .to_string()
}

/// RFC 8785 for the runtime data's shape: every value is a string or an
/// object of strings, base64url or the nonce, which need no escaping; keys
/// sorted.
fn jcs_runtime(nonce: &str, additional: &str, key: &serde_json::Value) -> String {
    let mut fields: Vec<(String, String)> = key
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    fields.sort();
    let key = fields
        .iter()
        .map(|(k, v)| format!("\"{k}\":\"{v}\""))
        .collect::<Vec<_>>()
        .join(",");
    format!("{{\"additional-evidence\":\"{additional}\",\"nonce\":\"{nonce}\",\"tee-pubkey\":{{{key}}}}}")
}

/// The JWE trustee's KBS sends: ECDH-ES+A256KW with an ephemeral P-256 key,
/// Concat KDF (RFC 7518 §4.6.2, empty apu/apv), A256GCM, the protected
/// header's base64url as the additional data.
fn jwe_to(x: &str, y: &str, plaintext: &[u8]) -> String {
    let point = p256::EncodedPoint::from_affine_coordinates(
        URL_SAFE_NO_PAD.decode(x).unwrap().as_slice().into(),
        URL_SAFE_NO_PAD.decode(y).unwrap().as_slice().into(),
        false,
    );
    let recipient = p256::PublicKey::from_encoded_point(&point).unwrap();
    let ephemeral = p256::ecdh::EphemeralSecret::random(&mut rand_core::OsRng);
    let shared = ephemeral.diffie_hellman(&recipient);
    let mut kdf = Sha256::new();
    kdf.update(1u32.to_be_bytes());
    kdf.update(shared.raw_secret_bytes());
    for field in [b"ECDH-ES+A256KW".as_slice(), b"", b""] {
        kdf.update((field.len() as u32).to_be_bytes());
        kdf.update(field);
    }
    kdf.update(256u32.to_be_bytes());
    let kek = aes_kw::KekAes256::from(<[u8; 32]>::from(kdf.finalize()));
    let mut cek = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut cek);
    let encrypted_key = kek.wrap_vec(&cek).unwrap();
    let epk = ephemeral.public_key().to_encoded_point(false);
    let header = format!(
        "{{\"alg\":\"ECDH-ES+A256KW\",\"enc\":\"A256GCM\",\"epk\":{{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"{}\",\"y\":\"{}\"}}}}",
        URL_SAFE_NO_PAD.encode(epk.x().unwrap()),
        URL_SAFE_NO_PAD.encode(epk.y().unwrap())
    );
    let protected = URL_SAFE_NO_PAD.encode(header);
    let iv = [7u8; 12];
    let mut ciphertext = plaintext.to_vec();
    let tag = aes_gcm::Aes256Gcm::new_from_slice(&cek)
        .unwrap()
        .encrypt_in_place_detached((&iv).into(), protected.as_bytes(), &mut ciphertext)
        .unwrap();
    serde_json::json!({
        "protected": protected,
        "encrypted_key": URL_SAFE_NO_PAD.encode(encrypted_key),
        "iv": URL_SAFE_NO_PAD.encode(iv),
        "ciphertext": URL_SAFE_NO_PAD.encode(ciphertext),
        "tag": URL_SAFE_NO_PAD.encode(tag),
    })
    .to_string()
}

fn serve(stream: TcpStream, state: &Mutex<State>) {
    let Some(request) = read_request(&stream) else {
        return;
    };
    let mut state = state.lock().unwrap();
    state
        .log
        .push(format!("{} {}", request.method, request.path));
    match (request.method.as_str(), request.path.as_str()) {
        ("POST", "/kbs/v0/auth") => {
            let auth: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
            assert_eq!(auth["version"], "0.4.0");
            assert_eq!(auth["tee"], "sample");
            let session = format!("session-{}", state.challenges.len() + state.attested.len());
            let nonce =
                STANDARD.encode(rand_core::RngCore::next_u64(&mut rand_core::OsRng).to_le_bytes());
            state.challenges.push((session.clone(), nonce.clone()));
            let body = serde_json::json!({"nonce": nonce, "extra-params": ""}).to_string();
            respond(
                &stream,
                200,
                &format!("Set-Cookie: kbs-session-id={session}; Path=/kbs; HttpOnly\r\n"),
                &body,
            );
        }
        ("POST", "/kbs/v0/attest") => {
            let session = request.cookie.unwrap_or_default();
            let Some(i) = state.challenges.iter().position(|(s, _)| *s == session) else {
                return respond(
                    &stream,
                    401,
                    "",
                    &error_information("InvalidRequest", "no session"),
                );
            };
            let (_, nonce) = state.challenges.remove(i);
            let attestation: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
            let runtime = &attestation["runtime-data"];
            let key = &runtime["tee-pubkey"];
            assert_eq!(runtime["nonce"], nonce.as_str());
            let evidence = &attestation["tee-evidence"];
            let additional = evidence["additional_evidence"].as_str().unwrap();
            let expected = Sha384::digest(jcs_runtime(&nonce, additional, key));
            let sample = &evidence["primary_evidence"];
            let report_data = STANDARD
                .decode(sample["report_data"].as_str().unwrap())
                .unwrap();
            if report_data != expected.as_slice() {
                return respond(
                    &stream,
                    401,
                    "",
                    &error_information(
                        "AttestationFailed",
                        "report data does not bind the runtime data",
                    ),
                );
            }
            let xy = (
                key["x"].as_str().unwrap().to_string(),
                key["y"].as_str().unwrap().to_string(),
            );
            state.attested.push((session, xy));
            let claims = URL_SAFE_NO_PAD.encode(
                serde_json::json!({"exp": 4_000_000_000u64, "submods": {"cpu0": {"ear.status": "warning"}}})
                    .to_string(),
            );
            let token = format!(
                "{}.{claims}.c2lnbmF0dXJl",
                URL_SAFE_NO_PAD.encode("{\"alg\":\"ES256\"}")
            );
            respond(
                &stream,
                200,
                "",
                &serde_json::json!({"token": token}).to_string(),
            );
        }
        ("GET", "/kbs/v0/resource/default/test/key") => {
            if std::mem::take(&mut state.forget_once) {
                state.attested.clear();
            }
            let session = request.cookie.unwrap_or_default();
            let Some((_, (x, y))) = state.attested.iter().find(|(s, _)| *s == session) else {
                return respond(
                    &stream,
                    401,
                    "",
                    &error_information("TokenNotFound", "unknown session: attest again"),
                );
            };
            let body = jwe_to(x, y, SECRET);
            respond(&stream, 200, "", &body);
        }
        _ => respond(
            &stream,
            401,
            "",
            &error_information("InvalidRequest", "unknown path"),
        ),
    }
}

#[test]
fn our_client_attests_to_a_trustee_shaped_kbs_and_decrypts_its_resource() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let state = Arc::new(Mutex::new(State::default()));
    {
        let state = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                serve(stream, &state);
            }
        });
    }
    let client = KbsClient::new(&url, None, Box::new(SampleAttester), None).unwrap();
    let secret = client.get_resource("kbs:///default/test/key").unwrap();
    assert_eq!(secret.as_slice(), SECRET);

    // The KBS forgot the session (a restart): its 401 makes the client
    // attest once more, then the resource comes.
    state.lock().unwrap().forget_once = true;
    let secret = client.get_resource("kbs:///default/test/key").unwrap();
    assert_eq!(secret.as_slice(), SECRET);
    let log = state.lock().unwrap().log.join(", ");
    assert_eq!(
        log,
        "POST /kbs/v0/auth, POST /kbs/v0/attest, GET /kbs/v0/resource/default/test/key, \
         GET /kbs/v0/resource/default/test/key, POST /kbs/v0/auth, POST /kbs/v0/attest, \
         GET /kbs/v0/resource/default/test/key"
    );
}
