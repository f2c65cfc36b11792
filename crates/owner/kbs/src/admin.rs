//! The admin API. Each call carries `Authorization: Bearer <JWT>`, ES256,
//! signed by a key listed in the configuration; the key's roles decide
//! what it may change. Refused calls change nothing.

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
use crate::{store, Kbs};

/// Claims of an admin token: `aud` must be [`ADMIN_AUDIENCE`] (a token the
/// key signed for something else is not an admin token), `exp - iat` at
/// most [`MAX_ADMIN_TOKEN_SECS`], and `jti` is accepted once (a token seen
/// on the wire cannot be replayed). `sub` is for audit logs.
#[derive(Serialize, Deserialize)]
pub struct AdminClaims {
    pub exp: u64,
    pub iat: u64,
    pub aud: String,
    pub jti: String,
    #[serde(default)]
    pub sub: String,
}

pub const ADMIN_AUDIENCE: &str = "kabuto-kbs-admin";
/// The longest lifetime an admin token may claim.
pub const MAX_ADMIN_TOKEN_SECS: u64 = 3600;
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
    let mut validation = Validation::new(Algorithm::ES256);
    validation.leeway = LEEWAY_SECS;
    validation.set_required_spec_claims(&["exp", "aud"]);
    validation.set_audience(&[ADMIN_AUDIENCE]);
    for key in &kbs.admin_keys {
        if let Ok(data) = jsonwebtoken::decode::<AdminClaims>(token.trim(), &key.key, &validation) {
            let claims = data.claims;
            let now = crate::token::now_secs();
            // Used ids are remembered by this process only: a token issued
            // before it started could have been used already.
            if claims.iat + LEEWAY_SECS < kbs.started_secs {
                return Err(Problem::unauthorized(
                    "admin-auth",
                    "the admin token was issued before this KBS started: make a new one",
                ));
            }
            if claims.iat > now + LEEWAY_SECS
                || claims.exp.saturating_sub(claims.iat) > MAX_ADMIN_TOKEN_SECS
            {
                return Err(Problem::unauthorized(
                    "admin-auth",
                    format!("the admin token's lifetime must lie within {MAX_ADMIN_TOKEN_SECS} s from an issue time that is not in the future"),
                ));
            }
            if claims.jti.is_empty() || !kbs.admin_token_first_use(&claims.jti, claims.exp) {
                return Err(Problem::unauthorized(
                    "admin-auth",
                    "the admin token was already used (or has no jti): admin tokens are single-use",
                ));
            }
            if key.roles.contains(&Role::Admin) || key.roles.contains(&needed) {
                return Ok(claims.sub);
            }
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                "admin-role",
                format!("this admin key lacks the {needed:?} role"),
            ));
        }
    }
    Err(Problem::unauthorized(
        "admin-auth",
        "the admin token is not signed by a configured admin key, has expired, or is not for this KBS's admin API (aud)",
    ))
}

fn ok(what: String) -> Response {
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({ "updated": what })),
    )
        .into_response()
}

/// Accepts raw Rego, or trustee's JSON form `{"policy": base64(rego)}`.
fn policy_text(body: &[u8]) -> Result<String, Problem> {
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(body) {
        let encoded = map
            .get("policy")
            .and_then(|p| p.as_str())
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
        .map_err(|e| Problem::bad_request("software-tee-roots", e.to_string()))?;
    kbs.store.set_setting(store::SOFTWARE_TEE_ROOTS, &body)?;
    kbs.reload_software_roots()
        .map_err(|e| Problem::internal(e.to_string()))?;
    log::warn!(
        "admin {who}: now trusting {} software-TEE root(s) — evidence from them is insecure by construction",
        roots.len()
    );
    Ok(ok(format!("{} software-TEE root(s)", roots.len())))
}
