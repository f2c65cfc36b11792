//! The attestation protocol endpoints: auth, attest, resource.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use kbs_types::{Attestation, Challenge, HashAlgorithm, Request};
use rand_core::{OsRng, RngCore};

use crate::error::Problem;
use crate::token::{self, now_secs, Appraisal, TokenClaims, VerifierId, ISSUER};
use crate::{Kbs, Session, SessionState};

pub const SESSION_COOKIE: &str = "kbs-session-id";
const SUPPORTED_HASHES_KEY: &str = "supported-hash-algorithms";
const SELECTED_HASH_KEY: &str = "selected-hash-algorithm";

fn session_cookie(id: &str, ttl_secs: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={id}; Max-Age={ttl_secs}; Path=/kbs; HttpOnly"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

pub(crate) fn cookie_session(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.to_string())
}

fn random_b64(len: usize) -> String {
    let mut bytes = vec![0u8; len];
    OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn random_hex(len: usize) -> String {
    let mut bytes = vec![0u8; len];
    OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Picks SHA-384 unless the client lists algorithms without it.
fn select_hash(extra: &serde_json::Value) -> Result<HashAlgorithm, Problem> {
    let Some(list) = extra.get(SUPPORTED_HASHES_KEY).and_then(|v| v.as_array()) else {
        return Ok(HashAlgorithm::Sha384);
    };
    let offered: Vec<String> = list
        .iter()
        .filter_map(|v| v.as_str().map(str::to_lowercase))
        .collect();
    for (name, alg) in [
        ("sha384", HashAlgorithm::Sha384),
        ("sha512", HashAlgorithm::Sha512),
        ("sha256", HashAlgorithm::Sha256),
    ] {
        if offered.iter().any(|o| o == name) {
            return Ok(alg);
        }
    }
    Err(Problem::bad_request(
        "hash-algorithm",
        format!(
            "none of the offered hash algorithms {offered:?} is supported (sha256, sha384, sha512)"
        ),
    ))
}

/// POST /kbs/v0/auth: Request → Challenge + session cookie.
pub async fn auth(
    State(kbs): State<Arc<Kbs>>,
    connection: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    body: Bytes,
) -> Result<Response, Problem> {
    // Served without connection info (an in-process router): one peer.
    let peer = connection
        .map(|c| crate::sessions::peer_of(c.0 .0.ip()))
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let request: Request = serde_json::from_slice(&body)
        .map_err(|e| Problem::bad_request("request-format", format!("auth request: {e}")))?;
    if !version_compatible(&request.version) {
        return Err(Problem::bad_request(
            "protocol-version",
            format!(
                "protocol version {} is not supported (this KBS speaks {})",
                request.version,
                kabuto_kbs_protocol::PROTOCOL_VERSION
            ),
        ));
    }
    let hash = select_hash(&request.extra_params)?;
    let nonce = random_b64(32);
    let id = random_hex(16);
    {
        let mut sessions = kbs
            .sessions
            .lock()
            .map_err(|_| Problem::internal("session table poisoned"))?;
        let dropped = sessions.insert_challenge(
            id.clone(),
            Session {
                state: SessionState::Challenged {
                    nonce: nonce.clone(),
                    tee: request.tee,
                    hash,
                    peer,
                },
                expires: Instant::now() + kbs.session_ttl,
            },
            peer,
        );
        if dropped > 0 {
            log::warn!("auth: challenge bound reached; dropped {dropped} older challenge(s) of the busiest peer (now {peer})");
        }
    }
    let challenge = Challenge {
        nonce,
        extra_params: serde_json::json!({ SELECTED_HASH_KEY: hash.as_ref() }),
    };
    let mut response = axum::Json(challenge).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(&id, kbs.session_ttl.as_secs()),
    );
    Ok(response)
}

/// Major.minor must match ours; any 0.x client older than 0.1 is refused.
fn version_compatible(version: &str) -> bool {
    let parse = |v: &str| -> Option<(u64, u64)> {
        let mut parts = v.split('.');
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    };
    match (parse(version), parse(kabuto_kbs_protocol::PROTOCOL_VERSION)) {
        (Some((major, minor)), Some((our_major, our_minor))) => {
            major == our_major && minor <= our_minor && minor >= 1
        }
        _ => false,
    }
}

/// CoCo's additional evidence: a JSON object (sent as a string) from a
/// device attester's TEE name to its evidence, which binds the runtime data
/// alone (the primary evidence binds this string). Every entry must verify,
/// and becomes a `gpuN` appraisal as trustee names device submods; a device
/// this KBS cannot verify is refused, never ignored.
fn appraise_devices(
    verifier: &kabuto_verifier::Verifier,
    hash: HashAlgorithm,
    attestation: &Attestation,
) -> Result<Vec<(String, Appraisal)>, Problem> {
    let text = &attestation.tee_evidence.additional_evidence;
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let devices: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|e| {
            Problem::bad_request(
                "additional-evidence",
                format!("additional evidence is not a JSON object of device evidence: {e}"),
            )
        })?;
    let report_data = kabuto_kbs_protocol::device_report_data(hash, &attestation.runtime_data)
        .map_err(|e| Problem::bad_request("request-format", e.to_string()))?;
    let mut appraisals = Vec::new();
    for (name, evidence) in devices {
        let refused = |detail: String| Problem::unauthorized("additional-evidence", detail);
        let tee: kbs_types::Tee = serde_json::from_value(serde_json::Value::String(name.clone()))
            .map_err(|_| {
            refused(format!("additional evidence from {name:?}: not a TEE name"))
        })?;
        if !matches!(tee, kbs_types::Tee::SampleDevice) {
            return Err(refused(format!(
                "additional evidence from {name}: the only device this KBS verifies is sampledevice"
            )));
        }
        let claims = verifier
            .verify(
                tee,
                &evidence,
                kabuto_verifier::Expected {
                    report_data: Some(&report_data),
                    init_data: None,
                },
                SystemTime::now(),
            )
            .map_err(|e| {
                Problem::unauthorized(e.check(), format!("additional evidence from {name}: {e}"))
            })?;
        let insecure = claims.insecure;
        let claims =
            serde_json::to_value(&claims).map_err(|e| Problem::internal(format!("claims: {e}")))?;
        appraisals.push((
            format!("gpu{}", appraisals.len()),
            Appraisal::new(
                if insecure { "warning" } else { "affirming" }.into(),
                serde_json::json!({ "hardware": if insecure { 32 } else { 2 } }),
                name,
                claims,
                None,
                attestation.runtime_data.clone(),
            ),
        ));
    }
    Ok(appraisals)
}

/// The TEE's name in the KBS protocol (`snp`, `tdx`, `sample`, ...), under
/// which trustee's tokens file its claims.
fn tee_name(tee: kbs_types::Tee) -> String {
    match serde_json::to_value(tee) {
        Ok(serde_json::Value::String(name)) => name,
        _ => format!("{tee:?}").to_lowercase(),
    }
}

/// POST /kbs/v0/attest: Attestation → {"token": JWT}. The challenge is
/// consumed by the first attempt, successful or not: a nonce is single-use.
pub async fn attest(
    State(kbs): State<Arc<Kbs>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let (id, challenge) = take_challenge(&kbs, &headers)?;
    let attestation: Attestation = serde_json::from_slice(&body)
        .map_err(|e| Problem::bad_request("request-format", format!("attestation: {e}")))?;
    if attestation.runtime_data.nonce != challenge.nonce {
        return Err(Problem::unauthorized(
            "nonce",
            "runtime-data.nonce is not this session's challenge nonce",
        ));
    }
    // Report data binds nonce, key and additional evidence (JCS, then hash).
    let report_data = kabuto_kbs_protocol::report_data(
        challenge.hash,
        &attestation.runtime_data,
        &attestation.tee_evidence.additional_evidence,
    )
    .map_err(|e| Problem::bad_request("request-format", e.to_string()))?;
    let init_data = attested_init_data(&attestation)?;
    let init_digest = init_data.as_ref().map(|d| d.digest());

    let verifier = kbs.verifier();
    let claims = verifier
        .verify(
            challenge.tee,
            &attestation.tee_evidence.primary_evidence,
            kabuto_verifier::Expected {
                report_data: Some(&report_data),
                init_data: init_digest.as_deref(),
            },
            SystemTime::now(),
        )
        .map_err(|e| {
            log::info!("attestation refused: {e}");
            Problem::unauthorized(e.check(), e.to_string())
        })?;
    let claims_json =
        serde_json::to_value(&claims).map_err(|e| Problem::internal(format!("claims: {e}")))?;
    let appraisal = appraise(&kbs, challenge.tee, &claims_json, init_data.as_ref())?;
    let devices = appraise_devices(&verifier, challenge.hash, &attestation)?;

    let now = now_secs();
    let cpu = Appraisal::new(
        appraisal.status,
        appraisal.trust_vector,
        tee_name(challenge.tee),
        claims_json,
        init_digest.map(hex::encode),
        attestation.runtime_data,
    );
    let token_claims = TokenClaims {
        eat_profile: token::EAT_PROFILE.into(),
        iss: ISSUER.into(),
        iat: now,
        exp: now + kbs.token_ttl.as_secs(),
        verifier_id: VerifierId {
            developer: "https://github.com/kabuto".into(),
            build: concat!("kabuto-kbs ", env!("CARGO_PKG_VERSION")).into(),
        },
        submods: std::iter::once((token::CPU_SUBMOD.to_string(), cpu))
            .chain(devices)
            .collect(),
    };
    issue_token(&kbs, id, token_claims)
}

/// What `/auth` asked the client to attest to.
struct SessionChallenge {
    nonce: String,
    tee: kbs_types::Tee,
    hash: HashAlgorithm,
}

/// The session of the request's cookie, taken from the table (its nonce is
/// single-use), with the challenge it was given.
fn take_challenge(kbs: &Kbs, headers: &HeaderMap) -> Result<(String, SessionChallenge), Problem> {
    let id = cookie_session(headers).ok_or_else(|| {
        Problem::unauthorized(
            "session",
            "no kbs-session-id cookie: call /kbs/v0/auth first",
        )
    })?;
    let session = kbs
        .sessions
        .lock()
        .map_err(|_| Problem::internal("session table poisoned"))?
        .take(&id)
        .ok_or_else(|| {
            Problem::unauthorized(
                "session",
                "unknown, expired or already used session: its challenge nonce is single-use; start again with /kbs/v0/auth",
            )
        })?;
    if session.expires <= Instant::now() {
        return Err(Problem::unauthorized(
            "session",
            "the session expired before attestation; start again with /kbs/v0/auth",
        ));
    }
    let SessionState::Challenged {
        nonce, tee, hash, ..
    } = session.state
    else {
        return Err(Problem::unauthorized(
            "session",
            "this session has already attested; its challenge nonce is single-use",
        ));
    };
    Ok((id, SessionChallenge { nonce, tee, hash }))
}

/// The init-data document the client attests with, if any (TOML only).
fn attested_init_data(
    attestation: &Attestation,
) -> Result<Option<kabuto_initdata::InitData>, Problem> {
    let Some(doc) = &attestation.init_data else {
        return Ok(None);
    };
    if doc.format != "toml" {
        return Err(Problem::bad_request(
            "init-data",
            format!("init-data format {} (only toml)", doc.format),
        ));
    }
    kabuto_initdata::InitData::parse(doc.body.as_bytes())
        .map(Some)
        .map_err(|e| Problem::bad_request("init-data", e.to_string()))
}

/// The attestation policy's verdict on verified claims.
struct PolicyAppraisal {
    status: String,
    trust_vector: serde_json::Value,
}

/// Runs the attestation policy over the claims and the registered
/// reference values; a `contraindicated` status is a refusal naming the
/// policy's reasons.
fn appraise(
    kbs: &Kbs,
    tee: kbs_types::Tee,
    claims: &serde_json::Value,
    init_data: Option<&kabuto_initdata::InitData>,
) -> Result<PolicyAppraisal, Problem> {
    let reference = kbs.store.reference_values()?;
    let input = serde_json::json!({
        "claims": claims,
        "tee": tee,
        "init_data": init_data.map(|d| serde_json::json!({
            "digest": hex::encode(d.digest()),
            "data": d.data,
        })),
    });
    let appraisal = kbs
        .attestation_policy
        .evaluate(&input, &serde_json::json!({ "reference": reference }))
        .map_err(|e| Problem::internal(format!("attestation policy: {e}")))?;
    let status = appraisal
        .get("status")
        .and_then(|s| s.as_str())
        .unwrap_or("contraindicated")
        .to_string();
    if status == "contraindicated" {
        let reasons = appraisal
            .get("reasons")
            .and_then(|r| r.as_array())
            .map(|r| {
                r.iter()
                    .filter_map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| "the attestation policy gave no result".into());
        log::info!("attestation refused by policy: {reasons}");
        return Err(Problem::unauthorized(
            "attestation-policy",
            format!("attestation policy: {reasons}"),
        ));
    }
    Ok(PolicyAppraisal {
        status,
        trust_vector: appraisal.get("trust_vector").cloned().unwrap_or_default(),
    })
}

/// Signs the token, records the session as attested and answers with the
/// token and the session cookie.
fn issue_token(kbs: &Kbs, id: String, token_claims: TokenClaims) -> Result<Response, Problem> {
    let token = kbs
        .tokens
        .sign(&token_claims)
        .map_err(|e| Problem::internal(kabuto_error::chain(&e)))?;
    kbs.sessions
        .lock()
        .map_err(|_| Problem::internal("session table poisoned"))?
        .insert_attested(
            id.clone(),
            Session {
                state: SessionState::Attested(Box::new(token_claims)),
                expires: Instant::now() + kbs.token_ttl,
            },
        )
        .map_err(|_| {
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "capacity",
                "too many attested sessions; retry later",
            )
        })?;
    let mut response = axum::Json(serde_json::json!({ "token": token })).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(&id, kbs.token_ttl.as_secs()),
    );
    Ok(response)
}

pub(crate) use kabuto_kbs_protocol::valid_segment;

pub(crate) fn resource_path(repository: &str, kind: &str, tag: &str) -> Result<String, Problem> {
    kabuto_kbs_protocol::ResourceUri::from_segments(repository, kind, tag)
        .map(|uri| uri.path())
        .map_err(|e| Problem::bad_request("resource-path", e.to_string()))
}

/// The attested claims behind a resource request: a Bearer token, or an
/// attested session cookie.
fn requester(kbs: &Kbs, headers: &HeaderMap) -> Result<TokenClaims, Problem> {
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        let token = auth
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Problem::unauthorized("token", "Authorization must be `Bearer <token>`")
            })?;
        return kbs.tokens.verify(token.trim()).map_err(|e| {
            Problem::unauthorized(
                "token",
                format!("attestation token refused: {}", kabuto_error::chain(&e)),
            )
        });
    }
    let id = cookie_session(headers).ok_or_else(|| {
        Problem::unauthorized(
            "session",
            "no attested session: attest first (/kbs/v0/auth, /kbs/v0/attest) or send a token",
        )
    })?;
    let sessions = kbs
        .sessions
        .lock()
        .map_err(|_| Problem::internal("session table poisoned"))?;
    match sessions.get(&id) {
        Some(Session {
            state: SessionState::Attested(claims),
            expires,
        }) if *expires > Instant::now() => Ok((**claims).clone()),
        Some(Session {
            state: SessionState::Challenged { .. },
            ..
        }) => Err(Problem::unauthorized(
            "session",
            "the session has not attested yet",
        )),
        _ => Err(Problem::unauthorized(
            "session",
            "unknown or expired session: attest again",
        )),
    }
}

/// GET /kbs/v0/resource/<repository>/<type>/<tag>: the resource as a JWE
/// encrypted to the attested tee-pubkey.
pub async fn get_resource(
    State(kbs): State<Arc<Kbs>>,
    Path((repository, kind, tag)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let path = resource_path(&repository, &kind, &tag)?;
    let claims = requester(&kbs, &headers)?;
    let tee_pubkey = claims
        .cpu()
        .map(|cpu| cpu.evidence.runtime_data_claims.tee_pubkey.clone())
        .ok_or_else(|| Problem::unauthorized("token", "the token has no cpu0 appraisal"))?;
    // The input is the token's claims, as trustee's resource policies read
    // them (`input.submods.cpu0["ear.status"]`), plus the resource asked
    // for; `data` also names it the way trustee's does (`resource-path`).
    let mut input =
        serde_json::to_value(&claims).map_err(|e| Problem::internal(format!("claims: {e}")))?;
    input["resource"] =
        serde_json::json!({"repository": repository, "type": kind, "tag": tag, "path": path});
    let reference = kbs.store.reference_values()?;
    let allowed = kbs
        .resource_policy
        .evaluate(
            &input,
            &serde_json::json!({
                "reference": reference,
                "plugin": "resource",
                "resource-path": path,
            }),
        )
        .map_err(|e| Problem::internal(format!("resource policy: {e}")))?;
    if allowed != serde_json::Value::Bool(true) {
        log::info!("resource {path}: denied by the resource policy");
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "resource-policy",
            format!("the resource policy does not release {path} to this guest"),
        ));
    }
    let Some(value) = kbs.store.resource(&path)? else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "resource",
            format!("no resource {path}"),
        ));
    };
    let jwe = kabuto_jose::encrypt(&tee_pubkey, &value)
        .map_err(|e| Problem::bad_request("tee-pubkey", e.to_string()))?;
    log::info!("resource {path}: released");
    Ok(axum::Json(jwe).into_response())
}

/// GET /kbs/v0/token-key: the PEM key verifying this KBS's tokens.
pub async fn token_key(State(kbs): State<Arc<Kbs>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        kbs.token_public_key().to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_segments() {
        assert!(version_compatible("0.4.0"));
        assert!(version_compatible("0.1.0"));
        assert!(!version_compatible("1.0.0"));
        assert!(!version_compatible("0.0.1"));
        assert!(!version_compatible("0.9.0"));
        assert!(!version_compatible("garbage"));
        assert!(valid_segment("key-1.pem"));
        assert!(!valid_segment(".."));
        assert!(!valid_segment("a/b"));
        assert!(!valid_segment(""));
    }
}
