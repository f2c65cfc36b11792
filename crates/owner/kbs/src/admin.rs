//! The admin API. Each call carries `Authorization: Bearer <JWT>` signed by
//! a key listed in the configuration; the key's roles decide what it may
//! change. Refused calls change nothing.
//!
//! Two kinds of token, by the key's type:
//! - P-256 keys sign ours (ES256): `aud` [`ADMIN_AUDIENCE`], single-use
//!   `jti`, at most [`MAX_ADMIN_TOKEN_SECS`] long.
//! - Ed25519 keys sign trustee's, as CoCo's `kbs-client` makes them (EdDSA,
//!   `iat`, `nbf`, `exp` two hours later, no `aud` or `jti`): the lifetime is
//!   capped at [`MAX_TRUSTEE_TOKEN_SECS`], an `aud` other than ours is
//!   refused, a `jti` if present is single-use; without one a token can be
//!   replayed within its lifetime, as on a trustee KBS.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use jsonwebtoken::{Algorithm, Validation};
use serde::{Deserialize, Serialize};

use crate::api::{resource_path, valid_segment};
use crate::config::Role;
use crate::error::Problem;
use crate::{store, AdminKeyKind, Kbs};

/// Claims of an admin token: `aud` must be [`ADMIN_AUDIENCE`] (a token the
/// key signed for something else is not an admin token), `exp - iat` at
/// most [`MAX_ADMIN_TOKEN_SECS`], and `jti` is accepted once (a token seen
/// on the wire cannot be replayed). `sub` is for audit logs.
#[derive(Serialize, Deserialize)]
pub struct AdminClaims {
    pub exp: u64,
    pub iat: u64,
    #[serde(default)]
    pub aud: String,
    #[serde(default)]
    pub jti: String,
    #[serde(default)]
    pub sub: String,
}

pub const ADMIN_AUDIENCE: &str = "kabuto-kbs-admin";
/// The longest lifetime an admin token may claim.
pub const MAX_ADMIN_TOKEN_SECS: u64 = 3600;
/// The longest lifetime a trustee-style (Ed25519) admin token may claim:
/// `kbs-client` signs two hours.
pub const MAX_TRUSTEE_TOKEN_SECS: u64 = 7200;
/// Clock skew allowed between the admin's machine and the KBS.
const LEEWAY_SECS: u64 = 5;

fn authorize(kbs: &Kbs, headers: &HeaderMap, needed: Role) -> Result<String, Problem> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            Problem::unauthorized(
                "admin-auth",
                "missing `Authorization: Bearer <admin token>`",
            )
        })?;
    for key in &kbs.admin_keys {
        let (validation, max_lifetime) = validation_for(key.kind);
        let Ok(data) = jsonwebtoken::decode::<AdminClaims>(token.trim(), &key.key, &validation)
        else {
            continue;
        };
        let claims = data.claims;
        check_claims(kbs, key.kind, &claims, max_lifetime)?;
        if key.roles.contains(&Role::Admin) || key.roles.contains(&needed) {
            return Ok(if claims.sub.is_empty() {
                format!("{:?} key", key.kind)
            } else {
                claims.sub
            });
        }
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "admin-role",
            format!("this admin key lacks the {needed:?} role"),
        ));
    }
    Err(Problem::unauthorized(
        "admin-auth",
        "the admin token is not signed by a configured admin key, has expired, or is not for this KBS's admin API (aud)",
    ))
}

/// How a token of a key of `kind` is validated, and the longest lifetime
/// it may claim.
fn validation_for(kind: AdminKeyKind) -> (Validation, u64) {
    let (mut validation, max_lifetime) = match kind {
        AdminKeyKind::Es256 => {
            let mut validation = Validation::new(Algorithm::ES256);
            validation.set_required_spec_claims(&["exp", "aud"]);
            validation.set_audience(&[ADMIN_AUDIENCE]);
            (validation, MAX_ADMIN_TOKEN_SECS)
        }
        AdminKeyKind::TrusteeEd25519 => {
            let mut validation = Validation::new(Algorithm::EdDSA);
            validation.set_required_spec_claims(&["exp"]);
            validation.validate_nbf = true;
            // kbs-client sends no `aud`; one naming something else is
            // refused in check_claims.
            validation.validate_aud = false;
            (validation, MAX_TRUSTEE_TOKEN_SECS)
        }
    };
    validation.leeway = LEEWAY_SECS;
    (validation, max_lifetime)
}

/// What the signature does not prove: audience (trustee tokens), issue
/// time and lifetime, single use.
fn check_claims(
    kbs: &Kbs,
    kind: AdminKeyKind,
    claims: &AdminClaims,
    max_lifetime: u64,
) -> Result<(), Problem> {
    let now = crate::token::now_secs();
    if kind == AdminKeyKind::TrusteeEd25519
        && !claims.aud.is_empty()
        && claims.aud != ADMIN_AUDIENCE
    {
        return Err(Problem::unauthorized(
            "admin-auth",
            format!(
                "the admin token is for {:?}, not this KBS's admin API",
                claims.aud
            ),
        ));
    }
    // Used ids are remembered by this process only: a token issued before
    // it started could have been used already.
    let single_use = kind == AdminKeyKind::Es256 || !claims.jti.is_empty();
    if single_use && claims.iat + LEEWAY_SECS < kbs.started_secs {
        return Err(Problem::unauthorized(
            "admin-auth",
            "the admin token was issued before this KBS started: make a new one",
        ));
    }
    if claims.iat > now + LEEWAY_SECS || claims.exp.saturating_sub(claims.iat) > max_lifetime {
        return Err(Problem::unauthorized(
            "admin-auth",
            format!("the admin token's lifetime must lie within {max_lifetime} s from an issue time that is not in the future"),
        ));
    }
    if single_use && (claims.jti.is_empty() || !kbs.admin_token_first_use(&claims.jti, claims.exp))
    {
        return Err(Problem::unauthorized(
            "admin-auth",
            "the admin token was already used (or has no jti): admin tokens are single-use",
        ));
    }
    Ok(())
}

fn ok(what: String) -> Response {
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({ "updated": what })),
    )
        .into_response()
}

/// Accepts raw Rego, or trustee's JSON forms: `{"policy": base64(rego)}`
/// (resource policy) and `{"type": "rego", "policy_id": "default",
/// "policy": base64(rego)}` (attestation policy; this KBS keeps one, so
/// the id must be "default").
fn policy_text(body: &[u8]) -> Result<String, Problem> {
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(body) {
        let member = |name: &str| map.get(name).and_then(|v| v.as_str());
        if let Some(kind) = member("type") {
            if kind != "rego" {
                return Err(Problem::bad_request(
                    "policy",
                    format!("policy type {kind:?}: only \"rego\""),
                ));
            }
        }
        if let Some(id) = member("policy_id") {
            if id != "default" {
                return Err(Problem::bad_request(
                    "policy",
                    format!("policy_id {id:?}: this KBS has one policy of each kind, \"default\""),
                ));
            }
        }
        let encoded = member("policy")
            .ok_or_else(|| Problem::bad_request("policy", "JSON body without a `policy` string"))?;
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(encoded.trim_end_matches('='))
            .or_else(|_| base64::engine::general_purpose::STANDARD.decode(encoded))
            .map_err(|e| Problem::bad_request("policy", format!("policy is not base64: {e}")))?;
        return String::from_utf8(decoded)
            .map_err(|_| Problem::bad_request("policy", "policy is not UTF-8"));
    }
    String::from_utf8(body.to_vec())
        .map_err(|_| Problem::bad_request("policy", "policy is not UTF-8"))
}

pub async fn set_resource(
    State(kbs): State<Arc<Kbs>>,
    Path((repository, kind, tag)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let who = authorize(&kbs, &headers, Role::ResourceWriter)?;
    let path = resource_path(&repository, &kind, &tag)?;
    kbs.store.set_resource(&path, &body)?;
    log::info!("admin {who}: set resource {path} ({} bytes)", body.len());
    Ok(ok(format!("resource {path}")))
}

pub async fn delete_resource(
    State(kbs): State<Arc<Kbs>>,
    Path((repository, kind, tag)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let who = authorize(&kbs, &headers, Role::ResourceWriter)?;
    let path = resource_path(&repository, &kind, &tag)?;
    if !kbs.store.delete_resource(&path)? {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "resource",
            format!("no resource {path}"),
        ));
    }
    log::info!("admin {who}: deleted resource {path}");
    Ok(ok(format!("resource {path} deleted")))
}

pub async fn set_attestation_policy(
    State(kbs): State<Arc<Kbs>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    set_policy(&kbs, &headers, &body, PolicyKind::Attestation)
}

pub async fn set_resource_policy(
    State(kbs): State<Arc<Kbs>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    set_policy(&kbs, &headers, &body, PolicyKind::Resource)
}

enum PolicyKind {
    Attestation,
    Resource,
}

fn set_policy(
    kbs: &Kbs,
    headers: &HeaderMap,
    body: &[u8],
    kind: PolicyKind,
) -> Result<Response, Problem> {
    let who = authorize(kbs, headers, Role::PolicyWriter)?;
    let rego = policy_text(body)?;
    let (policy, key, name) = match kind {
        PolicyKind::Attestation => (
            &kbs.attestation_policy,
            store::ATTESTATION_POLICY,
            "attestation policy",
        ),
        PolicyKind::Resource => (
            &kbs.resource_policy,
            store::RESOURCE_POLICY,
            "resource policy",
        ),
    };
    // Compile first; only a policy that compiles is stored, and it is put
    // in force only once stored (a failed write leaves the old one in force
    // and on disk alike).
    let prepared = policy
        .prepare(&rego)
        .map_err(|e| Problem::bad_request("policy", e.to_string()))?;
    // Stored and installed as one step: of two concurrent writes, the one
    // stored last is the one in force.
    let _writing = kbs
        .policy_writes
        .lock()
        .map_err(|_| Problem::internal("policy write lock poisoned"))?;
    kbs.store.set_setting(key, rego.as_bytes())?;
    policy
        .install(prepared)
        .map_err(|e| Problem::internal(e.to_string()))?;
    log::info!("admin {who}: set the {name}");
    Ok(ok(name.into()))
}

pub async fn set_reference_values(
    State(kbs): State<Arc<Kbs>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let who = authorize(&kbs, &headers, Role::PolicyWriter)?;
    if !valid_segment(&name) {
        return Err(Problem::bad_request(
            "reference-values",
            format!("reference value name {name:?} must be [A-Za-z0-9._-]"),
        ));
    }
    let values: Vec<serde_json::Value> = serde_json::from_slice(&body).map_err(|e| {
        Problem::bad_request(
            "reference-values",
            format!("body must be a JSON array of values: {e}"),
        )
    })?;
    let json = serde_json::to_string(&values).map_err(|e| Problem::internal(e.to_string()))?;
    kbs.store.set_reference_values(&name, &json)?;
    log::info!(
        "admin {who}: set {} reference value(s) for {name}",
        values.len()
    );
    Ok(ok(format!("reference values {name}")))
}

pub async fn get_reference_values(
    State(kbs): State<Arc<Kbs>>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    authorize(&kbs, &headers, Role::PolicyWriter)?;
    Ok(axum::Json(kbs.store.reference_values()?).into_response())
}

/// Replaces the trusted software-TEE roots (PEM bundle; empty clears).
pub async fn set_software_tee_roots(
    State(kbs): State<Arc<Kbs>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    let who = authorize(&kbs, &headers, Role::PolicyWriter)?;
    let roots = crate::parse_pem_certificates(&body)
        .map_err(|e| Problem::bad_request("software-tee-roots", kabuto_error::chain(&e)))?;
    kbs.store.set_setting(store::SOFTWARE_TEE_ROOTS, &body)?;
    kbs.reload_software_roots()
        .map_err(|e| Problem::internal(kabuto_error::chain(&e)))?;
    log::warn!(
        "admin {who}: now trusting {} software-TEE root(s) — evidence from them is insecure by construction",
        roots.len()
    );
    Ok(ok(format!("{} software-TEE root(s)", roots.len())))
}
