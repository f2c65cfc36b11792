//! `kabuto-kbs` configuration (TOML). Every field is documented in
//! [`EXAMPLE_TOML`]; unknown fields are refused.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A complete, commented configuration. `kabuto-kbs serve --print-config`
/// prints it.
pub const EXAMPLE_TOML: &str = r#"# kabuto-kbs configuration
# Address to listen on.
listen = "127.0.0.1:8443"
# The persistent store (redb). Created if missing.
store = "/var/lib/kabuto/kbs/store.redb"
# ES256 (P-256) key that signs attestation tokens. Generated if missing.
token_key = "/var/lib/kabuto/kbs/token.key"
# Seconds a challenge (and the session cookie before attestation) stays valid.
session_ttl_secs = 300
# Seconds an attestation token / attested session stays valid.
token_ttl_secs = 300

[tls]
# PEM certificate chain and private key. Guests learn to trust this
# certificate through their init-data ([data] "kbs-ca.pem").
cert = "/etc/kabuto/kbs/tls.crt"
key = "/etc/kabuto/kbs/tls.key"
# Serve plain HTTP instead (tests on loopback only). Refused unless the
# listen address is a loopback address.
insecure_http = false

# Public keys (PEM, ES256/P-256) allowed to call the admin API, and their
# roles: "admin" (everything), "resource-writer" (resources only),
# "policy-writer" (policies, reference values, trusted software-TEE roots).
[[admin_keys]]
public_key = "/etc/kabuto/kbs/admin.pub"
roles = ["admin"]

[attestation]
# Accept CoCo's "sample" evidence (no TEE at all). Insecure; testing only.
accept_sample = false
# DCAP collateral for TDX quotes, as JSON (this KBS never contacts Intel PCS).
# tdx_collateral = "/etc/kabuto/kbs/tdx-collateral.json"
# AMD's ASK/ASVK certificates (PEM), for SNP reports signed by a VLEK (cloud
# providers such as AWS): the evidence usually carries only the VLEK. Fetch
# them from https://kdsintf.amd.com/vlek/v1/{Milan,Genoa,Turin}/cert_chain.
# Each is used only when AMD's ARK, pinned in kabuto, signed it.
# amd_certs = "/etc/kabuto/kbs/amd-cert-chains.pem"
"#;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    pub store: PathBuf,
    pub token_key: PathBuf,
    #[serde(default = "default_ttl")]
    pub session_ttl_secs: u64,
    #[serde(default = "default_ttl")]
    pub token_ttl_secs: u64,
    pub tls: TlsConfig,
    #[serde(default)]
    pub admin_keys: Vec<AdminKey>,
    #[serde(default)]
    pub attestation: AttestationConfig,
}

fn default_ttl() -> u64 {
    300
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub insecure_http: bool,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct AdminKey {
    pub public_key: PathBuf,
    pub roles: Vec<Role>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Admin,
    ResourceWriter,
    PolicyWriter,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AttestationConfig {
    #[serde(default)]
    pub accept_sample: bool,
    #[serde(default)]
    pub tdx_collateral: Option<PathBuf>,
    #[serde(default)]
    pub amd_certs: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let config: Config = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if config.tls.insecure_http {
            if !config.listen.ip().is_loopback() {
                return Err(invalid(format!(
                    "tls.insecure_http is only allowed on a loopback address, not {}",
                    config.listen
                )));
            }
        } else if config.tls.cert.is_none() || config.tls.key.is_none() {
            return Err(invalid(
                "tls.cert and tls.key are required (or tls.insecure_http = true on loopback)"
                    .into(),
            ));
        }
        if config.session_ttl_secs == 0 || config.token_ttl_secs == 0 {
            return Err(invalid("ttl values must be positive".into()));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn example_parses_and_rules_apply() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kbs.toml");
        std::fs::write(&p, EXAMPLE_TOML).unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.admin_keys[0].roles, vec![Role::Admin]);
        std::fs::write(
            &p,
            EXAMPLE_TOML
                .replace("insecure_http = false", "insecure_http = true")
                .replace("127.0.0.1:8443", "0.0.0.0:8443"),
        )
        .unwrap();
        assert!(Config::load(&p)
            .unwrap_err()
            .to_string()
            .contains("loopback"));
        std::fs::write(&p, format!("{EXAMPLE_TOML}\nbogus = 1\n")).unwrap();
        assert!(Config::load(&p).unwrap_err().to_string().contains("bogus"));
    }
}
