//! Init-data: a pod's TOML document of settings for the guest (its policy
//! first), delivered through the untrusted host, and trusted only through a
//! digest fixed into the TEE's launch data before boot.
//!
//! The digest is taken over the raw TOML bytes with the document's own
//! `algorithm`, then fitted to the TEE field: zero-padded when shorter,
//! truncated when longer (SNP HOST_DATA holds 32 bytes, TDX MRCONFIGID 48).

use std::{collections::BTreeMap, io::Read};

use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest, Sha256, Sha384, Sha512};
use thiserror::Error;

/// The annotation Kata Containers uses, accepted so existing manifests work.
pub const KATA_ANNOTATION: &str = "io.katacontainers.config.hypervisor.cc_init_data";
/// kabuto's own annotation name (same encoding).
pub const KABUTO_ANNOTATION: &str = "io.kabuto.init-data";
/// The only document version understood.
pub const VERSION: &str = "0.1.0";
/// Largest accepted document, compressed or not: a bound against
/// decompression bombs from the host.
pub const MAX_DOCUMENT_BYTES: usize = 8 << 20;
/// SNP HOST_DATA and TDX MRCONFIGID sizes.
pub const SNP_HOST_DATA_LEN: usize = 32;
pub const TDX_MRCONFIGID_LEN: usize = 48;

#[derive(Debug, Error)]
pub enum InitDataError {
    #[error("init-data annotation is not base64: {0}")]
    Base64(String),
    #[error("init-data annotation is not gzip: {0}")]
    Gzip(String),
    #[error("init-data is larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge,
    #[error("init-data is not valid TOML: {0}")]
    Toml(String),
    #[error("init-data version {0:?} is not supported (expected {VERSION})")]
    Version(String),
    #[error("init-data algorithm {0:?} is not supported (sha256, sha384 or sha512)")]
    Algorithm(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Sha256,
    Sha384,
    Sha512,
}

impl Algorithm {
    fn parse(name: &str) -> Result<Algorithm, InitDataError> {
        match name {
            "sha256" => Ok(Algorithm::Sha256),
            "sha384" => Ok(Algorithm::Sha384),
            "sha512" => Ok(Algorithm::Sha512),
            other => Err(InitDataError::Algorithm(other.into())),
        }
    }

    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Algorithm::Sha256 => Sha256::digest(data).to_vec(),
            Algorithm::Sha384 => Sha384::digest(data).to_vec(),
            Algorithm::Sha512 => Sha512::digest(data).to_vec(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    version: String,
    algorithm: String,
    #[serde(default)]
    data: BTreeMap<String, String>,
}

/// A parsed init-data document with the bytes it was parsed from.
#[derive(Debug, Clone)]
pub struct InitData {
    pub version: String,
    pub algorithm: Algorithm,
    /// File name → contents (`policy.rego`, `aa.toml`, `cdh.toml`, ...).
    pub data: BTreeMap<String, String>,
    raw: Vec<u8>,
}

impl InitData {
    /// Parses the raw TOML document.
    pub fn parse(raw: &[u8]) -> Result<InitData, InitDataError> {
        if raw.len() > MAX_DOCUMENT_BYTES {
            return Err(InitDataError::TooLarge);
        }
        let text = std::str::from_utf8(raw).map_err(|e| InitDataError::Toml(e.to_string()))?;
        let doc: Document = toml::from_str(text).map_err(|e| InitDataError::Toml(e.to_string()))?;
        if doc.version != VERSION {
            return Err(InitDataError::Version(doc.version));
        }
        Ok(InitData {
            algorithm: Algorithm::parse(&doc.algorithm)?,
            version: doc.version,
            data: doc.data,
            raw: raw.to_vec(),
        })
    }

    /// Decodes an annotation value (base64 of gzip of the TOML).
    pub fn from_annotation(value: &str) -> Result<InitData, InitDataError> {
        if value.len() > MAX_DOCUMENT_BYTES * 2 {
            return Err(InitDataError::TooLarge);
        }
        let compressed = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .map_err(|e| InitDataError::Base64(e.to_string()))?;
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(compressed.as_slice())
            .take(MAX_DOCUMENT_BYTES as u64 + 1)
            .read_to_end(&mut raw)
            .map_err(|e| InitDataError::Gzip(e.to_string()))?;
        InitData::parse(&raw)
    }

    /// Encodes the raw document as an annotation value.
    pub fn to_annotation(&self) -> String {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        // Writing to a Vec cannot fail.
        let _ = gz.write_all(&self.raw);
        let compressed = gz.finish().unwrap_or_default();
        base64::engine::general_purpose::STANDARD.encode(compressed)
    }

    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// The document's digest with its own algorithm.
    pub fn digest(&self) -> Vec<u8> {
        self.algorithm.digest(&self.raw)
    }

    /// The digest fitted to a TEE field of `len` bytes.
    pub fn digest_for_field(&self, len: usize) -> Vec<u8> {
        fit_digest(&self.digest(), len)
    }

    /// The pod's policy, if the document carries one.
    pub fn policy(&self) -> Option<&str> {
        self.data.get("policy.rego").map(String::as_str)
    }
}

/// Zero-pads or truncates `digest` to `len` bytes.
pub fn fit_digest(digest: &[u8], len: usize) -> Vec<u8> {
    let mut out = digest.to_vec();
    out.resize(len, 0);
    out
}

/// Finds the init-data annotation (kabuto's name first, then Kata's).
pub fn from_annotations<'a>(
    annotations: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Option<&'a String> {
    let mut kata = None;
    for (k, v) in annotations {
        if k == KABUTO_ANNOTATION {
            return Some(v);
        }
        if k == KATA_ANNOTATION {
            kata = Some(v);
        }
    }
    kata
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "version = \"0.1.0\"\nalgorithm = \"sha256\"\n\n[data]\n\"policy.rego\" = '''\npackage agent_policy\ndefault CreateContainerRequest := true\n'''\n";

    #[test]
    fn parses_and_digests_the_raw_bytes() {
        let d = InitData::parse(DOC.as_bytes()).expect("parses");
        assert_eq!(d.algorithm, Algorithm::Sha256);
        assert!(d.policy().expect("policy").contains("package agent_policy"));
        assert_eq!(d.digest(), Sha256::digest(DOC.as_bytes()).to_vec());
        // One changed byte, another digest.
        let changed = DOC.replace("true", "false");
        let d2 = InitData::parse(changed.as_bytes()).expect("parses");
        assert_ne!(d.digest(), d2.digest());
    }

    /// An init-data document as CoCo's tooling and docs write it (aa.toml,
    /// cdh.toml, policy.rego), under each algorithm: accepted unchanged, the
    /// digest over its exact bytes, truncated or zero-padded to the TEE's
    /// field (SNP HOST_DATA 32 bytes, TDX MRCONFIGID 48).
    #[test]
    fn coco_written_init_data_is_accepted_unchanged() {
        const BODY: &str = r#"
[data]
"aa.toml" = '''
[token_configs]
[token_configs.coco_as]
url = 'http://127.0.0.1:8080'

[token_configs.kbs]
url = 'https://127.0.0.1:8080'
cert = """
-----BEGIN CERTIFICATE-----
MIIB
-----END CERTIFICATE-----
"""
'''

"cdh.toml"  = '''
socket = 'unix:///run/confidential-containers/cdh.sock'
credentials = []

[kbc]
name = 'cc_kbc'
url = 'https://127.0.0.1:8080'
'''

"policy.rego" = '''
package agent_policy

default AllowRequestsFailingPolicy := true
'''
"#;
        for algorithm in ["sha256", "sha384", "sha512"] {
            let doc = format!("algorithm = \"{algorithm}\"\nversion = \"0.1.0\"\n{BODY}");
            let d = InitData::parse(doc.as_bytes()).expect("CoCo's init-data parses");
            assert_eq!(d.data.len(), 3);
            assert!(d.data["cdh.toml"].contains("cc_kbc"));
            let expected = match algorithm {
                "sha256" => Sha256::digest(doc.as_bytes()).to_vec(),
                "sha384" => sha2::Sha384::digest(doc.as_bytes()).to_vec(),
                _ => sha2::Sha512::digest(doc.as_bytes()).to_vec(),
            };
            assert_eq!(d.digest(), expected);
            for field in [32, 48] {
                let fitted = d.digest_for_field(field);
                assert_eq!(fitted.len(), field);
                let kept = expected.len().min(field);
                assert_eq!(fitted[..kept], expected[..kept]);
                assert!(fitted[kept..].iter().all(|&b| b == 0));
            }
        }
    }

    #[test]
    fn known_digest() {
        // sha384 of the empty-data document, computed independently (Python hashlib).
        let doc = b"version = \"0.1.0\"\nalgorithm = \"sha384\"\n";
        let d = InitData::parse(doc).expect("parses");
        assert_eq!(
            hex::encode(d.digest()),
            "cc367223fdb0ecfb2353e2f1f944c1c24a4bcdc08acdfeed73552c2f345925416f920531a08363aa0511d964c76fe5d6"
        );
    }

    #[test]
    fn annotation_round_trip() {
        let d = InitData::parse(DOC.as_bytes()).expect("parses");
        let back = InitData::from_annotation(&d.to_annotation()).expect("decodes");
        assert_eq!(back.raw(), DOC.as_bytes());
        assert_eq!(back.digest(), d.digest());
    }

    #[test]
    fn fits_tee_fields() {
        let d = InitData::parse(DOC.as_bytes()).expect("parses");
        let snp = d.digest_for_field(SNP_HOST_DATA_LEN);
        assert_eq!(snp, d.digest(), "sha256 fills HOST_DATA exactly");
        let tdx = d.digest_for_field(TDX_MRCONFIGID_LEN);
        assert_eq!(&tdx[..32], &d.digest()[..]);
        assert_eq!(&tdx[32..], &[0u8; 16]);
        assert_eq!(fit_digest(&[1; 64], 48), vec![1; 48]);
    }

    #[test]
    fn refuses_bad_documents() {
        assert!(matches!(
            InitData::parse(b"version = \"9\"\nalgorithm = \"sha256\"\n"),
            Err(InitDataError::Version(_))
        ));
        assert!(matches!(
            InitData::parse(b"version = \"0.1.0\"\nalgorithm = \"md5\"\n"),
            Err(InitDataError::Algorithm(_))
        ));
        assert!(matches!(
            InitData::parse(b"version = \"0.1.0\"\nalgorithm = \"sha256\"\nextra = 1\n"),
            Err(InitDataError::Toml(_))
        ));
        assert!(matches!(
            InitData::from_annotation("***"),
            Err(InitDataError::Base64(_))
        ));
        assert!(matches!(
            InitData::from_annotation("aGVsbG8="),
            Err(InitDataError::Gzip(_))
        ));
    }

    #[test]
    fn decompression_bombs_are_refused() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![b'#'; MAX_DOCUMENT_BYTES + 10])
            .expect("write");
        let bomb = base64::engine::general_purpose::STANDARD.encode(gz.finish().expect("gzip"));
        assert!(matches!(
            InitData::from_annotation(&bomb),
            Err(InitDataError::TooLarge)
        ));
    }

    #[test]
    fn kabuto_annotation_wins_over_kata() {
        let (kk, kv) = (KATA_ANNOTATION.to_string(), "kata".to_string());
        let (ok, ov) = (KABUTO_ANNOTATION.to_string(), "ours".to_string());
        assert_eq!(
            from_annotations([(&kk, &kv), (&ok, &ov)]).map(String::as_str),
            Some("ours")
        );
        assert_eq!(
            from_annotations([(&kk, &kv)]).map(String::as_str),
            Some("kata")
        );
    }
}
