//! What the guest's attestation agent and the owner's KBS must compute alike
//! in CoCo's KBS protocol (see README.md): a binding computed two ways is a
//! binding that silently breaks.

use std::fmt;

pub use kbs_types;
use kbs_types::{HashAlgorithm, RuntimeData};

/// The KBS protocol version both sides speak.
pub const PROTOCOL_VERSION: &str = "0.4.0";

/// The report data a TEE report must carry for this attestation: the hash
/// the KBS selected, over the canonical JSON (RFC 8785) of the runtime data
/// and the additional evidence. A report carrying it proves the TEE holds
/// the nonce's session and the key resources are wrapped to.
pub fn report_data(
    hash: HashAlgorithm,
    runtime_data: &RuntimeData,
    additional_evidence: &str,
) -> Result<Vec<u8>, kabuto_jose::JoseError> {
    let canonical = kabuto_jose::canonical_json(&serde_json::json!({
        "tee-pubkey": runtime_data.tee_pubkey,
        "nonce": runtime_data.nonce,
        "additional-evidence": additional_evidence,
    }))?;
    Ok(hash.digest(&canonical))
}

/// The report data a device attester's evidence binds (CoCo's additional
/// evidence): the runtime data alone, `{nonce, tee-pubkey}`, in JCS and
/// hashed. The primary evidence then binds the devices' evidence through
/// [`report_data`]'s `additional-evidence`.
pub fn device_report_data(
    hash: HashAlgorithm,
    runtime_data: &RuntimeData,
) -> Result<Vec<u8>, kabuto_jose::JoseError> {
    let canonical = kabuto_jose::canonical_json(&serde_json::json!({
        "tee-pubkey": runtime_data.tee_pubkey,
        "nonce": runtime_data.nonce,
    }))?;
    Ok(hash.digest(&canonical))
}

/// The longest resource path segment.
pub const MAX_SEGMENT_LEN: usize = 128;

/// A resource path segment: 1–128 of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SEGMENT_LEN
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceUriError {
    #[error("{0:?} is not a kbs:// URI")]
    Scheme(String),
    #[error("{0:?}: expected kbs:///<repository>/<type>/<tag>")]
    Shape(String),
    #[error("resource {what} {value:?} must be 1-128 characters of [A-Za-z0-9._-]")]
    Segment { what: &'static str, value: String },
}

/// A KBS resource: `kbs:///repository/type/tag`. A host part is ignored:
/// the KBS is the one the client was configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceUri {
    pub repository: String,
    pub kind: String,
    pub tag: String,
}

impl ResourceUri {
    /// From the three path segments (the KBS's `/resource/<r>/<t>/<g>`).
    pub fn from_segments(
        repository: &str,
        kind: &str,
        tag: &str,
    ) -> Result<ResourceUri, ResourceUriError> {
        for (what, value) in [("repository", repository), ("type", kind), ("tag", tag)] {
            if !valid_segment(value) {
                return Err(ResourceUriError::Segment {
                    what,
                    value: value.into(),
                });
            }
        }
        Ok(ResourceUri {
            repository: repository.into(),
            kind: kind.into(),
            tag: tag.into(),
        })
    }

    /// `repository/type/tag`.
    pub fn path(&self) -> String {
        format!("{}/{}/{}", self.repository, self.kind, self.tag)
    }
}

impl fmt::Display for ResourceUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kbs:///{}", self.path())
    }
}

impl std::str::FromStr for ResourceUri {
    type Err = ResourceUriError;
    fn from_str(uri: &str) -> Result<Self, ResourceUriError> {
        let rest = uri
            .strip_prefix("kbs://")
            .ok_or_else(|| ResourceUriError::Scheme(uri.into()))?;
        let (_host, path) = rest
            .split_once('/')
            .ok_or_else(|| ResourceUriError::Shape(uri.into()))?;
        match path.split('/').collect::<Vec<_>>().as_slice() {
            [repository, kind, tag] => ResourceUri::from_segments(repository, kind, tag),
            _ => Err(ResourceUriError::Shape(uri.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kbs_types::TeePubKey;

    #[test]
    fn resource_uris_name_three_plain_segments() {
        let u: ResourceUri = "kbs:///default/key/1".parse().expect("parses");
        assert_eq!(u.path(), "default/key/1");
        assert_eq!(u.to_string(), "kbs:///default/key/1");
        assert_eq!(
            "kbs://kbs.example/default/key/1".parse::<ResourceUri>(),
            Ok(u)
        );
        for (bad, want) in [
            ("http:///a/b/c", "not a kbs:// URI"),
            ("kbs:///a/b", "expected kbs:///"),
            ("kbs:///a/b/c/d", "expected kbs:///"),
            ("kbs:///a/../c", "type \"..\""),
            ("kbs:///a/b/c d", "tag \"c d\""),
            ("kbs:///a//c", "type \"\""),
        ] {
            let e = bad.parse::<ResourceUri>().expect_err(bad).to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
        let long = "x".repeat(MAX_SEGMENT_LEN + 1);
        assert!(ResourceUri::from_segments("a", "b", &long).is_err());
        assert!(ResourceUri::from_segments("a", "b", &long[1..]).is_ok());
    }

    #[test]
    fn report_data_is_the_selected_hash_of_the_canonical_runtime_data() {
        let runtime = RuntimeData {
            nonce: "n0nce".into(),
            tee_pubkey: TeePubKey::EC {
                crv: "P-256".into(),
                alg: "ECDH-ES+A256KW".into(),
                x: "eA".into(),
                y: "eQ".into(),
            },
        };
        // RFC 8785: keys sorted, no whitespace.
        let canonical = br#"{"additional-evidence":"","nonce":"n0nce","tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"eA","y":"eQ"}}"#;
        for hash in [
            HashAlgorithm::Sha256,
            HashAlgorithm::Sha384,
            HashAlgorithm::Sha512,
        ] {
            assert_eq!(
                report_data(hash, &runtime, "").expect("binds"),
                hash.digest(canonical)
            );
        }
        let other = RuntimeData {
            nonce: "other".into(),
            ..runtime.clone()
        };
        assert_ne!(
            report_data(HashAlgorithm::Sha384, &runtime, "").expect("binds"),
            report_data(HashAlgorithm::Sha384, &other, "").expect("binds")
        );
    }
}
